//! The BGP session as a sans-IO state machine (RFC 4271 §8): `Session::handle(Input)`
//! returns what to do (`Output`: connect, send, close, arm or cancel a timer, report). No
//! sockets and no clocks here; the session task (`session.rs`) performs the outputs and
//! feeds back what happens. Connections carry ids, so the connection collision of RFC 4271
//! §6.8 (one connection each way) is resolved here too.
//!
//! Timers: ConnectRetry (reconnect after a failed attempt), Hold and Keepalive per
//! connection (hold = min of both OPENs, keepalive = hold/3; a zero hold time disables
//! both), IdleHold (after a failure we do not connect for an interval that doubles per
//! consecutive failure, reset once a session is Established; a peer's connection is
//! accepted meanwhile).

use std::net::Ipv4Addr;
use std::time::Duration;

use super::message::{
    AS_TRANS, AddPathFamilies, Capability, Family, GracefulRestart, IPV4_UNICAST, Message,
    Notification, Open, RouteRefresh, err,
};
use super::update::Update;

/// Identifies one TCP connection of a session (given by the session, echoed back).
pub type ConnId = u64;

/// Who opened a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Outgoing,
    Incoming,
}

/// The session's RFC 4271 state (the most advanced of its connections).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum State {
    Idle,
    Connect,
    Active,
    OpenSent,
    OpenConfirm,
    Established,
}

impl State {
    /// BIRD's words, which `calicoctl node status` shows in its INFO column.
    pub fn name(self) -> &'static str {
        match self {
            State::Idle => "Idle",
            State::Connect => "Connect",
            State::Active => "Active",
            State::OpenSent => "OpenSent",
            State::OpenConfirm => "OpenConfirm",
            State::Established => "Established",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Timer {
    ConnectRetry,
    IdleHold,
    Hold(ConnId),
    Keepalive(ConnId),
}

/// What a session is configured with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    pub local_as: u32,
    pub peer_as: u32,
    pub router_id: Ipv4Addr,
    /// Proposed hold time in seconds (0, or >= 3).
    pub hold_time: u16,
    pub connect_retry: Duration,
    pub idle_hold_min: Duration,
    pub idle_hold_max: Duration,
    /// Never connect out; wait for the peer (Calico: toward a peer with a higher IP).
    pub passive: bool,
    pub families: Vec<Family>,
    /// Graceful restart capability: our restart time, and whether we are restarting now
    /// (R bit, and F bits for the families whose routes the dataplane kept).
    pub graceful_restart: Option<GracefulRestart>,
    /// Announce ADD-PATH (RFC 7911) for our families, both directions (Calico's BIRD:
    /// `add paths on`).
    pub add_path: bool,
}

impl SessionConfig {
    pub fn new(local_as: u32, peer_as: u32, router_id: Ipv4Addr) -> SessionConfig {
        SessionConfig {
            local_as,
            peer_as,
            router_id,
            hold_time: 90,
            connect_retry: Duration::from_secs(3),
            idle_hold_min: Duration::from_secs(1),
            idle_hold_max: Duration::from_secs(60),
            passive: false,
            families: vec![IPV4_UNICAST],
            graceful_restart: None,
            add_path: false,
        }
    }

    /// Our ADD-PATH capability: (family, 3 = receive and send) per family, or none.
    pub fn add_path_capability(&self) -> Vec<(Family, u8)> {
        if !self.add_path {
            return Vec::new();
        }
        self.families.iter().map(|f| (*f, 3)).collect()
    }

    pub fn ibgp(&self) -> bool {
        self.local_as == self.peer_as
    }

    /// Our OPEN.
    pub fn open(&self) -> Open {
        let mut caps: Vec<Capability> = self
            .families
            .iter()
            .map(|f| Capability::Multiprotocol(*f))
            .collect();
        // Route refresh only: Enhanced Route Refresh (RFC 7313, capability 70) obliges its
        // speaker to frame every answer with BoRR/EoRR markers, which we do not send (an
        // answer ends with End-of-RIB), so it is not offered.
        caps.push(Capability::RouteRefresh);
        caps.push(Capability::FourOctetAs(self.local_as));
        if let Some(gr) = &self.graceful_restart {
            caps.push(Capability::GracefulRestart(gr.clone()));
        }
        if self.add_path {
            caps.push(Capability::AddPath(self.add_path_capability()));
        }
        Open::new(self.local_as, self.hold_time, self.router_id, caps)
    }
}

/// What both OPENs agreed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub peer_as: u32,
    pub peer_id: Ipv4Addr,
    pub hold_time: u16,
    pub keepalive: u16,
    pub four_octet_as: bool,
    /// Families both sides announced (IPv4 unicast when the peer announced none).
    pub families: Vec<Family>,
    pub route_refresh: bool,
    pub enhanced_route_refresh: bool,
    /// The peer's graceful-restart capability, if it has one.
    pub peer_graceful_restart: Option<GracefulRestart>,
    /// Families whose prefixes carry path identifiers (RFC 7911), from the peer and to it.
    pub add_path_rx: AddPathFamilies,
    pub add_path_tx: AddPathFamilies,
}

/// The peer's ADD-PATH capability (empty when it has none).
pub fn peer_add_path(open: &Open) -> Vec<(Family, u8)> {
    open.capabilities
        .iter()
        .filter_map(|c| match c {
            Capability::AddPath(f) => Some(f.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

/// Why a session is not (or no longer) up, in words for status and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DownReason {
    ConnectFailed(String),
    ConnectionClosed(String),
    HoldTimerExpired,
    /// RFC 9687: the peer took nothing we sent for the send hold time.
    SendHoldTimerExpired,
    NotificationReceived(Notification),
    NotificationSent(Notification),
    Stopped,
}

impl std::fmt::Display for DownReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DownReason::ConnectFailed(r) => write!(f, "connect failed: {r}"),
            DownReason::ConnectionClosed(r) => write!(f, "connection closed: {r}"),
            DownReason::HoldTimerExpired => write!(f, "hold timer expired"),
            DownReason::SendHoldTimerExpired => write!(f, "send hold timer expired"),
            DownReason::NotificationReceived(n) => write!(f, "notification received: {n}"),
            DownReason::NotificationSent(n) => write!(f, "notification sent: {n}"),
            DownReason::Stopped => write!(f, "stopped"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    Start,
    /// Stop, telling the peer why (a Cease subcode).
    Stop {
        cease: u8,
    },
    /// A TCP connection is up (an outgoing one we were asked for, or an accepted one).
    Connected {
        conn: ConnId,
        dir: Direction,
    },
    ConnectFailed {
        conn: ConnId,
        reason: String,
    },
    Closed {
        conn: ConnId,
        reason: String,
    },
    Received {
        conn: ConnId,
        msg: Message,
    },
    /// The bytes of a connection could not be decoded: this NOTIFICATION says why.
    Malformed {
        conn: ConnId,
        notification: Notification,
    },
    Timer(Timer),
    /// RFC 9687: nothing written on this connection for the send hold time although
    /// messages wait (the session task watches its writer).
    SendHoldExpired {
        conn: ConnId,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Connect {
        conn: ConnId,
    },
    Send {
        conn: ConnId,
        msg: Message,
    },
    Close {
        conn: ConnId,
    },
    /// Arm (Some) or cancel (None) a timer.
    SetTimer {
        timer: Timer,
        after: Option<Duration>,
    },
    Established {
        conn: ConnId,
        negotiated: Negotiated,
    },
    /// Left Established.
    Down {
        reason: DownReason,
    },
    Update(Update),
    RouteRefresh(RouteRefresh),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnState {
    OpenSent,
    OpenConfirm,
    Established,
}

#[derive(Debug, Clone)]
struct Conn {
    id: ConnId,
    dir: Direction,
    state: ConnState,
    negotiated: Option<Negotiated>,
}

/// One BGP session with one peer.
#[derive(Debug)]
pub struct Session {
    cfg: SessionConfig,
    started: bool,
    idle_holding: bool,
    connecting: Option<ConnId>,
    conns: Vec<Conn>,
    next_id: ConnId,
    failures: u32,
    last_error: Option<DownReason>,
}

/// RFC 4271 §8: a large hold time while waiting for the peer's OPEN.
const OPEN_HOLD: Duration = Duration::from_secs(240);

impl Session {
    /// Our restart is over (RFC 4724 §3): OPENs from now on clear the Restart State bit
    /// and the Forwarding State bits.
    pub fn restart_done(&mut self) {
        if let Some(gr) = &mut self.cfg.graceful_restart {
            gr.restarting = false;
            for (_, forwarding) in &mut gr.families {
                *forwarding = false;
            }
        }
    }

    pub fn new(cfg: SessionConfig) -> Session {
        Session {
            cfg,
            started: false,
            idle_holding: false,
            connecting: None,
            conns: Vec::new(),
            next_id: 1,
            failures: 0,
            last_error: None,
        }
    }

    pub fn config(&self) -> &SessionConfig {
        &self.cfg
    }

    /// The RFC state.
    pub fn state(&self) -> State {
        let best = self.conns.iter().map(|c| c.state).max_by_key(|s| *s as u8);
        match best {
            Some(ConnState::Established) => State::Established,
            Some(ConnState::OpenConfirm) => State::OpenConfirm,
            Some(ConnState::OpenSent) => State::OpenSent,
            None if !self.started || self.idle_holding => State::Idle,
            None if self.connecting.is_some() => State::Connect,
            None => State::Active,
        }
    }

    /// Why the last attempt or session failed.
    pub fn last_error(&self) -> Option<&DownReason> {
        self.last_error.as_ref()
    }

    /// The established connection and what it negotiated.
    pub fn established(&self) -> Option<(ConnId, &Negotiated)> {
        self.conns
            .iter()
            .find(|c| c.state == ConnState::Established)
            .and_then(|c| c.negotiated.as_ref().map(|n| (c.id, n)))
    }

    /// Apply one input.
    pub fn handle(&mut self, input: Input) -> Vec<Output> {
        let mut out = Vec::new();
        match input {
            Input::Start => {
                if !self.started {
                    self.started = true;
                    self.begin(&mut out);
                }
            }
            Input::Stop { cease } => {
                self.started = false;
                self.idle_holding = false;
                self.connecting = None;
                for c in std::mem::take(&mut self.conns) {
                    self.drop_conn(
                        c,
                        Some(Notification::new(err::CEASE, cease, [])),
                        &mut out,
                        true,
                    );
                }
                out.push(timer(Timer::ConnectRetry, None));
                out.push(timer(Timer::IdleHold, None));
                self.last_error = Some(DownReason::Stopped);
            }
            Input::Connected { conn, dir } => self.connected(conn, dir, &mut out),
            Input::ConnectFailed { conn, reason } => {
                if self.connecting == Some(conn) {
                    self.connecting = None;
                    self.last_error = Some(DownReason::ConnectFailed(reason));
                    if self.started && !self.idle_holding {
                        out.push(timer(Timer::ConnectRetry, Some(self.cfg.connect_retry)));
                    }
                }
            }
            Input::Closed { conn, reason } => {
                if self.conns.iter().any(|c| c.id == conn) {
                    self.fail(conn, DownReason::ConnectionClosed(reason), None, &mut out);
                }
            }
            Input::Received { conn, msg } => self.received(conn, msg, &mut out),
            Input::Malformed { conn, notification } => {
                if self.conns.iter().any(|c| c.id == conn) {
                    let why = DownReason::NotificationSent(notification.clone());
                    self.fail(conn, why, Some(notification), &mut out);
                }
            }
            Input::Timer(t) => self.timer(t, &mut out),
            Input::SendHoldExpired { conn } => {
                if self.conns.iter().any(|c| c.id == conn) {
                    // The peer reads nothing: the NOTIFICATION goes out if it can.
                    let n = Notification::new(err::SEND_HOLD_TIMER_EXPIRED, 0, []);
                    self.fail(conn, DownReason::SendHoldTimerExpired, Some(n), &mut out);
                }
            }
        }
        out
    }

    fn begin(&mut self, out: &mut Vec<Output>) {
        if self.cfg.passive || self.connecting.is_some() || !self.conns.is_empty() {
            return;
        }
        let id = self.new_id();
        self.connecting = Some(id);
        out.push(Output::Connect { conn: id });
    }

    fn new_id(&mut self) -> ConnId {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn connected(&mut self, conn: ConnId, dir: Direction, out: &mut Vec<Output>) {
        let wanted = match dir {
            Direction::Outgoing => self.connecting == Some(conn),
            // An accepted connection: fine unless a session is up or two exist already.
            Direction::Incoming => true,
        };
        // The idle hold delays our own attempts only: a peer that connects is ready, and
        // refusing it too would let two speakers with the same backoff miss each other
        // forever (each refusing while the other tries).
        if !self.started
            || (self.idle_holding && dir == Direction::Outgoing)
            || !wanted
            || self.conns.len() >= 2
            || self.conns.iter().any(|c| c.state == ConnState::Established)
        {
            out.push(Output::Close { conn });
            return;
        }
        if self.idle_holding {
            self.idle_holding = false;
            out.push(timer(Timer::IdleHold, None));
        }
        if dir == Direction::Outgoing {
            self.connecting = None;
            out.push(timer(Timer::ConnectRetry, None));
        }
        self.conns.push(Conn {
            id: conn,
            dir,
            state: ConnState::OpenSent,
            negotiated: None,
        });
        out.push(Output::Send {
            conn,
            msg: Message::Open(self.cfg.open()),
        });
        out.push(timer(Timer::Hold(conn), Some(OPEN_HOLD)));
    }

    fn received(&mut self, conn: ConnId, msg: Message, out: &mut Vec<Output>) {
        let Some(idx) = self.conns.iter().position(|c| c.id == conn) else {
            return;
        };
        let state = self.conns[idx].state;
        match (state, msg) {
            (_, Message::Notification(n)) => {
                self.fail(conn, DownReason::NotificationReceived(n), None, out);
            }
            (ConnState::OpenSent, Message::Open(open)) => match self.negotiate(&open) {
                Ok(neg) => {
                    let hold = neg.hold_time;
                    let keepalive = neg.keepalive;
                    let c = &mut self.conns[idx];
                    c.state = ConnState::OpenConfirm;
                    c.negotiated = Some(neg);
                    out.push(Output::Send {
                        conn,
                        msg: Message::Keepalive,
                    });
                    arm_hold(conn, hold, keepalive, out);
                    self.resolve_collision(conn, out);
                }
                Err(n) => {
                    let why = DownReason::NotificationSent(n.clone());
                    self.fail(conn, why, Some(n), out);
                }
            },
            (ConnState::OpenConfirm, Message::Keepalive) => {
                let c = &mut self.conns[idx];
                c.state = ConnState::Established;
                let neg = c.negotiated.clone().expect("OpenConfirm has negotiated");
                arm_hold(conn, neg.hold_time, 0, out);
                self.failures = 0;
                self.last_error = None;
                // A second connection still opening loses to the established one.
                let others: Vec<Conn> = self
                    .conns
                    .iter()
                    .filter(|c| c.id != conn)
                    .cloned()
                    .collect();
                for o in others {
                    self.conns.retain(|c| c.id != o.id);
                    let n = Notification::new(err::CEASE, err::COLLISION_RESOLUTION, []);
                    self.drop_conn(o, Some(n), out, false);
                }
                out.push(Output::Established {
                    conn,
                    negotiated: neg,
                });
            }
            (ConnState::Established, Message::Keepalive) => {
                let hold = self.hold_of(idx);
                arm_hold(conn, hold, 0, out);
            }
            (ConnState::Established, Message::Update(u)) => {
                let hold = self.hold_of(idx);
                arm_hold(conn, hold, 0, out);
                out.push(Output::Update(u));
            }
            (ConnState::Established, Message::RouteRefresh(r)) => {
                let neg = self.conns[idx].negotiated.as_ref();
                if neg.is_some_and(|n| refresh_honoured(n, &r)) {
                    out.push(Output::RouteRefresh(r));
                } else {
                    tracing::debug!(
                        ?r,
                        "ROUTE-REFRESH ignored: not negotiated, not a request, or a family not negotiated"
                    );
                }
            }
            _ => {
                let n = Notification::new(err::FSM, 0, []);
                self.fail(conn, DownReason::NotificationSent(n.clone()), Some(n), out);
            }
        }
    }

    fn hold_of(&self, idx: usize) -> u16 {
        self.conns[idx]
            .negotiated
            .as_ref()
            .map_or(0, |n| n.hold_time)
    }

    /// Check the peer's OPEN against the configuration (RFC 4271 §6.2).
    fn negotiate(&self, open: &Open) -> Result<Negotiated, Notification> {
        let peer_as = open.asn();
        if peer_as != self.cfg.peer_as {
            let field = u16::try_from(peer_as).unwrap_or(AS_TRANS);
            return Err(Notification::new(
                err::OPEN,
                err::BAD_PEER_AS,
                field.to_be_bytes(),
            ));
        }
        if self.cfg.ibgp() && open.bgp_id == self.cfg.router_id {
            return Err(Notification::new(
                err::OPEN,
                err::BAD_BGP_ID,
                open.bgp_id.octets(),
            ));
        }
        let hold_time = open.hold_time.min(self.cfg.hold_time);
        let theirs = open.families();
        let theirs = if theirs.is_empty() {
            vec![IPV4_UNICAST]
        } else {
            theirs
        };
        Ok(Negotiated {
            peer_as,
            peer_id: open.bgp_id,
            hold_time,
            keepalive: hold_time / 3,
            four_octet_as: open
                .capabilities
                .iter()
                .any(|c| matches!(c, Capability::FourOctetAs(_))),
            families: self
                .cfg
                .families
                .iter()
                .filter(|f| theirs.contains(f))
                .copied()
                .collect(),
            route_refresh: open.has(&Capability::RouteRefresh),
            enhanced_route_refresh: open.has(&Capability::EnhancedRouteRefresh),
            peer_graceful_restart: open.graceful_restart().cloned(),
            add_path_rx: AddPathFamilies::negotiate(
                &self.cfg.add_path_capability(),
                &peer_add_path(open),
                1,
            ),
            add_path_tx: AddPathFamilies::negotiate(
                &self.cfg.add_path_capability(),
                &peer_add_path(open),
                2,
            ),
        })
    }

    /// RFC 4271 §6.8: with two connections that both know the peer's BGP ID, keep the one
    /// opened by the speaker with the higher BGP ID.
    fn resolve_collision(&mut self, conn: ConnId, out: &mut Vec<Output>) {
        let Some(other) = self
            .conns
            .iter()
            .find(|c| c.id != conn && c.state != ConnState::OpenSent)
            .cloned()
        else {
            return;
        };
        let this = self
            .conns
            .iter()
            .find(|c| c.id == conn)
            .cloned()
            .expect("present");
        let loser = if other.state == ConnState::Established {
            this
        } else {
            let peer_id = this
                .negotiated
                .as_ref()
                .map(|n| n.peer_id)
                .expect("has OPEN");
            let keep_dir = if u32::from(self.cfg.router_id) > u32::from(peer_id) {
                Direction::Outgoing
            } else {
                Direction::Incoming
            };
            if this.dir == keep_dir { other } else { this }
        };
        self.conns.retain(|c| c.id != loser.id);
        let n = Notification::new(err::CEASE, err::COLLISION_RESOLUTION, []);
        self.drop_conn(loser, Some(n), out, false);
    }

    /// Close a connection (with a NOTIFICATION first when given and the connection got an
    /// OPEN out) and cancel its timers; `Down` when it was established and `report`.
    fn drop_conn(&mut self, c: Conn, n: Option<Notification>, out: &mut Vec<Output>, report: bool) {
        if let Some(n) = n {
            out.push(Output::Send {
                conn: c.id,
                msg: Message::Notification(n),
            });
        }
        out.push(Output::Close { conn: c.id });
        out.push(timer(Timer::Hold(c.id), None));
        out.push(timer(Timer::Keepalive(c.id), None));
        if report && c.state == ConnState::Established {
            out.push(Output::Down {
                reason: DownReason::Stopped,
            });
        }
    }

    /// A connection failed: close it; when it was the last, hold the session idle.
    fn fail(
        &mut self,
        conn: ConnId,
        why: DownReason,
        send: Option<Notification>,
        out: &mut Vec<Output>,
    ) {
        let Some(idx) = self.conns.iter().position(|c| c.id == conn) else {
            return;
        };
        let c = self.conns.remove(idx);
        let was_up = c.state == ConnState::Established;
        self.drop_conn(c, send, out, false);
        if was_up {
            out.push(Output::Down {
                reason: why.clone(),
            });
        }
        self.last_error = Some(why);
        if self.conns.is_empty() && self.started {
            self.failures += 1;
            let backoff = self
                .cfg
                .idle_hold_min
                .saturating_mul(1 << (self.failures - 1).min(16))
                .min(self.cfg.idle_hold_max);
            self.idle_holding = true;
            self.connecting = None;
            out.push(timer(Timer::ConnectRetry, None));
            out.push(timer(Timer::IdleHold, Some(backoff)));
        }
    }

    fn timer(&mut self, t: Timer, out: &mut Vec<Output>) {
        match t {
            Timer::ConnectRetry => {
                if self.started && !self.idle_holding && self.conns.is_empty() {
                    self.connecting = None;
                    self.begin(out);
                }
            }
            Timer::IdleHold => {
                if self.started && self.idle_holding {
                    self.idle_holding = false;
                    self.begin(out);
                }
            }
            Timer::Hold(conn) => {
                if self.conns.iter().any(|c| c.id == conn) {
                    let n = Notification::new(err::HOLD_TIMER_EXPIRED, 0, []);
                    self.fail(conn, DownReason::HoldTimerExpired, Some(n), out);
                }
            }
            Timer::Keepalive(conn) => {
                if let Some(c) = self.conns.iter().find(|c| c.id == conn)
                    && c.state != ConnState::OpenSent
                    && let Some(n) = &c.negotiated
                    && n.keepalive > 0
                {
                    out.push(Output::Send {
                        conn,
                        msg: Message::Keepalive,
                    });
                    out.push(timer(
                        Timer::Keepalive(conn),
                        Some(Duration::from_secs(u64::from(n.keepalive))),
                    ));
                }
            }
        }
    }
}

/// Whether a ROUTE-REFRESH asks us to send our routes again: only from a peer that
/// announced the capability (RFC 2918 §3: a speaker may send it only then; RFC 7313 §3.2
/// for the enhanced one), for a family both sides negotiated (RFC 2918 §4: otherwise
/// ignored), and only a normal request: the peer's own Beginning/End of Route Refresh
/// markers (RFC 7313 subtypes 1 and 2) ask nothing of us, and other subtypes are ignored.
fn refresh_honoured(n: &Negotiated, r: &RouteRefresh) -> bool {
    (n.route_refresh || n.enhanced_route_refresh)
        && r.subtype == 0
        && n.families.contains(&r.family)
}

fn timer(timer: Timer, after: Option<Duration>) -> Output {
    Output::SetTimer { timer, after }
}

/// (Re)arm the hold timer, and the keepalive timer when `keepalive` > 0 (a zero hold time
/// disables both).
fn arm_hold(conn: ConnId, hold: u16, keepalive: u16, out: &mut Vec<Output>) {
    if hold == 0 {
        out.push(timer(Timer::Hold(conn), None));
        return;
    }
    out.push(timer(
        Timer::Hold(conn),
        Some(Duration::from_secs(u64::from(hold))),
    ));
    if keepalive > 0 {
        out.push(timer(
            Timer::Keepalive(conn),
            Some(Duration::from_secs(u64::from(keepalive))),
        ));
    }
}

#[cfg(test)]
#[path = "fsm_tests.rs"]
mod tests;
