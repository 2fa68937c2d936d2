//! In-process gRPC over real mTLS (certificates minted per test): the stream's
//! full/delta/coalescing/resume/NACK behaviour, seen from a real subscriber or a
//! raw client.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use meshlite_proto::model::{AddressFamily, Endpoint, EndpointSlice, Resource, Service};
use meshlite_proto::v1;
use meshlite_runtime::backoff::Backoff;
use meshlite_runtime::subscriber::{Role, Status, Subscriber, SubscriberConfig, SubscriberMetrics};
use meshlite_runtime::testing::{RecordingHandler, TestPki, assert_eventually};
use meshlite_runtime::tls::{ClientTls, ReloadingServerConfig};
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::StreamExt;

use super::*;
use crate::metrics::Metrics;
use crate::store::{Cause, Change, Encoded, Kind, Store, View};

const T: Duration = Duration::from_secs(10);

fn svc(i: usize) -> Resource {
    let ip: IpAddr = format!("198.19.{}.{}", i / 250, i % 250 + 1)
        .parse()
        .unwrap();
    Resource::Service(Service::cluster_ip("default", &format!("svc-{i}"), ip))
}

fn slice(i: usize, gen_: usize) -> Resource {
    let ip: IpAddr = format!("198.18.{}.{}", gen_ % 250, i % 250 + 1)
        .parse()
        .unwrap();
    Resource::EndpointSlice(EndpointSlice {
        namespace: "default".into(),
        name: format!("svc-{i}-abc"),
        service_name: format!("svc-{i}"),
        address_family: AddressFamily::Ipv4,
        ports: vec![],
        endpoints: vec![Endpoint::ready(ip)],
        ignored_by_proxy: false,
    })
}

fn up(r: Resource) -> Change {
    Change::upsert(&r, Cause::observed_now(None))
}

fn seeded_store(n: usize) -> Arc<Store> {
    seeded_store_retaining(n, Duration::from_secs(300))
}

fn seeded_store_retaining(n: usize, retention: Duration) -> Arc<Store> {
    store_with(n, 0, retention)
}

/// A synced, published store of `n` services with one slice each (endpoint
/// addresses from `generation`), publishing further changes as they come.
fn store_with(n: usize, generation: usize, retention: Duration) -> Arc<Store> {
    let store = Arc::new(Store::new(retention, Kind::ALL));
    store.apply(
        (0..n)
            .flat_map(|i| [up(svc(i)), up(slice(i, generation))])
            .collect(),
    );
    for k in Kind::ALL {
        store.mark_synced(k);
    }
    store.publish();
    tokio::spawn(store.clone().run_publisher(Duration::from_millis(1)));
    store
}

/// A free port below the ephemeral range (32768+ here) for a server a test kills
/// and restarts on the same port: between the two, another test's connection
/// could otherwise be given the freed ephemeral port.
fn restartable_port() -> u16 {
    for _ in 0..1_000 {
        let port = 20_000 + rand::random::<u16>() % 12_000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000-31999 after 1,000 tries");
}

struct Server {
    addr: SocketAddr,
    metrics: Metrics,
    agents: Agents,
    /// The server runs on its own runtime so that a "crash" drops every connection.
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    async fn start(pki: &TestPki, store: Arc<Store>, port: u16) -> Self {
        Self::start_auth(pki, store, port, Box::new(AllowAll)).await
    }

    async fn start_limited(pki: &TestPki, store: Arc<Store>, burst: f64) -> Self {
        Self::start_full(pki, store, 0, Box::new(AllowAll), Some(burst), 0.0).await
    }

    async fn start_paced(pki: &TestPki, store: Arc<Store>, update_rate: f64) -> Self {
        Self::start_full(pki, store, 0, Box::new(AllowAll), None, update_rate).await
    }

    async fn start_auth(
        pki: &TestPki,
        store: Arc<Store>,
        port: u16,
        authorizer: Box<dyn Authorizer>,
    ) -> Self {
        Self::start_full(pki, store, port, authorizer, None, 0.0).await
    }

    async fn start_full(
        pki: &TestPki,
        store: Arc<Store>,
        port: u16,
        authorizer: Box<dyn Authorizer>,
        burst: Option<f64>,
        update_rate: f64,
    ) -> Self {
        let metrics = Metrics::register(&mut Registry::default());
        let agents = Agents::default();
        let config = StreamConfig {
            nack_backoff: Backoff::try_new(
                Duration::from_millis(50),
                Duration::from_millis(100),
                0.1,
            )
            .unwrap(),
            update_rate,
            ..StreamConfig::default()
        };
        let config = match burst {
            Some(b) => StreamConfig {
                stream_rate: 0.001,
                stream_burst: b,
                ..config
            },
            None => config,
        };
        let svc = MeshService::new(store, config, metrics.clone(), agents.clone(), authorizer)
            .into_server(4 << 20);
        let tls = Arc::new(ReloadingServerConfig::new(pki.server()).unwrap());
        let (addr_tx, addr_rx) = oneshot::channel();
        let (stop, stop_rx) = std::sync::mpsc::channel::<()>();
        let m = metrics.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.spawn(async move {
                let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
                    .await
                    .unwrap();
                let _ = addr_tx.send(listener.local_addr().unwrap());
                let _ =
                    transport::serve(listener, Some(tls), svc, 16, m, std::future::pending()).await;
            });
            let _ = stop_rx.recv();
            // Wait for the tasks to be dropped: the listener must be closed before a
            // restarted server binds the same port.
            rt.shutdown_timeout(Duration::from_secs(5));
        });
        let addr = addr_rx.await.unwrap();
        Server {
            addr,
            metrics,
            agents,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Simulates a crash: the runtime and every connection are dropped at once.
    fn kill(mut self) -> u16 {
        self.shutdown();
        self.addr.port()
    }

    fn shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    fn sent(&self, kind: UpdateKind) -> u64 {
        self.metrics
            .updates_sent
            .get_or_create(&UpdateLabels { kind })
            .get()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Agent {
    handler: RecordingHandler,
    status: watch::Receiver<Status>,
    _stop: oneshot::Sender<()>,
}

fn start_agent(addr: SocketAddr, tls: ClientTls) -> Agent {
    meshlite_runtime::tls::install_default_provider();
    let handler = RecordingHandler::default();
    let config = SubscriberConfig {
        endpoint: format!("https://{addr}"),
        node_name: "node1".into(),
        role: Role::Node,
        tls: Some(tls),
        agent_version: "test".into(),
        backoff: Backoff::try_new(Duration::from_millis(20), Duration::from_millis(200), 0.5)
            .unwrap(),
        max_message_bytes: 4 << 20,
        token_file: None,
    };
    let metrics = Arc::new(SubscriberMetrics::register(
        &mut Registry::default(),
        "test",
    ));
    let sub = Subscriber::new(config, handler.clone(), metrics);
    let status = sub.status();
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(sub.run(async move {
        let _ = rx.await;
    }));
    Agent {
        handler,
        status,
        _stop: tx,
    }
}

#[tokio::test]
async fn full_snapshot_then_single_key_deltas() {
    let pki = TestPki::new("ca");
    let store = seeded_store(10);
    let server = Server::start(&pki, store.clone(), 0).await;
    let agent = start_agent(server.addr, pki.client("node1", &["node1"]));

    assert_eventually("full snapshot applied", T, || {
        agent.handler.records().len() == 1
    })
    .await;
    let r = &agent.handler.records()[0];
    assert!(r.full);
    assert_eq!(r.resources, 20);
    assert_eq!(r.version, store.version());

    store.apply(vec![up(slice(3, 1))]);
    assert_eventually("delta applied", T, || agent.handler.records().len() == 2).await;
    let r = &agent.handler.records()[1];
    assert!(!r.full);
    assert_eq!(r.upserted, vec!["endpointslice/default/svc-3-abc"]);
    assert_eq!(r.causes, 1, "a delta carries the change's cause");
    assert_eq!(server.sent(UpdateKind::Full), 1);
    assert_eq!(server.sent(UpdateKind::Delta), 1);

    // The agents table shows it at the newest version.
    assert_eventually("agent row current", T, || {
        server
            .agents
            .rows(store.version())
            .first()
            .is_some_and(|a| a.lag == 0 && a.acks == 2)
    })
    .await;
}

fn big_slice(gen_: usize) -> Resource {
    let endpoints = (0..100)
        .map(|i| {
            // Endpoint 42 is the one being replaced.
            let host = if i == 42 { 100 + gen_ } else { i + 1 };
            let mut e = Endpoint::ready(format!("198.18.0.{host}").parse().unwrap());
            e.node_name = Some(format!("node-{:05}", i * 37 % 5000));
            e.target_pod = Some(format!("web-7f9c8d-{host:05}"));
            e
        })
        .collect();
    Resource::EndpointSlice(EndpointSlice {
        namespace: "default".into(),
        name: "web-abc".into(),
        service_name: "web".into(),
        address_family: AddressFamily::Ipv4,
        ports: vec![],
        endpoints,
        ignored_by_proxy: false,
    })
}

/// One pod replaced in a slice of 100: the agent gets a patch a fraction of the
/// slice's size and ends up holding exactly what the store holds.
#[tokio::test]
async fn a_slice_changed_once_reaches_the_agent_as_a_small_patch() {
    let pki = TestPki::new("ca");
    let store = seeded_store(1);
    store.apply(vec![up(big_slice(0))]);
    let server = Server::start(&pki, store.clone(), 0).await;
    let agent = start_agent(server.addr, pki.client("node1", &["node1"]));
    assert_eventually("full snapshot applied", T, || {
        agent.handler.records().len() == 1
    })
    .await;
    let full_bytes = server.metrics.update_bytes_sent.get();

    for gen_ in 1..=3 {
        store.apply(vec![up(big_slice(gen_))]);
        assert_eventually("delta applied", T, || {
            agent.handler.records().len() == 1 + gen_
        })
        .await;
        let r = agent.handler.records()[gen_].clone();
        assert_eq!(r.upserted, vec!["endpointslice/default/web-abc"]);
        let (digest, version) = store.digest(&View::Node("node1".into()));
        assert_eq!(
            (r.version, r.digest),
            (version, digest.sum),
            "agent holds the store's state"
        );
    }
    assert_eq!(server.metrics.patches_sent.get(), 3);
    let per_change = (server.metrics.update_bytes_sent.get() - full_bytes) / 3;
    let whole = Encoded::new(&big_slice(3)).bytes.len() as u64;
    assert!(
        per_change < 300 && per_change * 10 < whole,
        "{per_change} bytes per change; the slice is {whole}"
    );
    assert_eq!(server.sent(UpdateKind::Full), 1);
}

/// A change outside an agent's view (another node's Node object) sends that agent
/// nothing; the next change in its view is still a delta it can apply, not a
/// full snapshot.
#[tokio::test]
async fn a_change_outside_the_view_does_not_cost_a_full_snapshot() {
    let pki = TestPki::new("ca");
    let store = seeded_store(3);
    let server = Server::start(&pki, store.clone(), 0).await;
    let agent = start_agent(server.addr, pki.client("node1", &["node1"]));
    assert_eventually("full snapshot applied", T, || {
        agent.handler.records().len() == 1
    })
    .await;
    store.apply(vec![up(Resource::Node(meshlite_proto::model::Node {
        name: "node2".into(),
        zone: None,
        addresses: vec!["198.18.200.2".parse().unwrap()],
        pod_cidrs: vec![],
    }))]);
    // The agent is current at the new version without being sent anything.
    assert_eventually("agent current", T, || {
        server
            .agents
            .rows(store.version())
            .first()
            .is_some_and(|a| a.lag == 0)
    })
    .await;
    assert_eq!(agent.handler.records().len(), 1);
    store.apply(vec![up(slice(1, 7))]);
    assert_eventually("delta applied", T, || agent.handler.records().len() == 2).await;
    let r = agent.handler.records()[1].clone();
    assert!(!r.full, "{r:?}");
    assert_eq!(r.upserted, vec!["endpointslice/default/svc-1-abc"]);
    assert_eq!(server.sent(UpdateKind::Full), 1);
    assert_eq!(server.metrics.nacks.get(), 0);
}

/// An agent that falls behind the tombstone window while connected is resumed by
/// inventory: the diff applies to what it holds (not a full replacement, not a
/// full snapshot), and it ends with exactly the store's state.
#[tokio::test]
async fn an_agent_behind_the_tombstone_window_mid_stream_is_resumed_by_inventory() {
    let pki = TestPki::new("ca");
    let store = seeded_store_retaining(5, Duration::from_millis(1));
    let server = Server::start(&pki, store.clone(), 0).await;
    let agent = start_agent(server.addr, pki.client("node1", &["node1"]));
    assert_eventually("synced", T, || agent.handler.records().len() == 1).await;

    agent
        .handler
        .fail_with(Some("iptables-restore: exit status 1"));
    store.apply(vec![Change::Delete {
        key: meshlite_proto::model::ResourceKey::service("default", "svc-4"),
        cause: Cause::observed_now(None),
    }]);
    assert_eventually("nacked", T, || server.metrics.nacks.get() >= 1).await;
    // The tombstone expires: a delta from what the agent holds can no longer be cut.
    tokio::time::sleep(Duration::from_millis(20)).await;
    store.apply(vec![up(slice(2, 9))]);
    agent.handler.fail_with(None);

    assert_eventually("caught up", T, || {
        agent.status.borrow().applied_version == store.version()
    })
    .await;
    let last = agent.handler.records().last().unwrap().clone();
    let (digest, _) = store.digest(&View::Node("node1".into()));
    assert_eq!(
        last.digest, digest.sum,
        "agent holds exactly the store's state"
    );
    assert_eq!(
        last.resources, 9,
        "5 services + 5 slices - the deleted service"
    );
    assert!(!last.full, "applied as a diff, not a replacement");
    assert_eq!(server.sent(UpdateKind::Full), 1);
    assert!(server.sent(UpdateKind::Inventory) >= 1);
}

/// A raw client that does its own ACKs.
struct RawClient {
    tx: mpsc::Sender<v1::AgentMessage>,
    inbound: tonic::Streaming<v1::Update>,
}

impl RawClient {
    async fn connect(addr: SocketAddr, tls: &ClientTls) -> Result<Self, tonic::Status> {
        meshlite_runtime::tls::install_default_provider();
        let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(tls.load().unwrap())
            .unwrap()
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let mut client = v1::mesh_client::MeshClient::new(channel);
        let (tx, rx) = mpsc::channel(16);
        tx.send(v1::AgentMessage {
            msg: Some(v1::agent_message::Msg::Hello(v1::Hello {
                node_name: "raw".into(),
                role: v1::Role::Dns as i32,
                ..Default::default()
            })),
        })
        .await
        .unwrap();
        let inbound = client
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Self { tx, inbound })
    }

    /// Reads one whole update (all chunks).
    async fn next_update(&mut self, within: Duration) -> Option<v1::Update> {
        let mut acc: Option<v1::Update> = None;
        loop {
            let u = tokio::time::timeout(within, self.inbound.next())
                .await
                .ok()??
                .unwrap();
            match acc.as_mut() {
                None => acc = Some(u.clone()),
                Some(a) => {
                    a.upserts.extend(u.upserts.clone());
                    a.removals.extend(u.removals.clone());
                    a.causes.extend(u.causes.clone());
                }
            }
            if u.last_chunk {
                return acc;
            }
        }
    }

    async fn ack(&self, u: &v1::Update) {
        self.tx
            .send(v1::AgentMessage {
                msg: Some(v1::agent_message::Msg::Ack(v1::Ack {
                    nonce: u.nonce.clone(),
                    version: u.version,
                    ..Default::default()
                })),
            })
            .await
            .unwrap();
    }
}

/// Pacing (adaptive coalescing): a lone change goes out at once; when several
/// versions wait for an agent, its next delta waits for the agent's gap (agents /
/// rate) after its previous update and then carries them all.
#[tokio::test]
async fn paced_deltas_coalesce_when_several_versions_wait() {
    let pki = TestPki::new("ca");
    let store = seeded_store(10);
    // One agent at 0.5 updates per second: a gap of 2 s.
    let server = Server::start_paced(&pki, store.clone(), 0.5).await;
    let mut raw = RawClient::connect(server.addr, &pki.client("dns", &["dns"]))
        .await
        .unwrap();
    let first = raw.next_update(T).await.unwrap();
    raw.ack(&first).await;

    // Right after the snapshot, a lone change still goes out at once.
    store.apply(vec![up(slice(1, 1))]);
    let one = raw.next_update(Duration::from_millis(1_000)).await;
    let one = one.expect("a lone change goes out at once");
    assert_eq!(one.upserts.len(), 1);
    // Two more versions while it is in flight: after the ACK they wait for the gap.
    store.apply(vec![up(slice(2, 1))]);
    tokio::time::sleep(Duration::from_millis(20)).await;
    store.apply(vec![up(slice(3, 1))]);
    tokio::time::sleep(Duration::from_millis(20)).await;
    raw.ack(&one).await;
    assert!(
        raw.next_update(Duration::from_millis(1_000))
            .await
            .is_none(),
        "the next delta waits for the gap"
    );
    let both = raw.next_update(T).await.expect("then it goes out");
    let keys: HashSet<&str> = both.upserts.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(
        keys,
        HashSet::from([
            "endpointslice/default/svc-2-abc",
            "endpointslice/default/svc-3-abc"
        ]),
        "one delta carries both changes"
    );
    raw.ack(&both).await;
    store.apply(vec![up(slice(4, 1))]);
    assert!(
        raw.next_update(Duration::from_millis(1_000))
            .await
            .is_some(),
        "a lone change right after an update goes out at once"
    );
    assert_eq!(server.sent(UpdateKind::Delta), 3);
}

/// An agent that does not share the control plane's patch schema (here: none, as
/// an agent from before patches) gets whole slices.
#[tokio::test]
async fn agents_without_the_patch_schema_get_whole_slices() {
    let pki = TestPki::new("ca");
    let store = seeded_store(1);
    store.apply(vec![up(big_slice(0))]);
    let server = Server::start(&pki, store.clone(), 0).await;
    let mut raw = RawClient::connect(server.addr, &pki.client("raw", &["raw"]))
        .await
        .unwrap();
    let full = raw.next_update(T).await.unwrap();
    raw.ack(&full).await;
    store.apply(vec![up(big_slice(1))]);
    let u = raw.next_update(T).await.unwrap();
    assert_eq!(u.base_version, full.version);
    assert!(
        matches!(
            &u.upserts[..],
            [v1::Resource {
                kind: Some(v1::resource::Kind::EndpointSlice(_)),
                ..
            }]
        ),
        "{:?}",
        u.upserts
    );
    assert_eq!(server.metrics.patches_sent.get(), 0);
}

#[tokio::test]
async fn an_agent_that_does_not_ack_gets_one_coalesced_delta() {
    let pki = TestPki::new("ca");
    let store = seeded_store(1000);
    let server = Server::start(&pki, store.clone(), 0).await;
    let mut raw = RawClient::connect(server.addr, &pki.client("dns", &["dns"]))
        .await
        .unwrap();
    let first = raw.next_update(T).await.unwrap();
    assert_eq!(first.base_version, 0);
    assert_eq!(first.upserts.len(), 2000);
    let bytes_after_first = server.metrics.update_bytes_sent.get();

    // 1,000 changes while the first update is unacknowledged.
    for i in 0..1000 {
        store.apply(vec![up(slice(i, 1))]);
    }
    assert!(
        raw.next_update(Duration::from_millis(300)).await.is_none(),
        "nothing is sent while an update is in flight"
    );
    assert_eq!(server.sent(UpdateKind::Full), 1);
    assert_eq!(
        server.metrics.update_bytes_sent.get(),
        bytes_after_first,
        "no per-subscriber backlog builds up"
    );

    raw.ack(&first).await;
    let delta = raw.next_update(T).await.unwrap();
    assert_eq!(delta.base_version, first.version);
    assert_eq!(delta.version, store.version());
    assert_eq!(
        delta.upserts.len(),
        1000,
        "one delta with every changed key, each once"
    );
    let keys: HashSet<_> = delta.upserts.iter().map(|r| r.key.clone()).collect();
    assert_eq!(keys.len(), 1000);
    raw.ack(&delta).await;
    assert!(raw.next_update(Duration::from_millis(300)).await.is_none());
    assert_eq!(server.sent(UpdateKind::Delta), 1);
}

#[tokio::test]
async fn reconnect_resumes_with_a_delta() {
    let pki = TestPki::new("ca");
    let store = seeded_store(50);
    let server = Server::start(&pki, store.clone(), restartable_port()).await;
    let agent = start_agent(server.addr, pki.client("node1", &["node1"]));
    assert_eventually("synced", T, || agent.handler.records().len() == 1).await;

    // The control plane's connection drops (same process, same epoch).
    let port = server.kill();
    assert_eventually("disconnected", T, || !agent.status.borrow().connected).await;
    store.apply(vec![up(slice(7, 1))]);
    let server = Server::start(&pki, store.clone(), port).await;
    assert_eventually("resumed", T, || agent.handler.records().len() == 2).await;
    let r = &agent.handler.records()[1];
    assert!(!r.full);
    assert_eq!(r.upserted, vec!["endpointslice/default/svc-7-abc"]);
    assert_eq!(server.sent(UpdateKind::Full), 0);
    assert_eq!(server.sent(UpdateKind::Delta), 1);
}

#[tokio::test]
async fn restarted_control_plane_resumes_by_hashes() {
    let pki = TestPki::new("ca");
    let store = seeded_store(50);
    let server = Server::start(&pki, store.clone(), restartable_port()).await;
    let agent = start_agent(server.addr, pki.client("node1", &["node1"]));
    assert_eventually("synced", T, || agent.handler.records().len() == 1).await;

    // A new process: new epoch, versions start over, same cluster content.
    let port = server.kill();
    let store2 = seeded_store(50);
    assert_ne!(store2.epoch(), store.epoch());
    let server = Server::start(&pki, store2.clone(), port).await;
    assert_eventually("resumed unchanged", T, || {
        server.sent(UpdateKind::Unchanged) == 1
    })
    .await;
    assert_eventually("acked", T, || {
        agent.status.borrow().epoch == store2.epoch()
            && agent.status.borrow().applied_version == store2.version()
    })
    .await;
    assert_eq!(server.sent(UpdateKind::Full), 0);
    assert_eq!(agent.handler.records().len(), 1, "nothing to re-apply");

    // Restart again with one object changed and one gone: the inventory
    // comparison sends exactly those.
    let port = server.kill();
    let store3 = seeded_store(50);
    store3.apply(vec![
        up(slice(9, 5)),
        Change::Delete {
            key: meshlite_proto::model::ResourceKey::service("default", "svc-0"),
            cause: Cause::observed_now(None),
        },
    ]);
    let server = Server::start(&pki, store3.clone(), port).await;
    assert_eventually("resumed by inventory", T, || {
        agent.handler.records().len() == 2
    })
    .await;
    let r = &agent.handler.records()[1];
    assert!(!r.full);
    assert_eq!(r.upserted, vec!["endpointslice/default/svc-9-abc"]);
    assert_eq!(r.removed, vec!["service/default/svc-0"]);
    assert_eq!(server.sent(UpdateKind::Inventory), 1);
    assert_eq!(server.sent(UpdateKind::Full), 0);
}

/// After a control-plane restart the agent's first update fails to apply: the
/// version it still holds is from the old run and means nothing in the new one, so
/// the retry is a full snapshot, never a delta cut from that number.
#[tokio::test]
async fn a_failed_first_update_after_a_restart_is_retried_as_a_full_snapshot() {
    let pki = TestPki::new("ca");
    let store = seeded_store(20);
    let server = Server::start(&pki, store.clone(), restartable_port()).await;
    let agent = start_agent(server.addr, pki.client("node1", &["node1"]));
    assert_eventually("synced", T, || agent.handler.records().len() == 1).await;

    // The new run has other content at the same version numbers, then one more
    // change (a new Service, so no patch hash can catch it): a delta from the
    // agent's old version would carry only that one.
    let port = server.kill();
    let store2 = store_with(20, 1, Duration::from_secs(300));
    store2.apply(vec![up(svc(25))]);
    agent
        .handler
        .fail_with(Some("iptables-restore: exit status 1"));
    let server = Server::start(&pki, store2.clone(), port).await;
    assert_eventually("nacked", T, || server.metrics.nacks.get() >= 1).await;
    agent.handler.fail_with(None);
    assert_eventually("caught up", T, || {
        agent.status.borrow().epoch == store2.epoch()
            && agent.status.borrow().applied_version == store2.version()
    })
    .await;
    let last = agent.handler.records().last().unwrap().clone();
    let (digest, _) = store2.digest(&View::Node("node1".into()));
    let seen = || {
        format!(
            "records {:?}; sent full {} inventory {} delta {}; nacks {}",
            agent
                .handler
                .records()
                .iter()
                .map(|r| (r.version, r.full, r.upserted.len()))
                .collect::<Vec<_>>(),
            server.sent(UpdateKind::Full),
            server.sent(UpdateKind::Inventory),
            server.sent(UpdateKind::Delta),
            server.metrics.nacks.get()
        )
    };
    assert_eq!(
        last.digest,
        digest.sum,
        "agent holds exactly the new store's state: {}",
        seen()
    );
    assert!(server.sent(UpdateKind::Full) >= 1, "{}", seen());
}

#[tokio::test]
async fn nack_keeps_the_last_good_version_and_retries() {
    let pki = TestPki::new("ca");
    let store = seeded_store(5);
    let server = Server::start(&pki, store.clone(), 0).await;
    let agent = start_agent(server.addr, pki.client("node1", &["node1"]));
    assert_eventually("synced", T, || agent.handler.records().len() == 1).await;
    let good = store.version();

    agent
        .handler
        .fail_with(Some("iptables-restore: exit status 1"));
    store.apply(vec![up(slice(1, 1))]);
    assert_eventually("nacked", T, || server.metrics.nacks.get() >= 1).await;
    assert_eq!(agent.status.borrow().applied_version, good);
    assert_eq!(server.agents.rows(store.version())[0].version, good);

    // Once the agent can apply again, the server's retry delivers the change.
    agent.handler.fail_with(None);
    assert_eventually("retried and applied", T, || {
        agent.handler.records().len() == 2
    })
    .await;
    assert_eq!(
        agent.handler.records()[1].upserted,
        vec!["endpointslice/default/svc-1-abc"]
    );
    assert_eventually("acked", T, || {
        agent.status.borrow().applied_version == store.version()
    })
    .await;
}

#[tokio::test]
async fn a_client_without_a_valid_certificate_is_refused() {
    let pki = TestPki::new("ca");
    let store = seeded_store(1);
    let server = Server::start(&pki, store, 0).await;

    // Signed by another CA.
    let rogue = TestPki::new("rogue");
    let mut tls = rogue.client("node1", &["node1"]);
    tls.ca = pki.ca_path().to_path_buf(); // it does trust our server
    assert!(RawClient::connect(server.addr, &tls).await.is_err());

    // No client certificate at all.
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", server.addr))
        .unwrap()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(
                    std::fs::read(pki.ca_path()).unwrap(),
                ))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect()
        .await;
    if let Ok(ch) = channel {
        let mut c = v1::mesh_client::MeshClient::new(ch);
        let (_tx, rx) = mpsc::channel(1);
        assert!(
            c.stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .is_err()
        );
    }
    assert_eventually("handshake failures counted", T, || {
        server.metrics.tls_handshake_failures.get() >= 2
    })
    .await;

    // A valid client is still served.
    let mut ok = RawClient::connect(server.addr, &pki.client("dns", &["dns"]))
        .await
        .unwrap();
    assert!(ok.next_update(T).await.is_some());
}

/// Subscribes with `tls` claiming `node` (or DNS when `node` is None); Ok if served.
async fn try_subscribe(
    addr: SocketAddr,
    tls: &ClientTls,
    node: Option<&str>,
) -> Result<(), tonic::Status> {
    meshlite_runtime::tls::install_default_provider();
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls.load().unwrap())
        .unwrap()
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut client = v1::mesh_client::MeshClient::new(channel);
    let (tx, rx) = mpsc::channel(4);
    tx.send(v1::AgentMessage {
        msg: Some(v1::agent_message::Msg::Hello(v1::Hello {
            node_name: node.unwrap_or("dns-1").into(),
            role: if node.is_some() {
                v1::Role::Node
            } else {
                v1::Role::Dns
            } as i32,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut inbound = client
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    match tokio::time::timeout(T, inbound.next()).await {
        Ok(Some(Ok(_))) => Ok(()),
        Ok(Some(Err(s))) => Err(s),
        _ => Err(tonic::Status::unknown("no update")),
    }
}

#[tokio::test]
async fn node_scoped_identity_from_certificates() {
    use super::identity::{CertAuthorizer, NodeIdentity};
    let pki = TestPki::new("ca");
    let store = seeded_store(1);
    let server = Server::start_auth(
        &pki,
        store.clone(),
        0,
        Box::new(CertAuthorizer::new(NodeIdentity::Certificate, None)),
    )
    .await;
    let node1 = pki.client("node1", &["node1.nodes.meshlite"]);
    let dns = pki.client("dns", &["dns-agent"]);
    let shared = pki.client("shared", &["node-agent"]);

    assert!(
        try_subscribe(server.addr, &node1, Some("node1"))
            .await
            .is_ok()
    );
    assert!(try_subscribe(server.addr, &dns, None).await.is_ok());
    for (tls, node, why) in [
        (&node1, Some("node2"), "another node"),
        (&node1, None, "a node identity as DNS"),
        (&dns, Some("node1"), "a DNS identity as a node"),
        (
            &shared,
            Some("node1"),
            "a role-only certificate in certificate mode",
        ),
    ] {
        let err = try_subscribe(server.addr, tls, node).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{why}: {err:?}");
    }
    assert_eq!(
        server
            .metrics
            .streams_refused
            .get_or_create(&crate::metrics::ReasonLabels {
                reason: "unauthorized".into()
            })
            .get(),
        4
    );

    // shared-certificate mode: the role is checked, the node is not.
    let server = Server::start_auth(
        &pki,
        store,
        0,
        Box::new(CertAuthorizer::new(NodeIdentity::SharedCertificate, None)),
    )
    .await;
    assert!(
        try_subscribe(server.addr, &shared, Some("node7"))
            .await
            .is_ok()
    );
    assert!(
        try_subscribe(server.addr, &node1, Some("node2"))
            .await
            .is_err(),
        "a per-node certificate still binds its node"
    );
    assert!(try_subscribe(server.addr, &shared, None).await.is_err());
}

#[tokio::test]
async fn stream_admission_is_rate_limited() {
    let pki = TestPki::new("ca");
    let store = seeded_store(1);
    // Admission itself is unit-tested in limits.rs; here: a refused stream gets
    // RESOURCE_EXHAUSTED and is counted.
    let server = Server::start_limited(&pki, store, 2.0).await;
    let dns = pki.client("dns", &["dns-agent"]);
    assert!(try_subscribe(server.addr, &dns, None).await.is_ok());
    assert!(try_subscribe(server.addr, &dns, None).await.is_ok());
    let err = try_subscribe(server.addr, &dns, None).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    assert_eq!(
        server
            .metrics
            .streams_refused
            .get_or_create(&crate::metrics::ReasonLabels {
                reason: "rate_limited".into()
            })
            .get(),
        1
    );
}
