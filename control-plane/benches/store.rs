//! Store and delta at cluster scale: 10k services, 100k endpoints (one slice of 10
//! endpoints per service).
//!
//! `cargo bench -p meshlite-control-plane --bench store`
//! Prints: time to ingest the full state, to cut a full snapshot, to apply one
//! endpoint change and cut its delta, and the bytes of that delta on the wire, whole
//! and as an EndpointSlice patch.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use meshlite_control_plane::server::frames;
use meshlite_control_plane::store::{Cause, Change, Encoded, Kind, Store, View};
use meshlite_proto::model::{
    AddressFamily, Endpoint, EndpointPort, EndpointSlice, Protocol, Resource, Service,
};
use prost::Message;

const SERVICES: u32 = 10_000;
const PER_SERVICE: u32 = 10;

fn ip(base: u8, i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, base, (i >> 8) as u8, (i & 0xff) as u8))
}

fn service(i: u32) -> Resource {
    let mut s = Service::cluster_ip("bench", &format!("svc-{i}"), ip(19, i)).with_port(
        "http",
        Protocol::Tcp,
        80,
    );
    s.ports[0].node_port = None;
    Resource::Service(s)
}

fn slice(i: u32, generation: u32) -> Resource {
    Resource::EndpointSlice(EndpointSlice {
        namespace: "bench".into(),
        name: format!("svc-{i}-abcde"),
        service_name: format!("svc-{i}"),
        address_family: AddressFamily::Ipv4,
        ports: vec![EndpointPort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 8080,
            app_protocol: None,
        }],
        endpoints: (0..PER_SERVICE)
            .map(|e| {
                // Each generation replaces the first pod: a new address and name.
                let g = if e == 0 { generation } else { 0 };
                let mut ep = Endpoint::ready(ip(18, (i * PER_SERVICE + e + g * 7_919) % 65_000))
                    .on_node(&format!("node-{}", (i + e + g) % 5000));
                ep.target_pod = Some(format!("svc-{i}-pod-{e}-{g}"));
                ep
            })
            .collect(),
        ignored_by_proxy: false,
    })
}

fn cluster() -> Vec<Change> {
    (0..SERVICES)
        .flat_map(|i| [service(i), slice(i, 0)])
        .map(|resource| Change::Upsert {
            value: Encoded::new(&resource),
            cause: Cause::observed_now(None),
        })
        .collect()
}

fn loaded() -> Store {
    let store = Store::new(Duration::from_secs(300), Kind::ALL);
    store.apply(cluster());
    store
}

fn bench(c: &mut Criterion) {
    let changes = cluster();
    let mut g = c.benchmark_group("store");
    g.sample_size(10);
    g.bench_function("ingest 10k services + 10k slices (100k endpoints)", |b| {
        b.iter_batched(
            || changes.clone(),
            |ch| {
                let store = Store::new(Duration::from_secs(300), Kind::ALL);
                black_box(store.apply(ch));
            },
            criterion::BatchSize::LargeInput,
        )
    });
    let store = loaded();
    g.bench_function("cut full snapshot", |b| {
        b.iter(|| black_box(store.full(&View::Node("node-1".into()))))
    });
    g.finish();

    let mut g = c.benchmark_group("delta");
    let mut generation = 1;
    g.bench_function("one endpoint change: apply + cut delta", |b| {
        b.iter(|| {
            let v = store.version();
            generation += 1;
            store.apply(vec![Change::Upsert {
                value: Encoded::new(&slice(42, generation)),
                cause: Cause::observed_now(None),
            }]);
            black_box(
                store
                    .delta_with_patches(v, &View::Node("node-1".into()), true)
                    .unwrap(),
            )
        })
    });
    g.finish();

    // Figures that are sizes, not times.
    let v = store.version();
    store.apply(vec![Change::Upsert {
        value: Encoded::new(&slice(7, 99_999)),
        cause: Cause::observed_now(None),
    }]);
    let wire = |patches: bool| -> usize {
        let delta = store
            .delta_with_patches(v, &View::Node("node-1".into()), patches)
            .unwrap();
        frames(1, v, "1", delta, 3 << 20)
            .iter()
            .map(|f| f.encoded_len())
            .sum()
    };
    let (delta_bytes, patch_bytes) = (wire(false), wire(true));
    let full = store.full(&View::Node("node-1".into()));
    let full_bytes: usize = frames(1, 0, "1", full, 3 << 20)
        .iter()
        .map(|f| f.encoded_len())
        .sum();
    let t = Instant::now();
    let fresh = loaded();
    let ingest = t.elapsed();
    println!();
    println!(
        "figures: services={SERVICES} endpoints={} slices={SERVICES}",
        SERVICES * PER_SERVICE
    );
    println!(
        "figures: ingest (one run)            {:>10.1} ms",
        ingest.as_secs_f64() * 1e3
    );
    println!(
        "figures: one-endpoint delta on wire  {delta_bytes:>10} bytes (whole slice of {PER_SERVICE} endpoints + cause)"
    );
    println!(
        "figures: same delta as a patch       {patch_bytes:>10} bytes (agents holding the previous version)"
    );
    println!(
        "figures: full snapshot on wire       {:>10.1} MiB",
        full_bytes as f64 / (1 << 20) as f64
    );
    black_box(fresh);
}

criterion_group!(benches, bench);
criterion_main!(benches);
