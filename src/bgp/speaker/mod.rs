//! The speaker actor: applies the desired configuration (sessions added, removed or
//! replaced without touching unchanged ones), listens for peers, runs the RIB, sends each
//! peer what the export rules give it (diffed against what it already has), hands best
//! learned routes to Felix, keeps a restarting peer's routes as stale (RFC 4724 helper),
//! and publishes per-peer status.
//!
//! The decisions are the pure `core` (`Core::handle(now, input) -> Vec<Output>`, unit
//! tested without sockets or clocks); `Speaker` is its I/O shell: it turns the config
//! watch, session events, accepted connections and timers into inputs, and carries the
//! outputs out (bind, spawn and stop session tasks, commands, Felix, status).
//!
//! Channels:
//! ```text
//! confd --watch DesiredBgpConfig--> speaker --mpsc Vec<RouteUpdate>--> felix
//!                                   |   ^
//!                  SessionCmd (mpsc)|   | SessionEvent (mpsc, shared by all sessions)
//!                                   v   |
//!                              one session task per peer (on the speaker's TaskTracker,
//!                              in a `peer` span)
//! speaker --watch Vec<PeerStatus>--> status endpoint, metrics
//! ```

mod core;
mod peer;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use self::core::{Core, Input, ListenSpec, Now, Output};
use super::RouteUpdate;
use super::config::{DesiredBgpConfig, PeerType};
use super::fsm::State;
use super::message::err;
use super::session::{SessionCmd, SessionEvent, spawn_on};
use super::sockopt;

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
        PeerStatus::idle_since(address, peer_type, SystemTime::now())
    }

    /// As [`PeerStatus::new`], Idle since `since`.
    pub fn idle_since(address: IpAddr, peer_type: PeerType, since: SystemTime) -> PeerStatus {
        PeerStatus {
            address,
            peer_type,
            state: State::Idle,
            since,
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

/// A running session task, as the shell holds it.
struct SessionTask {
    /// Bounded, and only ever `try_send`: the speaker never waits for a session (which
    /// may be waiting for it). UPDATEs go out in at most `SEND_WINDOW` batches at a time.
    tx: mpsc::Sender<SessionCmd>,
    task: tokio::task::JoinHandle<()>,
    /// `Send`s that found the command queue full, in order: handed over before the next
    /// one, or at the next tick. At most `SEND_WINDOW` (the core waits for their
    /// `Drained`).
    waiting: VecDeque<SessionCmd>,
}

/// How long a stopping speaker waits for its session tasks to send their last
/// NOTIFICATION (Cease) and close (the daemon waits at most 2 s for everything).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// The speaker. Build it with [`Speaker::new`], then `run` it.
pub struct Speaker {
    core: Core,
    sessions: HashMap<IpAddr, SessionTask>,
    listener: Option<TcpListener>,
    events_tx: mpsc::Sender<SessionEvent>,
    events: mpsc::Receiver<SessionEvent>,
    felix: mpsc::Sender<Vec<RouteUpdate>>,
    status: watch::Sender<Vec<PeerStatus>>,
    stale_deadline: Option<Instant>,
    /// Every session task (and the tasks each spawns) runs on this tracker.
    tracker: TaskTracker,
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
            core: Core::new(cfg, Instant::now()),
            sessions: HashMap::new(),
            listener: None,
            events_tx,
            events,
            felix,
            status,
            stale_deadline: None,
            tracker: TaskTracker::new(),
        }
    }

    /// Run until cancelled, following `config`.
    pub async fn run(
        mut self,
        mut config: watch::Receiver<DesiredBgpConfig>,
        cancel: CancellationToken,
    ) -> std::io::Result<()> {
        let initial = config.borrow_and_update().clone();
        self.handle(Input::Start(initial)).await?;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        // Out of descriptors, accept fails with the connection still queued: pause, don't spin.
        let mut accept_backoff = crate::accept::AcceptBackoff::default();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                r = config.changed() => {
                    if r.is_err() { break; }
                    let new = config.borrow_and_update().clone();
                    self.handle(Input::Config(new)).await?;
                }
                Some(ev) = self.events.recv() => {
                    // The speaker's handling of a peer's event logs in that peer's span.
                    let span = tracing::info_span!("peer", addr = %ev.peer());
                    self.handle(Input::Session(ev)).instrument(span).await?;
                }
                (stream, from) = accept(&self.listener, &mut accept_backoff) => self.incoming(stream, from),
                _ = sleep_until(self.stale_deadline) => self.handle(Input::StaleTimer).await?,
                _ = tick.tick() => {
                    self.hand_over_waiting();
                    let ended = self
                        .sessions
                        .iter()
                        .filter(|(_, s)| s.task.is_finished())
                        .map(|(a, _)| *a)
                        .collect();
                    self.handle(Input::Tick { ended }).await?;
                }
            }
        }
        self.listener = None;
        for (_, s) in self.sessions.drain() {
            let _ = s.tx.try_send(SessionCmd::Stop(err::ADMIN_SHUTDOWN));
        }
        // Nobody reads the sessions' events from here on: closed, their sends fail at once
        // instead of blocking the sessions before they flush their Cease and close.
        self.events.close();
        self.tracker.close();
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, self.tracker.wait()).await;
        Ok(())
    }

    /// Give the core an input and carry out what it decides, in order.
    async fn handle(&mut self, input: Input) -> std::io::Result<()> {
        for o in self.core.handle(Now::current(), input) {
            self.output(o).await?;
        }
        Ok(())
    }

    async fn output(&mut self, o: Output) -> std::io::Result<()> {
        match o {
            Output::Listen(spec) => {
                self.listener = None;
                if let Some(spec) = spec {
                    self.listener = Some(bind(&spec)?);
                }
            }
            Output::StartSession(cfg) => {
                let addr = cfg.address;
                let (tx, task) = spawn_on(&self.tracker, cfg, self.events_tx.clone());
                self.sessions.insert(
                    addr,
                    SessionTask {
                        tx,
                        task,
                        waiting: VecDeque::new(),
                    },
                );
            }
            Output::StopSession { peer, cease } => {
                if let Some(s) = self.sessions.remove(&peer) {
                    // If the queue is full, dropping the sender stops the session all the same.
                    let _ = s.tx.try_send(SessionCmd::Stop(cease));
                }
            }
            Output::Send {
                peer,
                epoch,
                updates,
            } => {
                if let Some(s) = self.sessions.get_mut(&peer) {
                    s.waiting.push_back(SessionCmd::Send { epoch, updates });
                    hand_over(&peer, s);
                }
            }
            Output::Restarted(peer) => {
                if let Some(s) = self.sessions.get(&peer) {
                    let _ = s.tx.try_send(SessionCmd::Restarted);
                }
            }
            Output::Felix(batch) => {
                let _ = self.felix.send(batch).await;
            }
            Output::Status(all) => {
                self.status.send_replace(all);
            }
            Output::StaleTimer(at) => self.stale_deadline = at,
        }
        Ok(())
    }

    /// A connection on port 179 goes to its peer's session.
    fn incoming(&mut self, stream: tokio::net::TcpStream, from: SocketAddr) {
        match self.sessions.get(&from.ip()) {
            Some(s) => {
                if s.tx.try_send(SessionCmd::Incoming(stream)).is_err() {
                    tracing::warn!(%from, "connection refused: its session is not taking commands");
                }
            }
            None => tracing::debug!(%from, "connection from an unknown peer refused"),
        }
    }

    /// Batches that found a session's queue full are handed over now.
    fn hand_over_waiting(&mut self) {
        for (peer, s) in &mut self.sessions {
            hand_over(peer, s);
        }
    }
}

/// Hand the session what waits for it while its queue has room. A session that is gone
/// takes nothing: the tick restarts it, and its new session starts with the whole table.
fn hand_over(peer: &IpAddr, s: &mut SessionTask) {
    while let Some(cmd) = s.waiting.pop_front() {
        match s.tx.try_send(cmd) {
            Ok(()) => {}
            Err(TrySendError::Full(cmd)) => {
                s.waiting.push_front(cmd);
                return;
            }
            Err(TrySendError::Closed(_)) => {
                tracing::debug!(%peer, "session gone: its UPDATEs are dropped");
                s.waiting.clear();
                return;
            }
        }
    }
}

/// Bind port 179 as `spec` says.
fn bind(spec: &ListenSpec) -> std::io::Result<TcpListener> {
    let addr = spec.addr;
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    // RFC 5082: the kernel answers a SYN with the listener's TTL, before any accept;
    // a peer enforcing TTL security from its first segment drops anything less than
    // 255. (Accepted sockets then get the full setting, see `secure_accepted`.)
    if spec.ttl_security {
        sockopt::set_ttl(&sock, addr, 255)?;
    }
    for (peer, pw) in &spec.passwords {
        sockopt::set_md5(&sock, *peer, pw.as_bytes())?;
    }
    sock.bind(addr)?;
    sock.listen(128)
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

    use ipnet::IpNet;
    use tokio::sync::mpsc;

    use super::*;
    use crate::bgp::config::{CommunityValue, DesiredPeer};
    use crate::bgp::message::IPV4_UNICAST;
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
