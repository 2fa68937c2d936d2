//! libFuzzer target: arbitrary bytes as an encoded `Update`, applied to a snapshot as
//! the subscriber applies it. Must never panic; the snapshot's digest must always
//! equal the digest of its inventory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshlite_proto::model::{Resource, ResourceKey};
use meshlite_proto::{InventoryDigest, v1};
use meshlite_runtime::Snapshot;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(update) = v1::Update::decode(data) else { return };
    let mut snapshot = Snapshot::new();
    for r in &update.upserts {
        if let Ok(res) = Resource::try_from(r) {
            snapshot.upsert(r.hash, res);
        }
    }
    for k in &update.removals {
        if let Ok(key) = k.parse::<ResourceKey>() {
            snapshot.remove(&key);
        }
    }
    let mut d = InventoryDigest::default();
    for (k, h) in snapshot.inventory() {
        d.add(k, h);
    }
    assert_eq!(d, snapshot.digest());
});
