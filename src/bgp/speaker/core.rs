//! The speaker's decisions, sans I/O (as `fsm.rs` is for one session, after rustybgp's
//! `daemon/src/fsm.rs`; one synchronous handler per input, as holo's
//! `holo-bgp/src/events.rs`): `Core::handle(now, input)` returns what to do. No sockets,
//! no channels and no clocks here: the time comes with each input, and the shell
//! (`super::Speaker`) binds the listener, spawns and stops session tasks, hands them
//! commands, sends Felix its batches, publishes the status and arms the stale timer.
//!
//! What it decides:
//! - the configuration diff: unchanged sessions are kept, changed ones restarted
//!   (Cease "other configuration change"), removed ones stopped (Cease "peer
//!   de-configured"), everything restarted when our identity changes (RFC 4486 §4);
//! - graceful restart as a helper (RFC 4724 §4.2): a peer whose session drops without a
//!   NOTIFICATION keeps its routes, stale, for its restart time; they are swept at its
//!   End-of-RIB or when that time runs out;
//! - what Felix is told (best paths, withdrawals, in sync after every End-of-RIB or
//!   10 s), and what each peer is sent (diffed against what it has, in at most
//!   `SEND_WINDOW` batches at a time, End-of-RIB after a full table, ROUTE-REFRESH).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use tokio::time::Instant;

use super::PeerStatus;
use super::peer::{Peer, export_batch, peer_config};
use crate::bgp::config::{DesiredBgpConfig, DesiredPeer};
use crate::bgp::fsm::{DownReason, State};
use crate::bgp::message::{RouteRefresh, err, kind};
use crate::bgp::rib::{Changed, PeerInfo, Rib, Source};
use crate::bgp::session::{PeerConfig, SEND_WINDOW, SessionEvent};
use crate::bgp::update::Update;
use crate::bgp::{LearnedRoute, RouteUpdate};

/// Most route changes in one message to Felix.
pub(crate) const FELIX_BATCH: usize = 1024;

/// Most prefixes worked out in one batch of UPDATEs for a peer.
pub(crate) const EXPORT_BATCH: usize = 2048;

/// How long Felix waits for the first full table before it is told "in sync" anyway.
pub(crate) const IN_SYNC_AFTER: Duration = Duration::from_secs(10);

/// The time of an input: monotonic for timers, wall clock for the status' "since".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Now {
    pub mono: Instant,
    pub wall: SystemTime,
}

impl Now {
    /// The clocks now (the shell's; the core never reads a clock).
    pub(crate) fn current() -> Now {
        Now {
            mono: Instant::now(),
            wall: SystemTime::now(),
        }
    }
}

/// What the core is told.
#[derive(Debug)]
pub(crate) enum Input {
    /// The configuration the speaker starts with: bind, start every session, export.
    Start(DesiredBgpConfig),
    /// A new desired configuration.
    Config(DesiredBgpConfig),
    /// What a session task reported.
    Session(SessionEvent),
    /// The stale timer (`Output::StaleTimer`) fired.
    StaleTimer,
    /// The periodic tick, with the peers whose session task ended on its own (a panic
    /// ends only its own session): restart those, hand over what waits, tell Felix
    /// when the table is complete.
    Tick { ended: Vec<IpAddr> },
}

/// How port 179 is to be bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ListenSpec {
    pub addr: SocketAddr,
    /// RFC 5082: the kernel answers a SYN with the listener's TTL, before any accept; a
    /// peer enforcing TTL security from its first segment drops anything below 255.
    pub ttl_security: bool,
    /// TCP MD5 keys (RFC 2385) of the peers of the listener's family.
    pub passwords: Vec<(IpAddr, String)>,
}

/// What the shell is to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Output {
    /// Drop the listener and bind this one (none: listen nowhere).
    Listen(Option<ListenSpec>),
    /// Spawn a session task for this peer (replacing one that ended).
    StartSession(PeerConfig),
    /// Stop the peer's session with this Cease subcode and forget its task.
    StopSession { peer: IpAddr, cease: u8 },
    /// `SessionCmd::Send` to the peer's session. Never waited for: the core limits them
    /// to `SEND_WINDOW` per peer not yet drained.
    Send {
        peer: IpAddr,
        epoch: u64,
        updates: Vec<Update>,
    },
    /// `SessionCmd::Restarted`: our restart is over (OPENs without R and F bits).
    Restarted(IpAddr),
    /// A batch for Felix (the shell waits for room: Felix's channel is bounded).
    Felix(Vec<RouteUpdate>),
    /// Every peer's status, by address.
    Status(Vec<PeerStatus>),
    /// When the earliest restarting peer's stale routes are to be swept (none: never);
    /// given whenever it changes.
    StaleTimer(Option<Instant>),
}

/// The speaker's state: the configuration, the RIB and every peer.
pub(crate) struct Core {
    cfg: DesiredBgpConfig,
    rib: Rib,
    peers: HashMap<IpAddr, Peer>,
    started: Instant,
    in_sync_sent: bool,
    /// The stale deadline last given to the shell.
    stale_timer: Option<Instant>,
}

impl Core {
    /// A core for `cfg`, started at `started` (Felix is told "in sync" at most
    /// `IN_SYNC_AFTER` later).
    pub(crate) fn new(cfg: DesiredBgpConfig, started: Instant) -> Core {
        Core {
            rib: Rib::new(cfg.local_as.0, cfg.router_id, cfg.cluster_id),
            cfg,
            peers: HashMap::new(),
            started,
            in_sync_sent: false,
            stale_timer: None,
        }
    }

    /// Apply one input.
    pub(crate) fn handle(&mut self, now: Now, input: Input) -> Vec<Output> {
        let mut out = Vec::new();
        match input {
            Input::Start(cfg) => self.start(now, cfg, &mut out),
            Input::Config(cfg) => self.apply(now, cfg, &mut out),
            Input::Session(ev) => self.event(now, ev, &mut out),
            Input::StaleTimer => self.expire_stale(now, &mut out),
            Input::Tick { ended } => self.housekeeping(now, ended, &mut out),
        }
        let deadline = self.peers.values().filter_map(|p| p.stale_until).min();
        if deadline != self.stale_timer {
            self.stale_timer = deadline;
            out.push(Output::StaleTimer(deadline));
        }
        out
    }

    /// The RIB (for tests).
    #[cfg(test)]
    pub(crate) fn rib(&self) -> &Rib {
        &self.rib
    }

    fn start(&mut self, now: Now, cfg: DesiredBgpConfig, out: &mut Vec<Output>) {
        self.rib = Rib::new(cfg.local_as.0, cfg.router_id, cfg.cluster_id);
        self.cfg = cfg;
        out.push(Output::Listen(listen_spec(&self.cfg)));
        for p in self.cfg.peers.clone() {
            self.add_peer(now, p, out);
        }
        let changed = self.rib.set_local(self.cfg.export.iter().copied());
        self.propagate(&changed, out);
        self.publish(out);
    }

    fn add_peer(&mut self, now: Now, spec: DesiredPeer, out: &mut Vec<Output>) {
        out.push(Output::StartSession(peer_config(
            &self.cfg,
            &spec,
            !self.in_sync_sent,
        )));
        self.peers.insert(spec.address, Peer::new(spec, now.wall));
    }

    fn remove_peer(&mut self, address: &IpAddr, cease: u8, out: &mut Vec<Output>) {
        if self.peers.remove(address).is_some() {
            out.push(Output::StopSession {
                peer: *address,
                cease,
            });
        }
        let changed = self.rib.peer_down(address);
        self.propagate(&changed, out);
    }

    /// Move to a new desired configuration, disturbing only what changed.
    fn apply(&mut self, now: Now, new: DesiredBgpConfig, out: &mut Vec<Output>) {
        let identity_changed = new.router_id != self.cfg.router_id
            || new.local_as != self.cfg.local_as
            || new.cluster_id != self.cfg.cluster_id;
        if identity_changed {
            let mut all: Vec<IpAddr> = self.peers.keys().copied().collect();
            all.sort_unstable();
            for a in all {
                self.remove_peer(&a, err::OTHER_CONFIG_CHANGE, out);
            }
            let old = std::mem::replace(
                &mut self.rib,
                Rib::new(new.local_as.0, new.router_id, new.cluster_id),
            );
            felix_withdraw_all(&old, out);
        }
        let old = std::mem::replace(&mut self.cfg, new.clone());
        if identity_changed
            || old.listen_address != new.listen_address
            || old.listen_port != new.listen_port
            || listen_keys(&old) != listen_keys(&new)
        {
            out.push(Output::Listen(listen_spec(&new)));
        }
        let wanted: HashMap<IpAddr, DesiredPeer> =
            new.peers.iter().map(|p| (p.address, p.clone())).collect();
        let mut current: Vec<IpAddr> = self.peers.keys().copied().collect();
        current.sort_unstable();
        for a in current {
            match wanted.get(&a) {
                None => self.remove_peer(&a, err::PEER_DECONFIGURED, out),
                Some(spec) if *spec != self.peers[&a].spec => {
                    self.remove_peer(&a, err::OTHER_CONFIG_CHANGE, out);
                    self.add_peer(now, spec.clone(), out);
                }
                Some(_) => {}
            }
        }
        for spec in &new.peers {
            if !self.peers.contains_key(&spec.address) {
                self.add_peer(now, spec.clone(), out);
            }
        }
        let changed = self.rib.set_local(new.export.iter().copied());
        if old.policy != new.policy || old.ipv6_next_hop != new.ipv6_next_hop {
            let mut everything = changed;
            everything.extend(self.rib.best_prefixes());
            for p in self.peers.values() {
                everything.extend(p.adj_out.keys().copied());
            }
            everything.sort_unstable();
            everything.dedup();
            self.propagate(&everything, out);
        } else {
            self.propagate(&changed, out);
        }
        self.publish(out);
    }

    fn event(&mut self, now: Now, ev: SessionEvent, out: &mut Vec<Output>) {
        match ev {
            SessionEvent::State {
                peer,
                state,
                last_error,
            } => {
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.status.state = state;
                    p.status.since = now.wall;
                    p.status.established_at =
                        (state == State::Established).then_some(p.status.since);
                    p.status.reason = match (state, last_error) {
                        (State::Established, _) => String::new(),
                        (_, Some(e)) => e.to_string(),
                        (_, None) => String::new(),
                    };
                }
                self.publish(out);
            }
            SessionEvent::Established {
                peer,
                negotiated,
                local,
                epoch,
            } => {
                let Some(p) = self.peers.get_mut(&peer) else {
                    return;
                };
                let info = PeerInfo {
                    address: peer,
                    router_id: negotiated.peer_id,
                    asn: negotiated.peer_as,
                    ibgp: negotiated.peer_as == self.cfg.local_as.0,
                    rr_client: p.spec.rr_client,
                    keep_next_hop: p.spec.keep_next_hop,
                    local_address: local,
                };
                p.negotiated = Some(negotiated);
                p.epoch = epoch;
                p.in_flight = 0;
                p.adj_out.clear();
                p.backlog.clear();
                p.end_of_rib = false;
                self.rib.peer_up(info);
                self.send_table(&peer, out);
            }
            SessionEvent::Down { peer, reason } => self.peer_down(now, peer, &reason, out),
            SessionEvent::Updates { peer, updates } => {
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.status.updates_in += updates.len() as u64;
                }
                let mut changed = Changed::new();
                for update in updates {
                    if update.is_end_of_rib().is_some() {
                        if let Some(p) = self.peers.get_mut(&peer) {
                            p.end_of_rib = true;
                            p.stale_until = None;
                        }
                        changed.append(&mut self.rib.sweep_stale(&peer));
                        continue;
                    }
                    if !update.discarded.is_empty() || update.treat_as_withdraw.is_some() {
                        tracing::warn!(%peer, treat_as_withdraw = ?update.treat_as_withdraw,
                            discarded = ?update.discarded, "malformed UPDATE handled per RFC 7606");
                    }
                    changed.append(&mut self.rib.apply_update(&peer, &update));
                }
                self.propagate(&changed, out);
            }
            SessionEvent::RouteRefresh { peer, request } => {
                let RouteRefresh { family, .. } = request;
                tracing::debug!(%peer, ?family, "route refresh requested");
                self.refresh(&peer, out);
            }
            SessionEvent::Drained {
                peer,
                epoch,
                updates,
            } => {
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.status.updates_out += updates;
                    if epoch == p.epoch {
                        p.in_flight = p.in_flight.saturating_sub(1);
                    }
                }
                self.pump(&peer, out);
            }
            SessionEvent::Sent {
                peer,
                kind: k,
                notification,
            } => {
                if let Some(p) = self.peers.get_mut(&peer) {
                    if k == kind::UPDATE {
                        p.status.updates_out += 1;
                    }
                    if let Some(code) = notification {
                        *p.status.notifications_out.entry(code).or_default() += 1;
                    }
                }
            }
            SessionEvent::NotificationReceived {
                peer,
                code,
                subcode,
            } => {
                tracing::info!(%peer, "{}", crate::bgp::message::describe(code, subcode));
                if let Some(p) = self.peers.get_mut(&peer) {
                    *p.status.notifications_in.entry(code).or_default() += 1;
                }
            }
        }
    }

    /// A session went down. RFC 4724 §4.2 helper: when the peer can restart gracefully
    /// and the session ended without a NOTIFICATION (the TCP connection closed, a hold
    /// timer ran out), its routes are kept, stale, for its restart time; otherwise they
    /// are withdrawn now.
    fn peer_down(&mut self, now: Now, peer: IpAddr, reason: &DownReason, out: &mut Vec<Output>) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        let gr = p
            .negotiated
            .take()
            .and_then(|n| n.peer_graceful_restart)
            .filter(|_| {
                matches!(
                    reason,
                    DownReason::ConnectionClosed(_)
                        | DownReason::HoldTimerExpired
                        | DownReason::SendHoldTimerExpired
                )
            });
        p.adj_out.clear();
        p.backlog.clear();
        p.in_flight = 0;
        p.eor_pending = false;
        p.too_large_logged.clear();
        p.status.advertised = 0;
        let changed = match gr {
            Some(g) if g.restart_time > 0 => {
                p.stale_until = Some(now.mono + Duration::from_secs(u64::from(g.restart_time)));
                self.rib.mark_stale(&peer)
            }
            _ => self.rib.peer_down(&peer),
        };
        self.propagate(&changed, out);
    }

    /// Everything for a peer that just came up, then End-of-RIB.
    fn send_table(&mut self, peer: &IpAddr, out: &mut Vec<Output>) {
        let all: Vec<IpNet> = self.rib.best_prefixes().collect();
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        p.backlog.extend(all.into_iter().map(|x| (x, false)));
        p.eor_pending = true;
        self.pump(peer, out);
        self.publish(out);
    }

    /// A ROUTE-REFRESH (RFC 2918 §4): send the peer everything again, then End-of-RIB.
    /// Requests that come while an earlier resend is still under way coalesce with it.
    fn refresh(&mut self, peer: &IpAddr, out: &mut Vec<Output>) {
        let all: Vec<IpNet> = self.rib.best_prefixes().collect();
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        if p.negotiated.is_none() {
            return;
        }
        let held: Vec<IpNet> = p.adj_out.keys().copied().collect();
        for x in all.into_iter().chain(held) {
            p.backlog.insert(x, true);
        }
        p.eor_pending = true;
        self.pump(peer, out);
    }

    /// Hand changed best paths to Felix and to every established peer.
    fn propagate(&mut self, changed: &Changed, out: &mut Vec<Output>) {
        if changed.is_empty() {
            return;
        }
        let mut updates = self
            .rib
            .take_forwarding_changes()
            .into_iter()
            .map(|(prefix, _, now)| match now {
                Some(next_hop) => RouteUpdate::Best(LearnedRoute { prefix, next_hop }),
                None => RouteUpdate::Withdrawn(prefix),
            });
        // In bounded batches: Felix's channel is bounded in messages, and one event can
        // carry a whole read's worth of routes.
        loop {
            let batch: Vec<RouteUpdate> = updates.by_ref().take(FELIX_BATCH).collect();
            if batch.is_empty() {
                break;
            }
            out.push(Output::Felix(batch));
        }
        let mut established: Vec<IpAddr> = self
            .peers
            .iter()
            .filter(|(_, p)| p.negotiated.is_some())
            .map(|(a, _)| *a)
            .collect();
        established.sort_unstable();
        for peer in established {
            self.export_to(&peer, changed, out);
        }
        self.publish(out);
    }

    /// Queue `prefixes` for export to `peer` and hand its session what its window allows.
    fn export_to(&mut self, peer: &IpAddr, prefixes: &Changed, out: &mut Vec<Output>) {
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        if p.negotiated.is_none() {
            return;
        }
        for x in prefixes {
            p.backlog.entry(*x).or_insert(false);
        }
        self.pump(peer, out);
    }

    /// Hand the session batches of UPDATEs from the backlog while it has fewer than
    /// `SEND_WINDOW` not yet written; End-of-RIB once a full table's backlog is empty.
    fn pump(&mut self, peer: &IpAddr, out: &mut Vec<Output>) {
        let Some(info) = self.rib.peer(peer).cloned() else {
            return;
        };
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        while p.negotiated.is_some() && p.in_flight < SEND_WINDOW {
            let updates = if p.backlog.is_empty() {
                if !p.eor_pending {
                    return;
                }
                p.eor_pending = false;
                let families = p.negotiated.as_ref().map(|n| n.families.clone());
                families
                    .unwrap_or_default()
                    .into_iter()
                    .map(Update::end_of_rib)
                    .collect()
            } else {
                let mut batch = Vec::with_capacity(EXPORT_BATCH.min(p.backlog.len()));
                while batch.len() < EXPORT_BATCH {
                    match p.backlog.pop_first() {
                        Some(x) => batch.push(x),
                        None => break,
                    }
                }
                export_batch(&self.rib, &self.cfg, &info, p, batch)
            };
            p.status.advertised = p.adj_out.len();
            if !updates.is_empty() {
                out.push(Output::Send {
                    peer: *peer,
                    epoch: p.epoch,
                    updates,
                });
                p.in_flight += 1;
            }
        }
    }

    /// The restart time of peers that have not come back ran out: their stale routes go.
    fn expire_stale(&mut self, now: Now, out: &mut Vec<Output>) {
        let mut due: Vec<IpAddr> = self
            .peers
            .iter()
            .filter(|(_, p)| p.stale_until.is_some_and(|t| t <= now.mono))
            .map(|(a, _)| *a)
            .collect();
        due.sort_unstable();
        for a in due {
            if let Some(p) = self.peers.get_mut(&a) {
                p.stale_until = None;
            }
            let changed = self.rib.sweep_stale(&a);
            self.propagate(&changed, out);
        }
    }

    /// Restart the sessions whose task ended, hand over what waits, and tell Felix the
    /// table is complete once every peer sent End-of-RIB or after `IN_SYNC_AFTER`.
    fn housekeeping(&mut self, now: Now, mut ended: Vec<IpAddr>, out: &mut Vec<Output>) {
        ended.sort_unstable();
        for a in ended {
            let Some(p) = self.peers.remove(&a) else {
                continue;
            };
            tracing::error!(peer = %a, "BGP session task ended unexpectedly; restarting it");
            let changed = self.rib.peer_down(&a);
            self.propagate(&changed, out);
            self.add_peer(now, p.spec, out);
            if let Some(p) = self.peers.get_mut(&a) {
                p.status.reason = "session task ended unexpectedly; restarted".into();
            }
        }
        let mut all: Vec<IpAddr> = self.peers.keys().copied().collect();
        all.sort_unstable();
        for a in &all {
            self.pump(a, out);
        }
        if !self.in_sync_sent
            && (now.mono.saturating_duration_since(self.started) >= IN_SYNC_AFTER
                || self.peers.values().all(|p| p.end_of_rib))
        {
            self.in_sync_sent = true;
            out.push(Output::Felix(vec![RouteUpdate::InSync]));
            out.extend(all.into_iter().map(Output::Restarted));
        }
        self.publish(out);
    }

    fn publish(&mut self, out: &mut Vec<Output>) {
        let mut all: Vec<PeerStatus> = Vec::with_capacity(self.peers.len());
        for (a, p) in &mut self.peers {
            p.status.received = self.rib.received(a);
            p.status.accepted = self.rib.accepted(a);
            all.push(p.status.clone());
        }
        all.sort_by_key(|s| s.address);
        out.push(Output::Status(all));
    }
}

/// Tell Felix to forget every learned route (the RIB is being replaced).
fn felix_withdraw_all(old: &Rib, out: &mut Vec<Output>) {
    let batch: Vec<RouteUpdate> = old
        .best_prefixes()
        .filter(|p| old.best(p).is_some_and(|b| b.source != Source::Local))
        .map(RouteUpdate::Withdrawn)
        .collect();
    if !batch.is_empty() {
        out.push(Output::Felix(batch));
    }
}

/// How the listener is bound for `cfg` (none when it listens nowhere).
fn listen_spec(cfg: &DesiredBgpConfig) -> Option<ListenSpec> {
    if cfg.listen_port == 0 {
        return None;
    }
    let addr = SocketAddr::new(cfg.listen_address, cfg.listen_port);
    let same_family = |p: &&DesiredPeer| p.address.is_ipv4() == addr.is_ipv4();
    Some(ListenSpec {
        addr,
        ttl_security: cfg
            .peers
            .iter()
            .filter(same_family)
            .any(|p| p.ttl_security.is_some()),
        passwords: cfg
            .peers
            .iter()
            .filter(same_family)
            .filter_map(|p| p.password.clone().map(|pw| (p.address, pw)))
            .collect(),
    })
}

/// What the listening socket is set up with, per peer (its MD5 key and whether it wants
/// TTL security): a change rebinds the listener.
fn listen_keys(cfg: &DesiredBgpConfig) -> Vec<(IpAddr, Option<String>, bool)> {
    cfg.peers
        .iter()
        .map(|p| (p.address, p.password.clone(), p.ttl_security.is_some()))
        .collect()
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
