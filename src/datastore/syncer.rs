//! The syncer actor: list + watch of every Calico key, turned into typed updates with an
//! in-sync marker, for confd, Felix and the node's own tasks.
//!
//! ```text
//!  Datastore --list/watch--> [Syncer] --SyncerEvent (bounded mpsc, one per subscriber)--> consumers
//!                               |
//!                               +--> metrics (events, resyncs, in-sync, errors), health
//! ```
//! Recovery rules (REFERENCE §1; Calico bug calico#4109 is the loop we must never have):
//! - a broken watch is resumed from the last revision seen, with backoff; the cache is kept
//!   and consumers keep their state;
//! - a watch that reports compaction triggers a fresh list at the current revision, and
//!   only the real differences against the cache are emitted — the new watch starts after
//!   that list's revision, which is never compacted, so the syncer cannot loop.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::client::decode_any;
use super::{Datastore, DatastoreError, KeyValue, WatchEvent};
use crate::health::HealthReporter;
use crate::model::ipam::{AllocationBlock, BlockAffinity, IPAMConfig, IPAMHandle};
use crate::model::keys::{IpamKey, parse_ipam_key, parse_resource_key};
use crate::model::{AnyResource, kind_by_plural};

/// Everything Calico keeps under this prefix: v3 resources and IPAM records.
pub const CALICO_PREFIX: &str = "/calico/";

/// A decoded value of a Calico key.
// Values travel behind an `Arc` in [`Update`], so the variants' size difference costs one
// allocation per value either way.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum SyncValue {
    Resource(AnyResource),
    Block(AllocationBlock),
    Affinity {
        host: String,
        cidr: ipnet::IpNet,
        affinity: BlockAffinity,
    },
    Handle {
        id: String,
        handle: IPAMHandle,
    },
    IpamConfig(IPAMConfig),
}

impl SyncValue {
    /// A short name of what the value is, for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            SyncValue::Resource(r) => r.kind(),
            SyncValue::Block(_) => "IPAMBlock",
            SyncValue::Affinity { .. } => "BlockAffinity",
            SyncValue::Handle { .. } => "IPAMHandle",
            SyncValue::IpamConfig(_) => "IPAMConfig",
        }
    }
}

/// What happened to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum UpdateType {
    New,
    Updated,
    Deleted,
}

impl UpdateType {
    fn label(self) -> &'static str {
        match self {
            UpdateType::New => "new",
            UpdateType::Updated => "updated",
            UpdateType::Deleted => "deleted",
        }
    }
}

/// One typed change.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    pub key: String,
    pub update_type: UpdateType,
    /// The new value (`None` for deletes).
    pub value: Option<Arc<SyncValue>>,
    /// The etcd revision of the change.
    pub revision: i64,
}

/// The syncer's state, as Calico's syncers report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncStatus {
    /// Listing (first time or after compaction).
    ResyncInProgress,
    /// Every key up to the list revision has been delivered.
    InSync,
}

/// What consumers receive.
#[derive(Debug, Clone, PartialEq)]
pub enum SyncerEvent {
    Update(Update),
    Status(SyncStatus),
}

impl SyncerEvent {
    /// A put (`Some`) or a delete (`None`) of `key` as the syncer delivers it, at revision
    /// 1: for tests and replays of the actors that consume it.
    pub fn update(key: &str, value: Option<SyncValue>) -> SyncerEvent {
        SyncerEvent::Update(Update {
            key: key.into(),
            update_type: if value.is_some() {
                UpdateType::New
            } else {
                UpdateType::Deleted
            },
            value: value.map(Arc::new),
            revision: 1,
        })
    }
}

fn json<T>(r: Result<T, serde_json::Error>) -> Result<T, String> {
    r.map_err(|e| e.to_string())
}

/// Decode a Calico key and value; `None` for keys we do not model.
pub fn decode(kv: &KeyValue) -> Option<Result<SyncValue, String>> {
    if let Some(rk) = parse_resource_key(&kv.key) {
        let info = kind_by_plural(&rk.plural)?;
        return Some(
            decode_any(info, kv)
                .map(SyncValue::Resource)
                .map_err(|e| e.to_string()),
        );
    }
    Some(match parse_ipam_key(&kv.key)? {
        // Checked as well as decoded: a corrupt block is reported by key and never reaches
        // Felix or confd (it would give them routes for addresses it does not hold).
        IpamKey::Block(cidr) => {
            AllocationBlock::decode(Some(&cidr), &kv.value).map(SyncValue::Block)
        }
        IpamKey::Affinity { host, cidr } => {
            json(BlockAffinity::from_bytes(&kv.value)).map(|affinity| SyncValue::Affinity {
                host,
                cidr,
                affinity,
            })
        }
        IpamKey::Handle(id) => {
            IPAMHandle::decode(&kv.value).map(|handle| SyncValue::Handle { id, handle })
        }
        IpamKey::Config => IPAMConfig::decode(&kv.value).map(SyncValue::IpamConfig),
    })
}

/// The syncer's Prometheus metrics.
#[derive(Clone)]
pub struct SyncerMetrics {
    events: IntCounterVec,
    resyncs: IntCounter,
    in_sync: IntGauge,
    errors: IntCounterVec,
    cached: IntGauge,
}

impl SyncerMetrics {
    /// Create and register the metrics.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = SyncerMetrics {
            events: IntCounterVec::new(
                Opts::new(
                    "calico_syncer_events_total",
                    "Datastore updates delivered by the syncer, by kind and type.",
                ),
                &["kind", "type"],
            )?,
            resyncs: IntCounter::new(
                "calico_syncer_resyncs_total",
                "Full lists of the datastore (start-up and after compaction).",
            )?,
            in_sync: IntGauge::new(
                "calico_syncer_in_sync",
                "1 when the syncer has delivered a complete snapshot, else 0.",
            )?,
            errors: IntCounterVec::new(
                Opts::new(
                    "calico_datastore_errors_total",
                    "Datastore errors seen by the syncer, by operation.",
                ),
                &["operation"],
            )?,
            cached: IntGauge::new(
                "calico_syncer_cached_keys",
                "Keys currently held in the syncer's cache.",
            )?,
        };
        registry.register(Box::new(m.events.clone()))?;
        registry.register(Box::new(m.resyncs.clone()))?;
        registry.register(Box::new(m.in_sync.clone()))?;
        registry.register(Box::new(m.errors.clone()))?;
        registry.register(Box::new(m.cached.clone()))?;
        Ok(m)
    }
}

/// Exponential backoff between retries: 100 ms doubling up to 5 s.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    fn new() -> Self {
        Backoff { next: Self::MIN }
    }
    fn reset(&mut self) {
        self.next = Self::MIN;
    }
    fn step(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        d
    }
}

/// Cache entry: the ModRevision identifies the value (a key rewritten gets a new one).
#[derive(Debug, Clone, Copy)]
struct Cached {
    mod_revision: i64,
}

/// The pure part of the syncer: cache + diff. Inputs are lists and watch events; outputs
/// the updates to deliver.
#[derive(Default)]
pub struct SyncerState {
    cache: HashMap<String, Cached>,
}

impl SyncerState {
    /// Keys held.
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// Replace the cache by a full list; returns only the real differences. Values are
    /// decoded on all cores (the list of a large cluster is tens of thousands of values).
    pub fn on_list(&mut self, kvs: Vec<KeyValue>, revision: i64) -> Vec<Update> {
        let decoded = decode_all(&kvs);
        self.on_decoded_list(kvs.into_iter().zip(decoded).collect(), revision)
    }

    /// `on_list` for values already decoded (the syncer decodes pages as they arrive).
    pub fn on_decoded_list(
        &mut self,
        list: Vec<(KeyValue, Option<SyncValue>)>,
        revision: i64,
    ) -> Vec<Update> {
        let mut out = Vec::new();
        let mut seen = HashMap::with_capacity(list.len());
        for (kv, value) in list {
            let Some(value) = value else { continue };
            let t = match self.cache.get(&kv.key) {
                Some(c) if c.mod_revision == kv.mod_revision => None,
                Some(_) => Some(UpdateType::Updated),
                None => Some(UpdateType::New),
            };
            seen.insert(
                kv.key.clone(),
                Cached {
                    mod_revision: kv.mod_revision,
                },
            );
            if let Some(t) = t {
                out.push(Update {
                    key: kv.key,
                    update_type: t,
                    value: Some(Arc::new(value)),
                    revision: kv.mod_revision,
                });
            }
        }
        let mut gone: Vec<&String> = self
            .cache
            .keys()
            .filter(|k| !seen.contains_key(*k))
            .collect();
        gone.sort();
        for key in gone {
            out.push(Update {
                key: key.clone(),
                update_type: UpdateType::Deleted,
                value: None,
                revision,
            });
        }
        self.cache = seen;
        out
    }

    /// Apply watch events; returns the updates (deduplicated against the cache, so an
    /// event replayed after a resume is not delivered twice).
    pub fn on_events(&mut self, events: &[WatchEvent]) -> Vec<Update> {
        let mut out = Vec::new();
        for e in events {
            match e {
                WatchEvent::Put { kv, .. } => {
                    let prev = self.cache.get(&kv.key).map(|c| c.mod_revision);
                    if prev.is_some_and(|r| r >= kv.mod_revision) {
                        continue;
                    }
                    match decode_logged(kv) {
                        Some(value) => {
                            self.cache.insert(
                                kv.key.clone(),
                                Cached {
                                    mod_revision: kv.mod_revision,
                                },
                            );
                            let t = if prev.is_some() {
                                UpdateType::Updated
                            } else {
                                UpdateType::New
                            };
                            out.push(update(kv, t, value));
                        }
                        // An undecodable value replaces a good one: consumers must forget it.
                        None if prev.is_some() => {
                            self.cache.remove(&kv.key);
                            out.push(Update {
                                key: kv.key.clone(),
                                update_type: UpdateType::Deleted,
                                value: None,
                                revision: kv.mod_revision,
                            });
                        }
                        None => {}
                    }
                }
                WatchEvent::Delete {
                    key, mod_revision, ..
                } => {
                    if self.cache.remove(key).is_some() {
                        out.push(Update {
                            key: key.clone(),
                            update_type: UpdateType::Deleted,
                            value: None,
                            revision: *mod_revision,
                        });
                    }
                }
            }
        }
        out
    }
}

/// Decode many values, split across the available cores.
fn decode_all(kvs: &[KeyValue]) -> Vec<Option<SyncValue>> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8);
    if threads == 1 || kvs.len() < 1024 {
        return kvs.iter().map(decode_logged).collect();
    }
    let chunk = kvs.len().div_ceil(threads);
    std::thread::scope(|s| {
        let parts: Vec<_> = kvs
            .chunks(chunk)
            .map(|c| s.spawn(move || c.iter().map(decode_logged).collect::<Vec<_>>()))
            .collect();
        parts
            .into_iter()
            .flat_map(|h| {
                h.join()
                    .expect("decoding never panics: serde returns errors")
            })
            .collect()
    })
}

fn decode_logged(kv: &KeyValue) -> Option<SyncValue> {
    match decode(kv)? {
        Ok(v) => {
            warn_if_invalid(kv, &v);
            Some(v)
        }
        Err(e) => {
            warn!(key = %kv.key, error = %e, "ignoring undecodable datastore value");
            None
        }
    }
}

/// Say what is wrong with a configuration resource another writer stored (e.g. a
/// `routeRefreshInterval` of `10000000000000000h`, past Go's limit): it is still passed
/// on, and its consumers use the default for what they cannot use, as Felix and confd do;
/// the log names the key and the field. Only the few configuration kinds are checked:
/// workload endpoints are many and written by our CNI plugin, which validates them.
fn warn_if_invalid(kv: &KeyValue, v: &SyncValue) {
    let SyncValue::Resource(r) = v else {
        return;
    };
    if !matches!(
        r,
        AnyResource::FelixConfiguration(_)
            | AnyResource::BGPConfiguration(_)
            | AnyResource::BGPPeer(_)
            | AnyResource::IPPool(_)
    ) {
        return;
    }
    if let Err(e) = r.validate() {
        warn!(key = %kv.key, error = %e, "stored resource is invalid; defaults are used for what cannot be");
    }
}

/// What kind of thing an update is about (deletes carry no value: the key says).
fn kind_of(u: &Update) -> &'static str {
    if let Some(v) = &u.value {
        return v.kind();
    }
    if let Some(k) = parse_resource_key(&u.key) {
        return kind_by_plural(&k.plural).map_or("Unknown", |i| i.kind);
    }
    match parse_ipam_key(&u.key) {
        Some(IpamKey::Block(_)) => "IPAMBlock",
        Some(IpamKey::Affinity { .. }) => "BlockAffinity",
        Some(IpamKey::Handle(_)) => "IPAMHandle",
        Some(IpamKey::Config) => "IPAMConfig",
        None => "Unknown",
    }
}

fn update(kv: &KeyValue, t: UpdateType, value: SyncValue) -> Update {
    Update {
        key: kv.key.clone(),
        update_type: t,
        value: Some(Arc::new(value)),
        revision: kv.mod_revision,
    }
}

/// The syncer actor.
pub struct Syncer {
    ds: Arc<dyn Datastore>,
    prefix: String,
    subscribers: Vec<mpsc::Sender<SyncerEvent>>,
    metrics: Option<SyncerMetrics>,
    health: Option<HealthReporter>,
    state: SyncerState,
}

/// Why the syncer stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum SyncerExit {
    /// The cancellation token fired.
    Cancelled,
    /// Every subscriber went away.
    NoSubscribers,
}

enum WatchEnd {
    Compacted,
    Broken,
    Stop(SyncerExit),
}

impl Syncer {
    /// A syncer over `prefix` (normally [`CALICO_PREFIX`]).
    pub fn new(ds: Arc<dyn Datastore>, prefix: &str) -> Self {
        Syncer {
            ds,
            prefix: prefix.into(),
            subscribers: Vec::new(),
            metrics: None,
            health: None,
            state: SyncerState::default(),
        }
    }

    /// Add a consumer; `capacity` bounds how far it may lag.
    pub fn subscribe(&mut self, capacity: usize) -> mpsc::Receiver<SyncerEvent> {
        let (tx, rx) = mpsc::channel(capacity);
        self.subscribers.push(tx);
        rx
    }

    /// Report metrics.
    pub fn with_metrics(mut self, m: SyncerMetrics) -> Self {
        self.metrics = Some(m);
        self
    }

    /// Report readiness (ready once in sync).
    pub fn with_health(mut self, h: HealthReporter) -> Self {
        self.health = Some(h);
        self
    }

    fn count_error(&self, op: &str) {
        if let Some(m) = &self.metrics {
            m.errors.with_label_values(&[op]).inc();
        }
    }

    /// Send to every subscriber, forgetting those that went away. False when none is left.
    async fn emit(&mut self, ev: SyncerEvent) -> bool {
        let n = self.subscribers.len();
        let mut ev = Some(ev);
        let mut gone = Vec::new();
        for i in 0..n {
            // The last subscriber gets the event itself, the others a clone.
            let this = if i + 1 == n { ev.take() } else { ev.clone() };
            let Some(this) = this else { break };
            if self.subscribers[i].send(this).await.is_err() {
                gone.push(i);
            }
        }
        for i in gone.into_iter().rev() {
            self.subscribers.remove(i);
        }
        !self.subscribers.is_empty()
    }

    async fn emit_all(&mut self, updates: Vec<Update>) -> bool {
        let mut counts: HashMap<(&'static str, &'static str), u64> = HashMap::new();
        for u in &updates {
            *counts
                .entry((kind_of(u), u.update_type.label()))
                .or_default() += 1;
        }
        for u in updates {
            if !self.emit(SyncerEvent::Update(u)).await {
                return false;
            }
        }
        if let Some(m) = &self.metrics {
            for ((kind, t), n) in counts {
                m.events.with_label_values(&[kind, t]).inc_by(n);
            }
        }
        if let Some(m) = &self.metrics {
            m.cached.set(self.state.len() as i64);
        }
        true
    }

    /// Run until cancelled or no subscriber is left.
    pub async fn run(mut self, cancel: CancellationToken) -> SyncerExit {
        let mut backoff = Backoff::new();
        let mut revision: Option<i64> = None;
        loop {
            let rev = match revision {
                Some(r) => r,
                None => {
                    if !self
                        .emit(SyncerEvent::Status(SyncStatus::ResyncInProgress))
                        .await
                    {
                        return SyncerExit::NoSubscribers;
                    }
                    if let Some(m) = &self.metrics {
                        m.in_sync.set(0);
                    }
                    let listed = tokio::select! {
                        _ = cancel.cancelled() => return SyncerExit::Cancelled,
                        l = list_and_decode(self.ds.as_ref(), &self.prefix) => l,
                    };
                    match listed {
                        Ok((decoded, rev)) => {
                            let keys = decoded.len();
                            // The diff over a large list is CPU work: keep it off the async workers.
                            let mut state = std::mem::take(&mut self.state);
                            let diffed = tokio::task::spawn_blocking(move || {
                                let u = state.on_decoded_list(decoded, rev);
                                (state, u)
                            })
                            .await;
                            let (state, updates) = match diffed {
                                Ok(r) => r,
                                // Only when the runtime is shutting down (the diff cannot panic).
                                Err(_) => return SyncerExit::Cancelled,
                            };
                            self.state = state;
                            info!(
                                keys,
                                changes = updates.len(),
                                revision = rev,
                                "datastore listed"
                            );
                            if !self.emit_all(updates).await
                                || !self.emit(SyncerEvent::Status(SyncStatus::InSync)).await
                            {
                                return SyncerExit::NoSubscribers;
                            }
                            if let Some(m) = &self.metrics {
                                m.resyncs.inc();
                                m.in_sync.set(1);
                            }
                            if let Some(h) = &self.health {
                                h.set_ready(true, None);
                            }
                            revision = Some(rev);
                            rev
                        }
                        Err(e) => {
                            self.count_error("list");
                            warn!(error = %e, "datastore list failed; retrying");
                            if let Some(h) = &self.health
                                && self.state.is_empty()
                            {
                                h.set_ready(false, Some(format!("cannot list the datastore: {e}")));
                            }
                            if sleep_or_cancel(&cancel, backoff.step()).await {
                                return SyncerExit::Cancelled;
                            }
                            continue;
                        }
                    }
                }
            };
            match self
                .watch_from(rev, &cancel, &mut revision, &mut backoff)
                .await
            {
                WatchEnd::Stop(exit) => return exit,
                WatchEnd::Compacted => {
                    info!(revision = rev, "watch revision compacted; re-listing");
                    revision = None;
                }
                WatchEnd::Broken => {
                    if sleep_or_cancel(&cancel, backoff.step()).await {
                        return SyncerExit::Cancelled;
                    }
                }
            }
        }
    }

    /// Watch from `rev + 1` until the watch ends; `revision` follows the events.
    async fn watch_from(
        &mut self,
        rev: i64,
        cancel: &CancellationToken,
        revision: &mut Option<i64>,
        backoff: &mut Backoff,
    ) -> WatchEnd {
        let started = tokio::select! {
            _ = cancel.cancelled() => return WatchEnd::Stop(SyncerExit::Cancelled),
            w = self.ds.watch(&self.prefix, rev + 1) => w,
        };
        let mut rx = match started {
            Ok(rx) => rx,
            Err(DatastoreError::Compacted { .. }) => return WatchEnd::Compacted,
            Err(e) => {
                self.count_error("watch");
                warn!(error = %e, "cannot start datastore watch; retrying with cache kept");
                return WatchEnd::Broken;
            }
        };
        debug!(from = rev + 1, "watching datastore");
        loop {
            let msg = tokio::select! {
                _ = cancel.cancelled() => return WatchEnd::Stop(SyncerExit::Cancelled),
                m = rx.recv() => m,
            };
            match msg {
                Some(Ok(batch)) => {
                    backoff.reset();
                    let updates = self.state.on_events(&batch.events);
                    let last = batch
                        .events
                        .iter()
                        .map(WatchEvent::revision)
                        .max()
                        .unwrap_or(0);
                    let new_rev = revision.unwrap_or(0).max(last).max(batch.revision);
                    *revision = Some(new_rev);
                    if !self.emit_all(updates).await {
                        return WatchEnd::Stop(SyncerExit::NoSubscribers);
                    }
                }
                Some(Err(DatastoreError::Compacted { .. })) => return WatchEnd::Compacted,
                Some(Err(e)) => {
                    self.count_error("watch");
                    warn!(error = %e, "datastore watch broken; resuming with cache kept");
                    return WatchEnd::Broken;
                }
                None => {
                    self.count_error("watch");
                    warn!("datastore watch closed; resuming with cache kept");
                    return WatchEnd::Broken;
                }
            }
        }
    }
}

/// List the datastore and decode each page (on blocking threads) while the next page is
/// being fetched.
async fn list_and_decode(
    ds: &dyn Datastore,
    prefix: &str,
) -> Result<(Vec<(KeyValue, Option<SyncValue>)>, i64), DatastoreError> {
    let (tx, mut rx) = mpsc::channel::<Vec<KeyValue>>(4);
    let decoder = async move {
        let mut out = Vec::new();
        while let Some(page) = rx.recv().await {
            let decoded = tokio::task::spawn_blocking(move || {
                let values = decode_all(&page);
                page.into_iter().zip(values).collect::<Vec<_>>()
            })
            .await
            .map_err(|e| DatastoreError::Other(format!("decoding stopped: {e}")))?;
            out.extend(decoded);
        }
        Ok::<_, DatastoreError>(out)
    };
    let (listed, decoded) = tokio::join!(ds.list_pages(prefix, tx), decoder);
    Ok((decoded?, listed?))
}

/// Sleep unless cancelled first; true when cancelled.
async fn sleep_or_cancel(cancel: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_syncer_decodes_tiers_and_sets() {
        let kv = |key: &str, value: &str| KeyValue {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            mod_revision: 5,
            create_revision: 5,
        };
        let p = "/calico/resources/v3/projectcalico.org";
        let cases = [
            (
                format!("{p}/tiers/default"),
                r#"{"kind":"Tier","apiVersion":"projectcalico.org/v3","metadata":{"name":"default"},"spec":{"order":1000000,"defaultAction":"Deny"}}"#,
                "Tier",
            ),
            (
                format!("{p}/networksets/ns1/s"),
                r#"{"kind":"NetworkSet","apiVersion":"projectcalico.org/v3","metadata":{"name":"s","namespace":"ns1"},"spec":{"nets":["10.0.0.0/8"]}}"#,
                "NetworkSet",
            ),
            (
                format!("{p}/globalnetworksets/g"),
                r#"{"kind":"GlobalNetworkSet","apiVersion":"projectcalico.org/v3","metadata":{"name":"g"},"spec":{"nets":["10.0.0.0/8"],"allowedEgressDomains":["x.com"]}}"#,
                "GlobalNetworkSet",
            ),
        ];
        for (key, value, kind) in cases {
            match decode(&kv(&key, value)) {
                Some(Ok(SyncValue::Resource(r))) => assert_eq!(r.kind(), kind),
                other => panic!("{key}: {other:?}"),
            }
        }
        assert!(matches!(
            crate::model::AnyResource::decode_slice("GlobalNetworkSet", cases_value()),
            Ok(crate::model::AnyResource::GlobalNetworkSet(_))
        ));
    }

    fn cases_value() -> &'static [u8] {
        br#"{"kind":"GlobalNetworkSet","apiVersion":"projectcalico.org/v3","metadata":{"name":"g"},"spec":{}}"#
    }

    fn pool_kv(name: &str, cidr: &str, rev: i64) -> KeyValue {
        let v = format!(
            r#"{{"kind":"IPPool","apiVersion":"projectcalico.org/v3","metadata":{{"name":"{name}"}},"spec":{{"cidr":"{cidr}"}}}}"#
        );
        KeyValue {
            key: format!("/calico/resources/v3/projectcalico.org/ippools/{name}"),
            value: v.into_bytes(),
            mod_revision: rev,
            create_revision: rev,
        }
    }

    fn summary(u: &[Update]) -> Vec<(String, UpdateType)> {
        u.iter()
            .map(|u| (u.key.rsplit('/').next().unwrap().to_string(), u.update_type))
            .collect()
    }

    #[test]
    fn relist_emits_only_differences() {
        let mut st = SyncerState::default();
        let first = st.on_list(
            vec![
                pool_kv("a", "10.1.0.0/16", 2),
                pool_kv("b", "10.2.0.0/16", 3),
            ],
            3,
        );
        assert_eq!(
            summary(&first),
            [("a".into(), UpdateType::New), ("b".into(), UpdateType::New)]
        );
        let second = st.on_list(
            vec![
                pool_kv("a", "10.1.0.0/16", 2),
                pool_kv("c", "10.3.0.0/16", 7),
            ],
            7,
        );
        assert_eq!(
            summary(&second),
            [
                ("c".into(), UpdateType::New),
                ("b".into(), UpdateType::Deleted)
            ]
        );
        let third = st.on_list(
            vec![
                pool_kv("a", "10.1.0.0/16", 9),
                pool_kv("c", "10.3.0.0/16", 7),
            ],
            9,
        );
        assert_eq!(summary(&third), [("a".into(), UpdateType::Updated)]);
        assert_eq!(st.len(), 2);
    }

    #[test]
    fn replayed_watch_events_are_not_delivered_twice() {
        let mut st = SyncerState::default();
        st.on_list(vec![pool_kv("a", "10.1.0.0/16", 2)], 2);
        let put = WatchEvent::Put {
            kv: pool_kv("a", "10.1.0.0/16", 2),
            prev: None,
        };
        assert!(st.on_events(&[put]).is_empty(), "same revision as cached");
        let newer = WatchEvent::Put {
            kv: pool_kv("a", "10.9.0.0/16", 5),
            prev: None,
        };
        assert_eq!(
            summary(&st.on_events(std::slice::from_ref(&newer))),
            [("a".into(), UpdateType::Updated)]
        );
        assert!(st.on_events(&[newer]).is_empty());
        let del = WatchEvent::Delete {
            key: pool_kv("a", "", 0).key,
            mod_revision: 6,
            prev: None,
        };
        assert_eq!(
            summary(&st.on_events(std::slice::from_ref(&del))),
            [("a".into(), UpdateType::Deleted)]
        );
        assert!(
            st.on_events(&[del]).is_empty(),
            "deleting an absent key says nothing"
        );
    }

    #[test]
    fn an_undecodable_value_replaces_a_good_one_as_a_delete() {
        let mut st = SyncerState::default();
        st.on_list(vec![pool_kv("a", "10.1.0.0/16", 2)], 2);
        let mut bad = pool_kv("a", "", 3);
        bad.value = b"{not json".to_vec();
        let out = st.on_events(&[WatchEvent::Put {
            kv: bad,
            prev: None,
        }]);
        assert_eq!(summary(&out), [("a".into(), UpdateType::Deleted)]);
        assert!(st.is_empty());
    }

    #[test]
    fn ipam_keys_decode_and_unknown_keys_are_ignored() {
        let kv = |key: &str, v: &str| KeyValue {
            key: key.into(),
            value: v.as_bytes().to_vec(),
            mod_revision: 1,
            create_revision: 1,
        };
        let aff = decode(&kv("/calico/ipam/v2/host/n1/ipv4/block/10.65.0.0-26", ""))
            .unwrap()
            .unwrap();
        assert_eq!(aff.kind(), "BlockAffinity");
        let h = decode(&kv(
            "/calico/ipam/v2/handle/k8s-pod-network.x",
            r#"{"block":{"10.65.0.0/26":1},"deleted":false}"#,
        ));
        assert_eq!(h.unwrap().unwrap().kind(), "IPAMHandle");
        assert!(decode(&kv("/calico/felix/v1/something", "x")).is_none());
        assert!(
            decode(&kv(
                "/calico/resources/v3/projectcalico.org/pods/default/x",
                "{}"
            ))
            .is_none()
        );
    }
}
