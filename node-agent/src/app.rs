//! Wiring of the agent process: servers, subscriber, sync loop.

use std::sync::Arc;
use std::time::Duration;

use meshlite_runtime::admin::{self, Readiness};
use meshlite_runtime::backoff::Backoff;
use meshlite_runtime::subscriber::SubscriberMetrics;
use meshlite_runtime::tls::ClientTls;
use meshlite_runtime::{Role, Subscriber, SubscriberConfig};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::backends::{AnyBackend, StartError};
use crate::config::Config;
use crate::health::{HealthCheckServers, ProxyHealth};
use crate::metrics::ProxyMetrics;
use crate::sync::{NodeHandler, Proxier, SyncConfig};

/// The agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    #[error("write {path}: {source}")]
    AddressesFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Backend(#[from] StartError),
}

/// Runs the agent until `shutdown` resolves.
pub async fn run(
    cfg: Config,
    telemetry: meshlite_runtime::telemetry::Telemetry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AppError> {
    meshlite_runtime::tls::install_default_provider();
    if cfg.insecure {
        warn!(
            "--insecure: the control-plane stream is PLAINTEXT and unauthenticated; local demos only"
        );
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    let mut registry = Registry::default();
    telemetry.register(&mut registry);
    let sub_metrics = Arc::new(SubscriberMetrics::register(&mut registry, "kubeproxy"));
    let metrics = Arc::new(ProxyMetrics::register(&mut registry));
    meshlite_runtime::admin::ProcessCollector::register(&mut registry);
    let readiness = Readiness::new();
    let ready_block = readiness.block("rules-applied");
    let health = ProxyHealth::new(cfg.sync_period * 2);

    let hc = HealthCheckServers::new(cfg.health_check_address, health.clone());
    // Checks the kernel before anything listens, so a node without what the mode
    // needs fails at once, naming it.
    let backend = AnyBackend::start(&cfg).await?;
    let proxier = Proxier::new(
        SyncConfig {
            node_name: cfg.node_name.clone(),
            families: cfg.families().to_vec(),
            sync_period: cfg.sync_period,
            min_sync_period: cfg.min_sync_period,
            canary_period: cfg.canary_period,
            needs_pod_cidrs: cfg.detect_local().needs_node_cidrs(),
        },
        backend,
        health.clone(),
        metrics,
        Some(hc),
    );

    let tls = (!cfg.insecure).then(|| ClientTls {
        ca: cfg.ca.clone().unwrap_or_default(),
        cert: cfg.cert.clone().unwrap_or_default(),
        key: cfg.key.clone().unwrap_or_default(),
        server_name: cfg.server_name.clone(),
    });
    // The one reconnect backoff every agent uses (800 ms to 30 s, half jittered).
    let backoff = Backoff::default();
    let subscriber = Subscriber::new(
        SubscriberConfig {
            endpoint: cfg.control_plane.clone(),
            node_name: cfg.node_name.clone(),
            role: Role::Node,
            tls,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            backoff,
            max_message_bytes: 64 << 20,
            token_file: cfg.identity_token_file.clone(),
        },
        NodeHandler::new(proxier.clone(), Some(ready_block)),
        sub_metrics,
    );
    let contact = subscriber.status();

    let admin_l = admin::bind("admin", &cfg.admin_listen).await?;
    let healthz_l = admin::bind("healthz", &cfg.healthz_bind_address).await?;
    let addrs = [
        (
            "admin",
            admin_l
                .local_addr()
                .map_err(|source| bind_err(&cfg.admin_listen, source))?,
        ),
        (
            "healthz",
            healthz_l
                .local_addr()
                .map_err(|source| bind_err(&cfg.healthz_bind_address, source))?,
        ),
    ];
    let h = health.clone();
    // kube-proxy's health (queued changes applied in time), plus whether the rules
    // come from a live control plane or are being served static since a disconnect.
    let router = admin::router(
        Arc::new(registry),
        readiness,
        Arc::new(move || {
            let cp = contact.borrow().describe(std::time::SystemTime::now());
            match h.check() {
                Ok(m) => Ok(format!("{m}; {cp}")),
                Err(m) => Err(format!("{m}; {cp}")),
            }
        }),
    );
    if let Some(addr) = &cfg.metrics_bind_address
        && *addr != cfg.admin_listen
    {
        let l = admin::bind("metrics", addr).await?;
        tokio::spawn(admin::serve(l, router.clone(), stopped()));
    }
    tokio::spawn(admin::serve(admin_l, router, stopped()));
    tokio::spawn(admin::serve(healthz_l, health.router(), stopped()));
    if let Some(path) = &cfg.addresses_file {
        admin::write_addresses(path, &addrs).map_err(|source| AppError::AddressesFile {
            path: path.display().to_string(),
            source,
        })?;
    }

    let background = tokio::spawn(proxier.run(Duration::from_secs(1), stopped()));
    info!(node = %cfg.node_name, control_plane = %cfg.control_plane, "node agent started");
    tokio::select! {
        () = subscriber.run(stopped()) => {}
        () = shutdown => {}
    }
    let _ = stop_tx.send(true);
    let _ = background.await;
    info!("stopped; the kernel keeps the last applied rules");
    Ok(())
}

fn bind_err(addr: &str, source: std::io::Error) -> admin::AdminError {
    admin::AdminError::Bind {
        addr: addr.to_string(),
        source,
    }
}
