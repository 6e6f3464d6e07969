//! IPAM leaks and their garbage collection. Calico leaves this to a separate controller
//! and users see pools run out (calico#2713); here the node agent and calicoctl own it.
//!
//! A leak is: an allocation whose handle has no live owner (a workload handle whose
//! address no WorkloadEndpoint lists; a tunnel handle of a node that no longer exists),
//! or an affinity (and its empty block) of a node that no longer exists. Something is
//! freed only when two observations at least `grace` apart both saw it, so an address
//! whose WorkloadEndpoint is being written (the CNI plugin allocates first) is never freed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use super::allocator::{Ipam, IpamResult};
use super::block::nth_ip;
use crate::datastore::Client;
use crate::model::ipam::AllocationBlock;
use crate::model::keys;
use crate::model::{NodeSpec, WorkloadEndpointSpec};

/// What the checker looks at.
#[derive(Debug, Clone, Default)]
pub struct IpamSnapshot {
    pub blocks: Vec<(IpNet, AllocationBlock)>,
    /// (host, block) of every affinity.
    pub affinities: Vec<(String, IpNet)>,
    pub nodes: HashSet<String>,
    /// Every address listed by a WorkloadEndpoint.
    pub endpoint_ips: HashSet<IpAddr>,
}

/// One leak.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Leak {
    /// An allocation nobody owns; `sequence` identifies this allocation (not a later one
    /// of the same address).
    Allocation {
        ip: IpAddr,
        block: IpNet,
        handle: Option<String>,
        sequence: Option<u64>,
        reason: String,
    },
    /// An affinity of a node that no longer exists.
    Affinity { host: String, block: IpNet },
}

impl std::fmt::Display for Leak {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Leak::Allocation {
                ip, handle, reason, ..
            } => {
                write!(
                    f,
                    "{ip} (handle {}): {reason}",
                    handle
                        .as_deref()
                        .map_or("none".to_string(), |h| format!("\"{h}\""))
                )
            }
            Leak::Affinity { host, block } => write!(
                f,
                "block {block} affine to node {host}, which does not exist"
            ),
        }
    }
}

fn tunnel_node(handle: &str) -> Option<&str> {
    handle
        .strip_prefix("ipip-tunnel-addr-")
        .or_else(|| handle.strip_prefix("vxlan-tunnel-addr-"))
}

/// Every leak in a snapshot (pure).
pub fn find_leaks(s: &IpamSnapshot) -> Vec<Leak> {
    let mut out = Vec::new();
    for (cidr, b) in &s.blocks {
        for (ord, a) in b.allocations.iter().enumerate() {
            let Some(attr) = a.and_then(|i| b.attributes.get(i)) else {
                continue;
            };
            let ip = nth_ip(cidr, ord);
            let handle = attr.handle_id.clone();
            let reason = match handle.as_deref().and_then(tunnel_node) {
                Some(node) if s.nodes.contains(node) => continue,
                Some(node) => format!("tunnel address of node {node}, which does not exist"),
                None if s.endpoint_ips.contains(&ip) => continue,
                None => "no WorkloadEndpoint has this address".to_string(),
            };
            let sequence = b.sequence_of(ip);
            out.push(Leak::Allocation {
                ip,
                block: *cidr,
                handle,
                sequence,
                reason,
            });
        }
    }
    for (host, block) in &s.affinities {
        if !s.nodes.contains(host) {
            out.push(Leak::Affinity {
                host: host.clone(),
                block: *block,
            });
        }
    }
    out.sort();
    out
}

/// Two-observation garbage collection (pure: time is passed in).
#[derive(Debug, Default)]
pub struct LeakTracker {
    seen: HashMap<Leak, Instant>,
}

impl LeakTracker {
    /// Record this observation; returns the leaks also seen at least `grace` ago.
    pub fn observe(&mut self, leaks: Vec<Leak>, now: Instant, grace: Duration) -> Vec<Leak> {
        let mut confirmed = Vec::new();
        let mut next = HashMap::new();
        for l in leaks {
            let first = self.seen.get(&l).copied().unwrap_or(now);
            if now.duration_since(first) >= grace && self.seen.contains_key(&l) {
                confirmed.push(l.clone());
            }
            next.insert(l, first);
        }
        self.seen = next;
        confirmed
    }
}

/// Read everything the checker needs.
pub async fn snapshot(ipam: &Ipam, client: &Client) -> IpamResult<IpamSnapshot> {
    let mut blocks = ipam.blocks(false).await?;
    blocks.extend(ipam.blocks(true).await?);
    let (kvs, _) = client
        .datastore()
        .list(&format!("{}host/", keys::IPAM_PREFIX))
        .await?;
    let affinities = kvs
        .iter()
        .filter_map(|kv| match keys::parse_ipam_key(&kv.key) {
            Some(keys::IpamKey::Affinity { host, cidr }) => Some((host, cidr)),
            _ => None,
        })
        .collect();
    let nodes = client
        .list::<NodeSpec>(None)
        .await?
        .0
        .into_iter()
        .map(|n| n.metadata.name)
        .collect();
    let endpoint_ips = client
        .list::<WorkloadEndpointSpec>(None)
        .await?
        .0
        .iter()
        .flat_map(|w| {
            w.spec
                .ip_networks
                .iter()
                .filter_map(|n| n.parse::<IpNet>().ok())
                .map(|n| n.addr())
        })
        .collect();
    Ok(IpamSnapshot {
        blocks,
        affinities,
        nodes,
        endpoint_ips,
    })
}

/// Free confirmed leaks. Allocations are released only if the address still carries the
/// observed sequence number (it was not released and handed out again meanwhile); an
/// affinity goes with its block when the block is empty. Returns what was freed.
pub async fn free(ipam: &Ipam, leaks: &[Leak]) -> IpamResult<Vec<Leak>> {
    let mut freed = Vec::new();
    let mut by_block: BTreeMap<IpNet, Vec<(IpAddr, Option<u64>)>> = BTreeMap::new();
    for l in leaks {
        if let Leak::Allocation {
            ip,
            block,
            sequence,
            ..
        } = l
        {
            by_block.entry(*block).or_default().push((*ip, *sequence));
        }
    }
    for (block, ips) in by_block {
        let released = ipam.release_if_unchanged(&block, &ips).await?;
        freed.extend(
            leaks
                .iter()
                .filter(|l| matches!(l, Leak::Allocation { ip, .. } if released.contains(ip)))
                .cloned(),
        );
    }
    for l in leaks {
        if let Leak::Affinity { host, block } = l
            && ipam.release_affinity_if_empty(host, block).await?
        {
            freed.push(l.clone());
        }
    }
    Ok(freed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap() -> IpamSnapshot {
        let cidr: IpNet = "10.65.0.0/30".parse().unwrap();
        let mut b = AllocationBlock::new_empty(cidr, Some("node-1"), 0);
        b.assign(1, Some("k8s-pod-network.live"), &BTreeMap::new());
        b.assign(1, Some("k8s-pod-network.dead"), &BTreeMap::new());
        b.assign(1, Some("vxlan-tunnel-addr-node-1"), &BTreeMap::new());
        b.assign(1, Some("ipip-tunnel-addr-node-gone"), &BTreeMap::new());
        IpamSnapshot {
            blocks: vec![(cidr, b)],
            affinities: vec![
                ("node-1".into(), cidr),
                ("node-gone".into(), "10.65.1.0/26".parse().unwrap()),
            ],
            nodes: HashSet::from(["node-1".to_string()]),
            endpoint_ips: HashSet::from(["10.65.0.0".parse().unwrap()]),
        }
    }

    #[test]
    fn leaks_are_found_with_their_reason() {
        let leaks: Vec<String> = find_leaks(&snap())
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            leaks,
            [
                "10.65.0.1 (handle \"k8s-pod-network.dead\"): no WorkloadEndpoint has this address",
                "10.65.0.3 (handle \"ipip-tunnel-addr-node-gone\"): tunnel address of node node-gone, which does not exist",
                "block 10.65.1.0/26 affine to node node-gone, which does not exist",
            ]
        );
    }

    #[test]
    fn only_leaks_seen_twice_grace_apart_are_confirmed() {
        let mut t = LeakTracker::default();
        let grace = Duration::from_secs(10);
        let t0 = Instant::now();
        let leaks = find_leaks(&snap());
        assert!(
            t.observe(leaks.clone(), t0, grace).is_empty(),
            "first sighting"
        );
        assert!(
            t.observe(leaks.clone(), t0 + Duration::from_secs(5), grace)
                .is_empty(),
            "too soon"
        );
        // The dead pod's endpoint appears (its CNI ADD finished): no longer a leak.
        let mut s = snap();
        s.endpoint_ips.insert("10.65.0.1".parse().unwrap());
        let confirmed = t.observe(find_leaks(&s), t0 + Duration::from_secs(11), grace);
        assert_eq!(confirmed.len(), 2);
        assert!(
            confirmed
                .iter()
                .all(|l| !l.to_string().contains("k8s-pod-network.dead"))
        );
        // A leak that disappears and comes back starts over.
        assert!(
            t.observe(vec![], t0 + Duration::from_secs(12), grace)
                .is_empty()
        );
        assert!(
            t.observe(leaks, t0 + Duration::from_secs(30), grace)
                .is_empty()
        );
    }
}
