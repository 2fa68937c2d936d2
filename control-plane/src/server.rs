//! The gRPC fan-out: one bidirectional stream per agent.
//!
//! Per subscriber the server keeps O(1) state: the version the agent holds, at most
//! one update in flight (nonce, version, send time), and whether it must resend. It
//! keeps no queue: while an update is unacknowledged, changes accumulate in the
//! store, and the ACK triggers one delta from the acked version to the newest; a
//! slow agent gets one bigger, coalesced delta later.
//!
//! While changes keep coming, deltas are also paced (adaptive coalescing): with
//! `update_rate` R and N agents connected, an agent gets its next delta no sooner
//! than N / R after its previous update when more than one version is waiting for
//! it, so under churn the fleet's update rate stays near R however many versions
//! are published. The cost of an update is mostly per update (framing, a TLS
//! record, a write, the ACK), not per byte, so fewer larger updates keep the
//! fan-out from saturating the CPU at hundreds of versions a second. A lone change
//! goes out at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshlite_proto::server::mesh_server;
use meshlite_proto::v1;
use meshlite_runtime::backoff::Backoff;
use meshlite_runtime::subscriber::to_nanos;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::metrics::{Metrics, RoleLabel, RoleLabels, UpdateKind, UpdateLabels};
use crate::store::{Delta, Store, View};

pub mod agents;
pub mod convergence;
mod frames;
pub mod identity;
mod limits;
pub mod transport;

pub use agents::{AgentInfo, Agents};
pub use frames::frames;
use limits::Limits;

/// Stream-serving knobs.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// Largest update chunk, under the 4 MiB gRPC default of every client.
    pub chunk_bytes: usize,
    /// Longest wait to hand one chunk to a stuck connection before dropping it.
    pub send_timeout: Duration,
    /// Longest wait for the agent's Hello.
    pub hello_timeout: Duration,
    /// Retry delays after a NACKed (failed) apply.
    pub nack_backoff: Backoff,
    /// Most inventory entries accepted from one agent.
    pub max_inventory: usize,
    /// Most agent streams at once.
    pub max_streams: usize,
    /// New streams admitted per second (token bucket refill) and burst.
    pub stream_rate: f64,
    pub stream_burst: f64,
    /// Most full snapshots (or inventory resumes) unacknowledged at once.
    pub max_large_in_flight: usize,
    /// Updates per second aimed at over all agents while changes keep coming: an
    /// agent waits (connected agents / this) after an update before the next delta,
    /// which then carries everything since. 0: send as soon as the agent ACKed.
    pub update_rate: f64,
}

impl Default for StreamConfig {
    fn default() -> Self {
        Self {
            chunk_bytes: 16 * 1024,
            send_timeout: Duration::from_secs(30),
            hello_timeout: Duration::from_secs(10),
            nack_backoff: Backoff::default(),
            max_inventory: 4_000_000,
            max_streams: 20_000,
            stream_rate: 1_000.0,
            stream_burst: 5_000.0,
            max_large_in_flight: 64,
            update_rate: 0.0,
        }
    }
}

/// Decides whether a peer may subscribe as what its Hello says.
#[tonic::async_trait]
pub trait Authorizer: Send + Sync + 'static {
    /// # Errors
    /// A reason to refuse the stream (`PermissionDenied`).
    async fn authorize(&self, peer: &Peer, hello: &v1::Hello) -> Result<(), String>;
}

/// What the transport knows about the caller.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    pub addr: Option<std::net::SocketAddr>,
    /// DER of the verified client certificate chain (empty in `--insecure` mode).
    pub certs: Vec<Vec<u8>>,
    /// `authorization: Bearer <token>` metadata, if sent.
    pub token: Option<String>,
}

/// Accepts everyone: `--insecure` mode and tests.
#[derive(Debug, Clone, Copy)]
pub struct AllowAll;

#[tonic::async_trait]
impl Authorizer for AllowAll {
    async fn authorize(&self, _: &Peer, _: &v1::Hello) -> Result<(), String> {
        Ok(())
    }
}

/// The `meshlite.v1.Mesh` service.
#[derive(Clone)]
pub struct MeshService {
    inner: Arc<Shared>,
}

struct Shared {
    store: Arc<Store>,
    config: StreamConfig,
    metrics: Metrics,
    agents: Agents,
    authorizer: Box<dyn Authorizer>,
    limits: Limits,
    large: Arc<tokio::sync::Semaphore>,
}

// === impl MeshService ===

impl MeshService {
    pub fn new(
        store: Arc<Store>,
        config: StreamConfig,
        metrics: Metrics,
        agents: Agents,
        authorizer: Box<dyn Authorizer>,
    ) -> Self {
        let limits = Limits::new(config.max_streams, config.stream_rate, config.stream_burst);
        let large = Arc::new(tokio::sync::Semaphore::new(
            config.max_large_in_flight.max(1),
        ));
        Self {
            inner: Arc::new(Shared {
                store,
                config,
                metrics,
                agents,
                authorizer,
                limits,
                large,
            }),
        }
    }

    /// The tonic service, with the decoding limit applied.
    pub fn into_server(self, max_message_bytes: usize) -> mesh_server::MeshServer<Self> {
        mesh_server::MeshServer::new(self).max_decoding_message_size(max_message_bytes)
    }
}

#[tonic::async_trait]
impl mesh_server::Mesh for MeshService {
    type StreamStream = Frames;

    async fn stream(
        &self,
        request: Request<Streaming<v1::AgentMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let peer = Peer {
            addr: request.remote_addr(),
            certs: request
                .peer_certs()
                .map(|c| c.iter().map(|c| c.as_ref().to_vec()).collect())
                .unwrap_or_default(),
            token: request
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(|t| t.trim().to_string()),
        };
        // Admission: a bound on concurrent streams, and a token bucket on new ones
        // against reconnect storms. Refused agents retry with jittered backoff.
        let permit = match self.inner.limits.admit() {
            Ok(p) => p,
            Err(reason) => {
                self.inner.metrics.refused(reason);
                return Err(Status::resource_exhausted(format!(
                    "stream refused: {reason}"
                )));
            }
        };
        let mut inbound = request.into_inner();
        let shared = self.inner.clone();

        let hello = match tokio::time::timeout(shared.config.hello_timeout, inbound.next()).await {
            Ok(Some(Ok(v1::AgentMessage {
                msg: Some(v1::agent_message::Msg::Hello(h)),
            }))) => h,
            Ok(Some(Err(s))) => return Err(s),
            Err(_) => {
                shared.metrics.refused("hello_timeout");
                return Err(Status::deadline_exceeded("no Hello within the timeout"));
            }
            _ => {
                shared.metrics.refused("no_hello");
                return Err(Status::invalid_argument(
                    "the first message must be a Hello",
                ));
            }
        };
        let view = match (v1::Role::try_from(hello.role), hello.node_name.is_empty()) {
            (Ok(v1::Role::Node), false) => View::Node(hello.node_name.clone()),
            (Ok(v1::Role::Node), true) => {
                shared.metrics.refused("no_node_name");
                return Err(Status::invalid_argument(
                    "a node agent's Hello must name its node",
                ));
            }
            (Ok(v1::Role::Dns), _) => View::Dns,
            _ => {
                shared.metrics.refused("bad_role");
                return Err(Status::invalid_argument("Hello.role must be NODE or DNS"));
            }
        };
        if let Err(reason) = shared.authorizer.authorize(&peer, &hello).await {
            shared.metrics.refused("unauthorized");
            let names = peer
                .certs
                .first()
                .map(|c| meshlite_runtime::tls::dns_names(c))
                .unwrap_or_default();
            warn!(
                peer = ?peer.addr,
                certificate = ?names,
                claimed_node = %hello.node_name,
                claimed_role = ?v1::Role::try_from(hello.role),
                %reason,
                "refused subscription"
            );
            return Err(Status::permission_denied(reason));
        }

        let (tx, rx) = mpsc::channel(2);
        let span = info_span!("stream", node = %hello.node_name, role = ?view_role(&view));
        tokio::spawn(
            async move {
                let _permit = permit;
                let reason = Subscription::new(shared.clone(), hello, view, tx)
                    .run(inbound)
                    .await;
                shared.metrics.ended(reason.as_str());
                info!(reason = reason.as_str(), "stream ended");
            }
            .instrument(span),
        );
        Ok(Response::new(Frames(ReceiverStream::new(rx))))
    }
}

/// A stream's outgoing frames. The channel carries them boxed: a tokio channel
/// allocates its slots 32 at a time for as long as the stream lives, and an
/// unboxed `Result<UpdateFrame, Status>` made that 5.7 KiB per agent (jemalloc's
/// heap profile at 2,000 agents); boxed, 256 bytes.
#[derive(Debug)]
pub struct Frames(ReceiverStream<Box<v1::UpdateFrame>>);

impl tokio_stream::Stream for Frames {
    type Item = Result<v1::UpdateFrame, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        std::pin::Pin::new(&mut self.0)
            .poll_next(cx)
            .map(|f| f.map(|f| Ok(*f)))
    }
}

fn view_role(view: &View) -> RoleLabel {
    match view {
        View::Node(_) => RoleLabel::Node,
        View::Dns => RoleLabel::Dns,
    }
}

/// Why a stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    AgentClosed,
    AgentError(String),
    SendTimeout,
    Protocol(String),
}

impl EndReason {
    fn as_str(&self) -> &'static str {
        match self {
            EndReason::AgentClosed => "agent_closed",
            EndReason::AgentError(_) => "agent_error",
            EndReason::SendTimeout => "send_timeout",
            EndReason::Protocol(_) => "protocol",
        }
    }
}

/// The per-agent state machine.
struct Subscription {
    shared: Arc<Shared>,
    hello: v1::Hello,
    view: View,
    tx: mpsc::Sender<Box<v1::UpdateFrame>>,
    /// The version the agent holds (None until known: after a full snapshot's ACK):
    /// the base of its next delta.
    holds: Option<u64>,
    /// The newest version the agent is current at: `holds`, or later when nothing
    /// in its view changed since. It is not told (its next delta still applies to
    /// `holds`), so a change outside its view costs it nothing.
    current: u64,
    in_flight: Option<InFlight>,
    /// Next update must be a full snapshot.
    need_full: bool,
    /// Waiting for the agent's inventory.
    inventory: Option<HashMap<String, u64>>,
    retry_at: Option<Instant>,
    /// When the last update was sent (pacing).
    last_sent: Option<Instant>,
    nack_backoff: Backoff,
    nonce: u64,
    agent: Arc<AgentInfo>,
}

struct InFlight {
    nonce: String,
    version: u64,
    sent: Instant,
    /// Held while a large update (full snapshot, inventory resume) is unacknowledged,
    /// so at most `max_large_in_flight` of them are buffered at once.
    _large: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// What to send next.
enum Plan {
    /// A full snapshot, cut only once a large-update permit is held: a fleet
    /// waiting for permits must not each hold a copy of the snapshot's index.
    Full,
    Send {
        delta: Delta,
        base: u64,
        kind: UpdateKind,
    },
    RequestInventory,
    Nothing,
}

impl Subscription {
    fn new(
        shared: Arc<Shared>,
        hello: v1::Hello,
        view: View,
        tx: mpsc::Sender<Box<v1::UpdateFrame>>,
    ) -> Self {
        let agent = shared.agents.register(&hello, view_role(&view));
        shared.metrics.convergence.connected(agent.id());
        Self {
            nack_backoff: shared.config.nack_backoff.clone(),
            shared,
            hello,
            view,
            tx,
            holds: None,
            current: 0,
            in_flight: None,
            need_full: false,
            inventory: None,
            retry_at: None,
            last_sent: None,
            nonce: 0,
            agent,
        }
    }

    /// Records the version the agent now holds.
    fn hold(&mut self, version: u64, applied: SystemTime) {
        self.holds = Some(version);
        self.current_at(version, applied);
    }

    /// Records that the agent is current at `version` (it holds it, or nothing in
    /// its view changed between what it holds and `version`).
    fn current_at(&mut self, version: u64, applied: SystemTime) {
        self.current = version;
        self.agent.set_version(version);
        self.shared
            .metrics
            .convergence
            .advanced(self.agent.id(), version, applied);
    }

    async fn run(mut self, mut inbound: Streaming<v1::AgentMessage>) -> EndReason {
        let store = self.shared.store.clone();
        // Never publish a partial view: wait until every watch has synced.
        if !store.is_ready() {
            debug!("waiting for the store to sync");
            tokio::select! {
                () = store.wait_ready() => {}
                () = self.tx.closed() => return EndReason::AgentClosed,
            }
        }
        let gauge = self
            .shared
            .metrics
            .subscribers
            .get_or_create(&RoleLabels {
                role: view_role(&self.view),
            })
            .clone();
        gauge.inc();
        let _dec = scopeguard(move || {
            gauge.dec();
        });

        let first = self.resume_plan();
        if let Err(r) = self.execute(first).await {
            return r;
        }
        let mut published = store.subscribe();
        loop {
            if self.in_flight.is_none() && self.inventory.is_none() {
                let due = self.retry_at.is_none_or(|t| Instant::now() >= t);
                if due {
                    self.retry_at = self.paced();
                }
                if self.retry_at.is_none() {
                    let plan = self.next_plan();
                    if let Err(r) = self.execute(plan).await {
                        return r;
                    }
                }
            }
            let idle = self.in_flight.is_none() && self.inventory.is_none();
            let retry = self.retry_at;
            tokio::select! {
                msg = inbound.next() => match msg {
                    None => return EndReason::AgentClosed,
                    Some(Err(s)) => return EndReason::AgentError(s.message().to_string()),
                    Some(Ok(m)) => if let Err(r) = self.on_message(m).await {
                        return r;
                    },
                },
                changed = published.changed(), if idle && retry.is_none() => {
                    if changed.is_err() {
                        return EndReason::Protocol("store closed".into());
                    }
                }
                () = sleep_until_opt(retry), if retry.is_some() => {}
            }
        }
    }

    /// When the next delta may go out, if that is later than now (see the module
    /// docs on pacing). Only an agent more than one version behind waits: a single
    /// change goes out at once, however recent the previous update.
    fn paced(&self) -> Option<Instant> {
        let rate = self.shared.config.update_rate;
        let last = self.last_sent?;
        if rate <= 0.0 || self.shared.store.version() <= self.current + 1 {
            return None;
        }
        // Capped: a tiny rate must not stall an agent (or overflow the clock).
        let gap = Duration::from_secs_f64((self.shared.limits.active() as f64 / rate).min(60.0));
        Some(last + gap).filter(|at| *at > Instant::now())
    }

    /// The first update: resume by version, by digest or by inventory if we can,
    /// a full snapshot otherwise.
    fn resume_plan(&mut self) -> Plan {
        let store = &self.shared.store;
        let h = &self.hello;
        if h.applied_version == 0 || h.applied_count == 0 {
            return self.full_plan();
        }
        if h.epoch == store.epoch()
            && let Some(delta) =
                store.delta_with_patches(h.applied_version, &self.view, takes_patches(h))
        {
            let kind = if delta.upserts.is_empty() && delta.removals.is_empty() {
                UpdateKind::Unchanged
            } else {
                UpdateKind::Delta
            };
            return Plan::Send {
                delta,
                base: h.applied_version,
                kind,
            };
        }
        let (digest, version) = store.digest(&self.view);
        if digest.sum == h.applied_digest && digest.count == h.applied_count {
            return Plan::Send {
                delta: Delta {
                    version,
                    ..Delta::default()
                },
                base: h.applied_version,
                kind: UpdateKind::Unchanged,
            };
        }
        Plan::RequestInventory
    }

    fn full_plan(&mut self) -> Plan {
        self.need_full = false;
        Plan::Full
    }

    fn next_plan(&mut self) -> Plan {
        if self.need_full {
            return self.full_plan();
        }
        let Some(holds) = self.holds else {
            return Plan::Nothing;
        };
        // `current` is never behind `holds`: `hold` sets both.
        if self.shared.store.version() <= self.current {
            return Plan::Nothing;
        }
        match self
            .shared
            .store
            .delta_with_patches(holds, &self.view, takes_patches(&self.hello))
        {
            Some(d) if d.upserts.is_empty() && d.removals.is_empty() => {
                // Nothing in this agent's view changed: it is current as it is,
                // and its next delta still applies to what it holds.
                self.current_at(d.version, SystemTime::now());
                Plan::Nothing
            }
            Some(delta) => Plan::Send {
                delta,
                base: holds,
                kind: UpdateKind::Delta,
            },
            // Behind the tombstone window: compare inventories.
            None => Plan::RequestInventory,
        }
    }

    async fn execute(&mut self, plan: Plan) -> Result<(), EndReason> {
        match plan {
            Plan::Nothing => Ok(()),
            Plan::RequestInventory => {
                debug!("requesting inventory");
                self.inventory = Some(HashMap::new());
                let frame = v1::UpdateFrame {
                    epoch: self.shared.store.epoch(),
                    inventory_request: true,
                    last_chunk: true,
                    sent_unix_nanos: to_nanos(SystemTime::now()),
                    ..Default::default()
                };
                self.send_frame(frame).await
            }
            Plan::Full => {
                let large = self.acquire_large().await?;
                let delta = self.shared.store.full(&self.view);
                self.send_update(delta, 0, UpdateKind::Full, large).await
            }
            Plan::Send { delta, base, kind } => {
                let large = if matches!(kind, UpdateKind::Full | UpdateKind::Inventory) {
                    self.acquire_large().await?
                } else {
                    None
                };
                self.send_update(delta, base, kind, large).await
            }
        }
    }

    /// A full snapshot of a large cluster is megabytes per agent: pace them, so a
    /// fleet syncing at once does not buffer them all.
    async fn acquire_large(&self) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, EndReason> {
        tokio::select! {
            p = self.shared.large.clone().acquire_owned() => Ok(p.ok()),
            () = self.tx.closed() => Err(EndReason::AgentClosed),
        }
    }

    async fn send_update(
        &mut self,
        delta: Delta,
        base: u64,
        kind: UpdateKind,
        large: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Result<(), EndReason> {
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        let version = delta.version;
        self.shared
            .metrics
            .patches_sent
            .inc_by(delta.patches as u64);
        let chunks = frames(
            self.shared.store.epoch(),
            base,
            &nonce,
            delta,
            self.shared.config.chunk_bytes,
        );
        let mut bytes = 0;
        for mut f in chunks {
            f.sent_unix_nanos = to_nanos(SystemTime::now());
            bytes += prost::Message::encoded_len(&f);
            self.send_frame(f).await?;
        }
        self.shared.metrics.update_bytes_sent.inc_by(bytes as u64);
        self.shared
            .metrics
            .updates_sent
            .get_or_create(&UpdateLabels { kind })
            .inc();
        debug!(version, base, bytes, "sent update");
        let now = Instant::now();
        self.last_sent = Some(now);
        self.in_flight = Some(InFlight {
            nonce,
            version,
            sent: now,
            _large: large,
        });
        Ok(())
    }

    async fn send_frame(&self, frame: v1::UpdateFrame) -> Result<(), EndReason> {
        match tokio::time::timeout(
            self.shared.config.send_timeout,
            self.tx.send(Box::new(frame)),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(EndReason::AgentClosed),
            Err(_) => Err(EndReason::SendTimeout),
        }
    }

    async fn on_message(&mut self, m: v1::AgentMessage) -> Result<(), EndReason> {
        use v1::agent_message::Msg;
        match m.msg {
            Some(Msg::Ack(ack)) => {
                let Some(f) = self.in_flight.take_if(|f| f.nonce == ack.nonce) else {
                    debug!(nonce = %ack.nonce, "ACK for an update not in flight; ignored");
                    return Ok(());
                };
                self.shared.metrics.acks.inc();
                self.shared
                    .metrics
                    .ack_latency
                    .observe(f.sent.elapsed().as_secs_f64());
                self.agent.acked(&ack);
                let applied = if ack.applied_unix_nanos > 0 {
                    meshlite_runtime::subscriber::from_nanos(ack.applied_unix_nanos)
                } else {
                    SystemTime::now()
                };
                self.hold(f.version, applied);
                self.nack_backoff.reset();
                Ok(())
            }
            Some(Msg::Nack(nack)) => {
                let Some(f) = self.in_flight.take_if(|f| f.nonce == nack.nonce) else {
                    return Ok(());
                };
                self.shared.metrics.nacks.inc();
                self.agent.nacked(&nack);
                warn!(
                    version = f.version,
                    holds = nack.version,
                    error = %nack.error,
                    rejected = ?nack.rejected,
                    want_full = nack.want_full,
                    "agent NACKed update"
                );
                if nack.want_full {
                    self.need_full = true;
                    self.holds = None;
                } else if self.holds.is_none() && self.hello.epoch != self.shared.store.epoch() {
                    // The first update failed to apply and the agent kept what it
                    // held from another run of the control plane: that version
                    // means nothing here, so no delta can be cut from it. Retry
                    // with a full snapshot, after a pause.
                    self.need_full = true;
                    self.retry_at = Some(Instant::now() + self.nack_backoff.next_delay());
                } else {
                    // The agent reports what it holds now: the update's version when
                    // only some resources were rejected (the rest applied), its
                    // previous version when the apply failed and rolled back.
                    self.hold(nack.version, SystemTime::now());
                    if nack.version < f.version {
                        self.retry_at = Some(Instant::now() + self.nack_backoff.next_delay());
                    }
                }
                Ok(())
            }
            Some(Msg::Inventory(inv)) => {
                let Some(map) = self.inventory.as_mut() else {
                    return Err(EndReason::Protocol("inventory not requested".into()));
                };
                if map.len() + inv.entries.len() > self.shared.config.max_inventory {
                    return Err(EndReason::Protocol("inventory too large".into()));
                }
                map.extend(inv.entries.into_iter().map(|e| (e.key, e.hash)));
                if inv.last_chunk {
                    let map = self.inventory.take().unwrap_or_default();
                    let delta = self.shared.store.diff_inventory(&self.view, &map);
                    let kind = if delta.upserts.is_empty() && delta.removals.is_empty() {
                        UpdateKind::Unchanged
                    } else {
                        UpdateKind::Inventory
                    };
                    // The diff applies to what the agent holds now: the version it
                    // reported in its Hello when resuming, the one it last ACKed when
                    // it fell behind the tombstone window mid-stream. (Base 0 would
                    // make the agent take the diff for a whole snapshot.)
                    let base = self.holds.unwrap_or(self.hello.applied_version);
                    self.execute(Plan::Send { delta, base, kind }).await?;
                }
                Ok(())
            }
            Some(Msg::Hello(_)) => Err(EndReason::Protocol("second Hello".into())),
            None => Err(EndReason::Protocol("empty message".into())),
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.shared.metrics.convergence.gone(self.agent.id());
    }
}

/// Whether the agent applies EndpointSlice patches made by this control plane.
fn takes_patches(hello: &v1::Hello) -> bool {
    hello.patch_schema == meshlite_proto::PATCH_SCHEMA
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Runs a closure on drop.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

#[cfg(test)]
mod tests;
