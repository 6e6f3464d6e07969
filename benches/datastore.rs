//! `scripts/bench datastore`: the syncer's initial list + decode of 10,000
//! WorkloadEndpoints and 200 Nodes, and a watch of 10,000 updates, against `etcdctl get
//! --prefix` and `etcdctl watch --prefix` on the same data in the same run. Prints the
//! medians and the ratios (goal: list + decode <= 1.0x etcdctl).

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use calico_node::datastore::syncer::{SyncStatus, Syncer, SyncerEvent};
use calico_node::datastore::{Datastore, EtcdDatastore};
use calico_node::model::workload::workload_endpoint_name;
use common::Etcd;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

const WEPS: usize = 10_000;
const NODES: usize = 200;
const RUNS: usize = 9;

fn wep_json(i: usize, generation: usize) -> (String, String) {
    let node = format!("node-{}", i % NODES);
    let pod = format!("pod-{i}");
    let name = workload_endpoint_name(&node, "k8s", &pod, "eth0");
    let ns = format!("ns-{}", i % 20);
    let key = format!("/calico/resources/v3/projectcalico.org/workloadendpoints/{ns}/{name}");
    let v = serde_json::json!({
        "kind": "WorkloadEndpoint", "apiVersion": "projectcalico.org/v3",
        "metadata": {"name": name, "namespace": ns, "uid": format!("00000000-0000-4000-8000-{i:012}"),
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "labels": {"app": format!("app-{}", i % 50), "generation": generation.to_string(),
                "projectcalico.org/namespace": ns, "projectcalico.org/orchestrator": "k8s"}},
        "spec": {"orchestrator": "k8s", "node": node, "containerID": format!("{i:064x}"), "pod": pod,
            "endpoint": "eth0", "serviceAccountName": "default",
            "ipNetworks": [format!("10.{}.{}.{}/32", 64 + i / 65536, (i / 256) % 256, i % 256)],
            "profiles": [format!("kns.ns-{}", i % 20), "ksa.default"],
            "interfaceName": format!("cali{:011x}", i), "mac": "ee:ee:ee:ee:ee:ee"}
    });
    (key, v.to_string())
}

fn node_json(i: usize) -> (String, String) {
    let name = format!("node-{i}");
    let v = serde_json::json!({
        "kind": "Node", "apiVersion": "projectcalico.org/v3",
        "metadata": {"name": name, "uid": format!("00000000-0000-4000-9000-{i:012}"), "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"bgp": {"ipv4Address": format!("10.99.{}.{}/16", i / 256, i % 256)},
            "orchRefs": [{"nodeName": name, "orchestrator": "k8s"}]}
    });
    (
        format!("/calico/resources/v3/projectcalico.org/nodes/{name}"),
        v.to_string(),
    )
}

async fn load(ds: &Arc<EtcdDatastore>, items: Vec<(String, String)>) {
    futures::stream::iter(items)
        .map(|(k, v)| {
            let ds = ds.clone();
            async move { ds.apply(&k, v.into_bytes()).await.expect("load") }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Our side: a fresh connection, list + decode everything, until the in-sync marker.
async fn syncer_initial_list(etcd: &Etcd) -> (Duration, usize) {
    let start = Instant::now();
    let ds: Arc<dyn Datastore> = Arc::new(
        EtcdDatastore::connect(&Etcd::config_for(&etcd.endpoint()))
            .await
            .unwrap(),
    );
    let mut syncer = Syncer::new(ds, "/calico/");
    let mut rx = syncer.subscribe(65536);
    let cancel = CancellationToken::new();
    tokio::spawn(syncer.run(cancel.clone()));
    let mut n = 0;
    while let Some(ev) = rx.recv().await {
        match ev {
            SyncerEvent::Update(_) => n += 1,
            SyncerEvent::Status(SyncStatus::InSync) => break,
            _ => {}
        }
    }
    let t = start.elapsed();
    cancel.cancel();
    (t, n)
}

fn etcdctl_get(etcd: &Etcd) -> Duration {
    let start = Instant::now();
    let st = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            "--endpoints",
            &etcd.endpoint(),
            "get",
            "--prefix",
            "/calico/",
        ])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    start.elapsed()
}

#[tokio::main]
async fn main() {
    let Some(etcd) = Etcd::start() else { return };
    let ds = etcd.datastore().await;
    let mut items: Vec<_> = (0..WEPS).map(|i| wep_json(i, 0)).collect();
    items.extend((0..NODES).map(node_json));
    let bytes: usize = items.iter().map(|(k, v)| k.len() + v.len()).sum();
    load(&ds, items).await;
    println!(
        "datastore benchmark: {WEPS} WorkloadEndpoints + {NODES} Nodes ({:.1} MiB) in etcd, {RUNS} runs each",
        bytes as f64 / 1048576.0
    );

    // Warm-up of both sides.
    syncer_initial_list(&etcd).await;
    etcdctl_get(&etcd);
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for _ in 0..RUNS {
        let (t, n) = syncer_initial_list(&etcd).await;
        assert_eq!(n, WEPS + NODES, "syncer delivered every key");
        ours.push(t);
        theirs.push(etcdctl_get(&etcd));
    }
    let mut raw = Vec::new();
    for _ in 0..RUNS {
        let start = Instant::now();
        let ds = EtcdDatastore::connect(&Etcd::config_for(&etcd.endpoint()))
            .await
            .unwrap();
        let (kvs, _) = ds.list("/calico/").await.unwrap();
        assert_eq!(kvs.len(), WEPS + NODES);
        raw.push(start.elapsed());
    }
    println!(
        "  (of which the raw paged list, without decoding: {:.1} ms)",
        median(raw).as_secs_f64() * 1e3
    );
    {
        let (kvs, _) = ds.list("/calico/").await.unwrap();
        let start = Instant::now();
        let n = kvs
            .iter()
            .filter_map(calico_node::datastore::syncer::decode)
            .filter(|r| r.is_ok())
            .count();
        println!(
            "  (decoding {n} values on one core: {:.1} ms; the syncer decodes pages in parallel with the list)",
            start.elapsed().as_secs_f64() * 1e3
        );
    }
    let (o, t) = (median(ours), median(theirs));
    println!(
        "initial list + decode: syncer {:>8.1} ms   etcdctl get --prefix {:>8.1} ms   ratio {:.2}x (goal <= 1.0x)",
        o.as_secs_f64() * 1e3,
        t.as_secs_f64() * 1e3,
        o.as_secs_f64() / t.as_secs_f64()
    );

    // Watch of 10,000 updates: both watchers run while the same writes happen.
    let ds_watch: Arc<dyn Datastore> = Arc::new(
        EtcdDatastore::connect(&Etcd::config_for(&etcd.endpoint()))
            .await
            .unwrap(),
    );
    let mut syncer = Syncer::new(ds_watch, "/calico/");
    let mut rx = syncer.subscribe(65536);
    let cancel = CancellationToken::new();
    tokio::spawn(syncer.run(cancel.clone()));
    while let Some(ev) = rx.recv().await {
        if ev == SyncerEvent::Status(SyncStatus::InSync) {
            break;
        }
    }
    let mut child = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            "--endpoints",
            &etcd.endpoint(),
            "watch",
            "--prefix",
            "/calico/",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let s2 = seen.clone();
    // etcdctl prints three lines per event: PUT, the key, the value.
    let reader = std::thread::spawn(move || {
        let mut lines = 0usize;
        let mut done_at = None;
        for l in BufReader::new(stdout).lines() {
            if l.is_err() {
                break;
            }
            lines += 1;
            if lines.is_multiple_of(3) {
                let n = s2.fetch_add(1, Ordering::SeqCst) + 1;
                if n == WEPS {
                    done_at = Some(Instant::now());
                    break;
                }
            }
        }
        done_at
    });
    tokio::time::sleep(Duration::from_millis(500)).await; // let etcdctl's watch start
    let start = Instant::now();
    let writer = {
        let ds = ds.clone();
        tokio::spawn(async move { load(&ds, (0..WEPS).map(|i| wep_json(i, 1)).collect()).await })
    };
    let mut n = 0;
    while n < WEPS {
        if let Some(SyncerEvent::Update(_)) = rx.recv().await {
            n += 1;
        }
    }
    let ours = start.elapsed();
    writer.await.unwrap();
    let writes = start.elapsed();
    let theirs_at = tokio::task::spawn_blocking(move || reader.join().unwrap())
        .await
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    cancel.cancel();
    let theirs = theirs_at
        .map(|t| t.duration_since(start))
        .expect("etcdctl saw every update");
    println!(
        "watch of {WEPS} updates (writes took {:.1} ms): syncer {:>8.1} ms   etcdctl watch {:>8.1} ms   ratio {:.2}x",
        writes.as_secs_f64() * 1e3,
        ours.as_secs_f64() * 1e3,
        theirs.as_secs_f64() * 1e3,
        ours.as_secs_f64() / theirs.as_secs_f64()
    );
}
