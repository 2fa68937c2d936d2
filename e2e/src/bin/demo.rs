//! `cargo run --release --bin demo`: the seed demo (see `meshlite_e2e::demo`).
//! Needs root. Ctrl-C tears everything down.

use std::process::ExitCode;

use clap::Parser;
use meshlite_e2e::demo::{self, Options};

#[tokio::main]
async fn main() -> ExitCode {
    let opts = Options::parse();
    // The processes log to files; here only warnings of our own.
    if std::env::var_os("RUST_LOG").is_none() {
        meshlite_runtime::telemetry::init_logging(false);
    }
    meshlite_runtime::tls::install_default_provider();
    match demo::cleanup_stale() {
        Ok(0) => {}
        Ok(n) => eprintln!("removed {n} namespaces left by an interrupted demo"),
        Err(e) => eprintln!("could not look for leftovers of an earlier demo: {e}"),
    }
    tokio::select! {
        r = demo::run(opts) => match r {
            Ok(0) => ExitCode::SUCCESS,
            Ok(_) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("demo failed: {e:#}");
                ExitCode::FAILURE
            }
        },
        () = meshlite_runtime::shutdown_signal() => {
            // Dropping the demo's future kills its processes and deletes its namespaces.
            eprintln!("\ninterrupted: tore everything down");
            ExitCode::from(130)
        }
    }
}
