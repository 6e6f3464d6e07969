//! IPAM v2 records as Calico stores them in etcd (REFERENCE §1): allocation blocks,
//! block affinities, handles and the IPAM configuration. The allocator lives in `src/ipam`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Attributes of one allocation: its handle and free-form secondary attributes
/// (`node`, `pod`, `namespace`, `timestamp`, `type`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AllocationAttribute {
    #[serde(rename = "handle_id")]
    pub handle_id: Option<String>,
    #[serde(default)]
    pub secondary: Option<BTreeMap<String, String>>,
}

/// An allocation block (`/calico/ipam/v2/assignment/ipv4/block/<cidr>`), fields in
/// Calico's order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AllocationBlock {
    pub cidr: String,
    /// `host:<node>` or null.
    pub affinity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity_claim_time: Option<String>,
    /// One entry per address: index into `attributes`, or null when free.
    pub allocations: Vec<Option<usize>>,
    /// Free ordinals, allocated from the head, released to the tail.
    pub unallocated: Vec<usize>,
    pub attributes: Vec<AllocationAttribute>,
    #[serde(default)]
    pub sequence_number: u64,
    #[serde(default)]
    pub sequence_number_for_allocation: Option<BTreeMap<String, u64>>,
    #[serde(default)]
    pub deleted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_affinity: Option<String>,
}

impl AllocationBlock {
    /// The node this block is affine to, if any.
    pub fn host(&self) -> Option<&str> {
        self.affinity.as_deref()?.strip_prefix("host:")
    }

    /// The addresses of this block held for another node than the block's own (borrowed
    /// addresses), each with that node's name (the allocation's `node` attribute).
    pub fn borrowed(&self) -> Vec<(ipnet::IpNet, String)> {
        let Ok(cidr) = self.cidr.parse::<ipnet::IpNet>() else {
            return Vec::new();
        };
        let owner = self.host();
        let mut out = Vec::new();
        for (ordinal, attr) in self.allocations.iter().enumerate() {
            let Some(node) = attr
                .and_then(|i| self.attributes.get(i))
                .and_then(|a| a.secondary.as_ref())
                .and_then(|s| s.get("node"))
            else {
                continue;
            };
            if Some(node.as_str()) == owner || ordinal as u128 >= hosts(&cidr) {
                continue;
            }
            let ip = crate::ipam::block::nth_ip(&cidr, ordinal);
            out.push((ipnet::IpNet::from(ip), node.clone()));
        }
        out
    }
}

/// How many addresses a network holds (saturating for IPv6).
fn hosts(net: &ipnet::IpNet) -> u128 {
    let bits = u32::from(net.max_prefix_len() - net.prefix_len());
    1u128.checked_shl(bits).unwrap_or(u128::MAX)
}

/// State of a block affinity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AffinityState {
    #[default]
    Confirmed,
    Pending,
    PendingDeletion,
}

/// A block affinity (`/calico/ipam/v2/host/<node>/ipv4/block/<cidr>`). An empty value
/// means confirmed (older Calico wrote nothing).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BlockAffinity {
    #[serde(default)]
    pub state: AffinityState,
    #[serde(default)]
    pub deleted: bool,
}

impl BlockAffinity {
    /// Decode an affinity value, treating an empty value as confirmed.
    pub fn from_bytes(v: &[u8]) -> Result<Self, serde_json::Error> {
        if v.iter().all(u8::is_ascii_whitespace) {
            Ok(BlockAffinity::default())
        } else {
            serde_json::from_slice(v)
        }
    }
}

/// An IPAM handle (`/calico/ipam/v2/handle/<id>`): how many addresses it holds per block.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IPAMHandle {
    pub block: BTreeMap<String, u64>,
    #[serde(default)]
    pub deleted: bool,
}

/// The IPAM configuration (`/calico/ipam/v2/config`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IPAMConfig {
    #[serde(
        default,
        rename = "strict_affinity",
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub strict_affinity: bool,
    #[serde(
        default = "yes",
        rename = "auto_allocate_blocks",
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub auto_allocate_blocks: bool,
    /// 0 means the default (20 here, as REFERENCE §1 says).
    #[serde(default, rename = "maxBlocksPerHost", skip_serializing_if = "is_zero")]
    pub max_blocks_per_host: u32,
}

fn yes() -> bool {
    true
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

impl Default for IPAMConfig {
    fn default() -> Self {
        IPAMConfig {
            strict_affinity: false,
            auto_allocate_blocks: true,
            max_blocks_per_host: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_json_has_calicos_field_names_and_order() {
        let b = AllocationBlock {
            cidr: "10.65.0.0/30".into(),
            affinity: Some("host:node-1".into()),
            allocations: vec![Some(0), None, None, None],
            unallocated: vec![1, 2, 3],
            attributes: vec![AllocationAttribute {
                handle_id: Some("k8s-pod-network.abc".into()),
                secondary: Some(BTreeMap::from([("node".into(), "node-1".into())])),
            }],
            sequence_number: 7,
            sequence_number_for_allocation: Some(BTreeMap::from([("0".into(), 6)])),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_string(&b).unwrap(),
            r#"{"cidr":"10.65.0.0/30","affinity":"host:node-1","allocations":[0,null,null,null],"unallocated":[1,2,3],"attributes":[{"handle_id":"k8s-pod-network.abc","secondary":{"node":"node-1"}}],"sequenceNumber":7,"sequenceNumberForAllocation":{"0":6},"deleted":false}"#
        );
        assert_eq!(b.host(), Some("node-1"));
    }

    #[test]
    fn empty_affinity_value_means_confirmed() {
        assert_eq!(
            BlockAffinity::from_bytes(b"").unwrap().state,
            AffinityState::Confirmed
        );
        let a =
            BlockAffinity::from_bytes(br#"{"state":"pendingDeletion","deleted":false}"#).unwrap();
        assert_eq!(a.state, AffinityState::PendingDeletion);
        assert_eq!(
            serde_json::to_string(&BlockAffinity {
                state: AffinityState::Pending,
                deleted: false
            })
            .unwrap(),
            r#"{"state":"pending","deleted":false}"#
        );
    }

    #[test]
    fn ipam_config_omits_defaults_like_calico() {
        let c = IPAMConfig {
            strict_affinity: true,
            auto_allocate_blocks: true,
            max_blocks_per_host: 4,
        };
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            r#"{"strict_affinity":true,"auto_allocate_blocks":true,"maxBlocksPerHost":4}"#
        );
        assert_eq!(
            serde_json::from_str::<IPAMConfig>("{}").unwrap(),
            IPAMConfig::default()
        );
    }
}
