//! One peer as the speaker's core keeps it (what it was sent, what waits to be sent,
//! its status), its session's settings, and the export diff: the UPDATEs that bring a
//! peer from what it has to what the export rules give it. Pure.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::time::SystemTime;

use ipnet::IpNet;
use tokio::time::Instant;

use super::PeerStatus;
use crate::bgp::config::{DesiredBgpConfig, DesiredPeer};
use crate::bgp::fsm::{Negotiated, SessionConfig};
use crate::bgp::message::{GracefulRestart, IPV4_UNICAST, IPV6_UNICAST};
use crate::bgp::rib::{PeerInfo, Rib};
use crate::bgp::session::{PeerConfig, send_codec};
use crate::bgp::update::{Attributes, MpUnreach, Update};
use crate::prefix_map::PrefixMap;

/// What we last sent a peer for a prefix.
pub(super) type Sent = (Attributes, IpAddr);

/// What the speaker keeps for one configured peer (its session task is the shell's).
pub(super) struct Peer {
    pub(super) spec: DesiredPeer,
    pub(super) status: PeerStatus,
    pub(super) negotiated: Option<Negotiated>,
    /// The session's epoch (from `SessionEvent::Established`).
    pub(super) epoch: u64,
    /// What the peer has, or will have once the batches handed over are written.
    pub(super) adj_out: PrefixMap<Sent>,
    /// Prefixes whose export to this peer is still to be worked out, in order; `true`:
    /// send even if the peer has it already (a route refresh). A set, so that repeated
    /// changes and full-table resends coalesce while a slow peer is catching up.
    pub(super) backlog: BTreeMap<IpNet, bool>,
    /// Batches handed to the session and not yet drained.
    pub(super) in_flight: usize,
    /// End-of-RIB goes out once the backlog of a full table is empty.
    pub(super) eor_pending: bool,
    /// Prefixes already logged as too large for this peer (logged once per session).
    pub(super) too_large_logged: HashSet<IpNet>,
    /// Stale routes are dropped at this time (a restarting peer's window).
    pub(super) stale_until: Option<Instant>,
    pub(super) end_of_rib: bool,
}

impl Peer {
    /// A peer just configured: no session yet, its status Idle since `since`.
    pub(super) fn new(spec: DesiredPeer, since: SystemTime) -> Peer {
        let status = PeerStatus::idle_since(spec.address, spec.peer_type, since);
        Peer {
            spec,
            status,
            negotiated: None,
            epoch: 0,
            adj_out: PrefixMap::default(),
            backlog: BTreeMap::new(),
            in_flight: 0,
            eor_pending: false,
            too_large_logged: HashSet::new(),
            stale_until: None,
            end_of_rib: false,
        }
    }
}

/// A session's configuration. `recovering`: we are still restarting (from our start until
/// the first full table is in, as for Calico's `bird -R`): the OPEN then says so (R bit)
/// and that forwarding state was kept (F bits: Felix keeps the kernel's routes meanwhile).
/// Afterwards both are clear, as BIRD sends them, so a helper flushes our stale routes
/// at once when a later session comes back.
fn session_config(cfg: &DesiredBgpConfig, p: &DesiredPeer, recovering: bool) -> SessionConfig {
    let mut s = SessionConfig::new(cfg.local_as.0, p.remote_as.0, cfg.router_id);
    s.passive = p.passive;
    s.hold_time = p.hold_time;
    // Calico's BIRD: `add paths on`.
    s.add_path = true;
    s.families = if cfg.ipv6_next_hop.is_some() || p.address.is_ipv6() {
        vec![IPV4_UNICAST, IPV6_UNICAST]
    } else {
        vec![IPV4_UNICAST]
    };
    if p.graceful_restart_secs > 0 {
        s.graceful_restart = Some(GracefulRestart {
            restarting: recovering,
            restart_time: p.graceful_restart_secs.min(4095) as u16,
            families: s.families.iter().map(|f| (*f, recovering)).collect(),
        });
    }
    s
}

pub(super) fn peer_config(cfg: &DesiredBgpConfig, p: &DesiredPeer, recovering: bool) -> PeerConfig {
    PeerConfig {
        address: p.address,
        port: p.port,
        local_address: p.local_address,
        password: p.password.clone(),
        ttl_security: p.ttl_security,
        multihop: p.multihop,
        session: session_config(cfg, p, recovering),
    }
}

/// The UPDATEs that bring `p` from what it has to what the export rules give it for
/// `batch` (prefix, and whether to send it even if unchanged). A route whose attributes,
/// with ours added, no longer fit in a message for this peer is not exported to it
/// (withdrawn if it had an earlier version), logged once and counted.
pub(super) fn export_batch(
    rib: &Rib,
    cfg: &DesiredBgpConfig,
    info: &PeerInfo,
    p: &mut Peer,
    batch: Vec<(IpNet, bool)>,
) -> Vec<Update> {
    let Some(neg) = &p.negotiated else {
        return Vec::new();
    };
    let (v4, v6) = (
        neg.families.contains(&IPV4_UNICAST),
        neg.families.contains(&IPV6_UNICAST),
    );
    let codec = send_codec(neg, info.ibgp);
    let mut fits: HashMap<Sent, bool> = HashMap::new();
    let mut groups: HashMap<Sent, Vec<IpNet>> = HashMap::new();
    let mut withdraw: Vec<IpNet> = Vec::new();
    for (prefix, force) in batch {
        if !(if prefix.addr().is_ipv4() { v4 } else { v6 }) {
            continue;
        }
        let mut new = rib.export(info, &prefix, &cfg.policy, cfg.ipv6_next_hop);
        if let Some(sent) = &new {
            let ok = match fits.get(sent) {
                Some(ok) => *ok,
                None => {
                    let ok = Update::announcement_fits(&sent.0, sent.1, &codec);
                    fits.insert(sent.clone(), ok);
                    ok
                }
            };
            if !ok {
                p.status.routes_too_large += 1;
                if p.too_large_logged.insert(prefix) {
                    tracing::warn!(peer = %info.address, %prefix,
                        "route not exported: with our attributes it no longer fits in a 4096-byte BGP message (RFC 4271 §4.1)");
                }
                new = None;
            }
        }
        let old = p.adj_out.get(&prefix);
        if new.as_ref() == old && !(force && new.is_some()) {
            continue;
        }
        match new {
            Some(sent) => {
                p.adj_out.insert(prefix, sent.clone());
                groups.entry(sent).or_default().push(prefix);
            }
            None => {
                p.adj_out.remove(&prefix);
                withdraw.push(prefix);
            }
        }
    }
    build_updates(groups, withdraw)
}

fn build_updates(groups: HashMap<Sent, Vec<IpNet>>, withdraw: Vec<IpNet>) -> Vec<Update> {
    let mut out = Vec::new();
    let (w4, w6): (Vec<IpNet>, Vec<IpNet>) = withdraw.into_iter().partition(|p| p.addr().is_ipv4());
    if !w4.is_empty() {
        out.push(Update {
            withdrawn: w4,
            ..Default::default()
        });
    }
    if !w6.is_empty() {
        out.push(Update {
            mp_unreach: Some(MpUnreach {
                family: IPV6_UNICAST,
                withdrawn: w6,
            }),
            ..Default::default()
        });
    }
    for ((attrs, next_hop), prefixes) in groups {
        out.push(Update::announce(attrs, next_hop, prefixes));
    }
    out
}
