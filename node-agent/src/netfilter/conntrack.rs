//! Stale UDP conntrack entries.
//!
//! UDP has no connection teardown, so a conntrack entry that was NATed to an
//! endpoint keeps sending a client's packets there after the endpoint is gone; and
//! packets sent while a service had no endpoints left entries that bypass the new
//! DNAT rules. After each sync, like kube-proxy, we delete (with the `conntrack`
//! tool) the entries NATed to endpoints that are no longer used, and the entries of
//! services that just got their first endpoint. Which entries to delete is computed
//! purely ([`stale`]) from the previous and the new view.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::{Error, Runner};
use crate::proxy::{IpFamily, ProxyView, ServicePortName};
use meshlite_proto::model::Protocol;

/// What cleanup needs to know about one UDP service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpPort {
    /// Cluster IP, external IPs and load-balancer IPs.
    pub ips: Vec<IpAddr>,
    pub port: u16,
    pub node_port: Option<u16>,
    /// Endpoint IPs this node may NAT to.
    pub endpoints: BTreeSet<IpAddr>,
    pub has_endpoints: bool,
}

/// One deletion (`conntrack -D -p udp ...`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Job {
    /// Entries to `dst:port` NATed to `endpoint`.
    Endpoint {
        dst: IpAddr,
        port: u16,
        endpoint: IpAddr,
    },
    /// Entries to a NodePort NATed to `endpoint`.
    NodePortEndpoint { node_port: u16, endpoint: IpAddr },
    /// All entries to `dst:port` (the service just got endpoints).
    Service { dst: IpAddr, port: u16 },
    /// All entries to a NodePort (the service just got endpoints).
    NodePort { node_port: u16 },
}

/// The UDP ports of a view.
pub fn udp_ports(view: &ProxyView) -> BTreeMap<ServicePortName, UdpPort> {
    view.ports
        .iter()
        .filter(|(k, _)| k.protocol == Protocol::Udp)
        .map(|(k, p)| {
            let i = &p.info;
            let mut ips = vec![i.cluster_ip];
            ips.extend(&i.external_ips);
            ips.extend(&i.load_balancer_ips);
            (
                k.clone(),
                UdpPort {
                    ips,
                    port: i.port,
                    node_port: i.node_port,
                    endpoints: p.selection.reachable.iter().map(|e| e.ip).collect(),
                    has_endpoints: p.selection.has_any,
                },
            )
        })
        .collect()
}

/// The deletions due after going from `previous` to `now`. Nothing on the first
/// sync after start (`previous` unknown): entries NATed by the predecessor's
/// identical rules are still right, and a restart must not disturb traffic.
pub fn stale(
    previous: Option<&BTreeMap<ServicePortName, UdpPort>>,
    now: &BTreeMap<ServicePortName, UdpPort>,
) -> Vec<Job> {
    let Some(previous) = previous else {
        return Vec::new();
    };
    let mut jobs = BTreeSet::new();
    for (name, p) in previous {
        let q = now.get(name);
        for ep in &p.endpoints {
            if q.is_some_and(|q| q.endpoints.contains(ep)) {
                continue;
            }
            for dst in &p.ips {
                jobs.insert(Job::Endpoint {
                    dst: *dst,
                    port: p.port,
                    endpoint: *ep,
                });
            }
            if let Some(np) = p.node_port {
                jobs.insert(Job::NodePortEndpoint {
                    node_port: np,
                    endpoint: *ep,
                });
            }
        }
    }
    for (name, q) in now {
        let had = previous.get(name).is_some_and(|p| p.has_endpoints);
        if !q.has_endpoints || had {
            continue;
        }
        for dst in &q.ips {
            jobs.insert(Job::Service {
                dst: *dst,
                port: q.port,
            });
        }
        if let Some(np) = q.node_port {
            jobs.insert(Job::NodePort { node_port: np });
        }
    }
    jobs.into_iter().collect()
}

/// The `conntrack` arguments of a job.
pub fn args(family: IpFamily, job: &Job) -> Vec<String> {
    let mut a: Vec<String> = vec!["-D".into()];
    if family == IpFamily::V6 {
        a.extend(["-f".into(), "ipv6".into()]);
    }
    a.extend(["-p".into(), "udp".into()]);
    match job {
        Job::Endpoint {
            dst,
            port,
            endpoint,
        } => a.extend([
            "--orig-dst".into(),
            dst.to_string(),
            "--orig-port-dst".into(),
            port.to_string(),
            "--dst-nat".into(),
            endpoint.to_string(),
        ]),
        Job::NodePortEndpoint {
            node_port,
            endpoint,
        } => a.extend([
            "--orig-port-dst".into(),
            node_port.to_string(),
            "--dst-nat".into(),
            endpoint.to_string(),
        ]),
        Job::Service { dst, port } => a.extend([
            "--orig-dst".into(),
            dst.to_string(),
            "--orig-port-dst".into(),
            port.to_string(),
        ]),
        Job::NodePort { node_port } => {
            a.extend(["--orig-port-dst".into(), node_port.to_string()]);
        }
    }
    a
}

/// Runs one deletion; returns the number of entries deleted.
pub async fn delete(runner: &Runner, family: IpFamily, job: &Job) -> Result<u64, Error> {
    let args = args(family, job);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = runner.run("conntrack", &argv, None).await?;
    let stderr = &out.stderr;
    // "conntrack v1.4.7 (conntrack-tools): N flow entries have been deleted."
    // (exit status 1 when N is 0).
    let count = stderr
        .split("): ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse::<u64>().ok());
    match count {
        Some(n) => Ok(n),
        None if out.success => Ok(0),
        None => Err(Error::Failed {
            command: format!("conntrack {}", args.join(" ")),
            status: out.status,
            stderr: stderr.trim().to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn port(eps: &[&str], has: bool) -> UdpPort {
        UdpPort {
            ips: vec![ip("198.19.0.10")],
            port: 53,
            node_port: Some(30053),
            endpoints: eps.iter().map(|e| ip(e)).collect(),
            has_endpoints: has,
        }
    }

    fn name() -> ServicePortName {
        ServicePortName::new("kube-system", "dns", "dns", Protocol::Udp)
    }

    #[test]
    fn removed_endpoints_are_cleaned() {
        let prev = BTreeMap::from([(name(), port(&["198.18.1.1", "198.18.1.2"], true))]);
        let now = BTreeMap::from([(name(), port(&["198.18.1.2"], true))]);
        assert_eq!(
            stale(Some(&prev), &now),
            vec![
                Job::Endpoint {
                    dst: ip("198.19.0.10"),
                    port: 53,
                    endpoint: ip("198.18.1.1")
                },
                Job::NodePortEndpoint {
                    node_port: 30053,
                    endpoint: ip("198.18.1.1")
                },
            ]
        );
        assert_eq!(
            args(IpFamily::V4, &stale(Some(&prev), &now)[0]).join(" "),
            "-D -p udp --orig-dst 198.19.0.10 --orig-port-dst 53 --dst-nat 198.18.1.1"
        );
    }

    #[test]
    fn a_service_getting_endpoints_is_cleaned_and_first_sync_is_not() {
        let prev = BTreeMap::from([(name(), port(&[], false))]);
        let now = BTreeMap::from([(name(), port(&["198.18.1.1"], true))]);
        assert_eq!(
            stale(Some(&prev), &now),
            vec![
                Job::Service {
                    dst: ip("198.19.0.10"),
                    port: 53
                },
                Job::NodePort { node_port: 30053 },
            ]
        );
        assert!(stale(None, &now).is_empty());
        assert!(stale(Some(&now), &now).is_empty());
        // A removed service: all its endpoints are stale.
        assert_eq!(stale(Some(&now), &BTreeMap::new()).len(), 2);
    }

    #[test]
    fn ipv6_uses_the_family_flag() {
        let job = Job::NodePort { node_port: 30053 };
        assert_eq!(
            args(IpFamily::V6, &job).join(" "),
            "-D -f ipv6 -p udp --orig-port-dst 30053"
        );
    }
}
