//! The calculation (pure): from what the syncer knows (Nodes, IPPools, this node's
//! WorkloadEndpoints, IPAM blocks, FelixConfiguration) and the BGP best routes, the
//! dataplane this node should have (REFERENCE §5). The reconcilers make the kernel match.
//!
//! Route sources, strongest first: local workloads (`dev caliX scope link`), blackholes for
//! this node's blocks, routes from the datastore for VXLAN pools (Calico's `vxlan` backend
//! needs no BGP), then BGP best paths for every other prefix, encapsulated per the pool that
//! contains it (NoEncap: via the node IP; IPIP: via the node IP dev tunl0; CrossSubnet:
//! direct when the next hop shares this node's subnet, else the tunnel).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};
use sha1::{Digest, Sha1};

use crate::model::felix::PROTO_FELIX;
use crate::model::ipam::AllocationBlock;
use crate::model::ippool::IPPoolSpec;
use crate::model::node::NodeSpec;
use crate::model::workload::WorkloadEndpointSpec;

pub const TUNL0: &str = "tunl0";
pub const VXLAN_DEV: &str = "vxlan.calico";

/// Where a route leaves by.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Dev {
    /// The interface that holds this node's IP (found by the route reconciler).
    Uplink,
    Named(String),
}

/// What a route does.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    Blackhole,
    /// `dev <if> scope link`: a local workload.
    Link(String),
    /// `via <gateway> dev <dev> onlink`.
    Via {
        gateway: IpAddr,
        dev: Dev,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Route {
    pub target: Target,
    pub protocol: u8,
}

/// A permanent neighbour entry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Neighbour {
    pub dev: String,
    pub ip: IpAddr,
    pub mac: [u8; 6],
}

/// A permanent FDB entry on vxlan.calico: a remote VTEP's MAC behind its node IP.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fdb {
    pub mac: [u8; 6],
    pub dst: IpAddr,
}

/// The IPIP device, wanted when a pool uses IPIP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipip {
    /// `Node.spec.bgp.ipv4IPIPTunnelAddr` (None until it is allocated).
    pub address: Option<Ipv4Addr>,
}

/// The VXLAN device, wanted when a pool uses VXLAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vxlan {
    pub vni: u32,
    pub port: u16,
    /// This node's IP: the source of the tunnel, and the parent interface's address.
    pub local: Option<Ipv4Addr>,
    pub mac: [u8; 6],
    /// `Node.spec.ipv4VXLANTunnelAddr` (None until it is allocated).
    pub address: Option<Ipv4Addr>,
}

/// NAT outgoing: traffic from `masquerade` pools to destinations outside `all` pools.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Nat {
    pub masquerade: BTreeSet<IpNet>,
    pub all: BTreeSet<IpNet>,
    /// SNAT to this address instead of masquerading.
    pub snat_to: Option<IpAddr>,
}

/// The dataplane this node should have.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    pub routes: RouteTable,
    pub neighbours: BTreeSet<Neighbour>,
    pub fdb: BTreeSet<Fdb>,
    pub ipip: Option<Ipip>,
    pub vxlan: Option<Vxlan>,
    pub nat: Nat,
    /// What could not be programmed, and why (for logs and readiness).
    pub problems: Vec<CalcProblem>,
}

/// Why part of the datastore's state cannot be programmed as it is; the rest of the
/// dataplane is. Each names the workload, or the destination and the node it is for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CalcProblem {
    /// A WorkloadEndpoint's `ipNetworks` entry that is not a CIDR (written by another
    /// tool): no route or neighbour for it.
    #[error("workload {interface}: ipNetworks entry {entry:?} is not a CIDR")]
    NotACidr { interface: String, entry: String },
    /// A block or borrowed address in a VXLAN pool belongs to a node the datastore does
    /// not hold (deleted, or not synced yet).
    #[error("{dst}: node {node} is not in the datastore")]
    UnknownNode { dst: IpNet, node: String },
    /// The node has no IPv4 address to route toward.
    #[error("{dst}: node {node} has no spec.bgp.ipv4Address")]
    NoNodeAddress { dst: IpNet, node: String },
    /// The node's VXLAN tunnel address is not allocated yet: no route through a tunnel
    /// that is not there.
    #[error("{dst}: node {node} has no spec.ipv4VXLANTunnelAddr yet")]
    NoVxlanTunnelAddress { dst: IpNet, node: String },
}

/// Felix settings the calculation uses (from FelixConfiguration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub vxlan_vni: u32,
    pub vxlan_port: u16,
    /// `deviceRouteProtocol` of local workload routes.
    pub device_route_protocol: u8,
    pub nat_outgoing_address: Option<IpAddr>,
    /// Service ranges (BGPConfiguration `default`): BGP routes inside them are not
    /// programmed (Calico's kernel filter rejects them; kube-proxy owns those addresses).
    pub service_ranges: Vec<IpNet>,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            vxlan_vni: 4096,
            vxlan_port: 4789,
            device_route_protocol: 3,
            nat_outgoing_address: None,
            service_ranges: Vec::new(),
        }
    }
}

/// Everything the calculation reads.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// This node's name.
    pub node: &'a str,
    /// Nodes by name.
    pub nodes: &'a BTreeMap<String, NodeSpec>,
    /// IP pools, workload endpoints (this node's) and IPAM blocks (all), each by key.
    pub pools: &'a BTreeMap<String, IPPoolSpec>,
    pub workloads: &'a BTreeMap<String, WorkloadEndpointSpec>,
    pub blocks: &'a BTreeMap<String, AllocationBlock>,
    /// BGP best paths: prefix to next hop.
    pub bgp: &'a BgpTable,
    pub settings: &'a Settings,
}

/// BGP's best paths: prefix to next hop (a hash map: a million entries are updated one by
/// one as BGP learns them).
pub type BgpTable = crate::prefix_map::FastMap<IpNet, IpAddr>;

/// Desired routes by prefix.
pub type RouteTable = crate::prefix_map::FastMap<IpNet, Route>;

use crate::model::ippool::{Encap, encap};

/// A node's VTEP MAC: `vxlanTunnelMACAddr`, or derived from its name when empty
/// (0x66, then the first five bytes of SHA1 of the name).
pub fn vtep_mac(name: &str, spec: &NodeSpec) -> [u8; 6] {
    if let Some(m) = spec.vxlan_tunnel_mac_addr.as_deref().and_then(parse_mac) {
        return m;
    }
    let d = Sha1::digest(name.as_bytes());
    [0x66, d[0], d[1], d[2], d[3], d[4]]
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// A node's IPv4 address and its subnet (`spec.bgp.ipv4Address`, a CIDR).
fn node_ip(spec: &NodeSpec) -> Option<Ipv4Net> {
    let s = spec.bgp.as_ref()?.ipv4_address.as_deref()?;
    s.parse::<Ipv4Net>()
        .ok()
        .or_else(|| s.parse::<Ipv4Addr>().ok().map(Ipv4Net::from))
}

fn ipv4(s: Option<&str>) -> Option<Ipv4Addr> {
    let s = s?;
    s.parse()
        .ok()
        .or_else(|| s.parse::<Ipv4Net>().ok().map(|n| n.addr()))
}

/// The most specific pool containing `net`.
fn pool_of<'a>(pools: &'a BTreeMap<String, IPPoolSpec>, net: &IpNet) -> Option<&'a IPPoolSpec> {
    pools
        .values()
        .filter(|p| p.net().is_some_and(|n| n.contains(net)))
        .max_by_key(|p| p.net().map_or(0, |n| n.prefix_len()))
}

/// How BGP's best paths become routes (step 4 of [`calculate`]), also for one prefix at a
/// time when only BGP changed.
pub struct BgpRoutes<'a> {
    pools: &'a BTreeMap<String, IPPoolSpec>,
    my_ip: Option<Ipv4Net>,
    services: &'a [IpNet],
}

impl<'a> BgpRoutes<'a> {
    pub fn new(input: &Input<'a>) -> BgpRoutes<'a> {
        BgpRoutes {
            pools: input.pools,
            my_ip: input.nodes.get(input.node).and_then(node_ip),
            services: &input.settings.service_ranges,
        }
    }

    /// The route for a best path; None inside a VXLAN pool (those routes come from the
    /// datastore) or a service range.
    pub fn route(&self, prefix: &IpNet, next_hop: &IpAddr) -> Option<Route> {
        if self.services.iter().any(|s| s.contains(prefix)) {
            return None;
        }
        let same_subnet = match (next_hop, self.my_ip) {
            (IpAddr::V4(a), Some(net)) => net.contains(a),
            _ => false,
        };
        let target = match pool_of(self.pools, prefix).map_or(Encap::None, encap) {
            Encap::Vxlan { .. } => return None,
            Encap::Ipip { cross_subnet } if !(cross_subnet && same_subnet) => Target::Via {
                gateway: *next_hop,
                dev: Dev::Named(TUNL0.into()),
            },
            _ => Target::Via {
                gateway: *next_hop,
                dev: Dev::Uplink,
            },
        };
        Some(Route {
            target,
            protocol: PROTO_FELIX,
        })
    }

    /// Whether `prefix` lies in a VXLAN pool.
    pub fn in_vxlan_pool(&self, prefix: &IpNet) -> bool {
        matches!(
            pool_of(self.pools, prefix).map(encap),
            Some(Encap::Vxlan { .. })
        )
    }
}

/// Compute the desired dataplane.
pub fn calculate(input: &Input) -> Desired {
    let mut d = Desired::default();
    let me = input.nodes.get(input.node);
    let my_ip = me.and_then(node_ip);
    let same_subnet = |ip: &IpAddr| match (ip, my_ip) {
        (IpAddr::V4(a), Some(net)) => net.contains(a),
        _ => false,
    };
    let felix_route = |target| Route {
        target,
        protocol: PROTO_FELIX,
    };

    // 1. Local workloads.
    for w in input.workloads.values() {
        let mac = parse_mac(&w.mac);
        for n in &w.ip_networks {
            let Ok(net) = n.parse::<IpNet>() else {
                d.problems.push(CalcProblem::NotACidr {
                    interface: w.interface_name.clone(),
                    entry: n.clone(),
                });
                continue;
            };
            d.routes.insert(
                net,
                Route {
                    target: Target::Link(w.interface_name.clone()),
                    protocol: input.settings.device_route_protocol,
                },
            );
            if let Some(mac) = mac {
                d.neighbours.insert(Neighbour {
                    dev: w.interface_name.clone(),
                    ip: net.addr(),
                    mac,
                });
            }
        }
    }

    // 2. This node's blocks.
    for b in input.blocks.values().filter(|b| !b.deleted) {
        if b.host() == Some(input.node)
            && let Ok(net) = b.cidr.parse::<IpNet>()
        {
            d.routes
                .entry(net)
                .or_insert_with(|| felix_route(Target::Blackhole));
        }
    }

    // 3. VXLAN pools, from the datastore: other nodes' blocks, and addresses borrowed by
    // other nodes (also from this node's blocks).
    let vxlan_wanted = input
        .pools
        .values()
        .any(|p| matches!(encap(p), Encap::Vxlan { .. }));
    let toward = |d: &mut Desired, dst: IpNet, node: &str, cross_subnet: bool| {
        let Some(spec) = input.nodes.get(node) else {
            d.problems.push(CalcProblem::UnknownNode {
                dst,
                node: node.to_string(),
            });
            return;
        };
        let Some(ip) = node_ip(spec) else {
            d.problems.push(CalcProblem::NoNodeAddress {
                dst,
                node: node.to_string(),
            });
            return;
        };
        let node_addr = IpAddr::V4(ip.addr());
        let target = if cross_subnet && same_subnet(&node_addr) {
            Target::Via {
                gateway: node_addr,
                dev: Dev::Uplink,
            }
        } else {
            let Some(tunnel) = ipv4(spec.ipv4_vxlan_tunnel_addr.as_deref()) else {
                d.problems.push(CalcProblem::NoVxlanTunnelAddress {
                    dst,
                    node: node.to_string(),
                });
                return;
            };
            Target::Via {
                gateway: IpAddr::V4(tunnel),
                dev: Dev::Named(VXLAN_DEV.into()),
            }
        };
        d.routes.entry(dst).or_insert_with(|| felix_route(target));
    };
    for b in input.blocks.values().filter(|b| !b.deleted) {
        let Ok(net) = b.cidr.parse::<IpNet>() else {
            continue;
        };
        let Some(Encap::Vxlan { cross_subnet }) = pool_of(input.pools, &net).map(encap) else {
            continue;
        };
        if !net.addr().is_ipv4() {
            continue;
        }
        if let Some(host) = b.host()
            && host != input.node
        {
            toward(&mut d, net, host, cross_subnet);
        }
        for (ip, node) in b.borrowed() {
            if node != input.node {
                toward(&mut d, ip, &node, cross_subnet);
            }
        }
    }

    // 4. BGP best paths for everything else.
    let bgp = BgpRoutes::new(input);
    for (prefix, next_hop) in input.bgp {
        if let Some(r) = bgp.route(prefix, next_hop) {
            d.routes.entry(*prefix).or_insert(r);
        }
    }

    // 5. Tunnel devices, and what VXLAN needs per remote node.
    if input
        .pools
        .values()
        .any(|p| matches!(encap(p), Encap::Ipip { .. }))
    {
        d.ipip = Some(Ipip {
            address: me.and_then(|m| ipv4(m.bgp.as_ref()?.ipv4_ipip_tunnel_addr.as_deref())),
        });
    }
    if vxlan_wanted {
        d.vxlan = Some(Vxlan {
            vni: input.settings.vxlan_vni,
            port: input.settings.vxlan_port,
            local: my_ip.map(|n| n.addr()),
            mac: me.map_or([0; 6], |m| vtep_mac(input.node, m)),
            address: me.and_then(|m| ipv4(m.ipv4_vxlan_tunnel_addr.as_deref())),
        });
        // Every other node with a VTEP gets its ARP and FDB entries (not only those a
        // route uses now: a block can move to a node at any time).
        for (name, spec) in input.nodes {
            if name == input.node {
                continue;
            }
            let (Some(ip), Some(tunnel)) =
                (node_ip(spec), ipv4(spec.ipv4_vxlan_tunnel_addr.as_deref()))
            else {
                continue;
            };
            let mac = vtep_mac(name, spec);
            d.neighbours.insert(Neighbour {
                dev: VXLAN_DEV.into(),
                ip: IpAddr::V4(tunnel),
                mac,
            });
            d.fdb.insert(Fdb {
                mac,
                dst: IpAddr::V4(ip.addr()),
            });
        }
    }

    // 6. NAT outgoing.
    for p in input.pools.values() {
        let Some(net) = p.net() else { continue };
        d.nat.all.insert(net);
        if p.nat_outgoing {
            d.nat.masquerade.insert(net);
        }
    }
    d.nat.snat_to = input.settings.nat_outgoing_address;
    d
}

#[cfg(test)]
#[path = "calc_tests.rs"]
mod tests;
