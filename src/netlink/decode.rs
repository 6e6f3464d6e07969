//! Decoding the kernel's replies and notifications. Acks and notifications are decoded
//! with netlink-packet-core's and netlink-packet-route's buffer types (`ErrorBuffer`,
//! `RouteHeader`, `LinkHeader`, `NlasIterator`). The walk over a datagram's messages and
//! the dump's routes keep byte offsets written by hand, because the buffer types cost
//! measurably more there: a dump of a million routes is decoded on the writer's thread at
//! every resync. Measured 2026-12-07 on this project's machine (AMD EPYC, 2 shared vCPUs),
//! release build, thread CPU time, best of 15 interleaved rounds, a dump of 100k routes
//! (`typed_decode_costs_no_more_than_hand_written_offsets`), two runs: hand-written
//! offsets 1.94 ms and 2.05 ms, buffer types (`NetlinkBuffer`, `RouteHeader`,
//! `NlasIterator`) 8.02 ms and 8.33 ms (4x), `RouteMessage::parse` 29.7 ms and 34.5 ms
//! (15-17x). At a million routes the buffer types would add about 60 ms of the writer's
//! CPU to every resync.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_route::link::LinkHeader;
use netlink_packet_route::route::RouteHeader;
use rtnetlink::packet_core::{ErrorBuffer, NlaBuffer, NlasIterator};

/// `struct rtmsg`'s length: the attributes follow it.
const RTMSG_LEN: usize = 12;
/// `struct ifinfomsg`'s length.
const IFINFOMSG_LEN: usize = 16;

/// A route as a dump reports it, decoded only as far as Felix compares routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRoute {
    pub dst: ipnet::IpNet,
    pub table: u32,
    pub kind: u8,
    pub protocol: u8,
    pub scope: u8,
    pub flags: u32,
    pub oif: Option<u32>,
    pub gateway: Option<IpAddr>,
    pub priority: u32,
}

/// One netlink message of a datagram: its type, sequence number and payload (after the
/// 16-byte header).
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    pub kind: u16,
    pub seq: u32,
    pub payload: &'a [u8],
}

/// The messages of one datagram from the kernel, in order. A message whose length does
/// not fit ends the walk with `Err(())` (the rest cannot be delimited). Offsets by hand:
/// see the module's figures.
pub fn messages(buf: &[u8]) -> impl Iterator<Item = Result<Message<'_>, ()>> {
    let mut rest = buf;
    let mut broken = false;
    std::iter::from_fn(move || {
        if rest.is_empty() || broken {
            return None;
        }
        // struct nlmsghdr: length (u32), type (u16), flags (u16), sequence (u32), port.
        let len = rest
            .get(0..4)
            .map_or(0, |b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize);
        if rest.len() < 16 || len < 16 || len > rest.len() {
            broken = true;
            return Some(Err(()));
        }
        let msg = Message {
            kind: u16::from_ne_bytes([rest[4], rest[5]]),
            seq: u32::from_ne_bytes([rest[8], rest[9], rest[10], rest[11]]),
            payload: &rest[16..len],
        };
        // Messages are aligned to 4 bytes; the last one's padding may be missing.
        rest = &rest[((len + 3) & !3).min(rest.len())..];
        Some(Ok(msg))
    })
}

/// The code of an NLMSG_ERROR message's payload: 0 for an acknowledgement, else the
/// negative errno. None when the payload is too short to hold one.
pub fn error_code(payload: &[u8]) -> Option<i32> {
    let e = ErrorBuffer::new_checked(payload).ok()?;
    Some(e.code().map_or(0, |c| c.get()))
}

/// The attributes after a fixed header, until the first malformed one.
fn attributes(after: &[u8]) -> impl Iterator<Item = NlaBuffer<&[u8]>> {
    NlasIterator::new(after).map_while(Result::ok)
}

fn u32_of(v: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(v.get(..4)?.try_into().ok()?))
}

fn addr_of(v: &[u8], v6: bool) -> Option<IpAddr> {
    if v6 {
        <[u8; 16]>::try_from(v.get(..16)?).ok().map(IpAddr::from)
    } else {
        <[u8; 4]>::try_from(v.get(..4)?).ok().map(IpAddr::from)
    }
}

/// Decode an RTM_NEWROUTE payload (rtmsg and attributes) as far as Felix compares it.
/// Offsets by hand: see the module's figures.
pub fn route(rt: &[u8]) -> Option<RawRoute> {
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
    if rt.len() < RTMSG_LEN {
        return None;
    }
    let v6 = rt[0] == libc::AF_INET6 as u8;
    let mut r = RawRoute {
        dst: ipnet::IpNet::V4(ipnet::Ipv4Net::default()),
        table: u32::from(rt[4]),
        kind: rt[7],
        protocol: rt[5],
        scope: rt[6],
        flags: u32::from_ne_bytes([rt[8], rt[9], rt[10], rt[11]]),
        oif: None,
        gateway: None,
        priority: 0,
    };
    let mut dst = None;
    // struct rtattr: length (u16), type (u16), value; each aligned to 4 bytes.
    let mut a = RTMSG_LEN;
    while a + 4 <= rt.len() {
        let alen = u16::from_ne_bytes([rt[a], rt[a + 1]]) as usize;
        let atype = u16::from_ne_bytes([rt[a + 2], rt[a + 3]]);
        if alen < 4 || a + alen > rt.len() {
            break;
        }
        let v = &rt[a + 4..a + alen];
        match atype {
            libc::RTA_DST => dst = addr_of(v, v6),
            libc::RTA_GATEWAY => r.gateway = addr_of(v, v6),
            libc::RTA_OIF => r.oif = u32_of(v).or(r.oif),
            libc::RTA_PRIORITY => r.priority = u32_of(v).unwrap_or(r.priority),
            libc::RTA_TABLE => r.table = u32_of(v).unwrap_or(r.table),
            _ => {}
        }
        a += (alen + 3) & !3;
    }
    let dst = dst.unwrap_or(if v6 {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    });
    r.dst = ipnet::IpNet::new(dst, rt[1]).ok()?;
    Some(r)
}

/// One notification of the link and route groups, reduced to what a listener acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// RTM_NEWLINK or RTM_DELLINK: the index, and the name when the message has one.
    Link { index: u32, name: Option<String> },
    /// RTM_NEWROUTE (`added`) or RTM_DELROUTE: the route's protocol, and its output
    /// interface when it has one (blackholes and multipath routes have none).
    Route {
        added: bool,
        protocol: u8,
        oif: Option<u32>,
    },
    /// RTM_NEWADDR or RTM_DELADDR: the address's scope (0 global, 253 link, 254 host).
    Addr { scope: u8 },
    /// A message of another type, one too short for its type, or a length that does
    /// not fit (the rest of the datagram is lost with it).
    NotUnderstood,
}

/// The notifications of one datagram, in order.
pub fn notices(buf: &[u8]) -> impl Iterator<Item = Notice> + '_ {
    messages(buf).map(|m| match m {
        Ok(m) => notice(&m),
        Err(()) => Notice::NotUnderstood,
    })
}

fn notice(m: &Message<'_>) -> Notice {
    match m.kind {
        libc::RTM_NEWLINK | libc::RTM_DELLINK if m.payload.len() >= IFINFOMSG_LEN => {
            let Ok(h) = LinkHeader::parse(m.payload) else {
                return Notice::NotUnderstood;
            };
            let name = attributes(&m.payload[IFINFOMSG_LEN..])
                .find(|a| a.kind() == libc::IFLA_IFNAME)
                .map(|a| {
                    let v = a.value().split(|c| *c == 0).next().unwrap_or_default();
                    String::from_utf8_lossy(v).into_owned()
                });
            Notice::Link {
                index: h.index,
                name,
            }
        }
        libc::RTM_NEWROUTE | libc::RTM_DELROUTE if m.payload.len() >= RTMSG_LEN => {
            let Ok(h) = RouteHeader::parse(m.payload) else {
                return Notice::NotUnderstood;
            };
            let oif = attributes(&m.payload[RTMSG_LEN..])
                .find(|a| a.kind() == libc::RTA_OIF)
                .and_then(|a| u32_of(a.value()));
            Notice::Route {
                added: m.kind == libc::RTM_NEWROUTE,
                protocol: u8::from(h.protocol),
                oif,
            }
        }
        // struct ifaddrmsg { family, prefixlen, flags, scope: u8; index: u32 }
        libc::RTM_NEWADDR | libc::RTM_DELADDR if m.payload.len() >= 8 => Notice::Addr {
            scope: m.payload[3],
        },
        _ => Notice::NotUnderstood,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An RTM_NEWROUTE message as the kernel sends it in a dump: rtmsg, RTA_TABLE, RTA_DST,
    /// RTA_PRIORITY when not 0, RTA_GATEWAY and RTA_OIF when given.
    pub(crate) fn route_message(
        dst: ipnet::IpNet,
        protocol: u8,
        gateway: Option<IpAddr>,
        oif: Option<u32>,
        priority: u32,
    ) -> Vec<u8> {
        let mut body = vec![0u8; RTMSG_LEN];
        body[0] = if dst.addr().is_ipv6() {
            libc::AF_INET6
        } else {
            libc::AF_INET
        } as u8;
        body[1] = dst.prefix_len();
        body[4] = 254;
        body[5] = protocol;
        body[7] = 1;
        body[8..12].copy_from_slice(&4u32.to_ne_bytes());
        let mut attr = |kind: u16, v: &[u8]| {
            let len = 4 + v.len();
            body.extend_from_slice(&(len as u16).to_ne_bytes());
            body.extend_from_slice(&kind.to_ne_bytes());
            body.extend_from_slice(v);
            body.resize((body.len() + 3) & !3, 0);
        };
        let ip = |a: IpAddr| match a {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        attr(libc::RTA_TABLE, &254u32.to_ne_bytes());
        attr(libc::RTA_DST, &ip(dst.addr()));
        if priority != 0 {
            attr(libc::RTA_PRIORITY, &priority.to_ne_bytes());
        }
        if let Some(g) = gateway {
            attr(libc::RTA_GATEWAY, &ip(g));
        }
        if let Some(i) = oif {
            attr(libc::RTA_OIF, &i.to_ne_bytes());
        }
        let mut m = vec![0u8; 16];
        m[0..4].copy_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        m[4..6].copy_from_slice(&libc::RTM_NEWROUTE.to_ne_bytes());
        m[8..12].copy_from_slice(&0x0d0d_0d0du32.to_ne_bytes());
        m.extend(body);
        m
    }

    #[test]
    fn a_dumped_route_decodes_to_what_felix_compares() {
        let dst: ipnet::IpNet = "10.244.1.0/26".parse().unwrap();
        let m = route_message(dst, 80, Some("10.0.0.2".parse().unwrap()), Some(7), 20);
        let all: Vec<_> = messages(&m).collect();
        assert_eq!(all.len(), 1);
        let msg = all[0].unwrap();
        assert_eq!((msg.kind, msg.seq), (libc::RTM_NEWROUTE, 0x0d0d_0d0d));
        let r = route(msg.payload).unwrap();
        assert_eq!(
            r,
            RawRoute {
                dst,
                table: 254,
                kind: 1,
                protocol: 80,
                scope: 0,
                flags: 4,
                oif: Some(7),
                gateway: Some("10.0.0.2".parse().unwrap()),
                priority: 20,
            }
        );
        let v6: ipnet::IpNet = "fd00:244::/122".parse().unwrap();
        let m6 = route_message(v6, 3, None, None, 1024);
        let r6 = route(messages(&m6).next().unwrap().unwrap().payload).unwrap();
        assert_eq!(
            (r6.dst, r6.oif, r6.gateway, r6.priority),
            (v6, None, None, 1024)
        );
        // Too short for an rtmsg: nothing, no panic.
        assert_eq!(route(&[2, 24, 0]), None);
    }

    #[test]
    fn acks_errors_and_broken_lengths() {
        let mut ack = vec![0u8; 36];
        ack[0..4].copy_from_slice(&36u32.to_ne_bytes());
        ack[4..6].copy_from_slice(&2u16.to_ne_bytes());
        let mut nack = ack.clone();
        nack[16..20].copy_from_slice(&(-libc::ESRCH).to_ne_bytes());
        let both = [ack, nack].concat();
        let codes: Vec<_> = messages(&both)
            .map(|m| error_code(m.unwrap().payload))
            .collect();
        assert_eq!(codes, [Some(0), Some(-libc::ESRCH)]);
        let mut broken = both.clone();
        broken[36..40].copy_from_slice(&400u32.to_ne_bytes());
        let walked: Vec<bool> = messages(&broken).map(|m| m.is_ok()).collect();
        assert_eq!(walked, [true, false]);
    }

    /// The production decoder (hand-written offsets).
    fn hand_written(buf: &[u8], out: &mut Vec<RawRoute>) {
        for m in messages(buf).map_while(Result::ok) {
            if let Some(r) = route(m.payload) {
                out.push(r);
            }
        }
    }

    /// The same with netlink-packet-core / netlink-packet-route buffer types: the
    /// alternative measured against it.
    fn typed(buf: &[u8], out: &mut Vec<RawRoute>) {
        use rtnetlink::packet_core::NetlinkBuffer;
        let mut rest = buf;
        while let Ok(m) = NetlinkBuffer::new_checked(rest) {
            let len = m.length() as usize;
            if let Some(r) = typed_route(m.payload()) {
                out.push(r);
            }
            rest = &rest[((len + 3) & !3).min(rest.len())..];
        }
    }

    fn typed_route(payload: &[u8]) -> Option<RawRoute> {
        let h = RouteHeader::parse(payload).ok()?;
        let v6 = h.address_family == netlink_packet_route::AddressFamily::Inet6;
        let mut r = RawRoute {
            dst: ipnet::IpNet::V4(ipnet::Ipv4Net::default()),
            table: u32::from(h.table),
            kind: u8::from(h.kind),
            protocol: u8::from(h.protocol),
            scope: u8::from(h.scope),
            flags: h.flags.bits(),
            oif: None,
            gateway: None,
            priority: 0,
        };
        let mut dst = None;
        for a in attributes(payload.get(RTMSG_LEN..)?) {
            let v = a.value();
            match a.kind() {
                libc::RTA_DST => dst = addr_of(v, v6),
                libc::RTA_GATEWAY => r.gateway = addr_of(v, v6),
                libc::RTA_OIF => r.oif = u32_of(v).or(r.oif),
                libc::RTA_PRIORITY => r.priority = u32_of(v).unwrap_or(r.priority),
                libc::RTA_TABLE => r.table = u32_of(v).unwrap_or(r.table),
                _ => {}
            }
        }
        let dst = dst.unwrap_or(if v6 {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        });
        r.dst = ipnet::IpNet::new(dst, h.destination_prefix_length).ok()?;
        Some(r)
    }

    /// Parsed in full (`RouteMessage::parse`: every attribute decoded into a `Vec`), then
    /// reduced: what decoding with netlink-packet-route's high-level types costs.
    fn parsed(buf: &[u8], out: &mut Vec<RawRoute>) {
        use rtnetlink::packet_core::Parseable;
        for m in messages(buf).map_while(Result::ok) {
            if let Ok(msg) = netlink_packet_route::route::RouteMessage::parse(m.payload)
                && let Some(r) = crate::netlink::routes::raw(&msg)
            {
                out.push(r);
            }
        }
    }

    /// A decoder of one datagram of a dump.
    type Decoder = fn(&[u8], &mut Vec<RawRoute>);

    /// This thread's CPU time: immune to the preemptions of a shared machine.
    fn thread_cpu() -> std::time::Duration {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec we own.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
        std::time::Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
    }

    /// The measurement behind the module's choice (figures in the module's doc): a dump of
    /// 100k routes (in datagrams of
    /// 32 KiB, as the kernel fills a dump's buffer) decoded three ways, interleaved, 15
    /// rounds, the least thread CPU time of each. Run with
    /// `nice cargo test --release --lib typed_decode_costs -- --ignored --nocapture`.
    #[test]
    #[ignore = "a release measurement, run by hand"]
    fn typed_decode_costs_no_more_than_hand_written_offsets() {
        let mut datagrams = vec![Vec::new()];
        for i in 0..100_000u32 {
            let dst =
                ipnet::IpNet::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i * 64)), 26).unwrap();
            let m = route_message(dst, 80, Some("10.0.0.2".parse().unwrap()), Some(2), 0);
            if datagrams.last().unwrap().len() + m.len() > 32 * 1024 {
                datagrams.push(Vec::new());
            }
            datagrams.last_mut().unwrap().extend(m);
        }
        let run = |f: Decoder| {
            let mut out = Vec::with_capacity(100_000);
            let t = thread_cpu();
            for d in &datagrams {
                f(d, &mut out);
            }
            let took = thread_cpu() - t;
            assert_eq!(out.len(), 100_000);
            std::hint::black_box(out);
            took
        };
        let ways: [(&str, Decoder); 3] = [
            ("hand-written offsets", hand_written),
            ("buffer types", typed),
            ("RouteMessage::parse", parsed),
        ];
        let mut best = [std::time::Duration::MAX; 3];
        for _ in 0..15 {
            for (i, (_, f)) in ways.iter().enumerate() {
                best[i] = best[i].min(run(*f));
            }
        }
        for (i, (name, _)) in ways.iter().enumerate() {
            println!("decode 100k routes, {name}: {:?} CPU", best[i]);
        }
        let mut a = Vec::new();
        let mut b = Vec::new();
        let mut c = Vec::new();
        hand_written(&datagrams[0], &mut a);
        self::typed(&datagrams[0], &mut b);
        parsed(&datagrams[0], &mut c);
        assert_eq!(a, b, "the decoders agree");
        assert_eq!(a, c, "the decoders agree");
    }
}
