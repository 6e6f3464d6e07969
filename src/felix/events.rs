//! The kernel's link and route notifications, on a socket of their own (not the one Felix
//! sends requests on: a burst of notifications must never stall a request). Felix only
//! needs to know that something happened, so nothing is decoded beyond the message type:
//! the kernel drops the echoes of our own route additions before they reach us (a classic
//! BPF filter), and a lost burst (ENOBUFS) counts as an event too, so the full pass that
//! follows repairs whatever was missed.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use rtnetlink::sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use tokio::io::unix::AsyncFd;

use super::calc::PROTO_FELIX;

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

    /// Wait until something of interest happened (or notifications were lost).
    pub async fn next(&mut self) -> io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut seen = false;
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
                        Some(libc::ENOBUFS) => seen = true,
                        Some(libc::EINTR) => {}
                        _ => return Err(e),
                    }
                    continue;
                }
                seen |= interesting(&self.buf[..n as usize]);
            }
            if seen {
                return Ok(());
            }
        }
    }
}

/// Whether a datagram of notifications holds one that is not the echo of a route of ours
/// being added (the filter drops those already; this also holds without the filter).
fn interesting(mut b: &[u8]) -> bool {
    while b.len() >= 16 {
        let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
        let kind = u16::from_ne_bytes([b[4], b[5]]);
        if len < 16 || len > b.len() {
            return true;
        }
        let ours_added = kind == libc::RTM_NEWROUTE && len >= 28 && b[21] == PROTO_FELIX;
        if !ours_added {
            return true;
        }
        b = &b[((len + 3) & !3).min(b.len())..];
    }
    false
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

    #[test]
    fn only_echoes_of_our_route_additions_are_uninteresting() {
        let ours = msg(libc::RTM_NEWROUTE, PROTO_FELIX);
        assert!(!interesting(&ours));
        assert!(!interesting(&[ours.clone(), ours.clone()].concat()));
        assert!(interesting(&msg(libc::RTM_DELROUTE, PROTO_FELIX)));
        assert!(interesting(&msg(libc::RTM_NEWROUTE, 3)));
        assert!(interesting(&msg(libc::RTM_NEWLINK, 0)));
        assert!(interesting(&[ours, msg(libc::RTM_DELROUTE, 80)].concat()));
        assert!(interesting(&[
            1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16
        ]));
    }
}
