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
fn render_mode_ipvs_prints_the_ipvs_table_ipsets_and_rules() {
    let seed = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/seed");
    let out = bin()
        .args([
            "render",
            "--mode",
            "ipvs",
            "--manifests",
            seed,
            "--node-name",
            "node1",
            "--cluster-cidr",
            "198.18.0.0/16",
        ])
        .env("MESHLITE_IPVS_SCHEDULER", "sh")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("Prot LocalAddress:Port Scheduler Flags\n"),
        "{text}"
    );
    assert!(text.contains("TCP  198.19.100.100:80 sh\n"), "{text}");
    assert!(text.contains("  -> 198.18.2.2:80                Masq    1      0          0"));
    assert!(
        text.contains("\n198.19.100.100/32\n"),
        "the dummy interface's address"
    );
    assert!(text.contains("add KUBE-CLUSTER-IP 198.19.100.100,tcp:80\n"));
    assert!(text.contains("add KUBE-LOOP-BACK 198.18.1.1,tcp:80,198.18.1.1\n"));
    assert!(text.contains(
        "-A KUBE-SERVICES -m comment --comment \"Kubernetes service cluster ip + port for masquerade purpose\" -m set --match-set KUBE-CLUSTER-IP dst,dst ! -s 198.18.0.0/16 -j KUBE-MARK-MASQ\n"
    ));
    assert!(
        !text.contains("headless"),
        "headless services are not proxied"
    );

    let out = bin()
        .args([
            "render",
            "--mode",
            "ipvs",
            "--manifests",
            seed,
            "--node-name",
            "node1",
            "--ipvs-scheduler",
            "wlc",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ipvs-scheduler"));
}

#[test]
fn check_config_accepts_mode_ipvs() {
    let out = bin()
        .args([
            "--check-config",
            "--insecure",
            "--mode=ipvs",
            "--ipvs-scheduler=nq",
            "--ipvs-graceful-termination-timeout=30s",
        ])
        .env("MESHLITE_NODE_NAME", "node7")
        .env("MESHLITE_CONTROL_PLANE", "http://127.0.0.1:9")
        .env("MESHLITE_IPVS_EXCLUDE_CIDRS", "198.51.100.0/24")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["backend"], "ipvs");
    assert_eq!(v["ipvs_scheduler"], "nq");
    assert_eq!(v["ipvs_interface"], "kube-ipvs0");
    assert_eq!(v["ipvs_graceful_termination_timeout"], "30s");
    assert_eq!(v["ipvs_exclude_cidrs"][0], "198.51.100.0/24");
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

#[test]
fn render_takes_every_detect_local_mode_in_both_backends() {
    let seed = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/seed");
    let render = |extra: &[&str]| {
        let mut args = vec!["render", "--manifests", seed, "--node-name", "node1"];
        args.extend_from_slice(extra);
        bin().args(&args).output().unwrap()
    };
    for (mode, want) in [
        (
            &[
                "--detect-local-mode",
                "InterfaceNamePrefix",
                "--pod-interface-name-prefix",
                "eni",
            ][..],
            "! -i eni+ -j KUBE-MARK-MASQ",
        ),
        (
            &[
                "--detect-local-mode",
                "BridgeInterface",
                "--pod-bridge-interface",
                "cbr0",
            ][..],
            "! -i cbr0 -j KUBE-MARK-MASQ",
        ),
        (
            &[
                "--detect-local-mode",
                "ClusterCIDR",
                "--cluster-cidr",
                "198.18.0.0/16",
            ][..],
            "! -s 198.18.0.0/16 -j KUBE-MARK-MASQ",
        ),
    ] {
        for backend in [&[][..], &["--mode", "ipvs"][..]] {
            let out = render(&[mode, backend].concat());
            assert!(
                out.status.success(),
                "{mode:?} {backend:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let text = String::from_utf8(out.stdout).unwrap();
            assert!(text.contains(want), "{mode:?} {backend:?}: {text}");
        }
    }
    // A mode without the value it needs is a configuration error (64).
    let out = render(&["--detect-local-mode", "InterfaceNamePrefix"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--pod-interface-name-prefix"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // NodeCIDR: the seed's node1 has spec.podCIDRs 198.18.1.0/24, node2 another.
    for node in ["node1", "node2"] {
        let out = bin()
            .args([
                "render",
                "--manifests",
                seed,
                "--node-name",
                node,
                "--detect-local-mode",
                "NodeCIDR",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let want = if node == "node1" {
            "! -s 198.18.1.0/24 -j KUBE-MARK-MASQ"
        } else {
            "! -s 198.18.2.0/24 -j KUBE-MARK-MASQ"
        };
        assert!(text.contains(want), "{node}: {text}");
    }
}

#[test]
fn explain_exits_0_whatever_the_verdict_and_64_for_bad_input() {
    let seed = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/seed");
    let run = |args: &[&str]| {
        bin()
            .arg("explain")
            .args(["--manifests", seed, "--node-name", "node1"])
            .args(["--cluster-cidr", "198.18.0.0/17"])
            .args(args)
            .output()
            .unwrap()
    };
    let o = run(&[
        "--from",
        "198.18.1.10",
        "--to",
        "198.19.100.100:80",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["verdict"], "dnat");
    assert_eq!(v["endpoints"].as_array().unwrap().len(), 3);
    assert_eq!(v["service"], "default/clusterip-service:http");
    // The same in nftables mode.
    let o = run(&[
        "--mode",
        "nftables",
        "--from",
        "198.18.1.10",
        "--to",
        "198.19.100.100:80",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["verdict"], "dnat");
    assert_eq!(v["endpoints"].as_array().unwrap().len(), 3);
    assert_eq!(v["service"], "default/clusterip-service:http");
    assert_eq!(v["trace"][0]["table"], "ip kube-proxy");
    // No service there: still 0.
    let o = run(&["--from", "198.18.1.10", "--to", "198.19.100.100:81"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("verdict:    no_match"));
    // Bad input: 64 with a message.
    for bad in [
        &["--from", "198.18.1.10", "--to", "198.19.100.100"][..],
        &["--from", "nonsense", "--to", "198.19.100.100:80"],
        &["--from", "2001:db8::1", "--to", "198.19.100.100:80"],
        &[
            "--from",
            "198.18.1.10",
            "--to",
            "198.19.100.100:80",
            "--protocol",
            "icmp",
        ],
    ] {
        let o = run(bad);
        assert_eq!(o.status.code(), Some(64), "{bad:?}: {o:?}");
        assert!(!o.stderr.is_empty());
    }
    let o = bin()
        .args(["explain", "--manifests", "/nonexistent", "--node-name", "n"])
        .args(["--from", "198.18.1.10", "--to", "198.19.100.100:80"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(64), "{o:?}");
}
