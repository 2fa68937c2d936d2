//! The subscriber against a scripted control plane that misbehaves: a delta for a
//! version the agent does not hold, invalid resources, removals of unknown keys, a
//! message over the size limit, a stream that dies. The agent must NACK (asking for
//! a full snapshot when it cannot apply a delta), keep its last good state, and
//! reconnect; nothing may crash.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshlite_proto::model::{AddressFamily, Endpoint, EndpointSlice, Resource, Service};
use meshlite_proto::server::mesh_server::{Mesh, MeshServer};
use meshlite_proto::{content_hash, v1};
use meshlite_runtime::backoff::Backoff;
use meshlite_runtime::subscriber::{Role, Subscriber, SubscriberConfig, SubscriberMetrics};
use meshlite_runtime::testing::{RecordingHandler, assert_eventually};
use prometheus_client::registry::Registry;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

const T: Duration = Duration::from_secs(10);

/// What the fake server does on each stream, in order: a list of frames to send,
/// each sent after the previous one was answered (ACK/NACK).
type Script = Vec<v1::UpdateFrame>;

#[derive(Clone)]
struct Fake {
    scripts: Arc<Mutex<Vec<Script>>>,
    replies: Arc<Mutex<Vec<v1::agent_message::Msg>>>,
    streams: Arc<Mutex<usize>>,
}

#[tonic::async_trait]
impl Mesh for Fake {
    type StreamStream = ReceiverStream<Result<v1::UpdateFrame, Status>>;

    async fn stream(
        &self,
        request: Request<Streaming<v1::AgentMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let mut inbound = request.into_inner();
        let script = {
            *self.streams.lock().unwrap() += 1;
            let mut s = self.scripts.lock().unwrap();
            if s.is_empty() {
                Vec::new()
            } else {
                s.remove(0)
            }
        };
        let (tx, rx) = mpsc::channel(4);
        let replies = self.replies.clone();
        tokio::spawn(async move {
            // Hello first.
            let _ = inbound.next().await;
            for frame in script {
                if tx.send(Ok(frame)).await.is_err() {
                    return;
                }
                match inbound.next().await {
                    Some(Ok(m)) => {
                        if let Some(msg) = m.msg {
                            replies.lock().unwrap().push(msg);
                        }
                    }
                    _ => return,
                }
            }
            // Hold the stream open.
            while let Some(Ok(m)) = inbound.next().await {
                if let Some(msg) = m.msg {
                    replies.lock().unwrap().push(msg);
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

fn svc(name: &str, ip: &str) -> bytes::Bytes {
    resource_bytes(&Resource::Service(Service::cluster_ip(
        "default",
        name,
        ip.parse().unwrap(),
    )))
}

fn frame(
    version: u64,
    base: u64,
    nonce: &str,
    upserts: Vec<bytes::Bytes>,
    removals: &[&str],
) -> v1::UpdateFrame {
    v1::UpdateFrame {
        epoch: 7,
        version,
        base_version: base,
        nonce: nonce.into(),
        upserts,
        removals: removals.iter().map(|s| s.to_string()).collect(),
        last_chunk: true,
        ..Default::default()
    }
}

async fn serve(scripts: Vec<Script>) -> (Fake, SocketAddr) {
    let fake = Fake {
        scripts: Arc::new(Mutex::new(scripts)),
        replies: Arc::default(),
        streams: Arc::default(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = MeshServer::new(fake.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (fake, addr)
}

fn subscribe(
    addr: SocketAddr,
    max_message_bytes: usize,
) -> (
    RecordingHandler,
    Arc<SubscriberMetrics>,
    tokio::sync::oneshot::Sender<()>,
) {
    subscribe_with(addr, max_message_bytes, RecordingHandler::default())
}

fn subscribe_with(
    addr: SocketAddr,
    max_message_bytes: usize,
    handler: RecordingHandler,
) -> (
    RecordingHandler,
    Arc<SubscriberMetrics>,
    tokio::sync::oneshot::Sender<()>,
) {
    let mut registry = Registry::default();
    let metrics = Arc::new(SubscriberMetrics::register(&mut registry, "test"));
    let sub = Subscriber::new(
        SubscriberConfig {
            endpoint: format!("http://{addr}"),
            node_name: "node1".into(),
            role: Role::Node,
            tls: None,
            agent_version: "test".into(),
            backoff: Backoff::try_new(Duration::from_millis(20), Duration::from_millis(100), 0.5)
                .unwrap(),
            max_message_bytes,
            token_file: None,
        },
        handler.clone(),
        metrics.clone(),
    );
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(sub.run(async move {
        let _ = rx.await;
    }));
    (handler, metrics, stop)
}

fn replies(f: &Fake) -> Vec<v1::agent_message::Msg> {
    f.replies.lock().unwrap().clone()
}

#[tokio::test]
async fn a_delta_for_an_unknown_base_is_nacked_with_want_full() {
    let (fake, addr) = serve(vec![vec![
        frame(1, 0, "1", vec![svc("a", "198.19.0.1")], &[]),
        // Base 5: the agent holds 1.
        frame(6, 5, "2", vec![svc("b", "198.19.0.2")], &[]),
        frame(
            7,
            0,
            "3",
            vec![svc("a", "198.19.0.1"), svc("b", "198.19.0.2")],
            &[],
        ),
    ]])
    .await;
    let (h, _m, _stop) = subscribe(addr, 4 << 20);
    assert_eventually("three replies", T, || replies(&fake).len() == 3).await;
    let r = replies(&fake);
    assert!(matches!(&r[0], v1::agent_message::Msg::Ack(a) if a.version == 1));
    match &r[1] {
        v1::agent_message::Msg::Nack(n) => {
            assert!(n.want_full, "{n:?}");
            assert_eq!(n.version, 1, "reports the version it still holds");
        }
        other => panic!("expected a NACK, got {other:?}"),
    }
    assert!(matches!(&r[2], v1::agent_message::Msg::Ack(a) if a.version == 7));
    let recs = h.records();
    assert_eq!(recs.len(), 2, "the bad delta was not applied: {recs:?}");
    assert_eq!(recs[1].resources, 2);
}

fn resource_bytes(r: &Resource) -> bytes::Bytes {
    let kind = v1::resource::Kind::from(r);
    bytes::Bytes::from(
        v1::Resource {
            key: r.key().to_string(),
            hash: content_hash(&kind),
            kind: Some(kind),
        }
        .encode_to_vec(),
    )
}

fn web_slice(ips: &[&str]) -> Resource {
    Resource::EndpointSlice(EndpointSlice {
        namespace: "default".into(),
        name: "web-abc".into(),
        service_name: "web".into(),
        address_family: AddressFamily::Ipv4,
        ports: vec![],
        endpoints: ips
            .iter()
            .map(|ip| Endpoint::ready(ip.parse().unwrap()))
            .collect(),
        ignored_by_proxy: false,
    })
}

/// `slice` encoded with its second endpoint's address made invalid.
fn with_invalid_endpoint(slice: &Resource) -> bytes::Bytes {
    let mut r = v1::Resource::decode(resource_bytes(slice).as_ref()).unwrap();
    if let Some(v1::resource::Kind::EndpointSlice(s)) = r.kind.as_mut() {
        s.endpoints[1].addresses = vec!["198.18.0.300".into()];
    }
    bytes::Bytes::from(r.encode_to_vec())
}

/// The patch from `old` to `new` as the control plane encodes it, with its base
/// hash replaced by `base` when given.
fn patch_bytes(old: &Resource, new: &Resource, base: Option<u64>) -> bytes::Bytes {
    let (Resource::EndpointSlice(o), Resource::EndpointSlice(n)) = (old, new) else {
        panic!("slices only");
    };
    let old_hash = content_hash(&old.into());
    let mut patch = meshlite_proto::patch::diff(&o.into(), &n.into(), old_hash).unwrap();
    if let Some(b) = base {
        patch.base_hash = b;
    }
    bytes::Bytes::from(
        v1::Resource {
            key: new.key().to_string(),
            hash: content_hash(&new.into()),
            kind: Some(v1::resource::Kind::EndpointSlicePatch(patch)),
        }
        .encode_to_vec(),
    )
}

#[tokio::test]
async fn patches_apply_to_the_held_slice_and_a_mismatch_asks_for_a_full_snapshot() {
    let v1_ = web_slice(&["198.18.0.1", "198.18.0.2", "198.18.0.3"]);
    let v2 = web_slice(&["198.18.0.1", "198.18.0.9", "198.18.0.3"]);
    let v3 = web_slice(&["198.18.0.1", "198.18.0.9", "198.18.0.4"]);
    // A patch whose result is not what the server announces.
    let mut lying = v1::Resource::decode(patch_bytes(&v2, &v3, None).as_ref()).unwrap();
    lying.hash ^= 1;
    let (fake, addr) = serve(vec![vec![
        frame(1, 0, "1", vec![resource_bytes(&v1_)], &[]),
        frame(2, 1, "2", vec![patch_bytes(&v1_, &v2, None)], &[]),
        // Based on a version of the slice the agent does not hold.
        frame(3, 2, "3", vec![patch_bytes(&v2, &v3, Some(42))], &[]),
        frame(
            3,
            2,
            "4",
            vec![bytes::Bytes::from(lying.encode_to_vec())],
            &[],
        ),
    ]])
    .await;
    let (h, _m, _stop) = subscribe(addr, 4 << 20);
    assert_eventually("four replies", T, || replies(&fake).len() == 4).await;
    let r = replies(&fake);
    assert!(
        matches!(&r[1], v1::agent_message::Msg::Ack(a) if a.version == 2),
        "{r:?}"
    );
    for (i, what) in [(2, "patch base"), (3, "hashes to")] {
        match &r[i] {
            v1::agent_message::Msg::Nack(n) => {
                assert!(n.want_full, "{n:?}");
                assert_eq!(n.version, 2, "keeps what it holds");
                assert!(n.error.contains(what), "{n:?}");
            }
            other => panic!("expected a NACK, got {other:?}"),
        }
    }
    let recs = h.records();
    assert_eq!(recs.len(), 2, "the bad patches were not applied: {recs:?}");
    assert_eq!(recs[1].upserted, vec!["endpointslice/default/web-abc"]);
    // The patched slice is exactly v2.
    let want = meshlite_runtime::Snapshot::from_resources([v2])
        .digest()
        .sum;
    assert_eq!(recs[1].digest, want);
}

/// A slice the agent rejected (the server counts it as applied) later changes: the
/// patch is rejected like the slice was, without asking for a full snapshot; the
/// next valid whole slice is taken.
#[tokio::test]
async fn a_patch_for_a_rejected_slice_is_rejected_not_a_full_snapshot() {
    let v1_ = web_slice(&["198.18.0.1", "198.18.0.2"]);
    let v2 = web_slice(&["198.18.0.1", "198.18.0.3"]);
    let v3 = web_slice(&["198.18.0.1", "198.18.0.4"]);
    let (fake, addr) = serve(vec![vec![
        frame(1, 0, "1", vec![resource_bytes(&v1_)], &[]),
        frame(2, 1, "2", vec![with_invalid_endpoint(&v2)], &[]),
        frame(3, 2, "3", vec![patch_bytes(&v2, &v3, None)], &[]),
        frame(4, 3, "4", vec![resource_bytes(&v3)], &[]),
    ]])
    .await;
    let (h, _m, _stop) = subscribe(addr, 4 << 20);
    assert_eventually("four replies", T, || replies(&fake).len() == 4).await;
    let r = replies(&fake);
    for (i, version) in [(1, 2), (2, 3)] {
        match &r[i] {
            v1::agent_message::Msg::Nack(n) => {
                assert!(!n.want_full, "{n:?}");
                assert_eq!(n.version, version);
                assert!(
                    n.rejected[0].starts_with("endpointslice/default/web-abc"),
                    "{n:?}"
                );
            }
            other => panic!("expected a NACK, got {other:?}"),
        }
    }
    assert!(
        matches!(&r[3], v1::agent_message::Msg::Ack(a) if a.version == 4),
        "{r:?}"
    );
    let want = meshlite_runtime::Snapshot::from_resources([v3])
        .digest()
        .sum;
    assert_eq!(h.records().last().unwrap().digest, want);
}

/// The server sends a slice's earlier, valid version again after the agent rejected
/// a newer one: the agent holds it already, so the key is good again and the next
/// patch from it applies.
#[tokio::test]
async fn a_rejected_slice_that_comes_back_takes_patches_again() {
    let v1_ = web_slice(&["198.18.0.1", "198.18.0.2"]);
    let v2 = web_slice(&["198.18.0.1", "198.18.0.3"]);
    let v3 = web_slice(&["198.18.0.1", "198.18.0.4"]);
    let (fake, addr) = serve(vec![vec![
        frame(1, 0, "1", vec![resource_bytes(&v1_)], &[]),
        frame(2, 1, "2", vec![with_invalid_endpoint(&v2)], &[]),
        frame(3, 2, "3", vec![resource_bytes(&v1_)], &[]),
        frame(4, 3, "4", vec![patch_bytes(&v1_, &v3, None)], &[]),
    ]])
    .await;
    let (h, _m, _stop) = subscribe(addr, 4 << 20);
    assert_eventually("four replies", T, || replies(&fake).len() == 4).await;
    let r = replies(&fake);
    assert!(
        matches!(&r[1], v1::agent_message::Msg::Nack(n) if !n.want_full),
        "{r:?}"
    );
    assert!(
        matches!(&r[2], v1::agent_message::Msg::Ack(a) if a.version == 3),
        "{r:?}"
    );
    assert!(
        matches!(&r[3], v1::agent_message::Msg::Ack(a) if a.version == 4),
        "{r:?}"
    );
    let want = meshlite_runtime::Snapshot::from_resources([v3])
        .digest()
        .sum;
    assert_eq!(h.records().last().unwrap().digest, want);
}

#[tokio::test]
async fn invalid_resources_are_rejected_by_key_and_the_rest_applied() {
    let mut bad = v1::Resource::decode(svc("bad", "198.19.0.9").as_ref()).unwrap();
    if let Some(v1::resource::Kind::Service(s)) = bad.kind.as_mut() {
        s.cluster_ips = vec!["999.1.1.1".into()];
    }
    let mismatched = v1::Resource {
        key: "service/default/other".into(),
        ..v1::Resource::decode(svc("x", "198.19.0.3").as_ref()).unwrap()
    };
    let (fake, addr) = serve(vec![vec![
        frame(1, 0, "1", vec![svc("a", "198.19.0.1")], &[]),
        frame(
            2,
            1,
            "2",
            vec![
                svc("good", "198.19.0.2"),
                bytes::Bytes::from(bad.encode_to_vec()),
                bytes::Bytes::from(mismatched.encode_to_vec()),
            ],
            // Removing what the agent never had is harmless.
            &["service/default/never-existed", "not a key"],
        ),
    ]])
    .await;
    let (h, _m, _stop) = subscribe(addr, 4 << 20);
    assert_eventually("two replies", T, || replies(&fake).len() == 2).await;
    match &replies(&fake)[1] {
        v1::agent_message::Msg::Nack(n) => {
            assert!(!n.want_full);
            assert_eq!(n.version, 2, "the valid part was applied");
            let joined = n.rejected.join("\n");
            assert!(
                joined
                    .contains("service/default/bad: clusterIPs: invalid IP address \"999.1.1.1\""),
                "{joined}"
            );
            assert!(joined.contains("service/default/other"), "{joined}");
            assert!(joined.contains("not a key"), "{joined}");
        }
        other => panic!("expected a NACK, got {other:?}"),
    }
    let recs = h.records();
    assert_eq!(recs[1].upserted, vec!["service/default/good"]);
    assert_eq!(recs[1].resources, 2);
}

/// The handler applied the update but could not put one resource into effect
/// (the node agent when the kernel refuses a Service's rules): the update is held
/// and NACKed naming that resource, next to any resource that failed to convert.
#[tokio::test]
async fn resources_the_handler_rejects_are_nacked_by_key_and_the_version_held() {
    let (fake, addr) = serve(vec![vec![frame(
        1,
        0,
        "1",
        vec![svc("a", "198.19.0.1"), svc("b", "198.19.0.2")],
        &[],
    )]])
    .await;
    let h = RecordingHandler::default();
    *h.reject.lock().unwrap() = vec!["service/default/b: ipv4 default/b:http: refused".into()];
    let (h, _m, _stop) = subscribe_with(addr, 4 << 20, h);
    assert_eventually("a reply", T, || !replies(&fake).is_empty()).await;
    match &replies(&fake)[0] {
        v1::agent_message::Msg::Nack(n) => {
            assert!(!n.want_full);
            assert_eq!(n.version, 1, "the update is held");
            assert_eq!(
                n.rejected,
                ["service/default/b: ipv4 default/b:http: refused"]
            );
        }
        other => panic!("expected a NACK, got {other:?}"),
    }
    assert_eq!(h.records().len(), 1);
    assert_eq!(h.records()[0].resources, 2);
}

#[tokio::test]
async fn an_oversized_message_ends_the_stream_and_the_agent_reconnects() {
    let big: Vec<bytes::Bytes> = (0..3000)
        .map(|i| {
            svc(
                &format!("s{i}"),
                &format!("198.19.{}.{}", i / 250, i % 250 + 1),
            )
        })
        .collect();
    let (fake, addr) = serve(vec![
        vec![frame(1, 0, "1", big, &[])],
        vec![frame(2, 0, "1", vec![svc("a", "198.19.0.1")], &[])],
    ])
    .await;
    // A small limit makes the first frame too large to decode.
    let (h, m, _stop) = subscribe(addr, 64 * 1024);
    assert_eventually("served by the second stream", T, || h.records().len() == 1).await;
    assert_eq!(h.records()[0].resources, 1);
    assert!(*fake.streams.lock().unwrap() >= 2);
    let _ = m;
}

#[tokio::test]
async fn garbage_from_the_server_is_survived() {
    // A frame whose upsert bytes are not a Resource at all: the stream's decoding
    // fails (it is one message), the agent reconnects and is served.
    let garbage = frame(
        1,
        0,
        "1",
        vec![bytes::Bytes::from_static(&[0xff, 0xff, 0xff, 0x0f, 0x01])],
        &[],
    );
    let (fake, addr) = serve(vec![
        vec![garbage],
        vec![frame(2, 0, "1", vec![svc("a", "198.19.0.1")], &[])],
    ])
    .await;
    let (h, _m, _stop) = subscribe(addr, 4 << 20);
    assert_eventually("served after garbage", T, || h.records().len() == 1).await;
    assert!(*fake.streams.lock().unwrap() >= 2);
}
