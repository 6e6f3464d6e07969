//! The speaker's decisions, input by input: no sockets, no tasks, no clock (each input
//! carries its time).

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use tokio::time::Instant;

use super::*;
use crate::bgp::config::{DesiredBgpConfig, DesiredPeer, PeerType};
use crate::bgp::fsm::{DownReason, Negotiated, State};
use crate::bgp::message::{
    AddPathFamilies, GracefulRestart, IPV4_UNICAST, Notification, RouteRefresh, err,
};
use crate::bgp::session::SessionEvent;
use crate::bgp::update::{AsPath, Attributes, Origin, Update};
use crate::bgp::{LearnedRoute, RouteUpdate};

const LOCAL_AS: u32 = 64512;
const US: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// Our configuration: iBGP mesh peers at `peers`, exporting `export` (inside the
/// allowed 10.244.0.0/16).
fn config(peers: &[&str], export: &[&str]) -> DesiredBgpConfig {
    let mut cfg = DesiredBgpConfig::new(US, LOCAL_AS);
    cfg.policy.allowed = vec![net("10.244.0.0/16")];
    cfg.export = export.iter().map(|p| net(p)).collect();
    cfg.peers = peers
        .iter()
        .map(|p| DesiredPeer::new(ip(p), LOCAL_AS, PeerType::NodeToNodeMesh))
        .collect();
    cfg
}

/// A core and the time it started at; `at(s)` is `s` seconds later.
struct Rig {
    core: Core,
    t0: Now,
}

impl Rig {
    fn start(cfg: DesiredBgpConfig) -> (Rig, Vec<Output>) {
        let t0 = Now {
            mono: Instant::now(),
            wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000),
        };
        let mut core = Core::new(cfg.clone(), t0.mono);
        let out = core.handle(t0, Input::Start(cfg));
        (Rig { core, t0 }, out)
    }

    fn at(&self, secs: u64) -> Now {
        let d = Duration::from_secs(secs);
        Now {
            mono: self.t0.mono + d,
            wall: self.t0.wall + d,
        }
    }

    fn input(&mut self, secs: u64, input: Input) -> Vec<Output> {
        let now = self.at(secs);
        self.core.handle(now, input)
    }

    fn event(&mut self, secs: u64, ev: SessionEvent) -> Vec<Output> {
        self.input(secs, Input::Session(ev))
    }

    /// The peer's session comes up (with graceful restart for `gr` seconds if given).
    fn establish(&mut self, secs: u64, peer: &str, gr: Option<u16>, epoch: u64) -> Vec<Output> {
        let mut out = self.event(
            secs,
            SessionEvent::State {
                peer: ip(peer),
                state: State::Established,
                last_error: None,
            },
        );
        out.extend(self.event(
            secs,
            SessionEvent::Established {
                peer: ip(peer),
                negotiated: negotiated(peer, gr),
                local: IpAddr::V4(US),
                epoch,
            },
        ));
        out
    }

    /// The peer announces `prefixes` with itself as next hop.
    fn announce(&mut self, secs: u64, peer: &str, prefixes: &[&str]) -> Vec<Output> {
        let updates = prefixes.iter().map(|p| announcement(peer, p)).collect();
        self.event(
            secs,
            SessionEvent::Updates {
                peer: ip(peer),
                updates,
            },
        )
    }

    fn end_of_rib(&mut self, secs: u64, peer: &str) -> Vec<Output> {
        self.event(
            secs,
            SessionEvent::Updates {
                peer: ip(peer),
                updates: vec![Update::end_of_rib(IPV4_UNICAST)],
            },
        )
    }

    /// The session wrote one `Send` of session `epoch`.
    fn drained(&mut self, secs: u64, peer: &str, epoch: u64) -> Vec<Output> {
        self.event(
            secs,
            SessionEvent::Drained {
                peer: ip(peer),
                epoch,
                updates: 1,
            },
        )
    }

    fn down(&mut self, secs: u64, peer: &str, reason: DownReason) -> Vec<Output> {
        self.event(
            secs,
            SessionEvent::Down {
                peer: ip(peer),
                reason,
            },
        )
    }
}

fn negotiated(peer: &str, gr: Option<u16>) -> Negotiated {
    Negotiated {
        peer_as: LOCAL_AS,
        peer_id: peer.parse().unwrap(),
        hold_time: 90,
        keepalive: 30,
        four_octet_as: true,
        families: vec![IPV4_UNICAST],
        route_refresh: true,
        enhanced_route_refresh: false,
        peer_graceful_restart: gr.map(|restart_time| GracefulRestart {
            restarting: false,
            restart_time,
            families: vec![(IPV4_UNICAST, true)],
        }),
        add_path_rx: AddPathFamilies::default(),
        add_path_tx: AddPathFamilies::default(),
    }
}

fn announcement(peer: &str, prefix: &str) -> Update {
    Update {
        attrs: Attributes {
            origin: Some(Origin::Igp),
            as_path: Some(AsPath::default()),
            next_hop: Some(peer.parse().unwrap()),
            ..Default::default()
        },
        nlri: vec![net(prefix)],
        ..Default::default()
    }
}

/// Everything sent to Felix, in order.
fn felix(out: &[Output]) -> Vec<RouteUpdate> {
    out.iter()
        .filter_map(|o| match o {
            Output::Felix(b) => Some(b.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

fn best(prefix: &str, next_hop: &str) -> RouteUpdate {
    RouteUpdate::Best(LearnedRoute {
        prefix: net(prefix),
        next_hop: ip(next_hop),
    })
}

/// The session starts and stops, as (peer, Some(cease) for a stop / None for a start).
fn sessions(out: &[Output]) -> Vec<(IpAddr, Option<u8>)> {
    out.iter()
        .filter_map(|o| match o {
            Output::StartSession(c) => Some((c.address, None)),
            Output::StopSession { peer, cease } => Some((*peer, Some(*cease))),
            _ => None,
        })
        .collect()
}

/// The UPDATEs handed to `peer`'s session, one `Vec` per `Send`.
fn sends(out: &[Output], to: &str) -> Vec<Vec<Update>> {
    out.iter()
        .filter_map(|o| match o {
            Output::Send { peer, updates, .. } if *peer == ip(to) => Some(updates.clone()),
            _ => None,
        })
        .collect()
}

fn announced(batches: &[Vec<Update>]) -> Vec<IpNet> {
    let mut all: Vec<IpNet> = batches
        .iter()
        .flatten()
        .flat_map(|u| u.nlri.clone())
        .collect();
    all.sort_unstable();
    all
}

fn has_end_of_rib(batches: &[Vec<Update>]) -> bool {
    batches
        .iter()
        .flatten()
        .any(|u| u.is_end_of_rib().is_some())
}

fn last_status(out: &[Output]) -> Vec<PeerStatus> {
    out.iter()
        .rev()
        .find_map(|o| match o {
            Output::Status(s) => Some(s.clone()),
            _ => None,
        })
        .expect("a status was published")
}

fn stale_timer(out: &[Output]) -> Option<Option<Instant>> {
    out.iter().rev().find_map(|o| match o {
        Output::StaleTimer(t) => Some(*t),
        _ => None,
    })
}

fn listens(out: &[Output]) -> bool {
    out.iter().any(|o| matches!(o, Output::Listen(_)))
}

#[test]
fn start_binds_port_179_starts_every_session_and_publishes_them_idle() {
    let (rig, out) = Rig::start(config(&["10.0.0.2", "10.0.0.3"], &[]));
    assert_eq!(
        out[0],
        Output::Listen(Some(ListenSpec {
            addr: "0.0.0.0:179".parse().unwrap(),
            ttl_security: false,
            passwords: vec![],
        }))
    );
    assert_eq!(
        sessions(&out),
        vec![(ip("10.0.0.2"), None), (ip("10.0.0.3"), None)]
    );
    let status = last_status(&out);
    assert_eq!(status.len(), 2);
    assert!(
        status
            .iter()
            .all(|s| s.state == State::Idle && s.since == rig.t0.wall)
    );
}

/// Calico: a speaker with `listenPort` 0 does not listen (peers are all active).
#[test]
fn port_zero_listens_nowhere() {
    let mut cfg = config(&["10.0.0.2"], &[]);
    cfg.listen_port = 0;
    let (_, out) = Rig::start(cfg);
    assert_eq!(out[0], Output::Listen(None));
}

#[test]
fn a_new_configuration_keeps_unchanged_sessions() {
    let (mut rig, _) = Rig::start(config(&["10.0.0.2", "10.0.0.3"], &[]));
    rig.establish(1, "10.0.0.2", None, 1);
    let out = rig.input(
        2,
        Input::Config(config(&["10.0.0.2", "10.0.0.3"], &["10.244.1.0/26"])),
    );
    assert_eq!(sessions(&out), vec![], "{out:?}");
    assert!(!listens(&out), "the listener was rebound: {out:?}");
    // The established peer gets the new route; the session is the same one (epoch 1).
    assert!(out.iter().any(|o| matches!(o,
        Output::Send { peer, epoch: 1, updates }
            if *peer == ip("10.0.0.2") && updates.iter().any(|u| u.nlri == vec![net("10.244.1.0/26")]))));
}

/// RFC 4486 §4: a peer whose settings changed is restarted with Cease "other
/// configuration change"; one no longer configured is stopped with "peer
/// de-configured"; a new one is started; the others are left alone.
#[test]
fn changed_peers_restart_removed_ones_stop_with_their_cease_codes() {
    let (mut rig, _) = Rig::start(config(&["10.0.0.2", "10.0.0.3", "10.0.0.4"], &[]));
    let mut new = config(&["10.0.0.2", "10.0.0.3", "10.0.0.5"], &[]);
    new.peers[1].hold_time = 30;
    let out = rig.input(1, Input::Config(new));
    assert_eq!(
        sessions(&out),
        vec![
            (ip("10.0.0.3"), Some(err::OTHER_CONFIG_CHANGE)),
            (ip("10.0.0.3"), None),
            (ip("10.0.0.4"), Some(err::PEER_DECONFIGURED)),
            (ip("10.0.0.5"), None),
        ]
    );
    let restarted = out.iter().find_map(|o| match o {
        Output::StartSession(c) if c.address == ip("10.0.0.3") => Some(c.session.hold_time),
        _ => None,
    });
    assert_eq!(restarted, Some(30));
    let peers: Vec<IpAddr> = last_status(&out).iter().map(|s| s.address).collect();
    assert_eq!(peers, vec![ip("10.0.0.2"), ip("10.0.0.3"), ip("10.0.0.5")]);
}

/// A removed peer's routes are withdrawn from Felix at once (no graceful restart for a
/// peer we stopped ourselves).
#[test]
fn a_removed_peers_routes_are_withdrawn_from_felix() {
    let (mut rig, _) = Rig::start(config(&["10.0.0.2"], &[]));
    rig.establish(1, "10.0.0.2", Some(120), 1);
    rig.announce(1, "10.0.0.2", &["10.244.2.0/26"]);
    let out = rig.input(2, Input::Config(config(&[], &[])));
    assert_eq!(
        felix(&out),
        vec![RouteUpdate::Withdrawn(net("10.244.2.0/26"))]
    );
}

/// A new router id, AS or cluster id restarts every session and replaces the RIB:
/// Felix is told to forget every learned route (ours it never had).
#[test]
fn an_identity_change_restarts_everything_and_withdraws_all_learned_routes() {
    let (mut rig, _) = Rig::start(config(&["10.0.0.2", "10.0.0.3"], &["10.244.1.0/26"]));
    rig.establish(1, "10.0.0.2", None, 1);
    rig.announce(1, "10.0.0.2", &["10.244.2.0/26"]);
    let mut new = config(&["10.0.0.2", "10.0.0.3"], &["10.244.1.0/26"]);
    new.router_id = Ipv4Addr::new(10, 0, 0, 9);
    let out = rig.input(2, Input::Config(new));
    assert_eq!(
        sessions(&out),
        vec![
            (ip("10.0.0.2"), Some(err::OTHER_CONFIG_CHANGE)),
            (ip("10.0.0.3"), Some(err::OTHER_CONFIG_CHANGE)),
            (ip("10.0.0.2"), None),
            (ip("10.0.0.3"), None),
        ]
    );
    assert_eq!(
        felix(&out),
        vec![RouteUpdate::Withdrawn(net("10.244.2.0/26"))]
    );
    assert!(listens(&out));
}

/// The listener carries the peers' MD5 keys and TTL security: it is rebound when they
/// change, not when only the routes do.
#[test]
fn the_listener_is_rebound_when_a_password_changes_only() {
    let (mut rig, _) = Rig::start(config(&["10.0.0.2"], &[]));
    let out = rig.input(1, Input::Config(config(&["10.0.0.2"], &["10.244.1.0/26"])));
    assert!(!listens(&out));
    let mut new = config(&["10.0.0.2"], &["10.244.1.0/26"]);
    new.peers[0].password = Some("secret".into());
    let out = rig.input(2, Input::Config(new));
    let spec = out.iter().find_map(|o| match o {
        Output::Listen(Some(s)) => Some(s.clone()),
        _ => None,
    });
    assert_eq!(
        spec.map(|s| s.passwords),
        Some(vec![(ip("10.0.0.2"), "secret".to_string())])
    );
}

#[test]
fn learned_best_routes_go_to_felix() {
    let (mut rig, _) = Rig::start(config(&["10.0.0.2"], &[]));
    rig.establish(1, "10.0.0.2", None, 1);
    let out = rig.announce(1, "10.0.0.2", &["10.244.2.0/26", "10.244.2.64/26"]);
    let mut got = felix(&out);
    got.sort_by_key(|u| format!("{u:?}"));
    assert_eq!(
        got,
        vec![
            best("10.244.2.0/26", "10.0.0.2"),
            best("10.244.2.64/26", "10.0.0.2")
        ]
    );
    let st = last_status(&out);
    assert_eq!(st[0].received, 2);
    assert_eq!(st[0].updates_in, 2);
}

/// RFC 4724 §4.2: the session of a peer that can restart gracefully drops without a
/// NOTIFICATION: its routes stay (stale, nothing withdrawn from Felix), and the stale
/// timer is set to its restart time.
#[test]
fn a_graceful_restart_peer_that_drops_keeps_its_routes_for_its_restart_time() {
    let (mut rig, _) = Rig::start(config(&["10.0.0.2"], &[]));
    rig.establish(1, "10.0.0.2", Some(120), 1);
    rig.announce(1, "10.0.0.2", &["10.244.2.0/26"]);
    let out = rig.down(5, "10.0.0.2", DownReason::ConnectionClosed("reset".into()));
    assert_eq!(felix(&out), vec![], "routes withdrawn: {out:?}");
    assert_eq!(stale_timer(&out), Some(Some(rig.at(125).mono)));
    assert!(rig.core.rib().best(&net("10.244.2.0/26")).is_some());
}

/// The same with the hold timer (the peer went silent): also kept.
#[test]
fn a_hold_timer_expiry_also_keeps_a_graceful_restart_peers_routes() {
    let (mut rig, _) = Rig::start(config(&["10.0.0.2"], &[]));
    rig.establish(1, "10.0.0.2", Some(60), 1);
    rig.announce(1, "10.0.0.2", &["10.244.2.0/26"]);
    let out = rig.down(5, "10.0.0.2", DownReason::HoldTimerExpired);
    assert_eq!(felix(&out), vec![]);
    assert_eq!(stale_timer(&out), Some(Some(rig.at(65).mono)));
}

/// RFC 4724 §4.2 (before RFC 8538): a NOTIFICATION ends the session for good, so a
/// peer's routes go at once even if it can restart gracefully; so do those of a peer
/// without the capability.
#[test]
fn a_notification_or_no_graceful_restart_withdraws_at_once() {
    let (mut rig, _) = Rig::start(config(&["10.0.0.2", "10.0.0.3"], &[]));
    rig.establish(1, "10.0.0.2", Some(120), 1);
    rig.announce(1, "10.0.0.2", &["10.244.2.0/26"]);
    rig.establish(1, "10.0.0.3", None, 1);
    rig.announce(1, "10.0.0.3", &["10.244.3.0/26"]);
    let n = Notification {
        code: err::CEASE,
        subcode: err::ADMIN_SHUTDOWN,
        data: vec![],
    };
    let out = rig.down(5, "10.0.0.2", DownReason::NotificationReceived(n));
    assert_eq!(
        felix(&out),
        vec![RouteUpdate::Withdrawn(net("10.244.2.0/26"))]
    );
    assert_eq!(stale_timer(&out), None, "no stale timer: {out:?}");
    let out = rig.down(5, "10.0.0.3", DownReason::ConnectionClosed("reset".into()));
    assert_eq!(
        felix(&out),
        vec![RouteUpdate::Withdrawn(net("10.244.3.0/26"))]
    );
}

/// RFC 4724 §4.2: when the restarted peer's End-of-RIB comes, what it did not announce
/// again (still stale) is withdrawn; what it did stays, with no flap; the stale timer is
/// cancelled.
#[test]
fn stale_routes_are_swept_at_the_peers_end_of_rib() {
    let (mut rig, _) = Rig::start(config(&["10.0.0.2"], &[]));
    rig.establish(1, "10.0.0.2", Some(120), 1);
    rig.announce(1, "10.0.0.2", &["10.244.2.0/26", "10.244.2.64/26"]);
    rig.down(5, "10.0.0.2", DownReason::ConnectionClosed("reset".into()));
    rig.establish(20, "10.0.0.2", Some(120), 2);
    let out = rig.announce(21, "10.0.0.2", &["10.244.2.0/26"]);
    assert_eq!(
        felix(&out),
        vec![],
        "a route re-announced as it was flapped"
    );
    let out = rig.end_of_rib(22, "10.0.0.2");
    assert_eq!(
        felix(&out),
        vec![RouteUpdate::Withdrawn(net("10.244.2.64/26"))]
    );
    assert_eq!(stale_timer(&out), Some(None));
    assert!(rig.core.rib().best(&net("10.244.2.0/26")).is_some());
}

/// A peer that does not come back within its restart time loses its stale routes when
/// the timer fires (not before).
#[test]
fn stale_routes_are_swept_when_the_restart_time_runs_out() {
    let (mut rig, _) = Rig::start(config(&["10.0.0.2"], &[]));
    rig.establish(1, "10.0.0.2", Some(120), 1);
    rig.announce(1, "10.0.0.2", &["10.244.2.0/26"]);
    rig.down(5, "10.0.0.2", DownReason::ConnectionClosed("reset".into()));
    let out = rig.input(124, Input::StaleTimer);
    assert_eq!(felix(&out), vec![], "swept early");
    let out = rig.input(125, Input::StaleTimer);
    assert_eq!(
        felix(&out),
        vec![RouteUpdate::Withdrawn(net("10.244.2.0/26"))]
    );
    assert_eq!(stale_timer(&out), Some(None));
}

/// A peer that comes up gets our whole table, then End-of-RIB (RFC 4724 §2), in at
/// most `SEND_WINDOW` batches not yet drained; each `Drained` lets one more go.
#[test]
fn a_peer_that_comes_up_gets_the_table_in_windowed_batches_then_end_of_rib() {
    let n = 2 * EXPORT_BATCH + 10;
    let export: Vec<String> = (0..n)
        .map(|i| format!("10.244.{}.{}/32", i / 256, i % 256))
        .collect();
    let export: Vec<&str> = export.iter().map(String::as_str).collect();
    let (mut rig, _) = Rig::start(config(&["10.0.0.2"], &export));
    let out = rig.establish(1, "10.0.0.2", None, 7);
    let first = sends(&out, "10.0.0.2");
    assert_eq!(first.len(), SEND_WINDOW, "{} sends", first.len());
    assert!(!has_end_of_rib(&first));
    assert!(
        out.iter()
            .all(|o| !matches!(o, Output::Send { epoch, .. } if *epoch != 7))
    );
    let drained = |epoch| SessionEvent::Drained {
        peer: ip("10.0.0.2"),
        epoch,
        updates: 1,
    };
    // A Drained of an older session frees nothing.
    assert_eq!(sends(&rig.event(2, drained(6)), "10.0.0.2").len(), 0);
    let rest = sends(&rig.event(2, drained(7)), "10.0.0.2");
    assert_eq!(rest.len(), 1);
    let eor = sends(&rig.event(2, drained(7)), "10.0.0.2");
    assert!(has_end_of_rib(&eor), "{eor:?}");
    let all: Vec<Vec<Update>> = first.into_iter().chain(rest).collect();
    assert_eq!(announced(&all).len(), n);
    let st = last_status(&rig.input(3, Input::Tick { ended: vec![] }));
    assert_eq!(st[0].advertised, n);
}

/// A route learned from one iBGP peer is not sent to another (no reflection without
/// `rr_client`), but our own are.
#[test]
fn exports_follow_the_rules_to_each_established_peer() {
    let (mut rig, _) = Rig::start(config(&["10.0.0.2", "10.0.0.3"], &[]));
    rig.establish(1, "10.0.0.2", None, 1);
    rig.establish(1, "10.0.0.3", None, 1);
    let out = rig.announce(2, "10.0.0.2", &["10.244.2.0/26"]);
    assert_eq!(announced(&sends(&out, "10.0.0.3")), vec![]);
    let out = rig.input(
        3,
        Input::Config(config(&["10.0.0.2", "10.0.0.3"], &["10.244.1.0/26"])),
    );
    assert_eq!(
        announced(&sends(&out, "10.0.0.3")),
        vec![net("10.244.1.0/26")]
    );
    assert_eq!(
        announced(&sends(&out, "10.0.0.2")),
        vec![net("10.244.1.0/26")]
    );
    // Withdrawn when no longer exported (once the window has room again).
    for peer in ["10.0.0.2", "10.0.0.3"] {
        for _ in 0..SEND_WINDOW {
            rig.drained(4, peer, 1);
        }
    }
    let out = rig.input(4, Input::Config(config(&["10.0.0.2", "10.0.0.3"], &[])));
    let withdrawn: Vec<IpNet> = sends(&out, "10.0.0.3")
        .iter()
        .flatten()
        .flat_map(|u| u.withdrawn.clone())
        .collect();
    assert_eq!(withdrawn, vec![net("10.244.1.0/26")]);
}

/// RFC 2918 §4: a ROUTE-REFRESH resends what the peer has (even unchanged), then
/// End-of-RIB; before its session is up, nothing.
#[test]
fn a_route_refresh_resends_the_table_then_end_of_rib() {
    let (mut rig, _) = Rig::start(config(&["10.0.0.2"], &["10.244.1.0/26"]));
    let refresh = SessionEvent::RouteRefresh {
        peer: ip("10.0.0.2"),
        request: RouteRefresh {
            family: IPV4_UNICAST,
            subtype: 0,
        },
    };
    assert_eq!(sends(&rig.event(1, refresh.clone()), "10.0.0.2").len(), 0);
    rig.establish(1, "10.0.0.2", None, 1);
    for _ in 0..SEND_WINDOW {
        rig.drained(1, "10.0.0.2", 1);
    }
    let out = rig.event(2, refresh);
    let batches = sends(&out, "10.0.0.2");
    assert_eq!(announced(&batches), vec![net("10.244.1.0/26")]);
    assert!(has_end_of_rib(&batches));
}

/// Felix hears "in sync" once every peer has sent End-of-RIB (then every session is
/// told our restart is over), and only once.
#[test]
fn felix_is_in_sync_once_every_peer_sent_end_of_rib() {
    let (mut rig, _) = Rig::start(config(&["10.0.0.2", "10.0.0.3"], &[]));
    rig.establish(1, "10.0.0.2", None, 1);
    rig.establish(1, "10.0.0.3", None, 1);
    rig.end_of_rib(2, "10.0.0.2");
    let out = rig.input(2, Input::Tick { ended: vec![] });
    assert_eq!(felix(&out), vec![]);
    rig.end_of_rib(3, "10.0.0.3");
    let out = rig.input(3, Input::Tick { ended: vec![] });
    assert_eq!(felix(&out), vec![RouteUpdate::InSync]);
    let restarted: Vec<&Output> = out
        .iter()
        .filter(|o| matches!(o, Output::Restarted(_)))
        .collect();
    assert_eq!(
        restarted,
        vec![
            &Output::Restarted(ip("10.0.0.2")),
            &Output::Restarted(ip("10.0.0.3"))
        ]
    );
    assert_eq!(felix(&rig.input(4, Input::Tick { ended: vec![] })), vec![]);
}

/// Calico's `bird -R`: a peer that never sends End-of-RIB does not hold Felix up for
/// more than 10 s.
#[test]
fn felix_is_in_sync_after_ten_seconds_without_end_of_rib() {
    let (mut rig, _) = Rig::start(config(&["10.0.0.2"], &[]));
    assert_eq!(felix(&rig.input(9, Input::Tick { ended: vec![] })), vec![]);
    assert_eq!(
        felix(&rig.input(10, Input::Tick { ended: vec![] })),
        vec![RouteUpdate::InSync]
    );
}

/// Until we are in sync, sessions start as restarting (R and F bits, so peers keep our
/// routes); afterwards without them.
#[test]
fn sessions_announce_our_restart_only_until_in_sync() {
    let restarting = |out: &[Output]| {
        out.iter().find_map(|o| match o {
            Output::StartSession(c) => c.session.graceful_restart.as_ref().map(|g| g.restarting),
            _ => None,
        })
    };
    let (mut rig, out) = Rig::start(config(&["10.0.0.2"], &[]));
    assert_eq!(restarting(&out), Some(true));
    rig.input(10, Input::Tick { ended: vec![] });
    let out = rig.input(11, Input::Config(config(&["10.0.0.2", "10.0.0.3"], &[])));
    assert_eq!(restarting(&out), Some(false));
}

/// A session task that ended on its own (a panic) is started again, its routes
/// withdrawn (its session is gone), and its status says why.
#[test]
fn a_session_task_that_ended_is_restarted_and_its_routes_withdrawn() {
    let (mut rig, _) = Rig::start(config(&["10.0.0.2", "10.0.0.3"], &[]));
    rig.establish(1, "10.0.0.2", Some(120), 1);
    rig.announce(1, "10.0.0.2", &["10.244.2.0/26"]);
    rig.establish(1, "10.0.0.3", None, 1);
    rig.announce(1, "10.0.0.3", &["10.244.3.0/26"]);
    let out = rig.input(
        2,
        Input::Tick {
            ended: vec![ip("10.0.0.2")],
        },
    );
    assert_eq!(sessions(&out), vec![(ip("10.0.0.2"), None)]);
    assert_eq!(
        felix(&out)
            .into_iter()
            .filter(|u| *u != RouteUpdate::InSync)
            .collect::<Vec<_>>(),
        vec![RouteUpdate::Withdrawn(net("10.244.2.0/26"))]
    );
    let st = last_status(&out);
    assert_eq!(st[0].state, State::Idle);
    assert_eq!(st[0].reason, "session task ended unexpectedly; restarted");
    assert_eq!(st[1].state, State::Established);
}

/// The status says when the state changed (the time of the input) and why a session
/// is not up.
#[test]
fn state_changes_are_published_with_their_time_and_reason() {
    let (mut rig, _) = Rig::start(config(&["10.0.0.2"], &[]));
    let out = rig.event(
        7,
        SessionEvent::State {
            peer: ip("10.0.0.2"),
            state: State::Active,
            last_error: Some(DownReason::ConnectFailed("refused".into())),
        },
    );
    let st = &last_status(&out)[0];
    assert_eq!(st.state, State::Active);
    assert_eq!(st.since, rig.at(7).wall);
    assert_eq!(st.reason, "connect failed: refused");
    assert_eq!(st.established_at, None);
    let out = rig.establish(9, "10.0.0.2", None, 1);
    let st = &last_status(&out)[0];
    assert_eq!(st.established_at, Some(rig.at(9).wall));
    assert_eq!(st.reason, "");
}
