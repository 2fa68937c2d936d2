//! `meshlite-control-plane`: see the crate docs. Parses and validates the
//! configuration (exit 64 when invalid; `--check-config` prints it as JSON), then
//! serves until SIGINT/SIGTERM, or runs `status`.

use std::process::ExitCode;

use meshlite_control_plane::config::{Cli, Command};
use meshlite_control_plane::status;
use meshlite_runtime::process::{self, Main};

const MAIN: Main = Main::new("meshlite-control-plane");

fn main() -> ExitCode {
    let cli: Cli = match process::parse() {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Some(Command::Status { admin, json }) = cli.command {
        return status_command(&admin, json);
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

fn status_command(admin: &str, json: bool) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshlite-control-plane status: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(status::fetch(admin)) {
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
}
