//! The dummy interface (`kube-ipvs0`) that holds every service IP, so the node
//! accepts packets to them and IPVS (in the INPUT path) sees them; programmed with
//! the `rtnetlink` crate.
//!
//! Like kube-proxy, the interface stays down: an address on a down interface still
//! gets its local route, and a down interface answers no ARP for the addresses.

use std::collections::BTreeSet;
use std::net::IpAddr;

use futures::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::{Handle, LinkDummy};

/// A failed rtnetlink request.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {message}")]
pub struct LinkError {
    pub what: String,
    pub message: String,
}

/// The node's addresses, read in one dump.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Addresses {
    /// On the dummy interface.
    pub dummy: BTreeSet<IpAddr>,
    /// On every other interface (loopback included).
    pub others: BTreeSet<IpAddr>,
}

/// An rtnetlink connection.
#[derive(Debug)]
pub struct Link {
    handle: Handle,
    name: String,
    index: Option<u32>,
}

fn err(what: impl Into<String>, e: impl std::fmt::Display) -> LinkError {
    LinkError {
        what: what.into(),
        message: e.to_string(),
    }
}

// === impl Addresses ===

impl Addresses {
    /// The addresses NodePorts answer on: the node's own (not the dummy
    /// interface's), without loopback and IPv6 link-local ones (kube-proxy's
    /// `GetAllLocalAddressesExcept` + `isValidForSet`).
    pub fn node_port_candidates(&self) -> Vec<IpAddr> {
        self.others
            .iter()
            .filter(|ip| !ip.is_loopback())
            .filter(|ip| match ip {
                IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
                IpAddr::V4(_) => true,
            })
            .copied()
            .collect()
    }
}

// === impl Link ===

impl Link {
    /// Opens an rtnetlink connection (its task runs on the current tokio runtime).
    pub fn new(name: &str) -> Result<Self, LinkError> {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| err("rtnetlink connection", e))?;
        tokio::spawn(conn);
        Ok(Self {
            handle,
            name: name.to_string(),
            index: None,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The interface's index, if it exists.
    pub async fn find(&self) -> Result<Option<u32>, LinkError> {
        let mut links = self.handle.link().get().execute();
        while let Some(l) = links.try_next().await.map_err(|e| err("list links", e))? {
            let named = l
                .attributes
                .iter()
                .any(|a| matches!(a, LinkAttribute::IfName(n) if *n == self.name));
            if named {
                return Ok(Some(l.header.index));
            }
        }
        Ok(None)
    }

    /// Creates the dummy interface if it does not exist; returns its index.
    pub async fn ensure(&mut self) -> Result<u32, LinkError> {
        if let Some(i) = self.find().await? {
            self.index = Some(i);
            return Ok(i);
        }
        self.handle
            .link()
            .add(LinkDummy::new(&self.name).build())
            .execute()
            .await
            .map_err(|e| {
                err(
                    format!(
                        "create dummy interface {} (is the dummy module available?)",
                        self.name
                    ),
                    e,
                )
            })?;
        let i = self.find().await?.ok_or_else(|| {
            err(
                format!("create dummy interface {}", self.name),
                "created but not found",
            )
        })?;
        self.index = Some(i);
        Ok(i)
    }

    /// Deletes the interface (and with it every address on it); `false` when it
    /// did not exist.
    pub async fn delete(&self) -> Result<bool, LinkError> {
        let Some(index) = self.find().await? else {
            return Ok(false);
        };
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(|e| err(format!("delete interface {}", self.name), e))?;
        Ok(true)
    }

    /// Every address of the node, split into the dummy interface's and the others.
    pub async fn addresses(&self) -> Result<Addresses, LinkError> {
        let index = self.find().await?;
        let mut out = Addresses::default();
        let mut msgs = self.handle.address().get().execute();
        while let Some(m) = msgs
            .try_next()
            .await
            .map_err(|e| err("list addresses", e))?
        {
            let Some(ip) = address_of(&m) else { continue };
            if Some(m.header.index) == index {
                out.dummy.insert(ip);
            } else {
                out.others.insert(ip);
            }
        }
        Ok(out)
    }

    /// Adds `ip/32` (`/128`) to the dummy interface.
    pub async fn add(&self, index: u32, ip: IpAddr) -> Result<(), LinkError> {
        let prefix = if ip.is_ipv4() { 32 } else { 128 };
        self.handle
            .address()
            .add(index, ip, prefix)
            .replace()
            .execute()
            .await
            .map_err(|e| err(format!("add {ip} to {}", self.name), e))
    }

    /// Removes `ip` from the dummy interface.
    pub async fn del(&self, index: u32, ip: IpAddr) -> Result<(), LinkError> {
        let mut msgs = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .set_address_filter(ip)
            .execute();
        while let Some(m) = msgs
            .try_next()
            .await
            .map_err(|e| err(format!("find {ip} on {}", self.name), e))?
        {
            if address_of(&m) == Some(ip) && m.header.index == index {
                self.handle
                    .address()
                    .del(m)
                    .execute()
                    .await
                    .map_err(|e| err(format!("remove {ip} from {}", self.name), e))?;
            }
        }
        Ok(())
    }
}

fn address_of(m: &AddressMessage) -> Option<IpAddr> {
    // IFA_LOCAL is the interface's own address on point-to-point links; IFA_ADDRESS
    // otherwise (and always for IPv6).
    m.attributes
        .iter()
        .find_map(|a| match a {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        })
        .or_else(|| {
            m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })
        })
}
