//! Kubernetes API objects -> the small domain resources agents need.
//!
//! Normalization is where bad input stops: an unusable object is an [`Invalid`]
//! error naming the object and the reason; a usable object with bad parts (one
//! invalid external IP, a port 0, a duplicate port, an out-of-family address) is
//! kept without those parts, each dropped part reported as a warning. Both are
//! logged and counted by the caller; neither stops the rest of the cluster from
//! being served.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::time::SystemTime;

use ipnet::IpNet;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use meshlite_proto::model::{
    AddressFamily, Endpoint, EndpointPort, EndpointSlice, Node, Protocol, Service, ServicePort,
    ServiceType, TargetPort, TrafficPolicy,
};

/// An object that cannot be used at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {name}: {reason}")]
pub struct Invalid {
    pub kind: &'static str,
    /// `<namespace>/<name>` or `<name>`.
    pub name: String,
    pub reason: String,
}

/// A normalized object and the parts of it that were dropped.
#[derive(Debug, Clone, PartialEq)]
pub struct Normalized<T> {
    pub value: T,
    /// Human-readable reasons, e.g. `spec.externalIPs[1]: invalid IP "300.1.1.1"`.
    pub warnings: Vec<String>,
}

// === impl Normalized ===

impl<T> Normalized<T> {
    /// The same warnings with the value converted (e.g. into a [`Resource`]).
    ///
    /// [`Resource`]: meshlite_proto::model::Resource
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Normalized<U> {
        Normalized {
            value: f(self.value),
            warnings: self.warnings,
        }
    }
}

/// Most endpoints one slice may carry (the API server's own limit).
pub const MAX_ENDPOINTS_PER_SLICE: usize = 1000;

/// Annotation prefix whose keys are carried to agents.
pub const ANNOTATION_PREFIX: &str = "meshlite.io/";

/// The EndpointSlice annotation kube-proxy reads for network programming latency.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Which proxy implements a Service (its EndpointSlices carry it too).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Set on the EndpointSlices of headless Services.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// What the control plane's configuration decides about objects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    /// `--service-proxy-name`: `None` (kube-proxy's behaviour) proxies only objects
    /// without a `service.kubernetes.io/service-proxy-name` label; `Some(name)`
    /// proxies only objects whose label is exactly `name`, so meshlite can run
    /// beside another proxy that keeps the rest.
    pub service_proxy_name: Option<String>,
}

// === impl Options ===

impl Options {
    /// Whether node agents leave an object with these labels alone, as kube-proxy's
    /// informers never see it: labelled for another proxy (or for none when we
    /// claim a name), or labelled headless. DNS serves it all the same.
    pub fn ignored_by_proxy(&self, labels: Option<&BTreeMap<String, String>>) -> bool {
        let label = |k: &str| labels.and_then(|l| l.get(k));
        label(HEADLESS_LABEL).is_some()
            || label(SERVICE_PROXY_NAME_LABEL).map(String::as_str)
                != self.service_proxy_name.as_deref()
    }
}

/// Accumulates warnings for one object.
struct Ctx {
    kind: &'static str,
    name: String,
    warnings: Vec<String>,
}

impl Ctx {
    fn new(kind: &'static str, namespace: Option<&str>, name: &str) -> Self {
        let name = match namespace {
            Some(ns) => format!("{ns}/{name}"),
            None => name.to_string(),
        };
        Self {
            kind,
            name,
            warnings: Vec::new(),
        }
    }

    fn warn(&mut self, msg: String) {
        self.warnings.push(msg);
    }

    fn invalid(&self, reason: impl Into<String>) -> Invalid {
        Invalid {
            kind: self.kind,
            name: self.name.clone(),
            reason: reason.into(),
        }
    }

    fn done<T>(self, value: T) -> Normalized<T> {
        Normalized {
            value,
            warnings: self.warnings,
        }
    }
}

/// RFC 1123 label: what Kubernetes requires of namespaces and Service names (Service
/// names additionally start with a letter, RFC 1035; DNS names are built from them).
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 subdomain: EndpointSlice and Node names.
fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// Checks the object's identity; every name ends up in keys and DNS names.
fn check_names(cx: &Ctx, namespace: Option<&str>, name: &str, label: bool) -> Result<(), Invalid> {
    if let Some(ns) = namespace
        && !is_dns_label(ns)
    {
        return Err(cx.invalid(format!(
            "metadata.namespace {ns:?} is not a valid DNS label"
        )));
    }
    let ok = if label {
        is_dns_label(name)
    } else {
        is_dns_subdomain(name)
    };
    if !ok {
        return Err(cx.invalid(format!(
            "metadata.name {name:?} is not a valid DNS {}",
            if label { "label" } else { "subdomain" }
        )));
    }
    Ok(())
}

fn parse_ip(s: &str) -> Option<IpAddr> {
    s.trim().parse().ok()
}

fn protocol(p: Option<&str>) -> Result<Protocol, String> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Ok(Protocol::Sctp),
        other => Err(format!("unknown protocol {other:?}")),
    }
}

fn port_number(p: i32) -> Option<u16> {
    u16::try_from(p).ok().filter(|p| *p != 0)
}

fn meta_name(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> &str {
    meta.name.as_deref().unwrap_or("")
}

/// The namespace of an object; manifests without one are in `default`, as kubectl
/// would create them.
pub fn namespace_or_default(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> &str {
    meta.namespace
        .as_deref()
        .filter(|n| !n.is_empty())
        .unwrap_or("default")
}

/// Normalizes a v1 Service.
///
/// Load-balancer ingress IPs with `ipMode: Proxy` are left out: the load balancer
/// proxies that traffic itself and sends it to node ports, so, as kube-proxy does,
/// nothing on a node captures it (KEP-1860).
///
/// # Errors
/// The object is unusable: no name, unknown type, an invalid primary cluster IP.
pub fn service(svc: &core::Service, opts: &Options) -> Result<Normalized<Service>, Invalid> {
    let name = meta_name(&svc.metadata);
    let namespace = namespace_or_default(&svc.metadata);
    let mut cx = Ctx::new("Service", Some(namespace), name);
    if name.is_empty() {
        return Err(cx.invalid("metadata.name is empty"));
    }
    check_names(&cx, Some(namespace), name, true)?;
    let default_spec = core::ServiceSpec::default();
    let spec = svc.spec.as_ref().unwrap_or(&default_spec);

    let kind = match spec.type_.as_deref().unwrap_or("ClusterIP") {
        "ClusterIP" => ServiceType::ClusterIp,
        "NodePort" => ServiceType::NodePort,
        "LoadBalancer" => ServiceType::LoadBalancer,
        "ExternalName" => ServiceType::ExternalName,
        other => return Err(cx.invalid(format!("spec.type: unknown type {other:?}"))),
    };

    // clusterIPs is authoritative when set; clusterIP is its first element.
    let raw_ips: Vec<String> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.clone(),
        (_, Some(ip)) if !ip.is_empty() => vec![ip.clone()],
        _ => Vec::new(),
    };
    let headless = raw_ips.first().is_some_and(|ip| ip == "None");
    let mut cluster_ips: Vec<IpAddr> = Vec::new();
    if kind != ServiceType::ExternalName && !headless {
        for (i, raw) in raw_ips.iter().enumerate() {
            match parse_ip(raw) {
                Some(ip) if cluster_ips.iter().any(|c| c.is_ipv4() == ip.is_ipv4()) => cx.warn(
                    format!("spec.clusterIPs[{i}]: second {raw:?} of the same family ignored"),
                ),
                Some(ip) => cluster_ips.push(ip),
                None if i == 0 => {
                    return Err(cx.invalid(format!("spec.clusterIP: invalid IP {raw:?}")));
                }
                None => cx.warn(format!("spec.clusterIPs[{i}]: invalid IP {raw:?}")),
            }
        }
        if cluster_ips.is_empty() {
            cx.warn("no cluster IP allocated: not reachable by ClusterIP".to_string());
        }
    }

    let mut ports = Vec::new();
    let mut seen = HashSet::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let protocol = match protocol(p.protocol.as_deref()) {
            Ok(pr) => pr,
            Err(e) => {
                cx.warn(format!("spec.ports[{i}]: {e}; port skipped"));
                continue;
            }
        };
        let Some(port) = port_number(p.port) else {
            cx.warn(format!(
                "spec.ports[{i}]: port {} out of range 1-65535; port skipped",
                p.port
            ));
            continue;
        };
        if !seen.insert((port, protocol)) {
            cx.warn(format!(
                "spec.ports[{i}]: duplicate {port}/{protocol}; port skipped"
            ));
            continue;
        }
        let node_port = match p.node_port {
            None | Some(0) => None,
            Some(n) => match port_number(n) {
                Some(n) => Some(n),
                None => {
                    cx.warn(format!(
                        "spec.ports[{i}].nodePort: {n} out of range; node port ignored"
                    ));
                    None
                }
            },
        };
        let target_port = match &p.target_port {
            None => TargetPort::Number(port),
            Some(IntOrString::Int(n)) => match port_number(*n) {
                Some(n) => TargetPort::Number(n),
                None if *n == 0 => TargetPort::Number(port),
                None => {
                    cx.warn(format!(
                        "spec.ports[{i}].targetPort: {n} out of range; port skipped"
                    ));
                    continue;
                }
            },
            Some(IntOrString::String(s)) => match s.parse::<i32>() {
                Ok(n) => match port_number(n) {
                    Some(n) => TargetPort::Number(n),
                    None => {
                        cx.warn(format!(
                            "spec.ports[{i}].targetPort: {n} out of range; port skipped"
                        ));
                        continue;
                    }
                },
                Err(_) if s.is_empty() => TargetPort::Number(port),
                Err(_) => TargetPort::Name(s.clone()),
            },
        };
        ports.push(ServicePort {
            name: p.name.clone().unwrap_or_default(),
            protocol,
            port,
            node_port,
            target_port,
            app_protocol: p.app_protocol.clone(),
        });
    }

    let ip_list = |field: &str, raw: &[String], cx: &mut Ctx| -> Vec<IpAddr> {
        let mut out = Vec::new();
        for (i, s) in raw.iter().enumerate() {
            match parse_ip(s) {
                Some(ip) if !out.contains(&ip) => out.push(ip),
                Some(_) => {}
                None => cx.warn(format!("{field}[{i}]: invalid IP {s:?}; ignored")),
            }
        }
        out
    };
    let external_ips = ip_list(
        "spec.externalIPs",
        spec.external_ips.as_deref().unwrap_or(&[]),
        &mut cx,
    );
    let lb_raw: Vec<String> = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .map(|ing| {
            ing.iter()
                .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
                .filter_map(|i| i.ip.clone())
                .collect()
        })
        .unwrap_or_default();
    let load_balancer_ips = if kind == ServiceType::LoadBalancer {
        ip_list("status.loadBalancer.ingress", &lb_raw, &mut cx)
    } else {
        Vec::new()
    };
    let mut load_balancer_source_ranges = Vec::new();
    for (i, s) in spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
    {
        match s.trim().parse::<IpNet>() {
            Ok(n) => load_balancer_source_ranges.push(n.trunc()),
            Err(_) => cx.warn(format!(
                "spec.loadBalancerSourceRanges[{i}]: invalid CIDR {s:?}; ignored"
            )),
        }
    }

    let session_affinity_timeout = match spec.session_affinity.as_deref() {
        Some("ClientIP") => {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(10_800);
            match u32::try_from(t) {
                Ok(t) if (1..=86_400).contains(&t) => Some(t),
                _ => {
                    cx.warn(format!(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds: {t} outside 1-86400; using 10800"
                    ));
                    Some(10_800)
                }
            }
        }
        _ => None,
    };
    let policy = |p: Option<&str>| match p {
        Some("Local") => TrafficPolicy::Local,
        _ => TrafficPolicy::Cluster,
    };
    let health_check_node_port = spec
        .health_check_node_port
        .and_then(|p| if p == 0 { None } else { port_number(p) });
    let external_name = if kind == ServiceType::ExternalName {
        match spec.external_name.as_deref().map(str::trim) {
            Some(n) if is_dns_subdomain(&n.trim_end_matches('.').to_ascii_lowercase()) => {
                Some(n.trim_end_matches('.').to_ascii_lowercase())
            }
            Some(n) if !n.is_empty() => {
                return Err(cx.invalid(format!("spec.externalName {n:?} is not a valid DNS name")));
            }
            _ => return Err(cx.invalid("spec.externalName is empty for type ExternalName")),
        }
    } else {
        None
    };
    let annotations: BTreeMap<String, String> = svc
        .metadata
        .annotations
        .iter()
        .flatten()
        .filter(|(k, _)| k.starts_with(ANNOTATION_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();

    let value = Service {
        namespace: namespace.to_string(),
        name: name.to_string(),
        kind,
        cluster_ips,
        headless,
        ports,
        external_ips,
        load_balancer_ips,
        load_balancer_source_ranges,
        session_affinity_timeout,
        external_traffic_policy: policy(spec.external_traffic_policy.as_deref()),
        internal_traffic_policy: policy(spec.internal_traffic_policy.as_deref()),
        health_check_node_port,
        external_name,
        publish_not_ready_addresses: spec.publish_not_ready_addresses.unwrap_or(false),
        annotations,
        ignored_by_proxy: opts.ignored_by_proxy(svc.metadata.labels.as_ref()),
    };
    Ok(cx.done(value))
}

/// Normalizes a discovery.k8s.io/v1 EndpointSlice.
///
/// # Errors
/// No name, no `kubernetes.io/service-name` label, or an FQDN/unknown address type.
pub fn endpoint_slice(
    s: &discovery::EndpointSlice,
    opts: &Options,
) -> Result<Normalized<EndpointSlice>, Invalid> {
    let name = meta_name(&s.metadata);
    let namespace = namespace_or_default(&s.metadata);
    let mut cx = Ctx::new("EndpointSlice", Some(namespace), name);
    if name.is_empty() {
        return Err(cx.invalid("metadata.name is empty"));
    }
    check_names(&cx, Some(namespace), name, false)?;
    let service_name = s
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .filter(|n| !n.is_empty())
        .ok_or_else(|| cx.invalid(format!("no {SERVICE_NAME_LABEL} label")))?
        .clone();
    if !is_dns_label(&service_name) {
        return Err(cx.invalid(format!(
            "{SERVICE_NAME_LABEL} {service_name:?} is not a valid Service name"
        )));
    }
    let address_family = match s.address_type.as_str() {
        "IPv4" => AddressFamily::Ipv4,
        "IPv6" => AddressFamily::Ipv6,
        "FQDN" => return Err(cx.invalid("addressType FQDN is not used by proxies or DNS")),
        other => return Err(cx.invalid(format!("addressType: unknown {other:?}"))),
    };

    let mut ports = Vec::new();
    let mut seen = HashSet::new();
    for (i, p) in s.ports.iter().flatten().enumerate() {
        let protocol = match protocol(p.protocol.as_deref()) {
            Ok(pr) => pr,
            Err(e) => {
                cx.warn(format!("ports[{i}]: {e}; port skipped"));
                continue;
            }
        };
        let Some(port) = p.port.and_then(port_number) else {
            cx.warn(format!(
                "ports[{i}]: missing or out-of-range port; port skipped"
            ));
            continue;
        };
        let pname = p.name.clone().unwrap_or_default();
        if !seen.insert((pname.clone(), protocol)) {
            cx.warn(format!(
                "ports[{i}]: duplicate name {pname:?}/{protocol}; port skipped"
            ));
            continue;
        }
        ports.push(EndpointPort {
            name: pname,
            protocol,
            port,
            app_protocol: p.app_protocol.clone(),
        });
    }

    let mut endpoints = Vec::new();
    let raw_endpoints = s.endpoints.as_deref().unwrap_or(&[]);
    for (i, e) in raw_endpoints.iter().enumerate() {
        if endpoints.len() == MAX_ENDPOINTS_PER_SLICE {
            cx.warn(format!(
                "{} endpoints exceed the limit of {MAX_ENDPOINTS_PER_SLICE} per slice; the rest are ignored",
                raw_endpoints.len()
            ));
            break;
        }
        let mut addresses = Vec::new();
        for a in &e.addresses {
            match parse_ip(a) {
                Some(ip) if ip.is_ipv4() == (address_family == AddressFamily::Ipv4) => {
                    addresses.push(ip)
                }
                Some(_) => cx.warn(format!(
                    "endpoints[{i}]: address {a:?} is not {:?}; ignored",
                    address_family
                )),
                None => cx.warn(format!("endpoints[{i}]: invalid IP {a:?}; ignored")),
            }
        }
        if addresses.is_empty() {
            cx.warn(format!(
                "endpoints[{i}]: no valid address; endpoint skipped"
            ));
            continue;
        }
        let cond = e.conditions.as_ref();
        // API semantics: unknown readiness/serving means ready; unknown terminating means not.
        let ready = cond.and_then(|c| c.ready).unwrap_or(true);
        let serving = cond.and_then(|c| c.serving).unwrap_or(ready);
        let terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
        let hints = e.hints.as_ref();
        endpoints.push(Endpoint {
            addresses,
            ready,
            serving,
            terminating,
            node_name: e.node_name.clone().filter(|n| !n.is_empty()),
            zone: e.zone.clone().filter(|z| !z.is_empty()),
            zone_hints: hints
                .and_then(|h| h.for_zones.as_ref())
                .map(|z| z.iter().map(|z| z.name.clone()).collect())
                .unwrap_or_default(),
            node_hints: hints
                .and_then(|h| h.for_nodes.as_ref())
                .map(|n| n.iter().map(|n| n.name.clone()).collect())
                .unwrap_or_default(),
            hostname: match e.hostname.as_deref() {
                None | Some("") => None,
                Some(h) if is_dns_label(h) => Some(h.to_string()),
                Some(h) => {
                    cx.warn(format!(
                        "endpoints[{i}].hostname {h:?} is not a valid DNS label; ignored"
                    ));
                    None
                }
            },
            target_pod: e
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| r.name.clone()),
        });
    }
    Ok(cx.done(EndpointSlice {
        namespace: namespace.to_string(),
        name: name.to_string(),
        service_name,
        address_family,
        ports,
        endpoints,
        ignored_by_proxy: opts.ignored_by_proxy(s.metadata.labels.as_ref()),
    }))
}

/// Normalizes a v1 Node: name, zone label, addresses, pod CIDRs.
///
/// # Errors
/// No name.
pub fn node(n: &core::Node) -> Result<Normalized<Node>, Invalid> {
    let name = meta_name(&n.metadata);
    let mut cx = Ctx::new("Node", None, name);
    if name.is_empty() {
        return Err(cx.invalid("metadata.name is empty"));
    }
    check_names(&cx, None, name, false)?;
    let zone = n
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(ZONE_LABEL))
        .filter(|z| !z.is_empty())
        .cloned();
    let mut addresses = Vec::new();
    for (i, a) in n
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .enumerate()
    {
        if a.type_ != "InternalIP" && a.type_ != "ExternalIP" {
            continue;
        }
        match parse_ip(&a.address) {
            Some(ip) if !addresses.contains(&ip) => addresses.push(ip),
            Some(_) => {}
            None => cx.warn(format!(
                "status.addresses[{i}]: invalid IP {:?}; ignored",
                a.address
            )),
        }
    }
    let spec = n.spec.as_ref();
    let raw_cidrs: Vec<String> = match spec.and_then(|s| s.pod_cidrs.clone()) {
        Some(c) if !c.is_empty() => c,
        _ => spec.and_then(|s| s.pod_cidr.clone()).into_iter().collect(),
    };
    let mut pod_cidrs = Vec::new();
    for (i, c) in raw_cidrs.iter().enumerate() {
        match c.parse::<IpNet>() {
            Ok(net) => pod_cidrs.push(net),
            Err(_) => cx.warn(format!("spec.podCIDRs[{i}]: invalid CIDR {c:?}; ignored")),
        }
    }
    Ok(cx.done(Node {
        name: name.to_string(),
        zone,
        addresses,
        pod_cidrs,
    }))
}

/// The trigger time of an EndpointSlice change: its
/// `endpoints.kubernetes.io/last-change-trigger-time` annotation when present and
/// valid (RFC 3339), else `None` (the caller uses first observation).
pub fn trigger_time(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Option<SystemTime> {
    let raw = meta.annotations.as_ref()?.get(TRIGGER_TIME_ANNOTATION)?;
    let ts: jiff::Timestamp = raw.parse().ok()?;
    Some(SystemTime::from(ts))
}

#[cfg(test)]
mod tests;
