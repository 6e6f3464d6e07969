//! The decisions of Felix's loop, one test per rule, on the sans-IO core: no root, no
//! clock (instants are built from one base and durations), no kernel.

use std::sync::Arc;

use super::*;
use crate::bgp::LearnedRoute;
use crate::datastore::KeyValue;
use crate::datastore::syncer::{self, SyncStatus, Update, UpdateType};
use crate::felix::calc::CalcProblem;
use crate::felix::routes::RouteReason;
use crate::netlink::{NetlinkError, WriteFailure};

const RES: &str = "/calico/resources/v3/projectcalico.org";

fn put(key: &str, json: &str) -> Input {
    let kv = KeyValue {
        key: key.into(),
        value: json.as_bytes().to_vec(),
        mod_revision: 1,
        create_revision: 1,
    };
    let value = syncer::decode(&kv)
        .expect("a modelled key")
        .expect("a valid value");
    Input::Datastore(SyncerEvent::Update(Update {
        key: key.into(),
        update_type: UpdateType::New,
        value: Some(Arc::new(value)),
        revision: 1,
    }))
}

fn in_sync() -> Input {
    Input::Datastore(SyncerEvent::Status(SyncStatus::InSync))
}

fn pool(name: &str, cidr: &str, vxlan: &str) -> Input {
    put(
        &format!("{RES}/ippools/{name}"),
        &format!(
            r#"{{"kind":"IPPool","apiVersion":"projectcalico.org/v3","metadata":{{"name":"{name}"}},"spec":{{"cidr":"{cidr}","vxlanMode":"{vxlan}","ipipMode":"Never","natOutgoing":true,"nodeSelector":"all()"}}}}"#
        ),
    )
}

fn node(name: &str, ip: &str) -> Input {
    put(
        &format!("{RES}/nodes/{name}"),
        &format!(
            r#"{{"kind":"Node","apiVersion":"projectcalico.org/v3","metadata":{{"name":"{name}"}},"spec":{{"bgp":{{"ipv4Address":"{ip}/24"}}}}}}"#
        ),
    )
}

fn felix_config(spec: &str) -> Input {
    put(
        &format!("{RES}/felixconfigurations/default"),
        &format!(
            r#"{{"kind":"FelixConfiguration","apiVersion":"projectcalico.org/v3","metadata":{{"name":"default"}},"spec":{spec}}}"#
        ),
    )
}

fn best(prefix: &str, next_hop: &str) -> RouteUpdate {
    RouteUpdate::Best(LearnedRoute {
        prefix: prefix.parse().unwrap(),
        next_hop: next_hop.parse().unwrap(),
    })
}

fn link(index: u32, name: &str) -> Input {
    let mut t = Touched::default();
    t.links.insert(index, Some(name.into()));
    Input::Kernel(t)
}

/// A clock of the test's own: `ms(n)` is `n` ms after the core started.
struct Clock(Instant);

impl Clock {
    fn ms(&self, n: u64) -> Instant {
        self.0 + Duration::from_millis(n)
    }
}

fn start() -> (Core, Clock) {
    let t0 = Instant::now();
    (Core::new("node-a", t0), Clock(t0))
}

/// The outputs that act on the dataplane (timers and health left out).
fn actions(out: &[Output]) -> Vec<&Output> {
    out.iter()
        .filter(|o| {
            matches!(
                o,
                Output::FullPass(_) | Output::Repair(_) | Output::ApplyChanges { .. }
            )
        })
        .collect()
}

fn full_pass(out: &[Output]) -> Option<&Pass> {
    out.iter().find_map(|o| match o {
        Output::FullPass(p) => Some(p),
        _ => None,
    })
}

fn health_of(out: &[Output]) -> Option<&Health> {
    out.iter().find_map(|o| match o {
        Output::Health(h) => Some(h),
        _ => None,
    })
}

fn timer(out: &[Output]) -> Option<Instant> {
    out.iter().find_map(|o| match o {
        Output::SetTimer(t) => Some(*t),
        _ => None,
    })
}

fn done(uplink: Option<u32>) -> Input {
    Input::PassDone {
        uplink,
        problems: Vec::new(),
    }
}

/// A core in sync whose first full pass is done (uplink 2), with a pool and this node.
fn synced() -> (Core, Clock) {
    let (mut c, clock) = start();
    c.handle(clock.ms(0), pool("p", "10.244.0.0/16", "Never"));
    c.handle(clock.ms(0), node("node-a", "10.0.0.1"));
    let out = c.handle(clock.ms(0), in_sync());
    assert!(full_pass(&out).is_some(), "{out:?}");
    c.handle(clock.ms(1), done(Some(2)));
    (c, clock)
}

#[test]
fn nothing_is_programmed_before_the_datastore_is_in_sync() {
    let (mut c, clock) = start();
    let out = c.handle(clock.ms(0), pool("p", "10.244.0.0/16", "Never"));
    assert!(actions(&out).is_empty(), "{out:?}");
    let out = c.handle(
        clock.ms(0),
        Input::Bgp(vec![best("10.9.0.0/24", "10.0.0.2")]),
    );
    assert!(actions(&out).is_empty(), "{out:?}");
    // Even the resync timer waits for the datastore.
    let out = c.handle(clock.ms(90_000), Input::Timer);
    assert!(actions(&out).is_empty(), "{out:?}");
}

#[test]
fn the_first_time_in_sync_a_full_pass_runs_even_with_nothing_changed() {
    let (mut c, clock) = start();
    let out = c.handle(clock.ms(0), in_sync());
    let pass = full_pass(&out).expect("a full pass");
    assert!(pass.desired.routes.is_empty());
    // Its result: ready.
    let out = c.handle(clock.ms(5), done(None));
    assert_eq!(health_of(&out), Some(&Health::Ready));
    // In sync again (a resync) with nothing changed: nothing to do.
    let out = c.handle(clock.ms(6), in_sync());
    assert!(actions(&out).is_empty(), "{out:?}");
}

#[test]
fn a_full_pass_carries_what_the_executor_needs() {
    let (mut c, clock) = start();
    c.handle(
        clock.ms(0),
        felix_config(r#"{"vxlanMTU":1400,"interfacePrefix":"pod"}"#),
    );
    c.handle(clock.ms(0), pool("p", "10.244.0.0/16", "Never"));
    c.handle(clock.ms(0), node("node-a", "10.0.0.1"));
    let out = c.handle(clock.ms(0), in_sync());
    let pass = full_pass(&out).expect("a full pass");
    assert_eq!(pass.prefix, "pod");
    assert_eq!(pass.node_ip, Some("10.0.0.1".parse().unwrap()));
    assert_eq!((pass.vxlan_mtu, pass.ipip_mtu), (Some(1400), None));
    // BGP has not delivered its table: the BGP-routed pool's routes stay.
    assert_eq!(pass.keep, vec!["10.244.0.0/16".parse::<IpNet>().unwrap()]);
}

#[test]
fn a_datastore_change_makes_a_full_pass_and_one_that_changes_nothing_does_not() {
    let (mut c, clock) = synced();
    let out = c.handle(clock.ms(10), pool("q", "10.245.0.0/16", "Always"));
    assert!(full_pass(&out).is_some(), "{out:?}");
    c.handle(clock.ms(11), done(Some(2)));
    // A FelixConfiguration of another node changes nothing of ours.
    let other = put(
        &format!("{RES}/felixconfigurations/node.node-b"),
        r#"{"kind":"FelixConfiguration","apiVersion":"projectcalico.org/v3","metadata":{"name":"node.node-b"},"spec":{}}"#,
    );
    let out = c.handle(clock.ms(12), other);
    assert!(actions(&out).is_empty(), "{out:?}");
}

#[test]
fn queued_datastore_events_are_folded_before_one_decision() {
    let (mut c, clock) = synced();
    let mut out = c.fold(clock.ms(10), pool("q", "10.245.0.0/16", "Never"));
    out.extend(c.fold(clock.ms(10), pool("r", "10.246.0.0/16", "Never")));
    assert!(actions(&out).is_empty(), "fold alone decides nothing");
    let out = c.decide(clock.ms(10));
    assert_eq!(actions(&out).len(), 1, "{out:?}");
    let pass = full_pass(&out).unwrap();
    assert_eq!(
        pass.keep.len(),
        3,
        "both pools are in the one pass: {pass:?}"
    );
}

#[test]
fn bgp_changes_go_straight_to_the_kernel_against_the_last_pass() {
    let (mut c, clock) = synced();
    let out = c.handle(
        clock.ms(10),
        Input::Bgp(vec![best("10.244.1.0/26", "10.0.0.2")]),
    );
    let [Output::ApplyChanges { changes, uplink }] = &actions(&out)[..] else {
        panic!("{out:?}");
    };
    assert_eq!(*uplink, Some(2), "the last pass's uplink");
    assert_eq!(changes.len(), 1);
    let (p, old, new) = &changes[0];
    assert_eq!(p.to_string(), "10.244.1.0/26");
    assert!(old.is_none() && new.is_some(), "{changes:?}");
    c.handle(clock.ms(11), Input::ChangesApplied(Vec::new()));
    // The same route again changes nothing; a withdrawal removes it.
    let out = c.handle(
        clock.ms(12),
        Input::Bgp(vec![best("10.244.1.0/26", "10.0.0.2")]),
    );
    assert!(actions(&out).is_empty(), "{out:?}");
    let out = c.handle(
        clock.ms(13),
        Input::Bgp(vec![RouteUpdate::Withdrawn(
            "10.244.1.0/26".parse().unwrap(),
        )]),
    );
    let [Output::ApplyChanges { changes, .. }] = &actions(&out)[..] else {
        panic!("{out:?}");
    };
    assert!(changes[0].2.is_none(), "{changes:?}");
}

#[test]
fn a_due_full_pass_takes_bgp_changes_with_it() {
    let (mut c, clock) = synced();
    c.fold(clock.ms(10), pool("q", "10.245.0.0/16", "Never"));
    c.fold(
        clock.ms(10),
        Input::Bgp(vec![best("10.244.1.0/26", "10.0.0.2")]),
    );
    let out = c.decide(clock.ms(10));
    let pass = full_pass(&out).expect("a full pass, not changes");
    assert!(
        pass.desired
            .routes
            .contains_key(&"10.244.1.0/26".parse().unwrap())
    );
    assert_eq!(actions(&out).len(), 1);
}

#[test]
fn bgps_first_in_sync_makes_a_full_pass_that_keeps_nothing() {
    let (mut c, clock) = synced();
    let out = c.handle(clock.ms(10), Input::Bgp(vec![RouteUpdate::InSync]));
    let pass = full_pass(&out).expect("a full pass");
    assert!(pass.keep.is_empty(), "{pass:?}");
    c.handle(clock.ms(11), done(Some(2)));
    let out = c.handle(clock.ms(12), Input::Bgp(vec![RouteUpdate::InSync]));
    assert!(actions(&out).is_empty(), "only the first: {out:?}");
}

#[test]
fn without_a_speaker_nothing_is_kept_for_bgp() {
    let (mut c, clock) = synced();
    assert!(c.bgp_open());
    c.handle(clock.ms(10), Input::BgpClosed);
    assert!(!c.bgp_open());
    let out = c.handle(clock.ms(11), pool("q", "10.245.0.0/16", "Never"));
    assert!(full_pass(&out).unwrap().keep.is_empty());
}

#[test]
fn kernel_events_are_debounced_then_a_workload_interface_is_repaired() {
    let (mut c, clock) = synced();
    let out = c.handle(clock.ms(100), link(7, "cali1234"));
    assert!(actions(&out).is_empty(), "{out:?}");
    assert_eq!(timer(&out), Some(clock.ms(200)));
    // A second event within the debounce does not push the deadline.
    let mut t = Touched::default();
    t.route_ifaces.insert(5);
    let out = c.handle(clock.ms(150), Input::Kernel(t));
    assert!(timer(&out).is_none() && actions(&out).is_empty(), "{out:?}");
    let out = c.handle(clock.ms(200), Input::Timer);
    let [Output::Repair(r)] = &actions(&out)[..] else {
        panic!("{out:?}");
    };
    assert_eq!(r.scopes, vec![Some(5), Some(7)]);
    assert_eq!(r.workloads, vec!["cali1234".to_string()]);
    assert_eq!((r.uplink, r.prefix.as_str()), (Some(2), "cali"));
    assert_eq!(r.keep.len(), 1, "BGP not in sync: its pool kept");
    // No problem: readiness unchanged, nothing more to do.
    let out = c.handle(clock.ms(210), Input::Repaired(Vec::new()));
    assert!(
        out.iter().all(|o| matches!(o, Output::SetTimer(_))),
        "{out:?}"
    );
}

#[test]
fn interface_less_routes_touched_repair_the_whole_table() {
    let (mut c, clock) = synced();
    let t = Touched {
        routes: true,
        ..Default::default()
    };
    c.handle(clock.ms(100), Input::Kernel(t));
    let out = c.handle(clock.ms(200), Input::Timer);
    let [Output::Repair(r)] = &actions(&out)[..] else {
        panic!("{out:?}");
    };
    assert_eq!(r.scopes, vec![None]);
    assert!(r.workloads.is_empty());
}

#[test]
fn another_link_or_lost_notifications_make_a_full_pass_instead_of_a_repair() {
    for input in [
        link(2, "eth0"),
        Input::Kernel({
            let mut t = Touched::default();
            t.links.insert(9, None);
            t
        }),
        Input::NotificationsLost,
    ] {
        let (mut c, clock) = synced();
        let out = c.handle(clock.ms(100), input);
        assert!(actions(&out).is_empty(), "debounced: {out:?}");
        let out = c.handle(clock.ms(200), Input::Timer);
        assert!(full_pass(&out).is_some(), "{out:?}");
    }
}

#[test]
fn a_timer_before_the_debounce_ends_does_nothing() {
    let (mut c, clock) = synced();
    c.handle(clock.ms(100), link(7, "cali1"));
    let out = c.handle(clock.ms(150), Input::Timer);
    assert!(actions(&out).is_empty(), "{out:?}");
}

#[test]
fn refused_changes_make_felix_not_ready_and_read_the_kernel_back() {
    for input in [
        Input::WriterFailed(Problem::Refused(WriteFailure::Refused {
            prefix: "10.9.0.0/24".parse().unwrap(),
            errno: libc::EEXIST,
        })),
        Input::ChangesApplied(vec![unreachable("10.9.0.0/24")]),
        Input::Repaired(vec![no_interface("cali1")]),
    ] {
        let (mut c, clock) = synced();
        let out = c.handle(clock.ms(100), input);
        let Some(Health::NotReady(why)) = health_of(&out) else {
            panic!("{out:?}");
        };
        assert!(
            why.contains("10.9.0.0/24") || why.contains("cali1"),
            "{why}"
        );
        assert!(actions(&out).is_empty(), "{out:?}");
        assert_eq!(timer(&out), Some(clock.ms(200)));
        let out = c.handle(clock.ms(200), Input::Timer);
        assert!(full_pass(&out).is_some(), "{out:?}");
        let out = c.handle(clock.ms(210), done(Some(2)));
        assert_eq!(
            health_of(&out),
            Some(&Health::Ready),
            "the pass says all is well"
        );
    }
}

#[test]
fn a_pass_with_problems_is_not_ready_with_all_of_them() {
    let (mut c, clock) = start();
    c.handle(clock.ms(0), in_sync());
    let out = c.handle(
        clock.ms(1),
        Input::PassDone {
            uplink: None,
            problems: vec![
                Problem::Calc(CalcProblem::NotACidr {
                    interface: "w".into(),
                    entry: "bad".into(),
                }),
                unreachable("10.9.0.0/24"),
            ],
        },
    );
    assert_eq!(
        health_of(&out),
        Some(&Health::NotReady(
            "workload w: ipNetworks entry \"bad\" is not a CIDR; \
             10.9.0.0/24: Network is unreachable (os error 101)"
                .into()
        ))
    );
    // Problems of a full pass are retried at the next one, not sooner.
    assert!(actions(&out).is_empty());
}

#[test]
fn the_route_refresh_interval_makes_a_full_pass() {
    let (mut c, clock) = synced();
    assert_eq!(c.deadline(), clock.ms(90_000));
    let out = c.handle(clock.ms(90_000), Input::Timer);
    assert!(full_pass(&out).is_some(), "{out:?}");
    assert_eq!(timer(&out), Some(clock.ms(180_000)));
    c.handle(clock.ms(90_010), done(Some(2)));
    // The interval in force when the timer fires sets the next one.
    let out = c.handle(
        clock.ms(100_000),
        felix_config(r#"{"routeRefreshInterval":"10s"}"#),
    );
    c.handle(clock.ms(100_001), done(Some(2)));
    assert!(full_pass(&out).is_some());
    c.handle(clock.ms(180_000), Input::Timer);
    c.handle(clock.ms(180_001), done(Some(2)));
    assert_eq!(c.deadline(), clock.ms(190_000));
}

/// `routeRefreshInterval: 0s` turns the periodic pass off (Calico); the setting is looked
/// at again after 90 s, so turning it back on takes effect.
#[test]
fn a_zero_route_refresh_interval_turns_the_periodic_pass_off() {
    let (mut c, clock) = synced();
    c.handle(
        clock.ms(10),
        felix_config(r#"{"routeRefreshInterval":"0s"}"#),
    );
    c.handle(clock.ms(11), done(Some(2)));
    let out = c.handle(clock.ms(90_000), Input::Timer);
    assert!(full_pass(&out).is_none(), "{out:?}");
    assert_eq!(c.deadline(), clock.ms(180_000));
    c.handle(
        clock.ms(100_000),
        felix_config(r#"{"routeRefreshInterval":"10s"}"#),
    );
    c.handle(clock.ms(100_001), done(Some(2)));
    let out = c.handle(clock.ms(180_000), Input::Timer);
    assert!(full_pass(&out).is_some(), "{out:?}");
    assert_eq!(c.deadline(), clock.ms(190_000));
}

#[test]
fn the_ipip_module_missing_is_logged_as_an_error_once() {
    let (mut c, clock) = synced();
    let missing = || Input::PassDone {
        uplink: None,
        problems: vec![Problem::Tunnel(TunnelError::NoIpip(NetlinkError::kernel(
            "create tunl0",
            libc::EOPNOTSUPP,
        )))],
    };
    let logged = |out: &[Output]| out.iter().any(|o| matches!(o, Output::LogError(_)));
    c.handle(clock.ms(10), pool("q", "10.245.0.0/16", "Never"));
    assert!(logged(&c.handle(clock.ms(11), missing())));
    c.handle(clock.ms(12), pool("r", "10.246.0.0/16", "Never"));
    let out = c.handle(clock.ms(13), missing());
    assert!(!logged(&out), "{out:?}");
    assert!(matches!(health_of(&out), Some(Health::NotReady(_))));
}

#[test]
fn nothing_starts_while_an_execution_is_out() {
    let (mut c, clock) = start();
    let out = c.handle(clock.ms(0), in_sync());
    assert!(full_pass(&out).is_some());
    let out = c.handle(clock.ms(1), pool("q", "10.245.0.0/16", "Never"));
    assert!(actions(&out).is_empty(), "{out:?}");
    // Its result lets the pending change go.
    let out = c.handle(clock.ms(2), done(None));
    assert!(full_pass(&out).is_some(), "{out:?}");
}

#[test]
fn a_repair_before_any_pass_becomes_a_full_pass() {
    let (mut c, clock) = start();
    c.handle(clock.ms(0), link(7, "cali1"));
    let out = c.handle(clock.ms(100), Input::Timer);
    assert!(actions(&out).is_empty(), "not in sync: {out:?}");
    let out = c.handle(clock.ms(110), in_sync());
    assert!(full_pass(&out).is_some(), "{out:?}");
}

#[test]
fn the_deadline_comes_before_the_action_whose_result_may_move_it() {
    let (mut c, clock) = synced();
    c.handle(clock.ms(100), link(7, "cali1"));
    let out = c.handle(clock.ms(200), Input::Timer);
    assert!(
        matches!(&out[..], [Output::SetTimer(_), Output::Repair(_)]),
        "{out:?}"
    );
    // The repair fails: a read-back is due, and its deadline is the last one given.
    let out = c.handle(clock.ms(210), Input::Repaired(vec![no_interface("cali1")]));
    assert_eq!(timer(&out), Some(clock.ms(310)));
    assert_eq!(c.deadline(), clock.ms(310));
}

/// A route the kernel refused (ENETUNREACH).
fn unreachable(prefix: &str) -> Problem {
    Problem::Route {
        prefix: prefix.parse().unwrap(),
        reason: RouteReason::Refused {
            errno: libc::ENETUNREACH,
        },
    }
}

/// A workload's route whose interface is gone.
fn no_interface(name: &str) -> Problem {
    Problem::Route {
        prefix: "10.0.0.5/32".parse().unwrap(),
        reason: RouteReason::NoInterface(name.into()),
    }
}

// Policy (issue 17).

fn gnp(name: &str, spec: &str) -> Input {
    put(
        &format!("{RES}/globalnetworkpolicies/{name}"),
        &format!(
            r#"{{"kind":"GlobalNetworkPolicy","apiVersion":"projectcalico.org/v3","metadata":{{"name":"{name}"}},"spec":{spec}}}"#
        ),
    )
}

fn local_wep(name: &str, ip: &str, labels: &str) -> Input {
    put(
        &format!("{RES}/workloadendpoints/ns1/{name}"),
        &format!(
            r#"{{"kind":"WorkloadEndpoint","apiVersion":"projectcalico.org/v3","metadata":{{"name":"{name}","namespace":"ns1","labels":{labels}}},"spec":{{"orchestrator":"k8s","node":"node-a","pod":"{name}","endpoint":"eth0","interfaceName":"cali-{name}","ipNetworks":["{ip}"]}}}}"#
        ),
    )
}

fn policy_apply(out: &[Output]) -> Option<(&Arc<crate::felix::policy::PolicyDataplane>, &Delta)> {
    out.iter().find_map(|o| match o {
        Output::ApplyPolicy { dp, delta } => Some((dp, delta)),
        _ => None,
    })
}

#[test]
fn policy_is_not_programmed_before_in_sync_and_the_first_pass_carries_it_whole() {
    let (mut c, clock) = start();
    let out = c.handle(
        clock.ms(0),
        local_wep("a", "10.244.0.2/32", r#"{"app":"x"}"#),
    );
    assert!(
        actions(&out).is_empty() && policy_apply(&out).is_none(),
        "{out:?}"
    );
    let out = c.handle(
        clock.ms(0),
        gnp("p", r#"{"selector":"app == 'x'","types":["Ingress"]}"#),
    );
    assert!(policy_apply(&out).is_none(), "{out:?}");
    let out = c.handle(clock.ms(0), in_sync());
    let pass = full_pass(&out).expect("the first pass");
    assert_eq!(
        pass.policy.endpoints["cali-a"].ingress[0].policies,
        vec!["gnp/p"]
    );
    assert!(policy_apply(&out).is_none(), "the pass writes it: {out:?}");
}

#[test]
fn a_policy_only_change_applies_a_delta_and_makes_no_full_pass() {
    let (mut c, clock) = synced();
    let out = c.handle(
        clock.ms(10),
        local_wep("a", "10.244.0.2/32", r#"{"app":"x"}"#),
    );
    c.handle(clock.ms(11), done(Some(2)));
    assert!(
        full_pass(&out).is_some(),
        "a new endpoint is a routing change"
    );
    let out = c.handle(
        clock.ms(12),
        gnp("p", r#"{"selector":"app == 'x'","types":["Ingress"],"ingress":[{"action":"Allow","source":{"selector":"app == 'x'"}}]}"#),
    );
    assert!(full_pass(&out).is_none(), "{out:?}");
    let (dp, delta) = policy_apply(&out).expect("a policy apply");
    assert!(!delta.full);
    assert_eq!(delta.policies, ["gnp/p".to_string()].into());
    assert_eq!(delta.endpoints, ["cali-a".to_string()].into());
    assert_eq!(dp.policies.len(), 1);
    // One at a time: nothing more until it is done.
    let out = c.handle(
        clock.ms(13),
        local_wep("a", "10.244.0.2/32", r#"{"app":"y"}"#),
    );
    assert!(
        policy_apply(&out).is_none() && full_pass(&out).is_none(),
        "{out:?}"
    );
    let out = c.handle(clock.ms(14), Input::PolicyApplied(Vec::new()));
    // The relabel: only a delta (the endpoint leaves the policy and the set).
    assert!(
        full_pass(&out).is_none(),
        "a label change is policy-only: {out:?}"
    );
    let (dp, delta) = policy_apply(&out).expect("the relabel's apply");
    assert!(dp.endpoints["cali-a"].ingress.is_empty());
    assert_eq!(delta.endpoints, ["cali-a".to_string()].into());
    assert!(
        delta.policies.contains("gnp/p"),
        "p is no longer programmed"
    );
    c.handle(clock.ms(15), Input::PolicyApplied(Vec::new()));
    // The same again changes nothing.
    let out = c.handle(
        clock.ms(16),
        local_wep("a", "10.244.0.2/32", r#"{"app":"y"}"#),
    );
    assert!(
        actions(&out).is_empty() && policy_apply(&out).is_none(),
        "{out:?}"
    );
}

/// A full pass carries the policy's delta since the last write (a pod added: its
/// endpoint), so that the executor can write only that; after a failed policy write the
/// delta is full.
#[test]
fn a_full_pass_carries_the_policy_delta_since_the_last_write() {
    let (mut c, clock) = synced();
    let out = c.handle(
        clock.ms(10),
        local_wep("a", "10.244.0.2/32", r#"{"app":"x"}"#),
    );
    let pass = full_pass(&out).expect("a new endpoint is a routing change");
    assert!(!pass.policy_delta.full);
    assert_eq!(pass.policy_delta.endpoints, ["cali-a".to_string()].into());
    c.handle(clock.ms(11), done(Some(2)));
    let out = c.handle(
        clock.ms(12),
        gnp(
            "p",
            r#"{"selector":"app == 'x'","ingress":[{"action":"Allow"}]}"#,
        ),
    );
    assert!(policy_apply(&out).is_some());
    c.handle(
        clock.ms(13),
        Input::PolicyApplied(vec![Problem::Route {
            prefix: "10.244.0.2/32".parse().unwrap(),
            reason: RouteReason::Refused { errno: 1 },
        }]),
    );
    let out = c.handle(
        clock.ms(14),
        local_wep("b", "10.244.0.3/32", r#"{"app":"y"}"#),
    );
    let pass = full_pass(&out).expect("a routing change");
    assert!(pass.policy_delta.full, "the kernel's tables are unknown");
}

/// A policy change waits for no repair: with a repair of touched interfaces due as well,
/// the policy delta goes first (a busy node's link events must not hold a label change
/// back), then the repair.
#[test]
fn a_policy_change_goes_before_a_due_repair() {
    let (mut c, clock) = synced();
    c.handle(
        clock.ms(10),
        local_wep("a", "10.244.0.2/32", r#"{"app":"x"}"#),
    );
    c.handle(clock.ms(11), done(Some(2)));
    c.handle(clock.ms(12), link(7, "cali1234"));
    let out = c.handle(clock.ms(112), Input::Timer);
    assert!(matches!(actions(&out)[..], [Output::Repair(_)]), "{out:?}");
    // While the repair runs, a policy and another link event arrive.
    c.handle(
        clock.ms(113),
        gnp(
            "p",
            r#"{"selector":"app == 'x'","ingress":[{"action":"Allow"}]}"#,
        ),
    );
    c.handle(clock.ms(114), link(8, "cali5678"));
    c.handle(clock.ms(214), Input::Timer);
    let out = c.handle(clock.ms(215), Input::Repaired(Vec::new()));
    let (_, delta) = policy_apply(&out).expect("the policy first");
    assert_eq!(delta.policies, ["gnp/p".to_string()].into());
    let out = c.handle(clock.ms(216), Input::PolicyApplied(Vec::new()));
    let [Output::Repair(r)] = &actions(&out)[..] else {
        panic!("then the repair: {out:?}");
    };
    assert_eq!(r.workloads, vec!["cali5678".to_string()]);
}

#[test]
fn a_failed_policy_apply_makes_felix_not_ready_and_the_next_write_whole() {
    let (mut c, clock) = synced();
    c.handle(
        clock.ms(10),
        local_wep("a", "10.244.0.2/32", r#"{"app":"x"}"#),
    );
    c.handle(clock.ms(11), done(Some(2)));
    let out = c.handle(clock.ms(12), gnp("p", r#"{"selector":"app == 'x'"}"#));
    assert!(policy_apply(&out).is_some());
    let failure = Problem::Route {
        prefix: "10.244.0.2/32".parse().unwrap(),
        reason: RouteReason::Refused { errno: 1 },
    };
    let out = c.handle(clock.ms(13), Input::PolicyApplied(vec![failure]));
    let Some(Health::NotReady(why)) = health_of(&out) else {
        panic!("{out:?}")
    };
    assert!(why.contains("policy"), "{why}");
    // Another change before the read-back: written whole.
    let out = c.handle(clock.ms(14), gnp("q", r#"{"selector":"app == 'x'"}"#));
    let (_, delta) = policy_apply(&out).expect("an apply");
    assert!(delta.full, "{delta:?}");
    c.handle(clock.ms(15), Input::PolicyApplied(Vec::new()));
    // The read-back pass after the debounce carries the policy whole.
    let out = c.handle(clock.ms(13) + EVENT_DEBOUNCE, Input::Timer);
    let pass = full_pass(&out).expect("a full pass");
    assert_eq!(pass.policy.policies.len(), 2);
}

#[test]
fn a_pass_problem_apart_from_the_policy_tables_keeps_policy_applies_incremental() {
    let (mut c, clock) = synced();
    c.handle(
        clock.ms(10),
        local_wep("a", "10.244.0.2/32", r#"{"app":"x"}"#),
    );
    let route = Problem::Route {
        prefix: "10.244.0.2/32".parse().unwrap(),
        reason: RouteReason::Refused { errno: 1 },
    };
    c.handle(
        clock.ms(11),
        Input::PassDone {
            uplink: Some(2),
            problems: vec![route],
        },
    );
    let out = c.handle(clock.ms(12), gnp("p", r#"{"selector":"app == 'x'"}"#));
    let (_, delta) = policy_apply(&out).expect("a policy apply");
    assert!(
        !delta.full,
        "a route problem says nothing of the policy tables"
    );
}

/// A host endpoint matched by address: the full pass asks for the host's addresses, and
/// a global address change makes a full pass (without one, address changes are
/// ignored); the addresses read put the endpoint on the interface holding its address.
#[test]
fn host_endpoints_matched_by_address_follow_the_hosts_addresses() {
    let addr_changed = || {
        Input::Kernel(Touched {
            addrs: true,
            ..Default::default()
        })
    };
    let (mut c, clock) = synced();
    c.handle(clock.ms(100), addr_changed());
    let out = c.handle(clock.ms(300), Input::Timer);
    assert!(
        full_pass(&out).is_none(),
        "no host endpoint wants addresses: {out:?}"
    );

    let out = c.handle(
        clock.ms(400),
        put(
            &format!("{RES}/hostendpoints/by-ip"),
            r#"{"kind":"HostEndpoint","apiVersion":"projectcalico.org/v3",
                "metadata":{"name":"by-ip"},"spec":{"node":"node-a","expectedIPs":["10.0.0.1"]}}"#,
        ),
    );
    let pass =
        full_pass(&out).unwrap_or_else(|| panic!("a datastore change makes a full pass: {out:?}"));
    assert!(pass.host_addrs, "{pass:?}");
    c.handle(clock.ms(401), done(Some(2)));
    let addrs = std::collections::BTreeMap::from([
        ("eth0".to_string(), vec!["10.0.0.1".parse().unwrap()]),
        ("cali1".to_string(), vec!["10.0.0.1".parse().unwrap()]),
        ("kube-ipvs0".to_string(), vec!["10.0.0.1".parse().unwrap()]),
    ]);
    let out = c.handle(clock.ms(402), Input::HostAddresses(addrs));
    let dp = out
        .iter()
        .find_map(|o| match o {
            Output::ApplyPolicy { dp, .. } => Some(dp.clone()),
            _ => None,
        })
        .expect("the host layer changed: a policy apply");
    // Workload interfaces and kube-ipvs0 (Felix's default interfaceExclude) are never
    // host endpoints.
    assert_eq!(dp.host.endpoints.keys().collect::<Vec<_>>(), ["eth0"]);
    c.handle(clock.ms(403), Input::PolicyApplied(Vec::new()));
    c.handle(clock.ms(500), addr_changed());
    let out = c.handle(clock.ms(700), Input::Timer);
    assert!(full_pass(&out).is_some(), "{out:?}");
}
