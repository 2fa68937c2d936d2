//! Snapshots for tests, the fuzz target and the benchmark: the seed cluster, a
//! cluster exercising every record rule, and a generated large cluster.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use meshlite_proto::model::{
    AddressFamily, Endpoint, EndpointPort, EndpointSlice, Protocol, Resource, Service, ServiceType,
};
use meshlite_runtime::Snapshot;

/// A ClusterIP service.
pub fn cluster_ip(ns: &str, name: &str, ips: &[&str]) -> Service {
    let mut s = Service::cluster_ip(ns, name, parse(ips[0]));
    s.cluster_ips = ips.iter().map(|ip| parse(ip)).collect();
    s
}

/// A headless service (`clusterIP: None`).
pub fn headless(ns: &str, name: &str) -> Service {
    let mut s = Service::cluster_ip(ns, name, parse("198.19.0.1"));
    s.cluster_ips.clear();
    s.headless = true;
    s
}

/// An ExternalName service.
pub fn external_name(ns: &str, name: &str, target: &str) -> Service {
    let mut s = Service::cluster_ip(ns, name, parse("198.19.0.1"));
    s.cluster_ips.clear();
    s.kind = ServiceType::ExternalName;
    s.external_name = Some(target.to_string());
    s
}

/// An EndpointSlice for a service with the given ports and endpoints.
pub fn slice(
    ns: &str,
    name: &str,
    service: &str,
    ports: &[(&str, Protocol, u16)],
    endpoints: Vec<Endpoint>,
) -> EndpointSlice {
    let family = match endpoints.first().and_then(|e| e.addresses.first()) {
        Some(IpAddr::V6(_)) => AddressFamily::Ipv6,
        _ => AddressFamily::Ipv4,
    };
    EndpointSlice {
        namespace: ns.to_string(),
        name: name.to_string(),
        service_name: service.to_string(),
        address_family: family,
        ports: ports
            .iter()
            .map(|(n, p, port)| EndpointPort {
                name: n.to_string(),
                protocol: *p,
                port: *port,
                app_protocol: None,
            })
            .collect(),
        endpoints,
        ignored_by_proxy: false,
    }
}

/// A ready endpoint.
pub fn ready(ip: &str) -> Endpoint {
    Endpoint::ready(parse(ip))
}

/// A not-ready endpoint.
pub fn not_ready(ip: &str) -> Endpoint {
    let mut e = Endpoint::ready(parse(ip));
    e.ready = false;
    e
}

/// A ready endpoint with a hostname and one or more addresses.
pub fn named(hostname: &str, ips: &[&str]) -> Endpoint {
    let mut e = Endpoint::ready(parse(ips[0]));
    e.addresses = ips.iter().map(|ip| parse(ip)).collect();
    e.hostname = Some(hostname.to_string());
    e
}

fn parse(ip: &str) -> IpAddr {
    ip.parse().expect("fixture addresses are valid")
}

/// The seed scenario (`examples/seed`): a ClusterIP and a headless service over the
/// three `webui` pods.
pub fn seed() -> Snapshot {
    let pods = || {
        vec![
            ready("198.18.1.1"),
            ready("198.18.2.1"),
            ready("198.18.2.2"),
        ]
    };
    let http = [("http", Protocol::Tcp, 80)];
    Snapshot::from_resources([
        Resource::Service(
            cluster_ip("default", "clusterip-service", &["198.19.100.100"]).with_port(
                "http",
                Protocol::Tcp,
                80,
            ),
        ),
        Resource::Service(headless("default", "headless-service").with_port(
            "http",
            Protocol::Tcp,
            80,
        )),
        Resource::EndpointSlice(slice(
            "default",
            "clusterip-service-webui",
            "clusterip-service",
            &http,
            pods(),
        )),
        Resource::EndpointSlice(slice(
            "default",
            "headless-service-webui",
            "headless-service",
            &http,
            pods(),
        )),
    ])
}

/// A cluster with one of everything the rules cover.
pub fn rules() -> Snapshot {
    let mut resources = Vec::new();
    let mut push_svc = |s: Service| resources.push(Resource::Service(s));
    // Dual-stack ClusterIP with a named and an unnamed port, no endpoints.
    push_svc(
        cluster_ip("default", "web", &["198.19.0.10", "2001:db8::10"])
            .with_port("http", Protocol::Tcp, 80)
            .with_port("dns", Protocol::Udp, 53),
    );
    push_svc(cluster_ip("default", "plain", &["198.19.0.11"]).with_port("", Protocol::Tcp, 8080));
    // Headless: two ready (one with hostname and two addresses), one not ready.
    push_svc(headless("default", "db").with_port("pg", Protocol::Tcp, 5432));
    // Headless publishing not-ready addresses.
    let mut pub_nr = headless("default", "peers");
    pub_nr.publish_not_ready_addresses = true;
    push_svc(pub_nr);
    // Headless with no ready endpoint.
    push_svc(headless("default", "empty"));
    // Headless, IPv6 endpoints.
    push_svc(headless("v6", "ring"));
    push_svc(external_name("default", "ext", "example.org"));
    push_svc(external_name(
        "default",
        "alias",
        "web.default.svc.cluster.local",
    ));
    push_svc(cluster_ip("other", "api", &["198.19.0.20"]).with_port("https", Protocol::Tcp, 443));
    resources.extend([
        Resource::EndpointSlice(slice(
            "default",
            "db-1",
            "db",
            &[("pg", Protocol::Tcp, 5432)],
            vec![
                named("db-0", &["198.18.1.10", "198.18.1.11"]),
                ready("198.18.1.12"),
                not_ready("198.18.1.13"),
            ],
        )),
        Resource::EndpointSlice(slice(
            "default",
            "db-v6",
            "db",
            &[("pg", Protocol::Tcp, 5432)],
            vec![named("db-0", &["2001:db8::1:10"])],
        )),
        Resource::EndpointSlice(slice(
            "default",
            "peers-1",
            "peers",
            &[("gossip", Protocol::Udp, 7946)],
            vec![not_ready("198.18.1.20")],
        )),
        Resource::EndpointSlice(slice(
            "default",
            "empty-1",
            "empty",
            &[],
            vec![not_ready("198.18.1.30")],
        )),
        Resource::EndpointSlice(slice(
            "v6",
            "ring-1",
            "ring",
            &[("raft", Protocol::Tcp, 7000)],
            vec![ready("2001:db8::2:1")],
        )),
        Resource::EndpointSlice(slice(
            "default",
            "web-1",
            "web",
            &[("http", Protocol::Tcp, 8080)],
            vec![ready("198.18.1.40")],
        )),
    ]);
    Snapshot::from_resources(resources)
}

/// A generated cluster: `services` services spread over 10 namespaces, the first
/// `headless` of them headless with `endpoints` ready endpoints each (port `http`),
/// the rest ClusterIP with port `http`. Service `i` is `svc-<i>` in `ns-<i % 10>`.
pub fn large(services: usize, headless_count: usize, endpoints: usize) -> Snapshot {
    Snapshot::from_resources(large_resources(services, headless_count, endpoints))
}

/// The resources of [`large`].
pub fn large_resources(services: usize, headless_count: usize, endpoints: usize) -> Vec<Resource> {
    let mut out = Vec::with_capacity(services * 2);
    for i in 0..services {
        let ns = format!("ns-{}", i % 10);
        let name = format!("svc-{i}");
        if i < headless_count {
            out.push(Resource::Service(headless(&ns, &name).with_port(
                "http",
                Protocol::Tcp,
                80,
            )));
            let eps = (0..endpoints)
                .map(|e| Endpoint::ready(IpAddr::V4(pod_ip(i * endpoints + e))))
                .collect();
            out.push(Resource::EndpointSlice(slice(
                &ns,
                &format!("{name}-abcde"),
                &name,
                &[("http", Protocol::Tcp, 8080)],
                eps,
            )));
        } else {
            out.push(Resource::Service(
                cluster_ip(&ns, &name, &[&service_ip(i).to_string()]).with_port(
                    "http",
                    Protocol::Tcp,
                    80,
                ),
            ));
        }
    }
    out
}

/// The cluster IP of service `i` in [`large`]: inside 198.19.0.0/16.
pub fn service_ip(i: usize) -> Ipv4Addr {
    let i = u32::try_from(i).unwrap_or(0) + 256;
    Ipv4Addr::from(0xC613_0000 | (i & 0xffff))
}

/// The address of pod `i` in [`large`]: inside 198.18.0.0/16.
pub fn pod_ip(i: usize) -> Ipv4Addr {
    let i = u32::try_from(i).unwrap_or(0) + 256;
    Ipv4Addr::from(0xC612_0000 | (i & 0xffff))
}

/// An IPv6 documentation address, for tests.
pub fn v6(s: &str) -> Ipv6Addr {
    s.parse().expect("fixture addresses are valid")
}
