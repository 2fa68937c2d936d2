//! The UDP workers: one thread per `SO_REUSEPORT` socket, taking datagrams from the
//! kernel in batches (`recvmmsg`) and sending the answers of a batch in one
//! `sendmmsg`.
//!
//! A thread of its own rather than a task: for cluster names the answer is ready at
//! once, so it is computed in place (the fast path, else the handler's future polled
//! once); a blocking receive wakes this thread straight from the kernel, without
//! tokio's I/O driver and scheduler between the datagram and its answer (the
//! driver's wake-ups were the bulk of our p99.9). Only a request that must wait (one
//! forwarded upstream) becomes a task on the runtime, which sends its answer when it
//! comes.
//!
//! Batches: `MSG_WAITFORONE` returns as soon as one datagram is there, with up to
//! [`BATCH`] that are already queued, so a quiet server answers each datagram at
//! once and a backlog (after the thread was preempted) drains with two system calls
//! per batch instead of two per datagram.

use std::io::{IoSlice, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{
    ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg,
};
use tracing::warn;

use super::{DnsHandler, Transport, answer_general, fast, refusal};
use crate::metrics::{Answered, Family4or6, Recorder, Source};
use crate::zone::Zone;

/// Datagrams taken per `recvmmsg` (and answered per `sendmmsg`).
pub(super) const BATCH: usize = 32;

/// Longest request read; the rest of a longer datagram is cut off.
const MAX_REQUEST: usize = 4096;

/// How often a UDP worker blocked in its receive looks at the stop flag.
const UDP_STOP_POLL: Duration = Duration::from_millis(100);

/// One UDP worker: a thread blocked in `recvmmsg` on its own socket.
pub(super) struct UdpWorker {
    pub id: u32,
    pub socket: Arc<std::net::UdpSocket>,
    pub handler: Arc<DnsHandler>,
    pub stop: Arc<AtomicBool>,
    pub runtime: tokio::runtime::Handle,
}

/// The zone a worker answers from, reloaded when the cell's generation moves: one
/// shared read per batch instead of a reference count taken and dropped per
/// datagram.
struct ZoneView {
    generation: u64,
    zone: Arc<Zone>,
}

// === impl UdpWorker ===

impl UdpWorker {
    /// Receive, check the sources, answer, send, until stopped.
    pub fn run(self) {
        // The forwarder's futures may spawn tasks and register I/O on their first
        // poll, which happens here.
        let _enter = self.runtime.enter();
        if let Err(e) = self.socket.set_read_timeout(Some(UDP_STOP_POLL)) {
            warn!(error = %e, "udp worker: cannot set a receive timeout; it will stop only with the process");
        }
        crate::metrics::enter_worker_shard(self.id);
        let received = self.handler.metrics().udp_worker_counter(self.id);
        let mut recorder = self.handler.metrics().recorder();
        let mut view = ZoneView {
            generation: self.handler.zone_generation(),
            zone: self.handler.zone(),
        };
        let fd = self.socket.as_raw_fd();
        let mut bufs = vec![[0u8; MAX_REQUEST]; BATCH];
        let mut outs: Vec<Vec<u8>> = (0..BATCH).map(|_| Vec::with_capacity(1232)).collect();
        let mut recv_headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
        let mut send_headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
        let mut got = [(0usize, None::<SocketAddr>); BATCH];
        let mut replies: Vec<(usize, SockaddrStorage)> = Vec::with_capacity(BATCH);
        while !self.stop.load(Ordering::Relaxed) {
            let count = {
                let mut iovs: Vec<[IoSliceMut<'_>; 1]> =
                    bufs.iter_mut().map(|b| [IoSliceMut::new(b)]).collect();
                match recvmmsg(
                    fd,
                    &mut recv_headers,
                    iovs.iter_mut(),
                    MsgFlags::MSG_WAITFORONE,
                    None,
                ) {
                    Ok(results) => {
                        let mut n = 0;
                        for (slot, msg) in got.iter_mut().zip(results) {
                            *slot = (msg.bytes, msg.address.as_ref().and_then(socket_addr));
                            n += 1;
                        }
                        n
                    }
                    Err(Errno::EAGAIN | Errno::EINTR) => {
                        // Idle: let go of a replaced zone.
                        view.refresh(&self.handler);
                        continue;
                    }
                    Err(e) => {
                        // ICMP errors from earlier sends surface here on Linux; keep serving.
                        tracing::debug!(error = %e, "udp recv");
                        continue;
                    }
                }
            };
            received.inc_by(count as u64);
            let started = Instant::now();
            view.refresh(&self.handler);
            replies.clear();
            for (i, &(n, peer)) in got.iter().enumerate().take(count) {
                let Some(peer) = peer else { continue };
                if let Some(reason) = refusal(peer) {
                    self.handler.metrics().udp_refused(reason);
                    tracing::debug!(%peer, ?reason, "udp request dropped for its source");
                    continue;
                }
                let request = &bufs[i][..n.min(MAX_REQUEST)];
                let out = &mut outs[i];
                // A panic while answering one datagram must not take the worker down.
                let answered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    self.answer(&view.zone, request, peer, out, &mut recorder, started)
                }));
                if let Ok(true) = answered {
                    replies.push((i, SockaddrStorage::from(peer)));
                }
            }
            self.send_all(fd, &mut send_headers, &outs, &replies);
        }
    }

    /// Answers one request into `out`; `false` when there is nothing to send now
    /// (dropped, or answered later by a task).
    fn answer(
        &self,
        zone: &Zone,
        request: &[u8],
        peer: SocketAddr,
        out: &mut Vec<u8>,
        recorder: &mut Recorder<'_>,
        started: Instant,
    ) -> bool {
        use futures::FutureExt;
        if let Some(a) = fast::answer(zone, request, self.handler.max_udp_payload(), out) {
            recorder.request(&Answered {
                qtype: a.qtype,
                rcode: a.rcode,
                source: Source::Zone,
                elapsed: started.elapsed(),
                transport: crate::metrics::Transport::udp,
                family: Family4or6::from(peer),
                request_bytes: request.len(),
                response_bytes: Some(out.len()),
                truncated: false,
            });
            return true;
        }
        let h = self.handler.clone();
        let request = request.to_vec();
        let mut answer =
            Box::pin(async move { answer_general(&h, request, peer, Transport::Udp).await });
        match (&mut answer).now_or_never() {
            Some(Some(response)) => {
                *out = response;
                true
            }
            Some(None) => false,
            None => {
                let socket = self.socket.clone();
                self.runtime.spawn(async move {
                    if let Some(response) = answer.await {
                        send(&socket, &response, peer);
                    }
                });
                false
            }
        }
    }

    /// Sends `outs[i]` to each `(i, peer)` of `replies`, as few `sendmmsg` calls as
    /// the kernel allows; a datagram it refuses is skipped.
    fn send_all(
        &self,
        fd: std::os::fd::RawFd,
        headers: &mut MultiHeaders<SockaddrStorage>,
        outs: &[Vec<u8>],
        replies: &[(usize, SockaddrStorage)],
    ) {
        let mut from = 0;
        while from < replies.len() {
            let rest = &replies[from..];
            let slices: Vec<[IoSlice<'_>; 1]> = rest
                .iter()
                .map(|(i, _)| [IoSlice::new(&outs[*i])])
                .collect();
            let addrs: Vec<Option<SockaddrStorage>> = rest.iter().map(|(_, a)| Some(*a)).collect();
            let cmsgs: [ControlMessage<'_>; 0] = [];
            match sendmmsg(fd, headers, slices.iter(), &addrs, cmsgs, MsgFlags::empty()) {
                Ok(sent) => from += sent.count().max(1),
                Err(e) => {
                    tracing::debug!(error = %e, "udp send");
                    from += 1;
                }
            }
        }
    }
}

// === impl ZoneView ===

impl ZoneView {
    fn refresh(&mut self, handler: &DnsHandler) {
        let now = handler.zone_generation();
        if now != self.generation {
            // Generation first, then the zone: the zone is that one or newer.
            self.generation = now;
            self.zone = handler.zone();
        }
    }
}

fn socket_addr(s: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = s.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    s.as_sockaddr_in6()
        .map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
}

/// A UDP send: never blocks for long (only with a full socket buffer).
pub(super) fn send(socket: &std::net::UdpSocket, response: &[u8], peer: SocketAddr) {
    if let Err(e) = socket.send_to(response, peer) {
        tracing::debug!(error = %e, %peer, "udp send");
    }
}
