//! Fixtures shared by the kernel tests of every backend (`kernel.rs`,
//! `kernel_nft.rs`): services, slices and requests on the namespace lab.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use meshlite_proto::model::{
    AddressFamily, Endpoint, EndpointPort, EndpointSlice, Node, Protocol, Resource, Service,
    ServiceType,
};

use super::netns::{Lab, NODE_IP, Outcome, get};

/// The node the agent under test runs as.
pub const NODE: &str = "node1";
/// Per-request timeout.
pub const T: Duration = Duration::from_secs(2);

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

pub fn service(name: &str, cluster_ip: &str) -> Service {
    Service::cluster_ip("default", name, ip(cluster_ip)).with_port("http", Protocol::Tcp, 80)
}

pub fn node_port(name: &str, cluster_ip: &str, port: u16) -> Service {
    let mut s = service(name, cluster_ip);
    s.kind = ServiceType::NodePort;
    s.ports[0].node_port = Some(port);
    s
}

/// A slice of `lab` pods (by index, 0-based) with the given node names.
pub fn slice(svc: &str, eps: Vec<Endpoint>) -> Resource {
    Resource::EndpointSlice(EndpointSlice {
        namespace: "default".into(),
        name: format!("{svc}-abc"),
        service_name: svc.into(),
        address_family: AddressFamily::Ipv4,
        ports: vec![EndpointPort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 80,
            app_protocol: None,
        }],
        endpoints: eps,
        ignored_by_proxy: false,
    })
}

pub fn ep(lab: &Lab, i: usize, node: &str) -> Endpoint {
    Endpoint::ready(lab.pods[i].ip).on_node(node)
}

pub fn node_object() -> Resource {
    Resource::Node(Node {
        name: NODE.into(),
        zone: Some("zone-a".into()),
        addresses: vec![ip(NODE_IP)],
        pod_cidrs: vec![],
    })
}

pub fn addr(ip_s: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip(ip_s), port)
}

/// `n` requests from the client namespace; pod name -> count, plus failures.
pub async fn spread(
    lab: &Lab,
    to: SocketAddr,
    n: usize,
) -> (BTreeMap<String, usize>, Vec<Outcome>) {
    lab.client_rt
        .run(async move {
            let mut seen = BTreeMap::new();
            let mut failed = Vec::new();
            for _ in 0..n {
                let o = get(to, "/", T).await;
                match o.served() {
                    Some((pod, _)) => *seen.entry(pod).or_insert(0) += 1,
                    None => failed.push(o),
                }
            }
            (seen, failed)
        })
        .await
}

pub async fn from_client(lab: &Lab, to: SocketAddr, timeout: Duration) -> Outcome {
    lab.client_rt.run(get(to, "/", timeout)).await
}

pub async fn from_pod(lab: &Lab, i: usize, to: SocketAddr) -> Outcome {
    lab.pods[i].rt.run(get(to, "/", T)).await
}
