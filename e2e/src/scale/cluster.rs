//! The generated cluster: services with a long-tailed number of endpoints, their
//! EndpointSlices (at most 100 endpoints each), one Node per agent, and the
//! mutations churn makes (a pod replaced, a service created or deleted, or a
//! Deployment's rolling update: see [`Rollout`]).
//!
//! Every object is a plain Kubernetes JSON object fed to the API stand-in, so the
//! control plane reads it through its real kube source. Addresses are data only
//! (nothing is ever sent to them) and come from the benchmarking ranges:
//! pods from 198.18.0.0/15 counting up, cluster IPs from 198.19.255.254 counting
//! down; at 100k endpoints the two may overlap, which nothing here cares about.

use std::net::Ipv4Addr;
use std::time::SystemTime;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::apiserver::Collection;

/// Most endpoints per EndpointSlice (the EndpointSlice controller's default).
pub const SLICE_MAX: usize = 100;
/// Most endpoints per service.
pub const SERVICE_MAX: usize = 250;
const NAMESPACES: usize = 100;
const ZONES: [&str; 3] = ["zone-a", "zone-b", "zone-c"];
const TRIGGER_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// ClusterIP, NodePort or headless, in a 70/20/10 mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SvcType {
    ClusterIp,
    NodePort,
    Headless,
}

#[derive(Debug, Clone)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub node: usize,
    pub pod: String,
    /// The pod passed its readiness probe.
    pub ready: bool,
    /// The pod is being deleted (it still serves until it is removed).
    pub terminating: bool,
}

#[derive(Debug, Clone)]
pub struct Slice {
    pub name: String,
    pub endpoints: Vec<Endpoint>,
}

#[derive(Debug, Clone)]
pub struct Svc {
    pub namespace: String,
    pub name: String,
    pub ty: SvcType,
    pub cluster_ip: Ipv4Addr,
    /// (name, port, nodePort).
    pub ports: Vec<(&'static str, u16, u16)>,
    pub slices: Vec<Slice>,
    pub alive: bool,
}

/// One write to the stand-in.
#[derive(Debug, Clone)]
pub enum Op {
    Apply(Value),
    Delete(Collection, String, String),
}

/// What a mutation changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MutationKind {
    Endpoint,
    ServiceCreate,
    ServiceDelete,
}

/// A change to make: the API writes, and the key (as the control plane names it)
/// whose arrival at the agents is timed.
#[derive(Debug, Clone)]
pub struct Mutation {
    pub kind: MutationKind,
    pub key: String,
    pub ops: Vec<Op>,
    /// Endpoints in the changed slice (0 for service deletions).
    pub slice_endpoints: usize,
    /// The trigger time written into the changed slice (its
    /// last-change-trigger-time), which the change's cause carries to the agents.
    pub trigger: SystemTime,
}

/// See the module docs.
#[derive(Debug)]
pub struct Cluster {
    pub services: Vec<Svc>,
    pub nodes: usize,
    rng: StdRng,
    next_pod: u32,
    next_svc_ip: u32,
    next_node_port: u16,
    next_name: u64,
}

/// Invalid sizes.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SizeError(String);

// === impl Cluster ===

impl Cluster {
    /// `services` services with `endpoints` endpoints in all, on `nodes` nodes.
    ///
    /// # Errors
    /// Fewer endpoints than services (every service has at least one), more than
    /// [`SERVICE_MAX`] per service, or no nodes.
    pub fn generate(
        services: usize,
        endpoints: usize,
        nodes: usize,
        seed: u64,
    ) -> Result<Self, SizeError> {
        if services == 0 || nodes == 0 {
            return Err(SizeError("need at least one service and one node".into()));
        }
        if endpoints < services || endpoints > services * SERVICE_MAX {
            return Err(SizeError(format!(
                "--endpoints must be between --services ({services}) and {SERVICE_MAX} x --services"
            )));
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let sizes = long_tail(services, endpoints, &mut rng);
        let mut c = Self {
            services: Vec::with_capacity(services),
            nodes,
            rng,
            next_pod: 0,
            next_svc_ip: 0,
            next_node_port: 0,
            next_name: 0,
        };
        for (i, n) in sizes.into_iter().enumerate() {
            let ns = format!("ns-{:03}", i % NAMESPACES);
            let name = format!("svc-{i:05}");
            let svc = c.new_service(ns, name, n);
            c.services.push(svc);
        }
        Ok(c)
    }

    fn pod_ip(&mut self) -> Ipv4Addr {
        // 198.18.0.0/15: 131,072 addresses, reused after that (data only).
        let n = self.next_pod % (1 << 17);
        self.next_pod += 1;
        Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + n)
    }

    fn new_service(&mut self, namespace: String, name: String, endpoints: usize) -> Svc {
        let roll: f64 = self.rng.random();
        let ty = if roll < 0.7 {
            SvcType::ClusterIp
        } else if roll < 0.9 {
            SvcType::NodePort
        } else {
            SvcType::Headless
        };
        let ip_n = self.next_svc_ip % (1 << 16);
        self.next_svc_ip += 1;
        let cluster_ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 255, 254)) - ip_n);
        let mut ports = vec![("http", 80, 0)];
        if self.rng.random_bool(0.25) {
            ports.push(("https", 443, 0));
        }
        if ty == SvcType::NodePort {
            for p in &mut ports {
                p.2 = 30000 + self.next_node_port % 2768;
                self.next_node_port = self.next_node_port.wrapping_add(1);
            }
        }
        let mut slices = Vec::new();
        let mut left = endpoints;
        let mut idx = 0;
        while left > 0 {
            let n = left.min(SLICE_MAX);
            left -= n;
            let eps = (0..n).map(|_| self.new_endpoint(&name)).collect();
            slices.push(Slice {
                name: format!("{name}-s{idx}"),
                endpoints: eps,
            });
            idx += 1;
        }
        Svc {
            namespace,
            name,
            ty,
            cluster_ip,
            ports,
            slices,
            alive: true,
        }
    }

    /// A new ready pod of service `svc` on a random node.
    pub(super) fn new_endpoint(&mut self, svc: &str) -> Endpoint {
        let ip = self.pod_ip();
        let node = self.rng.random_range(0..self.nodes);
        let pod = format!("{svc}-{:08x}", self.rng.random::<u32>());
        Endpoint {
            ip,
            node,
            pod,
            ready: true,
            terminating: false,
        }
    }

    /// Total endpoints of live services.
    pub fn endpoint_count(&self) -> usize {
        self.alive()
            .flat_map(|s| &s.slices)
            .map(|s| s.endpoints.len())
            .sum()
    }

    /// Slices of live services.
    pub fn slice_count(&self) -> usize {
        self.alive().map(|s| s.slices.len()).sum()
    }

    pub fn alive(&self) -> impl Iterator<Item = &Svc> {
        self.services.iter().filter(|s| s.alive)
    }

    /// Every object to load: nodes, services, slices.
    pub fn objects(&self) -> impl Iterator<Item = Value> + '_ {
        let nodes = (0..self.nodes).map(node_json);
        let svcs = self.alive().map(service_json);
        let slices = self.alive().flat_map(|s| {
            s.slices
                .iter()
                .map(move |sl| slice_json(s, sl, SystemTime::UNIX_EPOCH))
        });
        nodes.chain(svcs).chain(slices)
    }

    /// A pod replaced: one endpoint, chosen uniformly over all endpoints, gets a new
    /// address and pod name. `busy` says which keys must not be changed now.
    pub fn replace_endpoint(&mut self, busy: &dyn Fn(&str) -> bool) -> Option<Mutation> {
        if self.services.is_empty() {
            return None;
        }
        // Uniform over endpoints: a uniform slice accepted with probability
        // len / SLICE_MAX. Bounded tries.
        for _ in 0..10_000 {
            let si = self.rng.random_range(0..self.services.len());
            let svc = &self.services[si];
            if !svc.alive || svc.slices.is_empty() {
                continue;
            }
            let li = self.rng.random_range(0..svc.slices.len());
            let len = svc.slices[li].endpoints.len();
            if self.rng.random_range(0..SLICE_MAX) >= len {
                continue;
            }
            let key = slice_key(svc, &svc.slices[li]);
            if busy(&key) {
                continue;
            }
            let ei = self.rng.random_range(0..len);
            let name = svc.name.clone();
            let ep = self.new_endpoint(&name);
            let svc = &mut self.services[si];
            svc.slices[li].endpoints[ei] = ep;
            let trigger = SystemTime::now();
            let obj = slice_json(svc, &svc.slices[li], trigger);
            return Some(Mutation {
                kind: MutationKind::Endpoint,
                key,
                ops: vec![Op::Apply(obj)],
                slice_endpoints: len,
                trigger,
            });
        }
        None
    }

    /// A new service with 1-10 endpoints and its slice.
    pub fn create_service(&mut self) -> Mutation {
        self.next_name += 1;
        let ns = format!("ns-{:03}", self.rng.random_range(0..NAMESPACES));
        let name = format!("churn-{:06}", self.next_name);
        let n = 1 + (10.0 * self.rng.random::<f64>().powi(3)) as usize;
        let svc = self.new_service(ns, name, n);
        let trigger = SystemTime::now();
        let mut ops = vec![Op::Apply(service_json(&svc))];
        ops.extend(
            svc.slices
                .iter()
                .map(|sl| Op::Apply(slice_json(&svc, sl, trigger))),
        );
        let key = service_key(&svc);
        self.services.push(svc);
        Mutation {
            kind: MutationKind::ServiceCreate,
            key,
            ops,
            slice_endpoints: n,
            trigger,
        }
    }

    /// A random live service deleted with its slices (as the garbage collector would).
    pub fn delete_service(&mut self, busy: &dyn Fn(&str) -> bool) -> Option<Mutation> {
        for _ in 0..1_000 {
            let si = self.rng.random_range(0..self.services.len());
            let svc = &self.services[si];
            if !svc.alive
                || busy(&service_key(svc))
                || svc.slices.iter().any(|sl| busy(&slice_key(svc, sl)))
            {
                continue;
            }
            let mut ops: Vec<Op> = svc
                .slices
                .iter()
                .map(|sl| {
                    Op::Delete(
                        Collection::EndpointSlice,
                        svc.namespace.clone(),
                        sl.name.clone(),
                    )
                })
                .collect();
            ops.push(Op::Delete(
                Collection::Service,
                svc.namespace.clone(),
                svc.name.clone(),
            ));
            let key = service_key(svc);
            self.services[si].alive = false;
            return Some(Mutation {
                kind: MutationKind::ServiceDelete,
                key,
                ops,
                slice_endpoints: 0,
                trigger: SystemTime::now(),
            });
        }
        None
    }

    /// A churn step: 90 % pod replacements, 5 % service creations, 5 % deletions.
    pub fn churn_step(&mut self, busy: &dyn Fn(&str) -> bool) -> Option<Mutation> {
        let roll: f64 = self.rng.random();
        if roll < 0.90 {
            self.replace_endpoint(busy)
        } else if roll < 0.95 {
            Some(self.create_service())
        } else {
            self.delete_service(busy)
        }
    }
}

/// Endpoint counts for `n` services summing to `total`, each in 1..=SERVICE_MAX,
/// long-tailed: Pareto(alpha = 1.2) weights scaled so the clamped sizes sum to the
/// total, the remainder spread one by one.
pub fn long_tail(n: usize, total: usize, rng: &mut StdRng) -> Vec<usize> {
    let weights: Vec<f64> = (0..n)
        .map(|_| {
            let u: f64 = rng.random_range(f64::EPSILON..1.0);
            u.powf(-1.0 / 1.2)
        })
        .collect();
    let sizes = |k: f64| -> Vec<usize> {
        weights
            .iter()
            .map(|w| ((k * w).round() as usize).clamp(1, SERVICE_MAX))
            .collect()
    };
    let (mut lo, mut hi) = (0.0_f64, SERVICE_MAX as f64);
    for _ in 0..60 {
        let mid = (lo + hi) / 2.0;
        if sizes(mid).iter().sum::<usize>() < total {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let mut out = sizes(lo);
    let mut sum: usize = out.iter().sum();
    // Bounded: each pass moves the sum by one towards the total, and a valid total
    // (checked by the caller) is always reachable.
    let mut guard = 0;
    while sum != total && guard < 100 * n + total {
        guard += 1;
        let i = rng.random_range(0..n);
        if sum < total && out[i] < SERVICE_MAX {
            out[i] += 1;
            sum += 1;
        } else if sum > total && out[i] > 1 {
            out[i] -= 1;
            sum -= 1;
        }
    }
    out
}

pub fn service_key(s: &Svc) -> String {
    format!("service/{}/{}", s.namespace, s.name)
}

pub fn slice_key(s: &Svc, sl: &Slice) -> String {
    format!("endpointslice/{}/{}", s.namespace, sl.name)
}

pub fn node_name(i: usize) -> String {
    format!("node-{i:05}")
}

pub fn node_json(i: usize) -> Value {
    let n = u32::try_from(i).unwrap_or(u32::MAX);
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + (n % 65_536));
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": node_name(i), "labels": {
            "topology.kubernetes.io/zone": ZONES[i % ZONES.len()],
            "kubernetes.io/hostname": node_name(i)}},
        "status": {"addresses": [{"type": "InternalIP", "address": ip.to_string()}]}
    })
}

pub fn service_json(s: &Svc) -> Value {
    let ports: Vec<Value> = s
        .ports
        .iter()
        .map(|(name, port, node_port)| {
            let mut p =
                json!({"name": name, "port": port, "protocol": "TCP", "targetPort": 8000 + port});
            if *node_port != 0 {
                p["nodePort"] = json!(node_port);
            }
            p
        })
        .collect();
    let (ty, ip) = match s.ty {
        SvcType::ClusterIp => ("ClusterIP", s.cluster_ip.to_string()),
        SvcType::NodePort => ("NodePort", s.cluster_ip.to_string()),
        SvcType::Headless => ("ClusterIP", "None".to_string()),
    };
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": s.name, "namespace": s.namespace, "labels": {"app": s.name}},
        "spec": {"type": ty, "clusterIP": ip, "clusterIPs": [ip], "ports": ports,
                 "selector": {"app": s.name}, "sessionAffinity": "None",
                 "internalTrafficPolicy": "Cluster", "ipFamilies": ["IPv4"]}
    })
}

/// The slice as the EndpointSlice controller writes it; `trigger` becomes its
/// last-change-trigger-time annotation (omitted at the epoch).
pub fn slice_json(s: &Svc, sl: &Slice, trigger: SystemTime) -> Value {
    let ports: Vec<Value> = s
        .ports
        .iter()
        .map(|(name, port, _)| json!({"name": name, "port": 8000 + port, "protocol": "TCP"}))
        .collect();
    let eps: Vec<Value> = sl
        .endpoints
        .iter()
        .map(|e| {
            // As the EndpointSlice controller reports a pod: a terminating pod is
            // not ready but still serving until it is gone.
            let mut v = json!({
                "addresses": [e.ip.to_string()],
                "conditions": {"ready": e.ready && !e.terminating, "serving": e.ready,
                               "terminating": e.terminating},
                "nodeName": node_name(e.node),
                "zone": ZONES[e.node % ZONES.len()],
                "targetRef": {"kind": "Pod", "namespace": s.namespace, "name": e.pod}
            });
            if s.ty == SvcType::Headless {
                v["hostname"] = json!(e.pod);
            }
            v
        })
        .collect();
    let mut meta = json!({
        "name": sl.name, "namespace": s.namespace,
        "labels": {"kubernetes.io/service-name": s.name,
                   "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}
    });
    if trigger != SystemTime::UNIX_EPOCH
        && let Ok(ts) = jiff::Timestamp::try_from(trigger)
    {
        meta["annotations"] = json!({ TRIGGER_ANNOTATION: ts.to_string() });
    }
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": meta, "addressType": "IPv4", "ports": ports, "endpoints": eps
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_hit_the_total_and_are_long_tailed() {
        let mut rng = StdRng::seed_from_u64(7);
        let s = long_tail(10_000, 100_000, &mut rng);
        assert_eq!(s.iter().sum::<usize>(), 100_000);
        assert!(s.iter().all(|n| (1..=SERVICE_MAX).contains(n)));
        let mut sorted = s.clone();
        sorted.sort_unstable();
        let median = sorted[sorted.len() / 2];
        assert!(median < 10, "median {median} below the mean of 10");
        assert!(sorted.iter().filter(|n| **n >= 200).count() > 10, "a tail");
    }

    #[test]
    fn generates_slices_of_at_most_100_and_the_mix() {
        let c = Cluster::generate(1_000, 10_000, 20, 1).unwrap();
        assert_eq!(c.endpoint_count(), 10_000);
        assert!(
            c.services
                .iter()
                .flat_map(|s| &s.slices)
                .all(|sl| (1..=SLICE_MAX).contains(&sl.endpoints.len()))
        );
        let headless = c
            .services
            .iter()
            .filter(|s| s.ty == SvcType::Headless)
            .count();
        assert!((50..150).contains(&headless), "{headless}");
        assert_eq!(c.objects().count(), 20 + 1_000 + c.slice_count());
        assert!(Cluster::generate(10, 5, 1, 1).is_err());
    }

    #[test]
    fn mutations_change_what_they_say() {
        let mut c = Cluster::generate(100, 1_000, 5, 2).unwrap();
        let m = c.replace_endpoint(&|_| false).unwrap();
        assert!(m.key.starts_with("endpointslice/"));
        let Op::Apply(obj) = &m.ops[0] else {
            panic!("apply")
        };
        assert!(obj["metadata"]["annotations"][TRIGGER_ANNOTATION].is_string());
        let created = c.create_service();
        assert!(created.key.starts_with("service/ns-"));
        assert!(created.ops.len() >= 2);
        let d = c.delete_service(&|k| k == created.key).unwrap();
        assert_ne!(d.key, created.key);
        assert!(matches!(
            d.ops.last(),
            Some(Op::Delete(Collection::Service, ..))
        ));
        assert!(c.replace_endpoint(&|_| true).is_none(), "all busy");
    }
}
