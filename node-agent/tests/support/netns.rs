//! The node agent's real-packet lab, on the shared namespace harness
//! (`meshlite_runtime::testing::netns`): a "node" namespace routing between an off-cluster
//! "client" namespace and "pod" namespaces over veth pairs, each pod running a tiny
//! HTTP server that answers `<pod name> <peer address>`, so a test sees which
//! endpoint served it and whether it was masqueraded.
//!
//! Addresses (only inside these namespaces): pods `198.18.<i>.2/24` behind
//! `198.18.<i>.1` on the node (cluster CIDR `198.18.0.0/17`); the client
//! `198.18.200.2/24` behind the node's `198.18.200.1` (outside the cluster CIDR, so
//! "off-cluster"); services in `198.19.0.0/16`.

#![allow(dead_code, unused_imports)]

use std::net::IpAddr;

use anyhow::Result;
pub use meshlite_runtime::testing::netns::{
    Netns, NsRuntime, Outcome, get, require_root_and_tools, serve_identity, veth,
};

/// A pod: namespace, runtime and an HTTP server on port 80.
#[derive(Debug)]
pub struct Pod {
    pub name: String,
    pub ip: IpAddr,
    pub rt: NsRuntime,
    pub ns: Netns,
}

/// Node + client + pods.
#[derive(Debug)]
pub struct Lab {
    pub pods: Vec<Pod>,
    pub client_rt: NsRuntime,
    pub client: Netns,
    pub node_rt: NsRuntime,
    pub node: Netns,
}

pub const NODE_IP: &str = "198.18.200.1";
pub const CLIENT_IP: &str = "198.18.200.2";
pub const CLUSTER_CIDR: &str = "198.18.0.0/17";

impl Lab {
    /// A node with `pods` pods (named pod1..) and an off-cluster client.
    pub async fn new(pods: usize) -> Result<Self> {
        meshlite_runtime::testing::netns::set_prefix("mlna");
        if let Err(e) = require_root_and_tools(&[
            "ip",
            "iptables",
            "iptables-restore",
            "iptables-save",
            "ip6tables",
            "conntrack",
        ]) {
            panic!("{e:#}");
        }
        let node = Netns::new("node")?;
        node.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        // The client and the service range share the node's c0 link: no ICMP
        // redirects (they would use up the ICMP rate limit that REJECT's
        // port-unreachable needs), and no rate limit for the tests' bursts.
        for s in [
            "net.ipv4.conf.all.send_redirects=0",
            "net.ipv4.conf.default.send_redirects=0",
            "net.ipv4.icmp_ratelimit=0",
        ] {
            node.exec(&["sysctl", "-qw", s])?;
        }
        let client = Netns::new("client")?;
        veth(
            &node,
            "c0",
            &format!("{NODE_IP}/24"),
            &client,
            "eth0",
            &format!("{CLIENT_IP}/24"),
        )?;
        client.exec(&["ip", "route", "add", "default", "via", NODE_IP])?;
        // A real node routes the service range to its default gateway; without a
        // route, a service without rules would be "network unreachable" before the
        // FORWARD chain's REJECT could answer. The gateway here is the client
        // namespace: nothing leaves the namespaces the test made.
        node.exec(&["ip", "route", "add", "198.19.0.0/16", "via", CLIENT_IP])?;
        let mut list = Vec::new();
        for i in 1..=pods {
            let ns = Netns::new(&format!("pod{i}"))?;
            let gw = format!("198.18.{i}.1");
            let ip = format!("198.18.{i}.2");
            veth(
                &node,
                &format!("p{i}"),
                &format!("{gw}/24"),
                &ns,
                "eth0",
                &format!("{ip}/24"),
            )?;
            ns.exec(&["ip", "route", "add", "default", "via", &gw])?;
            let rt = ns.runtime()?;
            let name = format!("pod{i}");
            serve_identity(&rt, &name, 80).await?;
            list.push(Pod {
                name,
                ip: ip.parse()?,
                rt,
                ns,
            });
        }
        Ok(Self {
            pods: list,
            client_rt: client.runtime()?,
            client,
            node_rt: node.runtime()?,
            node,
        })
    }

    /// `iptables` in the node namespace.
    pub fn node_iptables(&self, args: &[&str]) -> Result<String> {
        let mut v = vec!["iptables", "-w"];
        v.extend_from_slice(args);
        self.node.exec(&v)
    }
}
