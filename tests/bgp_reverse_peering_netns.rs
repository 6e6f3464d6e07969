//! Calico's documented route-reflector set-up, live: three node namespaces on a bridge,
//! etcd in the hub, one `calico-node` each, the mesh up first. Then, as the documentation
//! has it: node-1 labelled `route-reflector: "true"` with `routeReflectorClusterID`
//! 244.0.0.1, ONE BGPPeer `{nodeSelector: all(), peerSelector: route-reflector == 'true'}`
//! and the mesh off. The reflector peers back with every client on its own (Calico's
//! automatic reverse peering), the clients learn each other's blocks through it with
//! their next hops kept, and pods on the two clients ping each other. With
//! `reversePeering: Manual` the reflector drops its sessions to the clients and they stay
//! down; back to the documented BGPPeer, they come up again. The same with the reflector
//! on the `bird-external` backend (real BIRD 2 running the configuration confd rendered,
//! the reverse peerings as `rr client` protocols) and native clients.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::bgp::bird_external;
use common::cluster::{Lab, add_pod, block_of, calicoctl, ping, routes};
use common::{have, skip};

const NODES: usize = 3;

/// The documentation's BGPPeer, with `extra` lines added to its spec.
fn documented_peer(extra: &str) -> String {
    format!(
        r#"apiVersion: projectcalico.org/v3
kind: BGPPeer
metadata:
  name: peer-with-route-reflectors
spec:
  nodeSelector: all()
  peerSelector: route-reflector == 'true'
{extra}"#
    )
}

/// Whether `calicoctl node status` shows a node-specific session to `peer` Established.
fn established(status: &str, peer: &str) -> bool {
    status.lines().any(|l| {
        l.contains(&format!("| {peer} "))
            && l.contains("| node specific | up    |")
            && l.contains("Established")
    })
}

/// How node-1, the reflector, runs BGP.
#[derive(Clone, Copy, PartialEq)]
enum Reflector {
    /// The native speaker.
    Native,
    /// Backend `bird-external`: BIRD 2 on the files confd renders.
    Bird,
}

#[test]
fn documented_single_bgppeer_route_reflection_converges_and_manual_reverse_peering_does_not() {
    scenario(Reflector::Native);
}

#[test]
fn a_bird_reflector_gets_the_reverse_peerings_as_rr_clients() {
    if !have("bird") || !have("birdc") {
        skip("BIRD 2 (bird, birdc) is not installed");
        return;
    }
    scenario(Reflector::Bird);
}

fn scenario(reflector: Reflector) {
    let Some(lab) = Lab::new("cn-rp", NODES) else {
        return;
    };
    let Lab {
        nodes,
        pa,
        pb,
        ep,
        states,
        ..
    } = &lab;
    let bird_dir: PathBuf = states[0].path().join("bird");
    let bird_socket = states[0].path().join("bird.ctl");
    let bird_env = [
        ("CALICO_NETWORKING_BACKEND", "bird-external"),
        ("CALICO_BIRD_CONFIG_DIR", bird_dir.to_str().unwrap()),
        ("CALICO_BIRD_SOCKET", bird_socket.to_str().unwrap()),
    ];
    let _daemons: Vec<common::Process> = (0..NODES)
        .map(|i| {
            let extra: &[(&str, &str)] = if i == 0 && reflector == Reflector::Bird {
                &bird_env
            } else {
                &[]
            };
            lab.start_node(i, extra)
        })
        .collect();
    let _bird = (reflector == Reflector::Bird).then(|| {
        common::until("BIRD's configuration", Duration::from_secs(30), || {
            std::fs::read_to_string(bird_dir.join("bird.cfg"))
                .is_ok_and(|c| c.contains("10.99.0.2"))
        });
        bird_external(
            &nodes[0],
            &bird_dir.join("bird.cfg"),
            &bird_socket,
            &bird_dir.join("bird.pid"),
        )
    });
    let logs = || lab.logs();
    // The sessions as each node shows them: `calicoctl node status`, or BIRD's protocols
    // (named `Mesh_10_99_0_2`, `Node_10_99_0_2`, ...) for a BIRD reflector.
    let status = |i: usize| {
        if i == 0 && reflector == Reflector::Bird {
            let out = nodes[0]
                .command("birdc")
                .arg("-s")
                .arg(&bird_socket)
                .args(["show", "protocols"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).to_string()
        } else {
            lab.node_status(i)
        }
    };
    // The reflector's node-specific session to `peer` Established; whether it has one at
    // all.
    let reflector_established = |s1: &str, peer: &str| match reflector {
        Reflector::Native => established(s1, peer),
        Reflector::Bird => s1.lines().any(|l| {
            l.starts_with(&format!("Node_{} ", peer.replace('.', "_"))) && l.contains("Established")
        }),
    };
    let reflector_mentions =
        |s1: &str, peer: &str| s1.contains(peer) || s1.contains(&peer.replace('.', "_"));
    let ctl = |args: &[&str], stdin: &str| calicoctl(&nodes[0], ep, states[0].path(), args, stdin);
    // Waits for `cond`, showing every node's status and log when it does not come.
    let wait = |what: &str, limit: Duration, cond: &dyn Fn() -> bool| {
        let start = Instant::now();
        while !cond() {
            assert!(
                start.elapsed() < limit,
                "{what} within {limit:?}:\nnode-1:\n{}\nnode-2:\n{}\nnode-3:\n{}\nlogs:\n{}",
                status(0),
                status(1),
                status(2),
                logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!("{what}: after {:?}", start.elapsed());
    };

    // The mesh first, as a cluster starts (readiness includes every session Established).
    for i in 0..NODES {
        wait("node ready on the mesh", Duration::from_secs(60), &|| {
            lab.readiness(i).is_ok_and(|(s, _)| s == 200)
        });
    }

    // The documentation's steps: the reflector node, the BGPPeer, the mesh off.
    ctl(
        &[
            "patch",
            "node",
            "node-1",
            "-p",
            r#"{"metadata":{"labels":{"route-reflector":"true"}},"spec":{"bgp":{"routeReflectorClusterID":"244.0.0.1"}}}"#,
        ],
        "",
    );
    ctl(&["apply", "-f", "-"], &documented_peer(""));
    ctl(
        &["apply", "-f", "-"],
        r#"apiVersion: projectcalico.org/v3
kind: BGPConfiguration
metadata:
  name: default
spec:
  nodeToNodeMeshEnabled: false
"#,
    );
    let through_the_reflector_only = || {
        let (s1, s2, s3) = (status(0), status(1), status(2));
        reflector_established(&s1, "10.99.0.2")
            && reflector_established(&s1, "10.99.0.3")
            && established(&s2, "10.99.0.1")
            && established(&s3, "10.99.0.1")
            && !s2.contains("10.99.0.3")
            && !s3.contains("10.99.0.2")
    };
    wait(
        "the reflector's reverse peerings and the clients' sessions Established, no mesh",
        Duration::from_secs(60),
        &through_the_reflector_only,
    );

    if reflector == Reflector::Bird {
        // BIRD reflects for the reverse peerings: route-reflector clients of cluster
        // 244.0.0.1.
        let cfg = std::fs::read_to_string(bird_dir.join("bird.cfg")).unwrap();
        assert!(cfg.contains("rr cluster id 244.0.0.1;"), "{cfg}");
        for peer in ["Node_10_99_0_2", "Node_10_99_0_3"] {
            let at = cfg.find(&format!("protocol bgp {peer} ")).unwrap();
            let block = &cfg[at..at + cfg[at..].find("\n}").unwrap()];
            assert!(block.contains("rr client;"), "{block}");
        }
    }

    // Pods on the two clients: their blocks cross the reflector with the next hop kept.
    let (n2, n3) = (&nodes[1], &nodes[2]);
    let a = add_pod(n2, "node-2", ep, pa);
    let b = add_pod(n3, "node-3", ep, pb);
    let on_n2 = format!("{} via 10.99.0.3 dev eth0 proto 80 onlink", block_of(&b));
    let on_n3 = format!("{} via 10.99.0.2 dev eth0 proto 80 onlink", block_of(&a));
    wait(
        "each client's block at the other, reflected",
        Duration::from_secs(30),
        &|| routes(n2).contains(&on_n2) && routes(n3).contains(&on_n3),
    );
    common::until("pod a reaches pod b", Duration::from_secs(10), || {
        ping(pa, &b)
    });
    assert!(ping(pb, &a), "pod b reaches pod a");

    // reversePeering: Manual: the reflector no longer peers with its clients; they keep
    // trying, and nobody answers.
    ctl(
        &["apply", "-f", "-"],
        &documented_peer("  reversePeering: Manual\n"),
    );
    let reflector_alone = || {
        let (s1, s2, s3) = (status(0), status(1), status(2));
        !reflector_mentions(&s1, "10.99.0.2")
            && !reflector_mentions(&s1, "10.99.0.3")
            && s2.contains("| 10.99.0.1 ")
            && !established(&s2, "10.99.0.1")
            && s3.contains("| 10.99.0.1 ")
            && !established(&s3, "10.99.0.1")
    };
    wait(
        "the reflector without sessions to its clients",
        Duration::from_secs(30),
        &reflector_alone,
    );
    // Longer than the clients' connect retry: still nothing.
    std::thread::sleep(Duration::from_secs(8));
    assert!(
        reflector_alone(),
        "a session came up without the reverse peering:\nnode-1:\n{}\nnode-2:\n{}\nnode-3:\n{}",
        status(0),
        status(1),
        status(2)
    );

    // The documented BGPPeer again (Auto): the reflector takes its clients back.
    ctl(&["apply", "-f", "-"], &documented_peer(""));
    wait(
        "the sessions through the reflector again",
        Duration::from_secs(60),
        &through_the_reflector_only,
    );
    wait(
        "the reflected routes again",
        Duration::from_secs(30),
        &|| routes(n2).contains(&on_n2) && routes(n3).contains(&on_n3),
    );
    common::until(
        "pods reach each other again",
        Duration::from_secs(10),
        || ping(pa, &b) && ping(pb, &a),
    );
}
