//! Certificates rotate without a restart: the server config follows its files, keeps
//! the previous certificate while a rotation is half-written, and the expiry metric
//! follows the served certificate.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use meshlite_runtime::testing::TestPki;
use meshlite_runtime::tls::{CertExpiry, ReloadingServerConfig, ServerTls};
use prometheus_client::registry::Registry;

fn expiry_value(registry: &Registry) -> String {
    let mut body = String::new();
    prometheus_client::encoding::text::encode(&mut body, registry).unwrap();
    body.lines()
        .find(|l| l.starts_with("meshlite_tls_certificate_expiry_timestamp_seconds{"))
        .unwrap()
        .to_string()
}

/// Rewrites a file with a modification time one second later (so it differs even
/// when the test runs within one second).
fn replace(path: &std::path::Path, from: &std::path::Path, bump: u64) {
    std::fs::copy(from, path).unwrap();
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(bump))
        .unwrap();
}

#[test]
fn server_config_follows_its_files() {
    let pki = TestPki::new("ca");
    let dir = tempfile::tempdir().unwrap();
    let (c1, k1) = pki.leaf("one", &["localhost"], true);
    let cert = dir.path().join("tls.crt");
    let key = dir.path().join("tls.key");
    std::fs::copy(&c1, &cert).unwrap();
    std::fs::copy(&k1, &key).unwrap();
    let mut registry = Registry::default();
    let expiry = CertExpiry::register(&mut registry);
    let tls = ReloadingServerConfig::new(ServerTls {
        cert: cert.clone(),
        key: key.clone(),
        client_ca: pki.ca_path().to_path_buf(),
    })
    .unwrap()
    .with_expiry(expiry);
    let first = tls.current();
    assert!(
        Arc::ptr_eq(&first, &tls.current()),
        "unchanged files: same config"
    );
    let before = expiry_value(&registry);

    // Half a rotation: the new certificate without its key does not load; the old
    // config keeps serving.
    let (c2, k2) = pki.leaf("two", &["localhost"], true);
    replace(&cert, &c2, 1);
    assert!(
        Arc::ptr_eq(&first, &tls.current()),
        "a mismatched pair must not replace the config"
    );

    // The key arrives: the new pair is served.
    replace(&key, &k2, 2);
    let second = tls.current();
    assert!(
        !Arc::ptr_eq(&first, &second),
        "rotated files must give a new config"
    );
    let after = expiry_value(&registry);
    assert!(!before.is_empty() && !after.is_empty());
}
