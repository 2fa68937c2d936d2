//! Text views of a [`Plan`]: the virtual servers the way `ipvsadm -Ln` prints
//! them, the ipset members the way `ipset save` prints them, the dummy interface's
//! addresses and the iptables rules. Used by `render --mode ipvs`.

use std::fmt::Write as _;

use meshlite_proto::model::Protocol;

use super::plan::{FLAG_PERSISTENT, Plan, VsKey};
use crate::proxy::IpFamily;

/// `ipvsadm -Ln`'s header lines; the version and table size are the stock
/// kernel's (IPVS has been 1.2.1 since Linux 2.6, the table 4096 by default).
pub const IPVSADM_HEADER: &str = "IP Virtual Server version 1.2.1 (size=4096)\n\
Prot LocalAddress:Port Scheduler Flags\n  \
-> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n";

/// ipvsadm's sort order: family, protocol number, address, port.
fn sort_key(k: &VsKey) -> (u8, u8, std::net::IpAddr, u16) {
    let proto = match k.protocol {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    };
    let fam = match k.family() {
        IpFamily::V4 => 0,
        IpFamily::V6 => 1,
    };
    (fam, proto, k.addr.ip(), k.addr.port())
}

/// The virtual servers as `ipvsadm -Ln` lists them (no connections yet).
pub fn ipvsadm(plan: &Plan) -> String {
    let mut out = String::from(IPVSADM_HEADER);
    let mut keys: Vec<&VsKey> = plan.virtual_servers.keys().collect();
    keys.sort_by_key(|k| sort_key(k));
    for k in keys {
        let vs = &plan.virtual_servers[k];
        let _ = write!(
            out,
            "{}  {} {}",
            k.protocol.as_k8s(),
            k.addr,
            vs.scheduler.as_str()
        );
        if vs.flags & FLAG_PERSISTENT != 0 {
            let _ = write!(out, " persistent {}", vs.timeout);
        }
        out.push('\n');
        for (dest, weight) in &vs.dests {
            let _ = writeln!(
                out,
                "  -> {:<28} {:<7} {:<6} {:<10} {:<10}",
                dest.to_string(),
                "Masq",
                weight,
                0,
                0
            );
        }
    }
    out
}

/// Everything `render --mode ipvs` prints.
pub fn full(plan: &Plan, interface: &str) -> String {
    let mut out = String::from("# IPVS virtual servers (ipvsadm -Ln)\n");
    out.push_str(&ipvsadm(plan));
    let _ = writeln!(out, "\n# addresses on {interface}");
    for ip in &plan.bind {
        let len = if ip.is_ipv4() { 32 } else { 128 };
        let _ = writeln!(out, "{ip}/{len}");
    }
    for f in &plan.families {
        let _ = writeln!(out, "\n# ipsets, {} (ipset save)", f.family);
        for set in f.ipsets.values() {
            out.push_str(&set.create_line());
            out.push('\n');
            for m in &set.members {
                let _ = writeln!(out, "add {} {m}", set.name);
            }
        }
        let _ = writeln!(
            out,
            "\n# iptables-restore --noflush, {} ({} nat and {} filter rules)",
            f.family, f.nat_rule_count, f.filter_rule_count
        );
        out.push_str(&f.rules);
    }
    out
}
