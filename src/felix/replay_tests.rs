//! Golden replay of Felix's core (after holo's conformance tests): a recorded sequence of
//! inputs (`testdata/replay.scenario`) is fed to [`Core`] by a simulated shell, and every
//! output, rendered as stable text, is compared with `testdata/replay.golden`. A change of
//! behaviour shows as a diff of that file.
//!
//! After an intended change, regenerate the golden file and review its diff:
//! `UPDATE_GOLDEN=1 cargo nextest run --lib felix::replay_tests`.
//!
//! The scenario: one input per line, `#` starts a comment.
//! - `at <ms>`: the clock moves to `<ms>` after the start; deadlines of `SetTimer` passed
//!   on the way fire (`Input::Timer`) at their instant, as the shell's sleep would.
//! - `put <key> <json>` / `del <key>`: a syncer update as etcd holds it;
//!   `status in-sync|resync`: the syncer's status.
//! - `bgp <update>[, <update>...]`: one batch; updates are `best <prefix> <next-hop>`,
//!   `withdraw <prefix>`, `in-sync`. `bgp closed`: the speaker's feed closed.
//! - `kernel link <index> <name|->`, `kernel route-iface <index>`, `kernel routes`: one
//!   notice of what others changed; `kernel lost`: the notifications failed.
//! - `writer-failed <prefix> <errno>`: the route writer reports a refused change.
//! - `fail-next <problem>`: the next execution (pass, repair, changes) reports this
//!   problem: `route <prefix> <errno>` (the kernel refused it), `no-interface <prefix>
//!   <name>` (the route's interface is gone), `sysctl <path> <errno>`.
//! - `uplink <index|->`: the uplink the executor finds from now on (initially 2).
//! - A line starting with `& ` is folded without a decision: it was queued behind the
//!   next line, which the shell drains before computing.
//!
//! Executions complete at once, at the current time, with the result given above.

use std::collections::BTreeSet;
use std::fmt::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::calc::{Desired, Dev, Route, Target};
use super::core::{Core, Health, Input, Output};
use super::events::Touched;
use super::policy::{Delta, PolicyDataplane};
use super::problem::Problem;
use super::routes::RouteReason;
use crate::bgp::{LearnedRoute, RouteUpdate};
use crate::datastore::KeyValue;
use crate::datastore::syncer::{self, SyncStatus, SyncerEvent, Update, UpdateType};
use crate::netlink::WriteFailure;

const SCENARIO: &str = include_str!("testdata/replay.scenario");
const GOLDEN: &str = "src/felix/testdata/replay.golden";

/// The simulated shell: the clock, the timer, and what executions report.
struct Shell {
    core: Core,
    t0: Instant,
    now: Instant,
    deadline: Option<Instant>,
    uplink: Option<u32>,
    fail_next: Option<Problem>,
    out: String,
}

impl Shell {
    fn ms(&self, t: Instant) -> u128 {
        t.duration_since(self.t0).as_millis()
    }

    /// Hand the core one input (folded only when `queued`), carry out what it says.
    fn feed(&mut self, input: Input, queued: bool) {
        let outputs = if queued {
            self.core.fold(self.now, input)
        } else {
            self.core.handle(self.now, input)
        };
        self.carry_out(outputs, 1);
    }

    fn carry_out(&mut self, outputs: Vec<Output>, depth: usize) {
        let pad = "  ".repeat(depth);
        for o in outputs {
            let result = match o {
                Output::SetTimer(t) => {
                    self.deadline = Some(t);
                    let _ = writeln!(self.out, "{pad}timer @{}", self.ms(t));
                    None
                }
                Output::Health(Health::Ready) => {
                    let _ = writeln!(self.out, "{pad}health ready");
                    None
                }
                Output::Health(Health::NotReady(why)) => {
                    let _ = writeln!(self.out, "{pad}health not ready: {why}");
                    None
                }
                Output::LogError(e) => {
                    let _ = writeln!(self.out, "{pad}log error: {e}");
                    None
                }
                Output::FullPass(p) => {
                    let _ = writeln!(
                        self.out,
                        "{pad}full pass: keep {} prefix {} node-ip {} vxlan-mtu {} ipip-mtu {}",
                        list(&p.keep),
                        p.prefix,
                        opt(p.node_ip),
                        opt(p.vxlan_mtu),
                        opt(p.ipip_mtu),
                    );
                    render_desired(&mut self.out, &p.desired, depth + 1);
                    render_policy(&mut self.out, &p.policy, depth + 1);
                    let problems = self.problems();
                    let uplink = self.uplink;
                    Some(Input::PassDone { uplink, problems })
                }
                Output::Repair(r) => {
                    let scopes: Vec<String> = r
                        .scopes
                        .iter()
                        .map(|s| s.map_or("all".to_string(), |i| format!("if{i}")))
                        .collect();
                    let _ = writeln!(
                        self.out,
                        "{pad}repair: scopes [{}] workloads [{}] uplink {} keep {}",
                        scopes.join(", "),
                        r.workloads.join(", "),
                        opt(r.uplink),
                        list(&r.keep),
                    );
                    Some(Input::Repaired(self.problems()))
                }
                Output::ApplyChanges { changes, uplink } => {
                    let _ = writeln!(self.out, "{pad}apply changes: uplink {}", opt(uplink));
                    for (p, old, new) in &changes {
                        let r = |r: &Option<Route>| r.as_ref().map_or("-".into(), route);
                        let _ = writeln!(self.out, "{pad}  {p}: {} -> {}", r(old), r(new));
                    }
                    Some(Input::ChangesApplied(self.problems()))
                }
                Output::ApplyPolicy { dp, delta } => {
                    let _ = writeln!(self.out, "{pad}apply policy: {}", render_delta(&delta));
                    render_policy(&mut self.out, &dp, depth + 1);
                    Some(Input::PolicyApplied(self.problems()))
                }
            };
            if let Some(input) = result {
                let _ = writeln!(self.out, "{pad}< {}", describe(&input));
                let outputs = self.core.handle(self.now, input);
                self.carry_out(outputs, depth + 1);
            }
        }
    }

    fn problems(&mut self) -> Vec<Problem> {
        self.fail_next.take().into_iter().collect()
    }

    /// Move the clock to `to`, firing the timer on the way.
    fn advance(&mut self, to: Instant) {
        while let Some(d) = self.deadline.filter(|d| *d <= to) {
            self.now = self.now.max(d);
            self.deadline = None;
            let _ = writeln!(self.out, "@{} timer fires", self.ms(self.now));
            self.feed(Input::Timer, false);
        }
        self.now = self.now.max(to);
    }
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

fn list<T: std::fmt::Display>(v: &[T]) -> String {
    let items: Vec<String> = v.iter().map(T::to_string).collect();
    format!("[{}]", items.join(", "))
}

fn mac(m: &[u8; 6]) -> String {
    let parts: Vec<String> = m.iter().map(|b| format!("{b:02x}")).collect();
    parts.join(":")
}

fn route(r: &Route) -> String {
    let target = match &r.target {
        Target::Blackhole => "blackhole".to_string(),
        Target::Link(dev) => format!("dev {dev}"),
        Target::Via { gateway, dev } => match dev {
            Dev::Uplink => format!("via {gateway} dev <uplink>"),
            Dev::Named(d) => format!("via {gateway} dev {d}"),
        },
    };
    format!("{target} proto {}", r.protocol)
}

/// The desired dataplane, sorted: routes, neighbours, FDB, tunnels, NAT, problems.
fn render_desired(out: &mut String, d: &Desired, depth: usize) {
    let pad = "  ".repeat(depth);
    let routes: BTreeSet<(ipnet::IpNet, String)> =
        d.routes.iter().map(|(p, r)| (*p, route(r))).collect();
    for (p, r) in routes {
        let _ = writeln!(out, "{pad}route {p} {r}");
    }
    for n in &d.neighbours {
        let _ = writeln!(out, "{pad}neigh {} {} {}", n.dev, n.ip, mac(&n.mac));
    }
    for f in &d.fdb {
        let _ = writeln!(out, "{pad}fdb {} dst {}", mac(&f.mac), f.dst);
    }
    if let Some(v) = &d.vxlan {
        let _ = writeln!(
            out,
            "{pad}vxlan vni {} port {} local {} mac {} address {}",
            v.vni,
            v.port,
            opt(v.local),
            mac(&v.mac),
            opt(v.address)
        );
    }
    if let Some(i) = &d.ipip {
        let _ = writeln!(out, "{pad}ipip address {}", opt(i.address));
    }
    let set = |s: &BTreeSet<ipnet::IpNet>| list(&s.iter().collect::<Vec<_>>());
    let _ = writeln!(
        out,
        "{pad}nat masquerade {} all {} snat-to {}",
        set(&d.nat.masquerade),
        set(&d.nat.all),
        opt(d.nat.snat_to)
    );
    for p in &d.problems {
        let _ = writeln!(out, "{pad}problem {p}");
    }
}

/// The policy dataplane, one line per endpoint, policy, profile and set.
fn render_policy(out: &mut String, dp: &PolicyDataplane, depth: usize) {
    let pad = "  ".repeat(depth);
    let tiers = |ts: &[crate::felix::policy::TierPolicies]| {
        ts.iter()
            .map(|t| format!("{}:[{}]:{:?}", t.tier, t.policies.join(" "), t.end))
            .collect::<Vec<_>>()
            .join(" ")
    };
    for (iface, e) in &dp.endpoints {
        let _ = writeln!(
            out,
            "{pad}endpoint {iface} ({}) in {{{}}} out {{{}}} profiles [{}]",
            e.name,
            tiers(&e.ingress),
            tiers(&e.egress),
            e.profiles.join(" ")
        );
    }
    for (id, c) in &dp.policies {
        let _ = writeln!(out, "{pad}policy {id}: {:?} / {:?}", c.inbound, c.outbound);
    }
    for (name, c) in &dp.profiles {
        let _ = writeln!(
            out,
            "{pad}profile {name}: {:?} / {:?}",
            c.inbound, c.outbound
        );
    }
    for (id, s) in &dp.sets {
        let _ = writeln!(out, "{pad}set {id}: {s:?}");
    }
    if dp.endpoint_to_host != Default::default() {
        let _ = writeln!(out, "{pad}endpoint-to-host {:?}", dp.endpoint_to_host);
    }
}

fn render_delta(d: &Delta) -> String {
    let list = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>().join(" ");
    let members = |m: &std::collections::BTreeMap<String, crate::felix::policy::IpSet>| {
        m.iter()
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!(
        "full {} endpoints [{}] policies [{}] profiles [{}] sets [{}] added [{}] removed [{}] endpoint-to-host {}",
        d.full,
        list(&d.endpoints),
        list(&d.policies),
        list(&d.profiles),
        list(&d.sets),
        members(&d.added),
        members(&d.removed),
        d.endpoint_to_host
    )
}

fn describe(input: &Input) -> String {
    let problems = |p: &[Problem]| {
        let all: Vec<String> = p.iter().map(Problem::to_string).collect();
        format!("[{}]", all.join("; "))
    };
    match input {
        Input::PassDone {
            uplink,
            problems: p,
        } => {
            format!(
                "pass done: uplink {} problems {}",
                opt(*uplink),
                problems(p)
            )
        }
        Input::Repaired(p) => format!("repaired: problems {}", problems(p)),
        Input::ChangesApplied(p) => format!("changes applied: problems {}", problems(p)),
        Input::PolicyApplied(p) => format!("policy applied: problems {}", problems(p)),
        other => format!("{other:?}"),
    }
}

/// One scenario line as an input (None: a directive of the shell, already applied).
fn parse(shell: &mut Shell, line: &str) -> Result<Option<Input>, String> {
    let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
    let rest = rest.trim();
    let input = match word {
        "at" => {
            let ms: u64 = rest.parse().map_err(|_| format!("bad time {rest}"))?;
            shell.advance(shell.t0 + Duration::from_millis(ms));
            return Ok(None);
        }
        "uplink" => {
            shell.uplink = rest.parse().ok();
            return Ok(None);
        }
        "fail-next" => {
            shell.fail_next = Some(problem(rest)?);
            return Ok(None);
        }
        "put" => {
            let (key, json) = rest.split_once(' ').ok_or("put <key> <json>")?;
            let kv = KeyValue {
                key: key.into(),
                value: json.as_bytes().to_vec(),
                mod_revision: 1,
                create_revision: 1,
            };
            let value = syncer::decode(&kv).ok_or("a key Felix does not model")??;
            Input::Datastore(SyncerEvent::Update(Update {
                key: key.into(),
                update_type: UpdateType::New,
                value: Some(Arc::new(value)),
                revision: 1,
            }))
        }
        "del" => Input::Datastore(SyncerEvent::Update(Update {
            key: rest.into(),
            update_type: UpdateType::Deleted,
            value: None,
            revision: 1,
        })),
        "status" => Input::Datastore(SyncerEvent::Status(match rest {
            "in-sync" => SyncStatus::InSync,
            "resync" => SyncStatus::ResyncInProgress,
            s => return Err(format!("bad status {s}")),
        })),
        "bgp" if rest == "closed" => Input::BgpClosed,
        "bgp" => Input::Bgp(rest.split(", ").map(bgp_update).collect::<Result<_, _>>()?),
        "kernel" => kernel(rest)?,
        "writer-failed" => {
            let (prefix, errno) = rest
                .split_once(' ')
                .ok_or("writer-failed <prefix> <errno>")?;
            Input::WriterFailed(Problem::Refused(WriteFailure::Refused {
                prefix: parsed(prefix)?,
                errno: parsed(errno)?,
            }))
        }
        w => return Err(format!("unknown input {w}")),
    };
    Ok(Some(input))
}

/// A problem an execution reports (see the module documentation).
fn problem(text: &str) -> Result<Problem, String> {
    let words: Vec<&str> = text.split(' ').collect();
    Ok(match words[..] {
        ["route", prefix, errno] => Problem::Route {
            prefix: parsed(prefix)?,
            reason: RouteReason::Refused {
                errno: parsed(errno)?,
            },
        },
        ["no-interface", prefix, name] => Problem::Route {
            prefix: parsed(prefix)?,
            reason: RouteReason::NoInterface(name.into()),
        },
        ["sysctl", path, errno] => Problem::Sysctl {
            path: path.into(),
            error: std::io::Error::from_raw_os_error(parsed(errno)?),
        },
        _ => return Err(format!("bad problem {text}")),
    })
}

fn parsed<T: std::str::FromStr>(s: &str) -> Result<T, String> {
    s.parse().map_err(|_| format!("bad value {s}"))
}

fn bgp_update(u: &str) -> Result<RouteUpdate, String> {
    let parts: Vec<&str> = u.split_whitespace().collect();
    let net = |s: &str| s.parse().map_err(|_| format!("bad prefix {s}"));
    Ok(match parts[..] {
        ["best", prefix, next_hop] => RouteUpdate::Best(LearnedRoute {
            prefix: net(prefix)?,
            next_hop: next_hop
                .parse()
                .map_err(|_| format!("bad next hop {next_hop}"))?,
        }),
        ["withdraw", prefix] => RouteUpdate::Withdrawn(net(prefix)?),
        ["in-sync"] => RouteUpdate::InSync,
        _ => return Err(format!("bad BGP update {u}")),
    })
}

fn kernel(rest: &str) -> Result<Input, String> {
    let parts: Vec<&str> = rest.split_whitespace().collect();
    let index = |s: &str| s.parse::<u32>().map_err(|_| format!("bad index {s}"));
    let mut t = Touched::default();
    match parts[..] {
        ["link", i, name] => {
            let name = (name != "-").then(|| name.to_string());
            t.links.insert(index(i)?, name);
        }
        ["route-iface", i] => {
            t.route_ifaces.insert(index(i)?);
        }
        ["routes"] => t.routes = true,
        ["lost"] => return Ok(Input::NotificationsLost),
        _ => return Err(format!("bad kernel notice {rest}")),
    }
    Ok(Input::Kernel(t))
}

/// Replay the scenario; the rendered outputs.
fn replay(scenario: &str) -> String {
    let t0 = Instant::now();
    let core = Core::new("node-a", t0);
    let mut shell = Shell {
        deadline: Some(core.deadline()),
        core,
        t0,
        now: t0,
        uplink: Some(2),
        fail_next: None,
        out: String::new(),
    };
    for (n, line) in scenario.lines().enumerate() {
        let line = line.split(" #").next().unwrap_or("").trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (queued, line) = match line.strip_prefix("& ") {
            Some(l) => (true, l),
            None => (false, line),
        };
        let shown = match line.split_once(" {") {
            Some((head, _)) => head,
            None => line,
        };
        let input = parse(&mut shell, line).unwrap_or_else(|e| panic!("line {}: {e}", n + 1));
        let Some(input) = input else {
            if !line.starts_with("at ") {
                let _ = writeln!(shell.out, "@{} {shown}", shell.ms(shell.now));
            }
            continue;
        };
        let mark = if queued { " (queued)" } else { "" };
        let _ = writeln!(shell.out, "@{} {shown}{mark}", shell.ms(shell.now));
        shell.feed(input, queued);
    }
    shell.out
}

#[test]
fn felix_core_replays_its_recorded_inputs_to_the_golden_outputs() {
    let got = replay(SCENARIO);
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(GOLDEN);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_default();
    if got != want {
        let (g, w): (Vec<&str>, Vec<&str>) = (got.lines().collect(), want.lines().collect());
        let diff: Vec<String> = (0..g.len().max(w.len()))
            .map(|i| {
                let at = |v: &[&str]| v.get(i).copied().unwrap_or("<end of file>").to_string();
                (i, (at(&g), at(&w)))
            })
            .filter(|(_, (g, w))| g != w)
            .take(5)
            .map(|(i, (g, w))| format!("line {}:\n  got  {g}\n  want {w}", i + 1))
            .collect();
        panic!(
            "the outputs differ from {GOLDEN} (UPDATE_GOLDEN=1 regenerates it; review the diff):\n{}",
            diff.join("\n")
        );
    }
}

#[test]
fn the_replay_is_deterministic() {
    assert_eq!(replay(SCENARIO), replay(SCENARIO));
}
