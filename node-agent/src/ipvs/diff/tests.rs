use super::*;

fn key(s: &str) -> VsKey {
    VsKey {
        protocol: Protocol::Tcp,
        addr: s.parse().unwrap(),
    }
}

fn udp(s: &str) -> VsKey {
    VsKey {
        protocol: Protocol::Udp,
        addr: s.parse().unwrap(),
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn vs(scheduler: Scheduler, dests: &[(&str, u32)]) -> VirtualServer {
    VirtualServer {
        scheduler,
        flags: 0,
        timeout: 0,
        dests: dests.iter().map(|(a, w)| (sa(a), *w)).collect(),
        owner: "ns/svc".into(),
    }
}

fn kvs(scheduler: &str, dests: &[(&str, u32, u32, u32)]) -> KernelVs {
    KernelVs {
        scheduler: scheduler.into(),
        // The kernel reports HASHED on every service.
        flags: FLAG_HASHED,
        timeout: 0,
        dests: dests
            .iter()
            .map(|(a, weight, active, inactive)| {
                (
                    sa(a),
                    KernelDest {
                        weight: *weight,
                        active: *active,
                        inactive: *inactive,
                    },
                )
            })
            .collect(),
    }
}

const T: Duration = Duration::from_secs(60);

#[test]
fn from_scratch_everything_is_added() {
    let desired: BTreeMap<_, _> = [(
        key("198.19.0.1:80"),
        vs(Scheduler::Rr, &[("198.18.1.1:80", 1), ("198.18.1.2:80", 1)]),
    )]
    .into();
    let mut draining = Draining::new();
    let ops = diff(
        &desired,
        &KernelState::new(),
        &mut draining,
        true,
        Instant::now(),
        T,
    );
    assert_eq!(ops.upserts.len(), 3);
    assert!(ops.deletes.is_empty());
    assert!(matches!(ops.upserts[0], Op::AddService { .. }));
    // Applied, the same plan is a no-op (what a restart sees).
    let mut kernel = KernelState::new();
    apply_to(&mut kernel, &ops.iter().collect::<Vec<_>>());
    for k in kernel.values_mut() {
        k.flags |= FLAG_HASHED;
    }
    let again = diff(&desired, &kernel, &mut draining, true, Instant::now(), T);
    assert!(again.is_empty(), "{again:?}");
}

#[test]
fn changed_attributes_edit_the_service_in_place() {
    let mut want = vs(Scheduler::Rr, &[("198.18.1.1:80", 1)]);
    want.flags = crate::ipvs::plan::FLAG_PERSISTENT;
    want.timeout = 10800;
    let desired: BTreeMap<_, _> = [(key("198.19.0.1:80"), want)].into();
    let kernel: KernelState = [(
        key("198.19.0.1:80"),
        kvs("rr", &[("198.18.1.1:80", 1, 0, 0)]),
    )]
    .into();
    let ops = diff(
        &desired,
        &kernel,
        &mut Draining::new(),
        true,
        Instant::now(),
        T,
    );
    assert_eq!(
        ops.upserts,
        [Op::EditService {
            key: key("198.19.0.1:80"),
            attrs: VsAttrs {
                scheduler: Scheduler::Rr,
                flags: crate::ipvs::plan::FLAG_PERSISTENT,
                timeout: 10800
            }
        }]
    );
    let kernel: KernelState = [(
        key("198.19.0.1:80"),
        kvs("wlc", &[("198.18.1.1:80", 1, 0, 0)]),
    )]
    .into();
    let desired: BTreeMap<_, _> = [(
        key("198.19.0.1:80"),
        vs(Scheduler::Sh, &[("198.18.1.1:80", 1)]),
    )]
    .into();
    let ops = diff(
        &desired,
        &kernel,
        &mut Draining::new(),
        true,
        Instant::now(),
        T,
    );
    assert!(matches!(
        ops.upserts[..],
        [Op::EditService {
            attrs: VsAttrs {
                scheduler: Scheduler::Sh,
                ..
            },
            ..
        }]
    ));
}

#[test]
fn removed_real_servers_drain_at_weight_zero_then_go() {
    let k = key("198.19.0.1:80");
    let desired: BTreeMap<_, _> = [(k, vs(Scheduler::Rr, &[("198.18.1.1:80", 1)]))].into();
    let kernel: KernelState = [(
        k,
        kvs(
            "rr",
            &[("198.18.1.1:80", 1, 0, 0), ("198.18.1.2:80", 1, 2, 5)],
        ),
    )]
    .into();
    let t0 = Instant::now();
    let mut draining = Draining::new();
    // Connections open: weight 0, kept.
    let ops = diff(&desired, &kernel, &mut draining, true, t0, T);
    assert_eq!(
        ops.upserts,
        [Op::EditDest {
            key: k,
            dest: sa("198.18.1.2:80"),
            weight: 0
        }]
    );
    assert!(ops.deletes.is_empty());
    assert_eq!(draining.get(&(k, sa("198.18.1.2:80"))), Some(&t0));

    // Housekeeping: still connections -> nothing; none left -> deleted.
    let fresh = |active, inactive| {
        BTreeMap::from([(
            k,
            BTreeMap::from([(
                sa("198.18.1.2:80"),
                KernelDest {
                    weight: 0,
                    active,
                    inactive,
                },
            )]),
        )])
    };
    assert!(drain(&mut draining, &fresh(0, 1), t0 + Duration::from_secs(5), T).is_empty());
    assert_eq!(
        drain(&mut draining, &fresh(0, 0), t0 + Duration::from_secs(6), T),
        [Op::DelDest {
            key: k,
            dest: sa("198.18.1.2:80")
        }]
    );
    assert!(draining.is_empty());
}

#[test]
fn draining_is_bounded_by_the_timeout() {
    let k = key("198.19.0.1:80");
    let mut draining: Draining = [((k, sa("198.18.1.2:80")), Instant::now())].into();
    let busy = BTreeMap::from([(
        k,
        BTreeMap::from([(
            sa("198.18.1.2:80"),
            KernelDest {
                weight: 0,
                active: 9,
                inactive: 9,
            },
        )]),
    )]);
    let since = draining[&(k, sa("198.18.1.2:80"))];
    assert!(drain(&mut draining, &busy, since + T / 2, T).is_empty());
    assert_eq!(drain(&mut draining, &busy, since + T, T).len(), 1);
}

#[test]
fn stale_counts_never_delete_a_tcp_real_server_but_udp_goes_at_once() {
    let k = key("198.19.0.1:80");
    let u = udp("198.19.0.1:53");
    let desired: BTreeMap<_, _> = [(k, vs(Scheduler::Rr, &[])), (u, vs(Scheduler::Rr, &[]))].into();
    let kernel: KernelState = [
        (k, kvs("rr", &[("198.18.1.2:80", 1, 0, 0)])),
        (u, kvs("rr", &[("198.18.1.2:53", 1, 0, 0)])),
    ]
    .into();
    let mut draining = Draining::new();
    // A partial sync: the zero counts are from the cache, not the kernel.
    let ops = diff(&desired, &kernel, &mut draining, false, Instant::now(), T);
    assert_eq!(
        ops.upserts,
        [Op::EditDest {
            key: k,
            dest: sa("198.18.1.2:80"),
            weight: 0
        }]
    );
    assert_eq!(
        ops.deletes,
        [Op::DelDest {
            key: u,
            dest: sa("198.18.1.2:53")
        }]
    );
    assert_eq!(draining.len(), 1);
}

#[test]
fn a_drained_real_server_that_comes_back_gets_its_weight() {
    let k = key("198.19.0.1:80");
    let mut draining: Draining = [((k, sa("198.18.1.2:80")), Instant::now())].into();
    let desired: BTreeMap<_, _> = [(k, vs(Scheduler::Rr, &[("198.18.1.2:80", 1)]))].into();
    let kernel: KernelState = [(k, kvs("rr", &[("198.18.1.2:80", 0, 1, 1)]))].into();
    let ops = diff(&desired, &kernel, &mut draining, true, Instant::now(), T);
    assert_eq!(
        ops.upserts,
        [Op::EditDest {
            key: k,
            dest: sa("198.18.1.2:80"),
            weight: 1
        }]
    );
    assert!(draining.is_empty());
}

#[test]
fn unwanted_virtual_servers_are_deleted_last() {
    let keep = key("198.19.0.1:80");
    let gone = key("198.19.0.2:80");
    let desired: BTreeMap<_, _> = [(keep, vs(Scheduler::Rr, &[("198.18.1.1:80", 1)]))].into();
    let kernel: KernelState = [
        (keep, kvs("rr", &[])),
        (gone, kvs("rr", &[("198.18.1.1:80", 1, 3, 3)])),
    ]
    .into();
    let mut draining: Draining = [((gone, sa("198.18.1.1:80")), Instant::now())].into();
    let ops = diff(&desired, &kernel, &mut draining, true, Instant::now(), T);
    assert_eq!(
        ops.upserts,
        [Op::AddDest {
            key: keep,
            dest: sa("198.18.1.1:80"),
            weight: 1
        }]
    );
    assert_eq!(ops.deletes, [Op::DelService { key: gone }]);
    assert!(draining.is_empty());
    let order: Vec<&Op> = ops.iter().collect();
    assert!(matches!(order.last(), Some(Op::DelService { .. })));
}
