//! confd: turns the datastore snapshot into the BGP speaker's desired configuration
//! (DESIGN: datastore -> confd -> bgp). `calc` is the pure core (REFERENCE §6); `actor`
//! follows the syncer and hands each new configuration to the speaker on a `watch`
//! channel, which applies it without disturbing unchanged sessions; with the
//! `bird-external` backend it writes BIRD 2 configuration files (`bird`) instead.

pub mod actor;
pub mod bird;
pub mod calc;
#[cfg(test)]
mod calc_tests;

pub use crate::bgp::config::{DesiredBgpConfig, DesiredPeer, ExportPolicy, PeerType};
