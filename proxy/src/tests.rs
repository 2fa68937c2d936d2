use meshlite_proto::model::{
    Endpoint, EndpointPort, EndpointSlice, Node, Resource, ResourceKey, ServicePort, TargetPort,
};

use super::*;

const NODE: &str = "node1";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn svc(name: &str) -> Service {
    Service::cluster_ip("ns", name, ip("198.19.0.1")).with_port("p80", Protocol::Tcp, 80)
}

fn ep(addr: &str) -> Endpoint {
    Endpoint::ready(ip(addr)).on_node("node2")
}

fn slice(name: &str, service: &str, endpoints: Vec<Endpoint>) -> EndpointSlice {
    EndpointSlice {
        namespace: "ns".into(),
        name: name.into(),
        service_name: service.into(),
        address_family: AddressFamily::Ipv4,
        ports: vec![EndpointPort {
            name: "p80".into(),
            protocol: Protocol::Tcp,
            port: 8080,
            app_protocol: None,
        }],
        endpoints,
        ignored_by_proxy: false,
    }
}

fn node(zone: Option<&str>) -> Node {
    Node {
        name: NODE.into(),
        zone: zone.map(String::from),
        addresses: vec![ip("198.18.0.1"), ip("2001:db8::1")],
        pod_cidrs: vec![],
    }
}

fn view(service: Service, endpoints: Vec<Endpoint>) -> ServicePortView {
    view_with(
        service,
        vec![slice("s-1", "svc", endpoints)],
        Some("zone-a"),
    )
}

fn view_with(service: Service, slices: Vec<EndpointSlice>, zone: Option<&str>) -> ServicePortView {
    let mut resources = vec![Resource::Service(service), Resource::Node(node(zone))];
    resources.extend(slices.into_iter().map(Resource::EndpointSlice));
    let v = ProxyView::build(&Snapshot::from_resources(resources), NODE, IpFamily::V4);
    assert_eq!(v.ports.len(), 1, "one port expected: {:?}", v.ports.keys());
    (*v.ports.into_values().next().unwrap()).clone()
}

fn ips(eps: &[EndpointInfo]) -> Vec<String> {
    eps.iter().map(|e| e.ip.to_string()).collect()
}

fn terminating(mut e: Endpoint, serving: bool) -> Endpoint {
    e.ready = false;
    e.serving = serving;
    e.terminating = true;
    e
}

fn local(e: Endpoint) -> Endpoint {
    e.on_node(NODE)
}

fn zoned(mut e: Endpoint, zones: &[&str]) -> Endpoint {
    e.zone_hints = zones.iter().map(|z| z.to_string()).collect();
    e
}

fn node_port(mut s: Service) -> Service {
    s.kind = ServiceType::NodePort;
    s.ports[0].node_port = Some(30080);
    s
}

#[test]
fn port_name_and_display_follow_kube_proxy() {
    assert_eq!(
        ServicePortName::new("ns1", "svc1", "p80", Protocol::Tcp).to_string(),
        "ns1/svc1:p80"
    );
    assert_eq!(
        ServicePortName::new("ns1", "svc1", "", Protocol::Udp).to_string(),
        "ns1/svc1"
    );
}

#[test]
fn target_port_comes_from_the_slice_port_of_the_same_name() {
    let mut s = svc("svc");
    s.ports[0].target_port = TargetPort::Name("http".into());
    s.ports.push(ServicePort {
        name: "metrics".into(),
        protocol: Protocol::Tcp,
        port: 9090,
        node_port: None,
        target_port: TargetPort::Number(9090),
        app_protocol: None,
    });
    let resources = vec![
        Resource::Service(s),
        Resource::EndpointSlice(slice("s-1", "svc", vec![ep("198.18.1.1")])),
    ];
    let v = ProxyView::build(&Snapshot::from_resources(resources), NODE, IpFamily::V4);
    let p80 = &v.ports[&ServicePortName::new("ns", "svc", "p80", Protocol::Tcp)];
    assert_eq!(p80.endpoints[0].port, 8080);
    assert_eq!(p80.endpoints[0].to_string(), "198.18.1.1:8080");
    // No slice port named "metrics": no endpoints, so the service rejects.
    let metrics = &v.ports[&ServicePortName::new("ns", "svc", "metrics", Protocol::Tcp)];
    assert!(metrics.endpoints.is_empty());
    assert!(!metrics.has_endpoints());
}

#[test]
fn protocol_must_match_too() {
    let mut s = svc("svc");
    s.ports[0].protocol = Protocol::Udp;
    let v = view(s, vec![ep("198.18.1.1")]);
    assert!(v.endpoints.is_empty());
}

#[test]
fn ready_endpoints_only_when_any_is_ready() {
    let v = view(
        svc("svc"),
        vec![
            ep("198.18.1.1"),
            terminating(ep("198.18.1.2"), true),
            terminating(ep("198.18.1.3"), false),
        ],
    );
    assert_eq!(ips(&v.selection.cluster), ["198.18.1.1"]);
    assert_eq!(ips(&v.selection.reachable), ["198.18.1.1"]);
    assert!(v.selection.local.is_empty());
    assert!(v.has_endpoints());
}

#[test]
fn terminating_fallback_uses_serving_terminating_never_not_serving() {
    let v = view(
        svc("svc"),
        vec![
            terminating(ep("198.18.1.2"), true),
            terminating(ep("198.18.1.3"), false),
        ],
    );
    assert_eq!(ips(&v.selection.cluster), ["198.18.1.2"]);
    assert!(v.has_endpoints());

    let v = view(svc("svc"), vec![terminating(ep("198.18.1.3"), false)]);
    assert!(v.selection.cluster.is_empty());
    assert!(!v.has_endpoints());

    // Not ready and not terminating (e.g. starting up): never used.
    let mut starting = ep("198.18.1.4");
    starting.ready = false;
    starting.serving = false;
    let v = view(svc("svc"), vec![starting]);
    assert!(!v.has_endpoints());
}

#[test]
fn zone_hints_used_when_all_ready_endpoints_have_one_and_one_matches() {
    let eps = vec![
        zoned(ep("198.18.1.1"), &["zone-a"]),
        zoned(ep("198.18.1.2"), &["zone-b"]),
        // Not ready: its missing hint does not disable hints.
        terminating(ep("198.18.1.3"), true),
    ];
    let v = view(svc("svc"), eps.clone());
    assert_eq!(ips(&v.selection.cluster), ["198.18.1.1"]);

    // This node is in zone-c: nothing hinted for it, hints ignored.
    let v = view_with(
        svc("svc"),
        vec![slice("s-1", "svc", eps.clone())],
        Some("zone-c"),
    );
    assert_eq!(ips(&v.selection.cluster), ["198.18.1.1", "198.18.1.2"]);

    // The node has no zone: hints ignored.
    let v = view_with(svc("svc"), vec![slice("s-1", "svc", eps)], None);
    assert_eq!(ips(&v.selection.cluster), ["198.18.1.1", "198.18.1.2"]);
}

#[test]
fn zone_hints_ignored_when_one_ready_endpoint_lacks_them() {
    let v = view(
        svc("svc"),
        vec![zoned(ep("198.18.1.1"), &["zone-a"]), ep("198.18.1.2")],
    );
    assert_eq!(ips(&v.selection.cluster), ["198.18.1.1", "198.18.1.2"]);
}

#[test]
fn node_hints_win_over_zone_hints() {
    let mut a = zoned(ep("198.18.1.1"), &["zone-a"]);
    a.node_hints = vec![NODE.into()];
    let mut b = zoned(ep("198.18.1.2"), &["zone-a"]);
    b.node_hints = vec!["node2".into()];
    let v = view(svc("svc"), vec![a, b]);
    assert_eq!(ips(&v.selection.cluster), ["198.18.1.1"]);
}

#[test]
fn terminating_fallback_ignores_hints_when_nothing_is_ready() {
    // No ready endpoint: topology mode is computed from ready endpoints only, so
    // it is "none" and every serving+terminating endpoint is used.
    let v = view(
        svc("svc"),
        vec![
            zoned(terminating(ep("198.18.1.1"), true), &["zone-a"]),
            zoned(terminating(ep("198.18.1.2"), true), &["zone-b"]),
        ],
    );
    assert_eq!(ips(&v.selection.cluster), ["198.18.1.1", "198.18.1.2"]);
}

#[test]
fn internal_traffic_policy_local() {
    let mut s = svc("svc");
    s.internal_traffic_policy = TrafficPolicy::Local;
    let v = view(s.clone(), vec![ep("198.18.1.1"), local(ep("198.18.1.2"))]);
    assert!(!v.info.uses_cluster_endpoints());
    assert!(v.selection.cluster.is_empty());
    assert_eq!(ips(&v.selection.local), ["198.18.1.2"]);
    assert_eq!(ips(&v.selection.reachable), ["198.18.1.2"]);

    // No local endpoint: has endpoints (elsewhere) but nothing local -> DROP, not REJECT.
    let v = view(s.clone(), vec![ep("198.18.1.1")]);
    assert!(v.has_endpoints());
    assert!(v.selection.local.is_empty());

    // Local terminating fallback while a remote endpoint is ready.
    let v = view(
        s,
        vec![ep("198.18.1.1"), local(terminating(ep("198.18.1.2"), true))],
    );
    assert_eq!(ips(&v.selection.local), ["198.18.1.2"]);
}

#[test]
fn external_traffic_policy_local_on_node_port() {
    let mut s = node_port(svc("svc"));
    s.external_traffic_policy = TrafficPolicy::Local;
    let v = view(
        s,
        vec![
            ep("198.18.1.1"),
            local(ep("198.18.1.2")),
            zoned(ep("198.18.1.3"), &[]),
        ],
    );
    assert!(v.info.external_policy_local);
    assert!(v.info.uses_cluster_endpoints());
    assert!(v.info.uses_local_endpoints());
    assert_eq!(
        ips(&v.selection.cluster),
        ["198.18.1.1", "198.18.1.2", "198.18.1.3"]
    );
    assert_eq!(ips(&v.selection.local), ["198.18.1.2"]);
    assert_eq!(ips(&v.selection.reachable).len(), 3);
}

#[test]
fn external_policy_local_merges_terminating_local_into_reachable() {
    let mut s = node_port(svc("svc"));
    s.external_traffic_policy = TrafficPolicy::Local;
    let v = view(
        s,
        vec![ep("198.18.1.1"), local(terminating(ep("198.18.1.2"), true))],
    );
    assert_eq!(ips(&v.selection.cluster), ["198.18.1.1"]);
    assert_eq!(ips(&v.selection.local), ["198.18.1.2"]);
    assert_eq!(ips(&v.selection.reachable), ["198.18.1.1", "198.18.1.2"]);
}

#[test]
fn external_policy_local_applies_to_cluster_ip_services_with_external_ips() {
    // The API accepts externalTrafficPolicy on any externally accessible service,
    // which includes a ClusterIP service with external IPs.
    let mut s = svc("svc");
    s.external_traffic_policy = TrafficPolicy::Local;
    s.external_ips = vec![ip("198.19.50.1")];
    let v = view(s.clone(), vec![ep("198.18.1.1")]);
    assert!(v.info.external_policy_local);
    assert!(v.info.uses_local_endpoints());
    // Without external IPs it is not externally accessible: the policy is moot.
    s.external_ips.clear();
    let v = view(s, vec![ep("198.18.1.1")]);
    assert!(!v.info.external_policy_local);
    assert!(!v.info.uses_local_endpoints());
}

#[test]
fn both_policies_local_still_select_cluster_endpoints_for_short_circuits() {
    // Pods and the node reach the service's external addresses through the whole
    // cluster (the EXT chain's "pod traffic" and "route LOCAL traffic" rules), so
    // the cluster endpoints are selected even though neither policy is Cluster.
    for kind in ["nodeport", "externalip", "loadbalancer"] {
        let mut s = svc("svc");
        match kind {
            "nodeport" => s = node_port(s),
            "externalip" => s.external_ips = vec![ip("198.19.50.1")],
            _ => {
                s.kind = ServiceType::LoadBalancer;
                s.load_balancer_ips = vec![ip("198.19.60.1")];
            }
        }
        s.external_traffic_policy = TrafficPolicy::Local;
        s.internal_traffic_policy = TrafficPolicy::Local;
        let v = view(s.clone(), vec![ep("198.18.1.1"), local(ep("198.18.1.2"))]);
        assert!(v.info.uses_cluster_endpoints(), "{kind}");
        assert_eq!(
            ips(&v.selection.cluster),
            ["198.18.1.1", "198.18.1.2"],
            "{kind}"
        );
        assert_eq!(ips(&v.selection.local), ["198.18.1.2"], "{kind}");
        assert_eq!(
            ips(&v.selection.reachable),
            ["198.18.1.1", "198.18.1.2"],
            "{kind}"
        );
        // Only a remote endpoint: no local one, but the short circuits need it.
        let v = view(s, vec![ep("198.18.1.1")]);
        assert!(v.selection.local.is_empty(), "{kind}");
        assert_eq!(ips(&v.selection.reachable), ["198.18.1.1"], "{kind}");
    }
    // Not externally accessible: only the local endpoints.
    let mut s = svc("svc");
    s.internal_traffic_policy = TrafficPolicy::Local;
    let v = view(s, vec![ep("198.18.1.1"), local(ep("198.18.1.2"))]);
    assert!(!v.info.uses_cluster_endpoints());
    assert!(v.selection.cluster.is_empty());
}

#[test]
fn internal_local_external_cluster() {
    let mut s = node_port(svc("svc"));
    s.internal_traffic_policy = TrafficPolicy::Local;
    let v = view(s, vec![ep("198.18.1.1"), local(ep("198.18.1.2"))]);
    assert!(v.info.uses_cluster_endpoints());
    assert_eq!(ips(&v.selection.cluster), ["198.18.1.1", "198.18.1.2"]);
    assert_eq!(ips(&v.selection.local), ["198.18.1.2"]);
}

#[test]
fn duplicates_across_slices_are_deduplicated_and_sorted() {
    let v = view_with(
        svc("svc"),
        vec![
            slice("s-1", "svc", vec![ep("198.18.1.9"), ep("198.18.1.10")]),
            slice("s-2", "svc", vec![local(ep("198.18.1.9"))]),
        ],
        None,
    );
    assert_eq!(ips(&v.endpoints), ["198.18.1.10", "198.18.1.9"]);
}

#[test]
fn a_reused_pod_ip_keeps_the_running_pod_whatever_the_slice_order() {
    // The old pod terminates on node2 (listed in one slice) while its IP already
    // serves a new, ready pod on this node (listed in another slice).
    let old = || terminating(ep("198.18.1.9"), true);
    let new = || local(ep("198.18.1.9"));
    for (first, second) in [(old(), new()), (new(), old())] {
        let v = view_with(
            svc("svc"),
            vec![
                slice("s-a", "svc", vec![first.clone(), ep("198.18.1.10")]),
                slice("s-b", "svc", vec![second.clone()]),
            ],
            None,
        );
        assert_eq!(ips(&v.endpoints), ["198.18.1.10", "198.18.1.9"]);
        let kept = &v.endpoints[1];
        assert!(
            kept.ready && !kept.terminating && kept.is_local,
            "the ready copy is kept (first slice holds {first:?}): {kept:?}"
        );
        assert_eq!(ips(&v.selection.cluster), ["198.18.1.10", "198.18.1.9"]);
    }
    // The terminating copy is local and the running one remote: still the running one.
    for order in [["s-a", "s-b"], ["s-b", "s-a"]] {
        let v = view_with(
            svc("svc"),
            vec![
                slice(
                    order[0],
                    "svc",
                    vec![local(terminating(ep("198.18.1.9"), true))],
                ),
                slice(order[1], "svc", vec![ep("198.18.1.9")]),
            ],
            None,
        );
        let kept = &v.endpoints[0];
        assert!(kept.ready && !kept.is_local, "{order:?}: {kept:?}");
    }
}

#[test]
fn families_are_separate_and_headless_is_skipped() {
    let mut dual = svc("dual");
    dual.cluster_ips = vec![ip("198.19.0.2"), ip("2001:db8:1::2")];
    dual.external_ips = vec![ip("198.19.50.1"), ip("2001:db8:50::1")];
    let mut headless = svc("headless");
    headless.cluster_ips.clear();
    headless.headless = true;
    let mut v6_slice = slice("d-6", "dual", vec![Endpoint::ready(ip("2001:db8:2::1"))]);
    v6_slice.address_family = AddressFamily::Ipv6;
    let resources = vec![
        Resource::Service(dual),
        Resource::Service(headless),
        Resource::EndpointSlice(slice("d-4", "dual", vec![ep("198.18.1.1")])),
        Resource::EndpointSlice(v6_slice),
        Resource::EndpointSlice(slice("h-4", "headless", vec![ep("198.18.1.1")])),
        Resource::Node(node(None)),
    ];
    let snap = Snapshot::from_resources(resources);
    let v4 = ProxyView::build(&snap, NODE, IpFamily::V4);
    let v6 = ProxyView::build(&snap, NODE, IpFamily::V6);
    assert_eq!(v4.ports.len(), 1);
    assert_eq!(v6.ports.len(), 1);
    let p4 = v4.ports.values().next().unwrap();
    let p6 = v6.ports.values().next().unwrap();
    assert_eq!(p4.info.cluster_ip, ip("198.19.0.2"));
    assert_eq!(p6.info.cluster_ip, ip("2001:db8:1::2"));
    assert_eq!(p4.info.external_ips, [ip("198.19.50.1")]);
    assert_eq!(ips(&p6.endpoints), ["2001:db8:2::1"]);
    assert_eq!(p6.endpoints[0].to_string(), "[2001:db8:2::1]:8080");
    assert_eq!(v4.node_ips, [ip("198.18.0.1")]);
    assert_eq!(v6.node_ips, [ip("2001:db8::1")]);
}

#[test]
fn load_balancer_and_health_check_only_where_kube_proxy_uses_them() {
    let mut s = svc("svc");
    s.load_balancer_ips = vec![ip("198.19.60.1")];
    s.health_check_node_port = Some(30000);
    s.external_traffic_policy = TrafficPolicy::Local;
    // A ClusterIP service: status ingress and health check port are ignored.
    let v = view(s.clone(), vec![ep("198.18.1.1")]);
    assert!(v.info.load_balancer_ips.is_empty());
    assert_eq!(v.info.health_check_node_port, None);

    s.kind = ServiceType::LoadBalancer;
    s.ports[0].node_port = Some(30080);
    let v = view(s, vec![ep("198.18.1.1")]);
    assert_eq!(v.info.load_balancer_ips, [ip("198.19.60.1")]);
    assert_eq!(v.info.health_check_node_port, Some(30000));
    assert_eq!(v.info.node_port, Some(30080));
}

#[test]
fn services_and_slices_ignored_by_the_proxy_are_not_programmed() {
    let mut other = svc("other");
    other.ignored_by_proxy = true;
    let mut headless_slice = slice("web-h", "web", vec![ep("198.18.1.2")]);
    headless_slice.ignored_by_proxy = true;
    let resources = vec![
        Resource::Service(other),
        Resource::EndpointSlice(slice("other-1", "other", vec![ep("198.18.1.1")])),
        Resource::Service(svc("web")),
        Resource::EndpointSlice(headless_slice),
    ];
    let v = ProxyView::build(&Snapshot::from_resources(resources), NODE, IpFamily::V4);
    // Another proxy's service is not there at all.
    assert_eq!(
        v.ports.keys().map(ToString::to_string).collect::<Vec<_>>(),
        vec!["ns/web:p80"]
    );
    // A service whose only slice is labelled headless has no endpoints: it rejects,
    // as kube-proxy's does (its informer never sees such slices).
    let web = &v.ports[&ServicePortName::new("ns", "web", "p80", Protocol::Tcp)];
    assert!(!web.has_endpoints());
}

/// A cluster of `n` services (`svc0`..), service `i` with endpoints from `eps(i)`.
fn cluster(n: usize, zone: Option<&str>, eps: impl Fn(usize) -> Vec<Endpoint>) -> Snapshot {
    let mut r = vec![
        Resource::Node(node(zone)),
        Resource::Node(Node {
            name: "node2".into(),
            zone: None,
            addresses: vec![ip("198.18.0.2")],
            pod_cidrs: vec![],
        }),
    ];
    for i in 0..n {
        let name = format!("svc{i}");
        r.push(Resource::Service(
            Service::cluster_ip("ns", &name, ip(&format!("198.19.0.{}", i + 1))).with_port(
                "p80",
                Protocol::Tcp,
                80,
            ),
        ));
        r.push(Resource::EndpointSlice(slice(
            &format!("{name}-1"),
            &name,
            eps(i),
        )));
    }
    Snapshot::from_resources(r)
}

fn changed(services: &[&str], nodes: bool) -> ChangeSet {
    ChangeSet {
        services: services
            .iter()
            .map(|s| ServiceName::new("ns", *s))
            .collect(),
        nodes,
        upserted: vec![ResourceKey::Service {
            namespace: "ns".into(),
            name: "placeholder".into(),
        }],
        ..ChangeSet::default()
    }
}

#[test]
fn a_rebuild_equals_a_build_and_shares_the_unchanged_ports() {
    let before = cluster(5, None, |i| vec![ep(&format!("198.18.1.{}", i + 2))]);
    let v1 = ProxyView::build(&before, NODE, IpFamily::V4);
    // svc2 gains an endpoint, svc4 goes away.
    let mut after = cluster(4, None, |i| vec![ep(&format!("198.18.1.{}", i + 2))]);
    after.upsert(
        1,
        Resource::EndpointSlice(slice(
            "svc2-1",
            "svc2",
            vec![ep("198.18.1.4"), ep("198.18.1.99")],
        )),
    );
    let v2 = v1.rebuild(&after, &changed(&["svc2", "svc4"], false));
    assert_eq!(v2, ProxyView::build(&after, NODE, IpFamily::V4));
    for (k, p) in &v2.ports {
        let same = Arc::ptr_eq(p, &v1.ports[k]);
        assert_eq!(same, k.service.name != "svc2", "{k}");
    }
}

#[test]
fn a_change_to_this_node_rebuilds_every_port_and_to_another_node_none() {
    let before = cluster(3, Some("zone-a"), |i| {
        vec![ep(&format!("198.18.1.{}", i + 2))]
    });
    let v1 = ProxyView::build(&before, NODE, IpFamily::V4);
    let other = cluster(3, Some("zone-a"), |i| {
        vec![ep(&format!("198.18.1.{}", i + 2))]
    });
    let v2 = v1.rebuild(&other, &changed(&[], true));
    assert!(v2.ports.iter().all(|(k, p)| Arc::ptr_eq(p, &v1.ports[k])));
    let moved = cluster(3, Some("zone-b"), |i| {
        vec![ep(&format!("198.18.1.{}", i + 2))]
    });
    let v3 = v1.rebuild(&moved, &changed(&[], true));
    assert_eq!(v3, ProxyView::build(&moved, NODE, IpFamily::V4));
    assert_eq!(v3.node_zone.as_deref(), Some("zone-b"));
    assert!(v3.ports.iter().all(|(k, p)| !Arc::ptr_eq(p, &v1.ports[k])));
}
