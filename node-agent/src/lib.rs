//! meshlite node agent.
//!
//! Subscribes to the control plane as its node, builds the [`proxy`] view (endpoint
//! selection exactly as kube-proxy does it), renders it for a backend ([`iptables`]
//! or [`ipvs`])
//! and applies it to the kernel, returning to the subscriber only once the rules are
//! in effect, so the ACK means "applied".

pub mod app;
pub mod backend;
pub mod backends;
pub mod cleanup;
pub mod config;
pub mod explain;
pub mod handler;
pub mod health;
pub mod iptables;
pub mod ipvs;
pub mod local;
pub mod metrics;
pub mod netfilter;
pub mod nftables;
pub mod preview;
/// The proxy view and endpoint selection live in `meshlite-proxy`, shared with the
/// control plane (its `explain`); re-exported so `crate::proxy::...` paths keep working.
pub use meshlite_proxy as proxy;
pub mod sync;
