//! A small cluster in network namespaces, for the demo and the end-to-end suite.
//!
//! ```text
//!                         fabric (router, no way out)
//!              198.18.0.1/32 |                  | 198.18.0.2/32
//!                        node1                 node2        <- node agents (mode per node)
//!   198.18.1.0/24  pods: webui-a, testpod    webui-b, webui-c, dns   198.18.2.0/24
//! ```
//!
//! Each node is a namespace with IP forwarding, linked to a `fabric` namespace that
//! routes every node's pod CIDR to it (like a cluster's underlay). Each pod is a
//! namespace with a /32 address, a veth to its node, and a default route to the
//! node's gateway address (`198.18.<n>.254`). Services live in 198.19.0.0/16 and
//! exist only as rules in the nodes. Nothing is routed to the outside: the fabric
//! has no default route and no link to the host.
//!
//! The control plane runs "on node1" (in its namespace, on 198.18.0.1) as a
//! host-network pod would; agents run in their node's (or pod's) namespace.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::netns::{Netns, NsRuntime, serve_identity};

/// The underlay router's address on every node link.
pub const FABRIC_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);

/// A node: its namespace and where it sits on the fabric.
#[derive(Debug)]
pub struct Node {
    pub name: String,
    /// `198.18.0.<index>`.
    pub ip: Ipv4Addr,
    pub index: u8,
    pub ns: Netns,
    pub rt: NsRuntime,
}

/// A pod: its namespace, address and node.
#[derive(Debug)]
pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    pub node: String,
    pub ns: Netns,
    pub rt: NsRuntime,
    /// The node-side veth name.
    pub veth: String,
}

/// See the module docs.
#[derive(Debug)]
pub struct Cluster {
    pub fabric: Netns,
    pub nodes: BTreeMap<String, Node>,
    pub pods: BTreeMap<String, Pod>,
    next_veth: usize,
    /// `/etc/netns/<ns>` directories written for pods' resolv.conf.
    etc_dirs: Vec<PathBuf>,
}

impl Cluster {
    /// Nodes named in order get 198.18.0.1, .2, ... and pod CIDRs 198.18.1.0/24, ...
    pub fn new(nodes: &[&str]) -> Result<Self> {
        crate::netns::require_root_and_tools(&["ip", "iptables", "iptables-restore", "conntrack"])?;
        let fabric = Netns::new("fabric")?;
        fabric.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        let mut cluster = Self {
            fabric,
            nodes: BTreeMap::new(),
            pods: BTreeMap::new(),
            next_veth: 0,
            etc_dirs: Vec::new(),
        };
        for (i, name) in nodes.iter().enumerate() {
            let index = u8::try_from(i + 1).context("too many nodes")?;
            cluster.add_node(name, index)?;
        }
        Ok(cluster)
    }

    /// Connects `ns` to the fabric by a veth (`fab_if` on the fabric side, `eth0`
    /// inside) and gives it `ip`: a /32 route each way and a default route via
    /// the fabric, as a host on a real underlay has. The fabric itself routes
    /// nowhere else.
    fn wire_to_fabric(&self, ns: &Netns, fab_if: &str, ip: Ipv4Addr) -> Result<()> {
        let fabric_ip = FABRIC_IP.to_string();
        let host = format!("{ip}/32");
        self.fabric.exec(&[
            "ip", "link", "add", fab_if, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ])?;
        self.fabric.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{fabric_ip}/32"),
            "dev",
            fab_if,
        ])?;
        self.fabric.exec(&["ip", "link", "set", fab_if, "up"])?;
        self.fabric
            .exec(&["ip", "route", "add", &host, "dev", fab_if])?;
        ns.exec(&["ip", "addr", "add", &host, "dev", "eth0"])?;
        ns.exec(&["ip", "link", "set", "eth0", "up"])?;
        ns.exec(&[
            "ip",
            "route",
            "add",
            &format!("{fabric_ip}/32"),
            "dev",
            "eth0",
        ])?;
        ns.exec(&["ip", "route", "add", "default", "via", &fabric_ip])?;
        Ok(())
    }

    fn add_node(&mut self, name: &str, index: u8) -> Result<()> {
        let ns = Netns::new(name)?;
        for s in [
            "net.ipv4.ip_forward=1",
            // Pods share the node's gateway address; redirects would only confuse
            // them and use up the ICMP rate limit REJECT's port-unreachable needs.
            "net.ipv4.conf.all.send_redirects=0",
            "net.ipv4.conf.default.send_redirects=0",
            "net.ipv4.icmp_ratelimit=0",
        ] {
            ns.exec(&["sysctl", "-qw", s])?;
        }
        let ip = Ipv4Addr::new(198, 18, 0, index);
        let fab_if = format!("n{index}");
        self.wire_to_fabric(&ns, &fab_if, ip)?;
        // The node's pods are behind it.
        self.fabric.exec(&[
            "ip",
            "route",
            "add",
            &format!("198.18.{index}.0/24"),
            "via",
            &ip.to_string(),
            "dev",
            &fab_if,
        ])?;
        let rt = ns.runtime()?;
        self.nodes.insert(
            name.to_string(),
            Node {
                name: name.to_string(),
                ip,
                index,
                ns,
                rt,
            },
        );
        Ok(())
    }

    pub fn node(&self, name: &str) -> Result<&Node> {
        self.nodes
            .get(name)
            .with_context(|| format!("no node {name}"))
    }

    pub fn pod(&self, name: &str) -> Result<&Pod> {
        self.pods
            .get(name)
            .with_context(|| format!("no pod {name}"))
    }

    /// Adds a pod on `node` with `ip` (inside the node's 198.18.<n>.0/24). With
    /// `http`, it serves `<name> <peer ip>` on port 80.
    pub async fn add_pod(
        &mut self,
        name: &str,
        node: &str,
        ip: Ipv4Addr,
        http: bool,
    ) -> Result<&Pod> {
        self.next_veth += 1;
        let veth = format!("v{}", self.next_veth);
        let n = self.node(node)?;
        if ip.octets()[..3] != [198, 18, n.index] {
            bail!("{ip} is not in {node}'s pod CIDR 198.18.{}.0/24", n.index);
        }
        let gw = Ipv4Addr::new(198, 18, n.index, 254);
        let ns = Netns::new(name)?;
        n.ns.exec(&[
            "ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ])?;
        n.ns.exec(&["ip", "addr", "add", &format!("{gw}/32"), "dev", &veth])?;
        n.ns.exec(&["ip", "link", "set", &veth, "up"])?;
        n.ns.exec(&["ip", "route", "add", &format!("{ip}/32"), "dev", &veth])?;
        ns.exec(&["ip", "addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
        ns.exec(&["ip", "link", "set", "eth0", "up"])?;
        ns.exec(&["ip", "route", "add", &format!("{gw}/32"), "dev", "eth0"])?;
        ns.exec(&["ip", "route", "add", "default", "via", &gw.to_string()])?;
        let rt = ns.runtime()?;
        if http {
            serve_identity(&rt, name, 80).await?;
        }
        let pod = Pod {
            name: name.to_string(),
            ip,
            node: node.to_string(),
            ns,
            rt,
            veth,
        };
        self.pods.insert(name.to_string(), pod);
        self.pod(name)
    }

    /// Deletes a pod (its namespace and veth).
    pub fn remove_pod(&mut self, name: &str) -> Result<()> {
        let pod = self
            .pods
            .remove(name)
            .with_context(|| format!("no pod {name}"))?;
        if let Ok(n) = self.node(&pod.node) {
            let _ = n.ns.exec(&["ip", "link", "del", &pod.veth]);
        }
        drop(pod);
        Ok(())
    }

    /// Writes `/etc/netns/<pod ns>/resolv.conf`, which `ip netns exec` shows the
    /// pod's processes (`dig`, `curl`) as `/etc/resolv.conf`.
    pub fn write_resolv_conf(
        &mut self,
        pod: &str,
        nameserver: Ipv4Addr,
        search: &[&str],
        ndots: u8,
    ) -> Result<PathBuf> {
        let ns = self.pod(pod)?.ns.name.clone();
        let dir = Path::new("/etc/netns").join(&ns);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let path = dir.join("resolv.conf");
        std::fs::write(
            &path,
            format!(
                "# written by meshlite's demo for pod {pod}\nsearch {}\nnameserver {nameserver}\noptions ndots:{ndots}\n",
                search.join(" ")
            ),
        )?;
        self.etc_dirs.push(dir);
        Ok(path)
    }

    /// Adds an off-cluster client (like a machine outside the cluster) on the
    /// underlay, at `198.18.200.<n>`: outside every pod CIDR and the cluster CIDR
    /// (198.18.0.0/17), routed to the nodes by the fabric.
    pub fn add_external(&mut self, name: &str, n: u8) -> Result<&Pod> {
        let ip = Ipv4Addr::new(198, 18, 200, n);
        let ns = Netns::new(name)?;
        self.next_veth += 1;
        let veth = format!("x{}", self.next_veth);
        self.wire_to_fabric(&ns, &veth, ip)?;
        // Nodes answer it through the fabric.
        for node in self.nodes.values() {
            let _ = node.ns.exec(&[
                "ip",
                "route",
                "add",
                &format!("{ip}/32"),
                "via",
                &FABRIC_IP.to_string(),
            ]);
        }
        let rt = ns.runtime()?;
        self.pods.insert(
            name.to_string(),
            Pod {
                name: name.to_string(),
                ip,
                node: String::new(),
                ns,
                rt,
                veth,
            },
        );
        self.pod(name)
    }

    /// Runs a command in a pod's namespace (as `ip netns exec`, so with the pod's
    /// resolv.conf); returns stdout whatever the exit status.
    pub fn exec_in(&self, pod: &str, args: &[&str]) -> Result<String> {
        let p = self.pod(pod)?;
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &p.ns.name])
            .args(args)
            .output()
            .with_context(|| format!("run {args:?} in {pod}"))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `iptables` in a node's namespace.
    pub fn iptables(&self, node: &str, args: &[&str]) -> Result<String> {
        let mut v = vec!["iptables", "-w"];
        v.extend_from_slice(args);
        self.node(node)?.ns.exec(&v)
    }

    /// `nft` in a node's namespace.
    pub fn nft(&self, node: &str, args: &[&str]) -> Result<String> {
        let mut v = vec!["nft"];
        v.extend_from_slice(args);
        self.node(node)?.ns.exec(&v)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Pods before nodes before the fabric: each veth goes with its namespace.
        self.pods.clear();
        self.nodes.clear();
        for d in &self.etc_dirs {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}
