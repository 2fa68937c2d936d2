//! Planning: [`ProxyView`] -> what the kernel must hold in IPVS mode. Pure.
//!
//! Per service port, as kube-proxy's IPVS proxier builds it (`syncProxyRules`):
//! - a virtual server on the cluster IP, one per external IP, one per load-balancer
//!   IP, and one per node IP on the NodePort; all NAT (`Masq`) real servers with
//!   weight 1 (or the `meshlite.io/ipvs-weights` annotation's), chosen by the shared
//!   endpoint selection ([`crate::proxy::select`]): the cluster IP uses the local
//!   endpoints with internalTrafficPolicy Local, the other addresses with
//!   externalTrafficPolicy Local, falling back to the cluster endpoints when there is
//!   no local one (kube-proxy #97081), otherwise the cluster endpoints;
//! - the scheduler from `--ipvs-scheduler`, or the service's
//!   `meshlite.io/ipvs-scheduler` annotation; session affinity ClientIP makes the
//!   virtual server persistent with the service's timeout;
//! - the cluster IP, and the external / load-balancer IPs that are not already an
//!   address of the node, go on the dummy interface;
//! - the ipset members and the iptables rules of [`super::ipset`] and
//!   [`super::rules`].
//!
//! A service without usable endpoints keeps its virtual servers with no real
//! server: IPVS answers a new connection to it with ICMP port unreachable, the
//! REJECT of the iptables backend.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use meshlite_proto::model::Protocol;

use super::Scheduler;
use super::ipset::{self, IpSet, SetNames};
use super::rules::{self, RuleInput};
use crate::proxy::{EndpointInfo, IpFamily, ProxyView, ServicePortView};

/// Per-service scheduler override.
pub const SCHEDULER_ANNOTATION: &str = "meshlite.io/ipvs-scheduler";
/// Per-endpoint weights: `"<endpoint IP>=<weight>,..."`; unlisted endpoints get 1.
pub const WEIGHTS_ANNOTATION: &str = "meshlite.io/ipvs-weights";

/// `IP_VS_SVC_F_PERSISTENT`: the virtual server is persistent (session affinity).
pub const FLAG_PERSISTENT: u32 = 0x0001;
/// `IP_VS_SVC_F_HASHED`: set by the kernel on every service; not ours to compare.
pub const FLAG_HASHED: u32 = 0x0002;

/// A virtual server's identity: protocol, address and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VsKey {
    pub protocol: Protocol,
    pub addr: SocketAddr,
}

/// A virtual server as it must be: attributes and real servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualServer {
    pub scheduler: Scheduler,
    /// `IP_VS_SVC_F_*` flags (without `HASHED`).
    pub flags: u32,
    /// Persistence timeout in seconds (0 unless persistent).
    pub timeout: u32,
    /// Real server -> weight. Always NAT (`Masq`).
    pub dests: BTreeMap<SocketAddr, u32>,
    /// `ns/name:port` of the service port that owns it, for logs and `render`.
    pub owner: String,
}

/// What one family needs besides the virtual servers.
#[derive(Debug, Clone, PartialEq)]
pub struct FamilyPlan {
    pub family: IpFamily,
    /// Our ipsets of this family (every set, even when empty), by name.
    pub ipsets: BTreeMap<String, IpSet>,
    /// `iptables-restore --noflush` input (nat and filter).
    pub rules: String,
    pub nat_rule_count: usize,
    pub filter_rule_count: usize,
}

/// The whole desired state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub virtual_servers: BTreeMap<VsKey, VirtualServer>,
    /// Addresses the dummy interface must hold.
    pub bind: BTreeSet<IpAddr>,
    pub families: Vec<FamilyPlan>,
    /// Annotations that could not be used (the default was used instead).
    pub warnings: Vec<String>,
}

/// Everything planning depends on besides the view, for one family.
#[derive(Debug, Clone)]
pub struct PlanConfig {
    /// Chain and ipset prefix (`KUBE`).
    pub prefix: String,
    pub scheduler: Scheduler,
    /// Tells local pods' traffic apart: other traffic to a cluster IP is masqueraded.
    pub local: crate::local::LocalDetector,
    pub masquerade_all: bool,
    /// `1 << masquerade_bit`.
    pub masquerade_mark: u32,
    pub random_fully: bool,
    /// The node's primary IP of this family (load-balancer source ranges).
    pub node_ip: Option<IpAddr>,
    /// The addresses NodePorts answer on (virtual servers are per address).
    pub node_port_ips: Vec<IpAddr>,
    /// Addresses already on the node's other interfaces: an external or
    /// load-balancer IP among them is not put on the dummy interface.
    pub local_addresses: BTreeSet<IpAddr>,
}

// === impl VsKey ===

impl VsKey {
    pub fn new(protocol: Protocol, ip: IpAddr, port: u16) -> Self {
        Self {
            protocol,
            addr: SocketAddr::new(ip, port),
        }
    }

    pub fn family(&self) -> IpFamily {
        IpFamily::of(&self.addr.ip())
    }
}

/// `TCP 198.19.0.1:80`, `UDP [2001:db8::1]:53`.
impl fmt::Display for VsKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.protocol, self.addr)
    }
}

// === impl VirtualServer ===

impl VirtualServer {
    /// Same kernel attributes (scheduler, flags, timeout), ignoring real servers.
    pub fn same_attributes(&self, other: &Self) -> bool {
        self.scheduler == other.scheduler
            && self.flags & !FLAG_HASHED == other.flags & !FLAG_HASHED
            && self.timeout == other.timeout
    }
}

// === impl Plan ===

impl Plan {
    /// Merges the per-family plans into one (the kernel's IPVS table and the dummy
    /// interface are shared by both families).
    pub fn build(views: &[ProxyView], cfg: impl Fn(&ProxyView) -> PlanConfig) -> Self {
        let mut plan = Plan::default();
        for view in views {
            let c = cfg(view);
            plan.add_family(view, &c);
        }
        plan
    }

    /// Number of real servers over all virtual servers.
    pub fn real_server_count(&self) -> usize {
        self.virtual_servers.values().map(|v| v.dests.len()).sum()
    }

    fn add_family(&mut self, view: &ProxyView, cfg: &PlanConfig) {
        let family = view.family;
        let names = SetNames::new(&cfg.prefix, family);
        let mut sets = ipset::empty_sets(&names, family);
        let mut lb_no_node_access: Vec<(IpAddr, Protocol, u16)> = Vec::new();

        for (spn, port) in &view.ports {
            let info = &port.info;
            let proto = spn.protocol;
            let p = proto.as_lower();
            let owner = spn.to_string();
            let (scheduler, weights) = self.annotations(port, cfg.scheduler);
            let vs = |dests: &[EndpointInfo]| VirtualServer {
                scheduler,
                flags: if info.session_affinity_timeout.is_some() {
                    FLAG_PERSISTENT
                } else {
                    0
                },
                timeout: info.session_affinity_timeout.unwrap_or(0),
                dests: dests
                    .iter()
                    .map(|ep| (ep.addr(), weights.get(&ep.ip).copied().unwrap_or(1)))
                    .collect(),
                owner: owner.clone(),
            };
            let internal = endpoints_for(port, info.internal_policy_local);
            let external = endpoints_for(port, info.external_policy_local);

            // Hairpin: a local endpoint reaching itself through the service.
            for ep in port.endpoints.iter().filter(|e| e.is_local) {
                sets.add(
                    &names.loop_back,
                    format!("{},{p}:{},{}", ep.ip, ep.port, ep.ip),
                );
            }

            let cluster = format!("{},{p}:{}", info.cluster_ip, info.port);
            sets.add(&names.cluster_ip, cluster);
            self.virtual_servers
                .insert(VsKey::new(proto, info.cluster_ip, info.port), vs(internal));
            self.bind.insert(info.cluster_ip);

            for ip in &info.external_ips {
                let entry = format!("{ip},{p}:{}", info.port);
                if info.external_policy_local {
                    sets.add(&names.external_ip_local, entry);
                } else {
                    sets.add(&names.external_ip, entry);
                }
                self.virtual_servers
                    .insert(VsKey::new(proto, *ip, info.port), vs(external));
                if !cfg.local_addresses.contains(ip) {
                    self.bind.insert(*ip);
                }
            }

            for ip in &info.load_balancer_ips {
                let entry = format!("{ip},{p}:{}", info.port);
                sets.add(&names.load_balancer, entry.clone());
                if info.external_policy_local {
                    sets.add(&names.load_balancer_local, entry.clone());
                }
                if !info.load_balancer_source_ranges.is_empty() {
                    sets.add(&names.load_balancer_fw, entry);
                    let mut allow_node = false;
                    for cidr in &info.load_balancer_source_ranges {
                        sets.add(
                            &names.load_balancer_source_cidr,
                            format!("{ip},{p}:{},{}", info.port, cidr.trunc()),
                        );
                        allow_node |= cfg.node_ip.is_some_and(|n| cidr.contains(&n));
                    }
                    if allow_node {
                        // The node reaching its own LB IP arrives with the LB IP as
                        // its source.
                        sets.add(
                            &names.load_balancer_source_ip,
                            format!("{ip},{p}:{},{ip}", info.port),
                        );
                    } else {
                        lb_no_node_access.push((*ip, proto, info.port));
                    }
                }
                self.virtual_servers
                    .insert(VsKey::new(proto, *ip, info.port), vs(external));
                if !cfg.local_addresses.contains(ip) {
                    self.bind.insert(*ip);
                }
            }

            if let Some(node_port) = info.node_port
                && !cfg.node_port_ips.is_empty()
            {
                let local = info.external_policy_local;
                match proto {
                    Protocol::Tcp | Protocol::Udp => {
                        let (all, loc) = if proto == Protocol::Tcp {
                            (&names.node_port_tcp, &names.node_port_local_tcp)
                        } else {
                            (&names.node_port_udp, &names.node_port_local_udp)
                        };
                        sets.add(all, node_port.to_string());
                        if local {
                            sets.add(loc, node_port.to_string());
                        }
                    }
                    Protocol::Sctp => {
                        for ip in &cfg.node_port_ips {
                            let entry = format!("{ip},{p}:{node_port}");
                            sets.add(&names.node_port_sctp, entry.clone());
                            if local {
                                sets.add(&names.node_port_local_sctp, entry);
                            }
                        }
                    }
                }
                for ip in &cfg.node_port_ips {
                    self.virtual_servers
                        .insert(VsKey::new(proto, *ip, node_port), vs(external));
                }
            }

            if let Some(hc) = info.health_check_node_port {
                sets.add(&names.health_check_node_port, hc.to_string());
            }
        }

        // KUBE-IPVS-IPS: every address on the dummy interface of this family.
        for ip in self.bind.iter().filter(|ip| family.matches(ip)) {
            sets.add(&names.ipvs_ips, ip.to_string());
        }

        let r = rules::render(&RuleInput {
            prefix: &cfg.prefix,
            family,
            names: &names,
            sets: &sets,
            local: &cfg.local,
            masquerade_all: cfg.masquerade_all,
            masquerade_mark: cfg.masquerade_mark,
            random_fully: cfg.random_fully,
            lb_no_node_access: &lb_no_node_access,
        });
        self.families.push(FamilyPlan {
            family,
            ipsets: sets.into_map(),
            rules: r.text,
            nat_rule_count: r.nat_rules,
            filter_rule_count: r.filter_rules,
        });
    }

    /// The scheduler and weights a service's annotations ask for; bad values are
    /// reported in `warnings` and ignored.
    fn annotations(
        &mut self,
        port: &ServicePortView,
        default: Scheduler,
    ) -> (Scheduler, BTreeMap<IpAddr, u32>) {
        let svc = &port.info.service;
        let name = port.info.name.service.to_string();
        let scheduler = match svc.annotations.get(SCHEDULER_ANNOTATION) {
            None => default,
            Some(v) => match v.trim().parse::<Scheduler>() {
                Ok(s) => s,
                Err(e) => {
                    self.warn(format!("{name}: {SCHEDULER_ANNOTATION}: {e}"));
                    default
                }
            },
        };
        let weights = match svc.annotations.get(WEIGHTS_ANNOTATION) {
            None => BTreeMap::new(),
            Some(v) => match parse_weights(v) {
                Ok(w) => w,
                Err(e) => {
                    self.warn(format!("{name}: {WEIGHTS_ANNOTATION}: {e}"));
                    BTreeMap::new()
                }
            },
        };
        (scheduler, weights)
    }

    fn warn(&mut self, w: String) {
        if !self.warnings.contains(&w) {
            self.warnings.push(w);
        }
    }
}

/// kube-proxy's `syncEndpoint`: with a Local policy the local endpoints if there
/// are any, else the cluster endpoints (empty when no traffic uses them).
fn endpoints_for(port: &ServicePortView, local_policy: bool) -> &[EndpointInfo] {
    let sel = &port.selection;
    if local_policy && !sel.local.is_empty() {
        &sel.local
    } else {
        &sel.cluster
    }
}

/// Parses `"198.18.1.1=3, 198.18.2.1=1"`.
pub fn parse_weights(v: &str) -> Result<BTreeMap<IpAddr, u32>, String> {
    let mut out = BTreeMap::new();
    for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (ip, w) = item
            .split_once('=')
            .ok_or_else(|| format!("{item:?}: want <endpoint IP>=<weight>"))?;
        let ip: IpAddr = ip
            .trim()
            .parse()
            .map_err(|_| format!("{item:?}: {:?} is not an IP address", ip.trim()))?;
        let w: u32 = w
            .trim()
            .parse()
            .ok()
            .filter(|w| *w <= 65535)
            .ok_or_else(|| format!("{item:?}: the weight must be 0..=65535"))?;
        out.insert(ip, w);
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
