//! The DNS agent's Prometheus metrics, under `meshlite_dns_`.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Query type label; uncommon types are `OTHER`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(clippy::upper_case_acronyms)]
pub enum QueryType {
    A,
    AAAA,
    SRV,
    PTR,
    CNAME,
    TXT,
    SOA,
    NS,
    MX,
    ANY,
    OTHER,
}

/// Response code label.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(clippy::upper_case_acronyms)]
pub enum Rcode {
    NOERROR,
    NXDOMAIN,
    SERVFAIL,
    FORMERR,
    NOTIMP,
    REFUSED,
    BADVERS,
    OTHER,
}

/// Who answered.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Source {
    /// The cluster zone.
    Zone,
    /// The forwarding cache.
    Cache,
    /// An upstream resolver.
    Upstream,
    /// Rejected before any lookup (malformed, unsupported).
    Error,
}

/// Transport.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Transport {
    Udp,
    Tcp,
    Other,
}

/// Outcome of one upstream request.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum ForwardResult {
    Answer,
    Negative,
    Error,
    Timeout,
}

/// What one request's metrics record.
#[derive(Clone, Copy, Debug)]
pub struct Answered {
    pub qtype: QueryType,
    pub rcode: Rcode,
    pub source: Source,
    pub elapsed: Duration,
    pub transport: Transport,
    /// Encoded size, when this response was sampled for it.
    pub bytes: Option<usize>,
    pub truncated: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    r#type: QueryType,
    rcode: Rcode,
    source: Source,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabels {
    transport: Transport,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: Source,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ForwardLabels {
    result: ForwardResult,
}

/// Every metric of the agent. Register once per process.
#[derive(Debug)]
pub struct Metrics {
    requests: Family<RequestLabels, Counter>,
    response_bytes: Family<TransportLabels, Histogram>,
    latency: Family<SourceLabels, Histogram>,
    truncated: Counter,
    cache_hits: Counter,
    cache_misses: Counter,
    cache_entries: Gauge,
    forwards: Family<ForwardLabels, Counter>,
    zone_records: Gauge,
    zone_services: Gauge,
    zone_serial: Gauge,
    update_apply: Histogram,
    update_last: Gauge<f64, AtomicU64>,
}

// === impl Metrics ===

impl Metrics {
    /// Registers the metrics under `meshlite_dns_` in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::unregistered();
        let r = registry.sub_registry_with_prefix("meshlite_dns");
        r.register(
            "requests",
            "DNS requests answered, by query type, response code and source",
            m.requests.clone(),
        );
        r.register(
            "response_size_bytes",
            "Size of the DNS responses sent (a uniform sample: one response in 16 is measured)",
            m.response_bytes.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Time from receiving a request to handing its response to the socket",
            m.latency.clone(),
        );
        r.register(
            "truncated",
            "UDP responses truncated (TC set) to the client's size limit",
            m.truncated.clone(),
        );
        r.register(
            "cache_hits",
            "Forwarded names answered from the cache",
            m.cache_hits.clone(),
        );
        r.register(
            "cache_misses",
            "Forwarded names not in the cache",
            m.cache_misses.clone(),
        );
        r.register(
            "cache_entries",
            "Entries in the forwarding cache",
            m.cache_entries.clone(),
        );
        r.register(
            "forward_requests",
            "Requests sent to the upstream resolvers, by result",
            m.forwards.clone(),
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
            response_bytes: Family::new_with_constructor(|| {
                Histogram::new([64.0, 128.0, 256.0, 512.0, 1024.0, 1232.0, 4096.0, 16384.0])
            }),
            latency: Family::new_with_constructor(|| {
                Histogram::new([
                    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01,
                    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ])
            }),
            truncated: Counter::default(),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            cache_entries: Gauge::default(),
            forwards: Family::default(),
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
                r#type: a.qtype,
                rcode: a.rcode,
                source: a.source,
            })
            .inc();
        self.latency
            .get_or_create(&SourceLabels { source: a.source })
            .observe(a.elapsed.as_secs_f64());
        if let Some(bytes) = a.bytes {
            self.response_bytes
                .get_or_create(&TransportLabels {
                    transport: a.transport,
                })
                .observe(bytes as f64);
        }
        if a.truncated {
            self.truncated.inc();
        }
    }

    pub fn cache_hit(&self) {
        self.cache_hits.inc();
    }

    pub fn cache_miss(&self) {
        self.cache_misses.inc();
    }

    pub fn cache_entries(&self, n: u64) {
        self.cache_entries.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn forward(&self, result: ForwardResult) {
        self.forwards.get_or_create(&ForwardLabels { result }).inc();
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
