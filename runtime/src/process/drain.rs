//! Graceful shutdown: one [`DrainTrigger`] starts a drain that any number of
//! [`DrainWatcher`]s observe (servers stop accepting, loops stop, agents keep the
//! rules they applied).

use tokio::sync::watch;

/// Starts the drain (on SIGINT/SIGTERM, or in tests).
#[derive(Debug)]
pub struct DrainTrigger(watch::Sender<bool>);

/// Waits for the drain. Cheap to clone.
#[derive(Debug, Clone)]
pub struct DrainWatcher(watch::Receiver<bool>);

/// A trigger and its first watcher.
pub fn new() -> (DrainTrigger, DrainWatcher) {
    let (tx, rx) = watch::channel(false);
    (DrainTrigger(tx), DrainWatcher(rx))
}

impl DrainTrigger {
    /// Starts the drain; every watcher's [`DrainWatcher::wait`] resolves.
    pub fn drain(&self) {
        self.0.send_replace(true);
    }
}

impl DrainWatcher {
    /// Resolves once the drain has started (at once if it already has). A dropped
    /// trigger never drains: it only waits forever.
    pub async fn wait(mut self) {
        if self.0.wait_for(|d| *d).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// A watcher that never drains, for tests and embedded use.
    pub fn never() -> Self {
        // Its trigger is gone at once, so nothing can ever start its drain.
        let (_, rx) = watch::channel(false);
        Self(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_watcher_sees_the_drain_and_late_ones_too() {
        let (trigger, w) = new();
        let early = tokio::spawn(w.clone().wait());
        tokio::task::yield_now().await;
        assert!(!early.is_finished());
        trigger.drain();
        early.await.unwrap();
        w.wait().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_watcher_that_never_drains_waits() {
        let r = tokio::time::timeout(
            std::time::Duration::from_secs(60),
            DrainWatcher::never().wait(),
        )
        .await;
        assert!(r.is_err());
    }
}
