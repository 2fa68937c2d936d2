//! Test helpers shared by the crates' tests, the e2e suite and the scale harness
//! (feature `testing`): certificates minted at run time, a recording handler, and
//! `assert_eventually`.

pub mod netns;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::snapshot::{ChangeSet, Snapshot};
use crate::subscriber::{Applied, ApplyError, Handler, UpdateInfo};
use crate::tls::{ClientTls, ServerTls};

/// A throwaway PKI in a temporary directory: one CA, and leaf certificates on demand.
pub struct TestPki {
    dir: tempfile::TempDir,
    issuer: Issuer<'static, KeyPair>,
    ca_path: PathBuf,
}

impl std::fmt::Debug for TestPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestPki")
            .field("dir", &self.dir.path())
            .finish()
    }
}

impl TestPki {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("no SANs");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("self-signed CA");
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, cert.pem()).expect("write CA");
        Self {
            dir,
            issuer: Issuer::new(params, key),
            ca_path,
        }
    }

    /// Keeps the files after the PKI is dropped (for `--keep` runs); returns the directory.
    pub fn keep(self) -> std::path::PathBuf {
        self.dir.keep()
    }

    pub fn ca_path(&self) -> &Path {
        &self.ca_path
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `<name>.pem` / `<name>-key.pem` for a leaf with the given SANs
    /// (IP addresses or DNS names) and returns the paths.
    pub fn leaf(&self, name: &str, sans: &[&str], server: bool) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("no SANs");
        for s in sans {
            params
                .subject_alt_names
                .push(match s.parse::<std::net::IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => SanType::DnsName((*s).try_into().expect("valid DNS name")),
                });
        }
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        let cert_path = self.dir.path().join(format!("{name}.pem"));
        let key_path = self.dir.path().join(format!("{name}-key.pem"));
        std::fs::write(&cert_path, cert.pem()).expect("write cert");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        (cert_path, key_path)
    }

    /// Server TLS for 127.0.0.1 and localhost, trusting this CA for clients.
    pub fn server(&self) -> ServerTls {
        let (cert, key) = self.leaf("server", &["127.0.0.1", "localhost"], true);
        ServerTls {
            cert,
            key,
            client_ca: self.ca_path.clone(),
        }
    }

    /// Client TLS with the given SANs (e.g. the node name), trusting this CA.
    pub fn client(&self, name: &str, sans: &[&str]) -> ClientTls {
        let (cert, key) = self.leaf(name, sans, false);
        ClientTls {
            ca: self.ca_path.clone(),
            cert,
            key,
            server_name: Some("localhost".into()),
        }
    }
}

/// What a [`RecordingHandler`] saw for one update.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub version: u64,
    pub full: bool,
    pub upserted: Vec<String>,
    pub removed: Vec<String>,
    pub causes: usize,
    /// The causes' traceparents (empty strings when untraced).
    pub traceparents: Vec<String>,
    pub resources: usize,
    /// The snapshot's inventory digest after the apply (compare with the store's).
    pub digest: u64,
}

/// Records every apply; can be told to fail.
#[derive(Debug, Clone, Default)]
pub struct RecordingHandler {
    pub log: Arc<Mutex<Vec<Recorded>>>,
    /// When set, every apply fails with this message.
    pub fail: Arc<Mutex<Option<String>>>,
    /// What every successful apply reports as rejected (`"<key>: <reason>"`).
    pub reject: Arc<Mutex<Vec<String>>>,
}

impl RecordingHandler {
    pub fn records(&self) -> Vec<Recorded> {
        self.log.lock().expect("lock").clone()
    }

    pub fn fail_with(&self, msg: Option<&str>) {
        *self.fail.lock().expect("lock") = msg.map(String::from);
    }
}

impl Handler for RecordingHandler {
    async fn apply(
        &mut self,
        snapshot: &Snapshot,
        changes: &ChangeSet,
        info: &UpdateInfo,
    ) -> Result<Applied, ApplyError> {
        if let Some(msg) = self.fail.lock().expect("lock").clone() {
            return Err(ApplyError(msg));
        }
        self.log.lock().expect("lock").push(Recorded {
            version: info.version,
            full: info.full,
            upserted: changes.upserted.iter().map(ToString::to_string).collect(),
            removed: changes.removed.iter().map(ToString::to_string).collect(),
            causes: info.causes.len(),
            traceparents: info
                .causes
                .iter()
                .map(|c| c.traceparent.clone().unwrap_or_default())
                .collect(),
            resources: snapshot.len(),
            digest: snapshot.digest().sum,
        });
        Ok(Applied {
            rules_changed: (changes.upserted.len() + changes.removed.len()) as u64,
            rejected: self.reject.lock().expect("lock").clone(),
        })
    }
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes; panics with `what`.
pub async fn assert_eventually(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond() {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("not true within {timeout:?}: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A subscriber running in the background for tests, with a [`RecordingHandler`].
/// Dropping it stops the subscriber.
pub struct TestSubscriber {
    pub handler: RecordingHandler,
    pub status: tokio::sync::watch::Receiver<crate::subscriber::Status>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl TestSubscriber {
    /// Subscribes to `endpoint` as `node` (role NODE, or DNS when `role` says so),
    /// with fast backoff. `tls: None` means plaintext (`http://`).
    pub fn start(
        endpoint: String,
        node: &str,
        role: crate::subscriber::Role,
        tls: Option<ClientTls>,
        token_file: Option<std::path::PathBuf>,
    ) -> Self {
        crate::tls::install_default_provider();
        let handler = RecordingHandler::default();
        let config = crate::subscriber::SubscriberConfig {
            endpoint,
            node_name: node.to_string(),
            role,
            tls,
            agent_version: "test".into(),
            backoff: crate::backoff::Backoff::try_new(
                Duration::from_millis(20),
                Duration::from_millis(200),
                0.5,
            )
            .expect("valid backoff"),
            max_message_bytes: 4 << 20,
            token_file,
        };
        let metrics = Arc::new(crate::subscriber::SubscriberMetrics::register(
            &mut prometheus_client::registry::Registry::default(),
            "test",
        ));
        let sub = crate::subscriber::Subscriber::new(config, handler.clone(), metrics);
        let status = sub.status();
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(sub.run(async move {
            let _ = rx.await;
        }));
        Self {
            handler,
            status,
            _stop: stop,
        }
    }

    pub fn records(&self) -> Vec<Recorded> {
        self.handler.records()
    }
}

/// A small deterministic PRNG (xorshift64) for the bounded fuzz tests.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A value in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// An environment variable parsed as `T`, else `default` (for test knobs such as
/// `MESHLITE_FUZZ_SECONDS`).
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
