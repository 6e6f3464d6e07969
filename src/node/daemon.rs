//! The calico-node daemon: start-up, then the actors on one tokio runtime.
//!
//! ```text
//!   etcd --list/watch--> [syncer] --SyncerEvent (mpsc 1024)--> [cluster view] (counts)
//!                           |--SyncerEvent--> [confd] --watch config--> [speaker] --routes--+
//!                           |--SyncerEvent--> [Felix] <------------------------------------+
//!                           |--SyncerEvent--> [tunnel-addrs] --IPAM, this Node--> etcd
//!                           +--> metrics registry --> [metrics HTTP :9091]
//!                           +--> health aggregator --> [health HTTP :9099]
//!   SIGTERM/SIGINT --> root CancellationToken --> every task (TaskTracker waits <= 2 s)
//! ```
//!
//! Every actor runs under the [`Supervisor`]: the endpoints, the BGP status socket and the
//! IPAM collector are restarted with backoff; the syncer and its consumers (cluster view,
//! confd with the speaker, Felix, the tunnel addresses) turn `/liveness` false with their name and the cause
//! when they end. confd restarts the speaker itself.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, info};

use super::config::NodeConfig;
use super::http;
use super::startup;
use super::supervisor::{Faults, Supervisor};
use crate::datastore::syncer::{
    CALICO_PREFIX, SyncStatus, Syncer, SyncerEvent, SyncerMetrics, UpdateType,
};
use crate::datastore::{Client, Datastore};
use crate::health::{ActorResult, HealthAggregator, HealthReporter};
use crate::model::FelixConfigurationSpec;

/// How long start-up waits for the datastore before giving up (the orchestrator restarts us).
pub const DATASTORE_WAIT: Duration = Duration::from_secs(60);
/// How long shutdown waits for tasks to finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// The effective Felix configuration: global, then per-node, then `FELIX_*` variables.
pub async fn felix_config(
    client: &Client,
    cfg: &NodeConfig,
) -> anyhow::Result<FelixConfigurationSpec> {
    let global = client
        .get::<FelixConfigurationSpec>(None, "default")
        .await?
        .map(|r| r.spec)
        .unwrap_or_default();
    let node = client
        .get::<FelixConfigurationSpec>(None, &format!("node.{}", cfg.nodename))
        .await?
        .map(|r| r.spec)
        .unwrap_or_default();
    let mut merged = FelixConfigurationSpec::merged(&global, &node);
    for (k, v) in &cfg.felix_env {
        if !merged.apply_env(k, v)? {
            tracing::warn!(variable = %k, "FELIX_ variable not interpreted by this version; ignored");
        }
    }
    Ok(merged)
}

/// Counts of what the datastore holds, kept from the syncer's events; logged when in sync.
/// This is where later issues' consumers (confd, Felix) attach.
async fn cluster_view(mut rx: tokio::sync::mpsc::Receiver<SyncerEvent>) {
    let mut kinds: BTreeMap<String, &'static str> = BTreeMap::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            SyncerEvent::Update(u) => match (u.update_type, u.value) {
                (UpdateType::Deleted, _) => {
                    kinds.remove(&u.key);
                }
                (_, Some(v)) => {
                    kinds.insert(u.key, v.kind());
                }
                _ => {}
            },
            SyncerEvent::Status(SyncStatus::InSync) => {
                let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
                for k in kinds.values() {
                    *counts.entry(k).or_default() += 1;
                }
                info!(?counts, "datastore in sync");
            }
            SyncerEvent::Status(SyncStatus::ResyncInProgress) => {
                info!("datastore resync in progress")
            }
        }
    }
}

/// The IPAM leak collector: look every `interval`, free what was seen twice; this node's
/// blocks, and those of nodes that no longer exist while it holds the lease (see
/// `ipam::gc`).
async fn ipam_gc(
    client: Client,
    node: String,
    interval: Duration,
    shutdown: CancellationToken,
    released: prometheus::IntCounter,
    leaks_gauge: prometheus::IntGauge,
) {
    use crate::ipam::gc;
    let ipam = crate::ipam::Ipam::new(client.datastore().clone());
    let mut seen = gc::LeakTracker::default();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        // Grace slightly under the interval, so the next round's sighting always counts;
        // the lease outlives two missed rounds.
        let pass = gc::collect(
            &ipam,
            &client,
            &node,
            &mut seen,
            interval.mul_f64(0.9),
            interval * 3,
        );
        match pass.await {
            Ok(pass) => {
                leaks_gauge.set(pass.seen as i64);
                for l in &pass.freed {
                    info!(leak = %l, "freed leaked IPAM state");
                }
                released.inc_by(pass.freed.len() as u64);
            }
            Err(e) => tracing::warn!(error = %e, "IPAM leak collection failed"),
        }
    }
}

async fn bind(host: &str, port: u16, what: &str) -> anyhow::Result<TcpListener> {
    // "localhost" (Felix's default health host) means IPv4 loopback, where probes connect,
    // whatever order the resolver would give.
    let host = if host == "localhost" {
        "127.0.0.1"
    } else {
        host
    };
    TcpListener::bind((host, port))
        .await
        .with_context(|| format!("cannot listen for {what} on {host}:{port}"))
}

/// The Felix settings known before the datastore is reachable: defaults and `FELIX_*`.
fn env_felix_config(cfg: &NodeConfig) -> anyhow::Result<FelixConfigurationSpec> {
    let mut f = FelixConfigurationSpec::default();
    for (k, v) in &cfg.felix_env {
        f.apply_env(k, v)?;
    }
    Ok(f)
}

/// Run calico-node until `shutdown` fires; returns after an orderly stop.
///
/// The health endpoint starts first (from defaults and `FELIX_*`), so that while the
/// datastore is unreachable a probe already gets "not ready" with the reason.
pub async fn run(cfg: NodeConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    run_with(cfg, shutdown, Faults::none()).await
}

/// [`run`], with test fault ports into the actors (see [`super::supervisor`]).
///
/// Everything runs inside a `node{name=...}` span (STYLE: spans per node): the supervisor
/// spawns each actor in the span it is called from, so every actor's lines name the node,
/// which tells the nodes of a lab apart when their logs are read together.
pub async fn run_with(
    cfg: NodeConfig,
    shutdown: CancellationToken,
    faults: Faults,
) -> anyhow::Result<()> {
    // At ERROR level: enabled whatever the log level, so warnings and errors carry it too.
    let span = tracing::error_span!("node", name = %cfg.nodename);
    run_in_span(cfg, shutdown, faults).instrument(span).await
}

async fn run_in_span(
    cfg: NodeConfig,
    shutdown: CancellationToken,
    faults: Faults,
) -> anyhow::Result<()> {
    let registry = http::new_registry();
    let health = HealthAggregator::new();
    let tracker = TaskTracker::new();
    let sup = Supervisor::new(tracker.clone(), shutdown.clone(), health.clone(), faults);
    registry
        .register(sup.metrics())
        .context("registering supervision metrics")?;
    let early = env_felix_config(&cfg)?;
    let startup_health = health.register("startup");
    startup_health.set_ready(false, Some("registering the node".into()));
    if early.health_enabled() {
        let listener = Arc::new(bind(early.health_host(), early.health_port(), "health").await?);
        let (h, token) = (health.clone(), shutdown.child_token());
        sup.spawn_restarting("health-endpoint", None, move || {
            let (l, h, token) = (listener.clone(), h.clone(), token.clone());
            async move {
                http::serve_health(l, h, http::ServeLimits::default(), token)
                    .await
                    .map_err(|e| e.to_string())
            }
        });
    }
    let result = run_started(
        &cfg,
        (&shutdown, &tracker),
        &sup,
        registry,
        &health,
        &startup_health,
    )
    .await;
    if let Err(e) = &result {
        error!("{e:#}");
    }
    tracker.close();
    if result.is_ok() {
        shutdown.cancelled().await;
        info!("shutting down");
    } else {
        shutdown.cancel();
    }
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        error!("tasks did not stop within {SHUTDOWN_GRACE:?}; exiting anyway");
    }
    result
}

async fn run_started(
    cfg: &NodeConfig,
    (shutdown, tracker): (&CancellationToken, &TaskTracker),
    sup: &Supervisor,
    registry: prometheus::Registry,
    health: &HealthAggregator,
    startup_health: &HealthReporter,
) -> anyhow::Result<()> {
    // The datastore's watch tasks run on the daemon's tracker, so shutdown waits for them.
    let ds: Arc<dyn Datastore> = cfg
        .datastore
        .connect_on(sup.tracker())
        .await
        .context("connecting to etcd")?;
    let client = Client::new(ds.clone());
    let report = |why: String| startup_health.set_ready(false, Some(why));
    let started = tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        r = startup::startup(&client, cfg, DATASTORE_WAIT, &report) => r?,
    };
    // Felix and the tunnel addresses are registered (not ready) before start-up says it is
    // ready: otherwise `/readiness` says 200 for the moment before they are.
    let felix_health = health.register("felix");
    let tunnel_health = health.register("tunnel-addrs");
    startup_health.set_ready(true, None);
    info!(node = %cfg.nodename, ipv4 = ?started.ipv4, "start-up complete");
    // Calico: the shutdown timestamp goes once the node is up again.
    match super::shutdown::remove_timestamp(&cfg.shutdown_timestamp_file) {
        Ok(Some(ts)) => info!(timestamp = %ts, "removed the shutdown timestamp"),
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(file = %cfg.shutdown_timestamp_file.display(), error = %e, "cannot remove the shutdown timestamp")
        }
    }
    let felix = felix_config(&client, cfg).await?;
    let early = env_felix_config(cfg)?;
    if (
        felix.health_enabled(),
        felix.health_port(),
        felix.health_host(),
    ) != (
        early.health_enabled(),
        early.health_port(),
        early.health_host(),
    ) {
        tracing::warn!(
            "health settings in the datastore's FelixConfiguration differ from the environment; the environment's apply until restart"
        );
    }

    let syncer_metrics = SyncerMetrics::new(&registry).context("registering syncer metrics")?;
    let syncer_health = health.register("datastore-syncer");
    let mut syncer = Syncer::new(ds.clone(), CALICO_PREFIX)
        .with_metrics(syncer_metrics)
        .with_health(syncer_health.clone());
    let view_rx = syncer.subscribe(1024);
    let felix_rx = syncer.subscribe(1024);
    let tunnel_rx = syncer.subscribe(1024);
    // The actors below are fed by the syncer's subscriptions, made once: one that ends
    // cannot be restarted alone, so its end makes the node not live (supervisor module).
    sup.spawn_once("cluster-view", None, async move {
        cluster_view(view_rx).await;
        Err("its datastore feed closed".into())
    });
    // BGP (backend `bird`): confd follows the datastore and drives the native speaker,
    // whose best routes go to Felix. With `vxlan` or `none` the datastore alone drives
    // the dataplane (VXLAN routes need no BGP).
    let felix_metrics =
        crate::felix::actor::FelixMetrics::new(&registry).context("registering Felix metrics")?;
    let (bgp_tx, bgp_rx) = tokio::sync::mpsc::channel(64);
    if cfg.backend == super::config::NetworkingBackend::Bird {
        let (status_tx, status_rx) = tokio::sync::watch::channel(Vec::new());
        registry
            .register(Box::new(crate::bgp::metrics::BgpMetrics::new(
                status_rx.clone(),
            )))
            .context("registering BGP metrics")?;
        let (path, token) = (cfg.bgp_status_socket.clone(), shutdown.child_token());
        sup.spawn_restarting("bgp-status-socket", None, move || {
            let (path, rx, token) = (path.clone(), status_rx.clone(), token.clone());
            async move {
                crate::bgp::status::serve(path.clone(), rx, token)
                    .await
                    .map_err(|e| format!("{}: {e}", path.display()))
            }
        });
        // confd restarts the speaker itself when it fails, under the supervisor's rule
        // and restart counter, and reports it dead on this entry (confd::actor).
        let bgp_health = health.register("bgp");
        sup.spawn_once(
            "bgp",
            Some(bgp_health.clone()),
            crate::confd::actor::run(
                cfg.nodename.clone(),
                syncer.subscribe(1024),
                crate::confd::actor::Output::Speaker {
                    felix: bgp_tx,
                    status: status_tx,
                    restarts: sup.restart_counter("bgp"),
                },
                bgp_health,
                shutdown.child_token(),
                sup.fault_input("bgp"),
            ),
        );
    } else {
        drop(bgp_tx);
    }
    if cfg.backend == super::config::NetworkingBackend::BirdExternal {
        // confd renders BIRD's configuration; BIRD programs BGP's routes itself.
        let confd_health = health.register("confd");
        sup.spawn_once(
            "confd",
            Some(confd_health.clone()),
            crate::confd::actor::run(
                cfg.nodename.clone(),
                syncer.subscribe(1024),
                crate::confd::actor::Output::Bird {
                    dir: cfg.bird_config_dir.clone(),
                    socket: cfg.bird_socket.clone(),
                },
                confd_health,
                shutdown.child_token(),
                sup.fault_input("confd"),
            ),
        );
    }
    // This node's tunnel addresses, apart from Felix (Calico's `-allocate-tunnel-addrs`):
    // its failures make the node not ready under its own name, and are retried.
    sup.spawn_once(
        "tunnel-addrs",
        Some(tunnel_health.clone()),
        super::tunnel_addrs::run(
            cfg.nodename.clone(),
            client.clone(),
            tunnel_rx,
            tunnel_health,
            shutdown.child_token(),
        ),
    );
    sup.spawn_once(
        "felix",
        Some(felix_health.clone()),
        crate::felix::actor::run(
            crate::felix::actor::Config {
                node: cfg.nodename.clone(),
                mtu_file: Some(cfg.state_dir.join("mtu")),
                faults: sup.fault_input("felix"),
                tasks: tracker.clone(),
                env: cfg.felix_env.clone(),
            },
            felix_rx,
            bgp_rx,
            felix_metrics,
            felix_health,
            shutdown.child_token(),
        ),
    );

    let token = shutdown.child_token();
    sup.spawn_once("datastore-syncer", Some(syncer_health), async move {
        match syncer.run(token).await {
            crate::datastore::syncer::SyncerExit::NoSubscribers => {
                Err("every consumer of the datastore went away".into())
            }
            exit => Err(format!("{exit:?}")),
        }
    });

    if let Some(interval) = cfg.ipam_gc_interval {
        let released = prometheus::IntCounter::new(
            "calico_ipam_gc_released_total",
            "Leaked IPAM allocations and affinities freed by this node.",
        )?;
        let leaks = prometheus::IntGauge::new(
            "calico_ipam_leaks",
            "IPAM leaks seen in the last check (freed once seen twice).",
        )?;
        registry.register(Box::new(released.clone()))?;
        registry.register(Box::new(leaks.clone()))?;
        let (client, token) = (client.clone(), shutdown.child_token());
        let node = cfg.nodename.clone();
        sup.spawn_restarting("ipam-gc", None, move || {
            ended(ipam_gc(
                client.clone(),
                node.clone(),
                interval,
                token.clone(),
                released.clone(),
                leaks.clone(),
            ))
        });
    }
    if felix.prometheus_enabled() {
        let listener =
            Arc::new(bind(felix.prometheus_host(), felix.prometheus_port(), "metrics").await?);
        let token = shutdown.child_token();
        sup.spawn_restarting("metrics-endpoint", None, move || {
            let (l, r, token) = (listener.clone(), registry.clone(), token.clone());
            async move {
                http::serve_metrics(l, r, http::ServeLimits::default(), token)
                    .await
                    .map_err(|e| e.to_string())
            }
        });
    }
    Ok(())
}

/// An actor that runs until shutdown: returning is itself the failure.
async fn ended(actor: impl std::future::Future<Output = ()>) -> ActorResult {
    actor.await;
    Ok(())
}
