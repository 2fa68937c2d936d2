//! The IPVS backend: kube-proxy's IPVS mode.
//!
//! - [`plan`]: view -> virtual servers, dummy-interface addresses, ipsets and
//!   iptables rules, pure;
//! - [`diff`]: planned vs kernel virtual servers -> IPVS operations, with graceful
//!   termination, pure;
//! - [`netlink`]: the IPVS generic netlink messages, batched;
//! - [`link`]: the dummy interface and its addresses over rtnetlink;
//! - [`ipset`], [`rules`]: kube-proxy's ipsets and its small iptables ruleset;
//! - [`kernel`]: module checks and sysctls at startup;
//! - [`show`]: the `ipvsadm -Ln`-style text of `render --mode ipvs`.
//!
//! [`IpvsBackend`] reads the kernel's IPVS table, ipsets and dummy-interface
//! addresses on full syncs (the first one included, so a restarted agent neither
//! flushes nor duplicates what its predecessor programmed) and diffs against its
//! own record of the last sync otherwise.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use ipnet::IpNet;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::backend::{Backend, BackendError, Desired, SyncReport, TableRules};
use crate::netfilter::{Runner, conntrack};
use crate::proxy::{IpFamily, ProxyView, ServicePortName};

pub mod diff;
pub mod ipset;
pub mod kernel;
pub mod link;
pub mod netlink;
pub mod plan;
pub mod rules;
pub mod show;

pub use diff::{KernelState, Op, Ops};
pub use plan::{Plan, PlanConfig, VirtualServer, VsKey};

/// Failures of the IPVS backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the kernel lacks IPVS support: missing kernel modules {} ({detail}); load them (modprobe) or use --mode iptables",
        missing.join(", ")
    )]
    Modules {
        missing: Vec<String>,
        detail: String,
    },
    #[error("sysctl {name}={value}: {reason}")]
    Sysctl {
        name: String,
        value: String,
        reason: String,
    },
    #[error(transparent)]
    Netlink(#[from] netlink::NetlinkError),
    #[error(transparent)]
    Link(#[from] link::LinkError),
    #[error(transparent)]
    Tool(#[from] crate::netfilter::Error),
    #[error("{failed} of {total} IPVS operations failed, first: {first}")]
    Operations {
        failed: usize,
        total: usize,
        first: String,
    },
    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The IPVS schedulers we program (the seed's six plus wrr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scheduler {
    Rr,
    Wrr,
    Lc,
    Dh,
    Sh,
    Sed,
    Nq,
}

/// Configuration of the IPVS backend.
#[derive(Debug, Clone)]
pub struct IpvsConfig {
    /// Chain and ipset prefix (`KUBE`).
    pub prefix: String,
    pub families: Vec<IpFamily>,
    /// Default scheduler (`--ipvs-scheduler`).
    pub scheduler: Scheduler,
    /// The dummy interface (`kube-ipvs0`).
    pub interface: String,
    /// At most one per family.
    pub cluster_cidrs: Vec<IpNet>,
    /// `--detect-local-mode`.
    pub detect_local: crate::local::DetectLocalMode,
    pub masquerade_all: bool,
    pub masquerade_bit: u8,
    pub random_fully: bool,
    /// `--node-ip`; empty: the Node object's addresses.
    pub node_ips: Vec<IpAddr>,
    /// NodePorts answer on the node addresses within these (empty: all).
    pub nodeport_addresses: Vec<IpNet>,
    /// Longest a drained real server is kept for its connections.
    pub graceful_timeout: Duration,
    /// Virtual servers in these ranges are left alone (kube-proxy's
    /// `--ipvs-exclude-cidrs`).
    pub exclude_cidrs: Vec<IpNet>,
    /// Set `arp_ignore=1`/`arp_announce=2` (kube-proxy's `--ipvs-strict-arp`).
    pub strict_arp: bool,
    /// Connection timeouts set once at start (`--ipvs-tcp-timeout`, ...).
    pub timeouts: netlink::Timeouts,
    /// Delete stale UDP conntrack entries after syncs (needs `conntrack`).
    pub conntrack_cleanup: bool,
}

/// What the backend believes the kernel holds after its last sync.
#[derive(Debug, Default)]
struct Cache {
    ipvs: KernelState,
    ipsets: BTreeMap<String, BTreeSet<String>>,
    udp: BTreeMap<IpFamily, BTreeMap<ServicePortName, conntrack::UdpPort>>,
}

/// The IPVS [`Backend`].
#[derive(Debug)]
pub struct IpvsBackend {
    cfg: IpvsConfig,
    sock: Option<netlink::IpvsSocket>,
    link: Option<link::Link>,
    cache: Option<Cache>,
    draining: diff::Draining,
    jumps_ensured: bool,
    last_drain_check: Option<Instant>,
    /// How long each stage of the last sync took.
    stages: Vec<(&'static str, Duration)>,
    runner: Runner,
}

/// rtnetlink address requests in flight at once.
const ADDRESS_REQUESTS: usize = 64;

/// How often drained real servers are checked for remaining connections.
const DRAIN_CHECK: Duration = Duration::from_secs(1);

// === impl Scheduler ===

impl Scheduler {
    pub const ALL: [Scheduler; 7] = [
        Self::Rr,
        Self::Wrr,
        Self::Lc,
        Self::Dh,
        Self::Sh,
        Self::Sed,
        Self::Nq,
    ];

    /// The kernel's name (`ip_vs_<name>` module).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rr => "rr",
            Self::Wrr => "wrr",
            Self::Lc => "lc",
            Self::Dh => "dh",
            Self::Sh => "sh",
            Self::Sed => "sed",
            Self::Nq => "nq",
        }
    }
}

impl FromStr for Scheduler {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| {
                format!("unknown IPVS scheduler {s:?}: want one of rr, wrr, lc, dh, sh, sed, nq")
            })
    }
}

impl fmt::Display for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl IpvsConfig ===

impl IpvsConfig {
    /// The planning configuration for one family. `node_port_ips` and
    /// `local_addresses` come from the kernel (or, for `render`, from the config
    /// and the Node object).
    pub fn plan_config(
        &self,
        view: &ProxyView,
        node_port_candidates: &[IpAddr],
        local_addresses: &BTreeSet<IpAddr>,
    ) -> PlanConfig {
        let family = view.family;
        let node_ip = self
            .node_ips
            .iter()
            .find(|ip| family.matches(ip))
            .or_else(|| view.node_ips.first())
            .copied();
        let nodeport_nets: Vec<&IpNet> = self
            .nodeport_addresses
            .iter()
            .filter(|n| family.matches_net(n))
            .collect();
        let node_port_ips = node_port_candidates
            .iter()
            .filter(|ip| family.matches(ip) && !ip.is_loopback())
            .filter(|ip| nodeport_nets.is_empty() || nodeport_nets.iter().any(|n| n.contains(*ip)))
            .copied()
            .collect();
        PlanConfig {
            prefix: self.prefix.clone(),
            scheduler: self.scheduler,
            local: self.detect_local.detector(
                self.cluster_cidrs
                    .iter()
                    .find(|n| family.matches_net(n))
                    .copied(),
                view.node_pod_cidrs.first().copied(),
            ),
            masquerade_all: self.masquerade_all,
            masquerade_mark: 1u32 << self.masquerade_bit.min(31),
            random_fully: self.random_fully,
            node_ip,
            node_port_ips,
            local_addresses: local_addresses.clone(),
        }
    }

    /// The plan `render` shows: node addresses from `--node-ip`, else the Node
    /// object's, instead of the kernel's.
    pub fn plan_without_kernel(&self, views: &[ProxyView]) -> Plan {
        Plan::build(views, |view| {
            let family = view.family;
            let mut ips: Vec<IpAddr> = self
                .node_ips
                .iter()
                .filter(|ip| family.matches(ip))
                .copied()
                .collect();
            if ips.is_empty() {
                ips = view.node_ips.clone();
            }
            let local: BTreeSet<IpAddr> = ips.iter().copied().collect();
            self.plan_config(view, &ips, &local)
        })
    }

    /// Whether a virtual server is ours to manage.
    pub fn manages(&self, key: &VsKey) -> bool {
        self.families.contains(&key.family())
            && !self
                .exclude_cidrs
                .iter()
                .any(|n| n.contains(&key.addr.ip()))
    }
}

// === impl IpvsBackend ===

impl IpvsBackend {
    /// Checks the kernel (modules, IPVS over netlink) and sets kube-proxy's
    /// sysctls. Touches neither the IPVS table nor ipsets nor iptables: nothing
    /// changes before the first snapshot is applied.
    ///
    /// # Errors
    /// [`Error::Modules`] naming the missing modules; [`Error::Sysctl`]; netlink
    /// failures.
    pub async fn start(cfg: IpvsConfig) -> Result<Self> {
        kernel::ensure_modules(&[cfg.scheduler]).await?;
        kernel::apply_default_sysctls(cfg.strict_arp)?;
        let mut sock = tokio::task::spawn_blocking(netlink::IpvsSocket::open)
            .await
            .map_err(|e| Error::Other(e.to_string()))??;
        if cfg.timeouts.any() {
            sock.set_timeouts(&cfg.timeouts)?;
            info!(timeouts = ?cfg.timeouts, "IPVS connection timeouts set");
        }
        let ipvs_info = sock.info()?;
        let (a, b, c) = ipvs_info.version;
        info!(
            version = %format!("{a}.{b}.{c}"),
            connection_table = ipvs_info.connection_table_size,
            scheduler = %cfg.scheduler,
            "IPVS ready"
        );
        let link = link::Link::new(&cfg.interface)?;
        Ok(Self {
            cfg,
            sock: Some(sock),
            link: Some(link),
            cache: None,
            draining: diff::Draining::new(),
            jumps_ensured: false,
            last_drain_check: None,
            stages: Vec::new(),
            runner: Runner::System,
        })
    }

    /// How long each stage of the last sync took: `link` (dummy interface and
    /// address dump), `plan`, `read` (kernel read-back, full syncs), `ipvs`
    /// (netlink), `addresses`, `ipsets`, `iptables`.
    pub fn last_stages(&self) -> &[(&'static str, Duration)] {
        &self.stages
    }

    pub fn config(&self) -> &IpvsConfig {
        &self.cfg
    }

    /// Runs `f` with the netlink socket on a blocking thread (reopening the socket
    /// after an I/O failure).
    async fn with_socket<T: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut netlink::IpvsSocket) -> Result<T, netlink::NetlinkError> + Send + 'static,
    ) -> Result<T> {
        let sock = match self.sock.take() {
            Some(s) => s,
            None => tokio::task::spawn_blocking(netlink::IpvsSocket::open)
                .await
                .map_err(|e| Error::Other(e.to_string()))??,
        };
        let (sock, out) = tokio::task::spawn_blocking(move || {
            let mut sock = sock;
            let out = f(&mut sock);
            (sock, out)
        })
        .await
        .map_err(|e| Error::Other(e.to_string()))?;
        match out {
            Err(netlink::NetlinkError::Io(e)) => Err(netlink::NetlinkError::Io(e).into()),
            other => {
                self.sock = Some(sock);
                Ok(other?)
            }
        }
    }

    /// Sends operations; returns the failures as (op, errno) and updates `cache`
    /// with the ones that took effect.
    async fn execute(&mut self, ops: Vec<Op>, cache: &mut KernelState) -> Result<Vec<(Op, i32)>> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let (ops, failed) = self
            .with_socket(move |s| {
                let refs: Vec<&Op> = ops.iter().collect();
                let failed = s.execute(&refs)?;
                Ok((ops, failed))
            })
            .await?;
        let bad: BTreeSet<usize> = failed.iter().map(|f| f.index).collect();
        let ok: Vec<&Op> = ops
            .iter()
            .enumerate()
            .filter(|(i, _)| !bad.contains(i))
            .map(|(_, o)| o)
            .collect();
        diff::apply_to(cache, &ok);
        Ok(failed
            .into_iter()
            .filter_map(|f| ops.get(f.index).map(|o| (o.clone(), f.errno)))
            .collect())
    }

    async fn read_kernel(&mut self) -> Result<KernelState> {
        let state = self.with_socket(|s| s.read_all()).await?;
        Ok(state
            .into_iter()
            .filter(|(k, _)| self.cfg.manages(k))
            .collect())
    }

    async fn sync(&mut self, desired: Desired<'_>) -> Result<SyncReport> {
        let full = desired.full || self.cache.is_none();
        let mut link = self
            .link
            .take()
            .ok_or_else(|| Error::Other("rtnetlink connection lost".into()))?;
        let result = self.sync_with(&mut link, desired.views, full).await;
        self.link = Some(link);
        if result.is_err() {
            // The next sync reads everything back from the kernel.
            self.cache = None;
            self.jumps_ensured = false;
        }
        result
    }

    async fn sync_with(
        &mut self,
        link: &mut link::Link,
        views: &[ProxyView],
        full: bool,
    ) -> Result<SyncReport> {
        self.stages.clear();
        let mut t = Instant::now();
        let mut stage = |stages: &mut Vec<(&'static str, Duration)>, name| {
            stages.push((name, t.elapsed()));
            t = Instant::now();
        };
        let index = link.ensure().await?;
        let addrs = link.addresses().await?;
        stage(&mut self.stages, "link");
        let candidates = addrs.node_port_candidates();
        let plan = Plan::build(views, |v| {
            self.cfg.plan_config(v, &candidates, &addrs.others)
        });
        for w in &plan.warnings {
            warn!(warning = %w, "ignored annotation");
        }
        stage(&mut self.stages, "plan");

        let mut cache = match self.cache.take() {
            Some(c) if !full => c,
            old => {
                let ipvs = self.read_kernel().await?;
                let ours: BTreeSet<String> = plan
                    .families
                    .iter()
                    .flat_map(|f| f.ipsets.keys().cloned())
                    .collect();
                let ipsets = ipset::parse_save(&ipset::save(&self.runner).await?, &ours);
                let udp = old.map(|c| c.udp).unwrap_or_default();
                Cache { ipvs, ipsets, udp }
            }
        };
        stage(&mut self.stages, "read");

        let ops = diff::diff(
            &plan.virtual_servers,
            &cache.ipvs,
            &mut self.draining,
            full,
            Instant::now(),
            self.cfg.graceful_timeout,
        );
        let total_ops = ops.len();
        debug!(
            full,
            upserts = ops.upserts.len(),
            deletes = ops.deletes.len(),
            "ipvs diff"
        );
        let mut failed = self.execute(ops.upserts, &mut cache.ipvs).await?;
        stage(&mut self.stages, "ipvs");

        // rtnetlink requests are multiplexed on one socket: keep a few in flight.
        let l: &link::Link = link;
        let add: Vec<IpAddr> = plan.bind.difference(&addrs.dummy).copied().collect();
        futures::stream::iter(add)
            .map(|ip| l.add(index, ip))
            .buffer_unordered(ADDRESS_REQUESTS)
            .try_collect::<()>()
            .await?;
        stage(&mut self.stages, "addresses");

        let desired_sets: BTreeMap<String, ipset::IpSet> = plan
            .families
            .iter()
            .flat_map(|f| f.ipsets.clone())
            .collect();
        let (text, set_changes) = ipset::restore_text(&desired_sets, &cache.ipsets);
        if !text.is_empty() {
            ipset::restore(&self.runner, &text).await?;
        }
        cache.ipsets = desired_sets
            .values()
            .map(|s| (s.name.clone(), s.members.clone()))
            .collect();
        stage(&mut self.stages, "ipsets");

        let names = rules::ChainNames::new(&self.cfg.prefix);
        let mut nat_rules = 0;
        let mut filter_rules = 0;
        for f in &plan.families {
            if !self.jumps_ensured {
                ensure_jumps(&self.runner, &names, f.family).await?;
            }
            crate::iptables::restore(&self.runner, f.family, &f.rules)
                .await
                .map_err(|e| Error::Other(e.to_string()))?;
            nat_rules += f.nat_rule_count;
            filter_rules += f.filter_rule_count;
        }
        self.jumps_ensured = true;
        stage(&mut self.stages, "iptables");

        let del: Vec<IpAddr> = addrs.dummy.difference(&plan.bind).copied().collect();
        futures::stream::iter(del)
            .map(|ip| l.del(index, ip))
            .buffer_unordered(ADDRESS_REQUESTS)
            .try_collect::<()>()
            .await?;
        stage(&mut self.stages, "addresses");

        failed.extend(self.execute(ops.deletes, &mut cache.ipvs).await?);
        stage(&mut self.stages, "ipvs");
        debug!(stages = ?self.stages, "ipvs sync stages");

        let mut conntrack_deleted = 0;
        for view in views {
            let udp = conntrack::udp_ports(view);
            if self.cfg.conntrack_cleanup {
                let previous = cache.udp.get(&view.family);
                for job in conntrack::stale(previous, &udp) {
                    match conntrack::delete(&self.runner, view.family, &job).await {
                        Ok(n) => conntrack_deleted += n,
                        Err(e) => {
                            warn!(family = %view.family, error = %e, "conntrack cleanup failed")
                        }
                    }
                }
            }
            cache.udp.insert(view.family, udp);
        }
        self.cache = Some(cache);

        if let Some((op, errno)) = failed.first() {
            return Err(Error::Operations {
                failed: failed.len(),
                total: total_ops,
                first: format!("{op:?}: {}", std::io::Error::from_raw_os_error(*errno)),
            });
        }
        Ok(SyncReport {
            full,
            rules_written: (total_ops + set_changes + nat_rules + filter_rules) as u64,
            tables: TableRules::iptables(filter_rules as u64, nat_rules as u64),
            conntrack_deleted,
            rejected: Vec::new(),
        })
    }

    /// Deletes drained real servers whose connections are gone (or timed out).
    async fn drain(&mut self) -> Result<usize> {
        let keys: BTreeSet<VsKey> = self.draining.keys().map(|(k, _)| *k).collect();
        let fresh = self
            .with_socket(move |s| {
                let mut out = BTreeMap::new();
                for k in keys {
                    out.insert(k, s.dump_dests(&k)?);
                }
                Ok(out)
            })
            .await?;
        let ops = diff::drain(
            &mut self.draining,
            &fresh,
            Instant::now(),
            self.cfg.graceful_timeout,
        );
        let n = ops.len();
        if n == 0 {
            return Ok(0);
        }
        // Without a record (after a failed sync) the next sync reads the kernel
        // anyway: do not invent one.
        let had_cache = self.cache.is_some();
        let mut cache = self.cache.take().unwrap_or_default();
        let failed = self.execute(ops, &mut cache.ipvs).await;
        if had_cache {
            self.cache = Some(cache);
        }
        for (op, errno) in failed? {
            warn!(?op, error = %std::io::Error::from_raw_os_error(errno), "deleting a drained real server failed");
        }
        info!(deleted = n, "drained real servers deleted");
        Ok(n)
    }

    async fn canary(&mut self) -> Result<bool> {
        let names = rules::ChainNames::new(&self.cfg.prefix);
        for family in self.cfg.families.clone() {
            let r = &self.runner;
            let exists =
                |table, chain| crate::netfilter::jumps::chain_exists(r, family, table, chain);
            let ok = exists("nat", &names.canary).await.unwrap_or(false)
                && exists("filter", &names.canary).await.unwrap_or(false)
                && exists("nat", &names.services).await.unwrap_or(false);
            if !ok {
                info!(%family, "iptables canary missing: rules were flushed externally");
                return Ok(false);
            }
        }
        if let Some(link) = &self.link
            && link.find().await?.is_none()
        {
            info!(interface = %self.cfg.interface, "dummy interface gone");
            return Ok(false);
        }
        let expected = self.cache.as_ref().map(|c| c.ipvs.len()).unwrap_or(0);
        let services = self.with_socket(|s| s.dump_services()).await?;
        let ours = services.iter().filter(|(k, _)| self.cfg.manages(k)).count();
        if ours != expected {
            info!(expected, found = ours, "IPVS table changed externally");
            return Ok(false);
        }
        Ok(true)
    }
}

fn fail(stage: &'static str, e: Error) -> BackendError {
    BackendError {
        backend: "ipvs",
        stage,
        message: e.to_string(),
    }
}

impl Backend for IpvsBackend {
    async fn apply(
        &mut self,
        desired: Desired<'_>,
    ) -> std::result::Result<SyncReport, BackendError> {
        self.sync(desired).await.map_err(|e| fail("sync", e))
    }

    async fn check(&mut self) -> bool {
        if self.cache.is_none() {
            return true;
        }
        match self.canary().await {
            Ok(true) => true,
            Ok(false) => {
                self.jumps_ensured = false;
                false
            }
            Err(e) => {
                warn!(error = %e, "canary check failed");
                self.jumps_ensured = false;
                false
            }
        }
    }

    async fn housekeeping(&mut self) {
        if self.draining.is_empty()
            || self
                .last_drain_check
                .is_some_and(|t| t.elapsed() < DRAIN_CHECK)
        {
            return;
        }
        self.last_drain_check = Some(Instant::now());
        if let Err(e) = self.drain().await {
            warn!(error = %e, "graceful termination check failed");
        }
    }
}

/// Creates our chains if missing and puts the jumps from the built-in chains
/// first in them (kube-proxy's `EnsureChain` + `EnsureRule(Prepend)`).
async fn ensure_jumps(runner: &Runner, names: &rules::ChainNames, family: IpFamily) -> Result<()> {
    crate::netfilter::jumps::ensure(runner, family, Vec::new(), names.jumps())
        .await
        .map_err(|reason| Error::Other(format!("{family} jump rules: {reason}")))
}
