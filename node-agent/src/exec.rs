//! Running the kernel's command-line tools (`iptables-restore`, `ipset restore`)
//! with their input on stdin.

use std::process::{Output, Stdio};

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// Runs `program args...` with `input` on stdin; returns its exit status and stderr
/// (stdout is discarded). The child is killed if the future is dropped.
///
/// # Errors
/// The program cannot be started, or its stdin or output cannot be handled.
pub async fn with_stdin(program: &str, args: &[&str], input: &str) -> std::io::Result<Output> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes()).await?;
    }
    child.wait_with_output().await
}
