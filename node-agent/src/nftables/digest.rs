//! Digests of what was written, kept in the table itself, so a restarted agent
//! (or a periodic resync) learns what the kernel holds without listing it.
//!
//! Listing a 10k-service table takes seconds (`nft list table`: 4.5 s), longer
//! than writing it. Instead, the set [`DIGESTS`] holds one 128-bit digest per
//! chain (of its name and rules) and one per set or map (of its elements), each
//! written in the same transaction as what it describes. Verifying then reads
//! only the chain names and this set (about 0.1-0.2 s at 10k): a chain whose
//! digest is present holds exactly those rules, a set whose digest is present
//! holds exactly those elements, and everything else is rewritten. A set's
//! digest is the XOR of its elements' digests, so a sync updates it in O(change).
//!
//! The digests are written as `ipv6_addr` elements, the only 128-bit key type.

use std::net::Ipv6Addr;

use sha2::{Digest, Sha256};

/// The set of digests (ours; not in kube-proxy's layout).
pub const DIGESTS: &str = "meshlite-digests";

/// The declaration of [`DIGESTS`].
pub fn declaration() -> &'static str {
    "{ type ipv6_addr ; comment \"meshlite: digests of the chains, sets and maps as last written\" ; }"
}

fn digest(parts: &[&[u8]]) -> u128 {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    let d = h.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    u128::from_be_bytes(b)
}

/// The element naming a digest.
pub fn element(d: u128) -> String {
    Ipv6Addr::from(d).to_string()
}

/// A chain's digest element.
pub fn chain(name: &str, rules: &[String]) -> String {
    let mut parts: Vec<&[u8]> = vec![b"chain", name.as_bytes()];
    parts.extend(rules.iter().map(|r| r.as_bytes()));
    element(digest(&parts))
}

/// One element's share of its set's digest.
pub fn member(set: &str, key: &str, value: &str) -> u128 {
    digest(&[b"element", set.as_bytes(), key.as_bytes(), value.as_bytes()])
}

/// A set's digest element, from the XOR of its members' shares.
pub fn set(set: &str, xor: u128) -> String {
    element(digest(&[b"set", set.as_bytes(), &xor.to_be_bytes()]))
}

/// A set's digest element, from all its elements (key, value).
pub fn set_of<'a>(set: &str, items: impl IntoIterator<Item = (&'a String, &'a String)>) -> String {
    let xor = items.into_iter().fold(0, |x, (k, v)| x ^ member(set, k, v));
    self::set(set, xor)
}

/// The fixed part's digest element (declarations and base chains).
pub fn base(script: &str) -> String {
    element(digest(&[b"base", script.as_bytes()]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_digest_does_not_depend_on_order() {
        let a = member("s", "1", "") ^ member("s", "2", "");
        let b = member("s", "2", "") ^ member("s", "1", "");
        assert_eq!(set("s", a), set("s", b));
        assert_ne!(set("s", a), set("s", member("s", "1", "")));
        assert_ne!(set("s", 0), set("t", 0));
    }

    #[test]
    fn a_chain_digest_covers_name_and_rules() {
        let r = vec!["goto x".to_string()];
        assert_ne!(chain("a", &r), chain("b", &r));
        assert_ne!(chain("a", &r), chain("a", &[]));
        // Rule boundaries count: ["ab"] is not ["a", "b"].
        assert_ne!(
            chain("c", &["ab".to_string()]),
            chain("c", &["a".to_string(), "b".to_string()])
        );
        assert!(chain("a", &r).parse::<Ipv6Addr>().is_ok());
    }
}
