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
//! | `GET /drain` | the operator's drain: begun or not, sessions left |
//! | `POST /drain?rate=N` | stop accepting, not ready, close the sessions N per second (default 100; loopback only; one-way) |
//! | `GET /` | the web console (HTML, CSS and JS embedded in the binary) |
//! | `GET /api/devices` | each connected device with its path, why, and the state its frames reported |
//! | `GET /api/events` | decoded frames as they pass (Server-Sent Events; `?device=…&type=…`) |
//! | `GET /api/rollout` | rollout, SLOs, parity and the newest decisions in one document |
//! | `POST /api/canary?percent=N` | set `routing.canary_percent` in the config file and reload (loopback only) |
//!
//! A request naming a host other than an IP address, `localhost` or one of
//! `admin.allowed_hosts` is refused (DNS rebinding; `/healthz` and `/readyz` excepted), and so
//! is a browser's request another page sent (`Origin`, `Sec-Fetch-Site`), a link to the
//! console excepted. See [`refusal`].

use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::reload::Trigger;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
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
    /// Ends the console's event streams (the server's shutdown).
    pub stop: CancellationToken,
    /// Large answers built at once (`/api/devices`, `/routing`); more are answered 503.
    heavy: Arc<tokio::sync::Semaphore>,
}

/// Large answers built at once, off the runtime.
const HEAVY_AT_ONCE: usize = 2;

impl AdminState {
    /// State with readiness off.
    pub fn new(metrics: Arc<Metrics>, proxy: Option<Arc<Proxy>>) -> Arc<Self> {
        Arc::new(Self {
            metrics,
            ready: AtomicBool::new(false),
            proxy,
            stop: CancellationToken::new(),
            heavy: Arc::new(tokio::sync::Semaphore::new(HEAVY_AT_ONCE)),
        })
    }
}

/// An admin response's body: whole, or a stream (`/api/events`).
pub type Body = BoxBody<Bytes, Infallible>;
type Resp = Response<Body>;

fn text(status: StatusCode, body: impl Into<Bytes>, ctype: &'static str) -> Resp {
    let mut r = Response::new(Full::new(body.into()).boxed());
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

/// Compact JSON (the console's endpoints: a thousand devices stay small), not cached.
fn api_json(status: StatusCode, v: &Value) -> Resp {
    let mut body = serde_json::to_string(v).unwrap_or_default();
    body.push('\n');
    let mut r = text(status, body, "application/json");
    r.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    r
}

fn rfc3339(t: SystemTime) -> String {
    // humantime panics on a time before 1970 (a clock without RTC, stepped back).
    humantime::format_rfc3339_seconds(t.max(std::time::UNIX_EPOCH)).to_string()
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

/// One connected device as `/routing` and `/api/devices` show it.
fn device_entry(
    loaded: &crate::reload::Loaded,
    id: crate::codec::DeviceId,
    s: &crate::proxy::control::LiveSession,
) -> Value {
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
        "connect_reason_text": s.decision.reason.to_string(),
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
}

fn sorted_devices(
    proxy: &Proxy,
) -> Vec<(crate::codec::DeviceId, crate::proxy::control::LiveSession)> {
    let mut v = proxy.registry().snapshot();
    v.sort_by_key(|(id, _)| id.0);
    v
}

fn routing(proxy: &Proxy) -> Value {
    let loaded = proxy.config();
    let devices: Vec<Value> = sorted_devices(proxy)
        .iter()
        .map(|(id, s)| device_entry(&loaded, *id, s))
        .collect();
    let r = &loaded.config.routing;
    json!({
        "generation": loaded.generation,
        "mode": r.mode.label(),
        "canary_percent": r.canary_percent,
        "threshold": loaded.policy.threshold,
        "devices": devices,
    })
}

/// `GET /api/devices`: `/routing`'s fields and what each device's frames said.
fn api_devices(proxy: &Proxy, with_mesh: bool) -> Value {
    let loaded = proxy.config();
    let now = SystemTime::now();
    let pair = (std::time::Instant::now(), now);
    let (mut legacy, mut new, mut mirrored, mut fps) = (0u64, 0u64, 0u64, 0.0f64);
    let devices: Vec<Value> = sorted_devices(proxy)
        .iter()
        .map(|(id, s)| {
            let mut v = device_entry(&loaded, *id, s);
            let live = s.meta.live.report(pair, with_mesh);
            if let (Value::Object(m), Value::Object(l)) = (&mut v, live) {
                m.extend(l);
            }
            match s.path {
                crate::route::Path::Legacy => legacy += 1,
                crate::route::Path::New => new += 1,
            }
            mirrored += u64::from(s.path == crate::route::Path::Legacy && s.decision.mirror);
            fps += v["frames_per_second"].as_f64().unwrap_or(0.0);
            v
        })
        .collect();
    let r = &loaded.config.routing;
    json!({
        "generated_at": humantime::format_rfc3339_millis(now.max(std::time::UNIX_EPOCH)).to_string(),
        "generation": loaded.generation,
        "mode": r.mode.label(),
        "canary_percent": r.canary_percent,
        "rolled_back": loaded.runtime.rollback.is_some(),
        "counts": {"devices": devices.len(), "legacy": legacy, "new": new, "mirrored": mirrored},
        "frames_per_second": fps,
        "console": {
            "streams": proxy.console().streams(),
            "events": proxy.metrics().console_events.get(),
            "dropped_rate": proxy.metrics().console_dropped.with_label_values(&["rate"]).get(),
            "dropped_slow_client": proxy.metrics().console_dropped.with_label_values(&["slow_client"]).get(),
        },
        "devices": devices,
    })
}

/// `build` and its rendering run on a blocking thread: a fleet's answer is large (about 0.8 KB
/// per device) and must not hold up the runtime's other admin requests. At most
/// [`HEAVY_AT_ONCE`] at a time (the blocking pool also resolves upstream names and saves the
/// SLO state; a client that asks and hangs up does not cancel a build): more are answered 503.
async fn off_runtime(
    state: &AdminState,
    p: &Arc<Proxy>,
    build: impl FnOnce(&Proxy) -> Value + Send + 'static,
    render: fn(StatusCode, &Value) -> Resp,
) -> Resp {
    let Ok(permit) = state.heavy.clone().try_acquire_owned() else {
        let mut r = text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("busy: {HEAVY_AT_ONCE} large answers are being built; try again\n"),
            "text/plain; charset=utf-8",
        );
        r.headers_mut()
            .insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("1"));
        return r;
    };
    let p = p.clone();
    let job = move || {
        let _permit = permit;
        render(StatusCode::OK, &build(&p))
    };
    match tokio::task::spawn_blocking(job).await {
        Ok(r) => r,
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{e}\n"),
            "text/plain; charset=utf-8",
        ),
    }
}

/// `GET /api/rollout`: `/rollout`, `/slo`, `/parity` and the newest decisions.
fn api_rollout(proxy: &Proxy) -> Value {
    json!({
        "rollout": proxy.rollout_report(),
        "slo": proxy.slo_report(),
        "parity": proxy.parity_report(),
        "decisions": proxy.recent_decisions(),
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

/// What [`handle`] needs of a request.
pub struct Req<'a> {
    /// Method.
    pub method: &'a Method,
    /// Path, without the query.
    pub path: &'a str,
    /// The query string (empty when none).
    pub query: &'a str,
    /// Headers.
    pub headers: &'a HeaderMap,
    /// The client's address.
    pub remote: SocketAddr,
}

/// Answers `method path` (a `?query` allowed) from `remote`, with no headers.
pub async fn route(state: &AdminState, method: &Method, path: &str, remote: SocketAddr) -> Resp {
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    let headers = HeaderMap::new();
    handle(
        state,
        &Req {
            method,
            path,
            query,
            headers: &headers,
            remote,
        },
    )
    .await
}

/// The host part of a `Host` header or an origin's authority (port and brackets removed).
fn host_of(authority: &str) -> &str {
    let a = authority.trim();
    if let Some(rest) = a.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("");
    }
    a.rsplit_once(':').map_or(a, |(h, _)| h)
}

/// Why a request is refused before it is answered (`None`: it is not).
///
/// - Its `Host` names neither an IP address, `localhost` nor one of `allowed_hosts` (`"*"`
///   allows any): a DNS-rebinding page (the attacker's name resolving to this machine) sends
///   no `Origin` on a same-origin `GET`, and Chromium sends no `Sec-Fetch-*` to plain-HTTP
///   names, so the name is all that tells it from the console. Applies to every request, a
///   script's too, except `/healthz` and `/readyz` (they tell nothing).
/// - A browser says another page sent it (`Sec-Fetch-Site` other than `same-origin` or `none`,
///   or an `Origin` that is not this server): an `<img src=…/api/events>` elsewhere would hold
///   a stream slot, a form would change state. A top-level link to the console itself (`GET /`,
///   `Sec-Fetch-Mode: navigate`, `Sec-Fetch-Dest: document`) is let through: the other site
///   reads nothing.
pub fn refusal(
    headers: &HeaderMap,
    method: &Method,
    path: &str,
    allowed_hosts: &[String],
) -> Option<&'static str> {
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    if !matches!(path, "/healthz" | "/readyz") && !allowed_hosts.iter().any(|a| a == "*") {
        // Every Host header counts (two of them are no excuse).
        for v in headers.get_all(hyper::header::HOST) {
            let name = v.to_str().map(host_of).unwrap_or("");
            let allowed = name.parse::<std::net::IpAddr>().is_ok()
                || name.eq_ignore_ascii_case("localhost")
                || allowed_hosts.iter().any(|a| a.eq_ignore_ascii_case(name));
            if !allowed {
                return Some(
                    "the Host header names neither an IP address, localhost nor one of admin.allowed_hosts",
                );
            }
        }
    }
    let reads = *method == Method::GET || *method == Method::HEAD;
    let link_to_console = reads
        && matches!(path, "/" | "/index.html")
        && h("sec-fetch-mode").is_some_and(|v| v.eq_ignore_ascii_case("navigate"))
        && h("sec-fetch-dest").is_none_or(|v| v.eq_ignore_ascii_case("document"));
    if let Some(site) = h("sec-fetch-site")
        && !site.eq_ignore_ascii_case("same-origin")
        && !site.eq_ignore_ascii_case("none")
        && !link_to_console
    {
        return Some("the browser says another page sent it");
    }
    if let Some(origin) = h("origin") {
        let same = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .zip(h("host"))
            .is_some_and(|(o, h)| o.eq_ignore_ascii_case(h));
        if !same {
            return Some("the Origin header is not this server");
        }
    }
    None
}

const CONSOLE_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

fn asset(body: &'static str, ctype: &'static str) -> Resp {
    let mut r = text(StatusCode::OK, body, ctype);
    let h = r.headers_mut();
    h.insert(
        hyper::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    h.insert(
        hyper::header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONSOLE_CSP),
    );
    h.insert(
        hyper::header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        hyper::header::X_FRAME_OPTIONS,
        HeaderValue::from_static("DENY"),
    );
    h.insert(
        hyper::header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

fn event_stream_headers(r: &mut Resp) {
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(
        hyper::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
}

/// `GET /api/events` (`HEAD`: the headers, and no stream opened).
fn events(state: &AdminState, p: &Proxy, query: &str, head: bool) -> Resp {
    let filter = match crate::console::Filter::parse(query) {
        Ok(f) => f,
        Err(e) => {
            return api_json(
                StatusCode::BAD_REQUEST,
                &json!({"result": "error", "error": e}),
            );
        }
    };
    if head {
        let mut r = text(StatusCode::OK, Bytes::new(), "text/event-stream");
        event_stream_headers(&mut r);
        return r;
    }
    let a = &p.config().config.admin;
    let limits = crate::console::sse::StreamLimits {
        max_streams: a.console_max_streams,
        max_rate: a.console_max_events_per_second,
        keepalive: (a.idle_timeout / 3).min(Duration::from_secs(15)),
    };
    match p
        .console()
        .open_stream(filter, &limits, state.stop.child_token())
    {
        Ok(body) => {
            let mut r = Response::new(body.boxed());
            event_stream_headers(&mut r);
            r
        }
        Err(open) => api_json(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"result": "error", "error": format!("{open} event streams are open (admin.console_max_streams)")}),
        ),
    }
}

/// `POST /api/canary?percent=N`: the `canary set` code path (the file is edited, comments
/// kept, and re-read at once).
/// `POST /drain`'s rate when the query names none: devices closed per second.
pub const DEFAULT_DRAIN_RATE: u32 = 100;

/// The value of `key` in a query string as a whole number of 1..=100000 (`None` when absent).
fn query_u32(query: &str, key: &str) -> Result<Option<u32>, String> {
    let Some(v) = query.split('&').find_map(|kv| {
        kv.split_once('=')
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }) else {
        return Ok(None);
    };
    match v.parse::<u32>() {
        Ok(n) if (1..=crate::proxy::drain::MAX_RATE).contains(&n) => Ok(Some(n)),
        _ => Err(format!(
            "{key} must be a whole number from 1 to {}",
            crate::proxy::drain::MAX_RATE
        )),
    }
}

async fn set_canary(p: &Proxy, query: &str) -> Resp {
    let percent = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("percent="))
        .map(|v| v.parse::<f64>());
    let percent = match percent {
        Some(Ok(v)) if v.is_finite() => v,
        Some(_) => {
            return api_json(
                StatusCode::BAD_REQUEST,
                &json!({"result": "error", "error": "percent must be a number between 0 and 100"}),
            );
        }
        None => {
            return api_json(
                StatusCode::BAD_REQUEST,
                &json!({"result": "error", "error": "give ?percent=N (0–100)"}),
            );
        }
    };
    let Some(file) = p.live().source().map(std::path::Path::to_owned) else {
        return api_json(
            StatusCode::CONFLICT,
            &json!({"result": "error", "error": "this proxy was started without a configuration file: the canary share is set in the file (start it with --config FILE)"}),
        );
    };
    let live = p.live().clone();
    let f = file.clone();
    let done = tokio::task::spawn_blocking(move || {
        let old = crate::cmd::canary::set_percent(&f, percent)?;
        Ok::<_, crate::cmd::canary::Error>((old, live.reload(Trigger::Admin)))
    })
    .await;
    let loaded = p.config();
    let notes = crate::cmd::canary::moot_notes(&loaded.config, |k| std::env::var(k).ok());
    match done {
        Ok(Ok((old, reload))) => {
            let reload = match reload {
                Ok(o) => json!(o),
                Err(e) => json!({"result": "error", "error": e.to_string()}),
            };
            api_json(
                StatusCode::OK,
                &json!({
                    "result": "set",
                    "file": file.display().to_string(),
                    "previous_percent": old,
                    "percent": percent,
                    "reload": reload,
                    "generation": loaded.generation,
                    "canary_percent_in_force": loaded.config.routing.canary_percent,
                    "notes": notes,
                }),
            )
        }
        Ok(Err(e)) => {
            let status = match e {
                crate::cmd::canary::Error::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
                _ => StatusCode::UNPROCESSABLE_ENTITY,
            };
            api_json(status, &json!({"result": "error", "error": e.to_string()}))
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{e}\n"),
            "text/plain; charset=utf-8",
        ),
    }
}

const CONSOLE_PATHS: [&str; 8] = [
    "/",
    "/index.html",
    "/console.js",
    "/console.css",
    "/api/devices",
    "/api/events",
    "/api/rollout",
    "/api/canary",
];

/// Answers one request.
pub async fn handle(state: &AdminState, req: &Req<'_>) -> Resp {
    const PLAIN: &str = "text/plain; charset=utf-8";
    let (method, path, remote) = (req.method, req.path, req.remote);
    let get = method == Method::GET || method == Method::HEAD;
    let console_on = state
        .proxy
        .as_ref()
        .is_some_and(|p| p.config().config.admin.console);
    let no_hosts = Vec::new();
    let cfg = state.proxy.as_ref().map(|p| p.config());
    let allowed = cfg
        .as_ref()
        .map_or(&no_hosts, |c| &c.config.admin.allowed_hosts);
    if let Some(why) = refusal(req.headers, method, path, allowed) {
        return text(
            StatusCode::FORBIDDEN,
            format!(
                "refused: {why} (name this server by an IP address, localhost or a name in admin.allowed_hosts; a browser only from its own pages)\n"
            ),
            PLAIN,
        );
    }
    if CONSOLE_PATHS.contains(&path) && !console_on {
        return text(
            StatusCode::NOT_FOUND,
            "not found: the web console is off (admin.console = false)\n",
            PLAIN,
        );
    }
    match (path, get, &state.proxy) {
        ("/" | "/index.html", true, Some(_)) => asset(
            crate::console::assets::INDEX_HTML,
            "text/html; charset=utf-8",
        ),
        ("/console.js", true, Some(_)) => asset(
            crate::console::assets::CONSOLE_JS,
            "text/javascript; charset=utf-8",
        ),
        ("/console.css", true, Some(_)) => asset(
            crate::console::assets::CONSOLE_CSS,
            "text/css; charset=utf-8",
        ),
        ("/api/devices", true, Some(p)) => {
            let with_mesh = req
                .query
                .split('&')
                .any(|kv| kv == "mesh=1" || kv == "mesh=true");
            off_runtime(state, p, move |p| api_devices(p, with_mesh), api_json).await
        }
        ("/api/rollout", true, Some(p)) => api_json(StatusCode::OK, &api_rollout(p)),
        ("/api/events", true, Some(p)) => events(state, p, req.query, method == Method::HEAD),
        ("/metrics", true, _) => text(
            StatusCode::OK,
            state.metrics.render(),
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        ("/healthz", true, _) => text(StatusCode::OK, "ok\n", PLAIN),
        ("/readyz", true, _) => {
            if !state.ready.load(Ordering::Relaxed)
                || state.proxy.as_ref().is_some_and(|p| p.is_draining())
            {
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
        ("/routing", true, Some(p)) => off_runtime(state, p, routing, json_resp).await,
        ("/parity", true, Some(p)) => json_resp(StatusCode::OK, &p.parity_report()),
        ("/slo", true, Some(p)) => json_resp(StatusCode::OK, &p.slo_report()),
        ("/config", true, Some(p)) => json_resp(StatusCode::OK, &config(p)),
        ("/rollout", true, Some(p)) => json_resp(StatusCode::OK, &p.rollout_report()),
        ("/drain", true, Some(p)) => json_resp(StatusCode::OK, &p.drain_report()),
        (
            "/reload" | "/rollback" | "/rollback/clear" | "/rollout/pause" | "/rollout/resume"
            | "/api/canary" | "/drain",
            false,
            Some(_),
        ) if method == Method::POST && !remote.ip().is_loopback() => text(
            StatusCode::FORBIDDEN,
            "state-changing endpoints answer loopback only\n",
            PLAIN,
        ),
        ("/api/canary", false, Some(p)) if method == Method::POST => set_canary(p, req.query).await,
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
        ("/drain", false, Some(p)) if method == Method::POST => {
            let per_second = match query_u32(req.query, "rate") {
                Ok(r) => r.unwrap_or(DEFAULT_DRAIN_RATE),
                Err(e) => {
                    return json_resp(
                        StatusCode::BAD_REQUEST,
                        &json!({"result": "error", "error": e}),
                    );
                }
            };
            state.ready.store(false, Ordering::Relaxed);
            let begun = p.begin_drain(per_second);
            let mut doc = p.drain_report();
            doc["result"] = json!(if begun {
                "draining"
            } else {
                "already_draining"
            });
            json_resp(StatusCode::OK, &doc)
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
            | "/rollout/resume" | "/" | "/index.html" | "/console.js" | "/console.css"
            | "/api/devices" | "/api/events" | "/api/rollout" | "/api/canary" | "/drain",
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
            _ = shutdown.cancelled() => {
                state.stop.cancel();
                return;
            }
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
                    let r = Req {
                        method: req.method(),
                        path: req.uri().path(),
                        query: req.uri().query().unwrap_or(""),
                        headers: req.headers(),
                        remote,
                    };
                    let resp = handle(&state, &r).await;
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
    fn cross_site_and_rebinding_requests_are_told_apart_from_scripts_and_the_console() {
        let hm = |pairs: &[(&'static str, &str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(*k, HeaderValue::from_str(v).unwrap());
            }
            h
        };
        let cross_site = |h: &HeaderMap| refusal(h, &Method::POST, "/reload", &[]);
        let get = |h: &HeaderMap| refusal(h, &Method::GET, "/", &[]);
        let stream = |h: &HeaderMap| refusal(h, &Method::GET, "/api/events", &[]);
        // Reads: a link from another site to the console passes; an image, a frame or a
        // script of another site asking for the stream does not.
        let nav = [
            ("host", "127.0.0.1:9400"),
            ("sec-fetch-site", "cross-site"),
            ("sec-fetch-mode", "navigate"),
            ("sec-fetch-dest", "document"),
        ];
        assert_eq!(get(&hm(&nav)), None);
        assert!(cross_site(&hm(&nav)).is_some(), "a cross-site form post");
        assert!(
            stream(&hm(&nav)).is_some(),
            "a link to the stream holds a slot"
        );
        // Another port of this machine (same-site) is another page too.
        let img_same_site = [
            ("host", "127.0.0.1:9400"),
            ("sec-fetch-site", "same-site"),
            ("sec-fetch-mode", "no-cors"),
            ("sec-fetch-dest", "image"),
        ];
        assert!(stream(&hm(&img_same_site)).is_some());
        for (mode, dest) in [
            ("no-cors", "image"),
            ("navigate", "iframe"),
            ("cors", "empty"),
        ] {
            assert!(
                stream(&hm(&[
                    ("host", "127.0.0.1:9400"),
                    ("sec-fetch-site", "cross-site"),
                    ("sec-fetch-mode", mode),
                    ("sec-fetch-dest", dest),
                ]))
                .is_some(),
                "{mode} {dest}"
            );
        }
        // A rebinding page reading the devices: by its name, and no browser header at all
        // (a same-origin GET has no Origin; Chromium sends no Sec-Fetch-* to plain HTTP).
        assert!(
            refusal(
                &hm(&[("host", "evil.example:9400")]),
                &Method::GET,
                "/api/devices",
                &[]
            )
            .is_some()
        );
        // Health probes name what they like.
        assert_eq!(
            refusal(
                &hm(&[("host", "pod-name:9400")]),
                &Method::GET,
                "/healthz",
                &[]
            ),
            None
        );
        // The machine's own name, once allowed.
        let named = hm(&[
            ("host", "CyncBox:9400"),
            ("sec-fetch-site", "none"),
            ("sec-fetch-mode", "navigate"),
        ]);
        assert!(get(&named).is_some());
        assert_eq!(
            refusal(&named, &Method::GET, "/", &["cyncbox".to_string()]),
            None
        );
        assert_eq!(
            refusal(&named, &Method::GET, "/metrics", &["*".to_string()]),
            None
        );
        // curl, scripts: no Origin.
        assert_eq!(cross_site(&hm(&[("host", "127.0.0.1:9400")])), None);
        assert_eq!(cross_site(&hm(&[])), None);
        assert_eq!(cross_site(&hm(&[("host", "localhost:9400")])), None);
        assert_eq!(cross_site(&hm(&[("host", "[::1]:9400")])), None);
        // The console itself.
        let same = [
            ("host", "127.0.0.1:9400"),
            ("origin", "http://127.0.0.1:9400"),
            ("sec-fetch-site", "same-origin"),
        ];
        assert_eq!(cross_site(&hm(&same)), None);
        // Another site's page, a rebinding name, a second Host header.
        assert!(
            cross_site(&hm(&[
                ("host", "127.0.0.1:9400"),
                ("origin", "http://evil.example")
            ]))
            .is_some()
        );
        assert!(cross_site(&hm(&[("host", "127.0.0.1:9400"), ("origin", "null")])).is_some());
        assert!(
            cross_site(&hm(&[
                ("host", "127.0.0.1:9400"),
                ("origin", "http://127.0.0.1:9401")
            ]))
            .is_some()
        );
        assert!(
            cross_site(&hm(&[
                ("host", "127.0.0.1:9400"),
                ("sec-fetch-site", "cross-site")
            ]))
            .is_some()
        );
        let rebound = |host: &'static str| {
            cross_site(&hm(&[
                ("host", host),
                ("origin", "http://evil.example:9400"),
            ]))
        };
        assert!(rebound("evil.example:9400").is_some());
        assert!(
            cross_site(&hm(&[
                ("host", "evil.example:9400"),
                ("sec-fetch-site", "same-origin")
            ]))
            .is_some()
        );
        assert!(
            cross_site(&hm(&[
                ("host", "127.0.0.1.evil.example"),
                ("sec-fetch-site", "none")
            ]))
            .is_some()
        );
        assert!(
            cross_site(&hm(&[
                ("host", "127.0.0.1:9400"),
                ("host", "evil.example"),
                ("origin", "http://127.0.0.1:9400")
            ]))
            .is_some()
        );
        // A script naming the machine by its name (Debian maps it to 127.0.1.1) needs the
        // name allowed: nothing tells it from a rebinding page.
        assert!(cross_site(&hm(&[("host", "cyncbox:9400")])).is_some());
        assert_eq!(
            refusal(
                &hm(&[("host", "cyncbox:9400")]),
                &Method::POST,
                "/reload",
                &["cyncbox".into()]
            ),
            None
        );
    }

    #[tokio::test]
    async fn a_drain_is_begun_from_loopback_only_and_once() {
        // Transparent: ready with no upstream known (nothing is probed here).
        let (st, _dir) = state_with(|c| c.upstream.mode = crate::config::UpstreamMode::Transparent);
        st.ready.store(true, Ordering::Relaxed);
        let lan: SocketAddr = "192.0.2.7:5".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:5".parse().unwrap();
        let r = route(&st, &Method::POST, "/drain", lan).await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            route(&st, &Method::GET, "/drain", local).await.status(),
            StatusCode::OK
        );
        assert_eq!(
            route(&st, &Method::PUT, "/drain", local).await.status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        for bad in ["rate=0", "rate=100001", "rate=-3", "rate=1.5", "rate="] {
            let r = route(&st, &Method::POST, &format!("/drain?{bad}"), local).await;
            assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{bad}");
        }
        let p = st.proxy.clone().unwrap();
        assert!(!p.is_draining(), "a refused request began a drain");
        assert_eq!(
            route(&st, &Method::GET, "/readyz", local).await.status(),
            StatusCode::OK
        );
        let r = route(&st, &Method::POST, "/drain?rate=5", local).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert!(p.is_draining());
        assert_eq!(p.drain_report()["per_second"], 5);
        assert_eq!(
            route(&st, &Method::GET, "/readyz", local).await.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        // Once begun, the first rate holds.
        assert!(!p.begin_drain(1000));
        assert_eq!(p.drain_report()["per_second"], 5);
        assert_eq!(st.metrics.draining.get(), 1);
    }

    #[tokio::test]
    async fn large_answers_are_built_two_at_a_time() {
        let (st, _dir) = state_with(|_| {});
        let local: SocketAddr = "127.0.0.1:5".parse().unwrap();
        let held = st
            .heavy
            .clone()
            .try_acquire_many_owned(HEAVY_AT_ONCE as u32)
            .unwrap();
        let r = route(&st, &Method::GET, "/api/devices", local).await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(r.headers().contains_key(hyper::header::RETRY_AFTER));
        assert_eq!(
            route(&st, &Method::GET, "/routing", local).await.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        drop(held);
        assert_eq!(
            route(&st, &Method::GET, "/api/devices", local)
                .await
                .status(),
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn the_console_can_be_turned_off() {
        let (st, _dir) = state_with(|c| c.admin.console = false);
        let local: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        for p in [
            "/",
            "/console.js",
            "/api/devices",
            "/api/events",
            "/api/rollout",
        ] {
            assert_eq!(
                route(&st, &Method::GET, p, local).await.status(),
                StatusCode::NOT_FOUND,
                "{p}"
            );
        }
        assert_eq!(
            route(&st, &Method::POST, "/api/canary?percent=5", local)
                .await
                .status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            route(&st, &Method::GET, "/routing", local).await.status(),
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn a_proxy_without_a_config_file_says_so_when_the_canary_is_set() {
        let (st, _dir) = state_with(|_| {});
        let local: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let r = route(&st, &Method::POST, "/api/canary?percent=5", local).await;
        assert_eq!(r.status(), StatusCode::CONFLICT);
        let r = route(&st, &Method::GET, "/", local).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert!(
            r.headers()["content-security-policy"]
                .to_str()
                .unwrap()
                .contains("default-src 'none'")
        );
        let outside: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        let r = route(&st, &Method::POST, "/api/canary?percent=5", outside).await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
    }

    /// Admin state over a proxy on the default configuration changed by `edit` (its SLO state
    /// in a scratch folder, kept while the returned folder lives).
    fn state_with(
        edit: impl FnOnce(&mut crate::config::Config),
    ) -> (AdminState, tempfile::TempDir) {
        let m = Arc::new(Metrics::new(false));
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = crate::config::Config::default();
        cfg.slo.state_file = dir.path().join("slo/state.json");
        edit(&mut cfg);
        let live = crate::reload::LiveConfig::fixed(cfg, m.clone()).unwrap();
        let certs = crate::tls::init_certs(dir.path(), false).unwrap();
        let proxy = Proxy::new(live, &certs, m.clone(), Vec::new()).unwrap();
        let st = Arc::into_inner(AdminState::new(m, Some(proxy))).unwrap();
        (st, dir)
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
        let (st, _dir) = state_with(|_| {});
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
