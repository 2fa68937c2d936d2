//! The control plane's traces, received by a real OTLP receiver: one `ingest` span
//! per change whose traceparent travels in the update's causes, a `publish` span per
//! version, and export that never holds up the data path when the collector is down.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use meshlite_e2e::otlp::OtlpReceiver;
use meshlite_e2e::procs::{Process, binary, http_get};
use meshlite_runtime::subscriber::Role;
use meshlite_runtime::testing::{TestSubscriber, assert_eventually};

const T: Duration = Duration::from_secs(20);

struct Cp {
    proc: Process,
    admin: std::net::SocketAddr,
    manifests: std::path::PathBuf,
    handler: TestSubscriber,
    _dir: tempfile::TempDir,
}

async fn start(otlp_endpoint: &str) -> Cp {
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("m");
    std::fs::create_dir(&manifests).unwrap();
    let seed = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/seed");
    for f in ["services.yaml", "endpointslices.yaml", "nodes.yaml"] {
        std::fs::copy(seed.join(f), manifests.join(f)).unwrap();
    }
    let args: Vec<String> = [
        "--source",
        &format!("file:{}", manifests.display()),
        "--insecure",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--file-poll-interval",
        "50ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let env = vec![
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT".to_string(),
            otlp_endpoint.to_string(),
        ),
        ("OTEL_BSP_SCHEDULE_DELAY".to_string(), "100".to_string()),
        ("OTEL_EXPORTER_OTLP_TIMEOUT".to_string(), "500".to_string()),
    ];
    let mut proc = Process::start_env(
        dir.path(),
        "control-plane",
        &binary("meshlite-control-plane").unwrap(),
        &args,
        &[],
        &env,
    )
    .unwrap();
    let addrs = proc.addresses(T).unwrap();
    let handler = TestSubscriber::start(
        format!("http://{}", addrs["grpc"]),
        "node1",
        Role::Node,
        None,
        None,
    );
    assert_eventually("snapshot", T, || handler.records().len() == 1).await;
    Cp {
        proc,
        admin: addrs["admin"],
        manifests,
        handler,
        _dir: dir,
    }
}

fn scale_up(cp: &Cp) {
    let path = cp.manifests.join("endpointslices.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let extra =
        "  - addresses: [\"198.18.1.2\"]\n    conditions: {ready: true}\n    nodeName: node1\n";
    std::fs::write(&path, text.replacen("---\n", &format!("{extra}---\n"), 1)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_is_traced_from_ingest_and_its_traceparent_reaches_the_agent() {
    let (rx, addr) = OtlpReceiver::start().await.unwrap();
    let cp = start(&format!("http://{addr}")).await;
    scale_up(&cp);
    assert_eventually("delta", T, || cp.handler.records().len() == 2).await;
    let tp = cp.handler.records()[1].traceparents[0].clone();
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "traceparent {tp:?}");
    let (trace_id, span_id) = (parts[1].to_string(), parts[2].to_string());

    assert_eventually("ingest span exported", T, || {
        rx.named("ingest", Some("meshlite-control-plane"))
            .iter()
            .any(|s| s.span_id == span_id)
    })
    .await;
    let ingest = rx
        .named("ingest", None)
        .into_iter()
        .find(|s| s.span_id == span_id)
        .unwrap();
    assert_eq!(ingest.trace_id, trace_id);
    assert_eq!(ingest.attributes["kind"], "endpointslice");
    assert_eq!(
        ingest.attributes["key"],
        "endpointslice/default/clusterip-service-webui"
    );
    assert!(
        ingest.attributes["trigger_unix_nanos"]
            .parse::<i64>()
            .unwrap()
            > 0
    );
    assert_eventually("publish span exported", T, || {
        !rx.named("publish", None).is_empty()
    })
    .await;
    let publish = rx.named("publish", None);
    assert!(
        publish
            .iter()
            .any(|s| s.attributes.get("version").is_some_and(|v| !v.is_empty()))
    );
    drop(cp.proc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_collector_down_changes_flow_and_dropped_spans_are_counted() {
    // Nothing listens on this port.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let cp = start(&format!("http://{closed}")).await;
    scale_up(&cp);
    assert_eventually("delta still applied", T, || cp.handler.records().len() == 2).await;
    assert_eventually("dropped spans counted", T, || {
        http_get(cp.admin, "/metrics").is_ok_and(|(_, m)| {
            m.lines()
                .find(|l| l.starts_with("meshlite_otel_dropped_spans_total"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
                .is_some_and(|v| v >= 1.0)
        })
    })
    .await;
}
