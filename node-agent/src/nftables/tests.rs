use meshlite_proto::model::{
    AddressFamily, Endpoint, EndpointPort, EndpointSlice, Protocol, Resource, Service,
};
use meshlite_runtime::Snapshot;

use super::*;
use crate::netfilter::{FakeRunner, ToolOutput};
use crate::nftables::digest::{self, DIGESTS};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn cfg() -> NftablesConfig {
    NftablesConfig {
        table: DEFAULT_TABLE.into(),
        families: vec![IpFamily::V4],
        cluster_cidrs: vec!["198.18.0.0/16".parse().unwrap()],
        detect_local: DetectLocalMode::ClusterCidr,
        masquerade_all: false,
        masquerade_bit: 14,
        node_ips: vec![ip("192.0.2.1")],
        nodeport_addresses: vec![],
        conntrack_cleanup: false,
    }
}

/// `n` ClusterIP services with one endpoint each, `svc0`'s endpoint `ep0`.
fn view(n: usize, ep0: &str) -> ProxyView {
    let mut resources = Vec::new();
    for i in 0..n {
        let name = format!("svc{i}");
        resources.push(Resource::Service(
            Service::cluster_ip("ns", &name, ip(&format!("198.19.0.{}", i + 1))).with_port(
                "p80",
                Protocol::Tcp,
                80,
            ),
        ));
        let ep = if i == 0 {
            ep0.to_string()
        } else {
            format!("198.18.0.{}", i + 1)
        };
        resources.push(Resource::EndpointSlice(EndpointSlice {
            namespace: "ns".into(),
            name: format!("{name}-1"),
            service_name: name,
            address_family: AddressFamily::Ipv4,
            ports: vec![EndpointPort {
                name: "p80".into(),
                protocol: Protocol::Tcp,
                port: 80,
                app_protocol: None,
            }],
            endpoints: vec![Endpoint::ready(ip(&ep))],
            ignored_by_proxy: false,
        }));
    }
    ProxyView::build(&Snapshot::from_resources(resources), "node1", IpFamily::V4)
}

/// The incremental transaction from `before` to `after`.
fn diff(before: &ProxyView, after: &ProxyView) -> script::Transaction {
    let rcfg = cfg().render_config(before);
    let mut w = Written::new(IpFamily::V4);
    let _ = w.update(before, &rcfg);
    let c = w.update(after, &rcfg);
    script::changes(IpFamily::V4, &rcfg, &c)
}

fn transaction(v: &ProxyView) -> String {
    let rcfg = cfg().render_config(v);
    script::full(IpFamily::V4, &rcfg, &render::render(v, &rcfg), &[]).text
}

#[test]
fn chain_names_are_kube_proxys() {
    let text = transaction(&view(1, "198.18.0.1"));
    // The names kube-proxy's own tests expect.
    assert_eq!(
        render::hashed("service", "ns1/svc1/tcp/p80"),
        "service-ULMVA6XW-ns1/svc1/tcp/p80"
    );
    assert_eq!(
        render::hashed("endpoint", "ns1/svc1/tcp/p80__10.180.0.1/80"),
        "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
    );
    let svc = render::hashed("service", "ns/svc0/tcp/p80");
    assert!(
        text.contains(&format!("add chain ip kube-proxy {svc}\n")),
        "{text}"
    );
    assert!(
        text.contains(
            "add element ip kube-proxy service-ips { 198.19.0.1 . tcp . 80 : goto service-"
        )
    );
    assert!(text.contains("add element ip kube-proxy cluster-ips { 198.19.0.1 }"));
    assert!(text.contains("meta l4proto tcp dnat to 198.18.0.1:80"));
    assert!(text.contains("add element ip kube-proxy nodeport-ips { 192.0.2.1 }"));
}

#[test]
fn nothing_changed_is_an_empty_transaction() {
    let v = view(3, "198.18.0.1");
    let tx = diff(&v, &v);
    assert_eq!(tx.text, "");
}

#[test]
fn an_endpoint_change_rewrites_only_its_service_chain() {
    let before = view(3, "198.18.0.1");
    let after = view(3, "198.18.0.100");
    let tx = diff(&before, &after);
    assert_eq!(tx.chains_written, 1, "{}", tx.text);
    assert!(tx.text.contains("dnat to 198.18.0.100:80"));
    assert!(
        tx.text.contains(
            "delete element ip kube-proxy hairpin-connections { 198.18.0.1 . 198.18.0.1 }"
        )
    );
    assert!(!tx.text.contains("svc1"), "{}", tx.text);
}

#[test]
fn a_removed_service_loses_its_elements_and_its_chain_is_flushed() {
    let before = view(3, "198.18.0.1");
    let after = view(2, "198.18.0.1");
    let tx = diff(&before, &after);
    assert_eq!(tx.flushed.len(), 1);
    let lines: Vec<&str> = tx.text.lines().collect();
    assert!(
        lines[0].starts_with("delete element"),
        "elements go first: {}",
        tx.text
    );
    assert!(
        tx.text
            .contains("delete element ip kube-proxy service-ips { 198.19.0.3 . tcp . 80 }")
    );
    assert!(
        lines
            .last()
            .unwrap()
            .starts_with("flush chain ip kube-proxy service-")
    );
}

#[test]
fn a_new_service_adds_its_chain_and_elements() {
    let before = view(2, "198.18.0.1");
    let after = view(3, "198.18.0.1");
    let tx = diff(&before, &after);
    assert_eq!(tx.chains_written, 1);
    assert!(tx.flushed.is_empty());
    assert!(
        tx.text.contains(
            "add element ip kube-proxy service-ips { 198.19.0.3 . tcp . 80 : goto service-"
        )
    );
}

#[tokio::test]
async fn the_backend_writes_once_then_only_changes() {
    let fake = FakeRunner::new(|c| match c.args.first().map(String::as_str) {
        Some("list") => {
            ToolOutput::ok("table ip kube-proxy {\n\tchain service-OLD-ns/gone/tcp/p80 {\n\t}\n}\n")
        }
        // No digest set yet.
        Some("-j") => ToolOutput {
            success: false,
            ..ToolOutput::ok("")
        },
        _ => ToolOutput::ok(""),
    });
    let mut b = NftablesBackend::new(cfg()).with_runner(Runner::Fake(fake.clone()));
    let v = [view(2, "198.18.0.1")];
    let r = b
        .apply(Desired {
            views: &v,
            full: false,
        })
        .await
        .unwrap();
    assert!(r.full, "the first sync after a start is full");
    let calls = fake.calls();
    assert_eq!(
        calls[0].args,
        ["list", "chains", "ip"],
        "chain names read once"
    );
    assert_eq!(
        calls[1].args,
        ["-j", "list", "set", "ip", "kube-proxy", "meshlite-digests"],
        "and the digests"
    );
    let first = calls[2].stdin.clone().unwrap();
    assert!(first.contains("flush chain ip kube-proxy service-OLD-ns/gone/tcp/p80"));
    assert!(!first.contains("flush table"), "the table is never flushed");

    b.apply(Desired {
        views: &v,
        full: false,
    })
    .await
    .unwrap();
    assert_eq!(
        fake.calls().len(),
        3,
        "nothing changed: nothing written, nothing read"
    );

    let v2 = [view(2, "198.18.0.7")];
    let r = b
        .apply(Desired {
            views: &v2,
            full: false,
        })
        .await
        .unwrap();
    assert!(!r.full);
    assert_eq!(fake.calls().len(), 4);
}

#[tokio::test]
async fn a_restart_finding_everything_in_place_writes_nothing() {
    let v = [view(3, "198.18.0.1")];
    let rcfg = cfg().render_config(&v[0]);
    let rs = render::render(&v[0], &rcfg);
    // What the kernel would list after the previous agent's sync.
    let mut chains = String::from("table ip kube-proxy {\n");
    for name in rs.chains.keys() {
        chains.push_str(&format!("\tchain {name} {{\n\t}}\n"));
    }
    chains.push_str("}\n");
    let mut digests: Vec<String> = rs.elements[DIGESTS].keys().cloned().collect();
    digests.push(digest::base(&render::base_script(IpFamily::V4, &rcfg)));
    let json =
        serde_json::json!({"nftables": [{"set": {"name": DIGESTS, "elem": digests}}]}).to_string();
    let lister = move |drop_one: bool| {
        let (chains, json) = (chains.clone(), json.clone());
        FakeRunner::new(move |c| match c.args.first().map(String::as_str) {
            Some("list") => ToolOutput::ok(&chains),
            Some("-j") if drop_one => {
                // One chain's digest is missing: that chain alone is rewritten.
                let mut j: serde_json::Value = serde_json::from_str(&json).unwrap();
                j["nftables"][0]["set"]["elem"]
                    .as_array_mut()
                    .unwrap()
                    .remove(0);
                ToolOutput::ok(&j.to_string())
            }
            Some("-j") => ToolOutput::ok(&json),
            _ => ToolOutput::ok(""),
        })
    };
    let fake = lister(false);
    let mut b = NftablesBackend::new(cfg()).with_runner(Runner::Fake(fake.clone()));
    let r = b
        .apply(Desired {
            views: &v,
            full: false,
        })
        .await
        .unwrap();
    assert!(r.full);
    assert_eq!(r.rules_written, 0);
    assert_eq!(
        fake.calls().len(),
        2,
        "two reads, no write: {:?}",
        fake.calls()
    );

    let fake = lister(true);
    let mut b = NftablesBackend::new(cfg()).with_runner(Runner::Fake(fake.clone()));
    b.apply(Desired {
        views: &v,
        full: false,
    })
    .await
    .unwrap();
    let calls = fake.calls();
    assert_eq!(calls.len(), 3);
    let tx = calls[2].stdin.clone().unwrap();
    let removed = &rs.elements[DIGESTS].keys().next().unwrap().clone();
    assert!(tx.contains(removed), "{tx}");
    assert!(
        tx.lines().filter(|l| l.starts_with("add rule")).count()
            <= rs.chains.values().map(Vec::len).max().unwrap(),
        "at most one chain rewritten: {tx}"
    );
}
