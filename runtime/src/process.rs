//! What every meshlite binary does around its own work, written once:
//!
//! - the command line: `--help`/`--version` exit 0, a bad flag exits 64
//!   ([`EX_USAGE`], sysexits' usage error) with clap's message ([`parse`]);
//! - flags every binary shares, with the same names everywhere ([`args`]);
//! - an invalid configuration exits 64 naming what is wrong; `--check-config`
//!   prints the validated configuration as JSON and exits 0 ([`Main::check`]);
//! - a multi-threaded tokio runtime, telemetry (logs, OTLP traces), the rustls
//!   crypto provider, the effective configuration logged at start ([`Main::run`]);
//! - SIGINT/SIGTERM start a drain ([`drain`]); the process then exits once its
//!   work returns, or after a grace period.

use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;
use std::time::Duration;

use serde::Serialize;

use crate::telemetry::{self, Telemetry};

pub mod args;
pub mod drain;

pub use drain::{DrainTrigger, DrainWatcher};

/// sysexits' EX_USAGE: the command line or configuration is invalid.
pub const EX_USAGE: u8 = 64;

/// How long work may take to return after a drain starts before the process exits
/// anyway (agents and control planes keep their state elsewhere; nothing is lost).
pub const GRACE: Duration = Duration::from_secs(5);

/// Parses the command line. `Err` is the exit code to return: 0 after `--help` or
/// `--version`, [`EX_USAGE`] after an unknown flag or a bad value (clap's message
/// printed either way).
pub fn parse<C: clap::Parser>() -> Result<C, ExitCode> {
    C::try_parse().map_err(|e| {
        let _ = e.print();
        if e.use_stderr() {
            ExitCode::from(EX_USAGE)
        } else {
            ExitCode::SUCCESS
        }
    })
}

/// One binary's start-up, by name (`meshlite-node-agent`).
#[derive(Debug, Clone, Copy)]
pub struct Main {
    pub name: &'static str,
}

impl Main {
    pub const fn new(name: &'static str) -> Self {
        Self { name }
    }

    /// Prints `error` as an invalid configuration and returns [`EX_USAGE`].
    pub fn invalid(&self, error: impl Display) -> ExitCode {
        eprintln!("{}: invalid configuration: {error}", self.name);
        ExitCode::from(EX_USAGE)
    }

    /// Validates with `validate`; with `check_config`, prints the result as JSON.
    /// `Err` is the exit code to return now: [`EX_USAGE`] for an invalid
    /// configuration, 0 after printing it.
    pub fn check<C: Serialize, E: Display>(
        &self,
        check_config: bool,
        validate: impl FnOnce() -> Result<C, E>,
    ) -> Result<C, ExitCode> {
        let config = validate().map_err(|e| self.invalid(e))?;
        if check_config {
            let json = serde_json::to_string_pretty(&config).unwrap_or_default();
            println!("{json}");
            return Err(ExitCode::SUCCESS);
        }
        Ok(config)
    }

    /// Runs `work` on a multi-threaded runtime with telemetry and the rustls
    /// provider set up and `config` logged, until it returns or, after SIGINT or
    /// SIGTERM, until it returns within [`GRACE`]. `work` gets the drain to watch.
    pub fn run<C, F, Fut, E>(&self, json_logs: bool, config: C, work: F) -> ExitCode
    where
        C: Serialize,
        F: FnOnce(C, Telemetry, DrainWatcher) -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: Display,
    {
        let runtime = match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
        {
            Ok(r) => r,
            Err(e) => {
                eprintln!("{}: tokio runtime: {e}", self.name);
                return ExitCode::FAILURE;
            }
        };
        // OTLP export (when OTEL_* asks for it) runs on the runtime.
        let telemetry = {
            let _enter = runtime.enter();
            telemetry::init(self.name, json_logs)
        };
        crate::tls::install_default_provider();
        tracing::info!(
            config = %serde_json::to_string(&config).unwrap_or_default(),
            version = env!("CARGO_PKG_VERSION"),
            "starting {}",
            self.name
        );
        let (trigger, watcher) = drain::new();
        let name = self.name;
        let code = runtime.block_on(async {
            let signal_watcher = watcher.clone();
            let work = work(config, telemetry.clone(), watcher);
            tokio::pin!(work);
            let result = tokio::select! {
                r = &mut work => Some(r),
                () = crate::shutdown_signal() => {
                    trigger.drain();
                    tokio::time::timeout(GRACE, &mut work).await.ok()
                }
            };
            drop(signal_watcher);
            match result {
                Some(Ok(())) => {
                    tracing::info!("shut down");
                    ExitCode::SUCCESS
                }
                Some(Err(e)) => {
                    tracing::error!(error = %e, "{name} failed");
                    ExitCode::FAILURE
                }
                None => {
                    tracing::warn!(grace = ?GRACE, "still draining after the grace period; exiting");
                    ExitCode::SUCCESS
                }
            }
        });
        telemetry.shutdown();
        code
    }
}
