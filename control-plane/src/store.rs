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
    Upsert { value: Encoded, cause: Cause },
    Delete { key: ResourceKey, cause: Cause },
}

// === impl Change ===

impl Change {
    /// An upsert of `resource`, encoded here.
    pub fn upsert(resource: &Resource, cause: Cause) -> Self {
        Change::Upsert {
            value: Encoded::new(resource),
            cause,
        }
    }
}

/// A resource encoded once, as the store keeps it and every update carries it.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub kind: Kind,
    /// The key's string form, as on the wire.
    pub key: Arc<str>,
    pub hash: u64,
    /// The encoded `v1::Resource`.
    pub bytes: Bytes,
    /// The wire form of an EndpointSlice, kept to diff against its next version.
    slice: Option<v1::EndpointSlice>,
}

/// Resource kinds (a re-list replaces one kind).
pub use meshlite_proto::model::ResourceKind as Kind;

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

/// A live resource as [`Store::entries`] lists it.
#[derive(Debug, Clone)]
pub struct StoredEntry {
    pub key: Arc<str>,
    /// The version that last changed it.
    pub seq: u64,
    pub published: Option<SystemTime>,
    /// The encoded `v1::Resource`.
    pub bytes: Bytes,
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
    log: BTreeMap<u64, (Kind, Arc<str>)>,
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
    kind: Kind,
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

// === impl View ===

impl View {
    /// Every service and slice; of the Nodes, a node agent's own.
    fn includes(&self, kind: Kind, key: &str) -> bool {
        match kind {
            Kind::Node => {
                matches!(self, View::Node(n) if key.strip_prefix("node/") == Some(n.as_str()))
            }
            Kind::Service | Kind::EndpointSlice => true,
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

    /// The content hash held for `key`, if any.
    pub fn hash_of(&self, key: &str) -> Option<u64> {
        self.read().entries.get(key).map(|e| e.hash)
    }

    /// Whether the store holds exactly this (an upsert of it would change nothing).
    pub fn holds(&self, value: &Encoded) -> bool {
        self.read()
            .entries
            .get(&value.key)
            .is_some_and(|e| e.hash == value.hash)
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
                Change::Upsert { value, cause } => {
                    if inner.upsert(value, cause) {
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
        objects: Vec<(Encoded, Cause)>,
        keep: &HashSet<ResourceKey>,
    ) -> Applied {
        let now = Instant::now();
        let mut inner = self.write();
        let mut applied = Applied::default();
        let incoming: HashSet<&str> = objects.iter().map(|(v, _)| v.key.as_ref()).collect();
        let keep: HashSet<String> = keep.iter().map(ToString::to_string).collect();
        let stale: Vec<Arc<str>> = inner
            .entries
            .iter()
            .filter(|(k, e)| {
                kinds.contains(&e.kind)
                    && !incoming.contains(k.as_ref())
                    && !keep.contains(k.as_ref())
            })
            .map(|(k, _)| k.clone())
            .collect();
        for (value, cause) in objects {
            if inner.upsert(value, cause) {
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
                .map(|(_, (_, k))| k.clone())
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

    /// Every live resource: its key, the version that last changed it, when that
    /// change was published, and its encoded `v1::Resource` (read-only; `explain`
    /// decodes them into a snapshot on demand).
    pub fn entries(&self) -> Vec<StoredEntry> {
        let inner = self.read();
        let mut v: Vec<_> = inner
            .entries
            .iter()
            .map(|(k, e)| StoredEntry {
                key: k.clone(),
                seq: e.seq,
                published: e.published,
                bytes: e.bytes.clone(),
            })
            .collect();
        v.sort_by_key(|e| e.seq);
        v
    }

    /// What changed after version `seen`, from the change log: the entries written
    /// since (in version order) and the keys removed since. `None` when the log no
    /// longer reaches back to `seen` (compacted); then [`Store::entries`] is the
    /// way.
    pub fn changed_since(&self, seen: u64) -> Option<(Vec<StoredEntry>, Vec<Arc<str>>)> {
        let inner = self.read();
        if seen < inner.compacted {
            return None;
        }
        let (mut written, mut removed) = (Vec::new(), Vec::new());
        for (_, (_, key)) in inner.log.range(seen + 1..) {
            match inner.entries.get(key) {
                Some(e) => written.push(StoredEntry {
                    key: key.clone(),
                    seq: e.seq,
                    published: e.published,
                    bytes: e.bytes.clone(),
                }),
                None => removed.push(key.clone()),
            }
        }
        Some((written, removed))
    }

    /// Everything in the view, replacing what the subscriber has.
    pub fn full(&self, view: &View) -> Delta {
        let inner = self.read();
        let mut upserts: Vec<(Kind, &Arc<str>, Bytes)> = inner
            .entries
            .iter()
            .filter(|(k, e)| view.includes(e.kind, k))
            .map(|(k, e)| (e.kind, k, e.bytes.clone()))
            .collect();
        // Services before endpoint slices, then by key: stable and readable.
        upserts.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        Delta {
            version: inner.seq,
            upserts: upserts.into_iter().map(|(_, _, b)| b).collect(),
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
        for (_, (kind, key)) in inner.log.range(from + 1..) {
            if !view.includes(*kind, key) {
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
            if view.includes(e.kind, key) && inventory.get(key.as_ref()) != Some(&e.hash) {
                d.upserts.push(e.bytes.clone());
            }
        }
        for key in inventory.keys() {
            let held = inner
                .entries
                .get(key.as_str())
                .is_some_and(|e| view.includes(e.kind, key));
            if !held {
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

// === impl Encoded ===

impl Encoded {
    /// Encodes a resource once, with its key and content hash.
    pub fn new(resource: &Resource) -> Self {
        let wire = v1::resource::Kind::from(resource);
        let hash = content_hash(&wire);
        let key = resource.key();
        let slice = match &wire {
            v1::resource::Kind::EndpointSlice(s) => Some(s.clone()),
            _ => None,
        };
        let key_str = key.to_string();
        let msg = v1::Resource {
            key: key_str.clone(),
            hash,
            kind: Some(wire),
        };
        Self {
            kind: key.kind(),
            key: Arc::from(key_str),
            hash,
            bytes: Bytes::from(msg.encode_to_vec()),
            slice,
        }
    }

    /// The encoded `EndpointSlicePatch` from the slice encoded in `old` (with hash
    /// `old_hash`) to this one, if this is an EndpointSlice, a patch can say the
    /// change, and it is smaller than the whole resource.
    fn patch_from(&self, old: &Bytes, old_hash: u64) -> Option<Bytes> {
        let new = self.slice.as_ref()?;
        let old = v1::Resource::decode(old.clone()).ok()?;
        let Some(v1::resource::Kind::EndpointSlice(old_slice)) = &old.kind else {
            return None;
        };
        let patch = meshlite_proto::patch::diff(old_slice, new, old_hash)?;
        let msg = v1::Resource {
            key: self.key.to_string(),
            hash: self.hash,
            kind: Some(v1::resource::Kind::EndpointSlicePatch(patch)),
        };
        (msg.encoded_len() < self.bytes.len()).then(|| Bytes::from(msg.encode_to_vec()))
    }
}

// === impl Inner ===

impl Inner {
    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Nodes are per-agent, so outside the digest every view shares.
    fn digest_add(&mut self, kind: Kind, key: &str, hash: u64) {
        if kind != Kind::Node {
            self.shared_digest.add(key, hash);
        }
    }

    fn digest_remove(&mut self, kind: Kind, key: &str, hash: u64) {
        if kind != Kind::Node {
            self.shared_digest.remove(key, hash);
        }
    }

    /// Returns whether anything changed.
    fn upsert(&mut self, value: Encoded, cause: Cause) -> bool {
        let (kind, key, hash) = (value.kind, value.key.clone(), value.hash);
        let mut patch = None;
        if let Some(old) = self.entries.get(&key) {
            if old.hash == hash {
                return false;
            }
            let (old_seq, old_hash) = (old.seq, old.hash);
            patch = value.patch_from(&old.bytes, old_hash).map(|bytes| Patch {
                base_seq: old_seq,
                bytes,
            });
            self.log.remove(&old_seq);
            self.digest_remove(kind, &key, old_hash);
        } else {
            *self.counts.entry(kind).or_default() += 1;
            if let Some(t) = self.tombstones.remove(&key) {
                self.log.remove(&t.seq);
            }
        }
        let seq = self.next_seq();
        self.log.insert(seq, (kind, key.clone()));
        self.digest_add(kind, &key, hash);
        self.entries.insert(
            key,
            Entry {
                kind,
                seq,
                hash,
                bytes: value.bytes,
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
        let (kind, key): (Kind, Arc<str>) = (old.kind, Arc::from(key));
        self.log.remove(&old.seq);
        self.digest_remove(kind, &key, old.hash);
        if let Some(c) = self.counts.get_mut(&kind) {
            *c = c.saturating_sub(1);
        }
        let seq = self.next_seq();
        self.log.insert(seq, (kind, key.clone()));
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
