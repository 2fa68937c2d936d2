//! Cutting one update into frames under the chunk limit.

use prost::Message;

use meshlite_proto::v1;

use crate::store::Delta;

/// Fixed overhead budget per frame for the header fields.
const HEADER_BYTES: usize = 128;

/// Splits an update into frames of at most about `chunk_bytes` each (a single
/// resource larger than that gets a frame of its own). Upserts come first, then
/// removals, then causes; only the final frame has `last_chunk`. Always at least
/// one frame, so an empty update still reaches the agent.
pub fn frames(
    epoch: u64,
    base_version: u64,
    nonce: &str,
    delta: Delta,
    chunk_bytes: usize,
) -> Vec<v1::UpdateFrame> {
    let new_frame = || v1::UpdateFrame {
        epoch,
        version: delta.version,
        base_version,
        nonce: nonce.to_string(),
        ..Default::default()
    };
    let mut out = Vec::new();
    let mut cur = new_frame();
    let mut size = HEADER_BYTES;
    let room = |cur: &mut v1::UpdateFrame, size: &mut usize, need: usize, out: &mut Vec<_>| {
        let empty = cur.upserts.is_empty() && cur.removals.is_empty() && cur.causes.is_empty();
        if *size + need > chunk_bytes && !empty {
            out.push(std::mem::replace(cur, new_frame()));
            *size = HEADER_BYTES;
        }
        *size += need;
    };
    for u in delta.upserts {
        room(&mut cur, &mut size, u.len() + 6, &mut out);
        cur.upserts.push(u);
    }
    for r in delta.removals {
        room(&mut cur, &mut size, r.len() + 6, &mut out);
        cur.removals.push(r);
    }
    for c in delta.causes {
        room(&mut cur, &mut size, c.encoded_len() + 6, &mut out);
        cur.causes.push(c);
    }
    cur.last_chunk = true;
    out.push(cur);
    out
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    #[test]
    fn splits_under_the_limit_and_marks_the_last() {
        let delta = Delta {
            version: 9,
            upserts: (0..100).map(|_| Bytes::from(vec![0u8; 1000])).collect(),
            removals: vec!["service/a/b".into()],
            causes: vec![],
            patches: 0,
        };
        let f = frames(1, 3, "n", delta, 10_000);
        assert!(f.len() >= 10, "{}", f.len());
        assert_eq!(f.iter().map(|f| f.upserts.len()).sum::<usize>(), 100);
        for fr in &f {
            assert!(fr.encoded_len() <= 10_000 + 1100, "{}", fr.encoded_len());
            assert_eq!(
                (fr.version, fr.base_version, fr.nonce.as_str()),
                (9, 3, "n")
            );
        }
        assert_eq!(f.iter().filter(|f| f.last_chunk).count(), 1);
        assert!(f.last().unwrap().last_chunk);
    }

    #[test]
    fn empty_update_is_one_frame() {
        let f = frames(1, 0, "n", Delta::default(), 100);
        assert_eq!(f.len(), 1);
        assert!(f[0].last_chunk);
    }

    #[test]
    fn frame_decodes_as_update() {
        let r = v1::Resource {
            key: "node/n1".into(),
            hash: 7,
            kind: Some(v1::resource::Kind::Node(v1::Node {
                name: "n1".into(),
                ..Default::default()
            })),
        };
        let delta = Delta {
            version: 2,
            upserts: vec![Bytes::from(r.encode_to_vec())],
            removals: vec!["service/x/y".into()],
            causes: vec![],
            patches: 0,
        };
        let f = frames(5, 1, "7", delta, 1 << 20).remove(0);
        let u = v1::Update::decode(f.encode_to_vec().as_slice()).unwrap();
        assert_eq!(u.upserts, vec![r]);
        assert_eq!(u.removals, vec!["service/x/y"]);
        assert_eq!((u.epoch, u.version, u.base_version), (5, 2, 1));
    }
}
