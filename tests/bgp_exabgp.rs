//! Malformed UPDATEs from ExaBGP (hand-made attributes) meet RFC 7606: treat-as-withdraw
//! or attribute discard, the session stays up, and the daemon does not fall over. A
//! missing mandatory attribute, which ExaBGP cannot produce (it fills in ORIGIN and
//! AS_PATH), comes from a hand-written peer in the same test.

mod common;

use std::time::Duration;

use calico_node::bgp::config::{DesiredBgpConfig, DesiredPeer, PeerType};
use calico_node::bgp::fsm::State;
use common::NetNs;
use common::bgp::{OurSpeaker, exabgp, link, pool_policy, wait_for};

const US: &str = "10.99.0.1";
const EXA: &str = "10.99.0.2";

/// ExaBGP's session to us (iBGP, AS 64512, IPv4 unicast) announcing the `static` routes
/// given (lines of `route ...;`).
fn exa_neighbor(statics: &str) -> String {
    format!(
        r#"neighbor {US} {{
    router-id {EXA};
    local-address {EXA};
    local-as 64512;
    peer-as 64512;
    family {{ ipv4 unicast; }}
    static {{{statics}    }}
}}
"#
    )
}

#[test]
fn malformed_updates_from_exabgp_follow_rfc_7606() {
    let Some(a) = NetNs::new("bgp-us") else {
        return;
    };
    let Some(b) = NetNs::new("bgp-exa") else {
        return;
    };
    link(&a, US, &b, EXA);
    let mut cfg = DesiredBgpConfig::new(US.parse().unwrap(), 64512);
    let mut peer = DesiredPeer::new(EXA.parse().unwrap(), 64512, PeerType::Global);
    peer.passive = true;
    cfg.peers = vec![peer];
    cfg.policy = pool_policy();
    let mut us = OurSpeaker::start(&a, cfg);
    let conf = exa_neighbor(&format!(
        r#"
        # RFC 7606 §7.1: undefined ORIGIN value -> treat-as-withdraw
        route 10.244.10.0/26 next-hop {EXA} attribute [ 0x01 0x40 0x07 ];
        # §7.2: AS_PATH segment claiming 5 ASNs but holding 1 -> treat-as-withdraw
        route 10.244.11.0/26 next-hop {EXA} attribute [ 0x02 0x40 0x02050000fde9 ];
        # §7.8: COMMUNITIES (optional transitive) of 3 bytes -> treat-as-withdraw
        route 10.244.12.0/26 next-hop {EXA} attribute [ 0x08 0xc0 0x010203 ];
        # §7.7: AGGREGATOR (optional transitive) of 5 bytes -> attribute discarded
        route 10.244.13.0/26 next-hop {EXA} attribute [ 0x07 0xc0 0x0102030405 ];
        # well formed
        route 10.244.14.0/26 next-hop {EXA};
"#
    ));
    let Some(d) = exabgp(&b, &conf) else { return };
    wait_for(Duration::from_secs(30), "the session with ExaBGP", || {
        us.peer_state(EXA).filter(|s| s.state == State::Established)
    });
    let want = vec![
        ("10.244.13.0/26".to_string(), EXA.to_string()),
        ("10.244.14.0/26".to_string(), EXA.to_string()),
    ];
    let log = || std::fs::read_to_string(d.dir.path().join("exabgp.log")).unwrap_or_default();
    wait_for(Duration::from_secs(15), "the well-formed routes", || {
        (us.routes() == want).then_some(())
    });
    // Give the malformed ones time to (not) show up, then check again; the session stayed
    // up all along (one connection, no NOTIFICATION sent).
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(us.routes(), want, "ExaBGP log:\n{}", log());
    let st = us.peer_state(EXA).unwrap();
    assert_eq!(st.state, State::Established);
    assert!(st.notifications_out.is_empty(), "{st:?}");
    assert_eq!(
        st.received, 2,
        "treat-as-withdraw routes are not held: {st:?}"
    );
    // Each route has its own attributes, so its own UPDATE: all five (and End-of-RIB) came.
    assert!(st.updates_in >= 6, "{st:?}");
}

/// A peer written here (ExaBGP always adds ORIGIN and AS_PATH): an UPDATE without ORIGIN
/// is treat-as-withdraw with the session up; an NLRI with prefix length 33 cannot be
/// parsed, so the session is reset with UPDATE error / invalid network field (§5.3).
#[test]
fn missing_mandatory_attribute_and_unparsable_nlri() {
    use std::io::{Read, Write};

    use calico_node::bgp::message::{Codec, Message, Open, decode, err, frame_len};

    let Some(a) = NetNs::new("bgp-us") else {
        return;
    };
    let Some(b) = NetNs::new("bgp-raw") else {
        return;
    };
    link(&a, US, &b, EXA);
    let mut cfg = DesiredBgpConfig::new(US.parse().unwrap(), 64512);
    let mut peer = DesiredPeer::new(EXA.parse().unwrap(), 64512, PeerType::Global);
    peer.passive = true;
    cfg.peers = vec![peer];
    let mut us = OurSpeaker::start(&a, cfg);
    let codec = Codec::default();
    let mut conn = b.run_in(|| {
        wait_for(Duration::from_secs(10), "our listener", || {
            std::net::TcpStream::connect((US, 179)).ok()
        })
    });
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let open = Open::new(64512, 90, EXA.parse().unwrap(), vec![]);
    conn.write_all(&Message::Open(open).to_bytes(&codec).unwrap())
        .unwrap();
    conn.write_all(&Message::Keepalive.to_bytes(&codec).unwrap())
        .unwrap();
    let mut buf = Vec::new();
    let mut read_msg = |conn: &mut std::net::TcpStream| -> Option<Message> {
        let mut chunk = [0u8; 4096];
        loop {
            if let Ok(Some(len)) = frame_len(&buf) {
                let m = decode(&buf[..len], &codec).ok();
                buf.drain(..len);
                return m;
            }
            let n = conn.read(&mut chunk).ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    assert!(matches!(read_msg(&mut conn), Some(Message::Open(_))));
    wait_for(Duration::from_secs(10), "Established", || {
        us.peer_state(EXA).filter(|s| s.state == State::Established)
    });
    let update = |attrs: &[u8], nlri: &[u8]| {
        let mut body = vec![0, 0];
        body.extend((attrs.len() as u16).to_be_bytes());
        body.extend(attrs);
        body.extend(nlri);
        let mut m = vec![0xff; 16];
        m.extend(((19 + body.len()) as u16).to_be_bytes());
        m.push(2);
        m.extend(body);
        m
    };
    let as_path: &[u8] = &[0x40, 2, 0];
    let next_hop: &[u8] = &[0x40, 3, 4, 10, 99, 0, 2];
    let origin: &[u8] = &[0x40, 1, 1, 0];
    // No ORIGIN: treat-as-withdraw.
    conn.write_all(&update(
        &[as_path, next_hop].concat(),
        &[26, 10, 244, 20, 0],
    ))
    .unwrap();
    // Well formed.
    conn.write_all(&update(
        &[origin, as_path, next_hop].concat(),
        &[26, 10, 244, 21, 0],
    ))
    .unwrap();
    wait_for(Duration::from_secs(10), "the well-formed route", || {
        (us.routes() == vec![("10.244.21.0/26".to_string(), EXA.to_string())]).then_some(())
    });
    assert_eq!(us.peer_state(EXA).unwrap().state, State::Established);
    // Prefix length 33: the session is reset with the RFC's NOTIFICATION.
    conn.write_all(&update(
        &[origin, as_path, next_hop].concat(),
        &[33, 10, 244, 22, 0, 0],
    ))
    .unwrap();
    let n = loop {
        match read_msg(&mut conn) {
            Some(Message::Notification(n)) => break n,
            Some(_) => continue,
            None => panic!("connection closed without a NOTIFICATION"),
        }
    };
    assert_eq!((n.code, n.subcode), (err::UPDATE, err::INVALID_NETWORK));
    wait_for(Duration::from_secs(10), "the peer's routes to go", || {
        us.routes().is_empty().then_some(())
    });
    let st = us.peer_state(EXA).unwrap();
    assert_ne!(st.state, State::Established);
    assert!(st.reason.contains("invalid network field"), "{st:?}");
    assert_eq!(st.notifications_out.get(&err::UPDATE), Some(&1), "{st:?}");
}

/// Point 9 of issue 15: ExaBGP, a client of ours (we reflect, RFC 4456), announces a route
/// with ~4,000 bytes of communities, which fits in its 4096-byte UPDATE but no longer once
/// we add ORIGINATOR_ID and CLUSTER_LIST for BIRD, our other client. That route is not
/// exported to BIRD (logged, counted in `calico_bgp_peer_routes_too_large_total`); the
/// sessions stay up, without a flap, and ExaBGP's other route reaches BIRD. (Before: the
/// session with BIRD panicked in `Message::encode` at every restart.)
#[test]
fn a_route_too_large_to_reflect_is_not_exported_and_nothing_flaps() {
    use common::bgp::{bird, birdc, lan};
    const BIRD: &str = "10.99.0.3";
    let Some(a) = NetNs::new("bgp-us") else {
        return;
    };
    let Some(b) = NetNs::new("bgp-exa") else {
        return;
    };
    let Some(c) = NetNs::new("bgp-bird") else {
        return;
    };
    lan(&[(&a, US), (&b, EXA), (&c, BIRD)]);
    let bird_conf = format!(
        "router id {BIRD};\nprotocol device {{ }}\nprotocol bgp reflector {{\n  local {BIRD} as 64512; neighbor {US} as 64512; direct;\n  connect delay time 1; connect retry time 1; error wait time 1, 5;\n  ipv4 {{ import all; export none; }};\n}}\n"
    );
    let Some(bird_d) = bird(&c, &bird_conf) else {
        return;
    };
    let mut cfg = DesiredBgpConfig::new(US.parse().unwrap(), 64512);
    cfg.cluster_id = Some(US.parse().unwrap());
    let mut exa = DesiredPeer::new(EXA.parse().unwrap(), 64512, PeerType::Global);
    exa.passive = true;
    exa.rr_client = true;
    let mut birdp = DesiredPeer::new(BIRD.parse().unwrap(), 64512, PeerType::Global);
    birdp.rr_client = true;
    cfg.peers = vec![exa, birdp];
    cfg.policy = pool_policy();
    let mut us = OurSpeaker::start(&a, cfg);
    // 1008 communities: ExaBGP's UPDATE is ~4,085 bytes; ours to BIRD would be 14 more.
    let communities: Vec<String> = (1..=1008).map(|i| format!("64512:{i}")).collect();
    let conf = exa_neighbor(&format!(
        r#"
        route 10.244.30.0/26 next-hop {EXA} community [ {} ];
        route 10.244.31.0/26 next-hop {EXA};
"#,
        communities.join(" ")
    ));
    let Some(d) = exabgp(&b, &conf) else { return };
    let log = || std::fs::read_to_string(d.dir.path().join("exabgp.log")).unwrap_or_default();
    let up = |us: &OurSpeaker, p: &str| {
        us.peer_state(p)
            .filter(|s| s.state == State::Established)
            .and_then(|s| s.established_at)
    };
    let (exa_since, bird_since) = wait_for(Duration::from_secs(30), "both sessions", || {
        Some((up(&us, EXA)?, up(&us, BIRD)?))
    });
    let want = vec![
        ("10.244.30.0/26".to_string(), EXA.to_string()),
        ("10.244.31.0/26".to_string(), EXA.to_string()),
    ];
    wait_for(Duration::from_secs(15), "both of ExaBGP's routes", || {
        (us.routes() == want).then_some(())
    });
    wait_for(Duration::from_secs(15), "the normal route at BIRD", || {
        birdc(&bird_d, "show route 10.244.31.0/26")
            .contains("10.244.31.0/26")
            .then_some(())
    });
    wait_for(Duration::from_secs(10), "the refusal to be counted", || {
        us.peer_state(BIRD)
            .filter(|s| s.routes_too_large >= 1)
            .map(|_| ())
    });
    // Give a flap time to show.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !birdc(&bird_d, "show route 10.244.30.0/26").contains("10.244.30.0/26"),
        "the oversize route reached BIRD"
    );
    for (p, since) in [(EXA, exa_since), (BIRD, bird_since)] {
        let st = us.peer_state(p).unwrap();
        assert_eq!(st.state, State::Established, "{p}: {st:?}\n{}", log());
        assert_eq!(st.established_at, Some(since), "{p} flapped: {st:?}");
        assert!(st.notifications_out.is_empty(), "{p}: {st:?}");
        assert!(st.notifications_in.is_empty(), "{p}: {st:?}");
        assert!(!st.reason.contains("restarted"), "{p}: {st:?}");
    }
    assert_eq!(us.routes(), want);
    // The metric, as /metrics renders it.
    let metrics = calico_node::bgp::metrics::BgpMetrics::new(us.status.clone());
    // As a registry gathers them: families without a sample are left out.
    let families: Vec<_> = prometheus::core::Collector::collect(&metrics)
        .into_iter()
        .filter(|f| !f.get_metric().is_empty())
        .collect();
    let mut bytes = Vec::new();
    prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &families, &mut bytes).unwrap();
    let text = String::from_utf8(bytes).unwrap();
    let line = text
        .lines()
        .find(|l| {
            l.starts_with(&format!(
                "calico_bgp_peer_routes_too_large_total{{peer=\"{BIRD}\"}}"
            ))
        })
        .unwrap_or_else(|| panic!("no metric for BIRD:\n{text}"));
    let n: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= 1, "{line}");
}
