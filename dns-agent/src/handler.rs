//! The subscriber handler: builds the next zone from each update, swaps it in and
//! only then returns, so the ACK the control plane receives means "answers changed".

use std::sync::Arc;
use std::time::Instant;

use meshlite_runtime::admin::BlockReady;
use meshlite_runtime::{Applied, ApplyError, ChangeSet, Handler, Snapshot, UpdateInfo};
use tracing::{debug, info};

use crate::metrics::{Metrics, ServiceKind};
use crate::zone::{Zone, ZoneCell};

/// Swaps zones on every update. Readiness is held down until the first swap.
#[derive(Debug)]
pub struct ZoneUpdater {
    cell: Arc<ZoneCell>,
    metrics: Arc<Metrics>,
    not_ready: Option<BlockReady>,
}

// === impl ZoneUpdater ===

impl ZoneUpdater {
    /// `not_ready` is released after the first zone is in place.
    pub fn new(cell: Arc<ZoneCell>, metrics: Arc<Metrics>, not_ready: Option<BlockReady>) -> Self {
        Self {
            cell,
            metrics,
            not_ready,
        }
    }

    /// Builds and swaps in the zone for this update; returns records changed.
    pub fn apply_now(&mut self, snapshot: &Snapshot, changes: &ChangeSet) -> u64 {
        let started = Instant::now();
        let span = tracing::info_span!(
            "zone-swap",
            full = changes.full,
            services = changes.services.len(),
            records = tracing::field::Empty
        );
        let _enter = span.enter();
        let current = self.cell.load();
        // The first update rebuilds from scratch whatever it says: a resumed agent
        // starts with an empty zone but a non-empty snapshot.
        let next = if self.not_ready.is_some() || changes.full {
            Zone::build(current.config().clone(), snapshot)
        } else {
            current.update(snapshot, changes)
        };
        let changed = next.record_count().abs_diff(current.record_count());
        let (records, services, serial) =
            (next.record_count(), next.service_count(), next.serial());
        self.cell.store(Arc::new(next));
        span.record("records", records);
        let took = started.elapsed();
        self.metrics.zone_applied(records, services, serial, took);
        if let Some(guard) = self.not_ready.take() {
            info!(
                records,
                services,
                serial,
                ?took,
                "first zone applied; ready"
            );
            guard.release();
        } else {
            debug!(
                records,
                services,
                serial,
                ?took,
                services_changed = changes.services.len(),
                "zone swapped"
            );
        }
        // Services touched is the honest "rules changed" count when record totals
        // stay equal (an address moved).
        u64::try_from(changed.max(changes.services.len())).unwrap_or(u64::MAX)
    }
}

impl ZoneUpdater {
    /// CoreDNS's DNS programming latency: from an EndpointSlice change's trigger time
    /// to its answers being served, for headless services (the only ones whose
    /// answers follow endpoints; CoreDNS measures the same). The first snapshot's
    /// trigger times are history and are skipped.
    fn programmed(&self, snapshot: &Snapshot, info: &UpdateInfo, now: std::time::SystemTime) {
        for cause in info.causes.iter().filter(|c| !c.removed) {
            let Ok(key) = cause.key.parse::<meshlite_proto::model::ResourceKey>() else {
                continue;
            };
            let Some((_, slice)) = snapshot.slice(&key) else {
                continue;
            };
            let service =
                meshlite_proto::model::ServiceName::new(&slice.namespace, &slice.service_name);
            let Some(svc) = snapshot.service(&service) else {
                continue;
            };
            if !svc.headless {
                continue;
            }
            if let Ok(d) = now.duration_since(cause.trigger) {
                // The snapshot does not carry the selector; a slice of a headless
                // service counts as one with a selector (the common case).
                self.metrics
                    .programmed(ServiceKind::headless_with_selector, d.as_secs_f64());
            }
        }
    }
}

impl Handler for ZoneUpdater {
    async fn apply(
        &mut self,
        snapshot: &Snapshot,
        changes: &ChangeSet,
        info: &UpdateInfo,
    ) -> Result<Applied, ApplyError> {
        // Zone building is pure and cannot fail: every resource reaching here was
        // validated when it was decoded.
        let first = self.not_ready.is_some();
        let rules_changed = self.apply_now(snapshot, changes);
        if !first {
            self.programmed(snapshot, info, std::time::SystemTime::now());
        }
        Ok(Applied {
            rules_changed,
            ..Applied::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use meshlite_runtime::admin::Readiness;

    use super::*;
    use crate::fixtures;
    use crate::zone::{PodRecords, ZoneConfig};

    #[tokio::test]
    async fn swaps_then_turns_ready() {
        let config = ZoneConfig {
            domain: "cluster.local".into(),
            ttl: 30,
            pod_records: PodRecords::Disabled,
            reverse_cidrs: vec![],
        };
        let cell = Arc::new(ZoneCell::new(Zone::empty(config)));
        let readiness = Readiness::new();
        let mut updater = ZoneUpdater::new(
            cell.clone(),
            Arc::new(Metrics::unregistered()),
            Some(readiness.block("zone")),
        );
        assert!(!readiness.is_ready());
        let snap = fixtures::seed();
        // A resumed agent's first update may say "nothing changed": it still builds.
        let changed = updater.apply_now(&snap, &ChangeSet::default());
        assert!(changed > 0);
        assert!(readiness.is_ready());
        assert_eq!(cell.load().service_count(), 2);
        // Later deltas are incremental.
        let mut snap2 = snap.clone();
        snap2.remove(&meshlite_proto::model::ResourceKey::service(
            "default",
            "headless-service",
        ));
        let ch = ChangeSet {
            services: [meshlite_proto::model::ServiceName::new(
                "default",
                "headless-service",
            )]
            .into(),
            ..ChangeSet::default()
        };
        updater.apply_now(&snap2, &ch);
        assert_eq!(cell.load().service_count(), 1);
    }
}
