//! The datastore: a revisioned key-value store with compare-and-swap writes and watches
//! (etcd v3 semantics, REFERENCE §1), its etcd and in-memory backends, the typed Calico
//! client on top, and the syncer actor that feeds the rest of the node.

pub mod client;
pub mod config;
pub mod etcd;
pub mod memory;
pub mod syncer;

use async_trait::async_trait;
use tokio::sync::mpsc;

pub use client::{Client, ClientError};
pub use config::DatastoreConfig;
pub use etcd::EtcdDatastore;
pub use memory::MemoryDatastore;

/// One stored key with its etcd revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the last write to this key (Calico's `resourceVersion`).
    pub mod_revision: i64,
    /// Revision at which the key was created.
    pub create_revision: i64,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// The key was created or updated.
    Put {
        kv: KeyValue,
        prev: Option<KeyValue>,
    },
    /// The key was deleted at `mod_revision`.
    Delete {
        key: String,
        mod_revision: i64,
        prev: Option<KeyValue>,
    },
}

impl WatchEvent {
    /// Revision of the change.
    pub fn revision(&self) -> i64 {
        match self {
            WatchEvent::Put { kv, .. } => kv.mod_revision,
            WatchEvent::Delete { mod_revision, .. } => *mod_revision,
        }
    }
    /// The key that changed.
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put { kv, .. } => &kv.key,
            WatchEvent::Delete { key, .. } => key,
        }
    }
}

/// Events delivered together, and the revision up to which every change under the watched
/// prefix has now been delivered (a resumed watch starts after it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchBatch {
    pub events: Vec<WatchEvent>,
    pub revision: i64,
}

/// The receiving end of a watch. Dropping it cancels the watch.
pub type WatchReceiver = mpsc::Receiver<Result<WatchBatch, DatastoreError>>;

/// Datastore failures, typed so callers can handle "exists", "conflict" and "compacted"
/// on purpose.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DatastoreError {
    /// A create found the key already present.
    #[error("resource already exists: {key}")]
    AlreadyExists { key: String },
    /// The key does not exist.
    #[error("resource does not exist: {key}")]
    NotFound { key: String },
    /// A revision-checked write found another revision: someone else wrote first.
    #[error("update conflict on {key}: expected revision {expected}, found {found}")]
    Conflict {
        key: String,
        expected: i64,
        found: i64,
    },
    /// A watch asked for history that etcd has compacted away; the caller must re-list.
    #[error(
        "required revision {requested} has been compacted (oldest available {compact_revision})"
    )]
    Compacted {
        requested: i64,
        compact_revision: i64,
    },
    /// The datastore cannot be reached (connection refused, timeout, no leader).
    #[error("datastore unavailable: {0}")]
    Unavailable(String),
    /// Anything else the datastore reported.
    #[error("datastore error: {0}")]
    Other(String),
}

/// Result of a datastore operation.
pub type DsResult<T> = Result<T, DatastoreError>;

/// A revisioned key-value store with etcd v3 semantics (REFERENCE §1, "Write semantics").
#[async_trait]
pub trait Datastore: Send + Sync + 'static {
    /// Read one key.
    async fn get(&self, key: &str) -> DsResult<Option<KeyValue>>;
    /// Every key under `prefix`, sorted by key, and the store revision of that snapshot.
    async fn list(&self, prefix: &str) -> DsResult<(Vec<KeyValue>, i64)>;
    /// The same snapshot as `list`, handed over page by page as it arrives, so a consumer
    /// can decode one page while the next is fetched. Returns the snapshot's revision.
    async fn list_pages(&self, prefix: &str, pages: mpsc::Sender<Vec<KeyValue>>) -> DsResult<i64> {
        let (kvs, rev) = self.list(prefix).await?;
        pages
            .send(kvs)
            .await
            .map_err(|_| DatastoreError::Other("list consumer went away".into()))?;
        Ok(rev)
    }
    /// Create-only write: fails with `AlreadyExists`. Returns the new revision.
    async fn create(&self, key: &str, value: Vec<u8>) -> DsResult<i64>;
    /// Write only if the key's ModRevision is `revision`: `Conflict` or `NotFound` otherwise.
    async fn update(&self, key: &str, value: Vec<u8>, revision: i64) -> DsResult<i64>;
    /// Unconditional write.
    async fn apply(&self, key: &str, value: Vec<u8>) -> DsResult<i64>;
    /// Delete, optionally only at a given ModRevision. Returns the deleted value.
    async fn delete(&self, key: &str, revision: Option<i64>) -> DsResult<KeyValue>;
    /// Watch every change under `prefix` with revision >= `from_revision`.
    /// Compaction is reported as `Compacted`, on the call or on the stream.
    async fn watch(&self, prefix: &str, from_revision: i64) -> DsResult<WatchReceiver>;
}

/// Capacity of a watch channel: enough for a burst of writes; a consumer that falls this
/// far behind is cut off and must resume (as etcd does with slow watchers).
pub const WATCH_CHANNEL_CAPACITY: usize = 1024;
