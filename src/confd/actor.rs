//! The confd actor: follows the syncer, recomputes the speaker's configuration after each
//! burst of updates, starts the speaker once the datastore is in sync and this node can run
//! BGP, and hands it every later configuration on a `watch` channel. Readiness says why BGP
//! is not up, in words.
//!
//! A speaker that fails (its port taken, a panic) is restarted under the supervisor's
//! rule ([`RestartPolicy`]: 1 s doubling to 30 s, counted in
//! `calico_node_actor_restarts_total{actor="bgp"}`); after repeated failures confd gives
//! up and turns liveness false with the cause, as Calico's `-bird-live` fails when BIRD
//! keeps dying, so the orchestrator restarts the node.
//!
//! ```text
//!   [syncer] --SyncerEvent--> [confd] --watch DesiredBgpConfig--> [speaker] --routes--> [Felix]
//!                                                                     |
//!                         readiness <-- peer reasons <-- watch PeerStatus --> status socket, metrics
//! ```

use std::path::PathBuf;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, warn};

use super::bird::RenderError;
use super::calc::{ConfdState, ConfigProblem};
use crate::bgp::RouteUpdate;
use crate::bgp::config::DesiredBgpConfig;
use crate::bgp::fsm::State;
use crate::bgp::speaker::{PeerStatus, Speaker};
use crate::datastore::syncer::SyncerEvent;
use crate::health::{
    ActorResult, FaultInput, HealthReporter, Restart, RestartPolicy, given_up, next_fault,
};

struct Running {
    config: watch::Sender<DesiredBgpConfig>,
    task: JoinHandle<std::io::Result<()>>,
    /// Cancels the speaker when dropped, however confd ends (closing `config` also stops
    /// it; the guard makes the stop explicit rather than a side effect).
    cancel: tokio_util::sync::DropGuard,
    started: Instant,
}

/// Where the configuration goes.
pub enum Output {
    /// The native speaker: its best routes to Felix, its sessions to `status`; each
    /// restart after a failure counted in `restarts`.
    Speaker {
        felix: mpsc::Sender<Vec<RouteUpdate>>,
        status: watch::Sender<Vec<PeerStatus>>,
        restarts: prometheus::IntCounter,
    },
    /// BIRD 2 configuration files in `dir`; the BIRD listening on `socket` (if any) is
    /// told to reload after each change.
    Bird { dir: PathBuf, socket: PathBuf },
}

/// Run confd, and the speaker it drives, until `cancel` (then `Ok`); an `Err` says why it
/// ended before. `faults`: a test's failures, acted out in this loop. The speaker stops
/// with confd, however confd ends.
pub async fn run(
    node: String,
    mut datastore: mpsc::Receiver<SyncerEvent>,
    output: Output,
    health: HealthReporter,
    cancel: CancellationToken,
    mut faults: FaultInput,
) -> ActorResult {
    let (felix, status, bird, restarts) = match output {
        Output::Speaker {
            felix,
            status,
            restarts,
        } => (Some(felix), status, None, Some(restarts)),
        Output::Bird { dir, socket } => (
            None,
            watch::channel(Vec::new()).0,
            Some((dir, socket)),
            None,
        ),
    };
    health.set_ready(false, Some("waiting for the datastore".into()));
    let mut state = ConfdState::new(&node);
    let mut running: Option<Running> = None;
    let mut restart_at: Option<Instant> = None;
    let mut policy = RestartPolicy::default();
    // Why the speaker was given up on: confd runs on, reporting it dead.
    let mut dead: Option<String> = None;
    let mut problems: Vec<ConfigProblem> = Vec::new();
    let mut not_ready: Option<String> = Some("waiting for the datastore".into());
    let mut peers = status.subscribe();
    let end = loop {
        let mut changed = false;
        tokio::select! {
            _ = cancel.cancelled() => break Ok(()),
            fault = next_fault(&mut faults) => break Err(fault.strike()),
            ev = datastore.recv() => {
                let Some(ev) = ev else { break Err("its datastore feed closed".into()) };
                changed = state.apply(&ev);
                // A burst (the initial snapshot, a pool edit) is folded in before computing.
                while let Ok(ev) = datastore.try_recv() {
                    changed |= state.apply(&ev);
                }
            }
            ended = async { (&mut running.as_mut().expect("guarded").task).await }, if running.is_some() => {
                let ran_for = running.take().expect("guarded").started.elapsed();
                let why = speaker_ended(ended).to_string();
                match policy.failed(ran_for) {
                    Restart::After(pause) => {
                        error!("{why}; restarting it in {pause:?}");
                        restart_at = Some(Instant::now() + pause);
                        not_ready = Some(why);
                    }
                    Restart::GiveUp { failures } => {
                        let why = given_up(&why, failures);
                        error!("{why}; the node reports itself not live");
                        health.set_live(false, Some(why.clone()));
                        dead = Some(why);
                    }
                }
            }
            _ = sleep_until(restart_at) => {
                restart_at = None;
                changed = true;
                if let Some(r) = &restarts {
                    r.inc();
                }
            }
            r = peers.changed() => {
                if r.is_err() { break Err("the speaker's status feed closed".into()); }
            }
        }
        if let Some(why) = &dead {
            not_ready = Some(why.clone());
        } else if changed && state.in_sync && restart_at.is_none() {
            match state.desired() {
                Ok(d) => {
                    not_ready = None;
                    if d.problems != problems {
                        for p in &d.problems {
                            warn!("BGP configuration: {p}");
                        }
                        problems = d.problems.clone();
                    }
                    if let Some((dir, socket)) = &bird {
                        if let Err(e) = write_bird(dir, socket, &d).await {
                            not_ready = Some(e.to_string());
                        }
                        report(&health, not_ready.as_deref(), &[]);
                        continue;
                    }
                    let felix = felix.as_ref().expect("a speaker output");
                    match &running {
                        Some(r) => {
                            r.config.send_if_modified(|c| {
                                let differs = *c != d.config;
                                if differs {
                                    info!(
                                        peers = d.config.peers.len(),
                                        exports = d.config.export.len(),
                                        "BGP configuration changed"
                                    );
                                    *c = d.config.clone();
                                }
                                differs
                            });
                        }
                        None => {
                            info!(router_id = %d.config.router_id, asn = d.config.local_as.0, peers = d.config.peers.len(), "starting the BGP speaker");
                            running = Some(start(d.config, felix, &status, &cancel));
                        }
                    }
                }
                Err(why) => not_ready = Some(why.to_string()),
            }
        }
        report(&health, not_ready.as_deref(), &peers.borrow_and_update());
    };
    if let Some(r) = running {
        drop(r.cancel);
        let _ = r.task.await;
    }
    end
}

/// Why the speaker's task ended (the reason for readiness, and for liveness once confd
/// gives up on it).
#[derive(Debug, thiserror::Error)]
enum SpeakerEnded {
    /// It returned without an error (it should run until cancelled).
    #[error("the BGP speaker stopped")]
    Stopped,
    /// It returned an error (its port taken, ...).
    #[error("the BGP speaker failed: {0}")]
    Failed(std::io::Error),
    /// It panicked, with this message.
    #[error("the BGP speaker panicked: {0}")]
    Panicked(String),
    /// Its task was cancelled from outside.
    #[error("the BGP speaker crashed: {0}")]
    Crashed(tokio::task::JoinError),
}

/// Why the speaker's task ended.
fn speaker_ended(ended: Result<std::io::Result<()>, tokio::task::JoinError>) -> SpeakerEnded {
    match ended {
        Ok(Ok(())) => SpeakerEnded::Stopped,
        Ok(Err(e)) => SpeakerEnded::Failed(e),
        Err(e) => match e.try_into_panic() {
            Ok(p) => SpeakerEnded::Panicked(
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "a panic without a message".into()),
            ),
            Err(e) => SpeakerEnded::Crashed(e),
        },
    }
}

/// Why BIRD's configuration could not be put in place (readiness says it; the running
/// BIRD keeps its last configuration).
#[derive(Debug, thiserror::Error)]
pub enum BirdError {
    /// A value BIRD cannot express.
    #[error(transparent)]
    Render(#[from] RenderError),
    /// The files could not be written.
    #[error("cannot write BIRD configuration in {}: {error}", dir.display())]
    Write { dir: PathBuf, error: std::io::Error },
    /// `birdc` could not be run.
    #[error("cannot run birdc: {0}")]
    NoBirdc(std::io::Error),
    /// BIRD refused the new files (`birdc configure` did not say it reconfigured).
    #[error("BIRD did not take the configuration: {output}")]
    Refused { output: String },
}

/// Render and write BIRD's files; when they changed, have BIRD reload them.
async fn write_bird(
    dir: &std::path::Path,
    socket: &std::path::Path,
    d: &super::calc::Desired,
) -> Result<(), BirdError> {
    let files = super::bird::render(&d.config, &d.kernel_pools)?;
    let changed = super::bird::write(dir, &files).map_err(|error| BirdError::Write {
        dir: dir.to_path_buf(),
        error,
    })?;
    if !changed {
        return Ok(());
    }
    info!(dir = %dir.display(), peers = d.config.peers.len(), "BIRD configuration written");
    if !socket.exists() {
        return Ok(());
    }
    let out = tokio::process::Command::new(crate::env::program("birdc"))
        .arg("-s")
        .arg(socket)
        .arg("configure")
        .output()
        .await
        .map_err(BirdError::NoBirdc)?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !text.contains("Reconfigur") {
        return Err(BirdError::Refused {
            output: text.trim().to_string(),
        });
    }
    Ok(())
}

fn start(
    cfg: DesiredBgpConfig,
    felix: &mpsc::Sender<Vec<RouteUpdate>>,
    status: &watch::Sender<Vec<PeerStatus>>,
    cancel: &CancellationToken,
) -> Running {
    let (config, rx) = watch::channel(cfg.clone());
    let speaker = Speaker::new(cfg, felix.clone(), status.clone());
    let cancel = cancel.child_token();
    // Awaited by confd however it ends (so within the daemon's tracked task), and in
    // confd's span (the node's).
    let task = tokio::spawn(speaker.run(rx, cancel.clone()).in_current_span());
    Running {
        config,
        task,
        cancel: cancel.drop_guard(),
        started: Instant::now(),
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Ready when the speaker runs and every peer is Established; otherwise say why.
fn report(health: &HealthReporter, not_ready: Option<&str>, peers: &[PeerStatus]) {
    if let Some(why) = not_ready {
        health.set_ready(false, Some(why.to_string()));
        return;
    }
    let down: Vec<String> = peers
        .iter()
        .filter(|p| p.state != State::Established)
        .map(|p| {
            let reason = if p.reason.is_empty() {
                format!("session {:?}", p.state)
            } else {
                p.reason.clone()
            };
            format!("BGP not established with {}: {reason}", p.address)
        })
        .collect();
    if down.is_empty() {
        health.set_ready(true, None);
    } else {
        health.set_ready(false, Some(down.join("; ")));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::datastore::syncer::{SyncStatus, SyncValue, Update, UpdateType};
    use crate::health::{Fault, HealthAggregator};
    use crate::model::bgp::BGPConfigurationSpec;
    use crate::model::node::{NodeBGPSpec, NodeSpec};
    use crate::model::{AnyResource, Resource};

    const P: &str = "/calico/resources/v3/projectcalico.org";

    fn update(key: &str, value: AnyResource) -> SyncerEvent {
        SyncerEvent::Update(Update {
            key: format!("{P}/{key}"),
            update_type: UpdateType::New,
            value: Some(Arc::new(SyncValue::Resource(value))),
            revision: 1,
        })
    }

    /// node-a at 127.0.0.1 whose speaker must listen on 127.0.0.1:`port`.
    fn snapshot(port: u16) -> Vec<SyncerEvent> {
        let node = NodeSpec {
            bgp: Some(NodeBGPSpec {
                ipv4_address: Some("127.0.0.1/8".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let bgp = BGPConfigurationSpec {
            listen_port: Some(port.into()),
            bind_mode: Some("NodeIP".into()),
            ..Default::default()
        };
        vec![
            update(
                "nodes/node-a",
                AnyResource::Node(Resource::new("node-a", node)),
            ),
            update(
                "bgpconfigurations/default",
                AnyResource::BGPConfiguration(Resource::new("default", bgp)),
            ),
            SyncerEvent::Status(SyncStatus::InSync),
        ]
    }

    fn entry(h: &HealthAggregator) -> crate::health::ReporterState {
        h.snapshot()
            .reporters
            .into_iter()
            .find(|r| r.name == "bgp")
            .unwrap()
    }

    /// A speaker whose port another socket holds fails at every start: confd restarts it
    /// after 1, 2, 4 and 8 s (counted), then gives up and reports the cause on liveness,
    /// which later readiness reports do not hide. Before, it was restarted every 5 s
    /// forever and the node stayed live.
    #[tokio::test(start_paused = true)]
    async fn a_speaker_that_keeps_failing_is_restarted_with_backoff_then_reported_dead() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let (tx, rx) = mpsc::channel(16);
        for ev in snapshot(port) {
            tx.send(ev).await.unwrap();
        }
        let health = HealthAggregator::new();
        let restarts = prometheus::IntCounter::new("restarts", "restarts").unwrap();
        let (felix, _felix_rx) = mpsc::channel(16);
        let cancel = CancellationToken::new();
        let t0 = Instant::now();
        let confd = tokio::spawn(run(
            "node-a".into(),
            rx,
            Output::Speaker {
                felix,
                status: watch::channel(Vec::new()).0,
                restarts: restarts.clone(),
            },
            health.register("bgp"),
            cancel.clone(),
            None,
        ));
        // When each restart was counted, in whole seconds from the start.
        let mut seen = Vec::new();
        while entry(&health).live {
            assert!(t0.elapsed() < Duration::from_secs(60), "never given up");
            if seen.len() < restarts.get() as usize {
                seen.push(t0.elapsed().as_secs());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_secs(15) && took < Duration::from_secs(16),
            "pauses of 1 + 2 + 4 + 8 s: {took:?}"
        );
        assert_eq!(
            seen,
            [1, 3, 7],
            "restarted after 1, 2 and 4 s (the 4th dies at once)"
        );
        assert_eq!(restarts.get(), 4);
        let dead = entry(&health);
        assert!(!dead.ready);
        assert_eq!(
            dead.reason,
            Some(format!(
                "the BGP speaker failed: {} (5 failures in a row; not restarted)",
                std::io::Error::from_raw_os_error(libc::EADDRINUSE)
            ))
        );
        // confd follows the datastore on without starting the speaker again, and the
        // cause stays on the report.
        tx.send(SyncerEvent::Status(SyncStatus::ResyncInProgress))
            .await
            .unwrap();
        for ev in snapshot(port) {
            tx.send(ev).await.unwrap();
        }
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(restarts.get(), 4);
        assert_eq!(entry(&health), dead);
        cancel.cancel();
        assert_eq!(confd.await.unwrap(), Ok(()), "cancelled: no failure");
        drop(held);
    }

    /// Whether a speaker listens on 127.0.0.1:`port`.
    fn taken(port: u16) -> bool {
        std::net::TcpListener::bind(("127.0.0.1", port)).is_err()
    }

    async fn until(what: &str, mut f: impl FnMut() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }

    /// A fault through confd's own input ends confd inside its loop: an error through its
    /// own exit path, or a panic there. Either way the speaker it runs stops with it (its
    /// port is free again), as when a real failure ends confd.
    #[tokio::test]
    async fn a_fault_in_confds_own_loop_ends_it_and_stops_its_speaker() {
        for (fault, want) in [
            (Fault::Fail("injected".into()), "failed"),
            (Fault::Panic("injected".into()), "panicked"),
        ] {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let (tx, rx) = mpsc::channel(16);
            for ev in snapshot(port) {
                tx.send(ev).await.unwrap();
            }
            let health = HealthAggregator::new();
            let (felix, _felix_rx) = mpsc::channel(16);
            let (faults, fault_rx) = mpsc::channel(1);
            let confd = tokio::spawn(run(
                "node-a".into(),
                rx,
                Output::Speaker {
                    felix,
                    status: watch::channel(Vec::new()).0,
                    restarts: prometheus::IntCounter::new("r", "r").unwrap(),
                },
                health.register("bgp"),
                CancellationToken::new(),
                Some(fault_rx),
            ));
            until("the speaker listening", || taken(port)).await;
            faults.send(fault).await.unwrap();
            let ended = match confd.await {
                Ok(Err(why)) => format!("failed: {why}"),
                Ok(Ok(())) => "returned".into(),
                Err(e) => {
                    let p = e.into_panic();
                    let msg = p.downcast_ref::<String>().cloned().unwrap_or_default();
                    format!("panicked: {msg}")
                }
            };
            assert_eq!(ended, format!("{want}: injected"));
            until("the speaker stopped", || !taken(port)).await;
        }
    }

    /// BIRD's configuration that cannot be put in place is a typed error naming the value
    /// or the directory, in the words readiness shows; nothing is written.
    #[tokio::test]
    async fn bird_configuration_failures_name_the_value_or_the_directory() {
        use crate::bgp::config::{DesiredPeer, PeerType};
        let mut config = DesiredBgpConfig::new("10.0.0.2".parse().unwrap(), 64512);
        let d = |config: DesiredBgpConfig| super::super::calc::Desired {
            config,
            problems: Vec::new(),
            kernel_pools: Vec::new(),
        };
        let no_socket = std::path::Path::new("/nonexistent/bird.ctl");
        // A file where the directory should be.
        let dir = std::path::Path::new("/dev/null/bird");
        let e = write_bird(dir, no_socket, &d(config.clone()))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, BirdError::Write { dir: d, .. } if d == dir),
            "{e:?}"
        );
        assert!(
            e.to_string()
                .starts_with("cannot write BIRD configuration in /dev/null/bird: "),
            "{e}"
        );
        let mut peer = DesiredPeer::new("10.0.0.1".parse().unwrap(), 64512, PeerType::Global);
        peer.password = Some("a\nb".into());
        config.peers.push(peer);
        let e = write_bird(dir, no_socket, &d(config)).await.unwrap_err();
        assert!(
            matches!(
                &e,
                BirdError::Render(RenderError::Password { peer }) if peer.to_string() == "10.0.0.1"
            ),
            "{e:?}"
        );
    }
}
