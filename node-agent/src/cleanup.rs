//! `meshlite-node-agent cleanup`: removes what either mode programmed, as
//! `kube-proxy --cleanup` does, so a node can switch modes, go back to kube-proxy,
//! or be left clean after an uninstall. The agent must be stopped first (it would
//! put its rules back).
//!
//! - iptables, both families: our chains in every table (the fixed ones of both
//!   modes and the per-service `-SVC-`/`-SVL-`/`-EXT-`/`-FW-`/`-SEP-` ones, plus
//!   `-XLB-` left by older kube-proxy versions) are flushed and deleted, and every
//!   rule elsewhere that jumps to one of them is deleted, in one `iptables-restore
//!   --noflush` per family. Chains that are not ours stay, among them kubelet's
//!   `KUBE-FIREWALL` and `KUBE-KUBELET-CANARY` under the default prefix.
//! - ipsets: the IPVS mode's sets (after the rules that match them are gone).
//! - IPVS: every virtual server, as kube-proxy's cleanup flushes the table, except
//!   those in `--ipvs-exclude-cidrs` (someone else's, as for the running agent).
//! - the IPVS mode's dummy interface.
//!
//! A part whose tool or kernel feature is absent has nothing to clean and is
//! reported as skipped; a part that fails is reported and the others still run.

use std::collections::BTreeSet;
use std::fmt::{self, Write as _};

use ipnet::IpNet;

use crate::backends::CleanupTarget;
use crate::config::BackendKind;
use crate::iptables::{self, ChainNames};
use crate::ipvs::ipset::{self, SetNames};
use crate::ipvs::link::Link;
use crate::ipvs::netlink::{IpvsSocket, NetlinkError};
use crate::ipvs::{Op, rules};
use crate::netfilter::{self, Runner};
use crate::proxy::IpFamily;

/// What cleanup did, one line per part; `errors` non-empty means it is not done.
#[derive(Debug, Default)]
pub struct Report {
    pub lines: Vec<String>,
    pub errors: Vec<String>,
}

/// The `iptables-restore --noflush` input that removes our chains from one
/// family's `iptables-save` output, with what it removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IptablesPlan {
    pub text: String,
    pub chains: usize,
    pub jumps: usize,
}

/// Runs every mode's cleanup (see [`crate::backends::cleanup`]) for chain prefix
/// `prefix` and the IPVS mode's dummy interface `interface`, keeping virtual
/// servers in `exclude`.
pub async fn run(prefix: &str, interface: &str, exclude: &[IpNet]) -> Report {
    of(&BackendKind::ALL, prefix, interface, exclude).await
}

/// Runs the cleanup of the modes `kinds`, in that order (see [`run`]).
pub async fn of(kinds: &[BackendKind], prefix: &str, interface: &str, exclude: &[IpNet]) -> Report {
    let mut report = Report::default();
    let target = CleanupTarget {
        prefix,
        ipvs_interface: interface,
        ipvs_exclude: exclude,
    };
    for kind in kinds {
        crate::backends::cleanup(*kind, &target, &mut report).await;
    }
    report
}

/// The iptables part, both families: our chains of every iptables-based mode.
pub(crate) async fn iptables(prefix: &str, report: &mut Report) {
    for family in [IpFamily::V4, IpFamily::V6] {
        let part = format!("{family} iptables");
        match clean_iptables(family, prefix).await {
            Ok(line) => report.lines.push(format!("{part}: {line}")),
            Err(e) => report.errors.push(format!("{part}: {e}")),
        }
    }
}

/// The IPVS part: ipsets, the IPVS table, the dummy interface. Runs after the
/// iptables part (the rules that match the sets must be gone first).
pub(crate) async fn ipvs(target: &CleanupTarget<'_>, report: &mut Report) {
    match clean_ipsets(target.prefix).await {
        Ok(line) => report.lines.push(format!("ipsets: {line}")),
        Err(e) => report.errors.push(format!("ipsets: {e}")),
    }
    match clean_ipvs(target.ipvs_exclude) {
        Ok(line) => report.lines.push(format!("ipvs: {line}")),
        Err(e) => report.errors.push(format!("ipvs: {e}")),
    }
    let part = format!("interface {}", target.ipvs_interface);
    match Link::new(target.ipvs_interface) {
        Ok(link) => match link.delete().await {
            Ok(true) => report.lines.push(format!("{part}: deleted")),
            Ok(false) => report.lines.push(format!("{part}: not present")),
            Err(e) => report.errors.push(format!("{part}: {e}")),
        },
        Err(e) => report.errors.push(format!("{part}: {e}")),
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for l in &self.lines {
            writeln!(f, "{l}")?;
        }
        for e in &self.errors {
            writeln!(f, "error: {e}")?;
        }
        Ok(())
    }
}

/// The chains meshlite (or kube-proxy, with the default prefix) creates under one
/// prefix. Built once per cleanup: a large node's `iptables-save` lists 100k+
/// chains.
#[derive(Debug)]
pub struct OurChains {
    prefix: String,
    fixed: BTreeSet<String>,
}

impl OurChains {
    pub fn new(prefix: &str) -> Self {
        let ipt = ChainNames::new(prefix);
        let ipvs = rules::ChainNames::new(prefix);
        let mut fixed: BTreeSet<String> = [
            ipt.services,
            ipt.external_services,
            ipt.nodeports,
            ipt.postrouting,
            ipt.mark_masq,
            ipt.forward,
            ipt.proxy_firewall,
            ipt.canary,
            ipvs.node_port,
            ipvs.load_balancer,
            ipvs.source_ranges_firewall,
            ipvs.ipvs_filter,
            ipvs.ipvs_out_filter,
        ]
        .into();
        // Under kube-proxy's prefix this chain is kubelet's, which goes on using it.
        if prefix != "KUBE" {
            fixed.insert(ipt.firewall);
        }
        Self {
            prefix: prefix.to_string(),
            fixed,
        }
    }

    /// Whether `chain` is one of ours.
    pub fn contains(&self, chain: &str) -> bool {
        let Some(rest) = chain
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix('-'))
        else {
            return false;
        };
        const PER_SERVICE: [&str; 6] = ["SVC-", "SVL-", "EXT-", "FW-", "SEP-", "XLB-"];
        PER_SERVICE.iter().any(|p| rest.starts_with(p)) || self.fixed.contains(chain)
    }
}

/// Plans the removal of our chains from `save` (`iptables-save` output of every
/// table); `None` when there is nothing of ours.
pub fn plan_iptables(save: &str, prefix: &str) -> Option<IptablesPlan> {
    struct Table<'a> {
        name: &'a str,
        chains: Vec<&'a str>,
        rules: Vec<(&'a str, &'a str)>,
    }
    let mut tables: Vec<Table<'_>> = Vec::new();
    for line in save.lines() {
        if let Some(name) = line.strip_prefix('*') {
            tables.push(Table {
                name: name.trim(),
                chains: Vec::new(),
                rules: Vec::new(),
            });
        } else if let Some(t) = tables.last_mut() {
            if let Some(decl) = line.strip_prefix(':') {
                if let Some(chain) = decl.split_whitespace().next() {
                    t.chains.push(chain);
                }
            } else if let Some(rule) = line.strip_prefix("-A ")
                && let Some((chain, spec)) = rule.split_once(' ')
            {
                t.rules.push((chain, spec));
            }
        }
    }
    let ours_all = OurChains::new(prefix);
    let mut plan = IptablesPlan {
        text: String::new(),
        chains: 0,
        jumps: 0,
    };
    for t in &tables {
        let ours: BTreeSet<&str> = t
            .chains
            .iter()
            .copied()
            .filter(|c| ours_all.contains(c))
            .collect();
        if ours.is_empty() {
            continue;
        }
        let _ = writeln!(plan.text, "*{}", t.name);
        for c in &ours {
            let _ = writeln!(plan.text, ":{c} - [0:0]");
        }
        for (chain, spec) in &t.rules {
            if !ours.contains(chain) && jump_target(spec).is_some_and(|j| ours.contains(j)) {
                let _ = writeln!(plan.text, "-D {chain} {spec}");
                plan.jumps += 1;
            }
        }
        for c in &ours {
            let _ = writeln!(plan.text, "-X {c}");
        }
        plan.text.push_str("COMMIT\n");
        plan.chains += ours.len();
    }
    (plan.chains > 0).then_some(plan)
}

/// The chain a rule jumps or goes to (`-j`/`--jump`/`-g`/`--goto`), skipping
/// quoted strings such as comments.
fn jump_target(spec: &str) -> Option<&str> {
    let mut words = Vec::new();
    let mut rest = spec.trim_start();
    while !rest.is_empty() {
        if let Some(q) = rest.strip_prefix('"') {
            // A quoted word (comments); `\"` does not end it.
            let mut end = q.len();
            let mut escaped = false;
            for (i, ch) in q.char_indices() {
                match ch {
                    '\\' if !escaped => escaped = true,
                    '"' if !escaped => {
                        end = i;
                        break;
                    }
                    _ => escaped = false,
                }
            }
            words.push("\"\"");
            rest = q.get(end + 1..).unwrap_or("").trim_start();
        } else {
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            words.push(&rest[..end]);
            rest = rest[end..].trim_start();
        }
    }
    words
        .windows(2)
        .find(|w| matches!(w[0], "-j" | "--jump" | "-g" | "--goto"))
        .map(|w| w[1])
}

/// Runs `program args`; its stdout, `None` when the program is not installed
/// (then there is nothing of ours for it to hold).
async fn run_tool(program: &str, args: &[&str]) -> Result<Option<String>, String> {
    match Runner::System.output(program, args, None).await {
        Ok(out) => Ok(Some(out)),
        Err(netfilter::Error::Spawn { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            Ok(None)
        }
        Err(e) => Err(e.to_string()),
    }
}

async fn clean_iptables(family: IpFamily, prefix: &str) -> Result<String, String> {
    let command = iptables::tool(family, "-save");
    let Some(save) = run_tool(&command, &[]).await? else {
        return Ok(format!("{command} not installed, skipped"));
    };
    let Some(plan) = plan_iptables(&save, prefix) else {
        return Ok("nothing to delete".into());
    };
    iptables::restore(&Runner::System, family, &plan.text)
        .await
        .map_err(|e| e.to_string())?;
    Ok(format!(
        "deleted {} chains and {} jump rules",
        plan.chains, plan.jumps
    ))
}

async fn clean_ipsets(prefix: &str) -> Result<String, String> {
    let Some(present) = run_tool("ipset", &["list", "-n"]).await? else {
        return Ok("ipset not installed, skipped".into());
    };
    let ours: BTreeSet<String> = [IpFamily::V4, IpFamily::V6]
        .into_iter()
        .flat_map(|f| {
            ipset::empty_sets(&SetNames::new(prefix, f), f)
                .into_map()
                .into_keys()
        })
        .collect();
    let doomed: Vec<&str> = present
        .lines()
        .map(str::trim)
        .filter(|n| ours.contains(*n))
        .collect();
    if doomed.is_empty() {
        return Ok("nothing to delete".into());
    }
    let text: String = doomed.iter().map(|n| format!("destroy {n}\n")).collect();
    ipset::restore(&Runner::System, &text)
        .await
        .map_err(|e| e.to_string())?;
    Ok(format!("destroyed {}", doomed.len()))
}

fn clean_ipvs(exclude: &[IpNet]) -> Result<String, String> {
    let mut socket = match IpvsSocket::open() {
        Ok(s) => s,
        Err(NetlinkError::Family(_)) => return Ok("not loaded, nothing to delete".into()),
        Err(e) => return Err(e.to_string()),
    };
    let (kept, doomed): (Vec<_>, Vec<_>) = socket
        .dump_services()
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|(key, _)| key)
        .partition(|key| exclude.iter().any(|c| c.contains(&key.addr.ip())));
    let ops: Vec<Op> = doomed
        .into_iter()
        .map(|key| Op::DelService { key })
        .collect();
    let kept = if kept.is_empty() {
        String::new()
    } else {
        format!("; kept {} in --ipvs-exclude-cidrs", kept.len())
    };
    if ops.is_empty() {
        return Ok(format!("no virtual servers to delete{kept}"));
    }
    let refs: Vec<&Op> = ops.iter().collect();
    let failed = socket.execute(&refs).map_err(|e| e.to_string())?;
    if let Some(first) = failed.first() {
        return Err(format!(
            "{} of {} virtual servers not deleted, first: {first:?}",
            failed.len(),
            ops.len()
        ));
    }
    Ok(format!("deleted {} virtual servers{kept}", ops.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVE: &str = r#"# Generated by iptables-save v1.8.9
*mangle
:PREROUTING ACCEPT [0:0]
:KUBE-PROXY-CANARY - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SVC-ABCDEFGHIJKLMNOP - [0:0]
:KUBE-SEP-ABCDEFGHIJKLMNOP - [0:0]
:KUBE-XLB-ABCDEFGHIJKLMNOP - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT -m comment --comment "says -j KUBE-SERVICES but goes elsewhere" -j DOCKER
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-SERVICES -d 198.19.0.10/32 -p tcp -j KUBE-SVC-ABCDEFGHIJKLMNOP
-A KUBE-SVC-ABCDEFGHIJKLMNOP -j KUBE-SEP-ABCDEFGHIJKLMNOP
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-IPVS-FILTER - [0:0]
:KUBE-NODE-PORT - [0:0]
:KUBERNETES-X - [0:0]
-A INPUT -j KUBE-FIREWALL
-A INPUT -m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-FILTER
-A FORWARD -m comment --comment "kubernetes forwarding rules" -g KUBE-FORWARD
COMMIT
"#;

    #[test]
    fn our_chains_and_only_ours() {
        let kube = OurChains::new("KUBE");
        for c in [
            "KUBE-SERVICES",
            "KUBE-SVC-ABCDEFGHIJKLMNOP",
            "KUBE-SEP-X",
            "KUBE-FW-X",
            "KUBE-EXT-X",
            "KUBE-SVL-X",
            "KUBE-PROXY-CANARY",
            "KUBE-IPVS-OUT-FILTER",
            "KUBE-LOAD-BALANCER",
        ] {
            assert!(kube.contains(c), "{c}");
        }
        for c in [
            "KUBE-FIREWALL",
            "KUBE-KUBELET-CANARY",
            "KUBERNETES-X",
            "DOCKER",
            "INPUT",
            "MESH-SERVICES",
        ] {
            assert!(!kube.contains(c), "{c}");
        }
        // Under another prefix the firewall chain is ours too.
        let mesh = OurChains::new("MESH");
        assert!(mesh.contains("MESH-FIREWALL"));
        assert!(mesh.contains("MESH-SEP-X"));
        assert!(!mesh.contains("KUBE-SERVICES"));
    }

    #[test]
    fn plan_flushes_unhooks_and_deletes_ours() {
        let plan = plan_iptables(SAVE, "KUBE").unwrap();
        let want = "\
*mangle
:KUBE-PROXY-CANARY - [0:0]
-X KUBE-PROXY-CANARY
COMMIT
*nat
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SEP-ABCDEFGHIJKLMNOP - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-ABCDEFGHIJKLMNOP - [0:0]
:KUBE-XLB-ABCDEFGHIJKLMNOP - [0:0]
-D PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-D OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-D POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-X KUBE-MARK-MASQ
-X KUBE-POSTROUTING
-X KUBE-SEP-ABCDEFGHIJKLMNOP
-X KUBE-SERVICES
-X KUBE-SVC-ABCDEFGHIJKLMNOP
-X KUBE-XLB-ABCDEFGHIJKLMNOP
COMMIT
*filter
:KUBE-FORWARD - [0:0]
:KUBE-IPVS-FILTER - [0:0]
:KUBE-NODE-PORT - [0:0]
-D INPUT -m comment --comment \"kubernetes ipvs access filter\" -j KUBE-IPVS-FILTER
-D FORWARD -m comment --comment \"kubernetes forwarding rules\" -g KUBE-FORWARD
-X KUBE-FORWARD
-X KUBE-IPVS-FILTER
-X KUBE-NODE-PORT
COMMIT
";
        assert_eq!(plan.text, want);
        assert_eq!((plan.chains, plan.jumps), (10, 5));
    }

    #[test]
    fn nothing_of_ours_plans_nothing() {
        assert_eq!(plan_iptables(SAVE, "MESH"), None);
        assert_eq!(plan_iptables("", "KUBE"), None);
    }

    #[test]
    fn jump_targets_skip_quoted_words() {
        assert_eq!(jump_target("-p tcp -j ACCEPT"), Some("ACCEPT"));
        assert_eq!(jump_target("-g KUBE-FORWARD"), Some("KUBE-FORWARD"));
        assert_eq!(
            jump_target(r#"-m comment --comment "a \"-j X\" b" -j Y"#),
            Some("Y")
        );
        assert_eq!(jump_target(r#"-m comment --comment "-j X""#), None);
        assert_eq!(jump_target("-p tcp"), None);
    }
}
