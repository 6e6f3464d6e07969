//! Supervision of the daemon's actors: none may end or panic silently.
//!
//! An actor whose inputs can be made again (an endpoint's listener, the IPAM collector's
//! datastore client) is restarted with backoff (1 s doubling to 30 s, back to 1 s after it
//! ran a minute); after [`GIVE_UP_AFTER`] failures in a row it is reported dead instead.
//! confd applies the same rule ([`RestartPolicy`]) to the BGP speaker it runs, counted in
//! the same metric under `bgp`.
//! An actor fed by a channel that dies with it (Felix, the syncer, confd, the cluster
//! view: the syncer's subscriptions are made once) is not restarted: its end turns
//! `/liveness` false with its name and the cause, so the orchestrator restarts the node,
//! as Calico's liveness probe makes the kubelet do when Felix or BIRD dies.
//!
//! Tests inject a failure through a [`Faults`] port given to the daemon. Felix and confd
//! take their port as a [`FaultInput`] of their own and act the fault out inside their
//! own loop (returning the error through their own exit path, or panicking there); for
//! the others the supervisor ends or panics the actor's task, where a real failure would
//! happen.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, warn};

use super::http::{HealthAggregator, HealthReporter};

/// First pause before a restart.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest pause before a restart.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A run this long counts as healthy: the backoff and the failure count start again.
const HEALTHY_RUN: Duration = Duration::from_secs(60);
/// Failures in a row after which a restartable actor is reported dead.
pub const GIVE_UP_AFTER: u32 = 5;

/// What an actor's run ended with: `Ok` when it returned by itself, `Err` with its error.
pub type ActorResult = Result<(), String>;

/// A failure a test injects into a supervised actor.
#[derive(Debug, Clone)]
pub enum Fault {
    /// The actor returns this error.
    Fail(String),
    /// The actor panics with this message.
    Panic(String),
}

/// Test-only fault ports, by actor name; the daemon runs with none.
#[derive(Default)]
pub struct Faults {
    ports: HashMap<String, mpsc::Receiver<Fault>>,
}

impl Faults {
    /// No faults (production).
    pub fn none() -> Faults {
        Faults::default()
    }

    /// A port into actor `name`: each fault sent ends one run of it.
    pub fn port(&mut self, name: &str) -> mpsc::Sender<Fault> {
        let (tx, rx) = mpsc::channel(4);
        self.ports.insert(name.to_string(), rx);
        tx
    }

    fn take(&mut self, name: &str) -> Option<mpsc::Receiver<Fault>> {
        self.ports.remove(name)
    }
}

impl Fault {
    /// Act the fault out where it is received: the error to end with, or a panic here.
    pub fn strike(self) -> String {
        match self {
            Fault::Fail(why) => why,
            Fault::Panic(msg) => panic!("{msg}"),
        }
    }
}

/// A test's fault input into an actor's own loop; `None` in production.
pub type FaultInput = Option<mpsc::Receiver<Fault>>;

/// The next fault on `input`; never, without one (or once its sender is gone).
pub async fn next_fault(input: &mut FaultInput) -> Fault {
    match input {
        Some(rx) => match rx.recv().await {
            Some(f) => f,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

type FaultPort = Option<Arc<Mutex<mpsc::Receiver<Fault>>>>;

/// Watches the daemon's actors; see the module documentation.
pub struct Supervisor {
    tracker: TaskTracker,
    shutdown: CancellationToken,
    health: HealthAggregator,
    faults: std::sync::Mutex<Faults>,
    restarts: prometheus::IntCounterVec,
}

impl Supervisor {
    /// A supervisor spawning on `tracker`, quiet once `shutdown` fires; restarts are counted
    /// in `calico_node_actor_restarts_total{actor}` (register [`Supervisor::metrics`]).
    pub fn new(
        tracker: TaskTracker,
        shutdown: CancellationToken,
        health: HealthAggregator,
        faults: Faults,
    ) -> Supervisor {
        Supervisor {
            tracker,
            shutdown,
            health,
            faults: std::sync::Mutex::new(faults),
            restarts: prometheus::IntCounterVec::new(
                prometheus::Opts::new(
                    "calico_node_actor_restarts_total",
                    "Restarts of calico-node's actors after they ended or panicked.",
                ),
                &["actor"],
            )
            .expect("a valid metric"),
        }
    }

    /// The restart counter, for the metrics registry.
    pub fn metrics(&self) -> Box<dyn prometheus::core::Collector> {
        Box::new(self.restarts.clone())
    }

    fn fault_port(&self, name: &str) -> FaultPort {
        self.faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(name)
            .map(|rx| Arc::new(Mutex::new(rx)))
    }

    /// The fault port of actor `name`, for the actor's own loop (the supervisor then
    /// injects nothing into it itself).
    pub fn fault_input(&self, name: &str) -> FaultInput {
        self.faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(name)
    }

    /// The actor's own health reporter, or a liveness-only one under its name.
    fn reporter(&self, name: &str, own: Option<HealthReporter>) -> HealthReporter {
        own.unwrap_or_else(|| self.health.register_liveness(name))
    }

    /// Run an actor that cannot be restarted: if it ends before shutdown, `/liveness`
    /// turns false with its name and the cause.
    pub fn spawn_once<F>(&self, name: &str, own: Option<HealthReporter>, actor: F)
    where
        F: Future<Output = ActorResult> + Send + 'static,
    {
        let reporter = self.reporter(name, own);
        let (name, shutdown, faults) = (
            name.to_string(),
            self.shutdown.clone(),
            self.fault_port(name),
        );
        self.tracker.spawn(async move {
            let ended = run_once(actor, faults).await;
            if shutdown.is_cancelled() {
                return;
            }
            let why = describe(&name, ended);
            error!("{why}; the node reports itself not live");
            reporter.set_live(false, Some(why));
        });
    }

    /// Run an actor made by `make`, restarted with backoff whenever it ends before shutdown.
    pub fn spawn_restarting<M, F>(&self, name: &str, own: Option<HealthReporter>, mut make: M)
    where
        M: FnMut() -> F + Send + 'static,
        F: Future<Output = ActorResult> + Send + 'static,
    {
        let reporter = self.reporter(name, own);
        let (name, shutdown) = (name.to_string(), self.shutdown.clone());
        let faults = self.fault_port(&name);
        let restarts = self.restarts.with_label_values(&[name.as_str()]);
        self.tracker.spawn(async move {
            let mut policy = RestartPolicy::default();
            loop {
                let started = Instant::now();
                let ended = run_once(make(), faults.clone()).await;
                if shutdown.is_cancelled() {
                    return;
                }
                let why = describe(&name, ended);
                let backoff = match policy.failed(started.elapsed()) {
                    Restart::After(backoff) => backoff,
                    Restart::GiveUp { failures } => {
                        let why = given_up(&why, failures);
                        error!("{why}; the node reports itself not live");
                        reporter.set_live(false, Some(why));
                        return;
                    }
                };
                warn!("{why}; restarting in {backoff:?}");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                restarts.inc();
            }
        });
    }

    /// The restart counter of actor `name`, for an actor that restarts a part of itself
    /// (confd restarts the BGP speaker) under the same metric.
    pub fn restart_counter(&self, name: &str) -> prometheus::IntCounter {
        self.restarts.with_label_values(&[name])
    }
}

/// What to do after a failure: restart after a pause, or give up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// Start again after this pause.
    After(Duration),
    /// Too many failures in a row: report the actor dead.
    GiveUp { failures: u32 },
}

/// The supervisor's restart rule, also used by confd for the speaker it runs: pauses of
/// 1 s doubling to 30 s; a run of a minute or more counts as healthy and starts the
/// count again; [`GIVE_UP_AFTER`] failures in a row give up, so a part that can never
/// run (its port taken, its directory missing) ends on `/liveness`, where the
/// orchestrator sees it, as Calico's liveness probe reports a BIRD that keeps dying.
#[derive(Debug, Clone)]
pub struct RestartPolicy {
    backoff: Duration,
    failures: u32,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            backoff: FIRST_BACKOFF,
            failures: 0,
        }
    }
}

impl RestartPolicy {
    /// A run that lasted `ran_for` has ended: restart after how long, or give up.
    pub fn failed(&mut self, ran_for: Duration) -> Restart {
        if ran_for >= HEALTHY_RUN {
            *self = RestartPolicy::default();
        }
        self.failures += 1;
        if self.failures >= GIVE_UP_AFTER {
            return Restart::GiveUp {
                failures: self.failures,
            };
        }
        let pause = self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        Restart::After(pause)
    }
}

/// The liveness reason of an actor given up on: the last cause and the count.
pub fn given_up(why: &str, failures: u32) -> String {
    format!("{why} ({failures} failures in a row; not restarted)")
}

/// One run of an actor in a task of its own (so a panic is caught), ended early by a
/// fault from its port.
async fn run_once<F>(actor: F, faults: FaultPort) -> Result<ActorResult, String>
where
    F: Future<Output = ActorResult> + Send + 'static,
{
    let task = tokio::spawn(async move {
        let fault = async {
            match &faults {
                Some(port) => port.lock().await.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = actor => r,
            Some(f) = fault => match f {
                Fault::Fail(why) => Err(why),
                Fault::Panic(msg) => panic!("{msg}"),
            },
        }
    });
    task.await.map_err(|e| match e.try_into_panic() {
        Ok(p) => p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic without a message".into()),
        Err(e) => e.to_string(),
    })
}

/// The cause, in words, with the actor's name.
fn describe(name: &str, ended: Result<ActorResult, String>) -> String {
    match ended {
        Ok(Ok(())) => format!("{name} stopped unexpectedly"),
        Ok(Err(e)) => format!("{name} failed: {e}"),
        Err(panic) => format!("{name} panicked: {panic}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(h: &HealthAggregator, name: &str) -> (bool, Option<String>) {
        let r = h.snapshot();
        let s = r.reporters.iter().find(|r| r.name == name).unwrap();
        (s.live, s.reason.clone())
    }

    async fn until(what: &str, mut f: impl FnMut() -> bool) {
        for _ in 0..2000 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }

    fn supervisor(faults: Faults) -> (Supervisor, HealthAggregator, CancellationToken) {
        let h = HealthAggregator::new();
        let t = CancellationToken::new();
        (
            Supervisor::new(TaskTracker::new(), t.clone(), h.clone(), faults),
            h,
            t,
        )
    }

    #[tokio::test]
    async fn an_actor_that_ends_or_panics_turns_liveness_false_with_its_name() {
        let (s, h, _t) = supervisor(Faults::none());
        s.spawn_once("returns", None, async { Ok(()) });
        s.spawn_once("fails", None, async { Err("etcd gone".into()) });
        s.spawn_once("panics", None, async { panic!("index out of bounds") });
        until("all three reported", || {
            ["returns", "fails", "panics"]
                .iter()
                .all(|n| !live(&h, n).0)
        })
        .await;
        assert_eq!(
            live(&h, "returns").1.as_deref(),
            Some("returns stopped unexpectedly")
        );
        assert_eq!(
            live(&h, "fails").1.as_deref(),
            Some("fails failed: etcd gone")
        );
        assert_eq!(
            live(&h, "panics").1.as_deref(),
            Some("panics panicked: index out of bounds")
        );
        assert!(!h.snapshot().live);
        // A dead actor is not ready either: the node is not counted available while the
        // orchestrator waits for its liveness threshold.
        assert!(!h.snapshot().ready);
    }

    #[tokio::test]
    async fn nothing_is_reported_at_shutdown() {
        let (s, h, t) = supervisor(Faults::none());
        let token = t.clone();
        s.spawn_once("felix", None, async move {
            token.cancelled().await;
            Ok(())
        });
        t.cancel();
        s.tracker.close();
        s.tracker.wait().await;
        assert!(h.snapshot().live);
    }

    #[test]
    fn restart_pauses_double_to_a_cap_reset_after_a_healthy_run_and_give_up() {
        let quick = Duration::from_millis(10);
        let mut p = RestartPolicy::default();
        assert_eq!(p.failed(quick), Restart::After(Duration::from_secs(1)));
        assert_eq!(p.failed(quick), Restart::After(Duration::from_secs(2)));
        assert_eq!(p.failed(quick), Restart::After(Duration::from_secs(4)));
        // A minute of healthy running starts again from the first pause.
        assert_eq!(p.failed(HEALTHY_RUN), Restart::After(FIRST_BACKOFF));
        for want in [2, 4, 8] {
            assert_eq!(p.failed(quick), Restart::After(Duration::from_secs(want)));
        }
        assert_eq!(p.failed(quick), Restart::GiveUp { failures: 5 });
        let mut p = RestartPolicy {
            backoff: Duration::from_secs(16),
            failures: 0,
        };
        p.failed(quick);
        assert_eq!(
            p.failed(quick),
            Restart::After(MAX_BACKOFF),
            "capped at 30 s"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_restartable_actor_is_restarted_with_backoff_then_given_up() {
        let mut faults = Faults::none();
        let port = faults.port("gc");
        let (s, h, _t) = supervisor(faults);
        let runs = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let r = runs.clone();
        s.spawn_restarting("gc", None, move || {
            r.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::future::pending::<ActorResult>()
        });
        let count = || runs.load(std::sync::atomic::Ordering::SeqCst);
        until("first run", || count() == 1).await;
        let t0 = Instant::now();
        port.send(Fault::Panic("boom".into())).await.unwrap();
        until("second run", || count() == 2).await;
        assert!(t0.elapsed() >= FIRST_BACKOFF, "{:?}", t0.elapsed());
        assert!(live(&h, "gc").0, "restarted, still live");
        let t1 = Instant::now();
        port.send(Fault::Fail("x".into())).await.unwrap();
        until("third run", || count() == 3).await;
        assert!(t1.elapsed() >= FIRST_BACKOFF * 2, "backoff doubles");
        assert_eq!(s.restarts.with_label_values(&["gc"]).get(), 2);
        for _ in 0..GIVE_UP_AFTER - 2 {
            port.send(Fault::Fail("again".into())).await.unwrap();
        }
        until("given up", || !live(&h, "gc").0).await;
        assert_eq!(
            live(&h, "gc").1.as_deref(),
            Some("gc failed: again (5 failures in a row; not restarted)")
        );
    }
}
