//! Zone building: incremental updates equal full rebuilds, indexes and counts.
//! (The record rules themselves are tested from wire bytes in `dns::tests`.)

use std::collections::BTreeSet;
use std::sync::Arc;

use meshlite_proto::model::{Protocol, Resource, ResourceKey, ServiceName};
use meshlite_runtime::{ChangeSet, Snapshot};

use super::*;
use crate::fixtures;

fn config() -> ZoneConfig {
    ZoneConfig {
        domain: "cluster.local".into(),
        ttl: 30,
        pod_records: PodRecords::Verified,
        reverse_cidrs: vec!["198.18.0.0/15".parse().unwrap()],
    }
}

/// Same content: every service's records and every address's uses.
fn assert_same(a: &Zone, b: &Zone) {
    assert_eq!(a.services, b.services);
    assert_eq!(a.records, b.records);
    let ns =
        |z: &Zone| -> BTreeSet<String> { z.namespaces.keys().map(|k| k.to_string()).collect() };
    assert_eq!(ns(a), ns(b));
    for (name, n) in &a.namespaces {
        let other = &b.namespaces[name];
        assert_eq!(n.services.len(), other.services.len(), "namespace {name}");
        for (svc, recs) in &n.services {
            assert_eq!(**recs, *other.services[svc], "service {name}/{svc}");
        }
    }
    assert_eq!(a.by_ip.len(), b.by_ip.len());
    for (ip, uses) in &a.by_ip {
        assert_eq!(**uses, *b.by_ip[ip], "uses of {ip}");
    }
}

/// Applies upserts/removals to a snapshot and returns the change set, as the
/// subscriber would.
fn change(snap: &mut Snapshot, upserts: Vec<Resource>, removals: Vec<ResourceKey>) -> ChangeSet {
    let mut ch = ChangeSet::default();
    let note = |ch: &mut ChangeSet, r: &Resource| match r {
        Resource::Service(s) => {
            ch.services.insert(s.service_name());
        }
        Resource::EndpointSlice(s) => {
            ch.services.insert(s.service());
        }
        Resource::Node(_) => ch.nodes = true,
    };
    for r in upserts {
        note(&mut ch, &r);
        ch.upserted.push(r.key());
        if let Some((_, old)) = snap.upsert(1, r) {
            note(&mut ch, &old);
        }
    }
    for k in removals {
        if let Some((_, old)) = snap.remove(&k) {
            note(&mut ch, &old);
            ch.removed.push(k);
        }
    }
    ch
}

#[test]
fn incremental_updates_equal_full_builds() {
    let mut snap = fixtures::rules();
    let mut zone = Zone::build(config(), &snap);
    assert_same(&zone, &Zone::build(config(), &snap));

    let steps: Vec<(Vec<Resource>, Vec<ResourceKey>)> = vec![
        // An endpoint becomes not ready.
        (
            vec![Resource::EndpointSlice(fixtures::slice(
                "default",
                "db-1",
                "db",
                &[("pg", Protocol::Tcp, 5432)],
                vec![fixtures::not_ready("198.18.1.12")],
            ))],
            vec![],
        ),
        // A service goes away (its slices stay, orphaned).
        (vec![], vec![ResourceKey::service("default", "web")]),
        // A new service in a new namespace, sharing an address with another.
        (
            vec![Resource::Service(
                fixtures::cluster_ip("fresh", "svc", &["198.19.0.11"]).with_port(
                    "http",
                    Protocol::Tcp,
                    80,
                ),
            )],
            vec![],
        ),
        // A slice moves to another service.
        (
            vec![Resource::EndpointSlice(fixtures::slice(
                "default",
                "peers-1",
                "empty",
                &[],
                vec![fixtures::ready("198.18.1.20")],
            ))],
            vec![],
        ),
        // The removed service comes back with another cluster IP.
        (
            vec![Resource::Service(fixtures::cluster_ip(
                "default",
                "web",
                &["198.19.0.99"],
            ))],
            vec![ResourceKey::endpoint_slice("v6", "ring-1")],
        ),
    ];
    for (i, (up, rm)) in steps.into_iter().enumerate() {
        let ch = change(&mut snap, up, rm);
        zone = zone.update(&snap, &ch);
        let full = Zone::build(config(), &snap);
        assert_same(&zone, &full);
        assert!(zone.service_count() > 0, "step {i}");
    }
    assert!(zone.service("fresh", "svc").is_some());
    assert!(zone.namespaces.contains_key("fresh"));
    // The moved slice made `empty` exist.
    assert!(zone.service("default", "empty").unwrap().exists());
}

#[test]
fn random_updates_equal_full_builds() {
    // xorshift: deterministic, no dependency.
    let mut state = 0x9E37_79B9_7F4A_7C15_u64;
    let mut next = move |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        usize::try_from(state % n as u64).unwrap()
    };
    let all = fixtures::large_resources(60, 20, 4);
    let mut snap = Snapshot::from_resources(all.iter().take(40).cloned());
    let mut zone = Zone::build(config(), &snap);
    for _ in 0..300 {
        let mut up = Vec::new();
        let mut rm = Vec::new();
        for _ in 0..=next(3) {
            let r = all[next(all.len())].clone();
            match next(4) {
                0 => rm.push(r.key()),
                1 => {
                    // Mutate: drop an endpoint or change a cluster IP.
                    let r = match r {
                        Resource::EndpointSlice(mut s) if !s.endpoints.is_empty() => {
                            let i = next(s.endpoints.len());
                            s.endpoints.remove(i);
                            Resource::EndpointSlice(s)
                        }
                        Resource::Service(mut s) if !s.cluster_ips.is_empty() => {
                            s.cluster_ips = vec![IpAddr::V4(fixtures::service_ip(next(500)))];
                            Resource::Service(s)
                        }
                        other => other,
                    };
                    up.push(r);
                }
                _ => up.push(r),
            }
        }
        let ch = change(&mut snap, up, rm);
        zone = zone.update(&snap, &ch);
    }
    assert_same(&zone, &Zone::build(config(), &snap));
}

#[test]
fn full_change_sets_rebuild() {
    let snap = fixtures::seed();
    let zone = Zone::empty(config());
    let ch = ChangeSet {
        full: true,
        ..ChangeSet::default()
    };
    let next = zone.update(&snap, &ch);
    assert_eq!(next.service_count(), 2);
    assert_eq!(next.serial(), 1);
    // Seed: A 1 + 3 endpoint names + SRV 1 + PTR 1 + 3 endpoint PTRs for the
    // ClusterIP service; 3 A + 3 names + 3 SRV + 3 PTRs for the headless one.
    assert_eq!(next.record_count(), (1 + 3 + 1 + 1 + 3) + (3 + 3 + 3 + 3));
}

#[test]
fn cluster_ip_ptr_wins_over_endpoints() {
    // 198.19.0.11 is both `plain`'s cluster IP and, here, an endpoint of `db`.
    let mut snap = fixtures::rules();
    let ch = change(
        &mut snap,
        vec![Resource::EndpointSlice(fixtures::slice(
            "default",
            "db-extra",
            "db",
            &[],
            vec![fixtures::ready("198.19.0.11")],
        ))],
        vec![],
    );
    let zone = Zone::build(config(), &snap).update(&snap, &ch);
    assert_eq!(
        zone.ptr_targets("198.19.0.11".parse().unwrap()),
        vec!["plain.default.svc.cluster.local".to_string()]
    );
    // An address used by two services' endpoints has a PTR for each.
    let targets = zone.ptr_targets("198.18.1.40".parse().unwrap());
    assert_eq!(
        targets,
        vec!["198-18-1-40.web.default.svc.cluster.local".to_string()]
    );
    let seed = Zone::build(config(), &fixtures::seed());
    assert_eq!(
        seed.ptr_targets("198.18.2.2".parse().unwrap()),
        vec![
            "198-18-2-2.clusterip-service.default.svc.cluster.local".to_string(),
            "198-18-2-2.headless-service.default.svc.cluster.local".to_string(),
        ]
    );
}

#[test]
fn cell_swaps_whole_zones() {
    let cell = ZoneCell::new(Zone::empty(config()));
    let before = cell.load();
    cell.store(Arc::new(Zone::build(config(), &fixtures::seed())));
    // A reader holding the old zone keeps it intact; new readers see the new one.
    assert_eq!(before.service_count(), 0);
    assert_eq!(cell.load().service_count(), 2);
    let name = ServiceName::new("default", "headless-service");
    assert!(cell.load().service(&name.namespace, &name.name).is_some());
}
