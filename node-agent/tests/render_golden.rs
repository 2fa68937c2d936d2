//! Golden files: `tests/render/<case>/manifests.yaml` rendered for node1 must equal
//! `expected.txt` (and `expected.v6.txt` where the case has IPv6), byte for byte;
//! the seed scenario (`examples/seed`) must equal `tests/render/seed.expected.txt`.
//! Regenerate with `MESHLITE_UPDATE_GOLDEN=1 cargo test -p meshlite-node-agent --test render_golden`
//! and review the diff.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use meshlite_node_agent::config::RuleArgs;
use meshlite_node_agent::preview::render_dir;
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
        localhost_nodeports: true,
        random_fully: true,
        nodeport_addresses: vec![],
    }
}

fn check(manifests: &Path, family: IpFamily, golden: &Path) {
    let cfg = rules().iptables(vec![family], false);
    let p = render_dir(manifests, "node1", family, &cfg).unwrap();
    assert!(
        p.warnings.is_empty(),
        "{}: {:?}",
        manifests.display(),
        p.warnings
    );
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
    if want != p.text {
        panic!(
            "{} differs from {}:\n--- want\n{want}\n--- got\n{}",
            manifests.display(),
            golden.display(),
            p.text
        );
    }
}

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/render")
}

#[test]
fn seed_scenario() {
    let seed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/seed");
    check(&seed, IpFamily::V4, &dir().join("seed.expected.txt"));
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
        check(&case, IpFamily::V4, &case.join("expected.txt"));
        if case.ends_with("ipv6") {
            check(&case, IpFamily::V6, &case.join("expected.v6.txt"));
        }
    }
}
