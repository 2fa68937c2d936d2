//! The DNS wire side, on hickory (pinned to 0.26.3; its types stay in this module):
//! the UDP and TCP server, the request handler and the upstream forwarder.
//!
//! - [`DnsServer`] binds TCP (hickory's `Server`) and `--udp-workers` UDP sockets
//!   on one address (`SO_REUSEPORT`: the kernel spreads clients over the sockets),
//!   each served by a thread of its own.
//! - [`DnsHandler`] answers cluster names from the [`ZoneCell`](crate::zone::ZoneCell) and forwards the
//!   rest through the [`Forwarder`] (hickory-resolver plus our TTL cache).
//! - [`answer_bytes`] runs the handler on raw request bytes in-process: for tests,
//!   the fuzz target and the benchmark.
//!
//! Truncation: over UDP, hickory encodes at most the client's limit (512 bytes
//! without EDNS, else its EDNS size capped by `--max-udp-payload`) and sets TC when
//! records did not fit; the client retries over TCP, where the limit is 64 KiB.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
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
use tokio::net::TcpListener;
use tracing::info;

use crate::metrics::{Answered, Family4or6, Refusal, Source};

mod fast;
mod forward;
mod handler;
mod udp;

pub use forward::{ForwardConfig, Forwarder, parse_resolv_conf};
pub use handler::DnsHandler;
use udp::UdpWorker;

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
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServerConfig {
    /// UDP and TCP address (`:0` picks one free port for both).
    pub listen: SocketAddr,
    /// Largest EDNS UDP payload honoured.
    pub max_udp_payload: u16,
    /// Idle TCP connections are closed after this long.
    #[serde(serialize_with = "meshlite_runtime::process::args::serialize_duration")]
    pub tcp_idle_timeout: Duration,
    /// UDP sockets (`SO_REUSEPORT`), each with a thread of its own.
    pub udp_workers: usize,
}

/// A bound DNS server, not yet running.
pub struct DnsServer {
    /// hickory's server, for TCP.
    server: Server<DnsHandler>,
    /// One socket per UDP worker, all on `local`: see [`serve_udp`].
    udp: Vec<std::net::UdpSocket>,
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
    /// Binds TCP and `config.udp_workers` UDP sockets on the same address and port.
    ///
    /// # Errors
    /// When a socket cannot be bound.
    pub async fn bind(config: &ServerConfig, handler: DnsHandler) -> Result<Self> {
        let (udp, tcp) = bind_sockets(config.listen, config.udp_workers.max(1))?;
        let local = udp
            .first()
            .ok_or_else(|| Error::Serve("no UDP socket".into()))?
            .local_addr()
            .map_err(|source| Error::Bind {
                proto: "udp",
                addr: config.listen,
                source,
            })?;
        let mut server = Server::new(handler.clone());
        server.register_listener(tcp, config.tcp_idle_timeout, 64);
        info!(%local, udp_workers = udp.len(), "dns listening (udp+tcp)");
        Ok(Self {
            server,
            udp,
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
        let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
        let runtime = tokio::runtime::Handle::current();
        for (i, socket) in std::mem::take(&mut self.udp).into_iter().enumerate() {
            let worker = UdpWorker {
                id: u32::try_from(i).unwrap_or(u32::MAX),
                socket: Arc::new(socket),
                handler: Arc::new(self.handler.clone()),
                stop: stop.0.clone(),
                runtime: runtime.clone(),
            };
            std::thread::Builder::new()
                .name(format!("dns-udp-{i}"))
                .spawn(move || worker.run())
                .map_err(|source| Error::Bind {
                    proto: "udp worker thread",
                    addr: self.local,
                    source,
                })?;
        }
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

/// Each UDP socket's receive buffer: deep enough to hold a backlog of requests
/// while its worker is preempted (about 2k typical datagrams) instead of dropping
/// them. Beyond `net.core.rmem_max` only with `CAP_NET_ADMIN` (`SO_RCVBUFFORCE`);
/// otherwise the kernel caps it there.
const UDP_RECV_BUFFER: usize = 4 << 20;

/// Stops the UDP workers when the server stops (within one receive timeout).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// hickory's `sanitize_src_address`, which our UDP loop replaces: no answer to port
/// 0, to an unspecified or to the broadcast address (each would reflect traffic
/// somewhere no client listens).
pub fn refusal(src: SocketAddr) -> Option<Refusal> {
    if src.port() == 0 {
        return Some(Refusal::port_zero);
    }
    match src.ip().to_canonical() {
        IpAddr::V4(ip) if ip.is_broadcast() => Some(Refusal::broadcast),
        ip if ip.is_unspecified() => Some(Refusal::unspecified),
        _ => None,
    }
}

/// The UDP sockets (`SO_REUSEPORT`) and the TCP listener on one port. With port 0,
/// the first UDP socket picks the port and the rest follow (retrying when another
/// process holds it for TCP).
fn bind_sockets(
    addr: SocketAddr,
    workers: usize,
) -> Result<(Vec<std::net::UdpSocket>, TcpListener)> {
    let udp_err = |source| Error::Bind {
        proto: "udp",
        addr,
        source,
    };
    let mut last = None;
    for _ in 0..16 {
        let first = reuseport_udp(addr).map_err(udp_err)?;
        let bound = first.local_addr().map_err(udp_err)?;
        let tcp = match reuseaddr_tcp(bound) {
            Ok(tcp) => tcp,
            Err(source) if addr.port() == 0 => {
                last = Some(source);
                continue;
            }
            Err(source) => {
                return Err(Error::Bind {
                    proto: "tcp",
                    addr,
                    source,
                });
            }
        };
        let tcp_err = |source| Error::Bind {
            proto: "tcp",
            addr,
            source,
        };
        tcp.set_nonblocking(true).map_err(tcp_err)?;
        let tcp = TcpListener::from_std(tcp).map_err(tcp_err)?;
        let mut udp = vec![first];
        for _ in 1..workers {
            udp.push(reuseport_udp(bound).map_err(udp_err)?);
        }
        return Ok((udp, tcp));
    }
    Err(Error::Bind {
        proto: "tcp",
        addr,
        source: last.unwrap_or_else(|| std::io::Error::other("no free port")),
    })
}

/// A TCP listener with `SO_REUSEADDR` (a restart binds despite TIME_WAIT), as
/// tokio's `bind` makes it.
fn reuseaddr_tcp(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// A blocking UDP socket with `SO_REUSEPORT`, bound to `addr`.
fn reuseport_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        // `[::]` takes IPv4 too, as a plain bind would on Linux by default.
        socket.set_only_v6(false)?;
    }
    use nix::sys::socket::{setsockopt, sockopt};
    if setsockopt(&socket, sockopt::RcvBufForce, &UDP_RECV_BUFFER).is_err()
        && let Err(e) = socket.set_recv_buffer_size(UDP_RECV_BUFFER)
    {
        tracing::debug!(error = %e, "udp receive buffer size");
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
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

/// [`answer_bytes`] for an owned request from `src`: over UDP the fast path first
/// (as the UDP workers answer), then the general one.
async fn answer_from(
    handler: &DnsHandler,
    bytes: Vec<u8>,
    src: SocketAddr,
    transport: Transport,
) -> Option<Vec<u8>> {
    if transport == Transport::Udp {
        let started = std::time::Instant::now();
        let mut out = Vec::with_capacity(512);
        let zone = handler.zone();
        if let Some(a) = fast::answer(&zone, &bytes, handler.max_udp_payload(), &mut out) {
            handler.metrics().request(&Answered {
                qtype: a.qtype,
                rcode: a.rcode,
                source: Source::Zone,
                elapsed: started.elapsed(),
                transport: crate::metrics::Transport::udp,
                family: Family4or6::from(src),
                request_bytes: bytes.len(),
                response_bytes: Some(out.len()),
                truncated: false,
            });
            return Some(out);
        }
    }
    answer_general(handler, bytes, src, transport).await
}

/// The general path: hickory parses the request, [`DnsHandler`] answers it (zone
/// lookup, forwarding, errors) and hickory encodes the response.
async fn answer_general(
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
    let out = capture.out.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let (Some(bytes), Transport::Udp) = (&out, transport) {
        // Over TCP the handler measured it already.
        handler
            .metrics()
            .response_size(crate::metrics::Transport::udp, bytes.len());
    }
    out
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
