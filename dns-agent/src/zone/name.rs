//! Name helpers: dashed-IP labels, reverse (`in-addr.arpa` / `ip6.arpa`) names and
//! the reverse zones that cover a CIDR.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// The label CoreDNS gives an endpoint without a hostname, and the pod-record label:
/// `198.18.1.1` -> `198-18-1-1`, `2001:db8::1` -> `2001-db8--1`.
pub fn dashed(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string().replace('.', "-"),
        IpAddr::V6(v6) => v6.to_string().replace(':', "-"),
    }
}

/// The inverse of [`dashed`] for pod names, as CoreDNS reads them: exactly three
/// dashes and no `--` is IPv4, anything else is tried as IPv6.
pub fn undash(label: &str) -> Option<IpAddr> {
    if label.matches('-').count() == 3 && !label.contains("--") {
        label
            .replace('-', ".")
            .parse::<Ipv4Addr>()
            .ok()
            .map(IpAddr::V4)
    } else {
        label
            .replace('-', ":")
            .parse::<Ipv6Addr>()
            .ok()
            .map(IpAddr::V6)
    }
}

/// `1.1.18.198.in-addr.arpa` for `198.18.1.1`; the full 32-nibble `ip6.arpa` form
/// for IPv6 (RFC 3596 section 2.5). No trailing dot.
pub fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut s = String::with_capacity(72);
            for byte in v6.octets().iter().rev() {
                // Writing to a String cannot fail.
                let _ = write!(s, "{:x}.{:x}.", byte & 0xf, byte >> 4);
            }
            s.push_str("ip6.arpa");
            s
        }
    }
}

/// Which reverse tree a name (labels left to right, lower case) is in, and the labels
/// before the `in-addr.arpa` / `ip6.arpa` suffix.
pub fn reverse_parts(labels: &[String]) -> Option<(Family, &[String])> {
    let n = labels.len();
    if n >= 2 && labels[n - 1] == "arpa" {
        match labels[n - 2].as_str() {
            "in-addr" => return Some((Family::V4, &labels[..n - 2])),
            "ip6" => return Some((Family::V6, &labels[..n - 2])),
            _ => {}
        }
    }
    None
}

/// Address family of a reverse name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// Parses the labels in front of `in-addr.arpa` / `ip6.arpa` into an address when
/// they name a whole one (4 decimal octets or 32 nibbles).
pub fn parse_reverse(family: Family, labels: &[String]) -> Option<IpAddr> {
    match family {
        Family::V4 => {
            if labels.len() != 4 {
                return None;
            }
            let mut o = [0u8; 4];
            for (i, l) in labels.iter().enumerate() {
                // Reject "01" and "+1": only the canonical decimal form names the address.
                if l.is_empty() || (l.len() > 1 && l.starts_with('0')) {
                    return None;
                }
                if !l.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                o[3 - i] = l.parse().ok()?;
            }
            Some(IpAddr::V4(Ipv4Addr::from(o)))
        }
        Family::V6 => {
            if labels.len() != 32 {
                return None;
            }
            let mut bytes = [0u8; 16];
            for (i, l) in labels.iter().enumerate() {
                let b = l.as_bytes();
                if b.len() != 1 {
                    return None;
                }
                let nibble = (b[0] as char).to_digit(16)? as u8;
                let idx = 15 - i / 2;
                if i % 2 == 0 {
                    bytes[idx] |= nibble;
                } else {
                    bytes[idx] |= nibble << 4;
                }
            }
            Some(IpAddr::V6(Ipv6Addr::from(bytes)))
        }
    }
}

/// The reverse zone that covers a CIDR: its prefix rounded down to whole labels
/// (octets for IPv4, nibbles for IPv6), e.g. `198.19.0.0/16` -> `19.198.in-addr.arpa`,
/// `10.96.0.0/12` -> `10.in-addr.arpa`. Labels left to right, lower case.
pub fn reverse_zone(net: &IpNet) -> Vec<String> {
    let full = reverse_name(net.network());
    let labels: Vec<String> = full.split('.').map(str::to_string).collect();
    let (per_label, total) = match net {
        IpNet::V4(_) => (8u8, 4usize),
        IpNet::V6(_) => (4u8, 32usize),
    };
    let keep = usize::from(net.prefix_len() / per_label);
    // Drop the host labels at the front; keep `keep` address labels plus the suffix.
    labels[total - keep..].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(s: &str) -> Vec<String> {
        s.split('.').map(str::to_string).collect()
    }

    #[test]
    fn dashed_round_trips() {
        for ip in ["198.18.1.1", "2001:db8::1", "::1", "2001:db8:0:0:1::"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(undash(&dashed(ip)), Some(ip), "{ip}");
        }
        assert_eq!(dashed("2001:db8::1".parse().unwrap()), "2001-db8--1");
        assert_eq!(undash("1-2-3"), None);
        assert_eq!(undash("a-b-c-d"), None);
        assert_eq!(undash("300-1-1-1"), None);
    }

    #[test]
    fn reverse_names() {
        assert_eq!(
            reverse_name("198.19.100.100".parse().unwrap()),
            "100.100.19.198.in-addr.arpa"
        );
        let v6 = reverse_name("2001:db8::567:89ab".parse().unwrap());
        assert_eq!(
            v6,
            "b.a.9.8.7.6.5.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"
        );
        for ip in ["198.19.100.100", "2001:db8::567:89ab", "0.0.0.0", "::"] {
            let ip: IpAddr = ip.parse().unwrap();
            let l = labels(&reverse_name(ip));
            let (fam, rest) = reverse_parts(&l).unwrap();
            assert_eq!(parse_reverse(fam, rest), Some(ip));
        }
        let l = labels("01.1.1.1.in-addr.arpa");
        let (fam, rest) = reverse_parts(&l).unwrap();
        assert_eq!(parse_reverse(fam, rest), None);
        let l = labels("1.1.1.in-addr.arpa");
        let (fam, rest) = reverse_parts(&l).unwrap();
        assert_eq!(parse_reverse(fam, rest), None);
    }

    #[test]
    fn reverse_zones_round_down() {
        let z = |s: &str| reverse_zone(&s.parse().unwrap()).join(".");
        assert_eq!(z("198.19.0.0/16"), "19.198.in-addr.arpa");
        assert_eq!(z("10.96.0.0/12"), "10.in-addr.arpa");
        assert_eq!(z("198.18.1.0/24"), "1.18.198.in-addr.arpa");
        assert_eq!(z("2001:db8::/32"), "8.b.d.0.1.0.0.2.ip6.arpa");
        assert_eq!(z("2001:db8::/34"), "8.b.d.0.1.0.0.2.ip6.arpa");
    }
}
