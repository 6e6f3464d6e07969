//! BIRD rendering (backend `bird-external`): each golden case matches its committed files
//! (`UPDATE_GOLDEN=1` rewrites them) and is accepted by `bird -p`; and live: real BIRD on
//! node-1 with the configuration calico-node rendered, our native speaker on node-2,
//! routes converge both ways and pods on the two nodes ping each other.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use calico_node::bgp::config::{DesiredBgpConfig, DesiredPeer, ExportPolicy, PeerType};
use calico_node::confd::bird;
use common::bgp::bird_external;
use common::cluster::{add_pod, block_of, calico_node, ping, routes};
use common::{Etcd, NetNs, free_port, have, http_get, skip};
use ipnet::IpNet;

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn mesh_case() -> (DesiredBgpConfig, Vec<IpNet>) {
    let mut c = DesiredBgpConfig::new("10.99.0.2".parse().unwrap(), 64512);
    for (ip, passive) in [("10.99.0.1", false), ("10.99.0.3", true)] {
        let mut p = DesiredPeer::new(ip.parse().unwrap(), 64512, PeerType::NodeToNodeMesh);
        p.passive = passive;
        p.local_address = Some("10.99.0.2".parse().unwrap());
        c.peers.push(p);
    }
    c.export = vec![net("10.244.0.5/32"), net("10.244.1.0/26")];
    c.policy = ExportPolicy {
        allowed: vec![net("10.244.0.0/16")],
        ..Default::default()
    };
    (c, vec![net("10.244.0.0/16")])
}

fn reflector_case() -> (DesiredBgpConfig, Vec<IpNet>) {
    let mut c = DesiredBgpConfig::new("10.99.0.9".parse().unwrap(), 65000);
    c.cluster_id = Some("244.0.0.1".parse().unwrap());
    c.listen_port = 1790;
    let mut client = DesiredPeer::new("10.99.0.1".parse().unwrap(), 65000, PeerType::NodeSpecific);
    client.rr_client = true;
    client.graceful_restart_secs = 300;
    let mut tor = DesiredPeer::new("192.168.0.1".parse().unwrap(), 65100, PeerType::Global);
    tor.port = 1179;
    tor.password = Some("s3cret".into());
    tor.ttl_security = Some(1);
    tor.keep_next_hop = true;
    c.peers = vec![client, tor];
    c.export = vec![net("10.244.9.0/26")];
    c.policy = ExportPolicy {
        allowed: vec![net("10.244.0.0/16"), net("10.251.0.0/16")],
        denied: vec![net("10.251.0.0/16")],
        ..Default::default()
    };
    (c, vec![net("10.244.0.0/16")])
}

/// A dual-stack node: IPv6 routes over the IPv4 mesh with our IPv6 address as next hop,
/// and an IPv6 peer.
fn dual_stack_case() -> (DesiredBgpConfig, Vec<IpNet>) {
    let (mut c, _) = mesh_case();
    c.ipv6_next_hop = Some("fd00:99::2".parse().unwrap());
    let mut tor = DesiredPeer::new("fd00:99::fe".parse().unwrap(), 65100, PeerType::Global);
    tor.local_address = Some("fd00:99::2".parse().unwrap());
    c.peers.push(tor);
    c.export.push(net("fd00:244:0:1::/122"));
    c.policy.allowed.push(net("fd00:244::/48"));
    c.policy.denied.push(net("fd00:244:ff::/64"));
    (c, vec![net("10.244.0.0/16"), net("fd00:244::/48")])
}

/// Service ranges (one IPv6, with an IPv6 next hop) advertised and kept out of the
/// kernel; communities, standard and large, on the routes inside two CIDRs; interfaces
/// the direct protocol ignores.
fn services_case() -> (DesiredBgpConfig, Vec<IpNet>) {
    use calico_node::bgp::config::CommunityValue::{Large, Standard};
    let (mut c, pools) = mesh_case();
    c.ipv6_next_hop = Some("fd00:99::2".parse().unwrap());
    c.service_ranges = vec![net("10.96.0.0/12"), net("fd00:96::/112")];
    c.ignored_interfaces = vec!["docker*".into(), "eth9".into()];
    for r in c.service_ranges.clone() {
        c.export.push(r);
        c.policy.allowed.push(r);
    }
    c.policy.communities = vec![
        (
            net("10.244.0.0/16"),
            vec![Standard((100 << 16) | 6532), Large([100, 555, 107])],
        ),
        (net("fd00:96::/112"), vec![Large([100, 555, 107])]),
    ];
    (c, pools)
}

fn lonely_case() -> (DesiredBgpConfig, Vec<IpNet>) {
    (
        DesiredBgpConfig::new("10.99.0.1".parse().unwrap(), 64512),
        vec![],
    )
}

#[test]
fn rendered_configurations_match_their_golden_files_and_bird_accepts_them() {
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/bird");
    for (name, (cfg, pools)) in [
        ("mesh", mesh_case()),
        ("reflector", reflector_case()),
        ("lonely", lonely_case()),
        ("dual-stack", dual_stack_case()),
        ("services", services_case()),
    ] {
        let files = bird::render(&cfg, &pools).unwrap();
        let dir = golden.join(name);
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            bird::write(&dir, &files).unwrap();
        }
        for (file, text) in &files {
            let want = std::fs::read_to_string(dir.join(file))
                .unwrap_or_else(|e| panic!("{name}/{file}: {e} (UPDATE_GOLDEN=1 writes it)"));
            assert_eq!(*text, want, "{name}/{file}");
        }
        if !have("bird") {
            skip("BIRD 2 is not installed (bird2)");
            continue;
        }
        let tmp = tempfile::tempdir().unwrap();
        assert!(bird::write(tmp.path(), &files).unwrap(), "first write");
        assert!(
            !bird::write(tmp.path(), &files).unwrap(),
            "unchanged: not rewritten"
        );
        let out = Command::new("bird")
            .args(["-p", "-c"])
            .arg(tmp.path().join("bird.cfg"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "bird -p on {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn a_password_bird_cannot_express_is_refused_by_name() {
    let (mut cfg, pools) = reflector_case();
    cfg.peers[1].password = Some("a\"b".into());
    let e = bird::render(&cfg, &pools).unwrap_err();
    assert_eq!(
        e.to_string(),
        "the password of peer 192.168.0.1 contains a double quote or a line break, which BIRD's configuration cannot express"
    );
}

#[test]
fn real_bird_on_one_node_and_our_speaker_on_the_other_converge() {
    if !have("bird") || !have("birdc") || !have("ping") {
        skip("BIRD 2 (bird, birdc) or ping is not installed");
        return;
    }
    let (Some(n1), Some(n2)) = (NetNs::new("cn-bx1"), NetNs::new("cn-bx2")) else {
        return;
    };
    let (Some(p1), Some(p2)) = (NetNs::new("cn-bxp1"), NetNs::new("cn-bxp2")) else {
        return;
    };
    common::cluster::paired(&n1, &n2);
    let port = free_port();
    let Some(_etcd) = Etcd::start_on_also(&n1.name, port, "10.99.0.1") else {
        return;
    };
    let ep = format!("http://10.99.0.1:{port}");
    let (s1, s2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (h1, h2) = (free_port(), free_port());
    let conf_dir: PathBuf = s1.path().join("bird");
    let socket = s1.path().join("bird.ctl");
    let _d1 = calico_node(
        &n1,
        "node-1",
        &ep,
        s1.path(),
        h1,
        &[
            ("CALICO_NETWORKING_BACKEND", "bird-external"),
            ("CALICO_BIRD_CONFIG_DIR", conf_dir.to_str().unwrap()),
            ("CALICO_BIRD_SOCKET", socket.to_str().unwrap()),
        ],
    );
    let _d2 = calico_node(&n2, "node-2", &ep, s2.path(), h2, &[]);
    common::until("BIRD's configuration", Duration::from_secs(20), || {
        std::fs::read_to_string(conf_dir.join("bird.cfg")).is_ok_and(|c| c.contains("10.99.0.2"))
    });
    let _bird = bird_external(
        &n1,
        &conf_dir.join("bird.cfg"),
        &socket,
        &s1.path().join("bird.pid"),
    );
    for (ns, port) in [(&n1, h1), (&n2, h2)] {
        common::until("calico-node ready", Duration::from_secs(30), || {
            ns.run_in(move || http_get(port, "/readiness"))
                .is_ok_and(|(s, _)| s == 200)
        });
    }
    // Pods on both nodes: node-1's block reaches node-2 through BIRD, node-2's reaches
    // node-1's kernel through BIRD's kernel protocol (confd reloaded BIRD with the new
    // aggregate when node-1's block was claimed).
    let a1 = add_pod(&n1, "node-1", &ep, &p1);
    let a2 = add_pod(&n2, "node-2", &ep, &p2);
    let on_n1 = format!("{} via 10.99.0.2 dev eth0 proto bird", block_of(&a2));
    let on_n2 = format!("{} via 10.99.0.1 dev eth0 proto 80 onlink", block_of(&a1));
    let birdc = |args: &[&str]| {
        let out = n1
            .command("birdc")
            .arg("-s")
            .arg(&socket)
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let start = std::time::Instant::now();
    while !(routes(&n1).contains(&on_n1) && routes(&n2).contains(&on_n2)) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no routes both ways:\nnode-1:\n{}node-2:\n{}BIRD:\n{}{}\nlogs:\n{}\n{}\n{}",
            routes(&n1),
            routes(&n2),
            birdc(&["show", "protocols"]),
            birdc(&["show", "route"]),
            std::fs::read_to_string(s1.path().join("calico-node.log")).unwrap_or_default(),
            std::fs::read_to_string(conf_dir.join("bird_aggr.cfg")).unwrap_or_default(),
            birdc(&["configure"]),
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let protocols = birdc(&["show", "protocols"]);
    assert!(
        protocols
            .lines()
            .any(|l| l.starts_with("Mesh_10_99_0_2") && l.contains("Established")),
        "{protocols}"
    );
    assert!(routes(&n1).contains(&format!("blackhole {} proto 80", block_of(&a1))));
    // confd reloaded BIRD without a problem (else node-1's readiness would say so).
    let ready = n1.run_in(move || http_get(h1, "/readiness")).unwrap();
    assert_eq!(ready.0, 200, "{}", ready.1);
    assert!(
        ping(&p1, &a2) && ping(&p2, &a1),
        "pods reach each other over BIRD's and our speaker's routes"
    );
}

/// Dual stack, live: real BIRD with the configuration rendered for a dual-stack node-1,
/// our speaker on node-2; IPv6 routes cross the IPv4 session both ways with each node's
/// IPv6 address as next hop, and BIRD's IPv6 kernel protocol programs ours.
#[test]
fn rendered_dual_stack_bird_exchanges_ipv6_routes_with_our_speaker() {
    use common::bgp::{OurSpeaker, link, wait_for};
    if !have("bird") || !have("birdc") {
        skip("BIRD 2 (bird, birdc) is not installed");
        return;
    }
    let (Some(n1), Some(n2)) = (NetNs::new("cn-b6a"), NetNs::new("cn-b6b")) else {
        return;
    };
    link(&n1, "10.99.0.1", &n2, "10.99.0.2");
    n1.ip(&[
        "-6",
        "addr",
        "add",
        "fd00:99::1/64",
        "dev",
        "bgp-a",
        "nodad",
    ]);
    n2.ip(&[
        "-6",
        "addr",
        "add",
        "fd00:99::2/64",
        "dev",
        "bgp-b",
        "nodad",
    ]);
    let policy = ExportPolicy {
        allowed: vec![net("10.244.0.0/16"), net("fd00:244::/48")],
        ..Default::default()
    };
    let node = |me: &str, me6: &str, peer: &str, passive: bool, blocks: [&str; 2]| {
        let mut c = DesiredBgpConfig::new(me.parse().unwrap(), 64512);
        c.ipv6_next_hop = Some(me6.parse().unwrap());
        let mut p = DesiredPeer::new(peer.parse().unwrap(), 64512, PeerType::NodeToNodeMesh);
        p.passive = passive;
        p.local_address = Some(me.parse().unwrap());
        c.peers.push(p);
        c.export = blocks.iter().map(|b| net(b)).collect();
        c.policy = policy.clone();
        c
    };
    let c1 = node(
        "10.99.0.1",
        "fd00:99::1",
        "10.99.0.2",
        false,
        ["10.244.1.0/26", "fd00:244:0:1::/122"],
    );
    let c2 = node(
        "10.99.0.2",
        "fd00:99::2",
        "10.99.0.1",
        true,
        ["10.244.2.0/26", "fd00:244:0:2::/122"],
    );
    let dir = tempfile::tempdir().unwrap();
    let files = bird::render(&c1, &[net("10.244.0.0/16"), net("fd00:244::/48")]).unwrap();
    bird::write(dir.path(), &files).unwrap();
    let socket = dir.path().join("bird.ctl");
    let _bird = bird_external(
        &n1,
        &dir.path().join("bird.cfg"),
        &socket,
        &dir.path().join("bird.pid"),
    );
    let mut ours = OurSpeaker::start(&n2, c2);
    let birdc = |cmd: &str| {
        let out = n1
            .command("birdc")
            .arg("-s")
            .arg(&socket)
            .args(cmd.split(' '))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let want = [
        ("10.244.1.0/26".to_string(), "10.99.0.1".to_string()),
        ("fd00:244:0:1::/122".to_string(), "fd00:99::1".to_string()),
    ];
    wait_for(
        Duration::from_secs(30),
        "BIRD's blocks at our speaker",
        || {
            let have = ours.routes();
            want.iter().all(|w| have.contains(w)).then_some(())
        },
    );
    let kernel6 = |ns: &NetNs| {
        let out = ns.command("ip").args(["-6", "route"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let start = std::time::Instant::now();
    while !kernel6(&n1).contains("fd00:244:0:2::/122 via fd00:99::2 dev bgp-a proto bird") {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "our IPv6 block not in node-1's kernel:\n{}\n{}\n{}",
            kernel6(&n1),
            birdc("show protocols"),
            birdc("show route all"),
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        routes(&n1).contains("10.244.2.0/26 via 10.99.0.2 dev bgp-a proto bird"),
        "{}",
        routes(&n1)
    );
    // Our speaker sent its IPv6 block with its own IPv6 address as next hop.
    let r = birdc("show route all fd00:244:0:2::/122");
    assert!(r.contains("fd00:99::2"), "{r}");
}
