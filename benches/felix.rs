//! `scripts/bench felix`: cold programming of N remote block routes (default 100,000) into
//! a fresh namespace by Felix's route reconciler, against `ip -batch` adding the same
//! routes in the same run; then a resync pass with nothing to change. Prints the ratios.
//! `CALICO_BENCH_FELIX_ROUTES` sets N.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use calico_node::felix::calc::{Dev, PROTO_FELIX, Route, Target};
use calico_node::felix::routes::{interface_with, reconcile};
use common::NetNs;
use ipnet::{IpNet, Ipv4Net};

fn node() -> Option<NetNs> {
    let ns = NetNs::new("felix-bench")?;
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
    ]);
    ns.ip(&["link", "set", "peer0", "up"]);
    ns.ip(&["link", "set", "eth0", "up"]);
    ns.ip(&["addr", "add", "10.0.0.1/24", "dev", "eth0"]);
    Some(ns)
}

fn prefixes(n: usize) -> Vec<Ipv4Net> {
    (0..n as u32)
        .map(|i| Ipv4Net::new(Ipv4Addr::from(0x0a40_0000 + i * 64), 26).unwrap())
        .collect()
}

/// Cold pass and no-change pass of our reconciler.
fn ours(n: usize) -> Option<(Duration, Duration)> {
    let ns = node()?;
    let gw: IpAddr = "10.0.0.2".parse().unwrap();
    let desired: BTreeMap<IpNet, Route> = prefixes(n)
        .into_iter()
        .map(|p| {
            (
                IpNet::V4(p),
                Route {
                    target: Target::Via {
                        gateway: gw,
                        dev: Dev::Uplink,
                    },
                    protocol: PROTO_FELIX,
                },
            )
        })
        .collect();
    Some(ns.with_netlink(move |h| async move {
        let uplink = interface_with(&h, "10.0.0.1".parse().unwrap())
            .await
            .unwrap();
        let t = Instant::now();
        let p = reconcile(&h, &desired, "cali", uplink, &[]).await.unwrap();
        let cold = t.elapsed();
        assert_eq!(
            p.added_or_replaced,
            desired.len(),
            "{:?}",
            p.failures.first()
        );
        let t = Instant::now();
        let p = reconcile(&h, &desired, "cali", uplink, &[]).await.unwrap();
        let resync = t.elapsed();
        assert_eq!((p.added_or_replaced, p.deleted), (0, 0));
        (cold, resync)
    }))
}

/// `ip -batch` adding the same routes.
fn ip_batch(n: usize) -> Option<Duration> {
    let ns = node()?;
    let mut f = tempfile::NamedTempFile::new().unwrap();
    for p in prefixes(n) {
        writeln!(f, "route add {p} via 10.0.0.2 dev eth0 onlink proto 80").unwrap();
    }
    f.flush().unwrap();
    let t = Instant::now();
    let st = std::process::Command::new("ip")
        .args(["-n", &ns.name, "-batch"])
        .arg(f.path())
        .status()
        .unwrap();
    let took = t.elapsed();
    assert!(st.success());
    Some(took)
}

fn main() {
    let n: usize = std::env::var("CALICO_BENCH_FELIX_ROUTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let mut runs = Vec::new();
    // Interleaved, three times: drift on this shared machine hits both.
    for _ in 0..3 {
        let Some((cold, resync)) = ours(n) else {
            return;
        };
        let Some(batch) = ip_batch(n) else {
            return;
        };
        runs.push((cold, resync, batch));
    }
    runs.sort_by_key(|r| r.0);
    let (cold, resync, _) = runs[1];
    let mut batches: Vec<Duration> = runs.iter().map(|r| r.2).collect();
    batches.sort();
    let batch = batches[1];
    println!(
        "Felix route programming, {n} remote block routes into a fresh namespace (median of 3):"
    );
    println!(
        "  cold: ours {:.3} s, ip -batch {:.3} s, ratio {:.2}x (goal <= 0.7x)",
        cold.as_secs_f64(),
        batch.as_secs_f64(),
        cold.as_secs_f64() / batch.as_secs_f64()
    );
    println!(
        "  resync with no change: {:.3} s (goal <= 0.2 s)",
        resync.as_secs_f64()
    );
}
