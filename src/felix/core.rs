//! Felix's decisions, without I/O (sans-IO, as `bgp::fsm` is for a BGP session): when to
//! make a full pass over the dataplane, when a repair of what kernel events touched is
//! enough, when BGP's changes go straight to the kernel, when to wake up, and whether
//! Felix is ready. [`Core::handle`] takes one [`Input`] and the time, and returns the
//! [`Output`]s for the shell (`felix::actor`) to carry out; the core never reads a clock,
//! sleeps or touches the kernel, so every decision is tested without root or real time
//! (`core_tests`, and the golden replay in `replay_tests`).
//!
//! ```text
//!  SyncerEvent, BGP batch, Touched, writer failure, timer --> [Core] --> FullPass / Repair /
//!  PassDone / Repaired / ChangesApplied (results)        -->        ApplyChanges, SetTimer,
//!                                                                     Health, LogError
//! ```
//!
//! The rules (those of Felix's loop before it was split, Calico's where it has them):
//! - nothing is programmed before the datastore is in sync; the first time in sync a full
//!   pass runs even if nothing changed;
//! - a datastore change, BGP's first "in sync" (routes kept for BGP may now go), and every
//!   `routeRefreshInterval` (Calico's route refresh, default 90 s) make a full pass;
//! - BGP's best-route changes go straight to the kernel, against the last full pass's
//!   routes, while no full pass is due (and there is a last one);
//! - kernel events are debounced 100 ms; then the touched workload interfaces and routes
//!   are repaired, or a full pass runs when another link changed or notifications were
//!   lost;
//! - a change the kernel refused (writer failure, BGP changes or repair problems) makes
//!   Felix not ready and schedules a full pass that reads the kernel back; a full pass's
//!   own problems make Felix not ready until a pass without any (they are retried at the
//!   next full pass, not sooner);
//! - while BGP has not delivered its table, routes of the BGP-routed pools are kept
//!   (forwarding state kept across a speaker restart).

use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use super::FelixInput;
use super::calc::Desired;
use super::events::Touched;
use super::policy::{Delta, PolicyDataplane};
use super::problem::Problem;
use super::routes::Change;
use super::state::State;
use super::tunnels::TunnelError;
use crate::bgp::RouteUpdate;
use crate::datastore::syncer::SyncerEvent;

/// How long to wait after a kernel event before applying (events come in bursts, our own
/// changes among them).
pub const EVENT_DEBOUNCE: Duration = Duration::from_millis(100);

/// What happens to Felix, in the order it happens.
#[derive(Debug)]
pub enum Input {
    /// An event of Felix's syncer subscription.
    Datastore(SyncerEvent),
    /// A batch of BGP's best-route updates (the speaker sends them in batches).
    Bgp(Vec<RouteUpdate>),
    /// The speaker's feed closed (or there is none): the datastore alone drives the
    /// dataplane, and no route is kept for BGP any more.
    BgpClosed,
    /// Kernel notifications: what others changed.
    Kernel(Touched),
    /// The kernel notifications failed (not just dropped): anything may have changed, and
    /// repairs now wait for the periodic resync.
    NotificationsLost,
    /// A change queued on the route writer was refused by the kernel.
    WriterFailed(Problem),
    /// The deadline of the last [`Output::SetTimer`] passed.
    Timer,
    /// The [`Output::FullPass`] was carried out: the problems met, and the uplink it used
    /// (the interface of `Dev::Uplink` routes, which later repairs and changes use too).
    PassDone {
        uplink: Option<u32>,
        problems: Vec<Problem>,
    },
    /// The [`Output::Repair`] was carried out, with these problems.
    Repaired(Vec<Problem>),
    /// The [`Output::ApplyChanges`] were queued, with these problems.
    ChangesApplied(Vec<Problem>),
    /// The [`Output::ApplyPolicy`] was carried out, with these problems.
    PolicyApplied(Vec<Problem>),
    /// The host's interface addresses, read after a full pass that asked for them
    /// ([`Pass::host_addrs`]).
    HostAddresses(std::collections::BTreeMap<String, Vec<std::net::IpAddr>>),
}

/// What the shell carries out.
#[derive(Debug)]
pub enum Output {
    /// Make every part of the dataplane match `desired` (tunnels, routes, neighbours, NAT,
    /// sysctls, the MTU file), reading the kernel's tables back; answer with
    /// [`Input::PassDone`].
    FullPass(Pass),
    /// Repair, against the last full pass, what kernel events touched; answer with
    /// [`Input::Repaired`].
    Repair(Repair),
    /// Queue BGP's route changes on the writer, without reading the kernel back; answer
    /// with [`Input::ChangesApplied`].
    ApplyChanges {
        changes: Vec<Change>,
        uplink: Option<u32>,
    },
    /// Write the policy dataplane `dp`, only what `delta` says changed (everything when
    /// `delta.full`); answer with [`Input::PolicyApplied`]. A policy-only change (a label,
    /// a policy, a network set) goes this way, never through a full pass.
    ApplyPolicy {
        dp: Arc<PolicyDataplane>,
        delta: Delta,
    },
    /// Wake up at this instant with [`Input::Timer`] (replaces the previous deadline).
    SetTimer(Instant),
    /// Felix's readiness. Not ready always follows a failed dataplane update, which will be
    /// retried (`felix_int_dataplane_failures`).
    Health(Health),
    /// A problem worth one error line in the log, said once (IPIP missing from the kernel).
    LogError(String),
}

/// Felix's readiness (`/readiness`, `-felix-ready`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Ready,
    /// Not ready, the problems joined with "; ".
    NotReady(String),
}

/// A full pass: what to program, and what the shell needs to program it.
#[derive(Debug, Clone)]
pub struct Pass {
    pub desired: Arc<Desired>,
    /// BGP-routed pools whose routes of ours stay though not desired (BGP not in sync).
    pub keep: Vec<IpNet>,
    /// The workload interface prefix (`interfacePrefix`, default `cali`).
    pub prefix: String,
    /// Where the uplink is looked up: the VXLAN local address, else the Node's IPv4.
    pub node_ip: Option<std::net::Ipv4Addr>,
    /// `vxlanMTU` and `ipipMTU` when set (else the uplink's less the tunnel's overhead).
    pub vxlan_mtu: Option<u32>,
    pub ipip_mtu: Option<u32>,
    /// The policy dataplane, written in full by the pass (drift repaired).
    pub policy: Arc<crate::felix::policy::PolicyDataplane>,
    /// What changed in it since the last write: enough when the executor's tables are
    /// known and no one touched nftables since (a pod added: its chains, not 30,000
    /// rules); `Delta::full()` when what the kernel holds is unknown.
    pub policy_delta: Delta,
    /// `routeRefreshInterval` (the default when off): unchanged tables are rewritten at
    /// most this often, when nftables was written since (drift repaired).
    pub refresh: Duration,
    /// Read the host's interface addresses after the pass and answer with
    /// [`Input::HostAddresses`] too (a host endpoint of this node is matched by address).
    pub host_addrs: bool,
}

/// A repair: the routes of each scope (an interface; `None`: the whole table, when
/// interface-less routes changed), and for the touched workload interfaces their
/// sysctls and the neighbour entries, against the last full pass.
#[derive(Debug, Clone)]
pub struct Repair {
    pub desired: Arc<Desired>,
    pub uplink: Option<u32>,
    pub scopes: Vec<Option<u32>>,
    pub workloads: Vec<String>,
    pub keep: Vec<IpNet>,
    pub prefix: String,
}

/// What is being carried out (one thing at a time: the shell waits for each).
#[derive(Debug)]
enum Busy {
    Pass(Arc<Desired>),
    Repair,
    Changes,
    Policy,
}

/// Felix's state and the decisions pending on it.
pub struct Core {
    state: State,
    /// A full pass (every part, the kernel's tables read back) is due.
    full: bool,
    /// A repair of `touched` is due.
    repair: bool,
    /// When the debounce of kernel events ends.
    due: Option<Instant>,
    /// The next `routeRefreshInterval` resync.
    next_resync: Instant,
    /// The deadline last given to the shell.
    timer: Option<Instant>,
    /// What the last full pass programmed (its routes kept up to date by BGP's changes),
    /// and the uplink it used.
    last: Option<(Arc<Desired>, Option<u32>)>,
    /// What kernel events touched since the last pass.
    touched: Touched,
    bgp_open: bool,
    warned_ipip: bool,
    busy: Option<Busy>,
    /// The policy dataplane in the kernel may differ from the last one computed (a failed
    /// apply or pass): the next policy apply writes everything.
    policy_full: bool,
}

/// When the next refresh is looked at: after `interval`, or after the default interval
/// when the refresh is off (0).
fn refresh_or_default(interval: std::time::Duration) -> std::time::Duration {
    if interval.is_zero() {
        std::time::Duration::from_secs(90)
    } else {
        interval
    }
}

impl Core {
    /// Felix for `node`, started at `now` (the first resync is one refresh interval on).
    pub fn new(node: &str, now: Instant) -> Core {
        Core::with_env(node, now, Vec::new())
    }

    /// Felix for `node` with `FELIX_*` variables `env` (over the datastore's settings).
    pub fn with_env(node: &str, now: Instant, env: Vec<(String, String)>) -> Core {
        let state = State::with_env(node, env);
        let next_resync = now + refresh_or_default(state.config().route_refresh_interval());
        Core {
            state,
            full: false,
            repair: false,
            due: None,
            next_resync,
            timer: None,
            last: None,
            touched: Touched::default(),
            bgp_open: true,
            warned_ipip: false,
            busy: None,
            policy_full: false,
        }
    }

    /// What Felix knows (for metrics).
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Whether BGP's feed is still open.
    pub fn bgp_open(&self) -> bool {
        self.bgp_open
    }

    /// When the core wants to be woken up, the first [`Input::Timer`].
    pub fn deadline(&self) -> Instant {
        self.due
            .map_or(self.next_resync, |d| d.min(self.next_resync))
    }

    /// Fold `input` in, then decide what to do now.
    pub fn handle(&mut self, now: Instant, input: Input) -> Vec<Output> {
        let mut out = self.fold(now, input);
        out.extend(self.decide(now));
        out
    }

    /// Fold `input` in without deciding: for the datastore events already queued behind
    /// the input being handled, folded before computing (as Felix drains its queue), then
    /// [`Core::decide`].
    pub fn fold(&mut self, now: Instant, input: Input) -> Vec<Output> {
        let mut out = Vec::new();
        match input {
            Input::Datastore(ev) => {
                self.full |= self.state.apply(&FelixInput::Datastore(ev));
                // The first time in sync: apply even if nothing changed.
                if self.state.datastore_in_sync && self.last.is_none() {
                    self.full = true;
                }
            }
            Input::Bgp(batch) => {
                for u in batch {
                    // BGP's "in sync" lets routes kept for it go: a full pass.
                    let in_sync = matches!(u, RouteUpdate::InSync);
                    self.full |= in_sync & self.state.apply(&FelixInput::Bgp(u));
                }
            }
            Input::BgpClosed => self.bgp_open = false,
            Input::Kernel(t) => {
                self.touched.merge(t);
                self.soon(now);
            }
            Input::NotificationsLost => self.read_back(now),
            Input::WriterFailed(p) => {
                out.push(Output::Health(Health::NotReady(p.to_string())));
                self.read_back(now);
            }
            Input::Timer => self.timer_fired(now),
            Input::PassDone { uplink, problems } => {
                let Some(Busy::Pass(desired)) = self.busy.take() else {
                    return out;
                };
                self.last = Some((desired, uplink));
                // The pass may have failed to write the policy: write it whole next time.
                self.policy_full |= problems.iter().any(may_touch_policy);
                if let Some(e) = self.ipip_missing(&problems) {
                    out.push(Output::LogError(e));
                }
                out.push(Output::Health(health(&problems)));
            }
            Input::PolicyApplied(problems) => {
                self.busy = None;
                if !problems.is_empty() {
                    let all: Vec<String> = problems.iter().map(Problem::to_string).collect();
                    out.push(Output::Health(Health::NotReady(format!(
                        "the policy dataplane failed to apply: {}",
                        all.join("; ")
                    ))));
                    // What the kernel holds is unknown: the full pass soon writes it whole
                    // (and says when all is well again), as does any apply before it.
                    self.policy_full = true;
                    self.read_back(now);
                }
            }
            Input::HostAddresses(addrs) => self.state.set_host_addrs(addrs),
            Input::Repaired(problems) | Input::ChangesApplied(problems) => {
                self.busy = None;
                if !problems.is_empty() {
                    out.push(Output::Health(health(&problems)));
                    // A full pass soon: it reads the kernel back, retries everything, and
                    // says when all is well again.
                    self.read_back(now);
                }
            }
        }
        out
    }

    /// What to do now: the next deadline when it moved, and at most one of a full pass, a
    /// repair or BGP's changes (acting does not move the deadline).
    pub fn decide(&mut self, _now: Instant) -> Vec<Output> {
        let mut out = Vec::new();
        // The deadline first: the result of the action below may set a later one, which
        // must win however the shell orders its work.
        let wake = self.deadline();
        if self.timer != Some(wake) {
            self.timer = Some(wake);
            out.push(Output::SetTimer(wake));
        }
        if self.busy.is_none() && self.state.datastore_in_sync {
            out.extend(self.act());
        }
        out
    }

    fn act(&mut self) -> Option<Output> {
        if !self.full && self.state.bgp_pending() {
            if let Some((desired, uplink)) = &mut self.last {
                let changes = self.state.bgp_changes(&mut Arc::make_mut(desired).routes);
                if changes.is_empty() {
                    return None;
                }
                self.busy = Some(Busy::Changes);
                return Some(Output::ApplyChanges {
                    changes,
                    uplink: *uplink,
                });
            }
            self.full = true;
        }
        // A policy change before a repair: it is what a user waits for (a label change
        // enforced within milliseconds), and repairs of a busy node (link events of
        // many interfaces) must not hold it back.
        if !self.full
            && let Some(out) = self.policy()
        {
            return Some(out);
        }
        if self.repair && !self.full {
            self.repair = false;
            if let Some((desired, uplink)) = &self.last {
                let t = std::mem::take(&mut self.touched);
                let repair = Repair {
                    desired: desired.clone(),
                    uplink: *uplink,
                    scopes: scopes(&t),
                    workloads: t.links.into_values().flatten().collect(),
                    keep: self.kept(),
                    prefix: self.state.config().interface_prefix().to_string(),
                };
                self.busy = Some(Busy::Repair);
                return Some(Output::Repair(repair));
            }
            self.full = true;
        }
        if !self.full {
            return None;
        }
        self.full = false;
        self.repair = false;
        self.touched = Touched::default();
        let desired = Arc::new(self.state.desired());
        let cfg = self.state.config();
        let (policy, delta) = self.state.policy_update();
        let policy_delta = if self.policy_full {
            Delta::full()
        } else {
            delta
        };
        let pass = Pass {
            keep: self.kept(),
            prefix: cfg.interface_prefix().to_string(),
            node_ip: desired
                .vxlan
                .as_ref()
                .and_then(|v| v.local)
                .or_else(|| self.state.node_ipv4()),
            vxlan_mtu: cfg.vxlan_mtu,
            ipip_mtu: cfg.ipip_mtu,
            refresh: refresh_or_default(cfg.route_refresh_interval()),
            host_addrs: self.state.wants_host_addrs(),
            // What the pass writes is the base of the next deltas.
            policy,
            policy_delta,
            desired: desired.clone(),
        };
        self.policy_full = false;
        self.busy = Some(Busy::Pass(desired));
        Some(Output::FullPass(pass))
    }

    /// A policy-only change: the policy dataplane's delta since the last apply, once a
    /// full pass has programmed it (before that, the first pass carries it whole).
    fn policy(&mut self) -> Option<Output> {
        if !self.state.policy_changed || self.last.is_none() {
            return None;
        }
        let (dp, mut delta) = self.state.policy_update();
        if self.policy_full {
            delta = Delta::full();
        }
        if delta.is_empty() {
            return None;
        }
        self.policy_full = false;
        self.busy = Some(Busy::Policy);
        Some(Output::ApplyPolicy { dp, delta })
    }

    fn timer_fired(&mut self, now: Instant) {
        if now >= self.next_resync {
            let interval = self.state.config().route_refresh_interval();
            // 0 turns the periodic refresh off, as in Calico; the setting is looked at
            // again after the default interval (a pass every instant otherwise).
            self.full |= !interval.is_zero();
            self.next_resync = now + refresh_or_default(interval);
        }
        if self.due.is_some_and(|d| d <= now) {
            self.due = None;
            // Links other than workload interfaces (the uplink, the tunnels) are settings
            // of the whole pass.
            let cfg = self.state.config();
            let prefix = cfg.interface_prefix();
            let other_link = self
                .touched
                .links
                .values()
                .any(|n| !n.as_deref().is_some_and(|n| n.starts_with(prefix)));
            // A host address changed: host endpoints matched by address may move (when
            // there are none, it changes nothing of ours).
            let addrs = std::mem::take(&mut self.touched.addrs) && self.state.wants_host_addrs();
            if self.touched.is_empty() && !addrs {
                return;
            }
            if self.touched.unknown || other_link || addrs {
                self.full = true;
            } else {
                self.repair = true;
            }
        }
    }

    /// Act on what the kernel did after the debounce.
    fn soon(&mut self, now: Instant) {
        self.due.get_or_insert(now + EVENT_DEBOUNCE);
    }

    /// Anything may differ from what we programmed: read the kernel back soon (a full
    /// pass, since `touched` is unknown).
    fn read_back(&mut self, now: Instant) {
        self.touched.unknown = true;
        self.soon(now);
    }

    /// Until the speaker has delivered its table, BGP's routes in the kernel stay.
    fn kept(&self) -> Vec<IpNet> {
        if self.bgp_open && !self.state.bgp_in_sync {
            self.state.bgp_routed_pools()
        } else {
            Vec::new()
        }
    }

    /// The IPIP module missing from the kernel is logged as an error the first time.
    fn ipip_missing(&mut self, problems: &[Problem]) -> Option<String> {
        let e = problems.iter().find_map(|p| match p {
            Problem::Tunnel(e @ TunnelError::NoIpip(_)) => Some(e.to_string()),
            _ => None,
        })?;
        (!std::mem::replace(&mut self.warned_ipip, true)).then_some(e)
    }
}

/// Whether a full pass's problem may have left the policy tables other than written
/// (routes, neighbours, tunnels and sysctls are written apart from them; anything else,
/// NAT and nftables included, is taken to).
fn may_touch_policy(p: &Problem) -> bool {
    !matches!(
        p,
        Problem::Calc(_)
            | Problem::Routes(_)
            | Problem::Route { .. }
            | Problem::Neighbour(_)
            | Problem::Neighbours(_)
            | Problem::Tunnel(_)
            | Problem::Sysctl { .. }
            | Problem::MtuFile { .. }
            | Problem::Refused(_)
    )
}

/// Ready when there are no problems, else not ready with all of them.
fn health(problems: &[Problem]) -> Health {
    if problems.is_empty() {
        Health::Ready
    } else {
        let all: Vec<String> = problems.iter().map(Problem::to_string).collect();
        Health::NotReady(all.join("; "))
    }
}

/// The route scopes a repair covers: the whole table when interface-less routes changed,
/// else each touched interface once, in index order.
fn scopes(t: &Touched) -> Vec<Option<u32>> {
    if t.routes {
        return vec![None];
    }
    t.route_ifaces
        .iter()
        .chain(t.links.keys())
        .copied()
        .collect::<std::collections::BTreeSet<u32>>()
        .into_iter()
        .map(Some)
        .collect()
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
