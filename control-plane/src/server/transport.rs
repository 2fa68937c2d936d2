//! Serving the gRPC service over rustls mTLS (or plaintext with `--insecure`).
//!
//! TLS is terminated here rather than by tonic so that every connection uses the
//! current certificate files (rotation without restart) and failed handshakes are
//! counted.

use std::sync::Arc;
use std::time::Duration;

use meshlite_runtime::tls::ReloadingServerConfig;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::Server;
use tracing::{debug, warn};

use crate::metrics::Metrics;
use meshlite_proto::server::mesh_server::MeshServer;

use super::MeshService;

/// Serves until `shutdown` resolves.
///
/// # Errors
/// The server fails (not per-connection errors, which are logged and counted).
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<ReloadingServerConfig>>,
    service: MeshServer<MeshService>,
    max_concurrent_streams: u32,
    metrics: Metrics,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let mut server = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .max_concurrent_streams(Some(max_concurrent_streams))
        .tcp_nodelay(true);
    let router = server.add_service(service);
    match tls {
        None => {
            router
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
                .await
        }
        Some(tls) => {
            let (tx, rx) = mpsc::channel(256);
            tokio::spawn(accept_loop(listener, tls, tx, metrics));
            router
                .serve_with_incoming_shutdown(ReceiverStream::new(rx), shutdown)
                .await
        }
    }
}

type TlsResult = Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>, std::io::Error>;

async fn accept_loop(
    listener: TcpListener,
    tls: Arc<ReloadingServerConfig>,
    tx: mpsc::Sender<TlsResult>,
    metrics: Metrics,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = TlsAcceptor::from(tls.current());
        let tx = tx.clone();
        let metrics = metrics.clone();
        // Handshakes run concurrently so one slow client cannot stall the others.
        tokio::spawn(async move {
            match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let _ = tx.send(Ok(stream)).await;
                }
                Ok(Err(e)) => {
                    metrics.tls_handshake_failures.inc();
                    warn!(%peer, error = %e, "TLS handshake failed");
                }
                Err(_) => {
                    metrics.tls_handshake_failures.inc();
                    debug!(%peer, "TLS handshake timed out");
                }
            }
        });
    }
}
