//! The Felix route reconciler in a fresh network namespace: it programs exactly the
//! desired routes of ours, leaves every other route alone, removes stale ones of ours, puts
//! back a route deleted by hand, and a pass with nothing to do changes nothing.

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use calico_node::felix::calc::{Dev, PROTO_FELIX, Route, Target};
use calico_node::felix::routes::{Pass, interface_with, reconcile};
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
    let desired = desired.clone();
    ns.run_in(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap()
            .block_on(async move {
                let (conn, h, _) = rtnetlink::new_connection().unwrap();
                tokio::spawn(conn);
                let uplink = interface_with(&h, "10.0.0.1".parse().unwrap())
                    .await
                    .unwrap();
                reconcile(&h, &desired, "cali", uplink).await.unwrap()
            })
    })
}

fn route(target: Target, protocol: u8) -> Route {
    Route { target, protocol }
}

#[test]
fn routes_of_ours_match_the_desired_ones_and_nothing_else_is_touched() {
    let Some(ns) = NetNs::new("felix-rt") else {
        return;
    };
    // This kernel has no dummy interfaces: veth pairs, both ends up.
    for (name, peer) in [
        ("eth0", "eth0-peer"),
        ("cali0123456789a", "cali-peer"),
        ("vxlan.calico", "vx-peer"),
    ] {
        ns.ip(&["link", "add", name, "type", "veth", "peer", "name", peer]);
        ns.ip(&["link", "set", peer, "up"]);
        ns.ip(&["link", "set", name, "up"]);
    }
    ns.ip(&["addr", "add", "10.0.0.1/24", "dev", "eth0"]);
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
        (5, 2),
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

    // Nothing desired: every route of ours goes (the cali route included), the others stay.
    let gone = pass(&ns, &BTreeMap::new());
    assert_eq!(gone.deleted, 5, "{gone:?}");
    assert_eq!(routes(&ns, false), foreign_v4.map(String::from).to_vec());
}
