//! The tunnel rules of REFERENCE §5 on plans, without root: vxlan.calico made, kept,
//! remade when a setting differs, removed; tunl0 made but never removed; the tunnel
//! address exactly /32; a removal under way waited for, its failure reported once.

use super::*;

const PARENT: u32 = 2;

fn want() -> Vxlan {
    Vxlan {
        vni: 4096,
        port: 4789,
        local: Some(Ipv4Addr::new(10, 0, 0, 1)),
        mac: [0x66, 0, 0, 0, 0, 0x0a],
        address: Some(Ipv4Addr::new(10, 244, 0, 1)),
    }
}

/// A device exactly as `want()` asks, at MTU 1450.
fn seen() -> SeenVxlan {
    SeenVxlan {
        index: 9,
        vni: Some(4096),
        port: Some(4789),
        local: Some(Ipv4Addr::new(10, 0, 0, 1)),
        parent: Some(PARENT),
        learning: Some(false),
        mac: Some(vec![0x66, 0, 0, 0, 0, 0x0a]),
        mtu: Some(1450),
    }
}

fn device() -> VxlanDevice {
    VxlanDevice {
        vni: 4096,
        port: 4789,
        parent: PARENT,
        local: Ipv4Addr::new(10, 0, 0, 1),
        mac: [0x66, 0, 0, 0, 0, 0x0a],
        mtu: 1450,
    }
}

#[test]
fn vxlan_is_created_when_a_pool_wants_it() {
    let (outcome, ops) = plan_vxlan(Some(&want()), Some(PARENT), 1450, None).unwrap();
    assert_eq!(outcome, Outcome::Created);
    assert_eq!(ops, [DeviceOp::CreateVxlan(device())]);
}

#[test]
fn vxlan_with_the_wanted_settings_is_left_alone() {
    let (outcome, ops) = plan_vxlan(Some(&want()), Some(PARENT), 1450, Some(&seen())).unwrap();
    assert_eq!((outcome, ops), (Outcome::Unchanged, vec![]));
}

/// Any one setting that differs (VNI, port, source, parent, learning, MAC, MTU, or no
/// VXLAN data at all) gets the device deleted and made again.
#[test]
fn vxlan_whose_settings_differ_is_deleted_and_made_again() {
    type Change = fn(&mut SeenVxlan);
    let changes: Vec<(&str, Change)> = vec![
        ("vni", |s| s.vni = Some(5000)),
        ("port", |s| s.port = Some(8472)),
        ("local", |s| s.local = Some(Ipv4Addr::new(10, 0, 0, 2))),
        ("parent", |s| s.parent = Some(3)),
        ("learning", |s| s.learning = Some(true)),
        ("no learning flag", |s| s.learning = None),
        ("mac", |s| s.mac = Some(vec![2, 0, 0, 0, 0, 1])),
        ("mtu", |s| s.mtu = Some(1500)),
        ("not vxlan", |s| {
            *s = SeenVxlan {
                index: s.index,
                mac: s.mac.clone(),
                mtu: s.mtu,
                ..SeenVxlan::default()
            }
        }),
    ];
    for (what, change) in changes {
        let mut s = seen();
        change(&mut s);
        let (outcome, ops) = plan_vxlan(Some(&want()), Some(PARENT), 1450, Some(&s)).unwrap();
        assert_eq!(outcome, Outcome::Recreated, "{what}");
        assert_eq!(
            ops,
            [DeviceOp::Delete(9), DeviceOp::CreateVxlan(device())],
            "{what}"
        );
    }
}

#[test]
fn vxlan_goes_when_no_pool_wants_it() {
    assert_eq!(
        plan_vxlan(None, Some(PARENT), 1450, Some(&seen())).unwrap(),
        (Outcome::Deleted, vec![DeviceOp::Delete(9)])
    );
    assert_eq!(
        plan_vxlan(None, None, 1450, None).unwrap(),
        (Outcome::Unchanged, vec![])
    );
}

/// Without the node IP, or the interface holding it, nothing is done and the error says
/// what is missing.
#[test]
fn vxlan_without_the_node_ip_or_its_interface_is_one_clear_error() {
    let mut no_ip = want();
    no_ip.local = None;
    for (w, parent) in [(no_ip, Some(PARENT)), (want(), None)] {
        let e = plan_vxlan(Some(&w), parent, 1450, Some(&seen())).unwrap_err();
        assert!(matches!(e, TunnelError::NoUplink), "{e:?}");
        assert!(e.to_string().contains("spec.bgp.ipv4Address"), "{e}");
    }
}

#[test]
fn tunl0_is_made_when_missing_and_never_removed() {
    let ipip = Ipip {
        address: Some(Ipv4Addr::new(10, 244, 0, 2)),
    };
    assert_eq!(
        plan_ipip(Some(&ipip), false, 1480),
        (Outcome::Created, vec![DeviceOp::CreateIpip { mtu: 1480 }])
    );
    assert_eq!(
        plan_ipip(Some(&ipip), true, 1480),
        (Outcome::Unchanged, vec![])
    );
    // No IPIP pool: tunl0 belongs to the ipip module once loaded.
    assert_eq!(plan_ipip(None, true, 1480), (Outcome::Unchanged, vec![]));
}

#[test]
fn the_tunnel_address_is_exactly_the_wanted_one_as_a_slash_32() {
    let a = Ipv4Addr::new(10, 244, 0, 1);
    let other = Ipv4Addr::new(10, 244, 0, 9);
    assert_eq!(plan_addresses(&[], Some(a)), [AddrOp::Add(a)]);
    assert_eq!(plan_addresses(&[(a, 32)], Some(a)), []);
    assert_eq!(
        plan_addresses(&[(other, 32), (a, 32)], Some(a)),
        [AddrOp::Remove(other, 32)]
    );
    // The right address with another length is replaced by the /32.
    assert_eq!(
        plan_addresses(&[(a, 24)], Some(a)),
        [AddrOp::Remove(a, 24), AddrOp::Add(a)]
    );
    // Not allocated yet: the device holds no address.
    assert_eq!(plan_addresses(&[(a, 32)], None), [AddrOp::Remove(a, 32)]);
}

#[test]
fn a_removal_under_way_is_waited_for_and_its_failure_reported() {
    assert_eq!(removal_step(Removal::Idle).unwrap(), RemovalStep::LookAgain);
    assert_eq!(removal_step(Removal::Running).unwrap(), RemovalStep::Wait);
    assert_eq!(
        removal_step(Removal::Finished(Ok(()))).unwrap(),
        RemovalStep::LookAgain
    );
    // Gone already is as good as removed. The errors as `socket::delete_link` gives them.
    let gone = NetlinkError::kernel("delete link 7", libc::ENODEV);
    assert_eq!(
        removal_step(Removal::Finished(Err(gone))).unwrap(),
        RemovalStep::LookAgain
    );
    let busy = NetlinkError::kernel("delete link 7", libc::EBUSY);
    let e = removal_step(Removal::Finished(Err(busy))).unwrap_err();
    assert!(e.to_string().starts_with("delete vxlan.calico: "), "{e}");
    assert_eq!(removal_step(Removal::Lost).unwrap(), RemovalStep::LookAgain);
}

/// Before vxlan.calico is made again, a removal whose thread stopped without answering
/// is an error (the device found by name might be the old one).
#[tokio::test]
async fn waiting_on_a_removal_whose_thread_stopped_is_an_error() {
    let (tx, done) = tokio::sync::oneshot::channel();
    drop(tx);
    let mut pending = Some(PendingRemoval { done });
    let e = removal_done(&mut pending).await.unwrap_err();
    assert!(
        e.to_string().contains("the removal's thread stopped"),
        "{e}"
    );
    assert!(pending.is_none());
    assert!(removal_done(&mut pending).await.is_ok());
}

/// `remove_vxlan`'s bookkeeping: a removal still running stays pending; a finished one is
/// taken out.
#[test]
fn a_pending_removal_is_kept_while_it_runs_and_dropped_once_it_ends() {
    let (tx, done) = tokio::sync::oneshot::channel();
    let mut pending = Some(PendingRemoval { done });
    assert!(matches!(removal_state(&mut pending), Removal::Running));
    assert!(pending.is_some());
    tx.send(Ok(())).unwrap();
    assert!(matches!(
        removal_state(&mut pending),
        Removal::Finished(Ok(()))
    ));
    assert!(pending.is_none());
    assert!(matches!(removal_state(&mut pending), Removal::Idle));
}

/// A removal's failure keeps the kernel's errno (typed), told as the removal of
/// vxlan.calico; a device just made and missing says so.
#[test]
fn a_removal_failure_keeps_the_kernels_errno() {
    let busy = NetlinkError::kernel("delete link 7", libc::EBUSY);
    let e = removal_step(Removal::Finished(Err(busy))).unwrap_err();
    assert!(
        matches!(&e, TunnelError::Netlink(n) if n.errno() == Some(libc::EBUSY) && n.op() == "delete vxlan.calico"),
        "{e:?}"
    );
    // Only the kernel's "no such device" is "gone already", not any failure that mentions it.
    let refused = NetlinkError::kernel("delete link 7", libc::ENOENT);
    assert!(removal_step(Removal::Finished(Err(refused))).is_err());
    assert_eq!(
        TunnelError::Vanished(VXLAN_DEV).to_string(),
        "find vxlan.calico: just created, now missing"
    );
}
