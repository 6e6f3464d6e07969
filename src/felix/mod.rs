//! Felix: the dataplane (routes, tunnels, neighbours, sysctls, NAT). `state` folds the
//! inputs and `calc` computes the desired dataplane (pure); `core` decides when and how to
//! apply it (pure, sans-IO); `actor` is the I/O shell around the core, `dataplane` carries
//! its passes out through the reconcilers, `metrics` holds Felix's Prometheus metrics.
//! `FelixInput` fixes its two inbound channels: datastore updates from the syncer and best
//! routes from BGP.

pub mod actor;
pub mod calc;
pub mod core;
pub mod dataplane;
pub mod events;
pub mod metrics;
pub mod nat;
pub mod neigh;
pub mod nft;
pub mod policy;
pub mod problem;
pub mod routes;
pub mod state;
pub mod sysctls;
pub mod tunnels;

#[cfg(test)]
mod replay_tests;

use crate::bgp::RouteUpdate;
use crate::datastore::syncer::SyncerEvent;

/// Everything that can change Felix's desired dataplane.
#[derive(Debug, Clone, PartialEq)]
pub enum FelixInput {
    Datastore(SyncerEvent),
    Bgp(RouteUpdate),
}
