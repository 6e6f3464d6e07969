//! Decision process and export policy, as tables.

use std::net::{IpAddr, Ipv4Addr};

use super::*;
use crate::bgp::update::{AsPath, Attributes, Origin, Update};

const LOCAL_AS: u32 = 64512;
const US: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn peer(addr: &str, asn: u32, rr_client: bool) -> PeerInfo {
    let a: Ipv4Addr = addr.parse().unwrap();
    PeerInfo {
        address: IpAddr::V4(a),
        router_id: a,
        asn,
        ibgp: asn == LOCAL_AS,
        rr_client,
        keep_next_hop: false,
        local_address: IpAddr::V4(US),
    }
}

fn announce(prefix: &str, nh: &str, f: impl FnOnce(&mut Attributes)) -> Update {
    let mut attrs = Attributes {
        origin: Some(Origin::Igp),
        as_path: Some(AsPath::default()),
        next_hop: Some(nh.parse().unwrap()),
        ..Default::default()
    };
    f(&mut attrs);
    Update {
        attrs,
        nlri: vec![net(prefix)],
        ..Default::default()
    }
}

fn policy() -> ExportPolicy {
    ExportPolicy {
        allowed: vec![net("10.244.0.0/16")],
        denied: vec![net("10.244.128.0/17")],
    }
}

/// Two peers announce the same prefix, differing in one way: the expected winner.
#[test]
#[allow(clippy::type_complexity)]
fn decision_process_table() {
    type Tweak = fn(&mut Attributes);
    let none: Tweak = |_| {};
    let cases: Vec<(&str, (u32, Tweak), (u32, Tweak), &str)> = vec![
        (
            "higher LOCAL_PREF",
            (LOCAL_AS, |a| a.local_pref = Some(200)),
            (LOCAL_AS, none),
            "10.99.0.2",
        ),
        (
            "shorter AS_PATH",
            (65001, |a| a.as_path = Some(AsPath::sequence(&[65001]))),
            (65002, |a| {
                a.as_path = Some(AsPath::sequence(&[65002, 65003]))
            }),
            "10.99.0.2",
        ),
        (
            "lower ORIGIN",
            (LOCAL_AS, |a| a.origin = Some(Origin::Egp)),
            (LOCAL_AS, |a| a.origin = Some(Origin::Igp)),
            "10.99.0.3",
        ),
        (
            "lower MED, same neighbour AS",
            (65001, |a| {
                a.as_path = Some(AsPath::sequence(&[65001]));
                a.med = Some(50)
            }),
            (65001, |a| {
                a.as_path = Some(AsPath::sequence(&[65001]));
                a.med = Some(10)
            }),
            "10.99.0.3",
        ),
        (
            "MED ignored across neighbour ASes",
            (65001, |a| {
                a.as_path = Some(AsPath::sequence(&[65001]));
                a.med = Some(50)
            }),
            (65002, |a| {
                a.as_path = Some(AsPath::sequence(&[65002]));
                a.med = Some(10)
            }),
            "10.99.0.2",
        ),
        (
            "eBGP over iBGP",
            (LOCAL_AS, none),
            (65001, |a| a.as_path = Some(AsPath::default())),
            "10.99.0.3",
        ),
        (
            "lower router ID",
            (LOCAL_AS, none),
            (LOCAL_AS, none),
            "10.99.0.2",
        ),
        (
            "ORIGINATOR_ID stands in for the router ID",
            (LOCAL_AS, |a| {
                a.originator_id = Some(Ipv4Addr::new(10, 99, 0, 9))
            }),
            (LOCAL_AS, none),
            "10.99.0.3",
        ),
        (
            "shorter CLUSTER_LIST",
            (LOCAL_AS, |a| {
                a.originator_id = Some(Ipv4Addr::new(1, 1, 1, 1));
                a.cluster_list = vec![Ipv4Addr::new(2, 2, 2, 2), Ipv4Addr::new(3, 3, 3, 3)]
            }),
            (LOCAL_AS, |a| {
                a.originator_id = Some(Ipv4Addr::new(1, 1, 1, 1));
                a.cluster_list = vec![Ipv4Addr::new(2, 2, 2, 2)]
            }),
            "10.99.0.3",
        ),
    ];
    for (name, (as2, t2), (as3, t3), winner) in cases {
        let mut rib = Rib::new(LOCAL_AS, US, None);
        rib.peer_up(peer("10.99.0.2", as2, false));
        rib.peer_up(peer("10.99.0.3", as3, false));
        rib.apply_update(
            &ip("10.99.0.2"),
            &announce("10.244.1.0/26", "10.99.0.2", t2),
        );
        rib.apply_update(
            &ip("10.99.0.3"),
            &announce("10.244.1.0/26", "10.99.0.3", t3),
        );
        let best = rib.best(&net("10.244.1.0/26")).unwrap();
        assert_eq!(best.source, Source::Peer(ip(winner)), "{name}");
        // The same, announced in the other order.
        let mut rib = Rib::new(LOCAL_AS, US, None);
        rib.peer_up(peer("10.99.0.2", as2, false));
        rib.peer_up(peer("10.99.0.3", as3, false));
        rib.apply_update(
            &ip("10.99.0.3"),
            &announce("10.244.1.0/26", "10.99.0.3", t3),
        );
        rib.apply_update(
            &ip("10.99.0.2"),
            &announce("10.244.1.0/26", "10.99.0.2", t2),
        );
        assert_eq!(
            rib.best(&net("10.244.1.0/26")).unwrap().source,
            Source::Peer(ip(winner)),
            "{name} (reversed)"
        );
    }
}

#[test]
fn local_routes_win_and_withdraw_falls_back() {
    let mut rib = Rib::new(LOCAL_AS, US, None);
    rib.peer_up(peer("10.99.0.2", LOCAL_AS, false));
    let changed = rib.apply_update(
        &ip("10.99.0.2"),
        &announce("10.244.1.0/26", "10.99.0.2", |_| {}),
    );
    assert_eq!(changed, Changed::from([net("10.244.1.0/26")]));
    rib.set_local([net("10.244.1.0/26")]);
    assert_eq!(
        rib.best(&net("10.244.1.0/26")).unwrap().source,
        Source::Local
    );
    let changed = rib.set_local([]);
    assert_eq!(changed.len(), 1);
    assert_eq!(
        rib.best(&net("10.244.1.0/26")).unwrap().source,
        Source::Peer(ip("10.99.0.2"))
    );
    let w = Update {
        withdrawn: vec![net("10.244.1.0/26")],
        ..Default::default()
    };
    rib.apply_update(&ip("10.99.0.2"), &w);
    assert!(rib.best(&net("10.244.1.0/26")).is_none());
}

#[test]
fn treat_as_withdraw_and_loops_remove_routes() {
    let mut rib = Rib::new(LOCAL_AS, US, Some(Ipv4Addr::new(1, 0, 0, 1)));
    rib.peer_up(peer("10.99.0.2", LOCAL_AS, true));
    rib.peer_up(peer("10.99.0.5", 65001, false));
    let a = announce("10.244.1.0/26", "10.99.0.2", |_| {});
    rib.apply_update(&ip("10.99.0.2"), &a);
    let mut bad = a.clone();
    bad.treat_as_withdraw = Some("malformed ORIGIN".into());
    rib.apply_update(&ip("10.99.0.2"), &bad);
    assert!(rib.best(&net("10.244.1.0/26")).is_none());
    for (from, tweak) in [
        (
            "10.99.0.2",
            (|a: &mut Attributes| a.originator_id = Some(US)) as fn(&mut Attributes),
        ),
        ("10.99.0.2", |a| {
            a.cluster_list = vec![Ipv4Addr::new(1, 0, 0, 1)]
        }),
        ("10.99.0.5", |a| {
            a.as_path = Some(AsPath::sequence(&[65001, LOCAL_AS]))
        }),
    ] {
        rib.apply_update(&ip(from), &announce("10.244.2.0/26", from, tweak));
        assert!(rib.best(&net("10.244.2.0/26")).is_none(), "{from}");
    }
}

#[test]
fn graceful_restart_keeps_stale_routes_until_swept() {
    let mut rib = Rib::new(LOCAL_AS, US, None);
    rib.peer_up(peer("10.99.0.2", LOCAL_AS, false));
    rib.apply_update(
        &ip("10.99.0.2"),
        &announce("10.244.1.0/26", "10.99.0.2", |_| {}),
    );
    rib.apply_update(
        &ip("10.99.0.2"),
        &announce("10.244.2.0/26", "10.99.0.2", |_| {}),
    );
    rib.mark_stale(&ip("10.99.0.2"));
    assert!(
        rib.best(&net("10.244.1.0/26")).unwrap().stale,
        "still used while stale"
    );
    // The peer comes back and re-sends one of them; End-of-RIB sweeps the other.
    rib.peer_up(peer("10.99.0.2", LOCAL_AS, false));
    rib.apply_update(
        &ip("10.99.0.2"),
        &announce("10.244.1.0/26", "10.99.0.2", |_| {}),
    );
    let changed = rib.sweep_stale(&ip("10.99.0.2"));
    assert_eq!(changed, Changed::from([net("10.244.2.0/26")]));
    assert!(!rib.best(&net("10.244.1.0/26")).unwrap().stale);
}

/// Who gets what: (route source, destination, cluster ID set?) -> exported and how.
#[test]
#[allow(clippy::type_complexity)]
fn export_policy_table() {
    let rr = Some(Ipv4Addr::new(1, 0, 0, 1));
    // (name, cluster, source peer (addr, asn, client) or local, destination, expect)
    type Expect = Option<(&'static str, bool)>; // (next hop, reflected attrs)
    let cases: Vec<(
        &str,
        Option<Ipv4Addr>,
        Option<(&str, u32, bool)>,
        (&str, u32, bool),
        &str,
        Expect,
    )> = vec![
        (
            "own block to a mesh peer",
            None,
            None,
            ("10.99.0.3", LOCAL_AS, false),
            "10.244.1.0/26",
            Some(("10.99.0.1", false)),
        ),
        (
            "own block outside every pool",
            None,
            None,
            ("10.99.0.3", LOCAL_AS, false),
            "10.250.0.0/26",
            None,
        ),
        (
            "own block in a disableBGPExport pool",
            None,
            None,
            ("10.99.0.3", LOCAL_AS, false),
            "10.244.200.0/26",
            None,
        ),
        (
            "iBGP route to iBGP peer, not a reflector",
            None,
            Some(("10.99.0.2", LOCAL_AS, false)),
            ("10.99.0.3", LOCAL_AS, false),
            "10.244.1.0/26",
            None,
        ),
        (
            "iBGP route to eBGP peer",
            None,
            Some(("10.99.0.2", LOCAL_AS, false)),
            ("10.99.0.5", 65001, false),
            "10.244.1.0/26",
            Some(("10.99.0.1", false)),
        ),
        (
            "eBGP route to iBGP peer: next hop self",
            None,
            Some(("10.99.0.5", 65001, false)),
            ("10.99.0.3", LOCAL_AS, false),
            "10.244.1.0/26",
            Some(("10.99.0.1", false)),
        ),
        (
            "never back to its source",
            None,
            Some(("10.99.0.5", 65001, false)),
            ("10.99.0.5", 65001, false),
            "10.244.1.0/26",
            None,
        ),
        (
            "reflector: client to non-client",
            rr,
            Some(("10.99.0.2", LOCAL_AS, true)),
            ("10.99.0.3", LOCAL_AS, false),
            "10.244.1.0/26",
            Some(("10.99.0.2", true)),
        ),
        (
            "reflector: non-client to client",
            rr,
            Some(("10.99.0.3", LOCAL_AS, false)),
            ("10.99.0.2", LOCAL_AS, true),
            "10.244.1.0/26",
            Some(("10.99.0.3", true)),
        ),
        (
            "reflector: client to client",
            rr,
            Some(("10.99.0.2", LOCAL_AS, true)),
            ("10.99.0.4", LOCAL_AS, true),
            "10.244.1.0/26",
            Some(("10.99.0.2", true)),
        ),
        (
            "reflector: non-client to non-client",
            rr,
            Some(("10.99.0.3", LOCAL_AS, false)),
            ("10.99.0.6", LOCAL_AS, false),
            "10.244.1.0/26",
            None,
        ),
    ];
    for (name, cluster, source, (to_addr, to_as, to_client), prefix, expect) in cases {
        let mut rib = Rib::new(LOCAL_AS, US, cluster);
        let to = peer(to_addr, to_as, to_client);
        rib.peer_up(to.clone());
        match source {
            None => {
                rib.set_local([net(prefix)]);
            }
            Some((addr, asn, client)) => {
                rib.peer_up(peer(addr, asn, client));
                let path = if asn == LOCAL_AS {
                    AsPath::default()
                } else {
                    AsPath::sequence(&[asn])
                };
                rib.apply_update(
                    &ip(addr),
                    &announce(prefix, addr, |a| a.as_path = Some(path)),
                );
            }
        }
        let got = rib.export(&to, &net(prefix), &policy(), None);
        match (expect, got) {
            (None, None) => {}
            (Some((nh, reflected)), Some((attrs, hop))) => {
                assert_eq!(hop, ip(nh), "{name}");
                if reflected {
                    let src: Ipv4Addr = source.unwrap().0.parse().unwrap();
                    assert_eq!(attrs.originator_id, Some(src), "{name}");
                    assert_eq!(attrs.cluster_list, vec![cluster.unwrap()], "{name}");
                } else {
                    assert!(attrs.cluster_list.is_empty(), "{name}");
                }
                if to_as == LOCAL_AS {
                    assert_eq!(attrs.local_pref, Some(100), "{name}");
                } else {
                    assert_eq!(
                        attrs.as_path.unwrap().first_as(),
                        Some(LOCAL_AS),
                        "{name}: prepended"
                    );
                    assert_eq!(attrs.local_pref, None, "{name}");
                }
            }
            (e, g) => panic!("{name}: expected {e:?}, got {g:?}"),
        }
    }
}

/// Sequential /24s (what a big table looks like) spread over the low bits the hash table
/// indexes by, as well as random keys would (about 1 - 1/e of the slots used).
#[test]
fn prefix_hasher_spreads_sequential_prefixes() {
    use std::hash::{BuildHasher, BuildHasherDefault};
    let b = BuildHasherDefault::<PrefixHasher>::default();
    let mut used = std::collections::HashSet::new();
    for i in 0..65_536u32 {
        let p = IpNet::new(IpAddr::V4(Ipv4Addr::from(0x1000_0000 + (i << 8))), 24).unwrap();
        used.insert(b.hash_one(p) & 0xffff);
    }
    assert!(used.len() > 40_000, "{} of 65536 slots", used.len());
}

/// What Felix is told: a learned best route, its next hop changing when the peer
/// re-announces, nothing when a stale mark comes and goes, a withdrawal when our own
/// block takes over and when the route goes.
#[test]
fn forwarding_changes_follow_the_learned_best_route() {
    let mut rib = Rib::new(LOCAL_AS, US, None);
    rib.peer_up(peer("10.99.0.2", LOCAL_AS, false));
    let p = net("10.244.1.0/26");
    rib.apply_update(
        &ip("10.99.0.2"),
        &announce("10.244.1.0/26", "10.99.0.2", |_| {}),
    );
    assert_eq!(
        rib.take_forwarding_changes(),
        vec![(p, None, Some(ip("10.99.0.2")))]
    );
    let changed = rib.apply_update(
        &ip("10.99.0.2"),
        &announce("10.244.1.0/26", "10.99.0.9", |_| {}),
    );
    assert_eq!(changed.len(), 1, "a new next hop is a change");
    assert_eq!(
        rib.take_forwarding_changes(),
        vec![(p, Some(ip("10.99.0.2")), Some(ip("10.99.0.9")))]
    );
    rib.mark_stale(&ip("10.99.0.2"));
    rib.apply_update(
        &ip("10.99.0.2"),
        &announce("10.244.1.0/26", "10.99.0.9", |_| {}),
    );
    assert_eq!(rib.sweep_stale(&ip("10.99.0.2")), Changed::new());
    assert_eq!(rib.take_forwarding_changes(), vec![]);
    rib.set_local([p]);
    assert_eq!(
        rib.take_forwarding_changes(),
        vec![(p, Some(ip("10.99.0.9")), None)]
    );
    rib.set_local([]);
    assert_eq!(
        rib.take_forwarding_changes(),
        vec![(p, None, Some(ip("10.99.0.9")))]
    );
    assert_eq!(rib.accepted(&ip("10.99.0.2")), 1);
    rib.peer_down(&ip("10.99.0.2"));
    assert_eq!(
        rib.take_forwarding_changes(),
        vec![(p, Some(ip("10.99.0.9")), None)]
    );
    assert!(rib.best(&p).is_none());
    assert_eq!(rib.accepted(&ip("10.99.0.2")), 0);
}
