//! `--node-identity token`: a node agent's ServiceAccount token, verified by the
//! control plane with TokenReview against the API stand-in, must be bound to the
//! node the agent claims.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use meshlite_control_plane::config::Cli;
use meshlite_e2e::apiserver::ApiServer;
use meshlite_runtime::subscriber::Role;
use meshlite_runtime::testing::{TestPki, TestSubscriber, assert_eventually};

const SA: &str = "system:serviceaccount:kube-system:meshlite-node-agent";

fn agent(
    addr: std::net::SocketAddr,
    pki: &TestPki,
    node: &str,
    token: Option<&std::path::Path>,
) -> TestSubscriber {
    TestSubscriber::start(
        format!("https://{addr}"),
        node,
        Role::Node,
        Some(pki.client("node-agent", &["node-agent"])),
        token.map(|p| p.to_path_buf()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_bind_node_agents_to_their_node() {
    meshlite_runtime::tls::install_default_provider();
    let api = ApiServer::start().await.unwrap();
    api.apply_yaml("apiVersion: v1\nkind: Node\nmetadata: {name: node1}\n---\napiVersion: v1\nkind: Node\nmetadata: {name: node2}\n").unwrap();
    api.add_token("tok-node1", SA, Some("node1"));
    api.add_token(
        "tok-other-sa",
        "system:serviceaccount:default:intruder",
        Some("node1"),
    );
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let pki = TestPki::new("ca");
    let server = pki.server();
    let cli = <Cli as clap::Parser>::try_parse_from([
        "meshlite-control-plane",
        "--source=kube",
        &format!("--kubeconfig={}", kubeconfig.display()),
        "--listen=127.0.0.1:0",
        "--admin-listen=127.0.0.1:0",
        &format!("--tls-cert={}", server.cert.display()),
        &format!("--tls-key={}", server.key.display()),
        &format!("--tls-ca={}", server.client_ca.display()),
        "--node-identity=token",
        &format!("--node-agent-service-account={SA}"),
    ])
    .unwrap();
    let (handle, _task) =
        meshlite_control_plane::start(cli.args.validate().unwrap(), std::future::pending())
            .await
            .unwrap();
    let tok = |name: &str, value: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, format!("{value}\n")).unwrap();
        p
    };
    let good = tok("good", "tok-node1");
    let other_sa = tok("sa", "tok-other-sa");
    let unknown = tok("unknown", "nope");

    let ok = agent(handle.grpc_addr, &pki, "node1", Some(&good));
    assert_eventually(
        "node1 with its own token is served",
        Duration::from_secs(15),
        || ok.records().len() == 1,
    )
    .await;

    let refused = || {
        handle
            .metrics
            .streams_refused
            .get_or_create(&meshlite_control_plane::metrics::ReasonLabels {
                reason: "unauthorized".into(),
            })
            .get()
    };
    let a = agent(handle.grpc_addr, &pki, "node2", Some(&good)); // node1's token claiming node2
    let b = agent(handle.grpc_addr, &pki, "node1", Some(&other_sa)); // wrong ServiceAccount
    let c = agent(handle.grpc_addr, &pki, "node1", Some(&unknown)); // invalid token
    let d = agent(handle.grpc_addr, &pki, "node1", None); // no token
    assert_eventually(
        "all four refused (and retrying)",
        Duration::from_secs(15),
        || refused() >= 8,
    )
    .await;
    for h in [&a, &b, &c, &d] {
        assert!(h.records().is_empty(), "an impostor was served");
    }
}
