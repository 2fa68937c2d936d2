//! The nftables tracer: on the nftables rules `render` writes for the golden
//! render cases, one feature at a time; on a table as `nft list table` prints it;
//! and on the syntax a hand-made rule may use.

use clap::Parser;

use super::*;
use crate::explain::cli::ExplainArgs;
use crate::explain::{Explanation, Packet, RuleSet, Verdict};

#[derive(Parser)]
struct T {
    #[command(flatten)]
    a: ExplainArgs,
}

const POD: &str = "198.18.1.50";
const OUTSIDE: &str = "203.0.113.9";
const NODE: &str = "198.18.0.1";

/// Explains `from -> to` on node1 of `tests/render/<case>` in nftables mode.
fn explain_with(case: &str, from: &str, to: &str, proto: &str, extra: &[&str]) -> Explanation {
    let dir = format!("{}/tests/render/{case}", env!("CARGO_MANIFEST_DIR"));
    let mut args = vec![
        "x",
        "--manifests",
        &dir,
        "--node-name",
        "node1",
        "--mode",
        "nftables",
        "--from",
        from,
        "--to",
        to,
        "--protocol",
        proto,
        "--cluster-cidr",
        "198.18.0.0/17,2001:db8:1::/64",
    ];
    if !extra.contains(&"--node-ip") {
        args.extend(["--node-ip", "198.18.0.1,2001:db8::1"]);
    }
    args.extend(extra);
    let t = T::try_parse_from(args).unwrap();
    let (rules, host) = t.a.load().unwrap();
    assert!(matches!(rules, RuleSet::Nftables(_)));
    rules.explain(&t.a.packet(), &host)
}

fn explain(case: &str, from: &str, to: &str) -> Explanation {
    explain_with(case, from, to, "tcp", &[])
}

fn endpoints(x: &Explanation) -> Vec<(&str, f64)> {
    x.endpoints
        .iter()
        .map(|e| (e.address.as_str(), e.probability))
        .collect()
}

fn has_rule(x: &Explanation, chain_prefix: &str, rule_part: &str) -> bool {
    x.trace
        .iter()
        .any(|s| s.chain.starts_with(chain_prefix) && s.rule.contains(rule_part))
}

#[test]
fn cluster_ip_from_a_pod_and_from_off_cluster() {
    let x = explain("nodeport", POD, "198.19.0.10:80");
    assert_eq!(x.verdict, Verdict::Dnat, "{x:#?}");
    assert_eq!(
        endpoints(&x),
        [("198.18.1.2:8080", 0.5), ("198.18.2.2:8080", 0.5)]
    );
    assert!(!x.masquerade, "{x:#?}");
    assert_eq!(x.service.as_deref(), Some("default/web:http"));
    assert!(has_rule(&x, "services", "vmap @service-ips"), "{x:#?}");
    assert!(has_rule(
        &x,
        "@service-ips",
        "198.19.0.10 . tcp . 80 : goto service-"
    ));
    assert!(has_rule(&x, "service-", "numgen random mod 2 == 0"));
    assert_eq!(x.trace[0].table, "ip kube-proxy");
    assert_eq!(x.trace[0].chain, "filter-prerouting-pre-dnat");
    // Off-cluster: the service chain marks it, POSTROUTING masquerades.
    let x = explain("nodeport", OUTSIDE, "198.19.0.10:80");
    assert_eq!(x.verdict, Verdict::Dnat);
    assert!(x.masquerade, "{x:#?}");
    assert!(has_rule(
        &x,
        "mark-for-masquerade",
        "mark set mark or 0x4000"
    ));
    assert!(has_rule(&x, "masquerading", "masquerade fully-random"));
}

#[test]
fn a_pod_reaching_itself_is_masqueraded_by_the_hairpin_rule() {
    let x = explain("terminating", "198.18.1.2", "198.19.0.18:80");
    assert_eq!(endpoints(&x), [("198.18.1.2:8080", 1.0)]);
    assert!(x.masquerade, "{x:#?}");
    assert!(has_rule(&x, "masquerading", "@hairpin-connections"));
}

#[test]
fn other_ports_of_a_cluster_ip_are_rejected_and_other_protocols_too() {
    // kube-proxy's nftables mode rejects what the iptables mode lets through.
    let x = explain("nodeport", POD, "198.19.0.10:81");
    assert_eq!(x.verdict, Verdict::Reject, "{x:#?}");
    assert!(has_rule(
        &x,
        "cluster-ips-check",
        "ip daddr @cluster-ips reject"
    ));
    let x = explain_with("nodeport", POD, "198.19.0.10:80", "udp", &[]);
    assert_eq!(x.verdict, Verdict::Reject, "{x:#?}");
    // An address that is no ClusterIP: nothing.
    let x = explain("nodeport", POD, "198.19.0.99:80");
    assert_eq!(x.verdict, Verdict::NoMatch, "{x:#?}");
    assert_eq!(x.service, None);
}

#[test]
fn nodeport_on_each_kind_of_address() {
    // The node IP, from outside: every endpoint, masqueraded.
    let x = explain("nodeport", OUTSIDE, "198.18.0.1:30080");
    assert_eq!(x.verdict, Verdict::Dnat, "{x:#?}");
    assert_eq!(x.endpoints.len(), 2);
    assert!(x.masquerade);
    assert_eq!(x.service.as_deref(), Some("default/web:http"));
    assert!(has_rule(&x, "services", "vmap @service-nodeports"));
    assert!(has_rule(
        &x,
        "@service-nodeports",
        "tcp . 30080 : goto external-"
    ));
    // From the node itself: the output hook.
    let x = explain("nodeport", NODE, "198.18.0.1:30080");
    assert_eq!(x.verdict, Verdict::Dnat, "{x:#?}");
    assert!(x.masquerade);
    assert!(x.trace.iter().any(|s| s.chain == "nat-output"));
    assert!(!x.trace.iter().any(|s| s.chain == "nat-prerouting"));
    // Loopback: the nftables mode has no localhost NodePorts (as kube-proxy).
    let x = explain("nodeport", "127.0.0.1", "127.0.0.1:30080");
    assert_eq!(x.verdict, Verdict::NoMatch, "{x:#?}");
    // A node address NodePorts are not on (only the primary IP by default).
    let x = explain_with(
        "nodeport",
        OUTSIDE,
        "198.18.0.9:30080",
        "tcp",
        &["--node-ip", "198.18.0.1,198.18.0.9"],
    );
    assert_eq!(x.verdict, Verdict::NoMatch, "{x:#?}");
    // ... unless --nodeport-addresses takes it in.
    let x = explain_with(
        "nodeport",
        OUTSIDE,
        "198.18.0.9:30080",
        "tcp",
        &[
            "--node-ip",
            "198.18.0.1,198.18.0.9",
            "--nodeport-addresses",
            "198.18.0.0/24",
        ],
    );
    assert_eq!(x.verdict, Verdict::Dnat, "{x:#?}");
    // The wrong protocol matches nothing.
    let x = explain_with("nodeport", OUTSIDE, "198.18.0.1:30080", "udp", &[]);
    assert_eq!(x.verdict, Verdict::NoMatch, "{x:#?}");
}

#[test]
fn no_endpoints_is_rejected_on_every_address_kind() {
    for to in ["198.19.0.20:80", "198.19.50.3:80", "198.18.0.1:30084"] {
        for from in [OUTSIDE, POD, NODE] {
            let x = explain("no-endpoints", from, to);
            assert_eq!(x.verdict, Verdict::Reject, "{from} -> {to}: {x:#?}");
            assert!(has_rule(&x, "reject-chain", "reject"), "{x:#?}");
            assert!(x.endpoints.is_empty());
        }
    }
    // The node's own connection to a NodePort with no endpoints is refused on
    // local delivery (input), after the output hook let it through.
    let x = explain("no-endpoints", NODE, "198.18.0.1:30084");
    assert!(has_rule(
        &x,
        "nodeport-endpoints-check",
        "@no-endpoint-nodeports"
    ));
    assert!(has_rule(
        &x,
        "@no-endpoint-nodeports",
        ": goto reject-chain"
    ));
}

#[test]
fn load_balancer_source_ranges_and_policies() {
    // Allowed source, Local policy: the local endpoint only, client kept.
    let x = explain("loadbalancer", "198.18.200.7", "198.19.60.1:80");
    assert_eq!(x.verdict, Verdict::Dnat, "{x:#?}");
    assert_eq!(endpoints(&x), [("198.18.1.2:8080", 1.0)]);
    assert!(!x.masquerade, "Local policy keeps the client address");
    assert!(has_rule(&x, "@firewall-ips", "goto firewall-"));
    assert!(has_rule(&x, "external-", "goto local-"));
    // Any other source is dropped before DNAT, by the firewall chain.
    let x = explain("loadbalancer", OUTSIDE, "198.19.60.1:80");
    assert_eq!(x.verdict, Verdict::Drop, "{x:#?}");
    assert!(has_rule(
        &x,
        "firewall-",
        "ip saddr != { 198.18.0.0/24, 198.18.200.0/24 } drop"
    ));
    assert_eq!(x.service.as_deref(), Some("default/lb:http"));
    // Cluster policy: every endpoint, masqueraded.
    let x = explain("loadbalancer", OUTSIDE, "198.19.60.2:80");
    assert_eq!(x.verdict, Verdict::Dnat);
    assert_eq!(x.endpoints.len(), 2);
    assert!(x.masquerade);
    // Local policy with no local endpoint: dropped (endpoints elsewhere).
    let x = explain("loadbalancer", OUTSIDE, "198.19.60.3:80");
    assert_eq!(x.verdict, Verdict::Drop, "{x:#?}");
    assert!(has_rule(
        &x,
        "@no-endpoint-services",
        "198.19.60.3 . tcp . 80 comment"
    ));
}

#[test]
fn external_ips() {
    let x = explain("external-ips", OUTSIDE, "198.19.50.1:80");
    assert_eq!(x.verdict, Verdict::Dnat, "{x:#?}");
    assert_eq!(x.service.as_deref(), Some("default/ext:http"));
    assert!(x.masquerade);
    assert!(has_rule(&x, "external-", "jump mark-for-masquerade"));
}

#[test]
fn internal_traffic_policy_local() {
    let x = explain("internal-local", POD, "198.19.0.16:80");
    assert_eq!(x.verdict, Verdict::Dnat, "{x:#?}");
    assert_eq!(endpoints(&x), [("198.18.1.2:8080", 1.0)]);
    assert!(x.trace.iter().any(|s| s.chain.starts_with("local-")));
    let x = explain("internal-local", POD, "198.19.0.17:80");
    assert_eq!(x.verdict, Verdict::Drop, "{x:#?}");
}

#[test]
fn external_traffic_policy_local_short_circuits_pods_and_the_node() {
    // From outside: the local endpoint only, not masqueraded.
    let x = explain("both-local", OUTSIDE, "198.18.0.1:30040");
    assert_eq!(x.verdict, Verdict::Dnat, "{x:#?}");
    assert_eq!(endpoints(&x), [("198.18.1.2:8080", 1.0)]);
    assert!(!x.masquerade);
    // From a pod: the cluster chain (every endpoint), not masqueraded.
    let x = explain("both-local", POD, "198.18.0.1:30040");
    assert_eq!(x.endpoints.len(), 2, "{x:#?}");
    assert!(!x.masquerade);
    assert!(has_rule(
        &x,
        "external-",
        "ip saddr 198.18.0.0/17 goto service-"
    ));
    // From the node (an address outside the cluster CIDR): the cluster chain,
    // masqueraded.
    let node = ["--node-ip", "198.18.200.1,2001:db8::1"];
    let x = explain_with(
        "both-local",
        "198.18.200.1",
        "198.18.200.1:30040",
        "tcp",
        &node,
    );
    assert_eq!(x.endpoints.len(), 2, "{x:#?}");
    assert!(x.masquerade);
    assert!(has_rule(
        &x,
        "external-",
        "fib saddr type local jump mark-for-masquerade"
    ));
}

#[test]
fn terminating_fallback_still_reaches_an_endpoint() {
    let x = explain("terminating", POD, "198.19.0.18:80");
    assert_eq!(x.verdict, Verdict::Dnat, "{x:#?}");
    assert_eq!(endpoints(&x), [("198.18.1.2:8080", 1.0)]);
}

#[test]
fn affinity_is_reported_as_not_modelled() {
    let x = explain("affinity", POD, "198.19.0.15:80");
    assert_eq!(x.verdict, Verdict::Dnat, "{x:#?}");
    let p: Vec<f64> = x.endpoints.iter().map(|e| e.probability).collect();
    assert_eq!(p, [0.333333, 0.333333, 0.333333], "{x:#?}");
    assert!(x.affinity, "{x:#?}");
    assert!(x.notes.iter().any(|n| n.contains("affinity")));
    assert!(has_rule(&x, "endpoint-", "update @affinity-"));
    assert_eq!(x.service.as_deref(), Some("default/sticky:http"));
}

#[test]
fn protocols() {
    let x = explain_with("protocols", POD, "198.19.0.53:53", "udp", &[]);
    assert_eq!(endpoints(&x), [("198.18.1.2:5353", 1.0)], "{x:#?}");
    assert_eq!(x.service.as_deref(), Some("kube-system/dns:dns"));
    let x = explain_with("protocols", POD, "198.19.0.53:9999", "sctp", &[]);
    assert_eq!(endpoints(&x), [("198.18.1.2:9999", 1.0)], "{x:#?}");
}

#[test]
fn ipv6() {
    let x = explain("ipv6", "2001:db8:1::5", "[2001:db8::1]:30085");
    assert_eq!(x.verdict, Verdict::Dnat, "{x:#?}");
    assert_eq!(endpoints(&x), [("[2001:db8:1::2]:8080", 1.0)]);
    assert!(x.masquerade);
    assert_eq!(x.trace[0].table, "ip6 kube-proxy");
    let x = explain("ipv6", "2001:db8:1::5", "[2001:db8:19::21]:80");
    assert_eq!(x.verdict, Verdict::Dnat, "{x:#?}");
    assert!(!x.masquerade);
    let x = explain("ipv6", "2001:db8:ff::5", "[2001:db8:19::21]:80");
    assert!(x.masquerade);
    assert!(has_rule(&x, "service-", "ip6 saddr != 2001:db8:1::/64"));
}

fn packet(src: &str, dst: &str) -> Packet {
    Packet {
        src: src.parse().unwrap(),
        dst: dst.parse().unwrap(),
        protocol: Protocol::Tcp,
    }
}

fn host() -> Host {
    Host {
        local: [NODE.parse().unwrap()].into(),
        ..Host::default()
    }
}

/// The same table as the kernel prints it (`nft list table ip kube-proxy`,
/// nftables 1.0.6, after loading the loadbalancer case's golden script): its
/// spellings differ (`meta mark & 0x00004000 == 0x00000000`, `numgen random mod 2
/// 0`, `priority dstnat - 10`) and the answers must not.
#[test]
fn the_kernel_listing_and_the_script_give_the_same_answers() {
    let listing = Table::parse_listing(include_str!("loadbalancer.listing")).unwrap();
    let script = Table::parse_script(
        include_str!("../../../tests/render/loadbalancer/expected.nft"),
        "ip kube-proxy",
    )
    .unwrap();
    assert_eq!(listing.name(), "ip kube-proxy");
    assert_eq!(
        listing.chains["filter-prerouting-pre-dnat"].base,
        script.chains["filter-prerouting-pre-dnat"].base
    );
    assert_eq!(
        listing.chains["nat-postrouting"]
            .base
            .as_ref()
            .unwrap()
            .priority,
        100
    );
    let mut cases = 0;
    for from in [OUTSIDE, POD, NODE, "198.18.200.7"] {
        for to in [
            "198.19.0.11:80",
            "198.19.0.12:80",
            "198.19.0.13:80",
            "198.19.0.13:81",
            "198.19.60.1:80",
            "198.19.60.2:80",
            "198.19.60.3:80",
            "198.18.0.1:30081",
            "198.18.0.1:30082",
            "198.18.0.1:30083",
        ] {
            let p = packet(from, to);
            let a = RuleSet::Nftables(listing.clone()).explain(&p, &host());
            let b = RuleSet::Nftables(script.clone()).explain(&p, &host());
            assert_eq!(a.verdict, b.verdict, "{from} -> {to}");
            assert_eq!(a.endpoints, b.endpoints, "{from} -> {to}");
            assert_eq!(a.masquerade, b.masquerade, "{from} -> {to}");
            assert_eq!(a.service, b.service, "{from} -> {to}");
            assert_eq!(a.trace.len(), b.trace.len(), "{from} -> {to}");
            assert!(a.notes.is_empty(), "{a:#?}");
            cases += 1;
        }
    }
    assert_eq!(cases, 40);
    // The kernel's spelling is what the trace shows.
    let x = RuleSet::Nftables(listing).explain(&packet(OUTSIDE, "198.19.0.12:80"), &host());
    assert!(has_rule(
        &x,
        "masquerading",
        "meta mark set meta mark ^ 0x00004000"
    ));
    assert!(has_rule(
        &x,
        "service-",
        "numgen random mod 2 0 meta l4proto tcp dnat to"
    ));
}

/// A minimal table: `nat-prerouting` jumping to `services`, with `rules` in it.
fn table_with(rules: &[&str]) -> Table {
    let mut s = String::from(
        "add table ip t\n\
         add chain ip t nat-prerouting { type nat hook prerouting priority -100 ; }\n\
         add chain ip t reject-chain\n\
         add rule ip t reject-chain reject\n\
         add chain ip t services\n\
         add rule ip t nat-prerouting jump services\n",
    );
    for r in rules {
        s.push_str(&format!("add rule ip t services {r}\n"));
    }
    Table::parse_script(&s, "ip t").unwrap()
}

fn run(t: &Table, to: &str) -> Explanation {
    RuleSet::Nftables(t.clone()).explain(&packet(OUTSIDE, to), &host())
}

#[test]
fn numgen_ranges_sets_and_vmaps_become_probabilities() {
    let t = table_with(&[
        "ip daddr 198.19.1.1 numgen random mod 4 { 0, 1 } dnat to 198.18.1.1:80",
        "ip daddr 198.19.1.1 numgen random mod 3 != 0 dnat to 198.18.1.2:80",
        "ip daddr 198.19.1.1 dnat to 198.18.1.3",
        "ip daddr 198.19.1.2 numgen random mod 4 vmap { 0 : goto reject-chain, 1-2 : drop }",
        "ip daddr 198.19.1.2 dnat to 198.18.1.4:80",
        "ip daddr 198.19.1.3 numgen random mod 10 offset 5 < 7 dnat to 198.18.1.5:80",
    ]);
    let x = run(&t, "198.19.1.1:80");
    let want = [
        ("198.18.1.1:80", 0.5),
        ("198.18.1.2:80", 0.333333),
        ("198.18.1.3:80", 0.166667),
    ];
    assert_eq!(endpoints(&x), want, "{x:#?}");
    let x = run(&t, "198.19.1.2:80");
    // 1/4 reject, 1/2 drop, 1/4 on to the DNAT: the likeliest verdict wins.
    assert_eq!(x.verdict, Verdict::Drop, "{x:#?}");
    assert_eq!(endpoints(&x), [("198.18.1.4:80", 0.25)]);
    let x = run(&t, "198.19.1.3:80");
    assert_eq!(endpoints(&x), [("198.18.1.5:80", 0.2)], "{x:#?}");
}

#[test]
fn unknown_statements_are_noted_and_the_rule_skipped() {
    let t = table_with(&[
        "ip daddr 198.19.1.1 limit rate 3/second drop",
        "ip daddr 198.19.1.1 dnat to 198.18.1.1:80",
        "ip daddr 198.19.1.9 quota over 1 mbytes drop",
    ]);
    let x = run(&t, "198.19.1.1:80");
    assert_eq!(x.verdict, Verdict::Dnat);
    assert!(
        x.notes
            .iter()
            .any(|n| n.contains("not modelled") && n.contains("limit rate 3/second")),
        "{x:#?}"
    );
    // A rule that cannot apply to the packet is not worth a note.
    assert!(!x.notes.iter().any(|n| n.contains("quota")), "{x:#?}");
}

#[test]
fn hand_made_spellings_are_understood() {
    let t = table_with(&[
        "ip daddr 198.19.1.1 tcp dport 80 counter packets 3 bytes 180 dnat to 198.18.1.1:80 comment \"hand-made\"",
        "ip daddr 198.19.1.1 udp dport 80 dnat to 198.18.1.9:80",
        "ip daddr 198.19.1.2 tcp dport 8000-8100 dnat ip to 198.18.1.2:80",
        "ip daddr 198.19.1.3 log prefix \"x \" reject with tcp reset",
        "ip daddr 198.19.1.4 reject with icmp type port-unreachable",
        "ip daddr 198.19.1.5 ct state established,related accept",
        "ip daddr 198.19.1.5 ip saddr 203.0.113.0/24 meta mark set 0x10 jump mark-check",
    ]);
    let x = run(&t, "198.19.1.1:80");
    assert_eq!(endpoints(&x), [("198.18.1.1:80", 1.0)], "{x:#?}");
    assert!(x.trace.iter().any(|s| s.rule.contains("hand-made")));
    let x = run(&t, "198.19.1.2:8050");
    assert_eq!(endpoints(&x), [("198.18.1.2:80", 1.0)], "{x:#?}");
    assert_eq!(run(&t, "198.19.1.3:80").verdict, Verdict::Reject);
    assert_eq!(run(&t, "198.19.1.4:80").verdict, Verdict::Reject);
    // A jump to a chain that does not exist is said.
    let x = run(&t, "198.19.1.5:80");
    assert_eq!(x.verdict, Verdict::NoMatch);
    assert!(x.notes.iter().any(|n| n.contains("mark-check")), "{x:#?}");
}

#[test]
fn a_map_element_comment_names_the_service() {
    // kube-proxy comments its map elements with the service port; a table with
    // such elements names the service even where no per-service chain is entered.
    let t = Table::parse_script(
        "add chain ip t nat-prerouting { type nat hook prerouting priority -100 ; }\n\
         add chain ip t filter-forward { type filter hook forward priority 0 ; }\n\
         add map ip t no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; }\n\
         add rule ip t filter-forward ip daddr . meta l4proto . th dport vmap @no-endpoint-services\n\
         add element ip t no-endpoint-services { 198.19.1.1 . tcp . 80 comment \"default/empty:http\" : drop }\n",
        "ip t",
    )
    .unwrap();
    let x = run(&t, "198.19.1.1:80");
    assert_eq!(x.verdict, Verdict::Drop, "{x:#?}");
    assert_eq!(x.service.as_deref(), Some("default/empty:http"));
    assert!(has_rule(
        &x,
        "@no-endpoint-services",
        "comment \"default/empty:http\" : drop"
    ));
}

#[test]
fn base_chains_run_in_priority_order_and_a_drop_policy_drops() {
    let t = Table::parse_script(
        "add chain ip t late { type nat hook prerouting priority 10 ; }\n\
         add chain ip t early { type nat hook prerouting priority -200 ; }\n\
         add rule ip t late ip daddr 198.19.1.1 dnat to 198.18.1.2:80\n\
         add rule ip t early ip daddr 198.19.1.1 dnat to 198.18.1.1:80\n\
         add chain ip t fwd { type filter hook forward priority 0 ; policy drop ; }\n\
         add rule ip t fwd ip daddr 198.18.1.1 accept\n",
        "ip t",
    )
    .unwrap();
    let x = run(&t, "198.19.1.1:80");
    // The earlier chain NATs; the later nat chain is not consulted.
    assert_eq!(endpoints(&x), [("198.18.1.1:80", 1.0)], "{x:#?}");
    assert_eq!(x.verdict, Verdict::Dnat);
    // Not accepted by the forward chain: its policy drops it.
    let x = run(&t, "198.19.1.7:80");
    assert_eq!(x.verdict, Verdict::Drop, "{x:#?}");
}

#[test]
fn priorities_parse_by_name_and_offset() {
    assert_eq!(parse_priority(&["dstnat", "-", "10"]).unwrap(), -110);
    assert_eq!(parse_priority(&["srcnat"]).unwrap(), 100);
    assert_eq!(parse_priority(&["filter", "+", "5"]).unwrap(), 5);
    assert_eq!(parse_priority(&["-110"]).unwrap(), -110);
    assert!(parse_priority(&["sideways"]).is_err());
}

#[test]
fn service_names_come_from_chain_names() {
    assert_eq!(
        service_of_chain("service-SUSTUHLJ-default/web/tcp/http").as_deref(),
        Some("default/web:http")
    );
    assert_eq!(
        service_of_chain("endpoint-S4W6Y3DQ-default/sticky/tcp/http__198.18.1.2/8080").as_deref(),
        Some("default/sticky:http")
    );
    assert_eq!(
        service_of_chain("local-ABCDEFGH-ns/name/udp/").as_deref(),
        Some("ns/name")
    );
    assert_eq!(service_of_chain("nat-prerouting"), None);
    assert_eq!(service_of_chain("services"), None);
}

#[test]
fn bad_text_is_an_error_with_the_line() {
    let e = Table::parse_listing("table ip t {\n\tchain c {\n\t\tip saddr \"unterminated\n")
        .unwrap_err();
    assert_eq!(e.line, 3);
    assert!(Table::parse_listing("nonsense\n").is_err());
    let e = Table::parse_script("add rule ip t\nfrobnicate chain ip t x\n", "ip t").unwrap_err();
    assert_eq!(e.line, 2);
}

#[test]
fn a_ruleset_splits_into_its_tables() {
    let text = "table ip filter {\n\tchain input {\n\t\ttype filter hook input priority filter; policy accept;\n\t}\n}\n\
                table ip kube-proxy {\n\tset s {\n\t\ttype ipv4_addr\n\t\telements = { 1.2.3.4,\n\t\t\t     1.2.3.5 }\n\t}\n}\n\
                table inet x {\n}\n";
    let tables = split_ruleset(text);
    let names: Vec<&str> = tables.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["ip filter", "ip kube-proxy", "inet x"]);
    let t = Table::parse_listing(&tables[1].1).unwrap();
    assert_eq!(t.name(), "ip kube-proxy");
    assert_eq!(t.sets["s"].elements.len(), 2);
}
