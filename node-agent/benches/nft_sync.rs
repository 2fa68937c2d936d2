//! nftables sync benchmark, in a network namespace of its own: full sync from
//! empty against a bare `nft -f` of the same script into an empty table, a full
//! resync with nothing changed, one endpoint change, one new service, one removed
//! service, and the process RSS. Prints figures (medians); asserts nothing.
//!
//! `cargo bench -p meshlite-node-agent --bench nft_sync` (root; needs `nft`).
//! `MESHLITE_BENCH_SIZES=10000x10,50000x5` and `MESHLITE_BENCH_RUNS` change the
//! sizes and the number of runs; `MESHLITE_BENCH_DUMP=DIR` writes each full
//! script to DIR.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/netns.rs"]
mod netns;

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use meshlite_node_agent::backend::{Backend, Desired};
use meshlite_node_agent::netfilter::Runner;
use meshlite_node_agent::nftables::{NftablesBackend, NftablesConfig, Written, render, script};
use meshlite_node_agent::proxy::{IpFamily, ProxyView};
use meshlite_proto::model::{
    AddressFamily, Endpoint, EndpointPort, EndpointSlice, Node, Protocol, Resource, ResourceKey,
    Service, ServiceName,
};
use meshlite_runtime::{ChangeSet, Snapshot};

fn addr(n: usize, base: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        base,
        (n >> 16) as u8,
        (n >> 8) as u8,
        n as u8,
    ))
}

/// `services` ClusterIP services (from `first`) with `endpoints` endpoints each;
/// service `shrink` has one endpoint fewer.
fn snapshot(first: usize, services: usize, endpoints: usize, shrink: Option<usize>) -> Snapshot {
    let mut r = vec![Resource::Node(Node {
        name: "node1".into(),
        zone: None,
        addresses: vec!["192.0.2.1".parse().unwrap()],
        pod_cidrs: vec![],
    })];
    for i in first..first + services {
        let name = format!("svc-{i}");
        r.push(Resource::Service(
            Service::cluster_ip("bench", &name, addr(i, 100)).with_port("http", Protocol::Tcp, 80),
        ));
        let n = if shrink == Some(i) {
            endpoints - 1
        } else {
            endpoints
        };
        r.push(Resource::EndpointSlice(EndpointSlice {
            namespace: "bench".into(),
            name: format!("{name}-1"),
            service_name: name,
            address_family: AddressFamily::Ipv4,
            ports: vec![EndpointPort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 8080,
                app_protocol: None,
            }],
            endpoints: (0..n)
                .map(|k| Endpoint::ready(addr(i * endpoints + k, 10)).on_node("node2"))
                .collect(),
            ignored_by_proxy: false,
        }));
    }
    Snapshot::from_resources(r)
}

/// The agent's view after a change to `services`, rebuilt from `base` as the
/// agent does (the other ports shared).
fn rebuilt(base: &ProxyView, snap: &Snapshot, services: &[usize]) -> ProxyView {
    let changes = ChangeSet {
        services: services
            .iter()
            .map(|i| ServiceName::new("bench", format!("svc-{i}")))
            .collect(),
        upserted: vec![ResourceKey::Service {
            namespace: "bench".into(),
            name: "changed".into(),
        }],
        ..ChangeSet::default()
    };
    base.rebuild(snap, &changes)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn range(v: &[Duration]) -> String {
    let lo = v.iter().min().unwrap();
    let hi = v.iter().max().unwrap();
    format!(
        "median {} (range {}–{})",
        ms(median(v.to_vec())),
        ms(*lo),
        ms(*hi)
    )
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn cfg() -> NftablesConfig {
    NftablesConfig {
        table: "kube-proxy".into(),
        families: vec![IpFamily::V4],
        cluster_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
        detect_local: Default::default(),
        masquerade_all: false,
        masquerade_bit: 14,
        node_ips: vec!["192.0.2.1".parse().unwrap()],
        nodeport_addresses: vec![],
        conntrack_cleanup: false,
    }
}

async fn nft(text: &str) {
    Runner::System
        .output("nft", &["-f", "-"], Some(text))
        .await
        .unwrap();
}

async fn size(services: usize, endpoints: usize, runs: usize) {
    println!("== {services} services x {endpoints} endpoints");
    let snap = snapshot(0, services, endpoints, None);
    let t = Instant::now();
    let base = vec![ProxyView::build(&snap, "node1", IpFamily::V4)];
    let build = t.elapsed();
    let changed_snap = snapshot(0, services, endpoints, Some(services / 2));
    let t = Instant::now();
    let changed = vec![rebuilt(&base[0], &changed_snap, &[services / 2])];
    println!(
        "  (0) the view: built whole {}, rebuilt for one changed service {}",
        ms(build),
        ms(t.elapsed())
    );
    let added = vec![rebuilt(
        &base[0],
        &snapshot(0, services + 1, endpoints, None),
        &[services],
    )];
    let removed = vec![rebuilt(
        &base[0],
        &snapshot(1, services - 1, endpoints, None),
        &[0],
    )];
    let rcfg = cfg().render_config(&base[0]);
    let text = script::full(IpFamily::V4, &rcfg, &render::render(&base[0], &rcfg), &[]).text;
    println!("  script: {} bytes", text.len());
    if let Some(dir) = std::env::var_os("MESHLITE_BENCH_DUMP") {
        let path = std::path::Path::new(&dir).join(format!("full-{services}x{endpoints}.nft"));
        std::fs::write(&path, &text).unwrap();
        println!("  script written to {}", path.display());
    }

    let (mut first, mut bare) = (Vec::new(), Vec::new());
    let mut backend = NftablesBackend::new(cfg());
    for _ in 0..runs {
        // Interleaved: bare load into an empty table, then the agent's first sync.
        let _ = Runner::System
            .run("nft", &["delete", "table", "ip", "kube-proxy"], None)
            .await;
        let t = Instant::now();
        nft(&text).await;
        bare.push(t.elapsed());
        Runner::System
            .output("nft", &["delete", "table", "ip", "kube-proxy"], None)
            .await
            .unwrap();
        backend = NftablesBackend::new(cfg());
        let t = Instant::now();
        backend
            .apply(Desired {
                views: &base,
                full: true,
            })
            .await
            .unwrap();
        first.push(t.elapsed());
    }
    println!("  (1) full sync from empty: {}", range(&first));
    println!("      bare nft -f of the same script: {}", range(&bare));
    println!(
        "      ratio {:.2}",
        median(first.clone()).as_secs_f64() / median(bare.clone()).as_secs_f64()
    );

    let (mut resync, mut noop) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let t = Instant::now();
        backend
            .apply(Desired {
                views: &base,
                full: true,
            })
            .await
            .unwrap();
        resync.push(t.elapsed());
        let t = Instant::now();
        backend
            .apply(Desired {
                views: &base,
                full: false,
            })
            .await
            .unwrap();
        noop.push(t.elapsed());
    }
    println!(
        "  (2) full resync, nothing changed (verifies, writes nothing): {}",
        range(&resync)
    );
    println!(
        "      partial sync, nothing changed (writes nothing): {}",
        range(&noop)
    );

    let mut steps: Vec<(&str, &Vec<ProxyView>, Vec<Duration>)> = vec![
        ("one endpoint removed", &changed, Vec::new()),
        ("one new service", &added, Vec::new()),
        ("one removed service", &removed, Vec::new()),
    ];
    for _ in 0..runs {
        for (_, views, times) in &mut steps {
            let t = Instant::now();
            backend.apply(Desired { views, full: false }).await.unwrap();
            times.push(t.elapsed());
            backend
                .apply(Desired {
                    views: &base,
                    full: false,
                })
                .await
                .unwrap();
        }
    }
    // The same steps by an agent that writes every transaction with nft -f.
    let mut by_nft = NftablesBackend::new(cfg()).without_netlink();
    by_nft
        .apply(Desired {
            views: &base,
            full: true,
        })
        .await
        .unwrap();
    let mut nft_times: Vec<Vec<Duration>> = vec![Vec::new(); steps.len()];
    for _ in 0..runs {
        for ((_, views, _), times) in steps.iter().zip(&mut nft_times) {
            let t = Instant::now();
            by_nft.apply(Desired { views, full: false }).await.unwrap();
            times.push(t.elapsed());
            by_nft
                .apply(Desired {
                    views: &base,
                    full: false,
                })
                .await
                .unwrap();
        }
    }
    for ((what, views, times), nft_times) in steps.iter().zip(&nft_times) {
        // The same change as a bare transaction (computed here, not timed).
        let mut w = Written::new(IpFamily::V4);
        let _ = w.update(&base[0], &rcfg);
        let fwd = script::changes(IpFamily::V4, &rcfg, &w.update(&views[0], &rcfg)).text;
        let back = script::changes(IpFamily::V4, &rcfg, &w.update(&base[0], &rcfg)).text;
        let mut bare = Vec::new();
        for _ in 0..runs {
            let t = Instant::now();
            nft(&fwd).await;
            bare.push(t.elapsed());
            nft(&back).await;
        }
        println!("  (3) {what}: {} (netlink batch)", range(times));
        println!(
            "      the agent writing it with nft -f: {}",
            range(nft_times)
        );
        println!(
            "      its transaction alone ({} lines) through a bare nft -f: {}",
            fwd.lines().count(),
            range(&bare)
        );
    }
    println!("  (4) RSS of this process: {:.0} MiB", rss_mib());
}

fn main() {
    let sizes: Vec<(usize, usize)> = std::env::var("MESHLITE_BENCH_SIZES")
        .unwrap_or_else(|_| "10000x10,50000x5".into())
        .split(',')
        .filter_map(|s| {
            let (a, b) = s.split_once('x')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .collect();
    let runs: usize = std::env::var("MESHLITE_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    if let Err(e) = netns::require_root_and_tools(&["ip", "nft"]) {
        panic!("{e:#}");
    }
    let ns = netns::Netns::new("nftbench").expect("network namespace");
    let rt = ns.runtime().unwrap();
    let t0 = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    t0.block_on(rt.run(async move {
        for (s, e) in sizes {
            size(s, e, runs).await;
        }
    }));
}
