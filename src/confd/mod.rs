//! confd: turns the datastore snapshot into the BGP speaker's desired configuration (and
//! optionally BIRD config files). The computation and actor arrive with the confd issue;
//! what exists now is the desired-config type the speaker will consume on a
//! `tokio::sync::watch` channel (DESIGN: datastore -> confd -> bgp).

pub use crate::bgp::config::{DesiredBgpConfig, DesiredPeer, ExportPolicy, PeerType};
