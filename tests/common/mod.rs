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
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A real etcd server for one test.
pub struct Etcd {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub client_port: u16,
    peer_port: u16,
}

impl Etcd {
    /// Start etcd, or return None (after a loud skip message) when it is not installed.
    pub fn start() -> Option<Etcd> {
        if !have("etcd") {
            skip("etcd is not installed (scripts/test installs etcd-server)");
            return None;
        }
        let mut e = Etcd {
            child: None,
            dir: tempfile::tempdir().unwrap(),
            client_port: free_port(),
            peer_port: free_port(),
        };
        e.spawn();
        Some(e)
    }

    fn spawn(&mut self) {
        let c = format!("http://127.0.0.1:{}", self.client_port);
        let p = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::File::create(self.dir.path().join("etcd.log")).unwrap();
        let child = Command::new("etcd")
            .args(["--name", "s1", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
            .args(["--listen-peer-urls", &p, "--initial-advertise-peer-urls", &p])
            .args(["--initial-cluster", &format!("s1={p}"), "--unsafe-no-fsync"])
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
            let out = Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .args(["--endpoints", &self.endpoint(), "endpoint", "health"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if out.is_ok_and(|s| s.success()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("etcd did not become healthy; log: {}", std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default());
    }

    /// `http://127.0.0.1:<port>`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// Datastore config pointing at this etcd (or at another endpoint, e.g. a proxy).
    pub fn config_for(endpoint: &str) -> DatastoreConfig {
        let mut c = DatastoreConfig::from_env(&calico_node::env::MapEnv::from_pairs(&[("ETCD_ENDPOINTS", endpoint)])).unwrap();
        c.timeout = Duration::from_secs(3);
        c
    }

    /// A connected datastore.
    pub async fn datastore(&self) -> Arc<EtcdDatastore> {
        Arc::new(EtcdDatastore::connect(&Self::config_for(&self.endpoint())).await.unwrap())
    }

    /// Run etcdctl and return stdout.
    pub fn etcdctl(&self, args: &[&str]) -> String {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(self.endpoint())
            .args(args)
            .output()
            .expect("run etcdctl");
        assert!(out.status.success(), "etcdctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// The value of a key as etcdctl prints it.
    pub fn etcdctl_value(&self, key: &str) -> String {
        self.etcdctl(&["get", key, "--print-value-only"]).trim_end().to_string()
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
        let state = Arc::new(std::sync::Mutex::new(ProxyState { open: true, conns: Vec::new() }));
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else { return };
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
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name)
}

/// Compare with a golden file; `UPDATE_GOLDEN=1` rewrites it.
pub fn assert_golden(name: &str, actual: &str) {
    let p = golden(name);
    if std::env::var("UPDATE_GOLDEN").is_ok() {
        std::fs::write(&p, actual).unwrap();
    }
    let expected = std::fs::read_to_string(&p).unwrap_or_else(|_| panic!("missing golden file {}", p.display()));
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
