//! calico-node: the node daemon (see `calico_node::node`).
//!
//! `calico-node` runs everything. Calico's flags (`calico_node::node::cli`) select the
//! other modes: `-startup` only performs start-up (register the node, default pool,
//! ClusterInformation, nodename file) and exits; `-felix-ready -bird-ready` and the other
//! probe flags ask the running node (`calico_node::node::probe`); `-shutdown` is the
//! preStop hook; `-allocate-tunnel-addrs` settles the tunnel addresses once;
//! `-monitor-addresses` keeps the Node's address current.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Context;
use calico_node::env::{Env, ProcessEnv};
use calico_node::node::cli::{self, Command};
use calico_node::node::{config::NodeConfig, daemon, probe, shutdown, startup};
use tokio_util::sync::CancellationToken;

fn init_logging(env: &dyn Env) {
    let level = env
        .non_empty("FELIX_LOGSEVERITYSCREEN")
        .map(|l| match l.to_ascii_lowercase().as_str() {
            "debug" => "debug",
            "trace" => "trace",
            "warning" | "warn" => "warn",
            "error" | "fatal" | "panic" => "error",
            _ => "info",
        })
        .unwrap_or("info");
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // Colours only for a person at a terminal: under `kubectl logs` or in a log file the
    // escape codes would be printed as they are.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

/// Connect to the datastore named by the environment.
async fn client(cfg: &NodeConfig) -> anyhow::Result<calico_node::datastore::Client> {
    let ds = cfg
        .datastore
        .connect()
        .await
        .context("connecting to etcd")?;
    Ok(calico_node::datastore::Client::new(ds))
}

/// Cancelled on SIGTERM or SIGINT. The listening task is the root of shutdown, so it is on
/// no tracker: it ends when the signal comes, or with the runtime.
fn on_signal() -> CancellationToken {
    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        signals.cancel();
    });
    shutdown
}

async fn run(command: Command) -> anyhow::Result<()> {
    let cfg = NodeConfig::from_env(&ProcessEnv).context("calico-node configuration")?;
    match command {
        Command::Startup => {
            let client = client(&cfg).await?;
            startup::startup(&client, &cfg, daemon::DATASTORE_WAIT, &|_| {}).await?;
            let ts = &cfg.shutdown_timestamp_file;
            shutdown::remove_timestamp(ts).with_context(|| format!("removing {}", ts.display()))?;
            Ok(())
        }
        Command::AllocateTunnelAddrs => {
            let client = client(&cfg).await?;
            let (pools, _) = client
                .list::<calico_node::model::IPPoolSpec>(None)
                .await
                .context("listing IP pools")?;
            let ipam = calico_node::ipam::Ipam::new(client.datastore().clone());
            let changes = calico_node::node::tunnel_addrs::reconcile(
                &client,
                &ipam,
                &cfg.nodename,
                pools.iter().map(|p| &p.spec),
            )
            .await
            .map_err(anyhow::Error::msg)
            .context("tunnel addresses")?;
            for c in changes {
                tracing::info!("{c}");
            }
            Ok(())
        }
        Command::MonitorAddresses => {
            let client = client(&cfg).await?;
            let interval = match ProcessEnv.non_empty("AUTODETECT_POLL_INTERVAL") {
                None => startup::MONITOR_POLL_INTERVAL,
                Some(v) => cli::parse_go_duration(v.trim())
                    .map_err(anyhow::Error::msg)
                    .with_context(|| format!("AUTODETECT_POLL_INTERVAL='{v}'"))?,
            };
            startup::monitor_addresses(&client, &cfg, interval, &on_signal()).await?;
            Ok(())
        }
        _ => daemon::run(cfg, on_signal()).await,
    }
}

/// The probe flags: every failure on stdout (Calico prints there), exit 1 if any.
fn health(checks: &cli::HealthChecks) -> i32 {
    let cfg = match probe::ProbeConfig::from_env(&ProcessEnv) {
        Ok(c) => c,
        Err(e) => {
            println!("calico/node check error: {e}");
            return 1;
        }
    };
    let failures = probe::run(checks, &cfg);
    for f in &failures {
        println!("{f}");
    }
    i32::from(!failures.is_empty())
}

/// `-shutdown`: save the timestamp; errors are logged and the hook still succeeds, as
/// Calico's does (the kubelet goes on with SIGTERM either way).
fn prestop() {
    let state = ProcessEnv.non_empty("CALICO_STATE_DIR").map_or_else(
        || std::path::PathBuf::from(calico_node::node::config::DEFAULT_STATE_DIR),
        std::path::PathBuf::from,
    );
    let path = shutdown::timestamp_file(&ProcessEnv, &state);
    let node = calico_node::env::determine_nodename(&ProcessEnv);
    match shutdown::save_timestamp(&path) {
        Ok(ts) => {
            tracing::info!(%node, file = %path.display(), timestamp = %ts, "shutting down node")
        }
        Err(e) => {
            tracing::error!(file = %path.display(), error = %e, "unable to save the shutdown timestamp")
        }
    }
}

fn main() {
    // Arguments that are not UTF-8 are refused by name, never a panic (`env::args`).
    let args: Vec<String> = match std::env::args_os()
        .skip(1)
        .map(|a| a.into_string())
        .collect::<Result<_, _>>()
    {
        Ok(args) => args,
        Err(bad) => {
            println!("invalid argument {bad:?}: not UTF-8");
            eprint!("{}", cli::USAGE);
            std::process::exit(1);
        }
    };
    let command = match cli::parse(&args) {
        Ok(c) => c,
        Err(e) => {
            // Calico prints the parse error and exits 1.
            println!("{e}");
            eprint!("{}", cli::USAGE);
            std::process::exit(1);
        }
    };
    match &command {
        Command::Version => {
            println!("v{}", env!("CARGO_PKG_VERSION"));
            return;
        }
        Command::Help => {
            print!("{}", cli::USAGE);
            return;
        }
        Command::Health(checks) => std::process::exit(health(checks)),
        Command::NothingToDo(why) => {
            println!("{why}; nothing to do");
            return;
        }
        _ => {}
    }
    init_logging(&ProcessEnv);
    if command == Command::Shutdown {
        prestop();
        return;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("calico-node: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = rt.block_on(run(command));
    rt.shutdown_timeout(Duration::from_millis(200));
    if let Err(e) = result {
        tracing::error!("{e:#}");
        eprintln!("calico-node: {e:#}");
        std::process::exit(1);
    }
}
