//! The scale harness end to end at a tiny size, so it cannot rot: the real control
//! plane binary, 20 simulated agents over mTLS, 50 services; every phase runs and
//! every figure is sane.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use clap::Parser;
use meshlite_e2e::scale::{self, Options};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    options: Options,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_cluster_every_phase_converges_with_sane_figures() {
    let opts = Cli::try_parse_from([
        "scale",
        "--agents=20",
        "--services=50",
        "--endpoints=400",
        "--churn=20",
        "--duration=3s",
        "--changes=10",
        "--converge-timeout=60s",
        "--initial-timeout=120s",
    ])
    .unwrap()
    .options;
    let r = tokio::time::timeout(Duration::from_secs(240), scale::run(&opts))
        .await
        .expect("the harness stops by itself")
        .expect("the harness runs");
    assert!(r.converged, "failures: {:?}", r.failures);
    assert_eq!((r.agents, r.services, r.endpoints), (20, 50, 400));
    assert!(r.initial_sync_s > 0.0 && r.initial_sync_s < 60.0);
    // A full snapshot carries every endpoint: more than a few bytes each.
    assert!(
        r.full_snapshot_bytes > 400.0 * 10.0,
        "{}",
        r.full_snapshot_bytes
    );
    assert!(r.change_p50_ms > 0.0 && r.change_p50_ms <= r.change_p99_ms);
    assert!(r.change_p99_ms <= r.change_max_ms);
    // One slice of at most 100 endpoints per change, far less than a snapshot.
    assert!(r.bytes_per_agent_per_change > 50.0);
    assert!(r.bytes_per_agent_per_change < r.full_snapshot_bytes);
    assert!(r.cp_peak_rss_mib > 1.0 && r.cp_cpu_s > 0.0);
    assert_eq!(r.api_watch_streams, 3, "services, slices, nodes");

    let churn = &r.churn[0];
    assert_eq!(churn.changes + churn.skipped, 60);
    assert_eq!(churn.not_converged, 0);
    assert!(churn.p99_ms > 0.0);

    let stuck = r.stuck.as_ref().unwrap();
    assert_eq!(stuck.catch_up_updates, 1, "one coalesced delta");
    assert!(stuck.catch_up_bytes > 0.0);

    let storm = r.storm.as_ref().unwrap();
    assert_eq!(storm.full_updates, 0.0, "unchanged agents get no snapshot");
    assert!(storm.resume_fraction < 0.05, "{}", storm.resume_fraction);
    assert!(storm.cp_rss_settled_mib > 1.0, "{storm:?}");

    // Every layer's connections were opened and measured (20 connections are too
    // few to compare the layers' costs: RSS moves by pages).
    let c = r.connections.as_ref().unwrap();
    assert_eq!(c.connections, 20);
    assert!(c.base_rss_mib > 1.0 && c.end_rss_mib > 1.0, "{c:?}");
    assert!(
        [c.tcp_kib, c.tls_kib, c.h2_kib]
            .iter()
            .all(|k| k.is_finite()),
        "{c:?}"
    );

    let w = r.watches.as_ref().unwrap();
    assert_eq!(w.meshlite_watch_streams, 3);
    assert_eq!(w.per_node_watch_streams, 60);
    assert_eq!(w.per_node_events, 20 * 10, "every node gets every change");
    assert_eq!(w.meshlite_events, 10);
}

/// `--churn-pattern rollout`: rolling updates written pod transition by pod
/// transition, several writes of one slice in flight at once; every write reaches
/// every agent, each timed to the first update that carries it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_cluster_rollout_churn_converges() {
    let opts = Cli::try_parse_from([
        "scale",
        "--agents=20",
        "--services=50",
        "--endpoints=400",
        "--phases=initial,churn",
        "--churn-pattern=rollout",
        "--churn=100",
        "--duration=4s",
        "--converge-timeout=60s",
        "--initial-timeout=120s",
    ])
    .unwrap()
    .options;
    let r = tokio::time::timeout(Duration::from_secs(240), scale::run(&opts))
        .await
        .expect("the harness stops by itself")
        .expect("the harness runs");
    assert!(r.converged, "failures: {:?}", r.failures);
    let churn = &r.churn[0];
    assert_eq!(churn.pattern, scale::ChurnPattern::Rollout);
    assert_eq!(churn.changes, 400, "{churn:?}");
    assert_eq!(churn.not_converged, 0);
    assert!(churn.p50_ms > 0.0 && churn.p50_ms <= churn.p99_ms);
    let counts = churn.rollout.unwrap();
    assert_eq!(
        counts.terminating + counts.created + counts.ready + counts.removed,
        400,
        "{counts:?}"
    );
    // Four writes per pod: the biggest services (at most 250 pods) roll first and
    // the next starts when one is done.
    assert!(counts.deployments_started >= 2, "{counts:?}");
    assert!(counts.waves >= counts.deployments_started, "{counts:?}");
}
