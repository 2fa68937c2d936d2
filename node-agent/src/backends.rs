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

/// The backend `--mode` selects, and what other modes may have left on the node.
#[derive(Debug)]
pub struct AnyBackend {
    inner: Inner,
    /// Removed after the first sync that succeeds, then `None`.
    leftovers: Option<Leftovers>,
}

#[derive(Debug)]
enum Inner {
    Iptables(IptablesBackend),
    Ipvs(Box<IpvsBackend>),
    Nftables(NftablesBackend),
}

/// Another mode's rules, as kube-proxy removes them when it starts: the nftables
/// mode removes what the iptables-based modes (iptables, IPVS) programmed, and
/// those remove the nftables table. Between iptables and IPVS nothing is removed
/// (they share chains), as in kube-proxy. Unlike kube-proxy, which does it before
/// its first sync, the agent does it after its own rules are in place, so a node
/// switching modes is never without service rules.
#[derive(Debug)]
struct Leftovers {
    kinds: Vec<BackendKind>,
    prefix: String,
    ipvs_interface: String,
    ipvs_exclude: Vec<ipnet::IpNet>,
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
        let inner = match cfg.backend {
            BackendKind::Iptables => Inner::Iptables(IptablesBackend::new(cfg.iptables())),
            // Checks the kernel (modules, sysctls) before anything listens, so a node
            // without IPVS fails at once with the missing modules named.
            BackendKind::Ipvs => Inner::Ipvs(Box::new(IpvsBackend::start(cfg.ipvs()).await?)),
            BackendKind::Nftables => Inner::Nftables(NftablesBackend::new(
                NftablesConfig::from_rules(cfg.iptables()),
            )),
        };
        Ok(Self {
            inner,
            leftovers: Some(Leftovers {
                kinds: other_modes(cfg.backend),
                prefix: cfg.chain_prefix.clone(),
                ipvs_interface: cfg.ipvs_interface.clone(),
                ipvs_exclude: cfg.ipvs_exclude_cidrs.clone(),
            }),
        })
    }

    /// Removes the other modes' leftovers (see [`Leftovers`]); a failure is
    /// logged and not retried (`meshlite-node-agent cleanup` does it by hand).
    async fn remove_leftovers(&mut self) {
        let Some(l) = self.leftovers.take() else {
            return;
        };
        let report = cleanup::of(&l.kinds, &l.prefix, &l.ipvs_interface, &l.ipvs_exclude).await;
        for line in &report.lines {
            tracing::info!("other modes' leftovers: {line}");
        }
        for e in &report.errors {
            tracing::warn!(
                "other modes' leftovers not removed: {e}; `meshlite-node-agent cleanup` with the agent stopped removes them"
            );
        }
    }
}

/// The modes whose rules a node running `mode` removes when it starts.
pub fn other_modes(mode: BackendKind) -> Vec<BackendKind> {
    match mode {
        BackendKind::Nftables => vec![BackendKind::Iptables, BackendKind::Ipvs],
        BackendKind::Iptables | BackendKind::Ipvs => vec![BackendKind::Nftables],
    }
}

impl Backend for AnyBackend {
    async fn apply(&mut self, desired: Desired<'_>) -> Result<SyncReport, BackendError> {
        let report = match &mut self.inner {
            Inner::Iptables(b) => b.apply(desired).await,
            Inner::Ipvs(b) => b.apply(desired).await,
            Inner::Nftables(b) => b.apply(desired).await,
        }?;
        self.remove_leftovers().await;
        Ok(report)
    }

    async fn check(&mut self) -> bool {
        match &mut self.inner {
            Inner::Iptables(b) => b.check().await,
            Inner::Ipvs(b) => b.check().await,
            Inner::Nftables(b) => b.check().await,
        }
    }

    async fn housekeeping(&mut self) {
        match &mut self.inner {
            Inner::Iptables(b) => b.housekeeping().await,
            Inner::Ipvs(b) => b.housekeeping().await,
            Inner::Nftables(b) => b.housekeeping().await,
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
