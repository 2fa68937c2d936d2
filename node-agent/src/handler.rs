//! The subscriber's handler: each update the stream delivers goes through the
//! [`Proxier`]; rules the kernel refused are reported back in the NACK by key.

use std::sync::Arc;

use meshlite_proto::model::ResourceKey;
use meshlite_runtime::admin::BlockReady;
use meshlite_runtime::{Applied, ApplyError, ChangeSet, Handler, Snapshot, UpdateInfo};
use tracing::info;

use crate::backend::Backend;
use crate::sync::Proxier;

/// The subscriber's handler: applies each update through the [`Proxier`].
pub struct NodeHandler<B> {
    proxier: Arc<Proxier<B>>,
    /// Readiness stays blocked until the first update is applied.
    ready: Option<BlockReady>,
}

// === impl NodeHandler ===

impl<B: Backend> NodeHandler<B> {
    pub fn new(proxier: Arc<Proxier<B>>, ready: Option<BlockReady>) -> Self {
        Self { proxier, ready }
    }
}

impl<B: Backend> Handler for NodeHandler<B> {
    async fn apply(
        &mut self,
        snapshot: &Snapshot,
        changes: &ChangeSet,
        info: &UpdateInfo,
    ) -> Result<Applied, ApplyError> {
        let report = self
            .proxier
            .update(snapshot, changes)
            .await
            .map_err(|e| ApplyError(e.to_string()))?;
        if let Some(ready) = self.ready.take() {
            info!(version = info.version, "first snapshot applied; ready");
            ready.release();
        }
        // The NACK names each rejected Service once, with its ports' reasons.
        let mut rejected: std::collections::BTreeMap<ResourceKey, Vec<String>> =
            std::collections::BTreeMap::new();
        for r in &report.rejected {
            let key = ResourceKey::Service {
                namespace: r.service.service.namespace.clone(),
                name: r.service.service.name.clone(),
            };
            rejected
                .entry(key)
                .or_default()
                .push(format!("{} {}: {}", r.family, r.service, r.message));
        }
        Ok(Applied {
            rules_changed: report.rules_written,
            rejected: rejected
                .into_iter()
                .map(|(k, reasons)| format!("{k}: {}", reasons.join("; ")))
                .collect(),
        })
    }
}
