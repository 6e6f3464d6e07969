//! Supervision of the daemon's actors: none may end or panic silently.
//!
//! An actor whose inputs can be made again (an endpoint's listener, the IPAM collector's
//! datastore client) is restarted with backoff (1 s doubling to 30 s, back to 1 s after it
//! ran a minute); after [`crate::health::GIVE_UP_AFTER`] failures in a row it is reported dead instead.
//! confd applies the same rule ([`crate::health::RestartPolicy`]) to the BGP speaker it runs, counted in
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

use tokio::sync::{Mutex, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, warn};

use crate::health::{
    ActorResult, Fault, FaultInput, HealthAggregator, HealthReporter, Restart, RestartPolicy,
    given_up,
};

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
        let tracker = self.tracker.clone();
        // In the caller's span (the daemon's `node{name=...}`), as are the actor's lines.
        let task = async move {
            let ended = run_once(&tracker, actor, faults).await;
            if shutdown.is_cancelled() {
                return;
            }
            let why = describe(&name, ended);
            error!("{why}; the node reports itself not live");
            reporter.set_live(false, Some(why));
        };
        self.tracker.spawn(task.in_current_span());
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
        let tracker = self.tracker.clone();
        let task = async move {
            let mut policy = RestartPolicy::default();
            loop {
                let started = Instant::now();
                let ended = run_once(&tracker, make(), faults.clone()).await;
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
        };
        self.tracker.spawn(task.in_current_span());
    }

    /// The daemon's tracker, for tasks spawned below the actors (the datastore's watches),
    /// so that shutdown waits for them too.
    pub fn tracker(&self) -> TaskTracker {
        self.tracker.clone()
    }

    /// The restart counter of actor `name`, for an actor that restarts a part of itself
    /// (confd restarts the BGP speaker) under the same metric.
    pub fn restart_counter(&self, name: &str) -> prometheus::IntCounter {
        self.restarts.with_label_values(&[name])
    }
}

/// One run of an actor in a task of its own on the daemon's tracker (so a panic is caught,
/// and shutdown waits for it), ended early by a fault from its port.
async fn run_once<F>(
    tracker: &TaskTracker,
    actor: F,
    faults: FaultPort,
) -> Result<ActorResult, String>
where
    F: Future<Output = ActorResult> + Send + 'static,
{
    let run = async move {
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
    };
    let task = tracker.spawn(run.in_current_span());
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
    use std::time::Duration;

    use crate::health::{FIRST_BACKOFF, GIVE_UP_AFTER};

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
