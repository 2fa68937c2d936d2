//! Telling traffic from this node's pods apart, as kube-proxy's
//! `--detect-local-mode` does.
//!
//! Both backends ask the same two questions in their rules: "is this packet from a
//! local pod?" (the `EXT` chain's short circuit for pods going to a service's
//! external address) and "is it not?" (masquerade off-cluster traffic to a cluster
//! IP). The mode decides which iptables match answers them:
//!
//! | mode | local | not local |
//! |---|---|---|
//! | `ClusterCIDR` (`--cluster-cidr`) | `-s <cidr>` | `! -s <cidr>` |
//! | `NodeCIDR` (the Node's `spec.podCIDRs`) | `-s <cidr>` | `! -s <cidr>` |
//! | `BridgeInterface` (`--pod-bridge-interface`) | `-i <name>` | `! -i <name>` |
//! | `InterfaceNamePrefix` (`--pod-interface-name-prefix`) | `-i <prefix>+` | `! -i <prefix>+` |
//!
//! With no CIDR of the family (ClusterCIDR without `--cluster-cidr`, NodeCIDR
//! before the Node has pod CIDRs), there is no detector: the rules that need one
//! are left out, as in kube-proxy.

use std::fmt;
use std::str::FromStr;

use ipnet::IpNet;

/// `--detect-local-mode`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum DetectLocalMode {
    /// Pods are the sources in `--cluster-cidr` (kube-proxy's default).
    #[default]
    ClusterCidr,
    /// Pods are the sources in this node's `spec.podCIDRs`.
    NodeCidr,
    /// Pods are what arrives on this bridge (`--pod-bridge-interface`).
    BridgeInterface(String),
    /// Pods are what arrives on interfaces with this name prefix
    /// (`--pod-interface-name-prefix`).
    InterfaceNamePrefix(String),
}

/// The mode's name as kube-proxy spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DetectLocalModeName {
    #[value(name = "ClusterCIDR")]
    ClusterCidr,
    #[value(name = "NodeCIDR")]
    NodeCidr,
    #[value(name = "BridgeInterface")]
    BridgeInterface,
    #[value(name = "InterfaceNamePrefix")]
    InterfaceNamePrefix,
}

/// The rule matches of one IP family's detector.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum LocalDetector {
    /// Nothing tells local pods apart: the rules that need it are left out.
    #[default]
    None,
    /// Sources in this CIDR.
    Cidr(IpNet),
    /// Packets that came in on an interface matching this iptables name (a
    /// trailing `+` is a prefix match).
    Interface(String),
}

/// A bad `--detect-local-mode` combination.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("--detect-local-mode {mode} needs {flag}")]
    Missing {
        mode: &'static str,
        flag: &'static str,
    },
    #[error("{flag} {value:?} is not a valid interface name: {reason}")]
    Interface {
        flag: &'static str,
        value: String,
        reason: &'static str,
    },
}

// === impl DetectLocalMode ===

impl DetectLocalMode {
    /// Builds the mode from its flags, validating the interface name it needs.
    ///
    /// # Errors
    ///
    /// The interface flag the mode needs is missing or not a valid name.
    pub fn try_new(
        name: DetectLocalModeName,
        bridge: Option<&str>,
        prefix: Option<&str>,
    ) -> Result<Self, Error> {
        let iface = |mode: &'static str, flag: &'static str, v: Option<&str>| {
            let v = v
                .filter(|v| !v.is_empty())
                .ok_or(Error::Missing { mode, flag })?;
            // The kernel's IFNAMSIZ is 16 with the terminating NUL; iptables
            // refuses longer names and these characters.
            let reason = if v.len() > 15 {
                Some("longer than 15 characters")
            } else if v.contains(['/', ' ', '"', '+']) || v == "." || v == ".." {
                Some("contains '/', a space, a quote or '+'")
            } else {
                None
            };
            match reason {
                Some(reason) => Err(Error::Interface {
                    flag,
                    value: v.to_string(),
                    reason,
                }),
                None => Ok(v.to_string()),
            }
        };
        Ok(match name {
            DetectLocalModeName::ClusterCidr => Self::ClusterCidr,
            DetectLocalModeName::NodeCidr => Self::NodeCidr,
            DetectLocalModeName::BridgeInterface => {
                Self::BridgeInterface(iface("BridgeInterface", "--pod-bridge-interface", bridge)?)
            }
            DetectLocalModeName::InterfaceNamePrefix => Self::InterfaceNamePrefix(iface(
                "InterfaceNamePrefix",
                "--pod-interface-name-prefix",
                prefix,
            )?),
        })
    }

    /// The detector for one family, given `--cluster-cidr`'s CIDR and the Node's
    /// pod CIDR of that family.
    pub fn detector(
        &self,
        cluster_cidr: Option<IpNet>,
        node_pod_cidr: Option<IpNet>,
    ) -> LocalDetector {
        match self {
            Self::ClusterCidr => {
                cluster_cidr.map_or(LocalDetector::None, |c| LocalDetector::Cidr(c.trunc()))
            }
            Self::NodeCidr => {
                node_pod_cidr.map_or(LocalDetector::None, |c| LocalDetector::Cidr(c.trunc()))
            }
            Self::BridgeInterface(name) => LocalDetector::Interface(name.clone()),
            Self::InterfaceNamePrefix(prefix) => LocalDetector::Interface(format!("{prefix}+")),
        }
    }

    /// The mode needs the Node's pod CIDRs.
    pub fn needs_node_cidrs(&self) -> bool {
        matches!(self, Self::NodeCidr)
    }
}

/// kube-proxy's spelling.
impl fmt::Display for DetectLocalMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ClusterCidr => f.write_str("ClusterCIDR"),
            Self::NodeCidr => f.write_str("NodeCIDR"),
            Self::BridgeInterface(n) => write!(f, "BridgeInterface({n})"),
            Self::InterfaceNamePrefix(p) => write!(f, "InterfaceNamePrefix({p})"),
        }
    }
}

impl FromStr for DetectLocalModeName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        <Self as clap::ValueEnum>::from_str(s, false)
    }
}

// === impl LocalDetector ===

impl LocalDetector {
    /// The match for traffic from a local pod; `None` without a detector.
    pub fn if_local(&self) -> Option<String> {
        match self {
            Self::None => None,
            Self::Cidr(c) => Some(format!("-s {c}")),
            Self::Interface(i) => Some(format!("-i {i}")),
        }
    }

    /// The match for traffic not from a local pod; `None` without a detector.
    pub fn if_not_local(&self) -> Option<String> {
        self.if_local().map(|m| format!("! {m}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_mode_gives_kube_proxys_matches() {
        let cidr: IpNet = "198.18.0.0/17".parse().unwrap();
        let node: IpNet = "198.18.3.0/24".parse().unwrap();
        let d = DetectLocalMode::ClusterCidr.detector(Some(cidr), Some(node));
        assert_eq!(d.if_local().as_deref(), Some("-s 198.18.0.0/17"));
        assert_eq!(d.if_not_local().as_deref(), Some("! -s 198.18.0.0/17"));
        let d = DetectLocalMode::NodeCidr.detector(Some(cidr), Some(node));
        assert_eq!(d.if_local().as_deref(), Some("-s 198.18.3.0/24"));
        let d = DetectLocalMode::BridgeInterface("cbr0".into()).detector(None, None);
        assert_eq!(d.if_not_local().as_deref(), Some("! -i cbr0"));
        let d = DetectLocalMode::InterfaceNamePrefix("eni".into()).detector(None, None);
        assert_eq!(d.if_local().as_deref(), Some("-i eni+"));
        assert_eq!(d.if_not_local().as_deref(), Some("! -i eni+"));
    }

    #[test]
    fn no_cidr_means_no_detector() {
        assert_eq!(
            DetectLocalMode::ClusterCidr.detector(None, None),
            LocalDetector::None
        );
        let cidr: IpNet = "198.18.0.0/17".parse().unwrap();
        // NodeCIDR ignores --cluster-cidr: before the Node has pod CIDRs, nothing.
        assert_eq!(
            DetectLocalMode::NodeCidr.detector(Some(cidr), None),
            LocalDetector::None
        );
        assert_eq!(LocalDetector::None.if_local(), None);
        assert_eq!(LocalDetector::None.if_not_local(), None);
    }

    #[test]
    fn interface_modes_need_a_valid_name() {
        use DetectLocalModeName as N;
        assert_eq!(
            DetectLocalMode::try_new(N::BridgeInterface, None, Some("eni")),
            Err(Error::Missing {
                mode: "BridgeInterface",
                flag: "--pod-bridge-interface"
            })
        );
        assert!(DetectLocalMode::try_new(N::InterfaceNamePrefix, None, Some("")).is_err());
        assert!(
            DetectLocalMode::try_new(N::BridgeInterface, Some("a-very-long-bridge0"), None)
                .is_err()
        );
        assert!(DetectLocalMode::try_new(N::InterfaceNamePrefix, None, Some("veth+")).is_err());
        assert_eq!(
            DetectLocalMode::try_new(N::InterfaceNamePrefix, None, Some("veth")),
            Ok(DetectLocalMode::InterfaceNamePrefix("veth".into()))
        );
        assert_eq!("NodeCIDR".parse::<N>(), Ok(N::NodeCidr));
    }
}
