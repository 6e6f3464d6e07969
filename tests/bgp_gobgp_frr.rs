//! Our speaker against GoBGP and FRR in network namespaces: the session comes up with us
//! active and with us passive, routes flow both ways with the right next hop, and
//! withdrawals propagate.

mod common;

use std::time::Duration;

use calico_node::bgp::config::{DesiredBgpConfig, DesiredPeer, PeerType};
use calico_node::bgp::fsm::State;
use common::NetNs;
use common::bgp::{OurSpeaker, frr, gobgp, gobgp_cli, link, pool_policy, vtysh, wait_for};

const US: &str = "10.99.0.1";
const PEER: &str = "10.99.0.2";

fn our_conf(passive: bool) -> DesiredBgpConfig {
    let mut cfg = DesiredBgpConfig::new(US.parse().unwrap(), 64512);
    let mut peer = DesiredPeer::new(PEER.parse().unwrap(), 64512, PeerType::Global);
    peer.passive = passive;
    cfg.peers = vec![peer];
    cfg.export = vec!["10.244.1.0/26".parse().unwrap()];
    cfg.policy = pool_policy();
    cfg
}

fn up(us: &OurSpeaker) -> bool {
    us.peer_state(PEER)
        .is_some_and(|s| s.state == State::Established)
}

fn has(us: &mut OurSpeaker, prefix: &str) -> bool {
    us.routes()
        .contains(&(prefix.to_string(), PEER.to_string()))
}

fn gobgp_flow(us_passive: bool) {
    let Some(a) = NetNs::new("bgp-us") else {
        return;
    };
    let Some(b) = NetNs::new("bgp-gobgp") else {
        return;
    };
    link(&a, US, &b, PEER);
    let conf = format!(
        r#"[global.config]
  as = 64512
  router-id = "{PEER}"
  local-address-list = ["{PEER}"]
[[neighbors]]
  [neighbors.config]
    neighbor-address = "{US}"
    peer-as = 64512
  [neighbors.transport.config]
    passive-mode = {}
  [neighbors.timers.config]
    connect-retry = 1
  [[neighbors.afi-safis]]
    [neighbors.afi-safis.config]
      afi-safi-name = "ipv4-unicast"
"#,
        !us_passive
    );
    let Some(_d) = gobgp(&b, &conf) else { return };
    gobgp_cli(&b, "global rib add 10.244.2.0/26 -a ipv4");
    let mut us = OurSpeaker::start(&a, our_conf(us_passive));
    wait_for(Duration::from_secs(30), "the session to GoBGP", || {
        up(&us).then_some(())
    });
    let rib = wait_for(Duration::from_secs(10), "our route at GoBGP", || {
        let s = gobgp_cli(&b, "global rib -a ipv4");
        s.contains("10.244.1.0/26").then_some(s)
    });
    let line = rib
        .lines()
        .find(|l| l.contains("10.244.1.0/26"))
        .unwrap()
        .to_string();
    assert!(line.contains(US), "next hop is us: {line}");
    wait_for(
        Duration::from_secs(10),
        "GoBGP's route in our table",
        || has(&mut us, "10.244.2.0/26").then_some(()),
    );
    // Withdrawals both ways.
    let mut cfg = our_conf(us_passive);
    cfg.export.clear();
    us.config.send_replace(cfg);
    wait_for(Duration::from_secs(10), "our withdrawal at GoBGP", || {
        (!gobgp_cli(&b, "global rib -a ipv4").contains("10.244.1.0/26")).then_some(())
    });
    gobgp_cli(&b, "global rib del 10.244.2.0/26 -a ipv4");
    wait_for(
        Duration::from_secs(10),
        "GoBGP's withdrawal in our table",
        || us.routes().is_empty().then_some(()),
    );
    assert!(up(&us));
}

#[test]
fn gobgp_session_with_us_active() {
    gobgp_flow(false);
}

#[test]
fn gobgp_session_with_us_passive() {
    gobgp_flow(true);
}

fn frr_flow(us_passive: bool) {
    let Some(a) = NetNs::new("bgp-us") else {
        return;
    };
    let Some(b) = NetNs::new("bgp-frr") else {
        return;
    };
    link(&a, US, &b, PEER);
    let passive = if us_passive {
        String::new()
    } else {
        format!(" neighbor {US} passive\n")
    };
    let conf = format!(
        "frr defaults traditional\nhostname frr\nrouter bgp 64512\n bgp router-id {PEER}\n no bgp ebgp-requires-policy\n no bgp network import-check\n neighbor {US} remote-as 64512\n neighbor {US} timers connect 1\n{passive} address-family ipv4 unicast\n  network 10.244.2.0/26\n  neighbor {US} activate\n exit-address-family\n"
    );
    let Some(d) = frr(&b, &conf, PEER) else {
        return;
    };
    let mut us = OurSpeaker::start(&a, our_conf(us_passive));
    wait_for(Duration::from_secs(30), "the session to FRR", || {
        up(&us).then_some(())
    });
    let json = wait_for(Duration::from_secs(10), "our route at FRR", || {
        let s = vtysh(&d, &["show ip bgp 10.244.1.0/26 json"]);
        s.contains(US).then_some(s)
    });
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let path = &v["paths"][0];
    assert_eq!(path["nexthops"][0]["ip"], US, "{json}");
    assert_eq!(path["origin"], "IGP", "{json}");
    assert_eq!(path["locPrf"], 100, "{json}");
    wait_for(Duration::from_secs(10), "FRR's route in our table", || {
        has(&mut us, "10.244.2.0/26").then_some(())
    });
    let mut cfg = our_conf(us_passive);
    cfg.export.clear();
    us.config.send_replace(cfg);
    wait_for(Duration::from_secs(10), "our withdrawal at FRR", || {
        (!vtysh(&d, &["show ip bgp json"]).contains("10.244.1.0/26")).then_some(())
    });
    vtysh(
        &d,
        &[
            "configure terminal",
            "router bgp 64512",
            "address-family ipv4 unicast",
            "no network 10.244.2.0/26",
        ],
    );
    wait_for(
        Duration::from_secs(10),
        "FRR's withdrawal in our table",
        || us.routes().is_empty().then_some(()),
    );
    assert!(up(&us));
}

#[test]
fn frr_session_with_us_active() {
    frr_flow(false);
}

#[test]
fn frr_session_with_us_passive() {
    frr_flow(true);
}
