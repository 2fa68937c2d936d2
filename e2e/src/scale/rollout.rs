//! `--churn-pattern rollout`: Deployments' rolling updates, written as the
//! EndpointSlice controller writes them.
//!
//! Each service is a Deployment; they roll one after another, biggest first. A
//! rollout replaces the pods in waves of a quarter of them (the default
//! `maxSurge`/`maxUnavailable` of 25 %). In a wave, each old pod turns terminating
//! (not ready, still serving) and a new pod appears not ready, in the slice with the
//! most room (a new slice when all are full); then the new pods turn ready; then
//! the old ones are removed. Every transition is one write of the slice holding
//! that pod, and one change for the harness: a wave of `w` pods is `4w` slice
//! writes, and a 500/s rate is 125 pods replaced per second. Successive writes to
//! the same slice follow each other without waiting for the previous one to reach
//! the agents, as in a real rollout; see [`super::track`] for how they are timed.

use std::collections::VecDeque;
use std::time::SystemTime;

use super::cluster::{
    Cluster, Endpoint, Mutation, MutationKind, Op, SLICE_MAX, Slice, slice_json, slice_key,
};

/// Pods replaced per wave: this share of the Deployment, at least one.
const SURGE: f64 = 0.25;

/// One pod transition (one slice write).
#[derive(Debug, Clone)]
enum Step {
    /// An old pod starts terminating.
    Terminate { svc: usize, pod: String },
    /// A new pod is created, not ready yet.
    Create { svc: usize, ep: Endpoint },
    /// A new pod passed its readiness probe.
    Ready { svc: usize, pod: String },
    /// An old pod is gone.
    Remove { svc: usize, pod: String },
}

/// Transitions written so far, by kind.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct RolloutCounts {
    pub deployments_started: usize,
    pub waves: usize,
    pub terminating: usize,
    pub created: usize,
    pub ready: usize,
    pub removed: usize,
    pub slices_created: usize,
}

/// See the module docs.
#[derive(Debug, Default)]
pub struct Rollout {
    /// Services still to roll, biggest first.
    queue: VecDeque<usize>,
    /// The rolling service and its pods not yet replaced.
    current: Option<(usize, VecDeque<String>, usize)>,
    steps: VecDeque<Step>,
    /// The last trigger time written: each write's is later, so the tracker can
    /// tell successive writes of one slice apart.
    last_trigger: Option<SystemTime>,
    pub counts: RolloutCounts,
}

// === impl RolloutCounts ===

impl RolloutCounts {
    /// The transitions written since `before`.
    pub fn since(&self, before: &Self) -> Self {
        Self {
            deployments_started: self.deployments_started - before.deployments_started,
            waves: self.waves - before.waves,
            terminating: self.terminating - before.terminating,
            created: self.created - before.created,
            ready: self.ready - before.ready,
            removed: self.removed - before.removed,
            slices_created: self.slices_created - before.slices_created,
        }
    }
}

// === impl Rollout ===

impl Rollout {
    /// The next slice write, or None when no live service has endpoints.
    pub fn next(&mut self, cluster: &mut Cluster) -> Option<Mutation> {
        // Bounded: a planned wave always yields steps unless its service died.
        for _ in 0..cluster.services.len() * 2 + 2 {
            if let Some(step) = self.steps.pop_front() {
                if let Some(m) = self.apply(cluster, step) {
                    return Some(m);
                }
                continue;
            }
            self.plan_wave(cluster)?;
        }
        None
    }

    /// Queues the next wave's steps; None when there is nothing to roll.
    fn plan_wave(&mut self, cluster: &mut Cluster) -> Option<()> {
        let done = self
            .current
            .as_ref()
            .is_none_or(|(svc, old, _)| old.is_empty() || !cluster.services[*svc].alive);
        if done {
            if self.queue.is_empty() {
                let mut order: Vec<usize> = (0..cluster.services.len())
                    .filter(|i| cluster.services[*i].alive)
                    .collect();
                order.sort_by_key(|i| std::cmp::Reverse(pod_count(cluster, *i)));
                self.queue = order.into();
            }
            let svc = self.queue.pop_front()?;
            let old: VecDeque<String> = cluster.services[svc]
                .slices
                .iter()
                .flat_map(|s| &s.endpoints)
                .map(|e| e.pod.clone())
                .collect();
            let wave = ((old.len() as f64 * SURGE).ceil() as usize).max(1);
            self.current = Some((svc, old, wave));
            self.counts.deployments_started += 1;
        }
        let (svc, old, wave) = self.current.as_mut()?;
        let svc = *svc;
        let olds: Vec<String> = (0..*wave).filter_map(|_| old.pop_front()).collect();
        if olds.is_empty() {
            return Some(());
        }
        self.counts.waves += 1;
        let name = cluster.services[svc].name.clone();
        let mut news = Vec::new();
        for pod in &olds {
            let mut ep = cluster.new_endpoint(&name);
            ep.ready = false;
            news.push(ep.pod.clone());
            self.steps.push_back(Step::Terminate {
                svc,
                pod: pod.clone(),
            });
            self.steps.push_back(Step::Create { svc, ep });
        }
        self.steps
            .extend(news.into_iter().map(|pod| Step::Ready { svc, pod }));
        self.steps
            .extend(olds.into_iter().map(|pod| Step::Remove { svc, pod }));
        Some(())
    }

    /// Applies one step to the cluster; the write, or None if its pod is gone
    /// (its service was deleted meanwhile).
    fn apply(&mut self, cluster: &mut Cluster, step: Step) -> Option<Mutation> {
        let (svc_i, slice_i) = match step {
            Step::Terminate { svc, pod } => {
                let (li, ei) = find(cluster, svc, &pod)?;
                cluster.services[svc].slices[li].endpoints[ei].terminating = true;
                self.counts.terminating += 1;
                (svc, li)
            }
            Step::Ready { svc, pod } => {
                let (li, ei) = find(cluster, svc, &pod)?;
                cluster.services[svc].slices[li].endpoints[ei].ready = true;
                self.counts.ready += 1;
                (svc, li)
            }
            Step::Remove { svc, pod } => {
                let (li, ei) = find(cluster, svc, &pod)?;
                cluster.services[svc].slices[li].endpoints.remove(ei);
                self.counts.removed += 1;
                (svc, li)
            }
            Step::Create { svc, ep } => {
                let s = cluster.services.get_mut(svc).filter(|s| s.alive)?;
                let roomiest = s
                    .slices
                    .iter()
                    .enumerate()
                    .filter(|(_, sl)| sl.endpoints.len() < SLICE_MAX)
                    .min_by_key(|(_, sl)| sl.endpoints.len())
                    .map(|(i, _)| i);
                let li = match roomiest {
                    Some(i) => i,
                    None => {
                        // Slices are never deleted here, so the count names a new one.
                        let name = format!("{}-s{}", s.name, s.slices.len());
                        s.slices.push(Slice {
                            name,
                            endpoints: Vec::new(),
                        });
                        self.counts.slices_created += 1;
                        s.slices.len() - 1
                    }
                };
                s.slices[li].endpoints.push(ep);
                self.counts.created += 1;
                (svc, li)
            }
        };
        let s = &cluster.services[svc_i];
        let sl = &s.slices[slice_i];
        let now = SystemTime::now();
        let trigger = match self.last_trigger {
            Some(t) if t >= now => t + std::time::Duration::from_micros(1),
            _ => now,
        };
        self.last_trigger = Some(trigger);
        Some(Mutation {
            kind: MutationKind::Endpoint,
            key: slice_key(s, sl),
            ops: vec![Op::Apply(slice_json(s, sl, trigger))],
            slice_endpoints: sl.endpoints.len(),
            trigger,
        })
    }
}

fn pod_count(cluster: &Cluster, svc: usize) -> usize {
    cluster.services[svc]
        .slices
        .iter()
        .map(|s| s.endpoints.len())
        .sum()
}

/// The (slice, endpoint) index of `pod` in live service `svc`.
fn find(cluster: &Cluster, svc: usize, pod: &str) -> Option<(usize, usize)> {
    let s = cluster.services.get(svc).filter(|s| s.alive)?;
    s.slices.iter().enumerate().find_map(|(li, sl)| {
        sl.endpoints
            .iter()
            .position(|e| e.pod == pod)
            .map(|ei| (li, ei))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conditions(m: &Mutation) -> Vec<(String, bool, bool, bool)> {
        let Op::Apply(obj) = &m.ops[0] else {
            panic!("apply")
        };
        obj["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let c = &e["conditions"];
                (
                    e["targetRef"]["name"].as_str().unwrap().to_string(),
                    c["ready"].as_bool().unwrap(),
                    c["serving"].as_bool().unwrap(),
                    c["terminating"].as_bool().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn a_deployment_rolls_in_waves_through_every_transition() {
        let mut c = Cluster::generate(20, 400, 5, 3).unwrap();
        let biggest = (0..c.services.len())
            .max_by_key(|i| pod_count(&c, *i))
            .unwrap();
        let n = pod_count(&c, biggest);
        let before: Vec<String> = c.services[biggest]
            .slices
            .iter()
            .flat_map(|s| &s.endpoints)
            .map(|e| e.pod.clone())
            .collect();
        let wave = (n as f64 * SURGE).ceil() as usize;
        let mut r = Rollout::default();
        // The first wave: terminate + create for each pod, then ready, then remove.
        let first: Vec<Mutation> = (0..4 * wave).map(|_| r.next(&mut c).unwrap()).collect();
        assert!(first.iter().all(|m| m.key.starts_with(&format!(
            "endpointslice/{}/{}-s",
            c.services[biggest].namespace, c.services[biggest].name
        ))));
        let t = conditions(&first[0]);
        let old = t.iter().find(|e| e.0 == before[0]).unwrap();
        assert_eq!(
            (old.1, old.2, old.3),
            (false, true, true),
            "terminating, serving"
        );
        let created = conditions(&first[1]);
        let new = created.iter().find(|e| !before.contains(&e.0)).unwrap();
        assert_eq!((new.1, new.2, new.3), (false, false, false), "not ready");
        assert_eq!(pod_count(&c, biggest), n, "removals come last in the wave");
        assert_eq!(r.counts.waves, 1);
        // The whole rollout: every old pod replaced, the count unchanged.
        let mut writes = 4 * wave;
        while r.counts.deployments_started == 1 {
            r.next(&mut c).unwrap();
            writes += 1;
        }
        assert_eq!(writes - 1, 4 * n, "four writes per pod");
        let after: Vec<&Endpoint> = c.services[biggest]
            .slices
            .iter()
            .flat_map(|s| &s.endpoints)
            .collect();
        assert_eq!(after.len(), n);
        assert!(after.iter().all(|e| e.ready && !e.terminating));
        assert!(after.iter().all(|e| !before.contains(&e.pod)));
        assert!(after.len() <= c.services[biggest].slices.len() * SLICE_MAX);
        assert_eq!(r.counts.deployments_started, 2, "then the next Deployment");
    }

    #[test]
    fn writes_to_one_slice_carry_increasing_trigger_times() {
        let mut c = Cluster::generate(5, 50, 2, 4).unwrap();
        let mut r = Rollout::default();
        let ms: Vec<Mutation> = (0..40).map(|_| r.next(&mut c).unwrap()).collect();
        for w in ms.windows(2) {
            assert!(w[0].trigger < w[1].trigger);
        }
    }
}
