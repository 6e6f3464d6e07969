//! The syncer against a real etcd: typed events, recovery from compaction with the exact
//! diff (no loop: calico#4109), and etcd killed and restarted mid-watch.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use calico_node::datastore::syncer::{
    SyncStatus, SyncValue, Syncer, SyncerEvent, SyncerMetrics, UpdateType,
};
use calico_node::datastore::{Client, Datastore, EtcdDatastore};
use calico_node::model::{AnyResource, IPPool, IPPoolSpec};
use common::{Etcd, Proxy, eventually};
use tokio_util::sync::CancellationToken;

type Log = Arc<Mutex<Vec<SyncerEvent>>>;

/// Run a syncer over `/calico/` and collect what it emits.
fn start_syncer(
    ds: Arc<dyn Datastore>,
    registry: &prometheus::Registry,
) -> (Log, CancellationToken) {
    let mut syncer =
        Syncer::new(ds, "/calico/").with_metrics(SyncerMetrics::new(registry).unwrap());
    let mut rx = syncer.subscribe(1024);
    let cancel = CancellationToken::new();
    tokio::spawn(syncer.run(cancel.clone()));
    let log: Log = Arc::default();
    let l = log.clone();
    tokio::spawn(async move {
        while let Some(ev) = rx.recv().await {
            l.lock().unwrap().push(ev);
        }
    });
    (log, cancel)
}

fn pool(name: &str, cidr: &str) -> IPPool {
    IPPool::new(
        name,
        IPPoolSpec {
            cidr: cidr.into(),
            ..Default::default()
        },
    )
}

/// (key suffix, type) of the updates in the log, in order.
fn updates(log: &Log) -> Vec<(String, UpdateType)> {
    log.lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            SyncerEvent::Update(u) => {
                Some((u.key.rsplit('/').next().unwrap().to_string(), u.update_type))
            }
            _ => None,
        })
        .collect()
}

fn statuses(log: &Log) -> Vec<SyncStatus> {
    log.lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            SyncerEvent::Status(s) => Some(*s),
            _ => None,
        })
        .collect()
}

/// The state a consumer builds from the events: key -> value.
fn replay(log: &Log) -> BTreeMap<String, SyncValue> {
    let mut m = BTreeMap::new();
    for e in log.lock().unwrap().iter() {
        if let SyncerEvent::Update(u) = e {
            match &u.value {
                Some(v) => {
                    m.insert(u.key.clone(), (**v).clone());
                }
                None => {
                    m.remove(&u.key);
                }
            }
        }
    }
    m
}

/// What etcd holds, decoded the same way.
async fn truth(ds: &dyn Datastore) -> BTreeMap<String, SyncValue> {
    let (kvs, _) = ds.list("/calico/").await.unwrap();
    kvs.iter()
        .filter_map(|kv| {
            calico_node::datastore::syncer::decode(kv).map(|v| (kv.key.clone(), v.unwrap()))
        })
        .collect()
}

fn counter(registry: &prometheus::Registry, name: &str) -> f64 {
    registry
        .gather()
        .iter()
        .find(|f| f.name() == name)
        .map(|f| {
            f.get_metric()
                .iter()
                .map(|m| m.get_counter().value() + m.get_gauge().value())
                .sum()
        })
        .unwrap_or(0.0)
}

#[tokio::test]
async fn put_update_delete_become_typed_events_after_in_sync() {
    let Some(etcd) = Etcd::start() else { return };
    let ds = etcd.datastore().await;
    let client = Client::new(ds.clone());
    client.create(pool("a", "10.1.0.0/16")).await.unwrap();
    let registry = prometheus::Registry::new();
    let (log, cancel) = start_syncer(ds.clone(), &registry);
    eventually(Duration::from_secs(10), "in sync", || async {
        statuses(&log).contains(&SyncStatus::InSync).then_some(())
    })
    .await;
    assert_eq!(
        statuses(&log),
        vec![SyncStatus::ResyncInProgress, SyncStatus::InSync]
    );
    assert_eq!(updates(&log), vec![("a".to_string(), UpdateType::New)]);

    let b = client.create(pool("b", "10.2.0.0/16")).await.unwrap();
    let mut b2 = b.clone();
    b2.spec.nat_outgoing = true;
    client.update(b2).await.unwrap();
    client.delete::<IPPoolSpec>(None, "a", None).await.unwrap();
    let want = vec![
        ("a".to_string(), UpdateType::New),
        ("b".to_string(), UpdateType::New),
        ("b".to_string(), UpdateType::Updated),
        ("a".to_string(), UpdateType::Deleted),
    ];
    eventually(Duration::from_secs(10), "watch events", || async {
        (updates(&log).len() >= 4).then_some(())
    })
    .await;
    assert_eq!(updates(&log), want);
    // The typed value carries the resource with its resourceVersion.
    let last_b = log.lock().unwrap().iter().rev().find_map(|e| match e {
        SyncerEvent::Update(u) if u.key.ends_with("/b") => u.value.clone(),
        _ => None,
    });
    match last_b.as_deref() {
        Some(SyncValue::Resource(AnyResource::IPPool(p))) => {
            assert!(p.spec.nat_outgoing);
            assert!(p.metadata.resource_version.is_some());
        }
        other => panic!("unexpected value {other:?}"),
    }
    assert_eq!(counter(&registry, "calico_syncer_in_sync"), 1.0);
    assert_eq!(counter(&registry, "calico_syncer_events_total"), 4.0);
    cancel.cancel();
}

#[tokio::test]
async fn compaction_while_disconnected_relists_and_emits_only_the_difference() {
    let Some(etcd) = Etcd::start() else { return };
    let direct = etcd.datastore().await;
    let client = Client::new(direct.clone());
    for (n, c) in [
        ("a", "10.1.0.0/16"),
        ("b", "10.2.0.0/16"),
        ("c", "10.3.0.0/16"),
    ] {
        client.create(pool(n, c)).await.unwrap();
    }
    let target: SocketAddr = format!("127.0.0.1:{}", etcd.client_port).parse().unwrap();
    let proxy = Proxy::start(target).await;
    let via_proxy: Arc<dyn Datastore> = Arc::new(
        EtcdDatastore::connect(&Etcd::config_for(&proxy.endpoint()))
            .await
            .unwrap(),
    );
    let registry = prometheus::Registry::new();
    let (log, cancel) = start_syncer(via_proxy, &registry);
    eventually(Duration::from_secs(10), "in sync", || async {
        statuses(&log).contains(&SyncStatus::InSync).then_some(())
    })
    .await;
    let before = updates(&log).len();
    assert_eq!(before, 3);

    proxy.cut();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // While the syncer cannot see etcd: update a, delete b, create d, create and delete e.
    let mut a = client.get::<IPPoolSpec>(None, "a").await.unwrap().unwrap();
    a.spec.nat_outgoing = true;
    client.update(a).await.unwrap();
    client.delete::<IPPoolSpec>(None, "b", None).await.unwrap();
    client.create(pool("d", "10.4.0.0/16")).await.unwrap();
    client.create(pool("e", "10.5.0.0/16")).await.unwrap();
    let gone = client.delete::<IPPoolSpec>(None, "e", None).await.unwrap();
    let rev: i64 = gone
        .metadata
        .resource_version
        .unwrap()
        .parse::<i64>()
        .unwrap()
        + 1;
    etcd.etcdctl(&["compaction", &rev.to_string()]);
    proxy.restore();

    eventually(
        Duration::from_secs(30),
        "resync after compaction",
        || async {
            (statuses(&log)
                .iter()
                .filter(|s| **s == SyncStatus::InSync)
                .count()
                >= 2)
                .then_some(())
        },
    )
    .await;
    let mut diff = updates(&log)[before..].to_vec();
    diff.sort();
    assert_eq!(
        diff,
        vec![
            ("a".to_string(), UpdateType::Updated),
            ("b".to_string(), UpdateType::Deleted),
            ("d".to_string(), UpdateType::New)
        ],
        "exactly the real differences, nothing for c (unchanged) or e (created and deleted)"
    );
    assert_eq!(counter(&registry, "calico_syncer_resyncs_total"), 2.0);
    // No loop: the watch works again from the new revision, and no further resync happens.
    client.create(pool("f", "10.6.0.0/16")).await.unwrap();
    eventually(Duration::from_secs(10), "event after resync", || async {
        updates(&log).last().filter(|u| u.0 == "f").map(|_| ())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(counter(&registry, "calico_syncer_resyncs_total"), 2.0);
    assert_eq!(replay(&log), truth(direct.as_ref()).await);
    cancel.cancel();
}

#[tokio::test]
async fn etcd_killed_and_restarted_loses_and_duplicates_nothing() {
    let Some(mut etcd) = Etcd::start() else {
        return;
    };
    let ds = etcd.datastore().await;
    let client = Client::new(ds.clone());
    client.create(pool("a", "10.1.0.0/16")).await.unwrap();
    client.create(pool("b", "10.2.0.0/16")).await.unwrap();
    let registry = prometheus::Registry::new();
    let (log, cancel) = start_syncer(ds.clone(), &registry);
    eventually(Duration::from_secs(10), "in sync", || async {
        statuses(&log).contains(&SyncStatus::InSync).then_some(())
    })
    .await;

    etcd.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    etcd.restart();
    // Writes after the restart (the client reconnects on its own).
    let c = eventually(Duration::from_secs(20), "client reconnect", || async {
        client.create(pool("c", "10.3.0.0/16")).await.ok()
    })
    .await;
    assert_eq!(c.metadata.name, "c");
    let mut a = client.get::<IPPoolSpec>(None, "a").await.unwrap().unwrap();
    a.spec.disabled = true;
    client.update(a).await.unwrap();

    eventually(Duration::from_secs(30), "events after restart", || async {
        let u = updates(&log);
        (u.contains(&("c".into(), UpdateType::New))
            && u.contains(&("a".into(), UpdateType::Updated)))
        .then_some(())
    })
    .await;
    let u = updates(&log);
    let news: Vec<_> = u
        .iter()
        .filter(|x| x.1 == UpdateType::New)
        .map(|x| x.0.clone())
        .collect();
    assert_eq!(news, vec!["a", "b", "c"], "each key announced once: {u:?}");
    assert_eq!(replay(&log), truth(ds.as_ref()).await);
    cancel.cancel();
}

#[tokio::test]
async fn a_quiet_watch_outlives_the_request_timeout() {
    let Some(etcd) = Etcd::start() else { return };
    let mut cfg = Etcd::config_for(&etcd.endpoint());
    cfg.timeout = Duration::from_secs(1);
    let ds: Arc<dyn Datastore> = Arc::new(EtcdDatastore::connect(&cfg).await.unwrap());
    let registry = prometheus::Registry::new();
    let (log, cancel) = start_syncer(ds, &registry);
    eventually(Duration::from_secs(10), "in sync", || async {
        statuses(&log).contains(&SyncStatus::InSync).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let client = Client::new(etcd.datastore().await);
    client.create(pool("late", "10.9.0.0/16")).await.unwrap();
    eventually(
        Duration::from_secs(5),
        "event after a quiet period",
        || async { updates(&log).iter().any(|u| u.0 == "late").then_some(()) },
    )
    .await;
    assert_eq!(
        counter(&registry, "calico_datastore_errors_total"),
        0.0,
        "the watch was never cut"
    );
    cancel.cancel();
}
