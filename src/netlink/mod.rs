//! The one adapter to the kernel's rtnetlink, used by Felix and by the CNI plugin's
//! dataplane (a ground module: it imports only std and crates). What it offers:
//! - [`links`]: link lookups by name, by index, the list, an interface's MTU, the interface
//!   holding an address (through an `rtnetlink` handle);
//! - [`batch`]: route requests in batches on a writer thread of their own, and the route
//!   dump read after them;
//! - [`routes`]: the routes to one destination through an `rtnetlink` handle;
//! - [`notify`]: the link and route notifications, our own echoes filtered in the kernel;
//! - [`socket`]: the blocking sockets, and a link's deletion on a thread of its own;
//! - [`decode`]: replies and notifications decoded with netlink-packet-core and
//!   netlink-packet-route buffer types.
//!
//! Every failure is a [`NetlinkError`] whose kernel errno stays typed: callers handle
//! "exists", "not found" and "no such device" on purpose (DESIGN "Errors").

pub mod batch;
pub mod decode;
mod error;
pub mod links;
pub mod notify;
pub mod routes;
pub mod socket;

pub use batch::{Outcomes, Request, WriteFailure, Writer};
pub use decode::RawRoute;
pub use error::NetlinkError;
