//! The neighbour and FDB reconciler: permanent ARP/NDP entries on `cali*` interfaces
//! (workload IP -> its MAC) and on vxlan.calico (remote tunnel IP -> remote VTEP MAC), and
//! permanent FDB entries on vxlan.calico (remote VTEP MAC -> remote node IP). Ours are the
//! permanent entries on those interfaces; every other entry is left alone.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use futures::{StreamExt, TryStreamExt};
use netlink_packet_route::AddressFamily;
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::Handle;

use super::calc::{Fdb, Neighbour, VXLAN_DEV};
use super::routes::{RouteError, is_ours_dev, links, nl};

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pass {
    pub added: usize,
    pub deleted: usize,
    pub failures: Vec<String>,
}

fn mac_of(m: &NeighbourMessage) -> Option<[u8; 6]> {
    m.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(b) => b.as_slice().try_into().ok(),
        _ => None,
    })
}

fn ip_of(m: &NeighbourMessage) -> Option<IpAddr> {
    m.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => Some(IpAddr::V4(*a)),
        NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
        // In bridge (FDB) entries the address family is not the address's.
        NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => match b.len() {
            4 => <[u8; 4]>::try_from(b.as_slice()).ok().map(IpAddr::from),
            16 => <[u8; 16]>::try_from(b.as_slice()).ok().map(IpAddr::from),
            _ => None,
        },
        _ => None,
    })
}

enum Op {
    Neigh(u32, IpAddr, [u8; 6]),
    Fdb(u32, [u8; 6], IpAddr),
    Del(NeighbourMessage),
}

/// One pass: our permanent neighbours and FDB entries become exactly the desired ones.
pub async fn reconcile(
    h: &Handle,
    neighbours: &BTreeSet<Neighbour>,
    fdb: &BTreeSet<Fdb>,
    prefix: &str,
) -> Result<Pass, RouteError> {
    let links = links(h).await?;
    let names: HashMap<u32, &str> = links.iter().map(|(n, i)| (*i, n.as_str())).collect();
    let vxlan = links.get(VXLAN_DEV).copied();
    // A dump of the IP neighbour tables does not include the bridge FDB: two dumps.
    let mut all: Vec<NeighbourMessage> = h
        .neighbours()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("list neighbours".into()))?;
    let fdb_dump: Vec<NeighbourMessage> = h
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Bridge)
        .execute()
        .try_collect()
        .await
        .map_err(nl("list FDB entries".into()))?;
    all.extend(fdb_dump);
    let mut have_neigh: HashMap<(u32, IpAddr), ([u8; 6], NeighbourMessage)> = HashMap::new();
    let mut have_fdb: HashMap<(u32, [u8; 6]), (Option<IpAddr>, NeighbourMessage)> = HashMap::new();
    for m in all {
        let idx = m.header.ifindex;
        let permanent = m.header.state == NeighbourState::Permanent;
        let Some(name) = names.get(&idx) else {
            continue;
        };
        match m.header.family {
            AddressFamily::Inet | AddressFamily::Inet6
                if permanent && is_ours_dev(name, prefix) =>
            {
                if let (Some(ip), Some(mac)) = (ip_of(&m), mac_of(&m)) {
                    have_neigh.insert((idx, ip), (mac, m));
                }
            }
            AddressFamily::Bridge
                if permanent
                    && Some(idx) == vxlan
                    && m.header.flags.contains(NeighbourFlags::Own) =>
            {
                if let Some(mac) = mac_of(&m).filter(|mac| *mac != [0; 6]) {
                    have_fdb.insert((idx, mac), (ip_of(&m), m));
                }
            }
            _ => {}
        }
    }

    let mut pass = Pass::default();
    let mut ops = Vec::new();
    for n in neighbours {
        let Some(&idx) = links.get(&n.dev) else {
            pass.failures.push(format!(
                "neighbour {} on {}: no such interface",
                n.ip, n.dev
            ));
            continue;
        };
        match have_neigh.remove(&(idx, n.ip)) {
            Some((mac, _)) if mac == n.mac => {}
            _ => ops.push(Op::Neigh(idx, n.ip, n.mac)),
        }
    }
    for f in fdb {
        let Some(idx) = vxlan else {
            pass.failures
                .push(format!("FDB entry {:02x?}: no {VXLAN_DEV}", f.mac));
            continue;
        };
        match have_fdb.remove(&(idx, f.mac)) {
            Some((Some(dst), _)) if dst == f.dst => {}
            _ => ops.push(Op::Fdb(idx, f.mac, f.dst)),
        }
    }
    ops.extend(have_neigh.into_values().map(|(_, m)| Op::Del(m)));
    ops.extend(have_fdb.into_values().map(|(_, m)| Op::Del(m)));
    let results: Vec<(bool, Result<(), rtnetlink::Error>, String)> = futures::stream::iter(ops)
        .map(|op| {
            let h = h.clone();
            async move {
                match op {
                    Op::Neigh(idx, ip, mac) => {
                        let r = h
                            .neighbours()
                            .add(idx, ip)
                            .link_layer_address(&mac)
                            .state(NeighbourState::Permanent)
                            .replace()
                            .execute()
                            .await;
                        (true, r, format!("neighbour {ip}"))
                    }
                    Op::Fdb(idx, mac, dst) => {
                        let r = h
                            .neighbours()
                            .add_bridge(idx, &mac)
                            .destination(dst)
                            .flags(NeighbourFlags::Own)
                            .state(NeighbourState::Permanent)
                            .replace()
                            .execute()
                            .await;
                        (true, r, format!("FDB {mac:02x?} -> {dst}"))
                    }
                    Op::Del(m) => (false, h.neighbours().del(m).execute().await, String::new()),
                }
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    for (add, r, what) in results {
        match (add, r) {
            (true, Ok(())) => pass.added += 1,
            (false, Ok(())) => pass.deleted += 1,
            (true, Err(e)) => pass.failures.push(format!("{what}: {e}")),
            (false, Err(_)) => {}
        }
    }
    Ok(pass)
}
