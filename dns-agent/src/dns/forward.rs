//! Forwarding of names outside the cluster zones: hickory-resolver talks to the
//! upstream servers (pool, UDP with TCP fallback, retries); in front of it sits our
//! own TTL-honouring cache with negative caching (RFC 2308), so cache hits and
//! upstream requests are visible in metrics. The resolver's own cache is off.
//!
//! Serve-stale (RFC 8767, CoreDNS `cache { serve_stale DURATION verify }`): with
//! `serve_stale` above zero an entry is kept that much longer than its TTL; an
//! expired entry is still refreshed upstream first, and only when upstream fails
//! is it served, with a TTL of 30 s (RFC 8767 section 4's recommendation).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use moka::sync::Cache;
use tracing::debug;

use crate::metrics::{CacheType, ForwardResult, Metrics, Rcode};

/// Upstream and cache settings.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ForwardConfig {
    /// Upstream resolvers, tried in order of health.
    pub upstreams: Vec<SocketAddr>,
    /// Per-attempt timeout.
    #[serde(serialize_with = "meshlite_runtime::process::args::serialize_duration")]
    pub timeout: Duration,
    pub attempts: usize,
    /// Maximum cached answers (0 disables the cache).
    pub cache_size: u64,
    /// Cap on how long an answer is cached, whatever its TTL.
    #[serde(serialize_with = "meshlite_runtime::process::args::serialize_duration")]
    pub cache_max_ttl: Duration,
    /// Cap on how long a negative answer is cached.
    #[serde(serialize_with = "meshlite_runtime::process::args::serialize_duration")]
    pub negative_max_ttl: Duration,
    /// How long past its TTL an entry may still be served while upstream fails
    /// (zero: never).
    #[serde(serialize_with = "meshlite_runtime::process::args::serialize_duration")]
    pub serve_stale: Duration,
}

/// TTL of an answer served stale (RFC 8767 section 4: 30 seconds).
pub const STALE_TTL: u32 = 30;

/// A forwarded answer.
#[derive(Debug, Clone)]
pub(crate) enum Forwarded {
    /// NOERROR with records.
    Answer(Vec<Record>),
    /// NXDOMAIN or NODATA, with the upstream's SOA when it sent one.
    Negative {
        rcode: ResponseCode,
        soa: Option<Box<Record>>,
    },
    /// The upstream failed or answered with an error code.
    Failed(ResponseCode),
}

#[derive(Debug)]
struct Cached {
    stored: Instant,
    ttl: Duration,
    answer: Forwarded,
}

type Key = (LowerName, RecordType);

/// The forwarder. Cheap to share behind an `Arc`.
pub struct Forwarder {
    resolver: TokioResolver,
    cache: Option<Cache<Key, Arc<Cached>>>,
    config: ForwardConfig,
    metrics: Arc<Metrics>,
}

/// Per-entry expiry: each answer lives as long as its own TTL, plus the
/// serve-stale window.
struct TtlExpiry {
    stale: Duration,
}

// === impl Forwarder ===

impl Forwarder {
    /// Builds the resolver for `config.upstreams`.
    ///
    /// # Errors
    /// When the resolver cannot be built (no upstreams).
    pub fn new(config: ForwardConfig, metrics: Arc<Metrics>) -> Result<Self, super::Error> {
        if config.upstreams.is_empty() {
            return Err(super::Error::NoUpstream);
        }
        let servers = config
            .upstreams
            .iter()
            .map(|sa| {
                let mut ns = NameServerConfig::udp_and_tcp(sa.ip());
                for c in &mut ns.connections {
                    c.port = sa.port();
                }
                ns
            })
            .collect();
        let mut opts = ResolverOpts::default();
        opts.timeout = config.timeout;
        opts.attempts = config.attempts;
        opts.cache_size = 0;
        opts.use_hosts_file = ResolveHosts::Never;
        // RFC 1034 4.3.2: a forwarder returns the CNAME chain with the answer.
        opts.preserve_intermediates = true;
        opts.recursion_desired = true;
        opts.ndots = 0;
        let resolver = TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(servers),
            TokioRuntimeProvider::default(),
        )
        .with_options(opts)
        .build()
        .map_err(|e| super::Error::Resolver(e.to_string()))?;
        let cache = (config.cache_size > 0).then(|| {
            let m = metrics.clone();
            Cache::builder()
                .max_capacity(config.cache_size)
                .expire_after(TtlExpiry {
                    stale: config.serve_stale,
                })
                // Every way out (expiry, eviction, replacement) is one entry less.
                .eviction_listener(move |_key, value: Arc<Cached>, _cause| {
                    if let Some(kind) = value.answer.cache_type() {
                        m.cache_entries(kind, -1);
                    }
                })
                .build()
        });
        Ok(Self {
            resolver,
            cache,
            config,
            metrics,
        })
    }

    /// Answers `name`/`qtype` from the cache or upstream. Returns the answer with TTLs
    /// counted down to what is left, and whether it came from the cache.
    pub(crate) async fn resolve(&self, name: &Name, qtype: RecordType) -> (Forwarded, bool) {
        let key = (LowerName::new(name), qtype);
        let mut stale = None;
        if let Some(cache) = &self.cache {
            if let Some(hit) = cache.get(&key) {
                let age = hit.stored.elapsed();
                if age < hit.ttl {
                    self.metrics.cache_lookup(hit.answer.cache_type());
                    return (age_answer(&hit.answer, age), true);
                }
                stale = Some(hit);
            }
            self.metrics.cache_lookup(None);
        }
        let (answer, ttl) = self.ask_upstream(name, qtype).await;
        if let (Forwarded::Failed(code), Some(old)) = (&answer, &stale) {
            debug!(%name, ?qtype, %code, "upstream failed; serving the expired entry");
            self.metrics.served_stale();
            return (stale_answer(&old.answer), true);
        }
        if let (Some(cache), Some(ttl)) = (&self.cache, ttl)
            && !ttl.is_zero()
        {
            if let Some(kind) = answer.cache_type() {
                self.metrics.cache_entries(kind, 1);
            }
            cache.insert(
                key,
                Arc::new(Cached {
                    stored: Instant::now(),
                    ttl,
                    answer: answer.clone(),
                }),
            );
        }
        (answer, false)
    }

    /// One upstream resolution; also returns how long it may be cached.
    async fn ask_upstream(&self, name: &Name, qtype: RecordType) -> (Forwarded, Option<Duration>) {
        let started = tokio::time::Instant::now();
        let result = self.resolver.lookup(name.clone(), qtype).await;
        let took = started.elapsed();
        match result {
            Ok(lookup) => {
                self.metrics
                    .forward(ForwardResult::Response(Rcode::NOERROR), took);
                let answers = lookup.answers().to_vec();
                let ttl = answers.iter().map(|r| r.ttl).min().unwrap_or(0);
                let ttl = Duration::from_secs(u64::from(ttl)).min(self.config.cache_max_ttl);
                (Forwarded::Answer(answers), Some(ttl))
            }
            Err(NetError::Dns(DnsError::NoRecordsFound(nr))) => {
                let code = if nr.response_code == ResponseCode::NXDomain {
                    Rcode::NXDOMAIN
                } else {
                    Rcode::NOERROR
                };
                self.metrics.forward(ForwardResult::Response(code), took);
                let soa = nr.soa.map(|r| {
                    let r = *r;
                    Box::new(Record::from_rdata(r.name, r.ttl, RData::SOA(r.data)))
                });
                // RFC 2308 section 5: negative answers without an SOA are not cached.
                let ttl = match (&soa, nr.negative_ttl) {
                    (Some(_), Some(t)) => {
                        Some(Duration::from_secs(u64::from(t)).min(self.config.negative_max_ttl))
                    }
                    _ => None,
                };
                let rcode = match nr.response_code {
                    ResponseCode::NXDomain => ResponseCode::NXDomain,
                    _ => ResponseCode::NoError,
                };
                (Forwarded::Negative { rcode, soa }, ttl)
            }
            Err(NetError::Dns(DnsError::ResponseCode(code))) => {
                self.metrics.forward(
                    ForwardResult::Response(super::handler::rcode_label(code)),
                    took,
                );
                debug!(%name, ?qtype, %code, "upstream answered with an error");
                (Forwarded::Failed(code), None)
            }
            Err(NetError::Timeout) => {
                self.metrics.forward(ForwardResult::Timeout, took);
                debug!(%name, ?qtype, "upstream timed out");
                (Forwarded::Failed(ResponseCode::ServFail), None)
            }
            Err(e) => {
                self.metrics.forward(ForwardResult::Error, took);
                debug!(%name, ?qtype, error = %e, "upstream failed");
                (Forwarded::Failed(ResponseCode::ServFail), None)
            }
        }
    }
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// An expired answer, every TTL set to [`STALE_TTL`].
fn stale_answer(answer: &Forwarded) -> Forwarded {
    let stale_rr = |r: &Record| {
        let mut r = r.clone();
        r.ttl = STALE_TTL;
        r
    };
    match answer {
        Forwarded::Answer(rs) => Forwarded::Answer(rs.iter().map(stale_rr).collect()),
        Forwarded::Negative { rcode, soa } => Forwarded::Negative {
            rcode: *rcode,
            soa: soa.as_deref().map(|r| Box::new(stale_rr(r))),
        },
        Forwarded::Failed(c) => Forwarded::Failed(*c),
    }
}

// === impl Forwarded ===

impl Forwarded {
    /// CoreDNS's cache entry type; `None` for failures (never cached).
    fn cache_type(&self) -> Option<CacheType> {
        match self {
            Self::Answer(_) => Some(CacheType::success),
            Self::Negative { .. } => Some(CacheType::denial),
            Self::Failed(_) => None,
        }
    }
}

/// Counts TTLs down by the time an answer spent in the cache.
fn age_answer(answer: &Forwarded, age: Duration) -> Forwarded {
    let secs = u32::try_from(age.as_secs()).unwrap_or(u32::MAX);
    let age_rr = |r: &Record| {
        let mut r = r.clone();
        r.ttl = r.ttl.saturating_sub(secs);
        r
    };
    match answer {
        Forwarded::Answer(rs) => Forwarded::Answer(rs.iter().map(age_rr).collect()),
        Forwarded::Negative { rcode, soa } => Forwarded::Negative {
            rcode: *rcode,
            soa: soa.as_deref().map(|r| Box::new(age_rr(r))),
        },
        Forwarded::Failed(c) => Forwarded::Failed(*c),
    }
}

impl moka::Expiry<Key, Arc<Cached>> for TtlExpiry {
    fn expire_after_create(
        &self,
        _key: &Key,
        value: &Arc<Cached>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.ttl.saturating_add(self.stale))
    }
}

/// Reads the `nameserver` lines of a resolv.conf (port 53).
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver")).then_some(())?;
            // Drop an IPv6 zone index (`fe80::1%eth0`): not representable here.
            let addr = words.next()?.split('%').next()?;
            addr.parse().ok().map(|ip| SocketAddr::new(ip, 53))
        })
        .collect()
}

#[cfg(test)]
mod tests;
