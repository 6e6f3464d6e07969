//! The confd actor: follows the syncer, recomputes the speaker's configuration after each
//! burst of updates, starts the speaker once the datastore is in sync and this node can run
//! BGP, and hands it every later configuration on a `watch` channel. Readiness says why BGP
//! is not up, in words.
//!
//! ```text
//!   [syncer] --SyncerEvent--> [confd] --watch DesiredBgpConfig--> [speaker] --routes--> [Felix]
//!                                                                     |
//!                         readiness <-- peer reasons <-- watch PeerStatus --> status socket, metrics
//! ```

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::calc::ConfdState;
use crate::bgp::RouteUpdate;
use crate::bgp::config::DesiredBgpConfig;
use crate::bgp::fsm::State;
use crate::bgp::speaker::{PeerStatus, Speaker};
use crate::datastore::syncer::SyncerEvent;
use crate::node::http::HealthReporter;

/// How long after a speaker failure (e.g. its port is taken) it is started again.
const RESTART_AFTER: Duration = Duration::from_secs(5);

struct Running {
    config: watch::Sender<DesiredBgpConfig>,
    task: JoinHandle<std::io::Result<()>>,
    cancel: CancellationToken,
}

/// Where the configuration goes.
pub enum Output {
    /// The native speaker: its best routes to Felix, its sessions to `status`.
    Speaker {
        felix: mpsc::Sender<Vec<RouteUpdate>>,
        status: watch::Sender<Vec<PeerStatus>>,
    },
    /// BIRD 2 configuration files in `dir`; the BIRD listening on `socket` (if any) is
    /// told to reload after each change.
    Bird { dir: PathBuf, socket: PathBuf },
}

/// Run confd, and the speaker it drives, until `cancel`.
pub async fn run(
    node: String,
    mut datastore: mpsc::Receiver<SyncerEvent>,
    output: Output,
    health: HealthReporter,
    cancel: CancellationToken,
) {
    let (felix, status, bird) = match output {
        Output::Speaker { felix, status } => (Some(felix), status, None),
        Output::Bird { dir, socket } => (None, watch::channel(Vec::new()).0, Some((dir, socket))),
    };
    health.set_ready(false, Some("waiting for the datastore".into()));
    let mut state = ConfdState::new(&node);
    let mut running: Option<Running> = None;
    let mut restart_at: Option<Instant> = None;
    let mut problems: Vec<String> = Vec::new();
    let mut not_ready: Option<String> = Some("waiting for the datastore".into());
    let mut peers = status.subscribe();
    loop {
        let mut changed = false;
        tokio::select! {
            _ = cancel.cancelled() => break,
            ev = datastore.recv() => {
                let Some(ev) = ev else { break };
                changed = state.apply(&ev);
                // A burst (the initial snapshot, a pool edit) is folded in before computing.
                while let Ok(ev) = datastore.try_recv() {
                    changed |= state.apply(&ev);
                }
            }
            ended = async { (&mut running.as_mut().expect("guarded").task).await }, if running.is_some() => {
                running = None;
                let why = match ended {
                    Ok(Ok(())) => "the BGP speaker stopped".to_string(),
                    Ok(Err(e)) => format!("the BGP speaker failed: {e}"),
                    Err(e) => format!("the BGP speaker crashed: {e}"),
                };
                error!("{why}; restarting it in {RESTART_AFTER:?}");
                not_ready = Some(why);
                restart_at = Some(Instant::now() + RESTART_AFTER);
            }
            _ = sleep_until(restart_at) => {
                restart_at = None;
                changed = true;
            }
            r = peers.changed() => {
                if r.is_err() { break; }
            }
        }
        if changed && state.in_sync && restart_at.is_none() {
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
                            not_ready = Some(e);
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
                Err(why) => not_ready = Some(why.0),
            }
        }
        report(&health, not_ready.as_deref(), &peers.borrow_and_update());
    }
    if let Some(r) = running {
        r.cancel.cancel();
        let _ = r.task.await;
    }
}

/// Render and write BIRD's files; when they changed, have BIRD reload them.
async fn write_bird(
    dir: &std::path::Path,
    socket: &std::path::Path,
    d: &super::calc::Desired,
) -> Result<(), String> {
    let files = super::bird::render(&d.config, &d.kernel_pools)?;
    let changed = super::bird::write(dir, &files)
        .map_err(|e| format!("cannot write BIRD configuration in {}: {e}", dir.display()))?;
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
        .map_err(|e| format!("cannot run birdc: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !text.contains("Reconfigur") {
        return Err(format!(
            "BIRD did not take the configuration: {}",
            text.trim()
        ));
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
    let task = tokio::spawn(speaker.run(rx, cancel.clone()));
    Running {
        config,
        task,
        cancel,
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
