//! Faults under traffic (the reliability table in the README): while a pod sends a
//! continuous, bounded request loop through a ClusterIP, the control plane is
//! killed and restarted, a node agent is killed and restarted, the API's watches are
//! cut and its history compacted (410 Gone), our chains are flushed, the control
//! plane stays away for a while, an agent never ACKs while the cluster churns, and
//! agents move between two control-plane replicas (a replica killed, then a rolling
//! update of both).
//! node1's agent runs in iptables mode and node2's in nftables mode; rules are
//! compared across a fault in each node's own mode (`System::rules`). R2 restarts
//! both agents under a loop through each node; R4 flushes node1's iptables chain and
//! R4n node2's nftables table.
//! Each prints a `FAULT` line: what happened and how many requests were lost.
//!
//! Needs root, iptables, nft, conntrack, curl, dig and the built binaries.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use meshlite_e2e::apiserver::Collection;
use meshlite_e2e::lab::{
    CLIENTS, NFT_NODE, System, T, system, system_with_replicas, webui_slice, within,
};
use meshlite_e2e::stack::{ProxyMode, Running};
use meshlite_e2e::stack::{admin_get, metric};

const VIP: &str = "198.19.7.7:80";

async fn lab(prefix: &str) -> System {
    with_web(system(prefix).await).await
}

/// The lab with the `web` service (three endpoints over both nodes) up.
///
/// Nothing is sent to the ClusterIP before both nodes hold its rules: a probe that
/// leaves a node before them is not DNATed and leaves an un-NATed conntrack entry
/// (120 s in `SYN_SENT`); a later connection from the same source port matches that
/// entry, skips the rules and fails with "Network is unreachable".
async fn with_web(s: System) -> System {
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
    within("rules on both nodes", T, || {
        ["node1", "node2"].iter().all(|n| {
            s.serves(n, "default/web:http", "198.19.7.7", 80) && s.dnat_to(n, "198.18.2.2:80")
        })
    })
    .await;
    for (node, pod) in CLIENTS {
        within(&format!("service up via {node}"), T, || {
            s.curl(pod, "http://198.19.7.7/").starts_with("web-")
        })
        .await;
        let stale = s.not_nated_to(node, "198.19.7.7");
        assert!(
            stale.is_empty(),
            "{node} holds connections to the ClusterIP that were not DNATed: {stale:?}"
        );
    }
    s
}

/// A node's rules in its agent's mode (`iptables -t nat -S`, or the nftables table
/// without counters, elements sorted), for comparing rules across a fault.
fn rules(s: &System, node: &str) -> String {
    s.rules(node)
}

async fn cp_metric(s: &System, name: &str) -> f64 {
    metric_of(s, &s.stack.control_plane, name).await
}

/// The sum of a metric's samples on one process.
async fn metric_of(s: &System, r: &Running, name: &str) -> f64 {
    let (_, m) = admin_get(&s.cluster, r, "/metrics").await.unwrap();
    // Exact sample name (with or without labels), not every metric sharing a prefix.
    m.lines()
        .filter(|l| {
            l.starts_with(name) && (name.ends_with('}') || l[name.len()..].starts_with([' ', '{']))
        })
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// How long one request of a [`System::request_loop`] waits before it fails.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(2500);

/// The canary failures a node agent counted.
async fn canary_failures(s: &System, node: &str) -> f64 {
    let (_, m) = admin_get(&s.cluster, &s.stack.node_agents[node], "/metrics")
        .await
        .unwrap();
    m.lines()
        .filter(|l| !l.starts_with('#') && l.contains("canary_failures"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn report(fault: &str, what: &str, lost: usize, total: u64) {
    println!("FAULT | {fault} | {what} | {lost} of {total} requests lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r1_control_plane_killed_and_restarted() {
    let mut s = lab("mlr1").await;
    let before = (rules(&s, "node1"), rules(&s, "node2"));
    let lp = s.request_loop("testpod", VIP.parse().unwrap());
    tokio::time::sleep(Duration::from_secs(1)).await;
    s.stack.control_plane.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    s.stack.control_plane.start_again(T).unwrap();
    // Every agent resumes against the new process (new epoch) by digest: nothing
    // is re-sent, nothing re-rendered.
    let start = Instant::now();
    loop {
        let unchanged = cp_metric(
            &s,
            "meshlite_control_plane_updates_sent_total{kind=\"Unchanged\"}",
        )
        .await;
        if unchanged >= 4.0 {
            break;
        }
        assert!(
            start.elapsed() < T,
            "agents did not resume ({unchanged} unchanged resumes)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let resumed_in = start.elapsed();
    assert_eq!(
        cp_metric(
            &s,
            "meshlite_control_plane_updates_sent_total{kind=\"Full\"}"
        )
        .await,
        0.0,
        "a full snapshot was sent"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let r = lp.finish().await;
    assert_eq!(
        (rules(&s, "node1"), rules(&s, "node2")),
        before,
        "rules changed across the restart"
    );
    report(
        "R1 control plane SIGKILL, restarted after 2 s",
        &format!(
            "agents kept their rules, resumed by digest {resumed_in:?} after restart, 0 full snapshots"
        ),
        r.failed.len(),
        r.ok + r.failed.len() as u64,
    );
    assert!(r.failed.is_empty(), "lost requests: {:?}", r.failed);
}

/// Both node agents (node1 iptables, node2 nftables) are killed and restarted while
/// a loop runs through each node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r2_node_agent_killed_and_restarted() {
    let mut s = lab("mlr2").await;
    let before = (rules(&s, "node1"), rules(&s, "node2"));
    let loops: Vec<_> = CLIENTS
        .iter()
        .map(|(node, pod)| (*node, s.request_loop(pod, VIP.parse().unwrap())))
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    for agent in s.stack.node_agents.values_mut() {
        agent.kill();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    for agent in s.stack.node_agents.values_mut() {
        agent.start_again(T).unwrap();
    }
    s.stack.wait_ready(&s.cluster, T).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut results = Vec::new();
    for (node, lp) in loops {
        results.push((node, lp.finish().await));
    }
    let after = (rules(&s, "node1"), rules(&s, "node2"));
    assert_eq!(
        after.0, before.0,
        "the restarted agent changed node1's rules"
    );
    assert_eq!(
        after.1, before.1,
        "the restarted agent changed node2's rules"
    );
    for (node, r) in &results {
        report(
            &format!(
                "R2 node agent SIGKILL, restarted after 1 s ({node}, {})",
                s.mode(node)
            ),
            "no flush at startup: rules stayed, the new agent resumed and re-applied the same rules",
            r.failed.len(),
            r.ok + r.failed.len() as u64,
        );
    }
    for (node, r) in &results {
        assert!(
            r.failed.is_empty(),
            "lost requests via {node}: {:?}",
            r.failed
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r3_watch_dropped_and_410_relist() {
    let s = lab("mlr3").await;
    let before = (rules(&s, "node1"), rules(&s, "node2"));
    let lists = s.api.stats.lists.load(std::sync::atomic::Ordering::Relaxed);
    // Gauges refresh every second: read the version once it is current.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let version = cp_metric(&s, "meshlite_control_plane_version").await;
    let lp = s.request_loop("testpod", VIP.parse().unwrap());
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.api.compact(true);
    within("re-listed", T, || {
        s.api.stats.lists.load(std::sync::atomic::Ordering::Relaxed) >= lists + 3
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r = lp.finish().await;
    assert_eq!(
        (rules(&s, "node1"), rules(&s, "node2")),
        before,
        "rules changed during the re-list"
    );
    // Gauges refresh every second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        cp_metric(&s, "meshlite_control_plane_version").await,
        version,
        "the re-list produced updates"
    );
    report(
        "R3 API watches cut + history compacted (410 Gone)",
        "all three kinds re-listed; store version unchanged; no deletes reached agents",
        r.failed.len(),
        r.ok + r.failed.len() as u64,
    );
    assert!(r.failed.is_empty(), "lost requests: {:?}", r.failed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r4_chains_flushed_externally_are_repaired() {
    let s = lab("mlr4").await;
    let lp = s.request_loop("testpod", VIP.parse().unwrap());
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.cluster
        .iptables("node1", &["-t", "nat", "-F", "KUBE-SERVICES"])
        .unwrap();
    let flushed = Instant::now();
    within("repaired", Duration::from_secs(40), || {
        rules(&s, "node1")
            .lines()
            .any(|l| l.starts_with("-A KUBE-SERVICES") && l.contains("default/web:http cluster IP"))
    })
    .await;
    let repaired = flushed.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let r = lp.finish().await;
    let detected = canary_failures(&s, "node1").await;
    assert!(detected >= 1.0, "the canary did not count the flush");
    assert!(
        repaired < Duration::from_secs(31),
        "not repaired within one sync period: {repaired:?}"
    );
    report(
        "R4 `iptables -t nat -F KUBE-SERVICES` on node1",
        &format!(
            "canary detected it, rules repaired after {:.1} s (canary period 10 s); requests fail until then",
            repaired.as_secs_f64()
        ),
        r.failed.len(),
        r.ok + r.failed.len() as u64,
    );
}

/// R4 for the nftables node: `nft flush table ip kube-proxy` removes every rule of
/// the table (its sets and maps stay). The canary finds the `services` dispatch
/// rule gone and a full sync rewrites the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r4n_nft_table_flushed_externally_is_repaired() {
    let s = lab("mlr4n").await;
    assert_eq!(s.mode(NFT_NODE), ProxyMode::Nftables);
    let before = rules(&s, NFT_NODE);
    let loop_start = Instant::now();
    let through_nft = s.request_loop("testpod2", VIP.parse().unwrap());
    let through_ipt = s.request_loop("testpod", VIP.parse().unwrap());
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Taken before the command: a request started while `nft` runs may already
    // meet the flushed table.
    let flush_started = Instant::now();
    s.cluster
        .nft(NFT_NODE, &["flush", "table", "ip", "kube-proxy"])
        .unwrap();
    let flushed = Instant::now();
    within("repaired", Duration::from_secs(40), || {
        let now = rules(&s, NFT_NODE);
        now.contains("vmap @service-ips") && now.contains("dnat to 198.18.2.2:80")
    })
    .await;
    let repaired = flushed.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let r = through_nft.finish().await;
    let other = through_ipt.finish().await;
    assert_eq!(
        rules(&s, NFT_NODE),
        before,
        "the repaired table differs from the one flushed"
    );
    assert!(
        canary_failures(&s, NFT_NODE).await >= 1.0,
        "the canary did not count the flush"
    );
    // The canary runs every 10 s, checked on a 1 s tick; the full sync follows on
    // the same tick.
    assert!(
        repaired < Duration::from_secs(13),
        "not repaired within one canary period: {repaired:?}"
    );
    report(
        "R4n `nft flush table ip kube-proxy` on node2 (nftables)",
        &format!(
            "canary detected it, table rewritten identical after {:.1} s (canary period 10 s); \
             new connections through node2 fail until then; node1's loop lost {} of {}",
            repaired.as_secs_f64(),
            other.failed.len(),
            other.ok + other.failed.len() as u64,
        ),
        r.failed.len(),
        r.ok + r.failed.len() as u64,
    );
    assert!(
        other.failed.is_empty(),
        "requests through node1 (iptables) were lost: {:?}",
        other.failed
    );
    // Only requests started between the flush and the repair failed (each gives
    // up after 2 s). The loops time requests from their own start, a little after
    // `loop_start`: the window opens a little early to allow for it.
    let slack = Duration::from_millis(100);
    let window = (flush_started - loop_start).saturating_sub(slack)
        ..(flushed - loop_start) + repaired + REQUEST_TIMEOUT;
    let outside: Vec<_> = r
        .failed
        .iter()
        .filter(|(t, _)| !window.contains(t))
        .collect();
    assert!(
        outside.is_empty(),
        "requests failed outside the flush window {window:?}: {outside:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r5_control_plane_away_for_a_while() {
    let mut s = lab("mlr5").await;
    let lp = s.request_loop("testpod", VIP.parse().unwrap());
    s.stack.control_plane.kill();
    tokio::time::sleep(Duration::from_secs(12)).await;
    let (code, body) = admin_get(&s.cluster, &s.stack.node_agents["node1"], "/healthz")
        .await
        .unwrap();
    assert_eq!(code, 200, "the node still serves: {body}");
    assert!(body.contains("STALE: control plane unreachable"), "{body}");
    let (_, m) = admin_get(&s.cluster, &s.stack.node_agents["node1"], "/metrics")
        .await
        .unwrap();
    assert_eq!(metric(&m, "meshlite_subscriber_connected"), Some(0.0));
    let (_, dns_health) = admin_get(&s.cluster, &s.stack.dns_agents["dns-a"], "/healthz")
        .await
        .unwrap();
    assert!(dns_health.contains("STALE"), "{dns_health}");
    // DNS still answers from the last zone.
    assert_eq!(
        s.dig("198.18.1.53", "web.default.svc.cluster.local", "A").1,
        ["198.19.7.7"]
    );
    s.stack.control_plane.start_again(T).unwrap();
    within("reconnected", T, || true).await;
    let node1 = &s.stack.node_agents["node1"];
    let start = Instant::now();
    loop {
        let (_, body) = admin_get(&s.cluster, node1, "/healthz").await.unwrap();
        if body.contains("control plane connected") {
            break;
        }
        assert!(start.elapsed() < T, "did not reconnect: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And changes flow again.
    assert!(s.api.delete(Collection::Service, "default", "web"));
    within("change after recovery", T, || {
        ["node1", "node2"]
            .iter()
            .all(|n| !s.mentions(n, "default/web:http"))
    })
    .await;
    let r = lp.finish().await;
    let before_delete: Vec<_> = r
        .failed
        .iter()
        .filter(|(t, _)| *t < start.elapsed())
        .collect();
    report(
        "R5 control plane unreachable for 12 s",
        &format!(
            "agents served the last state; /healthz 200 saying STALE; reconnected {:.1} s after it returned",
            start.elapsed().as_secs_f64()
        ),
        before_delete.len(),
        r.ok + r.failed.len() as u64,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r6_an_agent_that_never_acks_costs_constant_memory() {
    let s = lab("mlr6").await;
    let cp_pid = s.stack.control_plane.process.pid().unwrap();
    let rss = || -> u64 {
        std::fs::read_to_string(format!("/proc/{cp_pid}/status"))
            .unwrap()
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap()
    };
    // A subscriber that takes its first update and never ACKs, from inside node1.
    let grpc: std::net::SocketAddr = "198.18.0.1:7443".parse().unwrap();
    let mut pki_client = s.stack.pki.client("stuck", &["dns-agent"]);
    pki_client.server_name = None;
    let rt = &s.cluster.node("node1").unwrap().rt;
    let (stuck_tx, mut stuck_rx) = tokio::sync::mpsc::channel::<usize>(16);
    let _stuck = rt.spawn(async move {
        let channel = tonic::transport::Endpoint::from_shared(format!("https://{grpc}"))
            .unwrap()
            .tls_config(pki_client.load().unwrap())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = meshlite_proto::v1::mesh_client::MeshClient::new(channel);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(meshlite_proto::v1::AgentMessage {
            msg: Some(meshlite_proto::v1::agent_message::Msg::Hello(
                meshlite_proto::v1::Hello {
                    node_name: "stuck".into(),
                    role: meshlite_proto::v1::Role::Dns as i32,
                    ..Default::default()
                },
            )),
        })
        .await
        .unwrap();
        let mut inbound = client
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let mut n = 0;
        while let Some(Ok(_)) = tokio_stream::StreamExt::next(&mut inbound).await {
            n += 1;
            let _ = stuck_tx.send(n).await;
        }
        drop(tx);
    });
    assert_eq!(stuck_rx.recv().await, Some(1));
    let start_rss = rss();
    // Churn: 2,000 changes to a 50-endpoint slice (~2.5 KB each; 5 MB if queued).
    let eps: Vec<String> = (0..50).map(|i| format!("198.18.2.{}", i + 100)).collect();
    for round in 0..2_000u32 {
        let mut list: Vec<(&str, &str, bool)> =
            eps.iter().map(|e| (e.as_str(), "node2", true)).collect();
        let extra = format!("198.18.1.{}", round % 200 + 20);
        list.push((&extra, "node1", true));
        s.api.apply_yaml(&webui_slice("churn", &list)).unwrap();
        if round % 200 == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Let the control plane ingest everything and the real agents catch up.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let end_rss = rss();
    let growth_kib = end_rss.saturating_sub(start_rss);
    assert!(
        stuck_rx.try_recv().is_err(),
        "the stuck agent got a second update without ACKing"
    );
    report(
        "R6 an agent that never ACKs while 2,000 changes land",
        &format!(
            "it got exactly one update; control plane RSS {start_rss} KiB -> {end_rss} KiB ({:+} KiB)",
            growth_kib as i64
        ),
        0,
        0,
    );
    assert!(growth_kib < 4 * 1024, "RSS grew {growth_kib} KiB");
}

const UNCHANGED: &str = "meshlite_control_plane_updates_sent_total{kind=\"Unchanged\"}";
const FULL: &str = "meshlite_control_plane_updates_sent_total{kind=\"Full\"}";
const INVENTORY: &str = "meshlite_control_plane_updates_sent_total{kind=\"Inventory\"}";
const BYTES: &str = "meshlite_control_plane_update_bytes_sent_total";

/// Waits until every agent (2 node agents, 2 DNS agents) has resumed on `r` with
/// nothing to send, and checks that nothing else was sent: no full snapshot, no
/// inventory diff. Returns how long it took and the bytes `r` sent.
async fn resumed_by_digest_on(s: &System, r: &Running, what: &str) -> (Duration, f64) {
    let start = Instant::now();
    while metric_of(s, r, UNCHANGED).await < 4.0 {
        assert!(
            start.elapsed() < T,
            "{what}: agents did not resume on {}",
            r.process.name
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = start.elapsed();
    assert_eq!(
        metric_of(s, r, FULL).await,
        0.0,
        "{what}: a full snapshot was sent"
    );
    assert_eq!(
        metric_of(s, r, INVENTORY).await,
        0.0,
        "{what}: resumed by inventory, not digest"
    );
    (took, metric_of(s, r, BYTES).await)
}

/// Two control-plane replicas on the same API, agents behind one address that
/// sends each new connection to the first replica up (as a Service would send it to
/// a ready one). The replicas have different epochs, so agents moving between them
/// resume by inventory digest: nothing is sent but the resume, nothing re-rendered,
/// no request lost. Then a rolling update of both replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r7_agents_move_between_control_plane_replicas() {
    let mut s = with_web(system_with_replicas("mlr7", 2).await).await;
    let front = s.stack.front.as_ref().expect("a front with two replicas");
    assert_eq!(
        front.forwarded_to(1),
        0,
        "every agent starts on the first replica"
    );
    let before = (rules(&s, "node1"), rules(&s, "node2"));
    let lp = s.request_loop("testpod", VIP.parse().unwrap());
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The first replica dies: everyone moves to the second.
    s.stack.control_plane.kill();
    let (moved_in, bytes) =
        resumed_by_digest_on(&s, &s.stack.more_control_planes[0], "failover").await;
    assert_eq!(
        (rules(&s, "node1"), rules(&s, "node2")),
        before,
        "rules changed on failover"
    );

    // A rolling update: the first comes back (new epoch), then the second restarts.
    s.stack.control_plane.start_again(T).unwrap();
    s.stack.wait_ready(&s.cluster, T).await.unwrap();
    s.stack.more_control_planes[0].kill();
    let (back_in, back_bytes) =
        resumed_by_digest_on(&s, &s.stack.control_plane, "rolling update").await;
    s.stack.more_control_planes[0].start_again(T).unwrap();
    s.stack.wait_ready(&s.cluster, T).await.unwrap();
    assert_eq!(
        (rules(&s, "node1"), rules(&s, "node2")),
        before,
        "rules changed in the update"
    );

    // Changes still flow after both replicas were replaced.
    s.api
        .apply_yaml(&webui_slice(
            "web",
            &[("198.18.1.1", "node1", true), ("198.18.2.1", "node2", true)],
        ))
        .unwrap();
    within("a change after the rolling update", T, || {
        ["node1", "node2"]
            .iter()
            .all(|n| !s.dnat_to(n, "198.18.2.2:80"))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let r = lp.finish().await;
    report(
        "R7 control-plane replica killed, then both replaced in turn",
        &format!(
            "agents resumed by digest on the other replica in {moved_in:?} and {back_in:?}; \
             0 full snapshots; resume bytes {bytes} and {back_bytes} for 4 agents; rules unchanged"
        ),
        r.failed.len(),
        r.ok + r.failed.len() as u64,
    );
    assert!(r.failed.is_empty(), "lost requests: {:?}", r.failed);
}
