//! `meshlite-node-agent render`: the exact `iptables-restore` input for a directory
//! of manifests, as a full sync on a node with no previous rules would write it.

use std::path::{Path, PathBuf};

use meshlite_runtime::Snapshot;

use crate::iptables::{IptablesConfig, render, render::RenderConfig};
use crate::proxy::{IpFamily, ProxyView};

/// Manifests that cannot be loaded.
#[derive(Debug, thiserror::Error)]
#[error("manifests {dir}: {reason}")]
pub struct PreviewError {
    pub dir: PathBuf,
    pub reason: String,
}

/// The rendered text and the loader's warnings (objects it skipped).
#[derive(Debug, Clone)]
pub struct Preview {
    pub text: String,
    pub warnings: Vec<String>,
}

/// Renders the manifests in `dir` for `node_name`.
pub fn render_dir(
    dir: &Path,
    node_name: &str,
    family: IpFamily,
    cfg: &IptablesConfig,
) -> Result<Preview, PreviewError> {
    let manifests = meshlite_control_plane::manifests::load_dir(dir).map_err(|e| PreviewError {
        dir: dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    let snapshot = Snapshot::from_resources(manifests.resources());
    let view = ProxyView::build(&snapshot, node_name, family);
    Ok(Preview {
        text: render(&view, &render_config(cfg, &view)).full_text(&[]),
        warnings: manifests.warnings,
    })
}

fn render_config(cfg: &IptablesConfig, view: &ProxyView) -> RenderConfig {
    crate::iptables::IptablesBackend::new(cfg.clone()).render_config(view)
}
