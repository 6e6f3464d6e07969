//! calico-node in Rust: a Calico-compatible node agent (datastore, BGP, Felix, confd, IPAM,
//! CNI and calicoctl) in one crate. See `README.md` and the module docs.

pub mod accept;
pub mod bgp;
pub mod cni;
pub mod confd;
pub mod ctl;
pub mod datastore;
pub mod env;
pub mod felix;
pub mod health;
pub mod ipam;
pub mod model;
pub mod netlink;
pub mod node;
pub mod prefix_map;
pub mod state_file;
