use meshlite_proto::model::{
    AddressFamily, Endpoint, EndpointPort, EndpointSlice, Node, Resource, Service, ServiceType,
    TrafficPolicy,
};
use meshlite_runtime::Snapshot;

use super::*;

const NODE: &str = "node1";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn svc(name: &str, cluster_ip: &str) -> Service {
    Service::cluster_ip("ns", name, ip(cluster_ip)).with_port("http", Protocol::Tcp, 80)
}

fn slice(service: &str, endpoints: Vec<Endpoint>) -> EndpointSlice {
    EndpointSlice {
        namespace: "ns".into(),
        name: format!("{service}-1"),
        service_name: service.into(),
        address_family: AddressFamily::Ipv4,
        ports: vec![EndpointPort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 8080,
            app_protocol: None,
        }],
        endpoints,
        ignored_by_proxy: false,
    }
}

fn remote(addr: &str) -> Endpoint {
    Endpoint::ready(ip(addr)).on_node("node2")
}

fn local(addr: &str) -> Endpoint {
    Endpoint::ready(ip(addr)).on_node(NODE)
}

fn config() -> PlanConfig {
    PlanConfig {
        prefix: "KUBE".into(),
        scheduler: Scheduler::Rr,
        local: crate::local::LocalDetector::Cidr("198.18.0.0/17".parse().unwrap()),
        masquerade_all: false,
        masquerade_mark: 0x4000,
        random_fully: true,
        node_ip: Some(ip("198.18.200.1")),
        node_port_ips: vec![ip("198.18.200.1"), ip("198.18.201.1")],
        local_addresses: [ip("198.18.200.1"), ip("198.18.201.1"), ip("198.19.9.9")].into(),
    }
}

fn plan_of(services: Vec<(Service, Vec<Endpoint>)>) -> Plan {
    plan_with(services, config())
}

fn plan_with(services: Vec<(Service, Vec<Endpoint>)>, cfg: PlanConfig) -> Plan {
    let mut r = vec![Resource::Node(Node {
        name: NODE.into(),
        zone: None,
        addresses: vec![ip("198.18.200.1")],
        pod_cidrs: vec![],
    })];
    for (s, eps) in services {
        let name = s.name.clone();
        r.push(Resource::Service(s));
        r.push(Resource::EndpointSlice(slice(&name, eps)));
    }
    let view = ProxyView::build(&Snapshot::from_resources(r), NODE, IpFamily::V4);
    Plan::build(&[view], |_| cfg.clone())
}

fn members<'a>(plan: &'a Plan, set: &str) -> Vec<&'a str> {
    plan.families[0].ipsets[set]
        .members
        .iter()
        .map(String::as_str)
        .collect()
}

fn vs<'a>(plan: &'a Plan, proto: Protocol, addr: &str) -> &'a VirtualServer {
    let key = VsKey {
        protocol: proto,
        addr: sa(addr),
    };
    plan.virtual_servers
        .get(&key)
        .unwrap_or_else(|| panic!("no {key} in {:?}", plan.virtual_servers.keys()))
}

fn weights(v: &VirtualServer) -> Vec<(String, u32)> {
    v.dests.iter().map(|(a, w)| (a.to_string(), *w)).collect()
}

#[test]
fn cluster_ip_gets_a_virtual_server_with_every_endpoint() {
    let p = plan_of(vec![(
        svc("web", "198.19.0.1"),
        vec![
            remote("198.18.1.1"),
            remote("198.18.1.2"),
            remote("198.18.1.3"),
        ],
    )]);
    assert_eq!(p.virtual_servers.len(), 1);
    let v = vs(&p, Protocol::Tcp, "198.19.0.1:80");
    assert_eq!(v.scheduler, Scheduler::Rr);
    assert_eq!((v.flags, v.timeout), (0, 0));
    assert_eq!(
        weights(v),
        [
            ("198.18.1.1:8080".to_string(), 1),
            ("198.18.1.2:8080".to_string(), 1),
            ("198.18.1.3:8080".to_string(), 1)
        ]
    );
    assert_eq!(v.owner, "ns/web:http");
    assert_eq!(p.bind, [ip("198.19.0.1")].into());
    assert_eq!(members(&p, "KUBE-CLUSTER-IP"), ["198.19.0.1,tcp:80"]);
    assert_eq!(members(&p, "KUBE-IPVS-IPS"), ["198.19.0.1"]);
    assert!(members(&p, "KUBE-LOOP-BACK").is_empty());
    assert!(p.warnings.is_empty());
}

#[test]
fn no_endpoints_keeps_an_empty_virtual_server_which_rejects() {
    let p = plan_of(vec![(svc("empty", "198.19.0.2"), vec![])]);
    assert!(vs(&p, Protocol::Tcp, "198.19.0.2:80").dests.is_empty());
    assert_eq!(p.bind, [ip("198.19.0.2")].into());
}

#[test]
fn session_affinity_is_persistence_with_the_service_timeout() {
    let mut s = svc("sticky", "198.19.0.3");
    s.session_affinity_timeout = Some(10800);
    let p = plan_of(vec![(s, vec![remote("198.18.1.1")])]);
    let v = vs(&p, Protocol::Tcp, "198.19.0.3:80");
    assert_eq!((v.flags, v.timeout), (FLAG_PERSISTENT, 10800));
}

#[test]
fn annotations_choose_the_scheduler_and_weights() {
    let mut s = svc("weighted", "198.19.0.4");
    s.annotations
        .insert(SCHEDULER_ANNOTATION.into(), "wrr".into());
    s.annotations.insert(
        WEIGHTS_ANNOTATION.into(),
        "198.18.1.1=3, 198.18.1.2=0".into(),
    );
    let mut bad = svc("bad", "198.19.0.5");
    bad.annotations
        .insert(SCHEDULER_ANNOTATION.into(), "wlc".into());
    bad.annotations
        .insert(WEIGHTS_ANNOTATION.into(), "198.18.1.1:3".into());
    let eps = || {
        vec![
            remote("198.18.1.1"),
            remote("198.18.1.2"),
            remote("198.18.1.3"),
        ]
    };
    let mut cfg = config();
    cfg.scheduler = Scheduler::Sh;
    let p = plan_with(vec![(s, eps()), (bad, eps())], cfg);
    let v = vs(&p, Protocol::Tcp, "198.19.0.4:80");
    assert_eq!(v.scheduler, Scheduler::Wrr);
    assert_eq!(
        weights(v),
        [
            ("198.18.1.1:8080".to_string(), 3),
            ("198.18.1.2:8080".to_string(), 0),
            ("198.18.1.3:8080".to_string(), 1)
        ]
    );
    // Bad annotations: the default scheduler, weight 1, and a warning each.
    let b = vs(&p, Protocol::Tcp, "198.19.0.5:80");
    assert_eq!(b.scheduler, Scheduler::Sh);
    assert!(b.dests.values().all(|w| *w == 1));
    assert_eq!(p.warnings.len(), 2, "{:?}", p.warnings);
    assert!(p.warnings[0].contains("ns/bad") && p.warnings[0].contains("wlc"));
}

#[test]
fn weights_parse_strictly() {
    assert_eq!(
        parse_weights(" 198.18.1.1=2,2001:db8::1=65535,").unwrap(),
        [(ip("198.18.1.1"), 2), (ip("2001:db8::1"), 65535)].into()
    );
    assert!(parse_weights("198.18.1.1=70000").is_err());
    assert!(parse_weights("pod-a=1").is_err());
    assert!(parse_weights("198.18.1.1").is_err());
}

#[test]
fn node_port_external_ip_and_load_balancer_get_their_own_virtual_servers() {
    let mut s = svc("edge", "198.19.0.6");
    s.kind = ServiceType::LoadBalancer;
    s.ports[0].node_port = Some(30080);
    s.external_ips = vec![ip("198.19.50.1"), ip("198.19.9.9")];
    s.load_balancer_ips = vec![ip("198.19.60.1")];
    s.health_check_node_port = None;
    let p = plan_of(vec![(s, vec![remote("198.18.1.1"), local("198.18.2.1")])]);
    for addr in [
        "198.19.0.6:80",
        "198.19.50.1:80",
        "198.19.9.9:80",
        "198.19.60.1:80",
        "198.18.200.1:30080",
        "198.18.201.1:30080",
    ] {
        assert_eq!(vs(&p, Protocol::Tcp, addr).dests.len(), 2, "{addr}");
    }
    assert_eq!(p.virtual_servers.len(), 6);
    // 198.19.9.9 is already a node address: not on the dummy interface.
    assert_eq!(
        p.bind,
        [ip("198.19.0.6"), ip("198.19.50.1"), ip("198.19.60.1")].into()
    );
    assert_eq!(
        members(&p, "KUBE-EXTERNAL-IP"),
        ["198.19.50.1,tcp:80", "198.19.9.9,tcp:80"]
    );
    assert_eq!(members(&p, "KUBE-LOAD-BALANCER"), ["198.19.60.1,tcp:80"]);
    assert_eq!(members(&p, "KUBE-NODE-PORT-TCP"), ["30080"]);
    assert!(members(&p, "KUBE-NODE-PORT-LOCAL-TCP").is_empty());
    // The local endpoint can reach itself through the service (hairpin).
    assert_eq!(
        members(&p, "KUBE-LOOP-BACK"),
        ["198.18.2.1,tcp:8080,198.18.2.1"]
    );
}

#[test]
fn external_traffic_policy_local_uses_local_endpoints_off_the_cluster_ip() {
    let mut s = svc("local", "198.19.0.7");
    s.kind = ServiceType::LoadBalancer;
    s.ports[0].node_port = Some(30081);
    s.external_traffic_policy = TrafficPolicy::Local;
    s.health_check_node_port = Some(32000);
    s.load_balancer_ips = vec![ip("198.19.60.2")];
    s.external_ips = vec![ip("198.19.50.2")];
    let p = plan_of(vec![(s, vec![remote("198.18.1.1"), local("198.18.2.1")])]);
    assert_eq!(vs(&p, Protocol::Tcp, "198.19.0.7:80").dests.len(), 2);
    for addr in ["198.19.60.2:80", "198.19.50.2:80", "198.18.200.1:30081"] {
        assert_eq!(
            weights(vs(&p, Protocol::Tcp, addr)),
            [("198.18.2.1:8080".to_string(), 1)],
            "{addr}"
        );
    }
    assert_eq!(members(&p, "KUBE-NODE-PORT-LOCAL-TCP"), ["30081"]);
    assert_eq!(members(&p, "KUBE-NODE-PORT-TCP"), ["30081"]);
    assert_eq!(
        members(&p, "KUBE-LOAD-BALANCER-LOCAL"),
        ["198.19.60.2,tcp:80"]
    );
    assert_eq!(
        members(&p, "KUBE-EXTERNAL-IP-LOCAL"),
        ["198.19.50.2,tcp:80"]
    );
    assert!(members(&p, "KUBE-EXTERNAL-IP").is_empty());
    assert_eq!(members(&p, "KUBE-HEALTH-CHECK-NODE-PORT"), ["32000"]);

    // No local endpoint: the cluster endpoints (kube-proxy #97081).
    let mut s = svc("nolocal", "198.19.0.8");
    s.kind = ServiceType::NodePort;
    s.ports[0].node_port = Some(30082);
    s.external_traffic_policy = TrafficPolicy::Local;
    let p = plan_of(vec![(s, vec![remote("198.18.1.1")])]);
    assert_eq!(
        weights(vs(&p, Protocol::Tcp, "198.18.200.1:30082")),
        [("198.18.1.1:8080".to_string(), 1)]
    );
}

#[test]
fn internal_traffic_policy_local_without_local_endpoints_has_no_real_server() {
    let mut s = svc("itp", "198.19.0.9");
    s.internal_traffic_policy = TrafficPolicy::Local;
    let p = plan_of(vec![(s.clone(), vec![remote("198.18.1.1")])]);
    assert!(vs(&p, Protocol::Tcp, "198.19.0.9:80").dests.is_empty());
    let p = plan_of(vec![(s, vec![remote("198.18.1.1"), local("198.18.2.1")])]);
    assert_eq!(
        weights(vs(&p, Protocol::Tcp, "198.19.0.9:80")),
        [("198.18.2.1:8080".to_string(), 1)]
    );
}

#[test]
fn load_balancer_source_ranges_fill_the_firewall_sets() {
    let mut s = svc("fw", "198.19.0.10");
    s.kind = ServiceType::LoadBalancer;
    s.load_balancer_ips = vec![ip("198.19.60.3")];
    s.load_balancer_source_ranges = vec!["198.18.200.0/24".parse().unwrap()];
    let mut closed = svc("closed", "198.19.0.11");
    closed.kind = ServiceType::LoadBalancer;
    closed.load_balancer_ips = vec![ip("198.19.60.4")];
    closed.load_balancer_source_ranges = vec!["203.0.113.7/32".parse().unwrap()];
    let p = plan_of(vec![
        (s, vec![remote("198.18.1.1")]),
        (closed, vec![remote("198.18.1.1")]),
    ]);
    assert_eq!(
        members(&p, "KUBE-LOAD-BALANCER-FW"),
        ["198.19.60.3,tcp:80", "198.19.60.4,tcp:80"]
    );
    assert_eq!(
        members(&p, "KUBE-LOAD-BALANCER-SOURCE-CIDR"),
        [
            "198.19.60.3,tcp:80,198.18.200.0/24",
            "198.19.60.4,tcp:80,203.0.113.7"
        ]
    );
    // The node is inside the first range: it may reach that LB IP.
    assert_eq!(
        members(&p, "KUBE-LOAD-BALANCER-SOURCE-IP"),
        ["198.19.60.3,tcp:80,198.19.60.3"]
    );
    let rules = &p.families[0].rules;
    assert!(rules.contains(
        "-A KUBE-IPVS-OUT-FILTER -s 198.19.60.4 -m ipvs --vaddr 198.19.60.4 --vproto tcp --vport 80 -j DROP\n"
    ), "{rules}");
    assert!(!rules.contains("--vaddr 198.19.60.3"), "{rules}");
}

#[test]
fn udp_and_sctp_node_ports_use_their_sets() {
    let mut u =
        Service::cluster_ip("ns", "dns", ip("198.19.0.12")).with_port("dns", Protocol::Udp, 53);
    u.kind = ServiceType::NodePort;
    u.ports[0].node_port = Some(30053);
    let mut sc =
        Service::cluster_ip("ns", "sig", ip("198.19.0.13")).with_port("sig", Protocol::Sctp, 9000);
    sc.kind = ServiceType::NodePort;
    sc.ports[0].node_port = Some(30900);
    let p = plan_of(vec![(u, vec![]), (sc, vec![])]);
    assert_eq!(members(&p, "KUBE-NODE-PORT-UDP"), ["30053"]);
    assert_eq!(
        members(&p, "KUBE-NODE-PORT-SCTP-HASH"),
        ["198.18.200.1,sctp:30900", "198.18.201.1,sctp:30900"]
    );
    assert_eq!(
        members(&p, "KUBE-CLUSTER-IP"),
        ["198.19.0.12,udp:53", "198.19.0.13,sctp:9000"]
    );
    vs(&p, Protocol::Udp, "198.18.201.1:30053");
    vs(&p, Protocol::Sctp, "198.19.0.13:9000");
}

#[test]
fn the_iptables_ruleset_is_kube_proxys() {
    let mut s = svc("edge", "198.19.0.6");
    s.kind = ServiceType::NodePort;
    s.ports[0].node_port = Some(30080);
    s.external_ips = vec![ip("198.19.50.1")];
    let p = plan_of(vec![(s, vec![remote("198.18.1.1"), local("198.18.2.1")])]);
    let want = "\
*nat
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-NODE-PORT - [0:0]
:KUBE-LOAD-BALANCER - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-PROXY-CANARY - [0:0]
-A KUBE-SERVICES -s 127.0.0.0/8 -j RETURN
-A KUBE-POSTROUTING -m comment --comment \"Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose\" -m set --match-set KUBE-LOOP-BACK dst,dst,src -j MASQUERADE
-A KUBE-NODE-PORT -p tcp -m comment --comment \"Kubernetes nodeport TCP port for masquerade purpose\" -m set --match-set KUBE-NODE-PORT-TCP dst -j KUBE-MARK-MASQ
-A KUBE-SERVICES -m comment --comment \"Kubernetes service cluster ip + port for masquerade purpose\" -m set --match-set KUBE-CLUSTER-IP dst,dst ! -s 198.18.0.0/17 -j KUBE-MARK-MASQ
-A KUBE-SERVICES -m comment --comment \"Kubernetes service external ip + port for masquerade and filter purpose\" -m set --match-set KUBE-EXTERNAL-IP dst,dst -j KUBE-MARK-MASQ
-A KUBE-SERVICES -m comment --comment \"Kubernetes service external ip + port for masquerade and filter purpose\" -m set --match-set KUBE-EXTERNAL-IP dst,dst -m physdev ! --physdev-is-in -m addrtype ! --src-type LOCAL -j ACCEPT
-A KUBE-SERVICES -m comment --comment \"Kubernetes service external ip + port for masquerade and filter purpose\" -m set --match-set KUBE-EXTERNAL-IP dst,dst -m addrtype --dst-type LOCAL -j ACCEPT
-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT
-A KUBE-LOAD-BALANCER -j KUBE-MARK-MASQ
-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT
-A KUBE-POSTROUTING -m mark ! --mark 0x004000/0x004000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x004000
-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully
-A KUBE-MARK-MASQ -j MARK --or-mark 0x004000
COMMIT
*filter
:KUBE-FORWARD - [0:0]
:KUBE-NODE-PORT - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-SOURCE-RANGES-FIREWALL - [0:0]
:KUBE-IPVS-FILTER - [0:0]
:KUBE-IPVS-OUT-FILTER - [0:0]
:KUBE-PROXY-CANARY - [0:0]
-A KUBE-SOURCE-RANGES-FIREWALL -j DROP
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x004000/0x004000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A KUBE-NODE-PORT -m comment --comment \"Kubernetes health check node port\" -m set --match-set KUBE-HEALTH-CHECK-NODE-PORT dst -j ACCEPT
-A KUBE-IPVS-FILTER -m set --match-set KUBE-LOAD-BALANCER dst,dst -j RETURN
-A KUBE-IPVS-FILTER -m set --match-set KUBE-CLUSTER-IP dst,dst -j RETURN
-A KUBE-IPVS-FILTER -m set --match-set KUBE-EXTERNAL-IP dst,dst -j RETURN
-A KUBE-IPVS-FILTER -m set --match-set KUBE-EXTERNAL-IP-LOCAL dst,dst -j RETURN
-A KUBE-IPVS-FILTER -m set --match-set KUBE-HEALTH-CHECK-NODE-PORT dst -j RETURN
-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW -m set --match-set KUBE-IPVS-IPS dst -j REJECT
COMMIT
";
    assert_eq!(p.families[0].rules, want);
    assert_eq!(p.families[0].nat_rule_count, 14);
    assert_eq!(p.families[0].filter_rule_count, 10);
}

#[test]
fn without_a_pod_cidr_node_traffic_from_a_vip_is_masqueraded() {
    let mut cfg = config();
    cfg.local = crate::local::LocalDetector::None;
    let p = plan_with(vec![(svc("web", "198.19.0.1"), vec![])], cfg.clone());
    assert!(
        p.families[0]
            .rules
            .contains("--match-set KUBE-CLUSTER-IP src,dst -j KUBE-MARK-MASQ\n")
    );
    cfg.masquerade_all = true;
    let p = plan_with(vec![(svc("web", "198.19.0.1"), vec![])], cfg);
    assert!(
        p.families[0]
            .rules
            .contains("--match-set KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ\n")
    );
}

#[test]
fn ipv6_uses_the_6_sets_and_loopback() {
    let s =
        Service::cluster_ip("ns", "v6", ip("2001:db8:19::1")).with_port("http", Protocol::Tcp, 80);
    let mut sl = slice("v6", vec![remote("2001:db8:18::1")]);
    sl.address_family = AddressFamily::Ipv6;
    let r = vec![Resource::Service(s), Resource::EndpointSlice(sl)];
    let view = ProxyView::build(&Snapshot::from_resources(r), NODE, IpFamily::V6);
    let mut cfg = config();
    cfg.local = crate::local::LocalDetector::Cidr("2001:db8:18::/64".parse().unwrap());
    cfg.node_port_ips = vec![];
    let p = Plan::build(&[view], |_| cfg.clone());
    let v = vs(&p, Protocol::Tcp, "[2001:db8:19::1]:80");
    assert_eq!(weights(v), [("[2001:db8:18::1]:8080".to_string(), 1)]);
    assert_eq!(members(&p, "KUBE-6-CLUSTER-IP"), ["2001:db8:19::1,tcp:80"]);
    let rules = &p.families[0].rules;
    assert!(
        rules.contains("-A KUBE-SERVICES -s ::1/128 -j RETURN\n"),
        "{rules}"
    );
    assert!(rules.contains("--match-set KUBE-6-CLUSTER-IP dst,dst ! -s 2001:db8:18::/64"));
}
