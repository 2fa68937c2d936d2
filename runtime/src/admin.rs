//! The admin HTTP endpoint every process serves: `/metrics` (Prometheus text),
//! `/healthz` (liveness with a reason), `/readyz` (true readiness), plus routes a
//! process adds. Also the listen-address helpers shared by every server.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::info;

pub mod client;
mod process_metrics;

pub use process_metrics::ProcessCollector;

/// Bind or address parsing failures.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("invalid listen address {addr:?}: expected host:port or :port")]
    Address { addr: String },
    #[error("bind {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// Parses `host:port`, `[v6]:port` or `:port` (all interfaces).
pub fn parse_listen(addr: &str) -> Result<SocketAddr, AdminError> {
    let full = if let Some(port) = addr.strip_prefix(':') {
        format!("0.0.0.0:{port}")
    } else {
        addr.to_string()
    };
    full.parse().map_err(|_| AdminError::Address {
        addr: addr.to_string(),
    })
}

/// Binds a TCP listener and logs the address actually bound (`:0` picks a port).
pub async fn bind(what: &str, addr: &str) -> Result<TcpListener, AdminError> {
    let sa = parse_listen(addr)?;
    let l = TcpListener::bind(sa)
        .await
        .map_err(|source| AdminError::Bind {
            addr: addr.to_string(),
            source,
        })?;
    if let Ok(local) = l.local_addr() {
        info!(%local, "{what} listening");
    }
    Ok(l)
}

/// A set of named conditions that block readiness; ready when none is left.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    blocked: Arc<Mutex<BTreeSet<String>>>,
}

/// Holds readiness down until dropped (or [`BlockReady::release`]d).
#[derive(Debug)]
pub struct BlockReady {
    name: String,
    readiness: Readiness,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    /// Blocks readiness until the returned guard is dropped.
    pub fn block(&self, name: &str) -> BlockReady {
        self.lock().insert(name.to_string());
        BlockReady {
            name: name.to_string(),
            readiness: self.clone(),
        }
    }

    /// Names still blocking; empty when ready.
    pub fn pending(&self) -> Vec<String> {
        self.lock().iter().cloned().collect()
    }

    pub fn is_ready(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        // A panic while holding this lock cannot leave the set inconsistent.
        self.blocked.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl BlockReady {
    pub fn release(self) {}
}

impl Drop for BlockReady {
    fn drop(&mut self) {
        self.readiness.lock().remove(&self.name);
    }
}

/// Liveness: `Ok(())` or a reason to report with 503.
pub type HealthCheck = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// Builds the admin router: `/metrics`, `/readyz`, `/healthz`, `/livez`.
pub fn router(registry: Arc<Registry>, readiness: Readiness, health: HealthCheck) -> Router {
    let health2 = health.clone();
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move {
                    let mut body = String::new();
                    match prometheus_client::encoding::text::encode(&mut body, &registry) {
                        Ok(()) => (
                            StatusCode::OK,
                            [(
                                "content-type",
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            body,
                        )
                            .into_response(),
                        Err(e) => {
                            (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
                        }
                    }
                }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let readiness = readiness.clone();
                async move {
                    let pending = readiness.pending();
                    if pending.is_empty() {
                        (StatusCode::OK, "ok\n".to_string())
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("not ready: waiting for {}\n", pending.join(", ")),
                        )
                    }
                }
            }),
        )
        .route("/healthz", get(move || health_response(health.clone())))
        .route("/livez", get(move || health_response(health2.clone())))
}

async fn health_response(health: HealthCheck) -> (StatusCode, String) {
    match health() {
        Ok(msg) => (StatusCode::OK, format!("{msg}\n")),
        Err(msg) => (StatusCode::SERVICE_UNAVAILABLE, format!("{msg}\n")),
    }
}

/// Serves a router on a bound listener until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Writes the addresses a process bound, as JSON, to a file (`--addresses-file`),
/// atomically, so tests and scripts learn `:0` ports without parsing logs.
pub fn write_addresses(
    path: &std::path::Path,
    addrs: &[(&str, SocketAddr)],
) -> std::io::Result<()> {
    let body = addrs
        .iter()
        .map(|(k, v)| format!("\"{k}\":\"{v}\""))
        .collect::<Vec<_>>()
        .join(",");
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{{{body}}}\n"))?;
    std::fs::rename(tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_guards() {
        let r = Readiness::new();
        let a = r.block("caches");
        let b = r.block("rules");
        assert_eq!(r.pending(), vec!["caches", "rules"]);
        drop(a);
        assert!(!r.is_ready());
        b.release();
        assert!(r.is_ready());
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(parse_listen(":0").unwrap().to_string(), "0.0.0.0:0");
        assert_eq!(parse_listen("127.0.0.1:53").unwrap().port(), 53);
        assert!(parse_listen("[::1]:8080").is_ok());
        assert!(parse_listen("localhost").is_err());
    }
}
