//! The UDP fast path: a plain query for a cluster name is answered by copying the
//! request's question and the zone's wire-format records ([`Zone::wire_lookup`])
//! into the response, without hickory's parser or encoder and without allocating.
//! Anything else (other opcodes, several questions, EDNS options it does not read,
//! compressed question names, `ANY`, names the zone composes per query, answers
//! that would be truncated, names outside the zone) returns `None` and takes the
//! general path, which answers exactly as before.

use crate::metrics::{QueryType, Rcode};
use crate::zone::wire::{CLASS_IN, TYPE_OPT, write_addresses};
use crate::zone::{Outcome, QType, WireAnswer, Zone};

/// Longest name (RFC 1035 2.3.4) and the most labels the zone's names have that the
/// fast path looks at; longer names take the general path.
const MAX_NAME: usize = 255;
const MAX_LABELS: usize = 16;

/// What was answered, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Answered {
    pub qtype: QueryType,
    pub rcode: Rcode,
}

/// Writes the response to `request` into `out` when the fast path can answer it
/// (see the module docs). `max_udp_payload`: the largest EDNS size honoured.
pub(crate) fn answer(
    zone: &Zone,
    request: &[u8],
    max_udp_payload: u16,
    out: &mut Vec<u8>,
) -> Option<Answered> {
    let header = request.get(..12)?;
    // QR clear and opcode QUERY; one question, no answers or authorities, at most
    // one additional (OPT).
    if header[2] & 0xF8 != 0 || header[4..10] != [0, 1, 0, 0, 0, 0] || header[10] != 0 {
        return None;
    }
    let additionals = header[11];
    if additionals > 1 {
        return None;
    }

    // The question name, lower-cased on the stack.
    let mut lower = [0u8; MAX_NAME];
    let mut bounds = [(0usize, 0usize); MAX_LABELS];
    let mut labels = 0;
    let mut i = 12;
    let mut written = 0;
    loop {
        let len = usize::from(*request.get(i)?);
        if len & 0xC0 != 0 {
            return None;
        }
        if len == 0 {
            i += 1;
            break;
        }
        let label = request.get(i + 1..i + 1 + len)?;
        // The name's wire length so far: label bytes, their length bytes, the root.
        if labels == MAX_LABELS || written + len + labels + 2 > MAX_NAME {
            return None;
        }
        let dst = &mut lower[written..written + len];
        dst.copy_from_slice(label);
        dst.make_ascii_lowercase();
        bounds[labels] = (written, written + len);
        labels += 1;
        written += len;
        i += 1 + len;
    }
    let qtype = u16::from_be_bytes([*request.get(i)?, *request.get(i + 1)?]);
    let qclass = u16::from_be_bytes([*request.get(i + 2)?, *request.get(i + 3)?]);
    let question_end = i + 4;
    if qclass != CLASS_IN || matches!(qtype, TYPE_OPT | 251 | 252) {
        // Other classes, OPT as a question, IXFR and AXFR: refused or FORMERR there.
        return None;
    }

    // EDNS: exactly one OPT record, version 0, to the end of the message.
    let edns_size = if additionals == 1 {
        let opt = request.get(question_end..question_end + 11)?;
        let rdlen = usize::from(u16::from_be_bytes([opt[9], opt[10]]));
        if opt[0] != 0
            || u16::from_be_bytes([opt[1], opt[2]]) != TYPE_OPT
            || opt[6] != 0
            || question_end + 11 + rdlen != request.len()
        {
            return None;
        }
        Some(u16::from_be_bytes([opt[3], opt[4]]).clamp(512, max_udp_payload.max(512)))
    } else {
        if question_end != request.len() {
            return None;
        }
        None
    };

    let mut names: [&str; MAX_LABELS] = [""; MAX_LABELS];
    for (slot, &(from, to)) in names.iter_mut().zip(&bounds[..labels]) {
        *slot = std::str::from_utf8(&lower[from..to]).ok()?;
    }
    let found = zone.wire_lookup(&names[..labels], zone_qtype(qtype))?;

    let rcode = match found {
        WireAnswer::Negative(Outcome::NxDomain) => 3,
        _ => 0,
    };
    out.clear();
    out.extend_from_slice(&header[..2]);
    // QR, AA, RD as asked; RA, CD as asked, the response code.
    out.push(0x80 | 0x04 | (header[2] & 0x01));
    out.push(0x80 | (header[3] & 0x10) | rcode);
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&request[12..question_end]);
    let (answers, authorities, mut extra): (u16, u16, u16) = match found {
        WireAnswer::Addresses { ips, v6 } => {
            (write_addresses(out, ips, v6, zone.config().ttl), 0, 0)
        }
        WireAnswer::Section(section) => {
            if !section.write_to(out) {
                return None;
            }
            (section.answers(), 0, section.additionals())
        }
        WireAnswer::Negative(_) => {
            let soa = zone.soa_wire()?;
            if !soa.write_to(out) {
                return None;
            }
            (0, soa.authorities(), 0)
        }
    };
    if let Some(size) = edns_size {
        // OPT: root owner, our payload size as class, extended rcode 0, version 0,
        // no flags, no options.
        out.extend_from_slice(&[0, 0, 41]);
        out.extend_from_slice(&size.to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        extra += 1;
    }
    // Over the client's limit: the general path truncates record by record.
    if out.len() > usize::from(edns_size.unwrap_or(512)) {
        return None;
    }
    out[6..8].copy_from_slice(&answers.to_be_bytes());
    out[8..10].copy_from_slice(&authorities.to_be_bytes());
    out[10..12].copy_from_slice(&extra.to_be_bytes());
    Some(Answered {
        qtype: super::handler::query_type_label(hickory_proto::rr::RecordType::from(qtype)),
        rcode: if rcode == 3 {
            Rcode::NXDOMAIN
        } else {
            Rcode::NOERROR
        },
    })
}

fn zone_qtype(t: u16) -> QType {
    match t {
        1 => QType::A,
        2 => QType::Ns,
        5 => QType::Cname,
        6 => QType::Soa,
        12 => QType::Ptr,
        16 => QType::Txt,
        28 => QType::Aaaa,
        33 => QType::Srv,
        255 => QType::Any,
        _ => QType::Other,
    }
}
