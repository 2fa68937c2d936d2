//! DNS agent vs Knot DNS under dnsperf, on loopback: each server with one UDP worker
//! pinned to one core, then with two UDP workers on two cores.
//!
//! The cluster (10k services, 1k of them headless with 10 ready endpoints) is written
//! as manifests for the control plane's file source; the Knot zone file is exported
//! from the agent's own zone built from the same resources, so both serve the same
//! records. Query mix, equal parts: ClusterIP A, headless A, SRV, NXDOMAIN.
//!
//! Two passes per server: a throughput pass (`dnsperf -c 8`, bounded by `-l`) for
//! QPS, and a fixed-rate pass (`-Q`, `-v`) whose per-query latencies give
//! percentiles. Prints both servers side by side and the agent's resident memory.
//!
//! Needs `dnsperf`, `knotd` (Debian `dnsperf`, `knot`), `taskset` and release builds:
//! `cargo build --release -p meshlite-control-plane` then
//! `cargo bench -p meshlite-dns-agent --bench dnsperf`. Knobs (env): BENCH_SECONDS
//! (default 10), BENCH_RATE (fixed-rate pass, default 20000), BENCH_SERVER_CPU (1),
//! BENCH_CLIENT_CPU (0), BENCH_WIDE_CPUS (the two-worker runs' CPUs for server and
//! client alike, default `0,1`).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use meshlite_dns_agent::fixtures;
use meshlite_dns_agent::zone::{PodRecords, ServiceKind, Zone, ZoneConfig};
use meshlite_proto::model::Resource;
use meshlite_runtime::Snapshot;

const SERVICES: usize = 10_000;
const HEADLESS: usize = 1_000;
const ENDPOINTS: usize = 10;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn require(tool: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(found, "`{tool}` is missing: apt-get install {package}");
}

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "not within {timeout:?}: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn free_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let port = s.local_addr().expect("addr").port();
    // TCP too, for Knot's listener.
    drop(s);
    port
}

/// Kubernetes manifests of the benchmark cluster, for `--source file:`.
fn write_manifests(dir: &Path, resources: &[Resource]) {
    let mut svc = String::new();
    let mut eps = String::new();
    for r in resources {
        match r {
            Resource::Service(s) => {
                let ip = s
                    .cluster_ips
                    .first()
                    .map_or("None".to_string(), |ip| ip.to_string());
                let _ = write!(
                    svc,
                    "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {}, namespace: {}}}\n\
                     spec:\n  clusterIP: {ip}\n  clusterIPs: [\"{ip}\"]\n  selector: {{app: {}}}\n  \
                     ports: [{{name: http, protocol: TCP, port: 80, targetPort: 8080}}]\n",
                    s.name, s.namespace, s.name
                );
            }
            Resource::EndpointSlice(s) => {
                let _ = write!(
                    eps,
                    "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                     metadata:\n  name: {}\n  namespace: {}\n  labels: {{kubernetes.io/service-name: {}}}\n\
                     addressType: IPv4\nports: [{{name: http, protocol: TCP, port: 8080}}]\nendpoints:\n",
                    s.name, s.namespace, s.service_name
                );
                for e in &s.endpoints {
                    let _ = writeln!(
                        eps,
                        "  - addresses: [\"{}\"]\n    conditions: {{ready: true, serving: true, terminating: false}}",
                        e.addresses[0]
                    );
                }
            }
            Resource::Node(_) => {}
        }
    }
    std::fs::write(dir.join("services.yaml"), svc).expect("write services");
    std::fs::write(dir.join("endpointslices.yaml"), eps).expect("write slices");
}

/// The same records as the agent serves, as a zone file for Knot.
fn knot_zone(zone: &Zone) -> String {
    let d = "cluster.local.";
    let mut z = format!(
        "$ORIGIN {d}\n$TTL 30\n@ SOA ns.dns.{d} hostmaster.{d} 1 7200 1800 86400 30\n@ NS ns.dns.{d}\n\
         dns-version TXT \"1.1.0\"\n"
    );
    for s in zone.all_services() {
        let base = format!("{}.{}.svc.{d}", s.name, s.namespace);
        if matches!(s.kind, ServiceKind::ExternalName(_)) || !s.exists() {
            continue;
        }
        for ip in &s.addresses {
            let t = if ip.is_ipv4() { "A" } else { "AAAA" };
            let _ = writeln!(z, "{base} {t} {ip}");
        }
        for (label, ips) in &s.endpoints {
            for ip in ips {
                let t = if ip.is_ipv4() { "A" } else { "AAAA" };
                let _ = writeln!(z, "{label}.{base} {t} {ip}");
            }
        }
        for set in &s.srv {
            if set.port_name.is_empty() {
                continue;
            }
            let w = 100 / set.records.len().max(1);
            for r in &set.records {
                let target = match &r.endpoint {
                    None => base.clone(),
                    Some(l) => format!("{l}.{base}"),
                };
                let _ = writeln!(
                    z,
                    "_{}._{}.{base} SRV 0 {w} {} {target}",
                    set.port_name,
                    set.protocol.as_lower(),
                    r.port
                );
            }
        }
    }
    z
}

/// 40k queries, shuffled deterministically: ClusterIP A, headless A, SRV, NXDOMAIN.
fn queries() -> String {
    let mut state = 0x2545_F491_4F6C_DD1D_u64;
    let mut rnd = |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    };
    let mut out = String::new();
    for i in 0..40_000 {
        let line = match i % 4 {
            0 => {
                let s = HEADLESS + rnd(SERVICES - HEADLESS);
                format!("svc-{s}.ns-{}.svc.cluster.local A", s % 10)
            }
            1 => {
                let s = rnd(HEADLESS);
                format!("svc-{s}.ns-{}.svc.cluster.local A", s % 10)
            }
            2 => {
                let s = rnd(SERVICES);
                format!("_http._tcp.svc-{s}.ns-{}.svc.cluster.local SRV", s % 10)
            }
            _ => {
                let s = rnd(SERVICES);
                format!("nope-{s}.ns-{}.svc.cluster.local A", s % 10)
            }
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// One row of the table: a figure of each run, formatted.
type Column = fn(&Figures) -> String;

#[derive(Debug, Default)]
struct Figures {
    qps: f64,
    avg_ms: f64,
    lost: String,
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

fn dnsperf(server: SocketAddr, queries: &Path, cpu: &str, extra: &[&str], verbose: bool) -> String {
    let port = server.port().to_string();
    let seconds = env_or("BENCH_SECONDS", 10u64).to_string();
    let qfile = queries.display().to_string();
    let mut args = vec![
        "-c",
        cpu,
        "dnsperf",
        "-s",
        "127.0.0.1",
        "-p",
        &port,
        "-d",
        &qfile,
        "-l",
        &seconds,
        "-t",
        "2",
    ];
    args.extend_from_slice(extra);
    if verbose {
        args.push("-v");
    }
    let out = Command::new("taskset")
        .args(&args)
        .output()
        .expect("dnsperf runs");
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn field(text: &str, key: &str) -> Option<String> {
    text.lines()
        .find(|l| l.trim_start().starts_with(key))
        .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
}

fn measure(server: SocketAddr, queries: &Path, cpu: &str) -> Figures {
    // Warm up (caches, first-touch allocations), then the throughput pass.
    dnsperf(
        server,
        queries,
        cpu,
        &["-c", "8", "-q", "200", "-n", "1", "-l", "3"],
        false,
    );
    let text = dnsperf(server, queries, cpu, &["-c", "8", "-q", "200"], false);
    let mut f = Figures {
        qps: field(&text, "Queries per second")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0),
        avg_ms: field(&text, "Average Latency (s)")
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(0.0, |s| s * 1e3),
        lost: field(&text, "Queries lost").unwrap_or_default(),
        ..Figures::default()
    };
    // Fixed-rate pass: per-query latencies from verbose lines ("> NOERROR name A 0.000123").
    let rate = env_or("BENCH_RATE", 20_000u32).to_string();
    let text = dnsperf(server, queries, cpu, &["-c", "8", "-Q", &rate], true);
    let mut lat: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with('>'))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .collect();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        if lat.is_empty() {
            return 0.0;
        }
        let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[i] * 1e3
    };
    f.p50 = pct(0.50);
    f.p90 = pct(0.90);
    f.p99 = pct(0.99);
    f.p999 = pct(0.999);
    f.max = lat.last().copied().unwrap_or(0.0) * 1e3;
    f
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn http_ready(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(
        s,
        "GET /readyz HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n"
    )
    .is_err()
    {
        return false;
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.starts_with("HTTP/1.1 200")
}

fn read_json_addr(path: &Path, key: &str) -> Option<SocketAddr> {
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v[key].as_str()?.parse().ok()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    for (tool, pkg) in [
        ("dnsperf", "dnsperf"),
        ("knotd", "knot"),
        ("taskset", "util-linux"),
    ] {
        require(tool, pkg);
    }
    let release = PathBuf::from(env!("CARGO_BIN_EXE_meshlite-dns-agent"));
    let cp_bin = release
        .parent()
        .expect("target dir")
        .join("meshlite-control-plane");
    assert!(
        cp_bin.exists(),
        "missing {}: cargo build --release -p meshlite-control-plane",
        cp_bin.display()
    );
    let server_cpu = env_or("BENCH_SERVER_CPU", 1u32).to_string();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();

    // Data: manifests, the same zone for Knot, queries.
    let resources = fixtures::large_resources(SERVICES, HEADLESS, ENDPOINTS);
    let manifests = dir.join("cluster");
    std::fs::create_dir(&manifests).expect("mkdir");
    write_manifests(&manifests, &resources);
    let zone = Zone::build(
        ZoneConfig {
            domain: "cluster.local".into(),
            ttl: 30,
            pod_records: PodRecords::Disabled,
            reverse_cidrs: vec![],
        },
        &Snapshot::from_resources(resources),
    );
    std::fs::write(dir.join("cluster.local.zone"), knot_zone(&zone)).expect("zone file");
    let qfile = dir.join("queries.txt");
    std::fs::write(&qfile, queries()).expect("queries");

    // The agent, pinned to one core, fed by the control plane. The control plane
    // shares the client's core: its manifest polls must not preempt the server
    // being measured.
    let cp_addrs = dir.join("cp.json");
    let client_cpu = env_or("BENCH_CLIENT_CPU", 0u32).to_string();
    let _cp = Proc(
        Command::new("taskset")
            .args([
                "-c",
                &client_cpu,
                cp_bin.to_str().expect("utf-8 path"),
                &format!("--source=file:{}", manifests.display()),
                "--listen=127.0.0.1:0",
                "--admin-listen=127.0.0.1:0",
                "--insecure",
                &format!("--addresses-file={}", cp_addrs.display()),
            ])
            .env("RUST_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .expect("control plane"),
    );
    let grpc = wait_for("control plane address", Duration::from_secs(30), || {
        read_json_addr(&cp_addrs, "grpc")
    });
    let wide = std::env::var("BENCH_WIDE_CPUS").unwrap_or_else(|_| "0,1".into());
    let setups = [
        (1u32, server_cpu.as_str(), client_cpu.as_str()),
        (2, &wide, &wide),
    ];
    let mut ours = Vec::new();
    let mut rss = (0, 0);
    for (workers, cpus, client) in setups {
        let (f, idle, loaded) = run_agent(&release, grpc, dir, workers, cpus, client, &qfile);
        if workers == 1 {
            rss = (idle, loaded);
        }
        ours.push(f);
    }
    std::fs::create_dir(dir.join("knot")).expect("mkdir");
    let theirs: Vec<Figures> = setups
        .iter()
        .map(|(workers, cpus, client)| run_knot(dir, *workers, cpus, client, &qfile))
        .collect();

    println!(
        "\ndnsperf on loopback; 1 worker: server on CPU {server_cpu}, client on CPU {client_cpu}; \
         2 workers: server and client on CPUs {wide}; \
         {SERVICES} services ({HEADLESS} headless x {ENDPOINTS} endpoints, {} records); \
         mix: ClusterIP A / headless A / SRV / NXDOMAIN",
        zone.record_count()
    );
    println!(
        "{:<34} {:>12} {:>12} {:>12} {:>12}",
        "", "agent 1 udp", "knot 1 udp", "agent 2 udp", "knot 2 udp"
    );
    let rate = env_or("BENCH_RATE", 20_000u32);
    let rows: [(String, Column); 8] = [
        ("throughput (QPS, -c 8)".into(), |f| format!("{:.0}", f.qps)),
        ("  avg latency at max (ms)".into(), |f| {
            format!("{:.3}", f.avg_ms)
        }),
        ("  queries lost".into(), |f| f.lost.clone()),
        (format!("p50 latency at {rate} QPS (ms)"), |f| {
            format!("{:.3}", f.p50)
        }),
        ("p90 (ms)".into(), |f| format!("{:.3}", f.p90)),
        ("p99 (ms)".into(), |f| format!("{:.3}", f.p99)),
        ("p99.9 (ms)".into(), |f| format!("{:.3}", f.p999)),
        ("max (ms)".into(), |f| format!("{:.3}", f.max)),
    ];
    for (name, get) in rows {
        println!(
            "{name:<34} {:>12} {:>12} {:>12} {:>12}",
            get(&ours[0]),
            get(&theirs[0]),
            get(&ours[1]),
            get(&theirs[1])
        );
    }
    println!(
        "meshlite-dns-agent RSS (1 worker): {:.1} MiB after the first snapshot, {:.1} MiB after the runs",
        rss.0 as f64 / 1024.0,
        rss.1 as f64 / 1024.0
    );
}

/// The agent with `workers` UDP workers on `cpus`, fed by the control plane at
/// `grpc`: its figures and its RSS before and after.
fn run_agent(
    release: &Path,
    grpc: SocketAddr,
    dir: &Path,
    workers: u32,
    cpus: &str,
    client: &str,
    qfile: &Path,
) -> (Figures, u64, u64) {
    let agent_addrs = dir.join(format!("agent-{workers}.json"));
    let agent = Proc(
        Command::new("taskset")
            .args([
                "-c",
                cpus,
                release.to_str().expect("utf-8 path"),
                &format!("--control-plane={grpc}"),
                "--insecure",
                &format!("--node-name=bench-{workers}"),
                "--upstream=none",
                &format!("--udp-workers={workers}"),
                "--listen=127.0.0.1:0",
                "--admin-listen=127.0.0.1:0",
                &format!("--addresses-file={}", agent_addrs.display()),
            ])
            .env("RUST_LOG", "warn")
            // The runtime only carries TCP, the admin port and the stream here.
            .env("TOKIO_WORKER_THREADS", "1")
            .stderr(Stdio::null())
            .spawn()
            .expect("agent"),
    );
    let (dns, admin) = wait_for("agent addresses", Duration::from_secs(30), || {
        Some((
            read_json_addr(&agent_addrs, "dns")?,
            read_json_addr(&agent_addrs, "admin")?,
        ))
    });
    wait_for("agent ready", Duration::from_secs(60), || {
        http_ready(admin).then_some(())
    });
    let idle = rss_kib(agent.0.id());
    let f = measure(dns, qfile, client);
    let loaded = rss_kib(agent.0.id());
    (f, idle, loaded)
}

/// Knot with `workers` UDP workers on `cpus`, serving the exported zone.
fn run_knot(dir: &Path, workers: u32, cpus: &str, client: &str, qfile: &Path) -> Figures {
    let port = free_port();
    let conf = dir.join(format!("knot-{workers}.conf"));
    std::fs::write(
        &conf,
        format!(
            "server:\n    listen: 127.0.0.1@{port}\n    udp-workers: {workers}\n    tcp-workers: 1\n    \
             background-workers: 1\n    rundir: {d}/knot\n\ndatabase:\n    storage: {d}/knot\n\n\
             log:\n  - target: stderr\n    any: warning\n\nzone:\n  - domain: cluster.local\n    \
             file: {d}/cluster.local.zone\n    journal-content: none\n    zonefile-sync: -1\n",
            d = dir.display()
        ),
    )
    .expect("knot.conf");
    let _knot = Proc(
        Command::new("taskset")
            .args(["-c", cpus, "knotd", "-c", conf.to_str().expect("utf-8")])
            .stderr(Stdio::null())
            .spawn()
            .expect("knotd"),
    );
    wait_for("knot answers", Duration::from_secs(30), || {
        let out = Command::new("dig")
            .args([
                "@127.0.0.1",
                "-p",
                &port.to_string(),
                "+short",
                "+time=1",
                "+tries=1",
                "svc-0.ns-0.svc.cluster.local",
                "A",
            ])
            .output()
            .ok()?;
        (!out.stdout.is_empty()).then_some(())
    });
    measure(([127, 0, 0, 1], port).into(), qfile, client)
}
