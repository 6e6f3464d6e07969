//! The calculation, as tables: pool modes × same/other subnet × local/borrowed addresses ×
//! nodes present or gone.

use std::collections::BTreeMap;

use super::*;
use crate::model::ipam::AllocationAttribute;
use crate::model::node::NodeBGPSpec;

const ME: &str = "node-a";

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn node(addr: &str, vxlan_tunnel: &str, mac: Option<&str>) -> NodeSpec {
    NodeSpec {
        bgp: Some(NodeBGPSpec {
            ipv4_address: Some(addr.into()),
            ipv4_ipip_tunnel_addr: Some("10.244.0.2".into()),
            ..Default::default()
        }),
        ipv4_vxlan_tunnel_addr: Some(vxlan_tunnel.into()),
        vxlan_tunnel_mac_addr: mac.map(Into::into),
        ..Default::default()
    }
}

/// node-a (us) and node-b share 10.0.0.0/24; node-c is in 10.1.0.0/24 with no MAC set.
fn nodes() -> BTreeMap<String, NodeSpec> {
    BTreeMap::from([
        (
            "node-a".into(),
            node("10.0.0.1/24", "10.244.0.1", Some("66:00:00:00:00:0a")),
        ),
        (
            "node-b".into(),
            node("10.0.0.2/24", "10.244.1.1", Some("66:00:00:00:00:0b")),
        ),
        ("node-c".into(), node("10.1.0.3/24", "10.244.2.1", None)),
    ])
}

fn block(cidr: &str, host: &str, borrowed: &[(usize, &str)]) -> AllocationBlock {
    let mut b = AllocationBlock {
        cidr: cidr.into(),
        affinity: Some(format!("host:{host}")),
        allocations: vec![None; 64],
        ..Default::default()
    };
    for (ordinal, node) in borrowed {
        b.allocations[*ordinal] = Some(b.attributes.len());
        b.attributes.push(AllocationAttribute {
            handle_id: Some(format!("k8s-pod-network.{ordinal}")),
            secondary: Some(BTreeMap::from([("node".to_string(), node.to_string())])),
            ..Default::default()
        });
    }
    b
}

/// Our block lends 10.244.0.5 to node-c; node-b and node-c have a block each.
fn blocks() -> BTreeMap<String, AllocationBlock> {
    keyed([
        block("10.244.0.0/26", "node-a", &[(5, "node-c")]),
        block("10.244.1.0/26", "node-b", &[]),
        block("10.244.2.0/26", "node-c", &[]),
    ])
}

/// Values under made-up keys, in order.
fn keyed<T>(values: impl IntoIterator<Item = T>) -> BTreeMap<String, T> {
    values
        .into_iter()
        .enumerate()
        .map(|(i, v)| (format!("k{i}"), v))
        .collect()
}

/// What BGP would hold: the other nodes' blocks, node-c's borrowed /32, our own block
/// reflected back, and a prefix outside every pool.
fn bgp() -> BgpTable {
    BgpTable::from_iter([
        (net("10.244.1.0/26"), ip("10.0.0.2")),
        (net("10.244.2.0/26"), ip("10.1.0.3")),
        (net("10.244.0.5/32"), ip("10.1.0.3")),
        (net("10.244.0.0/26"), ip("10.0.0.2")),
        (net("192.168.50.0/24"), ip("10.0.0.2")),
    ])
}

fn pool(ipip: &str, vxlan: &str) -> IPPoolSpec {
    IPPoolSpec {
        cidr: "10.244.0.0/16".into(),
        ipip_mode: Some(ipip.into()),
        vxlan_mode: Some(vxlan.into()),
        nat_outgoing: true,
        ..Default::default()
    }
}

fn workload() -> WorkloadEndpointSpec {
    WorkloadEndpointSpec {
        interface_name: "cali0123456789a".into(),
        mac: "aa:bb:cc:dd:ee:01".into(),
        ip_networks: vec!["10.244.0.3/32".into()],
        ..Default::default()
    }
}

fn run(pools: &[IPPoolSpec], nodes: &BTreeMap<String, NodeSpec>) -> Desired {
    let (blocks, bgp, settings) = (blocks(), bgp(), Settings::default());
    let (pools, workloads) = (keyed(pools.iter().cloned()), keyed([workload()]));
    calculate(&Input {
        node: ME,
        nodes,
        pools: &pools,
        workloads: &workloads,
        blocks: &blocks,
        bgp: &bgp,
        settings: &settings,
    })
}

/// The standard nodes, blocks and BGP table, these pools and settings, no workloads.
fn without_workloads(pools: &[IPPoolSpec], settings: &Settings) -> Desired {
    let (nodes, blocks, bgp) = (nodes(), blocks(), bgp());
    let pools = keyed(pools.iter().cloned());
    calculate(&Input {
        node: ME,
        nodes: &nodes,
        pools: &pools,
        workloads: &BTreeMap::new(),
        blocks: &blocks,
        bgp: &bgp,
        settings,
    })
}

fn via(gw: &str, dev: &str) -> Route {
    Route {
        target: Target::Via {
            gateway: ip(gw),
            dev: if dev.is_empty() {
                Dev::Uplink
            } else {
                Dev::Named(dev.into())
            },
        },
        protocol: PROTO_FELIX,
    }
}

/// Per mode: the route to node-b's block (same subnet), to node-c's (other subnet), and to
/// the address node-c borrowed from our block.
#[test]
fn remote_routes_per_pool_mode_and_subnet() {
    let cases = [
        (
            "NoEncap",
            pool("Never", "Never"),
            [("10.0.0.2", ""), ("10.1.0.3", ""), ("10.1.0.3", "")],
        ),
        (
            "IPIP",
            pool("Always", "Never"),
            [
                ("10.0.0.2", TUNL0),
                ("10.1.0.3", TUNL0),
                ("10.1.0.3", TUNL0),
            ],
        ),
        (
            "IPIP CrossSubnet",
            pool("CrossSubnet", "Never"),
            [("10.0.0.2", ""), ("10.1.0.3", TUNL0), ("10.1.0.3", TUNL0)],
        ),
        (
            "VXLAN",
            pool("Never", "Always"),
            [
                ("10.244.1.1", VXLAN_DEV),
                ("10.244.2.1", VXLAN_DEV),
                ("10.244.2.1", VXLAN_DEV),
            ],
        ),
        (
            "VXLAN CrossSubnet",
            pool("Never", "CrossSubnet"),
            [
                ("10.0.0.2", ""),
                ("10.244.2.1", VXLAN_DEV),
                ("10.244.2.1", VXLAN_DEV),
            ],
        ),
    ];
    for (name, p, [b, c, borrowed]) in cases {
        let d = run(&[p], &nodes());
        for (prefix, (gw, dev)) in [
            ("10.244.1.0/26", b),
            ("10.244.2.0/26", c),
            ("10.244.0.5/32", borrowed),
        ] {
            assert_eq!(
                d.routes.get(&net(prefix)),
                Some(&via(gw, dev)),
                "{name}: {prefix}"
            );
        }
        // Always, whatever the mode: our workload, our block's blackhole (not BGP's echo
        // of it), and BGP's prefix outside every pool via the uplink.
        assert_eq!(
            d.routes[&net("10.244.0.3/32")],
            Route {
                target: Target::Link("cali0123456789a".into()),
                protocol: 3
            },
            "{name}"
        );
        assert_eq!(
            d.routes[&net("10.244.0.0/26")],
            Route {
                target: Target::Blackhole,
                protocol: PROTO_FELIX
            },
            "{name}"
        );
        assert_eq!(
            d.routes[&net("192.168.50.0/24")],
            via("10.0.0.2", ""),
            "{name}"
        );
        assert_eq!(d.routes.len(), 6, "{name}: {:?}", d.routes);
        assert!(d.neighbours.contains(&Neighbour {
            dev: "cali0123456789a".into(),
            ip: ip("10.244.0.3"),
            mac: [0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x01],
        }));
        assert!(d.problems.is_empty(), "{name}: {:?}", d.problems);
    }
}

#[test]
fn tunnel_devices_follow_the_pools() {
    let d = run(&[pool("Never", "Never")], &nodes());
    assert_eq!((d.ipip, d.vxlan), (None, None));
    assert!(d.fdb.is_empty());

    let d = run(&[pool("CrossSubnet", "Never")], &nodes());
    assert_eq!(
        d.ipip,
        Some(Ipip {
            address: Some("10.244.0.2".parse().unwrap())
        })
    );
    assert_eq!(d.vxlan, None);

    let d = run(&[pool("Never", "Always")], &nodes());
    assert_eq!(d.ipip, None);
    assert_eq!(
        d.vxlan,
        Some(Vxlan {
            vni: 4096,
            port: 4789,
            local: Some("10.0.0.1".parse().unwrap()),
            mac: [0x66, 0, 0, 0, 0, 0x0a],
            address: Some("10.244.0.1".parse().unwrap()),
        })
    );
    // Every other node: ARP for its tunnel address, FDB for its VTEP; node-c's MAC is
    // derived from its name (0x66 + SHA1("node-c")[..5] = 1a b9 f1 6e af).
    let c_mac = [0x66, 0x1a, 0xb9, 0xf1, 0x6e, 0xaf];
    assert_eq!(
        d.fdb,
        BTreeSet::from([
            Fdb {
                mac: [0x66, 0, 0, 0, 0, 0x0b],
                dst: ip("10.0.0.2")
            },
            Fdb {
                mac: c_mac,
                dst: ip("10.1.0.3")
            },
        ])
    );
    let arp: Vec<_> = d
        .neighbours
        .iter()
        .filter(|n| n.dev == VXLAN_DEV)
        .cloned()
        .collect();
    assert_eq!(
        arp,
        vec![
            Neighbour {
                dev: VXLAN_DEV.into(),
                ip: ip("10.244.1.1"),
                mac: [0x66, 0, 0, 0, 0, 0x0b]
            },
            Neighbour {
                dev: VXLAN_DEV.into(),
                ip: ip("10.244.2.1"),
                mac: c_mac
            },
        ]
    );
}

/// A node that leaves the datastore takes its VTEP with it; its block (not yet released)
/// gets no VXLAN route, and the reason is given. A node that joins gets one.
#[test]
fn nodes_removed_and_added() {
    let mut without_c = nodes();
    without_c.remove("node-c");
    let d = run(&[pool("Never", "Always")], &without_c);
    assert!(!d.routes.contains_key(&net("10.244.2.0/26")));
    assert!(!d.routes.contains_key(&net("10.244.0.5/32")));
    assert!(!d.fdb.iter().any(|f| f.dst == ip("10.1.0.3")));
    assert!(
        d.problems.iter().any(|p| p
            .to_string()
            .contains("node node-c is not in the datastore")),
        "{:?}",
        d.problems
    );
    let d = run(&[pool("Never", "Always")], &nodes());
    assert_eq!(
        d.routes[&net("10.244.2.0/26")],
        via("10.244.2.1", VXLAN_DEV)
    );

    // A node without its tunnel address yet: no route through a tunnel that is not there.
    let mut early = nodes();
    early.get_mut("node-c").unwrap().ipv4_vxlan_tunnel_addr = None;
    let d = run(&[pool("Never", "Always")], &early);
    assert!(!d.routes.contains_key(&net("10.244.2.0/26")));
    assert!(
        d.problems
            .iter()
            .any(|p| p.to_string().contains("ipv4VXLANTunnelAddr"))
    );
    // Same subnet under CrossSubnet needs no tunnel address.
    let mut early = nodes();
    early.get_mut("node-b").unwrap().ipv4_vxlan_tunnel_addr = None;
    let d = run(&[pool("Never", "CrossSubnet")], &early);
    assert_eq!(d.routes[&net("10.244.1.0/26")], via("10.0.0.2", ""));
}

#[test]
fn nat_outgoing_sets() {
    let mut other = pool("Never", "Never");
    other.cidr = "10.96.0.0/16".into();
    other.nat_outgoing = false;
    let settings = Settings {
        nat_outgoing_address: Some(ip("10.0.0.100")),
        ..Default::default()
    };
    let d = without_workloads(&[pool("Never", "Never"), other], &settings);
    assert_eq!(d.nat.masquerade, BTreeSet::from([net("10.244.0.0/16")]));
    assert_eq!(
        d.nat.all,
        BTreeSet::from([net("10.244.0.0/16"), net("10.96.0.0/16")])
    );
    assert_eq!(d.nat.snat_to, Some(ip("10.0.0.100")));
}

/// The most specific pool decides: a /24 pool in VXLAN inside a /16 pool without
/// encapsulation.
#[test]
fn the_most_specific_pool_decides_the_mode() {
    let mut inner = pool("Never", "Always");
    inner.cidr = "10.244.2.0/24".into();
    let d = run(&[pool("Never", "Never"), inner], &nodes());
    assert_eq!(d.routes[&net("10.244.1.0/26")], via("10.0.0.2", ""));
    assert_eq!(
        d.routes[&net("10.244.2.0/26")],
        via("10.244.2.1", VXLAN_DEV)
    );
}

#[test]
fn macs_parse_strictly() {
    assert_eq!(
        parse_mac("66:0a:0B:00:ff:01"),
        Some([0x66, 0x0a, 0x0b, 0, 0xff, 1])
    );
    assert_eq!(parse_mac("66:0a:0b:00:ff"), None);
    assert_eq!(parse_mac("66:0a:0b:00:ff:01:02"), None);
    assert_eq!(parse_mac("zz:0a:0b:00:ff:01"), None);
}

/// BGP routes inside a service range are not programmed (kube-proxy owns those
/// addresses); the others are.
#[test]
fn bgp_routes_inside_service_ranges_are_not_programmed() {
    let input = |settings| without_workloads(&[pool("Never", "Never")], settings);
    let default = Settings::default();
    let plain = input(&default);
    assert_eq!(plain.routes[&net("192.168.50.0/24")], via("10.0.0.2", ""));
    let services = Settings {
        service_ranges: vec![net("192.168.0.0/16")],
        ..Default::default()
    };
    let d = input(&services);
    assert!(!d.routes.contains_key(&net("192.168.50.0/24")));
    assert_eq!(d.routes[&net("10.244.1.0/26")], via("10.0.0.2", ""));
}

/// What cannot be programmed is a typed problem naming the workload, or the destination
/// and its node, in the words the log and readiness show; the rest is programmed.
#[test]
fn problems_name_the_workload_or_the_node_they_are_about() {
    let mut bad = workload();
    bad.ip_networks = vec!["10.244.0.3/32".into(), "10.244.0.x".into()];
    let mut no_address = nodes();
    no_address.get_mut("node-b").unwrap().bgp = None;
    let (blocks, bgp, settings) = (blocks(), bgp(), Settings::default());
    let (pools, workloads) = (keyed([pool("Never", "Always")]), keyed([bad]));
    let d = calculate(&Input {
        node: ME,
        nodes: &no_address,
        pools: &pools,
        workloads: &workloads,
        blocks: &blocks,
        bgp: &bgp,
        settings: &settings,
    });
    assert!(d.routes.contains_key(&net("10.244.0.3/32")));
    assert_eq!(
        d.problems,
        [
            CalcProblem::NotACidr {
                interface: "cali0123456789a".into(),
                entry: "10.244.0.x".into(),
            },
            CalcProblem::NoNodeAddress {
                dst: net("10.244.1.0/26"),
                node: "node-b".into(),
            },
        ]
    );
    let text: Vec<String> = d.problems.iter().map(ToString::to_string).collect();
    assert_eq!(
        text,
        [
            "workload cali0123456789a: ipNetworks entry \"10.244.0.x\" is not a CIDR",
            "10.244.1.0/26: node node-b has no spec.bgp.ipv4Address",
        ]
    );
}
