//! Network namespaces for real-packet tests and the demo.
//!
//! - [`Netns`]: a named namespace (`ip netns add <prefix><pid>-<n>-<role>`), deleted
//!   on drop.
//! - [`NsRuntime`]: a thread that entered a namespace (`setns`, via rustix) and runs
//!   a current-thread tokio runtime. Futures run there create their sockets, and
//!   spawn their processes (iptables-restore, conntrack), inside that namespace;
//!   the test awaits them from its own runtime. No helper binaries, no `socat`.
//! - [`serve_identity`] / [`get`]: a tiny HTTP server answering `<name> <peer ip>`
//!   and a client that reports how a request ended (served, refused, timed out).

use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::oneshot;

static COUNTER: AtomicUsize = AtomicUsize::new(0);
static PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Sets the namespace name prefix (once, before the first namespace; default `mle`).
pub fn set_prefix(p: &str) {
    let _ = PREFIX.set(p.to_string());
}

fn prefix() -> &'static str {
    PREFIX.get_or_init(|| "mle".to_string())
}

/// Checks for root and the tools named; the error says what is missing.
pub fn require_root_and_tools(tools: &[&str]) -> Result<()> {
    let uid = rustix::process::geteuid();
    if !uid.is_root() {
        bail!(
            "this needs root (network namespaces, iptables); run it as root (uid is {})",
            uid.as_raw()
        );
    }
    for tool in tools {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !found {
            bail!("`{tool}` is not on PATH (apt-get install iproute2 iptables conntrack dnsutils)");
        }
    }
    Ok(())
}

/// Runs a command; fails with its stderr.
pub fn sh(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("run {args:?}"))?;
    if !out.status.success() {
        bail!(
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(role: &str) -> Result<Self> {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("{}{}-{n}-{role}", prefix(), std::process::id());
        sh(&["ip", "netns", "add", &name])?;
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let mut v = vec!["ip", "netns", "exec", &self.name];
        v.extend_from_slice(args);
        sh(&v)
    }

    /// A runtime whose futures run inside this namespace.
    pub fn runtime(&self) -> Result<NsRuntime> {
        NsRuntime::enter(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A tokio runtime on a thread inside a namespace.
#[derive(Debug)]
pub struct NsRuntime {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NsRuntime {
    fn enter(ns: &str) -> Result<Self> {
        let path = format!("/var/run/netns/{ns}");
        let (tx, rx) = std::sync::mpsc::channel::<Result<Handle>>();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("ns-{ns}"))
            .spawn(move || {
                let setup = (|| -> Result<tokio::runtime::Runtime> {
                    let f = File::open(&path).with_context(|| format!("open {path}"))?;
                    rustix::thread::move_into_link_name_space(
                        f.as_fd(),
                        Some(rustix::thread::LinkNameSpaceType::Network),
                    )
                    .with_context(|| format!("setns {path}"))?;
                    Ok(tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?)
                })();
                match setup {
                    Ok(rt) => {
                        let _ = tx.send(Ok(rt.handle().clone()));
                        rt.block_on(async {
                            let _ = stopped.await;
                        });
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })?;
        let handle = rx.recv().map_err(|_| anyhow!("namespace thread died"))??;
        Ok(Self {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Runs a future inside the namespace and waits for it.
    pub async fn run<F, T>(&self, f: F) -> T
    where
        F: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        match self.handle.spawn(f).await {
            Ok(v) => v,
            // A panic inside the namespace is the caller's panic.
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    /// Spawns a future inside the namespace.
    pub fn spawn<F>(&self, f: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(f)
    }
}

impl Drop for NsRuntime {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connects `a` and `b` with a veth pair and addresses them.
pub fn veth(
    a: &Netns,
    a_if: &str,
    a_addr: &str,
    b: &Netns,
    b_if: &str,
    b_addr: &str,
) -> Result<()> {
    a.exec(&[
        "ip", "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name,
    ])?;
    a.exec(&["ip", "addr", "add", a_addr, "dev", a_if])?;
    b.exec(&["ip", "addr", "add", b_addr, "dev", b_if])?;
    a.exec(&["ip", "link", "set", a_if, "up"])?;
    b.exec(&["ip", "link", "set", b_if, "up"])?;
    Ok(())
}

/// Starts an HTTP server answering `<name> <peer ip>` on `port` in `rt`'s namespace.
pub async fn serve_identity(rt: &NsRuntime, name: &str, port: u16) -> Result<()> {
    let listener = rt
        .run(async move { TcpListener::bind(("0.0.0.0", port)).await })
        .await?;
    let name = name.to_string();
    rt.spawn(async move {
        loop {
            // A failed accept is the failure of one connection (Linux reports
            // some network errors of a queued connection here): keep serving.
            let (mut s, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("serve_identity: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let name = name.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 2048];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let body = format!("{name} {}\n", peer.ip());
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(())
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Status code and body.
    Ok(u16, String),
    Refused,
    Timeout,
    Other(String),
}

impl Outcome {
    /// The serving pod's name and the source address it saw.
    pub fn served(&self) -> Option<(String, String)> {
        match self {
            Outcome::Ok(200, body) => {
                let mut it = body.split_whitespace();
                Some((it.next()?.to_string(), it.next()?.to_string()))
            }
            _ => None,
        }
    }
}

/// One HTTP/1.1 GET (from the namespace the future runs in).
pub async fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Outcome {
    let path = path.to_string();
    let attempt = async move {
        let mut s = match TcpStream::connect(addr).await {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Outcome::Refused,
            Err(e) => return Outcome::Other(e.to_string()),
        };
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        if let Err(e) = s.write_all(req.as_bytes()).await {
            return Outcome::Other(e.to_string());
        }
        let mut out = Vec::new();
        if let Err(e) = s.read_to_end(&mut out).await {
            return Outcome::Other(e.to_string());
        }
        let text = String::from_utf8_lossy(&out);
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        Outcome::Ok(status, body)
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or(Outcome::Timeout)
}
