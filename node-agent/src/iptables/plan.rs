//! The iptables sync decision, pure: whether a sync rewrites everything, and the
//! `iptables-restore --noflush` input that takes the kernel from what was last
//! written to the new [`RuleSet`]. The backend only runs what this decides.

use std::collections::{BTreeSet, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};

use super::chains::ChainNames;
use super::render::{RuleSet, ServiceRules};
use crate::proxy::ServicePortName;

/// What the last successful restore left in the kernel, as far as planning the
/// next one needs.
#[derive(Debug, Clone, Default)]
pub struct Written {
    /// Hash of each service port's rules.
    pub services: HashMap<ServicePortName, u64>,
    /// The nat chains that hold rules.
    pub active_chains: BTreeSet<String>,
    /// Hashes of the `filter` table and of the top-level `nat` chains as written.
    pub top: TopHashes,
}

/// Hashes of the parts of a ruleset that belong to no single service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TopHashes {
    pub filter: u64,
    pub nat: u64,
}

impl TopHashes {
    /// The hashes of `rs`'s `filter` table and top-level `nat` chains.
    pub fn of(rs: &RuleSet) -> Self {
        let mut f = DefaultHasher::new();
        rs.filter.hash(&mut f);
        let mut n = DefaultHasher::new();
        rs.nat_chains.hash(&mut n);
        rs.nat_rules.hash(&mut n);
        Self {
            filter: f.finish(),
            nat: n.finish(),
        }
    }
}

/// Whether this sync rewrites everything: when asked to (periodic resync, canary,
/// retry), and when nothing is known to have been written (first sync after a
/// start: the kernel may hold a predecessor's rules).
pub fn is_full(want_full: bool, written_before: bool) -> bool {
    want_full || !written_before
}

/// The hash that tells whether a service port's rules changed.
pub fn hash_of(s: &ServiceRules) -> u64 {
    let mut h = DefaultHasher::new();
    s.chains.hash(&mut h);
    s.rules.hash(&mut h);
    h.finish()
}

/// One restore input and what it leaves in the kernel.
pub struct Planned {
    pub text: String,
    /// Rules it writes.
    pub written: usize,
    /// The service ports whose chains it writes.
    pub changed: BTreeSet<ServicePortName>,
    pub stale: usize,
    pub hashes: HashMap<ServicePortName, u64>,
    pub active: BTreeSet<String>,
    pub top: TopHashes,
}

/// The restore input that takes the kernel from `previous` to `rs`: everything on
/// a full sync (`existing` holds the kernel's nat chains, to delete stale ones;
/// chains it names that the kernel does not hold are created and deleted again),
/// written in `nat` transactions of about `blocks` chains each when given (see
/// [`RuleSet::full_text_blocks`]); else the changed services' chains, and the
/// top-level chains of each table only when they differ from what was written
/// (empty text when nothing changed).
pub fn plan(
    rs: &RuleSet,
    previous: Option<&Written>,
    existing: Option<&[String]>,
    names: &ChainNames,
    blocks: Option<usize>,
) -> Planned {
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
    let top = TopHashes::of(rs);
    match (existing, previous) {
        (existing, None) | (existing @ Some(_), Some(_)) => {
            let stale: Vec<String> = existing
                .unwrap_or_default()
                .iter()
                .filter(|c| names.is_service_chain(c) && !active.contains(c.as_str()))
                .cloned()
                .collect();
            let text = match blocks {
                Some(n) => rs.full_text_blocks(&stale, n),
                None => rs.full_text(&stale),
            };
            Planned {
                text,
                written: rs.filter_rule_count + rs.nat_rule_count,
                changed: rs.services.keys().cloned().collect(),
                stale: stale.len(),
                hashes,
                active,
                top,
            }
        }
        (None, Some(prev)) => {
            let changed: BTreeSet<ServicePortName> = hashes
                .iter()
                .filter(|(k, h)| prev.services.get(*k) != Some(*h))
                .map(|(k, _)| k.clone())
                .collect();
            let stale: Vec<String> = prev.active_chains.difference(&active).cloned().collect();
            let filter = prev.top.filter != top.filter;
            let nat_top = prev.top.nat != top.nat;
            let nat_top_rules =
                rs.nat_rule_count - rs.services.values().map(|s| s.rule_count).sum::<usize>();
            let written = if filter { rs.filter_rule_count } else { 0 }
                + if nat_top { nat_top_rules } else { 0 }
                + changed
                    .iter()
                    .filter_map(|k| rs.services.get(k))
                    .map(|s| s.rule_count)
                    .sum::<usize>();
            Planned {
                text: rs.partial_text_of(&changed, &stale, filter, nat_top),
                written,
                changed,
                stale: stale.len(),
                hashes,
                active,
                top,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use meshlite_proto::model::{
        AddressFamily, Endpoint, EndpointPort, EndpointSlice, Protocol, Resource, Service,
    };
    use meshlite_runtime::Snapshot;

    use super::*;
    use crate::iptables::render::{RenderConfig, render};
    use crate::local::LocalDetector;
    use crate::proxy::{IpFamily, ProxyView};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Services `svc0..n` with one endpoint each; `svc0`'s endpoint is `ep0`.
    fn rules(n: usize, ep0: &str) -> RuleSet {
        let mut resources = Vec::new();
        for i in 0..n {
            let name = format!("svc{i}");
            resources.push(Resource::Service(
                Service::cluster_ip("ns", &name, ip(&format!("198.19.0.{}", i + 1))).with_port(
                    "p80",
                    Protocol::Tcp,
                    80,
                ),
            ));
            let ep = if i == 0 {
                ep0.to_string()
            } else {
                format!("198.18.0.{}", i + 1)
            };
            resources.push(Resource::EndpointSlice(EndpointSlice {
                namespace: "ns".into(),
                name: format!("{name}-1"),
                service_name: name,
                address_family: AddressFamily::Ipv4,
                ports: vec![EndpointPort {
                    name: "p80".into(),
                    protocol: Protocol::Tcp,
                    port: 80,
                    app_protocol: None,
                }],
                endpoints: vec![Endpoint::ready(ip(&ep))],
                ignored_by_proxy: false,
            }));
        }
        let view = ProxyView::build(&Snapshot::from_resources(resources), "node1", IpFamily::V4);
        let cfg = RenderConfig {
            chains: ChainNames::new("KUBE"),
            local: LocalDetector::Cidr("198.18.0.0/16".parse().unwrap()),
            masquerade_all: false,
            masquerade_mark: 0x4000,
            node_ip: Some(ip("192.0.2.1")),
            localhost_nodeports: false,
            random_fully: false,
            nodeport_addresses: vec![],
            node_ips: vec![ip("192.0.2.1")],
        };
        render(&view, &cfg)
    }

    fn written(p: &Planned) -> Written {
        Written {
            services: p.hashes.clone(),
            active_chains: p.active.clone(),
            top: p.top,
        }
    }

    fn names(p: &Planned) -> Vec<String> {
        p.changed.iter().map(|k| k.to_string()).collect()
    }

    #[test]
    fn first_sync_and_forced_syncs_are_full() {
        assert!(is_full(false, false));
        assert!(is_full(true, true));
        assert!(!is_full(false, true));
    }

    #[test]
    fn a_restart_deletes_chains_only_the_kernel_knows() {
        let n = ChainNames::new("KUBE");
        let rs = rules(2, "198.18.0.1");
        let existing = vec![
            "KUBE-SVC-AAAAAAAAAAAAAAAA".to_string(),
            "KUBE-SERVICES".to_string(),
            "OTHER".to_string(),
        ];
        let p = plan(&rs, None, Some(&existing), &n, None);
        assert_eq!(p.stale, 1, "only the unknown service chain is stale");
        assert!(p.text.contains("-X KUBE-SVC-AAAAAAAAAAAAAAAA"));
        assert_eq!(p.changed.len(), 2);
        assert_eq!(p.written, rs.filter_rule_count + rs.nat_rule_count);
    }

    #[test]
    fn nothing_changed_writes_nothing() {
        let n = ChainNames::new("KUBE");
        let rs = rules(3, "198.18.0.1");
        let first = plan(&rs, None, Some(&[]), &n, None);
        let again = plan(&rs, Some(&written(&first)), None, &n, None);
        assert!(again.changed.is_empty());
        assert_eq!(again.stale, 0);
        assert_eq!(again.text, "");
        assert_eq!(again.written, 0);
    }

    #[test]
    fn an_endpoint_change_leaves_the_unchanged_top_level_chains_alone() {
        let n = ChainNames::new("KUBE");
        let before = plan(&rules(3, "198.18.0.1"), None, Some(&[]), &n, None);
        let rs = rules(3, "198.18.0.100");
        let p = plan(&rs, Some(&written(&before)), None, &n, None);
        assert!(!p.text.contains("*filter"), "{}", p.text);
        assert!(!p.text.contains(":KUBE-SERVICES"), "{}", p.text);
        assert!(!p.text.contains("-A KUBE-SERVICES"), "{}", p.text);
        assert_eq!(
            p.written,
            rs.services.values().next().map(|s| s.rule_count).unwrap()
        );
        // A new service changes KUBE-SERVICES: it is written whole.
        let p = plan(
            &rules(4, "198.18.0.1"),
            Some(&written(&before)),
            None,
            &n,
            None,
        );
        assert!(p.text.contains(":KUBE-SERVICES"), "{}", p.text);
    }

    #[test]
    fn a_full_sync_in_blocks_writes_the_same_rules() {
        let n = ChainNames::new("KUBE");
        let rs = rules(5, "198.18.0.1");
        let stale = vec!["KUBE-SVC-AAAAAAAAAAAAAAAA".to_string()];
        let one = plan(&rs, None, Some(&stale), &n, None).text;
        let blocks = plan(&rs, None, Some(&stale), &n, Some(4)).text;
        fn sorted(t: &str) -> Vec<&str> {
            let mut v: Vec<&str> = t
                .lines()
                .filter(|l| !l.starts_with('*') && *l != "COMMIT")
                .collect();
            v.sort_unstable();
            v.dedup();
            v
        }
        assert_eq!(sorted(&one), sorted(&blocks));
        // 5 services of 2 chains in blocks of 4 chains: 3 blocks, then the
        // top-level chains, the flush and the deletion of the stale chain.
        assert_eq!(blocks.matches("*nat\n").count(), 6, "{blocks}");
        // KUBE-MARK-MASQ, which the services jump to, comes first; KUBE-SERVICES,
        // which jumps to them, after every service chain.
        let nat = &blocks[blocks.find("*nat").unwrap()..];
        let at = |s: &str| nat.find(s).unwrap();
        assert!(at(":KUBE-MARK-MASQ") < at(":KUBE-SVC-"));
        assert!(at(":KUBE-SERVICES") > nat.rfind(":KUBE-SEP-").unwrap());
        assert!(at("-X KUBE-SVC-AAAA") > at(":KUBE-SVC-AAAA"));
    }

    #[test]
    fn an_endpoint_change_rewrites_that_service_and_deletes_its_old_endpoint_chain() {
        let n = ChainNames::new("KUBE");
        let before = plan(&rules(3, "198.18.0.1"), None, Some(&[]), &n, None);
        let rs = rules(3, "198.18.0.100");
        let p = plan(&rs, Some(&written(&before)), None, &n, None);
        assert_eq!(names(&p), ["ns/svc0:p80"]);
        assert_eq!(p.stale, 1, "the old endpoint's chain");
        assert!(p.text.contains("198.18.0.100"));
        assert!(
            !p.text.contains("198.18.0.2:"),
            "other services are not rewritten"
        );
    }

    #[test]
    fn a_removed_service_has_its_chains_deleted() {
        let n = ChainNames::new("KUBE");
        let before = plan(&rules(3, "198.18.0.1"), None, Some(&[]), &n, None);
        let p = plan(
            &rules(2, "198.18.0.1"),
            Some(&written(&before)),
            None,
            &n,
            None,
        );
        assert!(p.changed.is_empty());
        assert_eq!(p.stale, 2, "its service and endpoint chains");
        assert_eq!(p.text.matches("\n-X ").count(), 2, "{}", p.text);
    }
}
