//! Felix's problems: what a pass, a repair or a change could not make true. They go to the
//! log one by one and, joined, into the readiness reason (`/readiness`, `-felix-ready`).
//! One enum for every part of the dataplane, each variant naming the object it is about,
//! so the core decides on them without parsing text.

use std::path::PathBuf;

use super::calc::CalcProblem;
use super::neigh::NeighbourProblem;
use super::nft::NftError;
use super::routes::{RouteError, RouteReason};
use super::tunnels::TunnelError;

#[derive(Debug, thiserror::Error)]
pub enum Problem {
    /// The datastore's state cannot be programmed as it is (e.g. a workload address that
    /// is not a CIDR); the rest of the dataplane is.
    #[error(transparent)]
    Calc(#[from] CalcProblem),
    /// A netlink request of the route reconciler failed as a whole (a dump, a link list,
    /// a batch not sent); the kernel's errno stays typed inside.
    #[error(transparent)]
    Routes(#[from] RouteError),
    /// One desired route could not be programmed: no such interface, no uplink, or the
    /// kernel's refusal (its errno).
    #[error("{prefix}: {reason}")]
    Route {
        prefix: ipnet::IpNet,
        reason: RouteReason,
    },
    /// A neighbour or FDB entry could not be programmed.
    #[error(transparent)]
    Neighbour(#[from] NeighbourProblem),
    /// A netlink request of the neighbour reconciler failed as a whole (the link list, a
    /// dump) or got no answer; the kernel's errno stays typed inside.
    #[error(transparent)]
    Neighbours(crate::netlink::NetlinkError),
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
    /// An nft transaction on our tables (policy and NAT) failed: the step and nft's
    /// message; nothing of it was applied.
    #[error(transparent)]
    Nft(#[from] NftError),
    /// A sysctl could not be written (an interface gone meanwhile is no problem).
    #[error("{path}: {error}")]
    Sysctl { path: String, error: std::io::Error },
    /// The pods' MTU could not be written for the CNI plugin.
    #[error("{}: {error}", path.display())]
    MtuFile {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A change queued on the route writer was refused by the kernel (or its batch was
    /// not sent): what the writer's failure channel carries.
    #[error(transparent)]
    Refused(#[from] crate::netlink::WriteFailure),
}
