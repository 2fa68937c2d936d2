//! Control-plane metrics (`meshlite_control_plane_*`): ingest, store, and the
//! stream fan-out.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use std::sync::Arc;
use std::time::Duration;

use crate::server::convergence::Convergence;
use crate::store::Kind;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum KindLabel {
    Service,
    EndpointSlice,
    Node,
}

impl From<Kind> for KindLabel {
    fn from(k: Kind) -> Self {
        match k {
            Kind::Service => KindLabel::Service,
            Kind::EndpointSlice => KindLabel::EndpointSlice,
            Kind::Node => KindLabel::Node,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: KindLabel,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum EventType {
    Apply,
    Delete,
    Relist,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub kind: KindLabel,
    pub event: EventType,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WatchErrorLabels {
    pub kind: KindLabel,
    pub class: crate::source::kube::retry::Class,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum RoleLabel {
    Node,
    Dns,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabels {
    pub role: RoleLabel,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum UpdateKind {
    /// Replaces everything the agent has.
    Full,
    /// Changes since the agent's acked version.
    Delta,
    /// Differences from the agent's inventory (resume after a restart).
    Inventory,
    /// Resume with nothing to send (same digest or same version).
    Unchanged,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpdateLabels {
    pub kind: UpdateKind,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

/// Every control-plane metric. Cheap to clone (all handles are shared).
#[derive(Debug, Clone)]
pub struct Metrics {
    pub api_events: Family<EventLabels, Counter>,
    pub watch_errors: Family<WatchErrorLabels, Counter>,
    pub invalid_objects: Family<KindLabels, Counter>,
    pub normalization_warnings: Family<KindLabels, Counter>,
    pub manifest_errors: Counter,
    pub resources: Family<KindLabels, Gauge>,
    pub tombstones: Gauge,
    pub version: Gauge,
    pub subscribers: Family<RoleLabels, Gauge>,
    pub updates_sent: Family<UpdateLabels, Counter>,
    pub update_bytes_sent: Counter,
    pub patches_sent: Counter,
    pub acks: Counter,
    pub nacks: Counter,
    pub ack_latency: Histogram,
    pub streams_ended: Family<ReasonLabels, Counter>,
    pub streams_refused: Family<ReasonLabels, Counter>,
    pub tls_handshake_failures: Counter,
    pub convergence: Arc<Convergence>,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            api_events: Family::default(),
            watch_errors: Family::default(),
            invalid_objects: Family::default(),
            normalization_warnings: Family::default(),
            manifest_errors: Counter::default(),
            resources: Family::default(),
            tombstones: Gauge::default(),
            version: Gauge::default(),
            subscribers: Family::default(),
            updates_sent: Family::default(),
            update_bytes_sent: Counter::default(),
            patches_sent: Counter::default(),
            acks: Counter::default(),
            nacks: Counter::default(),
            ack_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            streams_ended: Family::default(),
            streams_refused: Family::default(),
            tls_handshake_failures: Counter::default(),
            convergence: Arc::new(Convergence::register(registry, Duration::from_secs(600))),
        };
        let r = registry.sub_registry_with_prefix("meshlite_control_plane");
        r.register(
            "api_events",
            "Watch events and re-lists received, by kind",
            m.api_events.clone(),
        );
        r.register(
            "watch_errors",
            "Watch and list errors, by kind and by what they called for (Gone: re-listed at once; ApiError, Unreachable: retried after a backoff)",
            m.watch_errors.clone(),
        );
        r.register(
            "invalid_objects",
            "API objects rejected by normalization (last good state kept), by kind",
            m.invalid_objects.clone(),
        );
        r.register(
            "normalization_warnings",
            "Invalid parts of API objects dropped (the rest used), by kind",
            m.normalization_warnings.clone(),
        );
        r.register(
            "manifest_errors",
            "Manifest files that could not be read or parsed (file source)",
            m.manifest_errors.clone(),
        );
        r.register(
            "resources",
            "Resources in the store, by kind",
            m.resources.clone(),
        );
        r.register(
            "tombstones",
            "Tombstones held for deltas",
            m.tombstones.clone(),
        );
        r.register("version", "Newest store version", m.version.clone());
        r.register(
            "subscribers",
            "Connected agents, by role",
            m.subscribers.clone(),
        );
        r.register(
            "updates_sent",
            "Updates sent to agents, by kind",
            m.updates_sent.clone(),
        );
        r.register(
            "update_bytes_sent",
            "Bytes of updates sent to agents",
            m.update_bytes_sent.clone(),
        );
        r.register(
            "endpoint_slice_patches_sent",
            "EndpointSlices sent to agents as patches from the version they hold instead of whole",
            m.patches_sent.clone(),
        );
        r.register("acks", "ACKs received", m.acks.clone());
        r.register("nacks", "NACKs received", m.nacks.clone());
        r.register(
            "ack_latency_seconds",
            "From sending an update to receiving its ACK",
            m.ack_latency.clone(),
        );
        r.register(
            "streams_ended",
            "Agent streams ended, by reason",
            m.streams_ended.clone(),
        );
        r.register(
            "streams_refused",
            "Agent streams refused, by reason",
            m.streams_refused.clone(),
        );
        r.register(
            "tls_handshake_failures",
            "TLS handshakes that failed (e.g. no or untrusted client certificate)",
            m.tls_handshake_failures.clone(),
        );
        // Series at 0 before the first event, so dashboards' `rate()` reads 0
        // rather than "no data" (other reasons appear when they happen).
        for reason in ["agent_closed", "send_timeout"] {
            let _ = m.streams_ended.get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            });
        }
        let _ = m.streams_refused.get_or_create(&ReasonLabels {
            reason: "unauthorized".to_string(),
        });
        m
    }

    pub fn ended(&self, reason: &str) {
        self.streams_ended
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn refused(&self, reason: &str) {
        self.streams_refused
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }
}
