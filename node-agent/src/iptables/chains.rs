//! Chain names, as kube-proxy spells them.
//!
//! Per-service chains are `<prefix>-<kind>-<hash>` where the hash is the first 16
//! characters of the standard base32 encoding of sha256 over the very string
//! kube-proxy hashes: `ns/name[:port]` + lower-case protocol (+ `ip:port` for an
//! endpoint chain). With the default prefix `KUBE` the names equal kube-proxy's, so
//! a node switching from kube-proxy rewrites the same chains in place.

use sha2::{Digest, Sha256};

use crate::proxy::{EndpointInfo, ServicePortName};

/// The longest prefix that keeps every chain within iptables' 28 characters
/// (`<prefix>-SEP-` + 16).
pub const MAX_PREFIX_LEN: usize = 7;

/// Chain names for one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainNames {
    prefix: String,
    pub services: String,
    pub external_services: String,
    pub nodeports: String,
    pub postrouting: String,
    pub mark_masq: String,
    pub forward: String,
    pub proxy_firewall: String,
    /// kubelet's localnet firewall chain (`KUBE-FIREWALL`), which kube-proxy also writes.
    pub firewall: String,
    /// Exists only so an external flush of a whole table can be noticed.
    pub canary: String,
}

/// The hash kube-proxy puts in per-service chain names.
pub fn port_proto_hash(spn: &ServicePortName) -> String {
    hash16(&format!("{spn}{}", spn.protocol.as_lower()))
}

/// The hash kube-proxy puts in endpoint chain names.
pub fn endpoint_hash(spn: &ServicePortName, endpoint: &str) -> String {
    hash16(&format!("{spn}{}{endpoint}", spn.protocol.as_lower()))
}

fn hash16(input: &str) -> String {
    let digest = Sha256::digest(input.as_bytes());
    let mut encoded = data_encoding::BASE32.encode(&digest);
    encoded.truncate(16);
    encoded
}

// === impl ChainNames ===

impl ChainNames {
    /// Names for a prefix; the caller validated it ([`validate_prefix`]).
    pub fn new(prefix: &str) -> Self {
        let n = |s: &str| format!("{prefix}-{s}");
        Self {
            prefix: prefix.to_string(),
            services: n("SERVICES"),
            external_services: n("EXTERNAL-SERVICES"),
            nodeports: n("NODEPORTS"),
            postrouting: n("POSTROUTING"),
            mark_masq: n("MARK-MASQ"),
            forward: n("FORWARD"),
            proxy_firewall: n("PROXY-FIREWALL"),
            firewall: n("FIREWALL"),
            canary: n("PROXY-CANARY"),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `KUBE-SVC-*`: the Cluster traffic policy chain.
    pub fn svc(&self, spn: &ServicePortName) -> String {
        format!("{}-SVC-{}", self.prefix, port_proto_hash(spn))
    }

    /// `KUBE-SVL-*`: the Local traffic policy chain.
    pub fn svl(&self, spn: &ServicePortName) -> String {
        format!("{}-SVL-{}", self.prefix, port_proto_hash(spn))
    }

    /// `KUBE-EXT-*`: external destinations (NodePort, LB, external IPs).
    pub fn ext(&self, spn: &ServicePortName) -> String {
        format!("{}-EXT-{}", self.prefix, port_proto_hash(spn))
    }

    /// `KUBE-FW-*`: loadBalancerSourceRanges.
    pub fn fw(&self, spn: &ServicePortName) -> String {
        format!("{}-FW-{}", self.prefix, port_proto_hash(spn))
    }

    /// `KUBE-SEP-*`: one endpoint.
    pub fn sep(&self, spn: &ServicePortName, ep: &EndpointInfo) -> String {
        format!(
            "{}-SEP-{}",
            self.prefix,
            endpoint_hash(spn, &ep.to_string())
        )
    }

    /// A per-service chain of this prefix (which a full sync may delete when stale).
    pub fn is_service_chain(&self, chain: &str) -> bool {
        chain
            .strip_prefix(self.prefix.as_str())
            .and_then(|rest| rest.strip_prefix('-'))
            .is_some_and(|rest| {
                ["SVC-", "SVL-", "EXT-", "FW-", "SEP-"]
                    .iter()
                    .any(|k| rest.starts_with(k))
            })
    }
}

/// A prefix must be 1..=7 upper-case letters, digits or `_`.
pub fn validate_prefix(prefix: &str) -> Result<(), String> {
    if prefix.is_empty() || prefix.len() > MAX_PREFIX_LEN {
        return Err(format!(
            "must be 1 to {MAX_PREFIX_LEN} characters so chain names fit iptables' 28"
        ));
    }
    if !prefix
        .chars()
        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
    {
        return Err("must be upper-case letters, digits or '_'".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use meshlite_proto::model::Protocol;

    use super::*;

    fn spn(ns: &str, name: &str, port: &str, p: Protocol) -> ServicePortName {
        ServicePortName::new(ns, name, port, p)
    }

    fn ep(s: &str) -> EndpointInfo {
        let addr: std::net::SocketAddr = s.parse().unwrap();
        EndpointInfo {
            ip: addr.ip(),
            port: addr.port(),
            is_local: false,
            ready: true,
            serving: true,
            terminating: false,
            zone_hints: vec![],
            node_hints: vec![],
        }
    }

    /// Names from kube-proxy's own unit tests (pkg/proxy/iptables/proxier_test.go,
    /// TestOverallIPTablesRules) and from any default cluster's `iptables-save`.
    #[test]
    fn names_equal_kube_proxy() {
        let c = ChainNames::new("KUBE");
        let tcp = Protocol::Tcp;
        let cases = [
            (spn("ns1", "svc1", "p80", tcp), "KUBE-SVC-XPGD46QRK7WJZT7O"),
            (spn("ns2", "svc2", "p80", tcp), "KUBE-SVC-GNZBNJ2PO5MGZ6GT"),
            (spn("ns3", "svc3", "p80", tcp), "KUBE-SVC-X27LE4BHSL4DOUIK"),
            (spn("ns4", "svc4", "p80", tcp), "KUBE-SVC-4SW47YFZTEDKD3PK"),
            (spn("ns5", "svc5", "p80", tcp), "KUBE-SVC-NUKIZ6OKUXPJNT4C"),
            (
                spn("default", "kubernetes", "https", tcp),
                "KUBE-SVC-NPX46M4PTMTKRN6Y",
            ),
            (
                spn("kube-system", "kube-dns", "dns", Protocol::Udp),
                "KUBE-SVC-TCOU7JCQXEZGVUNU",
            ),
            (
                spn("kube-system", "kube-dns", "dns-tcp", tcp),
                "KUBE-SVC-ERIFXISQEP7F7OF4",
            ),
            (
                spn("kube-system", "kube-dns", "metrics", tcp),
                "KUBE-SVC-JD5MR3NA4I4DYORP",
            ),
        ];
        for (s, want) in cases {
            assert_eq!(c.svc(&s), want, "{s}");
        }
        let svc2 = spn("ns2", "svc2", "p80", tcp);
        assert_eq!(c.svl(&svc2), "KUBE-SVL-GNZBNJ2PO5MGZ6GT");
        assert_eq!(c.ext(&svc2), "KUBE-EXT-GNZBNJ2PO5MGZ6GT");
        assert_eq!(c.fw(&svc2), "KUBE-FW-GNZBNJ2PO5MGZ6GT");

        let seps = [
            (
                spn("ns1", "svc1", "p80", tcp),
                "10.180.0.1:80",
                "KUBE-SEP-SXIVWICOYRO3J4NJ",
            ),
            (
                spn("ns2", "svc2", "p80", tcp),
                "10.180.0.2:80",
                "KUBE-SEP-RS4RBKLTHTF2IUXJ",
            ),
            (
                spn("ns3", "svc3", "p80", tcp),
                "10.180.0.3:80",
                "KUBE-SEP-OYPFS5VJICHGATKP",
            ),
            (
                spn("ns4", "svc4", "p80", tcp),
                "10.180.0.4:80",
                "KUBE-SEP-UKSFD7AGPMPPLUHC",
            ),
            (
                spn("ns4", "svc4", "p80", tcp),
                "10.180.0.5:80",
                "KUBE-SEP-C6EBXVWJJZMIWKLZ",
            ),
            (
                spn("ns5", "svc5", "p80", tcp),
                "10.180.0.3:80",
                "KUBE-SEP-I77PXRDZVX7PMWMN",
            ),
        ];
        for (s, e, want) in seps {
            assert_eq!(c.sep(&s, &ep(e)), want, "{s} {e}");
        }
    }

    #[test]
    fn prefix_is_configurable_and_validated() {
        let c = ChainNames::new("MESH");
        let s = spn("ns1", "svc1", "p80", Protocol::Tcp);
        assert_eq!(c.svc(&s), "MESH-SVC-XPGD46QRK7WJZT7O");
        assert_eq!(c.services, "MESH-SERVICES");
        assert!(c.is_service_chain("MESH-SEP-SXIVWICOYRO3J4NJ"));
        assert!(!c.is_service_chain("KUBE-SEP-SXIVWICOYRO3J4NJ"));
        assert!(!c.is_service_chain("MESH-SERVICES"));
        assert!(validate_prefix("KUBE").is_ok());
        assert!(validate_prefix("ABCDEFG").is_ok());
        assert!(validate_prefix("ABCDEFGH").is_err());
        assert!(validate_prefix("kube").is_err());
        assert!(validate_prefix("").is_err());
        // The longest possible name still fits.
        let long = ChainNames::new("ABCDEFG");
        assert!(long.sep(&s, &ep("10.0.0.1:80")).len() <= 28);
        assert!(long.external_services.len() <= 28);
    }
}
