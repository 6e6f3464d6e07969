//! confd's pure core: the syncer's updates folded into the tables BGP needs, and the
//! speaker's desired configuration computed from them (REFERENCE §6).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use crate::bgp::config::{DesiredBgpConfig, DesiredPeer, PeerType};
use crate::datastore::syncer::{SyncStatus, SyncValue, SyncerEvent, UpdateType};
use crate::model::bgp::{BGPConfigurationSpec, BGPPeerSpec, EXCLUDE_FROM_SERVICES_LABEL};
use crate::model::ipam::AllocationBlock;
use crate::model::ippool::IPPoolSpec;
use crate::model::node::NodeSpec;
use crate::model::selector::Selector;
use crate::model::{AnyResource, validate};

/// Calico's AS when neither the node nor BGPConfiguration `default` sets one.
pub const DEFAULT_AS: u32 = 64512;
/// Graceful-restart time when none is configured (seconds).
pub const DEFAULT_RESTART_SECS: u32 = 120;

/// A node as confd needs it: its spec and labels (for selectors).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeView {
    pub spec: NodeSpec,
    pub labels: BTreeMap<String, String>,
}

/// What confd knows of the cluster.
#[derive(Debug, Clone, Default)]
pub struct ConfdState {
    node: String,
    node_keys: BTreeMap<String, String>,
    nodes: BTreeMap<String, NodeView>,
    /// BGPConfiguration `default` and `node.<this node>`.
    global: Option<BGPConfigurationSpec>,
    per_node: Option<BGPConfigurationSpec>,
    /// BGPPeers by name.
    peers: BTreeMap<String, BGPPeerSpec>,
    peer_keys: BTreeMap<String, String>,
    pools: BTreeMap<String, IPPoolSpec>,
    blocks: BTreeMap<String, AllocationBlock>,
    pub in_sync: bool,
}

/// Why this node cannot run BGP yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotReady(pub String);

impl std::fmt::Display for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl ConfdState {
    pub fn new(node: &str) -> ConfdState {
        ConfdState {
            node: node.to_string(),
            ..Default::default()
        }
    }

    /// Fold one syncer event in; true when it can change the desired configuration.
    pub fn apply(&mut self, ev: &SyncerEvent) -> bool {
        match ev {
            SyncerEvent::Status(s) => {
                let was = self.in_sync;
                self.in_sync = *s == SyncStatus::InSync;
                self.in_sync != was
            }
            SyncerEvent::Update(u) => match (&u.update_type, u.value.as_deref()) {
                (UpdateType::Deleted, _) | (_, None) => self.forget(&u.key),
                (_, Some(v)) => self.store(&u.key, v),
            },
        }
    }

    fn forget(&mut self, key: &str) -> bool {
        let mut gone = self.pools.remove(key).is_some() | self.blocks.remove(key).is_some();
        if let Some(name) = self.node_keys.remove(key) {
            gone |= self.nodes.remove(&name).is_some();
        }
        if let Some(name) = self.peer_keys.remove(key) {
            gone |= self.peers.remove(&name).is_some();
        }
        if key.ends_with("/bgpconfigurations/default") {
            gone |= self.global.take().is_some();
        }
        if key.ends_with(&format!("/bgpconfigurations/node.{}", self.node)) {
            gone |= self.per_node.take().is_some();
        }
        gone
    }

    fn store(&mut self, key: &str, value: &SyncValue) -> bool {
        fn put<V: PartialEq>(map: &mut BTreeMap<String, V>, k: &str, v: V) -> bool {
            let old = map.insert(k.to_string(), v);
            old.as_ref() != map.get(k)
        }
        match value {
            SyncValue::Block(b) => put(&mut self.blocks, key, b.clone()),
            SyncValue::Resource(AnyResource::IPPool(p)) => {
                put(&mut self.pools, key, p.spec.clone())
            }
            SyncValue::Resource(AnyResource::Node(n)) => {
                let name = n.metadata.name.clone();
                self.node_keys.insert(key.to_string(), name.clone());
                let view = NodeView {
                    spec: n.spec.clone(),
                    labels: n.metadata.labels.clone(),
                };
                put(&mut self.nodes, &name, view)
            }
            SyncValue::Resource(AnyResource::BGPPeer(p)) => {
                let name = p.metadata.name.clone();
                self.peer_keys.insert(key.to_string(), name.clone());
                put(&mut self.peers, &name, p.spec.clone())
            }
            SyncValue::Resource(AnyResource::BGPConfiguration(c)) => {
                let slot = if c.metadata.name == "default" {
                    &mut self.global
                } else if c.metadata.name == format!("node.{}", self.node) {
                    &mut self.per_node
                } else {
                    return false;
                };
                slot.replace(c.spec.clone()).as_ref() != Some(&c.spec)
            }
            _ => false,
        }
    }

    /// The speaker's desired configuration, or why BGP cannot run on this node yet.
    pub fn desired(&self) -> Result<Desired, NotReady> {
        desired(&Input {
            node: &self.node,
            nodes: &self.nodes,
            global: self.global.as_ref(),
            per_node: self.per_node.as_ref(),
            peers: &self.peers,
            pools: &self.pools,
            blocks: &self.blocks,
        })
    }
}

/// The tables the calculation reads.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    pub node: &'a str,
    pub nodes: &'a BTreeMap<String, NodeView>,
    pub global: Option<&'a BGPConfigurationSpec>,
    pub per_node: Option<&'a BGPConfigurationSpec>,
    /// BGPPeers by name.
    pub peers: &'a BTreeMap<String, BGPPeerSpec>,
    pub pools: &'a BTreeMap<String, IPPoolSpec>,
    pub blocks: &'a BTreeMap<String, AllocationBlock>,
}

/// The desired configuration and what of the datastore could not be expressed.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub config: DesiredBgpConfig,
    /// One line per thing ignored (a peer without a usable address, a password held in a
    /// Kubernetes secret, ...).
    pub problems: Vec<String>,
    /// Pools whose routes come from BGP into the kernel (all but VXLAN pools, which Felix
    /// programs from the datastore): what a BIRD backend programs.
    pub kernel_pools: Vec<IpNet>,
}

fn node_ipv4(spec: &NodeSpec) -> Option<Ipv4Addr> {
    let s = spec.ipv4_address()?;
    s.parse()
        .ok()
        .or_else(|| s.parse::<ipnet::Ipv4Net>().ok().map(|n| n.addr()))
}

fn node_ipv6(spec: &NodeSpec) -> Option<Ipv6Addr> {
    let s = spec.bgp.as_ref()?.ipv6_address.as_deref()?;
    s.parse()
        .ok()
        .or_else(|| s.parse::<ipnet::Ipv6Net>().ok().map(|n| n.addr()))
}

fn cluster_id(spec: &NodeSpec) -> Option<Ipv4Addr> {
    spec.bgp
        .as_ref()?
        .route_reflector_cluster_id
        .as_deref()
        .filter(|s| !s.is_empty())?
        .parse()
        .ok()
}

fn restart_secs(field: &str, v: Option<&str>, problems: &mut Vec<String>) -> u32 {
    match v.filter(|s| !s.is_empty()) {
        None => DEFAULT_RESTART_SECS,
        Some(s) => match validate::duration(field, s) {
            Ok(d) => u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX),
            Err(e) => {
                problems.push(format!("{e}; using {DEFAULT_RESTART_SECS}s"));
                DEFAULT_RESTART_SECS
            }
        },
    }
}

/// Compute the speaker's configuration for `input.node`.
pub fn desired(input: &Input) -> Result<Desired, NotReady> {
    let me = input.nodes.get(input.node).ok_or_else(|| {
        NotReady(format!(
            "node {} is not registered in the datastore",
            input.node
        ))
    })?;
    let my_ip = node_ipv4(&me.spec).ok_or_else(|| {
        NotReady(format!(
            "node {} has no IPv4 address (spec.bgp.ipv4Address), which BGP needs as router ID",
            input.node
        ))
    })?;
    let mut problems = Vec::new();
    let global_as = input
        .global
        .and_then(|g| g.as_number)
        .map_or(DEFAULT_AS, |a| a.0);
    let as_of = |spec: &NodeSpec| {
        spec.bgp
            .as_ref()
            .and_then(|b| b.as_number)
            .map_or(global_as, |a| a.0)
    };
    let local_as = as_of(&me.spec);
    let my_cluster = cluster_id(&me.spec);
    let mut cfg = DesiredBgpConfig::new(my_ip, local_as);
    cfg.cluster_id = my_cluster;
    cfg.ipv6_next_hop = node_ipv6(&me.spec);
    cfg.listen_port = input
        .per_node
        .and_then(|c| c.listen_port)
        .or_else(|| input.global.and_then(|g| g.listen_port))
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or(179);
    let bind_node_ip = input
        .per_node
        .and_then(|c| c.bind_mode.as_deref())
        .or_else(|| input.global.and_then(|g| g.bind_mode.as_deref()))
        == Some("NodeIP");
    if bind_node_ip {
        cfg.listen_address = IpAddr::V4(my_ip);
    }

    // Explicit peers first (node-specific, then global), then the mesh: the first
    // session configured for an address wins.
    let mut peers: Vec<DesiredPeer> = Vec::new();
    let mut seen: BTreeSet<IpAddr> = BTreeSet::from([IpAddr::V4(my_ip)]);
    let mut explicit: Vec<(PeerType, &String, &BGPPeerSpec)> = input
        .peers
        .iter()
        .filter_map(|(name, p)| {
            let global = p.node.is_empty() && p.node_selector.is_empty();
            let applies = global
                || p.node == input.node
                || (!p.node_selector.is_empty()
                    && Selector::parse(&p.node_selector).is_ok_and(|s| s.matches(&me.labels)));
            let kind = if global {
                PeerType::Global
            } else {
                PeerType::NodeSpecific
            };
            applies.then_some((kind, name, p))
        })
        .collect();
    explicit.sort_by_key(|(kind, name, _)| (*kind != PeerType::NodeSpecific, *name));
    for (kind, name, p) in explicit {
        // (address, port, AS, cluster ID of the peer when it is one of our nodes)
        let mut targets: Vec<(IpAddr, Option<u16>, u32, Option<Ipv4Addr>)> = Vec::new();
        if !p.peer_ip.is_empty() {
            let Some((ip, port)) = p.peer_addr() else {
                problems.push(format!(
                    "BGPPeer {name}: peerIP {:?} is not an address; skipped",
                    p.peer_ip
                ));
                continue;
            };
            let Some(asn) = p.as_number else {
                problems.push(format!("BGPPeer {name}: asNumber is missing; skipped"));
                continue;
            };
            let node = input
                .nodes
                .values()
                .find(|n| node_ipv4(&n.spec).map(IpAddr::V4) == Some(ip));
            targets.push((ip, port, asn.0, node.and_then(|n| cluster_id(&n.spec))));
        } else if !p.peer_selector.is_empty() {
            let Ok(sel) = Selector::parse(&p.peer_selector) else {
                problems.push(format!(
                    "BGPPeer {name}: peerSelector does not parse; skipped"
                ));
                continue;
            };
            for (other, n) in input.nodes {
                if other == input.node || !sel.matches(&n.labels) {
                    continue;
                }
                if let Some(ip) = node_ipv4(&n.spec) {
                    targets.push((IpAddr::V4(ip), None, as_of(&n.spec), cluster_id(&n.spec)));
                }
            }
        }
        if p.password.is_some() {
            problems.push(format!(
                "BGPPeer {name}: password refers to a Kubernetes secret, which an etcd datastore cannot resolve; the session runs without MD5"
            ));
        }
        let source = match p.source_address.as_deref() {
            Some("None") => None,
            _ => Some(IpAddr::V4(my_ip)),
        };
        let restart = restart_secs(
            &format!("BGPPeer {name} spec.maxRestartTime"),
            p.max_restart_time.as_deref(),
            &mut problems,
        );
        for (ip, port, asn, their_cluster) in targets {
            if !seen.insert(ip) {
                continue;
            }
            let mut d = DesiredPeer::new(ip, asn, kind);
            if let Some(port) = port {
                d.port = port;
            }
            d.rr_client = my_cluster.is_some() && asn == local_as && their_cluster != my_cluster;
            d.keep_next_hop = p.keep_original_next_hop;
            d.ttl_security = p.ttl_security.filter(|t| *t > 0);
            d.graceful_restart_secs = restart;
            d.local_address = source.filter(|s| s.is_ipv4() == ip.is_ipv4());
            peers.push(d);
        }
    }

    let mesh = input.global.is_none_or(|g| g.mesh_enabled()) && my_cluster.is_none();
    if mesh {
        let restart = restart_secs(
            "BGPConfiguration default spec.nodeMeshMaxRestartTime",
            input
                .global
                .and_then(|g| g.node_mesh_max_restart_time.as_deref()),
            &mut problems,
        );
        if input.global.is_some_and(|g| g.node_mesh_password.is_some()) {
            problems.push(
                "BGPConfiguration default: nodeMeshPassword refers to a Kubernetes secret, which an etcd datastore cannot resolve; the mesh runs without MD5".into(),
            );
        }
        for (name, n) in input.nodes {
            if name == input.node || cluster_id(&n.spec).is_some() {
                continue;
            }
            let Some(ip) = node_ipv4(&n.spec) else {
                continue;
            };
            if !seen.insert(IpAddr::V4(ip)) {
                continue;
            }
            let mut d = DesiredPeer::new(IpAddr::V4(ip), as_of(&n.spec), PeerType::NodeToNodeMesh);
            // One side connects: the node with the lower address.
            d.passive = ip > my_ip;
            d.graceful_restart_secs = restart;
            d.local_address = Some(IpAddr::V4(my_ip));
            peers.push(d);
        }
    }
    cfg.peers = peers;

    // Export: enabled pools, minus those with disableBGPExport; our affine blocks as
    // aggregates, and the addresses we borrowed from other nodes' blocks as host routes.
    for p in input.pools.values() {
        let Some(net) = p.net() else { continue };
        if !p.disabled {
            cfg.policy.allowed.push(net);
        }
        if p.disable_bgp_export {
            cfg.policy.denied.push(net);
        }
    }
    let mut export: BTreeSet<IpNet> = BTreeSet::new();
    for b in input.blocks.values() {
        if b.deleted {
            continue;
        }
        if b.host() == Some(input.node) {
            if let Ok(net) = b.cidr.parse::<IpNet>() {
                export.insert(net);
            }
        } else {
            export.extend(
                b.borrowed()
                    .into_iter()
                    .filter(|(_, n)| n == input.node)
                    .map(|(ip, _)| ip),
            );
        }
    }
    cfg.export = export
        .into_iter()
        .filter(|n| cfg.policy.permits(n))
        .collect();
    // Service ranges: every node originates them (and passes on routes inside them),
    // except a node labelled out of load balancing. Their routes are not programmed into
    // the kernel (Felix, or the rendered BIRD's kernel filter, leaves them out).
    let excluded = me
        .labels
        .get(EXCLUDE_FROM_SERVICES_LABEL)
        .is_some_and(|v| v == "true");
    let services = input.global.map(|g| g.service_ranges()).unwrap_or_default();
    if !excluded {
        for net in &services {
            cfg.policy.allowed.push(*net);
            cfg.export.push(*net);
        }
    }
    cfg.service_ranges = services;
    cfg.ignored_interfaces = input
        .global
        .map(|g| g.ignored_interfaces.clone())
        .unwrap_or_default();
    // Communities on exported routes: the node's BGPConfiguration's prefixAdvertisements
    // when it has some, else the global ones.
    cfg.policy.communities = input
        .per_node
        .filter(|c| !c.prefix_advertisements.is_empty())
        .or(input.global)
        .map(|c| c.prefix_communities())
        .unwrap_or_default();
    if cfg.ipv6_next_hop.is_none() {
        cfg.export.retain(|n| n.addr().is_ipv4());
    }
    let kernel_pools = input
        .pools
        .values()
        .filter(|p| {
            !matches!(
                crate::felix::calc::encap(p),
                crate::felix::calc::Encap::Vxlan { .. }
            )
        })
        .filter_map(|p| p.net())
        .collect();
    Ok(Desired {
        config: cfg,
        problems,
        kernel_pools,
    })
}
