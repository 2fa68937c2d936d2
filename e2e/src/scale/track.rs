//! Timing changes to every agent: the harness registers a change (its key and the
//! trigger time it writes into the object) at T0, just before writing it to the API
//! stand-in; each agent reports the updates carrying that key; the change is
//! complete when every tracked agent has it.
//!
//! A key may have several changes in flight (a rollout writes the same slice again
//! before the previous write reached everyone). An update carries a key's newest
//! content with that write's trigger time (its change cause), so it delivers every
//! change to the key with a trigger time up to that one: a change the control plane
//! merged into a later update is timed to that update's arrival. An update carrying
//! the key without a cause (a full snapshot, a removal) delivers all of them. Per
//! change the state is a bitset of agents (625 bytes at 5,000 agents), released on
//! completion.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::time::Instant;

use super::cluster::MutationKind;

/// One change in flight.
#[derive(Debug)]
struct Change {
    kind: MutationKind,
    t0: Instant,
    /// The trigger time written into the object, Unix nanoseconds.
    trigger_ns: i64,
    seen: Vec<AtomicU64>,
    remaining: AtomicUsize,
    last_us: AtomicU64,
}

/// A completed change.
#[derive(Debug, Clone, Copy)]
pub struct Done {
    pub kind: MutationKind,
    /// Time from T0 until the last agent received it.
    pub last_ms: f64,
}

/// See the module docs.
#[derive(Debug)]
pub struct Tracker {
    /// Per key, its changes in flight in the order they were written.
    pending: RwLock<HashMap<u32, Vec<Arc<Change>>>>,
    pending_count: AtomicUsize,
    done: Mutex<Vec<Done>>,
    agents: usize,
    /// Latency of every (change, agent) arrival.
    pub per_agent: Histogram,
    /// Where the time to the last agent went, per change (see [`Stages`]).
    pub stages: Stages,
}

/// When the control plane handled the write an update carries for a key (its
/// change cause), and when the update was sent and received; Unix nanoseconds,
/// one clock (one machine).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timeline {
    pub trigger_ns: i64,
    pub observed_ns: i64,
    pub published_ns: i64,
    pub sent_ns: i64,
    pub received_ns: i64,
}

/// The time from a write to its last agent, split at the control plane's
/// timestamps: the API and its watch (trigger -> observed), the store and its
/// debounce (observed -> published), the fan-out's queue and pacing (published
/// -> sent), and the wire plus the simulated agent's own scheduling (sent ->
/// received). Recorded for the arrival that completes a change; when that update
/// carries a later write the change was merged into, only pace and wire.
#[derive(Debug, Default)]
pub struct Stages {
    pub watch: Histogram,
    pub publish: Histogram,
    pub pace: Histogram,
    pub wire: Histogram,
    /// Completions that arrived in an update carrying a later write.
    pub merged: AtomicU64,
    /// Completions that arrived in an update without a cause for the key (a full
    /// snapshot, a removal): no stages.
    pub uncaused: AtomicU64,
    slow: Mutex<Vec<(Timeline, bool, u64)>>,
}

/// A completion this slow is kept for the report (the first [`SLOW_KEPT`]).
pub const SLOW_US: u64 = 900_000;
const SLOW_KEPT: usize = 20_000;

impl Stages {
    /// Records a completing arrival whose update carried `t` (the change's own
    /// write when `own`, else a later one it was merged into: then only the
    /// update's own stages, pace and wire, are the change's).
    fn record(&self, t: &Timeline, own: bool, last_us: u64) {
        let us = |a: i64, b: i64| u64::try_from((b - a).max(0) / 1000).unwrap_or(0);
        if t.published_ns == 0 {
            // A cause of a version not yet published when the update was built
            // (the agent got it before its publish stamp): no split.
            self.uncaused.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if own {
            self.watch.record(us(t.trigger_ns, t.observed_ns));
            self.publish.record(us(t.observed_ns, t.published_ns));
        } else {
            self.merged.fetch_add(1, Ordering::Relaxed);
        }
        self.pace.record(us(t.published_ns, t.sent_ns));
        self.wire.record(us(t.sent_ns, t.received_ns));
        if last_us >= SLOW_US {
            let mut slow = self.slow.lock().unwrap_or_else(|p| p.into_inner());
            if slow.len() < SLOW_KEPT {
                slow.push((*t, own, last_us));
            }
        }
    }

    /// The slow completions (at least [`SLOW_US`]; the first 20,000) since the last reset:
    /// their timeline, whether it was the change's own write, and the total.
    pub fn slow(&self) -> Vec<(Timeline, bool, u64)> {
        self.slow.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn reset(&self) {
        for h in [&self.watch, &self.publish, &self.pace, &self.wire] {
            h.reset();
        }
        self.merged.store(0, Ordering::Relaxed);
        self.uncaused.store(0, Ordering::Relaxed);
        self.slow.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

// === impl Tracker ===

impl Tracker {
    pub fn new(agents: usize) -> Self {
        Self {
            pending: RwLock::new(HashMap::new()),
            pending_count: AtomicUsize::new(0),
            done: Mutex::new(Vec::new()),
            agents,
            per_agent: Histogram::default(),
            stages: Stages::default(),
        }
    }

    /// Starts timing a change to key `key` (an interned key index) whose object
    /// carries trigger time `trigger_ns`, expected at `expected` agents.
    pub fn start(&self, key: u32, trigger_ns: i64, kind: MutationKind, expected: usize) {
        let change = Arc::new(Change {
            kind,
            t0: Instant::now(),
            trigger_ns,
            seen: (0..self.agents.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            remaining: AtomicUsize::new(expected.max(1)),
            last_us: AtomicU64::new(0),
        });
        self.write().entry(key).or_default().push(change);
        self.pending_count.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether a change to this key is in flight.
    pub fn busy(&self, key: u32) -> bool {
        self.read().contains_key(&key)
    }

    /// Changes in flight.
    pub fn in_flight(&self) -> usize {
        self.pending_count.load(Ordering::Relaxed)
    }

    /// Agent `agent` received at `at` an update carrying `keys`, each with the
    /// timeline of its cause (None: no cause, everything in flight for it).
    pub fn observe(
        &self,
        agent: usize,
        keys: impl Iterator<Item = (u32, Option<Timeline>)>,
        at: Instant,
    ) {
        if self.in_flight() == 0 {
            return;
        }
        let mut finished = false;
        {
            let pending = self.read();
            for (k, trigger) in keys {
                let trigger = trigger.as_ref();
                let Some(changes) = pending.get(&k) else {
                    continue;
                };
                for c in changes
                    .iter()
                    .filter(|c| trigger.is_none_or(|t| c.trigger_ns <= t.trigger_ns))
                {
                    let bit = 1u64 << (agent % 64);
                    let Some(word) = c.seen.get(agent / 64) else {
                        continue;
                    };
                    if word.fetch_or(bit, Ordering::AcqRel) & bit != 0 {
                        continue;
                    }
                    let us = u64::try_from(at.saturating_duration_since(c.t0).as_micros())
                        .unwrap_or(u64::MAX);
                    self.per_agent.record(us);
                    c.last_us.fetch_max(us, Ordering::AcqRel);
                    if c.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                        finished = true;
                        let last = c.last_us.load(Ordering::Acquire);
                        match trigger {
                            Some(t) => self.stages.record(t, t.trigger_ns == c.trigger_ns, last),
                            None => {
                                self.stages.uncaused.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
            }
        }
        if finished {
            let mut pending = self.write();
            let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
            pending.retain(|_, changes| {
                changes.retain(|c| {
                    if c.remaining.load(Ordering::Acquire) > 0 {
                        return true;
                    }
                    self.pending_count.fetch_sub(1, Ordering::Relaxed);
                    done.push(Done {
                        kind: c.kind,
                        last_ms: c.last_us.load(Ordering::Acquire) as f64 / 1000.0,
                    });
                    false
                });
                !changes.is_empty()
            });
        }
    }

    /// Completed changes so far (and clears the list).
    pub fn take_done(&self) -> Vec<Done> {
        std::mem::take(&mut *self.done.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Number of completed changes not yet taken.
    pub fn done_count(&self) -> usize {
        self.done.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Forgets changes in flight (after a timeout); returns how many, and the
    /// number of agents each was still missing.
    pub fn abandon(&self) -> Vec<usize> {
        let mut pending = self.write();
        let out = pending
            .values()
            .flatten()
            .map(|c| c.remaining.load(Ordering::Acquire))
            .collect();
        pending.clear();
        self.pending_count.store(0, Ordering::Relaxed);
        out
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<u32, Vec<Arc<Change>>>> {
        self.pending.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<u32, Vec<Arc<Change>>>> {
        self.pending.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// A lock-free log-linear histogram of microseconds: 16 buckets per power of two
/// (about 4 % resolution) up to 2^31 µs. Hand-written: 40 lines, no dependency.
#[derive(Debug)]
pub struct Histogram {
    buckets: Vec<AtomicU64>,
    max: AtomicU64,
    count: AtomicU64,
}

const SUB: u32 = 16;

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: (0..32 * SUB).map(|_| AtomicU64::new(0)).collect(),
            max: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    fn index(us: u64) -> usize {
        let v = us.max(1);
        let exp = 63 - v.leading_zeros();
        // The SUB sub-buckets split [2^exp, 2^(exp+1)) linearly.
        let frac = if exp >= 4 {
            (v >> (exp - 4)) & 0xf
        } else {
            (v << (4 - exp)) & 0xf
        };
        ((exp * SUB) as usize + frac as usize).min(32 * SUB as usize - 1)
    }

    fn value(index: usize) -> f64 {
        let exp = (index / SUB as usize) as i32;
        let frac = (index % SUB as usize) as f64;
        // Middle of the bucket.
        2f64.powi(exp) * (1.0 + (frac + 0.5) / f64::from(SUB))
    }

    pub fn record(&self, us: u64) {
        if let Some(b) = self.buckets.get(Self::index(us)) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        self.max.fetch_max(us, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The q-quantile in milliseconds (0 when empty); q = 1 is the exact maximum.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        let n = self.count();
        if n == 0 {
            return 0.0;
        }
        if q >= 1.0 {
            return self.max.load(Ordering::Relaxed) as f64 / 1000.0;
        }
        let rank = ((q * n as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(Ordering::Relaxed);
            if seen >= rank {
                return Self::value(i).min(self.max.load(Ordering::Relaxed) as f64) / 1000.0;
            }
        }
        self.max.load(Ordering::Relaxed) as f64 / 1000.0
    }

    pub fn reset(&self) {
        for b in &self.buckets {
            b.store(0, Ordering::Relaxed);
        }
        self.max.store(0, Ordering::Relaxed);
        self.count.store(0, Ordering::Relaxed);
    }
}

/// Exact quantile of a sample (nearest rank); 0 when empty.
pub fn quantile(samples: &[f64], q: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_within_resolution() {
        let h = Histogram::default();
        for us in 1..=10_000u64 {
            h.record(us * 100);
        }
        let p50 = h.quantile_ms(0.5);
        assert!((p50 - 500.0).abs() / 500.0 < 0.05, "{p50}");
        let p99 = h.quantile_ms(0.99);
        assert!((p99 - 990.0).abs() / 990.0 < 0.05, "{p99}");
        assert_eq!(h.quantile_ms(1.0), 1000.0);
    }

    fn tl(trigger_ns: i64) -> Timeline {
        Timeline {
            trigger_ns,
            published_ns: trigger_ns + 1,
            ..Timeline::default()
        }
    }

    #[test]
    fn a_change_completes_when_every_agent_saw_it_once() {
        let t = Tracker::new(3);
        t.start(7, 100, MutationKind::Endpoint, 3);
        assert!(t.busy(7));
        let now = Instant::now();
        t.observe(0, [(7, Some(tl(100))), (8, None)].into_iter(), now);
        t.observe(0, [(7, None)].into_iter(), now); // a resync carrying it again: counted once
        t.observe(1, [(7, Some(tl(100)))].into_iter(), now);
        assert_eq!(t.done_count(), 0);
        t.observe(2, [(7, Some(tl(100)))].into_iter(), now);
        assert_eq!(t.take_done().len(), 1);
        assert!(!t.busy(7));
        assert_eq!(t.per_agent.count(), 3);
    }

    #[test]
    fn an_update_delivers_the_writes_up_to_its_cause() {
        let t = Tracker::new(2);
        t.start(7, 100, MutationKind::Endpoint, 2);
        t.start(7, 200, MutationKind::Endpoint, 2);
        t.start(7, 300, MutationKind::Endpoint, 2);
        let now = Instant::now();
        // Agent 0 gets the first write, then one update merging the other two.
        t.observe(0, [(7, Some(tl(100)))].into_iter(), now);
        t.observe(0, [(7, Some(tl(300)))].into_iter(), now);
        // Agent 1 gets the second write only: the third is still in flight.
        t.observe(1, [(7, Some(tl(200)))].into_iter(), now);
        assert_eq!(t.take_done().len(), 2, "the first two writes reached both");
        assert_eq!(t.in_flight(), 1);
        assert!(t.busy(7));
        t.observe(1, [(7, None)].into_iter(), now);
        assert_eq!(t.take_done().len(), 1);
        assert_eq!(t.in_flight(), 0);
        assert!(!t.busy(7));
        assert_eq!(t.per_agent.count(), 6);
        // The second write completed in an update carrying the third.
        // The first write completed in an update carrying the second, the third
        // in one without a cause.
        assert_eq!(t.stages.merged.load(Ordering::Relaxed), 1);
        assert_eq!(t.stages.uncaused.load(Ordering::Relaxed), 1);
        assert_eq!(t.stages.watch.count(), 1);
        assert_eq!(t.stages.wire.count(), 2);
    }

    #[test]
    fn the_completing_arrival_splits_its_time_into_stages() {
        let t = Tracker::new(2);
        t.start(7, 1_000_000, MutationKind::Endpoint, 2);
        let now = Instant::now();
        let timeline = Timeline {
            trigger_ns: 1_000_000,
            observed_ns: 3_000_000,
            published_ns: 8_000_000,
            sent_ns: 408_000_000,
            received_ns: 409_000_000,
        };
        t.observe(0, [(7, Some(timeline))].into_iter(), now);
        assert_eq!(t.stages.pace.count(), 0, "only the last agent's arrival");
        t.observe(1, [(7, Some(timeline))].into_iter(), now);
        assert_eq!(t.stages.watch.quantile_ms(1.0), 2.0);
        assert_eq!(t.stages.publish.quantile_ms(1.0), 5.0);
        assert_eq!(t.stages.pace.quantile_ms(1.0), 400.0);
        assert_eq!(t.stages.wire.quantile_ms(1.0), 1.0);
        assert_eq!(t.stages.merged.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn exact_quantiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
    }
}
