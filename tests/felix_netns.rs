//! Felix reconcilers in fresh network namespaces. Routes: it programs exactly the
//! desired routes of ours, leaves every other route alone, removes stale ones of ours, puts
//! back a route deleted by hand, and a pass with nothing to do changes nothing. Tunnels:
//! vxlan.calico made, kept, remade when its settings differ, removed; tunl0 made, or one
//! clear error on a kernel without ipip. Neighbours and FDB entries of ours made exactly.
//! NAT outgoing: our nftables tables exactly, replaced as pools change, others untouched.
//! Host veth sysctls: the CNI plugin writes the shared list, Felix keeps only its own.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use calico_node::felix::calc::Nat;
use calico_node::felix::calc::{Dev, Fdb, Ipip, Neighbour, Route, Target, Vxlan};
use calico_node::felix::neigh;
use calico_node::felix::nft::PolicyTables;
use calico_node::felix::policy::PolicyDataplane;
use calico_node::felix::routes::{Pass, reconcile};
use calico_node::felix::tunnels::{Outcome, TunnelError, ensure_ipip, ensure_vxlan};
use calico_node::model::felix::PROTO_FELIX;
use calico_node::netlink::Writer;
use calico_node::netlink::links::interface_with;
use common::NetNs;
use ipnet::IpNet;

fn routes(ns: &NetNs, v6: bool) -> Vec<String> {
    let fam = if v6 { "-6" } else { "-4" };
    let out = Command::new("ip")
        .args(["-n", &ns.name, fam, "route", "show", "table", "main"])
        .output()
        .unwrap();
    let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.starts_with("fe80::") && !l.starts_with("multicast"))
        .collect();
    lines.sort();
    lines
}

fn pass(ns: &NetNs, desired: &BTreeMap<IpNet, Route>) -> Pass {
    pass_keeping(ns, desired, &[], None)
}

/// A pass over the routes through interface `only`.
fn pass_of(ns: &NetNs, desired: &BTreeMap<IpNet, Route>, only: &str) -> Pass {
    pass_keeping(ns, desired, &[], Some(only))
}

fn pass_keeping(
    ns: &NetNs,
    desired: &BTreeMap<IpNet, Route>,
    keep: &[IpNet],
    only: Option<&str>,
) -> Pass {
    let desired: calico_node::felix::calc::RouteTable =
        desired.iter().map(|(p, r)| (*p, r.clone())).collect();
    let keep = keep.to_vec();
    let only = only.map(|n| ns.ifindex(n));
    ns.with_netlink(move |h| async move {
        let uplink = interface_with(&h, "10.0.0.1".parse().unwrap())
            .await
            .unwrap();
        let (w, _failures) = Writer::spawn().unwrap();
        reconcile(&h, &w, &desired, ("cali", uplink), &keep, only)
            .await
            .unwrap()
    })
}

fn show(ns: &NetNs, program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(["-n", &ns.name])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A namespace with `eth0` (10.0.0.1/24) and a `cali` interface: veth pairs, both ends up
/// (this kernel has no dummy interfaces).
fn node_ns(prefix: &str, extra: &[&str]) -> Option<NetNs> {
    let ns = NetNs::new(prefix)?;
    for (i, name) in ["eth0", "cali0123456789a"].iter().chain(extra).enumerate() {
        let peer = format!("peer{i}");
        ns.ip(&["link", "add", name, "type", "veth", "peer", "name", &peer]);
        ns.ip(&["link", "set", &peer, "up"]);
        ns.ip(&["link", "set", name, "up"]);
    }
    ns.ip(&["addr", "add", "10.0.0.1/24", "dev", "eth0"]);
    Some(ns)
}

fn route(target: Target, protocol: u8) -> Route {
    Route { target, protocol }
}

#[test]
fn routes_of_ours_match_the_desired_ones_and_nothing_else_is_touched() {
    let Some(ns) = node_ns("felix-rt", &["vxlan.calico"]) else {
        return;
    };
    ns.ip(&["addr", "add", "fd00:99::1/64", "dev", "eth0", "nodad"]);
    // Someone else's routes, and stale ones of ours (protocol 80; any route on a cali
    // interface).
    ns.ip(&[
        "route",
        "add",
        "10.50.0.0/24",
        "via",
        "10.0.0.254",
        "proto",
        "static",
    ]);
    ns.ip(&[
        "route",
        "add",
        "192.168.7.0/24",
        "dev",
        "eth0",
        "proto",
        "kernel",
        "scope",
        "link",
    ]);
    ns.ip(&[
        "route",
        "add",
        "10.99.0.0/26",
        "via",
        "10.0.0.9",
        "dev",
        "eth0",
        "onlink",
        "proto",
        "80",
    ]);
    ns.ip(&[
        "route",
        "add",
        "10.244.9.9/32",
        "dev",
        "cali0123456789a",
        "scope",
        "link",
    ]);
    // One of ours with the wrong next hop.
    ns.ip(&[
        "route",
        "add",
        "10.244.1.0/26",
        "via",
        "10.0.0.7",
        "dev",
        "eth0",
        "onlink",
        "proto",
        "80",
    ]);
    // Second routes of ours for a desired prefix and for a stale one, with other metrics.
    for (dst, metric) in [("10.244.1.0/26", "50"), ("10.99.0.0/26", "7")] {
        ns.ip(&[
            "route", "add", dst, "via", "10.0.0.8", "dev", "eth0", "onlink", "proto", "80",
            "metric", metric,
        ]);
    }
    let foreign_v4 = [
        "10.0.0.0/24 dev eth0 proto kernel scope link src 10.0.0.1",
        "10.50.0.0/24 via 10.0.0.254 dev eth0 proto static",
        "192.168.7.0/24 dev eth0 proto kernel scope link",
    ];

    let net = |s: &str| s.parse::<IpNet>().unwrap();
    let desired = BTreeMap::from([
        (net("10.244.0.0/26"), route(Target::Blackhole, PROTO_FELIX)),
        (
            net("10.244.0.3/32"),
            route(Target::Link("cali0123456789a".into()), 3),
        ),
        (
            net("10.244.1.0/26"),
            route(
                Target::Via {
                    gateway: "10.0.0.2".parse().unwrap(),
                    dev: Dev::Uplink,
                },
                PROTO_FELIX,
            ),
        ),
        (
            net("10.244.2.0/26"),
            route(
                Target::Via {
                    gateway: "10.244.2.1".parse().unwrap(),
                    dev: Dev::Named("vxlan.calico".into()),
                },
                PROTO_FELIX,
            ),
        ),
        (
            net("fd00:244:1::/122"),
            route(
                Target::Via {
                    gateway: "fd00:99::2".parse().unwrap(),
                    dev: Dev::Uplink,
                },
                PROTO_FELIX,
            ),
        ),
    ]);
    let first = pass(&ns, &desired);
    assert!(first.failures.is_empty(), "{first:?}");
    assert_eq!(
        (first.added_or_replaced, first.deleted),
        (5, 4),
        "{first:?}"
    );
    let mut expected_v4: Vec<String> = foreign_v4.iter().map(|s| s.to_string()).collect();
    expected_v4.extend(
        [
            "blackhole 10.244.0.0/26 proto 80",
            "10.244.0.3 dev cali0123456789a scope link",
            "10.244.1.0/26 via 10.0.0.2 dev eth0 proto 80 onlink",
            "10.244.2.0/26 via 10.244.2.1 dev vxlan.calico proto 80 onlink",
        ]
        .map(String::from),
    );
    expected_v4.sort();
    assert_eq!(routes(&ns, false), expected_v4);
    assert!(
        routes(&ns, true).contains(
            &"fd00:244:1::/122 via fd00:99::2 dev eth0 proto 80 metric 1024 onlink pref medium"
                .to_string()
        ),
        "{:?}",
        routes(&ns, true)
    );

    // Nothing to do: nothing done.
    let again = pass(&ns, &desired);
    assert_eq!(
        (again.added_or_replaced, again.deleted),
        (0, 0),
        "{again:?}"
    );

    // A route of ours deleted by another tool comes back; foreign ones stay.
    ns.ip(&["route", "del", "10.244.1.0/26"]);
    let repair = pass(&ns, &desired);
    assert_eq!((repair.added_or_replaced, repair.deleted), (1, 0));
    assert_eq!(routes(&ns, false), expected_v4);

    // A pass over one interface (what an interface event triggers) repairs the routes
    // through it and no other.
    ns.ip(&["route", "del", "10.244.1.0/26"]);
    ns.ip(&["route", "del", "10.244.0.3/32"]);
    let p = pass_of(&ns, &desired, "cali0123456789a");
    assert_eq!((p.added_or_replaced, p.deleted, p.ours), (1, 0, 1), "{p:?}");
    let now = routes(&ns, false);
    assert!(now.contains(&"10.244.0.3 dev cali0123456789a scope link".to_string()));
    assert!(
        !now.iter().any(|r| r.starts_with("10.244.1.0/26")),
        "{now:?}"
    );
    // eth0 carries an IPv4 and an IPv6 route of ours.
    let p = pass_of(&ns, &desired, "eth0");
    assert_eq!((p.added_or_replaced, p.deleted, p.ours), (1, 0, 2), "{p:?}");
    assert_eq!(routes(&ns, false), expected_v4);
    // Routes of ours that are not desired go with their interface's pass only.
    ns.ip(&[
        "route",
        "add",
        "10.244.9.0/26",
        "via",
        "10.0.0.9",
        "dev",
        "eth0",
        "proto",
        "80",
        "onlink",
    ]);
    ns.ip(&[
        "route",
        "add",
        "10.244.8.0/26",
        "via",
        "10.244.2.9",
        "dev",
        "vxlan.calico",
        "proto",
        "80",
        "onlink",
    ]);
    let p = pass_of(&ns, &desired, "eth0");
    assert_eq!((p.added_or_replaced, p.deleted), (0, 1), "{p:?}");
    assert!(
        routes(&ns, false)
            .iter()
            .any(|r| r.starts_with("10.244.8.0/26 via 10.244.2.9 dev vxlan.calico"))
    );
    let p = pass_of(&ns, &desired, "vxlan.calico");
    assert_eq!((p.added_or_replaced, p.deleted), (0, 1), "{p:?}");
    assert_eq!(routes(&ns, false), expected_v4);

    // A desired route through a missing interface is reported, the rest programmed.
    let mut broken = desired.clone();
    broken.insert(
        net("10.244.3.0/26"),
        route(
            Target::Via {
                gateway: "10.244.3.1".parse().unwrap(),
                dev: Dev::Named("tunl0".into()),
            },
            PROTO_FELIX,
        ),
    );
    let p = pass(&ns, &broken);
    assert!(
        p.failures
            .iter()
            .any(|f| f.contains("10.244.3.0/26") && f.contains("tunl0")),
        "{p:?}"
    );
    assert_eq!(routes(&ns, false), expected_v4);

    // Nothing desired: every route of ours goes, except the one on a workload interface no
    // endpoint names (the CNI plugin's until its endpoint arrives); the others stay.
    let gone = pass(&ns, &BTreeMap::new());
    assert_eq!(gone.deleted, 4, "{gone:?}");
    let mut left: Vec<String> = foreign_v4.map(String::from).to_vec();
    left.push("10.244.0.3 dev cali0123456789a scope link".into());
    left.sort();
    assert_eq!(routes(&ns, false), left);
}

#[test]
fn routes_via_a_gateway_inside_kept_pools_survive_until_bgp_has_its_table() {
    let Some(ns) = node_ns("felix-keep", &[]) else {
        return;
    };
    let via = |nh: &str| {
        route(
            Target::Via {
                gateway: nh.parse().unwrap(),
                dev: Dev::Uplink,
            },
            PROTO_FELIX,
        )
    };
    // Learned over BGP before a restart: a remote block, and one in a pool being removed.
    let learned = BTreeMap::from([
        ("10.244.1.0/26".parse().unwrap(), via("10.0.0.2")),
        ("10.245.0.0/26".parse().unwrap(), via("10.0.0.3")),
        (
            "10.244.0.0/26".parse().unwrap(),
            route(Target::Blackhole, PROTO_FELIX),
        ),
    ]);
    pass(&ns, &learned);
    // After the restart, before the speaker's table: only the local blackhole is known.
    let local: BTreeMap<IpNet, Route> = learned
        .iter()
        .filter(|(_, r)| r.target == Target::Blackhole)
        .map(|(p, r)| (*p, r.clone()))
        .collect();
    let pools: Vec<IpNet> = vec!["10.244.0.0/16".parse().unwrap()];
    let kept = pass_keeping(&ns, &BTreeMap::new(), &pools, None);
    assert_eq!(
        kept.deleted, 2,
        "the blackhole and the route outside the kept pools go: {kept:?}"
    );
    pass_keeping(&ns, &local, &pools, None);
    let r = routes(&ns, false);
    assert!(
        r.contains(&"10.244.1.0/26 via 10.0.0.2 dev eth0 proto 80 onlink".to_string()),
        "{r:?}"
    );
    assert!(!r.iter().any(|l| l.starts_with("10.245.0.0/26")), "{r:?}");
    assert!(
        r.contains(&"blackhole 10.244.0.0/26 proto 80".to_string()),
        "{r:?}"
    );
    // The speaker is in sync: what it did not relearn goes.
    pass(&ns, &local);
    assert!(
        !routes(&ns, false)
            .iter()
            .any(|l| l.starts_with("10.244.1.0/26"))
    );
}

#[test]
fn batched_requests_report_each_outcome_in_order() {
    use calico_node::netlink::batch::{Request, send};
    use netlink_packet_route::route::{RouteProtocol, RouteType};
    let Some(ns) = node_ns("felix-batch", &[]) else {
        return;
    };
    let blackhole = |i: u32| {
        let mut m = rtnetlink::RouteMessageBuilder::<std::net::Ipv4Addr>::new()
            .destination_prefix(std::net::Ipv4Addr::from(0x0a40_0000 + i * 64), 26)
            .build();
        m.header.kind = RouteType::BlackHole;
        m.header.protocol = RouteProtocol::from(PROTO_FELIX);
        m
    };
    // 600 routes (three batches), a delete of one that does not exist in the middle, and
    // the last request failing too: every outcome lands at its index.
    let mut reqs: Vec<Request> = (0..600).map(|i| Request::Replace(blackhole(i))).collect();
    reqs.insert(300, Request::Delete(blackhole(9999)));
    reqs.push(Request::Delete(blackhole(8888)));
    let outcomes = ns.run_in(move || send(reqs).unwrap());
    assert_eq!(outcomes.len(), 602);
    let failed: Vec<usize> = (0..602).filter(|i| outcomes[*i].is_err()).collect();
    assert_eq!(failed, vec![300, 601], "{:?}", outcomes[300]);
    assert_eq!(outcomes[300], Err(libc::ESRCH));
    let table = routes(&ns, false);
    assert_eq!(
        table
            .iter()
            .filter(|l| l.starts_with("blackhole 10."))
            .count(),
        600
    );
}

fn vxlan(vni: u32) -> Vxlan {
    Vxlan {
        vni,
        port: 4789,
        local: Some("10.0.0.1".parse().unwrap()),
        mac: [0x66, 0, 0, 0, 0, 0x0a],
        address: Some("10.244.0.1".parse().unwrap()),
    }
}

#[test]
fn vxlan_device_neighbours_and_fdb() {
    let Some(ns) = node_ns("felix-vx", &[]) else {
        return;
    };
    // Someone else's permanent neighbour, and a stale one of ours.
    ns.ip(&[
        "neigh",
        "add",
        "10.0.0.99",
        "lladdr",
        "02:00:00:00:00:99",
        "dev",
        "eth0",
        "nud",
        "permanent",
    ]);
    ns.ip(&[
        "neigh",
        "add",
        "10.244.0.99",
        "lladdr",
        "02:00:00:00:00:98",
        "dev",
        "cali0123456789a",
        "nud",
        "permanent",
    ]);
    let ensure = |ns: &NetNs, want: Option<Vxlan>| {
        ns.with_netlink(move |h| async move {
            let parent = interface_with(&h, "10.0.0.1".parse().unwrap())
                .await
                .unwrap();
            ensure_vxlan(&h, want.as_ref(), parent, 1450).await.unwrap()
        })
    };
    assert_eq!(ensure(&ns, Some(vxlan(4096))), Outcome::Created);
    let d = show(&ns, "ip", &["-d", "link", "show", "vxlan.calico"]);
    for part in [
        "mtu 1450",
        "link/ether 66:00:00:00:00:0a",
        "vxlan id 4096 local 10.0.0.1 dev eth0",
        "dstport 4789",
        "nolearning",
        "state UNKNOWN",
    ] {
        assert!(d.contains(part), "{part:?} not in {d}");
    }
    let a = show(&ns, "ip", &["-4", "addr", "show", "dev", "vxlan.calico"]);
    assert!(a.contains("inet 10.244.0.1/32"), "{a}");
    assert_eq!(ensure(&ns, Some(vxlan(4096))), Outcome::Unchanged);
    assert_eq!(ensure(&ns, Some(vxlan(5000))), Outcome::Recreated);
    assert!(show(&ns, "ip", &["-d", "link", "show", "vxlan.calico"]).contains("vxlan id 5000"));

    let neighbours = BTreeSet::from([
        Neighbour {
            dev: "cali0123456789a".into(),
            ip: "10.244.0.3".parse().unwrap(),
            mac: [0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x01],
        },
        Neighbour {
            dev: "vxlan.calico".into(),
            ip: "10.244.1.1".parse().unwrap(),
            mac: [0x66, 0, 0, 0, 0, 0x0b],
        },
    ]);
    let fdb = BTreeSet::from([Fdb {
        mac: [0x66, 0, 0, 0, 0, 0x0b],
        dst: "10.0.0.2".parse().unwrap(),
    }]);
    let run = |ns: &NetNs| {
        let (n, f) = (neighbours.clone(), fdb.clone());
        ns.with_netlink(move |h| async move { neigh::reconcile(&h, &n, &f, "cali").await.unwrap() })
    };
    let first = run(&ns);
    assert!(first.failures.is_empty(), "{first:?}");
    assert_eq!((first.added, first.deleted), (3, 1), "{first:?}");
    assert_eq!(
        show(&ns, "ip", &["neigh", "show", "dev", "cali0123456789a"]).trim(),
        "10.244.0.3 lladdr aa:bb:cc:dd:ee:01 PERMANENT"
    );
    assert_eq!(
        show(&ns, "ip", &["neigh", "show", "dev", "vxlan.calico"]).trim(),
        "10.244.1.1 lladdr 66:00:00:00:00:0b PERMANENT"
    );
    let f = show(&ns, "bridge", &["fdb", "show", "dev", "vxlan.calico"]);
    assert!(
        f.contains("66:00:00:00:00:0b dst 10.0.0.2 self permanent"),
        "{f}"
    );
    assert!(
        show(&ns, "ip", &["neigh", "show", "dev", "eth0"])
            .contains("10.0.0.99 lladdr 02:00:00:00:00:99 PERMANENT")
    );
    let again = run(&ns);
    assert_eq!((again.added, again.deleted), (0, 0), "{again:?}");

    // No VXLAN pool any more: the device goes (and its entries with it).
    assert_eq!(ensure(&ns, None), Outcome::Deleted);
    assert!(
        show(&ns, "ip", &["link", "show"])
            .lines()
            .all(|l| !l.contains("vxlan.calico"))
    );
}

/// tunl0 where the kernel has ipip; elsewhere (as on these machines) one clear error.
#[test]
fn ipip_device_or_a_clear_error() {
    let Some(ns) = node_ns("felix-ip", &[]) else {
        return;
    };
    let kernel_has_ipip = Command::new("ip")
        .args(["-n", &ns.name, "link", "add", "probe0", "type", "ipip"])
        .output()
        .unwrap()
        .status
        .success();
    let want = Ipip {
        address: Some("10.244.0.2".parse().unwrap()),
    };
    let r = ns.with_netlink(move |h| async move { ensure_ipip(&h, Some(&want), 1480).await });
    if kernel_has_ipip {
        assert_eq!(r.unwrap(), Outcome::Created);
        let a = show(&ns, "ip", &["-4", "addr", "show", "dev", "tunl0"]);
        assert!(a.contains("inet 10.244.0.2/32"), "{a}");
    } else {
        let e = r.unwrap_err();
        assert!(matches!(e, TunnelError::NoIpip(_)), "{e:?}");
        assert!(e.to_string().contains("the ipip kernel module"), "{e}");
        assert!(
            show(&ns, "ip", &["link", "show"])
                .lines()
                .all(|l| !l.contains("tunl0"))
        );
    }
}

#[test]
fn nat_outgoing_tables() {
    let Some(ns) = NetNs::new("felix-nat") else {
        return;
    };
    if !common::have("nft") {
        common::skip("nft is not installed");
        return;
    }
    let nft = |args: &[&str]| {
        let out = Command::new("ip")
            .args(["netns", "exec", &ns.name, "nft"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Someone else's table.
    nft(&["add", "table", "inet", "filter"]);
    let net = |s: &str| s.parse::<IpNet>().unwrap();
    // As the daemon writes it: NAT in our table beside the (here empty) policy layer.
    let mut tables = Some(PolicyTables::new());
    let mut apply = |n: Nat| {
        let mut t = tables.take().expect("tables");
        tables = Some(ns.run_in(move || {
            t.write_full(&PolicyDataplane::default(), &n, "cali")
                .unwrap();
            t
        }));
    };
    apply(Nat {
        masquerade: BTreeSet::from([net("10.244.0.0/16")]),
        all: BTreeSet::from([net("10.244.0.0/16"), net("10.96.0.0/16")]),
        snat_to: None,
    });
    let rules = nft(&["list", "ruleset"]);
    assert!(
        rules.starts_with("table inet filter {\n}\ntable ip calico {\n"),
        "{rules}"
    );
    for want in [
        "\tset cali40masq-ipam-pools {\n\t\ttype ipv4_addr\n\t\tflags interval\n\t\telements = { 10.244.0.0/16 }\n\t}\n",
        "\tset cali40all-ipam-pools {\n\t\ttype ipv4_addr\n\t\tflags interval\n\t\telements = { 10.96.0.0/16, 10.244.0.0/16 }\n\t}\n",
        "\tchain cali-nat-outgoing {\n\t\tip saddr @cali40masq-ipam-pools ip daddr != @cali40all-ipam-pools masquerade fully-random\n\t}\n",
        "\tchain cali-POSTROUTING {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t\tjump cali-nat-outgoing\n\t}\n",
    ] {
        assert!(rules.contains(want), "{want:?} not in\n{rules}");
    }

    // Pools change, and an SNAT address is set: replaced in one go; IPv6 pools get a
    // table of their own.
    apply(Nat {
        masquerade: BTreeSet::from([net("10.245.0.0/16"), net("fd00:244::/48")]),
        all: BTreeSet::from([net("10.245.0.0/16"), net("fd00:244::/48")]),
        snat_to: Some("10.0.0.100".parse().unwrap()),
    });
    let rules = nft(&["list", "ruleset"]);
    assert!(rules.starts_with("table inet filter {\n}\n"), "{rules}");
    assert!(rules.contains("elements = { 10.245.0.0/16 }"), "{rules}");
    assert!(!rules.contains("10.244.0.0/16"), "{rules}");
    assert!(
        rules.contains(
            "ip saddr @cali40masq-ipam-pools ip daddr != @cali40all-ipam-pools snat to 10.0.0.100"
        ),
        "{rules}"
    );
    assert!(rules.contains("table ip6 calico"), "{rules}");
    assert!(rules.contains("ip6 saddr @cali60masq-ipam-pools ip6 daddr != @cali60all-ipam-pools masquerade fully-random"), "{rules}");

    // No pools: the IPv6 table goes, the IPv4 one matches nothing.
    apply(Nat::default());
    let rules = nft(&["list", "ruleset"]);
    assert!(!rules.contains("ip6 calico"), "{rules}");
    assert!(!rules.contains("elements"), "{rules}");
}

/// The host veth's sysctls, one list for two writers: the CNI plugin writes all of them at
/// ADD; afterwards Felix puts back the ones it owns when they drift and leaves the CNI
/// plugin's alone; an interface gone meanwhile is no problem.
#[test]
fn host_veth_sysctls_written_at_add_and_kept_by_their_owner() {
    use calico_node::felix::sysctls;
    use calico_node::model::sysctl::{HOST_VETH_SYSCTLS, Owner};
    let Some(ns) = node_ns("felix-sc", &[]) else {
        return;
    };
    const CALI: &str = "cali0123456789a";
    let read = |ns: &NetNs, path: String| {
        ns.run_in(move || std::fs::read_to_string(path).unwrap().trim().to_string())
    };
    ns.run_in(|| calico_node::cni::dataplane::host_sysctls(CALI, false))
        .unwrap();
    for s in HOST_VETH_SYSCTLS
        .iter()
        .filter(|s| s.dir.starts_with("ipv4"))
    {
        assert_eq!(read(&ns, s.path(CALI)), s.value, "{s:?}");
    }
    // Every one drifts.
    for s in HOST_VETH_SYSCTLS
        .iter()
        .filter(|s| s.dir.starts_with("ipv4"))
    {
        let (path, other) = (s.path(CALI), if s.value == "1" { "0" } else { "1" });
        ns.run_in(move || std::fs::write(path, other)).unwrap();
    }
    let problems = ns.run_in(|| sysctls::ensure_interface(CALI));
    assert!(problems.is_empty(), "{problems:?}");
    for s in HOST_VETH_SYSCTLS
        .iter()
        .filter(|s| s.dir.starts_with("ipv4"))
    {
        let now = read(&ns, s.path(CALI));
        match s.owner {
            Owner::Felix => assert_eq!(now, s.value, "{s:?}"),
            Owner::Cni => assert_ne!(now, s.value, "Felix wrote the CNI plugin's {s:?}"),
        }
    }
    let problems = ns.run_in(|| sysctls::ensure_interface("caligone"));
    assert!(problems.is_empty(), "{problems:?}");
}
