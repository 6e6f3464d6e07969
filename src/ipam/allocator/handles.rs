//! Handles (`/calico/ipam/v2/handle/<id>`): the count of a handle's addresses per block,
//! kept in step with the blocks (the block is written first, so a crash leaves a count
//! short, never an address without its handle named in the block), and the queries by
//! handle.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

use super::{CAS_RETRIES, Ipam, IpamError, IpamResult, decode_block, decode_handle};
use crate::datastore::DatastoreError;
use crate::model::ipam::IPAMHandle;
use crate::model::keys::{self, IpamKey};

impl Ipam {
    /// Add `delta` (may be negative) to a handle's count for a block; the handle is
    /// created at the first address and deleted when its last address goes.
    pub(super) async fn handle_add(
        &self,
        handle: &str,
        cidr: &IpNet,
        delta: i64,
    ) -> IpamResult<()> {
        let key = keys::handle_key(handle);
        let block = cidr.to_string();
        if delta > 0 {
            // A new handle (the usual case for a new pod) is one create, no read.
            let h = IPAMHandle {
                block: BTreeMap::from([(block.clone(), delta as u64)]),
                ..Default::default()
            };
            match self.ds.create(&key, h.to_bytes()).await {
                Ok(_) => return Ok(()),
                Err(DatastoreError::AlreadyExists { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        for _ in 0..CAS_RETRIES {
            let current = self.ds.get(&key).await?;
            let (mut h, rev) = match &current {
                Some(kv) => (decode_handle(kv)?, Some(kv.mod_revision)),
                None if delta < 0 => return Ok(()),
                None => (IPAMHandle::default(), None),
            };
            let count = h.block.get(&block).copied().unwrap_or(0) as i64 + delta;
            if count > 0 {
                h.block.insert(block.clone(), count as u64);
            } else {
                h.block.remove(&block);
            }
            let result = match (rev, h.block.is_empty()) {
                (Some(rev), true) => self.ds.delete(&key, Some(rev)).await.map(|_| 0),
                (Some(rev), false) => self.ds.update(&key, h.to_bytes(), rev).await,
                (None, true) => return Ok(()),
                (None, false) => self.ds.create(&key, h.to_bytes()).await,
            };
            match result {
                Ok(_) => return Ok(()),
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

    /// The addresses a handle holds.
    pub async fn ips_of_handle(&self, handle: &str) -> IpamResult<Vec<IpAddr>> {
        let Some(kv) = self.ds.get(&keys::handle_key(handle)).await? else {
            return Ok(Vec::new());
        };
        let h = decode_handle(&kv)?;
        let mut out = Vec::new();
        for cidr in h.block.keys().filter_map(|c| c.parse::<IpNet>().ok()) {
            if let Some(kv) = self.ds.get(&keys::block_key(&cidr)).await? {
                let b = decode_block(&kv)?;
                out.extend(b.ips_of_handle(handle));
            }
        }
        Ok(out)
    }

    /// Every handle ID starting with `prefix`.
    pub async fn handles(&self, prefix: &str) -> IpamResult<Vec<String>> {
        let (kvs, _) = self.ds.list(&keys::handle_key(prefix)).await?;
        Ok(kvs
            .iter()
            .filter_map(|kv| match keys::parse_ipam_key(&kv.key) {
                Some(IpamKey::Handle(id)) => Some(id),
                _ => None,
            })
            .collect())
    }

    /// Every handle starting with `prefix` that holds an address allocated for `node` (the
    /// allocation's `node` attribute), read from the blocks of both families. A handle
    /// record says nothing about the node, so a node-scoped clean-up (CNI GC) must start
    /// here rather than from [`Ipam::handles`]: pods of other nodes share the prefix.
    pub async fn handles_on_node(&self, prefix: &str, node: &str) -> IpamResult<BTreeSet<String>> {
        let (v4, v6) = tokio::join!(self.blocks(false), self.blocks(true));
        let mut out = BTreeSet::new();
        for (_, block) in v4?.iter().chain(v6?.iter()) {
            out.extend(
                block
                    .handles_on_node(node)
                    .filter(|h| h.starts_with(prefix))
                    .map(str::to_string),
            );
        }
        Ok(out)
    }
}
