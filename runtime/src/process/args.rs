//! Flags every binary shares, flattened into each one's command line so they are
//! spelled the same everywhere. Each also reads `MESHLITE_<FLAG>`.
//!
//! Renamed flags keep their old spelling, flag and environment variable, hidden, for
//! one release (`--client-ca` and `--ca` → `--tls-ca`, `--server-name` →
//! `--tls-server-name`, `--log-json` → `--log-format json`).

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use serde::Serialize;

use crate::tls::{ClientTls, ServerTls};

/// Log output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// `--log-format`.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log format: `text` or `json` (one object per line).
    #[arg(long, env = "MESHLITE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Old spelling of `--log-format json`.
    #[arg(long, env = "MESHLITE_LOG_JSON", hide = true)]
    pub log_json: bool,
}

/// Mutual TLS on the control plane's gRPC server.
#[derive(Debug, Clone, Args)]
pub struct ServerTlsArgs {
    /// Server certificate (PEM).
    #[arg(long, env = "MESHLITE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, env = "MESHLITE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// CA that signs the agents' client certificates (PEM).
    #[arg(long, env = "MESHLITE_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Old spelling of `--tls-ca` (flag and environment variable).
    #[arg(long = "client-ca", env = "MESHLITE_CLIENT_CA", hide = true)]
    pub client_ca: Option<PathBuf>,
    /// Serve plaintext gRPC without client authentication. For local demos only.
    #[arg(long, env = "MESHLITE_INSECURE")]
    pub insecure: bool,
}

/// An agent's stream to the control plane, over mutual TLS.
#[derive(Debug, Clone, Args)]
pub struct AgentConnectArgs {
    /// The control plane's gRPC endpoint, `https://host:port`.
    #[arg(long, env = "MESHLITE_CONTROL_PLANE")]
    pub control_plane: Option<String>,
    /// Client certificate (PEM).
    #[arg(long, env = "MESHLITE_TLS_CERT", alias = "cert")]
    pub tls_cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long, env = "MESHLITE_TLS_KEY", alias = "key")]
    pub tls_key: Option<PathBuf>,
    /// CA that signs the control plane's certificate (PEM).
    #[arg(long, env = "MESHLITE_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Old spelling of `--tls-ca` (flag and environment variable).
    #[arg(long = "ca", env = "MESHLITE_CA", hide = true)]
    pub ca: Option<PathBuf>,
    /// Name to verify in the control plane's certificate (default: the endpoint's host).
    #[arg(long, env = "MESHLITE_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
    /// Old spelling of `--tls-server-name` (flag and environment variable).
    #[arg(long = "server-name", env = "MESHLITE_SERVER_NAME", hide = true)]
    pub server_name: Option<String>,
    /// Plaintext, unauthenticated stream. For local demos only.
    #[arg(long, env = "MESHLITE_INSECURE")]
    pub insecure: bool,
}

/// A TLS flag combination that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsArgsError {
    #[error("--tls-cert, --tls-key and --tls-ca are required unless --insecure is given")]
    Missing,
    #[error("--insecure cannot be combined with --tls-cert, --tls-key or --tls-ca")]
    InsecureWithTls,
    #[error("--control-plane is required")]
    NoControlPlane,
}

/// Serializes a duration as humantime writes it (`10ms`, `5m`), for `--check-config`.
///
/// # Errors
/// Those of the serializer.
pub fn serialize_duration<S: serde::Serializer>(
    d: &std::time::Duration,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

/// Serializes a value by its `Display` form, for `--check-config`.
///
/// # Errors
/// Those of the serializer.
pub fn serialize_display<T: std::fmt::Display, S: serde::Serializer>(
    v: &T,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

// === impl LogArgs ===

impl LogArgs {
    /// Whether logs are JSON.
    pub fn json(&self) -> bool {
        self.log_json || self.log_format == LogFormat::Json
    }
}

// === impl ServerTlsArgs ===

impl ServerTlsArgs {
    /// The TLS settings; `None` with `--insecure`.
    ///
    /// # Errors
    /// A missing file flag without `--insecure`, or one with it.
    pub fn validate(&self) -> Result<Option<ServerTls>, TlsArgsError> {
        let ca = self.tls_ca.as_ref().or(self.client_ca.as_ref());
        match (self.insecure, (&self.tls_cert, &self.tls_key, ca)) {
            (true, (None, None, None)) => Ok(None),
            (true, _) => Err(TlsArgsError::InsecureWithTls),
            (false, (Some(cert), Some(key), Some(ca))) => Ok(Some(ServerTls {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: ca.clone(),
            })),
            (false, _) => Err(TlsArgsError::Missing),
        }
    }
}

// === impl AgentConnectArgs ===

impl AgentConnectArgs {
    /// The endpoint and the TLS settings (`None` with `--insecure`).
    ///
    /// # Errors
    /// No endpoint, a missing file flag without `--insecure`, or one with it.
    pub fn validate(&self) -> Result<(String, Option<ClientTls>), TlsArgsError> {
        let endpoint = self
            .control_plane
            .clone()
            .filter(|e| !e.is_empty())
            .ok_or(TlsArgsError::NoControlPlane)?;
        let ca = self.tls_ca.as_ref().or(self.ca.as_ref());
        let tls = match (self.insecure, (&self.tls_cert, &self.tls_key, ca)) {
            (true, (None, None, None)) => None,
            (true, _) => return Err(TlsArgsError::InsecureWithTls),
            (false, (Some(cert), Some(key), Some(ca))) => Some(ClientTls {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
                server_name: self
                    .tls_server_name
                    .clone()
                    .or_else(|| self.server_name.clone()),
            }),
            (false, _) => return Err(TlsArgsError::Missing),
        };
        Ok((endpoint, tls))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Agent {
        #[command(flatten)]
        connect: AgentConnectArgs,
        #[command(flatten)]
        log: LogArgs,
    }

    #[derive(Debug, Parser)]
    struct Server {
        #[command(flatten)]
        tls: ServerTlsArgs,
    }

    fn agent(args: &[&str]) -> Agent {
        Agent::try_parse_from(std::iter::once("x").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn agents_take_the_new_names_and_the_old_ones() {
        let new = agent(&[
            "--control-plane=https://cp:7443",
            "--tls-cert=c",
            "--tls-key=k",
            "--tls-ca=ca",
            "--tls-server-name=cp",
            "--log-format=json",
        ]);
        let old = agent(&[
            "--control-plane=https://cp:7443",
            "--tls-cert=c",
            "--tls-key=k",
            "--ca=ca",
            "--server-name=cp",
            "--log-json",
        ]);
        for a in [new, old] {
            let (endpoint, tls) = a.connect.validate().unwrap();
            assert_eq!(endpoint, "https://cp:7443");
            let tls = tls.unwrap();
            assert_eq!(
                (tls.ca.to_str(), tls.server_name.as_deref()),
                (Some("ca"), Some("cp"))
            );
            assert!(a.log.json());
        }
        assert!(!agent(&[]).log.json());
    }

    #[test]
    fn tls_combinations() {
        assert_eq!(
            agent(&["--control-plane=x"])
                .connect
                .validate()
                .unwrap_err(),
            TlsArgsError::Missing
        );
        assert_eq!(
            agent(&["--control-plane=x", "--insecure", "--tls-ca=a"])
                .connect
                .validate()
                .unwrap_err(),
            TlsArgsError::InsecureWithTls
        );
        assert_eq!(
            agent(&["--insecure"]).connect.validate().unwrap_err(),
            TlsArgsError::NoControlPlane
        );
        assert!(
            agent(&["--control-plane=x", "--insecure"])
                .connect
                .validate()
                .unwrap()
                .1
                .is_none()
        );
        let s = |args: &[&str]| {
            Server::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
                .unwrap()
                .tls
                .validate()
        };
        assert!(
            s(&["--tls-cert=c", "--tls-key=k", "--client-ca=ca"])
                .unwrap()
                .is_some()
        );
        assert!(
            s(&["--tls-cert=c", "--tls-key=k", "--tls-ca=ca"])
                .unwrap()
                .is_some()
        );
        assert_eq!(s(&[]).unwrap_err(), TlsArgsError::Missing);
        assert!(s(&["--insecure"]).unwrap().is_none());
    }
}
