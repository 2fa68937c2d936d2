//! The wiring: sources, the store and its publisher, the gRPC server, the admin
//! endpoint; [`start`] returns once everything listens.

use std::sync::Arc;
use std::time::Duration;

use meshlite_runtime::admin::{self, Readiness};
use meshlite_runtime::telemetry::Telemetry;
use meshlite_runtime::tls::ReloadingServerConfig;
use prometheus_client::registry::Registry;
use tracing::{info, warn};

use crate::config::Config;
use crate::metrics::{KindLabels, Metrics};
use crate::server::identity::{CertAuthorizer, NodeIdentity, TokenReviewer};
use crate::server::{Agents, AllowAll, MeshService, StreamConfig};
use crate::source::SourceSpec;
use crate::store::{Kind, Store};

/// Failures that stop the control plane.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Tls(#[from] meshlite_runtime::tls::TlsError),
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        path: std::path::PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("kubernetes client configuration: {0}")]
    KubeConfig(#[from] kube::config::InferConfigError),
    #[error("kubernetes client: {0}")]
    Kube(#[from] kube::Error),
    #[error("server task: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("the API watch thread: {0}")]
    WatchThread(#[source] std::io::Error),
    #[error("write {path}: {source}")]
    AddressesFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A running control plane's handles, for in-process tests and harnesses.
#[derive(Clone)]
pub struct Handle {
    pub store: Arc<Store>,
    pub agents: Agents,
    pub metrics: Metrics,
    pub grpc_addr: std::net::SocketAddr,
    pub admin_addr: std::net::SocketAddr,
}

/// Starts everything and returns once listening; the servers run until `shutdown`
/// resolves.
///
/// # Errors
/// Invalid configuration, unreadable TLS files, a port that cannot be bound, or no
/// Kubernetes client configuration.
pub async fn start(
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(Handle, tokio::task::JoinHandle<Result<(), Error>>), Error> {
    start_with(config, Telemetry::default(), shutdown).await
}

/// [`start`], exporting the telemetry pipeline's counters too.
///
/// # Errors
/// As [`start`].
pub async fn start_with(
    config: Config,
    telemetry: Telemetry,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(Handle, tokio::task::JoinHandle<Result<(), Error>>), Error> {
    let tls = config.tls.clone();
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    meshlite_runtime::admin::ProcessCollector::register(&mut registry);
    telemetry.register(&mut registry);
    let store = Arc::new(Store::new(config.tombstone_retention, Kind::ALL));
    tokio::spawn(store.clone().run_publisher(config.debounce));

    let opts = meshlite_k8s::Options {
        service_proxy_name: config.service_proxy_name.clone(),
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    match &config.source {
        SourceSpec::File(dir) => {
            let src = crate::source::file::FileSource::new(
                dir.clone(),
                config.file_poll_interval,
                opts,
                store.clone(),
                metrics.clone(),
            );
            tokio::spawn(src.run());
        }
        SourceSpec::Kube => {
            // The client is made on the watch thread too: its request dispatcher and
            // its connections' tasks are spawned where it is made.
            let watches = watch_thread(stop_rx.clone()).map_err(Error::WatchThread)?;
            let kcfg = config.clone();
            let client = watches
                .spawn(async move { kube_client(&kcfg).await })
                .await??;
            let _on_it = watches.enter();
            crate::source::kube::spawn(client, opts, store.clone(), metrics.clone());
        }
    }

    let readiness = Readiness::new();
    let synced = readiness.block("watches-synced");
    {
        let store = store.clone();
        tokio::spawn(async move {
            store.wait_ready().await;
            info!(version = store.version(), "all sources synced; serving");
            synced.release();
        });
    }
    tokio::spawn(refresh_gauges(store.clone(), metrics.clone()));
    {
        let (mut published, convergence) = (store.subscribe(), metrics.convergence.clone());
        tokio::spawn(async move {
            while published.changed().await.is_ok() {
                let v = *published.borrow_and_update();
                convergence.published(v, std::time::SystemTime::now());
            }
        });
    }

    let agents = Agents::default();
    let expiry = meshlite_runtime::tls::CertExpiry::register(&mut registry);
    let (tls, authorizer): (_, Box<dyn crate::server::Authorizer>) = match tls {
        Some(t) => {
            let reviewer = match config.node_identity {
                NodeIdentity::Token => Some(TokenReviewer::new(
                    kube_client(&config).await?,
                    config.node_agent_service_account.clone(),
                )),
                NodeIdentity::SharedCertificate => {
                    warn!(
                        "--node-identity shared-certificate: any node agent certificate may subscribe as any node"
                    );
                    None
                }
                NodeIdentity::Certificate => None,
            };
            (
                Some(Arc::new(ReloadingServerConfig::new(t)?.with_expiry(expiry))),
                Box::new(CertAuthorizer::new(config.node_identity, reviewer)),
            )
        }
        None => {
            warn!(
                "--insecure: agents connect over PLAINTEXT gRPC without authentication; use only for local demos"
            );
            (None, Box::new(AllowAll))
        }
    };
    let grpc = admin::bind("gRPC", &config.listen).await?;
    let admin_listener = admin::bind("admin", &config.admin_listen).await?;
    let grpc_addr = grpc
        .local_addr()
        .map_err(|source| admin::AdminError::Bind {
            addr: config.listen.clone(),
            source,
        })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| admin::AdminError::Bind {
            addr: config.admin_listen.clone(),
            source,
        })?;

    let service = MeshService::new(
        store.clone(),
        StreamConfig {
            chunk_bytes: config.chunk_bytes,
            send_timeout: config.send_timeout,
            max_streams: config.max_streams,
            stream_rate: config.stream_rate,
            stream_burst: config.stream_burst,
            max_large_in_flight: config.max_full_syncs.max(1),
            update_rate: config.update_rate,
            ..StreamConfig::default()
        },
        metrics.clone(),
        agents.clone(),
        authorizer,
    )
    .into_server(config.max_message_bytes);

    let health_store = store.clone();
    let health: admin::HealthCheck = Arc::new(move || {
        if health_store.is_ready() {
            Ok(format!("ok: version {}", health_store.version()))
        } else {
            // Not synced yet is not unhealthy: liveness stays up while lists run.
            Ok(format!(
                "ok: waiting for {:?}",
                health_store.pending_kinds()
            ))
        }
    });
    let router = admin::router(Arc::new(registry), readiness, health)
        .merge(crate::status::router(agents.clone(), store.clone()))
        .merge(crate::explain::router(
            agents.clone(),
            store.clone(),
            explain_history(&store),
        ));

    if let Some(path) = &config.addresses_file {
        admin::write_addresses(path, &[("grpc", grpc_addr), ("admin", admin_addr)]).map_err(
            |source| Error::AddressesFile {
                path: path.clone(),
                source,
            },
        )?;
    }

    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    tokio::spawn(admin::serve(admin_listener, router, wait(stop_rx.clone())));
    let grpc_metrics = metrics.clone();
    let max_streams = config.max_concurrent_streams;
    let task = tokio::spawn(async move {
        crate::server::transport::serve(
            grpc,
            tls,
            service,
            max_streams,
            grpc_metrics,
            wait(stop_rx),
        )
        .await
        .map_err(Error::from)
    });
    Ok((
        Handle {
            store,
            agents,
            metrics,
            grpc_addr,
            admin_addr,
        },
        task,
    ))
}

/// A thread of its own for the API watches, until `stop`: under a heavy fan-out
/// the agents' stream tasks on the main runtime would otherwise delay reading the
/// watches, and every change with them (measured: at 5,000 agents and 500 changes/s
/// the control plane had read ~17,600 of ~27,900 events 57 s in). The watches need
/// little CPU; on their own thread the kernel's scheduler gives it to them when an
/// event arrives.
fn watch_thread(
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<tokio::runtime::Handle> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = rt.handle().clone();
    std::thread::Builder::new()
        .name("meshlite-watch".into())
        .spawn(move || {
            rt.block_on(async move {
                let _ = stop.wait_for(|s| *s).await;
            });
        })?;
    Ok(handle)
}

async fn kube_client(config: &Config) -> Result<kube::Client, Error> {
    let kcfg = match &config.kubeconfig {
        Some(path) => {
            let bad = |source| Error::Kubeconfig {
                path: path.clone(),
                source,
            };
            let kc = kube::config::Kubeconfig::read_from(path).map_err(bad)?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(bad)?
        }
        None => kube::Config::infer().await?,
    };
    info!(cluster = %kcfg.cluster_url, "kubernetes API");
    Ok(kube::Client::try_from(kcfg)?)
}

async fn refresh_gauges(store: Arc<Store>, metrics: Metrics) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        for k in Kind::ALL {
            metrics
                .resources
                .get_or_create(&KindLabels { kind: k.into() })
                .set(i64::try_from(store.count(k)).unwrap_or(i64::MAX));
        }
        metrics
            .tombstones
            .set(i64::try_from(store.tombstones()).unwrap_or(i64::MAX));
        metrics
            .version
            .set(i64::try_from(store.version()).unwrap_or(i64::MAX));
        metrics
            .convergence
            .refresh_lag(std::time::SystemTime::now());
    }
}

/// The explain endpoint's history of service endpoints, recorded after every
/// publish (so a node that falls behind can be told what it still has).
fn explain_history(store: &Arc<Store>) -> crate::explain::History {
    let history = crate::explain::History::default();
    let (h, store) = (history.clone(), store.clone());
    let mut published = store.subscribe();
    tokio::spawn(async move {
        loop {
            h.record(&store);
            if published.changed().await.is_err() {
                break;
            }
        }
    });
    history
}
