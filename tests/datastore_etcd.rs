//! The datastore and typed client against a real etcd: CRUD and CAS conflicts for every
//! kind, the exact key and JSON read back with etcdctl (golden files), paged lists,
//! watches and compaction.

mod common;

use std::sync::Arc;
use std::time::Duration;

use calico_node::datastore::{Client, ClientError, Datastore, DatastoreError, WatchEvent};
use calico_node::model::{self, AnyResource};
use common::{Etcd, assert_golden};

/// One sample document per kind, with fixed uid and timestamp so the stored JSON is stable.
const SAMPLES: &[(&str, &str, &str)] = &[
    (
        "ippool",
        "ippools/pool-a",
        r#"{"apiVersion":"projectcalico.org/v3","kind":"IPPool","metadata":{"name":"pool-a","uid":"11111111-1111-4111-8111-111111111111","creationTimestamp":"2026-01-01T00:00:00Z"},"spec":{"cidr":"10.65.0.0/16","ipipMode":"CrossSubnet","natOutgoing":true}}"#,
    ),
    (
        "bgpconfiguration",
        "bgpconfigurations/default",
        r#"{"apiVersion":"projectcalico.org/v3","kind":"BGPConfiguration","metadata":{"name":"default","uid":"22222222-2222-4222-8222-222222222222","creationTimestamp":"2026-01-01T00:00:00Z"},"spec":{"logSeverityScreen":"Info","nodeToNodeMeshEnabled":false,"asNumber":64513,"serviceClusterIPs":[{"cidr":"10.96.0.0/12"}]}}"#,
    ),
    (
        "bgppeer",
        "bgppeers/rr-peers",
        r#"{"apiVersion":"projectcalico.org/v3","kind":"BGPPeer","metadata":{"name":"rr-peers","uid":"33333333-3333-4333-8333-333333333333","creationTimestamp":"2026-01-01T00:00:00Z"},"spec":{"nodeSelector":"!has(routeReflector)","peerSelector":"has(routeReflector)"}}"#,
    ),
    (
        "node",
        "nodes/node-1",
        r#"{"apiVersion":"projectcalico.org/v3","kind":"Node","metadata":{"name":"node-1","uid":"44444444-4444-4444-8444-444444444444","creationTimestamp":"2026-01-01T00:00:00Z","labels":{"routeReflector":"true"}},"spec":{"bgp":{"ipv4Address":"10.99.0.1/24","routeReflectorClusterID":"224.0.0.1"},"ipv4VXLANTunnelAddr":"10.65.0.1","vxlanTunnelMACAddr":"66:aa:bb:cc:dd:ee"}}"#,
    ),
    (
        "felixconfiguration",
        "felixconfigurations/default",
        r#"{"apiVersion":"projectcalico.org/v3","kind":"FelixConfiguration","metadata":{"name":"default","uid":"55555555-5555-4555-8555-555555555555","creationTimestamp":"2026-01-01T00:00:00Z"},"spec":{"routeRefreshInterval":"60s","prometheusMetricsEnabled":true,"bpfLogLevel":""}}"#,
    ),
    (
        "workloadendpoint",
        "workloadendpoints/ns1/node--1-k8s-pod--a-eth0",
        r#"{"apiVersion":"projectcalico.org/v3","kind":"WorkloadEndpoint","metadata":{"name":"node--1-k8s-pod--a-eth0","namespace":"ns1","uid":"66666666-6666-4666-8666-666666666666","creationTimestamp":"2026-01-01T00:00:00Z"},"spec":{"orchestrator":"k8s","node":"node-1","containerID":"abc","pod":"pod-a","endpoint":"eth0","ipNetworks":["10.65.0.5/32"],"profiles":["kns.ns1"],"interfaceName":"cali1234567890a","mac":"aa:bb:cc:dd:ee:ff"}}"#,
    ),
    (
        "clusterinformation",
        "clusterinformations/default",
        r#"{"apiVersion":"projectcalico.org/v3","kind":"ClusterInformation","metadata":{"name":"default","uid":"77777777-7777-4777-8777-777777777777","creationTimestamp":"2026-01-01T00:00:00Z"},"spec":{"clusterGUID":"abc","calicoVersion":"v0.1.0","datastoreReady":true}}"#,
    ),
];

fn sample(doc: &str) -> AnyResource {
    AnyResource::from_document(serde_json::from_str(doc).unwrap()).unwrap()
}

/// Change something harmless in a resource (a label), so an update has a visible effect.
fn touched(mut r: AnyResource) -> AnyResource {
    r.meta_mut().labels.insert("touched".into(), "yes".into());
    r
}

#[tokio::test]
async fn every_kind_round_trips_with_calicos_key_and_json() {
    let Some(etcd) = Etcd::start() else { return };
    let ds = etcd.datastore().await;
    let client = Client::new(ds.clone());
    use calico_node::datastore::client::WriteOp::*;
    for (kind, path, doc) in SAMPLES {
        let key = format!("/calico/resources/v3/projectcalico.org/{path}");
        // create
        let mut r = sample(doc);
        client.check_any(&mut r, Create, &[]).await.unwrap();
        let created = client.write_any(r.clone(), Create).await.unwrap();
        assert_eq!(created.key(), key);
        assert_golden(
            &format!("etcd_{kind}.json"),
            &(etcd.etcdctl_value(&key) + "\n"),
        );
        let rev: i64 = created
            .meta()
            .resource_version
            .as_deref()
            .unwrap()
            .parse()
            .unwrap();
        let kv = ds.get(&key).await.unwrap().unwrap();
        assert_eq!(
            kv.mod_revision, rev,
            "{kind}: resourceVersion is the ModRevision"
        );
        // create again: exists
        let again = client.write_any(r.clone(), Create).await.unwrap_err();
        assert!(
            matches!(again, ClientError::AlreadyExists(_)),
            "{kind}: {again}"
        );
        // update with the right revision, then with the now stale one: conflict
        let updated = client
            .write_any(touched(created.clone()), Replace)
            .await
            .unwrap();
        let stale = client
            .write_any(touched(created.clone()), Replace)
            .await
            .unwrap_err();
        assert!(
            matches!(stale, ClientError::Conflict(..)),
            "{kind}: {stale}"
        );
        // read back
        let info = model::lookup_kind(kind).unwrap();
        let got = client
            .get_any(info, created.namespace(), &created.meta().name)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, updated);
        assert!(etcd.etcdctl_value(&key).contains("\"touched\":\"yes\""));
        // delete with a stale revision: conflict; then delete
        assert!(matches!(
            client.write_any(created.clone(), Delete).await,
            Err(ClientError::Conflict(..))
        ));
        client.write_any(updated.clone(), Delete).await.unwrap();
        assert_eq!(etcd.etcdctl_value(&key), "");
        assert!(matches!(
            client.write_any(updated, Delete).await,
            Err(ClientError::NotFound(_))
        ));
    }
}

#[tokio::test]
async fn raw_operations_follow_calicos_transactions() {
    let Some(etcd) = Etcd::start() else { return };
    let ds = etcd.datastore().await;
    let r1 = ds.create("/calico/t/a", b"1".to_vec()).await.unwrap();
    assert!(matches!(
        ds.create("/calico/t/a", b"2".to_vec()).await,
        Err(DatastoreError::AlreadyExists { .. })
    ));
    assert!(matches!(
        ds.update("/calico/t/a", b"2".to_vec(), r1 - 1).await,
        Err(DatastoreError::Conflict { expected, found, .. }) if expected == r1 - 1 && found == r1
    ));
    assert!(matches!(
        ds.update("/calico/t/none", b"2".to_vec(), 5).await,
        Err(DatastoreError::NotFound { .. })
    ));
    let r2 = ds.update("/calico/t/a", b"2".to_vec(), r1).await.unwrap();
    let prev = ds.delete("/calico/t/a", Some(r2)).await.unwrap();
    assert_eq!(prev.value, b"2");
    assert!(matches!(
        ds.delete("/calico/t/a", None).await,
        Err(DatastoreError::NotFound { .. })
    ));
}

#[tokio::test]
async fn lists_page_through_many_keys_at_one_revision() {
    let Some(etcd) = Etcd::start() else { return };
    let ds = Arc::new(
        calico_node::datastore::EtcdDatastore::connect(&Etcd::config_for(&etcd.endpoint()))
            .await
            .unwrap()
            .with_list_page(1000),
    );
    let futs: Vec<_> = (0..4500)
        .map(|i| {
            let ds = ds.clone();
            async move {
                ds.apply(&format!("/calico/many/{i:05}"), vec![b'x'; 100])
                    .await
                    .unwrap()
            }
        })
        .collect();
    futures::future::join_all(futs).await;
    ds.apply("/calico/other", b"y".to_vec()).await.unwrap();
    let (kvs, rev) = ds.list("/calico/many/").await.unwrap();
    assert_eq!(kvs.len(), 4500);
    assert!(kvs.windows(2).all(|w| w[0].key < w[1].key), "sorted by key");
    assert!(rev >= kvs.iter().map(|k| k.mod_revision).max().unwrap());
}

#[tokio::test]
async fn watch_delivers_puts_and_deletes_and_reports_compaction() {
    let Some(etcd) = Etcd::start() else { return };
    let ds = etcd.datastore().await;
    let r0 = ds.apply("/calico/w/a", b"1".to_vec()).await.unwrap();
    let mut w = ds.watch("/calico/w/", r0 + 1).await.unwrap();
    ds.apply("/calico/w/b", b"2".to_vec()).await.unwrap();
    ds.delete("/calico/w/a", None).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let batch = tokio::time::timeout(Duration::from_secs(5), w.recv())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        seen.extend(batch.events);
    }
    assert!(matches!(&seen[0], WatchEvent::Put { kv, prev: None } if kv.key == "/calico/w/b"));
    assert!(
        matches!(&seen[1], WatchEvent::Delete { key, prev: Some(p), .. } if key == "/calico/w/a" && p.value == b"1")
    );
    let now = ds.apply("/calico/w/c", b"3".to_vec()).await.unwrap();
    etcd.etcdctl(&["compaction", &now.to_string()]);
    let mut old = ds.watch("/calico/w/", r0).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), old.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(first, Err(DatastoreError::Compacted { .. })),
        "{first:?}"
    );
}

#[tokio::test]
async fn unreachable_etcd_is_reported_as_unavailable() {
    let port = common::free_port();
    let cfg = Etcd::config_for(&format!("http://127.0.0.1:{port}"));
    let ds: Arc<dyn Datastore> = match cfg.connect().await {
        Ok(ds) => ds,
        Err(e) => {
            assert!(matches!(e, DatastoreError::Unavailable(_)), "{e}");
            return;
        }
    };
    let e = ds.get("/calico/x").await.unwrap_err();
    assert!(matches!(e, DatastoreError::Unavailable(_)), "{e}");
}

/// A watch's task runs on the tracker the datastore was given (the daemon's), and ends
/// once its receiver is dropped, so the daemon's shutdown waits for it and is not held up
/// by it. (Before, the task was detached: shutdown neither knew of nor waited for it.)
#[tokio::test]
async fn watch_tasks_run_on_the_given_tracker_and_end_with_their_receiver() {
    let Some(etcd) = Etcd::start() else { return };
    let tasks = tokio_util::task::TaskTracker::new();
    let ds = Etcd::config_for(&etcd.endpoint())
        .connect_on(tasks.clone())
        .await
        .unwrap();
    let rx = ds.watch("/calico/tracked/", 0).await.unwrap();
    assert_eq!(
        tasks.len(),
        1,
        "the watch's task is on the daemon's tracker"
    );
    tasks.close();
    assert!(
        tokio::time::timeout(Duration::from_millis(200), tasks.wait())
            .await
            .is_err(),
        "a live watch keeps running"
    );
    drop(rx);
    tokio::time::timeout(Duration::from_secs(5), tasks.wait())
        .await
        .expect("the watch's task ends when its receiver is dropped");
}
