//! Calico's block IPAM over the datastore's compare-and-swap operations (REFERENCE §3).
//!
//! Every write is revision-checked and retried on conflict, so any number of hosts (and
//! CNI calls on one host) can allocate at once without handing an address out twice:
//! - assign and claim (`allocator/assign.rs`): from blocks affine to the host, then by
//!   claiming a new block (affinity `pending` -> block create-only -> affinity
//!   `confirmed`; the loser of a race backs out), then, unless strict affinity, by
//!   borrowing from any block of a usable pool;
//! - handles (`allocator/handles.rs`, `/calico/ipam/v2/handle/<id>`): each counts its
//!   addresses per block;
//! - release (`allocator/release.rs`) frees addresses to the tail of the block's free
//!   list, deletes a block left empty without affinity, and decrements (and at zero
//!   deletes) the handle;
//! - a node's tunnel addresses (`allocator/tunnel.rs`) are assignments under Calico's
//!   handles.
//!
//! This file holds what they share: the [`Ipam`] handle, its errors, the pools a host
//! may use and the reads of blocks and affinities.
//!
//! Ordering on a crash: the block is written before the handle, so a crash in between
//! leaves an allocation whose handle count is short; the allocation still names its handle
//! in the block, which is what the leak checker reads.

mod assign;
mod handles;
mod release;
mod tunnel;

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::datastore::{Client, ClientError, Datastore, DatastoreError, KeyValue};
use crate::model::ipam::ordinal_in;
use crate::model::ipam::{AffinityState, AllocationBlock, BlockAffinity, IPAMConfig, IPAMHandle};
use crate::model::keys::{self, IPAM_CONFIG_KEY, IpamKey};
use crate::model::selector::Selector;
use crate::model::{IPPool, IPPoolSpec, NodeSpec};

use assign::HostLocks;
pub use assign::{AssignArgs, CrossProcessLock, Prefetched};
pub use tunnel::TunnelKind;

/// How often a compare-and-swap write is retried on conflict (Calico: 100).
pub const CAS_RETRIES: usize = 100;

/// `maxBlocksPerHost` when the configuration says 0 (REFERENCE §1).
pub const DEFAULT_MAX_BLOCKS_PER_HOST: u32 = 20;

/// What an address is for (IPPool `allowedUses`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpUse {
    Workload,
    Tunnel,
}

impl IpUse {
    fn name(self) -> &'static str {
        match self {
            IpUse::Workload => "Workload",
            IpUse::Tunnel => "Tunnel",
        }
    }
}

/// IPAM failures, each naming what a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    /// No pool may be used by this host for this purpose.
    #[error("no enabled IPv{family} pool allows {use_name} addresses on node {host}{requested}")]
    NoPools {
        family: u8,
        use_name: &'static str,
        host: String,
        requested: String,
    },
    /// A requested pool does not exist or cannot be used.
    #[error("IP pool {0} does not exist, is disabled, or does not select this node")]
    PoolNotUsable(IpNet),
    /// Every usable block is full and no new block may be claimed.
    #[error("no free IPv{family} address for node {host}: {reason}")]
    Exhausted {
        family: u8,
        host: String,
        reason: String,
    },
    /// The address is not inside any (for a requested address: any enabled) pool.
    #[error("{0} is not inside any IP pool")]
    NotInPool(IpAddr),
    /// The address's pool does not allow this use (`allowedUses`).
    #[error("{ip} is in IP pool {pool}, which does not allow {use_name} addresses")]
    UseNotAllowed {
        ip: IpAddr,
        pool: String,
        use_name: &'static str,
    },
    /// The address is already allocated.
    #[error("{0} is already in use")]
    InUse(IpAddr),
    /// The host-wide IPAM lock stayed held by another process for the whole wait.
    #[error(
        "the host-wide IPAM lock {path} is held by another process; gave up after {waited_ms} ms"
    )]
    HostLockBusy { path: String, waited_ms: u64 },
    /// Writes kept conflicting (extreme contention).
    #[error("gave up on {key} after {CAS_RETRIES} conflicting writes")]
    TooManyConflicts { key: String },
    /// A stored IPAM record does not decode.
    #[error("cannot decode {key}: {reason}")]
    Corrupt { key: String, reason: String },
    /// The datastore failed.
    #[error(transparent)]
    Datastore(#[from] DatastoreError),
    /// Reading pools or nodes failed.
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// Result of an IPAM call.
pub type IpamResult<T> = Result<T, IpamError>;

/// Calico block IPAM.
#[derive(Clone)]
pub struct Ipam {
    ds: Arc<dyn Datastore>,
    client: Client,
    clock: fn() -> u64,
    host_locks: HostLocks,
    cross_process: Option<CrossProcessLock>,
}

fn corrupt(kv: &KeyValue, e: impl std::fmt::Display) -> IpamError {
    IpamError::Corrupt {
        key: kv.key.clone(),
        reason: e.to_string(),
    }
}

/// Decode and check a stored block (its key names its CIDR): a corrupt block is an error
/// naming the key and the reason, never used.
fn decode_block(kv: &KeyValue) -> IpamResult<AllocationBlock> {
    let cidr = match keys::parse_ipam_key(&kv.key) {
        Some(IpamKey::Block(c)) => Some(c),
        _ => None,
    };
    AllocationBlock::decode(cidr.as_ref(), &kv.value).map_err(|e| corrupt(kv, e))
}

/// Decode a stored handle.
fn decode_handle(kv: &KeyValue) -> IpamResult<IPAMHandle> {
    IPAMHandle::decode(&kv.value).map_err(|e| corrupt(kv, e))
}

/// The pools that pass Calico's validation; the others (written by hand with etcdctl, or
/// corrupt) are reported by key and never used: a pool's CIDR and block size decide the
/// blocks carved from it, and out-of-range values would carve nonsense (or overflow).
fn checked_pools(pools: Vec<IPPool>) -> Vec<IPPool> {
    pools
        .into_iter()
        .filter(
            |p| match crate::model::Kind::validate(&p.spec, &p.metadata) {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!(key = %p.key(), error = %e, "IPPool is invalid; not using it");
                    false
                }
            },
        )
        .collect()
}

/// Log a corrupt block that an assignment passes over (the other blocks still serve).
fn skip_corrupt(e: &IpamError) -> bool {
    if let IpamError::Corrupt { key, reason } = e {
        tracing::error!(%key, %reason, "IPAM block is corrupt; not using it");
        return true;
    }
    false
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Ipam {
    pub fn new(ds: Arc<dyn Datastore>) -> Self {
        Ipam {
            client: Client::new(ds.clone()),
            ds,
            clock: now_ns,
            host_locks: HostLocks::default(),
            cross_process: None,
        }
    }

    /// Also hold `lock` (a host-wide lock across processes) while claiming.
    pub fn with_cross_process_lock(mut self, lock: CrossProcessLock) -> Self {
        self.cross_process = Some(lock);
        self
    }

    /// Use a fixed clock for new blocks' sequence numbers (golden tests).
    pub fn with_clock(mut self, clock: fn() -> u64) -> Self {
        self.clock = clock;
        self
    }

    /// The IPAM configuration (defaults when absent).
    pub async fn config(&self) -> IpamResult<IPAMConfig> {
        match self.ds.get(IPAM_CONFIG_KEY).await? {
            Some(kv) => IPAMConfig::decode(&kv.value).map_err(|e| corrupt(&kv, e)),
            None => Ok(IPAMConfig::default()),
        }
    }

    /// Replace the IPAM configuration.
    pub async fn set_config(&self, cfg: &IPAMConfig) -> IpamResult<()> {
        let v = cfg.to_bytes();
        self.ds.apply(IPAM_CONFIG_KEY, v).await?;
        Ok(())
    }

    /// Pools this host may use for `use_` in one family, restricted to `requested` if given.
    pub async fn usable_pools(
        &self,
        host: &str,
        v6: bool,
        requested: &[IpNet],
        use_: IpUse,
    ) -> IpamResult<Vec<IPPool>> {
        let (pools, node) = tokio::join!(
            self.client.list::<IPPoolSpec>(None),
            self.client.get::<NodeSpec>(None, host)
        );
        let pools = checked_pools(pools?.0);
        let labels = match node? {
            Some(n) => n.metadata.labels,
            None => BTreeMap::new(),
        };
        let usable = |p: &IPPool| {
            let Some(net) = p.spec.net() else {
                return false;
            };
            let uses = p
                .spec
                .allowed_uses
                .clone()
                .unwrap_or_else(|| vec!["Workload".into(), "Tunnel".into()]);
            !p.spec.disabled
                && matches!(net, IpNet::V6(_)) == v6
                && uses.iter().any(|u| u == use_.name())
                && Selector::parse(p.spec.node_selector_or_default())
                    .is_ok_and(|s| s.matches(&labels))
                && p.spec.assignment_mode.as_deref() != Some("Manual")
        };
        let chosen: Vec<IPPool> = pools.into_iter().filter(usable).collect();
        if requested.is_empty() {
            return Ok(chosen);
        }
        let mut out = Vec::new();
        for r in requested {
            match chosen.iter().find(|p| p.spec.net() == Some(*r)) {
                Some(p) => out.push(p.clone()),
                None => return Err(IpamError::PoolNotUsable(*r)),
            }
        }
        Ok(out)
    }

    /// CIDRs of the confirmed affinities of `host`.
    pub async fn affine_blocks(&self, host: &str, v6: bool) -> IpamResult<Vec<IpNet>> {
        let fam = if v6 { "ipv6" } else { "ipv4" };
        let prefix = format!("{}host/{host}/{fam}/block/", keys::IPAM_PREFIX);
        let (kvs, _) = self.ds.list(&prefix).await?;
        let mut out = Vec::new();
        for kv in &kvs {
            let Some(IpamKey::Affinity { cidr, .. }) = keys::parse_ipam_key(&kv.key) else {
                continue;
            };
            let aff = BlockAffinity::from_bytes(&kv.value).map_err(|e| corrupt(kv, e))?;
            if aff.state == AffinityState::Confirmed && !aff.deleted {
                out.push(cidr);
            }
        }
        Ok(out)
    }

    /// Every block of one family, decoded.
    pub async fn blocks(&self, v6: bool) -> IpamResult<Vec<(IpNet, AllocationBlock)>> {
        let mut out = Vec::new();
        for kv in self.block_kvs(v6).await? {
            let Some(IpamKey::Block(cidr)) = keys::parse_ipam_key(&kv.key) else {
                continue;
            };
            match decode_block(&kv) {
                Ok(b) => out.push((cidr, b)),
                // Reported and left out: one corrupt block must not stop every release.
                Err(e) => {
                    skip_corrupt(&e);
                }
            }
        }
        Ok(out)
    }

    /// Every block of one family, as stored.
    async fn block_kvs(&self, v6: bool) -> IpamResult<Vec<KeyValue>> {
        let fam = if v6 { "ipv6" } else { "ipv4" };
        let prefix = format!("{}assignment/{fam}/block/", keys::IPAM_PREFIX);
        Ok(self.ds.list(&prefix).await?.0)
    }

    /// The CIDRs of every block of one family (the blocks are not decoded).
    async fn block_cidrs(&self, v6: bool) -> IpamResult<HashSet<IpNet>> {
        Ok(self
            .block_kvs(v6)
            .await?
            .iter()
            .filter_map(|kv| match keys::parse_ipam_key(&kv.key) {
                Some(IpamKey::Block(cidr)) => Some(cidr),
                _ => None,
            })
            .collect())
    }

    /// Which block and handle an address belongs to, if allocated.
    pub async fn lookup(&self, ip: IpAddr) -> IpamResult<Option<(IpNet, Option<String>)>> {
        for (cidr, b) in self.blocks(ip.is_ipv6()).await? {
            if cidr.contains(&ip) {
                return Ok(b.handle_of(ip).map(|h| (cidr, h.map(str::to_string))));
            }
        }
        Ok(None)
    }
}

/// The ordinal of `ip` in `block` (re-exported for tools).
pub fn ordinal(block: &IpNet, ip: IpAddr) -> Option<usize> {
    ordinal_in(block, ip)
}

/// What the tests of every part of the allocator start from.
#[cfg(test)]
mod test_support {
    use super::*;
    use crate::datastore::MemoryDatastore;

    pub(super) async fn setup(pools: &[(&str, &str, u32)]) -> (Ipam, MemoryDatastore) {
        let mem = MemoryDatastore::new();
        let ds: Arc<dyn Datastore> = Arc::new(mem.clone());
        let client = Client::new(ds.clone());
        for (name, cidr, bs) in pools {
            let spec = IPPoolSpec {
                cidr: cidr.to_string(),
                block_size: Some(*bs),
                ..Default::default()
            };
            client.create(IPPool::new(*name, spec)).await.unwrap();
        }
        (Ipam::new(ds).with_clock(|| 1000), mem)
    }

    pub(super) fn args(handle: &str, host: &str, n: usize) -> AssignArgs {
        AssignArgs {
            num_v4: n,
            ..AssignArgs::v4(handle, host)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{args, setup};
    use super::*;
    use crate::datastore::MemoryDatastore;

    #[tokio::test]
    async fn a_corrupt_block_is_reported_and_passed_over_never_used() {
        let (ipam, mem) = setup(&[("p", "10.65.0.0/24", 26)]).await;
        let first = ipam.auto_assign(&args("h1", "node-1", 1)).await.unwrap();
        let cidr = ipam.affine_blocks("node-1", false).await.unwrap()[0];
        // Ordinal 5 both free and allocated: using it could hand one address out twice.
        let kv = mem.get(&keys::block_key(&cidr)).await.unwrap().unwrap();
        let mut v: serde_json::Value = serde_json::from_slice(&kv.value).unwrap();
        v["allocations"][5] = serde_json::json!(0);
        mem.apply(&kv.key, serde_json::to_vec(&v).unwrap())
            .await
            .unwrap();
        let e = decode_block(&mem.get(&kv.key).await.unwrap().unwrap()).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "cannot decode {}: ordinal 5 is both unallocated and allocated",
                kv.key
            )
        );
        // The next assignment claims another block instead of touching the corrupt one.
        let next = ipam.auto_assign(&args("h2", "node-1", 1)).await.unwrap();
        assert!(!cidr.contains(&next[0]), "{next:?} from corrupt {cidr}");
        assert_eq!(
            mem.get(&kv.key).await.unwrap().unwrap().value,
            serde_json::to_vec(&v).unwrap()
        );
        // Releases elsewhere still work; the corrupt block's own address stays as it is.
        assert_eq!(ipam.release_ips(&next).await.unwrap(), next);
        assert!(ipam.release_ips(&first).await.unwrap().is_empty());
        // A handle with addresses in the corrupt block and in a sound one: release by
        // handle (a pod's DEL) frees the sound one instead of failing on the corrupt one.
        let second = ipam.auto_assign(&args("h1", "node-1", 1)).await.unwrap();
        assert!(!cidr.contains(&second[0]), "{second:?} from corrupt {cidr}");
        assert_eq!(ipam.release_by_handle("h1").await.unwrap(), second);
        assert!(mem.get(&keys::handle_key("h1")).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn an_invalid_pool_is_not_used() {
        let (ipam, mem) = setup(&[("good", "10.65.0.0/24", 26)]).await;
        // blockSize 8 (below Calico's /20) written by hand: carving /8 blocks would be nonsense.
        let bad = r#"{"kind":"IPPool","apiVersion":"projectcalico.org/v3","metadata":{"name":"bad"},"spec":{"cidr":"10.0.0.0/8","blockSize":8}}"#;
        mem.apply(
            "/calico/resources/v3/projectcalico.org/ippools/bad",
            bad.into(),
        )
        .await
        .unwrap();
        let pools = ipam
            .usable_pools("node-1", false, &[], IpUse::Workload)
            .await
            .unwrap();
        let names: Vec<&str> = pools.iter().map(|p| p.metadata.name.as_str()).collect();
        assert_eq!(names, ["good"]);
        let ip = ipam.auto_assign(&args("h", "node-1", 1)).await.unwrap();
        assert!("10.65.0.0/24".parse::<IpNet>().unwrap().contains(&ip[0]));
    }

    #[tokio::test]
    async fn pools_are_chosen_by_enabled_selector_and_use() {
        let mem = MemoryDatastore::new();
        let ds: Arc<dyn Datastore> = Arc::new(mem.clone());
        let client = Client::new(ds.clone());
        let mk = |name: &str, cidr: &str, f: fn(&mut IPPoolSpec)| {
            let mut spec = IPPoolSpec {
                cidr: cidr.into(),
                block_size: Some(28),
                ..Default::default()
            };
            f(&mut spec);
            IPPool::new(name, spec)
        };
        client
            .create(mk("off", "10.1.0.0/24", |s| s.disabled = true))
            .await
            .unwrap();
        client
            .create(mk("zone-b", "10.2.0.0/24", |s| {
                s.node_selector = Some("zone == 'b'".into())
            }))
            .await
            .unwrap();
        client
            .create(mk("tunnels", "10.3.0.0/24", |s| {
                s.allowed_uses = Some(vec!["Tunnel".into()])
            }))
            .await
            .unwrap();
        client
            .create(mk("zone-a", "10.4.0.0/24", |s| {
                s.node_selector = Some("zone == 'a'".into())
            }))
            .await
            .unwrap();
        let mut node = crate::model::Node::new("node-a", NodeSpec::default());
        node.metadata.labels.insert("zone".into(), "a".into());
        client.create(node).await.unwrap();
        let ipam = Ipam::new(ds);
        let ip = ipam.auto_assign(&args("w", "node-a", 1)).await.unwrap()[0];
        assert!(
            "10.4.0.0/24".parse::<IpNet>().unwrap().contains(&ip),
            "{ip}"
        );
        let t = ipam
            .auto_assign(&AssignArgs {
                use_: IpUse::Tunnel,
                ..args("t", "node-a", 1)
            })
            .await
            .unwrap()[0];
        assert!(
            "10.3.0.0/24".parse::<IpNet>().unwrap().contains(&t)
                || "10.4.0.0/24".parse::<IpNet>().unwrap().contains(&t)
        );
        let e = ipam
            .auto_assign(&AssignArgs {
                v4_pools: vec!["10.2.0.0/24".parse().unwrap()],
                ..args("x", "node-a", 1)
            })
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "IP pool 10.2.0.0/24 does not exist, is disabled, or does not select this node"
        );
        let e = ipam
            .auto_assign(&AssignArgs {
                num_v4: 0,
                num_v6: 1,
                ..args("x", "node-a", 0)
            })
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "no enabled IPv6 pool allows Workload addresses on node node-a"
        );
    }
}
