//! The full path: the control plane binary (file source) streams to the node agent
//! binary, which programs the kernel of the lab's node namespace; real packets from
//! the client namespace check the result, through a change and an agent restart.
//!
//! Both processes run inside the node namespace (`ip netns exec`), talking over that
//! namespace's 127.0.0.1. The node agent binary is this crate's own
//! (`CARGO_BIN_EXE_meshlite-node-agent`); the control plane binary is found next to
//! it in the same target profile directory (or in `$MESHLITE_BIN_DIR`), and built
//! with `cargo build -p meshlite-control-plane` when missing. Processes are stopped
//! by PID when the test ends.

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/netns.rs"]
mod netns;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use netns::{Lab, Outcome, get};

const T: Duration = Duration::from_secs(2);

/// A process started by this test, stopped (SIGTERM, then SIGKILL) by PID on drop.
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn start(name: &'static str, ns: &str, bin: &Path, args: &[String], dir: &Path) -> Self {
        let log = dir.join(format!("{name}-{}.log", std::process::id()));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(bin)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Self { name, child, log }
    }

    /// Waits for the JSON addresses file the process writes once listening.
    fn addresses(&mut self, file: &Path) -> HashMap<String, SocketAddr> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(text) = std::fs::read_to_string(file)
                && let Ok(map) = serde_json::from_str::<HashMap<String, String>>(&text)
            {
                return map
                    .into_iter()
                    .map(|(k, v)| (k, v.parse().unwrap()))
                    .collect();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited ({status}):\n{}", self.name, self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{} wrote no addresses:\n{}", self.name, self.log_tail());
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    fn stop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// The control plane binary: `$MESHLITE_BIN_DIR`, else next to this crate's binary,
/// else built now.
fn control_plane_binary() -> PathBuf {
    let name = "meshlite-control-plane";
    if let Some(dir) = std::env::var_os("MESHLITE_BIN_DIR") {
        let p = Path::new(&dir).join(name);
        assert!(p.exists(), "{} not found (MESHLITE_BIN_DIR)", p.display());
        return p;
    }
    let ours = PathBuf::from(env!("CARGO_BIN_EXE_meshlite-node-agent"));
    let dir = ours.parent().unwrap().to_path_buf();
    let p = dir.join(name);
    if !p.exists() {
        // target/<profile>/meshlite-node-agent -> target, <profile>
        let profile = dir.file_name().unwrap().to_string_lossy().to_string();
        let target = dir.parent().unwrap();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "-p",
            "meshlite-control-plane",
            "--bin",
            name,
            "--target-dir",
        ])
        .arg(target);
        if profile == "release" {
            cmd.arg("--release");
        }
        let status = cmd.status().unwrap();
        assert!(
            status.success() && p.exists(),
            "{name} not found in {} and could not be built; run `cargo build --workspace --bins` first",
            dir.display()
        );
    }
    p
}

const SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 198.19.0.30
  ports: [{name: http, protocol: TCP, port: 80, targetPort: 80}]
---
apiVersion: v1
kind: Node
metadata:
  name: node1
  labels: {topology.kubernetes.io/zone: zone-a}
status:
  addresses: [{type: InternalIP, address: 198.18.200.1}]
"#;

fn slice(pods: &[&str]) -> String {
    let eps: String = pods
        .iter()
        .map(|ip| {
            format!("  - {{addresses: [\"{ip}\"], conditions: {{ready: true}}, nodeName: node1}}\n")
        })
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{{name: http, protocol: TCP, port: 80}}]\nendpoints:\n{eps}"
    )
}

fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_file_name(".tmp-slice");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, path).unwrap();
}

async fn spread(lab: &Lab, to: SocketAddr, n: usize) -> (BTreeMap<String, usize>, usize) {
    lab.client_rt
        .run(async move {
            let mut seen = BTreeMap::new();
            let mut failed = 0;
            for _ in 0..n {
                match get(to, "/", T).await.served() {
                    Some((pod, _)) => *seen.entry(pod).or_insert(0) += 1,
                    None => failed += 1,
                }
            }
            (seen, failed)
        })
        .await
}

fn start_agent(lab: &Lab, dir: &Path, grpc: SocketAddr) -> (Proc, HashMap<String, SocketAddr>) {
    let file = dir.join("agent-addresses.json");
    let _ = std::fs::remove_file(&file);
    let args: Vec<String> = [
        "--node-name=node1",
        &format!("--control-plane=http://{grpc}"),
        "--insecure",
        "--admin-listen=127.0.0.1:0",
        "--healthz-bind-address=127.0.0.1:0",
        &format!("--addresses-file={}", file.display()),
        &format!("--cluster-cidr={}", netns::CLUSTER_CIDR),
        "--ip-families=ipv4",
        "--min-sync-period=50ms",
        "--canary-period=1s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut p = Proc::start(
        "node-agent",
        &lab.node.name,
        Path::new(env!("CARGO_BIN_EXE_meshlite-node-agent")),
        &args,
        dir,
    );
    let addrs = p.addresses(&file);
    (p, addrs)
}

async fn wait_ready(lab: &Lab, admin: SocketAddr, agent: &Proc) {
    for _ in 0..200 {
        if let Outcome::Ok(200, _) = lab.node_rt.run(get(admin, "/readyz", T)).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("node agent not ready within 10 s:\n{}", agent.log_tail());
}

#[tokio::test]
async fn control_plane_to_node_agent_to_packets() {
    let lab = Lab::new(3).await.unwrap();
    let cp_bin = control_plane_binary();
    let tmp = tempfile::tempdir().unwrap();
    let manifests = tmp.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    std::fs::write(manifests.join("service.yaml"), SERVICE).unwrap();
    let slice_file = manifests.join("slice.yaml");
    write_atomic(
        &slice_file,
        &slice(&["198.18.1.2", "198.18.2.2", "198.18.3.2"]),
    );

    let cp_file = tmp.path().join("cp-addresses.json");
    let mut cp = Proc::start(
        "control-plane",
        &lab.node.name,
        &cp_bin,
        &[
            format!("--source=file:{}", manifests.display()),
            "--listen=127.0.0.1:0".into(),
            "--admin-listen=127.0.0.1:0".into(),
            "--insecure".into(),
            format!("--addresses-file={}", cp_file.display()),
        ],
        tmp.path(),
    );
    let grpc = cp.addresses(&cp_file)["grpc"];

    let (agent, addrs) = start_agent(&lab, tmp.path(), grpc);
    wait_ready(&lab, addrs["admin"], &agent).await;

    // The stream, selection, rendering and kernel together: every pod serves.
    let to: SocketAddr = "198.19.0.30:80".parse().unwrap();
    let (seen, failed) = spread(&lab, to, 90).await;
    assert_eq!(failed, 0, "{}", agent.log_tail());
    assert_eq!(seen.len(), 3, "{seen:?}");
    // kube-proxy's ports: /healthz on the healthz address, metrics on admin.
    let hz = lab.node_rt.run(get(addrs["healthz"], "/healthz", T)).await;
    assert!(
        matches!(&hz, Outcome::Ok(200, b) if b.contains("lastUpdated")),
        "{hz:?}"
    );
    let m = lab.node_rt.run(get(addrs["admin"], "/metrics", T)).await;
    assert!(
        matches!(&m, Outcome::Ok(200, b) if b.contains("kubeproxy_sync_proxy_rules_duration_seconds")),
        "{m:?}"
    );

    // A change at the source reaches the kernel: pod3 leaves.
    write_atomic(&slice_file, &slice(&["198.18.1.2", "198.18.2.2"]));
    let mut gone = false;
    for _ in 0..100 {
        let (seen, _) = spread(&lab, to, 20).await;
        if !seen.contains_key("pod3") && seen.len() == 2 {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "pod3 still served:\n{}", agent.log_tail());

    // Restart the agent process under a request loop: no request fails (the rules
    // stay while it is down; the new process does not flush before its first apply).
    let load = lab.client_rt.spawn(async move {
        let mut failed = Vec::new();
        for _ in 0..300 {
            let o = get(to, "/", T).await;
            if o.served().is_none() {
                failed.push(o);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        failed
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(agent);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (agent, addrs) = start_agent(&lab, tmp.path(), grpc);
    wait_ready(&lab, addrs["admin"], &agent).await;
    let failed = load.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} failed: {failed:?}\n{}",
        failed.len(),
        agent.log_tail()
    );
    let (seen, failed) = spread(&lab, to, 30).await;
    assert_eq!(failed, 0);
    assert!(!seen.contains_key("pod3"), "{seen:?}");
    cp.stop();
}
