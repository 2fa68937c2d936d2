//! The agent-side snapshot: every resource the agent holds, indexed the way proxies
//! and DNS read it, plus the set of changes the last update made.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use meshlite_proto::InventoryDigest;
use meshlite_proto::model::{EndpointSlice, Node, Resource, ResourceKey, Service, ServiceName};

/// Everything an agent holds, at one version. Mutated only by the subscriber, in one
/// step per update, so handlers always see a consistent view.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    epoch: u64,
    version: u64,
    entries: HashMap<ResourceKey, Entry>,
    services: BTreeMap<ServiceName, Arc<Service>>,
    slices: HashMap<ServiceName, BTreeMap<String, Arc<EndpointSlice>>>,
    nodes: BTreeMap<String, Arc<Node>>,
    digest: InventoryDigest,
}

#[derive(Debug, Clone)]
struct Entry {
    hash: u64,
    key_string: String,
    /// For endpoint slices: the service the slice is indexed under.
    owner: Option<ServiceName>,
}

/// What one update changed, for handlers that work incrementally.
#[derive(Debug, Default, Clone)]
pub struct ChangeSet {
    /// The update replaced everything (a full snapshot).
    pub full: bool,
    /// Services whose Service object or any of whose EndpointSlices changed.
    pub services: BTreeSet<ServiceName>,
    /// Some Node object changed.
    pub nodes: bool,
    /// Keys added or modified.
    pub upserted: Vec<ResourceKey>,
    /// Keys removed.
    pub removed: Vec<ResourceKey>,
}

/// Undo information for one key, so a failed apply can restore the last good state.
#[derive(Debug)]
pub(crate) struct Undo {
    key: ResourceKey,
    previous: Option<(u64, Resource)>,
}

// === impl Snapshot ===

impl Snapshot {
    /// An empty snapshot (version 0).
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a snapshot from resources (e.g. manifests), at version 1.
    pub fn from_resources(resources: impl IntoIterator<Item = Resource>) -> Self {
        let mut s = Self::new();
        for r in resources {
            let hash = meshlite_proto::content_hash(&(&r).into());
            s.upsert(hash, r);
        }
        s.version = 1;
        s
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// Number of resources held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Digest of the (key, hash) pairs held, for resume.
    pub fn digest(&self) -> InventoryDigest {
        self.digest
    }

    /// All services, ordered by namespace/name.
    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }

    pub fn service(&self, name: &ServiceName) -> Option<&Arc<Service>> {
        self.services.get(name)
    }

    /// The endpoint slices labelled for a service, ordered by slice name.
    pub fn slices_for(&self, name: &ServiceName) -> impl Iterator<Item = &Arc<EndpointSlice>> {
        self.slices.get(name).into_iter().flat_map(|m| m.values())
    }

    /// Every endpoint slice.
    pub fn slices(&self) -> impl Iterator<Item = &Arc<EndpointSlice>> {
        self.slices.values().flat_map(|m| m.values())
    }

    pub fn node(&self, name: &str) -> Option<&Arc<Node>> {
        self.nodes.get(name)
    }

    pub fn nodes(&self) -> impl Iterator<Item = &Arc<Node>> {
        self.nodes.values()
    }

    /// The content hash held for a key.
    pub fn hash_of(&self, key: &ResourceKey) -> Option<u64> {
        self.entries.get(key).map(|e| e.hash)
    }

    /// The EndpointSlice held under `key`, with its content hash.
    pub fn slice(&self, key: &ResourceKey) -> Option<(u64, &Arc<EndpointSlice>)> {
        let ResourceKey::EndpointSlice { name, .. } = key else {
            return None;
        };
        let entry = self.entries.get(key)?;
        let slice = self.slices.get(entry.owner.as_ref()?)?.get(name)?;
        Some((entry.hash, slice))
    }

    /// Every (key string, hash) pair, for an inventory.
    pub fn inventory(&self) -> impl Iterator<Item = (&str, u64)> {
        self.entries
            .values()
            .map(|e| (e.key_string.as_str(), e.hash))
    }

    /// All keys held.
    pub fn keys(&self) -> impl Iterator<Item = &ResourceKey> {
        self.entries.keys()
    }

    pub(crate) fn set_version(&mut self, epoch: u64, version: u64) {
        self.epoch = epoch;
        self.version = version;
    }

    /// Inserts or replaces a resource; returns the previous one.
    pub fn upsert(&mut self, hash: u64, r: Resource) -> Option<(u64, Resource)> {
        let key = r.key();
        let previous = self.remove(&key);
        let key_string = key.to_string();
        self.digest.add(&key_string, hash);
        let owner = match &r {
            Resource::EndpointSlice(s) => Some(s.service()),
            _ => None,
        };
        self.entries.insert(
            key,
            Entry {
                hash,
                key_string,
                owner,
            },
        );
        match r {
            Resource::Service(s) => {
                self.services.insert(s.service_name(), Arc::new(s));
            }
            Resource::EndpointSlice(s) => {
                self.slices
                    .entry(s.service())
                    .or_default()
                    .insert(s.name.clone(), Arc::new(s));
            }
            Resource::Node(n) => {
                self.nodes.insert(n.name.clone(), Arc::new(n));
            }
        }
        previous
    }

    /// Removes a resource; returns it with its hash.
    pub fn remove(&mut self, key: &ResourceKey) -> Option<(u64, Resource)> {
        let entry = self.entries.remove(key)?;
        self.digest.remove(&entry.key_string, entry.hash);
        let resource = match key {
            ResourceKey::Service { namespace, name } => self
                .services
                .remove(&ServiceName::new(namespace, name))
                .map(|s| Resource::Service(Arc::unwrap_or_clone(s))),
            ResourceKey::EndpointSlice { name, .. } => {
                let owner = entry.owner.as_ref()?;
                let m = self.slices.get_mut(owner)?;
                let slice = m.remove(name);
                if m.is_empty() {
                    self.slices.remove(owner);
                }
                slice.map(|s| Resource::EndpointSlice(Arc::unwrap_or_clone(s)))
            }
            ResourceKey::Node { name } => self
                .nodes
                .remove(name)
                .map(|n| Resource::Node(Arc::unwrap_or_clone(n))),
        };
        resource.map(|r| (entry.hash, r))
    }

    /// Applies upserts and removals, recording what changed and how to undo it.
    pub(crate) fn apply(
        &mut self,
        upserts: Vec<(u64, Resource)>,
        removals: Vec<ResourceKey>,
        changes: &mut ChangeSet,
        undo: &mut Vec<Undo>,
    ) {
        for (hash, r) in upserts {
            let key = r.key();
            if self.hash_of(&key) == Some(hash) {
                continue;
            }
            changes.note(&r);
            let previous = self.upsert(hash, r);
            if let Some((_, old)) = &previous {
                changes.note(old);
            }
            changes.upserted.push(key.clone());
            undo.push(Undo { key, previous });
        }
        for key in removals {
            if let Some((hash, old)) = self.remove(&key) {
                changes.note(&old);
                changes.removed.push(key.clone());
                undo.push(Undo {
                    key,
                    previous: Some((hash, old)),
                });
            }
        }
    }

    /// Reverts changes recorded by [`Snapshot::apply`], newest first.
    pub(crate) fn revert(&mut self, undo: Vec<Undo>) {
        for u in undo.into_iter().rev() {
            self.remove(&u.key);
            if let Some((hash, r)) = u.previous {
                self.upsert(hash, r);
            }
        }
    }

    /// Replaces the whole content (a full snapshot), returning the undo log.
    pub(crate) fn replace_all(
        &mut self,
        upserts: Vec<(u64, Resource)>,
        changes: &mut ChangeSet,
        undo: &mut Vec<Undo>,
    ) {
        let incoming: std::collections::HashSet<ResourceKey> =
            upserts.iter().map(|(_, r)| r.key()).collect();
        let stale: Vec<ResourceKey> = self
            .entries
            .keys()
            .filter(|k| !incoming.contains(*k))
            .cloned()
            .collect();
        changes.full = true;
        self.apply(upserts, stale, changes, undo);
    }
}

// === impl ChangeSet ===

impl ChangeSet {
    fn note(&mut self, r: &Resource) {
        match r {
            Resource::Service(s) => {
                self.services.insert(s.service_name());
            }
            Resource::EndpointSlice(s) => {
                self.services.insert(s.service());
            }
            Resource::Node(_) => self.nodes = true,
        }
    }

    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        self.upserted.is_empty() && self.removed.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use meshlite_proto::model::{AddressFamily, Endpoint};

    use super::*;

    fn svc(name: &str) -> Resource {
        Resource::Service(Service::cluster_ip(
            "default",
            name,
            "198.19.0.1".parse().unwrap(),
        ))
    }

    fn slice(name: &str, svc: &str, ip: &str) -> Resource {
        Resource::EndpointSlice(EndpointSlice {
            namespace: "default".into(),
            name: name.into(),
            service_name: svc.into(),
            address_family: AddressFamily::Ipv4,
            ports: vec![],
            endpoints: vec![Endpoint::ready(ip.parse().unwrap())],
            ignored_by_proxy: false,
        })
    }

    #[test]
    fn indexes_slices_by_service_and_reverts() {
        let mut s = Snapshot::new();
        let mut ch = ChangeSet::default();
        let mut undo = Vec::new();
        s.apply(
            vec![(1, svc("a")), (2, slice("a-1", "a", "198.18.0.1"))],
            vec![],
            &mut ch,
            &mut undo,
        );
        let before = s.digest();
        assert_eq!(s.slices_for(&ServiceName::new("default", "a")).count(), 1);

        let mut ch = ChangeSet::default();
        let mut undo = Vec::new();
        // Move the slice to another service and remove the first service.
        s.apply(
            vec![(3, slice("a-1", "b", "198.18.0.2"))],
            vec![ResourceKey::service("default", "a")],
            &mut ch,
            &mut undo,
        );
        assert_eq!(
            ch.services,
            [
                ServiceName::new("default", "a"),
                ServiceName::new("default", "b")
            ]
            .into()
        );
        assert_eq!(s.slices_for(&ServiceName::new("default", "a")).count(), 0);
        assert_eq!(s.slices_for(&ServiceName::new("default", "b")).count(), 1);
        s.revert(undo);
        assert_eq!(s.digest(), before);
        assert!(s.service(&ServiceName::new("default", "a")).is_some());
        assert_eq!(s.slices_for(&ServiceName::new("default", "a")).count(), 1);
    }

    #[test]
    fn same_hash_is_not_a_change() {
        let mut s = Snapshot::new();
        let mut undo = Vec::new();
        s.apply(
            vec![(1, svc("a"))],
            vec![],
            &mut ChangeSet::default(),
            &mut undo,
        );
        let mut ch = ChangeSet::default();
        s.apply(vec![(1, svc("a"))], vec![], &mut ch, &mut undo);
        assert!(ch.is_empty());
    }

    #[test]
    fn full_replace_removes_what_is_missing() {
        let mut s = Snapshot::new();
        let mut undo = Vec::new();
        s.apply(
            vec![(1, svc("a")), (2, svc("b"))],
            vec![],
            &mut ChangeSet::default(),
            &mut undo,
        );
        let mut ch = ChangeSet::default();
        s.replace_all(vec![(1, svc("a"))], &mut ch, &mut undo);
        assert!(ch.full);
        assert_eq!(ch.removed, vec![ResourceKey::service("default", "b")]);
        assert_eq!(s.len(), 1);
    }
}
