//! Who may subscribe as what.
//!
//! Every stream is mutual TLS, and the client certificate carries the agent's role
//! in its DNS subjectAltNames:
//!
//! | SAN | may subscribe as |
//! |---|---|
//! | `<node>.nodes.meshlite` | the node agent of `<node>`, and no other node |
//! | `node-agent` | a node agent (which node: see `--node-identity`) |
//! | `dns-agent` | a DNS agent |
//!
//! `--node-identity` says how a node agent proves which node it runs on:
//! - `certificate` (default): its certificate names the node (`<node>.nodes.meshlite`).
//! - `token`: its certificate says `node-agent`, and it sends its pod's projected
//!   ServiceAccount token (audience `meshlite`) as `authorization: Bearer` metadata.
//!   The control plane verifies it with a TokenReview and requires the node name the
//!   kubelet bound into it (`authentication.kubernetes.io/node-name`, Kubernetes
//!   1.30+) to be the node in the Hello, and the ServiceAccount to be the node agent's.
//! - `shared-certificate`: a `node-agent` certificate may subscribe as any node. The
//!   role is checked, the node is not; for clusters that cannot issue per-node
//!   certificates nor use tokens. Logged loudly at startup.
//!
//! A refusal is a `PermissionDenied` status, counted in
//! `meshlite_control_plane_streams_refused_total{reason="unauthorized"}` and logged
//! with the peer address, the certificate's names and what the Hello claimed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::Api;
use kube::api::PostParams;
use meshlite_proto::v1;
use tokio::time::Instant;

use super::{Authorizer, Peer};

/// The SAN suffix of per-node certificates.
pub const NODE_SAN_SUFFIX: &str = ".nodes.meshlite";
/// The SAN of role-only node agent certificates.
pub const NODE_AGENT_SAN: &str = "node-agent";
/// The SAN of DNS agent certificates.
pub const DNS_AGENT_SAN: &str = "dns-agent";
/// The audience node agents request for their projected token.
pub const TOKEN_AUDIENCE: &str = "meshlite";
const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

/// `--node-identity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NodeIdentity {
    Certificate,
    Token,
    SharedCertificate,
}

/// Checks certificates (and tokens in `token` mode). See the module docs.
pub struct CertAuthorizer {
    mode: NodeIdentity,
    reviewer: Option<TokenReviewer>,
}

impl std::fmt::Debug for CertAuthorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertAuthorizer")
            .field("mode", &self.mode)
            .finish()
    }
}

impl CertAuthorizer {
    /// `reviewer` is required in `token` mode.
    pub fn new(mode: NodeIdentity, reviewer: Option<TokenReviewer>) -> Self {
        Self { mode, reviewer }
    }
}

fn names(peer: &Peer) -> Vec<String> {
    peer.certs
        .first()
        .map(|c| meshlite_runtime::tls::dns_names(c))
        .unwrap_or_default()
}

#[tonic::async_trait]
impl Authorizer for CertAuthorizer {
    async fn authorize(&self, peer: &Peer, hello: &v1::Hello) -> Result<(), String> {
        let names = names(peer);
        let role = v1::Role::try_from(hello.role).unwrap_or(v1::Role::Unspecified);
        let node = &hello.node_name;
        let per_node = format!("{node}{NODE_SAN_SUFFIX}");
        match role {
            v1::Role::Dns => {
                if names.iter().any(|n| n == DNS_AGENT_SAN) {
                    Ok(())
                } else {
                    Err(format!(
                        "certificate {names:?} is not a DNS agent's (needs SAN {DNS_AGENT_SAN})"
                    ))
                }
            }
            v1::Role::Node => {
                if names.contains(&per_node) {
                    return Ok(());
                }
                if names.iter().any(|n| n.ends_with(NODE_SAN_SUFFIX)) {
                    return Err(format!(
                        "certificate {names:?} belongs to another node than {node:?}"
                    ));
                }
                if !names.iter().any(|n| n == NODE_AGENT_SAN) {
                    return Err(format!(
                        "certificate {names:?} is not a node agent's (needs SAN {per_node} or {NODE_AGENT_SAN})"
                    ));
                }
                match (self.mode, &self.reviewer) {
                    (NodeIdentity::SharedCertificate, _) => Ok(()),
                    (NodeIdentity::Certificate, _) => Err(format!(
                        "--node-identity certificate needs a certificate naming the node ({per_node}); {names:?} does not"
                    )),
                    (NodeIdentity::Token, Some(r)) => match &peer.token {
                        None => Err("--node-identity token: no bearer token sent".to_string()),
                        Some(t) => r.check(t, node).await,
                    },
                    (NodeIdentity::Token, None) => {
                        Err("token review is not configured".to_string())
                    }
                }
            }
            v1::Role::Unspecified => Err("Hello has no role".to_string()),
        }
    }
}

/// A review's outcome: the bound node, or why not.
type Verdict = Result<String, String>;

/// Verifies node agents' ServiceAccount tokens with TokenReview, caching verdicts
/// for a minute so a reconnect storm costs one review per token.
pub struct TokenReviewer {
    api: Api<TokenReview>,
    /// `system:serviceaccount:<ns>:<name>` of the node agent.
    service_account: String,
    cache: Mutex<HashMap<String, (Instant, Verdict)>>,
}

impl TokenReviewer {
    pub fn new(client: kube::Client, service_account: String) -> Self {
        Self {
            api: Api::all(client),
            service_account,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Ok when the token is valid, is the node agent's ServiceAccount, and is bound
    /// to `node`.
    async fn check(&self, token: &str, node: &str) -> Result<(), String> {
        let verdict = self.review(token).await;
        match verdict {
            Ok(bound) if bound == node => Ok(()),
            Ok(bound) => Err(format!("token is bound to node {bound:?}, not {node:?}")),
            Err(e) => Err(e),
        }
    }

    /// The node the token is bound to.
    async fn review(&self, token: &str) -> Result<String, String> {
        let now = Instant::now();
        {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            cache.retain(|_, (at, _)| now.duration_since(*at) < Duration::from_secs(60));
            if let Some((_, v)) = cache.get(token) {
                return v.clone();
            }
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: Some(vec![TOKEN_AUDIENCE.to_string()]),
            },
            ..TokenReview::default()
        };
        let result = match self.api.create(&PostParams::default(), &review).await {
            Err(e) => return Err(format!("TokenReview failed: {e}")), // not cached: transient
            Ok(r) => {
                let status = r.status.unwrap_or_default();
                let user = status.user.unwrap_or_default();
                if status.authenticated != Some(true) {
                    Err(format!(
                        "token not authenticated: {}",
                        status.error.unwrap_or_default()
                    ))
                } else if user.username.as_deref() != Some(self.service_account.as_str()) {
                    Err(format!(
                        "token is {:?}, not the node agent's ServiceAccount {:?}",
                        user.username, self.service_account
                    ))
                } else {
                    user.extra
                        .and_then(|e| e.get(NODE_NAME_EXTRA).and_then(|v| v.first().cloned()))
                        .ok_or_else(|| format!("token is not bound to a node (no {NODE_NAME_EXTRA}; Kubernetes 1.30+ binds it)"))
                }
            }
        };
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(token.to_string(), (now, result.clone()));
        result
    }
}
