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

fn main() {
    for (services, headless, eps) in [(10_000, 10_000, 10), (10_000, 1_000, 10)] {
        let snap = fixtures::large(services, headless, eps);
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
             full build {:.1} ms, incremental 1-service update {:.2} ms ({} records; snapshot clone {:.1} ms)",
            headless * eps,
            full.as_secs_f64() * 1e3,
            inc.as_secs_f64() * 1e3,
            z2.record_count(),
            snap_clone.as_secs_f64() * 1e3,
        );
    }
}
