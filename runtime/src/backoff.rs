//! The one backoff: jittered exponential, as kube-rs' `DefaultBackoff` shapes it
//! (800 ms -> 30 s). Jitter keeps a fleet of agents from reconnecting in lockstep
//! after a control-plane restart.

use std::time::Duration;

use rand::Rng;

/// Jittered exponential backoff. Clone to get a fresh sequence.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    /// Fraction of each delay that is randomized, in [0, 1].
    jitter: f64,
    attempt: u32,
}

/// Invalid backoff parameters.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid backoff: {0}")]
pub struct InvalidBackoff(&'static str);

impl Backoff {
    /// # Errors
    /// `min` must be positive and not above `max`; `jitter` within [0, 1].
    pub fn try_new(min: Duration, max: Duration, jitter: f64) -> Result<Self, InvalidBackoff> {
        if min.is_zero() {
            return Err(InvalidBackoff("min must be positive"));
        }
        if min > max {
            return Err(InvalidBackoff("min must not exceed max"));
        }
        if !(0.0..=1.0).contains(&jitter) {
            return Err(InvalidBackoff("jitter must be within [0, 1]"));
        }
        Ok(Self {
            min,
            max,
            jitter,
            attempt: 0,
        })
    }

    /// The next delay: `min * 2^attempt` capped at `max`, of which a `jitter`
    /// fraction is random.
    pub fn next_delay(&mut self) -> Duration {
        let base = self
            .min
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let fixed = base.mul_f64(1.0 - self.jitter);
        let random = base.mul_f64(self.jitter * rand::rng().random::<f64>());
        fixed + random
    }

    /// Start over from `min` (after a healthy period).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            min: Duration::from_millis(800),
            max: Duration::from_secs(30),
            jitter: 0.5,
            attempt: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_caps_and_jitters() {
        let mut b =
            Backoff::try_new(Duration::from_millis(100), Duration::from_secs(1), 0.5).unwrap();
        let d: Vec<_> = (0..8).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(50) && d[0] <= Duration::from_millis(100));
        assert!(d[3] >= Duration::from_millis(400) && d[3] <= Duration::from_millis(800));
        for x in &d[4..] {
            assert!(
                *x >= Duration::from_millis(500) && *x <= Duration::from_secs(1),
                "{x:?}"
            );
        }
        // Jitter: a fleet does not get one identical sequence.
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20 {
            seen.insert(b.clone().next_delay());
        }
        assert!(seen.len() > 1);
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn rejects_bad_parameters() {
        assert!(Backoff::try_new(Duration::ZERO, Duration::from_secs(1), 0.1).is_err());
        assert!(Backoff::try_new(Duration::from_secs(2), Duration::from_secs(1), 0.1).is_err());
        assert!(Backoff::try_new(Duration::from_secs(1), Duration::from_secs(1), 1.5).is_err());
    }
}
