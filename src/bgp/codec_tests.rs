//! Codec tests: exact bytes, round trips (also as proptests), RFC 7606 outcomes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use proptest::prelude::*;

use super::message::*;
use super::update::*;

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn round_trip(m: &Message, codec: &Codec) -> Message {
    let bytes = m.to_bytes(codec).unwrap();
    assert_eq!(frame_len(&bytes).unwrap(), Some(bytes.len()));
    decode(&bytes, codec).unwrap()
}

/// An UPDATE body from raw attribute bytes and IPv4 NLRI bytes.
fn raw_update(attrs: &[u8], nlri: &[u8]) -> Vec<u8> {
    let mut body = vec![0, 0];
    body.extend((attrs.len() as u16).to_be_bytes());
    body.extend(attrs);
    body.extend(nlri);
    let mut m = vec![0xff; 16];
    m.extend(((19 + body.len()) as u16).to_be_bytes());
    m.push(kind::UPDATE);
    m.extend(body);
    m
}

const ORIGIN_IGP: [u8; 4] = [0x40, 1, 1, 0];
const AS_PATH_65001: [u8; 9] = [0x40, 2, 6, 2, 1, 0, 0, 0xfd, 0xe9];
const NEXT_HOP_1: [u8; 7] = [0x40, 3, 4, 10, 0, 0, 1];
const NLRI_10_244_1_0_26: [u8; 5] = [26, 10, 244, 1, 0];

fn good_attrs() -> Vec<u8> {
    [&ORIGIN_IGP[..], &AS_PATH_65001, &NEXT_HOP_1].concat()
}

fn decode_ok(bytes: &[u8]) -> Update {
    match decode(bytes, &Codec::default()).unwrap() {
        Message::Update(u) => u,
        other => panic!("not an UPDATE: {other:?}"),
    }
}

#[test]
fn keepalive_is_a_bare_header() {
    let b = Message::Keepalive.to_bytes(&Codec::default()).unwrap();
    assert_eq!(b.len(), 19);
    assert_eq!(&b[..16], &[0xff; 16]);
    assert_eq!(&b[16..], &[0, 19, 4]);
}

#[test]
fn open_carries_capabilities_and_as_trans_for_four_octet_as() {
    let caps = vec![
        Capability::Multiprotocol(IPV4_UNICAST),
        Capability::Multiprotocol(IPV6_UNICAST),
        Capability::RouteRefresh,
        Capability::EnhancedRouteRefresh,
        Capability::GracefulRestart(GracefulRestart {
            restarting: true,
            restart_time: 120,
            families: vec![(IPV4_UNICAST, true)],
        }),
        Capability::AddPath(vec![(IPV4_UNICAST, 3)]),
    ];
    let open = Open::new(4_200_000_000, 90, Ipv4Addr::new(10, 0, 0, 1), caps);
    assert_eq!(open.my_as, AS_TRANS);
    let back = round_trip(&Message::Open(open.clone()), &Codec::default());
    assert_eq!(back, Message::Open(open.clone()));
    let Message::Open(back) = back else {
        unreachable!()
    };
    assert_eq!(back.asn(), 4_200_000_000);
    assert_eq!(back.families(), vec![IPV4_UNICAST, IPV6_UNICAST]);
    assert_eq!(back.graceful_restart().unwrap().restart_time, 120);
    // A small AS stays in the 2-octet field.
    assert_eq!(
        Open::new(64512, 90, Ipv4Addr::new(1, 1, 1, 1), vec![]).my_as,
        64512
    );
}

#[test]
fn open_errors_carry_rfc_4271_codes() {
    let open = Open::new(64512, 90, Ipv4Addr::new(10, 0, 0, 1), vec![]);
    let mut b = Message::Open(open).to_bytes(&Codec::default()).unwrap();
    b[19] = 3; // version
    let e = decode(&b, &Codec::default()).unwrap_err();
    assert_eq!((e.code, e.subcode), (err::OPEN, err::UNSUPPORTED_VERSION));
    b[19] = 4;
    b[22..24].copy_from_slice(&2u16.to_be_bytes()); // hold time 2
    let e = decode(&b, &Codec::default()).unwrap_err();
    assert_eq!(
        (e.code, e.subcode),
        (err::OPEN, err::UNACCEPTABLE_HOLD_TIME)
    );
    b[22..24].copy_from_slice(&90u16.to_be_bytes());
    b[24..28].copy_from_slice(&[0, 0, 0, 0]);
    let e = decode(&b, &Codec::default()).unwrap_err();
    assert_eq!((e.code, e.subcode), (err::OPEN, err::BAD_BGP_ID));
}

#[test]
fn header_errors_are_detected_before_the_body() {
    let mut b = Message::Keepalive.to_bytes(&Codec::default()).unwrap();
    b[3] = 0;
    assert_eq!(
        frame_len(&b).unwrap_err().subcode,
        err::CONN_NOT_SYNCHRONIZED
    );
    let mut b = Message::Keepalive.to_bytes(&Codec::default()).unwrap();
    b[18] = 9;
    assert_eq!(frame_len(&b).unwrap_err().subcode, err::BAD_MESSAGE_TYPE);
    let mut b = Message::Keepalive.to_bytes(&Codec::default()).unwrap();
    b[17] = 20; // a KEEPALIVE with a body
    b.push(0);
    assert_eq!(frame_len(&b).unwrap_err().subcode, err::BAD_MESSAGE_LENGTH);
    let mut b = Message::Keepalive.to_bytes(&Codec::default()).unwrap();
    b[16] = 0x20; // 8192 > 4096
    assert_eq!(frame_len(&b).unwrap_err().subcode, err::BAD_MESSAGE_LENGTH);
    // Incomplete: wait for more.
    assert_eq!(frame_len(&b[..10]).unwrap(), None);
}

#[test]
fn update_round_trips_with_every_attribute() {
    let u = Update {
        withdrawn: vec![net("10.244.9.0/26")],
        attrs: Attributes {
            origin: Some(Origin::Incomplete),
            as_path: Some(AsPath(vec![
                AsSegment {
                    kind: SegmentKind::Sequence,
                    asns: vec![65001, 4_200_000_000],
                },
                AsSegment {
                    kind: SegmentKind::Set,
                    asns: vec![1, 2],
                },
            ])),
            next_hop: Some(Ipv4Addr::new(10, 99, 0, 2)),
            med: Some(10),
            local_pref: Some(200),
            atomic_aggregate: true,
            aggregator: Some((65001, Ipv4Addr::new(1, 2, 3, 4))),
            communities: vec![0xfde8_0001],
            originator_id: Some(Ipv4Addr::new(10, 99, 0, 3)),
            cluster_list: vec![Ipv4Addr::new(1, 1, 1, 1)],
            other: vec![RawAttr {
                flags: flag::OPTIONAL | flag::TRANSITIVE | flag::PARTIAL,
                code: 99,
                value: vec![1, 2, 3],
            }],
        },
        mp_reach: Some(MpReach {
            family: IPV6_UNICAST,
            next_hops: vec![
                IpAddr::V6("fd00::2".parse().unwrap()),
                IpAddr::V6("fe80::1".parse().unwrap()),
            ],
            nlri: vec![net("fd00:10:244::/122")],
        }),
        mp_unreach: Some(MpUnreach {
            family: IPV6_UNICAST,
            withdrawn: vec![net("fd00:10:245::/122")],
        }),
        nlri: vec![net("10.244.1.0/26"), net("0.0.0.0/0"), net("10.1.2.3/32")],
        ..Default::default()
    };
    let m = Message::Update(u);
    assert_eq!(round_trip(&m, &Codec::default()), m);
}

#[test]
fn two_octet_peers_get_as_trans_and_as4_path_and_we_rebuild_the_path() {
    let old = Codec {
        four_octet_as: false,
        ibgp: true,
        ..Codec::default()
    };
    let path = AsPath::sequence(&[65001, 4_200_000_000, 65002]);
    let u = Update {
        attrs: Attributes {
            origin: Some(Origin::Igp),
            as_path: Some(path.clone()),
            next_hop: Some(Ipv4Addr::new(10, 0, 0, 1)),
            aggregator: Some((4_200_000_000, Ipv4Addr::new(1, 1, 1, 1))),
            ..Default::default()
        },
        nlri: vec![net("10.244.0.0/26")],
        ..Default::default()
    };
    let bytes = Message::Update(u.clone()).to_bytes(&old).unwrap();
    // The 2-octet AS_PATH carries AS_TRANS (0x5ba0) in place of the big AS.
    assert!(
        bytes
            .windows(6)
            .any(|w| w == [0xfd, 0xe9, 0x5b, 0xa0, 0xfd, 0xea])
    );
    let back = decode_ok_with(&bytes, &old);
    assert_eq!(back.attrs.as_path, Some(path));
    assert_eq!(back.attrs.aggregator, u.attrs.aggregator);
    assert!(
        back.attrs.other.is_empty(),
        "AS4_* are consumed, not passed on"
    );
}

fn decode_ok_with(bytes: &[u8], codec: &Codec) -> Update {
    match decode(bytes, codec).unwrap() {
        Message::Update(u) => u,
        other => panic!("not an UPDATE: {other:?}"),
    }
}

#[test]
fn as4_path_longer_than_as_path_is_ignored() {
    let path = AsPath::sequence(&[1, 2]);
    let old = Codec {
        four_octet_as: false,
        ibgp: true,
        ..Codec::default()
    };
    let mut attrs = good_attrs();
    attrs.truncate(ORIGIN_IGP.len());
    attrs.extend([0x40, 2, 6, 2, 2, 0, 1, 0, 2]);
    attrs.extend(NEXT_HOP_1);
    attrs.extend([0xc0, 17, 14, 2, 3, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3]);
    let u = decode_ok_with(&raw_update(&attrs, &NLRI_10_244_1_0_26), &old);
    assert_eq!(u.attrs.as_path, Some(path));
}

#[test]
fn end_of_rib_markers() {
    for fam in [IPV4_UNICAST, IPV6_UNICAST] {
        let m = Message::Update(Update::end_of_rib(fam));
        let Message::Update(back) = round_trip(&m, &Codec::default()) else {
            unreachable!()
        };
        assert_eq!(back.is_end_of_rib(), Some(fam));
    }
    let ipv4_eor = Message::Update(Update::end_of_rib(IPV4_UNICAST))
        .to_bytes(&Codec::default())
        .unwrap();
    assert_eq!(ipv4_eor.len(), 23, "IPv4 End-of-RIB is an empty UPDATE");
    let u = decode_ok(&raw_update(&good_attrs(), &NLRI_10_244_1_0_26));
    assert_eq!(u.is_end_of_rib(), None);
}

#[test]
fn well_formed_update_is_not_withdrawn() {
    let u = decode_ok(&raw_update(&good_attrs(), &NLRI_10_244_1_0_26));
    assert_eq!(u.treat_as_withdraw, None);
    assert_eq!(u.effective(), (vec![net("10.244.1.0/26")], vec![]));
    assert_eq!(u.attrs.as_path.unwrap().first_as(), Some(65001));
}

/// RFC 7606 §7.1: ORIGIN with an undefined value -> treat-as-withdraw.
#[test]
fn bad_origin_value_is_treat_as_withdraw() {
    let mut attrs = good_attrs();
    attrs[3] = 7;
    let u = decode_ok(&raw_update(&attrs, &NLRI_10_244_1_0_26));
    assert!(u.treat_as_withdraw.as_ref().unwrap().contains("ORIGIN"));
    assert_eq!(u.effective(), (vec![], vec![net("10.244.1.0/26")]));
}

/// RFC 7606 §7.2: a malformed AS_PATH (segment length beyond the attribute) ->
/// treat-as-withdraw.
#[test]
fn malformed_as_path_is_treat_as_withdraw() {
    let mut attrs = good_attrs();
    attrs[ORIGIN_IGP.len() + 4] = 5; // claims 5 ASNs, holds 1
    let u = decode_ok(&raw_update(&attrs, &NLRI_10_244_1_0_26));
    assert!(u.treat_as_withdraw.unwrap().contains("AS_PATH"));
    // A segment of an unknown type too.
    let mut attrs = good_attrs();
    attrs[ORIGIN_IGP.len() + 3] = 9;
    assert!(
        decode_ok(&raw_update(&attrs, &NLRI_10_244_1_0_26))
            .treat_as_withdraw
            .is_some()
    );
}

/// RFC 7606 §7.8: COMMUNITIES (optional transitive) whose length is not a multiple of 4
/// -> treat-as-withdraw; §7.7: AGGREGATOR with a bad length -> attribute discard.
#[test]
fn bad_length_on_optional_transitive_attributes() {
    let mut attrs = good_attrs();
    attrs.extend([0xc0, 8, 3, 1, 2, 3]);
    let u = decode_ok(&raw_update(&attrs, &NLRI_10_244_1_0_26));
    assert!(u.treat_as_withdraw.unwrap().contains("COMMUNITIES"));
    let mut attrs = good_attrs();
    attrs.extend([0xc0, 7, 5, 1, 2, 3, 4, 5]);
    let u = decode_ok(&raw_update(&attrs, &NLRI_10_244_1_0_26));
    assert_eq!(u.treat_as_withdraw, None);
    assert_eq!(u.attrs.aggregator, None);
    assert!(u.discarded[0].contains("AGGREGATOR"));
    assert_eq!(u.effective().0, vec![net("10.244.1.0/26")]);
}

/// RFC 7606 §3 d: a missing well-known mandatory attribute -> treat-as-withdraw.
#[test]
fn missing_mandatory_attribute_is_treat_as_withdraw() {
    let attrs = [&AS_PATH_65001[..], &NEXT_HOP_1].concat();
    let u = decode_ok(&raw_update(&attrs, &NLRI_10_244_1_0_26));
    assert_eq!(
        u.treat_as_withdraw.as_deref(),
        Some("missing well-known attribute ORIGIN")
    );
    let attrs = [&ORIGIN_IGP[..], &AS_PATH_65001].concat();
    let u = decode_ok(&raw_update(&attrs, &NLRI_10_244_1_0_26));
    assert!(u.treat_as_withdraw.unwrap().contains("NEXT_HOP"));
    // Without NLRI (a pure withdrawal) nothing is mandatory.
    let u = decode_ok(&raw_update(&[], &[]));
    assert_eq!(u.treat_as_withdraw, None);
}

/// RFC 7606 §4: an attribute length running past the attribute list -> treat-as-withdraw.
#[test]
fn attribute_overrunning_the_list_is_treat_as_withdraw() {
    let mut attrs = good_attrs();
    attrs.extend([0xc0, 8, 200, 1, 2, 3, 4]);
    let u = decode_ok(&raw_update(&attrs, &NLRI_10_244_1_0_26));
    assert!(u.treat_as_withdraw.unwrap().contains("overruns"));
}

/// Flags in conflict with the attribute's definition -> treat-as-withdraw (§3 c).
#[test]
fn wrong_flags_are_treat_as_withdraw() {
    let mut attrs = good_attrs();
    attrs[0] = 0xc0; // ORIGIN marked optional
    assert!(
        decode_ok(&raw_update(&attrs, &NLRI_10_244_1_0_26))
            .treat_as_withdraw
            .is_some()
    );
}

/// Session resets only where the NLRI cannot be known (§5.3) or for repeated MP
/// attributes (§3 g) and unrecognized well-known attributes.
#[test]
fn resets_only_where_the_rfc_requires() {
    // NLRI prefix length 33.
    let e = decode(
        &raw_update(&good_attrs(), &[33, 10, 0, 0, 0, 0]),
        &Codec::default(),
    )
    .unwrap_err();
    assert_eq!((e.code, e.subcode), (err::UPDATE, err::INVALID_NETWORK));
    // NLRI running short.
    let e = decode(&raw_update(&good_attrs(), &[24, 10, 0]), &Codec::default()).unwrap_err();
    assert_eq!(e.subcode, err::INVALID_NETWORK);
    // MP_REACH twice.
    let mp = [0x80, 14, 5, 0, 2, 1, 0, 0]; // IPv6, no next hop: malformed anyway
    let mut attrs = good_attrs();
    attrs.extend([0x80, 15, 3, 0, 2, 1]);
    attrs.extend([0x80, 15, 3, 0, 2, 1]);
    let e = decode(&raw_update(&attrs, &[]), &Codec::default()).unwrap_err();
    assert_eq!(e.subcode, err::MALFORMED_ATTR_LIST);
    // A malformed MP_REACH.
    let mut attrs = good_attrs();
    attrs.extend(mp);
    let e = decode(&raw_update(&attrs, &[]), &Codec::default()).unwrap_err();
    assert_eq!(e.subcode, err::OPTIONAL_ATTR);
    // An unknown well-known attribute.
    let mut attrs = good_attrs();
    attrs.extend([0x40, 77, 0]);
    let e = decode(&raw_update(&attrs, &[]), &Codec::default()).unwrap_err();
    assert_eq!(e.subcode, err::UNRECOGNIZED_WELL_KNOWN);
}

#[test]
fn repeated_attributes_are_discarded_after_the_first() {
    let mut attrs = good_attrs();
    attrs.extend([0x40, 1, 1, 2]);
    let u = decode_ok(&raw_update(&attrs, &NLRI_10_244_1_0_26));
    assert_eq!(u.attrs.origin, Some(Origin::Igp));
    assert_eq!(u.treat_as_withdraw, None);
    assert!(u.discarded[0].contains("repeated"));
}

#[test]
fn unknown_optional_attributes_pass_on_only_when_transitive() {
    let mut attrs = good_attrs();
    attrs.extend([0xc0, 99, 2, 7, 7]); // optional transitive
    attrs.extend([0x80, 98, 1, 7]); // optional non-transitive
    let u = decode_ok(&raw_update(&attrs, &NLRI_10_244_1_0_26));
    assert_eq!(
        u.attrs.other,
        vec![RawAttr {
            flags: 0xe0,
            code: 99,
            value: vec![7, 7]
        }]
    );
}

#[test]
fn local_pref_from_an_external_peer_is_discarded() {
    let ebgp = Codec {
        four_octet_as: true,
        ibgp: false,
        ..Codec::default()
    };
    let mut attrs = good_attrs();
    attrs.extend([0x40, 5, 4, 0, 0, 0, 200]);
    let u = decode_ok_with(&raw_update(&attrs, &NLRI_10_244_1_0_26), &ebgp);
    assert_eq!(u.attrs.local_pref, None);
    assert_eq!(u.treat_as_withdraw, None);
    let u = decode_ok(&raw_update(&attrs, &NLRI_10_244_1_0_26));
    assert_eq!(u.attrs.local_pref, Some(200));
}

#[test]
fn next_hop_zero_is_treat_as_withdraw() {
    let mut attrs = good_attrs();
    let n = attrs.len();
    attrs[n - 4..].copy_from_slice(&[0, 0, 0, 0]);
    assert!(
        decode_ok(&raw_update(&attrs, &NLRI_10_244_1_0_26))
            .treat_as_withdraw
            .unwrap()
            .contains("NEXT_HOP")
    );
}

#[test]
fn large_updates_split_into_messages_that_fit() {
    let nlri: Vec<IpNet> = (0..3000u32)
        .map(|i| IpNet::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + (i << 8))), 24).unwrap())
        .collect();
    let v6: Vec<IpNet> = (0..500u128)
        .map(|i| {
            IpNet::new(
                IpAddr::V6(Ipv6Addr::from((0xfd00u128 << 112) + (i << 16))),
                112,
            )
            .unwrap()
        })
        .collect();
    let u = Update {
        attrs: Attributes {
            origin: Some(Origin::Igp),
            as_path: Some(AsPath::default()),
            next_hop: Some(Ipv4Addr::new(10, 0, 0, 1)),
            ..Default::default()
        },
        nlri: nlri.clone(),
        mp_reach: Some(MpReach {
            family: IPV6_UNICAST,
            next_hops: vec![IpAddr::V6("fd00::1".parse().unwrap())],
            nlri: v6.clone(),
        }),
        ..Default::default()
    };
    let parts = u.split(&Codec::default()).parts;
    assert!(parts.len() > 3);
    let (mut got4, mut got6) = (vec![], vec![]);
    for p in parts {
        let bytes = Message::Update(p).to_bytes(&Codec::default()).unwrap();
        assert!(bytes.len() <= MAX_MESSAGE_LEN);
        let back = decode_ok(&bytes);
        got4.extend(back.nlri);
        got6.extend(back.mp_reach.map(|m| m.nlri).unwrap_or_default());
    }
    assert_eq!(got4, nlri);
    assert_eq!(got6, v6);
}

/// A route whose attributes alone (here ~4,000 bytes of communities) leave no room in a
/// 4096-byte message: splitting hands its prefixes back instead of a message that cannot
/// be sent, and encoding such an UPDATE is an error, not a panic.
#[test]
fn attributes_too_large_for_one_message_are_refused_not_a_panic() {
    let attrs = Attributes {
        origin: Some(Origin::Igp),
        as_path: Some(AsPath::default()),
        local_pref: Some(100),
        communities: (0..1010u32).map(|i| (64512 << 16) | i).collect(),
        originator_id: Some(Ipv4Addr::new(10, 99, 0, 2)),
        cluster_list: vec![Ipv4Addr::new(10, 99, 0, 1)],
        ..Default::default()
    };
    let nh = IpAddr::V4(Ipv4Addr::new(10, 99, 0, 2));
    let codec = Codec::default();
    assert!(!Update::announcement_fits(&attrs, nh, &codec));
    let u = Update::announce(
        attrs.clone(),
        nh,
        vec![net("10.244.9.0/26"), net("10.244.8.0/26")],
    );
    let err = Message::Update(u.clone()).to_bytes(&codec).unwrap_err();
    assert_eq!(err.kind, "UPDATE");
    assert!(err.len > MAX_MESSAGE_LEN, "{err}");
    let split = u.split(&codec);
    assert!(split.parts.is_empty(), "{:?}", split.parts.len());
    assert_eq!(
        split.too_large,
        vec![net("10.244.9.0/26"), net("10.244.8.0/26")]
    );
    // 14 bytes fewer (no ORIGINATOR_ID and CLUSTER_LIST): it fits again.
    let smaller = Attributes {
        originator_id: None,
        cluster_list: vec![],
        ..attrs
    };
    assert!(Update::announcement_fits(&smaller, nh, &codec));
    let split = Update::announce(smaller, nh, vec![net("10.244.9.0/26")]).split(&codec);
    assert_eq!((split.parts.len(), split.too_large.len()), (1, 0));
}

/// Queued announcements are cut to fill about N messages each, whatever the size of
/// their attributes, and no prefix is lost or repeated.
#[test]
fn announcements_are_chunked_by_the_messages_they_fill() {
    let nets: Vec<IpNet> = (0..5000u32)
        .map(|i| IpNet::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)), 32).unwrap())
        .collect();
    let nh = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    let codec = Codec::default();
    for communities in [0u32, 1000] {
        let attrs = Attributes {
            origin: Some(Origin::Igp),
            as_path: Some(AsPath::default()),
            communities: (0..communities).collect(),
            ..Default::default()
        };
        let chunks = Update::announce(attrs, nh, nets.clone()).chunk_announcements(&codec, 8);
        let mut got = Vec::new();
        for c in chunks {
            let parts = c.clone().split(&codec).parts.len();
            assert!(parts <= 9, "{communities} communities: {parts} messages");
            got.extend(c.nlri);
        }
        assert_eq!(got, nets, "{communities} communities");
    }
}

#[test]
fn notification_and_route_refresh_round_trip() {
    for m in [
        Message::Notification(Notification::new(
            err::CEASE,
            err::ADMIN_SHUTDOWN,
            b"bye".to_vec(),
        )),
        Message::RouteRefresh(RouteRefresh {
            family: IPV6_UNICAST,
            subtype: 1,
        }),
    ] {
        assert_eq!(round_trip(&m, &Codec::default()), m);
    }
    assert_eq!(
        Notification::new(err::HOLD_TIMER_EXPIRED, 0, []).to_string(),
        "Hold timer expired (code 4, subcode 0)"
    );
    assert_eq!(
        Notification::new(err::CEASE, err::COLLISION_RESOLUTION, []).to_string(),
        "Cease: connection collision resolution (code 6, subcode 7)"
    );
}

// ---- proptest round trips ----

fn arb_v4_prefix() -> impl Strategy<Value = IpNet> {
    (any::<u32>(), 0u8..=32).prop_map(|(a, l)| {
        IpNet::new(IpAddr::V4(Ipv4Addr::from(a)), l)
            .unwrap()
            .trunc()
    })
}

fn arb_v6_prefix() -> impl Strategy<Value = IpNet> {
    (any::<u128>(), 0u8..=128).prop_map(|(a, l)| {
        IpNet::new(IpAddr::V6(Ipv6Addr::from(a)), l)
            .unwrap()
            .trunc()
    })
}

fn arb_segment() -> impl Strategy<Value = AsSegment> {
    (
        prop_oneof![
            Just(SegmentKind::Set),
            Just(SegmentKind::Sequence),
            Just(SegmentKind::ConfedSequence),
            Just(SegmentKind::ConfedSet)
        ],
        prop::collection::vec(any::<u32>(), 1..5),
    )
        .prop_map(|(kind, asns)| AsSegment { kind, asns })
}

fn arb_attrs() -> impl Strategy<Value = Attributes> {
    (
        prop::option::of(prop_oneof![
            Just(Origin::Igp),
            Just(Origin::Egp),
            Just(Origin::Incomplete)
        ]),
        prop::option::of(prop::collection::vec(arb_segment(), 0..3).prop_map(AsPath)),
        prop::option::of((1u32..0xe000_0000).prop_map(Ipv4Addr::from)),
        (
            prop::option::of(any::<u32>()),
            prop::option::of(any::<u32>()),
            any::<bool>(),
        ),
        prop::option::of((any::<u32>(), any::<u32>().prop_map(Ipv4Addr::from))),
        prop::collection::vec(any::<u32>(), 0..4),
        prop::option::of(any::<u32>().prop_map(Ipv4Addr::from)),
        prop::collection::vec(any::<u32>().prop_map(Ipv4Addr::from), 0..3),
        prop::collection::vec(
            (100u8..200, prop::collection::vec(any::<u8>(), 0..300)),
            0..2,
        ),
    )
        .prop_map(
            |(
                origin,
                as_path,
                next_hop,
                (med, local_pref, atomic_aggregate),
                aggregator,
                communities,
                originator_id,
                cluster_list,
                other,
            )| {
                let mut seen = std::collections::BTreeSet::new();
                Attributes {
                    origin,
                    as_path,
                    next_hop,
                    med,
                    local_pref,
                    atomic_aggregate,
                    aggregator,
                    communities,
                    originator_id,
                    cluster_list,
                    other: other
                        .into_iter()
                        .filter(|(c, _)| seen.insert(*c))
                        .map(|(code, value)| RawAttr {
                            flags: 0xe0,
                            code,
                            value,
                        })
                        .collect(),
                }
            },
        )
}

fn arb_update() -> impl Strategy<Value = Update> {
    (
        prop::collection::vec(arb_v4_prefix(), 0..20),
        arb_attrs(),
        prop::option::of(prop::collection::vec(arb_v6_prefix(), 0..10)),
        prop::option::of(prop::collection::vec(arb_v6_prefix(), 0..10)),
        prop::collection::vec(arb_v4_prefix(), 0..20),
    )
        .prop_map(|(withdrawn, mut attrs, reach, unreach, nlri)| {
            // Announcements need the mandatory attributes to decode as sent.
            if !nlri.is_empty() || reach.as_ref().is_some_and(|r| !r.is_empty()) {
                attrs.origin.get_or_insert(Origin::Igp);
                attrs.as_path.get_or_insert_with(AsPath::default);
            }
            if !nlri.is_empty() {
                attrs.next_hop.get_or_insert(Ipv4Addr::new(10, 0, 0, 1));
            }
            Update {
                withdrawn,
                attrs,
                mp_reach: reach.map(|nlri| MpReach {
                    family: IPV6_UNICAST,
                    next_hops: vec![IpAddr::V6("fd00::1".parse().unwrap())],
                    nlri,
                }),
                mp_unreach: unreach.map(|withdrawn| MpUnreach {
                    family: IPV6_UNICAST,
                    withdrawn,
                }),
                nlri,
                ..Default::default()
            }
        })
}

fn arb_capability() -> impl Strategy<Value = Capability> {
    let fam = prop_oneof![Just(IPV4_UNICAST), Just(IPV6_UNICAST)];
    prop_oneof![
        fam.clone().prop_map(Capability::Multiprotocol),
        Just(Capability::RouteRefresh),
        Just(Capability::EnhancedRouteRefresh),
        any::<u32>().prop_map(Capability::FourOctetAs),
        (
            any::<bool>(),
            0u16..4096,
            prop::collection::vec((fam.clone(), any::<bool>()), 0..3)
        )
            .prop_map(
                |(restarting, restart_time, families)| Capability::GracefulRestart(
                    GracefulRestart {
                        restarting,
                        restart_time,
                        families
                    }
                )
            ),
        prop::collection::vec((fam, 1u8..=3), 1..3).prop_map(Capability::AddPath),
        (100u8..200, prop::collection::vec(any::<u8>(), 0..20))
            .prop_map(|(code, value)| Capability::Unknown { code, value }),
    ]
}

proptest! {
    #[test]
    fn updates_round_trip(u in arb_update()) {
        let m = Message::Update(u);
        let codec = Codec::default();
        for part in match &m { Message::Update(u) => u.clone().split(&codec).parts, _ => unreachable!() } {
            let p = Message::Update(part);
            prop_assert_eq!(round_trip(&p, &codec), p);
        }
    }

    #[test]
    fn opens_round_trip(caps in prop::collection::vec(arb_capability(), 0..8), asn in any::<u32>(), hold in prop_oneof![Just(0u16), 3u16..], id in 1u32..) {
        let m = Message::Open(Open::new(asn, hold, Ipv4Addr::from(id), caps));
        prop_assert_eq!(round_trip(&m, &Codec::default()), m);
    }

    #[test]
    fn notifications_and_refreshes_round_trip(code in any::<u8>(), sub in any::<u8>(), data in prop::collection::vec(any::<u8>(), 0..100), afi in any::<u16>(), safi in any::<u8>(), st in any::<u8>()) {
        let codec = Codec::default();
        let n = Message::Notification(Notification::new(code, sub, data));
        prop_assert_eq!(round_trip(&n, &codec), n);
        let r = Message::RouteRefresh(RouteRefresh { family: (Afi(afi), Safi(safi)), subtype: st });
        prop_assert_eq!(round_trip(&r, &codec), r);
        prop_assert_eq!(round_trip(&Message::Keepalive, &codec), Message::Keepalive);
    }

    /// Arbitrary bytes never panic the decoder (the fuzz target's property).
    #[test]
    fn decoding_garbage_never_panics(body in prop::collection::vec(any::<u8>(), 0..600), t in 1u8..=5, four in any::<bool>()) {
        let mut m = vec![0xff; 16];
        m.extend(((19 + body.len()) as u16).to_be_bytes());
        m.push(t);
        m.extend(body);
        let codec = Codec { four_octet_as: four, ibgp: true, ..Codec::default() };
        let _ = decode(&m, &codec);
    }
}

// ---- messages captured from BIRD 2 and GoBGP (scripts/capture-bgp-fixtures) ----

fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/tests/fixtures/bgp/{name}.hex",
        env!("CARGO_MANIFEST_DIR")
    );
    let hex = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    (0..hex.trim().len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex.trim()[i..i + 2], 16).unwrap())
        .collect()
}

/// Every captured message decodes cleanly and survives encode + decode unchanged; the
/// ones whose encoding choices match ours come back byte for byte.
#[test]
fn captured_messages_decode_and_round_trip() {
    let dir = format!("{}/tests/fixtures/bgp", env!("CARGO_MANIFEST_DIR"));
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .trim_end_matches(".hex")
                .to_string()
        })
        .collect();
    names.sort();
    assert!(names.len() >= 10, "{names:?}");
    let mut identical = Vec::new();
    for name in &names {
        let bytes = fixture(name);
        let codec = Codec::default();
        let m = decode(&bytes, &codec).unwrap_or_else(|e| panic!("{name}: {e}"));
        if let Message::Update(u) = &m {
            assert_eq!(u.treat_as_withdraw, None, "{name}");
            assert!(u.discarded.is_empty(), "{name}: {:?}", u.discarded);
        }
        let again = m.to_bytes(&codec).unwrap();
        assert_eq!(decode(&again, &codec).unwrap(), m, "{name}");
        if again == bytes {
            identical.push(name.as_str());
        }
    }
    for name in [
        "bird-01-open",
        "bird-03-update",
        "bird-04-update",
        "bird-06-update",
        "bird-07-update",
        "gobgp-03-update",
        "gobgp-05-update",
    ] {
        assert!(identical.contains(&name), "{name} re-encodes differently");
    }
}

#[test]
fn birds_messages_mean_what_bird_sent() {
    let Message::Open(o) = decode(&fixture("bird-01-open"), &Codec::default()).unwrap() else {
        panic!()
    };
    assert_eq!(
        (o.asn(), o.hold_time, o.bgp_id),
        (64512, 240, Ipv4Addr::new(10, 99, 0, 1))
    );
    assert_eq!(o.families(), vec![IPV4_UNICAST, IPV6_UNICAST]);
    assert!(o.has(&Capability::RouteRefresh) && o.has(&Capability::EnhancedRouteRefresh));
    assert_eq!(o.graceful_restart().unwrap().restart_time, 120);
    let u = decode_ok(&fixture("bird-03-update"));
    assert_eq!(u.nlri, vec![net("10.244.1.0/26")]);
    assert_eq!(u.attrs.next_hop, Some(Ipv4Addr::new(10, 99, 0, 1)));
    assert_eq!(u.attrs.as_path, Some(AsPath::sequence(&[64512])));
    assert_eq!(u.attrs.med, Some(50));
    assert_eq!(u.attrs.communities, vec![(64512 << 16) | 100]);
    let u = decode_ok(&fixture("bird-05-update"));
    let mp = u.mp_reach.unwrap();
    assert_eq!(mp.nlri, vec![net("fd00:10:244:1::/122")]);
    assert_eq!(mp.next_hops[0], "fd00:99::1".parse::<IpAddr>().unwrap());
    assert!(matches!(mp.next_hops[1], IpAddr::V6(a) if a.segments()[0] == 0xfe80));
    assert_eq!(
        decode_ok(&fixture("bird-04-update")).is_end_of_rib(),
        Some(IPV4_UNICAST)
    );
    assert_eq!(
        decode_ok(&fixture("bird-06-update")).is_end_of_rib(),
        Some(IPV6_UNICAST)
    );
    assert_eq!(
        decode_ok(&fixture("bird-07-update")).withdrawn,
        vec![net("10.244.1.0/26")]
    );
}

#[test]
fn gobgps_messages_mean_what_gobgp_sent() {
    let Message::Open(o) = decode(&fixture("gobgp-01-open"), &Codec::default()).unwrap() else {
        panic!()
    };
    assert_eq!(
        (o.asn(), o.hold_time, o.bgp_id),
        (64513, 90, Ipv4Addr::new(10, 99, 0, 2))
    );
    assert_eq!(o.families(), vec![IPV4_UNICAST, IPV6_UNICAST]);
    // GoBGP's FQDN and extended-next-hop capabilities are kept as unknown ones.
    assert!(
        o.capabilities
            .iter()
            .any(|c| matches!(c, Capability::Unknown { code: 73, .. }))
    );
    let u = decode_ok(&fixture("gobgp-03-update"));
    assert_eq!(u.nlri, vec![net("10.244.3.0/26")]);
    assert_eq!(u.attrs.origin, Some(Origin::Incomplete));
    assert_eq!(
        (u.attrs.med, u.attrs.communities.clone()),
        (Some(20), vec![(64513 << 16) | 200])
    );
    let u = decode_ok(&fixture("gobgp-04-update"));
    let mp = u.mp_reach.unwrap();
    assert_eq!(mp.nlri, vec![net("fd00:10:244:3::/122")]);
    assert_eq!(
        mp.next_hops,
        vec!["::ffff:10.99.0.2".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(
        decode_ok(&fixture("gobgp-05-update")).withdrawn,
        vec![net("10.244.3.0/26")]
    );
}

fn add_path_codec(on: bool) -> Codec {
    let both = AddPathFamilies { ipv4: on, ipv6: on };
    Codec {
        add_path_rx: both,
        add_path_tx: both,
        ..Codec::default()
    }
}

#[test]
fn add_path_identifiers_round_trip_in_every_prefix_list() {
    let attrs = Attributes {
        origin: Some(Origin::Igp),
        as_path: Some(AsPath::default()),
        next_hop: Some(Ipv4Addr::new(10, 99, 0, 2)),
        ..Default::default()
    };
    let u = Update {
        withdrawn: vec![net("10.244.9.0/26")],
        attrs,
        // The same prefix twice: two paths.
        nlri: vec![net("10.244.1.0/26"), net("10.244.1.0/26")],
        mp_reach: Some(MpReach {
            family: IPV6_UNICAST,
            next_hops: vec!["fd00::2".parse().unwrap()],
            nlri: vec![net("fd00:244::/122")],
        }),
        mp_unreach: Some(MpUnreach {
            family: IPV6_UNICAST,
            withdrawn: vec![net("fd00:244:1::/122")],
        }),
        path_ids: PathIds {
            withdrawn: vec![7],
            nlri: vec![1, 2],
            mp_reach: vec![9],
            mp_unreach: vec![4_000_000_000],
        },
        ..Default::default()
    };
    let m = Message::Update(u);
    let codec = add_path_codec(true);
    assert_eq!(round_trip(&m, &codec), m);
    // On the wire: each IPv4 prefix after its 4-byte identifier.
    let bytes = m.to_bytes(&codec).unwrap();
    let nlri = [0, 0, 0, 1, 26, 10, 244, 1, 0, 0, 0, 0, 2, 26, 10, 244, 1, 0];
    assert!(bytes.ends_with(&nlri), "{bytes:?}");
    // Read without identifiers, the same bytes are not those prefixes.
    assert_ne!(decode(&bytes, &add_path_codec(false)).ok(), Some(m));
}

#[test]
fn prefixes_without_identifiers_are_sent_as_path_1_when_the_peer_takes_them() {
    let u = Update {
        withdrawn: vec![net("10.244.9.0/26")],
        ..Default::default()
    };
    let bytes = Message::Update(u).to_bytes(&add_path_codec(true)).unwrap();
    let Message::Update(back) = decode(&bytes, &add_path_codec(true)).unwrap() else {
        panic!("not an UPDATE")
    };
    assert_eq!(back.withdrawn, vec![net("10.244.9.0/26")]);
    assert_eq!(back.path_ids.withdrawn, vec![1]);
}

#[test]
fn add_path_is_negotiated_per_family_and_direction() {
    let ours = [(IPV4_UNICAST, 3), (IPV6_UNICAST, 3)];
    // The peer sends IPv4 paths only, and takes IPv6 ones.
    let theirs = [(IPV4_UNICAST, 2), (IPV6_UNICAST, 1)];
    let rx = AddPathFamilies::negotiate(&ours, &theirs, 1);
    let tx = AddPathFamilies::negotiate(&ours, &theirs, 2);
    assert_eq!((rx.ipv4, rx.ipv6), (true, false));
    assert_eq!((tx.ipv4, tx.ipv6), (false, true));
    // Nothing when either side does not announce it.
    assert_eq!(
        AddPathFamilies::negotiate(&ours, &[], 1),
        AddPathFamilies::default()
    );
    assert_eq!(
        AddPathFamilies::negotiate(&[], &theirs, 2),
        AddPathFamilies::default()
    );
}

#[test]
fn split_keeps_each_prefix_with_its_path_identifier() {
    let nets: Vec<IpNet> = (0..3000u32)
        .map(|i| {
            IpNet::V4(ipnet::Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + (i << 8)), 24).unwrap())
        })
        .collect();
    let ids: Vec<u32> = (0..3000u32).map(|i| i * 7 + 1).collect();
    let u = Update {
        attrs: Attributes {
            origin: Some(Origin::Igp),
            as_path: Some(AsPath::default()),
            next_hop: Some(Ipv4Addr::new(10, 99, 0, 2)),
            ..Default::default()
        },
        nlri: nets.clone(),
        withdrawn: nets.clone(),
        path_ids: PathIds {
            nlri: ids.clone(),
            withdrawn: ids.clone(),
            ..Default::default()
        },
        ..Default::default()
    };
    let codec = add_path_codec(true);
    let parts = u.split(&codec).parts;
    assert!(parts.len() > 2);
    let (mut got_nlri, mut got_withdrawn) = (Vec::new(), Vec::new());
    for p in parts {
        let m = Message::Update(p);
        let Message::Update(back) = round_trip(&m, &codec) else {
            panic!("not an UPDATE")
        };
        got_nlri.extend(back.nlri.into_iter().zip(back.path_ids.nlri));
        got_withdrawn.extend(back.withdrawn.into_iter().zip(back.path_ids.withdrawn));
    }
    let want: Vec<(IpNet, u32)> = nets.into_iter().zip(ids).collect();
    assert_eq!(got_nlri, want);
    assert_eq!(got_withdrawn, want);
}
