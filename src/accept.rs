//! Accept loops that survive running out of descriptors.
//!
//! `accept(2)` fails with `EMFILE`/`ENFILE` (or `ENOBUFS`, `ENOMEM`) while the connection
//! stays in the backlog, so a loop that simply tries again spins a core at 100 % until a
//! descriptor frees up. Go's `net/http` server, which serves Felix's health endpoint in
//! Calico, sleeps after a failed accept, from 5 ms doubling up to 1 s; the node's HTTP
//! endpoints and the BGP listener on port 179 do the same here.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

/// First pause after a failed accept (Go's `net/http`: 5 ms).
const FIRST: Duration = Duration::from_millis(5);
/// Longest pause (Go's `net/http`: 1 s).
const MAX: Duration = Duration::from_secs(1);

/// The pause after consecutive failed accepts; reset by a successful one.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    current: Option<Duration>,
}

impl AcceptBackoff {
    /// The pause before the next attempt: 5 ms, then doubling up to 1 s.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.current.map_or(FIRST, |d| (d * 2).min(MAX));
        self.current = Some(d);
        d
    }

    /// An accept succeeded: the next failure starts again at 5 ms.
    pub fn reset(&mut self) {
        self.current = None;
    }
}

/// Accept one connection, pausing with `backoff` after each failure (logged once per run
/// of failures, with the listener's `what`). Cancel-safe: dropping it loses no connection.
pub async fn accept(
    listener: &TcpListener,
    backoff: &mut AcceptBackoff,
    what: &str,
) -> (TcpStream, SocketAddr) {
    accept_with(|| listener.accept(), backoff, what).await
}

/// [`accept`] for any listener: `try_accept` makes one attempt (a cancel-safe future such
/// as tokio's `UnixListener::accept`).
pub async fn accept_with<T, F, Fut>(mut try_accept: F, backoff: &mut AcceptBackoff, what: &str) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<T>>,
{
    loop {
        match try_accept().await {
            Ok(a) => {
                backoff.reset();
                return a;
            }
            Err(e) => {
                let first = backoff.current.is_none();
                let delay = backoff.next_delay();
                if first {
                    tracing::warn!(listener = what, error = %e, "accept failed; pausing before the next attempt");
                } else {
                    tracing::debug!(listener = what, error = %e, ?delay, "accept failed again");
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_5ms_to_1s_and_resets() {
        let mut b = AcceptBackoff::default();
        let seq: Vec<u64> = (0..10).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(seq, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.reset();
        assert_eq!(b.next_delay(), FIRST);
    }

    #[tokio::test]
    async fn a_successful_accept_resets_the_backoff() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut b = AcceptBackoff::default();
        b.next_delay();
        b.next_delay();
        let c = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (_s, from) = accept(&l, &mut b, "test").await;
        assert_eq!(from, c.local_addr().unwrap());
        assert!(b.current.is_none(), "a success resets the backoff");
    }
}
