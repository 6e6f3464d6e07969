//! Felix's route writer, now the netlink adapter's ([`crate::netlink::batch`]). These
//! re-exports are left only for `felix::actor`, which is being rewritten; everything else
//! names [`crate::netlink`] directly, and the module goes once the actor does too.

pub use crate::netlink::batch::{Outcomes, Request, WriteFailure, Writer, send};
pub use crate::netlink::decode::RawRoute;
