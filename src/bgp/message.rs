//! BGP-4 messages on the wire (RFC 4271 §4): the header and framing, OPEN with its
//! capabilities (RFC 5492; multiprotocol RFC 4760, route refresh RFC 2918 and enhanced
//! RFC 7313, 4-octet AS RFC 6793, graceful restart RFC 4724, add-path RFC 7911),
//! NOTIFICATION, KEEPALIVE and ROUTE-REFRESH. UPDATE lives in `update.rs`. Pure: bytes in,
//! values out; every decoding error is the NOTIFICATION the RFC prescribes.

use std::net::Ipv4Addr;

use bytes::{BufMut, BytesMut};

use super::update::Update;

/// Length of the fixed header (marker, length, type).
pub const HEADER_LEN: usize = 19;
/// Largest message without RFC 8654 extended messages.
pub const MAX_MESSAGE_LEN: usize = 4096;
/// The 2-octet AS used in place of a 4-octet one (RFC 6793).
pub const AS_TRANS: u16 = 23456;

/// Message type codes.
pub mod kind {
    pub const OPEN: u8 = 1;
    pub const UPDATE: u8 = 2;
    pub const NOTIFICATION: u8 = 3;
    pub const KEEPALIVE: u8 = 4;
    pub const ROUTE_REFRESH: u8 = 5;
}

/// Address family identifiers (IANA).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Afi(pub u16);
impl Afi {
    pub const IPV4: Afi = Afi(1);
    pub const IPV6: Afi = Afi(2);
}

/// Subsequent address family identifiers (IANA).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Safi(pub u8);
impl Safi {
    pub const UNICAST: Safi = Safi(1);
}

/// An address family: what multiprotocol, graceful restart and route refresh speak of.
pub type Family = (Afi, Safi);
pub const IPV4_UNICAST: Family = (Afi::IPV4, Safi::UNICAST);
pub const IPV6_UNICAST: Family = (Afi::IPV6, Safi::UNICAST);

/// A capability advertised in OPEN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capability {
    /// Code 1 (RFC 4760).
    Multiprotocol(Family),
    /// Code 2 (RFC 2918).
    RouteRefresh,
    /// Code 70 (RFC 7313).
    EnhancedRouteRefresh,
    /// Code 65 (RFC 6793): our real AS.
    FourOctetAs(u32),
    /// Code 64 (RFC 4724).
    GracefulRestart(GracefulRestart),
    /// Code 69 (RFC 7911): per family, 1 = receive, 2 = send, 3 = both.
    AddPath(Vec<(Family, u8)>),
    /// Anything else, kept as is.
    Unknown { code: u8, value: Vec<u8> },
}

/// The graceful-restart capability (RFC 4724 §3).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GracefulRestart {
    /// R bit: the sender has restarted.
    pub restarting: bool,
    /// Seconds the peer should keep our routes while we restart (12 bits).
    pub restart_time: u16,
    /// Families, each with its F bit (forwarding state preserved).
    pub families: Vec<(Family, bool)>,
}

/// OPEN (RFC 4271 §4.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    /// The AS in the fixed field: AS_TRANS when the real one needs 4 octets.
    pub my_as: u16,
    pub hold_time: u16,
    pub bgp_id: Ipv4Addr,
    pub capabilities: Vec<Capability>,
}

impl Open {
    /// An OPEN for `asn`, with AS_TRANS in the 2-octet field when needed and the 4-octet
    /// AS capability always present.
    pub fn new(asn: u32, hold_time: u16, bgp_id: Ipv4Addr, mut caps: Vec<Capability>) -> Open {
        if !caps.iter().any(|c| matches!(c, Capability::FourOctetAs(_))) {
            caps.push(Capability::FourOctetAs(asn));
        }
        Open {
            my_as: u16::try_from(asn).unwrap_or(AS_TRANS),
            hold_time,
            bgp_id,
            capabilities: caps,
        }
    }

    /// The sender's AS: the 4-octet capability's when present (RFC 6793 §4.1).
    pub fn asn(&self) -> u32 {
        self.capabilities
            .iter()
            .find_map(|c| match c {
                Capability::FourOctetAs(a) => Some(*a),
                _ => None,
            })
            .unwrap_or(u32::from(self.my_as))
    }

    pub fn families(&self) -> Vec<Family> {
        self.capabilities
            .iter()
            .filter_map(|c| match c {
                Capability::Multiprotocol(f) => Some(*f),
                _ => None,
            })
            .collect()
    }

    pub fn graceful_restart(&self) -> Option<&GracefulRestart> {
        self.capabilities.iter().find_map(|c| match c {
            Capability::GracefulRestart(g) => Some(g),
            _ => None,
        })
    }

    pub fn has(&self, want: &Capability) -> bool {
        self.capabilities.contains(want)
    }
}

/// NOTIFICATION (RFC 4271 §4.5): also the error type of every decoder.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", describe(self.code, self.subcode))]
pub struct Notification {
    pub code: u8,
    pub subcode: u8,
    pub data: Vec<u8>,
}

/// Error codes and subcodes (RFC 4271 §6, RFC 4486, RFC 7313).
pub mod err {
    pub const HEADER: u8 = 1;
    pub const CONN_NOT_SYNCHRONIZED: u8 = 1;
    pub const BAD_MESSAGE_LENGTH: u8 = 2;
    pub const BAD_MESSAGE_TYPE: u8 = 3;

    pub const OPEN: u8 = 2;
    pub const UNSUPPORTED_VERSION: u8 = 1;
    pub const BAD_PEER_AS: u8 = 2;
    pub const BAD_BGP_ID: u8 = 3;
    pub const UNSUPPORTED_OPT_PARAM: u8 = 4;
    pub const UNACCEPTABLE_HOLD_TIME: u8 = 6;

    pub const UPDATE: u8 = 3;
    pub const MALFORMED_ATTR_LIST: u8 = 1;
    pub const UNRECOGNIZED_WELL_KNOWN: u8 = 2;
    pub const MISSING_WELL_KNOWN: u8 = 3;
    pub const ATTR_FLAGS: u8 = 4;
    pub const ATTR_LENGTH: u8 = 5;
    pub const INVALID_ORIGIN: u8 = 6;
    pub const INVALID_NEXT_HOP: u8 = 8;
    pub const OPTIONAL_ATTR: u8 = 9;
    pub const INVALID_NETWORK: u8 = 10;
    pub const MALFORMED_AS_PATH: u8 = 11;

    pub const HOLD_TIMER_EXPIRED: u8 = 4;
    pub const FSM: u8 = 5;

    pub const CEASE: u8 = 6;
    pub const MAX_PREFIXES: u8 = 1;
    pub const ADMIN_SHUTDOWN: u8 = 2;
    pub const PEER_DECONFIGURED: u8 = 3;
    pub const ADMIN_RESET: u8 = 4;
    pub const CONNECTION_REJECTED: u8 = 5;
    pub const OTHER_CONFIG_CHANGE: u8 = 6;
    pub const COLLISION_RESOLUTION: u8 = 7;
    pub const OUT_OF_RESOURCES: u8 = 8;

    pub const ROUTE_REFRESH: u8 = 7;
    pub const INVALID_RR_LENGTH: u8 = 1;

    /// RFC 9687.
    pub const SEND_HOLD_TIMER_EXPIRED: u8 = 8;
}

/// Words for a code/subcode, as `calicoctl node status` and the logs show them.
pub fn describe(code: u8, subcode: u8) -> String {
    let (c, s) = match code {
        err::HEADER => (
            "Message header error",
            match subcode {
                1 => "connection not synchronized",
                2 => "bad message length",
                3 => "bad message type",
                _ => "",
            },
        ),
        err::OPEN => (
            "OPEN message error",
            match subcode {
                1 => "unsupported version number",
                2 => "bad peer AS",
                3 => "bad BGP identifier",
                4 => "unsupported optional parameter",
                6 => "unacceptable hold time",
                7 => "unsupported capability",
                _ => "",
            },
        ),
        err::UPDATE => (
            "UPDATE message error",
            match subcode {
                1 => "malformed attribute list",
                2 => "unrecognized well-known attribute",
                3 => "missing well-known attribute",
                4 => "attribute flags error",
                5 => "attribute length error",
                6 => "invalid ORIGIN attribute",
                8 => "invalid NEXT_HOP attribute",
                9 => "optional attribute error",
                10 => "invalid network field",
                11 => "malformed AS_PATH",
                _ => "",
            },
        ),
        err::HOLD_TIMER_EXPIRED => ("Hold timer expired", ""),
        err::FSM => ("Finite state machine error", ""),
        err::CEASE => (
            "Cease",
            match subcode {
                1 => "maximum number of prefixes reached",
                2 => "administrative shutdown",
                3 => "peer de-configured",
                4 => "administrative reset",
                5 => "connection rejected",
                6 => "other configuration change",
                7 => "connection collision resolution",
                8 => "out of resources",
                _ => "",
            },
        ),
        err::ROUTE_REFRESH => ("ROUTE-REFRESH message error", ""),
        err::SEND_HOLD_TIMER_EXPIRED => ("Send hold timer expired", ""),
        _ => ("Unknown error", ""),
    };
    if s.is_empty() {
        format!("{c} (code {code}, subcode {subcode})")
    } else {
        format!("{c}: {s} (code {code}, subcode {subcode})")
    }
}

impl Notification {
    pub fn new(code: u8, subcode: u8, data: impl Into<Vec<u8>>) -> Notification {
        Notification {
            code,
            subcode,
            data: data.into(),
        }
    }
}

/// ROUTE-REFRESH (RFC 2918, with RFC 7313's message subtype).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteRefresh {
    pub family: Family,
    /// 0 = normal request, 1 = Beginning of Route Refresh, 2 = End of Route Refresh.
    pub subtype: u8,
}

/// What decoding needs from the session: negotiated 4-octet AS, whether the peer is
/// internal (LOCAL_PREF from an external peer is discarded, RFC 7606 §7.5), and the
/// families whose prefixes carry path identifiers (RFC 7911), received and sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Codec {
    pub four_octet_as: bool,
    pub ibgp: bool,
    pub add_path_rx: AddPathFamilies,
    pub add_path_tx: AddPathFamilies,
}

impl Default for Codec {
    fn default() -> Self {
        Codec {
            four_octet_as: true,
            ibgp: true,
            add_path_rx: AddPathFamilies::default(),
            add_path_tx: AddPathFamilies::default(),
        }
    }
}

/// Which of our families carry path identifiers in one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AddPathFamilies {
    pub ipv4: bool,
    pub ipv6: bool,
}

impl AddPathFamilies {
    pub fn has(&self, family: Family) -> bool {
        (family == IPV4_UNICAST && self.ipv4) || (family == IPV6_UNICAST && self.ipv6)
    }

    /// RFC 7911 §3: the families where we said `ours` (1 receive, 2 send) and the peer's
    /// capability says the other direction.
    pub fn negotiate(ours: &[(Family, u8)], theirs: &[(Family, u8)], ours_bit: u8) -> Self {
        let both = |f: Family| {
            ours.iter().any(|(g, m)| *g == f && m & ours_bit != 0)
                && theirs
                    .iter()
                    .any(|(g, m)| *g == f && m & (3 ^ ours_bit) != 0)
        };
        AddPathFamilies {
            ipv4: both(IPV4_UNICAST),
            ipv6: both(IPV6_UNICAST),
        }
    }
}

/// A BGP message. (UPDATE is the large variant and the common one: boxing it would add an
/// allocation per message for nothing, since messages are decoded and consumed, not stored.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Open(Open),
    Update(Update),
    Notification(Notification),
    Keepalive,
    RouteRefresh(RouteRefresh),
}

/// A bounds-checked reader over a message body.
pub(crate) struct Reader<'a> {
    pub(crate) buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    pub(crate) fn len(&self) -> usize {
        self.buf.len()
    }
    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Some(a)
    }
    pub(crate) fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// If `buf` starts with a whole message, its length. Errors are header errors (RFC 4271
/// §6.1): a bad marker, a length outside 19..=4096 or wrong for the type, an unknown type.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, Notification> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    if buf[..16].iter().any(|b| *b != 0xff) {
        return Err(Notification::new(
            err::HEADER,
            err::CONN_NOT_SYNCHRONIZED,
            [],
        ));
    }
    let len = usize::from(u16::from_be_bytes([buf[16], buf[17]]));
    let bad_len = || {
        Notification::new(
            err::HEADER,
            err::BAD_MESSAGE_LENGTH,
            (len as u16).to_be_bytes(),
        )
    };
    let min = match buf[18] {
        kind::OPEN => 29,
        kind::UPDATE => 23,
        kind::NOTIFICATION => 21,
        kind::KEEPALIVE => HEADER_LEN,
        kind::ROUTE_REFRESH => 23,
        t => return Err(Notification::new(err::HEADER, err::BAD_MESSAGE_TYPE, [t])),
    };
    if !(min..=MAX_MESSAGE_LEN).contains(&len) || (buf[18] == kind::KEEPALIVE && len != HEADER_LEN)
    {
        return Err(bad_len());
    }
    Ok((buf.len() >= len).then_some(len))
}

/// Decode one whole message (as delimited by [`frame_len`]).
pub fn decode(msg: &[u8], codec: &Codec) -> Result<Message, Notification> {
    let Some(len) = frame_len(msg)? else {
        return Err(Notification::new(err::HEADER, err::BAD_MESSAGE_LENGTH, []));
    };
    let body = &msg[HEADER_LEN..len];
    match msg[18] {
        kind::OPEN => decode_open(body).map(Message::Open),
        kind::UPDATE => super::update::decode_update(body, codec).map(Message::Update),
        kind::NOTIFICATION => Ok(Message::Notification(Notification {
            code: body[0],
            subcode: body[1],
            data: body[2..].to_vec(),
        })),
        kind::KEEPALIVE => Ok(Message::Keepalive),
        kind::ROUTE_REFRESH => {
            if body.len() != 4 {
                return Err(Notification::new(
                    err::ROUTE_REFRESH,
                    err::INVALID_RR_LENGTH,
                    msg[..len].to_vec(),
                ));
            }
            Ok(Message::RouteRefresh(RouteRefresh {
                family: (Afi(u16::from_be_bytes([body[0], body[1]])), Safi(body[3])),
                subtype: body[2],
            }))
        }
        _ => unreachable!("frame_len rejects unknown types"),
    }
}

fn decode_open(body: &[u8]) -> Result<Open, Notification> {
    let mut r = Reader::new(body);
    let malformed = || Notification::new(err::OPEN, 0, []);
    let version = r.u8().ok_or_else(malformed)?;
    if version != 4 {
        return Err(Notification::new(
            err::OPEN,
            err::UNSUPPORTED_VERSION,
            4u16.to_be_bytes(),
        ));
    }
    let my_as = r.u16().ok_or_else(malformed)?;
    let hold_time = r.u16().ok_or_else(malformed)?;
    if hold_time == 1 || hold_time == 2 {
        return Err(Notification::new(
            err::OPEN,
            err::UNACCEPTABLE_HOLD_TIME,
            [],
        ));
    }
    let id = r.u32().ok_or_else(malformed)?;
    let bgp_id = Ipv4Addr::from(id);
    if id == 0 {
        return Err(Notification::new(
            err::OPEN,
            err::BAD_BGP_ID,
            id.to_be_bytes(),
        ));
    }
    let opt_len = usize::from(r.u8().ok_or_else(malformed)?);
    if opt_len != r.len() {
        return Err(malformed());
    }
    let mut capabilities = Vec::new();
    while !r.is_empty() {
        let ptype = r.u8().ok_or_else(malformed)?;
        let plen = usize::from(r.u8().ok_or_else(malformed)?);
        let value = r.take(plen).ok_or_else(malformed)?;
        if ptype != 2 {
            return Err(Notification::new(err::OPEN, err::UNSUPPORTED_OPT_PARAM, []));
        }
        let mut c = Reader::new(value);
        while !c.is_empty() {
            let code = c.u8().ok_or_else(malformed)?;
            let clen = usize::from(c.u8().ok_or_else(malformed)?);
            let v = c.take(clen).ok_or_else(malformed)?;
            capabilities.push(decode_capability(code, v).ok_or_else(malformed)?);
        }
    }
    Ok(Open {
        my_as,
        hold_time,
        bgp_id,
        capabilities,
    })
}

fn decode_capability(code: u8, v: &[u8]) -> Option<Capability> {
    let mut r = Reader::new(v);
    let cap = match code {
        1 => {
            let afi = r.u16()?;
            let _reserved = r.u8()?;
            let safi = r.u8()?;
            Capability::Multiprotocol((Afi(afi), Safi(safi)))
        }
        2 if v.is_empty() => Capability::RouteRefresh,
        70 if v.is_empty() => Capability::EnhancedRouteRefresh,
        65 => Capability::FourOctetAs(r.u32()?),
        64 => {
            let flags_time = r.u16()?;
            let mut families = Vec::new();
            while !r.is_empty() {
                let afi = r.u16()?;
                let safi = r.u8()?;
                let flags = r.u8()?;
                families.push(((Afi(afi), Safi(safi)), flags & 0x80 != 0));
            }
            Capability::GracefulRestart(GracefulRestart {
                restarting: flags_time & 0x8000 != 0,
                restart_time: flags_time & 0x0fff,
                families,
            })
        }
        69 => {
            let mut families = Vec::new();
            while !r.is_empty() {
                let afi = r.u16()?;
                let safi = r.u8()?;
                let mode = r.u8()?;
                families.push(((Afi(afi), Safi(safi)), mode));
            }
            Capability::AddPath(families)
        }
        _ => {
            return Some(Capability::Unknown {
                code,
                value: v.to_vec(),
            });
        }
    };
    r.is_empty().then_some(cap)
}

fn encode_capability(c: &Capability, out: &mut Vec<u8>) {
    let (code, value): (u8, Vec<u8>) = match c {
        Capability::Multiprotocol((afi, safi)) => {
            let mut v = afi.0.to_be_bytes().to_vec();
            v.extend([0, safi.0]);
            (1, v)
        }
        Capability::RouteRefresh => (2, vec![]),
        Capability::EnhancedRouteRefresh => (70, vec![]),
        Capability::FourOctetAs(a) => (65, a.to_be_bytes().to_vec()),
        Capability::GracefulRestart(g) => {
            let mut v = (u16::from(g.restarting) << 15 | (g.restart_time & 0x0fff))
                .to_be_bytes()
                .to_vec();
            for ((afi, safi), fwd) in &g.families {
                v.extend(afi.0.to_be_bytes());
                v.extend([safi.0, if *fwd { 0x80 } else { 0 }]);
            }
            (64, v)
        }
        Capability::AddPath(fams) => {
            let mut v = Vec::new();
            for ((afi, safi), mode) in fams {
                v.extend(afi.0.to_be_bytes());
                v.extend([safi.0, *mode]);
            }
            (69, v)
        }
        Capability::Unknown { code, value } => (*code, value.clone()),
    };
    out.push(code);
    out.push(value.len() as u8);
    out.extend(value);
}

fn header(out: &mut BytesMut, kind: u8, body_len: usize) {
    out.put_slice(&[0xff; 16]);
    out.put_u16((HEADER_LEN + body_len) as u16);
    out.put_u8(kind);
}

/// A message that does not fit in [`MAX_MESSAGE_LEN`] bytes, which RFC 4271 §4.1 forbids
/// sending. An UPDATE's size depends on what peers sent us (communities, AS paths), so this
/// is an error to handle, never a panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{kind} message of {len} bytes exceeds the BGP maximum of {MAX_MESSAGE_LEN} bytes (RFC 4271 §4.1)"
)]
pub struct TooLarge {
    pub kind: &'static str,
    pub len: usize,
}

impl Message {
    /// Append the wire form to `out`. An UPDATE too large for one message is the caller's
    /// to split (see `Update::split`); one that still does not fit (its attributes alone
    /// are too large) is refused, and nothing is appended.
    pub fn encode(&self, codec: &Codec, out: &mut BytesMut) -> Result<(), TooLarge> {
        match self {
            Message::Open(o) => {
                let mut caps = Vec::new();
                for c in &o.capabilities {
                    encode_capability(c, &mut caps);
                }
                // One capabilities parameter per 255 bytes.
                let mut params = Vec::new();
                for chunk in caps.chunks(255) {
                    params.extend([2, chunk.len() as u8]);
                    params.extend(chunk);
                }
                if params.len() > 255 {
                    return Err(TooLarge {
                        kind: "OPEN",
                        len: HEADER_LEN + 10 + params.len(),
                    });
                }
                header(out, kind::OPEN, 10 + params.len());
                out.put_u8(4);
                out.put_u16(o.my_as);
                out.put_u16(o.hold_time);
                out.put_slice(&o.bgp_id.octets());
                out.put_u8(params.len() as u8);
                out.put_slice(&params);
            }
            Message::Update(u) => {
                let body = u.encode_body(codec);
                if HEADER_LEN + body.len() > MAX_MESSAGE_LEN {
                    return Err(TooLarge {
                        kind: "UPDATE",
                        len: HEADER_LEN + body.len(),
                    });
                }
                header(out, kind::UPDATE, body.len());
                out.put_slice(&body);
            }
            Message::Notification(n) => {
                let data = &n.data[..n.data.len().min(MAX_MESSAGE_LEN - HEADER_LEN - 2)];
                header(out, kind::NOTIFICATION, 2 + data.len());
                out.put_u8(n.code);
                out.put_u8(n.subcode);
                out.put_slice(data);
            }
            Message::Keepalive => header(out, kind::KEEPALIVE, 0),
            Message::RouteRefresh(r) => {
                header(out, kind::ROUTE_REFRESH, 4);
                out.put_u16(r.family.0.0);
                out.put_u8(r.subtype);
                out.put_u8(r.family.1.0);
            }
        }
        Ok(())
    }

    /// The wire form in a fresh buffer.
    pub fn to_bytes(&self, codec: &Codec) -> Result<Vec<u8>, TooLarge> {
        let mut b = BytesMut::new();
        self.encode(codec, &mut b)?;
        Ok(b.to_vec())
    }
}

/// What the fuzz target and its corpus replay run: frame and decode `data` with every
/// codec setting, and use what comes out. Must never panic.
pub fn fuzz_decode(data: &[u8]) {
    for four_octet_as in [true, false] {
        for ibgp in [true, false] {
            for add_path in [false, true] {
                let codec = Codec {
                    four_octet_as,
                    ibgp,
                    add_path_rx: AddPathFamilies {
                        ipv4: add_path,
                        ipv6: add_path,
                    },
                    ..Codec::default()
                };
                let mut rest = data;
                while let Ok(Some(len)) = frame_len(rest) {
                    if let Ok(Message::Update(u)) = decode(&rest[..len], &codec) {
                        let _ = u.effective();
                        let _ = u.is_end_of_rib();
                    }
                    rest = &rest[len..];
                }
            }
        }
    }
}
