//! nftables golden files: `tests/render/<case>/manifests.yaml` rendered for node1
//! in nftables mode must equal `expected.nft` (and `expected.v6.nft` for the IPv6
//! case), byte for byte, and every golden script must be accepted by the kernel
//! (`nft -c -f`, which checks without committing; needs root and `nft`).
//! Regenerate with `MESHLITE_UPDATE_GOLDEN=1 cargo test -p meshlite-node-agent --test render_nft_golden`
//! and review the diff.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use meshlite_node_agent::config::RuleArgs;
use meshlite_node_agent::nftables::NftablesConfig;
use meshlite_node_agent::preview::render_dir_nftables;
use meshlite_node_agent::proxy::IpFamily;

fn rules() -> RuleArgs {
    RuleArgs {
        chain_prefix: "KUBE".into(),
        cluster_cidr: vec![
            "198.18.0.0/17".parse().unwrap(),
            "2001:db8:1::/64".parse().unwrap(),
        ],
        detect_local_mode: meshlite_node_agent::local::DetectLocalModeName::ClusterCidr,
        pod_bridge_interface: None,
        pod_interface_name_prefix: None,
        node_ip: vec![
            "198.18.0.1".parse().unwrap(),
            "2001:db8::1".parse().unwrap(),
        ],
        masquerade_all: false,
        masquerade_bit: 14,
        localhost_nodeports: false,
        random_fully: true,
        nodeport_addresses: vec![],
    }
}

/// `nft -c -f -`: the kernel would accept `text`.
fn kernel_accepts(text: &str, what: &Path) {
    let mut child = Command::new("nft")
        .args(["-c", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("this test needs the nft tool (and root): {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "nft -c refused {}: {}",
        what.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn check(manifests: &Path, family: IpFamily, golden: &Path) {
    let cfg = NftablesConfig::from_rules(rules().iptables(vec![family], false));
    let p = render_dir_nftables(manifests, "node1", family, &cfg).unwrap();
    assert!(
        p.warnings.is_empty(),
        "{}: {:?}",
        manifests.display(),
        p.warnings
    );
    kernel_accepts(&p.text, golden);
    if std::env::var_os("MESHLITE_UPDATE_GOLDEN").is_some() {
        std::fs::write(golden, &p.text).unwrap();
        return;
    }
    let want = std::fs::read_to_string(golden).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (set MESHLITE_UPDATE_GOLDEN=1 to create)",
            golden.display()
        )
    });
    assert!(
        want == p.text,
        "{} differs from {}:\n--- want\n{want}\n--- got\n{}",
        manifests.display(),
        golden.display(),
        p.text
    );
}

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/render")
}

#[test]
fn seed_scenario() {
    let seed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/seed");
    check(&seed, IpFamily::V4, &dir().join("seed.expected.nft"));
}

#[test]
fn every_feature_case() {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    assert!(cases.len() >= 10, "{cases:?}");
    for case in cases {
        check(&case, IpFamily::V4, &case.join("expected.nft"));
        if case.ends_with("ipv6") {
            check(&case, IpFamily::V6, &case.join("expected.v6.nft"));
        }
    }
}
