//! Supervision of calico-node's actors (real etcd, the node in a fresh network namespace):
//! an actor that fails is restarted with backoff or named, with the cause, on /liveness.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use calico_node::env::MapEnv;
use calico_node::health::Fault;
use calico_node::node::config::NodeConfig;
use calico_node::node::daemon;
use calico_node::node::supervisor::Faults;
use common::{Etcd, NetNs, free_port, http_get};
use tokio_util::sync::CancellationToken;

/// GET on the node's health or metrics port (this test's daemon runs in-process, in the
/// test's own namespace): (0, "") when nothing answers.
async fn get(port: u16, path: &'static str) -> (u16, String) {
    tokio::task::spawn_blocking(move || http_get(port, path))
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default()
}

async fn until<T>(what: &str, limit: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The liveness entry of actor `name`: (live, reason).
fn entry(body: &str, name: &str) -> Option<(bool, String)> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    let r = v["reporters"]
        .as_array()?
        .iter()
        .find(|r| r["name"] == name)?
        .clone();
    Some((
        r["live"].as_bool()?,
        r["reason"].as_str().unwrap_or_default().to_string(),
    ))
}

/// The daemon in-process with a fault port into each actor. Restartable actors (the
/// endpoints, the BGP status socket, the IPAM collector) panic and are restarted: counted,
/// serving again, the node still live. The others (cluster view, confd with the speaker,
/// Felix, the syncer) fail and /liveness names each with the cause. Felix and confd take
/// their port in their own loop (Felix panics there, confd returns the error); the others'
/// faults are acted out by the supervisor in the actor's task.
#[test]
fn each_actors_failure_restarts_it_or_names_it_on_liveness() {
    let Some((ns, etcd)) = common::node_ns_with_etcd("cn-sup") else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let (health, metrics) = (free_port(), free_port());
    let endpoint = etcd.endpoint();
    let dir: PathBuf = state.path().to_path_buf();
    ns.run_in(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let socket = dir.join("bgp-status.sock");
            let env = MapEnv::from_pairs(&[
                ("NODENAME", "node-a"),
                ("ETCD_ENDPOINTS", &endpoint),
                ("IP_AUTODETECTION_METHOD", "interface=eth1"),
                ("CALICO_IPV4POOL_CIDR", "10.244.0.0/16"),
                ("CALICO_STATE_DIR", dir.to_str().unwrap()),
                ("CALICO_BGP_STATUS_SOCKET", socket.to_str().unwrap()),
                ("FELIX_HEALTHPORT", &health.to_string()),
                ("FELIX_PROMETHEUSMETRICSENABLED", "true"),
                ("FELIX_PROMETHEUSMETRICSPORT", &metrics.to_string()),
                ("CALICO_IPAM_GC_INTERVAL", "1"),
            ]);
            let cfg = NodeConfig::from_env(&env).unwrap();
            let restartable = [
                "health-endpoint",
                "metrics-endpoint",
                "bgp-status-socket",
                "ipam-gc",
            ];
            let fatal = ["cluster-view", "bgp", "felix", "datastore-syncer"];
            let mut faults = Faults::none();
            let ports: HashMap<&str, _> = restartable
                .iter()
                .chain(fatal.iter())
                .map(|n| (*n, faults.port(n)))
                .collect();
            let shutdown = CancellationToken::new();
            let node = tokio::spawn(daemon::run_with(cfg, shutdown.clone(), faults));
            until("ready", Duration::from_secs(30), async || {
                (get(health, "/readiness").await.0 == 200).then_some(())
            })
            .await;

            for name in restartable {
                ports[name]
                    .send(Fault::Panic(format!("injected into {name}")))
                    .await
                    .unwrap();
                let want = format!("calico_node_actor_restarts_total{{actor=\"{name}\"}} 1");
                until(&want, Duration::from_secs(10), async || {
                    let (status, body) = get(metrics, "/metrics").await;
                    (status == 200 && body.contains(&want)).then_some(())
                })
                .await;
                let (status, body) = get(health, "/liveness").await;
                assert_eq!(status, 200, "{name} restarted, the node is live: {body}");
            }
            let s = socket.clone();
            let peers = tokio::task::spawn_blocking(move || calico_node::bgp::status::fetch(&s))
                .await
                .unwrap();
            assert!(peers.is_ok(), "the status socket serves again: {peers:?}");

            for name in fatal {
                let fault = if name == "felix" {
                    Fault::Panic(format!("injected into {name}"))
                } else {
                    Fault::Fail(format!("injected into {name}"))
                };
                let want = if name == "felix" {
                    format!("{name} panicked: injected into {name}")
                } else {
                    format!("{name} failed: injected into {name}")
                };
                ports[name].send(fault).await.unwrap();
                let (status, body) = until(&want, Duration::from_secs(10), async || {
                    let (status, body) = get(health, "/liveness").await;
                    entry(&body, name)
                        .is_some_and(|(live, why)| !live && why == want)
                        .then_some((status, body))
                })
                .await;
                assert_eq!(status, 503, "{body}");
                if name == "bgp" {
                    // Calico's liveness probe names it too.
                    let d = dir.clone();
                    let out = tokio::task::spawn_blocking(move || {
                        std::process::Command::new(env!("CARGO_BIN_EXE_calico-node"))
                            .args(["-bird-live"])
                            .env_clear()
                            .env("CALICO_BGP_STATUS_SOCKET", d.join("bgp-status.sock"))
                            .env("FELIX_HEALTHPORT", health.to_string())
                            .output()
                            .unwrap()
                    })
                    .await
                    .unwrap();
                    let text = String::from_utf8_lossy(&out.stdout).into_owned();
                    assert_eq!(out.status.code(), Some(1), "{text}");
                    assert_eq!(
                        text.trim_end(),
                        "calico/node is not ready: bird/confd is not live: bgp failed: injected into bgp"
                    );
                }
            }
            shutdown.cancel();
            tokio::time::timeout(Duration::from_secs(5), node)
                .await
                .expect("stops within 5 s")
                .unwrap()
                .unwrap();
        });
    });
}

/// The real binary with a BGP status socket it cannot create (its directory is a file):
/// the socket's actor fails, is restarted with backoff (1 + 2 + 4 + 8 s), then /liveness
/// names it with the cause and `calico-node -bird-live` fails. Before, the failure was
/// logged once and the node stayed live and ready with no status socket.
/// The real calico-node as node-a in `ns`, its log in `state`/calico-node.log, with
/// `extra` variables beside the common ones.
fn spawn_node(
    ns: &NetNs,
    etcd: &Etcd,
    state: &std::path::Path,
    socket: &std::path::Path,
    health: u16,
    extra: &[(&str, String)],
) -> common::Process {
    let log = std::fs::File::create(state.join("calico-node.log")).unwrap();
    let mut cmd = ns.command(env!("CARGO_BIN_EXE_calico-node"));
    cmd.env_clear()
        .env("NODENAME", "node-a")
        .env("ETCD_ENDPOINTS", etcd.endpoint())
        .env("IP_AUTODETECTION_METHOD", "interface=eth1")
        .env("CALICO_IPV4POOL_CIDR", "10.244.0.0/16")
        .env("CALICO_STATE_DIR", state)
        .env("CALICO_BGP_STATUS_SOCKET", socket)
        .env("FELIX_HEALTHPORT", health.to_string())
        .env("CALICO_IPAM_GC_INTERVAL", "0");
    for (k, v) in extra {
        cmd.env(k, v);
    }
    common::Process(cmd.stdout(Stdio::null()).stderr(log).spawn().unwrap())
}

#[test]
fn a_failing_actor_of_the_real_binary_is_named_on_liveness() {
    let Some((ns, etcd)) = common::node_ns_with_etcd("cn-sup2") else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    std::fs::write(state.path().join("not-a-dir"), "").unwrap();
    let socket = state.path().join("not-a-dir").join("bgp-status.sock");
    let health = free_port();
    let _node = spawn_node(&ns, &etcd, state.path(), &socket, health, &[]);
    let deadline = Instant::now() + Duration::from_secs(40);
    let body = loop {
        if let Ok((503, body)) = ns.run_in(move || http_get(health, "/liveness"))
            && entry(&body, "bgp-status-socket").is_some_and(|(live, _)| !live)
        {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "liveness never named the status socket; log: {}",
            std::fs::read_to_string(state.path().join("calico-node.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let (_, why) = entry(&body, "bgp-status-socket").unwrap();
    assert!(
        why.starts_with(&format!("bgp-status-socket failed: {}: ", socket.display()))
            && why.ends_with("(5 failures in a row; not restarted)"),
        "{why}"
    );
    let out = ns
        .command(env!("CARGO_BIN_EXE_calico-node"))
        .args(["-felix-live", "-bird-live"])
        .env_clear()
        .env("CALICO_BGP_STATUS_SOCKET", &socket)
        .env("FELIX_HEALTHPORT", health.to_string())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("calico/node is not ready: Felix is not live: liveness probe reporting 503 (bgp-status-socket: bgp-status-socket failed:"),
        "{text}"
    );
    assert!(
        text.contains("calico/node is not ready: bird is not live:"),
        "{text}"
    );
}

/// The real binary whose BGP port another socket holds: confd restarts the speaker after
/// 1, 2, 4 and 8 s (`calico_node_actor_restarts_total{actor="bgp"} 4`), then gives up:
/// /liveness names it with the cause and `calico-node -bird-live` fails with it. Before,
/// the speaker was restarted every 5 s forever and the node stayed live.
#[test]
fn a_speaker_that_keeps_failing_is_restarted_with_backoff_then_named_on_liveness() {
    let Some((ns, etcd)) = common::node_ns_with_etcd("cn-sup3") else {
        return;
    };
    // Another program holding port 179 in the node's namespace.
    let _held = ns.run_in(|| std::net::TcpListener::bind("0.0.0.0:179").unwrap());
    let state = tempfile::tempdir().unwrap();
    let socket = state.path().join("bgp-status.sock");
    let (health, metrics) = (free_port(), free_port());
    let metrics_env = [
        ("FELIX_PROMETHEUSMETRICSENABLED", "true".to_string()),
        ("FELIX_PROMETHEUSMETRICSPORT", metrics.to_string()),
    ];
    let _node = spawn_node(&ns, &etcd, state.path(), &socket, health, &metrics_env);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(60);
    let mut restarts_seen = Vec::new();
    let body = loop {
        if let Ok((503, body)) = ns.run_in(move || http_get(health, "/liveness"))
            && entry(&body, "bgp").is_some_and(|(live, _)| !live)
        {
            break body;
        }
        if let Ok((200, text)) = ns.run_in(move || http_get(metrics, "/metrics")) {
            let n = text
                .lines()
                .find_map(|l| l.strip_prefix("calico_node_actor_restarts_total{actor=\"bgp\"} "))
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
            if n > restarts_seen.len() as u64 {
                restarts_seen.push(started.elapsed());
            }
        }
        assert!(
            Instant::now() < deadline,
            "liveness never named the speaker; log: {}",
            std::fs::read_to_string(state.path().join("calico-node.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let (_, why) = entry(&body, "bgp").unwrap();
    let want = format!(
        "the BGP speaker failed: {} (5 failures in a row; not restarted)",
        std::io::Error::from_raw_os_error(libc::EADDRINUSE)
    );
    assert_eq!(why, want);
    // The pauses grow (2 s before the second restart, 4 s before the third), where a
    // fixed pause would keep them equal.
    assert!(restarts_seen.len() >= 3, "{restarts_seen:?}");
    let (second, third) = (
        restarts_seen[1] - restarts_seen[0],
        restarts_seen[2] - restarts_seen[1],
    );
    assert!(
        third >= second + Duration::from_secs(1),
        "pauses double: {restarts_seen:?}"
    );
    let (status, text) = ns.run_in(move || http_get(metrics, "/metrics")).unwrap();
    assert_eq!(status, 200);
    assert!(
        text.contains("calico_node_actor_restarts_total{actor=\"bgp\"} 4"),
        "{text}"
    );
    let out = ns
        .command(env!("CARGO_BIN_EXE_calico-node"))
        .args(["-bird-live"])
        .env_clear()
        .env("CALICO_BGP_STATUS_SOCKET", &socket)
        .env("FELIX_HEALTHPORT", health.to_string())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert_eq!(
        text.trim_end(),
        format!("calico/node is not ready: bird/confd is not live: {want}")
    );
}
