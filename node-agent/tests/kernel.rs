//! Real packets through real rules. Each test builds its own namespaces (see
//! `support/netns.rs`), runs the node agent's sync loop with the iptables backend
//! inside the "node" namespace, and sends HTTP requests from the "client" namespace
//! (off-cluster) or from pods. Needs root, `ip`, `iptables` and `conntrack`; fails
//! with a message naming what is missing otherwise.

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/fixtures.rs"]
mod fixtures;
#[path = "support/netns.rs"]
mod netns;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fixtures::*;
use meshlite_node_agent::backend::{RejectReason, SyncReport};
use meshlite_node_agent::health::{HealthCheckServers, ProxyHealth};
use meshlite_node_agent::iptables::ChainNames;
use meshlite_node_agent::iptables::{IptablesBackend, IptablesConfig};
use meshlite_node_agent::local::DetectLocalMode;
use meshlite_node_agent::metrics::ProxyMetrics;
use meshlite_node_agent::proxy::{IpFamily, ServicePortName};
use meshlite_node_agent::sync::{Proxier, SyncConfig};
use meshlite_proto::model::{Protocol, Resource, ServiceType, TrafficPolicy};
use meshlite_runtime::{ChangeSet, Snapshot};
use netns::{CLIENT_IP, CLUSTER_CIDR, Lab, NODE_IP, Outcome, get};
use prometheus_client::registry::Registry;
use tokio::sync::oneshot;

/// The node agent's sync loop running inside the lab's node namespace.
struct Agent {
    proxier: Arc<Proxier<IptablesBackend>>,
    stop: Option<oneshot::Sender<()>>,
    registry: Registry,
}

impl Agent {
    fn start(lab: &Lab) -> Self {
        Self::start_with(lab, |_| {})
    }

    /// Starts the agent with `tweak` applied to the iptables configuration.
    fn start_with(lab: &Lab, tweak: impl FnOnce(&mut IptablesConfig)) -> Self {
        let mut cfg = IptablesConfig {
            prefix: "KUBE".into(),
            families: vec![IpFamily::V4],
            cluster_cidrs: vec![CLUSTER_CIDR.parse().unwrap()],
            detect_local: Default::default(),
            masquerade_all: false,
            masquerade_bit: 14,
            node_ips: vec![NODE_IP.parse().unwrap()],
            localhost_nodeports: true,
            random_fully: true,
            conntrack_cleanup: true,
            nodeport_addresses: vec![],
        };
        tweak(&mut cfg);
        let mut registry = Registry::default();
        let health = ProxyHealth::new(Duration::from_secs(60));
        let proxier = Proxier::new(
            SyncConfig {
                node_name: NODE.into(),
                families: vec![IpFamily::V4],
                sync_period: Duration::from_secs(30),
                min_sync_period: Duration::from_millis(50),
                canary_period: Duration::from_millis(300),
                needs_pod_cidrs: false,
            },
            IptablesBackend::new(cfg),
            health.clone(),
            Arc::new(ProxyMetrics::register(&mut registry)),
            Some(HealthCheckServers::new("0.0.0.0".parse().unwrap(), health)),
        );
        let (stop, stopped) = oneshot::channel::<()>();
        lab.node_rt
            .spawn(proxier.clone().run(Duration::from_millis(100), async {
                let _ = stopped.await;
            }));
        Self {
            proxier,
            stop: Some(stop),
            registry,
        }
    }

    async fn apply(&self, lab: &Lab, resources: Vec<Resource>) -> SyncReport {
        let p = self.proxier.clone();
        lab.node_rt
            .run(async move {
                p.update(&Snapshot::from_resources(resources), &ChangeSet::default())
                    .await
            })
            .await
            .expect("sync")
    }

    fn metrics(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).unwrap();
        out
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

#[tokio::test]
async fn cluster_ip_reaches_all_endpoints_evenly() {
    let lab = Lab::new(3).await.unwrap();
    let agent = Agent::start(&lab);
    agent
        .apply(
            &lab,
            vec![
                Resource::Service(service("web", "198.19.0.10")),
                slice(
                    "web",
                    vec![
                        ep(&lab, 0, NODE),
                        ep(&lab, 1, "node2"),
                        ep(&lab, 2, "node2"),
                    ],
                ),
                node_object(),
            ],
        )
        .await;
    let (seen, failed) = spread(&lab, addr("198.19.0.10", 80), 300).await;
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert_eq!(seen.len(), 3, "every endpoint serves: {seen:?}");
    for (pod, n) in &seen {
        // 1/3 of 300 is 100; the binomial standard deviation is ~8.2.
        assert!((55..=145).contains(n), "{pod} got {n} of 300: {seen:?}");
    }
}

#[tokio::test]
async fn session_affinity_sticks() {
    let lab = Lab::new(3).await.unwrap();
    let agent = Agent::start(&lab);
    let mut svc = service("sticky", "198.19.0.11");
    svc.session_affinity_timeout = Some(600);
    agent
        .apply(
            &lab,
            vec![
                Resource::Service(svc),
                slice(
                    "sticky",
                    vec![ep(&lab, 0, NODE), ep(&lab, 1, NODE), ep(&lab, 2, NODE)],
                ),
            ],
        )
        .await;
    let (seen, failed) = spread(&lab, addr("198.19.0.11", 80), 40).await;
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(seen.len(), 1, "one client sticks to one endpoint: {seen:?}");
}

#[tokio::test]
async fn service_without_endpoints_is_rejected_not_dropped() {
    let lab = Lab::new(1).await.unwrap();
    let agent = Agent::start(&lab);
    agent
        .apply(
            &lab,
            vec![Resource::Service(service("empty", "198.19.0.12"))],
        )
        .await;
    let o = from_client(&lab, addr("198.19.0.12", 80), T).await;
    assert_eq!(o, Outcome::Refused, "connection refused, not a timeout");
}

#[tokio::test]
async fn node_port_from_another_namespace_and_masquerade() {
    let lab = Lab::new(2).await.unwrap();
    let agent = Agent::start(&lab);
    agent
        .apply(
            &lab,
            vec![
                Resource::Service(node_port("np", "198.19.0.13", 30080)),
                slice("np", vec![ep(&lab, 0, "node2")]),
                node_object(),
            ],
        )
        .await;
    // NodePort from the off-cluster client: masqueraded to the node's address.
    let o = from_client(&lab, addr(NODE_IP, 30080), T).await;
    assert_eq!(
        o.served(),
        Some(("pod1".into(), "198.18.1.1".into())),
        "{o:?}"
    );
    // NodePort on the node's own localhost (route_localnet, as kube-proxy).
    let o = lab.node_rt.run(get(addr("127.0.0.1", 30080), "/", T)).await;
    assert_eq!(o.served().map(|s| s.0), Some("pod1".into()), "{o:?}");
    // ClusterIP from off-cluster: masqueraded too.
    let o = from_client(&lab, addr("198.19.0.13", 80), T).await;
    assert_eq!(
        o.served(),
        Some(("pod1".into(), "198.18.1.1".into())),
        "{o:?}"
    );
    // ClusterIP from a pod: the pod's own address is kept.
    let o = from_pod(&lab, 1, addr("198.19.0.13", 80)).await;
    assert_eq!(
        o.served(),
        Some(("pod1".into(), "198.18.2.2".into())),
        "{o:?}"
    );
}

#[tokio::test]
async fn hairpin_to_self_through_the_service() {
    let lab = Lab::new(1).await.unwrap();
    let agent = Agent::start(&lab);
    agent
        .apply(
            &lab,
            vec![
                Resource::Service(service("self", "198.19.0.14")),
                slice("self", vec![ep(&lab, 0, NODE)]),
            ],
        )
        .await;
    let o = from_pod(&lab, 0, addr("198.19.0.14", 80)).await;
    // The pod reaches itself; its source is masqueraded to the node so the reply
    // goes back through the node's conntrack.
    assert_eq!(
        o.served(),
        Some(("pod1".into(), "198.18.1.1".into())),
        "{o:?}"
    );
}

#[tokio::test]
async fn external_traffic_policy_local_and_health_check_node_port() {
    let lab = Lab::new(2).await.unwrap();
    let agent = Agent::start(&lab);
    let mut svc = node_port("local", "198.19.0.15", 30081);
    svc.kind = ServiceType::LoadBalancer;
    svc.external_traffic_policy = TrafficPolicy::Local;
    svc.health_check_node_port = Some(30901);
    // Only a remote endpoint: external traffic is dropped, health check says 503.
    agent
        .apply(
            &lab,
            vec![
                Resource::Service(svc.clone()),
                slice("local", vec![ep(&lab, 1, "node2")]),
                node_object(),
            ],
        )
        .await;
    let o = from_client(&lab, addr(NODE_IP, 30081), Duration::from_millis(700)).await;
    assert_eq!(o, Outcome::Timeout, "dropped, not rejected: {o:?}");
    let hc = from_client(&lab, addr(NODE_IP, 30901), T).await;
    assert!(
        matches!(&hc, Outcome::Ok(503, body) if body.contains("\"localEndpoints\":0")),
        "{hc:?}"
    );
    // The ClusterIP still works from a pod (internal policy is Cluster).
    let o = from_pod(&lab, 0, addr("198.19.0.15", 80)).await;
    assert_eq!(o.served().map(|s| s.0), Some("pod2".into()), "{o:?}");

    // A local endpoint: served, client source preserved (no masquerade), 200.
    agent
        .apply(
            &lab,
            vec![
                Resource::Service(svc),
                slice("local", vec![ep(&lab, 0, NODE), ep(&lab, 1, "node2")]),
                node_object(),
            ],
        )
        .await;
    for _ in 0..10 {
        let o = from_client(&lab, addr(NODE_IP, 30081), T).await;
        assert_eq!(o.served(), Some(("pod1".into(), CLIENT_IP.into())), "{o:?}");
    }
    let hc = from_client(&lab, addr(NODE_IP, 30901), T).await;
    assert!(
        matches!(&hc, Outcome::Ok(200, body) if body.contains("\"localEndpoints\":1")),
        "{hc:?}"
    );
}

#[tokio::test]
async fn terminating_endpoints_are_a_fallback() {
    let lab = Lab::new(2).await.unwrap();
    let agent = Agent::start(&lab);
    let terminating = |i: usize, serving: bool| {
        let mut e = ep(&lab, i, NODE);
        e.ready = false;
        e.serving = serving;
        e.terminating = true;
        e
    };
    agent
        .apply(
            &lab,
            vec![
                Resource::Service(service("term", "198.19.0.16")),
                slice("term", vec![terminating(0, true), terminating(1, false)]),
            ],
        )
        .await;
    let (seen, failed) = spread(&lab, addr("198.19.0.16", 80), 20).await;
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        ["pod1"],
        "serving=false is never used"
    );

    agent
        .apply(
            &lab,
            vec![
                Resource::Service(service("term", "198.19.0.16")),
                slice("term", vec![terminating(1, false)]),
            ],
        )
        .await;
    assert_eq!(
        from_client(&lab, addr("198.19.0.16", 80), T).await,
        Outcome::Refused
    );
}

#[tokio::test]
async fn removed_endpoint_gets_no_more_traffic() {
    let lab = Lab::new(3).await.unwrap();
    let agent = Agent::start(&lab);
    let svc = Resource::Service(service("shrink", "198.19.0.17"));
    agent
        .apply(
            &lab,
            vec![
                svc.clone(),
                slice(
                    "shrink",
                    vec![ep(&lab, 0, NODE), ep(&lab, 1, NODE), ep(&lab, 2, NODE)],
                ),
            ],
        )
        .await;
    let (seen, _) = spread(&lab, addr("198.19.0.17", 80), 60).await;
    assert!(seen.contains_key("pod3"), "{seen:?}");
    agent
        .apply(
            &lab,
            vec![
                svc,
                slice("shrink", vec![ep(&lab, 0, NODE), ep(&lab, 1, NODE)]),
            ],
        )
        .await;
    let (seen, failed) = spread(&lab, addr("198.19.0.17", 80), 100).await;
    assert!(failed.is_empty(), "{failed:?}");
    assert!(
        !seen.contains_key("pod3"),
        "removed endpoint still served: {seen:?}"
    );
    assert_eq!(seen.len(), 2, "{seen:?}");
    // The removed endpoint's chain is gone from the kernel.
    let nat = lab.node_iptables(&["-t", "nat", "-S"]).unwrap();
    assert!(!nat.contains("198.18.3.2"), "{nat}");
}

#[tokio::test]
async fn external_flush_is_repaired() {
    let lab = Lab::new(1).await.unwrap();
    let agent = Agent::start(&lab);
    agent
        .apply(
            &lab,
            vec![
                Resource::Service(service("fl", "198.19.0.18")),
                slice("fl", vec![ep(&lab, 0, NODE)]),
            ],
        )
        .await;
    assert!(
        from_client(&lab, addr("198.19.0.18", 80), T)
            .await
            .served()
            .is_some()
    );
    lab.node_iptables(&["-t", "nat", "-F", "KUBE-SERVICES"])
        .unwrap();
    // Flushed: the ClusterIP is not translated any more.
    let o = from_client(&lab, addr("198.19.0.18", 80), Duration::from_millis(500)).await;
    assert!(o.served().is_none(), "{o:?}");
    // The canary notices and a full resync restores the rules (bounded wait).
    let mut repaired = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if from_client(&lab, addr("198.19.0.18", 80), Duration::from_millis(500))
            .await
            .served()
            .is_some()
        {
            repaired = true;
            break;
        }
    }
    assert!(repaired, "rules were not restored within 5 s");
}

#[tokio::test]
async fn restart_under_a_request_loop_loses_no_requests() {
    let lab = Lab::new(2).await.unwrap();
    let resources = vec![
        Resource::Service(service("rs", "198.19.0.19")),
        slice("rs", vec![ep(&lab, 0, NODE), ep(&lab, 1, NODE)]),
        node_object(),
    ];
    let agent = Agent::start(&lab);
    agent.apply(&lab, resources.clone()).await;

    // A bounded request loop: 400 requests, 5 ms apart (about 3 s).
    let to = addr("198.19.0.19", 80);
    let load = lab.client_rt.spawn(async move {
        let mut failed = Vec::new();
        for _ in 0..400 {
            let o = get(to, "/", T).await;
            if o.served().is_none() {
                failed.push(o);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        failed
    });
    // Restart: the old agent goes away (its rules stay), a new one with no memory
    // starts, finds the old rules, and re-applies the same snapshot with a full sync.
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(agent);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let agent = Agent::start(&lab);
    agent.apply(&lab, resources).await;
    let failed = load.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} requests failed: {failed:?}",
        failed.len()
    );
}

/// `meshlite-node-agent cleanup` (kube-proxy's `--cleanup`): every chain and jump
/// the agent programmed is gone and traffic is no longer translated; other
/// people's chains and kubelet's stay; a second run finds nothing.
#[tokio::test]
async fn cleanup_removes_our_rules_and_keeps_the_rest() {
    let lab = Lab::new(1).await.unwrap();
    let agent = Agent::start(&lab);
    agent
        .apply(
            &lab,
            vec![
                node_object(),
                Resource::Service(node_port("cl", "198.19.0.30", 30030)),
                slice("cl", vec![ep(&lab, 0, NODE)]),
            ],
        )
        .await;
    assert!(
        from_client(&lab, addr("198.19.0.30", 80), T)
            .await
            .served()
            .is_some()
    );
    drop(agent);
    // Let the sync loop stop (its canary would repair what cleanup removes).
    tokio::time::sleep(Duration::from_millis(500)).await;
    lab.node_iptables(&["-t", "filter", "-N", "OTHER-INPUT"])
        .unwrap();
    lab.node_iptables(&[
        "-t",
        "filter",
        "-A",
        "INPUT",
        "-p",
        "tcp",
        "--dport",
        "9",
        "-j",
        "OTHER-INPUT",
    ])
    .unwrap();
    lab.node_iptables(&["-t", "nat", "-N", "KUBE-KUBELET-CANARY"])
        .unwrap();

    let bin = env!("CARGO_BIN_EXE_meshlite-node-agent");
    let out = lab.node.exec(&[bin, "cleanup"]).unwrap();
    assert!(out.contains("ipv4 iptables: deleted"), "{out}");
    assert!(out.contains("ipvs: "), "{out}");
    // Past a canary period: nothing put the rules back.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let save = lab.node.exec(&["iptables-save"]).unwrap();
    for gone in [
        "KUBE-SERVICES",
        "KUBE-SVC-",
        "KUBE-SEP-",
        "KUBE-EXT-",
        "KUBE-NODEPORTS",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
        "KUBE-FORWARD",
        "KUBE-PROXY-FIREWALL",
        "KUBE-PROXY-CANARY",
    ] {
        assert!(!save.contains(gone), "{gone} is left:\n{save}");
    }
    for kept in [
        ":OTHER-INPUT",
        "-A INPUT -p tcp -m tcp --dport 9 -j OTHER-INPUT",
        ":KUBE-KUBELET-CANARY",
        // kubelet's under the default prefix.
        ":KUBE-FIREWALL",
    ] {
        assert!(save.contains(kept), "{kept} is gone:\n{save}");
    }
    let o = from_client(&lab, addr("198.19.0.30", 80), Duration::from_millis(500)).await;
    assert!(o.served().is_none(), "still translated: {o:?}");

    let out = lab.node.exec(&[bin, "cleanup"]).unwrap();
    assert!(out.contains("ipv4 iptables: nothing to delete"), "{out}");
}

/// Requests from `from` until every pod in `want` served one (at most 200).
async fn served_by(lab: &Lab, from: Option<usize>, to: SocketAddr) -> BTreeMap<String, String> {
    let mut seen = BTreeMap::new();
    for _ in 0..60 {
        let o = match from {
            Some(i) => from_pod(lab, i, to).await,
            None => lab.node_rt.run(get(to, "/", T)).await,
        };
        let (pod, peer) = o.served().unwrap_or_else(|| panic!("{to}: {o:?}"));
        seen.insert(pod, peer);
    }
    seen
}

#[tokio::test]
async fn both_traffic_policies_local_from_a_pod_the_node_and_outside() {
    let lab = Lab::new(3).await.unwrap();
    let agent = Agent::start(&lab);
    let mut svc = node_port("both", "198.19.0.30", 30090);
    svc.internal_traffic_policy = TrafficPolicy::Local;
    svc.external_traffic_policy = TrafficPolicy::Local;
    // pod1 is this node's endpoint, pod2 another node's; pod3 is a client pod.
    let report = agent
        .apply(
            &lab,
            vec![
                Resource::Service(svc),
                slice("both", vec![ep(&lab, 0, NODE), ep(&lab, 1, "node2")]),
                node_object(),
            ],
        )
        .await;
    assert!(report.rejected.is_empty(), "{report:?}");
    // From outside: only the local endpoint, and the client's address is kept.
    for _ in 0..20 {
        let o = from_client(&lab, addr(NODE_IP, 30090), T).await;
        assert_eq!(o.served(), Some(("pod1".into(), CLIENT_IP.into())), "{o:?}");
    }
    // From a pod to the NodePort: no traffic policy applies (the EXT chain's pod
    // short circuit to the cluster chain), so both endpoints serve.
    let seen = served_by(&lab, Some(2), addr(NODE_IP, 30090)).await;
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        ["pod1", "pod2"],
        "{seen:?}"
    );
    // From the node itself: masqueraded and routed through the cluster chain.
    let seen = served_by(&lab, None, addr(NODE_IP, 30090)).await;
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        ["pod1", "pod2"],
        "{seen:?}"
    );
    // The cluster IP keeps internalTrafficPolicy Local: this node's endpoint only.
    let seen = served_by(&lab, Some(2), addr("198.19.0.30", 80)).await;
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["pod1"], "{seen:?}");
}

/// How the kernel is made to refuse one service's rules: an operator's rule
/// outside our chains (here `nat OUTPUT -j KUBE-SVC-…`) jumps to that service's
/// chain. When the service is deleted, its chain must go, and the kernel refuses
/// to delete a chain something still jumps to (`CHAIN_DEL failed (Device or
/// resource busy)`), which fails the whole `iptables-restore`. It is a real
/// refusal by the real kernel of one service's new rules; nothing is faked.
#[tokio::test]
async fn a_service_the_kernel_refuses_keeps_its_rules_while_others_update() {
    let lab = Lab::new(3).await.unwrap();
    let agent = Agent::start(&lab);
    let a = || Resource::Service(service("a", "198.19.0.31"));
    let b = || Resource::Service(service("b", "198.19.0.32"));
    let c = || Resource::Service(service("c", "198.19.0.33"));
    let report = agent
        .apply(
            &lab,
            vec![
                a(),
                slice("a", vec![ep(&lab, 0, NODE)]),
                b(),
                slice("b", vec![ep(&lab, 1, NODE)]),
            ],
        )
        .await;
    assert!(report.rejected.is_empty(), "{report:?}");
    let b_chain =
        ChainNames::new("KUBE").svc(&ServicePortName::new("default", "b", "http", Protocol::Tcp));
    lab.node_iptables(&[
        "-t",
        "nat",
        "-I",
        "OUTPUT",
        "-d",
        "198.19.9.9",
        "-j",
        &b_chain,
    ])
    .unwrap();

    // b is deleted (refused), a moves to pod3, c appears: a and c are programmed.
    let update = |a_pod: usize| {
        vec![
            a(),
            slice("a", vec![ep(&lab, a_pod, NODE)]),
            c(),
            slice("c", vec![ep(&lab, 0, NODE)]),
        ]
    };
    let report = agent.apply(&lab, update(2)).await;
    let rejected: Vec<(String, RejectReason)> = report
        .rejected
        .iter()
        .map(|r| (r.service.to_string(), r.reason))
        .collect();
    assert_eq!(
        rejected,
        [("default/b:http".to_string(), RejectReason::Kernel)],
        "{report:?}"
    );
    // iptables-nft says why (`Device or resource busy`); iptables-legacy names
    // the line that failed, the deletion of b's chain.
    let message = &report.rejected[0].message;
    assert!(
        message.contains("busy") || message.contains(&format!("-X {b_chain}")),
        "{report:?}"
    );
    let who = |o: Outcome| o.served().map(|s| s.0);
    assert_eq!(
        who(from_client(&lab, addr("198.19.0.31", 80), T).await),
        Some("pod3".into())
    );
    assert_eq!(
        who(from_client(&lab, addr("198.19.0.33", 80), T).await),
        Some("pod1".into())
    );
    // b keeps its last good rules.
    assert_eq!(
        who(from_client(&lab, addr("198.19.0.32", 80), T).await),
        Some("pod2".into())
    );

    // Later changes of other services still go through while b is refused.
    let report = agent.apply(&lab, update(0)).await;
    assert_eq!(report.rejected.len(), 1, "{report:?}");
    assert_eq!(
        who(from_client(&lab, addr("198.19.0.31", 80), T).await),
        Some("pod1".into())
    );
    let metrics = agent.metrics();
    assert!(
        metrics.contains("meshlite_node_agent_service_port_rejections_total{reason=\"kernel\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("meshlite_node_agent_rejected_service_ports 1"),
        "{metrics}"
    );

    // Once the operator's rule is gone, b's deletion goes through.
    lab.node_iptables(&[
        "-t",
        "nat",
        "-D",
        "OUTPUT",
        "-d",
        "198.19.9.9",
        "-j",
        &b_chain,
    ])
    .unwrap();
    let report = agent.apply(&lab, update(2)).await;
    assert!(report.rejected.is_empty(), "{report:?}");
    let nat = lab.node_iptables(&["-t", "nat", "-S"]).unwrap();
    assert!(!nat.contains(&b_chain), "{nat}");
    assert!(
        agent
            .metrics()
            .contains("meshlite_node_agent_rejected_service_ports 0")
    );
}

/// `--detect-local-mode InterfaceNamePrefix` and `NodeCIDR`: whether a pod's
/// request to a cluster IP is masqueraded shows which traffic counts as local.
#[tokio::test]
async fn detect_local_mode_by_interface_prefix_and_node_cidr() {
    let lab = Lab::new(3).await.unwrap();
    let resources = |pod_cidrs: Vec<ipnet::IpNet>| {
        let mut node = node_object();
        if let Resource::Node(n) = &mut node {
            n.pod_cidrs = pod_cidrs;
        }
        vec![
            Resource::Service(service("dl", "198.19.0.34")),
            slice("dl", vec![ep(&lab, 0, NODE)]),
            node,
        ]
    };
    let peer = |o: Outcome| o.served().map(|s| s.1).unwrap_or_else(|| panic!("{o:?}"));
    // The lab's node names pod links p1, p2, ...; the client's is c0. No
    // --cluster-cidr: only the interface tells pods apart.
    {
        let agent = Agent::start_with(&lab, |c| {
            c.cluster_cidrs.clear();
            c.detect_local = DetectLocalMode::InterfaceNamePrefix("p".into());
        });
        agent.apply(&lab, resources(vec![])).await;
        assert_eq!(
            peer(from_pod(&lab, 1, addr("198.19.0.34", 80)).await),
            "198.18.2.2"
        );
        assert_eq!(
            peer(from_client(&lab, addr("198.19.0.34", 80), T).await),
            "198.18.1.1"
        );
    }
    {
        // A prefix no pod link has: pods count as off-cluster and are masqueraded.
        let agent = Agent::start_with(&lab, |c| {
            c.cluster_cidrs.clear();
            c.detect_local = DetectLocalMode::InterfaceNamePrefix("eni".into());
        });
        agent.apply(&lab, resources(vec![])).await;
        assert_eq!(
            peer(from_pod(&lab, 1, addr("198.19.0.34", 80)).await),
            "198.18.1.1"
        );
    }
    {
        // NodeCIDR: this node's pods are 198.18.2.0/24 (pod2); pod3 is not local.
        let agent = Agent::start_with(&lab, |c| c.detect_local = DetectLocalMode::NodeCidr);
        agent
            .apply(&lab, resources(vec!["198.18.2.0/24".parse().unwrap()]))
            .await;
        assert_eq!(
            peer(from_pod(&lab, 1, addr("198.19.0.34", 80)).await),
            "198.18.2.2"
        );
        assert_eq!(
            peer(from_pod(&lab, 2, addr("198.19.0.34", 80)).await),
            "198.18.1.1"
        );
    }
}

/// Enough services that a full sync on iptables-nft is written in several
/// transactions: every service is reachable, and after a restart with fewer
/// services, the new agent deletes the chains of the ones that are gone.
#[tokio::test]
async fn a_full_sync_in_several_transactions_and_a_restart_that_deletes_stale_chains() {
    let lab = Lab::new(2).await.unwrap();
    let resources = |n: usize| {
        let mut r = vec![node_object()];
        for i in 0..n {
            let name = format!("many{i}");
            let ip = format!("198.19.{}.{}", 10 + i / 200, i % 200 + 1);
            r.push(Resource::Service(service(&name, &ip)));
            r.push(slice(&name, vec![ep(&lab, 0, NODE), ep(&lab, 1, NODE)]));
        }
        r
    };
    let count = |what: &str| {
        let rules = lab.node_iptables(&["-t", "nat", "-S"]).unwrap();
        rules.lines().filter(|l| l.starts_with(what)).count()
    };
    let agent = Agent::start(&lab);
    let report = agent.apply(&lab, resources(300)).await;
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    assert_eq!(count("-N KUBE-SVC-"), 300);
    assert_eq!(count("-N KUBE-SEP-"), 600);
    for ip in ["198.19.10.1", "198.19.10.150", "198.19.11.100"] {
        let o = lab.client_rt.run(get(addr(ip, 80), "/", T)).await;
        assert!(o.served().is_some(), "{ip}: {o:?}");
    }

    drop(agent);
    let agent = Agent::start(&lab);
    let report = agent.apply(&lab, resources(100)).await;
    assert!(report.full, "a restarted agent's first sync is full");
    assert_eq!(count("-N KUBE-SVC-"), 100, "stale service chains deleted");
    assert_eq!(count("-N KUBE-SEP-"), 200, "stale endpoint chains deleted");
    let o = lab
        .client_rt
        .run(get(addr("198.19.10.50", 80), "/", T))
        .await;
    assert!(o.served().is_some(), "{o:?}");
}
