//! `--source kube`: one kube-runtime watcher each on Services, EndpointSlices and
//! Nodes, cluster wide, with bookmarks.
//!
//! Each watcher's events go through a [`KindWatch`], a pure state machine that says
//! what the store should do ([`Action`]); the driver ([`spawn`]) does it, counts it
//! and traces it. The watcher's `Init .. InitApply* .. InitDone` bracket (initial
//! list, and every re-list after a 410 Gone or a dropped connection) is buffered
//! and swapped into the store in one step with [`Store::sync`], which only changes
//! what differs: a re-list never tells agents to delete what still exists. An
//! object that fails to normalize is logged and counted, and its last good state
//! stays (also across a re-list).
//!
//! Errors are retried by what they say ([`retry`]): a 410 Gone re-lists at once, and
//! the wait after an outage is at most a second, not kube-rs' default 30 s.

pub mod retry;

use std::collections::HashSet;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use kube::Api;
use kube::runtime::watcher::{self, Event};
use meshlite_k8s::{Invalid, KubeObject, Options, key_of};
use meshlite_proto::model::ResourceKey;
use tracing::{debug, info, warn};

use crate::metrics::{EventLabels, EventType, KindLabels, Metrics, WatchErrorLabels};
use crate::store::{Cause, Change, Encoded, Kind, Store};

/// Listed objects with their trigger times.
pub type Listed = Vec<(Encoded, Option<SystemTime>)>;

/// What one watcher event asks of the store.
#[derive(Debug)]
pub enum Action {
    /// Nothing (a list is still being read, or a watcher-internal step).
    Nothing,
    /// An object was added or changed (the store skips it if it holds it already).
    Upsert {
        value: Encoded,
        trigger: Option<SystemTime>,
    },
    /// An object was deleted.
    Delete(ResourceKey),
    /// A list completed: the kind is now exactly `objects`, plus `keep` (objects
    /// that failed to normalize, whose last good state stays).
    Replace {
        objects: Listed,
        keep: HashSet<ResourceKey>,
    },
    /// The watcher failed: poll it again after this long (`None`: at once).
    Retry {
        class: retry::Class,
        wait: Option<Duration>,
    },
}

/// What one event did besides its action, for logs and metrics.
#[derive(Debug, Default)]
pub struct Notes {
    /// Parts of the object dropped by normalization.
    pub warnings: Vec<String>,
    /// The object could not be used; its last good state is kept.
    pub invalid: Option<Invalid>,
    /// The API server delivered again after this many errors.
    pub recovered_after: Option<u64>,
    /// Errors in a row, this one included (0 when the event was not an error).
    pub failing: u64,
    /// The error, when the event was one.
    pub error: Option<String>,
}

/// The state of one kind's watch. See the module docs.
#[derive(Debug)]
pub struct KindWatch<K> {
    opts: Arc<Options>,
    /// A list in progress: its objects, and keys to keep (failed to normalize).
    relist: Option<(Listed, HashSet<ResourceKey>)>,
    retry: retry::Retry,
    /// Errors since the API server last delivered something.
    failing: u64,
    _kind: PhantomData<fn() -> K>,
}

// === impl KindWatch ===

impl<K: KubeObject> KindWatch<K> {
    pub fn new(opts: Arc<Options>) -> Self {
        Self {
            opts,
            relist: None,
            retry: retry::Retry::new(),
            failing: 0,
            _kind: PhantomData,
        }
    }

    /// Takes one watcher event.
    pub fn on_event(&mut self, event: Result<Event<K>, watcher::Error>) -> (Action, Notes) {
        let mut notes = Notes::default();
        // `Init` is the watcher's own step before it lists; everything else that is
        // not an error came from the API server.
        if matches!(&event, Ok(e) if !matches!(e, Event::Init)) {
            self.retry.reset();
            if self.failing > 0 {
                notes.recovered_after = Some(std::mem::take(&mut self.failing));
            }
        }
        let action = match event {
            Ok(Event::Init) => {
                self.relist = Some((Vec::new(), HashSet::new()));
                Action::Nothing
            }
            Ok(Event::InitApply(obj)) => {
                let normalized = self.normalize(&obj, &mut notes);
                if let Some((objects, keep)) = self.relist.as_mut() {
                    match normalized {
                        Some(value) => objects.push((value, obj.trigger_time())),
                        None => keep.extend(key_of(&obj)),
                    }
                }
                Action::Nothing
            }
            Ok(Event::InitDone) => {
                let (objects, keep) = self.relist.take().unwrap_or_default();
                Action::Replace { objects, keep }
            }
            Ok(Event::Apply(obj)) => match self.normalize(&obj, &mut notes) {
                Some(value) => Action::Upsert {
                    value,
                    trigger: obj.trigger_time(),
                },
                None => Action::Nothing,
            },
            Ok(Event::Delete(obj)) => key_of(&obj).map_or(Action::Nothing, Action::Delete),
            Err(e) => {
                // The watcher itself moves on (a 410 leads to a fresh Init
                // bracket); this only decides how long to wait before asking it to.
                self.failing += 1;
                notes.failing = self.failing;
                notes.error = Some(e.to_string());
                let class = retry::Class::of(&e);
                Action::Retry {
                    class,
                    wait: self.retry.after(class),
                }
            }
        };
        (action, notes)
    }

    fn normalize(&self, obj: &K, notes: &mut Notes) -> Option<Encoded> {
        match obj.normalize(&self.opts) {
            Ok(n) => {
                notes.warnings = n.warnings;
                Some(Encoded::new(&n.value))
            }
            Err(e) => {
                notes.invalid = Some(e);
                None
            }
        }
    }
}

/// Starts the three watchers; they run until the process exits.
pub fn spawn(client: kube::Client, opts: Options, store: Arc<Store>, metrics: Metrics) {
    let opts = Arc::new(opts);
    tokio::spawn(drive::<core::Service>(
        Api::all(client.clone()),
        opts.clone(),
        store.clone(),
        metrics.clone(),
    ));
    tokio::spawn(drive::<discovery::EndpointSlice>(
        Api::all(client.clone()),
        opts.clone(),
        store.clone(),
        metrics.clone(),
    ));
    tokio::spawn(drive::<core::Node>(Api::all(client), opts, store, metrics));
}

/// Runs one kind's watcher into the store.
async fn drive<K>(api: Api<K>, opts: Arc<Options>, store: Arc<Store>, metrics: Metrics)
where
    K: KubeObject + kube::Resource<DynamicType = ()>,
{
    let kind = K::RESOURCE_KIND;
    let label = KindLabels { kind: kind.into() };
    let count = |event: EventType| {
        metrics
            .api_events
            .get_or_create(&EventLabels {
                kind: kind.into(),
                event,
            })
            .inc();
    };
    let stream = watcher::watcher(api, watcher::Config::default());
    let mut stream = std::pin::pin!(stream);
    let mut state = KindWatch::<K>::new(opts);
    while let Some(event) = stream.next().await {
        let (action, notes) = state.on_event(event);
        if !notes.warnings.is_empty() {
            metrics
                .normalization_warnings
                .get_or_create(&label)
                .inc_by(notes.warnings.len() as u64);
            for w in &notes.warnings {
                warn!(kind = kind.as_str(), "{w}");
            }
        }
        if let Some(e) = &notes.invalid {
            metrics.invalid_objects.get_or_create(&label).inc();
            warn!(error = %e, "object rejected; keeping its last good state");
        }
        if let Some(errors) = notes.recovered_after {
            info!(kind = kind.as_str(), errors, "watch recovered");
        }
        match action {
            Action::Retry { class, wait } => {
                metrics
                    .watch_errors
                    .get_or_create(&WatchErrorLabels {
                        kind: kind.into(),
                        class,
                    })
                    .inc();
                let retry_in_ms = wait.map_or(0, |d| d.as_millis() as u64);
                let error = notes.error.unwrap_or_default();
                // The first error is a warning; the rest of an outage is logged at
                // debug level (and counted in the metric).
                if notes.failing == 1 {
                    warn!(
                        kind = kind.as_str(),
                        error,
                        ?class,
                        retry_in_ms,
                        "watch error; retrying"
                    );
                } else {
                    debug!(
                        kind = kind.as_str(),
                        error,
                        ?class,
                        retry_in_ms,
                        errors = notes.failing,
                        "watch error; retrying"
                    );
                }
                if let Some(wait) = wait {
                    tokio::time::sleep(wait).await;
                }
            }
            action => {
                if let Some(event) = apply(&store, kind, action) {
                    count(event);
                }
            }
        }
    }
}

/// Does what `action` asks of the store (all but [`Action::Retry`], which is the
/// driver's); returns the event to count.
fn apply(store: &Store, kind: Kind, action: Action) -> Option<EventType> {
    match action {
        Action::Nothing | Action::Retry { .. } => None,
        Action::Upsert { value, trigger } => {
            // Status, labels, managedFields: nothing a proxy or DNS uses.
            if !store.holds(&value) {
                let (span, cause) = super::ingest(kind, &value.key, "apply", trigger);
                let _enter = span.enter();
                store.apply(vec![Change::Upsert { value, cause }]);
            }
            Some(EventType::Apply)
        }
        Action::Delete(key) => {
            let (span, cause) = super::ingest(kind, &key.to_string(), "delete", None);
            let _enter = span.enter();
            store.apply(vec![Change::Delete { key, cause }]);
            Some(EventType::Delete)
        }
        Action::Replace { objects, keep } => {
            let first = store.pending_kinds().contains(&kind);
            let n = objects.len();
            // A re-list after the first one traces what it changes.
            let objects = objects
                .into_iter()
                .map(|(value, trigger)| {
                    let cause = if first || store.holds(&value) {
                        Cause::observed_now(trigger)
                    } else {
                        super::ingest(kind, &value.key, "relist", trigger).1
                    };
                    (value, cause)
                })
                .collect();
            let applied = store.sync(&[kind], objects, &keep);
            store.mark_synced(kind);
            info!(
                kind = kind.as_str(),
                objects = n,
                upserted = applied.upserted,
                removed = applied.removed,
                first,
                "list complete"
            );
            Some(EventType::Relist)
        }
    }
}

#[cfg(test)]
mod tests;
