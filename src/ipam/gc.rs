//! IPAM leaks and their garbage collection. Calico leaves this to a separate controller
//! and users see pools run out (calico#2713); here the node agent and calicoctl own it.
//!
//! A leak is: an allocation whose handle has no live owner (a workload handle whose
//! address no WorkloadEndpoint lists; a tunnel handle of a node that no longer exists),
//! or an affinity (and its empty block) of a node that no longer exists. Something is
//! freed only when two observations at least `grace` apart both saw it, so an address
//! whose WorkloadEndpoint is being written (the CNI plugin allocates first) is never freed.
//!
//! As Calico's kube-controllers (`kube-controllers/pkg/controllers/node/ipam.go`), only
//! what the CNI plugin and the node agent allocate is ever collected: workload addresses
//! (handle `<network>.<containerID>` with the plugin's `pod`/`namespace` or `node`
//! attributes) and tunnel addresses (of nodes that no longer exist). Another user of the
//! IPAM (another plugin's handle, an allocation without a handle, a reserved address) is
//! left alone, and a handle is a leak only when none of its addresses is in use.
//!
//! Who collects what: each node's collector looks at the blocks affine to it; the blocks
//! and affinities of nodes that no longer exist (and blocks with no affinity) are
//! collected by one node at a time, the holder of a lease in the datastore
//! ([`acquire_lease`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;

use super::allocator::{Ipam, IpamError, IpamResult};
use crate::datastore::client::decode_kv;
use crate::datastore::{Client, Datastore, DatastoreError, KeyValue};
use crate::model::ipam::AllocationBlock;
use crate::model::ipam::nth_ip;
use crate::model::keys;
use crate::model::{Kind, NodeSpec, WorkloadEndpointSpec};

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

/// The `type` attribute values of tunnel addresses (Calico's `ipam.AttributeType*`).
const TUNNEL_TYPES: [&str; 5] = [
    "ipipTunnelAddress",
    "vxlanTunnelAddress",
    "vxlanV6TunnelAddress",
    "wireguardTunnelAddress",
    "wireguardV6TunnelAddress",
];

/// The node whose tunnel address this is: by its handle (`ipip-tunnel-addr-<node>`, ...)
/// or by its `type` and `node` attributes, as Calico's kube-controllers tells them.
fn tunnel_node<'a>(handle: &'a str, attrs: &'a BTreeMap<String, String>) -> Option<&'a str> {
    let by_handle = [
        "ipip-",
        "vxlan-",
        "vxlan-v6-",
        "wireguard-",
        "wireguard-v6-",
    ]
    .iter()
    .find_map(|k| handle.strip_prefix(k)?.strip_prefix("tunnel-addr-"));
    by_handle.or_else(|| {
        let t = attrs.get("type")?;
        TUNNEL_TYPES
            .contains(&t.as_str())
            .then(|| attrs.get("node").map(String::as_str))?
    })
}

/// A workload address of the CNI plugin: handle `<network>.<containerID>` and the
/// attributes the plugin writes (`namespace` and `pod` for a Kubernetes pod, `node` for
/// every workload). Anything else belongs to another user of the IPAM.
fn is_workload(handle: &str, attrs: &BTreeMap<String, String>) -> bool {
    let Some((network, container)) = handle.split_once('.') else {
        return false;
    };
    !network.is_empty()
        && !container.is_empty()
        && ((attrs.contains_key("pod") && attrs.contains_key("namespace"))
            || attrs.contains_key("node"))
}

/// What a collector looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Everything (calicoctl, run by a person).
    All,
    /// A node's collector: the blocks affine to `name`; with `dead_nodes` (it holds the
    /// lease) also the blocks and affinities of nodes that no longer exist and blocks
    /// with no affinity.
    Node { name: String, dead_nodes: bool },
}

impl Scope {
    fn covers_block(&self, b: &AllocationBlock, nodes: &HashSet<String>) -> bool {
        match self {
            Scope::All => true,
            Scope::Node { name, dead_nodes } => match b.host() {
                Some(h) if h == name => true,
                Some(h) if nodes.contains(h) => false,
                _ => *dead_nodes,
            },
        }
    }

    fn covers_dead_nodes(&self) -> bool {
        match self {
            Scope::All => true,
            Scope::Node { dead_nodes, .. } => *dead_nodes,
        }
    }
}

/// Every leak in a snapshot (pure).
pub fn find_leaks(s: &IpamSnapshot) -> Vec<Leak> {
    find_leaks_in(s, &Scope::All)
}

/// The leaks a collector with this scope may free (pure).
pub fn find_leaks_in(s: &IpamSnapshot, scope: &Scope) -> Vec<Leak> {
    let none = BTreeMap::new();
    let attrs_of = |a: &crate::model::ipam::AllocationAttribute| -> BTreeMap<String, String> {
        a.secondary.clone().unwrap_or_else(|| none.clone())
    };
    // Calico: a handle is leaked only when all its addresses are.
    let mut live_handles: HashSet<&str> = HashSet::new();
    for (cidr, b) in &s.blocks {
        for (ord, a) in b.allocations.iter().enumerate() {
            if let Some(h) = a
                .and_then(|i| b.attributes.get(i))
                .and_then(|attr| attr.handle_id.as_deref())
                && s.endpoint_ips.contains(&nth_ip(cidr, ord))
            {
                live_handles.insert(h);
            }
        }
    }
    let mut out = Vec::new();
    for (cidr, b) in &s.blocks {
        if !scope.covers_block(b, &s.nodes) {
            continue;
        }
        for (ord, a) in b.allocations.iter().enumerate() {
            let Some(attr) = a.and_then(|i| b.attributes.get(i)) else {
                continue;
            };
            // No handle: nothing says whose it is (and it could not be released by handle).
            let Some(handle) = attr.handle_id.as_deref() else {
                continue;
            };
            let attrs = attrs_of(attr);
            let ip = nth_ip(cidr, ord);
            let reason = match tunnel_node(handle, &attrs) {
                Some(node) if s.nodes.contains(node) => continue,
                Some(node) => format!("tunnel address of node {node}, which does not exist"),
                None if !is_workload(handle, &attrs) => continue,
                None if s.endpoint_ips.contains(&ip) || live_handles.contains(handle) => {
                    continue;
                }
                None => "no WorkloadEndpoint has this address".to_string(),
            };
            let sequence = b.sequence_of(ip);
            out.push(Leak::Allocation {
                ip,
                block: *cidr,
                handle: Some(handle.to_string()),
                sequence,
                reason,
            });
        }
    }
    if scope.covers_dead_nodes() {
        for (host, block) in &s.affinities {
            if !s.nodes.contains(host) {
                out.push(Leak::Affinity {
                    host: host.clone(),
                    block: *block,
                });
            }
        }
    }
    out.sort();
    out
}

/// Where the lease of the collector for nodes that no longer exist is kept (this
/// project's key: Calico runs one kube-controllers and needs none).
pub const LEASE_KEY: &str = "/calico/ipam/v2/leak-collector-lease";

/// The lease's value.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Lease {
    holder: String,
    /// Seconds since the Unix epoch.
    #[serde(rename = "expiresAt")]
    expires_at: u64,
}

/// Take or renew the lease for `ttl` from `now` (compare-and-swap on the key's revision,
/// so two nodes never both win): true when `holder` has it. A lease that expired, or a
/// value that cannot be read, may be taken by anyone. Clocks of nodes should agree to
/// well within `ttl`.
pub async fn acquire_lease(
    ds: &dyn Datastore,
    holder: &str,
    ttl: Duration,
    now: SystemTime,
) -> IpamResult<bool> {
    let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let value = serde_json::to_vec(&Lease {
        holder: holder.to_string(),
        expires_at: secs(now).saturating_add(ttl.as_secs()),
    })
    .expect("a lease serializes");
    let current = ds.get(LEASE_KEY).await?;
    let result = match current {
        None => ds.create(LEASE_KEY, value).await.map(|_| ()),
        Some(kv) => {
            let theirs = serde_json::from_slice::<Lease>(&kv.value).ok();
            let free = theirs
                .as_ref()
                .is_none_or(|l| l.holder == holder || l.expires_at < secs(now));
            if !free {
                return Ok(false);
            }
            ds.update(LEASE_KEY, value, kv.mod_revision)
                .await
                .map(|_| ())
        }
    };
    match result {
        Ok(()) => Ok(true),
        Err(DatastoreError::AlreadyExists { .. } | DatastoreError::Conflict { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// One pass of a node's collector: take or renew the lease, look, and free what was also
/// seen at least `grace` ago. Returns what was freed.
pub async fn collect(
    ipam: &Ipam,
    client: &Client,
    node: &str,
    tracker: &mut LeakTracker,
    grace: Duration,
    lease_ttl: Duration,
) -> IpamResult<CollectPass> {
    let dead_nodes = acquire_lease(
        client.datastore().as_ref(),
        node,
        lease_ttl,
        SystemTime::now(),
    )
    .await?;
    let snap = snapshot(ipam, client).await?;
    let scope = Scope::Node {
        name: node.to_string(),
        dead_nodes,
    };
    let leaks = find_leaks_in(&snap, &scope);
    let seen = leaks.len();
    let confirmed = tracker.observe(leaks, Instant::now(), grace);
    let freed = if confirmed.is_empty() {
        Vec::new()
    } else {
        free(ipam, &confirmed).await?
    };
    Ok(CollectPass {
        seen,
        freed,
        dead_nodes,
    })
}

/// What one pass of [`collect`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectPass {
    /// Leaks seen in this pass.
    pub seen: usize,
    pub freed: Vec<Leak>,
    /// Whether this node held the lease (and so looked at nodes that no longer exist).
    pub dead_nodes: bool,
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

/// The addresses a stored WorkloadEndpoint lists. A value that does not decode as a
/// WorkloadEndpoint (another writer's) still protects the addresses of its
/// `spec.ipNetworks`; a value whose addresses cannot be read at all stops the pass, with
/// its key named: an address the collector cannot see as used would be handed out twice.
fn endpoint_addresses(kv: &KeyValue) -> IpamResult<Vec<IpAddr>> {
    let nets: Vec<String> = match decode_kv::<WorkloadEndpointSpec>(kv) {
        Ok(w) => w.spec.ip_networks,
        Err(e) => {
            let raw: Option<Vec<String>> = serde_json::from_slice::<serde_json::Value>(&kv.value)
                .ok()
                .and_then(|v| v.pointer("/spec/ipNetworks").cloned())
                .and_then(|v| serde_json::from_value(v).ok());
            match raw {
                Some(nets) => {
                    tracing::warn!(key = %kv.key, error = %e, "WorkloadEndpoint does not decode; its ipNetworks still count as in use");
                    nets
                }
                None => return Err(IpamError::Client(e)),
            }
        }
    };
    Ok(nets
        .iter()
        .filter_map(|n| {
            n.parse::<IpNet>()
                .map(|n| n.addr())
                .or_else(|_| n.parse::<IpAddr>())
                .ok()
        })
        .collect())
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
    // Existence is read from the keys: a Node whose value does not decode (another
    // writer's) still exists, and its tunnel addresses and blocks are not a dead node's.
    let (node_kvs, _) = client
        .datastore()
        .list(&keys::resource_prefix(NodeSpec::PLURAL, None))
        .await?;
    let nodes = node_kvs
        .iter()
        .filter_map(|kv| keys::parse_resource_key(&kv.key))
        .map(|k| k.name)
        .collect();
    let (wep_kvs, _) = client
        .datastore()
        .list(&keys::resource_prefix(WorkloadEndpointSpec::PLURAL, None))
        .await?;
    let mut endpoint_ips = HashSet::new();
    for kv in &wep_kvs {
        endpoint_ips.extend(endpoint_addresses(kv)?);
    }
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
        let pod = BTreeMap::from([
            ("node".to_string(), "node-1".to_string()),
            ("namespace".to_string(), "default".to_string()),
            ("pod".to_string(), "web".to_string()),
        ]);
        b.assign(1, Some("k8s-pod-network.live"), &pod);
        b.assign(1, Some("k8s-pod-network.dead"), &pod);
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

    /// Calico's kube-controllers collects only the CNI plugin's workload addresses and
    /// tunnel addresses: another plugin's handle, a CNI-shaped handle without the plugin's
    /// attributes, an allocation without a handle and Windows' reserved addresses are not
    /// leaks; nor is the second address of a handle whose first one is in use.
    #[test]
    fn only_workload_and_tunnel_allocations_are_leaks() {
        let cidr: IpNet = "10.65.2.0/28".parse().unwrap();
        let mut b = AllocationBlock::new_empty(cidr, Some("node-1"), 0);
        let node = BTreeMap::from([("node".to_string(), "node-1".to_string())]);
        b.assign(1, Some("other-plugin-handle"), &node);
        b.assign(1, Some("k8s-pod-network.no-attributes"), &BTreeMap::new());
        b.assign(1, None, &node);
        b.assign(1, Some("windows-reserved-ipam-handle"), &BTreeMap::new());
        // Dual addresses of one pod: the WorkloadEndpoint lists only the first.
        b.assign(2, Some("k8s-pod-network.dual"), &node);
        // A podman container of the plugin (no pod): its address is a leak.
        b.assign(1, Some("podman.c0ffee"), &node);
        // A tunnel address by its attributes, of a node that is gone.
        let tunnel = BTreeMap::from([
            ("node".to_string(), "node-gone".to_string()),
            ("type".to_string(), "wireguardTunnelAddress".to_string()),
        ]);
        b.assign(1, Some("some-tunnel-handle"), &tunnel);
        let s = IpamSnapshot {
            blocks: vec![(cidr, b)],
            affinities: vec![("node-1".into(), cidr)],
            nodes: HashSet::from(["node-1".to_string()]),
            endpoint_ips: HashSet::from(["10.65.2.4".parse().unwrap()]),
        };
        let leaks: Vec<String> = find_leaks(&s).iter().map(ToString::to_string).collect();
        assert_eq!(
            leaks,
            [
                "10.65.2.6 (handle \"podman.c0ffee\"): no WorkloadEndpoint has this address",
                "10.65.2.7 (handle \"some-tunnel-handle\"): tunnel address of node node-gone, which does not exist",
            ]
        );
    }

    /// A node's collector looks at its own blocks; the blocks and affinities of nodes
    /// that no longer exist only with the lease; never another live node's blocks.
    #[test]
    fn a_nodes_collector_covers_its_blocks_and_dead_nodes_only_with_the_lease() {
        let dead = BTreeMap::from([("node".to_string(), "x".to_string())]);
        let block = |cidr: &str, host: Option<&str>| {
            let cidr: IpNet = cidr.parse().unwrap();
            let mut b = AllocationBlock::new_empty(cidr, host, 0);
            b.assign(1, Some(&format!("net.{cidr}")), &dead);
            (cidr, b)
        };
        let s = IpamSnapshot {
            blocks: vec![
                block("10.65.0.0/30", Some("node-a")),
                block("10.65.0.4/30", Some("node-b")),
                block("10.65.0.8/30", Some("node-gone")),
                block("10.65.0.12/30", None),
            ],
            affinities: vec![
                ("node-a".into(), "10.65.0.0/30".parse().unwrap()),
                ("node-b".into(), "10.65.0.4/30".parse().unwrap()),
                ("node-gone".into(), "10.65.0.8/30".parse().unwrap()),
            ],
            nodes: HashSet::from(["node-a".to_string(), "node-b".to_string()]),
            endpoint_ips: HashSet::new(),
        };
        let blocks = |dead_nodes: bool| -> Vec<String> {
            let scope = Scope::Node {
                name: "node-a".into(),
                dead_nodes,
            };
            find_leaks_in(&s, &scope)
                .iter()
                .map(|l| match l {
                    Leak::Allocation { block, .. } => block.to_string(),
                    Leak::Affinity { host, .. } => format!("affinity of {host}"),
                })
                .collect()
        };
        assert_eq!(blocks(false), ["10.65.0.0/30"]);
        assert_eq!(
            blocks(true),
            [
                "10.65.0.0/30",
                "10.65.0.8/30",
                "10.65.0.12/30",
                "affinity of node-gone"
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
