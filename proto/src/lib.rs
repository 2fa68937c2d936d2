//! The `meshlite.v1` protocol.
//!
//! - [`v1`]: the wire types generated from `proto/meshlite/v1/mesh.proto` (checked in
//!   under `src/gen/`, kept fresh by `tests/generated.rs`), with the gRPC client.
//! - [`server`]: the generated gRPC server, which sends [`v1::UpdateFrame`]s, with
//!   [`codec::LeanCodec`] (small per-stream buffers).
//! - [`model`]: validated domain types; agents convert wire types at the edge with
//!   `TryFrom` and never handle prost structs past it.
//! - [`patch`]: EndpointSlice patches (diff on the control plane, apply on agents).

/// Generated wire types and client.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    include!("gen/messages/meshlite.v1.rs");
}

/// Generated gRPC server (sends pre-encoded `UpdateFrame`s).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod server {
    include!("gen/server/meshlite.v1.rs");
}

pub mod codec;
pub mod hash;
pub mod model;
pub mod patch;

pub use hash::{InventoryDigest, content_hash};

/// Revision of the `EndpointSlice`, `EndpointPort` and `Endpoint` messages, sent as
/// `Hello.patch_schema`: patches flow only between sides that agree on it. Bump it
/// with any change to those messages (`tests/generated.rs` fails until you do).
pub const PATCH_SCHEMA: u32 = 2;
