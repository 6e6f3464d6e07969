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

/// One path to a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path {
    pub attrs: Arc<Attributes>,
    pub next_hop: Option<IpAddr>,
    pub source: Source,
    /// Kept for a restarting peer (RFC 4724) until it re-sends it or its time is up.
    pub stale: bool,
}

#[derive(Debug)]
struct PeerRoutes {
    info: PeerInfo,
    paths: PrefixMap<Path>,
}

/// The routing table.
#[derive(Debug)]
pub struct Rib {
    pub local_as: u32,
    pub router_id: Ipv4Addr,
    /// Set when we are a route reflector.
    pub cluster_id: Option<Ipv4Addr>,
    peers: HashMap<IpAddr, PeerRoutes>,
    local: BTreeSet<IpNet>,
    local_path: Path,
    best: PrefixMap<Path>,
    /// How many best paths each peer provides (kept as best paths change).
    best_count: HashMap<IpAddr, usize>,
}

/// Prefixes whose best path changed.
pub type Changed = BTreeSet<IpNet>;

const DEFAULT_LOCAL_PREF: u32 = 100;

impl Rib {
    pub fn new(local_as: u32, router_id: Ipv4Addr, cluster_id: Option<Ipv4Addr>) -> Rib {
        Rib {
            local_as,
            router_id,
            cluster_id,
            peers: HashMap::new(),
            local: BTreeSet::new(),
            local_path: Path {
                attrs: Arc::new(Attributes {
                    origin: Some(Origin::Igp),
                    as_path: Some(AsPath::default()),
                    ..Default::default()
                }),
                next_hop: None,
                source: Source::Local,
                stale: false,
            },
            best: PrefixMap::default(),
            best_count: HashMap::new(),
        }
    }

    /// A session came up (its stale routes, if any, stay until swept).
    pub fn peer_up(&mut self, info: PeerInfo) {
        match self.peers.get_mut(&info.address) {
            Some(p) => p.info = info,
            None => {
                self.peers.insert(
                    info.address,
                    PeerRoutes {
                        info,
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
        let changed: Changed = p.paths.keys().copied().collect();
        self.recompute_all(&changed)
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
        self.recompute_all(&all)
    }

    /// Drop a peer's routes that are still stale (its End-of-RIB came, or its time is up).
    pub fn sweep_stale(&mut self, address: &IpAddr) -> Changed {
        let Some(p) = self.peers.get_mut(address) else {
            return Changed::new();
        };
        let gone: Changed = p
            .paths
            .iter()
            .filter(|(_, path)| path.stale)
            .map(|(k, _)| *k)
            .collect();
        for k in &gone {
            p.paths.remove(k);
        }
        self.recompute_all(&gone)
    }

    /// Replace the prefixes this node originates.
    pub fn set_local(&mut self, prefixes: impl IntoIterator<Item = IpNet>) -> Changed {
        let new: BTreeSet<IpNet> = prefixes.into_iter().collect();
        let changed: Changed = new.symmetric_difference(&self.local).copied().collect();
        self.local = new;
        self.recompute_all(&changed)
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
        for w in withdrawn {
            if p.paths.remove(&w).is_some() {
                changed.insert(w);
            }
        }
        if !announced.is_empty() {
            let attrs = Arc::new(u.attrs.clone());
            let v6_nh = u
                .mp_reach
                .as_ref()
                .and_then(|m| m.next_hops.first().copied());
            for prefix in announced {
                let next_hop = match prefix {
                    IpNet::V4(_) => u.attrs.next_hop.map(IpAddr::V4),
                    IpNet::V6(_) => v6_nh,
                };
                p.paths.insert(
                    prefix,
                    Path {
                        attrs: attrs.clone(),
                        next_hop,
                        source: Source::Peer(*from),
                        stale: false,
                    },
                );
                changed.insert(prefix);
            }
        }
        self.recompute_all(&changed)
    }

    pub fn best(&self, prefix: &IpNet) -> Option<&Path> {
        self.best.get(prefix)
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

    fn recompute_all(&mut self, prefixes: &Changed) -> Changed {
        prefixes
            .iter()
            .filter(|p| self.recompute(p))
            .copied()
            .collect()
    }

    /// Re-run the decision for one prefix; true when its best path changed.
    fn recompute(&mut self, prefix: &IpNet) -> bool {
        let mut best: Option<&Path> = self.local.contains(prefix).then_some(&self.local_path);
        for p in self.peers.values() {
            if let Some(path) = p.paths.get(prefix)
                && best.is_none_or(|b| self.compare(path, b) == Ordering::Less)
            {
                best = Some(path);
            }
        }
        let best = best.cloned();
        let old = match &best {
            Some(b) => self.best.insert(*prefix, b.clone()),
            None => self.best.remove(prefix),
        };
        let source = |p: &Option<Path>| match p {
            Some(Path {
                source: Source::Peer(a),
                ..
            }) => Some(*a),
            _ => None,
        };
        let (was, is) = (source(&old), source(&best));
        if was != is {
            if let Some(a) = was
                && let Some(n) = self.best_count.get_mut(&a)
            {
                *n = n.saturating_sub(1);
            }
            if let Some(a) = is {
                *self.best_count.entry(a).or_default() += 1;
            }
        }
        old != best
    }

    fn info_of(&self, s: &Source) -> Option<&PeerInfo> {
        match s {
            Source::Local => None,
            Source::Peer(a) => self.peers.get(a).map(|p| &p.info),
        }
    }

    /// Less = `a` is preferred (RFC 4271 §9.1.2.2, RFC 4456 §9).
    pub fn compare(&self, a: &Path, b: &Path) -> Ordering {
        let local = |p: &Path| p.source == Source::Local;
        let (ia, ib) = (self.info_of(&a.source), self.info_of(&b.source));
        let lp = |p: &Path| p.attrs.local_pref.unwrap_or(DEFAULT_LOCAL_PREF);
        let plen = |p: &Path| p.attrs.as_path.as_ref().map_or(0, AsPath::path_len);
        let origin = |p: &Path| p.attrs.origin.unwrap_or(Origin::Incomplete);
        let ibgp = |i: Option<&PeerInfo>| i.is_some_and(|i| i.ibgp);
        let id = |p: &Path, i: Option<&PeerInfo>| {
            u32::from(
                p.attrs
                    .originator_id
                    .or(i.map(|i| i.router_id))
                    .unwrap_or(Ipv4Addr::UNSPECIFIED),
            )
        };
        local(b)
            .cmp(&local(a))
            .then(a.stale.cmp(&b.stale))
            .then(lp(b).cmp(&lp(a)))
            .then(plen(a).cmp(&plen(b)))
            .then(origin(a).cmp(&origin(b)))
            .then_with(|| {
                // MED only between routes from the same neighbouring AS.
                let (fa, fb) = (
                    a.attrs.as_path.as_ref().and_then(AsPath::first_as),
                    b.attrs.as_path.as_ref().and_then(AsPath::first_as),
                );
                if fa == fb {
                    a.attrs.med.unwrap_or(0).cmp(&b.attrs.med.unwrap_or(0))
                } else {
                    Ordering::Equal
                }
            })
            .then(ibgp(ia).cmp(&ibgp(ib)))
            .then(id(a, ia).cmp(&id(b, ib)))
            .then(a.attrs.cluster_list.len().cmp(&b.attrs.cluster_list.len()))
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
        let best = self.best.get(prefix)?;
        if !policy.permits(prefix) {
            return None;
        }
        let self_hop = match (prefix, to.local_address) {
            (IpNet::V4(_), IpAddr::V4(a)) => Some(IpAddr::V4(a)),
            (IpNet::V6(_), IpAddr::V6(a)) => Some(IpAddr::V6(a)),
            (IpNet::V6(_), _) => ipv6_next_hop.map(IpAddr::V6),
            _ => None,
        };
        let mut attrs = (*best.attrs).clone();
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
                    best.next_hop?
                } else if to.ibgp && to.keep_next_hop {
                    best.next_hop?
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
