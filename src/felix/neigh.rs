//! The neighbour and FDB reconciler: permanent ARP/NDP entries on `cali*` interfaces
//! (workload IP -> its MAC) and on vxlan.calico (remote tunnel IP -> remote VTEP MAC), and
//! permanent FDB entries on vxlan.calico (remote VTEP MAC -> remote node IP). Ours are the
//! permanent entries on those interfaces; every other entry is left alone.
//!
//! Plan and execute: [`observe`] keeps the kernel's entries that are ours, [`plan`]
//! decides (pure, tested without root) and [`reconcile`] does the netlink I/O through the
//! adapter ([`crate::netlink`]), the kernel's errno kept typed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use futures::{StreamExt, TryStreamExt};
use netlink_packet_route::AddressFamily;
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::Handle;

use super::calc::{Fdb, Neighbour, VXLAN_DEV};
use super::problem::Problem;
use super::routes::is_ours_dev;
use crate::netlink::{NetlinkError, links};

/// What one pass did.
#[derive(Debug, Default)]
pub struct Pass {
    pub added: usize,
    pub deleted: usize,
    /// Desired entries that could not be programmed (each a [`Problem::Neighbour`]).
    pub failures: Vec<Problem>,
}

/// A desired neighbour or FDB entry that could not be programmed, naming it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NeighbourProblem {
    /// The workload's (or vxlan.calico's) interface is not there (yet): the entry is tried
    /// again at the next pass, or when the interface appears.
    #[error("neighbour {ip} on {dev}: no such interface")]
    NoInterface { ip: IpAddr, dev: String },
    /// A remote VTEP's FDB entry needs vxlan.calico, which is missing.
    #[error("FDB entry {mac:02x?}: no {VXLAN_DEV}")]
    NoVxlanDevice { mac: [u8; 6] },
    /// The kernel refused a neighbour entry with this errno (positive; the kernel's
    /// answer of a [`NetlinkError::Kernel`]).
    #[error("neighbour {ip}: {}", std::io::Error::from_raw_os_error(*errno))]
    NeighbourRefused { ip: IpAddr, errno: i32 },
    /// The kernel refused an FDB entry with this errno.
    #[error("FDB {mac:02x?} -> {dst}: {}", std::io::Error::from_raw_os_error(*errno))]
    FdbRefused {
        mac: [u8; 6],
        dst: IpAddr,
        errno: i32,
    },
}

/// One entry of a neighbour or FDB dump, reduced to what the ownership rule reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub ifindex: u32,
    /// A bridge (FDB) entry rather than an IP neighbour.
    pub bridge: bool,
    /// `nud permanent`.
    pub permanent: bool,
    /// The FDB entry is the device's own (`self`), not the bridge layer's.
    pub own: bool,
    pub ip: Option<IpAddr>,
    pub mac: Option<[u8; 6]>,
}

/// Where an entry of ours sits: how the plan names one to delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Key {
    Neighbour { ifindex: u32, ip: IpAddr },
    Fdb { ifindex: u32, mac: [u8; 6] },
}

/// The kernel's entries that are ours: neighbours (to their MAC) and FDB entries (to their
/// destination, when they have one).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    pub neighbours: BTreeMap<(u32, IpAddr), [u8; 6]>,
    pub fdb: BTreeMap<(u32, [u8; 6]), Option<IpAddr>>,
}

/// The interfaces by name, and vxlan.calico's index.
#[derive(Debug, Clone, Default)]
pub struct Links {
    pub by_name: HashMap<String, u32>,
}

impl Links {
    fn vxlan(&self) -> Option<u32> {
        self.by_name.get(VXLAN_DEV).copied()
    }
}

/// Whether a dumped entry is ours: a permanent IP neighbour on one of our interfaces
/// (`cali*`, vxlan.calico, tunl0), or a permanent FDB entry of vxlan.calico itself
/// (`self`) for a real MAC (not the all-zero default destination another tool may add).
fn key_of(s: &Seen, names: &HashMap<u32, &str>, prefix: &str, vxlan: Option<u32>) -> Option<Key> {
    if !s.permanent {
        return None;
    }
    let name = names.get(&s.ifindex)?;
    if s.bridge {
        let mac = s.mac.filter(|m| *m != [0; 6])?;
        (Some(s.ifindex) == vxlan && s.own).then_some(Key::Fdb {
            ifindex: s.ifindex,
            mac,
        })
    } else {
        s.mac?;
        let ip = s.ip?;
        is_ours_dev(name, prefix).then_some(Key::Neighbour {
            ifindex: s.ifindex,
            ip,
        })
    }
}

/// Keep the entries that are ours (see `key_of`); each one's `M` (the kernel's message,
/// which a deletion sends back) by its key.
pub fn observe<M>(
    links: &Links,
    seen: impl IntoIterator<Item = (Seen, M)>,
    prefix: &str,
) -> (Observed, HashMap<Key, M>) {
    let names: HashMap<u32, &str> = links
        .by_name
        .iter()
        .map(|(n, i)| (*i, n.as_str()))
        .collect();
    let vxlan = links.vxlan();
    let mut observed = Observed::default();
    let mut by_key = HashMap::new();
    for (s, m) in seen {
        let Some(key) = key_of(&s, &names, prefix, vxlan) else {
            continue;
        };
        match key {
            Key::Neighbour { ifindex, ip } => {
                if let Some(mac) = s.mac {
                    observed.neighbours.insert((ifindex, ip), mac);
                }
            }
            Key::Fdb { ifindex, mac } => {
                observed.fdb.insert((ifindex, mac), s.ip);
            }
        }
        by_key.insert(key, m);
    }
    (observed, by_key)
}

/// One change to the kernel's neighbour tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `ip neigh replace <ip> lladdr <mac> dev <ifindex> nud permanent`.
    SetNeighbour {
        ifindex: u32,
        ip: IpAddr,
        mac: [u8; 6],
    },
    /// `bridge fdb replace <mac> dev vxlan.calico dst <dst> self permanent`.
    SetFdb {
        ifindex: u32,
        mac: [u8; 6],
        dst: IpAddr,
    },
    /// Delete an entry of ours no longer desired.
    Delete(Key),
}

/// What a pass must do, and the desired entries it cannot program.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub ops: Vec<Op>,
    pub problems: Vec<NeighbourProblem>,
}

/// Our entries become exactly the desired ones: each desired entry missing or different
/// is set (replace semantics), each of ours not desired is deleted; entries already right
/// are left alone. A desired entry whose interface is missing is a problem, not an op.
pub fn plan(
    neighbours: &BTreeSet<Neighbour>,
    fdb: &BTreeSet<Fdb>,
    links: &Links,
    observed: &Observed,
) -> Plan {
    let mut have_neigh = observed.neighbours.clone();
    let mut have_fdb = observed.fdb.clone();
    let mut p = Plan::default();
    for n in neighbours {
        let Some(&ifindex) = links.by_name.get(&n.dev) else {
            p.problems.push(NeighbourProblem::NoInterface {
                ip: n.ip,
                dev: n.dev.clone(),
            });
            continue;
        };
        if have_neigh.remove(&(ifindex, n.ip)) != Some(n.mac) {
            p.ops.push(Op::SetNeighbour {
                ifindex,
                ip: n.ip,
                mac: n.mac,
            });
        }
    }
    for f in fdb {
        let Some(ifindex) = links.vxlan() else {
            p.problems
                .push(NeighbourProblem::NoVxlanDevice { mac: f.mac });
            continue;
        };
        if have_fdb.remove(&(ifindex, f.mac)) != Some(Some(f.dst)) {
            p.ops.push(Op::SetFdb {
                ifindex,
                mac: f.mac,
                dst: f.dst,
            });
        }
    }
    p.ops.extend(
        have_neigh
            .into_keys()
            .map(|(ifindex, ip)| Op::Delete(Key::Neighbour { ifindex, ip })),
    );
    p.ops.extend(
        have_fdb
            .into_keys()
            .map(|(ifindex, mac)| Op::Delete(Key::Fdb { ifindex, mac })),
    );
    p
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

fn seen(m: &NeighbourMessage) -> Option<Seen> {
    let bridge = match m.header.family {
        AddressFamily::Inet | AddressFamily::Inet6 => false,
        AddressFamily::Bridge => true,
        _ => return None,
    };
    Some(Seen {
        ifindex: m.header.ifindex,
        bridge,
        permanent: m.header.state == NeighbourState::Permanent,
        own: m.header.flags.contains(NeighbourFlags::Own),
        ip: ip_of(m),
        mac: mac_of(m),
    })
}

/// One pass: our permanent neighbours and FDB entries become exactly the desired ones.
pub async fn reconcile(
    h: &Handle,
    neighbours: &BTreeSet<Neighbour>,
    fdb: &BTreeSet<Fdb>,
    prefix: &str,
) -> Result<Pass, NetlinkError> {
    let links = Links {
        by_name: links::list(h).await?,
    };
    // A dump of the IP neighbour tables does not include the bridge FDB: two dumps.
    let mut all: Vec<NeighbourMessage> = h
        .neighbours()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(NetlinkError::rtnetlink("list neighbours"))?;
    let fdb_dump: Vec<NeighbourMessage> = h
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Bridge)
        .execute()
        .try_collect()
        .await
        .map_err(NetlinkError::rtnetlink("list FDB entries"))?;
    all.extend(fdb_dump);
    let (observed, by_key) = observe(
        &links,
        all.into_iter().filter_map(|m| Some((seen(&m)?, m))),
        prefix,
    );
    let plan = plan(neighbours, fdb, &links, &observed);
    let mut pass = Pass {
        failures: plan.problems.into_iter().map(Problem::from).collect(),
        ..Pass::default()
    };
    execute(h, plan.ops, by_key, &mut pass).await;
    Ok(pass)
}

/// Carry out the ops, many in flight: sets counted as added (a refusal is a problem),
/// deletions counted as deleted (a refusal is not: an entry gone already is what was
/// wanted, any other is looked at again at the next pass).
async fn execute(
    h: &Handle,
    ops: Vec<Op>,
    mut by_key: HashMap<Key, NeighbourMessage>,
    pass: &mut Pass,
) {
    let ops: Vec<(Op, Option<NeighbourMessage>)> = ops
        .into_iter()
        .map(|op| {
            let m = match &op {
                Op::Delete(k) => by_key.remove(k),
                _ => None,
            };
            (op, m)
        })
        .collect();
    let results: Vec<(Op, Result<(), NetlinkError>)> = futures::stream::iter(ops)
        .map(|(op, m)| {
            let h = h.clone();
            async move {
                let r = match (&op, m) {
                    (&Op::SetNeighbour { ifindex, ip, mac }, _) => h
                        .neighbours()
                        .add(ifindex, ip)
                        .link_layer_address(&mac)
                        .state(NeighbourState::Permanent)
                        .replace()
                        .execute()
                        .await
                        .map_err(NetlinkError::rtnetlink(format!("set neighbour {ip}"))),
                    (&Op::SetFdb { ifindex, mac, dst }, _) => h
                        .neighbours()
                        .add_bridge(ifindex, &mac)
                        .destination(dst)
                        .flags(NeighbourFlags::Own)
                        .state(NeighbourState::Permanent)
                        .replace()
                        .execute()
                        .await
                        .map_err(NetlinkError::rtnetlink(format!(
                            "set FDB {mac:02x?} -> {dst}"
                        ))),
                    (Op::Delete(_), Some(m)) => h
                        .neighbours()
                        .del(m)
                        .execute()
                        .await
                        .map_err(NetlinkError::rtnetlink("delete a neighbour entry")),
                    (Op::Delete(_), None) => Ok(()),
                };
                (op, r)
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    for (op, r) in results {
        match (op, r) {
            (Op::Delete(_), Ok(())) => pass.deleted += 1,
            (Op::Delete(_), Err(_)) => {}
            (_, Ok(())) => pass.added += 1,
            (op, Err(e)) => pass.failures.push(set_failed(op, e)),
        }
    }
}

/// A set that failed: the kernel's refusal names the entry, its errno kept; a request
/// the kernel did not answer (the connection failed) is a netlink problem of the pass.
fn set_failed(op: Op, e: NetlinkError) -> Problem {
    match (op, e.errno()) {
        (Op::SetNeighbour { ip, .. }, Some(errno)) => {
            NeighbourProblem::NeighbourRefused { ip, errno }.into()
        }
        (Op::SetFdb { mac, dst, .. }, Some(errno)) => {
            NeighbourProblem::FdbRefused { mac, dst, errno }.into()
        }
        _ => Problem::Neighbours(e),
    }
}

#[cfg(test)]
#[path = "neigh_tests.rs"]
mod tests;
