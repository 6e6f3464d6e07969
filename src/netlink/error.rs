//! The adapter's one error type. The kernel's answer stays a typed errno (DESIGN "Errors":
//! "exists" and "not found" are handled on purpose), so callers test
//! [`NetlinkError::is_exists`] or [`NetlinkError::is_not_found`] instead of reading text or
//! comparing `raw_code()` with a negated constant.

use std::io;

/// A netlink request that failed, with what was being done (`op`: "get link cali1234",
/// "list routes") for the log and the readiness reason.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The kernel refused the request with this errno (positive, e.g. `libc::EEXIST`).
    #[error("{op}: {}", io::Error::from_raw_os_error(*errno))]
    Kernel { op: String, errno: i32 },
    /// The socket failed (open, send, receive, the 10 s receive timeout) or the thread
    /// that owns it stopped: nothing is known about the request's fate.
    #[error("{op}: {source}")]
    Io {
        op: String,
        #[source]
        source: io::Error,
    },
    /// The kernel answered something this adapter could not decode.
    #[error("{op}: {message}")]
    Decode { op: String, message: String },
}

impl NetlinkError {
    /// The kernel's refusal of `op` with `errno` (positive).
    pub fn kernel(op: impl Into<String>, errno: i32) -> NetlinkError {
        NetlinkError::Kernel {
            op: op.into(),
            errno: errno.abs(),
        }
    }

    /// A socket failure while doing `op`. An `io::Error` carrying an errno the kernel
    /// returned to the system call itself (e.g. ENODEV from a setns'd socket) stays an
    /// `Io`: it is not the kernel's answer to the request.
    pub fn io(op: impl Into<String>, source: io::Error) -> NetlinkError {
        NetlinkError::Io {
            op: op.into(),
            source,
        }
    }

    /// The errors of the `rtnetlink` crate (the requests not sent through this adapter's
    /// own sockets yet): the kernel's refusals keep their errno.
    pub fn from_rtnetlink(op: impl Into<String>, e: rtnetlink::Error) -> NetlinkError {
        match e {
            rtnetlink::Error::NetlinkError(m) if m.raw_code() != 0 => {
                NetlinkError::kernel(op, m.raw_code())
            }
            other => NetlinkError::Decode {
                op: op.into(),
                message: other.to_string(),
            },
        }
    }

    /// [`Self::from_rtnetlink`] for `map_err`: `.map_err(NetlinkError::rtnetlink(op))`.
    pub fn rtnetlink(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
        let op = op.into();
        move |e| NetlinkError::from_rtnetlink(op, e)
    }

    /// The same failure told as `op`: the caller's name for what it did (`delete
    /// vxlan.calico` rather than the adapter's `delete link 7`), the errno kept.
    pub fn with_op(self, op: impl Into<String>) -> NetlinkError {
        let op = op.into();
        match self {
            NetlinkError::Kernel { errno, .. } => NetlinkError::Kernel { op, errno },
            NetlinkError::Io { source, .. } => NetlinkError::Io { op, source },
            NetlinkError::Decode { message, .. } => NetlinkError::Decode { op, message },
        }
    }

    /// What was being done.
    pub fn op(&self) -> &str {
        match self {
            NetlinkError::Kernel { op, .. }
            | NetlinkError::Io { op, .. }
            | NetlinkError::Decode { op, .. } => op,
        }
    }

    /// The kernel's errno, when the kernel refused the request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// EEXIST: the object is already there (an `add` without replace).
    pub fn is_exists(&self) -> bool {
        self.errno() == Some(libc::EEXIST)
    }

    /// ENOENT or ESRCH: the object (a route, a neighbour, an address) is not there; the
    /// kernel answers ESRCH to the deletion of a route that does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self.errno(), Some(libc::ENOENT | libc::ESRCH))
    }

    /// ENODEV: no such interface (a link looked up by a name that is not there, a route
    /// through an interface that went away).
    pub fn is_no_device(&self) -> bool {
        self.errno() == Some(libc::ENODEV)
    }

    /// Gone, by any of the kernel's words for it ([`Self::is_not_found`] or
    /// [`Self::is_no_device`]): what a deletion or a lookup treats as "nothing to do".
    pub fn is_gone(&self) -> bool {
        self.is_not_found() || self.is_no_device()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernels_errno_is_kept_and_classified() {
        let e = NetlinkError::kernel("add route 10.0.0.0/24", -libc::EEXIST);
        assert_eq!(e.errno(), Some(libc::EEXIST));
        assert!(e.is_exists() && !e.is_not_found() && !e.is_no_device());
        assert!(
            e.to_string()
                .starts_with("add route 10.0.0.0/24: File exists")
        );
        let gone = NetlinkError::kernel("delete route", libc::ESRCH);
        assert!(gone.is_not_found() && gone.is_gone() && !gone.is_no_device());
        let dev = NetlinkError::kernel("get link cali1", libc::ENODEV);
        assert!(dev.is_no_device() && dev.is_gone() && !dev.is_not_found());
        let io = NetlinkError::io("list routes", io::Error::from_raw_os_error(libc::ENODEV));
        assert_eq!(
            io.errno(),
            None,
            "a socket failure is not the kernel's answer"
        );
        assert!(!io.is_gone());
        assert_eq!(io.op(), "list routes");
    }

    #[test]
    fn a_failure_told_as_the_callers_op_keeps_its_errno() {
        let e = NetlinkError::kernel("delete link 7", libc::EBUSY).with_op("delete vxlan.calico");
        assert_eq!(e.errno(), Some(libc::EBUSY));
        assert!(e.to_string().starts_with("delete vxlan.calico: "), "{e}");
        let io = NetlinkError::io("delete link 7", io::Error::other("x")).with_op("delete d");
        assert_eq!((io.op(), io.errno()), ("delete d", None));
    }
}
