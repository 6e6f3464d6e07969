//! calico-node start-up: env config, IP autodetection, node registration, default pool,
//! actor wiring, health and metrics endpoints, shutdown.

pub mod autodetect;
pub mod config;
pub mod daemon;
pub mod http;
pub mod startup;
