//! The control plane's configuration: flags, each also read from `MESHLITE_<FLAG>`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use meshlite_runtime::process::args::{LogArgs, ServerTlsArgs, TlsArgsError};
use meshlite_runtime::tls::ServerTls;
use serde::Serialize;

use crate::source::SourceSpec;

/// meshlite control plane: watches the Kubernetes API once and streams versioned,
/// incremental snapshots to node and DNS agents over gRPC with mutual TLS.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "meshlite-control-plane",
    version,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub args: Args,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Lists connected agents: node, role, version held, lag, last apply duration.
    Status {
        /// The control plane's admin address.
        #[arg(long, env = "MESHLITE_ADMIN_ADDRESS", default_value = "127.0.0.1:9090")]
        admin: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Explains a service: per node, the endpoints its agent programs for each
    /// port, the version it ACKed against the version that last changed the
    /// service, and for a node that is behind what it still sends traffic to.
    Explain {
        #[command(subcommand)]
        what: ExplainWhat,
    },
}

/// What `explain` explains.
#[derive(Debug, Clone, Subcommand)]
pub enum ExplainWhat {
    /// A service, as NS/NAME.
    Service {
        service: String,
        /// Only this node.
        #[arg(long)]
        node: Option<String>,
        /// The control plane's admin address.
        #[arg(long, env = "MESHLITE_ADMIN_ADDRESS", default_value = "127.0.0.1:9090")]
        admin: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// The command line of the server (every flag also reads `MESHLITE_<FLAG>`).
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Where cluster state comes from: `kube` (in-cluster or kubeconfig) or `file:<dir>`.
    #[arg(long, env = "MESHLITE_SOURCE", default_value = "kube")]
    pub source: SourceSpec,
    /// Kubeconfig for `--source kube` (default: in-cluster, then $KUBECONFIG, then ~/.kube/config).
    #[arg(long, env = "MESHLITE_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// gRPC listen address for agents (`:port` = all interfaces; port 0 picks one).
    #[arg(long, env = "MESHLITE_LISTEN", default_value = "0.0.0.0:7443")]
    pub listen: String,
    /// HTTP address for /metrics, /healthz, /readyz and /agents.
    #[arg(long, env = "MESHLITE_ADMIN_LISTEN", default_value = "127.0.0.1:9090")]
    pub admin_listen: String,
    /// Wait this long after a change for more before publishing (coalescing).
    #[arg(long, env = "MESHLITE_DEBOUNCE", default_value = "10ms", value_parser = humantime::parse_duration)]
    pub debounce: Duration,
    /// How long removals are remembered for delta resume.
    #[arg(long, env = "MESHLITE_TOMBSTONE_RETENTION", default_value = "5m", value_parser = humantime::parse_duration)]
    pub tombstone_retention: Duration,
    /// Proxy only Services (and EndpointSlices) labelled
    /// `service.kubernetes.io/service-proxy-name=<this>`, so meshlite can run beside
    /// another proxy. Unset (the default), meshlite proxies what kube-proxy would:
    /// only objects without the label. DNS agents serve every Service either way.
    #[arg(long, env = "MESHLITE_SERVICE_PROXY_NAME")]
    pub service_proxy_name: Option<String>,
    /// Poll interval of `--source file:`.
    #[arg(long, env = "MESHLITE_FILE_POLL_INTERVAL", default_value = "200ms", value_parser = humantime::parse_duration)]
    pub file_poll_interval: Duration,
    /// Largest update chunk sent (keep under agents' 4 MiB receive limit). Every
    /// stream keeps an encode buffer as large as the largest chunk it sent, so this
    /// times the number of agents is resident memory: 16 KiB costs ~40 KiB less per
    /// agent than 64 KiB (for ~20 % more CPU per full snapshot), and 1 MiB ~1.5 MiB
    /// per agent.
    #[arg(long, env = "MESHLITE_CHUNK_BYTES", default_value_t = 16 * 1024)]
    pub chunk_bytes: usize,
    /// Largest message accepted from an agent.
    #[arg(long, env = "MESHLITE_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_message_bytes: usize,
    /// Most concurrent agent streams per connection (HTTP/2 setting).
    #[arg(long, env = "MESHLITE_MAX_CONCURRENT_STREAMS", default_value_t = 16)]
    pub max_concurrent_streams: u32,
    /// Drop an agent whose connection accepts no data for this long.
    #[arg(long, env = "MESHLITE_SEND_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub send_timeout: Duration,
    /// How a node agent proves which node it is: `certificate` (its certificate has
    /// SAN `<node>.nodes.meshlite`), `token` (a `node-agent` certificate plus its
    /// ServiceAccount token, verified with TokenReview: the token's bound node must
    /// match), or `shared-certificate` (a `node-agent` certificate may be any node).
    #[arg(
        long,
        env = "MESHLITE_NODE_IDENTITY",
        value_enum,
        default_value = "certificate"
    )]
    pub node_identity: crate::server::identity::NodeIdentity,
    /// The node agent's ServiceAccount, for `--node-identity token`.
    #[arg(
        long,
        env = "MESHLITE_NODE_AGENT_SERVICE_ACCOUNT",
        default_value = "system:serviceaccount:kube-system:meshlite-node-agent"
    )]
    pub node_agent_service_account: String,
    /// Most agent streams at once.
    #[arg(long, env = "MESHLITE_MAX_STREAMS", default_value_t = 20_000)]
    pub max_streams: usize,
    /// New agent streams admitted per second (a token bucket against reconnect storms).
    #[arg(long, env = "MESHLITE_STREAM_RATE", default_value_t = 1_000.0)]
    pub stream_rate: f64,
    /// Burst of new streams admitted at once.
    #[arg(long, env = "MESHLITE_STREAM_BURST", default_value_t = 5_000.0)]
    pub stream_burst: f64,
    /// Most full snapshots being sent (unacknowledged) at once; bounds memory when a
    /// fleet syncs together.
    #[arg(long, env = "MESHLITE_MAX_FULL_SYNCS", default_value_t = 64)]
    pub max_full_syncs: usize,
    /// Deltas per second the control plane aims to send over all agents while
    /// changes keep coming (adaptive coalescing): an agent gets at most one delta
    /// per (connected agents / this) seconds, carrying every change since its last.
    /// An agent that had no update for that long gets a change at once. 0: no pacing.
    /// The default is what one core sustains with room to spare (measured: about
    /// 11,000 updates/s per core at 5,000 agents); raise it with more cores.
    #[arg(long, env = "MESHLITE_UPDATE_RATE", default_value_t = 8_000.0)]
    pub update_rate: f64,
    /// Write the bound addresses as JSON here once listening.
    #[arg(long, env = "MESHLITE_ADDRESSES_FILE")]
    pub addresses_file: Option<PathBuf>,
    #[command(flatten)]
    pub tls: ServerTlsArgs,
    #[command(flatten)]
    pub log: LogArgs,
    /// Validate the configuration, print it as JSON and exit.
    #[arg(long, env = "MESHLITE_CHECK_CONFIG")]
    pub check_config: bool,
}

/// The validated configuration of the server.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// Where cluster state comes from: `kube` (in-cluster or kubeconfig) or `file:<dir>`.
    #[serde(serialize_with = "meshlite_runtime::process::args::serialize_display")]
    pub source: SourceSpec,
    /// Kubeconfig for `--source kube` (default: in-cluster, then $KUBECONFIG, then ~/.kube/config).
    pub kubeconfig: Option<PathBuf>,
    /// gRPC listen address for agents (`:port` = all interfaces; port 0 picks one).
    pub listen: String,
    /// HTTP address for /metrics, /healthz, /readyz and /agents.
    pub admin_listen: String,
    /// Wait this long after a change for more before publishing (coalescing).
    #[serde(serialize_with = "meshlite_runtime::process::args::serialize_duration")]
    pub debounce: Duration,
    /// How long removals are remembered for delta resume.
    #[serde(serialize_with = "meshlite_runtime::process::args::serialize_duration")]
    pub tombstone_retention: Duration,
    /// Proxy only Services (and EndpointSlices) labelled
    /// `service.kubernetes.io/service-proxy-name=<this>`, so meshlite can run beside
    /// another proxy. Unset (the default), meshlite proxies what kube-proxy would:
    /// only objects without the label. DNS agents serve every Service either way.
    pub service_proxy_name: Option<String>,
    /// Poll interval of `--source file:`.
    #[serde(serialize_with = "meshlite_runtime::process::args::serialize_duration")]
    pub file_poll_interval: Duration,
    /// Largest update chunk sent (keep under agents' 4 MiB receive limit). Every
    /// stream keeps an encode buffer as large as the largest chunk it sent (about
    /// 1.5x), so this times the number of agents is resident memory.
    pub chunk_bytes: usize,
    /// Largest message accepted from an agent.
    pub max_message_bytes: usize,
    /// Most concurrent agent streams per connection (HTTP/2 setting).
    pub max_concurrent_streams: u32,
    /// Drop an agent whose connection accepts no data for this long.
    #[serde(serialize_with = "meshlite_runtime::process::args::serialize_duration")]
    pub send_timeout: Duration,
    /// How a node agent proves which node it is: `certificate` (its certificate has
    /// SAN `<node>.nodes.meshlite`), `token` (a `node-agent` certificate plus its
    /// ServiceAccount token, verified with TokenReview: the token's bound node must
    /// match), or `shared-certificate` (a `node-agent` certificate may be any node).
    pub node_identity: crate::server::identity::NodeIdentity,
    /// The node agent's ServiceAccount, for `--node-identity token`.
    pub node_agent_service_account: String,
    /// Most agent streams at once.
    pub max_streams: usize,
    /// New agent streams admitted per second (a token bucket against reconnect storms).
    pub stream_rate: f64,
    /// Burst of new streams admitted at once.
    pub stream_burst: f64,
    /// Most full snapshots being sent (unacknowledged) at once; bounds memory when a
    /// fleet syncs together.
    pub max_full_syncs: usize,
    /// Deltas per second aimed at over all agents while changes keep coming; 0: no pacing.
    pub update_rate: f64,
    /// Write the bound addresses as JSON here once listening.
    pub addresses_file: Option<PathBuf>,
    /// `None` with `--insecure`.
    pub tls: Option<ServerTls>,
    pub log_json: bool,
}

/// A configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Tls(#[from] TlsArgsError),
    #[error("{flag}: {reason}")]
    Invalid { flag: &'static str, reason: String },
}

// === impl Args ===

impl Args {
    /// Checks the flags and their combinations.
    ///
    /// # Errors
    /// Conflicting, missing or out-of-range flags.
    pub fn validate(&self) -> Result<Config, ConfigError> {
        let invalid = |flag: &'static str, reason: String| ConfigError::Invalid { flag, reason };
        meshlite_runtime::admin::parse_listen(&self.listen)
            .map_err(|e| invalid("--listen", e.to_string()))?;
        meshlite_runtime::admin::parse_listen(&self.admin_listen)
            .map_err(|e| invalid("--admin-listen", e.to_string()))?;
        if self.chunk_bytes < 16 * 1024 {
            return Err(invalid("--chunk-bytes", "must be at least 16384".into()));
        }
        if !(self.stream_rate > 0.0 && self.stream_burst >= 1.0) || self.max_streams == 0 {
            return Err(invalid(
                "--stream-rate/--stream-burst/--max-streams",
                "rate must be positive, burst and max at least 1".into(),
            ));
        }
        if !(self.update_rate >= 0.0 && self.update_rate.is_finite()) {
            return Err(invalid(
                "--update-rate",
                "must be 0 (no pacing) or a positive number".into(),
            ));
        }
        let tls = self.tls.validate()?;
        Ok(Config {
            source: self.source.clone(),
            kubeconfig: self.kubeconfig.clone(),
            listen: self.listen.clone(),
            admin_listen: self.admin_listen.clone(),
            debounce: self.debounce,
            tombstone_retention: self.tombstone_retention,
            service_proxy_name: self.service_proxy_name.clone(),
            file_poll_interval: self.file_poll_interval,
            chunk_bytes: self.chunk_bytes,
            max_message_bytes: self.max_message_bytes,
            max_concurrent_streams: self.max_concurrent_streams,
            send_timeout: self.send_timeout,
            node_identity: self.node_identity,
            node_agent_service_account: self.node_agent_service_account.clone(),
            max_streams: self.max_streams,
            stream_rate: self.stream_rate,
            stream_burst: self.stream_burst,
            max_full_syncs: self.max_full_syncs,
            update_rate: self.update_rate,
            addresses_file: self.addresses_file.clone(),
            tls,
            log_json: self.log.json(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("meshlite-control-plane").chain(args.iter().copied()))
            .unwrap()
    }

    #[test]
    fn defaults_and_contract_flags() {
        let c = parse(&[
            "--source",
            "file:examples/seed",
            "--insecure",
            "--listen",
            "127.0.0.1:0",
        ])
        .args;
        assert_eq!(c.source, SourceSpec::File("examples/seed".into()));
        assert_eq!(c.debounce, Duration::from_millis(10));
        assert!(c.validate().unwrap().tls.is_none());
        let c = parse(&["--tls-cert", "c", "--tls-key", "k", "--tls-ca", "ca"]).args;
        assert_eq!(c.source, SourceSpec::Kube);
        assert!(c.validate().unwrap().tls.is_some());
        // The old spelling still works, for one release.
        let c = parse(&["--tls-cert", "c", "--tls-key", "k", "--client-ca", "ca"]).args;
        assert!(c.validate().unwrap().tls.is_some());
    }

    #[test]
    fn invalid_combinations() {
        assert_eq!(
            parse(&[]).args.validate().unwrap_err(),
            ConfigError::Tls(TlsArgsError::Missing)
        );
        assert_eq!(
            parse(&["--insecure", "--tls-cert", "c"])
                .args
                .validate()
                .unwrap_err(),
            ConfigError::Tls(TlsArgsError::InsecureWithTls)
        );
        assert!(
            parse(&["--insecure", "--listen", "nope"])
                .args
                .validate()
                .is_err()
        );
        assert!(Cli::try_parse_from(["x", "--source", "ftp:x"]).is_err());
    }

    #[test]
    fn status_subcommand() {
        let c = parse(&["status", "--admin", "127.0.0.1:1"]);
        assert!(matches!(c.command, Some(Command::Status { .. })));
    }
}
