//! "Which agents have applied change X?": the `/agents` admin endpoint and the
//! `meshlite-control-plane status` command that prints it as a table.

use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
    #[error("{addr}: {source}")]
    Io {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr}: unexpected response: {reason}")]
    Response { addr: String, reason: String },
}

/// Fetches `/agents` from an admin address (plain HTTP/1.0, no client library needed).
///
/// # Errors
/// Connection failures or a response that is not the expected JSON.
pub async fn fetch(addr: &str) -> Result<AgentsReport, StatusError> {
    let io = |source| StatusError::Io {
        addr: addr.to_string(),
        source,
    };
    let mut s = tokio::net::TcpStream::connect(addr).await.map_err(io)?;
    s.write_all(format!("GET /agents HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .map_err(io)?;
    let mut body = Vec::new();
    s.read_to_end(&mut body).await.map_err(io)?;
    let text = String::from_utf8_lossy(&body);
    let bad = |reason: String| StatusError::Response {
        addr: addr.to_string(),
        reason,
    };
    let (head, json) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no HTTP header".into()))?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return Err(bad(head.lines().next().unwrap_or("").to_string()));
    }
    serde_json::from_str(json).map_err(|e| bad(e.to_string()))
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
