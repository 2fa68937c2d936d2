//! How long a watcher waits after an error, by what the error says.
//!
//! kube-rs' `default_backoff()` waits after every error alike and grows to 30 s while
//! the API server is away, so the first request after an outage, and the re-list that
//! a 410 Gone then asks for, could each wait up to 30 s: a change made during an
//! outage reached agents half a minute after the API server was back. Here:
//!
//! - **410 Gone** (history compacted): the watcher re-lists at once. Waiting gains
//!   nothing; the list is what repairs it.
//! - **The API server answered** with an error (429, 5xx, 403, a watch error event):
//!   jittered exponential from 500 ms, capped at 5 s: a struggling server gets
//!   room, and a fixed one (RBAC, a restarted aggregator) is noticed within seconds.
//! - **The API server did not answer** (refused, reset, timed out): from 250 ms,
//!   capped at 1 s. The control plane is one or two replicas with three watches
//!   each, not a watch per node, so probing an absent server once a second costs it
//!   nothing, and bounds how long after its return the watchers notice.
//!
//! The backoff starts over when the API server delivers something (a listed
//! object, the end of a list, a watch event).

use std::time::Duration;

use kube::runtime::watcher;
use meshlite_runtime::backoff::Backoff;
use prometheus_client::encoding::EncodeLabelValue;

/// What an error calls for (also the `class` label of `watch_errors_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
pub enum Class {
    /// 410 Gone: re-list now.
    Gone,
    /// The API server answered with an error.
    ApiError,
    /// The API server could not be reached.
    Unreachable,
}

/// The per-watcher retry state.
#[derive(Debug, Clone)]
pub struct Retry {
    answered: Backoff,
    unreachable: Backoff,
}

// === impl Class ===

impl Class {
    /// Classifies a watcher error.
    pub fn of(e: &watcher::Error) -> Self {
        match e {
            watcher::Error::WatchError(status) => Self::of_code(status.code),
            watcher::Error::InitialListFailed(e)
            | watcher::Error::WatchStartFailed(e)
            | watcher::Error::WatchFailed(e) => match e {
                kube::Error::Api(status) => Self::of_code(status.code),
                _ => Self::Unreachable,
            },
            // The server answered, with something a watcher cannot use.
            watcher::Error::NoResourceVersion => Self::ApiError,
        }
    }

    fn of_code(code: u16) -> Self {
        if code == 410 {
            Self::Gone
        } else {
            Self::ApiError
        }
    }
}

// === impl Retry ===

impl Retry {
    pub fn new() -> Self {
        Self {
            answered: backoff(Duration::from_millis(500), Duration::from_secs(5)),
            unreachable: backoff(Duration::from_millis(250), Duration::from_secs(1)),
        }
    }

    /// How long to wait before polling the watcher again, `None` for not at all.
    pub fn after(&mut self, class: Class) -> Option<Duration> {
        match class {
            Class::Gone => None,
            Class::ApiError => Some(self.answered.next_delay()),
            Class::Unreachable => Some(self.unreachable.next_delay()),
        }
    }

    /// The API server delivered something: start over.
    pub fn reset(&mut self) {
        self.answered.reset();
        self.unreachable.reset();
    }
}

impl Default for Retry {
    fn default() -> Self {
        Self::new()
    }
}

fn backoff(min: Duration, max: Duration) -> Backoff {
    // The bounds are constants satisfying try_new's rules (min > 0, min <= max,
    // jitter within [0, 1]).
    Backoff::try_new(min, max, 0.5).expect("constant backoff bounds are valid")
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::Status;

    fn status(code: u16) -> Status {
        let mut s = Status::failure("x", "Expired");
        s.code = code;
        s
    }

    #[test]
    fn gone_relists_at_once_whatever_came_before() {
        let mut r = Retry::new();
        for _ in 0..10 {
            r.after(Class::Unreachable);
        }
        let gone = watcher::Error::WatchError(Box::new(status(410)));
        assert_eq!(Class::of(&gone), Class::Gone);
        assert_eq!(r.after(Class::of(&gone)), None);
        let list_gone = watcher::Error::InitialListFailed(kube::Error::Api(Box::new(status(410))));
        assert_eq!(Class::of(&list_gone), Class::Gone);
    }

    #[test]
    fn answered_errors_cap_at_seconds() {
        let mut r = Retry::new();
        let e = watcher::Error::WatchStartFailed(kube::Error::Api(Box::new(status(503))));
        assert_eq!(Class::of(&e), Class::ApiError);
        let delays: Vec<_> = (0..20).map(|_| r.after(Class::of(&e))).collect();
        assert!(
            delays
                .iter()
                .all(|d| d.is_some_and(|d| d <= Duration::from_secs(5)))
        );
        assert!(delays[19].is_some_and(|d| d >= Duration::from_millis(2500)));
    }

    #[test]
    fn an_absent_server_is_probed_every_second_at_most_and_reset_on_success() {
        let mut r = Retry::new();
        let mut last = Duration::ZERO;
        for _ in 0..30 {
            last = r.after(Class::Unreachable).unwrap_or_default();
            assert!(last <= Duration::from_secs(1), "{last:?}");
        }
        assert!(last >= Duration::from_millis(500));
        r.reset();
        assert!(r.after(Class::Unreachable).unwrap_or_default() <= Duration::from_millis(250));
    }
}
