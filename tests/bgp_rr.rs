//! Route reflection (RFC 4456) with real daemons: our speaker reflecting between a BIRD
//! client and a GoBGP client (reflected routes carry ORIGINATOR_ID and CLUSTER_LIST, next
//! hops unchanged), and our speaker as a client of a reflecting BIRD.

mod common;

use std::time::Duration;

use calico_node::bgp::config::{DesiredBgpConfig, DesiredPeer, PeerType};
use calico_node::bgp::fsm::State;
use common::bgp::{OurSpeaker, bird, birdc, gobgp, gobgp_cli, pool_policy, wait_for};

const US: &str = "10.99.0.1";
const BIRD: &str = "10.99.0.2";
const GOBGP: &str = "10.99.0.3";

fn gobgp_conf(neighbor: &str) -> String {
    format!(
        r#"[global.config]
  as = 64512
  router-id = "{GOBGP}"
  local-address-list = ["{GOBGP}"]
[[neighbors]]
  [neighbors.config]
    neighbor-address = "{neighbor}"
    peer-as = 64512
  [neighbors.timers.config]
    connect-retry = 1
  [[neighbors.afi-safis]]
    [neighbors.afi-safis.config]
      afi-safi-name = "ipv4-unicast"
"#
    )
}

fn bird_conf(neighbors: &[(&str, bool)]) -> String {
    let mut s = format!(
        "router id {BIRD};\nprotocol device {{ }}\nprotocol static pools {{ ipv4; route 10.244.2.0/26 blackhole; }}\n"
    );
    for (i, (n, client)) in neighbors.iter().enumerate() {
        s += &format!(
            "protocol bgp p{i} {{\n  local {BIRD} as 64512; neighbor {n} as 64512; direct;\n  connect delay time 1; connect retry time 1; error wait time 1, 5;\n  {}\n  ipv4 {{ import all; export all; }};\n}}\n",
            if *client {
                "rr client; rr cluster id 2.0.0.2;"
            } else {
                ""
            }
        );
    }
    s
}

#[test]
fn we_reflect_between_a_bird_client_and_a_gobgp_client() {
    let Some((us_ns, bird_ns, gobgp_ns)) = common::bgp::us_bird_gobgp_lan() else {
        return;
    };
    let Some(b) = bird(&bird_ns, &bird_conf(&[(US, false)])) else {
        return;
    };
    let Some(_g) = gobgp(&gobgp_ns, &gobgp_conf(US)) else {
        return;
    };
    gobgp_cli(&gobgp_ns, "global rib add 10.244.3.0/26 -a ipv4");
    let mut cfg = DesiredBgpConfig::new(US.parse().unwrap(), 64512);
    cfg.cluster_id = Some("1.0.0.1".parse().unwrap());
    for p in [BIRD, GOBGP] {
        let mut peer = DesiredPeer::new(p.parse().unwrap(), 64512, PeerType::Global);
        peer.rr_client = true;
        cfg.peers.push(peer);
    }
    cfg.policy = pool_policy();
    let mut us = OurSpeaker::start(&us_ns, cfg);
    wait_for(Duration::from_secs(30), "both sessions", || {
        [BIRD, GOBGP]
            .iter()
            .all(|p| {
                us.peer_state(p)
                    .is_some_and(|s| s.state == State::Established)
            })
            .then_some(())
    });
    // GoBGP's route at BIRD: next hop GoBGP's, ORIGINATOR_ID GoBGP, CLUSTER_LIST ours.
    let r = wait_for(
        Duration::from_secs(15),
        "the reflected route at BIRD",
        || {
            let s = birdc(&b, "show route all 10.244.3.0/26");
            s.contains("10.244.3.0/26").then_some(s)
        },
    );
    assert!(r.contains(&format!("via {GOBGP}")), "{r}");
    assert!(r.contains(&format!("BGP.originator_id: {GOBGP}")), "{r}");
    assert!(r.contains("BGP.cluster_list: 1.0.0.1"), "{r}");
    // BIRD's route at GoBGP, likewise.
    let r = wait_for(
        Duration::from_secs(15),
        "the reflected route at GoBGP",
        || {
            let s = gobgp_cli(&gobgp_ns, &format!("neighbor {US} adj-in -a ipv4"));
            s.contains("10.244.2.0/26").then_some(s)
        },
    );
    let line = r.lines().find(|l| l.contains("10.244.2.0/26")).unwrap();
    assert!(line.contains(BIRD), "next hop kept: {line}");
    assert!(line.contains(&format!("Originator: {BIRD}")), "{line}");
    assert!(line.contains("ClusterList: [1.0.0.1]"), "{line}");
    // And we use both.
    wait_for(Duration::from_secs(10), "both routes in our table", || {
        (us.routes()
            == vec![
                ("10.244.2.0/26".to_string(), BIRD.to_string()),
                ("10.244.3.0/26".to_string(), GOBGP.to_string()),
            ])
        .then_some(())
    });
}

#[test]
fn we_are_a_client_of_a_reflecting_bird() {
    let Some((us_ns, bird_ns, gobgp_ns)) = common::bgp::us_bird_gobgp_lan() else {
        return;
    };
    let Some(b) = bird(&bird_ns, &bird_conf(&[(US, true), (GOBGP, true)])) else {
        return;
    };
    let Some(_g) = gobgp(&gobgp_ns, &gobgp_conf(BIRD)) else {
        return;
    };
    gobgp_cli(&gobgp_ns, "global rib add 10.244.3.0/26 -a ipv4");
    let mut cfg = DesiredBgpConfig::new(US.parse().unwrap(), 64512);
    cfg.peers = vec![DesiredPeer::new(
        BIRD.parse().unwrap(),
        64512,
        PeerType::Global,
    )];
    cfg.export = vec!["10.244.1.0/26".parse().unwrap()];
    cfg.policy = pool_policy();
    let mut us = OurSpeaker::start(&us_ns, cfg);
    // GoBGP's route, reflected by BIRD, with GoBGP's next hop; BIRD's own route too.
    wait_for(
        Duration::from_secs(30),
        "the routes via the reflector",
        || {
            (us.routes()
                == vec![
                    ("10.244.2.0/26".to_string(), BIRD.to_string()),
                    ("10.244.3.0/26".to_string(), GOBGP.to_string()),
                ])
            .then_some(())
        },
    );
    // Our block reaches GoBGP through the reflector, next hop us.
    let r = wait_for(Duration::from_secs(15), "our block at GoBGP", || {
        let s = gobgp_cli(&gobgp_ns, &format!("neighbor {BIRD} adj-in -a ipv4"));
        s.contains("10.244.1.0/26").then_some(s)
    });
    let line = r.lines().find(|l| l.contains("10.244.1.0/26")).unwrap();
    assert!(line.contains(US), "{line}");
    assert!(birdc(&b, "show route 10.244.1.0/26").contains(&format!("via {US}")));
}
