//! The speaker actor: applies the desired configuration (sessions added, removed or
//! replaced without touching unchanged ones), listens for peers, runs the RIB, sends each
//! peer what the export rules give it (diffed against what it already has), hands best
//! learned routes to Felix, keeps a restarting peer's routes as stale (RFC 4724 helper),
//! and publishes per-peer status.
//!
//! Channels:
//! ```text
//! confd --watch DesiredBgpConfig--> speaker --mpsc Vec<RouteUpdate>--> felix
//!                                   |   ^
//!                  SessionCmd (mpsc)|   | SessionEvent (mpsc, shared by all sessions)
//!                                   v   |
//!                              one session task per peer
//! speaker --watch Vec<PeerStatus>--> status endpoint, metrics
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::config::{DesiredBgpConfig, DesiredPeer, PeerType};
use super::fsm::{DownReason, Negotiated, SessionConfig, State};
use super::message::{GracefulRestart, IPV4_UNICAST, IPV6_UNICAST, RouteRefresh, err, kind};
use super::rib::{Changed, PeerInfo, PrefixMap, Rib, Source};
use super::session::{PeerConfig, SEND_WINDOW, SessionCmd, SessionEvent, send_codec, spawn};
use super::sockopt;
use super::update::{Attributes, MpUnreach, Update};
use super::{LearnedRoute, RouteUpdate};

/// One peer's status, for `calicoctl node status`, readiness and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    pub address: IpAddr,
    pub peer_type: PeerType,
    pub state: State,
    /// When the state last changed.
    pub since: SystemTime,
    /// Why it is not Established (empty when it is).
    pub reason: String,
    pub received: usize,
    pub accepted: usize,
    pub advertised: usize,
    pub updates_in: u64,
    pub updates_out: u64,
    /// NOTIFICATIONs received and sent, by error code.
    pub notifications_in: BTreeMap<u8, u64>,
    pub notifications_out: BTreeMap<u8, u64>,
    /// When the session last became Established.
    pub established_at: Option<SystemTime>,
    /// Routes not exported to this peer because with our attributes they no longer fit
    /// in a BGP message (counted per refusal).
    pub routes_too_large: u64,
}

impl PeerStatus {
    /// A peer just configured: Idle since now (RFC 4271 §8.2.2's start state), nothing
    /// counted yet.
    pub fn new(address: IpAddr, peer_type: PeerType) -> PeerStatus {
        PeerStatus {
            address,
            peer_type,
            state: State::Idle,
            since: SystemTime::now(),
            reason: String::new(),
            received: 0,
            accepted: 0,
            advertised: 0,
            updates_in: 0,
            updates_out: 0,
            notifications_in: BTreeMap::new(),
            notifications_out: BTreeMap::new(),
            established_at: None,
            routes_too_large: 0,
        }
    }
}

/// What we last sent a peer for a prefix.
type Sent = (Attributes, IpAddr);

struct Peer {
    spec: DesiredPeer,
    /// Bounded, and only ever `try_send`: the speaker never waits for a session (which
    /// may be waiting for it). UPDATEs go out in at most `SEND_WINDOW` batches at a time.
    tx: mpsc::Sender<SessionCmd>,
    task: tokio::task::JoinHandle<()>,
    status: PeerStatus,
    negotiated: Option<Negotiated>,
    /// The session's epoch (from `SessionEvent::Established`).
    epoch: u64,
    /// What the peer has, or will have once the batches handed over are written.
    adj_out: PrefixMap<Sent>,
    /// Prefixes whose export to this peer is still to be worked out, in order; `true`:
    /// send even if the peer has it already (a route refresh). A set, so that repeated
    /// changes and full-table resends coalesce while a slow peer is catching up.
    backlog: BTreeMap<IpNet, bool>,
    /// Batches handed to the session and not yet drained.
    in_flight: usize,
    /// End-of-RIB goes out once the backlog of a full table is empty.
    eor_pending: bool,
    /// Prefixes already logged as too large for this peer (logged once per session).
    too_large_logged: HashSet<IpNet>,
    /// Stale routes are dropped at this time (a restarting peer's window).
    stale_until: Option<Instant>,
    end_of_rib: bool,
}

/// The speaker. Build it with [`Speaker::new`], then `run` it.
pub struct Speaker {
    cfg: DesiredBgpConfig,
    rib: Rib,
    peers: HashMap<IpAddr, Peer>,
    listener: Option<TcpListener>,
    events_tx: mpsc::Sender<SessionEvent>,
    events: mpsc::Receiver<SessionEvent>,
    felix: mpsc::Sender<Vec<RouteUpdate>>,
    status: watch::Sender<Vec<PeerStatus>>,
    started: Instant,
    in_sync_sent: bool,
}

/// Most route changes in one message to Felix.
const FELIX_BATCH: usize = 1024;

/// Most prefixes worked out in one batch of UPDATEs for a peer.
const EXPORT_BATCH: usize = 2048;

/// How long Felix waits for the first full table before it is told "in sync" anyway.
const IN_SYNC_AFTER: Duration = Duration::from_secs(10);

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

fn peer_config(cfg: &DesiredBgpConfig, p: &DesiredPeer, recovering: bool) -> PeerConfig {
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

impl Speaker {
    pub fn new(
        cfg: DesiredBgpConfig,
        felix: mpsc::Sender<Vec<RouteUpdate>>,
        status: watch::Sender<Vec<PeerStatus>>,
    ) -> Speaker {
        // Small: one event can hold the UPDATEs of a whole read.
        let (events_tx, events) = mpsc::channel(16);
        Speaker {
            rib: Rib::new(cfg.local_as.0, cfg.router_id, cfg.cluster_id),
            cfg,
            peers: HashMap::new(),
            listener: None,
            events_tx,
            events,
            felix,
            status,
            started: Instant::now(),
            in_sync_sent: false,
        }
    }

    /// Run until cancelled, following `config`.
    pub async fn run(
        mut self,
        mut config: watch::Receiver<DesiredBgpConfig>,
        cancel: CancellationToken,
    ) -> std::io::Result<()> {
        let initial = config.borrow_and_update().clone();
        self.cfg = initial.clone();
        self.rib = Rib::new(initial.local_as.0, initial.router_id, initial.cluster_id);
        self.listen()?;
        for p in initial.peers.clone() {
            self.add_peer(p);
        }
        let changed = self.rib.set_local(initial.export.iter().copied());
        self.propagate(&changed).await;
        self.publish();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        // Out of descriptors, accept fails with the connection still queued: pause, don't spin.
        let mut accept_backoff = crate::accept::AcceptBackoff::default();
        loop {
            let stale_deadline = self.peers.values().filter_map(|p| p.stale_until).min();
            tokio::select! {
                _ = cancel.cancelled() => break,
                r = config.changed() => {
                    if r.is_err() { break; }
                    let new = config.borrow_and_update().clone();
                    self.apply(new).await?;
                }
                Some(ev) = self.events.recv() => self.event(ev).await,
                (stream, from) = accept(&self.listener, &mut accept_backoff) => {
                    match self.peers.get(&from.ip()) {
                        Some(p) => {
                            if p.tx.try_send(SessionCmd::Incoming(stream)).is_err() {
                                tracing::warn!(%from, "connection refused: its session is not taking commands");
                            }
                        }
                        None => tracing::debug!(%from, "connection from an unknown peer refused"),
                    }
                }
                _ = sleep_until(stale_deadline) => self.expire_stale().await,
                _ = tick.tick() => self.housekeeping().await,
            }
        }
        for (_, p) in self.peers.drain() {
            let _ = p.tx.try_send(SessionCmd::Stop(err::ADMIN_SHUTDOWN));
        }
        Ok(())
    }

    fn listen(&mut self) -> std::io::Result<()> {
        self.listener = None;
        if self.cfg.listen_port == 0 {
            return Ok(());
        }
        let addr = SocketAddr::new(self.cfg.listen_address, self.cfg.listen_port);
        let sock = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        sock.set_reuseaddr(true)?;
        // RFC 5082: the kernel answers a SYN with the listener's TTL, before any accept;
        // a peer enforcing TTL security from its first segment drops anything less than
        // 255. (Accepted sockets then get the full setting, see `secure_accepted`.)
        if self
            .cfg
            .peers
            .iter()
            .any(|p| p.ttl_security.is_some() && p.address.is_ipv4() == addr.is_ipv4())
        {
            sockopt::set_ttl(&sock, addr, 255)?;
        }
        for p in &self.cfg.peers {
            if let Some(pw) = &p.password
                && p.address.is_ipv4() == addr.is_ipv4()
            {
                sockopt::set_md5(&sock, p.address, pw.as_bytes())?;
            }
        }
        sock.bind(addr)?;
        self.listener = Some(sock.listen(128)?);
        Ok(())
    }

    fn add_peer(&mut self, spec: DesiredPeer) {
        let cfg = peer_config(&self.cfg, &spec, !self.in_sync_sent);
        let (tx, task) = spawn(cfg, self.events_tx.clone());
        let status = PeerStatus::new(spec.address, spec.peer_type);
        self.peers.insert(
            spec.address,
            Peer {
                spec,
                tx,
                task,
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
            },
        );
    }

    async fn remove_peer(&mut self, address: &IpAddr, cease: u8) {
        if let Some(p) = self.peers.remove(address) {
            // If the queue is full, dropping the sender stops the session all the same.
            let _ = p.tx.try_send(SessionCmd::Stop(cease));
        }
        let changed = self.rib.peer_down(address);
        self.propagate(&changed).await;
    }

    /// Move to a new desired configuration, disturbing only what changed.
    async fn apply(&mut self, new: DesiredBgpConfig) -> std::io::Result<()> {
        let identity_changed = new.router_id != self.cfg.router_id
            || new.local_as != self.cfg.local_as
            || new.cluster_id != self.cfg.cluster_id;
        if identity_changed {
            let all: Vec<IpAddr> = self.peers.keys().copied().collect();
            for a in all {
                self.remove_peer(&a, err::OTHER_CONFIG_CHANGE).await;
            }
            let old = std::mem::replace(
                &mut self.rib,
                Rib::new(new.local_as.0, new.router_id, new.cluster_id),
            );
            self.felix_withdraw_all(&old).await;
        }
        let old = std::mem::replace(&mut self.cfg, new.clone());
        // What the listening socket is set up with.
        let passwords = |c: &DesiredBgpConfig| -> Vec<(IpAddr, Option<String>, bool)> {
            c.peers
                .iter()
                .map(|p| (p.address, p.password.clone(), p.ttl_security.is_some()))
                .collect()
        };
        if identity_changed
            || old.listen_address != new.listen_address
            || old.listen_port != new.listen_port
            || passwords(&old) != passwords(&new)
        {
            self.listen()?;
        }
        let wanted: HashMap<IpAddr, DesiredPeer> =
            new.peers.iter().map(|p| (p.address, p.clone())).collect();
        let current: Vec<IpAddr> = self.peers.keys().copied().collect();
        for a in current {
            match wanted.get(&a) {
                None => self.remove_peer(&a, err::PEER_DECONFIGURED).await,
                Some(spec) if *spec != self.peers[&a].spec => {
                    self.remove_peer(&a, err::OTHER_CONFIG_CHANGE).await;
                    self.add_peer(spec.clone());
                }
                Some(_) => {}
            }
        }
        for (a, spec) in wanted {
            if !self.peers.contains_key(&a) {
                self.add_peer(spec);
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
            self.propagate(&everything).await;
        } else {
            self.propagate(&changed).await;
        }
        self.publish();
        Ok(())
    }

    async fn event(&mut self, ev: SessionEvent) {
        match ev {
            SessionEvent::State {
                peer,
                state,
                last_error,
            } => {
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.status.state = state;
                    p.status.since = SystemTime::now();
                    p.status.established_at =
                        (state == State::Established).then_some(p.status.since);
                    p.status.reason = match (state, last_error) {
                        (State::Established, _) => String::new(),
                        (_, Some(e)) => e.to_string(),
                        (_, None) => String::new(),
                    };
                }
                self.publish();
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
                p.negotiated = Some(negotiated.clone());
                p.epoch = epoch;
                p.in_flight = 0;
                p.adj_out.clear();
                p.backlog.clear();
                p.end_of_rib = false;
                let info = PeerInfo {
                    address: peer,
                    router_id: negotiated.peer_id,
                    asn: negotiated.peer_as,
                    ibgp: negotiated.peer_as == self.cfg.local_as.0,
                    rr_client: p.spec.rr_client,
                    keep_next_hop: p.spec.keep_next_hop,
                    local_address: local,
                };
                self.rib.peer_up(info);
                self.send_table(&peer);
            }
            SessionEvent::Down { peer, reason } => {
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
                        // RFC 4724 helper: keep its routes (stale) for its restart time.
                        p.stale_until =
                            Some(Instant::now() + Duration::from_secs(u64::from(g.restart_time)));
                        self.rib.mark_stale(&peer)
                    }
                    _ => self.rib.peer_down(&peer),
                };
                self.propagate(&changed).await;
            }
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
                self.propagate(&changed).await;
            }
            SessionEvent::RouteRefresh { peer, request } => {
                let RouteRefresh { family, .. } = request;
                tracing::debug!(%peer, ?family, "route refresh requested");
                self.refresh(&peer);
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
                self.pump(&peer);
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
                tracing::info!(%peer, "{}", super::message::describe(code, subcode));
                if let Some(p) = self.peers.get_mut(&peer) {
                    *p.status.notifications_in.entry(code).or_default() += 1;
                }
            }
        }
    }

    /// Everything for a peer that just came up, then End-of-RIB.
    fn send_table(&mut self, peer: &IpAddr) {
        let all: Vec<IpNet> = self.rib.best_prefixes().collect();
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        p.backlog.extend(all.into_iter().map(|x| (x, false)));
        p.eor_pending = true;
        self.pump(peer);
        self.publish();
    }

    /// A ROUTE-REFRESH (RFC 2918 §4): send the peer everything again, then End-of-RIB.
    /// Requests that come while an earlier resend is still under way coalesce with it.
    fn refresh(&mut self, peer: &IpAddr) {
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
        self.pump(peer);
    }

    /// Hand changed best paths to Felix and to every established peer.
    async fn propagate(&mut self, changed: &Changed) {
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
            let _ = self.felix.send(batch).await;
        }
        let established: Vec<IpAddr> = self
            .peers
            .iter()
            .filter(|(_, p)| p.negotiated.is_some())
            .map(|(a, _)| *a)
            .collect();
        for peer in established {
            self.export_to(&peer, changed);
        }
        self.publish();
    }

    /// Queue `prefixes` for export to `peer` and hand its session what its window allows.
    fn export_to(&mut self, peer: &IpAddr, prefixes: &Changed) {
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        if p.negotiated.is_none() {
            return;
        }
        for x in prefixes {
            p.backlog.entry(*x).or_insert(false);
        }
        self.pump(peer);
    }

    /// Hand the session batches of UPDATEs from the backlog while it has fewer than
    /// `SEND_WINDOW` not yet written; End-of-RIB once a full table's backlog is empty.
    fn pump(&mut self, peer: &IpAddr) {
        let Some(info) = self.rib.peer(peer).cloned() else {
            return;
        };
        loop {
            let Some(p) = self.peers.get_mut(peer) else {
                return;
            };
            if p.negotiated.is_none() || p.in_flight >= SEND_WINDOW {
                return;
            }
            let tx = p.tx.clone();
            let Ok(permit) = tx.try_reserve() else {
                // Full or gone: housekeeping tries again.
                return;
            };
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
                permit.send(SessionCmd::Send {
                    epoch: p.epoch,
                    updates,
                });
                p.in_flight += 1;
            }
        }
    }

    async fn expire_stale(&mut self) {
        let now = Instant::now();
        let due: Vec<IpAddr> = self
            .peers
            .iter()
            .filter(|(_, p)| p.stale_until.is_some_and(|t| t <= now))
            .map(|(a, _)| *a)
            .collect();
        for a in due {
            if let Some(p) = self.peers.get_mut(&a) {
                p.stale_until = None;
            }
            let changed = self.rib.sweep_stale(&a);
            self.propagate(&changed).await;
        }
    }

    /// Tell Felix to forget every learned route (the RIB is being replaced).
    async fn felix_withdraw_all(&mut self, old: &Rib) {
        let batch: Vec<RouteUpdate> = old
            .best_prefixes()
            .filter(|p| old.best(p).is_some_and(|b| b.source != Source::Local))
            .map(RouteUpdate::Withdrawn)
            .collect();
        if !batch.is_empty() {
            let _ = self.felix.send(batch).await;
        }
    }

    /// Restart session tasks that died (a panic ends only its own session), and tell
    /// Felix the table is complete once every peer sent End-of-RIB or after a while.
    async fn housekeeping(&mut self) {
        let dead: Vec<IpAddr> = self
            .peers
            .iter()
            .filter(|(_, p)| p.task.is_finished())
            .map(|(a, _)| *a)
            .collect();
        for a in dead {
            tracing::error!(peer = %a, "BGP session task ended unexpectedly; restarting it");
            let spec = self.peers[&a].spec.clone();
            let changed = self.rib.peer_down(&a);
            self.peers.remove(&a);
            self.propagate(&changed).await;
            self.add_peer(spec);
            if let Some(p) = self.peers.get_mut(&a) {
                p.status.reason = "session task ended unexpectedly; restarted".into();
            }
        }
        // A batch that found the session's queue full is handed over now.
        let all: Vec<IpAddr> = self.peers.keys().copied().collect();
        for a in all {
            self.pump(&a);
        }
        if !self.in_sync_sent
            && (self.started.elapsed() >= IN_SYNC_AFTER
                || self.peers.values().all(|p| p.end_of_rib))
        {
            self.in_sync_sent = true;
            let _ = self.felix.send(vec![RouteUpdate::InSync]).await;
            for p in self.peers.values() {
                let _ = p.tx.try_send(SessionCmd::Restarted);
            }
        }
        self.publish();
    }

    fn publish(&mut self) {
        let mut all: Vec<PeerStatus> = Vec::with_capacity(self.peers.len());
        for (a, p) in &mut self.peers {
            p.status.received = self.rib.received(a);
            p.status.accepted = self.rib.accepted(a);
            all.push(p.status.clone());
        }
        all.sort_by_key(|s| s.address);
        self.status.send_replace(all);
    }
}

/// The UPDATEs that bring `p` from what it has to what the export rules give it for
/// `batch` (prefix, and whether to send it even if unchanged). A route whose attributes,
/// with ours added, no longer fit in a message for this peer is not exported to it
/// (withdrawn if it had an earlier version), logged once and counted.
fn export_batch(
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

/// The next connection on port 179 (never, without a listener); failed accepts pause with
/// `backoff` (see [`crate::accept`]).
async fn accept(
    l: &Option<TcpListener>,
    backoff: &mut crate::accept::AcceptBackoff,
) -> (tokio::net::TcpStream, SocketAddr) {
    match l {
        Some(l) => crate::accept::accept(l, backoff, "bgp").await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Shared handle type for status readers.
pub type StatusReceiver = watch::Receiver<Vec<PeerStatus>>;

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::bgp::config::CommunityValue;
    use crate::bgp::session::PANIC_AT_NEXT_TURN;
    use crate::bgp::session::tests::read_msg;

    struct Node {
        status: watch::Receiver<Vec<PeerStatus>>,
        felix: mpsc::Receiver<Vec<RouteUpdate>>,
    }

    /// A speaker on a loopback address (127.0.10.x, all on `port`) peering with `peers`.
    fn node(me: u8, port: u16, peers: &[u8], export: &[&str], cancel: &CancellationToken) -> Node {
        let addr = Ipv4Addr::new(127, 0, 10, me);
        let mut cfg = DesiredBgpConfig::new(addr, 64512);
        cfg.listen_address = IpAddr::V4(addr);
        cfg.listen_port = port;
        cfg.export = export.iter().map(|p| p.parse().unwrap()).collect();
        cfg.policy.allowed = cfg.export.clone();
        for p in peers {
            let mut d = DesiredPeer::new(
                IpAddr::V4(Ipv4Addr::new(127, 0, 10, *p)),
                64512,
                PeerType::NodeToNodeMesh,
            );
            d.port = port;
            d.local_address = Some(IpAddr::V4(addr));
            d.hold_time = 3;
            d.graceful_restart_secs = 0;
            cfg.peers.push(d);
        }
        let (felix_tx, felix) = mpsc::channel(1000);
        let (status_tx, status) = watch::channel(Vec::new());
        let (_keep, cfg_rx) = watch::channel(cfg.clone());
        let speaker = Speaker::new(cfg, felix_tx, status_tx);
        let c = cancel.clone();
        tokio::spawn(async move {
            let _keep = _keep;
            speaker.run(cfg_rx, c).await.unwrap();
        });
        Node { status, felix }
    }

    fn peer_status(n: &Node, last: u8) -> Option<PeerStatus> {
        let a = IpAddr::V4(Ipv4Addr::new(127, 0, 10, last));
        n.status.borrow().iter().find(|s| s.address == a).cloned()
    }

    async fn until(what: &str, mut f: impl FnMut() -> bool) {
        let limit = Instant::now() + Duration::from_secs(30);
        while !f() {
            assert!(Instant::now() < limit, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    const SLOW_US: Ipv4Addr = Ipv4Addr::new(127, 0, 12, 1);
    const SLOW_PEER: Ipv4Addr = Ipv4Addr::new(127, 0, 12, 2);

    /// A speaker on `SLOW_US:port`, passive toward `SLOW_PEER` (hold time `hold`), with
    /// `routes` /32s of its own to export, each with ~4 KB of communities (so one route per
    /// message).
    fn exporting_speaker(
        port: u16,
        hold: u16,
        routes: u32,
        cancel: &CancellationToken,
    ) -> (Node, watch::Sender<DesiredBgpConfig>) {
        let mut cfg = DesiredBgpConfig::new(SLOW_US, 64512);
        cfg.listen_address = IpAddr::V4(SLOW_US);
        cfg.listen_port = port;
        cfg.export = routes_from(0, routes);
        cfg.policy.allowed = vec!["10.0.0.0/8".parse().unwrap()];
        // ~4 KB of communities on every route: one route per message.
        let communities = (0..1000).map(CommunityValue::Standard).collect();
        cfg.policy.communities = vec![("10.0.0.0/8".parse().unwrap(), communities)];
        let mut d = DesiredPeer::new(IpAddr::V4(SLOW_PEER), 64512, PeerType::Global);
        d.passive = true;
        d.hold_time = hold;
        d.graceful_restart_secs = 0;
        cfg.peers.push(d);
        let (felix_tx, felix) = mpsc::channel(1000);
        let (status_tx, status) = watch::channel(Vec::new());
        let (config, cfg_rx) = watch::channel(cfg.clone());
        let speaker = Speaker::new(cfg, felix_tx, status_tx);
        let c = cancel.clone();
        tokio::spawn(async move { speaker.run(cfg_rx, c).await.unwrap() });
        (Node { status, felix }, config)
    }

    /// `n` host routes in 10.0.0.0/8 from the `first`th on.
    fn routes_from(first: u32, n: u32) -> Vec<IpNet> {
        (first..first + n)
            .map(|i| IpNet::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)), 32).unwrap())
            .collect()
    }

    /// A hand-written peer: connects from `SLOW_PEER` (with a receive buffer of
    /// `rcvbuf` bytes if given), sends OPEN (hold `hold`, route refresh) and KEEPALIVE,
    /// and reads until our OPEN.
    async fn raw_peer(
        port: u16,
        hold: u16,
        rcvbuf: Option<u32>,
    ) -> (tokio::net::TcpStream, bytes::BytesMut) {
        use crate::bgp::message::{Capability, Codec, Message, Open};
        use tokio::io::AsyncWriteExt;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut sock = loop {
            let s = TcpSocket::new_v4().unwrap();
            if let Some(b) = rcvbuf {
                s.set_recv_buffer_size(b).unwrap();
            }
            s.bind(SocketAddr::new(IpAddr::V4(SLOW_PEER), 0)).unwrap();
            match s.connect(SocketAddr::new(IpAddr::V4(SLOW_US), port)).await {
                Ok(c) => break c,
                Err(e) => {
                    assert!(Instant::now() < deadline, "connect: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        let caps = vec![
            Capability::Multiprotocol(IPV4_UNICAST),
            Capability::RouteRefresh,
        ];
        let open = Message::Open(Open::new(64512, hold, SLOW_PEER, caps));
        let codec = Codec::default();
        sock.write_all(&open.to_bytes(&codec).unwrap())
            .await
            .unwrap();
        sock.write_all(&Message::Keepalive.to_bytes(&codec).unwrap())
            .await
            .unwrap();
        let mut buf = bytes::BytesMut::new();
        loop {
            match read_msg(&mut sock, &mut buf).await {
                Some(Message::Open(_)) => break,
                Some(_) => {}
                None => panic!("closed before our OPEN"),
            }
        }
        (sock, buf)
    }

    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// RFC 4271 §4.4 with a peer that stops reading (zero window) while we have ~8 MB of
    /// UPDATEs for it (more than the socket buffers and the writer's queue hold): while it
    /// still sends KEEPALIVEs the session stays up and, though the table changes
    /// meanwhile, what waits for the peer stays bounded (a set of prefixes, not a queue of
    /// UPDATEs per change); once it is silent too, our hold timer expires on time
    /// although our writes are blocked. (Before: the session task sat in a blocked write,
    /// so its timers and reads stopped, and the peer was never dropped.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_that_stops_reading_is_dropped_at_hold_expiry_with_bounded_memory() {
        use crate::bgp::message::{Codec, Message};
        use tokio::io::AsyncWriteExt;
        const ROUTES: u32 = 2000;
        const HOLD: u16 = 8;
        let port = 20_000 + (std::process::id() % 20_000) as u16;
        let cancel = CancellationToken::new();
        let (us, config) = exporting_speaker(port, HOLD, ROUTES, &cancel);
        let before = rss_kib();
        let (mut sock, _buf) = raw_peer(port, HOLD, Some(4096)).await;
        let state = || us.status.borrow().first().map(|s| s.state);
        until("Established", || state() == Some(State::Established)).await;
        // The peer never reads again; it sends KEEPALIVEs for a while, and the table
        // changes twice (every route withdrawn, as many new ones announced).
        let keepalive = Message::Keepalive.to_bytes(&Codec::default()).unwrap();
        for round in 1..=2u32 {
            let mut cfg = config.borrow().clone();
            cfg.export = routes_from(round * ROUTES, ROUTES);
            config.send_replace(cfg);
            for _ in 0..3 {
                sock.write_all(&keepalive).await.unwrap();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        let st = us.status.borrow()[0].clone();
        assert_eq!(st.state, State::Established, "{st:?}");
        // The process's memory says something only when this test has it to itself
        // (nextest: a process per test; `cargo test` runs tests side by side).
        let grown_mib = rss_kib().saturating_sub(before) / 1024;
        if std::env::var("NEXTEST_EXECUTION_MODE").as_deref() == Ok("process-per-test") {
            assert!(
                grown_mib < 64,
                "memory grew by {grown_mib} MiB while the peer did not read"
            );
        } else {
            eprintln!("memory grew by {grown_mib} MiB (not checked: tests share this process)");
        }
        // Now silent as well: dropped when the hold time runs out.
        let silent = Instant::now();
        until("the hold timer to expire", || {
            state() != Some(State::Established)
        })
        .await;
        let took = silent.elapsed();
        assert!(
            took < Duration::from_secs(u64::from(HOLD) + 3),
            "dropped only after {took:?}"
        );
        let st = us.status.borrow()[0].clone();
        assert!(st.reason.contains("hold timer expired"), "{st:?}");
        drop(sock);
        cancel.cancel();
    }

    /// Many ROUTE-REFRESH requests at once coalesce into one resend (not one full table
    /// per request, as before); the table ends with End-of-RIB.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn route_refresh_requests_coalesce() {
        use crate::bgp::message::{Codec, Message, RouteRefresh};
        use tokio::io::AsyncWriteExt;
        const ROUTES: u32 = 300;
        let port = 20_000 + ((std::process::id() + 7) % 20_000) as u16;
        let cancel = CancellationToken::new();
        let (_us, _config) = exporting_speaker(port, 30, ROUTES, &cancel);
        let (mut sock, mut buf) = raw_peer(port, 30, None).await;
        let rr = Message::RouteRefresh(RouteRefresh {
            family: IPV4_UNICAST,
            subtype: 0,
        })
        .to_bytes(&Codec::default())
        .unwrap();
        sock.write_all(&rr.repeat(50)).await.unwrap();
        let mut announced = 0usize;
        let mut eors = 0;
        loop {
            match tokio::time::timeout(Duration::from_secs(2), read_msg(&mut sock, &mut buf)).await
            {
                Ok(Some(Message::Update(u))) => {
                    if u.is_end_of_rib().is_some() {
                        eors += 1;
                    }
                    announced += u.nlri.len();
                }
                Ok(Some(_)) => {}
                Ok(None) => panic!("closed"),
                Err(_) => break,
            }
        }
        assert!(eors >= 1, "no End-of-RIB");
        assert!(
            announced >= ROUTES as usize && announced <= 4 * ROUTES as usize,
            "{announced} announcements for a table of {ROUTES} and 50 refreshes"
        );
        cancel.cancel();
    }

    /// A panic in one session task ends that session only: the speaker restarts it, and
    /// the other session stays up with its routes, never withdrawn.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_session_is_restarted_alone() {
        let port = 20_000 + (std::process::id() % 20_000) as u16;
        let cancel = CancellationToken::new();
        let mut a = node(1, port, &[2, 3], &[], &cancel);
        let _b = node(2, port, &[1], &["10.244.2.0/26"], &cancel);
        let _c = node(3, port, &[1], &["10.244.3.0/26"], &cancel);
        let up = |n: &Node, p: u8| peer_status(n, p).is_some_and(|s| s.state == State::Established);
        until("both sessions up", || up(&a, 2) && up(&a, 3)).await;
        let c_since = peer_status(&a, 3).unwrap().established_at;
        let b_since = peer_status(&a, 2).unwrap().established_at;
        let mut seen = Vec::new();
        until("C's route", || {
            while let Ok(batch) = a.felix.try_recv() {
                seen.extend(batch);
            }
            seen.iter().any(
                |u| matches!(u, RouteUpdate::Best(r) if r.prefix.to_string() == "10.244.3.0/26"),
            )
        })
        .await;
        seen.clear();

        PANIC_AT_NEXT_TURN
            .lock()
            .unwrap()
            .push(IpAddr::V4(Ipv4Addr::new(127, 0, 10, 2)));
        until("B's session restarted", || {
            peer_status(&a, 2)
                .is_some_and(|s| s.state == State::Established && s.established_at != b_since)
        })
        .await;
        assert!(
            PANIC_AT_NEXT_TURN.lock().unwrap().is_empty(),
            "the panic happened"
        );
        let c = peer_status(&a, 3).unwrap();
        assert_eq!(c.state, State::Established);
        assert_eq!(c.established_at, c_since, "C's session was not disturbed");
        while let Ok(batch) = a.felix.try_recv() {
            seen.extend(batch);
        }
        assert!(
            !seen.iter().any(
                |u| matches!(u, RouteUpdate::Withdrawn(p) if p.to_string() == "10.244.3.0/26")
            ),
            "C's route was withdrawn: {seen:?}"
        );
        cancel.cancel();
    }
}
