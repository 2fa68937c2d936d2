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
pub mod health;
pub mod iptables;
pub mod ipvs;
pub mod local;
pub mod metrics;
pub mod netfilter;
pub mod nftables;
pub mod preview;
pub mod proxy;
pub mod sync;
