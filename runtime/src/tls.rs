//! PEM loading for the rustls mTLS on every stream, with one explicit crypto
//! provider (ring). Files are re-read on every use, so rotated certificates take
//! effect on the next connection without a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

/// Reading or parsing certificates and keys.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate found")]
    NoCertificate { path: PathBuf },
    #[error("{path}: no PEM private key found")]
    NoKey { path: PathBuf },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// The one crypto provider every TLS config uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as the process default; harmless if one is installed already.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Server side: our certificate and key, and the CA that signs agent certificates.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

/// Agent side: the CA that signs the control plane's certificate, and our identity.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClientTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Name to verify in the server certificate; default: the endpoint's host.
    pub server_name: Option<String>,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Invalid {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// Reads the first private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoKey {
            path: path.to_path_buf(),
        },
        e => TlsError::Invalid {
            path: path.to_path_buf(),
            reason: e.to_string(),
        },
    })
}

impl ServerTls {
    /// Builds a rustls server config that requires a client certificate signed by
    /// `client_ca` and speaks HTTP/2 only.
    pub fn load(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in load_certs(&self.client_ca)? {
            roots.add(c).map_err(|e| TlsError::Invalid {
                path: self.client_ca.clone(),
                reason: e.to_string(),
            })?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| TlsError::Invalid {
                path: self.client_ca.clone(),
                reason: e.to_string(),
            })?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Invalid {
                path: self.cert.clone(),
                reason: e.to_string(),
            })?
            .with_client_cert_verifier(verifier)
            .with_single_cert(load_certs(&self.cert)?, load_key(&self.key)?)
            .map_err(|e| TlsError::Invalid {
                path: self.cert.clone(),
                reason: e.to_string(),
            })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

impl ClientTls {
    /// Builds tonic's client TLS config from the files as they are now.
    pub fn load(&self) -> Result<tonic::transport::ClientTlsConfig, TlsError> {
        let ca = read(&self.ca)?;
        let cert = read(&self.cert)?;
        let key = read(&self.key)?;
        let mut cfg = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca))
            .identity(tonic::transport::Identity::from_pem(cert, key));
        if let Some(name) = &self.server_name {
            cfg = cfg.domain_name(name.clone());
        }
        Ok(cfg)
    }
}

/// A server config that follows its files: on each new connection the files' modification
/// times are checked and, if any changed, the config is rebuilt. A rebuild that fails
/// (half-written file during rotation) is logged and the previous config kept.
#[derive(Debug)]
pub struct ReloadingServerConfig {
    tls: ServerTls,
    expiry: Option<CertExpiry>,
    state: std::sync::Mutex<(
        Vec<Option<std::time::SystemTime>>,
        Arc<rustls::ServerConfig>,
    )>,
}

impl ReloadingServerConfig {
    /// # Errors
    /// The files cannot be loaded now.
    pub fn new(tls: ServerTls) -> Result<Self, TlsError> {
        let config = tls.load()?;
        let stamps = stamps(&tls);
        Ok(Self {
            tls,
            expiry: None,
            state: std::sync::Mutex::new((stamps, config)),
        })
    }

    /// Keeps `expiry` up to date with the served certificate.
    pub fn with_expiry(mut self, expiry: CertExpiry) -> Self {
        expiry.observe_file("server", &self.tls.cert);
        self.expiry = Some(expiry);
        self
    }

    /// The current config, reloaded first if the files changed.
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        // The guarded data is replaced whole; a poisoned lock still holds a valid config.
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = stamps(&self.tls);
        if now != state.0 {
            match self.tls.load() {
                Ok(c) => {
                    tracing::info!(cert = %self.tls.cert.display(), "reloaded TLS certificate");
                    if let Some(e) = &self.expiry {
                        e.observe_file("server", &self.tls.cert);
                    }
                    *state = (now, c);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "TLS files changed but do not load; keeping the previous certificate");
                    state.0 = now;
                }
            }
        }
        state.1.clone()
    }
}

fn stamps(tls: &ServerTls) -> Vec<Option<std::time::SystemTime>> {
    [&tls.cert, &tls.key, &tls.client_ca]
        .iter()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

/// The DNS names (subjectAltName dNSName entries) of a DER certificate.
pub fn dns_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        })
        .collect()
}

/// When a DER certificate expires.
pub fn not_after(der: &[u8]) -> Option<std::time::SystemTime> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let secs = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
    Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

/// `meshlite_tls_certificate_expiry_timestamp_seconds{certificate=...}`: when each
/// certificate this process presents expires, refreshed whenever it is (re)loaded.
#[derive(Debug, Clone, Default)]
pub struct CertExpiry {
    family: prometheus_client::metrics::family::Family<
        CertLabel,
        prometheus_client::metrics::gauge::Gauge<f64, std::sync::atomic::AtomicU64>,
    >,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct CertLabel {
    certificate: String,
}

impl CertExpiry {
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let me = Self::default();
        registry.register(
            "meshlite_tls_certificate_expiry_timestamp_seconds",
            "Unix time at which the certificate this process presents expires",
            me.family.clone(),
        );
        me
    }

    /// Records the expiry of the first certificate in a PEM file.
    pub fn observe_file(&self, label: &str, path: &Path) {
        let Ok(certs) = load_certs(path) else { return };
        if let Some(t) = certs.first().and_then(|c| not_after(c.as_ref()))
            && let Ok(d) = t.duration_since(std::time::UNIX_EPOCH)
        {
            self.family
                .get_or_create(&CertLabel {
                    certificate: label.to_string(),
                })
                .set(d.as_secs_f64());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestPki;

    #[test]
    fn pem_files_load_or_say_what_is_wrong() {
        let pki = TestPki::new("pem-test");
        let (cert, key) = pki.leaf("x", &["x"], true);
        assert_eq!(load_certs(&cert).unwrap().len(), 1);
        assert!(load_key(&key).is_ok());
        // A certificate where a key belongs, and the other way round.
        assert!(matches!(load_key(&cert), Err(TlsError::NoKey { .. })));
        assert!(matches!(
            load_certs(&key),
            Err(TlsError::NoCertificate { .. })
        ));
        let dir = tempfile::tempdir().unwrap();
        let broken = dir.path().join("broken.pem");
        std::fs::write(
            &broken,
            "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        assert!(matches!(load_certs(&broken), Err(TlsError::Invalid { .. })));
        assert!(matches!(
            load_certs(&dir.path().join("absent.pem")),
            Err(TlsError::Read { .. })
        ));
    }
}
