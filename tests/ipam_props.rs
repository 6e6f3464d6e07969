//! Property test of the allocator on the in-memory store: random operations from several
//! hosts run concurrently never hold an address twice, every held address is recorded
//! under its handle, and once everything is released the whole pool can be assigned again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use calico_node::datastore::{Client, Datastore, MemoryDatastore};
use calico_node::ipam::{AssignArgs, Ipam};
use calico_node::model::ipam::IPAMConfig;
use calico_node::model::{IPPool, IPPoolSpec};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Assign(usize),
    Release(usize),
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        prop_oneof![
            (1usize..4).prop_map(Op::Assign),
            (0usize..8).prop_map(Op::Release)
        ],
        1..12,
    )
}

type Held = Arc<Mutex<HashMap<String, Vec<IpAddr>>>>;

async fn run_host(ipam: Ipam, host: usize, ops: Vec<Op>, held: Held) {
    let mut mine: Vec<String> = Vec::new();
    for (i, op) in ops.into_iter().enumerate() {
        match op {
            Op::Assign(n) => {
                let handle = format!("h{host}-{i}");
                let args = AssignArgs {
                    num_v4: n,
                    ..AssignArgs::v4(&handle, &format!("node-{host}"))
                };
                if let Ok(ips) = ipam.auto_assign(&args).await {
                    held.lock().unwrap().insert(handle.clone(), ips);
                    mine.push(handle);
                }
            }
            Op::Release(k) if !mine.is_empty() => {
                let handle = mine.remove(k % mine.len());
                let released = ipam.release_by_handle(&handle).await.unwrap();
                let had = held.lock().unwrap().remove(&handle).unwrap();
                let (a, b): (HashSet<_>, HashSet<_>) =
                    (released.into_iter().collect(), had.into_iter().collect());
                assert_eq!(
                    a, b,
                    "release by handle returns exactly the handle's addresses"
                );
            }
            Op::Release(_) => {}
        }
        tokio::task::yield_now().await;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn concurrent_hosts_never_share_an_address(host_ops in prop::collection::vec(ops(), 3)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(3).enable_all().build().unwrap();
        rt.block_on(async move {
            let ds: Arc<dyn Datastore> = Arc::new(MemoryDatastore::new());
            let spec = IPPoolSpec { cidr: "10.65.0.0/27".into(), block_size: Some(29), ..Default::default() };
            Client::new(ds.clone()).create(IPPool::new("p", spec)).await.unwrap();
            let ipam = Ipam::new(ds.clone());
            ipam.set_config(&IPAMConfig { max_blocks_per_host: 2, ..Default::default() }).await.unwrap();
            let held: Held = Arc::default();
            let tasks: Vec<_> = host_ops.into_iter().enumerate()
                .map(|(h, ops)| tokio::spawn(run_host(ipam.clone(), h, ops, held.clone())))
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
            // No address twice, and the datastore agrees on each address's handle.
            let held = held.lock().unwrap().clone();
            let mut seen = HashSet::new();
            for (handle, ips) in &held {
                for ip in ips {
                    assert!(seen.insert(*ip), "{ip} held twice");
                    let (_, h) = ipam.lookup(*ip).await.unwrap().expect("allocated");
                    assert_eq!(h.as_deref(), Some(handle.as_str()));
                }
            }
            let blocks: BTreeMap<_, _> = ipam.blocks(false).await.unwrap().into_iter().collect();
            let in_use: usize = blocks.values().map(|b| b.in_use()).sum();
            assert_eq!(in_use, seen.len(), "no allocation without a holder");
            // Release everything: the whole pool (32 addresses) can be assigned again.
            for handle in held.keys() {
                ipam.release_by_handle(handle).await.unwrap();
            }
            let mut total = 0;
            for h in 0..3 {
                let args = AssignArgs { num_v4: 1, ..AssignArgs::v4("refill", &format!("node-{h}")) };
                while ipam.auto_assign(&args).await.is_ok() {
                    total += 1;
                }
            }
            assert_eq!(total, 32, "every released address came back");
        });
    }
}
