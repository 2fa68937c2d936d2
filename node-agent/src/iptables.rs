//! The iptables backend: kube-proxy's iptables mode.
//!
//! - [`chains`]: chain names (kube-proxy's hashes).
//! - [`render`]: view -> `iptables-restore` text, pure.
//! - [`IptablesBackend`]: the kernel side. Each sync is one `iptables-restore
//!   --noflush` per family: one transaction per table, except a full sync with the
//!   nf_tables variant, whose `nat` part is several (see [`nft_block_chains`]); a
//!   partial sync rewrites only the service chains whose rules changed, the
//!   top-level chains of a table only when they changed, and deletes chains of
//!   removed services. The jumps from the built-in chains are checked and inserted
//!   one rule at a time ([`jumps`]). After each sync, stale UDP conntrack entries
//!   are deleted (see [`conntrack`]). Every tool runs through one [`Runner`].

use std::collections::{BTreeMap, BTreeSet};

use std::net::IpAddr;

use ipnet::IpNet;
use tracing::{Instrument, debug, info, warn};

use crate::backend::{
    Backend, BackendError, Desired, RejectReason, Rejected, SyncReport, TableRules,
};
use crate::local::DetectLocalMode;
use crate::netfilter::{self, Runner, conntrack, jumps};
use crate::proxy::{IpFamily, ProxyView, ServicePortName};

pub mod chains;
pub mod plan;
pub mod render;

pub use chains::ChainNames;
use jumps::Jump;
use plan::{Planned, Written, hash_of};
pub use render::{RenderConfig, RuleSet, ServiceRules, render};

/// Kernel-side failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Tool(#[from] netfilter::Error),
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
    /// `--detect-local-mode`.
    pub detect_local: DetectLocalMode,
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
    /// What the last restore left in the kernel.
    written: Written,
    /// What is in the kernel, so rejected services can keep their rules.
    rules: RuleSet,
    /// What conntrack cleanup needs to know about each UDP service port.
    udp: BTreeMap<ServicePortName, conntrack::UdpPort>,
}

#[derive(Debug)]
struct FamilyState {
    family: IpFamily,
    applied: Option<Applied>,
    jumps_ensured: bool,
    /// Whether `iptables-restore` is the nf_tables variant (asked once).
    nft: Option<bool>,
}

/// How many `nat` chains a full sync writes per transaction with the nf_tables
/// variant of `iptables-restore`, for a ruleset of `nat_rules` rules.
///
/// Two costs pull apart. With `--noflush`, `iptables-nft-restore` (1.8.9) keeps a
/// sorted list of every chain a transaction names and walks it for each rule, so
/// a transaction of `b` chains costs about `b` squared (one transaction of 11,000
/// chains took 6 s of CPU at 1,000 services x 10 endpoints). And the kernel
/// checks every chain reachable from the built-in chains at each commit that adds
/// rules, so each transaction into a populated table costs about the table's
/// size (70 ms at 160,000 rules). The sum is least near `b = sqrt(20 x rules)`,
/// kept between 256 and 4,096. The legacy variant rewrites the whole table per
/// transaction, so it gets one.
pub fn nft_block_chains(nat_rules: usize) -> usize {
    (20 * nat_rules).isqrt().clamp(256, 4096)
}

/// The iptables [`Backend`].
#[derive(Debug)]
pub struct IptablesBackend {
    cfg: IptablesConfig,
    families: Vec<FamilyState>,
    runner: Runner,
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
                nft: None,
            })
            .collect();
        Self {
            cfg,
            families,
            runner: Runner::System,
        }
    }

    /// Runs the tools through `runner` (a fake in tests).
    pub fn with_runner(mut self, runner: Runner) -> Self {
        self.runner = runner;
        self
    }

    pub fn chain_names(&self) -> ChainNames {
        ChainNames::new(&self.cfg.prefix)
    }

    /// The jumps from the built-in chains this backend installs for `family`
    /// (read-only; `explain` adds them to a rendered rule set).
    pub fn jumps(&self, family: IpFamily) -> Vec<Jump> {
        jump_rules(&self.chain_names(), family, self.cfg.localhost_nodeports)
    }

    /// The render configuration for one family and view.
    pub fn render_config(&self, view: &ProxyView) -> RenderConfig {
        render_config(&self.cfg, view)
    }

    async fn apply_family(
        runner: &Runner,
        cfg: &IptablesConfig,
        state: &mut FamilyState,
        view: &ProxyView,
        want_full: bool,
    ) -> Result<SyncReport, BackendError> {
        let family = state.family;
        let names = ChainNames::new(&cfg.prefix);
        let rendered = tracing::info_span!("render", %family, service_ports = view.ports.len())
            .in_scope(|| render(view, &render_config(cfg, view)));
        let full = plan::is_full(want_full, state.applied.is_some());

        // The jumps are checked one rule at a time (each check reads the table), so
        // only at start, after a failure and when the canary saw a flush; the
        // periodic full resync rewrites our chains without them.
        if !state.jumps_ensured {
            if family == IpFamily::V4 && cfg.localhost_nodeports {
                set_route_localnet();
            }
            ensure_jumps(runner, &names, family, cfg.localhost_nodeports)
                .await
                .map_err(|e| fail("jump-rules", e))?;
            state.jumps_ensured = true;
        }

        let previous = state.applied.as_ref();
        let mut rejected: Vec<Rejected> = Vec::new();
        // The invariant holds by construction (and is asserted in debug builds); in
        // case it ever breaks, the services that break it keep their last rules
        // rather than make the kernel refuse everyone's. Services whose rules are
        // what was last applied were checked then.
        let checked = |k: &ServicePortName, s: &ServiceRules| {
            previous.is_some_and(|p| p.written.services.get(k) == Some(&hash_of(s)))
        };
        let mut rs = match rendered.check_services(|k, s| !checked(k, s)) {
            Ok(()) => rendered,
            Err(e) => {
                let mut keep = BTreeSet::new();
                for u in &e.0 {
                    let Some(service) = &u.service else {
                        return Err(BackendError {
                            backend: "iptables",
                            stage: "render",
                            message: e.to_string(),
                        });
                    };
                    if keep.insert(service.clone()) {
                        rejected.push(Rejected {
                            family,
                            service: service.clone(),
                            reason: RejectReason::Invariant,
                            message: format!("{} chain {} is not declared", u.table, u.chain),
                        });
                    }
                }
                rendered.with_services_from(&keep, previous.map(|p| &p.rules))
            }
        };

        // Stale chains can only be known from the kernel on a full sync (a
        // restarted agent does not know what its predecessor wrote). The chains of
        // this render are added: a restore written in several transactions may
        // leave some of them behind when it fails, and an input that then leaves a
        // service out must delete them.
        let existing = if full {
            let mut chains = save_chains(runner, family, "nat")
                .await
                .map_err(|e| fail("save", e))?;
            chains.extend(rs.active_nat_chains().into_iter().map(String::from));
            Some(chains)
        } else {
            None
        };
        let nft = match state.nft {
            Some(nft) => nft,
            None => {
                let nft = is_nft(runner, family).await;
                state.nft = Some(nft);
                nft
            }
        };
        let blocks = nft.then(|| nft_block_chains(rs.nat_rule_count));
        let input = |rs: &RuleSet| {
            plan::plan(
                rs,
                previous.map(|p| &p.written),
                existing.as_deref(),
                &names,
                blocks,
            )
        };

        let mut planned = input(&rs);
        debug!(%family, full, changed = planned.changed.len(), stale = planned.stale, "sync");
        let restore_span = tracing::info_span!(
            "iptables-restore",
            %family,
            full,
            bytes = planned.text.len(),
            rules = planned.written
        );
        let first = if planned.text.is_empty() {
            Ok(())
        } else {
            restore(runner, family, &planned.text)
                .instrument(restore_span)
                .await
        };
        if let Err(e) = first {
            // Find the services whose rules the kernel refuses, keep their last good
            // rules, and program everyone else.
            let refused = match &e {
                Error::Tool(netfilter::Error::Failed { .. }) => {
                    // The services this sync writes, and those it removes (their
                    // chains' deletion may be what the kernel refuses).
                    let mut candidates: Vec<ServicePortName> =
                        planned.changed.iter().cloned().collect();
                    if let Some(prev) = previous {
                        candidates.extend(
                            prev.rules
                                .services
                                .keys()
                                .filter(|k| !rs.services.contains_key(*k))
                                .cloned(),
                        );
                    }
                    refused_services(
                        runner,
                        family,
                        &rs,
                        previous.map(|p| &p.rules),
                        candidates,
                        &input,
                    )
                    .instrument(tracing::info_span!("find-refused", %family))
                    .await
                }
                _ => BTreeMap::new(),
            };
            if refused.is_empty() {
                // Not one service's fault: the kernel kept its previous rules; make
                // sure the next sync rewrites all.
                state.applied = None;
                state.jumps_ensured = false;
                return Err(fail("restore", e));
            }
            let keep: BTreeSet<ServicePortName> = refused.keys().cloned().collect();
            for (service, message) in refused {
                debug!(%family, service = %service, error = %message, "the kernel refuses this service's rules");
                rejected.push(Rejected {
                    family,
                    service,
                    reason: RejectReason::Kernel,
                    message,
                });
            }
            rs = rs.with_services_from(&keep, previous.map(|p| &p.rules));
            planned = input(&rs);
            if !planned.text.is_empty()
                && let Err(e) = restore(runner, family, &planned.text).await
            {
                state.applied = None;
                state.jumps_ensured = false;
                return Err(fail("restore", e));
            }
        }

        let mut udp = conntrack::udp_ports(view);
        // A rejected service's old rules are still in effect: so are its flows.
        for r in &rejected {
            match state.applied.as_ref().and_then(|a| a.udp.get(&r.service)) {
                Some(old) => {
                    udp.insert(r.service.clone(), old.clone());
                }
                None => {
                    udp.remove(&r.service);
                }
            }
        }
        let mut deleted = 0;
        if cfg.conntrack_cleanup {
            let previous = state.applied.as_ref().map(|a| &a.udp);
            let jobs = conntrack::stale(previous, &udp);
            if !jobs.is_empty() {
                let span = tracing::info_span!("conntrack-cleanup", %family, jobs = jobs.len());
                async {
                    for job in jobs {
                        match conntrack::delete(runner, family, &job).await {
                            Ok(n) => deleted += n,
                            Err(e) => warn!(%family, error = %e, "conntrack cleanup failed"),
                        }
                    }
                }
                .instrument(span)
                .await;
            }
        }
        let report = SyncReport {
            full,
            rules_written: planned.written as u64,
            tables: TableRules::iptables(rs.filter_rule_count as u64, rs.nat_rule_count as u64),
            conntrack_deleted: deleted,
            rejected,
        };
        state.applied = Some(Applied {
            written: Written {
                services: planned.hashes,
                active_chains: planned.active,
                top: planned.top,
            },
            udp,
            rules: rs,
        });
        Ok(report)
    }
}

/// The service ports among `candidates` whose new rules the kernel refuses, with
/// what `iptables-restore` said; empty when the kernel refuses the input without
/// any of them too (then the failure is not theirs).
///
/// This bisects with real restores, not `--test`: the nft variant's `--test`
/// neither sends the batch to the kernel nor checks jump targets, so it passes
/// inputs the kernel refuses (a busy chain, an undeclared one). Every input tried
/// is a consistent ruleset (each service either all old or all new), and a
/// refused input changes nothing, so the kernel only ever moves between such
/// rulesets. (A full sync in several transactions may have committed the ones
/// before the refused one: those hold whole services, not yet reachable when new,
/// and every later full input rewrites them and deletes the chains it does not
/// use, so the same holds.) Services whose new rules were accepted keep them; each set that
/// fails is halved until the refused services are alone. Rules of different
/// services do not refer to each other, so about 2 log2(n) restores find each
/// refused service.
async fn refused_services(
    runner: &Runner,
    family: IpFamily,
    rs: &RuleSet,
    previous: Option<&RuleSet>,
    candidates: Vec<ServicePortName>,
    input: &impl Fn(&RuleSet) -> Planned,
) -> BTreeMap<ServicePortName, String> {
    let all: BTreeSet<ServicePortName> = candidates.iter().cloned().collect();
    // Programs the new rules of `new` only; the other candidates keep their old ones.
    let apply = |new: &BTreeSet<ServicePortName>| {
        let keep: BTreeSet<ServicePortName> = all.difference(new).cloned().collect();
        let text = input(&rs.with_services_from(&keep, previous)).text;
        async move {
            if text.is_empty() {
                return Ok(());
            }
            restore(runner, family, &text).await
        }
    };
    let mut refused = BTreeMap::new();
    let mut accepted: BTreeSet<ServicePortName> = BTreeSet::new();
    if apply(&accepted).await.is_err() {
        return refused;
    }
    let mut stack = vec![candidates];
    let mut runs = 1;
    while let Some(set) = stack.pop() {
        if set.is_empty() {
            continue;
        }
        runs += 1;
        let mut attempt = accepted.clone();
        attempt.extend(set.iter().cloned());
        match apply(&attempt).await {
            Ok(()) => accepted = attempt,
            Err(e) if set.len() == 1 => {
                refused.insert(set[0].clone(), e.to_string());
            }
            Err(_) => {
                let mut set = set;
                let second = set.split_off(set.len() / 2);
                stack.push(second);
                stack.push(set);
            }
        }
    }
    debug!(%family, runs, refused = refused.len(), "bisected the refused restore");
    refused
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
            let r = Self::apply_family(&self.runner, &self.cfg, state, view, desired.full).await?;
            total.full &= r.full;
            total.rules_written += r.rules_written;
            TableRules::add(&mut total.tables, &r.tables);
            total.conntrack_deleted += r.conntrack_deleted;
            total.rejected.extend(r.rejected);
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
            let ok = canary_ok(&self.runner, &names, family, localhost).await;
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
        local: cfg.detect_local.detector(
            cfg.cluster_cidrs
                .iter()
                .find(|n| family.matches_net(n))
                .copied(),
            view.node_pod_cidrs.first().copied(),
        ),
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
pub async fn restore(runner: &Runner, family: IpFamily, text: &str) -> Result<()> {
    let command = tool(family, "-restore");
    let out = runner
        .run(&command, &["--noflush", "--counters", "-w"], Some(text))
        .await?;
    if out.success {
        return Ok(());
    }
    let mut stderr = out.stderr.trim().to_string();
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
    Err(netfilter::Error::Failed {
        command,
        status: out.status,
        stderr,
    }
    .into())
}

/// Whether `iptables-restore` (`ip6tables-restore`) is the nf_tables variant:
/// its `--version` says `(nf_tables)`. False when it cannot be asked.
pub async fn is_nft(runner: &Runner, family: IpFamily) -> bool {
    runner
        .run(&tool(family, "-restore"), &["--version"], None)
        .await
        .is_ok_and(|o| o.success && o.stdout.contains("nf_tables"))
}

/// The chains of a table, from `iptables-save -t <table>`.
pub async fn save_chains(runner: &Runner, family: IpFamily, table: &str) -> Result<Vec<String>> {
    let command = tool(family, "-save");
    let out = runner.output(&command, &["-t", table], None).await?;
    Ok(out
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
    runner: &Runner,
    names: &ChainNames,
    family: IpFamily,
    localhost_nodeports: bool,
) -> Result<()> {
    let jumps = jump_rules(names, family, localhost_nodeports);
    let canary = &names.canary;
    let chains = ["mangle", "nat", "filter"].map(|table| (table, canary.clone()));
    jumps::ensure(runner, family, chains.to_vec(), jumps)
        .await
        .map_err(|reason| Error::Jumps { family, reason })
}

/// The canary: our canary chain in mangle, nat and filter, and the tail rule of
/// `KUBE-SERVICES` (gone when someone flushes that chain).
async fn canary_ok(
    runner: &Runner,
    names: &ChainNames,
    family: IpFamily,
    localhost_nodeports: bool,
) -> bool {
    for table in ["mangle", "nat", "filter"] {
        if !jumps::chain_exists(runner, family, table, &names.canary)
            .await
            .unwrap_or(false)
        {
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
    jumps::rule_exists(runner, family, "nat", &names.services, &tail)
        .await
        .unwrap_or(false)
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
