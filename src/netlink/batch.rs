//! Route requests in batches: many netlink messages per `sendmsg` on a socket of its own,
//! only the last of each batch acknowledged (the kernel reports every failure anyway, and
//! handles a batch's messages in order, so the last one's ack means all were handled).
//! One system call and one wake-up per batch instead of per route. A [`Writer`] does this
//! on a thread of its own, jobs in order, so Felix computes the next changes while the
//! kernel installs the last ones. Requests are serialized on the caller's thread: the
//! writer thread, the bottleneck of a large install, only makes system calls. The writer
//! also dumps the routes (after every job before the dump), so a reconciler reads the
//! table its own earlier changes made.

use std::io;

use netlink_packet_route::route::{RouteAttribute, RouteMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR,
    NetlinkBuffer,
};
use rtnetlink::sys::Socket;

use super::NetlinkError;
use super::decode::{RawRoute, error_code, messages, route};
use super::socket::{encode as encode_one, open};

/// Messages per `sendmsg`.
const BATCH: usize = 256;

/// Requests per job of a long [`Writer::send`].
const PART: usize = 16 * 1024;

/// The sequence number of dump requests.
const DUMP_SEQ: u32 = 0x0d0d_0d0d;

/// The writer thread's name (`scripts/bench felix` counts its CPU time by it).
const THREAD: &str = "felix-routes";

/// One request: add-or-replace, or delete.
pub enum Request {
    Replace(RouteMessage),
    Delete(RouteMessage),
}

/// Each request's outcome, in order: `Err(errno)` (positive, e.g. `libc::ESRCH`) when the
/// kernel refused it.
pub type Outcomes = Vec<Result<(), i32>>;

/// A queued request the kernel refused, or a queued job that could not be sent: what the
/// writer's failure channel carries (see [`Writer::submit`]).
#[derive(Debug, thiserror::Error)]
pub enum WriteFailure {
    /// The kernel refused the request about this prefix with this errno.
    #[error("{prefix}: {}", io::Error::from_raw_os_error(*errno))]
    Refused { prefix: ipnet::IpNet, errno: i32 },
    /// The job's requests could not be sent or acknowledged.
    #[error("netlink: {0}")]
    Netlink(NetlinkError),
}

enum Reply {
    /// The caller waits for the outcomes.
    Wait(tokio::sync::oneshot::Sender<Result<Outcomes, NetlinkError>>),
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
        let mut header = rtnetlink::packet_core::NetlinkHeader::default();
        header.flags = flags;
        // Sequence numbers are the request's index (+1: 0 is never used).
        header.sequence_number = i as u32 + 1;
        let mut msg = rtnetlink::packet_core::NetlinkMessage::new(
            header,
            rtnetlink::packet_core::NetlinkPayload::InnerMessage(payload),
        );
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
        reply: tokio::sync::oneshot::Sender<Result<Vec<RawRoute>, NetlinkError>>,
    },
}

fn stopped(op: &str) -> NetlinkError {
    NetlinkError::io(op, io::Error::other("the route writer stopped"))
}

/// Sends route requests on a thread of its own, jobs strictly in the order given.
#[derive(Clone)]
pub struct Writer {
    tx: std::sync::mpsc::Sender<Job>,
}

impl Writer {
    /// Start the thread, in the caller's network namespace. Failures of jobs nobody waits
    /// for arrive on the returned channel.
    pub fn spawn() -> io::Result<(Writer, tokio::sync::mpsc::UnboundedReceiver<WriteFailure>)> {
        // The job queue is unbounded: its senders are async tasks (Felix's loop) that
        // must never block a runtime thread on a full queue (`submit` is synchronous on
        // purpose: it returns at once). What it holds is bounded by its callers: `send`
        // and `dump` wait for their jobs' answers, and `submit` queues one job per round
        // of BGP changes; while the kernel lags, those wait here encoded and in order,
        // the changes a bound would only hold back elsewhere.
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        // The failure channel is unbounded on purpose: the writer thread must never block
        // on it, as its reader (Felix's loop) may itself be waiting for the writer (a
        // `send`, a `dump`). It holds at most one failure per refused request of a job
        // already queued.
        let (fail_tx, fail_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut socket = open()?;
        std::thread::Builder::new()
            .name(THREAD.into())
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
                                    if let (Err(errno), Some(prefix)) = (o, label) {
                                        let _ = fail_tx.send(WriteFailure::Refused {
                                            prefix: *prefix,
                                            errno,
                                        });
                                    }
                                }
                            }
                            Err(e) => {
                                let _ = fail_tx.send(WriteFailure::Netlink(e));
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
    pub async fn send(&self, requests: Vec<Request>) -> Result<Outcomes, NetlinkError> {
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
            outcomes.extend(part.await.map_err(|_| stopped("send route requests"))??);
        }
        Ok(outcomes)
    }

    /// Queue one job of `requests`; its outcomes arrive on the returned channel.
    fn queue(
        &self,
        requests: Vec<Request>,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<Outcomes, NetlinkError>>, NetlinkError> {
        let (done, wait) = tokio::sync::oneshot::channel();
        self.tx
            .send(Job::Send {
                requests: encode(requests),
                reply: Reply::Wait(done),
            })
            .map_err(|_| stopped("send route requests"))?;
        Ok(wait)
    }

    /// The routes of one family (through interface `oif` only, when given), read after
    /// everything sent before.
    pub async fn dump(&self, v6: bool, oif: Option<u32>) -> Result<Vec<RawRoute>, NetlinkError> {
        let (done, wait) = tokio::sync::oneshot::channel();
        self.tx
            .send(Job::Dump {
                v6,
                oif,
                reply: done,
            })
            .map_err(|_| stopped("list routes"))?;
        wait.await.map_err(|_| stopped("list routes"))?
    }

    /// Queue `requests` without waiting; the failures (labelled with `labels`' prefixes,
    /// one per request; None: not reported) arrive on the failure channel.
    pub fn submit(
        &self,
        requests: Vec<Request>,
        labels: Vec<Option<ipnet::IpNet>>,
    ) -> Result<(), NetlinkError> {
        self.tx
            .send(Job::Send {
                requests: encode(requests),
                reply: Reply::Report(labels),
            })
            .map_err(|_| stopped("queue route changes"))
    }
}

/// Send `requests` in order on a socket of their own; their outcomes. Blocking.
pub fn send(requests: Vec<Request>) -> Result<Outcomes, NetlinkError> {
    let mut socket = open().map_err(|e| NetlinkError::io("open netlink socket", e))?;
    send_on(&mut socket, encode(requests))
}

fn send_on(socket: &mut Socket, requests: Encoded) -> Result<Outcomes, NetlinkError> {
    let io = |e| NetlinkError::io("send route requests", e);
    let Encoded { mut buf, starts } = requests;
    let mut outcomes = vec![Ok(()); starts.len()];
    let mut rbuf = vec![0u8; 1 << 16];
    for first in (0..starts.len()).step_by(BATCH) {
        let last = (first + BATCH).min(starts.len()) - 1;
        let end = starts.get(last + 1).copied().unwrap_or(buf.len());
        // The batch's last message asks for an ack: when it comes, all were handled.
        let mut header = NetlinkBuffer::new(&mut buf[starts[last]..end]);
        header.set_flags(header.flags() | NLM_F_ACK);
        socket.send(&buf[starts[first]..end], 0).map_err(io)?;
        let last_seq = last as u32 + 1;
        'acks: loop {
            let n = socket.recv(&mut &mut rbuf[..], 0).map_err(io)?;
            for m in messages(&rbuf[..n]).map_while(Result::ok) {
                // An error code per refused request (0: the batch's ack).
                if m.kind == NLMSG_ERROR
                    && let Some(code) = error_code(m.payload)
                {
                    if code != 0
                        && let Some(o) = outcomes.get_mut((m.seq as usize).wrapping_sub(1))
                    {
                        *o = Err(-code);
                    }
                    if m.seq == last_seq {
                        break 'acks;
                    }
                }
            }
        }
    }
    Ok(outcomes)
}

/// The RTM_GETROUTE dump request of a family, filtered by the kernel to one output
/// interface when `oif` is given (strict checking, see [`super::socket::open`]).
fn dump_request(v6: bool, oif: Option<u32>) -> Vec<u8> {
    let mut m = RouteMessage::default();
    m.header.address_family = if v6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    if let Some(i) = oif {
        m.attributes.push(RouteAttribute::Oif(i));
    }
    encode_one(
        RouteNetlinkMessage::GetRoute(m),
        NLM_F_REQUEST | NLM_F_DUMP,
        DUMP_SEQ,
    )
}

/// Dump the routes of a family (every table; the caller filters), of one output interface
/// only when `oif` is given.
fn dump_on(socket: &mut Socket, v6: bool, oif: Option<u32>) -> Result<Vec<RawRoute>, NetlinkError> {
    const OP: &str = "list routes";
    let io = |e| NetlinkError::io(OP, e);
    socket.send(&dump_request(v6, oif), 0).map_err(io)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 17];
    loop {
        let n = socket.recv(&mut &mut buf[..], 0).map_err(io)?;
        for m in messages(&buf[..n]).map_while(Result::ok) {
            if m.seq != DUMP_SEQ {
                continue;
            }
            match m.kind {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    if let Some(code) = error_code(m.payload)
                        && code != 0
                    {
                        return Err(NetlinkError::kernel(OP, code));
                    }
                }
                libc::RTM_NEWROUTE => {
                    if let Some(r) = route(m.payload)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dump_request_is_the_kernels_rtm_getroute_of_one_family() {
        let r = dump_request(false, None);
        let b = NetlinkBuffer::new_checked(&r[..]).unwrap();
        assert_eq!(b.message_type(), libc::RTM_GETROUTE);
        assert_eq!(b.flags(), NLM_F_REQUEST | NLM_F_DUMP);
        assert_eq!(b.sequence_number(), DUMP_SEQ);
        // nlmsghdr and rtmsg only, family AF_INET.
        assert_eq!(r.len(), 28);
        assert_eq!(r[16], libc::AF_INET as u8);
        // Filtered: RTA_OIF follows, family AF_INET6.
        let f = dump_request(true, Some(7));
        assert_eq!(f.len(), 36);
        assert_eq!(f[16], libc::AF_INET6 as u8);
        assert_eq!(u16::from_ne_bytes([f[30], f[31]]), libc::RTA_OIF);
        assert_eq!(u32::from_ne_bytes(f[32..36].try_into().unwrap()), 7);
    }

    #[test]
    fn only_the_last_request_of_a_batch_asks_for_an_ack_when_sent() {
        let m = || {
            let mut r = RouteMessage::default();
            r.header.address_family = AddressFamily::Inet;
            Request::Replace(r)
        };
        let e = encode(vec![m(), m()]);
        assert_eq!(e.starts.len(), 2);
        let second = NetlinkBuffer::new_checked(&e.buf[e.starts[1]..]).unwrap();
        assert_eq!(second.sequence_number(), 2);
        assert_eq!(
            second.flags() & NLM_F_ACK,
            0,
            "the ack is added at send time"
        );
        assert_eq!(second.flags(), NLM_F_REQUEST | NLM_F_CREATE | NLM_F_REPLACE);
    }
}
