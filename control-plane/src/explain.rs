//! `meshlite-control-plane explain service NS/NAME`: for each node, the endpoints
//! its agent programs for each port of a service (computed with the agents' own
//! selection code, `meshlite-proxy`, on a snapshot decoded from the store), the
//! version the node's agent has ACKed against the version that last changed the
//! service, and for a node that is behind, since when and what it still sends
//! traffic to that it should not (from a bounded history of the service's
//! endpoints that the control plane records as versions are published).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use axum::Router;
use axum::extract::{Path, Query};
use axum::http::StatusCode;
use axum::routing::get;
use meshlite_proto::model::{Resource, ServiceName};
use meshlite_proto::v1;
use meshlite_proxy::{IpFamily, ProxyView};
use meshlite_runtime::Snapshot;
use meshlite_runtime::subscriber::to_nanos;
use prost::Message;
use serde::{Deserialize, Serialize};

use crate::server::Agents;
use crate::store::{Store, StoredEntry};

/// Versions of a service's endpoints remembered (per service).
const HISTORY: usize = 32;

/// The `/explain/service/{ns}/{name}` body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServiceReport {
    pub service: String,
    /// The newest store version.
    pub version: u64,
    /// The version that last changed the service or one of its slices.
    pub changed_version: u64,
    pub changed_unix_nanos: Option<i64>,
    pub nodes: Vec<NodeReport>,
}

/// One node's side of the service.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeReport {
    pub node: String,
    /// The version its node agent has ACKed; `None`: no agent connected.
    pub acked_version: Option<u64>,
    /// The agent holds a version older than the service's last change.
    pub behind: bool,
    /// Per service port and family, the endpoints programmed at the newest version.
    pub ports: Vec<PortReport>,
    pub stale: Option<Stale>,
}

/// One port: the endpoints for cluster and for local (external) traffic.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PortReport {
    /// `port name/protocol` (`-/tcp` for an unnamed port) and family.
    pub port: String,
    pub family: String,
    pub cluster: Vec<String>,
    pub local: Vec<String>,
}

/// What a node that is behind still has.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Stale {
    /// The first change of the service the agent has not applied.
    pub since_version: u64,
    pub since_unix_nanos: Option<i64>,
    /// Endpoints of the service at the agent's version that it no longer has.
    /// `None` when the history does not reach back that far.
    pub endpoints: Option<Vec<String>>,
}

/// A bounded record of every service's endpoint addresses per version.
#[derive(Debug, Clone, Default)]
pub struct History {
    inner: Arc<Mutex<HistoryInner>>,
}

#[derive(Debug, Default)]
struct HistoryInner {
    seen: u64,
    /// slice key -> its service and endpoint `ip:port`s, kept up to date from the
    /// changed entries only (no full decode per publish).
    slices: HashMap<Arc<str>, (ServiceName, BTreeSet<String>)>,
    /// service -> the keys of its slices in `slices`.
    members: HashMap<ServiceName, BTreeSet<Arc<str>>>,
    /// service -> its endpoints now and its last [`HISTORY`] changes.
    services: BTreeMap<ServiceName, ServiceHistory>,
}

/// A service's endpoint `ip:port`s now, and the changes that led there. A change
/// keeps only what it added and removed (a rollout's write changes one endpoint
/// of thousands): an older version is the current set with the newer changes
/// undone.
#[derive(Debug, Default)]
struct ServiceHistory {
    current: BTreeSet<String>,
    /// Oldest first; the oldest one's diff is never undone, so it is kept empty.
    changes: VecDeque<Recorded>,
}

/// One version of a service's endpoints, as a diff from the one before.
#[derive(Debug)]
struct Recorded {
    version: u64,
    published: Option<SystemTime>,
    added: Vec<String>,
    removed: Vec<String>,
}

// === impl ServiceHistory ===

impl ServiceHistory {
    /// Records `eps` as the endpoints at `version`, if they changed.
    fn push(&mut self, version: u64, published: Option<SystemTime>, eps: BTreeSet<String>) {
        if !self.changes.is_empty() && self.current == eps {
            return;
        }
        let (added, removed) = if self.changes.is_empty() {
            (Vec::new(), Vec::new())
        } else {
            (
                eps.difference(&self.current).cloned().collect(),
                self.current.difference(&eps).cloned().collect(),
            )
        };
        self.changes.push_back(Recorded {
            version,
            published,
            added,
            removed,
        });
        self.current = eps;
        while self.changes.len() > HISTORY {
            self.changes.pop_front();
            if let Some(first) = self.changes.front_mut() {
                first.added = Vec::new();
                first.removed = Vec::new();
            }
        }
    }

    /// The endpoints at `version`, if remembered.
    fn at(&self, version: u64) -> Option<BTreeSet<String>> {
        if version < self.changes.front()?.version {
            return None;
        }
        let mut set = self.current.clone();
        for c in self
            .changes
            .iter()
            .rev()
            .take_while(|c| c.version > version)
        {
            for a in &c.added {
                set.remove(a);
            }
            set.extend(c.removed.iter().cloned());
        }
        Some(set)
    }
}

// === impl HistoryInner ===

impl HistoryInner {
    /// Forgets that slice `key` belongs to `svc`.
    fn unlink(&mut self, svc: &ServiceName, key: &Arc<str>) {
        if let Some(keys) = self.members.get_mut(svc) {
            keys.remove(key);
            if keys.is_empty() {
                self.members.remove(svc);
            }
        }
    }
}

// === impl History ===

impl History {
    /// Records the services changed since the last call (run after each publish).
    /// Reads and decodes only the resources changed since then, from the store's
    /// change log (the whole store only when the log no longer reaches back).
    pub fn record(&self, store: &Store) {
        let newest = store.version();
        let Ok(mut h) = self.inner.lock() else {
            return;
        };
        if newest <= h.seen {
            return;
        }
        let h = &mut *h;
        let seen = h.seen;
        let (written, removed) = match store.changed_since(seen) {
            Some(c) => c,
            None => {
                let entries = store.entries();
                let live: HashSet<&Arc<str>> = entries.iter().map(|e| &e.key).collect();
                let gone: Vec<Arc<str>> = h
                    .slices
                    .keys()
                    .filter(|k| !live.contains(k))
                    .cloned()
                    .collect();
                let written = entries.into_iter().filter(|e| e.seq > seen).collect();
                (written, gone)
            }
        };
        let mut changed: BTreeMap<ServiceName, (u64, Option<SystemTime>)> = BTreeMap::new();
        let mut mark = |svc: ServiceName, seq: u64, when: Option<SystemTime>| {
            let e = changed.entry(svc).or_insert((seq, when));
            if seq > e.0 {
                *e = (seq, when);
            }
        };
        for e in &written {
            let Some(r) = v1::Resource::decode(e.bytes.as_ref())
                .ok()
                .and_then(|r| Resource::try_from(&r).ok())
            else {
                continue;
            };
            match r {
                Resource::Service(s) => mark(
                    ServiceName {
                        namespace: s.namespace,
                        name: s.name,
                    },
                    e.seq,
                    e.published,
                ),
                Resource::EndpointSlice(s) => {
                    let svc = ServiceName {
                        namespace: s.namespace.clone(),
                        name: s.service_name.clone(),
                    };
                    let eps = slice_endpoints(&s);
                    if let Some((old, _)) = h.slices.insert(e.key.clone(), (svc.clone(), eps))
                        && old != svc
                    {
                        h.unlink(&old, &e.key);
                        mark(old, e.seq, e.published);
                    }
                    h.members
                        .entry(svc.clone())
                        .or_default()
                        .insert(e.key.clone());
                    mark(svc, e.seq, e.published);
                }
                Resource::Node(_) => {}
            }
        }
        // Slices gone since: their services changed at (at the latest) `newest`.
        for k in removed {
            if let Some((svc, _)) = h.slices.remove(&k) {
                h.unlink(&svc, &k);
                mark(svc, newest, None);
            }
        }
        for (svc, (version, when)) in changed {
            let mut eps = BTreeSet::new();
            for key in h.members.get(&svc).into_iter().flatten() {
                if let Some((_, e)) = h.slices.get(key) {
                    eps.extend(e.iter().cloned());
                }
            }
            h.services.entry(svc).or_default().push(version, when, eps);
        }
        h.seen = newest;
    }

    /// The service's endpoints at `version`, if remembered.
    fn at(&self, svc: &ServiceName, version: u64) -> Option<BTreeSet<String>> {
        let h = self.inner.lock().ok()?;
        h.services.get(svc)?.at(version)
    }

    /// The newest recorded change (it sees deletions, which the store's live
    /// entries do not).
    fn last_change(&self, svc: &ServiceName) -> Option<(u64, Option<SystemTime>)> {
        let h = self.inner.lock().ok()?;
        h.services
            .get(svc)?
            .changes
            .back()
            .map(|c| (c.version, c.published))
    }

    /// The first recorded change after `version`.
    fn change_after(&self, svc: &ServiceName, version: u64) -> Option<(u64, Option<SystemTime>)> {
        let h = self.inner.lock().ok()?;
        h.services
            .get(svc)?
            .changes
            .iter()
            .find(|c| c.version > version)
            .map(|c| (c.version, c.published))
    }
}

fn decode(entries: &[StoredEntry]) -> Snapshot {
    Snapshot::from_resources(entries.iter().filter_map(|e| {
        let r = v1::Resource::decode(e.bytes.as_ref()).ok()?;
        Resource::try_from(&r).ok()
    }))
}

/// Every endpoint `ip:port` of a slice.
fn slice_endpoints(s: &meshlite_proto::model::EndpointSlice) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for e in &s.endpoints {
        for a in &e.addresses {
            for p in &s.ports {
                out.insert(std::net::SocketAddr::new(*a, p.port).to_string());
            }
        }
    }
    out
}

/// The report for one service (and optionally one node).
pub fn report(
    store: &Store,
    agents: &Agents,
    history: &History,
    svc: &ServiceName,
    node: Option<&str>,
) -> Option<ServiceReport> {
    history.record(store);
    let entries = store.entries();
    let snap = decode(&entries);
    snap.service(svc)?;
    // The newest change of the service object or one of its slices.
    let mut changed = (0u64, None);
    for StoredEntry {
        seq,
        published: when,
        bytes: b,
        ..
    } in &entries
    {
        let Some(r) = v1::Resource::decode(b.as_ref())
            .ok()
            .and_then(|r| Resource::try_from(&r).ok())
        else {
            continue;
        };
        let mine = match &r {
            Resource::Service(s) => s.namespace == svc.namespace && s.name == svc.name,
            Resource::EndpointSlice(s) => {
                s.namespace == svc.namespace && s.service_name == svc.name
            }
            _ => false,
        };
        if mine && *seq > changed.0 {
            changed = (*seq, *when);
        }
    }
    if let Some(last) = history.last_change(svc).filter(|l| l.0 > changed.0) {
        changed = last;
    }
    let version = store.version();
    let rows = agents.rows(version);
    let mut names: BTreeSet<String> = snap.nodes().map(|n| n.name.clone()).collect();
    names.extend(
        rows.iter()
            .filter(|r| r.role == "node")
            .map(|r| r.node_name.clone()),
    );
    let mut nodes = Vec::new();
    for name in names {
        if node.is_some_and(|n| n != name) {
            continue;
        }
        let acked = rows
            .iter()
            .filter(|r| r.role == "node" && r.node_name == name)
            .map(|r| r.version)
            .min();
        let mut ports = Vec::new();
        for family in [IpFamily::V4, IpFamily::V6] {
            let view = ProxyView::build(&snap, &name, family);
            for (pn, pv) in view.ports.iter().filter(|(k, _)| &k.service == svc) {
                let fmt = |v: &[meshlite_proxy::EndpointInfo]| {
                    v.iter()
                        .map(|e| std::net::SocketAddr::new(e.ip, e.port).to_string())
                        .collect::<Vec<_>>()
                };
                ports.push(PortReport {
                    port: format!(
                        "{}/{}",
                        if pn.port.is_empty() { "-" } else { &pn.port },
                        pn.protocol.as_lower()
                    ),
                    family: family.as_str().to_string(),
                    cluster: fmt(&pv.selection.cluster),
                    local: fmt(&pv.selection.local),
                });
            }
        }
        let behind = acked.is_some_and(|a| a < changed.0);
        let stale = match acked {
            Some(a) if behind => {
                let since = history.change_after(svc, a).unwrap_or(changed);
                let now: BTreeSet<String> = ports
                    .iter()
                    .flat_map(|p| p.cluster.iter().chain(&p.local).cloned())
                    .collect();
                Some(Stale {
                    since_version: since.0,
                    since_unix_nanos: since.1.map(to_nanos),
                    endpoints: history
                        .at(svc, a)
                        .map(|old| old.difference(&now).cloned().collect()),
                })
            }
            _ => None,
        };
        nodes.push(NodeReport {
            node: name,
            acked_version: acked,
            behind,
            ports,
            stale,
        });
    }
    Some(ServiceReport {
        service: format!("{}/{}", svc.namespace, svc.name),
        version,
        changed_version: changed.0,
        changed_unix_nanos: changed.1.map(to_nanos),
        nodes,
    })
}

#[derive(Debug, Deserialize)]
struct NodeQuery {
    node: Option<String>,
}

/// `/explain/service/{ns}/{name}?node=N`.
pub fn router(agents: Agents, store: Arc<Store>, history: History) -> Router {
    Router::new().route(
        "/explain/service/{ns}/{name}",
        get(
            move |Path((ns, name)): Path<(String, String)>, Query(q): Query<NodeQuery>| {
                let (agents, store, history) = (agents.clone(), store.clone(), history.clone());
                async move {
                    let svc = ServiceName {
                        namespace: ns,
                        name,
                    };
                    match report(&store, &agents, &history, &svc, q.node.as_deref()) {
                        Some(r) => Ok(axum::Json(r)),
                        None => Err((StatusCode::NOT_FOUND, "no such service\n")),
                    }
                }
            },
        ),
    )
}

/// Failures of the explain command.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("service must be NS/NAME: {0}")]
    BadName(String),
    #[error(transparent)]
    Admin(#[from] meshlite_runtime::admin::client::ClientError),
    #[error("{0}: not an explain report: {1}")]
    Json(String, serde_json::Error),
}

/// Fetches the report from an admin address.
///
/// # Errors
/// A bad name, connection failures, a timeout, an unknown service, bad JSON.
pub async fn fetch(
    addr: &str,
    service: &str,
    node: Option<&str>,
) -> Result<ServiceReport, ExplainError> {
    let (ns, name) = service
        .split_once('/')
        .filter(|(a, b)| !a.is_empty() && !b.is_empty() && !b.contains('/'))
        .ok_or_else(|| ExplainError::BadName(service.to_string()))?;
    let mut path = format!("/explain/service/{ns}/{name}");
    if let Some(n) = node {
        path.push_str(&format!("?node={n}"));
    }
    let body =
        meshlite_runtime::admin::client::get(addr, &path, crate::status::STATUS_TIMEOUT).await?;
    serde_json::from_slice(&body).map_err(|e| ExplainError::Json(format!("{addr}{path}"), e))
}

/// The human-readable form.
pub fn text(r: &ServiceReport) -> String {
    use std::fmt::Write as _;
    let mut o = format!(
        "service {}  newest version {}  last changed at version {}\n",
        r.service, r.version, r.changed_version
    );
    for n in &r.nodes {
        let acked = n
            .acked_version
            .map_or("no agent connected".to_string(), |v| format!("acked {v}"));
        let state = if n.behind { "BEHIND" } else { "up to date" };
        let _ = writeln!(o, "\nnode {}: {acked}, {state}", n.node);
        for p in &n.ports {
            let _ = writeln!(
                o,
                "  {} {}: cluster [{}] local [{}]",
                p.port,
                p.family,
                p.cluster.join(", "),
                p.local.join(", ")
            );
        }
        if let Some(s) = &n.stale {
            let _ = writeln!(o, "  behind since version {}", s.since_version);
            match &s.endpoints {
                Some(e) if e.is_empty() => {
                    let _ = writeln!(o, "  still sends traffic to: nothing it should not");
                }
                Some(e) => {
                    let _ = writeln!(o, "  still sends traffic to: {}", e.join(", "));
                }
                None => {
                    let _ = writeln!(
                        o,
                        "  still sends traffic to: unknown (older than the history kept)"
                    );
                }
            }
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::time::Duration;

    use meshlite_proto::model::{
        AddressFamily, Endpoint, EndpointPort, EndpointSlice, Node, Protocol, Service,
    };

    use super::*;
    use crate::metrics::RoleLabel;
    use crate::store::{Cause, Change, Kind};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn slice(ips: &[&str]) -> Resource {
        Resource::EndpointSlice(EndpointSlice {
            namespace: "default".into(),
            name: "web-1".into(),
            service_name: "web".into(),
            address_family: AddressFamily::Ipv4,
            ports: vec![EndpointPort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 8080,
                app_protocol: None,
            }],
            endpoints: ips
                .iter()
                .map(|a| Endpoint::ready(ip(a)).on_node("node2"))
                .collect(),
            ignored_by_proxy: false,
        })
    }

    fn apply(store: &Store, rs: Vec<Resource>) -> u64 {
        store.apply(
            rs.iter()
                .map(|r| Change::upsert(r, Cause::observed_now(None)))
                .collect(),
        );
        store.publish()
    }

    /// Versions are kept as diffs; any remembered version reads back whole, also
    /// after the oldest ones were dropped.
    #[test]
    fn a_service_history_reads_back_every_remembered_version() {
        let set = |n: std::ops::Range<usize>| -> BTreeSet<String> {
            n.map(|i| format!("198.18.0.{i}:80")).collect()
        };
        let mut h = ServiceHistory::default();
        // Version 10 + i holds endpoints i..i+5: one in, one out per version.
        for i in 0..HISTORY + 8 {
            h.push(10 + i as u64, None, set(i..i + 5));
        }
        h.push(100, None, set(HISTORY + 7..HISTORY + 12)); // unchanged: not recorded
        assert_eq!(h.changes.len(), HISTORY);
        assert_eq!(h.at(17), None, "dropped");
        for i in 8..HISTORY + 8 {
            assert_eq!(
                h.at(10 + i as u64),
                Some(set(i..i + 5)),
                "version {}",
                10 + i
            );
        }
        assert_eq!(h.at(1_000), Some(set(HISTORY + 7..HISTORY + 12)));
        let kept: usize = h
            .changes
            .iter()
            .map(|c| c.added.len() + c.removed.len())
            .sum();
        assert_eq!(
            kept,
            2 * (HISTORY - 1),
            "one in and one out per kept change"
        );
    }

    #[test]
    fn a_stuck_agent_is_behind_with_the_endpoint_it_still_programs() {
        let store = Store::new(Duration::from_secs(60), [Kind::Service]);
        let agents = Agents::default();
        let history = History::default();
        let node = |n: &str| {
            Resource::Node(Node {
                name: n.into(),
                zone: None,
                addresses: vec![],
                pod_cidrs: vec![],
            })
        };
        let v1 = apply(
            &store,
            vec![
                Resource::Service(
                    Service::cluster_ip("default", "web", ip("198.19.0.1")).with_port(
                        "http",
                        Protocol::Tcp,
                        80,
                    ),
                ),
                slice(&["198.18.2.1", "198.18.2.2"]),
                node("node1"),
                node("node2"),
            ],
        );
        history.record(&store);
        let hello = |n: &str| v1::Hello {
            node_name: n.into(),
            ..Default::default()
        };
        let stuck = agents.register(&hello("node1"), RoleLabel::Node);
        stuck.set_version(v1);
        let fine = agents.register(&hello("node2"), RoleLabel::Node);
        // A pod goes away; node2 applies it, node1 never ACKs again.
        let v2 = apply(&store, vec![slice(&["198.18.2.1"])]);
        history.record(&store);
        fine.set_version(v2);

        let svc = ServiceName {
            namespace: "default".into(),
            name: "web".into(),
        };
        let r = report(&store, &agents, &history, &svc, None).unwrap();
        assert_eq!(r.changed_version, v2);
        let n1 = r.nodes.iter().find(|n| n.node == "node1").unwrap();
        assert_eq!(n1.acked_version, Some(v1));
        assert!(n1.behind);
        let stale = n1.stale.as_ref().unwrap();
        assert_eq!(stale.since_version, v2);
        assert_eq!(
            stale.endpoints.as_deref(),
            Some(&["198.18.2.2:8080".to_string()][..])
        );
        // What it should program now: the shared selection's answer.
        assert_eq!(n1.ports[0].cluster, ["198.18.2.1:8080"]);
        let n2 = r.nodes.iter().find(|n| n.node == "node2").unwrap();
        assert!(!n2.behind);
        assert!(n2.stale.is_none());
        assert!(text(&r).contains("still sends traffic to: 198.18.2.2:8080"));
        // One node only, and an unknown service.
        let r = report(&store, &agents, &history, &svc, Some("node2")).unwrap();
        assert_eq!(r.nodes.len(), 1);
        let missing = ServiceName {
            namespace: "default".into(),
            name: "nope".into(),
        };
        assert!(report(&store, &agents, &history, &missing, None).is_none());

        // The slice deleted outright while node2 is stuck at v2: what it still has
        // is the endpoint it held then.
        store.apply(vec![Change::Delete {
            key: meshlite_proto::model::ResourceKey::EndpointSlice {
                namespace: "default".into(),
                name: "web-1".into(),
            },
            cause: Cause::observed_now(None),
        }]);
        let v3 = store.publish();
        history.record(&store);
        let r = report(&store, &agents, &history, &svc, Some("node2")).unwrap();
        let n2 = &r.nodes[0];
        assert!(n2.behind, "{r:?}");
        assert!(n2.ports[0].cluster.is_empty());
        let stale = n2.stale.as_ref().unwrap();
        assert_eq!(stale.since_version, v3);
        assert_eq!(
            stale.endpoints.as_deref(),
            Some(&["198.18.2.1:8080".to_string()][..])
        );
    }

    /// The history reads only what changed since its last call, from the store's
    /// change log: writes in version order, deletions by key.
    #[test]
    fn the_store_tells_what_changed_since_a_version() {
        let store = Store::new(Duration::from_secs(60), [Kind::Service]);
        let v1 = apply(&store, vec![slice(&["198.18.2.1"])]);
        let nothing = store.changed_since(v1).unwrap();
        assert!(nothing.0.is_empty() && nothing.1.is_empty());
        let v2 = apply(&store, vec![slice(&["198.18.2.2"])]);
        let (written, removed) = store.changed_since(v1).unwrap();
        assert_eq!(written.len(), 1);
        assert_eq!(
            (&*written[0].key, written[0].seq),
            ("endpointslice/default/web-1", v2)
        );
        assert!(removed.is_empty());
        store.apply(vec![Change::Delete {
            key: meshlite_proto::model::ResourceKey::EndpointSlice {
                namespace: "default".into(),
                name: "web-1".into(),
            },
            cause: Cause::observed_now(None),
        }]);
        store.publish();
        let (written, removed) = store.changed_since(v1).unwrap();
        assert!(written.is_empty());
        assert_eq!(removed.len(), 1);
        assert_eq!(&*removed[0], "endpointslice/default/web-1");
    }
}
