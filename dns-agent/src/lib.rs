//! meshlite DNS agent: subscribes to the control plane's snapshot stream (role DNS),
//! keeps an in-memory zone for the cluster domain, serves it over UDP and TCP and
//! forwards every other name upstream through a cache.
//!
//! - [`zone`]: the pure part: snapshot -> immutable zone -> answers.
//! - [`dns`]: the wire part on hickory (server, handler, forwarder, cache); hickory's
//!   types stay inside it.
//! - [`apply`]: the subscriber [`meshlite_runtime::Handler`] that swaps zones.
//! - [`config`]: flags and environment.
//! - [`metrics`]: Prometheus metrics.

pub mod agent;
pub mod apply;
pub mod config;
pub mod dns;
pub mod fixtures;
pub mod metrics;
pub mod zone;
