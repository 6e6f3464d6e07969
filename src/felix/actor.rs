//! The Felix actor: the I/O shell around `felix::core`. It turns the syncer's events, BGP's
//! best routes, kernel notifications, the route writer's failures and one timer into the
//! core's inputs, and carries its outputs out: passes, repairs and BGP's changes through
//! the executor (`felix::dataplane`), the timer, readiness and metrics. Once the datastore
//! is in sync the kernel is made to match the desired dataplane (tunnels, routes,
//! neighbours and FDB, NAT outgoing, workload sysctls); the rules of when and how are the
//! core's. This node's tunnel addresses are not Felix's business: `node::tunnel_addrs`
//! allocates them, and Felix reads them from the Node like any other node's.
//!
//! ```text
//! syncer --SyncerEvent--> felix <--Vec<RouteUpdate>-- bgp speaker
//!                           |
//!                       netlink, nft (this node's network namespace)
//! ```

use std::collections::VecDeque;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::core::{Core, Health, Input, Output};
use super::dataplane::Dataplane;
use super::events::{Events, Touched};
pub use super::metrics::FelixMetrics;
use super::problem::Problem;
use crate::bgp::RouteUpdate;
use crate::datastore::syncer::SyncerEvent;
use crate::health::{ActorResult, FaultInput, HealthReporter, next_fault};
use crate::netlink::Writer;

/// Who Felix runs for, and where it writes.
pub struct Config {
    pub node: String,
    /// Where the pods' MTU is written for the CNI plugin.
    pub mtu_file: Option<std::path::PathBuf>,
    /// A test's failures, acted out in Felix's loop; `None` in production.
    pub faults: FaultInput,
    /// Where Felix's own tasks run (the netlink connection): the daemon's tracker.
    pub tasks: TaskTracker,
    /// `FELIX_*` variables, over the datastore's FelixConfiguration.
    pub env: Vec<(String, String)>,
}

/// The time on tokio's clock (paused in tests), as the core takes it.
fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// Run Felix until cancelled (then `Ok`); an `Err` says why it ended before.
pub async fn run(
    cfg: Config,
    mut datastore: mpsc::Receiver<SyncerEvent>,
    mut bgp: mpsc::Receiver<Vec<RouteUpdate>>,
    metrics: FelixMetrics,
    health: HealthReporter,
    cancel: CancellationToken,
) -> ActorResult {
    health.set_ready(false, Some("waiting for the datastore".into()));
    let failed = |e: std::io::Error| {
        let why = format!("cannot open netlink: {e}");
        health.set_ready(false, Some(why.clone()));
        why
    };
    // Requests on one socket, notifications on another (see `events`).
    let (conn, handle, _) = rtnetlink::new_connection().map_err(failed)?;
    cfg.tasks.spawn(conn);
    let (writer, mut writer_failures) = Writer::spawn().map_err(failed)?;
    let mut events = match Events::open() {
        Ok(e) => Some(e),
        Err(e) => {
            tracing::warn!(error = %e, "no netlink events; repairs wait for the periodic resync");
            None
        }
    };
    let Config {
        node,
        mtu_file,
        mut faults,
        env,
        ..
    } = cfg;
    let mut dataplane = Dataplane::new(handle, writer, metrics.clone(), mtu_file);
    let mut core = Core::with_env(&node, now(), env);
    let mut wake = tokio::time::Instant::from_std(core.deadline());
    loop {
        let input = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            fault = next_fault(&mut faults) => return Err(fault.strike()),
            ev = datastore.recv() => match ev {
                Some(ev) => Input::Datastore(ev),
                None => return Err("its datastore feed closed".into()),
            },
            batch = bgp.recv(), if core.bgp_open() => match batch {
                Some(batch) => {
                    metrics.messages.add(batch.len() as i64);
                    Input::Bgp(batch)
                }
                // No speaker (yet): only the datastore drives the dataplane.
                None => Input::BgpClosed,
            },
            Some(failure) = writer_failures.recv() => {
                tracing::warn!(problem = %failure, "dataplane");
                Input::WriterFailed(Problem::Refused(failure))
            }
            r = next_event(&mut events) => match r {
                Ok(t) => Input::Kernel(t),
                Err(e) => {
                    tracing::warn!(error = %e, "netlink events failed; repairs wait for the periodic resync");
                    events = None;
                    Input::NotificationsLost
                }
            },
            _ = tokio::time::sleep_until(wake) => Input::Timer,
        };
        let mut outputs: VecDeque<Output> = fold(&mut core, &metrics, input).into();
        // Drain what is already queued before computing.
        if core.state().datastore_in_sync {
            while let Ok(ev) = datastore.try_recv() {
                outputs.extend(fold(&mut core, &metrics, Input::Datastore(ev)));
            }
        }
        outputs.extend(core.decide(now()));
        // Carry the outputs out; each execution's result is the core's next input.
        while let Some(output) = outputs.pop_front() {
            let done = match output {
                Output::FullPass(pass) => {
                    let (problems, uplink) = dataplane.full_pass(&pass).await;
                    metrics.set_policy(&pass.policy);
                    if pass.host_addrs {
                        match dataplane.host_addresses().await {
                            Ok(a) => {
                                outputs.extend(fold(&mut core, &metrics, Input::HostAddresses(a)))
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot read the host's addresses for host endpoints matched by address")
                            }
                        }
                    }
                    Some(Input::PassDone { uplink, problems })
                }
                Output::Repair(r) => Some(Input::Repaired(dataplane.repair(&r).await)),
                Output::ApplyChanges { changes, uplink } => Some(Input::ChangesApplied(
                    dataplane.apply_changes(&changes, uplink).await,
                )),
                Output::ApplyPolicy { dp, delta } => {
                    // Timed in `felix_int_dataplane_apply_time_seconds` by the dataplane.
                    let problems = dataplane.apply_policy(&dp, &delta).await;
                    metrics.set_policy(&dp);
                    Some(Input::PolicyApplied(problems))
                }
                Output::SetTimer(at) => {
                    wake = tokio::time::Instant::from_std(at);
                    None
                }
                Output::Health(Health::Ready) => {
                    health.set_ready(true, None);
                    None
                }
                Output::Health(Health::NotReady(why)) => {
                    metrics.failures.inc();
                    health.set_ready(false, Some(why));
                    None
                }
                Output::LogError(e) => {
                    tracing::error!("{e}");
                    None
                }
            };
            if let Some(input) = done {
                outputs.extend(core.handle(now(), input));
            }
        }
    }
}

/// Fold one input into the core (a datastore event counted and timed, as Calico's
/// calculation graph update time is).
fn fold(core: &mut Core, metrics: &FelixMetrics, input: Input) -> Vec<Output> {
    let Input::Datastore(ev) = &input else {
        return core.fold(now(), input);
    };
    metrics.datastore_event(ev);
    let started = std::time::Instant::now();
    let out = core.fold(now(), input);
    metrics.folded(started, core.state().counts());
    out
}

async fn next_event(events: &mut Option<Events>) -> std::io::Result<Touched> {
    match events {
        Some(e) => e.next().await,
        None => std::future::pending().await,
    }
}
