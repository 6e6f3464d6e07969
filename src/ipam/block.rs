//! Operations on one allocation block (REFERENCE §3), pure: assign from the head of
//! `unallocated`, release to its tail (a freed address is not reused at once), attributes
//! shared between allocations of the same handle, and a sequence number bumped on every
//! change so a release can tell that an address was reused meanwhile.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

// A block's address arithmetic lives with the block record in the model (the model's
// `borrowed` needs it too).
use crate::model::ipam::{AllocationAttribute, AllocationBlock, nth_ip, ordinal_in};

impl AllocationBlock {
    /// A new, empty block: every ordinal free, in order.
    pub fn new_empty(cidr: IpNet, host: Option<&str>, sequence: u64) -> Self {
        let size = 1usize << (cidr.max_prefix_len() - cidr.prefix_len());
        AllocationBlock {
            cidr: cidr.to_string(),
            affinity: host.map(|h| format!("host:{h}")),
            affinity_claim_time: None,
            allocations: vec![None; size],
            unallocated: (0..size).collect(),
            attributes: Vec::new(),
            sequence_number: sequence,
            sequence_number_for_allocation: Some(BTreeMap::new()),
            deleted: false,
            host_affinity: None,
            unknown: Default::default(),
        }
    }

    /// The block's network (stored blocks always parse; a corrupt one is treated as full).
    pub fn net(&self) -> Option<IpNet> {
        self.cidr.parse().ok()
    }

    /// Free addresses.
    pub fn free(&self) -> usize {
        self.unallocated.len()
    }

    /// Addresses in use.
    pub fn in_use(&self) -> usize {
        self.allocations.iter().filter(|a| a.is_some()).count()
    }

    /// No address in use.
    pub fn is_empty(&self) -> bool {
        self.in_use() == 0
    }

    fn attribute_index(&mut self, handle: Option<&str>, attrs: &BTreeMap<String, String>) -> usize {
        let want = AllocationAttribute {
            handle_id: handle.map(str::to_string),
            secondary: if attrs.is_empty() {
                None
            } else {
                Some(attrs.clone())
            },
            ..Default::default()
        };
        if let Some(i) = self.attributes.iter().position(|a| *a == want) {
            return i;
        }
        self.attributes.push(want);
        self.attributes.len() - 1
    }

    fn record(&mut self, ordinal: usize, attr: usize) {
        self.allocations[ordinal] = Some(attr);
        self.sequence_number += 1;
        let seq = self.sequence_number;
        self.sequence_number_for_allocation
            .get_or_insert_with(BTreeMap::new)
            .insert(ordinal.to_string(), seq);
    }

    /// Take up to `n` free addresses from the head of `unallocated`.
    pub fn assign(
        &mut self,
        n: usize,
        handle: Option<&str>,
        attrs: &BTreeMap<String, String>,
    ) -> Vec<IpAddr> {
        let Some(net) = self.net() else {
            return Vec::new();
        };
        let take = n.min(self.unallocated.len());
        if take == 0 {
            return Vec::new();
        }
        let attr = self.attribute_index(handle, attrs);
        let ordinals: Vec<usize> = self.unallocated.drain(..take).collect();
        for &o in &ordinals {
            self.record(o, attr);
        }
        ordinals.into_iter().map(|o| nth_ip(&net, o)).collect()
    }

    /// Take one specific address; false if it is outside the block or in use.
    pub fn assign_ip(
        &mut self,
        ip: IpAddr,
        handle: Option<&str>,
        attrs: &BTreeMap<String, String>,
    ) -> bool {
        let Some(o) = self.net().and_then(|n| ordinal_in(&n, ip)) else {
            return false;
        };
        let Some(pos) = self.unallocated.iter().position(|&u| u == o) else {
            return false;
        };
        self.unallocated.remove(pos);
        let attr = self.attribute_index(handle, attrs);
        self.record(o, attr);
        true
    }

    /// The handle holding `ip`, if allocated.
    pub fn handle_of(&self, ip: IpAddr) -> Option<Option<&str>> {
        let o = ordinal_in(&self.net()?, ip)?;
        let a = (*self.allocations.get(o)?)?;
        Some(self.attributes.get(a).and_then(|a| a.handle_id.as_deref()))
    }

    /// The handles of the addresses allocated for `node` (the allocation's `node`
    /// attribute, which Calico's CNI plugin and tunnel allocator write), each once. An
    /// allocation without that attribute belongs to no node as far as a node-scoped
    /// clean-up can tell, so it is not listed.
    pub fn handles_on_node<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        let mut live: Vec<usize> = self.allocations.iter().flatten().copied().collect();
        live.sort_unstable();
        live.dedup();
        live.into_iter().filter_map(move |i| {
            let a = self.attributes.get(i)?;
            let on_node = a.secondary.as_ref()?.get("node")? == node;
            on_node.then_some(a.handle_id.as_deref()?)
        })
    }

    /// The sequence number recorded when `ip` was allocated.
    pub fn sequence_of(&self, ip: IpAddr) -> Option<u64> {
        let o = ordinal_in(&self.net()?, ip)?;
        self.sequence_number_for_allocation
            .as_ref()?
            .get(&o.to_string())
            .copied()
    }

    /// Every allocated address of `handle`.
    pub fn ips_of_handle(&self, handle: &str) -> Vec<IpAddr> {
        let Some(net) = self.net() else {
            return Vec::new();
        };
        self.allocations
            .iter()
            .enumerate()
            .filter(|(_, a)| {
                a.and_then(|i| self.attributes.get(i))
                    .and_then(|a| a.handle_id.as_deref())
                    == Some(handle)
            })
            .map(|(o, _)| nth_ip(&net, o))
            .collect()
    }

    /// Release addresses (those not allocated are ignored). Returns, per handle, how many
    /// addresses were released, so the handles can be decremented.
    pub fn release(&mut self, ips: &[IpAddr]) -> BTreeMap<String, u64> {
        let mut per_handle = BTreeMap::new();
        let Some(net) = self.net() else {
            return per_handle;
        };
        let mut changed = false;
        for &ip in ips {
            let Some(o) = ordinal_in(&net, ip) else {
                continue;
            };
            let Some(attr) = self.allocations.get(o).copied().flatten() else {
                continue;
            };
            if let Some(h) = self.attributes.get(attr).and_then(|a| a.handle_id.clone()) {
                *per_handle.entry(h).or_insert(0) += 1;
            }
            self.allocations[o] = None;
            self.unallocated.push(o);
            if let Some(m) = self.sequence_number_for_allocation.as_mut() {
                m.remove(&o.to_string());
            }
            changed = true;
        }
        if changed {
            self.sequence_number += 1;
            self.drop_unused_attributes();
        }
        per_handle
    }

    /// Remove attributes no allocation refers to, renumbering the references.
    fn drop_unused_attributes(&mut self) {
        let mut used = vec![false; self.attributes.len()];
        for a in self.allocations.iter().flatten() {
            if let Some(u) = used.get_mut(*a) {
                *u = true;
            }
        }
        let mut remap = vec![None; self.attributes.len()];
        let mut kept = Vec::new();
        for (i, attr) in std::mem::take(&mut self.attributes).into_iter().enumerate() {
            if used[i] {
                remap[i] = Some(kept.len());
                kept.push(attr);
            }
        }
        self.attributes = kept;
        for a in self.allocations.iter_mut() {
            if let Some(i) = a {
                *a = remap.get(*i).copied().flatten();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(pod: &str) -> BTreeMap<String, String> {
        BTreeMap::from([("pod".to_string(), pod.to_string())])
    }

    fn block() -> AllocationBlock {
        AllocationBlock::new_empty("10.65.0.0/30".parse().unwrap(), Some("node-1"), 100)
    }

    #[test]
    fn new_block_is_all_free_in_order() {
        let b = block();
        assert_eq!(b.unallocated, vec![0, 1, 2, 3]);
        assert_eq!(b.allocations, vec![None; 4]);
        assert_eq!(b.host(), Some("node-1"));
        assert!(b.is_empty());
    }

    #[test]
    fn assign_takes_from_the_head_and_release_returns_to_the_tail() {
        let mut b = block();
        let a = b.assign(2, Some("h1"), &attrs("p1"));
        assert_eq!(
            a,
            vec![
                "10.65.0.0".parse::<IpAddr>().unwrap(),
                "10.65.0.1".parse().unwrap()
            ]
        );
        assert_eq!(b.unallocated, vec![2, 3]);
        let released = b.release(&[a[0]]);
        assert_eq!(released, BTreeMap::from([("h1".to_string(), 1)]));
        assert_eq!(
            b.unallocated,
            vec![2, 3, 0],
            "a freed address goes to the tail"
        );
        let next = b.assign(1, Some("h2"), &attrs("p2"));
        assert_eq!(
            next,
            vec!["10.65.0.2".parse::<IpAddr>().unwrap()],
            "not reused at once"
        );
    }

    #[test]
    fn attributes_are_shared_and_garbage_collected() {
        let mut b = block();
        let a1 = b.assign(1, Some("h1"), &attrs("p1"));
        let a2 = b.assign(1, Some("h2"), &attrs("p2"));
        b.assign(1, Some("h1"), &attrs("p1"));
        assert_eq!(b.attributes.len(), 2);
        assert_eq!(b.ips_of_handle("h1").len(), 2);
        b.release(&a1);
        b.release(&a2);
        assert_eq!(b.attributes.len(), 1, "h2's attribute is gone");
        assert_eq!(b.attributes[0].handle_id.as_deref(), Some("h1"));
        assert_eq!(b.allocations[2], Some(0), "references renumbered");
        assert_eq!(b.handle_of("10.65.0.2".parse().unwrap()), Some(Some("h1")));
    }

    #[test]
    fn sequence_numbers_track_each_allocation() {
        let mut b = block();
        let ip = b.assign(1, Some("h1"), &BTreeMap::new())[0];
        let seq = b.sequence_of(ip).unwrap();
        assert!(seq > 100);
        b.release(&[ip]);
        assert_eq!(b.sequence_of(ip), None);
        assert!(b.sequence_number > seq);
    }

    #[test]
    fn specific_ip_and_full_block() {
        let mut b = block();
        assert!(b.assign_ip("10.65.0.3".parse().unwrap(), Some("h"), &BTreeMap::new()));
        assert!(
            !b.assign_ip("10.65.0.3".parse().unwrap(), Some("h"), &BTreeMap::new()),
            "already in use"
        );
        assert!(
            !b.assign_ip("10.66.0.1".parse().unwrap(), Some("h"), &BTreeMap::new()),
            "outside"
        );
        assert_eq!(b.assign(10, Some("h"), &BTreeMap::new()).len(), 3);
        assert!(b.assign(1, Some("h"), &BTreeMap::new()).is_empty());
        assert_eq!(b.free(), 0);
    }

    #[test]
    fn ipv6_blocks_work() {
        let mut b = AllocationBlock::new_empty("fd00::/126".parse().unwrap(), None, 0);
        let a = b.assign(2, None, &BTreeMap::new());
        assert_eq!(a[1], "fd00::1".parse::<IpAddr>().unwrap());
        assert_eq!(
            ordinal_in(&"fd00::/126".parse().unwrap(), "fd00::3".parse().unwrap()),
            Some(3)
        );
    }
}
