//! Validated domain types for the resources on the stream.
//!
//! The control plane builds these from Kubernetes objects (dropping what is invalid,
//! with a reason) and encodes them; agents decode wire types into these with
//! `TryFrom`, which rejects anything malformed so a bad resource is NACKed by key
//! instead of reaching the kernel or the zone.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

use crate::v1;

mod convert;

pub use convert::ConvertError;

/// Transport protocol of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

/// `spec.type` of a Service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServiceType {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalName,
}

/// `externalTrafficPolicy` / `internalTrafficPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TrafficPolicy {
    #[default]
    Cluster,
    Local,
}

/// Address family of an EndpointSlice. FQDN slices are dropped by the control plane
/// (no proxy or DNS in the cluster uses them), so they do not appear here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressFamily {
    Ipv4,
    Ipv6,
}

/// `<namespace>/<name>` of a Service, the unit endpoint slices attach to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName {
    pub namespace: String,
    pub name: String,
}

/// A Service as a proxy and DNS see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub kind: ServiceType,
    /// Empty for headless and ExternalName services. Primary family first.
    pub cluster_ips: Vec<IpAddr>,
    pub headless: bool,
    pub ports: Vec<ServicePort>,
    pub external_ips: Vec<IpAddr>,
    pub load_balancer_ips: Vec<IpAddr>,
    pub load_balancer_source_ranges: Vec<IpNet>,
    /// `Some(timeout seconds)` for sessionAffinity: ClientIP.
    pub session_affinity_timeout: Option<u32>,
    pub external_traffic_policy: TrafficPolicy,
    pub internal_traffic_policy: TrafficPolicy,
    pub health_check_node_port: Option<u16>,
    pub external_name: Option<String>,
    pub publish_not_ready_addresses: bool,
    /// `meshlite.io/*` annotations.
    pub annotations: BTreeMap<String, String>,
    /// Labelled `service.kubernetes.io/service-proxy-name` for a proxy other than
    /// the one the control plane claims (`--service-proxy-name`): node agents do not
    /// program it; DNS serves it.
    pub ignored_by_proxy: bool,
}

/// One entry of `spec.ports`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub node_port: Option<u16>,
    pub target_port: TargetPort,
    pub app_protocol: Option<String>,
}

/// `targetPort`: a number or a container port name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

/// A discovery.k8s.io/v1 EndpointSlice.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointSlice {
    pub namespace: String,
    pub name: String,
    /// The `kubernetes.io/service-name` label.
    pub service_name: String,
    pub address_family: AddressFamily,
    pub ports: Vec<EndpointPort>,
    pub endpoints: Vec<Endpoint>,
    /// Labelled `service.kubernetes.io/headless`, or for another proxy: node agents
    /// do not use it, as kube-proxy does not watch such slices; DNS does.
    pub ignored_by_proxy: bool,
}

/// One port of an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub app_protocol: Option<String>,
}

/// One endpoint (usually one pod) of an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub addresses: Vec<IpAddr>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<String>,
    pub zone: Option<String>,
    pub zone_hints: Vec<String>,
    pub node_hints: Vec<String>,
    pub hostname: Option<String>,
    pub target_pod: Option<String>,
}

/// The parts of a Node an agent needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub zone: Option<String>,
    pub addresses: Vec<IpAddr>,
    pub pod_cidrs: Vec<IpNet>,
}

/// Any resource carried on the stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Resource {
    Service(Service),
    EndpointSlice(EndpointSlice),
    Node(Node),
}

/// The kinds of resource on the stream, each one Kubernetes kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceKind {
    Service,
    EndpointSlice,
    Node,
}

/// The identity of a resource on the stream: `service/<ns>/<name>`,
/// `endpointslice/<ns>/<name>` or `node/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceKey {
    Service { namespace: String, name: String },
    EndpointSlice { namespace: String, name: String },
    Node { name: String },
}

/// A key string that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid resource key {key:?}: expected service/<ns>/<name>, endpointslice/<ns>/<name> or node/<name>"
)]
pub struct InvalidKey {
    pub key: String,
}

// === impl Protocol ===

impl Protocol {
    /// Lower-case name as iptables and DNS SRV labels spell it.
    pub fn as_lower(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }

    /// Upper-case name as Kubernetes spells it.
    pub fn as_k8s(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_k8s())
    }
}

// === impl ServiceName ===

impl ServiceName {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

// === impl Service ===

impl Service {
    /// `<namespace>/<name>`.
    pub fn service_name(&self) -> ServiceName {
        ServiceName::new(&self.namespace, &self.name)
    }

    /// The stream key of this service.
    pub fn key(&self) -> ResourceKey {
        ResourceKey::Service {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }

    /// A minimal ClusterIP service, for tests and fixtures.
    pub fn cluster_ip(namespace: &str, name: &str, ip: IpAddr) -> Self {
        Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
            kind: ServiceType::ClusterIp,
            cluster_ips: vec![ip],
            headless: false,
            ports: Vec::new(),
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            load_balancer_source_ranges: Vec::new(),
            session_affinity_timeout: None,
            external_traffic_policy: TrafficPolicy::Cluster,
            internal_traffic_policy: TrafficPolicy::Cluster,
            health_check_node_port: None,
            external_name: None,
            publish_not_ready_addresses: false,
            annotations: BTreeMap::new(),
            ignored_by_proxy: false,
        }
    }

    /// Fixture modifier: adds a port whose target is the same number.
    pub fn with_port(mut self, name: &str, protocol: Protocol, port: u16) -> Self {
        self.ports.push(ServicePort {
            name: name.to_string(),
            protocol,
            port,
            node_port: None,
            target_port: TargetPort::Number(port),
            app_protocol: None,
        });
        self
    }
}

// === impl EndpointSlice ===

impl EndpointSlice {
    /// The stream key of this slice.
    pub fn key(&self) -> ResourceKey {
        ResourceKey::EndpointSlice {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }

    /// The service this slice belongs to.
    pub fn service(&self) -> ServiceName {
        ServiceName::new(&self.namespace, &self.service_name)
    }
}

// === impl Endpoint ===

impl Endpoint {
    /// A ready endpoint with one address, for tests and fixtures.
    pub fn ready(ip: IpAddr) -> Self {
        Self {
            addresses: vec![ip],
            ready: true,
            serving: true,
            terminating: false,
            node_name: None,
            zone: None,
            zone_hints: Vec::new(),
            node_hints: Vec::new(),
            hostname: None,
            target_pod: None,
        }
    }

    /// Fixture modifier: sets the node name.
    pub fn on_node(mut self, node: &str) -> Self {
        self.node_name = Some(node.to_string());
        self
    }
}

// === impl Resource ===

impl Resource {
    /// The stream key of this resource.
    pub fn key(&self) -> ResourceKey {
        match self {
            Resource::Service(s) => s.key(),
            Resource::EndpointSlice(s) => s.key(),
            Resource::Node(n) => ResourceKey::Node {
                name: n.name.clone(),
            },
        }
    }
}

// === impl ResourceKind ===

impl ResourceKind {
    pub const ALL: [Self; 3] = [Self::Service, Self::EndpointSlice, Self::Node];

    /// The key prefix: `service`, `endpointslice` or `node`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Service => "service",
            Self::EndpointSlice => "endpointslice",
            Self::Node => "node",
        }
    }

    /// The Kubernetes `apiVersion` of the objects of this kind.
    pub fn api_version(self) -> &'static str {
        match self {
            Self::Service | Self::Node => "v1",
            Self::EndpointSlice => "discovery.k8s.io/v1",
        }
    }

    /// The Kubernetes `kind`.
    pub fn k8s_kind(self) -> &'static str {
        match self {
            Self::Service => "Service",
            Self::EndpointSlice => "EndpointSlice",
            Self::Node => "Node",
        }
    }

    /// The kind of a Kubernetes object, by its `apiVersion` and `kind`; `None` for
    /// objects meshlite does not use.
    pub fn of_k8s(api_version: &str, kind: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.api_version() == api_version && k.k8s_kind() == kind)
    }

    /// Whether objects of this kind live in a namespace.
    pub fn namespaced(self) -> bool {
        self != Self::Node
    }

    /// The key of the object `namespace/name` of this kind (`namespace` is ignored
    /// for Nodes).
    pub fn key(self, namespace: &str, name: &str) -> ResourceKey {
        match self {
            Self::Service => ResourceKey::service(namespace, name),
            Self::EndpointSlice => ResourceKey::endpoint_slice(namespace, name),
            Self::Node => ResourceKey::node(name),
        }
    }

    /// The kind of a key in its string form, from its prefix.
    pub fn of_key_str(key: &str) -> Option<Self> {
        let prefix = key.split('/').next()?;
        Self::ALL.into_iter().find(|k| k.as_str() == prefix)
    }
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl ResourceKey ===

impl ResourceKey {
    pub fn service(namespace: &str, name: &str) -> Self {
        Self::Service {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }

    pub fn endpoint_slice(namespace: &str, name: &str) -> Self {
        Self::EndpointSlice {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }

    pub fn node(name: &str) -> Self {
        Self::Node {
            name: name.to_string(),
        }
    }

    pub fn kind(&self) -> ResourceKind {
        match self {
            Self::Service { .. } => ResourceKind::Service,
            Self::EndpointSlice { .. } => ResourceKind::EndpointSlice,
            Self::Node { .. } => ResourceKind::Node,
        }
    }
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Service { namespace, name } => write!(f, "service/{namespace}/{name}"),
            Self::EndpointSlice { namespace, name } => {
                write!(f, "endpointslice/{namespace}/{name}")
            }
            Self::Node { name } => write!(f, "node/{name}"),
        }
    }
}

impl FromStr for ResourceKey {
    type Err = InvalidKey;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidKey { key: s.to_string() };
        let mut parts = s.split('/');
        let kind = parts.next().ok_or_else(bad)?;
        let a = parts.next().filter(|p| !p.is_empty()).ok_or_else(bad)?;
        let b = parts.next();
        if parts.next().is_some() {
            return Err(bad());
        }
        match (kind, b) {
            ("service", Some(name)) if !name.is_empty() => Ok(Self::service(a, name)),
            ("endpointslice", Some(name)) if !name.is_empty() => Ok(Self::endpoint_slice(a, name)),
            ("node", None) => Ok(Self::node(a)),
            _ => Err(bad()),
        }
    }
}

/// Converts a wire enum value to the domain enum for the well-known mappings.
impl From<Protocol> for v1::Protocol {
    fn from(p: Protocol) -> Self {
        match p {
            Protocol::Tcp => v1::Protocol::Tcp,
            Protocol::Udp => v1::Protocol::Udp,
            Protocol::Sctp => v1::Protocol::Sctp,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        for k in [
            ResourceKey::service("default", "web"),
            ResourceKey::endpoint_slice("kube-system", "dns-abcde"),
            ResourceKey::node("node1"),
        ] {
            assert_eq!(k.to_string().parse::<ResourceKey>(), Ok(k));
        }
    }

    #[test]
    fn kinds_map_to_kubernetes_and_keys() {
        for k in ResourceKind::ALL {
            assert_eq!(ResourceKind::of_k8s(k.api_version(), k.k8s_kind()), Some(k));
            let key = k.key("ns", "x");
            assert_eq!(key.kind(), k);
            assert_eq!(ResourceKind::of_key_str(&key.to_string()), Some(k));
        }
        assert_eq!(ResourceKind::of_k8s("v1", "EndpointSlice"), None);
        assert_eq!(ResourceKind::of_k8s("v1", "Pod"), None);
        assert_eq!(
            ResourceKind::key(ResourceKind::Node, "ns", "n1").to_string(),
            "node/n1"
        );
    }

    #[test]
    fn bad_keys_are_rejected() {
        for bad in [
            "",
            "service",
            "service/ns",
            "service/ns/",
            "node/a/b",
            "pod/ns/x",
            "service//x",
            "service/a/b/c",
        ] {
            assert!(bad.parse::<ResourceKey>().is_err(), "{bad:?} parsed");
        }
    }
}
