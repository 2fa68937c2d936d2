//! `--source kube`: one kube-runtime watcher each on Services, EndpointSlices and
//! Nodes, cluster wide, with bookmarks.
//!
//! The watcher's `Init .. InitApply* .. InitDone` bracket (initial list, and every
//! re-list after a 410 Gone or a dropped connection) is buffered and swapped into
//! the store in one step with [`Store::sync`], which only changes what differs: a
//! re-list never tells agents to delete what still exists. An object that fails to
//! normalize is logged and counted, and its last good state stays.
//!
//! Errors are retried by what they say ([`retry`]): a 410 Gone re-lists at once, and
//! the wait after an outage is at most a second, not kube-rs' default 30 s.

pub mod retry;

use std::collections::HashSet;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::SystemTime;

use futures::StreamExt;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use kube::Api;
use kube::runtime::watcher::{self, Event};
use meshlite_proto::model::{Resource, ResourceKey};
use serde::de::DeserializeOwned;
use tracing::{debug, info, warn};

use crate::metrics::{EventLabels, EventType, KindLabels, Metrics, WatchErrorLabels};
use crate::normalize::{self, Invalid, Options};
use crate::store::{Cause, Change, Kind, Store, encode};

/// A normalized object: the resource, dropped-part warnings, and trigger time.
type Normalized = (Resource, Vec<String>, Option<SystemTime>);

/// A re-list in progress: its objects, and keys to keep (failed to normalize).
type Relist = (Vec<(Resource, Cause)>, HashSet<ResourceKey>);

/// Starts the three watchers; they run until the process exits.
pub fn spawn(client: kube::Client, opts: Options, store: Arc<Store>, metrics: Metrics) {
    let opts = Arc::new(opts);
    let svc_opts = opts.clone();
    tokio::spawn(watch_kind::<core::Service>(
        Api::all(client.clone()),
        Kind::Service,
        store.clone(),
        metrics.clone(),
        move |s| {
            normalize::service(s, &svc_opts).map(|n| (Resource::Service(n.value), n.warnings, None))
        },
    ));
    tokio::spawn(watch_kind::<discovery::EndpointSlice>(
        Api::all(client.clone()),
        Kind::EndpointSlice,
        store.clone(),
        metrics.clone(),
        move |s| {
            let trigger = normalize::trigger_time(&s.metadata);
            normalize::endpoint_slice(s, &opts)
                .map(|n| (Resource::EndpointSlice(n.value), n.warnings, trigger))
        },
    ));
    tokio::spawn(watch_kind::<core::Node>(
        Api::all(client),
        Kind::Node,
        store,
        metrics,
        |n| normalize::node(n).map(|n| (Resource::Node(n.value), n.warnings, None)),
    ));
}

/// The key an object has whether or not it normalizes.
fn key_of(
    kind: Kind,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Option<ResourceKey> {
    let name = meta.name.as_deref().filter(|n| !n.is_empty())?;
    let ns = meta
        .namespace
        .as_deref()
        .filter(|n| !n.is_empty())
        .unwrap_or("default");
    Some(match kind {
        Kind::Service => ResourceKey::service(ns, name),
        Kind::EndpointSlice => ResourceKey::endpoint_slice(ns, name),
        Kind::Node => ResourceKey::node(name),
    })
}

async fn watch_kind<K>(
    api: Api<K>,
    kind: Kind,
    store: Arc<Store>,
    metrics: Metrics,
    norm: impl Fn(&K) -> Result<Normalized, Invalid> + Send + 'static,
) where
    K: kube::Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
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
    let stream = watch_stream(api);
    let mut stream = std::pin::pin!(stream);
    let mut retry = retry::Retry::new();
    // Errors since the API server last delivered something: the first is a warning,
    // the rest of an outage is logged at debug level (counted in the metric).
    let mut failing: u64 = 0;
    let mut relist: Option<Relist> = None;
    let normalized = |obj: &K| -> Option<Normalized> {
        match norm(obj) {
            Ok(n) => {
                if !n.1.is_empty() {
                    metrics
                        .normalization_warnings
                        .get_or_create(&label)
                        .inc_by(n.1.len() as u64);
                    for w in &n.1 {
                        warn!(kind = kind.as_str(), key = %n.0.key(), "{w}");
                    }
                }
                Some(n)
            }
            Err(e) => {
                metrics.invalid_objects.get_or_create(&label).inc();
                warn!(error = %e, "object rejected; keeping its last good state");
                None
            }
        }
    };
    while let Some(event) = stream.next().await {
        // `Init` is the watcher's own step before it lists; everything else that is
        // not an error came from the API server.
        if matches!(&event, Ok(e) if !matches!(e, Event::Init)) {
            retry.reset();
            if failing > 0 {
                info!(kind = kind.as_str(), errors = failing, "watch recovered");
                failing = 0;
            }
        }
        match event {
            Ok(Event::Init) => {
                debug!(kind = kind.as_str(), "list started");
                relist = Some((Vec::new(), HashSet::new()));
            }
            Ok(Event::InitApply(obj)) => {
                let Some((objs, keep)) = relist.as_mut() else {
                    continue;
                };
                match normalized(&obj) {
                    Some((r, _, trigger)) => {
                        // A re-list after the first one traces what it changes.
                        let (key, hash, _) = encode(&r);
                        let quiet =
                            store.pending_kinds().contains(&kind) || store.holds(&key, hash);
                        let cause = if quiet {
                            Cause::observed_now(trigger)
                        } else {
                            super::ingest(kind, &key, "relist", trigger).1
                        };
                        objs.push((r, cause));
                    }
                    None => keep.extend(key_of(kind, obj.meta())),
                }
            }
            Ok(Event::InitDone) => {
                count(EventType::Relist);
                let (objs, keep) = relist.take().unwrap_or_default();
                let n = objs.len();
                let first = store.pending_kinds().contains(&kind);
                let applied = store.sync(&[kind], objs, &keep);
                store.mark_synced(kind);
                info!(
                    kind = kind.as_str(),
                    objects = n,
                    upserted = applied.upserted,
                    removed = applied.removed,
                    first,
                    "list complete"
                );
            }
            Ok(Event::Apply(obj)) => {
                count(EventType::Apply);
                if let Some((r, _, trigger)) = normalized(&obj) {
                    let (key, hash, _) = encode(&r);
                    if store.holds(&key, hash) {
                        // Status, labels, managedFields: nothing a proxy or DNS uses.
                        continue;
                    }
                    let (span, cause) = super::ingest(kind, &key, "apply", trigger);
                    let _enter = span.enter();
                    store.apply(vec![Change::Upsert { resource: r, cause }]);
                }
            }
            Ok(Event::Delete(obj)) => {
                count(EventType::Delete);
                if let Some(key) = key_of(kind, obj.meta()) {
                    let (span, cause) = super::ingest(kind, &key.to_string(), "delete", None);
                    let _enter = span.enter();
                    store.apply(vec![Change::Delete { key, cause }]);
                }
            }
            Err(e) => {
                // The watcher itself moves on (a 410 leads to a fresh Init bracket);
                // this only decides how long to wait before asking it to.
                let class = retry::Class::of(&e);
                metrics
                    .watch_errors
                    .get_or_create(&WatchErrorLabels {
                        kind: kind.into(),
                        class,
                    })
                    .inc();
                let wait = retry.after(class);
                let retry_in_ms = wait.map_or(0, |d| d.as_millis() as u64);
                failing += 1;
                if failing == 1 {
                    warn!(kind = kind.as_str(), error = %e, ?class, retry_in_ms, "watch error; retrying");
                } else {
                    debug!(kind = kind.as_str(), error = %e, ?class, retry_in_ms, errors = failing, "watch error; retrying");
                }
                if let Some(wait) = wait {
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

fn watch_stream<K>(
    api: Api<K>,
) -> impl futures::Stream<Item = Result<Event<K>, watcher::Error>> + Send
where
    K: kube::Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + 'static,
{
    watcher::watcher(api, watcher::Config::default())
}
