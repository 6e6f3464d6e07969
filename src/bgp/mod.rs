//! The native BGP speaker (replaces BIRD): the wire codec (`message`, `update`), the
//! session FSM (`fsm`, sans-IO) and its task (`session`), the RIB (`rib`), and the speaker
//! (`speaker`: a sans-IO core and the actor around it) that applies a desired
//! configuration (`config`) and hands best routes to Felix (DESIGN: bgp -> felix, one
//! way). Per-peer status goes out as data on a unix socket (`status`; calicoctl renders
//! it, `crate::ctl::node_status`) and as Prometheus metrics (`metrics`).

// Enums that carry an UPDATE (messages, FSM inputs and outputs, session events) are
// decoded or produced once and consumed at once; boxing the large variant would only add an
// allocation per message.
#![allow(clippy::large_enum_variant)]

#[cfg(test)]
mod codec_tests;
pub mod config;
pub mod fsm;
pub mod message;
pub mod metrics;
mod openmap;
pub mod rib;
pub mod session;
pub mod sockopt;
pub mod speaker;
pub mod status;
pub mod update;

use std::net::IpAddr;

use ipnet::IpNet;

/// A best route learned over BGP, as Felix needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LearnedRoute {
    pub prefix: IpNet,
    pub next_hop: IpAddr,
}

/// What the speaker sends to Felix (bounded mpsc, in batches: one `Vec` per UPDATE or
/// change of configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteUpdate {
    /// Install or replace the route for `prefix`.
    Best(LearnedRoute),
    /// No route for this prefix any more.
    Withdrawn(IpNet),
    /// The speaker has delivered its full table (initial sync or after restart).
    InSync,
}
