//! Route requests in batches: many netlink messages per `sendmsg` on a socket of its own,
//! only the last of each batch acknowledged (the kernel reports every failure anyway, and
//! handles a batch's messages in order, so the last one's ack means all were handled).
//! One system call and one wake-up per batch instead of per route. A [`Writer`] does this
//! on a thread of its own, jobs in order, so Felix computes the next changes while the
//! kernel installs the last ones. Requests are serialized on the caller's thread: the
//! writer thread, the bottleneck of a large install, only makes system calls.

use std::io;

use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::route::RouteMessage;
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use rtnetlink::sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// Messages per `sendmsg`.
const BATCH: usize = 256;

/// The kernel's answer to a request: an error code, 0 for an acknowledgement.
const NLMSG_ERROR: u16 = 2;

/// Requests per job of a long [`Writer::send`].
const PART: usize = 16 * 1024;

/// One request: add-or-replace, or delete.
pub enum Request {
    Replace(RouteMessage),
    Delete(RouteMessage),
}

/// Each request's outcome, in order (`Err(errno)` when the kernel refused it).
pub type Outcomes = Vec<Result<(), i32>>;

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
    pub gateway: Option<std::net::IpAddr>,
    pub priority: u32,
}

enum Reply {
    /// The caller waits for the outcomes.
    Wait(tokio::sync::oneshot::Sender<io::Result<Outcomes>>),
    /// Failures go to the writer's failure channel, labelled with the request's prefix
    /// (None: not reported). Formatted only for a failure: a million labels made up front
    /// cost a third of a second.
    Report(Vec<Option<ipnet::IpNet>>),
}

/// Requests serialized back to back, sequence numbers 1, 2, …: request i is
/// `buf[starts[i]..starts[i + 1]]` (the last one runs to the end).
struct Encoded {
    buf: Vec<u8>,
    starts: Vec<usize>,
}

fn encode(requests: Vec<Request>) -> Encoded {
    let mut buf = Vec::new();
    let mut starts = Vec::with_capacity(requests.len());
    for (i, req) in requests.into_iter().enumerate() {
        let (payload, flags) = match req {
            Request::Replace(m) => (
                RouteNetlinkMessage::NewRoute(m),
                NLM_F_REQUEST | NLM_F_CREATE | NLM_F_REPLACE,
            ),
            Request::Delete(m) => (RouteNetlinkMessage::DelRoute(m), NLM_F_REQUEST),
        };
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        // Sequence numbers are the request's index (+1: 0 is never used).
        header.sequence_number = i as u32 + 1;
        let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(payload));
        msg.finalize();
        let at = buf.len();
        starts.push(at);
        buf.resize(at + msg.buffer_len(), 0);
        msg.serialize(&mut buf[at..]);
    }
    Encoded { buf, starts }
}

enum Job {
    Send {
        requests: Encoded,
        reply: Reply,
    },
    /// Dump the main table's routes of a family (after every job before it), of one
    /// output interface only when `oif` is given.
    Dump {
        v6: bool,
        oif: Option<u32>,
        reply: tokio::sync::oneshot::Sender<io::Result<Vec<RawRoute>>>,
    },
}

/// Sends route requests on a thread of its own, jobs strictly in the order given.
#[derive(Clone)]
pub struct Writer {
    tx: std::sync::mpsc::Sender<Job>,
}

impl Writer {
    /// Start the thread, in the caller's network namespace. Failures of jobs nobody waits
    /// for arrive on the returned channel as "<label>: <error>".
    pub fn spawn() -> io::Result<(Writer, tokio::sync::mpsc::UnboundedReceiver<String>)> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let (fail_tx, fail_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut socket = open()?;
        std::thread::Builder::new()
            .name("felix-routes".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    let (requests, reply) = match job {
                        Job::Send { requests, reply } => (requests, reply),
                        Job::Dump { v6, oif, reply } => {
                            let _ = reply.send(dump_on(&mut socket, v6, oif));
                            continue;
                        }
                    };
                    let r = send_on(&mut socket, requests);
                    match reply {
                        Reply::Wait(done) => {
                            let _ = done.send(r);
                        }
                        Reply::Report(labels) => match r {
                            Ok(outcomes) => {
                                for (label, o) in labels.iter().zip(outcomes) {
                                    if let (Err(errno), Some(label)) = (o, label) {
                                        let e = io::Error::from_raw_os_error(errno);
                                        let _ = fail_tx.send(format!("{label}: {e}"));
                                    }
                                }
                            }
                            Err(e) => {
                                let _ = fail_tx.send(format!("netlink: {e}"));
                            }
                        },
                    }
                }
            })?;
        Ok((Writer { tx }, fail_rx))
    }

    /// Send `requests` after every job before them; their outcomes. An empty list waits
    /// for everything sent before it. A long list goes in parts: the kernel installs one
    /// part while the next is serialized.
    pub async fn send(&self, requests: Vec<Request>) -> io::Result<Outcomes> {
        let mut parts = Vec::with_capacity(requests.len() / PART + 1);
        let mut left = requests.len();
        let mut requests = requests.into_iter();
        loop {
            let part: Vec<Request> = requests.by_ref().take(PART).collect();
            left -= part.len();
            parts.push(self.queue(part)?);
            if left == 0 {
                break;
            }
        }
        let mut outcomes = Vec::new();
        for part in parts {
            outcomes.extend(
                part.await
                    .map_err(|_| io::Error::other("the route writer stopped"))??,
            );
        }
        Ok(outcomes)
    }

    /// Queue one job of `requests`; its outcomes arrive on the returned channel.
    fn queue(
        &self,
        requests: Vec<Request>,
    ) -> io::Result<tokio::sync::oneshot::Receiver<io::Result<Outcomes>>> {
        let (done, wait) = tokio::sync::oneshot::channel();
        self.tx
            .send(Job::Send {
                requests: encode(requests),
                reply: Reply::Wait(done),
            })
            .map_err(|_| io::Error::other("the route writer stopped"))?;
        Ok(wait)
    }

    /// The routes of one family (through interface `oif` only, when given), read after
    /// everything sent before.
    pub async fn dump(&self, v6: bool, oif: Option<u32>) -> io::Result<Vec<RawRoute>> {
        let (done, wait) = tokio::sync::oneshot::channel();
        self.tx
            .send(Job::Dump {
                v6,
                oif,
                reply: done,
            })
            .map_err(|_| io::Error::other("the route writer stopped"))?;
        wait.await
            .map_err(|_| io::Error::other("the route writer stopped"))?
    }

    /// Queue `requests` without waiting; the failures (labelled with `labels`' prefixes, one
    /// per request; None: not reported)
    /// arrive on the failure channel.
    pub fn submit(
        &self,
        requests: Vec<Request>,
        labels: Vec<Option<ipnet::IpNet>>,
    ) -> io::Result<()> {
        self.tx
            .send(Job::Send {
                requests: encode(requests),
                reply: Reply::Report(labels),
            })
            .map_err(|_| io::Error::other("the route writer stopped"))
    }
}

/// Send `requests` in order on a socket of their own; their outcomes. Blocking.
pub fn send(requests: Vec<Request>) -> io::Result<Outcomes> {
    send_on(&mut open()?, encode(requests))
}

pub(crate) fn open() -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    // Acks without a copy of the request.
    let _ = socket.set_cap_ack(true);
    // Dumps filtered by the kernel (an interface's routes only): strict checking of dump
    // requests (Linux 4.20+). Without it the kernel sends everything and the dump filters.
    let _ = socket.set_netlink_get_strict_chk(true);
    // Never wait forever for the kernel's answer.
    let timeout = libc::timeval {
        tv_sec: 10,
        tv_usec: 0,
    };
    // SAFETY: setsockopt on a descriptor we own, with a valid timeval.
    let r = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &timeout as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

/// The netlink messages in one datagram from the kernel: type, sequence number, and the
/// message (header included). A truncated message ends the walk.
fn messages(buf: &[u8]) -> impl Iterator<Item = (u16, u32, &[u8])> {
    let mut off = 0;
    std::iter::from_fn(move || {
        let rest = buf.get(off..)?;
        if rest.len() < 16 {
            return None;
        }
        let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
        if len < 16 || len > rest.len() {
            return None;
        }
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        let seq = u32::from_ne_bytes(rest[8..12].try_into().expect("4 bytes"));
        off += (len + 3) & !3;
        Some((kind, seq, &rest[..len]))
    })
}

/// The code of an NLMSG_ERROR message (0: an ack; else a negative errno).
fn error_code(msg: &[u8]) -> Option<i32> {
    Some(i32::from_ne_bytes(msg.get(16..20)?.try_into().ok()?))
}

/// Delete the link with this index (RTM_DELLINK), waiting for the kernel's answer.
/// Blocking: the kernel answers only once the device is gone for good.
pub(crate) fn delete_link(socket: &mut Socket, index: u32) -> io::Result<()> {
    const RTM_DELLINK: u16 = 17;
    // nlmsghdr, then ifinfomsg (family, type, index, flags, change).
    let mut req = [0u8; 32];
    req[0..4].copy_from_slice(&32u32.to_ne_bytes());
    req[4..6].copy_from_slice(&RTM_DELLINK.to_ne_bytes());
    req[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    req[20..24].copy_from_slice(&index.to_ne_bytes());
    socket.send(&req, 0)?;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = socket.recv(&mut &mut buf[..], 0)?;
        for (kind, seq, msg) in messages(&buf[..n]) {
            if kind == NLMSG_ERROR
                && seq == 1
                && let Some(code) = error_code(msg)
            {
                return if code == 0 {
                    Ok(())
                } else {
                    Err(io::Error::from_raw_os_error(-code))
                };
            }
        }
    }
}

fn send_on(socket: &mut Socket, requests: Encoded) -> io::Result<Outcomes> {
    let Encoded { mut buf, starts } = requests;
    let mut outcomes = vec![Ok(()); starts.len()];
    let mut rbuf = vec![0u8; 1 << 16];
    for first in (0..starts.len()).step_by(BATCH) {
        let last = (first + BATCH).min(starts.len()) - 1;
        let end = starts.get(last + 1).copied().unwrap_or(buf.len());
        // The batch's last message asks for an ack: when it comes, all were handled.
        let flags_at = starts[last] + 6;
        let flags = u16::from_ne_bytes([buf[flags_at], buf[flags_at + 1]]) | NLM_F_ACK;
        buf[flags_at..flags_at + 2].copy_from_slice(&flags.to_ne_bytes());
        socket.send(&buf[starts[first]..end], 0)?;
        let last_seq = last as u32 + 1;
        'acks: loop {
            let n = socket.recv(&mut &mut rbuf[..], 0)?;
            for (kind, seq, msg) in messages(&rbuf[..n]) {
                // An error code per refused request (0: the batch's ack).
                if kind == NLMSG_ERROR
                    && let Some(code) = error_code(msg)
                {
                    if code != 0
                        && let Some(o) = outcomes.get_mut((seq as usize).wrapping_sub(1))
                    {
                        *o = Err(-code);
                    }
                    if seq == last_seq {
                        break 'acks;
                    }
                }
            }
        }
    }
    Ok(outcomes)
}

/// Dump the routes of a family (every table; the caller filters), of one output interface
/// only when `oif` is given.
fn dump_on(socket: &mut Socket, v6: bool, oif: Option<u32>) -> io::Result<Vec<RawRoute>> {
    const RTM_GETROUTE: u16 = 26;
    const NLM_F_DUMP: u16 = 0x300;
    const NLMSG_DONE: u16 = 3;
    // nlmsghdr, rtmsg, and RTA_OIF when filtering.
    let len = if oif.is_some() { 36 } else { 28 };
    let mut req = [0u8; 36];
    req[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
    req[4..6].copy_from_slice(&RTM_GETROUTE.to_ne_bytes());
    req[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req[8..12].copy_from_slice(&0x0d0d_0d0du32.to_ne_bytes());
    req[16] = if v6 { libc::AF_INET6 } else { libc::AF_INET } as u8;
    if let Some(i) = oif {
        req[28..30].copy_from_slice(&8u16.to_ne_bytes());
        req[30..32].copy_from_slice(&libc::RTA_OIF.to_ne_bytes());
        req[32..36].copy_from_slice(&i.to_ne_bytes());
    }
    let req = &req[..len];
    socket.send(req, 0)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 17];
    loop {
        let n = socket.recv(&mut &mut buf[..], 0)?;
        for (kind, seq, msg) in messages(&buf[..n]) {
            if seq != 0x0d0d_0d0d {
                continue;
            }
            match kind {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    if let Some(code) = error_code(msg)
                        && code != 0
                    {
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                }
                libc::RTM_NEWROUTE => {
                    if let Some(r) = raw_route(&msg[16..])
                        && (oif.is_none() || r.oif == oif)
                    {
                        out.push(r);
                    }
                }
                _ => {}
            }
        }
    }
}

/// Decode an rtmsg and the attributes Felix compares.
fn raw_route(rt: &[u8]) -> Option<RawRoute> {
    if rt.len() < 12 {
        return None;
    }
    let (family, dst_len) = (rt[0], rt[1]);
    let v6 = family == libc::AF_INET6 as u8;
    let mut r = RawRoute {
        dst: ipnet::IpNet::V4(ipnet::Ipv4Net::default()),
        table: u32::from(rt[4]),
        kind: rt[7],
        protocol: rt[5],
        scope: rt[6],
        flags: u32::from_ne_bytes(rt[8..12].try_into().expect("4 bytes")),
        oif: None,
        gateway: None,
        priority: 0,
    };
    let addr = |b: &[u8]| -> Option<std::net::IpAddr> {
        if v6 {
            <[u8; 16]>::try_from(b.get(..16)?)
                .ok()
                .map(std::net::IpAddr::from)
        } else {
            <[u8; 4]>::try_from(b.get(..4)?)
                .ok()
                .map(std::net::IpAddr::from)
        }
    };
    let mut dst = None;
    let mut a = 12;
    while a + 4 <= rt.len() {
        let alen = u16::from_ne_bytes([rt[a], rt[a + 1]]) as usize;
        let atype = u16::from_ne_bytes([rt[a + 2], rt[a + 3]]);
        if alen < 4 || a + alen > rt.len() {
            break;
        }
        let v = &rt[a + 4..a + alen];
        match atype {
            libc::RTA_DST => dst = addr(v),
            libc::RTA_GATEWAY => r.gateway = addr(v),
            libc::RTA_OIF if v.len() >= 4 => {
                r.oif = Some(u32::from_ne_bytes(v[..4].try_into().expect("4 bytes")))
            }
            libc::RTA_PRIORITY if v.len() >= 4 => {
                r.priority = u32::from_ne_bytes(v[..4].try_into().expect("4 bytes"))
            }
            libc::RTA_TABLE if v.len() >= 4 => {
                r.table = u32::from_ne_bytes(v[..4].try_into().expect("4 bytes"))
            }
            _ => {}
        }
        a += (alen + 3) & !3;
    }
    let dst = dst.unwrap_or(if v6 {
        std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
    } else {
        std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
    });
    r.dst = ipnet::IpNet::new(dst, dst_len).ok()?;
    Some(r)
}
