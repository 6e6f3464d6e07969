//! The etcd v3 backend: Calico's transactions (REFERENCE §1, "Write semantics"), paged
//! lists at one revision, and watches with PrevKV that report compaction. With several
//! endpoints, a request that cannot reach one member is sent to the next (the request never
//! reached etcd, so even a write is safe to resend), and the member that answered is used
//! from then on.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

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
}

/// Whether the request failed before reaching a working member, so another may be tried.
fn unreachable(e: &etcd_client::Error) -> bool {
    use etcd_client::Error as E;
    match e {
        E::TransportError(_) | E::IoError(_) => true,
        E::GRpcStatus(s) => s.code() == Code::Unavailable,
        _ => false,
    }
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
        })
    }

    /// Send a request to the current member, then to each other member while the failure
    /// is "could not reach it".
    async fn call<T, F, Fut>(&self, f: F) -> DsResult<T>
    where
        F: Fn(Member) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let n = self.members.len();
        let first = self.current.load(Ordering::Relaxed) % n;
        let mut tried = 0;
        loop {
            let idx = (first + tried) % n;
            let member = self.members[idx].clone();
            let endpoint = member.endpoint.clone();
            match f(member).await {
                Ok(v) => {
                    if idx != first {
                        self.current.store(idx, Ordering::Relaxed);
                    }
                    return Ok(v);
                }
                Err(e) if tried + 1 < n && unreachable(&e) => {
                    tracing::debug!(%endpoint, error = %e, "etcd member unreachable; trying the next");
                    tried += 1;
                }
                Err(e) => return Err(map_err(e)),
            }
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

    async fn txn(&self, txn: Txn) -> DsResult<etcd_client::TxnResponse> {
        self.call(|m| {
            let txn = txn.clone();
            async move { m.kv.clone().txn(txn).await }
        })
        .await
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
            .and_then(vec![TxnOp::put(key, value, None)])
            .or_else(vec![TxnOp::get(key, None)]);
        let resp = self.txn(txn).await?;
        if resp.succeeded() {
            Ok(Self::put_revision(&resp))
        } else {
            Err(DatastoreError::AlreadyExists { key: key.into() })
        }
    }

    async fn update(&self, key: &str, value: Vec<u8>, revision: i64) -> DsResult<i64> {
        let txn = Txn::new()
            .when(vec![Compare::mod_revision(key, CompareOp::Equal, revision)])
            .and_then(vec![TxnOp::put(key, value, None)])
            .or_else(vec![TxnOp::get(key, None)]);
        let resp = self.txn(txn).await?;
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
        let resp = self.txn(txn).await?;
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
        tokio::spawn(async move {
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
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(prefix_end("/calico/"), b"/calico0".to_vec());
        assert_eq!(prefix_end("ab"), b"ac".to_vec());
    }
}
