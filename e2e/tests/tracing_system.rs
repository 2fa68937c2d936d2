//! End-to-end tracing: one EndpointSlice change in the API produces an `ingest`
//! span on the control plane and an `apply` span on each of two node agents and one
//! DNS agent, each linked (not parented) to the ingest span, with the backend's
//! work (render, iptables-restore, zone swap) as child spans. A real OTLP/gRPC
//! receiver collects what the three real processes export.
//!
//! Needs root, iptables and conntrack (the node agents run in namespaces).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use meshlite_e2e::apiserver::ApiServer;
use meshlite_e2e::cluster::Cluster;
use meshlite_e2e::otlp::{OtlpReceiver, ReceivedSpan};
use meshlite_e2e::stack::{Source, Stack, StackConfig};

const T: Duration = Duration::from_secs(30);

fn slice(ips: &[&str]) -> String {
    let mut s = String::from(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-abc\n  namespace: default\n  labels: {kubernetes.io/service-name: web}\n  annotations: {endpoints.kubernetes.io/last-change-trigger-time: \"TRIGGER\"}\naddressType: IPv4\nports: [{name: http, port: 80}]\nendpoints:\n",
    );
    for ip in ips {
        s.push_str(&format!("- addresses: [\"{ip}\"]\n  nodeName: node1\n"));
    }
    s
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < T, "{what}: not within {T:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_change_is_traced_from_the_api_to_every_agent() {
    meshlite_runtime::tls::install_default_provider();
    meshlite_e2e::netns::set_prefix("mltrace");
    let mut cluster = Cluster::new(&["node1", "node2"]).unwrap_or_else(|e| panic!("{e:#}"));
    cluster
        .add_pod("web-1", "node1", "198.18.1.1".parse().unwrap(), true)
        .await
        .unwrap();
    cluster
        .add_pod("dns", "node2", "198.18.2.53".parse().unwrap(), false)
        .await
        .unwrap();
    let node1 = cluster.node("node1").unwrap();
    let (rx, otlp) = node1
        .rt
        .run(async { OtlpReceiver::start_on("198.18.0.1:0".parse().unwrap()).await })
        .await
        .unwrap();
    let api = node1
        .rt
        .run(async { ApiServer::start().await })
        .await
        .unwrap();
    api.apply_yaml(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/seed/nodes.yaml"
        ))
        .unwrap(),
    )
    .unwrap();
    api.apply_yaml("apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec: {clusterIP: 198.19.5.5, ports: [{name: http, port: 80}]}\n").unwrap();
    api.apply_yaml(&slice(&["198.18.1.1"]).replace("TRIGGER", "2026-01-01T00:00:00Z"))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let env = vec![
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT".to_string(),
            format!("http://{otlp}"),
        ),
        ("OTEL_BSP_SCHEDULE_DELAY".to_string(), "100".to_string()),
    ];
    let cfg = StackConfig {
        source: Source::Kube(kubeconfig),
        control_plane_node: "node1".into(),
        dns_pods: vec!["dns".into()],
        pod_records: false,
        env,
        fast: true,
        control_plane_replicas: 1,
        modes: Default::default(),
    };
    let stack = Stack::start(&cluster, &cfg, dir.path(), T)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));

    // The change: one EndpointSlice, with the trigger time the EndpointSlice
    // controller would write.
    let trigger = jiff::Timestamp::now();
    api.apply_yaml(&slice(&["198.18.1.1", "198.18.1.2"]).replace("TRIGGER", &trigger.to_string()))
        .unwrap();

    let key = "endpointslice/default/web-abc";
    wait_for("the ingest span", || {
        rx.named("ingest", Some("meshlite-control-plane"))
            .iter()
            .any(|s| {
                s.attributes.get("key").map(String::as_str) == Some(key)
                    && s.attributes.get("op").map(String::as_str) == Some("apply")
            })
    })
    .await;
    let ingest: ReceivedSpan = rx
        .named("ingest", Some("meshlite-control-plane"))
        .into_iter()
        .find(|s| {
            s.attributes.get("key").map(String::as_str) == Some(key)
                && s.attributes["op"] == "apply"
        })
        .unwrap();
    let trigger_ns: i128 = ingest.attributes["trigger_unix_nanos"].parse().unwrap();
    assert_eq!(
        trigger_ns / 1_000_000_000,
        i128::from(trigger.as_second()),
        "trigger time from the annotation"
    );
    assert_eq!(ingest.attributes["trigger_source"], "api");
    let link = (ingest.trace_id.clone(), ingest.span_id.clone());

    let linked = |service: &str| -> Vec<ReceivedSpan> {
        rx.named("apply", Some(service))
            .into_iter()
            .filter(|s| s.links.contains(&link))
            .collect()
    };
    wait_for("apply spans on both node agents and the DNS agent", || {
        let nodes: Vec<String> = linked("meshlite-node-agent")
            .iter()
            .filter_map(|s| s.attributes.get("node").cloned())
            .collect();
        nodes.contains(&"node1".to_string())
            && nodes.contains(&"node2".to_string())
            && !linked("meshlite-dns-agent").is_empty()
    })
    .await;
    for s in linked("meshlite-node-agent")
        .iter()
        .chain(linked("meshlite-dns-agent").iter())
    {
        assert!(s.attributes["version"].parse::<u64>().unwrap() > 0, "{s:?}");
        assert!(s.end_unix_nanos > s.start_unix_nanos, "no duration: {s:?}");
        assert_ne!(
            s.trace_id, ingest.trace_id,
            "linked, not parented: each agent's apply is its own trace"
        );
        assert!(
            s.parent_span_id.is_empty() || s.parent_span_id.chars().all(|c| c == '0'),
            "apply spans are roots: {s:?}"
        );
    }
    // The backend's work is inside the apply span.
    wait_for("child spans", || {
        let spans = rx.spans();
        let applies: Vec<&ReceivedSpan> = spans
            .iter()
            .filter(|s| s.name == "apply" && s.links.contains(&link))
            .collect();
        let child_of = |name: &str| {
            spans
                .iter()
                .any(|c| c.name == name && applies.iter().any(|a| a.span_id == c.parent_span_id))
        };
        child_of("render") && child_of("iptables-restore") && child_of("zone-swap")
    })
    .await;

    // The latency metrics, with kube-proxy's names and buckets, on every node agent;
    // the per-version convergence on the control plane.
    for r in stack.node_agents.values() {
        let (_, m) = meshlite_e2e::stack::admin_get(&cluster, r, "/metrics")
            .await
            .unwrap();
        for needle in [
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"0.25\"}",
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"300.0\"}",
            "stage=\"transit\"",
            "stage=\"watch\"",
            "stage=\"apply\"",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
        ] {
            assert!(
                m.lines().any(|l| l.starts_with(needle)
                    || (l.starts_with("meshlite_subscriber_stage_duration_seconds_bucket")
                        && l.contains(needle))),
                "{} lacks {needle}",
                r.process.name
            );
        }
        let count =
            meshlite_e2e::stack::metric(&m, "kubeproxy_network_programming_duration_seconds_count")
                .unwrap();
        assert!(
            count >= 1.0,
            "no network programming observation on {}",
            r.process.name
        );
    }
    let (_, m) = meshlite_e2e::stack::admin_get(&cluster, &stack.control_plane, "/metrics")
        .await
        .unwrap();
    assert!(
        meshlite_e2e::stack::metric(
            &m,
            "meshlite_control_plane_version_convergence_seconds_count"
        )
        .unwrap()
            >= 1.0,
        "{m}"
    );
    assert_eq!(
        meshlite_e2e::stack::metric(&m, "meshlite_control_plane_agents_behind"),
        Some(0.0)
    );
}
