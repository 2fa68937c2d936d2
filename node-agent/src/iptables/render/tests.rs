use std::collections::BTreeMap;

use meshlite_proto::model::{
    AddressFamily, Endpoint, EndpointPort, EndpointSlice, Node, Protocol, Resource, Service,
    ServiceType, TrafficPolicy,
};
use meshlite_runtime::Snapshot;

use super::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn cfg() -> RenderConfig {
    RenderConfig {
        chains: ChainNames::new("KUBE"),
        local: LocalDetector::Cidr("10.0.0.0/8".parse().unwrap()),
        masquerade_all: false,
        masquerade_mark: 0x4000,
        node_ip: Some(ip("192.168.0.2")),
        localhost_nodeports: true,
        random_fully: false,
        nodeport_addresses: vec![],
        node_ips: vec![ip("192.168.0.2")],
    }
}

fn svc(ns: &str, name: &str, cluster_ip: &str) -> Service {
    Service::cluster_ip(ns, name, ip(cluster_ip)).with_port("p80", Protocol::Tcp, 80)
}

fn slice(ns: &str, svc: &str, eps: Vec<Endpoint>) -> Resource {
    Resource::EndpointSlice(EndpointSlice {
        namespace: ns.into(),
        name: format!("{svc}-1"),
        service_name: svc.into(),
        address_family: AddressFamily::Ipv4,
        ports: vec![EndpointPort {
            name: "p80".into(),
            protocol: Protocol::Tcp,
            port: 80,
            app_protocol: None,
        }],
        endpoints: eps,
        ignored_by_proxy: false,
    })
}

type RulesByChain = BTreeMap<(String, String), Vec<String>>;
type ChainsByTable = BTreeMap<String, Vec<String>>;

/// Parses restore text into (table, chain) -> rules, plus declared chains per table.
fn parse(text: &str) -> (RulesByChain, ChainsByTable) {
    let mut rules: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    let mut declared: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut table = String::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(t) = line.strip_prefix('*') {
            table = t.to_string();
        } else if let Some(c) = line.strip_prefix(':') {
            let name = c.split(' ').next().unwrap().to_string();
            declared.entry(table.clone()).or_default().push(name);
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let chain = rest.split(' ').next().unwrap().to_string();
            rules
                .entry((table.clone(), chain))
                .or_default()
                .push(line.to_string());
        } else {
            assert!(
                line == "COMMIT" || line.starts_with("-X "),
                "unexpected line {line:?}"
            );
        }
    }
    for v in declared.values_mut() {
        v.sort();
    }
    (rules, declared)
}

/// kube-proxy's `TestOverallIPTablesRules` (pkg/proxy/iptables/proxier_test.go):
/// the same services and slices must give the same chains, in the same order within
/// each chain. Differences, on purpose: no `nfacct` matches (an optional kernel
/// feature kube-proxy uses for counters), and our canary chain.
#[test]
fn matches_kube_proxy_overall_rules() {
    let mut svc2 = svc("ns2", "svc2", "172.30.0.42");
    svc2.kind = ServiceType::LoadBalancer;
    svc2.external_traffic_policy = TrafficPolicy::Local;
    svc2.ports[0].node_port = Some(3001);
    svc2.load_balancer_ips = vec![ip("1.2.3.4")];
    svc2.external_ips = vec![ip("192.168.99.22")];
    svc2.health_check_node_port = Some(30000);
    let mut svc3 = svc("ns3", "svc3", "172.30.0.43");
    svc3.kind = ServiceType::NodePort;
    svc3.ports[0].node_port = Some(3003);
    let mut svc4 = svc("ns4", "svc4", "172.30.0.44");
    svc4.kind = ServiceType::NodePort;
    svc4.external_ips = vec![ip("192.168.99.33")];
    let mut svc5 = svc("ns5", "svc5", "172.30.0.45");
    svc5.kind = ServiceType::LoadBalancer;
    svc5.ports[0].node_port = Some(3002);
    svc5.load_balancer_ips = vec![ip("5.6.7.8")];
    svc5.health_check_node_port = Some(30000);
    svc5.load_balancer_source_ranges = vec!["203.0.113.0/25".parse().unwrap()];
    svc5.session_affinity_timeout = Some(10800);
    let svc6 = svc("ns6", "svc6", "172.30.0.46");

    let node = "test-node";
    let resources = vec![
        Resource::Service(svc("ns1", "svc1", "172.30.0.41")),
        Resource::Service(svc2),
        Resource::Service(svc3),
        Resource::Service(svc4),
        Resource::Service(svc5),
        Resource::Service(svc6),
        slice("ns1", "svc1", vec![Endpoint::ready(ip("10.180.0.1"))]),
        slice("ns2", "svc2", vec![Endpoint::ready(ip("10.180.0.2"))]),
        slice("ns3", "svc3", vec![Endpoint::ready(ip("10.180.0.3"))]),
        slice(
            "ns4",
            "svc4",
            vec![
                Endpoint::ready(ip("10.180.0.4")),
                Endpoint::ready(ip("10.180.0.5")).on_node(node),
            ],
        ),
        slice("ns5", "svc5", vec![Endpoint::ready(ip("10.180.0.3"))]),
    ];
    let view = ProxyView::build(&Snapshot::from_resources(resources), node, IpFamily::V4);
    let text = render(&view, &cfg()).full_text(&[]);

    let expected = r#"
*filter
:KUBE-NODEPORTS - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-PROXY-CANARY - [0:0]
-A KUBE-NODEPORTS -m comment --comment "ns2/svc2:p80 health check node port" -m tcp -p tcp --dport 30000 -j ACCEPT
-A KUBE-SERVICES -m comment --comment "ns6/svc6:p80 has no endpoints" -m tcp -p tcp -d 172.30.0.46 --dport 80 -j REJECT
-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m tcp -p tcp -d 192.168.99.22 --dport 80 -j DROP
-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m tcp -p tcp -d 1.2.3.4 --dport 80 -j DROP
-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 3001 -j DROP
-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A KUBE-PROXY-FIREWALL -m comment --comment "ns5/svc5:p80 traffic not accepted by KUBE-FW-NUKIZ6OKUXPJNT4C" -m tcp -p tcp -d 5.6.7.8 --dport 80 -j DROP
COMMIT
*nat
:KUBE-NODEPORTS - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-EXT-4SW47YFZTEDKD3PK - [0:0]
:KUBE-EXT-GNZBNJ2PO5MGZ6GT - [0:0]
:KUBE-EXT-NUKIZ6OKUXPJNT4C - [0:0]
:KUBE-EXT-X27LE4BHSL4DOUIK - [0:0]
:KUBE-FW-NUKIZ6OKUXPJNT4C - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-PROXY-CANARY - [0:0]
:KUBE-SEP-C6EBXVWJJZMIWKLZ - [0:0]
:KUBE-SEP-I77PXRDZVX7PMWMN - [0:0]
:KUBE-SEP-OYPFS5VJICHGATKP - [0:0]
:KUBE-SEP-RS4RBKLTHTF2IUXJ - [0:0]
:KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
:KUBE-SEP-UKSFD7AGPMPPLUHC - [0:0]
:KUBE-SVC-4SW47YFZTEDKD3PK - [0:0]
:KUBE-SVC-GNZBNJ2PO5MGZ6GT - [0:0]
:KUBE-SVC-NUKIZ6OKUXPJNT4C - [0:0]
:KUBE-SVC-X27LE4BHSL4DOUIK - [0:0]
:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
-A KUBE-NODEPORTS -m comment --comment ns2/svc2:p80 -m tcp -p tcp --dport 3001 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
-A KUBE-NODEPORTS -m comment --comment ns3/svc3:p80 -m tcp -p tcp --dport 3003 -j KUBE-EXT-X27LE4BHSL4DOUIK
-A KUBE-NODEPORTS -m comment --comment ns5/svc5:p80 -m tcp -p tcp --dport 3002 -j KUBE-EXT-NUKIZ6OKUXPJNT4C
-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 80 -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 external IP" -m tcp -p tcp -d 192.168.99.22 --dport 80 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 loadbalancer IP" -m tcp -p tcp -d 1.2.3.4 --dport 80 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
-A KUBE-SERVICES -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 -j KUBE-SVC-X27LE4BHSL4DOUIK
-A KUBE-SERVICES -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 -j KUBE-SVC-4SW47YFZTEDKD3PK
-A KUBE-SERVICES -m comment --comment "ns4/svc4:p80 external IP" -m tcp -p tcp -d 192.168.99.33 --dport 80 -j KUBE-EXT-4SW47YFZTEDKD3PK
-A KUBE-SERVICES -m comment --comment "ns5/svc5:p80 cluster IP" -m tcp -p tcp -d 172.30.0.45 --dport 80 -j KUBE-SVC-NUKIZ6OKUXPJNT4C
-A KUBE-SERVICES -m comment --comment "ns5/svc5:p80 loadbalancer IP" -m tcp -p tcp -d 5.6.7.8 --dport 80 -j KUBE-FW-NUKIZ6OKUXPJNT4C
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-EXT-4SW47YFZTEDKD3PK -m comment --comment "masquerade traffic for ns4/svc4:p80 external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-4SW47YFZTEDKD3PK -j KUBE-SVC-4SW47YFZTEDKD3PK
-A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "pod traffic for ns2/svc2:p80 external destinations" -s 10.0.0.0/8 -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
-A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "masquerade LOCAL traffic for ns2/svc2:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ
-A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "route LOCAL traffic for ns2/svc2:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
-A KUBE-EXT-NUKIZ6OKUXPJNT4C -m comment --comment "masquerade traffic for ns5/svc5:p80 external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-NUKIZ6OKUXPJNT4C -j KUBE-SVC-NUKIZ6OKUXPJNT4C
-A KUBE-EXT-X27LE4BHSL4DOUIK -m comment --comment "masquerade traffic for ns3/svc3:p80 external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-X27LE4BHSL4DOUIK -j KUBE-SVC-X27LE4BHSL4DOUIK
-A KUBE-FW-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 loadbalancer IP" -s 203.0.113.0/25 -j KUBE-EXT-NUKIZ6OKUXPJNT4C
-A KUBE-FW-NUKIZ6OKUXPJNT4C -m comment --comment "other traffic to ns5/svc5:p80 will be dropped by KUBE-PROXY-FIREWALL"
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE
-A KUBE-SEP-C6EBXVWJJZMIWKLZ -m comment --comment ns4/svc4:p80 -s 10.180.0.5 -j KUBE-MARK-MASQ
-A KUBE-SEP-C6EBXVWJJZMIWKLZ -m comment --comment ns4/svc4:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.5:80
-A KUBE-SEP-I77PXRDZVX7PMWMN -m comment --comment ns5/svc5:p80 -s 10.180.0.3 -j KUBE-MARK-MASQ
-A KUBE-SEP-I77PXRDZVX7PMWMN -m comment --comment ns5/svc5:p80 -m recent --name KUBE-SEP-I77PXRDZVX7PMWMN --set -m tcp -p tcp -j DNAT --to-destination 10.180.0.3:80
-A KUBE-SEP-OYPFS5VJICHGATKP -m comment --comment ns3/svc3:p80 -s 10.180.0.3 -j KUBE-MARK-MASQ
-A KUBE-SEP-OYPFS5VJICHGATKP -m comment --comment ns3/svc3:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.3:80
-A KUBE-SEP-RS4RBKLTHTF2IUXJ -m comment --comment ns2/svc2:p80 -s 10.180.0.2 -j KUBE-MARK-MASQ
-A KUBE-SEP-RS4RBKLTHTF2IUXJ -m comment --comment ns2/svc2:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.2:80
-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
-A KUBE-SEP-UKSFD7AGPMPPLUHC -m comment --comment ns4/svc4:p80 -s 10.180.0.4 -j KUBE-MARK-MASQ
-A KUBE-SEP-UKSFD7AGPMPPLUHC -m comment --comment ns4/svc4:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.4:80
-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.4:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-UKSFD7AGPMPPLUHC
-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.5:80" -j KUBE-SEP-C6EBXVWJJZMIWKLZ
-A KUBE-SVC-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 -> 10.180.0.2:80" -j KUBE-SEP-RS4RBKLTHTF2IUXJ
-A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 cluster IP" -m tcp -p tcp -d 172.30.0.45 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 -> 10.180.0.3:80" -m recent --name KUBE-SEP-I77PXRDZVX7PMWMN --rcheck --seconds 10800 --reap -j KUBE-SEP-I77PXRDZVX7PMWMN
-A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 -> 10.180.0.3:80" -j KUBE-SEP-I77PXRDZVX7PMWMN
-A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 -> 10.180.0.3:80" -j KUBE-SEP-OYPFS5VJICHGATKP
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j KUBE-SEP-SXIVWICOYRO3J4NJ
COMMIT
"#;
    let (got_rules, got_chains) = parse(&text);
    let (want_rules, want_chains) = parse(expected);
    assert_eq!(got_chains, want_chains);
    for (k, want) in &want_rules {
        assert_eq!(got_rules.get(k), Some(want), "chain {k:?}");
    }
    assert_eq!(got_rules.len(), want_rules.len());
    // The nodeports tail call stays last in KUBE-SERVICES.
    let services = &got_rules[&("nat".to_string(), "KUBE-SERVICES".to_string())];
    assert!(services.last().unwrap().contains("must be the last rule"));
}

#[test]
fn probabilities_are_one_over_n_minus_i() {
    assert_eq!(probability(3), "0.3333333333");
    assert_eq!(probability(2), "0.5000000000");
    assert_eq!(probability(7), "0.1428571429");
    assert_eq!(probability(1), "1.0000000000");

    let eps: Vec<Endpoint> = (1..=4)
        .map(|i| Endpoint::ready(ip(&format!("10.180.0.{i}"))))
        .collect();
    let resources = vec![
        Resource::Service(svc("ns1", "svc1", "172.30.0.41")),
        slice("ns1", "svc1", eps),
    ];
    let view = ProxyView::build(&Snapshot::from_resources(resources), "n", IpFamily::V4);
    let text = render(&view, &cfg()).full_text(&[]);
    let probs: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("-A KUBE-SVC-") && l.contains("KUBE-SEP-"))
        .map(|l| {
            l.split("--probability ")
                .nth(1)
                .map_or("last", |s| s.split(' ').next().unwrap())
        })
        .collect();
    assert_eq!(
        probs,
        ["0.2500000000", "0.3333333333", "0.5000000000", "last"]
    );
}

#[test]
fn partial_text_has_top_level_chains_and_only_changed_services() {
    let resources = vec![
        Resource::Service(svc("ns1", "svc1", "172.30.0.41")),
        Resource::Service(svc("ns2", "svc2", "172.30.0.42")),
        slice("ns1", "svc1", vec![Endpoint::ready(ip("10.180.0.1"))]),
        slice("ns2", "svc2", vec![Endpoint::ready(ip("10.180.0.2"))]),
    ];
    let view = ProxyView::build(&Snapshot::from_resources(resources), "n", IpFamily::V4);
    let rs = render(&view, &cfg());
    let changed: BTreeSet<ServicePortName> =
        [ServicePortName::new("ns2", "svc2", "p80", Protocol::Tcp)].into();
    let stale = vec!["KUBE-SEP-AAAAAAAAAAAAAAAA".to_string()];
    let text = rs.partial_text(&changed, &stale);
    // Both services stay reachable from KUBE-SERVICES...
    assert!(text.contains("-j KUBE-SVC-XPGD46QRK7WJZT7O"));
    assert!(text.contains("-j KUBE-SVC-GNZBNJ2PO5MGZ6GT"));
    // ...but only svc2's chains are rewritten.
    assert!(!text.contains(":KUBE-SVC-XPGD46QRK7WJZT7O"));
    assert!(text.contains(":KUBE-SVC-GNZBNJ2PO5MGZ6GT"));
    assert!(text.contains(":KUBE-SEP-AAAAAAAAAAAAAAAA - [0:0]\n"));
    assert!(text.ends_with("-X KUBE-SEP-AAAAAAAAAAAAAAAA\nCOMMIT\n"));
    assert_eq!(rs.active_nat_chains().len(), 5 + 4);
}

#[test]
fn large_clusters_drop_endpoint_comments() {
    let eps: Vec<Endpoint> = (0..1001)
        .map(|i| Endpoint::ready(ip(&format!("10.180.{}.{}", i / 250, i % 250 + 1))))
        .collect();
    let resources = vec![
        Resource::Service(svc("ns1", "svc1", "172.30.0.41")),
        slice("ns1", "svc1", eps),
    ];
    let view = ProxyView::build(&Snapshot::from_resources(resources), "n", IpFamily::V4);
    let text = render(&view, &cfg()).full_text(&[]);
    assert!(!text.contains("-> 10.180."));
    assert!(text.contains("\"ns1/svc1:p80 cluster IP\""));
}

#[test]
fn ipv6_excludes_localhost_node_ports_and_brackets_endpoints() {
    let mut s =
        Service::cluster_ip("ns1", "svc1", ip("2001:db8:1::1")).with_port("p80", Protocol::Tcp, 80);
    s.kind = ServiceType::NodePort;
    s.ports[0].node_port = Some(30080);
    let mut sl = slice("ns1", "svc1", vec![Endpoint::ready(ip("2001:db8:2::1"))]);
    if let Resource::EndpointSlice(es) = &mut sl {
        es.address_family = AddressFamily::Ipv6;
    }
    let node = Node {
        name: "n".into(),
        zone: None,
        addresses: vec![ip("2001:db8::1")],
        pod_cidrs: vec![],
    };
    let view = ProxyView::build(
        &Snapshot::from_resources([Resource::Service(s), sl, Resource::Node(node)]),
        "n",
        IpFamily::V6,
    );
    let mut c = cfg();
    c.local = LocalDetector::Cidr("2001:db8:2::/64".parse().unwrap());
    let text = render(&view, &c).full_text(&[]);
    assert!(text.contains("-j DNAT --to-destination [2001:db8:2::1]:80\n"));
    assert!(text.contains("-m addrtype --dst-type LOCAL ! -d ::1/128 -j KUBE-NODEPORTS"));
    assert!(!text.contains(":KUBE-FIREWALL"));
    assert!(text.contains("! -s 2001:db8:2::/64 -j KUBE-MARK-MASQ"));
}

#[test]
fn nodeport_addresses_limit_the_nodeports_jump_to_matching_node_ips() {
    let snap = Snapshot::from_resources([
        Resource::Service(svc("ns1", "svc1", "172.30.0.41")),
        slice("ns1", "svc1", vec![Endpoint::ready(ip("10.180.0.1"))]),
    ]);
    let view = ProxyView::build(&snap, "node1", IpFamily::V4);
    let mut c = cfg();
    c.node_ips = vec![ip("192.168.0.2"), ip("172.16.9.9")];
    c.nodeport_addresses = vec![
        "192.168.0.0/24".parse().unwrap(),
        "127.0.0.0/8".parse().unwrap(),
    ];
    let text = render(&view, &c).full_text(&[]);
    let (rules, _) = parse(&text);
    let tail: Vec<&String> = rules[&("nat".to_string(), "KUBE-SERVICES".to_string())]
        .iter()
        .filter(|r| r.ends_with("-j KUBE-NODEPORTS"))
        .collect();
    assert_eq!(tail.len(), 2, "{tail:?}");
    assert!(tail[0].contains("-d 127.0.0.1/32"), "{tail:?}");
    assert!(tail[1].contains("-d 192.168.0.2/32"), "{tail:?}");
    assert!(!text.contains("--dst-type LOCAL -j KUBE-NODEPORTS"));

    // 0.0.0.0/0 means every local address: the default rule.
    c.nodeport_addresses = vec!["0.0.0.0/0".parse().unwrap()];
    assert!(
        render(&view, &c)
            .full_text(&[])
            .contains("-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS")
    );
}

fn both_local(kind: &str) -> Service {
    let mut s = svc("ns1", "both", "172.30.0.50");
    match kind {
        "nodeport" => {
            s.kind = ServiceType::NodePort;
            s.ports[0].node_port = Some(30050);
        }
        "externalip" => s.external_ips = vec![ip("192.168.99.50")],
        _ => {
            s.kind = ServiceType::LoadBalancer;
            s.ports[0].node_port = Some(30050);
            s.load_balancer_ips = vec![ip("1.2.3.50")];
            s.load_balancer_source_ranges = vec!["203.0.113.0/25".parse().unwrap()];
        }
    }
    s.internal_traffic_policy = TrafficPolicy::Local;
    s.external_traffic_policy = TrafficPolicy::Local;
    s
}

#[test]
fn both_policies_local_declare_the_cluster_chain_the_ext_chain_jumps_to() {
    for kind in ["nodeport", "externalip", "loadbalancer"] {
        // One local and one remote endpoint, then only the remote one.
        for local in [true, false] {
            let mut eps = vec![Endpoint::ready(ip("10.180.0.2")).on_node("node2")];
            if local {
                eps.push(Endpoint::ready(ip("10.180.0.1")).on_node("node1"));
            }
            let view = ProxyView::build(
                &Snapshot::from_resources([
                    Resource::Service(both_local(kind)),
                    slice("ns1", "both", eps),
                ]),
                "node1",
                IpFamily::V4,
            );
            let rs = render(&view, &cfg());
            rs.check().unwrap();
            let text = rs.full_text(&[]);
            check_text(&text).unwrap();
            let (rules, declared) = parse(&text);
            let nat = &declared["nat"];
            let ext = nat.iter().find(|c| c.starts_with("KUBE-EXT-")).unwrap();
            let svc_chain = nat.iter().find(|c| c.starts_with("KUBE-SVC-")).unwrap();
            let ext_rules = &rules[&("nat".to_string(), ext.clone())];
            assert!(
                ext_rules.iter().any(|r| r.contains("pod traffic")
                    && r.ends_with(&format!("-s 10.0.0.0/8 -j {svc_chain}"))),
                "{kind} local={local}: {ext_rules:#?}"
            );
            assert!(
                ext_rules
                    .iter()
                    .any(|r| r.contains("route LOCAL traffic") && r.ends_with(svc_chain.as_str())),
                "{kind} local={local}: {ext_rules:#?}"
            );
            // The cluster chain spreads over every endpoint, remote included.
            let svc_rules = &rules[&("nat".to_string(), svc_chain.clone())];
            let seps = nat.iter().filter(|c| c.starts_with("KUBE-SEP-")).count();
            assert_eq!(seps, if local { 2 } else { 1 }, "{kind} local={local}");
            assert_eq!(
                svc_rules.len(),
                seps,
                "{kind} local={local}: {svc_rules:#?}"
            );
            // The cluster IP itself follows internalTrafficPolicy Local.
            let services = &rules[&("nat".to_string(), "KUBE-SERVICES".to_string())];
            let svl = nat.iter().find(|c| c.starts_with("KUBE-SVL-"));
            assert_eq!(svl.is_some(), local, "{kind}: {nat:?}");
            if let Some(svl) = svl {
                assert!(
                    services
                        .iter()
                        .any(|r| r.contains("cluster IP") && r.ends_with(svl.as_str())),
                    "{services:#?}"
                );
                // Off-node traffic to the external address goes only to local endpoints.
                assert_eq!(ext_rules.last().unwrap(), &format!("-A {ext} -j {svl}"));
            } else {
                assert!(
                    text.contains("\"ns1/both:p80 has no local endpoints\""),
                    "{text}"
                );
            }
        }
    }
}

#[test]
fn the_invariant_check_names_the_service_and_chain() {
    let view = ProxyView::build(
        &Snapshot::from_resources([
            Resource::Service(both_local("nodeport")),
            slice(
                "ns1",
                "both",
                vec![Endpoint::ready(ip("10.180.0.2")).on_node("node2")],
            ),
            Resource::Service(svc("ns1", "fine", "172.30.0.51")),
            slice("ns1", "fine", vec![Endpoint::ready(ip("10.180.0.3"))]),
        ]),
        "node1",
        IpFamily::V4,
    );
    let mut rs = render(&view, &cfg());
    rs.check().unwrap();
    // Break it the way the old renderer did: the cluster chain left undeclared.
    let spn = ServicePortName::new("ns1", "both", "p80", Protocol::Tcp);
    let s = rs.services.get_mut(&spn).unwrap();
    let svc_chain = s
        .chains
        .iter()
        .find(|c| c.starts_with("KUBE-SVC-"))
        .unwrap()
        .clone();
    s.chains.retain(|c| *c != svc_chain);
    let err = rs.check().unwrap_err();
    assert!(
        err.0.iter().all(|u| u.service.as_ref() == Some(&spn)),
        "{err}"
    );
    assert!(err.0.iter().any(|u| u.chain == svc_chain), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("ns1/both:p80: nat chain {svc_chain}")),
        "{err}"
    );
    assert!(check_text(&rs.full_text(&[])).unwrap_err()[0].contains(&svc_chain));
}

#[test]
fn a_service_can_keep_an_earlier_renders_rules() {
    let build = |ep: &str| {
        let view = ProxyView::build(
            &Snapshot::from_resources([
                Resource::Service(svc("ns1", "a", "172.30.0.61")),
                slice("ns1", "a", vec![Endpoint::ready(ip(ep))]),
                Resource::Service(svc("ns1", "b", "172.30.0.62")),
                slice("ns1", "b", vec![Endpoint::ready(ip(ep))]),
            ]),
            "node1",
            IpFamily::V4,
        );
        render(&view, &cfg())
    };
    let old = build("10.180.0.1");
    let new = build("10.180.0.2");
    let a = ServicePortName::new("ns1", "a", "p80", Protocol::Tcp);
    let mixed = new.with_services_from(&[a.clone()].into(), Some(&old));
    mixed.check().unwrap();
    let text = mixed.full_text(&[]);
    assert!(
        text.contains("-s 10.180.0.1/32") || text.contains("-s 10.180.0.1 "),
        "{text}"
    );
    assert_eq!(mixed.services[&a], old.services[&a]);
    assert_ne!(mixed.services, new.services);
    assert_eq!(mixed.nat_rule_count, new.nat_rule_count);
    // Without an earlier render the service is left out, top-level lines included.
    let without = new.with_services_from(&[a.clone()].into(), None);
    without.check().unwrap();
    assert!(!without.full_text(&[]).contains("172.30.0.61"));
    // Keeping nothing reassembles the same ruleset.
    assert_eq!(new.with_services_from(&BTreeSet::new(), Some(&old)), new);
}

#[test]
fn detect_local_modes_render_kube_proxys_matches() {
    let view = ProxyView::build(
        &Snapshot::from_resources([
            Resource::Service(both_local("nodeport")),
            slice(
                "ns1",
                "both",
                vec![Endpoint::ready(ip("10.180.0.2")).on_node("node2")],
            ),
        ]),
        "node1",
        IpFamily::V4,
    );
    let masq = |c: &RenderConfig| {
        let text = render(&view, c).full_text(&[]);
        let (rules, _) = parse(&text);
        let mut out: Vec<String> = rules
            .iter()
            .filter(|((t, ch), _)| {
                t == "nat"
                    && (ch.starts_with("KUBE-SVL-")
                        || ch.starts_with("KUBE-EXT-")
                        || ch.starts_with("KUBE-SVC-"))
            })
            .flat_map(|(_, r)| {
                r.iter()
                    .filter(|r| r.contains("KUBE-MARK-MASQ") || r.contains("pod traffic"))
                    .cloned()
            })
            .collect();
        out.sort();
        out.join("\n")
    };
    let mut c = cfg();
    c.local = LocalDetector::Interface("eni+".into());
    let t = masq(&c);
    assert!(
        t.contains("\"pod traffic for ns1/both:p80 external destinations\" -i eni+ -j KUBE-SVC-"),
        "{t}"
    );
    c.local = LocalDetector::Interface("cbr0".into());
    let t = masq(&c);
    assert!(
        t.contains("\"pod traffic for ns1/both:p80 external destinations\" -i cbr0 -j KUBE-SVC-"),
        "{t}"
    );
    c.local = LocalDetector::Cidr("10.180.7.0/24".parse().unwrap());
    let t = masq(&c);
    assert!(t.contains("-s 10.180.7.0/24 -j KUBE-SVC-"), "{t}");
    // No detector: neither the pod short circuit nor the off-cluster masquerade.
    c.local = LocalDetector::None;
    let t = masq(&c);
    assert!(!t.contains("pod traffic"), "{t}");
    assert!(!t.contains("cluster IP\""), "{t}");

    // The ClusterIP masquerade rule of a Cluster-policy service.
    let view = ProxyView::build(
        &Snapshot::from_resources([
            Resource::Service(svc("ns1", "c", "172.30.0.52")),
            slice("ns1", "c", vec![Endpoint::ready(ip("10.180.0.2"))]),
        ]),
        "node1",
        IpFamily::V4,
    );
    c.local = LocalDetector::Interface("eni+".into());
    let text = render(&view, &c).full_text(&[]);
    assert!(
        text.contains("-d 172.30.0.52 --dport 80 ! -i eni+ -j KUBE-MARK-MASQ"),
        "{text}"
    );
}
