//! The tracer on the rendered rules of the golden render cases, one feature at
//! a time, for both backends.

use clap::Parser;

use super::cli::ExplainArgs;
use super::*;

#[derive(Parser)]
struct T {
    #[command(flatten)]
    a: ExplainArgs,
}

/// Explains `from -> to` on node1 of `tests/render/<case>` in `mode`.
fn explain(case: &str, mode: &str, from: &str, to: &str, proto: &str) -> Explanation {
    let dir = format!("{}/tests/render/{case}", env!("CARGO_MANIFEST_DIR"));
    let t = T::try_parse_from([
        "x",
        "--manifests",
        &dir,
        "--node-name",
        "node1",
        "--mode",
        mode,
        "--from",
        from,
        "--to",
        to,
        "--protocol",
        proto,
        "--cluster-cidr",
        "198.18.0.0/17,2001:db8:1::/64",
        "--node-ip",
        "198.18.0.1,2001:db8::1",
    ])
    .unwrap();
    let (rules, host) = t.a.load().unwrap();
    rules.explain(&t.a.packet(), &host)
}

fn both(case: &str, from: &str, to: &str) -> [Explanation; 2] {
    [
        explain(case, "iptables", from, to, "tcp"),
        explain(case, "ipvs", from, to, "tcp"),
    ]
}

fn total(x: &Explanation) -> f64 {
    x.endpoints.iter().map(|e| e.probability).sum()
}

const POD: &str = "198.18.1.50";
const OUTSIDE: &str = "203.0.113.9";
const NODE: &str = "198.18.0.1";

#[test]
fn cluster_ip_from_a_pod_is_dnat_without_masquerade() {
    for x in both("nodeport", POD, "198.19.0.10:80") {
        assert_eq!(x.verdict, Verdict::Dnat, "{x:#?}");
        assert!(!x.masquerade);
        assert!(!x.endpoints.is_empty());
        assert!((total(&x) - 1.0).abs() < 1e-4, "{x:#?}");
        assert_eq!(x.service.as_deref(), Some("default/web:http"));
        assert!(x.trace.iter().any(|s| s.rule.contains("198.19.0.10")));
    }
}

#[test]
fn cluster_ip_from_off_cluster_is_masqueraded() {
    for x in both("nodeport", OUTSIDE, "198.19.0.10:80") {
        assert_eq!(x.verdict, Verdict::Dnat);
        assert!(x.masquerade, "{x:#?}");
    }
}

#[test]
fn nodeport_on_the_node_ip_from_outside_and_from_the_node_itself() {
    for x in both("nodeport", OUTSIDE, "198.18.0.1:30080") {
        assert_eq!(x.verdict, Verdict::Dnat, "{x:#?}");
        assert!(x.masquerade);
        assert_eq!(x.service.as_deref(), Some("default/web:http"));
    }
    // Locally generated (OUTPUT path), to the node IP and to localhost.
    let x = explain("nodeport", "iptables", NODE, "198.18.0.1:30080", "tcp");
    assert_eq!(x.verdict, Verdict::Dnat, "{x:#?}");
    assert!(x.trace.iter().any(|s| s.chain == "OUTPUT"));
    let x = explain(
        "nodeport",
        "iptables",
        "127.0.0.1",
        "127.0.0.1:30080",
        "tcp",
    );
    assert_eq!(x.verdict, Verdict::Dnat, "{x:#?}");
    assert!(x.masquerade);
    // The wrong protocol matches nothing.
    let x = explain("nodeport", "iptables", OUTSIDE, "198.18.0.1:30080", "udp");
    assert_eq!(x.verdict, Verdict::NoMatch, "{x:#?}");
    assert!(x.endpoints.is_empty());
}

#[test]
fn a_port_of_no_service_is_no_match_or_the_ipvs_filter() {
    let [ipt, ipvs] = both("nodeport", OUTSIDE, "198.19.0.10:81");
    assert_eq!(ipt.verdict, Verdict::NoMatch, "{ipt:#?}");
    assert_eq!(ipt.service, None);
    // IPVS mode refuses other ports of a service IP (the address is on the node).
    assert_eq!(ipvs.verdict, Verdict::Reject, "{ipvs:#?}");
    assert!(ipvs.trace.iter().any(|s| s.chain == "KUBE-IPVS-FILTER"));
}

#[test]
fn no_endpoints_is_rejected_on_every_address_kind() {
    for to in ["198.19.0.20:80", "198.19.50.3:80", "198.18.0.1:30084"] {
        let x = explain("no-endpoints", "iptables", OUTSIDE, to, "tcp");
        assert_eq!(x.verdict, Verdict::Reject, "{to}: {x:#?}");
        assert_eq!(x.service.as_deref(), Some("default/empty:http"));
        assert!(x.trace.iter().any(|s| s.rule.ends_with("-j REJECT")));
    }
}

#[test]
fn load_balancer_source_ranges() {
    // Allowed source: DNAT to the local endpoint only (externalTrafficPolicy Local).
    let x = explain(
        "loadbalancer",
        "iptables",
        "198.18.200.7",
        "198.19.60.1:80",
        "tcp",
    );
    assert_eq!(x.verdict, Verdict::Dnat, "{x:#?}");
    assert_eq!(x.endpoints.len(), 1, "{x:#?}");
    assert!(!x.masquerade, "Local policy keeps the client address");
    // Any other source is dropped by the firewall chain.
    let x = explain("loadbalancer", "iptables", OUTSIDE, "198.19.60.1:80", "tcp");
    assert_eq!(x.verdict, Verdict::Drop, "{x:#?}");
    assert!(x.trace.iter().any(|s| s.chain == "KUBE-PROXY-FIREWALL"));
    // Cluster policy: every endpoint, masqueraded.
    let x = explain("loadbalancer", "iptables", OUTSIDE, "198.19.60.2:80", "tcp");
    assert_eq!(x.verdict, Verdict::Dnat);
    assert_eq!(x.endpoints.len(), 2);
    assert!(x.masquerade);
    // Local policy with no local endpoint: dropped.
    let x = explain("loadbalancer", "iptables", OUTSIDE, "198.19.60.3:80", "tcp");
    assert_eq!(x.verdict, Verdict::Drop, "{x:#?}");
}

#[test]
fn external_ips() {
    for x in both("external-ips", OUTSIDE, "198.19.50.1:80") {
        assert_eq!(x.verdict, Verdict::Dnat, "{x:#?}");
        assert_eq!(x.service.as_deref(), Some("default/ext:http"));
    }
}

#[test]
fn internal_traffic_policy_local() {
    let x = explain("internal-local", "iptables", POD, "198.19.0.16:80", "tcp");
    assert_eq!(x.verdict, Verdict::Dnat, "{x:#?}");
    assert!(x.trace.iter().any(|s| s.chain.starts_with("KUBE-SVL-")));
    let x = explain("internal-local", "iptables", POD, "198.19.0.17:80", "tcp");
    assert_eq!(x.verdict, Verdict::Drop, "{x:#?}");
}

#[test]
fn terminating_fallback_still_reaches_an_endpoint() {
    for x in both("terminating", POD, "198.19.0.18:80") {
        assert_eq!(x.verdict, Verdict::Dnat, "{x:#?}");
        assert!(!x.endpoints.is_empty());
    }
}

#[test]
fn affinity_is_reported_as_not_modelled() {
    for x in both("affinity", POD, "198.19.0.15:80") {
        assert_eq!(x.verdict, Verdict::Dnat, "{x:#?}");
        assert!(x.affinity, "{x:#?}");
        assert!(x.notes.iter().any(|n| n.contains("affinity")));
    }
}

#[test]
fn ipv6() {
    let x = explain(
        "ipv6",
        "iptables",
        "2001:db8:1::5",
        "[2001:db8::1]:30085",
        "tcp",
    );
    assert_eq!(x.verdict, Verdict::Dnat, "{x:#?}");
    assert!(x.endpoints.iter().all(|e| e.address.starts_with('[')));
}

#[test]
fn json_has_exactly_the_documented_fields() {
    let x = explain("nodeport", "iptables", POD, "198.19.0.10:80", "tcp");
    let v = serde_json::to_value(&x).unwrap();
    for k in ["verdict", "endpoints", "masquerade", "service", "trace"] {
        assert!(v.get(k).is_some(), "{k} missing");
    }
    assert_eq!(v["verdict"], "dnat");
    assert!(v["endpoints"][0]["address"].is_string());
    assert!(v["endpoints"][0]["probability"].is_number());
    assert!(v["trace"][0]["table"].is_string());
    assert!(v["trace"][0]["chain"].is_string());
    assert!(v["trace"][0]["rule"].is_string());
}

#[test]
fn statistic_probabilities_multiply_along_the_chain() {
    let t = iptables::Tables::parse(
        "*nat\n:PREROUTING ACCEPT [0:0]\n\
         -A PREROUTING -d 198.19.0.1/32 -p tcp --dport 80 -j SVC\n\
         -A SVC -m statistic --mode random --probability 0.25 -j DNAT --to-destination 198.18.1.1:80\n\
         -A SVC -m statistic --mode random --probability 0.5 -j DNAT --to-destination 198.18.1.2:80\n\
         -A SVC -j DNAT --to-destination 198.18.1.3:80\nCOMMIT\n",
    )
    .unwrap();
    let p = Packet {
        src: "198.18.9.9".parse().unwrap(),
        dst: "198.19.0.1:80".parse().unwrap(),
        protocol: Protocol::Tcp,
    };
    let x = RuleSet::Iptables(t).explain(&p, &Host::default());
    let probs: Vec<f64> = x.endpoints.iter().map(|e| e.probability).collect();
    assert_eq!(probs, [0.25, 0.375, 0.375]);
}
