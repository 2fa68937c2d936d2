//! `meshlite-control-plane`: see the crate docs. Parses and validates the
//! configuration (exit 64 when invalid; `--check-config` prints it as JSON), then
//! serves until SIGINT/SIGTERM; or runs `status` or `explain service`.

use std::future::Future;
use std::process::ExitCode;

use meshlite_control_plane::config::{Cli, Command, ExplainWhat};
use meshlite_control_plane::{explain, status};
use meshlite_runtime::process::{self, EX_USAGE, Main};

const MAIN: Main = Main::new("meshlite-control-plane");

// jemalloc, not glibc's malloc: under churn the fan-out allocates and frees
// buffers of every size on two threads, and glibc kept what it freed (RSS +15 %
// over a minute of 100 changes/s at 5,000 agents, flat with jemalloc; 16-19 % less
// CPU as well). Measured in docs/scale.md.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli: Cli = match process::parse() {
        Ok(c) => c,
        Err(code) => return code,
    };
    match cli.command {
        Some(Command::Status { admin, json }) => {
            return client_command("status", async move {
                match status::fetch(&admin).await {
                    Ok(r) if json => {
                        println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
                        ExitCode::SUCCESS
                    }
                    Ok(r) => {
                        print!("{}", status::table(&r));
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("meshlite-control-plane status: {e}");
                        ExitCode::FAILURE
                    }
                }
            });
        }
        Some(Command::Explain {
            what:
                ExplainWhat::Service {
                    service,
                    node,
                    admin,
                    json,
                },
        }) => {
            return client_command("explain", async move {
                match explain::fetch(&admin, &service, node.as_deref()).await {
                    Ok(r) if json => {
                        println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
                        ExitCode::SUCCESS
                    }
                    Ok(r) => {
                        print!("{}", explain::text(&r));
                        ExitCode::SUCCESS
                    }
                    Err(e @ explain::ExplainError::BadName(_)) => {
                        eprintln!("meshlite-control-plane explain: {e}");
                        ExitCode::from(EX_USAGE)
                    }
                    Err(e) => {
                        eprintln!("meshlite-control-plane explain: {e}");
                        ExitCode::FAILURE
                    }
                }
            });
        }
        None => {}
    }
    let config = match MAIN.check(cli.args.check_config, || cli.args.validate()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    MAIN.run(config.log_json, config, |config, telemetry, drain| async move {
        if config.tls.is_none() {
            tracing::warn!("--insecure: agents' streams are PLAINTEXT and unauthenticated; local demos only");
        }
        let (_, task) = meshlite_control_plane::start_with(config, telemetry, drain.wait()).await?;
        task.await?
    })
}

/// Runs a command that talks to a running control plane's admin endpoint.
fn client_command(name: &str, f: impl Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(f),
        Err(e) => {
            eprintln!("meshlite-control-plane {name}: tokio runtime: {e}");
            ExitCode::FAILURE
        }
    }
}
