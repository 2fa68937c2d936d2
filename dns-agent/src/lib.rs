//! meshlite DNS agent: subscribes to the control plane's snapshot stream (role DNS),
//! keeps an in-memory zone for the cluster domain, serves it over UDP and TCP and
//! forwards every other name upstream through a cache.
//!
//! - [`zone`]: the pure part: snapshot -> immutable zone -> answers.
//! - [`dns`]: the wire part on hickory (server, handler, forwarder, cache); hickory's
//!   types stay inside it.
//! - [`handler`]: the subscriber [`meshlite_runtime::Handler`] that swaps zones.
//! - [`app`]: the wiring: subscriber, servers, admin endpoint.
//! - [`config`]: flags and environment.
//! - [`metrics`]: Prometheus metrics.

pub mod app;
pub mod config;
pub mod dns;
pub mod fixtures;
pub mod handler;
pub mod metrics;
pub mod zone;
