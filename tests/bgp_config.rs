//! Desired-config changes reach the speaker incrementally: adding or removing a peer
//! leaves the other sessions alone; changing a peer's settings restarts only that one.

mod common;

use std::time::Duration;

use calico_node::bgp::config::{DesiredBgpConfig, DesiredPeer, PeerType};
use calico_node::bgp::fsm::State;
use common::bgp::{OurSpeaker, bird, birdc, gobgp, pool_policy, wait_for};

const US: &str = "10.99.0.1";
const BIRD: &str = "10.99.0.2";
const GOBGP: &str = "10.99.0.3";

fn conf(peers: &[&str], bird_hold: u16) -> DesiredBgpConfig {
    let mut cfg = DesiredBgpConfig::new(US.parse().unwrap(), 64512);
    for p in peers {
        let mut peer = DesiredPeer::new(p.parse().unwrap(), 64512, PeerType::NodeToNodeMesh);
        if *p == BIRD {
            peer.hold_time = bird_hold;
        }
        cfg.peers.push(peer);
    }
    cfg.export = vec!["10.244.1.0/26".parse().unwrap()];
    cfg.policy = pool_policy();
    cfg
}

#[test]
fn peers_change_without_disturbing_the_others() {
    let Some((us_ns, bird_ns, gobgp_ns)) = common::bgp::us_bird_gobgp_lan() else {
        return;
    };
    let Some(b) = bird(
        &bird_ns,
        &format!(
            "router id {BIRD};\nprotocol device {{ }}\nprotocol bgp calico {{\n  local {BIRD} as 64512; neighbor {US} as 64512; direct; passive on;\n  ipv4 {{ import all; export none; }};\n}}\n"
        ),
    ) else {
        return;
    };
    let Some(_g) = gobgp(
        &gobgp_ns,
        &format!(
            "[global.config]\n  as = 64512\n  router-id = \"{GOBGP}\"\n  local-address-list = [\"{GOBGP}\"]\n[[neighbors]]\n  [neighbors.config]\n    neighbor-address = \"{US}\"\n    peer-as = 64512\n  [neighbors.transport.config]\n    passive-mode = true\n"
        ),
    ) else {
        return;
    };
    let up = |us: &OurSpeaker, p: &str| {
        us.peer_state(p)
            .is_some_and(|s| s.state == State::Established)
    };
    let us = OurSpeaker::start(&us_ns, conf(&[BIRD], 90));
    wait_for(Duration::from_secs(20), "the BIRD session", || {
        up(&us, BIRD).then_some(())
    });
    let since = us.peer_state(BIRD).unwrap().since;
    let bird_since = |b: &common::bgp::Daemon| {
        birdc(b, "show protocols calico")
            .lines()
            .find(|l| l.starts_with("calico"))
            .unwrap_or_default()
            .to_string()
    };
    let bird_line = bird_since(&b);
    // Add GoBGP: BIRD's session is not touched.
    us.config.send_replace(conf(&[BIRD, GOBGP], 90));
    wait_for(Duration::from_secs(20), "the GoBGP session", || {
        up(&us, GOBGP).then_some(())
    });
    assert_eq!(us.peer_state(BIRD).unwrap().since, since);
    // Remove GoBGP: still untouched.
    us.config.send_replace(conf(&[BIRD], 90));
    wait_for(Duration::from_secs(10), "GoBGP to be gone", || {
        us.peer_state(GOBGP).is_none().then_some(())
    });
    assert_eq!(us.peer_state(BIRD).unwrap().since, since);
    assert_eq!(bird_since(&b), bird_line, "BIRD saw no flap");
    // Change BIRD's settings: that session (only) is restarted, with the new hold time.
    std::thread::sleep(Duration::from_millis(1100));
    us.config.send_replace(conf(&[BIRD], 60));
    wait_for(Duration::from_secs(20), "the new BIRD session", || {
        us.peer_state(BIRD)
            .filter(|s| s.state == State::Established && s.since != since)
    });
    wait_for(Duration::from_secs(10), "BIRD to show hold time 60", || {
        birdc(&b, "show protocols all calico")
            .contains("Hold timer:")
            .then_some(())
    });
    let all = birdc(&b, "show protocols all calico");
    assert!(all.contains("/60"), "negotiated hold time 60: {all}");
}
