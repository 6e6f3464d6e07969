//! Felix: the dataplane (routes, tunnels, neighbours, sysctls, NAT). The calculation and
//! reconcilers arrive with the Felix issue; what exists now is Felix's input type, fixing
//! its two inbound channels: datastore updates from the syncer and best routes from BGP.

use crate::bgp::RouteUpdate;
use crate::datastore::syncer::SyncerEvent;

/// Everything that can change Felix's desired dataplane.
#[derive(Debug, Clone, PartialEq)]
pub enum FelixInput {
    Datastore(SyncerEvent),
    Bgp(RouteUpdate),
}
