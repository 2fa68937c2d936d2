//! kube-proxy-shaped watchers for the per-node-watch comparison: per simulated
//! node, one HTTP/2 connection to the API stand-in (client-go multiplexes a
//! process's watches over one connection) carrying three watch streams, as
//! kube-proxy's informers open them: all Services, all EndpointSlices, and its own
//! Node (`fieldSelector=metadata.name=<node>`). They start at the current
//! resourceVersion (their initial LIST is skipped and its volume computed instead)
//! and only count what arrives: events (lines) and bytes. A real kube-proxy would
//! also decode every event and recompute its rules; none of that is charged here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;

/// Totals over every watcher.
#[derive(Debug, Default)]
pub struct WatcherStats {
    pub streams_open: AtomicU64,
    pub events: AtomicU64,
    pub bytes: AtomicU64,
    pub errors: AtomicU64,
    pub first_error: std::sync::Mutex<Option<String>>,
}

/// The running watchers.
#[derive(Debug)]
pub struct NodeWatchers {
    pub stats: Arc<WatcherStats>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl NodeWatchers {
    /// Starts one watcher per node name, at most `concurrency` connecting at once.
    pub fn start(addr: SocketAddr, nodes: Vec<String>, rv: u64, concurrency: usize) -> Self {
        let stats = Arc::new(WatcherStats::default());
        let (stop, _) = watch::channel(false);
        let gate = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
        let tasks = nodes
            .into_iter()
            .map(|node| {
                let (stats, gate, stop) = (stats.clone(), gate.clone(), stop.subscribe());
                tokio::spawn(async move {
                    if let Err(e) = watch_node(addr, &node, rv, &stats, &gate, stop).await {
                        stats.errors.fetch_add(1, Ordering::Relaxed);
                        let mut first = stats.first_error.lock().unwrap_or_else(|p| p.into_inner());
                        first.get_or_insert_with(|| format!("{node}: {e:#}"));
                    }
                })
            })
            .collect();
        Self { stats, stop, tasks }
    }

    /// Closes every watch and waits for the tasks.
    pub async fn shutdown(self) {
        self.stop.send_replace(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
}

async fn watch_node(
    addr: SocketAddr,
    node: &str,
    rv: u64,
    stats: &Arc<WatcherStats>,
    gate: &tokio::sync::Semaphore,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    // Held until the three watches answered: the stand-in's accept backlog must
    // not overflow while thousands of watchers connect.
    let permit = gate.acquire().await?;
    let (client, conn) = {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        h2::client::handshake(tcp).await?
    };
    let conn_task = tokio::spawn(async move {
        let _ = conn.await;
    });
    let common =
        format!("watch=1&resourceVersion={rv}&allowWatchBookmarks=true&timeoutSeconds=3600");
    let paths = [
        format!("/api/v1/services?{common}"),
        format!("/apis/discovery.k8s.io/v1/endpointslices?{common}"),
        format!("/api/v1/nodes?fieldSelector=metadata.name%3D{node}&{common}"),
    ];
    let mut streams = Vec::new();
    let mut answered = Vec::new();
    for path in paths {
        let mut client = client.clone().ready().await?;
        let req = http::Request::get(format!("http://{addr}{path}"))
            .header("accept", "application/json")
            .body(())?;
        let (resp, _) = client.send_request(req, true)?;
        let stats = stats.clone();
        let (answer, answered_rx) = tokio::sync::oneshot::channel::<()>();
        answered.push(answered_rx);
        streams.push(tokio::spawn(async move {
            let resp = resp.await;
            drop(answer);
            let resp = match resp {
                Ok(r) => r,
                Err(e) => {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    let mut first = stats.first_error.lock().unwrap_or_else(|p| p.into_inner());
                    first.get_or_insert_with(|| format!("response: {e}"));
                    return;
                }
            };
            stats.streams_open.fetch_add(1, Ordering::Relaxed);
            let mut body = resp.into_body();
            while let Some(chunk) = body.data().await {
                let Ok(chunk): Result<Bytes, _> = chunk else {
                    break;
                };
                let lines = chunk.iter().filter(|b| **b == b'\n').count();
                stats.events.fetch_add(lines as u64, Ordering::Relaxed);
                stats.bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                let _ = body.flow_control().release_capacity(chunk.len());
            }
            stats.streams_open.fetch_sub(1, Ordering::Relaxed);
        }));
    }
    for a in answered {
        let _ = tokio::time::timeout(Duration::from_secs(30), a).await;
    }
    drop(permit);
    let _ = stop.wait_for(|s| *s).await;
    for s in streams {
        s.abort();
    }
    conn_task.abort();
    Ok(())
}
