//! `scripts/bench cni`: ADD and DEL latency (median, p99) of our `calico` + `calico-ipam`
//! with etcd IPAM, against Debian's `ptp` + `host-local` in the same run, over 200 pods
//! each; and 20-way parallel ADD throughput of ours. Prints the ratios (goal: ADD and DEL
//! median <= 0.7x ptp's; parallel >= 200 pods/s on 2 cores). Needs root (namespaces).
//!
//! Ours is installed as Calico installs it: one binary as `calico` and `calico-ipam`, so
//! the IPAM step runs inside the `calico` process. The same 200 pods are also run with
//! `calico-ipam` as a separate binary (run as a second process), for information.

#[path = "../tests/common/mod.rs"]
mod common;

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Etcd, NetNs, free_port};
use serde_json::{Value, json};

const PODS: usize = 200;
const PARALLEL: usize = 20;

fn cni(
    node: &NetNs,
    path: &str,
    plugin: &Path,
    cmd: &str,
    cid: &str,
    netns: &str,
    conf: &Value,
) -> Duration {
    // Like a container runtime, run the plugin directly (no `ip netns exec`, whose mount
    // namespace and /sys remount cost ~3 ms per call): only its network namespace is the
    // node's, entered between fork and exec.
    let ns = std::fs::File::open(format!("/run/netns/{}", node.name)).unwrap();
    let ns_fd = ns.as_raw_fd();
    let start = Instant::now();
    let mut c = std::process::Command::new(plugin);
    // SAFETY: setns is a plain syscall, safe between fork and exec.
    unsafe {
        c.pre_exec(move || {
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = common::output_with_stdin(
        c.env_clear()
            .env("CNI_PATH", path)
            .env("CNI_COMMAND", cmd)
            .env("CNI_CONTAINERID", cid)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0"),
        &conf.to_string(),
    );
    assert!(
        out.status.success(),
        "{cmd} {cid}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    start.elapsed()
}

/// The time of `ip link del eth0` run inside a pod's namespace (entered between fork and
/// exec, as for the plugins): the kernel's veth removal plus a process start, which every
/// plugin's DEL pays.
fn ip_link_del(pod: &NetNs) -> Duration {
    let ns = std::fs::File::open(format!("/run/netns/{}", pod.name)).unwrap();
    let ns_fd = ns.as_raw_fd();
    let start = Instant::now();
    let mut c = std::process::Command::new("ip");
    // SAFETY: setns is a plain syscall, safe between fork and exec.
    unsafe {
        c.pre_exec(move || {
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let st = c.args(["link", "del", "eth0"]).status().unwrap();
    assert!(st.success(), "ip link del eth0 in {}", pod.name);
    start.elapsed()
}

fn stats(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    (
        ms(v[v.len() / 2]),
        ms(v[(v.len() * 99 / 100).min(v.len() - 1)]),
    )
}

fn main() {
    let Some(node) = NetNs::new("cn-bench") else {
        return;
    };
    if !Path::new("/usr/lib/cni/ptp").exists() {
        common::skip("the reference plugins are not installed (containernetworking-plugins)");
        return;
    }
    node.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "uplink",
    ]);
    node.ip(&["addr", "add", "10.99.0.1/24", "dev", "eth0"]);
    node.ip(&["link", "set", "eth0", "up"]);
    let Some(etcd) = Etcd::start_on(Some(&node.name), free_port()) else {
        return;
    };
    common::seed_in_netns(&node, etcd.endpoint(), "10.64.0.0/14");
    let pods: Vec<NetNs> = (0..PODS).map(|_| NetNs::new("cn-bpod").unwrap()).collect();
    let install = tempfile::tempdir().unwrap();
    for name in ["calico", "calico-ipam"] {
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_calico"), install.path().join(name))
            .unwrap();
    }
    let ours_dir = install.path().to_str().unwrap().to_string();
    let calico = install.path().join("calico");
    let split_dir = Path::new(env!("CARGO_BIN_EXE_calico"))
        .parent()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let split = Path::new(env!("CARGO_BIN_EXE_calico")).to_path_buf();
    let ptp = Path::new("/usr/lib/cni/ptp").to_path_buf();
    let data = tempfile::tempdir().unwrap();
    let ours_conf = json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "calico",
        "etcd_endpoints": etcd.endpoint(), "nodename": "node-1", "ipam": {"type": "calico-ipam"}});
    let ptp_conf = json!({"cniVersion": "1.0.0", "name": "ptp-net", "type": "ptp",
        "ipam": {"type": "host-local", "subnet": "10.200.0.0/16", "dataDir": data.path()}});
    let netns = |i: usize| format!("/run/netns/{}", pods[i].name);

    // Interleave the two plugins pod by pod so drift on this shared machine hits both.
    let (mut our_add, mut our_del, mut ptp_add, mut ptp_del) = (vec![], vec![], vec![], vec![]);
    let (mut split_add, mut split_del) = (vec![], vec![]);
    let mut floor_del = vec![];
    for (i, pod) in pods.iter().enumerate() {
        split_add.push(cni(
            &node,
            &split_dir,
            &split,
            "ADD",
            &format!("s{i}"),
            &netns(i),
            &ours_conf,
        ));
        split_del.push(cni(
            &node,
            &split_dir,
            &split,
            "DEL",
            &format!("s{i}"),
            &netns(i),
            &ours_conf,
        ));
        our_add.push(cni(
            &node,
            &ours_dir,
            &calico,
            "ADD",
            &format!("o{i}"),
            &netns(i),
            &ours_conf,
        ));
        our_del.push(cni(
            &node,
            &ours_dir,
            &calico,
            "DEL",
            &format!("o{i}"),
            &netns(i),
            &ours_conf,
        ));
        ptp_add.push(cni(
            &node,
            "/usr/lib/cni",
            &ptp,
            "ADD",
            &format!("p{i}"),
            &netns(i),
            &ptp_conf,
        ));
        ptp_del.push(cni(
            &node,
            "/usr/lib/cni",
            &ptp,
            "DEL",
            &format!("p{i}"),
            &netns(i),
            &ptp_conf,
        ));
        pod.ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "floor0",
        ]);
        floor_del.push(ip_link_del(pod));
    }
    let (oa, oa99) = stats(our_add);
    let (od, od99) = stats(our_del);
    let (pa, pa99) = stats(ptp_add);
    let (pd, pd99) = stats(ptp_del);
    let (sa, sa99) = stats(split_add);
    let (sd, sd99) = stats(split_del);
    println!("CNI benchmark: {PODS} pods each, sequential, interleaved");
    println!(
        "ADD: calico {oa:6.1} ms (p99 {oa99:6.1})   ptp+host-local {pa:6.1} ms (p99 {pa99:6.1})   ratio {:.2}x (goal <= 0.7x)",
        oa / pa
    );
    println!(
        "DEL: calico {od:6.1} ms (p99 {od99:6.1})   ptp+host-local {pd:6.1} ms (p99 {pd99:6.1})   ratio {:.2}x (goal <= 0.7x)",
        od / pd
    );

    let (fd, fd99) = stats(floor_del);
    println!(
        "     kernel floor: `ip link del` of a pod's veth {fd:6.1} ms (p99 {fd99:6.1}) = {:.2}x ptp's DEL",
        fd / pd
    );
    println!(
        "with calico-ipam as a separate process: ADD {sa:6.1} ms (p99 {sa99:6.1}) {:.2}x, DEL {sd:6.1} ms (p99 {sd99:6.1}) {:.2}x",
        sa / pa,
        sd / pd
    );

    // 20-way parallel ADD of all pods, ours then ptp's (for reference), each cleaned up.
    let parallel = |dir: &str, plugin: &Path, conf: &Value, prefix: &str| {
        let start = Instant::now();
        std::thread::scope(|s| {
            for w in 0..PARALLEL {
                let (netns, node) = (&netns, &node);
                s.spawn(move || {
                    for i in (w..PODS).step_by(PARALLEL) {
                        cni(
                            node,
                            dir,
                            plugin,
                            "ADD",
                            &format!("{prefix}{i}"),
                            &netns(i),
                            conf,
                        );
                    }
                });
            }
        });
        let rate = PODS as f64 / start.elapsed().as_secs_f64();
        for i in 0..PODS {
            cni(
                &node,
                dir,
                plugin,
                "DEL",
                &format!("{prefix}{i}"),
                &netns(i),
                conf,
            );
        }
        rate
    };
    let ours = parallel(&ours_dir, &calico, &ours_conf, "par");
    let theirs = parallel("/usr/lib/cni", &ptp, &ptp_conf, "ppar");
    println!(
        "parallel ADD ({PARALLEL}-way): calico {ours:.0} pods/s (goal >= 200)   ptp+host-local {theirs:.0} pods/s   ratio {:.2}x",
        ours / theirs
    );
}
