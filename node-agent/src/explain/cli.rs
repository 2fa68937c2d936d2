//! The `explain` subcommand: its flags, and where it reads the rules (the live
//! kernel, or what `render` would write for `--manifests`).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;

use clap::{Args, ValueEnum};
use meshlite_proto::model::Protocol;

use super::{Host, Packet, RuleSet, iptables::Tables, ipvs, nftables};
use crate::config::{BackendKind, IpvsArgs, RuleArgs};
use crate::iptables::IptablesBackend;
use crate::nftables::render::family_name;
use crate::nftables::{DEFAULT_TABLE, NftablesConfig};
use crate::proxy::{IpFamily, ProxyView};

/// `meshlite-node-agent explain`.
#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// The destination: `IP:PORT` (`[IPv6]:PORT`).
    #[arg(long)]
    pub to: SocketAddr,
    /// The source address. One of the node's addresses, or loopback, is traced
    /// as locally generated (OUTPUT); any other as arriving at the node.
    #[arg(long)]
    pub from: IpAddr,
    #[arg(long, value_enum, default_value = "tcp")]
    pub protocol: ProtocolArg,
    /// Print JSON: verdict, endpoints, masquerade, service, trace.
    #[arg(long)]
    pub json: bool,
    /// Trace the rules `render` would write for these manifests instead of the
    /// live kernel state (needs --node-name; no root, no kernel).
    #[arg(long, requires = "node_name")]
    pub manifests: Option<PathBuf>,
    #[arg(long, env = "MESHLITE_NODE_NAME")]
    pub node_name: Option<String>,
    /// The backend whose rules to trace.
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProtocolArg {
    Tcp,
    Udp,
    Sctp,
}

/// Why `explain` could not run.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// The input is wrong (exit 64).
    #[error("{0}")]
    Input(String),
    /// Reading the kernel failed.
    #[error("{0}")]
    Kernel(String),
}

impl From<ProtocolArg> for Protocol {
    fn from(p: ProtocolArg) -> Self {
        match p {
            ProtocolArg::Tcp => Protocol::Tcp,
            ProtocolArg::Udp => Protocol::Udp,
            ProtocolArg::Sctp => Protocol::Sctp,
        }
    }
}

// === impl ExplainArgs ===

impl ExplainArgs {
    /// The packet to trace.
    pub fn packet(&self) -> Packet {
        Packet {
            src: self.from,
            dst: self.to,
            protocol: self.protocol.into(),
        }
    }

    fn family(&self) -> Result<IpFamily, ExplainError> {
        let f = if self.to.is_ipv4() {
            IpFamily::V4
        } else {
            IpFamily::V6
        };
        if self.from.is_ipv4() != self.to.is_ipv4() {
            return Err(ExplainError::Input(
                "--from and --to are of different IP families".into(),
            ));
        }
        Ok(f)
    }

    /// Reads the rules and the node's facts, from the manifests or the kernel.
    pub fn load(&self) -> Result<(RuleSet, Host), ExplainError> {
        self.rules
            .validate()
            .and_then(|()| self.ipvs.validate())
            .map_err(|e| ExplainError::Input(e.to_string()))?;
        let family = self.family()?;
        match (&self.manifests, &self.node_name) {
            (Some(dir), Some(node)) => self.load_manifests(dir, node, family),
            (Some(_), None) => Err(ExplainError::Input("--manifests needs --node-name".into())),
            (None, _) => self.load_kernel(family),
        }
    }

    fn load_manifests(
        &self,
        dir: &std::path::Path,
        node: &str,
        family: IpFamily,
    ) -> Result<(RuleSet, Host), ExplainError> {
        let (snapshot, _warnings) =
            crate::preview::load(dir).map_err(|e| ExplainError::Input(e.to_string()))?;
        let view = ProxyView::build(&snapshot, node, family);
        let mut host = Host::default();
        let node_ips: Vec<IpAddr> = self
            .rules
            .node_ip
            .iter()
            .filter(|ip| family.matches(ip))
            .copied()
            .collect();
        host.local.extend(if node_ips.is_empty() {
            view.node_ips.clone()
        } else {
            node_ips
        });
        let bad =
            |e: super::iptables::ParseError| ExplainError::Input(format!("rendered rules: {e}"));
        match self.backend {
            BackendKind::Iptables => {
                let backend = IptablesBackend::new(self.rules.iptables(vec![family], false));
                let rs = crate::iptables::render(&view, &backend.render_config(&view));
                let mut t = Tables::parse(&rs.full_text(&[])).map_err(bad)?;
                for j in backend.jumps(family) {
                    t.add_rule(j.table, j.chain, &j.rule).map_err(bad)?;
                }
                Ok((RuleSet::Iptables(t), host))
            }
            BackendKind::Ipvs => {
                let cfg = self
                    .ipvs
                    .config(&self.rules, vec![family], false)
                    .map_err(|e| ExplainError::Input(e.to_string()))?;
                let plan = cfg.plan_without_kernel(std::slice::from_ref(&view));
                let mut t = Tables::default();
                for f in &plan.families {
                    t = Tables::parse(&f.rules).map_err(bad)?;
                    for set in f.ipsets.values() {
                        host.ipsets.insert(set.name.clone(), set.members.clone());
                    }
                }
                for j in crate::ipvs::rules::ChainNames::new(&self.rules.chain_prefix).jumps() {
                    t.add_rule(j.table, j.chain, &j.rule).map_err(bad)?;
                }
                host.local.extend(plan.bind.iter().copied());
                Ok((
                    RuleSet::Ipvs {
                        rules: t,
                        table: ipvs::Table::from_plan(&plan),
                    },
                    host,
                ))
            }
            BackendKind::Nftables => {
                let cfg = NftablesConfig::from_rules(self.rules.iptables(vec![family], false));
                let script = crate::preview::render_dir_nftables(dir, node, family, &cfg)
                    .map_err(|e| ExplainError::Input(e.to_string()))?;
                let table = format!("{} {}", family_name(family), cfg.table);
                let t = nftables::Table::parse_script(&script.text, &table)
                    .map_err(|e| ExplainError::Input(format!("rendered rules: {e}")))?;
                Ok((RuleSet::Nftables(t), host))
            }
        }
    }

    fn load_kernel(&self, family: IpFamily) -> Result<(RuleSet, Host), ExplainError> {
        if self.backend == BackendKind::Nftables {
            let host = Host {
                local: local_addresses()?,
                ..Host::default()
            };
            return Ok((RuleSet::Nftables(kernel_nftables(family)?), host));
        }
        let save = match family {
            IpFamily::V4 => "iptables-save",
            IpFamily::V6 => "ip6tables-save",
        };
        let text = run(save, &[])?;
        let t = Tables::parse(&text).map_err(|e| ExplainError::Kernel(format!("{save}: {e}")))?;
        let mut host = Host {
            local: local_addresses()?,
            ..Host::default()
        };
        match self.backend {
            BackendKind::Iptables => Ok((RuleSet::Iptables(t), host)),
            BackendKind::Ipvs => {
                host.ipsets = ipvs::parse_ipset_save(&run("ipset", &["save"])?);
                let state = crate::ipvs::netlink::IpvsSocket::open()
                    .and_then(|mut s| s.read_all())
                    .map_err(|e| ExplainError::Kernel(format!("IPVS over netlink: {e}")))?;
                Ok((
                    RuleSet::Ipvs {
                        rules: t,
                        table: ipvs::Table::from_kernel(&state),
                    },
                    host,
                ))
            }
            BackendKind::Nftables => Ok((RuleSet::Nftables(kernel_nftables(family)?), host)),
        }
    }
}

/// The family's `kube-proxy` table as the kernel lists it, with a note naming
/// the other tables that also see the packet (not traced). One `nft list ruleset`
/// rather than a listing of the table plus one of the table names: `nft` reads the
/// whole ruleset for either, which takes seconds at 10,000 services.
fn kernel_nftables(family: IpFamily) -> Result<nftables::Table, ExplainError> {
    let f = family_name(family);
    let ours = format!("{f} {DEFAULT_TABLE}");
    let ruleset = run("nft", &["list", "ruleset"])?;
    let tables = nftables::split_ruleset(&ruleset);
    let Some((_, text)) = tables.iter().find(|(name, _)| *name == ours) else {
        return Err(ExplainError::Kernel(format!(
            "nft list ruleset has no table {ours}: is the nftables mode running in this network namespace?"
        )));
    };
    let mut t = nftables::Table::parse_listing(text)
        .map_err(|e| ExplainError::Kernel(format!("nft list ruleset, table {ours}: {e}")))?;
    let others: Vec<&str> = tables
        .iter()
        .map(|(name, _)| name.as_str())
        .filter(|name| {
            (name.starts_with(&format!("{f} ")) || name.starts_with("inet ")) && *name != ours
        })
        .collect();
    if !others.is_empty() {
        t = t.with_note(format!(
            "other nftables tables see the packet too and were not traced: {}",
            others.join(", ")
        ));
    }
    Ok(t)
}

fn run(cmd: &str, args: &[&str]) -> Result<String, ExplainError> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| ExplainError::Kernel(format!("{cmd}: {e}")))?;
    if !out.status.success() {
        return Err(ExplainError::Kernel(format!(
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The addresses of every interface in this network namespace (`ip -o addr`).
fn local_addresses() -> Result<std::collections::BTreeSet<IpAddr>, ExplainError> {
    let text = run("ip", &["-o", "addr", "show"])?;
    Ok(parse_ip_addr(&text))
}

/// Parses `ip -o addr show`: the address after `inet`/`inet6` on each line.
pub fn parse_ip_addr(text: &str) -> std::collections::BTreeSet<IpAddr> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            w.find(|x| *x == "inet" || *x == "inet6")?;
            w.next()?.split('/').next()?.parse().ok()
        })
        .collect()
}
