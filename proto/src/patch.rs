//! EndpointSlice patches: the part of a slice that changed, for agents that hold
//! the slice's previous version (see `EndpointSlicePatch` in the schema).
//!
//! A pod replacement rewrites one endpoint of a slice of up to 100 (1,000 at the
//! API's limit); sending that endpoint instead of the slice is what keeps a change
//! under a kilobyte per agent. [`diff`] runs once per change on the control plane
//! (the patch is encoded once and shared like any resource); [`apply`] runs on the
//! agent, which then checks the result's content hash.

use std::collections::HashSet;

use prost::Message;
use thiserror::Error;

use crate::model::{ConvertError, Endpoint, EndpointSlice};
use crate::v1;

/// Why a patch cannot be applied.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PatchError {
    #[error("removed position {0} is out of order or past the held list")]
    Removed(u32),
    #[error("added position {0} is out of order or past the new list")]
    AddedAt(u32),
    #[error("{positions} added positions for {endpoints} added endpoints")]
    Counts { positions: usize, endpoints: usize },
    #[error(transparent)]
    Convert(#[from] ConvertError),
}

/// The patch that turns `old` into `new`, or `None` when one cannot say it:
/// the slice's own fields differ (only endpoints are patched), or the endpoints
/// both keep were reordered. `base_hash` is `old`'s content hash. Whether the
/// patch is worth sending (smaller than `new`) is the caller's call.
pub fn diff(
    old: &v1::EndpointSlice,
    new: &v1::EndpointSlice,
    base_hash: u64,
) -> Option<v1::EndpointSlicePatch> {
    let same_slice = old.namespace == new.namespace
        && old.name == new.name
        && old.service_name == new.service_name
        && old.address_family == new.address_family
        && old.ignored_by_proxy == new.ignored_by_proxy
        && old.ports == new.ports;
    if !same_slice {
        return None;
    }
    // Endpoints compare by their encoding: exact, and hashable.
    let old_enc: Vec<Vec<u8>> = old.endpoints.iter().map(Message::encode_to_vec).collect();
    let new_enc: Vec<Vec<u8>> = new.endpoints.iter().map(Message::encode_to_vec).collect();
    let in_old: HashSet<&[u8]> = old_enc.iter().map(Vec::as_slice).collect();
    let in_new: HashSet<&[u8]> = new_enc.iter().map(Vec::as_slice).collect();
    let mut patch = v1::EndpointSlicePatch {
        base_hash,
        ..Default::default()
    };
    let mut kept_old = Vec::with_capacity(old_enc.len());
    for (i, e) in old_enc.iter().enumerate() {
        if in_new.contains(e.as_slice()) {
            kept_old.push(e.as_slice());
        } else {
            patch.removed.push(u32::try_from(i).ok()?);
        }
    }
    let mut kept_new = Vec::with_capacity(new_enc.len());
    for (i, e) in new_enc.iter().enumerate() {
        if in_old.contains(e.as_slice()) {
            kept_new.push(e.as_slice());
        } else {
            patch.added_at.push(u32::try_from(i).ok()?);
            patch.added.push(new.endpoints[i].clone());
        }
    }
    // Dropping then inserting reproduces `new` only if what both keep is in the
    // same order (and, with duplicates, the same multiplicity).
    (kept_old == kept_new).then_some(patch)
}

/// `held` with `patch` applied. The caller checks that `held`'s hash is the
/// patch's base and the result's hash is the one announced.
///
/// # Errors
/// Positions out of order or range, mismatched counts, or an invalid endpoint.
pub fn apply(
    held: &EndpointSlice,
    patch: &v1::EndpointSlicePatch,
) -> Result<EndpointSlice, PatchError> {
    if patch.added_at.len() != patch.added.len() {
        return Err(PatchError::Counts {
            positions: patch.added_at.len(),
            endpoints: patch.added.len(),
        });
    }
    let mut endpoints: Vec<Endpoint> = Vec::with_capacity(held.endpoints.len());
    let mut removed = patch.removed.iter().peekable();
    for (i, e) in held.endpoints.iter().enumerate() {
        if let Some(&&r) = removed.peek()
            && usize::try_from(r).is_ok_and(|r| r == i)
        {
            removed.next();
            continue;
        }
        endpoints.push(e.clone());
    }
    if let Some(&r) = removed.next() {
        // Either before the last one taken (out of order) or past the list.
        return Err(PatchError::Removed(r));
    }
    let mut previous: Option<usize> = None;
    for (&at, e) in patch.added_at.iter().zip(&patch.added) {
        let pos = usize::try_from(at).map_err(|_| PatchError::AddedAt(at))?;
        if previous.is_some_and(|p| pos <= p) || pos > endpoints.len() {
            return Err(PatchError::AddedAt(at));
        }
        endpoints.insert(pos, Endpoint::try_from(e)?);
        previous = Some(pos);
    }
    Ok(EndpointSlice {
        endpoints,
        ..held.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::content_hash;
    use crate::model::{AddressFamily, EndpointPort, Protocol, Resource};

    fn ep(i: u32) -> Endpoint {
        let mut e = Endpoint::ready(
            format!("198.18.{}.{}", i / 250, i % 250 + 1)
                .parse()
                .unwrap(),
        );
        e.node_name = Some(format!("node-{:05}", i * 7 % 5000));
        e.zone = Some("zone-a".into());
        e.target_pod = Some(format!("web-{i:08x}"));
        e
    }

    fn slice(ids: &[u32]) -> EndpointSlice {
        EndpointSlice {
            namespace: "default".into(),
            name: "web-abc".into(),
            service_name: "web".into(),
            address_family: AddressFamily::Ipv4,
            ports: vec![EndpointPort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
                app_protocol: None,
            }],
            endpoints: ids.iter().map(|&i| ep(i)).collect(),
            ignored_by_proxy: false,
        }
    }

    fn hash(s: &EndpointSlice) -> u64 {
        content_hash(&(&Resource::EndpointSlice(s.clone())).into())
    }

    /// diff then apply gives `new` exactly (same content hash).
    fn round_trip(old: &[u32], new: &[u32]) -> v1::EndpointSlicePatch {
        let (old, new) = (slice(old), slice(new));
        let patch = diff(&(&old).into(), &(&new).into(), hash(&old)).expect("a patch");
        assert_eq!(patch.base_hash, hash(&old));
        let got = apply(&old, &patch).unwrap();
        assert_eq!(got, new);
        assert_eq!(hash(&got), hash(&new));
        patch
    }

    #[test]
    fn one_replaced_pod_is_one_removal_and_one_addition() {
        let old: Vec<u32> = (0..100).collect();
        let mut new = old.clone();
        new[37] = 1000;
        let patch = round_trip(&old, &new);
        assert_eq!(patch.removed, vec![37]);
        assert_eq!(patch.added_at, vec![37]);
        // Far smaller than the slice.
        let full = v1::EndpointSlice::from(&slice(&new)).encoded_len();
        assert!(
            patch.encoded_len() * 20 < full,
            "{} vs {full}",
            patch.encoded_len()
        );
    }

    #[test]
    fn additions_removals_and_moves_at_the_ends() {
        round_trip(&[1, 2, 3], &[0, 1, 2, 3, 4]);
        round_trip(&[0, 1, 2, 3, 4], &[1, 3]);
        round_trip(&[1, 2, 3], &[]);
        round_trip(&[], &[5, 6]);
        round_trip(&[1, 2, 3], &[1, 2, 3]);
        // Appended at the end while one in the middle goes (the controller's way).
        round_trip(&[1, 2, 3, 4], &[1, 3, 4, 9]);
        // A status flip rewrites the endpoint in place.
        let old = slice(&[1, 2, 3]);
        let mut new = old.clone();
        new.endpoints[1].ready = false;
        let patch = diff(&(&old).into(), &(&new).into(), hash(&old)).unwrap();
        assert_eq!(
            (patch.removed.as_slice(), patch.added_at.as_slice()),
            (&[1][..], &[1][..])
        );
        assert_eq!(apply(&old, &patch).unwrap(), new);
    }

    #[test]
    fn pseudo_random_edits_round_trip() {
        // A small LCG: deterministic, no dependency.
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = |n: u64| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (x >> 33) % n
        };
        let mut fresh = 10_000;
        for _ in 0..300 {
            let len = next(40) as usize;
            let old: Vec<u32> = (0..len as u32).collect();
            let mut new = old.clone();
            for _ in 0..next(6) {
                match next(3) {
                    0 if !new.is_empty() => {
                        new.remove(next(new.len() as u64) as usize);
                    }
                    1 => {
                        fresh += 1;
                        new.insert(next(new.len() as u64 + 1) as usize, fresh);
                    }
                    _ if !new.is_empty() => {
                        fresh += 1;
                        let i = next(new.len() as u64) as usize;
                        new[i] = fresh;
                    }
                    _ => {}
                }
            }
            round_trip(&old, &new);
        }
    }

    #[test]
    fn what_a_patch_cannot_say_is_not_patched() {
        let old = slice(&[1, 2, 3]);
        // Reordered.
        let new = slice(&[3, 2, 1]);
        assert_eq!(diff(&(&old).into(), &(&new).into(), 1), None);
        // A slice field changed.
        let mut new = slice(&[1, 2, 3]);
        new.ports[0].port = 8080;
        assert_eq!(diff(&(&old).into(), &(&new).into(), 1), None);
        // Newly labelled headless or for another proxy.
        let mut new = slice(&[1, 2, 3]);
        new.ignored_by_proxy = true;
        assert_eq!(diff(&(&old).into(), &(&new).into(), 1), None);
    }

    #[test]
    fn bad_positions_are_errors_not_panics() {
        let held = slice(&[1, 2, 3]);
        let p = |removed: Vec<u32>, added_at: Vec<u32>| v1::EndpointSlicePatch {
            base_hash: 0,
            removed,
            added: added_at
                .iter()
                .map(|_| v1::Endpoint::from(&ep(9)))
                .collect(),
            added_at,
        };
        assert_eq!(
            apply(&held, &p(vec![3], vec![])),
            Err(PatchError::Removed(3))
        );
        assert_eq!(
            apply(&held, &p(vec![2, 1], vec![])),
            Err(PatchError::Removed(1))
        );
        assert_eq!(
            apply(&held, &p(vec![1, 1], vec![])),
            Err(PatchError::Removed(1))
        );
        assert_eq!(
            apply(&held, &p(vec![], vec![4])),
            Err(PatchError::AddedAt(4))
        );
        assert_eq!(
            apply(&held, &p(vec![], vec![1, 1])),
            Err(PatchError::AddedAt(1))
        );
        assert_eq!(
            apply(&held, &p(vec![], vec![u32::MAX])),
            Err(PatchError::AddedAt(u32::MAX))
        );
        let mut bad = p(vec![], vec![0]);
        bad.added[0].addresses = vec!["not-an-ip".into()];
        assert!(matches!(apply(&held, &bad), Err(PatchError::Convert(_))));
        let mut counts = p(vec![], vec![0]);
        counts.added.clear();
        assert!(matches!(
            apply(&held, &counts),
            Err(PatchError::Counts { .. })
        ));
        // Appending at the very end is fine.
        assert_eq!(
            apply(&held, &p(vec![], vec![3])).unwrap().endpoints.len(),
            4
        );
    }
}
