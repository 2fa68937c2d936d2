//! The request handler: one query in, one response out. Cluster-zone and configured
//! reverse names are answered from the current [`Zone`](crate::zone::Zone)
//! (authoritative); everything else goes to the [`Forwarder`].

use std::sync::Arc;
use std::time::Instant;

use hickory_proto::op::{Edns, Header, HeaderCounts, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, NS, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecoder, BinEncodable, BinEncoder, NameEncoding};
use hickory_resolver::net::runtime::Time;
use hickory_resolver::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageResponseBuilder, Queries};
use tracing::{debug, warn};

use super::forward::{Forwarded, Forwarder};
use crate::metrics::{Answered, Family4or6, Metrics, QueryType, Rcode, Source, Transport};
use crate::zone::{self, Outcome, Owner, QType, Rr, ZoneCell};

/// Answers requests from the zone cell and the forwarder.
#[derive(Debug, Clone)]
pub struct DnsHandler {
    zone: Arc<ZoneCell>,
    forwarder: Option<Arc<Forwarder>>,
    metrics: Arc<Metrics>,
    max_udp_payload: u16,
}

/// A response before encoding, owning its records.
struct Response {
    metadata: Metadata,
    answers: Vec<Record>,
    authorities: Vec<Record>,
    additionals: Vec<Record>,
    edns: Option<Edns>,
    source: Source,
    /// Encode once more to measure the size (TCP: hickory's TCP path does not
    /// report it; over UDP our loop sees the bytes).
    measure: bool,
}

// === impl DnsHandler ===

impl DnsHandler {
    /// `forwarder: None` refuses every name outside the cluster zones.
    /// `max_udp_payload` caps the EDNS size we honour (and advertise).
    pub fn new(
        zone: Arc<ZoneCell>,
        forwarder: Option<Arc<Forwarder>>,
        metrics: Arc<Metrics>,
        max_udp_payload: u16,
    ) -> Self {
        Self {
            zone,
            forwarder,
            metrics,
            max_udp_payload: max_udp_payload.max(512),
        }
    }

    /// The metrics this handler records into.
    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The zone cell's generation (see [`ZoneCell::generation`]).
    pub(crate) fn zone_generation(&self) -> u64 {
        self.zone.generation()
    }

    /// The zone being served now.
    pub(crate) fn zone(&self) -> Arc<crate::zone::Zone> {
        self.zone.load()
    }

    /// The largest EDNS UDP payload honoured.
    pub(crate) fn max_udp_payload(&self) -> u16 {
        self.max_udp_payload
    }

    async fn answer(&self, request: &Request) -> Response {
        let mut edns = None;
        if let Some(req) = &request.edns {
            let mut e = Edns::new();
            e.set_max_payload(req.max_payload().clamp(512, self.max_udp_payload));
            e.set_version(0);
            if req.version() > 0 {
                // RFC 6891 6.1.3: a version we do not implement gets BADVERS.
                e.set_rcode_high(ResponseCode::BADVERS.high());
                return Response::error(request, ResponseCode::BADVERS, Some(e));
            }
            edns = Some(e);
        }
        if request.metadata.op_code != OpCode::Query {
            return Response::error(request, ResponseCode::NotImp, edns);
        }
        let [query] = request.queries.queries() else {
            return Response::error(request, ResponseCode::FormErr, edns);
        };
        let qtype = query.query_type();
        if matches!(qtype, RecordType::OPT) {
            return Response::error(request, ResponseCode::FormErr, edns);
        }
        if !matches!(query.query_class(), DNSClass::IN | DNSClass::ANY) {
            return Response::error(request, ResponseCode::Refused, edns);
        }
        // Labels as lower-case strings: LowerName has folded the case already.
        let labels: Vec<String> = query
            .name()
            .iter()
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect();
        let zone = self.zone.load();
        if matches!(qtype, RecordType::AXFR | RecordType::IXFR) {
            // No zone transfers, for the cluster zone or through us.
            return Response::error(request, ResponseCode::Refused, edns);
        }
        let answer = zone.lookup(&labels, zone_qtype(qtype));
        let qname = query.original().name();
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.recursion_available = true;
        match answer.outcome {
            Outcome::NotAuthoritative => return self.forward(request, qname, qtype, edns).await,
            Outcome::Found | Outcome::NoData => metadata.response_code = ResponseCode::NoError,
            Outcome::NxDomain => metadata.response_code = ResponseCode::NXDomain,
        }
        metadata.authoritative = true;
        let mut names = NameCache::default();
        Response {
            metadata,
            answers: names.records(&answer.answers, qname),
            authorities: names.records(answer.authority.as_slice(), qname),
            additionals: names.records(&answer.additionals, qname),
            edns,
            source: Source::Zone,
            measure: false,
        }
    }

    async fn forward(
        &self,
        request: &Request,
        qname: &Name,
        qtype: RecordType,
        edns: Option<Edns>,
    ) -> Response {
        let Some(forwarder) = &self.forwarder else {
            return Response::error(request, ResponseCode::Refused, edns);
        };
        let (forwarded, cached) = forwarder.resolve(qname, qtype).await;
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.recursion_available = true;
        let mut response = Response {
            metadata,
            answers: Vec::new(),
            authorities: Vec::new(),
            additionals: Vec::new(),
            edns,
            source: if cached {
                Source::Cache
            } else {
                Source::Upstream
            },
            measure: false,
        };
        match forwarded {
            Forwarded::Answer(records) => response.answers = records,
            Forwarded::Negative { rcode, soa } => {
                response.metadata.response_code = rcode;
                response.authorities = soa.into_iter().map(|r| *r).collect();
            }
            Forwarded::Failed(code) => response.metadata.response_code = code,
        }
        response
    }
}

#[async_trait::async_trait]
impl RequestHandler for DnsHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        let started = Instant::now();
        let qtype = request
            .queries
            .queries()
            .first()
            .map_or(QueryType::other, |q| query_type_label(q.query_type()));
        let transport = match request.protocol() {
            Protocol::Udp => Transport::udp,
            _ => Transport::tcp,
        };
        let mut response = self.answer(request).await;
        response.measure = transport == Transport::tcp;
        let source = response.source;
        let (info, size, truncated) = response.send(request, response_handle).await;
        self.metrics.request(&Answered {
            qtype,
            rcode: rcode_label(info.response_code),
            source,
            elapsed: started.elapsed(),
            transport,
            family: Family4or6::from(request.src()),
            request_bytes: request.as_slice().len(),
            response_bytes: size,
            truncated,
        });
        info
    }
}

// === impl Response ===

impl Response {
    fn error(request: &Request, code: ResponseCode, edns: Option<Edns>) -> Self {
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.response_code = code;
        metadata.recursion_available = true;
        Self {
            metadata,
            answers: Vec::new(),
            authorities: Vec::new(),
            additionals: Vec::new(),
            edns,
            source: Source::Error,
            measure: false,
        }
    }

    /// Sends the response; returns what was sent, its encoded size when measured
    /// (with the limit the server applies) and whether it was truncated.
    async fn send<R: ResponseHandler>(
        self,
        request: &Request,
        mut handle: R,
    ) -> (ResponseInfo, Option<usize>, bool) {
        let rebuilt;
        let queries = if question_is_compressed(request.queries.as_bytes()) {
            rebuilt = reencode_queries(request);
            &rebuilt
        } else {
            &request.queries
        };
        let build = || {
            let mut b = MessageResponseBuilder::new(queries, None);
            if let Some(e) = &self.edns {
                b.edns(e);
            }
            b.build(
                self.metadata,
                self.answers.iter(),
                self.authorities.iter(),
                std::iter::empty(),
                self.additionals.iter(),
            )
        };
        // Over TCP hickory encodes out of our sight: the size is only visible by
        // encoding once more (a third of a query's cost; TCP is rare). Truncation
        // comes back exact in the sent header.
        let size = if self.measure {
            let max = match request.protocol() {
                Protocol::Udp => self.edns.as_ref().map_or(512, Edns::max_payload),
                _ => u16::MAX,
            };
            let mut buf = Vec::with_capacity(512);
            let mut encoder = BinEncoder::new(&mut buf);
            encoder.set_max_size(max);
            match build().destructive_emit(&mut encoder) {
                Ok(_) => Some(buf.len()),
                Err(e) => {
                    warn!(error = %e, "response does not encode");
                    None
                }
            }
        } else {
            None
        };
        match handle.send_response(build()).await {
            Ok(info) => (info, size, info.truncation),
            Err(e) => {
                debug!(error = %e, "failed to send response");
                let mut metadata = self.metadata;
                metadata.response_code = ResponseCode::ServFail;
                let info = ResponseInfo::from(Header {
                    metadata,
                    counts: HeaderCounts::default(),
                });
                (info, None, false)
            }
        }
    }
}

/// Whether a question name uses a compression pointer. hickory echoes the question
/// section byte for byte, so such a pointer (relative to the request) would point
/// into the wrong place of the response: found by the fuzz test.
fn question_is_compressed(raw: &[u8]) -> bool {
    let mut i = 0;
    while let Some(&len) = raw.get(i) {
        if len & 0xC0 != 0 {
            return true;
        }
        // The root label ends a name; skip its type and class.
        i += if len == 0 { 5 } else { usize::from(len) + 1 };
    }
    false
}

/// The request's questions encoded afresh, without compression.
fn reencode_queries(request: &Request) -> Queries {
    let mut bytes = Vec::with_capacity(64);
    let mut encoder = BinEncoder::new(&mut bytes);
    // Uncompressed: offsets here would not be offsets in the response.
    encoder.set_name_encoding(NameEncoding::Uncompressed);
    let mut count = 0;
    for q in request.queries.queries() {
        if q.original().emit(&mut encoder).is_err() {
            break;
        }
        count += 1;
    }
    Queries::read(&mut BinDecoder::new(&bytes), count).unwrap_or_else(|_| {
        Queries::read(&mut BinDecoder::new(&[]), 0).expect("zero queries from no bytes parse")
    })
}

/// Converts zone records to hickory records for one response; the query name keeps
/// its case. Names repeat within a response (an SRV target is also an additional
/// record's owner), so each is parsed once.
#[derive(Default)]
struct NameCache<'a> {
    names: Vec<(&'a str, Name)>,
}

impl<'a> NameCache<'a> {
    fn records(&mut self, rrs: &'a [Rr], qname: &Name) -> Vec<Record> {
        rrs.iter().filter_map(|rr| self.record(rr, qname)).collect()
    }

    fn name(&mut self, s: &'a str) -> Option<Name> {
        if let Some((_, n)) = self.names.iter().find(|(k, _)| *k == s) {
            return Some(n.clone());
        }
        let n = fqdn(s)?;
        self.names.push((s, n.clone()));
        Some(n)
    }

    fn record(&mut self, rr: &'a Rr, qname: &Name) -> Option<Record> {
        let owner = match &rr.owner {
            Owner::Query => qname.clone(),
            Owner::Name(n) => self.name(n)?,
        };
        let data = match &rr.data {
            zone::RData::A(ip) => RData::A(A(*ip)),
            zone::RData::Aaaa(ip) => RData::AAAA(AAAA(*ip)),
            zone::RData::Srv {
                priority,
                weight,
                port,
                target,
            } => RData::SRV(SRV::new(*priority, *weight, *port, self.name(target)?)),
            zone::RData::Ptr(t) => RData::PTR(PTR(self.name(t)?)),
            zone::RData::Cname(t) => RData::CNAME(CNAME(self.name(t)?)),
            zone::RData::Ns(t) => RData::NS(NS(self.name(t)?)),
            zone::RData::Txt(t) => RData::TXT(TXT::new(vec![t.clone()])),
            zone::RData::Soa(s) => RData::SOA(SOA::new(
                self.name(&s.mname)?,
                self.name(&s.rname)?,
                s.serial,
                s.refresh,
                s.retry,
                s.expire,
                s.minimum,
            )),
        };
        Some(Record::from_rdata(owner, rr.ttl, data))
    }
}

fn fqdn(name: &str) -> Option<Name> {
    match Name::from_ascii(name) {
        Ok(mut n) => {
            n.set_fqdn(true);
            Some(n)
        }
        Err(e) => {
            // Only a hostname that is not a DNS label could get here; skip the record.
            warn!(name, error = %e, "name in the zone is not a valid DNS name");
            None
        }
    }
}

fn zone_qtype(t: RecordType) -> QType {
    match t {
        RecordType::A => QType::A,
        RecordType::AAAA => QType::Aaaa,
        RecordType::SRV => QType::Srv,
        RecordType::PTR => QType::Ptr,
        RecordType::CNAME => QType::Cname,
        RecordType::TXT => QType::Txt,
        RecordType::NS => QType::Ns,
        RecordType::SOA => QType::Soa,
        RecordType::ANY => QType::Any,
        _ => QType::Other,
    }
}

pub(super) fn query_type_label(t: RecordType) -> QueryType {
    match t {
        RecordType::A => QueryType::A,
        RecordType::AAAA => QueryType::AAAA,
        RecordType::CNAME => QueryType::CNAME,
        RecordType::DNSKEY => QueryType::DNSKEY,
        RecordType::DS => QueryType::DS,
        RecordType::MX => QueryType::MX,
        RecordType::NSEC3 => QueryType::NSEC3,
        RecordType::NSEC => QueryType::NSEC,
        RecordType::NS => QueryType::NS,
        RecordType::PTR => QueryType::PTR,
        RecordType::RRSIG => QueryType::RRSIG,
        RecordType::SOA => QueryType::SOA,
        RecordType::SRV => QueryType::SRV,
        RecordType::TXT => QueryType::TXT,
        RecordType::HTTPS => QueryType::HTTPS,
        RecordType::SVCB => QueryType::SVCB,
        RecordType::IXFR => QueryType::IXFR,
        RecordType::AXFR => QueryType::AXFR,
        RecordType::ANY => QueryType::ANY,
        _ => QueryType::other,
    }
}

pub(super) fn rcode_label(c: ResponseCode) -> Rcode {
    match c {
        ResponseCode::NoError => Rcode::NOERROR,
        ResponseCode::NXDomain => Rcode::NXDOMAIN,
        ResponseCode::ServFail => Rcode::SERVFAIL,
        ResponseCode::FormErr => Rcode::FORMERR,
        ResponseCode::NotImp => Rcode::NOTIMP,
        ResponseCode::Refused => Rcode::REFUSED,
        ResponseCode::BADVERS => Rcode::BADVERS,
        _ => Rcode::OTHER,
    }
}
