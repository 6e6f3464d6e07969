//! The typed Calico client over a [`Datastore`]: what libcalico-go's clientv3 does for a
//! caller. Every write fills defaults, validates (field rules, immutable fields, pool
//! overlap), stamps `uid` and `creationTimestamp` on create, and stores the JSON without
//! `resourceVersion`; every read sets `resourceVersion` from the key's ModRevision.

use std::any::Any;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use super::{Datastore, DatastoreError, KeyValue};
use crate::model::keys::{resource_key, resource_prefix};
use crate::model::{
    self, AnyResource, IPPool, IPPoolSpec, Kind, Resource, ValidationError, prepare_resource,
};

/// Typed client errors: what a user sees from calicoctl or a log.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClientError {
    /// The resource breaks a validation rule; nothing was written.
    #[error(transparent)]
    Validation(#[from] ValidationError),
    /// Create of something that exists.
    #[error("resource already exists: {0}")]
    AlreadyExists(String),
    /// Read, update or delete of something absent.
    #[error("resource does not exist: {0}")]
    NotFound(String),
    /// Someone else changed the resource since it was read.
    #[error(
        "update conflict: {0} has been modified; read it again and retry (resourceVersion {1} is stale)"
    )]
    Conflict(String, i64),
    /// Calico refuses the operation on this resource (`ErrorOperationNotSupported`), e.g.
    /// deleting a built-in tier.
    #[error("operation {operation} is not supported on {identifier}: {reason}")]
    OperationNotSupported {
        operation: String,
        identifier: String,
        reason: String,
    },
    /// A stored value does not decode as its kind.
    #[error("cannot decode stored {key}: {reason}")]
    Decode { key: String, reason: String },
    /// The datastore failed.
    #[error(transparent)]
    Datastore(DatastoreError),
}

/// Result of a client call.
pub type ClientResult<T> = Result<T, ClientError>;

/// How many times a read-modify-write retries on a revision conflict (Calico uses 100 for
/// IPAM; resource writes contend far less).
const APPLY_RETRIES: usize = 10;

fn describe<S: Kind>(namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) => format!("{}({ns}/{name})", S::KIND),
        None => format!("{}({name})", S::KIND),
    }
}

fn ns_for<S: Kind>(namespace: Option<&str>) -> Option<&str> {
    if S::NAMESPACED {
        Some(namespace.unwrap_or("default"))
    } else {
        None
    }
}

/// Decode a stored resource and set its `resourceVersion`. Decoding is lenient: fields
/// this version does not know (a newer Calico's) are kept in `unknown` and written back by
/// [`encode`]; anything else that does not decode is an error naming the key.
pub fn decode_kv<S: Kind>(kv: &KeyValue) -> ClientResult<Resource<S>> {
    let mut r = model::decode_stored::<S>(&kv.value).map_err(|e| ClientError::Decode {
        key: kv.key.clone(),
        reason: e.to_string(),
    })?;
    r.metadata.resource_version = Some(kv.mod_revision.to_string());
    Ok(r)
}

/// The stored JSON: the resource without `resourceVersion`, with the unknown fields it was
/// read with put back.
pub fn encode<S: Kind>(r: &Resource<S>) -> Vec<u8> {
    let mut stored = r.clone();
    stored.metadata.resource_version = None;
    model::stored::encode_with(&stored, &r.unknown)
}

/// Decode every value of a list, skipping (with an error naming the key) those that do not
/// decode: one value written by another writer must not hide every other one (Calico's
/// syncers skip such values the same way).
fn decode_listed<T>(kvs: &[KeyValue], decode: impl Fn(&KeyValue) -> ClientResult<T>) -> Vec<T> {
    kvs.iter()
        .filter_map(|kv| match decode(kv) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::error!(key = %kv.key, error = %e, "skipping a stored value that cannot be decoded");
                None
            }
        })
        .collect()
}

/// RFC 3339 UTC timestamp, as Kubernetes metadata uses (`2024-05-01T12:00:00Z`).
pub fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A random RFC 4122 version-4 UUID.
pub fn new_uid() -> String {
    let mut b = [0u8; 16];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_err()
    {
        // No /dev/urandom: fall back to time and pid, still unique per process and call.
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        b[..16].copy_from_slice(&(t ^ (u128::from(std::process::id()) << 64)).to_le_bytes());
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Typed Calico client. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    ds: Arc<dyn Datastore>,
}

impl Client {
    pub fn new(ds: Arc<dyn Datastore>) -> Self {
        Client { ds }
    }

    /// The underlying datastore (IPAM and the syncer work on raw keys).
    pub fn datastore(&self) -> &Arc<dyn Datastore> {
        &self.ds
    }

    fn map_ds<S: Kind>(&self, e: DatastoreError, ns: Option<&str>, name: &str) -> ClientError {
        match e {
            DatastoreError::AlreadyExists { .. } => {
                ClientError::AlreadyExists(describe::<S>(ns, name))
            }
            DatastoreError::NotFound { .. } => ClientError::NotFound(describe::<S>(ns, name)),
            DatastoreError::Conflict { expected, .. } => {
                ClientError::Conflict(describe::<S>(ns, name), expected)
            }
            other => ClientError::Datastore(other),
        }
    }

    /// Read one resource.
    pub async fn get<S: Kind>(
        &self,
        namespace: Option<&str>,
        name: &str,
    ) -> ClientResult<Option<Resource<S>>> {
        let key = resource_key(S::PLURAL, ns_for::<S>(namespace), name);
        match self.ds.get(&key).await.map_err(ClientError::Datastore)? {
            Some(kv) => Ok(Some(decode_kv(&kv)?)),
            None => Ok(None),
        }
    }

    /// List a kind (one namespace, or all when `namespace` is None), with the revision.
    pub async fn list<S: Kind>(
        &self,
        namespace: Option<&str>,
    ) -> ClientResult<(Vec<Resource<S>>, i64)> {
        let prefix = resource_prefix(S::PLURAL, if S::NAMESPACED { namespace } else { None });
        let (kvs, rev) = self
            .ds
            .list(&prefix)
            .await
            .map_err(ClientError::Datastore)?;
        Ok((decode_listed(&kvs, decode_kv), rev))
    }

    /// Checks that need the datastore: IPPool overlap and immutable fields.
    /// `batch` holds other resources being written together (calicoctl multi-doc files).
    pub async fn check_semantics<S: Kind>(
        &self,
        r: &Resource<S>,
        old: Option<&Resource<S>>,
        batch: &[AnyResource],
    ) -> ClientResult<()> {
        if let Some(old) = old {
            r.spec.validate_update(&old.spec)?;
        }
        if old.is_none() && TIERED_PLURALS.contains(&S::PLURAL) {
            self.check_tier_exists(r, batch).await?;
        }
        if let Some(pool) = (r as &dyn Any).downcast_ref::<IPPool>() {
            let (pools, _) = self.list::<IPPoolSpec>(None).await?;
            let others = pools
                .iter()
                .filter(|p| {
                    !batch
                        .iter()
                        .any(|b| b.kind() == "IPPool" && b.meta().name == p.metadata.name)
                })
                .map(|p| (p.metadata.name.clone(), p.spec.clone()))
                .chain(batch.iter().filter_map(|b| match b {
                    AnyResource::IPPool(p) => Some((p.metadata.name.clone(), p.spec.clone())),
                    _ => None,
                }));
            for (name, spec) in others {
                if name != pool.metadata.name && spec.overlaps(&pool.spec) {
                    return Err(ValidationError::new(
                        "spec.cidr",
                        &pool.spec.cidr,
                        format!("IPPool CIDR overlaps with IPPool {name} ({})", spec.cidr),
                    )
                    .into());
                }
            }
        }
        Ok(())
    }

    /// Create-only write. Returns the stored resource with its `resourceVersion`.
    pub async fn create<S: Kind>(&self, mut r: Resource<S>) -> ClientResult<Resource<S>> {
        prepare_resource(&mut r)?;
        self.check_semantics(&r, None, &[]).await?;
        self.create_prepared(r).await
    }

    async fn create_prepared<S: Kind>(&self, mut r: Resource<S>) -> ClientResult<Resource<S>> {
        r.metadata.uid.get_or_insert_with(new_uid);
        r.metadata
            .creation_timestamp
            .get_or_insert_with(now_rfc3339);
        self.store(r, None).await
    }

    /// Write a prepared resource: create-only when `revision` is None, else revision-checked.
    async fn store<S: Kind>(
        &self,
        mut r: Resource<S>,
        revision: Option<i64>,
    ) -> ClientResult<Resource<S>> {
        let (key, value) = (r.key(), encode(&r));
        let written = match revision {
            None => self.ds.create(&key, value).await,
            Some(rev) => self.ds.update(&key, value, rev).await,
        };
        let new_rev = written.map_err(|e| self.map_ds::<S>(e, r.namespace(), &r.metadata.name))?;
        r.metadata.resource_version = Some(new_rev.to_string());
        Ok(r)
    }

    /// Revision-checked update (`resourceVersion` if set, else the current revision).
    pub async fn update<S: Kind>(&self, mut r: Resource<S>) -> ClientResult<Resource<S>> {
        prepare_resource(&mut r)?;
        let old = self
            .get::<S>(r.namespace(), &r.metadata.name)
            .await?
            .ok_or_else(|| ClientError::NotFound(describe::<S>(r.namespace(), &r.metadata.name)))?;
        self.check_semantics(&r, Some(&old), &[]).await?;
        self.update_prepared(r, &old).await
    }

    async fn update_prepared<S: Kind>(
        &self,
        mut r: Resource<S>,
        old: &Resource<S>,
    ) -> ClientResult<Resource<S>> {
        let rev = match r.revision() {
            Some(rev) => rev,
            None => old.revision().unwrap_or(0),
        };
        if r.metadata.uid.is_none() {
            r.metadata.uid = old.metadata.uid.clone();
        }
        if r.metadata.creation_timestamp.is_none() {
            r.metadata.creation_timestamp = old.metadata.creation_timestamp.clone();
        }
        self.store(r, Some(rev)).await
    }

    /// Create or update. Without a `resourceVersion` the current one is used (retrying on
    /// a concurrent change); with one, the write is revision-checked.
    pub async fn apply<S: Kind>(&self, mut r: Resource<S>) -> ClientResult<Resource<S>> {
        prepare_resource(&mut r)?;
        let pinned = r.revision().is_some();
        for _ in 0..APPLY_RETRIES {
            let old = self.get::<S>(r.namespace(), &r.metadata.name).await?;
            self.check_semantics(&r, old.as_ref(), &[]).await?;
            let result = match &old {
                None => self.create_prepared(r.clone()).await,
                Some(old) => self.update_prepared(r.clone(), old).await,
            };
            match result {
                Err(ClientError::AlreadyExists(_)) | Err(ClientError::Conflict(..)) if !pinned => {
                    continue;
                }
                other => return other,
            }
        }
        Err(ClientError::Conflict(
            describe::<S>(r.namespace(), &r.metadata.name),
            r.revision().unwrap_or(0),
        ))
    }

    /// Delete, revision-checked when `revision` is given. Returns what was deleted.
    pub async fn delete<S: Kind>(
        &self,
        namespace: Option<&str>,
        name: &str,
        revision: Option<i64>,
    ) -> ClientResult<Resource<S>> {
        self.check_delete::<S>(name).await?;
        let ns = ns_for::<S>(namespace);
        let key = resource_key(S::PLURAL, ns, name);
        let kv = self
            .ds
            .delete(&key, revision)
            .await
            .map_err(|e| self.map_ds::<S>(e, ns, name))?;
        decode_kv(&kv)
    }
}

/// Plurals of the kinds whose `spec.tier` names a tier (Calico's tier delete checks each).
const TIERED_PLURALS: &[&str] = &[
    "networkpolicies",
    "globalnetworkpolicies",
    "stagednetworkpolicies",
    "stagedglobalnetworkpolicies",
];

impl Client {
    /// Calico's clientv3 creates a policy only in a tier that exists (`networkpolicy.go`
    /// and its siblings: the tier is read first). calicoctl creates the built-in tiers
    /// before every write (`EnsureInitialized`), so those always pass; a tier created
    /// earlier in the same file does too (calicoctl writes the documents in order).
    async fn check_tier_exists<S: Kind>(
        &self,
        r: &Resource<S>,
        batch: &[AnyResource],
    ) -> ClientResult<()> {
        let spec = serde_json::to_value(&r.spec).unwrap_or_default();
        let tier = spec["tier"].as_str().filter(|t| !t.is_empty());
        let tier = tier.unwrap_or(model::tier::DEFAULT_TIER);
        if model::tier::is_protected(tier)
            || batch
                .iter()
                .any(|b| matches!(b, AnyResource::Tier(t) if t.metadata.name == tier))
        {
            return Ok(());
        }
        match self.get::<model::tier::TierSpec>(None, tier).await? {
            Some(_) => Ok(()),
            None => Err(ClientError::NotFound(format!("Tier({tier})"))),
        }
    }

    /// What Calico's clientv3 refuses before a delete: a built-in tier
    /// (`names.TierIsProtected`), and a tier that policies still name.
    async fn check_delete<S: Kind>(&self, name: &str) -> ClientResult<()> {
        if S::KIND != model::tier::TierSpec::KIND {
            return Ok(());
        }
        if model::tier::is_protected(name) {
            return Err(ClientError::OperationNotSupported {
                operation: "Delete".into(),
                identifier: name.into(),
                reason: format!("Cannot delete {name} tier"),
            });
        }
        for plural in TIERED_PLURALS {
            let (kvs, _) = self
                .ds
                .list(&resource_prefix(plural, None))
                .await
                .map_err(ClientError::Datastore)?;
            // Read raw: the tier is all that matters here, whatever else the value holds.
            let in_tier = kvs.iter().any(|kv| {
                serde_json::from_slice::<serde_json::Value>(&kv.value)
                    .ok()
                    .and_then(|v| v["spec"]["tier"].as_str().map(str::to_string))
                    .is_some_and(|t| t == name)
            });
            if in_tier {
                return Err(ClientError::OperationNotSupported {
                    operation: "delete".into(),
                    identifier: name.into(),
                    reason: "Cannot delete a non-empty tier".into(),
                });
            }
        }
        Ok(())
    }
}

/// Which write calicoctl performs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOp {
    Create,
    Apply,
    Replace,
    Delete,
}

macro_rules! dispatch {
    ($res:expr, $r:ident => $body:expr) => {
        match $res {
            AnyResource::IPPool($r) => $body.map(AnyResource::IPPool),
            AnyResource::BGPConfiguration($r) => $body.map(AnyResource::BGPConfiguration),
            AnyResource::BGPPeer($r) => $body.map(AnyResource::BGPPeer),
            AnyResource::Node($r) => $body.map(AnyResource::Node),
            AnyResource::FelixConfiguration($r) => $body.map(AnyResource::FelixConfiguration),
            AnyResource::WorkloadEndpoint($r) => $body.map(AnyResource::WorkloadEndpoint),
            AnyResource::ClusterInformation($r) => $body.map(AnyResource::ClusterInformation),
            AnyResource::Tier($r) => $body.map(AnyResource::Tier),
            AnyResource::HostEndpoint($r) => $body.map(AnyResource::HostEndpoint),
            AnyResource::NetworkSet($r) => $body.map(AnyResource::NetworkSet),
            AnyResource::GlobalNetworkSet($r) => $body.map(AnyResource::GlobalNetworkSet),
            AnyResource::NetworkPolicy($r) => $body.map(AnyResource::NetworkPolicy),
            AnyResource::GlobalNetworkPolicy($r) => $body.map(AnyResource::GlobalNetworkPolicy),
            AnyResource::StagedNetworkPolicy($r) => $body.map(AnyResource::StagedNetworkPolicy),
            AnyResource::StagedGlobalNetworkPolicy($r) => {
                $body.map(AnyResource::StagedGlobalNetworkPolicy)
            }
            AnyResource::StagedKubernetesNetworkPolicy($r) => {
                $body.map(AnyResource::StagedKubernetesNetworkPolicy)
            }
            AnyResource::Profile($r) => $body.map(AnyResource::Profile),
        }
    };
}

impl Client {
    /// Check one resource of a batch before anything is written: defaults, validation,
    /// existence as the operation needs it, immutable fields and pool overlap.
    pub async fn check_any(
        &self,
        res: &mut AnyResource,
        op: WriteOp,
        batch: &[AnyResource],
    ) -> ClientResult<()> {
        if op != WriteOp::Delete {
            res.prepare()?;
        }
        let r: ClientResult<AnyResource> =
            dispatch!(res, r => self.check_typed(r, op, batch).await);
        r.map(|_| ())
    }

    async fn check_typed<S: Kind>(
        &self,
        r: &Resource<S>,
        op: WriteOp,
        batch: &[AnyResource],
    ) -> ClientResult<Resource<S>> {
        if op == WriteOp::Delete {
            // Calico refuses these before looking the resource up.
            self.check_delete::<S>(&r.metadata.name).await?;
        }
        let old = self.get::<S>(r.namespace(), &r.metadata.name).await?;
        let what = || describe::<S>(r.namespace(), &r.metadata.name);
        match (op, &old) {
            (WriteOp::Create, Some(_)) => return Err(ClientError::AlreadyExists(what())),
            (WriteOp::Replace | WriteOp::Delete, None) => {
                return Err(ClientError::NotFound(what()));
            }
            _ => {}
        }
        if op != WriteOp::Delete {
            self.check_semantics(r, old.as_ref(), batch).await?;
        }
        Ok(r.clone())
    }

    /// Perform a checked write of any kind.
    pub async fn write_any(&self, res: AnyResource, op: WriteOp) -> ClientResult<AnyResource> {
        match op {
            WriteOp::Create => dispatch!(res, r => self.create(r).await),
            WriteOp::Apply => dispatch!(res, r => self.apply(r).await),
            WriteOp::Replace => dispatch!(res, r => self.update(r).await),
            WriteOp::Delete => {
                let ns = res.namespace().map(str::to_string);
                let name = res.meta().name.clone();
                let rev = res
                    .meta()
                    .resource_version
                    .as_deref()
                    .and_then(|v| v.parse().ok());
                dispatch!(res, r => self.delete_like(&r, ns.as_deref(), &name, rev).await)
            }
        }
    }

    async fn delete_like<S: Kind>(
        &self,
        _type_witness: &Resource<S>,
        ns: Option<&str>,
        name: &str,
        rev: Option<i64>,
    ) -> ClientResult<Resource<S>> {
        self.delete::<S>(ns, name, rev).await
    }

    /// Read one resource of the kind named by `info`.
    pub async fn get_any(
        &self,
        info: &model::KindInfo,
        ns: Option<&str>,
        name: &str,
    ) -> ClientResult<Option<AnyResource>> {
        let key = resource_key(
            info.plural,
            if info.namespaced {
                Some(ns.unwrap_or("default"))
            } else {
                None
            },
            name,
        );
        match self.ds.get(&key).await.map_err(ClientError::Datastore)? {
            Some(kv) => decode_any(info, &kv).map(Some),
            None => Ok(None),
        }
    }

    /// List the kind named by `info` (all namespaces when `ns` is None).
    pub async fn list_any(
        &self,
        info: &model::KindInfo,
        ns: Option<&str>,
    ) -> ClientResult<(Vec<AnyResource>, i64)> {
        let prefix = resource_prefix(info.plural, if info.namespaced { ns } else { None });
        let (kvs, rev) = self
            .ds
            .list(&prefix)
            .await
            .map_err(ClientError::Datastore)?;
        Ok((decode_listed(&kvs, |kv| decode_any(info, kv)), rev))
    }
}

/// Decode a stored value of a known kind, with `resourceVersion` set.
pub fn decode_any(info: &model::KindInfo, kv: &KeyValue) -> ClientResult<AnyResource> {
    let mut r =
        AnyResource::decode_slice(info.kind, &kv.value).map_err(|e| ClientError::Decode {
            key: kv.key.clone(),
            reason: e.to_string(),
        })?;
    r.meta_mut().resource_version = Some(kv.mod_revision.to_string());
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::MemoryDatastore;

    fn client() -> Client {
        Client::new(Arc::new(MemoryDatastore::new()))
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

    #[tokio::test]
    async fn create_stamps_metadata_and_reads_back_revision() {
        let c = client();
        let p = c.create(pool("p1", "10.1.0.0/16")).await.unwrap();
        assert!(p.metadata.uid.as_ref().is_some_and(|u| u.len() == 36));
        assert!(
            p.metadata
                .creation_timestamp
                .as_ref()
                .is_some_and(|t| t.ends_with('Z'))
        );
        let got = c.get::<IPPoolSpec>(None, "p1").await.unwrap().unwrap();
        assert_eq!(got, p);
        let stored = c.datastore().get(&p.key()).await.unwrap().unwrap();
        assert!(
            !String::from_utf8(stored.value)
                .unwrap()
                .contains("resourceVersion")
        );
    }

    #[tokio::test]
    async fn overlapping_pool_is_refused_and_nothing_written() {
        let c = client();
        c.create(pool("p1", "10.1.0.0/16")).await.unwrap();
        let e = c.create(pool("p2", "10.1.128.0/17")).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "error with field spec.cidr = '10.1.128.0/17' (IPPool CIDR overlaps with IPPool p1 (10.1.0.0/16))"
        );
        assert!(c.get::<IPPoolSpec>(None, "p2").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn stale_revision_conflicts() {
        let c = client();
        let p = c.create(pool("p1", "10.1.0.0/16")).await.unwrap();
        let mut a = p.clone();
        a.spec.nat_outgoing = true;
        c.update(a).await.unwrap();
        let mut b = p.clone();
        b.spec.disabled = true;
        assert!(matches!(c.update(b).await, Err(ClientError::Conflict(..))));
    }

    #[test]
    fn timestamps_and_uids_have_the_right_shape() {
        let t = now_rfc3339();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.starts_with("20"));
        let u = new_uid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
    }
}
