//! Where cluster state comes from: the Kubernetes API (`kube`) or a directory of
//! manifests (`file`). Both normalize at the edge and write into the [`Store`]; both
//! bracket their initial load so nothing is served before it is complete.
//!
//! [`Store`]: crate::store::Store

pub mod file;
pub mod kube;

use std::path::PathBuf;
use std::str::FromStr;

/// `--source`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    /// In-cluster config or kubeconfig.
    Kube,
    /// A directory of manifests, re-read on change.
    File(PathBuf),
}

/// An unparseable `--source`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid --source {0:?}: expected `kube` or `file:<dir>`")]
pub struct InvalidSource(pub String);

impl FromStr for SourceSpec {
    type Err = InvalidSource;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "kube" => Ok(SourceSpec::Kube),
            _ => match s.strip_prefix("file:") {
                Some(dir) if !dir.is_empty() => Ok(SourceSpec::File(PathBuf::from(dir))),
                _ => Err(InvalidSource(s.to_string())),
            },
        }
    }
}

impl std::fmt::Display for SourceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SourceSpec::Kube => f.write_str("kube"),
            SourceSpec::File(d) => write!(f, "file:{}", d.display()),
        }
    }
}

/// Opens the `ingest` span of one observed change and returns it with the change's
/// cause (trigger time, observation time, and the span's traceparent, which agents
/// link their `apply` spans to).
pub(crate) fn ingest(
    kind: crate::store::Kind,
    key: &str,
    op: &'static str,
    trigger: Option<std::time::SystemTime>,
) -> (tracing::Span, crate::store::Cause) {
    let cause = crate::store::Cause::observed_now(trigger);
    let span = tracing::info_span!(
        "ingest",
        kind = kind.as_str(),
        key,
        op,
        trigger_unix_nanos = meshlite_runtime::subscriber::to_nanos(cause.trigger),
        trigger_source = if trigger.is_some() { "api" } else { "observed" },
    );
    let tp = meshlite_runtime::telemetry::traceparent(&span);
    (span, cause.with_traceparent(tp))
}
