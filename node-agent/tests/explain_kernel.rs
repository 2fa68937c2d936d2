//! `explain` against real packets: many random services are programmed by the
//! agent's sync loop in the lab's node namespace, then for every service, source
//! and destination the explanation read from the live kernel
//! (`meshlite-node-agent explain --json` run inside the node namespace) must
//! match what requests do: the endpoints seen equal the predicted set, REJECT is
//! refused, DROP times out, masquerading shows as the source the pod saw (one
//! lone failed request per run is retried and reported, see
//! [`lone_failure_or_panic`]). Also:
//! a rule edited by hand shows in the trace (drift). The same for the iptables
//! mode and the nftables mode (`--mode nftables`, read with `nft list table`).
//! Also: every golden nftables script read back from the kernel explains alike.
//! Needs root, `ip`, `ss`, `iptables`, `nft` and `conntrack`.

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/netns.rs"]
mod netns;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use meshlite_node_agent::backend::Backend;
use meshlite_node_agent::explain::nftables::Table;
use meshlite_node_agent::explain::{Host, Packet, RuleSet};
use meshlite_node_agent::health::ProxyHealth;
use meshlite_node_agent::iptables::{IptablesBackend, IptablesConfig};
use meshlite_node_agent::metrics::ProxyMetrics;
use meshlite_node_agent::nftables::{DEFAULT_TABLE, NftablesBackend, NftablesConfig};
use meshlite_node_agent::proxy::IpFamily;
use meshlite_node_agent::sync::{Proxier, SyncConfig};
use meshlite_proto::model::{
    AddressFamily, Endpoint, EndpointPort, EndpointSlice, Node, Protocol, Resource, Service,
    ServiceType, TrafficPolicy,
};
use meshlite_runtime::{ChangeSet, Snapshot};
use netns::{CLIENT_IP, CLUSTER_CIDR, Lab, NODE_IP, Outcome, get};
use prometheus_client::registry::Registry;
use serde_json::Value;

const NODE: &str = "node1";
/// Pods that serve; the last pod of the lab is only a client.
const SERVING: usize = 4;
const SERVICES: usize = 60;
/// The generator's seed for the first set of services.
const SEED: u64 = 0x5eed_cafe_f00d_1234;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A small deterministic generator (xorshift), so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn random_services(lab: &Lab, rng: &mut Rng) -> Vec<Resource> {
    let mut out = vec![Resource::Node(Node {
        name: NODE.into(),
        zone: Some("zone-a".into()),
        addresses: vec![ip(NODE_IP)],
        pod_cidrs: vec![],
    })];
    for i in 0..SERVICES {
        let name = format!("s{i}");
        let mut s = Service::cluster_ip("default", &name, ip(&format!("198.19.1.{}", i + 1)))
            .with_port("http", Protocol::Tcp, 80);
        match rng.below(3) {
            0 => {}
            k => {
                s.kind = if k == 1 {
                    ServiceType::NodePort
                } else {
                    ServiceType::LoadBalancer
                };
                s.ports[0].node_port = Some(30100 + i as u16);
                if rng.below(2) == 0 {
                    s.external_traffic_policy = TrafficPolicy::Local;
                }
                if k == 2 {
                    s.load_balancer_ips = vec![ip(&format!("198.19.60.{}", i + 1))];
                    if rng.below(2) == 0 {
                        // Half of them allow the client, half do not.
                        let r = if rng.below(2) == 0 {
                            "198.18.200.0/24"
                        } else {
                            "198.18.250.0/24"
                        };
                        s.load_balancer_source_ranges = vec![r.parse().unwrap()];
                    }
                }
            }
        }
        if rng.below(4) == 0 {
            s.internal_traffic_policy = TrafficPolicy::Local;
        }
        let mut eps = Vec::new();
        for pod in lab.pods.iter().take(SERVING) {
            if rng.below(2) == 0 {
                let node = if rng.below(2) == 0 { NODE } else { "node2" };
                let e = Endpoint::ready(pod.ip).on_node(node);
                eps.push(e);
            }
        }
        out.push(Resource::Service(s));
        out.push(Resource::EndpointSlice(EndpointSlice {
            namespace: "default".into(),
            name: format!("{name}-abc"),
            service_name: name,
            address_family: AddressFamily::Ipv4,
            ports: vec![EndpointPort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
                app_protocol: None,
            }],
            endpoints: eps,
            ignored_by_proxy: false,
        }));
    }
    out
}

fn destinations(resources: &[Resource]) -> Vec<SocketAddr> {
    let mut v = Vec::new();
    for r in resources {
        if let Resource::Service(s) = r {
            v.push(SocketAddr::new(s.cluster_ips[0], 80));
            if let Some(np) = s.ports[0].node_port {
                v.push(SocketAddr::new(ip(NODE_IP), np));
            }
            for lb in &s.load_balancer_ips {
                v.push(SocketAddr::new(*lb, 80));
            }
        }
    }
    v
}

fn explain(lab: &Lab, mode: &str, from: &str, to: SocketAddr) -> Value {
    let bin = env!("CARGO_BIN_EXE_meshlite-node-agent");
    let out = lab
        .node
        .exec(&[
            bin,
            "explain",
            "--mode",
            mode,
            "--json",
            "--from",
            from,
            "--to",
            &to.to_string(),
        ])
        .unwrap();
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[tokio::test]
async fn explain_from_the_live_kernel_matches_real_packets() {
    let lab = Lab::new(SERVING + 1).await.unwrap();
    let cfg = IptablesConfig {
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
    matches_real_packets(&lab, IptablesBackend::new(cfg), "iptables", &[SEED]).await;

    // Drift: a rule edited by hand is what explain shows.
    lab.node
        .exec(&[
            "iptables",
            "-t",
            "nat",
            "-I",
            "KUBE-SERVICES",
            "1",
            "-d",
            "198.19.1.1/32",
            "-p",
            "tcp",
            "--dport",
            "80",
            "-m",
            "comment",
            "--comment",
            "hand-made",
            "-j",
            "DNAT",
            "--to-destination",
            "198.18.1.2:80",
        ])
        .unwrap();
    shows_the_hand_made_rule(&lab, "iptables").await;
}

#[tokio::test]
async fn explain_from_the_live_nftables_table_matches_real_packets() {
    if let Err(e) = netns::require_root_and_tools(&["nft"]) {
        panic!("{e:#}");
    }
    let lab = Lab::new(SERVING + 1).await.unwrap();
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
    // The second round goes to the kernel as an incremental sync.
    matches_real_packets(
        &lab,
        NftablesBackend::new(cfg),
        "nftables",
        &[SEED, 0x0dd_ba11_5eed_0002],
    )
    .await;

    // Drift: a rule added by hand is what explain shows (and what packets do).
    lab.node
        .exec(&[
            "nft",
            "insert",
            "rule",
            "ip",
            "kube-proxy",
            "services",
            "ip",
            "daddr",
            "198.19.1.1",
            "tcp",
            "dport",
            "80",
            "dnat",
            "to",
            "198.18.1.2:80",
            "comment",
            "\"hand-made\"",
        ])
        .unwrap();
    shows_the_hand_made_rule(&lab, "nftables").await;
    shows_an_edited_nft_rule(&lab).await;

    // Another table sees the packets too: named in a note, not traced.
    lab.node
        .exec(&["nft", "add", "table", "inet", "someone-else"])
        .unwrap();
    let x = explain(
        &lab,
        "nftables",
        CLIENT_IP,
        SocketAddr::new(ip("198.19.1.1"), 80),
    );
    assert_eq!(x["verdict"], "dnat", "{x:#}");
    assert!(
        x["notes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n.as_str().unwrap().contains("inet someone-else")),
        "{x:#}"
    );
}

/// After a hand-made DNAT of 198.19.1.1:80 to pod1: explain names the rule and
/// the one endpoint, and requests from the client all reach pod1.
async fn shows_the_hand_made_rule(lab: &Lab, mode: &str) {
    let to = SocketAddr::new(ip("198.19.1.1"), 80);
    let x = explain(lab, mode, CLIENT_IP, to);
    assert_eq!(x["verdict"], "dnat", "{x:#}");
    assert_eq!(x["endpoints"].as_array().unwrap().len(), 1, "{x:#}");
    assert_eq!(x["endpoints"][0]["address"], "198.18.1.2:80", "{x:#}");
    assert!(
        x["trace"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["rule"].as_str().unwrap().contains("hand-made")),
        "{x:#}"
    );
    let seen = lab
        .client_rt
        .run(async move {
            let mut seen = BTreeSet::new();
            for _ in 0..8 {
                seen.insert(get(to, "/", Duration::from_secs(2)).await.served());
            }
            seen
        })
        .await;
    let pods: BTreeSet<Option<String>> = seen.into_iter().map(|s| s.map(|(p, _)| p)).collect();
    assert_eq!(pods, BTreeSet::from([Some("pod1".to_string())]), "{x:#}");
}

/// Programs random services with `backend` through the agent's sync loop, then
/// checks every service, source and destination: explain's answer from the live
/// kernel against what real requests do. Each seed after the first is another
/// random set of services applied as a partial sync (what changed only: for the
/// nftables mode the incremental path), checked for the first half of its
/// services.
async fn matches_real_packets<B: Backend>(lab: &Lab, backend: B, mode: &str, seeds: &[u64]) {
    let mut registry = Registry::default();
    let proxier = Proxier::new(
        SyncConfig {
            node_name: NODE.into(),
            families: vec![IpFamily::V4],
            // Longer than the test: every sync after the first is partial.
            sync_period: Duration::from_secs(3600),
            min_sync_period: Duration::from_millis(50),
            canary_period: Duration::from_secs(30),
            needs_pod_cidrs: false,
        },
        backend,
        ProxyHealth::new(Duration::from_secs(60)),
        Arc::new(ProxyMetrics::register(&mut registry)),
        None,
    );
    let client_pod = &lab.pods[SERVING];
    for (round, seed) in seeds.iter().enumerate() {
        let mut rng = Rng(*seed);
        let resources = random_services(lab, &mut rng);
        let p = proxier.clone();
        let snap = Snapshot::from_resources(resources.clone());
        let report = lab
            .node_rt
            .run(async move { p.update(&snap, &ChangeSet::default()).await })
            .await
            .expect("sync");
        assert_eq!(report.full, round == 0, "{mode} round {round}: {report:?}");
        let mut dests = destinations(&resources);
        if round > 0 {
            dests.retain(|d| {
                // 198.19.1.<i+1> / 198.19.60.<i+1> / node port 30100+i for service s<i>.
                let i = match d.ip() {
                    a if a == ip(NODE_IP) => u64::from(d.port() - 30100),
                    IpAddr::V4(a) => u64::from(a.octets()[3]) - 1,
                    IpAddr::V6(_) => 0,
                };
                i < SERVICES as u64 / 2
            });
        }
        let started = Instant::now();
        let mut checked: BTreeMap<String, usize> = BTreeMap::new();
        for to in dests {
            for from in [CLIENT_IP, &client_pod.ip.to_string(), NODE_IP] {
                let x = check(lab, mode, from, to).await;
                let verdict = x["verdict"].as_str().unwrap().to_string();
                *checked.entry(verdict).or_default() += 1;
            }
        }
        eprintln!(
            "{mode} round {round}: checked {checked:?} in {:?}",
            started.elapsed()
        );
        // The random set must have exercised every verdict.
        for v in ["dnat", "reject", "drop"] {
            assert!(
                checked.get(v).copied().unwrap_or(0) > 0,
                "round {round}: no {v} case: {checked:?}"
            );
        }
    }
}

/// Explains `from -> to` from the live kernel and checks the answer against real
/// requests from that source; returns the explanation.
async fn check(lab: &Lab, mode: &str, from: &str, to: SocketAddr) -> Value {
    let pod_by_ip: BTreeMap<String, String> = lab
        .pods
        .iter()
        .map(|p| (p.ip.to_string(), p.name.clone()))
        .collect();
    let client_pod = &lab.pods[SERVING];
    let x = explain(lab, mode, from, to);
    let verdict = x["verdict"].as_str().unwrap().to_string();
    // The node itself: locally generated (the OUTPUT path).
    let rt = if from == CLIENT_IP {
        &lab.client_rt
    } else if from == NODE_IP {
        &lab.node_rt
    } else {
        assert_eq!(from, client_pod.ip.to_string());
        &client_pod.rt
    };
    let ctx = format!("{mode}: {from} -> {to}: {x:#}");
    if mode == "nftables" {
        // Everything the agent writes, however it reached the kernel, is modelled.
        assert_eq!(x["notes"], serde_json::json!([]), "{ctx}");
    }
    match verdict.as_str() {
        "dnat" => {
            let predicted: BTreeSet<String> = x["endpoints"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| {
                    let a: SocketAddr = e["address"].as_str().unwrap().parse().unwrap();
                    pod_by_ip[&a.ip().to_string()].clone()
                })
                .collect();
            let n = (predicted.len() * 16).min(64);
            let (seen, peers, failed) = rt
                .run(async move {
                    let mut seen = BTreeSet::new();
                    let mut peers = BTreeSet::new();
                    let mut failed = Vec::new();
                    for _ in 0..n {
                        let o = get(to, "/", Duration::from_secs(2)).await;
                        match o.served() {
                            Some((pod, peer)) => {
                                seen.insert(pod);
                                peers.insert(peer);
                            }
                            None => failed.push(o),
                        }
                    }
                    (seen, peers, failed)
                })
                .await;
            if !failed.is_empty() {
                lone_failure_or_panic(lab, rt, from, to, &predicted, &failed, &ctx).await;
            }
            assert_eq!(seen, predicted, "{ctx}");
            let masq = x["masquerade"].as_bool().unwrap();
            let kept = peers.iter().all(|p| *p == from);
            assert_eq!(masq, !kept, "{ctx}\npeers seen: {peers:?}");
        }
        "reject" => {
            let o = rt.run(get(to, "/", Duration::from_secs(2))).await;
            assert!(matches!(o, Outcome::Refused), "{ctx}\n{o:?}");
        }
        "drop" => {
            let o = rt.run(get(to, "/", Duration::from_millis(400))).await;
            assert!(matches!(o, Outcome::Timeout), "{ctx}\n{o:?}");
        }
        "no_match" if to.ip() == ip(NODE_IP) => {
            // No rule: delivered to the node, where nothing listens there.
            let o = rt.run(get(to, "/", Duration::from_secs(2))).await;
            assert!(matches!(o, Outcome::Refused), "{ctx}\n{o:?}");
        }
        "no_match" => {
            // Routed on unchanged: no pod may answer.
            let o = rt.run(get(to, "/", Duration::from_millis(400))).await;
            assert!(o.served().is_none(), "{ctx}\n{o:?}");
        }
        other => panic!("unexpected verdict {other}: {ctx}"),
    }
    x
}

/// Edits a rule the agent wrote: the last (catch-all) DNAT of a ClusterIP's
/// service chain, replaced by hand with one to the client-only pod. explain
/// shows the edited rule and the new endpoint set, and requests agree.
async fn shows_an_edited_nft_rule(lab: &Lab) {
    let target = lab.pods[SERVING].ip;
    for i in 2..=SERVICES {
        let to = SocketAddr::new(ip(&format!("198.19.1.{i}")), 80);
        let x = explain(lab, "nftables", CLIENT_IP, to);
        if x["verdict"] != "dnat" || x["endpoints"].as_array().unwrap().len() < 2 {
            continue;
        }
        let chain = x["trace"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["chain"].as_str().unwrap().to_string())
            .find(|c| c.starts_with("service-"))
            .expect("a service chain in the trace");
        let listing = lab
            .node
            .exec(&["nft", "-a", "list", "chain", "ip", "kube-proxy", &chain])
            .unwrap();
        let handle = listing
            .lines()
            .rfind(|l| l.contains(" dnat to "))
            .and_then(|l| l.rsplit("# handle ").next())
            .map(|h| h.trim().to_string())
            .expect("a dnat rule with its handle");
        let dnat = format!("{target}:80");
        lab.node
            .exec(&[
                "nft",
                "replace",
                "rule",
                "ip",
                "kube-proxy",
                &chain,
                "handle",
                &handle,
                "meta",
                "l4proto",
                "tcp",
                "dnat",
                "to",
                &dnat,
                "comment",
                "\"edited\"",
            ])
            .unwrap();
        let x = check(lab, "nftables", CLIENT_IP, to).await;
        let addrs: Vec<&str> = x["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["address"].as_str().unwrap())
            .collect();
        assert!(addrs.contains(&dnat.as_str()), "{x:#}");
        assert!(
            x["trace"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["chain"] == chain.as_str()
                    && s["rule"].as_str().unwrap().contains("edited")),
            "{x:#}"
        );
        return;
    }
    panic!("no ClusterIP with two endpoints to edit");
}

/// Failed requests of a DNAT case seen so far in this test binary.
static FAILED_REQUESTS: AtomicUsize = AtomicUsize::new(0);

/// Requests to a DNAT case failed. The rules do not change while a round is
/// checked, so a wrong rule fails every request it decides; a lone failure that
/// a retry does not repeat is the transport's (a connection's reused tuple
/// meeting an old one's state in conntrack or in the pod). One such request per
/// run is tolerated and printed with the node's conntrack entries and the pods'
/// sockets, so it can be told apart; a second, or a retry that fails too, fails
/// the test with the same listing.
async fn lone_failure_or_panic(
    lab: &Lab,
    rt: &meshlite_runtime::testing::netns::NsRuntime,
    from: &str,
    to: SocketAddr,
    predicted: &BTreeSet<String>,
    failed: &[Outcome],
    ctx: &str,
) {
    let retry = rt.run(get(to, "/", Duration::from_secs(2))).await;
    let earlier = FAILED_REQUESTS.fetch_add(failed.len(), Ordering::SeqCst);
    let mut state = lab
        .node
        .exec(&[
            "conntrack",
            "-L",
            "-p",
            "tcp",
            "-s",
            from,
            "--orig-port-dst",
            &to.port().to_string(),
        ])
        .unwrap_or_else(|e| format!("(conntrack -L: {e:#})"));
    for pod in lab.pods.iter().filter(|p| predicted.contains(&p.name)) {
        let ss = pod
            .ns
            .exec(&["ss", "-tanoi", "state", "all", "sport", "= :80"])
            .unwrap_or_else(|e| format!("(ss: {e:#})"));
        state.push_str(&format!("\n{} sockets:\n{ss}", pod.name));
    }
    let recovered = retry
        .served()
        .is_some_and(|(pod, _)| predicted.contains(&pod));
    let report = format!(
        "{ctx}\nfailed: {failed:?}, then a retry: {retry:?}\nconntrack from {from} to port {}:\n{state}",
        to.port()
    );
    assert!(
        recovered && failed.len() == 1 && earlier == 0,
        "{report}\n({earlier} requests failed before this case)"
    );
    eprintln!("a lone failed request, tolerated once per run:\n{report}");
}

/// Every golden nftables script loaded into a kernel and listed back (`nft list
/// table`, the kernel's spelling) gives the same answers as the script itself, for
/// every address in its maps from every kind of source.
#[test]
fn every_golden_nft_case_reads_back_from_the_kernel_with_the_same_answers() {
    if let Err(e) = netns::require_root_and_tools(&["nft"]) {
        panic!("{e:#}");
    }
    meshlite_runtime::testing::netns::set_prefix("mlna");
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/render");
    let mut compared = 0;
    let mut cases: Vec<_> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    for case in cases {
        for (file, fam, node, sources) in [
            (
                "expected.nft",
                "ip",
                "198.18.0.1",
                &[
                    "203.0.113.9",
                    "198.18.1.50",
                    "198.18.1.2",
                    "198.18.0.1",
                    "198.18.200.7",
                ][..],
            ),
            (
                "expected.v6.nft",
                "ip6",
                "2001:db8::1",
                &[
                    "2001:db8:ff::9",
                    "2001:db8:1::5",
                    "2001:db8:1::2",
                    "2001:db8::1",
                ][..],
            ),
        ] {
            let path = case.join(file);
            let Ok(script) = std::fs::read_to_string(&path) else {
                continue;
            };
            let ns = netns::Netns::new("golden").unwrap();
            ns.exec(&["nft", "-f", path.to_str().unwrap()]).unwrap();
            let listing = ns
                .exec(&["nft", "list", "table", fam, "kube-proxy"])
                .unwrap();
            let table = format!("{fam} kube-proxy");
            let kernel = Table::parse_listing(&listing)
                .unwrap_or_else(|e| panic!("{}: {e}\n{listing}", path.display()));
            let ours = Table::parse_script(&script, &table).unwrap();
            let host = Host {
                local: [ip(node)].into(),
                ..Host::default()
            };
            for (to, protocol) in map_destinations(&script, &table, ip(node)) {
                for from in sources {
                    let p = Packet {
                        src: ip(from),
                        dst: to,
                        protocol,
                    };
                    let a = RuleSet::Nftables(kernel.clone()).explain(&p, &host);
                    let b = RuleSet::Nftables(ours.clone()).explain(&p, &host);
                    let ctx = format!(
                        "{}: {from} -> {to}\nkernel: {a:#?}\nscript: {b:#?}",
                        path.display()
                    );
                    assert_eq!(a.verdict, b.verdict, "{ctx}");
                    assert_eq!(a.endpoints, b.endpoints, "{ctx}");
                    assert_eq!(a.masquerade, b.masquerade, "{ctx}");
                    assert_eq!(a.service, b.service, "{ctx}");
                    assert_eq!(a.affinity, b.affinity, "{ctx}");
                    assert_eq!(a.trace.len(), b.trace.len(), "{ctx}");
                    assert!(a.notes.iter().all(|n| n.contains("affinity")), "{ctx}");
                    compared += 1;
                }
            }
        }
    }
    eprintln!("{compared} packets explained alike from the kernel's listing and the script");
    assert!(compared > 100, "{compared}");
}

/// Every destination in a script's maps: `ip . proto . port` keys, and NodePorts
/// (`proto . port`) on `node`; each also one port up (a port no service has).
fn map_destinations(
    script: &str,
    table: &str,
    node: IpAddr,
) -> Vec<(SocketAddr, meshlite_proto::model::Protocol)> {
    use meshlite_proto::model::Protocol;
    let mut out = Vec::new();
    for line in script.lines() {
        let Some(rest) = line.strip_prefix(&format!("add element {table} ")) else {
            continue;
        };
        let Some((_, body)) = rest.split_once(" { ") else {
            continue;
        };
        for el in body.trim_end_matches(" }").split(", ") {
            let key = el.split(" : ").next().unwrap();
            let key = key.split(" comment ").next().unwrap();
            let parts: Vec<&str> = key.split(" . ").collect();
            let (addr, proto, port) = match parts[..] {
                [a, pr, po] => match a.parse::<IpAddr>() {
                    Ok(a) => (a, pr, po),
                    Err(_) => continue,
                },
                [pr @ ("tcp" | "udp" | "sctp"), po] => (node, pr, po),
                _ => continue,
            };
            let proto = match proto {
                "tcp" => Protocol::Tcp,
                "udp" => Protocol::Udp,
                _ => Protocol::Sctp,
            };
            let port: u16 = port.parse().unwrap();
            out.push((SocketAddr::new(addr, port), proto));
            out.push((SocketAddr::new(addr, port + 1), proto));
        }
    }
    out.sort_by_key(|(a, p)| (*a, p.as_lower()));
    out.dedup();
    out
}
