//! nftables objects -> `nft -f` transactions, pure: the whole table (full sync)
//! or one sync's [`Changes`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv6Addr;

use super::digest::{self, DIGESTS};
use super::render::{self, RenderConfig, Ruleset};
use super::state::Changes;
use crate::proxy::IpFamily;

/// Elements per `add element` statement.
const CHUNK: usize = 1000;

/// One transaction and what it changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Transaction {
    pub text: String,
    /// Chains written (created or rewritten).
    pub chains_written: usize,
    /// Elements added or deleted.
    pub elements_written: usize,
    /// Chains flushed now, to delete on a later sync.
    pub flushed: Vec<String>,
}

fn element(key: &str, value: &str) -> String {
    if value.is_empty() {
        key.to_string()
    } else {
        format!("{key} : {value}")
    }
}

/// Chains are all declared first, then filled: a rule may jump to a chain whose
/// name sorts after its own.
fn declare_chains<'a>(s: &mut String, t: &str, names: impl Iterator<Item = &'a String>) {
    for name in names {
        let _ = writeln!(s, "add chain {t} {name}");
    }
}

fn write_chain(s: &mut String, t: &str, name: &str, rules: &[String]) {
    let _ = writeln!(s, "flush chain {t} {name}");
    for r in rules {
        let _ = writeln!(s, "add rule {t} {name} {r}");
    }
}

fn write_elements<'a>(
    s: &mut String,
    verb: &str,
    t: &str,
    set: &str,
    items: impl Iterator<Item = String> + 'a,
) -> usize {
    let items: Vec<String> = items.collect();
    for chunk in items.chunks(CHUNK) {
        let _ = writeln!(s, "{verb} element {t} {set} {{ {} }}", chunk.join(", "));
    }
    items.len()
}

fn write_affinity_set(s: &mut String, family: IpFamily, t: &str, name: &str, timeout: u32) {
    let a = match family {
        IpFamily::V4 => "ipv4_addr",
        IpFamily::V6 => "ipv6_addr",
    };
    let _ = writeln!(
        s,
        "add set {t} {name} {{ type {a} ; flags dynamic,timeout ; timeout {timeout}s ; }}"
    );
}

/// `ip kube-proxy`.
pub fn table(family: IpFamily, cfg: &RenderConfig) -> String {
    format!("{} {}", render::family_name(family), cfg.table)
}

/// What the kernel holds of our table, as far as a verifying sync reads it: the
/// chain names and the digests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Kernel {
    pub chains: BTreeSet<String>,
    pub digests: BTreeSet<Ipv6Addr>,
}

/// The whole table in one transaction, from nothing: the fixed part, every set
/// and map flushed and refilled, every per-service chain rewritten, and `stale`
/// chains (ours, in the kernel, no longer wanted) flushed. The table itself is
/// never flushed, so traffic keeps flowing through the old rules until the
/// commit.
pub fn full(family: IpFamily, cfg: &RenderConfig, rs: &Ruleset, stale: &[String]) -> Transaction {
    let kernel = Kernel {
        chains: stale.iter().cloned().collect(),
        digests: BTreeSet::new(),
    };
    verify(family, cfg, rs, &kernel)
}

/// Brings the table from what `kernel` says it holds to `rs`: the fixed part,
/// each set or map, and each chain is rewritten only when its digest is missing;
/// the digests are made exactly `rs`'s; chains of ours no longer wanted are
/// flushed. Empty when the kernel already holds `rs`.
pub fn verify(family: IpFamily, cfg: &RenderConfig, rs: &Ruleset, kernel: &Kernel) -> Transaction {
    let t = table(family, cfg);
    let has = |d: &str| {
        d.parse::<Ipv6Addr>()
            .is_ok_and(|d| kernel.digests.contains(&d))
    };
    let mut s = String::new();
    let base = render::base_script(family, cfg);
    let base_digest = digest::base(&base);
    if !has(&base_digest) {
        s.push_str(&base);
    }
    let chains: Vec<(&String, &Vec<String>)> = rs
        .chains
        .iter()
        .filter(|(name, rules)| !kernel.chains.contains(*name) || !has(&digest::chain(name, rules)))
        .collect();
    let written: BTreeSet<&str> = chains.iter().map(|(n, _)| n.as_str()).collect();
    for (name, timeout) in &rs.affinity_sets {
        let chain = name.replacen("affinity-", "endpoint-", 1);
        if written.contains(chain.as_str()) {
            write_affinity_set(&mut s, family, &t, name, *timeout);
        }
    }
    declare_chains(&mut s, &t, chains.iter().map(|(n, _)| *n));
    let empty = BTreeMap::new();
    let refill: Vec<(&str, &str)> = render::containers(family)
        .into_iter()
        .filter(|(_, name, _)| *name != DIGESTS)
        .filter(|(_, name, _)| {
            !has(&digest::set_of(
                name,
                rs.elements.get(name).into_iter().flatten(),
            ))
        })
        .map(|(kind, name, _)| (kind, name))
        .collect();
    for (kind, name) in &refill {
        let _ = writeln!(s, "flush {kind} {t} {name}");
    }
    for (name, rules) in &chains {
        write_chain(&mut s, &t, name, rules);
    }
    let mut elements = 0;
    for (_, set) in &refill {
        let items = rs.elements.get(set).unwrap_or(&empty);
        elements += write_elements(
            &mut s,
            "add",
            &t,
            set,
            items.iter().map(|(k, v)| element(k, v)),
        );
    }
    let mut want: BTreeSet<Ipv6Addr> = rs
        .elements
        .get(DIGESTS)
        .unwrap_or(&empty)
        .keys()
        .filter_map(|d| d.parse().ok())
        .collect();
    if let Ok(d) = base_digest.parse() {
        want.insert(d);
    }
    if kernel.digests.is_empty() {
        // Nothing known (a new table, or one changed behind our back): whatever
        // the set holds is forgotten.
        let _ = writeln!(s, "flush set {t} {DIGESTS}");
    }
    elements += write_elements(
        &mut s,
        "delete",
        &t,
        DIGESTS,
        kernel.digests.difference(&want).map(Ipv6Addr::to_string),
    );
    elements += write_elements(
        &mut s,
        "add",
        &t,
        DIGESTS,
        want.difference(&kernel.digests).map(Ipv6Addr::to_string),
    );
    let stale: Vec<String> = kernel
        .chains
        .iter()
        .filter(|c| !rs.chains.contains_key(*c) && render::is_service_chain(c))
        .cloned()
        .collect();
    for name in &stale {
        let _ = writeln!(s, "flush chain {t} {name}");
    }
    Transaction {
        text: s,
        chains_written: chains.len(),
        elements_written: elements,
        flushed: stale,
    }
}

/// One sync's [`Changes`] as a transaction. Empty when nothing changed.
pub fn changes(family: IpFamily, cfg: &RenderConfig, c: &Changes) -> Transaction {
    let t = table(family, cfg);
    let mut s = String::new();
    let mut elements = 0;
    for (set, keys) in by_set(c.delete_elements.iter().map(|(set, k)| (*set, k.clone()))) {
        elements += write_elements(&mut s, "delete", &t, set, keys.into_iter());
    }
    for (name, timeout) in &c.affinity_sets {
        write_affinity_set(&mut s, family, &t, name, *timeout);
    }
    declare_chains(&mut s, &t, c.chains.iter().map(|(n, _)| n));
    for (name, rules) in &c.chains {
        write_chain(&mut s, &t, name, rules);
    }
    for (set, items) in by_set(
        c.add_elements
            .iter()
            .map(|(set, k, v)| (*set, element(k, v))),
    ) {
        elements += write_elements(&mut s, "add", &t, set, items.into_iter());
    }
    for name in &c.flush {
        let _ = writeln!(s, "flush chain {t} {name}");
    }
    Transaction {
        text: s,
        chains_written: c.chains.len(),
        elements_written: elements,
        flushed: c.flush.clone(),
    }
}

/// Groups items by set, in set order.
fn by_set(
    items: impl Iterator<Item = (&'static str, String)>,
) -> BTreeMap<&'static str, Vec<String>> {
    let mut out: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
    for (set, item) in items {
        out.entry(set).or_default().push(item);
    }
    out
}

/// Deletes chains flushed earlier, and affinity sets no longer used.
pub fn delete(family: IpFamily, cfg: &RenderConfig, chains: &[String], sets: &[String]) -> String {
    let t = table(family, cfg);
    let mut s = String::new();
    for c in chains {
        let _ = writeln!(s, "delete chain {t} {c}");
    }
    for set in sets {
        let _ = writeln!(s, "delete set {t} {set}");
    }
    s
}
