//! Launching the real binaries: locate them, start them with their stderr in a
//! log file, learn their addresses from `--addresses-file`, stop them by PID.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The directory holding the built binaries: `$MESHLITE_BIN_DIR`, else the cargo
/// target directory this test or tool was built into.
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("MESHLITE_BIN_DIR") {
        return Ok(PathBuf::from(d));
    }
    let exe = std::env::current_exe().context("current_exe")?;
    let mut dir = exe.parent().context("exe has a directory")?.to_path_buf();
    // Test binaries live in target/<profile>/deps.
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    Ok(dir)
}

/// The path of a meshlite binary; fails with a clear message if it is not built.
pub fn binary(name: &str) -> Result<PathBuf> {
    let p = bin_dir()?.join(name);
    if !p.is_file() {
        bail!(
            "{} not found: build the binaries first (`cargo build --workspace --bins`, or set MESHLITE_BIN_DIR)",
            p.display()
        );
    }
    Ok(p)
}

/// A child process killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct Process {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
    pub addresses_file: PathBuf,
}

impl Process {
    /// Starts `binary` with `args`, plus `--addresses-file` in `dir`; stderr and stdout
    /// go to `<dir>/<name>.log`. `wrap` runs it through a prefix command
    /// (e.g. `ip netns exec <ns>`).
    pub fn start(
        dir: &Path,
        name: &str,
        binary: &Path,
        args: &[String],
        wrap: &[String],
    ) -> Result<Self> {
        Self::start_env(dir, name, binary, args, wrap, &[])
    }

    /// [`Process::start`] with extra environment variables.
    pub fn start_env(
        dir: &Path,
        name: &str,
        binary: &Path,
        args: &[String],
        wrap: &[String],
        env: &[(String, String)],
    ) -> Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let addresses_file = dir.join(format!("{name}.addresses.json"));
        let _ = std::fs::remove_file(&addresses_file);
        let out =
            std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = if let Some((first, rest)) = wrap.split_first() {
            let mut c = Command::new(first);
            c.args(rest).arg(binary);
            c
        } else {
            Command::new(binary)
        };
        cmd.args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .arg("--addresses-file")
            .arg(&addresses_file)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = cmd
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?;
        Ok(Self {
            name: name.to_string(),
            child: Some(child),
            log,
            addresses_file,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits until the process has written its addresses (it is listening).
    pub fn addresses(&mut self, timeout: Duration) -> Result<HashMap<String, SocketAddr>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(text) = std::fs::read_to_string(&self.addresses_file)
                && let Ok(map) = serde_json::from_str::<HashMap<String, String>>(&text)
            {
                return map
                    .into_iter()
                    .map(|(k, v)| Ok((k, v.parse().context("address")?)))
                    .collect();
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                bail!(
                    "{} exited ({status}) before listening:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not start within {timeout:?}:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last lines of the log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait up to `timeout`, then SIGKILL.
    pub fn stop(&mut self, timeout: Duration) {
        if let Some(c) = self.child.as_mut() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let deadline = Instant::now() + timeout;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    self.child = None;
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `GET http://addr/path` over plain HTTP/1.0; returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("HTTP status")?;
    Ok((code, body.to_string()))
}
