//! The neighbour/FDB rules of REFERENCE §5 on plans, without root: which permanent
//! entries are ours, set (replace) what is missing or different, delete ours no longer
//! desired, never touch anyone else's.

use super::*;

const CALI: u32 = 5;
const VX: u32 = 7;
const ETH0: u32 = 2;
const MAC_A: [u8; 6] = [0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x01];
const MAC_B: [u8; 6] = [0x66, 0, 0, 0, 0, 0x0b];

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn links() -> Links {
    Links {
        by_name: HashMap::from([
            ("eth0".to_string(), ETH0),
            ("cali0123456789a".to_string(), CALI),
            (VXLAN_DEV.to_string(), VX),
        ]),
    }
}

fn neighbour(ifindex: u32, at: &str, mac: [u8; 6]) -> Seen {
    Seen {
        ifindex,
        bridge: false,
        permanent: true,
        own: false,
        ip: Some(ip(at)),
        mac: Some(mac),
    }
}

fn fdb_entry(mac: [u8; 6], dst: &str) -> Seen {
    Seen {
        ifindex: VX,
        bridge: true,
        permanent: true,
        own: true,
        ip: Some(ip(dst)),
        mac: Some(mac),
    }
}

fn observed(seen: Vec<Seen>) -> (Observed, HashMap<Key, ()>) {
    observe(&links(), seen.into_iter().map(|s| (s, ())), "cali")
}

fn workload(at: &str, mac: [u8; 6]) -> Neighbour {
    Neighbour {
        dev: "cali0123456789a".into(),
        ip: ip(at),
        mac,
    }
}

fn vtep(at: &str) -> Neighbour {
    Neighbour {
        dev: VXLAN_DEV.into(),
        ip: ip(at),
        mac: MAC_B,
    }
}

fn remote_fdb(dst: &str) -> Fdb {
    Fdb {
        mac: MAC_B,
        dst: ip(dst),
    }
}

#[test]
fn permanent_entries_on_workload_and_tunnel_interfaces_are_ours() {
    let (o, keys) = observed(vec![
        neighbour(CALI, "10.244.0.3", MAC_A),
        neighbour(VX, "10.244.1.1", MAC_B),
    ]);
    assert_eq!(o.neighbours.len(), 2);
    assert!(keys.contains_key(&Key::Neighbour {
        ifindex: CALI,
        ip: ip("10.244.0.3")
    }));
}

#[test]
fn someone_elses_entries_are_never_ours() {
    let mut reachable = neighbour(CALI, "10.244.0.4", MAC_A);
    reachable.permanent = false;
    let mut bridge_layer = fdb_entry(MAC_B, "10.0.0.2");
    bridge_layer.own = false;
    let mut fdb_elsewhere = fdb_entry(MAC_B, "10.0.0.2");
    fdb_elsewhere.ifindex = CALI;
    let mut no_mac = neighbour(CALI, "10.244.0.5", MAC_A);
    no_mac.mac = None;
    let (o, keys) = observed(vec![
        // A permanent entry on eth0 (another tool's).
        neighbour(ETH0, "10.0.0.99", MAC_A),
        // A learnt entry on a workload interface (the kernel's).
        reachable,
        bridge_layer,
        fdb_elsewhere,
        // The all-zero default destination.
        fdb_entry([0; 6], "10.0.0.9"),
        no_mac,
        // An interface that is gone.
        neighbour(99, "10.244.0.6", MAC_A),
    ]);
    assert_eq!(o, Observed::default());
    assert!(keys.is_empty());
    // So a pass wanting nothing deletes none of them.
    assert!(
        plan(&BTreeSet::new(), &BTreeSet::new(), &links(), &o)
            .ops
            .is_empty()
    );
}

#[test]
fn a_missing_entry_is_set_and_a_right_one_left_alone() {
    let want = BTreeSet::from([workload("10.244.0.3", MAC_A), vtep("10.244.1.1")]);
    let fdb = BTreeSet::from([remote_fdb("10.0.0.2")]);
    let (empty, _) = observed(vec![]);
    let p = plan(&want, &fdb, &links(), &empty);
    assert_eq!(
        p.ops,
        vec![
            Op::SetNeighbour {
                ifindex: CALI,
                ip: ip("10.244.0.3"),
                mac: MAC_A
            },
            Op::SetNeighbour {
                ifindex: VX,
                ip: ip("10.244.1.1"),
                mac: MAC_B
            },
            Op::SetFdb {
                ifindex: VX,
                mac: MAC_B,
                dst: ip("10.0.0.2")
            },
        ]
    );
    assert!(p.problems.is_empty());

    let (right, _) = observed(vec![
        neighbour(CALI, "10.244.0.3", MAC_A),
        neighbour(VX, "10.244.1.1", MAC_B),
        fdb_entry(MAC_B, "10.0.0.2"),
    ]);
    assert_eq!(plan(&want, &fdb, &links(), &right), Plan::default());
}

#[test]
fn an_entry_that_differs_is_replaced_not_deleted() {
    let want = BTreeSet::from([workload("10.244.0.3", MAC_A)]);
    let fdb = BTreeSet::from([remote_fdb("10.0.0.2")]);
    let (o, _) = observed(vec![
        neighbour(CALI, "10.244.0.3", [2, 0, 0, 0, 0, 1]),
        // The remote node moved.
        fdb_entry(MAC_B, "10.0.0.3"),
    ]);
    assert_eq!(
        plan(&want, &fdb, &links(), &o).ops,
        vec![
            Op::SetNeighbour {
                ifindex: CALI,
                ip: ip("10.244.0.3"),
                mac: MAC_A
            },
            Op::SetFdb {
                ifindex: VX,
                mac: MAC_B,
                dst: ip("10.0.0.2")
            },
        ]
    );
}

#[test]
fn entries_of_ours_no_longer_desired_are_deleted() {
    let (o, keys) = observed(vec![
        neighbour(CALI, "10.244.0.99", MAC_A),
        neighbour(VX, "10.244.1.1", MAC_B),
        fdb_entry(MAC_B, "10.0.0.2"),
    ]);
    let p = plan(&BTreeSet::new(), &BTreeSet::new(), &links(), &o);
    let deleted = vec![
        Op::Delete(Key::Neighbour {
            ifindex: CALI,
            ip: ip("10.244.0.99"),
        }),
        Op::Delete(Key::Neighbour {
            ifindex: VX,
            ip: ip("10.244.1.1"),
        }),
        Op::Delete(Key::Fdb {
            ifindex: VX,
            mac: MAC_B,
        }),
    ];
    assert_eq!(p.ops, deleted);
    // Every deletion names an entry the executor holds the kernel's message for.
    for op in &p.ops {
        let Op::Delete(k) = op else { unreachable!() };
        assert!(keys.contains_key(k), "{k:?}");
    }
}

#[test]
fn a_missing_interface_is_a_problem_naming_the_entry() {
    let want = BTreeSet::from([Neighbour {
        dev: "caliabsent".into(),
        ip: ip("10.244.0.7"),
        mac: MAC_A,
    }]);
    let fdb = BTreeSet::from([remote_fdb("10.0.0.2")]);
    let no_vxlan = Links {
        by_name: HashMap::from([("eth0".to_string(), ETH0)]),
    };
    let p = plan(&want, &fdb, &no_vxlan, &Observed::default());
    assert!(p.ops.is_empty());
    assert_eq!(
        p.problems,
        vec![
            NeighbourProblem::NoInterface {
                ip: ip("10.244.0.7"),
                dev: "caliabsent".into()
            },
            NeighbourProblem::NoVxlanDevice { mac: MAC_B },
        ]
    );
    let text: Vec<String> = p.problems.iter().map(ToString::to_string).collect();
    assert_eq!(
        text,
        [
            "neighbour 10.244.0.7 on caliabsent: no such interface",
            "FDB entry [66, 00, 00, 00, 00, 0b]: no vxlan.calico",
        ]
    );
}

/// A dumped message reads as the rules need it; in an FDB entry the destination's family
/// is not the message's.
#[test]
fn dumped_messages_read_as_seen_entries() {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Bridge;
    m.header.ifindex = VX;
    m.header.state = NeighbourState::Permanent;
    m.header.flags = NeighbourFlags::Own;
    m.attributes = vec![
        NeighbourAttribute::LinkLayerAddress(MAC_B.to_vec()),
        NeighbourAttribute::Destination(NeighbourAddress::Other(vec![10, 0, 0, 2])),
    ];
    assert_eq!(seen(&m), Some(fdb_entry(MAC_B, "10.0.0.2")));

    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.ifindex = CALI;
    m.header.state = NeighbourState::Reachable;
    m.attributes = vec![
        NeighbourAttribute::LinkLayerAddress(MAC_A.to_vec()),
        NeighbourAttribute::Destination(NeighbourAddress::Inet("10.244.0.3".parse().unwrap())),
    ];
    let mut want = neighbour(CALI, "10.244.0.3", MAC_A);
    want.permanent = false;
    assert_eq!(seen(&m), Some(want));
}

/// A set the kernel refused is a problem naming the entry, with the kernel's errno kept
/// (typed, not its text); a set that got no answer at all is a netlink problem of the
/// pass, not a refusal.
#[test]
fn a_refused_set_names_the_entry_and_keeps_the_errno() {
    let set = Op::SetNeighbour {
        ifindex: CALI,
        ip: ip("10.244.0.7"),
        mac: MAC_A,
    };
    let refused = NetlinkError::kernel("set neighbour 10.244.0.7", libc::EINVAL);
    let p = set_failed(set.clone(), refused);
    assert!(
        matches!(
            &p,
            Problem::Neighbour(NeighbourProblem::NeighbourRefused { errno, .. })
                if *errno == libc::EINVAL
        ),
        "{p:?}"
    );
    assert!(
        p.to_string()
            .starts_with("neighbour 10.244.0.7: Invalid argument"),
        "{p}"
    );

    let fdb = Op::SetFdb {
        ifindex: VX,
        mac: MAC_B,
        dst: ip("10.0.0.2"),
    };
    let p = set_failed(fdb, NetlinkError::kernel("set FDB", libc::ENODEV));
    assert!(
        matches!(&p, Problem::Neighbour(NeighbourProblem::FdbRefused { errno, .. }) if *errno == libc::ENODEV),
        "{p:?}"
    );
    assert!(
        p.to_string()
            .starts_with("FDB [66, 00, 00, 00, 00, 0b] -> 10.0.0.2: No such device"),
        "{p}"
    );

    let lost = NetlinkError::io("set neighbour 10.244.0.7", std::io::Error::other("closed"));
    let p = set_failed(set, lost);
    assert!(
        matches!(&p, Problem::Neighbours(e) if e.errno().is_none()),
        "{p:?}"
    );
    assert_eq!(p.to_string(), "set neighbour 10.244.0.7: closed");
}
