//! IPVS vs iptables programming at 10,000 services x 10 endpoints, on the same
//! kernel: this machine's has no IPVS, so the benchmark boots Debian's kernel in a
//! QEMU VM (`tools/ipvs-vm.sh`, software emulation) with this very binary, which
//! then runs twice inside the guest, each time in a fresh network namespace:
//! once with the IPVS backend (netlink), once with the iptables backend
//! (`iptables-legacy`; the nft variant does not scale to 110,000 chains, see the
//! README). Prints figures; asserts nothing.
//!
//! `cargo bench -p meshlite-node-agent --bench ipvs_vm` (root; qemu, see
//! `tools/ipvs-vm.sh --prepare`). `MESHLITE_BENCH_SERVICES` /
//! `MESHLITE_BENCH_ENDPOINTS` change the size. Figures are under software
//! emulation (TCG), several times slower than the same kernel on hardware: compare
//! the two backends with each other, not with the native figures of `--bench sync`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use meshlite_node_agent::backend::{Backend, Desired};
use meshlite_node_agent::iptables::{IptablesBackend, IptablesConfig};
use meshlite_node_agent::ipvs::{IpvsBackend, IpvsConfig, Scheduler};
use meshlite_node_agent::proxy::{IpFamily, ProxyView};
use meshlite_proto::model::{
    AddressFamily, Endpoint, EndpointPort, EndpointSlice, Node, Protocol, Resource, Service,
};
use meshlite_runtime::Snapshot;

const GUEST: &str = "MESHLITE_IPVS_BENCH_GUEST";

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

/// `services` ClusterIP services with `endpoints` endpoints each (on another
/// node); service `shrink` has one endpoint less.
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

fn secs(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

fn report(backend: &str, what: &str, d: Duration, extra: &str) {
    println!("@@IPVSVM BENCH {backend} {what} {} {extra}", secs(d));
}

fn stages(b: &IpvsBackend) -> String {
    let mut sum: BTreeMap<&str, Duration> = BTreeMap::new();
    for (name, d) in b.last_stages() {
        *sum.entry(name).or_default() += *d;
    }
    sum.iter()
        .map(|(k, v)| format!("{k}={}", secs(*v)))
        .collect::<Vec<_>>()
        .join(",")
}

/// Inside the VM: one backend, in the network namespace this process runs in.
fn guest(which: &str) {
    let services = env("MESHLITE_BENCH_SERVICES", 10_000);
    let endpoints = env("MESHLITE_BENCH_ENDPOINTS", 10);
    let base = Snapshot::from_resources(resources(services, endpoints, None));
    let changed = Snapshot::from_resources(resources(services, endpoints, Some(services / 2)));
    let views = vec![ProxyView::build(&base, "node1", IpFamily::V4)];
    let views_changed = vec![ProxyView::build(&changed, "node1", IpFamily::V4)];
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        match which {
            "ipvs" => {
                let cfg = IpvsConfig {
                    prefix: "KUBE".into(),
                    families: vec![IpFamily::V4],
                    scheduler: Scheduler::Rr,
                    interface: "kube-ipvs0".into(),
                    cluster_cidrs: vec!["198.18.0.0/16".parse().unwrap()],
                    detect_local: Default::default(),
                    masquerade_all: false,
                    masquerade_bit: 14,
                    random_fully: true,
                    node_ips: vec![],
                    nodeport_addresses: vec![],
                    graceful_timeout: Duration::from_secs(900),
                    timeouts: Default::default(),
                    exclude_cidrs: vec![],
                    strict_arp: false,
                    conntrack_cleanup: false,
                };
                let mut b = IpvsBackend::start(cfg).await.unwrap();
                let t = Instant::now();
                let r = b
                    .apply(Desired {
                        views: &views,
                        full: true,
                    })
                    .await
                    .unwrap();
                report(
                    "ipvs",
                    "first",
                    t.elapsed(),
                    &format!("ops={} {}", r.rules_written, stages(&b)),
                );
                let t = Instant::now();
                b.apply(Desired {
                    views: &views,
                    full: true,
                })
                .await
                .unwrap();
                report("ipvs", "full-resync", t.elapsed(), &stages(&b));
                let t = Instant::now();
                b.apply(Desired {
                    views: &views_changed,
                    full: false,
                })
                .await
                .unwrap();
                report("ipvs", "one-service", t.elapsed(), &stages(&b));
            }
            "iptables" => {
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
                    conntrack_cleanup: false,
                    nodeport_addresses: vec![],
                };
                let mut b = IptablesBackend::new(cfg);
                let t = Instant::now();
                let r = b
                    .apply(Desired {
                        views: &views,
                        full: true,
                    })
                    .await
                    .unwrap();
                report(
                    "iptables",
                    "first",
                    t.elapsed(),
                    &format!("rules={}", r.rules_written),
                );
                let t = Instant::now();
                b.apply(Desired {
                    views: &views,
                    full: true,
                })
                .await
                .unwrap();
                report("iptables", "full-resync", t.elapsed(), "");
                let t = Instant::now();
                b.apply(Desired {
                    views: &views_changed,
                    full: false,
                })
                .await
                .unwrap();
                report("iptables", "one-service", t.elapsed(), "");
            }
            other => panic!("unknown backend {other}"),
        }
    });
}

/// The guest scenario: iptables-legacy first on PATH, each backend in its own
/// network namespace.
const SCENARIO: &str = r#"
set -u
mkdir -p /tmp/legacy-bin
for t in iptables iptables-restore iptables-save ip6tables ip6tables-restore ip6tables-save; do
    ln -sf /usr/sbin/$(echo $t | sed 's/tables/tables-legacy/') /tmp/legacy-bin/$t
done
BIN=/usr/local/bin/__BENCH__
rc=0
for b in ipvs iptables; do
    ip netns add bench-$b
    ip -n bench-$b link set lo up
    echo "===== $b (uptime $(cut -d' ' -f1 /proc/uptime)s)"
    PATH=/tmp/legacy-bin:$PATH MESHLITE_IPVS_BENCH_GUEST=$b MESHLITE_BENCH_SERVICES=__SERVICES__ \
        MESHLITE_BENCH_ENDPOINTS=__ENDPOINTS__ RUST_LOG=warn ip netns exec bench-$b $BIN || rc=1
    [ $b = ipvs ] && ip netns exec bench-ipvs ipvsadm -Ln | awk 'NR > 3 && $1 == "TCP" {v++} NR > 3 && $1 == "->" {r++} END {print "ipvs table:", v, "virtual servers,", r, "real servers"}'
    ip netns del bench-$b
done
exit $rc
"#;

fn main() {
    if let Ok(which) = std::env::var(GUEST) {
        guest(&which);
        return;
    }
    let services = env("MESHLITE_BENCH_SERVICES", 10_000);
    let endpoints = env("MESHLITE_BENCH_ENDPOINTS", 10);
    let exe = std::env::current_exe().unwrap();
    let name = exe.file_name().unwrap().to_string_lossy().to_string();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tmp/ipvs-bench");
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("scenario.sh");
    std::fs::write(
        &script,
        SCENARIO
            .replace("__BENCH__", &name)
            .replace("__SERVICES__", &services.to_string())
            .replace("__ENDPOINTS__", &endpoints.to_string()),
    )
    .unwrap();
    let tool = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/ipvs-vm.sh");
    println!(
        "meshlite IPVS vs iptables benchmark, in a QEMU VM (TCG): {services} services x {endpoints} endpoints"
    );
    let t = Instant::now();
    let out = Command::new(tool)
        .args(["--no-demo-bin", "--timeout", "3600", "--mem", "4096"])
        .arg("--run-dir")
        .arg(dir.join("run"))
        .arg("--bin")
        .arg(&exe)
        .arg("--script")
        .arg(&script)
        .output()
        .expect("run tools/ipvs-vm.sh (qemu: tools/ipvs-vm.sh --prepare)");
    let serial = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        eprintln!("{serial}\n{}", String::from_utf8_lossy(&out.stderr));
        panic!("the benchmark VM failed");
    }
    for line in serial.lines() {
        if let Some(rest) = line.strip_prefix("@@IPVSVM BENCH ") {
            let f: Vec<&str> = rest.splitn(4, ' ').collect();
            println!(
                "  {:<9} {:<12} {:>8} s   {}",
                f[0],
                f[1],
                f.get(2).unwrap_or(&""),
                f.get(3).unwrap_or(&"")
            );
        } else if line.starts_with("ipvs table:") {
            println!("  {line}");
        }
    }
    println!("  (VM wall time {:.0} s)", t.elapsed().as_secs_f64());
}
