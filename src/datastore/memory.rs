//! An in-memory datastore with etcd's semantics (revisions, CAS, watch history,
//! compaction), for unit tests of logic above the datastore and as a product backend for
//! single-process use. Tests of code that talks to etcd also run against real etcd.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::{
    Datastore, DatastoreError, DsResult, KeyValue, WATCH_CHANNEL_CAPACITY, WatchBatch, WatchEvent,
    WatchReceiver,
};

struct Watcher {
    prefix: String,
    tx: mpsc::Sender<DsResult<WatchBatch>>,
}

#[derive(Default)]
struct Inner {
    data: BTreeMap<String, KeyValue>,
    revision: i64,
    /// Every change since the last compaction, in revision order.
    history: Vec<WatchEvent>,
    compacted: i64,
    watchers: Vec<Watcher>,
    unavailable: bool,
}

/// In-memory etcd look-alike. Cheap to clone: clones share the same store.
#[derive(Clone, Default)]
pub struct MemoryDatastore {
    inner: Arc<Mutex<Inner>>,
}

impl MemoryDatastore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the map half-updated (each write is
        // a single insert/remove), so a poisoned lock is still consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drop history up to `revision`, like `etcdctl compact`.
    pub fn compact(&self, revision: i64) {
        let mut g = self.lock();
        g.compacted = g.compacted.max(revision);
        let c = g.compacted;
        g.history.retain(|e| e.revision() > c);
    }

    /// Simulate an outage: while unavailable every call fails and open watches are closed.
    pub fn set_available(&self, available: bool) {
        let mut g = self.lock();
        g.unavailable = !available;
        if !available {
            g.watchers.clear();
        }
    }

    /// Current store revision.
    pub fn revision(&self) -> i64 {
        self.lock().revision
    }

    fn check(g: &Inner) -> DsResult<()> {
        if g.unavailable {
            Err(DatastoreError::Unavailable(
                "in-memory datastore set unavailable".into(),
            ))
        } else {
            Ok(())
        }
    }

    fn commit(g: &mut Inner, event: WatchEvent) {
        let rev = event.revision();
        g.history.push(event.clone());
        g.watchers.retain(|w| {
            if !event.key().starts_with(&w.prefix) {
                return !w.tx.is_closed();
            }
            let batch = WatchBatch {
                events: vec![event.clone()],
                revision: rev,
            };
            // A full channel means the consumer fell too far behind: cut it off (it will
            // resume from its last revision), as etcd cancels slow watchers.
            w.tx.try_send(Ok(batch)).is_ok()
        });
    }

    fn put(g: &mut Inner, key: &str, value: Vec<u8>) -> i64 {
        g.revision += 1;
        let rev = g.revision;
        let prev = g.data.get(key).cloned();
        let kv = KeyValue {
            key: key.to_string(),
            value,
            mod_revision: rev,
            create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
        };
        g.data.insert(key.to_string(), kv.clone());
        Self::commit(g, WatchEvent::Put { kv, prev });
        rev
    }
}

#[async_trait]
impl Datastore for MemoryDatastore {
    async fn get(&self, key: &str) -> DsResult<Option<KeyValue>> {
        let g = self.lock();
        Self::check(&g)?;
        Ok(g.data.get(key).cloned())
    }

    async fn list(&self, prefix: &str) -> DsResult<(Vec<KeyValue>, i64)> {
        let g = self.lock();
        Self::check(&g)?;
        let kvs = g
            .data
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v.clone())
            .collect();
        Ok((kvs, g.revision))
    }

    async fn create(&self, key: &str, value: Vec<u8>) -> DsResult<i64> {
        let mut g = self.lock();
        Self::check(&g)?;
        if g.data.contains_key(key) {
            return Err(DatastoreError::AlreadyExists { key: key.into() });
        }
        Ok(Self::put(&mut g, key, value))
    }

    async fn update(&self, key: &str, value: Vec<u8>, revision: i64) -> DsResult<i64> {
        let mut g = self.lock();
        Self::check(&g)?;
        match g.data.get(key) {
            None => Err(DatastoreError::NotFound { key: key.into() }),
            Some(kv) if kv.mod_revision != revision => Err(DatastoreError::Conflict {
                key: key.into(),
                expected: revision,
                found: kv.mod_revision,
            }),
            Some(_) => Ok(Self::put(&mut g, key, value)),
        }
    }

    async fn apply(&self, key: &str, value: Vec<u8>) -> DsResult<i64> {
        let mut g = self.lock();
        Self::check(&g)?;
        Ok(Self::put(&mut g, key, value))
    }

    async fn delete(&self, key: &str, revision: Option<i64>) -> DsResult<KeyValue> {
        let mut g = self.lock();
        Self::check(&g)?;
        let current = g
            .data
            .get(key)
            .cloned()
            .ok_or_else(|| DatastoreError::NotFound { key: key.into() })?;
        if let Some(rev) = revision
            && rev != current.mod_revision
        {
            return Err(DatastoreError::Conflict {
                key: key.into(),
                expected: rev,
                found: current.mod_revision,
            });
        }
        g.data.remove(key);
        g.revision += 1;
        let rev = g.revision;
        Self::commit(
            &mut g,
            WatchEvent::Delete {
                key: key.into(),
                mod_revision: rev,
                prev: Some(current.clone()),
            },
        );
        Ok(current)
    }

    async fn watch(&self, prefix: &str, from_revision: i64) -> DsResult<WatchReceiver> {
        let mut g = self.lock();
        Self::check(&g)?;
        if from_revision <= g.compacted && from_revision <= g.revision {
            return Err(DatastoreError::Compacted {
                requested: from_revision,
                compact_revision: g.compacted + 1,
            });
        }
        let (tx, rx) = mpsc::channel(WATCH_CHANNEL_CAPACITY);
        let backlog: Vec<WatchEvent> = g
            .history
            .iter()
            .filter(|e| e.revision() >= from_revision && e.key().starts_with(prefix))
            .cloned()
            .collect();
        if !backlog.is_empty() {
            let batch = WatchBatch {
                events: backlog,
                revision: g.revision,
            };
            // The channel is new and empty: the first send always fits.
            let _ = tx.try_send(Ok(batch));
        }
        g.watchers.push(Watcher {
            prefix: prefix.to_string(),
            tx,
        });
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn create_update_delete_follow_etcd_semantics() {
        let ds = MemoryDatastore::new();
        let r1 = ds.create("/a", b"1".to_vec()).await.unwrap();
        assert!(matches!(
            ds.create("/a", b"x".to_vec()).await,
            Err(DatastoreError::AlreadyExists { .. })
        ));
        assert!(matches!(
            ds.update("/a", b"2".to_vec(), r1 + 5).await,
            Err(DatastoreError::Conflict { .. })
        ));
        assert!(matches!(
            ds.update("/b", b"2".to_vec(), 1).await,
            Err(DatastoreError::NotFound { .. })
        ));
        let r2 = ds.update("/a", b"2".to_vec(), r1).await.unwrap();
        assert!(r2 > r1);
        let kv = ds.get("/a").await.unwrap().unwrap();
        assert_eq!(
            (kv.value.as_slice(), kv.mod_revision, kv.create_revision),
            (&b"2"[..], r2, r1)
        );
        assert!(matches!(
            ds.delete("/a", Some(r1)).await,
            Err(DatastoreError::Conflict { .. })
        ));
        ds.delete("/a", Some(r2)).await.unwrap();
        assert!(ds.get("/a").await.unwrap().is_none());
        assert!(matches!(
            ds.delete("/a", None).await,
            Err(DatastoreError::NotFound { .. })
        ));
    }

    #[tokio::test]
    async fn watch_replays_history_then_follows_and_reports_compaction() {
        let ds = MemoryDatastore::new();
        let r1 = ds.apply("/p/a", b"1".to_vec()).await.unwrap();
        ds.apply("/q/x", b"1".to_vec()).await.unwrap();
        let mut w = ds.watch("/p/", r1).await.unwrap();
        ds.apply("/p/b", b"2".to_vec()).await.unwrap();
        let first = w.recv().await.unwrap().unwrap();
        assert_eq!(first.events.len(), 1);
        assert_eq!(first.events[0].key(), "/p/a");
        let second = w.recv().await.unwrap().unwrap();
        assert_eq!(second.events[0].key(), "/p/b");
        ds.compact(ds.revision());
        assert!(matches!(
            ds.watch("/p/", r1).await,
            Err(DatastoreError::Compacted { .. })
        ));
        assert!(ds.watch("/p/", ds.revision() + 1).await.is_ok());
    }
}
