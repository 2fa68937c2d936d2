//! Running the kernel's command-line tools.
//!
//! Every external tool goes through [`Runner::run`]: the real one spawns the
//! program (killed if the future is dropped), the fake records the call and answers
//! from a closure, so the code that builds commands is tested without a kernel.

use std::fmt;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::Error;

/// What a tool did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ToolOutput {
    pub success: bool,
    /// The exit status as the OS describes it (for error messages).
    pub status: String,
    pub stdout: String,
    pub stderr: String,
}

/// One call recorded by [`FakeRunner`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub program: String,
    pub args: Vec<String>,
    pub stdin: Option<String>,
}

type Answer = dyn Fn(&Call) -> ToolOutput + Send + Sync;

/// A fake tool runner: records every call and answers with `answer`.
#[derive(Clone)]
pub struct FakeRunner {
    calls: Arc<Mutex<Vec<Call>>>,
    answer: Arc<Answer>,
}

/// How external tools are run.
#[derive(Debug, Clone, Default)]
pub enum Runner {
    /// Spawn the real programs.
    #[default]
    System,
    /// Record and answer in memory.
    Fake(FakeRunner),
}

// === impl ToolOutput ===

impl ToolOutput {
    /// A successful run printing `stdout`.
    pub fn ok(stdout: &str) -> Self {
        Self {
            success: true,
            status: "exit status: 0".into(),
            stdout: stdout.into(),
            stderr: String::new(),
        }
    }

    /// A failed run (exit status 1) printing `stderr`.
    pub fn failed(stderr: &str) -> Self {
        Self {
            success: false,
            status: "exit status: 1".into(),
            stdout: String::new(),
            stderr: stderr.into(),
        }
    }

    /// `Ok(stdout)` on success, otherwise [`Error::Failed`] naming `command`.
    ///
    /// # Errors
    /// The tool exited unsuccessfully.
    pub fn into_stdout(self, command: &str) -> Result<String, Error> {
        if self.success {
            return Ok(self.stdout);
        }
        Err(Error::Failed {
            command: command.to_string(),
            status: self.status,
            stderr: self.stderr.trim().to_string(),
        })
    }
}

// === impl FakeRunner ===

impl FakeRunner {
    /// A fake whose every call answers `answer(call)`.
    pub fn new(answer: impl Fn(&Call) -> ToolOutput + Send + Sync + 'static) -> Self {
        Self {
            calls: Arc::default(),
            answer: Arc::new(answer),
        }
    }

    /// A fake where every tool succeeds and prints nothing.
    pub fn succeeding() -> Self {
        Self::new(|_| ToolOutput::ok(""))
    }

    /// The calls so far.
    pub fn calls(&self) -> Vec<Call> {
        // The fake holds no invariants a panic could break.
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn run(&self, call: Call) -> ToolOutput {
        let out = (self.answer)(&call);
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(call);
        out
    }
}

impl fmt::Debug for FakeRunner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeRunner")
            .field("calls", &self.calls().len())
            .finish_non_exhaustive()
    }
}

// === impl Runner ===

impl Runner {
    /// Runs `program args...`, with `stdin` on its standard input when given.
    ///
    /// # Errors
    /// [`Error::Spawn`] when the program cannot be started or its pipes fail
    /// (`source.kind()` is `NotFound` when it is not installed). A non-zero exit is
    /// not an error here: it is in the returned [`ToolOutput`].
    pub async fn run(
        &self,
        program: &str,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<ToolOutput, Error> {
        match self {
            Self::Fake(f) => Ok(f.run(Call {
                program: program.to_string(),
                args: args.iter().map(|a| a.to_string()).collect(),
                stdin: stdin.map(String::from),
            })),
            Self::System => spawn(program, args, stdin)
                .await
                .map_err(|source| Error::Spawn {
                    command: program.to_string(),
                    source,
                }),
        }
    }

    /// Runs the tool and returns its stdout.
    ///
    /// # Errors
    /// The tool cannot be started or exits unsuccessfully.
    pub async fn output(
        &self,
        program: &str,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<String, Error> {
        let command = std::iter::once(program)
            .chain(args.iter().copied())
            .collect::<Vec<_>>()
            .join(" ");
        self.run(program, args, stdin).await?.into_stdout(&command)
    }
}

async fn spawn(program: &str, args: &[&str], stdin: Option<&str>) -> std::io::Result<ToolOutput> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let pipe = child.stdin.take();
    // Input is written while the output is read, so neither pipe can fill up and
    // block the other.
    let write = async move {
        if let (Some(input), Some(mut pipe)) = (stdin, pipe) {
            pipe.write_all(input.as_bytes()).await?;
        }
        std::io::Result::Ok(())
    };
    let (written, out) = tokio::join!(write, child.wait_with_output());
    let out = out?;
    match written {
        // The tool exited without reading all its input; its status and stderr say why.
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e),
        _ => {}
    }
    Ok(ToolOutput {
        success: out.status.success(),
        status: out.status.to_string(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fake_records_calls_and_answers() {
        let fake = FakeRunner::new(|c| {
            if c.program == "nft" {
                ToolOutput::ok("table ip x")
            } else {
                ToolOutput::failed("no such tool")
            }
        });
        let r = Runner::Fake(fake.clone());
        let out = r.output("nft", &["list", "tables"], None).await.unwrap();
        assert_eq!(out, "table ip x");
        let err = r.output("ipset", &["save"], Some("x")).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "ipset save failed (exit status: 1): no such tool"
        );
        assert_eq!(fake.calls().len(), 2);
        assert_eq!(fake.calls()[1].stdin.as_deref(), Some("x"));
    }

    #[tokio::test]
    async fn system_runs_a_program_with_stdin() {
        let out = Runner::System
            .output("cat", &[], Some("hello"))
            .await
            .expect("cat is part of every base system");
        assert_eq!(out, "hello");
        let err = Runner::System
            .run("meshlite-no-such-tool", &[], None)
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::Spawn { ref source, .. } if source.kind() == std::io::ErrorKind::NotFound)
        );
    }
}
