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
use crate::local::LocalDetector;
use crate::proxy::{EndpointInfo, IpFamily, ProxyView, ServicePortName, ServicePortView};

/// kube-proxy's `largeClusterEndpointsThreshold`: above this many endpoints the
/// per-endpoint comments are left out to keep the ruleset small.
pub const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

/// Everything rendering depends on besides the view.
#[derive(Debug, Clone)]
pub struct RenderConfig {
    pub chains: ChainNames,
    /// Tells local pods' traffic apart (`--detect-local-mode`): other traffic to a
    /// ClusterIP is masqueraded; a local pod's traffic to an external destination
    /// of an externalTrafficPolicy=Local service short-circuits to the cluster chain.
    pub local: LocalDetector,
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
///
/// Every service port's rules, including its lines in the top-level chains, are
/// kept apart ([`ServiceRules`]), so a ruleset can be put together from this
/// render for most services and an earlier render for a few
/// ([`RuleSet::with_services_from`]): that is how the backend keeps a rejected
/// service's last good rules while it programs the others.
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
    /// The parts that belong to no service; `filter`, `nat_rules` and the counts
    /// are assembled from these and the services' parts.
    fixed: Fixed,
}

/// The `nat` chains and rules owned by one service port, and its lines in the
/// top-level chains of both tables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceRules {
    pub chains: Vec<String>,
    pub rules: String,
    pub rule_count: usize,
    /// Its rules in the top-level chains.
    pub top: TopRules,
}

/// One service port's rules in the top-level chains, per chain, in the order they
/// are written out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopRules {
    filter_nodeports: String,
    filter_services: String,
    filter_external: String,
    filter_proxy_firewall: String,
    nat_nodeports: String,
    nat_services: String,
    filter_count: usize,
    nat_count: usize,
}

/// The service-independent parts of a [`RuleSet`].
#[derive(Debug, Clone, Default, PartialEq)]
struct Fixed {
    /// `filter` chain lines.
    filter_chains: String,
    /// `filter` rules written between the services' external and firewall lines.
    filter_rules: String,
    filter_count: usize,
    /// `nat` rules before the services' lines (postrouting, masquerade mark).
    nat_head: String,
    /// `nat` rules after them (the NodePort tail call).
    nat_tail: String,
    nat_count: usize,
}

/// A rule that appends to, or jumps to, a chain its restore input does not
/// declare: `iptables-restore` refuses the whole input for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undeclared {
    /// The service port whose rules hold it; `None` for the top-level rules.
    pub service: Option<ServicePortName>,
    pub table: &'static str,
    /// The chain that is used but not declared.
    pub chain: String,
    /// The offending rule.
    pub rule: String,
}

/// The renderer broke its invariant: some rule uses an undeclared chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rendered rules use undeclared chains: {}", describe(.0))]
pub struct InvariantError(pub Vec<Undeclared>);

fn describe(v: &[Undeclared]) -> String {
    v.iter()
        .map(|u| match &u.service {
            Some(s) => format!("{s}: {} chain {} in `{}`", u.table, u.chain, u.rule),
            None => format!("{} chain {} in `{}`", u.table, u.chain, u.rule),
        })
        .collect::<Vec<_>>()
        .join("; ")
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

// === impl RuleSet ===

impl RuleSet {
    /// Puts `filter`, `nat_rules` and the counts together from the fixed parts and
    /// the services' parts.
    fn assemble(&mut self) {
        let f = &self.fixed;
        let tops = || self.services.values().map(|s| &s.top);
        let mut filter = String::with_capacity(
            f.filter_chains.len()
                + f.filter_rules.len()
                + tops()
                    .map(|t| {
                        t.filter_nodeports.len()
                            + t.filter_services.len()
                            + t.filter_external.len()
                            + t.filter_proxy_firewall.len()
                    })
                    .sum::<usize>(),
        );
        filter.push_str(&f.filter_chains);
        tops().for_each(|t| filter.push_str(&t.filter_nodeports));
        tops().for_each(|t| filter.push_str(&t.filter_services));
        tops().for_each(|t| filter.push_str(&t.filter_external));
        filter.push_str(&f.filter_rules);
        tops().for_each(|t| filter.push_str(&t.filter_proxy_firewall));
        let mut nat = String::with_capacity(
            f.nat_head.len()
                + f.nat_tail.len()
                + tops()
                    .map(|t| t.nat_nodeports.len() + t.nat_services.len())
                    .sum::<usize>(),
        );
        nat.push_str(&f.nat_head);
        tops().for_each(|t| nat.push_str(&t.nat_nodeports));
        tops().for_each(|t| nat.push_str(&t.nat_services));
        nat.push_str(&f.nat_tail);
        self.filter_rule_count = f.filter_count + tops().map(|t| t.filter_count).sum::<usize>();
        self.nat_rule_count = f.nat_count
            + self
                .services
                .values()
                .map(|s| s.top.nat_count + s.rule_count)
                .sum::<usize>();
        self.filter = filter;
        self.nat_rules = nat;
    }

    /// This ruleset with the rules of the `kept` service ports taken from
    /// `previous` instead (left out where `previous` has none): what to program
    /// when the kernel refuses those services' new rules.
    pub fn with_services_from(
        &self,
        kept: &BTreeSet<ServicePortName>,
        previous: Option<&RuleSet>,
    ) -> RuleSet {
        let mut rs = self.clone();
        for k in kept {
            match previous.and_then(|p| p.services.get(k)) {
                Some(old) => {
                    rs.services.insert(k.clone(), old.clone());
                }
                None => {
                    rs.services.remove(k);
                }
            }
        }
        rs.assemble();
        rs
    }

    /// Checks the renderer's invariant: every chain a rule appends to or jumps to
    /// is declared in the same restore input (built-in chains and targets aside).
    /// A service's own rules may use its own chains and the top-level ones; its
    /// lines in the top-level chains may use its own chains too, so each service
    /// is correct on its own and can be written, or kept, independently.
    ///
    /// # Errors
    ///
    /// Every rule that uses an undeclared chain, with its service.
    pub fn check(&self) -> Result<(), InvariantError> {
        self.check_services(|_, _| true)
    }

    /// [`RuleSet::check`] for the fixed parts and the services `which` selects (a
    /// sync skips those whose rules it already checked and applied).
    ///
    /// # Errors
    ///
    /// Every rule that uses an undeclared chain, with its service.
    pub fn check_services(
        &self,
        mut which: impl FnMut(&ServicePortName, &ServiceRules) -> bool,
    ) -> Result<(), InvariantError> {
        let filter_declared: BTreeSet<&str> = declared_in(&self.fixed.filter_chains);
        let top_nat: BTreeSet<&str> = self.nat_chains.iter().map(String::as_str).collect();
        let mut bad = Vec::new();
        let mut report = |service: Option<&ServicePortName>,
                          table: &'static str,
                          rules: &str,
                          ok: &dyn Fn(&str) -> bool| {
            for (chain, rule) in undeclared(rules, ok) {
                bad.push(Undeclared {
                    service: service.cloned(),
                    table,
                    chain,
                    rule,
                });
            }
        };
        let fixed_filter = |c: &str| filter_declared.contains(c);
        report(None, "filter", &self.fixed.filter_rules, &fixed_filter);
        let fixed_nat = |c: &str| top_nat.contains(c);
        report(None, "nat", &self.fixed.nat_head, &fixed_nat);
        report(None, "nat", &self.fixed.nat_tail, &fixed_nat);
        for (spn, s) in self.services.iter().filter(|(k, s)| which(k, s)) {
            let nat_ok = |c: &str| top_nat.contains(c) || s.chains.iter().any(|o| o == c);
            let t = &s.top;
            for rules in [
                &t.filter_nodeports,
                &t.filter_services,
                &t.filter_external,
                &t.filter_proxy_firewall,
            ] {
                report(Some(spn), "filter", rules, &fixed_filter);
            }
            report(Some(spn), "nat", &t.nat_nodeports, &nat_ok);
            report(Some(spn), "nat", &t.nat_services, &nat_ok);
            report(Some(spn), "nat", &s.rules, &nat_ok);
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(InvariantError(bad))
        }
    }

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

    /// The restore input of a partial sync that leaves out the top-level chains of
    /// a table when they are what the kernel already holds: `filter` / `nat_top`
    /// say whether that table's top-level chains are written. Empty when nothing
    /// is to be written.
    pub fn partial_text_of(
        &self,
        changed: &BTreeSet<ServicePortName>,
        stale: &[String],
        filter: bool,
        nat_top: bool,
    ) -> String {
        let mut out = String::new();
        if filter {
            out.push_str("*filter\n");
            out.push_str(&self.filter);
            out.push_str("COMMIT\n");
        }
        let services: Vec<&ServiceRules> = self
            .services
            .iter()
            .filter(|(k, _)| changed.contains(*k))
            .map(|(_, v)| v)
            .collect();
        if !nat_top && services.is_empty() && stale.is_empty() {
            return out;
        }
        out.push_str("*nat\n");
        if nat_top {
            for c in &self.nat_chains {
                chain_line(&mut out, c);
            }
        }
        for s in &services {
            for c in &s.chains {
                chain_line(&mut out, c);
            }
        }
        for c in stale {
            chain_line(&mut out, c);
        }
        if nat_top {
            out.push_str(&self.nat_rules);
        }
        for s in &services {
            out.push_str(&s.rules);
        }
        for c in stale {
            let _ = writeln!(out, "-X {c}");
        }
        out.push_str("COMMIT\n");
        out
    }

    /// The complete restore input written as several `nat` transactions of about
    /// `max_chains` chains each, for `iptables-nft-restore --noflush`, whose work
    /// per transaction grows with the number of chains times the number of rules
    /// in it. The same rules as [`RuleSet::full_text`], in this order: `filter`;
    /// the top-level `nat` chains the services' rules jump to (which jump nowhere
    /// else, so they can be written first); the services' chains, whole services
    /// per transaction (so each service moves from its old to its new rules at
    /// once, and is not yet reachable when it is new); the other top-level chains,
    /// which switch to the new services; then the `stale` chains, all flushed
    /// before any is deleted. Every transaction only jumps to chains declared in
    /// it or written by an earlier one. One transaction, as `full_text`, when the
    /// top-level chains the services use also jump elsewhere.
    pub fn full_text_blocks(&self, stale: &[String], max_chains: usize) -> String {
        let top: BTreeSet<&str> = self.nat_chains.iter().map(String::as_str).collect();
        let lead: BTreeSet<&str> = self
            .services
            .values()
            .flat_map(|s| s.rules.lines())
            .filter_map(jump_target)
            .filter(|t| top.contains(t))
            .collect();
        let is_lead = |l: &&str| rule_chain(l).is_some_and(|c| lead.contains(c));
        let lead_rules: Vec<&str> = self.nat_rules.lines().filter(is_lead).collect();
        if lead_rules
            .iter()
            .filter_map(|l| jump_target(l))
            .any(|t| !lead.contains(t) && !BUILTIN.contains(&t))
        {
            return self.full_text(stale);
        }
        let max_chains = max_chains.max(1);
        let mut out = String::with_capacity(
            self.filter.len()
                + self.nat_rules.len()
                + self
                    .services
                    .values()
                    .map(|s| s.rules.len() + s.chains.len() * 30)
                    .sum::<usize>()
                + stale.len() * 60
                + 64,
        );
        out.push_str("*filter\n");
        out.push_str(&self.filter);
        out.push_str("COMMIT\n");
        let mut block: Vec<&ServiceRules> = Vec::new();
        let mut chains = 0;
        let mut first = true;
        let write = |out: &mut String, block: &[&ServiceRules], first: bool| {
            out.push_str("*nat\n");
            if first {
                for c in &lead {
                    chain_line(out, c);
                }
            }
            for c in block.iter().flat_map(|s| s.chains.iter()) {
                chain_line(out, c);
            }
            if first {
                for l in &lead_rules {
                    out.push_str(l);
                    out.push('\n');
                }
            }
            for s in block {
                out.push_str(&s.rules);
            }
            out.push_str("COMMIT\n");
        };
        for s in self.services.values() {
            if !block.is_empty() && chains + s.chains.len() > max_chains {
                write(&mut out, &block, first);
                first = false;
                block.clear();
                chains = 0;
            }
            chains += s.chains.len();
            block.push(s);
        }
        if !block.is_empty() || first {
            write(&mut out, &block, first);
        }
        out.push_str("*nat\n");
        for c in self
            .nat_chains
            .iter()
            .filter(|c| !lead.contains(c.as_str()))
        {
            chain_line(&mut out, c);
        }
        for l in self.nat_rules.lines().filter(|l| !is_lead(l)) {
            out.push_str(l);
            out.push('\n');
        }
        out.push_str("COMMIT\n");
        for part in stale.chunks(max_chains) {
            out.push_str("*nat\n");
            for c in part {
                chain_line(&mut out, c);
            }
            out.push_str("COMMIT\n");
        }
        for part in stale.chunks(max_chains) {
            out.push_str("*nat\n");
            for c in part {
                let _ = writeln!(out, "-X {c}");
            }
            out.push_str("COMMIT\n");
        }
        out
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

/// The chain a `-A <chain> ...` line appends to.
fn rule_chain(line: &str) -> Option<&str> {
    line.strip_prefix("-A ")?.split(' ').next()
}

/// The chain or target a rule line jumps to (`-j <target>`).
fn jump_target(line: &str) -> Option<&str> {
    line.split(" -j ").nth(1)?.split(' ').next()
}

fn chain_line(out: &mut String, chain: &str) {
    let _ = writeln!(out, ":{chain} - [0:0]");
}

/// The chain names declared by `:<chain> ...` lines.
fn declared_in(text: &str) -> BTreeSet<&str> {
    text.lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split(' ').next())
        .collect()
}

/// Chains built into every table we write, and the targets that are not chains.
const BUILTIN: &[&str] = &[
    "PREROUTING",
    "INPUT",
    "FORWARD",
    "OUTPUT",
    "POSTROUTING",
    "ACCEPT",
    "DROP",
    "REJECT",
    "RETURN",
    "MARK",
    "MASQUERADE",
    "DNAT",
    "SNAT",
    "LOG",
    "CONNMARK",
    "NOTRACK",
];

/// Splits a rule line into words, keeping a double-quoted comment as one word.
fn words(line: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = line.trim_start();
    while !rest.is_empty() {
        let end = if let Some(quoted) = rest.strip_prefix('"') {
            quoted.find('"').map_or(rest.len(), |i| i + 2)
        } else {
            rest.find(char::is_whitespace).unwrap_or(rest.len())
        };
        out.push(&rest[..end]);
        rest = rest[end..].trim_start();
    }
    out
}

/// The (chain, rule) pairs of `rules` (one `-A` rule per line) that append to or
/// jump to a chain `declared` does not accept.
fn undeclared(rules: &str, declared: &dyn Fn(&str) -> bool) -> Vec<(String, String)> {
    let ok = |c: &str| BUILTIN.contains(&c) || declared(c);
    let mut bad = Vec::new();
    for line in rules.lines() {
        let w = words(line);
        for pair in w.windows(2) {
            let uses = matches!(pair[0], "-A" | "-I" | "-j" | "-g");
            if uses && !ok(pair[1]) {
                bad.push((pair[1].to_string(), line.to_string()));
            }
        }
    }
    bad
}

/// Checks a complete `iptables-restore` input (as [`RuleSet::full_text`] writes
/// it, or several of them): in each table section, every chain a rule appends
/// to or jumps to is built in or declared in that section. The same invariant as
/// [`RuleSet::check`], on the text the kernel gets.
///
/// # Errors
///
/// Each offending line, with its line number.
pub fn check_text(text: &str) -> Result<(), Vec<String>> {
    let mut bad = Vec::new();
    let mut declared: BTreeSet<&str> = BTreeSet::new();
    for (n, line) in text.lines().enumerate() {
        if line.starts_with('*') {
            declared.clear();
        } else if let Some(decl) = line.strip_prefix(':') {
            declared.extend(decl.split(' ').next());
        } else if line.starts_with("-A") || line.starts_with("-I") {
            let d = |c: &str| declared.contains(c);
            for (chain, _) in undeclared(line, &d) {
                bad.push(format!(
                    "line {}: chain {chain} is not declared: {line}",
                    n + 1
                ));
            }
        }
    }
    if bad.is_empty() { Ok(()) } else { Err(bad) }
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
    let large = view.endpoint_count() > LARGE_CLUSTER_ENDPOINTS;

    for (spn, port) in &view.ports {
        rs.services
            .insert(spn.clone(), render_service(spn, port, cfg, large));
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
    rs.fixed.filter_chains = filter;
    let mut filter = String::new();
    let mut fcount = 0;
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
    rs.fixed.filter_rules = filter;
    rs.fixed.filter_count = fcount;

    // --- nat top level ---
    rs.nat_chains = vec![
        c.services.clone(),
        c.nodeports.clone(),
        c.postrouting.clone(),
        c.mark_masq.clone(),
        c.canary.clone(),
    ];
    let mut nat = String::new();
    let mut ncount = 0;
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
    rs.fixed.nat_head = std::mem::take(&mut nat);
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
    rs.fixed.nat_tail = nat;
    rs.fixed.nat_count = ncount;
    rs.assemble();
    debug_assert!(
        rs.check().is_ok(),
        "renderer invariant: {}",
        rs.check().err().map(|e| e.to_string()).unwrap_or_default()
    );
    rs
}

/// The rules of one service port: its own chains, plus its lines in the top-level
/// chains.
fn render_service(
    spn: &ServicePortName,
    port: &ServicePortView,
    cfg: &RenderConfig,
    large: bool,
) -> ServiceRules {
    let mut top_rules = TopRules::default();
    let top = &mut top_rules;
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
            cfg.local.if_not_local()
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
            if let Some(from_pod) = cfg.local.if_local() {
                // Pods going to an external destination act as if they went out to
                // the load balancer and came back: no traffic policy applies.
                r.add(&[
                    "-A",
                    &ext_chain,
                    &format!(
                        "-m comment --comment \"pod traffic for {name} external destinations\""
                    ),
                    &from_pod,
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
    out.top = top_rules;
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
