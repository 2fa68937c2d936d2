//! `scale`: runs one large-cluster scenario against the real control plane and
//! prints its figures as one JSON object, the last line on stdout. Exits 1 if any
//! agent failed to converge, 2 if the harness could not run, 64 on bad flags.
//!
//! `scale --plot-out docs/scale-latency.svg --plot-from a.json,b.json` draws the
//! latency-vs-agents plot from earlier reports instead (`--plot-x churn-rate`: p99
//! against the churn rate, from the reports' churn phases).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use meshlite_e2e::scale::{self, Options, plot};

/// meshlite scale harness (see e2e/README.md and docs/scale.md).
#[derive(Debug, Parser)]
#[command(name = "scale")]
struct Cli {
    #[command(flatten)]
    options: Options,
    /// Draw the latency-vs-agents SVG here from --plot-from reports, and exit.
    #[arg(long, requires = "plot_from")]
    plot_out: Option<PathBuf>,
    /// Report files (their last JSON line is read), comma separated.
    #[arg(long, value_delimiter = ',')]
    plot_from: Vec<PathBuf>,
    /// Subtitle of the plot.
    #[arg(long, default_value = "")]
    plot_title: String,
    /// The plot's x axis: `agents` (one single-change phase per report) or
    /// `churn-rate` (every churn phase of the reports).
    #[arg(long, default_value = "agents", value_parser = ["agents", "churn-rate"])]
    plot_x: String,
}

// The harness's 5,000 simulated agents allocate and free small buffers for every
// update; glibc's malloc took a quarter of their CPU (`perf`, 100 changes/s). The
// control plane's allocator, for one in the workspace.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(64);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    if let Some(out) = cli.plot_out {
        let axis = if cli.plot_x == "churn-rate" {
            plot::Axis::ChurnRate
        } else {
            plot::Axis::Agents
        };
        return match draw(&out, &cli.plot_from, &cli.plot_title, axis) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("scale: plot: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    match scale::run(&cli.options).await {
        Ok(report) => {
            let converged = report.converged;
            if !converged {
                eprintln!("scale: NOT CONVERGED:");
                for f in &report.failures {
                    eprintln!("  - {f}");
                }
            }
            println!("{}", serde_json::to_string(&report).unwrap_or_default());
            if converged {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("scale: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn draw(out: &PathBuf, from: &[PathBuf], title: &str, axis: plot::Axis) -> anyhow::Result<()> {
    let mut reports = Vec::new();
    for f in from {
        let text = std::fs::read_to_string(f)?;
        let last = text
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'))
            .ok_or_else(|| anyhow::anyhow!("{}: no JSON report line", f.display()))?;
        reports.push(serde_json::from_str(last)?);
    }
    let points = match axis {
        plot::Axis::Agents => plot::points(&reports),
        plot::Axis::ChurnRate => plot::churn_points(&reports),
    };
    anyhow::ensure!(!points.is_empty(), "no usable reports");
    std::fs::write(out, plot::svg(&points, axis, title))?;
    eprintln!("scale: wrote {} ({} points)", out.display(), points.len());
    Ok(())
}
