//! The nftables mode's netlink writer against the kernel: every rule shape and
//! element it compiles is written twice into one table, once by `nft -f` and once
//! as a netlink batch, and `nft list` must print both the same. Then whole
//! incremental syncs: the table after a run of random changes written over
//! netlink must list exactly as the same changes written with `nft -f`.
//! Needs root and `nft`; fails naming what is missing otherwise.

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/netns.rs"]
mod netns;

use meshlite_node_agent::backend::{Backend, Desired};
use meshlite_node_agent::nftables::{
    Changes, DEFAULT_TABLE, NftablesBackend, NftablesConfig, netlink, render,
};
use meshlite_node_agent::proxy::{IpFamily, ProxyView};
use meshlite_proto::model::{
    AddressFamily, Endpoint, EndpointPort, EndpointSlice, Node, Protocol, Resource, Service,
    ServiceType,
};
use meshlite_runtime::Snapshot;
use netns::Netns;

fn require() {
    if let Err(e) = netns::require_root_and_tools(&["nft"]) {
        panic!("{e:#}");
    }
}

/// The rules of `chain`, as `nft list` prints them.
fn listed(ns: &Netns, family: &str, chain: &str) -> Vec<String> {
    let out = ns
        .exec(&["nft", "list", "chain", family, DEFAULT_TABLE, chain])
        .unwrap();
    out.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("table") && !l.starts_with("chain"))
        .filter(|l| *l != "}")
        .map(str::to_string)
        .collect()
}

/// Sends `batch` from a thread inside `ns`.
fn send_in(ns: &Netns, batch: netlink::Batch) -> Result<(), String> {
    let rt = ns.runtime().unwrap();
    futures::executor::block_on(rt.run(async move { batch.send().map_err(|e| e.to_string()) }))
}

fn base(ns: &Netns, family: IpFamily) {
    let cfg = render::RenderConfig {
        table: DEFAULT_TABLE.into(),
        local: Default::default(),
        masquerade_all: false,
        masquerade_mark: 0x4000,
        service_cidrs: vec![],
        nodeport_ips: vec![],
    };
    let script = render::base_script(family, &cfg);
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), script).unwrap();
    ns.exec(&["nft", "-f", file.path().to_str().unwrap()])
        .unwrap();
}

fn nft_text(ns: &Netns, text: &str) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), text).unwrap();
    ns.exec(&["nft", "-f", file.path().to_str().unwrap()])
        .unwrap();
}

#[test]
fn every_compiled_rule_lists_as_nft_writes_it() {
    require();
    for (family, f, rules) in [
        (
            IpFamily::V4,
            "ip",
            vec![
                "ip daddr 198.19.0.10 ip saddr != 198.18.0.0/16 jump mark-for-masquerade",
                "ip daddr 198.19.0.10 ip saddr != 198.18.0.0/17 jump mark-for-masquerade",
                "ip daddr 198.19.0.10 ip saddr != 10.96.0.0/12 jump mark-for-masquerade",
                "ip daddr 198.19.0.10 jump mark-for-masquerade",
                "numgen random mod 3 == 0 meta l4proto tcp dnat to 198.18.1.2:8080",
                "numgen random mod 2 == 0 meta l4proto udp dnat to 198.18.1.3:53",
                "meta l4proto sctp dnat to 198.18.1.4:9",
                "ip saddr 198.18.0.0/16 goto services",
                "fib saddr type local jump mark-for-masquerade",
                "fib saddr type local goto services",
                "jump mark-for-masquerade",
                "numgen random mod 2 == 0 goto services",
                "goto services",
                "drop",
            ],
        ),
        (
            IpFamily::V6,
            "ip6",
            vec![
                "ip6 daddr 2001:db8::10 ip6 saddr != 2001:db8:1::/64 jump mark-for-masquerade",
                "ip6 daddr 2001:db8::10 ip6 saddr != 2001:db8:1::/60 jump mark-for-masquerade",
                "numgen random mod 2 == 0 meta l4proto tcp dnat to [2001:db8:1::2]:8080",
                "meta l4proto tcp dnat to [2001:db8:1::3]:80",
                "ip6 saddr 2001:db8:1::/64 goto services",
                "fib saddr type local goto services",
            ],
        ),
    ] {
        let ns = Netns::new("nftnl").unwrap();
        base(&ns, family);
        let rules: Vec<String> = rules.into_iter().map(String::from).collect();
        let mut text = format!("add chain {f} {DEFAULT_TABLE} by-nft\n");
        for r in &rules {
            text.push_str(&format!("add rule {f} {DEFAULT_TABLE} by-nft {r}\n"));
        }
        nft_text(&ns, &text);
        let changes = Changes {
            chains: vec![("by-netlink".into(), rules.clone())],
            ..Changes::default()
        };
        let batch = netlink::encode(family, DEFAULT_TABLE, &changes).unwrap();
        send_in(&ns, batch).unwrap();
        let a = listed(&ns, f, "by-nft");
        let b = listed(&ns, f, "by-netlink");
        assert_eq!(a.len(), rules.len(), "{a:#?}");
        assert_eq!(a, b, "{family:?}: nft wrote the left, netlink the right");
    }
}

#[test]
fn elements_written_over_netlink_list_as_nft_writes_them() {
    require();
    let ns = Netns::new("nftel").unwrap();
    base(&ns, IpFamily::V4);
    nft_text(
        &ns,
        &format!(
            "add chain ip {DEFAULT_TABLE} service-a\nadd chain ip {DEFAULT_TABLE} service-b\n"
        ),
    );
    let adds: Vec<(&'static str, String, String)> = vec![
        (render::CLUSTER_IPS, "198.19.0.1".into(), String::new()),
        (render::NODEPORT_IPS, "198.18.200.1".into(), String::new()),
        (
            render::HAIRPIN,
            "198.18.1.2 . 198.18.1.2".into(),
            String::new(),
        ),
        (
            render::SERVICE_IPS,
            "198.19.0.1 . tcp . 80".into(),
            "goto service-a".into(),
        ),
        (
            render::SERVICE_NODEPORTS,
            "udp . 30053".into(),
            "goto service-b".into(),
        ),
        (
            render::NO_ENDPOINT_SERVICES,
            "198.19.0.2 . sctp . 9 comment \"ns/svc:sctp\"".into(),
            "goto reject-chain".into(),
        ),
        (
            render::NO_ENDPOINT_NODEPORTS,
            "tcp . 30080".into(),
            "drop".into(),
        ),
    ];
    let batch = netlink::encode(
        IpFamily::V4,
        DEFAULT_TABLE,
        &Changes {
            add_elements: adds.clone(),
            ..Changes::default()
        },
    )
    .unwrap();
    send_in(&ns, batch).unwrap();
    let by_netlink = ns
        .exec(&["nft", "list", "table", "ip", DEFAULT_TABLE])
        .unwrap();

    let other = Netns::new("nftel2").unwrap();
    base(&other, IpFamily::V4);
    let mut text =
        format!("add chain ip {DEFAULT_TABLE} service-a\nadd chain ip {DEFAULT_TABLE} service-b\n");
    for (set, k, v) in &adds {
        let e = if v.is_empty() {
            k.clone()
        } else {
            format!("{k} : {v}")
        };
        text.push_str(&format!("add element ip {DEFAULT_TABLE} {set} {{ {e} }}\n"));
    }
    nft_text(&other, &text);
    let by_nft = other
        .exec(&["nft", "list", "table", "ip", DEFAULT_TABLE])
        .unwrap();
    assert_eq!(by_netlink, by_nft);

    // Deleting them leaves the maps empty.
    let batch = netlink::encode(
        IpFamily::V4,
        DEFAULT_TABLE,
        &Changes {
            delete_elements: adds.iter().map(|(s, k, _)| (*s, k.clone())).collect(),
            ..Changes::default()
        },
    )
    .unwrap();
    send_in(&ns, batch).unwrap();
    let after = ns
        .exec(&["nft", "list", "table", "ip", DEFAULT_TABLE])
        .unwrap();
    assert!(!after.contains("elements"), "{after}");
}

#[test]
fn a_refused_batch_changes_nothing_and_says_why() {
    require();
    let ns = Netns::new("nftrf").unwrap();
    base(&ns, IpFamily::V4);
    let before = ns
        .exec(&["nft", "list", "table", "ip", DEFAULT_TABLE])
        .unwrap();
    // A goto to a chain that does not exist: the kernel refuses the whole batch,
    // including the element before it.
    let batch = netlink::encode(
        IpFamily::V4,
        DEFAULT_TABLE,
        &Changes {
            add_elements: vec![
                (render::CLUSTER_IPS, "198.19.0.1".into(), String::new()),
                (
                    render::SERVICE_IPS,
                    "198.19.0.1 . tcp . 80".into(),
                    "goto no-such-chain".into(),
                ),
            ],
            ..Changes::default()
        },
    )
    .unwrap();
    let err = send_in(&ns, batch).unwrap_err();
    assert!(err.contains("refused"), "{err}");
    let after = ns
        .exec(&["nft", "list", "table", "ip", DEFAULT_TABLE])
        .unwrap();
    assert_eq!(before, after);
}

fn cfg() -> NftablesConfig {
    NftablesConfig {
        table: DEFAULT_TABLE.into(),
        families: vec![IpFamily::V4],
        cluster_cidrs: vec!["198.18.0.0/16".parse().unwrap()],
        detect_local: Default::default(),
        masquerade_all: false,
        masquerade_bit: 14,
        node_ips: vec!["198.18.200.1".parse().unwrap()],
        nodeport_addresses: vec![],
        conntrack_cleanup: false,
    }
}

/// A small random cluster: services with 0-4 endpoints, some NodePorts, some
/// sharing endpoints, derived from `seed`.
fn random_view(seed: u64) -> ProxyView {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let mut r = vec![Resource::Node(Node {
        name: "node1".into(),
        zone: None,
        addresses: vec!["198.18.200.1".parse().unwrap()],
        pod_cidrs: vec![],
    })];
    for i in 0..20 {
        if next(4) == 0 {
            continue;
        }
        let name = format!("svc{i}");
        let mut svc =
            Service::cluster_ip("ns", &name, format!("198.19.0.{}", i + 1).parse().unwrap())
                .with_port("p", Protocol::Tcp, 80);
        if next(3) == 0 {
            svc = svc.with_port("u", Protocol::Udp, 53);
        }
        if next(4) == 0 {
            svc.kind = ServiceType::NodePort;
            for (k, port) in svc.ports.iter_mut().enumerate() {
                port.node_port = Some(30000 + (i * 2 + k) as u16);
            }
        }
        r.push(Resource::Service(svc));
        let eps: Vec<Endpoint> = (0..next(5))
            .map(|_| {
                let mut e = Endpoint::ready(format!("198.18.1.{}", next(12) + 2).parse().unwrap());
                if next(5) == 0 {
                    e = e.on_node("node1");
                }
                e
            })
            .collect();
        r.push(Resource::EndpointSlice(EndpointSlice {
            namespace: "ns".into(),
            name: format!("{name}-1"),
            service_name: name,
            address_family: AddressFamily::Ipv4,
            ports: vec![
                EndpointPort {
                    name: "p".into(),
                    protocol: Protocol::Tcp,
                    port: 8080,
                    app_protocol: None,
                },
                EndpointPort {
                    name: "u".into(),
                    protocol: Protocol::Udp,
                    port: 5353,
                    app_protocol: None,
                },
            ],
            endpoints: eps,
            ignored_by_proxy: false,
        }));
    }
    ProxyView::build(&Snapshot::from_resources(r), "node1", IpFamily::V4)
}

#[test]
fn random_incremental_syncs_over_netlink_end_like_nft() {
    require();
    let a = Netns::new("nftsa").unwrap();
    let b = Netns::new("nftsb").unwrap();
    let (rta, rtb) = (a.runtime().unwrap(), b.runtime().unwrap());
    let mut by_netlink = NftablesBackend::new(cfg());
    let mut by_nft = NftablesBackend::new(cfg()).without_netlink();
    for step in 0..40u64 {
        let v = [random_view(step / 2 + step % 3)];
        let views = v.clone();
        by_netlink = futures::executor::block_on(rta.run(async move {
            by_netlink
                .apply(Desired {
                    views: &views,
                    full: false,
                })
                .await
                .unwrap();
            by_netlink
        }));
        let views = v.clone();
        by_nft = futures::executor::block_on(rtb.run(async move {
            by_nft
                .apply(Desired {
                    views: &views,
                    full: false,
                })
                .await
                .unwrap();
            by_nft
        }));
        let la = a
            .exec(&["nft", "list", "table", "ip", DEFAULT_TABLE])
            .unwrap();
        let lb = b
            .exec(&["nft", "list", "table", "ip", DEFAULT_TABLE])
            .unwrap();
        assert_eq!(la, lb, "step {step}: netlink (left) and nft (right) differ");
    }
    let (a, b) = (by_netlink.written_by(), by_nft.written_by());
    assert!(a.netlink >= 20, "most changes went over netlink: {a:?}");
    assert_eq!(
        a.nft, 0,
        "every sync, the first (full) one included, went over netlink: {a:?}"
    );
    assert_eq!(b.netlink, 0, "{b:?}");
}

#[test]
fn a_restarted_agent_finding_its_table_in_place_writes_nothing() {
    require();
    let ns = Netns::new("nftrs").unwrap();
    let rt = ns.runtime().unwrap();
    let v = [random_view(7)];
    let changed = [random_view(8)];
    futures::executor::block_on(rt.run({
        let v = v.clone();
        async move {
            let mut first = NftablesBackend::new(cfg());
            first
                .apply(Desired {
                    views: &v,
                    full: false,
                })
                .await
                .unwrap();
        }
    }));
    let before = ns
        .exec(&["nft", "list", "table", "ip", DEFAULT_TABLE])
        .unwrap();
    let (report, by, after_restart) = futures::executor::block_on(rt.run({
        let v = v.clone();
        async move {
            let mut second = NftablesBackend::new(cfg());
            let r = second
                .apply(Desired {
                    views: &v,
                    full: false,
                })
                .await
                .unwrap();
            let by = second.written_by();
            second
                .apply(Desired {
                    views: &changed,
                    full: false,
                })
                .await
                .unwrap();
            (r, by, second.written_by())
        }
    }));
    assert!(report.full);
    assert_eq!(report.rules_written, 0);
    assert_eq!((by.netlink, by.nft), (0, 0), "the restart wrote nothing");
    assert_eq!(after_restart.netlink, 1, "then changes go on incrementally");
    let after = ns
        .exec(&["nft", "list", "table", "ip", DEFAULT_TABLE])
        .unwrap();
    assert_ne!(before, after);
}

#[test]
fn a_resync_with_nothing_changed_writes_nothing_and_a_lost_digest_is_repaired() {
    require();
    let ns = Netns::new("nftrv").unwrap();
    let rt = ns.runtime().unwrap();
    let v = [random_view(11)];
    let (quiet, b) = futures::executor::block_on(rt.run({
        let v = v.clone();
        async move {
            let mut b = NftablesBackend::new(cfg());
            b.apply(Desired {
                views: &v,
                full: false,
            })
            .await
            .unwrap();
            let before = b.written_by();
            let r = b
                .apply(Desired {
                    views: &v,
                    full: true,
                })
                .await
                .unwrap();
            assert!(r.full);
            ((before, b.written_by()), b)
        }
    }));
    assert_eq!(quiet.0, quiet.1, "the resync wrote nothing");
    // Someone deletes one digest: the next resync notices and rewrites.
    let digests = || {
        ns.exec(&[
            "nft",
            "-j",
            "list",
            "set",
            "ip",
            DEFAULT_TABLE,
            "meshlite-digests",
        ])
        .unwrap()
    };
    let listed = digests();
    let json: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let one = json["nftables"][1]["set"]["elem"][0]
        .as_str()
        .unwrap()
        .to_string();
    ns.exec(&[
        "nft",
        "delete",
        "element",
        "ip",
        DEFAULT_TABLE,
        "meshlite-digests",
        &format!("{{ {one} }}"),
    ])
    .unwrap();
    let after = futures::executor::block_on(rt.run({
        let v = v.clone();
        let mut b = b;
        async move {
            b.apply(Desired {
                views: &v,
                full: true,
            })
            .await
            .unwrap();
            b.written_by()
        }
    }));
    // Over netlink, or through `nft` when the chain behind the lost digest has a
    // shape netlink does not compile (session affinity).
    assert_eq!(
        after.nft + after.netlink,
        quiet.1.nft + quiet.1.netlink + 1,
        "repaired with one transaction"
    );
    let listed = digests();
    assert!(listed.contains(&one), "the digest is back");
}
