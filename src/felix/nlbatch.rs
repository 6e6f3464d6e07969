//! Felix's route writer, now the netlink adapter's ([`crate::netlink::batch`]). These
//! re-exports keep the paths Felix's other files and the tests use.

pub use crate::netlink::batch::{Outcomes, Request, WriteFailure, Writer, send};
pub use crate::netlink::decode::RawRoute;

/// A request socket in the caller's namespace (see [`crate::netlink::socket::open`]).
pub(crate) fn open() -> std::io::Result<rtnetlink::sys::Socket> {
    crate::netlink::socket::open()
}

/// [`crate::netlink::socket::delete_link`] with the kernel's refusal as an `io::Error` of
/// its errno (what `tunnels` tests for ENODEV).
pub(crate) fn delete_link(socket: &mut rtnetlink::sys::Socket, index: u32) -> std::io::Result<()> {
    crate::netlink::socket::delete_link(socket, index).map_err(|e| match e {
        crate::netlink::NetlinkError::Kernel { errno, .. } => {
            std::io::Error::from_raw_os_error(errno)
        }
        crate::netlink::NetlinkError::Io { source, .. } => source,
        other => std::io::Error::other(other.to_string()),
    })
}
