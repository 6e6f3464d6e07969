//! Our speaker against BIRD 2 in network namespaces: the session comes up with us active
//! and with us passive, routes flow both ways with the right next hop and attributes,
//! withdrawals propagate, and MD5 works with the right password and refuses a wrong one.

mod common;

use std::time::Duration;

use calico_node::bgp::config::{DesiredBgpConfig, DesiredPeer, PeerType};
use calico_node::bgp::fsm::State;
use common::NetNs;
use common::bgp::{OurSpeaker, bird, birdc, link, pool_policy, wait_for};

const US: &str = "10.99.0.1";
const BIRD: &str = "10.99.0.2";

fn bird_conf(extra: &str) -> String {
    format!(
        r#"router id {BIRD};
protocol device {{ }}
protocol static pools {{ ipv4; route 10.244.2.0/26 blackhole; }}
protocol bgp calico {{
  local {BIRD} as 64512; neighbor {US} as 64512;
  direct; connect delay time 1; connect retry time 1; error wait time 1, 5;
  {extra}
  ipv4 {{ import all; export where proto = "pools"; next hop self; }};
}}
"#
    )
}

fn our_conf(passive: bool, password: Option<&str>) -> DesiredBgpConfig {
    let mut cfg = DesiredBgpConfig::new(US.parse().unwrap(), 64512);
    let mut peer = DesiredPeer::new(BIRD.parse().unwrap(), 64512, PeerType::NodeToNodeMesh);
    peer.passive = passive;
    peer.password = password.map(str::to_string);
    cfg.peers = vec![peer];
    cfg.export = vec!["10.244.1.0/26".parse().unwrap()];
    cfg.policy = pool_policy();
    cfg
}

fn established(us: &OurSpeaker) -> bool {
    us.peer_state(BIRD)
        .is_some_and(|s| s.state == State::Established)
}

/// Whether the session to BIRD is Established within `limit` (polled every 100 ms).
fn established_within(us: &OurSpeaker, limit: Duration) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if established(us) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// Sessions up both ways, routes both ways, withdrawals both ways.
fn routes_flow(us_passive: bool) {
    let Some(a) = NetNs::new("bgp-us") else {
        return;
    };
    let Some(b) = NetNs::new("bgp-bird") else {
        return;
    };
    link(&a, US, &b, BIRD);
    let extra = if us_passive { "" } else { "passive on;" };
    let Some(d) = bird(&b, &bird_conf(extra)) else {
        return;
    };
    let mut us = OurSpeaker::start(&a, our_conf(us_passive, None));
    wait_for(Duration::from_secs(20), "the session to BIRD", || {
        established(&us).then_some(())
    });
    let proto = wait_for(Duration::from_secs(10), "BIRD to say Established", || {
        let s = birdc(&d, "show protocols all calico");
        s.contains("Established").then_some(s)
    });
    assert!(proto.contains("Neighbor AS:      64512"), "{proto}");

    // Our block, at BIRD, via us, with our attributes.
    let r = wait_for(Duration::from_secs(10), "our route at BIRD", || {
        let s = birdc(&d, "show route all 10.244.1.0/26");
        s.contains("10.244.1.0/26").then_some(s)
    });
    assert!(r.contains(&format!("via {US}")), "{r}");
    assert!(r.contains("BGP.origin: IGP"), "{r}");
    assert!(r.contains("BGP.local_pref: 100"), "{r}");
    // BIRD's route, at Felix's channel, via BIRD.
    wait_for(Duration::from_secs(10), "BIRD's route in our table", || {
        us.routes()
            .contains(&("10.244.2.0/26".to_string(), BIRD.to_string()))
            .then_some(())
    });
    let st = us.peer_state(BIRD).unwrap();
    assert_eq!((st.received, st.accepted, st.advertised), (1, 1, 1));
    status_and_metrics(&us);

    // Withdraw ours: BIRD drops it.
    let mut cfg = our_conf(us_passive, None);
    cfg.export.clear();
    us.config.send_replace(cfg);
    wait_for(Duration::from_secs(10), "our withdrawal at BIRD", || {
        (!birdc(&d, "show route 10.244.1.0/26").contains("10.244.1.0/26")).then_some(())
    });
    // Withdraw BIRD's: Felix is told.
    birdc(&d, "disable pools");
    wait_for(
        Duration::from_secs(10),
        "BIRD's withdrawal in our table",
        || us.routes().is_empty().then_some(()),
    );
    assert!(established(&us), "withdrawals do not disturb the session");
}

/// `calicoctl node status` over the status socket, and the Prometheus metrics.
fn status_and_metrics(us: &OurSpeaker) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("bgp-status.sock");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let server = {
        let (sock, status, cancel) = (sock.clone(), us.status.clone(), cancel.clone());
        std::thread::spawn(move || {
            rt.block_on(calico_node::bgp::status::serve(sock, status, cancel))
                .unwrap()
        })
    };
    wait_for(Duration::from_secs(5), "the status socket", || {
        sock.exists().then_some(())
    });
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_calicoctl"))
        .args(["node", "status"])
        .env("CALICO_BGP_STATUS_SOCKET", &sock)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{text}");
    assert!(
        text.starts_with("Calico process is running.\n\nIPv4 BGP status\n"),
        "{text}"
    );
    assert!(
        text.lines().any(
            |l| l.starts_with(&format!("| {BIRD}    | node-to-node mesh | up    | "))
                && l.ends_with("| Established |")
        ),
        "{text}"
    );
    assert!(
        text.ends_with("IPv6 BGP status\nNo IPv6 peers found.\n"),
        "{text}"
    );
    cancel.cancel();
    server.join().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_calicoctl"))
        .args(["node", "status"])
        .env("CALICO_BGP_STATUS_SOCKET", &sock)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "Calico process is not running.\n"
    );

    let registry = prometheus::Registry::new();
    registry
        .register(Box::new(calico_node::bgp::metrics::BgpMetrics::new(
            us.status.clone(),
        )))
        .unwrap();
    let mut text = String::new();
    prometheus::TextEncoder::new()
        .encode_utf8(&registry.gather(), &mut text)
        .unwrap();
    let labels = format!("{{peer=\"{BIRD}\",peer_type=\"node-to-node mesh\"}}");
    for line in [
        format!("calico_bgp_peer_state{labels} 6"),
        format!("calico_bgp_peer_prefixes_received{labels} 1"),
        format!("calico_bgp_peer_prefixes_accepted{labels} 1"),
        format!("calico_bgp_peer_prefixes_advertised{labels} 1"),
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
    }
    assert!(
        text.contains(&format!(
            "calico_bgp_peer_updates_received_total{{peer=\"{BIRD}\"}}"
        )),
        "{text}"
    );
}

#[test]
fn bird_session_with_us_active() {
    routes_flow(false);
}

#[test]
fn bird_session_with_us_passive() {
    routes_flow(true);
}

#[test]
fn bird_md5_right_password_comes_up_wrong_one_is_refused() {
    let Some(a) = NetNs::new("bgp-us") else {
        return;
    };
    let Some(b) = NetNs::new("bgp-bird") else {
        return;
    };
    link(&a, US, &b, BIRD);
    let Some(d) = bird(&b, &bird_conf(r#"password "s3cret";"#)) else {
        return;
    };
    let mut us = OurSpeaker::start(&a, our_conf(false, Some("s3cret")));
    wait_for(Duration::from_secs(20), "the MD5 session to BIRD", || {
        established(&us).then_some(())
    });
    wait_for(
        Duration::from_secs(10),
        "BIRD's route over the MD5 session",
        || {
            us.routes()
                .contains(&("10.244.2.0/26".to_string(), BIRD.to_string()))
                .then_some(())
        },
    );
    // The wrong password: the kernel drops the segments, the session never comes up and
    // our status says why.
    us.config.send_replace(our_conf(false, Some("wrong")));
    wait_for(Duration::from_secs(10), "the old session to go", || {
        (!established(&us)).then_some(())
    });
    let st = wait_for(Duration::from_secs(15), "a reason in our status", || {
        us.peer_state(BIRD).filter(|s| !s.reason.is_empty())
    });
    assert_ne!(st.state, State::Established);
    assert!(st.reason.contains("TCP MD5 password mismatch"), "{st:?}");
    assert!(!birdc(&d, "show protocols calico").contains("Established"));
}

/// RFC 5082 against a BIRD with `ttl security on`: with it on our side the session comes
/// up (both sides send TTL 255 and accept nothing less); without, our segments carry TTL 64
/// and a peer enforcing the rule never sees them, so it never does. (Each case gets a fresh
/// BIRD: one stuck in OpenSent refuses new connections for its hold time.) BIRD sets its
/// minimum TTL on a socket only once the connection exists, so a segment of ours that beats
/// it would slip through: in the refusal case the rule is also enforced in front of BIRD,
/// by nftables in its namespace, from the first SYN.
fn ttl_security_case(ours: Option<u8>) -> bool {
    let Some(a) = NetNs::new("bgp-us") else {
        return ours.is_some();
    };
    let Some(b) = NetNs::new("bgp-bird") else {
        return ours.is_some();
    };
    link(&a, US, &b, BIRD);
    if ours.is_none() {
        b.nft(
            "table ip gtsm {\n chain input {\n type filter hook input priority -300;\n \
              tcp dport 179 ip ttl < 255 drop\n tcp sport 179 ip ttl < 255 drop\n }\n}\n",
        );
    }
    let Some(_d) = bird(&b, &bird_conf("passive on; ttl security on;")) else {
        return ours.is_some();
    };
    let mut cfg = our_conf(false, None);
    cfg.peers[0].ttl_security = ours;
    let us = OurSpeaker::start(&a, cfg);
    established_within(&us, Duration::from_secs(5))
}

#[test]
fn bird_ttl_security_session_comes_up_with_ttl_255() {
    assert!(ttl_security_case(Some(1)));
}

#[test]
fn bird_ttl_security_refuses_ttl_64() {
    assert!(!ttl_security_case(None));
}

/// RFC 5082 on connections BIRD opens to us (point 9 of issue 15): we are passive, BIRD
/// connects. `bird_gtsm`: BIRD has `ttl security on`, and the rule is also enforced in
/// front of it by nftables from our first segment (the SYN-ACK) on; we must answer with
/// TTL 255 on the listener and on the accepted socket. Without: BIRD sends with a low
/// TTL, and our accepted socket, with its minimum TTL set before the first read, drops
/// BIRD's KEEPALIVE (sent after our OPEN, so after the option is set): no session.
/// Whether the session came up within 8 s.
fn ttl_security_incoming_case(bird_gtsm: bool) -> bool {
    let Some(a) = NetNs::new("bgp-us") else {
        return bird_gtsm;
    };
    let Some(b) = NetNs::new("bgp-bird") else {
        return bird_gtsm;
    };
    link(&a, US, &b, BIRD);
    if bird_gtsm {
        b.nft(
            "table ip gtsm {\n chain input {\n type filter hook input priority -300;\n \
              tcp sport 179 ip ttl < 255 drop\n }\n}\n",
        );
    }
    let extra = if bird_gtsm { "ttl security on;" } else { "" };
    let Some(_d) = bird(&b, &bird_conf(extra)) else {
        return bird_gtsm;
    };
    let mut cfg = our_conf(true, None);
    cfg.peers[0].ttl_security = Some(1);
    let us = OurSpeaker::start(&a, cfg);
    established_within(&us, Duration::from_secs(8))
}

#[test]
fn bird_connecting_in_with_ttl_security_comes_up() {
    assert!(ttl_security_incoming_case(true));
}

#[test]
fn ttl_security_refuses_a_peer_connecting_in_with_a_low_ttl() {
    assert!(!ttl_security_incoming_case(false));
}

/// ADD-PATH (RFC 7911) with BIRD's `add paths on`, as Calico configures it: BIRD sends us
/// both its paths to one prefix and we hold both; when one source goes, its path is
/// withdrawn by identifier and the other becomes best; BIRD reads our routes, sent with
/// identifiers.
#[test]
fn bird_add_path_both_ways() {
    let Some(a) = NetNs::new("bgp-us") else {
        return;
    };
    let Some(b) = NetNs::new("bgp-bird") else {
        return;
    };
    link(&a, US, &b, BIRD);
    let conf = format!(
        r#"router id {BIRD};
protocol device {{ }}
protocol static s1 {{ ipv4; route 10.250.0.0/24 via 10.99.0.21; }}
protocol static s2 {{ ipv4; route 10.250.0.0/24 via 10.99.0.22; }}
protocol bgp calico {{
  local {BIRD} as 64512; neighbor {US} as 64512;
  direct; connect delay time 1; connect retry time 1; error wait time 1, 5;
  ipv4 {{
    import all; add paths on;
    export filter {{ if proto = "s1" then bgp_local_pref = 200; accept; }};
  }};
}}
"#
    );
    let Some(d) = bird(&b, &conf) else {
        return;
    };
    let mut us = OurSpeaker::start(&a, our_conf(false, None));
    wait_for(Duration::from_secs(20), "the session to BIRD", || {
        established(&us).then_some(())
    });
    let both = wait_for(Duration::from_secs(10), "both of BIRD's paths", || {
        us.peer_state(BIRD).filter(|s| s.received == 2)
    });
    assert_eq!(both.accepted, 1, "{both:?}");
    wait_for(
        Duration::from_secs(10),
        "the preferred path as best",
        || {
            us.routes()
                .contains(&("10.250.0.0/24".to_string(), "10.99.0.21".to_string()))
                .then_some(())
        },
    );
    let caps = birdc(&d, "show protocols all calico");
    assert!(caps.contains("ADD-PATH"), "{caps}");

    // The preferred source goes: BIRD withdraws that path only; the other is best.
    birdc(&d, "disable s1");
    wait_for(Duration::from_secs(10), "the other path as best", || {
        us.routes()
            .contains(&("10.250.0.0/24".to_string(), "10.99.0.22".to_string()))
            .then_some(())
    });
    assert_eq!(us.peer_state(BIRD).unwrap().received, 1);

    // Ours reached BIRD through the identifiers we put before each prefix.
    let r = wait_for(Duration::from_secs(10), "our route at BIRD", || {
        let s = birdc(&d, "show route all 10.244.1.0/26");
        s.contains("10.244.1.0/26").then_some(s)
    });
    assert!(r.contains(&format!("via {US}")), "{r}");
    assert!(established(&us), "{:?}", us.peer_state(BIRD));
}

/// A service range is originated like a block; `prefixAdvertisements` communities,
/// standard and large, reach BIRD on the routes inside their CIDR and on no other.
#[test]
fn service_ranges_and_communities_reach_bird() {
    use calico_node::bgp::config::CommunityValue::{Large, Standard};
    let Some(a) = NetNs::new("bgp-us") else {
        return;
    };
    let Some(b) = NetNs::new("bgp-bird") else {
        return;
    };
    link(&a, US, &b, BIRD);
    let Some(d) = bird(&b, &bird_conf("")) else {
        return;
    };
    let mut cfg = our_conf(false, None);
    let services = "10.96.0.0/12".parse().unwrap();
    cfg.export.push(services);
    cfg.policy.allowed.push(services);
    cfg.service_ranges = vec![services];
    cfg.policy.communities = vec![(
        "10.244.0.0/16".parse().unwrap(),
        vec![Standard((100 << 16) | 6532), Large([100, 555, 107])],
    )];
    let us = OurSpeaker::start(&a, cfg);
    wait_for(Duration::from_secs(20), "the session to BIRD", || {
        established(&us).then_some(())
    });
    let block = wait_for(Duration::from_secs(10), "our block at BIRD", || {
        let s = birdc(&d, "show route all 10.244.1.0/26");
        s.contains("10.244.1.0/26").then_some(s)
    });
    assert!(block.contains("BGP.community: (100,6532)"), "{block}");
    assert!(
        block.contains("BGP.large_community: (100, 555, 107)"),
        "{block}"
    );
    let range = wait_for(Duration::from_secs(10), "the service range at BIRD", || {
        let s = birdc(&d, "show route all 10.96.0.0/12");
        s.contains("10.96.0.0/12").then_some(s)
    });
    assert!(range.contains(&format!("via {US}")), "{range}");
    assert!(!range.contains("community"), "{range}");
}
