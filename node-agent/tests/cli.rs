//! The binary's command line: `render`, `--check-config`, exit codes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_meshlite-node-agent"))
}

#[test]
fn render_prints_the_restore_input_for_the_seed() {
    let seed = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/seed");
    let out = bin()
        .args([
            "render",
            "--manifests",
            seed,
            "--node-name",
            "node1",
            "--cluster-cidr",
            "198.18.0.0/16",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("*filter\n"));
    assert!(text.contains("--comment \"default/clusterip-service:http -> 198.18.1.1:80\""));
    assert!(text.contains("--probability 0.3333333333"));
    assert!(text.contains("--probability 0.5000000000"));
    assert!(
        !text.contains("headless"),
        "headless services are not proxied"
    );
}

#[test]
fn check_config_prints_the_effective_config_and_reads_env() {
    let out = bin()
        .args(["--check-config", "--insecure"])
        .env("MESHLITE_NODE_NAME", "node7")
        .env("MESHLITE_CONTROL_PLANE", "http://127.0.0.1:9")
        .env("MESHLITE_SYNC_PERIOD", "45s")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["node_name"], "node7");
    assert_eq!(v["sync_period"], "45s");
    assert_eq!(v["admin_listen"], "127.0.0.1:10249");
}

#[test]
fn invalid_config_exits_64() {
    for args in [
        vec!["--check-config"],
        vec![
            "--check-config",
            "--node-name=n",
            "--control-plane=https://x:1",
        ],
        vec!["--no-such-flag"],
        vec![
            "render",
            "--manifests",
            "/nonexistent",
            "--node-name",
            "n",
            "--chain-prefix",
            "lower",
        ],
    ] {
        let out = bin().args(&args).output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(64),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
