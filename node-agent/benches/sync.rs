//! Sync benchmark: 10,000 ClusterIP services x 10 endpoints, in a network
//! namespace of its own. Prints figures (medians); asserts nothing.
//!
//! `cargo bench -p meshlite-node-agent --bench sync` (root; needs iptables).
//! `MESHLITE_BENCH_SERVICES` / `MESHLITE_BENCH_ENDPOINTS` / `MESHLITE_BENCH_RUNS`
//! change the size and the number of runs. `MESHLITE_BENCH_IPTABLES=nft` or
//! `legacy` runs `iptables-nft*` or `iptables-legacy*` as `iptables*` (through a
//! directory of links put first on this process's `PATH`, the way the agent finds
//! its tools; the system's alternatives are left alone); unset, whatever
//! `iptables` is. Each sync is compared with a plain `iptables-restore` (no
//! `--noflush`) of the same rules into an empty namespace.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/netns.rs"]
mod netns;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use meshlite_node_agent::backend::{Backend, Desired};
use meshlite_node_agent::iptables::{self, IptablesBackend, IptablesConfig, render};
use meshlite_node_agent::netfilter::Runner;
use meshlite_node_agent::proxy::{IpFamily, ProxyView, ServicePortName};
use meshlite_proto::model::{
    AddressFamily, Endpoint, EndpointPort, EndpointSlice, Node, Protocol, Resource, Service,
};
use meshlite_runtime::Snapshot;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn v4(n: usize, base: [u8; 2]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        base[0],
        base[1],
        (n / 250 % 256) as u8,
        (n % 250 + 1) as u8,
    ))
}

fn resources(services: usize, endpoints: usize, shrink: Option<usize>) -> Vec<Resource> {
    let mut r = vec![Resource::Node(Node {
        name: "node1".into(),
        zone: None,
        addresses: vec!["198.18.255.1".parse().unwrap()],
        pod_cidrs: vec![],
    })];
    for i in 0..services {
        let name = format!("svc-{i}");
        r.push(Resource::Service(
            Service::cluster_ip("bench", &name, v4(i, [198, 19])).with_port(
                "http",
                Protocol::Tcp,
                80,
            ),
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
                .map(|k| {
                    Endpoint::ready(v4((i * endpoints + k) % 60_000, [198, 18])).on_node("node2")
                })
                .collect(),
            ignored_by_proxy: false,
        }));
    }
    r
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Runs this benchmark again with links named `iptables*` to the `variant`'s
/// binaries first on its `PATH`, and exits with its status.
fn rerun_with_variant(variant: &str) -> ! {
    let path = std::env::var("PATH").unwrap_or_default();
    let dir = std::env::temp_dir().join(format!("meshlite-bench-iptables-{variant}"));
    std::fs::create_dir_all(&dir).unwrap();
    for family in ["iptables", "ip6tables"] {
        for what in ["", "-restore", "-save"] {
            let target = format!("{family}-{variant}{what}");
            let found = std::env::split_paths(&path)
                .map(|d| d.join(&target))
                .find(|p| p.exists())
                .unwrap_or_else(|| panic!("{target} is not installed"));
            let link = dir.join(format!("{family}{what}"));
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(found, link).unwrap();
        }
    }
    let joined =
        std::env::join_paths(std::iter::once(dir).chain(std::env::split_paths(&path))).unwrap();
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(std::env::args_os().skip(1))
        .env("PATH", joined)
        .env("MESHLITE_BENCH_IPTABLES_SELECTED", variant)
        .status()
        .unwrap();
    std::process::exit(status.code().unwrap_or(1));
}

/// A plain `iptables-restore` (no `--noflush`) of `text` into a new namespace.
async fn plain_restore(text: String) -> Duration {
    let ns = netns::Netns::new("plain").expect("network namespace");
    let rt = ns.runtime().unwrap();
    rt.run(async move {
        let t = Instant::now();
        let out = Runner::System
            .run("iptables-restore", &["-w"], Some(&text))
            .await
            .unwrap();
        assert!(out.success, "plain iptables-restore: {}", out.stderr);
        t.elapsed()
    })
    .await
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    if let Ok(variant) = std::env::var("MESHLITE_BENCH_IPTABLES")
        && std::env::var_os("MESHLITE_BENCH_IPTABLES_SELECTED").is_none()
    {
        rerun_with_variant(&variant);
    }
    let services = env("MESHLITE_BENCH_SERVICES", 10_000);
    let endpoints = env("MESHLITE_BENCH_ENDPOINTS", 10);
    let runs = env("MESHLITE_BENCH_RUNS", 5).max(1);
    let cfg = IptablesConfig {
        prefix: "KUBE".into(),
        families: vec![IpFamily::V4],
        cluster_cidrs: vec!["198.18.0.0/16".parse().unwrap()],
        detect_local: Default::default(),
        masquerade_all: false,
        masquerade_bit: 14,
        node_ips: vec![],
        localhost_nodeports: true,
        random_fully: true,
        conntrack_cleanup: true,
        nodeport_addresses: vec![],
    };

    let snap = Snapshot::from_resources(resources(services, endpoints, None));
    let changed_snap = Snapshot::from_resources(resources(services, endpoints, Some(services / 2)));
    let backend_for_cfg = IptablesBackend::new(cfg.clone());

    // (1) Render: snapshot -> view -> ruleset -> text.
    let mut t_view = Vec::new();
    let mut t_render = Vec::new();
    let mut text = String::new();
    let mut rs = None;
    for _ in 0..runs {
        let t = Instant::now();
        let view = ProxyView::build(&snap, "node1", IpFamily::V4);
        t_view.push(t.elapsed());
        let t = Instant::now();
        let r = render(&view, &backend_for_cfg.render_config(&view));
        text = r.full_text(&[]);
        t_render.push(t.elapsed());
        rs = Some(r);
    }
    let rs = rs.unwrap();
    // The invariant check the backend runs before every restore.
    let mut t_check = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        rs.check().expect("renderer invariant");
        t_check.push(t.elapsed());
    }
    let view_changed = ProxyView::build(&changed_snap, "node1", IpFamily::V4);
    let rs_changed = render(&view_changed, &backend_for_cfg.render_config(&view_changed));
    let changed: BTreeSet<ServicePortName> = [ServicePortName::new(
        "bench",
        &format!("svc-{}", services / 2),
        "http",
        Protocol::Tcp,
    )]
    .into();
    let old_seps: BTreeSet<&str> = rs.active_nat_chains();
    let new_seps: BTreeSet<&str> = rs_changed.active_nat_chains();
    let stale: Vec<String> = old_seps
        .difference(&new_seps)
        .map(|s| s.to_string())
        .collect();
    let partial = rs_changed.partial_text(&changed, &stale);

    println!("meshlite node agent sync benchmark");
    let version = std::process::Command::new("iptables-restore")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|e| format!("iptables-restore: {e}"));
    println!("  {version}");
    println!(
        "  size: {services} services x {endpoints} endpoints (large-cluster mode: {})",
        services * endpoints > iptables::render::LARGE_CLUSTER_ENDPOINTS
    );
    println!(
        "  ruleset: {} rules (filter {}, nat {}), {} chains, {:.1} MiB of restore input",
        rs.filter_rule_count + rs.nat_rule_count,
        rs.filter_rule_count,
        rs.nat_rule_count,
        rs.active_nat_chains().len(),
        text.len() as f64 / (1024.0 * 1024.0)
    );
    println!(
        "  partial (1 service changed): {} lines, {:.1} KiB",
        partial.lines().count(),
        partial.len() as f64 / 1024.0
    );
    println!(
        "  (1) view build: {}   render (ruleset + text): {}   invariant check: {}",
        ms(median(t_view)),
        ms(median(t_render)),
        ms(median(t_check))
    );

    if let Err(e) = netns::require_root_and_tools(&["ip", "iptables-restore", "iptables-save"]) {
        panic!("{e:#}");
    }
    let ns = netns::Netns::new("bench").expect("network namespace");
    let rt = ns.runtime().unwrap();
    let t0 = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    t0.block_on(async move {
        let mut plain = Vec::new();
        for _ in 0..runs {
            plain.push(plain_restore(text.clone()).await);
        }
        let (first, fulls, partials, bare_partial) = rt
            .run(async move {
                let mut backend = IptablesBackend::new(cfg);
                let views = vec![ProxyView::build(&snap, "node1", IpFamily::V4)];
                let views_changed = vec![ProxyView::build(&changed_snap, "node1", IpFamily::V4)];
                let t = Instant::now();
                backend
                    .apply(Desired { views: &views, full: true })
                    .await
                    .unwrap();
                let first = t.elapsed();
                let mut fulls = Vec::new();
                let mut partials = Vec::new();
                let mut bare_partial = Vec::new();
                for _ in 0..runs {
                    let t = Instant::now();
                    backend
                        .apply(Desired { views: &views, full: true })
                        .await
                        .unwrap();
                    fulls.push(t.elapsed());
                }
                for _ in 0..runs {
                    // Back to the base state, then the one-service change.
                    backend
                        .apply(Desired { views: &views, full: false })
                        .await
                        .unwrap();
                    let t = Instant::now();
                    backend
                        .apply(Desired { views: &views_changed, full: false })
                        .await
                        .unwrap();
                    partials.push(t.elapsed());
                    let t = Instant::now();
                    iptables::restore(&Default::default(), IpFamily::V4, &partial).await.unwrap();
                    bare_partial.push(t.elapsed());
                }
                (first, fulls, partials, bare_partial)
            })
            .await;
        let f = median(fulls);
        let (p, bp) = (median(partials), median(bare_partial));
        let pl = median(plain);
        println!(
            "  plain iptables-restore (no --noflush) of the full text into an empty namespace: {}",
            ms(pl)
        );
        println!(
            "  (2) first sync into an empty namespace: {}   ratio to the plain restore {:.2}",
            ms(first),
            first.as_secs_f64() / pl.as_secs_f64()
        );
        println!(
            "      full sync (everything rewritten): {}   ratio to the plain restore {:.2}",
            ms(f),
            f.as_secs_f64() / pl.as_secs_f64()
        );
        println!(
            "  (3) single-service change (partial sync): {}   restore --noflush of kube-proxy's partial text (top-level chains too): {}   ratio {:.2}",
            ms(p),
            ms(bp),
            p.as_secs_f64() / bp.as_secs_f64()
        );
        println!("  medians of {runs} runs");
    });
}
