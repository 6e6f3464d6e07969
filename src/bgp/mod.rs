//! The native BGP speaker (replaces BIRD): the wire codec (`message`, `update`), and the
//! message type the speaker hands to Felix, fixed from the start (DESIGN: bgp -> felix, one
//! way).

#[cfg(test)]
mod codec_tests;
pub mod fsm;
pub mod message;
pub mod update;

use std::net::IpAddr;

use ipnet::IpNet;

/// A best route learned over BGP, as Felix needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LearnedRoute {
    pub prefix: IpNet,
    pub next_hop: IpAddr,
}

/// What the speaker sends to Felix (bounded mpsc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteUpdate {
    /// Install or replace the route for `prefix`.
    Best(LearnedRoute),
    /// No route for this prefix any more.
    Withdrawn(IpNet),
    /// The speaker has delivered its full table (initial sync or after restart).
    InSync,
}
