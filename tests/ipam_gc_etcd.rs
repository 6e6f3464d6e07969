//! The IPAM leak collector on a real etcd (point 4 of issue 15): it frees only what the
//! CNI plugin and the node agent allocated (as Calico's kube-controllers), each node only
//! in its own blocks, and one node at a time, under a lease, for nodes that no longer
//! exist.

mod common;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use calico_node::datastore::{Client, Datastore};
use calico_node::ipam::gc::{self, Leak, LeakTracker};
use calico_node::ipam::{AssignArgs, Ipam};
use calico_node::model::ipam::AllocationBlock;
use calico_node::model::keys;
use calico_node::model::{IPPool, IPPoolSpec, Node, NodeSpec};
use common::Etcd;

async fn setup(etcd: &Etcd, nodes: &[&str]) -> (Ipam, Client) {
    let ds: Arc<dyn Datastore> = etcd.datastore().await;
    let client = Client::new(ds.clone());
    let spec = IPPoolSpec {
        cidr: "10.66.0.0/16".into(),
        block_size: Some(26),
        ..Default::default()
    };
    client.create(IPPool::new("pool", spec)).await.unwrap();
    for n in nodes {
        client
            .create(Node::new(*n, NodeSpec::default()))
            .await
            .unwrap();
    }
    (Ipam::new(ds), client)
}

async fn assign(ipam: &Ipam, args: AssignArgs) -> IpAddr {
    ipam.auto_assign(&args).await.unwrap()[0]
}

/// An address with no handle at all, written into `host`'s block as another IPAM user
/// could (Calico's IPAM accepts such allocations).
async fn assign_without_handle(ds: &Arc<dyn Datastore>, ipam: &Ipam, host: &str) -> IpAddr {
    let (cidr, _) = ipam
        .blocks(false)
        .await
        .unwrap()
        .into_iter()
        .find(|(_, b)| b.host() == Some(host))
        .expect("the host has a block");
    let key = keys::block_key(&cidr);
    let kv = ds.get(&key).await.unwrap().unwrap();
    let mut b: AllocationBlock = serde_json::from_slice(&kv.value).unwrap();
    let ip = b.assign(1, None, &BTreeMap::new())[0];
    ds.update(&key, serde_json::to_vec(&b).unwrap(), kv.mod_revision)
        .await
        .unwrap();
    ip
}

fn freed_ips(freed: &[Leak]) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = freed
        .iter()
        .filter_map(|l| match l {
            Leak::Allocation { ip, .. } => Some(*ip),
            Leak::Affinity { .. } => None,
        })
        .collect();
    ips.sort();
    ips
}

/// Another plugin's handle, a CNI-shaped handle without the plugin's attributes, and an
/// allocation without a handle survive two collector passes; the dead pod's address
/// (handle and attributes of the CNI plugin, no WorkloadEndpoint) is freed. (Before:
/// every allocation no WorkloadEndpoint listed was freed.)
#[tokio::test]
async fn foreign_allocations_survive_two_gc_passes() {
    let Some(etcd) = Etcd::start() else { return };
    let (ipam, client) = setup(&etcd, &["node-a"]).await;
    let ds = client.datastore().clone();
    let dead = assign(&ipam, AssignArgs::v4("k8s-pod-network.dead", "node-a")).await;
    let mut foreign = AssignArgs::v4("dhcp-relay-lease-7", "node-a");
    foreign.attrs = BTreeMap::from([("owner".to_string(), "dhcp-relay".to_string())]);
    let foreign = assign(&ipam, foreign).await;
    let mut bare = AssignArgs::v4("k8s-pod-network.made-by-hand", "node-a");
    bare.attrs.clear();
    let bare = assign(&ipam, bare).await;
    let handleless = assign_without_handle(&ds, &ipam, "node-a").await;

    let mut tracker = LeakTracker::default();
    let ttl = Duration::from_secs(60);
    let mut freed = Vec::new();
    for _ in 0..2 {
        let pass = gc::collect(&ipam, &client, "node-a", &mut tracker, Duration::ZERO, ttl)
            .await
            .unwrap();
        freed.extend(pass.freed);
    }
    assert_eq!(freed_ips(&freed), vec![dead], "{freed:?}");
    for ip in [foreign, bare, handleless] {
        assert!(
            ipam.lookup(ip).await.unwrap().is_some(),
            "{ip} was freed though it is not the CNI plugin's"
        );
    }
    assert!(ipam.lookup(dead).await.unwrap().is_none());
}

/// Node A's and node B's collectors run side by side: each frees the dead pods of its own
/// blocks only; the blocks of node C, which no longer exists, are collected by exactly one
/// of them (the holder of the lease), never by both. Once the lease expires, the other
/// node takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_collectors_do_not_both_act_on_a_dead_nodes_block() {
    let Some(etcd) = Etcd::start() else { return };
    let (ipam, client) = setup(&etcd, &["node-a", "node-b"]).await;
    let a_dead = assign(&ipam, AssignArgs::v4("k8s-pod-network.a1", "node-a")).await;
    let b_dead = assign(&ipam, AssignArgs::v4("k8s-pod-network.b1", "node-b")).await;
    let c_pod = assign(&ipam, AssignArgs::v4("k8s-pod-network.c1", "node-c")).await;
    let c_tunnel = assign(&ipam, AssignArgs::v4("vxlan-tunnel-addr-node-c", "node-c")).await;

    let ttl = Duration::from_secs(60);
    let (mut ta, mut tb) = (LeakTracker::default(), LeakTracker::default());
    let (mut freed_a, mut freed_b) = (Vec::new(), Vec::new());
    let mut holders = Vec::new();
    for _ in 0..3 {
        let (pa, pb) = tokio::join!(
            gc::collect(&ipam, &client, "node-a", &mut ta, Duration::ZERO, ttl),
            gc::collect(&ipam, &client, "node-b", &mut tb, Duration::ZERO, ttl),
        );
        let (pa, pb) = (pa.unwrap(), pb.unwrap());
        assert!(
            pa.dead_nodes != pb.dead_nodes,
            "exactly one holds the lease: a {} b {}",
            pa.dead_nodes,
            pb.dead_nodes
        );
        holders.push(if pa.dead_nodes { "node-a" } else { "node-b" });
        freed_a.extend(pa.freed);
        freed_b.extend(pb.freed);
    }
    holders.dedup();
    assert_eq!(
        holders.len(),
        1,
        "the lease stayed with one node: {holders:?}"
    );
    let (holder, other) = if holders[0] == "node-a" {
        ((&freed_a, a_dead), (&freed_b, b_dead))
    } else {
        ((&freed_b, b_dead), (&freed_a, a_dead))
    };
    let mut want = vec![holder.1, c_pod, c_tunnel];
    want.sort();
    assert_eq!(freed_ips(holder.0), want, "{:?}", holder.0);
    assert_eq!(freed_ips(other.0), vec![other.1], "{:?}", other.0);
    let c_affinity = |l: &Leak| matches!(l, Leak::Affinity { host, .. } if host == "node-c");
    assert_eq!(holder.0.iter().filter(|l| c_affinity(l)).count(), 1);
    assert!(!other.0.iter().any(c_affinity));
    for ip in [a_dead, b_dead, c_pod, c_tunnel] {
        assert!(ipam.lookup(ip).await.unwrap().is_none(), "{ip} still held");
    }

    // The lease: held by one node until it expires, then the other may take it.
    let ds = client.datastore().as_ref();
    let now = SystemTime::now();
    let other_name = if holders[0] == "node-a" {
        "node-b"
    } else {
        "node-a"
    };
    assert!(!gc::acquire_lease(ds, other_name, ttl, now).await.unwrap());
    let later = now + ttl + Duration::from_secs(5);
    assert!(gc::acquire_lease(ds, other_name, ttl, later).await.unwrap());
    assert!(!gc::acquire_lease(ds, holders[0], ttl, later).await.unwrap());
}

/// Values the node cannot decode (a newer writer's, or a person's) never make a live
/// pod's or node's addresses look leaked: a WorkloadEndpoint with a field of the wrong
/// type still protects the addresses of its `ipNetworks`, a Node whose value does not
/// decode still exists (its tunnel address stays), and a WorkloadEndpoint whose addresses
/// cannot be read at all stops the pass with its key named instead of freeing anything.
/// (Before: the lists skipped such values, and both addresses were freed after two passes.)
#[tokio::test]
async fn undecodable_endpoints_and_nodes_never_free_live_addresses() {
    let Some(etcd) = Etcd::start() else { return };
    let (ipam, client) = setup(&etcd, &["node-a"]).await;
    let ds = client.datastore().clone();
    let mut pod = AssignArgs::v4("k8s-pod-network.live", "node-a");
    pod.attrs.extend([
        ("namespace".into(), "ns".into()),
        ("pod".into(), "p".into()),
    ]);
    let pod_ip = assign(&ipam, pod).await;
    let tunnel = assign(&ipam, AssignArgs::v4("vxlan-tunnel-addr-node-x", "node-a")).await;
    let wep_key = keys::resource_key("workloadendpoints", Some("ns"), "node--a-k8s-p-eth0");
    let wep = serde_json::json!({
        "kind": "WorkloadEndpoint", "apiVersion": "projectcalico.org/v3",
        "metadata": {"name": "node--a-k8s-p-eth0", "namespace": "ns"},
        "spec": {"node": "node-a", "pod": "p", "profiles": 7,
                 "ipNetworks": [format!("{pod_ip}/32")]}
    });
    ds.create(&wep_key, serde_json::to_vec(&wep).unwrap())
        .await
        .unwrap();
    ds.create(
        &keys::resource_key("nodes", None, "node-x"),
        br#"{"kind":"Node","spec":{"bgp":"not an object"}}"#.to_vec(),
    )
    .await
    .unwrap();

    let mut tracker = LeakTracker::default();
    let ttl = Duration::from_secs(60);
    for _ in 0..2 {
        let pass = gc::collect(&ipam, &client, "node-a", &mut tracker, Duration::ZERO, ttl)
            .await
            .unwrap();
        assert!(pass.freed.is_empty(), "freed {:?}", pass.freed);
    }
    for ip in [pod_ip, tunnel] {
        assert!(ipam.lookup(ip).await.unwrap().is_some(), "{ip} was freed");
    }

    let broken = keys::resource_key("workloadendpoints", Some("ns"), "broken");
    ds.create(&broken, b"{not json".to_vec()).await.unwrap();
    let err = gc::collect(&ipam, &client, "node-a", &mut tracker, Duration::ZERO, ttl)
        .await
        .expect_err("a WorkloadEndpoint whose addresses cannot be read stops the pass");
    assert!(err.to_string().contains(&broken), "{err}");
}
