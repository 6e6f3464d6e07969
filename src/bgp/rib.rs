//! Routes: Adj-RIB-In per peer, the Loc-RIB with the decision process (RFC 4271 §9.1.2.2,
//! with RFC 4456's ORIGINATOR_ID and CLUSTER_LIST tie-breaks), import loop checks, and the
//! export rules of REFERENCE §6 (only routes inside exportable pools; no iBGP re-export
//! unless we reflect; RFC 4456 reflection sets ORIGINATOR_ID and CLUSTER_LIST). Pure.

use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::config::ExportPolicy;
use super::openmap::{OpenMap, Slot};
use super::update::{AsPath, Attributes, Origin, Update};

// The prefix-keyed tables live in the ground-level `crate::prefix_map` (Felix uses them
// too); re-exported here for the code that still names them through the RIB.

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

/// A path as stored: its attribute set (an index in `Shared`), the peer's slot and its
/// stale mark (8 bytes).
#[derive(Debug, Clone, Copy)]
struct Held {
    route: u32,
    slot: u16,
    stale: bool,
}

/// The attribute sets of the held paths (one per UPDATE), each with the number of paths
/// holding it. Counted here, without atomics: an `Arc` clone per route is a locked
/// increment, which waits until the previous insert's stores (cache misses) have retired;
/// at a million routes that was a quarter of the receive CPU.
#[derive(Debug, Default)]
struct Shared {
    sets: Vec<(Option<Arc<RouteAttrs>>, u32)>,
    free: Vec<u32>,
}

impl Shared {
    /// A new set, held by no path yet.
    fn add(&mut self, route: Arc<RouteAttrs>) -> u32 {
        match self.free.pop() {
            Some(i) => {
                self.sets[i as usize] = (Some(route), 0);
                i
            }
            None => {
                self.sets.push((Some(route), 0));
                u32::try_from(self.sets.len() - 1).expect("fewer than 2^32 attribute sets")
            }
        }
    }

    fn get(&self, i: u32) -> &Arc<RouteAttrs> {
        self.sets[i as usize]
            .0
            .as_ref()
            .expect("a held attribute set")
    }

    fn hold(&mut self, i: u32) {
        self.sets[i as usize].1 += 1;
    }

    /// One path lets go of the set.
    fn release(&mut self, i: u32) {
        self.sets[i as usize].1 -= 1;
        self.drop_unheld(i);
    }

    /// Free the set if no path holds it.
    fn drop_unheld(&mut self, i: u32) {
        let s = &mut self.sets[i as usize];
        if s.1 == 0 && s.0.is_some() {
            s.0 = None;
            self.free.push(i);
        }
    }
}

/// The learned paths to one prefix, best first: mostly one (inline), else a list in
/// `Lists`. 8 bytes, so an IPv4 table slot is 16.
#[derive(Debug, Clone, Copy)]
enum Entry {
    Empty,
    One(Held),
    Many(u32),
}

const _: () = assert!(std::mem::size_of::<Entry>() == 8);
const _: () = assert!(std::mem::size_of::<Option<(u64, Entry)>>() == 16);

/// The path lists of prefixes with more than one path (each used by one entry), and the
/// free ones.
#[derive(Debug, Default)]
struct Lists {
    lists: Vec<Vec<Held>>,
    free: Vec<u32>,
}

impl Lists {
    fn add(&mut self, paths: Vec<Held>) -> u32 {
        match self.free.pop() {
            Some(i) => {
                self.lists[i as usize] = paths;
                i
            }
            None => {
                self.lists.push(paths);
                u32::try_from(self.lists.len() - 1).expect("fewer than 2^32 path lists")
            }
        }
    }

    fn release(&mut self, i: u32) {
        self.lists[i as usize] = Vec::new();
        self.free.push(i);
    }
}

impl Entry {
    fn paths<'a>(&'a self, lists: &'a Lists) -> &'a [Held] {
        match self {
            Entry::Empty => &[],
            Entry::One(h) => std::slice::from_ref(h),
            Entry::Many(i) => &lists.lists[*i as usize],
        }
    }

    fn best(&self, lists: &Lists) -> Option<Held> {
        self.paths(lists).first().copied()
    }

    fn get(&self, lists: &Lists, slot: u16) -> Option<Held> {
        self.paths(lists).iter().find(|h| h.slot == slot).copied()
    }

    fn get_mut<'a>(&'a mut self, lists: &'a mut Lists, slot: u16) -> Option<&'a mut Held> {
        match self {
            Entry::Empty => None,
            Entry::One(h) => Some(h).filter(|h| h.slot == slot),
            Entry::Many(i) => lists.lists[*i as usize].iter_mut().find(|h| h.slot == slot),
        }
    }

    /// Put a slot's path in; the one it replaced.
    fn put(&mut self, lists: &mut Lists, h: Held) -> Option<Held> {
        match self {
            Entry::Empty => {
                *self = Entry::One(h);
                None
            }
            Entry::One(o) if o.slot == h.slot => Some(std::mem::replace(o, h)),
            Entry::One(o) => {
                *self = Entry::Many(lists.add(vec![*o, h]));
                None
            }
            Entry::Many(i) => {
                let v = &mut lists.lists[*i as usize];
                match v.iter_mut().find(|x| x.slot == h.slot) {
                    Some(x) => Some(std::mem::replace(x, h)),
                    None => {
                        v.push(h);
                        None
                    }
                }
            }
        }
    }

    /// Take a slot's path out.
    fn take(&mut self, lists: &mut Lists, slot: u16) -> Option<Held> {
        match *self {
            Entry::One(o) if o.slot == slot => {
                *self = Entry::Empty;
                Some(o)
            }
            Entry::Many(i) => {
                let v = &mut lists.lists[i as usize];
                let at = v.iter().position(|h| h.slot == slot)?;
                let h = v.remove(at);
                if v.len() == 1 {
                    *self = Entry::One(v[0]);
                    lists.release(i);
                }
                Some(h)
            }
            _ => None,
        }
    }

    /// Move the preferred path to the front.
    fn rebest(&self, lists: &mut Lists, cmp: impl Fn(&Held, &Held) -> Ordering) {
        if let Entry::Many(i) = self {
            let v = &mut lists.lists[*i as usize];
            let mut best = 0;
            for i in 1..v.len() {
                if cmp(&v[i], &v[best]) == Ordering::Less {
                    best = i;
                }
            }
            v.swap(0, best);
        }
    }
}

/// What is done to one prefix's paths.
#[derive(Debug, Clone)]
enum Op {
    Put(Held),
    Remove(u16),
    MarkStale(u16),
    /// Remove the slot's path if it is still stale.
    Sweep(u16),
}

impl Op {
    fn slot(&self) -> u16 {
        match self {
            Op::Put(h) => h.slot,
            Op::Remove(s) | Op::MarkStale(s) | Op::Sweep(s) => *s,
        }
    }
}

/// How a slot's path counts moved.
#[derive(Debug, Default, Clone, Copy)]
struct Delta {
    paths: isize,
    stale: isize,
}

impl Delta {
    fn gone(h: Option<&Held>) -> Delta {
        Delta {
            paths: -isize::from(h.is_some()),
            stale: -isize::from(h.is_some_and(|h| h.stale)),
        }
    }
}

/// Apply `op` to an entry and re-choose its best path; the path that left, if one did.
fn change(
    e: &mut Entry,
    lists: &mut Lists,
    op: Op,
    cmp: impl Fn(&Held, &Held) -> Ordering,
) -> (Delta, Option<Held>) {
    let (delta, gone) = match op {
        Op::Put(h) => {
            let stale = isize::from(h.stale);
            let old = e.put(lists, h);
            let gone = Delta::gone(old.as_ref());
            let delta = Delta {
                paths: 1 + gone.paths,
                stale: stale + gone.stale,
            };
            (delta, old)
        }
        Op::Remove(slot) => {
            let old = e.take(lists, slot);
            (Delta::gone(old.as_ref()), old)
        }
        Op::MarkStale(slot) => match e.get_mut(lists, slot) {
            Some(h) if !h.stale => {
                h.stale = true;
                (Delta { paths: 0, stale: 1 }, None)
            }
            _ => (Delta::default(), None),
        },
        Op::Sweep(slot) => {
            if e.get(lists, slot).is_some_and(|h| h.stale) {
                let old = e.take(lists, slot);
                (Delta::gone(old.as_ref()), old)
            } else {
                (Delta::default(), None)
            }
        }
    };
    e.rebest(lists, cmp);
    (delta, gone)
}

/// Apply `op` to `key`'s entry (created by a put, removed when its last path goes), then
/// hand `then` its best path before and after, and how many paths the slot gained. Also
/// returns the path that left, for its attribute set to be released.
fn edit<K: Copy + std::hash::Hash + Eq, R>(
    map: &mut OpenMap<K, Entry>,
    lists: &mut Lists,
    key: K,
    op: Op,
    cmp: impl Fn(&Held, &Held) -> Ordering,
    then: impl FnOnce(Option<&Held>, Option<&Held>, Delta) -> R,
) -> (R, Option<Held>) {
    let at = match op {
        Op::Put(h) => match map.slot(&key) {
            Slot::Vacant(i) => {
                // Before the put: reading the new slot back would wait for its cache line.
                let delta = Delta {
                    paths: 1,
                    stale: isize::from(h.stale),
                };
                let r = then(None, Some(&h), delta);
                map.put(i, key, Entry::One(h));
                return (r, None);
            }
            Slot::Found(i) => i,
        },
        _ => match map.find(&key) {
            Some(i) => i,
            None => return (then(None, None, Delta::default()), None),
        },
    };
    let e = map.at_mut(at);
    let before = e.best(lists);
    let (delta, gone) = change(e, lists, op, cmp);
    let after = e.best(lists);
    let r = then(before.as_ref(), after.as_ref(), delta);
    if after.is_none() {
        map.remove_at(at);
    }
    (r, gone)
}

/// An IPv4 prefix as a table key: address and length in one word.
fn key4(n: &Ipv4Net) -> u64 {
    (u64::from(u32::from(n.addr())) << 8) | u64::from(n.prefix_len())
}

fn net4(k: u64) -> IpNet {
    IpNet::V4(Ipv4Net::new(Ipv4Addr::from((k >> 8) as u32), (k & 0xff) as u8).expect("valid key"))
}

/// Prefixes to their learned paths; IPv4 keys packed in 8 bytes.
#[derive(Debug, Default)]
struct Table {
    v4: OpenMap<u64, Entry>,
    v6: OpenMap<Ipv6Net, Entry>,
}

impl Table {
    fn get(&self, prefix: &IpNet) -> Option<&Entry> {
        match prefix {
            IpNet::V4(n) => self.v4.get(&key4(n)),
            IpNet::V6(n) => self.v6.get(n),
        }
    }

    fn prefetch(&self, prefix: &IpNet) {
        match prefix {
            IpNet::V4(n) => self.v4.prefetch(&key4(n)),
            IpNet::V6(n) => self.v6.prefetch(n),
        }
    }

    fn keys(&self) -> impl Iterator<Item = IpNet> + '_ {
        let v4 = self.v4.iter().map(|(k, _)| net4(*k));
        v4.chain(self.v6.iter().map(|(n, _)| IpNet::V6(*n)))
    }
}

/// Per-peer counters.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    received: usize,
    accepted: usize,
    stale: usize,
}

impl Counts {
    fn add(&mut self, d: Delta) {
        self.received = self.received.saturating_add_signed(d.paths);
        self.stale = self.stale.saturating_add_signed(d.stale);
    }
}

/// Book-keeping for one prefix whose best learned path went from `before` to `after`:
/// accepted counts, forwarding changes; true when the best path changed.
fn record(
    counts: &mut [Counts],
    forwarding: &mut Vec<ForwardingChange>,
    shared: &Shared,
    prefix: IpNet,
    before: Option<&Held>,
    after: Option<&Held>,
) -> bool {
    let (bs, is) = (before.map(|h| h.slot), after.map(|h| h.slot));
    if bs != is {
        if let Some(c) = bs.and_then(|s| counts.get_mut(usize::from(s))) {
            c.accepted = c.accepted.saturating_sub(1);
        }
        if let Some(c) = is.and_then(|s| counts.get_mut(usize::from(s))) {
            c.accepted += 1;
        }
    }
    let next_hop = |h: Option<&Held>| h.and_then(|h| shared.get(h.route).next_hop);
    let (bn, an) = (next_hop(before), next_hop(after));
    if bn != an {
        forwarding.push((prefix, bn, an));
    }
    match (before, after) {
        (Some(b), Some(a)) => {
            b.slot != a.slot
                || b.stale != a.stale
                || (b.route != a.route && shared.get(b.route) != shared.get(a.route))
        }
        (None, None) => false,
        _ => true,
    }
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
    /// Each slot's peer (slot 0 is the local origin, never a peer).
    peers: Vec<Option<PeerInfo>>,
    counts: Vec<Counts>,
    /// Each peer's slot (for its prefixes without path identifiers).
    by_addr: HashMap<IpAddr, u16>,
    /// More slots of a peer, one per path identifier it sent (RFC 7911): each of its paths
    /// to a prefix is a candidate of its own.
    by_path: HashMap<(IpAddr, u32), u16>,
    /// Prefixes this node originates: their best path is always the local one.
    local: BTreeSet<IpNet>,
    local_route: Arc<RouteAttrs>,
    table: Table,
    shared: Shared,
    lists: Lists,
    forwarding: Vec<ForwardingChange>,
}

/// Prefixes whose best path changed.
pub type Changed = Vec<IpNet>;

const DEFAULT_LOCAL_PREF: u32 = 100;

/// Most path identifiers (RFC 7911) kept from one peer; paths with further ones are
/// ignored. Calico's reflectors send one per source of a prefix.
pub const MAX_PATH_IDS: usize = 64;

/// How many prefixes of an UPDATE ahead of the one being applied its table slot is
/// prefetched.
const PREFETCH_AHEAD: usize = 8;

impl Rib {
    pub fn new(local_as: u32, router_id: Ipv4Addr, cluster_id: Option<Ipv4Addr>) -> Rib {
        Rib {
            local_as,
            router_id,
            cluster_id,
            peers: vec![None],
            counts: vec![Counts::default()],
            by_addr: HashMap::new(),
            by_path: HashMap::new(),
            local: BTreeSet::new(),
            local_route: Arc::new(RouteAttrs {
                attrs: Attributes {
                    origin: Some(Origin::Igp),
                    as_path: Some(AsPath::default()),
                    ..Default::default()
                },
                next_hop: None,
            }),
            table: Table::default(),
            shared: Shared::default(),
            lists: Lists::default(),
            forwarding: Vec::new(),
        }
    }

    /// A session came up (its stale routes, if any, stay until swept).
    pub fn peer_up(&mut self, info: PeerInfo) {
        if let Some(&slot) = self.by_addr.get(&info.address) {
            for s in self.slots_of(&info.address) {
                self.peers[usize::from(s)] = Some(info.clone());
            }
            self.peers[usize::from(slot)] = Some(info);
            return;
        }
        let slot = self.new_slot(info.clone());
        self.by_addr.insert(info.address, slot);
    }

    /// A free slot for `info`'s paths, counts zeroed.
    fn new_slot(&mut self, info: PeerInfo) -> u16 {
        let slot = match self.peers.iter().skip(1).position(Option::is_none) {
            Some(i) => i + 1,
            None => {
                self.peers.push(None);
                self.counts.push(Counts::default());
                self.peers.len() - 1
            }
        };
        self.peers[slot] = Some(info);
        self.counts[slot] = Counts::default();
        u16::try_from(slot).expect("fewer than 65536 paths per prefix source")
    }

    /// Every slot of a peer: its own and one per path identifier.
    fn slots_of(&self, address: &IpAddr) -> Vec<u16> {
        let extra = self.by_path.iter().filter(|((a, _), _)| a == address);
        let mut slots: Vec<u16> = self.by_addr.get(address).into_iter().copied().collect();
        slots.extend(extra.map(|(_, s)| *s));
        slots
    }

    /// The slot of a peer's path with identifier `id` (its own slot without one), made on
    /// first use; None past `MAX_PATH_IDS` identifiers from one peer.
    fn path_slot(&mut self, slot: u16, address: &IpAddr, id: Option<u32>) -> Option<u16> {
        let Some(id) = id else {
            return Some(slot);
        };
        if let Some(s) = self.by_path.get(&(*address, id)) {
            return Some(*s);
        }
        if self.by_path.keys().filter(|(a, _)| a == address).count() >= MAX_PATH_IDS {
            return None;
        }
        let info = self.peers[usize::from(slot)].clone()?;
        let s = self.new_slot(info);
        self.by_path.insert((*address, id), s);
        Some(s)
    }

    pub fn peer(&self, address: &IpAddr) -> Option<&PeerInfo> {
        let slot = *self.by_addr.get(address)?;
        self.peers[usize::from(slot)].as_ref()
    }

    pub fn peers(&self) -> impl Iterator<Item = &PeerInfo> {
        self.peers.iter().flatten()
    }

    /// Forget a peer and its routes.
    pub fn peer_down(&mut self, address: &IpAddr) -> Changed {
        let slots = self.slots_of(address);
        let changed = self.for_each_slot(&slots, Op::Remove);
        for s in slots {
            self.peers[usize::from(s)] = None;
            self.counts[usize::from(s)] = Counts::default();
        }
        self.by_addr.remove(address);
        self.by_path.retain(|(a, _), _| a != address);
        changed
    }

    /// Keep a restarting peer's routes, marked stale (RFC 4724 §4.2).
    pub fn mark_stale(&mut self, address: &IpAddr) -> Changed {
        self.for_each_slot(&self.slots_of(address), Op::MarkStale)
    }

    /// Drop a peer's routes that are still stale (its End-of-RIB came, or its time is up).
    pub fn sweep_stale(&mut self, address: &IpAddr) -> Changed {
        self.for_each_slot(&self.slots_of(address), Op::Sweep)
    }

    /// `for_all` for each of `slots`; each changed prefix once.
    fn for_each_slot(&mut self, slots: &[u16], op: fn(u16) -> Op) -> Changed {
        let mut changed = Changed::new();
        for s in slots {
            changed.extend(self.for_all(op(*s)));
        }
        if slots.len() > 1 {
            changed.sort();
            changed.dedup();
        }
        changed
    }

    /// Apply a per-slot `op` to every prefix that has a path from that slot.
    fn for_all(&mut self, op: Op) -> Changed {
        let slot = op.slot();
        let c = self.counts[usize::from(slot)];
        if c.received == 0 || (matches!(op, Op::Sweep(_)) && c.stale == 0) {
            return Changed::new();
        }
        let Rib {
            peers,
            counts,
            local,
            table,
            forwarding,
            shared,
            lists,
            ..
        } = self;
        let mut changed = Changed::new();
        let mut gone = Vec::new();
        let mut each = |prefix: IpNet, e: &mut Entry| -> bool {
            if e.get(lists, slot).is_none() {
                return true;
            }
            let before = e.best(lists);
            let cmp = |a: &Held, b: &Held| compare(peers, shared, a, b);
            let (delta, left) = change(e, lists, op.clone(), cmp);
            gone.extend(left.map(|h| h.route));
            let after = e.best(lists);
            counts[usize::from(slot)].add(delta);
            if !local.contains(&prefix)
                && record(
                    counts,
                    forwarding,
                    shared,
                    prefix,
                    before.as_ref(),
                    after.as_ref(),
                )
            {
                changed.push(prefix);
            }
            after.is_some()
        };
        table.v4.retain(|k, e| each(net4(*k), e));
        table.v6.retain(|k, e| each(IpNet::V6(*k), e));
        for route in gone {
            shared.release(route);
        }
        changed
    }

    /// Apply `op` to one prefix; true when its best path changed.
    fn one(&mut self, prefix: IpNet, op: Op) -> bool {
        let slot = usize::from(op.slot());
        let Rib {
            peers,
            counts,
            local,
            table,
            forwarding,
            shared,
            lists,
            ..
        } = self;
        if let Op::Put(h) = &op {
            shared.hold(h.route);
        }
        let held = &*shared;
        let cmp = |a: &Held, b: &Held| compare(peers, held, a, b);
        // The local path wins either way.
        let is_local = !local.is_empty() && local.contains(&prefix);
        let then = |before: Option<&Held>, after: Option<&Held>, delta: Delta| {
            counts[slot].add(delta);
            !is_local && record(counts, forwarding, held, prefix, before, after)
        };
        let (changed, gone) = match &prefix {
            IpNet::V4(n) => edit(&mut table.v4, lists, key4(n), op, cmp, then),
            IpNet::V6(n) => edit(&mut table.v6, lists, *n, op, cmp, then),
        };
        if let Some(h) = gone {
            shared.release(h.route);
        }
        changed
    }

    /// Replace the prefixes this node originates.
    pub fn set_local(&mut self, prefixes: impl IntoIterator<Item = IpNet>) -> Changed {
        let new: BTreeSet<IpNet> = prefixes.into_iter().collect();
        let changed: Changed = new.symmetric_difference(&self.local).copied().collect();
        for p in &changed {
            let learned = self.table.get(p).and_then(|e| e.best(&self.lists));
            let (before, after) = if new.contains(p) {
                (learned, None)
            } else {
                (None, learned)
            };
            record(
                &mut self.counts,
                &mut self.forwarding,
                &self.shared,
                *p,
                before.as_ref(),
                after.as_ref(),
            );
        }
        self.local = new;
        changed
    }

    /// Apply a peer's UPDATE (RFC 7606 treat-as-withdraw included). Routes failing the
    /// loop checks (our AS in an eBGP path, our router ID as ORIGINATOR_ID, our cluster ID
    /// in CLUSTER_LIST) are taken as withdrawn.
    pub fn apply_update(&mut self, from: &IpAddr, u: &Update) -> Changed {
        let Some(&slot) = self.by_addr.get(from) else {
            return Changed::new();
        };
        let Some(info) = &self.peers[usize::from(slot)] else {
            return Changed::new();
        };
        let looped = (!info.ibgp
            && u.attrs
                .as_path
                .as_ref()
                .is_some_and(|a| a.contains(self.local_as)))
            || u.attrs.originator_id == Some(self.router_id)
            || self
                .cluster_id
                .is_some_and(|c| u.attrs.cluster_list.contains(&c));
        // Each prefix with its path identifier, if the session carries them.
        fn with_ids<'a>(
            nets: &'a [IpNet],
            ids: &'a [u32],
        ) -> impl Iterator<Item = (&'a IpNet, Option<u32>)> + Clone + 'a {
            nets.iter()
                .enumerate()
                .map(|(i, n)| (n, ids.get(i).copied()))
        }
        let ids = &u.path_ids;
        let withdrawn = with_ids(&u.withdrawn, &ids.withdrawn).chain(
            u.mp_unreach
                .iter()
                .flat_map(|m| with_ids(&m.withdrawn, &ids.mp_unreach)),
        );
        let announced = with_ids(&u.nlri, &ids.nlri).chain(
            u.mp_reach
                .iter()
                .flat_map(|m| with_ids(&m.nlri, &ids.mp_reach)),
        );
        let mut changed = Changed::new();
        if looped || u.treat_as_withdraw.is_some() {
            for (w, id) in withdrawn.chain(announced) {
                let Some(s) = self.path_slot(slot, from, id) else {
                    continue;
                };
                if self.one(*w, Op::Remove(s)) {
                    changed.push(*w);
                }
            }
            return changed;
        }
        for (w, id) in withdrawn {
            let Some(s) = self.path_slot(slot, from, id) else {
                continue;
            };
            if self.one(*w, Op::Remove(s)) {
                changed.push(*w);
            }
        }
        let v6_nh = u
            .mp_reach
            .as_ref()
            .and_then(|m| m.next_hops.first().copied());
        let mut route = |next_hop| {
            self.shared.add(Arc::new(RouteAttrs {
                attrs: u.attrs.clone(),
                next_hop,
            }))
        };
        let v4 = (!u.nlri.is_empty()).then(|| route(u.attrs.next_hop.map(IpAddr::V4)));
        let v6 = u.mp_reach.as_ref().map(|_| route(v6_nh));
        // The table is far larger than the cache: start each prefix's load a few prefixes
        // ahead, so the misses overlap instead of coming one after another.
        let mut ahead = announced.clone().skip(PREFETCH_AHEAD);
        for (prefix, id) in announced {
            if let Some((p, _)) = ahead.next() {
                self.table.prefetch(p);
            }
            let Some(route) = (match prefix {
                IpNet::V4(_) => v4.or(v6),
                IpNet::V6(_) => v6,
            }) else {
                continue;
            };
            let Some(slot) = self.path_slot(slot, from, id) else {
                continue;
            };
            let held = Held {
                route,
                slot,
                stale: false,
            };
            if self.one(*prefix, Op::Put(held)) {
                changed.push(*prefix);
            }
        }
        for set in v4.into_iter().chain(v6) {
            self.shared.drop_unheld(set);
        }
        changed
    }

    /// The forwarding changes since the last call (learned best routes, for Felix).
    pub fn take_forwarding_changes(&mut self) -> Vec<ForwardingChange> {
        std::mem::take(&mut self.forwarding)
    }

    /// The best path of a prefix.
    pub fn best(&self, prefix: &IpNet) -> Option<Path> {
        if self.local.contains(prefix) {
            return Some(Path {
                route: self.local_route.clone(),
                source: Source::Local,
                stale: false,
            });
        }
        let h = self.table.get(prefix)?.best(&self.lists)?;
        let info = self.peers.get(usize::from(h.slot))?.as_ref()?;
        Some(Path {
            route: self.shared.get(h.route).clone(),
            source: Source::Peer(info.address),
            stale: h.stale,
        })
    }

    /// Every prefix with a best path.
    pub fn best_prefixes(&self) -> impl Iterator<Item = IpNet> + '_ {
        let learned = self.table.keys().filter(|p| !self.local.contains(p));
        self.local.iter().copied().chain(learned)
    }

    /// A peer's counts, over all its slots.
    fn counts(&self, address: &IpAddr) -> Counts {
        let mut sum = Counts::default();
        for s in self.slots_of(address) {
            let c = self.counts[usize::from(s)];
            sum.received += c.received;
            sum.accepted += c.accepted;
            sum.stale += c.stale;
        }
        sum
    }

    /// Number of paths received from a peer.
    pub fn received(&self, address: &IpAddr) -> usize {
        self.counts(address).received
    }

    /// Check that every attribute set is counted by exactly the paths that hold it and that
    /// no unheld set is kept, and that each path list is used by exactly one entry (with
    /// two paths or more) or free; the number of sets in use.
    #[cfg(test)]
    fn check_shared(&self) -> Result<usize, String> {
        let mut held = vec![0u32; self.shared.sets.len()];
        let v4 = self.table.v4.iter().map(|(_, e)| e);
        let entries: Vec<&Entry> = v4.chain(self.table.v6.iter().map(|(_, e)| e)).collect();
        for h in entries.iter().flat_map(|e| e.paths(&self.lists)) {
            held[h.route as usize] += 1;
        }
        let mut used = vec![0u32; self.lists.lists.len()];
        for e in &entries {
            if let Entry::Many(i) = e {
                used[*i as usize] += 1;
            }
        }
        for (i, (list, n)) in self.lists.lists.iter().zip(&used).enumerate() {
            let free = self.lists.free.contains(&(i as u32));
            if (*n, free) != (0, true) && (*n != 1 || free || list.len() < 2) {
                return Err(format!(
                    "list {i}: used {n} times, free {free}, {} paths",
                    list.len()
                ));
            }
        }
        for (i, ((set, count), n)) in self.shared.sets.iter().zip(&held).enumerate() {
            if *count != *n || set.is_some() != (*n > 0) {
                return Err(format!(
                    "set {i}: counted {count}, held by {n}, kept {}",
                    set.is_some()
                ));
            }
        }
        Ok(held.iter().filter(|n| **n > 0).count())
    }

    /// Number of a peer's paths that are the best.
    pub fn accepted(&self, address: &IpAddr) -> usize {
        self.counts(address).accepted
    }
}

/// Less = `a` is preferred (RFC 4271 §9.1.2.2, RFC 4456 §9). The local origin is not
/// compared: it always wins.
fn compare(peers: &[Option<PeerInfo>], shared: &Shared, a: &Held, b: &Held) -> Ordering {
    let info = |h: &Held| peers.get(usize::from(h.slot)).and_then(Option::as_ref);
    let (ia, ib) = (info(a), info(b));
    let (aa, ba) = (&shared.get(a.route).attrs, &shared.get(b.route).attrs);
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
    a.stale
        .cmp(&b.stale)
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
        .then_with(|| ia.map(|i| i.address).cmp(&ib.map(|i| i.address)))
        // Two paths of one peer (RFC 7911): the one heard of first.
        .then(a.slot.cmp(&b.slot))
}

impl Rib {
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
                let from = self.peer(src)?;
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
        policy.add_communities(prefix, &mut attrs);
        Some((attrs, next_hop))
    }
}

#[cfg(test)]
#[path = "rib_tests.rs"]
mod tests;
