//! `calico-node -felix-ready -bird-ready` and the other probe flags: ask the running node
//! and answer as Calico's `node/pkg/health` does, with its messages, exit 0 or 1.
//!
//! - `-felix-live` / `-felix-ready`: GET `/liveness` / `/readiness` on
//!   `FELIX_HEALTHHOST:FELIX_HEALTHPORT` (default localhost:9099); a 2xx or 3xx passes.
//!   Calico's message ("liveness probe reporting 503") is followed here by the actors'
//!   reasons, so `kubectl describe` says what is wrong.
//! - `-bird-ready` / `-bird6-ready`: the BGP sessions over IPv4 / IPv6. The native speaker
//!   answers on its status socket (`CALICO_BGP_STATUS_SOCKET`); with
//!   `CALICO_NETWORKING_BACKEND=bird-external`, BIRD's control socket is asked `show
//!   protocols` as Calico does. Calico's rule: no peers is ready; for `-threshold-time`
//!   after start-up (the nodename file's age) every peer must be Established, afterwards
//!   one Established peer is enough; else "BGP not established with <peers>".
//! - `-bird-live` / `-bird6-live`: the speaker (or BIRD) answers on its socket, and the
//!   supervisor has not reported the BGP actor dead on `/liveness`.
//! - Backends `vxlan` and `none` run no BGP: the bird checks pass, as Calico's do for a
//!   node without peers.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::cli::HealthChecks;
use crate::env::Env;

/// How long one probe waits for an answer (Calico's BIRD socket timeout is 2 s; kubelet's
/// probe timeout in Calico's manifests is 10 s).
const TIMEOUT: Duration = Duration::from_secs(5);

/// Who speaks BGP on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BgpSource {
    /// The native speaker's status socket.
    Native(PathBuf),
    /// A BIRD the user runs (backend `bird-external`), by its control socket.
    Bird(PathBuf),
    /// No BGP (backends `vxlan`, `none`).
    None,
}

/// What the probes need, from the same variables as the daemon.
#[derive(Debug, Clone)]
pub struct ProbeConfig {
    pub health_host: String,
    pub health_port: u16,
    pub bgp: BgpSource,
    pub nodename_file: PathBuf,
}

impl ProbeConfig {
    /// Read the probe's variables; a bad `FELIX_HEALTHPORT` is named (Calico panics on it).
    pub fn from_env(env: &dyn Env) -> Result<ProbeConfig, String> {
        let health_port = match env.non_empty("FELIX_HEALTHPORT") {
            None => 9099,
            Some(p) => p.trim().parse::<u16>().map_err(|_| {
                format!("Failed to parse value for port \"{p}\" (FELIX_HEALTHPORT)")
            })?,
        };
        let health_host = env
            .non_empty("FELIX_HEALTHHOST")
            .unwrap_or_else(|| "localhost".into());
        let path = |var: &str, default: &str| {
            env.non_empty(var)
                .map_or_else(|| PathBuf::from(default), PathBuf::from)
        };
        let bgp = match env
            .non_empty("CALICO_NETWORKING_BACKEND")
            .map(|b| b.to_ascii_lowercase())
            .as_deref()
        {
            Some("vxlan") | Some("none") => BgpSource::None,
            Some("bird-external") => {
                BgpSource::Bird(path("CALICO_BIRD_SOCKET", "/var/run/calico/bird.ctl"))
            }
            _ => BgpSource::Native(path(
                "CALICO_BGP_STATUS_SOCKET",
                crate::bgp::status::DEFAULT_SOCKET,
            )),
        };
        let state = path("CALICO_STATE_DIR", super::config::DEFAULT_STATE_DIR);
        Ok(ProbeConfig {
            health_host,
            health_port,
            bgp,
            nodename_file: state.join("nodename"),
        })
    }
}

/// How long all the checks of one probe may take together: they run side by side (as
/// Calico's do), and one that has not answered by then fails, so the probe ends well
/// inside kubelet's 10 s `timeoutSeconds` (Calico's manifests) even with a wedged daemon.
const PROBE_DEADLINE: Duration = Duration::from_secs(8);

/// One check of a probe: its failure as Calico words it.
type Check = Box<dyn FnOnce(&ProbeConfig) -> Result<(), String> + Send>;

/// Run the checks; every failure as Calico words it (empty: all passed), in the order
/// Calico reports them.
pub fn run(checks: &HealthChecks, cfg: &ProbeConfig) -> Vec<String> {
    let threshold = checks.threshold;
    let all: [(bool, &str, Check); 6] = [
        (
            checks.felix_live,
            "Felix liveness",
            Box::new(|cfg| {
                felix(cfg, "liveness")
                    .map_err(|e| format!("calico/node is not ready: Felix is not live: {e}"))
            }),
        ),
        (
            checks.bird_live,
            "bird liveness",
            Box::new(|cfg| bird_live(cfg, false)),
        ),
        (
            checks.bird6_live,
            "bird6 liveness",
            Box::new(|cfg| bird_live(cfg, true)),
        ),
        (
            checks.felix_ready,
            "felix readiness",
            Box::new(|cfg| {
                felix(cfg, "readiness")
                    .map_err(|e| format!("calico/node is not ready: felix is not ready: {e}"))
            }),
        ),
        (
            checks.bird_ready,
            "BIRD readiness",
            Box::new(move |cfg| {
                bird_ready(cfg, false, threshold)
                    .map_err(|e| format!("calico/node is not ready: BIRD is not ready: {e}"))
            }),
        ),
        (
            checks.bird6_ready,
            "BIRD6 readiness",
            Box::new(move |cfg| {
                bird_ready(cfg, true, threshold)
                    .map_err(|e| format!("calico/node is not ready: BIRD6 is not ready: {e}"))
            }),
        ),
    ];
    let deadline = std::time::Instant::now() + PROBE_DEADLINE;
    // Bounded by the number of checks: each thread sends one answer, so none ever waits.
    let (tx, rx) = std::sync::mpsc::sync_channel(all.len());
    let mut pending = Vec::new();
    for (i, (on, name, check)) in all.into_iter().enumerate() {
        if !on {
            continue;
        }
        let (tx, cfg) = (tx.clone(), cfg.clone());
        // Detached: a check stuck past the deadline must not hold the probe's exit.
        std::thread::spawn(move || {
            let _ = tx.send((i, check(&cfg)));
        });
        pending.push((i, name));
    }
    drop(tx);
    let mut results: Vec<(usize, Result<(), String>)> = Vec::new();
    while results.len() < pending.len() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(r) => results.push(r),
            Err(_) => break,
        }
    }
    for (i, name) in &pending {
        if !results.iter().any(|(j, _)| j == i) {
            results.push((
                *i,
                Err(format!(
                    "calico/node is not ready: {name} check did not answer within {}s",
                    PROBE_DEADLINE.as_secs()
                )),
            ));
        }
    }
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().filter_map(|(_, r)| r.err()).collect()
}

/// GET `/<probe>` on the health endpoint (Calico's `checkFelixHealth`).
fn felix(cfg: &ProbeConfig, probe: &str) -> Result<(), String> {
    // Go's net.JoinHostPort: an IPv6 host in brackets.
    let bare = cfg.health_host.trim_matches(['[', ']']);
    let url = if bare.contains(':') {
        format!("http://[{bare}]:{}/{probe}", cfg.health_port)
    } else {
        format!("http://{bare}:{}/{probe}", cfg.health_port)
    };
    let host = if cfg.health_host == "localhost" {
        "127.0.0.1"
    } else {
        cfg.health_host.trim_matches(['[', ']'])
    };
    let (status, body) = http_get(host, cfg.health_port, &format!("/{probe}"))
        .map_err(|e| format!("Get \"{url}\": {e}"))?;
    if (200..400).contains(&status) {
        return Ok(());
    }
    let why = reasons(&body, probe == "liveness");
    Err(if why.is_empty() {
        format!("{probe} probe reporting {status}")
    } else {
        format!("{probe} probe reporting {status} ({why})")
    })
}

/// The failing actors of a health report, `name: reason; ...`.
fn reasons(body: &str, liveness: bool) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(body) else {
        return String::new();
    };
    let key = if liveness { "live" } else { "ready" };
    v["reporters"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .filter(|r| r[key] == false)
                .map(|r| {
                    let name = r["name"].as_str().unwrap_or("?");
                    match r["reason"].as_str() {
                        Some(why) => format!("{name}: {why}"),
                        None => name.to_string(),
                    }
                })
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_default()
}

fn http_get(host: &str, port: u16, path: &str) -> Result<(u16, String), String> {
    let addr = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("dial tcp {host}:{port}: {e}"))?
        .next()
        .ok_or_else(|| format!("dial tcp {host}:{port}: no address"))?;
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)
        .map_err(|e| format!("dial tcp {addr}: connect: {e}"))?;
    let io = |e: std::io::Error| format!("read tcp {addr}: {e}");
    s.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
    s.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .map_err(io)?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).map_err(io)?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("malformed HTTP response from {addr}"))?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// One BGP peer as the readiness check sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub address: IpAddr,
    pub established: bool,
}

fn family(v6: bool) -> &'static str {
    if v6 { "6" } else { "4" }
}

/// The peers of one family.
fn peers(cfg: &ProbeConfig, v6: bool) -> Result<Vec<Peer>, String> {
    let connect_err = |path: &Path, e: &dyn std::fmt::Display| {
        format!(
            "error querying BIRD: unable to connect to BIRDv{} socket: {}: {e}",
            family(v6),
            path.display()
        )
    };
    let all = match &cfg.bgp {
        BgpSource::None => Vec::new(),
        BgpSource::Native(path) => crate::bgp::status::fetch(path)
            .map_err(|e| connect_err(path, &e))?
            .into_iter()
            .filter_map(|p| {
                Some(Peer {
                    address: p.address.parse().ok()?,
                    established: p.state == "Established",
                })
            })
            .collect(),
        BgpSource::Bird(path) => {
            let mut c = BirdControl::connect(path).map_err(|e| connect_err(path, &e))?;
            parse_bird_protocols(&c.command("show protocols")?)
        }
    };
    Ok(all
        .into_iter()
        .filter(|p| p.address.is_ipv6() == v6)
        .collect())
}

/// Calico's `checkBIRDReady`, over the peers of one family.
fn bird_ready(cfg: &ProbeConfig, v6: bool, threshold: Duration) -> Result<(), String> {
    let meta = std::fs::metadata(&cfg.nodename_file).map_err(|e| {
        format!(
            "failed to stat() nodename file: stat {}: {e}",
            cfg.nodename_file.display()
        )
    })?;
    let peers = peers(cfg, v6)?;
    let age = meta
        .modified()
        .ok()
        .and_then(|m| SystemTime::now().duration_since(m).ok())
        .unwrap_or_default();
    let down: Vec<String> = peers
        .iter()
        .filter(|p| !p.established)
        .map(|p| p.address.to_string())
        .collect();
    let established = peers.len() - down.len();
    let not_established = || Err(format!("BGP not established with {}", down.join(",")));
    if peers.is_empty() {
        return Ok(());
    }
    if age < threshold {
        // Just started: all peerings, so a rolling update waits for BGP to come back.
        if !down.is_empty() {
            return not_established();
        }
        if let BgpSource::Bird(path) = &cfg.bgp {
            let mut c = BirdControl::connect(path).map_err(|e| e.to_string())?;
            if c.command("show status")?
                .iter()
                .any(|l| l.starts_with("0024"))
            {
                return Err("graceful restart in progress".into());
            }
        }
        return Ok(());
    }
    // Later: one peering is enough, so a mesh stays ready while some nodes are down.
    if established > 0 {
        Ok(())
    } else {
        not_established()
    }
}

/// Calico's bird liveness: the speaker answers on its socket.
fn bird_live(cfg: &ProbeConfig, v6: bool) -> Result<(), String> {
    let which = if v6 { "bird6" } else { "bird" };
    match &cfg.bgp {
        BgpSource::None => Ok(()),
        BgpSource::Native(path) => {
            crate::bgp::status::fetch(path).map_err(|e| {
                format!(
                    "calico/node is not ready: {which} is not live: {}: {e}",
                    path.display()
                )
            })?;
            // Calico also checks that the confd and bird services run: here, that the
            // supervisor has not found the BGP actor (confd with the speaker) dead.
            match bgp_actor_death(cfg) {
                Some(why) => Err(format!(
                    "calico/node is not ready: {which}/confd is not live: {why}"
                )),
                None => Ok(()),
            }
        }
        BgpSource::Bird(path) => {
            let c = BirdControl::connect(path).map_err(|e| {
                format!(
                    "calico/node is not ready: {which} is not live: {}: {e}",
                    path.display()
                )
            })?;
            if c.greeting.contains("BIRD") {
                Ok(())
            } else {
                Err(format!(
                    "calico/node is not ready: bad response from {which}: {}",
                    c.greeting
                ))
            }
        }
    }
}

/// Why the BGP actor is dead, from `/liveness` (None when live, or when the endpoint does
/// not answer: `-felix-live` reports that).
fn bgp_actor_death(cfg: &ProbeConfig) -> Option<String> {
    let host = if cfg.health_host == "localhost" {
        "127.0.0.1"
    } else {
        cfg.health_host.trim_matches(['[', ']'])
    };
    let (_, body) = http_get(host, cfg.health_port, "/liveness").ok()?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let bgp = v["reporters"]
        .as_array()?
        .iter()
        .find(|r| r["name"] == "bgp" && r["live"] == false)?;
    Some(bgp["reason"].as_str().unwrap_or("not live").to_string())
}

/// A connection to BIRD's control socket (the `birdc` protocol: numbered reply lines,
/// `0001` greeting, a space after the code on a reply's last line).
struct BirdControl {
    reader: BufReader<std::os::unix::net::UnixStream>,
    greeting: String,
}

impl BirdControl {
    fn connect(path: &Path) -> std::io::Result<BirdControl> {
        let s = std::os::unix::net::UnixStream::connect(path)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.set_write_timeout(Some(TIMEOUT))?;
        let mut reader = BufReader::new(s);
        let mut greeting = String::new();
        reader.read_line(&mut greeting)?;
        Ok(BirdControl {
            reader,
            greeting: greeting.trim_end().to_string(),
        })
    }

    /// Send `cmd`; the reply's lines up to its last.
    fn command(&mut self, cmd: &str) -> Result<Vec<String>, String> {
        let err = |e: std::io::Error| format!("error executing command: {e}");
        self.reader
            .get_mut()
            .write_all(format!("{cmd}\n").as_bytes())
            .map_err(err)?;
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line).map_err(err)? == 0 {
                return Ok(lines);
            }
            let line = line.trim_end_matches(['\n', '\r']).to_string();
            let last = line.len() >= 5
                && line.as_bytes()[..4].iter().all(u8::is_ascii_digit)
                && line.as_bytes()[4] == b' ';
            lines.push(line);
            if last {
                return Ok(lines);
            }
        }
    }
}

/// BGP peers from BIRD's `show protocols`, named as Calico's confd names them
/// (`Mesh_10_0_0_2`, `Node_...`, `Global_...`, the address with `_` for `.` or `:`).
pub fn parse_bird_protocols(lines: &[String]) -> Vec<Peer> {
    lines
        .iter()
        .filter_map(|l| {
            let row = match l.get(..5) {
                Some("1002-") => &l[5..],
                _ if l.starts_with(' ') => &l[1..],
                _ => return None,
            };
            let cols: Vec<&str> = row.split_whitespace().collect();
            if cols.len() < 5 || cols[1] != "BGP" {
                return None;
            }
            let id = ["Mesh_", "Node_", "Global_"]
                .iter()
                .find_map(|p| cols[0].strip_prefix(p))?;
            let address = id
                .replace('_', ".")
                .parse::<std::net::Ipv4Addr>()
                .map(IpAddr::V4)
                .or_else(|_| id.replace('_', ":").parse().map(IpAddr::V6))
                .ok()?;
            Some(Peer {
                address,
                established: cols[4..].contains(&"Established"),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bird_protocols_as_calico_reads_them() {
        let out: Vec<String> = [
            "2002-Name       Proto      Table      State  Since         Info",
            "1002-device1    Device     ---        up     16:25:20.123  ",
            " Mesh_10_0_0_2  BGP        ---        up     16:25:21.000  Established   ",
            " Node_10_0_0_3  BGP        ---        start  16:25:21.000  Active        Socket: Connection refused",
            " Global_fd00__1 BGP        ---        start  16:25:21.000  Connect",
            " kernel1        Kernel     master4    up     16:25:20.123",
            "0000 ",
        ]
        .map(String::from)
        .to_vec();
        let peers = parse_bird_protocols(&out);
        assert_eq!(
            peers,
            vec![
                Peer {
                    address: "10.0.0.2".parse().unwrap(),
                    established: true
                },
                Peer {
                    address: "10.0.0.3".parse().unwrap(),
                    established: false
                },
                Peer {
                    address: "fd00::1".parse().unwrap(),
                    established: false
                },
            ]
        );
    }

    fn status(addr: &str, state: crate::bgp::fsm::State) -> crate::bgp::speaker::PeerStatus {
        crate::bgp::speaker::PeerStatus {
            state,
            ..crate::bgp::speaker::PeerStatus::new(
                addr.parse().unwrap(),
                crate::bgp::config::PeerType::NodeToNodeMesh,
            )
        }
    }

    /// Calico's threshold rule against the speaker's real status socket: all peers while
    /// the node is young, one Established peer afterwards; each family apart.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bird_readiness_follows_calicos_threshold_rule() {
        use crate::bgp::fsm::State;
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("bgp.sock");
        std::fs::write(dir.path().join("nodename"), "n1").unwrap();
        let (tx, rx) = tokio::sync::watch::channel(vec![
            status("10.0.0.2", State::Established),
            status("10.0.0.3", State::Active),
            status("fd00::2", State::Established),
        ]);
        let cancel = tokio_util::sync::CancellationToken::new();
        tokio::spawn(crate::bgp::status::serve(
            socket.clone(),
            rx,
            cancel.clone(),
        ));
        let cfg = ProbeConfig {
            health_host: "localhost".into(),
            health_port: 1,
            bgp: BgpSource::Native(socket.clone()),
            nodename_file: dir.path().join("nodename"),
        };
        let check = move |v6: bool, threshold: Duration| {
            let cfg = cfg.clone();
            std::thread::spawn(move || bird_ready(&cfg, v6, threshold))
                .join()
                .unwrap()
        };
        for _ in 0..100 {
            if socket.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let young = Duration::from_secs(3600);
        assert_eq!(
            check(false, young),
            Err("BGP not established with 10.0.0.3".into())
        );
        assert_eq!(check(false, Duration::ZERO), Ok(()));
        assert_eq!(check(true, young), Ok(()));
        tx.send_replace(vec![status("10.0.0.3", State::Connect)]);
        assert_eq!(
            check(false, Duration::ZERO),
            Err("BGP not established with 10.0.0.3".into())
        );
        assert_eq!(check(true, young), Ok(()), "no IPv6 peers: ready");
        cancel.cancel();
    }

    #[test]
    fn not_ready_reasons_come_from_the_report() {
        let body = r#"{"live":true,"ready":false,"reporters":[
            {"name":"bgp","live":true,"ready":false,"reason":"BGP not established with 10.0.0.2: Active"},
            {"name":"felix","live":true,"ready":true}]}"#;
        assert_eq!(
            reasons(body, false),
            "bgp: BGP not established with 10.0.0.2: Active"
        );
        assert_eq!(reasons(body, true), "");
        assert_eq!(reasons("not json", false), "");
    }

    /// A wedged daemon (its health port and status socket accept and never answer): the
    /// manifest's probes still end inside kubelet's 10 s, every check failing, because the
    /// checks run side by side under one deadline (before: one after another, ~19 s for
    /// `-felix-live -bird-live -felix-ready -bird-ready`).
    #[test]
    fn a_wedged_daemon_fails_the_probes_within_kubelets_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("status.sock");
        let unix = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        // Accept everything and hold it open, never writing a byte.
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for c in unix.incoming().flatten() {
                held.push(c);
            }
        });
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for c in tcp.incoming().flatten() {
                held.push(c);
            }
        });
        std::fs::write(dir.path().join("nodename"), "n1").unwrap();
        let cfg = ProbeConfig {
            health_host: "localhost".into(),
            health_port: port,
            bgp: BgpSource::Native(socket),
            nodename_file: dir.path().join("nodename"),
        };
        let checks = HealthChecks {
            felix_ready: true,
            felix_live: true,
            bird_ready: true,
            bird6_ready: false,
            bird_live: true,
            bird6_live: false,
            threshold: Duration::from_secs(30),
        };
        let start = std::time::Instant::now();
        let failures = run(&checks, &cfg);
        let took = start.elapsed();
        assert!(took < Duration::from_secs(9), "{took:?}: {failures:?}");
        assert_eq!(failures.len(), 4, "{failures:?}");
        assert!(failures[0].starts_with("calico/node is not ready: Felix is not live"));
    }
}
