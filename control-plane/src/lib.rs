//! The meshlite control plane.
//!
//! ```text
//! source (kube | file) -> normalize -> store (key -> encoded resource, hash, seq)
//!                                        |  publisher (debounce)
//!                                        v
//!                       server: one stream per agent, O(1) state each, deltas cut from the store
//! ```

pub mod app;
pub mod config;
pub mod explain;
pub mod metrics;
pub mod server;
pub mod source;
pub mod status;
pub mod store;

pub use app::{Error, Handle, start, start_with};
