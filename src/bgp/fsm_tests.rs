//! Session FSM behaviour, one test per rule.

use std::net::Ipv4Addr;
use std::time::Duration;

use super::*;

const US: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const PEER: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);

fn cfg() -> SessionConfig {
    SessionConfig::new(64512, 64512, US)
}

fn peer_open(asn: u32, hold: u16, id: Ipv4Addr) -> Message {
    Message::Open(Open::new(
        asn,
        hold,
        id,
        vec![
            Capability::Multiprotocol(IPV4_UNICAST),
            Capability::RouteRefresh,
        ],
    ))
}

fn sends(out: &[Output], conn: ConnId) -> Vec<Message> {
    out.iter()
        .filter_map(|o| match o {
            Output::Send { conn: c, msg } if *c == conn => Some(msg.clone()),
            _ => None,
        })
        .collect()
}

fn armed(out: &[Output], t: Timer) -> Option<Option<Duration>> {
    out.iter().rev().find_map(|o| match o {
        Output::SetTimer { timer, after } if *timer == t => Some(*after),
        _ => None,
    })
}

fn closed(out: &[Output], conn: ConnId) -> bool {
    out.contains(&Output::Close { conn })
}

/// Started, with connection 1 (outgoing) up and our OPEN sent.
fn connected(cfg: SessionConfig) -> Session {
    let mut s = Session::new(cfg);
    s.handle(Input::Start);
    s.handle(Input::Connected {
        conn: 1,
        dir: Direction::Outgoing,
    });
    s
}

/// Start, connect out, exchange OPEN and KEEPALIVE: returns the session and connection id.
fn established(cfg: SessionConfig) -> (Session, ConnId) {
    let mut s = Session::new(cfg);
    let out = s.handle(Input::Start);
    let Some(Output::Connect { conn }) = out.first().cloned() else {
        panic!("no connect: {out:?}")
    };
    s.handle(Input::Connected {
        conn,
        dir: Direction::Outgoing,
    });
    s.handle(Input::Received {
        conn,
        msg: peer_open(64512, 90, PEER),
    });
    let out = s.handle(Input::Received {
        conn,
        msg: Message::Keepalive,
    });
    assert!(
        matches!(out.last(), Some(Output::Established { .. })),
        "{out:?}"
    );
    (s, conn)
}

#[test]
fn open_exchange_reaches_established() {
    let mut s = Session::new(cfg());
    assert_eq!(s.state(), State::Idle);
    let out = s.handle(Input::Start);
    assert_eq!(out, vec![Output::Connect { conn: 1 }]);
    assert_eq!(s.state(), State::Connect);
    let out = s.handle(Input::Connected {
        conn: 1,
        dir: Direction::Outgoing,
    });
    let Message::Open(ours) = &sends(&out, 1)[0] else {
        panic!("OPEN first")
    };
    assert_eq!((ours.asn(), ours.hold_time, ours.bgp_id), (64512, 90, US));
    assert!(ours.has(&Capability::RouteRefresh));
    assert_eq!(
        armed(&out, Timer::Hold(1)),
        Some(Some(Duration::from_secs(240)))
    );
    assert_eq!(s.state(), State::OpenSent);
    let out = s.handle(Input::Received {
        conn: 1,
        msg: peer_open(64512, 30, PEER),
    });
    assert_eq!(sends(&out, 1), vec![Message::Keepalive]);
    assert_eq!(s.state(), State::OpenConfirm);
    // Hold = min(90, 30); keepalive = hold / 3.
    assert_eq!(
        armed(&out, Timer::Hold(1)),
        Some(Some(Duration::from_secs(30)))
    );
    assert_eq!(
        armed(&out, Timer::Keepalive(1)),
        Some(Some(Duration::from_secs(10)))
    );
    let out = s.handle(Input::Received {
        conn: 1,
        msg: Message::Keepalive,
    });
    let Some(Output::Established { negotiated, .. }) = out.last() else {
        panic!("{out:?}")
    };
    assert_eq!(negotiated.hold_time, 30);
    assert_eq!(negotiated.families, vec![IPV4_UNICAST]);
    assert!(negotiated.route_refresh && negotiated.four_octet_as);
    assert_eq!(s.state(), State::Established);
}

#[test]
fn passive_session_waits_for_the_peer() {
    let mut c = cfg();
    c.passive = true;
    let mut s = Session::new(c);
    assert!(s.handle(Input::Start).is_empty());
    assert_eq!(s.state(), State::Active);
    let out = s.handle(Input::Connected {
        conn: 42,
        dir: Direction::Incoming,
    });
    assert!(matches!(sends(&out, 42)[0], Message::Open(_)));
    assert_eq!(s.state(), State::OpenSent);
}

#[test]
fn failed_connect_retries_after_connect_retry_time() {
    let mut s = Session::new(cfg());
    s.handle(Input::Start);
    let out = s.handle(Input::ConnectFailed {
        conn: 1,
        reason: "Connection refused".into(),
    });
    assert_eq!(
        armed(&out, Timer::ConnectRetry),
        Some(Some(Duration::from_secs(3)))
    );
    assert_eq!(
        s.state(),
        State::Active,
        "still accepts the peer's connection"
    );
    assert_eq!(
        s.last_error().unwrap().to_string(),
        "connect failed: Connection refused"
    );
    let out = s.handle(Input::Timer(Timer::ConnectRetry));
    assert_eq!(out, vec![Output::Connect { conn: 2 }]);
    // A late answer for the abandoned attempt is closed.
    let out = s.handle(Input::Connected {
        conn: 1,
        dir: Direction::Outgoing,
    });
    assert_eq!(out, vec![Output::Close { conn: 1 }]);
}

#[test]
fn keepalive_timer_sends_keepalives_and_rearms() {
    let (mut s, conn) = established(cfg());
    let out = s.handle(Input::Timer(Timer::Keepalive(conn)));
    assert_eq!(sends(&out, conn), vec![Message::Keepalive]);
    assert_eq!(
        armed(&out, Timer::Keepalive(conn)),
        Some(Some(Duration::from_secs(30)))
    );
}

#[test]
fn hold_timer_expiry_sends_notification_and_goes_idle_with_backoff() {
    let (mut s, conn) = established(cfg());
    let out = s.handle(Input::Timer(Timer::Hold(conn)));
    assert_eq!(
        sends(&out, conn),
        vec![Message::Notification(Notification::new(
            err::HOLD_TIMER_EXPIRED,
            0,
            []
        ))]
    );
    assert!(closed(&out, conn));
    assert!(out.contains(&Output::Down {
        reason: DownReason::HoldTimerExpired
    }));
    assert_eq!(
        armed(&out, Timer::IdleHold),
        Some(Some(Duration::from_secs(1)))
    );
    assert_eq!(s.state(), State::Idle);
    assert_eq!(s.last_error().unwrap().to_string(), "hold timer expired");
    // While idle-holding we do not connect; then the session starts again.
    let out = s.handle(Input::Timer(Timer::ConnectRetry));
    assert!(!out.iter().any(|o| matches!(o, Output::Connect { .. })));
    let out = s.handle(Input::Timer(Timer::IdleHold));
    assert!(matches!(out[0], Output::Connect { .. }));
}

/// A peer that connects during our idle hold is answered (the hold only delays our own
/// attempts): two speakers backing off alike would otherwise never meet.
#[test]
fn an_incoming_connection_during_the_idle_hold_is_accepted() {
    let (mut s, conn) = established(cfg());
    s.handle(Input::Closed {
        conn,
        reason: "reset by peer".into(),
    });
    assert_eq!(s.state(), State::Idle);
    let out = s.handle(Input::Connected {
        conn: 77,
        dir: Direction::Incoming,
    });
    assert!(!closed(&out, 77), "{out:?}");
    assert!(matches!(sends(&out, 77)[..], [Message::Open(_)]), "{out:?}");
    assert_eq!(armed(&out, Timer::IdleHold), Some(None), "hold cancelled");
    // The hold timer firing late starts no second connection.
    let out = s.handle(Input::Timer(Timer::IdleHold));
    assert!(
        !out.iter().any(|o| matches!(o, Output::Connect { .. })),
        "{out:?}"
    );
    s.handle(Input::Received {
        conn: 77,
        msg: peer_open(64512, 90, PEER),
    });
    s.handle(Input::Received {
        conn: 77,
        msg: Message::Keepalive,
    });
    assert_eq!(s.state(), State::Established);
}

#[test]
fn idle_hold_doubles_per_consecutive_failure_and_resets_when_established() {
    let mut s = Session::new(cfg());
    s.handle(Input::Start);
    let mut holds = Vec::new();
    for _ in 0..8 {
        let conn = match s.handle(Input::Timer(Timer::IdleHold)).first() {
            Some(Output::Connect { conn }) => *conn,
            _ => s.connecting.expect("connecting"),
        };
        s.handle(Input::Connected {
            conn,
            dir: Direction::Outgoing,
        });
        let out = s.handle(Input::Closed {
            conn,
            reason: "reset by peer".into(),
        });
        holds.push(armed(&out, Timer::IdleHold).unwrap().unwrap().as_secs());
    }
    assert_eq!(holds, vec![1, 2, 4, 8, 16, 32, 60, 60]);
    let conn = match s.handle(Input::Timer(Timer::IdleHold)).first() {
        Some(Output::Connect { conn }) => *conn,
        other => panic!("{other:?}"),
    };
    s.handle(Input::Connected {
        conn,
        dir: Direction::Outgoing,
    });
    s.handle(Input::Received {
        conn,
        msg: peer_open(64512, 90, PEER),
    });
    s.handle(Input::Received {
        conn,
        msg: Message::Keepalive,
    });
    let out = s.handle(Input::Closed {
        conn,
        reason: "reset by peer".into(),
    });
    assert_eq!(
        armed(&out, Timer::IdleHold),
        Some(Some(Duration::from_secs(1)))
    );
}

#[test]
fn wrong_peer_as_is_refused_with_bad_peer_as() {
    let mut s = connected(cfg());
    let out = s.handle(Input::Received {
        conn: 1,
        msg: peer_open(65000, 90, PEER),
    });
    let n = Notification::new(err::OPEN, err::BAD_PEER_AS, 65000u16.to_be_bytes());
    assert_eq!(sends(&out, 1), vec![Message::Notification(n.clone())]);
    assert!(closed(&out, 1));
    assert_eq!(s.last_error(), Some(&DownReason::NotificationSent(n)));
}

#[test]
fn same_router_id_on_ibgp_is_refused() {
    let mut s = connected(cfg());
    let out = s.handle(Input::Received {
        conn: 1,
        msg: peer_open(64512, 90, US),
    });
    assert!(matches!(&sends(&out, 1)[0], Message::Notification(n) if n.subcode == err::BAD_BGP_ID));
}

#[test]
fn updates_and_route_refresh_are_delivered_when_established() {
    let (mut s, conn) = established(cfg());
    let out = s.handle(Input::Received {
        conn,
        msg: Message::Update(Update::default()),
    });
    assert_eq!(
        armed(&out, Timer::Hold(conn)),
        Some(Some(Duration::from_secs(90)))
    );
    assert!(out.contains(&Output::Update(Update::default())));
    let rr = RouteRefresh {
        family: IPV4_UNICAST,
        subtype: 0,
    };
    let out = s.handle(Input::Received {
        conn,
        msg: Message::RouteRefresh(rr),
    });
    assert_eq!(out, vec![Output::RouteRefresh(rr)]);
}

/// Our OPEN offers route refresh (RFC 2918) but not Enhanced Route Refresh (RFC 7313):
/// that capability would oblige us to frame each answer with BoRR/EoRR markers, and a peer
/// that relies on them (to drop routes not re-advertised) would wait for an EoRR we never
/// send.
#[test]
fn our_open_offers_route_refresh_but_not_enhanced_route_refresh() {
    let open = cfg().open();
    assert!(open.has(&Capability::RouteRefresh));
    assert!(!open.has(&Capability::EnhancedRouteRefresh), "{open:?}");
}

/// RFC 2918 / RFC 7313: a ROUTE-REFRESH from a peer that did not announce the
/// capability, for a family not negotiated, or a peer's BoRR/EoRR marker, makes us resend
/// nothing; the session stays up.
#[test]
fn route_refresh_is_honoured_only_when_negotiated_and_a_request() {
    let refresh = |family, subtype| Message::RouteRefresh(RouteRefresh { family, subtype });
    // The peer's OPEN without the route-refresh capability.
    let mut s = connected(cfg());
    s.handle(Input::Received {
        conn: 1,
        msg: Message::Open(Open::new(
            64512,
            90,
            PEER,
            vec![Capability::Multiprotocol(IPV4_UNICAST)],
        )),
    });
    s.handle(Input::Received {
        conn: 1,
        msg: Message::Keepalive,
    });
    assert_eq!(s.state(), State::Established);
    let out = s.handle(Input::Received {
        conn: 1,
        msg: refresh(IPV4_UNICAST, 0),
    });
    assert!(out.is_empty(), "{out:?}");
    // With the capability: IPv6 was not negotiated, and BoRR/EoRR are markers.
    let (mut s, conn) = established(cfg());
    for (family, subtype) in [
        (crate::bgp::message::IPV6_UNICAST, 0),
        (IPV4_UNICAST, 1),
        (IPV4_UNICAST, 2),
        (IPV4_UNICAST, 7),
    ] {
        let out = s.handle(Input::Received {
            conn,
            msg: refresh(family, subtype),
        });
        assert!(out.is_empty(), "{family:?} subtype {subtype}: {out:?}");
    }
    assert_eq!(s.state(), State::Established);
}

/// RFC 9687: the send hold timer ends the session with its NOTIFICATION (code 8).
#[test]
fn send_hold_timer_expiry_takes_the_session_down() {
    let (mut s, conn) = established(cfg());
    let out = s.handle(Input::SendHoldExpired { conn });
    assert!(matches!(&sends(&out, conn)[..], [Message::Notification(n)] if n.code == 8));
    assert!(closed(&out, conn));
    assert!(out.contains(&Output::Down {
        reason: DownReason::SendHoldTimerExpired
    }));
    assert_ne!(s.state(), State::Established);
}

#[test]
fn update_before_established_is_an_fsm_error() {
    let mut s = connected(cfg());
    let out = s.handle(Input::Received {
        conn: 1,
        msg: Message::Update(Update::default()),
    });
    assert!(matches!(&sends(&out, 1)[0], Message::Notification(n) if n.code == err::FSM));
}

#[test]
fn notification_received_takes_the_session_down_with_its_words() {
    let (mut s, conn) = established(cfg());
    let n = Notification::new(err::CEASE, err::ADMIN_SHUTDOWN, []);
    let out = s.handle(Input::Received {
        conn,
        msg: Message::Notification(n.clone()),
    });
    assert!(
        sends(&out, conn).is_empty(),
        "no NOTIFICATION in answer to one"
    );
    assert!(out.contains(&Output::Down {
        reason: DownReason::NotificationReceived(n)
    }));
    assert_eq!(
        s.last_error().unwrap().to_string(),
        "notification received: Cease: administrative shutdown (code 6, subcode 2)"
    );
}

#[test]
fn malformed_input_is_answered_with_its_notification() {
    let (mut s, conn) = established(cfg());
    let n = Notification::new(err::UPDATE, err::INVALID_NETWORK, []);
    let out = s.handle(Input::Malformed {
        conn,
        notification: n.clone(),
    });
    assert_eq!(sends(&out, conn), vec![Message::Notification(n)]);
    assert!(closed(&out, conn));
}

#[test]
fn stop_sends_cease_and_stays_idle() {
    let (mut s, conn) = established(cfg());
    let out = s.handle(Input::Stop {
        cease: err::PEER_DECONFIGURED,
    });
    assert_eq!(
        sends(&out, conn),
        vec![Message::Notification(Notification::new(
            err::CEASE,
            err::PEER_DECONFIGURED,
            []
        ))]
    );
    assert!(out.contains(&Output::Down {
        reason: DownReason::Stopped
    }));
    assert_eq!(s.state(), State::Idle);
    assert!(s.handle(Input::Timer(Timer::ConnectRetry)).is_empty());
}

/// RFC 4271 §6.8: both connections reach OpenConfirm; the one opened by the higher BGP ID
/// survives.
#[test]
fn collision_keeps_the_connection_of_the_higher_bgp_id() {
    for (our_id, keep) in [
        (Ipv4Addr::new(10, 99, 0, 9), Direction::Outgoing),
        (Ipv4Addr::new(10, 99, 0, 1), Direction::Incoming),
    ] {
        let mut c = cfg();
        c.router_id = our_id;
        let mut s = Session::new(c);
        s.handle(Input::Start);
        s.handle(Input::Connected {
            conn: 1,
            dir: Direction::Outgoing,
        });
        s.handle(Input::Connected {
            conn: 100,
            dir: Direction::Incoming,
        });
        s.handle(Input::Received {
            conn: 1,
            msg: peer_open(64512, 90, PEER),
        });
        let out = s.handle(Input::Received {
            conn: 100,
            msg: peer_open(64512, 90, PEER),
        });
        let (kept, lost) = if keep == Direction::Outgoing {
            (1, 100)
        } else {
            (100, 1)
        };
        assert!(closed(&out, lost), "{our_id}: {out:?}");
        assert!(!closed(&out, kept));
        assert!(
            sends(&out, lost).contains(&Message::Notification(Notification::new(
                err::CEASE,
                err::COLLISION_RESOLUTION,
                []
            )))
        );
        let out = s.handle(Input::Received {
            conn: kept,
            msg: Message::Keepalive,
        });
        assert!(matches!(out.last(), Some(Output::Established { conn, .. }) if *conn == kept));
    }
}

#[test]
fn connection_while_established_is_refused() {
    let (mut s, _) = established(cfg());
    let out = s.handle(Input::Connected {
        conn: 9,
        dir: Direction::Incoming,
    });
    assert_eq!(out, vec![Output::Close { conn: 9 }]);
}

#[test]
fn zero_hold_time_disables_keepalives() {
    let mut c = cfg();
    c.hold_time = 0;
    let mut s = connected(c);
    let out = s.handle(Input::Received {
        conn: 1,
        msg: peer_open(64512, 90, PEER),
    });
    assert_eq!(armed(&out, Timer::Hold(1)), Some(None));
    assert_eq!(armed(&out, Timer::Keepalive(1)), None);
}

#[test]
fn graceful_restart_capability_is_announced_and_learned() {
    let mut c = cfg();
    c.graceful_restart = Some(GracefulRestart {
        restarting: true,
        restart_time: 120,
        families: vec![(IPV4_UNICAST, true)],
    });
    let open = c.open();
    assert_eq!(open.graceful_restart().unwrap().restart_time, 120);
    let mut s = connected(c);
    let mut theirs = Open::new(64512, 90, PEER, vec![]);
    theirs
        .capabilities
        .push(Capability::GracefulRestart(GracefulRestart {
            restarting: false,
            restart_time: 90,
            families: vec![(IPV4_UNICAST, false)],
        }));
    s.handle(Input::Received {
        conn: 1,
        msg: Message::Open(theirs),
    });
    let out = s.handle(Input::Received {
        conn: 1,
        msg: Message::Keepalive,
    });
    let Some(Output::Established { negotiated, .. }) = out.last() else {
        panic!()
    };
    assert_eq!(
        negotiated
            .peer_graceful_restart
            .as_ref()
            .unwrap()
            .restart_time,
        90
    );
}
