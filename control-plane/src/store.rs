//! The cluster state store: key -> (encoded resource, hash, sequence), with
//! tombstones, from which full snapshots and deltas are cut for any subscriber.
//!
//! Every change to a key gets the next sequence number; the store's version is the
//! newest sequence number. A delta from version `v` is every key whose latest change
//! is after `v`: live keys are upserts, tombstoned keys removals. Each resource is
//! encoded once, when it changes, and the bytes are shared by every update that
//! carries it. Tombstones are kept for a retention window; a subscriber further
//! behind than that is resumed by inventory (hash comparison) instead.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use meshlite_proto::model::{Resource, ResourceKey};
use meshlite_proto::{InventoryDigest, content_hash, v1};
use meshlite_runtime::subscriber::to_nanos;
use prost::Message;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

/// Why a key changed: carried to agents for latency metrics and trace links.
#[derive(Debug, Clone)]
pub struct Cause {
    /// The API's trigger time, else when the control plane first saw the change.
    pub trigger: SystemTime,
    pub observed: SystemTime,
    /// W3C traceparent of the ingest span ("" when not traced).
    pub traceparent: String,
}

impl Cause {
    /// A change observed now, with an optional API trigger time.
    pub fn observed_now(trigger: Option<SystemTime>) -> Self {
        let now = SystemTime::now();
        Self {
            trigger: trigger.unwrap_or(now),
            observed: now,
            traceparent: String::new(),
        }
    }

    pub fn with_traceparent(mut self, tp: String) -> Self {
        self.traceparent = tp;
        self
    }
}

/// One change to apply.
#[derive(Debug, Clone)]
pub enum Change {
    Upsert { resource: Resource, cause: Cause },
    Delete { key: ResourceKey, cause: Cause },
}

/// Resource kinds, for per-kind sync (a re-list replaces one kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

/// Which resources a subscriber sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum View {
    /// A node agent: services, endpoint slices and its own Node.
    Node(String),
    /// A DNS agent: services and endpoint slices.
    Dns,
}

/// A cut of the store for one subscriber.
#[derive(Debug, Clone, Default)]
pub struct Delta {
    /// The store version this delta brings the subscriber to.
    pub version: u64,
    /// Encoded `v1::Resource`s.
    pub upserts: Vec<Bytes>,
    pub removals: Vec<String>,
    pub causes: Vec<v1::ChangeCause>,
    /// How many of `upserts` are EndpointSlice patches.
    pub patches: usize,
}

/// What an apply did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    pub version: u64,
    pub upserted: usize,
    pub removed: usize,
    /// Upserts whose normalized form was unchanged (no update produced).
    pub unchanged: usize,
}

impl Applied {
    pub fn changed(&self) -> bool {
        self.upserted + self.removed > 0
    }
}

/// See the module docs.
#[derive(Debug)]
pub struct Store {
    epoch: u64,
    retention: Duration,
    inner: RwLock<Inner>,
    /// The published version; subscribers wait on it.
    published: watch::Sender<u64>,
    /// Poked on every change; the publisher debounces it.
    dirty: Notify,
    /// Kinds whose initial list has completed.
    synced: watch::Sender<HashSet<Kind>>,
    required: HashSet<Kind>,
}

#[derive(Debug, Default)]
struct Inner {
    seq: u64,
    entries: HashMap<Arc<str>, Entry>,
    tombstones: HashMap<Arc<str>, Tombstone>,
    /// seq -> key, one per key (its latest change, live or tombstone).
    log: BTreeMap<u64, Arc<str>>,
    /// Tombstones in order of death, for expiry.
    graveyard: VecDeque<(Instant, u64, Arc<str>)>,
    /// Deltas can be cut from versions >= compacted.
    compacted: u64,
    /// Digest of every service and endpoint slice (shared by all views).
    shared_digest: InventoryDigest,
    /// Version up to which causes carry a publish time.
    published_seq: u64,
    counts: HashMap<Kind, usize>,
}

#[derive(Debug, Clone)]
struct Entry {
    seq: u64,
    hash: u64,
    bytes: Bytes,
    /// For an EndpointSlice: the encoded patch from its previous version, when
    /// smaller than `bytes`.
    patch: Option<Patch>,
    cause: Cause,
    published: Option<SystemTime>,
}

/// An encoded `EndpointSlicePatch` resource and the sequence number of the
/// version it applies to: a subscriber at any version from `base_seq` up to the
/// entry's own holds exactly that version of the slice.
#[derive(Debug, Clone)]
struct Patch {
    base_seq: u64,
    bytes: Bytes,
}

#[derive(Debug, Clone)]
struct Tombstone {
    seq: u64,
    cause: Cause,
    published: Option<SystemTime>,
}

// === impl Kind ===

impl Kind {
    pub fn of(key: &ResourceKey) -> Self {
        match key {
            ResourceKey::Service { .. } => Kind::Service,
            ResourceKey::EndpointSlice { .. } => Kind::EndpointSlice,
            ResourceKey::Node { .. } => Kind::Node,
        }
    }

    fn of_str(key: &str) -> Self {
        if key.starts_with("service/") {
            Kind::Service
        } else if key.starts_with("node/") {
            Kind::Node
        } else {
            Kind::EndpointSlice
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "service",
            Kind::EndpointSlice => "endpointslice",
            Kind::Node => "node",
        }
    }

    pub const ALL: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];
}

// === impl View ===

impl View {
    fn includes(&self, key: &str) -> bool {
        match key.strip_prefix("node/") {
            None => true,
            Some(name) => matches!(self, View::Node(n) if n == name),
        }
    }
}

// === impl Store ===

impl Store {
    /// A store that is ready once every kind in `required` has synced.
    pub fn new(retention: Duration, required: impl IntoIterator<Item = Kind>) -> Self {
        let (published, _) = watch::channel(0);
        let (synced, _) = watch::channel(HashSet::new());
        Self {
            // Non-zero: epoch 0 means "nothing applied" in a Hello.
            epoch: rand::random::<u64>() | 1,
            retention,
            inner: RwLock::new(Inner::default()),
            published,
            dirty: Notify::new(),
            synced,
            required: required.into_iter().collect(),
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The newest version (applied, perhaps not yet published).
    pub fn version(&self) -> u64 {
        self.read().seq
    }

    /// The published version, and changes to it.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.published.subscribe()
    }

    /// Whether the store holds `key` with exactly this content hash (an upsert of it
    /// would change nothing).
    pub fn holds(&self, key: &str, hash: u64) -> bool {
        self.read().entries.get(key).is_some_and(|e| e.hash == hash)
    }

    /// Number of live resources of a kind.
    pub fn count(&self, kind: Kind) -> usize {
        self.read().counts.get(&kind).copied().unwrap_or(0)
    }

    /// Number of tombstones held.
    pub fn tombstones(&self) -> usize {
        self.read().tombstones.len()
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        // Writers never panic while holding the lock except on allocation failure;
        // the data is still consistent per key, so keep serving.
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies changes in one step. Upserts whose content is unchanged are no-ops.
    pub fn apply(&self, changes: Vec<Change>) -> Applied {
        let mut inner = self.write();
        let mut applied = Applied::default();
        for c in changes {
            match c {
                Change::Upsert { resource, cause } => {
                    if inner.upsert(&resource, cause) {
                        applied.upserted += 1;
                    } else {
                        applied.unchanged += 1;
                    }
                }
                Change::Delete { key, cause } => {
                    if inner.delete(&key.to_string(), cause, Instant::now()) {
                        applied.removed += 1;
                    }
                }
            }
        }
        inner.expire(Instant::now(), self.retention);
        applied.version = inner.seq;
        drop(inner);
        if applied.changed() {
            self.dirty.notify_one();
        }
        applied
    }

    /// Replaces everything of `kinds` with `objects` in one step (a re-list or a
    /// re-read of the manifest directory). Keys in `keep` are left as they are even
    /// when absent from `objects` (objects that failed to normalize: the last good
    /// state is kept). Only what differs produces changes: a re-list of an
    /// unchanged cluster is a no-op, and nothing that still exists is deleted.
    pub fn sync(
        &self,
        kinds: &[Kind],
        objects: Vec<(Resource, Cause)>,
        keep: &HashSet<ResourceKey>,
    ) -> Applied {
        let now = Instant::now();
        let mut inner = self.write();
        let mut applied = Applied::default();
        let incoming: HashSet<String> = objects.iter().map(|(r, _)| r.key().to_string()).collect();
        let keep: HashSet<String> = keep.iter().map(ToString::to_string).collect();
        let stale: Vec<Arc<str>> = inner
            .entries
            .keys()
            .filter(|k| kinds.contains(&Kind::of_str(k)))
            .filter(|k| !incoming.contains(k.as_ref()) && !keep.contains(k.as_ref()))
            .cloned()
            .collect();
        for (resource, cause) in objects {
            if inner.upsert(&resource, cause) {
                applied.upserted += 1;
            } else {
                applied.unchanged += 1;
            }
        }
        for key in stale {
            if inner.delete(&key, Cause::observed_now(None), now) {
                applied.removed += 1;
            }
        }
        inner.expire(now, self.retention);
        applied.version = inner.seq;
        drop(inner);
        if applied.changed() {
            self.dirty.notify_one();
        }
        applied
    }

    /// Marks a kind's initial list complete. The store is ready once all required
    /// kinds are; the first publish happens then.
    pub fn mark_synced(&self, kind: Kind) {
        self.synced.send_modify(|s| {
            s.insert(kind);
        });
        self.dirty.notify_one();
    }

    pub fn is_ready(&self) -> bool {
        self.required.is_subset(&self.synced.borrow())
    }

    /// Resolves once every required kind has synced.
    pub async fn wait_ready(&self) {
        let mut rx = self.synced.subscribe();
        // The sender lives as long as the store, which outlives this borrow.
        let _ = rx.wait_for(|s| self.required.is_subset(s)).await;
    }

    /// Kinds still waiting for their initial list.
    pub fn pending_kinds(&self) -> Vec<Kind> {
        let synced = self.synced.borrow();
        let mut v: Vec<Kind> = self.required.difference(&synced).copied().collect();
        v.sort();
        v
    }

    /// Publishes changes to subscribers, at most once per `debounce`, and only once
    /// ready. Runs forever.
    pub async fn run_publisher(self: Arc<Self>, debounce: Duration) {
        loop {
            self.dirty.notified().await;
            if !debounce.is_zero() {
                tokio::time::sleep(debounce).await;
            }
            if self.is_ready() {
                self.publish();
            }
        }
    }

    /// Publishes the current version now.
    pub fn publish(&self) -> u64 {
        let now = SystemTime::now();
        let span = tracing::info_span!(
            "publish",
            version = tracing::field::Empty,
            changes = tracing::field::Empty
        );
        let _enter = span.enter();
        let version = {
            let mut inner = self.write();
            let from = inner.published_seq;
            let keys: Vec<Arc<str>> = inner
                .log
                .range(from + 1..)
                .map(|(_, k)| k.clone())
                .collect();
            for k in keys {
                if let Some(e) = inner.entries.get_mut(&k) {
                    e.published.get_or_insert(now);
                } else if let Some(t) = inner.tombstones.get_mut(&k) {
                    t.published.get_or_insert(now);
                }
            }
            span.record("changes", inner.seq - inner.published_seq);
            inner.published_seq = inner.seq;
            inner.seq
        };
        span.record("version", version);
        self.published.send_replace(version);
        version
    }

    /// Everything in the view, replacing what the subscriber has.
    pub fn full(&self, view: &View) -> Delta {
        let inner = self.read();
        let mut upserts: Vec<(&Arc<str>, Bytes)> = inner
            .entries
            .iter()
            .filter(|(k, _)| view.includes(k))
            .map(|(k, e)| (k, e.bytes.clone()))
            .collect();
        // Services before endpoint slices, then by key: stable and readable.
        upserts.sort_by(|a, b| a.0.cmp(b.0));
        upserts.sort_by_key(|(k, _)| Kind::of_str(k));
        Delta {
            version: inner.seq,
            upserts: upserts.into_iter().map(|(_, b)| b).collect(),
            removals: Vec::new(),
            causes: Vec::new(),
            patches: 0,
        }
    }

    /// Changes in the view since `from`, or `None` when `from` is older than the
    /// tombstone window (or newer than the store: a subscriber from another epoch).
    /// Whole resources only; see [`Store::delta_with_patches`].
    pub fn delta(&self, from: u64, view: &View) -> Option<Delta> {
        self.delta_with_patches(from, view, false)
    }

    /// [`Store::delta`], where with `patches` an EndpointSlice changed once since
    /// `from` goes as a patch from the version the subscriber holds, if smaller.
    pub fn delta_with_patches(&self, from: u64, view: &View, patches: bool) -> Option<Delta> {
        let inner = self.read();
        if from < inner.compacted || from > inner.seq {
            return None;
        }
        let mut d = Delta {
            version: inner.seq,
            ..Delta::default()
        };
        for (_, key) in inner.log.range(from + 1..) {
            if !view.includes(key) {
                continue;
            }
            if let Some(e) = inner.entries.get(key) {
                match &e.patch {
                    Some(p) if patches && from >= p.base_seq => {
                        d.upserts.push(p.bytes.clone());
                        d.patches += 1;
                    }
                    _ => d.upserts.push(e.bytes.clone()),
                }
                d.causes
                    .push(cause_to_wire(key, &e.cause, e.published, false));
            } else if let Some(t) = inner.tombstones.get(key) {
                d.removals.push(key.to_string());
                d.causes
                    .push(cause_to_wire(key, &t.cause, t.published, true));
            }
        }
        Some(d)
    }

    /// What a subscriber holding `inventory` (key -> hash) lacks: upserts for keys
    /// whose hash differs or that it does not have, removals for keys the view no
    /// longer has. Unchanged resources are not sent.
    pub fn diff_inventory(&self, view: &View, inventory: &HashMap<String, u64>) -> Delta {
        let inner = self.read();
        let mut d = Delta {
            version: inner.seq,
            ..Delta::default()
        };
        for (key, e) in &inner.entries {
            if view.includes(key) && inventory.get(key.as_ref()) != Some(&e.hash) {
                d.upserts.push(e.bytes.clone());
            }
        }
        for key in inventory.keys() {
            if !view.includes(key) || !inner.entries.contains_key(key.as_str()) {
                d.removals.push(key.clone());
            }
        }
        d.removals.sort();
        d
    }

    /// The inventory digest of the view (what an agent holding exactly the view
    /// reports in its Hello) and the version it describes, read together.
    pub fn digest(&self, view: &View) -> (InventoryDigest, u64) {
        let inner = self.read();
        let mut d = inner.shared_digest;
        if let View::Node(name) = view {
            let key = format!("node/{name}");
            if let Some(e) = inner.entries.get(key.as_str()) {
                d.add(&key, e.hash);
            }
        }
        (d, inner.seq)
    }
}

fn cause_to_wire(
    key: &str,
    c: &Cause,
    published: Option<SystemTime>,
    removed: bool,
) -> v1::ChangeCause {
    v1::ChangeCause {
        key: key.to_string(),
        trigger_unix_nanos: to_nanos(c.trigger),
        traceparent: c.traceparent.clone(),
        observed_unix_nanos: to_nanos(c.observed),
        published_unix_nanos: published.map_or(0, to_nanos),
        removed,
    }
}

/// Encodes a resource once, with its key and hash.
pub fn encode(resource: &Resource) -> (String, u64, Bytes) {
    let kind = v1::resource::Kind::from(resource);
    let hash = content_hash(&kind);
    let key = resource.key().to_string();
    let msg = v1::Resource {
        key: key.clone(),
        hash,
        kind: Some(kind),
    };
    (key, hash, Bytes::from(msg.encode_to_vec()))
}

/// The encoded patch resource from the slice encoded in `old` to `new`, if `new`
/// is an EndpointSlice, a patch can say the change, and it is smaller than
/// `new_len` (the whole resource's encoding).
fn encode_patch(
    key: &str,
    old: &Bytes,
    new: &Resource,
    new_hash: u64,
    new_len: usize,
) -> Option<Bytes> {
    let Resource::EndpointSlice(new) = new else {
        return None;
    };
    let old = v1::Resource::decode(old.clone()).ok()?;
    let Some(v1::resource::Kind::EndpointSlice(old_slice)) = &old.kind else {
        return None;
    };
    let patch = meshlite_proto::patch::diff(old_slice, &new.into(), old.hash)?;
    let msg = v1::Resource {
        key: key.to_string(),
        hash: new_hash,
        kind: Some(v1::resource::Kind::EndpointSlicePatch(patch)),
    };
    (msg.encoded_len() < new_len).then(|| Bytes::from(msg.encode_to_vec()))
}

// === impl Inner ===

impl Inner {
    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn digest_add(&mut self, key: &str, hash: u64) {
        if Kind::of_str(key) != Kind::Node {
            self.shared_digest.add(key, hash);
        }
    }

    fn digest_remove(&mut self, key: &str, hash: u64) {
        if Kind::of_str(key) != Kind::Node {
            self.shared_digest.remove(key, hash);
        }
    }

    /// Returns whether anything changed.
    fn upsert(&mut self, resource: &Resource, cause: Cause) -> bool {
        let (key, hash, bytes) = encode(resource);
        let key: Arc<str> = Arc::from(key);
        let mut patch = None;
        if let Some(old) = self.entries.get(&key) {
            if old.hash == hash {
                return false;
            }
            let (old_seq, old_hash) = (old.seq, old.hash);
            patch =
                encode_patch(&key, &old.bytes, resource, hash, bytes.len()).map(|bytes| Patch {
                    base_seq: old_seq,
                    bytes,
                });
            self.log.remove(&old_seq);
            self.digest_remove(&key, old_hash);
        } else {
            *self.counts.entry(Kind::of_str(&key)).or_default() += 1;
            if let Some(t) = self.tombstones.remove(&key) {
                self.log.remove(&t.seq);
            }
        }
        let seq = self.next_seq();
        self.log.insert(seq, key.clone());
        self.digest_add(&key, hash);
        self.entries.insert(
            key,
            Entry {
                seq,
                hash,
                bytes,
                patch,
                cause,
                published: None,
            },
        );
        true
    }

    fn delete(&mut self, key: &str, cause: Cause, now: Instant) -> bool {
        let Some(old) = self.entries.remove(key) else {
            return false;
        };
        let key: Arc<str> = Arc::from(key);
        self.log.remove(&old.seq);
        self.digest_remove(&key, old.hash);
        if let Some(c) = self.counts.get_mut(&Kind::of_str(&key)) {
            *c = c.saturating_sub(1);
        }
        let seq = self.next_seq();
        self.log.insert(seq, key.clone());
        self.graveyard.push_back((now, seq, key.clone()));
        self.tombstones.insert(
            key,
            Tombstone {
                seq,
                cause,
                published: None,
            },
        );
        true
    }

    /// Drops tombstones older than `retention`; deltas from before them can no
    /// longer be cut.
    fn expire(&mut self, now: Instant, retention: Duration) {
        while let Some((at, seq, _)) = self.graveyard.front() {
            if now.duration_since(*at) < retention {
                break;
            }
            let (seq, key) = (*seq, self.graveyard.pop_front().map(|g| g.2));
            // A tombstone since replaced by a new upsert lost nothing.
            if let Some(key) = key
                && self.tombstones.get(&key).is_some_and(|t| t.seq == seq)
            {
                self.tombstones.remove(&key);
                self.log.remove(&seq);
                self.compacted = self.compacted.max(seq);
            }
        }
    }
}

#[cfg(test)]
mod tests;
