//! The kernel's link and route notifications, on a socket of their own (not one requests
//! are sent on: a burst of notifications must never stall a request). The kernel can drop
//! the echoes of a protocol's own route additions before they reach us (a classic BPF
//! filter), and a lost burst (ENOBUFS) is reported as such: the listener then assumes
//! anything may have changed.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use rtnetlink::sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use tokio::io::unix::AsyncFd;

use super::decode::{Notice, notices};

/// What a read of the socket delivers, one at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    Notice(Notice),
    /// Notifications were dropped (the socket's buffer overflowed).
    Lost,
}

/// A subscription to the link, IPv4/IPv6 route and address groups.
pub struct Notifications {
    fd: AsyncFd<Socket>,
    buf: Vec<u8>,
}

impl Notifications {
    /// Subscribe (in the caller's network namespace). With `drop_added_by`, the kernel
    /// drops RTM_NEWROUTE notifications of that route protocol: the echo of our own
    /// programming, a million of them when BGP brings a million routes (when the filter
    /// cannot be attached they arrive and the listener ignores them).
    pub fn open(drop_added_by: Option<u8>) -> io::Result<Notifications> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        let groups = rtnetlink::constants::RTMGRP_LINK
            | rtnetlink::constants::RTMGRP_IPV4_ROUTE
            | rtnetlink::constants::RTMGRP_IPV6_ROUTE
            | rtnetlink::constants::RTMGRP_IPV4_IFADDR
            | rtnetlink::constants::RTMGRP_IPV6_IFADDR;
        socket.bind(&SocketAddr::new(0, groups))?;
        socket.set_non_blocking(true)?;
        let fd = socket.as_raw_fd();
        if let Some(protocol) = drop_added_by
            && let Err(e) = drop_route_additions_of(fd, protocol)
        {
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
        Ok(Notifications {
            fd,
            buf: vec![0; 1 << 16],
        })
    }

    /// Wait until the socket is readable, then hand every notification queued (and every
    /// loss) to `each`, in order, until none is left.
    pub async fn recv(&mut self, mut each: impl FnMut(Received)) -> io::Result<()> {
        let mut guard = self.fd.readable().await?;
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
                        return Ok(());
                    }
                    // Notifications were dropped: whatever they said, a pass will see.
                    Some(libc::ENOBUFS) => each(Received::Lost),
                    Some(libc::EINTR) => {}
                    _ => return Err(e),
                }
                continue;
            }
            for n in notices(&self.buf[..n as usize]) {
                each(Received::Notice(n));
            }
        }
    }
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

/// Have the kernel drop notifications of routes of `protocol` being added (RTM_NEWROUTE).
fn drop_route_additions_of(fd: RawFd, protocol: u8) -> io::Result<()> {
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
            u32::from(protocol),
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
