//! calico-node: the node daemon (see `calico_node::node`).
//!
//! `calico-node` runs everything; `calico-node -startup` only performs start-up (register
//! the node, default pool, ClusterInformation, nodename file) and exits, like Calico's;
//! `calico-node -felix-ready` / `-felix-live` query the health endpoint for probes.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::Context;
use calico_node::env::{Env, ProcessEnv};
use calico_node::node::{config::NodeConfig, daemon, startup};
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
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// `-felix-ready` / `-felix-live`: GET the local health endpoint; exit 0 when it says 200.
fn probe(path: &str, env: &dyn Env) -> i32 {
    let port = env
        .non_empty("FELIX_HEALTHPORT")
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or(9099);
    let result = (|| -> std::io::Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body)
    })();
    match result {
        Ok(resp) if resp.starts_with("HTTP/1.1 200") => 0,
        Ok(resp) => {
            eprintln!("{}", resp.split("\r\n\r\n").nth(1).unwrap_or(&resp));
            1
        }
        Err(e) => {
            eprintln!("calico-node health endpoint on port {port} not reachable: {e}");
            1
        }
    }
}

async fn run(startup_only: bool) -> anyhow::Result<()> {
    let cfg = NodeConfig::from_env(&ProcessEnv).context("calico-node configuration")?;
    if startup_only {
        let ds = cfg
            .datastore
            .connect()
            .await
            .context("connecting to etcd")?;
        let client = calico_node::datastore::Client::new(ds);
        startup::startup(&client, &cfg, daemon::DATASTORE_WAIT, &|_| {}).await?;
        return Ok(());
    }
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
    daemon::run(cfg, shutdown).await
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |names: &[&str]| args.iter().any(|a| names.contains(&a.as_str()));
    if flag(&["-v", "--version", "-version"]) {
        println!("v{}", env!("CARGO_PKG_VERSION"));
        return;
    }
    if let Some(unknown) = args.iter().find(|a| {
        ![
            "-startup",
            "--startup",
            "-felix-ready",
            "--felix-ready",
            "-felix-live",
            "--felix-live",
        ]
        .contains(&a.as_str())
    }) {
        eprintln!(
            "calico-node: unsupported argument '{unknown}' (supported: -startup, -felix-ready, -felix-live, -v)"
        );
        std::process::exit(2);
    }
    if flag(&["-felix-ready", "--felix-ready"]) {
        std::process::exit(probe("/readiness", &ProcessEnv));
    }
    if flag(&["-felix-live", "--felix-live"]) {
        std::process::exit(probe("/liveness", &ProcessEnv));
    }
    init_logging(&ProcessEnv);
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
    let result = rt.block_on(run(flag(&["-startup", "--startup"])));
    rt.shutdown_timeout(Duration::from_millis(200));
    if let Err(e) = result {
        tracing::error!("{e:#}");
        eprintln!("calico-node: {e:#}");
        std::process::exit(1);
    }
}
