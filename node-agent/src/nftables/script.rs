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

/// What a verifying sync writes, chosen by comparing `rs` with what the kernel
/// holds; put in words by [`verify`] and in netlink by [`Verified::changes`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verified {
    /// The fixed part (table, sets, maps, base chains), when its digest is
    /// missing; empty otherwise.
    pub base: String,
    /// Everything else, as one sync's changes: the chains whose digest is
    /// missing, each set or map whose digest is missing flushed
    /// ([`Changes::flush_sets`]) and refilled, the digests made exactly `rs`'s,
    /// and chains of ours no longer wanted flushed.
    pub changes: Changes,
}

/// Chooses what [`verify`] writes.
pub fn verified(family: IpFamily, cfg: &RenderConfig, rs: &Ruleset, kernel: &Kernel) -> Verified {
    let has = |d: &str| {
        d.parse::<Ipv6Addr>()
            .is_ok_and(|d| kernel.digests.contains(&d))
    };
    let base = render::base_script(family, cfg);
    let base_digest = digest::base(&base);
    let mut c = Changes {
        chains: rs
            .chains
            .iter()
            .filter(|(name, rules)| {
                !kernel.chains.contains(*name) || !has(&digest::chain(name, rules))
            })
            .map(|(name, rules)| (name.clone(), rules.clone()))
            .collect(),
        ..Changes::default()
    };
    let written: BTreeSet<&str> = c.chains.iter().map(|(n, _)| n.as_str()).collect();
    c.affinity_sets = rs
        .affinity_sets
        .iter()
        .filter(|(name, _)| written.contains(name.replacen("affinity-", "endpoint-", 1).as_str()))
        .map(|(name, timeout)| (name.clone(), *timeout))
        .collect();
    let empty = BTreeMap::new();
    c.flush_sets = render::containers(family)
        .into_iter()
        .filter(|(_, name, _)| *name != DIGESTS)
        .filter(|(_, name, _)| {
            !has(&digest::set_of(
                name,
                rs.elements.get(name).into_iter().flatten(),
            ))
        })
        .map(|(_, name, _)| name)
        .collect();
    for set in &c.flush_sets {
        for (k, v) in rs.elements.get(set).unwrap_or(&empty) {
            c.add_elements.push((set, k.clone(), v.clone()));
        }
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
        c.flush_sets.push(DIGESTS);
    }
    c.delete_elements = kernel
        .digests
        .difference(&want)
        .map(|d| (DIGESTS, d.to_string()))
        .collect();
    c.add_elements.extend(
        want.difference(&kernel.digests)
            .map(|d| (DIGESTS, d.to_string(), String::new())),
    );
    c.flush = kernel
        .chains
        .iter()
        .filter(|ch| !rs.chains.contains_key(*ch) && render::is_service_chain(ch))
        .cloned()
        .collect();
    Verified {
        base: if has(&base_digest) {
            String::new()
        } else {
            base
        },
        changes: c,
    }
}

/// Brings the table from what `kernel` says it holds to `rs`: the fixed part,
/// each set or map, and each chain is rewritten only when its digest is missing;
/// the digests are made exactly `rs`'s; chains of ours no longer wanted are
/// flushed. Empty when the kernel already holds `rs`.
pub fn verify(family: IpFamily, cfg: &RenderConfig, rs: &Ruleset, kernel: &Kernel) -> Transaction {
    verify_text(family, cfg, &verified(family, cfg, rs, kernel))
}

/// [`Verified`] as one `nft -f` transaction.
pub fn verify_text(family: IpFamily, cfg: &RenderConfig, v: &Verified) -> Transaction {
    let t = table(family, cfg);
    let c = &v.changes;
    let mut s = v.base.clone();
    for (name, timeout) in &c.affinity_sets {
        write_affinity_set(&mut s, family, &t, name, *timeout);
    }
    declare_chains(&mut s, &t, c.chains.iter().map(|(n, _)| n));
    for set in c.flush_sets.iter().filter(|s| **s != DIGESTS) {
        let _ = writeln!(s, "flush {} {t} {set}", container_kind(family, set));
    }
    for (name, rules) in &c.chains {
        write_chain(&mut s, &t, name, rules);
    }
    let mut elements = 0;
    let (digests, refill): (Vec<_>, Vec<_>) = c
        .add_elements
        .iter()
        .partition(|(set, _, _)| *set == DIGESTS);
    for set in c.flush_sets.iter().filter(|s| **s != DIGESTS) {
        let items = refill
            .iter()
            .filter(|(s, _, _)| s == set)
            .map(|(_, k, v)| element(k, v));
        elements += write_elements(&mut s, "add", &t, set, items);
    }
    if c.flush_sets.contains(&DIGESTS) {
        let _ = writeln!(s, "flush set {t} {DIGESTS}");
    }
    elements += write_elements(
        &mut s,
        "delete",
        &t,
        DIGESTS,
        c.delete_elements.iter().map(|(_, k)| k.clone()),
    );
    elements += write_elements(
        &mut s,
        "add",
        &t,
        DIGESTS,
        digests.iter().map(|(_, k, _)| k.clone()),
    );
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
    for set in &c.flush_sets {
        let _ = writeln!(s, "flush {} {t} {set}", container_kind(family, set));
    }
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

/// `set` or `map`, for one of the fixed sets and maps.
fn container_kind(family: IpFamily, name: &str) -> &'static str {
    render::containers(family)
        .into_iter()
        .find(|(_, n, _)| *n == name)
        .map_or("set", |(kind, _, _)| kind)
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
