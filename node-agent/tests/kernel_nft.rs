//! Real packets through the nftables mode's rules, on the iptables mode's lab
//! (`support/netns.rs`): the agent's sync loop with the nftables backend runs in
//! the "node" namespace; requests come from the off-cluster client or from pods.
//! Needs root, `ip`, `nft`, `iptables` and `conntrack`; fails naming what is
//! missing otherwise.

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/fixtures.rs"]
mod fixtures;
#[path = "support/netns.rs"]
mod netns;

use std::sync::Arc;
use std::time::Duration;

use fixtures::*;
use meshlite_node_agent::backend::SyncReport;
use meshlite_node_agent::health::{HealthCheckServers, ProxyHealth};
use meshlite_node_agent::metrics::ProxyMetrics;
use meshlite_node_agent::nftables::{DEFAULT_TABLE, NftablesBackend, NftablesConfig};
use meshlite_node_agent::proxy::IpFamily;
use meshlite_node_agent::sync::{Proxier, SyncConfig};
use meshlite_proto::model::Resource;
use meshlite_runtime::{ChangeSet, Snapshot};
use netns::{CLUSTER_CIDR, Lab, NODE_IP, Outcome, get};
use prometheus_client::registry::Registry;
use tokio::sync::oneshot;

struct Agent {
    proxier: Arc<Proxier<NftablesBackend>>,
    stop: Option<oneshot::Sender<()>>,
}

impl Agent {
    fn start(lab: &Lab) -> Self {
        if let Err(e) = netns::require_root_and_tools(&["nft"]) {
            panic!("{e:#}");
        }
        let cfg = NftablesConfig {
            table: DEFAULT_TABLE.into(),
            families: vec![IpFamily::V4],
            cluster_cidrs: vec![CLUSTER_CIDR.parse().unwrap()],
            detect_local: Default::default(),
            masquerade_all: false,
            masquerade_bit: 14,
            node_ips: vec![NODE_IP.parse().unwrap()],
            nodeport_addresses: vec![],
            conntrack_cleanup: true,
        };
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
            NftablesBackend::new(cfg),
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
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

#[tokio::test]
async fn nft_cluster_ip_reaches_all_endpoints_evenly() {
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
        assert!((55..=145).contains(n), "{pod} got {n} of 300: {seen:?}");
    }
}

#[tokio::test]
async fn nft_session_affinity_sticks() {
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
async fn nft_service_without_endpoints_is_rejected_not_dropped() {
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
async fn nft_node_port_and_masquerade() {
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
    let o = from_client(&lab, addr(NODE_IP, 30080), T).await;
    assert_eq!(
        o.served(),
        Some(("pod1".into(), "198.18.1.1".into())),
        "{o:?}"
    );
    let o = from_client(&lab, addr("198.19.0.13", 80), T).await;
    assert_eq!(
        o.served(),
        Some(("pod1".into(), "198.18.1.1".into())),
        "{o:?}"
    );
    let o = from_pod(&lab, 1, addr("198.19.0.13", 80)).await;
    assert_eq!(
        o.served(),
        Some(("pod1".into(), "198.18.2.2".into())),
        "{o:?}"
    );
}

#[tokio::test]
async fn nft_hairpin_to_self_through_the_service() {
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
    assert_eq!(
        o.served(),
        Some(("pod1".into(), "198.18.1.1".into())),
        "{o:?}"
    );
}

#[tokio::test]
async fn nft_removed_endpoint_gets_no_more_traffic() {
    let lab = Lab::new(2).await.unwrap();
    let agent = Agent::start(&lab);
    let both = vec![
        Resource::Service(service("rm", "198.19.0.17")),
        slice("rm", vec![ep(&lab, 0, NODE), ep(&lab, 1, NODE)]),
    ];
    agent.apply(&lab, both).await;
    let report = agent
        .apply(
            &lab,
            vec![
                Resource::Service(service("rm", "198.19.0.17")),
                slice("rm", vec![ep(&lab, 1, NODE)]),
            ],
        )
        .await;
    assert!(!report.full, "an endpoint change is a partial sync");
    let (seen, failed) = spread(&lab, addr("198.19.0.17", 80), 40).await;
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["pod2"], "{seen:?}");
}

#[tokio::test]
async fn nft_external_flush_is_repaired() {
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
    lab.node
        .exec(&["nft", "flush", "table", "ip", DEFAULT_TABLE])
        .unwrap();
    let o = from_client(&lab, addr("198.19.0.18", 80), Duration::from_millis(500)).await;
    assert!(o.served().is_none(), "{o:?}");
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
async fn nft_restart_under_a_request_loop_loses_no_requests() {
    let lab = Lab::new(2).await.unwrap();
    let resources = vec![
        Resource::Service(service("rs", "198.19.0.19")),
        slice("rs", vec![ep(&lab, 0, NODE), ep(&lab, 1, NODE)]),
        node_object(),
    ];
    let agent = Agent::start(&lab);
    agent.apply(&lab, resources.clone()).await;
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

/// `cleanup` after the nftables mode leaves no table; after the iptables mode it
/// leaves no chain (what a mode switch relies on).
#[tokio::test]
async fn nft_cleanup_leaves_nothing_of_either_mode() {
    let lab = Lab::new(1).await.unwrap();
    let agent = Agent::start(&lab);
    agent
        .apply(
            &lab,
            vec![
                Resource::Service(service("cl", "198.19.0.20")),
                slice("cl", vec![ep(&lab, 0, NODE)]),
            ],
        )
        .await;
    drop(agent);
    let report = lab
        .node_rt
        .run(meshlite_node_agent::cleanup::run("KUBE", "kube-ipvs0", &[]))
        .await;
    assert!(report.errors.is_empty(), "{report}");
    let tables = lab.node.exec(&["nft", "list", "tables"]).unwrap();
    assert!(!tables.contains(DEFAULT_TABLE), "{tables}");
    let nat = lab.node_iptables(&["-t", "nat", "-S"]).unwrap();
    assert!(!nat.contains("KUBE-"), "{nat}");
    let o = from_client(&lab, addr("198.19.0.20", 80), Duration::from_millis(500)).await;
    assert!(o.served().is_none(), "{o:?}");
}

/// The backend `--mode` starts, as `meshlite-node-agent` would (flags parsed and
/// validated), for this lab's node.
fn mode_backend(mode: &str) -> meshlite_node_agent::config::Config {
    use clap::Parser;
    let cli = meshlite_node_agent::config::Cli::try_parse_from([
        "meshlite-node-agent",
        "--node-name",
        NODE,
        "--control-plane",
        "http://127.0.0.1:1",
        "--insecure",
        "--mode",
        mode,
        "--ip-families",
        "ipv4",
        "--cluster-cidr",
        CLUSTER_CIDR,
        "--node-ip",
        NODE_IP,
    ])
    .unwrap();
    cli.run.validate().unwrap()
}

/// Switching modes without `cleanup`, as kube-proxy allows: the nftables mode
/// removes the iptables mode's chains once its own rules are in, and the
/// iptables mode removes the nftables table; the service answers throughout.
#[tokio::test]
async fn a_mode_switch_removes_the_other_modes_rules_after_the_first_sync() {
    use meshlite_node_agent::backend::{Backend, Desired};
    use meshlite_node_agent::backends::AnyBackend;
    use meshlite_node_agent::proxy::ProxyView;
    if let Err(e) = netns::require_root_and_tools(&["nft", "iptables"]) {
        panic!("{e:#}");
    }
    let lab = Lab::new(1).await.unwrap();
    let views = vec![ProxyView::build(
        &Snapshot::from_resources(vec![
            Resource::Service(service("sw", "198.19.0.21")),
            slice("sw", vec![ep(&lab, 0, NODE)]),
        ]),
        NODE,
        IpFamily::V4,
    )];
    for (mode, left_iptables, left_nft) in [
        ("iptables", true, false),
        ("nftables", false, true),
        ("iptables", true, false),
    ] {
        let cfg = mode_backend(mode);
        let v = views.clone();
        lab.node_rt
            .run(async move {
                let mut b = AnyBackend::start(&cfg).await.unwrap();
                b.apply(Desired {
                    views: &v,
                    full: true,
                })
                .await
                .unwrap();
            })
            .await;
        let nat = lab.node_iptables(&["-t", "nat", "-S"]).unwrap();
        assert_eq!(
            nat.contains("KUBE-SERVICES"),
            left_iptables,
            "after starting in {mode} mode, iptables nat:\n{nat}"
        );
        let tables = lab.node.exec(&["nft", "list", "tables"]).unwrap();
        assert_eq!(
            tables.contains(&format!("ip {DEFAULT_TABLE}")),
            left_nft,
            "after starting in {mode} mode, nft tables:\n{tables}"
        );
        let o = from_client(&lab, addr("198.19.0.21", 80), Duration::from_secs(2)).await;
        assert!(o.served().is_some(), "{mode} mode: {o:?}");
    }
}
