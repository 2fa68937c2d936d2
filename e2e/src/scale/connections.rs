//! `--phases connections`: what one idle agent connection costs the control plane,
//! layer by layer.
//!
//! Before any agent subscribes, the harness opens `--agents` connections three
//! times, each time one layer further, and reads the control plane's RSS with them
//! open: plain TCP (the server has accepted and is waiting for the TLS ClientHello),
//! then TLS with the client certificate (the server waits for the HTTP/2 preface),
//! then TLS and an HTTP/2 connection with no stream. Between the layers it closes
//! everything and waits for the RSS to settle (jemalloc returns freed pages after a
//! second). The cost of a subscribed, idle stream on top is the storm phase's
//! figure: RSS after every stream was replaced by a resume that sent 34 bytes.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use meshlite_runtime::tls::{ClientTls, load_certs, load_key};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_rustls::TlsConnector;

use super::procstat;
use super::report::ConnectionsReport;

/// Connections opened at once.
const CONCURRENCY: usize = 64;
/// Wait with the connections open (the server's accept tasks run) or closed (the
/// allocator returns pages) before reading the RSS.
const SETTLE: Duration = Duration::from_secs(3);

/// Measures the three layers with `n` connections each.
pub async fn measure(
    addr: SocketAddr,
    files: &ClientTls,
    n: usize,
    cp_pid: Option<u32>,
) -> Result<ConnectionsReport> {
    let tls = Arc::new(client_config(files)?);
    let rss = || procstat::sample(cp_pid).map(|s| s.rss_mib()).unwrap_or(0.0);
    tokio::time::sleep(SETTLE).await;
    let base_rss_mib = rss();
    let tcp_kib = layer(
        n,
        &rss,
        |_| async move { Ok(TcpStream::connect(addr).await?) },
    )
    .await?;
    let tls_kib = layer(n, &rss, |_| tls_connect(addr, tls.clone())).await?;
    let h2_kib = layer(n, &rss, |_| h2_connect(addr, tls.clone())).await?;
    Ok(ConnectionsReport {
        connections: n,
        base_rss_mib,
        end_rss_mib: rss(),
        tcp_kib,
        tls_kib,
        h2_kib,
    })
}

/// Opens `n` connections with `connect`, returns the RSS they add per connection
/// in KiB, closes them and waits for the RSS to settle.
async fn layer<T, F, Fut>(n: usize, rss: &impl Fn() -> f64, connect: F) -> Result<f64>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<T>> + Send + 'static,
{
    let base = rss();
    let open = bounded_join(n, CONCURRENCY, connect).await?;
    tokio::time::sleep(SETTLE).await;
    let kib = (rss() - base) * 1024.0 / n.max(1) as f64;
    drop(open);
    tokio::time::sleep(SETTLE).await;
    Ok(kib)
}

fn client_config(files: &ClientTls) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(&files.ca)? {
        roots.add(c)?;
    }
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(load_certs(&files.cert)?, load_key(&files.key)?)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

async fn tls_connect(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    Ok(TlsConnector::from(cfg).connect(name, tcp).await?)
}

/// An HTTP/2 connection and the task driving it, which closing it stops.
struct H2Conn {
    _send: h2::client::SendRequest<bytes::Bytes>,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for H2Conn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

async fn h2_connect(addr: SocketAddr, cfg: Arc<rustls::ClientConfig>) -> Result<H2Conn> {
    let tls = tls_connect(addr, cfg).await?;
    let (send, conn) = h2::client::handshake(tls)
        .await
        .context("HTTP/2 handshake")?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    // The server has answered the preface once the connection is ready for a request.
    let send = send.ready().await.context("HTTP/2 ready")?;
    Ok(H2Conn {
        _send: send,
        driver,
    })
}

/// Runs `f(i)` for `i` in `0..n`, at most `limit` at once; all results or the first
/// error.
async fn bounded_join<T, F, Fut>(n: usize, limit: usize, f: F) -> Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<T>> + Send + 'static,
{
    let mut set = JoinSet::new();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        if set.len() >= limit
            && let Some(r) = set.join_next().await
        {
            out.push(r??);
        }
        set.spawn(f(i));
    }
    while let Some(r) = set.join_next().await {
        out.push(r??);
    }
    Ok(out)
}
