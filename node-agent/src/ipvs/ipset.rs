//! kube-proxy's IPVS-mode ipsets: names, types, members, and their programming
//! with one `ipset restore -exist` per sync (the difference against what the kernel
//! holds, read back with `ipset save` on full syncs).
//!
//! Names and member formats are kube-proxy's (`pkg/proxy/ipvs/ipset.go`), so the
//! iptables rules and `ipset list` read the same; IPv6 sets are `KUBE-6-*`
//! (truncated to ipset's 31 characters), as kube-proxy names them in dual-stack.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;

use super::Error;
use crate::netfilter::Runner;
use crate::proxy::IpFamily;

/// ipset's longest set name.
pub const MAX_NAME_LEN: usize = 31;

/// One set as it must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpSet {
    pub name: String,
    /// `hash:ip,port`, `bitmap:port`, ...
    pub kind: &'static str,
    pub family: IpFamily,
    /// kube-proxy's comment, used in the iptables rules that match the set.
    pub comment: &'static str,
    pub members: BTreeSet<String>,
}

/// The names of our sets for one prefix and family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetNames {
    pub loop_back: String,
    pub cluster_ip: String,
    pub external_ip: String,
    pub external_ip_local: String,
    pub load_balancer: String,
    pub load_balancer_fw: String,
    pub load_balancer_local: String,
    pub load_balancer_source_ip: String,
    pub load_balancer_source_cidr: String,
    pub node_port_tcp: String,
    pub node_port_local_tcp: String,
    pub node_port_udp: String,
    pub node_port_local_udp: String,
    pub node_port_sctp: String,
    pub node_port_local_sctp: String,
    pub health_check_node_port: String,
    pub ipvs_ips: String,
}

/// The sets of one family being filled by planning.
#[derive(Debug, Clone, Default)]
pub struct Sets {
    sets: BTreeMap<String, IpSet>,
}

const HASH_IP_PORT: &str = "hash:ip,port";
const HASH_IP_PORT_IP: &str = "hash:ip,port,ip";
const HASH_IP_PORT_NET: &str = "hash:ip,port,net";
const HASH_IP: &str = "hash:ip";
const BITMAP_PORT: &str = "bitmap:port";

// === impl SetNames ===

impl SetNames {
    pub fn new(prefix: &str, family: IpFamily) -> Self {
        let n = |s: &str| set_name(prefix, family, s);
        Self {
            loop_back: n("LOOP-BACK"),
            cluster_ip: n("CLUSTER-IP"),
            external_ip: n("EXTERNAL-IP"),
            external_ip_local: n("EXTERNAL-IP-LOCAL"),
            load_balancer: n("LOAD-BALANCER"),
            load_balancer_fw: n("LOAD-BALANCER-FW"),
            load_balancer_local: n("LOAD-BALANCER-LOCAL"),
            load_balancer_source_ip: n("LOAD-BALANCER-SOURCE-IP"),
            load_balancer_source_cidr: n("LOAD-BALANCER-SOURCE-CIDR"),
            node_port_tcp: n("NODE-PORT-TCP"),
            node_port_local_tcp: n("NODE-PORT-LOCAL-TCP"),
            node_port_udp: n("NODE-PORT-UDP"),
            node_port_local_udp: n("NODE-PORT-LOCAL-UDP"),
            node_port_sctp: n("NODE-PORT-SCTP-HASH"),
            node_port_local_sctp: n("NODE-PORT-LOCAL-SCTP-HASH"),
            health_check_node_port: n("HEALTH-CHECK-NODE-PORT"),
            ipvs_ips: n("IPVS-IPS"),
        }
    }

    /// (name, type, comment) of every set, in kube-proxy's order.
    fn all(&self) -> [(&str, &'static str, &'static str); 17] {
        [
            (
                &self.loop_back,
                HASH_IP_PORT_IP,
                "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose",
            ),
            (
                &self.cluster_ip,
                HASH_IP_PORT,
                "Kubernetes service cluster ip + port for masquerade purpose",
            ),
            (
                &self.external_ip,
                HASH_IP_PORT,
                "Kubernetes service external ip + port for masquerade and filter purpose",
            ),
            (
                &self.external_ip_local,
                HASH_IP_PORT,
                "Kubernetes service external ip + port with externalTrafficPolicy=local",
            ),
            (
                &self.load_balancer,
                HASH_IP_PORT,
                "Kubernetes service lb portal",
            ),
            (
                &self.load_balancer_fw,
                HASH_IP_PORT,
                "Kubernetes service load balancer ip + port for load balancer with sourceRange",
            ),
            (
                &self.load_balancer_local,
                HASH_IP_PORT,
                "Kubernetes service load balancer ip + port with externalTrafficPolicy=local",
            ),
            (
                &self.load_balancer_source_ip,
                HASH_IP_PORT_IP,
                "Kubernetes service load balancer ip + port + source IP for packet filter purpose",
            ),
            (
                &self.load_balancer_source_cidr,
                HASH_IP_PORT_NET,
                "Kubernetes service load balancer ip + port + source cidr for packet filter purpose",
            ),
            (
                &self.node_port_tcp,
                BITMAP_PORT,
                "Kubernetes nodeport TCP port for masquerade purpose",
            ),
            (
                &self.node_port_local_tcp,
                BITMAP_PORT,
                "Kubernetes nodeport TCP port with externalTrafficPolicy=local",
            ),
            (
                &self.node_port_udp,
                BITMAP_PORT,
                "Kubernetes nodeport UDP port for masquerade purpose",
            ),
            (
                &self.node_port_local_udp,
                BITMAP_PORT,
                "Kubernetes nodeport UDP port with externalTrafficPolicy=local",
            ),
            (
                &self.node_port_sctp,
                HASH_IP_PORT,
                "Kubernetes nodeport SCTP port for masquerade purpose with type 'hash ip:port'",
            ),
            (
                &self.node_port_local_sctp,
                HASH_IP_PORT,
                "Kubernetes nodeport SCTP port with externalTrafficPolicy=local with type 'hash ip:port'",
            ),
            (
                &self.health_check_node_port,
                BITMAP_PORT,
                "Kubernetes health check node port",
            ),
            (&self.ipvs_ips, HASH_IP, "Addresses on the ipvs interface"),
        ]
    }
}

/// `<prefix>-<what>`, or `<prefix>-6-<what>` for IPv6, at most 31 characters.
pub fn set_name(prefix: &str, family: IpFamily, what: &str) -> String {
    let mut name = match family {
        IpFamily::V4 => format!("{prefix}-{what}"),
        IpFamily::V6 => format!("{prefix}-6-{what}"),
    };
    name.truncate(MAX_NAME_LEN);
    name
}

/// Every set of a family, empty.
pub fn empty_sets(names: &SetNames, family: IpFamily) -> Sets {
    let sets = names
        .all()
        .into_iter()
        .map(|(name, kind, comment)| {
            (
                name.to_string(),
                IpSet {
                    name: name.to_string(),
                    kind,
                    family,
                    comment,
                    members: BTreeSet::new(),
                },
            )
        })
        .collect();
    Sets { sets }
}

// === impl Sets ===

impl Sets {
    /// Adds a member (normalized as `ipset save` prints it).
    pub fn add(&mut self, set: &str, member: String) {
        if let Some(s) = self.sets.get_mut(set) {
            s.members.insert(normalize_member(&member));
        }
    }

    pub fn get(&self, set: &str) -> Option<&IpSet> {
        self.sets.get(set)
    }

    pub fn is_empty(&self, set: &str) -> bool {
        self.sets.get(set).is_none_or(|s| s.members.is_empty())
    }

    pub fn comment(&self, set: &str) -> &'static str {
        self.sets.get(set).map(|s| s.comment).unwrap_or("")
    }

    pub fn into_map(self) -> BTreeMap<String, IpSet> {
        self.sets
    }
}

// === impl IpSet ===

impl IpSet {
    /// The `create` line (`-exist` makes it a no-op when the set exists).
    pub fn create_line(&self) -> String {
        if self.kind == BITMAP_PORT {
            format!("create {} {} range 0-65535", self.name, self.kind)
        } else {
            let family = match self.family {
                IpFamily::V4 => "inet",
                IpFamily::V6 => "inet6",
            };
            format!(
                "create {} {} family {family} hashsize 1024 maxelem 65536",
                self.name, self.kind
            )
        }
    }
}

/// `ipset save` prints a host network without its prefix length.
pub fn normalize_member(member: &str) -> String {
    member
        .split(',')
        .map(|part| match part.parse::<IpNet>() {
            Ok(net) if net.prefix_len() == net.max_prefix_len() => net.addr().to_string(),
            Ok(net) => net.trunc().to_string(),
            Err(_) => part.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The `ipset restore` input that turns `current` (set name -> members; a missing
/// set does not exist yet) into `desired`, plus the number of member changes.
pub fn restore_text(
    desired: &BTreeMap<String, IpSet>,
    current: &BTreeMap<String, BTreeSet<String>>,
) -> (String, usize) {
    let mut out = String::new();
    let mut changes = 0;
    for set in desired.values() {
        let have = current.get(&set.name);
        if have.is_none() {
            out.push_str(&set.create_line());
            out.push('\n');
        }
        let empty = BTreeSet::new();
        let have = have.unwrap_or(&empty);
        for m in have.difference(&set.members) {
            out.push_str(&format!("del {} {m}\n", set.name));
            changes += 1;
        }
        for m in set.members.difference(have) {
            out.push_str(&format!("add {} {m}\n", set.name));
            changes += 1;
        }
    }
    (out, changes)
}

/// Parses `ipset save` output: set name -> members, for the sets named in `ours`.
pub fn parse_save(text: &str, ours: &BTreeSet<String>) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        match (f.next(), f.next(), f.next()) {
            (Some("create"), Some(name), _) if ours.contains(name) => {
                out.entry(name.to_string()).or_default();
            }
            (Some("add"), Some(name), Some(member)) if ours.contains(name) => {
                out.entry(name.to_string())
                    .or_default()
                    .insert(normalize_member(member));
            }
            _ => {}
        }
    }
    out
}

/// Reads every set with `ipset save`.
pub async fn save(runner: &Runner) -> Result<String, Error> {
    Ok(runner.output("ipset", &["save"], None).await?)
}

/// Runs `ipset restore -exist` with `text` on stdin.
pub async fn restore(runner: &Runner, text: &str) -> Result<(), Error> {
    runner
        .output("ipset", &["restore", "-exist"], Some(text))
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_kube_proxy_with_6_for_ipv6() {
        let v4 = SetNames::new("KUBE", IpFamily::V4);
        assert_eq!(v4.cluster_ip, "KUBE-CLUSTER-IP");
        assert_eq!(v4.node_port_local_sctp, "KUBE-NODE-PORT-LOCAL-SCTP-HASH");
        let v6 = SetNames::new("KUBE", IpFamily::V6);
        assert_eq!(v6.cluster_ip, "KUBE-6-CLUSTER-IP");
        // 32 characters before truncation, as in kube-proxy.
        assert_eq!(v6.node_port_local_sctp, "KUBE-6-NODE-PORT-LOCAL-SCTP-HAS");
        assert_eq!(
            v6.load_balancer_source_cidr,
            "KUBE-6-LOAD-BALANCER-SOURCE-CID"
        );
        assert!(
            v6.all().iter().all(|(n, _, _)| n.len() <= MAX_NAME_LEN),
            "{v6:?}"
        );
    }

    #[test]
    fn members_are_normalized_like_ipset_save() {
        assert_eq!(
            normalize_member("198.19.0.1,tcp:80,10.0.0.1/32"),
            "198.19.0.1,tcp:80,10.0.0.1"
        );
        assert_eq!(
            normalize_member("198.19.0.1,tcp:80,10.1.2.3/8"),
            "198.19.0.1,tcp:80,10.0.0.0/8"
        );
        assert_eq!(normalize_member("30080"), "30080");
    }

    #[test]
    fn restore_text_creates_missing_sets_and_applies_the_difference() {
        let names = SetNames::new("KUBE", IpFamily::V4);
        let mut sets = empty_sets(&names, IpFamily::V4);
        sets.add(&names.cluster_ip, "198.19.0.1,tcp:80".into());
        sets.add(&names.cluster_ip, "198.19.0.2,tcp:80".into());
        sets.add(&names.node_port_tcp, "30080".into());
        let desired = sets.into_map();
        let save = "create KUBE-CLUSTER-IP hash:ip,port family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0x1\n\
                    add KUBE-CLUSTER-IP 198.19.0.1,tcp:80\n\
                    add KUBE-CLUSTER-IP 198.19.0.9,tcp:80\n\
                    create OTHER hash:ip family inet\nadd OTHER 1.2.3.4\n";
        let ours: BTreeSet<String> = desired.keys().cloned().collect();
        let current = parse_save(save, &ours);
        assert_eq!(current.len(), 1, "{current:?}");
        let (text, changes) = restore_text(&desired, &current);
        assert_eq!(changes, 3, "{text}");
        assert!(!text.contains("create KUBE-CLUSTER-IP"), "{text}");
        assert!(text.contains("create KUBE-NODE-PORT-TCP bitmap:port range 0-65535\n"));
        assert!(text.contains(
            "create KUBE-LOOP-BACK hash:ip,port,ip family inet hashsize 1024 maxelem 65536\n"
        ));
        assert!(text.contains("del KUBE-CLUSTER-IP 198.19.0.9,tcp:80\n"));
        assert!(text.contains("add KUBE-CLUSTER-IP 198.19.0.2,tcp:80\n"));
        assert!(text.contains("add KUBE-NODE-PORT-TCP 30080\n"));
        assert!(!text.contains("OTHER"));
        // Applied: nothing left to do.
        let now: BTreeMap<String, BTreeSet<String>> = desired
            .values()
            .map(|s| (s.name.clone(), s.members.clone()))
            .collect();
        assert_eq!(restore_text(&desired, &now), (String::new(), 0));
    }
}
