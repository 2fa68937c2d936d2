//! One address in front of several control-plane replicas, as a Service or a load
//! balancer with health checks is in a cluster: each new connection goes to the
//! first replica (in the order given) that accepts it, and lives as long as both
//! sides do. When a replica dies its connections close, and the agents' reconnects
//! reach the next one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A running front. Stops serving (and cuts its connections) when dropped.
#[derive(Debug)]
pub struct Front {
    pub addr: SocketAddr,
    /// Connections forwarded to each backend, in backend order.
    pub forwarded: Arc<Vec<AtomicU64>>,
    accept: JoinHandle<()>,
}

impl Front {
    /// Listens on `listen` and forwards to `backends`. Runs on the current runtime
    /// (spawn it inside a namespace's runtime to serve there).
    ///
    /// # Errors
    /// `listen` cannot be bound.
    pub async fn start(listen: SocketAddr, backends: Vec<SocketAddr>) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let forwarded: Arc<Vec<AtomicU64>> =
            Arc::new(backends.iter().map(|_| AtomicU64::new(0)).collect());
        let counts = forwarded.clone();
        let accept = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                let backends = backends.clone();
                let counts = counts.clone();
                conns.spawn(async move {
                    for (i, b) in backends.iter().enumerate() {
                        if let Ok(mut upstream) = TcpStream::connect(b).await {
                            counts[i].fetch_add(1, Ordering::Relaxed);
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                            return;
                        }
                    }
                    // No replica up: the client sees the connection close.
                });
                // Reap finished connections as we go.
                while conns.try_join_next().is_some() {}
            }
        });
        Ok(Self {
            addr,
            forwarded,
            accept,
        })
    }

    /// Connections forwarded to backend `i` so far.
    pub fn forwarded_to(&self, i: usize) -> u64 {
        self.forwarded
            .get(i)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        // Aborting the accept task drops its JoinSet, which aborts every connection.
        self.accept.abort();
    }
}
