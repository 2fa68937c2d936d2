//! Wires the agent together: zone cell, DNS server, forwarder, subscriber and the
//! admin endpoint, and runs them until shutdown.

use std::future::Future;
use std::sync::Arc;

use meshlite_runtime::Subscriber;
use meshlite_runtime::admin::{self, HealthCheck, Readiness};
use meshlite_runtime::subscriber::SubscriberMetrics;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::Config;
use crate::dns::{self, DnsHandler, DnsServer, Forwarder};
use crate::handler::ZoneUpdater;
use crate::metrics::{Identity, Metrics};
use crate::zone::{Zone, ZoneCell};

/// Start-up and serving failures.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Dns(#[from] dns::Error),
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    #[error("write {path}: {source}")]
    AddressesFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("admin server: {0}")]
    AdminServe(#[source] std::io::Error),
}

/// Runs the agent until `shutdown` resolves. The DNS server answers from the start
/// (NXDOMAIN for cluster names until the first snapshot; `/readyz` says so).
///
/// # Errors
/// When a listener cannot be bound, or a server fails for good.
pub async fn run(
    config: Config,
    telemetry: meshlite_runtime::telemetry::Telemetry,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let mut registry = Registry::default();
    telemetry.register(&mut registry);
    let upstreams = config
        .forward
        .as_ref()
        .map(|f| f.upstreams.clone())
        .unwrap_or_default();
    let metrics = Arc::new(Metrics::register(
        &mut registry,
        &Identity::new(config.server.listen, &upstreams),
    ));
    count_panics(metrics.clone());
    let sub_metrics = Arc::new(SubscriberMetrics::register(&mut registry, "meshlite_dns"));
    let readiness = Readiness::new();
    let not_ready = readiness.block("zone");

    let cell = Arc::new(ZoneCell::new(Zone::empty(config.zone.clone())));
    let forwarder = match config.forward.clone() {
        Some(f) => Some(Arc::new(Forwarder::new(f, metrics.clone())?)),
        None => {
            warn!("forwarding disabled: names outside the cluster zones are REFUSED");
            None
        }
    };
    let handler = DnsHandler::new(
        cell.clone(),
        forwarder,
        metrics.clone(),
        config.server.max_udp_payload,
    );
    let server = DnsServer::bind(&config.server, handler).await?;
    let admin_listener = admin::bind("admin", &config.admin_listen).await?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| admin::AdminError::Bind {
            addr: config.admin_listen.clone(),
            source,
        })?;

    let updater = ZoneUpdater::new(cell.clone(), metrics.clone(), Some(not_ready));
    let subscriber = Subscriber::new(config.subscriber.clone(), updater, sub_metrics);
    let status = subscriber.status();
    let health_cell = cell.clone();
    // Liveness: the DNS server keeps serving its last zone while disconnected (fail
    // static), so a lost stream is reported but is not a reason to restart.
    let health: HealthCheck = Arc::new(move || {
        let s = status.borrow().clone();
        let zone = health_cell.load();
        Ok(format!(
            "ok: zone serial {} ({} services); {}",
            zone.serial(),
            zone.service_count(),
            s.describe(std::time::SystemTime::now())
        ))
    });
    let router = admin::router(Arc::new(registry), readiness.clone(), health)
        .merge(coredns_health_routes(readiness));

    if let Some(path) = &config.addresses_file {
        admin::write_addresses(path, &[("dns", server.local_addr()), ("admin", admin_addr)])
            .map_err(|source| RunError::AddressesFile {
                path: path.clone(),
                source,
            })?;
    }
    info!(dns = %server.local_addr(), admin = %admin_addr, control_plane = %config.subscriber.endpoint, "meshlite-dns-agent started");

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let dns_task = server.run(stopped());
    let admin_task = admin::serve(admin_listener, router, stopped());
    let sub_task = subscriber.run(stopped());
    let trigger = async move {
        shutdown.await;
        info!("shutting down");
        let _ = stop_tx.send(true);
    };
    let (dns_result, admin_result, (), ()) = tokio::join!(dns_task, admin_task, sub_task, trigger);
    dns_result?;
    admin_result.map_err(RunError::AdminServe)?;
    Ok(())
}

/// Counts every panic in `coredns_panics_total`, then reports it as before.
fn count_panics(metrics: Arc<Metrics>) {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        metrics.panicked();
        previous(info);
    }));
}

/// CoreDNS's probe paths on the admin port, so probes written for CoreDNS work:
/// `/health` (the `health` plugin: 200 `OK` while the process serves) and `/ready`
/// (the `ready` plugin: 200 `OK` once the first zone is in place, else 503 naming
/// what is pending).
fn coredns_health_routes(readiness: Readiness) -> axum::Router {
    use axum::http::StatusCode;
    use axum::routing::get;
    axum::Router::new()
        .route("/health", get(|| async { (StatusCode::OK, "OK") }))
        .route(
            "/ready",
            get(move || {
                let readiness = readiness.clone();
                async move {
                    let pending = readiness.pending();
                    if pending.is_empty() {
                        (StatusCode::OK, "OK".to_string())
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, pending.join("\n"))
                    }
                }
            }),
        )
}
