//! `meshlite-dns-agent`: see the library docs. Parses and validates the
//! configuration (exit 64 when invalid; `--check-config` prints it as JSON), then
//! serves until SIGINT/SIGTERM.

use std::process::ExitCode;

use meshlite_dns_agent::app;
use meshlite_dns_agent::config::{Args, System};
use meshlite_runtime::process::{self, Main};

const MAIN: Main = Main::new("meshlite-dns-agent");

fn main() -> ExitCode {
    let args: Args = match process::parse() {
        Ok(a) => a,
        Err(code) => return code,
    };
    let config = match MAIN.check(args.check_config, || args.validate(&System)) {
        Ok(c) => c,
        Err(code) => return code,
    };
    MAIN.run(config.log_json, config, |config, telemetry, drain| async move {
        if config.subscriber.tls.is_none() {
            tracing::warn!(
                "--insecure: the control-plane stream is PLAINTEXT and unauthenticated; local demos only"
            );
        }
        app::run(config, telemetry, drain.wait()).await
    })
}
