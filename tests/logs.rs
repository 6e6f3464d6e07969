//! Logs as `kubectl logs`, a log file or a CI job shows them: the real binaries write no
//! ANSI colour codes when stderr is not a terminal, and their lines name what they are
//! about: the node (every actor of calico-node runs in a `node{name=...}` span) and the pod
//! (each CNI call runs in a `pod{...}` span with the container and the pod).

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Etcd, cni_install_dir, free_port, node_ns_with_etcd, output_with_stdin};
use serde_json::json;

/// The start of every ANSI escape sequence (colours, bold, dim).
const ESC: &str = "\x1b[";

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_plain(what: &str, log: &str) {
    assert!(
        !log.contains(ESC),
        "{what} wrote ANSI escape codes where no terminal reads them:\n{log:?}"
    );
}

/// The log line that contains `needle`; panics with the whole log when none does.
fn line_with<'a>(log: &'a str, needle: &str) -> &'a str {
    log.lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{log}"))
}

#[test]
fn calico_node_writes_no_colour_codes_into_a_pipe() {
    let state = tempfile::tempdir().unwrap();
    // `-shutdown` (the preStop hook) logs one line through the daemon's logging set-up.
    let out = Command::new(env!("CARGO_BIN_EXE_calico-node"))
        .arg("-shutdown")
        .env_clear()
        .env("NODENAME", "node-logs")
        .env("CALICO_STATE_DIR", state.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let log = stderr_of(&out);
    assert!(out.status.success(), "{log}");
    line_with(&log, "shutting down node");
    assert_plain("calico-node", &log);
}

#[test]
fn calicoctl_writes_no_colour_codes_into_a_pipe() {
    let Some(etcd) = Etcd::start() else {
        return;
    };
    // A value another writer left that cannot be decoded: calicoctl skips it and says so
    // on stderr, naming the key.
    let key = "/calico/resources/v3/projectcalico.org/ippools/broken";
    etcd.etcdctl(&["put", key, "not json"]);
    let out = output_with_stdin(
        Command::new(env!("CARGO_BIN_EXE_calicoctl"))
            .args(["-c", "/nonexistent/calicoctl.cfg", "get", "ippools"])
            .env_clear()
            .env("ETCD_ENDPOINTS", etcd.endpoint()),
        "",
    );
    let log = stderr_of(&out);
    assert!(out.status.success(), "{log}");
    line_with(&log, key);
    assert_plain("calicoctl", &log);
}

/// A CNI DEL of a pod that has no WorkloadEndpoint (its ADD never finished), run by the
/// real `calico` binary in a node namespace with etcd there, logging at `info` to stderr.
#[test]
fn cni_lines_carry_the_pod_and_container_and_no_colour_codes() {
    let Some((ns, etcd)) = node_ns_with_etcd("cn-logs") else {
        return;
    };
    let dir = cni_install_dir("cni-install-logs");
    let conf = json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "calico",
        "etcd_endpoints": etcd.endpoint(), "nodename": "node-logs", "log_level": "info",
        "ipam": {"type": "calico-ipam"}});
    let out = output_with_stdin(
        ns.command(dir.join("calico").to_str().unwrap())
            .env_clear()
            .env("CNI_PATH", &dir)
            .env("CNI_COMMAND", "DEL")
            .env("CNI_CONTAINERID", "c0ffee-logs")
            .env("CNI_IFNAME", "eth0")
            .env(
                "CNI_ARGS",
                "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;IgnoreUnknown=1",
            ),
        &conf.to_string(),
    );
    let log = stderr_of(&out);
    assert!(out.status.success(), "{log}");
    let line = line_with(&log, "no WorkloadEndpoint");
    for field in [
        "pod{",
        "command=DEL",
        "container_id=c0ffee-logs",
        "namespace=shop",
        "pod=web-0",
    ] {
        assert!(line.contains(field), "{field} missing from {line:?}");
    }
    assert_plain("calico (CNI)", &log);
}

/// calico-node in a node namespace with etcd: the lines of its actors (the cluster view,
/// confd) carry the node's name in the `node` span, and its log file has no colour codes.
#[test]
fn the_daemons_actor_lines_carry_the_node_and_no_colour_codes() {
    let Some((ns, etcd)) = node_ns_with_etcd("cn-logs") else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let _node = common::cluster::calico_node(
        &ns,
        "node-logs",
        &etcd.endpoint(),
        state.path(),
        free_port(),
        &[("IP_AUTODETECTION_METHOD", "interface=eth1")],
    );
    let file = state.path().join("calico-node.log");
    let read = || std::fs::read_to_string(&file).unwrap_or_default();
    let wanted = ["datastore in sync", "starting the BGP speaker"];
    let start = Instant::now();
    while !wanted.iter().all(|w| read().contains(w)) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "calico-node never logged {wanted:?}:\n{}",
            read()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = read();
    for w in wanted {
        let line = line_with(&log, w);
        assert!(
            line.contains("node{name=node-logs}"),
            "an actor's line without the node span: {line:?}"
        );
    }
    assert_plain("calico-node (daemon)", &log);
}
