//! Test harness: a real etcd on free loopback ports (started, killed and restarted by the
//! test), a TCP proxy that can cut connections, and helpers. Everything is cleaned up on
//! drop, also when a test fails.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use calico_node::datastore::{DatastoreConfig, EtcdDatastore};

pub mod bgp;
pub mod cluster;
pub mod kube_proxy;
pub mod policy;

/// Whether a program is installed.
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Print a loud skip line; tests return early after it.
pub fn skip(reason: &str) {
    eprintln!("\n*** SKIPPED: {reason} ***\n");
}

/// A free loopback port (bound then released).
///
/// Ports come from below the kernel's ephemeral range (32768 and up by default): a port
/// the OS hands out for `bind(0)` or an outgoing connection could otherwise be taken by
/// another test in the window where a server the test killed is restarted on it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // A start that differs between test processes running at once.
    let seed = std::process::id().wrapping_mul(2_654_435_761);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + (seed.wrapping_add(n.wrapping_mul(7_919)) % 12_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A CNI plugin directory laid out as Calico installs it: `calico`, and `calico-ipam` as the
/// same binary (links to this build's `calico`, so the IPAM step runs inside the `calico`
/// process). One directory per build profile, and a link to another binary is replaced: a
/// link left by a debug test run must never send a release benchmark to the debug binary.
#[allow(dead_code)]
pub fn cni_install_dir(name: &str) -> PathBuf {
    let exe = Path::new(env!("CARGO_BIN_EXE_calico"));
    let profile = exe
        .parent()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("build");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{profile}"));
    std::fs::create_dir_all(&dir).unwrap();
    for bin in ["calico", "calico-ipam"] {
        let link = dir.join(bin);
        if std::fs::read_link(&link).ok().as_deref() != Some(exe) {
            let _ = std::fs::remove_file(&link);
            // Another test process may have made it in between.
            let _ = std::os::unix::fs::symlink(exe, &link);
        }
    }
    dir
}

/// A real etcd server for one test.
pub struct Etcd {
    child: Option<Child>,
    /// Network namespace etcd runs in (None: the test's own).
    netns: Option<String>,
    pub dir: tempfile::TempDir,
    pub client_port: u16,
    peer_port: u16,
    /// Client TLS (server cert, key, CA; clients must present a cert signed by the CA).
    pub tls: Option<TlsFiles>,
    /// Another address clients may use (e.g. a node namespace's uplink address).
    also: Option<String>,
}

/// Certificates made with openssl for a TLS etcd on 127.0.0.1.
#[derive(Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl TlsFiles {
    /// A CA, a server certificate for IP 127.0.0.1 and a client certificate, in `dir`.
    pub fn generate(dir: &Path) -> TlsFiles {
        let sh = |script: &str| {
            let out = Command::new("sh")
                .arg("-c")
                .arg(script)
                .current_dir(dir)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{script}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
        sh(&format!(
            "openssl req -x509 {ec} -keyout ca-key.pem -out ca.pem -days 2 -subj /CN=test-ca"
        ));
        for (name, usage, san) in [
            ("server", "serverAuth", "subjectAltName=IP:127.0.0.1\n"),
            ("client", "clientAuth", ""),
        ] {
            sh(&format!(
                "openssl req {ec} -keyout {name}-key.pem -out {name}.csr -subj /CN={name} && \
                 printf '{san}extendedKeyUsage={usage}\n' > {name}.ext && \
                 openssl x509 -req -in {name}.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial \
                   -out {name}.pem -days 2 -extfile {name}.ext"
            ));
        }
        TlsFiles {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server-key.pem"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client-key.pem"),
        }
    }
}

impl Etcd {
    /// Start etcd, or return None (after a loud skip message) when it is not installed.
    pub fn start() -> Option<Etcd> {
        Self::start_in(None)
    }

    /// Start etcd inside a network namespace (on that namespace's loopback).
    pub fn start_in(netns: Option<&str>) -> Option<Etcd> {
        Self::start_on(netns, free_port())
    }

    /// Start etcd on a given client port, optionally inside a network namespace.
    pub fn start_on(netns: Option<&str>, client_port: u16) -> Option<Etcd> {
        if !have("etcd") {
            skip("etcd is not installed (scripts/test installs etcd-server)");
            return None;
        }
        let mut e = Etcd {
            child: None,
            netns: netns.map(str::to_string),
            dir: tempfile::tempdir().unwrap(),
            client_port,
            peer_port: free_port(),
            tls: None,
            also: None,
        };
        e.spawn();
        Some(e)
    }

    /// Like [`Etcd::start_on`], also listening on `ip` (for clients in other namespaces).
    pub fn start_on_also(netns: &str, client_port: u16, ip: &str) -> Option<Etcd> {
        if !have("etcd") {
            skip("etcd is not installed (scripts/test installs etcd-server)");
            return None;
        }
        let mut e = Etcd {
            child: None,
            netns: Some(netns.to_string()),
            dir: tempfile::tempdir().unwrap(),
            client_port,
            peer_port: free_port(),
            tls: None,
            also: Some(ip.to_string()),
        };
        e.spawn();
        Some(e)
    }

    /// Start etcd serving clients over TLS with client-certificate authentication.
    pub fn start_tls() -> Option<Etcd> {
        if !have("etcd") || !have("openssl") {
            skip("etcd or openssl is not installed");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let tls = TlsFiles::generate(dir.path());
        let mut e = Etcd {
            child: None,
            netns: None,
            dir,
            client_port: free_port(),
            peer_port: free_port(),
            tls: Some(tls),
            also: None,
        };
        e.spawn();
        Some(e)
    }

    fn tls_args(&self, server: bool) -> Vec<String> {
        let Some(t) = &self.tls else { return vec![] };
        let p = |p: &PathBuf| p.display().to_string();
        if server {
            vec![
                "--cert-file".into(),
                p(&t.server_cert),
                "--key-file".into(),
                p(&t.server_key),
                "--trusted-ca-file".into(),
                p(&t.ca),
                "--client-cert-auth".into(),
            ]
        } else {
            vec![
                "--cacert".into(),
                p(&t.ca),
                "--cert".into(),
                p(&t.client_cert),
                "--key".into(),
                p(&t.client_key),
            ]
        }
    }

    fn spawn(&mut self) {
        let c = self.endpoint();
        let p = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::File::create(self.dir.path().join("etcd.log")).unwrap();
        let child = self
            .cmd("etcd")
            .args(["--name", "s1", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &match &self.also {
                    Some(ip) => format!("{c},http://{ip}:{}", self.client_port),
                    None => c.clone(),
                },
                "--advertise-client-urls",
                &c,
            ])
            .args([
                "--listen-peer-urls",
                &p,
                "--initial-advertise-peer-urls",
                &p,
            ])
            .args(["--initial-cluster", &format!("s1={p}"), "--unsafe-no-fsync"])
            .args(self.tls_args(true))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.child = Some(child);
        self.wait_healthy();
    }

    fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let out = self
                .cmd("etcdctl")
                .env("ETCDCTL_API", "3")
                .args(["--endpoints", &self.endpoint(), "endpoint", "health"])
                .args(self.tls_args(false))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if out.is_ok_and(|s| s.success()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "etcd did not become healthy; log: {}",
            std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
        );
    }

    /// `http(s)://127.0.0.1:<port>`
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// A command run in etcd's namespace (`ip netns exec` execs, so PIDs are the program's).
    fn cmd(&self, program: &str) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
            None => Command::new(program),
        }
    }

    /// Datastore config pointing at this etcd (or at another endpoint, e.g. a proxy).
    pub fn config_for(endpoint: &str) -> DatastoreConfig {
        let mut c = DatastoreConfig::from_env(&calico_node::env::MapEnv::from_pairs(&[(
            "ETCD_ENDPOINTS",
            endpoint,
        )]))
        .unwrap();
        c.timeout = Duration::from_secs(3);
        c
    }

    /// A connected datastore.
    pub async fn datastore(&self) -> Arc<EtcdDatastore> {
        Arc::new(
            EtcdDatastore::connect(&Self::config_for(&self.endpoint()))
                .await
                .unwrap(),
        )
    }

    /// Run etcdctl and return stdout.
    pub fn etcdctl(&self, args: &[&str]) -> String {
        let out = self
            .cmd("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(self.endpoint())
            .args(self.tls_args(false))
            .args(args)
            .output()
            .expect("run etcdctl");
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The value of a key as etcdctl prints it.
    pub fn etcdctl_value(&self, key: &str) -> String {
        self.etcdctl(&["get", key, "--print-value-only"])
            .trim_end()
            .to_string()
    }

    /// The PID of the running etcd.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL etcd (by the PID we started).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start etcd again on the same ports and data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP proxy on loopback whose connections the test can cut and refuse.
pub struct Proxy {
    pub port: u16,
    state: Arc<std::sync::Mutex<ProxyState>>,
    task: tokio::task::JoinHandle<()>,
}

struct ProxyState {
    open: bool,
    conns: Vec<tokio::task::AbortHandle>,
}

impl Proxy {
    /// Start a proxy to `target`.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(std::sync::Mutex::new(ProxyState {
            open: true,
            conns: Vec::new(),
        }));
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !st.lock().unwrap().open {
                    drop(inbound);
                    continue;
                }
                let h = tokio::spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
                st.lock().unwrap().conns.push(h.abort_handle());
            }
        });
        Proxy { port, state, task }
    }

    /// Cut every connection and refuse new ones.
    pub fn cut(&self) {
        let mut s = self.state.lock().unwrap();
        s.open = false;
        for c in s.conns.drain(..) {
            c.abort();
        }
    }

    /// Accept connections again.
    pub fn restore(&self) {
        self.state.lock().unwrap().open = true;
    }

    /// `http://127.0.0.1:<port>`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

/// Path of a golden file.
pub fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

/// Compare with a golden file; `UPDATE_GOLDEN=1` rewrites it.
pub fn assert_golden(name: &str, actual: &str) {
    let p = golden(name);
    if std::env::var("UPDATE_GOLDEN").is_ok() {
        std::fs::write(&p, actual).unwrap();
    }
    let expected = std::fs::read_to_string(&p)
        .unwrap_or_else(|_| panic!("missing golden file {}", p.display()));
    assert_eq!(actual, expected, "golden {name} differs");
}

/// Poll `f` until it returns Some, or panic after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether we run as root (network namespace tests need it).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A network namespace created by the test, deleted on drop (also when the test fails).
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// Create `<prefix>-<random>`; None (after a loud skip) without root or iproute2.
    pub fn new(prefix: &str) -> Option<NetNs> {
        if !is_root() {
            skip("needs root to create network namespaces");
            return None;
        }
        if !have("ip") {
            skip("iproute2 is not installed");
            return None;
        }
        let mut b = [0u8; 4];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut b)
            .unwrap();
        let name = format!(
            "{prefix}-{}",
            b.iter().map(|x| format!("{x:02x}")).collect::<String>()
        );
        run("ip", &["netns", "add", &name]);
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        Some(ns)
    }

    /// `ip -n <ns> ...`, which must succeed.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// Host interfaces with no peer outside: a veth pair `eth0`/`eth1` inside the
    /// namespace, both up, with the addresses given for each (what calico-node's address
    /// autodetection, e.g. `interface=eth1`, picks from).
    pub fn add_host_veth(&self, eth0: &[&str], eth1: &[&str]) {
        self.ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
        ]);
        for (dev, addrs) in [("eth0", eth0), ("eth1", eth1)] {
            for a in addrs {
                self.ip(&["addr", "add", a, "dev", dev]);
            }
        }
        self.ip(&["link", "set", "eth0", "up"]);
        self.ip(&["link", "set", "eth1", "up"]);
    }

    /// Give a node namespace an uplink `eth0` (10.99.0.1/24, the other end idle) and a
    /// default route through it: the node then routes 169.254.1.1 elsewhere, which is what
    /// makes proxy ARP answer for it on the pods' veths.
    pub fn add_uplink(&self) {
        self.ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "uplink",
        ]);
        self.ip(&["addr", "add", "10.99.0.1/24", "dev", "eth0"]);
        self.ip(&["link", "set", "eth0", "up"]);
        self.ip(&["link", "set", "uplink", "up"]);
        self.ip(&[
            "route",
            "add",
            "default",
            "via",
            "10.99.0.254",
            "dev",
            "eth0",
        ]);
    }

    /// The index of interface `name` in the namespace (`5: eth0@peer0: <...`).
    pub fn ifindex(&self, name: &str) -> u32 {
        let out = Command::new("ip")
            .args(["-n", &self.name, "-o", "link", "show", "dev", name])
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&out.stdout);
        out.split(':')
            .next()
            .and_then(|i| i.trim().parse().ok())
            .unwrap_or_else(|| panic!("no interface {name}: {out:?}"))
    }

    /// A command that will run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Run `f` with a netlink handle inside the namespace (on a runtime of its own).
    pub fn with_netlink<T, F, Fut>(&self, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce(rtnetlink::Handle) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T>,
    {
        self.run_in(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .unwrap()
                .block_on(async move {
                    let (conn, h, _) = rtnetlink::new_connection().unwrap();
                    tokio::spawn(conn);
                    f(h).await
                })
        })
    }

    /// Loads an nftables ruleset (`nft -f -`) into the namespace; it must load.
    pub fn nft(&self, ruleset: &str) {
        let out = output_with_stdin(self.command("nft").args(["-f", "-"]), ruleset);
        assert!(
            out.status.success(),
            "nft in {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Run `f` on a thread that has entered the namespace (sockets it opens live there).
    pub fn run_in<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let fd = std::fs::File::open(&path).unwrap();
            nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A node namespace with an address for BGP (10.99.8.1/24 on eth1, see
/// [`NetNs::add_host_veth`]) and etcd inside it; None (after a loud skip) without root,
/// iproute2 or etcd.
pub fn node_ns_with_etcd(prefix: &str) -> Option<(NetNs, Etcd)> {
    let ns = NetNs::new(prefix)?;
    ns.add_host_veth(&[], &["10.99.8.1/24"]);
    let etcd = Etcd::start_on(Some(&ns.name), free_port())?;
    Some((ns, etcd))
}

/// Run a command that must succeed.
pub fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `c` with `input` on its stdin and its stdout and stderr captured, as a CNI runtime
/// calls a plugin (the network config on stdin) or a person pipes YAML to calicoctl.
pub fn output_with_stdin(c: &mut Command, input: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Polls `path` on `port` inside `ns` every 100 ms until it answers `want`; its body.
/// Panics after `limit` with the last answer.
pub fn wait_http(ns: &NetNs, port: u16, path: &'static str, want: u16, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Ok((status, body)) = ns.run_in(move || http_get(port, path)) {
            if status == want {
                return body;
            }
            last = format!("{status} {body}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{path} never answered {want}; last: {last}");
}

/// A plain HTTP/1.1 GET on 127.0.0.1 (of the calling thread's namespace): (status, body).
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Create an IPPool and mark the datastore ready (what calico-node does before pods run).
pub async fn seed_pool_and_ready(endpoint: &str, cidr: &str) {
    use calico_node::datastore::Client;
    use calico_node::model::{ClusterInformation, ClusterInformationSpec, IPPool, IPPoolSpec};
    let client = Client::new(Etcd::config_for(endpoint).connect().await.unwrap());
    let spec = IPPoolSpec {
        cidr: cidr.into(),
        ..Default::default()
    };
    client.create(IPPool::new("pool", spec)).await.unwrap();
    let ci = ClusterInformationSpec {
        datastore_ready: Some(true),
        ..Default::default()
    };
    client
        .create(ClusterInformation::new("default", ci))
        .await
        .unwrap();
}

/// The same, from inside a namespace (for an etcd listening on that namespace's loopback).
pub fn seed_in_netns(ns: &NetNs, endpoint: String, cidr: &'static str) {
    ns.run_in(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(seed_pool_and_ready(&endpoint, cidr))
    });
}

/// A process the test started; killed (by its PID, through the handle) when dropped.
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Poll `f` every 20 ms until it holds; how long that took. Panics after `limit`.
pub fn until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

/// A raw netlink socket subscribed to IPv4 route notifications in the calling thread's
/// network namespace, with a large receive buffer (privileged: beyond rmem_max).
pub fn route_notification_socket() -> i32 {
    // SAFETY: plain socket calls on a descriptor the caller then owns.
    unsafe {
        let fd = libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE);
        assert!(fd >= 0, "netlink socket");
        let mut addr: libc::sockaddr_nl = std::mem::zeroed();
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = rtnetlink::constants::RTMGRP_IPV4_ROUTE;
        let size: libc::c_int = 512 << 20;
        libc::bind(
            fd,
            &addr as *const _ as *const libc::sockaddr,
            std::mem::size_of_val(&addr) as u32,
        );
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &size as *const _ as *const libc::c_void,
            4,
        );
        fd
    }
}

/// One IPv4 route notification: its type (RTM_NEWROUTE or RTM_DELROUTE), destination and
/// prefix length, protocol and output interface (0 when none).
pub struct RouteNote {
    pub kind: u16,
    pub dst: u32,
    pub dst_len: u8,
    pub protocol: u8,
    pub oif: u32,
    /// The route's metric (RTA_PRIORITY; 0 when absent).
    pub priority: u32,
}

/// The route notifications in one datagram read from [`route_notification_socket`].
pub fn route_notes(buf: &[u8]) -> Vec<RouteNote> {
    let mut out = Vec::new();
    let mut off = 0usize;
    while off + 28 <= buf.len() {
        let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
        let kind = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap());
        if len < 16 || off + len > buf.len() {
            break;
        }
        if kind == libc::RTM_NEWROUTE || kind == libc::RTM_DELROUTE {
            let rt = &buf[off + 16..off + len];
            let (mut dst, mut oif, mut priority, mut a) = (None, 0u32, 0u32, 12);
            while a + 4 <= rt.len() {
                let alen = u16::from_ne_bytes(rt[a..a + 2].try_into().unwrap()) as usize;
                let atype = u16::from_ne_bytes(rt[a + 2..a + 4].try_into().unwrap());
                if alen < 4 {
                    break;
                }
                if atype == libc::RTA_DST && alen >= 8 {
                    dst = Some(u32::from_be_bytes(rt[a + 4..a + 8].try_into().unwrap()));
                }
                if atype == libc::RTA_OIF && alen >= 8 {
                    oif = u32::from_ne_bytes(rt[a + 4..a + 8].try_into().unwrap());
                }
                if atype == libc::RTA_PRIORITY && alen >= 8 {
                    priority = u32::from_ne_bytes(rt[a + 4..a + 8].try_into().unwrap());
                }
                a += (alen + 3) & !3;
            }
            if let Some(dst) = dst {
                out.push(RouteNote {
                    kind,
                    dst,
                    dst_len: rt[1],
                    protocol: rt[5],
                    oif,
                    priority,
                });
            }
        }
        off += (len + 3) & !3;
    }
    out
}

/// Run time in nanoseconds (user and kernel, from schedstat) of each thread of a process:
/// thread id, name, nanoseconds.
#[allow(dead_code)]
pub fn thread_cpu_ns(pid: u32) -> Vec<(u32, String, u64)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| {
            let path = t.ok()?.path();
            let tid = path.file_name()?.to_str()?.parse().ok()?;
            let name = std::fs::read_to_string(path.join("comm")).ok()?;
            let ns = std::fs::read_to_string(path.join("schedstat")).ok()?;
            let ns = ns.split_whitespace().next()?.parse().ok()?;
            Some((tid, name.trim_end().to_string(), ns))
        })
        .collect()
}

/// Run time in nanoseconds of all threads of a process.
#[allow(dead_code)]
pub fn cpu_ns(pid: u32) -> u64 {
    thread_cpu_ns(pid).iter().map(|t| t.2).sum()
}

/// calicoctl against `etcd` (no config file), `stdin` fed in.
pub fn calicoctl(etcd: &Etcd, args: &[&str], stdin: &str) -> std::process::Output {
    output_with_stdin(
        Command::new(env!("CARGO_BIN_EXE_calicoctl"))
            .args(["-c", "/nonexistent/calicoctl.cfg"])
            .args(args)
            .env("ETCD_ENDPOINTS", etcd.endpoint()),
        stdin,
    )
}

/// The stdout of a calicoctl run that must have succeeded (its stderr in the failure).
pub fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "calicoctl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// A calico-node of the built binary in `ns` as node `node-a` (uplink `eth1`, pool
/// 10.244.0.0/16 with VXLAN Always), on etcd at `etcd_port`, with its health and metrics
/// ports; ended on drop. Waits until ready.
pub struct VxlanNode {
    pub health_port: u16,
    pub metrics_port: u16,
    pub state: tempfile::TempDir,
    _daemon: Process,
}

impl VxlanNode {
    pub fn start(ns: &NetNs, etcd_port: u16) -> VxlanNode {
        let (health_port, metrics_port) = (free_port(), free_port());
        let state = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(state.path().join("calico-node.log")).unwrap();
        let child = ns
            .command(env!("CARGO_BIN_EXE_calico-node"))
            .env_clear()
            .env("NODENAME", "node-a")
            .env("ETCD_ENDPOINTS", format!("http://127.0.0.1:{etcd_port}"))
            .env("IP_AUTODETECTION_METHOD", "interface=eth1")
            .env("CALICO_IPV4POOL_CIDR", "10.244.0.0/16")
            .env("CALICO_IPV4POOL_VXLAN", "Always")
            .env("CALICO_STATE_DIR", state.path())
            .env(
                "CALICO_BGP_STATUS_SOCKET",
                state.path().join("bgp-status.sock"),
            )
            .env("FELIX_HEALTHPORT", health_port.to_string())
            .env("FELIX_PROMETHEUSMETRICSENABLED", "true")
            .env("FELIX_PROMETHEUSMETRICSPORT", metrics_port.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let node = VxlanNode {
            health_port,
            metrics_port,
            state,
            _daemon: Process(child),
        };
        let ready = || {
            ns.run_in(move || http_get(health_port, "/readiness"))
                .is_ok_and(|(s, _)| s == 200)
        };
        until("calico-node ready", Duration::from_secs(30), ready);
        node
    }
}
