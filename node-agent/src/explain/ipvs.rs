//! The IPVS half of the tracer: the virtual servers (from the kernel over netlink
//! or from a rendered plan) and ipset membership for the IPVS mode's iptables rules.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use meshlite_proto::model::Protocol;

use super::{Flow, Step, Verdict};
use crate::ipvs::VsKey;
use crate::ipvs::diff::KernelState;
use crate::ipvs::plan::Plan;

/// One virtual server: scheduler and real server -> weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vs {
    pub scheduler: String,
    pub persistent: bool,
    pub dests: BTreeMap<SocketAddr, u32>,
    /// `ns/name:port` when known (a rendered plan; the kernel does not keep it).
    pub owner: Option<String>,
}

/// The IPVS table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    pub services: BTreeMap<VsKey, Vs>,
}

// === impl Table ===

impl Table {
    /// From a rendered plan (`--manifests`).
    pub fn from_plan(plan: &Plan) -> Self {
        let services = plan
            .virtual_servers
            .iter()
            .map(|(k, v)| {
                (
                    *k,
                    Vs {
                        scheduler: v.scheduler.to_string(),
                        persistent: v.flags & crate::ipvs::plan::FLAG_PERSISTENT != 0,
                        dests: v.dests.clone(),
                        owner: Some(v.owner.clone()),
                    },
                )
            })
            .collect();
        Self { services }
    }

    /// From the kernel's table.
    pub fn from_kernel(state: &KernelState) -> Self {
        let services = state
            .iter()
            .map(|(k, v)| {
                (
                    *k,
                    Vs {
                        scheduler: v.scheduler.clone(),
                        persistent: v.flags & crate::ipvs::plan::FLAG_PERSISTENT != 0,
                        dests: v.dests.iter().map(|(a, d)| (*a, d.weight)).collect(),
                        owner: None,
                    },
                )
            })
            .collect();
        Self { services }
    }

    /// IPVS on local delivery: a flow to a virtual server is sent to its real
    /// servers in proportion to their weights (what rr/wrr do over many
    /// connections; weight 0 takes no new connections). A virtual server with no
    /// usable real server drops the packet.
    pub fn schedule(&self, mut flow: Flow) -> Vec<Flow> {
        let key = VsKey {
            protocol: flow.protocol,
            addr: flow.dst,
        };
        let Some(vs) = self.services.get(&key) else {
            return vec![flow];
        };
        let head = format!(
            "{} {} {}{}",
            proto_upper(flow.protocol),
            fmt_addr(flow.dst),
            vs.scheduler,
            if vs.persistent { " persistent" } else { "" }
        );
        if vs.persistent {
            flow.affinity = true;
        }
        if let Some(o) = &vs.owner {
            flow.comments.push(o.clone());
        }
        let total: u64 = vs.dests.values().map(|w| u64::from(*w)).sum();
        if total == 0 {
            flow.trace.push(step(head.clone()));
            flow.trace
                .push(step("  (no real server with a weight above 0)".into()));
            flow.verdict = Some(Verdict::Drop);
            return vec![flow];
        }
        flow.trace.push(step(head));
        vs.dests
            .iter()
            .filter(|(_, w)| **w > 0)
            .map(|(addr, w)| {
                let mut f = flow.clone();
                f.trace
                    .push(step(format!("  -> {} Masq {w}", fmt_addr(*addr))));
                f.prob *= f64::from(*w) / total as f64;
                f.dst = *addr;
                f.dnat = true;
                f
            })
            .collect()
    }
}

fn step(rule: String) -> Step {
    Step {
        table: "ipvs".into(),
        chain: "virtual server".into(),
        rule,
        stage: 2,
    }
}

fn proto_upper(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
        Protocol::Sctp => "SCTP",
    }
}

fn fmt_addr(a: SocketAddr) -> String {
    match a.ip() {
        IpAddr::V4(ip) => format!("{ip}:{}", a.port()),
        IpAddr::V6(ip) => format!("[{ip}]:{}", a.port()),
    }
}

/// Whether an ipset member (`ip`, `ip,tcp:80`, `ip,tcp:80,net`, `30080`)
/// matches the flow, reading each dimension from the source or the destination
/// as `dirs` (`dst,dst,src`) says.
pub fn member_matches(member: &str, dirs: &[String], flow: &Flow) -> bool {
    let parts: Vec<&str> = member.split(',').collect();
    if parts.len() != dirs.len() {
        return false;
    }
    parts.iter().zip(dirs).all(|(part, dir)| {
        let (ip, port) = if dir == "src" {
            // A new connection's source port is unknown; only addresses are used.
            (flow.src, None)
        } else {
            (flow.dst.ip(), Some(flow.dst.port()))
        };
        if let Ok(net) = part.parse::<IpNet>() {
            return net.contains(&ip);
        }
        if let Ok(a) = part.parse::<IpAddr>() {
            return a == ip;
        }
        let (proto, p) = match part.split_once(':') {
            Some((proto, p)) => (Some(proto), p),
            None => (None, *part),
        };
        let proto_ok = proto.is_none_or(|pr| pr == flow.protocol.as_lower());
        proto_ok && p.parse::<u16>().ok() == port && port.is_some()
    })
}

/// Parses `ipset save` output: every set's members (normalized as the agent does).
pub fn parse_ipset_save(text: &str) -> BTreeMap<String, std::collections::BTreeSet<String>> {
    let mut out: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        match (f.next(), f.next(), f.next()) {
            (Some("create"), Some(name), _) => {
                out.entry(name.to_string()).or_default();
            }
            (Some("add"), Some(name), Some(member)) => {
                out.entry(name.to_string())
                    .or_default()
                    .insert(crate::ipvs::ipset::normalize_member(member));
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::explain::{Flow, Packet};
    use crate::ipvs::diff::{KernelDest, KernelVs};

    fn flow(src: &str, dst: &str) -> Flow {
        Flow::new(&Packet {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            protocol: Protocol::Tcp,
        })
    }

    #[test]
    fn ipset_members_match_by_dimension() {
        let f = flow("198.18.1.5", "198.19.0.1:80");
        let d = |s: &str| s.split(',').map(str::to_string).collect::<Vec<_>>();
        assert!(member_matches("198.19.0.1,tcp:80", &d("dst,dst"), &f));
        assert!(!member_matches("198.19.0.1,udp:80", &d("dst,dst"), &f));
        assert!(!member_matches("198.19.0.1,tcp:81", &d("dst,dst"), &f));
        assert!(member_matches(
            "198.19.0.1,tcp:80,198.18.1.0/24",
            &d("dst,dst,src"),
            &f
        ));
        assert!(!member_matches(
            "198.19.0.1,tcp:80,198.18.2.0/24",
            &d("dst,dst,src"),
            &f
        ));
        assert!(member_matches("80", &d("dst"), &f));
        assert!(member_matches("198.19.0.1", &d("dst"), &f));
        assert!(!member_matches("198.19.0.1", &d("dst,dst"), &f));
    }

    #[test]
    fn ipset_save_is_read_like_the_agent_reads_it() {
        let sets = parse_ipset_save(
            "create KUBE-CLUSTER-IP hash:ip,port family inet\n\
             add KUBE-CLUSTER-IP 198.19.0.1,tcp:80\n\
             create KUBE-LOAD-BALANCER-SOURCE-CIDR hash:ip,port,net family inet\n\
             add KUBE-LOAD-BALANCER-SOURCE-CIDR 198.19.60.1,tcp:80,198.18.0.0/24\n\
             create EMPTY hash:ip family inet\n",
        );
        assert_eq!(sets.len(), 3);
        assert!(sets["KUBE-CLUSTER-IP"].contains("198.19.0.1,tcp:80"));
        assert!(sets["EMPTY"].is_empty());
    }

    #[test]
    fn kernel_weights_become_probabilities_and_weight_zero_takes_nothing() {
        let key = VsKey::new(Protocol::Tcp, "198.19.0.1".parse().unwrap(), 80);
        let dest = |w| KernelDest {
            weight: w,
            active: 0,
            inactive: 0,
        };
        let state = KernelState::from([(
            key,
            KernelVs {
                scheduler: "wrr".into(),
                flags: 0,
                timeout: 0,
                dests: BTreeMap::from([
                    ("198.18.1.1:8080".parse().unwrap(), dest(3)),
                    ("198.18.1.2:8080".parse().unwrap(), dest(1)),
                    ("198.18.1.3:8080".parse().unwrap(), dest(0)),
                ]),
            },
        )]);
        let t = Table::from_kernel(&state);
        let out = t.schedule(flow("198.18.9.9", "198.19.0.1:80"));
        let got: Vec<(String, f64)> = out.iter().map(|f| (f.dst.to_string(), f.prob)).collect();
        assert_eq!(
            got,
            [
                ("198.18.1.1:8080".into(), 0.75),
                ("198.18.1.2:8080".into(), 0.25)
            ]
        );
        assert!(out[0].trace[0].rule.starts_with("TCP 198.19.0.1:80 wrr"));
        // Every real server at weight 0 (draining): dropped.
        let mut s = state.clone();
        for d in s.values_mut().flat_map(|v| v.dests.values_mut()) {
            d.weight = 0;
        }
        let out = Table::from_kernel(&s).schedule(flow("198.18.9.9", "198.19.0.1:80"));
        assert_eq!(out[0].verdict, Some(Verdict::Drop));
        // Not a virtual server: untouched.
        let out = t.schedule(flow("198.18.9.9", "198.19.0.2:80"));
        assert!(!out[0].dnat);
    }
}
