//! Tunnel devices (REFERENCE §5): `vxlan.calico` (VNI, UDP port, parent interface and
//! source address of the node IP, the node's VTEP MAC, the tunnel address /32, MTU) and
//! `tunl0` (ipip). A device whose settings differ from the wanted ones is deleted and
//! made again. A kernel without ipip gives one clear error, nothing else.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{InfoData, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::{Handle, LinkIpIp, LinkUnspec, LinkVxlan};

use super::calc::{Ipip, TUNL0, VXLAN_DEV, Vxlan};
use super::routes::{RouteError, nl};

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
    #[error(transparent)]
    Netlink(#[from] RouteError),
    #[error(
        "IPIP pools need the ipip kernel module, which this kernel does not have (creating {TUNL0} failed: {0}); IPIP routes are not programmed"
    )]
    NoIpip(String),
    #[error(
        "{VXLAN_DEV} needs this node's IPv4 address (spec.bgp.ipv4Address) and the interface holding it"
    )]
    NoUplink,
}

async fn link(h: &Handle, name: &str) -> Result<Option<LinkMessage>, RouteError> {
    match h
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
    {
        Ok(l) => Ok(l),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(nl(format!("get link {name}"))(e)),
    }
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

/// Whether an existing vxlan.calico has the wanted settings.
fn vxlan_matches(l: &LinkMessage, want: &Vxlan, parent: u32, local: Ipv4Addr, mtu: u32) -> bool {
    let Some(info) = vxlan_info(l) else {
        return false;
    };
    let has = |x: InfoVxlan| info.contains(&x);
    has(InfoVxlan::Id(want.vni))
        && has(InfoVxlan::Port(want.port))
        && has(InfoVxlan::Local(local))
        && has(InfoVxlan::Link(parent))
        && has(InfoVxlan::Learning(false))
        && attr(l, |a| match a {
            LinkAttribute::Address(m) => Some(m.as_slice() == want.mac),
            _ => None,
        }) == Some(true)
        && attr(l, |a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        }) == Some(mtu)
}

/// A removal of vxlan.calico under way on a thread of its own (see [`remove_vxlan`]).
pub struct PendingRemoval {
    done: tokio::sync::oneshot::Receiver<std::io::Result<()>>,
}

/// What a finished removal's outcome means: gone already is as good as removed.
fn removed(
    r: Result<std::io::Result<()>, tokio::sync::oneshot::error::RecvError>,
) -> Result<(), TunnelError> {
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) if e.raw_os_error() == Some(libc::ENODEV) => Ok(()),
        Ok(Err(e)) => Err(delete_failed(e)),
        Err(_) => Err(delete_failed("the removal's thread stopped")),
    }
}

fn delete_failed(e: impl std::fmt::Display) -> TunnelError {
    RouteError::Netlink {
        op: format!("delete {VXLAN_DEV}"),
        message: e.to_string(),
    }
    .into()
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
    if let Some(p) = pending {
        match p.done.try_recv() {
            Err(tokio::sync::oneshot::error::TryRecvError::Empty) => return Ok(Outcome::Unchanged),
            Ok(r) => {
                *pending = None;
                removed(Ok(r))?;
            }
            Err(tokio::sync::oneshot::error::TryRecvError::Closed) => {
                *pending = None;
            }
        }
    }
    let Some(l) = link(h, VXLAN_DEV).await? else {
        return Ok(Outcome::Unchanged);
    };
    let index = l.header.index;
    // Opened here, in the caller's network namespace; used on the thread.
    let mut socket = crate::felix::nlbatch::open().map_err(delete_failed)?;
    let (tx, done) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("felix-vxlan-del".into())
        .spawn(move || {
            let _ = tx.send(crate::felix::nlbatch::delete_link(&mut socket, index));
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
    let existing = link(h, VXLAN_DEV).await?;
    let Some(want) = want else {
        if let Some(l) = existing {
            h.link()
                .del(l.header.index)
                .execute()
                .await
                .map_err(nl(format!("delete {VXLAN_DEV}")))?;
            return Ok(Outcome::Deleted);
        }
        return Ok(Outcome::Unchanged);
    };
    let (Some(parent), Some(local)) = (parent, want.local) else {
        return Err(TunnelError::NoUplink);
    };
    let mut outcome = Outcome::Created;
    let index = match existing {
        Some(l) if vxlan_matches(&l, want, parent, local, mtu) => {
            outcome = Outcome::Unchanged;
            l.header.index
        }
        other => {
            if let Some(l) = other {
                h.link()
                    .del(l.header.index)
                    .execute()
                    .await
                    .map_err(nl(format!("delete {VXLAN_DEV}")))?;
                outcome = Outcome::Recreated;
            }
            let msg = LinkVxlan::new(VXLAN_DEV, want.vni)
                .dev(parent)
                .port(want.port)
                .local(local)
                .learning(false)
                .mtu(mtu)
                .address(want.mac.to_vec())
                .build();
            h.link()
                .add(msg)
                .execute()
                .await
                .map_err(nl(format!("create {VXLAN_DEV}")))?;
            link(h, VXLAN_DEV)
                .await?
                .map(|l| l.header.index)
                .ok_or_else(|| RouteError::Netlink {
                    op: format!("find {VXLAN_DEV}"),
                    message: "just created, now missing".into(),
                })?
        }
    };
    set_address(h, index, VXLAN_DEV, want.address).await?;
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(nl(format!("set {VXLAN_DEV} up")))?;
    Ok(outcome)
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
    let mut outcome = Outcome::Unchanged;
    let index = match link(h, TUNL0).await? {
        Some(l) => l.header.index,
        None => {
            let msg = LinkIpIp::new(TUNL0).mtu(mtu).build();
            if let Err(e) = h.link().add(msg).execute().await {
                return Err(TunnelError::NoIpip(e.to_string()));
            }
            outcome = Outcome::Created;
            link(h, TUNL0)
                .await?
                .map(|l| l.header.index)
                .ok_or_else(|| TunnelError::NoIpip("the device did not appear".into()))?
        }
    };
    set_address(h, index, TUNL0, want.address).await?;
    h.link()
        .set(LinkUnspec::new_with_index(index).mtu(mtu).up().build())
        .execute()
        .await
        .map_err(nl(format!("set {TUNL0} up")))?;
    Ok(outcome)
}

/// The device's IPv4 addresses become exactly `addr`/32 (or none).
async fn set_address(
    h: &Handle,
    index: u32,
    name: &str,
    addr: Option<Ipv4Addr>,
) -> Result<(), RouteError> {
    let have: Vec<_> = h
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(nl(format!("list addresses of {name}")))?;
    let mut present = false;
    for a in have {
        let ip = a.attributes.iter().find_map(|x| match x {
            AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
            _ => None,
        });
        let Some(ip) = ip else { continue };
        if Some(ip) == addr && a.header.prefix_len == 32 {
            present = true;
        } else {
            h.address()
                .del(a)
                .execute()
                .await
                .map_err(nl(format!("remove {ip} from {name}")))?;
        }
    }
    if let (Some(ip), false) = (addr, present) {
        h.address()
            .add(index, IpAddr::V4(ip), 32)
            .execute()
            .await
            .map_err(nl(format!("add {ip}/32 to {name}")))?;
    }
    Ok(())
}
