//! IP autodetection on a real kernel, in a fresh network namespace: interfaces Calico must
//! skip (docker0, cali*, veth*) are created first so they have the lowest indexes.

mod common;

use calico_node::node::autodetect::{AutodetectionMethod, detect};
use common::NetNs;

fn pick(ns: &NetNs, method: &str) -> Result<String, String> {
    let m = AutodetectionMethod::parse(method).map_err(|e| e.to_string())?;
    ns.run_in(move || detect(&m).map(|n| n.to_string()).map_err(|e| e.to_string()))
}

#[test]
fn every_method_picks_the_right_address() {
    let Some(ns) = NetNs::new("cn-ad") else {
        return;
    };
    // A veth's peer is registered first (lower index), so each named interface gets its own
    // pair, created in the order that sets the indexes.
    for (a, b) in [
        ("docker0", "vethx1"),
        ("cali12345", "peer0"),
        ("eth0", "peer1"),
        ("eth1", "peer2"),
    ] {
        ns.ip(&["link", "add", a, "type", "veth", "peer", "name", b]);
        ns.ip(&["link", "set", a, "up"]);
        ns.ip(&["link", "set", b, "up"]);
    }
    ns.ip(&["addr", "add", "172.17.0.1/16", "dev", "docker0"]);
    ns.ip(&["addr", "add", "10.99.3.1/24", "dev", "cali12345"]);
    ns.ip(&["addr", "add", "169.254.9.9/16", "dev", "eth0"]);
    ns.ip(&["addr", "add", "10.99.1.1/24", "dev", "eth0"]);
    ns.ip(&["addr", "add", "10.99.2.1/24", "dev", "eth1"]);

    assert_eq!(pick(&ns, "first-found").unwrap(), "10.99.1.1/24");
    assert_eq!(pick(&ns, "interface=eth1").unwrap(), "10.99.2.1/24");
    assert_eq!(pick(&ns, "interface=eth.*").unwrap(), "10.99.1.1/24");
    assert_eq!(pick(&ns, "skip-interface=eth0").unwrap(), "10.99.2.1/24");
    assert_eq!(pick(&ns, "cidr=10.99.2.0/24").unwrap(), "10.99.2.1/24");
    assert_eq!(pick(&ns, "can-reach=10.99.2.77").unwrap(), "10.99.2.1/24");
    assert_eq!(pick(&ns, "can-reach=10.99.1.200").unwrap(), "10.99.1.1/24");
    let e = pick(&ns, "interface=nomatch").unwrap_err();
    assert!(e.starts_with("no IPv4 address found on interfaces matching interface=nomatch (interfaces seen: lo, vethx1, docker0, peer0, cali12345, peer1, eth0, peer2, eth1"), "{e}");
    let e = pick(&ns, "can-reach=192.0.2.1").unwrap_err();
    assert!(e.starts_with("can-reach=192.0.2.1: no route"), "{e}");
}
