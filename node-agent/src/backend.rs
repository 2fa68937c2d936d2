//! The seam between the pure core and the kernel.
//!
//! A [`Backend`] turns the desired [`ProxyView`]s into kernel state. The sync loop
//! (`crate::sync`) only talks to this trait, so it is tested with the
//! [`RecordingBackend`] and no kernel; the iptables and IPVS backends implement
//! it for real.

use std::future::Future;
use std::sync::{Arc, Mutex};

use crate::proxy::{IpFamily, ProxyView, ServicePortName};

/// What a sync must achieve.
#[derive(Debug, Clone, Copy)]
pub struct Desired<'a> {
    /// One view per IP family the agent proxies.
    pub views: &'a [ProxyView],
    /// Rewrite everything (periodic resync, canary, first sync); otherwise the
    /// backend may write only what changed since its last successful apply.
    pub full: bool,
}

/// What a successful sync did, for metrics and the ACK.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// The backend rewrote everything (it may upgrade a partial request).
    pub full: bool,
    /// Rules (or real servers) written to the kernel by this sync.
    pub rules_written: u64,
    /// Total rules now programmed, per table as the backend names its tables
    /// (`filter` and `nat` for iptables), in a fixed order.
    pub tables: Vec<TableRules>,
    /// Stale conntrack entries deleted (UDP).
    pub conntrack_deleted: u64,
    /// Service ports whose new rules were not programmed (the others were): they
    /// keep their last good rules and are tried again on the next sync.
    pub rejected: Vec<Rejected>,
}

/// How many rules one table holds after a sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableRules {
    pub table: &'static str,
    pub rules: u64,
}

/// A service port whose new rules a sync could not program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub family: IpFamily,
    pub service: ServicePortName,
    pub reason: RejectReason,
    /// What refused them, for the NACK and the log.
    pub message: String,
}

/// Why a service port's rules were rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    /// `iptables-restore` refused them.
    Kernel,
    /// They broke the renderer's invariant (a jump to an undeclared chain) and were
    /// never sent to the kernel.
    Invariant,
}

// === impl TableRules ===

impl TableRules {
    /// The iptables backends' two tables.
    pub fn iptables(filter: u64, nat: u64) -> Vec<Self> {
        vec![
            Self {
                table: "filter",
                rules: filter,
            },
            Self {
                table: "nat",
                rules: nat,
            },
        ]
    }

    /// Adds `other`'s counts into `into`, table by table.
    pub fn add(into: &mut Vec<Self>, other: &[Self]) {
        for o in other {
            match into.iter_mut().find(|t| t.table == o.table) {
                Some(t) => t.rules += o.rules,
                None => into.push(*o),
            }
        }
    }
}

// === impl RejectReason ===

impl RejectReason {
    /// For metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kernel => "kernel",
            Self::Invariant => "invariant",
        }
    }
}

/// A failed sync. The kernel keeps what it had (restore is atomic per table).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{backend} {stage}: {message}")]
pub struct BackendError {
    pub backend: &'static str,
    /// `restore`, `save`, `jump-rules`, `conntrack`, ...
    pub stage: &'static str,
    pub message: String,
}

/// A kernel programming backend.
pub trait Backend: Send + 'static {
    /// Makes the kernel match `desired`. Returns only once the rules are in effect.
    fn apply(
        &mut self,
        desired: Desired<'_>,
    ) -> impl Future<Output = Result<SyncReport, BackendError>> + Send;

    /// Cheap check that what was applied is still there (the canary). `false`
    /// makes the caller schedule a full sync.
    fn check(&mut self) -> impl Future<Output = bool> + Send;

    /// Periodic work between syncs (the IPVS backend deletes drained real servers
    /// here). Called on every tick of the sync loop; the default does nothing.
    fn housekeeping(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// One call recorded by [`RecordingBackend`].
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    pub full: bool,
    pub views: Vec<ProxyView>,
}

/// A fake backend that records every apply; for tests of the sync loop.
#[derive(Debug, Clone, Default)]
pub struct RecordingBackend {
    pub calls: Arc<Mutex<Vec<Recorded>>>,
    /// Number of upcoming applies that fail.
    pub fail: Arc<Mutex<usize>>,
    /// What `check` answers.
    pub healthy: Arc<Mutex<bool>>,
    /// What every apply reports as rejected.
    pub rejected: Arc<Mutex<Vec<Rejected>>>,
}

// === impl RecordingBackend ===

impl RecordingBackend {
    pub fn new() -> Self {
        Self {
            healthy: Arc::new(Mutex::new(true)),
            ..Self::default()
        }
    }

    /// The recorded calls so far.
    pub fn calls(&self) -> Vec<Recorded> {
        lock(&self.calls).clone()
    }

    /// Makes the next `n` applies fail.
    pub fn fail_next(&self, n: usize) {
        *lock(&self.fail) = n;
    }

    /// Makes every apply report these service ports as rejected.
    pub fn reject(&self, rejected: Vec<Rejected>) {
        *lock(&self.rejected) = rejected;
    }

    /// Sets what `check` answers (false simulates an external flush).
    pub fn set_healthy(&self, healthy: bool) {
        *lock(&self.healthy) = healthy;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The fake holds no invariants a panic could break.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Backend for RecordingBackend {
    async fn apply(&mut self, desired: Desired<'_>) -> Result<SyncReport, BackendError> {
        {
            let mut fail = lock(&self.fail);
            if *fail > 0 {
                *fail -= 1;
                return Err(BackendError {
                    backend: "fake",
                    stage: "restore",
                    message: "injected failure".into(),
                });
            }
        }
        let rules: u64 = desired.views.iter().map(|v| v.ports.len() as u64).sum();
        lock(&self.calls).push(Recorded {
            full: desired.full,
            views: desired.views.to_vec(),
        });
        *lock(&self.healthy) = true;
        Ok(SyncReport {
            full: desired.full,
            rules_written: rules,
            tables: TableRules::iptables(0, rules),
            conntrack_deleted: 0,
            rejected: lock(&self.rejected).clone(),
        })
    }

    async fn check(&mut self) -> bool {
        *lock(&self.healthy)
    }
}
