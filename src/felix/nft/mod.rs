//! The policy dataplane and NAT outgoing in nftables (REFERENCE §9 "nftables layout"):
//! one table `calico` per family (`ip`, `ip6`) holds both the NAT layer (`felix::nat`) and
//! the filter layer, so that neither change wipes the other. Other tables (kube-proxy's,
//! Docker's, iptables-nft's, the host's) are never touched; our tables stay at shutdown.
//!
//! ```text
//!  hook forward:  filter-FORWARD --jump--> filter-cali-FORWARD
//!                   iifname cali* -> filter-cali-from-wl-dispatch  (vmap iface -> cali-fw-<iface>)
//!                   oifname cali* -> filter-cali-to-wl-dispatch    (vmap iface -> cali-tw-<iface>)
//!                 then: accept mark set -> accept
//!  hook input:    filter-INPUT: iifname cali* -> filter-cali-wl-to-host
//!                   (from-wl-dispatch, then defaultEndpointToHostAction)
//!  endpoint chain: ct established,related accept; ct invalid drop; per tier its policy
//!                  chains (cali-pi-/cali-po-<id>), end-of-tier drop unless passed;
//!                  profiles (cali-pri-/cali-pro-<name>); drop
//! ```
//!
//! `render` is pure (the whole tables, or one transaction for a [`Delta`]); `exec` runs
//! `nft -f -` and keeps what it has programmed, so that a delta knows what exists; a delta
//! of set elements only (a relabel) goes as one nfnetlink batch (`netlink`), as nft's own
//! cache fetch costs more than the change.
//!
//! [`Delta`]: crate::felix::policy::Delta

pub mod exec;
pub mod netlink;
pub mod render;

pub use exec::{NftError, PolicyTables};
