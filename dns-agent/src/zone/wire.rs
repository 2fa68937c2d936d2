//! Answers in DNS wire format (RFC 1035 section 4.1), built once with the zone so
//! that a UDP answer is the request's question followed by bytes copied from here:
//! no name is parsed, no record built and nothing allocated per response.
//!
//! Owners that are the query name are written as a pointer to offset 12, where a
//! response's question name starts: answers then keep the client's spelling of it
//! without storing it. Other names (lower case) end in a pointer to the longest
//! suffix written before; SRV targets are never compressed (RFC 2782), but later
//! names may point into them, as hickory's encoder does.

use std::net::IpAddr;

/// Record types the wire writer emits.
pub const TYPE_A: u16 = 1;
/// `SOA`.
pub const TYPE_SOA: u16 = 6;
/// `AAAA`.
pub const TYPE_AAAA: u16 = 28;
/// `SRV`.
pub const TYPE_SRV: u16 = 33;
/// `OPT` (EDNS, RFC 6891).
pub const TYPE_OPT: u16 = 41;
/// Class `IN`.
pub const CLASS_IN: u16 = 1;

/// A pointer to the question name of a response (offset 12, right after the header).
const QUESTION_POINTER: [u8; 2] = [0xC0, 0x0C];

/// Records in wire format that follow a response's question section.
///
/// Pointers to names inside the section depend on where the section starts in the
/// message (after the question, whose length is the queried name's): they are stored
/// relative to the section's start and moved into place by [`Section::write_to`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Section {
    bytes: Box<[u8]>,
    answers: u16,
    authorities: u16,
    additionals: u16,
    /// Positions in `bytes` of compression pointers relative to the section's start.
    relocs: Box<[u16]>,
}

/// Builds a [`Section`].
#[derive(Debug, Default)]
pub struct SectionWriter {
    bytes: Vec<u8>,
    relocs: Vec<u16>,
    /// Suffixes of the names written so far (lower case, no trailing dot) and where.
    names: Vec<(String, u16)>,
    answers: u16,
    authorities: u16,
    additionals: u16,
}

/// Which section a record goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Answer,
    Additional,
}

/// A record's owner.
#[derive(Debug, Clone, Copy)]
pub enum WireOwner<'a> {
    /// The query name (a pointer to the question).
    Query,
    /// A name, lower case, no trailing dot.
    Name(&'a str),
    /// The name written at this position of the section (see [`SectionWriter::srv`]).
    At(u16),
}

// === impl Section ===

impl Section {
    /// Records in the answer section.
    pub fn answers(&self) -> u16 {
        self.answers
    }

    /// Records in the authority section.
    pub fn authorities(&self) -> u16 {
        self.authorities
    }

    /// Records in the additional section.
    pub fn additionals(&self) -> u16 {
        self.additionals
    }

    /// Encoded length.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the section holds no record.
    pub fn is_empty(&self) -> bool {
        self.answers == 0 && self.authorities == 0 && self.additionals == 0
    }

    /// Appends the section to `out`, a message whose question ends at `out.len()`.
    /// `false` (and `out` unchanged) when the section would start beyond where
    /// compression pointers reach.
    pub fn write_to(&self, out: &mut Vec<u8>) -> bool {
        let Ok(start) = u16::try_from(out.len()) else {
            return false;
        };
        if usize::from(start) + self.bytes.len() > 0x3FFF {
            return false;
        }
        let base = out.len();
        out.extend_from_slice(&self.bytes);
        for &r in &*self.relocs {
            let at = base + usize::from(r);
            let p = u16::from_be_bytes([out[at], out[at + 1]]) + start;
            out[at..at + 2].copy_from_slice(&p.to_be_bytes());
        }
        true
    }
}

// === impl SectionWriter ===

impl SectionWriter {
    /// The finished section.
    pub fn finish(self) -> Section {
        Section {
            bytes: self.bytes.into(),
            answers: self.answers,
            authorities: self.authorities,
            additionals: self.additionals,
            relocs: self.relocs.into(),
        }
    }

    /// An A or AAAA record.
    pub fn address(&mut self, part: Part, owner: WireOwner<'_>, ttl: u32, ip: IpAddr) -> bool {
        let mark = self.mark();
        if !self.owner(owner) {
            return self.rollback(mark);
        }
        match ip {
            IpAddr::V4(v4) => {
                self.header(TYPE_A, ttl, 4);
                self.bytes.extend_from_slice(&v4.octets());
            }
            IpAddr::V6(v6) => {
                self.header(TYPE_AAAA, ttl, 16);
                self.bytes.extend_from_slice(&v6.octets());
            }
        }
        self.count(part);
        true
    }

    /// A writer with room for `bytes` bytes.
    pub fn with_capacity(bytes: usize) -> Self {
        Self {
            bytes: Vec::with_capacity(bytes),
            ..Self::default()
        }
    }

    /// An SRV record (RFC 2782) whose target is `target`'s parts joined by dots,
    /// written whole (never compressed). Returns where the target starts, for
    /// [`WireOwner::At`]; `None` (nothing written) when it is not a DNS name.
    pub fn srv(
        &mut self,
        owner: WireOwner<'_>,
        ttl: u32,
        (priority, weight, port): (u16, u16, u16),
        target: &[&str],
    ) -> Option<u16> {
        let mark = self.mark();
        if !self.owner(owner) {
            self.rollback(mark);
            return None;
        }
        self.header(TYPE_SRV, ttl, 0);
        let rdata = self.bytes.len();
        for v in [priority, weight, port] {
            self.bytes.extend_from_slice(&v.to_be_bytes());
        }
        let at = u16::try_from(self.bytes.len())
            .ok()
            .filter(|at| *at <= 0x3FFF);
        let labels = target
            .iter()
            .flat_map(|part| part.split('.'))
            .filter(|l| !l.is_empty());
        let mut name_len = 1;
        for label in labels {
            name_len += 1 + label.len();
            if label.len() > 63 || name_len > 255 {
                self.rollback(mark);
                return None;
            }
            // At most 63, checked above.
            self.bytes.push(label.len() as u8);
            self.bytes.extend_from_slice(label.as_bytes());
        }
        self.bytes.push(0);
        let (Some(at), Ok(len)) = (at, u16::try_from(self.bytes.len() - rdata)) else {
            self.rollback(mark);
            return None;
        };
        self.bytes[rdata - 2..rdata].copy_from_slice(&len.to_be_bytes());
        self.count(Part::Answer);
        Some(at)
    }

    fn mark(&self) -> (usize, usize, usize) {
        (self.bytes.len(), self.relocs.len(), self.names.len())
    }

    /// Drops a record that could not be written (a name that is not a DNS name).
    fn rollback(&mut self, (bytes, relocs, names): (usize, usize, usize)) -> bool {
        self.bytes.truncate(bytes);
        self.relocs.truncate(relocs);
        self.names.truncate(names);
        false
    }

    fn count(&mut self, part: Part) {
        match part {
            Part::Answer => self.answers = self.answers.saturating_add(1),
            Part::Additional => self.additionals = self.additionals.saturating_add(1),
        }
    }

    /// Type, class IN, TTL and RDLENGTH.
    fn header(&mut self, rtype: u16, ttl: u32, rdlen: u16) {
        self.bytes.extend_from_slice(&rtype.to_be_bytes());
        self.bytes.extend_from_slice(&CLASS_IN.to_be_bytes());
        self.bytes.extend_from_slice(&ttl.to_be_bytes());
        self.bytes.extend_from_slice(&rdlen.to_be_bytes());
    }

    fn owner(&mut self, owner: WireOwner<'_>) -> bool {
        match owner {
            WireOwner::Query => {
                self.bytes.extend_from_slice(&QUESTION_POINTER);
                true
            }
            WireOwner::Name(name) => self.name(name, true, true),
            WireOwner::At(at) => {
                let Ok(pos) = u16::try_from(self.bytes.len()) else {
                    return false;
                };
                self.relocs.push(pos);
                self.bytes.extend_from_slice(&(0xC000 | at).to_be_bytes());
                true
            }
        }
    }

    /// Writes `name`, its longest suffix already written as a pointer when
    /// `compress`, and remembers the name (and with `suffixes` each suffix it wrote
    /// whole) for later names. For the few names of an SOA: services' sections
    /// point at their SRV targets by position ([`WireOwner::At`]), without a search.
    fn name(&mut self, name: &str, compress: bool, suffixes: bool) -> bool {
        let start = self.bytes.len();
        let mut rest = name.trim_end_matches('.');
        let mut written: Vec<(&str, usize)> = Vec::new();
        loop {
            if rest.is_empty() {
                self.bytes.push(0);
                break;
            }
            if compress && let Some(&(_, at)) = self.names.iter().find(|(n, _)| n == rest) {
                let Ok(pos) = u16::try_from(self.bytes.len()) else {
                    self.bytes.truncate(start);
                    return false;
                };
                self.relocs.push(pos);
                self.bytes.extend_from_slice(&(0xC000 | at).to_be_bytes());
                break;
            }
            let (label, tail) = rest.split_once('.').unwrap_or((rest, ""));
            if label.is_empty() || label.len() > 63 {
                self.bytes.truncate(start);
                return false;
            }
            written.push((rest, self.bytes.len()));
            // At most 63, checked above.
            self.bytes.push(label.len() as u8);
            self.bytes.extend_from_slice(label.as_bytes());
            rest = tail;
        }
        if self.bytes.len() - start > 255 {
            self.bytes.truncate(start);
            return false;
        }
        if !suffixes {
            written.truncate(1);
        }
        for (suffix, at) in written {
            // Pointers reach 14 bits.
            if let Ok(at) = u16::try_from(at)
                && at <= 0x3FFF
            {
                self.names.push((suffix.to_string(), at));
            }
        }
        true
    }
}

/// Appends A or AAAA records (`v6` picks which) of `ips` owned by the query name;
/// returns how many.
pub fn write_addresses(out: &mut Vec<u8>, ips: &[IpAddr], v6: bool, ttl: u32) -> u16 {
    let mut n = 0u16;
    for ip in ips {
        let (rtype, data): (u16, &[u8]) = match ip {
            IpAddr::V4(v4) if !v6 => (TYPE_A, &v4.octets()),
            IpAddr::V6(v6a) if v6 => (TYPE_AAAA, &v6a.octets()),
            _ => continue,
        };
        out.extend_from_slice(&QUESTION_POINTER);
        out.extend_from_slice(&rtype.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&ttl.to_be_bytes());
        // Four or sixteen bytes.
        out.extend_from_slice(&(data.len() as u16).to_be_bytes());
        out.extend_from_slice(data);
        n = n.saturating_add(1);
    }
    n
}

/// The SOA record as an authority section: owner and names compressed against each
/// other, as hickory's encoder writes them. `None` when a name is not a DNS name.
pub fn soa_section(owner: &str, soa: &super::Soa, ttl: u32) -> Option<Section> {
    let mut w = SectionWriter::default();
    if !w.name(owner, true, true) {
        return None;
    }
    w.header(TYPE_SOA, ttl, 0);
    let rdata = w.bytes.len();
    if !w.name(&soa.mname, true, true) || !w.name(&soa.rname, true, true) {
        return None;
    }
    w.bytes.extend_from_slice(&soa.serial.to_be_bytes());
    for v in [soa.refresh, soa.retry, soa.expire] {
        w.bytes.extend_from_slice(&v.to_be_bytes());
    }
    w.bytes.extend_from_slice(&soa.minimum.to_be_bytes());
    let len = u16::try_from(w.bytes.len() - rdata).ok()?;
    w.bytes[rdata - 2..rdata].copy_from_slice(&len.to_be_bytes());
    w.authorities = 1;
    Some(w.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_length_prefixed_and_checked() {
        let mut w = SectionWriter::default();
        assert_eq!(
            w.srv(WireOwner::Query, 30, (0, 0, 1), &["ab", "c"]),
            Some(18)
        );
        assert_eq!(w.bytes[18..], *b"\x02ab\x01c\x00");
        let long = "a".repeat(64);
        assert_eq!(w.srv(WireOwner::Query, 30, (0, 0, 1), &[&long]), None);
        assert_eq!(w.bytes.len(), 24, "unchanged on failure");
        // With suffixes remembered, a later name ending in one points at it.
        let mut w = SectionWriter::default();
        assert!(w.name("ab.c", false, true));
        assert!(w.name("x.c", true, true));
        assert_eq!(w.bytes[6..], [1, b'x', 0xC0, 3]);
    }

    #[test]
    fn later_owners_point_at_names_written_before() {
        let mut w = SectionWriter::default();
        let at = w.srv(WireOwner::Query, 30, (0, 100, 80), &["x.y"]).unwrap();
        assert!(w.address(
            Part::Additional,
            WireOwner::At(at),
            30,
            "198.18.0.1".parse().unwrap()
        ));
        let s = w.finish();
        assert_eq!((s.answers(), s.additionals()), (1, 1));
        // Placed after 20 bytes: the pointer to "x.y" (at 18 in the section) moves.
        let mut msg = vec![0; 20];
        assert!(s.write_to(&mut msg));
        let owner = 20 + 2 + 10 + 6 + 5;
        assert_eq!(msg[owner..owner + 2], (0xC000u16 | (20 + 18)).to_be_bytes());
    }
}
