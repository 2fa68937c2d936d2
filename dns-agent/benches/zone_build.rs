//! Zone build and update cost at scale: a full build from a snapshot of 10k
//! services / 100k endpoints, and an incremental update of one service. Prints
//! figures (best of a few runs); run with `cargo bench -p meshlite-dns-agent --bench zone_build`.

use std::time::{Duration, Instant};

use meshlite_dns_agent::fixtures;
use meshlite_dns_agent::zone::{PodRecords, Zone, ZoneConfig};
use meshlite_proto::model::{Resource, ServiceName};
use meshlite_runtime::{ChangeSet, Snapshot};

fn config() -> ZoneConfig {
    ZoneConfig {
        domain: "cluster.local".into(),
        ttl: 30,
        pod_records: PodRecords::Verified,
        reverse_cidrs: vec!["198.18.0.0/15".parse().expect("cidr")],
    }
}

fn best<T>(runs: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut best = Duration::MAX;
    let mut out = None;
    for _ in 0..runs {
        let t = Instant::now();
        let v = f();
        best = best.min(t.elapsed());
        out = Some(v);
    }
    (best, out.expect("runs > 0"))
}

/// In-process cost of one request through the handler (parse, lookup, encode), for
/// the dnsperf mix, without sockets.
fn handler_cost() {
    use std::sync::Arc;

    use meshlite_dns_agent::dns::{DnsHandler, Transport, answer_bytes};
    use meshlite_dns_agent::metrics::Metrics;
    use meshlite_dns_agent::zone::ZoneCell;

    let zone = Zone::build(config(), &fixtures::large(10_000, 1_000, 10));
    let h = DnsHandler::new(
        Arc::new(ZoneCell::new(zone)),
        None,
        Arc::new(Metrics::unregistered()),
        1232,
    );
    let names = [
        ("svc-5001.ns-1.svc.cluster.local", 1u16),
        ("svc-7.ns-7.svc.cluster.local", 1),
        ("_http._tcp.svc-7.ns-7.svc.cluster.local", 33),
        ("nope-3.ns-3.svc.cluster.local", 1),
    ];
    let queries: Vec<Vec<u8>> = names
        .iter()
        .map(|(n, t)| {
            let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
            for l in n.split('.') {
                q.push(u8::try_from(l.len()).expect("short label"));
                q.extend_from_slice(l.as_bytes());
            }
            q.push(0);
            q.extend_from_slice(&t.to_be_bytes());
            q.extend_from_slice(&[0, 1]);
            q
        })
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let n = 200_000;
    let t = Instant::now();
    rt.block_on(async {
        for i in 0..n {
            let out = answer_bytes(&h, &queries[i % 4], Transport::Udp).await;
            assert!(out.is_some());
        }
    });
    let per = t.elapsed() / n as u32;
    println!(
        "handler in-process (parse + lookup + encode, dnsperf mix): {:.2} us/query = {:.0} queries/s on one core",
        per.as_secs_f64() * 1e6,
        1.0 / per.as_secs_f64()
    );
}

/// This process's resident memory (VmRSS), KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    handler_cost();
    for (services, headless, eps) in [(10_000, 10_000, 10), (10_000, 1_000, 10)] {
        let snap = fixtures::large(services, headless, eps);
        // Resident memory of one zone: RSS with one built zone held, minus before.
        let before = rss_kib();
        let held = Zone::build(config(), &snap);
        let zone_kib = rss_kib().saturating_sub(before);
        drop(held);
        let (full, zone) = best(5, || Zone::build(config(), &snap));
        // One headless service loses an endpoint.
        let mut next = snap.clone();
        let name = ServiceName::new("ns-3", "svc-3");
        let first = next.slices_for(&name).next().cloned();
        if let Some(slice) = first {
            let mut s = (*slice).clone();
            s.endpoints.pop();
            next.upsert(1, Resource::EndpointSlice(s));
        }
        let changes = ChangeSet {
            services: [name].into(),
            ..ChangeSet::default()
        };
        let (inc, z2) = best(20, || zone.update(&next, &changes));
        let (snap_clone, _) = best(5, || Snapshot::clone(&snap));
        println!(
            "zone {services} services ({headless} headless x {eps} endpoints = {} endpoints): \
             full build {:.1} ms, incremental 1-service update {:.2} ms ({} records; snapshot clone {:.1} ms; \
             one zone adds {:.1} MiB RSS)",
            headless * eps,
            full.as_secs_f64() * 1e3,
            inc.as_secs_f64() * 1e3,
            z2.record_count(),
            snap_clone.as_secs_f64() * 1e3,
            zone_kib as f64 / 1024.0,
        );
    }
}
