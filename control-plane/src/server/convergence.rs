//! Per-version convergence: how long from publishing a version until every agent
//! that was subscribed then has applied it (by the ACKs' applied timestamps), and
//! how many agents are behind the newest version.
//!
//! State is one small record per connected agent and one per version still
//! converging, with a count of the agents it waits for: no per-agent sets per
//! version. Versions that do not converge within `timeout` (an agent stuck NACKing)
//! are dropped and counted.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// See the module docs.
#[derive(Debug)]
pub struct Convergence {
    inner: Mutex<Inner>,
    timeout: Duration,
    pub seconds: Histogram,
    pub timeouts: Counter,
    pub behind: Gauge,
    pub lag: Gauge<f64, AtomicU64>,
}

#[derive(Debug, Default)]
struct Inner {
    published: u64,
    agents: HashMap<u64, AgentState>,
    pending: BTreeMap<u64, Pending>,
    /// Agents holding less than `published`, kept as they move (not recounted on
    /// every ACK: at 5,000 agents that scan was a tenth of the server's CPU).
    behind: usize,
}

#[derive(Debug, Clone, Copy)]
struct AgentState {
    held: u64,
    /// The published version when the agent connected: it does not count for
    /// versions published before it was there.
    joined: u64,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    at: SystemTime,
    remaining: usize,
    last_applied: SystemTime,
}

impl Convergence {
    pub fn register(registry: &mut Registry, timeout: Duration) -> Self {
        let c = Self {
            inner: Mutex::new(Inner::default()),
            timeout,
            seconds: Histogram::new(exponential_buckets(0.001, 2.0, 18)),
            timeouts: Counter::default(),
            behind: Gauge::default(),
            lag: Gauge::default(),
        };
        let r = registry.sub_registry_with_prefix("meshlite_control_plane");
        r.register(
            "version_convergence_seconds",
            "From publishing a version until every agent subscribed at that time applied it",
            c.seconds.clone(),
        );
        r.register(
            "version_convergence_timeouts",
            "Versions that did not converge on every agent within the timeout",
            c.timeouts.clone(),
        );
        r.register(
            "agents_behind",
            "Agents that do not hold the newest published version",
            c.behind.clone(),
        );
        r.register(
            "agents_lag_seconds",
            "How long the furthest-behind agent has been behind: the age of the oldest published version that an agent subscribed at the time has not applied yet (0 when none)",
            c.lag.clone(),
        );
        c
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Counters only; a poisoned lock still holds usable numbers.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A version was published at `at`.
    pub fn published(&self, version: u64, at: SystemTime) {
        let mut inner = self.lock();
        if version <= inner.published {
            return;
        }
        inner.published = version;
        let remaining = inner.agents.values().filter(|a| a.held < version).count();
        inner.behind = remaining;
        if remaining > 0 {
            inner.pending.insert(
                version,
                Pending {
                    at,
                    remaining,
                    last_applied: at,
                },
            );
        }
        self.expire(&mut inner, at);
        self.update_behind(&inner);
    }

    pub fn connected(&self, id: u64) {
        let mut inner = self.lock();
        let joined = inner.published;
        if let Some(old) = inner.agents.insert(id, AgentState { held: 0, joined })
            && old.held < joined
        {
            inner.behind = inner.behind.saturating_sub(1);
        }
        if joined > 0 {
            inner.behind += 1;
        }
        self.update_behind(&inner);
    }

    /// An agent now holds `to` (applied at `applied`).
    pub fn advanced(&self, id: u64, to: u64, applied: SystemTime) {
        let mut inner = self.lock();
        let Some(a) = inner.agents.get(&id).copied() else {
            return;
        };
        let published = inner.published;
        match (a.held < published, to < published) {
            (true, false) => inner.behind = inner.behind.saturating_sub(1),
            (false, true) => inner.behind += 1,
            _ => {}
        }
        if to <= a.held {
            if let Some(s) = inner.agents.get_mut(&id) {
                s.held = to;
            }
            self.update_behind(&inner);
            return;
        }
        let from = a.held.max(a.joined);
        let mut done = Vec::new();
        let range = from + 1..=to.max(from + 1);
        // `range` is never inverted (a BTreeMap range would panic); when the agent
        // only reached versions it does not count for, nothing in it applies.
        for (v, p) in inner.pending.range_mut(range).filter(|(v, _)| **v <= to) {
            p.remaining = p.remaining.saturating_sub(1);
            p.last_applied = p.last_applied.max(applied);
            if p.remaining == 0 {
                done.push(*v);
            }
        }
        for v in done {
            if let Some(p) = inner.pending.remove(&v) {
                let secs = p.last_applied.duration_since(p.at).unwrap_or_default();
                self.seconds.observe(secs.as_secs_f64());
            }
        }
        if let Some(s) = inner.agents.get_mut(&id) {
            s.held = to;
        }
        self.update_behind(&inner);
    }

    /// An agent disconnected: versions no longer wait for it.
    pub fn gone(&self, id: u64) {
        let mut inner = self.lock();
        let Some(a) = inner.agents.remove(&id) else {
            return;
        };
        if a.held < inner.published {
            inner.behind = inner.behind.saturating_sub(1);
        }
        let from = a.held.max(a.joined);
        let mut done = Vec::new();
        for (v, p) in inner.pending.range_mut(from + 1..) {
            p.remaining = p.remaining.saturating_sub(1);
            if p.remaining == 0 {
                done.push(*v);
            }
        }
        for v in done {
            if let Some(p) = inner.pending.remove(&v) {
                let secs = p.last_applied.duration_since(p.at).unwrap_or_default();
                self.seconds.observe(secs.as_secs_f64());
            }
        }
        self.update_behind(&inner);
    }

    /// Sets the lag gauge to the age at `now` of the oldest version still converging.
    pub fn refresh_lag(&self, now: SystemTime) {
        let inner = self.lock();
        let age = inner
            .pending
            .values()
            .next()
            .map(|p| now.duration_since(p.at).unwrap_or_default().as_secs_f64());
        self.lag.set(age.unwrap_or(0.0));
    }

    /// Versions still converging.
    pub fn pending(&self) -> usize {
        self.lock().pending.len()
    }

    fn expire(&self, inner: &mut Inner, now: SystemTime) {
        let stale: Vec<u64> = inner
            .pending
            .iter()
            .filter(|(_, p)| now.duration_since(p.at).unwrap_or_default() > self.timeout)
            .map(|(v, _)| *v)
            .collect();
        for v in stale {
            inner.pending.remove(&v);
            self.timeouts.inc();
        }
    }

    fn update_behind(&self, inner: &Inner) {
        debug_assert_eq!(
            inner.behind,
            inner
                .agents
                .values()
                .filter(|a| a.held < inner.published)
                .count()
        );
        self.behind
            .set(i64::try_from(inner.behind).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
    }

    #[test]
    fn one_observation_per_version_once_all_agents_applied() {
        let c = Convergence::register(&mut Registry::default(), Duration::from_secs(60));
        c.connected(1);
        c.connected(2);
        c.advanced(1, 5, t(0));
        c.advanced(2, 5, t(0));
        c.published(6, t(1000));
        c.published(7, t(1100));
        assert_eq!(c.behind.get(), 2);
        c.advanced(1, 7, t(1200)); // one coalesced delta covers 6 and 7
        assert_eq!(c.pending(), 2);
        c.advanced(2, 6, t(1300));
        assert_eq!(c.pending(), 1, "6 converged");
        c.advanced(2, 7, t(1500));
        assert_eq!(c.pending(), 0);
        assert_eq!(c.behind.get(), 0);
        // 6: 1000 -> 1300; 7: 1100 -> 1500.
        let mut body = String::new();
        let mut reg = Registry::default();
        reg.register("x", "x", c.seconds.clone());
        prometheus_client::encoding::text::encode(&mut body, &reg).unwrap();
        assert!(body.contains("x_count 2"), "{body}");
        assert!(body.contains("x_sum 0.7"), "{body}");
    }

    #[test]
    fn late_joiners_and_leavers_do_not_block() {
        let c = Convergence::register(&mut Registry::default(), Duration::from_secs(60));
        c.connected(1);
        c.published(3, t(0));
        c.connected(2); // joined after 3 was published
        c.advanced(2, 3, t(10));
        assert_eq!(c.pending(), 1, "agent 2 does not count for version 3");
        c.gone(1);
        assert_eq!(c.pending(), 0, "nobody left to wait for");
    }

    #[test]
    fn lag_is_the_age_of_the_oldest_unconverged_version() {
        let c = Convergence::register(&mut Registry::default(), Duration::from_secs(60));
        c.connected(1);
        c.connected(2);
        c.refresh_lag(t(500));
        assert_eq!(c.lag.get(), 0.0, "nothing published");
        c.published(2, t(1000));
        c.published(3, t(1500));
        c.advanced(1, 3, t(1600));
        c.refresh_lag(t(4000));
        assert_eq!(c.lag.get(), 3.0, "agent 2 misses 2, published at 1 s");
        c.advanced(2, 2, t(4100));
        c.refresh_lag(t(4500));
        assert_eq!(c.lag.get(), 3.0, "agent 2 misses 3, published at 1.5 s");
        c.advanced(2, 3, t(4600));
        c.refresh_lag(t(5000));
        assert_eq!(c.lag.get(), 0.0);
    }

    #[test]
    fn stuck_versions_time_out() {
        let c = Convergence::register(&mut Registry::default(), Duration::from_secs(1));
        c.connected(1);
        c.published(2, t(0));
        c.published(3, t(5000));
        assert_eq!(c.timeouts.get(), 1);
        assert_eq!(c.pending(), 1);
    }

    #[test]
    fn behind_count_stays_exact_under_random_events() {
        // update_behind's debug assertion recounts after every event.
        let c = Convergence::register(&mut Registry::default(), Duration::from_secs(60));
        let mut x: u64 = 0x9e37_79b9;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut version = 0;
        for i in 0..5_000u64 {
            let id = next() % 20;
            match next() % 4 {
                0 => c.connected(id),
                1 => {
                    version += 1;
                    c.published(version, t(i));
                }
                2 => c.advanced(id, next() % (version + 2), t(i)),
                _ => c.gone(id),
            }
        }
    }
}
