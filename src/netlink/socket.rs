//! The adapter's own blocking sockets: opened in the caller's network namespace, with a
//! receive timeout so no request waits forever, and the requests that need no runtime
//! (a link's deletion on a thread of its own).

use std::io;

use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::LinkMessage;
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_REQUEST, NLMSG_ERROR, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use rtnetlink::sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use super::NetlinkError;
use super::decode::{error_code, messages};

/// A NETLINK_ROUTE socket for requests, in the caller's network namespace.
pub fn open() -> io::Result<Socket> {
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

/// One request serialized with sequence number `seq`.
pub(crate) fn encode(payload: RouteNetlinkMessage, flags: u16, seq: u32) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(payload));
    msg.finalize();
    let mut buf = vec![0; msg.buffer_len()];
    msg.serialize(&mut buf);
    buf
}

/// Delete the link with this index (RTM_DELLINK), waiting for the kernel's answer.
/// Blocking: the kernel answers only once the device is gone for good. A link already
/// gone is `Err` with [`NetlinkError::is_no_device`].
pub fn delete_link(socket: &mut Socket, index: u32) -> Result<(), NetlinkError> {
    let op = || format!("delete link {index}");
    let mut link = LinkMessage::default();
    link.header.index = index;
    let req = encode(
        RouteNetlinkMessage::DelLink(link),
        NLM_F_REQUEST | NLM_F_ACK,
        1,
    );
    socket
        .send(&req, 0)
        .map_err(|e| NetlinkError::io(op(), e))?;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = socket
            .recv(&mut &mut buf[..], 0)
            .map_err(|e| NetlinkError::io(op(), e))?;
        for m in messages(&buf[..n]).map_while(Result::ok) {
            if m.kind == NLMSG_ERROR
                && m.seq == 1
                && let Some(code) = error_code(m.payload)
            {
                return if code == 0 {
                    Ok(())
                } else {
                    Err(NetlinkError::kernel(op(), code))
                };
            }
        }
    }
}
