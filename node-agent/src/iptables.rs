//! The iptables backend: kube-proxy's iptables mode.
//!
//! - [`chains`]: chain names (kube-proxy's hashes).
//! - [`render`]: view -> `iptables-restore` text, pure.
//! - [`IptablesBackend`]: the kernel side. Each sync is one `iptables-restore
//!   --noflush` per family (atomic per table); a partial sync rewrites the top-level
//!   chains and only the service chains whose rules changed, and deletes chains of
//!   removed services. The jumps from the built-in chains are checked and inserted
//!   one rule at a time with the `iptables` crate. After each sync, stale UDP
//!   conntrack entries are deleted (see [`conntrack`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::IpAddr;

use ipnet::IpNet;
use tokio::process::Command;
use tracing::{Instrument, debug, info, warn};

use crate::backend::{Backend, BackendError, Desired, SyncReport};
use crate::proxy::{IpFamily, ProxyView, ServicePortName};

pub mod chains;
pub mod conntrack;
pub mod jumps;
pub mod render;

pub use chains::ChainNames;
use jumps::Jump;
pub use render::{RenderConfig, RuleSet, ServiceRules, render};

/// Kernel-side failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{command}: could not run: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{family} jump rules: {reason}")]
    Jumps { family: IpFamily, reason: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Configuration of the iptables backend.
#[derive(Debug, Clone)]
pub struct IptablesConfig {
    /// Chain prefix (`KUBE`).
    pub prefix: String,
    pub families: Vec<IpFamily>,
    /// At most one per family.
    pub cluster_cidrs: Vec<IpNet>,
    pub masquerade_all: bool,
    /// Bit of the packet mark used for masquerading (14 -> 0x4000).
    pub masquerade_bit: u8,
    /// The node's IPs; the first of each family is its primary IP. When empty, the
    /// Node object's addresses are used.
    pub node_ips: Vec<IpAddr>,
    pub localhost_nodeports: bool,
    pub random_fully: bool,
    /// Delete stale UDP conntrack entries after each sync (needs `conntrack`).
    pub conntrack_cleanup: bool,
    /// `--nodeport-addresses`: NodePorts answer only on node IPs in these CIDRs
    /// (empty: on every local address, as kube-proxy does by default).
    pub nodeport_addresses: Vec<IpNet>,
}

/// One family's applied state, for partial syncs and conntrack cleanup.
#[derive(Debug, Default)]
struct Applied {
    /// Hash of each service port's rules.
    services: HashMap<ServicePortName, u64>,
    active_chains: BTreeSet<String>,
    /// What conntrack cleanup needs to know about each UDP service port.
    udp: BTreeMap<ServicePortName, conntrack::UdpPort>,
}

#[derive(Debug)]
struct FamilyState {
    family: IpFamily,
    applied: Option<Applied>,
    jumps_ensured: bool,
}

/// The iptables [`Backend`].
#[derive(Debug)]
pub struct IptablesBackend {
    cfg: IptablesConfig,
    families: Vec<FamilyState>,
}

/// The built-in chain jumps kube-proxy installs (table, chain, target, comment, extra).
fn jump_rules(c: &ChainNames, family: IpFamily, localhost_nodeports: bool) -> Vec<Jump> {
    let new = "-m conntrack --ctstate NEW";
    let mut v = vec![
        Jump::new(
            "filter",
            "INPUT",
            &c.external_services,
            "kubernetes externally-visible service portals",
            new,
        ),
        Jump::new(
            "filter",
            "FORWARD",
            &c.external_services,
            "kubernetes externally-visible service portals",
            new,
        ),
        Jump::new(
            "filter",
            "INPUT",
            &c.nodeports,
            "kubernetes health check service ports",
            "",
        ),
        Jump::new(
            "filter",
            "FORWARD",
            &c.services,
            "kubernetes service portals",
            new,
        ),
        Jump::new(
            "filter",
            "OUTPUT",
            &c.services,
            "kubernetes service portals",
            new,
        ),
        Jump::new(
            "filter",
            "FORWARD",
            &c.forward,
            "kubernetes forwarding rules",
            "",
        ),
        Jump::new(
            "filter",
            "INPUT",
            &c.proxy_firewall,
            "kubernetes load balancer firewall",
            new,
        ),
        Jump::new(
            "filter",
            "OUTPUT",
            &c.proxy_firewall,
            "kubernetes load balancer firewall",
            new,
        ),
        Jump::new(
            "filter",
            "FORWARD",
            &c.proxy_firewall,
            "kubernetes load balancer firewall",
            new,
        ),
        Jump::new(
            "nat",
            "OUTPUT",
            &c.services,
            "kubernetes service portals",
            "",
        ),
        Jump::new(
            "nat",
            "PREROUTING",
            &c.services,
            "kubernetes service portals",
            "",
        ),
        Jump::new(
            "nat",
            "POSTROUTING",
            &c.postrouting,
            "kubernetes postrouting rules",
            "",
        ),
    ];
    if family == IpFamily::V4 && localhost_nodeports {
        v.push(Jump::new("filter", "INPUT", &c.firewall, "", ""));
        v.push(Jump::new("filter", "OUTPUT", &c.firewall, "", ""));
    }
    v
}

// === impl IptablesBackend ===

impl IptablesBackend {
    pub fn new(cfg: IptablesConfig) -> Self {
        let families = cfg
            .families
            .iter()
            .map(|f| FamilyState {
                family: *f,
                applied: None,
                jumps_ensured: false,
            })
            .collect();
        Self { cfg, families }
    }

    pub fn chain_names(&self) -> ChainNames {
        ChainNames::new(&self.cfg.prefix)
    }

    /// The render configuration for one family and view.
    pub fn render_config(&self, view: &ProxyView) -> RenderConfig {
        render_config(&self.cfg, view)
    }

    async fn apply_family(
        cfg: &IptablesConfig,
        state: &mut FamilyState,
        view: &ProxyView,
        want_full: bool,
    ) -> Result<SyncReport, BackendError> {
        let family = state.family;
        let names = ChainNames::new(&cfg.prefix);
        let rs = tracing::info_span!("render", %family, service_ports = view.ports.len())
            .in_scope(|| render(view, &render_config(cfg, view)));
        let full = want_full || state.applied.is_none();

        // The jumps are checked one rule at a time (each check reads the table), so
        // only at start, after a failure and when the canary saw a flush; the
        // periodic full resync rewrites our chains without them.
        if !state.jumps_ensured {
            if family == IpFamily::V4 && cfg.localhost_nodeports {
                set_route_localnet();
            }
            ensure_jumps(&names, family, cfg.localhost_nodeports)
                .await
                .map_err(|e| fail("jump-rules", e))?;
            state.jumps_ensured = true;
        }

        let hashes: HashMap<ServicePortName, u64> = rs
            .services
            .iter()
            .map(|(k, v)| (k.clone(), hash_of(v)))
            .collect();
        let active: BTreeSet<String> = rs
            .active_nat_chains()
            .into_iter()
            .map(String::from)
            .collect();

        let (text, written) = if full {
            // Stale chains can only be known from the kernel on a full sync (a
            // restarted agent does not know what its predecessor wrote).
            let existing = save_chains(family, "nat")
                .await
                .map_err(|e| fail("save", e))?;
            let stale: Vec<String> = existing
                .into_iter()
                .filter(|c| names.is_service_chain(c) && !active.contains(c))
                .collect();
            (
                rs.full_text(&stale),
                rs.filter_rule_count + rs.nat_rule_count,
            )
        } else {
            let prev = state.applied.as_ref();
            let changed: BTreeSet<ServicePortName> = hashes
                .iter()
                .filter(|(k, h)| prev.and_then(|p| p.services.get(*k)) != Some(*h))
                .map(|(k, _)| k.clone())
                .collect();
            let stale: Vec<String> = prev
                .map(|p| p.active_chains.difference(&active).cloned().collect())
                .unwrap_or_default();
            let top = rs.filter_rule_count + rs.nat_rule_count
                - rs.services.values().map(|s| s.rule_count).sum::<usize>();
            let written = top
                + changed
                    .iter()
                    .filter_map(|k| rs.services.get(k))
                    .map(|s| s.rule_count)
                    .sum::<usize>();
            debug!(%family, changed = changed.len(), stale = stale.len(), "partial sync");
            (rs.partial_text(&changed, &stale), written)
        };

        let restore_span = tracing::info_span!(
            "iptables-restore",
            %family,
            full,
            bytes = text.len(),
            rules = written
        );
        if let Err(e) = restore(family, &text).instrument(restore_span).await {
            // The kernel kept its previous rules; make sure the next sync rewrites all.
            state.applied = None;
            state.jumps_ensured = false;
            return Err(fail("restore", e));
        }

        let udp = conntrack::udp_ports(view);
        let mut deleted = 0;
        if cfg.conntrack_cleanup {
            let previous = state.applied.as_ref().map(|a| &a.udp);
            let jobs = conntrack::stale(previous, &udp);
            if !jobs.is_empty() {
                let span = tracing::info_span!("conntrack-cleanup", %family, jobs = jobs.len());
                async {
                    for job in jobs {
                        match conntrack::delete(family, &job).await {
                            Ok(n) => deleted += n,
                            Err(e) => warn!(%family, error = %e, "conntrack cleanup failed"),
                        }
                    }
                }
                .instrument(span)
                .await;
            }
        }
        state.applied = Some(Applied {
            services: hashes,
            active_chains: active,
            udp,
        });
        Ok(SyncReport {
            full,
            rules_written: written as u64,
            filter_rules: rs.filter_rule_count as u64,
            nat_rules: rs.nat_rule_count as u64,
            conntrack_deleted: deleted,
        })
    }
}

impl Backend for IptablesBackend {
    async fn apply(&mut self, desired: Desired<'_>) -> Result<SyncReport, BackendError> {
        let mut total = SyncReport {
            full: true,
            ..SyncReport::default()
        };
        for state in &mut self.families {
            let Some(view) = desired.views.iter().find(|v| v.family == state.family) else {
                continue;
            };
            let r = Self::apply_family(&self.cfg, state, view, desired.full).await?;
            total.full &= r.full;
            total.rules_written += r.rules_written;
            total.filter_rules += r.filter_rules;
            total.nat_rules += r.nat_rules;
            total.conntrack_deleted += r.conntrack_deleted;
        }
        Ok(total)
    }

    async fn check(&mut self) -> bool {
        let names = self.chain_names();
        let localhost = self.cfg.localhost_nodeports;
        let applied: Vec<IpFamily> = self
            .families
            .iter()
            .filter(|s| s.applied.is_some())
            .map(|s| s.family)
            .collect();
        for family in applied {
            let names = names.clone();
            let ok = tokio::task::spawn_blocking(move || canary_ok(&names, family, localhost))
                .await
                .unwrap_or(false);
            if !ok {
                info!(%family, "canary missing: rules were flushed externally; scheduling a full sync");
                for s in &mut self.families {
                    s.jumps_ensured = false;
                }
                return false;
            }
        }
        true
    }
}

fn render_config(cfg: &IptablesConfig, view: &ProxyView) -> RenderConfig {
    let family = view.family;
    let node_ip = cfg
        .node_ips
        .iter()
        .find(|ip| family.matches(ip))
        .or_else(|| view.node_ips.first())
        .copied();
    RenderConfig {
        chains: ChainNames::new(&cfg.prefix),
        cluster_cidr: cfg
            .cluster_cidrs
            .iter()
            .find(|n| family.matches_net(n))
            .copied(),
        masquerade_all: cfg.masquerade_all,
        masquerade_mark: 1u32 << cfg.masquerade_bit.min(31),
        node_ip,
        localhost_nodeports: cfg.localhost_nodeports,
        random_fully: cfg.random_fully,
        nodeport_addresses: cfg
            .nodeport_addresses
            .iter()
            .filter(|n| family.matches_net(n))
            .copied()
            .collect(),
        node_ips: {
            let mut ips: Vec<IpAddr> = cfg
                .node_ips
                .iter()
                .copied()
                .filter(|ip| family.matches(ip))
                .collect();
            if ips.is_empty() {
                ips = view.node_ips.clone();
            }
            ips
        },
    }
}

fn hash_of(s: &ServiceRules) -> u64 {
    let mut h = DefaultHasher::new();
    s.chains.hash(&mut h);
    s.rules.hash(&mut h);
    h.finish()
}

fn fail(stage: &'static str, e: Error) -> BackendError {
    BackendError {
        backend: "iptables",
        stage,
        message: e.to_string(),
    }
}

pub(crate) fn tool(family: IpFamily, what: &str) -> String {
    match family {
        IpFamily::V4 => format!("iptables{what}"),
        IpFamily::V6 => format!("ip6tables{what}"),
    }
}

/// Runs `iptables-restore --noflush --counters -w` with `text` on stdin.
pub async fn restore(family: IpFamily, text: &str) -> Result<()> {
    let command = tool(family, "-restore");
    let out = crate::exec::with_stdin(&command, &["--noflush", "--counters", "-w"], text)
        .await
        .map_err(|source| Error::Spawn {
            command: command.clone(),
            source,
        })?;
    if out.status.success() {
        return Ok(());
    }
    let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    // "line N failed": name the line, which is what an operator needs.
    if let Some(n) = stderr
        .split("line ")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse::<usize>().ok())
        && let Some(line) = text.lines().nth(n.saturating_sub(1))
    {
        stderr.push_str(&format!(" [line {n}: {line}]"));
    }
    Err(Error::Failed {
        command,
        status: out.status.to_string(),
        stderr,
    })
}

/// The chains of a table, from `iptables-save -t <table>`.
pub async fn save_chains(family: IpFamily, table: &str) -> Result<Vec<String>> {
    let command = tool(family, "-save");
    let out = Command::new(&command)
        .args(["-t", table])
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| Error::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(Error::Failed {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split(' ').next())
        .map(String::from)
        .collect())
}

/// Creates our top-level chains if missing and puts the jumps from the built-in
/// chains first in them (kube-proxy's `EnsureChain` + `EnsureRule(Prepend)`), one
/// rule at a time with the `iptables` crate. Also creates the mangle canary chain.
async fn ensure_jumps(
    names: &ChainNames,
    family: IpFamily,
    localhost_nodeports: bool,
) -> Result<()> {
    let jumps = jump_rules(names, family, localhost_nodeports);
    let canary = &names.canary;
    let chains = ["mangle", "nat", "filter"].map(|table| (table, canary.clone()));
    jumps::ensure(family, chains.to_vec(), jumps)
        .await
        .map_err(|reason| Error::Jumps { family, reason })
}

/// The canary: our canary chain in mangle, nat and filter, and the tail rule of
/// `KUBE-SERVICES` (gone when someone flushes that chain).
fn canary_ok(names: &ChainNames, family: IpFamily, localhost_nodeports: bool) -> bool {
    let Ok(mut ipt) = iptables::new(family == IpFamily::V6) else {
        return false;
    };
    ipt.set_numeric(true);
    for table in ["mangle", "nat", "filter"] {
        if !ipt.chain_exists(table, &names.canary).unwrap_or(false) {
            return false;
        }
    }
    let exclude = match family {
        IpFamily::V6 => " ! -d ::1/128",
        IpFamily::V4 if !localhost_nodeports => " ! -d 127.0.0.0/8",
        IpFamily::V4 => "",
    };
    let tail = format!(
        "-m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL{exclude} -j {}",
        names.nodeports
    );
    ipt.exists("nat", &names.services, &tail).unwrap_or(false)
}

/// NodePorts on 127.0.0.1 need `route_localnet` (kube-proxy sets it too).
fn set_route_localnet() {
    let path = "/proc/sys/net/ipv4/conf/all/route_localnet";
    if std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "1") {
        return;
    }
    if let Err(e) = std::fs::write(path, "1") {
        warn!(error = %e, "cannot set net.ipv4.conf.all.route_localnet; NodePorts on localhost will not work");
    }
}
