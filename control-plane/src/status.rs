//! "Which agents have applied change X?": the `/agents` admin endpoint and the
//! `meshlite-control-plane status` command that prints it as a table.

use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use serde::{Deserialize, Serialize};

use crate::server::Agents;
use crate::server::agents::AgentRow;
use crate::store::Store;

/// The `/agents` body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentsReport {
    pub epoch: u64,
    /// The newest store version.
    pub version: u64,
    pub agents: Vec<AgentRow>,
}

/// `/agents`: every connected agent as JSON.
pub fn router(agents: Agents, store: Arc<Store>) -> Router {
    Router::new().route(
        "/agents",
        get(move || {
            let (agents, store) = (agents.clone(), store.clone());
            async move {
                let version = store.version();
                axum::Json(AgentsReport {
                    epoch: store.epoch(),
                    version,
                    agents: agents.rows(version),
                })
            }
        }),
    )
}

/// Failures of the status command.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Admin(#[from] meshlite_runtime::admin::client::ClientError),
    #[error("{addr}/agents: not an agents report: {source}")]
    Json {
        addr: String,
        #[source]
        source: serde_json::Error,
    },
}

/// How long `status` waits for the whole answer.
pub const STATUS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Fetches `/agents` from an admin address.
///
/// # Errors
/// Connection failures, a timeout, or a response that is not the expected JSON.
pub async fn fetch(addr: &str) -> Result<AgentsReport, StatusError> {
    let body = meshlite_runtime::admin::client::get(addr, "/agents", STATUS_TIMEOUT).await?;
    serde_json::from_slice(&body).map_err(|source| StatusError::Json {
        addr: addr.to_string(),
        source,
    })
}

/// Renders the report as an aligned table.
pub fn table(r: &AgentsReport) -> String {
    let mut out = format!(
        "epoch {:x}  newest version {}  agents {}\n",
        r.epoch,
        r.version,
        r.agents.len()
    );
    let rows: Vec<[String; 6]> = r
        .agents
        .iter()
        .map(|a| {
            [
                a.node_name.clone(),
                a.role.clone(),
                a.version.to_string(),
                a.lag.to_string(),
                format!("{:.1}ms", a.last_apply_micros as f64 / 1000.0),
                format!("{}/{}", a.acks, a.nacks),
            ]
        })
        .collect();
    let header = ["NODE", "ROLE", "VERSION", "LAG", "LAST-APPLY", "ACKS/NACKS"].map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}
