//! Tunnel devices (REFERENCE §5): `vxlan.calico` (VNI, UDP port, parent interface and
//! source address of the node IP, the node's VTEP MAC, the tunnel address /32, MTU) and
//! `tunl0` (ipip). A device whose settings differ from the wanted ones is deleted and
//! made again. A kernel without ipip gives one clear error, nothing else.
//!
//! Plan and execute: what the kernel has is read into [`SeenVxlan`] and addresses; the
//! decisions ([`plan_vxlan`], [`plan_ipip`], [`plan_addresses`], [`removal_step`]) are pure
//! and tested without root; the `ensure_*`/`remove_vxlan` functions do the I/O, through
//! the netlink adapter ([`crate::netlink`]): a device that is not there is absence (a
//! lookup's `None`, a removal already done), never a failure read from text.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{InfoData, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::{Handle, LinkIpIp, LinkUnspec, LinkVxlan};

use super::calc::{Ipip, TUNL0, VXLAN_DEV, Vxlan};
use crate::netlink::{NetlinkError, links, socket};

/// What a pass did to a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Unchanged,
    Created,
    /// It existed with other settings.
    Recreated,
    Deleted,
}

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// A netlink request failed; the kernel's errno stays typed (see [`NetlinkError`]).
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// The kernel would not make tunl0 (or it did not appear): what it answered.
    #[error(
        "IPIP pools need the ipip kernel module, which this kernel does not have ({0}); IPIP routes are not programmed"
    )]
    NoIpip(NetlinkError),
    /// A device the kernel accepted to make is not there when looked up right after.
    #[error("find {0}: just created, now missing")]
    Vanished(&'static str),
    #[error(
        "{VXLAN_DEV} needs this node's IPv4 address (spec.bgp.ipv4Address) and the interface holding it"
    )]
    NoUplink,
}

fn vxlan_info(l: &LinkMessage) -> Option<&[InfoVxlan]> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Data(InfoData::Vxlan(v)) => Some(v.as_slice()),
            _ => None,
        }),
        _ => None,
    })
}

fn attr<T>(l: &LinkMessage, f: impl Fn(&LinkAttribute) -> Option<T>) -> Option<T> {
    l.attributes.iter().find_map(f)
}

/// vxlan.calico as the kernel has it: what Felix compares (each `None` when absent).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeenVxlan {
    pub index: u32,
    pub vni: Option<u32>,
    pub port: Option<u16>,
    pub local: Option<Ipv4Addr>,
    pub parent: Option<u32>,
    pub learning: Option<bool>,
    pub mac: Option<Vec<u8>>,
    pub mtu: Option<u32>,
}

impl SeenVxlan {
    fn of(l: &LinkMessage) -> SeenVxlan {
        let mut seen = SeenVxlan {
            index: l.header.index,
            mac: attr(l, |a| match a {
                LinkAttribute::Address(m) => Some(m.clone()),
                _ => None,
            }),
            mtu: attr(l, |a| match a {
                LinkAttribute::Mtu(m) => Some(*m),
                _ => None,
            }),
            ..SeenVxlan::default()
        };
        for i in vxlan_info(l).unwrap_or_default() {
            match i {
                InfoVxlan::Id(v) => seen.vni = seen.vni.or(Some(*v)),
                InfoVxlan::Port(v) => seen.port = seen.port.or(Some(*v)),
                InfoVxlan::Local(v) => seen.local = seen.local.or(Some(*v)),
                InfoVxlan::Link(v) => seen.parent = seen.parent.or(Some(*v)),
                InfoVxlan::Learning(v) => seen.learning = seen.learning.or(Some(*v)),
                _ => {}
            }
        }
        seen
    }
}

/// vxlan.calico as wanted (REFERENCE §5): VNI, port, bound to the node-IP interface with
/// the node IP as source, no learning (the FDB is ours), the node's VTEP MAC, its MTU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanDevice {
    pub vni: u32,
    pub port: u16,
    pub parent: u32,
    pub local: Ipv4Addr,
    pub mac: [u8; 6],
    pub mtu: u32,
}

impl VxlanDevice {
    /// Whether an existing device has exactly these settings.
    pub fn matches(&self, seen: &SeenVxlan) -> bool {
        seen.vni == Some(self.vni)
            && seen.port == Some(self.port)
            && seen.local == Some(self.local)
            && seen.parent == Some(self.parent)
            && seen.learning == Some(false)
            && seen.mac.as_deref() == Some(&self.mac[..])
            && seen.mtu == Some(self.mtu)
    }
}

/// A change to a tunnel device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceOp {
    /// Delete the device with this index.
    Delete(u32),
    CreateVxlan(VxlanDevice),
    CreateIpip {
        mtu: u32,
    },
}

/// What to do to vxlan.calico: the outcome, and the ops that get there (the device's
/// address and state are made right afterwards, whatever the outcome, when it is wanted).
/// `None` wanted: the device goes. A device whose settings differ is deleted and made
/// again. Wanted without the node IP or its interface: [`TunnelError::NoUplink`].
pub fn plan_vxlan(
    want: Option<&Vxlan>,
    parent: Option<u32>,
    mtu: u32,
    seen: Option<&SeenVxlan>,
) -> Result<(Outcome, Vec<DeviceOp>), TunnelError> {
    let Some(want) = want else {
        return Ok(match seen {
            Some(s) => (Outcome::Deleted, vec![DeviceOp::Delete(s.index)]),
            None => (Outcome::Unchanged, Vec::new()),
        });
    };
    let (Some(parent), Some(local)) = (parent, want.local) else {
        return Err(TunnelError::NoUplink);
    };
    let device = VxlanDevice {
        vni: want.vni,
        port: want.port,
        parent,
        local,
        mac: want.mac,
        mtu,
    };
    Ok(match seen {
        Some(s) if device.matches(s) => (Outcome::Unchanged, Vec::new()),
        Some(s) => (
            Outcome::Recreated,
            vec![DeviceOp::Delete(s.index), DeviceOp::CreateVxlan(device)],
        ),
        None => (Outcome::Created, vec![DeviceOp::CreateVxlan(device)]),
    })
}

/// What to do to tunl0: made when an IPIP pool wants it and it is missing; never deleted
/// (the ipip module owns it once loaded), nor remade (its settings are set in place).
pub fn plan_ipip(want: Option<&Ipip>, exists: bool, mtu: u32) -> (Outcome, Vec<DeviceOp>) {
    match (want, exists) {
        (Some(_), false) => (Outcome::Created, vec![DeviceOp::CreateIpip { mtu }]),
        _ => (Outcome::Unchanged, Vec::new()),
    }
}

/// A change to a tunnel device's IPv4 addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrOp {
    Remove(Ipv4Addr, u8),
    Add(Ipv4Addr),
}

/// The device's IPv4 addresses become exactly `want`/32 (or none): every other address
/// (another one, or the wanted one with another prefix length) is removed.
pub fn plan_addresses(have: &[(Ipv4Addr, u8)], want: Option<Ipv4Addr>) -> Vec<AddrOp> {
    let mut present = false;
    let mut ops = Vec::new();
    for &(ip, len) in have {
        if Some(ip) == want && len == 32 {
            present = true;
        } else {
            ops.push(AddrOp::Remove(ip, len));
        }
    }
    if let (Some(ip), false) = (want, present) {
        ops.push(AddrOp::Add(ip));
    }
    ops
}

/// A removal of vxlan.calico under way on a thread of its own (see [`remove_vxlan`]).
pub struct PendingRemoval {
    done: tokio::sync::oneshot::Receiver<Result<(), NetlinkError>>,
}

/// Where an earlier removal stands when a pass comes to remove vxlan.calico.
#[derive(Debug)]
pub enum Removal {
    /// None was started (or its end was handled).
    Idle,
    /// The kernel has not answered yet.
    Running,
    /// The kernel answered.
    Finished(Result<(), NetlinkError>),
    /// Its thread ended without a word.
    Lost,
}

/// What [`remove_vxlan`] does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemovalStep {
    /// A removal is under way: no second one starts.
    Wait,
    /// Look for the device again (and remove it if it is there).
    LookAgain,
}

/// The decision of [`remove_vxlan`] on an earlier removal: wait for one under way; after
/// one that failed, report it (the device is looked for again at the next pass); after
/// one that succeeded (gone already counts) or whose thread was lost, look again.
pub fn removal_step(state: Removal) -> Result<RemovalStep, TunnelError> {
    match state {
        Removal::Running => Ok(RemovalStep::Wait),
        Removal::Finished(r) => removed(Ok(r)).map(|()| RemovalStep::LookAgain),
        Removal::Idle | Removal::Lost => Ok(RemovalStep::LookAgain),
    }
}

/// What a finished removal's outcome means: gone already (ENODEV) is as good as removed.
/// A failure is told as the removal of vxlan.calico, its errno kept.
fn removed(
    r: Result<Result<(), NetlinkError>, tokio::sync::oneshot::error::RecvError>,
) -> Result<(), TunnelError> {
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) if e.is_no_device() => Ok(()),
        Ok(Err(e)) => Err(e.with_op(delete_op()).into()),
        Err(_) => Err(delete_failed(std::io::Error::other(
            "the removal's thread stopped",
        ))),
    }
}

fn delete_op() -> String {
    format!("delete {VXLAN_DEV}")
}

/// The removal of vxlan.calico could not be started, or its thread was lost.
fn delete_failed(e: std::io::Error) -> TunnelError {
    NetlinkError::io(delete_op(), e).into()
}

/// Take the state of the removal in `pending` (it is left there while it runs).
fn removal_state(pending: &mut Option<PendingRemoval>) -> Removal {
    use tokio::sync::oneshot::error::TryRecvError;
    let Some(p) = pending else {
        return Removal::Idle;
    };
    let state = match p.done.try_recv() {
        Err(TryRecvError::Empty) => return Removal::Running,
        Ok(r) => Removal::Finished(r),
        Err(TryRecvError::Closed) => Removal::Lost,
    };
    *pending = None;
    state
}

/// Remove vxlan.calico (no VXLAN pool) without waiting for the kernel to finish. The
/// device leaves the namespace at once, but the kernel answers the request only once it
/// is gone for good, tens of milliseconds later (RCU): long enough to hold up the next
/// pass, which may be a pool switching back to VXLAN. So the request goes on a socket and
/// a thread of its own. `pending` holds a removal under way: no second one starts while
/// it runs, and a finished one's failure is returned (the device is then looked for
/// again).
pub async fn remove_vxlan(
    h: &Handle,
    pending: &mut Option<PendingRemoval>,
) -> Result<Outcome, TunnelError> {
    if removal_step(removal_state(pending))? == RemovalStep::Wait {
        return Ok(Outcome::Unchanged);
    }
    let Some(l) = links::by_name(h, VXLAN_DEV).await? else {
        return Ok(Outcome::Unchanged);
    };
    let index = l.header.index;
    // Opened here, in the caller's network namespace; used on the thread.
    let mut sock = socket::open().map_err(delete_failed)?;
    let (tx, done) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("felix-vxlan-del".into())
        .spawn(move || {
            let _ = tx.send(socket::delete_link(&mut sock, index));
        })
        .map_err(delete_failed)?;
    *pending = Some(PendingRemoval { done });
    Ok(Outcome::Deleted)
}

/// Wait for a removal under way to finish, before vxlan.calico is made again: a device
/// found by name before the kernel has handled the removal would be the old one, about
/// to go.
pub async fn removal_done(pending: &mut Option<PendingRemoval>) -> Result<(), TunnelError> {
    match pending.take() {
        Some(p) => removed(p.done.await),
        None => Ok(()),
    }
}

/// Make vxlan.calico as wanted (`None`: no VXLAN pool, the device goes). `parent` is the
/// interface holding the node IP; `mtu` the device MTU (host MTU - 50, or configured).
pub async fn ensure_vxlan(
    h: &Handle,
    want: Option<&Vxlan>,
    parent: Option<u32>,
    mtu: u32,
) -> Result<Outcome, TunnelError> {
    let seen = links::by_name(h, VXLAN_DEV)
        .await?
        .map(|l| SeenVxlan::of(&l));
    let (outcome, ops) = plan_vxlan(want, parent, mtu, seen.as_ref())?;
    execute(h, ops).await?;
    let Some(want) = want else {
        return Ok(outcome);
    };
    let index = match (outcome, seen) {
        (Outcome::Unchanged, Some(s)) => s.index,
        _ => index_of_new(h, VXLAN_DEV).await?,
    };
    set_address(h, index, VXLAN_DEV, want.address).await?;
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(NetlinkError::rtnetlink(format!("set {VXLAN_DEV} up")))?;
    Ok(outcome)
}

/// The index of a device just made.
async fn index_of_new(h: &Handle, name: &'static str) -> Result<u32, TunnelError> {
    links::by_name(h, name)
        .await?
        .map(|l| l.header.index)
        .ok_or(TunnelError::Vanished(name))
}

/// Carry out device ops in order; the first failure ends it. A kernel refusing to make
/// tunl0 has no ipip module ([`TunnelError::NoIpip`]).
async fn execute(h: &Handle, ops: Vec<DeviceOp>) -> Result<(), TunnelError> {
    for op in ops {
        match op {
            DeviceOp::Delete(index) => h
                .link()
                .del(index)
                .execute()
                .await
                .map_err(NetlinkError::rtnetlink(delete_op()))?,
            DeviceOp::CreateVxlan(d) => {
                let msg = LinkVxlan::new(VXLAN_DEV, d.vni)
                    .dev(d.parent)
                    .port(d.port)
                    .local(d.local)
                    .learning(false)
                    .mtu(d.mtu)
                    .address(d.mac.to_vec())
                    .build();
                h.link()
                    .add(msg)
                    .execute()
                    .await
                    .map_err(NetlinkError::rtnetlink(format!("create {VXLAN_DEV}")))?
            }
            DeviceOp::CreateIpip { mtu } => {
                let msg = LinkIpIp::new(TUNL0).mtu(mtu).build();
                if let Err(e) = h.link().add(msg).execute().await {
                    let op = format!("create {TUNL0}");
                    return Err(TunnelError::NoIpip(NetlinkError::from_rtnetlink(op, e)));
                }
            }
        }
    }
    Ok(())
}

/// Make tunl0 as wanted (`None`: no IPIP pool; tunl0 is left alone, as the ipip module
/// owns it once loaded).
pub async fn ensure_ipip(
    h: &Handle,
    want: Option<&Ipip>,
    mtu: u32,
) -> Result<Outcome, TunnelError> {
    let Some(want) = want else {
        return Ok(Outcome::Unchanged);
    };
    let existing = links::by_name(h, TUNL0).await?.map(|l| l.header.index);
    let (outcome, ops) = plan_ipip(Some(want), existing.is_some(), mtu);
    execute(h, ops).await?;
    let index = match existing {
        Some(i) => i,
        // Made, yet the kernel has no such device: no ipip module to hold it.
        None => links::by_name(h, TUNL0)
            .await?
            .map(|l| l.header.index)
            .ok_or_else(|| {
                let op = format!("get link {TUNL0} after creating it");
                TunnelError::NoIpip(NetlinkError::kernel(op, libc::ENODEV))
            })?,
    };
    set_address(h, index, TUNL0, want.address).await?;
    h.link()
        .set(LinkUnspec::new_with_index(index).mtu(mtu).up().build())
        .execute()
        .await
        .map_err(NetlinkError::rtnetlink(format!("set {TUNL0} up")))?;
    Ok(outcome)
}

/// The device's IPv4 addresses become exactly `addr`/32 (or none); see
/// [`plan_addresses`].
async fn set_address(
    h: &Handle,
    index: u32,
    name: &str,
    addr: Option<Ipv4Addr>,
) -> Result<(), NetlinkError> {
    let dump: Vec<_> = h
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(NetlinkError::rtnetlink(format!("list addresses of {name}")))?;
    let mut have = Vec::new();
    let mut messages = std::collections::HashMap::new();
    for a in dump {
        let ip = a.attributes.iter().find_map(|x| match x {
            AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
            _ => None,
        });
        let Some(ip) = ip else { continue };
        have.push((ip, a.header.prefix_len));
        messages.insert((ip, a.header.prefix_len), a);
    }
    for op in plan_addresses(&have, addr) {
        match op {
            AddrOp::Remove(ip, len) => {
                if let Some(a) = messages.remove(&(ip, len)) {
                    h.address()
                        .del(a)
                        .execute()
                        .await
                        .map_err(NetlinkError::rtnetlink(format!("remove {ip} from {name}")))?;
                }
            }
            AddrOp::Add(ip) => h
                .address()
                .add(index, IpAddr::V4(ip), 32)
                .execute()
                .await
                .map_err(NetlinkError::rtnetlink(format!("add {ip}/32 to {name}")))?,
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "tunnels_tests.rs"]
mod tests;
