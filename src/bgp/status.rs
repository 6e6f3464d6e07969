//! Peer status for `calicoctl node status` (REFERENCE §7, Calico's exact table) served on
//! a local unix socket, and Prometheus metrics per peer.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounterVec, IntGaugeVec, Opts};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::fsm::State;
use super::speaker::PeerStatus;

/// Where calico-node serves BGP status and calicoctl reads it.
pub const DEFAULT_SOCKET: &str = "/var/run/calico/bgp-status.sock";

/// One peer as `calicoctl node status` needs it (the socket's JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerReport {
    pub address: String,
    pub peer_type: String,
    pub state: String,
    pub since_unix: u64,
    pub reason: String,
    pub received: usize,
    pub accepted: usize,
    pub advertised: usize,
}

impl From<&PeerStatus> for PeerReport {
    fn from(s: &PeerStatus) -> Self {
        PeerReport {
            address: s.address.to_string(),
            peer_type: s.peer_type.label().to_string(),
            state: s.state.name().to_string(),
            since_unix: s
                .since
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            reason: s.reason.clone(),
            received: s.received,
            accepted: s.accepted,
            advertised: s.advertised,
        }
    }
}

/// HH:MM:SS in local time, as BIRD prints a protocol's "since".
fn clock(unix: u64) -> String {
    let t = unix as libc::time_t;
    // SAFETY: localtime_r writes only into `tm`, which is plain data.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    if !ok {
        let s = unix % 86_400;
        return format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60);
    }
    format!("{:02}:{:02}:{:02}", tm.tm_hour, tm.tm_min, tm.tm_sec)
}

/// Calico's `calicoctl node status` text.
pub fn render_node_status(peers: &[PeerReport]) -> String {
    render_with_clock(peers, clock)
}

fn render_with_clock(peers: &[PeerReport], clock: fn(u64) -> String) -> String {
    let mut out = String::from("Calico process is running.\n");
    for (family, v6) in [("IPv4", false), ("IPv6", true)] {
        let rows: Vec<Vec<String>> = peers
            .iter()
            .filter(|p| p.address.contains(':') == v6)
            .map(|p| {
                let up = p.state == State::Established.name();
                vec![
                    p.address.clone(),
                    p.peer_type.clone(),
                    if up { "up" } else { "start" }.to_string(),
                    clock(p.since_unix),
                    if up || p.reason.is_empty() {
                        p.state.clone()
                    } else {
                        format!("{} {}", p.state, p.reason)
                    },
                ]
            })
            .collect();
        out.push_str(&format!("\n{family} BGP status\n"));
        if rows.is_empty() {
            out.push_str(&format!("No {family} peers found.\n"));
        } else {
            out.push_str(&crate::ctl::output::boxed_table(
                &["PEER ADDRESS", "PEER TYPE", "STATE", "SINCE", "INFO"],
                &rows,
            ));
        }
    }
    out
}

/// Serve the status as JSON to whoever connects to `path` (a fresh socket, mode 0600).
pub async fn serve(
    path: PathBuf,
    status: watch::Receiver<Vec<PeerStatus>>,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    // Out of descriptors, a failed accept pauses instead of spinning (see crate::accept).
    let mut backoff = crate::accept::AcceptBackoff::default();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            (mut conn, _) = crate::accept::accept_with(|| listener.accept(), &mut backoff, "bgp-status") => {
                let reports: Vec<PeerReport> = status.borrow().iter().map(PeerReport::from).collect();
                let body = serde_json::to_vec(&reports).expect("reports serialize");
                tokio::spawn(async move {
                    let _ = conn.write_all(&body).await;
                    let _ = conn.shutdown().await;
                });
            }
        }
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// How long a reader waits for the status (Calico's bird check gives BIRD's socket 2 s;
/// a probe must end well inside kubelet's 10 s even when the daemon is wedged).
const FETCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Read the status from a running calico-node.
pub fn fetch(path: &Path) -> std::io::Result<Vec<PeerReport>> {
    use std::io::Read;
    let mut s = std::os::unix::net::UnixStream::connect(path)?;
    s.set_read_timeout(Some(FETCH_TIMEOUT))?;
    let mut body = Vec::new();
    s.read_to_end(&mut body)?;
    serde_json::from_slice(&body).map_err(std::io::Error::other)
}

/// Per-peer Prometheus metrics, read from the speaker's status at scrape time.
pub struct BgpMetrics {
    status: watch::Receiver<Vec<PeerStatus>>,
    state: IntGaugeVec,
    uptime: IntGaugeVec,
    received: IntGaugeVec,
    accepted: IntGaugeVec,
    advertised: IntGaugeVec,
    updates_in: IntCounterVec,
    updates_out: IntCounterVec,
    notes_in: IntCounterVec,
    notes_out: IntCounterVec,
    too_large: IntCounterVec,
}

impl BgpMetrics {
    pub fn new(status: watch::Receiver<Vec<PeerStatus>>) -> BgpMetrics {
        let g = |name: &str, help: &str| {
            IntGaugeVec::new(Opts::new(name, help), &["peer", "peer_type"]).expect("valid metric")
        };
        let c = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
        };
        BgpMetrics {
            status,
            state: g(
                "calico_bgp_peer_state",
                "BGP session state (1 Idle, 2 Connect, 3 Active, 4 OpenSent, 5 OpenConfirm, 6 Established)",
            ),
            uptime: g(
                "calico_bgp_peer_uptime_seconds",
                "Seconds since the session became Established (0 when down)",
            ),
            received: g(
                "calico_bgp_peer_prefixes_received",
                "Prefixes received from the peer",
            ),
            accepted: g(
                "calico_bgp_peer_prefixes_accepted",
                "Prefixes from the peer that are best paths",
            ),
            advertised: g(
                "calico_bgp_peer_prefixes_advertised",
                "Prefixes advertised to the peer",
            ),
            updates_in: c(
                "calico_bgp_peer_updates_received_total",
                "UPDATE messages received",
                &["peer"],
            ),
            updates_out: c(
                "calico_bgp_peer_updates_sent_total",
                "UPDATE messages sent",
                &["peer"],
            ),
            notes_in: c(
                "calico_bgp_peer_notifications_received_total",
                "NOTIFICATION messages received, by error code",
                &["peer", "code"],
            ),
            notes_out: c(
                "calico_bgp_peer_notifications_sent_total",
                "NOTIFICATION messages sent, by error code",
                &["peer", "code"],
            ),
            too_large: c(
                "calico_bgp_peer_routes_too_large_total",
                "Routes not exported to the peer because with our attributes they no longer fit in a 4096-byte BGP message",
                &["peer"],
            ),
        }
    }

    fn all(&self) -> [&dyn Collector; 10] {
        [
            &self.state,
            &self.uptime,
            &self.received,
            &self.accepted,
            &self.advertised,
            &self.updates_in,
            &self.updates_out,
            &self.notes_in,
            &self.notes_out,
            &self.too_large,
        ]
    }
}

impl Collector for BgpMetrics {
    fn desc(&self) -> Vec<&Desc> {
        self.all().into_iter().flat_map(|c| c.desc()).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        for g in [
            &self.state,
            &self.uptime,
            &self.received,
            &self.accepted,
            &self.advertised,
        ] {
            g.reset();
        }
        for c in [
            &self.updates_in,
            &self.updates_out,
            &self.notes_in,
            &self.notes_out,
            &self.too_large,
        ] {
            c.reset();
        }
        let now = SystemTime::now();
        for s in self.status.borrow().iter() {
            let peer = s.address.to_string();
            let labels = [peer.as_str(), s.peer_type.label()];
            self.state
                .with_label_values(&labels)
                .set(s.state as i64 + 1);
            let up = s
                .established_at
                .and_then(|t| now.duration_since(t).ok())
                .map_or(0, |d| d.as_secs() as i64);
            self.uptime.with_label_values(&labels).set(up);
            self.received
                .with_label_values(&labels)
                .set(s.received as i64);
            self.accepted
                .with_label_values(&labels)
                .set(s.accepted as i64);
            self.advertised
                .with_label_values(&labels)
                .set(s.advertised as i64);
            self.updates_in
                .with_label_values(&[&peer])
                .inc_by(s.updates_in);
            self.updates_out
                .with_label_values(&[&peer])
                .inc_by(s.updates_out);
            self.too_large
                .with_label_values(&[&peer])
                .inc_by(s.routes_too_large);
            for (code, n) in &s.notifications_in {
                self.notes_in
                    .with_label_values(&[&peer, &code.to_string()])
                    .inc_by(*n);
            }
            for (code, n) in &s.notifications_out {
                self.notes_out
                    .with_label_values(&[&peer, &code.to_string()])
                    .inc_by(*n);
            }
        }
        self.all().into_iter().flat_map(|c| c.collect()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A daemon that accepts but never answers (wedged) makes `fetch` (the bird probes,
    /// `calicoctl node status`) fail within its timeout instead of hanging the probe past
    /// kubelet's 10 s.
    #[test]
    fn fetch_gives_up_on_a_socket_that_never_answers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let held = std::thread::spawn(move || listener.accept().map(|(c, _)| c));
        let start = std::time::Instant::now();
        assert!(fetch(&path).is_err());
        let took = start.elapsed();
        assert!(took < std::time::Duration::from_secs(5), "{took:?}");
        drop(held.join());
    }

    fn report(addr: &str, ty: &str, state: &str, reason: &str) -> PeerReport {
        PeerReport {
            address: addr.into(),
            peer_type: ty.into(),
            state: state.into(),
            since_unix: 84_604, // 23:30:04 UTC
            reason: reason.into(),
            received: 0,
            accepted: 0,
            advertised: 0,
        }
    }

    #[test]
    fn node_status_is_calicos_table() {
        let utc = |t: u64| format!("{:02}:{:02}:{:02}", t % 86_400 / 3600, t / 60 % 60, t % 60);
        let out = render_with_clock(
            &[report(
                "172.17.8.102",
                "node-to-node mesh",
                "Established",
                "",
            )],
            utc,
        );
        assert_eq!(
            out,
            "Calico process is running.\n\nIPv4 BGP status\n\
+--------------+-------------------+-------+----------+-------------+\n\
| PEER ADDRESS |     PEER TYPE     | STATE |  SINCE   |    INFO     |\n\
+--------------+-------------------+-------+----------+-------------+\n\
| 172.17.8.102 | node-to-node mesh | up    | 23:30:04 | Established |\n\
+--------------+-------------------+-------+----------+-------------+\n\
\nIPv6 BGP status\nNo IPv6 peers found.\n"
        );
    }

    #[test]
    fn a_peer_that_is_down_says_why() {
        let out = render_node_status(&[report(
            "10.0.0.9",
            "global",
            "Active",
            "connect failed: Connection refused (os error 111)",
        )]);
        assert!(out.contains("| start | "), "{out}");
        assert!(
            out.contains("Active connect failed: Connection refused"),
            "{out}"
        );
        assert!(render_node_status(&[]).contains("No IPv4 peers found.\n"));
    }
}
