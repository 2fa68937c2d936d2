//! The phases of a run, each bounded in time; see the module docs of [`super`].

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Result, bail};
use tokio::time::Instant;

use super::cluster::{self, MutationKind};
use super::fleet::{Fleet, FleetConfig};
use super::track::{Timeline, quantile};
use super::{
    BYTES_SENT, ChurnPattern, ChurnReport, REFUSED, Run, StagesReport, StormReport, StuckReport,
    UPDATES_SENT, WatchesReport, procstat, watchers,
};

impl Run<'_> {
    pub(super) async fn phase_initial(&mut self, config: FleetConfig) -> Result<()> {
        let n = self.opts.agents;
        let m0 = self.metrics().await;
        let s0 = self.cp_sample();
        let me0 = procstat::sample(None).unwrap_or_default();
        let busy0 = procstat::machine_busy_s();
        progress!(self, "initial sync: starting {n} agents");
        let fleet = Fleet::start(
            config,
            (0..n).map(cluster::node_name).collect(),
            self.keys.clone(),
            self.tracker.clone(),
        );
        let t0 = fleet.now_us();
        self.fleet = Some(fleet);
        let deadline = Instant::now() + self.opts.initial_timeout;
        let mut next_note = Instant::now();
        loop {
            let f = self.fleet()?;
            let synced = f
                .agents
                .iter()
                .filter(|a| a.acks_this_stream.load(Ordering::Relaxed) > 0)
                .count();
            if synced == n {
                break;
            }
            if Instant::now() > deadline {
                let errs = f.errors();
                self.fail(format!(
                    "initial sync: only {synced} of {n} agents synced within {:?}; errors: {errs:?}",
                    self.opts.initial_timeout
                ));
                return Ok(());
            }
            if Instant::now() >= next_note {
                let s = self.cp_sample();
                progress!(
                    self,
                    "initial sync: {synced}/{n} agents, {} connected, CP RSS {:.0} MiB",
                    f.agents
                        .iter()
                        .filter(|a| a.connected.load(Ordering::Relaxed))
                        .count(),
                    s.rss_mib()
                );
                next_note = Instant::now() + Duration::from_secs(5);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let f = self.fleet()?;
        let last = f
            .agents
            .iter()
            .map(|a| a.first_ack_us.load(Ordering::Relaxed))
            .max()
            .unwrap_or(t0);
        self.report.initial_sync_s = last.saturating_sub(t0) as f64 / 1e6;
        let m1 = self.metrics().await;
        let s1 = self.cp_sample();
        self.report.full_snapshot_bytes = (m1.sum(BYTES_SENT) - m0.sum(BYTES_SENT)) / n as f64;
        self.report.cp_peak_rss_initial_mib = s1.hwm_mib();
        self.report.cp_rss_after_initial_mib = s1.rss_mib();
        self.report.cp_cpu_initial_s = s1.cpu_s - s0.cpu_s;
        let me1 = procstat::sample(None).unwrap_or_default();
        self.report.harness_rss_after_initial_mib = me1.rss_mib();
        self.report.others_cpu_cores_initial = ((procstat::machine_busy_s() - busy0)
            - (s1.cpu_s - s0.cpu_s)
            - (me1.cpu_s - me0.cpu_s))
            .max(0.0)
            / self.report.initial_sync_s.max(1e-3);
        progress!(
            self,
            "initial sync: {n} agents in {:.1} s, {:.1} MB per full snapshot, CP peak RSS {:.0} MiB, CPU {:.1} s",
            self.report.initial_sync_s,
            self.report.full_snapshot_bytes / 1e6,
            s1.hwm_mib(),
            self.report.cp_cpu_initial_s
        );
        Ok(())
    }

    /// Makes `count` single endpoint changes one at a time; returns each change's
    /// time to the last agent (None on a timeout) and the mean changed-slice size.
    /// `also` is polled after each change until it holds (or the timeout).
    async fn single_changes(
        &mut self,
        count: usize,
        mut also: impl FnMut() -> bool,
        mut also_done: impl FnMut(f64),
    ) -> Result<Option<(Vec<f64>, f64)>> {
        let n = self.opts.agents;
        let mut times = Vec::with_capacity(count);
        let mut slice_eps = 0usize;
        self.tracker.take_done();
        for i in 0..count {
            let busy = self.busy();
            let m = self.cluster.replace_endpoint(&busy);
            let Some(m) = m else {
                bail!("no endpoint to change");
            };
            slice_eps += m.slice_endpoints;
            let t0 = Instant::now();
            self.issue(&m, n)?;
            let deadline = t0 + self.opts.converge_timeout;
            let mut also_ok = false;
            loop {
                if !also_ok && also() {
                    also_ok = true;
                    also_done(t0.elapsed().as_secs_f64() * 1000.0);
                }
                if self.tracker.done_count() > 0 && also_ok {
                    break;
                }
                if Instant::now() > deadline {
                    let missing = self.tracker.abandon();
                    self.fail(format!(
                        "change {i} ({}) did not reach every agent within {:?} (missing at {missing:?} agents; other condition met: {also_ok})",
                        m.key, self.opts.converge_timeout
                    ));
                    return Ok(None);
                }
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
            times.extend(self.tracker.take_done().iter().map(|d| d.last_ms));
            // Let the ACKs land before the next change, so changes do not coalesce.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Some((times, slice_eps as f64 / count.max(1) as f64)))
    }

    pub(super) async fn phase_change(&mut self) -> Result<()> {
        let (n, count) = (self.opts.agents, self.opts.changes);
        progress!(
            self,
            "single changes: {count} endpoint changes, one at a time"
        );
        self.tracker.per_agent.reset();
        let m0 = self.metrics().await;
        let Some((times, slice_eps)) = self.single_changes(count, || true, |_| {}).await? else {
            return Ok(());
        };
        let m1 = self.metrics().await;
        let r = &mut self.report;
        r.change_p50_ms = quantile(&times, 0.5);
        r.change_p99_ms = quantile(&times, 0.99);
        r.change_max_ms = quantile(&times, 1.0);
        r.change_agent_p50_ms = self.tracker.per_agent.quantile_ms(0.5);
        r.change_agent_p99_ms = self.tracker.per_agent.quantile_ms(0.99);
        r.bytes_per_agent_per_change =
            (m1.sum(BYTES_SENT) - m0.sum(BYTES_SENT)) / (n * count.max(1)) as f64;
        r.changed_slice_endpoints_mean = slice_eps;
        progress!(
            self,
            "single changes: to the last agent p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {:.0} bytes per agent per change",
            self.report.change_p50_ms,
            self.report.change_p99_ms,
            self.report.change_max_ms,
            self.report.bytes_per_agent_per_change
        );
        Ok(())
    }

    /// Churn at `rate` for `duration`; `stuck` excludes one agent from tracking.
    pub(super) async fn churn(
        &mut self,
        rate: f64,
        duration: Duration,
        stuck: Option<usize>,
    ) -> Result<ChurnReport> {
        let n = self.opts.agents;
        let expected = n - usize::from(stuck.is_some());
        let total = (rate * duration.as_secs_f64()).round() as usize;
        progress!(
            self,
            "churn ({:?}): {total} changes at {rate}/s for {:?}{}",
            self.opts.churn_pattern,
            duration,
            if stuck.is_some() {
                " (one agent stuck)"
            } else {
                ""
            }
        );
        self.tracker.per_agent.reset();
        self.tracker.stages.reset();
        self.tracker.take_done();
        let m0 = self.metrics().await;
        let s0 = self.cp_sample();
        let me0 = procstat::sample(None).unwrap_or_default();
        let busy0 = procstat::machine_busy_s();
        let rollout0 = self.rollout.counts;
        let mut report = ChurnReport {
            pattern: self.opts.churn_pattern,
            rate,
            duration_s: duration.as_secs_f64(),
            cp_rss_start_mib: s0.rss_mib(),
            cp_rss_max_mib: s0.rss_mib(),
            ..ChurnReport::default()
        };
        let start = Instant::now();
        // Falling behind schedule catches up in bursts, but never past this.
        let hard_stop = start + duration + Duration::from_secs(30);
        let mut next_sample = start + Duration::from_secs(1);
        let mut next_note = start + Duration::from_secs(2);
        for i in 0..total {
            let at = start + Duration::from_secs_f64(i as f64 / rate.max(1e-9));
            tokio::time::sleep_until(at).await;
            if Instant::now() > hard_stop {
                report.skipped += total - i;
                break;
            }
            let m = match self.opts.churn_pattern {
                ChurnPattern::Random => {
                    let busy = self.busy();
                    self.cluster.churn_step(&busy)
                }
                ChurnPattern::Rollout => self.rollout.next(&mut self.cluster),
            };
            let Some(m) = m else {
                report.skipped += 1;
                continue;
            };
            match m.kind {
                MutationKind::Endpoint => report.endpoint_changes += 1,
                MutationKind::ServiceCreate => report.service_creates += 1,
                MutationKind::ServiceDelete => report.service_deletes += 1,
            }
            self.issue(&m, expected)?;
            report.changes += 1;
            if Instant::now() >= next_sample {
                let s = self.cp_sample();
                report.cp_rss_max_mib = report.cp_rss_max_mib.max(s.rss_mib());
                next_sample += Duration::from_secs(1);
                if Instant::now() >= next_note {
                    next_note += Duration::from_secs(5);
                    let m = self.metrics().await;
                    progress!(
                        self,
                        "churn: {}/{total} issued, {} in flight, CP RSS {:.0} MiB; CP saw {:.0} API events, sent {:.0} updates, got {:.0} ACKs",
                        i + 1,
                        self.tracker.in_flight(),
                        s.rss_mib(),
                        m.sum("meshlite_control_plane_api_events_total"),
                        m.sum(UPDATES_SENT),
                        m.sum("meshlite_control_plane_acks_total"),
                    );
                }
            }
        }
        let issued_for = start.elapsed();
        let deadline = Instant::now() + self.opts.converge_timeout;
        while self.tracker.in_flight() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let missing = self.tracker.abandon();
        report.not_converged = missing.len();
        if !missing.is_empty() {
            self.fail(format!(
                "churn at {rate}/s: {} changes did not reach every agent within {:?} after the last write",
                missing.len(),
                self.opts.converge_timeout
            ));
        }
        let elapsed = start.elapsed().as_secs_f64();
        let m1 = self.metrics().await;
        let s1 = self.cp_sample();
        let me1 = procstat::sample(None).unwrap_or_default();
        let times: Vec<f64> = self.tracker.take_done().iter().map(|d| d.last_ms).collect();
        report.p50_ms = quantile(&times, 0.5);
        report.p99_ms = quantile(&times, 0.99);
        report.max_ms = quantile(&times, 1.0);
        report.agent_p50_ms = self.tracker.per_agent.quantile_ms(0.5);
        report.agent_p99_ms = self.tracker.per_agent.quantile_ms(0.99);
        report.stages = StagesReport::of(&self.tracker.stages);
        report.bytes_per_agent_per_change =
            (m1.sum(BYTES_SENT) - m0.sum(BYTES_SENT)) / (n * report.changes.max(1)) as f64;
        report.updates_sent = m1.sum(UPDATES_SENT) - m0.sum(UPDATES_SENT);
        report.updates_per_agent_per_change =
            report.updates_sent / (n * report.changes.max(1)) as f64;
        report.cp_cpu_s = s1.cpu_s - s0.cpu_s;
        report.cp_cpu_cores = report.cp_cpu_s / elapsed;
        report.harness_cpu_cores = (me1.cpu_s - me0.cpu_s) / elapsed;
        report.others_cpu_cores = ((procstat::machine_busy_s() - busy0) / elapsed
            - report.cp_cpu_cores
            - report.harness_cpu_cores)
            .max(0.0);
        report.load_average_end = procstat::load_average();
        report.cp_rss_end_mib = s1.rss_mib();
        if self.opts.churn_pattern == ChurnPattern::Rollout {
            report.rollout = Some(self.rollout.counts.since(&rollout0));
        }
        report.cp_rss_max_mib = report.cp_rss_max_mib.max(s1.rss_mib());
        progress!(
            self,
            "churn at {rate}/s: {} changes issued in {:.1} s; to the last agent p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; {:.0} updates ({:.2} per agent per change); CP {:.2} cores, harness {:.2}, others {:.2}; RSS {:.0} -> {:.0} MiB",
            report.changes,
            issued_for.as_secs_f64(),
            report.p50_ms,
            report.p99_ms,
            report.max_ms,
            report.updates_sent,
            report.updates_per_agent_per_change,
            report.cp_cpu_cores,
            report.harness_cpu_cores,
            report.others_cpu_cores,
            report.cp_rss_start_mib,
            report.cp_rss_end_mib
        );
        progress!(self, "churn at {rate}/s: {}", report.stages);
        // Slow completions by the second they were written in: how many, and the
        // stages of the slowest.
        let t0 = meshlite_runtime::subscriber::to_nanos(std::time::SystemTime::now())
            - (elapsed * 1e9) as i64;
        let mut by_second: std::collections::BTreeMap<i64, (usize, Timeline, bool, u64)> =
            std::collections::BTreeMap::new();
        for (t, own, last_us) in self.tracker.stages.slow() {
            let e = by_second
                .entry((t.trigger_ns - t0) / 1_000_000_000)
                .or_insert((0, t, own, 0));
            e.0 += 1;
            if last_us > e.3 {
                (e.1, e.2, e.3) = (t, own, last_us);
            }
        }
        for (second, (count, t, own, last_us)) in by_second {
            let ms = |a: i64, b: i64| (b - a) as f64 / 1e6;
            progress!(
                self,
                "  slow in second {second}: {count}, worst {:.0} ms: {}watch {:.0}, publish {:.0}, pace {:.0}, wire {:.0} ms",
                last_us as f64 / 1000.0,
                if own { "" } else { "(merged) " },
                ms(t.trigger_ns, t.observed_ns),
                ms(t.observed_ns, t.published_ns),
                ms(t.published_ns, t.sent_ns),
                ms(t.sent_ns, t.received_ns),
            );
        }
        Ok(report)
    }

    pub(super) async fn phase_stuck(&mut self) -> Result<()> {
        let n = self.opts.agents;
        let rate = self
            .opts
            .stuck_rate
            .or_else(|| self.opts.churn.iter().copied().reduce(f64::max))
            .unwrap_or(20.0);
        let duration = self.opts.stuck_duration.unwrap_or(self.opts.duration);
        let stuck = n - 1;
        {
            let f = self.fleet()?;
            f.set_acking(stuck, false);
            f.agents[stuck].tracked.store(false, Ordering::Relaxed);
        }
        let churn = self.churn(rate, duration, Some(stuck)).await?;
        let growth = churn.cp_rss_end_mib - churn.cp_rss_start_mib;
        let baseline = self
            .report
            .churn
            .iter()
            .find(|c| (c.rate - rate).abs() < 1e-9 && c.changes > 0)
            .map(|c| {
                (c.cp_rss_end_mib - c.cp_rss_start_mib) * churn.changes as f64 / c.changes as f64
            });
        // Resume ACKing: it should catch up with one coalesced delta.
        let target = {
            let f = self.fleet()?;
            f.agents[..stuck]
                .iter()
                .map(|a| a.acked_version.load(Ordering::Relaxed))
                .max()
                .unwrap_or(0)
        };
        let m0 = self.metrics().await;
        let updates0 = self.fleet()?.agents[stuck].updates.load(Ordering::Relaxed);
        let t0 = Instant::now();
        self.fleet()?.set_acking(stuck, true);
        let deadline = t0 + self.opts.converge_timeout;
        loop {
            let a = &self.fleet()?.agents[stuck];
            if a.acked_version.load(Ordering::Relaxed) >= target {
                break;
            }
            if Instant::now() > deadline {
                self.fail(format!(
                    "stuck agent did not catch up to version {target} within {:?}",
                    self.opts.converge_timeout
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let catch_up_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let m1 = self.metrics().await;
        let f = self.fleet()?;
        f.agents[stuck].tracked.store(true, Ordering::Relaxed);
        let report = StuckReport {
            cp_rss_growth_mib: growth,
            baseline_rss_growth_mib: baseline,
            attributable_rss_growth_mib: baseline.map(|b| growth - b),
            catch_up_ms,
            catch_up_updates: f.agents[stuck].updates.load(Ordering::Relaxed) - updates0,
            catch_up_bytes: m1.sum(BYTES_SENT) - m0.sum(BYTES_SENT),
            churn,
        };
        progress!(
            self,
            "stuck agent: CP RSS growth {:.1} MiB over {} changes (baseline {:?}); caught up in {:.0} ms with {} update(s), {:.0} bytes",
            report.cp_rss_growth_mib,
            report.churn.changes,
            report.baseline_rss_growth_mib,
            report.catch_up_ms,
            report.catch_up_updates,
            report.catch_up_bytes
        );
        self.report.stuck = Some(report);
        Ok(())
    }

    pub(super) async fn phase_storm(&mut self) -> Result<()> {
        let n = self.opts.agents;
        progress!(self, "reconnect storm: all {n} agents reconnect at once");
        // Quiet first: every agent holds the newest version.
        let target = {
            let f = self.fleet()?;
            f.agents
                .iter()
                .map(|a| a.acked_version.load(Ordering::Relaxed))
                .max()
                .unwrap_or(0)
        };
        let settle = Instant::now() + self.opts.converge_timeout;
        while self.fleet()?.at_least(target) < n && Instant::now() < settle {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let m0 = self.metrics().await;
        let s0 = self.cp_sample();
        let streams0: Vec<u64> = self
            .fleet()?
            .agents
            .iter()
            .map(|a| a.streams.load(Ordering::Relaxed))
            .collect();
        let t0 = self.fleet()?.now_us();
        self.fleet()?.reconnect_all();
        let deadline = Instant::now() + self.opts.converge_timeout;
        let mut next_note = Instant::now() + Duration::from_secs(5);
        loop {
            let f = self.fleet()?;
            let done = f
                .agents
                .iter()
                .zip(&streams0)
                .filter(|(a, s0)| {
                    a.streams.load(Ordering::Relaxed) > **s0
                        && a.acks_this_stream.load(Ordering::Relaxed) > 0
                        && a.acked_version.load(Ordering::Relaxed) >= target
                })
                .count();
            if done == n {
                break;
            }
            if Instant::now() > deadline {
                let errs = f.errors();
                self.fail(format!(
                    "reconnect storm: {done} of {n} agents resumed within {:?}; errors: {errs:?}",
                    self.opts.converge_timeout
                ));
                return Ok(());
            }
            if Instant::now() >= next_note {
                progress!(self, "reconnect storm: {done}/{n} resumed");
                next_note += Duration::from_secs(5);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let last = self
            .fleet()?
            .agents
            .iter()
            .map(|a| a.first_ack_us.load(Ordering::Relaxed))
            .max()
            .unwrap_or(t0);
        let m1 = self.metrics().await;
        let s1 = self.cp_sample();
        let d = |name: &str, label: &str| m1.with_label(name, label) - m0.with_label(name, label);
        let bytes = m1.sum(BYTES_SENT) - m0.sum(BYTES_SENT);
        // Every stream is now one that sent a 34-byte resume: what an idle
        // subscribed agent costs, once the old streams' memory is returned.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let settled = self.cp_sample().rss_mib();
        let report = StormReport {
            converge_s: last.saturating_sub(t0) as f64 / 1e6,
            resume_bytes: bytes,
            resume_fraction: bytes / (n as f64 * self.report.full_snapshot_bytes.max(1.0)),
            full_updates: d(UPDATES_SENT, "kind=\"Full\""),
            delta_updates: d(UPDATES_SENT, "kind=\"Delta\""),
            unchanged_updates: d(UPDATES_SENT, "kind=\"Unchanged\""),
            inventory_updates: d(UPDATES_SENT, "kind=\"Inventory\""),
            refused_streams: m1.sum(REFUSED) - m0.sum(REFUSED),
            cp_cpu_s: s1.cpu_s - s0.cpu_s,
            cp_rss_end_mib: s1.rss_mib(),
            cp_rss_settled_mib: settled,
        };
        progress!(
            self,
            "reconnect storm: converged in {:.2} s; resume bytes {:.0} = {:.5} % of {n} full snapshots; updates full {} delta {} unchanged {} inventory {}; refused {}",
            report.converge_s,
            report.resume_bytes,
            report.resume_fraction * 100.0,
            report.full_updates,
            report.delta_updates,
            report.unchanged_updates,
            report.inventory_updates,
            report.refused_streams
        );
        progress!(
            self,
            "reconnect storm: {settled:.0} MiB 5 s after it; per agent {:.1} KiB over the process before any agent connected",
            (settled - self.report.cp_rss_synced_mib) * 1024.0 / n.max(1) as f64
        );
        self.report.storm = Some(report);
        Ok(())
    }

    pub(super) async fn phase_watches(&mut self) -> Result<()> {
        let (n, count) = (self.opts.agents, self.opts.changes);
        let stats = self.api.stats.clone();
        progress!(
            self,
            "per-node watches: {count} changes with meshlite alone, then with {n} kube-proxy-shaped watchers"
        );
        // meshlite alone.
        let ev0 = stats.events_sent.load(Ordering::Relaxed);
        let m0 = self.metrics().await;
        let streams = stats.open_watches.load(Ordering::Relaxed);
        if self.single_changes(count, || true, |_| {}).await?.is_none() {
            return Ok(());
        }
        let meshlite_events = stats.events_sent.load(Ordering::Relaxed) - ev0;
        let m1 = self.metrics().await;

        // N watchers, three streams each, at the current resourceVersion.
        let rv = self.api.resource_version();
        let watches0 = stats.watches.load(Ordering::Relaxed);
        let open0 = stats.open_watches.load(Ordering::Relaxed);
        let w = watchers::NodeWatchers::start(
            self.api.addr(),
            (0..n).map(cluster::node_name).collect(),
            rv,
            // The stand-in (HTTP/2 in this process) resets connections when
            // hundreds handshake at once; 50 at a time opens 15,000 watches in seconds.
            self.opts.connect_concurrency.min(50),
        );
        let deadline = Instant::now() + self.opts.converge_timeout;
        while w.stats.streams_open.load(Ordering::Relaxed) < 3 * n as u64
            && Instant::now() < deadline
            && w.stats.errors.load(Ordering::Relaxed) == 0
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let open = w.stats.streams_open.load(Ordering::Relaxed);
        progress!(
            self,
            "per-node watches: {open} watch streams open at the stand-in ({} total), {} errors",
            stats.open_watches.load(Ordering::Relaxed),
            w.stats.errors.load(Ordering::Relaxed)
        );
        if open < 3 * n as u64 {
            let first = w
                .stats
                .first_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            self.fail(format!(
                "per-node watches: only {open} of {} watch streams opened; first error: {first:?}",
                3 * n
            ));
            w.shutdown().await;
            return Ok(());
        }
        let ev1 = stats.events_sent.load(Ordering::Relaxed);
        let wbytes0 = w.stats.bytes.load(Ordering::Relaxed);
        let wstats = w.stats.clone();
        let mut watcher_times = Vec::with_capacity(count);
        let target = std::cell::Cell::new(wstats.events.load(Ordering::Relaxed));
        let result = self
            .single_changes(
                count,
                // One event per watcher per endpoint change.
                || wstats.events.load(Ordering::Relaxed) >= target.get() + n as u64,
                |ms| {
                    watcher_times.push(ms);
                    target.set(target.get() + n as u64);
                },
            )
            .await?;
        let per_node_events = stats.events_sent.load(Ordering::Relaxed) - ev1;
        let watches_opened = stats.watches.load(Ordering::Relaxed) - watches0;
        let per_node_bytes = w.stats.bytes.load(Ordering::Relaxed) - wbytes0;
        let errors = w.stats.errors.load(Ordering::Relaxed);
        w.shutdown().await;
        let Some((times, _)) = result else {
            return Ok(());
        };
        let lb = self.list_bytes;
        let per_node_list = lb.services + lb.slices + lb.nodes / n.max(1) as u64;
        let report = WatchesReport {
            changes: count,
            meshlite_watch_streams: streams,
            meshlite_events,
            meshlite_update_bytes: m1.sum(BYTES_SENT) - m0.sum(BYTES_SENT),
            meshlite_list_bytes: lb.services + lb.slices + lb.nodes,
            per_node_nodes: n,
            per_node_watch_streams: watches_opened.max(open - open0.min(open)),
            // The meshlite watch got the same events meanwhile: count only the nodes'.
            per_node_events: per_node_events.saturating_sub(meshlite_events),
            per_node_event_bytes: per_node_bytes,
            per_node_list_bytes: per_node_list * n as u64,
            per_node_event_p50_ms: quantile(&watcher_times, 0.5),
            per_node_event_p99_ms: quantile(&watcher_times, 0.99),
            meshlite_change_p50_ms: quantile(&times, 0.5),
            meshlite_change_p99_ms: quantile(&times, 0.99),
            watcher_errors: errors,
        };
        progress!(
            self,
            "per-node watches: meshlite {} streams, {} events; per-node {} streams, {} events ({:.1} MB), LISTs skipped {:.1} GB",
            report.meshlite_watch_streams,
            report.meshlite_events,
            report.per_node_watch_streams,
            report.per_node_events,
            report.per_node_event_bytes as f64 / 1e6,
            report.per_node_list_bytes as f64 / 1e9
        );
        self.report.watches = Some(report);
        Ok(())
    }
}
