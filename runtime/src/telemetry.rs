//! Logging setup: `tracing` with an env filter (`RUST_LOG`, default `info`), human
//! readable or JSON.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `json` selects JSON lines. Safe to call twice
/// (the second call is a no-op), so tests can call it freely.
pub fn init_logging(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
