//! confd's calculation as tables: identity and AS, the mesh and its passive rule, route
//! reflection, explicit peers by node, selector and IP, the reverse peerings they imply
//! (Calico's automatic reverse peering), and what is exported.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

use super::calc::*;
use crate::bgp::config::PeerType;
use crate::datastore::syncer::{SyncStatus, SyncValue, SyncerEvent};
use crate::model::bgp::{BGPConfigurationSpec, BGPPeerSpec};
use crate::model::ipam::{AllocationAttribute, AllocationBlock};
use crate::model::ippool::IPPoolSpec;
use crate::model::node::{NodeBGPSpec, NodeSpec};
use crate::model::{AnyResource, AsNumber, Resource};

const ME: &str = "node-b";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn node(addr: &str, asn: Option<u32>, cluster: Option<&str>, labels: &[(&str, &str)]) -> NodeView {
    NodeView {
        spec: NodeSpec {
            bgp: Some(NodeBGPSpec {
                ipv4_address: Some(addr.into()),
                as_number: asn.map(AsNumber),
                route_reflector_cluster_id: cluster.map(Into::into),
                ..Default::default()
            }),
            ..Default::default()
        },
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

/// node-a 10.0.0.1, node-b (us) 10.0.0.2, node-c 10.0.0.3, node-d without an address.
fn nodes() -> BTreeMap<String, NodeView> {
    let mut m = BTreeMap::from([
        (
            "node-a".into(),
            node("10.0.0.1/24", None, None, &[("rack", "1")]),
        ),
        (
            "node-b".into(),
            node("10.0.0.2/24", None, None, &[("rack", "1")]),
        ),
        (
            "node-c".into(),
            node("10.0.0.3/24", Some(65003), None, &[("rack", "2")]),
        ),
    ]);
    m.insert("node-d".into(), NodeView::default());
    m
}

fn pool(cidr: &str) -> IPPoolSpec {
    IPPoolSpec {
        cidr: cidr.into(),
        ..Default::default()
    }
}

fn block(cidr: &str, host: &str, held_for: &[(usize, &str)]) -> AllocationBlock {
    let mut b = AllocationBlock {
        cidr: cidr.into(),
        affinity: Some(format!("host:{host}")),
        allocations: vec![None; 64],
        ..Default::default()
    };
    for (ordinal, node) in held_for {
        b.allocations[*ordinal] = Some(b.attributes.len());
        b.attributes.push(AllocationAttribute {
            handle_id: Some(format!("h{ordinal}")),
            secondary: Some(BTreeMap::from([("node".to_string(), node.to_string())])),
            ..Default::default()
        });
    }
    b
}

struct World {
    nodes: BTreeMap<String, NodeView>,
    global: Option<BGPConfigurationSpec>,
    per_node: Option<BGPConfigurationSpec>,
    peers: BTreeMap<String, BGPPeerSpec>,
    pools: BTreeMap<String, IPPoolSpec>,
    blocks: BTreeMap<String, AllocationBlock>,
}

impl World {
    fn new() -> World {
        World {
            nodes: nodes(),
            global: None,
            per_node: None,
            peers: BTreeMap::new(),
            pools: BTreeMap::from([("p".into(), pool("10.244.0.0/16"))]),
            blocks: BTreeMap::new(),
        }
    }

    fn desired(&self) -> Result<Desired, NotReady> {
        self.desired_for(ME)
    }

    fn desired_for(&self, node: &str) -> Result<Desired, NotReady> {
        desired(&Input {
            node,
            nodes: &self.nodes,
            global: self.global.as_ref(),
            per_node: self.per_node.as_ref(),
            peers: &self.peers,
            pools: &self.pools,
            blocks: &self.blocks,
        })
    }

    /// (address, type, AS, passive, rr client) of each peer, in order.
    fn peers(&self) -> Vec<(IpAddr, PeerType, u32, bool, bool)> {
        self.peers_of(ME)
    }

    /// The same, for another node.
    fn peers_of(&self, node: &str) -> Vec<(IpAddr, PeerType, u32, bool, bool)> {
        self.desired_for(node)
            .unwrap()
            .config
            .peers
            .iter()
            .map(|p| {
                (
                    p.address,
                    p.peer_type,
                    p.remote_as.0,
                    p.passive,
                    p.rr_client,
                )
            })
            .collect()
    }
}

const MESH: PeerType = PeerType::NodeToNodeMesh;

#[test]
fn a_node_without_registration_or_ipv4_cannot_run_bgp_and_says_why() {
    let mut w = World::new();
    w.nodes.remove(ME);
    let e = w.desired().unwrap_err();
    assert_eq!(
        e.to_string(),
        "node node-b is not registered in the datastore"
    );
    w.nodes.insert(ME.into(), NodeView::default());
    let e = w.desired().unwrap_err();
    assert!(
        e.to_string()
            .contains("no IPv4 address (spec.bgp.ipv4Address)"),
        "{e}"
    );
}

#[test]
fn identity_router_id_as_and_listen_settings() {
    let mut w = World::new();
    let c = w.desired().unwrap().config;
    assert_eq!(c.router_id.to_string(), "10.0.0.2");
    assert_eq!(c.local_as.0, DEFAULT_AS);
    assert_eq!(c.listen_port, 179);
    assert_eq!(c.listen_address, ip("0.0.0.0"));
    assert_eq!(c.cluster_id, None);

    // The global AS, then the node's own.
    w.global = Some(BGPConfigurationSpec {
        as_number: Some(AsNumber(65000)),
        listen_port: Some(1790),
        bind_mode: Some("NodeIP".into()),
        ..Default::default()
    });
    let c = w.desired().unwrap().config;
    assert_eq!((c.local_as.0, c.listen_port), (65000, 1790));
    assert_eq!(c.listen_address, ip("10.0.0.2"));
    w.nodes
        .get_mut(ME)
        .unwrap()
        .spec
        .bgp
        .as_mut()
        .unwrap()
        .as_number = Some(AsNumber(65002));
    w.per_node = Some(BGPConfigurationSpec {
        listen_port: Some(1791),
        ..Default::default()
    });
    let c = w.desired().unwrap().config;
    assert_eq!((c.local_as.0, c.listen_port), (65002, 1791));
}

#[test]
fn the_mesh_peers_every_other_node_with_an_address_and_only_the_lower_ip_connects() {
    let w = World::new();
    assert_eq!(
        w.peers(),
        vec![
            (ip("10.0.0.1"), MESH, DEFAULT_AS, false, false),
            (ip("10.0.0.3"), MESH, 65003, true, false),
        ]
    );
    let d = w.desired().unwrap();
    assert!(
        d.config
            .peers
            .iter()
            .all(|p| p.local_address == Some(ip("10.0.0.2"))
                && p.graceful_restart_secs == DEFAULT_RESTART_SECS
                && p.port == 179)
    );
    assert!(d.problems.is_empty(), "{:?}", d.problems);
}

#[test]
fn the_mesh_is_off_when_disabled_and_its_restart_time_follows_the_config() {
    let mut w = World::new();
    w.global = Some(BGPConfigurationSpec {
        node_mesh_max_restart_time: Some("300s".into()),
        ..Default::default()
    });
    let d = w.desired().unwrap();
    assert!(
        d.config
            .peers
            .iter()
            .all(|p| p.graceful_restart_secs == 300)
    );
    w.global.as_mut().unwrap().node_to_node_mesh_enabled = Some(false);
    assert!(w.peers().is_empty());
}

#[test]
fn route_reflection_mesh_skips_reflectors_and_a_reflector_has_clients() {
    let mut w = World::new();
    w.nodes.insert(
        "node-rr".into(),
        node(
            "10.0.0.9/24",
            None,
            Some("224.0.0.1"),
            &[("route-reflector", "true")],
        ),
    );
    // Everyone peers with reflectors; reflectors peer with everyone.
    w.peers.insert(
        "to-rr".into(),
        BGPPeerSpec {
            node_selector: "all()".into(),
            peer_selector: "route-reflector == 'true'".into(),
            ..Default::default()
        },
    );
    w.peers.insert(
        "rr-to-all".into(),
        BGPPeerSpec {
            node_selector: "route-reflector == 'true'".into(),
            peer_selector: "all()".into(),
            ..Default::default()
        },
    );
    // A client: the mesh without the reflector, plus the reflector as an explicit peer.
    assert_eq!(
        w.peers(),
        vec![
            (
                ip("10.0.0.9"),
                PeerType::NodeSpecific,
                DEFAULT_AS,
                false,
                false
            ),
            (ip("10.0.0.1"), MESH, DEFAULT_AS, false, false),
            (ip("10.0.0.3"), MESH, 65003, true, false),
        ]
    );
    // The reflector: no mesh; iBGP peers outside its cluster are clients.
    w.nodes
        .get_mut(ME)
        .unwrap()
        .spec
        .bgp
        .as_mut()
        .unwrap()
        .route_reflector_cluster_id = Some("224.0.0.1".into());
    w.nodes
        .get_mut(ME)
        .unwrap()
        .labels
        .insert("route-reflector".into(), "true".into());
    let c = w.desired().unwrap().config;
    assert_eq!(c.cluster_id, Some("224.0.0.1".parse().unwrap()));
    assert_eq!(
        w.peers(),
        vec![
            (
                ip("10.0.0.1"),
                PeerType::NodeSpecific,
                DEFAULT_AS,
                false,
                true
            ),
            (ip("10.0.0.3"), PeerType::NodeSpecific, 65003, false, false),
            (
                ip("10.0.0.9"),
                PeerType::NodeSpecific,
                DEFAULT_AS,
                false,
                false
            ),
        ],
        "node-c is eBGP (not a client); node-rr shares our cluster ID (not a client)"
    );
}

#[test]
fn explicit_peers_by_node_selector_and_ip_win_over_the_mesh() {
    let mut w = World::new();
    let by_ip = |peer_ip: &str, asn: u32| BGPPeerSpec {
        peer_ip: peer_ip.into(),
        as_number: Some(AsNumber(asn)),
        ..Default::default()
    };
    w.peers
        .insert("global-tor".into(), by_ip("192.168.0.1", 65100));
    w.peers.insert(
        "mine".into(),
        BGPPeerSpec {
            node: ME.into(),
            keep_original_next_hop: true,
            ttl_security: Some(1),
            max_restart_time: Some("2m".into()),
            source_address: Some("None".into()),
            ..by_ip("10.0.0.1:1790", 65101)
        },
    );
    w.peers.insert(
        "rack2-only".into(),
        BGPPeerSpec {
            node_selector: "rack == '2'".into(),
            ..by_ip("192.168.2.1", 65102)
        },
    );
    w.peers.insert(
        "rack1".into(),
        BGPPeerSpec {
            node_selector: "rack == '1'".into(),
            ..by_ip("192.168.1.1", 65103)
        },
    );
    w.peers.insert(
        "not-us".into(),
        BGPPeerSpec {
            node: "node-a".into(),
            ..by_ip("192.168.3.1", 65104)
        },
    );
    let d = w.desired().unwrap();
    assert_eq!(
        w.peers(),
        vec![
            // Node-specific first (by name), then global, then what is left of the mesh.
            (ip("10.0.0.1"), PeerType::NodeSpecific, 65101, false, false),
            (
                ip("192.168.1.1"),
                PeerType::NodeSpecific,
                65103,
                false,
                false
            ),
            (ip("192.168.0.1"), PeerType::Global, 65100, false, false),
            (ip("10.0.0.3"), MESH, 65003, true, false),
        ]
    );
    let mine = &d.config.peers[0];
    assert_eq!(mine.port, 1790);
    assert!(mine.keep_next_hop);
    assert_eq!(mine.ttl_security, Some(1));
    assert_eq!(mine.graceful_restart_secs, 120);
    assert_eq!(mine.local_address, None);
    assert_eq!(d.config.peers[1].local_address, Some(ip("10.0.0.2")));
}

#[test]
fn unusable_peers_and_secret_passwords_are_reported_not_guessed() {
    let mut w = World::new();
    w.peers.insert(
        "no-as".into(),
        BGPPeerSpec {
            peer_ip: "192.168.0.1".into(),
            ..Default::default()
        },
    );
    w.peers.insert(
        "secret".into(),
        BGPPeerSpec {
            peer_ip: "192.168.0.2".into(),
            as_number: Some(AsNumber(65000)),
            password: Some(Default::default()),
            max_restart_time: Some("soon".into()),
            ..Default::default()
        },
    );
    let d = w.desired().unwrap();
    assert!(
        !d.config
            .peers
            .iter()
            .any(|p| p.address == ip("192.168.0.1"))
    );
    let secret = d
        .config
        .peers
        .iter()
        .find(|p| p.address == ip("192.168.0.2"))
        .unwrap();
    assert_eq!(
        (secret.password.as_deref(), secret.graceful_restart_secs),
        (None, 120)
    );
    let all = d
        .problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n");
    for part in [
        "BGPPeer no-as: asNumber is missing; skipped",
        "BGPPeer secret: password refers to a Kubernetes secret",
        "spec.maxRestartTime",
    ] {
        assert!(all.contains(part), "{part:?} not in {all}");
    }
}

#[test]
fn export_own_blocks_and_borrowed_addresses_inside_exportable_pools() {
    let mut w = World::new();
    w.pools.insert(
        "off".into(),
        IPPoolSpec {
            disabled: true,
            ..pool("10.250.0.0/16")
        },
    );
    w.pools.insert(
        "private".into(),
        IPPoolSpec {
            disable_bgp_export: true,
            ..pool("10.251.0.0/16")
        },
    );
    w.blocks
        .insert("b1".into(), block("10.244.1.0/26", ME, &[(3, ME)]));
    // node-a's block: one address borrowed by us, one by node-c.
    w.blocks.insert(
        "b2".into(),
        block(
            "10.244.0.0/26",
            "node-a",
            &[(5, ME), (6, "node-c"), (7, "node-a")],
        ),
    );
    w.blocks
        .insert("b3".into(), block("10.250.0.0/26", ME, &[]));
    w.blocks
        .insert("b4".into(), block("10.251.0.0/26", ME, &[]));
    w.blocks.insert(
        "b5".into(),
        AllocationBlock {
            deleted: true,
            ..block("10.244.9.0/26", ME, &[])
        },
    );
    let c = w.desired().unwrap().config;
    assert_eq!(c.export, vec![net("10.244.0.5/32"), net("10.244.1.0/26")]);
    assert!(c.policy.permits(&net("10.244.7.0/26")));
    assert!(!c.policy.permits(&net("10.250.0.0/26")), "disabled pool");
    assert!(!c.policy.permits(&net("10.251.0.0/26")), "disableBGPExport");
    assert!(
        !c.policy.permits(&net("192.168.0.0/24")),
        "outside every pool"
    );
}

/// BGPConfiguration's service ranges: every node originates the cluster ranges and the
/// external and load-balancer ranges (single addresses are per service), unless labelled
/// out of load balancing; prefixAdvertisements become communities by name or value, the
/// node's own list over the global one.
#[test]
fn service_ranges_and_prefix_communities() {
    use crate::bgp::config::CommunityValue::{Large, Standard};
    use crate::model::bgp::{CidrBlock, Community, PrefixAdvertisement};
    let cidrs = |l: &[&str]| -> Vec<CidrBlock> {
        l.iter()
            .map(|c| CidrBlock {
                cidr: c.to_string(),
            })
            .collect()
    };
    let mut w = World::new();
    w.blocks
        .insert("b1".into(), block("10.244.1.0/26", ME, &[]));
    w.global = Some(BGPConfigurationSpec {
        service_cluster_ips: cidrs(&["10.96.0.0/12", "fd00:96::/112"]),
        service_external_ips: cidrs(&["203.0.113.0/24", "198.51.100.7/32"]),
        service_load_balancer_ips: cidrs(&["192.0.2.0/25", "10.96.0.0/12"]),
        communities: vec![Community {
            name: "tagged".into(),
            value: "100:555:107".into(),
        }],
        prefix_advertisements: vec![PrefixAdvertisement {
            cidr: "10.244.0.0/16".into(),
            communities: vec!["tagged".into(), "65000:1".into(), "tagged".into()],
        }],
        ignored_interfaces: vec!["docker*".into()],
        ..Default::default()
    });
    let c = w.desired().unwrap().config;
    assert_eq!(c.ignored_interfaces, vec!["docker*".to_string()]);
    let ranges = vec![
        net("10.96.0.0/12"),
        net("192.0.2.0/25"),
        net("203.0.113.0/24"),
        net("fd00:96::/112"),
    ];
    assert_eq!(c.service_ranges, ranges);
    // No IPv6 address on this node: IPv6 ranges are not originated.
    assert_eq!(
        c.export,
        vec![
            net("10.244.1.0/26"),
            net("10.96.0.0/12"),
            net("192.0.2.0/25"),
            net("203.0.113.0/24"),
        ]
    );
    assert!(c.policy.permits(&net("10.96.4.0/24")), "routes inside too");
    assert!(
        !c.policy.permits(&net("198.51.100.7/32")),
        "a single address"
    );
    assert_eq!(
        c.policy.communities,
        vec![(
            net("10.244.0.0/16"),
            vec![Standard((65000 << 16) | 1), Large([100, 555, 107])]
        )]
    );

    // The node's own prefixAdvertisements win.
    w.per_node = Some(BGPConfigurationSpec {
        prefix_advertisements: vec![PrefixAdvertisement {
            cidr: "10.96.0.0/12".into(),
            communities: vec!["1:2".into()],
        }],
        ..Default::default()
    });
    let c = w.desired().unwrap().config;
    assert_eq!(
        c.policy.communities,
        vec![(net("10.96.0.0/12"), vec![Standard((1 << 16) | 2)])]
    );

    // Excluded: nothing originated, but the ranges are still known (never programmed).
    w.nodes.get_mut(ME).unwrap().labels.insert(
        "node.kubernetes.io/exclude-from-external-load-balancers".into(),
        "true".into(),
    );
    let c = w.desired().unwrap().config;
    assert_eq!(c.export, vec![net("10.244.1.0/26")]);
    assert!(!c.policy.permits(&net("10.96.4.0/24")));
    assert_eq!(c.service_ranges, ranges);
}

fn update(key: &str, value: Option<AnyResource>) -> SyncerEvent {
    SyncerEvent::update(key, value.map(SyncValue::Resource))
}

fn res<S: crate::model::Kind>(name: &str, spec: S) -> Resource<S> {
    Resource::new(name, spec)
}

#[test]
fn state_follows_the_syncer_and_says_what_matters() {
    const P: &str = "/calico/resources/v3/projectcalico.org";
    let mut s = ConfdState::new(ME);
    assert!(s.desired().is_err());
    for (name, n) in nodes() {
        let mut r = res(&name, n.spec);
        r.metadata.labels = n.labels;
        assert!(s.apply(&update(
            &format!("{P}/nodes/{name}"),
            Some(AnyResource::Node(r))
        )));
    }
    assert!(s.apply(&SyncerEvent::Status(SyncStatus::InSync)));
    assert!(s.in_sync);
    assert_eq!(s.desired().unwrap().config.peers.len(), 2);
    // Another node's BGPConfiguration is not ours; the same value twice changes nothing.
    let other = res("node.node-a", BGPConfigurationSpec::default());
    assert!(!s.apply(&update(
        &format!("{P}/bgpconfigurations/node.node-a"),
        Some(AnyResource::BGPConfiguration(other))
    )));
    let off = res(
        "default",
        BGPConfigurationSpec {
            node_to_node_mesh_enabled: Some(false),
            ..Default::default()
        },
    );
    let key = format!("{P}/bgpconfigurations/default");
    assert!(s.apply(&update(
        &key,
        Some(AnyResource::BGPConfiguration(off.clone()))
    )));
    assert!(!s.apply(&update(&key, Some(AnyResource::BGPConfiguration(off)))));
    assert!(s.desired().unwrap().config.peers.is_empty());
    assert!(s.apply(&update(&key, None)));
    assert_eq!(s.desired().unwrap().config.peers.len(), 2);
    // A deleted node leaves the mesh.
    assert!(s.apply(&update(&format!("{P}/nodes/node-a"), None)));
    assert_eq!(s.desired().unwrap().config.peers.len(), 1);
    let peer = res(
        "tor",
        BGPPeerSpec {
            peer_ip: "192.168.0.1".into(),
            as_number: Some(AsNumber(65000)),
            ..Default::default()
        },
    );
    let pkey = format!("{P}/bgppeers/tor");
    assert!(s.apply(&update(&pkey, Some(AnyResource::BGPPeer(peer)))));
    assert_eq!(s.desired().unwrap().config.peers.len(), 2);
    assert!(s.apply(&update(&pkey, None)));
    assert_eq!(s.desired().unwrap().config.peers.len(), 1);
}

const NODE: PeerType = PeerType::NodeSpecific;

/// Calico's documented route-reflector set-up: node-rr labelled and given a cluster ID,
/// the mesh off, and one BGPPeer from every node to the reflectors.
fn documented_reflector_world() -> World {
    let mut w = World::new();
    w.nodes.insert(
        "node-rr".into(),
        node(
            "10.0.0.9/24",
            None,
            Some("244.0.0.1"),
            &[("route-reflector", "true")],
        ),
    );
    w.global = Some(BGPConfigurationSpec {
        node_to_node_mesh_enabled: Some(false),
        ..Default::default()
    });
    w.peers.insert(
        "peer-with-route-reflectors".into(),
        BGPPeerSpec {
            node_selector: "all()".into(),
            peer_selector: "route-reflector == 'true'".into(),
            ..Default::default()
        },
    );
    w
}

/// The documentation's BGPPeer in [`documented_reflector_world`], to change.
fn documented_peer(w: &mut World) -> &mut BGPPeerSpec {
    w.peers
        .get_mut("peer-with-route-reflectors")
        .expect("documented_reflector_world has the documented BGPPeer")
}

/// The client peers with the reflector (forward); the reflector peers back with every
/// other node the BGPPeer's nodeSelector selects (Calico's automatic reverse peering),
/// its iBGP ones as route-reflector clients, from its own address.
#[test]
fn the_documented_single_bgppeer_is_reversed_on_the_reflector() {
    let w = documented_reflector_world();
    assert_eq!(
        w.peers(),
        vec![(ip("10.0.0.9"), NODE, DEFAULT_AS, false, false)]
    );
    assert_eq!(
        w.peers_of("node-rr"),
        vec![
            (ip("10.0.0.1"), NODE, DEFAULT_AS, false, true),
            (ip("10.0.0.2"), NODE, DEFAULT_AS, false, true),
            (ip("10.0.0.3"), NODE, 65003, false, false),
        ],
        "node-c is eBGP (not a client); node-d has no address"
    );
    let d = w.desired_for("node-rr").unwrap();
    assert!(d.problems.is_empty(), "{:?}", d.problems);
    assert!(
        d.config
            .peers
            .iter()
            .all(|p| p.local_address == Some(ip("10.0.0.9")) && p.port == 179)
    );
    // A second reflector: the two peer forward (same cluster: not each other's
    // clients), and each has every other node as reverse peering.
    let mut w = w;
    w.nodes.insert(
        "node-rr2".into(),
        node(
            "10.0.0.8/24",
            None,
            Some("244.0.0.1"),
            &[("route-reflector", "true")],
        ),
    );
    assert_eq!(
        w.peers_of("node-rr"),
        vec![
            (ip("10.0.0.8"), NODE, DEFAULT_AS, false, false),
            (ip("10.0.0.1"), NODE, DEFAULT_AS, false, true),
            (ip("10.0.0.2"), NODE, DEFAULT_AS, false, true),
            (ip("10.0.0.3"), NODE, 65003, false, false),
        ]
    );
    assert_eq!(
        w.peers(),
        vec![
            (ip("10.0.0.9"), NODE, DEFAULT_AS, false, false),
            (ip("10.0.0.8"), NODE, DEFAULT_AS, false, false),
        ]
    );
}

/// `reversePeering: Manual`: the client side only; the reflector peers with nobody
/// until a BGPPeer of its own says so.
#[test]
fn reverse_peering_manual_leaves_the_reflector_without_the_reverse_peering() {
    let mut w = documented_reflector_world();
    documented_peer(&mut w).reverse_peering = Some("Manual".into());
    assert_eq!(
        w.peers(),
        vec![(ip("10.0.0.9"), NODE, DEFAULT_AS, false, false)]
    );
    assert!(w.peers_of("node-rr").is_empty());
    // Auto is the default spelled out.
    documented_peer(&mut w).reverse_peering = Some("Auto".into());
    assert_eq!(w.peers_of("node-rr").len(), 3);
    // The manual reverse, restricted to rack 1, itself reversed on those nodes (toward the
    // reflector, which they peer with already).
    documented_peer(&mut w).reverse_peering = Some("Manual".into());
    w.peers.insert(
        "reflectors-to-rack-1".into(),
        BGPPeerSpec {
            node_selector: "route-reflector == 'true'".into(),
            peer_selector: "rack == '1'".into(),
            ..Default::default()
        },
    );
    assert_eq!(
        w.peers_of("node-rr"),
        vec![
            (ip("10.0.0.1"), NODE, DEFAULT_AS, false, true),
            (ip("10.0.0.2"), NODE, DEFAULT_AS, false, true),
        ]
    );
    assert_eq!(
        w.peers(),
        vec![(ip("10.0.0.9"), NODE, DEFAULT_AS, false, false)]
    );
}

/// Calico's `emit`: a peering configured explicitly keeps its own settings although a
/// reverse peering to the same address is implied; the reverse carries the settings of
/// the BGPPeer it reverses.
#[test]
fn an_explicit_peering_wins_over_an_implicit_reverse_one() {
    let mut w = documented_reflector_world();
    let documented = documented_peer(&mut w);
    documented.max_restart_time = Some("1m".into());
    documented.keep_original_next_hop = true;
    documented.ttl_security = Some(2);
    documented.source_address = Some("None".into());
    // Named to sort after the reversed BGPPeer: order by name must not matter.
    w.peers.insert(
        "zz-explicit".into(),
        BGPPeerSpec {
            node: "node-rr".into(),
            peer_ip: "10.0.0.1:1790".into(),
            as_number: Some(AsNumber(DEFAULT_AS)),
            max_restart_time: Some("5m".into()),
            ..Default::default()
        },
    );
    let d = w.desired_for("node-rr").unwrap();
    let get = |a: &str| {
        d.config
            .peers
            .iter()
            .find(|p| p.address == ip(a))
            .unwrap()
            .clone()
    };
    let explicit = get("10.0.0.1");
    assert_eq!(
        (
            explicit.port,
            explicit.graceful_restart_secs,
            explicit.keep_next_hop,
            explicit.ttl_security,
            explicit.local_address,
            explicit.rr_client,
        ),
        (1790, 300, false, None, Some(ip("10.0.0.9")), true)
    );
    let reverse = get("10.0.0.2");
    assert_eq!(
        (
            reverse.port,
            reverse.graceful_restart_secs,
            reverse.keep_next_hop,
            reverse.ttl_security,
            reverse.local_address,
            reverse.rr_client,
        ),
        (179, 60, true, Some(2), None, true)
    );
    assert_eq!(d.config.peers.len(), 3, "{:?}", d.config.peers);
}

fn dual(v4: &str, v6: &str, asn: Option<u32>, labels: &[(&str, &str)]) -> NodeView {
    let mut n = node(v4, asn, None, labels);
    n.spec.bgp.as_mut().unwrap().ipv6_address = Some(v6.into());
    n
}

/// Calico reverses a `peerIP` peering over that address's family only, toward the
/// other nodes' addresses of that family, and only on the node that holds the address,
/// with the BGPPeer's asNumber as its AS and its port, if any, as its listen port. A
/// `peerSelector` peering is reversed as it is made here, over IPv4 (whose session
/// carries the IPv6 routes too).
#[test]
fn ip_peerings_reverse_over_their_own_family_and_selector_peerings_over_ipv4() {
    let mut w = World::new();
    w.global = Some(BGPConfigurationSpec {
        node_to_node_mesh_enabled: Some(false),
        ..Default::default()
    });
    w.nodes = BTreeMap::from([
        (
            "node-a".into(),
            dual("10.0.0.1/24", "fd00::1/64", None, &[("rack", "1")]),
        ),
        (
            ME.into(),
            dual("10.0.0.2/24", "fd00::2/64", None, &[("rack", "1")]),
        ),
        (
            "node-c".into(),
            dual("10.0.0.3/24", "fd00::3/64", Some(65003), &[("rack", "2")]),
        ),
    ]);
    let by_ip = |node: &str, peer_ip: &str, asn: u32| BGPPeerSpec {
        node: node.into(),
        peer_ip: peer_ip.into(),
        as_number: Some(AsNumber(asn)),
        ..Default::default()
    };
    // node-a peers with our IPv6 address: we peer back over IPv6 only, from ours.
    w.peers
        .insert("a-to-b6".into(), by_ip("node-a", "fd00::2", DEFAULT_AS));
    assert_eq!(
        w.peers(),
        vec![(ip("fd00::1"), NODE, DEFAULT_AS, false, false)]
    );
    let d = w.desired().unwrap();
    assert_eq!(d.config.peers[0].local_address, Some(ip("fd00::2")));
    // node-a's forward side: the same session seen from there, from its IPv6 address.
    let a = w.desired_for("node-a").unwrap();
    assert_eq!(
        (a.config.peers[0].address, a.config.peers[0].local_address),
        (ip("fd00::2"), Some(ip("fd00::1")))
    );
    // node-c (AS 65003) peers with our IPv4 address: we peer back over IPv4, eBGP.
    w.peers
        .insert("c-to-b4".into(), by_ip("node-c", "10.0.0.2", DEFAULT_AS));
    assert_eq!(
        w.peers(),
        vec![
            (ip("fd00::1"), NODE, DEFAULT_AS, false, false),
            (ip("10.0.0.3"), NODE, 65003, false, false),
        ]
    );
    // Not reversed: another AS than ours, another port than ours, another node's address.
    w.peers = BTreeMap::from([
        ("wrong-as".into(), by_ip("node-a", "10.0.0.2", 65000)),
        (
            "wrong-port".into(),
            by_ip("node-a", "10.0.0.2:1790", DEFAULT_AS),
        ),
        ("not-us".into(), by_ip("node-a", "10.0.0.3", 65003)),
    ]);
    assert!(w.peers().is_empty(), "{:?}", w.peers());
    // Our listen port named explicitly: reversed.
    w.per_node = Some(BGPConfigurationSpec {
        listen_port: Some(1790),
        ..Default::default()
    });
    assert_eq!(
        w.peers(),
        vec![(ip("10.0.0.1"), NODE, DEFAULT_AS, false, false)]
    );
    // A selector peering (rack 2 toward rack 1) reverses over IPv4, to node-c only.
    w.per_node = None;
    w.peers = BTreeMap::from([(
        "rack2-to-rack1".into(),
        BGPPeerSpec {
            node_selector: "rack == '2'".into(),
            peer_selector: "rack == '1'".into(),
            ..Default::default()
        },
    )]);
    assert_eq!(w.peers(), vec![(ip("10.0.0.3"), NODE, 65003, false, false)]);
    assert_eq!(
        w.desired().unwrap().config.ipv6_next_hop,
        Some("fd00::2".parse().unwrap()),
        "IPv6 routes ride the IPv4 session"
    );
    assert_eq!(
        w.peers_of("node-c"),
        vec![
            (ip("10.0.0.1"), NODE, DEFAULT_AS, false, false),
            (ip("10.0.0.2"), NODE, DEFAULT_AS, false, false),
        ]
    );
}

/// A selector that does not parse (written by another tool) skips its BGPPeer in both
/// directions, said once.
#[test]
fn a_bgppeer_whose_selector_does_not_parse_is_skipped_and_said_once() {
    let mut w = documented_reflector_world();
    documented_peer(&mut w).node_selector = "all(".into();
    let d = w.desired_for("node-rr").unwrap();
    assert!(d.config.peers.is_empty());
    assert_eq!(d.problems.len(), 1, "{:?}", d.problems);
    assert!(
        d.problems[0]
            .to_string()
            .starts_with("BGPPeer peer-with-route-reflectors: nodeSelector does not parse"),
        "{:?}",
        d.problems
    );
}

/// Each problem is typed, naming the BGPPeer (or BGPConfiguration) and the field, so a
/// caller tells them apart without reading the text.
#[test]
fn problems_name_the_resource_and_the_field() {
    let mut w = World::new();
    w.peers.insert(
        "bad-ip".into(),
        BGPPeerSpec {
            peer_ip: "192.168.0.x".into(),
            as_number: Some(AsNumber(65000)),
            ..Default::default()
        },
    );
    w.peers.insert(
        "bad-time".into(),
        BGPPeerSpec {
            peer_ip: "192.168.0.2".into(),
            as_number: Some(AsNumber(65000)),
            max_restart_time: Some("soon".into()),
            ..Default::default()
        },
    );
    let d = w.desired().unwrap();
    assert_eq!(d.problems.len(), 2, "{:?}", d.problems);
    let ConfigProblem::RestartTime { error } = &d.problems[1] else {
        panic!("{:?}", d.problems);
    };
    assert_eq!(
        (error.field.as_str(), error.value.as_str()),
        ("BGPPeer bad-time spec.maxRestartTime", "soon")
    );
    assert_eq!(
        d.problems[0],
        ConfigProblem::PeerIp {
            peer: "bad-ip".into(),
            peer_ip: "192.168.0.x".into()
        }
    );
    assert_eq!(
        d.problems[0].to_string(),
        "BGPPeer bad-ip: peerIP \"192.168.0.x\" is not an address; skipped"
    );

    w.nodes.remove(ME);
    assert_eq!(
        w.desired().unwrap_err(),
        NotReady::NotRegistered { node: ME.into() }
    );
}
