//! Per-service records, built from one Service and its EndpointSlices.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use meshlite_proto::model::{EndpointSlice, Protocol, Service, ServiceType};

use super::name::dashed;
use super::wire::{Part, Section, SectionWriter, WireOwner};

/// What a service's name answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceKind {
    /// A/AAAA of the cluster IPs.
    ClusterIp,
    /// A/AAAA of each ready endpoint; the name does not exist without one.
    Headless,
    /// CNAME to this name (lower case, no trailing dot).
    ExternalName(String),
}

/// One SRV record: `_<port>._<proto>.<svc>...  SRV 0 <w> <port> <target>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SrvRecord {
    pub port: u16,
    /// `None`: the service name itself (ClusterIP); `Some(label)`: the endpoint
    /// `<label>.<svc>.<ns>.svc.<zone>` (headless).
    pub endpoint: Option<Arc<str>>,
}

/// The SRV records under one `_<port>._<proto>` pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrvSet {
    /// Port name, lower case. Empty for an unnamed port: such a set only answers SRV
    /// queries on the service name itself, as CoreDNS does.
    pub port_name: String,
    pub protocol: Protocol,
    pub records: Vec<SrvRecord>,
}

/// How a service uses an address, for PTR records and verified pod records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpUseKind {
    ClusterIp,
    Endpoint {
        /// The endpoint's label under the service (hostname or dashed IP).
        label: Arc<str>,
        /// Included in the service's records (ready, or publishNotReadyAddresses).
        published: bool,
    },
}

/// One use of an address by a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpUse {
    pub namespace: Arc<str>,
    pub service: Arc<str>,
    pub kind: IpUseKind,
}

/// Everything under `<svc>.<ns>.svc.<zone>`, immutable once built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRecords {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub kind: ServiceKind,
    /// A/AAAA at the service name: cluster IPs, or the published endpoints' IPs for
    /// headless services, de-duplicated, in a stable order.
    pub addresses: Vec<IpAddr>,
    /// Endpoint label -> addresses (`<label>.<svc>.<ns>.svc.<zone>`).
    pub endpoints: HashMap<Arc<str>, Vec<IpAddr>>,
    /// SRV sets, ordered by port name and protocol.
    pub srv: Vec<SrvSet>,
    /// Every address this service uses, for the reverse index.
    pub ip_uses: Vec<(IpAddr, IpUseKind)>,
    /// Number of records this service contributes (forward and PTR).
    pub record_count: usize,
    /// The SRV answers in wire format, built with the records.
    pub wire: ServiceWire,
}

/// A service's SRV answers in wire format (see [`super::wire`]), so answering SRV
/// copies bytes. Addresses need no names and are written from
/// [`ServiceRecords::addresses`] and [`ServiceRecords::endpoints`] directly.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceWire {
    /// SRV at the bare service name: every port (CoreDNS).
    pub srv_all: Arc<Section>,
    /// SRV at `_<port>._<proto>.<svc>...`, one per [`ServiceRecords::srv`] set.
    pub srv: Vec<Arc<Section>>,
}

/// What the wire answers need from the zone's settings.
#[derive(Debug, Clone, Copy)]
pub struct WireContext<'a> {
    /// Lower case, no trailing dot.
    pub domain: &'a str,
    pub ttl: u32,
}

// === impl ServiceRecords ===

impl ServiceRecords {
    /// Builds the records of one service from its slices (spec 1.1.0 sections 2.3-2.5,
    /// CoreDNS where the spec is silent).
    pub fn build<'a>(
        svc: &Service,
        slices: impl IntoIterator<Item = &'a Arc<EndpointSlice>>,
        ctx: WireContext<'_>,
    ) -> Self {
        let namespace: Arc<str> = svc.namespace.to_ascii_lowercase().into();
        let name: Arc<str> = svc.name.to_ascii_lowercase().into();
        let kind = if svc.kind == ServiceType::ExternalName {
            match svc.external_name.as_deref() {
                // CoreDNS answers nothing for an ExternalName that is an IP address.
                Some(target) if !target.is_empty() && target.parse::<IpAddr>().is_err() => {
                    ServiceKind::ExternalName(target.trim_end_matches('.').to_ascii_lowercase())
                }
                _ => ServiceKind::ExternalName(String::new()),
            }
        } else if svc.headless || svc.cluster_ips.is_empty() {
            ServiceKind::Headless
        } else {
            ServiceKind::ClusterIp
        };

        let mut records = Self {
            namespace,
            name,
            kind,
            addresses: Vec::new(),
            endpoints: HashMap::new(),
            srv: Vec::new(),
            ip_uses: Vec::new(),
            record_count: 0,
            wire: ServiceWire::default(),
        };
        if matches!(records.kind, ServiceKind::ExternalName(_)) {
            // ExternalName services have no endpoints and no ports in DNS.
            records.record_count = usize::from(records.exists());
            return records;
        }

        // Endpoints: published ones get names; every address is indexed for pods.
        let mut srv_sets: BTreeMap<(String, Protocol), Vec<SrvRecord>> = BTreeMap::new();
        let headless = records.kind == ServiceKind::Headless;
        for slice in slices {
            for ep in &slice.endpoints {
                let published = ep.ready || svc.publish_not_ready_addresses;
                for ip in &ep.addresses {
                    let label: Arc<str> = match &ep.hostname {
                        Some(h) if !h.is_empty() => h.to_ascii_lowercase().into(),
                        _ => dashed(*ip).into(),
                    };
                    records.ip_uses.push((
                        *ip,
                        IpUseKind::Endpoint {
                            label: label.clone(),
                            published,
                        },
                    ));
                    if !published {
                        continue;
                    }
                    let ips = records.endpoints.entry(label.clone()).or_default();
                    if !ips.contains(ip) {
                        ips.push(*ip);
                    }
                    if headless {
                        if !records.addresses.contains(ip) {
                            records.addresses.push(*ip);
                        }
                        for p in &slice.ports {
                            srv_sets
                                .entry((p.name.to_ascii_lowercase(), p.protocol))
                                .or_default()
                                .push(SrvRecord {
                                    port: p.port,
                                    endpoint: Some(label.clone()),
                                });
                        }
                    }
                }
            }
        }
        if !headless {
            for ip in &svc.cluster_ips {
                if !records.addresses.contains(ip) {
                    records.addresses.push(*ip);
                }
                records.ip_uses.push((*ip, IpUseKind::ClusterIp));
            }
            for p in &svc.ports {
                srv_sets
                    .entry((p.name.to_ascii_lowercase(), p.protocol))
                    .or_default()
                    .push(SrvRecord {
                        port: p.port,
                        endpoint: None,
                    });
            }
        }
        records.srv = srv_sets
            .into_iter()
            .map(|((port_name, protocol), mut recs)| {
                recs.sort();
                recs.dedup();
                SrvSet {
                    port_name,
                    protocol,
                    records: recs,
                }
            })
            .collect();

        records.record_count = if records.exists() {
            records.addresses.len()
                + records.endpoints.values().map(Vec::len).sum::<usize>()
                + records.srv.iter().map(|s| s.records.len()).sum::<usize>()
                + records
                    .ip_uses
                    .iter()
                    .filter(|(_, k)| {
                        matches!(
                            k,
                            IpUseKind::ClusterIp
                                | IpUseKind::Endpoint {
                                    published: true,
                                    ..
                                }
                        )
                    })
                    .count()
        } else {
            0
        };
        if records.exists() && !records.srv.is_empty() {
            let all: Vec<&SrvSet> = records.srv.iter().collect();
            let srv: Vec<Arc<Section>> = records
                .srv
                .iter()
                .map(|set| Arc::new(records.srv_section(&[set], ctx)))
                .collect();
            // One set: the bare name's answer is the same bytes (pointers are relative).
            let srv_all = match srv.as_slice() {
                [only] => only.clone(),
                _ => Arc::new(records.srv_section(&all, ctx)),
            };
            records.wire = ServiceWire { srv_all, srv };
        }
        records
    }

    /// The SRV answer for `sets`, as [`Zone::lookup`](super::Zone::lookup) answers it:
    /// one SRV per record (priority 0, CoreDNS's weight), then each target's
    /// addresses once in the additional section.
    fn srv_section(&self, sets: &[&SrvSet], ctx: WireContext<'_>) -> Section {
        let n: usize = sets.iter().map(|set| set.records.len()).sum();
        let weight = u16::try_from(100 / n.max(1)).unwrap_or(0);
        let svc_name = format!("{}.{}.svc.{}", self.name, self.namespace, ctx.domain);
        let ips = |key: Option<&Arc<str>>| -> &[IpAddr] {
            match key {
                None => &self.addresses,
                Some(label) => self.endpoints.get(label).map_or(&[], Vec::as_slice),
            }
        };
        // Room for the usual answer: per record an SRV with a target of a label plus
        // the service name, and one address (16 bytes or less) in the additionals.
        let mut w = SectionWriter::with_capacity(n * (20 + 20 + svc_name.len() + 28));
        // Where each target was first written: its addresses' owner points there.
        let mut targets: Vec<(Option<&Arc<str>>, u16)> = Vec::with_capacity(n);
        for set in sets {
            for rec in &set.records {
                let key = rec.endpoint.as_ref();
                let target = match key {
                    None => [svc_name.as_str(), ""],
                    Some(label) => [label.as_ref(), svc_name.as_str()],
                };
                let at = w.srv(WireOwner::Query, ctx.ttl, (0, weight, rec.port), &target);
                if let Some(at) = at
                    && !targets.iter().any(|(k, _)| *k == key)
                {
                    targets.push((key, at));
                }
            }
        }
        for (key, at) in targets {
            for ip in ips(key) {
                w.address(Part::Additional, WireOwner::At(at), ctx.ttl, *ip);
            }
        }
        w.finish()
    }

    /// Whether `<svc>.<ns>.svc.<zone>` exists: a headless service without a published
    /// endpoint does not (spec 2.4.1: "no ready endpoints -> NXDOMAIN"), nor does an
    /// ExternalName service without a usable target.
    pub fn exists(&self) -> bool {
        match &self.kind {
            ServiceKind::ClusterIp => true,
            ServiceKind::Headless => !self.addresses.is_empty(),
            ServiceKind::ExternalName(target) => !target.is_empty(),
        }
    }
}
