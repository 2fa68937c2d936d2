//! The real path: the control-plane binary serving `examples/seed` from files, and
//! the DNS agent binary on 127.0.0.1, queried with the real `dig` over UDP and TCP.
//! A second DNS agent (another cluster domain, forwarding disabled) stands in as the
//! upstream resolver, so forwarding is exercised end to end on loopback too.
//!
//! Needs `dig` (Debian `dnsutils`/`bind9-dnsutils`) and the control-plane binary
//! (`cargo build -p meshlite-control-plane`, or `MESHLITE_CONTROL_PLANE_BIN`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Kills and reaps a child process when dropped.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn control_plane_bin() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("MESHLITE_CONTROL_PLANE_BIN") {
        return Ok(PathBuf::from(p));
    }
    // target/<profile>/deps/real_path-<hash> -> target/<profile>/meshlite-control-plane
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("test binary has no target dir")?;
    let bin = dir.join("meshlite-control-plane");
    if !bin.exists() {
        bail!(
            "missing {}: build it first with `cargo build -p meshlite-control-plane` \
             (or set MESHLITE_CONTROL_PLANE_BIN)",
            bin.display()
        );
    }
    Ok(bin)
}

fn require_dig() {
    let ok = Command::new("dig")
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(
        ok,
        "`dig` is not installed: apt-get install dnsutils (bind9-dnsutils)"
    );
}

fn spawn(bin: &Path, args: &[String], log: PathBuf) -> Result<Proc> {
    let out = std::fs::File::create(&log)?;
    let child = Command::new(bin)
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(out)
        .spawn()
        .with_context(|| format!("spawn {}", bin.display()))?;
    Ok(Proc { child, log })
}

/// Polls until `f` returns `Some`, or fails after `timeout`.
fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("not within {timeout:?}: {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn read_addresses(path: &Path, proc: &Proc) -> Result<serde_json::Value> {
    eventually(
        &format!("{} written (log {})", path.display(), proc.log.display()),
        Duration::from_secs(20),
        || {
            let text = std::fs::read_to_string(path).ok()?;
            serde_json::from_str(&text).ok()
        },
    )
}

fn addr(v: &serde_json::Value, key: &str) -> Result<SocketAddr> {
    v[key]
        .as_str()
        .with_context(|| format!("no {key} in {v}"))?
        .parse()
        .context("address")
}

/// A bare HTTP/1.1 GET: (status, body).
fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let status = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

/// `dig +short`, sorted lines.
fn dig(server: SocketAddr, name: &str, qtype: &str, tcp: bool) -> Vec<String> {
    let mut cmd = Command::new("dig");
    cmd.arg(format!("@{}", server.ip()))
        .arg("-p")
        .arg(server.port().to_string())
        .args(["+short", "+time=1", "+tries=2", name, qtype]);
    if tcp {
        cmd.arg("+tcp");
    }
    let out = cmd.output().expect("dig runs");
    let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .filter(|l| !l.is_empty() && !l.starts_with(';'))
        .collect();
    lines.sort();
    lines
}

/// `dig` status line (`NOERROR`, `NXDOMAIN`, ...) and flags.
fn dig_status(server: SocketAddr, name: &str, qtype: &str) -> (String, String) {
    let out = Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .arg("-p")
        .arg(server.port().to_string())
        .args(["+time=1", "+tries=2", name, qtype])
        .output()
        .expect("dig runs");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let status = text
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("")
        .to_string();
    let flags = text
        .split("flags: ")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .unwrap_or("")
        .to_string();
    (status, flags)
}

fn metric_sum(body: &str, name: &str, label_filter: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(name) && l.contains(label_filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn seed_over_dig_udp_and_tcp_with_live_edits_and_forwarding() -> Result<()> {
    require_dig();
    let cp_bin = control_plane_bin()?;
    let agent_bin = PathBuf::from(env!("CARGO_BIN_EXE_meshlite-dns-agent"));
    let tmp = tempfile::tempdir()?;
    let seed_src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/seed");
    let seed = tmp.path().join("seed");
    std::fs::create_dir(&seed)?;
    for entry in std::fs::read_dir(&seed_src)? {
        let entry = entry?;
        std::fs::copy(entry.path(), seed.join(entry.file_name()))?;
    }

    let cp_addrs = tmp.path().join("cp.json");
    let cp = spawn(
        &cp_bin,
        &[
            format!("--source=file:{}", seed.display()),
            "--listen=127.0.0.1:0".into(),
            "--admin-listen=127.0.0.1:0".into(),
            "--insecure".into(),
            "--file-poll-interval=100ms".into(),
            format!("--addresses-file={}", cp_addrs.display()),
        ],
        tmp.path().join("cp.log"),
    )?;
    let grpc = addr(&read_addresses(&cp_addrs, &cp)?, "grpc")?;

    // The stand-in upstream: same cluster, served under `upstream.test`.
    let up_addrs = tmp.path().join("up.json");
    let upstream = spawn(
        &agent_bin,
        &[
            format!("--control-plane=http://{grpc}"),
            "--insecure".into(),
            "--node-name=dns-upstream".into(),
            "--cluster-domain=upstream.test".into(),
            "--upstream=none".into(),
            "--listen=127.0.0.1:0".into(),
            "--admin-listen=127.0.0.1:0".into(),
            format!("--addresses-file={}", up_addrs.display()),
        ],
        tmp.path().join("upstream.log"),
    )?;
    let up = read_addresses(&up_addrs, &upstream)?;
    let (up_dns, up_admin) = (addr(&up, "dns")?, addr(&up, "admin")?);

    let agent_addrs = tmp.path().join("agent.json");
    let agent = spawn(
        &agent_bin,
        &[
            format!("--control-plane={grpc}"),
            "--insecure".into(),
            "--node-name=dns-test".into(),
            "--pod-records=insecure".into(),
            format!("--upstream={up_dns}"),
            "--service-cidr=198.19.0.0/16".into(),
            "--pod-cidr=198.18.0.0/16".into(),
            "--udp-workers=2".into(),
            "--listen=127.0.0.1:0".into(),
            "--admin-listen=127.0.0.1:0".into(),
            format!("--addresses-file={}", agent_addrs.display()),
        ],
        tmp.path().join("agent.log"),
    )?;
    let a = read_addresses(&agent_addrs, &agent)?;
    let (dns, admin) = (addr(&a, "dns")?, addr(&a, "admin")?);

    for (what, adm, log) in [
        ("agent", admin, &agent.log),
        ("upstream agent", up_admin, &upstream.log),
    ] {
        eventually(
            &format!("{what} /readyz 200 (log {})", log.display()),
            Duration::from_secs(20),
            || (http_get(adm, "/readyz")?.0 == 200).then_some(()),
        )?;
    }

    let headless = "headless-service.default.svc.cluster.local";
    let pods = vec!["198.18.1.1", "198.18.2.1", "198.18.2.2"];
    for tcp in [false, true] {
        assert_eq!(dig(dns, headless, "A", tcp), pods, "tcp={tcp}");
        assert_eq!(
            dig(dns, "clusterip-service.default.svc.cluster.local", "A", tcp),
            vec!["198.19.100.100"],
            "tcp={tcp}"
        );
        assert_eq!(
            dig(dns, "198-18-2-1.default.pod.cluster.local", "A", tcp),
            vec!["198.18.2.1"],
            "tcp={tcp}"
        );
    }
    assert_eq!(
        dig(
            dns,
            "_http._tcp.clusterip-service.default.svc.cluster.local",
            "SRV",
            false
        ),
        vec!["0 100 80 clusterip-service.default.svc.cluster.local."]
    );
    assert_eq!(
        dig(dns, "100.100.19.198.in-addr.arpa", "PTR", false),
        vec!["clusterip-service.default.svc.cluster.local."]
    );
    assert_eq!(
        dig(dns, "dns-version.cluster.local", "TXT", false),
        vec!["\"1.1.0\""]
    );
    let (status, flags) = dig_status(dns, "missing.default.svc.cluster.local", "A");
    assert_eq!(status, "NXDOMAIN");
    assert!(flags.contains("aa"), "{flags}");
    assert_eq!(
        dig_status(dns, "default.svc.cluster.local", "A").0,
        "NOERROR"
    );

    // Forwarded: a name outside cluster.local, answered by the upstream agent.
    let fwd = "clusterip-service.default.svc.upstream.test";
    for _ in 0..3 {
        assert_eq!(dig(dns, fwd, "A", false), vec!["198.19.100.100"]);
    }
    let (status, flags) = dig_status(dns, "nope.svc.upstream.test", "A");
    assert_eq!(status, "NXDOMAIN");
    assert!(!flags.contains("aa") && flags.contains("ra"), "{flags}");
    let (_, metrics) = http_get(admin, "/metrics").context("agent metrics")?;
    assert!(
        metric_sum(&metrics, "coredns_cache_hits_total", "") >= 2.0,
        "{metrics}"
    );
    assert!(metric_sum(&metrics, "coredns_forward_requests_total", "") >= 2.0);
    assert!(
        metric_sum(
            &metrics,
            "coredns_forward_responses_total",
            &format!("to=\"{up_dns}\"")
        ) >= 2.0,
        "{metrics}"
    );
    assert!(
        metric_sum(
            &metrics,
            "coredns_dns_responses_total",
            "rcode=\"NXDOMAIN\""
        ) >= 1.0
    );
    assert!(metric_sum(&metrics, "meshlite_dns_zone_records", "") > 0.0);
    for series in [
        "coredns_dns_requests_total{",
        "coredns_dns_response_size_bytes_count{",
        "coredns_dns_request_size_bytes_count{",
        "coredns_dns_request_duration_seconds_bucket{",
        "coredns_forward_request_duration_seconds_bucket{",
        "coredns_build_info{",
        "coredns_panics_total",
        "meshlite_dns_update_apply_duration_seconds_count",
        "coredns_cache_entries{",
        "meshlite_dns_truncated_total",
    ] {
        assert!(metrics.contains(series), "{series} missing from /metrics");
    }
    // The upstream never saw a cluster.local name: it would have REFUSED it.
    let (_, up_metrics) = http_get(up_admin, "/metrics").context("upstream metrics")?;
    assert_eq!(
        metric_sum(
            &up_metrics,
            "coredns_dns_responses_total",
            "rcode=\"REFUSED\""
        ),
        0.0,
        "{up_metrics}"
    );
    assert!(metric_sum(&up_metrics, "coredns_dns_responses_total", "rcode=") >= 2.0);

    // CoreDNS's probe paths.
    assert_eq!(http_get(admin, "/health"), Some((200, "OK".into())));
    assert_eq!(http_get(admin, "/ready"), Some((200, "OK".into())));

    // Two UDP workers: clients from many source ports reach both sockets.
    let query = dns_query("clusterip-service.default.svc.cluster.local");
    for i in 0..64 {
        let s = std::net::UdpSocket::bind("127.0.0.1:0")?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.send_to(&query, dns)?;
        let mut buf = [0u8; 512];
        let (n, _) = s
            .recv_from(&mut buf)
            .with_context(|| format!("query {i} unanswered"))?;
        assert!(n > 12 && buf[..2] == query[..2], "query {i}: bad answer");
    }
    let (_, metrics) = http_get(admin, "/metrics").context("agent metrics")?;
    for worker in ["0", "1"] {
        assert!(
            metric_sum(
                &metrics,
                "meshlite_dns_udp_worker_requests_total",
                &format!("worker=\"{worker}\"")
            ) > 0.0,
            "worker {worker} received nothing:\n{metrics}"
        );
    }

    // A request from source port 0 is dropped unanswered (and counted).
    let answered_before = metric_sum(&metrics, "coredns_dns_requests_total", "");
    send_from_port_zero(dns, &query)?;
    eventually(
        "the port-0 request counted as refused",
        Duration::from_secs(5),
        || {
            let (_, m) = http_get(admin, "/metrics")?;
            (metric_sum(&m, "meshlite_dns_udp_refused_total", "reason=\"port_zero\"") == 1.0)
                .then_some(())
        },
    )?;
    let (_, metrics) = http_get(admin, "/metrics").context("agent metrics")?;
    assert_eq!(
        metric_sum(&metrics, "coredns_dns_requests_total", ""),
        answered_before,
        "the port-0 request was answered"
    );

    // Edit the headless EndpointSlice: 198.18.2.2 goes away; visible within 1 s.
    let slices = seed.join("endpointslices.yaml");
    let text = std::fs::read_to_string(&slices)?;
    let (clusterip_part, headless_part) = text
        .split_once("---")
        .context("two documents in endpointslices.yaml")?;
    let edited_headless = remove_endpoint(headless_part, "198.18.2.2")?;
    let tmp_file = seed.join(".endpointslices.yaml.tmp");
    std::fs::write(&tmp_file, format!("{clusterip_part}---{edited_headless}"))?;
    let edited_at = Instant::now();
    std::fs::rename(&tmp_file, &slices)?;
    let took = eventually(
        &format!(
            "edit visible (logs {} {})",
            cp.log.display(),
            agent.log.display()
        ),
        Duration::from_secs(1),
        || {
            (dig(dns, headless, "A", false) == ["198.18.1.1", "198.18.2.1"])
                .then(|| edited_at.elapsed())
        },
    )?;
    eprintln!("EndpointSlice edit visible in DNS after {took:?}");
    assert_eq!(
        dig(dns, headless, "A", true),
        vec!["198.18.1.1", "198.18.2.1"]
    );
    // The ClusterIP service's answer did not move.
    assert_eq!(
        dig(
            dns,
            "clusterip-service.default.svc.cluster.local",
            "A",
            false
        ),
        vec!["198.19.100.100"]
    );
    drop(agent);
    drop(upstream);
    drop(cp);
    Ok(())
}

/// A DNS query for `name` A, id 0x4d4c.
fn dns_query(name: &str) -> Vec<u8> {
    let mut q = vec![0x4d, 0x4c, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(u8::try_from(label.len()).expect("short label"));
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// Sends `payload` to `to` (IPv4 loopback) in a UDP datagram whose source port is
/// 0, through a raw socket (needs CAP_NET_RAW: the tests run as root).
fn send_from_port_zero(to: SocketAddr, payload: &[u8]) -> Result<()> {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let raw = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::UDP))
        .context("raw socket (needs root / CAP_NET_RAW)")?;
    let len = u16::try_from(8 + payload.len())?;
    let mut datagram = Vec::with_capacity(usize::from(len));
    datagram.extend_from_slice(&0u16.to_be_bytes()); // source port 0
    datagram.extend_from_slice(&to.port().to_be_bytes());
    datagram.extend_from_slice(&len.to_be_bytes());
    datagram.extend_from_slice(&0u16.to_be_bytes()); // no checksum (IPv4 allows it)
    datagram.extend_from_slice(payload);
    raw.send_to(&datagram, &SockAddr::from(SocketAddr::new(to.ip(), 0)))
        .context("raw send")?;
    Ok(())
}

/// Drops the endpoint entry (a `- addresses: [...]` item with its nested lines) that
/// holds `ip` from one EndpointSlice YAML document.
fn remove_endpoint(doc: &str, ip: &str) -> Result<String> {
    let lines: Vec<&str> = doc.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.contains("addresses:") && l.contains(ip))
        .with_context(|| format!("no endpoint with {ip}"))?;
    let indent = lines[start].len() - lines[start].trim_start().len();
    let mut end = start + 1;
    while end < lines.len() {
        let l = lines[end];
        let i = l.len() - l.trim_start().len();
        if l.trim().is_empty() || i <= indent {
            break;
        }
        end += 1;
    }
    let mut out: Vec<&str> = lines[..start].to_vec();
    out.extend(&lines[end..]);
    Ok(out.join("\n") + "\n")
}

#[test]
fn check_config_prints_and_invalid_config_exits_64() {
    let bin = env!("CARGO_BIN_EXE_meshlite-dns-agent");
    let ok = Command::new(bin)
        .args([
            "--check-config",
            "--control-plane=127.0.0.1:1",
            "--insecure",
            "--upstream=127.0.0.1:5300",
            "--tls-server-name=ignored",
        ])
        .env_remove("MESHLITE_UPSTREAM")
        .output()
        .expect("run");
    assert!(ok.status.success(), "{ok:?}");
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(
        text.contains("cluster.local") && text.contains("127.0.0.1:5300"),
        "{text}"
    );
    // Every flag reads its environment variable.
    let env = Command::new(bin)
        .arg("--check-config")
        .env("MESHLITE_CONTROL_PLANE", "127.0.0.1:1")
        .env("MESHLITE_INSECURE", "true")
        .env("MESHLITE_UPSTREAM", "none")
        .env("MESHLITE_CLUSTER_DOMAIN", "example.internal")
        .env("MESHLITE_TTL", "7")
        .output()
        .expect("run");
    assert!(env.status.success(), "{env:?}");
    // The validated configuration, as JSON.
    let printed: serde_json::Value = serde_json::from_slice(&env.stdout).expect("JSON");
    assert_eq!(printed["zone"]["domain"], "example.internal");
    assert_eq!(printed["zone"]["ttl"], 7);
    assert_eq!(
        printed["forward"],
        serde_json::Value::Null,
        "--upstream none"
    );
    // Certificates are not read by --check-config.
    let tls = Command::new(bin)
        .args([
            "--check-config",
            "--control-plane=https://cp:443",
            "--tls-cert=/nonexistent/c.pem",
            "--tls-key=/nonexistent/k.pem",
            "--ca=/nonexistent/ca.pem",
            "--upstream=none",
        ])
        .output()
        .expect("run");
    assert!(tls.status.success(), "{tls:?}");
    for bad in [
        vec!["--control-plane=x:1"],
        vec!["--control-plane=x:1", "--insecure", "--ttl=abc"],
        vec!["--control-plane=x:1", "--insecure", "--pod-records=maybe"],
        vec!["--control-plane=x:1", "--insecure", "--service-cidr=1.2.3"],
    ] {
        let out = Command::new(bin).args(&bad).output().expect("run");
        assert_eq!(out.status.code(), Some(64), "{bad:?}: {out:?}");
    }
}

#[test]
fn mutual_tls_to_the_control_plane() -> Result<()> {
    require_dig();
    let cp_bin = control_plane_bin()?;
    let agent_bin = PathBuf::from(env!("CARGO_BIN_EXE_meshlite-dns-agent"));
    let tmp = tempfile::tempdir()?;
    let seed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/seed");
    let pki = meshlite_runtime::testing::TestPki::new("meshlite-test-ca");
    let server = pki.server();
    // The control plane admits DNS agents by the `dns-agent` SAN.
    let client = pki.client("dns-test", &["dns-agent"]);

    let cp_addrs = tmp.path().join("cp.json");
    let cp = spawn(
        &cp_bin,
        &[
            format!("--source=file:{}", seed.display()),
            "--listen=127.0.0.1:0".into(),
            "--admin-listen=127.0.0.1:0".into(),
            format!("--tls-cert={}", server.cert.display()),
            format!("--tls-key={}", server.key.display()),
            format!("--tls-ca={}", server.client_ca.display()),
            format!("--addresses-file={}", cp_addrs.display()),
        ],
        tmp.path().join("cp.log"),
    )?;
    let grpc = addr(&read_addresses(&cp_addrs, &cp)?, "grpc")?;

    let agent_addrs = tmp.path().join("agent.json");
    let agent = spawn(
        &agent_bin,
        &[
            format!("--control-plane=https://{grpc}"),
            format!("--tls-cert={}", client.cert.display()),
            format!("--tls-key={}", client.key.display()),
            format!("--ca={}", client.ca.display()),
            "--tls-server-name=localhost".into(),
            "--node-name=dns-test".into(),
            "--upstream=none".into(),
            "--listen=127.0.0.1:0".into(),
            "--admin-listen=127.0.0.1:0".into(),
            format!("--addresses-file={}", agent_addrs.display()),
        ],
        tmp.path().join("agent.log"),
    )?;
    let a = read_addresses(&agent_addrs, &agent)?;
    let (dns, admin) = (addr(&a, "dns")?, addr(&a, "admin")?);
    eventually(
        &format!(
            "/readyz over mTLS (logs {} {})",
            cp.log.display(),
            agent.log.display()
        ),
        Duration::from_secs(20),
        || (http_get(admin, "/readyz")?.0 == 200).then_some(()),
    )?;
    assert_eq!(
        dig(
            dns,
            "clusterip-service.default.svc.cluster.local",
            "A",
            false
        ),
        vec!["198.19.100.100"]
    );

    // A certificate from the right CA for another role (a node agent's) is refused:
    // that agent never turns ready.
    let stranger = pki.client("node1", &["node1.nodes.meshlite"]);
    let bad_addrs = tmp.path().join("bad.json");
    let bad = spawn(
        &agent_bin,
        &[
            format!("--control-plane=https://{grpc}"),
            format!("--tls-cert={}", stranger.cert.display()),
            format!("--tls-key={}", stranger.key.display()),
            format!("--ca={}", client.ca.display()),
            "--tls-server-name=localhost".into(),
            "--node-name=dns-stranger".into(),
            "--upstream=none".into(),
            "--listen=127.0.0.1:0".into(),
            "--admin-listen=127.0.0.1:0".into(),
            format!("--addresses-file={}", bad_addrs.display()),
        ],
        tmp.path().join("bad.log"),
    )?;
    let b = read_addresses(&bad_addrs, &bad)?;
    let bad_admin = addr(&b, "admin")?;
    // Give it the time a good agent needed many times over, then check it is not ready.
    let refused = eventually(
        "the stranger's connection attempts are logged",
        Duration::from_secs(10),
        || {
            let log = std::fs::read_to_string(&bad.log).ok()?;
            log.contains("reconnecting").then_some(())
        },
    );
    assert!(refused.is_ok(), "log {}", bad.log.display());
    assert_eq!(http_get(bad_admin, "/readyz").map(|r| r.0), Some(503));
    Ok(())
}
