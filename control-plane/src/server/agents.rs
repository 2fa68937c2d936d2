//! The registry of connected agents, for `/agents` and `meshlite-control-plane status`:
//! which agents hold which version, how far behind, how long their last apply took.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::SystemTime;

use meshlite_proto::v1;
use meshlite_runtime::subscriber::to_nanos;
use serde::Serialize;

use crate::metrics::RoleLabel;

/// Every connected agent.
#[derive(Debug, Clone, Default)]
pub struct Agents {
    inner: Arc<Mutex<BTreeMap<u64, Weak<AgentInfo>>>>,
    next: Arc<AtomicU64>,
}

/// One agent stream.
#[derive(Debug)]
pub struct AgentInfo {
    id: u64,
    pub node_name: String,
    pub role: &'static str,
    pub agent_version: String,
    pub connected_unix_nanos: i64,
    version: AtomicU64,
    acks: AtomicU64,
    nacks: AtomicU64,
    last_apply_micros: AtomicU64,
    last_ack_unix_nanos: AtomicU64,
    registry: Agents,
}

/// A row of the agents table.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct AgentRow {
    pub node_name: String,
    pub role: String,
    pub agent_version: String,
    /// The store version the agent holds.
    pub version: u64,
    /// Versions behind the newest.
    pub lag: u64,
    pub acks: u64,
    pub nacks: u64,
    pub last_apply_micros: u64,
    pub last_ack_unix_nanos: u64,
    pub connected_unix_nanos: i64,
}

impl Agents {
    pub fn register(&self, hello: &v1::Hello, role: RoleLabel) -> Arc<AgentInfo> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let info = Arc::new(AgentInfo {
            id,
            node_name: hello.node_name.clone(),
            role: match role {
                RoleLabel::Node => "node",
                RoleLabel::Dns => "dns",
            },
            agent_version: hello.agent_version.clone(),
            connected_unix_nanos: to_nanos(SystemTime::now()),
            version: AtomicU64::new(0),
            acks: AtomicU64::new(0),
            nacks: AtomicU64::new(0),
            last_apply_micros: AtomicU64::new(0),
            last_ack_unix_nanos: AtomicU64::new(0),
            registry: self.clone(),
        });
        self.lock().insert(id, Arc::downgrade(&info));
        info
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Weak<AgentInfo>>> {
        // Only inserts and removes happen under this lock; a poisoned map is intact.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Snapshot of every connected agent, sorted by role then node name.
    pub fn rows(&self, newest: u64) -> Vec<AgentRow> {
        let mut rows: Vec<AgentRow> = self
            .lock()
            .values()
            .filter_map(Weak::upgrade)
            .map(|a| {
                let version = a.version.load(Ordering::Relaxed);
                AgentRow {
                    node_name: a.node_name.clone(),
                    role: a.role.to_string(),
                    agent_version: a.agent_version.clone(),
                    version,
                    lag: newest.saturating_sub(version),
                    acks: a.acks.load(Ordering::Relaxed),
                    nacks: a.nacks.load(Ordering::Relaxed),
                    last_apply_micros: a.last_apply_micros.load(Ordering::Relaxed),
                    last_ack_unix_nanos: a.last_ack_unix_nanos.load(Ordering::Relaxed),
                    connected_unix_nanos: a.connected_unix_nanos,
                }
            })
            .collect();
        rows.sort_by(|a, b| (&a.role, &a.node_name).cmp(&(&b.role, &b.node_name)));
        rows
    }

    /// Number of connected agents.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl AgentInfo {
    /// Unique per stream for the life of the process.
    pub fn id(&self) -> u64 {
        self.id
    }

    pub(crate) fn acked(&self, ack: &v1::Ack) {
        self.version.store(ack.version, Ordering::Relaxed);
        self.acks.fetch_add(1, Ordering::Relaxed);
        self.last_apply_micros
            .store(ack.apply_duration_micros, Ordering::Relaxed);
        self.last_ack_unix_nanos.store(
            u64::try_from(to_nanos(SystemTime::now())).unwrap_or(0),
            Ordering::Relaxed,
        );
    }

    pub(crate) fn nacked(&self, _nack: &v1::Nack) {
        self.nacks.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn set_version(&self, v: u64) {
        self.version.store(v, Ordering::Relaxed);
    }
}

impl Drop for AgentInfo {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}
