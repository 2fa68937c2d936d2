//! `meshlite-node-agent`: see the crate docs. Parses the command line, then either
//! renders manifests (`render`), removes what the agent programmed (`cleanup`)
//! or runs the agent.

use std::process::ExitCode;

use meshlite_node_agent::backends::{self, RenderError};
use meshlite_node_agent::config::{Cli, Command};
use meshlite_node_agent::iptables::chains;
use meshlite_node_agent::{app, cleanup};
use meshlite_runtime::process::{self, Main};

const MAIN: Main = Main::new("meshlite-node-agent");
const EXIT_CONFIG: u8 = process::EX_USAGE;

fn main() -> ExitCode {
    let cli: Cli = match process::parse() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    match cli.command {
        Some(Command::Render(args)) => render(*args),
        Some(Command::Cleanup(args)) => cleanup(&args),
        Some(Command::Explain(args)) => explain(&args),
        None => run(cli.run),
    }
}

fn explain(args: &meshlite_node_agent::explain::cli::ExplainArgs) -> ExitCode {
    use meshlite_node_agent::explain::cli::ExplainError;
    let (rules, host) = match args.load() {
        Ok(v) => v,
        Err(e @ ExplainError::Input(_)) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let packet = args.packet();
    let x = rules.explain(&packet, &host);
    let text = if args.json {
        format!("{}\n", serde_json::to_string_pretty(&x).unwrap_or_default())
    } else {
        x.human(&packet)
    };
    // A closed stdout (`| head`) is not an error worth a panic.
    let _ = std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes());
    ExitCode::SUCCESS
}

fn cleanup(args: &meshlite_node_agent::config::CleanupArgs) -> ExitCode {
    if let Err(reason) = chains::validate_prefix(&args.chain_prefix) {
        eprintln!(
            "error: invalid --chain-prefix {:?}: {reason}",
            args.chain_prefix
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = rt.block_on(cleanup::run(
        &args.chain_prefix,
        &args.ipvs_interface,
        &args.ipvs_exclude_cidrs,
    ));
    print!("{report}");
    if report.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn render(args: meshlite_node_agent::config::RenderArgs) -> ExitCode {
    match backends::render(&args) {
        Ok(p) => {
            for w in &p.warnings {
                eprintln!("warning: {w}");
            }
            // A closed stdout (`| head`) is not an error worth a panic.
            let _ = std::io::Write::write_all(&mut std::io::stdout(), p.text.as_bytes());
            ExitCode::SUCCESS
        }
        Err(e @ RenderError::Config(_)) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: meshlite_node_agent::config::RunArgs) -> ExitCode {
    let check = args.check_config;
    let cfg = match MAIN.check(check, || args.validate()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    MAIN.run(cfg.log_json, cfg, |cfg, telemetry, drain| {
        app::run(cfg, telemetry, drain.wait())
    })
}
