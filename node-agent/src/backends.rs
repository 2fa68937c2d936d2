//! Every backend, registered in one place: how `--mode` starts it
//! ([`AnyBackend::start`]), renders a directory of manifests for it ([`render`]),
//! and what `cleanup` removes for it ([`cleanup`]). The sync loop reaches it only
//! through [`Backend`] (`apply`, `check`, `housekeeping`).
//!
//! Adding a backend means one module and one variant here and in
//! [`BackendKind`].

use crate::backend::{Backend, BackendError, Desired, SyncReport};
use crate::cleanup::{self, Report};
use crate::config::{BackendKind, Config, RenderArgs};
use crate::iptables::IptablesBackend;
use crate::ipvs::IpvsBackend;
use crate::netfilter::Runner;
use crate::nftables::{self, NftablesBackend, NftablesConfig};
use crate::preview::{self, Preview, PreviewError};

/// A backend could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("IPVS mode: {0}")]
    Ipvs(#[from] crate::ipvs::Error),
}

/// `render` could not produce its text.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The flags are invalid (exit 64).
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Preview(#[from] PreviewError),
}

/// The backend `--mode` selects.
#[derive(Debug)]
pub enum AnyBackend {
    Iptables(IptablesBackend),
    Ipvs(Box<IpvsBackend>),
    Nftables(NftablesBackend),
}

// === impl AnyBackend ===

impl AnyBackend {
    /// Starts the backend `cfg.backend` names. Touches no rules: nothing changes
    /// before the first snapshot is applied.
    ///
    /// # Errors
    /// The kernel lacks what the backend needs (IPVS: modules, sysctls); the
    /// message names what is missing.
    pub async fn start(cfg: &Config) -> Result<Self, StartError> {
        Ok(match cfg.backend {
            BackendKind::Iptables => Self::Iptables(IptablesBackend::new(cfg.iptables())),
            // Checks the kernel (modules, sysctls) before anything listens, so a node
            // without IPVS fails at once with the missing modules named.
            BackendKind::Ipvs => Self::Ipvs(Box::new(IpvsBackend::start(cfg.ipvs()).await?)),
            BackendKind::Nftables => Self::Nftables(NftablesBackend::new(
                NftablesConfig::from_rules(cfg.iptables()),
            )),
        })
    }
}

impl Backend for AnyBackend {
    async fn apply(&mut self, desired: Desired<'_>) -> Result<SyncReport, BackendError> {
        match self {
            Self::Iptables(b) => b.apply(desired).await,
            Self::Ipvs(b) => b.apply(desired).await,
            Self::Nftables(b) => b.apply(desired).await,
        }
    }

    async fn check(&mut self) -> bool {
        match self {
            Self::Iptables(b) => b.check().await,
            Self::Ipvs(b) => b.check().await,
            Self::Nftables(b) => b.check().await,
        }
    }

    async fn housekeeping(&mut self) {
        match self {
            Self::Iptables(b) => b.housekeeping().await,
            Self::Ipvs(b) => b.housekeeping().await,
            Self::Nftables(b) => b.housekeeping().await,
        }
    }
}

/// `meshlite-node-agent render`: the text a full sync of `args.backend` would
/// write for the manifests in `args.manifests`.
///
/// # Errors
/// [`RenderError::Config`] for invalid flags; [`RenderError::Preview`] when the
/// manifests cannot be loaded or the result would be refused.
pub fn render(args: &RenderArgs) -> Result<Preview, RenderError> {
    args.rules
        .validate()
        .and_then(|()| args.ipvs.validate())
        .map_err(|e| RenderError::Config(e.to_string()))?;
    let family = args.ip_family.into();
    Ok(match args.backend {
        BackendKind::Iptables => {
            let cfg = args.rules.iptables(vec![family], false);
            preview::render_dir(&args.manifests, &args.node_name, family, &cfg)?
        }
        BackendKind::Ipvs => {
            let cfg = args
                .ipvs
                .config(&args.rules, vec![family], false)
                .map_err(|e| RenderError::Config(e.to_string()))?;
            preview::render_dir_ipvs(&args.manifests, &args.node_name, family, &cfg)?
        }
        BackendKind::Nftables => {
            let cfg = NftablesConfig::from_rules(args.rules.iptables(vec![family], false));
            preview::render_dir_nftables(&args.manifests, &args.node_name, family, &cfg)?
        }
    })
}

/// What `cleanup` needs to find what any mode programmed.
#[derive(Debug, Clone)]
pub struct CleanupTarget<'a> {
    pub prefix: &'a str,
    pub ipvs_interface: &'a str,
    pub ipvs_exclude: &'a [ipnet::IpNet],
}

/// Removes what `kind` programmed, appending one line per part to `report`.
pub async fn cleanup(kind: BackendKind, target: &CleanupTarget<'_>, report: &mut Report) {
    match kind {
        // Both iptables-based modes' chains and jumps (the IPVS mode's too).
        BackendKind::Iptables => cleanup::iptables(target.prefix, report).await,
        BackendKind::Ipvs => cleanup::ipvs(target, report).await,
        BackendKind::Nftables => {
            match nftables::cleanup(&Runner::System, nftables::DEFAULT_TABLE).await {
                Ok(lines) => report
                    .lines
                    .extend(lines.into_iter().map(|l| format!("nftables: {l}"))),
                Err(e) => report.errors.push(format!("nftables: {e}")),
            }
        }
    }
}
