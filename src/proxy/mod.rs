//! The proxy: listeners, one session per connection, and graceful shutdown.
//!
//! A session terminates the device's TLS, reads the first frame to learn who is connecting
//! (0x23 → device id, 0x13 → phone app), connects upstream, forwards what it has read, and then
//! relays both ways byte for byte while the taps decode and count. Nothing slow runs on the
//! accept loop: handshakes and connects run in the session task, under the configured timeouts.

pub mod control;
pub mod drain;
pub mod health;
pub mod relay;
mod session;
mod slo;
pub use slo::{try_lock_state as try_lock_slo_state, write_state as save_slo_state};
pub mod tap;
pub mod upstream;

use crate::codec::{Body, Frame, Framer, FramerEvent};
use crate::config::Config;
use crate::metrics::{Flow, Metrics};
use crate::reload::{LiveConfig, Loaded};
use crate::route::{Decision, Path};
use crate::tls::{CertPaths, DeviceAcceptor, TlsError};
use control::{Cause, LiveSession, Registry, SessionControl};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};
use tap::{ConnMeta, DirectionTap, PeerKind, TapSink};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

/// A bidirectional byte stream (TLS or plain) the relay can own.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Which listener a connection came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerKind {
    /// TLS (23779).
    Tls,
    /// Plaintext (23778).
    Plain,
}

impl ListenerKind {
    fn label(self) -> &'static str {
        match self {
            Self::Tls => "tls",
            Self::Plain => "plain",
        }
    }
}

/// Errors building the proxy.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// TLS setup failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// The running proxy's shared state.
pub struct Proxy {
    live: Arc<LiveConfig>,
    acceptor: DeviceAcceptor,
    metrics: Arc<Metrics>,
    registry: Registry,
    limit: Arc<Semaphore>,
    stop_accepting: CancellationToken,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    /// Background tasks shutdown waits for (the SLO loop's last save), apart from sessions.
    background: TaskTracker,
    sinks: Arc<[Arc<dyn TapSink>]>,
    health: health::Health,
    parity: Arc<crate::parity::hub::Hub>,
    /// The SLO engine, its controller and their state.
    slo: slo::Slo,
    /// The web console's tap (also in `sinks`).
    console: Arc<crate::console::Console>,
    /// An operator's drain, once begun (`POST /drain`).
    operator_drain: OnceLock<Arc<drain::OperatorDrain>>,
}

struct GaugeGuard(prometheus::IntGauge);

/// A mirror's idle timeout: none of its own (it ends with its session).
const MAX_DURATION_IDLE: Duration = Duration::from_secs(366 * 86_400);

/// A mirror's queue and its session's parity, as attached.
type MirrorStart = (
    tokio::sync::mpsc::Receiver<bytes::Bytes>,
    Option<Arc<std::sync::Mutex<crate::parity::hub::SessionParity>>>,
);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Proxy {
    /// Builds the proxy on a live configuration and the certificates to serve. Inside a Tokio
    /// runtime it also starts the drainer that moves devices after routing changes.
    pub fn new(
        live: Arc<LiveConfig>,
        certs: &CertPaths,
        metrics: Arc<Metrics>,
        sinks: Vec<Arc<dyn TapSink>>,
    ) -> Result<Arc<Self>, ProxyError> {
        let cfg = live.current();
        let acceptor = DeviceAcceptor::new(&cfg.config.tls, certs)?;
        let limit = Arc::new(Semaphore::new(
            cfg.config
                .limits
                .max_connections
                .min(Semaphore::MAX_PERMITS),
        ));
        let health = health::Health::new(metrics.clone(), cfg.config.upstream.probe_interval * 3);
        if cfg.config.upstream.mode == crate::config::UpstreamMode::Fixed {
            health.track(Path::Legacy, &cfg.config.upstream.addresses);
        }
        health.track(Path::New, &cfg.config.new_path.addresses);
        let parity = crate::parity::hub::Hub::new(metrics.parity.clone());
        let console = crate::console::Console::new(metrics.clone());
        let mut sinks = sinks;
        // `admin.console` needs a restart: off, the console costs nothing per frame.
        if cfg.config.admin.console {
            sinks.push(console.clone());
        }
        let me = Arc::new(Self {
            console,
            slo: slo::Slo::load(&cfg.config.slo.state_file, &metrics),
            parity,
            health,
            live,
            acceptor,
            metrics,
            registry: Registry::default(),
            limit,
            stop_accepting: CancellationToken::new(),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            background: TaskTracker::new(),
            sinks: sinks.into(),
            operator_drain: OnceLock::new(),
        });
        me.init_slo_runtime();
        if tokio::runtime::Handle::try_current().is_ok() {
            let d = me.clone();
            tokio::spawn(async move { d.drainer().await });
            // Tracked: shutdown waits for its last save.
            let s = me.clone();
            me.background.spawn(async move { s.slo_loop().await });
        }
        Ok(me)
    }

    /// The web console's live data and frame stream.
    pub fn console(&self) -> &Arc<crate::console::Console> {
        &self.console
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Loaded> {
        self.live.current()
    }

    /// The `GET /parity` document: the settings in force, ratios per request type, the most
    /// drifting devices and the latest drifts.
    pub fn parity_report(&self) -> serde_json::Value {
        let l = self.live.current();
        let p = &l.config.parity;
        self.parity.report(serde_json::json!({
            "enabled": p.enabled,
            "mirror_to": p.mirror_to,
            "timeout_ms": p.timeout.as_millis() as u64,
            "log": p.log.then(|| p.dir.join("drift-YYYYMMDD.jsonl").display().to_string()),
            "mode": l.config.routing.mode,
        }))
    }

    /// The live configuration (reloads go through it).
    pub fn live(&self) -> &Arc<LiveConfig> {
        &self.live
    }

    /// Moves connected devices whose routing decision changed with a new config generation:
    /// closes their connections in batches so they reconnect through the new decision.
    async fn drainer(self: Arc<Self>) {
        let mut rx = self.live.subscribe();
        let mut queue: VecDeque<(crate::codec::DeviceId, Uuid)> = VecDeque::new();
        // Devices per step and time between steps of the drain under way.
        let mut pace = (1, Duration::from_secs(1));
        loop {
            let loaded = self.live.current();
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                changed = rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let loaded = self.live.current();
                    queue.clear();
                    for (id, s) in self.registry.snapshot() {
                        let now = loaded.policy.decide(PeerKind::Device(id));
                        if s.moves_under(&now) {
                            queue.push_back((id, s.conn));
                        }
                        // A device that stays on the cloud gains or loses its mirror in place
                        // (shadow mode, or the share changing in it).
                        s.control.refresh_mirror(
                            s.path == Path::Legacy && now.path == Path::Legacy && now.mirror,
                        );
                    }
                    let d = &loaded.config.drain;
                    if queue.is_empty() {
                        continue;
                    }
                    if loaded.runtime.rollback.is_some() {
                        // A rollback always drains, at its own rate: steps of a tenth of a
                        // second's worth (one device at least), spaced to make the rate.
                        let rate = loaded.config.slo.rollback_drain_rate.max(1);
                        let batch = rate.div_ceil(10);
                        pace = (batch as usize, Duration::from_secs(1) * batch / rate);
                        tracing::warn!(
                            generation = loaded.generation,
                            devices = queue.len(),
                            per_second = rate,
                            "rollback: draining the devices on the new path back to legacy"
                        );
                    } else if d.enabled {
                        pace = (d.batch, d.interval);
                        tracing::info!(
                            generation = loaded.generation,
                            devices = queue.len(),
                            batch = d.batch,
                            interval = ?d.interval,
                            "routing change moves connected devices; draining them"
                        );
                    } else {
                        tracing::info!(
                            generation = loaded.generation,
                            devices = queue.len(),
                            "routing change moves connected devices; drain is off, they move when they reconnect"
                        );
                        queue.clear();
                    }
                }
                _ = tokio::time::sleep(pace.1), if !queue.is_empty() => {
                    for _ in 0..pace.0 {
                        let Some((id, conn)) = queue.pop_front() else { break };
                        // Still the same connection, and still on the wrong path?
                        let Some(s) = self.registry.get(id) else { continue };
                        if s.conn != conn {
                            continue;
                        }
                        if s.moves_under(&loaded.policy.decide(PeerKind::Device(id))) {
                            s.control.close(Cause::Drained);
                        }
                    }
                }
            }
        }
    }

    /// Upstream health.
    pub fn health(&self) -> &health::Health {
        &self.health
    }

    /// Whether the legacy path is healthy: in fixed mode, an address answered or was reached
    /// recently with no failure since; in transparent mode, the most recent checks did not all
    /// fail (no address is known before devices connect).
    pub fn upstream_ready(&self) -> bool {
        let cfg = self.live.current();
        match cfg.config.upstream.mode {
            crate::config::UpstreamMode::Fixed => self.health.any_up(Path::Legacy),
            crate::config::UpstreamMode::Transparent => {
                self.health.known(Path::Legacy).is_empty() || self.health.any_up(Path::Legacy)
            }
        }
    }

    /// Probes (TCP + TLS, no Cync bytes) each fixed upstream address that no connection has
    /// checked for `upstream.probe_interval`, until shutdown. At start every address is probed,
    /// so `/readyz` knows within a connect timeout.
    pub async fn probe_upstreams(self: Arc<Self>) {
        loop {
            let loaded = self.live.current();
            let cfg = &loaded.config;
            let every = cfg.upstream.probe_interval;
            self.health.set_window(every.saturating_mul(3));
            let mut jobs = Vec::new();
            // The addresses to watch: the configured ones (removed ones are forgotten), or
            // in transparent mode the original destinations connections used in the last
            // hour, so readiness does not age out while devices sit on a working cloud.
            let legacy = match cfg.upstream.mode {
                crate::config::UpstreamMode::Fixed => {
                    self.health.retain(Path::Legacy, &cfg.upstream.addresses);
                    self.health.track(Path::Legacy, &cfg.upstream.addresses);
                    cfg.upstream.addresses.clone()
                }
                crate::config::UpstreamMode::Transparent => {
                    self.health
                        .forget_unused(Path::Legacy, TRANSPARENT_FORGET_AFTER);
                    self.health.known(Path::Legacy)
                }
            };
            for a in self.health.stale(Path::Legacy, &legacy, every) {
                let tls = cfg.upstream.tls.then(|| loaded.upstream.clone());
                jobs.push((Path::Legacy, a, tls));
            }
            self.health.retain(Path::New, &cfg.new_path.addresses);
            self.health.track(Path::New, &cfg.new_path.addresses);
            for a in self.health.stale(Path::New, &cfg.new_path.addresses, every) {
                let tls = cfg.new_path.tls.enabled().then(|| loaded.new_path.clone());
                jobs.push((Path::New, a, tls));
            }
            let timeout = cfg.timeouts.upstream_connect;
            let mut probes = tokio::task::JoinSet::new();
            for (path, addr, tls) in jobs {
                let me = self.clone();
                probes.spawn(async move {
                    let check = match upstream::probe(&addr, tls.as_ref(), timeout).await {
                        Ok(()) => health::Check::Reachable,
                        // The proxy's own shortage says nothing about the upstream.
                        Err(e) if e.is_local() => return,
                        Err(e) => {
                            tracing::warn!(path = path.label(), upstream = %addr, error = %e, "upstream probe failed");
                            health::Check::Failed(e.detail())
                        }
                    };
                    me.health.record_probe(path, &addr, check);
                });
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = probes.join_all() => {}
            }
            self.health.refresh();
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep((every / 3).max(Duration::from_secs(1))) => {}
            }
        }
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Live device sessions.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Sessions (of any kind) still running.
    pub fn sessions(&self) -> usize {
        self.tracker.len()
    }

    /// Accepts on `listener` until [`Proxy::shutdown`]. Accept errors back off and continue.
    pub async fn serve(self: &Arc<Self>, listener: TcpListener, kind: ListenerKind) {
        let mut backoff = Duration::from_millis(5);
        loop {
            let accepted = tokio::select! {
                _ = self.stop_accepting.cancelled() => return,
                r = listener.accept() => r,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    backoff = Duration::from_millis(5);
                    self.metrics
                        .accepted
                        .with_label_values(&[kind.label()])
                        .inc();
                    match self.limit.clone().try_acquire_owned() {
                        Ok(permit) => {
                            let me = self.clone();
                            self.tracker
                                .spawn(async move { me.session(tcp, peer, kind, permit).await });
                        }
                        Err(_) => {
                            self.metrics.rejected.with_label_values(&["limit"]).inc();
                            tracing::warn!(%peer, "connection limit reached; closing new connection");
                            drop(tcp);
                        }
                    }
                }
                Err(e) => {
                    self.metrics.accept_errors.inc();
                    tracing::warn!(error = %e, ?backoff, "accept failed; backing off");
                    tokio::select! {
                        _ = self.stop_accepting.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// Stops accepting, closes every session, and waits up to `drain` for them to finish.
    /// Returns whether all finished in time.
    pub async fn shutdown(&self, drain: Duration) -> bool {
        self.stop_accepting.cancel();
        self.shutdown.cancel();
        self.tracker.close();
        self.background.close();
        tokio::time::timeout(drain, async {
            self.tracker.wait().await;
            self.background.wait().await;
        })
        .await
        .is_ok()
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    async fn session(
        self: Arc<Self>,
        tcp: TcpStream,
        peer: SocketAddr,
        kind: ListenerKind,
        _permit: OwnedSemaphorePermit,
    ) {
        let conn = Uuid::now_v7();
        let span = tracing::info_span!("conn", id = %conn, %peer, device = tracing::field::Empty);
        session::Session {
            proxy: &self,
            arc: self.clone(),
            conn,
            peer,
            kind,
        }
        .run(tcp)
        .instrument(span)
        .await;
    }

    /// Attaches a mirror to a session's taps (when the configuration in force has somewhere
    /// to mirror to): a bounded queue the device's frames are copied to, and the session's
    /// parity. `hello`, the device's handshake, goes first when the session is already
    /// running (a mirror attached at the start gets it through the tap).
    fn attach_mirror(
        &self,
        slot: &tap::MirrorSlot,
        device: Option<crate::codec::DeviceId>,
        hello: Option<bytes::Bytes>,
    ) -> Option<MirrorStart> {
        let loaded = self.live.current();
        let cfg = &loaded.config;
        if cfg.parity.mirror_to != crate::config::MirrorTo::Legacy
            && cfg.new_path.addresses.is_empty()
        {
            return None;
        }
        let (tx, rx) = tokio::sync::mpsc::channel(cfg.new_path.send_queue_max.max(1));
        if let Some(h) = hello {
            let _ = tx.try_send(h);
        }
        let parity = cfg.parity.enabled.then(|| {
            crate::parity::hub::SessionParity::new(
                self.parity.clone(),
                cfg.parity.tracker(),
                device,
                cfg.parity.log_target(),
            )
        });
        slot.store(Some(Arc::new(tap::MirrorLink {
            tx,
            parity: parity.clone(),
        })));
        Some((rx, parity))
    }

    /// The dark-launch mirror of one shadowed session: a ReliableTransport in shadow role fed
    /// with the device's frames (`rx`, filled by the device tap without waiting). Nothing the
    /// backend sends reaches the device; a dead or slow backend costs only the bounded queue.
    async fn run_mirror(
        &self,
        rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
        control: &Arc<SessionControl>,
        parity: Option<Arc<std::sync::Mutex<crate::parity::hub::SessionParity>>>,
        legacy_target: String,
    ) {
        let loaded = self.live.current();
        let cfg = &loaded.config;
        // An A/A run mirrors to a second connection to the session's own legacy upstream.
        let a_a = cfg.parity.mirror_to == crate::config::MirrorTo::Legacy;
        let connect = || {
            let legacy_target = legacy_target.clone();
            async move {
                let l = self.live.current();
                if a_a {
                    // Not counted in the cloud's health or connect metrics: a second
                    // connection that fails says nothing the session's own does not.
                    let tls = l.config.upstream.tls.then_some(&l.upstream);
                    let limit = l.config.timeouts.upstream_connect;
                    return match tokio::time::timeout(limit, upstream::attempt(&legacy_target, tls))
                        .await
                    {
                        Ok(Ok(u)) => Ok(u.io),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err(format!("{legacy_target}: no connection within {limit:?}")),
                    };
                }
                let t = upstream::Target::new_path(&l.config, &l.new_path);
                upstream::connect(&t, &self.metrics, &self.health, Path::New)
                    .await
                    .map(|u| u.io)
                    .map_err(|e| e.to_string())
            }
        };
        // First connection, with backoff, for as long as the session lives.
        let mut wait = Duration::from_millis(100);
        let backend = loop {
            tokio::select! {
                _ = control.token().cancelled() => return,
                r = connect() => match r {
                    Ok(io) => break io,
                    Err(e) => tracing::debug!(error = %e, "mirror: new path unreachable"),
                },
            }
            tokio::select! {
                _ = control.token().cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(Duration::from_secs(30));
        };
        self.metrics.transport.mirrors.inc();
        let _gauge = GaugeGuard(self.metrics.transport.mirrors.clone());
        let mut core = crate::transport::Core::new(
            cfg.new_path.transport(),
            crate::transport::Role::Shadow,
            Uuid::now_v7().as_u128() as u64,
        );
        // Connected, nothing to replay yet: the hello comes through the copy.
        let _ = core.on_backend_connected(std::time::Instant::now());
        let shadow_control = SessionControl::new(control.token());
        let driver = crate::transport::driver::run(crate::transport::driver::Session {
            // The copied frames, taken only while the backend can take them.
            device: crate::transport::driver::DeviceLeg::Copy(rx),
            backend,
            device_tail: Vec::new(),
            backend_tail: Vec::new(),
            core,
            reconnect: Box::new(move || -> crate::transport::driver::Reconnect<'_> {
                Box::pin(connect())
            }),
            grace: None,
            reconnect_max: crate::transport::driver::MIRROR_RECONNECT_MAX,
            // The relayed session has its own idle timeout; the copy waits while paused.
            idle: MAX_DURATION_IDLE,
            max_frame: cfg.limits.max_frame,
            queue: cfg.new_path.send_queue_max.max(cfg.new_path.recv_queue_max),
            control: &shadow_control,
            d2c: None,
            c2d: None,
            shadow: true,
            events: Box::new(|e| trace_events(&[crate::transport::Output::Event(e.clone())])),
            metrics: self.metrics.transport.clone(),
            transport: "new",
            backend_state: Box::new(|up| {
                tracing::debug!(up, "mirror: new path connection");
            }),
            on_backend: parity.clone().map(|p| {
                Box::new(move |b: &bytes::Bytes, f: Option<&crate::codec::Frame>| {
                    if let Some(f) = f {
                        p.lock().unwrap_or_else(|p| p.into_inner()).answer(
                            crate::parity::Side::New,
                            f,
                            b.clone(),
                        );
                    }
                }) as crate::transport::driver::BackendHook<'_>
            }),
        });
        let end = driver.await;
        tracing::debug!(end = end.label(), "mirror ended");
    }

    /// Runs a session on the new path through a ReliableTransport: the backend connection
    /// may be lost and re-established (the device stays connected for
    /// `new_path.reconnect_grace` under `new_primary`, for ever under `new_only`); commands
    /// are retried, repeats dropped, queues bounded.
    async fn run_new_path(&self, s: NewPathSession<'_>) -> crate::transport::driver::End {
        let cfg = &s.loaded.config;
        let max = cfg.limits.max_frame;
        let mut core = crate::transport::Core::new(
            cfg.new_path.transport(),
            crate::transport::Role::Primary,
            // Jitter differs per session, so retries of many devices do not line up.
            Uuid::now_v7().as_u128() as u64,
        );
        let now = std::time::Instant::now();
        let sent = frames_of(&s.initial[..s.whole], max);
        let mut sent = sent.into_iter();
        if let Some(hello) = sent.next() {
            core.resume(hello);
        }
        let record = |outs: Vec<crate::transport::Output>| {
            for o in &outs {
                if let crate::transport::Output::Event(e) = o {
                    self.metrics.transport.record("new", e);
                }
            }
            trace_events(&outs);
        };
        for f in sent {
            record(core.note_sent(now, f));
        }
        // What the backend answered first: its answer to the hello (not tracked), and
        // anything else it sent along (tracked as delivered: a command in it is retried).
        let mut hello_answer = true;
        for f in frames_of(s.answer, max) {
            let t = crate::codec::PacketType(f.first().copied().unwrap_or(0));
            if hello_answer
                && matches!(
                    t,
                    crate::codec::PacketType::HANDSHAKE_ACK
                        | crate::codec::PacketType::LOGIN_RESULT
                )
            {
                hello_answer = false;
                continue;
            }
            record(core.note_delivered(now, f));
        }
        let device_tail = s.initial[s.whole..].to_vec();
        let target = s.target.clone();
        let reconnect = move || -> crate::transport::driver::Reconnect<'_> {
            Box::pin(async move {
                // The configuration in force now: a reload of the addresses or pins applies
                // to the next reconnect.
                let loaded = self.live.current();
                let t = upstream::Target::new_path(&loaded.config, &loaded.new_path);
                upstream::connect(&t, &self.metrics, &self.health, Path::New)
                    .await
                    .map(|u| u.io)
                    .map_err(|e| e.to_string())
            })
        };
        let health = &self.health;
        let end = crate::transport::driver::run(crate::transport::driver::Session {
            device: crate::transport::driver::DeviceLeg::Stream(s.device),
            backend: s.backend,
            device_tail,
            backend_tail: s.answer_tail,
            core,
            reconnect: Box::new(reconnect),
            grace: s.decision.fallback.then_some(cfg.new_path.reconnect_grace),
            reconnect_max: crate::transport::driver::RECONNECT_MAX,
            idle: cfg.timeouts.idle,
            max_frame: max,
            queue: cfg.new_path.send_queue_max.max(cfg.new_path.recv_queue_max),
            control: s.control,
            d2c: Some(s.d2c),
            c2d: Some(s.c2d),
            shadow: false,
            events: Box::new(|e| trace_events(&[crate::transport::Output::Event(e.clone())])),
            metrics: self.metrics.transport.clone(),
            transport: "new",
            backend_state: Box::new(move |up| {
                if up {
                    tracing::info!(upstream = %target, "new path back; replayed the handshake and what was unanswered");
                } else {
                    tracing::warn!(upstream = %target, "new path connection lost; holding the device and reconnecting");
                    health.record(Path::New, &target, health::Check::Failed("connection lost".into()));
                }
            }),
            on_backend: None,
        })
        .await;
        if end == crate::transport::driver::End::BackendLost {
            tracing::warn!(grace = ?cfg.new_path.reconnect_grace, "the new path stayed away longer than the reconnect grace; closing the device so it reconnects");
        }
        end
    }

    /// Connects `path`, writes what the device sent while it was identified, and (when
    /// `wait_answer`) reads the upstream's first answer, which must be Cync. Nothing is tapped
    /// yet: a failed attempt leaves no trace in captures, so a fallback starts clean.
    async fn establish(
        &self,
        loaded: &Loaded,
        path: Path,
        orig_dst: Option<SocketAddr>,
        initial: &[u8],
        wait_answer: bool,
        control: &SessionControl,
    ) -> Establish {
        let cfg = &loaded.config;
        let connect = async {
            match path {
                Path::New => {
                    let target = upstream::Target::new_path(cfg, &loaded.new_path);
                    upstream::connect(&target, &self.metrics, &self.health, Path::New).await
                }
                Path::Legacy => {
                    let target = upstream::Target::legacy(cfg, &loaded.upstream, orig_dst)
                        .inspect_err(|e| self.metrics.upstream_connect(Path::Legacy, e.label()))?;
                    upstream::connect(&target, &self.metrics, &self.health, Path::Legacy).await
                }
            }
        };
        let mut up = tokio::select! {
            _ = control.token().cancelled() => return Establish::Cancelled,
            r = connect => match r {
                Ok(u) => u,
                Err(e) => return Establish::Unreachable(e),
            },
        };
        if let Err(e) = async {
            up.io.write_all(initial).await?;
            up.io.flush().await
        }
        .await
        {
            return Establish::Failed {
                target: up.target,
                check: health::Check::Failed(format!("write: {e}")),
                why: format!("the upstream failed as the handshake was written: {e}"),
                closed_early: false,
            };
        }
        let mut answer = Vec::new();
        if !wait_answer {
            return Establish::Ok {
                up,
                answer,
                ptype: None,
            };
        }
        let r = tokio::select! {
            _ = control.token().cancelled() => return Establish::Cancelled,
            r = tokio::time::timeout(
                cfg.timeouts.upstream_answer,
                read_first_answer(&mut up.io, &mut answer, cfg.limits.max_frame),
            ) => r,
        };
        let why = match r {
            Ok(Ok(FirstAnswer::Cync(ptype))) => {
                self.health
                    .record(path, &up.target, health::Check::Answered);
                return Establish::Ok {
                    up,
                    answer,
                    ptype: Some(ptype),
                };
            }
            Ok(Ok(FirstAnswer::NotCync(what))) => {
                format!("the upstream does not speak Cync: it answered {what}")
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                let why = "the upstream closed the connection before answering the handshake \
                           (a wrong auth code, or not a working Cync upstream)";
                return Establish::Failed {
                    target: up.target,
                    check: health::Check::Refused(why.to_owned()),
                    why: why.to_owned(),
                    closed_early: true,
                };
            }
            Ok(Err(e)) => format!("the upstream failed before answering: {e}"),
            Err(_) => format!(
                "the upstream did not answer within {:?}",
                cfg.timeouts.upstream_answer
            ),
        };
        Establish::Failed {
            target: up.target,
            check: health::Check::Refused(why.clone()),
            why,
            closed_early: false,
        }
    }
}

fn handshake_label(reason: &str) -> String {
    // Keep the label set small: the OpenSSL reason strings are a bounded set; io kinds too.
    let r = reason.to_ascii_lowercase().replace(' ', "_");
    r.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
        .take(48)
        .collect()
}

/// Reads until the first whole frame (or a framing error) and returns it decoded. Every byte
/// read is appended to `initial` so it can be forwarded unchanged.
async fn read_first_frame(
    device: &mut Box<dyn Io>,
    initial: &mut Vec<u8>,
    max_frame: usize,
) -> std::io::Result<Option<Frame>> {
    let mut framer = Framer::new(max_frame);
    let mut buf = [0u8; 4096];
    loop {
        let n = device.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        initial.extend_from_slice(&buf[..n]);
        framer.push(&buf[..n]);
        match framer.next_event() {
            Some(FramerEvent::Frame(raw)) => return Ok(raw.decode().ok()),
            Some(FramerEvent::Error(_)) => return Ok(None),
            None => {}
        }
    }
}

/// What the upstream said first.
enum FirstAnswer {
    /// A whole Cync frame of a known type.
    Cync(crate::codec::PacketType),
    /// Bytes that are not Cync, described for the log.
    NotCync(String),
}

/// Shows the first bytes of a foreign answer: as text when they read as text (an HTTP or
/// SMTP server), else as hex.
fn describe_foreign(bytes: &[u8]) -> String {
    let head = &bytes[..bytes.len().min(48)];
    let printable = head
        .iter()
        .filter(|b| b.is_ascii_graphic() || matches!(b, b' ' | b'\r' | b'\n' | b'\t'))
        .count();
    if !head.is_empty() && printable * 10 >= head.len() * 9 {
        format!("{:?}", String::from_utf8_lossy(head))
    } else {
        format!("bytes {}", crate::hexutil::to_hex(head))
    }
}

/// The lengths of the whole frames at the start of `bytes`, in order (what follows is a
/// partial frame, or bytes that do not frame).
fn leading_frames(bytes: &[u8], max_frame: usize) -> Vec<usize> {
    let mut lens = Vec::new();
    let mut at = 0;
    while let Some(h) = bytes.get(at..).and_then(crate::codec::Header::parse) {
        let len = h.frame_len();
        if len > max_frame || len > bytes.len() - at {
            break;
        }
        lens.push(len);
        at += len;
    }
    lens
}

/// The length of the whole frames at the start of `bytes`.
fn whole_frames_len(bytes: &[u8], max_frame: usize) -> usize {
    leading_frames(bytes, max_frame).iter().sum()
}

/// The whole frames at the start of `bytes`.
fn frames_of(bytes: &[u8], max_frame: usize) -> Vec<bytes::Bytes> {
    let mut at = 0;
    leading_frames(bytes, max_frame)
        .into_iter()
        .map(|len| {
            let f = bytes::Bytes::copy_from_slice(&bytes[at..at + len]);
            at += len;
            f
        })
        .collect()
}

/// What a session on the new path starts from.
struct NewPathSession<'a> {
    loaded: &'a Loaded,
    decision: Decision,
    device: Box<dyn Io>,
    backend: Box<dyn Io>,
    /// Everything read from the device while identifying; `whole` bytes of it went out.
    initial: &'a [u8],
    whole: usize,
    /// The backend's whole frames already delivered to the device, and a partial one.
    answer: &'a [u8],
    answer_tail: Vec<u8>,
    target: String,
    control: &'a Arc<SessionControl>,
    d2c: &'a mut DirectionTap,
    c2d: &'a mut DirectionTap,
}

/// Transparent mode forgets an original destination no connection has used for this long.
const TRANSPARENT_FORGET_AFTER: Duration = Duration::from_secs(3600);

/// Logs the core's events at trace level, with the `msg_id` that follows a frame.
fn trace_events(outs: &[crate::transport::Output]) {
    for o in outs {
        if let crate::transport::Output::Event(e) = o {
            tracing::trace!(event = ?e, "new path");
        }
    }
}

/// How an attempt to reach an upstream ended.
enum Establish {
    /// Connected; the handshake is written and (when waited for) a Cync answer read.
    Ok {
        up: upstream::Upstream,
        answer: Vec<u8>,
        ptype: Option<crate::codec::PacketType>,
    },
    /// The session was cancelled (drain, replacement, shutdown).
    Cancelled,
    /// No address could be connected.
    Unreachable(upstream::UpstreamError),
    /// Connected, but it failed before a Cync answer.
    Failed {
        target: String,
        check: health::Check,
        why: String,
        closed_early: bool,
    },
}

/// Reads the upstream until its first whole frame. Every byte read is appended to `answer` so
/// it can be forwarded unchanged.
async fn read_first_answer(
    up: &mut Box<dyn Io>,
    answer: &mut Vec<u8>,
    max_frame: usize,
) -> std::io::Result<FirstAnswer> {
    let mut framer = Framer::new(max_frame);
    let mut buf = [0u8; 4096];
    loop {
        let n = up.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        answer.extend_from_slice(&buf[..n]);
        framer.push(&buf[..n]);
        match framer.next_event() {
            // A whole frame counts as Cync even when its type is new to us: only bytes that do
            // not frame at all (a length beyond the limit, resynchronisation) are foreign.
            Some(FramerEvent::Frame(raw)) => return Ok(FirstAnswer::Cync(raw.ptype())),
            Some(FramerEvent::Error(_)) => {
                return Ok(FirstAnswer::NotCync(describe_foreign(answer)));
            }
            None if answer.len() > max_frame => {
                return Ok(FirstAnswer::NotCync(describe_foreign(answer)));
            }
            None => {}
        }
    }
}

/// Keeps a device connection open (reading and discarding) for `delay`, then lets it close.
async fn hold_then_close(device: &mut Box<dyn Io>, delay: Duration, control: &SessionControl) {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::sleep(delay);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => break,
            _ = control.token().cancelled() => break,
            r = device.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
        }
    }
    let _ = device.shutdown().await;
}
