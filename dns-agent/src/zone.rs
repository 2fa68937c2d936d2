//! The cluster zone: an immutable, in-memory answer table built from a
//! [`Snapshot`], following the Kubernetes DNS-Based Service Discovery specification
//! 1.1.0 (kubernetes/dns `docs/specification.md`) and CoreDNS's `kubernetes` plugin
//! where the specification is silent.
//!
//! The zone is pure data: no sockets, no DNS library types. [`Zone::lookup`] takes
//! the query's labels and type and returns an [`Answer`] that the DNS module turns
//! into a message. A new zone is built per update ([`Zone::update`] rebuilds only the
//! services the update touched) and swapped in whole through a [`ZoneCell`], so a
//! query never sees half an update.
//!
//! Names, relative to the cluster domain:
//!
//! | name | answers |
//! |---|---|
//! | (apex) | SOA, NS |
//! | `dns-version` | TXT `"1.1.0"` |
//! | `svc`, `pod` | NODATA (structural) |
//! | `<ns>.svc` | NODATA when the namespace has a service, else NXDOMAIN |
//! | `<svc>.<ns>.svc` | A/AAAA (cluster IPs or ready endpoints), SRV (all ports), or CNAME |
//! | `<ep>.<svc>.<ns>.svc` | A/AAAA of the endpoint named by hostname or dashed IP |
//! | `_<port>._<proto>.<svc>.<ns>.svc` | SRV |
//! | `<a-b-c-d>.<ns>.pod` | A/AAAA per `--pod-records` |
//!
//! and PTR records under `in-addr.arpa` / `ip6.arpa` for cluster IPs and ready
//! endpoints.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use ipnet::IpNet;
use meshlite_proto::model::{Protocol, ServiceName};
use meshlite_runtime::{ChangeSet, Snapshot};

mod build;
pub mod name;
pub mod wire;

pub use build::{
    IpUse, IpUseKind, ServiceKind, ServiceRecords, ServiceWire, SrvRecord, SrvSet, WireContext,
};

/// The `dns-version` TXT record's value (spec section 2.1).
pub const SPEC_VERSION: &str = "1.1.0";

/// How `<a-b-c-d>.<ns>.pod.<zone>` is answered, as CoreDNS's `pods` option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PodRecords {
    /// No pod records (NXDOMAIN).
    #[default]
    Disabled,
    /// Any well-formed dashed IP answers with that IP, unchecked.
    Insecure,
    /// Only IPs that are endpoint addresses in that namespace.
    Verified,
}

/// Zone-wide settings, fixed for the life of the process.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ZoneConfig {
    /// Lower case, no trailing dot (`cluster.local`).
    pub domain: String,
    pub ttl: u32,
    pub pod_records: PodRecords,
    /// Service and pod CIDRs whose reverse names this server is authoritative for.
    pub reverse_cidrs: Vec<IpNet>,
}

/// The zone at one snapshot version. Cheap to clone (shared maps of `Arc`s).
#[derive(Debug, Clone)]
pub struct Zone {
    config: Arc<ZoneConfig>,
    domain_labels: Arc<[String]>,
    /// Reverse zones of `reverse_cidrs`, labels left to right.
    reverse_zones: Arc<[(IpNet, Vec<String>)]>,
    serial: u32,
    namespaces: HashMap<Arc<str>, Arc<Namespace>>,
    by_ip: HashMap<IpAddr, Arc<[IpUse]>>,
    services: usize,
    records: usize,
    /// The zone's SOA record in wire format, for negative answers.
    soa_wire: Option<Arc<wire::Section>>,
}

#[derive(Debug, Clone, Default)]
struct Namespace {
    services: HashMap<Arc<str>, Arc<ServiceRecords>>,
}

/// A lookup result, free of wire types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub outcome: Outcome,
    pub answers: Vec<Rr>,
    pub additionals: Vec<Rr>,
    /// SOA for the authority section of negative answers.
    pub authority: Option<Rr>,
}

/// What kind of answer this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Records in `answers`.
    Found,
    /// The name exists without the type asked: NOERROR, empty answer, SOA.
    NoData,
    /// NXDOMAIN with SOA.
    NxDomain,
    /// Not ours: forward it upstream.
    NotAuthoritative,
}

/// One resource record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rr {
    pub owner: Owner,
    pub ttl: u32,
    pub data: RData,
}

/// A record's owner name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// The query's own name, spelled as the client spelled it.
    Query,
    /// A name in canonical form (lower case, no trailing dot).
    Name(String),
}

/// Record data the zone produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RData {
    A(std::net::Ipv4Addr),
    Aaaa(std::net::Ipv6Addr),
    Srv {
        priority: u16,
        weight: u16,
        port: u16,
        target: String,
    },
    Ptr(String),
    Cname(String),
    Txt(String),
    Ns(String),
    Soa(Soa),
}

/// The zone's SOA (CoreDNS's shape: `ns.dns.<zone>`, `hostmaster.<zone>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Soa {
    pub mname: String,
    pub rname: String,
    pub serial: u32,
    pub refresh: i32,
    pub retry: i32,
    pub expire: i32,
    pub minimum: u32,
}

/// A lookup answered from data kept in wire format ([`Zone::wire_lookup`]).
#[derive(Debug, Clone, Copy)]
pub enum WireAnswer<'a> {
    /// The A (or, `v6`, AAAA) records of these addresses, owned by the query name.
    /// At least one address of the family.
    Addresses { ips: &'a [IpAddr], v6: bool },
    /// These records.
    Section(&'a wire::Section),
    /// NODATA or NXDOMAIN, with the zone's SOA ([`Zone::soa_wire`]) as authority.
    Negative(Outcome),
}

/// Query types the zone distinguishes; everything else is `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QType {
    A,
    Aaaa,
    Srv,
    Ptr,
    Cname,
    Txt,
    Ns,
    Soa,
    Any,
    Other,
}

/// The zone readers share: swapped whole, read without locks.
#[derive(Debug)]
pub struct ZoneCell {
    zone: ArcSwap<Zone>,
    /// Counts swaps: answers cached for one generation are stale in the next.
    generation: std::sync::atomic::AtomicU64,
}

/// Bounds CNAME chasing inside the zone (ExternalName to ExternalName...).
const MAX_CHASE: usize = 8;

// === impl Zone ===

impl Zone {
    /// An empty zone (before the first snapshot).
    pub fn empty(config: ZoneConfig) -> Self {
        let domain_labels: Arc<[String]> = config
            .domain
            .trim_end_matches('.')
            .split('.')
            .filter(|l| !l.is_empty())
            .map(str::to_ascii_lowercase)
            .collect();
        let reverse_zones: Arc<[(IpNet, Vec<String>)]> = config
            .reverse_cidrs
            .iter()
            .map(|net| (net.trunc(), name::reverse_zone(net)))
            .collect();
        Self {
            config: Arc::new(config),
            domain_labels,
            reverse_zones,
            serial: 0,
            namespaces: HashMap::new(),
            by_ip: HashMap::new(),
            services: 0,
            records: 0,
            soa_wire: None,
        }
        .with_serial(0)
    }

    /// Sets the serial and the SOA record that carries it.
    fn with_serial(mut self, serial: u32) -> Self {
        self.serial = serial;
        let soa = self.soa_rr(self.domain());
        if let RData::Soa(data) = &soa.data {
            // The configured domain is a DNS name (checked with the configuration); a
            // zone without an encodable SOA answers negatives on the general path.
            self.soa_wire = wire::soa_section(self.domain(), data, soa.ttl).map(Arc::new);
        }
        self
    }

    fn wire_context(&self) -> WireContext<'_> {
        WireContext {
            domain: &self.config.domain,
            ttl: self.config.ttl,
        }
    }

    /// Builds the whole zone from a snapshot.
    pub fn build(config: ZoneConfig, snapshot: &Snapshot) -> Self {
        let mut zone = Self::empty(config);
        for svc in snapshot.services() {
            let name = svc.service_name();
            let records =
                ServiceRecords::build(svc, snapshot.slices_for(&name), zone.wire_context());
            zone.insert(records);
        }
        zone.with_serial(serial(snapshot))
    }

    /// The zone after an update: rebuilds only the services `changes` names (or
    /// everything for a full snapshot). `self` is left untouched for readers.
    pub fn update(&self, snapshot: &Snapshot, changes: &ChangeSet) -> Self {
        if changes.full {
            return Self::build((*self.config).clone(), snapshot);
        }
        let mut next = self.clone();
        for name in &changes.services {
            next.remove(name);
            if let Some(svc) = snapshot.service(name) {
                let records =
                    ServiceRecords::build(svc, snapshot.slices_for(name), next.wire_context());
                next.insert(records);
            }
        }
        next.with_serial(serial(snapshot))
    }

    pub fn config(&self) -> &ZoneConfig {
        &self.config
    }

    /// SOA serial: the snapshot version (truncated).
    pub fn serial(&self) -> u32 {
        self.serial
    }

    /// Number of services in the zone.
    pub fn service_count(&self) -> usize {
        self.services
    }

    /// Number of records served (forward and PTR, excluding SOA/NS/TXT).
    pub fn record_count(&self) -> usize {
        self.records
    }

    /// Every service's records (unordered): for exports such as the benchmark's
    /// zone file.
    pub fn all_services(&self) -> impl Iterator<Item = &Arc<ServiceRecords>> {
        self.namespaces.values().flat_map(|n| n.services.values())
    }

    /// The records of one service.
    pub fn service(&self, namespace: &str, name: &str) -> Option<&Arc<ServiceRecords>> {
        self.namespaces.get(namespace)?.services.get(name)
    }

    /// Whether a name (labels left to right, any case) is inside the cluster zone or
    /// a configured reverse zone: such names are never forwarded.
    pub fn is_authoritative_for(&self, labels: &[String]) -> bool {
        self.relative(labels).is_some() || self.reverse_zone_of(labels).is_some()
    }

    fn insert(&mut self, records: ServiceRecords) {
        let records = Arc::new(records);
        for (ip, kind) in &records.ip_uses {
            let entry = IpUse {
                namespace: records.namespace.clone(),
                service: records.name.clone(),
                kind: kind.clone(),
            };
            let uses = self.by_ip.entry(*ip).or_insert_with(|| Arc::from([]));
            let mut v: Vec<IpUse> = uses.to_vec();
            v.push(entry);
            // Deterministic PTR order whatever the update order: by namespace, name.
            v.sort_by(|a, b| (&a.namespace, &a.service).cmp(&(&b.namespace, &b.service)));
            *uses = v.into();
        }
        self.records += records.record_count;
        self.services += 1;
        let ns = self
            .namespaces
            .entry(records.namespace.clone())
            .or_default();
        Arc::make_mut(ns)
            .services
            .insert(records.name.clone(), records);
    }

    fn remove(&mut self, name: &ServiceName) {
        let namespace = name.namespace.to_ascii_lowercase();
        let svc = name.name.to_ascii_lowercase();
        let Some(ns) = self.namespaces.get_mut(namespace.as_str()) else {
            return;
        };
        let Some(old) = Arc::make_mut(ns).services.remove(svc.as_str()) else {
            return;
        };
        if ns.services.is_empty() {
            self.namespaces.remove(namespace.as_str());
        }
        self.records -= old.record_count;
        self.services -= 1;
        for (ip, _) in &old.ip_uses {
            let Some(uses) = self.by_ip.get_mut(ip) else {
                continue;
            };
            if !uses
                .iter()
                .any(|u| *u.namespace == *namespace && *u.service == *svc)
            {
                continue;
            }
            let kept: Vec<IpUse> = uses
                .iter()
                .filter(|u| !(*u.namespace == *namespace && *u.service == *svc))
                .cloned()
                .collect();
            if kept.is_empty() {
                self.by_ip.remove(ip);
            } else {
                *uses = kept.into();
            }
        }
    }

    /// The zone's SOA record in wire format (owner the zone apex), for the
    /// authority section of [`WireAnswer::Negative`]. `None` when the domain is not
    /// encodable (then [`wire_lookup`](Self::wire_lookup) answers nothing).
    pub fn soa_wire(&self) -> Option<&wire::Section> {
        self.soa_wire.as_deref()
    }

    /// The answer to the common cluster queries from data kept in wire format:
    /// A/AAAA/SRV and negatives at service names, endpoint names and
    /// `_<port>._<proto>` names, and `<ns>.svc`. `labels`: the query name's labels
    /// left to right, lower case. `None`: not one of those (or `ANY`), ask
    /// [`lookup`](Self::lookup). Gives the same records as `lookup`.
    pub fn wire_lookup<'a>(&'a self, labels: &[&str], qtype: QType) -> Option<WireAnswer<'a>> {
        use Outcome::{NoData, NxDomain};
        let negative = |o| Some(WireAnswer::Negative(o));
        let addresses = |ips: &'a [IpAddr], v6: bool| {
            if ips.iter().any(|ip| ip.is_ipv6() == v6) {
                Some(WireAnswer::Addresses { ips, v6 })
            } else {
                negative(NoData)
            }
        };
        if self.soa_wire.is_none() || qtype == QType::Any {
            return None;
        }
        match self.relative(labels)? {
            [ns, "svc"] => {
                if self.namespaces.contains_key(*ns) {
                    negative(NoData)
                } else {
                    negative(NxDomain)
                }
            }
            [svc, ns, "svc"] => match self.service(ns, svc) {
                Some(s) if s.exists() => match (&s.kind, qtype) {
                    (ServiceKind::ExternalName(_), _) => None,
                    (_, QType::A) => addresses(&s.addresses, false),
                    (_, QType::Aaaa) => addresses(&s.addresses, true),
                    (_, QType::Srv) if !s.srv.is_empty() => {
                        Some(WireAnswer::Section(&s.wire.srv_all))
                    }
                    _ => negative(NoData),
                },
                _ => negative(NxDomain),
            },
            [first, svc, ns, "svc"] => match self.service(ns, svc) {
                Some(_) if first.starts_with('_') => None,
                Some(s) if s.exists() => match (s.endpoints.get(*first), qtype) {
                    (None, _) => negative(NxDomain),
                    (Some(ips), QType::A) => addresses(ips, false),
                    (Some(ips), QType::Aaaa) => addresses(ips, true),
                    (Some(_), _) => negative(NoData),
                },
                _ => negative(NxDomain),
            },
            [port, proto, svc, ns, "svc"] => {
                match (
                    port.strip_prefix('_'),
                    proto.strip_prefix('_'),
                    self.service(ns, svc),
                ) {
                    (Some(port), Some(proto), Some(s)) if s.exists() && !port.is_empty() => {
                        let set = s
                            .srv
                            .iter()
                            .position(|set| set.port_name == port && proto_is(set.protocol, proto));
                        match (set.and_then(|i| s.wire.srv.get(i)), qtype) {
                            (None, _) => negative(NxDomain),
                            (Some(section), QType::Srv) => Some(WireAnswer::Section(section)),
                            (Some(_), _) => negative(NoData),
                        }
                    }
                    _ => negative(NxDomain),
                }
            }
            _ => None,
        }
    }

    /// Answers a query. `labels` are the query name's labels left to right, lower
    /// case (the DNS module lower-cases them once).
    pub fn lookup(&self, labels: &[String], qtype: QType) -> Answer {
        if let Some(rel) = self.relative(labels) {
            return self.lookup_cluster(rel, qtype, 0);
        }
        if let Some((family, rest)) = name::reverse_parts(labels) {
            return self.lookup_reverse(labels, family, rest, qtype);
        }
        Answer::not_authoritative()
    }

    /// The labels in front of the cluster domain, if the name is inside it.
    fn relative<'a, S: AsRef<str>>(&self, labels: &'a [S]) -> Option<&'a [S]> {
        let d = self.domain_labels.len();
        if labels.len() < d {
            return None;
        }
        let (rel, suffix) = labels.split_at(labels.len() - d);
        suffix
            .iter()
            .zip(self.domain_labels.iter())
            .all(|(a, b)| a.as_ref() == b)
            .then_some(rel)
    }

    fn reverse_zone_of(&self, labels: &[String]) -> Option<&[String]> {
        self.reverse_zones
            .iter()
            .map(|(_, z)| z.as_slice())
            .filter(|z| labels.len() >= z.len() && labels[labels.len() - z.len()..] == **z)
            .max_by_key(|z| z.len())
    }

    fn domain(&self) -> &str {
        &self.config.domain
    }

    fn fqdn(&self, rel: &[&str]) -> String {
        let mut s = String::with_capacity(64);
        for l in rel {
            s.push_str(l);
            s.push('.');
        }
        s.push_str(self.domain());
        s
    }

    fn soa_rr(&self, owner: &str) -> Rr {
        Rr {
            owner: Owner::Name(owner.to_string()),
            ttl: self.config.ttl,
            data: RData::Soa(Soa {
                mname: format!("ns.dns.{}", self.domain()),
                rname: format!("hostmaster.{}", self.domain()),
                serial: self.serial,
                refresh: 7200,
                retry: 1800,
                expire: 86400,
                minimum: self.config.ttl,
            }),
        }
    }

    fn negative(&self, outcome: Outcome) -> Answer {
        Answer {
            outcome,
            answers: Vec::new(),
            additionals: Vec::new(),
            authority: Some(self.soa_rr(self.domain())),
        }
    }

    fn found(&self, answers: Vec<Rr>, additionals: Vec<Rr>) -> Answer {
        if answers.is_empty() {
            return self.negative(Outcome::NoData);
        }
        Answer {
            outcome: Outcome::Found,
            answers,
            additionals,
            authority: None,
        }
    }

    fn rr(&self, owner: Owner, data: RData) -> Rr {
        Rr {
            owner,
            ttl: self.config.ttl,
            data,
        }
    }

    fn address_rrs(&self, owner: &Owner, ips: &[IpAddr], qtype: QType, out: &mut Vec<Rr>) {
        for ip in ips {
            match (ip, qtype) {
                (IpAddr::V4(v4), QType::A | QType::Any) => {
                    out.push(self.rr(owner.clone(), RData::A(*v4)));
                }
                (IpAddr::V6(v6), QType::Aaaa | QType::Any) => {
                    out.push(self.rr(owner.clone(), RData::Aaaa(*v6)));
                }
                _ => {}
            }
        }
    }

    fn lookup_cluster(&self, rel: &[String], qtype: QType, depth: usize) -> Answer {
        let r: Vec<&str> = rel.iter().map(String::as_str).collect();
        match r.as_slice() {
            [] => {
                let mut answers = Vec::new();
                if matches!(qtype, QType::Soa | QType::Any) {
                    answers.push(self.soa_rr(self.domain()));
                    answers[0].owner = Owner::Query;
                }
                if matches!(qtype, QType::Ns | QType::Any) {
                    answers.push(
                        self.rr(Owner::Query, RData::Ns(format!("ns.dns.{}", self.domain()))),
                    );
                }
                self.found(answers, Vec::new())
            }
            ["dns-version"] => {
                let answers = if matches!(qtype, QType::Txt | QType::Any) {
                    vec![self.rr(Owner::Query, RData::Txt(SPEC_VERSION.to_string()))]
                } else {
                    Vec::new()
                };
                self.found(answers, Vec::new())
            }
            ["svc"] | ["pod"] => self.negative(Outcome::NoData),
            [ns, "svc"] => {
                if self.namespaces.contains_key(*ns) {
                    self.negative(Outcome::NoData)
                } else {
                    self.negative(Outcome::NxDomain)
                }
            }
            [svc, ns, "svc"] => match self.service(ns, svc) {
                Some(s) if s.exists() => self.lookup_service(s, qtype, depth),
                _ => self.negative(Outcome::NxDomain),
            },
            [first, svc, ns, "svc"] => match self.service(ns, svc) {
                Some(s) if s.exists() => {
                    if let Some(proto) = first.strip_prefix('_') {
                        // `_<proto>.<svc>...`: an empty non-terminal above SRV names.
                        if s.srv
                            .iter()
                            .any(|set| !set.port_name.is_empty() && proto_is(set.protocol, proto))
                        {
                            self.negative(Outcome::NoData)
                        } else {
                            self.negative(Outcome::NxDomain)
                        }
                    } else {
                        self.lookup_endpoint(s, first, qtype)
                    }
                }
                _ => self.negative(Outcome::NxDomain),
            },
            [port, proto, svc, ns, "svc"] => {
                match (
                    port.strip_prefix('_'),
                    proto.strip_prefix('_'),
                    self.service(ns, svc),
                ) {
                    (Some(port), Some(proto), Some(s)) if s.exists() && !port.is_empty() => {
                        let sets: Vec<&SrvSet> = s
                            .srv
                            .iter()
                            .filter(|set| set.port_name == port && proto_is(set.protocol, proto))
                            .collect();
                        if sets.is_empty() {
                            self.negative(Outcome::NxDomain)
                        } else if matches!(qtype, QType::Srv | QType::Any) {
                            self.srv_answer(s, &sets)
                        } else {
                            self.negative(Outcome::NoData)
                        }
                    }
                    _ => self.negative(Outcome::NxDomain),
                }
            }
            [_ns, "pod"] => {
                if self.config.pod_records == PodRecords::Disabled {
                    self.negative(Outcome::NxDomain)
                } else {
                    self.negative(Outcome::NoData)
                }
            }
            [pod, ns, "pod"] => self.lookup_pod(ns, pod, qtype),
            _ => self.negative(Outcome::NxDomain),
        }
    }

    fn lookup_service(&self, s: &ServiceRecords, qtype: QType, depth: usize) -> Answer {
        match &s.kind {
            ServiceKind::ExternalName(target) => {
                let mut answers = vec![self.rr(Owner::Query, RData::Cname(target.clone()))];
                let mut additionals = Vec::new();
                if qtype != QType::Cname && depth < MAX_CHASE {
                    // Chase targets inside the cluster zone (RFC 1034 4.3.2 step 3a);
                    // clients resolve targets outside it themselves.
                    let labels: Vec<String> = target.split('.').map(str::to_string).collect();
                    if let Some(rel) = self.relative(&labels) {
                        let mut next = self.lookup_cluster(rel, qtype, depth + 1);
                        for rr in &mut next.answers {
                            if rr.owner == Owner::Query {
                                rr.owner = Owner::Name(target.clone());
                            }
                        }
                        answers.append(&mut next.answers);
                        additionals.append(&mut next.additionals);
                    }
                }
                Answer {
                    outcome: Outcome::Found,
                    answers,
                    additionals,
                    authority: None,
                }
            }
            ServiceKind::ClusterIp | ServiceKind::Headless => {
                let mut answers = Vec::new();
                self.address_rrs(&Owner::Query, &s.addresses, qtype, &mut answers);
                if matches!(qtype, QType::Srv) {
                    // CoreDNS: SRV on the bare service name lists every port.
                    let sets: Vec<&SrvSet> = s.srv.iter().collect();
                    if !sets.is_empty() {
                        return self.srv_answer(s, &sets);
                    }
                }
                self.found(answers, Vec::new())
            }
        }
    }

    fn lookup_endpoint(&self, s: &ServiceRecords, label: &str, qtype: QType) -> Answer {
        match s.endpoints.get(label) {
            Some(ips) => {
                let mut answers = Vec::new();
                self.address_rrs(&Owner::Query, ips, qtype, &mut answers);
                self.found(answers, Vec::new())
            }
            None => self.negative(Outcome::NxDomain),
        }
    }

    fn srv_answer(&self, s: &ServiceRecords, sets: &[&SrvSet]) -> Answer {
        let n: usize = sets.iter().map(|set| set.records.len()).sum();
        // CoreDNS: priority 0, weight floor(100 / number of records).
        let weight = u16::try_from(100 / n.max(1)).unwrap_or(0);
        let svc_name = self.fqdn(&[&s.name, &s.namespace, "svc"]);
        let mut answers = Vec::with_capacity(n);
        let mut additionals = Vec::new();
        let mut added: Vec<&str> = Vec::new();
        for set in sets {
            for rec in &set.records {
                let target = match &rec.endpoint {
                    None => svc_name.clone(),
                    Some(label) => self.fqdn(&[label, &s.name, &s.namespace, "svc"]),
                };
                answers.push(self.rr(
                    Owner::Query,
                    RData::Srv {
                        priority: 0,
                        weight,
                        port: rec.port,
                        target: target.clone(),
                    },
                ));
                // The additional section carries each target's addresses once.
                let key = rec.endpoint.as_deref().unwrap_or("");
                if added.contains(&key) {
                    continue;
                }
                added.push(key);
                let ips: &[IpAddr] = match &rec.endpoint {
                    None => &s.addresses,
                    Some(label) => s.endpoints.get(label).map(Vec::as_slice).unwrap_or(&[]),
                };
                self.address_rrs(&Owner::Name(target), ips, QType::Any, &mut additionals);
            }
        }
        self.found(answers, additionals)
    }

    fn lookup_pod(&self, ns: &str, label: &str, qtype: QType) -> Answer {
        let Some(ip) = name::undash(label) else {
            return self.negative(Outcome::NxDomain);
        };
        let known = match self.config.pod_records {
            PodRecords::Disabled => false,
            PodRecords::Insecure => true,
            PodRecords::Verified => self.by_ip.get(&ip).is_some_and(|uses| {
                uses.iter()
                    .any(|u| &*u.namespace == ns && matches!(u.kind, IpUseKind::Endpoint { .. }))
            }),
        };
        if !known {
            return self.negative(Outcome::NxDomain);
        }
        let mut answers = Vec::new();
        self.address_rrs(&Owner::Query, &[ip], qtype, &mut answers);
        self.found(answers, Vec::new())
    }

    fn lookup_reverse(
        &self,
        labels: &[String],
        family: name::Family,
        rest: &[String],
        qtype: QType,
    ) -> Answer {
        let zone = self.reverse_zone_of(labels);
        let Some(ip) = name::parse_reverse(family, rest) else {
            // A partial reverse name: ours only inside a configured reverse zone,
            // where every prefix may hold addresses.
            return match zone {
                Some(z) if z.len() == labels.len() && matches!(qtype, QType::Soa) => {
                    let mut soa = self.soa_rr(&z.join("."));
                    soa.owner = Owner::Query;
                    self.found(vec![soa], Vec::new())
                }
                Some(z) => self.reverse_negative(z, Outcome::NoData),
                None => Answer::not_authoritative(),
            };
        };
        let targets = self.ptr_targets(ip);
        if targets.is_empty() {
            return match zone {
                Some(z) => self.reverse_negative(z, Outcome::NxDomain),
                None => Answer::not_authoritative(),
            };
        }
        if !matches!(qtype, QType::Ptr | QType::Any) {
            // Outside the configured CIDRs the SOA names the reverse tree itself.
            let z = zone.map_or_else(|| labels[labels.len() - 2..].join("."), |z| z.join("."));
            return Answer {
                outcome: Outcome::NoData,
                answers: Vec::new(),
                additionals: Vec::new(),
                authority: Some(self.soa_rr(&z)),
            };
        }
        let answers = targets
            .into_iter()
            .map(|t| self.rr(Owner::Query, RData::Ptr(t)))
            .collect();
        self.found(answers, Vec::new())
    }

    fn reverse_negative(&self, zone: &[String], outcome: Outcome) -> Answer {
        Answer {
            outcome,
            answers: Vec::new(),
            additionals: Vec::new(),
            authority: Some(self.soa_rr(&zone.join("."))),
        }
    }

    /// PTR targets for an address: the service whose cluster IP it is; otherwise one
    /// per service endpoint that publishes it (CoreDNS `serviceRecordForIP`).
    fn ptr_targets(&self, ip: IpAddr) -> Vec<String> {
        let Some(uses) = self.by_ip.get(&ip) else {
            return Vec::new();
        };
        if let Some(u) = uses.iter().find(|u| u.kind == IpUseKind::ClusterIp) {
            return vec![self.fqdn(&[&u.service, &u.namespace, "svc"])];
        }
        let mut out: Vec<String> = uses
            .iter()
            .filter_map(|u| match &u.kind {
                IpUseKind::Endpoint {
                    label,
                    published: true,
                } => Some(self.fqdn(&[label, &u.service, &u.namespace, "svc"])),
                _ => None,
            })
            .collect();
        out.dedup();
        out
    }
}

fn serial(snapshot: &Snapshot) -> u32 {
    // The SOA serial only has to change when the zone does; the low 32 bits of the
    // version do (RFC 1982 arithmetic copes with the wrap).
    (snapshot.version() & u64::from(u32::MAX)) as u32
}

fn proto_is(p: Protocol, label: &str) -> bool {
    p.as_lower().eq_ignore_ascii_case(label)
}

// === impl Answer ===

impl Answer {
    fn not_authoritative() -> Self {
        Self {
            outcome: Outcome::NotAuthoritative,
            answers: Vec::new(),
            additionals: Vec::new(),
            authority: None,
        }
    }
}

// === impl ZoneCell ===

impl ZoneCell {
    pub fn new(zone: Zone) -> Self {
        Self {
            zone: ArcSwap::from_pointee(zone),
            generation: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The current zone; holds it alive while the caller uses it.
    pub fn load(&self) -> Arc<Zone> {
        self.zone.load_full()
    }

    /// Swaps in a new zone atomically: later loads see all of it, earlier ones none.
    pub fn store(&self, zone: Arc<Zone>) {
        self.zone.store(zone);
        // After the swap: whoever reads the new generation then loads the new zone.
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// How many zones were swapped in so far. Read it before [`load`](Self::load):
    /// an answer computed after reading generation `g` is from zone `g` or later.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests;
