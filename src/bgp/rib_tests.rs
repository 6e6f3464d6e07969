//! Decision process and export policy, as tables.

use std::collections::BTreeMap;
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
        communities: Vec::new(),
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

/// `prefixAdvertisements`: routes inside a CIDR carry its communities, standard and large,
/// each once, added to those the route already has; routes outside carry none.
#[test]
fn exported_routes_carry_the_communities_of_their_prefix() {
    use crate::bgp::config::CommunityValue::{Large, Standard};
    let mut rib = Rib::new(LOCAL_AS, US, None);
    let (from, to) = (
        peer("10.99.0.2", 65001, false),
        peer("10.99.0.3", LOCAL_AS, false),
    );
    rib.peer_up(from.clone());
    rib.peer_up(to.clone());
    rib.set_local([net("10.244.1.0/26"), net("10.245.0.0/26")]);
    rib.apply_update(
        &from.address,
        &announce("10.244.7.0/26", "10.99.0.2", |a| {
            a.as_path = Some(AsPath::sequence(&[65001]));
            a.communities = vec![(100 << 16) | 1];
        }),
    );
    let mut p = policy();
    p.allowed.push(net("10.245.0.0/16"));
    p.communities = vec![
        (
            net("10.244.0.0/16"),
            vec![
                Standard((100 << 16) | 1),
                Standard((5663 << 16) | 12),
                Large([100, 555, 107]),
            ],
        ),
        (
            net("10.244.1.0/24"),
            vec![Large([100, 555, 107]), Large([1, 2, 3])],
        ),
    ];
    let large = |a: &Attributes| -> Vec<u8> {
        a.other
            .iter()
            .filter(|o| o.code == crate::bgp::update::code::LARGE_COMMUNITIES)
            .flat_map(|o| o.value.clone())
            .collect()
    };
    let bytes = |parts: &[u32]| -> Vec<u8> { parts.iter().flat_map(|p| p.to_be_bytes()).collect() };

    let (own, _) = rib.export(&to, &net("10.244.1.0/26"), &p, None).unwrap();
    assert_eq!(own.communities, vec![(100 << 16) | 1, (5663 << 16) | 12]);
    assert_eq!(large(&own), bytes(&[100, 555, 107, 1, 2, 3]));
    let flags = own.other[0].flags;
    assert_eq!(flags, 0xc0, "optional transitive");

    let (learned, _) = rib.export(&to, &net("10.244.7.0/26"), &p, None).unwrap();
    assert_eq!(
        learned.communities,
        vec![(100 << 16) | 1, (5663 << 16) | 12]
    );
    assert_eq!(large(&learned), bytes(&[100, 555, 107]));

    let (outside, _) = rib.export(&to, &net("10.245.0.0/26"), &p, None).unwrap();
    assert!(
        outside.communities.is_empty() && outside.other.is_empty(),
        "{outside:?}"
    );
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

/// One step of the random RIB history below.
#[derive(Debug, Clone)]
enum Step {
    Announce {
        peer: usize,
        prefix: usize,
        local_pref: u32,
        next_hop: u8,
    },
    Withdraw {
        peer: usize,
        prefix: usize,
    },
    MarkStale(usize),
    Sweep(usize),
    Down(usize),
    Local(Vec<usize>),
}

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    prop_oneof![
        6 => (0..3usize, 0..5usize, prop_oneof![Just(100u32), Just(200)], 1..4u8).prop_map(
            |(peer, prefix, local_pref, next_hop)| Step::Announce { peer, prefix, local_pref, next_hop }
        ),
        3 => (0..3usize, 0..5usize).prop_map(|(peer, prefix)| Step::Withdraw { peer, prefix }),
        1 => (0..3usize).prop_map(Step::MarkStale),
        1 => (0..3usize).prop_map(Step::Sweep),
        1 => (0..3usize).prop_map(Step::Down),
        1 => proptest::collection::vec(0..5usize, 0..3).prop_map(Step::Local),
    ]
}

const PEERS: [&str; 3] = ["10.99.0.2", "10.99.0.3", "10.99.0.4"];
const PREFIXES: [&str; 5] = [
    "10.244.1.0/26",
    "10.244.2.0/26",
    "10.244.2.0/27",
    "fd00:1::/122",
    "fd00:2::/122",
];

fn update_for(prefix: IpNet, local_pref: u32, next_hop: u8) -> Update {
    let mut attrs = Attributes {
        origin: Some(Origin::Igp),
        as_path: Some(AsPath::default()),
        local_pref: Some(local_pref),
        ..Default::default()
    };
    match prefix {
        IpNet::V4(_) => {
            attrs.next_hop = Some(Ipv4Addr::new(10, 99, 1, next_hop));
            Update {
                attrs,
                nlri: vec![prefix],
                ..Default::default()
            }
        }
        IpNet::V6(_) => Update {
            attrs,
            mp_reach: Some(crate::bgp::update::MpReach {
                family: crate::bgp::message::IPV6_UNICAST,
                next_hops: vec![format!("fd00:99::{next_hop}").parse().unwrap()],
                nlri: vec![prefix],
            }),
            ..Default::default()
        },
    }
}

proptest::proptest! {
    /// Any history of announcements, withdrawals, stale marks, sweeps, peers going down
    /// and local prefixes leaves the RIB as one built from scratch from what is left:
    /// the same best paths and per-peer counts; `changed` names exactly the prefixes
    /// whose best path changed; the forwarding changes, applied in order, give the
    /// learned next hops.
    #[test]
    fn incremental_rib_matches_one_built_from_scratch(
        steps in proptest::collection::vec(step(), 1..60)
    ) {
        let prefixes: Vec<IpNet> = PREFIXES.iter().map(|p| net(p)).collect();
        let peers: Vec<IpAddr> = PEERS.iter().map(|p| ip(p)).collect();
        let mut rib = Rib::new(LOCAL_AS, US, None);
        for p in PEERS {
            rib.peer_up(peer(p, LOCAL_AS, false));
        }
        // The model: each peer's paths (local pref, next hop, stale), and the local set.
        let mut held: Vec<BTreeMap<usize, (u32, u8, bool)>> = vec![BTreeMap::new(); 3];
        let mut up = [true; 3];
        let mut local: Vec<usize> = Vec::new();
        let mut felix: BTreeMap<IpNet, IpAddr> = BTreeMap::new();
        for s in steps {
            let before: Vec<Option<Path>> = prefixes.iter().map(|p| rib.best(p)).collect();
            let changed = match &s {
                Step::Announce { peer: i, prefix, local_pref, next_hop } => {
                    if !up[*i] {
                        rib.peer_up(peer(PEERS[*i], LOCAL_AS, false));
                        up[*i] = true;
                    }
                    held[*i].insert(*prefix, (*local_pref, *next_hop, false));
                    let u = update_for(prefixes[*prefix], *local_pref, *next_hop);
                    rib.apply_update(&peers[*i], &u)
                }
                Step::Withdraw { peer: i, prefix } => {
                    held[*i].remove(prefix);
                    let u = Update { withdrawn: vec![prefixes[*prefix]], ..Default::default() };
                    let u = if prefixes[*prefix].addr().is_ipv6() {
                        Update {
                            mp_unreach: Some(crate::bgp::update::MpUnreach {
                                family: crate::bgp::message::IPV6_UNICAST,
                                withdrawn: u.withdrawn,
                            }),
                            ..Default::default()
                        }
                    } else { u };
                    rib.apply_update(&peers[*i], &u)
                }
                Step::MarkStale(i) => {
                    held[*i].values_mut().for_each(|v| v.2 = true);
                    rib.mark_stale(&peers[*i])
                }
                Step::Sweep(i) => {
                    held[*i].retain(|_, v| !v.2);
                    rib.sweep_stale(&peers[*i])
                }
                Step::Down(i) => {
                    held[*i].clear();
                    up[*i] = false;
                    rib.peer_down(&peers[*i])
                }
                Step::Local(l) => {
                    local = l.clone();
                    rib.set_local(l.iter().map(|i| prefixes[*i]))
                }
            };
            let sets = rib.check_shared();
            proptest::prop_assert!(sets.is_ok(), "{:?}: {:?}", sets, s);
            for (p, old, new) in rib.take_forwarding_changes() {
                proptest::prop_assert_eq!(felix.get(&p).copied(), old, "{}: {:?}", p, s);
                match new {
                    Some(nh) => felix.insert(p, nh),
                    None => felix.remove(&p),
                };
            }

            // The same state, from scratch: stale paths first, then marked, then the rest.
            let mut fresh = Rib::new(LOCAL_AS, US, None);
            for (i, p) in PEERS.iter().enumerate() {
                if up[i] {
                    fresh.peer_up(peer(p, LOCAL_AS, false));
                }
            }
            for stale in [true, false] {
                for (i, paths) in held.iter().enumerate() {
                    for (prefix, (lp, nh, _)) in paths.iter().filter(|(_, v)| v.2 == stale) {
                        fresh.apply_update(&peers[i], &update_for(prefixes[*prefix], *lp, *nh));
                    }
                    if stale && up[i] {
                        fresh.mark_stale(&peers[i]);
                    }
                }
            }
            fresh.set_local(local.iter().map(|i| prefixes[*i]));
            for (k, p) in prefixes.iter().enumerate() {
                let best = rib.best(p);
                proptest::prop_assert_eq!(&best, &fresh.best(p), "{}: {:?}", p, s);
                proptest::prop_assert_eq!(
                    changed.contains(p),
                    best != before[k],
                    "{} in changed {:?}: {:?}", p, changed, s
                );
                let learned = best.filter(|b| b.source != Source::Local).and_then(|b| b.next_hop());
                proptest::prop_assert_eq!(felix.get(p).copied(), learned, "{}: {:?}", p, s);
            }
            for a in &peers {
                proptest::prop_assert_eq!(rib.received(a), fresh.received(a), "{}: {:?}", a, s);
                proptest::prop_assert_eq!(rib.accepted(a), fresh.accepted(a), "{}: {:?}", a, s);
            }
        }
    }
}

/// RFC 7911: one peer's paths with different identifiers are candidates of their own.
#[test]
fn add_path_keeps_each_path_of_a_peer_apart() {
    let mut rib = Rib::new(LOCAL_AS, US, None);
    let rr = ip("10.99.0.9");
    rib.peer_up(peer("10.99.0.9", LOCAL_AS, false));
    let with_id = |nh: &str, lp: u32, id: u32| {
        let mut u = announce("10.244.1.0/26", nh, |a| a.local_pref = Some(lp));
        u.path_ids.nlri = vec![id];
        u
    };
    rib.apply_update(&rr, &with_id("10.99.0.1", 100, 1));
    rib.apply_update(&rr, &with_id("10.99.0.2", 200, 2));
    let p = net("10.244.1.0/26");
    assert_eq!(rib.received(&rr), 2);
    assert_eq!(rib.best(&p).unwrap().next_hop(), Some(ip("10.99.0.2")));
    // Path 2 withdrawn: path 1 is left.
    let mut w = Update {
        withdrawn: vec![p],
        ..Default::default()
    };
    w.path_ids.withdrawn = vec![2];
    assert_eq!(rib.apply_update(&rr, &w), vec![p]);
    assert_eq!(rib.best(&p).unwrap().next_hop(), Some(ip("10.99.0.1")));
    assert_eq!(rib.received(&rr), 1);
    // A new path 1 replaces the old one.
    rib.apply_update(&rr, &with_id("10.99.0.3", 100, 1));
    assert_eq!(rib.best(&p).unwrap().next_hop(), Some(ip("10.99.0.3")));
    assert_eq!(rib.received(&rr), 1);
    // The peer goes: all its paths with it.
    rib.apply_update(&rr, &with_id("10.99.0.2", 200, 2));
    assert_eq!(rib.peer_down(&rr), vec![p]);
    assert!(rib.best(&p).is_none());
    assert_eq!(rib.received(&rr), 0);
    assert_eq!(rib.check_shared(), Ok(0));
}

#[test]
fn add_path_identifiers_past_the_limit_are_ignored() {
    let mut rib = Rib::new(LOCAL_AS, US, None);
    let rr = ip("10.99.0.9");
    rib.peer_up(peer("10.99.0.9", LOCAL_AS, false));
    for id in 0..(MAX_PATH_IDS as u32 + 10) {
        let mut u = announce("10.244.1.0/26", "10.99.0.1", |_| {});
        u.path_ids.nlri = vec![id];
        rib.apply_update(&rr, &u);
    }
    assert_eq!(rib.received(&rr), MAX_PATH_IDS);
}
