//! IPAM v2 records as Calico stores them in etcd (REFERENCE §1): allocation blocks,
//! block affinities, handles and the IPAM configuration. The allocator lives in `src/ipam`.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::stored::{UnknownFields, decode_lenient, encode_with};

/// Attributes of one allocation: its handle and free-form secondary attributes
/// (`node`, `pod`, `namespace`, `timestamp`, `type`). Newer Calico's `alternateOwnerAttrs`
/// (live migration) and `releasedAt` (release cooldown) are carried as they are, so our
/// block writes keep them. (Other unknown fields are not kept here: the attribute list is
/// compacted and renumbered on release, so a field remembered by its index could land on
/// another allocation's attribute.)
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AllocationAttribute {
    #[serde(rename = "handle_id")]
    pub handle_id: Option<String>,
    #[serde(default)]
    pub secondary: Option<BTreeMap<String, String>>,
    #[serde(
        default,
        rename = "alternateOwnerAttrs",
        skip_serializing_if = "Option::is_none"
    )]
    pub alternate_owner_attrs: Option<BTreeMap<String, String>>,
    #[serde(
        default,
        rename = "releasedAt",
        skip_serializing_if = "Option::is_none"
    )]
    pub released_at: Option<String>,
}

/// An allocation block (`/calico/ipam/v2/assignment/ipv4/block/<cidr>`), fields in
/// Calico's order. Fields of a newer Calico are kept in `unknown` and written back
/// ([`AllocationBlock::decode`], [`AllocationBlock::to_bytes`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AllocationBlock {
    pub cidr: String,
    /// `host:<node>` or null.
    pub affinity: Option<String>,
    /// Calico's JSON name is snake case here (`affinity_claim_time`), unlike its neighbours.
    #[serde(
        default,
        rename = "affinity_claim_time",
        skip_serializing_if = "Option::is_none"
    )]
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
    /// Fields of the stored value this version does not model.
    #[serde(skip)]
    pub unknown: UnknownFields,
}

/// Smallest block prefix (largest block) Calico's pools allow: /20 for IPv4, /116 for
/// IPv6 (pool `blockSize`, REFERENCE §2), i.e. at most 4096 addresses per block.
const MIN_BLOCK_PREFIX_V4: u8 = 20;
const MIN_BLOCK_PREFIX_V6: u8 = 116;

impl AllocationBlock {
    /// Decode a stored block (keeping a newer Calico's fields) and check it is consistent
    /// ([`AllocationBlock::check`]): a corrupt block is reported by key and never used.
    pub fn decode(key_cidr: Option<&ipnet::IpNet>, bytes: &[u8]) -> Result<Self, String> {
        let (mut b, unknown) =
            decode_lenient::<AllocationBlock>(bytes).map_err(|e| e.to_string())?;
        b.unknown = unknown;
        b.check(key_cidr)?;
        Ok(b)
    }

    /// The stored JSON, with the unknown fields the block was read with.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode_with(self, &self.unknown)
    }

    /// Whether the block is consistent enough to use: its CIDR parses, is the one its key
    /// names and has a size Calico allows; one allocation entry per address; every
    /// allocation points at an existing attribute; every free ordinal is inside the block,
    /// listed once and not allocated. Calico's allocator would index out of range (or
    /// hand out an address twice) on such a block; here it is refused with the reason.
    pub fn check(&self, key_cidr: Option<&ipnet::IpNet>) -> Result<(), String> {
        let cidr: ipnet::IpNet = self
            .cidr
            .parse()
            .map_err(|_| format!("cidr '{}' is not a CIDR", self.cidr))?;
        if let Some(k) = key_cidr
            && *k != cidr
        {
            return Err(format!("cidr {cidr} is not the block its key names ({k})"));
        }
        let min = match cidr {
            ipnet::IpNet::V4(_) => MIN_BLOCK_PREFIX_V4,
            ipnet::IpNet::V6(_) => MIN_BLOCK_PREFIX_V6,
        };
        if cidr.prefix_len() < min {
            return Err(format!(
                "block size /{} is out of range (/{min} to /{})",
                cidr.prefix_len(),
                cidr.max_prefix_len()
            ));
        }
        let size = 1usize << (cidr.max_prefix_len() - cidr.prefix_len());
        if self.allocations.len() != size {
            return Err(format!(
                "allocations has {} entries, the block has {size} addresses",
                self.allocations.len()
            ));
        }
        for (ordinal, a) in self.allocations.iter().enumerate() {
            if let Some(i) = a
                && *i >= self.attributes.len()
            {
                return Err(format!(
                    "allocations[{ordinal}] points at attribute {i}, there are {}",
                    self.attributes.len()
                ));
            }
        }
        let mut listed = vec![false; size];
        for &o in &self.unallocated {
            let Some(seen) = listed.get_mut(o) else {
                return Err(format!(
                    "unallocated ordinal {o} is outside the block (0..{size})"
                ));
            };
            if *seen {
                return Err(format!("unallocated lists ordinal {o} twice"));
            }
            *seen = true;
            if self.allocations[o].is_some() {
                return Err(format!("ordinal {o} is both unallocated and allocated"));
            }
        }
        Ok(())
    }
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
            let ip = nth_ip(&cidr, ordinal);
            out.push((ipnet::IpNet::from(ip), node.clone()));
        }
        out
    }
}

/// The address `n` positions after the start of `net`.
pub fn nth_ip(net: &IpNet, n: usize) -> IpAddr {
    match net {
        IpNet::V4(v4) => IpAddr::V4((u32::from(v4.network()).wrapping_add(n as u32)).into()),
        IpNet::V6(v6) => IpAddr::V6((u128::from(v6.network()).wrapping_add(n as u128)).into()),
    }
}

/// How far `ip` lies into `net`, if inside.
pub fn ordinal_in(net: &IpNet, ip: IpAddr) -> Option<usize> {
    if !net.contains(&ip) {
        return None;
    }
    match (net, ip) {
        (IpNet::V4(n), IpAddr::V4(a)) => Some((u32::from(a) - u32::from(n.network())) as usize),
        (IpNet::V6(n), IpAddr::V6(a)) => {
            usize::try_from(u128::from(a) - u128::from(n.network())).ok()
        }
        _ => None,
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
/// Fields of a newer Calico are kept in `unknown` and written back.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IPAMHandle {
    pub block: BTreeMap<String, u64>,
    #[serde(default)]
    pub deleted: bool,
    /// Fields of the stored value this version does not model.
    #[serde(skip)]
    pub unknown: UnknownFields,
}

impl IPAMHandle {
    /// Decode a stored handle, keeping a newer Calico's fields.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let (mut h, unknown) = decode_lenient::<IPAMHandle>(bytes).map_err(|e| e.to_string())?;
        h.unknown = unknown;
        Ok(h)
    }

    /// The stored JSON, with the unknown fields the handle was read with.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode_with(self, &self.unknown)
    }
}

/// The IPAM configuration (`/calico/ipam/v2/config`). Fields of a newer Calico
/// (`ipCooldownSeconds`, `kubeVirtVMAddressPersistence`) are kept in `unknown`, so
/// `calicoctl ipam configure` (a read-modify-write) does not strip them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
    /// Fields of the stored value this version does not model.
    #[serde(skip)]
    pub unknown: UnknownFields,
}

impl IPAMConfig {
    /// Decode the stored configuration, keeping a newer Calico's fields.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let (mut c, unknown) = decode_lenient::<IPAMConfig>(bytes).map_err(|e| e.to_string())?;
        c.unknown = unknown;
        Ok(c)
    }

    /// The stored JSON, with the unknown fields the configuration was read with.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode_with(self, &self.unknown)
    }
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
            unknown: UnknownFields::default(),
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
                ..Default::default()
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

    fn stored_block() -> serde_json::Value {
        serde_json::json!({"cidr":"10.65.0.0/30","affinity":"host:node-1",
            "allocations":[0,null,null,null],"unallocated":[1,2,3],
            "attributes":[{"handle_id":"k8s-pod-network.abc","secondary":{"node":"node-1"}}],
            "sequenceNumber":7,"sequenceNumberForAllocation":{"0":6},"deleted":false})
    }

    fn check(edit: impl Fn(&mut serde_json::Value)) -> Result<AllocationBlock, String> {
        let mut v = stored_block();
        edit(&mut v);
        let key: ipnet::IpNet = "10.65.0.0/30".parse().unwrap();
        AllocationBlock::decode(Some(&key), &serde_json::to_vec(&v).unwrap())
    }

    #[test]
    fn corrupt_blocks_are_refused_with_the_reason() {
        use serde_json::json;
        assert!(check(|_| {}).is_ok());
        type Edit = Box<dyn Fn(&mut serde_json::Value)>;
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|v| v["allocations"] = json!([0, null])),
                "allocations has 2 entries, the block has 4 addresses",
            ),
            (
                Box::new(|v| v["allocations"][2] = json!(3)),
                "allocations[2] points at attribute 3, there are 1",
            ),
            (
                Box::new(|v| v["unallocated"] = json!([1, 2, 3, 0])),
                "ordinal 0 is both unallocated and allocated",
            ),
            (
                Box::new(|v| v["unallocated"] = json!([1, 2, 9])),
                "unallocated ordinal 9 is outside the block (0..4)",
            ),
            (
                Box::new(|v| v["unallocated"] = json!([1, 1, 2])),
                "unallocated lists ordinal 1 twice",
            ),
            (
                Box::new(|v| v["cidr"] = json!("10.65.0.4/30")),
                "cidr 10.65.0.4/30 is not the block its key names (10.65.0.0/30)",
            ),
            (
                Box::new(|v| v["cidr"] = json!("banana")),
                "cidr 'banana' is not a CIDR",
            ),
            (
                Box::new(|v| v["allocations"][1] = json!(-1)),
                "error with field allocations[1]: invalid value: integer `-1`, expected usize",
            ),
        ];
        for (edit, want) in cases {
            let got = check(edit).unwrap_err();
            assert!(got.starts_with(want), "{got}");
        }
        let huge = AllocationBlock::decode(
            None,
            br#"{"cidr":"10.0.0.0/8","allocations":[],"unallocated":[],"attributes":[]}"#,
        );
        assert_eq!(
            huge.unwrap_err(),
            "block size /8 is out of range (/20 to /32)"
        );
    }

    #[test]
    fn a_newer_calicos_block_fields_survive_a_write() {
        let mut v = stored_block();
        v["futureField"] = serde_json::json!({"x": 1});
        v["affinity_claim_time"] = serde_json::json!("2026-08-22T06:33:20Z");
        v["attributes"][0]["releasedAt"] = serde_json::json!("2026-08-22T06:34:00Z");
        v["attributes"][0]["alternateOwnerAttrs"] = serde_json::json!({"pod": "old-0"});
        let mut b = check(|x| *x = v.clone()).unwrap();
        b.unallocated.pop();
        let back: serde_json::Value = serde_json::from_slice(&b.to_bytes()).unwrap();
        v["unallocated"] = serde_json::json!([1, 2]);
        assert_eq!(back, v);
        let h =
            IPAMHandle::decode(br#"{"block":{"10.65.0.0/26":1},"deleted":false,"futureField":2}"#)
                .unwrap();
        assert!(
            String::from_utf8(h.to_bytes())
                .unwrap()
                .contains(r#""futureField":2"#)
        );
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
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            r#"{"strict_affinity":true,"auto_allocate_blocks":true,"maxBlocksPerHost":4}"#
        );
        assert_eq!(
            serde_json::from_str::<IPAMConfig>("{}").unwrap(),
            IPAMConfig::default()
        );
        // A newer Calico's settings survive a read-modify-write.
        let mut c = IPAMConfig::decode(
            br#"{"strict_affinity":true,"auto_allocate_blocks":true,"ipCooldownSeconds":30,"kubeVirtVMAddressPersistence":"Disabled"}"#,
        )
        .unwrap();
        c.max_blocks_per_host = 7;
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&c.to_bytes()).unwrap(),
            serde_json::json!({"strict_affinity":true,"auto_allocate_blocks":true,"maxBlocksPerHost":7,
                "ipCooldownSeconds":30,"kubeVirtVMAddressPersistence":"Disabled"})
        );
    }
}
