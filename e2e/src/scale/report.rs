//! The figures a run reports, printed as one JSON object.

use serde::Serialize;

/// The figures of one run (printed as one JSON object).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub agents: usize,
    pub services: usize,
    pub endpoints: usize,
    pub endpoint_slices: usize,
    /// Initial sync: from starting the agents until the last one ACKed its full snapshot.
    pub initial_sync_s: f64,
    /// Bytes of one full snapshot (update bytes sent in the initial sync / agents).
    pub full_snapshot_bytes: f64,
    /// Single endpoint changes: time from the API write to the last agent.
    pub change_p50_ms: f64,
    pub change_p99_ms: f64,
    pub change_max_ms: f64,
    /// The same changes, per (change, agent) arrival.
    pub change_agent_p50_ms: f64,
    pub change_agent_p99_ms: f64,
    /// Update bytes sent (the control plane's counter) per agent per change.
    pub bytes_per_agent_per_change: f64,
    /// Mean endpoints in the slices those changes touched.
    pub changed_slice_endpoints_mean: f64,
    /// Control-plane peak RSS (VmHWM) over the run, and after the initial sync.
    pub cp_peak_rss_mib: f64,
    pub cp_peak_rss_initial_mib: f64,
    pub cp_rss_after_initial_mib: f64,
    /// Control-plane CPU seconds over the run, and in the initial sync.
    pub cp_cpu_s: f64,
    pub cp_cpu_initial_s: f64,
    /// Watch streams meshlite holds open at the API stand-in.
    pub api_watch_streams: u64,
    /// This harness's own CPU seconds (agents, stand-in, watchers) and peak RSS.
    pub harness_cpu_s: f64,
    pub harness_peak_rss_mib: f64,
    pub harness_rss_after_initial_mib: f64,
    /// CPU other processes took during the initial sync (cores), and the 1-minute
    /// load average at the start and the end: the machine is shared.
    pub others_cpu_cores_initial: f64,
    pub load_average_start: f64,
    pub load_average_end: f64,
    /// Control-plane RSS once synced from the API, before any agent connected.
    pub cp_rss_synced_mib: f64,
    pub churn: Vec<ChurnReport>,
    pub stuck: Option<StuckReport>,
    pub storm: Option<StormReport>,
    /// `--phases connections`: an idle connection's cost, layer by layer.
    pub connections: Option<ConnectionsReport>,
    pub watches: Option<WatchesReport>,
    /// The control plane's flags (besides addresses and certificates).
    pub cp_flags: Vec<String>,
    pub wall_s: f64,
    pub converged: bool,
    pub failures: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ChurnReport {
    pub pattern: super::ChurnPattern,
    pub rate: f64,
    pub duration_s: f64,
    pub changes: usize,
    pub skipped: usize,
    pub endpoint_changes: usize,
    pub service_creates: usize,
    pub service_deletes: usize,
    /// Per change, time to the last agent.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Per (change, agent) arrival.
    pub agent_p50_ms: f64,
    pub agent_p99_ms: f64,
    pub bytes_per_agent_per_change: f64,
    /// Where the time to the last agent went.
    pub stages: StagesReport,
    /// Updates the control plane sent during the phase (all agents), and per
    /// agent per change (below 1: changes coalesced into fewer updates).
    pub updates_sent: f64,
    pub updates_per_agent_per_change: f64,
    pub cp_cpu_s: f64,
    /// CPU seconds per second (1.0 = one core).
    pub cp_cpu_cores: f64,
    pub cp_rss_start_mib: f64,
    pub cp_rss_end_mib: f64,
    pub cp_rss_max_mib: f64,
    pub harness_cpu_cores: f64,
    /// CPU taken meanwhile by other processes on the machine (other tenants).
    pub others_cpu_cores: f64,
    pub load_average_end: f64,
    pub not_converged: usize,
    /// With `--churn-pattern rollout`: the transitions written in this phase.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollout: Option<super::rollout::RolloutCounts>,
}

/// Control-plane RSS per idle connection, by layer (see `connections`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConnectionsReport {
    pub connections: usize,
    /// RSS before the first layer and after the last was closed.
    pub base_rss_mib: f64,
    pub end_rss_mib: f64,
    /// KiB per connection with TCP open (accepted, TLS not started).
    pub tcp_kib: f64,
    /// ... with TLS established, client certificate verified.
    pub tls_kib: f64,
    /// ... with TLS and an HTTP/2 connection, no stream.
    pub h2_kib: f64,
}

/// p50 / p99 of each stage of a change's way to its last agent, in milliseconds
/// (see `track::Stages`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct StagesReport {
    /// Changes split into all four stages (their last agent got the change's own write).
    pub split: u64,
    /// Changes whose last agent got them merged into a later write (pace and wire only).
    pub merged: u64,
    /// Changes whose last agent got them without a cause (no stages).
    pub uncaused: u64,
    pub watch_p50_ms: f64,
    pub watch_p99_ms: f64,
    pub publish_p50_ms: f64,
    pub publish_p99_ms: f64,
    pub pace_p50_ms: f64,
    pub pace_p99_ms: f64,
    pub wire_p50_ms: f64,
    pub wire_p99_ms: f64,
}

impl StagesReport {
    pub fn of(s: &super::track::Stages) -> Self {
        Self {
            split: s.watch.count(),
            merged: s.merged.load(std::sync::atomic::Ordering::Relaxed),
            uncaused: s.uncaused.load(std::sync::atomic::Ordering::Relaxed),
            watch_p50_ms: s.watch.quantile_ms(0.5),
            watch_p99_ms: s.watch.quantile_ms(0.99),
            publish_p50_ms: s.publish.quantile_ms(0.5),
            publish_p99_ms: s.publish.quantile_ms(0.99),
            pace_p50_ms: s.pace.quantile_ms(0.5),
            pace_p99_ms: s.pace.quantile_ms(0.99),
            wire_p50_ms: s.wire.quantile_ms(0.5),
            wire_p99_ms: s.wire.quantile_ms(0.99),
        }
    }
}

impl std::fmt::Display for StagesReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "stages p50/p99 ms: watch {:.0}/{:.0}, publish {:.0}/{:.0}, pace {:.0}/{:.0}, wire {:.0}/{:.0} ({} split, {} merged, {} without a cause)",
            self.watch_p50_ms,
            self.watch_p99_ms,
            self.publish_p50_ms,
            self.publish_p99_ms,
            self.pace_p50_ms,
            self.pace_p99_ms,
            self.wire_p50_ms,
            self.wire_p99_ms,
            self.split,
            self.merged,
            self.uncaused
        )
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct StuckReport {
    pub churn: ChurnReport,
    /// Control-plane RSS growth over the phase.
    pub cp_rss_growth_mib: f64,
    /// Growth of a churn phase at the same rate without a stuck agent, scaled to
    /// this phase's number of changes (None if no such phase ran).
    pub baseline_rss_growth_mib: Option<f64>,
    /// Growth attributable to the stuck agent: growth minus the baseline.
    pub attributable_rss_growth_mib: Option<f64>,
    /// After it ACKs again: time until it holds the newest version, the updates
    /// and bytes that took (one coalesced delta expected).
    pub catch_up_ms: f64,
    pub catch_up_updates: u64,
    pub catch_up_bytes: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct StormReport {
    /// From dropping every connection until every agent ACKed on its new stream.
    pub converge_s: f64,
    pub resume_bytes: f64,
    /// resume_bytes / (agents x full_snapshot_bytes).
    pub resume_fraction: f64,
    pub full_updates: f64,
    pub delta_updates: f64,
    pub unchanged_updates: f64,
    pub inventory_updates: f64,
    pub refused_streams: f64,
    pub cp_cpu_s: f64,
    pub cp_rss_end_mib: f64,
    /// Five seconds later, the old streams' memory returned.
    pub cp_rss_settled_mib: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct WatchesReport {
    pub changes: usize,
    /// meshlite: watch streams at the stand-in, and events it served for the changes.
    pub meshlite_watch_streams: u64,
    pub meshlite_events: u64,
    /// meshlite's update bytes to all agents for the same changes.
    pub meshlite_update_bytes: f64,
    /// Its one initial LIST (all services, slices, nodes), JSON bytes.
    pub meshlite_list_bytes: u64,
    /// The per-node shape: N nodes x 3 watches, events served for the same changes.
    pub per_node_nodes: usize,
    pub per_node_watch_streams: u64,
    pub per_node_events: u64,
    pub per_node_event_bytes: u64,
    /// Their initial LISTs (skipped here), computed: N x (services + slices + own node).
    pub per_node_list_bytes: u64,
    /// Per change, time until the last node watcher received the event (no processing).
    pub per_node_event_p50_ms: f64,
    pub per_node_event_p99_ms: f64,
    /// meshlite's per-change time to the last agent while the watchers ran.
    pub meshlite_change_p50_ms: f64,
    pub meshlite_change_p99_ms: f64,
    pub watcher_errors: u64,
}
