//! What the backend wrote into one family's table, kept in memory so a sync
//! renders and writes only the service ports that changed.
//!
//! Each port's [`Fragment`] is kept with the view it was rendered from. A sync
//! compares each port's view with the kept one (a cheap equality test), renders
//! the ports that differ, and turns the difference between their old and new
//! fragments into [`Changes`]. Chains belong to one port. Elements may be shared
//! (a ClusterIP with several ports, an endpoint behind several services in the
//! hairpin set), so each element counts its owners and is deleted with the last.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::digest::{self, DIGESTS};
use super::render::{self, Fragment, RenderConfig, Ruleset};
use crate::proxy::{IpFamily, ProxyView, ServicePortName, ServicePortView};

/// What one sync changes, in the order a transaction applies it: elements
/// deleted first (so no map points at a chain about to be flushed), then affinity
/// sets and chains written, then elements added, then chains no longer used
/// flushed (deleted on a later sync).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// (set or map, key).
    pub delete_elements: Vec<(&'static str, String)>,
    /// Affinity sets to create, name -> timeout in seconds.
    pub affinity_sets: Vec<(String, u32)>,
    /// Chains created or rewritten whole.
    pub chains: Vec<(String, Vec<String>)>,
    /// Sets and maps emptied before the elements are added (a verifying sync
    /// refilling them whole; an incremental one never does).
    pub flush_sets: Vec<&'static str>,
    /// (set or map, key, value; empty for sets).
    pub add_elements: Vec<(&'static str, String, String)>,
    /// Chains to flush now and delete later.
    pub flush: Vec<String>,
}

#[derive(Debug, Clone)]
struct Port {
    view: Arc<ServicePortView>,
    fragment: Fragment,
}

/// One element's owners. The kernel holds `written`; `values` are what the ports
/// that own the key want, first come first served when two disagree.
#[derive(Debug, Clone, Default)]
struct Element {
    written: Option<String>,
    values: Vec<(String, u32)>,
}

/// The table as written, per port.
#[derive(Debug, Clone)]
pub struct Written {
    family: IpFamily,
    cfg: Option<RenderConfig>,
    globals: Fragment,
    ports: BTreeMap<ServicePortName, Port>,
    elements: BTreeMap<(&'static str, String), Element>,
    /// Per set or map, the XOR of its elements' digests now, and the one whose
    /// set digest is in the kernel.
    xor: BTreeMap<&'static str, u128>,
    xor_written: BTreeMap<&'static str, u128>,
}

/// The difference being built by one sync.
#[derive(Default)]
struct Pending {
    changes: Changes,
    dirty: BTreeSet<(&'static str, String)>,
}

// === impl Changes ===

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.delete_elements.is_empty()
            && self.affinity_sets.is_empty()
            && self.chains.is_empty()
            && self.flush_sets.is_empty()
            && self.add_elements.is_empty()
            && self.flush.is_empty()
    }

    /// Chains and elements written (the sync's size).
    pub fn size(&self) -> usize {
        self.chains.len() + self.delete_elements.len() + self.add_elements.len()
    }
}

// === impl Written ===

impl Written {
    /// Nothing written yet.
    pub fn new(family: IpFamily) -> Self {
        Self {
            family,
            cfg: None,
            globals: Fragment::default(),
            ports: BTreeMap::new(),
            elements: BTreeMap::new(),
            xor: BTreeMap::new(),
            xor_written: BTreeMap::new(),
        }
    }

    /// Brings the kept table to `view` and returns what changed. Only ports whose
    /// view differs are rendered; a changed render configuration (node IPs, the
    /// local-traffic detector) re-renders every port.
    pub fn update(&mut self, view: &ProxyView, cfg: &RenderConfig) -> Changes {
        let mut p = Pending::default();
        let all = self.cfg.as_ref() != Some(cfg);
        if all {
            let globals = Fragment {
                elements: render::global_elements(cfg),
                ..Fragment::default()
            };
            let old = std::mem::replace(&mut self.globals, globals.clone());
            self.replace(&mut p, Some(&old), Some(&globals));
            self.cfg = Some(cfg.clone());
        }
        // Walk the kept ports and the view's together (both sorted by name):
        // one key comparison per port, and a pointer comparison for the ports a
        // rebuilt view shares with the previous one.
        let mut gone: Vec<ServicePortName> = Vec::new();
        let mut changed: Vec<(&ServicePortName, &Arc<ServicePortView>)> = Vec::new();
        let mut kept = self.ports.iter().peekable();
        for (name, sp) in &view.ports {
            while let Some((k, _)) = kept.peek() {
                if *k < name {
                    gone.push((*k).clone());
                    kept.next();
                } else {
                    break;
                }
            }
            match kept.peek() {
                Some((k, o)) if *k == name => {
                    if all || !(Arc::ptr_eq(&o.view, sp) || *o.view == **sp) {
                        changed.push((name, sp));
                    }
                    kept.next();
                }
                _ => changed.push((name, sp)),
            }
        }
        gone.extend(kept.map(|(k, _)| k.clone()));
        for name in gone {
            if let Some(old) = self.ports.remove(&name) {
                self.replace(&mut p, Some(&old.fragment), None);
            }
        }
        for (name, sp) in changed {
            let fragment = render::render_port(self.family, sp, cfg);
            let old = self.ports.insert(
                name.clone(),
                Port {
                    view: sp.clone(),
                    fragment: fragment.clone(),
                },
            );
            self.replace(&mut p, old.as_ref().map(|o| &o.fragment), Some(&fragment));
        }
        self.settle(p)
    }

    /// The whole table as written, for a full transaction.
    pub fn ruleset(&self) -> Ruleset {
        let mut rs = Ruleset::default();
        for name in render::ELEMENT_CONTAINERS {
            rs.elements.insert(name, BTreeMap::new());
        }
        for port in self.ports.values() {
            for (name, rules) in &port.fragment.chains {
                rs.chains.insert(name.clone(), rules.clone());
            }
            for (name, timeout) in &port.fragment.affinity_sets {
                rs.affinity_sets.insert(name.clone(), *timeout);
            }
        }
        for ((set, key), e) in &self.elements {
            if let Some(v) = &e.written {
                rs.elements
                    .entry(set)
                    .or_default()
                    .insert(key.clone(), v.clone());
            }
        }
        for (set, xor) in &self.xor_written {
            rs.elements
                .entry(DIGESTS)
                .or_default()
                .insert(digest::set(set, *xor), String::new());
        }
        rs
    }

    /// Whether `chain` is one of ours and wanted.
    pub fn has_chain(&self, chain: &str) -> bool {
        self.ports
            .values()
            .any(|p| p.fragment.chains.iter().any(|(n, _)| n == chain))
    }

    /// The names of every chain written.
    pub fn chain_names(&self) -> BTreeSet<String> {
        self.ports
            .values()
            .flat_map(|p| p.fragment.chains.iter().map(|(n, _)| n.clone()))
            .collect()
    }

    /// Whether the kernel holds exactly what this state says was written, judged
    /// by the chain names and the digests alone: every digest (chains, sets and
    /// maps, and `base`, the fixed part's) present and no other, and our chains
    /// exactly the wanted ones (`pending`, flushed chains not yet deleted,
    /// aside).
    pub fn in_kernel(
        &self,
        kernel: &super::script::Kernel,
        base: &str,
        pending: &BTreeSet<String>,
    ) -> bool {
        let mut want: BTreeSet<std::net::Ipv6Addr> = self
            .elements
            .iter()
            .filter(|((set, _), e)| *set == DIGESTS && e.written.is_some())
            .filter_map(|((_, key), _)| key.parse().ok())
            .collect();
        for (set, xor) in &self.xor_written {
            if let Ok(d) = digest::set(set, *xor).parse() {
                want.insert(d);
            }
        }
        if let Ok(d) = base.parse() {
            want.insert(d);
        }
        if want != kernel.digests {
            return false;
        }
        let ours: BTreeSet<String> = kernel
            .chains
            .iter()
            .filter(|c| render::is_service_chain(c) && !pending.contains(*c))
            .cloned()
            .collect();
        ours == self.chain_names()
    }

    /// Replaces one owner's fragment `old` by `new`.
    fn replace(&mut self, p: &mut Pending, old: Option<&Fragment>, new: Option<&Fragment>) {
        let empty = Fragment::default();
        let old = old.unwrap_or(&empty);
        let new = new.unwrap_or(&empty);
        for (name, rules) in &new.chains {
            let same = old.chains.iter().any(|(n, r)| n == name && r == rules);
            if !same {
                p.changes.chains.push((name.clone(), rules.clone()));
            }
        }
        for (name, _) in &old.chains {
            if !new.chains.iter().any(|(n, _)| n == name) {
                p.changes.flush.push(name.clone());
            }
        }
        for (name, timeout) in &new.affinity_sets {
            if !old.affinity_sets.contains(&(name.clone(), *timeout)) {
                p.changes.affinity_sets.push((name.clone(), *timeout));
            }
        }
        // Acquire before release, so an element that moves between owners in one
        // sync is neither deleted nor re-added.
        for (set, key, value) in &new.elements {
            if !old.elements.contains(&(set, key.clone(), value.clone())) {
                let e = self.elements.entry((set, key.clone())).or_default();
                match e.values.iter_mut().find(|(v, _)| v == value) {
                    Some((_, n)) => *n += 1,
                    None => e.values.push((value.clone(), 1)),
                }
                p.dirty.insert((set, key.clone()));
            }
        }
        for (set, key, value) in &old.elements {
            if !new.elements.contains(&(set, key.clone(), value.clone()))
                && let Some(e) = self.elements.get_mut(&(*set, key.clone()))
            {
                if let Some(i) = e.values.iter().position(|(v, _)| v == value) {
                    e.values[i].1 -= 1;
                    if e.values[i].1 == 0 {
                        e.values.remove(i);
                    }
                }
                p.dirty.insert((set, key.clone()));
            }
        }
    }

    /// Turns the touched elements into deletions and additions.
    fn settle(&mut self, mut p: Pending) -> Changes {
        for k in p.dirty {
            let Some(e) = self.elements.get_mut(&k) else {
                continue;
            };
            let want = e.values.first().map(|(v, _)| v.clone());
            if e.written != want {
                let xor = self.xor.entry(k.0).or_default();
                if let Some(old) = &e.written {
                    p.changes.delete_elements.push(k.clone());
                    *xor ^= digest::member(k.0, &k.1, old);
                }
                if let Some(v) = &want {
                    p.changes.add_elements.push((k.0, k.1.clone(), v.clone()));
                    *xor ^= digest::member(k.0, &k.1, v);
                }
                e.written = want;
            }
            if e.values.is_empty() {
                self.elements.remove(&k);
            }
        }
        // Each set or map whose elements changed gets its new digest.
        for set in render::ELEMENT_CONTAINERS {
            if set == DIGESTS {
                continue;
            }
            let now = self.xor.get(set).copied().unwrap_or_default();
            let before = self.xor_written.insert(set, now);
            if before != Some(now) {
                if let Some(old) = before {
                    p.changes
                        .delete_elements
                        .push((DIGESTS, digest::set(set, old)));
                }
                p.changes
                    .add_elements
                    .push((DIGESTS, digest::set(set, now), String::new()));
            }
        }
        p.changes
    }
}

#[cfg(test)]
mod tests;
