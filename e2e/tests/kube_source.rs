//! The control plane's kube source (kube-rs watchers) against the API stand-in over
//! HTTP, through an ordinary kubeconfig, observed by a real subscriber.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use meshlite_control_plane::config::Cli;
use meshlite_e2e::apiserver::{ApiServer, Collection};
use meshlite_runtime::subscriber::Role;
use meshlite_runtime::testing::{TestSubscriber, assert_eventually};

const T: Duration = Duration::from_secs(20);

struct Setup {
    api: ApiServer,
    handle: meshlite_control_plane::Handle,
    handler: TestSubscriber,
    _dir: tempfile::TempDir,
}

fn svc(name: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec: {{clusterIP: {ip}, ports: [{{name: http, port: 80}}]}}\n"
    )
}

fn slice(name: &str, svc: &str, ips: &[&str]) -> String {
    let eps: Vec<String> = ips
        .iter()
        .map(|ip| format!("  - addresses: [{ip}]\n    conditions: {{ready: true}}\n"))
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: default\n  labels: {{kubernetes.io/service-name: {svc}}}\naddressType: IPv4\nports: [{{name: http, port: 80}}]\nendpoints:\n{}",
        eps.concat()
    )
}

async fn setup() -> Setup {
    meshlite_runtime::telemetry::init_logging(false);
    meshlite_runtime::tls::install_default_provider();
    let api = ApiServer::start_with(Duration::from_millis(200))
        .await
        .unwrap();
    api.apply_yaml(&svc("web", "198.19.0.10")).unwrap();
    api.apply_yaml(&slice("web-1", "web", &["198.18.0.1", "198.18.0.2"]))
        .unwrap();
    api.apply_yaml("apiVersion: v1\nkind: Node\nmetadata: {name: node1}\n")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();

    let cli = <Cli as clap::Parser>::try_parse_from([
        "meshlite-control-plane",
        "--source",
        "kube",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--insecure",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--debounce",
        "1ms",
    ])
    .unwrap();
    let (handle, _task) =
        meshlite_control_plane::start(cli.args.validate().unwrap(), std::future::pending())
            .await
            .unwrap();

    let handler = TestSubscriber::start(
        format!("http://{}", handle.grpc_addr),
        "node1",
        Role::Node,
        None,
        None,
    );
    Setup {
        api,
        handle,
        handler,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_sync_then_add_modify_delete() {
    let s = setup().await;
    assert_eventually("initial snapshot", T, || s.handler.records().len() == 1).await;
    let first = &s.handler.records()[0];
    assert!(first.full);
    assert_eq!(
        first.resources, 3,
        "service, slice and the agent's own node"
    );
    assert_eq!(
        s.api
            .stats
            .watches
            .load(std::sync::atomic::Ordering::Relaxed),
        3,
        "one watch per kind"
    );

    s.api.apply_yaml(&svc("api", "198.19.0.11")).unwrap();
    assert_eventually("add", T, || s.handler.records().len() == 2).await;
    assert_eq!(s.handler.records()[1].upserted, vec!["service/default/api"]);

    s.api
        .apply_yaml(&slice("web-1", "web", &["198.18.0.1"]))
        .unwrap();
    assert_eventually("modify", T, || s.handler.records().len() == 3).await;
    assert_eq!(
        s.handler.records()[2].upserted,
        vec!["endpointslice/default/web-1"]
    );

    // A change the normalized form ignores produces no update.
    s.api
        .apply_yaml(&svc("api", "198.19.0.11").replace(
            "namespace: default}",
            "namespace: default, labels: {team: web}}",
        ))
        .unwrap();
    assert!(s.api.delete(Collection::Service, "default", "api"));
    assert_eventually("delete", T, || s.handler.records().len() == 4).await;
    assert_eq!(s.handler.records()[3].removed, vec!["service/default/api"]);
    assert!(
        s.handler.records()[3].upserted.is_empty(),
        "the label-only change sent nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_410_relist_pushes_no_spurious_deletes() {
    let s = setup().await;
    assert_eventually("initial snapshot", T, || s.handler.records().len() == 1).await;
    let version = s.handle.store.version();
    let watches = s
        .api
        .stats
        .watches
        .load(std::sync::atomic::Ordering::Relaxed);
    let lists = s.api.stats.lists.load(std::sync::atomic::Ordering::Relaxed);

    // History is compacted and every watch is cut: the watchers get 410 Gone on
    // reconnect and re-list everything.
    s.api.compact(true);
    assert_eventually("re-listed", T, || {
        s.api.stats.lists.load(std::sync::atomic::Ordering::Relaxed) >= lists + 3
            && s.api
                .stats
                .watches
                .load(std::sync::atomic::Ordering::Relaxed)
                >= watches + 6
    })
    .await;
    // A change after the re-list is the next thing the agent sees: nothing was
    // deleted or re-sent in between.
    s.api
        .apply_yaml(&slice("web-1", "web", &["198.18.0.9"]))
        .unwrap();
    assert_eventually("change after relist", T, || s.handler.records().len() == 2).await;
    let r = &s.handler.records()[1];
    assert!(r.removed.is_empty(), "spurious deletes: {:?}", r.removed);
    assert_eq!(r.upserted, vec!["endpointslice/default/web-1"]);
    assert_eq!(
        s.handle.store.version(),
        version + 1,
        "the re-list itself changed nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_watch_connections_resume_without_loss() {
    let s = setup().await;
    assert_eventually("initial snapshot", T, || s.handler.records().len() == 1).await;
    for i in 0..3 {
        s.api.drop_watches();
        s.api
            .apply_yaml(&svc(&format!("s{i}"), &format!("198.19.1.{}", i + 1)))
            .unwrap();
    }
    assert_eventually("all three services arrive", T, || {
        s.handler
            .records()
            .iter()
            .flat_map(|r| r.upserted.clone())
            .filter(|k| k.starts_with("service/default/s"))
            .count()
            == 3
    })
    .await;
    assert!(s.handler.records().iter().all(|r| r.removed.is_empty()));
}

/// An API server outage long enough for a client's backoff to grow, with the
/// history compacted meanwhile (so the watchers get 410 Gone when it returns) and a
/// change made during it: the change reaches the agent within seconds of the
/// return. kube-rs' default backoff (800 ms doubling to 30 s, applied to the 410 as
/// well) took 13-33 s here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_during_an_outage_arrives_soon_after_the_api_server_returns() {
    let s = setup().await;
    assert_eventually("initial snapshot", T, || s.handler.records().len() == 1).await;
    let lists = s.api.stats.lists.load(std::sync::atomic::Ordering::Relaxed);

    s.api.stop().await;
    tokio::time::sleep(Duration::from_secs(12)).await;
    s.api
        .apply_yaml(&slice("web-1", "web", &["198.18.0.7"]))
        .unwrap();
    s.api.compact(false);
    let back = std::time::Instant::now();
    s.api.restart().await.unwrap();

    assert_eventually("the change made during the outage", T, || {
        s.handler.records().len() == 2
    })
    .await;
    let took = back.elapsed();
    println!("change made during the outage visible {took:?} after the API server returned");
    assert_eventually("every watcher re-listed after the 410", T, || {
        s.api.stats.lists.load(std::sync::atomic::Ordering::Relaxed) >= lists + 3
    })
    .await;
    assert!(
        took < Duration::from_secs(4),
        "took {took:?}: the watchers waited out a long backoff"
    );
    let r = &s.handler.records()[1];
    assert_eq!(r.upserted, vec!["endpointslice/default/web-1"]);
    assert!(r.removed.is_empty(), "spurious deletes: {:?}", r.removed);
}
