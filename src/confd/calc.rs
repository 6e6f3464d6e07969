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

/// Why this node cannot run BGP yet (the readiness reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    /// This node's Node resource is not in the datastore (yet).
    #[error("node {node} is not registered in the datastore")]
    NotRegistered { node: String },
    /// BGP needs the node's IPv4 address as its router ID.
    #[error("node {node} has no IPv4 address (spec.bgp.ipv4Address), which BGP needs as router ID")]
    NoIpv4Address { node: String },
}

/// Something of the datastore the BGP configuration leaves out, or runs without (a
/// warning each, and BGP runs with the rest). Each names the resource and its field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigProblem {
    /// A graceful-restart time (`maxRestartTime`, `nodeMeshMaxRestartTime`) that is not a
    /// duration: Calico's default is used.
    #[error("{error}; using {DEFAULT_RESTART_SECS}s")]
    RestartTime { error: validate::ValidationError },
    /// A BGPPeer selector (`nodeSelector`, `peerSelector`) written by another tool that
    /// does not parse: the BGPPeer is skipped in both directions.
    #[error("BGPPeer {peer}: {field} does not parse ({error}); skipped")]
    Selector {
        peer: String,
        field: &'static str,
        error: crate::model::selector::SelectorError,
    },
    /// A BGPPeer whose `peerIP` is not an address (with an optional port).
    #[error("BGPPeer {peer}: peerIP {peer_ip:?} is not an address; skipped")]
    PeerIp { peer: String, peer_ip: String },
    /// A BGPPeer with a `peerIP` and no `asNumber`.
    #[error("BGPPeer {peer}: asNumber is missing; skipped")]
    NoAsNumber { peer: String },
    /// A BGPPeer `password` (a Kubernetes secret reference) an etcd datastore cannot
    /// resolve.
    #[error(
        "BGPPeer {peer}: password refers to a Kubernetes secret, which an etcd datastore cannot resolve; the session runs without MD5"
    )]
    PeerPassword { peer: String },
    /// The mesh's `nodeMeshPassword`, likewise.
    #[error(
        "BGPConfiguration default: nodeMeshPassword refers to a Kubernetes secret, which an etcd datastore cannot resolve; the mesh runs without MD5"
    )]
    MeshPassword,
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
    pub problems: Vec<ConfigProblem>,
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

fn restart_secs(field: &str, v: Option<&str>, problems: &mut Vec<ConfigProblem>) -> u32 {
    match v.filter(|s| !s.is_empty()) {
        None => DEFAULT_RESTART_SECS,
        Some(s) => match validate::duration(field, s) {
            Ok(d) => u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX),
            Err(e) => {
                problems.push(ConfigProblem::RestartTime { error: e });
                DEFAULT_RESTART_SECS
            }
        },
    }
}

/// This node as the peer calculation sees it.
struct Local<'a> {
    input: &'a Input<'a>,
    me: &'a NodeView,
    my_ip: Ipv4Addr,
    my_ip6: Option<Ipv6Addr>,
    local_as: u32,
    global_as: u32,
    my_cluster: Option<Ipv4Addr>,
    /// The port we listen on (this node's BGPConfiguration, else the global one, else 179).
    listen_port: u16,
}

/// A node's AS: its own, else BGPConfiguration's (`global_as`, itself 64512 by default).
fn node_as(spec: &NodeSpec, global_as: u32) -> u32 {
    spec.bgp
        .as_ref()
        .and_then(|b| b.as_number)
        .map_or(global_as, |a| a.0)
}

impl Local<'_> {
    fn as_of(&self, spec: &NodeSpec) -> u32 {
        node_as(spec, self.global_as)
    }

    /// Our address in `peer`'s family: the source of sessions with `sourceAddress:
    /// UseNodeIP` (Calico uses the node's IPv4 address for IPv4 peers, its IPv6 address
    /// for IPv6 peers).
    fn source_for(&self, peer: IpAddr) -> Option<IpAddr> {
        match peer {
            IpAddr::V4(_) => Some(IpAddr::V4(self.my_ip)),
            IpAddr::V6(_) => self.my_ip6.map(IpAddr::V6),
        }
    }

    /// Whether `ip` is one of this node's BGP addresses.
    fn is_mine(&self, ip: IpAddr) -> bool {
        ip == IpAddr::V4(self.my_ip) || Some(ip) == self.my_ip6.map(IpAddr::V6)
    }
}

/// A BGPPeer with its selectors parsed once, for both directions.
struct PeerRule<'a> {
    name: &'a str,
    spec: &'a BGPPeerSpec,
    node_selector: Option<Selector>,
    peer_selector: Option<Selector>,
}

impl PeerRule<'_> {
    /// Global BGPPeers (neither `node` nor `nodeSelector`) apply to every node.
    fn kind(&self) -> PeerType {
        if self.spec.node.is_empty() && self.spec.node_selector.is_empty() {
            PeerType::Global
        } else {
            PeerType::NodeSpecific
        }
    }

    /// Whether the local side (`node`, `nodeSelector`, else every node) selects `node`.
    fn local_side_selects(&self, node: &str, labels: &BTreeMap<String, String>) -> bool {
        match &self.node_selector {
            Some(sel) => sel.matches(labels),
            None => self.spec.node.is_empty() || self.spec.node == node,
        }
    }
}

/// The BGPPeers whose selectors parse, by name; one problem for each that does not.
fn peer_rules<'a>(
    peers: &'a BTreeMap<String, BGPPeerSpec>,
    problems: &mut Vec<ConfigProblem>,
) -> Vec<PeerRule<'a>> {
    let mut rules = Vec::new();
    for (name, spec) in peers {
        let parse = |field: &'static str, text: &str, problems: &mut Vec<ConfigProblem>| {
            if text.is_empty() {
                return Ok(None);
            }
            Selector::parse(text).map(Some).map_err(|error| {
                problems.push(ConfigProblem::Selector {
                    peer: name.to_string(),
                    field,
                    error,
                });
            })
        };
        let Ok(node_selector) = parse("nodeSelector", &spec.node_selector, problems) else {
            continue;
        };
        let Ok(peer_selector) = parse("peerSelector", &spec.peer_selector, problems) else {
            continue;
        };
        rules.push(PeerRule {
            name,
            spec,
            node_selector,
            peer_selector,
        });
    }
    rules
}

/// One session a BGPPeer yields: the peer's address, port (none: 179), AS, and its
/// route-reflector cluster ID when it is one of our nodes.
#[derive(Debug, Clone, Copy)]
struct Target {
    ip: IpAddr,
    port: Option<u16>,
    asn: u32,
    cluster: Option<Ipv4Addr>,
}

/// The sessions a BGPPeer whose local side selects this node asks for: its `peerIP`, or
/// every other node its `peerSelector` matches (over IPv4: that session carries IPv6
/// routes too when the nodes have IPv6 addresses).
fn forward_targets(
    local: &Local,
    rule: &PeerRule,
    problems: &mut Vec<ConfigProblem>,
) -> Vec<Target> {
    let (name, p) = (rule.name, rule.spec);
    if let Some(sel) = &rule.peer_selector {
        return local
            .input
            .nodes
            .iter()
            .filter(|(other, n)| *other != local.input.node && sel.matches(&n.labels))
            .filter_map(|(_, n)| {
                Some(Target {
                    ip: IpAddr::V4(node_ipv4(&n.spec)?),
                    port: None,
                    asn: local.as_of(&n.spec),
                    cluster: cluster_id(&n.spec),
                })
            })
            .collect();
    }
    if p.peer_ip.is_empty() {
        return Vec::new();
    }
    let Some((ip, port)) = p.peer_addr() else {
        problems.push(ConfigProblem::PeerIp {
            peer: name.to_string(),
            peer_ip: p.peer_ip.clone(),
        });
        return Vec::new();
    };
    let Some(asn) = p.as_number else {
        problems.push(ConfigProblem::NoAsNumber {
            peer: name.to_string(),
        });
        return Vec::new();
    };
    let node = local.input.nodes.values().find(|n| {
        node_ipv4(&n.spec).map(IpAddr::V4) == Some(ip)
            || node_ipv6(&n.spec).map(IpAddr::V6) == Some(ip)
    });
    vec![Target {
        ip,
        port,
        asn: asn.0,
        cluster: node.and_then(|n| cluster_id(&n.spec)),
    }]
}

/// Calico's automatic reverse peering (confd `updatePeersV1`, its second pass over
/// BGPPeers): when a BGPPeer's remote side selects this node (its `peerSelector`
/// matches our labels, or its `peerIP` is our address with its `asNumber` our AS and its
/// port, if any, the one we listen on), we peer back with every other node its local side
/// selects (`node`, `nodeSelector`, else all nodes), so that the documented route
/// reflector set-up, one BGPPeer `{nodeSelector: all(), peerSelector: route-reflector ==
/// 'true'}`, gives the reflectors their clients. `reversePeering: Manual` turns it off;
/// peerings toward workloads (`localWorkloadSelector`) are reversed by the workload.
///
/// Families: a `peerIP` peering is reversed over its own family only (an IPv6 peerIP,
/// toward the other nodes' IPv6 addresses). A `peerSelector` peering is reversed as it is
/// made, over IPv4: Calico also adds an IPv6 session because BIRD and BIRD6 each need
/// their own, while here the IPv4 session carries IPv6 routes as well (REFERENCE §6), and
/// an IPv6 reverse session would have no forward session to meet.
fn reverse_targets(local: &Local, rule: &PeerRule) -> Vec<Target> {
    let p = rule.spec;
    if !p.automatic_reverse_peering() || !p.local_workload_selector.is_empty() {
        return Vec::new();
    }
    let (v4, v6) = if let Some(sel) = &rule.peer_selector {
        if !sel.matches(&local.me.labels) {
            return Vec::new();
        }
        (true, false)
    } else {
        let Some(((ip, port), asn)) = p.peer_addr().zip(p.as_number) else {
            return Vec::new();
        };
        let our_port = port.is_none_or(|port| port == local.listen_port);
        if !local.is_mine(ip) || asn.0 != local.local_as || !our_port {
            return Vec::new();
        }
        (ip.is_ipv4(), ip.is_ipv6())
    };
    let mut targets = Vec::new();
    for (other, n) in local.input.nodes {
        if other == local.input.node || !rule.local_side_selects(other, &n.labels) {
            continue;
        }
        let v4 = node_ipv4(&n.spec).filter(|_| v4).map(IpAddr::V4);
        let v6 = node_ipv6(&n.spec).filter(|_| v6).map(IpAddr::V6);
        for ip in v4.into_iter().chain(v6) {
            targets.push(Target {
                ip,
                port: None,
                asn: local.as_of(&n.spec),
                cluster: cluster_id(&n.spec),
            });
        }
    }
    targets
}

/// The sessions configured so far, and their addresses (ours included: never a peer).
struct Sessions {
    peers: Vec<DesiredPeer>,
    seen: BTreeSet<IpAddr>,
}

impl Sessions {
    /// Sessions to `targets` with the BGPPeer's settings, each unless a session to its
    /// address is configured already. A reflector treats an iBGP peer outside its cluster
    /// as its client (Calico's BIRD template: `rr client` when the peer's cluster ID
    /// differs).
    fn add(
        &mut self,
        local: &Local,
        rule: &PeerRule,
        kind: PeerType,
        targets: Vec<Target>,
        problems: &mut Vec<ConfigProblem>,
    ) {
        let (name, p) = (rule.name, rule.spec);
        if targets.is_empty() {
            return;
        }
        if p.password.is_some() {
            problems.push(ConfigProblem::PeerPassword {
                peer: name.to_string(),
            });
        }
        let restart = restart_secs(
            &format!("BGPPeer {name} spec.maxRestartTime"),
            p.max_restart_time.as_deref(),
            problems,
        );
        let use_node_ip = p.source_address.as_deref() != Some("None");
        for t in targets {
            if !self.seen.insert(t.ip) {
                continue;
            }
            let mut d = DesiredPeer::new(t.ip, t.asn, kind);
            if let Some(port) = t.port {
                d.port = port;
            }
            d.rr_client = local.my_cluster.is_some()
                && t.asn == local.local_as
                && t.cluster != local.my_cluster;
            d.keep_next_hop = p.keep_original_next_hop;
            d.ttl_security = p.ttl_security.filter(|t| *t > 0);
            d.graceful_restart_secs = restart;
            d.local_address = local.source_for(t.ip).filter(|_| use_node_ip);
            self.peers.push(d);
        }
    }
}

/// The sessions BGPPeers give this node: explicit peerings first (node-specific, then
/// global, each by name), then the reverse peerings other nodes' BGPPeers imply. The
/// first session configured for an address wins, so an explicit peering is never
/// replaced by an implicit reverse one (Calico's `emit`: "an explicit forwards peering is
/// not overwritten by an implicit reverse peering").
fn bgp_peer_sessions(local: &Local, problems: &mut Vec<ConfigProblem>) -> Sessions {
    let mut sessions = Sessions {
        peers: Vec::new(),
        seen: BTreeSet::from([IpAddr::V4(local.my_ip)]),
    };
    sessions.seen.extend(local.my_ip6.map(IpAddr::V6));
    let rules = peer_rules(local.input.peers, problems);
    let mut forward: Vec<(PeerType, &PeerRule)> = rules
        .iter()
        .filter(|r| r.local_side_selects(local.input.node, &local.me.labels))
        .map(|r| (r.kind(), r))
        .collect();
    forward.sort_by_key(|(kind, r)| (*kind != PeerType::NodeSpecific, r.name));
    for (kind, rule) in forward {
        let targets = forward_targets(local, rule, problems);
        sessions.add(local, rule, kind, targets, problems);
    }
    for rule in &rules {
        let targets = reverse_targets(local, rule);
        sessions.add(local, rule, PeerType::NodeSpecific, targets, problems);
    }
    // A BGPPeer used in both directions reports its problems once.
    let mut reported = Vec::new();
    problems.retain(|p| {
        let first = !reported.contains(p);
        if first {
            reported.push(p.clone());
        }
        first
    });
    sessions
}

/// Compute the speaker's configuration for `input.node`.
pub fn desired(input: &Input) -> Result<Desired, NotReady> {
    let me = input
        .nodes
        .get(input.node)
        .ok_or_else(|| NotReady::NotRegistered {
            node: input.node.to_string(),
        })?;
    let my_ip = node_ipv4(&me.spec).ok_or_else(|| NotReady::NoIpv4Address {
        node: input.node.to_string(),
    })?;
    let mut problems = Vec::new();
    let global_as = input
        .global
        .and_then(|g| g.as_number)
        .map_or(DEFAULT_AS, |a| a.0);
    let local_as = node_as(&me.spec, global_as);
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

    // BGPPeers, then the mesh toward the nodes they leave out.
    let local = Local {
        input,
        me,
        my_ip,
        my_ip6: node_ipv6(&me.spec),
        local_as,
        global_as,
        my_cluster,
        listen_port: cfg.listen_port,
    };
    let Sessions {
        mut peers,
        mut seen,
    } = bgp_peer_sessions(&local, &mut problems);
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
            problems.push(ConfigProblem::MeshPassword);
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
            let mut d = DesiredPeer::new(
                IpAddr::V4(ip),
                local.as_of(&n.spec),
                PeerType::NodeToNodeMesh,
            );
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
                crate::model::ippool::encap(p),
                crate::model::ippool::Encap::Vxlan { .. }
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
