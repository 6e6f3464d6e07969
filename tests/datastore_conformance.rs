//! The same behaviour checks run against both backends (real etcd and the in-memory one),
//! so unit tests that use the in-memory backend test what etcd does.

mod common;

use std::sync::Arc;
use std::time::Duration;

use calico_node::datastore::{Datastore, DatastoreError, MemoryDatastore, WatchEvent};
use common::Etcd;

async fn conformance(ds: Arc<dyn Datastore>) {
    // create-only, with revisions
    let r1 = ds.create("/calico/c/b", b"1".to_vec()).await.unwrap();
    assert!(matches!(
        ds.create("/calico/c/b", b"x".to_vec()).await,
        Err(DatastoreError::AlreadyExists { .. })
    ));
    let kv = ds.get("/calico/c/b").await.unwrap().unwrap();
    assert_eq!(
        (kv.mod_revision, kv.create_revision, kv.value.as_slice()),
        (r1, r1, &b"1"[..])
    );
    // update: CAS on ModRevision
    assert!(matches!(
        ds.update("/calico/c/b", b"2".to_vec(), r1 + 100).await,
        Err(DatastoreError::Conflict { expected, found, .. }) if expected == r1 + 100 && found == r1
    ));
    assert!(matches!(
        ds.update("/calico/c/zz", b"2".to_vec(), r1).await,
        Err(DatastoreError::NotFound { .. })
    ));
    let r2 = ds.update("/calico/c/b", b"2".to_vec(), r1).await.unwrap();
    assert!(r2 > r1);
    let kv = ds.get("/calico/c/b").await.unwrap().unwrap();
    assert_eq!(
        (kv.mod_revision, kv.create_revision),
        (r2, r1),
        "create revision kept"
    );
    // apply: unconditional
    let ra = ds.apply("/calico/c/a", b"A".to_vec()).await.unwrap();
    ds.apply("/calico/d/x", b"X".to_vec()).await.unwrap();
    // list: prefix only, sorted by key, revision of the snapshot
    let (kvs, rev) = ds.list("/calico/c/").await.unwrap();
    assert_eq!(
        kvs.iter().map(|k| k.key.as_str()).collect::<Vec<_>>(),
        ["/calico/c/a", "/calico/c/b"]
    );
    assert!(rev >= ra);
    // watch from a revision: history then live events, with the previous value
    let mut w = ds.watch("/calico/c/", r2).await.unwrap();
    ds.delete("/calico/c/a", None).await.unwrap();
    let mut seen: Vec<WatchEvent> = Vec::new();
    while seen.len() < 3 {
        let batch = tokio::time::timeout(Duration::from_secs(5), w.recv())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        seen.extend(batch.events);
    }
    assert!(
        matches!(&seen[0], WatchEvent::Put { kv, prev: Some(p) } if kv.key == "/calico/c/b" && p.value == b"1")
    );
    assert!(matches!(&seen[1], WatchEvent::Put { kv, prev: None } if kv.key == "/calico/c/a"));
    assert!(
        matches!(&seen[2], WatchEvent::Delete { key, prev: Some(p), .. } if key == "/calico/c/a" && p.value == b"A")
    );
    // delete: revision-checked, returns the value, NotFound after
    assert!(matches!(
        ds.delete("/calico/c/b", Some(r1)).await,
        Err(DatastoreError::Conflict { .. })
    ));
    assert_eq!(
        ds.delete("/calico/c/b", Some(r2)).await.unwrap().value,
        b"2"
    );
    assert!(matches!(
        ds.delete("/calico/c/b", None).await,
        Err(DatastoreError::NotFound { .. })
    ));
    assert!(ds.get("/calico/c/b").await.unwrap().is_none());
}

#[tokio::test]
async fn in_memory_backend_behaves_like_etcd() {
    conformance(Arc::new(MemoryDatastore::new())).await;
}

#[tokio::test]
async fn etcd_backend_conforms() {
    let Some(etcd) = Etcd::start() else { return };
    conformance(etcd.datastore().await).await;
}
