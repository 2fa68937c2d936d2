//! View -> nftables objects, pure.
//!
//! The layout is kube-proxy's nftables mode: one table per family (`ip
//! kube-proxy`, `ip6 kube-proxy`), its base chains and priorities, dispatch through
//! the verdict maps `service-ips`, `service-nodeports`, `no-endpoint-services`,
//! `no-endpoint-nodeports` and `firewall-ips`, the sets `cluster-ips`,
//! `nodeport-ips` and `hairpin-connections`, and per service port the chains
//! `service-*`, `external-*`, `local-*`, `firewall-*` (and `endpoint-*` chains with
//! `affinity-*` sets for session affinity), under kube-proxy's names.
//!
//! Inside a service chain the endpoint is chosen by one rule per endpoint, `numgen
//! random mod k == 0` with k counting down (the iptables mode's probabilities),
//! each DNATing itself: no anonymous map per service and no endpoint chains. This
//! is what loads fastest (see the crate README for the measurement); kube-proxy's
//! `numgen ... vmap` to endpoint chains costs ~20x more at 10k services.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;
use meshlite_proto::model::Protocol;
use sha2::{Digest, Sha256};

use super::digest;
pub use super::digest::DIGESTS;
use crate::local::LocalDetector;
use crate::proxy::{EndpointInfo, IpFamily, ProxyView, ServicePortView};

/// The sets and maps whose elements a sync writes.
pub const CLUSTER_IPS: &str = "cluster-ips";
pub const NODEPORT_IPS: &str = "nodeport-ips";
pub const HAIRPIN: &str = "hairpin-connections";
pub const SERVICE_IPS: &str = "service-ips";
pub const SERVICE_NODEPORTS: &str = "service-nodeports";
pub const NO_ENDPOINT_SERVICES: &str = "no-endpoint-services";
pub const NO_ENDPOINT_NODEPORTS: &str = "no-endpoint-nodeports";
pub const FIREWALL_IPS: &str = "firewall-ips";

/// Every set and map with its declaration (after the name).
pub fn containers(family: IpFamily) -> Vec<(&'static str, &'static str, String)> {
    let a = addr_type(family);
    vec![
        ("set", CLUSTER_IPS, format!("{{ type {a} ; comment \"Active ClusterIPs\" ; }}")),
        ("set", NODEPORT_IPS, format!("{{ type {a} ; comment \"IPs that accept NodePort traffic\" ; }}")),
        ("set", HAIRPIN, format!("{{ type {a} . {a} ; comment \"endpoints reaching themselves through a service\" ; }}")),
        ("map", FIREWALL_IPS, format!("{{ type {a} . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}")),
        ("map", NO_ENDPOINT_NODEPORTS, "{ type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }".to_string()),
        ("map", NO_ENDPOINT_SERVICES, format!("{{ type {a} . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}")),
        ("map", SERVICE_IPS, format!("{{ type {a} . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}")),
        ("map", SERVICE_NODEPORTS, "{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }".to_string()),
        ("set", DIGESTS, digest::declaration().to_string()),
    ]
}

/// Everything rendering depends on besides the view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderConfig {
    pub table: String,
    pub local: LocalDetector,
    pub masquerade_all: bool,
    /// `1 << masquerade_bit`.
    pub masquerade_mark: u32,
    /// Service CIDRs for the "drop unallocated ClusterIPs" rule (may be empty).
    pub service_cidrs: Vec<IpNet>,
    /// The IPs NodePorts answer on (never loopback).
    pub nodeport_ips: Vec<IpAddr>,
}

/// The per-service part of a table: what a sync compares with what it wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ruleset {
    /// Per-service chains, name -> rules.
    pub chains: BTreeMap<String, Vec<String>>,
    /// Set or map -> element key -> value (empty for sets).
    pub elements: BTreeMap<&'static str, BTreeMap<String, String>>,
    /// Session affinity sets, name -> timeout in seconds.
    pub affinity_sets: BTreeMap<String, u32>,
}

/// What one service port adds to a table. Its chains and affinity sets are its
/// own (their names hash the port's name); its elements may be shared with other
/// ports (a ClusterIP with several ports, an endpoint behind several services).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fragment {
    /// Chains, name -> rules.
    pub chains: Vec<(String, Vec<String>)>,
    /// (set or map, key, value; empty for sets).
    pub elements: Vec<(&'static str, String, String)>,
    /// Session affinity sets, name -> timeout in seconds.
    pub affinity_sets: Vec<(String, u32)>,
}

// === impl Ruleset ===

impl Ruleset {
    /// Adds one port's fragment.
    pub fn add(&mut self, fr: &Fragment) {
        for (name, rules) in &fr.chains {
            self.chains.insert(name.clone(), rules.clone());
        }
        for (set, key, value) in &fr.elements {
            self.elements
                .entry(set)
                .or_default()
                .insert(key.clone(), value.clone());
        }
        for (name, timeout) in &fr.affinity_sets {
            self.affinity_sets.insert(name.clone(), *timeout);
        }
    }
}

fn addr_type(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "ipv4_addr",
        IpFamily::V6 => "ipv6_addr",
    }
}

/// `ip` or `ip6`: the table family and the address match keyword.
pub fn family_name(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "ip",
        IpFamily::V6 => "ip6",
    }
}

fn proto(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

/// kube-proxy's object name: `<prefix>-<8 base32 chars of sha256(base)>-<base>`.
pub(crate) fn hashed(prefix: &str, base: &str) -> String {
    let digest = Sha256::digest(base.as_bytes());
    let encoded = data_encoding::BASE32.encode(&digest);
    format!("{prefix}-{}-{base}", &encoded[..8])
}

fn endpoint_str(ep: &EndpointInfo) -> String {
    match ep.ip {
        IpAddr::V4(ip) => format!("{ip}/{}", ep.port),
        IpAddr::V6(ip) => format!("[{ip}]/{}", ep.port),
    }
}

fn dnat_target(ep: &EndpointInfo) -> String {
    match ep.ip {
        IpAddr::V4(ip) => format!("{ip}:{}", ep.port),
        IpAddr::V6(ip) => format!("[{ip}]:{}", ep.port),
    }
}

/// kube-proxy's chain names for one service port.
#[derive(Debug, Clone)]
pub struct ServiceChains {
    pub service: String,
    pub local: String,
    pub external: String,
    pub firewall: String,
    base: String,
}

// === impl ServiceChains ===

impl ServiceChains {
    pub fn new(sp: &ServicePortView) -> Self {
        let n = &sp.info.name;
        let base = format!(
            "{}/{}/{}/{}",
            n.service.namespace,
            n.service.name,
            proto(n.protocol),
            n.port
        );
        Self {
            service: hashed("service", &base),
            local: hashed("local", &base),
            external: hashed("external", &base),
            firewall: hashed("firewall", &base),
            base,
        }
    }

    /// The endpoint chain and affinity set name of `ep`.
    pub fn endpoint(&self, ep: &EndpointInfo) -> (String, String) {
        let base = format!("{}__{}", self.base, endpoint_str(ep));
        (hashed("endpoint", &base), hashed("affinity", &base))
    }
}

/// The fixed part of the table: declarations, base chains and their rules. Every
/// fixed chain is flushed and refilled, so applying it twice is harmless.
pub fn base_script(family: IpFamily, cfg: &RenderConfig) -> String {
    let f = family_name(family);
    let t = format!("{f} {}", cfg.table);
    let mark = format!("{:#x}", cfg.masquerade_mark);
    let mut s = String::new();
    let _ = writeln!(s, "add table {t} {{ comment \"rules for kube-proxy\" ; }}");
    for (kind, name, decl) in containers(family) {
        let _ = writeln!(s, "add {kind} {t} {name} {decl}");
    }
    let base_chains = [
        ("filter-prerouting-pre-dnat", "filter", "prerouting", "-110"),
        ("filter-output-pre-dnat", "filter", "output", "-110"),
        ("filter-forward", "filter", "forward", "0"),
        ("filter-input", "filter", "input", "0"),
        ("filter-output", "filter", "output", "0"),
        ("nat-output", "nat", "output", "-100"),
        ("nat-postrouting", "nat", "postrouting", "100"),
        ("nat-prerouting", "nat", "prerouting", "-100"),
    ];
    for (name, ty, hook, prio) in base_chains {
        let _ = writeln!(
            s,
            "add chain {t} {name} {{ type {ty} hook {hook} priority {prio} ; }}"
        );
        let _ = writeln!(s, "flush chain {t} {name}");
    }
    for name in FIXED_CHAINS {
        if name == "reject-chain" {
            let _ = writeln!(
                s,
                "add chain {t} {name} {{ comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }}"
            );
        } else {
            let _ = writeln!(s, "add chain {t} {name}");
        }
        let _ = writeln!(s, "flush chain {t} {name}");
    }
    let mut rule = |chain: &str, body: &str| {
        let _ = writeln!(s, "add rule {t} {chain} {body}");
    };
    rule(
        "cluster-ips-check",
        &format!(
            "{f} daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\""
        ),
    );
    if !cfg.service_cidrs.is_empty() {
        let cidrs: Vec<String> = cfg.service_cidrs.iter().map(|c| c.to_string()).collect();
        rule(
            "cluster-ips-check",
            &format!(
                "{f} daddr {{ {} }} drop comment \"Drop traffic to unallocated ClusterIPs\"",
                cidrs.join(", ")
            ),
        );
    }
    rule(
        "filter-prerouting-pre-dnat",
        "ct state new jump firewall-check",
    );
    rule(
        "filter-forward",
        "ct state new jump service-endpoints-check",
    );
    rule("filter-forward", "ct state new jump cluster-ips-check");
    rule("filter-input", "ct state new jump nodeport-endpoints-check");
    rule("filter-input", "ct state new jump service-endpoints-check");
    rule("filter-output", "ct state new jump service-endpoints-check");
    rule("filter-output-pre-dnat", "ct state new jump firewall-check");
    rule("filter-output", "ct state new jump cluster-ips-check");
    rule(
        "firewall-check",
        &format!("{f} daddr . meta l4proto . th dport vmap @firewall-ips"),
    );
    rule("mark-for-masquerade", &format!("mark set mark or {mark}"));
    rule(
        "masquerading",
        &format!(
            "ct status dnat {f} saddr . {f} daddr @hairpin-connections masquerade fully-random"
        ),
    );
    rule("masquerading", &format!("mark and {mark} == 0 return"));
    rule("masquerading", &format!("mark set mark xor {mark}"));
    rule("masquerading", "masquerade fully-random");
    rule("nat-output", "jump services");
    rule("nat-postrouting", "jump masquerading");
    rule("nat-prerouting", "jump services");
    rule(
        "nodeport-endpoints-check",
        &format!("{f} daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports"),
    );
    rule("reject-chain", "reject");
    rule(
        "services",
        &format!("{f} daddr . meta l4proto . th dport vmap @service-ips"),
    );
    rule(
        "services",
        &format!("{f} daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports"),
    );
    rule(
        "service-endpoints-check",
        &format!("{f} daddr . meta l4proto . th dport vmap @no-endpoint-services"),
    );
    s
}

/// Whether `chain` is a per-service chain (ours, and not part of the fixed
/// table: base chains are named `filter-*` and `nat-*`).
pub fn is_service_chain(chain: &str) -> bool {
    !FIXED_CHAINS.contains(&chain) && !chain.starts_with("filter-") && !chain.starts_with("nat-")
}

/// The regular chains of the fixed part.
pub const FIXED_CHAINS: [&str; 8] = [
    "cluster-ips-check",
    "firewall-check",
    "mark-for-masquerade",
    "masquerading",
    "nodeport-endpoints-check",
    "reject-chain",
    "services",
    "service-endpoints-check",
];

/// Renders the per-service part of one family's table.
pub fn render(view: &ProxyView, cfg: &RenderConfig) -> Ruleset {
    let mut rs = Ruleset::default();
    for name in ELEMENT_CONTAINERS {
        rs.elements.insert(name, BTreeMap::new());
    }
    for (set, key, value) in global_elements(cfg) {
        rs.elements.entry(set).or_default().insert(key, value);
    }
    for sp in view.ports.values() {
        rs.add(&render_port(view.family, sp, cfg));
    }
    for set in ELEMENT_CONTAINERS {
        if set == DIGESTS {
            continue;
        }
        let d = digest::set_of(set, rs.elements.get(set).into_iter().flatten());
        rs.elements
            .entry(DIGESTS)
            .or_default()
            .insert(d, String::new());
    }
    rs
}

/// The sets and maps a sync writes elements into.
pub const ELEMENT_CONTAINERS: [&str; 9] = [
    CLUSTER_IPS,
    NODEPORT_IPS,
    HAIRPIN,
    FIREWALL_IPS,
    NO_ENDPOINT_NODEPORTS,
    NO_ENDPOINT_SERVICES,
    SERVICE_IPS,
    SERVICE_NODEPORTS,
    DIGESTS,
];

/// The elements that belong to no service: the NodePort addresses.
pub fn global_elements(cfg: &RenderConfig) -> Vec<(&'static str, String, String)> {
    cfg.nodeport_ips
        .iter()
        .map(|ip| (NODEPORT_IPS, ip.to_string(), String::new()))
        .collect()
}

/// Renders what one service port adds to the table: its chains with their
/// digests, its set and map elements and its affinity sets. A sync renders only
/// the ports that changed.
pub fn render_port(family: IpFamily, sp: &ServicePortView, cfg: &RenderConfig) -> Fragment {
    let mut fr = render_port_rules(family, sp, cfg);
    for (name, rules) in &fr.chains {
        fr.elements
            .push((DIGESTS, digest::chain(name, rules), String::new()));
    }
    fr
}

fn render_port_rules(family: IpFamily, sp: &ServicePortView, cfg: &RenderConfig) -> Fragment {
    let f = family_name(family);
    let mut rs = Fragment::default();
    // Elements of the no-endpoint maps name their service in a comment, as
    // kube-proxy's do: nothing else there says whose they are.
    let owner = sp.info.name.to_string();
    let el = |rs: &mut Fragment, set: &'static str, key: String, value: String| {
        let key = if set == NO_ENDPOINT_SERVICES || set == NO_ENDPOINT_NODEPORTS {
            format!("{key} comment \"{owner}\"")
        } else {
            key
        };
        rs.elements.push((set, key, value));
    };
    {
        let info = &sp.info;
        let p = proto(info.name.protocol);
        let names = ServiceChains::new(sp);
        let sel = &sp.selection;
        el(
            &mut rs,
            CLUSTER_IPS,
            info.cluster_ip.to_string(),
            String::new(),
        );
        for ep in sel.cluster.iter().chain(&sel.local) {
            el(
                &mut rs,
                HAIRPIN,
                format!("{ip} . {ip}", ip = ep.ip),
                String::new(),
            );
        }
        let no_endpoints = |local: bool| {
            let eps = if local { &sel.local } else { &sel.cluster };
            match (eps.is_empty(), sel.has_any) {
                (false, _) => None,
                (true, true) => Some("drop".to_string()),
                (true, false) => Some("goto reject-chain".to_string()),
            }
        };

        // The cluster chain (also the target of externally-reachable traffic with
        // the Cluster policy).
        if !sel.cluster.is_empty() {
            let mut rules = Vec::new();
            let masq = if cfg.masquerade_all {
                Some(String::new())
            } else {
                match &cfg.local {
                    LocalDetector::None => None,
                    LocalDetector::Cidr(c) => Some(format!(" {f} saddr != {c}")),
                    LocalDetector::Interface(i) => {
                        Some(format!(" iifname != \"{}\"", i.replace('+', "*")))
                    }
                }
            };
            if let Some(m) = masq {
                rules.push(format!(
                    "{f} daddr {}{m} jump mark-for-masquerade",
                    info.cluster_ip
                ));
            }
            balance(
                &mut rs,
                &mut rules,
                &names,
                &sel.cluster,
                info.session_affinity_timeout,
                f,
                p,
            );
            rs.chains.push((names.service.clone(), rules));
        }
        if info.internal_policy_local && !sel.local.is_empty()
            || info.external_policy_local && info.externally_accessible() && !sel.local.is_empty()
        {
            let mut rules = Vec::new();
            balance(
                &mut rs,
                &mut rules,
                &names,
                &sel.local,
                info.session_affinity_timeout,
                f,
                p,
            );
            rs.chains.push((names.local.clone(), rules));
        }

        // ClusterIP.
        let key = format!("{} . {p} . {}", info.cluster_ip, info.port);
        match no_endpoints(info.internal_policy_local) {
            None => {
                let target = if info.internal_policy_local {
                    &names.local
                } else {
                    &names.service
                };
                el(&mut rs, SERVICE_IPS, key, format!("goto {target}"));
            }
            Some(v) => el(&mut rs, NO_ENDPOINT_SERVICES, key, v),
        }

        if !info.externally_accessible() {
            return rs;
        }
        let ext_local = info.external_policy_local;
        let ext_missing = no_endpoints(ext_local);
        if ext_missing.is_none() {
            let mut rules = Vec::new();
            if ext_local {
                if let Some(m) = local_match(&cfg.local, f) {
                    rules.push(format!("{m} goto {}", names.service));
                }
                rules.push("fib saddr type local jump mark-for-masquerade".to_string());
                rules.push(format!("fib saddr type local goto {}", names.service));
                rules.push(format!("goto {}", names.local));
            } else {
                rules.push("jump mark-for-masquerade".to_string());
                rules.push(format!("goto {}", names.service));
            }
            if ext_local && sel.cluster.is_empty() {
                // Pod and node traffic short-circuit to the cluster chain, which has
                // nothing: send them to the local one instead.
                rules.retain(|r| !r.contains(&names.service));
            }
            rs.chains.push((names.external.clone(), rules));
        }
        let external = |rs: &mut Fragment, key: String, set: &'static str, miss: &'static str| {
            match &ext_missing {
                None => el(rs, set, key, format!("goto {}", names.external)),
                Some(v) => el(rs, miss, key, v.clone()),
            }
        };
        for ip in info.external_ips.iter().chain(&info.load_balancer_ips) {
            external(
                &mut rs,
                format!("{ip} . {p} . {}", info.port),
                SERVICE_IPS,
                NO_ENDPOINT_SERVICES,
            );
        }
        if let Some(np) = info.node_port {
            external(
                &mut rs,
                format!("{p} . {np}"),
                SERVICE_NODEPORTS,
                NO_ENDPOINT_NODEPORTS,
            );
        }
        if !info.load_balancer_source_ranges.is_empty() && !info.load_balancer_ips.is_empty() {
            let ranges: Vec<String> = info
                .load_balancer_source_ranges
                .iter()
                .map(|r| r.to_string())
                .collect();
            rs.chains.push((
                names.firewall.clone(),
                vec![format!("{f} saddr != {{ {} }} drop", ranges.join(", "))],
            ));
            for ip in &info.load_balancer_ips {
                el(
                    &mut rs,
                    FIREWALL_IPS,
                    format!("{ip} . {p} . {}", info.port),
                    format!("goto {}", names.firewall),
                );
            }
        }
    }
    rs
}

fn local_match(local: &LocalDetector, f: &str) -> Option<String> {
    match local {
        LocalDetector::None => None,
        LocalDetector::Cidr(c) => Some(format!("{f} saddr {c}")),
        LocalDetector::Interface(i) => Some(format!("iifname \"{}\"", i.replace('+', "*"))),
    }
}

/// The rules that spread connections over `eps`: with affinity, a lookup per
/// endpoint then a random pick among endpoint chains; without, a random pick that
/// DNATs directly.
fn balance(
    rs: &mut Fragment,
    rules: &mut Vec<String>,
    names: &ServiceChains,
    eps: &[EndpointInfo],
    affinity: Option<u32>,
    f: &str,
    p: &str,
) {
    let n = eps.len();
    let pick = |i: usize| {
        if i + 1 < n {
            format!("numgen random mod {} == 0 ", n - i)
        } else {
            String::new()
        }
    };
    match affinity {
        None => {
            for (i, ep) in eps.iter().enumerate() {
                rules.push(format!(
                    "{}meta l4proto {p} dnat to {}",
                    pick(i),
                    dnat_target(ep)
                ));
            }
        }
        Some(timeout) => {
            let chains: Vec<(String, String)> = eps.iter().map(|ep| names.endpoint(ep)).collect();
            for (chain, set) in &chains {
                rules.push(format!("{f} saddr @{set} goto {chain}"));
            }
            for (i, ((chain, set), ep)) in chains.iter().zip(eps).enumerate() {
                rules.push(format!("{}goto {chain}", pick(i)));
                rs.affinity_sets.push((set.clone(), timeout));
                rs.chains.push((
                    chain.clone(),
                    vec![
                        format!("update @{set} {{ {f} saddr }}"),
                        format!("meta l4proto {p} dnat to {}", dnat_target(ep)),
                    ],
                ));
            }
        }
    }
}
