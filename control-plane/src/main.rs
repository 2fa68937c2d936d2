use std::process::ExitCode;

use clap::Parser;
use meshlite_control_plane::config::ExplainWhat;
use meshlite_control_plane::config::{Cli, Command, LogFormat};
use meshlite_control_plane::{explain, start_with, status};
use meshlite_runtime::telemetry;
use tracing::{error, info};

/// sysexits EX_USAGE: the configuration is invalid.
const EX_USAGE: u8 = 64;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if e.use_stderr() => {
            // Unknown flags and bad values are invalid configuration: EX_USAGE.
            let _ = e.print();
            return ExitCode::from(EX_USAGE);
        }
        Err(e) => {
            // --help, --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    if let Some(Command::Explain {
        what:
            ExplainWhat::Service {
                service,
                node,
                admin,
                json,
            },
    }) = &cli.command
    {
        return match explain::fetch(admin, service, node.as_deref()).await {
            Ok(r) if *json => {
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
        };
    }
    if let Some(Command::Status { admin, json }) = cli.command {
        return match status::fetch(&admin).await {
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
        };
    }
    let config = cli.config;
    let telemetry = telemetry::init(
        "meshlite-control-plane",
        config.log_format == LogFormat::Json,
    );
    meshlite_runtime::tls::install_default_provider();
    if let Err(e) = config.validate() {
        error!(error = %e, "invalid configuration");
        return ExitCode::from(EX_USAGE);
    }
    if config.check_config {
        println!("{config:#?}");
        return ExitCode::SUCCESS;
    }
    info!(
        ?config,
        version = env!("CARGO_PKG_VERSION"),
        "starting meshlite-control-plane"
    );
    // Agents hold their streams open forever; after a signal, close what closes in a
    // grace period and then exit (agents keep their rules and reconnect elsewhere).
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        meshlite_runtime::shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let grace = stopped(stop_rx.clone());
    let result = start_with(config, telemetry.clone(), stopped(stop_rx)).await;
    let code = match result {
        Ok((_, task)) => match tokio::select! {
            r = task => r,
            () = async { grace.await; tokio::time::sleep(std::time::Duration::from_secs(5)).await } => Ok(Ok(())),
        } {
            Ok(Ok(())) => {
                info!("shut down");
                ExitCode::SUCCESS
            }
            Ok(Err(e)) => {
                error!(error = %e, "server failed");
                ExitCode::FAILURE
            }
            Err(e) => {
                error!(error = %e, "server task failed");
                ExitCode::FAILURE
            }
        },
        Err(meshlite_control_plane::Error::Config(e)) => {
            error!(error = %e, "invalid configuration");
            ExitCode::from(EX_USAGE)
        }
        Err(e) => {
            error!(error = %e, "cannot start");
            ExitCode::FAILURE
        }
    };
    telemetry.shutdown();
    code
}
