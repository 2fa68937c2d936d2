//! meshlite's end-to-end harness.
//!
//! - [`apiserver`]: the Kubernetes API stand-in (real list/watch protocol over HTTP).
//! - [`procs`]: launching the real binaries and stopping them by PID.
//! - [`otlp`]: a real OTLP/gRPC trace receiver.

pub mod apiserver;
pub mod otlp;
pub mod procs;
