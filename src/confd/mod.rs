//! confd: turns the datastore snapshot into the BGP speaker's desired configuration (and
//! optionally BIRD config files). The computation and actor arrive with the confd issue;
//! what exists now is the desired-config type the speaker will consume on a
//! `tokio::sync::watch` channel (DESIGN: datastore -> confd -> bgp).

use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;

use crate::model::AsNumber;

/// Why we peer with someone (Calico's peer types in `calicoctl node status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerType {
    NodeToNodeMesh,
    Global,
    NodeSpecific,
}

/// One BGP session the speaker should have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredPeer {
    pub address: IpAddr,
    pub port: u16,
    pub remote_as: AsNumber,
    pub peer_type: PeerType,
    /// Passive toward a peer whose IP is higher (Calico's collision avoidance).
    pub passive: bool,
    /// The peer is our route-reflector client.
    pub rr_client: bool,
    pub password: Option<String>,
    pub graceful_restart_secs: u32,
}

/// The speaker's whole desired configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredBgpConfig {
    pub router_id: Ipv4Addr,
    pub local_as: AsNumber,
    pub listen_port: u16,
    /// Set when this node is a route reflector.
    pub cluster_id: Option<Ipv4Addr>,
    pub peers: Vec<DesiredPeer>,
    /// Prefixes to originate (own blocks as aggregates, borrowed /32s).
    pub export: Vec<IpNet>,
}
