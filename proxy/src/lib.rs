//! meshlite-proxy: the backend-independent proxy view.
//!
//! [`ProxyView::build`] turns a [`Snapshot`] into what every backend (iptables,
//! IPVS) programs: per service port and IP family, the service facts a proxy needs
//! and the endpoints to use for cluster traffic and for local/external traffic,
//! selected exactly as kube-proxy selects them (see [`select`]). Pure: no kernel, no
//! clock, no I/O, so every policy combination is unit-tested with plain values.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use meshlite_proto::model::{
    AddressFamily, Protocol, Service, ServiceName, ServiceType, TrafficPolicy,
};
use meshlite_runtime::{ChangeSet, Snapshot};

pub mod select;

pub use select::{Selection, categorize};

/// An IP family; kube-proxy runs one proxier per family, and so do we.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpFamily {
    V4,
    V6,
}

/// A service port: `<namespace>/<name>[:<port name>]` plus protocol, the unit
/// kube-proxy hashes into chain names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortName {
    pub service: ServiceName,
    /// The port's name; empty for a single unnamed port.
    pub port: String,
    pub protocol: Protocol,
}

/// The facts about one service port a proxy needs, for one IP family.
#[derive(Debug, Clone, PartialEq)]
pub struct ServicePortInfo {
    pub name: ServicePortName,
    pub cluster_ip: IpAddr,
    pub port: u16,
    pub node_port: Option<u16>,
    /// Of this family only.
    pub external_ips: Vec<IpAddr>,
    /// Of this family only.
    pub load_balancer_ips: Vec<IpAddr>,
    /// Of this family only.
    pub load_balancer_source_ranges: Vec<IpNet>,
    /// `Some(seconds)` for sessionAffinity ClientIP.
    pub session_affinity_timeout: Option<u32>,
    /// externalTrafficPolicy Local (only for externally accessible services:
    /// NodePort, LoadBalancer, or ClusterIP with external IPs).
    pub external_policy_local: bool,
    pub internal_policy_local: bool,
    pub health_check_node_port: Option<u16>,
    /// The whole service, for anything backend specific (annotations).
    pub service: Arc<Service>,
}

/// One endpoint of a service port, as the selection sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointInfo {
    pub ip: IpAddr,
    pub port: u16,
    /// On this node.
    pub is_local: bool,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub zone_hints: Vec<String>,
    pub node_hints: Vec<String>,
}

/// One service port with its selected endpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct ServicePortView {
    pub info: ServicePortInfo,
    /// Every endpoint of this family and port, deduplicated, sorted by `ip:port`.
    pub endpoints: Vec<EndpointInfo>,
    pub selection: Selection,
}

/// The whole view for one node and IP family.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxyView {
    pub family: IpFamily,
    pub node_name: String,
    /// From the snapshot's own Node object (`topology.kubernetes.io/zone`).
    pub node_zone: Option<String>,
    /// The node's addresses of this family, from its Node object.
    pub node_ips: Vec<IpAddr>,
    /// The node's pod CIDRs of this family (`spec.podCIDRs`), for
    /// `--detect-local-mode NodeCIDR`.
    pub node_pod_cidrs: Vec<IpNet>,
    /// Shared, so a view rebuilt for a few changed services shares every other
    /// port with the previous one (and a backend can tell them apart by pointer).
    pub ports: BTreeMap<ServicePortName, Arc<ServicePortView>>,
}

// === impl IpFamily ===

impl IpFamily {
    pub fn of(ip: &IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }

    pub fn matches(self, ip: &IpAddr) -> bool {
        Self::of(ip) == self
    }

    pub fn matches_net(self, net: &IpNet) -> bool {
        self.matches(&net.addr())
    }

    fn slice_family(self) -> AddressFamily {
        match self {
            Self::V4 => AddressFamily::Ipv4,
            Self::V6 => AddressFamily::Ipv6,
        }
    }

    /// `ipv4` / `ipv6`, for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V4 => "ipv4",
            Self::V6 => "ipv6",
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl ServicePortName ===

impl ServicePortName {
    /// The smallest name of `service`'s ports, to range over them.
    pub fn first_of(service: &ServiceName) -> Self {
        Self {
            service: service.clone(),
            port: String::new(),
            protocol: Protocol::Tcp,
        }
    }

    pub fn new(namespace: &str, name: &str, port: &str, protocol: Protocol) -> Self {
        Self {
            service: ServiceName::new(namespace, name),
            port: port.to_string(),
            protocol,
        }
    }
}

/// kube-proxy's `ServicePortName.String()`: `ns/name` or `ns/name:port`.
impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port.is_empty() {
            write!(f, "{}", self.service)
        } else {
            write!(f, "{}:{}", self.service, self.port)
        }
    }
}

// === impl ServicePortInfo ===

impl ServicePortInfo {
    /// Reachable through a NodePort, a LoadBalancer IP or an external IP.
    pub fn externally_accessible(&self) -> bool {
        self.node_port.is_some()
            || !self.load_balancer_ips.is_empty()
            || !self.external_ips.is_empty()
    }

    /// Some traffic to this port uses the cluster-wide endpoints: internal traffic
    /// with the Cluster policy, and any external traffic, because even with
    /// externalTrafficPolicy Local, pods and the node itself reach an external
    /// address through the cluster-wide endpoints (kube-proxy's
    /// `UsesClusterEndpoints`; the "pod traffic" and "route LOCAL traffic" rules of
    /// the `EXT` chain jump to the cluster chain).
    pub fn uses_cluster_endpoints(&self) -> bool {
        !self.internal_policy_local || self.externally_accessible()
    }

    /// Some traffic to this port uses only this node's endpoints.
    pub fn uses_local_endpoints(&self) -> bool {
        self.internal_policy_local || (self.external_policy_local && self.externally_accessible())
    }
}

// === impl EndpointInfo ===

impl EndpointInfo {
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }
}

/// `ip:port` (`[v6]:port`), kube-proxy's `Endpoint.String()`.
impl fmt::Display for EndpointInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.addr())
    }
}

// === impl ServicePortView ===

impl ServicePortView {
    /// The service has usable endpoints somewhere in the cluster.
    pub fn has_endpoints(&self) -> bool {
        self.selection.has_any
    }
}

// === impl ProxyView ===

impl ProxyView {
    /// Builds the view of every proxied service port of `family` for `node_name`.
    ///
    /// Skipped like kube-proxy skips them: headless and ExternalName services,
    /// services without a cluster IP of this family, and services and slices the
    /// control plane marked as not ours (labelled for another proxy, or headless).
    pub fn build(snapshot: &Snapshot, node_name: &str, family: IpFamily) -> Self {
        let mut view = Self::empty(snapshot, node_name, family);
        for service in snapshot.services() {
            view.add_service(snapshot, service);
        }
        view
    }

    /// A view without ports: the node's own fields.
    fn empty(snapshot: &Snapshot, node_name: &str, family: IpFamily) -> Self {
        let node = snapshot.node(node_name);
        let node_zone = node.and_then(|n| n.zone.clone()).filter(|z| !z.is_empty());
        let node_ips = node
            .map(|n| {
                n.addresses
                    .iter()
                    .filter(|ip| family.matches(ip))
                    .copied()
                    .collect()
            })
            .unwrap_or_default();
        let node_pod_cidrs = node
            .map(|n| {
                n.pod_cidrs
                    .iter()
                    .filter(|c| family.matches_net(c))
                    .copied()
                    .collect()
            })
            .unwrap_or_default();
        Self {
            family,
            node_name: node_name.to_string(),
            node_zone,
            node_ips,
            node_pod_cidrs,
            ports: BTreeMap::new(),
        }
    }

    /// The view after `changes`, computed from this one: only the changed
    /// services' ports are rebuilt, every other port is shared. A full update, or
    /// a change to this node's zone, addresses or pod CIDRs (they feed every
    /// port), rebuilds everything.
    pub fn rebuild(&self, snapshot: &Snapshot, changes: &ChangeSet) -> Self {
        if changes.full {
            return Self::build(snapshot, &self.node_name, self.family);
        }
        if changes.nodes {
            let node = Self::empty(snapshot, &self.node_name, self.family);
            if (&node.node_zone, &node.node_ips, &node.node_pod_cidrs)
                != (&self.node_zone, &self.node_ips, &self.node_pod_cidrs)
            {
                return Self::build(snapshot, &self.node_name, self.family);
            }
        }
        let mut view = self.clone();
        for name in &changes.services {
            let gone: Vec<ServicePortName> = view
                .ports
                .range(ServicePortName::first_of(name)..)
                .take_while(|(k, _)| &k.service == name)
                .map(|(k, _)| k.clone())
                .collect();
            for k in gone {
                view.ports.remove(&k);
            }
            if let Some(service) = snapshot.service(name) {
                view.add_service(snapshot, service);
            }
        }
        view
    }

    /// Adds (or replaces) one service's ports.
    fn add_service(&mut self, snapshot: &Snapshot, service: &Arc<Service>) {
        let Some(info_base) = PortBase::of(service, self.family) else {
            return;
        };
        let name = service.service_name();
        let endpoints = endpoints_by_port(snapshot, &name, self.family, &self.node_name);
        for sp in &service.ports {
            let spn = ServicePortName {
                service: name.clone(),
                port: sp.name.clone(),
                protocol: sp.protocol,
            };
            let info = info_base.port(spn.clone(), sp.port, sp.node_port);
            let eps = endpoints
                .get(&(sp.name.clone(), sp.protocol))
                .cloned()
                .unwrap_or_default();
            let selection = categorize(&eps, &info, &self.node_name, self.node_zone.as_deref());
            self.ports.insert(
                spn,
                Arc::new(ServicePortView {
                    info,
                    endpoints: eps,
                    selection,
                }),
            );
        }
    }

    /// The ports of the given services present in this view.
    pub fn ports_of<'a>(
        &'a self,
        services: &'a BTreeSet<ServiceName>,
    ) -> impl Iterator<Item = &'a ServicePortName> + 'a {
        self.ports.keys().filter(|k| services.contains(&k.service))
    }

    /// Number of endpoints over all ports (kube-proxy's "large cluster" measure).
    pub fn endpoint_count(&self) -> usize {
        self.ports.values().map(|p| p.endpoints.len()).sum()
    }
}

/// The per-service part of [`ServicePortInfo`], computed once per service.
struct PortBase {
    cluster_ip: IpAddr,
    external_ips: Vec<IpAddr>,
    load_balancer_ips: Vec<IpAddr>,
    load_balancer_source_ranges: Vec<IpNet>,
    session_affinity_timeout: Option<u32>,
    external_policy_local: bool,
    internal_policy_local: bool,
    health_check_node_port: Option<u16>,
    service: Arc<Service>,
}

impl PortBase {
    fn of(service: &Arc<Service>, family: IpFamily) -> Option<Self> {
        if service.headless || service.kind == ServiceType::ExternalName || service.ignored_by_proxy
        {
            return None;
        }
        let cluster_ip = *service.cluster_ips.iter().find(|ip| family.matches(ip))?;
        let of_family = |ips: &[IpAddr]| -> Vec<IpAddr> {
            ips.iter()
                .filter(|ip| family.matches(ip))
                .copied()
                .collect()
        };
        let load_balancer_ips = if service.kind == ServiceType::LoadBalancer {
            of_family(&service.load_balancer_ips)
        } else {
            Vec::new()
        };
        // The API allows externalTrafficPolicy on externally accessible services:
        // NodePort, LoadBalancer, and ClusterIP with external IPs.
        let externally_accessible = match service.kind {
            ServiceType::NodePort | ServiceType::LoadBalancer => true,
            ServiceType::ClusterIp => !service.external_ips.is_empty(),
            _ => false,
        };
        let external_policy_local =
            service.external_traffic_policy == TrafficPolicy::Local && externally_accessible;
        let health_check_node_port =
            if external_policy_local && service.kind == ServiceType::LoadBalancer {
                service.health_check_node_port
            } else {
                None
            };
        Some(Self {
            cluster_ip,
            external_ips: of_family(&service.external_ips),
            load_balancer_ips,
            load_balancer_source_ranges: service
                .load_balancer_source_ranges
                .iter()
                .filter(|n| family.matches_net(n))
                .copied()
                .collect(),
            session_affinity_timeout: service.session_affinity_timeout,
            external_policy_local,
            internal_policy_local: service.internal_traffic_policy == TrafficPolicy::Local,
            health_check_node_port,
            service: service.clone(),
        })
    }

    fn port(&self, name: ServicePortName, port: u16, node_port: Option<u16>) -> ServicePortInfo {
        let node_port = match self.service.kind {
            ServiceType::NodePort | ServiceType::LoadBalancer => node_port.filter(|p| *p != 0),
            _ => None,
        };
        ServicePortInfo {
            name,
            cluster_ip: self.cluster_ip,
            port,
            node_port,
            external_ips: self.external_ips.clone(),
            load_balancer_ips: self.load_balancer_ips.clone(),
            load_balancer_source_ranges: self.load_balancer_source_ranges.clone(),
            session_affinity_timeout: self.session_affinity_timeout,
            external_policy_local: self.external_policy_local,
            internal_policy_local: self.internal_policy_local,
            health_check_node_port: self.health_check_node_port,
            service: self.service.clone(),
        }
    }
}

/// Endpoints of a service per (slice port name, protocol), as kube-proxy's
/// EndpointSliceCache merges them: slices of the right family, the first address of
/// each endpoint, deduplicated by `ip:port`, sorted by `ip:port`.
///
/// The same `ip:port` in two slices happens when a pod IP is reused while the old
/// pod still terminates (or while an endpoint moves between slices). As kube-proxy
/// 1.36 does, a non-terminating copy replaces any earlier copy and a terminating one
/// never replaces an earlier copy, so the running pod wins whatever the slice order.
/// (Two non-terminating copies: the last by slice name; kube-proxy leaves it
/// undefined.)
/// The port number is the slice's, so a named `targetPort` resolves per slice.
fn endpoints_by_port(
    snapshot: &Snapshot,
    service: &ServiceName,
    family: IpFamily,
    node_name: &str,
) -> BTreeMap<(String, Protocol), Vec<EndpointInfo>> {
    let mut by_port: BTreeMap<(String, Protocol), BTreeMap<String, EndpointInfo>> = BTreeMap::new();
    for slice in snapshot.slices_for(service) {
        if slice.address_family != family.slice_family() || slice.ignored_by_proxy {
            continue;
        }
        for port in &slice.ports {
            if port.port == 0 {
                continue;
            }
            let set = by_port
                .entry((port.name.clone(), port.protocol))
                .or_default();
            for ep in &slice.endpoints {
                let Some(ip) = ep.addresses.first() else {
                    continue;
                };
                if !family.matches(ip) {
                    continue;
                }
                let is_local = ep.node_name.as_deref() == Some(node_name);
                let info = EndpointInfo {
                    ip: *ip,
                    port: port.port,
                    is_local,
                    ready: ep.ready,
                    serving: ep.serving,
                    terminating: ep.terminating,
                    zone_hints: ep.zone_hints.clone(),
                    node_hints: ep.node_hints.clone(),
                };
                let key = info.to_string();
                if !info.terminating || !set.contains_key(&key) {
                    set.insert(key, info);
                }
            }
        }
    }
    by_port
        .into_iter()
        .map(|(k, set)| (k, set.into_values().collect()))
        .collect()
}

#[cfg(test)]
mod tests;
