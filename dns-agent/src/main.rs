//! `meshlite-dns-agent`: see the library docs. Parses the configuration (exit 64 when
//! invalid), optionally prints it (`--check-config`), and runs until SIGINT/SIGTERM.

use std::process::ExitCode;

use clap::Parser;
use meshlite_dns_agent::agent;
use meshlite_dns_agent::config::{Args, System};

/// BSD sysexits EX_CONFIG-style code for invalid configuration (linkerd uses 64).
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                e.exit();
            }
            let _ = e.print();
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let config = match args.validate(&System) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("meshlite-dns-agent: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if args.check_config {
        println!("{config:#?}");
        return ExitCode::SUCCESS;
    }
    meshlite_runtime::tls::install_default_provider();

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("meshlite-dns-agent: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // OTLP export (when OTEL_* asks for it) runs on the runtime.
    let telemetry = {
        let _enter = runtime.enter();
        meshlite_runtime::telemetry::init("meshlite-dns-agent", config.log_json)
    };
    if config.subscriber.tls.is_none() {
        tracing::warn!(
            "--insecure: the control-plane stream is PLAINTEXT and unauthenticated; local demos only"
        );
    }
    tracing::info!(?config, "effective configuration");
    let code = match runtime.block_on(agent::run(
        config,
        telemetry.clone(),
        meshlite_runtime::shutdown_signal(),
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "meshlite-dns-agent failed");
            ExitCode::FAILURE
        }
    };
    telemetry.shutdown();
    code
}
