//! What every meshlite process shares.
//!
//! - [`snapshot`]: the agent-side view of the stream, indexed for proxies and DNS.
//! - [`subscriber`]: the agent's stream client (Hello, apply, ACK/NACK, resume, backoff).
//! - [`tls`]: PEM loading for the rustls mTLS on every stream.
//! - [`admin`]: the HTTP endpoint for `/metrics`, `/healthz` and `/readyz`.
//! - [`backoff`]: the one jittered exponential backoff.
//! - [`telemetry`]: tracing setup.
//! - [`process`]: each binary's start-up, shared flags, drain and exit codes.

pub mod admin;
pub mod backoff;
pub mod process;
pub mod snapshot;
pub mod subscriber;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tls;

pub use snapshot::{ChangeSet, Snapshot};
pub use subscriber::{
    Applied, ApplyError, Handler, Role, Subscriber, SubscriberConfig, UpdateInfo,
};

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
    tracing::info!("shutdown signal received");
}
