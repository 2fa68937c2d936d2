//! Property test of the iptables renderer: thousands of random cluster states
//! (service type, both traffic policies, external IPs, load-balancer IPs with
//! source ranges, affinity, endpoint conditions, local or remote, hints, the same
//! IP in several slices, both IP families, every `--detect-local-mode`), each
//! rendered and checked three ways:
//!
//! - the renderer's invariant ([`RuleSet::check`] and [`check_text`]): every chain
//!   a rule appends to or jumps to is declared;
//! - `iptables-legacy-restore --test` (`ip6tables-…` for IPv6) in a fresh network
//!   namespace, from empty tables: it builds the whole table in memory, so it
//!   refuses a jump to an undeclared chain (the nft variant's `--test` does not);
//! - `iptables-restore --test` (nft, this machine's default): the matches and
//!   targets as the agent's own restore parses them. It takes about 25 ms per
//!   state against 0.3 ms for the legacy tool, so it gets every
//!   `MESHLITE_PROPERTY_NFT_EVERY`-th state (default 5).
//!
//! States are batched (many restore inputs in one run; a failing line is mapped
//! back to its state). Deterministic: the seed is `MESHLITE_PROPERTY_SEED` (or a
//! fixed default) and is printed with the failing state; `MESHLITE_PROPERTY_STATES`
//! sets the number of states (default 3000; about 50 s). Needs root, `ip`, and the
//! iptables tools; fails naming what is missing.

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use meshlite_node_agent::iptables::render::check_text;
use meshlite_node_agent::iptables::{IptablesBackend, IptablesConfig, render};
use meshlite_node_agent::local::DetectLocalMode;
use meshlite_node_agent::proxy::{IpFamily, ProxyView};
use meshlite_proto::model::{
    AddressFamily, Endpoint, EndpointPort, EndpointSlice, Node, Protocol, Resource, Service,
    ServiceType, TrafficPolicy,
};
use meshlite_runtime::Snapshot;
use meshlite_runtime::testing::{Rng, env_or};

const NODE: &str = "node1";
const BATCH: usize = 100;

/// A network namespace for the `--test` runs, deleted on drop.
struct Netns(String);

impl Netns {
    fn new() -> Self {
        let name = format!("mlprop{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            ok,
            "cannot create network namespace {name}: this test needs root and `ip` (iproute2)"
        );
        Self(name)
    }

    /// Runs `tool --test` (from empty tables) on `input`; stderr on failure.
    fn test(&self, tool: &str, input: &str) -> Result<(), String> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.0, tool, "--test", "-w"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {tool}: {e} (package iptables)"));
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn pick<'a, T>(rng: &mut Rng, items: &'a [T]) -> &'a T {
    &items[rng.below(items.len())]
}

fn chance(rng: &mut Rng, percent: usize) -> bool {
    rng.below(100) < percent
}

fn v4(a: u8, b: u8) -> IpAddr {
    IpAddr::from([198, 18, a, b])
}

fn v6(a: u16, b: u16) -> IpAddr {
    IpAddr::from([0x2001, 0xdb8, 0x18, 0, 0, 0, a, b])
}

/// A random cluster state: a few services and their slices, and this node.
fn random_state(rng: &mut Rng) -> Vec<Resource> {
    let mut out = Vec::new();
    let n_services = 1 + rng.below(5);
    for i in 0..n_services {
        let name = format!("s{i}");
        let dual = chance(rng, 40);
        let mut s = Service::cluster_ip("ns", &name, IpAddr::from([198, 19, 0, 10 + i as u8]));
        if dual {
            s.cluster_ips.push(IpAddr::from([
                0x2001,
                0xdb8,
                0x19,
                0,
                0,
                0,
                0,
                10 + i as u16,
            ]));
        }
        s.kind = *pick(
            rng,
            &[
                ServiceType::ClusterIp,
                ServiceType::NodePort,
                ServiceType::LoadBalancer,
            ],
        );
        let n_ports = 1 + rng.below(2);
        for p in 0..n_ports {
            let proto = *pick(rng, &[Protocol::Tcp, Protocol::Udp, Protocol::Sctp]);
            s = s.with_port(&format!("p{p}"), proto, 80 + p as u16);
            if s.kind != ServiceType::ClusterIp {
                s.ports[p].node_port = Some(30000 + (i * 4 + p) as u16);
            }
        }
        s.internal_traffic_policy = *pick(rng, &[TrafficPolicy::Cluster, TrafficPolicy::Local]);
        s.external_traffic_policy = *pick(rng, &[TrafficPolicy::Cluster, TrafficPolicy::Local]);
        for k in 0..rng.below(3) {
            s.external_ips
                .push(IpAddr::from([198, 19, 200, (i * 4 + k) as u8]));
            if dual && chance(rng, 50) {
                s.external_ips.push(IpAddr::from([
                    0x2001, 0xdb8, 0x200, 0, 0, 0, i as u16, k as u16,
                ]));
            }
        }
        if s.kind == ServiceType::LoadBalancer {
            for k in 0..rng.below(3) {
                s.load_balancer_ips
                    .push(IpAddr::from([198, 19, 100, (i * 4 + k) as u8]));
                if dual && chance(rng, 50) {
                    s.load_balancer_ips.push(IpAddr::from([
                        0x2001, 0xdb8, 0x100, 0, 0, 0, i as u16, k as u16,
                    ]));
                }
            }
            for k in 0..rng.below(3) {
                let range = *pick(
                    rng,
                    &[
                        "203.0.113.0/25",
                        "198.18.0.1/32",
                        "2001:db8:ff::/64",
                        "0.0.0.0/0",
                    ],
                );
                if k == 0 || chance(rng, 50) {
                    s.load_balancer_source_ranges.push(range.parse().unwrap());
                }
            }
            if s.external_traffic_policy == TrafficPolicy::Local && chance(rng, 70) {
                s.health_check_node_port = Some(31000 + i as u16);
            }
        }
        if chance(rng, 30) {
            s.session_affinity_timeout = Some(*pick(rng, &[1, 10800, 86400]));
        }
        let ports: Vec<(String, Protocol)> = s
            .ports
            .iter()
            .map(|p| (p.name.clone(), p.protocol))
            .collect();
        out.push(Resource::Service(s));

        for family in [AddressFamily::Ipv4, AddressFamily::Ipv6] {
            if family == AddressFamily::Ipv6 && !dual {
                continue;
            }
            for k in 0..rng.below(3) {
                let mut endpoints = Vec::new();
                for _ in 0..rng.below(5) {
                    // A small pool, so the same IP shows up in several slices.
                    let (a, b) = (1 + rng.below(3), 2 + rng.below(3));
                    let ip = match family {
                        AddressFamily::Ipv4 => v4(a as u8, b as u8),
                        AddressFamily::Ipv6 => v6(a as u16, b as u16),
                    };
                    let mut e = Endpoint::ready(ip);
                    match rng.below(4) {
                        0 => {}
                        1 => {
                            e.ready = false;
                            e.terminating = true;
                        }
                        2 => {
                            e.ready = false;
                            e.serving = false;
                            e.terminating = true;
                        }
                        _ => e.ready = false,
                    }
                    match rng.below(3) {
                        0 => e = e.on_node(NODE),
                        1 => e = e.on_node("node2"),
                        _ => {}
                    }
                    if chance(rng, 30) {
                        e.zone_hints = vec![pick(rng, &["zone-a", "zone-b"]).to_string()];
                    }
                    if chance(rng, 20) {
                        e.node_hints = vec![pick(rng, &[NODE, "node2"]).to_string()];
                    }
                    endpoints.push(e);
                }
                let slice_ports = ports
                    .iter()
                    .filter(|_| chance(rng, 85))
                    .map(|(name, protocol)| EndpointPort {
                        name: name.clone(),
                        protocol: *protocol,
                        port: 8080,
                        app_protocol: None,
                    })
                    .collect();
                out.push(Resource::EndpointSlice(EndpointSlice {
                    namespace: "ns".into(),
                    name: format!("{name}-{family:?}-{k}"),
                    service_name: name.clone(),
                    address_family: family,
                    ports: slice_ports,
                    endpoints,
                    ignored_by_proxy: false,
                }));
            }
        }
    }
    let mut pod_cidrs = Vec::new();
    if chance(rng, 70) {
        pod_cidrs.push("198.18.1.0/24".parse().unwrap());
        pod_cidrs.push("2001:db8:18::/96".parse().unwrap());
    }
    out.push(Resource::Node(Node {
        name: NODE.into(),
        zone: chance(rng, 70).then(|| "zone-a".to_string()),
        addresses: vec![v4(0, 1), v6(0, 1)],
        pod_cidrs,
    }));
    out
}

fn random_config(rng: &mut Rng, family: IpFamily) -> IptablesConfig {
    IptablesConfig {
        prefix: "KUBE".into(),
        families: vec![family],
        cluster_cidrs: if chance(rng, 80) {
            vec![
                "198.18.0.0/17".parse().unwrap(),
                "2001:db8:18::/64".parse().unwrap(),
            ]
        } else {
            vec![]
        },
        detect_local: pick(
            rng,
            &[
                DetectLocalMode::ClusterCidr,
                DetectLocalMode::NodeCidr,
                DetectLocalMode::BridgeInterface("cbr0".into()),
                DetectLocalMode::InterfaceNamePrefix("veth".into()),
            ],
        )
        .clone(),
        masquerade_all: chance(rng, 10),
        masquerade_bit: 14,
        node_ips: vec![v4(0, 1), v6(0, 1)],
        localhost_nodeports: chance(rng, 70),
        random_fully: chance(rng, 50),
        conntrack_cleanup: false,
        nodeport_addresses: if chance(rng, 20) {
            vec![
                "198.18.0.0/24".parse().unwrap(),
                "127.0.0.0/8".parse().unwrap(),
            ]
        } else {
            vec![]
        },
    }
}

/// The 1-based line number `iptables-restore` names in its error.
fn failed_line(stderr: &str) -> Option<usize> {
    stderr.split("line").skip(1).find_map(|s| {
        s.trim_start_matches([':', ' '])
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    })
}

#[test]
fn random_cluster_states_render_inputs_iptables_accepts() {
    let seed: u64 = env_or("MESHLITE_PROPERTY_SEED", 0x6d65_7368_6c69_7465);
    let states: usize = env_or("MESHLITE_PROPERTY_STATES", 3000);
    let ns = Netns::new();
    let nft_every: usize = env_or("MESHLITE_PROPERTY_NFT_EVERY", 5).max(1);
    let mut batches = [
        (
            IpFamily::V4,
            String::new(),
            Vec::new(),
            String::new(),
            Vec::new(),
        ),
        (
            IpFamily::V6,
            String::new(),
            Vec::new(),
            String::new(),
            Vec::new(),
        ),
    ];
    let started = std::time::Instant::now();
    let mut inputs = 0;
    let mut in_tools = std::time::Duration::ZERO;
    for state in 0..states {
        // One generator per state, so a failure is reproduced from (seed, state).
        let mut rng = Rng(seed ^ (state as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let resources = random_state(&mut rng);
        let snapshot = Snapshot::from_resources(resources.clone());
        for (family, text, starts, nft_text, nft_starts) in &mut batches {
            let cfg = random_config(&mut rng, *family);
            let view = ProxyView::build(&snapshot, NODE, *family);
            let backend = IptablesBackend::new(cfg);
            let render_cfg = backend.render_config(&view);
            // The renderer asserts its invariant in debug builds: name the state.
            let rs = std::panic::catch_unwind(|| render(&view, &render_cfg)).unwrap_or_else(|_| {
                panic!("render panicked on seed {seed:#x} state {state} ({family}): {resources:#?}")
            });
            let one = rs.full_text(&[]);
            let context =
                || format!("seed {seed:#x} state {state} ({family}): {resources:#?}\n{one}");
            if let Err(e) = rs.check() {
                panic!("{e}\n{}", context());
            }
            if let Err(e) = check_text(&one) {
                panic!("{e:#?}\n{}", context());
            }
            starts.push((text.lines().count(), state, one.clone()));
            text.push_str(&one);
            if state % nft_every == 0 {
                nft_starts.push((nft_text.lines().count(), state, one.clone()));
                nft_text.push_str(&one);
            }
        }
        if (state + 1) % BATCH == 0 || state + 1 == states {
            for (family, text, starts, nft_text, nft_starts) in &mut batches {
                let (legacy, nft) = match family {
                    IpFamily::V4 => ("iptables-legacy-restore", "iptables-restore"),
                    IpFamily::V6 => ("ip6tables-legacy-restore", "ip6tables-restore"),
                };
                for (tool, text, starts) in [
                    (legacy, &mut *text, &mut *starts),
                    (nft, nft_text, nft_starts),
                ] {
                    if text.is_empty() {
                        continue;
                    }
                    inputs += 1;
                    let t = std::time::Instant::now();
                    let result = ns.test(tool, text);
                    in_tools += t.elapsed();
                    if std::env::var_os("MESHLITE_PROPERTY_TIMES").is_some() {
                        eprintln!("{tool}: {:?}", t.elapsed());
                    }
                    if let Err(stderr) = result {
                        let line = failed_line(&stderr).unwrap_or(0);
                        let (first, state, one) = starts
                            .iter()
                            .rev()
                            .find(|(first, _, _)| *first < line)
                            .cloned()
                            .unwrap_or((0, usize::MAX, String::new()));
                        panic!(
                            "{tool} --test refused seed {seed:#x} state {state} ({family}), its line {}: {stderr}\n{one}",
                            line.saturating_sub(first)
                        );
                    }
                    text.clear();
                    starts.clear();
                }
            }
        }
    }
    eprintln!(
        "{states} states x 2 families ({} through nft), {inputs} batched --test runs ({in_tools:?} of them), {:?} (seed {seed:#x})",
        states.div_ceil(nft_every),
        started.elapsed()
    );
}
