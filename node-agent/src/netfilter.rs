//! What every backend shares to reach netfilter.
//!
//! - [`runner`]: the one way external tools (`iptables-restore`, `ipset`,
//!   `conntrack`, `nft`) are run, with a recording fake for tests.
//! - [`conntrack`]: stale UDP conntrack entries, computed purely and deleted with
//!   the `conntrack` tool.
//! - [`jumps`]: the jumps from the built-in iptables chains to ours.

pub mod conntrack;
pub mod jumps;
pub mod runner;

pub use runner::{Call, FakeRunner, Runner, ToolOutput};

/// An external tool failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{command}: could not run: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
}
