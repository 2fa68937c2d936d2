//! IPVS over generic netlink (the kernel's `IPVS` family, what `ipvsadm` speaks).
//!
//! From the `nlrs` crate we use the socket ([`NlSocket`]), the generic netlink
//! family resolution, the `IPVS_CMD_GET_INFO` request, the netlink / generic
//! netlink headers, its attribute writers and the IPVS command and attribute
//! numbers. The service and destination messages are encoded and decoded here,
//! because nlrs' IPVS builders cannot express what we need:
//! - service flags: the kernel reads `IPVS_SVC_ATTR_FLAGS` as a `{flags, mask}`
//!   pair and nlrs sends 4 bytes, so the mask is 0 and persistence (session
//!   affinity) is silently dropped;
//! - SCTP virtual servers (nlrs knows TCP and UDP only, and its service dump fails
//!   as a whole on an SCTP service);
//! - batching: nlrs sends one request and waits for its acknowledgement. We put
//!   many requests in one datagram, ask for an acknowledgement on the last one only
//!   (the kernel still reports every failure), and so program 100,000 real servers
//!   in a few hundred system calls.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use meshlite_proto::model::Protocol;
use nlrs::genetlink::msg::GeNlMsgHeader;
use nlrs::genetlink::socket::{GenericNetlinkSocket, GenericRequestBuilder};
use nlrs::ipvs::cmd_attributes::{
    IPVS_CMD_ATTR_DEST, IPVS_CMD_ATTR_SERVICE, IPVS_CMD_ATTR_TIMEOUT_TCP,
    IPVS_CMD_ATTR_TIMEOUT_TCP_FIN, IPVS_CMD_ATTR_TIMEOUT_UDP,
};
use nlrs::ipvs::destination::dest_attributes as dest_attr;
use nlrs::ipvs::destination::forward_methods::IP_VS_CONN_F_MASQ;
use nlrs::ipvs::destination::{
    IPVS_CMD_DEL_DEST, IPVS_CMD_GET_DEST, IPVS_CMD_NEW_DEST, IPVS_CMD_SET_DEST,
};
use nlrs::ipvs::info::GetInfoMessageBuilder;
use nlrs::ipvs::service::service_attributes as svc_attr;
use nlrs::ipvs::service::{
    IPVS_CMD_DEL_SERVICE, IPVS_CMD_GET_SERVICE, IPVS_CMD_NEW_SERVICE, IPVS_CMD_SET_SERVICE,
};
use nlrs::ipvs::{IPVS_FAMILY, IPVS_GENL_VERSION};
use nlrs::netlink::attr::{
    NLA_F_NESTED, NlAttribute, write_array_attr, write_be_u16_attr, write_slice_attr,
    write_string_attr, write_u16_attr, write_u32_attr,
};
use nlrs::netlink::msg::NlMsgHeader;
use nlrs::netlink::msg::flags::{NLM_F_ACK, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST};
use nlrs::netlink::msg::types::{NLMSG_DONE, NLMSG_ERROR, NLMSG_OVERRUN};
use nlrs::netlink::socket::{NlSocket, NlSocketType};
use nlrs::socket::NetlinkSocket;

use super::diff::{KernelDest, KernelState, KernelVs, Op, VsAttrs};
use super::plan::VsKey;

/// Largest datagram we send; well under the socket's default send buffer.
const BATCH_BYTES: usize = 64 * 1024;
/// Receive buffer: the kernel's dump datagrams are at most 32 KiB.
const RECV_BYTES: usize = 128 * 1024;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IPPROTO_TCP: u16 = 6;
const IPPROTO_UDP: u16 = 17;
const IPPROTO_SCTP: u16 = 132;
/// `struct nlmsghdr`.
const NLMSG_HDR: usize = 16;

/// A netlink failure.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("open generic netlink socket: {0}")]
    Socket(String),
    #[error("the kernel has no IPVS generic netlink family ({0}): is the ip_vs module loaded?")]
    Family(String),
    #[error("netlink I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("netlink {what}: {message}")]
    Protocol { what: &'static str, message: String },
    #[error("{what}: {}", std::io::Error::from_raw_os_error(*errno))]
    Kernel { what: String, errno: i32 },
}

/// `IPVS_CMD_SET_CONFIG` (`linux/ip_vs.h`; nlrs has no constant for it).
const IPVS_CMD_SET_CONFIG: u8 = 12;

/// IPVS connection timeouts (whole seconds on the wire); zero means unchanged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp: std::time::Duration,
    pub tcp_fin: std::time::Duration,
    pub udp: std::time::Duration,
}

impl Timeouts {
    /// Whether any timeout is to be set.
    pub fn any(&self) -> bool {
        !(self.tcp.is_zero() && self.tcp_fin.is_zero() && self.udp.is_zero())
    }
}

/// An operation the kernel refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpError {
    /// Index into the operations given to [`IpvsSocket::execute`].
    pub index: usize,
    pub errno: i32,
}

/// IPVS version and connection table size (`ipvsadm`'s first line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpvsInfo {
    pub version: (u8, u8, u8),
    pub connection_table_size: u32,
}

/// A generic netlink socket bound to the IPVS family. Blocking.
#[derive(Debug)]
pub struct IpvsSocket {
    inner: GenericNetlinkSocket<Vec<u8>, Vec<u8>, NlSocket>,
    rx: Vec<u8>,
    tx: Vec<u8>,
}

// === impl IpvsSocket ===

impl IpvsSocket {
    /// Opens a socket and resolves the IPVS family.
    ///
    /// # Errors
    /// [`NetlinkError::Family`] when the kernel has no IPVS (module not loaded).
    pub fn open() -> Result<Self, NetlinkError> {
        let mut sock = NlSocket::open(NlSocketType::NETLINK_GENERIC)
            .map_err(|e| NetlinkError::Socket(e.to_string()))?;
        // Port id 0: the kernel picks a free one. nlrs binds to the process id,
        // which another netlink socket of this process (rtnetlink) may hold.
        sock.socket_address.pid = 0;
        sock.bind()
            .map_err(|e| NetlinkError::Socket(e.to_string()))?;
        let inner = GenericNetlinkSocket::from_netlink_socket(
            NetlinkSocket::vectored_from_socket(sock),
            IPVS_FAMILY.to_string(),
        )
        .map_err(|e| NetlinkError::Family(e.to_string()))?;
        Ok(Self {
            inner,
            rx: vec![0; RECV_BYTES],
            tx: Vec::with_capacity(BATCH_BYTES + 1024),
        })
    }

    /// `IPVS_CMD_GET_INFO`, through nlrs.
    pub fn info(&mut self) -> Result<IpvsInfo, NetlinkError> {
        let req: GetInfoMessageBuilder<_> = self.inner.message_builder(());
        let i = req.call().map_err(|e| NetlinkError::Protocol {
            what: "get info",
            message: e.to_string(),
        })?;
        Ok(IpvsInfo {
            version: (i.version_major, i.version_minor, i.version_patch),
            connection_table_size: i.connection_table_size,
        })
    }

    fn next_seq(&mut self) -> u32 {
        let s = &mut self.inner.socket.sequence_number;
        *s = s.wrapping_add(1);
        *s
    }

    fn send(&mut self) -> Result<(), NetlinkError> {
        let sent = self.inner.socket.socket.send(&self.tx)?;
        if sent != self.tx.len() {
            return Err(NetlinkError::Protocol {
                what: "send",
                message: format!("short send: {sent} of {} bytes", self.tx.len()),
            });
        }
        Ok(())
    }

    /// Sends `ops` in as few datagrams as fit, in order. Returns the operations the
    /// kernel refused; the others are in effect.
    pub fn execute(&mut self, ops: &[&Op]) -> Result<Vec<OpError>, NetlinkError> {
        let family = self.inner.family_id;
        let mut failed = Vec::new();
        let mut i = 0;
        while i < ops.len() {
            self.tx.clear();
            let first_index = i;
            let first_seq = self.inner.socket.sequence_number.wrapping_add(1);
            // Encode until the datagram is full; the last one asks for an ACK.
            let mut last_seq = first_seq;
            while i < ops.len() && self.tx.len() < BATCH_BYTES {
                let seq = self.next_seq();
                let last = i + 1 == ops.len() || self.tx.len() + 512 >= BATCH_BYTES;
                encode_op(&mut self.tx, family, seq, ops[i], last)?;
                last_seq = seq;
                i += 1;
                if last {
                    break;
                }
            }
            self.send()?;
            // Errors of earlier messages come first; the reply to the last one
            // (its ACK or its error) ends the batch.
            'batch: loop {
                let n = self.inner.socket.socket.recv(&mut self.rx)?;
                for msg in Messages::new(&self.rx[..n]) {
                    let msg = msg?;
                    if msg.kind != NLMSG_ERROR {
                        continue;
                    }
                    let errno = msg.error()?;
                    let offset = msg.seq.wrapping_sub(first_seq) as usize;
                    if errno != 0 && offset < i - first_index {
                        failed.push(OpError {
                            index: first_index + offset,
                            errno,
                        });
                    }
                    if msg.seq == last_seq {
                        break 'batch;
                    }
                }
            }
        }
        Ok(failed)
    }

    /// Every virtual server with its real servers (one dump for the services, one
    /// per service for its real servers). Firewall-mark services are skipped.
    pub fn read_all(&mut self) -> Result<KernelState, NetlinkError> {
        let services = self.dump_services()?;
        let mut state = KernelState::new();
        for (key, mut vs) in services {
            vs.dests = self.dump_dests(&key)?;
            state.insert(key, vs);
        }
        Ok(state)
    }

    /// Sets the connection timeouts (`ipvsadm --set`, kube-proxy's
    /// `--ipvs-tcp-timeout` family); a zero leaves that timeout as it is.
    ///
    /// # Errors
    /// The kernel refuses (e.g. without `CAP_NET_ADMIN`).
    pub fn set_timeouts(&mut self, t: &Timeouts) -> Result<(), NetlinkError> {
        let family = self.inner.family_id;
        let seq = self.next_seq();
        self.tx.clear();
        let start = begin(
            &mut self.tx,
            family,
            IPVS_CMD_SET_CONFIG,
            NLM_F_REQUEST | NLM_F_ACK,
            seq,
        )?;
        for (attr, d) in [
            (IPVS_CMD_ATTR_TIMEOUT_TCP, t.tcp),
            (IPVS_CMD_ATTR_TIMEOUT_TCP_FIN, t.tcp_fin),
            (IPVS_CMD_ATTR_TIMEOUT_UDP, t.udp),
        ] {
            let secs = u32::try_from(d.as_secs()).unwrap_or(u32::MAX);
            write_u32_attr(&mut self.tx, attr, secs).map_err(io)?;
        }
        finish(&mut self.tx, start);
        self.send()?;
        loop {
            let n = self.inner.socket.socket.recv(&mut self.rx)?;
            for msg in Messages::new(&self.rx[..n]) {
                let msg = msg?;
                if msg.kind != NLMSG_ERROR || msg.seq != seq {
                    continue;
                }
                return match msg.error()? {
                    0 => Ok(()),
                    errno => Err(NetlinkError::Kernel {
                        what: "set IPVS timeouts".into(),
                        errno,
                    }),
                };
            }
        }
    }

    /// `IPVS_CMD_GET_SERVICE` dump.
    pub fn dump_services(&mut self) -> Result<Vec<(VsKey, KernelVs)>, NetlinkError> {
        let family = self.inner.family_id;
        loop {
            self.tx.clear();
            let seq = self.next_seq();
            let start = begin(
                &mut self.tx,
                family,
                IPVS_CMD_GET_SERVICE,
                NLM_F_REQUEST | NLM_F_DUMP,
                seq,
            )?;
            finish(&mut self.tx, start);
            self.send()?;
            let mut out = Vec::new();
            let interrupted = self.read_dump(seq, "dump services", |payload| {
                if let Some(s) = parse_service_msg(payload)? {
                    out.push(s);
                }
                Ok(())
            })?;
            if !interrupted {
                return Ok(out);
            }
        }
    }

    /// `IPVS_CMD_GET_DEST` dump for one virtual server.
    pub fn dump_dests(
        &mut self,
        key: &VsKey,
    ) -> Result<BTreeMap<SocketAddr, KernelDest>, NetlinkError> {
        let family = self.inner.family_id;
        loop {
            self.tx.clear();
            let seq = self.next_seq();
            let start = begin(
                &mut self.tx,
                family,
                IPVS_CMD_GET_DEST,
                NLM_F_REQUEST | NLM_F_DUMP,
                seq,
            )?;
            service_attrs(&mut self.tx, key, None)?;
            finish(&mut self.tx, start);
            self.send()?;
            let mut out = BTreeMap::new();
            let interrupted = self.read_dump(seq, "dump destinations", |payload| {
                if let Some((addr, d)) = parse_dest_msg(payload)? {
                    out.insert(addr, d);
                }
                Ok(())
            })?;
            if !interrupted {
                return Ok(out);
            }
        }
    }

    /// Reads a dump's replies, calling `each` with every message's generic netlink
    /// payload. Returns whether the dump was interrupted (and must be redone).
    fn read_dump(
        &mut self,
        seq: u32,
        what: &'static str,
        mut each: impl FnMut(&[u8]) -> Result<(), NetlinkError>,
    ) -> Result<bool, NetlinkError> {
        let family = self.inner.family_id;
        let mut interrupted = false;
        loop {
            let n = self.inner.socket.socket.recv(&mut self.rx)?;
            if n == 0 {
                return Err(NetlinkError::Protocol {
                    what,
                    message: "empty read".into(),
                });
            }
            for msg in Messages::new(&self.rx[..n]) {
                let msg = msg?;
                if msg.seq != seq {
                    continue;
                }
                interrupted |= msg.flags & NLM_F_DUMP_INTR != 0;
                match msg.kind {
                    NLMSG_DONE => return Ok(interrupted),
                    NLMSG_ERROR => {
                        let errno = msg.error()?;
                        return Err(NetlinkError::Kernel {
                            what: what.to_string(),
                            errno,
                        });
                    }
                    NLMSG_OVERRUN => {
                        return Err(NetlinkError::Protocol {
                            what,
                            message: "overrun".into(),
                        });
                    }
                    k if k == family => {
                        let payload = msg.payload.get(GeNlMsgHeader::SIZE..).unwrap_or(&[]);
                        each(payload)?;
                    }
                    _ => {}
                }
            }
        }
    }
}

/// One netlink message in a received datagram.
#[derive(Debug, Clone, Copy)]
struct Message<'a> {
    kind: u16,
    flags: u16,
    seq: u32,
    payload: &'a [u8],
}

impl Message<'_> {
    /// The errno of an `NLMSG_ERROR` (0: an ACK).
    fn error(&self) -> Result<i32, NetlinkError> {
        let raw = self
            .payload
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .map(i32::from_ne_bytes)
            .ok_or(NetlinkError::Protocol {
                what: "error message",
                message: "too short".into(),
            })?;
        Ok(-raw)
    }
}

/// Iterates over the messages of a datagram.
struct Messages<'a> {
    buf: &'a [u8],
}

impl<'a> Messages<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<Message<'a>, NetlinkError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.len() < NLMSG_HDR {
            return None;
        }
        let len = u32::from_ne_bytes(self.buf[0..4].try_into().ok()?) as usize;
        if len < NLMSG_HDR || len > self.buf.len() {
            self.buf = &[];
            return Some(Err(NetlinkError::Protocol {
                what: "message",
                message: format!("bad length {len}"),
            }));
        }
        let msg = Message {
            kind: u16::from_ne_bytes(self.buf[4..6].try_into().ok()?),
            flags: u16::from_ne_bytes(self.buf[6..8].try_into().ok()?),
            seq: u32::from_ne_bytes(self.buf[8..12].try_into().ok()?),
            payload: &self.buf[NLMSG_HDR..len],
        };
        let next = align(len).min(self.buf.len());
        self.buf = &self.buf[next..];
        Some(Ok(msg))
    }
}

/// Netlink attributes of a buffer: (type without flag bits, payload).
fn attrs(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
        if len < 4 || len > rest.len() {
            rest = &[];
            return None;
        }
        let payload = &rest[4..len];
        rest = &rest[align(len).min(rest.len())..];
        Some((kind, payload))
    })
}

fn align(len: usize) -> usize {
    (len + 3) & !3
}

fn u16_of(b: &[u8]) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(..2)?.try_into().ok()?))
}

fn be16_of(b: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(..2)?.try_into().ok()?))
}

fn u32_of(b: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(..4)?.try_into().ok()?))
}

fn ip_of(af: u16, b: &[u8]) -> Option<IpAddr> {
    match af {
        AF_INET => {
            let o: [u8; 4] = b.get(..4)?.try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(o)))
        }
        AF_INET6 => {
            let o: [u8; 16] = b.get(..16)?.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(o)))
        }
        _ => None,
    }
}

fn protocol_of(p: u16) -> Option<Protocol> {
    match p {
        IPPROTO_TCP => Some(Protocol::Tcp),
        IPPROTO_UDP => Some(Protocol::Udp),
        IPPROTO_SCTP => Some(Protocol::Sctp),
        _ => None,
    }
}

fn protocol_number(p: Protocol) -> u16 {
    match p {
        Protocol::Tcp => IPPROTO_TCP,
        Protocol::Udp => IPPROTO_UDP,
        Protocol::Sctp => IPPROTO_SCTP,
    }
}

fn malformed(what: &'static str) -> NetlinkError {
    NetlinkError::Protocol {
        what,
        message: "malformed attributes".into(),
    }
}

/// A service message (the generic netlink payload after its header). `None` for
/// services we do not manage: firewall-mark services, other protocols.
pub fn parse_service_msg(payload: &[u8]) -> Result<Option<(VsKey, KernelVs)>, NetlinkError> {
    let Some((_, nested)) = attrs(payload).find(|(k, _)| *k == IPVS_CMD_ATTR_SERVICE) else {
        return Err(malformed("service"));
    };
    let mut af = None;
    let mut proto = None;
    let mut addr = None;
    let mut port = None;
    let mut vs = KernelVs::default();
    for (k, v) in attrs(nested) {
        match k {
            svc_attr::IPVS_SVC_ATTR_AF => af = u16_of(v),
            svc_attr::IPVS_SVC_ATTR_PROTOCOL => proto = u16_of(v),
            svc_attr::IPVS_SVC_ATTR_ADDR => addr = Some(v),
            svc_attr::IPVS_SVC_ATTR_PORT => port = be16_of(v),
            svc_attr::IPVS_SVC_ATTR_FWMARK if u32_of(v).is_some_and(|m| m != 0) => {
                return Ok(None);
            }
            svc_attr::IPVS_SVC_ATTR_SCHED_NAME => {
                vs.scheduler = String::from_utf8_lossy(v)
                    .trim_end_matches('\0')
                    .to_string();
            }
            svc_attr::IPVS_SVC_ATTR_FLAGS => vs.flags = u32_of(v).unwrap_or(0),
            svc_attr::IPVS_SVC_ATTR_TIMEOUT => vs.timeout = u32_of(v).unwrap_or(0),
            _ => {}
        }
    }
    let (Some(af), Some(proto), Some(addr), Some(port)) = (af, proto, addr, port) else {
        return Ok(None);
    };
    let Some(protocol) = protocol_of(proto) else {
        return Ok(None);
    };
    let ip = ip_of(af, addr).ok_or_else(|| malformed("service address"))?;
    Ok(Some((VsKey::new(protocol, ip, port), vs)))
}

/// A destination message. `None` for an incomplete one.
pub fn parse_dest_msg(payload: &[u8]) -> Result<Option<(SocketAddr, KernelDest)>, NetlinkError> {
    let Some((_, nested)) = attrs(payload).find(|(k, _)| *k == IPVS_CMD_ATTR_DEST) else {
        return Err(malformed("destination"));
    };
    let mut af = None;
    let mut addr = None;
    let mut port = None;
    let mut d = KernelDest::default();
    for (k, v) in attrs(nested) {
        match k {
            dest_attr::IPVS_DEST_ATTR_ADDR => addr = Some(v),
            dest_attr::IPVS_DEST_ATTR_PORT => port = be16_of(v),
            dest_attr::IPVS_DEST_ATTR_ADDR_FAMILY => af = u16_of(v),
            dest_attr::IPVS_DEST_ATTR_WEIGHT => d.weight = u32_of(v).unwrap_or(0),
            dest_attr::IPVS_DEST_ATTR_ACTIVE_CONNS => d.active = u32_of(v).unwrap_or(0),
            dest_attr::IPVS_DEST_ATTR_INACT_CONNS => d.inactive = u32_of(v).unwrap_or(0),
            _ => {}
        }
    }
    let (Some(addr), Some(port)) = (addr, port) else {
        return Ok(None);
    };
    // Kernels before 4.x do not send the family: the address tells (an IPv4
    // address leaves the other 12 bytes zero).
    let af = af.unwrap_or(
        if addr.get(4..16).is_some_and(|r| r.iter().all(|b| *b == 0)) {
            AF_INET
        } else {
            AF_INET6
        },
    );
    let ip = ip_of(af, addr).ok_or_else(|| malformed("destination address"))?;
    Ok(Some((SocketAddr::new(ip, port), d)))
}

fn io(e: std::io::Error) -> NetlinkError {
    NetlinkError::Io(e)
}

/// Writes a netlink + generic netlink header with a length to patch; returns the
/// message's start.
fn begin(
    buf: &mut Vec<u8>,
    family: u16,
    cmd: u8,
    flags: u16,
    seq: u32,
) -> Result<usize, NetlinkError> {
    let start = buf.len();
    let mut h = NlMsgHeader::new_with_seq_and_pid(seq, 0);
    h.r#type = family;
    h.flags = flags;
    h.write(buf).map_err(io)?;
    GeNlMsgHeader::new(cmd, IPVS_GENL_VERSION)
        .write(buf)
        .map_err(io)?;
    Ok(start)
}

/// Patches the message length.
fn finish(buf: &mut [u8], start: usize) {
    let len = (buf.len() - start) as u32;
    buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

fn nest_begin(buf: &mut Vec<u8>, kind: u16) -> Result<usize, NetlinkError> {
    let start = buf.len();
    NlAttribute {
        len: 0,
        r#type: kind | NLA_F_NESTED,
    }
    .write(buf)
    .map_err(io)?;
    Ok(start)
}

fn nest_end(buf: &mut [u8], start: usize) {
    let len = (buf.len() - start) as u16;
    buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
}

fn addr16(ip: IpAddr) -> ([u8; 16], u16) {
    let mut a = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => {
            a[..4].copy_from_slice(&v4.octets());
            (a, AF_INET)
        }
        IpAddr::V6(v6) => (v6.octets(), AF_INET6),
    }
}

/// The nested service attribute: identity, plus the full entry for NEW/SET.
fn service_attrs(
    buf: &mut Vec<u8>,
    key: &VsKey,
    full: Option<&VsAttrs>,
) -> Result<(), NetlinkError> {
    let nest = nest_begin(buf, IPVS_CMD_ATTR_SERVICE)?;
    let (addr, af) = addr16(key.addr.ip());
    write_u16_attr(buf, svc_attr::IPVS_SVC_ATTR_AF, af).map_err(io)?;
    write_u16_attr(
        buf,
        svc_attr::IPVS_SVC_ATTR_PROTOCOL,
        protocol_number(key.protocol),
    )
    .map_err(io)?;
    write_array_attr(buf, svc_attr::IPVS_SVC_ATTR_ADDR, addr).map_err(io)?;
    write_be_u16_attr(buf, svc_attr::IPVS_SVC_ATTR_PORT, key.addr.port()).map_err(io)?;
    if let Some(a) = full {
        write_string_attr(
            buf,
            svc_attr::IPVS_SVC_ATTR_SCHED_NAME,
            a.scheduler.as_str(),
        )
        .map_err(io)?;
        // struct ip_vs_flags { __u32 flags; __u32 mask; }: we own every flag.
        let mut flags = [0u8; 8];
        flags[..4].copy_from_slice(&a.flags.to_ne_bytes());
        flags[4..].copy_from_slice(&u32::MAX.to_ne_bytes());
        write_slice_attr(buf, svc_attr::IPVS_SVC_ATTR_FLAGS, &flags).map_err(io)?;
        write_u32_attr(buf, svc_attr::IPVS_SVC_ATTR_TIMEOUT, a.timeout).map_err(io)?;
        // A mask for IPv4, a prefix length for IPv6 (as ipvsadm sends them).
        let netmask = if af == AF_INET { u32::MAX } else { 128 };
        write_u32_attr(buf, svc_attr::IPVS_SVC_ATTR_NETMASK, netmask).map_err(io)?;
    }
    nest_end(buf, nest);
    Ok(())
}

/// The nested destination attribute (NAT, no thresholds).
fn dest_attrs(
    buf: &mut Vec<u8>,
    dest: &SocketAddr,
    weight: Option<u32>,
) -> Result<(), NetlinkError> {
    let nest = nest_begin(buf, IPVS_CMD_ATTR_DEST)?;
    let (addr, af) = addr16(dest.ip());
    write_array_attr(buf, dest_attr::IPVS_DEST_ATTR_ADDR, addr).map_err(io)?;
    write_be_u16_attr(buf, dest_attr::IPVS_DEST_ATTR_PORT, dest.port()).map_err(io)?;
    write_u16_attr(buf, dest_attr::IPVS_DEST_ATTR_ADDR_FAMILY, af).map_err(io)?;
    if let Some(w) = weight {
        write_u32_attr(buf, dest_attr::IPVS_DEST_ATTR_FWD_METHOD, IP_VS_CONN_F_MASQ).map_err(io)?;
        write_u32_attr(buf, dest_attr::IPVS_DEST_ATTR_WEIGHT, w).map_err(io)?;
        write_u32_attr(buf, dest_attr::IPVS_DEST_ATTR_U_THRESH, 0).map_err(io)?;
        write_u32_attr(buf, dest_attr::IPVS_DEST_ATTR_L_THRESH, 0).map_err(io)?;
    }
    nest_end(buf, nest);
    Ok(())
}

/// Appends the message for one operation.
pub fn encode_op(
    buf: &mut Vec<u8>,
    family: u16,
    seq: u32,
    op: &Op,
    ack: bool,
) -> Result<(), NetlinkError> {
    let flags = NLM_F_REQUEST | if ack { NLM_F_ACK } else { 0 };
    let (cmd, key) = match op {
        Op::AddService { key, .. } => (IPVS_CMD_NEW_SERVICE, key),
        Op::EditService { key, .. } => (IPVS_CMD_SET_SERVICE, key),
        Op::DelService { key } => (IPVS_CMD_DEL_SERVICE, key),
        Op::AddDest { key, .. } => (IPVS_CMD_NEW_DEST, key),
        Op::EditDest { key, .. } => (IPVS_CMD_SET_DEST, key),
        Op::DelDest { key, .. } => (IPVS_CMD_DEL_DEST, key),
    };
    let start = begin(buf, family, cmd, flags, seq)?;
    match op {
        Op::AddService { attrs, .. } | Op::EditService { attrs, .. } => {
            service_attrs(buf, key, Some(attrs))?;
        }
        Op::DelService { .. } => service_attrs(buf, key, None)?,
        Op::AddDest { dest, weight, .. } | Op::EditDest { dest, weight, .. } => {
            service_attrs(buf, key, None)?;
            dest_attrs(buf, dest, Some(*weight))?;
        }
        Op::DelDest { dest, .. } => {
            service_attrs(buf, key, None)?;
            dest_attrs(buf, dest, None)?;
        }
    }
    finish(buf, start);
    Ok(())
}

#[cfg(test)]
mod tests;
