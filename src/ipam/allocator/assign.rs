//! Assign and claim (REFERENCE §3): addresses from blocks affine to the host, then from a
//! newly claimed block (affinity `pending` -> block create-only -> affinity `confirmed`;
//! the loser of a race backs out), then, unless strict affinity, borrowed from any block
//! of a usable pool; and specific addresses (a tunnel address restored, CNI `IP=`).

use std::collections::{BTreeMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use super::{
    CAS_RETRIES, DEFAULT_MAX_BLOCKS_PER_HOST, IpUse, Ipam, IpamError, IpamResult, checked_pools,
    decode_block, skip_corrupt,
};
use crate::datastore::{DatastoreError, KeyValue};
use crate::model::ipam::{AffinityState, AllocationBlock, BlockAffinity, IPAMConfig};
use crate::model::keys::{self, IpamKey};
use crate::model::{IPPool, IPPoolSpec};

/// A request for addresses.
#[derive(Debug, Clone)]
pub struct AssignArgs {
    /// Handle that will own the addresses (`k8s-pod-network.<cid>`, `ipip-tunnel-addr-<node>`).
    pub handle: String,
    /// Secondary attributes stored with the allocation (`node`, `pod`, `namespace`, ...).
    pub attrs: BTreeMap<String, String>,
    pub host: String,
    pub num_v4: usize,
    pub num_v6: usize,
    /// Pools to use (CNI `ipv4_pools`); empty means every usable pool.
    pub v4_pools: Vec<IpNet>,
    pub v6_pools: Vec<IpNet>,
    pub use_: IpUse,
}

impl AssignArgs {
    /// One IPv4 workload address, with the `node` attribute the CNI plugin records.
    pub fn v4(handle: &str, host: &str) -> Self {
        AssignArgs {
            handle: handle.into(),
            attrs: BTreeMap::from([("node".to_string(), host.to_string())]),
            host: host.into(),
            num_v4: 1,
            num_v6: 0,
            v4_pools: Vec::new(),
            v6_pools: Vec::new(),
            use_: IpUse::Workload,
        }
    }
}

/// The first reads of an assignment (see [`Ipam::prefetch`]).
#[derive(Debug)]
pub struct Prefetched {
    v4: Option<FamilyReads>,
    v6: Option<FamilyReads>,
}

#[derive(Debug)]
struct FamilyReads {
    pools: Vec<IPPool>,
    cfg: IPAMConfig,
    guess: Vec<IpNet>,
}

/// A block claimed for a host, its affinity still pending.
/// What a claim of a block for a host came to.
enum Claimed {
    /// The block was created by this claim; its affinity waits to be confirmed.
    New(Claim),
    /// The block is this host's through another allocator of the same host (its claim is
    /// under way or done): assign in it.
    Ours(IpNet),
}

struct Claim {
    cidr: IpNet,
    aff_key: String,
    aff_rev: i64,
    /// The block as created.
    block: KeyValue,
}

/// A small deterministic generator (splitmix64) for the candidate block order.
struct Rng(u64);

impl Rng {
    fn seeded(seed: &str) -> Rng {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        seed.hash(&mut h);
        Rng(h.finish())
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// The block containing `ip` for a pool with this block size.
fn block_of(ip: IpAddr, block_size: u32) -> Option<IpNet> {
    IpNet::new(ip, u8::try_from(block_size).ok()?)
        .ok()
        .map(|n| n.trunc())
}

/// The `i`-th block of a pool.
fn nth_block(pool: &IpNet, block_size: u8, i: u128) -> Option<IpNet> {
    let shift = u32::from(pool.max_prefix_len() - block_size);
    let offset = i.checked_shl(shift)?;
    let base = match pool.network() {
        IpAddr::V4(a) => {
            IpAddr::V4((u32::from(a).checked_add(u32::try_from(offset).ok()?)?).into())
        }
        IpAddr::V6(a) => IpAddr::V6((u128::from(a).checked_add(offset)?).into()),
    };
    IpNet::new(base, block_size).ok()
}

/// Per-host serialization of assignments inside one process. Concurrent assigns for one
/// host would otherwise each claim a new block when the host has none yet; Calico avoids
/// that with a host-wide lock too (its CNI plugin adds a file lock across processes).
pub(super) type HostLocks = Arc<std::sync::Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>>>;

/// A lock shared with other processes on this host (the CNI plugin's
/// `/var/run/calico/ipam.lock`), taken around the part of an assignment that claims
/// blocks; the guard it returns is held until dropped.
/// Taking it may fail (held elsewhere for too long): the assignment then fails with that
/// error rather than waiting without bound.
pub type CrossProcessLock =
    Arc<dyn Fn() -> IpamResult<Box<dyn std::any::Any + Send>> + Send + Sync>;

impl Ipam {
    /// Assign addresses per `args`. All or nothing: on failure nothing stays allocated.
    pub async fn auto_assign(&self, args: &AssignArgs) -> IpamResult<Vec<IpAddr>> {
        let pre = self.prefetch(args).await?;
        self.auto_assign_prefetched(args, pre).await
    }

    /// The reads an assignment starts with (pools, IPAM configuration, a first look at the
    /// host's affinities), for callers that issue them together with reads of their own.
    pub async fn prefetch(&self, args: &AssignArgs) -> IpamResult<Prefetched> {
        let (v4, v6) = tokio::join!(
            self.prefetch_family(args, false, args.num_v4, &args.v4_pools),
            self.prefetch_family(args, true, args.num_v6, &args.v6_pools)
        );
        Ok(Prefetched { v4: v4?, v6: v6? })
    }

    async fn prefetch_family(
        &self,
        args: &AssignArgs,
        v6: bool,
        n: usize,
        requested: &[IpNet],
    ) -> IpamResult<Option<FamilyReads>> {
        if n == 0 {
            return Ok(None);
        }
        // Pools and configuration do not change with claims, and the affinities read here
        // are a first guess, checked again under the lock before any block is claimed.
        let (pools, cfg, guess) = tokio::join!(
            self.usable_pools(&args.host, v6, requested, args.use_),
            self.config(),
            self.affine_blocks(&args.host, v6)
        );
        Ok(Some(FamilyReads {
            pools: pools?,
            cfg: cfg?,
            guess: guess?,
        }))
    }

    /// [`Ipam::auto_assign`] with its first reads already made by [`Ipam::prefetch`].
    pub async fn auto_assign_prefetched(
        &self,
        args: &AssignArgs,
        pre: Prefetched,
    ) -> IpamResult<Vec<IpAddr>> {
        let mut out = Vec::new();
        for (v6, n, req, reads) in [
            (false, args.num_v4, &args.v4_pools, pre.v4),
            (true, args.num_v6, &args.v6_pools, pre.v6),
        ] {
            let Some(reads) = reads.filter(|_| n > 0) else {
                continue;
            };
            match self.assign_family(args, v6, n, req, reads).await {
                Ok(ips) => out.extend(ips),
                Err(e) => {
                    if !out.is_empty() {
                        let _ = self.release_ips(&out).await;
                    }
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    async fn assign_family(
        &self,
        args: &AssignArgs,
        v6: bool,
        n: usize,
        requested: &[IpNet],
        reads: FamilyReads,
    ) -> IpamResult<Vec<IpAddr>> {
        let family = if v6 { 6 } else { 4 };
        let FamilyReads { pools, cfg, guess } = reads;
        let lock = {
            let mut locks = self.host_locks.lock().unwrap_or_else(|e| e.into_inner());
            locks.entry(args.host.clone()).or_default().clone()
        };
        let _serialized = lock.lock().await;
        let _cross_process = self.cross_process.as_ref().map(|take| take()).transpose()?;
        if pools.is_empty() {
            return Err(IpamError::NoPools {
                family,
                use_name: args.use_.name(),
                host: args.host.clone(),
                requested: if requested.is_empty() {
                    String::new()
                } else {
                    format!(" among {requested:?}")
                },
            });
        }
        let in_pools = |b: &IpNet| {
            pools
                .iter()
                .any(|p| p.spec.net().is_some_and(|n| n.contains(&b.network())))
        };
        let mut got: Vec<IpAddr> = Vec::new();
        let result = async {
            // 1. Blocks this host already has: those seen before the lock, then (only if
            // they are full) any claimed since by another assignment on this host.
            let first: Vec<IpNet> = guess.iter().filter(|c| in_pools(c)).copied().collect();
            self.assign_in_blocks(&first, args, n, Some(&args.host), &mut got).await?;
            let max = if cfg.max_blocks_per_host == 0 { DEFAULT_MAX_BLOCKS_PER_HOST } else { cfg.max_blocks_per_host };
            let claiming = cfg.auto_allocate_blocks;
            // Short: the host's affinities again and, for a claim, every block (which
            // ones are taken), read together.
            let (affine, mut taken) = if got.len() < n {
                let taken = async {
                    if !claiming {
                        return Ok(HashSet::new());
                    }
                    self.block_cidrs(v6).await
                };
                let (affine, taken) = tokio::join!(self.affine_blocks(&args.host, v6), taken);
                (affine?, taken?)
            } else {
                (guess.clone(), HashSet::new())
            };
            let more: Vec<IpNet> = affine.iter().filter(|c| in_pools(c) && !guess.contains(c)).copied().collect();
            self.assign_in_blocks(&more, args, n, Some(&args.host), &mut got).await?;
            // 2. New blocks, within the per-host limit.
            let mut owned = affine.len();
            while got.len() < n && claiming && owned < max as usize {
                let Some(claimed) = self.claim_block(&args.host, &pools, &taken).await? else { break };
                owned += 1;
                let claim = match claimed {
                    Claimed::New(claim) => claim,
                    Claimed::Ours(cidr) => {
                        taken.insert(cidr);
                        got.extend(self.assign_in_block(&cidr, args, n - got.len(), Some(&args.host), None).await?);
                        continue;
                    }
                };
                taken.insert(claim.cidr);
                // The claim is confirmed while its first addresses are assigned: the block
                // is ours from its creation, and the assignment starts from what was created.
                let (confirmed, more) = tokio::join!(
                    self.confirm_claim(&claim),
                    self.assign_in_block(&claim.cidr, args, n - got.len(), Some(&args.host), Some(Some(claim.block.clone())))
                );
                got.extend(more?);
                confirmed?;
            }
            // 3. Borrow from other hosts' blocks.
            if got.len() < n && !cfg.strict_affinity {
                for kv in self.block_kvs(v6).await? {
                    if got.len() == n {
                        break;
                    }
                    let Some(IpamKey::Block(cidr)) = keys::parse_ipam_key(&kv.key) else { continue };
                    if in_pools(&cidr) {
                        match self.assign_in_block(&cidr, args, n - got.len(), None, Some(Some(kv))).await {
                            Ok(more) => got.extend(more),
                            Err(e) if skip_corrupt(&e) => continue,
                            Err(e) => return Err(e),
                        }
                    }
                }
            }
            if got.len() < n {
                let reason = if cfg.strict_affinity {
                    format!("its blocks are full, it may claim no more (maxBlocksPerHost {max}) or none is free, and strict affinity forbids borrowing")
                } else {
                    "every block of the usable pools is full".to_string()
                };
                return Err(IpamError::Exhausted { family, host: args.host.clone(), reason });
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => Ok(got),
            Err(e) => {
                if !got.is_empty() {
                    let _ = self.release_ips(&got).await;
                }
                Err(e)
            }
        }
    }

    /// Assign from `cidrs` in order until `got` holds `n` addresses. The blocks are read
    /// in waves (1, then 4, 16, … at once): one read when the first block has room, a few
    /// round trips rather than one per block when many are full.
    async fn assign_in_blocks(
        &self,
        cidrs: &[IpNet],
        args: &AssignArgs,
        n: usize,
        affine_host: Option<&str>,
        got: &mut Vec<IpAddr>,
    ) -> IpamResult<()> {
        let mut rest = cidrs;
        let mut wave = 1;
        while got.len() < n && !rest.is_empty() {
            let (now, later) = rest.split_at(wave.min(rest.len()));
            rest = later;
            wave *= 4;
            let keys: Vec<String> = now.iter().map(keys::block_key).collect();
            let reads = futures::future::join_all(keys.iter().map(|k| self.ds.get(k))).await;
            for (cidr, read) in now.iter().zip(reads) {
                if got.len() == n {
                    break;
                }
                let read = read?;
                if let Some(kv) = &read {
                    match decode_block(kv) {
                        Ok(block) if block.free() == 0 => continue,
                        Ok(_) => {}
                        Err(e) if skip_corrupt(&e) => continue,
                        Err(e) => return Err(e),
                    }
                }
                match self
                    .assign_in_block(cidr, args, n - got.len(), affine_host, Some(read))
                    .await
                {
                    Ok(more) => got.extend(more),
                    Err(e) if skip_corrupt(&e) => continue,
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// Claim a free block of one of `pools` for `host`: affinity pending, then the block
    /// created (create-only); [`Ipam::confirm_claim`] confirms the affinity. Candidates
    /// come in an order seeded by the host name; those in `taken` (blocks that exist) are
    /// passed over, and a block created meanwhile by another host loses us nothing but the
    /// try.
    async fn claim_block(
        &self,
        host: &str,
        pools: &[IPPool],
        taken: &HashSet<IpNet>,
    ) -> IpamResult<Option<Claimed>> {
        let mut rng = Rng::seeded(host);
        for pool in pools {
            let (Some(net), Ok(bs)) = (
                pool.spec.net(),
                u8::try_from(pool.spec.block_size_or_default()),
            ) else {
                continue;
            };
            let count_bits = u32::from(bs - net.prefix_len());
            // Small pools: every block in a seeded order; huge (IPv6) pools: seeded probes.
            let candidates: Vec<u128> = if count_bits <= 16 {
                let mut all: Vec<u128> = (0..(1u128 << count_bits)).collect();
                for i in (1..all.len()).rev() {
                    let j = (rng.next() % (i as u64 + 1)) as usize;
                    all.swap(i, j);
                }
                all
            } else {
                (0..4096)
                    .map(|_| u128::from(rng.next()) & ((1u128 << count_bits.min(64)) - 1))
                    .collect()
            };
            for i in candidates {
                let Some(cidr) = nth_block(&net, bs, i) else {
                    continue;
                };
                if taken.contains(&cidr) {
                    continue;
                }
                if let Some(c) = self.try_claim(host, cidr).await? {
                    return Ok(Some(c));
                }
            }
        }
        Ok(None)
    }

    /// Claim `cidr` for `host`. Another allocator of the same host (calico-node's tunnel
    /// address beside a pod's ADD) may be claiming the same block at the same moment (the
    /// candidates come in the same seeded order): its pending affinity, or the block it
    /// made, is then this host's too and is used, as Calico's claim does, instead of
    /// claiming a second block for the host.
    async fn try_claim(&self, host: &str, cidr: IpNet) -> IpamResult<Option<Claimed>> {
        let aff_key = keys::affinity_key(host, &cidr);
        let pending = serde_json::to_vec(&BlockAffinity {
            state: AffinityState::Pending,
            deleted: false,
        })
        .expect("serializes");
        let aff_rev = match self.ds.create(&aff_key, pending).await {
            Ok(r) => r,
            Err(DatastoreError::AlreadyExists { .. }) => {
                let live = match self.ds.get(&aff_key).await? {
                    Some(kv) => BlockAffinity::from_bytes(&kv.value).is_ok_and(|a| !a.deleted),
                    None => false,
                };
                return Ok(live.then_some(Claimed::Ours(cidr)));
            }
            Err(e) => return Err(e.into()),
        };
        let block = AllocationBlock::new_empty(cidr, Some(host), (self.clock)());
        let value = block.to_bytes();
        let key = keys::block_key(&cidr);
        match self.ds.create(&key, value.clone()).await {
            Ok(rev) => Ok(Some(Claimed::New(Claim {
                cidr,
                aff_key,
                aff_rev,
                block: KeyValue {
                    key,
                    value,
                    mod_revision: rev,
                    create_revision: rev,
                },
            }))),
            Err(DatastoreError::AlreadyExists { .. }) => {
                let ours = match self.ds.get(&key).await? {
                    Some(kv) => decode_block(&kv).is_ok_and(|b| b.host() == Some(host)),
                    None => false,
                };
                if ours {
                    // Made meanwhile by another allocator of this host (on our pending
                    // affinity): ours, so the affinity is confirmed and the block used.
                    self.confirm_affinity(&aff_key, aff_rev).await?;
                    return Ok(Some(Claimed::Ours(cidr)));
                }
                // Another host won this block: back out our claim.
                let _ = self.ds.delete(&aff_key, Some(aff_rev)).await;
                Ok(None)
            }
            Err(e) => {
                self.back_out_claim(host, &aff_key, aff_rev, &key, &value)
                    .await;
                Err(e.into())
            }
        }
    }

    /// Undo a claim whose block create failed without saying whether it happened (the
    /// datastore could not tell): the block, if it is there as we created it, goes first,
    /// then the pending affinity. When the block cannot be read the affinity stays: an
    /// affinity left pending is harmless, a block left without its affinity would be
    /// orphaned. A block that is there, affine to this host but already changed (our create
    /// did happen and another allocator has used it since) keeps its affinity, confirmed.
    async fn back_out_claim(
        &self,
        host: &str,
        aff_key: &str,
        aff_rev: i64,
        key: &str,
        value: &[u8],
    ) {
        let block_gone = match self.ds.get(key).await {
            Ok(None) => true,
            Ok(Some(kv)) if kv.value == value => matches!(
                self.ds.delete(key, Some(kv.mod_revision)).await,
                Ok(_) | Err(DatastoreError::NotFound { .. })
            ),
            Ok(Some(kv)) => {
                let ours = decode_block(&kv).is_ok_and(|b| b.host() == Some(host));
                if ours && let Err(e) = self.confirm_affinity(aff_key, aff_rev).await {
                    tracing::warn!(block = %key, error = %e, "a claimed block in use keeps its pending affinity");
                }
                // Otherwise someone else's block: not ours to remove, and our affinity
                // never pointed at a block we made.
                !ours
            }
            Err(e) => {
                tracing::warn!(block = %key, error = %e, "cannot tell whether a claimed block was created; its pending affinity stays");
                false
            }
        };
        if block_gone {
            let _ = self.ds.delete(aff_key, Some(aff_rev)).await;
        }
    }

    /// The last step of a claim: its affinity confirmed.
    async fn confirm_claim(&self, claim: &Claim) -> IpamResult<()> {
        self.confirm_affinity(&claim.aff_key, claim.aff_rev).await
    }

    /// A pending affinity (at the revision it was created) made confirmed.
    async fn confirm_affinity(&self, aff_key: &str, aff_rev: i64) -> IpamResult<()> {
        let confirmed = serde_json::to_vec(&BlockAffinity {
            state: AffinityState::Confirmed,
            deleted: false,
        })
        .expect("serializes");
        self.ds.update(aff_key, confirmed, aff_rev).await?;
        Ok(())
    }

    /// Assign up to `n` addresses in one block (CAS, retried). For an affine block whose
    /// affinity exists but block does not, the block is rebuilt. `known`: the block as
    /// just read or written (None inside: it does not exist), used for the first try
    /// instead of a read.
    async fn assign_in_block(
        &self,
        cidr: &IpNet,
        args: &AssignArgs,
        n: usize,
        affine_host: Option<&str>,
        mut known: Option<Option<KeyValue>>,
    ) -> IpamResult<Vec<IpAddr>> {
        let key = keys::block_key(cidr);
        // The handle's count is written at the same time as the block (two writes in
        // flight, not one after the other); `counted` is what the handle holds so far and
        // is corrected to what the block finally gave.
        let mut counted: i64 = 0;
        let outcome = async {
            for _ in 0..CAS_RETRIES {
                let read = match known.take() {
                    Some(kv) => kv,
                    None => self.ds.get(&key).await?,
                };
                let (mut block, rev) = match read {
                    Some(kv) => (decode_block(&kv)?, Some(kv.mod_revision)),
                    None => match affine_host {
                        Some(h) => (
                            AllocationBlock::new_empty(*cidr, Some(h), (self.clock)()),
                            None,
                        ),
                        None => return Ok(Vec::new()),
                    },
                };
                let ips = block.assign(n, Some(&args.handle), &args.attrs);
                if ips.is_empty() {
                    return Ok(ips);
                }
                let value = block.to_bytes();
                let write = async {
                    match rev {
                        Some(rev) => self.ds.update(&key, value, rev).await,
                        None => self.ds.create(&key, value).await,
                    }
                };
                let delta = ips.len() as i64 - counted;
                let count = async {
                    if delta == 0 {
                        return Ok(());
                    }
                    self.handle_add(&args.handle, cidr, delta).await
                };
                let (written, count) = tokio::join!(write, count);
                if count.is_ok() {
                    counted += delta;
                }
                match (written, count) {
                    (Ok(_), Ok(())) => return Ok(ips),
                    (Ok(_), Err(e)) => {
                        // The block holds addresses the handle does not know: give them back.
                        let _ = self.release_ips(&ips).await;
                        return Err(e);
                    }
                    (
                        Err(
                            DatastoreError::Conflict { .. }
                            | DatastoreError::AlreadyExists { .. }
                            | DatastoreError::NotFound { .. },
                        ),
                        _,
                    ) => continue,
                    (Err(e), _) => return Err(e.into()),
                }
            }
            Err(IpamError::TooManyConflicts { key: key.clone() })
        }
        .await;
        let held = match &outcome {
            Ok(ips) => ips.len() as i64,
            Err(_) => 0,
        };
        if counted != held {
            let fixed = self.handle_add(&args.handle, cidr, held - counted).await;
            if let (Ok(ips), Err(e)) = (&outcome, fixed) {
                let _ = self.release_ips(ips).await;
                return Err(e);
            }
        }
        outcome
    }

    /// Assign one specific address (e.g. a tunnel address being restored).
    pub async fn assign_ip(
        &self,
        ip: IpAddr,
        handle: &str,
        attrs: &BTreeMap<String, String>,
    ) -> IpamResult<()> {
        let pools = checked_pools(self.client.list::<IPPoolSpec>(None).await?.0);
        let pool = pools
            .iter()
            .find(|p| p.spec.net().is_some_and(|n| n.contains(&ip)))
            .ok_or(IpamError::NotInPool(ip))?;
        self.assign_ip_in_pool(ip, pool, handle, attrs).await
    }

    /// Assign an address a workload asked for (CNI_ARGS `IP=`), as Calico's `AssignIP`:
    /// it must lie in an enabled pool whose `allowedUses` include `use_`, and be free.
    pub async fn assign_requested_ip(
        &self,
        ip: IpAddr,
        handle: &str,
        attrs: &BTreeMap<String, String>,
        use_: IpUse,
    ) -> IpamResult<()> {
        let pools = self.client.list::<IPPoolSpec>(None).await?.0;
        let pool = pools
            .iter()
            .find(|p| !p.spec.disabled && p.spec.net().is_some_and(|n| n.contains(&ip)))
            .ok_or(IpamError::NotInPool(ip))?;
        let allowed = pool
            .spec
            .allowed_uses
            .as_ref()
            .is_none_or(|u| u.iter().any(|u| u == use_.name()));
        if !allowed {
            return Err(IpamError::UseNotAllowed {
                ip,
                pool: pool.metadata.name.clone(),
                use_name: use_.name(),
            });
        }
        self.assign_ip_in_pool(ip, pool, handle, attrs).await
    }

    /// Assign `ip` of `pool` to `handle`, creating its block when needed.
    async fn assign_ip_in_pool(
        &self,
        ip: IpAddr,
        pool: &IPPool,
        handle: &str,
        attrs: &BTreeMap<String, String>,
    ) -> IpamResult<()> {
        let cidr =
            block_of(ip, pool.spec.block_size_or_default()).ok_or(IpamError::NotInPool(ip))?;
        let key = keys::block_key(&cidr);
        // Calico's AssignIP: a block that does not exist yet is claimed for the requesting
        // host (pending affinity, block, confirmed affinity), never left without an owner.
        let host = attrs.get("node").filter(|h| !h.is_empty());
        for _ in 0..CAS_RETRIES {
            let (mut block, rev) = match (self.ds.get(&key).await?, host) {
                (Some(kv), _) => (decode_block(&kv)?, Some(kv.mod_revision)),
                (None, Some(host)) => match self.try_claim(host, cidr).await? {
                    Some(Claimed::New(claim)) => {
                        self.confirm_claim(&claim).await?;
                        continue;
                    }
                    // Being claimed by another allocator of this host: made here if need be.
                    Some(Claimed::Ours(_)) => (
                        AllocationBlock::new_empty(cidr, Some(host), (self.clock)()),
                        None,
                    ),
                    None => continue,
                },
                (None, None) => (AllocationBlock::new_empty(cidr, None, (self.clock)()), None),
            };
            if !block.assign_ip(ip, Some(handle), attrs) {
                return Err(IpamError::InUse(ip));
            }
            let value = block.to_bytes();
            let written = match rev {
                Some(rev) => self.ds.update(&key, value, rev).await,
                None => self.ds.create(&key, value).await,
            };
            match written {
                Ok(_) => return self.handle_add(handle, &cidr, 1).await,
                Err(
                    DatastoreError::Conflict { .. }
                    | DatastoreError::AlreadyExists { .. }
                    | DatastoreError::NotFound { .. },
                ) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(IpamError::TooManyConflicts { key })
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{args, setup};
    use super::super::*;
    use super::*;
    use crate::datastore::MemoryDatastore;

    /// Two allocators of one host (calico-node's tunnel address and a pod's ADD) claim at
    /// the same moment and meet on the same first candidate: the one that finds the
    /// other's pending affinity uses that block, and the one whose block create finds the
    /// block already made for its host confirms its affinity and uses it. One block for the
    /// host, not two (before: the second moved on and claimed another block; here, with a
    /// pool of one block, it failed as exhausted).
    #[tokio::test]
    async fn allocators_of_one_host_claiming_together_share_one_block() {
        let (ipam, mem) = setup(&[("p", "10.65.0.0/26", 26)]).await;
        let cidr: IpNet = "10.65.0.0/26".parse().unwrap();
        let aff_key = keys::affinity_key("node-1", &cidr);
        let pending = br#"{"state":"pending","deleted":false}"#.to_vec();
        let aff_rev = mem.create(&aff_key, pending).await.unwrap();
        // The sibling's claim is under way (its affinity pending, its block not made yet).
        let ips = ipam.auto_assign(&args("pod", "node-1", 1)).await.unwrap();
        assert!(cidr.contains(&ips[0]), "{ips:?}");
        let (blocks, _) = mem.list("/calico/ipam/v2/assignment/").await.unwrap();
        assert_eq!(blocks.len(), 1);
        // The sibling's block create now finds the block made for its host: it confirms
        // its affinity and uses the block.
        mem.delete(&aff_key, Some(aff_rev)).await.unwrap();
        match ipam.try_claim("node-1", cidr).await.unwrap() {
            Some(Claimed::Ours(c)) => assert_eq!(c, cidr),
            _ => panic!("the block made for this host is not used"),
        }
        assert_eq!(ipam.affine_blocks("node-1", false).await.unwrap(), [cidr]);
        // Another host's block is still another host's.
        assert!(ipam.try_claim("node-2", cidr).await.unwrap().is_none());
        assert!(
            mem.get(&keys::affinity_key("node-2", &cidr))
                .await
                .unwrap()
                .is_none()
        );
    }

    /// A datastore whose block creates commit and then report an unknown outcome (a member
    /// that died after the write, the cluster unreachable to read it back). With `true`,
    /// another allocator uses the new block before the outcome reaches us.
    struct LostBlockCreates(MemoryDatastore, bool);

    #[async_trait::async_trait]
    impl Datastore for LostBlockCreates {
        async fn get(&self, key: &str) -> crate::datastore::DsResult<Option<KeyValue>> {
            self.0.get(key).await
        }
        async fn list(&self, prefix: &str) -> crate::datastore::DsResult<(Vec<KeyValue>, i64)> {
            self.0.list(prefix).await
        }
        async fn create(&self, key: &str, value: Vec<u8>) -> crate::datastore::DsResult<i64> {
            let rev = self.0.create(key, value.clone()).await?;
            if key.contains("/assignment/") {
                if self.1 {
                    let mut b: AllocationBlock = serde_json::from_slice(&value).unwrap();
                    b.assign(1, Some("borrower"), &BTreeMap::new());
                    self.0.update(key, b.to_bytes(), rev).await?;
                }
                return Err(DatastoreError::Unavailable("outcome unknown".into()));
            }
            Ok(rev)
        }
        async fn update(
            &self,
            key: &str,
            value: Vec<u8>,
            revision: i64,
        ) -> crate::datastore::DsResult<i64> {
            self.0.update(key, value, revision).await
        }
        async fn apply(&self, key: &str, value: Vec<u8>) -> crate::datastore::DsResult<i64> {
            self.0.apply(key, value).await
        }
        async fn delete(
            &self,
            key: &str,
            revision: Option<i64>,
        ) -> crate::datastore::DsResult<KeyValue> {
            self.0.delete(key, revision).await
        }
        async fn watch(
            &self,
            prefix: &str,
            from_revision: i64,
        ) -> crate::datastore::DsResult<crate::datastore::WatchReceiver> {
            self.0.watch(prefix, from_revision).await
        }
    }

    #[tokio::test]
    async fn a_block_create_of_unknown_outcome_leaves_no_orphaned_block() {
        let (_, mem) = setup(&[("p", "10.65.0.0/24", 26)]).await;
        let ipam = Ipam::new(Arc::new(LostBlockCreates(mem.clone(), false)));
        let r = ipam.auto_assign(&args("h1", "node-1", 1)).await;
        assert!(matches!(r, Err(IpamError::Datastore(_))), "{r:?}");
        let (blocks, _) = mem.list("/calico/ipam/v2/assignment/").await.unwrap();
        let (affinities, _) = mem.list("/calico/ipam/v2/host/").await.unwrap();
        let names = |kvs: &[KeyValue]| kvs.iter().map(|kv| kv.key.clone()).collect::<Vec<_>>();
        assert!(
            blocks.is_empty(),
            "a block without its affinity was left: {:?} (affinities {:?})",
            names(&blocks),
            names(&affinities)
        );
        assert!(affinities.is_empty(), "{:?}", names(&affinities));
    }

    /// Our block create committed with an unknown outcome and another allocator used the
    /// block before we could read it back: the block is ours and in use, so it keeps its
    /// affinity, confirmed (before: the affinity was deleted, the block left orphaned).
    #[tokio::test]
    async fn a_claimed_block_used_before_the_back_out_keeps_its_affinity() {
        let (_, mem) = setup(&[("p", "10.65.0.0/24", 26)]).await;
        let ipam = Ipam::new(Arc::new(LostBlockCreates(mem.clone(), true)));
        let r = ipam.auto_assign(&args("h1", "node-1", 1)).await;
        assert!(matches!(r, Err(IpamError::Datastore(_))), "{r:?}");
        let (blocks, _) = mem.list("/calico/ipam/v2/assignment/").await.unwrap();
        let (affinities, _) = mem.list("/calico/ipam/v2/host/").await.unwrap();
        assert_eq!((blocks.len(), affinities.len()), (1, 1), "{affinities:?}");
        let aff: BlockAffinity = serde_json::from_slice(&affinities[0].value).unwrap();
        assert_eq!(aff.state, AffinityState::Confirmed);
        assert_eq!(ipam.affine_blocks("node-1", false).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn first_assign_claims_an_affine_block() {
        let (ipam, mem) = setup(&[("p", "10.65.0.0/24", 26)]).await;
        let ips = ipam.auto_assign(&args("h1", "node-1", 3)).await.unwrap();
        assert_eq!(ips.len(), 3);
        let blocks = ipam.affine_blocks("node-1", false).await.unwrap();
        assert_eq!(blocks.len(), 1);
        assert!(ips.iter().all(|ip| blocks[0].contains(ip)));
        // Consecutive from the head of the block.
        assert_eq!(ips[0], blocks[0].network());
        let h = mem.get(&keys::handle_key("h1")).await.unwrap().unwrap();
        assert_eq!(
            String::from_utf8(h.value).unwrap(),
            format!(r#"{{"block":{{"{}":3}},"deleted":false}}"#, blocks[0])
        );
    }

    #[tokio::test]
    async fn hosts_get_their_own_blocks_and_borrow_when_out_of_blocks() {
        // /26 pool of /28 blocks: 4 blocks of 16.
        let (ipam, _) = setup(&[("p", "10.65.0.0/26", 28)]).await;
        ipam.set_config(&IPAMConfig {
            max_blocks_per_host: 1,
            ..Default::default()
        })
        .await
        .unwrap();
        let a = ipam.auto_assign(&args("a", "node-a", 16)).await.unwrap();
        let b = ipam.auto_assign(&args("b", "node-b", 16)).await.unwrap();
        assert_ne!(
            ipam.affine_blocks("node-a", false).await.unwrap(),
            ipam.affine_blocks("node-b", false).await.unwrap()
        );
        // node-a's block is full and it may not claim another: it borrows from free space.
        let borrowed = ipam.auto_assign(&args("a2", "node-a", 1)).await;
        // Only node-a and node-b blocks exist, both full: nothing to borrow yet.
        assert!(
            matches!(borrowed, Err(IpamError::Exhausted { .. })),
            "{borrowed:?}"
        );
        ipam.auto_assign(&args("c", "node-c", 2)).await.unwrap();
        let borrowed = ipam.auto_assign(&args("a2", "node-a", 1)).await.unwrap();
        let c_block = ipam.affine_blocks("node-c", false).await.unwrap()[0];
        assert!(
            c_block.contains(&borrowed[0]),
            "borrowed from node-c's block"
        );
        let all: HashSet<IpAddr> = a.iter().chain(&b).chain(&borrowed).copied().collect();
        assert_eq!(all.len(), 33);
    }

    #[tokio::test]
    async fn strict_affinity_refuses_to_borrow() {
        let (ipam, mem) = setup(&[("p", "10.65.0.0/27", 28)]).await;
        ipam.set_config(&IPAMConfig {
            strict_affinity: true,
            max_blocks_per_host: 1,
            ..Default::default()
        })
        .await
        .unwrap();
        ipam.auto_assign(&args("a", "node-a", 16)).await.unwrap();
        ipam.auto_assign(&args("b", "node-b", 1)).await.unwrap();
        let e = ipam
            .auto_assign(&args("a2", "node-a", 1))
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("strict affinity forbids borrowing"),
            "{e}"
        );
        assert!(
            mem.get(&keys::handle_key("a2")).await.unwrap().is_none(),
            "nothing left behind"
        );
    }

    #[tokio::test]
    async fn max_blocks_per_host_is_honoured() {
        let (ipam, _) = setup(&[("p", "10.65.0.0/24", 28)]).await;
        ipam.set_config(&IPAMConfig {
            strict_affinity: true,
            max_blocks_per_host: 2,
            ..Default::default()
        })
        .await
        .unwrap();
        ipam.auto_assign(&args("a", "node-a", 32)).await.unwrap();
        assert_eq!(ipam.affine_blocks("node-a", false).await.unwrap().len(), 2);
        assert!(ipam.auto_assign(&args("a2", "node-a", 1)).await.is_err());
    }

    #[tokio::test]
    async fn a_free_address_in_any_affine_block_is_used_before_a_claim() {
        // Six full /30 blocks (read in waves of 1, 4 and then 16); one address freed in
        // each position in turn must be found again, and no seventh block claimed.
        let (ipam, _) = setup(&[("p", "10.65.0.0/24", 30)]).await;
        ipam.auto_assign(&args("fill", "node-a", 24)).await.unwrap();
        let affine = ipam.affine_blocks("node-a", false).await.unwrap();
        assert_eq!(affine.len(), 6);
        for (i, block) in affine.iter().enumerate() {
            let freed = crate::model::ipam::nth_ip(block, 2);
            assert_eq!(ipam.release_ips(&[freed]).await.unwrap(), vec![freed]);
            let again = ipam
                .auto_assign(&args(&format!("again-{i}"), "node-a", 1))
                .await
                .unwrap();
            assert_eq!(again, vec![freed], "block {i} of 6");
            assert_eq!(ipam.affine_blocks("node-a", false).await.unwrap().len(), 6);
        }
        // All full again: the next address claims a seventh block.
        let new = ipam.auto_assign(&args("new", "node-a", 1)).await.unwrap();
        let affine = ipam.affine_blocks("node-a", false).await.unwrap();
        assert_eq!(affine.len(), 7);
        assert!(affine.iter().filter(|b| b.contains(&new[0])).count() == 1);
    }
}
