//! The session task: performs what the FSM (`fsm.rs`) asks (TCP connects with MD5 and TTL
//! options, writes, closes, timers) and feeds back what happens (connections, decoded
//! messages, decode errors, timer expiries). One task per peer; a panic inside it ends
//! that task only (the speaker sees the join error and reports the peer down). The task
//! and everything it spawns run on the speaker's `TaskTracker` (its shutdown waits for
//! the last NOTIFICATIONs) and inside a `peer` span (every log line names the peer).
//!
//! Channels:
//! ```text
//! speaker --SessionCmd (bounded)--> session task --SessionEvent--> speaker
//!                                    ^      |
//!               connect tasks, readers      +--> one writer task per connection
//!               --Internal-------------'         (bytes, bounded; fed only as it has room)
//! ```
//!
//! The task never waits for a writer: a peer that stops reading (a zero TCP window) fills
//! its writer's queue, and UPDATEs then wait here, in order, while reads, keepalives and
//! the hold timer go on (RFC 4271 §4.4: the hold timer runs on what we receive, so a peer
//! that neither reads nor sends is dropped when it expires; one that still sends KEEPALIVEs
//! is dropped by the send hold timer, RFC 9687). Memory stays bounded: the
//! speaker hands over at most [`SEND_WINDOW`] batches of UPDATEs that are not yet
//! written (each acknowledged with [`SessionEvent::Drained`]) and keeps the rest as a set
//! of prefixes to export, where repeated changes and full-table resends coalesce.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::fsm::peer_add_path;
use super::fsm::{
    ConnId, Direction, DownReason, Input, Negotiated, Output, Session, SessionConfig, State, Timer,
};
use super::message::{
    AddPathFamilies, Capability, Codec, Family, Message, RouteRefresh, decode, frame_len,
};
use super::sockopt;
use super::update::Update;

/// How to reach a peer, and the session's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub address: IpAddr,
    pub port: u16,
    pub local_address: Option<IpAddr>,
    /// TCP MD5 key (RFC 2385).
    pub password: Option<String>,
    /// RFC 5082 with this many hops.
    pub ttl_security: Option<u8>,
    /// Outgoing TTL for a multihop peer.
    pub multihop: Option<u8>,
    pub session: SessionConfig,
}

/// From the speaker to a session.
#[derive(Debug)]
pub enum SessionCmd {
    /// A connection the listener accepted from this peer.
    Incoming(TcpStream),
    /// UPDATEs to send on the session that came up with this `epoch` (see
    /// [`SessionEvent::Established`]); dropped unless that session is still up (the
    /// speaker sends the whole table when a session comes up). Always answered with
    /// [`SessionEvent::Drained`].
    Send { epoch: u64, updates: Vec<Update> },
    /// Stop with this Cease subcode and end the task.
    Stop(u8),
    /// Our restart is over: later OPENs carry neither the R bit nor F bits.
    Restarted,
}

/// From a session to the speaker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    State {
        peer: IpAddr,
        state: State,
        last_error: Option<DownReason>,
    },
    Established {
        peer: IpAddr,
        negotiated: Negotiated,
        /// Our address on the connection (next hop "self").
        local: IpAddr,
        /// Counts the times this task's session came up; `Send`s carry it.
        epoch: u64,
    },
    /// The UPDATEs of one `Send` were handed to the connection's writer (`updates`
    /// messages), or dropped because the session went down: the speaker may hand over
    /// another batch.
    Drained {
        peer: IpAddr,
        epoch: u64,
        updates: u64,
    },
    Down {
        peer: IpAddr,
        reason: DownReason,
    },
    /// UPDATEs in the order they came (those of one read together).
    Updates {
        peer: IpAddr,
        updates: Vec<Update>,
    },
    RouteRefresh {
        peer: IpAddr,
        request: RouteRefresh,
    },
    /// A message went out (for metrics): its type, and a NOTIFICATION's code.
    Sent {
        peer: IpAddr,
        kind: u8,
        notification: Option<u8>,
    },
    /// A NOTIFICATION came in (for metrics and status).
    NotificationReceived {
        peer: IpAddr,
        code: u8,
        subcode: u8,
    },
}

impl SessionEvent {
    /// The peer whose session this event is from.
    pub fn peer(&self) -> IpAddr {
        match self {
            SessionEvent::State { peer, .. }
            | SessionEvent::Established { peer, .. }
            | SessionEvent::Drained { peer, .. }
            | SessionEvent::Down { peer, .. }
            | SessionEvent::Updates { peer, .. }
            | SessionEvent::RouteRefresh { peer, .. }
            | SessionEvent::Sent { peer, .. }
            | SessionEvent::NotificationReceived { peer, .. } => *peer,
        }
    }
}

/// What connect tasks, readers and writers tell the session task.
enum Internal {
    Connected(ConnId, TcpStream),
    Input(Input),
    /// The messages of one read.
    Received(ConnId, Vec<Message>),
}

/// Connections the listener accepted get ids from here up (the FSM counts from 1).
const INCOMING_IDS: ConnId = 1 << 62;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Batches of UPDATEs (`SessionCmd::Send`) the speaker may have handed a session and not
/// yet seen drained.
pub const SEND_WINDOW: usize = 2;

/// Room in a session's command queue: the speaker uses `try_send` (it never waits for a
/// session), `Send`s are limited by [`SEND_WINDOW`], and the task reads its commands at
/// every turn, so this only has to absorb bursts of connections and stops.
const COMMAND_QUEUE: usize = 64;

/// Messages a connection's writer may hold beyond what the socket took (at most 4096
/// bytes each).
const WRITER_QUEUE: usize = 64;

/// About how many messages one queued announcement fills: splitting it makes at most
/// about this many copies of its attributes (which may be ~4 KB) at a time.
const CHUNK_MESSAGES: usize = 8;

/// RFC 9687's suggested send hold time: a peer that has taken none of our messages for
/// this long (and at least twice the hold time) while more wait is dropped, even if it
/// still sends KEEPALIVEs (which keep the RFC 4271 hold timer from expiring).
const SEND_HOLD_MIN: Duration = Duration::from_secs(8 * 60);

/// How long a closed connection's writer may take to flush what it holds (the last
/// NOTIFICATION) before it is stopped: a peer with a zero window never takes it.
const WRITER_FLUSH_LIMIT: Duration = Duration::from_secs(5);

/// Start a session task on a tracker of its own (tests; the speaker uses [`spawn_on`]).
pub fn spawn(
    peer: PeerConfig,
    events: mpsc::Sender<SessionEvent>,
) -> (mpsc::Sender<SessionCmd>, tokio::task::JoinHandle<()>) {
    spawn_on(&TaskTracker::new(), peer, events)
}

/// Start a session task on `tracker`, in a `peer` span (every log line of the session
/// carries its peer); the tasks it spawns (connects, readers, writers) run on the same
/// tracker, in the same span.
pub fn spawn_on(
    tracker: &TaskTracker,
    peer: PeerConfig,
    events: mpsc::Sender<SessionEvent>,
) -> (mpsc::Sender<SessionCmd>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
    let span = tracing::info_span!("peer", addr = %peer.address);
    let task = tracker.spawn(run(peer, rx, events, tracker.clone()).instrument(span));
    (tx, task)
}

/// How messages to an established peer are encoded (what the speaker checks sizes with).
pub fn send_codec(n: &Negotiated, ibgp: bool) -> Codec {
    Codec {
        four_octet_as: n.four_octet_as,
        ibgp,
        add_path_tx: n.add_path_tx,
        ..Codec::default()
    }
}

/// Socket options for a connection the peer opened, set before its first read: RFC 5082
/// (send with TTL 255, drop segments that arrive with less than 256 - hops) as on our
/// own connections, or a multihop peer's TTL.
pub fn secure_accepted(peer: &PeerConfig, stream: &TcpStream) -> std::io::Result<()> {
    let addr = SocketAddr::new(peer.address, peer.port);
    if let Some(hops) = peer.ttl_security {
        sockopt::set_ttl_security(stream, addr, hops)
    } else if let Some(ttl) = peer.multihop {
        sockopt::set_ttl(stream, addr, ttl)
    } else {
        Ok(())
    }
}

/// Open a TCP connection to the peer with its socket options.
pub async fn connect(peer: &PeerConfig) -> std::io::Result<TcpStream> {
    let addr = SocketAddr::new(peer.address, peer.port);
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(pw) = &peer.password {
        sockopt::set_md5(&sock, peer.address, pw.as_bytes())?;
    }
    if let Some(hops) = peer.ttl_security {
        sockopt::set_ttl_security(&sock, addr, hops)?;
    } else if let Some(ttl) = peer.multihop {
        sockopt::set_ttl(&sock, addr, ttl)?;
    }
    if let Some(local) = peer.local_address {
        sock.bind(SocketAddr::new(local, 0))?;
    }
    match tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(addr)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            if peer.password.is_some() {
                "no answer within 5 s (no route to the peer, or a TCP MD5 password mismatch: the peer's kernel drops unsigned or wrongly signed segments)"
            } else {
                "no answer within 5 s (no route to the peer?)"
            },
        )),
    }
}

struct Conn {
    writer: mpsc::Sender<Vec<u8>>,
    writer_task: tokio::task::JoinHandle<()>,
    /// Bytes the writer has handed to the socket so far.
    written: Arc<AtomicU64>,
    reader: tokio::task::JoinHandle<()>,
    local: Option<IpAddr>,
}

impl Conn {
    /// Stop reading; let the writer flush what it holds for a while, then stop it too.
    fn close(self, tracker: &TaskTracker) {
        self.reader.abort();
        drop(self.writer);
        let mut w = self.writer_task;
        tracker.spawn(
            async move {
                if tokio::time::timeout(WRITER_FLUSH_LIMIT, &mut w)
                    .await
                    .is_err()
                {
                    w.abort();
                }
            }
            .in_current_span(),
        );
    }
}

/// What waits for the writer of the established connection.
enum Outgoing {
    Update(Update),
    /// The end of one `Send`: answer it with `Drained`.
    Done(u64),
}

struct Task {
    peer: PeerConfig,
    fsm: Session,
    events: mpsc::Sender<SessionEvent>,
    internal: mpsc::Sender<Internal>,
    timers: HashMap<Timer, Instant>,
    conns: HashMap<ConnId, Conn>,
    next_incoming: ConnId,
    state: State,
    /// UPDATEs received and not yet handed to the speaker.
    pending: Vec<Update>,
    /// Bumped each time the session comes up.
    epoch: u64,
    /// UPDATEs to send, in order, as the writer has room.
    outq: VecDeque<Outgoing>,
    /// UPDATE messages written since the last `Drained`.
    written: u64,
    /// Since when the established connection's writer queue has been full, and the
    /// bytes it had written then (RFC 9687's SendHoldTimer).
    send_stall: Option<(Instant, u64)>,
    /// Where the tasks of this session (connects, readers, writers) are spawned.
    tracker: TaskTracker,
}

async fn run(
    peer: PeerConfig,
    mut cmds: mpsc::Receiver<SessionCmd>,
    events: mpsc::Sender<SessionEvent>,
    tracker: TaskTracker,
) {
    // Small: one message can hold all of a 64 KiB read.
    let (internal, mut internal_rx) = mpsc::channel(8);
    let mut t = Task {
        fsm: Session::new(peer.session.clone()),
        peer,
        events,
        internal,
        timers: HashMap::new(),
        conns: HashMap::new(),
        next_incoming: INCOMING_IDS,
        state: State::Idle,
        pending: Vec::new(),
        epoch: 0,
        outq: VecDeque::new(),
        written: 0,
        send_stall: None,
        tracker,
    };
    tracing::debug!(port = t.peer.port, "session task started");
    t.input(Input::Start).await;
    loop {
        #[cfg(test)]
        panic_if_asked(t.peer.address);
        let send_hold = t.watch_send_stall();
        let deadline = t.timers.values().copied().chain(send_hold).min();
        let writer = t.writer_for_output();
        tokio::select! {
            cmd = cmds.recv() => match cmd {
                Some(SessionCmd::Incoming(stream)) => {
                    if let Err(e) = secure_accepted(&t.peer, &stream) {
                        tracing::warn!(peer = %t.peer.address, error = %e,
                            "connection from the peer refused: cannot set its TTL options");
                        continue;
                    }
                    let id = t.next_incoming;
                    t.next_incoming += 1;
                    t.attach(id, stream);
                    t.input(Input::Connected { conn: id, dir: Direction::Incoming }).await;
                }
                Some(SessionCmd::Send { epoch, updates }) => t.queue_updates(epoch, updates).await,
                Some(SessionCmd::Restarted) => t.fsm.restart_done(),
                Some(SessionCmd::Stop(cease)) => {
                    tracing::debug!(cease, "session stopped by the speaker");
                    t.input(Input::Stop { cease }).await;
                    t.flush_and_close().await;
                    return;
                }
                None => {
                    t.input(Input::Stop { cease: super::message::err::PEER_DECONFIGURED }).await;
                    t.flush_and_close().await;
                    return;
                }
            },
            Some(msg) = internal_rx.recv() => match msg {
                Internal::Connected(id, stream) => {
                    t.attach(id, stream);
                    t.input(Input::Connected { conn: id, dir: Direction::Outgoing }).await;
                }
                Internal::Input(i) => t.input(i).await,
                Internal::Received(conn, msgs) => {
                    for msg in msgs {
                        t.input(Input::Received { conn, msg }).await;
                    }
                    t.flush_updates().await;
                }
            },
            Some(permit) = reserve(writer.as_ref()) => t.write_next(permit).await,
            _ = sleep_until(deadline) => {
                let now = Instant::now();
                if send_hold.is_some_and(|d| d <= now) {
                    t.send_hold_due().await;
                }
                let due: Vec<Timer> = t.timers.iter().filter(|(_, at)| **at <= now).map(|(k, _)| *k).collect();
                for timer in due {
                    t.timers.remove(&timer);
                    t.input(Input::Timer(timer)).await;
                }
            }
        }
    }
}

/// Tests: peers whose session task panics at its next turn (once).
#[cfg(test)]
pub(crate) static PANIC_AT_NEXT_TURN: std::sync::Mutex<Vec<IpAddr>> =
    std::sync::Mutex::new(Vec::new());

#[cfg(test)]
fn panic_if_asked(peer: IpAddr) {
    let asked = {
        let mut list = PANIC_AT_NEXT_TURN.lock().unwrap();
        let before = list.len();
        list.retain(|p| *p != peer);
        list.len() != before
    };
    assert!(!asked, "panic injected into the session with {peer}");
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Room for one more chunk in a writer's queue (never, without a writer).
async fn reserve(w: Option<&mpsc::Sender<Vec<u8>>>) -> Option<mpsc::Permit<'_, Vec<u8>>> {
    match w {
        Some(w) => w.reserve().await.ok(),
        None => std::future::pending().await,
    }
}

impl Task {
    fn codec(&self) -> Codec {
        match self.fsm.established() {
            Some((_, n)) => send_codec(n, self.peer.session.ibgp()),
            None => Codec {
                ibgp: self.peer.session.ibgp(),
                ..Codec::default()
            },
        }
    }

    /// Start the reader and writer of a new connection.
    fn attach(&mut self, id: ConnId, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().ok().map(|a| a.ip());
        let (rd, wr) = stream.into_split();
        let (wtx, wrx) = mpsc::channel(WRITER_QUEUE);
        let written = Arc::new(AtomicU64::new(0));
        let writer_task = self.tracker.spawn(
            write_loop(id, wr, wrx, self.internal.clone(), written.clone()).in_current_span(),
        );
        let reader = self.tracker.spawn(
            read_loop(
                id,
                rd,
                (
                    self.peer.session.ibgp(),
                    self.peer.session.add_path_capability(),
                ),
                self.internal.clone(),
            )
            .in_current_span(),
        );
        self.conns.insert(
            id,
            Conn {
                writer: wtx,
                writer_task,
                written,
                reader,
                local,
            },
        );
    }

    /// Send the speaker an event, after the UPDATEs that came before it.
    async fn emit(&mut self, ev: SessionEvent) {
        self.flush_updates().await;
        let _ = self.events.send(ev).await;
    }

    async fn flush_updates(&mut self) {
        if !self.pending.is_empty() {
            let updates = std::mem::take(&mut self.pending);
            let peer = self.peer.address;
            let _ = self
                .events
                .send(SessionEvent::Updates { peer, updates })
                .await;
        }
    }

    async fn input(&mut self, input: Input) {
        if let Input::Received {
            msg: Message::Notification(n),
            ..
        } = &input
        {
            self.emit(SessionEvent::NotificationReceived {
                peer: self.peer.address,
                code: n.code,
                subcode: n.subcode,
            })
            .await;
        }
        let outputs = self.fsm.handle(input);
        for o in outputs {
            self.output(o).await;
        }
        if self.fsm.established().is_none() && !self.outq.is_empty() {
            self.abandon_output().await;
        }
        let state = self.fsm.state();
        if state != self.state {
            self.state = state;
            self.emit(SessionEvent::State {
                peer: self.peer.address,
                state,
                last_error: self.fsm.last_error().cloned(),
            })
            .await;
        }
    }

    async fn output(&mut self, o: Output) {
        let peer = self.peer.address;
        match o {
            Output::Connect { conn } => {
                let cfg = self.peer.clone();
                let tx = self.internal.clone();
                self.tracker.spawn(
                    async move {
                        let msg = match connect(&cfg).await {
                            Ok(s) => Internal::Connected(conn, s),
                            Err(e) => Internal::Input(Input::ConnectFailed {
                                conn,
                                reason: e.to_string(),
                            }),
                        };
                        let _ = tx.send(msg).await;
                    }
                    .in_current_span(),
                );
            }
            Output::Send { conn, msg } => {
                let kind = message_kind(&msg);
                let notification = match &msg {
                    Message::Notification(n) => Some(n.code),
                    _ => None,
                };
                let bytes = match msg.to_bytes(&self.codec()) {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::error!(%peer, error = %e, "message not sent");
                        return;
                    }
                };
                // Never wait for the writer: when its queue is full the peer is not
                // reading, and a KEEPALIVE behind the queued UPDATEs would change nothing
                // (the UPDATEs restart the peer's hold timer as they arrive).
                let Some(c) = self.conns.get(&conn) else {
                    return;
                };
                match c.writer.try_send(bytes) {
                    Ok(()) => {
                        self.emit(SessionEvent::Sent {
                            peer,
                            kind,
                            notification,
                        })
                        .await;
                    }
                    Err(_) => tracing::debug!(%peer, kind, "writer queue full: message dropped"),
                }
            }
            Output::Close { conn } => {
                if let Some(c) = self.conns.remove(&conn) {
                    c.close(&self.tracker);
                }
            }
            Output::SetTimer { timer, after } => match after {
                Some(d) => {
                    self.timers.insert(timer, Instant::now() + d);
                }
                None => {
                    self.timers.remove(&timer);
                }
            },
            Output::Established { conn, negotiated } => {
                self.epoch += 1;
                let local = self
                    .conns
                    .get(&conn)
                    .and_then(|c| c.local)
                    .or(self.peer.local_address)
                    .unwrap_or(IpAddr::V4(self.peer.session.router_id));
                self.emit(SessionEvent::Established {
                    peer,
                    negotiated,
                    local,
                    epoch: self.epoch,
                })
                .await;
            }
            Output::Down { reason } => {
                self.emit(SessionEvent::Down { peer, reason }).await;
            }
            // Sent on at the end of the read they came in (or before any other event).
            Output::Update(update) => self.pending.push(update),
            Output::RouteRefresh(request) => {
                self.emit(SessionEvent::RouteRefresh { peer, request })
                    .await;
            }
        }
    }

    /// Queue a `Send`'s UPDATEs for the writer, or answer at once when its session is
    /// gone.
    async fn queue_updates(&mut self, epoch: u64, updates: Vec<Update>) {
        if epoch != self.epoch || self.fsm.established().is_none() {
            let peer = self.peer.address;
            let _ = self
                .events
                .send(SessionEvent::Drained {
                    peer,
                    epoch,
                    updates: 0,
                })
                .await;
            return;
        }
        let codec = self.codec();
        self.outq.extend(
            updates
                .into_iter()
                .flat_map(|u| u.chunk_announcements(&codec, CHUNK_MESSAGES))
                .map(Outgoing::Update),
        );
        self.outq.push_back(Outgoing::Done(epoch));
        self.report_drained().await;
    }

    /// RFC 9687: start or stop watching the established connection's writer (stalled
    /// while its queue is full); when the send hold timer would expire.
    fn watch_send_stall(&mut self) -> Option<Instant> {
        let conn = self
            .fsm
            .established()
            .and_then(|(id, n)| self.conns.get(&id).map(|c| (c, n.hold_time)));
        let Some((c, hold)) = conn.filter(|(c, _)| c.writer.capacity() == 0) else {
            self.send_stall = None;
            return None;
        };
        let written = c.written.load(Ordering::Relaxed);
        let (since, _) = *self
            .send_stall
            .get_or_insert_with(|| (Instant::now(), written));
        let limit = SEND_HOLD_MIN.max(Duration::from_secs(2 * u64::from(hold)));
        Some(since + limit)
    }

    /// The send hold time ran out while the writer's queue was full: drop the session if
    /// the writer made no progress meanwhile, else watch again from now.
    async fn send_hold_due(&mut self) {
        let Some((conn, _)) = self.fsm.established() else {
            return;
        };
        let progress = self
            .conns
            .get(&conn)
            .map(|c| c.written.load(Ordering::Relaxed));
        match (self.send_stall.take(), progress) {
            (Some((_, then)), Some(now)) if now == then => {
                tracing::warn!(peer = %self.peer.address,
                    "the peer has read nothing we sent for the send hold time (RFC 9687)");
                self.input(Input::SendHoldExpired { conn }).await;
            }
            _ => {}
        }
    }

    /// The established connection's writer, when an UPDATE waits for it.
    fn writer_for_output(&self) -> Option<mpsc::Sender<Vec<u8>>> {
        if !matches!(self.outq.front(), Some(Outgoing::Update(_))) {
            return None;
        }
        let (conn, _) = self.fsm.established()?;
        self.conns.get(&conn).map(|c| c.writer.clone())
    }

    /// Put the next message of the next UPDATE (split to fit; the other parts wait at
    /// the head of the queue) into the writer's free slot.
    async fn write_next(&mut self, permit: mpsc::Permit<'_, Vec<u8>>) {
        let Some(Outgoing::Update(u)) = self.outq.pop_front() else {
            return;
        };
        let codec = self.codec();
        // Most UPDATEs fit as they are: encoded once.
        let msg = Message::Update(u);
        let mut bytes = BytesMut::new();
        if msg.encode(&codec, &mut bytes).is_ok() {
            permit.send(bytes.to_vec());
            self.written += 1;
            self.report_drained().await;
            return;
        }
        let Message::Update(u) = msg else {
            unreachable!("built as an UPDATE above")
        };
        let split = u.split(&codec);
        if !split.too_large.is_empty() {
            // The speaker checks sizes before it exports; this is the last guard.
            tracing::error!(peer = %self.peer.address, prefixes = ?split.too_large,
                "routes not sent: their attributes do not fit in a BGP message");
        }
        let mut parts = split.parts.into_iter();
        if let Some(first) = parts.next() {
            for rest in parts.rev() {
                self.outq.push_front(Outgoing::Update(rest));
            }
            match Message::Update(first).to_bytes(&codec) {
                Ok(bytes) => {
                    permit.send(bytes);
                    self.written += 1;
                }
                Err(e) => tracing::error!(peer = %self.peer.address, error = %e, "UPDATE not sent"),
            }
        }
        self.report_drained().await;
    }

    /// Answer the `Send`s whose UPDATEs have all gone to the writer.
    async fn report_drained(&mut self) {
        while let Some(Outgoing::Done(epoch)) = self.outq.front() {
            let epoch = *epoch;
            self.outq.pop_front();
            let updates = std::mem::take(&mut self.written);
            self.emit(SessionEvent::Drained {
                peer: self.peer.address,
                epoch,
                updates,
            })
            .await;
        }
    }

    /// The session went down: what waited for its writer is dropped (the next session
    /// starts with the whole table), and every `Send` is answered.
    async fn abandon_output(&mut self) {
        let dropped = std::mem::take(&mut self.outq);
        for o in dropped {
            if let Outgoing::Done(epoch) = o {
                let updates = std::mem::take(&mut self.written);
                let _ = self
                    .events
                    .send(SessionEvent::Drained {
                        peer: self.peer.address,
                        epoch,
                        updates,
                    })
                    .await;
            }
        }
    }

    /// Give writers a moment to send the last NOTIFICATION.
    async fn flush_and_close(&mut self) {
        for (_, c) in self.conns.drain() {
            c.close(&self.tracker);
        }
        tokio::task::yield_now().await;
    }
}

fn message_kind(m: &Message) -> u8 {
    use super::message::kind;
    match m {
        Message::Open(_) => kind::OPEN,
        Message::Update(_) => kind::UPDATE,
        Message::Notification(_) => kind::NOTIFICATION,
        Message::Keepalive => kind::KEEPALIVE,
        Message::RouteRefresh(_) => kind::ROUTE_REFRESH,
    }
}

async fn write_loop(
    conn: ConnId,
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Vec<u8>>,
    tx: mpsc::Sender<Internal>,
    written: Arc<AtomicU64>,
) {
    let mut batch = Vec::with_capacity(64 * 1024);
    while let Some(first) = rx.recv().await {
        // Coalesce what is queued into one write.
        batch.clear();
        batch.extend_from_slice(&first);
        while batch.len() < 64 * 1024 {
            match rx.try_recv() {
                Ok(more) => batch.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        let result = wr.write_all(&batch).await;
        written.fetch_add(batch.len() as u64, Ordering::Relaxed);
        if let Err(e) = result {
            let _ = tx
                .send(Internal::Input(Input::Closed {
                    conn,
                    reason: e.to_string(),
                }))
                .await;
            return;
        }
    }
    let _ = wr.shutdown().await;
}

/// Read and decode a connection's messages. `ibgp`: the peer is internal; `add_path`: the
/// ADD-PATH capability we announce (with the peer's, it says which families' prefixes
/// come with path identifiers).
async fn read_loop(
    conn: ConnId,
    mut rd: OwnedReadHalf,
    (ibgp, add_path): (bool, Vec<(Family, u8)>),
    tx: mpsc::Sender<Internal>,
) {
    // Reads of 64 KiB, up to 256 KiB while the peer streams (each read that fills its room
    // doubles it): fewer wake-ups through the session and the speaker during a table
    // transfer, and an idle session keeps a small buffer.
    const READ_MIN: usize = 64 * 1024;
    const READ_MAX: usize = 256 * 1024;
    let mut room = READ_MIN;
    let mut buf = BytesMut::with_capacity(READ_MIN);
    // Until the peer's OPEN says it speaks 4-octet AS numbers (we always do).
    let mut codec = Codec {
        four_octet_as: false,
        ibgp,
        ..Codec::default()
    };
    loop {
        // Every whole message of this read, handed on together.
        let mut msgs = Vec::new();
        let mut malformed = None;
        loop {
            let len = match frame_len(&buf) {
                Ok(Some(len)) => len,
                Ok(None) => break,
                Err(notification) => {
                    malformed = Some(notification);
                    break;
                }
            };
            let frame = buf.split_to(len);
            match decode(&frame, &codec) {
                Ok(msg) => {
                    if let Message::Open(o) = &msg {
                        codec.four_octet_as = o
                            .capabilities
                            .iter()
                            .any(|c| matches!(c, Capability::FourOctetAs(_)));
                        codec.add_path_rx =
                            AddPathFamilies::negotiate(&add_path, &peer_add_path(o), 1);
                    }
                    msgs.push(msg);
                }
                Err(notification) => {
                    malformed = Some(notification);
                    break;
                }
            }
        }
        if !msgs.is_empty() && tx.send(Internal::Received(conn, msgs)).await.is_err() {
            return;
        }
        if let Some(notification) = malformed {
            let _ = tx
                .send(Internal::Input(Input::Malformed { conn, notification }))
                .await;
            return;
        }
        buf.reserve(room);
        let reason = match rd.read_buf(&mut buf).await {
            Ok(0) => "closed by the peer".to_string(),
            Ok(n) => {
                if n >= room {
                    room = (room * 2).min(READ_MAX);
                }
                super::sockopt::quick_ack(rd.as_ref());
                continue;
            }
            Err(e) => e.to_string(),
        };
        let _ = tx
            .send(Internal::Input(Input::Closed { conn, reason }))
            .await;
        return;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::Ipv4Addr;

    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use super::*;
    use crate::bgp::message::{Notification, Open, err};

    /// The next whole message the peer under test sent on `sock` (None at EOF or on one
    /// that does not decode); `buf` keeps what was read past it.
    pub(crate) async fn read_msg(sock: &mut TcpStream, buf: &mut BytesMut) -> Option<Message> {
        loop {
            if let Ok(Some(len)) = frame_len(buf) {
                let frame = buf.split_to(len);
                return decode(&frame, &Codec::default()).ok();
            }
            if sock.read_buf(buf).await.ok()? == 0 {
                return None;
            }
        }
    }

    /// A session toward `127.0.0.1:port` with local AS and peer AS 64512, router id
    /// 10.0.0.1 and the given hold time, spawned with its event channel.
    fn spawn_toward(
        port: u16,
        hold_time: u16,
    ) -> (mpsc::Sender<SessionCmd>, mpsc::Receiver<SessionEvent>) {
        let mut cfg = SessionConfig::new(64512, 64512, Ipv4Addr::new(10, 0, 0, 1));
        cfg.hold_time = hold_time;
        let peer = PeerConfig {
            address: "127.0.0.1".parse().unwrap(),
            port,
            local_address: None,
            password: None,
            ttl_security: None,
            multihop: None,
            session: cfg,
        };
        let (events_tx, events) = mpsc::channel(100);
        let (cmds, _task) = spawn(peer, events_tx);
        (cmds, events)
    }

    /// A listener whose accepted sockets have a tiny receive window, so that a peer
    /// that reads nothing fills the sender's buffers quickly.
    fn tiny_window_listener() -> (TcpListener, u16) {
        let sock = TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = sock.local_addr().unwrap().port();
        (sock.listen(1).unwrap(), port)
    }

    /// Plays the remote side up to OpenConfirm: accepts the session's connection,
    /// expects its OPEN, answers with an OPEN carrying `hold_time` and a KEEPALIVE.
    async fn accept_and_answer_open(
        listener: &TcpListener,
        hold_time: u16,
    ) -> (TcpStream, BytesMut) {
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut buf = BytesMut::new();
        assert!(matches!(
            read_msg(&mut sock, &mut buf).await,
            Some(Message::Open(_))
        ));
        let codec = Codec::default();
        let open = Open::new(64512, hold_time, Ipv4Addr::new(10, 0, 0, 2), vec![]);
        sock.write_all(&Message::Open(open).to_bytes(&codec).unwrap())
            .await
            .unwrap();
        sock.write_all(&Message::Keepalive.to_bytes(&codec).unwrap())
            .await
            .unwrap();
        (sock, buf)
    }

    /// Waits for the session's Established event, skipping any other: its epoch and
    /// what was negotiated.
    async fn established(events: &mut mpsc::Receiver<SessionEvent>) -> (u64, Negotiated) {
        loop {
            match events.recv().await {
                Some(SessionEvent::Established {
                    epoch, negotiated, ..
                }) => return (epoch, negotiated),
                Some(_) => {}
                None => panic!("session task ended before Established"),
            }
        }
    }

    /// 1.6 million host routes in 16 UPDATEs, ~8 MB on the wire: more than the socket
    /// buffers and the writer's queue hold.
    fn bulk_host_routes(local_pref: Option<u32>) -> Vec<Update> {
        use ipnet::{IpNet, Ipv4Net};

        use crate::bgp::update::{AsPath, Attributes, Origin};
        let attrs = Attributes {
            origin: Some(Origin::Igp),
            as_path: Some(AsPath::default()),
            next_hop: Some(Ipv4Addr::new(10, 0, 0, 1)),
            local_pref,
            ..Default::default()
        };
        (0..16u32)
            .map(|chunk| Update {
                attrs: attrs.clone(),
                nlri: (0..100_000u32)
                    .map(|i| {
                        let a = Ipv4Addr::from(0x0a00_0000 + chunk * 100_000 + i);
                        IpNet::V4(Ipv4Net::new(a, 32).unwrap())
                    })
                    .collect(),
                ..Default::default()
            })
            .collect()
    }

    /// With paused time: Established, keepalives every hold/3, and a silent peer is
    /// dropped with "hold timer expired" exactly when the hold time runs out.
    #[tokio::test(start_paused = true)]
    async fn silent_peer_hits_the_hold_timer() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (_cmds, mut events) = spawn_toward(listener.local_addr().unwrap().port(), 10);
        let (mut sock, mut buf) = accept_and_answer_open(&listener, 30).await;
        assert_eq!(
            read_msg(&mut sock, &mut buf).await,
            Some(Message::Keepalive)
        );
        let (_, negotiated) = established(&mut events).await;
        assert_eq!(negotiated.hold_time, 10);
        let t0 = Instant::now();
        let mut keepalives = Vec::new();
        let n = loop {
            match read_msg(&mut sock, &mut buf).await {
                Some(Message::Keepalive) => keepalives.push(t0.elapsed().as_secs()),
                Some(Message::Notification(n)) => break n,
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(n, Notification::new(err::HOLD_TIMER_EXPIRED, 0, []));
        assert_eq!(t0.elapsed().as_secs(), 10);
        assert_eq!(keepalives, vec![3, 6, 9]);
        loop {
            if let Some(SessionEvent::Down { reason, .. }) = events.recv().await {
                assert_eq!(reason, DownReason::HoldTimerExpired);
                break;
            }
        }
    }

    /// RFC 4271 §4.4 with a peer that stops reading: ~8 MB of UPDATEs queued for a peer
    /// with a tiny receive window and no reads (more than the socket buffers and the
    /// writer's queue hold) do not stop our timers: the silent peer is dropped when the
    /// hold time runs out, and the queued batch is answered. (Before: the task waited in
    /// the blocked write, so the hold timer never fired and the session hung.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_that_stops_reading_does_not_stop_the_hold_timer() {
        let (listener, port) = tiny_window_listener();
        let (cmds, mut events) = spawn_toward(port, 3);
        let (_sock, _buf) = accept_and_answer_open(&listener, 3).await;
        let (epoch, _) = established(&mut events).await;
        // The peer reads none of it.
        let updates = bulk_host_routes(Some(100));
        let sent = Instant::now();
        cmds.send(SessionCmd::Send { epoch, updates })
            .await
            .unwrap();
        let (mut down, mut drained) = (None, false);
        while down.is_none() || !drained {
            match tokio::time::timeout(Duration::from_secs(10), events.recv()).await {
                Ok(Some(SessionEvent::Down { reason, .. })) => down = Some(reason),
                Ok(Some(SessionEvent::Drained { .. })) => drained = true,
                Ok(Some(_)) => {}
                Ok(None) => panic!("session task ended"),
                Err(_) => panic!("no hold timer expiry (down: {down:?}, drained: {drained})"),
            }
        }
        assert_eq!(down, Some(DownReason::HoldTimerExpired));
        let took = sent.elapsed();
        assert!(took < Duration::from_secs(5), "dropped after {took:?}");
    }

    /// RFC 9687: a peer that keeps sending KEEPALIVEs (so the hold timer never expires)
    /// but reads nothing while ~8 MB of UPDATEs wait is dropped when the send hold time
    /// (8 minutes here) runs out, with "send hold timer expired". Paused time.
    #[tokio::test(start_paused = true)]
    async fn a_peer_that_sends_keepalives_but_reads_nothing_hits_the_send_hold_timer() {
        let (listener, port) = tiny_window_listener();
        // A hold time of 30 s (send hold time still 8 minutes): with paused time the
        // clock jumps as soon as every task waits, and on a loaded machine the session
        // may see a KEEPALIVE's readiness a virtual second late; with 3 s, three such
        // misses in a row expired the hold timer instead (seen in the suite, 2026-12-08).
        let (cmds, mut events) = spawn_toward(port, 30);
        let (mut sock, _buf) = accept_and_answer_open(&listener, 30).await;
        let keepalive = Message::Keepalive.to_bytes(&Codec::default()).unwrap();
        let (epoch, _) = established(&mut events).await;
        let updates = bulk_host_routes(None);
        let start = Instant::now();
        cmds.send(SessionCmd::Send { epoch, updates })
            .await
            .unwrap();
        let reason = loop {
            assert!(
                start.elapsed() < Duration::from_secs(600),
                "still up after 10 minutes"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
            sock.write_all(&keepalive).await.unwrap();
            let mut down = None;
            while let Ok(ev) = events.try_recv() {
                if let SessionEvent::Down { reason, .. } = ev {
                    down = Some(reason);
                }
            }
            if let Some(r) = down {
                break r;
            }
        };
        assert_eq!(reason, DownReason::SendHoldTimerExpired);
        let took = start.elapsed();
        assert!(
            took >= Duration::from_secs(480) && took < Duration::from_secs(500),
            "after {took:?}"
        );
    }

    /// STYLE: every log line of a session carries its peer (a `peer` span around the
    /// task and what it spawns), so that `kubectl logs` of a node with many peers says
    /// which session a line is about. (Before: no span at all.)
    #[test]
    fn a_sessions_log_lines_carry_its_peer() {
        #[derive(Clone, Default)]
        struct Buf(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .finish();
        let _default = tracing::subscriber::set_default(subscriber);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            // Port 1 on loopback: nothing listens; the session starts and is stopped.
            let (cmds, mut events) = spawn_toward(1, 3);
            cmds.send(SessionCmd::Stop(err::ADMIN_SHUTDOWN))
                .await
                .unwrap();
            while events.recv().await.is_some() {}
        });
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = out
            .lines()
            .filter(|l| l.contains("calico_node::bgp::session"))
            .collect();
        assert!(lines.len() >= 2, "{out}");
        for l in lines {
            assert!(
                l.contains("peer{addr=127.0.0.1}"),
                "a line without its peer: {l}"
            );
        }
    }
}
