//! A sync's [`Changes`] as one nf_tables netlink batch, sent without `nft`.
//!
//! `nft -f` first reads the table's chains and sets from the kernel to check a
//! script against them. At 10k services that costs 20-50 ms per transaction
//! however small, more than the change itself (measured with nft 1.0.6; see the
//! crate README). An incremental sync therefore encodes its changes here and
//! sends them as one atomic batch (`NFNL_MSG_BATCH_BEGIN` .. `END`): the kernel
//! applies all of it or none, as with `nft -f`.
//!
//! Only the rule shapes the renderer emits for common services are compiled: the
//! random endpoint pick and DNAT, the masquerade jump with a CIDR or no local
//! match, plain `jump`/`goto`, a source CIDR `goto`, and `fib saddr type local`.
//! Anything else (session affinity, source ranges, interface matches) makes
//! [`encode`] return [`Unsupported`], and the sync falls back to `nft -f`. A
//! kernel test lists chains written both ways and compares the text, so what is
//! compiled here reads back exactly as `nft` would have written it.

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use nix::sys::socket::{setsockopt, sockopt};

use super::state::Changes;
use crate::proxy::IpFamily;

// linux/netlink.h
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLA_F_NESTED: u16 = 0x8000;
const NETLINK_NETFILTER: i32 = 12;

// linux/netfilter/nfnetlink.h
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;

// linux/netfilter/nf_tables.h: messages
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;

// attributes
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_USERDATA: u16 = 6;
/// libnftnl's user-data record type for an element comment.
const NFTNL_UDATA_SET_ELEM_COMMENT: u8 = 0;

const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFTA_BITWISE_SREG: u16 = 1;
const NFTA_BITWISE_DREG: u16 = 2;
const NFTA_BITWISE_LEN: u16 = 3;
const NFTA_BITWISE_MASK: u16 = 4;
const NFTA_BITWISE_XOR: u16 = 5;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFTA_NG_DREG: u16 = 1;
const NFTA_NG_MODULUS: u16 = 2;
const NFTA_NG_TYPE: u16 = 3;
const NFTA_NAT_TYPE: u16 = 1;
const NFTA_NAT_FAMILY: u16 = 2;
const NFTA_NAT_REG_ADDR_MIN: u16 = 3;
const NFTA_NAT_REG_PROTO_MIN: u16 = 5;
const NFTA_FIB_DREG: u16 = 1;
const NFTA_FIB_RESULT: u16 = 2;
const NFTA_FIB_FLAGS: u16 = 3;

// values
const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NFT_REG_2: u32 = 2;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NFT_META_L4PROTO: u32 = 16;
const NFT_NG_RANDOM: u32 = 1;
const NFT_NAT_DNAT: u32 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const NFT_FIB_RESULT_ADDRTYPE: u32 = 3;
const NFTA_FIB_F_SADDR: u32 = 1;
const RTN_LOCAL: u32 = 2;
const NF_DROP: i32 = 0;
const NFT_JUMP: i32 = -3;
const NFT_GOTO: i32 = -4;

/// A change this module does not compile; the sync uses `nft -f` instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not compiled to netlink: {0}")]
pub struct Unsupported(pub String);

/// The kernel refused a batch, or the socket failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("netlink socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("the kernel refused the batch: {}", std::io::Error::from_raw_os_error(*.0))]
    Refused(i32),
    #[error("no answer from the kernel for the batch")]
    NoAnswer,
}

/// An encoded batch.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    buf: Vec<u8>,
    seq: u32,
    /// Sequence numbers the kernel acknowledges.
    acked: Vec<u32>,
    /// Where the last message so far starts.
    last: Option<usize>,
}

/// Encodes `c` for table `table` of `family`.
///
/// # Errors
/// A rule or element this module does not compile.
pub fn encode(family: IpFamily, table: &str, c: &Changes) -> Result<Batch, Unsupported> {
    let nfproto = match family {
        IpFamily::V4 => NFPROTO_IPV4,
        IpFamily::V6 => NFPROTO_IPV6,
    };
    if !c.affinity_sets.is_empty() {
        return Err(Unsupported("session affinity sets".into()));
    }
    let mut b = Batch::default();
    b.control(NFNL_MSG_BATCH_BEGIN);
    let mut deletes = Elements::new(NFT_MSG_DELSETELEM, 0);
    for (set, key) in &c.delete_elements {
        let k = element_key(family, set, split_comment(key).0)?;
        deletes.push(&mut b, nfproto, table, set, |m| {
            m.nested(NFTA_SET_ELEM_KEY, |m| m.bytes(NFTA_DATA_VALUE, &k));
        });
    }
    deletes.finish(&mut b, nfproto, table);
    let rules: Vec<(&String, Vec<Vec<Expr>>)> = c
        .chains
        .iter()
        .map(|(name, rules)| {
            let compiled = rules
                .iter()
                .map(|r| compile(family, r))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((name, compiled))
        })
        .collect::<Result<_, Unsupported>>()?;
    for (name, _) in &rules {
        b.message(NFT_MSG_NEWCHAIN, nfproto, NLM_F_CREATE, |m| {
            m.str(NFTA_CHAIN_TABLE, table);
            m.str(NFTA_CHAIN_NAME, name);
        });
    }
    for set in &c.flush_sets {
        // A set-element deletion naming no element empties the set.
        b.message(NFT_MSG_DELSETELEM, nfproto, 0, |m| {
            m.str(NFTA_SET_ELEM_LIST_TABLE, table);
            m.str(NFTA_SET_ELEM_LIST_SET, set);
        });
    }
    for (name, exprs) in &rules {
        flush(&mut b, nfproto, table, name);
        for rule in exprs {
            b.message(NFT_MSG_NEWRULE, nfproto, NLM_F_CREATE | NLM_F_APPEND, |m| {
                m.str(NFTA_RULE_TABLE, table);
                m.str(NFTA_RULE_CHAIN, name);
                m.nested(NFTA_RULE_EXPRESSIONS, |m| {
                    for e in rule {
                        m.nested(NFTA_LIST_ELEM, |m| e.write(m));
                    }
                });
            });
        }
    }
    let mut adds = Elements::new(NFT_MSG_NEWSETELEM, NLM_F_CREATE);
    for (set, key, value) in &c.add_elements {
        let (key, comment) = split_comment(key);
        let k = element_key(family, set, key)?;
        let v = element_value(value)?;
        let udata = comment.map(comment_udata).transpose()?;
        adds.push(&mut b, nfproto, table, set, |m| {
            m.nested(NFTA_SET_ELEM_KEY, |m| m.bytes(NFTA_DATA_VALUE, &k));
            if let Some(v) = &v {
                m.nested(NFTA_SET_ELEM_DATA, |m| v.write(m));
            }
            if let Some(u) = &udata {
                m.bytes(NFTA_SET_ELEM_USERDATA, u);
            }
        });
    }
    adds.finish(&mut b, nfproto, table);
    for name in &c.flush {
        flush(&mut b, nfproto, table, name);
    }
    b.control(NFNL_MSG_BATCH_END);
    Ok(b)
}

/// Bytes of encoded elements per set-element message: the element list is one
/// netlink attribute, whose length is 16 bits.
const ELEMENTS_PER_MESSAGE_BYTES: usize = 32 * 1024;

/// Consecutive elements of one set, gathered into as few messages as the
/// attribute length allows (one message per element would make a full sync
/// send 100k+ messages).
struct Elements {
    ty: u16,
    flags: u16,
    set: Option<&'static str>,
    encoded: Vec<u8>,
}

impl Elements {
    fn new(ty: u16, flags: u16) -> Self {
        Self {
            ty,
            flags,
            set: None,
            encoded: Vec::new(),
        }
    }

    fn push(
        &mut self,
        b: &mut Batch,
        nfproto: u8,
        table: &str,
        set: &'static str,
        body: impl FnOnce(&mut Attrs<'_>),
    ) {
        if self.set != Some(set) || self.encoded.len() >= ELEMENTS_PER_MESSAGE_BYTES {
            self.finish(b, nfproto, table);
            self.set = Some(set);
        }
        Attrs {
            buf: &mut self.encoded,
        }
        .nested(NFTA_LIST_ELEM, body);
    }

    fn finish(&mut self, b: &mut Batch, nfproto: u8, table: &str) {
        let Some(set) = self.set.take() else {
            return;
        };
        let encoded = std::mem::take(&mut self.encoded);
        b.message(self.ty, nfproto, self.flags, |m| {
            m.str(NFTA_SET_ELEM_LIST_TABLE, table);
            m.str(NFTA_SET_ELEM_LIST_SET, set);
            m.nested(NFTA_SET_ELEM_LIST_ELEMENTS, |m| m.raw(&encoded));
        });
    }
}

fn flush(b: &mut Batch, nfproto: u8, table: &str, chain: &str) {
    b.message(NFT_MSG_DELRULE, nfproto, 0, |m| {
        m.str(NFTA_RULE_TABLE, table);
        m.str(NFTA_RULE_CHAIN, chain);
    });
}

// === impl Batch ===

impl Batch {
    /// The encoded bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    fn control(&mut self, ty: u16) {
        if ty == NFNL_MSG_BATCH_END
            && let Some(last) = self.last.take()
        {
            // Only the last message asks for an acknowledgement: a refused one
            // is answered anyway, and a full sync's 100k acknowledgements would
            // overflow the socket's receive buffer.
            let at = last + 6;
            let flags = u16::from_ne_bytes([self.buf[at], self.buf[at + 1]]) | NLM_F_ACK;
            self.buf[at..at + 2].copy_from_slice(&flags.to_ne_bytes());
            self.acked = vec![u32_at(&self.buf, last + 8)];
        }
        let start = self.header(ty, NLM_F_REQUEST, 0);
        // nfgenmsg: AF_UNSPEC, version 0, the subsystem (big-endian).
        self.buf.extend_from_slice(&[0, 0]);
        self.buf
            .extend_from_slice(&NFNL_SUBSYS_NFTABLES.to_be_bytes());
        self.finish(start);
    }

    fn message(&mut self, ty: u16, nfproto: u8, flags: u16, body: impl FnOnce(&mut Attrs<'_>)) {
        let start = self.header((NFNL_SUBSYS_NFTABLES << 8) | ty, NLM_F_REQUEST | flags, 0);
        self.last = Some(start);
        self.buf.extend_from_slice(&[nfproto, 0, 0, 0]);
        body(&mut Attrs { buf: &mut self.buf });
        self.finish(start);
    }

    fn header(&mut self, ty: u16, flags: u16, pid: u32) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&self.seq.to_ne_bytes());
        self.buf.extend_from_slice(&pid.to_ne_bytes());
        self.seq += 1;
        start
    }

    fn finish(&mut self, start: usize) {
        let len = (self.buf.len() - start) as u32;
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
        pad(&mut self.buf);
    }

    /// Sends the batch on a new netlink socket in the calling thread's network
    /// namespace and waits for every acknowledgement.
    ///
    /// # Errors
    /// The socket fails, or the kernel refuses a message (then it applied
    /// nothing).
    pub fn send(&self) -> Result<(), SendError> {
        use socket2::{Domain, Protocol, Socket, Type};
        let sock = Socket::new(
            Domain::from(libc_af_netlink()),
            Type::RAW,
            Some(Protocol::from(NETLINK_NETFILTER)),
        )?;
        sock.set_read_timeout(Some(Duration::from_secs(30)))?;
        // A batch is one datagram: the send buffer must hold all of it (a full
        // sync at 10k services is tens of MiB). The forced option, as root,
        // lifts the `wmem_max` cap; the plain one is the fallback.
        let size = self.buf.len().saturating_add(1 << 16);
        if setsockopt(&sock, sockopt::SndBufForce, &size).is_err() {
            let _ = sock.set_send_buffer_size(size);
        }
        let _ = sock.set_recv_buffer_size(1 << 20);
        let sent = sock.send(&self.buf)?;
        if sent != self.buf.len() {
            return Err(SendError::Io(std::io::Error::other("short netlink send")));
        }
        let mut pending: std::collections::BTreeSet<u32> = self.acked.iter().copied().collect();
        let mut data = vec![0u8; 1 << 16];
        let mut refused = None;
        while !pending.is_empty() {
            let n = match std::io::Read::read(&mut &sock, &mut data) {
                Ok(n) => n,
                Err(e) if refused.is_some() && is_timeout(&e) => break,
                Err(e) if is_timeout(&e) => return Err(SendError::NoAnswer),
                Err(e) => return Err(e.into()),
            };
            let data = &data[..n];
            let mut off = 0;
            while off + 16 <= data.len() {
                let len = u32_at(data, off) as usize;
                let ty = u16::from_ne_bytes([data[off + 4], data[off + 5]]);
                let seq = u32_at(data, off + 8);
                if len < 16 || off + len > data.len() {
                    break;
                }
                if ty == NLMSG_ERROR && len >= 20 {
                    let code = i32::from_ne_bytes([
                        data[off + 16],
                        data[off + 17],
                        data[off + 18],
                        data[off + 19],
                    ]);
                    pending.remove(&seq);
                    if code != 0 && refused.is_none() {
                        refused = Some(-code);
                        // The rest of the answers are already queued; don't wait
                        // for acknowledgements of messages the kernel skipped.
                        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
                    }
                }
                off += (len + 3) & !3;
            }
        }
        match refused {
            Some(code) => Err(SendError::Refused(code)),
            None => Ok(()),
        }
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// `AF_NETLINK`.
fn libc_af_netlink() -> i32 {
    16
}

fn u32_at(d: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes([d[off], d[off + 1], d[off + 2], d[off + 3]])
}

fn pad(buf: &mut Vec<u8>) {
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

/// Attribute writer over a message buffer.
struct Attrs<'a> {
    buf: &'a mut Vec<u8>,
}

// === impl Attrs ===

impl Attrs<'_> {
    fn bytes(&mut self, ty: u16, data: &[u8]) {
        let len = (4 + data.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        pad(self.buf);
    }

    fn str(&mut self, ty: u16, s: &str) {
        let mut d = s.as_bytes().to_vec();
        d.push(0);
        self.bytes(ty, &d);
    }

    /// Attributes encoded elsewhere.
    fn raw(&mut self, encoded: &[u8]) {
        self.buf.extend_from_slice(encoded);
    }

    fn be32(&mut self, ty: u16, v: u32) {
        self.bytes(ty, &v.to_be_bytes());
    }

    fn nested(&mut self, ty: u16, body: impl FnOnce(&mut Attrs<'_>)) {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0, 0]);
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        body(&mut Attrs { buf: self.buf });
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }
}

/// One expression of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expr {
    Payload { offset: u32, len: u32 },
    Bitwise { len: u32, mask: Vec<u8> },
    Cmp { op: u32, data: Vec<u8> },
    MetaL4proto,
    Numgen { modulus: u32 },
    Immediate { reg: u32, data: Vec<u8> },
    Verdict(Verdict),
    Dnat { nfproto: u8 },
    FibSaddrType,
}

/// A verdict with its target chain.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    Drop,
    Jump(String),
    Goto(String),
}

// === impl Expr ===

impl Expr {
    fn name(&self) -> &'static str {
        match self {
            Self::Payload { .. } => "payload",
            Self::Bitwise { .. } => "bitwise",
            Self::Cmp { .. } => "cmp",
            Self::MetaL4proto => "meta",
            Self::Numgen { .. } => "numgen",
            Self::Immediate { .. } | Self::Verdict(_) => "immediate",
            Self::Dnat { .. } => "nat",
            Self::FibSaddrType => "fib",
        }
    }

    fn write(&self, m: &mut Attrs<'_>) {
        m.str(NFTA_EXPR_NAME, self.name());
        m.nested(NFTA_EXPR_DATA, |m| self.write_data(m));
    }

    fn write_data(&self, m: &mut Attrs<'_>) {
        match self {
            Self::Payload { offset, len } => {
                m.be32(NFTA_PAYLOAD_DREG, NFT_REG_1);
                m.be32(NFTA_PAYLOAD_BASE, NFT_PAYLOAD_NETWORK_HEADER);
                m.be32(NFTA_PAYLOAD_OFFSET, *offset);
                m.be32(NFTA_PAYLOAD_LEN, *len);
            }
            Self::Bitwise { len, mask } => {
                m.be32(NFTA_BITWISE_SREG, NFT_REG_1);
                m.be32(NFTA_BITWISE_DREG, NFT_REG_1);
                m.be32(NFTA_BITWISE_LEN, *len);
                m.nested(NFTA_BITWISE_MASK, |m| m.bytes(NFTA_DATA_VALUE, mask));
                m.nested(NFTA_BITWISE_XOR, |m| {
                    m.bytes(NFTA_DATA_VALUE, &vec![0; mask.len()]);
                });
            }
            Self::Cmp { op, data } => {
                m.be32(NFTA_CMP_SREG, NFT_REG_1);
                m.be32(NFTA_CMP_OP, *op);
                m.nested(NFTA_CMP_DATA, |m| m.bytes(NFTA_DATA_VALUE, data));
            }
            Self::MetaL4proto => {
                m.be32(NFTA_META_KEY, NFT_META_L4PROTO);
                m.be32(NFTA_META_DREG, NFT_REG_1);
            }
            Self::Numgen { modulus } => {
                m.be32(NFTA_NG_DREG, NFT_REG_1);
                m.be32(NFTA_NG_MODULUS, *modulus);
                m.be32(NFTA_NG_TYPE, NFT_NG_RANDOM);
            }
            Self::Immediate { reg, data } => {
                m.be32(NFTA_IMMEDIATE_DREG, *reg);
                m.nested(NFTA_IMMEDIATE_DATA, |m| m.bytes(NFTA_DATA_VALUE, data));
            }
            Self::Verdict(v) => {
                m.be32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT);
                m.nested(NFTA_IMMEDIATE_DATA, |m| v.write(m));
            }
            Self::Dnat { nfproto } => {
                m.be32(NFTA_NAT_TYPE, NFT_NAT_DNAT);
                m.be32(NFTA_NAT_FAMILY, u32::from(*nfproto));
                m.be32(NFTA_NAT_REG_ADDR_MIN, NFT_REG_1);
                m.be32(NFTA_NAT_REG_PROTO_MIN, NFT_REG_2);
            }
            Self::FibSaddrType => {
                m.be32(NFTA_FIB_DREG, NFT_REG_1);
                m.be32(NFTA_FIB_RESULT, NFT_FIB_RESULT_ADDRTYPE);
                m.be32(NFTA_FIB_FLAGS, NFTA_FIB_F_SADDR);
            }
        }
    }
}

// === impl Verdict ===

impl Verdict {
    /// An `NFTA_DATA_VERDICT` attribute.
    fn write(&self, m: &mut Attrs<'_>) {
        m.nested(NFTA_DATA_VERDICT, |m| {
            let (code, chain) = match self {
                Self::Drop => (NF_DROP, None),
                Self::Jump(c) => (NFT_JUMP, Some(c)),
                Self::Goto(c) => (NFT_GOTO, Some(c)),
            };
            m.bytes(NFTA_VERDICT_CODE, &code.to_be_bytes());
            if let Some(c) = chain {
                m.str(NFTA_VERDICT_CHAIN, c);
            }
        });
    }

    fn parse(words: &[&str]) -> Result<Self, Unsupported> {
        match words {
            ["drop"] => Ok(Self::Drop),
            ["jump", c] => Ok(Self::Jump((*c).to_string())),
            ["goto", c] => Ok(Self::Goto((*c).to_string())),
            _ => Err(Unsupported(format!("verdict {}", words.join(" ")))),
        }
    }
}

/// The network header offset of the source or destination address.
fn addr_offset(family: IpFamily, which: &str) -> Option<u32> {
    match (family, which) {
        (IpFamily::V4, "saddr") => Some(12),
        (IpFamily::V4, "daddr") => Some(16),
        (IpFamily::V6, "saddr") => Some(8),
        (IpFamily::V6, "daddr") => Some(24),
        _ => None,
    }
}

fn addr_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// `ip saddr 10.0.0.0/8` or `!= ...` as nft compiles it: a whole-byte prefix
/// loads only its bytes; any other prefix loads the whole address and masks it.
fn match_net(family: IpFamily, which: &str, op: u32, net: IpNet) -> Result<Vec<Expr>, Unsupported> {
    let offset = addr_offset(family, which).ok_or_else(|| Unsupported(which.into()))?;
    if IpFamily::of(&net.addr()) != family {
        return Err(Unsupported(format!("{net} in the other family")));
    }
    let prefix = u32::from(net.prefix_len());
    if prefix == 0 {
        return Err(Unsupported("a /0 match".into()));
    }
    let full = addr_bytes(net.network());
    if prefix.is_multiple_of(8) {
        let len = prefix / 8;
        return Ok(vec![
            Expr::Payload { offset, len },
            Expr::Cmp {
                op,
                data: full[..len as usize].to_vec(),
            },
        ]);
    }
    let len = full.len() as u32;
    Ok(vec![
        Expr::Payload { offset, len },
        Expr::Bitwise {
            len,
            mask: addr_bytes(net.netmask()),
        },
        Expr::Cmp { op, data: full },
    ])
}

/// Compiles one rule of the shapes the renderer emits.
fn compile(family: IpFamily, rule: &str) -> Result<Vec<Expr>, Unsupported> {
    let f = match family {
        IpFamily::V4 => "ip",
        IpFamily::V6 => "ip6",
    };
    let words: Vec<&str> = rule.split_whitespace().collect();
    let mut out = Vec::new();
    let mut w = &words[..];
    loop {
        match w {
            ["numgen", "random", "mod", k, "==", "0", rest @ ..] => {
                let modulus: u32 = k.parse().map_err(|_| Unsupported(rule.into()))?;
                out.push(Expr::Numgen { modulus });
                out.push(Expr::Cmp {
                    op: NFT_CMP_EQ,
                    data: 0u32.to_ne_bytes().to_vec(),
                });
                w = rest;
            }
            [fam, which @ ("saddr" | "daddr"), "!=", net, rest @ ..] if *fam == f => {
                out.extend(match_net(
                    family,
                    which,
                    NFT_CMP_NEQ,
                    parse_net(net, rule)?,
                )?);
                w = rest;
            }
            [fam, which @ ("saddr" | "daddr"), net, rest @ ..]
                if *fam == f && !net.starts_with('@') && !net.starts_with('{') =>
            {
                out.extend(match_net(family, which, NFT_CMP_EQ, parse_net(net, rule)?)?);
                w = rest;
            }
            ["fib", "saddr", "type", "local", rest @ ..] => {
                out.push(Expr::FibSaddrType);
                out.push(Expr::Cmp {
                    op: NFT_CMP_EQ,
                    data: RTN_LOCAL.to_ne_bytes().to_vec(),
                });
                w = rest;
            }
            ["meta", "l4proto", p, "dnat", "to", target] => {
                let proto: u8 = match *p {
                    "tcp" => 6,
                    "udp" => 17,
                    "sctp" => 132,
                    _ => return Err(Unsupported(rule.into())),
                };
                let sa: std::net::SocketAddr =
                    target.parse().map_err(|_| Unsupported(rule.into()))?;
                if IpFamily::of(&sa.ip()) != family {
                    return Err(Unsupported(rule.into()));
                }
                out.push(Expr::MetaL4proto);
                out.push(Expr::Cmp {
                    op: NFT_CMP_EQ,
                    data: vec![proto],
                });
                out.push(Expr::Immediate {
                    reg: NFT_REG_1,
                    data: addr_bytes(sa.ip()),
                });
                out.push(Expr::Immediate {
                    reg: NFT_REG_2,
                    data: sa.port().to_be_bytes().to_vec(),
                });
                out.push(Expr::Dnat {
                    nfproto: match family {
                        IpFamily::V4 => NFPROTO_IPV4,
                        IpFamily::V6 => NFPROTO_IPV6,
                    },
                });
                return Ok(out);
            }
            verdict @ [_, ..] => {
                out.push(Expr::Verdict(Verdict::parse(verdict)?));
                return Ok(out);
            }
            [] => return Err(Unsupported(format!("no verdict: {rule}"))),
        }
    }
}

fn parse_net(s: &str, rule: &str) -> Result<IpNet, Unsupported> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net);
    }
    s.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| Unsupported(rule.into()))
}

/// A set or map key as the kernel stores it: each part of a concatenation
/// padded to 4 bytes.
fn element_key(family: IpFamily, set: &str, key: &str) -> Result<Vec<u8>, Unsupported> {
    if set == super::digest::DIGESTS {
        // 128-bit digests in `ipv6_addr` form, in either family's table.
        return key
            .parse::<std::net::Ipv6Addr>()
            .map(|d| d.octets().to_vec())
            .map_err(|_| Unsupported(format!("{set} key {key}")));
    }
    let mut out = Vec::new();
    for part in key.split(" . ") {
        let part = part.trim();
        let bytes = if let Ok(ip) = part.parse::<IpAddr>() {
            if IpFamily::of(&ip) != family {
                return Err(Unsupported(format!("{set} key {key}")));
            }
            addr_bytes(ip)
        } else if let Some(p) = match part {
            "tcp" => Some(6u8),
            "udp" => Some(17),
            "sctp" => Some(132),
            _ => None,
        } {
            vec![p]
        } else if let Ok(port) = part.parse::<u16>() {
            port.to_be_bytes().to_vec()
        } else {
            return Err(Unsupported(format!("{set} key {key}")));
        };
        out.extend_from_slice(&bytes);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    }
    Ok(out)
}

/// `key comment "text"` -> (`key`, `text`).
fn split_comment(key: &str) -> (&str, Option<&str>) {
    match key.split_once(" comment \"") {
        Some((k, rest)) => (k, Some(rest.trim_end_matches('"'))),
        None => (key, None),
    }
}

/// An element comment as the kernel keeps it: libnftnl's user-data record (type,
/// length, the string with its NUL), which `nft list` reads back.
fn comment_udata(comment: &str) -> Result<Vec<u8>, Unsupported> {
    let len = u8::try_from(comment.len() + 1)
        .map_err(|_| Unsupported(format!("comment longer than 254 bytes: {comment}")))?;
    let mut out = vec![NFTNL_UDATA_SET_ELEM_COMMENT, len];
    out.extend_from_slice(comment.as_bytes());
    out.push(0);
    Ok(out)
}

/// A map value: a verdict, or none for a set element.
fn element_value(value: &str) -> Result<Option<Verdict>, Unsupported> {
    if value.is_empty() {
        return Ok(None);
    }
    let words: Vec<&str> = value.split_whitespace().collect();
    Verdict::parse(&words).map(Some)
}

#[cfg(test)]
mod tests;
