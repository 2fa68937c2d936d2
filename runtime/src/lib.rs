//! What every meshlite process shares.
//!
//! - [`snapshot`]: the agent-side view of the stream, indexed for proxies and DNS.
//! - [`subscriber`]: the agent's stream client (Hello, apply, ACK/NACK, resume, backoff).
//! - [`tls`]: PEM loading for the rustls mTLS on every stream.
//! - [`admin`]: the HTTP endpoint for `/metrics`, `/healthz` and `/readyz`.
//! - [`backoff`]: the one jittered exponential backoff.
//! - [`telemetry`]: tracing setup.

pub mod admin;
pub mod backoff;
pub mod snapshot;
pub mod subscriber;
pub mod telemetry;
pub mod tls;

pub use snapshot::{ChangeSet, Snapshot};
pub use subscriber::{
    Applied, ApplyError, Handler, Role, Subscriber, SubscriberConfig, UpdateInfo,
};
