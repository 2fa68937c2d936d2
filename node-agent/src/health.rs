//! Health, with kube-proxy's semantics.
//!
//! - [`ProxyHealth`]: healthy while no queued change has waited longer than the
//!   timeout (2 x sync period) to be applied; served on `--healthz-bind-address` as
//!   `/healthz` and `/livez` (200 or 503 with a JSON body like kube-proxy's).
//! - [`HealthCheckServers`]: one HTTP server per `healthCheckNodePort` of an
//!   externalTrafficPolicy=Local LoadBalancer service, answering 200 with the local
//!   endpoint count when this node has local endpoints and 503 otherwise, so the
//!   cloud load balancer sends traffic only to nodes that can serve it locally.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use meshlite_proto::model::ServiceName;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{info, warn};

/// Tracks queued and applied updates.
#[derive(Debug, Clone)]
pub struct ProxyHealth {
    inner: Arc<Mutex<HealthState>>,
    timeout: Duration,
}

#[derive(Debug, Default)]
struct HealthState {
    /// The oldest update queued and not yet applied.
    oldest_pending: Option<Instant>,
    last_updated: Option<SystemTime>,
}

/// A snapshot of the health state.
#[derive(Debug, Clone)]
pub struct HealthStatus {
    pub healthy: bool,
    pub last_updated: Option<SystemTime>,
}

// === impl ProxyHealth ===

impl ProxyHealth {
    pub fn new(timeout: Duration) -> Self {
        Self {
            inner: Arc::default(),
            timeout,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        // Plain data: a panic elsewhere cannot leave it inconsistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An update was queued.
    pub fn queued(&self) {
        let mut s = self.lock();
        s.oldest_pending.get_or_insert_with(Instant::now);
    }

    /// Everything queued is applied.
    pub fn updated(&self) {
        let mut s = self.lock();
        s.oldest_pending = None;
        s.last_updated = Some(SystemTime::now());
    }

    pub fn status(&self) -> HealthStatus {
        let s = self.lock();
        let healthy = s
            .oldest_pending
            .is_none_or(|queued| queued.elapsed() < self.timeout);
        HealthStatus {
            healthy,
            last_updated: s.last_updated,
        }
    }

    /// kube-proxy's `/healthz` body.
    pub fn body(&self) -> (bool, String) {
        let st = self.status();
        let ts = |t: Option<SystemTime>| {
            t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0)
        };
        let body = serde_json::json!({
            "lastUpdated": ts(st.last_updated),
            "currentTime": ts(Some(SystemTime::now())),
            "nodeEligible": true,
        });
        (st.healthy, body.to_string())
    }

    /// For the admin endpoint's `/healthz` (`Ok(reason)` or `Err(reason)`).
    pub fn check(&self) -> Result<String, String> {
        let st = self.status();
        if st.healthy {
            Ok("ok".into())
        } else {
            Err(format!(
                "a queued change has not been applied within {:?}",
                self.timeout
            ))
        }
    }

    /// The `/healthz` + `/livez` router for `--healthz-bind-address`.
    pub fn router(&self) -> Router {
        let h = self.clone();
        let h2 = self.clone();
        Router::new()
            .route("/healthz", get(move || respond(h.clone())))
            .route("/livez", get(move || respond(h2.clone())))
    }
}

async fn respond(h: ProxyHealth) -> impl IntoResponse {
    let (healthy, body) = h.body();
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
}

/// The health-check node port servers.
#[derive(Debug)]
pub struct HealthCheckServers {
    bind_ip: IpAddr,
    health: ProxyHealth,
    servers: HashMap<u16, Server>,
}

#[derive(Debug)]
struct Server {
    service: ServiceName,
    local_endpoints: Arc<AtomicUsize>,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

// === impl HealthCheckServers ===

impl HealthCheckServers {
    pub fn new(bind_ip: IpAddr, health: ProxyHealth) -> Self {
        Self {
            bind_ip,
            health,
            servers: HashMap::new(),
        }
    }

    /// Ports currently served.
    pub fn ports(&self) -> Vec<u16> {
        let mut v: Vec<u16> = self.servers.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Makes the set of servers match `wanted` (port -> service, local endpoints):
    /// starts new ones, stops removed ones, updates counts.
    pub async fn sync(&mut self, wanted: &HashMap<u16, (ServiceName, usize)>) {
        self.servers
            .retain(|port, s| wanted.get(port).is_some_and(|(svc, _)| *svc == s.service));
        for (port, (service, count)) in wanted {
            if let Some(s) = self.servers.get(port) {
                s.local_endpoints.store(*count, Ordering::Relaxed);
                continue;
            }
            let addr = SocketAddr::new(self.bind_ip, *port);
            let listener = match TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(e) => {
                    warn!(%addr, %service, error = %e, "cannot serve health check node port");
                    continue;
                }
            };
            info!(%addr, %service, "serving health check node port");
            let local_endpoints = Arc::new(AtomicUsize::new(*count));
            let (stop, stopped) = oneshot::channel();
            let router = service_router(
                service.clone(),
                local_endpoints.clone(),
                self.health.clone(),
            );
            tokio::spawn(async move {
                let _ = axum::serve(listener, router)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await;
            });
            self.servers.insert(
                *port,
                Server {
                    service: service.clone(),
                    local_endpoints,
                    stop: Some(stop),
                },
            );
        }
    }
}

fn service_router(service: ServiceName, count: Arc<AtomicUsize>, health: ProxyHealth) -> Router {
    Router::new().fallback(move || {
        let service = service.clone();
        let count = count.clone();
        let health = health.clone();
        async move {
            let n = count.load(Ordering::Relaxed);
            let proxy_healthy = health.status().healthy;
            let body = serde_json::json!({
                "service": {"namespace": service.namespace, "name": service.name},
                "localEndpoints": n,
                "serviceProxyHealthy": proxy_healthy,
            });
            let status = if n > 0 && proxy_healthy {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (
                status,
                [
                    (header::CONTENT_TYPE, "application/json"),
                    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
                ],
                body.to_string(),
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn unhealthy_only_when_a_queued_change_waits_too_long() {
        let h = ProxyHealth::new(Duration::from_secs(60));
        assert!(h.status().healthy, "healthy while starting");
        h.queued();
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(h.status().healthy);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!h.status().healthy);
        assert!(h.check().is_err());
        h.updated();
        assert!(h.status().healthy);
        assert!(h.body().1.contains("lastUpdated"));
    }
}
