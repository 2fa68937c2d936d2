//! Wire <-> domain conversions. Domain -> wire is infallible; wire -> domain validates
//! every address, port and enum and names the field it rejects.

use std::net::IpAddr;

use ipnet::IpNet;

use super::*;

/// A wire resource that is not a valid domain resource.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    #[error("{field}: invalid IP address {value:?}")]
    InvalidIp { field: &'static str, value: String },
    #[error("{field}: invalid CIDR {value:?}")]
    InvalidCidr { field: &'static str, value: String },
    #[error("{field}: port {value} out of range 1-65535")]
    InvalidPort { field: &'static str, value: u32 },
    #[error("{field}: unknown enum value {value}")]
    UnknownEnum { field: &'static str, value: i32 },
    #[error("{field}: must not be empty")]
    Empty { field: &'static str },
    #[error("resource has no kind")]
    MissingKind,
    #[error("key {key:?} does not match the resource ({expected})")]
    KeyMismatch { key: String, expected: String },
    #[error(transparent)]
    Key(#[from] InvalidKey),
    #[error("FQDN endpoint slices are not supported")]
    FqdnSlice,
    #[error("an EndpointSlice patch needs the slice it applies to")]
    Patch,
}

fn ip(field: &'static str, s: &str) -> Result<IpAddr, ConvertError> {
    s.parse().map_err(|_| ConvertError::InvalidIp {
        field,
        value: s.to_string(),
    })
}

fn ips(field: &'static str, v: &[String]) -> Result<Vec<IpAddr>, ConvertError> {
    v.iter().map(|s| ip(field, s)).collect()
}

fn cidrs(field: &'static str, v: &[String]) -> Result<Vec<IpNet>, ConvertError> {
    v.iter()
        .map(|s| {
            s.parse().map_err(|_| ConvertError::InvalidCidr {
                field,
                value: s.clone(),
            })
        })
        .collect()
}

fn port(field: &'static str, p: u32) -> Result<u16, ConvertError> {
    match u16::try_from(p) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(ConvertError::InvalidPort { field, value: p }),
    }
}

fn opt_port(field: &'static str, p: u32) -> Result<Option<u16>, ConvertError> {
    if p == 0 {
        Ok(None)
    } else {
        port(field, p).map(Some)
    }
}

fn non_empty(field: &'static str, s: &str) -> Result<String, ConvertError> {
    if s.is_empty() {
        Err(ConvertError::Empty { field })
    } else {
        Ok(s.to_string())
    }
}

fn opt_string(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

fn strings<T: ToString>(v: &[T]) -> Vec<String> {
    v.iter().map(ToString::to_string).collect()
}

fn protocol(field: &'static str, v: i32) -> Result<Protocol, ConvertError> {
    match v1::Protocol::try_from(v) {
        Ok(v1::Protocol::Tcp) => Ok(Protocol::Tcp),
        Ok(v1::Protocol::Udp) => Ok(Protocol::Udp),
        Ok(v1::Protocol::Sctp) => Ok(Protocol::Sctp),
        Err(_) => Err(ConvertError::UnknownEnum { field, value: v }),
    }
}

fn policy(field: &'static str, v: i32) -> Result<TrafficPolicy, ConvertError> {
    match v1::TrafficPolicy::try_from(v) {
        Ok(v1::TrafficPolicy::Cluster) => Ok(TrafficPolicy::Cluster),
        Ok(v1::TrafficPolicy::Local) => Ok(TrafficPolicy::Local),
        Err(_) => Err(ConvertError::UnknownEnum { field, value: v }),
    }
}

fn policy_to_wire(p: TrafficPolicy) -> i32 {
    match p {
        TrafficPolicy::Cluster => v1::TrafficPolicy::Cluster as i32,
        TrafficPolicy::Local => v1::TrafficPolicy::Local as i32,
    }
}

// === Service ===

impl TryFrom<&v1::Service> for Service {
    type Error = ConvertError;

    fn try_from(s: &v1::Service) -> Result<Self, Self::Error> {
        let kind = match v1::ServiceType::try_from(s.r#type) {
            Ok(v1::ServiceType::ClusterIp) => ServiceType::ClusterIp,
            Ok(v1::ServiceType::NodePort) => ServiceType::NodePort,
            Ok(v1::ServiceType::LoadBalancer) => ServiceType::LoadBalancer,
            Ok(v1::ServiceType::ExternalName) => ServiceType::ExternalName,
            Err(_) => {
                return Err(ConvertError::UnknownEnum {
                    field: "type",
                    value: s.r#type,
                });
            }
        };
        let ports = s
            .ports
            .iter()
            .map(|p| {
                Ok(ServicePort {
                    name: p.name.clone(),
                    protocol: protocol("ports.protocol", p.protocol)?,
                    port: port("ports.port", p.port)?,
                    node_port: opt_port("ports.nodePort", p.node_port)?,
                    target_port: if p.target_port_name.is_empty() {
                        TargetPort::Number(port("ports.targetPort", p.target_port)?)
                    } else {
                        TargetPort::Name(p.target_port_name.clone())
                    },
                    app_protocol: opt_string(&p.app_protocol),
                })
            })
            .collect::<Result<Vec<_>, ConvertError>>()?;
        Ok(Service {
            namespace: non_empty("namespace", &s.namespace)?,
            name: non_empty("name", &s.name)?,
            kind,
            cluster_ips: ips("clusterIPs", &s.cluster_ips)?,
            headless: s.headless,
            ports,
            external_ips: ips("externalIPs", &s.external_ips)?,
            load_balancer_ips: ips("loadBalancer.ingress.ip", &s.load_balancer_ips)?,
            load_balancer_source_ranges: cidrs(
                "loadBalancerSourceRanges",
                &s.load_balancer_source_ranges,
            )?,
            session_affinity_timeout: s
                .session_affinity_client_ip
                .then_some(s.session_affinity_timeout_seconds),
            external_traffic_policy: policy("externalTrafficPolicy", s.external_traffic_policy)?,
            internal_traffic_policy: policy("internalTrafficPolicy", s.internal_traffic_policy)?,
            health_check_node_port: opt_port("healthCheckNodePort", s.health_check_node_port)?,
            external_name: opt_string(&s.external_name),
            publish_not_ready_addresses: s.publish_not_ready_addresses,
            annotations: s.annotations.clone(),
            ignored_by_proxy: s.ignored_by_proxy,
        })
    }
}

impl From<&Service> for v1::Service {
    fn from(s: &Service) -> Self {
        v1::Service {
            namespace: s.namespace.clone(),
            name: s.name.clone(),
            r#type: match s.kind {
                ServiceType::ClusterIp => v1::ServiceType::ClusterIp,
                ServiceType::NodePort => v1::ServiceType::NodePort,
                ServiceType::LoadBalancer => v1::ServiceType::LoadBalancer,
                ServiceType::ExternalName => v1::ServiceType::ExternalName,
            } as i32,
            cluster_ips: strings(&s.cluster_ips),
            headless: s.headless,
            ports: s
                .ports
                .iter()
                .map(|p| v1::ServicePort {
                    name: p.name.clone(),
                    protocol: v1::Protocol::from(p.protocol) as i32,
                    port: u32::from(p.port),
                    node_port: p.node_port.map_or(0, u32::from),
                    target_port: match &p.target_port {
                        TargetPort::Number(n) => u32::from(*n),
                        TargetPort::Name(_) => 0,
                    },
                    target_port_name: match &p.target_port {
                        TargetPort::Number(_) => String::new(),
                        TargetPort::Name(n) => n.clone(),
                    },
                    app_protocol: p.app_protocol.clone().unwrap_or_default(),
                })
                .collect(),
            external_ips: strings(&s.external_ips),
            load_balancer_ips: strings(&s.load_balancer_ips),
            load_balancer_source_ranges: strings(&s.load_balancer_source_ranges),
            session_affinity_client_ip: s.session_affinity_timeout.is_some(),
            session_affinity_timeout_seconds: s.session_affinity_timeout.unwrap_or(0),
            external_traffic_policy: policy_to_wire(s.external_traffic_policy),
            internal_traffic_policy: policy_to_wire(s.internal_traffic_policy),
            health_check_node_port: s.health_check_node_port.map_or(0, u32::from),
            external_name: s.external_name.clone().unwrap_or_default(),
            publish_not_ready_addresses: s.publish_not_ready_addresses,
            annotations: s.annotations.clone(),
            ignored_by_proxy: s.ignored_by_proxy,
        }
    }
}

// === EndpointSlice ===

impl TryFrom<&v1::EndpointSlice> for EndpointSlice {
    type Error = ConvertError;

    fn try_from(s: &v1::EndpointSlice) -> Result<Self, Self::Error> {
        let address_family = match v1::AddressFamily::try_from(s.address_family) {
            Ok(v1::AddressFamily::Ipv4) => AddressFamily::Ipv4,
            Ok(v1::AddressFamily::Ipv6) => AddressFamily::Ipv6,
            Ok(v1::AddressFamily::Fqdn) => return Err(ConvertError::FqdnSlice),
            Err(_) => {
                return Err(ConvertError::UnknownEnum {
                    field: "addressType",
                    value: s.address_family,
                });
            }
        };
        let ports = s
            .ports
            .iter()
            .map(|p| {
                Ok(EndpointPort {
                    name: p.name.clone(),
                    protocol: protocol("ports.protocol", p.protocol)?,
                    port: port("ports.port", p.port)?,
                    app_protocol: opt_string(&p.app_protocol),
                })
            })
            .collect::<Result<Vec<_>, ConvertError>>()?;
        let endpoints = s
            .endpoints
            .iter()
            .map(Endpoint::try_from)
            .collect::<Result<Vec<_>, ConvertError>>()?;
        Ok(EndpointSlice {
            namespace: non_empty("namespace", &s.namespace)?,
            name: non_empty("name", &s.name)?,
            service_name: non_empty("kubernetes.io/service-name", &s.service_name)?,
            address_family,
            ports,
            endpoints,
            ignored_by_proxy: s.ignored_by_proxy,
        })
    }
}

impl TryFrom<&v1::Endpoint> for Endpoint {
    type Error = ConvertError;

    fn try_from(e: &v1::Endpoint) -> Result<Self, Self::Error> {
        Ok(Endpoint {
            addresses: ips("endpoints.addresses", &e.addresses)?,
            ready: e.ready,
            serving: e.serving,
            terminating: e.terminating,
            node_name: opt_string(&e.node_name),
            zone: opt_string(&e.zone),
            zone_hints: e.zone_hints.clone(),
            node_hints: e.node_hints.clone(),
            hostname: opt_string(&e.hostname),
            target_pod: opt_string(&e.target_pod),
        })
    }
}

impl From<&Endpoint> for v1::Endpoint {
    fn from(e: &Endpoint) -> Self {
        v1::Endpoint {
            addresses: strings(&e.addresses),
            ready: e.ready,
            serving: e.serving,
            terminating: e.terminating,
            node_name: e.node_name.clone().unwrap_or_default(),
            zone: e.zone.clone().unwrap_or_default(),
            zone_hints: e.zone_hints.clone(),
            node_hints: e.node_hints.clone(),
            hostname: e.hostname.clone().unwrap_or_default(),
            target_pod: e.target_pod.clone().unwrap_or_default(),
        }
    }
}

impl From<&EndpointSlice> for v1::EndpointSlice {
    fn from(s: &EndpointSlice) -> Self {
        v1::EndpointSlice {
            namespace: s.namespace.clone(),
            name: s.name.clone(),
            service_name: s.service_name.clone(),
            address_family: match s.address_family {
                AddressFamily::Ipv4 => v1::AddressFamily::Ipv4,
                AddressFamily::Ipv6 => v1::AddressFamily::Ipv6,
            } as i32,
            ports: s
                .ports
                .iter()
                .map(|p| v1::EndpointPort {
                    name: p.name.clone(),
                    protocol: v1::Protocol::from(p.protocol) as i32,
                    port: u32::from(p.port),
                    app_protocol: p.app_protocol.clone().unwrap_or_default(),
                })
                .collect(),
            endpoints: s.endpoints.iter().map(v1::Endpoint::from).collect(),
            ignored_by_proxy: s.ignored_by_proxy,
        }
    }
}

// === Node ===

impl TryFrom<&v1::Node> for Node {
    type Error = ConvertError;

    fn try_from(n: &v1::Node) -> Result<Self, Self::Error> {
        Ok(Node {
            name: non_empty("name", &n.name)?,
            zone: opt_string(&n.zone),
            addresses: ips("addresses", &n.addresses)?,
            pod_cidrs: cidrs("podCIDRs", &n.pod_cidrs)?,
        })
    }
}

impl From<&Node> for v1::Node {
    fn from(n: &Node) -> Self {
        v1::Node {
            name: n.name.clone(),
            zone: n.zone.clone().unwrap_or_default(),
            addresses: strings(&n.addresses),
            pod_cidrs: strings(&n.pod_cidrs),
        }
    }
}

// === Resource ===

impl TryFrom<&v1::Resource> for Resource {
    type Error = ConvertError;

    /// Converts and checks that the key names the resource it carries.
    fn try_from(r: &v1::Resource) -> Result<Self, Self::Error> {
        let key: ResourceKey = r.key.parse()?;
        let res = match &r.kind {
            Some(v1::resource::Kind::Service(s)) => Resource::Service(s.try_into()?),
            Some(v1::resource::Kind::EndpointSlice(s)) => Resource::EndpointSlice(s.try_into()?),
            Some(v1::resource::Kind::Node(n)) => Resource::Node(n.try_into()?),
            Some(v1::resource::Kind::EndpointSlicePatch(_)) => return Err(ConvertError::Patch),
            None => return Err(ConvertError::MissingKind),
        };
        let expected = res.key();
        if expected != key {
            return Err(ConvertError::KeyMismatch {
                key: r.key.clone(),
                expected: expected.to_string(),
            });
        }
        Ok(res)
    }
}

impl From<&Resource> for v1::resource::Kind {
    fn from(r: &Resource) -> Self {
        match r {
            Resource::Service(s) => v1::resource::Kind::Service(s.into()),
            Resource::EndpointSlice(s) => v1::resource::Kind::EndpointSlice(s.into()),
            Resource::Node(n) => v1::resource::Kind::Node(n.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;

    fn full_service() -> Service {
        Service {
            namespace: "default".into(),
            name: "web".into(),
            kind: ServiceType::LoadBalancer,
            cluster_ips: vec![
                "198.19.0.1".parse().unwrap(),
                "2001:db8::1".parse().unwrap(),
            ],
            headless: false,
            ports: vec![
                ServicePort {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: 80,
                    node_port: Some(30080),
                    target_port: TargetPort::Name("web".into()),
                    app_protocol: Some("http".into()),
                },
                ServicePort {
                    name: "dns".into(),
                    protocol: Protocol::Udp,
                    port: 53,
                    node_port: None,
                    target_port: TargetPort::Number(5353),
                    app_protocol: None,
                },
            ],
            external_ips: vec!["198.19.1.1".parse().unwrap()],
            load_balancer_ips: vec!["198.19.2.1".parse().unwrap()],
            load_balancer_source_ranges: vec!["198.18.0.0/16".parse().unwrap()],
            session_affinity_timeout: Some(600),
            external_traffic_policy: TrafficPolicy::Local,
            internal_traffic_policy: TrafficPolicy::Local,
            health_check_node_port: Some(31000),
            external_name: None,
            publish_not_ready_addresses: true,
            annotations: [("meshlite.io/ipvs-scheduler".to_string(), "sh".to_string())].into(),
            ignored_by_proxy: true,
        }
    }

    #[test]
    fn service_round_trips_every_field() {
        let s = full_service();
        let wire = v1::Service::from(&s);
        assert_eq!(Service::try_from(&wire).unwrap(), s);
    }

    #[test]
    fn endpoint_slice_round_trips_every_field() {
        let s = EndpointSlice {
            namespace: "default".into(),
            name: "web-abc".into(),
            service_name: "web".into(),
            address_family: AddressFamily::Ipv6,
            ports: vec![EndpointPort {
                name: "http".into(),
                protocol: Protocol::Sctp,
                port: 8080,
                app_protocol: Some("h2c".into()),
            }],
            endpoints: vec![Endpoint {
                addresses: vec![IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7))],
                ready: false,
                serving: true,
                terminating: true,
                node_name: Some("node1".into()),
                zone: Some("z1".into()),
                zone_hints: vec!["z1".into()],
                node_hints: vec!["node1".into()],
                hostname: Some("web-0".into()),
                target_pod: Some("web-0".into()),
            }],
            ignored_by_proxy: true,
        };
        let wire = v1::EndpointSlice::from(&s);
        assert_eq!(EndpointSlice::try_from(&wire).unwrap(), s);
    }

    #[test]
    fn invalid_wire_values_name_the_field() {
        let mut wire = v1::Service::from(&full_service());
        wire.cluster_ips[0] = "300.1.1.1".into();
        assert_eq!(
            Service::try_from(&wire).unwrap_err().to_string(),
            "clusterIPs: invalid IP address \"300.1.1.1\""
        );
        let mut wire = v1::Service::from(&full_service());
        wire.ports[0].port = 70000;
        assert!(matches!(
            Service::try_from(&wire),
            Err(ConvertError::InvalidPort {
                field: "ports.port",
                value: 70000
            })
        ));
        let mut wire = v1::Service::from(&full_service());
        wire.ports[0].protocol = 9;
        assert!(matches!(
            Service::try_from(&wire),
            Err(ConvertError::UnknownEnum { .. })
        ));
    }

    #[test]
    fn resource_key_must_match_its_content() {
        let s = full_service();
        let r = v1::Resource {
            key: "service/default/other".into(),
            hash: 0,
            kind: Some((&Resource::Service(s)).into()),
        };
        assert!(matches!(
            Resource::try_from(&r),
            Err(ConvertError::KeyMismatch { .. })
        ));
    }
}
