//! The simulated agent fleet: one task per agent, each with its own tonic Channel
//! (its own TCP + mTLS connection to 127.0.0.1), speaking the real protocol:
//! `Hello` with epoch, version, digest and count for resume; an ACK for every
//! update, echoing its nonce; the inventory when asked.
//!
//! Updates are decoded with [`LightUpdate`] (keys and hashes, no bodies) and each
//! agent keeps what it holds as content hashes indexed by a fleet-wide key table
//! ([`Slots`]: 8 bytes per key per agent, ~170 KB at 10k services), plus its own
//! Node, the inventory digest and the version. The digest of a full snapshot's
//! shared part is computed once per (epoch, version) for the fleet: every agent
//! receives the same services and slices for a version.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, SystemTime};

use meshlite_proto::{InventoryDigest, v1};
use meshlite_runtime::subscriber::to_nanos;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tonic::transport::{ClientTlsConfig, Endpoint};

use super::track::{Timeline, Tracker};
use super::wire::{LightUpdate, STREAM_PATH};

/// Fleet-wide interning of service and slice keys to dense indexes.
#[derive(Debug, Default)]
pub struct KeyTable {
    inner: RwLock<Keys>,
}

#[derive(Debug, Default)]
struct Keys {
    index: HashMap<Arc<str>, u32>,
    keys: Vec<Arc<str>>,
}

impl KeyTable {
    pub fn intern(&self, key: &str) -> u32 {
        if let Some(i) = self.read().index.get(key) {
            return *i;
        }
        let mut w = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = w.index.get(key) {
            return *i;
        }
        let i = u32::try_from(w.keys.len()).unwrap_or(u32::MAX);
        let k: Arc<str> = Arc::from(key);
        w.index.insert(k.clone(), i);
        w.keys.push(k);
        i
    }

    pub fn key(&self, i: u32) -> Option<Arc<str>> {
        self.read().keys.get(i as usize).cloned()
    }

    pub fn len(&self) -> usize {
        self.read().keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Keys> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }
}

/// How agents connect.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub endpoint: String,
    pub tls: ClientTlsConfig,
    /// Most connection attempts in progress at once during a mass (re)connect.
    pub connect_concurrency: usize,
}

/// What the harness sees of one agent.
#[derive(Debug)]
pub struct AgentShared {
    pub index: usize,
    pub node: String,
    pub acked_version: AtomicU64,
    pub epoch: AtomicU64,
    /// Streams opened (Hellos sent).
    pub streams: AtomicU64,
    /// ACKs sent on the current stream.
    pub acks_this_stream: AtomicU64,
    pub full_snapshots: AtomicU64,
    pub updates: AtomicU64,
    pub inventories: AtomicU64,
    pub nacks: AtomicU64,
    pub errors: AtomicU64,
    /// When the first ACK on the current stream was sent (µs since fleet start).
    pub first_ack_us: AtomicU64,
    pub connected: AtomicBool,
    /// Counted by the tracker.
    pub tracked: AtomicBool,
    /// Whether to ACK (false: hold ACKs back, the "stuck agent").
    ack: watch::Sender<bool>,
    pub last_error: Mutex<Option<String>>,
}

/// What an agent holds.
#[derive(Debug, Default)]
struct Held {
    epoch: u64,
    version: u64,
    /// Content hash by key index; 0 = absent.
    hashes: Slots,
    node: Option<(String, u64)>,
    digest: InventoryDigest,
}

/// Content hashes by key index, in fixed-size chunks: a new key (a slice a
/// rollout creates) adds at most one chunk per agent. One flat vector per agent
/// was grown by doubling when the key table outgrew it: 5,000 agents copying and
/// faulting in ~300 KB each at once took the harness's two cores for 1.6 s.
#[derive(Debug, Default)]
struct Slots {
    chunks: Vec<Box<[u64; SLOT_CHUNK]>>,
}

const SLOT_CHUNK: usize = 1024;

impl Slots {
    /// The slot of key `k`, growing to hold it.
    fn slot(&mut self, k: u32) -> &mut u64 {
        let (c, i) = (k as usize / SLOT_CHUNK, k as usize % SLOT_CHUNK);
        while self.chunks.len() <= c {
            self.chunks.push(Box::new([0; SLOT_CHUNK]));
        }
        &mut self.chunks[c][i]
    }

    /// The slot of key `k` if its chunk exists (a removal needs no growing).
    fn get_mut(&mut self, k: u32) -> Option<&mut u64> {
        let (c, i) = (k as usize / SLOT_CHUNK, k as usize % SLOT_CHUNK);
        self.chunks.get_mut(c).map(|chunk| &mut chunk[i])
    }

    fn clear(&mut self) {
        self.chunks.clear();
    }

    /// (key index, hash) of every present key.
    fn iter(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.chunks
            .iter()
            .flat_map(|c| c.iter())
            .enumerate()
            .filter(|(_, h)| **h != 0)
            .map(|(i, h)| (i, *h))
    }
}

/// An update being assembled from chunks.
#[derive(Debug)]
struct Pending {
    nonce: String,
    epoch: u64,
    version: u64,
    base: u64,
    upserts: Vec<(u32, u64)>,
    node: Option<(String, u64)>,
    removals: Vec<u32>,
    node_removed: bool,
    /// Per key, the update's newest cause (by trigger time).
    triggers: HashMap<u32, Timeline>,
}

type DigestMemo = Mutex<HashMap<(u64, u64), Arc<OnceLock<InventoryDigest>>>>;

struct Shared {
    config: FleetConfig,
    keys: Arc<KeyTable>,
    tracker: Arc<Tracker>,
    connect_gate: tokio::sync::Semaphore,
    start: Instant,
    digests: DigestMemo,
}

/// The running fleet.
pub struct Fleet {
    pub agents: Vec<Arc<AgentShared>>,
    shared: Arc<Shared>,
    reconnect: watch::Sender<u64>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("agents", &self.agents.len())
            .finish()
    }
}

// === impl Fleet ===

impl Fleet {
    /// Starts `n` agents for nodes `names`; they connect at once (bounded by the
    /// connect concurrency).
    pub fn start(
        config: FleetConfig,
        names: Vec<String>,
        keys: Arc<KeyTable>,
        tracker: Arc<Tracker>,
    ) -> Self {
        let (reconnect, _) = watch::channel(0);
        let (stop, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            connect_gate: tokio::sync::Semaphore::new(config.connect_concurrency.max(1)),
            config,
            keys,
            tracker,
            start: Instant::now(),
            digests: Mutex::new(HashMap::new()),
        });
        let mut agents = Vec::with_capacity(names.len());
        let mut tasks = Vec::with_capacity(names.len());
        for (index, node) in names.into_iter().enumerate() {
            let (ack, _) = watch::channel(true);
            let a = Arc::new(AgentShared {
                index,
                node,
                acked_version: AtomicU64::new(0),
                epoch: AtomicU64::new(0),
                streams: AtomicU64::new(0),
                acks_this_stream: AtomicU64::new(0),
                full_snapshots: AtomicU64::new(0),
                updates: AtomicU64::new(0),
                inventories: AtomicU64::new(0),
                nacks: AtomicU64::new(0),
                errors: AtomicU64::new(0),
                first_ack_us: AtomicU64::new(0),
                connected: AtomicBool::new(false),
                tracked: AtomicBool::new(true),
                ack,
                last_error: Mutex::new(None),
            });
            agents.push(a.clone());
            tasks.push(tokio::spawn(run_agent(
                shared.clone(),
                a,
                reconnect.subscribe(),
                stop.subscribe(),
            )));
        }
        Self {
            agents,
            shared,
            reconnect,
            stop,
            tasks,
        }
    }

    /// Microseconds since the fleet started (the clock of `first_ack_us`).
    pub fn now_us(&self) -> u64 {
        u64::try_from(self.shared.start.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Every agent drops its connection and reconnects with what it holds.
    pub fn reconnect_all(&self) {
        for a in &self.agents {
            a.acks_this_stream.store(0, Ordering::Relaxed);
            a.first_ack_us.store(0, Ordering::Relaxed);
        }
        self.reconnect.send_modify(|g| *g += 1);
    }

    /// Stops or resumes ACKing on one agent.
    pub fn set_acking(&self, index: usize, ack: bool) {
        if let Some(a) = self.agents.get(index) {
            a.ack.send_replace(ack);
        }
    }

    /// Agents that hold at least `version` (by their last ACK).
    pub fn at_least(&self, version: u64) -> usize {
        self.agents
            .iter()
            .filter(|a| a.acked_version.load(Ordering::Relaxed) >= version)
            .count()
    }

    pub fn sum(&self, f: impl Fn(&AgentShared) -> &AtomicU64) -> u64 {
        self.agents
            .iter()
            .map(|a| f(a).load(Ordering::Relaxed))
            .sum()
    }

    /// The first few agents' last errors, for failure messages.
    pub fn errors(&self) -> Vec<String> {
        self.agents
            .iter()
            .filter_map(|a| {
                let e = a.last_error.lock().unwrap_or_else(|p| p.into_inner());
                e.as_ref().map(|e| format!("{}: {e}", a.node))
            })
            .take(5)
            .collect()
    }

    /// Stops every agent (closing its connection) and waits for them.
    pub async fn shutdown(self) {
        self.stop.send_replace(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
}

enum StreamEnd {
    Reconnect,
    Stop,
    Error(String),
}

async fn run_agent(
    shared: Arc<Shared>,
    me: Arc<AgentShared>,
    mut reconnect: watch::Receiver<u64>,
    mut stop: watch::Receiver<bool>,
) {
    let mut held = Held::default();
    let mut delay = Duration::from_millis(100);
    loop {
        reconnect.mark_unchanged();
        let end = tokio::select! {
            e = stream_once(&shared, &me, &mut held) => e,
            _ = reconnect.changed() => StreamEnd::Reconnect,
            _ = stop.wait_for(|s| *s) => StreamEnd::Stop,
        };
        me.connected.store(false, Ordering::Relaxed);
        match end {
            StreamEnd::Stop => return,
            StreamEnd::Reconnect => delay = Duration::from_millis(100),
            StreamEnd::Error(e) => {
                me.errors.fetch_add(1, Ordering::Relaxed);
                *me.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                // Jittered backoff, as real agents do, bounded at 5 s.
                let jitter = rand::random_range(0.5..1.5);
                tokio::select! {
                    () = tokio::time::sleep(delay.mul_f64(jitter)) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn stream_once(shared: &Shared, me: &AgentShared, held: &mut Held) -> StreamEnd {
    let channel = {
        let _permit = shared.connect_gate.acquire().await;
        let ep = match Endpoint::from_shared(shared.config.endpoint.clone()) {
            Ok(ep) => ep,
            Err(e) => return StreamEnd::Error(format!("endpoint: {e}")),
        };
        let ep = match ep
            .connect_timeout(Duration::from_secs(20))
            .http2_keep_alive_interval(Duration::from_secs(30))
            // Small receive windows: thousands of connections in one process must
            // not each buffer megabytes (loopback needs no large window).
            .initial_stream_window_size(256 * 1024)
            .initial_connection_window_size(512 * 1024)
            .keep_alive_timeout(Duration::from_secs(20))
            .tls_config(shared.config.tls.clone())
        {
            Ok(ep) => ep,
            Err(e) => return StreamEnd::Error(format!("tls config: {e}")),
        };
        match ep.connect().await {
            Ok(c) => c,
            Err(e) => return StreamEnd::Error(format!("connect: {e:?}")),
        }
    };
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(64 << 20);
    if let Err(e) = grpc.ready().await {
        return StreamEnd::Error(format!("not ready: {e}"));
    }
    let (tx, rx) = mpsc::channel::<v1::AgentMessage>(8);
    let hello = v1::Hello {
        node_name: me.node.clone(),
        role: v1::Role::Node as i32,
        agent_version: "scale-harness".into(),
        epoch: held.epoch,
        applied_version: held.version,
        applied_digest: held.digest.sum,
        applied_count: held.digest.count,
        // Patches carry the new hash like any resource: all the fleet reads.
        patch_schema: meshlite_proto::PATCH_SCHEMA,
    };
    let _ = tx
        .send(v1::AgentMessage {
            msg: Some(v1::agent_message::Msg::Hello(hello)),
        })
        .await;
    let codec = tonic_prost::ProstCodec::<v1::AgentMessage, LightUpdate>::default();
    let path = http::uri::PathAndQuery::from_static(STREAM_PATH);
    let response = match grpc
        .streaming(
            tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
            path,
            codec,
        )
        .await
    {
        Ok(r) => r,
        Err(s) => return StreamEnd::Error(format!("stream refused: {}", s.message())),
    };
    me.streams.fetch_add(1, Ordering::Relaxed);
    me.connected.store(true, Ordering::Relaxed);
    let mut inbound = response.into_inner();
    let mut pending: Option<Pending> = None;
    // An ACK held back while this agent plays stuck.
    let mut held_ack: Option<(v1::AgentMessage, u64, u64)> = None;
    let mut acking = me.ack.subscribe();
    loop {
        let msg = tokio::select! {
            m = inbound.message() => m,
            r = acking.changed() => {
                if r.is_ok() && *acking.borrow_and_update()
                    && let Some((ack, epoch, version)) = held_ack.take()
                {
                    if tx.send(ack).await.is_err() {
                        return StreamEnd::Error("outbound closed".into());
                    }
                    acked(shared, me, epoch, version);
                }
                continue;
            }
        };
        let update = match msg {
            Ok(Some(u)) => u,
            Ok(None) => return StreamEnd::Error("server closed the stream".into()),
            Err(s) => return StreamEnd::Error(format!("stream: {}", s.message())),
        };
        if update.inventory_request {
            me.inventories.fetch_add(1, Ordering::Relaxed);
            if send_inventory(&tx, &shared.keys, held).await.is_err() {
                return StreamEnd::Error("outbound closed".into());
            }
            continue;
        }
        let p = pending.get_or_insert_with(|| Pending {
            nonce: update.nonce.clone(),
            epoch: update.epoch,
            version: update.version,
            base: update.base_version,
            upserts: Vec::new(),
            node: None,
            removals: Vec::new(),
            node_removed: false,
            triggers: HashMap::new(),
        });
        if p.nonce != update.nonce {
            return StreamEnd::Error("chunk of another update".into());
        }
        for r in update.upserts {
            if r.key.starts_with("node/") {
                p.node = Some((r.key, r.hash));
            } else {
                p.upserts.push((shared.keys.intern(&r.key), r.hash));
            }
        }
        for k in update.removals {
            if k.starts_with("node/") {
                p.node_removed = true;
            } else {
                p.removals.push(shared.keys.intern(&k));
            }
        }
        if me.tracked.load(Ordering::Relaxed) {
            for c in update.causes {
                if !c.removed && !c.key.starts_with("node/") {
                    let t = p.triggers.entry(shared.keys.intern(&c.key)).or_default();
                    if c.trigger_unix_nanos >= t.trigger_ns {
                        *t = Timeline {
                            trigger_ns: c.trigger_unix_nanos,
                            observed_ns: c.observed_unix_nanos,
                            published_ns: c.published_unix_nanos,
                            ..Timeline::default()
                        };
                    }
                }
            }
        }
        if !update.last_chunk {
            continue;
        }
        let Some(p) = pending.take() else { continue };
        let received = Instant::now();
        if me.tracked.load(Ordering::Relaxed) {
            let (sent_ns, received_ns) = (update.sent_unix_nanos, to_nanos(SystemTime::now()));
            let keys = p
                .upserts
                .iter()
                .map(|(k, _)| {
                    let t = p.triggers.get(k).map(|t| Timeline {
                        sent_ns,
                        received_ns,
                        ..*t
                    });
                    (*k, t)
                })
                .chain(p.removals.iter().map(|k| (*k, None)));
            shared.tracker.observe(me.index, keys, received);
        }
        me.updates.fetch_add(1, Ordering::Relaxed);
        let reply = if p.base == 0 {
            me.full_snapshots.fetch_add(1, Ordering::Relaxed);
            apply_full(shared, held, p)
        } else if p.base != held.version {
            me.nacks.fetch_add(1, Ordering::Relaxed);
            v1::agent_message::Msg::Nack(v1::Nack {
                nonce: p.nonce,
                version: held.version,
                error: format!("base {} but holding {}", p.base, held.version),
                rejected: vec![],
                want_full: true,
            })
        } else {
            apply_delta(shared, held, p)
        };
        let msg = v1::AgentMessage { msg: Some(reply) };
        let is_ack = matches!(msg.msg, Some(v1::agent_message::Msg::Ack(_)));
        if is_ack && !*acking.borrow() {
            held_ack = Some((msg, held.epoch, held.version));
            continue;
        }
        if tx.send(msg).await.is_err() {
            return StreamEnd::Error("outbound closed".into());
        }
        if is_ack {
            acked(shared, me, held.epoch, held.version);
        }
    }
}

/// Records an ACK sent.
fn acked(shared: &Shared, me: &AgentShared, epoch: u64, version: u64) {
    me.acked_version.store(version, Ordering::Relaxed);
    me.epoch.store(epoch, Ordering::Relaxed);
    if me.acks_this_stream.fetch_add(1, Ordering::Relaxed) == 0 {
        let us = u64::try_from(shared.start.elapsed().as_micros()).unwrap_or(u64::MAX);
        me.first_ack_us.store(us.max(1), Ordering::Relaxed);
    }
}

fn ack(p: &Pending) -> v1::agent_message::Msg {
    let now = to_nanos(SystemTime::now());
    v1::agent_message::Msg::Ack(v1::Ack {
        nonce: p.nonce.clone(),
        version: p.version,
        received_unix_nanos: now,
        applied_unix_nanos: now,
        apply_duration_micros: 0,
        rules_changed: (p.upserts.len() + p.removals.len()) as u64,
    })
}

fn apply_full(shared: &Shared, held: &mut Held, p: Pending) -> v1::agent_message::Msg {
    let reply = ack(&p);
    held.hashes.clear();
    for (k, h) in &p.upserts {
        *held.hashes.slot(*k) = *h;
    }
    // Every agent gets the same services and slices for a version: digest them once.
    let cell = shared
        .digests
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry((p.epoch, p.version))
        .or_default()
        .clone();
    let mut digest = *cell.get_or_init(|| {
        let mut d = InventoryDigest::default();
        for (k, h) in &p.upserts {
            if let Some(key) = shared.keys.key(*k) {
                d.add(&key, *h);
            }
        }
        d
    });
    if let Some((key, h)) = &p.node {
        digest.add(key, *h);
    }
    held.node = p.node;
    held.digest = digest;
    held.epoch = p.epoch;
    held.version = p.version;
    reply
}

fn apply_delta(shared: &Shared, held: &mut Held, p: Pending) -> v1::agent_message::Msg {
    let reply = ack(&p);
    for (k, h) in &p.upserts {
        let Some(key) = shared.keys.key(*k) else {
            continue;
        };
        let slot = held.hashes.slot(*k);
        if *slot != 0 {
            held.digest.remove(&key, *slot);
        }
        *slot = *h;
        held.digest.add(&key, *h);
    }
    for k in &p.removals {
        let Some(key) = shared.keys.key(*k) else {
            continue;
        };
        if let Some(slot) = held.hashes.get_mut(*k)
            && *slot != 0
        {
            held.digest.remove(&key, *slot);
            *slot = 0;
        }
    }
    if let Some((key, h)) = p.node {
        if let Some((old_key, old)) = held.node.take() {
            held.digest.remove(&old_key, old);
        }
        held.digest.add(&key, h);
        held.node = Some((key, h));
    } else if p.node_removed
        && let Some((old_key, old)) = held.node.take()
    {
        held.digest.remove(&old_key, old);
    }
    held.epoch = p.epoch;
    held.version = p.version;
    reply
}

async fn send_inventory(
    tx: &mpsc::Sender<v1::AgentMessage>,
    keys: &KeyTable,
    held: &Held,
) -> Result<(), mpsc::error::SendError<v1::AgentMessage>> {
    const CHUNK: usize = 20_000;
    let mut entries: Vec<v1::KeyHash> = held
        .hashes
        .iter()
        .filter_map(|(i, hash)| {
            let key = keys.key(u32::try_from(i).ok()?)?;
            Some(v1::KeyHash {
                key: key.to_string(),
                hash,
            })
        })
        .collect();
    if let Some((key, hash)) = &held.node {
        entries.push(v1::KeyHash {
            key: key.clone(),
            hash: *hash,
        });
    }
    let chunks: Vec<Vec<v1::KeyHash>> = if entries.is_empty() {
        vec![Vec::new()]
    } else {
        entries.chunks(CHUNK).map(<[_]>::to_vec).collect()
    };
    let n = chunks.len();
    for (i, c) in chunks.into_iter().enumerate() {
        tx.send(v1::AgentMessage {
            msg: Some(v1::agent_message::Msg::Inventory(v1::Inventory {
                entries: c,
                last_chunk: i + 1 == n,
            })),
        })
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_grow_by_chunks_and_list_present_keys_in_order() {
        let mut s = Slots::default();
        *s.slot(3) = 30;
        *s.slot(2_500) = 25;
        assert_eq!(s.chunks.len(), 3, "key 2,500 lives in the third chunk");
        *s.slot(4) = 40;
        *s.slot(4) = 0; // removed
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![(3, 30), (2_500, 25)]);
        assert!(s.get_mut(5_000).is_none(), "looking up does not grow");
        assert_eq!(s.chunks.len(), 3);
        s.clear();
        assert_eq!(s.iter().count(), 0);
    }
}
