//! The node agent's metrics, named as kube-proxy names them (`kubeproxy_` prefix)
//! so existing dashboards and alerts keep working, plus a few `meshlite_node_agent_`
//! extras. The network programming histogram is registered by the subscriber
//! (`SubscriberMetrics::register(registry, "kubeproxy")`).

use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::backend::SyncReport;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Table {
    table: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Stage {
    stage: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Policy {
    traffic_policy: &'static str,
}

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// Sync metrics.
#[derive(Debug)]
pub struct ProxyMetrics {
    sync: Histogram,
    sync_full: Histogram,
    sync_partial: Histogram,
    last_sync: FloatGauge,
    last_queued: FloatGauge,
    restore_failures: Counter,
    nftables_failures: Counter,
    rules_total: Family<Table, Gauge>,
    rules_last: Family<Table, Gauge>,
    endpoint_changes: Counter,
    service_changes: Counter,
    no_local_endpoints: Family<Policy, Gauge>,
    sync_errors: Family<Stage, Counter>,
    conntrack_deleted: Counter,
    canary_failures: Counter,
    rejected_now: Gauge,
    rejections: Family<Reason, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

/// kube-proxy's sync duration buckets: 1 ms doubling, 15 buckets.
fn sync_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.001, 2.0, 15)
}

// === impl ProxyMetrics ===

impl ProxyMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            sync: Histogram::new(sync_buckets()),
            sync_full: Histogram::new(sync_buckets()),
            sync_partial: Histogram::new(sync_buckets()),
            last_sync: FloatGauge::default(),
            last_queued: FloatGauge::default(),
            restore_failures: Counter::default(),
            nftables_failures: Counter::default(),
            rules_total: Family::default(),
            rules_last: Family::default(),
            endpoint_changes: Counter::default(),
            service_changes: Counter::default(),
            no_local_endpoints: Family::default(),
            sync_errors: Family::default(),
            conntrack_deleted: Counter::default(),
            canary_failures: Counter::default(),
            rejected_now: Gauge::default(),
            rejections: Family::default(),
        };
        let kp = registry.sub_registry_with_prefix("kubeproxy");
        kp.register(
            "sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            m.sync.clone(),
        );
        kp.register(
            "sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            m.sync_full.clone(),
        );
        kp.register(
            "sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            m.sync_partial.clone(),
        );
        kp.register(
            "sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            m.last_sync.clone(),
        );
        kp.register(
            "sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            m.last_queued.clone(),
        );
        kp.register(
            "sync_proxy_rules_iptables_restore_failures",
            "Cumulative proxy iptables restore failures",
            m.restore_failures.clone(),
        );
        kp.register(
            "sync_proxy_rules_nftables_sync_failures",
            "Cumulative proxy nftables sync failures",
            m.nftables_failures.clone(),
        );
        kp.register(
            "sync_proxy_rules_iptables_total",
            "Total number of iptables rules owned by the proxy",
            m.rules_total.clone(),
        );
        kp.register(
            "sync_proxy_rules_iptables_last",
            "Number of iptables rules written by the proxy in the last sync",
            m.rules_last.clone(),
        );
        kp.register(
            "sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules EndpointSlice changes",
            m.endpoint_changes.clone(),
        );
        kp.register(
            "sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            m.service_changes.clone(),
        );
        kp.register(
            "sync_proxy_rules_no_local_endpoints",
            "Number of services with a Local traffic policy and no endpoints",
            m.no_local_endpoints.clone(),
        );
        let own = registry.sub_registry_with_prefix("meshlite_node_agent");
        own.register(
            "sync_errors",
            "Failed syncs, by stage",
            m.sync_errors.clone(),
        );
        own.register(
            "conntrack_entries_deleted",
            "Stale UDP conntrack entries deleted",
            m.conntrack_deleted.clone(),
        );
        own.register(
            "canary_failures",
            "Times the canary found the rules flushed externally",
            m.canary_failures.clone(),
        );
        own.register(
            "rejected_service_ports",
            "Service ports (per IP family) whose new rules the last sync could not program; they keep their last good rules",
            m.rejected_now.clone(),
        );
        own.register(
            "service_port_rejections",
            "Times a sync could not program a service port's rules, by reason (kernel: iptables-restore refused them; invariant: a jump to an undeclared chain)",
            m.rejections.clone(),
        );
        // A series at 0 before the first failure, so `rate()` over it reads 0, not
        // "no data" (the most common failure stage; others appear when they happen).
        let _ = m.sync_errors.get_or_create(&Stage { stage: "restore" });
        m
    }

    pub fn queued(&self, services: usize, endpoint_slices: usize) {
        self.last_queued.set(unix_now());
        self.service_changes.inc_by(services as u64);
        self.endpoint_changes.inc_by(endpoint_slices as u64);
    }

    pub fn synced(&self, report: &SyncReport, took: Duration) {
        let s = took.as_secs_f64();
        self.sync.observe(s);
        if report.full {
            self.sync_full.observe(s);
        } else {
            self.sync_partial.observe(s);
        }
        self.last_sync.set(unix_now());
        for t in &report.tables {
            self.rules_total
                .get_or_create(&Table { table: t.table })
                .set(i64::try_from(t.rules).unwrap_or(i64::MAX));
        }
        self.rules_last
            .get_or_create(&Table { table: "all" })
            .set(i64::try_from(report.rules_written).unwrap_or(i64::MAX));
        self.conntrack_deleted.inc_by(report.conntrack_deleted);
        self.rejected_now
            .set(i64::try_from(report.rejected.len()).unwrap_or(i64::MAX));
        for r in &report.rejected {
            self.rejections
                .get_or_create(&Reason {
                    reason: r.reason.as_str(),
                })
                .inc();
        }
    }

    /// A failed sync: `backend` is the backend's name (`iptables`, `ipvs`,
    /// `nftables`, or `sync` before any backend ran).
    pub fn failed(&self, backend: &'static str, stage: &'static str) {
        if stage == "restore" {
            self.restore_failures.inc();
        }
        if backend == "nftables" {
            self.nftables_failures.inc();
        }
        self.sync_errors.get_or_create(&Stage { stage }).inc();
    }

    pub fn canary_failed(&self) {
        self.canary_failures.inc();
    }

    pub fn no_local_endpoints(&self, internal: usize, external: usize) {
        self.no_local_endpoints
            .get_or_create(&Policy {
                traffic_policy: "internal",
            })
            .set(i64::try_from(internal).unwrap_or(i64::MAX));
        self.no_local_endpoints
            .get_or_create(&Policy {
                traffic_policy: "external",
            })
            .set(i64::try_from(external).unwrap_or(i64::MAX));
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;

    use super::*;

    #[test]
    fn failures_count_under_kube_proxys_names_per_backend() {
        let mut registry = Registry::default();
        let m = ProxyMetrics::register(&mut registry);
        m.failed("nftables", "transaction");
        m.failed("iptables", "restore");
        m.failed("sync", "pod-cidrs");
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("kubeproxy_sync_proxy_rules_nftables_sync_failures_total 1\n"),
            "{text}"
        );
        assert!(
            text.contains("kubeproxy_sync_proxy_rules_iptables_restore_failures_total 1\n"),
            "{text}"
        );
    }
}
