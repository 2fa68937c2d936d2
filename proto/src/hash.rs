//! Content hashes and inventory digests shared by the control plane and the agents.
//!
//! A resource's hash is the first 8 bytes of sha256 over the protobuf encoding of its
//! normalized form. prost encodes fields in tag order and our maps are `BTreeMap`s, so
//! the encoding, and with it the hash, is deterministic across processes and restarts.

use prost::Message;
use sha2::{Digest, Sha256};

use crate::v1;

/// Hash of a normalized resource body.
pub fn content_hash(kind: &v1::resource::Kind) -> u64 {
    let mut buf = Vec::with_capacity(256);
    match kind {
        v1::resource::Kind::Service(s) => {
            buf.push(1);
            s.encode(&mut buf)
        }
        v1::resource::Kind::EndpointSlice(s) => {
            buf.push(2);
            s.encode(&mut buf)
        }
        v1::resource::Kind::Node(n) => {
            buf.push(3);
            n.encode(&mut buf)
        }
        // Never a content hash of its own (a patch carries its result's), but defined.
        v1::resource::Kind::EndpointSlicePatch(p) => {
            buf.push(4);
            p.encode(&mut buf)
        }
    }
    // Encoding into a Vec grows it as needed; it cannot run out of space.
    .expect("encoding into a Vec is infallible");
    first_u64(&Sha256::digest(&buf))
}

/// One (key, hash) pair's contribution to an inventory digest.
pub fn digest_entry(key: &str, hash: u64) -> u64 {
    let mut h = Sha256::new();
    h.update(key.as_bytes());
    h.update([0]);
    h.update(hash.to_be_bytes());
    first_u64(&h.finalize())
}

/// An order-independent digest of a set of (key, hash) pairs: the wrapping sum of
/// [`digest_entry`]. Add and subtract entries as the set changes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InventoryDigest {
    pub sum: u64,
    pub count: u64,
}

impl InventoryDigest {
    pub fn add(&mut self, key: &str, hash: u64) {
        self.sum = self.sum.wrapping_add(digest_entry(key, hash));
        self.count += 1;
    }

    pub fn remove(&mut self, key: &str, hash: u64) {
        self.sum = self.sum.wrapping_sub(digest_entry(key, hash));
        self.count = self.count.saturating_sub(1);
    }

    pub fn merge(&mut self, other: InventoryDigest) {
        self.sum = self.sum.wrapping_add(other.sum);
        self.count += other.count;
    }
}

fn first_u64(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[..8]);
    u64::from_be_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str) -> v1::resource::Kind {
        v1::resource::Kind::Service(v1::Service {
            namespace: "default".into(),
            name: name.into(),
            cluster_ips: vec!["198.19.0.1".into()],
            annotations: [
                ("b".to_string(), "2".to_string()),
                ("a".to_string(), "1".to_string()),
            ]
            .into(),
            ..Default::default()
        })
    }

    #[test]
    fn hash_is_stable_and_content_sensitive() {
        // Pinned: a change here means every agent's inventory stops matching after upgrade.
        assert_eq!(content_hash(&svc("web")), content_hash(&svc("web")));
        assert_ne!(content_hash(&svc("web")), content_hash(&svc("web2")));
        assert_eq!(
            format!("{:016x}", content_hash(&svc("web"))),
            "0c9223c507537810"
        );
    }

    #[test]
    fn digest_is_order_independent() {
        let mut a = InventoryDigest::default();
        a.add("x", 1);
        a.add("y", 2);
        let mut b = InventoryDigest::default();
        b.add("y", 2);
        b.add("x", 1);
        assert_eq!(a, b);
        b.remove("y", 2);
        b.add("y", 3);
        assert_ne!(a, b);
    }
}
