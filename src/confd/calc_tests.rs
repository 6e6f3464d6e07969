//! confd's calculation as tables: identity and AS, the mesh and its passive rule, route
//! reflection, explicit peers by node, selector and IP, and what is exported.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use super::calc::*;
use crate::bgp::config::PeerType;
use crate::datastore::syncer::{SyncStatus, SyncValue, SyncerEvent, Update, UpdateType};
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
        desired(&Input {
            node: ME,
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
        self.desired()
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
    assert_eq!(e.0, "node node-b is not registered in the datastore");
    w.nodes.insert(ME.into(), NodeView::default());
    let e = w.desired().unwrap_err();
    assert!(
        e.0.contains("no IPv4 address (spec.bgp.ipv4Address)"),
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
    let all = d.problems.join("\n");
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
    SyncerEvent::Update(Update {
        key: key.into(),
        update_type: if value.is_some() {
            UpdateType::New
        } else {
            UpdateType::Deleted
        },
        value: value.map(|v| Arc::new(SyncValue::Resource(v))),
        revision: 1,
    })
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
