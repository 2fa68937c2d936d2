//! `meshlite-node-agent explain`: where one new connection to a service goes on
//! this node, traced through the rules of the backend: the live kernel state of
//! the network namespace it runs in (so hand-made drift shows), or the rules
//! `render` would write for a directory of manifests.
//!
//! The tracer walks a [`RuleSet`] (one variant per backend) the way the kernel's
//! hooks see a packet: nat PREROUTING (or OUTPUT for a locally generated packet),
//! routing, filter INPUT/FORWARD (or OUTPUT), IPVS on local delivery, nat
//! POSTROUTING; in nftables mode the same hooks through the table's base chains in
//! priority order ([`nftables`]). Branches of `-m statistic` rules, `numgen` rules
//! and IPVS weights become probabilities. Conntrack state and session affinity are
//! not modelled: every packet is the first of a new connection from a client never
//! seen before.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use meshlite_proto::model::Protocol;
use serde::Serialize;

pub mod cli;
pub mod iptables;
pub mod ipvs;
pub mod nftables;

/// One rule on the path, in its tool's own syntax.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Step {
    pub table: String,
    pub chain: String,
    pub rule: String,
    /// Which hook it was met in (for ordering the union of all branches).
    #[serde(skip)]
    pub stage: u8,
}

/// Something the tracer could not model on the way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    Unmodelled(String),
}

/// The packet being traced (the first of a new connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: SocketAddr,
    pub protocol: Protocol,
}

/// What the tracer knows about the node.
#[derive(Debug, Clone, Default)]
pub struct Host {
    /// The node's own addresses (loopback is always local).
    pub local: BTreeSet<IpAddr>,
    /// ipset name -> (type, members), for the IPVS backend's rules.
    pub ipsets: BTreeMap<String, BTreeSet<String>>,
    /// The interface the packet arrives on, when known.
    pub in_interface: Option<String>,
}

/// One way through the rules, with its probability.
#[derive(Debug, Clone)]
pub struct Flow {
    pub src: IpAddr,
    pub dst: SocketAddr,
    pub protocol: Protocol,
    pub mark: u32,
    pub dnat: bool,
    pub masquerade: bool,
    pub affinity: bool,
    pub prob: f64,
    pub trace: Vec<Step>,
    pub comments: Vec<String>,
    pub notes: Vec<Note>,
    /// The verdict when it ended early (drop/reject/accept by a rule).
    pub verdict: Option<Verdict>,
    /// The hook being walked (0 nat, 1 filter, 2 IPVS, 3 POSTROUTING).
    pub stage: u8,
}

/// How the traced connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Dnat,
    Reject,
    Drop,
    Accept,
    NoMatch,
}

/// One endpoint the connection may reach.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EndpointShare {
    pub address: String,
    pub probability: f64,
}

/// The answer, as `--json` prints it (`notes` and `affinity` are extra).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Explanation {
    pub verdict: Verdict,
    pub endpoints: Vec<EndpointShare>,
    pub masquerade: bool,
    pub service: Option<String>,
    pub trace: Vec<Step>,
    /// The matched service has session affinity, which is not modelled.
    pub affinity: bool,
    /// What the tracer could not model on the way.
    pub notes: Vec<String>,
}

/// A backend's rules, parsed.
#[derive(Debug, Clone)]
pub enum RuleSet {
    /// iptables mode: `iptables-save` of the family.
    Iptables(iptables::Tables),
    /// IPVS mode: its iptables rules (matching ipsets) and the IPVS table.
    Ipvs {
        rules: iptables::Tables,
        table: ipvs::Table,
    },
    /// nftables mode: the family's `kube-proxy` table.
    Nftables(nftables::Table),
}

// === impl Host ===

impl Host {
    /// Loopback or one of the node's addresses.
    pub fn is_local(&self, ip: IpAddr) -> bool {
        ip.is_loopback() || self.local.contains(&ip)
    }

    /// `-m set --match-set name dirs` for the flow's current addresses.
    pub fn set_matches(&self, name: &str, dirs: &[String], flow: &Flow) -> bool {
        let Some(members) = self.ipsets.get(name) else {
            return false;
        };
        members.iter().any(|m| ipvs::member_matches(m, dirs, flow))
    }
}

// === impl Flow ===

impl Flow {
    fn new(p: &Packet) -> Self {
        Self {
            src: p.src,
            dst: p.dst,
            protocol: p.protocol,
            mark: 0,
            dnat: false,
            masquerade: false,
            affinity: false,
            prob: 1.0,
            trace: Vec::new(),
            comments: Vec::new(),
            notes: Vec::new(),
            verdict: None,
            stage: 0,
        }
    }

    /// Conntrack states of a new connection at this point.
    pub fn ct_states(&self) -> Vec<&'static str> {
        if self.dnat {
            vec!["NEW", "DNAT"]
        } else {
            vec!["NEW"]
        }
    }
}

// === impl RuleSet ===

impl RuleSet {
    /// Traces `packet` through the rules on `host`.
    pub fn explain(&self, packet: &Packet, host: &Host) -> Explanation {
        let t = match self {
            RuleSet::Iptables(t) => t,
            RuleSet::Ipvs { rules, .. } => rules,
            RuleSet::Nftables(t) => return summarize(t.trace(Flow::new(packet), host)),
        };
        let local_src = host.is_local(packet.src);
        let mut flows = vec![Flow::new(packet)];
        let first = if local_src { "OUTPUT" } else { "PREROUTING" };
        flows = Self::stage(t, flows, "nat", first, host);
        let mut done = Vec::new();
        let mut next = Vec::new();
        for f in flows {
            if f.verdict.is_some() {
                done.push(f);
                continue;
            }
            let chain = if local_src {
                "OUTPUT"
            } else if host.is_local(f.dst.ip()) {
                "INPUT"
            } else {
                "FORWARD"
            };
            let mut f = f;
            f.stage = 1;
            next.extend(Self::stage(t, vec![f], "filter", chain, host));
        }
        let mut post = Vec::new();
        for mut f in next {
            if f.verdict.is_some() {
                done.push(f);
                continue;
            }
            f.stage = 2;
            let f = match self {
                RuleSet::Ipvs { table, .. } if !f.dnat => table.schedule(f),
                _ => vec![f],
            };
            for f in f {
                // Delivered to a local socket: no POSTROUTING.
                if f.verdict.is_some() || (!local_src && !f.dnat && host.is_local(f.dst.ip())) {
                    done.push(f);
                } else {
                    post.push(f);
                }
            }
        }
        for f in &mut post {
            f.stage = 3;
        }
        done.extend(Self::stage(t, post, "nat", "POSTROUTING", host));
        summarize(done)
    }

    /// Walks each flow through one built-in chain; a flow that is dropped,
    /// rejected or accepted by a rule gets its verdict.
    fn stage(
        t: &iptables::Tables,
        flows: Vec<Flow>,
        table: &str,
        chain: &str,
        host: &Host,
    ) -> Vec<Flow> {
        let mut out = Vec::new();
        for f in flows {
            for (mut f, end) in t.walk(table, chain, f, host) {
                match end {
                    iptables::End::Drop => f.verdict = Some(Verdict::Drop),
                    iptables::End::Reject => f.verdict = Some(Verdict::Reject),
                    iptables::End::Accept if table == "filter" && !f.dnat => {
                        f.verdict = Some(Verdict::Accept)
                    }
                    iptables::End::Fallthrough | iptables::End::Return
                        if t.policy(table, chain) == "DROP" =>
                    {
                        f.verdict = Some(Verdict::Drop)
                    }
                    _ => {}
                }
                out.push(f);
            }
        }
        out
    }
}

/// Folds the weighted flows into one answer: the most likely verdict, every
/// DNAT destination with its probability, and the union of the rules matched.
fn summarize(flows: Vec<Flow>) -> Explanation {
    let mut by_verdict: BTreeMap<Verdict, f64> = BTreeMap::new();
    let mut endpoints: BTreeMap<SocketAddr, f64> = BTreeMap::new();
    let mut trace: Vec<Step> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    let mut masquerade = false;
    let mut affinity = false;
    let mut service = None;
    for f in &flows {
        let v = f.verdict.unwrap_or(if f.dnat {
            Verdict::Dnat
        } else {
            Verdict::NoMatch
        });
        *by_verdict.entry(v).or_default() += f.prob;
        if v == Verdict::Dnat {
            *endpoints.entry(f.dst).or_default() += f.prob;
            masquerade |= f.masquerade;
        }
        affinity |= f.affinity;
        for s in &f.trace {
            if !trace.contains(s) {
                trace.push(s.clone());
            }
        }
        for Note::Unmodelled(n) in &f.notes {
            let n = format!("not modelled: {n}");
            if !notes.contains(&n) {
                notes.push(n);
            }
        }
        if service.is_none() {
            service = f.comments.iter().find_map(|c| service_of(c));
        }
    }
    trace.sort_by_key(|s| s.stage);
    let verdict = by_verdict
        .iter()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(v, _)| *v)
        .unwrap_or(Verdict::NoMatch);
    if affinity {
        notes.push(
            "the service has session affinity: a client seen before goes to the endpoint it had; not modelled"
                .into(),
        );
    }
    Explanation {
        verdict,
        endpoints: endpoints
            .into_iter()
            .map(|(a, p)| EndpointShare {
                address: a.to_string(),
                probability: (p * 1e6).round() / 1e6,
            })
            .collect(),
        masquerade,
        service,
        trace,
        affinity,
        notes,
    }
}

/// `ns/name[:port]` from a kube-proxy style rule comment, whose first word it is.
fn service_of(comment: &str) -> Option<String> {
    let w = comment.split_whitespace().next()?;
    let (ns, rest) = w.split_once('/')?;
    let ok = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == ':')
    };
    (ok(ns) && ok(rest)).then(|| w.to_string())
}

// === impl Explanation ===

impl Explanation {
    /// The human-readable form.
    pub fn human(&self, packet: &Packet) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "{} {} -> {}",
            packet.protocol.as_lower(),
            packet.src,
            packet.dst
        );
        let _ = writeln!(
            o,
            "service:    {}",
            self.service.as_deref().unwrap_or("(none)")
        );
        let v = serde_json::to_value(self.verdict)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let _ = writeln!(o, "verdict:    {v}");
        let _ = writeln!(
            o,
            "masquerade: {}",
            if self.masquerade { "yes" } else { "no" }
        );
        if !self.endpoints.is_empty() {
            let _ = writeln!(o, "endpoints:");
            for e in &self.endpoints {
                let _ = writeln!(o, "  {:<24} {:>6.2}%", e.address, e.probability * 100.0);
            }
        }
        let _ = writeln!(o, "rules matched:");
        let mut last = "";
        let mut last_chain = "";
        for s in &self.trace {
            if s.table != last {
                let _ = writeln!(o, "  [{}]", s.table);
                last = &s.table;
                last_chain = "";
            }
            // nft rules do not name their chain: a header per chain (or map).
            if s.table.starts_with("ip ") || s.table.starts_with("ip6 ") {
                if s.chain != last_chain {
                    let _ = match s.chain.strip_prefix('@') {
                        Some(map) => writeln!(o, "    element of @{map}:"),
                        None => writeln!(o, "    chain {}:", s.chain),
                    };
                    last_chain = &s.chain;
                }
                let _ = writeln!(o, "      {}", s.rule);
            } else {
                let _ = writeln!(o, "    {}", s.rule);
            }
        }
        for n in &self.notes {
            let _ = writeln!(o, "note: {n}");
        }
        o
    }
}

#[cfg(test)]
mod tests;
