//! Endpoint selection, as kube-proxy's `CategorizeEndpoints` does it.
//!
//! - Cluster traffic uses ready endpoints; if there is none anywhere, serving and
//!   terminating ones; never `serving = false`.
//! - Topology hints narrow the cluster endpoints only when every ready endpoint
//!   carries a hint and at least one is hinted for this node (node hints) or this
//!   node's zone (zone hints); otherwise hints are ignored.
//! - Local traffic (internalTrafficPolicy or externalTrafficPolicy Local) uses this
//!   node's ready endpoints, else its serving+terminating ones, ignoring hints.

use super::{EndpointInfo, ServicePortInfo};

/// Which endpoints each kind of traffic uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// For "Cluster" traffic policy; empty when no traffic uses it.
    pub cluster: Vec<EndpointInfo>,
    /// This node's endpoints for "Local" traffic policy; empty when none is used.
    pub local: Vec<EndpointInfo>,
    /// The union, sorted by `ip:port`: every endpoint this node may route to, which
    /// is every endpoint a backend must program (KUBE-SEP chains, IPVS real servers).
    pub reachable: Vec<EndpointInfo>,
    /// There is a usable endpoint somewhere in the cluster.
    pub has_any: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Topology {
    None,
    SameZone,
    SameNode,
}

/// Selects the endpoints of one service port for this node. `endpoints` is every
/// endpoint of the port; `zone` is this node's zone.
pub fn categorize(
    endpoints: &[EndpointInfo],
    info: &ServicePortInfo,
    node_name: &str,
    zone: Option<&str>,
) -> Selection {
    let mut sel = Selection::default();
    if info.uses_cluster_endpoints() {
        let topology = topology_from_hints(endpoints, node_name, zone);
        sel.cluster = endpoints
            .iter()
            .filter(|ep| ep.ready && available(ep, topology, node_name, zone))
            .cloned()
            .collect();
        // No ready endpoint anywhere (hints were already ignored if none matched):
        // fall back to serving, terminating endpoints.
        if sel.cluster.is_empty() {
            sel.cluster = endpoints
                .iter()
                .filter(|ep| {
                    ep.serving && ep.terminating && available(ep, topology, node_name, zone)
                })
                .cloned()
                .collect();
        }
        sel.has_any = !sel.cluster.is_empty();
    }

    if !info.uses_local_endpoints() {
        sel.reachable = sel.cluster.clone();
        return sel;
    }

    let mut local_ready = false;
    let mut local_terminating = false;
    for ep in endpoints {
        if ep.ready {
            sel.has_any = true;
            local_ready |= ep.is_local;
        } else if ep.serving && ep.terminating {
            sel.has_any = true;
            local_terminating |= ep.is_local;
        }
    }
    if local_ready {
        sel.local = endpoints
            .iter()
            .filter(|ep| ep.is_local && ep.ready)
            .cloned()
            .collect();
    } else if local_terminating {
        sel.local = endpoints
            .iter()
            .filter(|ep| ep.is_local && ep.serving && ep.terminating)
            .cloned()
            .collect();
    }

    if !info.uses_cluster_endpoints() {
        sel.reachable = sel.local.clone();
        return sel;
    }
    // Cluster endpoints may hold remote endpoints that are not local; local ones may
    // be terminating or outside the hinted topology: merge.
    let mut all: Vec<EndpointInfo> = sel.cluster.clone();
    for ep in &sel.local {
        if !all.iter().any(|e| e.ip == ep.ip && e.port == ep.port) {
            all.push(ep.clone());
        }
    }
    all.sort_by_key(|e| e.to_string());
    sel.reachable = all;
    sel
}

/// kube-proxy's `topologyModeFromHints` (with PreferSameNode enabled): looks at
/// ready endpoints only.
fn topology_from_hints(
    endpoints: &[EndpointInfo],
    node_name: &str,
    zone: Option<&str>,
) -> Topology {
    let mut for_node = false;
    let mut all_node_hints = true;
    let mut for_zone = false;
    let mut all_zone_hints = true;
    let mut any_ready = false;
    for ep in endpoints.iter().filter(|e| e.ready) {
        any_ready = true;
        if ep.node_hints.is_empty() {
            all_node_hints = false;
        } else if ep.node_hints.iter().any(|n| n == node_name) {
            for_node = true;
        }
        if ep.zone_hints.is_empty() {
            all_zone_hints = false;
        } else if zone.is_some_and(|z| ep.zone_hints.iter().any(|h| h == z)) {
            for_zone = true;
        }
    }
    if !any_ready {
        return Topology::None;
    }
    if all_node_hints && for_node {
        Topology::SameNode
    } else if all_zone_hints && for_zone {
        Topology::SameZone
    } else {
        Topology::None
    }
}

fn available(ep: &EndpointInfo, topology: Topology, node_name: &str, zone: Option<&str>) -> bool {
    match topology {
        Topology::None => true,
        Topology::SameNode => ep.node_hints.iter().any(|n| n == node_name),
        Topology::SameZone => zone.is_some_and(|z| ep.zone_hints.iter().any(|h| h == z)),
    }
}
