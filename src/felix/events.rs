//! The kernel's link and route notifications, on a socket of their own (not the one Felix
//! sends requests on: a burst of notifications must never stall a request). Felix needs
//! to know what was touched, not how: each notification is reduced to the interface it
//! concerns (REFERENCE §5: an interface event resyncs that interface). The kernel drops
//! the echoes of our own route additions before they reach us (a classic BPF filter), and
//! a lost burst (ENOBUFS) or a notification not understood counts as "anything may have
//! changed", so the full pass that follows repairs whatever was missed.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use rtnetlink::sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use tokio::io::unix::AsyncFd;

use super::calc::PROTO_FELIX;

/// What the notifications read said was touched.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Touched {
    /// Notifications were lost, or one was not understood: anything may have changed.
    pub unknown: bool,
    /// Links added, changed or removed: index and name (when the notification has one).
    pub links: BTreeMap<u32, Option<String>>,
    /// Interfaces (by index) whose routes were added, changed or removed by others.
    pub route_ifaces: BTreeSet<u32>,
    /// Routes through no interface (blackholes) or several (multipath) changed.
    pub routes: bool,
}

impl Touched {
    pub fn is_empty(&self) -> bool {
        !self.unknown && !self.routes && self.links.is_empty() && self.route_ifaces.is_empty()
    }

    pub fn merge(&mut self, other: Touched) {
        self.unknown |= other.unknown;
        self.routes |= other.routes;
        for (i, name) in other.links {
            let slot = self.links.entry(i).or_default();
            if name.is_some() {
                *slot = name;
            }
        }
        self.route_ifaces.extend(other.route_ifaces);
    }
}

/// Kernel notifications of links and IPv4/IPv6 routes.
pub struct Events {
    fd: AsyncFd<Socket>,
    buf: Vec<u8>,
}

impl Events {
    /// Subscribe (in the caller's network namespace).
    pub fn open() -> io::Result<Events> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        let groups = rtnetlink::constants::RTMGRP_LINK
            | rtnetlink::constants::RTMGRP_IPV4_ROUTE
            | rtnetlink::constants::RTMGRP_IPV6_ROUTE;
        socket.bind(&SocketAddr::new(0, groups))?;
        socket.set_non_blocking(true)?;
        let fd = socket.as_raw_fd();
        if let Err(e) = drop_our_route_echoes(fd) {
            tracing::debug!(error = %e, "no netlink event filter; our own route echoes are read and ignored");
        }
        // Room for bursts (privileged: beyond rmem_max), else what the system allows.
        let size: libc::c_int = 4 << 20;
        if setsockopt(fd, libc::SO_RCVBUFFORCE, &size).is_err() {
            let _ = setsockopt(fd, libc::SO_RCVBUF, &size);
        }
        // SAFETY: the socket owns its descriptor, which stays open and the same until the
        // AsyncFd (which owns the socket) is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(socket, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(Events {
            fd,
            buf: vec![0; 1 << 16],
        })
    }

    /// Wait until something of interest happened (or notifications were lost): what.
    pub async fn next(&mut self) -> io::Result<Touched> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut seen = Touched::default();
            loop {
                // SAFETY: recv into our own buffer, on a descriptor we own.
                let n = unsafe {
                    libc::recv(
                        guard.get_inner().as_raw_fd(),
                        self.buf.as_mut_ptr() as *mut libc::c_void,
                        self.buf.len(),
                        0,
                    )
                };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    match e.raw_os_error() {
                        Some(libc::EAGAIN) => {
                            guard.clear_ready();
                            break;
                        }
                        // Notifications were dropped: whatever they said, a pass will see.
                        Some(libc::ENOBUFS) => seen.unknown = true,
                        Some(libc::EINTR) => {}
                        _ => return Err(e),
                    }
                    continue;
                }
                classify(&self.buf[..n as usize], &mut seen);
            }
            if !seen.is_empty() {
                return Ok(seen);
            }
        }
    }
}

/// Add what a datagram of notifications touched to `t`. The echoes of routes of ours being
/// added touch nothing (the filter drops those already; this also holds without it).
fn classify(mut b: &[u8], t: &mut Touched) {
    while b.len() >= 16 {
        let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
        let kind = u16::from_ne_bytes([b[4], b[5]]);
        if len < 16 || len > b.len() {
            t.unknown = true;
            return;
        }
        let body = &b[16..len];
        match kind {
            // ifinfomsg (16 bytes: the index at 4), then attributes.
            libc::RTM_NEWLINK | libc::RTM_DELLINK if body.len() >= 16 => {
                let index = u32::from_ne_bytes([body[4], body[5], body[6], body[7]]);
                let name = attribute(&body[16..], libc::IFLA_IFNAME).map(|v| {
                    let v = v.split(|c| *c == 0).next().unwrap_or_default();
                    String::from_utf8_lossy(v).into_owned()
                });
                t.links.insert(index, name);
            }
            // rtmsg (12 bytes: the protocol at 5), then attributes.
            libc::RTM_NEWROUTE | libc::RTM_DELROUTE if body.len() >= 12 => {
                let ours_added = kind == libc::RTM_NEWROUTE && body[5] == PROTO_FELIX;
                if !ours_added {
                    match attribute(&body[12..], libc::RTA_OIF) {
                        Some(v) if v.len() >= 4 => {
                            t.route_ifaces
                                .insert(u32::from_ne_bytes([v[0], v[1], v[2], v[3]]));
                        }
                        _ => t.routes = true,
                    }
                }
            }
            _ => t.unknown = true,
        }
        b = &b[((len + 3) & !3).min(b.len())..];
    }
}

/// The value of the first attribute of type `kind` in a run of netlink attributes.
fn attribute(mut a: &[u8], kind: u16) -> Option<&[u8]> {
    while a.len() >= 4 {
        let len = u16::from_ne_bytes([a[0], a[1]]) as usize;
        let t = u16::from_ne_bytes([a[2], a[3]]);
        if len < 4 || len > a.len() {
            return None;
        }
        if t == kind {
            return Some(&a[4..len]);
        }
        a = &a[((len + 3) & !3).min(a.len())..];
    }
    None
}

fn setsockopt<T>(fd: RawFd, opt: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` is a plain value of the size given, alive for the call.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            value as *const T as *const libc::c_void,
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Have the kernel drop notifications of routes of ours being added (RTM_NEWROUTE with
/// protocol 80): the echo of our own programming, a million of them when BGP brings a
/// million routes.
fn drop_our_route_echoes(fd: RawFd) -> io::Result<()> {
    // Loads of half words are big-endian: compare nlmsg_type (host order) as such.
    let newroute = u32::from(u16::from_be_bytes(libc::RTM_NEWROUTE.to_ne_bytes()));
    let op = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let prog = [
        // A = nlmsg_type (offset 4).
        op(libc::BPF_LD | libc::BPF_H | libc::BPF_ABS, 0, 0, 4),
        op(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, 0, 3, newroute),
        // A = rtm_protocol (the rtmsg follows the 16-byte header; its sixth byte).
        op(libc::BPF_LD | libc::BPF_B | libc::BPF_ABS, 0, 0, 21),
        op(
            libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
            0,
            1,
            u32::from(PROTO_FELIX),
        ),
        op(libc::BPF_RET | libc::BPF_K, 0, 0, 0),
        op(libc::BPF_RET | libc::BPF_K, 0, 0, u32::MAX),
    ];
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    setsockopt(fd, libc::SO_ATTACH_FILTER, &fprog)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: u16, proto: u8) -> Vec<u8> {
        let mut m = vec![0u8; 28];
        m[0..4].copy_from_slice(&28u32.to_ne_bytes());
        m[4..6].copy_from_slice(&kind.to_ne_bytes());
        m[21] = proto;
        m
    }

    /// A message with one attribute after a body of `body` zero bytes.
    fn with_attr(kind: u16, body: usize, attr: u16, value: &[u8]) -> Vec<u8> {
        let alen = 4 + value.len();
        let len = 16 + body + ((alen + 3) & !3);
        let mut m = vec![0u8; len];
        m[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
        m[4..6].copy_from_slice(&kind.to_ne_bytes());
        let a = 16 + body;
        m[a..a + 2].copy_from_slice(&(alen as u16).to_ne_bytes());
        m[a + 2..a + 4].copy_from_slice(&attr.to_ne_bytes());
        m[a + 4..a + alen].copy_from_slice(value);
        m
    }

    fn touched(b: &[u8]) -> Touched {
        let mut t = Touched::default();
        classify(b, &mut t);
        t
    }

    #[test]
    fn echoes_of_our_route_additions_touch_nothing() {
        let ours = msg(libc::RTM_NEWROUTE, PROTO_FELIX);
        assert!(touched(&ours).is_empty());
        assert!(touched(&[ours.clone(), ours.clone()].concat()).is_empty());
        // Without an interface: the table's interface-less routes.
        let t = touched(&[ours, msg(libc::RTM_DELROUTE, PROTO_FELIX)].concat());
        assert!(t.routes && !t.unknown && t.route_ifaces.is_empty(), "{t:?}");
        assert!(touched(&msg(libc::RTM_NEWROUTE, 3)).routes);
    }

    #[test]
    fn route_and_link_notifications_name_their_interface() {
        let del = with_attr(libc::RTM_DELROUTE, 12, libc::RTA_OIF, &7u32.to_ne_bytes());
        let t = touched(&del);
        assert_eq!(t.route_ifaces, BTreeSet::from([7]));
        assert!(!t.routes && !t.unknown && t.links.is_empty());

        let mut link = with_attr(libc::RTM_NEWLINK, 16, libc::IFLA_IFNAME, b"cali12345\0");
        link[20..24].copy_from_slice(&9i32.to_ne_bytes());
        let t = touched(&[del, link].concat());
        assert_eq!(
            t.links,
            BTreeMap::from([(9, Some("cali12345".to_string()))])
        );
        assert_eq!(t.route_ifaces, BTreeSet::from([7]));

        // Merged: a name learnt once stays.
        let mut all = t.clone();
        all.merge(Touched {
            links: BTreeMap::from([(9, None), (3, None)]),
            ..Default::default()
        });
        assert_eq!(all.links[&9].as_deref(), Some("cali12345"));
        assert_eq!(all.links[&3], None);
    }

    #[test]
    fn what_is_not_understood_may_have_changed_anything() {
        assert!(touched(&msg(libc::RTM_NEWADDR, 0)).unknown);
        // A length beyond the datagram.
        let mut m = msg(libc::RTM_DELROUTE, 3);
        m[0..4].copy_from_slice(&64u32.to_ne_bytes());
        assert!(touched(&m).unknown);
        assert!(touched(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]).unknown);
    }
}
