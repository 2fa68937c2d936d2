//! Counters and histograms kept per thread shard and summed at scrape.
//!
//! Every UDP worker records every datagram. With prometheus-client's `Counter` all
//! workers add to one atomic, and its `Histogram` takes a mutex per observation:
//! both move one cache line between the cores on each request. Here each worker
//! thread writes its own shard (a cache-line aligned block written by no other
//! thread); other threads (tokio's: TCP, forwarded answers) share shard 0. A scrape
//! adds the shards up, so the exposition is the same as with the library's types.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Shards per metric: shard 0 for shared threads, the rest for UDP workers (worker
/// `i` writes shard `1 + i % (SHARDS - 1)`).
const SHARDS: usize = 16;

/// Most buckets a sharded histogram has (including `+Inf`).
const MAX_BUCKETS: usize = 24;

thread_local! {
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// Makes the calling thread record into the shard of UDP worker `worker`.
pub fn enter_worker_shard(worker: u32) {
    let i = usize::try_from(worker).unwrap_or(0) % (SHARDS - 1);
    SHARD.with(|s| s.set(1 + i));
}

fn shard() -> usize {
    SHARD.with(Cell::get)
}

#[derive(Debug, Default)]
#[repr(align(128))]
struct CounterShard(AtomicU64);

/// A monotonic counter, per thread shard.
#[derive(Debug, Clone)]
pub struct ShardedCounter {
    shards: Arc<[CounterShard]>,
}

#[derive(Debug)]
#[repr(align(128))]
struct HistogramShard {
    count: AtomicU64,
    /// `f64` bits.
    sum: AtomicU64,
    buckets: [AtomicU64; MAX_BUCKETS],
}

/// A histogram with fixed buckets, per thread shard.
#[derive(Debug, Clone)]
pub struct ShardedHistogram {
    /// Upper bounds, the last `+Inf`.
    bounds: Arc<[f64]>,
    shards: Arc<[HistogramShard]>,
}

// === impl ShardedCounter ===

impl Default for ShardedCounter {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| CounterShard::default()).collect(),
        }
    }
}

impl ShardedCounter {
    /// Adds one.
    pub fn inc(&self) {
        self.shards[shard()].0.fetch_add(1, Ordering::Relaxed);
    }

    /// The total.
    pub fn get(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }
}

impl TypedMetric for ShardedCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for ShardedCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

// === impl ShardedHistogram ===

impl ShardedHistogram {
    /// A histogram with these finite upper bounds (at most `MAX_BUCKETS - 1`; more
    /// are dropped) plus `+Inf`.
    pub fn new(bounds: impl IntoIterator<Item = f64>) -> Self {
        let bounds: Arc<[f64]> = bounds
            .into_iter()
            .filter(|b| b.is_finite())
            .take(MAX_BUCKETS - 1)
            .chain(std::iter::once(f64::INFINITY))
            .collect();
        Self {
            bounds,
            shards: (0..SHARDS)
                .map(|_| HistogramShard {
                    count: AtomicU64::new(0),
                    sum: AtomicU64::new(0f64.to_bits()),
                    buckets: std::array::from_fn(|_| AtomicU64::new(0)),
                })
                .collect(),
        }
    }

    /// Records one value.
    pub fn observe(&self, v: f64) {
        let s = &self.shards[shard()];
        let i = self
            .bounds
            .iter()
            .position(|b| *b >= v)
            .unwrap_or(self.bounds.len() - 1);
        s.buckets[i].fetch_add(1, Ordering::Relaxed);
        // Shard 0 is shared by the runtime's threads: add with a CAS loop. Its
        // closure always returns `Some`, so the update cannot fail.
        let _ = s
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + v).to_bits())
            });
        s.count.fetch_add(1, Ordering::Relaxed);
    }
}

impl TypedMetric for ShardedHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for ShardedHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let mut sum = 0.0;
        let mut count = 0u64;
        let mut buckets: Vec<(f64, u64)> = self.bounds.iter().map(|b| (*b, 0)).collect();
        for s in self.shards.iter() {
            sum += f64::from_bits(s.sum.load(Ordering::Relaxed));
            count = count.wrapping_add(s.count.load(Ordering::Relaxed));
            for (b, n) in buckets.iter_mut().zip(&s.buckets) {
                b.1 = b.1.wrapping_add(n.load(Ordering::Relaxed));
            }
        }
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_add_up() {
        let c = ShardedCounter::default();
        let h = ShardedHistogram::new([1.0, 2.0]);
        std::thread::scope(|scope| {
            for w in 0..3 {
                let (c, h) = (&c, &h);
                scope.spawn(move || {
                    enter_worker_shard(w);
                    for _ in 0..1000 {
                        c.inc();
                        h.observe(1.5);
                    }
                });
            }
        });
        c.inc();
        h.observe(5.0);
        assert_eq!(c.get(), 3001);
        let mut text = String::new();
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("h", "h", h);
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("h_count 3001"), "{text}");
        assert!(text.contains("h_sum 4505.0"), "{text}");
        assert!(text.contains("h_bucket{le=\"2.0\"} 3000"), "{text}");
        assert!(text.contains("h_bucket{le=\"+Inf\"} 3001"), "{text}");
    }
}
