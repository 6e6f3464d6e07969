//! The `calico-ipam` binary driven as a CNI runtime drives it (env + stdin), against a real
//! etcd: ADD/CHECK/DEL/GC/STATUS/VERSION, idempotence, and error codes naming the cause.

mod common;

use std::process::Command;

use common::{Etcd, output_with_stdin};
use serde_json::{Value, json};

fn run(env: &[(&str, &str)], conf: &Value) -> (i32, Value) {
    let out = output_with_stdin(
        Command::new(env!("CARGO_BIN_EXE_calico-ipam"))
            .env_clear()
            .envs(env.iter().copied()),
        &conf.to_string(),
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let v = if stdout.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&stdout).unwrap_or_else(|_| panic!("not JSON: {stdout}"))
    };
    (out.status.code().unwrap(), v)
}

fn cni_env<'a>(cmd: &'a str, cid: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", cmd),
        ("CNI_CONTAINERID", cid),
        ("CNI_NETNS", "/run/netns/test"),
        ("CNI_IFNAME", "eth0"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=web-0",
        ),
        ("CNI_PATH", "/usr/lib/cni"),
    ]
}

async fn ready_etcd() -> Option<Etcd> {
    let etcd = Etcd::start()?;
    common::seed_pool_and_ready(&etcd.endpoint(), "10.88.0.0/16").await;
    Some(etcd)
}

fn conf(etcd: &Etcd, version: &str) -> Value {
    json!({"cniVersion": version, "name": "k8s-pod-network", "type": "calico-ipam",
           "etcd_endpoints": etcd.endpoint(), "nodename": "node-1",
           "log_level": "debug", "log_file_path": etcd.dir.path().join("cni.log")})
}

#[tokio::test]
async fn add_check_del_round_trip_with_idempotence() {
    let Some(etcd) = ready_etcd().await else {
        return;
    };
    let c = conf(&etcd, "1.0.0");
    let (code, res) = run(&cni_env("ADD", "c1"), &c);
    assert_eq!(code, 0, "{res}");
    assert_eq!(res["cniVersion"], "1.0.0");
    let addr = res["ips"][0]["address"].as_str().unwrap().to_string();
    assert!(
        addr.starts_with("10.88.") && addr.ends_with("/32"),
        "{addr}"
    );
    assert!(
        res["ips"][0].get("version").is_none(),
        "1.0.0 results have no version field"
    );
    // The handle and the allocation's attributes are Calico's.
    let handle = etcd.etcdctl_value("/calico/ipam/v2/handle/k8s-pod-network.c1");
    assert!(handle.starts_with(r#"{"block":{"10.88."#), "{handle}");
    let blocks = etcd.etcdctl(&[
        "get",
        "--prefix",
        "/calico/ipam/v2/assignment/",
        "--print-value-only",
    ]);
    assert!(blocks.contains(r#""handle_id":"k8s-pod-network.c1","secondary":{"namespace":"ns1","node":"node-1","pod":"web-0","timestamp":"#), "{blocks}");
    // A repeated ADD returns the same address.
    let (_, again) = run(&cni_env("ADD", "c1"), &c);
    assert_eq!(again["ips"][0]["address"], addr.as_str());
    // CHECK with prevResult.
    let mut check = c.clone();
    check["prevResult"] = res.clone();
    assert_eq!(run(&cni_env("CHECK", "c1"), &check), (0, Value::Null));
    // DEL releases; DEL again is fine; CHECK now fails with the address named.
    assert_eq!(run(&cni_env("DEL", "c1"), &c), (0, Value::Null));
    assert_eq!(
        etcd.etcdctl_value("/calico/ipam/v2/handle/k8s-pod-network.c1"),
        ""
    );
    assert_eq!(run(&cni_env("DEL", "c1"), &c), (0, Value::Null));
    let (code, err) = run(&cni_env("CHECK", "c1"), &check);
    assert_eq!(code, 1);
    assert_eq!(err["code"], 100);
    assert_eq!(
        err["msg"],
        format!(
            "{} is not allocated to k8s-pod-network.c1",
            addr.trim_end_matches("/32")
        )
    );
    // Logs went to the file, not stdout.
    assert!(std::fs::read_to_string(etcd.dir.path().join("cni.log")).is_ok());
}

#[tokio::test]
async fn legacy_versions_gc_status_and_version() {
    let Some(etcd) = ready_etcd().await else {
        return;
    };
    let c = conf(&etcd, "0.3.1");
    let (code, res) = run(&cni_env("ADD", "keep"), &c);
    assert_eq!(code, 0);
    assert_eq!(res["ips"][0]["version"], "4");
    run(&cni_env("ADD", "stale"), &c);
    let mut gc = conf(&etcd, "1.1.0");
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "keep", "ifname": "eth0"}]);
    assert_eq!(run(&[("CNI_COMMAND", "GC")], &gc), (0, Value::Null));
    assert_ne!(
        etcd.etcdctl_value("/calico/ipam/v2/handle/k8s-pod-network.keep"),
        ""
    );
    assert_eq!(
        etcd.etcdctl_value("/calico/ipam/v2/handle/k8s-pod-network.stale"),
        "",
        "GC released the stale attachment"
    );
    assert_eq!(
        run(&[("CNI_COMMAND", "STATUS")], &conf(&etcd, "1.1.0")),
        (0, Value::Null)
    );
    let (code, v) = run(
        &[("CNI_COMMAND", "VERSION")],
        &json!({"cniVersion": "1.0.0"}),
    );
    assert_eq!(code, 0);
    assert_eq!(
        v["supportedVersions"],
        json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
}

#[tokio::test]
async fn errors_carry_the_spec_codes() {
    let Some(etcd) = ready_etcd().await else {
        return;
    };
    // 1: incompatible version.
    let (code, e) = run(&cni_env("ADD", "c1"), &conf(&etcd, "9.9.9"));
    assert_eq!((code, e["code"].as_u64()), (1, Some(1)));
    // 4: invalid configuration, naming the field.
    let mut bad = conf(&etcd, "1.0.0");
    bad["ipam"] = json!({"type": "calico-ipam", "ipv4_pools": ["10.99.0.0/16"]});
    let (_, e) = run(&cni_env("ADD", "c1"), &bad);
    assert_eq!(e["code"], 4);
    assert_eq!(
        e["msg"],
        "invalid network configuration field ipam.ipv4_pools"
    );
    assert_eq!(
        e["details"],
        "IP pool 10.99.0.0/16 does not exist, is disabled, or does not select this node"
    );
    // 7: a missing variable.
    let (_, e) = run(&[("CNI_COMMAND", "ADD")], &conf(&etcd, "1.0.0"));
    assert_eq!(
        (e["code"].as_u64(), e["msg"].as_str()),
        (
            Some(7),
            Some("invalid environment variable CNI_CONTAINERID")
        )
    );
    // 11: etcd unreachable.
    let mut down = conf(&etcd, "1.0.0");
    down["etcd_endpoints"] = json!(format!("http://127.0.0.1:{}", common::free_port()));
    let (code, e) = run(&cni_env("ADD", "c1"), &down);
    assert_eq!((code, e["code"].as_u64()), (1, Some(11)), "{e}");
    // Nothing was allocated by the failed calls.
    assert_eq!(
        etcd.etcdctl(&["get", "--prefix", "/calico/ipam/v2/handle/", "--keys-only"])
            .trim(),
        ""
    );
}

#[tokio::test]
async fn concurrent_adds_on_one_host_share_one_block() {
    let Some(etcd) = ready_etcd().await else {
        return;
    };
    let c = conf(&etcd, "1.0.0");
    let procs: Vec<_> = (0..10)
        .map(|i| {
            let c = c.clone();
            std::thread::spawn(move || {
                let cid = format!("par{i}");
                let (code, res) = run(&cni_env("ADD", &cid), &c);
                assert_eq!(code, 0, "{res}");
                res["ips"][0]["address"].as_str().unwrap().to_string()
            })
        })
        .collect();
    let addrs: std::collections::HashSet<String> =
        procs.into_iter().map(|p| p.join().unwrap()).collect();
    assert_eq!(addrs.len(), 10, "all distinct");
    let affinities = etcd.etcdctl(&[
        "get",
        "--prefix",
        "/calico/ipam/v2/host/node-1/",
        "--keys-only",
    ]);
    assert_eq!(
        affinities.lines().filter(|l| !l.is_empty()).count(),
        1,
        "one block for the host: {affinities}"
    );
}

/// GC on one node releases only that node's leaked containers of this very network: the
/// runtime's valid attachments name only its own node's containers, so every pod of
/// another node, and a handle of network `<network>.b`, must keep its address.
#[tokio::test]
async fn gc_releases_only_this_nodes_leaks_of_this_network() {
    let Some(etcd) = ready_etcd().await else {
        return;
    };
    let on = |node: &str, network: &str| {
        let mut c = conf(&etcd, "1.1.0");
        c["nodename"] = json!(node);
        c["name"] = json!(network);
        c
    };
    let net = "k8s-pod-network";
    for (node, network, cid) in [
        ("node-a", net, "a1"),
        ("node-a", net, "a2"),
        ("node-b", net, "b1"),
        ("node-b", net, "b2"),
        ("node-a", "k8s-pod-network.b", "x1"),
    ] {
        let (code, res) = run(&cni_env("ADD", cid), &on(node, network));
        assert_eq!(code, 0, "{res}");
    }
    let mut gc = on("node-a", net);
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "a1", "ifname": "eth0"}]);
    assert_eq!(run(&[("CNI_COMMAND", "GC")], &gc), (0, Value::Null));
    let held = |h: &str| {
        !etcd
            .etcdctl_value(&format!("/calico/ipam/v2/handle/{h}"))
            .is_empty()
    };
    assert!(
        held("k8s-pod-network.a1"),
        "a valid attachment keeps its address"
    );
    assert!(!held("k8s-pod-network.a2"), "node A's leak is released");
    assert!(
        held("k8s-pod-network.b1"),
        "node B's pods are not node A's to collect"
    );
    assert!(
        held("k8s-pod-network.b2"),
        "node B's pods are not node A's to collect"
    );
    assert!(
        held("k8s-pod-network.b.x1"),
        "a handle of network k8s-pod-network.b is not one of k8s-pod-network"
    );
    let blocks = etcd.etcdctl(&[
        "get",
        "--prefix",
        "/calico/ipam/v2/assignment/",
        "--print-value-only",
    ]);
    for h in ["a1", "b1", "b2", "b.x1"] {
        assert!(
            blocks.contains(&format!("\"k8s-pod-network.{h}\"")),
            "{h}: {blocks}"
        );
    }
    assert!(!blocks.contains("\"k8s-pod-network.a2\""), "{blocks}");
}

/// Put an IPPool as calicoctl would store it.
async fn add_pool(etcd: &Etcd, name: &str, cidr: &str, disabled: bool) {
    use calico_node::model::{IPPool, IPPoolSpec};
    let client = calico_node::datastore::Client::new(etcd.datastore().await);
    let spec = IPPoolSpec {
        cidr: cidr.into(),
        disabled,
        ..Default::default()
    };
    client.create(IPPool::new(name, spec)).await.unwrap();
}

/// Calico's `ResolvePools`: `ipam.ipv4_pools` / `ipv6_pools` entries are CIDRs or pool
/// names; an entry that names no pool is an error naming it (never silently dropped,
/// which gave the pod an address from any pool).
#[tokio::test]
async fn pools_are_chosen_by_name_or_cidr_and_unknown_ones_are_named() {
    let Some(etcd) = ready_etcd().await else {
        return;
    };
    add_pool(&etcd, "blue", "10.77.0.0/16", false).await;
    add_pool(&etcd, "v6", "fd00:77::/64", false).await;
    let with_pools = |v4: Value| {
        let mut c = conf(&etcd, "1.0.0");
        c["ipam"] = json!({"type": "calico-ipam", "ipv4_pools": v4});
        c
    };
    for (cid, pools) in [
        ("byname", json!(["blue"])),
        ("bycidr", json!(["10.77.0.0/16"])),
    ] {
        let (code, res) = run(&cni_env("ADD", cid), &with_pools(pools));
        assert_eq!(code, 0, "{res}");
        let addr = res["ips"][0]["address"].as_str().unwrap();
        assert!(addr.starts_with("10.77."), "{cid}: {addr}");
    }
    let (code, e) = run(&cni_env("ADD", "c1"), &with_pools(json!(["blue", "green"])));
    assert_eq!((code, e["code"].as_u64()), (1, Some(4)), "{e}");
    assert_eq!(
        e["msg"],
        "invalid network configuration field ipam.ipv4_pools"
    );
    assert_eq!(
        e["details"],
        "'green' is neither a CIDR nor the name of an IP pool"
    );
    let (_, e) = run(&cni_env("ADD", "c1"), &with_pools(json!(["v6"])));
    assert_eq!(
        e["details"], "'v6' (fd00:77::/64) is an IPv6 pool, not IPv4",
        "{e}"
    );
    let mut v6 = conf(&etcd, "1.0.0");
    v6["ipam"] = json!({"type": "calico-ipam", "assign_ipv4": "false", "assign_ipv6": "true",
                        "ipv6_pools": ["fd00:99::/64"]});
    let (_, e) = run(&cni_env("ADD", "c1"), &v6);
    assert_eq!(
        e["msg"], "invalid network configuration field ipam.ipv6_pools",
        "{e}"
    );
    assert!(
        e["details"].as_str().unwrap().contains("fd00:99::/64"),
        "{e}"
    );
    v6["ipam"]["ipv6_pools"] = json!(["v6"]);
    let (code, res) = run(&cni_env("ADD", "six"), &v6);
    assert_eq!(code, 0, "{res}");
    assert!(
        res["ips"][0]["address"]
            .as_str()
            .unwrap()
            .starts_with("fd00:77::"),
        "{res}"
    );
    // Nothing was allocated by the refused calls.
    assert_eq!(
        etcd.etcdctl_value("/calico/ipam/v2/handle/k8s-pod-network.c1"),
        ""
    );
}

/// CNI_ARGS `IP=<addr>` (Calico's `ipAddrs` annotation, honoured by calico-ipam): that
/// address if it is free in an enabled pool, else an error naming it.
#[tokio::test]
async fn a_requested_address_is_assigned_or_refused_with_the_reason() {
    let Some(etcd) = ready_etcd().await else {
        return;
    };
    add_pool(&etcd, "off", "10.66.0.0/16", true).await;
    let c = conf(&etcd, "1.0.0");
    let env = |cid: &'static str, ip: &str| {
        let mut e = cni_env("ADD", cid);
        let args: &'static str = Box::leak(
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=ns1;K8S_POD_NAME={cid};IP={ip}")
                .into_boxed_str(),
        );
        e.retain(|(k, _)| *k != "CNI_ARGS");
        e.push(("CNI_ARGS", args));
        e
    };
    let (code, res) = run(&env("fixed", "10.88.7.7"), &c);
    assert_eq!(code, 0, "{res}");
    assert_eq!(res["ips"][0]["address"], "10.88.7.7/32");
    let blocks = etcd.etcdctl(&[
        "get",
        "--prefix",
        "/calico/ipam/v2/assignment/",
        "--print-value-only",
    ]);
    assert!(
        blocks.contains(r#""handle_id":"k8s-pod-network.fixed""#),
        "{blocks}"
    );
    // Its block did not exist: it is claimed for this node (Calico's AssignIP), not
    // left without an owner for other nodes to borrow from.
    assert!(blocks.contains(r#""affinity":"host:node-1""#), "{blocks}");
    let affinity = etcd.etcdctl_value("/calico/ipam/v2/host/node-1/ipv4/block/10.88.7.0-26");
    assert!(affinity.contains(r#""state":"confirmed""#), "{affinity}");
    // A repeated ADD gets it again.
    let (code, res) = run(&env("fixed", "10.88.7.7"), &c);
    assert_eq!(
        (code, &res["ips"][0]["address"]),
        (0, &json!("10.88.7.7/32")),
        "{res}"
    );
    // Taken by another container.
    let (code, e) = run(&env("other", "10.88.7.7"), &c);
    assert_eq!((code, e["code"].as_u64()), (1, Some(100)), "{e}");
    assert_eq!(
        e["msg"],
        "cannot assign the requested address 10.88.7.7 (CNI_ARGS IP)"
    );
    assert_eq!(e["details"], "10.88.7.7 is already in use");
    // Outside every (enabled) pool.
    for ip in ["10.200.0.1", "10.66.0.1"] {
        let (_, e) = run(&env("other", ip), &c);
        assert_eq!(
            e["details"],
            format!("{ip} is not inside any IP pool"),
            "{e}"
        );
    }
    let (_, e) = run(&env("other", "banana"), &c);
    assert_eq!(
        (e["code"].as_u64(), e["details"].as_str()),
        (Some(7), Some("IP='banana' is not an IP address"))
    );
    assert_eq!(
        etcd.etcdctl_value("/calico/ipam/v2/handle/k8s-pod-network.other"),
        ""
    );
    // DEL frees it for the next taker.
    assert_eq!(run(&cni_env("DEL", "fixed"), &c), (0, Value::Null));
    let (code, res) = run(&env("other", "10.88.7.7"), &c);
    assert_eq!(
        (code, &res["ips"][0]["address"]),
        (0, &json!("10.88.7.7/32")),
        "{res}"
    );
}

/// The host-wide IPAM lock (`ipam_lock_file`, Calico's key) is created 0600, and a lock
/// another process keeps holding gives "try again later" (11) after a bounded wait, not
/// a hang; once it is free ADD works.
#[tokio::test]
async fn a_held_ipam_lock_gives_code_11_after_a_bounded_wait() {
    use std::os::unix::fs::PermissionsExt;
    let Some(etcd) = ready_etcd().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("run/ipam.lock");
    let mut c = conf(&etcd, "1.0.0");
    c["ipam_lock_file"] = json!(lock.to_str().unwrap());
    c["ipam_lock_timeout"] = json!(1);
    let (code, res) = run(&cni_env("ADD", "first"), &c);
    assert_eq!(code, 0, "{res}");
    let mode = std::fs::metadata(&lock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{mode:o}");
    let held = nix::fcntl::Flock::lock(
        std::fs::File::open(&lock).unwrap(),
        nix::fcntl::FlockArg::LockExclusive,
    )
    .unwrap();
    let start = std::time::Instant::now();
    let (code, e) = run(&cni_env("ADD", "second"), &c);
    let waited = start.elapsed();
    assert_eq!((code, e["code"].as_u64()), (1, Some(11)), "{e}");
    assert_eq!(e["msg"], "the host-wide IPAM lock is busy; try again later");
    assert!(
        e["details"]
            .as_str()
            .unwrap()
            .contains(lock.to_str().unwrap()),
        "{e}"
    );
    assert!(
        waited >= std::time::Duration::from_secs(1) && waited < std::time::Duration::from_secs(10),
        "{waited:?}"
    );
    assert_eq!(
        etcd.etcdctl_value("/calico/ipam/v2/handle/k8s-pod-network.second"),
        ""
    );
    drop(held);
    let (code, res) = run(&cni_env("ADD", "second"), &c);
    assert_eq!(code, 0, "{res}");
}
