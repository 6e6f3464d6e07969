//! calico-node's own endpoints under stress and Calico's probe commands, against a running
//! node (real etcd, the node in a fresh network namespace): a flood of idle connections to
//! the health port leaves `/readiness` answering and port 179 accepting without spinning a
//! core; `calico-node -felix-ready -bird-ready` and friends answer as Calico's do.

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Etcd, NetNs, Process, free_port, http_get, node_ns_with_etcd};

/// Raise this process's descriptor limit (the flood needs a thousand sockets).
fn raise_nofile(to: u64) {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        if r.rlim_cur < to {
            r.rlim_cur = to.min(r.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// calico-node in `ns` with its state in `state`; `nofile` caps its descriptors.
fn start_node(
    ns: &NetNs,
    etcd: &Etcd,
    state: &Path,
    health_port: u16,
    nofile: Option<u64>,
) -> Process {
    let log = std::fs::File::create(state.join("calico-node.log")).unwrap();
    let mut c = ns.command(env!("CARGO_BIN_EXE_calico-node"));
    c.env_clear()
        .env("NODENAME", "node-a")
        .env("ETCD_ENDPOINTS", etcd.endpoint())
        .env("IP_AUTODETECTION_METHOD", "interface=eth1")
        .env("CALICO_IPV4POOL_CIDR", "10.244.0.0/16")
        .env("CALICO_STATE_DIR", state)
        .env("CALICO_BGP_STATUS_SOCKET", state.join("bgp-status.sock"))
        .env("FELIX_HEALTHPORT", health_port.to_string())
        .env("CALICO_IPAM_GC_INTERVAL", "0")
        .stdout(Stdio::null())
        .stderr(log);
    if let Some(n) = nofile {
        // SAFETY: setrlimit is async-signal-safe; it only sets the child's own limit.
        unsafe {
            c.pre_exec(move || {
                let r = libc::rlimit {
                    rlim_cur: n,
                    rlim_max: n,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    Process(c.spawn().unwrap())
}

fn wait_status(ns: &NetNs, port: u16, path: &'static str, want: u16, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    let mut last = String::new();
    while Instant::now() < deadline {
        match ns.run_in(move || http_get(port, path)) {
            Ok((status, body)) if status == want => return body,
            Ok((status, body)) => last = format!("{status} {body}"),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{path} never answered {want}; last: {last}");
}

fn log_of(state: &Path) -> String {
    std::fs::read_to_string(state.join("calico-node.log")).unwrap_or_default()
}

/// A thousand idle connections to the health port (the daemon limited to 300
/// descriptors): `/readiness` still answers at once, port 179 still accepts (an unknown
/// peer's connection is accepted and closed), and the daemon does not spin a core. Before
/// the connection cap and the accept backoff, the daemon ran out of descriptors, its
/// accept loops spun on EMFILE, and neither the probe nor port 179 got an answer.
#[test]
fn health_and_bgp_listeners_survive_a_connection_flood() {
    let Some((ns, etcd)) = node_ns_with_etcd("cn-flood") else {
        return;
    };
    raise_nofile(4096);
    let state = tempfile::tempdir().unwrap();
    let health = free_port();
    let node = start_node(&ns, &etcd, state.path(), health, Some(300));
    wait_status(&ns, health, "/readiness", 200, Duration::from_secs(30));
    // Port 179 is up before the flood.
    let bgp_accepts = |ns: &NetNs| {
        ns.run_in(|| {
            let mut s = TcpStream::connect_timeout(
                &"10.99.8.1:179".parse().unwrap(),
                Duration::from_secs(2),
            )
            .map_err(|e| format!("connect: {e}"))?;
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let mut buf = [0u8; 16];
            match s.read(&mut buf) {
                Ok(0) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
                Ok(n) => Err(format!("unexpected {n} bytes")),
                Err(e) => Err(format!("not accepted (no close within 3 s): {e}")),
            }
        })
    };
    bgp_accepts(&ns).expect("port 179 accepts before the flood");

    let flood = ns.run_in(move || {
        (0..1000)
            .map(|i| {
                TcpStream::connect(("127.0.0.1", health))
                    .unwrap_or_else(|e| panic!("connection {i}: {e}"))
            })
            .collect::<Vec<_>>()
    });
    assert_eq!(flood.len(), 1000);

    let asked = Instant::now();
    let (status, body) = ns
        .run_in(move || http_get(health, "/readiness"))
        .unwrap_or_else(|e| {
            panic!(
                "/readiness during the flood: {e}; log: {}",
                log_of(state.path())
            )
        });
    assert_eq!(status, 200, "{body}");
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "/readiness took {:?}",
        asked.elapsed()
    );
    bgp_accepts(&ns).unwrap_or_else(|e| panic!("port 179 during the flood: {e}"));

    // No spinning: over two seconds of the flood held open, well under a core's worth.
    let pid = node.0.id();
    let before = common::cpu_ns(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = Duration::from_nanos(common::cpu_ns(pid) - before);
    assert!(
        used < Duration::from_millis(500),
        "calico-node used {used:?} of CPU in 2 s with idle connections open"
    );
    drop(flood);
    assert_eq!(
        ns.run_in(move || http_get(health, "/liveness")).unwrap().0,
        200
    );
}

/// Run calico-node with `args` in `ns` as a probe would (the node's environment); its exit
/// code and stdout.
fn calico_node_cmd(ns: &NetNs, state: &Path, health_port: u16, args: &[&str]) -> (i32, String) {
    let out = ns
        .command(env!("CARGO_BIN_EXE_calico-node"))
        .args(args)
        .env_clear()
        .env("NODENAME", "node-a")
        .env("CALICO_STATE_DIR", state)
        .env("CALICO_BGP_STATUS_SOCKET", state.join("bgp-status.sock"))
        .env("FELIX_HEALTHPORT", health_port.to_string())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The exact probe and preStop commands of Calico's calico-etcd.yaml (v3.31:
/// `/bin/calico-node -felix-live -bird-live`, `-felix-ready -bird-ready`, `-shutdown`)
/// against a node that is down, up, and up with a BGP peer that does not answer. Before,
/// calico-node exited 2 on `-bird-live`, `-bird-ready` and `-shutdown`.
#[test]
fn calicos_manifest_probe_commands_answer_for_the_running_node() {
    let Some((ns, etcd)) = node_ns_with_etcd("cn-probe") else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let health = free_port();
    let run = |args: &[&str]| calico_node_cmd(&ns, state.path(), health, args);
    const LIVE: &[&str] = &["-felix-live", "-bird-live"];
    const READY: &[&str] = &["-felix-ready", "-bird-ready"];

    // No node running: both probes fail and say why, in Calico's words.
    let (code, out) = run(LIVE);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "calico/node is not ready: Felix is not live: Get \"http://localhost:{health}/liveness\": dial tcp 127.0.0.1:{health}: connect: Connection refused"
        )),
        "{out}"
    );
    assert!(
        out.contains("calico/node is not ready: bird is not live:"),
        "{out}"
    );
    let (code, out) = run(READY);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("calico/node is not ready: felix is not ready: Get "),
        "{out}"
    );
    assert!(
        out.contains("calico/node is not ready: BIRD is not ready: failed to stat() nodename file"),
        "{out}"
    );

    // The preStop hook of the previous run left its timestamp; start-up removes it.
    assert_eq!(run(&["-shutdown"]), (0, String::new()));
    let ts = std::fs::read_to_string(state.path().join("shutdownTS")).unwrap();
    assert!(ts.ends_with('Z') && ts.contains('T'), "{ts}");

    let _node = start_node(&ns, &etcd, state.path(), health, None);
    wait_status(&ns, health, "/readiness", 200, Duration::from_secs(30));
    assert_eq!(run(LIVE), (0, String::new()));
    assert_eq!(run(READY), (0, String::new()));
    assert_eq!(
        run(&["-bird6-ready", "-bird6-live", "-threshold-time=5s"]),
        (0, String::new())
    );
    assert!(
        !state.path().join("shutdownTS").exists(),
        "start-up removes the shutdown timestamp"
    );

    // A peer that never answers: not ready, naming the peer; still live.
    etcd.etcdctl(&[
        "put",
        "/calico/resources/v3/projectcalico.org/bgppeers/silent",
        r#"{"kind":"BGPPeer","apiVersion":"projectcalico.org/v3","metadata":{"name":"silent"},"spec":{"peerIP":"10.99.8.2","asNumber":64512}}"#,
    ]);
    let deadline = Instant::now() + Duration::from_secs(15);
    let out = loop {
        let (code, out) = run(READY);
        if code == 1 {
            break out;
        }
        assert!(Instant::now() < deadline, "never not ready: {out}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        out.lines().any(|l| l
            == "calico/node is not ready: BIRD is not ready: BGP not established with 10.99.8.2"),
        "{out}"
    );
    assert!(
        out.contains(
            "calico/node is not ready: felix is not ready: readiness probe reporting 503 (bgp: BGP not established with 10.99.8.2"
        ),
        "{out}"
    );
    // Long after start-up one Established peer would do; with none it is still not ready.
    let (code, out) = run(&["-bird-ready", "-threshold-time=0s"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("BGP not established with 10.99.8.2"), "{out}");
    assert_eq!(run(LIVE), (0, String::new()));

    // A flag Calico does not know either.
    let (code, out) = run(&["-felix-lve"]);
    assert_eq!(code, 1);
    assert!(
        out.contains("flag provided but not defined: -felix-lve"),
        "{out}"
    );
}

fn bird_conf(me: &str, peers: &[(&str, &str)]) -> String {
    let mut c = format!("router id {me};\nprotocol device {{ }}\n");
    for (name, ip) in peers {
        c.push_str(&format!(
            "protocol bgp {name} {{\n  local {me} as 64512; neighbor {ip} as 64512;\n  connect delay time 1; connect retry time 1; error wait time 1, 5;\n  ipv4 {{ import all; export none; }};\n}}\n"
        ));
    }
    c
}

/// `CALICO_NETWORKING_BACKEND=bird-external`: the bird checks read the user's BIRD as
/// Calico's do (`show protocols` on its control socket, confd's protocol names): one peer
/// up, one never: not ready while young, ready after `-threshold-time`; `-bird-live`
/// passes while BIRD answers and fails once it is gone.
#[test]
fn bird_checks_read_an_external_birds_protocols() {
    let (Some(a), Some(b)) = (NetNs::new("cn-pa"), NetNs::new("cn-pb")) else {
        return;
    };
    common::bgp::link(&a, "10.99.9.1", &b, "10.99.9.2");
    let Some(bird_b) = common::bgp::bird(
        &b,
        &bird_conf("10.99.9.2", &[("Mesh_10_99_9_1", "10.99.9.1")]),
    ) else {
        return;
    };
    let Some(bird_a) = common::bgp::bird(
        &a,
        &bird_conf(
            "10.99.9.1",
            &[
                ("Mesh_10_99_9_2", "10.99.9.2"),
                ("Node_10_99_9_3", "10.99.9.3"),
            ],
        ),
    ) else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    std::fs::write(state.path().join("nodename"), "node-a").unwrap();
    let socket = bird_a.dir.path().join("bird.ctl");
    let run = |args: &[&str]| {
        let out = a
            .command(env!("CARGO_BIN_EXE_calico-node"))
            .args(args)
            .env_clear()
            .env("CALICO_NETWORKING_BACKEND", "bird-external")
            .env("CALICO_BIRD_SOCKET", &socket)
            .env("CALICO_STATE_DIR", state.path())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    common::bgp::wait_for(Duration::from_secs(30), "BIRD's mesh session", || {
        common::bgp::birdc(&bird_a, "show protocols Mesh_10_99_9_2")
            .contains("Established")
            .then_some(())
    });
    assert_eq!(
        run(&["-bird-ready"]),
        (
            1,
            "calico/node is not ready: BIRD is not ready: BGP not established with 10.99.9.3\n"
                .to_string()
        )
    );
    assert_eq!(
        run(&["-bird-ready", "-threshold-time=0s"]),
        (0, String::new())
    );
    assert_eq!(run(&["-bird-live"]), (0, String::new()));
    drop(bird_a);
    drop(bird_b);
    let (code, out) = run(&["-bird-live"]);
    assert_eq!(code, 1);
    assert!(
        out.starts_with("calico/node is not ready: bird is not live: "),
        "{out}"
    );
}

/// An argument that is not UTF-8 (argv comes from outside) is refused with exit 1 and a
/// line naming it, as a bad flag is; before, `std::env::args` panicked (exit 101).
#[test]
fn a_non_utf8_argument_is_refused_not_a_panic() {
    use std::os::unix::ffi::OsStrExt;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_calico-node"))
        .arg(std::ffi::OsStr::from_bytes(b"-felix-\xffready"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("not UTF-8"), "{stdout}");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
}
