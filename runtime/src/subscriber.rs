//! The agent's side of the snapshot stream.
//!
//! [`Subscriber::run`] connects (mTLS unless told otherwise), says `Hello` with what
//! it has applied, assembles chunked updates, converts them to domain types, applies
//! them to its [`Snapshot`] in one step and calls the [`Handler`]. A successful apply
//! is ACKed with timings; a rejected resource or a failed apply is NACKed and the
//! snapshot rolls back to the last good version. On any stream error it reconnects
//! with jittered exponential backoff and resumes; the snapshot (and whatever the
//! handler programmed) stays in place meanwhile: agents fail static.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshlite_proto::model::{Resource, ResourceKey};
use meshlite_proto::patch::PatchError;
use meshlite_proto::v1;
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::backoff::Backoff;
use crate::snapshot::{ChangeSet, Snapshot};
use crate::tls::ClientTls;

mod metrics;

pub use metrics::SubscriberMetrics;

/// Most trace links on one apply span (OpenTelemetry's default link limit).
const MAX_LINKS: usize = 128;

/// The role an agent subscribes as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Node,
    Dns,
}

/// Why a key changed, as the control plane reported it.
#[derive(Debug, Clone)]
pub struct Cause {
    pub key: String,
    /// `endpoints.kubernetes.io/last-change-trigger-time`, else first observation.
    pub trigger: SystemTime,
    /// When the control plane saw the change.
    pub observed: SystemTime,
    /// When the control plane published the version carrying it.
    pub published: SystemTime,
    /// W3C traceparent of the control plane's ingest span.
    pub traceparent: Option<String>,
    pub removed: bool,
}

/// Facts about the update being applied.
#[derive(Debug, Clone)]
pub struct UpdateInfo {
    pub epoch: u64,
    pub version: u64,
    /// The update replaced everything.
    pub full: bool,
    pub sent: SystemTime,
    pub received: SystemTime,
    pub causes: Vec<Cause>,
}

/// What a handler reports for the ACK.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    /// Backend-defined: rules written, records changed.
    pub rules_changed: u64,
    /// Resources the handler could not put into effect while it applied the rest,
    /// as `"<key>: <reason>"`. The update is then NACKed naming them (its version
    /// is still held, like an update with invalid resources).
    pub rejected: Vec<String>,
}

/// A handler's failure to apply; the subscriber NACKs with it and rolls back.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct ApplyError(pub String);

/// The agent's reaction to a new snapshot: program the kernel, swap the zone.
pub trait Handler: Send + 'static {
    /// Called once per complete update (never for an update that changed nothing,
    /// except the first one after start, so a restarted agent can program what it
    /// resumed). The snapshot is already at the new version; `changes` says what moved.
    /// Return only when the change is in effect: the ACK that follows is what the
    /// control plane counts as "applied".
    fn apply(
        &mut self,
        snapshot: &Snapshot,
        changes: &ChangeSet,
        info: &UpdateInfo,
    ) -> impl Future<Output = Result<Applied, ApplyError>> + Send;
}

/// How to reach the control plane.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SubscriberConfig {
    /// `https://host:port` (mTLS) or `http://host:port` (only with `tls: None`).
    pub endpoint: String,
    pub node_name: String,
    pub role: Role,
    /// None: plaintext (`--insecure`).
    pub tls: Option<ClientTls>,
    pub agent_version: String,
    /// The reconnect backoff (the one every agent uses; not printed).
    #[serde(skip)]
    pub backoff: Backoff,
    /// Largest message accepted from the server.
    pub max_message_bytes: usize,
    /// A ServiceAccount token file sent as `authorization: Bearer` (re-read on every
    /// connect, as the kubelet rotates it), for `--node-identity token`.
    pub token_file: Option<std::path::PathBuf>,
}

/// Connection state, for readiness and `/healthz`.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub connected: bool,
    /// Version of the last applied update (0: nothing yet).
    pub applied_version: u64,
    pub epoch: u64,
    /// When the stream last delivered anything (update or keepalive).
    pub last_contact: Option<SystemTime>,
    /// When the last update was applied.
    pub last_applied: Option<SystemTime>,
    /// Applied at least one snapshot since start.
    pub synced: bool,
}

impl Status {
    /// One line for health endpoints: connected, or how long the agent has been
    /// serving its last state without a control plane (fail static).
    pub fn describe(&self, now: SystemTime) -> String {
        let age = |t: Option<SystemTime>| {
            t.and_then(|t| now.duration_since(t).ok())
                .map_or("never".to_string(), |d| format!("{}s ago", d.as_secs()))
        };
        if self.connected {
            format!(
                "control plane connected; version {} applied {}",
                self.applied_version,
                age(self.last_applied)
            )
        } else if self.synced {
            format!(
                "STALE: control plane unreachable (last contact {}); serving version {} applied {} until it returns",
                age(self.last_contact),
                self.applied_version,
                age(self.last_applied)
            )
        } else {
            format!(
                "control plane not reached yet (last contact {}); nothing applied",
                age(self.last_contact)
            )
        }
    }
}

/// The stream client. See the module docs.
pub struct Subscriber<H> {
    config: SubscriberConfig,
    handler: H,
    snapshot: Snapshot,
    status: watch::Sender<Status>,
    metrics: Arc<SubscriberMetrics>,
    /// Set after the first successful apply; before that even an empty update is
    /// handed to the handler.
    applied_once: bool,
    /// Keys whose latest upsert we rejected: the server counts them as applied, so
    /// a patch for one is rejected like its whole resource was, not taken as a sign
    /// that we diverged (which would cost a full snapshot per change of the key).
    rejected_keys: std::collections::HashSet<String>,
}

/// Why a stream ended.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("connect to {endpoint}: {source}")]
    Connect {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("invalid control-plane endpoint {endpoint:?}: {source}")]
    InvalidUri {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("invalid control-plane endpoint {endpoint:?}: {reason}")]
    Endpoint {
        endpoint: String,
        reason: &'static str,
    },
    #[error("read token {path}: {source}")]
    Token {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("token in {path} is not a valid header value")]
    TokenValue { path: std::path::PathBuf },
    #[error("stream: {0}")]
    Status(#[from] tonic::Status),
    #[error("server closed the stream")]
    Closed,
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("tls: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

// === impl Subscriber ===

impl<H: Handler> Subscriber<H> {
    pub fn new(config: SubscriberConfig, handler: H, metrics: Arc<SubscriberMetrics>) -> Self {
        let (status, _) = watch::channel(Status::default());
        Self {
            config,
            handler,
            snapshot: Snapshot::new(),
            status,
            metrics,
            applied_once: false,
            rejected_keys: Default::default(),
        }
    }

    /// Connection and apply state, for readiness probes.
    pub fn status(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }

    /// Runs until `shutdown` resolves: connect, stream, reconnect with backoff.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut backoff = self.config.backoff.clone();
        loop {
            let started = tokio::time::Instant::now();
            let result = tokio::select! {
                r = self.stream_once() => r,
                () = &mut shutdown => return,
            };
            self.status.send_modify(|s| s.connected = false);
            self.metrics.connected(false);
            let reason = match &result {
                Ok(()) => "closed",
                Err(StreamError::Connect { .. }) => "connect",
                Err(StreamError::Status(_)) => "status",
                Err(StreamError::Closed) => "closed",
                Err(StreamError::Protocol(_)) => "protocol",
                Err(
                    StreamError::Endpoint { .. }
                    | StreamError::InvalidUri { .. }
                    | StreamError::Token { .. }
                    | StreamError::TokenValue { .. },
                ) => "config",
                Err(StreamError::Tls(_)) => "tls",
            };
            self.metrics.disconnect(reason);
            // A stream that stayed up for a while resets the backoff.
            if started.elapsed() > Duration::from_secs(120) {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            match result {
                Ok(()) => info!(?delay, "stream closed; reconnecting"),
                Err(e) => warn!(error = %e, ?delay, "stream failed; reconnecting"),
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = &mut shutdown => return,
            }
        }
    }

    async fn connect(&self) -> Result<Channel, StreamError> {
        let endpoint = &self.config.endpoint;
        let mut ep =
            Endpoint::from_shared(endpoint.clone()).map_err(|source| StreamError::InvalidUri {
                endpoint: endpoint.clone(),
                source,
            })?;
        ep = ep
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        match (&self.config.tls, endpoint.starts_with("https://")) {
            (Some(tls), true) => {
                // Re-read the files on every connect: rotated certificates are picked up.
                if let Some(at) = crate::tls::load_certs(&tls.cert)
                    .ok()
                    .and_then(|c| c.first().and_then(|c| crate::tls::not_after(c.as_ref())))
                {
                    self.metrics.client_cert_expires(at);
                }
                ep = ep
                    .tls_config(tls.load()?)
                    .map_err(|e| StreamError::Connect {
                        endpoint: endpoint.clone(),
                        source: e,
                    })?;
            }
            (None, false) => {}
            (Some(_), false) => {
                return Err(StreamError::Endpoint {
                    endpoint: endpoint.clone(),
                    reason: "TLS is configured, so the endpoint must be https://",
                });
            }
            (None, true) => {
                return Err(StreamError::Endpoint {
                    endpoint: endpoint.clone(),
                    reason: "https:// needs --tls-ca (or use http:// with --insecure)",
                });
            }
        }
        ep.connect().await.map_err(|e| StreamError::Connect {
            endpoint: endpoint.clone(),
            source: e,
        })
    }

    async fn stream_once(&mut self) -> Result<(), StreamError> {
        let channel = self.connect().await?;
        let mut client = v1::mesh_client::MeshClient::new(channel)
            .max_decoding_message_size(self.config.max_message_bytes);
        let (tx, rx) = mpsc::channel::<v1::AgentMessage>(16);
        let digest = self.snapshot.digest();
        let hello = v1::Hello {
            node_name: self.config.node_name.clone(),
            role: match self.config.role {
                Role::Node => v1::Role::Node,
                Role::Dns => v1::Role::Dns,
            } as i32,
            agent_version: self.config.agent_version.clone(),
            epoch: self.snapshot.epoch(),
            applied_version: self.snapshot.version(),
            applied_digest: digest.sum,
            applied_count: digest.count,
            patch_schema: meshlite_proto::PATCH_SCHEMA,
        };
        send(&tx, v1::agent_message::Msg::Hello(hello)).await?;
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        if let Some(path) = &self.config.token_file {
            let token = std::fs::read_to_string(path).map_err(|source| StreamError::Token {
                path: path.clone(),
                source,
            })?;
            let value = format!("Bearer {}", token.trim())
                .parse()
                .map_err(|_| StreamError::TokenValue { path: path.clone() })?;
            request.metadata_mut().insert("authorization", value);
        }
        let response = client.stream(request).await?;
        let mut inbound = response.into_inner();
        self.status.send_modify(|s| {
            s.connected = true;
            s.last_contact = Some(SystemTime::now());
        });
        self.metrics.connected(true);
        info!(endpoint = %self.config.endpoint, node = %self.config.node_name, "subscribed");

        let mut pending: Option<Pending> = None;
        while let Some(msg) = inbound.next().await {
            let update = msg?;
            let received = SystemTime::now();
            self.status.send_modify(|s| s.last_contact = Some(received));
            self.metrics
                .bytes_received(prost::Message::encoded_len(&update));
            if update.inventory_request {
                self.send_inventory(&tx).await?;
                continue;
            }
            let p = pending.get_or_insert_with(|| Pending::new(&update, received));
            if p.nonce != update.nonce || p.version != update.version {
                return Err(StreamError::Protocol(format!(
                    "chunk of update {} (nonce {}) arrived while assembling {} (nonce {})",
                    update.version, update.nonce, p.version, p.nonce
                )));
            }
            let last = update.last_chunk;
            p.absorb(update);
            if last {
                let done = pending.take().expect("pending was just inserted above");
                let span = info_span!(
                    "apply",
                    version = done.version,
                    node = %self.config.node_name,
                    full = done.base_version == 0,
                    causes = done.causes.len(),
                    rules_changed = tracing::field::Empty,
                );
                // Linked, not parented: one update carries many changes' traces.
                for c in done.causes.iter().take(MAX_LINKS) {
                    crate::telemetry::link(&span, &c.traceparent);
                }
                let reply = self.apply(done).instrument(span).await;
                send(&tx, reply).await?;
            }
        }
        Err(StreamError::Closed)
    }

    async fn send_inventory(&self, tx: &mpsc::Sender<v1::AgentMessage>) -> Result<(), StreamError> {
        const CHUNK: usize = 20_000;
        let entries: Vec<v1::KeyHash> = self
            .snapshot
            .inventory()
            .map(|(key, hash)| v1::KeyHash {
                key: key.to_string(),
                hash,
            })
            .collect();
        debug!(keys = entries.len(), "sending inventory");
        let mut chunks = entries.chunks(CHUNK).peekable();
        if chunks.peek().is_none() {
            return send(
                tx,
                v1::agent_message::Msg::Inventory(v1::Inventory {
                    entries: vec![],
                    last_chunk: true,
                }),
            )
            .await;
        }
        while let Some(c) = chunks.next() {
            send(
                tx,
                v1::agent_message::Msg::Inventory(v1::Inventory {
                    entries: c.to_vec(),
                    last_chunk: chunks.peek().is_none(),
                }),
            )
            .await?;
        }
        Ok(())
    }

    /// Validates, applies and hands an assembled update to the handler; returns the
    /// ACK or NACK to send.
    async fn apply(&mut self, p: Pending) -> v1::agent_message::Msg {
        let started = tokio::time::Instant::now();
        // A NACK reports the version the agent holds after handling the update.
        let nack = |held: u64, error: String, rejected: Vec<String>, want_full: bool| {
            v1::agent_message::Msg::Nack(v1::Nack {
                nonce: p.nonce.clone(),
                version: held,
                error,
                rejected,
                want_full,
            })
        };
        let full = p.base_version == 0;
        if !full && p.base_version != self.snapshot.version() {
            self.metrics.nack("base_version");
            warn!(
                base = p.base_version,
                have = self.snapshot.version(),
                "delta for a version we do not hold; asking for a full snapshot"
            );
            return nack(
                self.snapshot.version(),
                format!(
                    "base version {} does not match applied version {}",
                    p.base_version,
                    self.snapshot.version()
                ),
                vec![],
                true,
            );
        }

        let mut upserts = Vec::with_capacity(p.upserts.len());
        let mut rejected = Vec::new();
        let mut rejected_keys = Vec::new();
        let mut accepted_keys = Vec::new();
        for r in &p.upserts {
            let converted = match &r.kind {
                Some(v1::resource::Kind::EndpointSlicePatch(patch)) => {
                    match patched(&self.snapshot, r, patch) {
                        Ok(res) => Ok(res),
                        Err(PatchFailure::Invalid(e)) => Err(e),
                        // We rejected this slice's last version, so we cannot hold
                        // the patch's base: reject it by key, as that version was.
                        Err(PatchFailure::Diverged(why)) if self.rejected_keys.contains(&r.key) => {
                            Err(format!("patch for a resource rejected earlier ({why})"))
                        }
                        Err(PatchFailure::Diverged(why)) => {
                            // We do not hold what the server thinks we do: only a
                            // full snapshot can bring us back in line.
                            self.metrics.nack("patch_base");
                            warn!(key = %r.key, %why, "patch does not fit what we hold; asking for a full snapshot");
                            return nack(
                                self.snapshot.version(),
                                format!("{}: {why}", r.key),
                                vec![],
                                true,
                            );
                        }
                    }
                }
                _ => Resource::try_from(r).map_err(|e| e.to_string()),
            };
            match converted {
                Ok(res) => {
                    upserts.push((r.hash, res));
                    accepted_keys.push(r.key.clone());
                }
                Err(e) => {
                    rejected.push(format!("{}: {e}", r.key));
                    rejected_keys.push(r.key.clone());
                }
            }
        }
        let mut removals = Vec::with_capacity(p.removals.len());
        for k in &p.removals {
            match k.parse::<ResourceKey>() {
                Ok(key) => removals.push(key),
                Err(e) => rejected.push(format!("{k}: {e}")),
            }
        }

        let mut changes = ChangeSet::default();
        let mut undo = Vec::new();
        let (old_epoch, old_version) = (self.snapshot.epoch(), self.snapshot.version());
        if full {
            // Rejected keys of a full snapshot are not recorded as known: they are
            // dropped, so a later inventory asks for them again.
            self.snapshot.replace_all(upserts, &mut changes, &mut undo);
        } else {
            self.snapshot
                .apply(upserts, removals, &mut changes, &mut undo);
        }
        self.snapshot.set_version(p.epoch, p.version);

        let info = UpdateInfo {
            epoch: p.epoch,
            version: p.version,
            full,
            sent: from_nanos(p.sent_unix_nanos),
            received: p.received,
            causes: p.causes.iter().map(cause_from_wire).collect(),
        };
        let result = if changes.is_empty() && self.applied_once {
            Ok(Applied::default())
        } else {
            self.handler.apply(&self.snapshot, &changes, &info).await
        };
        let elapsed = started.elapsed();
        match result {
            Err(e) => {
                self.snapshot.revert(undo);
                self.snapshot.set_version(old_epoch, old_version);
                self.metrics.nack("apply");
                warn!(version = p.version, error = %e, "apply failed; kept last good version");
                nack(old_version, e.0, rejected, false)
            }
            Ok(applied) => {
                tracing::Span::current().record("rules_changed", applied.rules_changed);
                let mut rejected = rejected;
                rejected.extend(applied.rejected);
                self.applied_once = true;
                if full {
                    self.rejected_keys.clear();
                }
                for k in accepted_keys.iter().chain(&p.removals) {
                    self.rejected_keys.remove(k);
                }
                self.rejected_keys.extend(rejected_keys);
                let now = SystemTime::now();
                self.status.send_modify(|s| {
                    s.applied_version = p.version;
                    s.epoch = p.epoch;
                    s.last_applied = Some(now);
                    s.synced = true;
                });
                self.metrics.applied(&info, elapsed, now);
                debug!(
                    version = p.version,
                    upserts = changes.upserted.len(),
                    removals = changes.removed.len(),
                    ?elapsed,
                    "applied"
                );
                if !rejected.is_empty() {
                    self.metrics.nack("rejected");
                    warn!(
                        version = p.version,
                        ?rejected,
                        "rejected resources; applied the rest"
                    );
                    return nack(
                        p.version,
                        "some resources were rejected".into(),
                        rejected,
                        false,
                    );
                }
                v1::agent_message::Msg::Ack(v1::Ack {
                    nonce: p.nonce,
                    version: p.version,
                    received_unix_nanos: to_nanos(p.received),
                    applied_unix_nanos: to_nanos(now),
                    apply_duration_micros: u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
                    rules_changed: applied.rules_changed,
                })
            }
        }
    }
}

/// Why an EndpointSlice patch was not applied.
enum PatchFailure {
    /// The patch carries bad input (its key, an endpoint): the key is rejected like
    /// any invalid resource.
    Invalid(String),
    /// The patch does not apply to what we hold (base hash, positions), or does not
    /// give what the server holds.
    Diverged(String),
}

/// The slice `patch` makes of the one held under `r.key`, checked against both
/// content hashes.
fn patched(
    snapshot: &Snapshot,
    r: &v1::Resource,
    patch: &v1::EndpointSlicePatch,
) -> Result<Resource, PatchFailure> {
    let key: ResourceKey = r
        .key
        .parse()
        .map_err(|e: meshlite_proto::model::InvalidKey| PatchFailure::Invalid(e.to_string()))?;
    let Some((held_hash, held)) = snapshot.slice(&key) else {
        return Err(PatchFailure::Diverged(
            "patch for a slice we do not hold".into(),
        ));
    };
    if held_hash != patch.base_hash {
        return Err(PatchFailure::Diverged(format!(
            "patch base {:016x}, we hold {held_hash:016x}",
            patch.base_hash
        )));
    }
    let slice = meshlite_proto::patch::apply(held, patch).map_err(|e| match e {
        // An endpoint that does not convert is bad input, like an invalid resource.
        PatchError::Convert(_) => PatchFailure::Invalid(e.to_string()),
        // Positions that do not fit a base whose hash matched: the two sides do not
        // read patches alike.
        _ => PatchFailure::Diverged(e.to_string()),
    })?;
    let resource = Resource::EndpointSlice(slice);
    let hash = meshlite_proto::content_hash(&(&resource).into());
    if hash != r.hash {
        return Err(PatchFailure::Diverged(format!(
            "patched slice hashes to {hash:016x}, the server announced {:016x}",
            r.hash
        )));
    }
    Ok(resource)
}

/// An update being assembled from chunks.
struct Pending {
    epoch: u64,
    version: u64,
    base_version: u64,
    nonce: String,
    upserts: Vec<v1::Resource>,
    removals: Vec<String>,
    causes: Vec<v1::ChangeCause>,
    sent_unix_nanos: i64,
    received: SystemTime,
}

impl Pending {
    fn new(u: &v1::Update, received: SystemTime) -> Self {
        Self {
            epoch: u.epoch,
            version: u.version,
            base_version: u.base_version,
            nonce: u.nonce.clone(),
            upserts: Vec::new(),
            removals: Vec::new(),
            causes: Vec::new(),
            sent_unix_nanos: u.sent_unix_nanos,
            received,
        }
    }

    fn absorb(&mut self, u: v1::Update) {
        self.upserts.extend(u.upserts);
        self.removals.extend(u.removals);
        self.causes.extend(u.causes);
    }
}

async fn send(
    tx: &mpsc::Sender<v1::AgentMessage>,
    msg: v1::agent_message::Msg,
) -> Result<(), StreamError> {
    tx.send(v1::AgentMessage { msg: Some(msg) })
        .await
        .map_err(|_| StreamError::Closed)
}

fn cause_from_wire(c: &v1::ChangeCause) -> Cause {
    Cause {
        key: c.key.clone(),
        trigger: from_nanos(c.trigger_unix_nanos),
        observed: from_nanos(c.observed_unix_nanos),
        published: from_nanos(c.published_unix_nanos),
        traceparent: (!c.traceparent.is_empty()).then(|| c.traceparent.clone()),
        removed: c.removed,
    }
}

/// Nanoseconds since the Unix epoch, saturating.
pub fn to_nanos(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The inverse of [`to_nanos`]; non-positive values map to the epoch.
pub fn from_nanos(n: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(u64::try_from(n).unwrap_or(0))
}
