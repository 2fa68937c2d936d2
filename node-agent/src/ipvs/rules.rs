//! The small fixed iptables ruleset of kube-proxy's IPVS mode. Pure.
//!
//! IPVS does the load balancing; iptables only marks what must be masqueraded
//! (cluster IPs from outside the pod CIDR, external IPs, NodePorts, load-balancer
//! IPs, hairpin endpoints), filters load-balancer source ranges, and rejects new
//! connections to ports of the dummy interface's addresses that are not services
//! (`KUBE-IPVS-FILTER`, kubernetes#72236). Every rule matches an ipset, so the
//! ruleset does not grow with the number of services; a rule whose set is empty is
//! left out, as kube-proxy does. Chain names, rule order and comments follow
//! kube-proxy's `writeIptablesRules`; the prefix replaces `KUBE`.

use std::fmt::Write as _;
use std::net::IpAddr;

use meshlite_proto::model::Protocol;

use super::ipset::{SetNames, Sets};
pub use crate::netfilter::jumps::Jump;
use crate::proxy::IpFamily;

/// Chain names of the IPVS mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainNames {
    pub services: String,
    pub postrouting: String,
    pub node_port: String,
    pub load_balancer: String,
    pub mark_masq: String,
    pub forward: String,
    pub proxy_firewall: String,
    pub source_ranges_firewall: String,
    pub ipvs_filter: String,
    pub ipvs_out_filter: String,
    /// Exists only so an external flush of a table can be noticed.
    pub canary: String,
}

/// What rendering needs.
#[derive(Debug, Clone)]
pub struct RuleInput<'a> {
    pub prefix: &'a str,
    pub family: IpFamily,
    pub names: &'a SetNames,
    pub sets: &'a Sets,
    /// Tells local pods' traffic apart (`--detect-local-mode`).
    pub local: &'a crate::local::LocalDetector,
    pub masquerade_all: bool,
    pub masquerade_mark: u32,
    pub random_fully: bool,
    /// Load-balancer IP, protocol, port whose source ranges exclude the node.
    pub lb_no_node_access: &'a [(IpAddr, Protocol, u16)],
}

/// The rendered restore input and its rule counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub text: String,
    pub nat_rules: usize,
    pub filter_rules: usize,
}

// === impl ChainNames ===

impl ChainNames {
    pub fn new(prefix: &str) -> Self {
        let n = |s: &str| format!("{prefix}-{s}");
        Self {
            services: n("SERVICES"),
            postrouting: n("POSTROUTING"),
            node_port: n("NODE-PORT"),
            load_balancer: n("LOAD-BALANCER"),
            mark_masq: n("MARK-MASQ"),
            forward: n("FORWARD"),
            proxy_firewall: n("PROXY-FIREWALL"),
            source_ranges_firewall: n("SOURCE-RANGES-FIREWALL"),
            ipvs_filter: n("IPVS-FILTER"),
            ipvs_out_filter: n("IPVS-OUT-FILTER"),
            canary: n("PROXY-CANARY"),
        }
    }

    pub fn nat(&self) -> [&str; 5] {
        [
            &self.services,
            &self.postrouting,
            &self.node_port,
            &self.load_balancer,
            &self.mark_masq,
        ]
    }

    pub fn filter(&self) -> [&str; 6] {
        [
            &self.forward,
            &self.node_port,
            &self.proxy_firewall,
            &self.source_ranges_firewall,
            &self.ipvs_filter,
            &self.ipvs_out_filter,
        ]
    }

    /// The jumps from the built-in chains, in kube-proxy's order.
    pub fn jumps(&self) -> Vec<Jump> {
        let j = |table, chain, target: &str, comment: &str| {
            Jump::new(table, chain, target, comment, "")
        };
        vec![
            j(
                "nat",
                "OUTPUT",
                &self.services,
                "kubernetes service portals",
            ),
            j(
                "nat",
                "PREROUTING",
                &self.services,
                "kubernetes service portals",
            ),
            j(
                "nat",
                "POSTROUTING",
                &self.postrouting,
                "kubernetes postrouting rules",
            ),
            j(
                "filter",
                "FORWARD",
                &self.forward,
                "kubernetes forwarding rules",
            ),
            j(
                "filter",
                "INPUT",
                &self.node_port,
                "kubernetes health check rules",
            ),
            j(
                "filter",
                "INPUT",
                &self.proxy_firewall,
                "kube-proxy firewall rules",
            ),
            j(
                "filter",
                "FORWARD",
                &self.proxy_firewall,
                "kube-proxy firewall rules",
            ),
            j(
                "filter",
                "INPUT",
                &self.ipvs_filter,
                "kubernetes ipvs access filter",
            ),
            j(
                "filter",
                "OUTPUT",
                &self.ipvs_out_filter,
                "kubernetes ipvs access filter",
            ),
        ]
    }
}

struct Lines {
    out: String,
    count: usize,
}

impl Lines {
    fn new() -> Self {
        Self {
            out: String::new(),
            count: 0,
        }
    }

    fn chain(&mut self, name: &str) {
        let _ = writeln!(self.out, ":{name} - [0:0]");
    }

    fn rule(&mut self, parts: &[&str]) {
        let line = parts
            .iter()
            .filter(|p| !p.is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join(" ");
        self.out.push_str(&line);
        self.out.push('\n');
        self.count += 1;
    }
}

/// Renders the nat and filter tables of one family.
pub fn render(i: &RuleInput<'_>) -> Rendered {
    let c = ChainNames::new(i.prefix);
    let n = i.names;
    let s = i.sets;
    // kube-proxy's "%#08x".
    let mark = format!("{:#08x}", i.masquerade_mark);
    let comment = |set: &str| format!("-m comment --comment \"{}\"", s.comment(set));
    let set_match = |set: &str, dirs: &str| format!("-m set --match-set {set} {dirs}");

    let mut nat = Lines::new();
    for ch in c.nat() {
        nat.chain(ch);
    }
    nat.chain(&c.canary);
    let lo = match i.family {
        IpFamily::V4 => "127.0.0.0/8",
        IpFamily::V6 => "::1/128",
    };
    nat.rule(&["-A", &c.services, "-s", lo, "-j RETURN"]);

    let mut filter = Lines::new();
    for ch in c.filter() {
        filter.chain(ch);
    }
    filter.chain(&c.canary);

    // kube-proxy's ipsetWithIptablesChain, in its order (the Local sets before
    // the others).
    let with_chain: [(&str, bool, &str, &str, &str, &str); 12] = [
        (
            &n.loop_back,
            true,
            &c.postrouting,
            "MASQUERADE",
            "dst,dst,src",
            "",
        ),
        (
            &n.load_balancer,
            true,
            &c.services,
            &c.load_balancer,
            "dst,dst",
            "",
        ),
        (
            &n.load_balancer_local,
            true,
            &c.load_balancer,
            "RETURN",
            "dst,dst",
            "",
        ),
        (
            &n.node_port_local_tcp,
            true,
            &c.node_port,
            "RETURN",
            "dst",
            "tcp",
        ),
        (
            &n.node_port_tcp,
            true,
            &c.node_port,
            &c.mark_masq,
            "dst",
            "tcp",
        ),
        (
            &n.node_port_local_udp,
            true,
            &c.node_port,
            "RETURN",
            "dst",
            "udp",
        ),
        (
            &n.node_port_udp,
            true,
            &c.node_port,
            &c.mark_masq,
            "dst",
            "udp",
        ),
        (
            &n.node_port_local_sctp,
            true,
            &c.node_port,
            "RETURN",
            "dst,dst",
            "sctp",
        ),
        (
            &n.node_port_sctp,
            true,
            &c.node_port,
            &c.mark_masq,
            "dst,dst",
            "sctp",
        ),
        (
            &n.load_balancer_fw,
            false,
            &c.proxy_firewall,
            &c.source_ranges_firewall,
            "dst,dst",
            "",
        ),
        (
            &n.load_balancer_source_cidr,
            false,
            &c.source_ranges_firewall,
            "RETURN",
            "dst,dst,src",
            "",
        ),
        (
            &n.load_balancer_source_ip,
            false,
            &c.source_ranges_firewall,
            "RETURN",
            "dst,dst,src",
            "",
        ),
    ];
    for (set, is_nat, from, to, dirs, proto) in with_chain {
        if s.is_empty(set) {
            continue;
        }
        let p = if proto.is_empty() {
            String::new()
        } else {
            format!("-p {proto}")
        };
        let lines = if is_nat { &mut nat } else { &mut filter };
        lines.rule(&[
            "-A",
            from,
            &p,
            &comment(set),
            &set_match(set, dirs),
            "-j",
            to,
        ]);
    }

    if !s.is_empty(&n.cluster_ip) {
        let base = [
            "-A".to_string(),
            c.services.clone(),
            comment(&n.cluster_ip),
            format!("-m set --match-set {}", n.cluster_ip),
        ]
        .join(" ");
        if i.masquerade_all {
            nat.rule(&[&base, "dst,dst -j", &c.mark_masq]);
        } else if let Some(not_local) = i.local.if_not_local() {
            // Off-cluster traffic to a cluster IP is masqueraded (it may have been
            // routed here from anywhere and its reply must come back through us).
            nat.rule(&[&base, "dst,dst", &not_local, "-j", &c.mark_masq]);
        } else {
            // Without a pod CIDR: masquerade what the node itself sends from a
            // service IP (the dummy interface makes a VIP the source address).
            nat.rule(&[&base, "src,dst -j", &c.mark_masq]);
        }
    }

    for (set, masquerade) in [(&n.external_ip, true), (&n.external_ip_local, false)] {
        if s.is_empty(set) {
            continue;
        }
        let base = format!(
            "-A {} {} {}",
            c.services,
            comment(set),
            set_match(set, "dst,dst")
        );
        if masquerade {
            nat.rule(&[&base, "-j", &c.mark_masq]);
        }
        // Traffic from off the machine (not from a local process or a bridged
        // container) goes on to IPVS, as does traffic to an external IP that is a
        // local address.
        nat.rule(&[
            &base,
            "-m physdev ! --physdev-is-in -m addrtype ! --src-type LOCAL -j ACCEPT",
        ]);
        nat.rule(&[&base, "-m addrtype --dst-type LOCAL -j ACCEPT"]);
    }

    nat.rule(&[
        "-A",
        &c.services,
        "-m addrtype --dst-type LOCAL -j",
        &c.node_port,
    ]);
    nat.rule(&["-A", &c.load_balancer, "-j", &c.mark_masq]);
    filter.rule(&["-A", &c.source_ranges_firewall, "-j DROP"]);
    for (ip, proto, port) in i.lb_no_node_access {
        let ip = ip.to_string();
        filter.rule(&[
            "-A",
            &c.ipvs_out_filter,
            "-s",
            &ip,
            "-m ipvs --vaddr",
            &ip,
            "--vproto",
            proto.as_lower(),
            "--vport",
            &port.to_string(),
            "-j DROP",
        ]);
    }
    // Accept what IPVS serves, in case later rules would drop it.
    for set in [&n.cluster_ip, &n.load_balancer] {
        if !s.is_empty(set) {
            nat.rule(&["-A", &c.services, &set_match(set, "dst,dst"), "-j ACCEPT"]);
        }
    }
    filter.rule(&[
        "-A",
        &c.forward,
        "-m comment --comment \"kubernetes forwarding rules\"",
        &format!("-m mark --mark {mark}/{mark} -j ACCEPT"),
    ]);
    filter.rule(&[
        "-A",
        &c.forward,
        "-m comment --comment \"kubernetes forwarding conntrack rule\"",
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    ]);
    filter.rule(&[
        "-A",
        &c.node_port,
        &comment(&n.health_check_node_port),
        &set_match(&n.health_check_node_port, "dst"),
        "-j ACCEPT",
    ]);
    for (set, dirs) in [
        (&n.load_balancer, "dst,dst"),
        (&n.cluster_ip, "dst,dst"),
        (&n.external_ip, "dst,dst"),
        (&n.external_ip_local, "dst,dst"),
        (&n.health_check_node_port, "dst"),
    ] {
        filter.rule(&["-A", &c.ipvs_filter, &set_match(set, dirs), "-j RETURN"]);
    }
    filter.rule(&[
        "-A",
        &c.ipvs_filter,
        "-m conntrack --ctstate NEW",
        &set_match(&n.ipvs_ips, "dst"),
        "-j REJECT",
    ]);

    nat.rule(&[
        "-A",
        &c.postrouting,
        &format!("-m mark ! --mark {mark}/{mark} -j RETURN"),
    ]);
    // Clear the mark so a packet that re-traverses the stack is not masqueraded again.
    nat.rule(&["-A", &c.postrouting, "-j MARK --xor-mark", &mark]);
    nat.rule(&[
        "-A",
        &c.postrouting,
        "-m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE",
        if i.random_fully { "--random-fully" } else { "" },
    ]);
    nat.rule(&["-A", &c.mark_masq, "-j MARK --or-mark", &mark]);

    let mut text = String::with_capacity(nat.out.len() + filter.out.len() + 32);
    text.push_str("*nat\n");
    text.push_str(&nat.out);
    text.push_str("COMMIT\n*filter\n");
    text.push_str(&filter.out);
    text.push_str("COMMIT\n");
    Rendered {
        text,
        nat_rules: nat.count,
        filter_rules: filter.count,
    }
}
