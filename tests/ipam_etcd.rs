//! Block IPAM on a real etcd: concurrent assigns from several hosts, block affinities,
//! borrowing and strict affinity, maxBlocksPerHost, release, and the exact stored JSON.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use calico_node::datastore::{Client, Datastore};
use calico_node::ipam::{AssignArgs, Ipam};
use calico_node::model::ipam::IPAMConfig;
use calico_node::model::keys;
use calico_node::model::{IPPool, IPPoolSpec};
use common::{Etcd, assert_golden};
use ipnet::IpNet;

async fn setup(etcd: &Etcd, cidr: &str, block_size: u32) -> Ipam {
    let ds: Arc<dyn Datastore> = etcd.datastore().await;
    let spec = IPPoolSpec {
        cidr: cidr.into(),
        block_size: Some(block_size),
        ..Default::default()
    };
    Client::new(ds.clone())
        .create(IPPool::new("pool", spec))
        .await
        .unwrap();
    Ipam::new(ds)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_hosts_fifty_concurrent_assigns_each_are_distinct_and_affine() {
    let Some(etcd) = Etcd::start() else { return };
    let ipam = setup(&etcd, "10.65.0.0/16", 26).await;
    let mut tasks = Vec::new();
    for host in ["node-a", "node-b", "node-c"] {
        for i in 0..50 {
            let ipam = ipam.clone();
            tasks.push(tokio::spawn(async move {
                let ips = ipam
                    .auto_assign(&AssignArgs::v4(
                        &format!("k8s-pod-network.{host}-{i}"),
                        host,
                    ))
                    .await
                    .unwrap();
                (host, ips[0])
            }));
        }
    }
    let mut all = HashSet::new();
    let mut by_host: BTreeMap<&str, Vec<IpAddr>> = BTreeMap::new();
    for t in tasks {
        let (host, ip) = t.await.unwrap();
        assert!(all.insert(ip), "{ip} handed out twice");
        by_host.entry(host).or_default().push(ip);
    }
    assert_eq!(all.len(), 150);
    for (host, ips) in by_host {
        let blocks = ipam.affine_blocks(host, false).await.unwrap();
        assert_eq!(
            blocks.len(),
            1,
            "{host} claimed exactly one /26 for 50 addresses: {blocks:?}"
        );
        assert!(
            ips.iter().all(|ip| blocks[0].contains(ip)),
            "{host}'s addresses are all in its block"
        );
        let (_, b) = ipam
            .blocks(false)
            .await
            .unwrap()
            .into_iter()
            .find(|(c, _)| *c == blocks[0])
            .unwrap();
        assert_eq!(b.in_use(), 50);
        assert_eq!(b.affinity.as_deref(), Some(format!("host:{host}").as_str()));
    }
    // Every affinity is confirmed.
    let affinities = etcd.etcdctl(&[
        "get",
        "--prefix",
        "/calico/ipam/v2/host/",
        "--print-value-only",
    ]);
    assert_eq!(affinities.lines().filter(|l| !l.is_empty()).count(), 3);
    assert!(
        affinities
            .lines()
            .filter(|l| !l.is_empty())
            .all(|l| l == r#"{"state":"confirmed","deleted":false}"#),
        "{affinities}"
    );
}

#[tokio::test]
async fn borrowing_strict_affinity_max_blocks_and_release() {
    let Some(etcd) = Etcd::start() else { return };
    // 4 blocks of 16.
    let ipam = setup(&etcd, "10.66.0.0/26", 28).await;
    ipam.set_config(&IPAMConfig {
        max_blocks_per_host: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(
        etcd.etcdctl_value(keys::IPAM_CONFIG_KEY),
        r#"{"auto_allocate_blocks":true,"maxBlocksPerHost":1}"#
    );
    ipam.auto_assign(&AssignArgs {
        num_v4: 16,
        ..AssignArgs::v4("a", "node-a")
    })
    .await
    .unwrap();
    let b = ipam
        .auto_assign(&AssignArgs::v4("b", "node-b"))
        .await
        .unwrap();
    // node-a's block is full and it may own only one: it borrows from node-b's block.
    let borrowed = ipam
        .auto_assign(&AssignArgs::v4("a-extra", "node-a"))
        .await
        .unwrap();
    let b_block = ipam.affine_blocks("node-b", false).await.unwrap()[0];
    assert!(b_block.contains(&borrowed[0]));
    assert_eq!(
        ipam.affine_blocks("node-a", false).await.unwrap().len(),
        1,
        "maxBlocksPerHost honoured"
    );

    // Strict affinity: no borrowing.
    ipam.set_config(&IPAMConfig {
        strict_affinity: true,
        max_blocks_per_host: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let e = ipam
        .auto_assign(&AssignArgs::v4("a-more", "node-a"))
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("no free IPv4 address for node node-a:"),
        "{e}"
    );
    assert_eq!(
        etcd.etcdctl_value(&keys::handle_key("a-more")),
        "",
        "a refused assign leaves no handle"
    );

    // Release: handles go, a borrowed address frees space in node-b's block, which stays
    // (it has an affinity); an address outside pools is ignored.
    assert_eq!(ipam.release_by_handle("a-extra").await.unwrap(), borrowed);
    assert_eq!(etcd.etcdctl_value(&keys::handle_key("a-extra")), "");
    assert_eq!(
        ipam.release_ips(&[b[0], "10.99.0.1".parse().unwrap()])
            .await
            .unwrap(),
        vec![b[0]]
    );
    assert_eq!(etcd.etcdctl_value(&keys::handle_key("b")), "");
    assert!(
        !etcd.etcdctl_value(&keys::block_key(&b_block)).is_empty(),
        "affine block kept"
    );
    // An empty block without affinity is deleted.
    let taken: Vec<IpNet> = ipam
        .blocks(false)
        .await
        .unwrap()
        .into_iter()
        .map(|(c, _)| c)
        .collect();
    let free: IpNet = [
        "10.66.0.0/28",
        "10.66.0.16/28",
        "10.66.0.32/28",
        "10.66.0.48/28",
    ]
    .iter()
    .map(|c| c.parse().unwrap())
    .find(|c| !taken.contains(c))
    .unwrap();
    let ip = calico_node::model::ipam::nth_ip(&free, 5);
    ipam.assign_ip(ip, "manual", &BTreeMap::new())
        .await
        .unwrap();
    assert!(!etcd.etcdctl_value(&keys::block_key(&free)).is_empty());
    ipam.release_by_handle("manual").await.unwrap();
    assert_eq!(
        etcd.etcdctl_value(&keys::block_key(&free)),
        "",
        "empty non-affine block deleted"
    );
}

#[tokio::test]
async fn stored_block_handle_and_affinity_are_calicos_json() {
    let Some(etcd) = Etcd::start() else { return };
    let ipam = setup(&etcd, "10.67.0.0/24", 30)
        .await
        .with_clock(|| 1_700_000_000_000_000_000);
    let attrs = BTreeMap::from([
        ("namespace".to_string(), "default".to_string()),
        ("node".to_string(), "node-1".to_string()),
        ("pod".to_string(), "web-0".to_string()),
        (
            "timestamp".to_string(),
            "2026-01-01 00:00:00 +0000 UTC".to_string(),
        ),
    ]);
    let args = AssignArgs {
        num_v4: 2,
        attrs,
        ..AssignArgs::v4("k8s-pod-network.c0ffee", "node-1")
    };
    let ips = ipam.auto_assign(&args).await.unwrap();
    let block = ipam.affine_blocks("node-1", false).await.unwrap()[0];
    ipam.release_ips(&ips[..1]).await.unwrap();
    let out = format!(
        "{}\n{}\n{}\n{}\n",
        keys::block_key(&block),
        etcd.etcdctl_value(&keys::block_key(&block)),
        etcd.etcdctl_value(&keys::affinity_key("node-1", &block)),
        etcd.etcdctl_value(&keys::handle_key("k8s-pod-network.c0ffee")),
    );
    assert_golden("ipam_block.txt", &out);
}
