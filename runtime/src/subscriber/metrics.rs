//! Subscriber metrics: stream health and the per-stage latency of every change, from
//! the API server's trigger time to "applied" on this agent.

use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::UpdateInfo;

/// kube-proxy's `network_programming_duration_seconds` buckets, exactly:
/// 0.25 s steps to 0.5 s, 1 s steps to 59 s, 5 s steps to 115 s, 30 s steps to 300 s.
pub fn network_programming_buckets() -> Vec<f64> {
    let mut b = vec![0.25, 0.5];
    b.extend((1..=59).map(f64::from));
    b.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
    b.extend((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
    b
}

fn stage_buckets() -> Vec<f64> {
    vec![
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ]
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Stage {
    stage: &'static str,
}

/// Metrics of one subscriber. Register once per process.
#[derive(Debug)]
pub struct SubscriberMetrics {
    network_programming: Histogram,
    stages: Family<Stage, Histogram>,
    disconnects: Family<Reason, Counter>,
    nacks: Family<Reason, Counter>,
    updates: Counter,
    bytes: Counter,
    applied_version: Gauge,
    last_applied: Gauge<f64, std::sync::atomic::AtomicU64>,
    connected: Gauge,
    client_cert_expiry: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl SubscriberMetrics {
    /// Registers the stream metrics under `meshlite_subscriber_` and the network
    /// programming histogram as `<programming_prefix>_network_programming_duration_seconds`
    /// (`kubeproxy` on the node agent, so kube-proxy dashboards keep working).
    pub fn register(registry: &mut Registry, programming_prefix: &str) -> Self {
        let m = Self {
            network_programming: Histogram::new(network_programming_buckets()),
            stages: Family::new_with_constructor(|| Histogram::new(stage_buckets())),
            disconnects: Family::default(),
            nacks: Family::default(),
            updates: Counter::default(),
            bytes: Counter::default(),
            applied_version: Gauge::default(),
            last_applied: Gauge::default(),
            connected: Gauge::default(),
            client_cert_expiry: Gauge::default(),
        };
        registry.sub_registry_with_prefix(programming_prefix).register(
            "network_programming_duration_seconds",
            "In-cluster network programming latency: from the change's trigger time to rules applied on this agent",
            m.network_programming.clone(),
        );
        let r = registry.sub_registry_with_prefix("meshlite_subscriber");
        r.register(
            "stage_duration_seconds",
            "Latency of each stage of a change: watch (trigger->control plane), queue (control plane), transit (sent->received), apply (received->applied)",
            m.stages.clone(),
        );
        r.register(
            "disconnects",
            "Streams ended, by reason",
            m.disconnects.clone(),
        );
        r.register("nacks", "Updates NACKed, by reason", m.nacks.clone());
        r.register(
            "updates_applied",
            "Updates applied and ACKed",
            m.updates.clone(),
        );
        r.register(
            "received_bytes",
            "Bytes of updates received",
            m.bytes.clone(),
        );
        r.register(
            "applied_version",
            "Version of the last applied update",
            m.applied_version.clone(),
        );
        registry.register(
            "meshlite_tls_client_certificate_expiry_timestamp_seconds",
            "Unix time at which the client certificate this agent presents expires (read at every connect)",
            m.client_cert_expiry.clone(),
        );
        let r = registry.sub_registry_with_prefix("meshlite_subscriber");
        r.register(
            "connected",
            "1 while the stream to the control plane is up; 0 while serving the last state (fail static)",
            m.connected.clone(),
        );
        r.register(
            "last_applied_timestamp_seconds",
            "Unix time of the last applied update",
            m.last_applied.clone(),
        );
        // Series at 0 before the first event, so dashboards' `rate()` reads 0
        // rather than "no data" (other reasons appear when they happen).
        let _ = m.disconnects.get_or_create(&Reason { reason: "closed" });
        let _ = m.nacks.get_or_create(&Reason { reason: "rejected" });
        m
    }

    pub(crate) fn client_cert_expires(&self, at: SystemTime) {
        if let Ok(d) = at.duration_since(SystemTime::UNIX_EPOCH) {
            self.client_cert_expiry.set(d.as_secs_f64());
        }
    }

    pub(crate) fn connected(&self, up: bool) {
        self.connected.set(i64::from(up));
    }

    pub(crate) fn disconnect(&self, reason: &'static str) {
        self.disconnects.get_or_create(&Reason { reason }).inc();
    }

    pub(crate) fn nack(&self, reason: &'static str) {
        self.nacks.get_or_create(&Reason { reason }).inc();
    }

    pub(crate) fn bytes_received(&self, n: usize) {
        self.bytes.inc_by(n as u64);
    }

    pub(crate) fn applied(&self, info: &UpdateInfo, apply: Duration, now: SystemTime) {
        self.updates.inc();
        self.applied_version
            .set(i64::try_from(info.version).unwrap_or(i64::MAX));
        if let Ok(d) = now.duration_since(SystemTime::UNIX_EPOCH) {
            self.last_applied.set(d.as_secs_f64());
        }
        let secs = |a: SystemTime, b: SystemTime| b.duration_since(a).ok().map(|d| d.as_secs_f64());
        self.stage("apply", Some(apply.as_secs_f64()));
        self.stage("transit", secs(info.sent, info.received));
        // The initial snapshot's trigger times are history, not latency (kube-proxy
        // also skips them); only deltas carry causes.
        for c in &info.causes {
            if let Some(s) = secs(c.trigger, now) {
                self.network_programming.observe(s);
            }
            self.stage("watch", secs(c.trigger, c.observed));
            self.stage("queue", secs(c.observed, info.sent));
        }
    }

    fn stage(&self, stage: &'static str, secs: Option<f64>) {
        if let Some(s) = secs {
            self.stages.get_or_create(&Stage { stage }).observe(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_match_kube_proxy() {
        let b = network_programming_buckets();
        assert_eq!(b.len(), 80);
        assert_eq!(&b[..4], &[0.25, 0.5, 1.0, 2.0]);
        assert_eq!(b[60], 59.0);
        assert_eq!(b[61], 60.0);
        assert_eq!(b[72], 115.0);
        assert_eq!(b[73], 120.0);
        assert_eq!(b[79], 300.0);
    }
}
