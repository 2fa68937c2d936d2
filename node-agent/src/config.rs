//! Command line and environment: every flag also reads `MESHLITE_<FLAG>`.
//!
//! [`Cli`] is what clap parses; [`RunArgs::validate`] turns it into the typed
//! [`Config`] the agent runs with (a pure function, tested without a process).
//! Invalid configuration exits 64; `--check-config` prints the effective
//! configuration and exits without starting anything or reading certificate files.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;
use serde::Serialize;

use meshlite_runtime::process::args::{AgentConnectArgs, LogArgs};

use crate::iptables::{IptablesConfig, chains};
use crate::ipvs::netlink::Timeouts;
use crate::ipvs::{IpvsConfig, Scheduler};
use crate::local::{DetectLocalMode, DetectLocalModeName};
use crate::proxy::IpFamily;

/// Invalid configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--{flag} is required")]
    Missing { flag: &'static str },
    #[error("--{flag} {value:?}: {reason}")]
    Invalid {
        flag: &'static str,
        value: String,
        reason: String,
    },
}

#[derive(Debug, Parser)]
#[command(
    name = "meshlite-node-agent",
    version,
    about = "meshlite node agent: programs Services into the kernel (kube-proxy's iptables or IPVS mode)",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print what the agent would program for a directory of manifests (the exact
    /// iptables-restore input, or with --mode ipvs the IPVS table, ipsets and rules),
    /// without a control plane and without touching the kernel.
    Render(Box<RenderArgs>),
    /// Remove every rule either mode programmed (iptables and ip6tables chains and
    /// jumps, ipsets, IPVS virtual servers outside --ipvs-exclude-cidrs, the dummy
    /// interface) and exit, like `kube-proxy --cleanup`. Stop the agent first: it
    /// would put its rules back.
    Cleanup(CleanupArgs),
    /// Trace one new connection through this node's rules (the live kernel state,
    /// or with --manifests what `render` would write) and print the rules it
    /// matches, the verdict, the endpoints with their probability and whether it
    /// is masqueraded. Exit 0 whatever the verdict; 64 for bad input.
    Explain(Box<crate::explain::cli::ExplainArgs>),
}

/// What `cleanup` removes.
#[derive(Debug, Args)]
pub struct CleanupArgs {
    /// Chain and ipset prefix the agent ran with.
    #[arg(long, env = "MESHLITE_CHAIN_PREFIX", default_value = "KUBE")]
    pub chain_prefix: String,
    /// The IPVS mode's dummy interface.
    #[arg(long, env = "MESHLITE_IPVS_INTERFACE", default_value = "kube-ipvs0")]
    pub ipvs_interface: String,
    /// Virtual servers in these CIDRs are not ours: left in place.
    #[arg(long, env = "MESHLITE_IPVS_EXCLUDE_CIDRS", value_delimiter = ',')]
    pub ipvs_exclude_cidrs: Vec<IpNet>,
}

/// The node agent (default command).
#[derive(Debug, Args)]
pub struct RunArgs {
    /// `--control-plane` (https://host:port with mTLS, or http://host:port with
    /// --insecure) and the TLS flags. The client certificate has SAN
    /// `<node>.nodes.meshlite`, or `node-agent` with --identity-token-file.
    #[command(flatten)]
    pub connect: AgentConnectArgs,
    /// This node's name (the Node object and endpoints' nodeName).
    #[arg(long, env = "MESHLITE_NODE_NAME")]
    pub node_name: Option<String>,
    /// The pod's projected ServiceAccount token (audience `meshlite`), sent to prove
    /// which node this is when the control plane runs --node-identity token.
    #[arg(long, env = "MESHLITE_IDENTITY_TOKEN_FILE")]
    pub identity_token_file: Option<PathBuf>,
    /// /metrics, /healthz, /livez, /readyz.
    #[arg(long, env = "MESHLITE_ADMIN_LISTEN", default_value = "127.0.0.1:10249")]
    pub admin_listen: String,
    /// kube-proxy's metrics address: a second listener with the same endpoints as
    /// --admin-listen, for setups that scrape kube-proxy's port. Unset: none.
    #[arg(long, env = "MESHLITE_METRICS_BIND_ADDRESS")]
    pub metrics_bind_address: Option<String>,
    /// kube-proxy's health endpoint: /healthz and /livez.
    #[arg(
        long,
        env = "MESHLITE_HEALTHZ_BIND_ADDRESS",
        default_value = "0.0.0.0:10256"
    )]
    pub healthz_bind_address: String,
    /// Write the bound addresses as JSON ({"admin": .., "healthz": ..}).
    #[arg(long, env = "MESHLITE_ADDRESSES_FILE")]
    pub addresses_file: Option<PathBuf>,
    /// Proxy mode: iptables (kube-proxy's iptables mode) or ipvs.
    #[arg(
        long = "mode",
        alias = "backend",
        env = "MESHLITE_MODE",
        value_enum,
        default_value = "iptables"
    )]
    pub backend: BackendKind,
    #[command(flatten)]
    pub ipvs: IpvsArgs,
    #[command(flatten)]
    pub rules: RuleArgs,
    /// IP families to proxy.
    #[arg(
        long,
        env = "MESHLITE_IP_FAMILIES",
        value_enum,
        value_delimiter = ',',
        default_value = "ipv4,ipv6"
    )]
    pub ip_families: Vec<FamilyArg>,
    /// Full resync period.
    #[arg(long, env = "MESHLITE_SYNC_PERIOD", default_value = "30s", value_parser = humantime::parse_duration)]
    pub sync_period: Duration,
    /// Minimum time between two syncs.
    #[arg(long, env = "MESHLITE_MIN_SYNC_PERIOD", default_value = "1s", value_parser = humantime::parse_duration)]
    pub min_sync_period: Duration,
    /// How often to check that the rules were not flushed externally.
    #[arg(long, env = "MESHLITE_CANARY_PERIOD", default_value = "10s", value_parser = humantime::parse_duration)]
    pub canary_period: Duration,
    /// Address the health-check node port servers listen on.
    #[arg(long, env = "MESHLITE_HEALTH_CHECK_ADDRESS", default_value = "0.0.0.0")]
    pub health_check_address: IpAddr,
    /// Delete stale UDP conntrack entries after syncs (needs the conntrack tool).
    #[arg(long, env = "MESHLITE_CONNTRACK_CLEANUP", default_value_t = true, action = ArgAction::Set)]
    pub conntrack_cleanup: bool,
    #[command(flatten)]
    pub log: LogArgs,
    /// Validate the configuration, print it as JSON and exit.
    #[arg(long, env = "MESHLITE_CHECK_CONFIG")]
    pub check_config: bool,
}

/// Flags that shape the rules (shared by the agent and `render`).
#[derive(Debug, Args, Clone)]
pub struct RuleArgs {
    /// Chain prefix; KUBE gives kube-proxy's chain names.
    #[arg(long, env = "MESHLITE_CHAIN_PREFIX", default_value = "KUBE")]
    pub chain_prefix: String,
    /// Pod CIDRs (one per family): off-cluster traffic to ClusterIPs is masqueraded.
    #[arg(long, env = "MESHLITE_CLUSTER_CIDR", value_delimiter = ',')]
    pub cluster_cidr: Vec<IpNet>,
    /// How traffic from local pods is recognised (kube-proxy's --detect-local-mode):
    /// ClusterCIDR (--cluster-cidr), NodeCIDR (the Node's spec.podCIDRs),
    /// BridgeInterface (--pod-bridge-interface), InterfaceNamePrefix
    /// (--pod-interface-name-prefix).
    #[arg(
        long,
        env = "MESHLITE_DETECT_LOCAL_MODE",
        value_enum,
        default_value = "ClusterCIDR"
    )]
    pub detect_local_mode: DetectLocalModeName,
    /// The bridge pods are attached to, for --detect-local-mode BridgeInterface.
    #[arg(long, env = "MESHLITE_POD_BRIDGE_INTERFACE")]
    pub pod_bridge_interface: Option<String>,
    /// The name prefix of pod interfaces, for --detect-local-mode InterfaceNamePrefix.
    #[arg(long, env = "MESHLITE_POD_INTERFACE_NAME_PREFIX")]
    pub pod_interface_name_prefix: Option<String>,
    /// This node's IPs (default: its Node object's addresses).
    #[arg(long, env = "MESHLITE_NODE_IP", value_delimiter = ',')]
    pub node_ip: Vec<IpAddr>,
    /// Masquerade all traffic to ClusterIPs.
    #[arg(long, env = "MESHLITE_MASQUERADE_ALL")]
    pub masquerade_all: bool,
    /// Bit of the packet mark that means "masquerade" (14 = 0x4000).
    #[arg(long, env = "MESHLITE_MASQUERADE_BIT", default_value_t = 14)]
    pub masquerade_bit: u8,
    /// NodePorts also answer on 127.0.0.1 (sets route_localnet).
    #[arg(long, env = "MESHLITE_LOCALHOST_NODEPORTS", default_value_t = true, action = ArgAction::Set)]
    pub localhost_nodeports: bool,
    /// MASQUERADE --random-fully.
    #[arg(long, env = "MESHLITE_RANDOM_FULLY", default_value_t = true, action = ArgAction::Set)]
    pub random_fully: bool,
    /// NodePorts answer only on node IPs within these CIDRs (kube-proxy's
    /// --nodeport-addresses); default: every local address.
    #[arg(long, env = "MESHLITE_NODEPORT_ADDRESSES", value_delimiter = ',')]
    pub nodeport_addresses: Vec<IpNet>,
}

/// Flags of the IPVS mode (shared by the agent and `render`).
#[derive(Debug, Args, Clone)]
pub struct IpvsArgs {
    /// IPVS scheduler for --mode ipvs: rr, wrr, lc, dh, sh, sed, nq (per service:
    /// annotation meshlite.io/ipvs-scheduler).
    #[arg(long, env = "MESHLITE_IPVS_SCHEDULER", default_value = "rr")]
    pub ipvs_scheduler: String,
    /// The dummy interface that holds the service IPs in --mode ipvs.
    #[arg(long, env = "MESHLITE_IPVS_INTERFACE", default_value = "kube-ipvs0")]
    pub ipvs_interface: String,
    /// Longest a removed real server is kept at weight 0 for its connections to
    /// drain before it is deleted (--mode ipvs).
    #[arg(long, env = "MESHLITE_IPVS_GRACEFUL_TERMINATION_TIMEOUT", default_value = "15m", value_parser = humantime::parse_duration)]
    pub ipvs_graceful_termination_timeout: Duration,
    /// Virtual servers in these CIDRs are not ours: never modified or deleted.
    #[arg(long, env = "MESHLITE_IPVS_EXCLUDE_CIDRS", value_delimiter = ',')]
    pub ipvs_exclude_cidrs: Vec<IpNet>,
    /// Set net.ipv4.conf.all.arp_ignore=1 and arp_announce=2 (kube-proxy's strictARP).
    #[arg(long, env = "MESHLITE_IPVS_STRICT_ARP")]
    pub ipvs_strict_arp: bool,
    /// IPVS timeout of idle TCP connections (whole seconds; 0: leave the kernel's).
    #[arg(long, env = "MESHLITE_IPVS_TCP_TIMEOUT", default_value = "0s", value_parser = humantime::parse_duration)]
    pub ipvs_tcp_timeout: Duration,
    /// IPVS timeout of TCP connections after a FIN (whole seconds; 0: leave the kernel's).
    #[arg(long, env = "MESHLITE_IPVS_TCPFIN_TIMEOUT", default_value = "0s", value_parser = humantime::parse_duration)]
    pub ipvs_tcpfin_timeout: Duration,
    /// IPVS timeout of UDP flows (whole seconds; 0: leave the kernel's).
    #[arg(long, env = "MESHLITE_IPVS_UDP_TIMEOUT", default_value = "0s", value_parser = humantime::parse_duration)]
    pub ipvs_udp_timeout: Duration,
}

#[derive(Debug, Args)]
pub struct RenderArgs {
    /// Directory of Service, EndpointSlice and Node manifests.
    #[arg(long, env = "MESHLITE_MANIFESTS")]
    pub manifests: PathBuf,
    #[arg(long, env = "MESHLITE_NODE_NAME")]
    pub node_name: String,
    /// Which table set to print (iptables-restore or ip6tables-restore input).
    #[arg(long, env = "MESHLITE_IP_FAMILY", value_enum, default_value = "ipv4")]
    pub ip_family: FamilyArg,
    /// iptables: the iptables-restore input. ipvs: the virtual and real servers
    /// (as `ipvsadm -Ln` lists them), the dummy interface's addresses, the ipset
    /// members and the iptables rules.
    #[arg(
        long = "mode",
        alias = "backend",
        env = "MESHLITE_MODE",
        value_enum,
        default_value = "iptables"
    )]
    pub backend: BackendKind,
    #[command(flatten)]
    pub ipvs: IpvsArgs,
    #[command(flatten)]
    pub rules: RuleArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Iptables,
    Ipvs,
    Nftables,
}

// === impl BackendKind ===

impl BackendKind {
    /// Every mode, in the order `cleanup` removes them (rules before the ipsets
    /// they match).
    pub const ALL: [Self; 3] = [Self::Iptables, Self::Ipvs, Self::Nftables];
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FamilyArg {
    Ipv4,
    Ipv6,
}

/// The validated configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub control_plane: String,
    pub node_name: String,
    pub insecure: bool,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub server_name: Option<String>,
    pub identity_token_file: Option<PathBuf>,
    pub admin_listen: String,
    pub metrics_bind_address: Option<String>,
    pub healthz_bind_address: String,
    pub addresses_file: Option<PathBuf>,
    pub backend: BackendKind,
    pub ipvs_scheduler: String,
    pub ipvs_interface: String,
    #[serde(with = "humantime_serde_shim")]
    pub ipvs_graceful_termination_timeout: Duration,
    pub ipvs_exclude_cidrs: Vec<IpNet>,
    pub ipvs_strict_arp: bool,
    #[serde(with = "humantime_serde_shim")]
    pub ipvs_tcp_timeout: Duration,
    #[serde(with = "humantime_serde_shim")]
    pub ipvs_tcpfin_timeout: Duration,
    #[serde(with = "humantime_serde_shim")]
    pub ipvs_udp_timeout: Duration,
    pub chain_prefix: String,
    pub cluster_cidrs: Vec<IpNet>,
    #[serde(serialize_with = "serialize_mode_name")]
    pub detect_local_mode: DetectLocalModeName,
    pub pod_bridge_interface: Option<String>,
    pub pod_interface_name_prefix: Option<String>,
    pub node_ips: Vec<IpAddr>,
    pub masquerade_all: bool,
    pub masquerade_bit: u8,
    pub localhost_nodeports: bool,
    pub random_fully: bool,
    pub nodeport_addresses: Vec<IpNet>,
    pub ip_families: Vec<String>,
    #[serde(with = "humantime_serde_shim")]
    pub sync_period: Duration,
    #[serde(with = "humantime_serde_shim")]
    pub min_sync_period: Duration,
    #[serde(with = "humantime_serde_shim")]
    pub canary_period: Duration,
    pub health_check_address: IpAddr,
    pub conntrack_cleanup: bool,
    pub log_json: bool,
    #[serde(skip)]
    families: Vec<IpFamily>,
}

fn serialize_mode_name<S: serde::Serializer>(
    v: &DetectLocalModeName,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v.to_possible_value() {
        Some(p) => s.serialize_str(p.get_name()),
        None => s.serialize_str(&format!("{v:?}")),
    }
}

mod humantime_serde_shim {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

// === impl FamilyArg ===

impl From<FamilyArg> for IpFamily {
    fn from(f: FamilyArg) -> Self {
        match f {
            FamilyArg::Ipv4 => IpFamily::V4,
            FamilyArg::Ipv6 => IpFamily::V6,
        }
    }
}

// === impl RuleArgs ===

impl RuleArgs {
    /// Checks the rule-shaping flags.
    pub fn validate(&self) -> Result<(), ConfigError> {
        chains::validate_prefix(&self.chain_prefix).map_err(|reason| ConfigError::Invalid {
            flag: "chain-prefix",
            value: self.chain_prefix.clone(),
            reason,
        })?;
        if self.masquerade_bit > 31 {
            return Err(ConfigError::Invalid {
                flag: "masquerade-bit",
                value: self.masquerade_bit.to_string(),
                reason: "must be 0..=31".into(),
            });
        }
        self.detect_local()?;
        for fam in [IpFamily::V4, IpFamily::V6] {
            let n = self
                .cluster_cidr
                .iter()
                .filter(|c| fam.matches_net(c))
                .count();
            if n > 1 {
                return Err(ConfigError::Invalid {
                    flag: "cluster-cidr",
                    value: format!("{:?}", self.cluster_cidr),
                    reason: format!("at most one {fam} CIDR"),
                });
            }
        }
        Ok(())
    }

    /// `--detect-local-mode` with the interface flag it needs.
    pub fn detect_local(&self) -> Result<DetectLocalMode, ConfigError> {
        DetectLocalMode::try_new(
            self.detect_local_mode,
            self.pod_bridge_interface.as_deref(),
            self.pod_interface_name_prefix.as_deref(),
        )
        .map_err(|e| ConfigError::Invalid {
            flag: "detect-local-mode",
            value: format!("{:?}", self.detect_local_mode),
            reason: e.to_string(),
        })
    }

    /// The iptables backend configuration these flags describe (validated first).
    pub fn iptables(&self, families: Vec<IpFamily>, conntrack_cleanup: bool) -> IptablesConfig {
        IptablesConfig {
            prefix: self.chain_prefix.clone(),
            families,
            cluster_cidrs: self.cluster_cidr.iter().map(|c| c.trunc()).collect(),
            detect_local: self.detect_local().unwrap_or_default(),
            masquerade_all: self.masquerade_all,
            masquerade_bit: self.masquerade_bit,
            node_ips: self.node_ip.clone(),
            localhost_nodeports: self.localhost_nodeports,
            random_fully: self.random_fully,
            conntrack_cleanup,
            nodeport_addresses: self.nodeport_addresses.iter().map(|c| c.trunc()).collect(),
        }
    }
}

// === impl IpvsArgs ===

impl IpvsArgs {
    /// Checks the IPVS flags.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.scheduler()?;
        let name = &self.ipvs_interface;
        // IFNAMSIZ is 16 with the terminating NUL.
        if name.is_empty()
            || name.len() > 15
            || name.contains(|c: char| c == '/' || c.is_whitespace())
        {
            return Err(ConfigError::Invalid {
                flag: "ipvs-interface",
                value: name.clone(),
                reason: "must be an interface name of 1 to 15 characters".into(),
            });
        }
        if self.ipvs_graceful_termination_timeout.is_zero() {
            return Err(ConfigError::Invalid {
                flag: "ipvs-graceful-termination-timeout",
                value: "0s".into(),
                reason: "must be positive".into(),
            });
        }
        for (flag, d) in [
            ("ipvs-tcp-timeout", self.ipvs_tcp_timeout),
            ("ipvs-tcpfin-timeout", self.ipvs_tcpfin_timeout),
            ("ipvs-udp-timeout", self.ipvs_udp_timeout),
        ] {
            if d.subsec_nanos() != 0 || u32::try_from(d.as_secs()).is_err() {
                return Err(ConfigError::Invalid {
                    flag,
                    value: humantime::format_duration(d).to_string(),
                    reason: "must be whole seconds (IPVS keeps its timeouts in seconds)".into(),
                });
            }
        }
        Ok(())
    }

    /// The connection timeouts to set at start.
    pub fn timeouts(&self) -> Timeouts {
        Timeouts {
            tcp: self.ipvs_tcp_timeout,
            tcp_fin: self.ipvs_tcpfin_timeout,
            udp: self.ipvs_udp_timeout,
        }
    }

    /// The default scheduler.
    pub fn scheduler(&self) -> Result<Scheduler, ConfigError> {
        self.ipvs_scheduler
            .parse()
            .map_err(|reason| ConfigError::Invalid {
                flag: "ipvs-scheduler",
                value: self.ipvs_scheduler.clone(),
                reason,
            })
    }

    /// The IPVS backend configuration these flags and `rules` describe.
    pub fn config(
        &self,
        rules: &RuleArgs,
        families: Vec<IpFamily>,
        conntrack_cleanup: bool,
    ) -> Result<IpvsConfig, ConfigError> {
        Ok(IpvsConfig {
            prefix: rules.chain_prefix.clone(),
            families,
            scheduler: self.scheduler()?,
            interface: self.ipvs_interface.clone(),
            cluster_cidrs: rules.cluster_cidr.iter().map(|c| c.trunc()).collect(),
            detect_local: rules.detect_local()?,
            masquerade_all: rules.masquerade_all,
            masquerade_bit: rules.masquerade_bit,
            random_fully: rules.random_fully,
            node_ips: rules.node_ip.clone(),
            nodeport_addresses: rules.nodeport_addresses.iter().map(|c| c.trunc()).collect(),
            graceful_timeout: self.ipvs_graceful_termination_timeout,
            exclude_cidrs: self.ipvs_exclude_cidrs.iter().map(|c| c.trunc()).collect(),
            strict_arp: self.ipvs_strict_arp,
            timeouts: self.timeouts(),
            conntrack_cleanup,
        })
    }
}

// === impl RunArgs ===

impl RunArgs {
    /// Validates the flags into a [`Config`]. Reads no files.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let node_name = self
            .node_name
            .filter(|n| !n.is_empty())
            .ok_or(ConfigError::Missing { flag: "node-name" })?;
        let connect = &self.connect;
        let control_plane = connect
            .control_plane
            .clone()
            .filter(|n| !n.is_empty())
            .ok_or(ConfigError::Missing {
                flag: "control-plane",
            })?;
        // The new spellings win over the old ones (kept, hidden, for one release).
        let ca = connect.tls_ca.clone().or_else(|| connect.ca.clone());
        let server_name = connect
            .tls_server_name
            .clone()
            .or_else(|| connect.server_name.clone());
        let insecure = connect.insecure;
        let invalid = |flag, value: &str, reason: &str| ConfigError::Invalid {
            flag,
            value: value.to_string(),
            reason: reason.to_string(),
        };
        if insecure {
            if !control_plane.starts_with("http://") {
                return Err(invalid(
                    "control-plane",
                    &control_plane,
                    "with --insecure the endpoint must be http://",
                ));
            }
        } else {
            if !control_plane.starts_with("https://") {
                return Err(invalid(
                    "control-plane",
                    &control_plane,
                    "must be https:// (or http:// with --insecure)",
                ));
            }
            for (flag, v) in [
                ("tls-ca", &ca),
                ("tls-cert", &connect.tls_cert),
                ("tls-key", &connect.tls_key),
            ] {
                if v.is_none() {
                    return Err(ConfigError::Missing { flag });
                }
            }
        }
        let metrics_addr = self.metrics_bind_address.clone().unwrap_or_default();
        for (flag, addr) in [
            ("admin-listen", &self.admin_listen),
            ("healthz-bind-address", &self.healthz_bind_address),
            ("metrics-bind-address", &metrics_addr),
        ] {
            if addr.is_empty() {
                continue;
            }
            meshlite_runtime::admin::parse_listen(addr)
                .map_err(|e| invalid(flag, addr, &e.to_string()))?;
        }
        self.rules.validate()?;
        if self.sync_period.is_zero() {
            return Err(invalid("sync-period", "0s", "must be positive"));
        }
        if self.min_sync_period > self.sync_period {
            return Err(invalid(
                "min-sync-period",
                &humantime::format_duration(self.min_sync_period).to_string(),
                "must not exceed --sync-period",
            ));
        }
        if self.canary_period.is_zero() {
            return Err(invalid("canary-period", "0s", "must be positive"));
        }
        let mut families: Vec<IpFamily> = Vec::new();
        for f in &self.ip_families {
            let f = IpFamily::from(*f);
            if !families.contains(&f) {
                families.push(f);
            }
        }
        if families.is_empty() {
            return Err(ConfigError::Missing {
                flag: "ip-families",
            });
        }
        self.ipvs.validate()?;
        Ok(Config {
            control_plane,
            node_name,
            insecure,
            ca,
            cert: self.connect.tls_cert,
            key: self.connect.tls_key,
            server_name,
            identity_token_file: self.identity_token_file,
            admin_listen: self.admin_listen,
            metrics_bind_address: self.metrics_bind_address,
            healthz_bind_address: self.healthz_bind_address,
            addresses_file: self.addresses_file,
            backend: self.backend,
            ipvs_scheduler: self.ipvs.ipvs_scheduler,
            ipvs_interface: self.ipvs.ipvs_interface,
            ipvs_graceful_termination_timeout: self.ipvs.ipvs_graceful_termination_timeout,
            ipvs_exclude_cidrs: self.ipvs.ipvs_exclude_cidrs,
            ipvs_strict_arp: self.ipvs.ipvs_strict_arp,
            ipvs_tcp_timeout: self.ipvs.ipvs_tcp_timeout,
            ipvs_tcpfin_timeout: self.ipvs.ipvs_tcpfin_timeout,
            ipvs_udp_timeout: self.ipvs.ipvs_udp_timeout,
            chain_prefix: self.rules.chain_prefix.clone(),
            cluster_cidrs: self.rules.cluster_cidr.clone(),
            detect_local_mode: self.rules.detect_local_mode,
            pod_bridge_interface: self.rules.pod_bridge_interface.clone(),
            pod_interface_name_prefix: self.rules.pod_interface_name_prefix.clone(),
            node_ips: self.rules.node_ip.clone(),
            masquerade_all: self.rules.masquerade_all,
            masquerade_bit: self.rules.masquerade_bit,
            localhost_nodeports: self.rules.localhost_nodeports,
            random_fully: self.rules.random_fully,
            nodeport_addresses: self.rules.nodeport_addresses.clone(),
            ip_families: families.iter().map(|f| f.to_string()).collect(),
            sync_period: self.sync_period,
            min_sync_period: self.min_sync_period,
            canary_period: self.canary_period,
            health_check_address: self.health_check_address,
            conntrack_cleanup: self.conntrack_cleanup,
            log_json: self.log.json(),
            families,
        })
    }
}

// === impl Config ===

impl Config {
    pub fn families(&self) -> &[IpFamily] {
        &self.families
    }

    /// The IPVS backend configuration.
    pub fn ipvs(&self) -> IpvsConfig {
        let rules = self.rule_args();
        // Validated in `RunArgs::validate`.
        let detect_local = rules.detect_local().unwrap_or_default();
        IpvsConfig {
            prefix: rules.chain_prefix,
            families: self.families.clone(),
            // Validated in `RunArgs::validate`.
            scheduler: self.ipvs_scheduler.parse().unwrap_or(Scheduler::Rr),
            interface: self.ipvs_interface.clone(),
            cluster_cidrs: rules.cluster_cidr.iter().map(|c| c.trunc()).collect(),
            detect_local,
            masquerade_all: rules.masquerade_all,
            masquerade_bit: rules.masquerade_bit,
            random_fully: rules.random_fully,
            node_ips: rules.node_ip,
            nodeport_addresses: rules.nodeport_addresses.iter().map(|c| c.trunc()).collect(),
            graceful_timeout: self.ipvs_graceful_termination_timeout,
            exclude_cidrs: self.ipvs_exclude_cidrs.iter().map(|c| c.trunc()).collect(),
            strict_arp: self.ipvs_strict_arp,
            timeouts: Timeouts {
                tcp: self.ipvs_tcp_timeout,
                tcp_fin: self.ipvs_tcpfin_timeout,
                udp: self.ipvs_udp_timeout,
            },
            conntrack_cleanup: self.conntrack_cleanup,
        }
    }

    fn rule_args(&self) -> RuleArgs {
        RuleArgs {
            chain_prefix: self.chain_prefix.clone(),
            cluster_cidr: self.cluster_cidrs.clone(),
            detect_local_mode: self.detect_local_mode,
            pod_bridge_interface: self.pod_bridge_interface.clone(),
            pod_interface_name_prefix: self.pod_interface_name_prefix.clone(),
            node_ip: self.node_ips.clone(),
            masquerade_all: self.masquerade_all,
            masquerade_bit: self.masquerade_bit,
            localhost_nodeports: self.localhost_nodeports,
            random_fully: self.random_fully,
            nodeport_addresses: self.nodeport_addresses.clone(),
        }
    }

    /// `--detect-local-mode` (validated in `RunArgs::validate`).
    pub fn detect_local(&self) -> DetectLocalMode {
        self.rule_args().detect_local().unwrap_or_default()
    }

    /// The iptables backend configuration.
    pub fn iptables(&self) -> IptablesConfig {
        self.rule_args()
            .iptables(self.families.clone(), self.conntrack_cleanup)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let mut v = vec!["meshlite-node-agent"];
        v.extend_from_slice(args);
        let cli = Cli::try_parse_from(v).map_err(|e| e.to_string())?;
        cli.run.validate().map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_follow_kube_proxy() {
        let c = parse(&[
            "--node-name",
            "n1",
            "--control-plane",
            "http://127.0.0.1:1",
            "--insecure",
        ])
        .unwrap();
        assert_eq!(c.admin_listen, "127.0.0.1:10249");
        assert_eq!(c.healthz_bind_address, "0.0.0.0:10256");
        assert_eq!(c.sync_period, Duration::from_secs(30));
        assert_eq!(c.min_sync_period, Duration::from_secs(1));
        assert_eq!(c.chain_prefix, "KUBE");
        assert_eq!(c.families(), [IpFamily::V4, IpFamily::V6]);
        assert_eq!(c.iptables().masquerade_bit, 14);
    }

    #[test]
    fn mode_ipvs_builds_the_ipvs_config() {
        let c = parse(&[
            "--node-name=n1",
            "--control-plane=http://127.0.0.1:1",
            "--insecure",
            "--mode=ipvs",
            "--ipvs-scheduler=sed",
            "--cluster-cidr=198.18.0.0/17",
            "--ipvs-exclude-cidrs=198.51.100.7/24",
            "--ipvs-tcp-timeout=15m",
            "--ipvs-udp-timeout=45s",
        ])
        .unwrap();
        assert_eq!(c.backend, BackendKind::Ipvs);
        let i = c.ipvs();
        assert_eq!(i.scheduler, Scheduler::Sed);
        assert_eq!(i.interface, "kube-ipvs0");
        assert_eq!(i.graceful_timeout, Duration::from_secs(15 * 60));
        assert_eq!(i.cluster_cidrs, ["198.18.0.0/17".parse::<IpNet>().unwrap()]);
        assert_eq!(
            i.exclude_cidrs,
            ["198.51.100.0/24".parse::<IpNet>().unwrap()]
        );
        assert_eq!(i.masquerade_bit, 14);
        // Unset timeouts stay zero: the kernel's are left alone.
        assert_eq!(
            i.timeouts,
            Timeouts {
                tcp: Duration::from_secs(900),
                tcp_fin: Duration::ZERO,
                udp: Duration::from_secs(45),
            }
        );
    }

    #[test]
    fn metrics_bind_address_is_a_second_listener() {
        let c = parse(&[
            "--node-name=n1",
            "--control-plane=http://127.0.0.1:1",
            "--insecure",
            "--admin-listen=0.0.0.0:9591",
            "--metrics-bind-address=127.0.0.1:0",
        ])
        .unwrap();
        assert_eq!(c.admin_listen, "0.0.0.0:9591");
        assert_eq!(c.metrics_bind_address.as_deref(), Some("127.0.0.1:0"));
        assert!(
            parse(&[
                "--node-name=n1",
                "--control-plane=http://127.0.0.1:1",
                "--insecure",
                "--metrics-bind-address=nope",
            ])
            .is_err()
        );
    }

    #[test]
    fn invalid_configurations_are_rejected_with_the_flag_named() {
        let base = ["--node-name=n1", "--control-plane=https://cp:8443"];
        let err = parse(&base).unwrap_err();
        assert!(err.contains("--tls-ca"), "{err}");
        let err = parse(&["--control-plane=http://x:1", "--insecure"]).unwrap_err();
        assert!(err.contains("--node-name"), "{err}");
        let err =
            parse(&["--node-name=n", "--control-plane=https://x:1", "--insecure"]).unwrap_err();
        assert!(err.contains("http://"), "{err}");
        let ok = ["--node-name=n", "--control-plane=http://x:1", "--insecure"];
        for bad in [
            "--chain-prefix=kube",
            "--masquerade-bit=40",
            "--cluster-cidr=198.18.0.0/16,10.0.0.0/8",
            "--min-sync-period=1m",
            "--admin-listen=nope",
            "--ipvs-scheduler=wlc",
            "--ipvs-interface=a-name-longer-than-15",
            "--ipvs-graceful-termination-timeout=0s",
            "--ipvs-tcp-timeout=1500ms",
            "--ipvs-udp-timeout=200years",
        ] {
            let mut a = ok.to_vec();
            a.push(bad);
            assert!(parse(&a).is_err(), "{bad} accepted");
        }
    }
}
