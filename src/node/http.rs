//! The node's HTTP endpoints, as Felix offers them: health on 9099 (`/liveness`,
//! `/readiness`, with a JSON body naming each actor and, when not ready, why) and
//! Prometheus metrics on 9091 (`/metrics`). Servers take their listener and a shutdown
//! token as parameters (mini-redis style), so tests bind `127.0.0.1:0`.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug};

use crate::health::HealthAggregator;

type Resp = Response<Full<Bytes>>;

fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn health_response(req: &Request<Incoming>, health: &HealthAggregator) -> Resp {
    let report = health.snapshot();
    let ok = match req.uri().path() {
        "/liveness" => report.live,
        "/readiness" => report.ready,
        _ => return respond(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    };
    let body = serde_json::to_vec(&report).expect("health reports serialize");
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    respond(status, "application/json", body)
}

fn metrics_response(req: &Request<Incoming>, registry: &Registry) -> Resp {
    if req.uri().path() != "/metrics" {
        return respond(StatusCode::NOT_FOUND, "text/plain", "not found\n");
    }
    let encoder = TextEncoder::new();
    let mut buf = Vec::new();
    match encoder.encode(&registry.gather(), &mut buf) {
        Ok(()) => respond(StatusCode::OK, encoder.format_type(), buf),
        Err(e) => respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("{e}\n"),
        ),
    }
}

/// What one endpoint tolerates from its clients, so that idle or slow connections (a
/// scanner, a stuck scraper, a flood) never keep a probe from being answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeLimits {
    /// A client must send a request's headers within this; also closes idle keep-alive
    /// connections (Go's `http.Server.ReadHeaderTimeout`, which Calico leaves unset).
    pub header_read_timeout: std::time::Duration,
    /// Most connections served at once. A new connection beyond it closes the oldest one,
    /// rather than waiting in the backlog: a probe always gets in, a flood evicts itself.
    pub max_connections: usize,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            header_read_timeout: std::time::Duration::from_secs(5),
            max_connections: 64,
        }
    }
}

/// The connections being served, oldest first, each with the token that closes it.
#[derive(Default)]
struct Connections {
    next_id: u64,
    open: std::collections::VecDeque<(u64, CancellationToken)>,
}

impl Connections {
    /// Admit a new connection, closing the oldest ones beyond `max`.
    fn admit(&mut self, max: usize, parent: &CancellationToken) -> (u64, CancellationToken) {
        while self.open.len() >= max.max(1) {
            if let Some((_, oldest)) = self.open.pop_front() {
                oldest.cancel();
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let token = parent.child_token();
        self.open.push_back((id, token.clone()));
        (id, token)
    }

    fn done(&mut self, id: u64) {
        self.open.retain(|(i, _)| *i != id);
    }
}

/// Accept connections until cancelled; each is served on its own task, within `limits`.
/// A failed accept (no descriptor left) pauses instead of spinning ([`crate::accept`]).
/// The connection tasks are on a tracker of the server's own, awaited before it returns
/// (each is closed by the shutdown token), so the daemon's tracker, which awaits this
/// server, covers them too.
async fn serve<F>(
    listener: Arc<TcpListener>,
    limits: ServeLimits,
    shutdown: CancellationToken,
    handler: F,
) -> std::io::Result<()>
where
    F: Fn(&Request<Incoming>) -> Resp + Clone + Send + Sync + 'static,
{
    let connections: Arc<Mutex<Connections>> = Arc::default();
    let mut backoff = crate::accept::AcceptBackoff::default();
    let what = listener
        .local_addr()
        .map_or_else(|_| "http".to_string(), |a| format!("http {a}"));
    let tasks = tokio_util::task::TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => {
                tasks.close();
                tasks.wait().await;
                return Ok(());
            }
            a = crate::accept::accept(&listener, &mut backoff, &what) => a,
        };
        let handler = handler.clone();
        let (id, token) = connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(limits.max_connections, &shutdown);
        let connections = connections.clone();
        tasks.spawn(
            async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    // Every endpoint here is read-only.
                    let r = if req.method() == Method::GET {
                        handler(&req)
                    } else {
                        respond(
                            StatusCode::METHOD_NOT_ALLOWED,
                            "text/plain",
                            "method not allowed\n",
                        )
                    };
                    async move { Ok::<_, Infallible>(r) }
                });
                let conn = http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(limits.header_read_timeout)
                    .serve_connection(TokioIo::new(stream), svc);
                tokio::select! {
                    _ = token.cancelled() => {}
                    r = conn => if let Err(e) = r {
                        debug!(%peer, error = %e, "HTTP connection error");
                    },
                }
                connections
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .done(id);
            }
            .in_current_span(),
        );
    }
}

/// Serve `/liveness` and `/readiness` until `shutdown` fires.
pub async fn serve_health(
    listener: impl Into<Arc<TcpListener>>,
    health: HealthAggregator,
    limits: ServeLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    serve(listener.into(), limits, shutdown, move |req| {
        health_response(req, &health)
    })
    .await
}

/// Serve `/metrics` from `registry` until `shutdown` fires.
pub async fn serve_metrics(
    listener: impl Into<Arc<TcpListener>>,
    registry: Registry,
    limits: ServeLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    serve(listener.into(), limits, shutdown, move |req| {
        metrics_response(req, &registry)
    })
    .await
}

/// A registry with the process collector (`process_*` metrics) registered.
pub fn new_registry() -> Registry {
    let r = Registry::new();
    let pc = prometheus::process_collector::ProcessCollector::for_self();
    if let Err(e) = r.register(Box::new(pc)) {
        tracing::warn!(error = %e, "process metrics unavailable");
    }
    r
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn request(port: u16, method: &str, path: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        s.write_all(
            format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).await.unwrap();
        let status = resp.split_whitespace().nth(1).unwrap().parse().unwrap();
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }

    async fn start_health(
        h: HealthAggregator,
    ) -> (
        u16,
        CancellationToken,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let t = CancellationToken::new();
        let j = tokio::spawn(serve_health(l, h, ServeLimits::default(), t.clone()));
        (port, t, j)
    }

    #[tokio::test]
    async fn readiness_names_the_actor_and_reason_until_all_ready() {
        let h = HealthAggregator::new();
        let a = h.register("syncer");
        let b = h.register("startup");
        b.set_ready(false, Some("waiting for the datastore".into()));
        let (port, t, j) = start_health(h).await;
        let (status, body) = request(port, "GET", "/readiness").await;
        assert_eq!(status, 503);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["ready"], false);
        assert_eq!(v["reporters"][0]["name"], "startup");
        assert_eq!(v["reporters"][0]["reason"], "waiting for the datastore");
        assert_eq!(v["reporters"][1]["reason"], "starting");
        a.set_ready(true, None);
        b.set_ready(true, None);
        let (status, body) = request(port, "GET", "/readiness").await;
        assert_eq!(status, 200, "{body}");
        assert!(!body.contains("reason"));
        t.cancel();
        tokio::time::timeout(Duration::from_secs(2), j)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn liveness_fails_when_an_actor_is_dead_and_other_paths_are_refused() {
        let h = HealthAggregator::new();
        let a = h.register("syncer");
        a.set_ready(true, None);
        let (port, t, _j) = start_health(h).await;
        assert_eq!(request(port, "GET", "/liveness").await.0, 200);
        assert_eq!(request(port, "GET", "/readiness").await.0, 200);
        a.set_live(false, Some("stuck".into()));
        let (status, body) = request(port, "GET", "/liveness").await;
        assert_eq!(status, 503);
        assert!(body.contains("stuck"));
        // A dead actor is not ready either (the probe must not count the node available
        // while liveness waits for its failure threshold).
        let (status, body) = request(port, "GET", "/readiness").await;
        assert_eq!(status, 503, "{body}");
        // An actor still reporting readiness after its death neither hides the cause nor
        // turns ready.
        a.set_ready(false, Some("waiting".into()));
        a.set_ready(true, None);
        let (status, body) = request(port, "GET", "/liveness").await;
        assert_eq!(status, 503);
        assert!(body.contains("stuck"), "{body}");
        assert_eq!(request(port, "GET", "/readiness").await.0, 503);
        assert_eq!(request(port, "GET", "/nope").await.0, 404);
        assert_eq!(request(port, "POST", "/readiness").await.0, 405);
        t.cancel();
    }

    async fn start_limited(limits: ServeLimits) -> (u16, CancellationToken) {
        let h = HealthAggregator::new();
        h.register("felix").set_ready(true, None);
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let t = CancellationToken::new();
        tokio::spawn(serve_health(l, h, limits, t.clone()));
        (port, t)
    }

    /// Whether the server closed `s` (EOF) within `within`.
    async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(within, s.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    #[tokio::test]
    async fn a_client_that_sends_no_headers_is_closed_after_the_timeout() {
        let limits = ServeLimits {
            header_read_timeout: Duration::from_millis(300),
            ..ServeLimits::default()
        };
        let (port, t) = start_limited(limits).await;
        let mut silent = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let mut partial = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        partial
            .write_all(b"GET /readiness HTTP/1.1\r\n")
            .await
            .unwrap();
        assert!(closed_within(&mut silent, Duration::from_secs(3)).await);
        assert!(closed_within(&mut partial, Duration::from_secs(3)).await);
        assert_eq!(request(port, "GET", "/readiness").await.0, 200);
        t.cancel();
    }

    #[tokio::test]
    async fn beyond_the_connection_cap_the_oldest_is_closed_and_probes_answer() {
        let limits = ServeLimits {
            header_read_timeout: Duration::from_secs(60),
            max_connections: 4,
        };
        let (port, t) = start_limited(limits).await;
        let mut idle = Vec::new();
        for _ in 0..10 {
            idle.push(
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .unwrap(),
            );
        }
        let (status, _) =
            tokio::time::timeout(Duration::from_secs(3), request(port, "GET", "/readiness"))
                .await
                .expect("a probe is answered despite ten idle connections");
        assert_eq!(status, 200);
        for s in idle.iter_mut().take(6) {
            assert!(
                closed_within(s, Duration::from_secs(3)).await,
                "the oldest connections are closed"
            );
        }
        t.cancel();
    }

    #[tokio::test]
    async fn metrics_expose_process_and_registered_metrics() {
        let r = new_registry();
        let c = prometheus::IntCounter::new("calico_test_total", "A test counter.").unwrap();
        r.register(Box::new(c.clone())).unwrap();
        c.inc_by(3);
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let t = CancellationToken::new();
        let j = tokio::spawn(serve_metrics(l, r, ServeLimits::default(), t.clone()));
        let (status, body) = request(port, "GET", "/metrics").await;
        assert_eq!(status, 200);
        assert!(body.contains("calico_test_total 3"), "{body}");
        assert!(body.contains("process_cpu_seconds_total"), "{body}");
        assert_eq!(request(port, "GET", "/").await.0, 404);
        t.cancel();
        tokio::time::timeout(Duration::from_secs(2), j)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}
