//! The seed demo: the seed's cluster in network namespaces, programmed by meshlite,
//! reachable by ClusterIP and by DNS name. See `README.md` ("The two commands").

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::cluster::Cluster;
use crate::stack::{Source, Stack, StackConfig, admin_get, metric};

/// The demo's options.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "demo",
    about = "meshlite's seed demo: services programmed into network namespaces, reachable by ClusterIP and by DNS name"
)]
pub struct Options {
    /// Run every step without pausing (also the default when stdin is not a terminal).
    #[arg(long)]
    pub non_interactive: bool,
    /// Leave everything running at the end, print commands to try, and tear down on Ctrl-C.
    #[arg(long)]
    pub keep: bool,
    /// The seed manifests.
    #[arg(long, default_value = "examples/seed")]
    pub seed: PathBuf,
}

/// The DNS service's ClusterIP (like kubeadm's 10.96.0.10, in the test range).
pub const DNS_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const CLUSTER_IP: &str = "198.19.100.100";

/// A check that held or failed; the demo exits 0 only if all held.
#[derive(Debug, Default)]
struct Checks {
    failed: Vec<String>,
    passed: usize,
}

impl Checks {
    fn check(&mut self, ok: bool, what: &str) {
        if ok {
            self.passed += 1;
            println!("  \x1b[32m✓\x1b[0m {what}");
        } else {
            self.failed.push(what.to_string());
            println!("  \x1b[31m✗ {what}\x1b[0m");
        }
    }
}

fn heading(n: &str, title: &str) {
    println!("\n\x1b[1m{n} {title}\x1b[0m");
}

/// Runs a command in a pod's namespace (with its /etc/netns resolv.conf).
fn in_pod(cluster: &Cluster, pod: &str, args: &[&str]) -> Result<String> {
    cluster.exec_in(pod, args)
}

fn curl(cluster: &Cluster, url: &str) -> Result<String> {
    in_pod(cluster, "testpod", &["curl", "-s", "--max-time", "2", url])
}

fn dig_short(cluster: &Cluster, name: &str) -> Result<Vec<String>> {
    let out = in_pod(
        cluster,
        "testpod",
        &["dig", "+short", "+time=1", "+tries=1", name],
    )?;
    let mut v: Vec<String> = out
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    v.sort();
    Ok(v)
}

/// Edits the seed's EndpointSlices: `pods` is (pod name, ip, node) for every webui pod.
fn write_slices(dir: &Path, pods: &[(&str, &str, &str)]) -> Result<()> {
    let mut text = String::from(
        "# webui's endpoints, as the EndpointSlice controller writes them (edited by the demo)\n",
    );
    for svc in ["clusterip-service", "headless-service"] {
        text.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {svc}-webui\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {svc}\naddressType: IPv4\nports:\n  - name: http\n    protocol: TCP\n    port: 80\nendpoints:\n"
        ));
        for (name, ip, node) in pods {
            text.push_str(&format!(
                "  - addresses: [\"{ip}\"]\n    conditions: {{ready: true, serving: true, terminating: false}}\n    nodeName: {node}\n    zone: zone-a\n    targetRef: {{kind: Pod, namespace: default, name: {name}}}\n"
            ));
        }
    }
    let path = dir.join("endpointslices.yaml");
    let tmp = dir.join(".endpointslices.yaml.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, path)?;
    Ok(())
}

const KUBE_DNS: &str =
    "# The cluster DNS service, backed by meshlite's DNS agent (pod meshlite-dns on node2).
apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels: {k8s-app: kube-dns}
spec:
  clusterIP: 198.19.0.10
  ports:
    - {name: dns, protocol: UDP, port: 53}
    - {name: dns-tcp, protocol: TCP, port: 53}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kube-dns-meshlite
  namespace: kube-system
  labels: {kubernetes.io/service-name: kube-dns}
addressType: IPv4
ports:
  - {name: dns, protocol: UDP, port: 53}
  - {name: dns-tcp, protocol: TCP, port: 53}
endpoints:
  - addresses: [\"198.18.2.53\"]
    conditions: {ready: true}
    nodeName: node2
    targetRef: {kind: Pod, namespace: kube-system, name: meshlite-dns}
";

fn pause(interactive: bool) {
    if interactive {
        print!("\x1b[2m  (Enter to continue)\x1b[0m");
        let _ = std::io::stdout().flush();
        let mut s = String::new();
        let _ = std::io::stdin().read_line(&mut s);
    }
}

/// The services table, as `kubectl get svc` prints it, from the manifests.
fn services_table(dir: &Path) -> Result<String> {
    let m = meshlite_k8s::manifests::load_dir(dir, &Default::default())?;
    let mut rows = vec![[
        "NAME".to_string(),
        "TYPE".into(),
        "CLUSTER-IP".into(),
        "PORT(S)".into(),
    ]];
    for o in &m.objects {
        if let meshlite_proto::model::Resource::Service(s) = &o.resource {
            let kind = format!("{:?}", s.kind).replace("ClusterIp", "ClusterIP");
            let ip = if s.headless {
                "None".to_string()
            } else {
                s.cluster_ips
                    .first()
                    .map(ToString::to_string)
                    .unwrap_or_default()
            };
            let ports: Vec<String> = s
                .ports
                .iter()
                .map(|p| format!("{}/{}", p.port, p.protocol))
                .collect();
            rows.push([s.name.clone(), kind, ip, ports.join(",")]);
        }
    }
    let mut w = [0usize; 4];
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    Ok(rows
        .iter()
        .map(|r| {
            format!(
                "  {:<a$}   {:<b$}   {:<c$}   {}",
                r[0],
                r[1],
                r[2],
                r[3],
                a = w[0],
                b = w[1],
                c = w[2]
            )
        })
        .collect::<Vec<_>>()
        .join("\n"))
}

/// Polls two conditions together from now (the manifest write) for up to 5 s;
/// returns when each first held.
async fn follow(
    mut dns: impl FnMut() -> bool,
    mut traffic: impl FnMut() -> bool,
) -> (Option<Duration>, Option<Duration>) {
    let start = Instant::now();
    let (mut d, mut t) = (None, None);
    while start.elapsed() < Duration::from_secs(5) && (d.is_none() || t.is_none()) {
        if d.is_none() && dns() {
            d = Some(start.elapsed());
        }
        if t.is_none() && traffic() {
            t = Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (d, t)
}

/// Sends `n` requests to `url` from testpod; counts which pod served each.
fn spread(cluster: &Cluster, url: &str, n: usize) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for _ in 0..n {
        let body = curl(cluster, url).unwrap_or_default();
        let who = body
            .split_whitespace()
            .next()
            .unwrap_or("(failed)")
            .to_string();
        *out.entry(who).or_default() += 1;
    }
    out
}

async fn network_programming(cluster: &Cluster, stack: &Stack) -> Vec<(String, f64, f64)> {
    let mut v = Vec::new();
    for (node, r) in &stack.node_agents {
        if let Ok((_, body)) = admin_get(cluster, r, "/metrics").await {
            let sum =
                metric(&body, "kubeproxy_network_programming_duration_seconds_sum").unwrap_or(0.0);
            let count = metric(
                &body,
                "kubeproxy_network_programming_duration_seconds_count",
            )
            .unwrap_or(0.0);
            v.push((node.clone(), sum, count));
        }
    }
    v
}

/// Runs the demo. Returns the number of failed checks.
pub async fn run(opts: Options) -> Result<usize> {
    let interactive = !opts.non_interactive && std::io::IsTerminal::is_terminal(&std::io::stdin());
    crate::netns::set_prefix("mldemo");
    let work = tempfile::Builder::new()
        .prefix("meshlite-demo-")
        .tempdir()?;
    let manifests = work.path().join("manifests");
    std::fs::create_dir_all(&manifests)?;
    for f in ["services.yaml", "endpointslices.yaml", "nodes.yaml"] {
        std::fs::copy(opts.seed.join(f), manifests.join(f))
            .with_context(|| format!("copy seed {f} from {}", opts.seed.display()))?;
    }
    std::fs::write(manifests.join("kube-dns.yaml"), KUBE_DNS)?;
    let mut checks = Checks::default();

    println!(
        "\x1b[1mmeshlite demo\x1b[0m — the seed cluster in network namespaces on this machine"
    );
    heading(
        "1.",
        "Cluster: two nodes, three webui pods, a client pod and the DNS pod",
    );
    let mut cluster = Cluster::new(&["node1", "node2"])?;
    let pods = [
        ("webui-5d4f8b7c9-a1b2c", "node1", "198.18.1.1", true),
        ("webui-5d4f8b7c9-d3e4f", "node2", "198.18.2.1", true),
        ("webui-5d4f8b7c9-g5h6i", "node2", "198.18.2.2", true),
        ("testpod", "node1", "198.18.1.10", false),
        ("meshlite-dns", "node2", "198.18.2.53", false),
    ];
    for (name, node, ip, http) in pods {
        cluster.add_pod(name, node, ip.parse()?, http).await?;
    }
    cluster.write_resolv_conf(
        "testpod",
        DNS_IP,
        &[
            "default.svc.cluster.local",
            "svc.cluster.local",
            "cluster.local",
        ],
        5,
    )?;
    println!("  {:<24} {:<8} IP", "NAME", "NODE");
    for p in cluster.pods.values() {
        println!("  {:<24} {:<8} {}", p.name, p.node, p.ip);
    }
    for n in cluster.nodes.values() {
        println!("  {:<24} {:<8} {}", format!("(node {})", n.name), "", n.ip);
    }

    heading(
        "2.",
        "meshlite: control plane on node1, a node agent per node, the DNS agent",
    );
    let started = Instant::now();
    let cfg = StackConfig {
        source: Source::Files(manifests.clone()),
        control_plane_node: "node1".into(),
        dns_pods: vec!["meshlite-dns".into()],
        pod_records: true,
        env: vec![],
        fast: true,
        control_plane_replicas: 1,
        modes: Default::default(),
    };
    let stack = Stack::start(&cluster, &cfg, work.path(), Duration::from_secs(30)).await?;
    for r in stack.all() {
        println!(
            "  {:<28} pid {:<7} in {}",
            r.process.name,
            r.process.pid().unwrap_or(0),
            r.netns
        );
    }
    println!(
        "  all ready in {:.1} s; every stream is mutual TLS with node-scoped certificates",
        started.elapsed().as_secs_f64()
    );
    pause(interactive);

    heading("3.", "Services (kubectl get svc)");
    println!("{}", services_table(&manifests)?);

    println!("\n  iptables -t nat -S on node1, clusterip-service:");
    let rules = cluster.iptables("node1", &["-t", "nat", "-S"])?;
    let svc_chain = rules
        .lines()
        .find(|l| {
            l.contains("default/clusterip-service:http cluster IP") && l.contains("-j KUBE-SVC-")
        })
        .and_then(|l| l.rsplit(' ').next())
        .unwrap_or("")
        .to_string();
    let sep_chains: Vec<String> = rules
        .lines()
        .filter(|l| l.starts_with(&format!("-A {svc_chain} ")) && l.contains("-j KUBE-SEP-"))
        .filter_map(|l| l.rsplit(' ').next().map(String::from))
        .collect();
    // In the order a packet meets them: KUBE-SERVICES, the service chain, the endpoints.
    let mut shown: Vec<&str> = rules
        .lines()
        .filter(|l| l.contains("clusterip-service") && l.starts_with("-A KUBE-SERVICES"))
        .collect();
    if !svc_chain.is_empty() {
        shown.extend(
            rules
                .lines()
                .filter(|l| l.starts_with(&format!("-A {svc_chain} "))),
        );
    }
    for c in &sep_chains {
        shown.extend(rules.lines().filter(|l| l.starts_with(&format!("-A {c} "))));
    }
    for l in &shown {
        println!("    {l}");
    }
    checks.check(
        shown
            .iter()
            .any(|l| l.contains("--probability 0.33333333349"))
            && shown
                .iter()
                .any(|l| l.contains("--probability 0.50000000000")),
        "kube-proxy's chains: KUBE-SVC with probabilities 1/3, 1/2, rest; a DNAT per pod",
    );
    checks.check(
        shown.iter().filter(|l| l.contains("-j DNAT")).count() == 3,
        "three DNAT rules, one per webui pod",
    );
    pause(interactive);

    println!("\n  30 requests from testpod: curl http://clusterip-service/");
    let counts = spread(&cluster, "http://clusterip-service/", 30);
    for (who, n) in &counts {
        println!("    {:<24} {:>3}  {}", who, n, "#".repeat(*n));
    }
    let webui = counts
        .iter()
        .filter(|(k, _)| k.starts_with("webui-"))
        .count();
    checks.check(
        webui == 3 && !counts.contains_key("(failed)"),
        "all 30 answered, every pod served some (by name, via the search path and the DNS service)",
    );

    println!("\n  dig +short headless-service.default.svc.cluster.local (from testpod)");
    let ips = dig_short(&cluster, "headless-service.default.svc.cluster.local")?;
    for ip in &ips {
        println!("    {ip}");
    }
    checks.check(
        ips == ["198.18.1.1", "198.18.2.1", "198.18.2.2"],
        "one A record per ready pod",
    );
    let cip = dig_short(&cluster, "clusterip-service.default.svc.cluster.local")?;
    checks.check(
        cip == [CLUSTER_IP],
        "clusterip-service resolves to its ClusterIP",
    );

    println!("\n  curl http://198-18-1-1.default.pod.cluster.local/ (a pod by its DNS name)");
    let body = curl(&cluster, "http://198-18-1-1.default.pod.cluster.local/")?;
    println!("    {}", body.trim());
    checks.check(
        body.starts_with("webui-5d4f8b7c9-a1b2c"),
        "the pod record resolves and the pod answers",
    );
    pause(interactive);

    heading(
        "4.",
        "Scale webui 3 -> 4 (edit the EndpointSlice manifests), then remove one",
    );
    let before = network_programming(&cluster, &stack).await;
    cluster
        .add_pod(
            "webui-5d4f8b7c9-j7k8l",
            "node1",
            "198.18.1.2".parse()?,
            true,
        )
        .await?;
    let mut webui = vec![
        ("webui-5d4f8b7c9-a1b2c", "198.18.1.1", "node1"),
        ("webui-5d4f8b7c9-d3e4f", "198.18.2.1", "node2"),
        ("webui-5d4f8b7c9-g5h6i", "198.18.2.2", "node2"),
        ("webui-5d4f8b7c9-j7k8l", "198.18.1.2", "node1"),
    ];
    write_slices(&manifests, &webui)?;
    let (t_dns, t_traffic) = follow(
        || {
            dig_short(&cluster, "headless-service.default.svc.cluster.local")
                .is_ok_and(|v| v.len() == 4)
        },
        || {
            curl(&cluster, "http://clusterip-service/")
                .is_ok_and(|b| b.starts_with("webui-5d4f8b7c9-j7k8l"))
        },
    )
    .await;
    report_follow(
        &mut checks,
        "added webui-5d4f8b7c9-j7k8l (198.18.1.2)",
        t_dns,
        t_traffic,
    );

    webui.retain(|p| p.0 != "webui-5d4f8b7c9-d3e4f");
    write_slices(&manifests, &webui)?;
    let (t_dns, t_traffic) = follow(
        || {
            dig_short(&cluster, "headless-service.default.svc.cluster.local")
                .is_ok_and(|v| v.len() == 3 && !v.contains(&"198.18.2.1".to_string()))
        },
        // Traffic has left the removed pod once no rule on either node sends to it.
        || {
            ["node1", "node2"].iter().all(|n| {
                cluster
                    .iptables(n, &["-t", "nat", "-S"])
                    .is_ok_and(|r| !r.contains("198.18.2.1:80"))
            })
        },
    )
    .await;
    report_follow(
        &mut checks,
        "removed webui-5d4f8b7c9-d3e4f (198.18.2.1)",
        t_dns,
        t_traffic,
    );
    let counts = spread(&cluster, "http://clusterip-service/", 30);
    checks.check(
        !counts.contains_key("webui-5d4f8b7c9-d3e4f")
            && !counts.contains_key("(failed)")
            && counts.len() == 3,
        "after the removal: 30 requests, none to the removed pod, none failed",
    );
    let after = network_programming(&cluster, &stack).await;
    println!(
        "  network programming latency (kubeproxy_network_programming_duration_seconds; manifest write -> rules applied):"
    );
    for ((node, s0, c0), (_, s1, c1)) in before.iter().zip(&after) {
        if c1 > c0 {
            println!(
                "    {node}: {:.0} ms mean over {} changes",
                (s1 - s0) / (c1 - c0) * 1000.0,
                c1 - c0
            );
        }
    }
    pause(interactive);

    if opts.keep {
        heading("5.", "Left running. Try, in another terminal:");
        let tp = &cluster.pod("testpod")?.ns.name;
        let n1 = &cluster.node("node1")?.ns.name;
        println!("  ip netns exec {tp} curl http://clusterip-service/");
        println!("  ip netns exec {tp} dig headless-service.default.svc.cluster.local");
        println!("  ip netns exec {n1} iptables-save -t nat | grep clusterip-service");
        println!(
            "  $EDITOR {}/endpointslices.yaml   # the control plane follows edits",
            manifests.display()
        );
        println!(
            "  ip netns exec {n1} curl -s {}/metrics | grep kubeproxy_",
            format_args!("http://{}", stack.node_agents["node1"].admin)
        );
        println!("  Ctrl-C tears everything down.");
        meshlite_runtime::shutdown_signal().await;
    }

    heading("5.", "Teardown");
    let names: Vec<String> = cluster
        .nodes
        .values()
        .map(|n| n.ns.name.clone())
        .chain(cluster.pods.values().map(|p| p.ns.name.clone()))
        .collect();
    let procs = stack.all().len();
    drop(stack);
    drop(cluster);
    let left =
        String::from_utf8_lossy(&Command::new("ip").args(["netns", "list"]).output()?.stdout)
            .into_owned();
    let leftover = names.iter().any(|n| left.contains(n.as_str()));
    checks.check(
        !leftover,
        &format!(
            "stopped {procs} processes and deleted {} namespaces (their rules with them)",
            names.len() + 1
        ),
    );
    drop(work);

    println!();
    if checks.failed.is_empty() {
        println!("\x1b[1;32mPASS\x1b[0m: all {} checks held", checks.passed);
    } else {
        println!(
            "\x1b[1;31mFAIL\x1b[0m: {} of {} checks failed:",
            checks.failed.len(),
            checks.failed.len() + checks.passed
        );
        for f in &checks.failed {
            println!("  - {f}");
        }
    }
    Ok(checks.failed.len())
}

fn report_follow(
    checks: &mut Checks,
    what: &str,
    dns: Option<Duration>,
    traffic: Option<Duration>,
) {
    let ms = |d: Option<Duration>| {
        d.map_or("never (5 s)".to_string(), |d| {
            format!("{} ms", d.as_millis())
        })
    };
    println!(
        "  {what}: DNS followed {} after the manifest write, traffic {}",
        ms(dns),
        ms(traffic)
    );
    checks.check(
        dns.is_some_and(|d| d < Duration::from_secs(1))
            && traffic.is_some_and(|d| d < Duration::from_secs(1)),
        &format!("{what}: traffic and DNS followed within a second"),
    );
}

/// Removes what a previous, killed run left behind: its processes (by PID, found
/// with `ip netns pids`) and its namespaces (prefix `mldemo`).
pub fn cleanup_stale() -> Result<usize> {
    let out = Command::new("ip").args(["netns", "list"]).output()?;
    let mut n = 0;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if !name.starts_with("mldemo") {
            continue;
        }
        let pids = Command::new("ip").args(["netns", "pids", name]).output()?;
        for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
        let _ = Command::new("ip").args(["netns", "del", name]).status();
        let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(name));
        n += 1;
    }
    Ok(n)
}
