//! The meshlite control plane.
//!
//! `source` (kube | file) -> `normalize` -> [`store::Store`] -> `server` (gRPC fan-out).

pub mod manifests;
pub mod normalize;
pub mod store;
