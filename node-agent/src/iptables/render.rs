//! Rendering: [`ProxyView`] -> `iptables-restore` input. Pure.
//!
//! The layout, rule order, matches and comments follow kube-proxy's iptables
//! proxier (`syncProxyRules`), so `iptables-save` reads the way operators expect.
//! The rules are kept per service port, so a partial sync can write the top-level
//! chains plus only the changed services' chains.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use super::chains::ChainNames;
use crate::proxy::{EndpointInfo, IpFamily, ProxyView, ServicePortName, ServicePortView};

/// kube-proxy's `largeClusterEndpointsThreshold`: above this many endpoints the
/// per-endpoint comments are left out to keep the ruleset small.
pub const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

/// Everything rendering depends on besides the view.
#[derive(Debug, Clone)]
pub struct RenderConfig {
    pub chains: ChainNames,
    /// Pod CIDR of this family (`--cluster-cidr`): traffic from outside it to a
    /// ClusterIP is masqueraded; traffic from inside it to an external destination
    /// of an externalTrafficPolicy=Local service short-circuits to the cluster chain.
    pub cluster_cidr: Option<IpNet>,
    pub masquerade_all: bool,
    /// `1 << masquerade_bit` (0x4000 by default).
    pub masquerade_mark: u32,
    /// The node's primary IP of this family (allows a node to reach its own
    /// LoadBalancer IP when loadBalancerSourceRanges includes the node).
    pub node_ip: Option<IpAddr>,
    /// NodePorts answer on 127.0.0.1 (IPv4 only; needs `route_localnet`).
    pub localhost_nodeports: bool,
    /// `MASQUERADE --random-fully`.
    pub random_fully: bool,
    /// `--nodeport-addresses` of this family (empty: every local address).
    pub nodeport_addresses: Vec<IpNet>,
    /// All of this node's IPs of this family.
    pub node_ips: Vec<IpAddr>,
}

/// The rendered ruleset of one IP family.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RuleSet {
    /// The whole `filter` table section body (chain lines and rules).
    pub filter: String,
    /// Top-level `nat` chains, always rewritten.
    pub nat_chains: Vec<String>,
    /// Rules of the top-level `nat` chains.
    pub nat_rules: String,
    pub services: BTreeMap<ServicePortName, ServiceRules>,
    pub filter_rule_count: usize,
    pub nat_rule_count: usize,
}

/// The `nat` chains and rules owned by one service port.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceRules {
    pub chains: Vec<String>,
    pub rules: String,
    pub rule_count: usize,
}

/// Appends one rule line; counts it.
struct Rules<'a> {
    out: &'a mut String,
    count: &'a mut usize,
}

impl Rules<'_> {
    fn add(&mut self, parts: &[&str]) {
        let mut first = true;
        for p in parts.iter().filter(|p| !p.is_empty()) {
            if !first {
                self.out.push(' ');
            }
            first = false;
            self.out.push_str(p);
        }
        self.out.push('\n');
        *self.count += 1;
    }
}

/// Per-chain buffers of the top-level chains, written out in a fixed order.
#[derive(Default)]
struct Top {
    filter_nodeports: String,
    filter_services: String,
    filter_external: String,
    filter_proxy_firewall: String,
    nat_nodeports: String,
    nat_services: String,
    filter_count: usize,
    nat_count: usize,
}

// === impl RuleSet ===

impl RuleSet {
    /// All `nat` chains this ruleset uses.
    pub fn active_nat_chains(&self) -> BTreeSet<&str> {
        self.nat_chains
            .iter()
            .chain(self.services.values().flat_map(|s| s.chains.iter()))
            .map(String::as_str)
            .collect()
    }

    /// The complete restore input; `stale` chains are flushed and deleted.
    pub fn full_text(&self, stale: &[String]) -> String {
        self.text(None, stale)
    }

    /// The restore input of a partial sync: both tables' top-level chains, the
    /// chains of the `changed` service ports, and deletion of `stale` chains.
    pub fn partial_text(&self, changed: &BTreeSet<ServicePortName>, stale: &[String]) -> String {
        self.text(Some(changed), stale)
    }

    fn text(&self, only: Option<&BTreeSet<ServicePortName>>, stale: &[String]) -> String {
        let selected = || {
            self.services
                .iter()
                .filter(move |(k, _)| only.is_none_or(|set| set.contains(*k)))
                .map(|(_, v)| v)
        };
        let size: usize = self.filter.len()
            + self.nat_rules.len()
            + selected()
                .map(|s| s.rules.len() + s.chains.len() * 30)
                .sum::<usize>()
            + 64;
        let mut out = String::with_capacity(size);
        out.push_str("*filter\n");
        out.push_str(&self.filter);
        out.push_str("COMMIT\n*nat\n");
        for c in &self.nat_chains {
            chain_line(&mut out, c);
        }
        for s in selected() {
            for c in &s.chains {
                chain_line(&mut out, c);
            }
        }
        for c in stale {
            chain_line(&mut out, c);
        }
        out.push_str(&self.nat_rules);
        for s in selected() {
            out.push_str(&s.rules);
        }
        for c in stale {
            let _ = writeln!(out, "-X {c}");
        }
        out.push_str("COMMIT\n");
        out
    }
}

fn chain_line(out: &mut String, chain: &str) {
    let _ = writeln!(out, ":{chain} - [0:0]");
}

/// kube-proxy's `probability(n)`: `1/n` with 10 decimals.
pub fn probability(n: usize) -> String {
    format!("{:.10}", 1.0 / n as f64)
}

/// Renders the whole ruleset of one family.
pub fn render(view: &ProxyView, cfg: &RenderConfig) -> RuleSet {
    let c = &cfg.chains;
    let v6 = view.family == IpFamily::V6;
    let mark = format!("{:#x}", cfg.masquerade_mark);
    let mut rs = RuleSet::default();
    let mut top = Top::default();
    let large = view.endpoint_count() > LARGE_CLUSTER_ENDPOINTS;

    for (spn, port) in &view.ports {
        let rules = render_service(spn, port, cfg, large, &mut top);
        rs.nat_rule_count += rules.rule_count;
        rs.services.insert(spn.clone(), rules);
    }

    // --- filter ---
    let mut filter = String::new();
    let mut filter_chains = vec![
        c.nodeports.as_str(),
        c.services.as_str(),
        c.external_services.as_str(),
    ];
    let localnet_firewall = !v6 && cfg.localhost_nodeports;
    if localnet_firewall {
        filter_chains.push(c.firewall.as_str());
    }
    filter_chains.extend([
        c.forward.as_str(),
        c.proxy_firewall.as_str(),
        c.canary.as_str(),
    ]);
    for ch in filter_chains {
        chain_line(&mut filter, ch);
    }
    filter.push_str(&top.filter_nodeports);
    filter.push_str(&top.filter_services);
    filter.push_str(&top.filter_external);
    let mut fcount = top.filter_count;
    {
        let mut r = Rules {
            out: &mut filter,
            count: &mut fcount,
        };
        if localnet_firewall {
            // kube-proxy's (and kubelet's) mitigation for route_localnet (CVE-2020-8558).
            r.add(&[
                "-A",
                &c.firewall,
                "-m comment --comment \"block incoming localnet connections\"",
                "-d 127.0.0.0/8 ! -s 127.0.0.0/8",
                "-m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP",
            ]);
        }
        r.add(&["-A", &c.forward, "-m conntrack --ctstate INVALID -j DROP"]);
        r.add(&[
            "-A",
            &c.forward,
            "-m comment --comment \"kubernetes forwarding rules\"",
            &format!("-m mark --mark {mark}/{mark} -j ACCEPT"),
        ]);
        r.add(&[
            "-A",
            &c.forward,
            "-m comment --comment \"kubernetes forwarding conntrack rule\"",
            "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        ]);
    }
    filter.push_str(&top.filter_proxy_firewall);
    rs.filter = filter;
    rs.filter_rule_count = fcount;

    // --- nat top level ---
    rs.nat_chains = vec![
        c.services.clone(),
        c.nodeports.clone(),
        c.postrouting.clone(),
        c.mark_masq.clone(),
        c.canary.clone(),
    ];
    let mut nat = String::new();
    let mut ncount = top.nat_count;
    {
        let mut r = Rules {
            out: &mut nat,
            count: &mut ncount,
        };
        r.add(&[
            "-A",
            &c.postrouting,
            &format!("-m mark ! --mark {mark}/{mark} -j RETURN"),
        ]);
        // Clear the mark so a packet re-traversing the stack is not masqueraded again.
        r.add(&["-A", &c.postrouting, &format!("-j MARK --xor-mark {mark}")]);
        r.add(&[
            "-A",
            &c.postrouting,
            "-m comment --comment \"kubernetes service traffic requiring SNAT\"",
            "-j MASQUERADE",
            if cfg.random_fully {
                "--random-fully"
            } else {
                ""
            },
        ]);
        r.add(&["-A", &c.mark_masq, &format!("-j MARK --or-mark {mark}")]);
    }
    nat.push_str(&top.nat_nodeports);
    nat.push_str(&top.nat_services);
    {
        let mut r = Rules {
            out: &mut nat,
            count: &mut ncount,
        };
        // The tail call to the NodePort chain must stay the last rule.
        let exclude = if v6 {
            "! -d ::1/128"
        } else if !cfg.localhost_nodeports {
            "! -d 127.0.0.0/8"
        } else {
            ""
        };
        let comment = "-m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\"";
        let everywhere = cfg.nodeport_addresses.is_empty()
            || cfg.nodeport_addresses.iter().any(|n| n.prefix_len() == 0);
        if everywhere {
            r.add(&[
                "-A",
                &c.services,
                comment,
                "-m addrtype --dst-type LOCAL",
                exclude,
                "-j",
                &c.nodeports,
            ]);
        } else {
            // kube-proxy's --nodeport-addresses: one jump per matching node IP.
            let mut ips: Vec<IpAddr> = cfg
                .node_ips
                .iter()
                .copied()
                .filter(|ip| cfg.nodeport_addresses.iter().any(|n| n.contains(ip)))
                .collect();
            let localhost: IpAddr = if v6 {
                "::1".parse().unwrap_or(IpAddr::from([0u16; 8]))
            } else {
                IpAddr::from([127, 0, 0, 1])
            };
            if !v6
                && cfg.localhost_nodeports
                && cfg
                    .nodeport_addresses
                    .iter()
                    .any(|n| n.contains(&localhost))
            {
                ips.push(localhost);
            }
            ips.sort();
            ips.dedup();
            for ip in ips {
                let dst = format!("-d {}/{}", ip, if v6 { 128 } else { 32 });
                r.add(&["-A", &c.services, comment, &dst, "-j", &c.nodeports]);
            }
        }
    }
    rs.nat_rules = nat;
    rs.nat_rule_count += ncount;
    rs
}

/// The rules of one service port: its own chains, plus its lines in the top-level
/// chains (appended to `top`).
fn render_service(
    spn: &ServicePortName,
    port: &ServicePortView,
    cfg: &RenderConfig,
    large: bool,
    top: &mut Top,
) -> ServiceRules {
    let c = &cfg.chains;
    let info = &port.info;
    let sel = &port.selection;
    let proto = spn.protocol.as_lower();
    let name = spn.to_string();
    let m_proto = format!("-m {proto} -p {proto}");
    let dport = info.port.to_string();

    let cluster_chain = c.svc(spn);
    let local_chain = c.svl(spn);
    let ext_chain = c.ext(spn);
    let fw_chain = c.fw(spn);
    let uses_cluster_chain = !sel.cluster.is_empty() && info.uses_cluster_endpoints();
    let uses_local_chain = !sel.local.is_empty() && info.uses_local_endpoints();

    let has_endpoints = sel.has_any;
    let (internal_chain, has_internal) = if info.internal_policy_local {
        (&local_chain, has_endpoints && !sel.local.is_empty())
    } else {
        (&cluster_chain, has_endpoints)
    };
    let (external_policy_chain, has_external) = if info.external_policy_local {
        (&local_chain, has_endpoints && !sel.local.is_empty())
    } else {
        (&cluster_chain, has_endpoints)
    };
    let uses_ext_chain = has_endpoints && info.externally_accessible();
    let uses_fw_chain = has_endpoints
        && !info.load_balancer_ips.is_empty()
        && !info.load_balancer_source_ranges.is_empty();
    let lb_chain = if uses_fw_chain { &fw_chain } else { &ext_chain };

    let (internal_target, internal_comment, external_target, external_comment) = if !has_endpoints {
        let comment = format!("\"{name} has no endpoints\"");
        ("REJECT", comment.clone(), "REJECT", comment)
    } else {
        let comment = format!("\"{name} has no local endpoints\"");
        ("DROP", comment.clone(), "DROP", comment)
    };

    // --- top-level chains ---
    let cluster_ip = info.cluster_ip.to_string();
    {
        if has_internal {
            Rules {
                out: &mut top.nat_services,
                count: &mut top.nat_count,
            }
            .add(&[
                "-A",
                &c.services,
                &format!("-m comment --comment \"{name} cluster IP\""),
                &m_proto,
                "-d",
                &cluster_ip,
                "--dport",
                &dport,
                "-j",
                internal_chain,
            ]);
        } else {
            Rules {
                out: &mut top.filter_services,
                count: &mut top.filter_count,
            }
            .add(&[
                "-A",
                &c.services,
                "-m comment --comment",
                &internal_comment,
                &m_proto,
                "-d",
                &cluster_ip,
                "--dport",
                &dport,
                "-j",
                internal_target,
            ]);
        }
        for ip in &info.external_ips {
            let ip = ip.to_string();
            if has_endpoints {
                Rules {
                    out: &mut top.nat_services,
                    count: &mut top.nat_count,
                }
                .add(&[
                    "-A",
                    &c.services,
                    &format!("-m comment --comment \"{name} external IP\""),
                    &m_proto,
                    "-d",
                    &ip,
                    "--dport",
                    &dport,
                    "-j",
                    &ext_chain,
                ]);
            }
            if !has_external {
                Rules {
                    out: &mut top.filter_external,
                    count: &mut top.filter_count,
                }
                .add(&[
                    "-A",
                    &c.external_services,
                    "-m comment --comment",
                    &external_comment,
                    &m_proto,
                    "-d",
                    &ip,
                    "--dport",
                    &dport,
                    "-j",
                    external_target,
                ]);
            }
        }
        for ip in &info.load_balancer_ips {
            let ip = ip.to_string();
            if has_endpoints {
                Rules {
                    out: &mut top.nat_services,
                    count: &mut top.nat_count,
                }
                .add(&[
                    "-A",
                    &c.services,
                    &format!("-m comment --comment \"{name} loadbalancer IP\""),
                    &m_proto,
                    "-d",
                    &ip,
                    "--dport",
                    &dport,
                    "-j",
                    lb_chain,
                ]);
            }
            if uses_fw_chain {
                Rules {
                    out: &mut top.filter_proxy_firewall,
                    count: &mut top.filter_count,
                }
                .add(&[
                    "-A",
                    &c.proxy_firewall,
                    &format!("-m comment --comment \"{name} traffic not accepted by {fw_chain}\""),
                    &m_proto,
                    "-d",
                    &ip,
                    "--dport",
                    &dport,
                    "-j DROP",
                ]);
            }
        }
        if !has_external {
            for ip in &info.load_balancer_ips {
                Rules {
                    out: &mut top.filter_external,
                    count: &mut top.filter_count,
                }
                .add(&[
                    "-A",
                    &c.external_services,
                    "-m comment --comment",
                    &external_comment,
                    &m_proto,
                    "-d",
                    &ip.to_string(),
                    "--dport",
                    &dport,
                    "-j",
                    external_target,
                ]);
            }
        }
        if let Some(np) = info.node_port {
            let np = np.to_string();
            if has_endpoints {
                Rules {
                    out: &mut top.nat_nodeports,
                    count: &mut top.nat_count,
                }
                .add(&[
                    "-A",
                    &c.nodeports,
                    "-m comment --comment",
                    &name,
                    &m_proto,
                    "--dport",
                    &np,
                    "-j",
                    &ext_chain,
                ]);
            }
            if !has_external {
                Rules {
                    out: &mut top.filter_external,
                    count: &mut top.filter_count,
                }
                .add(&[
                    "-A",
                    &c.external_services,
                    "-m comment --comment",
                    &external_comment,
                    "-m addrtype --dst-type LOCAL",
                    &m_proto,
                    "--dport",
                    &np,
                    "-j",
                    external_target,
                ]);
            }
        }
        if let Some(hc) = info.health_check_node_port {
            Rules {
                out: &mut top.filter_nodeports,
                count: &mut top.filter_count,
            }
            .add(&[
                "-A",
                &c.nodeports,
                &format!("-m comment --comment \"{name} health check node port\""),
                "-m tcp -p tcp --dport",
                &hc.to_string(),
                "-j ACCEPT",
            ]);
        }
    }

    // --- the service's own chains ---
    let mut out = ServiceRules::default();
    let mut r = Rules {
        out: &mut out.rules,
        count: &mut out.rule_count,
    };
    let mut chains: Vec<String> = Vec::new();

    if has_internal {
        let cidr_match = if cfg.masquerade_all {
            Some(String::new())
        } else {
            cfg.cluster_cidr.map(|cidr| format!("! -s {cidr}"))
        };
        if let Some(src) = cidr_match {
            r.add(&[
                "-A",
                internal_chain,
                &format!("-m comment --comment \"{name} cluster IP\""),
                &m_proto,
                "-d",
                &cluster_ip,
                "--dport",
                &dport,
                &src,
                "-j",
                &c.mark_masq,
            ]);
        }
    }

    if uses_ext_chain {
        chains.push(ext_chain.clone());
        if !info.external_policy_local {
            // Endpoints may be on other nodes: masquerade so replies come back here.
            r.add(&[
                "-A",
                &ext_chain,
                &format!(
                    "-m comment --comment \"masquerade traffic for {name} external destinations\""
                ),
                "-j",
                &c.mark_masq,
            ]);
        } else {
            if let Some(cidr) = cfg.cluster_cidr {
                // Pods going to an external destination act as if they went out to
                // the load balancer and came back: no traffic policy applies.
                r.add(&[
                    "-A",
                    &ext_chain,
                    &format!(
                        "-m comment --comment \"pod traffic for {name} external destinations\""
                    ),
                    &format!("-s {cidr}"),
                    "-j",
                    &cluster_chain,
                ]);
            }
            // The node itself: its source is a local address, so masquerade and use
            // the whole cluster.
            r.add(&[
                "-A",
                &ext_chain,
                &format!("-m comment --comment \"masquerade LOCAL traffic for {name} external destinations\""),
                "-m addrtype --src-type LOCAL -j",
                &c.mark_masq,
            ]);
            r.add(&[
                "-A",
                &ext_chain,
                &format!(
                    "-m comment --comment \"route LOCAL traffic for {name} external destinations\""
                ),
                "-m addrtype --src-type LOCAL -j",
                &cluster_chain,
            ]);
        }
        if has_external {
            r.add(&["-A", &ext_chain, "-j", external_policy_chain]);
        }
    }

    if uses_fw_chain {
        chains.push(fw_chain.clone());
        let comment = format!("-m comment --comment \"{name} loadbalancer IP\"");
        let mut allow_from_node = false;
        for cidr in &info.load_balancer_source_ranges {
            r.add(&[
                "-A",
                &fw_chain,
                &comment,
                "-s",
                &cidr.to_string(),
                "-j",
                &ext_chain,
            ]);
            if cfg.node_ip.is_some_and(|ip| cidr.contains(&ip)) {
                allow_from_node = true;
            }
        }
        if allow_from_node {
            for ip in &info.load_balancer_ips {
                r.add(&[
                    "-A",
                    &fw_chain,
                    &comment,
                    "-s",
                    &ip.to_string(),
                    "-j",
                    &ext_chain,
                ]);
            }
        }
        r.add(&[
            "-A",
            &fw_chain,
            &format!(
                "-m comment --comment \"other traffic to {name} will be dropped by {}\"",
                c.proxy_firewall
            ),
        ]);
    }

    let seps: Vec<(String, &EndpointInfo)> = sel
        .reachable
        .iter()
        .map(|ep| (c.sep(spn, ep), ep))
        .collect();
    let sep_of: HashMap<SocketAddr, &str> = seps
        .iter()
        .map(|(chain, ep)| (ep.addr(), chain.as_str()))
        .collect();

    if uses_cluster_chain {
        chains.push(cluster_chain.clone());
        endpoint_jumps(
            &mut r,
            &cluster_chain,
            &name,
            info.session_affinity_timeout,
            &sel.cluster,
            &sep_of,
            large,
        );
    }
    if uses_local_chain {
        chains.push(local_chain.clone());
        endpoint_jumps(
            &mut r,
            &local_chain,
            &name,
            info.session_affinity_timeout,
            &sel.local,
            &sep_of,
            large,
        );
    }

    for (chain, ep) in &seps {
        chains.push(chain.clone());
        let comment = if large {
            String::new()
        } else {
            format!("-m comment --comment {name}")
        };
        // Hairpin: an endpoint reaching itself through the service is masqueraded.
        r.add(&[
            "-A",
            chain,
            &comment,
            "-s",
            &ep.ip.to_string(),
            "-j",
            &c.mark_masq,
        ]);
        let affinity = if info.session_affinity_timeout.is_some() {
            format!("-m recent --name {chain} --set")
        } else {
            String::new()
        };
        r.add(&[
            "-A",
            chain,
            &comment,
            &affinity,
            &m_proto,
            "-j DNAT --to-destination",
            &ep.to_string(),
        ]);
    }

    // Chains are declared (and so created) before any rule uses them; order the
    // declarations like kube-proxy: EXT, FW, SVC, SVL, SEPs.
    out.chains = chains;
    out
}

/// The jumps from a policy chain to endpoint chains: affinity checks first, then
/// the random cascade with probability 1/(n-i), the last rule unconditional.
fn endpoint_jumps(
    r: &mut Rules<'_>,
    chain: &str,
    name: &str,
    affinity: Option<u32>,
    endpoints: &[EndpointInfo],
    sep_of: &HashMap<SocketAddr, &str>,
    large: bool,
) {
    // Every selected endpoint is in `reachable`, so it has a chain.
    let sep_of = |ep: &EndpointInfo| sep_of.get(&ep.addr()).copied().unwrap_or_default();
    let comment = |ep: &EndpointInfo| {
        if large {
            String::new()
        } else {
            format!("-m comment --comment \"{name} -> {ep}\"")
        }
    };
    if let Some(timeout) = affinity {
        for ep in endpoints {
            let sep = sep_of(ep);
            r.add(&[
                "-A",
                chain,
                &comment(ep),
                "-m recent --name",
                sep,
                "--rcheck --seconds",
                &timeout.to_string(),
                "--reap -j",
                sep,
            ]);
        }
    }
    let n = endpoints.len();
    for (i, ep) in endpoints.iter().enumerate() {
        let stat = if i + 1 < n {
            format!(
                "-m statistic --mode random --probability {}",
                probability(n - i)
            )
        } else {
            String::new()
        };
        r.add(&["-A", chain, &comment(ep), &stat, "-j", sep_of(ep)]);
    }
}

#[cfg(test)]
mod tests;
