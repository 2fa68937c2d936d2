//! The nftables backend: kube-proxy's nftables mode.
//!
//! - [`render`]: view -> the per-service chains and the set and map elements of
//!   kube-proxy's table layout, pure.
//! - [`script`]: those objects -> `nft -f` transactions, pure: the whole table, or
//!   only what changed since the last sync.
//! - [`NftablesBackend`]: the kernel side. One atomic `nft -f -` transaction per
//!   family and sync. What was written is kept in memory, so a sync writes only
//!   the chains and elements that changed and never re-lists the table. After a
//!   restart the first sync is full (everything rewritten in one transaction; the
//!   table is never flushed), and the chain names are read once to flush the ones
//!   no longer wanted. Chains are flushed at once and deleted on a later sync, as
//!   kube-proxy does (kernels before 6.2 are slow to notice unreferenced chains).
//!   The canary checks the dispatch rule of the `services` chain, so an external
//!   `nft flush table` is repaired on the next check.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use ipnet::IpNet;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::backend::{Backend, BackendError, Desired, SyncReport, TableRules};
use crate::local::DetectLocalMode;
use crate::netfilter::{Runner, conntrack};
use crate::proxy::{IpFamily, ProxyView, ServicePortName};

pub mod digest;
pub mod netlink;
pub mod render;
pub mod script;
pub mod state;

pub use render::{RenderConfig, Ruleset};
pub use state::{Changes, Written};

/// kube-proxy's table name.
pub const DEFAULT_TABLE: &str = "kube-proxy";

/// How long a flushed chain waits before it is deleted.
const STALE_CHAIN_DELAY: Duration = Duration::from_secs(15);

/// Configuration of the nftables backend.
#[derive(Debug, Clone)]
pub struct NftablesConfig {
    /// Table name in each family (`kube-proxy`).
    pub table: String,
    pub families: Vec<IpFamily>,
    /// At most one per family.
    pub cluster_cidrs: Vec<IpNet>,
    pub detect_local: DetectLocalMode,
    pub masquerade_all: bool,
    pub masquerade_bit: u8,
    /// The node's IPs; the first of each family is its primary IP. When empty, the
    /// Node object's addresses are used.
    pub node_ips: Vec<IpAddr>,
    /// `--nodeport-addresses`; empty: NodePorts on the node's primary IPs (the
    /// nftables mode's default in kube-proxy).
    pub nodeport_addresses: Vec<IpNet>,
    pub conntrack_cleanup: bool,
}

#[derive(Debug, Default)]
struct FamilyState {
    written: Option<Written>,
    udp: BTreeMap<ServicePortName, conntrack::UdpPort>,
    /// Flushed chains and when.
    stale: BTreeMap<String, Instant>,
}

/// How many transactions went which way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WrittenBy {
    pub netlink: u64,
    pub nft: u64,
}

/// The nftables [`Backend`].
#[derive(Debug)]
pub struct NftablesBackend {
    cfg: NftablesConfig,
    runner: Runner,
    /// Incremental syncs go over netlink (off with a fake runner).
    netlink: bool,
    /// Transactions written as netlink batches and with `nft -f`.
    written_by: WrittenBy,
    /// The canary found the table changed behind our back: the next full sync
    /// trusts no digest and rewrites everything.
    distrust: bool,
    families: BTreeMap<IpFamily, FamilyState>,
}

// === impl NftablesConfig ===

impl NftablesConfig {
    /// The nftables mode takes the iptables mode's rule flags; the table is
    /// kube-proxy's.
    pub fn from_rules(c: crate::iptables::IptablesConfig) -> Self {
        Self {
            table: DEFAULT_TABLE.to_string(),
            families: c.families,
            cluster_cidrs: c.cluster_cidrs,
            detect_local: c.detect_local,
            masquerade_all: c.masquerade_all,
            masquerade_bit: c.masquerade_bit,
            node_ips: c.node_ips,
            nodeport_addresses: c.nodeport_addresses,
            conntrack_cleanup: c.conntrack_cleanup,
        }
    }

    /// The render configuration for one view.
    pub fn render_config(&self, view: &ProxyView) -> RenderConfig {
        let family = view.family;
        let node_ips: Vec<IpAddr> = {
            let configured: Vec<IpAddr> = self
                .node_ips
                .iter()
                .filter(|ip| family.matches(ip))
                .copied()
                .collect();
            if configured.is_empty() {
                view.node_ips.clone()
            } else {
                configured
            }
        };
        let nodeport_ips: Vec<IpAddr> = if self.nodeport_addresses.is_empty() {
            node_ips.first().copied().into_iter().collect()
        } else {
            node_ips
                .iter()
                .filter(|ip| self.nodeport_addresses.iter().any(|n| n.contains(*ip)))
                .copied()
                .collect()
        };
        RenderConfig {
            table: self.table.clone(),
            local: self.detect_local.detector(
                self.cluster_cidrs
                    .iter()
                    .find(|c| family.matches_net(c))
                    .copied(),
                view.node_pod_cidrs
                    .iter()
                    .find(|c| family.matches_net(c))
                    .copied(),
            ),
            masquerade_all: self.masquerade_all,
            masquerade_mark: 1 << self.masquerade_bit,
            service_cidrs: Vec::new(),
            nodeport_ips: nodeport_ips
                .into_iter()
                .filter(|ip| !ip.is_loopback())
                .collect(),
        }
    }
}

// === impl NftablesBackend ===

impl NftablesBackend {
    pub fn new(cfg: NftablesConfig) -> Self {
        let families = cfg
            .families
            .iter()
            .map(|f| (*f, FamilyState::default()))
            .collect();
        Self {
            cfg,
            runner: Runner::System,
            netlink: true,
            written_by: WrittenBy::default(),
            distrust: false,
            families,
        }
    }

    /// Runs `nft` through `runner` (a fake in tests).
    pub fn with_runner(mut self, runner: Runner) -> Self {
        self.netlink = matches!(runner, Runner::System);
        self.runner = runner;
        self
    }

    /// How many transactions were written as netlink batches and with `nft -f`.
    pub fn written_by(&self) -> WrittenBy {
        self.written_by
    }

    /// Writes every transaction with `nft -f` (for comparisons).
    pub fn without_netlink(mut self) -> Self {
        self.netlink = false;
        self
    }

    async fn nft(&self, text: &str) -> Result<(), String> {
        self.runner
            .output("nft", &["-f", "-"], Some(text))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Our chains in the kernel (read once, after a restart).
    async fn kernel_chains(&self, family: IpFamily) -> Result<BTreeSet<String>, String> {
        let f = render::family_name(family);
        let out = self
            .runner
            .run("nft", &["list", "chains", f], None)
            .await
            .map_err(|e| e.to_string())?;
        if !out.success {
            return Ok(BTreeSet::new());
        }
        let mut ours = false;
        let mut chains = BTreeSet::new();
        for line in out.stdout.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("table ") {
                ours = rest.trim_end_matches(" {").trim() == format!("{f} {}", self.cfg.table);
            } else if ours && let Some(rest) = line.strip_prefix("chain ") {
                chains.insert(rest.trim_end_matches(" {").trim().to_string());
            }
        }
        Ok(chains)
    }

    /// The digests in our table (see [`digest`]); none when the table or the
    /// set is absent.
    async fn kernel_digests(&self, family: IpFamily) -> Result<BTreeSet<Ipv6Addr>, String> {
        let f = render::family_name(family);
        let out = self
            .runner
            .run(
                "nft",
                &["-j", "list", "set", f, &self.cfg.table, digest::DIGESTS],
                None,
            )
            .await
            .map_err(|e| e.to_string())?;
        if !out.success {
            return Ok(BTreeSet::new());
        }
        let json: serde_json::Value =
            serde_json::from_str(&out.stdout).map_err(|e| format!("nft -j list set: {e}"))?;
        let mut digests = BTreeSet::new();
        for item in json["nftables"].as_array().into_iter().flatten() {
            for e in item["set"]["elem"].as_array().into_iter().flatten() {
                if let Some(d) = e.as_str().and_then(|s| s.parse().ok()) {
                    digests.insert(d);
                }
            }
        }
        Ok(digests)
    }

    async fn apply_family(
        &mut self,
        view: &ProxyView,
        want_full: bool,
    ) -> Result<SyncReport, BackendError> {
        let family = view.family;
        let rcfg = self.cfg.render_config(view);
        let kept = self
            .families
            .get_mut(&family)
            .and_then(|s| s.written.take());
        let restart = kept.is_none();
        let full = want_full || restart;
        let kept = match kept {
            // A resync with the state in memory: when the view is unchanged and
            // the kernel's chain names and digests are exactly what was written,
            // there is nothing to render or write.
            Some(mut w) if want_full && !self.distrust => {
                if w.update(view, &rcfg).is_empty() {
                    let kernel = script::Kernel {
                        chains: self
                            .kernel_chains(family)
                            .await
                            .map_err(|m| fail("list", m))?,
                        digests: self
                            .kernel_digests(family)
                            .await
                            .map_err(|m| fail("list", m))?,
                    };
                    let base = digest::base(&render::base_script(family, &rcfg));
                    let pending: BTreeSet<String> = self
                        .families
                        .get(&family)
                        .map(|s| s.stale.keys().cloned().collect())
                        .unwrap_or_default();
                    if w.in_kernel(&kernel, &base, &pending) {
                        debug!(%family, "nft resync: the kernel holds what was written");
                        self.families.entry(family).or_default().written = Some(w);
                        return Ok(SyncReport {
                            full: true,
                            ..SyncReport::default()
                        });
                    }
                }
                None
            }
            other => other,
        };
        let (written, tx, changes) = if full {
            // Read what the kernel holds (chain names and digests, not the
            // rules) and rewrite only what differs.
            let kernel = script::Kernel {
                chains: self
                    .kernel_chains(family)
                    .await
                    .map_err(|m| fail("list", m))?,
                digests: if self.distrust {
                    BTreeSet::new()
                } else {
                    self.kernel_digests(family)
                        .await
                        .map_err(|m| fail("list", m))?
                },
            };
            let mut w = Written::new(family);
            let _ = w.update(view, &rcfg);
            let rs = w.ruleset();
            let rules: usize = rs.chains.values().map(Vec::len).sum();
            let v = script::verified(family, &rcfg, &rs, &kernel);
            let tx = script::verify_text(family, &rcfg, &v);
            debug!(%family, rules, bytes = tx.text.len(), chains = tx.chains_written, "nft verifying transaction");
            (w, tx, v)
        } else {
            let mut w = kept.unwrap_or_else(|| Written::new(family));
            let changes = w.update(view, &rcfg);
            let tx = script::changes(family, &rcfg, &changes);
            let v = script::Verified {
                base: String::new(),
                changes,
            };
            (w, tx, v)
        };
        if !tx.text.is_empty() {
            self.write(family, &tx, &changes).await?;
        }
        let now = Instant::now();
        let state = self.families.entry(family).or_default();
        for c in &tx.flushed {
            state.stale.entry(c.clone()).or_insert(now);
        }
        // A chain wanted again is no longer stale.
        if full {
            let wanted = written.chain_names();
            state.stale.retain(|c, _| !wanted.contains(c));
        } else {
            for (name, _) in &changes.changes.chains {
                state.stale.remove(name);
            }
        }
        let mut deleted = 0;
        if self.cfg.conntrack_cleanup {
            let udp = conntrack::udp_ports(view);
            for job in conntrack::stale((!restart).then_some(&state.udp), &udp) {
                match conntrack::delete(&self.runner, family, &job).await {
                    Ok(n) => deleted += n,
                    Err(e) => warn!(%family, error = %e, "conntrack cleanup failed"),
                }
            }
            state.udp = udp;
        }
        state.written = Some(written);
        Ok(SyncReport {
            full,
            rules_written: (tx.chains_written + tx.elements_written) as u64,
            // kube-proxy has no rule-count metric for this mode; `rules` is logged.
            tables: Vec::new(),
            conntrack_deleted: deleted,
            rejected: Vec::new(),
        })
    }

    /// Writes one sync: as a netlink batch when every rule in it compiles (no
    /// `nft` process, no cache read), else as `tx` through `nft -f`. A
    /// verifying sync that must also rewrite the fixed part (a new table, a
    /// changed node configuration) writes that part first through `nft -f`, in
    /// a transaction of its own: the fixed part is not compiled here.
    async fn write(
        &mut self,
        family: IpFamily,
        tx: &script::Transaction,
        v: &script::Verified,
    ) -> Result<(), BackendError> {
        debug!(%family, bytes = tx.text.len(), chains = tx.chains_written, elements = tx.elements_written, "nft transaction");
        if self.netlink {
            match netlink::encode(family, &self.cfg.table, &v.changes) {
                Ok(batch) => {
                    let base = if v.base.is_empty() {
                        Ok(())
                    } else {
                        self.nft(&v.base).await
                    };
                    match base.map(|()| send_blocking(&batch)) {
                        Ok(Ok(())) => {
                            self.written_by.netlink += 1;
                            return Ok(());
                        }
                        // `nft` reports the same refusal with the rule's text.
                        Ok(Err(e)) => {
                            debug!(%family, error = %e, "netlink batch refused; retrying with nft")
                        }
                        Err(e) => debug!(%family, error = %e, "fixed part refused; retrying whole"),
                    }
                }
                Err(e) => debug!(%family, reason = %e.0, "change written with nft"),
            }
        }
        self.written_by.nft += 1;
        self.nft(&tx.text).await.map_err(|m| fail("transaction", m))
    }

    /// Deletes chains flushed at least [`STALE_CHAIN_DELAY`] ago, and affinity
    /// sets no longer used.
    async fn delete_stale(&mut self) {
        let now = Instant::now();
        for family in self.cfg.families.clone() {
            let Some(state) = self.families.get(&family) else {
                continue;
            };
            let due: Vec<String> = state
                .stale
                .iter()
                .filter(|(_, at)| now.duration_since(**at) >= STALE_CHAIN_DELAY)
                .map(|(c, _)| c.clone())
                .collect();
            if due.is_empty() {
                continue;
            }
            let sets: Vec<String> = due
                .iter()
                .filter_map(|c| c.strip_prefix("endpoint-"))
                .map(|rest| format!("affinity-{rest}"))
                .collect();
            let table = RenderConfig {
                table: self.cfg.table.clone(),
                local: Default::default(),
                masquerade_all: false,
                masquerade_mark: 0,
                service_cidrs: Vec::new(),
                nodeport_ips: Vec::new(),
            };
            // Affinity sets may not exist (endpoint chains without affinity are not
            // written): delete them one transaction each, ignoring absence.
            let text = script::delete(family, &table, &due, &[]);
            match self.nft(&text).await {
                Ok(()) => {
                    info!(%family, chains = due.len(), "stale chains deleted");
                    for s in &sets {
                        let t = script::delete(family, &table, &[], std::slice::from_ref(s));
                        let _ = self.nft(&t).await;
                    }
                    if let Some(state) = self.families.get_mut(&family) {
                        for c in &due {
                            state.stale.remove(c);
                        }
                    }
                }
                Err(e) => warn!(%family, error = %e, "deleting stale chains failed"),
            }
        }
    }
}

/// Sends a batch from this thread (its network namespace is the one written).
/// A full sync's batch keeps the kernel busy for about a second at 10k services;
/// on a multi-threaded runtime the thread's other tasks move elsewhere meanwhile.
fn send_blocking(batch: &netlink::Batch) -> Result<(), netlink::SendError> {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => {
            tokio::task::block_in_place(|| batch.send())
        }
        _ => batch.send(),
    }
}

fn fail(stage: &'static str, message: String) -> BackendError {
    BackendError {
        backend: "nftables",
        stage,
        message,
    }
}

impl Backend for NftablesBackend {
    async fn apply(&mut self, desired: Desired<'_>) -> Result<SyncReport, BackendError> {
        let mut total = SyncReport {
            full: true,
            ..SyncReport::default()
        };
        for family in self.cfg.families.clone() {
            let Some(view) = desired.views.iter().find(|v| v.family == family) else {
                continue;
            };
            let r = match self.apply_family(view, desired.full).await {
                Ok(r) => r,
                Err(e) => {
                    // Unknown kernel state: the next sync rewrites everything.
                    if let Some(s) = self.families.get_mut(&family) {
                        s.written = None;
                    }
                    return Err(e);
                }
            };
            total.full &= r.full;
            total.rules_written += r.rules_written;
            TableRules::add(&mut total.tables, &r.tables);
            total.conntrack_deleted += r.conntrack_deleted;
        }
        if total.full {
            self.distrust = false;
        }
        Ok(total)
    }

    async fn check(&mut self) -> bool {
        for family in self.cfg.families.clone() {
            if self
                .families
                .get(&family)
                .is_none_or(|s| s.written.is_none())
            {
                continue;
            }
            let f = render::family_name(family);
            let ok = match self
                .runner
                .run(
                    "nft",
                    &["list", "chain", f, &self.cfg.table, "services"],
                    None,
                )
                .await
            {
                Ok(out) => out.success && out.stdout.contains("@service-ips"),
                Err(_) => false,
            };
            if !ok {
                info!(%family, "nftables canary missing: the table was changed externally; scheduling a full rewrite");
                self.distrust = true;
                return false;
            }
        }
        true
    }

    async fn housekeeping(&mut self) {
        self.delete_stale().await;
    }
}

/// Removes our table in both families. Returns one line per family.
///
/// # Errors
/// `nft` fails for a reason other than the table being absent.
pub async fn cleanup(runner: &Runner, table: &str) -> Result<Vec<String>, String> {
    let mut lines = Vec::new();
    for f in ["ip", "ip6"] {
        let out = match runner.run("nft", &["list", "table", f, table], None).await {
            Ok(out) => out,
            Err(crate::netfilter::Error::Spawn { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                return Ok(vec!["nft not installed, skipped".into()]);
            }
            Err(e) => return Err(e.to_string()),
        };
        if !out.success {
            lines.push(format!("{f} {table}: not present"));
            continue;
        }
        runner
            .output("nft", &["delete", "table", f, table], None)
            .await
            .map_err(|e| e.to_string())?;
        lines.push(format!("{f} {table}: deleted"));
    }
    Ok(lines)
}

#[cfg(test)]
mod tests;
