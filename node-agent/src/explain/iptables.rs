//! The iptables half of the tracer: `iptables-save` text parsed into tables,
//! chains and rules, and one new connection walked through them. Every branch of a
//! `-m statistic` rule is followed with its probability, so the walk ends in a set
//! of weighted [`Flow`]s rather than one.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use super::{Flow, Host, Note, Step};

/// The deepest jump nesting followed (a loop in hand-edited rules stops here).
const MAX_DEPTH: usize = 32;

/// A rule set as `iptables-save` prints it: table -> chain.
#[derive(Debug, Clone, Default)]
pub struct Tables {
    tables: BTreeMap<String, BTreeMap<String, Chain>>,
}

#[derive(Debug, Clone, Default)]
struct Chain {
    /// `ACCEPT`/`DROP` for a built-in chain.
    policy: Option<String>,
    rules: Vec<Rule>,
}

#[derive(Debug, Clone)]
struct Rule {
    /// The rule as `iptables -S` prints it (`-A CHAIN ...`).
    text: String,
    matches: Vec<(bool, Match)>,
    target: Target,
    comment: Option<String>,
}

#[derive(Debug, Clone)]
enum Match {
    Src(IpNet),
    Dst(IpNet),
    Proto(String),
    DPort(u16, u16),
    /// `--sport`: a new connection's source port is not known.
    SPort,
    SrcType(String),
    DstType(String),
    CtState(Vec<String>),
    Mark(u32, u32),
    Probability(f64),
    /// `-m recent --rcheck/--update`: a client seen before (affinity).
    RecentCheck,
    /// `-m set --match-set NAME FLAGS`.
    Set(String, Vec<String>),
    InIface(String),
    /// `-o`: the outgoing interface is not known.
    OutIface,
    /// A match the tracer does not model; it never matches.
    Unknown(String),
}

#[derive(Debug, Clone)]
enum Target {
    None,
    Jump(String),
    Goto(String),
    Accept,
    Drop,
    Reject,
    Return,
    Dnat(String),
    OrMark(u32),
    XorMark(u32),
    SetMark(u32, u32),
    Masquerade,
    Snat,
    /// A target with no effect on where the packet goes (`LOG`, ...).
    Other,
}

/// How a chain walk ended for one flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The end of the chain (the policy of a built-in chain applies).
    Fallthrough,
    Return,
    Accept,
    Drop,
    Reject,
    /// DNAT, MASQUERADE or SNAT: a nat table's chains stop here.
    Nat,
}

/// Parse error: the line and why.
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct ParseError {
    pub line: usize,
    pub reason: String,
}

// === impl Tables ===

impl Tables {
    /// Parses `iptables-save` (or `iptables-restore`) text. `:CHAIN POLICY` lines
    /// declare chains, `-A` lines append rules; `-N`/`-X`/`-F` are accepted.
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        let mut t = Tables::default();
        let mut table: Option<String> = None;
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            let err = |reason: String| ParseError {
                line: i + 1,
                reason,
            };
            if line.is_empty() || line.starts_with('#') || line == "COMMIT" {
                continue;
            }
            if let Some(name) = line.strip_prefix('*') {
                table = Some(name.to_string());
                t.tables.entry(name.to_string()).or_default();
                continue;
            }
            let Some(tname) = table.clone() else {
                return Err(err("a rule before any *table line".into()));
            };
            let chains = t.tables.entry(tname).or_default();
            if let Some(decl) = line.strip_prefix(':') {
                let mut f = decl.split_whitespace();
                let name = f.next().unwrap_or_default().to_string();
                let policy = f.next().filter(|p| *p != "-").map(str::to_string);
                chains.entry(name).or_default().policy = policy;
                continue;
            }
            let words = split_words(line).map_err(err)?;
            match words.first().map(String::as_str) {
                Some("-A") => {
                    let chain = words
                        .get(1)
                        .ok_or_else(|| err("-A without a chain".into()))?;
                    let rule = parse_rule(line, &words[2..]).map_err(err)?;
                    chains.entry(chain.clone()).or_default().rules.push(rule);
                }
                Some("-N") | Some("-X") | Some("-F") => {
                    if let Some(c) = words.get(1) {
                        chains.entry(c.clone()).or_default();
                    }
                }
                _ => return Err(err(format!("not a rule: {line}"))),
            }
        }
        Ok(t)
    }

    /// Appends rules given as `iptables -C` takes them (the built-in chain jumps a
    /// rendered rule set leaves out), unless the same rule is already there.
    pub fn add_rule(&mut self, table: &str, chain: &str, rule: &str) -> Result<(), ParseError> {
        let line = format!("-A {chain} {rule}");
        let words = split_words(&line).map_err(|reason| ParseError { line: 0, reason })?;
        let parsed =
            parse_rule(&line, &words[2..]).map_err(|reason| ParseError { line: 0, reason })?;
        let c = self
            .tables
            .entry(table.to_string())
            .or_default()
            .entry(chain.to_string())
            .or_default();
        if !c.rules.iter().any(|r| r.text == line) {
            c.rules.push(parsed);
        }
        Ok(())
    }

    /// Walks `flow` through `chain` of `table`; every flow that comes out, with how
    /// it ended. A missing chain is walked as empty.
    pub fn walk(&self, table: &str, chain: &str, flow: Flow, host: &Host) -> Vec<(Flow, End)> {
        let mut out = Vec::new();
        self.run(table, chain, 0, flow, host, 0, &mut out);
        out
    }

    /// The policy of a built-in chain (`ACCEPT` when not stated).
    pub fn policy(&self, table: &str, chain: &str) -> &str {
        self.tables
            .get(table)
            .and_then(|t| t.get(chain))
            .and_then(|c| c.policy.as_deref())
            .unwrap_or("ACCEPT")
    }

    /// Applies a matched rule's target to `taken`: the flow to go on with at rule
    /// `next` of this chain, or `None` when it ended (pushed to `out`) or a jump
    /// already walked the rest of this chain.
    #[allow(clippy::too_many_arguments)]
    fn apply(
        &self,
        table: &str,
        chain: &str,
        next: usize,
        rule: &Rule,
        mut taken: Flow,
        host: &Host,
        depth: usize,
        out: &mut Vec<(Flow, End)>,
    ) -> Option<Flow> {
        taken.trace.push(Step {
            table: table.to_string(),
            chain: chain.to_string(),
            rule: rule.text.clone(),
            stage: taken.stage,
        });
        if let Some(c) = &rule.comment {
            taken.comments.push(c.clone());
        }
        if rule.text.contains("-m recent") {
            taken.affinity = true;
        }
        let end = match &rule.target {
            Target::None | Target::Other => None,
            Target::OrMark(m) => {
                taken.mark |= m;
                None
            }
            Target::XorMark(m) => {
                taken.mark ^= m;
                None
            }
            Target::SetMark(v, m) => {
                taken.mark = (taken.mark & !m) ^ v;
                None
            }
            Target::Accept => Some(End::Accept),
            Target::Drop => Some(End::Drop),
            Target::Reject => Some(End::Reject),
            Target::Return => Some(End::Return),
            Target::Dnat(to) => {
                match parse_dnat(to, taken.dst) {
                    Some(dst) => {
                        taken.dst = dst;
                        taken.dnat = true;
                    }
                    None => taken.notes.push(Note::Unmodelled(format!("DNAT to {to}"))),
                }
                Some(End::Nat)
            }
            Target::Masquerade | Target::Snat => {
                taken.masquerade = true;
                Some(End::Nat)
            }
            Target::Jump(c) | Target::Goto(c) => {
                let goto = matches!(rule.target, Target::Goto(_));
                let mut sub = Vec::new();
                self.run(table, c, 0, taken, host, depth + 1, &mut sub);
                for (f, end) in sub {
                    match end {
                        End::Fallthrough | End::Return if goto => out.push((f, End::Return)),
                        End::Fallthrough | End::Return => {
                            self.run(table, chain, next, f, host, depth, out)
                        }
                        other => out.push((f, other)),
                    }
                }
                return None;
            }
        };
        match end {
            None => Some(taken),
            Some(end) => {
                out.push((taken, end));
                None
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        table: &str,
        chain: &str,
        start: usize,
        mut flow: Flow,
        host: &Host,
        depth: usize,
        out: &mut Vec<(Flow, End)>,
    ) {
        let Some(rules) = self.tables.get(table).and_then(|t| t.get(chain)) else {
            out.push((flow, End::Fallthrough));
            return;
        };
        if depth > MAX_DEPTH {
            flow.notes.push(Note::Unmodelled(format!(
                "jumps nested deeper than {MAX_DEPTH} at {table}/{chain}: stopped"
            )));
            out.push((flow, End::Fallthrough));
            return;
        }
        let mut i = start;
        while let Some(rule) = rules.rules.get(i) {
            i += 1;
            let p = match rule.eval(&mut flow, host) {
                None => continue,
                Some(p) => p,
            };
            let mut taken = flow.clone();
            let mut rest = None;
            if p < 1.0 {
                // The rule matches with probability p: the other branch goes on
                // here, after the taken one (so the trace reads in rule order).
                taken.prob *= p;
                let mut r = flow.clone();
                r.prob *= 1.0 - p;
                rest = Some(r).filter(|r| r.prob > 1e-12);
            }
            let cont = if taken.prob > 1e-12 {
                self.apply(table, chain, i, rule, taken, host, depth, out)
            } else {
                None
            };
            match (cont, rest) {
                (Some(f), None) => flow = f,
                (None, None) => return,
                (cont, Some(r)) => {
                    if let Some(f) = cont {
                        self.run(table, chain, i, f, host, depth, out);
                    }
                    self.run(table, chain, i, r, host, depth, out);
                    return;
                }
            }
        }
        out.push((flow, End::Fallthrough));
    }
}

// === impl Rule ===

impl Rule {
    /// `None`: no match. `Some(p)`: matches with probability `p` (1 unless a
    /// `-m statistic` match is in it).
    fn eval(&self, flow: &mut Flow, host: &Host) -> Option<f64> {
        let mut p = 1.0;
        for (neg, m) in &self.matches {
            let hit = match m {
                Match::Probability(q) => {
                    p *= q;
                    true
                }
                Match::Src(n) => n.contains(&flow.src),
                Match::Dst(n) => n.contains(&flow.dst.ip()),
                Match::Proto(proto) => proto == flow.protocol.as_lower() || proto == "all",
                Match::DPort(lo, hi) => (*lo..=*hi).contains(&flow.dst.port()),
                // A new connection's source port is not known: not modelled.
                Match::SPort => {
                    flow.notes
                        .push(Note::Unmodelled("--sport (source port unknown)".into()));
                    false
                }
                Match::SrcType(t) => t == "LOCAL" && host.is_local(flow.src),
                Match::DstType(t) => t == "LOCAL" && host.is_local(flow.dst.ip()),
                Match::CtState(states) => states
                    .iter()
                    .any(|s| flow.ct_states().contains(&s.as_str())),
                Match::Mark(v, m) => flow.mark & m == *v,
                Match::RecentCheck => {
                    flow.affinity = true;
                    false
                }
                Match::Set(name, dirs) => host.set_matches(name, dirs, flow),
                Match::InIface(i) => host.in_interface.as_deref() == Some(i.as_str()),
                Match::OutIface => {
                    flow.notes.push(Note::Unmodelled(
                        "-o (the outgoing interface is not known)".into(),
                    ));
                    false
                }
                Match::Unknown(what) => {
                    flow.notes.push(Note::Unmodelled(what.clone()));
                    false
                }
            };
            if hit == *neg {
                return None;
            }
        }
        Some(p)
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

fn parse_net(v: &str) -> Result<IpNet, String> {
    v.parse::<IpNet>()
        .or_else(|_| v.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("not an address or network: {v}"))
}

fn parse_ports(v: &str) -> Result<(u16, u16), String> {
    let bad = || format!("not a port or range: {v}");
    match v.split_once(':') {
        Some((a, b)) => Ok((a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?)),
        None => {
            let p = v.parse().map_err(|_| bad())?;
            Ok((p, p))
        }
    }
}

fn parse_u32(v: &str) -> Result<u32, String> {
    let r = match v.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16),
        None => v.parse(),
    };
    r.map_err(|_| format!("not a number: {v}"))
}

fn parse_mark(v: &str) -> Result<(u32, u32), String> {
    match v.split_once('/') {
        Some((a, b)) => Ok((parse_u32(a)?, parse_u32(b)?)),
        None => Ok((parse_u32(v)?, u32::MAX)),
    }
}

/// Parses the words of one rule after `-A CHAIN`.
fn parse_rule(text: &str, words: &[String]) -> Result<Rule, String> {
    let mut matches = Vec::new();
    let mut target = Target::None;
    let mut comment = None;
    let mut neg = false;
    let mut module = String::new();
    let mut it = words.iter().peekable();
    let value = |it: &mut std::iter::Peekable<std::slice::Iter<'_, String>>, opt: &str| {
        it.next()
            .cloned()
            .ok_or_else(|| format!("{opt} without a value"))
    };
    while let Some(w) = it.next() {
        let w = w.as_str();
        if w == "!" {
            neg = true;
            continue;
        }
        let m = match w {
            "-s" | "--source" => Some(Match::Src(parse_net(&value(&mut it, w)?)?)),
            "-d" | "--destination" => Some(Match::Dst(parse_net(&value(&mut it, w)?)?)),
            "-p" | "--protocol" => Some(Match::Proto(value(&mut it, w)?.to_lowercase())),
            "-i" | "--in-interface" => Some(Match::InIface(value(&mut it, w)?)),
            "-o" | "--out-interface" => {
                value(&mut it, w)?;
                Some(Match::OutIface)
            }
            "-m" | "--match" => {
                module = value(&mut it, w)?;
                None
            }
            "--dport" | "--destination-port" => {
                let (a, b) = parse_ports(&value(&mut it, w)?)?;
                Some(Match::DPort(a, b))
            }
            "--sport" | "--source-port" => {
                parse_ports(&value(&mut it, w)?)?;
                Some(Match::SPort)
            }
            "--dst-type" => Some(Match::DstType(value(&mut it, w)?)),
            "--src-type" => Some(Match::SrcType(value(&mut it, w)?)),
            "--ctstate" | "--state" => Some(Match::CtState(
                value(&mut it, w)?.split(',').map(str::to_string).collect(),
            )),
            "--mark" if module == "mark" => {
                let (v, m) = parse_mark(&value(&mut it, w)?)?;
                Some(Match::Mark(v, m))
            }
            "--mode" => {
                value(&mut it, w)?;
                None
            }
            "--probability" => {
                let v = value(&mut it, w)?;
                Some(Match::Probability(
                    v.parse().map_err(|_| format!("bad probability {v}"))?,
                ))
            }
            "--comment" => {
                comment = Some(value(&mut it, w)?);
                None
            }
            "--match-set" => {
                let name = value(&mut it, w)?;
                let dirs = value(&mut it, w)?;
                Some(Match::Set(
                    name,
                    dirs.split(',').map(str::to_string).collect(),
                ))
            }
            "--rcheck" | "--update" => Some(Match::RecentCheck),
            "--set" | "--rsource" | "--rdest" | "--reap" | "--mask" | "--name" | "--seconds"
                if module == "recent" =>
            {
                if matches!(w, "--name" | "--seconds" | "--mask") {
                    value(&mut it, w)?;
                }
                None
            }
            "-j" | "--jump" | "-g" | "--goto" => {
                let t = value(&mut it, w)?;
                target = match t.as_str() {
                    "ACCEPT" => Target::Accept,
                    "DROP" => Target::Drop,
                    "REJECT" => Target::Reject,
                    "RETURN" => Target::Return,
                    "DNAT" => Target::Dnat(String::new()),
                    "MARK" => Target::SetMark(0, 0),
                    "MASQUERADE" => Target::Masquerade,
                    "SNAT" => Target::Snat,
                    "LOG" | "NFLOG" | "TRACE" | "CT" | "CONNMARK" | "NOTRACK" => Target::Other,
                    _ if w == "-g" || w == "--goto" => Target::Goto(t),
                    _ => Target::Jump(t),
                };
                module.clear();
                None
            }
            "--to-destination" => {
                target = Target::Dnat(value(&mut it, w)?);
                None
            }
            "--or-mark" => {
                target = Target::OrMark(parse_u32(&value(&mut it, w)?)?);
                None
            }
            "--xor-mark" => {
                target = Target::XorMark(parse_u32(&value(&mut it, w)?)?);
                None
            }
            "--set-xmark" | "--set-mark" => {
                let (v, m) = parse_mark(&value(&mut it, w)?)?;
                target = Target::SetMark(v, m);
                None
            }
            "--random-fully" | "--random" | "--persistent" => None,
            "--reject-with" | "--to-source" | "--to-ports" | "--log-prefix" => {
                value(&mut it, w)?;
                None
            }
            other if other.starts_with('-') => {
                // Unknown option: skip its values.
                while it
                    .peek()
                    .is_some_and(|n| !n.starts_with('-') && n.as_str() != "!")
                {
                    it.next();
                }
                if !matches!(target, Target::None) {
                    None
                } else {
                    Some(Match::Unknown(format!("-m {module} {other}")))
                }
            }
            other => return Err(format!("unexpected word {other:?}")),
        };
        if let Some(m) = m {
            matches.push((neg, m));
        }
        neg = false;
    }
    Ok(Rule {
        text: text.to_string(),
        matches,
        target,
        comment,
    })
}

/// Splits a line into words as iptables-save quotes them (double quotes,
/// backslash escapes).
fn split_words(line: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
                in_word = true;
            }
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if quoted {
        return Err("unterminated quote".into());
    }
    if in_word {
        out.push(cur);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_keep_quoted_comments_whole() {
        let w = split_words(r#"-A X -m comment --comment "a b \"c\"" -j Y"#).unwrap();
        assert_eq!(
            w,
            [
                "-A",
                "X",
                "-m",
                "comment",
                "--comment",
                "a b \"c\"",
                "-j",
                "Y"
            ]
        );
    }

    #[test]
    fn negation_applies_to_the_next_match_only() {
        let r = parse_rule(
            "",
            &split_words("! -s 10.0.0.0/8 -d 10.0.0.1 -j DROP").unwrap(),
        )
        .unwrap();
        assert!(r.matches[0].0);
        assert!(!r.matches[1].0);
        assert!(matches!(r.target, Target::Drop));
    }

    #[test]
    fn bad_rules_are_errors_with_the_line() {
        let e = Tables::parse("*nat\n-A X -s nonsense -j Y\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(Tables::parse("-A X -j Y\n").is_err());
    }
}
