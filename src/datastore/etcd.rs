//! The etcd v3 backend: Calico's transactions (REFERENCE §1, "Write semantics"), paged
//! lists at one revision, and watches with PrevKV that report compaction.
//!
//! Failover. With several endpoints, a read that fails for want of a working member (a
//! connection error, "no leader", a timeout) is sent to the next member, with a short
//! backoff once every member has failed, for up to [`FAILOVER_WINDOW`] (a leader election
//! takes a second or two); the member that answered is used from then on.
//! A compare-and-swap write is different: etcd answers "request timed out" or "leader
//! changed" (gRPC Unavailable) for a write that may still commit, and a connection can
//! break after the request left. Resending blindly could apply it twice (an address
//! assigned twice to one handle, a block created twice) or report a conflict for our own
//! write. So after such a failure the key is read back (and, when it changed, its history
//! from the expected revision on) to tell "ours committed" from "not committed" from
//! "someone else wrote first", and only "not committed" is resent. Any later conflict of a
//! write whose earlier try was uncertain is checked the same way.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions,
    Identity, KvClient, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchClient, WatchOptions,
};
use tokio::sync::mpsc;
use tonic::Code;

use super::{
    Datastore, DatastoreConfig, DatastoreError, DsResult, KeyValue, WATCH_CHANNEL_CAPACITY,
    WatchBatch, WatchEvent, WatchReceiver,
};

/// Largest gRPC message accepted (a page of a list, a watch batch).
const MAX_MESSAGE: usize = 64 << 20;
/// Keys per page of a list: bounded memory per response, few round trips.
const LIST_PAGE: i64 = 5000;
/// How long a request keeps failing over between members of a cluster (several election
/// timeouts: etcd's default is 1 s).
const FAILOVER_WINDOW: Duration = Duration::from_secs(10);
/// Pause after every member has failed once, doubled up to [`FAILOVER_BACKOFF_MAX`].
const FAILOVER_BACKOFF: Duration = Duration::from_millis(50);
const FAILOVER_BACKOFF_MAX: Duration = Duration::from_millis(800);
/// How long reading a key's history to resolve an uncertain write may take.
const HISTORY_TIMEOUT: Duration = Duration::from_secs(3);

/// A connection to one etcd member.
#[derive(Clone)]
struct Member {
    endpoint: String,
    client: Client,
    kv: KvClient,
    watch: WatchClient,
}

/// etcd v3 datastore. Cheap to clone: clones share the connections.
#[derive(Clone)]
pub struct EtcdDatastore {
    members: Arc<Vec<Member>>,
    /// The member that answered last.
    current: Arc<AtomicUsize>,
    list_page: i64,
    /// Where each watch's pump task runs (it ends when its receiver is dropped): the
    /// daemon's tracker ([`EtcdDatastore::with_tasks`]), so shutdown waits for them; a
    /// tracker of its own for the short-lived CLI and CNI processes.
    tasks: tokio_util::task::TaskTracker,
}

/// Whether a failure says nothing definite: no working member answered (connection errors,
/// "no leader", a timeout, a leader change, a connection broken mid-request). A read may
/// then be sent elsewhere; a write's outcome is unknown until the key is read back.
fn uncertain(e: &etcd_client::Error) -> bool {
    use etcd_client::Error as E;
    match e {
        E::TransportError(_) | E::IoError(_) => true,
        E::GRpcStatus(s) => matches!(
            s.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
        ),
        _ => false,
    }
}

/// Whether a failure happened before the request left: no connection to the member
/// could be made (tonic reports "tcp connect error"). Such a write is known not to have
/// committed; nothing needs reading back.
fn never_sent(e: &etcd_client::Error) -> bool {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(s) => {
            s.code() == Code::Unavailable
                && (s.message().contains("connect error")
                    || s.message().contains("error trying to connect"))
        }
        _ => false,
    }
}

/// What a compare-and-swap write means to do, to recognise it in the key's history.
#[derive(Clone, Copy)]
enum Intent<'a> {
    /// Create-only put of this value.
    Create(&'a [u8]),
    /// Put of this value over the key at this ModRevision.
    Update(&'a [u8], i64),
    /// Delete of the key (at this ModRevision, if given).
    Delete(Option<i64>),
}

/// What a write did, once known.
enum Written {
    /// Put at this revision.
    Put(i64),
    /// Deleted; the value it had.
    Deleted(KeyValue),
}

/// What reading back says about a write whose outcome was unknown.
enum Resolution {
    /// It took effect.
    Committed(Written),
    /// It did not (the key is as it expected): safe to send again.
    NotCommitted,
    /// Someone else changed the key first: the write can no longer succeed.
    Superseded(DatastoreError),
}

/// The first change of a key at or after some revision.
enum Change {
    Put { value: Vec<u8>, mod_revision: i64 },
    Delete { prev: Option<KeyValue> },
}

fn map_err(e: etcd_client::Error) -> DatastoreError {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(s) => match s.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => {
                DatastoreError::Unavailable(s.message().to_string())
            }
            // tonic's word for a connection that broke under a request in flight.
            Code::Unknown if s.message() == "transport error" => {
                DatastoreError::Unavailable(s.message().to_string())
            }
            _ => DatastoreError::Other(format!("{:?}: {}", s.code(), s.message())),
        },
        E::TransportError(t) => DatastoreError::Unavailable(t.to_string()),
        E::IoError(io) => DatastoreError::Unavailable(io.to_string()),
        other => DatastoreError::Other(other.to_string()),
    }
}

fn kv(k: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(k.key()).into_owned(),
        value: k.value().to_vec(),
        mod_revision: k.mod_revision(),
        create_revision: k.create_revision(),
    }
}

/// The revision of a put that reading back found committed.
fn put_of(w: Written) -> i64 {
    match w {
        Written::Put(rev) => rev,
        Written::Deleted(kv) => kv.mod_revision,
    }
}

/// The error a write conditional on revision `expected` would have had, found superseded
/// after its outcome was unknown: a conflict naming the key's revision now (`found`), or
/// not found when the key is gone: what the write itself would have returned had its
/// compare failed.
fn conditional_write_error(key: &str, expected: i64, found: Option<i64>) -> DatastoreError {
    match found {
        Some(found) => DatastoreError::Conflict {
            key: key.into(),
            expected,
            found,
        },
        None => DatastoreError::NotFound { key: key.into() },
    }
}

/// The first key after every key with this prefix (etcd's range end for a prefix).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Build etcd-client's options from our config (timeouts, keep-alive, TLS).
fn connect_options(cfg: &DatastoreConfig) -> DsResult<ConnectOptions> {
    let mut opts = ConnectOptions::new()
        .with_timeout(cfg.timeout)
        .with_connect_timeout(std::time::Duration::from_secs(3))
        .with_keep_alive(
            std::time::Duration::from_secs(10),
            std::time::Duration::from_secs(5),
        )
        .with_keep_alive_while_idle(true);
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| {
            DatastoreError::Other(format!("cannot read TLS file {}: {e}", p.display()))
        })
    };
    if cfg.ca_cert_file.is_some() || cfg.cert_file.is_some() {
        let mut tls = TlsOptions::new();
        if let Some(ca) = &cfg.ca_cert_file {
            tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        match (&cfg.cert_file, &cfg.key_file) {
            (Some(c), Some(k)) => tls = tls.identity(Identity::from_pem(read(c)?, read(k)?)),
            (None, None) => {}
            _ => {
                return Err(DatastoreError::Other(
                    "ETCD_CERT_FILE and ETCD_KEY_FILE must be given together".into(),
                ));
            }
        }
        opts = opts.with_tls(tls);
    }
    Ok(opts)
}

/// A transaction's result: its response when it ran, or what reading back found out.
enum CasOutcome {
    Ran(etcd_client::TxnResponse),
    Resolved(Written),
}

/// Which member to try next, and when to give up: every member once, then again after a
/// growing pause, for [`FAILOVER_WINDOW`]. With one endpoint, one try.
struct Failover<'a> {
    ds: &'a EtcdDatastore,
    first: usize,
    tried: usize,
    backoff: Duration,
    deadline: Instant,
}

impl<'a> Failover<'a> {
    fn new(ds: &'a EtcdDatastore) -> Self {
        Failover {
            ds,
            first: ds.current.load(Ordering::Relaxed) % ds.members.len(),
            tried: 0,
            backoff: FAILOVER_BACKOFF,
            deadline: Instant::now() + FAILOVER_WINDOW,
        }
    }

    /// The member to send to now.
    fn member(&self) -> (usize, Member) {
        let idx = (self.first + self.tried) % self.ds.members.len();
        (idx, self.ds.members[idx].clone())
    }

    /// This member answered: use it first from now on.
    fn answered(&self, idx: usize) {
        if idx != self.first {
            self.ds.current.store(idx, Ordering::Relaxed);
        }
    }

    /// Move to the next member (pausing after a full round); false when time is up.
    async fn next(&mut self) -> bool {
        let n = self.ds.members.len();
        if n == 1 || Instant::now() >= self.deadline {
            return false;
        }
        self.tried += 1;
        if self.tried.is_multiple_of(n) {
            tokio::time::sleep(self.backoff).await;
            self.backoff = (self.backoff * 2).min(FAILOVER_BACKOFF_MAX);
        }
        true
    }
}

impl EtcdDatastore {
    /// Connect to the configured endpoints (lazily: an unreachable member shows up on the
    /// first request sent to it).
    pub async fn connect(cfg: &DatastoreConfig) -> DsResult<Self> {
        let opts = connect_options(cfg)?;
        let mut members = Vec::with_capacity(cfg.endpoints.len());
        for endpoint in &cfg.endpoints {
            let client = Client::connect([endpoint], Some(opts.clone()))
                .await
                .map_err(map_err)?;
            members.push(Member {
                endpoint: endpoint.clone(),
                kv: client.kv_client().max_decoding_message_size(MAX_MESSAGE),
                watch: client.watch_client().max_decoding_message_size(MAX_MESSAGE),
                client,
            });
        }
        if members.is_empty() {
            return Err(DatastoreError::Other("no etcd endpoint configured".into()));
        }
        Ok(EtcdDatastore {
            members: Arc::new(members),
            current: Arc::new(AtomicUsize::new(0)),
            list_page: LIST_PAGE,
            tasks: tokio_util::task::TaskTracker::new(),
        })
    }

    /// Run the watches' tasks on `tasks` (the daemon's tracker, awaited at shutdown).
    pub fn with_tasks(mut self, tasks: tokio_util::task::TaskTracker) -> Self {
        self.tasks = tasks;
        self
    }

    /// Send a request to the current member; while the failure is [`uncertain`], to the
    /// next (a cluster only: one endpoint answers once, as before). Only for requests that
    /// are safe to repeat (reads, watches, unconditional puts); compare-and-swap writes go
    /// through [`EtcdDatastore::cas`].
    async fn call<T, F, Fut>(&self, f: F) -> DsResult<T>
    where
        F: Fn(Member) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut failover = Failover::new(self);
        loop {
            let (idx, member) = failover.member();
            let endpoint = member.endpoint.clone();
            match f(member).await {
                Ok(v) => {
                    failover.answered(idx);
                    return Ok(v);
                }
                Err(e) if uncertain(&e) && failover.next().await => {
                    tracing::debug!(%endpoint, error = %e, "etcd member did not answer; trying the next");
                }
                Err(e) => return Err(map_err(e)),
            }
        }
    }

    /// Send a compare-and-swap transaction so that it takes effect at most once (see the
    /// module documentation): after an uncertain failure the key is read back and the
    /// transaction is resent only if it did not commit; a compare that fails after an
    /// uncertain try is checked against the key's history (the earlier try may have been
    /// the one that committed). The response of a transaction that ran is returned as is.
    async fn cas(&self, key: &str, txn: Txn, intent: Intent<'_>) -> DsResult<CasOutcome> {
        let mut failover = Failover::new(self);
        let mut was_uncertain = false;
        loop {
            let (idx, member) = failover.member();
            let endpoint = member.endpoint.clone();
            let e = match member.kv.clone().txn(txn.clone()).await {
                Ok(resp) => {
                    failover.answered(idx);
                    if !resp.succeeded()
                        && was_uncertain
                        && let Ok(Resolution::Committed(w)) = self.resolve(key, intent).await
                    {
                        return Ok(CasOutcome::Resolved(w));
                    }
                    return Ok(CasOutcome::Ran(resp));
                }
                Err(e) if never_sent(&e) => {
                    if failover.next().await {
                        tracing::debug!(%endpoint, error = %e, "etcd member unreachable; trying the next");
                        continue;
                    }
                    return Err(map_err(e));
                }
                Err(e) if uncertain(&e) => e,
                Err(e) => return Err(map_err(e)),
            };
            was_uncertain = true;
            tracing::warn!(%endpoint, %key, error = %e, "etcd write outcome unknown; reading the key back before resending");
            match self.resolve(key, intent).await {
                Ok(Resolution::Committed(w)) => return Ok(CasOutcome::Resolved(w)),
                Ok(Resolution::Superseded(err)) => return Err(err),
                Ok(Resolution::NotCommitted) => {}
                Err(read) => {
                    tracing::debug!(%key, error = %read, "cannot read the key back yet");
                }
            }
            if !failover.next().await {
                return Err(DatastoreError::Unavailable(format!(
                    "write to {key}: outcome unknown and etcd did not answer ({})",
                    map_err(e)
                )));
            }
        }
    }

    /// Tell whether a write whose outcome was unknown took effect, from the key now and,
    /// when it changed, its first change after the state the write expected.
    async fn resolve(&self, key: &str, intent: Intent<'_>) -> DsResult<Resolution> {
        let now = self.get_full(key).await?;
        Ok(match intent {
            Intent::Create(value) => match now {
                None => Resolution::NotCommitted,
                Some((kv, version)) => {
                    let created = if version == 1 {
                        Some(kv.value.clone())
                    } else {
                        match self.first_change(key, kv.create_revision).await? {
                            Change::Put { value, .. } => Some(value),
                            Change::Delete { .. } => None,
                        }
                    };
                    if created.as_deref() == Some(value) {
                        Resolution::Committed(Written::Put(kv.create_revision))
                    } else {
                        Resolution::Superseded(DatastoreError::AlreadyExists { key: key.into() })
                    }
                }
            },
            Intent::Update(value, expected) => match now {
                Some((kv, _)) if kv.mod_revision == expected => Resolution::NotCommitted,
                now => match self.first_change(key, expected + 1).await? {
                    Change::Put {
                        value: v,
                        mod_revision,
                    } if v == value => Resolution::Committed(Written::Put(mod_revision)),
                    _ => Resolution::Superseded(conditional_write_error(
                        key,
                        expected,
                        now.map(|(kv, _)| kv.mod_revision),
                    )),
                },
            },
            Intent::Delete(Some(expected)) => match now {
                Some((kv, _)) if kv.mod_revision == expected => Resolution::NotCommitted,
                now => match self.first_change(key, expected + 1).await? {
                    Change::Delete { prev: Some(prev) } => {
                        Resolution::Committed(Written::Deleted(prev))
                    }
                    _ => Resolution::Superseded(conditional_write_error(
                        key,
                        expected,
                        now.map(|(kv, _)| kv.mod_revision),
                    )),
                },
            },
            Intent::Delete(None) => match now {
                Some(_) => Resolution::NotCommitted,
                None => Resolution::Superseded(DatastoreError::NotFound { key: key.into() }),
            },
        })
    }

    /// A key with its version (how many writes since its creation).
    async fn get_full(&self, key: &str) -> DsResult<Option<(KeyValue, i64)>> {
        let resp = self
            .call(|m| async move { m.kv.clone().get(key, None).await })
            .await?;
        Ok(resp.kvs().first().map(|k| (kv(k), k.version())))
    }

    /// The first change of `key` at or after `from_revision`, from a watch of its history
    /// (the caller knows there is one). History etcd has compacted leaves it unknown.
    async fn first_change(&self, key: &str, from_revision: i64) -> DsResult<Change> {
        let opts = WatchOptions::new()
            .with_start_revision(from_revision)
            .with_prev_key();
        let read = self.call(|m| {
            let opts = opts.clone();
            async move {
                let mut stream = m.watch.clone().watch(key, Some(opts)).await?;
                while let Some(resp) = stream.message().await? {
                    if resp.compact_revision() > 0 || resp.canceled() {
                        return Ok(None);
                    }
                    let Some(e) = resp.events().first() else {
                        continue;
                    };
                    return Ok(Some(match e.event_type() {
                        EventType::Put => Change::Put {
                            value: e.kv().map(|k| k.value().to_vec()).unwrap_or_default(),
                            mod_revision: e.kv().map_or(0, |k| k.mod_revision()),
                        },
                        EventType::Delete => Change::Delete {
                            prev: e.prev_kv().map(kv),
                        },
                    }));
                }
                Ok(None)
            }
        });
        match tokio::time::timeout(HISTORY_TIMEOUT, read).await {
            Ok(Ok(Some(change))) => Ok(change),
            Ok(Ok(None)) => Err(DatastoreError::Unavailable(format!(
                "the history of {key} from revision {from_revision} is compacted"
            ))),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(DatastoreError::Unavailable(format!(
                "reading the history of {key} timed out"
            ))),
        }
    }

    /// Keys per page of a list (tests use small pages to exercise paging).
    pub fn with_list_page(mut self, keys: i64) -> Self {
        self.list_page = keys.max(1);
        self
    }

    /// Compact history up to `revision` (tests and maintenance).
    pub async fn compact(&self, revision: i64) -> DsResult<()> {
        self.call(|m| async move { m.client.clone().compact(revision, None).await })
            .await
            .map(|_| ())
    }

    /// The ModRevision found by the `or_else` Get of a failed transaction.
    fn found_revision(resp: &etcd_client::TxnResponse) -> Option<i64> {
        resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().map(|k| k.mod_revision()),
            _ => None,
        })
    }

    /// One page of a range read: the keys, the snapshot revision, and where the next page
    /// starts (None when this was the last). `revision` 0 reads the current snapshot; later
    /// pages pass the first page's revision so every page reads the same snapshot.
    async fn page(
        &self,
        start: Vec<u8>,
        end: &[u8],
        revision: i64,
    ) -> DsResult<(Vec<KeyValue>, i64, Option<Vec<u8>>)> {
        let mut opts = GetOptions::new()
            .with_range(end.to_vec())
            .with_limit(self.list_page);
        if revision > 0 {
            // A revision the first (linearizable) page proved committed: this member can
            // serve it locally, without another consensus round trip.
            opts = opts.with_revision(revision).with_serializable();
        }
        let resp = self
            .call(|m| {
                let (start, opts) = (start.clone(), opts.clone());
                async move { m.kv.clone().get(start, Some(opts)).await }
            })
            .await?;
        let revision = if revision > 0 {
            revision
        } else {
            resp.header().map_or(0, |h| h.revision())
        };
        let next = match resp.kvs().last() {
            Some(last) if resp.more() => {
                let mut n = last.key().to_vec();
                n.push(0);
                Some(n)
            }
            _ => None,
        };
        Ok((resp.kvs().iter().map(kv).collect(), revision, next))
    }

    fn put_revision(resp: &etcd_client::TxnResponse) -> i64 {
        resp.header().map_or(0, |h| h.revision())
    }
}

#[async_trait]
impl Datastore for EtcdDatastore {
    async fn get(&self, key: &str) -> DsResult<Option<KeyValue>> {
        let resp = self
            .call(|m| async move { m.kv.clone().get(key, None).await })
            .await?;
        Ok(resp.kvs().first().map(kv))
    }

    async fn list(&self, prefix: &str) -> DsResult<(Vec<KeyValue>, i64)> {
        let end = prefix_end(prefix);
        let (mut out, revision, mut next) = self.page(prefix.as_bytes().to_vec(), &end, 0).await?;
        while let Some(start) = next {
            let (kvs, _, n) = self.page(start, &end, revision).await?;
            out.extend(kvs);
            next = n;
        }
        Ok((out, revision))
    }

    async fn list_pages(&self, prefix: &str, pages: mpsc::Sender<Vec<KeyValue>>) -> DsResult<i64> {
        let gone = || DatastoreError::Other("list consumer went away".into());
        let end = prefix_end(prefix);
        let (kvs, revision, mut next) = self.page(prefix.as_bytes().to_vec(), &end, 0).await?;
        pages.send(kvs).await.map_err(|_| gone())?;
        while let Some(start) = next {
            let (kvs, _, n) = self.page(start, &end, revision).await?;
            pages.send(kvs).await.map_err(|_| gone())?;
            next = n;
        }
        Ok(revision)
    }

    async fn create(&self, key: &str, value: Vec<u8>) -> DsResult<i64> {
        let txn = Txn::new()
            .when(vec![Compare::version(key, CompareOp::Equal, 0)])
            .and_then(vec![TxnOp::put(key, value.clone(), None)])
            .or_else(vec![TxnOp::get(key, None)]);
        let resp = match self.cas(key, txn, Intent::Create(&value)).await? {
            CasOutcome::Ran(resp) => resp,
            CasOutcome::Resolved(w) => return Ok(put_of(w)),
        };
        if resp.succeeded() {
            Ok(Self::put_revision(&resp))
        } else {
            Err(DatastoreError::AlreadyExists { key: key.into() })
        }
    }

    async fn update(&self, key: &str, value: Vec<u8>, revision: i64) -> DsResult<i64> {
        let txn = Txn::new()
            .when(vec![Compare::mod_revision(key, CompareOp::Equal, revision)])
            .and_then(vec![TxnOp::put(key, value.clone(), None)])
            .or_else(vec![TxnOp::get(key, None)]);
        let resp = match self.cas(key, txn, Intent::Update(&value, revision)).await? {
            CasOutcome::Ran(resp) => resp,
            CasOutcome::Resolved(w) => return Ok(put_of(w)),
        };
        if resp.succeeded() {
            return Ok(Self::put_revision(&resp));
        }
        match Self::found_revision(&resp) {
            Some(found) => Err(DatastoreError::Conflict {
                key: key.into(),
                expected: revision,
                found,
            }),
            None => Err(DatastoreError::NotFound { key: key.into() }),
        }
    }

    async fn apply(&self, key: &str, value: Vec<u8>) -> DsResult<i64> {
        let resp = self
            .call(|m| {
                let value = value.clone();
                async move { m.kv.clone().put(key, value, None).await }
            })
            .await?;
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    async fn delete(&self, key: &str, revision: Option<i64>) -> DsResult<KeyValue> {
        let del = TxnOp::delete(key, Some(DeleteOptions::new().with_prev_key()));
        let txn = match revision {
            Some(rev) => Txn::new()
                .when(vec![Compare::mod_revision(key, CompareOp::Equal, rev)])
                .and_then(vec![del])
                .or_else(vec![TxnOp::get(key, None)]),
            None => Txn::new().and_then(vec![del]),
        };
        let resp = match self.cas(key, txn, Intent::Delete(revision)).await? {
            CasOutcome::Ran(resp) => resp,
            CasOutcome::Resolved(Written::Deleted(prev)) => return Ok(prev),
            CasOutcome::Resolved(Written::Put(_)) => {
                return Err(DatastoreError::Other(format!(
                    "delete of {key} resolved as a put"
                )));
            }
        };
        if !resp.succeeded() {
            return match Self::found_revision(&resp) {
                Some(found) => Err(DatastoreError::Conflict {
                    key: key.into(),
                    expected: revision.unwrap_or(0),
                    found,
                }),
                None => Err(DatastoreError::NotFound { key: key.into() }),
            };
        }
        let prev = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Delete(d) => d.prev_kvs().first().map(kv),
            _ => None,
        });
        prev.ok_or_else(|| DatastoreError::NotFound { key: key.into() })
    }

    async fn watch(&self, prefix: &str, from_revision: i64) -> DsResult<WatchReceiver> {
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from_revision)
            .with_prev_key()
            .with_progress_notify();
        let mut stream = self
            .call(|m| {
                let opts = opts.clone();
                async move { m.watch.clone().watch(prefix, Some(opts)).await }
            })
            .await?;
        let (tx, rx) = mpsc::channel(WATCH_CHANNEL_CAPACITY);
        self.tasks.spawn(async move {
            loop {
                let msg = tokio::select! {
                    _ = tx.closed() => return,
                    m = stream.message() => m,
                };
                let out = match msg {
                    Ok(Some(resp)) if resp.compact_revision() > 0 => {
                        Err(DatastoreError::Compacted {
                            requested: from_revision,
                            compact_revision: resp.compact_revision(),
                        })
                    }
                    Ok(Some(resp)) if resp.canceled() => Err(DatastoreError::Unavailable(format!(
                        "watch cancelled by etcd: {}",
                        resp.cancel_reason()
                    ))),
                    // The creation response carries the *current* revision while older
                    // events may still be on their way: it says nothing about progress.
                    Ok(Some(resp)) if resp.created() && resp.events().is_empty() => continue,
                    Ok(Some(resp)) => {
                        let events: Vec<WatchEvent> = resp
                            .events()
                            .iter()
                            .filter_map(|e| {
                                let k = e.kv()?;
                                let prev = e.prev_kv().map(kv);
                                Some(match e.event_type() {
                                    EventType::Put => WatchEvent::Put { kv: kv(k), prev },
                                    EventType::Delete => WatchEvent::Delete {
                                        key: String::from_utf8_lossy(k.key()).into_owned(),
                                        mod_revision: k.mod_revision(),
                                        prev,
                                    },
                                })
                            })
                            .collect();
                        // With events, progress is the last event's revision (a catching-up
                        // watcher's header is ahead of what it has delivered); without, this is a
                        // progress notification and the header revision is a safe bound.
                        let revision = match events.last() {
                            Some(e) => e.revision(),
                            None => resp.header().map_or(0, |h| h.revision()),
                        };
                        Ok(WatchBatch { events, revision })
                    }
                    Ok(None) => Err(DatastoreError::Unavailable("watch stream closed".into())),
                    Err(e) => Err(map_err(e)),
                };
                let fatal = out.is_err();
                if tx.send(out).await.is_err() || fatal {
                    return;
                }
            }
        });
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_failed_connect_is_known_not_to_have_written() {
        use etcd_client::Error::GRpcStatus;
        use tonic::Status;
        let refused = GRpcStatus(Status::unavailable("tcp connect error"));
        assert!(never_sent(&refused) && uncertain(&refused));
        // etcd's answers for writes that may still commit, and a connection broken under
        // a request: uncertain, to be read back.
        for e in [
            GRpcStatus(Status::unavailable("etcdserver: request timed out")),
            GRpcStatus(Status::unavailable("etcdserver: leader changed")),
            GRpcStatus(Status::unknown("transport error")),
            GRpcStatus(Status::deadline_exceeded("Timeout expired")),
        ] {
            assert!(uncertain(&e) && !never_sent(&e), "{e}");
        }
        // A definite refusal is passed on as it is.
        let refused = GRpcStatus(Status::invalid_argument("etcdserver: key is not provided"));
        assert!(!uncertain(&refused));
    }

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(prefix_end("/calico/"), b"/calico0".to_vec());
        assert_eq!(prefix_end("ab"), b"ac".to_vec());
    }
}
