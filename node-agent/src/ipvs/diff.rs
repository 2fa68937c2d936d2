//! The difference between the planned virtual servers and what the kernel holds,
//! as a list of IPVS operations, with kube-proxy's graceful termination. Pure.
//!
//! Graceful termination (kube-proxy's `GracefulTerminationManager`): a real server
//! that is no longer wanted first gets weight 0, so schedulers stop giving it new
//! connections while its established ones go on; it is deleted once it has no
//! active and no inactive connection left (at once for UDP and SCTP, which have no
//! teardown), or when `timeout` has passed since it was drained, which kube-proxy
//! does not bound. A drained real server that is wanted again gets its weight back.
//! A virtual server that is no longer wanted is deleted at once, real servers and
//! all, as kube-proxy does.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use meshlite_proto::model::Protocol;
use tokio::time::Instant;

use super::Scheduler;
use super::plan::{FLAG_HASHED, VirtualServer, VsKey};

/// A real server as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KernelDest {
    pub weight: u32,
    pub active: u32,
    pub inactive: u32,
}

/// A virtual server as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KernelVs {
    /// The scheduler's name (any scheduler, not only the ones we use).
    pub scheduler: String,
    pub flags: u32,
    pub timeout: u32,
    pub dests: BTreeMap<SocketAddr, KernelDest>,
}

/// The kernel's IPVS table (the part we manage).
pub type KernelState = BTreeMap<VsKey, KernelVs>;

/// The attributes of a virtual server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VsAttrs {
    pub scheduler: Scheduler,
    pub flags: u32,
    pub timeout: u32,
}

/// One IPVS netlink operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    AddService {
        key: VsKey,
        attrs: VsAttrs,
    },
    EditService {
        key: VsKey,
        attrs: VsAttrs,
    },
    DelService {
        key: VsKey,
    },
    AddDest {
        key: VsKey,
        dest: SocketAddr,
        weight: u32,
    },
    EditDest {
        key: VsKey,
        dest: SocketAddr,
        weight: u32,
    },
    DelDest {
        key: VsKey,
        dest: SocketAddr,
    },
}

/// Real servers being drained: since when.
pub type Draining = BTreeMap<(VsKey, SocketAddr), Instant>;

/// The operations, grouped so they can be sent in this order: creations and
/// updates first (traffic moves to the new real servers before old ones stop
/// taking connections), then the deletions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ops {
    pub upserts: Vec<Op>,
    pub deletes: Vec<Op>,
}

// === impl VsAttrs ===

impl VsAttrs {
    pub fn of(vs: &VirtualServer) -> Self {
        Self {
            scheduler: vs.scheduler,
            flags: vs.flags & !FLAG_HASHED,
            timeout: vs.timeout,
        }
    }

    fn matches(&self, k: &KernelVs) -> bool {
        self.scheduler.as_str() == k.scheduler
            && self.flags == k.flags & !FLAG_HASHED
            && self.timeout == k.timeout
    }
}

// === impl Ops ===

impl Ops {
    pub fn len(&self) -> usize {
        self.upserts.len() + self.deletes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every operation in the order to send them.
    pub fn iter(&self) -> impl Iterator<Item = &Op> {
        self.upserts.iter().chain(&self.deletes)
    }
}

// === impl KernelVs ===

impl KernelVs {
    /// What the kernel holds after creating `vs` from scratch.
    pub fn from_plan(vs: &VirtualServer) -> Self {
        Self {
            scheduler: vs.scheduler.as_str().to_string(),
            flags: vs.flags,
            timeout: vs.timeout,
            dests: vs
                .dests
                .iter()
                .map(|(a, w)| {
                    (
                        *a,
                        KernelDest {
                            weight: *w,
                            ..KernelDest::default()
                        },
                    )
                })
                .collect(),
        }
    }
}

/// Whether a drained real server may go now.
fn may_delete(
    protocol: Protocol,
    d: &KernelDest,
    fresh: bool,
    since: Instant,
    now: Instant,
    timeout: Duration,
) -> bool {
    protocol != Protocol::Tcp
        || now.saturating_duration_since(since) >= timeout
        || (fresh && d.active == 0 && d.inactive == 0)
}

/// The operations that turn `kernel` into `desired`.
///
/// `fresh` says the connection counts in `kernel` were just read from the kernel
/// (a full sync); otherwise they are the cached state of the last sync and no TCP
/// real server is deleted for having no connections (housekeeping does that with
/// fresh counts, see [`drain`]). `draining` is updated: real servers drained now
/// are added, deleted or restored ones removed.
pub fn diff(
    desired: &BTreeMap<VsKey, VirtualServer>,
    kernel: &KernelState,
    draining: &mut Draining,
    fresh: bool,
    now: Instant,
    timeout: Duration,
) -> Ops {
    let mut ops = Ops::default();
    for (key, vs) in desired {
        let attrs = VsAttrs::of(vs);
        let Some(k) = kernel.get(key) else {
            ops.upserts.push(Op::AddService { key: *key, attrs });
            for (dest, weight) in &vs.dests {
                ops.upserts.push(Op::AddDest {
                    key: *key,
                    dest: *dest,
                    weight: *weight,
                });
            }
            continue;
        };
        if !attrs.matches(k) {
            ops.upserts.push(Op::EditService { key: *key, attrs });
        }
        for (dest, weight) in &vs.dests {
            match k.dests.get(dest) {
                None => ops.upserts.push(Op::AddDest {
                    key: *key,
                    dest: *dest,
                    weight: *weight,
                }),
                Some(kd) if kd.weight != *weight => ops.upserts.push(Op::EditDest {
                    key: *key,
                    dest: *dest,
                    weight: *weight,
                }),
                Some(_) => {}
            }
            draining.remove(&(*key, *dest));
        }
        for (dest, kd) in &k.dests {
            if vs.dests.contains_key(dest) {
                continue;
            }
            let since = *draining.entry((*key, *dest)).or_insert(now);
            if may_delete(key.protocol, kd, fresh, since, now, timeout) {
                ops.deletes.push(Op::DelDest {
                    key: *key,
                    dest: *dest,
                });
                draining.remove(&(*key, *dest));
            } else if kd.weight != 0 {
                ops.upserts.push(Op::EditDest {
                    key: *key,
                    dest: *dest,
                    weight: 0,
                });
            }
        }
    }
    for key in kernel.keys() {
        if !desired.contains_key(key) {
            ops.deletes.push(Op::DelService { key: *key });
        }
    }
    // Forget drained real servers that are gone (or whose service is).
    draining.retain(|(key, dest), _| {
        desired.contains_key(key) && kernel.get(key).is_some_and(|k| k.dests.contains_key(dest))
    });
    ops
}

/// Housekeeping for drained real servers, with connection counts just read from
/// the kernel (`fresh`: virtual server -> its real servers). Returns the deletions
/// due and forgets them.
pub fn drain(
    draining: &mut Draining,
    fresh: &BTreeMap<VsKey, BTreeMap<SocketAddr, KernelDest>>,
    now: Instant,
    timeout: Duration,
) -> Vec<Op> {
    let mut ops = Vec::new();
    let mut forget = BTreeSet::new();
    for ((key, dest), since) in draining.iter() {
        match fresh.get(key).and_then(|d| d.get(dest)) {
            None => {
                forget.insert((*key, *dest));
            }
            Some(d) if d.weight != 0 => {
                // Someone gave it a weight again: not ours to delete.
                forget.insert((*key, *dest));
            }
            Some(d) => {
                if may_delete(key.protocol, d, true, *since, now, timeout) {
                    ops.push(Op::DelDest {
                        key: *key,
                        dest: *dest,
                    });
                    forget.insert((*key, *dest));
                }
            }
        }
    }
    draining.retain(|k, _| !forget.contains(k));
    ops
}

/// Applies successful operations to the cached kernel state.
pub fn apply_to(kernel: &mut KernelState, ops: &[&Op]) {
    for op in ops {
        match op {
            Op::AddService { key, attrs } | Op::EditService { key, attrs } => {
                let k = kernel.entry(*key).or_default();
                k.scheduler = attrs.scheduler.as_str().to_string();
                k.flags = attrs.flags;
                k.timeout = attrs.timeout;
            }
            Op::DelService { key } => {
                kernel.remove(key);
            }
            Op::AddDest { key, dest, weight } | Op::EditDest { key, dest, weight } => {
                kernel
                    .entry(*key)
                    .or_default()
                    .dests
                    .entry(*dest)
                    .or_default()
                    .weight = *weight;
            }
            Op::DelDest { key, dest } => {
                if let Some(k) = kernel.get_mut(key) {
                    k.dests.remove(dest);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
