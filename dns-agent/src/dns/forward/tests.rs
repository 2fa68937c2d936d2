//! Forwarding against an upstream we run ourselves on 127.0.0.1: answers relayed,
//! TTLs honoured by the cache, negative caching, failures not cached, and cluster
//! names never sent upstream.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Metadata, ResponseCode};
use hickory_proto::rr::rdata::{A, CNAME, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_resolver::net::runtime::Time;
use hickory_server::Server;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::net::{TcpListener, UdpSocket};

use super::*;
use crate::dns::tests::{ask, zone_config};
use crate::dns::{DnsHandler, parse_resolv_conf};
use crate::fixtures;
use crate::metrics::Metrics;
use crate::zone::{PodRecords, Zone, ZoneCell};

/// A scripted upstream that logs every name it is asked.
#[derive(Clone, Default)]
struct Upstream {
    asked: Arc<Mutex<Vec<String>>>,
    /// Stops answering (requests are logged and dropped) while set.
    silent: Arc<std::sync::atomic::AtomicBool>,
}

impl Upstream {
    fn count(&self, name: &str) -> usize {
        self.asked
            .lock()
            .unwrap()
            .iter()
            .filter(|n| *n == name)
            .count()
    }
    fn all(&self) -> Vec<String> {
        self.asked.lock().unwrap().clone()
    }
}

fn rec(name: &str, ttl: u32, data: RData) -> Record {
    Record::from_rdata(Name::from_ascii(name).unwrap(), ttl, data)
}

fn soa() -> Record {
    rec(
        "example.",
        60,
        RData::SOA(SOA::new(
            Name::from_ascii("ns.example.").unwrap(),
            Name::from_ascii("admin.example.").unwrap(),
            1,
            3600,
            600,
            86400,
            60,
        )),
    )
}

#[async_trait::async_trait]
impl RequestHandler for Upstream {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut handle: R,
    ) -> ResponseInfo {
        let q = &request.queries.queries()[0];
        let name = q.name().to_string();
        self.asked.lock().unwrap().push(name.clone());
        let mut meta = Metadata::response_from_request(&request.metadata);
        if self.silent.load(std::sync::atomic::Ordering::SeqCst) {
            return ResponseInfo::from(hickory_proto::op::Header {
                metadata: meta,
                counts: Default::default(),
            });
        }
        meta.recursion_available = true;
        let addr = |ttl| rec(&name, ttl, RData::A(A::new(198, 18, 200, 1)));
        let (answers, authority, code) = match name.as_str() {
            "up.example." => (vec![addr(300)], vec![], ResponseCode::NoError),
            "short.example." => (vec![addr(1)], vec![], ResponseCode::NoError),
            "cname.example." => (
                vec![
                    rec(
                        &name,
                        300,
                        RData::CNAME(CNAME(Name::from_ascii("up.example.").unwrap())),
                    ),
                    rec("up.example.", 300, RData::A(A::new(198, 18, 200, 1))),
                ],
                vec![],
                ResponseCode::NoError,
            ),
            "nodata.example." => (vec![], vec![soa()], ResponseCode::NoError),
            "fail.example." => (vec![], vec![], ResponseCode::ServFail),
            _ => (vec![], vec![soa()], ResponseCode::NXDomain),
        };
        meta.response_code = code;
        let response = MessageResponseBuilder::from_message_request(request).build(
            meta,
            answers.iter(),
            authority.iter(),
            std::iter::empty(),
            std::iter::empty(),
        );
        handle.send_response(response).await.unwrap()
    }
}

/// Starts the scripted upstream on 127.0.0.1 (UDP and TCP).
async fn start_upstream() -> (Upstream, SocketAddr, Server<Upstream>) {
    let up = Upstream::default();
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = udp.local_addr().unwrap();
    let tcp = TcpListener::bind(addr).await.unwrap();
    let mut server = Server::new(up.clone());
    server.register_socket(udp);
    server.register_listener(tcp, Duration::from_secs(5), 16);
    (up, addr, server)
}

fn forwarding_handler(upstream: SocketAddr, max_ttl: Duration) -> DnsHandler {
    handler_with(
        ForwardConfig {
            upstreams: vec![upstream],
            timeout: Duration::from_secs(2),
            attempts: 1,
            cache_size: 100,
            cache_max_ttl: max_ttl,
            negative_max_ttl: max_ttl,
            serve_stale: Duration::ZERO,
        },
        Arc::new(Metrics::unregistered()),
    )
}

fn handler_with(config: ForwardConfig, metrics: Arc<Metrics>) -> DnsHandler {
    let fwd = Forwarder::new(config, metrics.clone()).unwrap();
    let zone = Zone::build(zone_config(PodRecords::Disabled), &fixtures::rules());
    DnsHandler::new(
        Arc::new(ZoneCell::new(zone)),
        Some(Arc::new(fwd)),
        metrics,
        1232,
    )
}

#[tokio::test]
async fn answers_are_relayed_and_cached_for_their_ttl() {
    let (up, addr, _server) = start_upstream().await;
    let h = forwarding_handler(addr, Duration::from_secs(30));
    let m = ask(&h, "up.example.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(!m.metadata.authoritative);
    assert!(m.metadata.recursion_available);
    assert!(matches!(m.answers[0].data, RData::A(a) if a == A::new(198, 18, 200, 1)));
    // Capped at --cache-max-ttl on the way in, and served from the cache after.
    let m = ask(&h, "UP.example.", RecordType::A).await;
    assert!(m.answers[0].ttl <= 300);
    assert_eq!(
        up.count("up.example."),
        1,
        "second answer came from the cache"
    );

    // A 1-second TTL expires: the upstream is asked again.
    ask(&h, "short.example.", RecordType::A).await;
    ask(&h, "short.example.", RecordType::A).await;
    assert_eq!(up.count("short.example."), 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while up.count("short.example.") < 2 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        ask(&h, "short.example.", RecordType::A).await;
    }
    assert_eq!(up.count("short.example."), 2, "expired entry was refreshed");

    // CNAME chains come back whole.
    let m = ask(&h, "cname.example.", RecordType::A).await;
    assert!(matches!(m.answers[0].data, RData::CNAME(_)));
    assert_eq!(m.answers.len(), 2);
}

#[tokio::test]
async fn negative_answers_are_cached_and_failures_are_not() {
    let (up, addr, _server) = start_upstream().await;
    let h = forwarding_handler(addr, Duration::from_secs(30));
    for _ in 0..3 {
        let m = ask(&h, "nx.example.", RecordType::A).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert!(matches!(m.authorities[0].data, RData::SOA(_)));
        let m = ask(&h, "nodata.example.", RecordType::A).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
    }
    assert_eq!(up.count("nx.example."), 1);
    assert_eq!(up.count("nodata.example."), 1);
    for _ in 0..2 {
        let m = ask(&h, "fail.example.", RecordType::A).await;
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    }
    assert!(up.count("fail.example.") >= 2, "failures are not cached");
}

#[tokio::test]
async fn cluster_names_never_reach_the_upstream() {
    let (up, addr, _server) = start_upstream().await;
    let h = forwarding_handler(addr, Duration::from_secs(30));
    for name in [
        "web.default.svc.cluster.local.",
        "missing.default.svc.cluster.local.",
        "a.b.c.d.e.f.cluster.local.",
        "cluster.local.",
        "99.99.18.198.in-addr.arpa.",
    ] {
        let m = ask(&h, name, RecordType::A).await;
        assert!(m.metadata.authoritative, "{name}");
    }
    ask(&h, "up.example.", RecordType::A).await;
    let asked = up.all();
    assert_eq!(asked, vec!["up.example.".to_string()], "{asked:?}");
}

/// RFC 8767: while the upstream does not answer, an expired entry is served with a
/// 30 s TTL (and counted); once it answers again, fresh answers are served.
#[tokio::test]
async fn serve_stale_while_the_upstream_is_silent() {
    let (up, addr, _server) = start_upstream().await;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(Metrics::register(
        &mut registry,
        &crate::metrics::Identity::new(addr, &[addr]),
    ));
    let config = ForwardConfig {
        upstreams: vec![addr],
        timeout: Duration::from_millis(200),
        attempts: 1,
        cache_size: 100,
        cache_max_ttl: Duration::from_secs(30),
        negative_max_ttl: Duration::from_secs(30),
        serve_stale: Duration::from_secs(3600),
    };
    let h = handler_with(config.clone(), metrics);
    let without = handler_with(
        ForwardConfig {
            serve_stale: Duration::ZERO,
            ..config
        },
        Arc::new(Metrics::unregistered()),
    );
    for handler in [&h, &without] {
        let m = ask(handler, "short.example.", RecordType::A).await;
        assert_eq!(m.answers[0].ttl, 1);
    }
    up.silent.store(true, std::sync::atomic::Ordering::SeqCst);
    // Once the 1 s TTL is over, the silent upstream is asked and the stale entry served.
    let asked = up.count("short.example.");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while up.count("short.example.") == asked && tokio::time::Instant::now() < deadline {
        let m = ask(&h, "short.example.", RecordType::A).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(matches!(m.answers[0].data, RData::A(a) if a == A::new(198, 18, 200, 1)));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = ask(&h, "short.example.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(
        m.answers[0].ttl, STALE_TTL,
        "served stale, with RFC 8767's TTL"
    );
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let stale = text
        .lines()
        .find(|l| l.starts_with("coredns_cache_served_stale_total{"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(stale >= 1.0, "{text}");
    // Without serve-stale the same expired name is SERVFAIL.
    let m = ask(&without, "short.example.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);

    // The upstream answers again: fresh answers (the upstream's 1 s TTL) return.
    up.silent.store(false, std::sync::atomic::Ordering::SeqCst);
    let m = ask(&h, "short.example.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers[0].ttl <= 1, "fresh answer, not stale: {m:?}");
}

#[tokio::test]
async fn a_dead_upstream_is_servfail() {
    // Nothing listens on this port (bound, then closed).
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    drop(sock);
    let metrics = Arc::new(Metrics::unregistered());
    let fwd = Forwarder::new(
        ForwardConfig {
            upstreams: vec![addr],
            timeout: Duration::from_millis(200),
            attempts: 1,
            cache_size: 10,
            cache_max_ttl: Duration::from_secs(30),
            negative_max_ttl: Duration::from_secs(30),
            serve_stale: Duration::ZERO,
        },
        metrics,
    )
    .unwrap();
    let (answer, cached) = fwd
        .resolve(&Name::from_ascii("up.example.").unwrap(), RecordType::A)
        .await;
    assert!(!cached);
    assert!(
        matches!(answer, Forwarded::Failed(ResponseCode::ServFail)),
        "{answer:?}"
    );
}

#[test]
fn resolv_conf() {
    let text = "# comment\nsearch default.svc.cluster.local\nnameserver 127.0.0.53\n\
                nameserver ::1\nnameserver fe80::1%eth0\nnameserver bogus\noptions ndots:5\n";
    let got = parse_resolv_conf(text);
    assert_eq!(
        got,
        vec![
            "127.0.0.53:53".parse().unwrap(),
            "[::1]:53".parse().unwrap(),
            "[fe80::1]:53".parse().unwrap(),
        ]
    );
}
