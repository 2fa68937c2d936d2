use std::net::IpAddr;

use meshlite_proto::model::{
    AddressFamily, Endpoint, EndpointPort, EndpointSlice, Node, Protocol, Resource, Service,
};
use meshlite_runtime::Snapshot;

use super::*;
use crate::local::LocalDetector;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn rcfg() -> RenderConfig {
    RenderConfig {
        table: "kube-proxy".into(),
        local: LocalDetector::Cidr("198.18.0.0/16".parse().unwrap()),
        masquerade_all: false,
        masquerade_mark: 0x4000,
        service_cidrs: vec![],
        nodeport_ips: vec![ip("192.0.2.1")],
    }
}

/// One service `name` on `cip` with ports `ports` (name, number), and its
/// endpoints `(ip, ready, node)`.
fn svc(name: &str, cip: &str, ports: &[(&str, u16)], eps: &[(&str, bool, &str)]) -> Vec<Resource> {
    let mut s = Service::cluster_ip("ns", name, ip(cip));
    for (p, n) in ports {
        s = s.with_port(p, Protocol::Tcp, *n);
    }
    vec![
        Resource::Service(s),
        Resource::EndpointSlice(EndpointSlice {
            namespace: "ns".into(),
            name: format!("{name}-1"),
            service_name: name.into(),
            address_family: AddressFamily::Ipv4,
            ports: ports
                .iter()
                .map(|(p, n)| EndpointPort {
                    name: (*p).into(),
                    protocol: Protocol::Tcp,
                    port: *n + 8000,
                    app_protocol: None,
                })
                .collect(),
            endpoints: eps
                .iter()
                .map(|(a, ready, node)| {
                    let mut e = Endpoint::ready(ip(a)).on_node(node);
                    e.ready = *ready;
                    e.serving = *ready;
                    e
                })
                .collect(),
            ignored_by_proxy: false,
        }),
    ]
}

fn view(parts: Vec<Vec<Resource>>, zone: Option<&str>) -> ProxyView {
    let mut r: Vec<Resource> = parts.into_iter().flatten().collect();
    r.push(Resource::Node(Node {
        name: "node1".into(),
        zone: zone.map(String::from),
        addresses: vec![ip("192.0.2.1")],
        pod_cidrs: vec![],
    }));
    ProxyView::build(&Snapshot::from_resources(r), "node1", IpFamily::V4)
}

/// The changes without the digest elements that go with them.
fn real(mut c: Changes) -> Changes {
    c.delete_elements.retain(|e| e.0 != DIGESTS);
    c.add_elements.retain(|e| e.0 != DIGESTS);
    c
}

fn step(w: &mut Written, v: &ProxyView) -> Changes {
    real(w.update(v, &rcfg()))
}

fn chain_of(c: &Changes, prefix: &str) -> usize {
    c.chains
        .iter()
        .filter(|(n, _)| n.starts_with(prefix))
        .count()
}

#[test]
fn the_first_update_writes_everything_and_the_second_nothing() {
    let v = view(
        vec![
            svc(
                "a",
                "198.19.0.1",
                &[("http", 80)],
                &[("198.18.1.2", true, "n2")],
            ),
            svc(
                "b",
                "198.19.0.2",
                &[("http", 80)],
                &[("198.18.1.3", true, "n2")],
            ),
        ],
        None,
    );
    let mut w = Written::new(IpFamily::V4);
    let c = step(&mut w, &v);
    assert_eq!(chain_of(&c, "service-"), 2);
    assert!(
        c.add_elements
            .contains(&(render::NODEPORT_IPS, "192.0.2.1".into(), String::new()))
    );
    assert_eq!(w.ruleset(), render::render(&v, &rcfg()));
    assert!(step(&mut w, &v).is_empty());
}

#[test]
fn an_endpoint_added_removed_or_unready_rewrites_only_its_chain() {
    let a = |eps: &[(&str, bool, &str)]| svc("a", "198.19.0.1", &[("http", 80)], eps);
    let b = svc(
        "b",
        "198.19.0.2",
        &[("http", 80)],
        &[("198.18.1.9", true, "n2")],
    );
    let one = view(vec![a(&[("198.18.1.2", true, "n2")]), b.clone()], None);
    let two = view(
        vec![
            a(&[("198.18.1.2", true, "n2"), ("198.18.1.3", true, "n2")]),
            b.clone(),
        ],
        None,
    );
    let unready = view(
        vec![
            a(&[("198.18.1.2", true, "n2"), ("198.18.1.3", false, "n2")]),
            b,
        ],
        None,
    );
    let mut w = Written::new(IpFamily::V4);
    step(&mut w, &one);
    // Back from `unready` to `one` renders the same rules: nothing to write.
    for (to, chains, hairpin_added, hairpin_deleted) in
        [(&two, 1, 1, 0), (&unready, 1, 0, 1), (&one, 0, 0, 0)]
    {
        let c = step(&mut w, to);
        assert_eq!(c.chains.len(), chains, "{c:#?}");
        assert!(
            c.chains
                .iter()
                .flat_map(|c| &c.1)
                .all(|r| !r.contains("198.18.1.9"))
        );
        assert!(c.flush.is_empty());
        let added = c
            .add_elements
            .iter()
            .filter(|e| e.0 == render::HAIRPIN)
            .count();
        let deleted = c
            .delete_elements
            .iter()
            .filter(|e| e.0 == render::HAIRPIN)
            .count();
        assert_eq!((added, deleted), (hairpin_added, hairpin_deleted), "{c:#?}");
        assert_eq!(w.ruleset(), render::render(to, &rcfg()));
    }
}

#[test]
fn a_service_added_then_removed_writes_only_its_own_parts() {
    let a = svc(
        "a",
        "198.19.0.1",
        &[("http", 80)],
        &[("198.18.1.2", true, "n2")],
    );
    let b = svc(
        "b",
        "198.19.0.2",
        &[("http", 80)],
        &[("198.18.1.3", true, "n2")],
    );
    let before = view(vec![a.clone()], None);
    let after = view(vec![a, b], None);
    let mut w = Written::new(IpFamily::V4);
    step(&mut w, &before);
    let c = step(&mut w, &after);
    assert_eq!(c.chains.len(), 1);
    assert!(c.delete_elements.is_empty());
    let sets: Vec<&str> = c.add_elements.iter().map(|e| e.0).collect();
    assert_eq!(
        sets,
        [render::CLUSTER_IPS, render::HAIRPIN, render::SERVICE_IPS],
        "{c:#?}"
    );
    let c = step(&mut w, &before);
    assert!(c.chains.is_empty());
    assert_eq!(c.flush.len(), 1);
    assert_eq!(c.delete_elements.len(), 3, "{c:#?}");
    assert!(c.add_elements.is_empty());
}

#[test]
fn a_port_number_change_moves_its_map_element() {
    let before = view(
        vec![svc(
            "a",
            "198.19.0.1",
            &[("http", 80)],
            &[("198.18.1.2", true, "n2")],
        )],
        None,
    );
    let after = view(
        vec![svc(
            "a",
            "198.19.0.1",
            &[("http", 81)],
            &[("198.18.1.2", true, "n2")],
        )],
        None,
    );
    let mut w = Written::new(IpFamily::V4);
    step(&mut w, &before);
    let c = step(&mut w, &after);
    assert_eq!(
        c.delete_elements,
        [(render::SERVICE_IPS, "198.19.0.1 . tcp . 80".to_string())]
    );
    assert!(
        c.add_elements
            .iter()
            .any(|e| e.0 == render::SERVICE_IPS && e.1 == "198.19.0.1 . tcp . 81")
    );
    // The cluster IP stays: the same service still owns it.
    assert!(!c.delete_elements.iter().any(|e| e.0 == render::CLUSTER_IPS));
    assert_eq!(w.ruleset(), render::render(&after, &rcfg()));
}

#[test]
fn shared_elements_stay_until_their_last_owner_goes() {
    // Two ports of one service share the ClusterIP; two services share an
    // endpoint IP in the hairpin set.
    let a = svc(
        "a",
        "198.19.0.1",
        &[("http", 80), ("https", 443)],
        &[("198.18.1.2", true, "n2")],
    );
    let b = svc(
        "b",
        "198.19.0.2",
        &[("http", 80)],
        &[("198.18.1.2", true, "n2")],
    );
    let a_http_only = svc(
        "a",
        "198.19.0.1",
        &[("http", 80)],
        &[("198.18.1.2", true, "n2")],
    );
    let mut w = Written::new(IpFamily::V4);
    step(&mut w, &view(vec![a, b.clone()], None));
    let c = step(&mut w, &view(vec![a_http_only.clone(), b], None));
    assert!(!c.delete_elements.iter().any(|e| e.0 == render::CLUSTER_IPS));
    let c = step(&mut w, &view(vec![a_http_only], None));
    assert!(
        !c.delete_elements.iter().any(|e| e.0 == render::HAIRPIN),
        "service a still reaches 198.18.1.2: {c:#?}"
    );
    let c = step(&mut w, &view(vec![], None));
    assert!(
        c.delete_elements
            .contains(&(render::HAIRPIN, "198.18.1.2 . 198.18.1.2".into()))
    );
}

#[test]
fn a_node_zone_change_rewrites_only_ports_whose_selection_moved() {
    // Topology: with hints for zone-a, only node1's zone decides which endpoint
    // is used; a service without hints does not care.
    let mut hinted = svc(
        "a",
        "198.19.0.1",
        &[("http", 80)],
        &[("198.18.1.2", true, "n2"), ("198.18.1.3", true, "n3")],
    );
    if let Resource::EndpointSlice(s) = &mut hinted[1] {
        s.endpoints[0].zone_hints = vec!["zone-a".into()];
        s.endpoints[1].zone_hints = vec!["zone-b".into()];
    }
    let plain = svc(
        "b",
        "198.19.0.2",
        &[("http", 80)],
        &[("198.18.1.4", true, "n2")],
    );
    let mut w = Written::new(IpFamily::V4);
    step(
        &mut w,
        &view(vec![hinted.clone(), plain.clone()], Some("zone-a")),
    );
    let c = step(&mut w, &view(vec![hinted, plain], Some("zone-b")));
    assert_eq!(c.chains.len(), 1, "{c:#?}");
    assert!(c.chains[0].1.iter().any(|r| r.contains("198.18.1.3")));
}

#[test]
fn a_render_config_change_rerenders_every_port() {
    let v = view(
        vec![
            svc(
                "a",
                "198.19.0.1",
                &[("http", 80)],
                &[("198.18.1.2", true, "n2")],
            ),
            svc(
                "b",
                "198.19.0.2",
                &[("http", 80)],
                &[("198.18.1.3", true, "n2")],
            ),
        ],
        None,
    );
    let mut w = Written::new(IpFamily::V4);
    step(&mut w, &v);
    let mut other = rcfg();
    other.local = LocalDetector::Cidr("198.18.0.0/17".parse().unwrap());
    other.nodeport_ips = vec![ip("192.0.2.9")];
    let c = real(w.update(&v, &other));
    assert_eq!(c.chains.len(), 2);
    assert_eq!(
        c.delete_elements,
        [(render::NODEPORT_IPS, "192.0.2.1".to_string())]
    );
    assert_eq!(w.ruleset(), render::render(&v, &other));
}

#[test]
fn digests_follow_what_they_describe() {
    let one = view(
        vec![svc(
            "a",
            "198.19.0.1",
            &[("http", 80)],
            &[("198.18.1.2", true, "n2")],
        )],
        None,
    );
    let two = view(
        vec![svc(
            "a",
            "198.19.0.1",
            &[("http", 80)],
            &[("198.18.1.3", true, "n2")],
        )],
        None,
    );
    let mut w = Written::new(IpFamily::V4);
    w.update(&one, &rcfg());
    let c = w.update(&two, &rcfg());
    let (name, rules) = &c.chains[0];
    let new = digest::chain(name, rules);
    let old_rules = &render::render(&one, &rcfg()).chains[name];
    let old = digest::chain(name, old_rules);
    assert!(c.add_elements.contains(&(DIGESTS, new, String::new())));
    assert!(c.delete_elements.contains(&(DIGESTS, old)));
    // The hairpin set changed, so its digest moved; the service map did not.
    let rs_one = render::render(&one, &rcfg());
    let rs_two = render::render(&two, &rcfg());
    let digests = |rs: &Ruleset| {
        rs.elements[DIGESTS]
            .keys()
            .cloned()
            .collect::<BTreeSet<_>>()
    };
    let gone: Vec<_> = digests(&rs_one)
        .difference(&digests(&rs_two))
        .cloned()
        .collect();
    let deleted: BTreeSet<String> = c
        .delete_elements
        .iter()
        .filter(|e| e.0 == DIGESTS)
        .map(|e| e.1.clone())
        .collect();
    assert_eq!(gone.into_iter().collect::<BTreeSet<_>>(), deleted);
    assert_eq!(w.ruleset(), rs_two);
}
