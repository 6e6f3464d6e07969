//! The packet's life across two nodes: two node namespaces on one link, etcd on the first,
//! one `calico-node` each (their BGP speakers mesh), a pod on each made by the real
//! `calico` CNI plugin. The pods ping each other through vxlan.calico (routes from the
//! datastore); then, the pool switched to NoEncap with `calicoctl apply`, over a direct
//! route learned by BGP, with no VXLAN route or device left; then in CrossSubnet mode
//! (the nodes share a subnet: direct again, from the datastore). A service range set in
//! BGPConfiguration is advertised by node-1, not by node-2 (labelled out of load
//! balancing), and programmed by neither.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::{
    add_pod, block_of, calicoctl, calicoctl_try, has_vxlan_device, ping, routes,
};
use common::{Etcd, NetNs, free_port, http_get};
use serde_json::Value;

fn calico_node(
    ns: &NetNs,
    name: &str,
    etcd: &str,
    state: &std::path::Path,
    health: u16,
) -> common::Process {
    common::cluster::calico_node(
        ns,
        name,
        etcd,
        state,
        health,
        &[
            ("CALICO_IPV4POOL_VXLAN", "Always"),
            ("FELIX_PROMETHEUSMETRICSENABLED", "true"),
        ],
    )
}

#[test]
fn pods_on_two_nodes_ping_each_other_over_vxlan_then_bgp_routes() {
    let (Some(n1), Some(n2)) = (NetNs::new("cn-n1"), NetNs::new("cn-n2")) else {
        return;
    };
    let (Some(p1), Some(p2)) = (NetNs::new("cn-p1"), NetNs::new("cn-p2")) else {
        return;
    };
    if !common::have("ping") {
        common::skip("ping is not installed");
        return;
    }
    common::cluster::paired(&n1, &n2);
    let port = free_port();
    let Some(etcd) = Etcd::start_on_also(&n1.name, port, "10.99.0.1") else {
        return;
    };
    let endpoint = format!("http://10.99.0.1:{port}");
    let (s1, s2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (h1, h2) = (free_port(), free_port());
    let d1 = calico_node(&n1, "node-1", &endpoint, s1.path(), h1);
    let _d2 = calico_node(&n2, "node-2", &endpoint, s2.path(), h2);
    for (ns, port) in [(&n1, h1), (&n2, h2)] {
        common::until("calico-node ready", Duration::from_secs(30), || {
            ns.run_in(move || http_get(port, "/readiness"))
                .is_ok_and(|(s, _)| s == 200)
        });
    }

    let a1 = add_pod(&n1, "node-1", &endpoint, &p1);
    let a2 = add_pod(&n2, "node-2", &endpoint, &p2);
    // Each node learns the other's block and VTEP from etcd.
    let start = Instant::now();
    while !ping(&p1, &a2) {
        if start.elapsed() > Duration::from_secs(15) {
            let mut dump = format!("pods {a1} {a2}\n");
            for ns in [&n1, &n2, &p1, &p2] {
                for args in [&["route"][..], &["neigh"], &["addr"], &["-d", "link"]] {
                    let out = Command::new("ip")
                        .args(["-n", &ns.name])
                        .args(args)
                        .output()
                        .unwrap();
                    dump += &format!(
                        "== {} ip {args:?}\n{}",
                        ns.name,
                        String::from_utf8_lossy(&out.stdout)
                    );
                }
                let out = Command::new("bridge")
                    .args(["-n", &ns.name, "fdb", "show", "dev", "vxlan.calico"])
                    .output()
                    .unwrap();
                dump += &format!("== fdb\n{}", String::from_utf8_lossy(&out.stdout));
            }
            for s in [&s1, &s2] {
                dump +=
                    &std::fs::read_to_string(s.path().join("calico-node.log")).unwrap_or_default();
            }
            panic!("pod 1 does not reach pod 2:\n{dump}");
        }
    }
    assert!(ping(&p2, &a1), "pod 2 reaches pod 1");
    let r = routes(&n1);
    assert!(r.contains("dev vxlan.calico proto 80 onlink"), "{r}");

    // The two speakers mesh on their own (confd: one peer per other node).
    let status = || calicoctl(&n1, &endpoint, s1.path(), &["node", "status"], "");
    common::until("the mesh Established", Duration::from_secs(15), || {
        let s = status();
        s.contains("| 10.99.0.2    | node-to-node mesh | up    |") && s.contains("Established")
    });

    // NoEncap through `calicoctl apply`: the routes now come from BGP, direct over eth0,
    // and nothing of VXLAN is left (routes, neighbours, the device).
    let pool = calicoctl(
        &n1,
        &endpoint,
        s1.path(),
        &["get", "ippool", "default-ipv4-ippool", "-o", "yaml"],
        "",
    );
    assert!(pool.contains("vxlanMode: Always"), "{pool}");
    let never = pool.replace("vxlanMode: Always", "vxlanMode: Never");
    calicoctl(&n1, &endpoint, s1.path(), &["apply", "-f", "-"], &never);
    let direct = format!("{} via 10.99.0.2 dev eth0 proto 80 onlink", block_of(&a2));
    let on_n2 = format!("{} via 10.99.0.1 dev eth0 proto 80 onlink", block_of(&a1));
    common::until(
        "the BGP routes, and no VXLAN left",
        Duration::from_secs(10),
        || {
            let (r1, r2) = (routes(&n1), routes(&n2));
            r1.contains(&direct)
                && r2.contains(&on_n2)
                && !r1.contains("vxlan.calico")
                && !r2.contains("vxlan.calico")
        },
    );
    for n in [&n1, &n2] {
        common::until("vxlan.calico removed", Duration::from_secs(10), || {
            !has_vxlan_device(n)
        });
    }
    assert!(
        ping(&p1, &a2) && ping(&p2, &a1),
        "pods reach each other over the BGP-learned routes"
    );

    // Service ranges (BGPConfiguration serviceClusterIPs, by `calicoctl apply`): node-1
    // advertises the range; node-2, labelled out of load balancing, does not, and takes
    // node-1's without programming it (kube-proxy answers for service addresses).
    let received = |ns: &NetNs, peer: &str| -> Option<u64> {
        let (_, body) = ns.run_in(|| http_get(9091, "/metrics")).ok()?;
        let start = format!("calico_bgp_peer_prefixes_received{{peer=\"{peer}\"");
        body.lines()
            .find(|l| l.starts_with(&start))?
            .rsplit(' ')
            .next()?
            .parse()
            .ok()
    };
    // Exactly node-1's block, once anything of the VXLAN phase is withdrawn.
    let start = Instant::now();
    let mut last = received(&n2, "10.99.0.1");
    while last != Some(1) && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
        last = received(&n2, "10.99.0.1");
    }
    assert_eq!(last, Some(1), "node-1's block");
    let node2 = "/calico/resources/v3/projectcalico.org/nodes/node-2";
    let mut node: Value = serde_json::from_str(&etcd.etcdctl_value(node2)).unwrap();
    node["metadata"]["labels"]["node.kubernetes.io/exclude-from-external-load-balancers"] =
        "true".into();
    etcd.etcdctl(&["put", node2, &node.to_string()]);
    calicoctl(
        &n1,
        &endpoint,
        s1.path(),
        &["apply", "-f", "-"],
        "apiVersion: projectcalico.org/v3\nkind: BGPConfiguration\nmetadata:\n  name: default\nspec:\n  serviceClusterIPs:\n  - cidr: 10.96.0.0/12\n",
    );
    common::until(
        "the service range at node-2",
        Duration::from_secs(10),
        || received(&n2, "10.99.0.1") == Some(2),
    );
    // Felix would have programmed it within milliseconds.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        received(&n1, "10.99.0.2"),
        Some(1),
        "node-2 advertises no range"
    );
    for n in [&n1, &n2] {
        let r = routes(n);
        assert!(!r.contains("10.96.0.0/12"), "{r}");
    }

    // Graceful restart: calico-node on node-1 killed (-9) and started again. node-2's
    // speaker keeps node-1's routes as stale until node-1 is back; node-1's Felix keeps
    // the BGP routes until its speaker has the table again. Neither kernel loses a route.
    let both = || {
        let (r1, r2) = (routes(&n1), routes(&n2));
        assert!(
            r1.contains(&direct) && r2.contains(&on_n2),
            "a route left during the restart:\nnode-1:\n{r1}node-2:\n{r2}"
        );
    };
    both();
    drop(d1);
    let _d1 = calico_node(&n1, "node-1", &endpoint, s1.path(), h1);
    common::until(
        "the mesh Established again",
        Duration::from_secs(20),
        || {
            both();
            calicoctl_try(&n1, &endpoint, s1.path(), &["node", "status"], "")
                .1
                .contains("Established")
        },
    );
    // The speaker's End-of-RIB exchange and Felix's pass after it.
    let after = Instant::now();
    while after.elapsed() < Duration::from_secs(2) {
        both();
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        ping(&p1, &a2) && ping(&p2, &a1),
        "pods reach each other after the restart"
    );

    // CrossSubnet: the nodes share a subnet, so the route goes direct (from the datastore)
    // and pods still reach each other.
    let key = "/calico/resources/v3/projectcalico.org/ippools/default-ipv4-ippool";
    let mut pool: Value = serde_json::from_str(&etcd.etcdctl_value(key)).unwrap();
    pool["spec"]["vxlanMode"] = "CrossSubnet".into();
    etcd.etcdctl(&["put", key, &pool.to_string()]);
    common::until("the direct route", Duration::from_secs(10), || {
        routes(&n1).contains(&direct)
    });
    assert!(
        ping(&p1, &a2) && ping(&p2, &a1),
        "pods reach each other directly"
    );
}
