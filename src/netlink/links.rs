//! Links and addresses, through an `rtnetlink` handle (the caller's connection, in its
//! network namespace): lookups by name, by index, the list, an interface's MTU and the
//! interface holding an address. "No such interface" is `Ok(None)`, never an error, so
//! callers decide on absence on purpose.

use std::collections::HashMap;
use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::Handle;

use super::NetlinkError;

/// The MTU assumed when the kernel does not say (Ethernet's).
pub const DEFAULT_MTU: u32 = 1500;

/// The link named `name`, or None when there is none (the kernel answers ENODEV, some
/// kernels ENOENT).
pub async fn by_name(h: &Handle, name: &str) -> Result<Option<LinkMessage>, NetlinkError> {
    let r = h
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await;
    absent_is_none(r.map_err(|e| NetlinkError::from_rtnetlink(format!("get link {name}"), e)))
}

/// The link with index `index`, or None when there is none.
pub async fn by_index(h: &Handle, index: u32) -> Result<Option<LinkMessage>, NetlinkError> {
    let r = h.link().get().match_index(index).execute().try_next().await;
    absent_is_none(r.map_err(|e| NetlinkError::from_rtnetlink(format!("get link {index}"), e)))
}

fn absent_is_none(
    r: Result<Option<LinkMessage>, NetlinkError>,
) -> Result<Option<LinkMessage>, NetlinkError> {
    match r {
        Err(e) if e.is_gone() => Ok(None),
        other => other,
    }
}

/// Interface indexes by name.
pub async fn list(h: &Handle) -> Result<HashMap<String, u32>, NetlinkError> {
    let mut out = HashMap::new();
    let mut s = h.link().get().execute();
    while let Some(l) = s
        .try_next()
        .await
        .map_err(|e| NetlinkError::from_rtnetlink("list links", e))?
    {
        if let Some(n) = name(&l) {
            out.insert(n.to_string(), l.header.index);
        }
    }
    Ok(out)
}

/// A link's name (IFLA_IFNAME).
pub fn name(l: &LinkMessage) -> Option<&str> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

/// A link's MTU (IFLA_MTU).
pub fn mtu(l: &LinkMessage) -> Option<u32> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    })
}

/// An interface's MTU ([`DEFAULT_MTU`] when the interface or its MTU is not there).
pub async fn mtu_of(h: &Handle, index: u32) -> Result<u32, NetlinkError> {
    Ok(by_index(h, index)
        .await?
        .as_ref()
        .and_then(mtu)
        .unwrap_or(DEFAULT_MTU))
}

/// The index of the interface that holds `ip` (e.g. the uplink of NoEncap routes).
pub async fn interface_with(h: &Handle, ip: IpAddr) -> Result<Option<u32>, NetlinkError> {
    let addrs: Vec<_> = h
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| NetlinkError::from_rtnetlink("list addresses", e))?;
    Ok(addrs.iter().find_map(|a| {
        a.attributes.iter().find_map(|at| match at {
            AddressAttribute::Address(x) if *x == ip => Some(a.header.index),
            _ => None,
        })
    }))
}

/// Every interface's addresses, by interface name (what host endpoints named by their
/// expected addresses are matched against).
pub async fn addresses(
    h: &Handle,
) -> Result<std::collections::BTreeMap<String, Vec<IpAddr>>, NetlinkError> {
    let names: HashMap<u32, String> = list(h).await?.into_iter().map(|(n, i)| (i, n)).collect();
    let mut out: std::collections::BTreeMap<String, Vec<IpAddr>> = Default::default();
    let mut s = h.address().get().execute();
    while let Some(a) = s
        .try_next()
        .await
        .map_err(|e| NetlinkError::from_rtnetlink("list addresses", e))?
    {
        let Some(name) = names.get(&a.header.index) else {
            continue;
        };
        for at in &a.attributes {
            if let AddressAttribute::Address(x) = at {
                out.entry(name.clone()).or_default().push(*x);
            }
        }
    }
    Ok(out)
}
