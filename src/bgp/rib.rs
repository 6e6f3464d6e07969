//! Routes: Adj-RIB-In per peer, the Loc-RIB with the decision process (RFC 4271 §9.1.2.2,
//! with RFC 4456's ORIGINATOR_ID and CLUSTER_LIST tie-breaks), import loop checks, and the
//! export rules of REFERENCE §6 (only routes inside exportable pools; no iBGP re-export
//! unless we reflect; RFC 4456 reflection sets ORIGINATOR_ID and CLUSTER_LIST). Pure.

use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use ipnet::IpNet;

use super::config::ExportPolicy;
use super::update::{AsPath, Attributes, Origin, Update};

/// The hasher of prefix-keyed tables: a multiply-rotate over the key's words and a
/// murmur3 finaliser (several times cheaper than SipHash on these small keys, which matters
/// at a million routes). Keys are prefixes from configured peers, not from strangers.
#[derive(Debug, Default, Clone, Copy)]
pub struct PrefixHasher(u64);

impl PrefixHasher {
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl Hasher for PrefixHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(b));
        }
    }
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    fn finish(&self) -> u64 {
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}

/// A table keyed by prefix.
pub type PrefixMap<V> = HashMap<IpNet, V, BuildHasherDefault<PrefixHasher>>;

/// What the RIB knows of an established peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    pub address: IpAddr,
    pub router_id: Ipv4Addr,
    pub asn: u32,
    pub ibgp: bool,
    pub rr_client: bool,
    pub keep_next_hop: bool,
    /// Our address on the session (next hop "self").
    pub local_address: IpAddr,
}

/// Where a path came from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Source {
    /// Originated by this node (its blocks).
    Local,
    Peer(IpAddr),
}

/// What the routes of one UPDATE share: their attributes and next hop (one allocation
/// for all the prefixes of the message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteAttrs {
    pub attrs: Attributes,
    pub next_hop: Option<IpAddr>,
}

/// One path to a prefix, as the decision process and the exports see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path {
    pub route: Arc<RouteAttrs>,
    pub source: Source,
    /// Kept for a restarting peer (RFC 4724) until it re-sends it or its time is up.
    pub stale: bool,
}

impl Path {
    pub fn next_hop(&self) -> Option<IpAddr> {
        self.route.next_hop
    }
}

/// A stored path: its source is the table it sits in (16 bytes).
#[derive(Debug, Clone)]
struct Stored {
    route: Arc<RouteAttrs>,
    stale: bool,
}

#[derive(Debug)]
struct PeerRoutes {
    info: PeerInfo,
    /// This peer's number in `best` (0 is the local origin).
    slot: u16,
    paths: PrefixMap<Stored>,
}

/// A change of what the forwarding table should hold for a prefix: the learned next
/// hop before and after (None: no learned route).
pub type ForwardingChange = (IpNet, Option<IpAddr>, Option<IpAddr>);

/// The routing table.
#[derive(Debug)]
pub struct Rib {
    pub local_as: u32,
    pub router_id: Ipv4Addr,
    /// Set when we are a route reflector.
    pub cluster_id: Option<Ipv4Addr>,
    peers: HashMap<IpAddr, PeerRoutes>,
    /// Peer address of each slot.
    slots: Vec<Option<IpAddr>>,
    local: BTreeSet<IpNet>,
    local_route: Arc<RouteAttrs>,
    /// The winner of each prefix, by slot.
    best: PrefixMap<u16>,
    /// How many best paths each peer provides (kept as best paths change).
    best_count: HashMap<IpAddr, usize>,
    forwarding: Vec<ForwardingChange>,
}

/// Prefixes whose best path changed.
pub type Changed = BTreeSet<IpNet>;

const DEFAULT_LOCAL_PREF: u32 = 100;
const LOCAL_SLOT: u16 = 0;

impl Rib {
    pub fn new(local_as: u32, router_id: Ipv4Addr, cluster_id: Option<Ipv4Addr>) -> Rib {
        Rib {
            local_as,
            router_id,
            cluster_id,
            peers: HashMap::new(),
            slots: vec![None],
            local: BTreeSet::new(),
            local_route: Arc::new(RouteAttrs {
                attrs: Attributes {
                    origin: Some(Origin::Igp),
                    as_path: Some(AsPath::default()),
                    ..Default::default()
                },
                next_hop: None,
            }),
            best: PrefixMap::default(),
            best_count: HashMap::new(),
            forwarding: Vec::new(),
        }
    }

    /// A session came up (its stale routes, if any, stay until swept).
    pub fn peer_up(&mut self, info: PeerInfo) {
        match self.peers.get_mut(&info.address) {
            Some(p) => p.info = info,
            None => {
                let slot = match self.slots.iter().skip(1).position(Option::is_none) {
                    Some(i) => i + 1,
                    None => {
                        self.slots.push(None);
                        self.slots.len() - 1
                    }
                };
                self.slots[slot] = Some(info.address);
                self.peers.insert(
                    info.address,
                    PeerRoutes {
                        info,
                        slot: slot as u16,
                        paths: PrefixMap::default(),
                    },
                );
            }
        }
    }

    pub fn peer(&self, address: &IpAddr) -> Option<&PeerInfo> {
        self.peers.get(address).map(|p| &p.info)
    }

    pub fn peers(&self) -> impl Iterator<Item = &PeerInfo> {
        self.peers.values().map(|p| &p.info)
    }

    /// Forget a peer and its routes.
    pub fn peer_down(&mut self, address: &IpAddr) -> Changed {
        let Some(p) = self.peers.remove(address) else {
            return Changed::new();
        };
        self.slots[usize::from(p.slot)] = None;
        self.best_count.remove(address);
        let changed: Changed = p.paths.keys().copied().collect();
        self.recompute_all(&changed, Some((p.slot, &p.paths)))
    }

    /// Keep a restarting peer's routes, marked stale (RFC 4724 §4.2).
    pub fn mark_stale(&mut self, address: &IpAddr) -> Changed {
        let Some(p) = self.peers.get_mut(address) else {
            return Changed::new();
        };
        for path in p.paths.values_mut() {
            path.stale = true;
        }
        let all: Changed = p.paths.keys().copied().collect();
        self.recompute_all(&all, None)
    }

    /// Drop a peer's routes that are still stale (its End-of-RIB came, or its time is up).
    pub fn sweep_stale(&mut self, address: &IpAddr) -> Changed {
        let Some(p) = self.peers.get_mut(address) else {
            return Changed::new();
        };
        let mut gone = PrefixMap::default();
        p.paths.retain(|k, path| {
            if path.stale {
                gone.insert(*k, path.clone());
            }
            !path.stale
        });
        let slot = p.slot;
        let changed: Changed = gone.keys().copied().collect();
        self.recompute_all(&changed, Some((slot, &gone)))
    }

    /// Replace the prefixes this node originates.
    pub fn set_local(&mut self, prefixes: impl IntoIterator<Item = IpNet>) -> Changed {
        let new: BTreeSet<IpNet> = prefixes.into_iter().collect();
        let changed: Changed = new.symmetric_difference(&self.local).copied().collect();
        self.local = new;
        self.recompute_all(&changed, None)
    }

    /// Apply a peer's UPDATE (RFC 7606 treat-as-withdraw included). Routes failing the
    /// loop checks (our AS in an eBGP path, our router ID as ORIGINATOR_ID, our cluster ID
    /// in CLUSTER_LIST) are taken as withdrawn.
    pub fn apply_update(&mut self, from: &IpAddr, u: &Update) -> Changed {
        let Some(p) = self.peers.get_mut(from) else {
            return Changed::new();
        };
        let (mut announced, mut withdrawn) = u.effective();
        let looped = (!p.info.ibgp
            && u.attrs
                .as_path
                .as_ref()
                .is_some_and(|a| a.contains(self.local_as)))
            || u.attrs.originator_id == Some(self.router_id)
            || self
                .cluster_id
                .is_some_and(|c| u.attrs.cluster_list.contains(&c));
        if looped {
            withdrawn.append(&mut announced);
        }
        let mut changed = Changed::new();
        let mut removed = PrefixMap::default();
        for w in withdrawn {
            if let Some(old) = p.paths.remove(&w) {
                removed.insert(w, old);
                changed.insert(w);
            }
        }
        if !announced.is_empty() {
            let v6_nh = u
                .mp_reach
                .as_ref()
                .and_then(|m| m.next_hops.first().copied());
            let v4 = Arc::new(RouteAttrs {
                attrs: u.attrs.clone(),
                next_hop: u.attrs.next_hop.map(IpAddr::V4),
            });
            let v6 = Arc::new(RouteAttrs {
                attrs: u.attrs.clone(),
                next_hop: v6_nh,
            });
            for prefix in announced {
                let route = match prefix {
                    IpNet::V4(_) => v4.clone(),
                    IpNet::V6(_) => v6.clone(),
                };
                if let Some(old) = p.paths.insert(
                    prefix,
                    Stored {
                        route,
                        stale: false,
                    },
                ) {
                    // What it replaced is what the old best may have been.
                    removed.insert(prefix, old);
                }
                changed.insert(prefix);
            }
        }
        let slot = p.slot;
        self.recompute_all(&changed, Some((slot, &removed)))
    }

    /// The forwarding changes since the last call (learned best routes, for Felix).
    pub fn take_forwarding_changes(&mut self) -> Vec<ForwardingChange> {
        std::mem::take(&mut self.forwarding)
    }

    /// The best path of a prefix.
    pub fn best(&self, prefix: &IpNet) -> Option<Path> {
        let slot = *self.best.get(prefix)?;
        self.path_of(slot, prefix)
    }

    fn path_of(&self, slot: u16, prefix: &IpNet) -> Option<Path> {
        if slot == LOCAL_SLOT {
            return Some(Path {
                route: self.local_route.clone(),
                source: Source::Local,
                stale: false,
            });
        }
        let addr = self.slots.get(usize::from(slot)).copied().flatten()?;
        let stored = self.peers.get(&addr)?.paths.get(prefix)?;
        Some(Path {
            route: stored.route.clone(),
            source: Source::Peer(addr),
            stale: stored.stale,
        })
    }

    /// The learned next hop the forwarding table should use for a prefix.
    fn learned_next_hop(
        &self,
        slot: Option<u16>,
        prefix: &IpNet,
        gone: Option<(u16, &PrefixMap<Stored>)>,
    ) -> Option<IpAddr> {
        let slot = slot.filter(|s| *s != LOCAL_SLOT)?;
        if let Some((gs, paths)) = gone
            && gs == slot
            && let Some(p) = paths.get(prefix)
        {
            return p.route.next_hop;
        }
        let addr = self.slots.get(usize::from(slot)).copied().flatten()?;
        self.peers.get(&addr)?.paths.get(prefix)?.route.next_hop
    }

    pub fn best_prefixes(&self) -> impl Iterator<Item = &IpNet> {
        self.best.keys()
    }

    /// Number of paths received from a peer.
    pub fn received(&self, address: &IpAddr) -> usize {
        self.peers.get(address).map_or(0, |p| p.paths.len())
    }

    /// Number of a peer's paths that are the best.
    pub fn accepted(&self, address: &IpAddr) -> usize {
        self.best_count.get(address).copied().unwrap_or(0)
    }

    /// Re-run the decision for `prefixes`. `gone` holds paths just removed from a slot
    /// (what the forwarding table had may have been one of them).
    fn recompute_all(
        &mut self,
        prefixes: &Changed,
        gone: Option<(u16, &PrefixMap<Stored>)>,
    ) -> Changed {
        let mut changed = Changed::new();
        for p in prefixes {
            if self.recompute(p, gone) {
                changed.insert(*p);
            }
        }
        changed
    }

    /// Re-run the decision for one prefix; true when its best path changed.
    fn recompute(&mut self, prefix: &IpNet, gone: Option<(u16, &PrefixMap<Stored>)>) -> bool {
        let old_slot = self.best.get(prefix).copied();
        let old_nh = self.learned_next_hop(old_slot, prefix, gone);
        let old_path = old_slot.and_then(|s| {
            if let Some((gs, paths)) = gone
                && gs == s
            {
                let st = paths.get(prefix)?;
                return Some((st.route.clone(), st.stale));
            }
            self.path_of(s, prefix).map(|p| (p.route, p.stale))
        });
        let mut best: Option<Path> = self.local.contains(prefix).then(|| Path {
            route: self.local_route.clone(),
            source: Source::Local,
            stale: false,
        });
        let mut best_slot = best.as_ref().map(|_| LOCAL_SLOT);
        for p in self.peers.values() {
            if let Some(st) = p.paths.get(prefix) {
                let path = Path {
                    route: st.route.clone(),
                    source: Source::Peer(p.info.address),
                    stale: st.stale,
                };
                if best
                    .as_ref()
                    .is_none_or(|b| self.compare(&path, b) == Ordering::Less)
                {
                    best = Some(path);
                    best_slot = Some(p.slot);
                }
            }
        }
        match best_slot {
            Some(s) => {
                self.best.insert(*prefix, s);
            }
            None => {
                self.best.remove(prefix);
            }
        }
        let addr_of = |s: Option<u16>| {
            s.filter(|s| *s != LOCAL_SLOT)
                .and_then(|s| self.slots.get(usize::from(s)).copied().flatten())
        };
        let (was, is) = (addr_of(old_slot), addr_of(best_slot));
        if old_slot != best_slot {
            if let Some(a) = was
                && let Some(n) = self.best_count.get_mut(&a)
            {
                *n = n.saturating_sub(1);
            }
            if let Some(a) = is {
                *self.best_count.entry(a).or_default() += 1;
            }
        }
        let new_nh = best
            .as_ref()
            .filter(|b| b.source != Source::Local)
            .and_then(Path::next_hop);
        if old_nh != new_nh {
            self.forwarding.push((*prefix, old_nh, new_nh));
        }
        let new_path = best.map(|b| (b.route, b.stale));
        old_slot != best_slot || old_path != new_path
    }

    /// Less = `a` is preferred (RFC 4271 §9.1.2.2, RFC 4456 §9).
    pub fn compare(&self, a: &Path, b: &Path) -> Ordering {
        let local = |p: &Path| p.source == Source::Local;
        let info = |p: &Path| match &p.source {
            Source::Local => None,
            Source::Peer(addr) => self.peers.get(addr).map(|p| &p.info),
        };
        let (ia, ib) = (info(a), info(b));
        let (aa, ba) = (&a.route.attrs, &b.route.attrs);
        let lp = |x: &Attributes| x.local_pref.unwrap_or(DEFAULT_LOCAL_PREF);
        let plen = |x: &Attributes| x.as_path.as_ref().map_or(0, AsPath::path_len);
        let origin = |x: &Attributes| x.origin.unwrap_or(Origin::Incomplete);
        let ibgp = |i: Option<&PeerInfo>| i.is_some_and(|i| i.ibgp);
        let id = |x: &Attributes, i: Option<&PeerInfo>| {
            u32::from(
                x.originator_id
                    .or(i.map(|i| i.router_id))
                    .unwrap_or(Ipv4Addr::UNSPECIFIED),
            )
        };
        local(b)
            .cmp(&local(a))
            .then(a.stale.cmp(&b.stale))
            .then(lp(ba).cmp(&lp(aa)))
            .then(plen(aa).cmp(&plen(ba)))
            .then(origin(aa).cmp(&origin(ba)))
            .then_with(|| {
                // MED only between routes from the same neighbouring AS.
                let (fa, fb) = (
                    aa.as_path.as_ref().and_then(AsPath::first_as),
                    ba.as_path.as_ref().and_then(AsPath::first_as),
                );
                if fa == fb {
                    aa.med.unwrap_or(0).cmp(&ba.med.unwrap_or(0))
                } else {
                    Ordering::Equal
                }
            })
            .then(ibgp(ia).cmp(&ibgp(ib)))
            .then(id(aa, ia).cmp(&id(ba, ib)))
            .then(aa.cluster_list.len().cmp(&ba.cluster_list.len()))
            .then_with(|| match (&a.source, &b.source) {
                (Source::Peer(x), Source::Peer(y)) => x.cmp(y),
                _ => Ordering::Equal,
            })
    }

    /// What we announce to `to` for `prefix` (attributes and next hop), or None when
    /// the route is not for that peer.
    pub fn export(
        &self,
        to: &PeerInfo,
        prefix: &IpNet,
        policy: &ExportPolicy,
        ipv6_next_hop: Option<Ipv6Addr>,
    ) -> Option<(Attributes, IpAddr)> {
        if !policy.permits(prefix) {
            return None;
        }
        let best = self.best(prefix)?;
        let self_hop = match (prefix, to.local_address) {
            (IpNet::V4(_), IpAddr::V4(a)) => Some(IpAddr::V4(a)),
            (IpNet::V6(_), IpAddr::V6(a)) => Some(IpAddr::V6(a)),
            (IpNet::V6(_), _) => ipv6_next_hop.map(IpAddr::V6),
            _ => None,
        };
        let mut attrs = best.route.attrs.clone();
        let next_hop = match &best.source {
            Source::Local => self_hop?,
            Source::Peer(src) => {
                if *src == to.address {
                    return None;
                }
                let from = self.peers.get(src).map(|p| &p.info)?;
                if from.ibgp && to.ibgp {
                    let cluster = self.cluster_id?;
                    if !(from.rr_client || to.rr_client) {
                        return None;
                    }
                    attrs.originator_id.get_or_insert(from.router_id);
                    attrs.cluster_list.insert(0, cluster);
                    best.next_hop()?
                } else if to.ibgp && to.keep_next_hop {
                    best.next_hop()?
                } else {
                    self_hop?
                }
            }
        };
        if to.ibgp {
            attrs.local_pref.get_or_insert(DEFAULT_LOCAL_PREF);
        } else {
            let path = attrs.as_path.take().unwrap_or_default();
            attrs.as_path = Some(path.prepend(self.local_as));
            attrs.local_pref = None;
            attrs.originator_id = None;
            attrs.cluster_list.clear();
            if best.source != Source::Local {
                attrs.med = None;
            }
        }
        attrs.next_hop = None;
        Some((attrs, next_hop))
    }
}

#[cfg(test)]
#[path = "rib_tests.rs"]
mod tests;
