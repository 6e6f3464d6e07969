//! `scripts/bench converge`: a three-node lab (node namespaces on a bridge, etcd beside it,
//! one calico-node each; the pool's blocks are /32 so that every pod claims a new block).
//! (1) a pod ADD on node-1 until node-2 has the new block's route in its kernel; (2) a
//! pool mode change (NoEncap <-> VXLAN) until every other node has reprogrammed all of
//! node-1's block routes. Median and p99 over 50 trials each, with the native speaker and
//! with the BIRD backend (confd renders, a real BIRD per node), in the same run; and
//! calico-node's idle RSS in the native lab. Route times come from each node's kernel
//! notifications.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::{calico_node, calicoctl, cni};
use common::{Etcd, NetNs, Process, free_port, http_get};

const NODES: usize = 3;
/// Trials of each kind (`CALICO_BENCH_CONVERGE_TRIALS`, default 50).
fn trials() -> usize {
    std::env::var("CALICO_BENCH_CONVERGE_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50)
}

/// The latest notification per route (destination, prefix length; then metric): when,
/// present or not, its output interface. Routes of one prefix with different metrics live
/// side by side (BIRD's kernel protocol installs at metric 32, Felix at 0), and the
/// lowest present one is the one that forwards.
type Seen = Arc<Mutex<HashMap<(u32, u8), BTreeMap<u32, (Instant, bool, u32)>>>>;

/// The forwarding route of a prefix (the lowest metric present): the output interface,
/// and the latest change to any route of the prefix.
fn forwarding(routes: Option<&BTreeMap<u32, (Instant, bool, u32)>>) -> Option<(Instant, u32)> {
    let routes = routes?;
    let oif = routes.values().find(|r| r.1)?.2;
    let latest = routes.values().map(|r| r.0).max()?;
    Some((latest, oif))
}

/// Record every IPv4 route notification in `ns` (a thread with a raw netlink socket).
fn monitor(ns: &NetNs) -> Seen {
    let seen: Seen = Arc::default();
    let s2 = seen.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let path = format!("/run/netns/{}", ns.name);
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).unwrap();
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let fd = common::route_notification_socket();
        ready_tx.send(()).unwrap();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            // SAFETY: recv into our own buffer, on our own descriptor.
            let r = unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
            if r <= 0 {
                continue;
            }
            let now = Instant::now();
            let mut seen = s2.lock().unwrap();
            for n in common::route_notes(&buf[..r as usize]) {
                seen.entry((n.dst, n.dst_len))
                    .or_default()
                    .insert(n.priority, (now, n.kind == libc::RTM_NEWROUTE, n.oif));
            }
        }
    });
    ready_rx.recv().unwrap();
    seen
}

/// When each etcd key was written (every PUT, in order), seen by a watch from the hub.
type Writes = Arc<Mutex<HashMap<String, Vec<Instant>>>>;

/// Watch every `/calico/` key of the lab's etcd (from the hub namespace, where it listens).
/// The part of a convergence that follows the datastore write is where the native speaker
/// and the BIRD backend differ: the ADD's and calicoctl's own work is the same for both.
fn watch_writes(hub: &NetNs, ep: &str) -> Writes {
    let writes: Writes = Arc::default();
    let w2 = writes.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let path = format!("/run/netns/{}", hub.name);
    let ep = ep.to_string();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).unwrap();
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut client = etcd_client::Client::connect([ep], None).await.unwrap();
            let opts = etcd_client::WatchOptions::new().with_prefix();
            let mut stream = client.watch("/calico/", Some(opts)).await.unwrap();
            ready_tx.send(()).unwrap();
            while let Ok(Some(resp)) = stream.message().await {
                let now = Instant::now();
                let mut w = w2.lock().unwrap();
                for e in resp.events() {
                    if e.event_type() == etcd_client::EventType::Put
                        && let Some(kv) = e.kv()
                        && let Ok(k) = kv.key_str()
                    {
                        w.entry(k.to_string()).or_default().push(now);
                    }
                }
            }
        });
    });
    ready_rx.recv().unwrap();
    writes
}

/// The first write of `key` at or after `since`.
fn written(writes: &Writes, key: &str, since: Instant) -> Option<Instant> {
    let limit = Instant::now() + Duration::from_secs(5);
    loop {
        let w = writes
            .lock()
            .unwrap()
            .get(key)
            .and_then(|v| v.iter().copied().find(|t| *t >= since));
        if w.is_some() || Instant::now() > limit {
            return w;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn ipv4(s: &str) -> u32 {
    u32::from(s.parse::<std::net::Ipv4Addr>().unwrap())
}

fn ifindex(ns: &NetNs, dev: &str) -> u32 {
    let out = std::process::Command::new("ip")
        .args(["-n", &ns.name, "-o", "link", "show", dev])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split(':').next().unwrap().trim().parse().unwrap()
}

fn stats(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    (
        ms(v[v.len() / 2]),
        ms(v[(v.len() * 99 / 100).min(v.len() - 1)]),
    )
}

struct Lab {
    hub: NetNs,
    nodes: Vec<NetNs>,
    _etcd: Etcd,
    ep: String,
    states: Vec<tempfile::TempDir>,
    daemons: Vec<Process>,
    _birds: Vec<Process>,
}

/// The lab; `bird`: calico-node renders BIRD's configuration and a real BIRD runs per node.
fn lab(bird: bool) -> Option<Lab> {
    let hub = NetNs::new("cv-hub")?;
    let nodes: Vec<NetNs> = (0..NODES).filter_map(|_| NetNs::new("cv-n")).collect();
    common::cluster::bridged(&hub, &nodes);
    let port = free_port();
    let etcd = Etcd::start_on_also(&hub.name, port, "10.99.0.254")?;
    let ep = format!("http://10.99.0.254:{port}");
    let states: Vec<tempfile::TempDir> = (0..NODES).map(|_| tempfile::tempdir().unwrap()).collect();
    let health: Vec<u16> = (0..NODES).map(|_| free_port()).collect();
    let mut daemons = Vec::new();
    let mut birds = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let dir = states[i].path().join("bird");
        let sock = states[i].path().join("bird.ctl");
        let mut env = vec![("CALICO_IPV4POOL_BLOCK_SIZE", "32".to_string())];
        if bird {
            env.push(("CALICO_NETWORKING_BACKEND", "bird-external".into()));
            env.push(("CALICO_BIRD_CONFIG_DIR", dir.display().to_string()));
            env.push(("CALICO_BIRD_SOCKET", sock.display().to_string()));
        }
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        daemons.push(calico_node(
            n,
            &format!("node-{}", i + 1),
            &ep,
            states[i].path(),
            health[i],
            &env,
        ));
    }
    if bird {
        for (i, n) in nodes.iter().enumerate() {
            let dir = states[i].path().join("bird");
            common::until("BIRD's configuration", Duration::from_secs(30), || {
                std::fs::read_to_string(dir.join("bird.cfg"))
                    .is_ok_and(|c| c.matches("protocol bgp").count() == NODES - 1)
            });
            birds.push(common::bgp::bird_external(
                n,
                &dir.join("bird.cfg"),
                &states[i].path().join("bird.ctl"),
                &states[i].path().join("bird.pid"),
            ));
        }
    }
    for (i, n) in nodes.iter().enumerate() {
        let p = health[i];
        common::until("calico-node ready", Duration::from_secs(60), || {
            n.run_in(move || http_get(p, "/readiness"))
                .is_ok_and(|(s, _)| s == 200)
        });
    }
    if bird {
        // Every BIRD session up.
        for (i, n) in nodes.iter().enumerate() {
            let sock = states[i].path().join("bird.ctl");
            common::until("BIRD sessions", Duration::from_secs(60), || {
                let out = n
                    .command("birdc")
                    .arg("-s")
                    .arg(&sock)
                    .args(["show", "protocols"])
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&out.stdout)
                    .matches("Established")
                    .count()
                    == NODES - 1
            });
        }
    }
    // Every pod claims a block: let node-1 hold them all (the default is 20 per node).
    calicoctl(
        &nodes[0],
        &ep,
        states[0].path(),
        &["ipam", "configure", "--max-blocks-per-host=10000"],
        "",
    );
    Some(Lab {
        hub,
        nodes,
        _etcd: etcd,
        ep,
        states,
        daemons,
        _birds: birds,
    })
}

/// Pod ADDs on node-1, each claiming a block, until node-2's kernel has its route; then
/// pool mode changes until node-2 and node-3 have switched every node-1 block route.
fn measure(lab: &Lab, label: &str) -> Measured {
    let seen: Vec<Seen> = lab.nodes.iter().map(monitor).collect();
    let writes = watch_writes(&lab.hub, &lab.ep);
    let mut claim_after_write = Vec::new();
    let mut switch_after_write = Vec::new();
    let pods: Vec<NetNs> = (0..trials()).filter_map(|_| NetNs::new("cv-p")).collect();
    let mut claim = Vec::new();
    let mut add_time = Vec::new();
    let mut blocks = Vec::new();
    for pod in &pods {
        let t0 = Instant::now();
        let (ok, v) = cni(
            &lab.nodes[0],
            "node-1",
            &lab.ep,
            pod,
            "ADD",
            &container_id(pod),
        );
        assert!(ok, "{label}: ADD: {v}");
        add_time.push(t0.elapsed());
        let addr = v["ips"][0]["address"]
            .as_str()
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .to_string();
        let key = (ipv4(&addr), 32u8);
        let limit = t0 + Duration::from_secs(30);
        loop {
            if let Some((t, _)) = forwarding(seen[1].lock().unwrap().get(&key))
                && t >= t0
            {
                claim.push(t - t0);
                // From the block's creation in etcd (by node-1's IPAM, inside the ADD).
                let block = format!("/calico/ipam/v2/assignment/ipv4/block/{addr}-32");
                let created = written(&writes, &block, t0)
                    .unwrap_or_else(|| panic!("{label}: no write of {block} seen"));
                claim_after_write.push(t.saturating_duration_since(created));
                break;
            }
            assert!(
                Instant::now() < limit,
                "{label}: node-2 never got {addr}/32"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        blocks.push(key);
    }
    let eth0: Vec<u32> = lab.nodes.iter().map(|n| ifindex(n, "eth0")).collect();
    let mut switch = Vec::new();
    for trial in 0..trials() {
        let (from, to) = if trial % 2 == 0 {
            ("Never", "Always")
        } else {
            ("Always", "Never")
        };
        let pool = calicoctl(
            &lab.nodes[0],
            &lab.ep,
            lab.states[0].path(),
            &["get", "ippool", "default-ipv4-ippool", "-o", "yaml"],
            "",
        );
        let yaml = pool.replace(&format!("vxlanMode: {from}"), &format!("vxlanMode: {to}"));
        let t0 = Instant::now();
        let wall0 = std::time::SystemTime::now();
        calicoctl(
            &lab.nodes[0],
            &lab.ep,
            lab.states[0].path(),
            &["apply", "-f", "-"],
            &yaml,
        );
        let applied = t0.elapsed();
        let limit = t0 + Duration::from_secs(60);
        let done = loop {
            let mut last = t0;
            let all = (1..NODES).all(|n| {
                let s = seen[n].lock().unwrap();
                blocks.iter().all(|b| match forwarding(s.get(b)) {
                    Some((t, oif)) if t >= t0 && ((to == "Never") == (oif == eth0[n])) => {
                        last = last.max(t);
                        true
                    }
                    _ => false,
                })
            });
            if all {
                break last;
            }
            assert!(Instant::now() < limit, "{label}: mode {to} not everywhere");
            std::thread::sleep(Duration::from_millis(2));
        };
        if std::env::var_os("CALICO_BENCH_VERBOSE").is_some() {
            let first = (1..NODES)
                .filter_map(|n| {
                    let s = seen[n].lock().unwrap();
                    blocks
                        .iter()
                        .filter_map(|b| forwarding(s.get(b)).map(|v| v.0))
                        .filter(|t| *t >= t0)
                        .min()
                })
                .min()
                .map(|t| t - t0);
            eprintln!(
                "  {label}: {from} -> {to} in {:?} (calicoctl returned after {applied:?}, first route after {first:?}) t0 {:?}",
                done - t0,
                wall0.duration_since(std::time::UNIX_EPOCH).unwrap()
            );
        }
        if std::env::var_os("CALICO_BENCH_VERBOSE").is_some() && trial < 4 {
            // The datastore writes of this change, in order: where its time went.
            let mut after: Vec<(Duration, String)> = writes
                .lock()
                .unwrap()
                .iter()
                .flat_map(|(k, ts)| {
                    ts.iter()
                        .filter(|t| **t >= t0)
                        .map(|t| (*t - t0, k.clone()))
                })
                .collect();
            after.sort();
            for (at, key) in after {
                eprintln!("    +{:.1} ms {key}", at.as_secs_f64() * 1e3);
            }
        }
        switch.push(done - t0);
        let key = "/calico/resources/v3/projectcalico.org/ippools/default-ipv4-ippool";
        let put =
            written(&writes, key, t0).unwrap_or_else(|| panic!("{label}: no write of {key} seen"));
        switch_after_write.push(done.saturating_duration_since(put));
    }
    let (add, add99) = stats(add_time);
    println!("  ({label}: the CNI ADD itself took {add:.1} / {add99:.1} ms)");
    for pod in &pods {
        let _ = cni(
            &lab.nodes[0],
            "node-1",
            &lab.ep,
            pod,
            "DEL",
            &container_id(pod),
        );
    }
    Measured {
        claim,
        switch,
        claim_after_write,
        switch_after_write,
    }
}

/// One lab's trials: each time from the user's action (the ADD, calicoctl) and from the
/// datastore write it makes (the block's creation, the pool's update).
struct Measured {
    claim: Vec<Duration>,
    switch: Vec<Duration>,
    claim_after_write: Vec<Duration>,
    switch_after_write: Vec<Duration>,
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn main() {
    if !common::have("bird") || !common::have("birdc") {
        common::skip("BIRD 2 is not installed (bird2)");
        return;
    }
    let Some(native) = lab(false) else { return };
    // Idle: settled, nothing changing.
    std::thread::sleep(Duration::from_secs(5));
    let rss: Vec<u64> = native.daemons.iter().map(|d| rss_kib(d.0.id())).collect();
    let native_m = measure(&native, "native");
    drop(native);
    let Some(bird) = lab(true) else { return };
    let bird_m = measure(&bird, "bird");
    drop(bird);
    println!(
        "Convergence in a {NODES}-node lab, {} trials each (median / p99):",
        trials()
    );
    let line = |what: &str, n: &[Duration], b: &[Duration], goals: &str| {
        let (nm, n99) = stats(n.to_vec());
        let (bm, b99) = stats(b.to_vec());
        println!(
            "  {what}: native {nm:.1} / {n99:.1} ms, BIRD backend {bm:.1} / {b99:.1} ms, p99 ratio {:.2}x{goals}",
            n99 / b99
        );
    };
    let goals = " (goals: p99 <= 100 ms, <= 0.2x)";
    line(
        "pod ADD claiming a block -> route in node-2's kernel",
        &native_m.claim,
        &bird_m.claim,
        goals,
    );
    line(
        "pool mode change -> every node reprogrammed",
        &native_m.switch,
        &bird_m.switch,
        goals,
    );
    println!("  the same, from the datastore write (where the two backends differ):");
    line(
        "  block created in etcd -> route in node-2's kernel",
        &native_m.claim_after_write,
        &bird_m.claim_after_write,
        "",
    );
    line(
        "  pool updated in etcd -> every node reprogrammed",
        &native_m.switch_after_write,
        &bird_m.switch_after_write,
        "",
    );
    println!(
        "  calico-node idle RSS: {} MiB (max of {NODES} nodes; goal <= 20 MiB)",
        rss.iter().max().copied().unwrap_or(0) as f64 / 1024.0
    );
}

/// A pod's container ID: its namespace's random part first. Outside Kubernetes the host
/// interface is `cali` + the ID's first 11 characters, so IDs must differ there
/// (`pod-cv-p-<hex>` collided for pods whose first hex byte matched).
fn container_id(pod: &NetNs) -> String {
    let random = pod.name.rsplit('-').next().unwrap_or(&pod.name);
    format!("{random}-cv-pod")
}
