//! The walkthrough, end to end: three node namespaces on a bridge, etcd beside the bridge,
//! one `calico-node` each. The BGP mesh comes up (`calicoctl node status`); pods made by the
//! real CNI plugin on two nodes ping each other over BGP-learned routes; inside a pod the
//! routes are exactly Calico's and 169.254.1.1 resolves to the host veth's MAC (proxy ARP);
//! NAT outgoing shows on the wire (the outside sees the node's address, never the pod's);
//! the pool goes to VXLAN and back to NoEncap with `calicoctl apply` while a ping runs, with
//! at most a few packets lost and nothing of VXLAN left; with the mesh off and node-1 as
//! route reflector the routes converge again (reflected with their next hop); a node's
//! pods deleted and the node removed, `calicoctl ipam gc` releases its block and its route
//! leaves every other node.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::cluster::{
    Lab, add_pod, block_of, calicoctl, calicoctl_try, del_pod, has_vxlan_device, ip_show, ping,
    routes,
};

const NODES: usize = 3;

#[test]
fn walkthrough_mesh_pods_mode_switch_route_reflector_and_release() {
    let Some(lab) = Lab::new("cn-w", NODES) else {
        return;
    };
    let Lab {
        hub,
        nodes,
        pa,
        pb,
        ep,
        etcd,
        states,
        ..
    } = &lab;
    let mut daemons: Vec<Option<common::Process>> =
        (0..NODES).map(|i| Some(lab.start_node(i, &[]))).collect();
    // Readiness includes every BGP session being Established.
    lab.wait_ready(Duration::from_secs(40));
    let status = |i: usize| lab.node_status(i);
    let s1 = status(0);
    for peer in ["10.99.0.2 ", "10.99.0.3 "] {
        let row = s1.lines().find(|l| l.contains(peer)).unwrap_or_default();
        assert!(
            row.contains("| node-to-node mesh | up    |") && row.contains("Established"),
            "{s1}"
        );
    }

    // Pods on node-2 and node-3 reach each other over BGP-learned routes.
    let (n2, n3) = (&nodes[1], &nodes[2]);
    let a = add_pod(n2, "node-2", ep, pa);
    let b = add_pod(n3, "node-3", ep, pb);
    let direct_b = format!("{} via 10.99.0.3 dev eth0 proto 80 onlink", block_of(&b));
    let direct_a = format!("{} via 10.99.0.2 dev eth0 proto 80 onlink", block_of(&a));
    common::until("the BGP routes", Duration::from_secs(15), || {
        routes(n2).contains(&direct_b) && routes(n3).contains(&direct_a)
    });
    common::until("pod a reaches pod b", Duration::from_secs(10), || {
        ping(pa, &b)
    });
    assert!(ping(pb, &a), "pod b reaches pod a");
    // Inside the pod: exactly Calico's two routes, and proxy ARP answered with the host
    // veth's MAC.
    assert_eq!(
        ip_show(pa, &["-4", "route"]),
        "default via 169.254.1.1 dev eth0 \n169.254.1.1 dev eth0 scope link \n"
    );
    let neigh = ip_show(pa, &["neigh", "show", "169.254.1.1"]);
    assert!(
        neigh.starts_with("169.254.1.1 dev eth0 lladdr ee:ee:ee:ee:ee:ee"),
        "{neigh}"
    );

    // NAT outgoing (the default pool has natOutgoing): a pod reaching the hub, outside
    // every pool, arrives from its node's address; the hub counts what it receives.
    hub.nft(
        "table ip wire {\n chain input {\n type filter hook input priority 0;\n \
          icmp type echo-request ip saddr 10.99.0.2 counter\n \
          icmp type echo-request ip saddr 10.244.0.0/16 counter\n }\n}\n",
    );
    assert!(ping(pa, "10.99.0.254"), "the pod reaches outside the pools");
    let counted = String::from_utf8(
        hub.command("nft")
            .args(["list", "table", "ip", "wire"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(
        counted.contains("ip saddr 10.99.0.2 counter packets 1 ")
            && counted.contains("ip saddr 10.244.0.0/16 counter packets 0 "),
        "not masqueraded to the node's address:\n{counted}"
    );

    // VXLAN and back to NoEncap through calicoctl, a ping running all along.
    let pinger = pa
        .command("ping")
        .args(["-i", "0.05", &b])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // As a user would: read the pool, change the mode, apply (each time afresh: the YAML
    // carries its resourceVersion).
    let set_mode = |from: &str, to: &str| {
        let pool = calicoctl(
            &nodes[0],
            ep,
            states[0].path(),
            &["get", "ippool", "default-ipv4-ippool", "-o", "yaml"],
            "",
        );
        assert!(pool.contains(&format!("vxlanMode: {from}")), "{pool}");
        let yaml = pool.replace(&format!("vxlanMode: {from}"), &format!("vxlanMode: {to}"));
        calicoctl(
            &nodes[0],
            ep,
            states[0].path(),
            &["apply", "-f", "-"],
            &yaml,
        );
    };
    set_mode("Never", "Always");
    common::until("the VXLAN routes", Duration::from_secs(15), || {
        let (r2, r3) = (routes(n2), routes(n3));
        r2.contains(&format!("{} via", block_of(&b)))
            && r2.contains("dev vxlan.calico proto 80 onlink")
            && !r2.contains(&direct_b)
            && r3.contains("dev vxlan.calico proto 80 onlink")
            && !r3.contains(&direct_a)
    });
    std::thread::sleep(Duration::from_secs(1));
    set_mode("Always", "Never");
    common::until("the BGP routes again", Duration::from_secs(15), || {
        let (r2, r3) = (routes(n2), routes(n3));
        r2.contains(&direct_b) && r3.contains(&direct_a)
    });
    std::thread::sleep(Duration::from_secs(1));
    // SIGINT: ping prints its statistics and exits.
    // SAFETY: signalling a child we started, by its PID.
    unsafe {
        libc::kill(pinger.id() as i32, libc::SIGINT);
    }
    let out = pinger.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let summary = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no ping summary: {text}"));
    let nums: Vec<u64> = summary
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    let (sent, received) = (nums[0], nums[1]);
    eprintln!("ping during the mode switches: {summary}");
    assert!(sent >= 20, "{summary}");
    assert!(
        sent - received <= 5,
        "more than a few packets lost during the switches: {summary}"
    );
    for (i, n) in nodes.iter().enumerate() {
        common::until("nothing of VXLAN left", Duration::from_secs(10), || {
            !routes(n).contains("vxlan.calico") && !has_vxlan_device(n)
        });
        let r = routes(n);
        assert!(
            r.lines().all(|l| !l.contains("proto 80")
                || l.starts_with("blackhole")
                || l.contains("dev eth0 proto 80 onlink")),
            "node-{}: a stale route: {r}",
            i + 1
        );
    }

    // Route reflection: node-1 reflects, the mesh is off, everyone peers with it.
    calicoctl(
        &nodes[0],
        ep,
        states[0].path(),
        &[
            "patch",
            "node",
            "node-1",
            "-p",
            r#"{"metadata":{"labels":{"route-reflector":"true"}},"spec":{"bgp":{"routeReflectorClusterID":"244.0.0.1"}}}"#,
        ],
        "",
    );
    calicoctl(
        &nodes[0],
        ep,
        states[0].path(),
        &["apply", "-f", "-"],
        r#"apiVersion: projectcalico.org/v3
kind: BGPConfiguration
metadata:
  name: default
spec:
  nodeToNodeMeshEnabled: false
---
apiVersion: projectcalico.org/v3
kind: BGPPeer
metadata:
  name: peer-with-route-reflectors
spec:
  nodeSelector: all()
  peerSelector: route-reflector == 'true'
---
apiVersion: projectcalico.org/v3
kind: BGPPeer
metadata:
  name: route-reflectors-peer-with-all
spec:
  nodeSelector: route-reflector == 'true'
  peerSelector: all()
"#,
    );
    common::until(
        "sessions through the reflector only",
        Duration::from_secs(20),
        || {
            let (s1, s2, s3) = (status(0), status(1), status(2));
            let up = |s: &str, peer: &str| {
                s.lines().any(|l| {
                    l.contains(&format!("| {peer} "))
                        && l.contains("| node specific | up    |")
                        && l.contains("Established")
                })
            };
            up(&s1, "10.99.0.2")
                && up(&s1, "10.99.0.3")
                && up(&s2, "10.99.0.1")
                && up(&s3, "10.99.0.1")
                && !s2.contains("10.99.0.3")
                && !s3.contains("10.99.0.2")
        },
    );
    // Reflected routes keep the client's next hop.
    common::until("the reflected routes", Duration::from_secs(15), || {
        routes(n2).contains(&direct_b) && routes(n3).contains(&direct_a)
    });
    assert!(ping(pa, &b) && ping(pb, &a), "pods reach each other");

    // node-3's pod deleted, the node removed: GC releases its block, and its route leaves
    // every other node.
    del_pod(n3, "node-3", ep, pb);
    if let Some(mut d) = daemons[2].take() {
        // SAFETY: signalling a child we started, by its PID.
        unsafe {
            libc::kill(d.0.id() as i32, libc::SIGTERM);
        }
        let _ = d.0.wait();
    }
    calicoctl(
        &nodes[0],
        ep,
        states[0].path(),
        &["delete", "node", "node-3"],
        "",
    );
    let gc = calicoctl(
        &nodes[0],
        ep,
        states[0].path(),
        &["ipam", "gc", "--grace", "1"],
        "",
    );
    assert!(gc.contains(&block_of(&b)), "{gc}");
    let key = format!(
        "/calico/ipam/v2/assignment/ipv4/block/{}",
        block_of(&b).replace('/', "-")
    );
    assert_eq!(etcd.etcdctl_value(&key), "", "block released");
    for n in &nodes[..2] {
        common::until("node-3's route gone", Duration::from_secs(10), || {
            !routes(n).contains(&block_of(&b))
        });
    }
    assert!(
        calicoctl_try(&nodes[1], ep, states[1].path(), &["node", "status"], "")
            .1
            .contains("10.99.0.1"),
    );
    drop(daemons);
}
