//! What every meshlite process shares.
//!
//! - [`snapshot`]: the agent-side view of the stream, indexed for proxies and DNS.
//! - [`subscriber`]: the agent's stream client (Hello, apply, ACK/NACK, resume, backoff).
//! - [`tls`]: PEM loading for the rustls mTLS on every stream.
//! - [`admin`]: the HTTP endpoint for `/metrics`, `/healthz` and `/readyz`.
//! - [`backoff`]: the one jittered exponential backoff.
//! - [`telemetry`]: tracing setup.

pub mod snapshot;

pub use snapshot::{ChangeSet, Snapshot};
