//! Felix inside a running calico-node (one node namespace, real etcd): a VXLAN pool and a
//! remote node with a block give vxlan.calico, the remote block's route through it, the
//! VTEP's ARP and FDB entries, and a blackhole for this node's block; a route deleted by
//! hand comes back within a second; this node gets a VXLAN tunnel address from the pool
//! (Node field, IPAM handle, on the device) and the pods' MTU is written for the CNI
//! plugin; the repair after a route event covers that route's interface only; switching the pool to no encapsulation removes the VXLAN route and device and
//! releases the address (no stale state), and back.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Etcd, NetNs, free_port, http_get};

fn show(ns: &NetNs, args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(["-n", &ns.name])
        .args(&args[1..])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const POOL_KEY: &str = "/calico/resources/v3/projectcalico.org/ippools/default-ipv4-ippool";
const REMOTE_ROUTE: &str = "10.244.1.0/26 via 10.244.1.1 dev vxlan.calico proto 80 onlink";

const NODE_KEY: &str = "/calico/resources/v3/projectcalico.org/nodes/node-a";
const HANDLE_KEY: &str = "/calico/ipam/v2/handle/vxlan-tunnel-addr-node-a";

/// node-a's `spec.ipv4VXLANTunnelAddr`.
fn tunnel_addr(etcd: &Etcd) -> Option<String> {
    let node: serde_json::Value = serde_json::from_str(&etcd.etcdctl_value(NODE_KEY)).ok()?;
    node["spec"]["ipv4VXLANTunnelAddr"]
        .as_str()
        .map(String::from)
}

fn set_vxlan_mode(etcd: &Etcd, mode: &str) {
    let mut pool: serde_json::Value = serde_json::from_str(&etcd.etcdctl_value(POOL_KEY)).unwrap();
    pool["spec"]["vxlanMode"] = mode.into();
    etcd.etcdctl(&["put", POOL_KEY, &pool.to_string()]);
}

#[test]
fn felix_programs_vxlan_from_the_datastore_and_repairs_and_follows_pool_changes() {
    let Some(ns) = NetNs::new("cn-felix") else {
        return;
    };
    ns.add_host_veth(&[], &["10.99.8.1/24"]);
    let etcd_port = free_port();
    let Some(etcd) = Etcd::start_on(Some(&ns.name), etcd_port) else {
        return;
    };
    let node = common::VxlanNode::start(&ns, etcd_port);
    let (metrics_port, state) = (node.metrics_port, &node.state);

    // A remote node with its VTEP, its block, and a block of ours.
    etcd.etcdctl(&[
        "put",
        "/calico/resources/v3/projectcalico.org/nodes/node-b",
        r#"{"kind":"Node","apiVersion":"projectcalico.org/v3","metadata":{"name":"node-b"},"spec":{"bgp":{"ipv4Address":"10.99.8.2/24"},"ipv4VXLANTunnelAddr":"10.244.1.1","vxlanTunnelMACAddr":"66:00:00:00:00:0b"}}"#,
    ]);
    for (cidr, host) in [("10.244.1.0/26", "node-b"), ("10.244.0.0/26", "node-a")] {
        let block = calico_node::model::ipam::AllocationBlock {
            cidr: cidr.into(),
            affinity: Some(format!("host:{host}")),
            allocations: vec![None; 64],
            unallocated: (0..64).collect(),
            ..Default::default()
        };
        let key = format!(
            "/calico/ipam/v2/assignment/ipv4/block/{}",
            cidr.replace('/', "-")
        );
        etcd.etcdctl(&["put", &key, &serde_json::to_string(&block).unwrap()]);
    }
    let routes = || show(&ns, &["ip", "-4", "route"]);
    // Both blocks were written one after the other: a pass may come between them.
    common::until(
        "the remote block's route and our block's blackhole",
        Duration::from_secs(10),
        || {
            let r = routes();
            r.contains(REMOTE_ROUTE) && r.contains("blackhole 10.244.0.0/26 proto 80")
        },
    );
    let link = show(&ns, &["ip", "-d", "link", "show", "vxlan.calico"]);
    for part in [
        "vxlan id 4096 local 10.99.8.1 dev eth1",
        "dstport 4789",
        "mtu 1450",
    ] {
        assert!(link.contains(part), "{part:?} not in {link}");
    }
    assert_eq!(
        show(&ns, &["ip", "neigh", "show", "dev", "vxlan.calico"]).trim(),
        "10.244.1.1 lladdr 66:00:00:00:00:0b PERMANENT"
    );
    let fdb = show(&ns, &["bridge", "fdb", "show", "dev", "vxlan.calico"]);
    assert!(
        fdb.contains("66:00:00:00:00:0b dst 10.99.8.2 self permanent"),
        "{fdb}"
    );

    // The pods' MTU for the CNI plugin: the uplink's less VXLAN's 50 bytes.
    let mtu_file = state.path().join("mtu");
    common::until("the MTU file", Duration::from_secs(5), || {
        std::fs::read_to_string(&mtu_file).is_ok_and(|m| m == "1450\n")
    });

    // This node's tunnel address: from the pool, held by Calico's handle, on the device.
    common::until("a VXLAN tunnel address", Duration::from_secs(10), || {
        tunnel_addr(&etcd).is_some()
    });
    let addr = tunnel_addr(&etcd).unwrap();
    assert!(addr.starts_with("10.244."), "{addr}");
    assert!(!etcd.etcdctl_value(HANDLE_KEY).is_empty());
    common::until(
        "the address on vxlan.calico",
        Duration::from_secs(10),
        || {
            show(&ns, &["ip", "-4", "addr", "show", "dev", "vxlan.calico"])
                .contains(&format!("inet {addr}/32"))
        },
    );

    // Felix's metrics (REFERENCE §5) say what it holds. node-b has a workload.
    etcd.etcdctl(&[
        "put",
        "/calico/resources/v3/projectcalico.org/workloadendpoints/ns1/node--b-k8s-pod--a-eth0",
        r#"{"kind":"WorkloadEndpoint","apiVersion":"projectcalico.org/v3","metadata":{"name":"node--b-k8s-pod--a-eth0","namespace":"ns1"},"spec":{"orchestrator":"k8s","node":"node-b","pod":"pod-a","endpoint":"eth0","ipNetworks":["10.244.1.5/32"],"interfaceName":"cali1234567890a"}}"#,
    ]);
    let metric = |line: &str| -> Option<f64> {
        let line = line.to_string();
        let (_, body) = ns.run_in(move || http_get(metrics_port, "/metrics")).ok()?;
        body.lines()
            .find_map(|l| l.strip_prefix(&line)?.strip_prefix(' ')?.parse().ok())
    };
    common::until(
        "the cluster's workload endpoint counted",
        Duration::from_secs(5),
        || metric("felix_cluster_num_workload_endpoints") == Some(1.0),
    );
    for (name, want) in [
        ("felix_resync_state", 3.0),
        ("felix_resyncs_started", 1.0),
        ("felix_cluster_num_hosts", 2.0),
        ("felix_active_local_endpoints", 0.0),
        ("felix_route_table_num_ifaces{table=\"IPv4:254\"}", 1.0),
        ("felix_route_table_num_routes{table=\"IPv6:254\"}", 0.0),
        // NAT outgoing: the two pool sets and two rules of `ip calico`.
        ("felix_ipsets_calico{ip_version=\"inet\"}", 2.0),
        ("felix_iptables_rules{ip_version=\"4\",table=\"nat\"}", 2.0),
    ] {
        assert_eq!(metric(name), Some(want), "{name}");
    }
    // The remote block through vxlan.calico, and the blackholes of our blocks (the one
    // written above and the tunnel address's): every route of ours in the kernel.
    let ours = routes().lines().filter(|l| l.contains(" proto 80")).count();
    assert!(ours >= 2, "{}", routes());
    assert_eq!(
        metric("felix_route_table_num_routes{table=\"IPv4:254\"}"),
        Some(ours as f64)
    );
    for name in [
        "felix_calc_graph_update_time_seconds_count",
        "felix_route_table_resync_seconds_count",
        "felix_int_dataplane_apply_time_seconds_count",
    ] {
        assert!(metric(name).is_some_and(|n| n > 0.0), "{name}");
    }
    let partial = || metric("felix_route_table_partial_resync_seconds_count").unwrap();
    let partial_before = partial();

    // Another tool deletes our route: it is back within a second. The repair covers the
    // interface the event named, not the whole dataplane: a setting no event reports (IPv4
    // forwarding, turned off by hand) stays as it is until the next full pass.
    let forwarding = || {
        ns.run_in(|| std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward"))
            .unwrap()
            .trim()
            .to_string()
    };
    assert_eq!(forwarding(), "1");
    ns.run_in(|| std::fs::write("/proc/sys/net/ipv4/ip_forward", "0"))
        .unwrap();
    ns.ip(&["route", "del", "10.244.1.0/26"]);
    let took = common::until("the route to come back", Duration::from_secs(1), || {
        routes().contains(REMOTE_ROUTE)
    });
    eprintln!("route repaired in {took:?}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        forwarding(),
        "0",
        "a full pass ran for one interface's route"
    );
    assert!(
        partial() > partial_before,
        "the repair was a partial resync"
    );

    // The pool stops using VXLAN: its routes would come from BGP now; nothing of VXLAN
    // is left behind. Then back.
    set_vxlan_mode(&etcd, "Never");
    common::until(
        "the VXLAN route and device to go",
        Duration::from_secs(10),
        || {
            !routes().contains("vxlan.calico")
                && !show(&ns, &["ip", "link", "show"]).contains("vxlan.calico")
        },
    );
    assert!(routes().contains("blackhole 10.244.0.0/26 proto 80"));
    // The datastore change made a full pass.
    common::until("forwarding on again", Duration::from_secs(5), || {
        forwarding() == "1"
    });
    common::until(
        "the tunnel address released",
        Duration::from_secs(10),
        || tunnel_addr(&etcd).is_none() && etcd.etcdctl_value(HANDLE_KEY).is_empty(),
    );
    assert_eq!(std::fs::read_to_string(&mtu_file).unwrap(), "1500\n");
    set_vxlan_mode(&etcd, "Always");
    common::until("the VXLAN route again", Duration::from_secs(10), || {
        routes().contains(REMOTE_ROUTE)
    });
    common::until("a tunnel address again", Duration::from_secs(10), || {
        tunnel_addr(&etcd).is_some()
    });

    // Quick flips, each before the last one's device removal can have finished (the
    // kernel takes tens of milliseconds): the device and route of the last setting stay.
    for _ in 0..3 {
        set_vxlan_mode(&etcd, "Never");
        std::thread::sleep(Duration::from_millis(15));
        set_vxlan_mode(&etcd, "Always");
        std::thread::sleep(Duration::from_millis(15));
    }
    common::until(
        "the VXLAN route after the flips",
        Duration::from_secs(10),
        || routes().contains(REMOTE_ROUTE),
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(routes().contains(REMOTE_ROUTE), "{}", routes());
    assert!(
        show(&ns, &["ip", "link", "show", "vxlan.calico"]).contains("UP"),
        "{}",
        show(&ns, &["ip", "link", "show"])
    );
}
