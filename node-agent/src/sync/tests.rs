use std::time::SystemTime;

use meshlite_proto::model::{
    AddressFamily, Endpoint, EndpointPort, EndpointSlice, Protocol, Resource, Service, ServiceType,
    TrafficPolicy,
};
use meshlite_runtime::admin::Readiness;
use prometheus_client::registry::Registry;

use meshlite_runtime::{Handler, UpdateInfo};

use super::*;
use crate::backend::{RecordingBackend, RejectReason, Rejected};
use crate::proxy::ServicePortName;

fn cfg() -> SyncConfig {
    SyncConfig {
        node_name: "node1".into(),
        families: vec![IpFamily::V4],
        sync_period: Duration::from_secs(30),
        min_sync_period: Duration::from_secs(1),
        canary_period: Duration::from_secs(5),
        needs_pod_cidrs: false,
    }
}

fn snapshot(endpoints: &[&str]) -> Snapshot {
    let mut svc = Service::cluster_ip("ns", "web", "198.19.0.1".parse().unwrap()).with_port(
        "http",
        Protocol::Tcp,
        80,
    );
    svc.kind = ServiceType::LoadBalancer;
    svc.ports[0].node_port = Some(30080);
    svc.external_traffic_policy = TrafficPolicy::Local;
    svc.health_check_node_port = Some(30999);
    svc.load_balancer_ips = vec!["198.19.60.1".parse().unwrap()];
    Snapshot::from_resources([
        Resource::Service(svc),
        Resource::EndpointSlice(EndpointSlice {
            namespace: "ns".into(),
            name: "web-1".into(),
            service_name: "web".into(),
            address_family: AddressFamily::Ipv4,
            ports: vec![EndpointPort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 8080,
                app_protocol: None,
            }],
            endpoints: endpoints
                .iter()
                .map(|ip| Endpoint::ready(ip.parse().unwrap()).on_node("node1"))
                .collect(),
            ignored_by_proxy: false,
        }),
    ])
}

fn proxier(backend: RecordingBackend) -> Arc<Proxier<RecordingBackend>> {
    let metrics = Arc::new(ProxyMetrics::register(&mut Registry::default()));
    Proxier::new(
        cfg(),
        backend,
        ProxyHealth::new(Duration::from_secs(60)),
        metrics,
        None,
    )
}

fn info() -> UpdateInfo {
    UpdateInfo {
        epoch: 1,
        version: 1,
        full: true,
        sent: SystemTime::now(),
        received: SystemTime::now(),
        causes: vec![],
    }
}

#[tokio::test(start_paused = true)]
async fn first_sync_is_full_then_partial_then_periodic_full() {
    let be = RecordingBackend::new();
    let p = proxier(be.clone());
    p.update(&snapshot(&["198.18.1.1"]), &ChangeSet::default())
        .await
        .unwrap();
    p.update(&snapshot(&["198.18.1.2"]), &ChangeSet::default())
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(31)).await;
    p.update(&snapshot(&["198.18.1.3"]), &ChangeSet::default())
        .await
        .unwrap();
    let fulls: Vec<bool> = be.calls().iter().map(|c| c.full).collect();
    assert_eq!(fulls, [true, false, true]);
    let calls = be.calls();
    let eps = &calls[1].views[0].ports.values().next().unwrap().endpoints;
    assert_eq!(eps[0].to_string(), "198.18.1.2:8080");
}

#[tokio::test(start_paused = true)]
async fn min_sync_period_spaces_syncs() {
    let be = RecordingBackend::new();
    let p = proxier(be.clone());
    let start = Instant::now();
    p.update(&snapshot(&["198.18.1.1"]), &ChangeSet::default())
        .await
        .unwrap();
    p.update(&snapshot(&["198.18.1.2"]), &ChangeSet::default())
        .await
        .unwrap();
    assert!(start.elapsed() >= Duration::from_secs(1));
    assert_eq!(be.calls().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn nothing_touches_the_kernel_before_the_first_snapshot() {
    let be = RecordingBackend::new();
    let p = proxier(be.clone());
    tokio::time::advance(Duration::from_secs(120)).await;
    assert!(!p.tick().await);
    assert!(be.calls().is_empty());
}

#[tokio::test(start_paused = true)]
async fn failed_sync_keeps_last_good_views_and_retries_full() {
    let be = RecordingBackend::new();
    let p = proxier(be.clone());
    p.update(&snapshot(&["198.18.1.1"]), &ChangeSet::default())
        .await
        .unwrap();
    be.fail_next(1);
    let err = p
        .update(&snapshot(&["198.18.1.2"]), &ChangeSet::default())
        .await
        .unwrap_err();
    assert_eq!(err.stage, "restore");
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(
        p.tick().await,
        "a failed sync is retried by the background task"
    );
    let last = be.calls().last().cloned().unwrap();
    assert!(last.full);
    let ep = &last.views[0].ports.values().next().unwrap().endpoints[0];
    assert_eq!(
        ep.to_string(),
        "198.18.1.1:8080",
        "the last good state is re-applied"
    );
}

#[tokio::test(start_paused = true)]
async fn canary_failure_triggers_a_full_resync() {
    let be = RecordingBackend::new();
    let p = proxier(be.clone());
    p.update(&snapshot(&["198.18.1.1"]), &ChangeSet::default())
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(6)).await;
    assert!(!p.tick().await, "healthy canary: nothing to do");
    be.set_healthy(false);
    tokio::time::advance(Duration::from_secs(6)).await;
    assert!(p.tick().await);
    assert_eq!(be.calls().len(), 2);
    assert!(be.calls()[1].full);
}

#[tokio::test(start_paused = true)]
async fn handler_acks_after_apply_and_turns_ready() {
    let be = RecordingBackend::new();
    let p = proxier(be.clone());
    let readiness = Readiness::new();
    let mut h = NodeHandler::new(p.clone(), Some(readiness.block("rules-applied")));
    assert!(!readiness.is_ready());
    let applied = h
        .apply(&snapshot(&["198.18.1.1"]), &ChangeSet::default(), &info())
        .await
        .unwrap();
    assert_eq!(applied.rules_changed, 1);
    assert!(readiness.is_ready());
    assert_eq!(be.calls().len(), 1);

    be.fail_next(1);
    tokio::time::advance(Duration::from_secs(2)).await;
    let err = h
        .apply(&snapshot(&["198.18.1.2"]), &ChangeSet::default(), &info())
        .await
        .unwrap_err();
    assert!(err.0.contains("injected failure"));
}

#[test]
fn health_check_ports_count_local_endpoints() {
    let snap = snapshot(&["198.18.1.1", "198.18.1.2"]);
    let views = vec![ProxyView::build(&snap, "node1", IpFamily::V4)];
    let ports = health_check_ports(&views);
    assert_eq!(ports[&30999], (ServiceName::new("ns", "web"), 2));
    let views = vec![ProxyView::build(&snap, "node9", IpFamily::V4)];
    assert_eq!(health_check_ports(&views)[&30999].1, 0);
    assert_eq!(no_local_endpoints(&views), (0, 1));
}

#[tokio::test(start_paused = true)]
async fn handler_reports_rejected_services_by_key_once_each() {
    let be = RecordingBackend::new();
    let rejected = |family, port: &str| Rejected {
        family,
        service: ServicePortName::new("ns", "web", port, Protocol::Tcp),
        reason: RejectReason::Kernel,
        message: "CHAIN_DEL failed (Device or resource busy)".into(),
    };
    be.reject(vec![
        rejected(IpFamily::V4, "http"),
        rejected(IpFamily::V4, "https"),
        rejected(IpFamily::V6, "http"),
    ]);
    let p = proxier(be.clone());
    let mut h = NodeHandler::new(p, None);
    let applied = h
        .apply(&snapshot(&["198.18.1.1"]), &ChangeSet::default(), &info())
        .await
        .unwrap();
    assert_eq!(applied.rejected.len(), 1, "{:?}", applied.rejected);
    let r = &applied.rejected[0];
    assert!(
        r.starts_with("service/ns/web: ipv4 ns/web:http: CHAIN_DEL"),
        "{r}"
    );
    assert!(
        r.contains("ipv4 ns/web:https") && r.contains("ipv6 ns/web:http"),
        "{r}"
    );
}

#[tokio::test(start_paused = true)]
async fn node_cidr_mode_programs_nothing_before_the_node_has_pod_cidrs() {
    let be = RecordingBackend::new();
    let mut c = cfg();
    c.needs_pod_cidrs = true;
    let p = Proxier::new(
        c,
        be.clone(),
        ProxyHealth::new(Duration::from_secs(60)),
        Arc::new(ProxyMetrics::register(&mut Registry::default())),
        None,
    );
    let readiness = Readiness::new();
    let mut h = NodeHandler::new(p.clone(), Some(readiness.block("rules-applied")));
    let without = snapshot(&["198.18.1.1"]);
    let err = h
        .apply(&without, &ChangeSet::default(), &info())
        .await
        .unwrap_err();
    assert!(
        err.0
            .contains("waiting for Node node1 to have spec.podCIDRs"),
        "{}",
        err.0
    );
    assert!(be.calls().is_empty(), "nothing programmed");
    assert!(!readiness.is_ready());
    // Background work does not touch the kernel either.
    assert!(!p.tick().await);

    let node = |cidrs: Vec<&str>| {
        Resource::Node(meshlite_proto::model::Node {
            name: "node1".into(),
            zone: None,
            addresses: vec!["198.18.0.1".parse().unwrap()],
            pod_cidrs: cidrs.into_iter().map(|c| c.parse().unwrap()).collect(),
        })
    };
    let with = |cidrs: Vec<&str>| {
        let mut s = snapshot(&["198.18.1.1"]);
        s.upsert(1, node(cidrs));
        s
    };
    h.apply(&with(vec!["198.18.1.0/24"]), &ChangeSet::default(), &info())
        .await
        .unwrap();
    assert!(readiness.is_ready());
    assert_eq!(
        be.calls()[0].views[0].node_pod_cidrs,
        ["198.18.1.0/24".parse::<ipnet::IpNet>().unwrap()]
    );
    // The Node loses them later: the last ones seen are kept.
    tokio::time::advance(Duration::from_secs(2)).await;
    h.apply(&with(vec![]), &ChangeSet::default(), &info())
        .await
        .unwrap();
    assert_eq!(
        be.calls()[1].views[0].node_pod_cidrs,
        ["198.18.1.0/24".parse::<ipnet::IpNet>().unwrap()]
    );
}
