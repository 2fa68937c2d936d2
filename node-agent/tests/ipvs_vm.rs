//! IPVS mode on a real kernel: this machine's kernel has no IPVS and no dummy
//! interfaces, so `tools/ipvs-vm.sh` boots Debian's kernel under QEMU (software
//! emulation; no NIC) with this crate's node agent binary and the control plane
//! binary, and runs `tests/vm/ipvs.sh` as the guest scenario: real servers in a
//! network namespace, the control plane (file source) feeding the agent in
//! `--mode ipvs`, real connections from a client namespace. Last, the agent is
//! stopped, `cleanup` run and the agent started in another mode, through
//! iptables -> nftables -> ipvs -> iptables -> ipvs -> nftables: each mode answers
//! with only its own kernel state, and each cleanup leaves no KUBE-* chain (nat and
//! filter, both families), `kube-proxy` nftables table, IPVS virtual server, KUBE-*
//! ipset or `kube-ipvs0`. Every check is reported on the serial console as
//! `@@IPVSVM CHECK OK|FAIL <name>`.
//!
//! The test fails (never skips) when `qemu-system-x86_64` is missing:
//! `tools/ipvs-vm.sh --prepare` installs it and caches the kernel (`tasks.sh test`
//! runs it first). One VM at a time: every scenario shares this one boot.

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Every check the guest must report OK; a missing one fails the test too, so a
/// scenario that stopped early cannot pass.
const CHECKS: &[&str] = &[
    "startup-check",
    "timeouts",
    "render-matches",
    "render-ipsets",
    "rr",
    "sh",
    "dh",
    "wrr",
    "affinity",
    "affinity-timeout",
    "lc",
    "nq",
    "sed",
    "nodeport",
    "external-ip",
    "reject",
    "ipv6",
    "dummy-addresses",
    "restart",
    "removal-weight0",
    "removal-no-new",
    "removal-deleted",
    "cleanup",
    "mode-switch",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The control plane binary: `$MESHLITE_BIN_DIR`, else next to this crate's
/// binary, else built now.
fn control_plane_binary() -> PathBuf {
    let name = "meshlite-control-plane";
    if let Some(dir) = std::env::var_os("MESHLITE_BIN_DIR") {
        let p = Path::new(&dir).join(name);
        assert!(p.exists(), "{} not found (MESHLITE_BIN_DIR)", p.display());
        return p;
    }
    let ours = PathBuf::from(env!("CARGO_BIN_EXE_meshlite-node-agent"));
    let dir = ours.parent().unwrap().to_path_buf();
    let p = dir.join(name);
    if !p.exists() {
        let profile = dir.file_name().unwrap().to_string_lossy().to_string();
        let target = dir.parent().unwrap();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", name, "--bin", name, "--target-dir"])
            .arg(target);
        if profile == "release" {
            cmd.arg("--release");
        }
        let status = cmd.status().unwrap();
        assert!(
            status.success() && p.exists(),
            "{name} could not be built; run `cargo build --workspace --bins` first"
        );
    }
    p
}

fn require_qemu() {
    let found = Command::new("sh")
        .args(["-c", "command -v qemu-system-x86_64"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "qemu-system-x86_64 is missing: the IPVS tests boot a VM (this kernel has no IPVS). \
         Run `tools/ipvs-vm.sh --prepare` as root (installs qemu-system-x86 and caches the kernel), \
         or `./tasks.sh test`, which does it."
    );
}

#[test]
fn ipvs_mode_in_a_vm() {
    require_qemu();
    let cp = control_plane_binary();
    let run_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ipvs-vm");
    let out = Command::new(repo().join("tools/ipvs-vm.sh"))
        .args(["--no-demo-bin", "--timeout", "600", "--mem", "1024"])
        .arg("--run-dir")
        .arg(&run_dir)
        .arg("--bin")
        .arg(env!("CARGO_BIN_EXE_meshlite-node-agent"))
        .arg("--bin")
        .arg(&cp)
        .arg("--script")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vm/ipvs.sh"))
        .output()
        .expect("run tools/ipvs-vm.sh");
    let serial = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let checks: Vec<(&str, &str)> = serial
        .lines()
        .filter_map(|l| l.strip_prefix("@@IPVSVM CHECK "))
        .filter_map(|l| l.split_once(' '))
        .collect();
    let failed: Vec<&str> = checks
        .iter()
        .filter(|(status, _)| *status == "FAIL")
        .map(|(_, rest)| *rest)
        .collect();
    let passed: Vec<&str> = checks
        .iter()
        .filter(|(status, _)| *status == "OK")
        .filter_map(|(_, rest)| rest.split_whitespace().next())
        .collect();
    let missing: Vec<&&str> = CHECKS.iter().filter(|c| !passed.contains(c)).collect();
    assert!(
        out.status.success()
            && serial.contains("@@IPVSVM RESULT PASS")
            && failed.is_empty()
            && missing.is_empty(),
        "IPVS VM test failed (exit {:?}); failed: {failed:#?}; missing: {missing:?}\n\
         --- serial console ---\n{serial}\n--- ipvs-vm.sh ---\n{stderr}",
        out.status.code()
    );
    for (_, rest) in &checks {
        println!("ok {rest}");
    }
}
