//! The route reconciler: makes the main routing table's routes of ours match the desired
//! ones (REFERENCE §5). Ours are routes with protocol 80 and every route on a `cali*`,
//! `vxlan.calico` or `tunl0` interface except the kernel's own (`proto kernel`: connected
//! subnets, IPv6 link-local); routes on a workload interface that no desired route names
//! are the CNI plugin's until its endpoint arrives. No other route is ever touched. One pass dumps the
//! table, diffs, and sends the fixes (replace semantics) with many requests in flight.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use rtnetlink::{Handle, RouteMessageBuilder};

use super::calc::{Dev, PROTO_FELIX, Route, RouteTable, TUNL0, Target, VXLAN_DEV};
use super::nlbatch::{RawRoute, Request, Writer};

/// `proto kernel`.
const PROTO_KERNEL: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("{op}: {message}")]
    Netlink { op: String, message: String },
}

enum Op {
    Put(IpNet, Kernel),
    Del(RouteMessage),
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pass {
    pub added_or_replaced: usize,
    pub deleted: usize,
    /// Our routes in the table after the pass (through the interface, for a pass of one).
    pub ours: usize,
    /// Desired routes that could not be programmed (missing interface, kernel refusal).
    pub failures: Vec<String>,
}

/// A route as the kernel has it, reduced to what we compare.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Kernel {
    kind: RouteType,
    oif: Option<u32>,
    gateway: Option<IpAddr>,
    protocol: u8,
    scope: RouteScope,
    onlink: bool,
}

pub(crate) fn is_ours_dev(name: &str, prefix: &str) -> bool {
    name.starts_with(prefix) || name == VXLAN_DEV || name == TUNL0
}

fn dst(m: &RouteMessage) -> Option<IpNet> {
    let len = m.header.destination_prefix_length;
    let addr = m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
        RouteAttribute::Destination(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
        _ => None,
    });
    let addr = addr.unwrap_or(
        if m.header.address_family == netlink_packet_route::AddressFamily::Inet6 {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        },
    );
    IpNet::new(addr, len).ok()
}

/// The kernel form of a desired route, or why it cannot be made.
fn wanted(
    route: &Route,
    links: &HashMap<String, u32>,
    uplink: Option<u32>,
) -> Result<Kernel, String> {
    let index = |dev: &Dev| match dev {
        Dev::Uplink => uplink.ok_or_else(|| "no interface holds this node's IP".to_string()),
        Dev::Named(n) => links
            .get(n)
            .copied()
            .ok_or_else(|| format!("no interface {n}")),
    };
    Ok(match &route.target {
        Target::Blackhole => Kernel {
            kind: RouteType::BlackHole,
            oif: None,
            gateway: None,
            protocol: route.protocol,
            scope: RouteScope::Universe,
            onlink: false,
        },
        Target::Link(dev) => Kernel {
            kind: RouteType::Unicast,
            oif: Some(index(&Dev::Named(dev.clone()))?),
            gateway: None,
            protocol: route.protocol,
            scope: RouteScope::Link,
            onlink: false,
        },
        Target::Via { gateway, dev } => Kernel {
            kind: RouteType::Unicast,
            oif: Some(index(dev)?),
            gateway: Some(*gateway),
            protocol: route.protocol,
            scope: RouteScope::Universe,
            onlink: true,
        },
    })
}

fn message(prefix: &IpNet, k: &Kernel) -> RouteMessage {
    let mut m = match prefix {
        IpNet::V4(n) => {
            let mut b =
                RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(n.addr(), n.prefix_len());
            if let Some(IpAddr::V4(g)) = k.gateway {
                b = b.gateway(g);
            }
            b.build()
        }
        IpNet::V6(n) => {
            let mut b =
                RouteMessageBuilder::<Ipv6Addr>::new().destination_prefix(n.addr(), n.prefix_len());
            if let Some(IpAddr::V6(g)) = k.gateway {
                b = b.gateway(g);
            }
            b.build()
        }
    };
    m.header.table = RouteHeader::RT_TABLE_MAIN;
    m.header.kind = k.kind;
    m.header.protocol = RouteProtocol::from(k.protocol);
    m.header.scope = k.scope;
    if k.onlink {
        m.header.flags |= RouteFlags::Onlink;
    }
    if let Some(oif) = k.oif {
        m.attributes.push(RouteAttribute::Oif(oif));
    }
    m
}

/// The message that deletes exactly this route.
fn raw_message(r: &RawRoute) -> RouteMessage {
    let mut m = match (r.dst, r.gateway) {
        (IpNet::V4(n), gw) => {
            let mut b =
                RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(n.addr(), n.prefix_len());
            if let Some(IpAddr::V4(g)) = gw {
                b = b.gateway(g);
            }
            b.build()
        }
        (IpNet::V6(n), gw) => {
            let mut b =
                RouteMessageBuilder::<Ipv6Addr>::new().destination_prefix(n.addr(), n.prefix_len());
            if let Some(IpAddr::V6(g)) = gw {
                b = b.gateway(g);
            }
            b.build()
        }
    };
    m.header.table = RouteHeader::RT_TABLE_MAIN;
    m.header.kind = RouteType::from(r.kind);
    m.header.protocol = RouteProtocol::from(r.protocol);
    m.header.scope = RouteScope::from(r.scope);
    if let Some(oif) = r.oif {
        m.attributes.push(RouteAttribute::Oif(oif));
    }
    if r.priority != 0 {
        m.attributes.push(RouteAttribute::Priority(r.priority));
    }
    m
}

pub(crate) fn nl(op: String) -> impl FnOnce(rtnetlink::Error) -> RouteError {
    move |e| RouteError::Netlink {
        op,
        message: e.to_string(),
    }
}

/// Interface indexes by name.
pub(crate) async fn links(h: &Handle) -> Result<HashMap<String, u32>, RouteError> {
    let mut out = HashMap::new();
    let mut s = h.link().get().execute();
    while let Some(l) = s.try_next().await.map_err(nl("list links".into()))? {
        for a in &l.attributes {
            if let netlink_packet_route::link::LinkAttribute::IfName(n) = a {
                out.insert(n.clone(), l.header.index);
            }
        }
    }
    Ok(out)
}

/// One route change: the prefix, the route of ours the kernel has now (as we last
/// programmed it), and the one wanted (None: remove).
pub type Change = (IpNet, Option<Route>, Option<Route>);

/// Queue route changes on the writer without reading the kernel's table (BGP's updates
/// between full passes): puts replace, removals delete exactly the route we programmed.
/// Returns at once; the kernel's refusals arrive on the writer's failure channel (a
/// removal of a route already gone is not one). The pass counts what was queued.
pub async fn apply_changes(
    h: &Handle,
    w: &Writer,
    changes: &[Change],
    uplink: Option<u32>,
) -> Result<Pass, RouteError> {
    let named = |r: &Option<Route>| {
        matches!(
            r,
            Some(Route {
                target: Target::Via {
                    dev: crate::felix::calc::Dev::Named(_),
                    ..
                } | Target::Link(_),
                ..
            })
        )
    };
    let links = if changes.iter().any(|(_, old, new)| named(old) || named(new)) {
        links(h).await?
    } else {
        HashMap::new()
    };
    let mut pass = Pass::default();
    let mut requests = Vec::with_capacity(changes.len());
    let mut labels = Vec::with_capacity(changes.len());
    for (p, old, new) in changes {
        match (old, new) {
            (_, Some(r)) => match wanted(r, &links, uplink) {
                Ok(k) => {
                    requests.push(Request::Replace(message(p, &k)));
                    labels.push(Some(*p));
                    pass.added_or_replaced += 1;
                }
                Err(why) => pass.failures.push(format!("{p}: {why}")),
            },
            (Some(r), None) => {
                if let Ok(k) = wanted(r, &links, uplink) {
                    requests.push(Request::Delete(message(p, &k)));
                    // Already gone is fine: no label, no report.
                    labels.push(None);
                    pass.deleted += 1;
                }
            }
            (None, None) => {}
        }
    }
    w.submit(requests, labels)
        .map_err(|e| RouteError::Netlink {
            op: "queue route changes".into(),
            message: e.to_string(),
        })?;
    Ok(pass)
}

/// The order in which the kernel's FIB trie takes many routes most cheaply: by the
/// destination's address with its bits reversed (then the prefix length; IPv4 first).
/// Early routes then spread over the whole address space and the trie's nodes grow to
/// their final size once, where ascending order keeps inflating the node being filled.
/// Measured here for 1M /24s sent alone: 1.45 s of kernel time against 1.7 s shuffled and
/// 2.1 s ascending; a cold pass of 1M /26s took 1.7 s instead of 1.8 s ascending. An IPv6
/// key keeps 55 of the address's bits: prefixes that share them keep the order they came
/// in, as a prefix's own operations always do.
fn trie_order(p: &IpNet) -> u64 {
    match p {
        IpNet::V4(n) => {
            u64::from(u32::from(n.addr()).reverse_bits()) << 8 | u64::from(n.prefix_len())
        }
        IpNet::V6(n) => {
            1 << 63
                | ((u128::from(n.addr()).reverse_bits() >> 73) as u64) << 8
                | u64::from(n.prefix_len())
        }
    }
}

/// Send the operations in batches (see [`super::nlbatch`]) and count the outcomes into
/// `pass`.
async fn run_ops(w: &Writer, mut ops: Vec<Op>, pass: &mut Pass) {
    if ops.is_empty() {
        return;
    }
    // Stable: a prefix's own operations (a deletion of another metric, then the put) keep
    // their order.
    ops.sort_by_cached_key(|op| match op {
        Op::Put(p, _) => trie_order(p),
        Op::Del(m) => dst(m).map_or(0, |d| trie_order(&d)),
    });
    // Each request's prefix, formatted only for a failure.
    let mut what = Vec::with_capacity(ops.len());
    let requests: Vec<Request> = ops
        .into_iter()
        .map(|op| match op {
            Op::Put(p, k) => {
                what.push((Some(p), true));
                Request::Replace(message(&p, &k))
            }
            Op::Del(m) => {
                what.push((dst(&m), false));
                Request::Delete(m)
            }
        })
        .collect();
    let outcomes = match w.send(requests).await {
        Ok(o) => o,
        Err(e) => {
            pass.failures.push(format!("netlink: {e}"));
            return;
        }
    };
    for ((what, put), r) in what.into_iter().zip(outcomes) {
        match (r, put) {
            (Ok(()), true) => pass.added_or_replaced += 1,
            (Ok(()), false) => pass.deleted += 1,
            (Err(errno), true) => pass.failures.push(format!(
                "{}: {}",
                what.map_or_else(String::new, |p| p.to_string()),
                std::io::Error::from_raw_os_error(errno)
            )),
            // Already gone.
            (Err(_), false) => {}
        }
    }
}

/// An interface's MTU.
pub async fn mtu_of(h: &Handle, index: u32) -> Result<u32, RouteError> {
    let l = h
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_next()
        .await
        .map_err(nl(format!("get link {index}")))?;
    Ok(l.and_then(|l| {
        l.attributes.iter().find_map(|a| match a {
            netlink_packet_route::link::LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        })
    })
    .unwrap_or(1500))
}

/// The index of the interface that holds `ip` (the uplink of NoEncap routes).
pub async fn interface_with(h: &Handle, ip: IpAddr) -> Result<Option<u32>, RouteError> {
    let addrs: Vec<_> = h
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("list addresses".into()))?;
    Ok(addrs.iter().find_map(|a| {
        a.attributes.iter().find_map(|at| match at {
            netlink_packet_route::address::AddressAttribute::Address(x) if *x == ip => {
                Some(a.header.index)
            }
            _ => None,
        })
    }))
}

/// One pass: make the main table's routes of ours be exactly `desired`. `prefix` is the
/// workload interface prefix (`cali`); `uplink` the interface of `Dev::Uplink` routes.
/// Routes of ours via a gateway inside `keep` stay even when not desired: BGP's routes
/// while the speaker has not delivered its table yet (forwarding state kept across a
/// restart). With `only`, the pass covers the routes through that interface (index) and
/// no other: the kernel dumps that interface's routes, and desired routes through other
/// interfaces, or that cannot be made, are not looked at.
pub async fn reconcile(
    h: &Handle,
    w: &Writer,
    desired: &RouteTable,
    (prefix, uplink): (&str, Option<u32>),
    keep: &[IpNet],
    only: Option<u32>,
) -> Result<Pass, RouteError> {
    let links = links(h).await?;
    let names: HashMap<u32, &str> = links.iter().map(|(n, i)| (*i, n.as_str())).collect();
    let workload_ifaces: std::collections::HashSet<&str> = desired
        .values()
        .filter_map(|r| match &r.target {
            Target::Link(dev) => Some(dev.as_str()),
            _ => None,
        })
        .collect();
    // Ours in the kernel: the first route of each prefix, and any further ones (rare: other
    // metrics) apart, so the common case costs no allocation per route.
    let capacity = if only.is_some() { 0 } else { desired.len() };
    let mut have: crate::bgp::rib::FastMap<IpNet, (Kernel, RawRoute)> =
        crate::bgp::rib::FastMap::with_capacity_and_hasher(capacity, Default::default());
    let mut more: crate::bgp::rib::FastMap<IpNet, Vec<(Kernel, RawRoute)>> = Default::default();
    for v6 in [false, true] {
        // On the writer: after everything queued before is in the kernel.
        let routes = w.dump(v6, only).await.map_err(|e| RouteError::Netlink {
            op: "list routes".into(),
            message: e.to_string(),
        })?;
        for r in routes {
            if r.table != u32::from(RouteHeader::RT_TABLE_MAIN) {
                continue;
            }
            let k = Kernel {
                kind: RouteType::from(r.kind),
                oif: r.oif,
                gateway: r.gateway,
                protocol: r.protocol,
                scope: RouteScope::from(r.scope),
                // RTNH_F_ONLINK.
                onlink: r.flags & 4 != 0,
            };
            // The kernel's own routes (connected subnets, IPv6 link-local) are never ours,
            // whatever interface they are on.
            // A workload interface no endpoint names yet belongs to the CNI plugin (its
            // endpoint is on its way): its routes are left alone.
            let ours = k.protocol == PROTO_FELIX
                || (k.protocol != PROTO_KERNEL
                    && k.oif.and_then(|i| names.get(&i)).is_some_and(|n| {
                        is_ours_dev(n, prefix)
                            && (!n.starts_with(prefix) || workload_ifaces.contains(n))
                    }));
            if ours {
                match have.entry(r.dst) {
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert((k, r));
                    }
                    std::collections::hash_map::Entry::Occupied(_) => {
                        more.entry(r.dst).or_default().push((k, r));
                    }
                }
            }
        }
    }

    let mut pass = Pass::default();
    let mut ops = Vec::new();
    let mut looked_at = 0;
    for (p, route) in desired {
        if let Some(i) = only {
            // Cheap tests first: most routes of a big table are not this interface's.
            let through = match &route.target {
                Target::Blackhole => false,
                Target::Link(dev)
                | Target::Via {
                    dev: Dev::Named(dev),
                    ..
                } => links.get(dev) == Some(&i),
                Target::Via {
                    dev: Dev::Uplink, ..
                } => uplink == Some(i),
            };
            if !through {
                continue;
            }
        }
        looked_at += 1;
        let k = match wanted(route, &links, uplink) {
            Ok(k) => k,
            Err(why) => {
                pass.failures.push(format!("{p}: {why}"));
                continue;
            }
        };
        let first = have.remove(p);
        let extra = if more.is_empty() {
            Vec::new()
        } else {
            more.remove(p).unwrap_or_default()
        };
        if extra.is_empty() && first.as_ref().is_some_and(|(have, _)| *have == k) {
            continue;
        }
        let existing = first.into_iter().chain(extra);
        // Replace the route of the default metric in place (no gap); routes of ours for
        // the prefix with other metrics go.
        let default_metric = if p.addr().is_ipv6() { 1024 } else { 0 };
        for (_, r) in existing {
            if r.priority != default_metric {
                ops.push(Op::Del(raw_message(&r)));
            }
        }
        ops.push(Op::Put(*p, k));
    }
    // What is left of ours is not desired.
    let left = have.into_iter().map(|(d, kr)| (d, vec![kr]));
    for (d, v) in left.chain(more) {
        let kept = keep.iter().any(|n| n.contains(&d));
        ops.extend(
            v.into_iter()
                .filter(|(k, _)| !(kept && k.gateway.is_some()))
                .map(|(_, r)| Op::Del(raw_message(&r))),
        );
    }
    run_ops(w, ops, &mut pass).await;
    pass.ours = looked_at - pass.failures.len();
    Ok(pass)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trie_order_spreads_consecutive_blocks_and_puts_ipv4_first() {
        let mut blocks: Vec<IpNet> = (0..8u32)
            .map(|i| {
                IpNet::V4(ipnet::Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + (i << 8)), 24).unwrap())
            })
            .collect();
        blocks.sort_by_key(trie_order);
        let thirds: Vec<u8> = blocks
            .iter()
            .map(|b| match b {
                IpNet::V4(n) => n.addr().octets()[2],
                IpNet::V6(_) => unreachable!(),
            })
            .collect();
        // The bit-reversal permutation of 0..8.
        assert_eq!(thirds, [0, 4, 2, 6, 1, 5, 3, 7]);
        // The prefix length breaks ties of one address; IPv6 sorts after every IPv4.
        let a: IpNet = "10.0.0.0/24".parse().unwrap();
        let b: IpNet = "10.0.0.0/26".parse().unwrap();
        let v6: IpNet = "fd00::/122".parse().unwrap();
        let top: IpNet = "255.255.255.255/32".parse().unwrap();
        assert!(trie_order(&a) < trie_order(&b));
        assert!(trie_order(&top) < trie_order(&v6));
    }
}
