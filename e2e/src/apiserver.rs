//! A Kubernetes API stand-in that speaks the list/watch protocol kube-rs uses, over
//! plain HTTP on 127.0.0.1, for Services, EndpointSlices and Nodes.
//!
//! There is no API server binary on these machines, so this is the one test double
//! in the stack. It implements what the watcher relies on:
//! - `GET <collection>?limit=N&continue=T`: paged lists with a `resourceVersion`
//!   (continue tokens carry the list's version, as the real server's do);
//! - `GET <collection>?watch=1&resourceVersion=R&allowWatchBookmarks=true`: a
//!   chunked stream of `{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": ...}`
//!   lines, replaying history after `R` and then following changes;
//! - `410 Gone` (an `ERROR` event with a `Status` of code 410, as the real server
//!   sends it) when `R` is older than the compaction point;
//! - dropped connections on demand, and whole outages ([`ApiServer::stop`],
//!   [`ApiServer::restart`] on the same address: connections are refused meanwhile).
//!
//! Tests and harnesses drive it through [`ApiServer`]; it also counts the watch
//! streams and events it serves, for the scale comparison with per-node watches.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{Response, StatusCode};
use axum::routing::get;
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

/// The collections served: one per kind meshlite reads.
pub use meshlite_k8s::ResourceKind as Collection;

/// `(apiVersion, kind)` of a collection's list.
fn list_kind(coll: Collection) -> (&'static str, String) {
    (coll.api_version(), format!("{}List", coll.k8s_kind()))
}

/// Counters of what the stand-in served.
#[derive(Debug, Default)]
pub struct Stats {
    pub lists: AtomicU64,
    pub watches: AtomicU64,
    pub events_sent: AtomicU64,
    pub open_watches: AtomicU64,
}

#[derive(Debug, Default)]
struct KindState {
    objects: BTreeMap<(String, String), Value>,
    /// Events after the compaction point, in resourceVersion order.
    events: VecDeque<Event>,
}

/// One watch event, serialized once and shared by every watcher (as the real API
/// server's watch cache does), with the object's name for field selectors.
#[derive(Debug, Clone)]
struct Event {
    rv: u64,
    name: Arc<str>,
    line: Bytes,
}

impl Event {
    fn new(rv: u64, ty: &str, obj: &Value) -> Self {
        let mut line = serde_json::to_vec(&json!({"type": ty, "object": obj})).unwrap_or_default();
        line.push(b'\n');
        Self {
            rv,
            name: Arc::from(obj["metadata"]["name"].as_str().unwrap_or("")),
            line: Bytes::from(line),
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    rv: u64,
    compacted: u64,
    kinds: HashMap<Collection, KindState>,
    /// token -> (username, bound node) for TokenReview.
    tokens: HashMap<String, (String, Option<String>)>,
}

/// A handle on a running stand-in. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ApiServer {
    inner: Arc<Mutex<Inner>>,
    /// Current resourceVersion, for watchers to wake on.
    changed: watch::Sender<u64>,
    /// Bumped to drop every open watch connection.
    drops: watch::Sender<u64>,
    bookmark_interval: Duration,
    pub stats: Arc<Stats>,
    addr: SocketAddr,
    /// The running server: its shutdown trigger and task. `None` while stopped.
    serving: Arc<Mutex<Option<Serving>>>,
}

#[derive(Debug)]
struct Serving {
    shutdown: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

/// Bad input to [`ApiServer::apply_yaml`].
#[derive(Debug, thiserror::Error)]
pub enum StandInError {
    #[error("invalid YAML: {0}")]
    Yaml(String),
    #[error("unsupported object {0}")]
    Unsupported(String),
}

#[derive(Debug, serde::Deserialize)]
struct Params {
    watch: Option<String>,
    #[serde(rename = "resourceVersion")]
    resource_version: Option<String>,
    limit: Option<usize>,
    #[serde(rename = "continue")]
    continue_: Option<String>,
    #[serde(rename = "allowWatchBookmarks")]
    allow_watch_bookmarks: Option<String>,
    #[serde(rename = "timeoutSeconds")]
    timeout_seconds: Option<u64>,
    /// Only `metadata.name=<name>` (what kube-proxy uses for its own Node) is
    /// understood; label selectors are ignored.
    #[serde(rename = "fieldSelector")]
    field_selector: Option<String>,
}

impl Params {
    /// The name a `metadata.name=` field selector asks for.
    fn name_selector(&self) -> Option<&str> {
        let s = self.field_selector.as_deref()?;
        s.strip_prefix("metadata.name==")
            .or_else(|| s.strip_prefix("metadata.name="))
    }
}

impl ApiServer {
    /// Starts serving on 127.0.0.1 with an OS-assigned port.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_with(Duration::from_secs(1)).await
    }

    /// Starts with a given bookmark interval.
    pub async fn start_with(bookmark_interval: Duration) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (changed, _) = watch::channel(0);
        let (drops, _) = watch::channel(0);
        let server = Self {
            inner: Arc::new(Mutex::new(Inner::default())),
            changed,
            drops,
            bookmark_interval,
            stats: Arc::new(Stats::default()),
            addr,
            serving: Arc::new(Mutex::new(None)),
        };
        server.serve(listener);
        Ok(server)
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let app = Router::new()
            .route("/api/v1/services", get(serve_services))
            .route("/api/v1/nodes", get(serve_nodes))
            .route(
                "/apis/discovery.k8s.io/v1/endpointslices",
                get(serve_endpointslices),
            )
            .route("/version", get(version))
            .route(
                "/apis/authentication.k8s.io/v1/tokenreviews",
                axum::routing::post(token_review),
            )
            .with_state(self.clone());
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        *self.serving.lock().unwrap_or_else(|p| p.into_inner()) = Some(Serving { shutdown, task });
    }

    /// An outage: stops accepting connections, cuts every watch and closes idle
    /// connections; clients are refused until [`ApiServer::restart`]. The state
    /// stays and can still be changed (as other API servers would meanwhile).
    pub async fn stop(&self) {
        let serving = self
            .serving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(serving) = serving else { return };
        let _ = serving.shutdown.send(());
        self.drop_watches();
        // Open lists finish in milliseconds; a connection that would not close is
        // left to the runtime rather than hanging the test.
        let _ = tokio::time::timeout(Duration::from_secs(10), serving.task).await;
    }

    /// Serves again on the same address after [`ApiServer::stop`].
    ///
    /// # Errors
    /// The address could not be bound again.
    pub async fn restart(&self) -> std::io::Result<()> {
        if self
            .serving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
        {
            return Ok(());
        }
        let listener = tokio::net::TcpListener::bind(self.addr).await?;
        self.serve(listener);
        Ok(())
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig pointing at this stand-in.
    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: standin\n  cluster:\n    server: {}\nusers:\n- name: standin\n  user: {{}}\ncontexts:\n- name: standin\n  context:\n    cluster: standin\n    user: standin\ncurrent-context: standin\n",
                self.url()
            ),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates or updates an object (JSON with apiVersion, kind, metadata.name).
    ///
    /// # Errors
    /// An unsupported kind.
    pub fn apply(&self, mut obj: Value) -> Result<u64, StandInError> {
        let (coll, key) = identify(&obj)?;
        let rv = {
            let mut inner = self.lock();
            inner.rv += 1;
            let rv = inner.rv;
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            if coll.namespaced() && obj["metadata"].get("namespace").is_none() {
                obj["metadata"]["namespace"] = json!("default");
            }
            let ks = inner.kinds.entry(coll).or_default();
            let ty = if ks.objects.contains_key(&key) {
                "MODIFIED"
            } else {
                "ADDED"
            };
            ks.events.push_back(Event::new(rv, ty, &obj));
            ks.objects.insert(key, obj);
            rv
        };
        self.changed.send_replace(rv);
        Ok(rv)
    }

    /// Applies every document of a multi-document YAML text.
    ///
    /// # Errors
    /// Invalid YAML or an unsupported kind.
    pub fn apply_yaml(&self, text: &str) -> Result<u64, StandInError> {
        let docs: Vec<Value> =
            serde_saphyr::from_multiple(text).map_err(|e| StandInError::Yaml(e.to_string()))?;
        let mut rv = 0;
        for d in docs.into_iter().filter(|d| !d.is_null()) {
            rv = self.apply(d)?;
        }
        Ok(rv)
    }

    /// Deletes an object; returns false if it did not exist.
    pub fn delete(&self, coll: Collection, namespace: &str, name: &str) -> bool {
        let ns = if coll.namespaced() { namespace } else { "" };
        let rv = {
            let mut inner = self.lock();
            let Some(mut obj) = inner
                .kinds
                .entry(coll)
                .or_default()
                .objects
                .remove(&(ns.to_string(), name.to_string()))
            else {
                return false;
            };
            inner.rv += 1;
            let rv = inner.rv;
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            inner
                .kinds
                .entry(coll)
                .or_default()
                .events
                .push_back(Event::new(rv, "DELETED", &obj));
            rv
        };
        self.changed.send_replace(rv);
        true
    }

    /// Forgets history: watches from any older resourceVersion now get 410 Gone.
    /// With `drop_watches`, open watches are also cut, so every watcher re-lists.
    pub fn compact(&self, drop_watches: bool) {
        {
            let mut inner = self.lock();
            // Like an etcd compaction after a write: every version a watcher can
            // hold now is older than the compaction point.
            inner.rv += 1;
            inner.compacted = inner.rv;
            for ks in inner.kinds.values_mut() {
                ks.events.clear();
            }
        }
        if drop_watches {
            self.drop_watches();
        }
    }

    /// Cuts every open watch connection (the watchers reconnect).
    pub fn drop_watches(&self) {
        self.drops.send_modify(|g| *g += 1);
    }

    /// Makes `token` valid for `username` (e.g. `system:serviceaccount:ns:sa`),
    /// bound to `node` as the kubelet binds projected tokens (Kubernetes 1.30+).
    pub fn add_token(&self, token: &str, username: &str, node: Option<&str>) {
        self.lock().tokens.insert(
            token.to_string(),
            (username.to_string(), node.map(str::to_string)),
        );
    }

    /// Number of objects of a collection.
    pub fn count(&self, coll: Collection) -> usize {
        self.lock().kinds.get(&coll).map_or(0, |k| k.objects.len())
    }

    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    fn list(&self, coll: Collection, p: &Params) -> Result<Value, (StatusCode, Value)> {
        self.stats.lists.fetch_add(1, Ordering::Relaxed);
        let inner = self.lock();
        let empty = KindState::default();
        let ks = inner.kinds.get(&coll).unwrap_or(&empty);
        // A continue token is "<list rv>:<offset>".
        let (list_rv, offset) = match p.continue_.as_deref().filter(|c| !c.is_empty()) {
            None => (inner.rv, 0),
            Some(tok) => match tok
                .split_once(':')
                .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
            {
                Some((rv, off)) if rv >= inner.compacted => (rv, off),
                _ => return Err(gone("the continue token has expired")),
            },
        };
        let limit = p.limit.filter(|l| *l > 0).unwrap_or(usize::MAX);
        // Objects as of the list's version: pages of one list are consistent only
        // while nothing changes, which is all the tests need; a change between pages
        // shows the newer object (still a valid state).
        let name = p.name_selector();
        let selected = || {
            ks.objects
                .values()
                .filter(move |o| name.is_none_or(|n| o["metadata"]["name"].as_str() == Some(n)))
        };
        let items: Vec<Value> = selected().skip(offset).take(limit).cloned().collect();
        let next = offset + items.len();
        let cont = if next < selected().count() {
            format!("{list_rv}:{next}")
        } else {
            String::new()
        };
        let (api_version, kind) = list_kind(coll);
        Ok(json!({
            "apiVersion": api_version,
            "kind": kind,
            "metadata": {"resourceVersion": list_rv.to_string(), "continue": cont},
            "items": items,
        }))
    }

    fn watch(&self, coll: Collection, p: &Params) -> Response<Body> {
        self.stats.watches.fetch_add(1, Ordering::Relaxed);
        let from: u64 = p
            .resource_version
            .as_deref()
            .and_then(|r| r.parse().ok())
            .unwrap_or(0);
        let bookmarks = p.allow_watch_bookmarks.as_deref() == Some("true");
        let timeout = Duration::from_secs(p.timeout_seconds.unwrap_or(290).max(1));
        let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(64);
        let me = self.clone();
        let name: Option<Arc<str>> = p.name_selector().map(Arc::from);
        tokio::spawn(async move {
            me.stats.open_watches.fetch_add(1, Ordering::Relaxed);
            me.stream_events(coll, from, name, bookmarks, timeout, tx)
                .await;
            me.stats.open_watches.fetch_sub(1, Ordering::Relaxed);
        });
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(Body::from_stream(
                tokio_stream::wrappers::ReceiverStream::new(rx),
            ))
            .unwrap_or_else(|_| Response::new(Body::empty()))
    }

    async fn stream_events(
        &self,
        coll: Collection,
        mut cursor: u64,
        name: Option<Arc<str>>,
        bookmarks: bool,
        timeout: Duration,
        tx: mpsc::Sender<Result<Bytes, Infallible>>,
    ) {
        // subscribe() marks the current values as seen: nothing is missed between
        // reading the history below and waiting for changes.
        let mut changed = self.changed.subscribe();
        let mut drops = self.drops.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        let send = |v: Value| {
            let mut line = serde_json::to_vec(&v).unwrap_or_default();
            line.push(b'\n');
            Ok(Bytes::from(line))
        };
        loop {
            let (events, too_old, current) = {
                let inner = self.lock();
                let too_old = cursor < inner.compacted;
                let events: Vec<Event> = inner
                    .kinds
                    .get(&coll)
                    .map(|ks| {
                        // History is in resourceVersion order: start past the cursor.
                        let from = ks.events.partition_point(|e| e.rv <= cursor);
                        ks.events
                            .range(from..)
                            .filter(|e| name.as_ref().is_none_or(|n| *n == e.name))
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default();
                (events, too_old, inner.rv)
            };
            if too_old {
                let status = json!({"type": "ERROR", "object": gone("too old resource version").1});
                let _ = tx.send(send(status)).await;
                return;
            }
            for e in events {
                if tx.send(Ok(e.line)).await.is_err() {
                    return;
                }
                self.stats.events_sent.fetch_add(1, Ordering::Relaxed);
                cursor = e.rv;
            }
            // Events filtered out by the field selector still advance the cursor.
            cursor = cursor.max(current);
            let wait = tokio::time::sleep(self.bookmark_interval);
            tokio::select! {
                r = changed.changed() => if r.is_err() { return },
                _ = drops.changed() => return,
                () = wait => {
                    if bookmarks && current >= cursor {
                        cursor = current;
                        let (api_version, kind) = (coll.api_version(), coll.k8s_kind());
                        let bm = json!({"type": "BOOKMARK", "object": {
                            "apiVersion": api_version, "kind": kind,
                            "metadata": {"resourceVersion": current.to_string()}}});
                        if tx.send(send(bm)).await.is_err() {
                            return;
                        }
                    }
                }
                () = tokio::time::sleep_until(deadline) => return,
            }
        }
    }
}

fn gone(msg: &str) -> (StatusCode, Value) {
    (
        StatusCode::GONE,
        json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
               "message": msg, "reason": "Expired", "code": 410}),
    )
}

fn identify(obj: &Value) -> Result<(Collection, (String, String)), StandInError> {
    let api_version = obj["apiVersion"].as_str().unwrap_or("");
    let kind = obj["kind"].as_str().unwrap_or("");
    let coll = Collection::of_k8s(api_version, kind)
        .ok_or_else(|| StandInError::Unsupported(format!("{api_version} {kind}")))?;
    let name = obj["metadata"]["name"]
        .as_str()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| StandInError::Unsupported(format!("{kind} without metadata.name")))?;
    let ns = if coll.namespaced() {
        obj["metadata"]["namespace"].as_str().unwrap_or("default")
    } else {
        ""
    };
    Ok((coll, (ns.to_string(), name.to_string())))
}

async fn version() -> axum::Json<Value> {
    axum::Json(json!({"major": "1", "minor": "37", "gitVersion": "v1.37.0-meshlite-standin"}))
}

async fn serve_services(State(s): State<ApiServer>, Query(p): Query<Params>) -> Response<Body> {
    serve(&s, Collection::Service, &p)
}

async fn serve_nodes(State(s): State<ApiServer>, Query(p): Query<Params>) -> Response<Body> {
    serve(&s, Collection::Node, &p)
}

async fn serve_endpointslices(
    State(s): State<ApiServer>,
    Query(p): Query<Params>,
) -> Response<Body> {
    serve(&s, Collection::EndpointSlice, &p)
}

fn serve(s: &ApiServer, coll: Collection, p: &Params) -> Response<Body> {
    if matches!(p.watch.as_deref(), Some("1" | "true")) {
        return s.watch(coll, p);
    }
    let (status, body) = match s.list(coll, p) {
        Ok(v) => (StatusCode::OK, v),
        Err(e) => e,
    };
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&body).unwrap_or_default()))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

/// `POST tokenreviews`: authenticates tokens registered with [`ApiServer::add_token`]
/// for the `meshlite` audience, answering as the real API server does.
async fn token_review(State(s): State<ApiServer>, body: Bytes) -> Response<Body> {
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let token = req["spec"]["token"].as_str().unwrap_or("");
    let audiences: Vec<String> = req["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let found = s.lock().tokens.get(token).cloned();
    let status = match found {
        Some((user, node)) if audiences.iter().any(|a| a == "meshlite") => {
            let mut extra = serde_json::Map::new();
            if let Some(n) = node {
                extra.insert("authentication.kubernetes.io/node-name".into(), json!([n]));
            }
            json!({"authenticated": true, "audiences": ["meshlite"],
                   "user": {"username": user, "extra": extra}})
        }
        Some(_) => json!({"authenticated": false, "error": "token audiences are invalid"}),
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
    };
    let out = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                     "metadata": {"creationTimestamp": null}, "spec": req["spec"], "status": status});
    Response::builder()
        .status(StatusCode::CREATED)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&out).unwrap_or_default()))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}
