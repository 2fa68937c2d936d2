//! The sync loop: snapshot -> views -> backend, with kube-proxy's timing rules.
//!
//! - Every update from the subscriber is applied before [`NodeHandler::apply`]
//!   returns (so the ACK means "in the kernel"), no sooner than `min_sync_period`
//!   after the previous sync.
//! - A full resync every `sync_period`, and as soon as possible after a failed sync
//!   or when the backend's canary reports an external flush.
//! - Nothing touches the kernel before the first snapshot (fail static: a restarted
//!   agent keeps the rules it finds until it has something to replace them with),
//!   and a lost control plane leaves the last applied rules in place.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use meshlite_proto::model::{ResourceKey, ServiceName};
use meshlite_runtime::{ChangeSet, Snapshot};
use tokio::sync::Mutex;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::backend::{Backend, BackendError, Desired, SyncReport};
use crate::health::{HealthCheckServers, ProxyHealth};
use crate::metrics::ProxyMetrics;
use crate::proxy::{IpFamily, ProxyView};

/// Timing and identity of the sync loop.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    pub node_name: String,
    pub families: Vec<IpFamily>,
    pub sync_period: Duration,
    pub min_sync_period: Duration,
    pub canary_period: Duration,
    /// Rules need the Node's pod CIDRs (`--detect-local-mode NodeCIDR`): nothing is
    /// programmed before the Node has them, as kube-proxy waits for them at start;
    /// afterwards the last pod CIDRs seen are kept if the Node loses them.
    pub needs_pod_cidrs: bool,
}

/// Drives a backend. Shared by the handler and the background resync task.
pub struct Proxier<B> {
    cfg: SyncConfig,
    state: Mutex<State<B>>,
    health: ProxyHealth,
    metrics: Arc<ProxyMetrics>,
}

struct State<B> {
    backend: B,
    /// The last views applied successfully.
    views: Option<Vec<ProxyView>>,
    last_sync: Option<Instant>,
    last_full: Option<Instant>,
    force_full: bool,
    last_canary: Option<Instant>,
    hc: Option<HealthCheckServers>,
}

// === impl Proxier ===

impl<B: Backend> Proxier<B> {
    pub fn new(
        cfg: SyncConfig,
        backend: B,
        health: ProxyHealth,
        metrics: Arc<ProxyMetrics>,
        hc: Option<HealthCheckServers>,
    ) -> Arc<Self> {
        Arc::new(Self {
            cfg,
            state: Mutex::new(State {
                backend,
                views: None,
                last_sync: None,
                last_full: None,
                force_full: false,
                last_canary: None,
                hc,
            }),
            health,
            metrics,
        })
    }

    pub fn health(&self) -> &ProxyHealth {
        &self.health
    }

    /// Applies a snapshot; returns once the backend has applied it.
    pub async fn update(
        &self,
        snapshot: &Snapshot,
        changes: &ChangeSet,
    ) -> Result<SyncReport, BackendError> {
        self.health.queued();
        let (services, slices) = count_changes(changes);
        self.metrics.queued(services, slices);
        let mut st = self.state.lock().await;
        // Only the changed services are rebuilt, from the last applied views,
        // unless that base is not trustworthy (a failed sync, or no change list).
        let base = st
            .views
            .as_ref()
            .filter(|_| !st.force_full && !changes.is_empty());
        let mut views: Vec<ProxyView> = self
            .cfg
            .families
            .iter()
            .map(
                |f| match base.and_then(|old| old.iter().find(|v| v.family == *f)) {
                    Some(old) => old.rebuild(snapshot, changes),
                    None => ProxyView::build(snapshot, &self.cfg.node_name, *f),
                },
            )
            .collect();
        if self.cfg.needs_pod_cidrs && views.iter().all(|v| v.node_pod_cidrs.is_empty()) {
            let last = st
                .views
                .as_ref()
                .filter(|old| old.iter().any(|v| !v.node_pod_cidrs.is_empty()));
            let Some(last) = last else {
                let e = BackendError {
                    backend: "sync",
                    stage: "pod-cidrs",
                    message: format!(
                        "--detect-local-mode NodeCIDR: waiting for Node {} to have spec.podCIDRs; nothing is programmed until then",
                        self.cfg.node_name
                    ),
                };
                self.metrics.failed(e.backend, e.stage);
                warn!(error = %e, "not syncing");
                return Err(e);
            };
            for v in &mut views {
                if let Some(old) = last.iter().find(|o| o.family == v.family) {
                    v.node_pod_cidrs = old.node_pod_cidrs.clone();
                }
            }
        }
        if let Some(last) = st.last_sync {
            let wait = self.cfg.min_sync_period.saturating_sub(last.elapsed());
            if !wait.is_zero() {
                debug!(?wait, "min-sync-period");
                tokio::time::sleep(wait).await;
            }
        }
        let full = st.force_full
            || st
                .last_full
                .is_none_or(|t| t.elapsed() >= self.cfg.sync_period);
        self.sync_locked(&mut st, views, full).await
    }

    async fn sync_locked(
        &self,
        st: &mut State<B>,
        views: Vec<ProxyView>,
        full: bool,
    ) -> Result<SyncReport, BackendError> {
        let started = Instant::now();
        let result = st
            .backend
            .apply(Desired {
                views: &views,
                full,
            })
            .await;
        let now = Instant::now();
        st.last_sync = Some(now);
        match result {
            Ok(report) => {
                let took = started.elapsed();
                self.metrics.synced(&report, took);
                for r in &report.rejected {
                    warn!(family = %r.family, service = %r.service, reason = r.reason.as_str(), error = %r.message, "service rules rejected; it keeps its last good rules");
                }
                if report.full {
                    st.last_full = Some(now);
                    st.force_full = false;
                }
                debug!(
                    full = report.full,
                    rules = report.rules_written,
                    ?took,
                    "synced"
                );
                let (internal, external) = no_local_endpoints(&views);
                self.metrics.no_local_endpoints(internal, external);
                if let Some(hc) = st.hc.as_mut() {
                    hc.sync(&health_check_ports(&views)).await;
                }
                st.views = Some(views);
                self.health.updated();
                Ok(report)
            }
            Err(e) => {
                self.metrics.failed(e.backend, e.stage);
                st.force_full = true;
                warn!(error = %e, "sync failed; the kernel keeps its previous rules");
                Err(e)
            }
        }
    }

    /// One step of the background work: a pending or periodic full resync of the
    /// last good views, and the canary check. Returns whether it synced.
    pub async fn tick(&self) -> bool {
        let mut st = self.state.lock().await;
        let Some(views) = st.views.clone() else {
            // Nothing applied yet: never touch the kernel before the first snapshot.
            return false;
        };
        st.backend.housekeeping().await;
        let canary_due = st
            .last_canary
            .is_none_or(|t| t.elapsed() >= self.cfg.canary_period);
        if canary_due && !st.force_full {
            st.last_canary = Some(Instant::now());
            if !st.backend.check().await {
                self.metrics.canary_failed();
                st.force_full = true;
            }
        }
        let periodic = st
            .last_full
            .is_none_or(|t| t.elapsed() >= self.cfg.sync_period);
        let rate_ok = st
            .last_sync
            .is_none_or(|t| t.elapsed() >= self.cfg.min_sync_period);
        if (st.force_full || periodic) && rate_ok {
            info!(forced = st.force_full, "full resync");
            return self.sync_locked(&mut st, views, true).await.is_ok();
        }
        false
    }

    /// Runs [`Proxier::tick`] every `interval` until `shutdown` resolves.
    pub async fn run(self: Arc<Self>, interval: Duration, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => { self.tick().await; }
                () = &mut shutdown => return,
            }
        }
    }
}

fn count_changes(changes: &ChangeSet) -> (usize, usize) {
    let keys = changes.upserted.iter().chain(&changes.removed);
    let mut services = 0;
    let mut slices = 0;
    for k in keys {
        match k {
            ResourceKey::Service { .. } => services += 1,
            ResourceKey::EndpointSlice { .. } => slices += 1,
            ResourceKey::Node { .. } => {}
        }
    }
    (services, slices)
}

/// Services with a Local policy and no local endpoints (internal, external).
fn no_local_endpoints(views: &[ProxyView]) -> (usize, usize) {
    let mut internal = HashSet::new();
    let mut external = HashSet::new();
    for v in views {
        for p in v.ports.values() {
            if p.has_endpoints() && p.selection.local.is_empty() {
                if p.info.internal_policy_local {
                    internal.insert(&p.info.name);
                }
                if p.info.external_policy_local && p.info.externally_accessible() {
                    external.insert(&p.info.name);
                }
            }
        }
    }
    (internal.len(), external.len())
}

/// health check node port -> (service, number of distinct local endpoints).
pub fn health_check_ports(views: &[ProxyView]) -> HashMap<u16, (ServiceName, usize)> {
    let mut ips: HashMap<u16, (ServiceName, HashSet<std::net::IpAddr>)> = HashMap::new();
    for v in views {
        for p in v.ports.values() {
            let Some(port) = p.info.health_check_node_port else {
                continue;
            };
            let e = ips
                .entry(port)
                .or_insert_with(|| (p.info.name.service.clone(), HashSet::new()));
            e.1.extend(p.selection.local.iter().map(|ep| ep.ip));
        }
    }
    ips.into_iter()
        .map(|(port, (svc, set))| (port, (svc, set.len())))
        .collect()
}

pub use crate::handler::NodeHandler;

#[cfg(test)]
mod tests;
