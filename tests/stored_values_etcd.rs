//! Values other writers put in etcd (a newer Calico, a person with etcdctl) never take the
//! node down: resources with fields we do not know are used and keep those fields through
//! our read-modify-writes; a value that does not decode, a corrupt IPAM block and a duration
//! that overflows are skipped or refused with the key and the reason in the log.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use calico_node::datastore::Client;
use calico_node::model::{IPPoolSpec, NodeSpec};
use common::{Etcd, NetNs, free_port, http_get, output_with_stdin, wait_http};
use serde_json::{Value, json};

const RES: &str = "/calico/resources/v3/projectcalico.org";

/// The newer-Calico IPPool golden, made usable by every node.
fn newer_pool(cidr: &str) -> Value {
    let mut pool: Value =
        serde_json::from_str(include_str!("fixtures/newer-calico/ippool.json")).unwrap();
    pool["spec"]["cidr"] = json!(cidr);
    pool["spec"]["ipipMode"] = json!("Never");
    pool["spec"]["blockSize"] = json!(26);
    pool["spec"]["nodeSelector"] = json!("all()");
    pool
}

fn put(etcd: &Etcd, key: &str, value: &str) {
    etcd.etcdctl(&["put", key, value]);
}

fn ipam_add(etcd: &Etcd, cid: &str) -> (i32, Value) {
    let conf = json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "calico-ipam",
        "etcd_endpoints": etcd.endpoint(), "nodename": "node-1"});
    let out = output_with_stdin(
        Command::new(env!("CARGO_BIN_EXE_calico-ipam"))
            .env_clear()
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", cid)
            .env("CNI_NETNS", "/run/netns/test")
            .env("CNI_IFNAME", "eth0")
            .env(
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=web-0",
            )
            .env("CNI_PATH", "/usr/lib/cni"),
        &conf.to_string(),
    );
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), v)
}

#[tokio::test]
async fn newer_calico_values_do_not_break_cni_add_and_survive_read_modify_write() {
    let Some(etcd) = Etcd::start() else {
        return;
    };
    let pool = newer_pool("10.0.1.0/24");
    put(
        &etcd,
        &format!("{RES}/ippools/ippool-name1"),
        &pool.to_string(),
    );
    // Another writer's broken value next to it must not hide it.
    put(&etcd, &format!("{RES}/ippools/broken"), "{not json");
    put(
        &etcd,
        &format!("{RES}/clusterinformations/default"),
        r#"{"kind":"ClusterInformation","apiVersion":"projectcalico.org/v3","metadata":{"name":"default"},"spec":{"datastoreReady":true,"clusterGUID":"g","calicoVersion":"v3.31.0","futureFlag":true}}"#,
    );
    let node: Value =
        serde_json::from_str(include_str!("fixtures/newer-calico/node.json")).unwrap();
    put(&etcd, &format!("{RES}/nodes/node4"), &node.to_string());

    // CNI ADD gets an address from the newer pool.
    let (code, res) = ipam_add(&etcd, "c1");
    assert_eq!(code, 0, "{res}");
    let addr = res["ips"][0]["address"].as_str().unwrap();
    assert!(addr.starts_with("10.0.1."), "{addr}");

    // A read-modify-write through the client keeps every field a newer Calico wrote.
    let client = Client::new(etcd.datastore().await);
    let (pools, _) = client.list::<IPPoolSpec>(None).await.unwrap();
    assert_eq!(pools.len(), 1, "the broken value is skipped, not fatal");
    let mut p = pools.into_iter().next().unwrap();
    p.spec.nat_outgoing = true;
    client.update(p).await.unwrap();
    let stored: Value =
        serde_json::from_str(&etcd.etcdctl_value(&format!("{RES}/ippools/ippool-name1"))).unwrap();
    let mut want = pool.clone();
    want["spec"]["natOutgoing"] = json!(true);
    assert_eq!(stored, want);

    let mut n = client
        .get::<NodeSpec>(None, "node4")
        .await
        .unwrap()
        .unwrap();
    n.spec.bgp.as_mut().unwrap().ipv4_address = Some("1.2.3.9/24".into());
    client.update(n).await.unwrap();
    let stored: Value =
        serde_json::from_str(&etcd.etcdctl_value(&format!("{RES}/nodes/node4"))).unwrap();
    let mut want = node.clone();
    want["spec"]["bgp"]["ipv4Address"] = json!("1.2.3.9/24");
    assert_eq!(stored, want);

    // calicoctl lists the good pool (with the newer field), and names the broken one.
    let calicoctl = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_calicoctl"))
            .env_clear()
            .env("ETCD_ENDPOINTS", etcd.endpoint())
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stdout, stderr) = calicoctl(&["get", "ippools", "-o", "yaml"]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("name: ippool-name1"), "{stdout}");
    assert!(stdout.contains("namespaceSelector: has(team)"), "{stdout}");
    assert!(
        stderr.contains(&format!("{RES}/ippools/broken")),
        "stderr names the skipped key: {stderr}"
    );

    // calicoctl patch keeps the newer field and still refuses a misspelt one.
    let (ok, stdout, stderr) = calicoctl(&[
        "patch",
        "ippool",
        "ippool-name1",
        "-p",
        r#"{"spec":{"natOutgoing":false}}"#,
    ]);
    assert!(ok, "{stdout}{stderr}");
    let stored: Value =
        serde_json::from_str(&etcd.etcdctl_value(&format!("{RES}/ippools/ippool-name1"))).unwrap();
    assert_eq!(stored, pool);
    let (ok, _, stderr) = calicoctl(&[
        "patch",
        "ippool",
        "ippool-name1",
        "-p",
        r#"{"spec":{"natoutgoing":true}}"#,
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("error with field spec.natoutgoing: unknown field `natoutgoing`"),
        "{stderr}"
    );

    // The broken value is an error naming its key when read alone.
    let e = client
        .get::<IPPoolSpec>(None, "broken")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(&format!("cannot decode stored {RES}/ippools/broken: ")),
        "{e}"
    );
}

#[test]
fn node_stays_up_and_names_a_corrupt_block_and_an_overflowing_duration() {
    let Some(ns) = NetNs::new("cn-stored") else {
        return;
    };
    ns.add_host_veth(&["10.99.7.1/24"], &[]);
    let Some(etcd) = Etcd::start_in(Some(&ns.name)) else {
        return;
    };
    // What other writers left: a newer Calico's pool and Node (with fields we do not
    // know), a BGPPeer whose maxRestartTime overflows, and a corrupt block of this node
    // (ordinal 1 both free and allocated).
    put(
        &etcd,
        &format!("{RES}/ippools/ippool-name1"),
        &newer_pool("10.244.0.0/16").to_string(),
    );
    let mut node: Value =
        serde_json::from_str(include_str!("fixtures/newer-calico/node.json")).unwrap();
    node["metadata"]["name"] = json!("node-a");
    put(&etcd, &format!("{RES}/nodes/node-a"), &node.to_string());
    put(
        &etcd,
        &format!("{RES}/bgppeers/far-future"),
        r#"{"kind":"BGPPeer","apiVersion":"projectcalico.org/v3","metadata":{"name":"far-future"},"spec":{"peerIP":"10.99.7.2","asNumber":64512,"maxRestartTime":"10000000000000000h"}}"#,
    );
    put(
        &etcd,
        &format!("{RES}/felixconfigurations/default"),
        r#"{"kind":"FelixConfiguration","apiVersion":"projectcalico.org/v3","metadata":{"name":"default"},"spec":{"routeRefreshInterval":"10000000000000000h","bpfEnabled":false}}"#,
    );
    let mut allocations = vec![Value::Null; 64];
    allocations[1] = json!(0);
    let block = json!({"cidr": "10.244.5.0/26", "affinity": "host:node-a",
        "allocations": allocations, "unallocated": (1..64).collect::<Vec<_>>(),
        "attributes": [{"handle_id": "k8s-pod-network.x", "secondary": {"node": "node-a"}}],
        "sequenceNumber": 1, "deleted": false});
    let block_key = "/calico/ipam/v2/assignment/ipv4/block/10.244.5.0-26";
    put(&etcd, block_key, &block.to_string());

    let health = free_port();
    let state = tempfile::tempdir().unwrap();
    let mut daemon = common::cluster::calico_node(
        &ns,
        "node-a",
        &etcd.endpoint(),
        state.path(),
        health,
        &[("IP_AUTODETECTION_METHOD", "interface=eth0")],
    );
    // Every actor comes up; BGP says it is waiting for the peer (which does not exist),
    // so the BGPPeer with the overflowing duration was taken into account, not fatal.
    let wanted = [
        r#"{"name":"datastore-syncer","live":true,"ready":true}"#,
        r#"{"name":"felix","live":true,"ready":true}"#,
        r#"{"name":"startup","live":true,"ready":true}"#,
        "BGP not established with 10.99.7.2",
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut body = String::new();
    while Instant::now() < deadline && !wanted.iter().all(|w| body.contains(w)) {
        std::thread::sleep(Duration::from_millis(200));
        body = ns
            .run_in(move || http_get(health, "/readiness"))
            .map(|(_, b)| b)
            .unwrap_or_default();
    }
    for w in wanted {
        assert!(body.contains(w), "readiness lacks {w}: {body}");
    }
    let log_path = state.path().join("calico-node.log");
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(15);
    let wants = [
        "BGPPeer far-future spec.maxRestartTime = '10000000000000000h' (duration out of range",
        "ordinal 1 is both unallocated and allocated",
        "error with field spec.routeRefreshInterval = '10000000000000000h' (duration out of range",
    ];
    while Instant::now() < deadline && !wants.iter().all(|w| log().contains(w)) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let text = log();
    for w in wants {
        assert!(text.contains(w), "log lacks {w:?}:\n{text}");
    }
    assert!(text.contains(block_key), "the block is named:\n{text}");
    assert!(!text.contains("panicked"), "{text}");
    assert!(daemon.0.try_wait().unwrap().is_none(), "calico-node exited");
    let live = wait_http(&ns, health, "/liveness", 200, Duration::from_secs(5));
    assert!(live.contains("\"live\":true"), "{live}");
    // Registration updated the Node and kept the newer Calico's fields.
    let stored: Value =
        serde_json::from_str(&etcd.etcdctl_value(&format!("{RES}/nodes/node-a"))).unwrap();
    assert_eq!(stored["spec"]["interfaces"], node["spec"]["interfaces"]);
    assert_eq!(stored["status"], node["status"]);
    assert_eq!(stored["spec"]["bgp"]["ipv4Address"], "10.99.7.1/24");
    // The corrupt block is left as it was: never used, never rewritten.
    assert_eq!(
        serde_json::from_str::<Value>(&etcd.etcdctl_value(block_key)).unwrap(),
        block
    );
}
