//! meshlite's end-to-end harness.
//!
//! - [`apiserver`]: the Kubernetes API stand-in (real list/watch protocol over HTTP).
//! - [`procs`]: launching the real binaries and stopping them by PID.
//! - [`otlp`]: a real OTLP/gRPC trace receiver.
//! - [`netns`]: network namespaces, veth links, identity HTTP servers and clients.
//! - [`cluster`]: a two-node cluster in namespaces; [`stack`]: meshlite's processes in it.
//! - [`lab`]: the whole-system lab of the end-to-end and fault suites.
//! - [`demo`]: the seed demo (`cargo run --release --bin demo`).
//! - [`dashboard`]: checks the chart's Grafana dashboards against scraped `/metrics`.
//! - [`scale`]: the large-cluster scale harness behind the `scale` binary.

pub mod apiserver;
pub mod cluster;
pub mod dashboard;
pub mod demo;
pub mod front;
pub mod lab;
/// Network namespaces with their own tokio runtimes (shared with the node agent's
/// kernel tests, so it lives in `meshlite-runtime`'s `testing` feature).
pub use meshlite_runtime::testing::netns;
pub mod otlp;
pub mod procs;
pub mod scale;
pub mod stack;
