//! The whole-system lab shared by the end-to-end and fault suites: two nodes (node1's
//! agent in iptables mode, node2's in nftables mode), three web pods, a client pod
//! on each node, two DNS pods, an off-cluster client, the API stand-in as the
//! control plane's source (inside node1), and meshlite's three binaries.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::apiserver::ApiServer;
use crate::cluster::Cluster;
use crate::stack::{ProxyMode, Source, Stack, StackConfig};

/// Generous bound for anything to happen in the lab.
pub const T: Duration = Duration::from_secs(30);
/// The DNS service's ClusterIP.
pub const DNS_IP: &str = "198.19.0.10";
/// The node whose agent runs in nftables mode; the other runs in iptables mode.
pub const NFT_NODE: &str = "node2";
/// Each node's client pod: its requests go through that node's rules.
pub const CLIENTS: [(&str, &str); 2] = [("node1", "testpod"), ("node2", "testpod2")];

/// See the module docs.
pub struct System {
    pub cluster: Cluster,
    pub api: ApiServer,
    pub stack: Stack,
    _dir: tempfile::TempDir,
}

/// An EndpointSlice for `svc` with (ip, node, ready) endpoints on port 80.
pub fn webui_slice(svc: &str, eps: &[(&str, &str, bool)]) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {svc}-abc\n  namespace: default\n  labels: {{kubernetes.io/service-name: {svc}}}\naddressType: IPv4\nports: [{{name: http, port: 80, protocol: TCP}}]\nendpoints:\n"
    );
    for (ip, node, ready) in eps {
        s.push_str(&format!(
            "- addresses: [\"{ip}\"]\n  conditions: {{ready: {ready}, serving: {ready}, terminating: false}}\n  nodeName: {node}\n"
        ));
    }
    s
}

/// Builds the lab and starts meshlite in it (namespaces prefixed `prefix`).
///
/// # Panics
/// When not root or a tool is missing, with a message saying what.
pub async fn system(prefix: &str) -> System {
    system_with_replicas(prefix, 1).await
}

/// [`system`] with `replicas` control planes behind one address (see
/// [`StackConfig::control_plane_replicas`]).
///
/// # Panics
/// As [`system`].
#[allow(clippy::unwrap_used, clippy::expect_used)] // a test harness: failures are test failures
pub async fn system_with_replicas(prefix: &str, replicas: usize) -> System {
    meshlite_runtime::tls::install_default_provider();
    crate::netns::set_prefix(prefix);
    let mut cluster = Cluster::new(&["node1", "node2"]).unwrap_or_else(|e| panic!("{e:#}"));
    for tool in ["curl", "dig"] {
        assert!(
            std::process::Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .unwrap()
                .status
                .success(),
            "this test needs `{tool}` (apt-get install curl dnsutils)"
        );
    }
    for (name, node, ip, http) in [
        ("web-1", "node1", "198.18.1.1", true),
        ("web-2", "node2", "198.18.2.1", true),
        ("web-3", "node2", "198.18.2.2", true),
        ("testpod", "node1", "198.18.1.10", false),
        ("testpod2", "node2", "198.18.2.10", false),
        ("dns-a", "node1", "198.18.1.53", false),
        ("dns-b", "node2", "198.18.2.53", false),
    ] {
        cluster
            .add_pod(name, node, ip.parse().unwrap(), http)
            .await
            .unwrap();
    }
    cluster.add_external("outside", 2).unwrap();
    for (_, pod) in CLIENTS {
        cluster
            .write_resolv_conf(
                pod,
                DNS_IP.parse().unwrap(),
                &[
                    "default.svc.cluster.local",
                    "svc.cluster.local",
                    "cluster.local",
                ],
                5,
            )
            .unwrap();
    }

    // The API stand-in serves inside node1, where the control plane runs.
    let node1 = cluster.node("node1").unwrap();
    let api = node1
        .rt
        .run(async { ApiServer::start_with(Duration::from_millis(500)).await })
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
    api.apply_yaml(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: kube-dns, namespace: kube-system}}\nspec:\n  clusterIP: {DNS_IP}\n  ports: [{{name: dns, port: 53, protocol: UDP}}, {{name: dns-tcp, port: 53, protocol: TCP}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: kube-dns-1, namespace: kube-system, labels: {{kubernetes.io/service-name: kube-dns}}}}\naddressType: IPv4\n\
         ports: [{{name: dns, port: 53, protocol: UDP}}, {{name: dns-tcp, port: 53, protocol: TCP}}]\nendpoints:\n- addresses: [\"198.18.1.53\"]\n  nodeName: node1\n- addresses: [\"198.18.2.53\"]\n  nodeName: node2\n"
    ))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let cfg = StackConfig {
        source: Source::Kube(kubeconfig),
        control_plane_node: "node1".into(),
        dns_pods: vec!["dns-a".into(), "dns-b".into()],
        pod_records: false,
        env: vec![],
        fast: true,
        control_plane_replicas: replicas,
        modes: BTreeMap::from([(NFT_NODE.to_string(), ProxyMode::Nftables)]),
    };
    let stack = Stack::start(&cluster, &cfg, dir.path(), T)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    System {
        cluster,
        api,
        stack,
        _dir: dir,
    }
}

#[allow(clippy::unwrap_used, clippy::expect_used)] // a test harness: failures are test failures
impl System {
    /// `curl -s` from a pod; the body (empty on failure).
    pub fn curl(&self, from: &str, url: &str) -> String {
        self.cluster
            .exec_in(from, &["curl", "-s", "--max-time", "1", url])
            .unwrap()
    }

    /// curl's exit code: 0 ok, 7 connection refused, 28 timeout.
    pub fn curl_code(&self, from: &str, url: &str) -> i32 {
        let p = self.cluster.pod(from).unwrap();
        std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &p.ns.name,
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "--max-time",
                "1",
                url,
            ])
            .status()
            .unwrap()
            .code()
            .unwrap_or(-1)
    }

    /// `dig @server name type` from testpod: (status, sorted answers).
    pub fn dig(&self, server: &str, name: &str, qtype: &str) -> (String, Vec<String>) {
        self.dig_from("testpod", server, name, qtype)
    }

    /// `dig @server name type` from `pod`: (status, sorted answers).
    pub fn dig_from(
        &self,
        pod: &str,
        server: &str,
        name: &str,
        qtype: &str,
    ) -> (String, Vec<String>) {
        let out = self
            .cluster
            .exec_in(
                pod,
                &[
                    "dig",
                    &format!("@{server}"),
                    "+time=1",
                    "+tries=1",
                    name,
                    qtype,
                ],
            )
            .unwrap();
        let status = out
            .lines()
            .find_map(|l| l.split("status: ").nth(1))
            .and_then(|s| s.split(',').next())
            .unwrap_or("")
            .to_string();
        let mut answers: Vec<String> = out
            .lines()
            .skip_while(|l| !l.starts_with(";; ANSWER SECTION"))
            .skip(1)
            .take_while(|l| !l.is_empty())
            .filter_map(|l| l.split_whitespace().last().map(String::from))
            .collect();
        answers.sort();
        (status, answers)
    }

    /// `iptables -t nat -S` on a node.
    pub fn nat(&self, node: &str) -> String {
        self.cluster.iptables(node, &["-t", "nat", "-S"]).unwrap()
    }

    /// The mode of `node`'s agent.
    pub fn mode(&self, node: &str) -> ProxyMode {
        self.stack.mode(node)
    }

    /// `node`'s service rules as text, comparable across a fault: `iptables -t nat
    /// -S` in iptables mode; in nftables mode `nft list table ip kube-proxy` (empty
    /// when there is no table) without counters and with every set's and map's
    /// elements sorted (the kernel lists a hash set in its own order).
    pub fn rules(&self, node: &str) -> String {
        match self.mode(node) {
            ProxyMode::Nftables => self
                .cluster
                .nft(node, &["list", "table", "ip", "kube-proxy"])
                .map(|t| normalize_nft(&t))
                .unwrap_or_default(),
            ProxyMode::Iptables | ProxyMode::Ipvs => self.nat(node),
        }
    }

    /// Whether `node`'s rules send TCP traffic to `ip:port` (a cluster, external or
    /// load-balancer IP) to the service port `svc` (`namespace/name:port`).
    pub fn serves(&self, node: &str, svc: &str, ip: &str, port: u16) -> bool {
        let rules = self.rules(node);
        match self.mode(node) {
            ProxyMode::Nftables => {
                let chain = nft_chain_suffix(svc);
                let key = format!("{ip} . tcp . {port} : goto ");
                rules.match_indices(&key).any(|(i, _)| {
                    rules[i + key.len()..]
                        .split([',', ' ', '}', '\n'])
                        .next()
                        .is_some_and(|c| c.ends_with(&chain))
                })
            }
            ProxyMode::Iptables | ProxyMode::Ipvs => rules.lines().any(|l| {
                l.starts_with("-A KUBE-SERVICES ")
                    && (l.contains(&format!("-d {ip}/32 ")) || l.contains(&format!("-d {ip} ")))
                    && l.contains(&format!("--comment \"{svc} "))
                    && l.contains(&format!("--dport {port} "))
            }),
        }
    }

    /// Whether `node`'s rules DNAT some service traffic to `endpoint` (`ip:port`).
    pub fn dnat_to(&self, node: &str, endpoint: &str) -> bool {
        let rules = self.rules(node);
        match self.mode(node) {
            ProxyMode::Nftables => rules.contains(&format!("dnat to {endpoint}")),
            ProxyMode::Iptables | ProxyMode::Ipvs => {
                rules.contains(&format!("--to-destination {endpoint}"))
            }
        }
    }

    /// `node`'s conntrack entries to `ip` that were not DNATed (their reply is
    /// expected from `ip` itself): left by packets that reached the node before its
    /// rules for `ip`. Until they expire, a new connection with the same addresses
    /// and ports matches one of them and is not DNATed.
    pub fn not_nated_to(&self, node: &str, ip: &str) -> Vec<String> {
        let listing = self
            .cluster
            .node(node)
            .unwrap()
            .ns
            .exec(&["conntrack", "-L", "-d", ip])
            .unwrap();
        not_nated(&listing, ip)
    }

    /// Whether anything in `node`'s rules still refers to the service port `svc`
    /// (`namespace/name:port`). In nftables mode a removed service's chains stay,
    /// empty and unreferenced, until they are deleted a little later (as kube-proxy
    /// does), so an empty chain does not count.
    pub fn mentions(&self, node: &str, svc: &str) -> bool {
        let rules = self.rules(node);
        match self.mode(node) {
            ProxyMode::Nftables => {
                let chain = nft_chain_suffix(svc);
                let mut in_chain = false;
                rules.lines().map(str::trim).any(|l| {
                    if let Some(name) = l.strip_prefix("chain ") {
                        in_chain = name.trim_end_matches(" {").ends_with(&chain);
                        return false;
                    }
                    if l == "}" {
                        in_chain = false;
                        return false;
                    }
                    in_chain || l.contains(&chain)
                })
            }
            ProxyMode::Iptables | ProxyMode::Ipvs => rules.contains(svc),
        }
    }
}

/// The lines of a `conntrack -L` listing whose reply tuple comes from `ip`, the
/// original destination: entries without DNAT.
fn not_nated(listing: &str, ip: &str) -> Vec<String> {
    let reply_src = format!("src={ip}");
    listing
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .filter(|w| w.starts_with("src="))
                .nth(1)
                == Some(&reply_src)
        })
        .map(String::from)
        .collect()
}

/// `namespace/name:port` -> the end of its nftables chain names
/// (`-namespace/name/tcp/port`).
fn nft_chain_suffix(svc: &str) -> String {
    let (name, port) = svc.split_once(':').unwrap_or((svc, ""));
    format!("-{name}/tcp/{port}")
}

/// `nft list` text without counters and dynamic timeouts, each `elements = { ... }`
/// on one line with its elements sorted.
pub fn normalize_nft(listing: &str) -> String {
    let mut out = String::new();
    let mut pending: Option<String> = None;
    for line in listing.lines() {
        let line = strip_volatile(line);
        let mut text = match pending.take() {
            Some(mut p) => {
                p.push(' ');
                p.push_str(line.trim());
                p
            }
            None if line.trim_start().starts_with("elements = {") => line.clone(),
            None => {
                out.push_str(&line);
                out.push('\n');
                continue;
            }
        };
        if !text.trim_end().ends_with('}') {
            pending = Some(text);
            continue;
        }
        if let (Some(open), Some(close)) = (text.find('{'), text.rfind('}')) {
            let mut elements: Vec<&str> = text[open + 1..close]
                .split(',')
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .collect();
            elements.sort_unstable();
            text = format!("{}{{ {} }}", &text[..open], elements.join(", "));
        }
        out.push_str(&text);
        out.push('\n');
    }
    if let Some(p) = pending {
        out.push_str(&p);
        out.push('\n');
    }
    out
}

/// A listing line without `counter packets N bytes M` and `expires ...`.
fn strip_volatile(line: &str) -> String {
    let body = line.trim_start();
    let indent = &line[..line.len() - body.len()];
    let mut words: Vec<&str> = Vec::new();
    let mut it = body.split(' ').peekable();
    while let Some(w) = it.next() {
        match w {
            "counter" if it.peek() == Some(&"packets") => {
                // packets N bytes M
                for _ in 0..4 {
                    it.next();
                }
            }
            "expires" => {
                // The remaining time, which may end the element (`2h59m58s,`).
                if let Some(rest) = it.next().and_then(|t| t.find([',', '}']).map(|i| &t[i..])) {
                    words.push(rest);
                }
            }
            _ => words.push(w),
        }
    }
    format!("{indent}{}", words.join(" "))
}

/// Polls until `f` holds; returns the time it took; panics after `limit`.
pub async fn within(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if f() {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A bounded request loop from a pod to an address: one GET every `interval`,
/// at most `max` requests or `limit` time; counts what failed and when.
pub struct RequestLoop {
    stop: tokio::sync::watch::Sender<bool>,
    handle: tokio::task::JoinHandle<LoopResult>,
}

/// What a request loop saw.
#[derive(Debug, Clone, Default)]
pub struct LoopResult {
    pub ok: u64,
    /// (time since start, outcome) of each failed request.
    pub failed: Vec<(Duration, String)>,
}

impl System {
    /// Starts a request loop from `pod` (inside its namespace).
    pub fn request_loop(&self, pod: &str, addr: std::net::SocketAddr) -> RequestLoop {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let rt = &self.cluster.pods[pod].rt;
        let handle = rt.spawn(async move {
            let start = Instant::now();
            let mut r = LoopResult::default();
            for _ in 0..20_000 {
                if *stopped.borrow() || start.elapsed() > Duration::from_secs(300) {
                    break;
                }
                match crate::netns::get(addr, "/", Duration::from_secs(2)).await {
                    crate::netns::Outcome::Ok(200, _) => r.ok += 1,
                    other => r.failed.push((start.elapsed(), format!("{other:?}"))),
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(20)) => {}
                    _ = stopped.changed() => {}
                }
            }
            r
        });
        RequestLoop { stop, handle }
    }
}

impl RequestLoop {
    /// Stops the loop and returns what it saw.
    pub async fn finish(self) -> LoopResult {
        let _ = self.stop.send(true);
        self.handle.await.unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nft_listings_compare_without_counters_or_element_order() {
        let a = "table ip kube-proxy {\n\tset s {\n\t\ttype ipv4_addr\n\t\telements = { 198.18.2.2 . 198.18.2.2,\n\t\t\t     198.18.1.1 . 198.18.1.1 }\n\t}\n\tchain c {\n\t\tcounter packets 3 bytes 180 jump d\n\t}\n}\n";
        let b = "table ip kube-proxy {\n\tset s {\n\t\ttype ipv4_addr\n\t\telements = { 198.18.1.1 . 198.18.1.1, 198.18.2.2 . 198.18.2.2 }\n\t}\n\tchain c {\n\t\tcounter packets 0 bytes 0 jump d\n\t}\n}\n";
        assert_eq!(normalize_nft(a), normalize_nft(b));
        assert!(
            normalize_nft(a)
                .contains("elements = { 198.18.1.1 . 198.18.1.1, 198.18.2.2 . 198.18.2.2 }"),
            "{}",
            normalize_nft(a)
        );
        assert!(normalize_nft(a).contains("\t\tjump d\n"));
        let aff = "\t\telements = { 198.18.200.2 timeout 3h expires 2h59m58s40ms }\n";
        assert_eq!(
            normalize_nft(aff),
            "\t\telements = { 198.18.200.2 timeout 3h }\n"
        );
        assert_ne!(
            normalize_nft(a),
            normalize_nft(&a.replace("198.18.2.2", "198.18.2.3"))
        );
    }

    #[test]
    fn conntrack_entries_without_dnat_are_told_apart() {
        let listing = "tcp      6 119 SYN_SENT src=198.18.1.10 dst=198.19.7.7 sport=49986 dport=80 [UNREPLIED] src=198.19.7.7 dst=198.18.1.10 sport=80 dport=49986 mark=0 use=1\n\
                       tcp      6 105 TIME_WAIT src=198.18.1.10 dst=198.19.7.7 sport=49694 dport=80 src=198.18.2.2 dst=198.18.1.10 sport=80 dport=49694 [ASSURED] mark=0 use=1\n";
        let stale = not_nated(listing, "198.19.7.7");
        assert_eq!(stale.len(), 1, "{stale:?}");
        assert!(stale[0].contains("sport=49986"));
        assert!(not_nated(listing, "198.19.7.8").is_empty());
    }

    #[test]
    fn nft_chain_names_end_with_the_service_port() {
        assert_eq!(
            nft_chain_suffix("default/web:http"),
            "-default/web/tcp/http"
        );
    }
}
