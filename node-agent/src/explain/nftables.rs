//! The nftables half of the tracer: one table (`ip kube-proxy`) read into sets,
//! maps and chains, and one new connection walked through its base chains hook
//! by hook, in priority order.
//!
//! The same model comes from either text: what `nft list` prints (the live
//! kernel) or the `nft -f` transaction `render` writes (`--manifests`). Both use
//! nft's rule syntax, so one rule parser serves both, and the trace shows each
//! rule as that text has it. The text form rather than `nft -j`: the manifests
//! path has only text (render writes nft syntax, and turning it into nft's JSON
//! would need the kernel), and the trace is meant to show nft's syntax, which the
//! JSON form does not carry.
//!
//! Only what the nftables mode writes is interpreted, plus the usual spellings of
//! it the kernel prints back (`meta mark & 0x00004000 == 0x00000000`, `numgen random
//! mod 2 0`, symbolic priorities); `numgen ... vmap { ... }` and plain `ip daddr`/
//! `tcp dport` matches as a hand-made rule has them. A rule with anything else that
//! could apply is skipped with a "not modelled" note, never guessed at.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use meshlite_proto::model::Protocol;

use super::{Flow, Host, Note, Step, Verdict};

/// The deepest jump nesting followed (a loop in hand-edited rules stops here).
const MAX_DEPTH: usize = 32;

/// One nftables table: `ip kube-proxy` or `ip6 kube-proxy`.
#[derive(Debug, Clone, Default)]
pub struct Table {
    /// `ip kube-proxy`: the family and the name, as the trace shows it.
    name: String,
    chains: BTreeMap<String, Chain>,
    sets: BTreeMap<String, Set>,
    /// Said in every explanation (other tables the live path did not read).
    notes: Vec<String>,
}

#[derive(Debug, Clone, Default)]
struct Chain {
    base: Option<Base>,
    rules: Vec<Rule>,
}

/// A base chain's `type T hook H priority P; policy X;`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Base {
    kind: String,
    hook: String,
    priority: i32,
    drop_policy: bool,
}

#[derive(Debug, Clone, Default)]
struct Set {
    /// `flags dynamic` or `timeout`: filled by the packet path (affinity).
    dynamic: bool,
    elements: Vec<Element>,
}

#[derive(Debug, Clone)]
struct Element {
    /// The element as written (for the trace).
    text: String,
    /// One literal per part of a concatenated key.
    key: Vec<String>,
    verdict: Option<Stmt>,
    /// `comment "..."` (kube-proxy names the service port there).
    comment: Option<String>,
}

#[derive(Debug, Clone)]
struct Rule {
    text: String,
    items: Vec<Item>,
}

#[derive(Debug, Clone)]
enum Item {
    Match {
        key: Vec<Sel>,
        neg: bool,
        op: Op,
        rhs: Rhs,
    },
    Vmap {
        key: Vec<Sel>,
        map: MapRef,
    },
    Stmt(Stmt),
    /// Something not modelled, from here to the end of the rule.
    Unknown(String),
}

/// A selector: what a match reads from the packet.
#[derive(Debug, Clone, PartialEq)]
enum Sel {
    Saddr(Fam),
    Daddr(Fam),
    L4proto,
    /// `th dport` (None) or `tcp dport` (the protocol it implies).
    Dport(Option<Protocol>),
    Sport,
    CtState,
    CtStatus,
    /// `fib saddr type` (true) or `fib daddr type`.
    FibType(bool),
    Iifname,
    Oif,
    Mark(Option<(BinOp, u32)>),
    Numgen {
        modulus: u32,
        offset: u32,
    },
    NfProto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fam {
    V4,
    V6,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BinOp {
    And,
    Or,
    Xor,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Lt,
    Gt,
    Le,
    Ge,
}

#[derive(Debug, Clone)]
enum Rhs {
    /// `@name`.
    Set(String),
    /// `{ a, b }`.
    Anon(Vec<String>),
    Lit(String),
}

#[derive(Debug, Clone)]
enum MapRef {
    Named(String),
    Anon(Vec<Element>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Stmt {
    Jump(String),
    Goto(String),
    Accept,
    Drop,
    Reject,
    Return,
    Continue,
    Dnat(String),
    /// `masquerade` or `snat`.
    SourceNat,
    Mark(Option<BinOp>, u32),
    /// `update @set { ... }`: session affinity bookkeeping.
    Update(String),
    /// `counter`, `log`, `comment`: no effect on where the packet goes.
    Nothing,
}

/// One way out of a vmap lookup: its share of the matching packets, the
/// element's verdict, and the map and element for the trace (empty map name for
/// an anonymous map).
#[derive(Debug, Clone)]
struct Branch {
    p: f64,
    verdict: Stmt,
    map: String,
    element: String,
    comment: Option<String>,
}

/// How a chain walk ended for one flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Fallthrough,
    Return,
    Accept,
    Drop,
    Reject,
    /// dnat, snat or masquerade: terminal in nftables.
    Nat,
}

/// A value read from the flow.
#[derive(Debug, Clone, PartialEq)]
enum Val {
    Ip(IpAddr),
    Proto(Protocol),
    Port(u16),
    Flags(Vec<&'static str>),
    Text(String),
    Num(u32),
    Rand { modulus: u32, offset: u32 },
}

/// Parse error: the line and why.
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct ParseError {
    pub line: usize,
    pub reason: String,
}

/// Splits `nft list ruleset` output into its tables: (`ip kube-proxy`, that
/// table's listing), in order.
pub fn split_ruleset(text: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut depth = 0i64;
    for line in text.lines() {
        if depth == 0
            && let Some(rest) = line.trim().strip_prefix("table ")
        {
            out.push((rest.trim_end_matches('{').trim().to_string(), String::new()));
        }
        depth += depth_of(line);
        if let Some((_, body)) = out.last_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    out
}

// === impl Table ===

impl Table {
    /// Parses `nft list table FAMILY NAME` output (one table).
    ///
    /// # Errors
    /// No `table` line, an unterminated element list or quote, or a base chain
    /// declaration or priority that does not parse. A rule it does not understand
    /// is not an error: it is kept and noted when traced.
    pub fn parse_listing(text: &str) -> Result<Self, ParseError> {
        let mut t = Table::default();
        let mut lines = text.lines().enumerate().peekable();
        // Where we are: the set/map or chain being read.
        enum In {
            Top,
            Table,
            Set(String),
            Chain(String),
            Other(usize),
        }
        let mut at = In::Top;
        while let Some((i, raw)) = lines.next() {
            let line = raw.trim();
            let err = |reason: String| ParseError {
                line: i + 1,
                reason,
            };
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match &mut at {
                In::Top => {
                    let Some(rest) = line.strip_prefix("table ") else {
                        return Err(err(format!("expected `table`: {line}")));
                    };
                    t.name = rest.trim_end_matches('{').trim().to_string();
                    at = In::Table;
                }
                In::Table => {
                    if line == "}" {
                        at = In::Top;
                    } else if let Some(rest) = line
                        .strip_prefix("set ")
                        .or_else(|| line.strip_prefix("map "))
                    {
                        let name = rest.trim_end_matches('{').trim().to_string();
                        t.sets.entry(name.clone()).or_default();
                        at = In::Set(name);
                    } else if let Some(rest) = line.strip_prefix("chain ") {
                        let name = rest.trim_end_matches('{').trim().to_string();
                        t.chains.entry(name.clone()).or_default();
                        at = In::Chain(name);
                    } else if line.ends_with('{') {
                        at = In::Other(1);
                    }
                    // Table comment, flags: nothing to trace.
                }
                In::Other(depth) => {
                    *depth += line.matches('{').count();
                    *depth = depth.saturating_sub(line.matches('}').count());
                    if *depth == 0 {
                        at = In::Table;
                    }
                }
                In::Set(name) => {
                    if line == "}" {
                        at = In::Table;
                        continue;
                    }
                    let set = t.sets.entry(name.clone()).or_default();
                    if let Some(flags) = line.strip_prefix("flags ") {
                        set.dynamic |= flags.contains("dynamic") || flags.contains("timeout");
                    } else if line.starts_with("timeout ") {
                        set.dynamic = true;
                    } else if let Some(rest) = line.strip_prefix("elements = ") {
                        // An element list may span lines; it ends at its closing brace.
                        let mut body = rest.to_string();
                        let mut depth = depth_of(rest);
                        while depth > 0 {
                            match lines.next() {
                                Some((_, more)) => {
                                    let more = more.trim();
                                    depth += depth_of(more);
                                    body.push(' ');
                                    body.push_str(more);
                                }
                                None => return Err(err("unterminated element list".into())),
                            }
                        }
                        let toks = tokenize(&body).map_err(err)?;
                        set.elements.extend(parse_elements(&toks).map_err(err)?);
                    }
                }
                In::Chain(name) => {
                    if line == "}" {
                        at = In::Table;
                        continue;
                    }
                    let chain = t.chains.entry(name.clone()).or_default();
                    if line.starts_with("type ") && line.contains(" hook ") {
                        chain.base = Some(parse_base(line).map_err(err)?);
                    } else if line.starts_with("comment \"") && chain.rules.is_empty() {
                        // The chain's own comment.
                    } else {
                        chain.rules.push(parse_rule(line).map_err(err)?);
                    }
                }
            }
        }
        if t.name.is_empty() {
            return Err(ParseError {
                line: 0,
                reason: "no table in the listing".into(),
            });
        }
        Ok(t)
    }

    /// Parses an `nft -f` script (what the nftables mode writes) for `table`
    /// (`ip kube-proxy`): `add`/`flush`/`delete` of tables, sets, maps, chains,
    /// rules and elements, applied in order. Lines for other tables are ignored.
    ///
    /// # Errors
    /// A command other than those, or text that does not tokenize (as
    /// [`Table::parse_listing`]).
    pub fn parse_script(text: &str, table: &str) -> Result<Self, ParseError> {
        let mut t = Table {
            name: table.to_string(),
            ..Table::default()
        };
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            let err = |reason: String| ParseError {
                line: i + 1,
                reason,
            };
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut w = line.splitn(3, ' ');
            let (verb, kind) = (w.next().unwrap_or(""), w.next().unwrap_or(""));
            let rest = w.next().unwrap_or("");
            let Some(rest) = rest
                .strip_prefix(table)
                .and_then(|r| r.strip_prefix(' ').or(r.is_empty().then_some("")))
            else {
                continue;
            };
            let (name, body) = rest.split_once(' ').unwrap_or((rest, ""));
            let name = name.to_string();
            match (verb, kind) {
                (_, "table") => {}
                ("add", "set" | "map") => {
                    let set = t.sets.entry(name).or_default();
                    set.dynamic |= body.contains("dynamic") || body.contains("timeout");
                }
                ("flush", "set" | "map") => {
                    if let Some(s) = t.sets.get_mut(&name) {
                        s.elements.clear();
                    }
                }
                ("delete", "set" | "map") => {
                    t.sets.remove(&name);
                }
                ("add", "chain") => {
                    let chain = t.chains.entry(name).or_default();
                    let decl = body.trim().trim_start_matches('{').trim_end_matches('}');
                    if decl.contains(" hook ") {
                        chain.base = Some(parse_base(decl.trim()).map_err(err)?);
                    }
                }
                ("flush", "chain") => {
                    if let Some(c) = t.chains.get_mut(&name) {
                        c.rules.clear();
                    }
                }
                ("delete", "chain") => {
                    t.chains.remove(&name);
                }
                ("add" | "insert", "rule") => {
                    let rule = parse_rule(body).map_err(err)?;
                    let c = t.chains.entry(name).or_default();
                    if verb == "add" {
                        c.rules.push(rule);
                    } else {
                        c.rules.insert(0, rule);
                    }
                }
                ("add" | "delete", "element") => {
                    let toks = tokenize(body).map_err(err)?;
                    let els = parse_elements(&toks).map_err(err)?;
                    let set = t.sets.entry(name).or_default();
                    if verb == "add" {
                        set.elements.extend(els);
                    } else {
                        set.elements.retain(|e| !els.iter().any(|d| d.key == e.key));
                    }
                }
                _ => return Err(err(format!("not understood: {line}"))),
            }
        }
        Ok(t)
    }

    /// Adds a note every explanation from this table carries.
    pub fn with_note(mut self, note: String) -> Self {
        self.notes.push(note);
        self
    }

    /// The table's family and name, `ip kube-proxy`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The base chains of `hook`, in priority order (then by name).
    fn base_chains(&self, hook: &str) -> Vec<(&str, &Base)> {
        let mut v: Vec<(&str, &Base)> = self
            .chains
            .iter()
            .filter_map(|(n, c)| c.base.as_ref().map(|b| (n.as_str(), b)))
            .filter(|(_, b)| b.hook == hook)
            .collect();
        v.sort_by_key(|(n, b)| (b.priority, *n));
        v
    }

    /// Traces a new connection: every way it can go, with its probability.
    ///
    /// Arriving: prerouting, then input (delivered here) or forward by the
    /// destination after DNAT, then postrouting when forwarded. Locally
    /// generated: output, postrouting, and input when it stays on the node.
    pub fn trace(&self, flow: Flow, host: &Host) -> Vec<Flow> {
        let mut flow = flow;
        for n in &self.notes {
            flow.notes.push(Note::Unmodelled(n.clone()));
        }
        let local_src = host.is_local(flow.src);
        let mut done = Vec::new();
        let first = if local_src { "output" } else { "prerouting" };
        let flows = self.hook(vec![flow], first, 0, host, &mut done);
        let mut routed = Vec::new();
        for f in flows {
            let to_local = host.is_local(f.dst.ip());
            if local_src {
                let out = self.hook(vec![f], "postrouting", 20, host, &mut done);
                if to_local {
                    routed.extend(self.hook(out, "input", 30, host, &mut done));
                } else {
                    routed.extend(out);
                }
            } else if to_local {
                routed.extend(self.hook(vec![f], "input", 10, host, &mut done));
            } else {
                let fwd = self.hook(vec![f], "forward", 10, host, &mut done);
                routed.extend(self.hook(fwd, "postrouting", 20, host, &mut done));
            }
        }
        for mut f in routed {
            // An accepting rule does not decide where a DNATed connection goes.
            if f.dnat && f.verdict == Some(Verdict::Accept) {
                f.verdict = None;
            }
            done.push(f);
        }
        done
    }

    /// Walks the flows through every base chain of `hook`; flows dropped or
    /// rejected go to `done`, the rest come back.
    fn hook(
        &self,
        flows: Vec<Flow>,
        hook: &str,
        stage: u8,
        host: &Host,
        done: &mut Vec<Flow>,
    ) -> Vec<Flow> {
        let mut flows = flows;
        for (i, (name, base)) in self.base_chains(hook).into_iter().enumerate() {
            let mut next = Vec::new();
            for mut f in flows {
                // A connection is NATed once per direction: later nat chains of
                // the same kind are not consulted.
                let natted = if hook == "postrouting" || hook == "input" {
                    f.masquerade
                } else {
                    f.dnat
                };
                if base.kind == "nat" && natted {
                    next.push(f);
                    continue;
                }
                f.stage = stage + i as u8;
                let mut out = Vec::new();
                self.run(name, 0, f, host, 0, &mut out);
                for (mut f, end) in out {
                    match end {
                        End::Drop => f.verdict = Some(Verdict::Drop),
                        End::Reject => f.verdict = Some(Verdict::Reject),
                        End::Fallthrough | End::Return if base.drop_policy => {
                            f.verdict = Some(Verdict::Drop)
                        }
                        End::Accept if f.verdict.is_none() => {
                            f.verdict = Some(Verdict::Accept);
                            next.push(f);
                            continue;
                        }
                        _ => {}
                    }
                    if matches!(f.verdict, Some(Verdict::Drop | Verdict::Reject)) {
                        done.push(f);
                    } else {
                        next.push(f);
                    }
                }
            }
            flows = next;
        }
        flows
    }

    fn step(&self, chain: &str, rule: &str, stage: u8) -> Step {
        Step {
            table: self.name.clone(),
            chain: chain.to_string(),
            rule: rule.to_string(),
            stage,
        }
    }

    /// Walks `flow` through `chain` from rule `start`.
    fn run(
        &self,
        chain: &str,
        start: usize,
        mut flow: Flow,
        host: &Host,
        depth: usize,
        out: &mut Vec<(Flow, End)>,
    ) {
        let Some(c) = self.chains.get(chain) else {
            flow.notes.push(Note::Unmodelled(format!(
                "a jump to chain {chain}, which the table does not have"
            )));
            out.push((flow, End::Fallthrough));
            return;
        };
        if depth > MAX_DEPTH {
            flow.notes.push(Note::Unmodelled(format!(
                "jumps nested deeper than {MAX_DEPTH} at {chain}: stopped"
            )));
            out.push((flow, End::Fallthrough));
            return;
        }
        if start == 0
            && let Some(s) = service_of_chain(chain)
        {
            flow.comments.push(s);
        }
        let mut i = start;
        while let Some(rule) = c.rules.get(i) {
            i += 1;
            let Some((p, branches)) = self.eval(rule, &mut flow, host) else {
                continue;
            };
            // The rule matches with probability p; its vmap (if any) splits the
            // matching part further. What matches nothing goes on here.
            let mut taken_total = 0.0;
            let mut paths: Vec<(Flow, Option<Branch>)> = Vec::new();
            match branches {
                None => {
                    let mut t = flow.clone();
                    t.prob *= p;
                    taken_total = p;
                    paths.push((t, None));
                }
                Some(bs) => {
                    for b in bs {
                        let mut t = flow.clone();
                        t.prob *= p * b.p;
                        taken_total += p * b.p;
                        paths.push((t, Some(b)));
                    }
                }
            }
            let mut rest = flow.clone();
            rest.prob *= (1.0 - taken_total).max(0.0);
            for (mut t, via) in paths {
                if t.prob <= 1e-12 {
                    continue;
                }
                t.trace.push(self.step(chain, &rule.text, t.stage));
                let stmts: Vec<Stmt> = match via {
                    Some(b) => {
                        t.comments.extend(b.comment);
                        if !b.map.is_empty() {
                            t.trace
                                .push(self.step(&format!("@{}", b.map), &b.element, t.stage));
                        }
                        vec![b.verdict]
                    }
                    None => rule
                        .items
                        .iter()
                        .filter_map(|it| match it {
                            Item::Stmt(s) => Some(s.clone()),
                            _ => None,
                        })
                        .collect(),
                };
                self.apply(chain, i, &stmts, t, host, depth, out);
            }
            if rest.prob <= 1e-12 {
                return;
            }
            flow = rest;
        }
        out.push((flow, End::Fallthrough));
    }

    /// Runs a matched rule's statements; the flow goes on at rule `next` of
    /// `chain` unless one of them ends it.
    #[allow(clippy::too_many_arguments)]
    fn apply(
        &self,
        chain: &str,
        next: usize,
        stmts: &[Stmt],
        mut f: Flow,
        host: &Host,
        depth: usize,
        out: &mut Vec<(Flow, End)>,
    ) {
        for s in stmts {
            let end = match s {
                Stmt::Nothing => None,
                Stmt::Continue => None,
                Stmt::Update(_) => {
                    f.affinity = true;
                    None
                }
                Stmt::Mark(op, v) => {
                    f.mark = match op {
                        None => *v,
                        Some(BinOp::Or) => f.mark | v,
                        Some(BinOp::Xor) => f.mark ^ v,
                        Some(BinOp::And) => f.mark & v,
                    };
                    None
                }
                Stmt::Accept => Some(End::Accept),
                Stmt::Drop => Some(End::Drop),
                Stmt::Reject => Some(End::Reject),
                Stmt::Return => Some(End::Return),
                Stmt::Dnat(to) => {
                    match parse_dnat(to, f.dst) {
                        Some(dst) => {
                            f.dst = dst;
                            f.dnat = true;
                        }
                        None => f.notes.push(Note::Unmodelled(format!("dnat to {to}"))),
                    }
                    Some(End::Nat)
                }
                Stmt::SourceNat => {
                    f.masquerade = true;
                    Some(End::Nat)
                }
                Stmt::Jump(c) | Stmt::Goto(c) => {
                    let goto = matches!(s, Stmt::Goto(_));
                    let mut sub = Vec::new();
                    self.run(c, 0, f, host, depth + 1, &mut sub);
                    for (f, end) in sub {
                        match end {
                            End::Fallthrough | End::Return if goto => out.push((f, End::Return)),
                            End::Fallthrough | End::Return => {
                                self.run(chain, next, f, host, depth, out)
                            }
                            other => out.push((f, other)),
                        }
                    }
                    return;
                }
            };
            if let Some(end) = end {
                out.push((f, end));
                return;
            }
        }
        self.run(chain, next, f, host, depth, out);
    }

    /// `None`: the rule does not match. `Some((p, None))`: it matches with
    /// probability `p`. `Some((p, Some(branches)))`: it matches with probability
    /// `p` and its vmap gives each branch's verdict with its probability (map
    /// name and element text for the trace).
    fn eval(
        &self,
        rule: &Rule,
        flow: &mut Flow,
        host: &Host,
    ) -> Option<(f64, Option<Vec<Branch>>)> {
        let mut p = 1.0;
        let mut branches = None;
        let mut unknown = None;
        for item in &rule.items {
            match item {
                Item::Stmt(_) => {}
                Item::Unknown(what) => unknown = Some(what.clone()),
                Item::Match { key, neg, op, rhs } => {
                    let vals = self.read(key, flow, host)?;
                    let q = self.matches(&vals, *neg, *op, rhs, flow)?;
                    if q <= 0.0 {
                        return None;
                    }
                    p *= q;
                }
                Item::Vmap { key, map } => {
                    let vals = self.read(key, flow, host)?;
                    let (name, elements): (String, &[Element]) = match map {
                        MapRef::Named(n) => match self.sets.get(n) {
                            Some(s) => (n.clone(), &s.elements),
                            None => {
                                flow.notes.push(Note::Unmodelled(format!(
                                    "a lookup in map {n}, which the table does not have"
                                )));
                                return None;
                            }
                        },
                        MapRef::Anon(els) => (String::new(), els),
                    };
                    let mut bs = Vec::new();
                    let mut left = 1.0;
                    for e in elements {
                        let Some(v) = &e.verdict else { continue };
                        let q = key_probability(&vals, &e.key);
                        if q > 0.0 {
                            let q = q.min(left);
                            left -= q;
                            bs.push(Branch {
                                p: q,
                                verdict: v.clone(),
                                map: name.clone(),
                                element: e.text.clone(),
                                comment: e.comment.clone(),
                            });
                        }
                        if left <= 1e-12 {
                            break;
                        }
                    }
                    if bs.is_empty() {
                        return None;
                    }
                    branches = Some(bs);
                }
            }
        }
        if let Some(what) = unknown {
            flow.notes.push(Note::Unmodelled(format!(
                "`{what}` in rule `{}` (the rule was skipped)",
                rule.text
            )));
            return None;
        }
        Some((p, branches))
    }

    /// The values of a (possibly concatenated) key. `None` when a part has no
    /// value for this packet (`tcp dport` of a UDP packet, an address of the other
    /// family) or is not known.
    fn read(&self, key: &[Sel], flow: &mut Flow, host: &Host) -> Option<Vec<Val>> {
        let fam = if flow.dst.is_ipv4() { Fam::V4 } else { Fam::V6 };
        key.iter()
            .map(|s| {
                Some(match s {
                    Sel::Saddr(f) if *f == fam => Val::Ip(flow.src),
                    Sel::Daddr(f) if *f == fam => Val::Ip(flow.dst.ip()),
                    Sel::Saddr(_) | Sel::Daddr(_) => return None,
                    Sel::L4proto => Val::Proto(flow.protocol),
                    Sel::Dport(Some(p)) if *p != flow.protocol => return None,
                    Sel::Dport(_) => Val::Port(flow.dst.port()),
                    Sel::Sport => {
                        flow.notes
                            .push(Note::Unmodelled("sport (source port unknown)".into()));
                        return None;
                    }
                    Sel::CtState => Val::Flags(vec!["new"]),
                    Sel::CtStatus => Val::Flags(if flow.dnat { vec!["dnat"] } else { vec![] }),
                    Sel::FibType(src) => {
                        let ip = if *src { flow.src } else { flow.dst.ip() };
                        Val::Flags(if host.is_local(ip) {
                            vec!["local"]
                        } else {
                            vec!["unicast"]
                        })
                    }
                    Sel::Iifname => match &host.in_interface {
                        Some(i) => Val::Text(i.clone()),
                        None => {
                            flow.notes.push(Note::Unmodelled(
                                "iifname (the incoming interface is not known)".into(),
                            ));
                            return None;
                        }
                    },
                    Sel::Oif => {
                        flow.notes.push(Note::Unmodelled(
                            "oif/oifname (the outgoing interface is not known)".into(),
                        ));
                        return None;
                    }
                    Sel::Mark(op) => Val::Num(match op {
                        None => flow.mark,
                        Some((BinOp::And, m)) => flow.mark & m,
                        Some((BinOp::Or, m)) => flow.mark | m,
                        Some((BinOp::Xor, m)) => flow.mark ^ m,
                    }),
                    Sel::Numgen { modulus, offset } => Val::Rand {
                        modulus: *modulus,
                        offset: *offset,
                    },
                    Sel::NfProto => Val::Text(if fam == Fam::V4 { "ipv4" } else { "ipv6" }.into()),
                })
            })
            .collect()
    }

    /// The probability that `vals` matches `rhs` (0 or 1 unless a `numgen` is
    /// read). `None` when the right-hand side is not understood (noted).
    fn matches(&self, vals: &[Val], neg: bool, op: Op, rhs: &Rhs, flow: &mut Flow) -> Option<f64> {
        let p = match rhs {
            Rhs::Lit(l) if vals.len() == 1 => {
                let Some(p) = lit_probability(&vals[0], op, l) else {
                    flow.notes
                        .push(Note::Unmodelled(format!("a match against {l}")));
                    return None;
                };
                p
            }
            Rhs::Lit(l) => key_probability(vals, &split_concat(l)),
            Rhs::Anon(els) => {
                let mut p: f64 = 0.0;
                for e in els {
                    p += key_probability(vals, &split_concat(e));
                }
                p.min(1.0)
            }
            Rhs::Set(name) => {
                let Some(set) = self.sets.get(name) else {
                    flow.notes.push(Note::Unmodelled(format!(
                        "a lookup in set {name}, which the table does not have"
                    )));
                    return None;
                };
                if set.dynamic {
                    // Session affinity: a client never seen before is in no such set.
                    flow.affinity = true;
                    0.0
                } else {
                    let mut p: f64 = 0.0;
                    for e in &set.elements {
                        p += key_probability(vals, &e.key);
                    }
                    p.min(1.0)
                }
            }
        };
        Some(if neg { 1.0 - p } else { p })
    }
}

/// How much of the key space of `vals` the literal parts `key` cover: 0 or 1,
/// or a fraction for a `numgen` part.
fn key_probability(vals: &[Val], key: &[String]) -> f64 {
    if vals.len() != key.len() {
        return 0.0;
    }
    let mut p = 1.0;
    for (v, k) in vals.iter().zip(key) {
        p *= lit_probability(v, Op::Eq, k).unwrap_or(0.0);
    }
    p
}

/// Whether the value matches one literal (`198.18.0.0/17`, `tcp`, `80-90`,
/// `established,related`, `0x4000`): 0 or 1, or for a `numgen` the share of its
/// values that match. `None` when the literal is not understood.
fn lit_probability(v: &Val, op: Op, lit: &str) -> Option<f64> {
    let b = |x: bool| if x { 1.0 } else { 0.0 };
    Some(match v {
        Val::Ip(ip) => {
            let lit = lit.trim_start_matches('[').trim_end_matches(']');
            if let Ok(n) = lit.parse::<IpNet>() {
                b(n.contains(ip))
            } else if let Ok(a) = lit.parse::<IpAddr>() {
                b(a == *ip)
            } else if let Some((lo, hi)) = lit.split_once('-') {
                let (lo, hi) = (lo.parse::<IpAddr>().ok()?, hi.parse::<IpAddr>().ok()?);
                b(lo <= *ip && *ip <= hi)
            } else {
                return None;
            }
        }
        Val::Proto(p) => {
            let want = match p {
                Protocol::Tcp => ["tcp", "6"],
                Protocol::Udp => ["udp", "17"],
                Protocol::Sctp => ["sctp", "132"],
            };
            b(want.contains(&lit))
        }
        Val::Port(port) => num_matches(u32::from(*port), op, lit)?,
        Val::Num(n) => num_matches(*n, op, lit)?,
        Val::Flags(have) => b(lit.split(',').any(|l| have.contains(&l.trim()))),
        Val::Text(t) => {
            let lit = lit.trim_matches('"');
            b(match lit.strip_suffix('*') {
                Some(prefix) => t.starts_with(prefix),
                None => t == lit,
            })
        }
        Val::Rand { modulus, offset } => {
            if *modulus == 0 {
                return None;
            }
            let mut hits = 0u32;
            for x in *offset..offset.saturating_add(*modulus) {
                if num_matches(x, op, lit)? > 0.0 {
                    hits += 1;
                }
            }
            f64::from(hits) / f64::from(*modulus)
        }
    })
}

fn num_matches(n: u32, op: Op, lit: &str) -> Option<f64> {
    let hit = if let Some((lo, hi)) = lit.split_once('-') {
        let (lo, hi) = (parse_num(lo)?, parse_num(hi)?);
        op == Op::Eq && lo <= n && n <= hi
    } else {
        let v = parse_num(lit)?;
        match op {
            Op::Eq => n == v,
            Op::Lt => n < v,
            Op::Gt => n > v,
            Op::Le => n <= v,
            Op::Ge => n >= v,
        }
    };
    Some(if hit { 1.0 } else { 0.0 })
}

fn parse_num(s: &str) -> Option<u32> {
    match s.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

fn parse_dnat(to: &str, old: SocketAddr) -> Option<SocketAddr> {
    if let Ok(sa) = to.parse::<SocketAddr>() {
        return Some(sa);
    }
    let ip = to.trim_start_matches('[').trim_end_matches(']');
    ip.parse::<IpAddr>()
        .ok()
        .map(|ip| SocketAddr::new(ip, old.port()))
}

/// `ns/name:port` (`ns/name` for an unnamed port) from the name of one of the
/// nftables mode's per-service chains: `service-HASH-ns/name/proto/port`, and
/// `external-`, `local-`, `firewall-`, `endpoint-` (`...__ip/port`) alike.
fn service_of_chain(chain: &str) -> Option<String> {
    let (kind, rest) = chain.split_once('-')?;
    if !matches!(
        kind,
        "service" | "external" | "local" | "firewall" | "endpoint"
    ) {
        return None;
    }
    let (_hash, base) = rest.split_once('-')?;
    let base = base.split("__").next()?;
    let mut parts = base.split('/');
    let (ns, name, _proto, port) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if ns.is_empty() || name.is_empty() || parts.next().is_some() {
        return None;
    }
    Some(if port.is_empty() {
        format!("{ns}/{name}")
    } else {
        format!("{ns}/{name}:{port}")
    })
}

/// `type filter hook prerouting priority dstnat - 10; policy accept;`
fn parse_base(decl: &str) -> Result<Base, String> {
    let mut kind = String::new();
    let mut hook = String::new();
    let mut priority = None;
    let mut drop_policy = false;
    for part in decl.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let words: Vec<&str> = part.split_whitespace().collect();
        match words.first().copied() {
            Some("type") => {
                let mut it = words.iter();
                while let Some(w) = it.next() {
                    match *w {
                        "type" => kind = it.next().unwrap_or(&"").to_string(),
                        "hook" => hook = it.next().unwrap_or(&"").to_string(),
                        "priority" => {
                            let expr: Vec<&str> = it.by_ref().copied().collect();
                            priority = Some(parse_priority(&expr)?);
                        }
                        _ => {}
                    }
                }
            }
            Some("policy") => drop_policy = words.get(1) == Some(&"drop"),
            _ => {}
        }
    }
    if kind.is_empty() || hook.is_empty() {
        return Err(format!("not a base chain declaration: {decl}"));
    }
    Ok(Base {
        kind,
        hook,
        priority: priority.unwrap_or(0),
        drop_policy,
    })
}

/// `-110`, `dstnat`, `dstnat - 10`, `filter + 5` (the ip family's names).
fn parse_priority(expr: &[&str]) -> Result<i32, String> {
    let named = |w: &str| -> Option<i32> {
        Some(match w {
            "raw" => -300,
            "mangle" => -150,
            "dstnat" => -100,
            "filter" => 0,
            "security" => 50,
            "srcnat" => 100,
            _ => w.parse().ok()?,
        })
    };
    let bad = || format!("priority {}", expr.join(" "));
    match expr {
        [v] => named(v).ok_or_else(bad),
        [v, "-", n] => Ok(named(v).ok_or_else(bad)? - n.parse::<i32>().map_err(|_| bad())?),
        [v, "+", n] => Ok(named(v).ok_or_else(bad)? + n.parse::<i32>().map_err(|_| bad())?),
        _ => Err(bad()),
    }
}

/// Splits nft text into words: quoted strings whole, `{` `}` `;` on their own,
/// and `,` on its own inside braces (outside, `established,related` is one word).
fn tokenize(text: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut depth = 0usize;
    let mut chars = text.chars();
    let flush = |cur: &mut String, out: &mut Vec<String>| {
        if !cur.is_empty() {
            out.push(std::mem::take(cur));
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                cur.push('"');
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => {
                            if let Some(n) = chars.next() {
                                cur.push(n);
                            }
                        }
                        Some(x) => cur.push(x),
                        None => return Err("unterminated quote".into()),
                    }
                }
                cur.push('"');
            }
            '{' | '}' | ';' => {
                flush(&mut cur, &mut out);
                if c == '{' {
                    depth += 1;
                } else if c == '}' {
                    depth = depth.saturating_sub(1);
                }
                out.push(c.to_string());
            }
            ',' if depth > 0 => {
                flush(&mut cur, &mut out);
                out.push(",".into());
            }
            c if c.is_whitespace() => flush(&mut cur, &mut out),
            c => cur.push(c),
        }
    }
    flush(&mut cur, &mut out);
    Ok(out)
}

/// Open braces minus closed ones (outside quotes).
fn depth_of(text: &str) -> i64 {
    let mut d = 0i64;
    let mut quoted = false;
    for c in text.chars() {
        match c {
            '"' => quoted = !quoted,
            '{' if !quoted => d += 1,
            '}' if !quoted => d -= 1,
            _ => {}
        }
    }
    d
}

/// `a . b . c` -> parts.
fn split_concat(s: &str) -> Vec<String> {
    s.split(" . ").map(|p| p.trim().to_string()).collect()
}

/// The tokens of a brace group `{ ... }` starting at `toks[i]`, split at its
/// top-level commas; and the index after the closing brace.
fn brace_items(toks: &[String], i: usize) -> Result<(Vec<Vec<String>>, usize), String> {
    if toks.get(i).map(String::as_str) != Some("{") {
        return Err("expected `{`".into());
    }
    let mut items = vec![Vec::new()];
    let mut depth = 0;
    let mut j = i;
    while let Some(t) = toks.get(j) {
        j += 1;
        match t.as_str() {
            "{" => {
                depth += 1;
                if depth == 1 {
                    continue;
                }
            }
            "}" => {
                depth -= 1;
                if depth == 0 {
                    items.retain(|v: &Vec<String>| !v.is_empty());
                    return Ok((items, j));
                }
            }
            "," if depth == 1 => {
                items.push(Vec::new());
                continue;
            }
            _ => {}
        }
        if let Some(last) = items.last_mut() {
            last.push(t.clone());
        }
    }
    Err("unterminated `{`".into())
}

/// Elements of `{ k1 . k2 : verdict, ... }` (set elements have no verdict;
/// `timeout`, `expires`, `comment`, `counter` after a key are skipped).
fn parse_elements(toks: &[String]) -> Result<Vec<Element>, String> {
    let (items, _) = brace_items(toks, 0)?;
    items.iter().map(|item| parse_element(item)).collect()
}

fn parse_element(item: &[String]) -> Result<Element, String> {
    let (key_toks, verdict_toks) = match item.iter().position(|t| t == ":") {
        Some(i) => (&item[..i], Some(&item[i + 1..])),
        None => (item, None),
    };
    let mut key = Vec::new();
    let mut expect_part = true;
    for t in key_toks {
        match t.as_str() {
            "." => expect_part = true,
            "timeout" | "expires" | "comment" | "counter" => break,
            _ if expect_part => {
                key.push(t.clone());
                expect_part = false;
            }
            _ => {}
        }
    }
    if key.is_empty() {
        return Err(format!("an element without a key: {}", item.join(" ")));
    }
    let verdict = match verdict_toks {
        None => None,
        Some(v) => match parse_stmt(v, 0) {
            Some((s, _)) => Some(s),
            None => return Err(format!("not a verdict: {}", v.join(" "))),
        },
    };
    let comment = item
        .iter()
        .position(|t| t == "comment")
        .and_then(|i| item.get(i + 1))
        .map(|c| c.trim_matches('"').to_string());
    Ok(Element {
        text: item.join(" "),
        key,
        verdict,
        comment,
    })
}

/// Parses one rule body (the part after `add rule TABLE CHAIN`, or one line of
/// a listed chain).
fn parse_rule(text: &str) -> Result<Rule, String> {
    let toks = tokenize(text)?;
    let mut items = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        if let Some((s, next)) = parse_stmt(&toks, i) {
            items.push(Item::Stmt(s));
            i = next;
            continue;
        }
        match parse_match(&toks, i) {
            Some((item, next)) => {
                items.push(item);
                i = next;
            }
            None => {
                items.push(Item::Unknown(toks[i..].join(" ")));
                break;
            }
        }
    }
    Ok(Rule {
        text: text.trim().to_string(),
        items,
    })
}

/// A statement at `toks[i]`, and the index after it.
fn parse_stmt(toks: &[String], i: usize) -> Option<(Stmt, usize)> {
    let t = |k: usize| toks.get(i + k).map(String::as_str);
    let flags = |mut j: usize| {
        while matches!(
            toks.get(j).map(String::as_str),
            Some("fully-random" | "random" | "persistent")
        ) {
            j += 1;
        }
        j
    };
    Some(match t(0)? {
        "jump" => (Stmt::Jump(t(1)?.to_string()), i + 2),
        "goto" => (Stmt::Goto(t(1)?.to_string()), i + 2),
        "accept" => (Stmt::Accept, i + 1),
        "drop" => (Stmt::Drop, i + 1),
        "return" => (Stmt::Return, i + 1),
        "continue" => (Stmt::Continue, i + 1),
        "reject" => {
            // `reject`, `reject with tcp reset`, `reject with icmpx admin-prohibited`,
            // `reject with icmp type port-unreachable`.
            let j = match (t(1), t(3)) {
                (Some("with"), Some("type")) => i + 5,
                (Some("with"), _) => i + 4,
                _ => i + 1,
            };
            (Stmt::Reject, j)
        }
        "counter" => {
            if t(1) == Some("packets") {
                (Stmt::Nothing, i + 5)
            } else {
                (Stmt::Nothing, i + 1)
            }
        }
        "comment" => (Stmt::Nothing, i + 2),
        "log" => {
            let mut j = i + 1;
            while matches!(
                toks.get(j).map(String::as_str),
                Some("prefix" | "level" | "flags" | "group" | "snaplen" | "queue-threshold")
            ) {
                j += 2;
            }
            (Stmt::Nothing, j)
        }
        "dnat" => {
            let mut j = i + 1;
            if matches!(t(1), Some("ip" | "ip6")) {
                j += 1;
            }
            if toks.get(j).map(String::as_str) != Some("to") {
                return None;
            }
            let to = toks.get(j + 1)?;
            // `dnat to ip daddr map { ... }` and the like: not a literal.
            if !to.starts_with(|c: char| c.is_ascii_hexdigit() || c == '[' || c == ':') {
                return None;
            }
            (Stmt::Dnat(to.clone()), flags(j + 2))
        }
        "snat" => {
            let mut j = i + 1;
            if matches!(t(1), Some("ip" | "ip6")) {
                j += 1;
            }
            if toks.get(j).map(String::as_str) != Some("to") {
                return None;
            }
            (Stmt::SourceNat, flags(j + 2))
        }
        "masquerade" => {
            let mut j = flags(i + 1);
            if toks.get(j).map(String::as_str) == Some("to") {
                j += 2;
            }
            (Stmt::SourceNat, flags(j))
        }
        "update" | "add" if t(1).is_some_and(|s| s.starts_with('@')) => {
            let set = t(1)?.trim_start_matches('@').to_string();
            let (_, next) = brace_items(toks, i + 2).ok()?;
            (Stmt::Update(set), next)
        }
        "meta" if t(1) == Some("mark") && t(2) == Some("set") => mark_set(toks, i + 3)?,
        "mark" if t(1) == Some("set") => mark_set(toks, i + 2)?,
        _ => return None,
    })
}

/// `meta mark | 0x4000`, `mark or 0x4000`, `0x4000` after `mark set`.
fn mark_set(toks: &[String], i: usize) -> Option<(Stmt, usize)> {
    let t = |k: usize| toks.get(i + k).map(String::as_str);
    let mut j = i;
    if t(0) == Some("meta") && t(1) == Some("mark") {
        j += 2;
    } else if t(0) == Some("mark") {
        j += 1;
    } else {
        let v = parse_num(t(0)?)?;
        return Some((Stmt::Mark(None, v), i + 1));
    }
    let op = binop(toks.get(j)?)?;
    let v = parse_num(toks.get(j + 1)?)?;
    Some((Stmt::Mark(Some(op), v), j + 2))
}

fn binop(t: &str) -> Option<BinOp> {
    Some(match t {
        "&" | "and" => BinOp::And,
        "|" | "or" => BinOp::Or,
        "^" | "xor" => BinOp::Xor,
        _ => return None,
    })
}

/// One selector at `toks[i]`, and the index after it.
fn parse_sel(toks: &[String], i: usize) -> Option<(Sel, usize)> {
    let t = |k: usize| toks.get(i + k).map(String::as_str);
    let fam = |w: &str| if w == "ip" { Fam::V4 } else { Fam::V6 };
    let proto = |w: &str| match w {
        "tcp" => Some(Protocol::Tcp),
        "udp" => Some(Protocol::Udp),
        "sctp" => Some(Protocol::Sctp),
        _ => None,
    };
    Some(match (t(0)?, t(1)) {
        (f @ ("ip" | "ip6"), Some("saddr")) => (Sel::Saddr(fam(f)), i + 2),
        (f @ ("ip" | "ip6"), Some("daddr")) => (Sel::Daddr(fam(f)), i + 2),
        ("ip", Some("protocol")) | ("ip6", Some("nexthdr")) | ("meta", Some("l4proto")) => {
            (Sel::L4proto, i + 2)
        }
        ("meta", Some("nfproto")) => (Sel::NfProto, i + 2),
        ("meta", Some("mark")) => (Sel::Mark(None), i + 2),
        ("mark", _) => (Sel::Mark(None), i + 1),
        ("meta", Some("iifname")) => (Sel::Iifname, i + 2),
        ("iifname", _) => (Sel::Iifname, i + 1),
        ("meta", Some("oifname" | "oif")) => (Sel::Oif, i + 2),
        ("oifname" | "oif", _) => (Sel::Oif, i + 1),
        ("th", Some("dport")) => (Sel::Dport(None), i + 2),
        (p @ ("tcp" | "udp" | "sctp"), Some("dport")) => (Sel::Dport(proto(p)), i + 2),
        ("th" | "tcp" | "udp" | "sctp", Some("sport")) => (Sel::Sport, i + 2),
        ("ct", Some("state")) => (Sel::CtState, i + 2),
        ("ct", Some("status")) => (Sel::CtStatus, i + 2),
        ("fib", Some(dir @ ("saddr" | "daddr"))) if t(2) == Some("type") => {
            (Sel::FibType(dir == "saddr"), i + 3)
        }
        ("numgen", Some("random")) if t(2) == Some("mod") => {
            let modulus = parse_num(t(3)?)?;
            if t(4) == Some("offset") {
                let offset = parse_num(t(5)?)?;
                (Sel::Numgen { modulus, offset }, i + 6)
            } else {
                (Sel::Numgen { modulus, offset: 0 }, i + 4)
            }
        }
        _ => return None,
    })
}

/// A match or a vmap lookup at `toks[i]`, and the index after it.
fn parse_match(toks: &[String], i: usize) -> Option<(Item, usize)> {
    let (first, mut j) = parse_sel(toks, i)?;
    let mut key = vec![first];
    while toks.get(j).map(String::as_str) == Some(".") {
        let (s, n) = parse_sel(toks, j + 1)?;
        key.push(s);
        j = n;
    }
    if key.len() == 1
        && let Sel::Mark(None) = key[0]
        && let Some(op) = toks.get(j).and_then(|t| binop(t))
    {
        let m = parse_num(toks.get(j + 1)?)?;
        key[0] = Sel::Mark(Some((op, m)));
        j += 2;
    }
    let (neg, op) = match toks.get(j).map(String::as_str) {
        Some("==" | "eq") => (false, Some(Op::Eq)),
        Some("!=" | "ne") => (true, Some(Op::Eq)),
        Some("<" | "lt") => (false, Some(Op::Lt)),
        Some(">" | "gt") => (false, Some(Op::Gt)),
        Some("<=" | "le") => (false, Some(Op::Le)),
        Some(">=" | "ge") => (false, Some(Op::Ge)),
        _ => (false, None),
    };
    if op.is_some() {
        j += 1;
    }
    let op = op.unwrap_or(Op::Eq);
    let next = toks.get(j)?;
    if next == "vmap" && !neg {
        let target = toks.get(j + 1)?;
        if let Some(name) = target.strip_prefix('@') {
            return Some((
                Item::Vmap {
                    key,
                    map: MapRef::Named(name.to_string()),
                },
                j + 2,
            ));
        }
        let (items, after) = brace_items(toks, j + 1).ok()?;
        let els: Option<Vec<Element>> = items.iter().map(|it| parse_element(it).ok()).collect();
        return Some((
            Item::Vmap {
                key,
                map: MapRef::Anon(els?),
            },
            after,
        ));
    }
    let (rhs, after) = if let Some(name) = next.strip_prefix('@') {
        (Rhs::Set(name.to_string()), j + 1)
    } else if next == "{" {
        let (items, after) = brace_items(toks, j).ok()?;
        (
            Rhs::Anon(items.iter().map(|it| it.join(" ")).collect()),
            after,
        )
    } else if matches!(next.as_str(), ";" | "}" | ",") {
        return None;
    } else {
        // A concatenated key against a literal is written `a . b`.
        let mut lit = vec![next.clone()];
        let mut k = j + 1;
        for _ in 1..key.len() {
            if toks.get(k).map(String::as_str) != Some(".") {
                return None;
            }
            lit.push(toks.get(k + 1)?.clone());
            k += 2;
        }
        (Rhs::Lit(lit.join(" . ")), k)
    };
    Some((Item::Match { key, neg, op, rhs }, after))
}

#[cfg(test)]
mod tests;
