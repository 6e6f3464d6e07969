//! The rules of REFERENCE §5 about routes, on plans: the kernel's routes are built here,
//! no root, no kernel.

use super::*;

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// Interfaces of the tests: eth0 (the uplink, 2), two workloads, the tunnels.
fn links() -> HashMap<String, u32> {
    [
        ("eth0", 2),
        ("cali1", 10),
        ("cali2", 11),
        (VXLAN_DEV, 20),
        (TUNL0, 21),
    ]
    .into_iter()
    .map(|(n, i)| (n.to_string(), i))
    .collect()
}

const UPLINK: Option<u32> = Some(2);

/// A route of the main table as a dump reports it.
fn raw(dst: &str, protocol: u8, oif: Option<u32>, gateway: Option<&str>) -> RawRoute {
    RawRoute {
        dst: net(dst),
        table: 254,
        kind: if oif.is_some() { 1 } else { 6 },
        protocol,
        scope: if gateway.is_some() || oif.is_none() {
            0
        } else {
            253
        },
        flags: if gateway.is_some() { 4 } else { 0 },
        oif,
        gateway: gateway.map(|g| g.parse().unwrap()),
        priority: 0,
    }
}

fn workload(dev: &str) -> Route {
    Route {
        target: Target::Link(dev.into()),
        protocol: 3,
    }
}

fn blackhole() -> Route {
    Route {
        target: Target::Blackhole,
        protocol: PROTO_FELIX,
    }
}

fn via(gateway: &str, dev: Dev) -> Route {
    Route {
        target: Target::Via {
            gateway: gateway.parse().unwrap(),
            dev,
        },
        protocol: PROTO_FELIX,
    }
}

fn table(routes: &[(&str, Route)]) -> RouteTable {
    routes.iter().map(|(p, r)| (net(p), r.clone())).collect()
}

fn plan_of(
    desired: &RouteTable,
    observed: Vec<RawRoute>,
    keep: &[IpNet],
    only: Option<u32>,
) -> Plan {
    let links = links();
    let own = Ownership {
        links: &links,
        prefix: "cali",
        uplink: UPLINK,
    };
    plan(desired, observed, &own, keep, only)
}

fn deleted(p: &Plan) -> Vec<IpNet> {
    let mut d: Vec<IpNet> = p
        .ops
        .iter()
        .filter_map(|op| match op {
            Op::Del(r) => Some(r.dst),
            _ => None,
        })
        .collect();
    d.sort();
    d
}

fn put(p: &Plan) -> Vec<IpNet> {
    let mut d: Vec<IpNet> = p
        .ops
        .iter()
        .filter_map(|op| match op {
            Op::Put(p, _) => Some(*p),
            _ => None,
        })
        .collect();
    d.sort();
    d
}

#[test]
fn desired_routes_absent_from_the_kernel_are_put_in_their_kernel_form() {
    let desired = table(&[
        ("10.244.0.0/26", blackhole()),
        ("10.244.0.5/32", workload("cali1")),
        ("10.244.1.0/26", via("10.0.0.2", Dev::Uplink)),
        (
            "10.244.2.0/26",
            via("10.244.2.1", Dev::Named(VXLAN_DEV.into())),
        ),
    ]);
    let p = plan_of(&desired, vec![], &[], None);
    assert!(p.failures.is_empty(), "{:?}", p.failures);
    assert_eq!(p.looked_at, 4);
    let kernel = |prefix: &str| {
        p.ops
            .iter()
            .find_map(|op| match op {
                Op::Put(q, k) if *q == net(prefix) => Some(k.clone()),
                _ => None,
            })
            .unwrap()
    };
    // `blackhole <block> proto 80`.
    let b = kernel("10.244.0.0/26");
    assert_eq!(
        (b.kind, b.oif, b.protocol),
        (RouteType::BlackHole, None, 80)
    );
    // `<ip>/32 dev caliX scope link` (protocol 3).
    let w = kernel("10.244.0.5/32");
    assert_eq!(
        (w.kind, w.oif, w.scope, w.protocol, w.onlink),
        (RouteType::Unicast, Some(10), RouteScope::Link, 3, false)
    );
    // `<block> via <node IP> dev <parent> onlink proto 80`.
    let n = kernel("10.244.1.0/26");
    assert_eq!(
        (n.oif, n.gateway, n.onlink, n.scope),
        (
            Some(2),
            Some("10.0.0.2".parse().unwrap()),
            true,
            RouteScope::Universe
        )
    );
    assert_eq!(kernel("10.244.2.0/26").oif, Some(20));
}

#[test]
fn a_route_already_as_desired_is_left_alone() {
    let desired = table(&[
        ("10.244.0.0/26", blackhole()),
        ("10.244.1.0/26", via("10.0.0.2", Dev::Uplink)),
    ]);
    let observed = vec![
        raw("10.244.0.0/26", 80, None, None),
        raw("10.244.1.0/26", 80, Some(2), Some("10.0.0.2")),
    ];
    let p = plan_of(&desired, observed, &[], None);
    assert!(p.ops.is_empty(), "{:?}", p.ops);
    assert_eq!(p.looked_at, 2);
}

#[test]
fn a_changed_route_is_replaced_in_place_without_a_deletion() {
    let desired = table(&[("10.244.1.0/26", via("10.0.0.3", Dev::Uplink))]);
    let observed = vec![raw("10.244.1.0/26", 80, Some(2), Some("10.0.0.2"))];
    let p = plan_of(&desired, observed, &[], None);
    assert_eq!(p.ops.len(), 1, "{:?}", p.ops);
    assert!(
        matches!(&p.ops[0], Op::Put(q, k) if *q == net("10.244.1.0/26")
        && k.gateway == Some("10.0.0.3".parse().unwrap()))
    );
}

#[test]
fn routes_of_ours_with_other_metrics_are_deleted_before_the_put() {
    let desired = table(&[
        ("10.244.1.0/26", via("10.0.0.2", Dev::Uplink)),
        ("fd00:244:1::/122", blackhole()),
    ]);
    // The only route of ours for the prefix, of another metric and another gateway.
    let mut metric20 = raw("10.244.1.0/26", 80, Some(2), Some("10.0.0.9"));
    metric20.priority = 20;
    // IPv6's default metric is 1024: that route is the one replaced in place.
    let mut v6_default = raw("fd00:244:1::/122", 80, Some(2), Some("fd00::9"));
    v6_default.priority = 1024;
    let mut v6_other = raw("fd00:244:1::/122", 80, None, None);
    v6_other.priority = 7;
    let p = plan_of(
        &desired,
        vec![metric20.clone(), v6_default, v6_other.clone()],
        &[],
        None,
    );
    assert_eq!(
        p.ops,
        vec![
            Op::Del(metric20),
            Op::Put(
                net("10.244.1.0/26"),
                wanted(&via("10.0.0.2", Dev::Uplink), &links(), UPLINK).unwrap()
            ),
            Op::Del(v6_other),
            Op::Put(
                net("fd00:244:1::/122"),
                wanted(&blackhole(), &links(), UPLINK).unwrap()
            ),
        ]
    );
    // A lone route of ours that differs only by its metric is as desired (the metric is
    // not compared): nothing to do.
    let mut same = raw("10.244.1.0/26", 80, Some(2), Some("10.0.0.2"));
    same.priority = 20;
    let lone = table(&[("10.244.1.0/26", via("10.0.0.2", Dev::Uplink))]);
    assert!(plan_of(&lone, vec![same], &[], None).ops.is_empty());
}

#[test]
fn protocol_80_routes_are_ours_on_any_interface_and_go_when_not_desired() {
    let observed = vec![
        raw("10.244.9.0/26", 80, None, None),
        raw("10.244.8.0/26", 80, Some(2), Some("10.0.0.8")),
        // A route of another table is never looked at.
        RawRoute {
            table: 100,
            ..raw("10.244.7.0/26", 80, None, None)
        },
    ];
    let p = plan_of(&RouteTable::default(), observed, &[], None);
    assert_eq!(
        deleted(&p),
        vec![net("10.244.8.0/26"), net("10.244.9.0/26")]
    );
}

#[test]
fn routes_on_tunnels_and_named_workloads_are_ours_except_the_kernels_own() {
    let desired = table(&[("10.244.0.5/32", workload("cali1"))]);
    let observed = vec![
        // Any protocol on vxlan.calico, tunl0 and a workload interface an endpoint names.
        raw("10.244.5.0/26", 4, Some(20), Some("10.244.5.1")),
        raw("10.244.6.0/26", 3, Some(21), Some("10.244.6.1")),
        raw("10.244.0.9/32", 3, Some(10), None),
        // `proto kernel` (connected subnets, link-local) never is.
        raw("10.244.1.0/32", PROTO_KERNEL, Some(20), None),
        raw("10.244.0.5/32", 3, Some(10), None),
    ];
    let p = plan_of(&desired, observed, &[], None);
    assert_eq!(
        deleted(&p),
        vec![
            net("10.244.0.9/32"),
            net("10.244.5.0/26"),
            net("10.244.6.0/26")
        ]
    );
    assert!(put(&p).is_empty(), "the workload's route is as desired");
}

#[test]
fn foreign_routes_and_unnamed_workload_interfaces_are_never_touched() {
    let desired = table(&[("10.244.0.5/32", workload("cali1"))]);
    let observed = vec![
        // Another protocol on the uplink: not ours.
        raw("192.168.0.0/24", 4, Some(2), Some("10.0.0.254")),
        raw("0.0.0.0/0", 3, Some(2), Some("10.0.0.254")),
        // cali2: no endpoint names it yet, so its route is the CNI plugin's.
        raw("10.244.0.7/32", 3, Some(11), None),
        // An interface we do not know.
        raw("10.9.0.0/16", 4, Some(99), None),
    ];
    let p = plan_of(&desired, observed, &[], None);
    assert_eq!(put(&p), vec![net("10.244.0.5/32")]);
    assert!(deleted(&p).is_empty(), "{:?}", p.ops);
}

#[test]
fn bgp_routes_via_a_gateway_inside_keep_survive_a_restart() {
    let keep = [net("10.244.0.0/16")];
    let observed = vec![
        raw("10.244.1.0/26", 80, Some(2), Some("10.0.0.2")),
        raw("10.244.2.0/26", 80, Some(20), Some("10.244.2.1")),
        // No gateway: a blackhole of ours is not BGP's, it goes.
        raw("10.244.3.0/26", 80, None, None),
        // Outside the kept pools: goes.
        raw("10.99.0.0/26", 80, Some(2), Some("10.0.0.2")),
    ];
    let p = plan_of(&RouteTable::default(), observed.clone(), &keep, None);
    assert_eq!(deleted(&p), vec![net("10.99.0.0/26"), net("10.244.3.0/26")]);
    // Once BGP has its table (nothing kept), they go too.
    let p = plan_of(&RouteTable::default(), observed, &[], None);
    assert_eq!(deleted(&p).len(), 4);
}

#[test]
fn a_pass_of_one_interface_looks_only_at_its_routes() {
    let desired = table(&[
        ("10.244.0.5/32", workload("cali1")),
        ("10.244.0.6/32", workload("cali2")),
        ("10.244.0.0/26", blackhole()),
        ("10.244.1.0/26", via("10.0.0.2", Dev::Uplink)),
        (
            "10.244.2.0/26",
            via("10.244.2.1", Dev::Named(VXLAN_DEV.into())),
        ),
    ]);
    // The kernel's dump of cali1's routes only.
    let p = plan_of(
        &desired,
        vec![raw("10.244.0.9/32", 3, Some(10), None)],
        &[],
        Some(10),
    );
    assert_eq!(p.looked_at, 1);
    assert_eq!(put(&p), vec![net("10.244.0.5/32")]);
    assert_eq!(deleted(&p), vec![net("10.244.0.9/32")]);
    // The uplink's pass covers the routes via Dev::Uplink.
    let p = plan_of(&desired, vec![], &[], Some(2));
    assert_eq!((p.looked_at, put(&p)), (1, vec![net("10.244.1.0/26")]));
}

#[test]
fn a_route_through_a_missing_interface_is_a_failure_and_the_rest_goes_on() {
    let desired = table(&[
        ("10.244.3.0/26", via("10.244.3.1", Dev::Named(TUNL0.into()))),
        (
            "10.244.4.0/26",
            via("10.244.4.1", Dev::Named("cali9".into())),
        ),
        ("10.244.0.0/26", blackhole()),
    ]);
    let mut links = links();
    links.remove(TUNL0);
    let own = Ownership {
        links: &links,
        prefix: "cali",
        uplink: None,
    };
    let mut desired_uplink = desired.clone();
    desired_uplink.insert(net("10.244.1.0/26"), via("10.0.0.2", Dev::Uplink));
    let p = plan(&desired_uplink, vec![], &own, &[], None);
    let mut reasons: Vec<(IpNet, RouteReason)> = p
        .failures
        .iter()
        .map(|f| match f {
            RouteFailure::Route { prefix, reason } => (*prefix, reason.clone()),
            other => panic!("{other}"),
        })
        .collect();
    reasons.sort_by_key(|(p, _)| *p);
    assert_eq!(
        reasons,
        vec![
            (net("10.244.1.0/26"), RouteReason::NoUplink),
            (net("10.244.3.0/26"), RouteReason::NoInterface(TUNL0.into())),
            (
                net("10.244.4.0/26"),
                RouteReason::NoInterface("cali9".into())
            ),
        ]
    );
    assert_eq!(put(&p), vec![net("10.244.0.0/26")]);
    assert!(p.failures[0].contains("no interface") || p.failures[0].contains("node's IP"));
}

#[test]
fn requests_come_in_the_tries_bit_reversed_order() {
    let desired: RouteTable = (0..8u32)
        .map(|i| {
            let p =
                IpNet::V4(ipnet::Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + (i << 8)), 24).unwrap());
            (p, blackhole())
        })
        .chain([(net("fd00::/122"), blackhole())])
        .collect();
    let p = plan_of(&desired, vec![], &[], None);
    let order: Vec<String> = p.ops.iter().map(|op| op.prefix().to_string()).collect();
    assert_eq!(
        order,
        [
            "10.0.0.0/24",
            "10.0.4.0/24",
            "10.0.2.0/24",
            "10.0.6.0/24",
            "10.0.1.0/24",
            "10.0.5.0/24",
            "10.0.3.0/24",
            "10.0.7.0/24",
            "fd00::/122"
        ]
    );
}

#[test]
fn bgp_changes_put_new_routes_and_remove_exactly_what_was_programmed() {
    let changes: Vec<Change> = vec![
        (
            net("10.244.1.0/26"),
            None,
            Some(via("10.0.0.2", Dev::Uplink)),
        ),
        (
            net("10.244.2.0/26"),
            Some(via("10.0.0.2", Dev::Uplink)),
            Some(via("10.0.0.3", Dev::Uplink)),
        ),
        (
            net("10.244.3.0/26"),
            Some(via("10.0.0.4", Dev::Uplink)),
            None,
        ),
        // Its interface is gone, and the route with it: nothing to remove.
        (
            net("10.244.4.0/26"),
            Some(via("10.244.4.1", Dev::Named("gone".into()))),
            None,
        ),
        (
            net("10.244.5.0/26"),
            None,
            Some(via("10.244.5.1", Dev::Named("gone".into()))),
        ),
        (net("10.244.6.0/26"), None, None),
    ];
    assert!(names_a_link(&changes));
    assert!(!names_a_link(&changes[..3]));
    let (ops, failures) = plan_changes(&changes, &links(), UPLINK);
    let k = |gw: &str| wanted(&via(gw, Dev::Uplink), &links(), UPLINK).unwrap();
    assert_eq!(
        ops,
        vec![
            Op::Put(net("10.244.1.0/26"), k("10.0.0.2")),
            Op::Put(net("10.244.2.0/26"), k("10.0.0.3")),
            Op::Remove(net("10.244.3.0/26"), k("10.0.0.4")),
        ]
    );
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].to_string(), "10.244.5.0/26: no interface gone");
}

#[test]
fn failures_read_as_before_and_become_problems() {
    let refused = RouteFailure::Route {
        prefix: net("10.244.1.0/26"),
        reason: RouteReason::Refused {
            errno: libc::ENETUNREACH,
        },
    };
    assert_eq!(
        refused.to_string(),
        "10.244.1.0/26: Network is unreachable (os error 101)"
    );
    assert!(matches!(
        Problem::from(refused),
        Problem::Route {
            reason: RouteReason::Refused {
                errno: libc::ENETUNREACH
            },
            ..
        }
    ));
    let whole = RouteFailure::Netlink(NetlinkError::kernel("list routes", libc::EPERM));
    assert!(
        matches!(Problem::from(whole), Problem::Routes(RouteError::Kernel(e)) if e.errno() == Some(libc::EPERM))
    );
}
#[test]
fn trie_order_spreads_consecutive_blocks_and_puts_ipv4_first() {
    let mut blocks: Vec<IpNet> = (0..8u32)
        .map(|i| {
            IpNet::V4(ipnet::Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + (i << 8)), 24).unwrap())
        })
        .collect();
    blocks.sort_by_key(trie_order);
    let thirds: Vec<u8> = blocks
        .iter()
        .map(|b| match b {
            IpNet::V4(n) => n.addr().octets()[2],
            IpNet::V6(_) => unreachable!(),
        })
        .collect();
    // The bit-reversal permutation of 0..8.
    assert_eq!(thirds, [0, 4, 2, 6, 1, 5, 3, 7]);
    // The prefix length breaks ties of one address; IPv6 sorts after every IPv4.
    let a: IpNet = "10.0.0.0/24".parse().unwrap();
    let b: IpNet = "10.0.0.0/26".parse().unwrap();
    let v6: IpNet = "fd00::/122".parse().unwrap();
    let top: IpNet = "255.255.255.255/32".parse().unwrap();
    assert!(trie_order(&a) < trie_order(&b));
    assert!(trie_order(&top) < trie_order(&v6));
}

#[test]
fn puts_are_replaces_and_deletions_name_exactly_the_route_seen() {
    let k = wanted(&via("10.0.0.2", Dev::Uplink), &links(), UPLINK).unwrap();
    let Request::Replace(m) = Op::Put(net("10.244.1.0/26"), k.clone()).request() else {
        panic!("a put replaces (REFERENCE §5: replace semantics)");
    };
    assert_eq!(m.header.table, RouteHeader::RT_TABLE_MAIN);
    assert!(m.header.flags.contains(RouteFlags::Onlink));
    assert_eq!(u8::from(m.header.protocol), PROTO_FELIX);
    assert!(m.attributes.contains(&RouteAttribute::Oif(2)));
    // A route of another metric is deleted with its metric, so that no other goes.
    let mut seen = raw("10.244.1.0/26", 80, Some(2), Some("10.0.0.9"));
    seen.priority = 20;
    let Request::Delete(d) = Op::Del(seen).request() else {
        panic!("a deletion deletes");
    };
    assert!(d.attributes.contains(&RouteAttribute::Priority(20)));
    assert!(d.attributes.contains(&RouteAttribute::Oif(2)));
    // BGP's removal deletes the route as programmed.
    let Request::Delete(r) = Op::Remove(net("10.244.1.0/26"), k).request() else {
        panic!("a removal deletes");
    };
    assert_eq!(r.header.scope, RouteScope::Universe);
    assert!(
        !r.attributes
            .iter()
            .any(|a| matches!(a, RouteAttribute::Priority(_)))
    );
}
