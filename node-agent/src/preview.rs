//! `meshlite-node-agent render`: what a full sync on a node with nothing programmed
//! would write for a directory of manifests: the exact `iptables-restore` input
//! (iptables mode), or the IPVS table in `ipvsadm -Ln` form, the dummy interface's
//! addresses, the ipset members and the iptables rules (IPVS mode).

use std::path::{Path, PathBuf};

use meshlite_runtime::Snapshot;

use crate::iptables::{IptablesConfig, render, render::RenderConfig};
use crate::ipvs::{IpvsConfig, show};
use crate::proxy::{IpFamily, ProxyView};

/// Manifests that cannot be loaded, or rules that cannot be rendered.
#[derive(Debug, thiserror::Error)]
pub enum PreviewError {
    #[error(transparent)]
    Manifests(#[from] meshlite_k8s::manifests::ManifestError),
    #[error("manifests {dir}: {reason}")]
    Rules { dir: PathBuf, reason: String },
}

/// The rendered text and the loader's warnings (objects it skipped).
#[derive(Debug, Clone)]
pub struct Preview {
    pub text: String,
    pub warnings: Vec<String>,
}

/// Loads a directory of manifests into a snapshot, as `render` and `explain` do.
pub fn load(dir: &Path) -> Result<(Snapshot, Vec<String>), PreviewError> {
    let manifests = meshlite_k8s::manifests::load_dir(dir, &Default::default())?;
    Ok((
        Snapshot::from_resources(manifests.resources()),
        manifests.warnings,
    ))
}

/// IPVS mode: the plan for `node_name` in text (see [`show::full`]). NodePort
/// virtual servers are on `--node-ip` (else the Node object's addresses), where the
/// agent uses the node's interface addresses; restrict both with
/// `--nodeport-addresses` to compare.
pub fn render_dir_ipvs(
    dir: &Path,
    node_name: &str,
    family: IpFamily,
    cfg: &IpvsConfig,
) -> Result<Preview, PreviewError> {
    let (snapshot, mut warnings) = load(dir)?;
    let view = ProxyView::build(&snapshot, node_name, family);
    let plan = cfg.plan_without_kernel(&[view]);
    warnings.extend(plan.warnings.iter().cloned());
    Ok(Preview {
        text: show::full(&plan, &cfg.interface),
        warnings,
    })
}

/// Renders the manifests in `dir` for `node_name`.
pub fn render_dir(
    dir: &Path,
    node_name: &str,
    family: IpFamily,
    cfg: &IptablesConfig,
) -> Result<Preview, PreviewError> {
    let (snapshot, warnings) = load(dir)?;
    let view = ProxyView::build(&snapshot, node_name, family);
    let rs = render(&view, &render_config(cfg, &view));
    // Whatever the build, never print an input `iptables-restore` would refuse.
    rs.check().map_err(|e| PreviewError::Rules {
        dir: dir.to_path_buf(),
        reason: format!("{family}: {e}"),
    })?;
    Ok(Preview {
        text: rs.full_text(&[]),
        warnings,
    })
}

/// nftables mode: the `nft -f` transaction a first sync writes (no stale chains).
pub fn render_dir_nftables(
    dir: &Path,
    node_name: &str,
    family: IpFamily,
    cfg: &crate::nftables::NftablesConfig,
) -> Result<Preview, PreviewError> {
    let (snapshot, warnings) = load(dir)?;
    let view = ProxyView::build(&snapshot, node_name, family);
    let rcfg = cfg.render_config(&view);
    let rs = crate::nftables::render::render(&view, &rcfg);
    Ok(Preview {
        text: crate::nftables::script::full(family, &rcfg, &rs, &[]).text,
        warnings,
    })
}

fn render_config(cfg: &IptablesConfig, view: &ProxyView) -> RenderConfig {
    crate::iptables::IptablesBackend::new(cfg.clone()).render_config(view)
}
