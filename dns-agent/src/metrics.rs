//! The DNS agent's Prometheus metrics. Where CoreDNS has a metric for what the agent
//! does, the agent exports it under CoreDNS's name, labels and buckets, so CoreDNS's
//! dashboards and alerts keep working after the swap:
//!
//! - `coredns_dns_*` (CoreDNS `plugin/metrics/vars`), with the constant labels
//!   `server` (`dns://:53`), `zone` (`.`: one server block answers every name, as in
//!   the default Corefile) and `view` (empty);
//! - `coredns_cache_*` (`plugin/cache`, labels `server`, `zones`, `view`);
//! - `coredns_forward_*` (`plugin/forward` in older CoreDNS releases) and
//!   `coredns_proxy_request_duration_seconds` (where current CoreDNS moved them),
//!   labelled `to`;
//! - `coredns_kubernetes_dns_programming_duration_seconds{service_kind}`;
//! - `coredns_build_info`, `coredns_panics_total`.
//!
//! What CoreDNS has no name for stays under `meshlite_dns_`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

mod sharded;

pub use sharded::{ShardedCounter, ShardedHistogram, enter_worker_shard};

/// Query type label: the types CoreDNS counts by name (`plugin/metrics/vars`
/// `monitorType`); every other type is `other`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(clippy::upper_case_acronyms, non_camel_case_types)]
pub enum QueryType {
    A,
    AAAA,
    CNAME,
    DNSKEY,
    DS,
    MX,
    NSEC3,
    NSEC,
    NS,
    PTR,
    RRSIG,
    SOA,
    SRV,
    TXT,
    HTTPS,
    SVCB,
    IXFR,
    AXFR,
    ANY,
    other,
}

/// Response code label, spelled as CoreDNS spells it.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(clippy::upper_case_acronyms)]
pub enum Rcode {
    NOERROR,
    FORMERR,
    SERVFAIL,
    NXDOMAIN,
    NOTIMP,
    REFUSED,
    BADVERS,
    OTHER,
}

/// Who answered; CoreDNS's `plugin` label on `coredns_dns_responses_total`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Source {
    /// The cluster zone (`kubernetes`).
    Zone,
    /// The forwarding cache (`cache`).
    Cache,
    /// An upstream resolver (`forward`).
    Upstream,
    /// Rejected before any lookup (malformed, unsupported): the server itself, an
    /// empty `plugin` as in CoreDNS.
    Error,
}

/// Transport (`proto`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Transport {
    udp,
    tcp,
}

/// Address family of the client (`family`: `1` IPv4, `2` IPv6, as CoreDNS).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Family4or6 {
    V4,
    V6,
}

/// Outcome of one upstream request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardResult {
    /// The upstream answered with this code.
    Response(Rcode),
    /// No answer in time.
    Timeout,
    /// No answer (connection refused, I/O error).
    Error,
}

/// Why a UDP datagram got no answer before any parsing (hickory's
/// `sanitize_src_address`: answering would reflect traffic at a port or address
/// nobody can own).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Refusal {
    /// Source port 0.
    port_zero,
    /// Source 0.0.0.0 or `::`.
    unspecified,
    /// Source 255.255.255.255.
    broadcast,
}

/// A forwarding cache entry's kind (CoreDNS's `type` on cache metrics).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum CacheType {
    /// A positive answer.
    success,
    /// NXDOMAIN or NODATA.
    denial,
}

/// `service_kind` of `coredns_kubernetes_dns_programming_duration_seconds`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ServiceKind {
    cluster_ip,
    headless_with_selector,
    headless_without_selector,
}

/// What one request's metrics record.
#[derive(Clone, Copy, Debug)]
pub struct Answered {
    pub qtype: QueryType,
    pub rcode: Rcode,
    pub source: Source,
    pub elapsed: Duration,
    pub transport: Transport,
    pub family: Family4or6,
    /// Size of the request message.
    pub request_bytes: usize,
    /// Encoded size of the response, when known here (else the transport reports it
    /// through [`Metrics::response_size`]).
    pub response_bytes: Option<usize>,
    pub truncated: bool,
}

/// Values of the constant labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// CoreDNS's `server`: `dns://:53` for the wildcard address, else `dns://ip:port`.
    pub server: String,
    /// CoreDNS's `to` on forward metrics: the upstreams, comma separated (hickory's
    /// pool does not report which one answered).
    pub upstreams: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    proto: Transport,
    family: Family4or6,
    r#type: QueryType,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResponseLabels {
    rcode: Rcode,
    plugin: Source,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtoLabels {
    proto: Transport,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    r#type: CacheType,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RcodeLabels {
    rcode: Rcode,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProxyLabels {
    proxy_name: &'static str,
    rcode: Rcode,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceKindLabels {
    service_kind: ServiceKind,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: Refusal,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    reason: ForwardFailure,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum ForwardFailure {
    timeout,
    error,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabels {
    worker: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    revision: &'static str,
    goversion: &'static str,
}

/// Every metric of the agent. Register once per process.
#[derive(Debug)]
pub struct Metrics {
    // Recorded per request by every UDP worker: sharded (see `sharded`).
    requests: Family<RequestLabels, ShardedCounter>,
    responses: Family<ResponseLabels, ShardedCounter>,
    duration: ShardedHistogram,
    request_size: Family<ProtoLabels, ShardedHistogram>,
    response_size: Family<ProtoLabels, ShardedHistogram>,
    cache_entries: Family<CacheLabels, Gauge>,
    cache_requests: Counter,
    cache_hits: Family<CacheLabels, Counter>,
    cache_misses: Counter,
    served_stale: Counter,
    forward_requests: Counter,
    forward_responses: Family<RcodeLabels, Counter>,
    forward_duration: Family<RcodeLabels, Histogram>,
    proxy_duration: Family<ProxyLabels, Histogram>,
    forward_failures: Family<FailureLabels, Counter>,
    programming: Family<ServiceKindLabels, Histogram>,
    panics: Counter,
    truncated: ShardedCounter,
    udp_refused: Family<ReasonLabels, Counter>,
    udp_worker_requests: Family<WorkerLabels, Counter>,
    zone_records: Gauge,
    zone_services: Gauge,
    zone_serial: Gauge,
    update_apply: Histogram,
    update_last: Gauge<f64, AtomicU64>,
}

/// CoreDNS's `plugin.TimeBuckets`: 0.25 ms doubling to 8 s.
pub fn time_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.000_25, 2.0, 16)
}

/// CoreDNS's request and response size buckets.
pub const SIZE_BUCKETS: [f64; 14] = [
    0.0, 100.0, 200.0, 300.0, 400.0, 511.0, 1023.0, 2047.0, 4095.0, 8291.0, 16e3, 32e3, 48e3, 64e3,
];

/// CoreDNS's DNS programming latency buckets: 1 ms doubling to 524 s.
pub fn programming_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.001, 2.0, 20)
}

// === impl Metrics ===

impl Metrics {
    /// Registers the metrics in `registry` (see the module docs for the names).
    pub fn register(registry: &mut Registry, id: &Identity) -> Self {
        let m = Self::unregistered();
        let server = || (Cow::Borrowed("server"), Cow::Owned(id.server.clone()));
        let view = || (Cow::Borrowed("view"), Cow::Borrowed(""));

        let r = registry
            .sub_registry_with_prefix("coredns_dns")
            .sub_registry_with_labels(
                [
                    server(),
                    (Cow::Borrowed("zone"), Cow::Borrowed(".")),
                    view(),
                ]
                .into_iter(),
            );
        r.register(
            "requests",
            "Counter of DNS requests made per zone, protocol and family",
            m.requests.clone(),
        );
        r.register(
            "responses",
            "Counter of response status codes",
            m.responses.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Histogram of the time (in seconds) each request took per zone",
            m.duration.clone(),
        );
        r.register(
            "request_size_bytes",
            "Size of the request in bytes, per zone and protocol",
            m.request_size.clone(),
        );
        r.register(
            "response_size_bytes",
            "Size of the returned response in bytes",
            m.response_size.clone(),
        );

        let r = registry
            .sub_registry_with_prefix("coredns_cache")
            .sub_registry_with_labels(
                [
                    server(),
                    (Cow::Borrowed("zones"), Cow::Borrowed(".")),
                    view(),
                ]
                .into_iter(),
            );
        r.register(
            "entries",
            "The number of elements in the cache",
            m.cache_entries.clone(),
        );
        r.register(
            "requests",
            "The count of cache requests",
            m.cache_requests.clone(),
        );
        r.register("hits", "The count of cache hits", m.cache_hits.clone());
        r.register(
            "misses",
            "The count of cache misses",
            m.cache_misses.clone(),
        );
        r.register(
            "served_stale",
            "The number of requests served from stale cache entries",
            m.served_stale.clone(),
        );

        let to = || (Cow::Borrowed("to"), Cow::Owned(id.upstreams.clone()));
        let r = registry
            .sub_registry_with_prefix("coredns_forward")
            .sub_registry_with_label(to());
        r.register(
            "requests",
            "Counter of requests made per upstream",
            m.forward_requests.clone(),
        );
        r.register(
            "responses",
            "Counter of responses received per upstream",
            m.forward_responses.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Histogram of the time each request took",
            m.forward_duration.clone(),
        );
        registry
            .sub_registry_with_prefix("coredns_proxy")
            .sub_registry_with_label(to())
            .register(
                "request_duration_seconds",
                "Histogram of the time each request took",
                m.proxy_duration.clone(),
            );
        registry
            .sub_registry_with_prefix("coredns_kubernetes")
            .register(
                "dns_programming_duration_seconds",
                "Histogram of the time (in seconds) it took to program a dns instance",
                m.programming.clone(),
            );
        let r = registry.sub_registry_with_prefix("coredns");
        r.register(
            "build",
            "A metric with a constant '1' value labeled by version, revision, and goversion from which the agent was built (goversion: the Rust toolchain is not recorded, so empty)",
            Info::new(BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                revision: option_env!("MESHLITE_REVISION").unwrap_or(""),
                goversion: "",
            }),
        );
        r.register(
            "panics",
            "A metrics that counts the number of panics",
            m.panics.clone(),
        );

        registry
            .sub_registry_with_prefix("meshlite_dns")
            .sub_registry_with_label(to())
            .register(
                "forward_failures",
                "Upstream requests that got no response at all, by reason (CoreDNS counts only responses)",
                m.forward_failures.clone(),
            );
        let r = registry.sub_registry_with_prefix("meshlite_dns");
        r.register(
            "truncated",
            "UDP responses truncated (TC set) to the client's size limit",
            m.truncated.clone(),
        );
        r.register(
            "udp_refused",
            "UDP requests dropped unanswered because of their source (port 0, unspecified or broadcast address)",
            m.udp_refused.clone(),
        );
        r.register(
            "udp_worker_requests",
            "UDP datagrams received, by worker socket",
            m.udp_worker_requests.clone(),
        );
        r.register(
            "zone_records",
            "Records in the cluster zone (forward and PTR)",
            m.zone_records.clone(),
        );
        r.register(
            "zone_services",
            "Services in the cluster zone",
            m.zone_services.clone(),
        );
        r.register(
            "zone_serial",
            "SOA serial (snapshot version) of the zone being served",
            m.zone_serial.clone(),
        );
        r.register(
            "update_apply_duration_seconds",
            "Time to build and swap in the zone for one update",
            m.update_apply.clone(),
        );
        r.register(
            "update_last_applied_timestamp_seconds",
            "Unix time of the last zone swap",
            m.update_last.clone(),
        );
        m
    }

    /// Metrics that go nowhere (tests, fuzzing).
    pub fn unregistered() -> Self {
        Self {
            requests: Family::default(),
            responses: Family::default(),
            duration: ShardedHistogram::new(time_buckets()),
            request_size: Family::new_with_constructor(|| ShardedHistogram::new(SIZE_BUCKETS)),
            response_size: Family::new_with_constructor(|| ShardedHistogram::new(SIZE_BUCKETS)),
            cache_entries: Family::default(),
            cache_requests: Counter::default(),
            cache_hits: Family::default(),
            cache_misses: Counter::default(),
            served_stale: Counter::default(),
            forward_requests: Counter::default(),
            forward_responses: Family::default(),
            forward_duration: Family::new_with_constructor(|| Histogram::new(time_buckets())),
            proxy_duration: Family::new_with_constructor(|| Histogram::new(time_buckets())),
            forward_failures: Family::default(),
            programming: Family::new_with_constructor(|| Histogram::new(programming_buckets())),
            panics: Counter::default(),
            truncated: ShardedCounter::default(),
            udp_refused: Family::default(),
            udp_worker_requests: Family::default(),
            zone_records: Gauge::default(),
            zone_services: Gauge::default(),
            zone_serial: Gauge::default(),
            update_apply: Histogram::new([
                0.000_1, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                2.5,
            ]),
            update_last: Gauge::default(),
        }
    }

    /// One answered request.
    pub fn request(&self, a: &Answered) {
        self.requests
            .get_or_create(&RequestLabels {
                proto: a.transport,
                family: a.family,
                r#type: a.qtype,
            })
            .inc();
        self.responses
            .get_or_create(&ResponseLabels {
                rcode: a.rcode,
                plugin: a.source,
            })
            .inc();
        self.duration.observe(a.elapsed.as_secs_f64());
        self.request_size
            .get_or_create(&ProtoLabels { proto: a.transport })
            .observe(a.request_bytes as f64);
        if let Some(bytes) = a.response_bytes {
            self.response_size(a.transport, bytes);
        }
        if a.truncated {
            self.truncated.inc();
        }
    }

    /// A recorder of answered requests for one UDP worker thread: it looks each
    /// series up once and keeps it, and (with [`enter_worker_shard`]) writes only
    /// the worker's own shards.
    pub fn recorder(&self) -> Recorder<'_> {
        Recorder {
            metrics: self,
            requests: Default::default(),
            responses: Default::default(),
            request_size: Default::default(),
            response_size: Default::default(),
        }
    }

    /// The encoded size of one response, reported where the bytes are.
    pub fn response_size(&self, proto: Transport, bytes: usize) {
        self.response_size
            .get_or_create(&ProtoLabels { proto })
            .observe(bytes as f64);
    }

    /// A cache lookup: `Some(type)` for a hit.
    pub fn cache_lookup(&self, hit: Option<CacheType>) {
        self.cache_requests.inc();
        match hit {
            Some(t) => {
                self.cache_hits
                    .get_or_create(&CacheLabels { r#type: t })
                    .inc();
            }
            None => {
                self.cache_misses.inc();
            }
        }
    }

    /// An entry of `kind` entered (`+1`) or left (`-1`) the cache.
    pub fn cache_entries(&self, kind: CacheType, delta: i64) {
        self.cache_entries
            .get_or_create(&CacheLabels { r#type: kind })
            .inc_by(delta);
    }

    /// An answer served from an expired entry because upstream failed.
    pub fn served_stale(&self) {
        self.served_stale.inc();
    }

    /// One upstream request and how it ended.
    pub fn forward(&self, result: ForwardResult, took: Duration) {
        self.forward_requests.inc();
        match result {
            ForwardResult::Response(rcode) => {
                let labels = RcodeLabels { rcode };
                self.forward_responses.get_or_create(&labels).inc();
                self.forward_duration
                    .get_or_create(&labels)
                    .observe(took.as_secs_f64());
                self.proxy_duration
                    .get_or_create(&ProxyLabels {
                        proxy_name: "forward",
                        rcode,
                    })
                    .observe(took.as_secs_f64());
            }
            ForwardResult::Timeout => {
                self.forward_failures
                    .get_or_create(&FailureLabels {
                        reason: ForwardFailure::timeout,
                    })
                    .inc();
            }
            ForwardResult::Error => {
                self.forward_failures
                    .get_or_create(&FailureLabels {
                        reason: ForwardFailure::error,
                    })
                    .inc();
            }
        }
    }

    /// A UDP request dropped for its source.
    pub fn udp_refused(&self, reason: Refusal) {
        self.udp_refused
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// The counter of datagrams received by UDP worker `worker` (held by the worker:
    /// no label lookup per datagram).
    pub fn udp_worker_counter(&self, worker: u32) -> Counter {
        self.udp_worker_requests
            .get_or_create(&WorkerLabels { worker })
            .clone()
    }

    /// A panic happened somewhere in the process.
    pub fn panicked(&self) {
        self.panics.inc();
    }

    /// A change reached the zone: `secs` from its trigger time to now.
    pub fn programmed(&self, kind: ServiceKind, secs: f64) {
        self.programming
            .get_or_create(&ServiceKindLabels { service_kind: kind })
            .observe(secs);
    }

    /// A zone was swapped in.
    pub fn zone_applied(&self, records: usize, services: usize, serial: u32, took: Duration) {
        self.zone_records
            .set(i64::try_from(records).unwrap_or(i64::MAX));
        self.zone_services
            .set(i64::try_from(services).unwrap_or(i64::MAX));
        self.zone_serial.set(i64::from(serial));
        self.update_apply.observe(took.as_secs_f64());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.update_last.set(now);
    }
}

/// See [`Metrics::recorder`].
#[derive(Debug)]
pub struct Recorder<'m> {
    metrics: &'m Metrics,
    requests: HashMap<(Transport, Family4or6, QueryType), ShardedCounter>,
    responses: HashMap<(Rcode, Source), ShardedCounter>,
    request_size: HashMap<Transport, ShardedHistogram>,
    response_size: HashMap<Transport, ShardedHistogram>,
}

// === impl Recorder ===

impl Recorder<'_> {
    /// As [`Metrics::request`].
    pub fn request(&mut self, a: &Answered) {
        let m = self.metrics;
        self.requests
            .entry((a.transport, a.family, a.qtype))
            .or_insert_with(|| {
                m.requests
                    .get_or_create(&RequestLabels {
                        proto: a.transport,
                        family: a.family,
                        r#type: a.qtype,
                    })
                    .clone()
            })
            .inc();
        self.responses
            .entry((a.rcode, a.source))
            .or_insert_with(|| {
                m.responses
                    .get_or_create(&ResponseLabels {
                        rcode: a.rcode,
                        plugin: a.source,
                    })
                    .clone()
            })
            .inc();
        m.duration.observe(a.elapsed.as_secs_f64());
        self.request_size
            .entry(a.transport)
            .or_insert_with(|| {
                m.request_size
                    .get_or_create(&ProtoLabels { proto: a.transport })
                    .clone()
            })
            .observe(a.request_bytes as f64);
        if let Some(bytes) = a.response_bytes {
            self.response_size
                .entry(a.transport)
                .or_insert_with(|| {
                    m.response_size
                        .get_or_create(&ProtoLabels { proto: a.transport })
                        .clone()
                })
                .observe(bytes as f64);
        }
        if a.truncated {
            m.truncated.inc();
        }
    }
}

// === impl Source ===

impl EncodeLabelValue for Source {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(match self {
            Self::Zone => "kubernetes",
            Self::Cache => "cache",
            Self::Upstream => "forward",
            Self::Error => "",
        })
    }
}

// === impl Family4or6 ===

impl EncodeLabelValue for Family4or6 {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(match self {
            Self::V4 => "1",
            Self::V6 => "2",
        })
    }
}

impl From<std::net::SocketAddr> for Family4or6 {
    fn from(a: std::net::SocketAddr) -> Self {
        match a.ip().to_canonical() {
            std::net::IpAddr::V4(_) => Self::V4,
            std::net::IpAddr::V6(_) => Self::V6,
        }
    }
}

impl Identity {
    /// The labels for a server on `listen` forwarding to `upstreams`.
    pub fn new(listen: std::net::SocketAddr, upstreams: &[std::net::SocketAddr]) -> Self {
        let server = if listen.ip().is_unspecified() {
            format!("dns://:{}", listen.port())
        } else {
            format!("dns://{listen}")
        };
        let upstreams = upstreams
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        Self { server, upstreams }
    }
}

#[cfg(test)]
mod tests;
