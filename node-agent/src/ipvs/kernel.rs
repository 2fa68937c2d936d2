//! Startup checks and settings: the kernel modules IPVS mode needs, and the
//! sysctls kube-proxy's IPVS proxier sets (`NewProxier`).

use std::collections::BTreeSet;
use std::path::Path;

use tokio::process::Command;
use tracing::{info, warn};

use super::{Error, Scheduler};

/// A sysctl to set: path under `/proc/sys`, value, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sysctl {
    pub path: &'static str,
    pub value: &'static str,
}

/// The modules IPVS mode needs with these schedulers.
pub fn required_modules(schedulers: &[Scheduler]) -> Vec<String> {
    let mut m = vec!["ip_vs".to_string()];
    for s in schedulers {
        let name = format!("ip_vs_{}", s.as_str());
        if !m.contains(&name) {
            m.push(name);
        }
    }
    m.push("nf_conntrack".to_string());
    m
}

/// The modules of `required` that are neither loaded nor built in.
pub fn missing_modules(
    required: &[String],
    loaded: &BTreeSet<String>,
    builtin: &BTreeSet<String>,
) -> Vec<String> {
    required
        .iter()
        .filter(|m| !loaded.contains(*m) && !builtin.contains(*m))
        .cloned()
        .collect()
}

/// Module names from `/proc/modules` plus those present in `/sys/module` (which
/// also lists built-in modules that have parameters).
fn loaded_modules() -> BTreeSet<String> {
    let mut out: BTreeSet<String> = std::fs::read_to_string("/proc/modules")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect();
    if let Ok(dir) = std::fs::read_dir("/sys/module") {
        out.extend(
            dir.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned()),
        );
    }
    out
}

/// Built-in modules from `/lib/modules/<release>/modules.builtin`.
fn builtin_modules() -> BTreeSet<String> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let path = Path::new("/lib/modules")
        .join(release.trim())
        .join("modules.builtin");
    parse_builtin(&std::fs::read_to_string(path).unwrap_or_default())
}

/// `kernel/net/netfilter/ipvs/ip_vs.ko` -> `ip_vs` (dashes as underscores).
pub fn parse_builtin(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.trim().rsplit('/').next())
        .filter_map(|f| f.strip_suffix(".ko"))
        .map(|m| m.replace('-', "_"))
        .collect()
}

/// Makes sure the modules are there: loads missing ones with `modprobe`, then
/// fails naming what is still missing.
///
/// # Errors
/// [`Error::Modules`] with the missing module names.
pub async fn ensure_modules(schedulers: &[Scheduler]) -> Result<(), Error> {
    let required = required_modules(schedulers);
    let builtin = builtin_modules();
    let missing = missing_modules(&required, &loaded_modules(), &builtin);
    if missing.is_empty() {
        return Ok(());
    }
    let mut failures = Vec::new();
    for m in &missing {
        match Command::new("modprobe").arg("--").arg(m).output().await {
            Ok(out) if out.status.success() => info!(module = %m, "loaded kernel module"),
            Ok(out) => failures.push(format!(
                "{m}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) => failures.push(format!("{m}: modprobe: {e}")),
        }
    }
    let still = missing_modules(&required, &loaded_modules(), &builtin);
    if still.is_empty() {
        return Ok(());
    }
    Err(Error::Modules {
        missing: still,
        detail: failures.join("; "),
    })
}

/// Parses `major.minor` of a kernel release (`6.1.0-56-cloud-amd64`).
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.trim().split(['.', '-']);
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    Some((major, minor))
}

/// The sysctls kube-proxy's IPVS mode sets, for a kernel version.
pub fn sysctls(kernel: Option<(u32, u32)>, strict_arp: bool) -> Vec<Sysctl> {
    let mut v = vec![Sysctl {
        // Conntrack for IPVS connections, so iptables can masquerade them.
        path: "net/ipv4/vs/conntrack",
        value: "1",
    }];
    // conn_reuse_mode=0 works around slow reconnection on kernels 4.1..5.9
    // (kubernetes#93297); 5.9 fixed it and older kernels lack the setting.
    if kernel.is_some_and(|k| ((4, 1)..(5, 9)).contains(&k)) {
        v.push(Sysctl {
            path: "net/ipv4/vs/conn_reuse_mode",
            value: "0",
        });
    }
    v.extend([
        // Drop connections to a deleted real server at their next packet.
        Sysctl {
            path: "net/ipv4/vs/expire_nodest_conn",
            value: "1",
        },
        // Persistence templates of a drained (weight 0) real server expire, so
        // affinity moves clients off it.
        Sysctl {
            path: "net/ipv4/vs/expire_quiescent_template",
            value: "1",
        },
        Sysctl {
            path: "net/ipv4/ip_forward",
            value: "1",
        },
    ]);
    if strict_arp {
        v.extend([
            Sysctl {
                path: "net/ipv4/conf/all/arp_ignore",
                value: "1",
            },
            Sysctl {
                path: "net/ipv4/conf/all/arp_announce",
                value: "2",
            },
        ]);
    }
    v
}

/// Sets the sysctls (only those that differ).
///
/// # Errors
/// [`Error::Sysctl`] naming the first one that could not be set.
pub fn apply_sysctls(list: &[Sysctl]) -> Result<(), Error> {
    for s in list {
        let path = Path::new("/proc/sys").join(s.path);
        if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == s.value) {
            continue;
        }
        if let Err(e) = std::fs::write(&path, s.value) {
            return Err(Error::Sysctl {
                name: s.path.replace('/', "."),
                value: s.value.to_string(),
                reason: e.to_string(),
            });
        }
        info!(sysctl = %s.path.replace('/', "."), value = s.value, "set");
    }
    Ok(())
}

/// Sets the sysctls for the running kernel.
pub fn apply_default_sysctls(strict_arp: bool) -> Result<(), Error> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let version = kernel_version(&release);
    if version.is_none() {
        warn!(release = %release.trim(), "unknown kernel version");
    }
    apply_sysctls(&sysctls(version, strict_arp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn required_modules_follow_the_schedulers() {
        assert_eq!(
            required_modules(&[Scheduler::Rr, Scheduler::Wrr, Scheduler::Rr]),
            ["ip_vs", "ip_vs_rr", "ip_vs_wrr", "nf_conntrack"]
        );
    }

    #[test]
    fn missing_modules_are_named() {
        let req = required_modules(&[Scheduler::Sh]);
        let loaded: BTreeSet<String> = ["ip_vs".to_string()].into();
        let builtin =
            parse_builtin("kernel/net/netfilter/nf_conntrack.ko\nkernel/drivers/net/dummy.ko\n");
        assert_eq!(missing_modules(&req, &loaded, &builtin), ["ip_vs_sh"]);
        let builtin = parse_builtin("kernel/net/netfilter/ipvs/ip_vs_sh.ko\n");
        assert_eq!(missing_modules(&req, &loaded, &builtin), ["nf_conntrack"]);
    }

    #[test]
    fn sysctls_follow_kube_proxy() {
        assert_eq!(kernel_version("6.1.0-56-cloud-amd64"), Some((6, 1)));
        assert_eq!(kernel_version("4.19.0"), Some((4, 19)));
        let names = |v: Vec<Sysctl>| v.into_iter().map(|s| s.path).collect::<Vec<_>>();
        assert_eq!(
            names(sysctls(Some((6, 1)), false)),
            [
                "net/ipv4/vs/conntrack",
                "net/ipv4/vs/expire_nodest_conn",
                "net/ipv4/vs/expire_quiescent_template",
                "net/ipv4/ip_forward"
            ]
        );
        let old = sysctls(Some((4, 19)), true);
        assert!(old.contains(&Sysctl {
            path: "net/ipv4/vs/conn_reuse_mode",
            value: "0"
        }));
        assert!(old.contains(&Sysctl {
            path: "net/ipv4/conf/all/arp_announce",
            value: "2"
        }));
    }
}
