//! Stream admission: at most `max` streams at once, and new streams admitted at a
//! bounded rate (a token bucket), so a reconnect storm of thousands of agents is
//! spread out instead of landing at once.

use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

#[derive(Debug)]
pub struct Limits {
    max: usize,
    streams: Arc<Semaphore>,
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    at: Instant,
}

impl Limits {
    pub fn new(max_streams: usize, rate: f64, burst: f64) -> Self {
        Self {
            max: max_streams,
            streams: Arc::new(Semaphore::new(max_streams)),
            bucket: Mutex::new(Bucket {
                tokens: burst,
                rate,
                burst,
                at: Instant::now(),
            }),
        }
    }

    /// Streams admitted and not yet ended.
    pub fn active(&self) -> usize {
        self.max.saturating_sub(self.streams.available_permits())
    }

    /// A permit held for the life of the stream, or why not.
    pub fn admit(&self) -> Result<OwnedSemaphorePermit, &'static str> {
        {
            let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * b.rate).min(b.burst);
            b.at = now;
            if b.tokens < 1.0 {
                return Err("rate_limited");
            }
            b.tokens -= 1.0;
        }
        self.streams
            .clone()
            .try_acquire_owned()
            .map_err(|_| "max_streams")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_concurrency_and_rate() {
        let l = Limits::new(2, 0.0, 10.0);
        let a = l.admit().unwrap();
        let _b = l.admit().unwrap();
        assert_eq!(l.active(), 2);
        assert_eq!(l.admit().unwrap_err(), "max_streams");
        drop(a);
        assert_eq!(l.active(), 1);
        assert!(l.admit().is_ok());

        let l = Limits::new(100, 0.0, 3.0);
        let held: Vec<_> = (0..3).map(|_| l.admit().unwrap()).collect();
        assert_eq!(l.admit().unwrap_err(), "rate_limited");
        drop(held);
    }
}
