//! nftables objects -> `nft -f` transactions, pure: the whole table (full sync)
//! or only what changed between two [`Ruleset`]s.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::render::{self, RenderConfig, Ruleset};
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

/// The whole table in one transaction: the fixed part, every set and map flushed
/// and refilled, every per-service chain rewritten, and `stale` chains (ours, in
/// the kernel, no longer wanted) flushed. The table itself is never flushed, so
/// traffic keeps flowing through the old rules until the commit.
pub fn full(family: IpFamily, cfg: &RenderConfig, rs: &Ruleset, stale: &[String]) -> Transaction {
    let t = table(family, cfg);
    let mut s = render::base_script(family, cfg);
    for (kind, name, _) in render::containers(family) {
        let _ = writeln!(s, "flush {kind} {t} {name}");
    }
    for (name, timeout) in &rs.affinity_sets {
        write_affinity_set(&mut s, family, &t, name, *timeout);
    }
    declare_chains(&mut s, &t, rs.chains.keys());
    for (name, rules) in &rs.chains {
        write_chain(&mut s, &t, name, rules);
    }
    let mut elements = 0;
    for (set, items) in &rs.elements {
        elements += write_elements(
            &mut s,
            "add",
            &t,
            set,
            items.iter().map(|(k, v)| element(k, v)),
        );
    }
    for name in stale {
        let _ = writeln!(s, "flush chain {t} {name}");
    }
    Transaction {
        text: s,
        chains_written: rs.chains.len(),
        elements_written: elements,
        flushed: stale.to_vec(),
    }
}

/// Only what changed from `old` to `new`: elements removed (or changed) are
/// deleted first, so no map points at a chain about to be flushed; then changed
/// chains are rewritten, new elements added, and chains no longer used flushed
/// (to be deleted later). Empty when nothing changed.
pub fn diff(family: IpFamily, cfg: &RenderConfig, old: &Ruleset, new: &Ruleset) -> Transaction {
    let t = table(family, cfg);
    let mut s = String::new();
    let empty = BTreeMap::new();
    let mut elements = 0;
    for (set, items) in &old.elements {
        let now = new.elements.get(set).unwrap_or(&empty);
        let gone = items
            .iter()
            .filter(|(k, v)| now.get(*k) != Some(*v))
            .map(|(k, _)| k.clone());
        elements += write_elements(&mut s, "delete", &t, set, gone);
    }
    for (name, timeout) in &new.affinity_sets {
        if old.affinity_sets.get(name) != Some(timeout) {
            write_affinity_set(&mut s, family, &t, name, *timeout);
        }
    }
    let changed: Vec<(&String, &Vec<String>)> = new
        .chains
        .iter()
        .filter(|(name, rules)| old.chains.get(*name) != Some(*rules))
        .collect();
    declare_chains(&mut s, &t, changed.iter().map(|(n, _)| *n));
    for (name, rules) in &changed {
        write_chain(&mut s, &t, name, rules);
    }
    let chains = changed.len();
    for (set, items) in &new.elements {
        let before = old.elements.get(set).unwrap_or(&empty);
        let added = items
            .iter()
            .filter(|(k, v)| before.get(*k) != Some(*v))
            .map(|(k, v)| element(k, v));
        elements += write_elements(&mut s, "add", &t, set, added);
    }
    let flushed: Vec<String> = old
        .chains
        .keys()
        .filter(|c| !new.chains.contains_key(*c))
        .cloned()
        .collect();
    for name in &flushed {
        let _ = writeln!(s, "flush chain {t} {name}");
    }
    Transaction {
        text: s,
        chains_written: chains,
        elements_written: elements,
        flushed,
    }
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
