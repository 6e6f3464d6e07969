//! UPDATE (RFC 4271 §4.3) with its path attributes: ORIGIN, AS_PATH (and AS4_PATH, RFC
//! 6793), NEXT_HOP, MED, LOCAL_PREF, ATOMIC_AGGREGATE, AGGREGATOR, COMMUNITIES (RFC 1997),
//! ORIGINATOR_ID and CLUSTER_LIST (RFC 4456), MP_REACH_NLRI and MP_UNREACH_NLRI (RFC 4760);
//! unknown optional transitive attributes are kept and passed on with the Partial bit.
//!
//! Errors follow RFC 7606: a malformed attribute makes the UPDATE "treat-as-withdraw"
//! (its prefixes are withdrawn, the session stays up) or is discarded, depending on the
//! attribute (§7); only what leaves the NLRI unknowable (bad withdrawn/NLRI fields, a bad
//! MP_REACH/MP_UNREACH, duplicated MP attributes, §5.3 and §3 g) resets the session.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::message::{
    AS_TRANS, Afi, Codec, Family, HEADER_LEN, IPV4_UNICAST, IPV6_UNICAST, MAX_MESSAGE_LEN,
    Notification, Reader, Safi, err,
};

/// Attribute type codes.
pub mod code {
    pub const ORIGIN: u8 = 1;
    pub const AS_PATH: u8 = 2;
    pub const NEXT_HOP: u8 = 3;
    pub const MED: u8 = 4;
    pub const LOCAL_PREF: u8 = 5;
    pub const ATOMIC_AGGREGATE: u8 = 6;
    pub const AGGREGATOR: u8 = 7;
    pub const COMMUNITIES: u8 = 8;
    pub const ORIGINATOR_ID: u8 = 9;
    pub const CLUSTER_LIST: u8 = 10;
    pub const MP_REACH: u8 = 14;
    pub const MP_UNREACH: u8 = 15;
    pub const AS4_PATH: u8 = 17;
    pub const AS4_AGGREGATOR: u8 = 18;
    /// RFC 8092; carried as an optional transitive attribute of bytes (`RawAttr`).
    pub const LARGE_COMMUNITIES: u8 = 32;
}

/// Attribute flag bits.
pub mod flag {
    pub const OPTIONAL: u8 = 0x80;
    pub const TRANSITIVE: u8 = 0x40;
    pub const PARTIAL: u8 = 0x20;
    pub const EXTENDED: u8 = 0x10;
}

/// ORIGIN values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Origin {
    Igp = 0,
    Egp = 1,
    Incomplete = 2,
}

/// AS_PATH segment types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SegmentKind {
    Set = 1,
    Sequence = 2,
    ConfedSequence = 3,
    ConfedSet = 4,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AsSegment {
    pub kind: SegmentKind,
    pub asns: Vec<u32>,
}

/// An AS_PATH with 4-octet AS numbers.
#[derive(Debug, Clone, PartialEq, Eq, Default, Hash)]
pub struct AsPath(pub Vec<AsSegment>);

impl AsPath {
    pub fn sequence(asns: &[u32]) -> AsPath {
        if asns.is_empty() {
            return AsPath::default();
        }
        AsPath(vec![AsSegment {
            kind: SegmentKind::Sequence,
            asns: asns.to_vec(),
        }])
    }

    /// Length for the decision process (RFC 4271 §9.1.2.2 a): a set counts 1,
    /// confederation segments 0.
    pub fn path_len(&self) -> usize {
        self.0
            .iter()
            .map(|s| match s.kind {
                SegmentKind::Sequence => s.asns.len(),
                SegmentKind::Set => 1,
                _ => 0,
            })
            .sum()
    }

    pub fn contains(&self, asn: u32) -> bool {
        self.0.iter().any(|s| s.asns.contains(&asn))
    }

    /// The neighbouring AS (first AS of the first sequence), for MED comparison.
    pub fn first_as(&self) -> Option<u32> {
        self.0
            .iter()
            .find(|s| s.kind == SegmentKind::Sequence)
            .and_then(|s| s.asns.first().copied())
    }

    /// `asn` prepended (eBGP export, RFC 4271 §5.1.2).
    pub fn prepend(&self, asn: u32) -> AsPath {
        let mut segs = self.0.clone();
        match segs.first_mut() {
            Some(s) if s.kind == SegmentKind::Sequence && s.asns.len() < 255 => {
                s.asns.insert(0, asn)
            }
            _ => segs.insert(
                0,
                AsSegment {
                    kind: SegmentKind::Sequence,
                    asns: vec![asn],
                },
            ),
        }
        AsPath(segs)
    }
}

/// An attribute kept as bytes (unknown optional transitive ones).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RawAttr {
    pub flags: u8,
    pub code: u8,
    pub value: Vec<u8>,
}

/// The attributes a route carries (everything but the NLRI carriers).
#[derive(Debug, Clone, PartialEq, Eq, Default, Hash)]
pub struct Attributes {
    pub origin: Option<Origin>,
    pub as_path: Option<AsPath>,
    pub next_hop: Option<Ipv4Addr>,
    pub med: Option<u32>,
    pub local_pref: Option<u32>,
    pub atomic_aggregate: bool,
    pub aggregator: Option<(u32, Ipv4Addr)>,
    pub communities: Vec<u32>,
    pub originator_id: Option<Ipv4Addr>,
    pub cluster_list: Vec<Ipv4Addr>,
    pub other: Vec<RawAttr>,
}

/// MP_REACH_NLRI (RFC 4760 §3). For IPv6 the next hops are the global address and,
/// optionally, the link-local one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MpReach {
    pub family: Family,
    pub next_hops: Vec<IpAddr>,
    pub nlri: Vec<IpNet>,
}

/// MP_UNREACH_NLRI (RFC 4760 §4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MpUnreach {
    pub family: Family,
    pub withdrawn: Vec<IpNet>,
}

/// An UPDATE. `treat_as_withdraw` and `discarded` record the RFC 7606 outcome of decoding
/// (never encoded).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Update {
    pub withdrawn: Vec<IpNet>,
    pub attrs: Attributes,
    pub mp_reach: Option<MpReach>,
    pub mp_unreach: Option<MpUnreach>,
    pub nlri: Vec<IpNet>,
    /// Why this UPDATE's announcements are to be taken as withdrawals (RFC 7606 §2).
    pub treat_as_withdraw: Option<String>,
    /// Attributes dropped (RFC 7606 "attribute discard"), with the reason.
    pub discarded: Vec<String>,
    /// The path identifiers (RFC 7911) of the prefixes, list by list, where the session
    /// carries them; an empty list: none. On encoding, a prefix without one gets path 1
    /// (we send one path per prefix).
    pub path_ids: PathIds,
}

/// An UPDATE cut into messages that fit (see [`Update::split`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Split {
    pub parts: Vec<Update>,
    /// Prefixes that fit in no message with their attributes: not sent.
    pub too_large: Vec<IpNet>,
}

/// Path identifiers, one per prefix of the list of the same name (or none).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PathIds {
    pub withdrawn: Vec<u32>,
    pub nlri: Vec<u32>,
    pub mp_reach: Vec<u32>,
    pub mp_unreach: Vec<u32>,
}

impl Update {
    /// The End-of-RIB marker of a family (RFC 4724 §2).
    pub fn end_of_rib(family: Family) -> Update {
        if family == IPV4_UNICAST {
            return Update::default();
        }
        Update {
            mp_unreach: Some(MpUnreach {
                family,
                withdrawn: vec![],
            }),
            ..Default::default()
        }
    }

    /// The family this UPDATE ends, if it is an End-of-RIB marker.
    pub fn is_end_of_rib(&self) -> Option<Family> {
        let no_attrs = self.attrs == Attributes::default();
        if !(self.withdrawn.is_empty() && self.nlri.is_empty() && self.mp_reach.is_none()) {
            return None;
        }
        match &self.mp_unreach {
            None if no_attrs => Some(IPV4_UNICAST),
            Some(u) if u.withdrawn.is_empty() && no_attrs => Some(u.family),
            _ => None,
        }
    }

    /// Prefixes announced and withdrawn, with RFC 7606 treat-as-withdraw applied.
    pub fn effective(&self) -> (Vec<IpNet>, Vec<IpNet>) {
        let mut announced: Vec<IpNet> = self.nlri.clone();
        if let Some(m) = &self.mp_reach {
            announced.extend(m.nlri.iter().copied());
        }
        let mut withdrawn = self.withdrawn.clone();
        if let Some(m) = &self.mp_unreach {
            withdrawn.extend(m.withdrawn.iter().copied());
        }
        if self.treat_as_withdraw.is_some() {
            withdrawn.append(&mut announced);
        }
        (announced, withdrawn)
    }

    /// An announcement of `nlri` with these attributes and next hop: IPv4 in the classic
    /// NLRI field with NEXT_HOP, IPv6 in MP_REACH_NLRI (RFC 4760).
    pub fn announce(mut attrs: Attributes, next_hop: IpAddr, nlri: Vec<IpNet>) -> Update {
        match next_hop {
            IpAddr::V4(nh) => {
                attrs.next_hop = Some(nh);
                Update {
                    attrs,
                    nlri,
                    ..Default::default()
                }
            }
            IpAddr::V6(_) => Update {
                attrs,
                mp_reach: Some(MpReach {
                    family: IPV6_UNICAST,
                    next_hops: vec![next_hop],
                    nlri,
                }),
                ..Default::default()
            },
        }
    }

    /// Whether a route with these attributes and next hop fits in one message to a peer
    /// with this codec (RFC 4271 §4.1: 4096 bytes), checked with the longest prefix of
    /// its family. A route received near the limit may no longer fit once we add
    /// LOCAL_PREF, ORIGINATOR_ID and CLUSTER_LIST (RFC 4456), an AS or AS4_PATH.
    pub fn announcement_fits(attrs: &Attributes, next_hop: IpAddr, codec: &Codec) -> bool {
        let longest = match next_hop {
            IpAddr::V4(_) => IpNet::V4(Ipv4Net::new(Ipv4Addr::BROADCAST, 32).expect("/32")),
            IpAddr::V6(_) => IpNet::V6(Ipv6Net::new(Ipv6Addr::LOCALHOST, 128).expect("/128")),
        };
        let u = Update::announce(attrs.clone(), next_hop, vec![longest]);
        HEADER_LEN + u.encode_body(codec).len() <= MAX_MESSAGE_LEN
    }

    /// Cut an announcement of many prefixes into announcements that each fill about
    /// `messages` messages with these attributes for this codec (attributes repeated), so
    /// that splitting one of them makes few copies of the attributes at a time (a route
    /// may carry ~4 KB of them). UPDATEs that withdraw or carry path identifiers are left
    /// whole.
    pub fn chunk_announcements(self, codec: &Codec, messages: usize) -> Vec<Update> {
        let plain = self.withdrawn.is_empty()
            && self.mp_unreach.is_none()
            && self.path_ids == PathIds::default();
        if !plain {
            return vec![self];
        }
        let bare = Update {
            attrs: self.attrs.clone(),
            mp_reach: self.mp_reach.as_ref().map(|m| MpReach {
                family: m.family,
                next_hops: m.next_hops.clone(),
                nlri: vec![],
            }),
            ..Default::default()
        };
        let base = HEADER_LEN + bare.encode_body(codec).len();
        let (v4, v6) = (
            self.nlri.len(),
            self.mp_reach.as_ref().map_or(0, |m| m.nlri.len()),
        );
        let id = |f: Family| if codec.add_path_tx.has(f) { 4 } else { 0 };
        let per_prefix = if v6 > 0 {
            17 + id(IPV6_UNICAST)
        } else {
            5 + id(IPV4_UNICAST)
        };
        // As `split` counts: 64 bytes of margin.
        let per_message = (MAX_MESSAGE_LEN.saturating_sub(base + 64) / per_prefix).max(1);
        let n = per_message.saturating_mul(messages.max(1));
        if v4 + v6 <= n {
            return vec![self];
        }
        let mut out = Vec::new();
        for c in self.nlri.chunks(n) {
            out.push(Update {
                attrs: self.attrs.clone(),
                nlri: c.to_vec(),
                ..Default::default()
            });
        }
        if let Some(m) = &self.mp_reach {
            for c in m.nlri.chunks(n) {
                out.push(Update {
                    attrs: self.attrs.clone(),
                    mp_reach: Some(MpReach {
                        family: m.family,
                        next_hops: m.next_hops.clone(),
                        nlri: c.to_vec(),
                    }),
                    ..Default::default()
                });
            }
        }
        out
    }

    /// Split into UPDATEs that each fit in one message, attributes repeated. Prefixes
    /// whose attributes alone leave no room for them come back in `too_large` (they are
    /// not to be sent: RFC 4271 §4.1 allows no larger message).
    pub fn split(self, codec: &Codec) -> Split {
        let fits = |u: &Update| HEADER_LEN + u.encode_body(codec).len() <= MAX_MESSAGE_LEN;
        if fits(&self) {
            return Split {
                parts: vec![self],
                too_large: vec![],
            };
        }
        let mut out = Vec::new();
        // Chunks of a prefix list and of its path identifiers, if it has them. Sizes allow
        // for the 4 bytes of an identifier.
        fn chunks<'a>(
            nets: &'a [IpNet],
            ids: &'a [u32],
            n: usize,
        ) -> impl Iterator<Item = (Vec<IpNet>, Vec<u32>)> + 'a {
            let n = n.max(1);
            nets.chunks(n).enumerate().map(move |(i, c)| {
                let ids = ids.get(i * n..(i * n + c.len()).min(ids.len()));
                (c.to_vec(), ids.unwrap_or_default().to_vec())
            })
        }
        let ids = &self.path_ids;
        // Most bytes of one prefix, identifier included when sent.
        let id_len = |f: Family| if codec.add_path_tx.has(f) { 4 } else { 0 };
        let (v4, v6) = (5 + id_len(IPV4_UNICAST), 17 + id_len(IPV6_UNICAST));
        // Withdrawals travel alone.
        for (withdrawn, w) in chunks(&self.withdrawn, &ids.withdrawn, 4000 / v4) {
            out.push(Update {
                withdrawn,
                path_ids: PathIds {
                    withdrawn: w,
                    ..Default::default()
                },
                ..Default::default()
            });
        }
        if let Some(u) = &self.mp_unreach {
            for (withdrawn, w) in chunks(&u.withdrawn, &ids.mp_unreach, 3400 / v6) {
                out.push(Update {
                    mp_unreach: Some(MpUnreach {
                        family: u.family,
                        withdrawn,
                    }),
                    path_ids: PathIds {
                        mp_unreach: w,
                        ..Default::default()
                    },
                    ..Default::default()
                });
            }
        }
        let with_attrs = |nlri: Vec<IpNet>, mp: Option<MpReach>, path_ids: PathIds| Update {
            attrs: self.attrs.clone(),
            nlri,
            mp_reach: mp,
            path_ids,
            ..Default::default()
        };
        let base = HEADER_LEN
            + with_attrs(vec![], None, PathIds::default())
                .encode_body(codec)
                .len();
        let room = MAX_MESSAGE_LEN.saturating_sub(base + 64);
        for (nlri, n) in chunks(&self.nlri, &ids.nlri, room / v4) {
            let path_ids = PathIds {
                nlri: n,
                ..Default::default()
            };
            out.push(with_attrs(nlri, None, path_ids));
        }
        if let Some(m) = &self.mp_reach {
            for (nlri, n) in chunks(&m.nlri, &ids.mp_reach, room / v6) {
                let mp = MpReach {
                    family: m.family,
                    next_hops: m.next_hops.clone(),
                    nlri,
                };
                let path_ids = PathIds {
                    mp_reach: n,
                    ..Default::default()
                };
                out.push(with_attrs(vec![], Some(mp), path_ids));
            }
        }
        let (parts, over): (Vec<Update>, Vec<Update>) = out.into_iter().partition(fits);
        let too_large = over
            .into_iter()
            .flat_map(|u| {
                u.nlri
                    .into_iter()
                    .chain(u.mp_reach.into_iter().flat_map(|m| m.nlri))
            })
            .collect();
        Split { parts, too_large }
    }

    /// The body (after the header).
    pub fn encode_body(&self, codec: &Codec) -> Vec<u8> {
        let mut withdrawn = Vec::new();
        let v4_ids = codec.add_path_tx.ipv4;
        encode_prefixes(
            &self.withdrawn,
            v4_ids,
            &self.path_ids.withdrawn,
            &mut withdrawn,
        );
        let mut attrs = Vec::new();
        encode_attributes(self, codec, &mut attrs);
        let mut out = Vec::with_capacity(4 + withdrawn.len() + attrs.len() + 5 * self.nlri.len());
        out.extend((withdrawn.len() as u16).to_be_bytes());
        out.extend(withdrawn);
        out.extend((attrs.len() as u16).to_be_bytes());
        out.extend(attrs);
        encode_prefixes(&self.nlri, v4_ids, &self.path_ids.nlri, &mut out);
        out
    }
}

/// A list of prefixes, each after its path identifier when `with_ids` (from `ids`, else 1).
fn encode_prefixes(nets: &[IpNet], with_ids: bool, ids: &[u32], out: &mut Vec<u8>) {
    for (i, p) in nets.iter().enumerate() {
        if with_ids {
            out.extend(ids.get(i).copied().unwrap_or(1).to_be_bytes());
        }
        encode_prefix(p, out);
    }
}

fn encode_prefix(p: &IpNet, out: &mut Vec<u8>) {
    let len = p.prefix_len();
    out.push(len);
    let n = usize::from(len).div_ceil(8);
    match p.network() {
        IpAddr::V4(a) => out.extend(&a.octets()[..n]),
        IpAddr::V6(a) => out.extend(&a.octets()[..n]),
    }
}

/// Decode a list of prefixes of one family, each after a path identifier when `with_ids`
/// (the identifiers are returned beside them); None when malformed.
fn decode_prefixes(mut r: Reader<'_>, v6: bool, with_ids: bool) -> Option<(Vec<IpNet>, Vec<u32>)> {
    let mut out = Vec::new();
    let mut ids = Vec::new();
    while !r.is_empty() {
        if with_ids {
            ids.push(r.u32()?);
        }
        let len = r.u8()?;
        let max = if v6 { 128 } else { 32 };
        if len > max {
            return None;
        }
        let bytes = r.take(usize::from(len).div_ceil(8))?;
        let net = if v6 {
            let mut o = [0u8; 16];
            o[..bytes.len()].copy_from_slice(bytes);
            IpNet::V6(Ipv6Net::new(Ipv6Addr::from(o), len).ok()?.trunc())
        } else {
            let mut o = [0u8; 4];
            o[..bytes.len()].copy_from_slice(bytes);
            IpNet::V4(Ipv4Net::new(Ipv4Addr::from(o), len).ok()?.trunc())
        };
        out.push(net);
    }
    Some((out, ids))
}

fn put_attr(out: &mut Vec<u8>, flags: u8, code: u8, value: &[u8]) {
    if value.len() > 255 {
        out.extend([flags | flag::EXTENDED, code]);
        out.extend((value.len() as u16).to_be_bytes());
    } else {
        out.extend([flags & !flag::EXTENDED, code, value.len() as u8]);
    }
    out.extend(value);
}

fn encode_as_path(path: &AsPath, four: bool) -> Vec<u8> {
    let mut v = Vec::new();
    for s in &path.0 {
        for chunk in s.asns.chunks(255) {
            v.extend([s.kind as u8, chunk.len() as u8]);
            for a in chunk {
                if four {
                    v.extend(a.to_be_bytes());
                } else {
                    v.extend(u16::try_from(*a).unwrap_or(AS_TRANS).to_be_bytes());
                }
            }
        }
    }
    v
}

fn encode_attributes(u: &Update, codec: &Codec, out: &mut Vec<u8>) {
    let a = &u.attrs;
    const WK: u8 = flag::TRANSITIVE;
    const OPT_T: u8 = flag::OPTIONAL | flag::TRANSITIVE;
    const OPT: u8 = flag::OPTIONAL;
    if let Some(o) = a.origin {
        put_attr(out, WK, code::ORIGIN, &[o as u8]);
    }
    if let Some(p) = &a.as_path {
        put_attr(
            out,
            WK,
            code::AS_PATH,
            &encode_as_path(p, codec.four_octet_as),
        );
    }
    if let Some(nh) = a.next_hop {
        put_attr(out, WK, code::NEXT_HOP, &nh.octets());
    }
    if let Some(m) = a.med {
        put_attr(out, OPT, code::MED, &m.to_be_bytes());
    }
    if let Some(l) = a.local_pref {
        put_attr(out, WK, code::LOCAL_PREF, &l.to_be_bytes());
    }
    if a.atomic_aggregate {
        put_attr(out, WK, code::ATOMIC_AGGREGATE, &[]);
    }
    if let Some((asn, id)) = a.aggregator {
        let mut v = Vec::new();
        if codec.four_octet_as {
            v.extend(asn.to_be_bytes());
        } else {
            v.extend(u16::try_from(asn).unwrap_or(AS_TRANS).to_be_bytes());
        }
        v.extend(id.octets());
        put_attr(out, OPT_T, code::AGGREGATOR, &v);
    }
    if !a.communities.is_empty() {
        let v: Vec<u8> = a.communities.iter().flat_map(|c| c.to_be_bytes()).collect();
        put_attr(out, OPT_T, code::COMMUNITIES, &v);
    }
    if let Some(id) = a.originator_id {
        put_attr(out, OPT, code::ORIGINATOR_ID, &id.octets());
    }
    if !a.cluster_list.is_empty() {
        let v: Vec<u8> = a.cluster_list.iter().flat_map(|c| c.octets()).collect();
        put_attr(out, OPT, code::CLUSTER_LIST, &v);
    }
    if let Some(m) = &u.mp_reach {
        let mut v = m.family.0.0.to_be_bytes().to_vec();
        v.push(m.family.1.0);
        let mut nh = Vec::new();
        for h in &m.next_hops {
            match h {
                IpAddr::V4(a) => nh.extend(a.octets()),
                IpAddr::V6(a) => nh.extend(a.octets()),
            }
        }
        v.push(nh.len() as u8);
        v.extend(nh);
        v.push(0);
        let with_ids = codec.add_path_tx.has(m.family);
        encode_prefixes(&m.nlri, with_ids, &u.path_ids.mp_reach, &mut v);
        put_attr(out, OPT, code::MP_REACH, &v);
    }
    if let Some(m) = &u.mp_unreach {
        let mut v = m.family.0.0.to_be_bytes().to_vec();
        v.push(m.family.1.0);
        let with_ids = codec.add_path_tx.has(m.family);
        encode_prefixes(&m.withdrawn, with_ids, &u.path_ids.mp_unreach, &mut v);
        put_attr(out, OPT, code::MP_UNREACH, &v);
    }
    if !codec.four_octet_as {
        // RFC 6793 §4.2.2: the real path for 4-octet speakers behind us.
        if let Some(p) = &a.as_path
            && p.0.iter().flat_map(|s| &s.asns).any(|x| *x > 0xffff)
        {
            let real = AsPath(
                p.0.iter()
                    .filter(|s| matches!(s.kind, SegmentKind::Set | SegmentKind::Sequence))
                    .cloned()
                    .collect(),
            );
            put_attr(out, OPT_T, code::AS4_PATH, &encode_as_path(&real, true));
        }
        if let Some((asn, id)) = a.aggregator
            && asn > 0xffff
        {
            let mut v = asn.to_be_bytes().to_vec();
            v.extend(id.octets());
            put_attr(out, OPT_T, code::AS4_AGGREGATOR, &v);
        }
    }
    for r in &a.other {
        put_attr(out, r.flags, r.code, &r.value);
    }
}

fn decode_as_path(v: &[u8], four: bool) -> Option<AsPath> {
    let mut r = Reader::new(v);
    let mut segs = Vec::new();
    while !r.is_empty() {
        let kind = match r.u8()? {
            1 => SegmentKind::Set,
            2 => SegmentKind::Sequence,
            3 => SegmentKind::ConfedSequence,
            4 => SegmentKind::ConfedSet,
            _ => return None,
        };
        let n = r.u8()?;
        if n == 0 {
            return None;
        }
        let mut asns = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            asns.push(if four { r.u32()? } else { u32::from(r.u16()?) });
        }
        segs.push(AsSegment { kind, asns });
    }
    Some(AsPath(segs))
}

/// RFC 6793 §4.2.3: rebuild the real path from AS_PATH and AS4_PATH.
fn merge_as4_path(path: &AsPath, as4: &AsPath) -> AsPath {
    let (n, n4) = (path.path_len(), as4.path_len());
    if n < n4 {
        return path.clone();
    }
    let mut keep = n - n4;
    let mut segs = Vec::new();
    for s in &path.0 {
        if keep == 0 {
            break;
        }
        match s.kind {
            SegmentKind::Sequence => {
                let take = s.asns.len().min(keep);
                segs.push(AsSegment {
                    kind: s.kind,
                    asns: s.asns[..take].to_vec(),
                });
                keep -= take;
            }
            SegmentKind::Set => {
                segs.push(s.clone());
                keep -= 1;
            }
            _ => segs.push(s.clone()),
        }
    }
    segs.extend(as4.0.iter().cloned());
    AsPath(segs)
}

/// What one malformed attribute means (RFC 7606 §7).
enum Fault {
    Withdraw(String),
    Discard(String),
    Reset(Notification),
}

/// MP_REACH_NLRI and its prefixes' path identifiers (if the codec receives them).
fn decode_mp_reach(v: &[u8], codec: &Codec) -> Option<(MpReach, Vec<u32>)> {
    let mut r = Reader::new(v);
    let family = (Afi(r.u16()?), Safi(r.u8()?));
    let nh_len = usize::from(r.u8()?);
    let nh = r.take(nh_len)?;
    let _reserved = r.u8()?;
    let next_hops = match (family, nh_len) {
        (f, 4) if f == IPV4_UNICAST => vec![IpAddr::from(<[u8; 4]>::try_from(nh).ok()?)],
        (f, 16) if f == IPV6_UNICAST => vec![IpAddr::from(<[u8; 16]>::try_from(nh).ok()?)],
        (f, 32) if f == IPV6_UNICAST => vec![
            IpAddr::from(<[u8; 16]>::try_from(&nh[..16]).ok()?),
            IpAddr::from(<[u8; 16]>::try_from(&nh[16..]).ok()?),
        ],
        (f, _) if f == IPV4_UNICAST || f == IPV6_UNICAST => return None,
        // A family we do not speak: its NLRI are not ours to read.
        _ => {
            let mp = MpReach {
                family,
                next_hops: vec![],
                nlri: vec![],
            };
            return Some((mp, vec![]));
        }
    };
    let with_ids = codec.add_path_rx.has(family);
    let (nlri, ids) = decode_prefixes(r, family == IPV6_UNICAST, with_ids)?;
    let mp = MpReach {
        family,
        next_hops,
        nlri,
    };
    Some((mp, ids))
}

/// MP_UNREACH_NLRI and its prefixes' path identifiers (if the codec receives them).
fn decode_mp_unreach(v: &[u8], codec: &Codec) -> Option<(MpUnreach, Vec<u32>)> {
    let mut r = Reader::new(v);
    let family = (Afi(r.u16()?), Safi(r.u8()?));
    if family != IPV4_UNICAST && family != IPV6_UNICAST {
        let mp = MpUnreach {
            family,
            withdrawn: vec![],
        };
        return Some((mp, vec![]));
    }
    let with_ids = codec.add_path_rx.has(family);
    let (withdrawn, ids) = decode_prefixes(r, family == IPV6_UNICAST, with_ids)?;
    Some((MpUnreach { family, withdrawn }, ids))
}

fn ipv4(v: &[u8]) -> Option<Ipv4Addr> {
    <[u8; 4]>::try_from(v).ok().map(Ipv4Addr::from)
}

fn u32_of(v: &[u8]) -> Option<u32> {
    <[u8; 4]>::try_from(v).ok().map(u32::from_be_bytes)
}

pub(crate) fn decode_update(body: &[u8], codec: &Codec) -> Result<Update, Notification> {
    let mut r = Reader::new(body);
    let list_error = || Notification::new(err::UPDATE, err::MALFORMED_ATTR_LIST, []);
    let wlen = usize::from(r.u16().ok_or_else(list_error)?);
    let wbytes = r.take(wlen).ok_or_else(list_error)?;
    let alen = usize::from(r.u16().ok_or_else(list_error)?);
    let abytes = r.take(alen).ok_or_else(list_error)?;
    let network_error = || Notification::new(err::UPDATE, err::INVALID_NETWORK, []);
    let ids = codec.add_path_rx.ipv4;
    let (withdrawn, withdrawn_ids) =
        decode_prefixes(Reader::new(wbytes), false, ids).ok_or_else(network_error)?;
    let (nlri, nlri_ids) = decode_prefixes(r, false, ids).ok_or_else(network_error)?;

    let mut u = Update {
        withdrawn,
        nlri,
        path_ids: PathIds {
            withdrawn: withdrawn_ids,
            nlri: nlri_ids,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut seen = [false; 256];
    let mut as4_path: Option<AsPath> = None;
    let mut as4_aggregator: Option<(u32, Ipv4Addr)> = None;
    let mut a = Reader::new(abytes);
    while !a.is_empty() {
        // A header or length running past the attributes: the rest cannot be read (§4).
        let Some((flags, code, value)) = (|| {
            let flags = a.u8()?;
            let code = a.u8()?;
            let len = if flags & flag::EXTENDED != 0 {
                usize::from(a.u16()?)
            } else {
                usize::from(a.u8()?)
            };
            Some((flags, code, a.take(len)?))
        })() else {
            // Whatever was read (MP NLRI included) is withdrawn by this.
            u.treat_as_withdraw
                .get_or_insert_with(|| "attribute length overruns the attribute list".into());
            break;
        };
        if seen[usize::from(code)] {
            if code == code::MP_REACH || code == code::MP_UNREACH {
                return Err(list_error());
            }
            u.discarded.push(format!("repeated attribute {code}"));
            continue;
        }
        seen[usize::from(code)] = true;
        match decode_attribute(
            flags,
            code,
            value,
            codec,
            &mut u,
            &mut as4_path,
            &mut as4_aggregator,
        ) {
            Ok(()) => {}
            Err(Fault::Withdraw(why)) => {
                u.treat_as_withdraw.get_or_insert(why);
            }
            Err(Fault::Discard(why)) => u.discarded.push(why),
            Err(Fault::Reset(n)) => return Err(n),
        }
    }
    if !codec.four_octet_as {
        if let (Some(p), Some(p4)) = (&u.attrs.as_path, &as4_path) {
            u.attrs.as_path = Some(merge_as4_path(p, p4));
        }
        if let (Some((asn, _)), Some(a4)) = (u.attrs.aggregator, as4_aggregator)
            && asn == u32::from(AS_TRANS)
        {
            u.attrs.aggregator = Some(a4);
        }
    }
    // Mandatory attributes for reachable NLRI (RFC 7606 §3 d).
    let reach = !u.nlri.is_empty() || u.mp_reach.as_ref().is_some_and(|m| !m.nlri.is_empty());
    if reach && u.treat_as_withdraw.is_none() {
        let missing = if u.attrs.origin.is_none() {
            Some("ORIGIN")
        } else if u.attrs.as_path.is_none() {
            Some("AS_PATH")
        } else if !u.nlri.is_empty() && u.attrs.next_hop.is_none() {
            Some("NEXT_HOP")
        } else {
            None
        };
        if let Some(m) = missing {
            u.treat_as_withdraw = Some(format!("missing well-known attribute {m}"));
        }
    }
    Ok(u)
}

/// Expected optional/transitive bits of the attributes we know.
fn expected_flags(code: u8) -> Option<u8> {
    Some(match code {
        code::ORIGIN
        | code::AS_PATH
        | code::NEXT_HOP
        | code::LOCAL_PREF
        | code::ATOMIC_AGGREGATE => flag::TRANSITIVE,
        code::MED
        | code::ORIGINATOR_ID
        | code::CLUSTER_LIST
        | code::MP_REACH
        | code::MP_UNREACH => flag::OPTIONAL,
        code::AGGREGATOR | code::COMMUNITIES | code::AS4_PATH | code::AS4_AGGREGATOR => {
            flag::OPTIONAL | flag::TRANSITIVE
        }
        _ => return None,
    })
}

fn decode_attribute(
    flags: u8,
    code: u8,
    v: &[u8],
    codec: &Codec,
    u: &mut Update,
    as4_path: &mut Option<AsPath>,
    as4_aggregator: &mut Option<(u32, Ipv4Addr)>,
) -> Result<(), Fault> {
    let withdraw = |what: &str| Fault::Withdraw(format!("malformed {what}"));
    let discard = |what: &str| Fault::Discard(format!("malformed {what}"));
    if let Some(want) = expected_flags(code)
        && flags & (flag::OPTIONAL | flag::TRANSITIVE) != want
    {
        let what = format!("flags 0x{flags:02x} of attribute {code}");
        return Err(match code {
            code::MP_REACH | code::MP_UNREACH => Fault::Reset(Notification::new(
                err::UPDATE,
                err::ATTR_FLAGS,
                [flags, code],
            )),
            code::ATOMIC_AGGREGATE | code::AGGREGATOR | code::AS4_PATH | code::AS4_AGGREGATOR => {
                Fault::Discard(what)
            }
            _ => Fault::Withdraw(what),
        });
    }
    let a = &mut u.attrs;
    match code {
        code::ORIGIN => {
            a.origin = Some(match v {
                [0] => Origin::Igp,
                [1] => Origin::Egp,
                [2] => Origin::Incomplete,
                _ => return Err(withdraw("ORIGIN")),
            })
        }
        code::AS_PATH => {
            a.as_path =
                Some(decode_as_path(v, codec.four_octet_as).ok_or_else(|| withdraw("AS_PATH"))?)
        }
        code::NEXT_HOP => {
            let nh = ipv4(v).ok_or_else(|| withdraw("NEXT_HOP"))?;
            if nh.is_unspecified() || nh.is_multicast() || nh.is_broadcast() {
                return Err(Fault::Withdraw(format!("invalid NEXT_HOP {nh}")));
            }
            a.next_hop = Some(nh);
        }
        code::MED => a.med = Some(u32_of(v).ok_or_else(|| withdraw("MULTI_EXIT_DISC"))?),
        code::LOCAL_PREF => {
            if !codec.ibgp {
                return Err(Fault::Discard("LOCAL_PREF from an external peer".into()));
            }
            a.local_pref = Some(u32_of(v).ok_or_else(|| withdraw("LOCAL_PREF"))?);
        }
        code::ATOMIC_AGGREGATE => {
            if !v.is_empty() {
                return Err(discard("ATOMIC_AGGREGATE"));
            }
            a.atomic_aggregate = true;
        }
        code::AGGREGATOR => {
            let ok = match (codec.four_octet_as, v.len()) {
                (true, 8) => u32_of(&v[..4]).zip(ipv4(&v[4..])),
                (false, 6) => {
                    ipv4(&v[2..]).map(|id| (u32::from(u16::from_be_bytes([v[0], v[1]])), id))
                }
                _ => None,
            };
            a.aggregator = Some(ok.ok_or_else(|| discard("AGGREGATOR"))?);
        }
        code::COMMUNITIES => {
            if v.is_empty() || !v.len().is_multiple_of(4) {
                return Err(withdraw("COMMUNITIES"));
            }
            a.communities = v.chunks(4).filter_map(u32_of).collect();
        }
        code::ORIGINATOR_ID => {
            a.originator_id = Some(ipv4(v).ok_or_else(|| withdraw("ORIGINATOR_ID"))?)
        }
        code::CLUSTER_LIST => {
            if v.is_empty() || !v.len().is_multiple_of(4) {
                return Err(withdraw("CLUSTER_LIST"));
            }
            a.cluster_list = v.chunks(4).filter_map(ipv4).collect();
        }
        code::MP_REACH => {
            let (mp, ids) = decode_mp_reach(v, codec).ok_or_else(|| {
                Fault::Reset(Notification::new(
                    err::UPDATE,
                    err::OPTIONAL_ATTR,
                    [flags, code],
                ))
            })?;
            u.mp_reach = Some(mp);
            u.path_ids.mp_reach = ids;
        }
        code::MP_UNREACH => {
            let (mp, ids) = decode_mp_unreach(v, codec).ok_or_else(|| {
                Fault::Reset(Notification::new(
                    err::UPDATE,
                    err::OPTIONAL_ATTR,
                    [flags, code],
                ))
            })?;
            u.mp_unreach = Some(mp);
            u.path_ids.mp_unreach = ids;
        }
        code::AS4_PATH => {
            if codec.four_octet_as {
                // A 4-octet speaker never sends it; ignore (RFC 6793 §4.1).
                return Ok(());
            }
            let p = decode_as_path(v, true)
                .filter(|p| {
                    p.0.iter()
                        .all(|s| matches!(s.kind, SegmentKind::Set | SegmentKind::Sequence))
                })
                .ok_or_else(|| discard("AS4_PATH"))?;
            *as4_path = Some(p);
        }
        code::AS4_AGGREGATOR => {
            if codec.four_octet_as {
                return Ok(());
            }
            let agg = (v.len() == 8)
                .then(|| u32_of(&v[..4]).zip(ipv4(&v[4..])))
                .flatten()
                .ok_or_else(|| discard("AS4_AGGREGATOR"))?;
            *as4_aggregator = Some(agg);
        }
        _ => {
            if flags & flag::OPTIONAL == 0 {
                return Err(Fault::Reset(Notification::new(
                    err::UPDATE,
                    err::UNRECOGNIZED_WELL_KNOWN,
                    [flags, code],
                )));
            }
            if flags & flag::TRANSITIVE != 0 {
                // Passed on, marked as not understood by every speaker on the way.
                a.other.push(RawAttr {
                    flags: (flags | flag::PARTIAL) & !flag::EXTENDED,
                    code,
                    value: v.to_vec(),
                });
            }
        }
    }
    Ok(())
}
