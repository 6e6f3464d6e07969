//! The BGP status socket: per-peer data (`PeerReport`, JSON) served on a local unix socket
//! for `calicoctl node status` and the readiness probes (REFERENCE §7). The socket carries
//! data only: calicoctl renders Calico's table (`crate::ctl::node_status`), and the
//! Prometheus metrics are read from the same status in `super::metrics`.

use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::speaker::PeerStatus;

// Kept at its old path for the callers that name it here (node::daemon, tests/bgp_*).

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
    // Each answer is written by its own task, on this tracker: `serve` returns only once
    // they are done.
    let conns = TaskTracker::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            (mut conn, _) = crate::accept::accept_with(|| listener.accept(), &mut backoff, "bgp-status") => {
                let reports: Vec<PeerReport> = status.borrow().iter().map(PeerReport::from).collect();
                let body = serde_json::to_vec(&reports).expect("reports serialize");
                // A reader that never reads cannot hold the answer (or shutdown) up for
                // longer than a reader waits for it.
                conns.spawn(async move {
                    let _ = tokio::time::timeout(FETCH_TIMEOUT, async {
                        let _ = conn.write_all(&body).await;
                        let _ = conn.shutdown().await;
                    })
                    .await;
                });
            }
        }
    }
    let _ = std::fs::remove_file(&path);
    conns.close();
    conns.wait().await;
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
}
