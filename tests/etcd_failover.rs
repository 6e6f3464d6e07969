//! etcd failover without double writes: a 3-member etcd cluster whose leader is killed
//! (SIGKILL) while 200 addresses are being assigned at once. Writes in flight on the
//! leader have an unknown outcome (a broken connection, "leader changed", "request timed
//! out"); the datastore reads the key back before resending, so no address is handed out
//! twice, no handle holds more than it asked for, no block is left without its affinity,
//! and `calicoctl ipam check` finds nothing wrong.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use calico_node::datastore::{Client, Datastore, EtcdDatastore};
use calico_node::ipam::{AssignArgs, Ipam};
use calico_node::model::ipam::{AllocationBlock, IPAMHandle};
use calico_node::model::keys::{self, IpamKey};
use calico_node::model::{
    IPPool, IPPoolSpec, Node, NodeSpec, WorkloadEndpoint, WorkloadEndpointSpec,
};
use common::{Etcd, free_port, have, skip};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A 3-member etcd cluster on loopback, each member killed by its PID on drop.
struct Cluster {
    members: Vec<Option<Child>>,
    client_ports: Vec<u16>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Option<Cluster> {
        if !have("etcd") || !have("etcdctl") {
            skip("etcd is not installed (scripts/test installs etcd-server and etcd-client)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let client_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let peer_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let initial = (0..3)
            .map(|i| format!("m{i}=http://127.0.0.1:{}", peer_ports[i]))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        for i in 0..3 {
            let log = std::fs::File::create(dir.path().join(format!("m{i}.log"))).unwrap();
            let client = format!("http://127.0.0.1:{}", client_ports[i]);
            let peer = format!("http://127.0.0.1:{}", peer_ports[i]);
            let child = Command::new("etcd")
                .args(["--name", &format!("m{i}"), "--data-dir"])
                .arg(dir.path().join(format!("m{i}")))
                .args(["--listen-client-urls", &client])
                .args(["--advertise-client-urls", &client])
                .args(["--listen-peer-urls", &peer])
                .args(["--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &initial])
                .args(["--initial-cluster-state", "new"])
                .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
                .arg("--unsafe-no-fsync")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start etcd");
            members.push(Some(child));
        }
        let c = Cluster {
            members,
            client_ports,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while c.leader().is_none() {
            assert!(
                Instant::now() < deadline,
                "the etcd cluster elected no leader"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(c)
    }

    fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.client_ports[i])
    }

    fn endpoints(&self) -> Vec<String> {
        (0..3).map(|i| self.endpoint(i)).collect()
    }

    /// Index of the member that is leader, asked of every live member.
    fn leader(&self) -> Option<usize> {
        let live: Vec<String> = (0..3)
            .filter(|i| self.members[*i].is_some())
            .map(|i| self.endpoint(i))
            .collect();
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args([
                "--endpoints",
                &live.join(","),
                "endpoint",
                "status",
                "-w",
                "json",
            ])
            .output()
            .ok()?;
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        for s in status.as_array()? {
            let me = s["Status"]["header"]["member_id"].as_u64()?;
            if s["Status"]["leader"].as_u64()? == me {
                let ep = s["Endpoint"].as_str()?;
                return (0..3).find(|i| self.endpoint(*i) == ep);
            }
        }
        None
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..3 {
            self.kill(i);
        }
    }
}

const HOSTS: usize = 4;
const ASSIGNS: usize = 200;

async fn connect(endpoints: &[String]) -> Arc<EtcdDatastore> {
    let cfg = Etcd::config_for(&endpoints.join(","));
    Arc::new(EtcdDatastore::connect(&cfg).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_killed_during_concurrent_assigns_leaves_ipam_consistent() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .with_test_writer()
        .try_init();
    let Some(mut cluster) = Cluster::start() else {
        return;
    };
    let leader = cluster.leader().unwrap();
    // The leader first, so the clients' requests are on it when it dies.
    let mut eps = cluster.endpoints();
    eps.swap(0, leader);
    let ds = connect(&eps).await;
    let client = Client::new(ds.clone());
    // /28 blocks: each host claims several, so block claims race the kill too.
    client
        .create(IPPool::new(
            "pool",
            IPPoolSpec {
                cidr: "10.77.0.0/20".into(),
                block_size: Some(28),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    for h in 0..HOSTS {
        client
            .create(Node::new(format!("host-{h}"), NodeSpec::default()))
            .await
            .unwrap();
    }

    let ipam = Ipam::new(ds.clone() as Arc<dyn Datastore>);
    let started = Instant::now();
    let done = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..ASSIGNS)
        .map(|i| {
            let (ipam, done) = (ipam.clone(), done.clone());
            tokio::spawn(async move {
                let args = AssignArgs::v4(
                    &format!("k8s-pod-network.c{i}"),
                    &format!("host-{}", i % HOSTS),
                );
                let r = ipam.auto_assign(&args).await;
                done.fetch_add(1, Ordering::SeqCst);
                r
            })
        })
        .collect();
    // Kill the leader while the assignments are in full flow.
    while done.load(Ordering::SeqCst) < ASSIGNS / 4 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    cluster.kill(leader);
    let done_before_kill = done.load(Ordering::SeqCst);
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    eprintln!(
        "{done_before_kill} of {ASSIGNS} assigns done before the kill; all done in {:?}",
        started.elapsed()
    );
    assert!(
        done_before_kill < ASSIGNS,
        "the leader must die while assignments are in flight"
    );

    // Read the survivors' view.
    let survivors: Vec<String> = eps[1..].to_vec();
    let ds = connect(&survivors).await;
    let (block_kvs, _) = ds.list("/calico/ipam/v2/assignment/").await.unwrap();
    let (handle_kvs, _) = ds.list("/calico/ipam/v2/handle/").await.unwrap();
    let (aff_kvs, _) = ds.list("/calico/ipam/v2/host/").await.unwrap();

    // Allocations per handle, from the blocks (the truth).
    let mut held: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    let mut per_block: HashMap<(String, String), u64> = HashMap::new();
    let mut blocks = Vec::new();
    for kv in &block_kvs {
        let Some(IpamKey::Block(cidr)) = keys::parse_ipam_key(&kv.key) else {
            continue;
        };
        let b = AllocationBlock::decode(Some(&cidr), &kv.value).unwrap();
        for ip in cidr.hosts().chain([cidr.network(), cidr.broadcast()]) {
            if let Some(Some(h)) = b.handle_of(ip) {
                held.entry(h.to_string()).or_default().push(ip);
                *per_block
                    .entry((h.to_string(), cidr.to_string()))
                    .or_default() += 1;
            }
        }
        blocks.push((cidr, b));
    }
    for ips in held.values_mut() {
        ips.sort();
        ips.dedup();
    }

    let mut seen = HashSet::new();
    let mut failed = 0;
    for (i, r) in results.iter().enumerate() {
        let handle = format!("k8s-pod-network.c{i}");
        match r {
            Ok(ips) => {
                assert_eq!(ips.len(), 1, "{handle}: {ips:?}");
                assert!(seen.insert(ips[0]), "{} handed out twice", ips[0]);
                assert_eq!(
                    held.get(&handle),
                    Some(ips),
                    "{handle} holds exactly the address it was given"
                );
            }
            Err(e) => {
                failed += 1;
                eprintln!("{handle}: {e}");
                assert_eq!(
                    held.get(&handle),
                    None,
                    "{handle} failed but holds addresses"
                );
            }
        }
    }
    assert!(
        failed * 10 <= ASSIGNS,
        "{failed} of {ASSIGNS} assigns failed"
    );

    // Handle records agree with the blocks.
    for kv in &handle_kvs {
        let Some(IpamKey::Handle(id)) = keys::parse_ipam_key(&kv.key) else {
            continue;
        };
        let h = IPAMHandle::decode(&kv.value).unwrap();
        for (block, count) in &h.block {
            assert_eq!(
                per_block
                    .get(&(id.clone(), block.clone()))
                    .copied()
                    .unwrap_or(0),
                *count,
                "handle {id} counts {count} in {block}"
            );
        }
    }
    for ((handle, block), n) in &per_block {
        let kv = handle_kvs
            .iter()
            .find(|kv| kv.key == keys::handle_key(handle))
            .unwrap_or_else(|| panic!("no handle record for {handle}"));
        let h = IPAMHandle::decode(&kv.value).unwrap();
        assert_eq!(h.block.get(block), Some(n), "handle {handle} in {block}");
    }

    // Every block has its confirmed affinity (no orphaned block), and every affinity its block.
    let affinities: HashSet<String> = aff_kvs.iter().map(|kv| kv.key.clone()).collect();
    for (cidr, b) in &blocks {
        let host = b
            .host()
            .unwrap_or_else(|| panic!("block {cidr} has no affinity"));
        let key = keys::affinity_key(host, cidr);
        assert!(
            affinities.contains(&key),
            "block {cidr} of {host} has no affinity record"
        );
    }
    for kv in &aff_kvs {
        let Some(IpamKey::Affinity { cidr, .. }) = keys::parse_ipam_key(&kv.key) else {
            continue;
        };
        assert!(
            blocks.iter().any(|(c, _)| *c == cidr),
            "affinity {} without its block",
            kv.key
        );
        assert!(
            !String::from_utf8_lossy(&kv.value).contains("pending"),
            "affinity {} left {}",
            kv.key,
            String::from_utf8_lossy(&kv.value)
        );
    }

    // With a WorkloadEndpoint for every address given out, calicoctl finds no problem.
    let client = Client::new(ds.clone());
    for (i, r) in results.iter().enumerate() {
        let Ok(ips) = r else { continue };
        let spec = WorkloadEndpointSpec {
            orchestrator: "k8s".into(),
            node: format!("host-{}", i % HOSTS),
            pod: format!("p{i}"),
            endpoint: "eth0".into(),
            container_id: format!("c{i}"),
            ip_networks: vec![format!("{}/32", ips[0])],
            ..Default::default()
        };
        let mut wep = WorkloadEndpoint::new(format!("host--{}-k8s-p{i}-eth0", i % HOSTS), spec);
        wep.metadata.namespace = Some("default".into());
        client.create(wep).await.unwrap();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_calicoctl"))
        .env_clear()
        .env("ETCD_ENDPOINTS", survivors.join(","))
        .args(["ipam", "check"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("found 0 problem(s)"), "{text}");
}

/// What a [`LossyProxy`] lets through.
const PASS: u8 = 0;
/// Requests reach etcd, its answers are dropped: the write commits, the client cannot know.
const DROP_ANSWERS: u8 = 1;
/// Requests are dropped: nothing reaches etcd.
const DROP_REQUESTS: u8 = 2;

/// A TCP proxy to etcd that can silently drop either direction (a member that dies after
/// committing a write, or before receiving it).
struct LossyProxy {
    port: u16,
    mode: Arc<AtomicU8>,
    task: tokio::task::JoinHandle<()>,
}

/// Copy `from` to `to`, dropping the bytes while the proxy's mode is `dropped_when`.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mode: Arc<AtomicU8>,
    dropped_when: u8,
) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if mode.load(Ordering::SeqCst) != dropped_when && to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl LossyProxy {
    async fn start(target: std::net::SocketAddr) -> LossyProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(AtomicU8::new(PASS));
        let m = mode.clone();
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(upstream) = tokio::net::TcpStream::connect(target).await else {
                    continue;
                };
                let (ci, co) = inbound.into_split();
                let (ui, uo) = upstream.into_split();
                tokio::spawn(pump(ci, uo, m.clone(), DROP_REQUESTS));
                tokio::spawn(pump(ui, co, m.clone(), DROP_ANSWERS));
            }
        });
        LossyProxy { port, mode, task }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }
}

impl Drop for LossyProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A datastore whose first member is the proxy and second the same etcd directly: what a
/// client sees of a member that fails after (or before) a write reached the cluster.
async fn behind_lossy_proxy() -> Option<(Etcd, LossyProxy, Arc<EtcdDatastore>)> {
    let etcd = Etcd::start()?;
    let proxy = LossyProxy::start(([127, 0, 0, 1], etcd.client_port).into()).await;
    let ds = connect(&[proxy.endpoint(), etcd.endpoint()]).await;
    // Connections through the proxy are up before it starts losing bytes.
    ds.get("/warm-up").await.unwrap();
    Some((etcd, proxy, ds))
}

#[tokio::test]
async fn a_write_whose_answer_is_lost_is_read_back_not_resent() {
    let Some((etcd, proxy, ds)) = behind_lossy_proxy().await else {
        return;
    };
    let key = "/calico/ipam/v2/handle/k8s-pod-network.c1";
    let rev = ds.create(key, b"v1".to_vec()).await.unwrap();

    // The update commits but its answer is lost: reading back finds our value, and the
    // caller gets the revision it was written at (resending would have failed with a
    // conflict against our own write, and IPAM would have assigned again).
    proxy.set(DROP_ANSWERS);
    let written = ds.update(key, b"v2".to_vec(), rev).await;
    let now = ds.get(key).await.unwrap().unwrap();
    assert_eq!(written, Ok(now.mod_revision), "{written:?}");
    assert_eq!(now.value, b"v2");

    // The same for a create and a delete.
    let key2 = "/calico/ipam/v2/handle/k8s-pod-network.c2";
    let created = ds.create(key2, b"c".to_vec()).await;
    let now2 = ds.get(key2).await.unwrap().unwrap();
    assert_eq!(created, Ok(now2.mod_revision));
    let deleted = ds.delete(key2, Some(now2.mod_revision)).await.unwrap();
    assert_eq!(deleted.value, b"c");
    assert_eq!(ds.get(key2).await.unwrap(), None);

    // A request that never reached etcd is resent once it is known not to have committed.
    proxy.set(DROP_REQUESTS);
    let written = ds.update(key, b"v3".to_vec(), now.mod_revision).await;
    let after = ds.get(key).await.unwrap().unwrap();
    assert_eq!(written, Ok(after.mod_revision));
    assert_eq!(after.value, b"v3");

    // Another writer got there first: the conflict it causes is reported, not hidden.
    proxy.set(DROP_ANSWERS);
    etcd.etcdctl(&["put", key, "someone-else"]);
    let stale = ds.update(key, b"v4".to_vec(), after.mod_revision).await;
    assert!(
        matches!(
            stale,
            Err(calico_node::datastore::DatastoreError::Conflict { .. })
        ),
        "{stale:?}"
    );
    assert_eq!(etcd.etcdctl_value(key), "someone-else");
}
