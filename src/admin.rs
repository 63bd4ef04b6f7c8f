//! The admin HTTP server (hyper), 127.0.0.1 by default:
//!
//! | endpoint | answer |
//! |---|---|
//! | `GET /metrics` | Prometheus text |
//! | `GET /healthz` | the process is alive |
//! | `GET /readyz` | listening, not draining, and a legacy upstream answered recently |
//! | `GET /upstreams` | health of each upstream address (up, failures, last error, backoff) |
//! | `GET /routing` | each connected device: path, reason, since |
//! | `GET /config` | generation, source, pending restarts, the config (secrets masked) |
//! | `GET /slo` | the latest SLO evaluation of every SLI on both transports, the controller's state and the latest decision |
//! | `GET /rollout` | the progressive rollout: steps, current step, status |
//! | `GET /parity` | the shadow comparison: ratios per request type, top drifting devices, latest drifts |
//! | `POST /reload` | re-read the config file (from loopback only) |
//! | `POST /rollback` | every device back to the legacy path until cleared (loopback only) |
//! | `POST /rollback/clear` | lift the rollback override (loopback only) |
//! | `POST /rollout/pause`, `POST /rollout/resume` | hold or continue the rollout (loopback only) |

use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::reload::Trigger;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What the admin endpoints read.
pub struct AdminState {
    /// The metrics to expose.
    pub metrics: Arc<Metrics>,
    /// Whether the proxy accepts connections (false before binding and while draining).
    pub ready: AtomicBool,
    /// The proxy, for `/routing`, `/config` and `/reload`.
    pub proxy: Option<Arc<Proxy>>,
}

impl AdminState {
    /// State with readiness off.
    pub fn new(metrics: Arc<Metrics>, proxy: Option<Arc<Proxy>>) -> Arc<Self> {
        Arc::new(Self {
            metrics,
            ready: AtomicBool::new(false),
            proxy,
        })
    }
}

type Resp = Response<Full<Bytes>>;

fn text(status: StatusCode, body: impl Into<Bytes>, ctype: &'static str) -> Resp {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

fn json_resp(status: StatusCode, v: &Value) -> Resp {
    let mut body = serde_json::to_string_pretty(v).unwrap_or_default();
    body.push('\n');
    text(status, body, "application/json")
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Replaces values of keys that look secret (`seed`, `*password*`, `*token*`, `*secret*`,
/// `*_key`) with `"***"`.
pub fn mask_secrets(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for (k, val) in m.iter_mut() {
                let k = k.to_ascii_lowercase();
                let secret = k == "seed"
                    || k.contains("password")
                    || k.contains("token")
                    || k.contains("secret")
                    || k.ends_with("_key");
                if secret && !val.is_null() {
                    *val = json!("***");
                } else {
                    mask_secrets(val);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(mask_secrets),
        _ => {}
    }
}

fn routing(proxy: &Proxy) -> Value {
    let loaded = proxy.config();
    let mut devices: Vec<Value> = proxy
        .registry()
        .snapshot()
        .into_iter()
        .map(|(id, s)| {
            let now = loaded.policy.decide(crate::route::PeerKind::Device(id));
            json!({
                "device_id": id.to_string(),
                // The path it is relayed on (legacy after a new_primary fallback).
                "path": s.path.label(),
                "decided_path": s.decision.path.label(),
                "fell_back": s.path != s.decision.path,
                "mirror": s.decision.mirror,
                "fallback": s.decision.fallback,
                "mode": s.decision.mode.label(),
                // Why it took its path when it connected, under the policy of then.
                "connect_reason": s.decision.reason,
                // What the policy in force now says (its threshold is the top-level one).
                "current_path": now.path.label(),
                "current_reason": now.reason,
                "current_reason_text": now.reason.to_string(),
                "would_move": s.moves_under(&now),
                "bucket": loaded.policy.bucket(id),
                "since": rfc3339(s.since),
                "peer": s.peer.to_string(),
                "connection": s.conn.to_string(),
            })
        })
        .collect();
    devices.sort_by(|a, b| a["device_id"].as_str().cmp(&b["device_id"].as_str()));
    let r = &loaded.config.routing;
    json!({
        "generation": loaded.generation,
        "mode": r.mode.label(),
        "canary_percent": r.canary_percent,
        "threshold": loaded.policy.threshold,
        "devices": devices,
    })
}

fn config(proxy: &Proxy) -> Value {
    let loaded = proxy.config();
    let mut cfg = serde_json::to_value(&loaded.config).unwrap_or(Value::Null);
    mask_secrets(&mut cfg);
    let mut file_routing = serde_json::to_value(&loaded.base_routing).unwrap_or(Value::Null);
    mask_secrets(&mut file_routing);
    json!({
        "generation": loaded.generation,
        "source": proxy.live().source().map(|p| p.display().to_string()),
        "loaded_at": rfc3339(loaded.loaded_at),
        "pending_restart": loaded.pending_restart,
        "env_overrides": loaded.env_overrides,
        "runtime_override": loaded.runtime,
        "file_routing": file_routing,
        "config": cfg,
    })
}

/// Answers one request from `remote`.
pub async fn route(state: &AdminState, method: &Method, path: &str, remote: SocketAddr) -> Resp {
    const PLAIN: &str = "text/plain; charset=utf-8";
    let get = method == Method::GET || method == Method::HEAD;
    match (path, get, &state.proxy) {
        ("/metrics", true, _) => text(
            StatusCode::OK,
            state.metrics.render(),
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        ("/healthz", true, _) => text(StatusCode::OK, "ok\n", PLAIN),
        ("/readyz", true, _) => {
            if !state.ready.load(Ordering::Relaxed) {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: not listening yet, or draining\n",
                    PLAIN,
                );
            }
            match &state.proxy {
                Some(p) if !p.upstream_ready() => {
                    let why: Vec<String> = p
                        .health()
                        .report()
                        .into_iter()
                        .filter(|a| a.path == "legacy")
                        .map(|a| {
                            format!(
                                "{}: {}",
                                a.address,
                                a.last_error.as_deref().unwrap_or("not checked yet")
                            )
                        })
                        .collect();
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!(
                            "not ready: no legacy upstream answered recently ({})\n",
                            why.join("; ")
                        ),
                        PLAIN,
                    )
                }
                _ => text(StatusCode::OK, "ready\n", PLAIN),
            }
        }
        ("/upstreams", true, Some(p)) => json_resp(
            StatusCode::OK,
            &json!({"ready": p.upstream_ready(), "upstreams": p.health().report()}),
        ),
        ("/routing", true, Some(p)) => json_resp(StatusCode::OK, &routing(p)),
        ("/parity", true, Some(p)) => json_resp(StatusCode::OK, &p.parity_report()),
        ("/slo", true, Some(p)) => json_resp(StatusCode::OK, &p.slo_report()),
        ("/config", true, Some(p)) => json_resp(StatusCode::OK, &config(p)),
        ("/rollout", true, Some(p)) => json_resp(StatusCode::OK, &p.rollout_report()),
        (
            "/reload" | "/rollback" | "/rollback/clear" | "/rollout/pause" | "/rollout/resume",
            false,
            Some(_),
        ) if method == Method::POST && !remote.ip().is_loopback() => text(
            StatusCode::FORBIDDEN,
            "state-changing endpoints answer loopback only\n",
            PLAIN,
        ),
        ("/rollback", false, Some(p)) if method == Method::POST => {
            let set = p.rollback_now("POST /rollback").await;
            json_resp(
                StatusCode::OK,
                &json!({"result": if set { "rolled_back" } else { "already_rolled_back" }, "control": p.slo_report()["control"]}),
            )
        }
        ("/rollback/clear", false, Some(p)) if method == Method::POST => {
            let cleared = p.clear_rollback().await;
            json_resp(
                StatusCode::OK,
                &json!({"result": if cleared.is_some() { "cleared" } else { "no_override" }, "control": p.slo_report()["control"]}),
            )
        }
        ("/rollout/pause" | "/rollout/resume", false, Some(p)) if method == Method::POST => {
            match p.rollout_pause(path == "/rollout/pause") {
                Ok(v) => json_resp(StatusCode::OK, &v),
                Err(e) => json_resp(
                    StatusCode::CONFLICT,
                    &json!({"result": "error", "error": e}),
                ),
            }
        }
        ("/reload", false, Some(p)) if method == Method::POST => {
            let live = p.live().clone();
            match tokio::task::spawn_blocking(move || live.reload(Trigger::Admin)).await {
                Ok(Ok(outcome)) => json_resp(StatusCode::OK, &json!(outcome)),
                Ok(Err(e)) => json_resp(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    &json!({"result": "error", "error": e.to_string(), "generation": p.config().generation}),
                ),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"), PLAIN),
            }
        }
        (
            "/metrics" | "/healthz" | "/readyz" | "/routing" | "/config" | "/reload" | "/upstreams"
            | "/parity" | "/slo" | "/rollout" | "/rollback" | "/rollback/clear" | "/rollout/pause"
            | "/rollout/resume",
            _,
            _,
        ) => text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n",
            PLAIN,
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n", PLAIN),
    }
}

/// Limits of the admin server (from `[admin]`).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// A request's headers must arrive within this.
    pub header_timeout: Duration,
    /// Close a connection with no bytes either way for this long.
    pub idle_timeout: Duration,
    /// Connections at once; more are closed at accept.
    pub max_connections: usize,
}

impl From<&crate::config::AdminConfig> for Limits {
    fn from(c: &crate::config::AdminConfig) -> Self {
        Self {
            header_timeout: c.header_timeout,
            idle_timeout: c.idle_timeout,
            max_connections: c.max_connections,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        (&crate::config::AdminConfig::default()).into()
    }
}

/// A stream that notes when bytes last moved, for the idle timeout.
struct Tracked<S> {
    inner: S,
    start: std::time::Instant,
    last_ms: Arc<std::sync::atomic::AtomicU64>,
}

impl<S> Tracked<S> {
    fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves the admin endpoints on `listener` until `shutdown`, within `limits`: headers must
/// arrive within `header_timeout`, a connection idle for `idle_timeout` is closed, and
/// connections beyond `max_connections` are closed at accept (counted in
/// `cync_mitm_admin_rejected_total`).
pub async fn run(
    listener: TcpListener,
    state: Arc<AdminState>,
    shutdown: CancellationToken,
    limits: Limits,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    loop {
        let (stream, remote) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            state.metrics.admin_rejected.inc();
            tracing::debug!(%remote, "admin connection limit reached; closing");
            drop(stream);
            continue;
        };
        let state = state.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let last_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let io = Tracked {
                inner: stream,
                start: std::time::Instant::now(),
                last_ms: last_ms.clone(),
            };
            let started = io.start;
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                async move {
                    let resp = route(&state, req.method(), req.uri().path(), remote).await;
                    Ok::<_, Infallible>(resp)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(io), svc);
            let idle = async {
                let tick = (limits.idle_timeout / 4)
                    .clamp(Duration::from_millis(10), Duration::from_secs(1));
                loop {
                    tokio::time::sleep(tick).await;
                    let now = started.elapsed().as_millis() as u64;
                    let last = last_ms.load(Ordering::Relaxed);
                    if Duration::from_millis(now.saturating_sub(last)) >= limits.idle_timeout {
                        return;
                    }
                }
            };
            tokio::select! {
                _ = conn => {}
                _ = idle => tracing::debug!(%remote, "admin connection idle; closed"),
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// Serves with `limits` on 127.0.0.1:0.
    async fn serve(limits: Limits) -> (std::net::SocketAddr, CancellationToken) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let stop = CancellationToken::new();
        let state = AdminState::new(Arc::new(Metrics::new(false)), None);
        tokio::spawn(run(l, state, stop.clone(), limits));
        (addr, stop)
    }

    /// How long until the server closes `s` (reading and discarding), at most `limit`.
    async fn closed_after(s: &mut tokio::net::TcpStream, limit: Duration) -> Option<Duration> {
        let t0 = std::time::Instant::now();
        let mut b = [0u8; 512];
        tokio::time::timeout(limit, async {
            loop {
                match s.read(&mut b).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await
        .ok()
        .map(|()| t0.elapsed())
    }

    #[tokio::test]
    async fn a_quiet_keep_alive_connection_is_closed_by_the_idle_timeout() {
        // The header timeout is far away: only the idle timeout can close it this soon.
        let (addr, stop) = serve(Limits {
            header_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_millis(400),
            max_connections: 4,
        })
        .await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut b = [0u8; 256];
        assert!(s.read(&mut b).await.unwrap() > 0);
        let after = closed_after(&mut s, Duration::from_secs(5)).await;
        let after = after.expect("a quiet keep-alive connection stayed open");
        assert!(after >= Duration::from_millis(300), "{after:?}");
        // A connection that never sends anything goes the same way.
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(closed_after(&mut s, Duration::from_secs(5)).await.is_some());
        stop.cancel();
    }

    #[tokio::test]
    async fn headers_dribbled_slower_than_the_header_timeout_are_cut() {
        // Bytes keep arriving (the idle timeout never fires), but the headers never end.
        let (addr, stop) = serve(Limits {
            header_timeout: Duration::from_millis(500),
            idle_timeout: Duration::from_secs(30),
            max_connections: 4,
        })
        .await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let t0 = std::time::Instant::now();
        s.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
        let mut cut = None;
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if s.write_all(b"X-Slow: 1\r\n").await.is_err() {
                cut = Some(t0.elapsed());
                break;
            }
            let mut b = [0u8; 64];
            if let Ok(Ok(0) | Err(_)) =
                tokio::time::timeout(Duration::from_millis(1), s.read(&mut b)).await
            {
                cut = Some(t0.elapsed());
                break;
            }
        }
        let cut = cut.expect("a slowloris kept its admin connection for 5 s");
        assert!(cut < Duration::from_secs(3), "{cut:?}");
        stop.cancel();
    }

    #[test]
    fn masks_secret_looking_keys() {
        let mut v = json!({"routing": {"seed": "abc", "mode": "shadow"}, "x": [{"api_token": "t"}], "ca_file": null});
        mask_secrets(&mut v);
        assert_eq!(v["routing"]["seed"], "***");
        assert_eq!(v["routing"]["mode"], "shadow");
        assert_eq!(v["x"][0]["api_token"], "***");
        assert!(v["ca_file"].is_null());
    }

    #[tokio::test]
    async fn reload_is_loopback_only_and_unknown_paths_404() {
        let m = Arc::new(Metrics::new(false));
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = crate::config::Config::default();
        cfg.slo.state_file = dir.path().join("slo/state.json");
        let live = crate::reload::LiveConfig::fixed(cfg, m.clone()).unwrap();
        let certs = crate::tls::init_certs(dir.path(), false).unwrap();
        let proxy = Proxy::new(live, &certs, m.clone(), Vec::new()).unwrap();
        let st = AdminState::new(m, Some(proxy));
        let outside: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        assert_eq!(
            route(&st, &Method::POST, "/reload", outside).await.status(),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            route(&st, &Method::POST, "/reload", local).await.status(),
            StatusCode::OK
        );
        assert_eq!(
            route(&st, &Method::GET, "/reload", local).await.status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            route(&st, &Method::GET, "/nope", local).await.status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            route(&st, &Method::GET, "/readyz", local).await.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            route(&st, &Method::GET, "/routing", local).await.status(),
            StatusCode::OK
        );
    }
}
