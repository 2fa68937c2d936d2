//! The DNS wire side, on hickory (pinned to 0.26.3; its types stay in this module):
//! the UDP and TCP server, the request handler and the upstream forwarder.
//!
//! - [`DnsServer`] binds UDP and TCP on one address and runs hickory's `Server`.
//! - [`DnsHandler`] answers cluster names from the [`ZoneCell`](crate::zone::ZoneCell) and forwards the
//!   rest through the [`Forwarder`] (hickory-resolver plus our TTL cache).
//! - [`answer_bytes`] runs the handler on raw request bytes in-process: for tests,
//!   the fuzz target and the benchmark.
//!
//! Truncation: over UDP, hickory encodes at most the client's limit (512 bytes
//! without EDNS, else its EDNS size capped by `--max-udp-payload`) and sets TC when
//! records did not fit; the client retries over TCP, where the limit is 64 KiB.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::rr::Record;
use hickory_proto::serialize::binary::BinEncoder;
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioTime;
use hickory_resolver::net::xfer::Protocol;
use hickory_server::Server;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponse;
use tokio::net::{TcpListener, UdpSocket};
use tracing::info;

mod forward;
mod handler;

pub use forward::{ForwardConfig, Forwarder, parse_resolv_conf};
pub use handler::DnsHandler;

/// DNS server failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bind {proto} {addr}: {source}")]
    Bind {
        proto: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("no upstream resolver configured")]
    NoUpstream,
    #[error("upstream resolver: {0}")]
    Resolver(String),
    #[error("dns server: {0}")]
    Serve(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Listening settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// UDP and TCP address (`:0` picks one free port for both).
    pub listen: SocketAddr,
    /// Largest EDNS UDP payload honoured.
    pub max_udp_payload: u16,
    /// Idle TCP connections are closed after this long.
    pub tcp_idle_timeout: Duration,
}

/// A bound DNS server, not yet running.
pub struct DnsServer {
    /// hickory's server, for TCP.
    server: Server<DnsHandler>,
    /// Our own UDP loop: see [`serve_udp`].
    udp: Arc<UdpSocket>,
    handler: DnsHandler,
    local: SocketAddr,
}

/// Transport of a request handed to [`answer_bytes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

// === impl DnsServer ===

impl DnsServer {
    /// Binds UDP and TCP on the same address and port.
    ///
    /// # Errors
    /// When either socket cannot be bound.
    pub async fn bind(config: &ServerConfig, handler: DnsHandler) -> Result<Self> {
        let (udp, tcp) = bind_pair(config.listen).await?;
        let local = udp.local_addr().map_err(|source| Error::Bind {
            proto: "udp",
            addr: config.listen,
            source,
        })?;
        let mut server = Server::new(handler.clone());
        server.register_listener(tcp, config.tcp_idle_timeout, 64);
        info!(%local, "dns listening (udp+tcp)");
        Ok(Self {
            server,
            udp: Arc::new(udp),
            handler,
            local,
        })
    }

    /// The bound address (UDP and TCP share it).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Serves until `shutdown` resolves, then stops gracefully.
    ///
    /// # Errors
    /// When a socket fails for good.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
        let udp: Vec<_> = (0..workers)
            .map(|_| tokio::spawn(serve_udp(self.udp.clone(), self.handler.clone())))
            .collect();
        let _abort = AbortOnDrop(udp);
        tokio::select! {
            r = self.server.block_until_done() => r.map_err(|e| Error::Serve(e.to_string())),
            () = shutdown => self
                .server
                .shutdown_gracefully()
                .await
                .map_err(|e| Error::Serve(e.to_string())),
        }
    }
}

impl std::fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsServer")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

/// Aborts the UDP workers when the server stops.
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// One UDP worker: receive, answer, send, in a loop on a shared socket.
///
/// hickory's server spawns a task per datagram and hands the answer back through a
/// channel; for cluster names the answer is ready at once (a zone lookup), so here
/// the handler's future is polled once in place and only a request that must wait
/// (one forwarded upstream) gets a task of its own.
async fn serve_udp(socket: Arc<UdpSocket>, handler: DnsHandler) {
    use futures::FutureExt;
    let handler = Arc::new(handler);
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                // ICMP errors from earlier sends surface here on Linux; keep serving.
                tracing::debug!(error = %e, "udp recv");
                continue;
            }
        };
        let request = buf[..n].to_vec();
        let h = handler.clone();
        let mut answer =
            Box::pin(async move { answer_from(&h, request, peer, Transport::Udp).await });
        match (&mut answer).now_or_never() {
            Some(Some(response)) => {
                let _ = socket.send_to(&response, peer).await;
            }
            Some(None) => {}
            None => {
                let socket = socket.clone();
                tokio::spawn(async move {
                    if let Some(response) = answer.await {
                        let _ = socket.send_to(&response, peer).await;
                    }
                });
            }
        }
    }
}

/// UDP first; with port 0, TCP then takes the same port (retrying if another
/// process holds it for TCP).
async fn bind_pair(addr: SocketAddr) -> Result<(UdpSocket, TcpListener)> {
    let mut last = None;
    for _ in 0..16 {
        let udp = UdpSocket::bind(addr).await.map_err(|source| Error::Bind {
            proto: "udp",
            addr,
            source,
        })?;
        let bound = udp.local_addr().map_err(|source| Error::Bind {
            proto: "udp",
            addr,
            source,
        })?;
        match TcpListener::bind(bound).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(source) if addr.port() == 0 => last = Some(source),
            Err(source) => {
                return Err(Error::Bind {
                    proto: "tcp",
                    addr,
                    source,
                });
            }
        }
    }
    Err(Error::Bind {
        proto: "tcp",
        addr,
        source: last.unwrap_or_else(|| std::io::Error::other("no free port")),
    })
}

/// Runs the handler on one raw request, as the server would, and returns the
/// encoded response (`None` when the server would send nothing: fewer than 12
/// bytes, or a response message). A request that does not parse past its header
/// gets FORMERR, as hickory's server answers it.
pub async fn answer_bytes(
    handler: &DnsHandler,
    bytes: &[u8],
    transport: Transport,
) -> Option<Vec<u8>> {
    answer_from(
        handler,
        bytes.to_vec(),
        ([127, 0, 0, 1], 5353).into(),
        transport,
    )
    .await
}

/// [`answer_bytes`] for an owned request from `src`.
async fn answer_from(
    handler: &DnsHandler,
    bytes: Vec<u8>,
    src: SocketAddr,
    transport: Transport,
) -> Option<Vec<u8>> {
    let protocol = match transport {
        Transport::Udp => Protocol::Udp,
        Transport::Tcp => Protocol::Tcp,
    };
    let capture = Capture {
        out: Arc::default(),
        tcp: transport == Transport::Tcp,
    };
    let header_only = bytes.get(..12).map(<[u8]>::to_vec);
    match Request::from_bytes(bytes, src, protocol) {
        Ok(request) => {
            if request.metadata.message_type == hickory_proto::op::MessageType::Response {
                return None;
            }
            handler
                .handle_request::<_, TokioTime>(&request, capture.clone())
                .await;
        }
        Err(_) => return header_only.and_then(|h| formerr(&h)),
    }
    capture.out.lock().unwrap_or_else(|p| p.into_inner()).take()
}

/// Checks a response produced by [`answer_bytes`] against its request: it decodes,
/// is a response, echoes the id and fits the transport's limit. For fuzzing.
///
/// # Errors
/// A description of what is wrong.
pub fn check_response(
    request: &[u8],
    response: &[u8],
    transport: Transport,
) -> std::result::Result<(), String> {
    let m = hickory_proto::op::Message::from_vec(response)
        .map_err(|e| format!("response does not decode: {e}"))?;
    if m.metadata.message_type != hickory_proto::op::MessageType::Response {
        return Err("QR bit not set".into());
    }
    let id = request
        .get(..2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .ok_or("request shorter than an id")?;
    if m.metadata.id != id {
        return Err(format!("id {} for request id {id}", m.metadata.id));
    }
    if transport == Transport::Udp && response.len() > usize::from(u16::MAX / 2) {
        return Err(format!("{} bytes over UDP", response.len()));
    }
    Ok(())
}

/// FORMERR for a request whose header parses but whose body does not.
fn formerr(bytes: &[u8]) -> Option<Vec<u8>> {
    use hickory_proto::op::{Header, Metadata, ResponseCode};
    use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncodable};
    let header = Header::read(&mut BinDecoder::new(bytes)).ok()?;
    if header.metadata.message_type == hickory_proto::op::MessageType::Response {
        return None;
    }
    let mut metadata = Metadata::response_from_request(&header.metadata);
    metadata.response_code = ResponseCode::FormErr;
    let out = Header {
        metadata,
        counts: Default::default(),
    };
    let mut buf = Vec::with_capacity(12);
    out.emit(&mut BinEncoder::new(&mut buf)).ok()?;
    Some(buf)
}

/// A response handler that encodes into memory with the server's size limits.
#[derive(Clone)]
struct Capture {
    out: Arc<Mutex<Option<Vec<u8>>>>,
    tcp: bool,
}

#[async_trait::async_trait]
impl ResponseHandler for Capture {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        // The same limits as hickory's server: UDP gets the response's EDNS size
        // (512 without EDNS), TCP 64 KiB.
        let max = if self.tcp {
            u16::MAX
        } else {
            response.edns().map_or(512, |e| e.max_payload())
        };
        let mut buf = Vec::with_capacity(512);
        let mut encoder = BinEncoder::new(&mut buf);
        encoder.set_max_size(max);
        let info = response.destructive_emit(&mut encoder)?;
        *self.out.lock().unwrap_or_else(|p| p.into_inner()) = Some(buf);
        Ok(info)
    }
}

#[cfg(test)]
mod tests;
