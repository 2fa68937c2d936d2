//! Flags and environment (`MESHLITE_<FLAG>` for every flag), validated into one
//! typed [`Config`] by a pure function.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use ipnet::IpNet;
use meshlite_runtime::backoff::Backoff;
use meshlite_runtime::process::args::{AgentConnectArgs, LogArgs, TlsArgsError};
use meshlite_runtime::{Role, SubscriberConfig};

use crate::dns::{ForwardConfig, ServerConfig, parse_resolv_conf};
use crate::zone::{PodRecords, ZoneConfig};

/// The command line.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "meshlite-dns-agent",
    version,
    about = "Serves the cluster DNS zone from the meshlite control plane and forwards the rest"
)]
pub struct Args {
    /// `--control-plane` (https://host:port with mTLS, or http://host:port with
    /// --insecure; a bare host:port takes the scheme the TLS flags imply) and TLS.
    #[command(flatten)]
    pub connect: AgentConnectArgs,
    /// DNS address, UDP and TCP (`:0` picks a free port).
    #[arg(long, env = "MESHLITE_LISTEN", default_value = "0.0.0.0:53")]
    pub listen: String,
    /// Admin HTTP address for /metrics, /healthz and /readyz.
    #[arg(long, env = "MESHLITE_ADMIN_LISTEN", default_value = ":9153")]
    pub admin_listen: String,
    /// Write the bound addresses as JSON here once listening.
    #[arg(long, env = "MESHLITE_ADDRESSES_FILE")]
    pub addresses_file: Option<PathBuf>,
    /// The cluster domain served authoritatively.
    #[arg(long, env = "MESHLITE_CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,
    /// TTL of cluster records, seconds.
    #[arg(long, env = "MESHLITE_TTL", default_value_t = 30)]
    pub ttl: u32,
    /// Pod A/AAAA records (`a-b-c-d.<ns>.pod.<zone>`), as CoreDNS's `pods` option.
    #[arg(long, env = "MESHLITE_POD_RECORDS", value_enum, default_value_t = PodRecords::Disabled)]
    pub pod_records: PodRecords,
    /// Service CIDRs: PTR names inside them are answered authoritatively.
    #[arg(long, env = "MESHLITE_SERVICE_CIDR", value_delimiter = ',')]
    pub service_cidr: Vec<String>,
    /// Pod CIDRs: PTR names inside them are answered authoritatively.
    #[arg(long, env = "MESHLITE_POD_CIDR", value_delimiter = ',')]
    pub pod_cidr: Vec<String>,
    /// Upstream resolvers (ip or ip:port, comma separated); `none` disables forwarding.
    /// Default: the nameservers of --resolv-conf.
    #[arg(long, env = "MESHLITE_UPSTREAM", value_delimiter = ',')]
    pub upstream: Vec<String>,
    /// Where default upstreams are read from.
    #[arg(long, env = "MESHLITE_RESOLV_CONF", default_value = "/etc/resolv.conf")]
    pub resolv_conf: PathBuf,
    /// Per-attempt upstream timeout.
    #[arg(long, env = "MESHLITE_UPSTREAM_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub upstream_timeout: Duration,
    /// Forwarding cache entries (0 disables the cache).
    #[arg(long, env = "MESHLITE_CACHE_SIZE", default_value_t = 10_000)]
    pub cache_size: u64,
    /// Longest time an upstream answer is cached, whatever its TTL (kubeadm's `cache 30`).
    #[arg(long, env = "MESHLITE_CACHE_MAX_TTL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub cache_max_ttl: Duration,
    /// Longest time a negative upstream answer is cached.
    #[arg(long, env = "MESHLITE_CACHE_NEGATIVE_MAX_TTL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub cache_negative_max_ttl: Duration,
    /// Largest EDNS UDP payload honoured; larger answers are truncated (TC).
    #[arg(long, env = "MESHLITE_MAX_UDP_PAYLOAD", default_value_t = 1232)]
    pub max_udp_payload: u16,
    /// UDP sockets on the listen address (`SO_REUSEPORT`), each served by a thread of
    /// its own. Default: the CPUs this process may use (affinity and cgroup quota).
    #[arg(long, env = "MESHLITE_UDP_WORKERS")]
    pub udp_workers: Option<usize>,
    /// Serve expired forwarded answers (TTL 30 s) for up to this long past their TTL
    /// while every upstream fails (RFC 8767; CoreDNS `cache { serve_stale }`). 0: off.
    #[arg(long, env = "MESHLITE_SERVE_STALE", default_value = "0s", value_parser = humantime::parse_duration)]
    pub serve_stale: Duration,
    /// This agent's identity on the stream (default: the hostname).
    #[arg(long, env = "MESHLITE_NODE_NAME")]
    pub node_name: Option<String>,
    #[command(flatten)]
    pub log: LogArgs,
    /// Validate the configuration, print it and exit (0, or 64 when invalid).
    #[arg(long, env = "MESHLITE_CHECK_CONFIG")]
    pub check_config: bool,
}

/// The validated configuration.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Config {
    pub subscriber: SubscriberConfig,
    pub server: ServerConfig,
    pub admin_listen: String,
    pub addresses_file: Option<PathBuf>,
    pub zone: ZoneConfig,
    /// `None`: forwarding disabled (`--upstream none`).
    pub forward: Option<ForwardConfig>,
    pub log_json: bool,
}

/// Invalid configuration (exit 64).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Tls(#[from] TlsArgsError),
    #[error("--{flag} {value:?}: {reason}")]
    Invalid {
        flag: &'static str,
        value: String,
        reason: String,
    },
    #[error("no upstream resolver: none in {path} ({reason}); set --upstream (or --upstream none)")]
    NoUpstream { path: PathBuf, reason: String },
}

/// Reads a file; injected so validation stays a pure function in tests.
pub trait FileSource {
    fn read(&self, path: &std::path::Path) -> std::io::Result<String>;
    fn hostname(&self) -> Option<String>;
}

/// The real filesystem and hostname.
#[derive(Debug, Clone, Copy, Default)]
pub struct System;

// === impl Args ===

impl Args {
    /// Validates flags into a [`Config`].
    ///
    /// # Errors
    /// [`ConfigError`] naming the flag and the reason.
    pub fn validate(&self, sys: &impl FileSource) -> Result<Config, ConfigError> {
        let invalid = |flag: &'static str, value: &str, reason: &str| ConfigError::Invalid {
            flag,
            value: value.to_string(),
            reason: reason.to_string(),
        };

        // Control plane and TLS.
        let (raw, tls) = self.connect.validate()?;
        let raw = raw.as_str();
        let endpoint = if raw.contains("://") {
            raw.to_string()
        } else if tls.is_some() {
            format!("https://{raw}")
        } else {
            format!("http://{raw}")
        };
        match (endpoint.split("://").next(), tls.is_some()) {
            (Some("https"), true) | (Some("http"), false) => {}
            (Some("http"), true) => {
                return Err(invalid(
                    "control-plane",
                    raw,
                    "TLS is configured: use https://",
                ));
            }
            (Some("https"), false) => {
                return Err(invalid(
                    "control-plane",
                    raw,
                    "https:// needs --tls-cert/--tls-key/--tls-ca (or http:// with --insecure)",
                ));
            }
            _ => {
                return Err(invalid(
                    "control-plane",
                    raw,
                    "scheme must be http or https",
                ));
            }
        }
        let node_name = match &self.node_name {
            Some(n) if !n.is_empty() => n.clone(),
            _ => sys
                .hostname()
                .filter(|h| !h.is_empty())
                .ok_or_else(|| invalid("node-name", "", "no hostname to default to; set it"))?,
        };

        // Listening.
        let listen = meshlite_runtime::admin::parse_listen(&self.listen)
            .map_err(|e| invalid("listen", &self.listen, &e.to_string()))?;
        meshlite_runtime::admin::parse_listen(&self.admin_listen)
            .map_err(|e| invalid("admin-listen", &self.admin_listen, &e.to_string()))?;
        let udp_workers = match self.udp_workers {
            Some(0) => return Err(invalid("udp-workers", "0", "must be at least 1")),
            Some(n) if n > 1024 => {
                return Err(invalid("udp-workers", &n.to_string(), "at most 1024"));
            }
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        };
        if self.max_udp_payload < 512 {
            return Err(invalid(
                "max-udp-payload",
                &self.max_udp_payload.to_string(),
                "must be at least 512 (RFC 6891 6.2.5)",
            ));
        }

        // Zone.
        let domain = self
            .cluster_domain
            .trim_end_matches('.')
            .to_ascii_lowercase();
        if domain.is_empty()
            || domain.len() > 200
            || domain.split('.').any(|l| {
                l.is_empty()
                    || l.len() > 63
                    || !l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            })
        {
            return Err(invalid(
                "cluster-domain",
                &self.cluster_domain,
                "not a DNS name of letters, digits and hyphens",
            ));
        }
        let mut reverse_cidrs = Vec::new();
        for (flag, list) in [
            ("service-cidr", &self.service_cidr),
            ("pod-cidr", &self.pod_cidr),
        ] {
            for c in list.iter().filter(|c| !c.is_empty()) {
                let net: IpNet = c.parse().map_err(|_| invalid(flag, c, "not a CIDR"))?;
                reverse_cidrs.push(net.trunc());
            }
        }

        // Forwarding.
        let forward = if self.upstream.iter().any(|u| u == "none") {
            if self.upstream.len() > 1 {
                return Err(invalid(
                    "upstream",
                    &self.upstream.join(","),
                    "`none` stands alone",
                ));
            }
            None
        } else {
            let mut upstreams = Vec::new();
            for u in self.upstream.iter().filter(|u| !u.is_empty()) {
                upstreams.push(parse_upstream(u).ok_or_else(|| {
                    invalid("upstream", u, "expected ip, ip:port or [ipv6]:port")
                })?);
            }
            if upstreams.is_empty() {
                let path = self.resolv_conf.clone();
                let text = sys.read(&path).map_err(|e| ConfigError::NoUpstream {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                upstreams = parse_resolv_conf(&text);
                if upstreams.is_empty() {
                    return Err(ConfigError::NoUpstream {
                        path,
                        reason: "no nameserver line".into(),
                    });
                }
            }
            if listen.port() != 0 && upstreams.contains(&listen) {
                return Err(invalid(
                    "upstream",
                    &listen.to_string(),
                    "is our own --listen address",
                ));
            }
            Some(ForwardConfig {
                upstreams,
                timeout: self.upstream_timeout,
                attempts: 2,
                cache_size: self.cache_size,
                cache_max_ttl: self.cache_max_ttl,
                negative_max_ttl: self.cache_negative_max_ttl,
                serve_stale: self.serve_stale,
            })
        };

        Ok(Config {
            subscriber: SubscriberConfig {
                endpoint,
                node_name,
                role: Role::Dns,
                tls,
                agent_version: concat!("meshlite-dns-agent/", env!("CARGO_PKG_VERSION")).into(),
                backoff: default_backoff(),
                max_message_bytes: 64 * 1024 * 1024,
                // Bearer tokens identify node agents (`--node-identity token`); a DNS
                // agent is identified by its certificate alone.
                token_file: None,
            },
            server: ServerConfig {
                listen,
                max_udp_payload: self.max_udp_payload,
                tcp_idle_timeout: Duration::from_secs(10),
                udp_workers,
            },
            admin_listen: self.admin_listen.clone(),
            addresses_file: self.addresses_file.clone(),
            zone: ZoneConfig {
                domain,
                ttl: self.ttl,
                pod_records: self.pod_records,
                reverse_cidrs,
            },
            forward,
            log_json: self.log.json(),
        })
    }
}

/// The one reconnect backoff every agent uses (800 ms to 30 s, half jittered).
fn default_backoff() -> Backoff {
    Backoff::default()
}

fn parse_upstream(s: &str) -> Option<SocketAddr> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some(sa);
    }
    s.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53))
}

// === impl System ===

impl FileSource for System {
    fn read(&self, path: &std::path::Path) -> std::io::Result<String> {
        std::fs::read_to_string(path)
    }

    fn hostname(&self) -> Option<String> {
        hostname::get().ok().and_then(|h| h.into_string().ok())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::Path;

    use super::*;

    struct Fake(HashMap<PathBuf, String>);

    impl FileSource for Fake {
        fn read(&self, path: &Path) -> std::io::Result<String> {
            self.0
                .get(path)
                .cloned()
                .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
        }
        fn hostname(&self) -> Option<String> {
            Some("dns-1".into())
        }
    }

    fn fake() -> Fake {
        Fake(HashMap::from([(
            PathBuf::from("/etc/resolv.conf"),
            "nameserver 127.0.0.53\n".to_string(),
        )]))
    }

    fn parse(args: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("meshlite-dns-agent").chain(args.iter().copied()))
            .unwrap()
    }

    #[test]
    fn defaults() {
        let c = parse(&["--control-plane", "127.0.0.1:50051", "--insecure"])
            .validate(&fake())
            .unwrap();
        assert_eq!(c.subscriber.endpoint, "http://127.0.0.1:50051");
        assert_eq!(c.subscriber.node_name, "dns-1");
        assert_eq!(c.subscriber.role, Role::Dns);
        assert_eq!(c.zone.domain, "cluster.local");
        assert_eq!(c.zone.ttl, 30);
        assert_eq!(c.zone.pod_records, PodRecords::Disabled);
        assert_eq!(c.server.listen, "0.0.0.0:53".parse().unwrap());
        assert!(c.server.udp_workers >= 1);
        let f = c.forward.unwrap();
        assert_eq!(f.upstreams, vec!["127.0.0.53:53".parse().unwrap()]);
        assert_eq!(f.serve_stale, Duration::ZERO);
    }

    #[test]
    fn flags() {
        let c = parse(&[
            "--control-plane=https://cp:443",
            "--tls-cert=c.pem",
            "--tls-key=k.pem",
            "--ca=ca.pem",
            "--listen=127.0.0.1:0",
            "--cluster-domain=Example.Org.",
            "--ttl=5",
            "--pod-records=verified",
            "--upstream=127.0.0.2:5300,::1",
            "--service-cidr=198.19.0.0/16",
            "--pod-cidr=198.18.0.0/16,2001:db8::/32",
            "--node-name=dns-a",
            "--udp-workers=3",
            "--serve-stale=1h",
        ])
        .validate(&fake())
        .unwrap();
        assert!(c.subscriber.tls.is_some());
        assert_eq!(c.server.udp_workers, 3);
        assert_eq!(
            c.forward.as_ref().unwrap().serve_stale,
            Duration::from_secs(3600)
        );
        assert_eq!(c.zone.domain, "example.org");
        assert_eq!(c.zone.pod_records, PodRecords::Verified);
        assert_eq!(c.zone.reverse_cidrs.len(), 3);
        assert_eq!(
            c.forward.unwrap().upstreams,
            vec![
                "127.0.0.2:5300".parse().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
        let none = parse(&["--control-plane=x:1", "--insecure", "--upstream=none"])
            .validate(&fake())
            .unwrap();
        assert!(none.forward.is_none());
    }

    #[test]
    fn invalid() {
        let bad = |args: &[&str]| parse(args).validate(&fake()).unwrap_err().to_string();
        assert!(bad(&["--insecure"]).contains("--control-plane"));
        assert!(bad(&["--control-plane=x:1"]).contains("--tls-cert"));
        assert!(bad(&["--control-plane=x:1", "--insecure", "--ca=a"]).contains("--insecure"));
        assert!(bad(&["--control-plane=https://x:1", "--insecure"]).contains("https"));
        assert!(
            bad(&["--control-plane=x:1", "--insecure", "--pod-cidr=nope"]).contains("pod-cidr")
        );
        assert!(bad(&["--control-plane=x:1", "--insecure", "--upstream=a.b"]).contains("upstream"));
        assert!(
            bad(&["--control-plane=x:1", "--insecure", "--cluster-domain=a..b"])
                .contains("cluster-domain")
        );
        assert!(bad(&["--control-plane=x:1", "--insecure", "--listen=nope"]).contains("listen"));
        assert!(
            bad(&["--control-plane=x:1", "--insecure", "--udp-workers=0"]).contains("udp-workers")
        );
        let empty = Fake(HashMap::new());
        let e = parse(&["--control-plane=x:1", "--insecure"])
            .validate(&empty)
            .unwrap_err();
        assert!(matches!(e, ConfigError::NoUpstream { .. }));
        assert!(
            bad(&[
                "--control-plane=x:1",
                "--insecure",
                "--listen=127.0.0.1:5353",
                "--upstream=127.0.0.1:5353"
            ])
            .contains("own")
        );
    }
}
