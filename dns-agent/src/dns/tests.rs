//! In-process handler tests from wire bytes: one test per rule of the DNS spec as
//! the issue lists them, plus malformed input.

use std::net::IpAddr;
use std::sync::Arc;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use super::{DnsHandler, Transport, answer_bytes};
use crate::fixtures;
use crate::metrics::Metrics;
use crate::zone::{PodRecords, Zone, ZoneCell, ZoneConfig, name::reverse_name};

pub(super) fn zone_config(pods: PodRecords) -> ZoneConfig {
    ZoneConfig {
        domain: "cluster.local".into(),
        ttl: 30,
        pod_records: pods,
        reverse_cidrs: vec![
            "198.19.0.0/16".parse().unwrap(),
            "198.18.0.0/16".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ],
    }
}

pub(super) fn handler_for(snapshot: &meshlite_runtime::Snapshot, pods: PodRecords) -> DnsHandler {
    let zone = Zone::build(zone_config(pods), snapshot);
    DnsHandler::new(
        Arc::new(ZoneCell::new(zone)),
        None,
        Arc::new(Metrics::unregistered()),
        1232,
    )
}

fn rules() -> DnsHandler {
    handler_for(&fixtures::rules(), PodRecords::Disabled)
}

/// A query message; `edns: Some(size)` adds an OPT record.
pub(super) fn query_bytes(name: &str, t: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = 4242;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

pub(super) async fn ask_with(
    h: &DnsHandler,
    name: &str,
    t: RecordType,
    edns: Option<u16>,
    transport: Transport,
) -> (Message, usize) {
    let bytes = answer_bytes(h, &query_bytes(name, t, edns), transport)
        .await
        .expect("a response");
    (
        Message::from_vec(&bytes).expect("response decodes"),
        bytes.len(),
    )
}

pub(super) async fn ask(h: &DnsHandler, name: &str, t: RecordType) -> Message {
    ask_with(h, name, t, Some(1232), Transport::Udp).await.0
}

fn ips(records: &[Record]) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = records
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

fn ip_list(s: &[&str]) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = s.iter().map(|s| s.parse().unwrap()).collect();
    v.sort();
    v
}

fn srv(records: &[Record]) -> Vec<(u16, u16, u16, String)> {
    let mut v: Vec<_> = records
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(s) => Some((s.priority, s.weight, s.port, s.target.to_ascii())),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

fn assert_negative(m: &Message, rcode: ResponseCode) {
    assert_eq!(m.metadata.response_code, rcode, "{m:?}");
    assert!(m.answers.is_empty(), "{:?}", m.answers);
    assert!(m.metadata.authoritative);
    let soa = m
        .authorities
        .iter()
        .find_map(|r| match &r.data {
            RData::SOA(s) => Some((r.name.to_ascii(), s.clone())),
            _ => None,
        })
        .expect("SOA in authority");
    assert!(
        soa.0.ends_with("cluster.local.") || soa.0.ends_with(".arpa."),
        "{}",
        soa.0
    );
    assert_eq!(soa.1.mname.to_ascii(), "ns.dns.cluster.local.");
    assert_eq!(soa.1.rname.to_ascii(), "hostmaster.cluster.local.");
    assert_eq!(soa.1.minimum, 30);
}

#[tokio::test]
async fn cluster_ip_answers_its_addresses_even_without_endpoints() {
    let h = rules();
    let m = ask(&h, "web.default.svc.cluster.local.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative);
    assert!(m.metadata.recursion_available);
    assert_eq!(m.metadata.id, 4242);
    assert_eq!(ips(&m.answers), ip_list(&["198.19.0.10"]));
    assert_eq!(m.answers[0].ttl, 30);
    let m = ask(&h, "web.default.svc.cluster.local.", RecordType::AAAA).await;
    assert_eq!(ips(&m.answers), ip_list(&["2001:db8::10"]));
    // `plain` has no EndpointSlice at all.
    let m = ask(&h, "plain.default.svc.cluster.local.", RecordType::A).await;
    assert_eq!(ips(&m.answers), ip_list(&["198.19.0.11"]));
}

#[tokio::test]
async fn headless_answers_ready_endpoints_only() {
    let h = rules();
    let m = ask(&h, "db.default.svc.cluster.local.", RecordType::A).await;
    assert!(m.metadata.authoritative);
    // 198.18.1.13 is not ready.
    assert_eq!(
        ips(&m.answers),
        ip_list(&["198.18.1.10", "198.18.1.11", "198.18.1.12"])
    );
    let m = ask(&h, "db.default.svc.cluster.local.", RecordType::AAAA).await;
    assert_eq!(ips(&m.answers), ip_list(&["2001:db8::1:10"]));
}

#[tokio::test]
async fn headless_publishing_not_ready_addresses_includes_them() {
    let h = rules();
    let m = ask(&h, "peers.default.svc.cluster.local.", RecordType::A).await;
    assert_eq!(ips(&m.answers), ip_list(&["198.18.1.20"]));
}

#[tokio::test]
async fn headless_without_ready_endpoints_is_nxdomain() {
    let h = rules();
    let m = ask(&h, "empty.default.svc.cluster.local.", RecordType::A).await;
    assert_negative(&m, ResponseCode::NXDomain);
}

#[tokio::test]
async fn endpoint_hostname_and_dashed_ip_records() {
    let h = rules();
    // Two IPv4 addresses and one IPv6 (from the second slice) under one hostname.
    let m = ask(&h, "db-0.db.default.svc.cluster.local.", RecordType::A).await;
    assert_eq!(ips(&m.answers), ip_list(&["198.18.1.10", "198.18.1.11"]));
    let m = ask(&h, "db-0.db.default.svc.cluster.local.", RecordType::AAAA).await;
    assert_eq!(ips(&m.answers), ip_list(&["2001:db8::1:10"]));
    // No hostname: named by dashed IP, as CoreDNS does.
    let m = ask(
        &h,
        "198-18-1-12.db.default.svc.cluster.local.",
        RecordType::A,
    )
    .await;
    assert_eq!(ips(&m.answers), ip_list(&["198.18.1.12"]));
    let m = ask(
        &h,
        "2001-db8--2-1.ring.v6.svc.cluster.local.",
        RecordType::AAAA,
    )
    .await;
    assert_eq!(ips(&m.answers), ip_list(&["2001:db8::2:1"]));
    // Not ready: no name.
    let m = ask(
        &h,
        "198-18-1-13.db.default.svc.cluster.local.",
        RecordType::A,
    )
    .await;
    assert_negative(&m, ResponseCode::NXDomain);
    // Endpoint names exist under ClusterIP services too (CoreDNS).
    let m = ask(
        &h,
        "198-18-1-40.web.default.svc.cluster.local.",
        RecordType::A,
    )
    .await;
    assert_eq!(ips(&m.answers), ip_list(&["198.18.1.40"]));
}

#[tokio::test]
async fn srv_for_cluster_ip_targets_the_service() {
    let h = rules();
    let m = ask(
        &h,
        "_http._tcp.web.default.svc.cluster.local.",
        RecordType::SRV,
    )
    .await;
    assert_eq!(
        srv(&m.answers),
        vec![(0, 100, 80, "web.default.svc.cluster.local.".into())]
    );
    // The additional section carries the target's addresses.
    assert_eq!(
        ips(&m.additionals),
        ip_list(&["198.19.0.10", "2001:db8::10"])
    );
    let m = ask(
        &h,
        "_dns._udp.web.default.svc.cluster.local.",
        RecordType::SRV,
    )
    .await;
    assert_eq!(srv(&m.answers)[0].2, 53);
    // Wrong protocol: no such name.
    let m = ask(
        &h,
        "_http._udp.web.default.svc.cluster.local.",
        RecordType::SRV,
    )
    .await;
    assert_negative(&m, ResponseCode::NXDomain);
    // SRV on the service name lists every port (CoreDNS).
    let m = ask(&h, "web.default.svc.cluster.local.", RecordType::SRV).await;
    assert_eq!(
        srv(&m.answers),
        vec![
            (0, 50, 53, "web.default.svc.cluster.local.".into()),
            (0, 50, 80, "web.default.svc.cluster.local.".into()),
        ]
    );
    // An SRV name exists without A records: NODATA.
    let m = ask(
        &h,
        "_http._tcp.web.default.svc.cluster.local.",
        RecordType::A,
    )
    .await;
    assert_negative(&m, ResponseCode::NoError);
}

#[tokio::test]
async fn srv_for_headless_targets_each_ready_endpoint() {
    let h = rules();
    let m = ask(
        &h,
        "_pg._tcp.db.default.svc.cluster.local.",
        RecordType::SRV,
    )
    .await;
    assert_eq!(
        srv(&m.answers),
        vec![
            (
                0,
                50,
                5432,
                "198-18-1-12.db.default.svc.cluster.local.".into()
            ),
            (0, 50, 5432, "db-0.db.default.svc.cluster.local.".into()),
        ]
    );
    assert_eq!(
        ips(&m.additionals),
        ip_list(&[
            "198.18.1.10",
            "198.18.1.11",
            "198.18.1.12",
            "2001:db8::1:10"
        ])
    );
    let owners: Vec<String> = m.additionals.iter().map(|r| r.name.to_ascii()).collect();
    assert!(owners.contains(&"db-0.db.default.svc.cluster.local.".to_string()));
}

#[tokio::test]
async fn ptr_for_cluster_ips_and_endpoints_ipv4() {
    let h = rules();
    let ptr = |m: &Message| -> Vec<String> {
        m.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::PTR(p) => Some(p.0.to_ascii()),
                _ => None,
            })
            .collect()
    };
    let m = ask(&h, "10.0.19.198.in-addr.arpa.", RecordType::PTR).await;
    assert!(m.metadata.authoritative);
    assert_eq!(ptr(&m), vec!["web.default.svc.cluster.local."]);
    let m = ask(&h, "12.1.18.198.in-addr.arpa.", RecordType::PTR).await;
    assert_eq!(ptr(&m), vec!["198-18-1-12.db.default.svc.cluster.local."]);
    let m = ask(&h, "10.1.18.198.in-addr.arpa.", RecordType::PTR).await;
    assert_eq!(ptr(&m), vec!["db-0.db.default.svc.cluster.local."]);
    // Unknown address inside a configured CIDR: authoritative NXDOMAIN, reverse SOA.
    let m = ask(&h, "99.99.18.198.in-addr.arpa.", RecordType::PTR).await;
    assert_negative(&m, ResponseCode::NXDomain);
    assert_eq!(m.authorities[0].name.to_ascii(), "18.198.in-addr.arpa.");
    // Outside every configured CIDR: not ours, forwarded (refused here: no upstream).
    let m = ask(&h, "1.0.0.127.in-addr.arpa.", RecordType::PTR).await;
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    assert!(!m.metadata.authoritative);
}

#[tokio::test]
async fn ptr_for_ipv6_in_full_nibble_form() {
    let h = rules();
    let name = format!("{}.", reverse_name("2001:db8::10".parse().unwrap()));
    assert_eq!(name.split('.').count(), 32 + 3);
    let m = ask(&h, &name, RecordType::PTR).await;
    match &m.answers[0].data {
        RData::PTR(p) => assert_eq!(p.0.to_ascii(), "web.default.svc.cluster.local."),
        other => panic!("{other:?}"),
    }
    let name = format!("{}.", reverse_name("2001:db8::1:10".parse().unwrap()));
    let m = ask(&h, &name, RecordType::PTR).await;
    match &m.answers[0].data {
        RData::PTR(p) => assert_eq!(p.0.to_ascii(), "db-0.db.default.svc.cluster.local."),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn external_name_is_a_cname_chased_inside_the_zone() {
    let h = rules();
    let m = ask(&h, "ext.default.svc.cluster.local.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(m.answers.len(), 1);
    match &m.answers[0].data {
        RData::CNAME(c) => assert_eq!(c.0.to_ascii(), "example.org."),
        other => panic!("{other:?}"),
    }
    // In-zone target: CNAME plus the target's records, owned by the target.
    let m = ask(&h, "alias.default.svc.cluster.local.", RecordType::A).await;
    assert_eq!(m.answers.len(), 2);
    assert!(matches!(m.answers[0].data, RData::CNAME(_)));
    assert_eq!(
        m.answers[1].name.to_ascii(),
        "web.default.svc.cluster.local."
    );
    assert_eq!(ips(&m.answers), ip_list(&["198.19.0.10"]));
    // A CNAME query gets the CNAME alone.
    let m = ask(&h, "alias.default.svc.cluster.local.", RecordType::CNAME).await;
    assert_eq!(m.answers.len(), 1);
}

#[tokio::test]
async fn dns_version_txt() {
    let h = rules();
    let m = ask(&h, "dns-version.cluster.local.", RecordType::TXT).await;
    match &m.answers[0].data {
        RData::TXT(t) => assert_eq!(t.to_string(), "1.1.0"),
        other => panic!("{other:?}"),
    }
    let m = ask(&h, "dns-version.cluster.local.", RecordType::A).await;
    assert_negative(&m, ResponseCode::NoError);
}

#[tokio::test]
async fn nodata_versus_nxdomain() {
    let h = rules();
    // Exists without the type: NODATA with SOA.
    let m = ask(&h, "plain.default.svc.cluster.local.", RecordType::AAAA).await;
    assert_negative(&m, ResponseCode::NoError);
    let m = ask(&h, "plain.default.svc.cluster.local.", RecordType::MX).await;
    assert_negative(&m, ResponseCode::NoError);
    // Empty non-terminals.
    for ent in [
        "default.svc.cluster.local.",
        "svc.cluster.local.",
        "_tcp.web.default.svc.cluster.local.",
    ] {
        let m = ask(&h, ent, RecordType::A).await;
        assert_negative(&m, ResponseCode::NoError);
    }
    // Nothing there.
    for nx in [
        "nope.default.svc.cluster.local.",
        "nope.svc.cluster.local.",
        "x.web.default.svc.cluster.local.",
        "_udp.db.default.svc.cluster.local.",
        "a.b.c.d.e.svc.cluster.local.",
        "other.cluster.local.",
        "web.default.pod.cluster.local.",
    ] {
        let m = ask(&h, nx, RecordType::A).await;
        assert_negative(&m, ResponseCode::NXDomain);
    }
    // The apex answers SOA and NS.
    let m = ask(&h, "cluster.local.", RecordType::SOA).await;
    assert!(matches!(m.answers[0].data, RData::SOA(_)));
    let m = ask(&h, "cluster.local.", RecordType::NS).await;
    assert!(matches!(m.answers[0].data, RData::NS(_)));
}

#[tokio::test]
async fn matching_ignores_case_and_answers_keep_it() {
    let h = rules();
    let name = "WeB.DeFault.SVC.Cluster.LOCAL.";
    let m = ask(&h, name, RecordType::A).await;
    assert_eq!(ips(&m.answers), ip_list(&["198.19.0.10"]));
    assert_eq!(m.answers[0].name.to_ascii(), name);
    assert_eq!(m.queries[0].name().to_ascii(), name);
    let m = ask(
        &h,
        "_HTTP._Tcp.web.default.svc.cluster.local.",
        RecordType::SRV,
    )
    .await;
    assert_eq!(srv(&m.answers).len(), 1);
}

#[tokio::test]
async fn pod_records_follow_the_mode() {
    let snap = fixtures::rules();
    let disabled = handler_for(&snap, PodRecords::Disabled);
    let insecure = handler_for(&snap, PodRecords::Insecure);
    let verified = handler_for(&snap, PodRecords::Verified);
    let name = "198-18-1-12.default.pod.cluster.local.";
    let unknown = "198-18-9-9.default.pod.cluster.local.";

    assert_negative(
        &ask(&disabled, name, RecordType::A).await,
        ResponseCode::NXDomain,
    );

    let m = ask(&insecure, unknown, RecordType::A).await;
    assert_eq!(ips(&m.answers), ip_list(&["198.18.9.9"]));
    let m = ask(
        &insecure,
        "2001-db8--5.default.pod.cluster.local.",
        RecordType::AAAA,
    )
    .await;
    assert_eq!(ips(&m.answers), ip_list(&["2001:db8::5"]));
    // The address family decides the type: A of an IPv6 pod is NODATA.
    let m = ask(
        &insecure,
        "2001-db8--5.default.pod.cluster.local.",
        RecordType::A,
    )
    .await;
    assert_negative(&m, ResponseCode::NoError);
    assert_negative(
        &ask(
            &insecure,
            "not-an-ip.default.pod.cluster.local.",
            RecordType::A,
        )
        .await,
        ResponseCode::NXDomain,
    );

    let m = ask(&verified, name, RecordType::A).await;
    assert_eq!(ips(&m.answers), ip_list(&["198.18.1.12"]));
    // Not-ready pods exist too.
    let m = ask(
        &verified,
        "198-18-1-13.default.pod.cluster.local.",
        RecordType::A,
    )
    .await;
    assert_eq!(ips(&m.answers), ip_list(&["198.18.1.13"]));
    assert_negative(
        &ask(&verified, unknown, RecordType::A).await,
        ResponseCode::NXDomain,
    );
    assert_negative(
        &ask(
            &verified,
            "198-18-1-12.other.pod.cluster.local.",
            RecordType::A,
        )
        .await,
        ResponseCode::NXDomain,
    );
}

fn big_headless(n: usize) -> meshlite_runtime::Snapshot {
    use meshlite_proto::model::Resource;
    let eps = (0..n)
        .map(|i| fixtures::ready(&fixtures::pod_ip(i).to_string()))
        .collect();
    meshlite_runtime::Snapshot::from_resources([
        Resource::Service(fixtures::headless("default", "big")),
        Resource::EndpointSlice(fixtures::slice("default", "big-1", "big", &[], eps)),
    ])
}

#[tokio::test]
async fn large_answers_truncate_over_udp_and_complete_over_tcp() {
    let h = handler_for(&big_headless(200), PodRecords::Disabled);
    let name = "big.default.svc.cluster.local.";
    // No EDNS: 512 bytes.
    let (m, size) = ask_with(&h, name, RecordType::A, None, Transport::Udp).await;
    assert!(m.metadata.truncation);
    assert!(size <= 512, "{size}");
    assert!(m.answers.len() < 200);
    // EDNS 4096 asked, 1232 honoured (the server's cap).
    let (m, size) = ask_with(&h, name, RecordType::A, Some(4096), Transport::Udp).await;
    assert!(m.metadata.truncation);
    assert!(size <= 1232, "{size}");
    // EDNS below 512 counts as 512.
    let (m, size) = ask_with(&h, name, RecordType::A, Some(100), Transport::Udp).await;
    assert!(m.metadata.truncation && size <= 512);
    // TCP: everything.
    let (m, _) = ask_with(&h, name, RecordType::A, None, Transport::Tcp).await;
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 200);
    // Small answers are not truncated.
    let h = rules();
    let (m, _) = ask_with(
        &h,
        "web.default.svc.cluster.local.",
        RecordType::A,
        None,
        Transport::Udp,
    )
    .await;
    assert!(!m.metadata.truncation);
}

#[tokio::test]
async fn malformed_and_unsupported_requests() {
    let h = rules();
    // Two questions: FORMERR.
    let mut m = Message::query();
    m.metadata.id = 7;
    m.add_query(Query::query(
        Name::from_ascii("a.cluster.local.").unwrap(),
        RecordType::A,
    ));
    m.add_query(Query::query(
        Name::from_ascii("b.cluster.local.").unwrap(),
        RecordType::A,
    ));
    let r = reply(&h, &m.to_vec().unwrap()).await;
    assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
    assert_eq!(r.metadata.id, 7);
    // No question: FORMERR.
    let r = reply(&h, &Message::query().to_vec().unwrap()).await;
    assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
    // Opcodes other than QUERY: NOTIMP.
    let mut m = Message::new(9, MessageType::Query, OpCode::Status);
    m.add_query(Query::query(
        Name::from_ascii("a.cluster.local.").unwrap(),
        RecordType::A,
    ));
    let r = reply(&h, &m.to_vec().unwrap()).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NotImp);
    // EDNS version 1: BADVERS.
    let mut m = Message::query();
    m.add_query(Query::query(
        Name::from_ascii("a.cluster.local.").unwrap(),
        RecordType::A,
    ));
    let mut e = Edns::new();
    e.set_version(1);
    m.set_edns(e);
    let r = reply(&h, &m.to_vec().unwrap()).await;
    // 16 is BADVERS in a response to an OPT, BADSIG to hickory's decoder.
    assert_eq!(u16::from(r.metadata.response_code), 16);
    assert_eq!(r.edns.as_ref().map(Edns::version), Some(0));
    // Class CH: REFUSED; AXFR: REFUSED.
    let mut q = Query::query(Name::from_ascii("version.bind.").unwrap(), RecordType::TXT);
    q.set_query_class(DNSClass::CH);
    let mut m = Message::query();
    m.add_query(q);
    let r = reply(&h, &m.to_vec().unwrap()).await;
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);
    let r = reply(&h, &query_bytes("cluster.local.", RecordType::AXFR, None)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);
    // A header followed by garbage: FORMERR with the request's id.
    let mut bytes = query_bytes("web.default.svc.cluster.local.", RecordType::A, None);
    bytes.truncate(20);
    let r = reply(&h, &bytes).await;
    assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
    assert_eq!(r.metadata.id, 4242);
    // Shorter than a header, or a response: dropped.
    assert!(answer_bytes(&h, &[1, 2, 3], Transport::Udp).await.is_none());
    let resp = Message::response(1, OpCode::Query).to_vec().unwrap();
    assert!(answer_bytes(&h, &resp, Transport::Udp).await.is_none());
}

#[tokio::test]
async fn compressed_question_names_are_echoed_uncompressed() {
    // Found by the fuzz test: a question name that is a pointer into the header.
    // hickory echoes question bytes verbatim; the pointer would be wrong in the
    // response, so the handler re-encodes such questions.
    let h = rules();
    let bytes = [
        0x00, 0x01, 0x01, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xc0, 0x02, 0x00,
        0x01, 0x00, 0x01,
    ];
    let r = reply(&h, &bytes).await;
    assert_eq!(r.metadata.id, 1);
    assert_eq!(r.queries.len(), 1);
}

async fn reply(h: &DnsHandler, bytes: &[u8]) -> Message {
    let out = answer_bytes(h, bytes, Transport::Udp)
        .await
        .expect("a response");
    Message::from_vec(&out).unwrap()
}

#[tokio::test]
async fn cluster_names_are_never_forwarded() {
    // With no forwarder configured, a forwarded name is REFUSED; every cluster name,
    // found or not, gets an authoritative answer instead.
    let h = rules();
    for name in [
        "web.default.svc.cluster.local.",
        "nope.nope.svc.cluster.local.",
        "x.y.z.cluster.local.",
        "cluster.local.",
    ] {
        let m = ask(&h, name, RecordType::A).await;
        assert!(m.metadata.authoritative, "{name}");
        assert_ne!(m.metadata.response_code, ResponseCode::Refused, "{name}");
    }
    let m = ask(&h, "example.org.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
}

#[tokio::test]
async fn seed_scenario_answers() {
    let h = handler_for(&fixtures::seed(), PodRecords::Insecure);
    let m = ask(
        &h,
        "headless-service.default.svc.cluster.local.",
        RecordType::A,
    )
    .await;
    assert_eq!(
        ips(&m.answers),
        ip_list(&["198.18.1.1", "198.18.2.1", "198.18.2.2"])
    );
    let m = ask(
        &h,
        "clusterip-service.default.svc.cluster.local.",
        RecordType::A,
    )
    .await;
    assert_eq!(ips(&m.answers), ip_list(&["198.19.100.100"]));
}

/// Over 64 KiB even TCP cannot carry the answer: as many records as fit, TC set
/// (CoreDNS does the same), never SERVFAIL.
#[tokio::test]
async fn answers_beyond_64k_over_tcp_are_truncated_not_failed() {
    use meshlite_proto::model::{Protocol, Resource};
    let eps = (0..5000)
        .map(|i| fixtures::named(&format!("pod-{i}"), &[&fixtures::pod_ip(i).to_string()]))
        .collect();
    let snapshot = meshlite_runtime::Snapshot::from_resources([
        Resource::Service(fixtures::headless("default", "big")),
        Resource::EndpointSlice(fixtures::slice(
            "default",
            "big-1",
            "big",
            &[("http", Protocol::Tcp, 80)],
            eps,
        )),
    ]);
    let h = handler_for(&snapshot, PodRecords::Disabled);
    for (name, t) in [
        ("big.default.svc.cluster.local.", RecordType::A),
        ("_http._tcp.big.default.svc.cluster.local.", RecordType::SRV),
    ] {
        let (m, size) = ask_with(&h, name, t, None, Transport::Tcp).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{t}");
        assert!(m.metadata.truncation, "{t}");
        assert!(size <= usize::from(u16::MAX), "{t}: {size}");
        assert!(
            m.answers.len() > 500 && m.answers.len() < 5000,
            "{t}: {}",
            m.answers.len()
        );
    }
}

/// hickory's source check, which our UDP loop does itself.
#[test]
fn sources_nobody_can_own_are_refused() {
    use crate::metrics::Refusal;
    let r = |s: &str| super::refusal(s.parse().unwrap());
    assert_eq!(r("127.0.0.1:0"), Some(Refusal::port_zero));
    assert_eq!(r("0.0.0.0:5353"), Some(Refusal::unspecified));
    assert_eq!(r("[::]:5353"), Some(Refusal::unspecified));
    assert_eq!(r("255.255.255.255:5353"), Some(Refusal::broadcast));
    assert_eq!(r("[::ffff:255.255.255.255]:5353"), Some(Refusal::broadcast));
    assert_eq!(r("127.0.0.1:5353"), None);
    assert_eq!(r("[2001:db8::1]:5353"), None);
}

/// The UDP fast path answers exactly as the general path does: every name and
/// rule of the fixtures, each query type, any spelling, with and without EDNS.
#[tokio::test]
async fn fast_path_answers_as_the_general_path() {
    let snap = fixtures::rules();
    let zone = Zone::build(zone_config(PodRecords::Verified), &snap);
    let mut names: Vec<String> = vec![
        "cluster.local.".into(),
        "svc.cluster.local.".into(),
        "default.svc.cluster.local.".into(),
        "nope.svc.cluster.local.".into(),
        "nope.default.svc.cluster.local.".into(),
        "x.nope.default.svc.cluster.local.".into(),
        "_x._tcp.nope.default.svc.cluster.local.".into(),
    ];
    for s in zone.all_services() {
        let base = format!("{}.{}.svc.cluster.local.", s.name, s.namespace);
        names.push(format!("nope.{base}"));
        names.push(format!("_nope._tcp.{base}"));
        names.push(format!("_tcp.{base}"));
        for label in s.endpoints.keys() {
            names.push(format!("{label}.{base}"));
        }
        for set in &s.srv {
            names.push(format!(
                "_{}._{}.{base}",
                set.port_name,
                set.protocol.as_lower()
            ));
            names.push(format!("_{}._udp.{base}", set.port_name));
        }
        names.push(base);
    }
    let h = handler_for(&snap, PodRecords::Verified);
    let types = [
        RecordType::A,
        RecordType::AAAA,
        RecordType::SRV,
        RecordType::TXT,
        RecordType::PTR,
        RecordType::CNAME,
        RecordType::MX,
        RecordType::ANY,
    ];
    let mut fast = 0;
    for name in &names {
        let upper: String = name
            .chars()
            .enumerate()
            .map(|(i, c)| {
                if i % 2 == 0 {
                    c.to_ascii_uppercase()
                } else {
                    c
                }
            })
            .collect();
        for spelling in [name.as_str(), upper.as_str()] {
            for t in types {
                for edns in [None, Some(1232), Some(4096), Some(100)] {
                    let request = query_bytes(spelling, t, edns);
                    let mut out = Vec::new();
                    let general = super::answer_general(
                        &h,
                        request.clone(),
                        ([127, 0, 0, 1], 5353).into(),
                        Transport::Udp,
                    )
                    .await
                    .expect("a response");
                    let Some(_) = super::fast::answer(&zone, &request, 1232, &mut out) else {
                        continue;
                    };
                    fast += 1;
                    let (a, b) = (
                        Message::from_vec(&out).expect("fast response decodes"),
                        Message::from_vec(&general).expect("general response decodes"),
                    );
                    let what = format!("{spelling} {t} {edns:?}");
                    assert_eq!(a.metadata, b.metadata, "{what}");
                    assert_eq!(a.queries, b.queries, "{what}");
                    let text =
                        |rs: &[Record]| rs.iter().map(ToString::to_string).collect::<Vec<_>>();
                    assert_eq!(text(&a.answers), text(&b.answers), "{what}");
                    assert_eq!(text(&a.authorities), text(&b.authorities), "{what}");
                    assert_eq!(text(&a.additionals), text(&b.additionals), "{what}");
                    assert_eq!(a.edns, b.edns, "{what}");
                    assert!(
                        out.len() <= general.len(),
                        "{what}: {} > {}",
                        out.len(),
                        general.len()
                    );
                }
            }
        }
    }
    // Most of those are the fast path's (not ANY, not the composed names).
    assert!(fast > names.len() * 2 * 4 * 4, "{fast} fast answers");
}

/// Requests the fast path leaves to the general path.
#[test]
fn fast_path_declines_what_it_does_not_read() {
    let zone = Zone::build(zone_config(PodRecords::Disabled), &fixtures::rules());
    let mut out = Vec::new();
    let mut fast = |bytes: &[u8]| super::fast::answer(&zone, bytes, 1232, &mut out).is_some();
    let plain = query_bytes("web.default.svc.cluster.local.", RecordType::A, Some(1232));
    assert!(fast(&plain));
    for t in [RecordType::ANY, RecordType::AXFR, RecordType::IXFR] {
        assert!(
            !fast(&query_bytes("web.default.svc.cluster.local.", t, None)),
            "{t}"
        );
    }
    // Outside the zone; names the zone composes per query.
    for name in [
        "example.org.",
        "cluster.local.",
        "dns-version.cluster.local.",
        "10.0.19.198.in-addr.arpa.",
    ] {
        assert!(!fast(&query_bytes(name, RecordType::A, None)), "{name}");
    }
    // A response, another opcode, two questions, trailing bytes, EDNS version 1.
    let mut response = plain.clone();
    response[2] |= 0x80;
    assert!(!fast(&response));
    let mut notify = plain.clone();
    notify[2] |= 4 << 3;
    assert!(!fast(&notify));
    let mut two = plain.clone();
    two[5] = 2;
    assert!(!fast(&two));
    let mut trailing = query_bytes("web.default.svc.cluster.local.", RecordType::A, None);
    trailing.push(0);
    assert!(!fast(&trailing));
    let mut v1 = plain.clone();
    let at = v1.len() - 5;
    v1[at] = 1;
    assert!(!fast(&v1));
    // Too big for 512 bytes without EDNS: the general path truncates.
    let zone = Zone::build(zone_config(PodRecords::Disabled), &big_headless(100));
    let big = query_bytes("big.default.svc.cluster.local.", RecordType::A, None);
    assert!(super::fast::answer(&zone, &big, 1232, &mut out).is_none());
}
