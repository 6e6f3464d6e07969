//! Release (REFERENCE §3): addresses go back to the tail of their block's free list (not
//! reused at once), a block left empty without affinity is deleted, the handles' counts
//! go down; a host's affinity is given up in Calico's order.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

use super::{CAS_RETRIES, Ipam, IpamError, IpamResult, decode_block, decode_handle};
use crate::datastore::DatastoreError;
use crate::model::ipam::{AffinityState, AllocationBlock, BlockAffinity};
use crate::model::keys;

impl Ipam {
    /// Release addresses. Returns those that were allocated (others are ignored).
    pub async fn release_ips(&self, ips: &[IpAddr]) -> IpamResult<Vec<IpAddr>> {
        let mut by_block: BTreeMap<IpNet, Vec<IpAddr>> = BTreeMap::new();
        let blocks = {
            let mut all = self.blocks(false).await?;
            all.extend(self.blocks(true).await?);
            all
        };
        for &ip in ips {
            if let Some((cidr, _)) = blocks.iter().find(|(c, _)| c.contains(&ip)) {
                by_block.entry(*cidr).or_default().push(ip);
            }
        }
        let mut released = Vec::new();
        for (cidr, ips) in by_block {
            released.extend(
                self.release_in_block(&cidr, |b| {
                    ips.iter()
                        .copied()
                        .filter(|ip| b.handle_of(*ip).is_some())
                        .collect()
                })
                .await?,
            );
        }
        Ok(released)
    }

    /// Release every address of a handle, then the handle. Returns the addresses.
    pub async fn release_by_handle(&self, handle: &str) -> IpamResult<Vec<IpAddr>> {
        let key = keys::handle_key(handle);
        let Some(kv) = self.ds.get(&key).await? else {
            return Ok(Vec::new());
        };
        let h = decode_handle(&kv)?;
        let mut released = Vec::new();
        // A corrupt block is passed over (named in the log, never written): the handle's
        // other addresses are still released, so a pod's DEL is not stuck on it, and the
        // handle record stays for what the corrupt block may still hold.
        let mut skipped_corrupt = false;
        for cidr in h.block.keys().filter_map(|c| c.parse::<IpNet>().ok()) {
            match self
                .release_in_block(&cidr, |b| b.ips_of_handle(handle))
                .await
            {
                Ok(ips) => released.extend(ips),
                Err(IpamError::Corrupt { key, reason }) => {
                    tracing::error!(block = %key, %reason, handle, "corrupt block: its addresses of this handle are not released");
                    skipped_corrupt = true;
                }
                Err(e) => return Err(e),
            }
        }
        // A handle still present had counts out of step (a crash between block and handle
        // writes): it owns nothing any more, so it goes. A concurrent change wins.
        if skipped_corrupt {
            return Ok(released);
        }
        if let Some(kv) = self.ds.get(&key).await? {
            match self.ds.delete(&key, Some(kv.mod_revision)).await {
                Ok(_) | Err(DatastoreError::NotFound { .. } | DatastoreError::Conflict { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(released)
    }

    /// Release the addresses `pick` chooses in one block (CAS, retried); delete the block
    /// when it is left empty without affinity; decrement the handles.
    async fn release_in_block<F>(&self, cidr: &IpNet, pick: F) -> IpamResult<Vec<IpAddr>>
    where
        F: Fn(&AllocationBlock) -> Vec<IpAddr>,
    {
        let key = keys::block_key(cidr);
        for _ in 0..CAS_RETRIES {
            let Some(kv) = self.ds.get(&key).await? else {
                return Ok(Vec::new());
            };
            let mut block = decode_block(&kv)?;
            let ips = pick(&block);
            if ips.is_empty() {
                return Ok(ips);
            }
            let per_handle = block.release(&ips);
            let written = if block.is_empty() && block.affinity.is_none() {
                self.ds.delete(&key, Some(kv.mod_revision)).await.map(|_| 0)
            } else {
                self.ds
                    .update(&key, block.to_bytes(), kv.mod_revision)
                    .await
            };
            match written {
                Ok(_) => {
                    for (h, n) in per_handle {
                        self.handle_add(&h, cidr, -(n as i64)).await?;
                    }
                    return Ok(ips);
                }
                Err(DatastoreError::Conflict { .. } | DatastoreError::NotFound { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(IpamError::TooManyConflicts { key })
    }

    /// Release addresses of one block only where each still carries the given sequence
    /// number (None: any), so an address handed out again meanwhile is left alone.
    pub async fn release_if_unchanged(
        &self,
        block: &IpNet,
        ips: &[(IpAddr, Option<u64>)],
    ) -> IpamResult<Vec<IpAddr>> {
        let ips = ips.to_vec();
        self.release_in_block(block, move |b| {
            ips.iter()
                .filter(|(ip, seq)| {
                    b.handle_of(*ip).is_some() && (seq.is_none() || b.sequence_of(*ip) == *seq)
                })
                .map(|(ip, _)| *ip)
                .collect()
        })
        .await
    }

    /// Release a host's affinity to a block (Calico's order): mark it `pendingDeletion`,
    /// delete the block if it is empty, then delete the affinity. A block still in use
    /// keeps its affinity (returns false) until its addresses are freed.
    pub async fn release_affinity_if_empty(&self, host: &str, block: &IpNet) -> IpamResult<bool> {
        let aff_key = keys::affinity_key(host, block);
        let block_key = keys::block_key(block);
        if let Some(kv) = self.ds.get(&block_key).await? {
            let b = decode_block(&kv)?;
            if !b.is_empty() {
                return Ok(false);
            }
        }
        let Some(aff) = self.ds.get(&aff_key).await? else {
            return Ok(false);
        };
        let pending = serde_json::to_vec(&BlockAffinity {
            state: AffinityState::PendingDeletion,
            deleted: false,
        })
        .expect("serializes");
        let rev = match self.ds.update(&aff_key, pending, aff.mod_revision).await {
            Ok(r) => r,
            Err(DatastoreError::Conflict { .. } | DatastoreError::NotFound { .. }) => {
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        };
        if let Some(kv) = self.ds.get(&block_key).await? {
            let b = decode_block(&kv)?;
            if !b.is_empty() || b.host() != Some(host) {
                // An address was assigned meanwhile: give the affinity back.
                let confirmed = serde_json::to_vec(&BlockAffinity::default()).expect("serializes");
                let _ = self.ds.update(&aff_key, confirmed, rev).await;
                return Ok(false);
            }
            match self.ds.delete(&block_key, Some(kv.mod_revision)).await {
                Ok(_) | Err(DatastoreError::NotFound { .. }) => {}
                Err(DatastoreError::Conflict { .. }) => return Ok(false),
                Err(e) => return Err(e.into()),
            }
        }
        match self.ds.delete(&aff_key, Some(rev)).await {
            Ok(_) | Err(DatastoreError::NotFound { .. }) => Ok(true),
            Err(DatastoreError::Conflict { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{args, setup};
    use super::super::*;
    use super::*;

    #[tokio::test]
    async fn release_by_handle_removes_handle_and_empty_unaffine_blocks() {
        let (ipam, mem) = setup(&[("p", "10.65.0.0/26", 28)]).await;
        ipam.set_config(&IPAMConfig {
            max_blocks_per_host: 1,
            ..Default::default()
        })
        .await
        .unwrap();
        ipam.auto_assign(&args("b", "node-b", 2)).await.unwrap();
        ipam.auto_assign(&args("a", "node-a", 16)).await.unwrap();
        let borrowed = ipam.auto_assign(&args("a2", "node-a", 1)).await.unwrap();
        let released = ipam.release_by_handle("a2").await.unwrap();
        assert_eq!(released, borrowed);
        assert!(mem.get(&keys::handle_key("a2")).await.unwrap().is_none());
        // node-b's block keeps its affinity, so it stays even when emptied.
        ipam.release_by_handle("b").await.unwrap();
        assert_eq!(ipam.blocks(false).await.unwrap().len(), 2);
        assert!(mem.get(&keys::handle_key("b")).await.unwrap().is_none());
        // A non-affine block (made by assign_ip) is deleted when emptied.
        let taken: Vec<IpNet> = ipam
            .blocks(false)
            .await
            .unwrap()
            .into_iter()
            .map(|(c, _)| c)
            .collect();
        let free_block = [
            "10.65.0.0/28",
            "10.65.0.16/28",
            "10.65.0.32/28",
            "10.65.0.48/28",
        ]
        .iter()
        .map(|c| c.parse::<IpNet>().unwrap())
        .find(|c| !taken.contains(c))
        .unwrap();
        let ip = crate::model::ipam::nth_ip(&free_block, 2);
        ipam.assign_ip(ip, "manual", &BTreeMap::new())
            .await
            .unwrap();
        assert_eq!(ipam.blocks(false).await.unwrap().len(), 3);
        assert_eq!(ipam.release_ips(&[ip]).await.unwrap(), vec![ip]);
        assert_eq!(ipam.blocks(false).await.unwrap().len(), 2);
        assert!(matches!(
            ipam.assign_ip("10.99.0.1".parse().unwrap(), "x", &BTreeMap::new())
                .await,
            Err(IpamError::NotInPool(_))
        ));
    }
}
