//! The large-cluster scale harness: one control plane, thousands of
//! simulated agents, a generated cluster of thousands of services fed through the
//! API stand-in, and the figures a large-cluster operator asks for.
//!
//! ```text
//! Cluster (generated) --JSON--> ApiServer stand-in --list/watch--> meshlite-control-plane (process)
//!       ^ mutations at T0                                              | mTLS gRPC, 127.0.0.1
//!       |                                                              v
//!   harness  <---------- receive times, ACKed versions ---------- Fleet (N agent tasks)
//! ```
//!
//! The control plane is the real release binary in its own process, measured from
//! /proc (VmHWM, VmRSS, utime+stime) and its /metrics. Agents are tasks in this
//! process, one TCP+TLS connection each, decoding updates lightly (see
//! [`wire`]). Phases, each bounded in time:
//! 1. initial sync of every agent;
//! 2. single endpoint changes, one at a time, timed to the last agent;
//! 3. churn at each rate for a duration;
//! 4. churn with one agent that stops ACKing (control-plane memory attributable);
//! 5. a reconnect storm with unchanged state;
//! 6. the per-node-watch comparison at the API stand-in.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::time::Instant;

use crate::apiserver::ApiServer;
use crate::procs::{self, Process};

pub mod cluster;
pub mod connections;
pub mod fleet;
pub mod plot;
pub mod procstat;
pub mod report;
pub mod rollout;
pub mod track;
pub mod watchers;
pub mod wire;

use cluster::{Cluster, Mutation, Op};
use fleet::{Fleet, FleetConfig, KeyTable};
use procstat::{Metrics, ProcSample};
pub use report::{ChurnReport, Report, StagesReport, StormReport, StuckReport, WatchesReport};
use track::Tracker;

const BYTES_SENT: &str = "meshlite_control_plane_update_bytes_sent_total";
const UPDATES_SENT: &str = "meshlite_control_plane_updates_sent_total";
const REFUSED: &str = "meshlite_control_plane_streams_refused_total";

/// The phases, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Phase {
    /// Before the agents subscribe: an idle connection's cost per layer.
    Connections,
    Initial,
    Change,
    Churn,
    Stuck,
    Storm,
    Watches,
}

/// What a churn phase writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChurnPattern {
    /// 90 % single pod replacements chosen uniformly over all endpoints, 5 %
    /// service creations, 5 % deletions; a key is changed again only after its
    /// previous change reached every agent.
    #[default]
    Random,
    /// Deployments' rolling updates, biggest first: every pod transition
    /// (terminating, created not ready, ready, removed) is one slice write
    /// (see [`rollout`]).
    Rollout,
}

/// One scenario.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Simulated node agents (one Node object and one connection each).
    #[arg(long, default_value_t = 100)]
    pub agents: usize,
    /// Services in the generated cluster.
    #[arg(long, default_value_t = 1_000)]
    pub services: usize,
    /// Endpoints in all (1-250 per service, long-tailed, at most 100 per slice).
    #[arg(long, default_value_t = 10_000)]
    pub endpoints: usize,
    /// Churn rates in changes per second, comma separated; each runs for --duration.
    #[arg(long, value_delimiter = ',', default_value = "20")]
    pub churn: Vec<f64>,
    /// What the churn phases write: `random` pod replacements and service
    /// creations/deletions, or `rollout` (rolling updates, pod by pod).
    #[arg(long, value_enum, default_value_t = ChurnPattern::Random)]
    pub churn_pattern: ChurnPattern,
    /// How long each churn rate runs (`60`, `60s`, `2m`).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Single endpoint changes in the change and watches phases.
    #[arg(long, default_value_t = 100)]
    pub changes: usize,
    /// Phases to run (initial always runs: the others need synced agents;
    /// connections runs before it).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "connections,initial,change,churn,stuck,storm,watches"
    )]
    pub phases: Vec<Phase>,
    /// Churn rate of the stuck-agent phase (default: the highest --churn rate).
    #[arg(long)]
    pub stuck_rate: Option<f64>,
    /// Duration of the stuck-agent phase (default: --duration).
    #[arg(long, value_parser = parse_duration)]
    pub stuck_duration: Option<Duration>,
    /// The control plane's --max-full-syncs.
    #[arg(long, default_value_t = 64)]
    pub max_full_syncs: usize,
    /// Extra control-plane flags, e.g. `--cp-arg=--debounce=5ms` (repeatable).
    #[arg(long = "cp-arg", allow_hyphen_values = true)]
    pub cp_args: Vec<String>,
    /// Agent (and watcher) connections being set up at once.
    #[arg(long, default_value_t = 500)]
    pub connect_concurrency: usize,
    /// Longest wait for the initial sync of every agent.
    #[arg(long, default_value = "600s", value_parser = parse_duration)]
    pub initial_timeout: Duration,
    /// Longest wait for a change (or a storm) to reach every agent.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub converge_timeout: Duration,
    /// Seed of the generated cluster and churn.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Keep the control plane's log and files here (default: a temporary directory).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Print progress to stderr.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub progress: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(secs) if secs >= 0.0 && secs.is_finite() => Ok(Duration::from_secs_f64(secs)),
        _ => humantime::parse_duration(s).map_err(|e| e.to_string()),
    }
}

macro_rules! progress {
    ($run:expr, $($arg:tt)*) => {
        if $run.opts.progress {
            eprintln!("[scale {:>7.1}s] {}", $run.started.elapsed().as_secs_f64(), format!($($arg)*));
        }
    };
}

mod phases;

struct Run<'a> {
    opts: &'a Options,
    started: Instant,
    api: ApiServer,
    cluster: Cluster,
    rollout: rollout::Rollout,
    keys: Arc<KeyTable>,
    tracker: Arc<Tracker>,
    fleet: Option<Fleet>,
    cp: Process,
    cp_pid: Option<u32>,
    admin: std::net::SocketAddr,
    report: Report,
    list_bytes: ListBytes,
}

#[derive(Debug, Clone, Copy, Default)]
struct ListBytes {
    services: u64,
    slices: u64,
    nodes: u64,
}

/// Runs one scenario. Non-convergence is reported in [`Report::failures`] (and
/// `converged = false`), not as an error.
///
/// # Errors
/// The harness cannot run: invalid sizes, the control plane binary missing or not
/// starting, the stand-in not starting.
pub async fn run(opts: &Options) -> Result<Report> {
    let started = Instant::now();
    if opts.agents == 0 {
        bail!("--agents must be at least 1");
    }
    let nofile = raise_nofile();
    meshlite_runtime::tls::install_default_provider();
    let cluster = Cluster::generate(opts.services, opts.endpoints, opts.agents, opts.seed)?;
    // Bookmarks hourly: the meshlite watcher does not need them, and the watchers'
    // event counts then hold only object events.
    let api = ApiServer::start_with(Duration::from_secs(3600)).await?;
    let mut list_bytes = ListBytes::default();
    for obj in cluster.objects() {
        let n = serde_json::to_vec(&obj).map_or(0, |v| v.len() as u64);
        match obj["kind"].as_str() {
            Some("Service") => list_bytes.services += n,
            Some("EndpointSlice") => list_bytes.slices += n,
            _ => list_bytes.nodes += n,
        }
        api.apply(obj)?;
    }
    // Forget the load's history: the control plane lists what is there now.
    api.compact(false);

    let tmp = tempfile::tempdir()?;
    let dir = match &opts.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => tmp.path().to_path_buf(),
    };
    let pki = meshlite_runtime::testing::TestPki::new("meshlite-scale-ca");
    let server = pki.server();
    let client = pki.client("node-agent", &["node-agent"]);
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    let mut cp_flags = vec![
        "--source=kube".to_string(),
        "--node-identity=shared-certificate".to_string(),
        format!("--max-full-syncs={}", opts.max_full_syncs),
    ];
    cp_flags.extend(opts.cp_args.iter().cloned());
    let mut args = cp_flags.clone();
    args.extend([
        format!("--kubeconfig={}", kubeconfig.display()),
        "--listen=127.0.0.1:0".into(),
        "--admin-listen=127.0.0.1:0".into(),
        format!("--tls-cert={}", server.cert.display()),
        format!("--tls-key={}", server.key.display()),
        format!("--tls-ca={}", server.client_ca.display()),
    ]);
    let bin = procs::binary("meshlite-control-plane")?;
    let mut cp = Process::start_env(
        &dir,
        "control-plane",
        &bin,
        &args,
        &[],
        &[("RUST_LOG".into(), "info".into())],
    )?;
    let addrs = cp.addresses(Duration::from_secs(60))?;
    let (grpc, admin) = (
        *addrs.get("grpc").context("grpc address")?,
        *addrs.get("admin").context("admin address")?,
    );
    let cp_pid = cp.pid();
    let mut run = Run {
        opts,
        started,
        api,
        cluster,
        rollout: rollout::Rollout::default(),
        keys: Arc::new(KeyTable::default()),
        tracker: Arc::new(Tracker::new(opts.agents)),
        fleet: None,
        cp,
        cp_pid,
        admin,
        report: Report {
            agents: opts.agents,
            services: opts.services,
            endpoints: opts.endpoints,
            cp_flags,
            load_average_start: procstat::load_average(),
            ..Report::default()
        },
        list_bytes,
    };
    run.report.endpoint_slices = run.cluster.slice_count();
    progress!(
        run,
        "cluster: {} services, {} endpoints in {} slices, {} nodes; RLIMIT_NOFILE {nofile}; control plane pid {:?} on {grpc}",
        opts.services,
        run.cluster.endpoint_count(),
        run.report.endpoint_slices,
        opts.agents,
        cp_pid
    );
    run.wait_cp_ready().await?;

    if opts.phases.contains(&Phase::Connections) {
        let r = connections::measure(grpc, &client, opts.agents, cp_pid).await?;
        progress!(
            run,
            "connections: {} idle connections cost the control plane {:.1} KiB each with TCP open, {:.1} KiB with TLS, {:.1} KiB with TLS and HTTP/2 (RSS {:.0} MiB before, {:.0} after)",
            r.connections,
            r.tcp_kib,
            r.tls_kib,
            r.h2_kib,
            r.base_rss_mib,
            r.end_rss_mib
        );
        run.report.connections = Some(r);
    }
    let tls = client.load()?;
    run.phase_initial(FleetConfig {
        endpoint: format!("https://{grpc}"),
        tls,
        connect_concurrency: opts.connect_concurrency,
    })
    .await?;
    if run.report.converged_so_far() {
        if opts.phases.contains(&Phase::Change) {
            run.phase_change().await?;
        }
        if opts.phases.contains(&Phase::Churn) {
            for rate in opts.churn.clone() {
                let r = run.churn(rate, opts.duration, None).await?;
                run.report.churn.push(r);
            }
        }
        if opts.phases.contains(&Phase::Stuck) {
            run.phase_stuck().await?;
        }
        if opts.phases.contains(&Phase::Storm) {
            run.phase_storm().await?;
        }
        if opts.phases.contains(&Phase::Watches) {
            run.phase_watches().await?;
        }
    }

    let end = run.cp_sample();
    run.report.cp_peak_rss_mib = end.hwm_mib();
    run.report.cp_cpu_s = end.cpu_s;
    let me = procstat::sample(None).unwrap_or_default();
    run.report.harness_cpu_s = me.cpu_s;
    run.report.harness_peak_rss_mib = me.hwm_mib();
    if let Some(f) = run.fleet.take() {
        f.shutdown().await;
    }
    run.cp.stop(Duration::from_secs(10));
    run.report.wall_s = started.elapsed().as_secs_f64();
    run.report.load_average_end = procstat::load_average();
    run.report.converged = run.report.failures.is_empty();
    if !run.report.converged {
        progress!(run, "control plane log: {}", run.cp.log.display());
    }
    // Keep the temporary directory until the control plane is gone.
    drop(tmp);
    Ok(run.report)
}

impl Report {
    fn converged_so_far(&self) -> bool {
        self.failures.is_empty()
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the new soft limit.
fn raise_nofile() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0)
}

// === impl Run ===

impl Run<'_> {
    fn fleet(&self) -> Result<&Fleet> {
        self.fleet.as_ref().context("no fleet")
    }

    fn cp_sample(&self) -> ProcSample {
        procstat::sample(self.cp_pid).unwrap_or_default()
    }

    async fn metrics(&self) -> Metrics {
        procstat::metrics(self.admin).await.unwrap_or_default()
    }

    fn fail(&mut self, msg: String) {
        progress!(self, "FAILED: {msg}");
        self.report.failures.push(msg);
    }

    async fn wait_cp_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + self.opts.initial_timeout;
        loop {
            let admin = self.admin;
            let ok = tokio::task::spawn_blocking(move || procs::http_get(admin, "/readyz"))
                .await?
                .is_ok_and(|(c, _)| c == 200);
            if ok {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "the control plane did not sync within {:?}:\n{}",
                    self.opts.initial_timeout,
                    self.cp.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let s = self.cp_sample();
        self.report.api_watch_streams = self.api.stats.open_watches.load(Ordering::Relaxed);
        self.report.cp_rss_synced_mib = s.rss_mib();
        progress!(
            self,
            "control plane synced from the stand-in: RSS {:.0} MiB, CPU {:.1} s, {} watch streams",
            s.rss_mib(),
            s.cpu_s,
            self.report.api_watch_streams
        );
        Ok(())
    }
    /// Starts timing a mutation and writes it to the stand-in.
    fn issue(&mut self, m: &Mutation, expected: usize) -> Result<()> {
        let idx = self.keys.intern(&m.key);
        let trigger_ns = m
            .trigger
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
        self.tracker.start(idx, trigger_ns, m.kind, expected);
        for op in &m.ops {
            match op {
                Op::Apply(v) => {
                    self.api.apply(v.clone())?;
                }
                Op::Delete(coll, ns, name) => {
                    self.api.delete(*coll, ns, name);
                }
            }
        }
        Ok(())
    }

    /// Whether a key has a change in flight (owning, so the cluster can be borrowed).
    fn busy(&self) -> impl Fn(&str) -> bool + use<> {
        let (tracker, keys) = (self.tracker.clone(), self.keys.clone());
        move |k: &str| tracker.busy(keys.intern(k))
    }
}
