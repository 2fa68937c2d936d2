//! The whole system: the three real binaries over real mTLS, the control plane
//! watching the Kubernetes API stand-in (real list/watch), node agents programming
//! the kernel in node namespaces (node1 in iptables mode, node2 in nftables mode)
//! and DNS agents serving the cluster zone, checked with real traffic (`curl`) and
//! real DNS queries (`dig`) from a pod on each node, so every check of a service
//! address runs through both modes' rules.
//!
//! Needs root, iptables, nft, conntrack, curl and dig; fails with a message otherwise.
//! Run one case: `cargo nextest run -p meshlite-e2e --test system <name>` (build the
//! binaries first: `cargo build --workspace --bins`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use meshlite_e2e::apiserver::Collection;
use meshlite_e2e::lab::{CLIENTS, DNS_IP, NFT_NODE, System, T, system, webui_slice, within};
use meshlite_e2e::stack::{ProxyMode, admin_get, metric};

/// Each node's agent programs only its own mode: node2's rules are in the
/// `ip kube-proxy` nftables table (with `service`'s chains) and iptables holds
/// none of ours there; node1 is the other way round.
fn assert_modes(s: &System, service: &str) {
    assert_eq!(s.mode(NFT_NODE), ProxyMode::Nftables);
    for node in ["node1", "node2"] {
        let ns = &s.cluster.node(node).unwrap().ns;
        let table = s.cluster.nft(node, &["list", "table", "ip", "kube-proxy"]);
        let nat = ns.exec(&["iptables-save", "-t", "nat"]).unwrap();
        match s.mode(node) {
            ProxyMode::Nftables => {
                let table = table.unwrap_or_else(|e| panic!("{node}: no nftables table: {e:#}"));
                assert!(
                    table.contains("chain services {")
                        && table.contains(&format!("-{service} {{"))
                        && table.contains("dnat to "),
                    "{node}: the nftables table lacks the service chains of {service}:
{table}"
                );
                assert!(
                    !nat.contains("KUBE-SERVICES"),
                    "{node} runs nftables but has iptables rules:
{nat}"
                );
            }
            ProxyMode::Iptables | ProxyMode::Ipvs => {
                assert!(
                    table.is_err(),
                    "{node} runs {} but has an nftables table",
                    s.mode(node)
                );
                assert!(nat.contains(":KUBE-SERVICES"), "{node}:\n{nat}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_lifecycle_by_vip_and_name() {
    let s = system("mlsys").await;

    // Create a Deployment-like set of endpoints and a ClusterIP service.
    let t0 = Instant::now();
    s.api
        .apply_yaml(&webui_slice(
            "web",
            &[
                ("198.18.1.1", "node1", true),
                ("198.18.2.1", "node2", true),
                ("198.18.2.2", "node2", true),
            ],
        ))
        .unwrap();
    s.api
        .apply_yaml("apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec: {clusterIP: 198.19.7.7, ports: [{name: http, port: 80}]}\n")
        .unwrap();
    let mut rules_at = Vec::new();
    for node in ["node1", "node2"] {
        within(&format!("rules on {node}"), T, || {
            s.serves(node, "default/web:http", "198.19.7.7", 80)
        })
        .await;
        rules_at.push((node, t0.elapsed()));
    }
    // From each node's client: through node1's iptables and node2's nftables rules
    // (the name through the DNS service's ClusterIP, on the same node).
    let mut by_vip = Vec::new();
    let mut by_name = Vec::new();
    for (node, pod) in CLIENTS {
        by_vip.push((
            node,
            within(&format!("reachable by VIP via {node}"), T, || {
                s.curl(pod, "http://198.19.7.7/").starts_with("web-")
            })
            .await,
        ));
        by_name.push((
            node,
            within(&format!("reachable by name via {node}"), T, || {
                s.curl(pod, "http://web/").starts_with("web-")
            })
            .await,
        ));
    }
    assert_modes(&s, "default/web/tcp/http");
    let mut dns_at = Vec::new();
    for server in ["198.18.1.53", "198.18.2.53"] {
        within("DNS answer", T, || {
            s.dig(server, "web.default.svc.cluster.local", "A").1 == ["198.19.7.7"]
        })
        .await;
        dns_at.push((server, t0.elapsed()));
    }
    println!(
        "create: rules applied {rules_at:?}; DNS answers {dns_at:?}; reachable by VIP {by_vip:?}, by name {by_name:?} after that"
    );
    for (node, t) in &rules_at {
        assert!(*t < Duration::from_secs(1), "rules on {node} took {t:?}");
    }
    for (server, t) in &dns_at {
        assert!(*t < Duration::from_secs(1), "DNS on {server} took {t:?}");
    }

    // A headless service answers with its ready endpoints only.
    s.api
        .apply_yaml("apiVersion: v1\nkind: Service\nmetadata: {name: web-headless, namespace: default}\nspec: {clusterIP: None, ports: [{name: http, port: 80}]}\n")
        .unwrap();
    s.api
        .apply_yaml(&webui_slice(
            "web-headless",
            &[
                ("198.18.1.1", "node1", true),
                ("198.18.2.1", "node2", false),
                ("198.18.2.2", "node2", true),
            ],
        ))
        .unwrap();
    for (node, pod) in CLIENTS {
        within(
            &format!("headless answers ready endpoints via {node}"),
            T,
            || {
                s.dig_from(pod, DNS_IP, "web-headless.default.svc.cluster.local", "A")
                    .1
                    == ["198.18.1.1", "198.18.2.2"]
            },
        )
        .await;
    }

    // Readiness flips: web-1 goes unready; traffic and DNS follow.
    let t1 = Instant::now();
    s.api
        .apply_yaml(&webui_slice(
            "web",
            &[
                ("198.18.1.1", "node1", false),
                ("198.18.2.1", "node2", true),
                ("198.18.2.2", "node2", true),
            ],
        ))
        .unwrap();
    s.api
        .apply_yaml(&webui_slice(
            "web-headless",
            &[
                ("198.18.1.1", "node1", false),
                ("198.18.2.1", "node2", true),
                ("198.18.2.2", "node2", true),
            ],
        ))
        .unwrap();
    within("traffic leaves the unready pod", T, || {
        ["node1", "node2"]
            .iter()
            .all(|n| !s.dnat_to(n, "198.18.1.1:80"))
    })
    .await;
    let traffic = t1.elapsed();
    within("DNS follows readiness", T, || {
        s.dig(DNS_IP, "web-headless.default.svc.cluster.local", "A")
            .1
            == ["198.18.2.1", "198.18.2.2"]
    })
    .await;
    println!("readiness flip: rules {traffic:?}, DNS {:?}", t1.elapsed());
    // The flips reached the real agents as EndpointSlice patches, which they applied.
    let (_, m) = admin_get(&s.cluster, &s.stack.control_plane, "/metrics")
        .await
        .unwrap();
    let patches = metric(
        &m,
        "meshlite_control_plane_endpoint_slice_patches_sent_total",
    );
    assert!(
        patches.is_some_and(|n| n >= 4.0),
        "patches sent: {patches:?}"
    );
    // ... and applied: no agent found a patch that did not fit (that would be a NACK
    // asking for a full snapshot).
    let nacks = metric(&m, "meshlite_control_plane_nacks_total");
    assert_eq!(nacks, Some(0.0), "NACKs: {nacks:?}");
    for (node, pod) in CLIENTS {
        for _ in 0..10 {
            assert!(
                !s.curl(pod, "http://198.19.7.7/").starts_with("web-1 "),
                "served by the unready pod via {node}"
            );
        }
    }

    // Delete the service: the VIP rejects, the name is NXDOMAIN, its chains are gone.
    let t2 = Instant::now();
    assert!(s.api.delete(Collection::Service, "default", "web"));
    for (node, pod) in CLIENTS {
        within(&format!("VIP rejects via {node}"), T, || {
            s.curl_code(pod, "http://198.19.7.7/") == 7
        })
        .await;
    }
    within("name is NXDOMAIN", T, || {
        s.dig(DNS_IP, "web.default.svc.cluster.local", "A").0 == "NXDOMAIN"
    })
    .await;
    println!("delete: VIP refused and NXDOMAIN after {:?}", t2.elapsed());
    for node in ["node1", "node2"] {
        assert!(
            !s.mentions(node, "default/web:http"),
            "{node} still has the service's rules:\n{}",
            s.rules(node)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodeport_local_traffic_policy_and_affinity() {
    let s = system("mlsys").await;
    // NodePort with externalTrafficPolicy Local and a health check port; the only
    // endpoint is on node1.
    s.api
        .apply_yaml(
            "apiVersion: v1\nkind: Service\nmetadata: {name: edge, namespace: default}\nspec:\n  type: LoadBalancer\n  clusterIP: 198.19.8.8\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n  ports: [{name: http, port: 80, nodePort: 30080}]\n---\n",
        )
        .unwrap();
    s.api
        .apply_yaml(&webui_slice("edge", &[("198.18.1.1", "node1", true)]))
        .unwrap();
    // A plain NodePort (Cluster policy) over all three pods, with session affinity.
    s.api
        .apply_yaml(
            "apiVersion: v1\nkind: Service\nmetadata: {name: sticky, namespace: default}\nspec:\n  type: NodePort\n  clusterIP: 198.19.9.9\n  sessionAffinity: ClientIP\n  ports: [{name: http, port: 80, nodePort: 30090}]\n",
        )
        .unwrap();
    s.api
        .apply_yaml(&webui_slice(
            "sticky",
            &[
                ("198.18.1.1", "node1", true),
                ("198.18.2.1", "node2", true),
                ("198.18.2.2", "node2", true),
            ],
        ))
        .unwrap();

    // NodePort from the off-cluster namespace, on both nodes.
    for node_ip in ["198.18.0.1", "198.18.0.2"] {
        within(&format!("NodePort on {node_ip}"), T, || {
            s.curl("outside", &format!("http://{node_ip}:30090/"))
                .starts_with("web-")
        })
        .await;
    }
    // Session affinity: one client sticks to one pod, through either mode.
    for node_ip in ["198.18.0.1", "198.18.0.2"] {
        let url = format!("http://{node_ip}:30090/");
        let first = s.curl("outside", &url);
        let pod = first.split_whitespace().next().unwrap().to_string();
        for _ in 0..8 {
            let b = s.curl("outside", &url);
            assert_eq!(
                b.split_whitespace().next(),
                Some(pod.as_str()),
                "affinity broke via {node_ip}: {b}"
            );
        }
    }

    // Local policy: node1 has the endpoint and keeps the client's address (no SNAT);
    // node2 has none and drops; the health check port says so.
    let body = within("eTP Local on node1", T, || {
        s.curl("outside", "http://198.18.0.1:30080/")
            .starts_with("web-1")
    })
    .await;
    let _ = body;
    let b = s.curl("outside", "http://198.18.0.1:30080/");
    assert_eq!(
        b.split_whitespace().nth(1),
        Some("198.18.200.2"),
        "client address not preserved: {b}"
    );
    assert_eq!(
        s.curl_code("outside", "http://198.18.0.2:30080/"),
        28,
        "node2 without a local endpoint must drop (timeout)"
    );
    let hc = |node: &str| {
        let p = s.cluster.pod("outside").unwrap();
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &p.ns.name,
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "1",
                &format!("http://{node}:32000/"),
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    within("health check 200 on node1", T, || hc("198.18.0.1") == "200").await;
    within("health check 503 on node2", T, || hc("198.18.0.2") == "503").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_converge_on_the_same_version() {
    let s = system("mlsys").await;
    s.api
        .apply_yaml(&webui_slice("conv", &[("198.18.1.1", "node1", true)]))
        .unwrap();
    s.api
        .apply_yaml("apiVersion: v1\nkind: Service\nmetadata: {name: conv, namespace: default}\nspec: {clusterIP: 198.19.6.6, ports: [{name: http, port: 80}]}\n")
        .unwrap();
    let cp = &s.stack.control_plane;
    let report = || {
        let rt = &s.cluster.node("node1").unwrap().rt;
        let addr = cp.admin;
        rt.run(async move { meshlite_control_plane::status::fetch(&addr.to_string()).await })
    };
    let start = Instant::now();
    let r = loop {
        let r = report().await.unwrap();
        if r.agents.len() == 4
            && r.agents
                .iter()
                .all(|a| a.version == r.version && a.lag == 0)
        {
            break r;
        }
        assert!(start.elapsed() < T, "agents did not converge: {r:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let roles: Vec<&str> = r.agents.iter().map(|a| a.role.as_str()).collect();
    assert_eq!(roles, ["dns", "dns", "node", "node"]);
    println!("{}", meshlite_control_plane::status::table(&r));
    // Both DNS agents answer the new service, and both nodes route it.
    for server in ["198.18.1.53", "198.18.2.53"] {
        within("DNS agent answers", T, || {
            s.dig(server, "conv.default.svc.cluster.local", "A").1 == ["198.19.6.6"]
        })
        .await;
    }
    let (_, m) = admin_get(&s.cluster, cp, "/metrics").await.unwrap();
    assert!(
        m.contains("meshlite_control_plane_version_convergence_seconds_count"),
        "{m}"
    );
}

/// A Service labelled for another proxy is that proxy's: no node programs it, as
/// kube-proxy would not, while DNS still answers for it. Its load-balancer IP in
/// `ipMode: Proxy` is not captured either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_for_another_proxy_is_left_alone_but_resolves() {
    let s = system("mlsys3").await;
    s.api
        .apply_yaml(
            "apiVersion: v1\nkind: Service\nmetadata: {name: other, namespace: default, labels: {service.kubernetes.io/service-proxy-name: other-proxy}}\nspec: {clusterIP: 198.19.7.8, ports: [{name: http, port: 80}]}\n",
        )
        .unwrap();
    s.api
        .apply_yaml(&webui_slice("other", &[("198.18.2.1", "node2", true)]).replace(
            "labels: {kubernetes.io/service-name: other}",
            "labels: {kubernetes.io/service-name: other, service.kubernetes.io/service-proxy-name: other-proxy}",
        ))
        .unwrap();
    // Applied after it, so once this one is programmed, `other` would have been too.
    s.api
        .apply_yaml(&webui_slice("web", &[("198.18.2.1", "node2", true)]))
        .unwrap();
    s.api
        .apply_yaml("apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec: {type: LoadBalancer, clusterIP: 198.19.7.7, ports: [{name: http, port: 80, nodePort: 30080}]}\nstatus: {loadBalancer: {ingress: [{ip: 198.19.9.1, ipMode: Proxy}, {ip: 198.19.9.2}]}}\n")
        .unwrap();
    for node in ["node1", "node2"] {
        // The VIP-mode load-balancer IP is captured.
        within(&format!("web's load-balancer IP on {node}"), T, || {
            s.serves(node, "default/web:http", "198.19.9.2", 80)
        })
        .await;
        let rules = s.rules(node);
        assert!(
            !s.mentions(node, "default/other:http"),
            "{node} programs another proxy's service:\n{rules}"
        );
        assert!(
            !rules.contains("198.19.9.1"),
            "a Proxy-mode load-balancer IP was captured on {node}:\n{rules}"
        );
    }
    for (node, pod) in CLIENTS {
        assert_ne!(
            s.curl_code(pod, "http://198.19.7.8/"),
            0,
            "nothing serves its VIP via {node}"
        );
    }
    for server in ["198.18.1.53", "198.18.2.53"] {
        within("DNS answers for the other proxy's service", T, || {
            s.dig(server, "other.default.svc.cluster.local", "A").1 == ["198.19.7.8"]
        })
        .await;
    }
}

/// The chart's rule-sync dashboard asks only for what the processes export: after a
/// service is created and its endpoints change (so latency histograms, partial syncs
/// and convergence have samples), every panel query's metric names and labels are
/// found in the control plane's, node agents' and DNS agents' `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_sync_dashboard_queries_what_the_processes_export() {
    let s = system("mlsys4").await;
    s.api
        .apply_yaml(&webui_slice("web", &[("198.18.1.1", "node1", true)]))
        .unwrap();
    s.api
        .apply_yaml("apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec: {clusterIP: 198.19.7.7, ports: [{name: http, port: 80}]}\n")
        .unwrap();
    s.api
        .apply_yaml(&webui_slice(
            "web",
            &[("198.18.1.1", "node1", true), ("198.18.2.1", "node2", true)],
        ))
        .unwrap();
    for node in ["node1", "node2"] {
        within(&format!("both endpoints on {node}"), T, || {
            s.dnat_to(node, "198.18.2.1:80")
        })
        .await;
    }
    let mut exported = meshlite_e2e::dashboard::Exported::default();
    let procs = std::iter::once(&s.stack.control_plane)
        .chain(s.stack.node_agents.values())
        .chain(s.stack.dns_agents.values());
    for r in procs {
        let (code, m) = admin_get(&s.cluster, r, "/metrics").await.unwrap();
        assert_eq!(code, 200, "{}: {m}", r.process.name);
        exported.add(&m);
    }
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../helm/meshlite/dashboards/rule-sync.json"
    ))
    .unwrap();
    let checked = meshlite_e2e::dashboard::check(&text, &exported)
        .unwrap_or_else(|p| panic!("rule-sync dashboard:\n{}", p.join("\n")));
    assert!(checked >= 20, "{checked} queries");
    // Series the heatmap and per-node panels read have samples by now.
    for name in [
        "kubeproxy_network_programming_duration_seconds_bucket",
        "kubeproxy_sync_partial_proxy_rules_duration_seconds_count",
        "meshlite_control_plane_version_convergence_seconds_bucket",
        "process_resident_memory_bytes",
    ] {
        assert!(exported.sampled(name), "{name}: no samples");
    }
}
