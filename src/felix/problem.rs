//! Felix's problems: what a pass, a repair or a change could not make true. They go to the
//! log one by one and, joined, into the readiness reason (`/readiness`, `-felix-ready`).
//! One enum for every part of the dataplane, each variant naming the object it is about,
//! so the core decides on them without parsing text.

use std::path::PathBuf;

use super::nat::NatError;
use super::routes::RouteError;
use super::tunnels::TunnelError;

#[derive(Debug, thiserror::Error)]
pub enum Problem {
    /// The datastore's state cannot be programmed as it is (e.g. a workload address that
    /// is not a CIDR); the rest of the dataplane is.
    #[error("{0}")]
    Calc(String),
    /// A netlink request of the route reconciler failed as a whole (a dump, a link list).
    #[error(transparent)]
    Routes(#[from] RouteError),
    /// One desired route could not be programmed.
    #[error("{prefix}: {reason}")]
    Route {
        prefix: ipnet::IpNet,
        reason: String,
    },
    /// A neighbour or FDB entry could not be programmed.
    #[error("{what}: {reason}")]
    Neighbour { what: String, reason: String },
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
    #[error(transparent)]
    Nat(#[from] NatError),
    #[error("{path}: {error}")]
    Sysctl { path: String, error: std::io::Error },
    /// The pods' MTU could not be written for the CNI plugin.
    #[error("{}: {error}", path.display())]
    MtuFile {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A change queued on the route writer was refused by the kernel.
    #[error("{0}")]
    Refused(String),
    /// A failure a reconciler reports as text (routes, neighbours, sysctls), until it
    /// reports typed ones.
    #[error("{0}")]
    Reconciler(String),
}
