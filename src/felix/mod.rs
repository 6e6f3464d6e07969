//! Felix: the dataplane (routes, tunnels, neighbours, sysctls, NAT). `calc` computes the
//! desired dataplane (pure); the reconcilers arrive with the rest of the Felix issue.
//! `FelixInput` fixes its two inbound channels: datastore updates from the syncer and best
//! routes from BGP.

pub mod actor;
pub mod calc;
pub mod events;
pub mod nat;
pub mod neigh;
pub mod nlbatch;
pub mod problem;
pub mod routes;
pub mod state;
pub mod sysctls;
pub mod tunnel_addr;
pub mod tunnels;

use crate::bgp::RouteUpdate;
use crate::datastore::syncer::SyncerEvent;

/// Everything that can change Felix's desired dataplane.
#[derive(Debug, Clone, PartialEq)]
pub enum FelixInput {
    Datastore(SyncerEvent),
    Bgp(RouteUpdate),
}
