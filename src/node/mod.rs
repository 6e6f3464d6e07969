//! calico-node start-up: env config, IP autodetection, node registration, default pool,
//! actor wiring, health and metrics endpoints, command line, probes, shutdown.

pub mod autodetect;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod http;
pub mod probe;
pub mod shutdown;
pub mod startup;
pub mod supervisor;
pub mod tunnel_addrs;
