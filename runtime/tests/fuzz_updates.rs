//! Bounded-time fuzzing of snapshot application, run by `cargo test`.
//!
//! Inputs are encoded `Update` messages from the checked-in corpus
//! (`fuzz/corpus/updates`), mutated with a deterministic PRNG (bit flips, truncation,
//! splices, random bytes). Each input is decoded as the subscriber decodes it, every
//! upsert converted with `Resource::try_from` (rejections are fine), and the valid
//! ones applied to a `Snapshot` together with the removals. Nothing may panic, and
//! the snapshot's indexes must stay consistent: its digest equals the digest
//! recomputed from its inventory, and every slice is indexed under its service.
//!
//! `MESHLITE_FUZZ_ITERATIONS` (default 500000) and `MESHLITE_FUZZ_SECONDS` (default 15)
//! bound the run; `MESHLITE_FUZZ_SEED` changes the sequence;
//! `MESHLITE_FUZZ_WRITE_CORPUS=1` rewrites the seed corpus.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use meshlite_proto::model::{
    AddressFamily, Endpoint, EndpointPort, EndpointSlice, Node, Protocol, Resource, ResourceKey,
    Service, TargetPort,
};
use meshlite_proto::{InventoryDigest, content_hash, v1};
use meshlite_runtime::Snapshot;
use meshlite_runtime::testing::{Rng, env_or};
use prost::Message;

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/updates")
}

fn resource(r: Resource) -> v1::Resource {
    let kind = v1::resource::Kind::from(&r);
    v1::Resource {
        key: r.key().to_string(),
        hash: content_hash(&kind),
        kind: Some(kind),
    }
}

/// The seed inputs: realistic updates covering every field, and invalid ones.
fn seeds() -> Vec<(String, v1::Update)> {
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let mut svc = Service::cluster_ip("default", "web", ip("198.19.0.1")).with_port(
        "http",
        Protocol::Tcp,
        80,
    );
    svc.ports[0].target_port = TargetPort::Name("http".into());
    svc.external_ips = vec![ip("198.19.1.1")];
    svc.session_affinity_timeout = Some(600);
    let slice = EndpointSlice {
        namespace: "default".into(),
        name: "web-1".into(),
        service_name: "web".into(),
        address_family: AddressFamily::Ipv4,
        ports: vec![EndpointPort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 8080,
            app_protocol: None,
        }],
        endpoints: vec![
            Endpoint::ready(ip("198.18.0.1")).on_node("node1"),
            Endpoint::ready(ip("198.18.0.2")),
        ],
        ignored_by_proxy: false,
    };
    let node = Node {
        name: "node1".into(),
        zone: Some("z".into()),
        addresses: vec![ip("198.18.0.254")],
        pod_cidrs: vec![],
    };
    let full = v1::Update {
        epoch: 1,
        version: 3,
        base_version: 0,
        nonce: "1".into(),
        upserts: vec![
            resource(Resource::Service(svc.clone())),
            resource(Resource::EndpointSlice(slice.clone())),
            resource(Resource::Node(node)),
        ],
        last_chunk: true,
        ..Default::default()
    };
    let mut moved = slice.clone();
    moved.service_name = "other".into();
    let delta = v1::Update {
        epoch: 1,
        version: 5,
        base_version: 3,
        nonce: "2".into(),
        upserts: vec![resource(Resource::EndpointSlice(moved))],
        removals: vec!["service/default/web".into(), "node/node1".into()],
        causes: vec![v1::ChangeCause {
            key: "service/default/web".into(),
            trigger_unix_nanos: 1,
            removed: true,
            ..Default::default()
        }],
        last_chunk: true,
        ..Default::default()
    };
    let mut bad = resource(Resource::Service(svc));
    if let Some(v1::resource::Kind::Service(s)) = bad.kind.as_mut() {
        s.cluster_ips = vec!["not-an-ip".into()];
        s.ports[0].port = 0;
    }
    let invalid = v1::Update {
        version: 6,
        base_version: 5,
        nonce: "3".into(),
        upserts: vec![
            bad,
            v1::Resource {
                key: "service/x".into(),
                hash: 1,
                kind: None,
            },
        ],
        removals: vec!["bogus".into(), "endpointslice/default/nope".into()],
        ..Default::default()
    };
    vec![
        ("full".into(), full),
        ("delta".into(), delta),
        ("invalid".into(), invalid),
    ]
}

fn corpus() -> Vec<Vec<u8>> {
    if std::env::var_os("MESHLITE_FUZZ_WRITE_CORPUS").is_some() {
        std::fs::create_dir_all(corpus_dir()).unwrap();
        for (name, u) in seeds() {
            std::fs::write(corpus_dir().join(format!("{name}.bin")), u.encode_to_vec()).unwrap();
        }
    }
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(corpus_dir())
        .expect("corpus directory")
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    out.sort();
    assert!(out.len() >= 3, "corpus too small");
    out
}

fn mutate(rng: &mut Rng, corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut b = corpus[rng.below(corpus.len())].clone();
    for _ in 0..=rng.below(4) {
        match rng.below(5) {
            0 if !b.is_empty() => {
                let i = rng.below(b.len());
                b[i] ^= 1 << rng.below(8);
            }
            1 if !b.is_empty() => b.truncate(rng.below(b.len())),
            2 => {
                let other = &corpus[rng.below(corpus.len())];
                let at = rng.below(b.len() + 1);
                let from = rng.below(other.len());
                let piece: Vec<u8> = other[from..].iter().copied().take(rng.below(64)).collect();
                b.splice(at..at, piece);
            }
            3 if !b.is_empty() => {
                let i = rng.below(b.len());
                b[i] = rng.next_u64() as u8;
            }
            _ => {
                let n = rng.below(16);
                for _ in 0..n {
                    b.push(rng.next_u64() as u8);
                }
            }
        }
    }
    b
}

fn apply(snapshot: &mut Snapshot, bytes: &[u8]) {
    let Ok(update) = v1::Update::decode(bytes) else {
        return;
    };
    let mut upserts = Vec::new();
    for r in &update.upserts {
        if let Ok(res) = Resource::try_from(r) {
            upserts.push((r.hash, res));
        }
    }
    for (hash, r) in upserts {
        snapshot.upsert(hash, r);
    }
    for k in &update.removals {
        if let Ok(key) = k.parse::<ResourceKey>() {
            snapshot.remove(&key);
        }
    }
}

fn check(snapshot: &Snapshot) {
    let mut d = InventoryDigest::default();
    for (k, h) in snapshot.inventory() {
        d.add(k, h);
    }
    assert_eq!(d, snapshot.digest(), "digest drifted from the inventory");
    assert_eq!(d.count as usize, snapshot.len());
    for s in snapshot.slices() {
        assert!(
            snapshot.slices_for(&s.service()).any(|x| x.name == s.name),
            "slice {} not indexed under its service",
            s.name
        );
    }
}

#[test]
fn mutated_updates_never_break_the_snapshot() {
    let corpus = corpus();
    let iterations: u64 = env_or("MESHLITE_FUZZ_ITERATIONS", 500_000);
    let budget = Duration::from_secs(env_or("MESHLITE_FUZZ_SECONDS", 15));
    let mut rng = Rng(env_or("MESHLITE_FUZZ_SEED", 0x9e37_79b9_7f4a_7c15));
    let started = Instant::now();
    let mut snapshot = Snapshot::new();
    let mut n = 0;
    while n < iterations && started.elapsed() < budget {
        let input = mutate(&mut rng, &corpus);
        apply(&mut snapshot, &input);
        if n % 64 == 0 {
            check(&snapshot);
        }
        if n % 1000 == 0 {
            snapshot = Snapshot::new();
        }
        n += 1;
    }
    check(&snapshot);
    eprintln!("fuzzed {n} updates in {:?}", started.elapsed());
    assert!(
        n >= 1000 || started.elapsed() >= budget,
        "ran only {n} inputs"
    );
}
