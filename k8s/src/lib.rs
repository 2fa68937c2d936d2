//! meshlite's Kubernetes edge: Services, EndpointSlices and Nodes, as the API
//! serves them or as manifest files hold them, normalized into the validated model
//! that the stream carries (`meshlite_proto::model`).
//!
//! Everything that reads Kubernetes objects goes through here: the control plane's
//! watchers and its file source, the node agent's `render`, and the test API
//! stand-in. Each kind's Kubernetes identity (`apiVersion`, `kind`) and its stream
//! key are [`ResourceKind`]'s; how an object of a kind is read is [`KubeObject`]'s.

use std::fmt::Debug;
use std::time::SystemTime;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::DeserializeOwned;

pub use meshlite_proto::model::{Resource, ResourceKey, ResourceKind};

pub mod manifests;
pub mod normalize;

pub use normalize::{Invalid, Normalized, Options};

/// A Kubernetes object type meshlite reads: one per [`ResourceKind`].
pub trait KubeObject:
    k8s_openapi::Metadata<Ty = ObjectMeta> + DeserializeOwned + Clone + Debug + Send + Sync + 'static
{
    const RESOURCE_KIND: ResourceKind;

    /// The resource agents get, and the parts of the object that were dropped.
    ///
    /// # Errors
    /// The object cannot be used at all (see [`normalize`]).
    fn normalize(&self, opts: &Options) -> Result<Normalized<Resource>, Invalid>;

    /// When the change that produced this object was triggered, when the object
    /// says (EndpointSlices' `endpoints.kubernetes.io/last-change-trigger-time`).
    fn trigger_time(&self) -> Option<SystemTime> {
        None
    }
}

/// The key an object has, whether or not it normalizes (to keep the last good
/// state of an object that became invalid). `None` without a name.
pub fn key_of<K: KubeObject>(obj: &K) -> Option<ResourceKey> {
    key_from_meta(K::RESOURCE_KIND, obj.metadata())
}

/// The key of an object of `kind` with this metadata.
pub fn key_from_meta(kind: ResourceKind, meta: &ObjectMeta) -> Option<ResourceKey> {
    let name = meta.name.as_deref().filter(|n| !n.is_empty())?;
    Some(kind.key(normalize::namespace_or_default(meta), name))
}

// === impl KubeObject ===

impl KubeObject for core::Service {
    const RESOURCE_KIND: ResourceKind = ResourceKind::Service;

    fn normalize(&self, opts: &Options) -> Result<Normalized<Resource>, Invalid> {
        normalize::service(self, opts).map(|n| n.map(Resource::Service))
    }
}

impl KubeObject for discovery::EndpointSlice {
    const RESOURCE_KIND: ResourceKind = ResourceKind::EndpointSlice;

    fn normalize(&self, opts: &Options) -> Result<Normalized<Resource>, Invalid> {
        normalize::endpoint_slice(self, opts).map(|n| n.map(Resource::EndpointSlice))
    }

    fn trigger_time(&self) -> Option<SystemTime> {
        normalize::trigger_time(&self.metadata)
    }
}

impl KubeObject for core::Node {
    const RESOURCE_KIND: ResourceKind = ResourceKind::Node;

    fn normalize(&self, _opts: &Options) -> Result<Normalized<Resource>, Invalid> {
        normalize::node(self).map(|n| n.map(Resource::Node))
    }
}
