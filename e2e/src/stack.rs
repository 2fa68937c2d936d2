//! meshlite's three processes, started in a [`Cluster`] over real mTLS: the control
//! plane on node1 (on 198.18.0.1, as a host-network pod), a node agent per node, and
//! DNS agents in pods.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use meshlite_runtime::testing::TestPki;

use crate::cluster::Cluster;
use crate::front::Front;
use crate::netns::{Outcome, get};
use crate::procs::{Process, binary};

/// The control plane's gRPC port on node1.
pub const CONTROL_PLANE_PORT: u16 = 7443;

/// Where the control plane reads cluster state.
#[derive(Debug, Clone)]
pub enum Source {
    /// A manifest directory (`--source file:<dir>`).
    Files(PathBuf),
    /// A kubeconfig for the API stand-in (`--source kube`).
    Kube(PathBuf),
}

/// What to start.
#[derive(Debug, Clone)]
pub struct StackConfig {
    pub source: Source,
    /// The node the control plane runs on.
    pub control_plane_node: String,
    /// Pods (already in the cluster) that run a DNS agent.
    pub dns_pods: Vec<String>,
    pub pod_records: bool,
    /// Extra environment for every process (e.g. OTEL_*).
    pub env: Vec<(String, String)>,
    /// `--file-poll-interval` and `--min-sync-period`: quick, for demos and tests.
    pub fast: bool,
    /// Control-plane replicas. With more than one, each listens on its own port
    /// and agents dial a [`Front`] on the usual address that forwards each new
    /// connection to the first replica that accepts it.
    pub control_plane_replicas: usize,
    /// Each node agent's `--mode`, by node name; a node not named runs
    /// [`ProxyMode::Iptables`].
    pub modes: BTreeMap<String, ProxyMode>,
}

/// A node agent's `--mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ProxyMode {
    #[default]
    Iptables,
    Nftables,
    /// Not available in the lab (this kernel has no IPVS); here for completeness.
    Ipvs,
}

/// A running process and its admin address (inside its namespace).
#[derive(Debug)]
pub struct Running {
    pub process: Process,
    pub admin: SocketAddr,
    /// The namespace it runs in.
    pub netns: String,
    launch: Launch,
}

/// How a process was started, to start it again.
#[derive(Debug, Clone)]
struct Launch {
    dir: PathBuf,
    name: String,
    binary: PathBuf,
    args: Vec<String>,
    wrap: Vec<String>,
    env: Vec<(String, String)>,
}

impl Launch {
    fn start(&self, timeout: Duration) -> Result<(Process, SocketAddr)> {
        let mut p = Process::start_env(
            &self.dir,
            &self.name,
            &self.binary,
            &self.args,
            &self.wrap,
            &self.env,
        )?;
        let admin = p
            .addresses(timeout)?
            .get("admin")
            .copied()
            .context("admin address")?;
        Ok((p, admin))
    }
}

impl Running {
    fn launch(launch: Launch, netns: &str, timeout: Duration) -> Result<Self> {
        let (process, admin) = launch.start(timeout)?;
        Ok(Self {
            process,
            admin,
            netns: netns.to_string(),
            launch,
        })
    }

    /// SIGKILL, as a crash would; the process stays down until [`Running::start_again`].
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts the process again with the same flags (after [`Running::kill`]).
    pub fn start_again(&mut self, timeout: Duration) -> Result<()> {
        self.process.kill();
        let (p, admin) = self.launch.start(timeout)?;
        self.process = p;
        self.admin = admin;
        Ok(())
    }
}

/// The running stack.
#[derive(Debug)]
pub struct Stack {
    pub pki: TestPki,
    pub dir: PathBuf,
    /// The (first) control-plane replica.
    pub control_plane: Running,
    /// Further replicas, with `control_plane_replicas` > 1.
    pub more_control_planes: Vec<Running>,
    /// The address agents dial, with more than one replica.
    pub front: Option<Front>,
    pub node_agents: BTreeMap<String, Running>,
    /// Each node agent's mode, by node name.
    pub modes: BTreeMap<String, ProxyMode>,
    pub dns_agents: BTreeMap<String, Running>,
}

fn s(v: impl ToString) -> String {
    v.to_string()
}

// === impl ProxyMode ===

impl ProxyMode {
    /// The flag value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Iptables => "iptables",
            Self::Nftables => "nftables",
            Self::Ipvs => "ipvs",
        }
    }
}

impl std::fmt::Display for ProxyMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl StackConfig ===

impl StackConfig {
    /// The mode `node`'s agent runs in.
    pub fn mode(&self, node: &str) -> ProxyMode {
        self.modes.get(node).copied().unwrap_or_default()
    }
}

impl Stack {
    /// Starts everything and waits until every process is ready (`/readyz` 200).
    pub async fn start(
        cluster: &Cluster,
        cfg: &StackConfig,
        dir: &Path,
        timeout: Duration,
    ) -> Result<Self> {
        let pki = TestPki::new("meshlite-demo-ca");
        let cp_node = cluster.node(&cfg.control_plane_node)?;
        let cp_ip = cp_node.ip;
        let (cert, key) = pki.leaf(
            "control-plane",
            &[&cp_ip.to_string(), "meshlite-control-plane"],
            true,
        );
        let ca = pki.ca_path().to_path_buf();
        let wrap = |ns: &str| vec![s("ip"), s("netns"), s("exec"), s(ns)];
        let source = match &cfg.source {
            Source::Files(d) => vec![s("--source"), format!("file:{}", d.display())],
            Source::Kube(k) => vec![s("--source=kube"), format!("--kubeconfig={}", k.display())],
        };
        let replicas = cfg.control_plane_replicas.max(1);
        let mut control_planes = Vec::new();
        let mut backends = Vec::new();
        for i in 0..replicas {
            // One replica listens where agents dial; several sit behind a front.
            let port = if replicas == 1 {
                CONTROL_PLANE_PORT
            } else {
                CONTROL_PLANE_PORT + 1 + i as u16
            };
            backends.push(std::net::SocketAddr::new(cp_ip.into(), port));
            let mut args = source.clone();
            args.extend([
                format!("--listen={cp_ip}:{port}"),
                s("--admin-listen=127.0.0.1:0"),
                format!("--tls-cert={}", cert.display()),
                format!("--tls-key={}", key.display()),
                format!("--tls-ca={}", ca.display()),
                s("--node-identity=certificate"),
            ]);
            if cfg.fast {
                args.push(s("--file-poll-interval=100ms"));
            }
            control_planes.push(Running::launch(
                Launch {
                    dir: dir.to_path_buf(),
                    name: if i == 0 {
                        "control-plane".into()
                    } else {
                        format!("control-plane-{}", i + 1)
                    },
                    binary: binary("meshlite-control-plane")?,
                    args,
                    wrap: wrap(&cp_node.ns.name),
                    env: cfg.env.clone(),
                },
                &cp_node.ns.name,
                timeout,
            )?);
        }
        let front = if replicas > 1 {
            let listen = std::net::SocketAddr::new(cp_ip.into(), CONTROL_PLANE_PORT);
            Some(
                cp_node
                    .rt
                    .run(Front::start(listen, backends))
                    .await
                    .context("control-plane front")?,
            )
        } else {
            None
        };
        let mut control_planes = control_planes.into_iter();
        let control_plane = control_planes
            .next()
            .context("at least one control-plane replica")?;
        let more_control_planes: Vec<Running> = control_planes.collect();
        let endpoint = format!("https://{cp_ip}:{CONTROL_PLANE_PORT}");

        let mut node_agents = BTreeMap::new();
        let mut modes = BTreeMap::new();
        if cfg.modes.values().any(|m| *m == ProxyMode::Nftables) {
            crate::netns::require_root_and_tools(&["nft"])?;
        }
        for node in cluster.nodes.values() {
            modes.insert(node.name.clone(), cfg.mode(&node.name));
            let (cert, key) = pki.leaf(
                &format!("node-agent-{}", node.name),
                &[&format!("{}.nodes.meshlite", node.name)],
                false,
            );
            let mut args = vec![
                format!("--control-plane={endpoint}"),
                format!("--node-name={}", node.name),
                format!("--mode={}", cfg.mode(&node.name)),
                s("--admin-listen=127.0.0.1:0"),
                s("--healthz-bind-address=0.0.0.0:10256"),
                format!("--tls-cert={}", cert.display()),
                format!("--tls-key={}", key.display()),
                format!("--tls-ca={}", ca.display()),
                s("--cluster-cidr=198.18.0.0/17"),
                format!("--node-ip={}", node.ip),
                s("--ip-families=ipv4"),
            ];
            if cfg.fast {
                args.push(s("--min-sync-period=100ms"));
            }
            node_agents.insert(
                node.name.clone(),
                Running::launch(
                    Launch {
                        dir: dir.to_path_buf(),
                        name: format!("node-agent-{}", node.name),
                        binary: binary("meshlite-node-agent")?,
                        args,
                        wrap: wrap(&node.ns.name),
                        env: cfg.env.clone(),
                    },
                    &node.ns.name,
                    timeout,
                )?,
            );
        }

        let mut dns_agents = BTreeMap::new();
        for pod_name in &cfg.dns_pods {
            let pod = cluster.pod(pod_name)?;
            let (cert, key) = pki.leaf(&format!("dns-{pod_name}"), &["dns-agent"], false);
            let args = vec![
                format!("--control-plane={endpoint}"),
                s("--listen=0.0.0.0:53"),
                s("--admin-listen=127.0.0.1:0"),
                s("--cluster-domain=cluster.local"),
                format!(
                    "--pod-records={}",
                    if cfg.pod_records {
                        "insecure"
                    } else {
                        "disabled"
                    }
                ),
                s("--service-cidr=198.19.0.0/16"),
                s("--pod-cidr=198.18.0.0/16"),
                // Nothing outside the cluster zone is reachable from the lab: forward
                // to a closed local port rather than to a real resolver.
                s("--upstream=127.0.0.1:1"),
                format!("--node-name={pod_name}"),
                format!("--tls-cert={}", cert.display()),
                format!("--tls-key={}", key.display()),
                format!("--tls-ca={}", ca.display()),
            ];
            dns_agents.insert(
                pod_name.clone(),
                Running::launch(
                    Launch {
                        dir: dir.to_path_buf(),
                        name: format!("dns-agent-{pod_name}"),
                        binary: binary("meshlite-dns-agent")?,
                        args,
                        wrap: wrap(&pod.ns.name),
                        env: cfg.env.clone(),
                    },
                    &pod.ns.name,
                    timeout,
                )?,
            );
        }
        let stack = Self {
            pki,
            dir: dir.to_path_buf(),
            control_plane,
            more_control_planes,
            front,
            node_agents,
            modes,
            dns_agents,
        };
        stack.wait_ready(cluster, timeout).await?;
        Ok(stack)
    }

    /// Every process, for listing PIDs.
    pub fn all(&self) -> Vec<&Running> {
        std::iter::once(&self.control_plane)
            .chain(&self.more_control_planes)
            .chain(self.node_agents.values())
            .chain(self.dns_agents.values())
            .collect()
    }

    /// The mode `node`'s agent runs in.
    pub fn mode(&self, node: &str) -> ProxyMode {
        self.modes.get(node).copied().unwrap_or_default()
    }

    /// Waits until every process's `/readyz` answers 200.
    pub async fn wait_ready(&self, cluster: &Cluster, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        for r in self.all() {
            loop {
                let (code, body) = admin_get(cluster, r, "/readyz")
                    .await
                    .unwrap_or((0, String::new()));
                if code == 200 {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "{} not ready after {timeout:?}: {}\n{}",
                        r.process.name,
                        body.trim(),
                        r.process.log_tail()
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }
}

/// GET on a process's admin address, from inside its namespace.
pub async fn admin_get(cluster: &Cluster, r: &Running, path: &str) -> Result<(u16, String)> {
    let rt = cluster
        .nodes
        .values()
        .find(|n| n.ns.name == r.netns)
        .map(|n| &n.rt)
        .or_else(|| {
            cluster
                .pods
                .values()
                .find(|p| p.ns.name == r.netns)
                .map(|p| &p.rt)
        })
        .with_context(|| format!("no namespace {}", r.netns))?;
    let (addr, p) = (r.admin, path.to_string());
    match rt
        .run(async move { get(addr, &p, Duration::from_secs(3)).await })
        .await
    {
        Outcome::Ok(code, body) => Ok((code, body)),
        other => bail!("{} {path}: {other:?}", r.process.name),
    }
}

/// The value of a Prometheus sample line starting with `prefix` (first match).
pub fn metric(body: &str, prefix: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
