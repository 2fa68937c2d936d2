//! The real `meshlite-control-plane` process: serves the seed over mTLS to a
//! subscriber, follows manifest edits, reports readiness, and keeps the last good
//! state when a manifest breaks.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use meshlite_e2e::procs::{Process, binary, http_get};
use meshlite_runtime::subscriber::Role;
use meshlite_runtime::testing::{TestPki, TestSubscriber, assert_eventually};

const T: Duration = Duration::from_secs(15);

fn subscribe(endpoint: String, tls: Option<meshlite_runtime::tls::ClientTls>) -> TestSubscriber {
    TestSubscriber::start(endpoint, "node1", Role::Node, tls, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_the_seed_over_mtls_and_follows_edits() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    let seed = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/seed");
    for f in ["services.yaml", "endpointslices.yaml", "nodes.yaml"] {
        std::fs::copy(seed.join(f), manifests.join(f)).unwrap();
    }
    let pki = TestPki::new("meshlite-ca");
    let server = pki.server();
    let args: Vec<String> = [
        "--source",
        &format!("file:{}", manifests.display()),
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--tls-cert",
        server.cert.to_str().unwrap(),
        "--tls-key",
        server.key.to_str().unwrap(),
        "--tls-ca",
        server.client_ca.to_str().unwrap(),
        "--file-poll-interval",
        "50ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut cp = Process::start(
        dir.path(),
        "control-plane",
        &binary("meshlite-control-plane").unwrap(),
        &args,
        &[],
    )
    .unwrap();
    let addrs = cp.addresses(T).unwrap();
    let (grpc, admin) = (addrs["grpc"], addrs["admin"]);
    assert_eventually("ready", T, || {
        http_get(admin, "/readyz").is_ok_and(|(c, _)| c == 200)
    })
    .await;

    let handler = subscribe(
        format!("https://{grpc}"),
        Some(pki.client("node1", &["node1.nodes.meshlite"])),
    );
    assert_eventually("seed snapshot", T, || handler.records().len() == 1).await;
    let first = &handler.records()[0];
    assert!(first.full);
    assert_eq!(
        first.resources, 5,
        "2 services, 2 slices and node1: {first:?}"
    );

    // Scale webui to 4 pods in the manifest: the slice is pushed as a delta.
    let path = manifests.join("endpointslices.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let extra = "  - addresses: [\"198.18.1.2\"]\n    conditions: {ready: true, serving: true, terminating: false}\n    nodeName: node1\n";
    let edited = text.replacen("---\n", &format!("{extra}---\n"), 1);
    std::fs::write(&path, &edited).unwrap();
    assert_eventually("edit pushed", T, || handler.records().len() == 2).await;
    assert_eq!(
        handler.records()[1].upserted,
        vec!["endpointslice/default/clusterip-service-webui"]
    );

    // A broken manifest is reported with its path; the last good state stays.
    std::fs::write(
        manifests.join("broken.yaml"),
        "apiVersion: v1\nkind: Service\n  metadata: [",
    )
    .unwrap();
    assert_eventually("error reported", T, || {
        std::fs::read_to_string(&cp.log)
            .unwrap()
            .contains("broken.yaml: invalid YAML")
    })
    .await;
    let (_, metrics) = http_get(admin, "/metrics").unwrap();
    assert!(
        metrics.contains("meshlite_control_plane_manifest_errors_total 1"),
        "{metrics}"
    );
    // Gauges refresh every second.
    assert_eventually("resources gauge", T, || {
        http_get(admin, "/metrics")
            .is_ok_and(|(_, m)| m.contains("meshlite_control_plane_resources{kind=\"Service\"} 2"))
    })
    .await;
    assert_eq!(
        handler.records().len(),
        2,
        "nothing was pushed for the broken file"
    );

    // The status command lists the agent.
    let out = std::process::Command::new(binary("meshlite-control-plane").unwrap())
        .args(["status", "--admin", &admin.to_string()])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("node1") && table.contains("node"), "{table}");
    cp.stop(Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_mode_serves_plaintext_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let seed = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/seed");
    let args: Vec<String> = [
        "--source",
        &format!("file:{}", seed.display()),
        "--insecure",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut cp = Process::start(
        dir.path(),
        "control-plane",
        &binary("meshlite-control-plane").unwrap(),
        &args,
        &[],
    )
    .unwrap();
    let grpc = cp.addresses(T).unwrap()["grpc"];
    let handler = subscribe(format!("http://{grpc}"), None);
    assert_eventually("seed snapshot", T, || handler.records().len() == 1).await;
    assert!(
        std::fs::read_to_string(&cp.log)
            .unwrap()
            .contains("PLAINTEXT")
    );
}

#[test]
fn invalid_configuration_exits_64() {
    let out = std::process::Command::new(binary("meshlite-control-plane").unwrap())
        .args(["--source", "file:/nonexistent", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(64),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("--tls-cert, --tls-key and --tls-ca are required")
    );
    let out = std::process::Command::new(binary("meshlite-control-plane").unwrap())
        .args(["--insecure", "--check-config", "--source", "file:/x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    // The validated configuration, as JSON.
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["source"], "file:/x");
    assert_eq!(printed["debounce"], "10ms");
    assert_eq!(printed["tls"], serde_json::Value::Null);
}
