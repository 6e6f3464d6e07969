//! BGP interop harness: namespaces joined by veths, our speaker on a thread inside a
//! namespace, and real daemons (BIRD 2, GoBGP, FRR) started by the test and killed by PID
//! on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use calico_node::bgp::RouteUpdate;
use calico_node::bgp::config::DesiredBgpConfig;
use calico_node::bgp::speaker::{PeerStatus, Speaker};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{NetNs, have, skip};

/// Join two namespaces with a veth: `a` gets `a_ip/24`, `b` gets `b_ip/24`.
pub fn link(a: &NetNs, a_ip: &str, b: &NetNs, b_ip: &str) {
    let (ia, ib) = ("bgp-a", "bgp-b");
    a.ip(&[
        "link", "add", ia, "type", "veth", "peer", "name", ib, "netns", &b.name,
    ]);
    a.ip(&["addr", "add", &format!("{a_ip}/24"), "dev", ia]);
    b.ip(&["addr", "add", &format!("{b_ip}/24"), "dev", ib]);
    a.ip(&["link", "set", ia, "up"]);
    b.ip(&["link", "set", ib, "up"]);
}

/// Put several namespaces on one bridge (in the first one), each with its address.
pub fn lan(members: &[(&NetNs, &str)]) {
    let hub = members[0].0;
    hub.ip(&["link", "add", "br0", "type", "bridge"]);
    hub.ip(&["link", "set", "br0", "up"]);
    for (i, (ns, addr)) in members.iter().enumerate() {
        let (port, dev) = (format!("port{i}"), format!("lan{i}"));
        hub.ip(&[
            "link", "add", &port, "type", "veth", "peer", "name", &dev, "netns", &ns.name,
        ]);
        hub.ip(&["link", "set", &port, "master", "br0", "up"]);
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", &dev]);
        ns.ip(&["link", "set", &dev, "up"]);
    }
}

/// Our speaker running on its own thread inside a namespace.
pub struct OurSpeaker {
    pub config: watch::Sender<DesiredBgpConfig>,
    pub felix: mpsc::Receiver<Vec<RouteUpdate>>,
    pub status: watch::Receiver<Vec<PeerStatus>>,
    cancel: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Every update Felix got so far.
    pub seen: Vec<RouteUpdate>,
}

impl OurSpeaker {
    pub fn start(ns: &NetNs, cfg: DesiredBgpConfig) -> OurSpeaker {
        let (config, config_rx) = watch::channel(cfg.clone());
        let (felix_tx, felix) = mpsc::channel(10_000);
        let (status_tx, status) = watch::channel(Vec::new());
        let cancel = CancellationToken::new();
        let path = format!("/run/netns/{}", ns.name);
        let c = cancel.clone();
        let thread = std::thread::spawn(move || {
            let f = std::fs::File::open(&path).unwrap();
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let speaker = Speaker::new(cfg, felix_tx, status_tx);
                speaker.run(config_rx, c).await.unwrap();
            });
        });
        OurSpeaker {
            config,
            felix,
            status,
            cancel,
            thread: Some(thread),
            seen: Vec::new(),
        }
    }

    /// Stop it (sessions are closed with a Cease) and wait for the thread.
    pub fn stop(&mut self) {
        self.cancel.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Drain Felix's channel; the best routes it holds now.
    pub fn routes(&mut self) -> Vec<(String, String)> {
        while let Ok(batch) = self.felix.try_recv() {
            self.seen.extend(batch);
        }
        let mut have = std::collections::BTreeMap::new();
        for u in &self.seen {
            match u {
                RouteUpdate::Best(r) => {
                    have.insert(r.prefix.to_string(), r.next_hop.to_string());
                }
                RouteUpdate::Withdrawn(p) => {
                    have.remove(&p.to_string());
                }
                RouteUpdate::InSync => {}
            }
        }
        have.into_iter().collect()
    }

    pub fn peer_state(&self, peer: &str) -> Option<PeerStatus> {
        self.status
            .borrow()
            .iter()
            .find(|s| s.address.to_string() == peer)
            .cloned()
    }
}

impl Drop for OurSpeaker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Poll `f` every 100 ms until it gives Some, or panic after `limit` with `what`.
pub fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A daemon process started by the test in a namespace, killed by PID on drop.
pub struct Daemon {
    child: Child,
    pub dir: tempfile::TempDir,
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// BIRD 2 in `ns` with this config; None (after a loud skip) without BIRD.
pub fn bird(ns: &NetNs, config: &str) -> Option<Daemon> {
    if !have("bird") {
        skip("BIRD 2 is not installed (bird2)");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("bird.conf");
    std::fs::write(&conf, config).unwrap();
    let out = Command::new("bird")
        .args(["-p", "-c", conf.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bird -p: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let child = ns
        .command("bird")
        .args([
            "-f",
            "-c",
            conf.to_str().unwrap(),
            "-s",
            dir.path().join("bird.ctl").to_str().unwrap(),
            "-P",
            dir.path().join("bird.pid").to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let d = Daemon { child, dir };
    wait_for(Duration::from_secs(10), "BIRD's control socket", || {
        d.dir.path().join("bird.ctl").exists().then_some(())
    });
    Some(d)
}

/// BIRD 2 in `ns` on a configuration file confd rendered (backend `bird-external`, its
/// includes beside it), its control socket at `socket` and PID file at `pid_file` where
/// `calico-node` was told to find them; killed when dropped.
pub fn bird_external(ns: &NetNs, conf: &Path, socket: &Path, pid_file: &Path) -> super::Process {
    let child = ns
        .command("bird")
        .arg("-f")
        .arg("-c")
        .arg(conf)
        .arg("-s")
        .arg(socket)
        .arg("-P")
        .arg(pid_file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    super::Process(child)
}

/// `birdc` against a BIRD started by [`bird`].
pub fn birdc(d: &Daemon, cmd: &str) -> String {
    let sock: PathBuf = d.dir.path().join("bird.ctl");
    let out = Command::new("birdc")
        .args(["-s", sock.to_str().unwrap()])
        .args(cmd.split_whitespace())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One open connection to a BIRD's control socket: a command costs a write and a read,
/// not a `birdc` process (which costs milliseconds, on the cores a benchmark measures).
pub struct BirdCtl {
    conn: std::io::BufReader<std::os::unix::net::UnixStream>,
}

impl BirdCtl {
    pub fn connect(d: &Daemon) -> BirdCtl {
        let stream = std::os::unix::net::UnixStream::connect(d.dir.path().join("bird.ctl"))
            .expect("BIRD control socket");
        let mut c = BirdCtl {
            conn: std::io::BufReader::new(stream),
        };
        c.reply(); // the greeting: `0001 BIRD 2.x ready.`
        c
    }

    /// The reply's lines up to and including the last one (a 4-digit code and a space).
    fn reply(&mut self) -> String {
        use std::io::BufRead;
        let mut out = String::new();
        loop {
            let mut line = String::new();
            if self.conn.read_line(&mut line).unwrap_or(0) == 0 {
                return out;
            }
            out += &line;
            let b = line.as_bytes();
            if b.len() >= 5 && b[..4].iter().all(u8::is_ascii_digit) && b[4] == b' ' {
                return out;
            }
        }
    }

    /// Enable protocol `proto` and wait (polling every millisecond) until it is
    /// Established; the moment it was seen so.
    pub fn enable_until_established(&mut self, proto: &str) -> Instant {
        self.cmd(&format!("enable {proto}"));
        let limit = Instant::now() + Duration::from_secs(60);
        while !self
            .cmd(&format!("show protocols {proto}"))
            .contains("Established")
        {
            assert!(Instant::now() < limit, "{proto}: no session");
            std::thread::sleep(Duration::from_millis(1));
        }
        Instant::now()
    }

    pub fn cmd(&mut self, cmd: &str) -> String {
        use std::io::Write;
        self.conn
            .get_mut()
            .write_all(format!("{cmd}\n").as_bytes())
            .expect("BIRD control socket");
        self.reply()
    }
}

/// GoBGP in `ns` with this TOML config, its API on the namespace's loopback.
pub fn gobgp(ns: &NetNs, config: &str) -> Option<Daemon> {
    if !have("gobgpd") {
        skip("GoBGP is not installed (gobgpd)");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("gobgp.toml");
    std::fs::write(&conf, config).unwrap();
    let child = ns
        .command("gobgpd")
        .args([
            "-f",
            conf.to_str().unwrap(),
            "-t",
            "toml",
            "--api-hosts",
            "127.0.0.1:50051",
            "--pprof-disable",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let d = Daemon { child, dir };
    wait_for(Duration::from_secs(10), "GoBGP's API", || {
        ns.command("gobgp")
            .args(["global"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|_| ())
    });
    Some(d)
}

/// `gobgp <args>` inside the namespace.
pub fn gobgp_cli(ns: &NetNs, args: &str) -> String {
    let out = ns
        .command("gobgp")
        .args(args.split_whitespace())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// FRR's bgpd (no zebra) in `ns` with this config, listening on `listen`.
pub fn frr(ns: &NetNs, config: &str, listen: &str) -> Option<Daemon> {
    if !std::path::Path::new("/usr/lib/frr/bgpd").exists() {
        skip("FRR is not installed (frr)");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("bgpd.conf");
    std::fs::write(&conf, config).unwrap();
    // bgpd runs as the frr user: let it write its pid file and vty socket here.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let d = dir.path().to_str().unwrap().to_string();
    let child = ns
        .command("/usr/lib/frr/bgpd")
        .args([
            "-Z",
            "-f",
            conf.to_str().unwrap(),
            "-i",
            &format!("{d}/bgpd.pid"),
            "--vty_socket",
            &d,
            "-l",
            listen,
            "-A",
            "127.0.0.1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let daemon = Daemon { child, dir };
    wait_for(Duration::from_secs(10), "FRR's vty socket", || {
        std::path::Path::new(&format!("{d}/bgpd.vty"))
            .exists()
            .then_some(())
    });
    Some(daemon)
}

/// `vtysh -c ...` against an FRR started by [`frr`].
pub fn vtysh(d: &Daemon, cmds: &[&str]) -> String {
    let mut c = Command::new("vtysh");
    c.args(["--vty_socket", d.dir.path().to_str().unwrap()]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = c.output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// ExaBGP in `ns` with this config (it connects out to its neighbors).
pub fn exabgp(ns: &NetNs, config: &str) -> Option<Daemon> {
    if !have("exabgp") {
        skip("ExaBGP is not installed (exabgp)");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("exabgp.conf");
    std::fs::write(&conf, config).unwrap();
    let log = std::fs::File::create(dir.path().join("exabgp.log")).unwrap();
    let child = ns
        .command("env")
        .args([
            "exabgp_daemon_user=root",
            "exabgp_daemon_daemonize=false",
            "exabgp_log_destination=stdout",
            "exabgp_api_cli=false",
            "exabgp",
            conf.to_str().unwrap(),
        ])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    Some(Daemon { child, dir })
}

/// The export policy of the tests: the pool 10.244.0.0/16, nothing denied.
pub fn pool_policy() -> calico_node::bgp::config::ExportPolicy {
    calico_node::bgp::config::ExportPolicy {
        allowed: vec!["10.244.0.0/16".parse().unwrap()],
        ..Default::default()
    }
}

/// Our speaker's namespace and a BIRD's and a GoBGP's, on one LAN as 10.99.0.1, .2 and .3;
/// None (after a loud skip) without root.
pub fn us_bird_gobgp_lan() -> Option<(NetNs, NetNs, NetNs)> {
    let us = NetNs::new("bgp-us")?;
    let bird = NetNs::new("bgp-bird")?;
    let gobgp = NetNs::new("bgp-gobgp")?;
    lan(&[
        (&us, "10.99.0.1"),
        (&bird, "10.99.0.2"),
        (&gobgp, "10.99.0.3"),
    ]);
    Some((us, bird, gobgp))
}

/// Keep the injector's main loop awake (an idle BIRD defers its last UPDATE by ~3 s).
pub struct Poker {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Poker {
    /// Poke the BIRD whose control socket is `sock` every 5 ms, over one connection (a
    /// `birdc` process per poke cost a few milliseconds of CPU each, on a two-core machine
    /// shared with the daemons being measured).
    pub fn start(sock: std::path::PathBuf) -> Poker {
        use std::io::{Read, Write};
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("bench-poker".into())
            .spawn(move || {
                let Ok(mut c) = std::os::unix::net::UnixStream::connect(&sock) else {
                    return;
                };
                let _ = c.set_read_timeout(Some(Duration::from_millis(1)));
                let mut sink = [0u8; 4096];
                while !s.load(std::sync::atomic::Ordering::Relaxed) {
                    if c.write_all(b"show status\n").is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                    // Drain the answers (a read times out once there is nothing left).
                    while matches!(c.read(&mut sink), Ok(n) if n > 0) {}
                }
            });
        let thread = thread.expect("a thread for the poker");
        Poker {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Poker {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
