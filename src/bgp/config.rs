//! The speaker's desired configuration: what confd computes from the datastore (REFERENCE
//! §6) and hands to the speaker on a `watch` channel. Tests build it by hand.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use super::update::{Attributes, RawAttr, code, flag};
use crate::model::AsNumber;
pub use crate::model::bgp::CommunityValue;

/// Why we peer with someone (Calico's peer types in `calicoctl node status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerType {
    NodeToNodeMesh,
    Global,
    NodeSpecific,
}

impl PeerType {
    /// The words of `calicoctl node status`.
    pub fn label(self) -> &'static str {
        match self {
            PeerType::NodeToNodeMesh => "node-to-node mesh",
            PeerType::Global => "global",
            PeerType::NodeSpecific => "node specific",
        }
    }
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
    /// Graceful-restart time we announce to this peer (seconds).
    pub graceful_restart_secs: u32,
    /// Source address of our connections (else the kernel's choice).
    pub local_address: Option<IpAddr>,
    /// RFC 5082 TTL security with this many hops.
    pub ttl_security: Option<u8>,
    /// Outgoing TTL for a peer more than one hop away.
    pub multihop: Option<u8>,
    /// Proposed hold time (seconds).
    pub hold_time: u16,
    /// Pass on the next hop of routes learned from iBGP peers instead of setting our own
    /// (always the case for reflected routes).
    pub keep_next_hop: bool,
}

impl DesiredPeer {
    /// A peer with Calico's defaults (port 179, hold 90 s, graceful restart 120 s).
    pub fn new(address: IpAddr, remote_as: u32, peer_type: PeerType) -> DesiredPeer {
        DesiredPeer {
            address,
            port: 179,
            remote_as: AsNumber(remote_as),
            peer_type,
            passive: false,
            rr_client: false,
            password: None,
            graceful_restart_secs: 120,
            local_address: None,
            ttl_security: None,
            multihop: None,
            hold_time: 90,
            keep_next_hop: false,
        }
    }
}

/// Which routes may be exported (REFERENCE §6): those inside `allowed` (enabled pools and
/// advertised service ranges) and not inside `denied` (pools with `disableBGPExport`); and
/// the communities added to exported routes inside a CIDR (BGPConfiguration
/// `prefixAdvertisements`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExportPolicy {
    pub allowed: Vec<IpNet>,
    pub denied: Vec<IpNet>,
    pub communities: Vec<(IpNet, Vec<CommunityValue>)>,
}

impl ExportPolicy {
    pub fn permits(&self, prefix: &IpNet) -> bool {
        self.allowed.iter().any(|p| p.contains(prefix))
            && !self.denied.iter().any(|p| p.contains(prefix))
    }

    /// Add the communities configured for `prefix` to `attrs` (each once; those the route
    /// already carries stay).
    /// (A set of those present, made once: routes may carry a thousand communities, and
    /// this runs for every route exported to every peer.)
    pub fn add_communities(&self, prefix: &IpNet, attrs: &mut Attributes) {
        let mut seen: Option<std::collections::HashSet<u32>> = None;
        for (net, values) in &self.communities {
            if !net.contains(prefix) {
                continue;
            }
            for v in values {
                match v {
                    CommunityValue::Standard(c) => {
                        let seen =
                            seen.get_or_insert_with(|| attrs.communities.iter().copied().collect());
                        if seen.insert(*c) {
                            attrs.communities.push(*c);
                        }
                    }
                    CommunityValue::Large(l) => add_large_community(attrs, l),
                }
            }
        }
    }
}

/// Add a large community (RFC 8092: 12 bytes, in an optional transitive attribute we keep
/// as bytes) unless the route has it.
fn add_large_community(attrs: &mut Attributes, l: &[u32; 3]) {
    let bytes: Vec<u8> = l.iter().flat_map(|p| p.to_be_bytes()).collect();
    match attrs
        .other
        .iter_mut()
        .find(|a| a.code == code::LARGE_COMMUNITIES)
    {
        Some(a) => {
            if !a.value.chunks(12).any(|c| c == bytes.as_slice()) {
                a.value.extend(bytes);
            }
        }
        None => attrs.other.push(RawAttr {
            flags: flag::OPTIONAL | flag::TRANSITIVE,
            code: code::LARGE_COMMUNITIES,
            value: bytes,
        }),
    }
}

/// The speaker's whole desired configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredBgpConfig {
    pub router_id: Ipv4Addr,
    pub local_as: AsNumber,
    /// Address and port to listen on (port 0: do not listen).
    pub listen_address: IpAddr,
    pub listen_port: u16,
    /// Set when this node is a route reflector.
    pub cluster_id: Option<Ipv4Addr>,
    pub peers: Vec<DesiredPeer>,
    /// Prefixes to originate (own blocks as aggregates, borrowed /32s).
    pub export: Vec<IpNet>,
    pub policy: ExportPolicy,
    /// Our IPv6 next hop for IPv6 routes (none: IPv6 routes are not exported).
    pub ipv6_next_hop: Option<Ipv6Addr>,
    /// The service ranges (BGPConfiguration): routes inside them are never programmed
    /// into the kernel. In `export` too unless this node is excluded from advertising.
    pub service_ranges: Vec<IpNet>,
    /// BGPConfiguration `ignoredInterfaces`: interfaces (or patterns) whose connected
    /// routes BIRD's `direct` protocol leaves out. Only the BIRD backend has such a
    /// protocol; the native speaker takes no connected routes at all.
    pub ignored_interfaces: Vec<String>,
}

impl DesiredBgpConfig {
    pub fn new(router_id: Ipv4Addr, local_as: u32) -> DesiredBgpConfig {
        DesiredBgpConfig {
            router_id,
            local_as: AsNumber(local_as),
            listen_address: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            listen_port: 179,
            cluster_id: None,
            peers: Vec::new(),
            export: Vec::new(),
            policy: ExportPolicy::default(),
            ipv6_next_hop: None,
            service_ranges: Vec::new(),
            ignored_interfaces: Vec::new(),
        }
    }
}
