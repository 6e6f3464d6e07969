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

use std::collections::{BTreeMap, HashMap};
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
use super::session::{PeerConfig, SessionCmd, SessionEvent, spawn};
use super::sockopt;
use super::update::{Attributes, MpReach, MpUnreach, Update};
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
}

/// What we last sent a peer for a prefix.
type Sent = (Attributes, IpAddr);

struct Peer {
    spec: DesiredPeer,
    /// Unbounded: the speaker never waits for a session (which may be waiting for it).
    tx: mpsc::UnboundedSender<SessionCmd>,
    task: tokio::task::JoinHandle<()>,
    status: PeerStatus,
    negotiated: Option<Negotiated>,
    adj_out: PrefixMap<Sent>,
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
                        Some(p) => { let _ = p.tx.send(SessionCmd::Incoming(stream)); }
                        None => tracing::debug!(%from, "connection from an unknown peer refused"),
                    }
                }
                _ = sleep_until(stale_deadline) => self.expire_stale().await,
                _ = tick.tick() => self.housekeeping().await,
            }
        }
        for (_, p) in self.peers.drain() {
            let _ = p.tx.send(SessionCmd::Stop(err::ADMIN_SHUTDOWN));
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
        let status = PeerStatus {
            address: spec.address,
            peer_type: spec.peer_type,
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
        };
        self.peers.insert(
            spec.address,
            Peer {
                spec,
                tx,
                task,
                status,
                negotiated: None,
                adj_out: PrefixMap::default(),
                stale_until: None,
                end_of_rib: false,
            },
        );
    }

    async fn remove_peer(&mut self, address: &IpAddr, cease: u8) {
        if let Some(p) = self.peers.remove(address) {
            let _ = p.tx.send(SessionCmd::Stop(cease));
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
        let passwords = |c: &DesiredBgpConfig| -> Vec<(IpAddr, Option<String>)> {
            c.peers
                .iter()
                .map(|p| (p.address, p.password.clone()))
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
            } => {
                let Some(p) = self.peers.get_mut(&peer) else {
                    return;
                };
                p.negotiated = Some(negotiated.clone());
                p.adj_out.clear();
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
                self.send_table(&peer).await;
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
                            DownReason::ConnectionClosed(_) | DownReason::HoldTimerExpired
                        )
                    });
                p.adj_out.clear();
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
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.adj_out.clear();
                }
                self.send_table(&peer).await;
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

    /// Everything for a peer that just came up (or asked for a refresh), then End-of-RIB.
    async fn send_table(&mut self, peer: &IpAddr) {
        let all: Changed = self.rib.best_prefixes().collect();
        self.export_to(peer, &all).await;
        let Some(p) = self.peers.get(peer) else {
            return;
        };
        let families = p
            .negotiated
            .as_ref()
            .map(|n| n.families.clone())
            .unwrap_or_default();
        let eor: Vec<Update> = families.into_iter().map(Update::end_of_rib).collect();
        let _ = p.tx.send(SessionCmd::Send(eor));
        self.publish();
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
            self.export_to(&peer, changed).await;
        }
        self.publish();
    }

    /// Send `peer` the difference between what the export rules give it for `prefixes`
    /// and what it already has.
    async fn export_to(&mut self, peer: &IpAddr, prefixes: &Changed) {
        let Some(info) = self.rib.peer(peer).cloned() else {
            return;
        };
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        let Some(neg) = &p.negotiated else {
            return;
        };
        let (v4, v6) = (
            neg.families.contains(&IPV4_UNICAST),
            neg.families.contains(&IPV6_UNICAST),
        );
        let mut groups: HashMap<Sent, Vec<IpNet>> = HashMap::new();
        let mut withdraw: Vec<IpNet> = Vec::new();
        for prefix in prefixes {
            if !(if prefix.addr().is_ipv4() { v4 } else { v6 }) {
                continue;
            }
            let new = self
                .rib
                .export(&info, prefix, &self.cfg.policy, self.cfg.ipv6_next_hop);
            if (new.is_none() && p.adj_out.is_empty()) || new.as_ref() == p.adj_out.get(prefix) {
                continue;
            }
            match new {
                Some(sent) => {
                    p.adj_out.insert(*prefix, sent.clone());
                    groups.entry(sent).or_default().push(*prefix);
                }
                None => {
                    p.adj_out.remove(prefix);
                    withdraw.push(*prefix);
                }
            }
        }
        p.status.advertised = p.adj_out.len();
        let updates = build_updates(groups, withdraw);
        if !updates.is_empty() {
            let _ = p.tx.send(SessionCmd::Send(updates));
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
        if !self.in_sync_sent
            && (self.started.elapsed() >= IN_SYNC_AFTER
                || self.peers.values().all(|p| p.end_of_rib))
        {
            self.in_sync_sent = true;
            let _ = self.felix.send(vec![RouteUpdate::InSync]).await;
            for p in self.peers.values() {
                let _ = p.tx.send(SessionCmd::Restarted);
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
        match next_hop {
            IpAddr::V4(nh) => {
                let mut a = attrs;
                a.next_hop = Some(nh);
                out.push(Update {
                    attrs: a,
                    nlri: prefixes,
                    ..Default::default()
                });
            }
            IpAddr::V6(_) => out.push(Update {
                attrs,
                mp_reach: Some(MpReach {
                    family: IPV6_UNICAST,
                    next_hops: vec![next_hop],
                    nlri: prefixes,
                }),
                ..Default::default()
            }),
        }
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
    use crate::bgp::session::PANIC_AT_NEXT_TURN;

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
