//! `cync-mitm run`: binds the listeners, starts the proxy and the admin server, and shuts down
//! gracefully on SIGTERM or Ctrl-C (stop accepting, not ready, close sessions, drain, exit).

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::{ListenerKind, Proxy, ProxyError};
use crate::reload::LiveConfig;
use crate::tls::{self, TlsError};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Certificates could not be read or minted.
    #[error("certificates: {0}")]
    Certs(#[from] TlsError),
    /// Proxy setup failed.
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Error.
        source: std::io::Error,
    },
    /// The configuration (with environment overrides) is invalid.
    #[error("invalid configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    /// The capture writer could not start.
    #[error("capture: {0}")]
    Capture(std::io::Error),
    /// Signal handling could not be set up.
    #[error("signals: {0}")]
    Signals(std::io::Error),
}

/// Binds a listener with `backlog` pending connections. `TcpListener::bind` uses the standard
/// library's 128, which stalled a 2,000-connection burst by a SYN retry (1 s).
pub fn bind_with_backlog(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    TcpListener::from_std(s.into())
}

async fn bind(addr: SocketAddr, backlog: u32) -> Result<TcpListener, AppError> {
    bind_with_backlog(addr, backlog).map_err(|source| AppError::Bind { addr, source })
}

/// The signals `run` handles, installed before anything is announced: a signal that arrives
/// early must not take the default action (which ends the process).
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Self, AppError> {
        use tokio::signal::unix::{SignalKind, signal};
        let s = |k| signal(k).map_err(AppError::Signals);
        Ok(Self {
            term: s(SignalKind::terminate())?,
            int: s(SignalKind::interrupt())?,
            hup: s(SignalKind::hangup())?,
        })
    }

    /// Reloads `live` on each SIGHUP until SIGTERM or SIGINT, which it names.
    async fn serve(mut self, live: Arc<LiveConfig>) -> &'static str {
        loop {
            tokio::select! {
                _ = self.term.recv() => return "SIGTERM",
                _ = self.int.recv() => return "SIGINT",
                _ = self.hup.recv() => {
                    let l = live.clone();
                    let _ = tokio::task::spawn_blocking(move || l.reload(crate::reload::Trigger::Signal)).await;
                }
            }
        }
    }
}

/// Descriptors the configuration may need at once: two per device connection, the admin
/// connections, the capture files, and some for listeners, probes and the watcher.
pub fn descriptors_needed(cfg: &Config) -> u64 {
    let c = cfg.limits.max_connections as u64;
    // The device, its upstream, and (shadow) its mirror.
    c * 3 + cfg.admin.max_connections as u64 + cfg.capture.max_open_files as u64 + 64
}

/// Raises the soft descriptor limit towards what the configuration needs (at most to the hard
/// limit), and warns when it stays short: out of descriptors, device accepts and upstream
/// connects fail.
fn check_descriptor_limit(cfg: &Config) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let need = descriptors_needed(cfg);
    let lim = getrlimit(Resource::Nofile);
    let soft = lim.current.unwrap_or(u64::MAX);
    if soft >= need {
        return;
    }
    let hard = lim.maximum.unwrap_or(u64::MAX);
    let target = need.min(hard);
    if target > soft {
        match setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(target),
                maximum: lim.maximum,
            },
        ) {
            Ok(()) => tracing::info!(from = soft, to = target, "raised the descriptor limit"),
            Err(e) => tracing::debug!(error = %e, "could not raise the descriptor limit"),
        }
    }
    let now = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    if now < need {
        tracing::warn!(
            limit = now,
            needed = need,
            "the descriptor limit is below what limits.max_connections ({} devices, two descriptors each), admin.max_connections and capture.max_open_files may need: raise it (ulimit -n, systemd LimitNOFILE) or lower limits.max_connections",
            cfg.limits.max_connections
        );
    }
}

/// A started proxy: listeners bound, admin server up, ready.
pub struct Running {
    /// The proxy.
    pub proxy: Arc<Proxy>,
    /// The configuration in force.
    pub live: Arc<LiveConfig>,
    /// Its metrics.
    pub metrics: Arc<Metrics>,
    /// Where devices connect (TLS).
    pub tls_addr: SocketAddr,
    /// The admin server's address, when it is on.
    pub admin_addr: Option<SocketAddr>,
    admin_state: Arc<AdminState>,
    admin_stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    capture: Arc<crate::capture::Capture>,
    _watcher: Option<crate::reload::FileWatch>,
    drain: std::time::Duration,
}

/// Runs the proxy until a termination signal, then drains. `source` is the file reloads read.
pub async fn run(cfg: Config, source: Option<std::path::PathBuf>) -> Result<(), AppError> {
    let signals = Signals::install()?;
    let running = start(cfg, source).await?;
    let sig = signals.serve(running.live.clone()).await;
    running.stop(sig).await;
    Ok(())
}

/// Starts the proxy: certificates, capture, file watch, listeners, admin server; returns once
/// it is ready. `source` is the file reloads read.
pub async fn start(cfg: Config, source: Option<std::path::PathBuf>) -> Result<Running, AppError> {
    start_with_env(cfg, source, |k| std::env::var(k).ok()).await
}

/// [`start`] with the environment overrides (`CANARY_PERCENTAGE`, `DARK_LAUNCH`, …) read
/// through `env` (the demo passes none: a shell's settings must not change its plan).
pub async fn start_with_env(
    cfg: Config,
    source: Option<std::path::PathBuf>,
    env: impl Fn(&str) -> Option<String> + Send + Sync + 'static,
) -> Result<Running, AppError> {
    check_descriptor_limit(&cfg);
    let (certs, created) = tls::ensure_certs(&cfg.tls.cert_dir)?;
    if created {
        tracing::warn!(dir = %cfg.tls.cert_dir.display(), "minted a new CA and device certificates");
    }
    if let Some(k) = &cfg.capture.keylog_file {
        tls::enable_keylog(k)?;
        tracing::warn!(file = %k.display(), "writing TLS secrets of both legs to a key-log file: anyone with it and a raw capture can read the traffic");
    }
    let metrics = Arc::new(Metrics::with_device_limit(
        cfg.metrics.per_device_labels,
        cfg.metrics.max_device_series,
    ));
    let drain = cfg.timeouts.drain;
    let tls_addr = cfg.listen.tls;
    let plain_addr = cfg.listen.plain;
    let backlog = cfg.listen.backlog;
    let admin_cfg = cfg.admin.clone();
    let reload_cfg = cfg.reload.clone();
    let live = LiveConfig::new(cfg, source, metrics.clone(), env)?;
    for o in &live.current().env_overrides {
        tracing::info!("environment override: {o}");
    }
    let capture =
        crate::capture::Capture::start(live.clone(), metrics.clone()).map_err(AppError::Capture)?;
    if live.current().config.capture.enabled {
        tracing::info!(dir = %live.current().config.capture.dir.display(), "capturing decrypted traffic");
    }
    let sinks: Vec<Arc<dyn crate::proxy::tap::TapSink>> = vec![capture.clone()];
    let proxy = Proxy::new(live.clone(), &certs, metrics.clone(), sinks)?;
    let _watcher = match (reload_cfg.watch, live.source()) {
        (true, Some(path)) => match crate::reload::watch_file(live.clone(), reload_cfg.debounce) {
            Ok(w) => {
                tracing::info!(file = %path.display(), "watching the configuration file for changes");
                Some(w)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the configuration file; SIGHUP and POST /reload still work");
                None
            }
        },
        _ => None,
    };
    if live.stale_at_start() {
        // The file changed while the proxy was starting: apply what it says now.
        let l = live.clone();
        match tokio::task::spawn_blocking(move || l.reload(crate::reload::Trigger::Watch)).await {
            Ok(Ok(outcome)) => tracing::info!(
                ?outcome,
                "the configuration file changed during start; re-read"
            ),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "the configuration file changed during start and is now invalid; keeping the one read at start")
            }
            Err(e) => tracing::error!(error = %e, "re-reading the configuration failed"),
        }
    }

    let tls_listener = bind(tls_addr, backlog).await?;
    let plain_listener = match plain_addr {
        Some(a) => Some(bind(a, backlog).await?),
        None => None,
    };
    let admin_listener = if admin_cfg.enabled {
        Some(bind(admin_cfg.listen, 128).await?)
    } else {
        None
    };
    let bound = |l: &TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(
        tls = %bound(&tls_listener),
        plain = %plain_listener.as_ref().map(bound).unwrap_or_else(|| "off".into()),
        admin = %admin_listener.as_ref().map(bound).unwrap_or_else(|| "off".into()),
        "listening"
    );
    let tls_addr = tls_listener.local_addr().map_err(|source| AppError::Bind {
        addr: tls_addr,
        source,
    })?;
    let admin_addr = admin_listener.as_ref().and_then(|l| l.local_addr().ok());

    let admin_state = AdminState::new(metrics.clone(), Some(proxy.clone()));
    let admin_stop = CancellationToken::new();
    let mut tasks = Vec::new();
    if let Some(l) = admin_listener {
        tasks.push(tokio::spawn(admin::run(
            l,
            admin_state.clone(),
            admin_stop.clone(),
            (&admin_cfg).into(),
        )));
    }
    {
        let p = proxy.clone();
        tasks.push(tokio::spawn(async move {
            p.serve(tls_listener, ListenerKind::Tls).await
        }));
    }
    if let Some(l) = plain_listener {
        let p = proxy.clone();
        tasks.push(tokio::spawn(async move {
            p.serve(l, ListenerKind::Plain).await
        }));
    }
    tokio::spawn(proxy.clone().probe_upstreams());
    admin_state.ready.store(true, Ordering::Relaxed);
    Ok(Running {
        proxy,
        live,
        metrics,
        tls_addr,
        admin_addr,
        admin_state,
        admin_stop,
        tasks,
        capture,
        _watcher,
        drain,
    })
}

impl Running {
    /// Stops gracefully: not ready, stop accepting, close sessions, drain (`timeouts.drain`),
    /// flush the capture, stop the admin server. `why` is logged.
    pub async fn stop(self, why: &str) {
        let proxy = &self.proxy;
        self.admin_state.ready.store(false, Ordering::Relaxed);
        let open = proxy.sessions();
        tracing::info!(
            signal = why,
            sessions = open,
            drain = ?self.drain,
            "shutting down: closing sessions"
        );
        let clean = proxy.shutdown(self.drain).await;
        if clean {
            tracing::info!("all sessions closed");
        } else {
            tracing::warn!(
                left = proxy.sessions(),
                "drain timeout: exiting with sessions still open"
            );
        }
        self.capture.shutdown();
        self.admin_stop.cancel();
        for t in self.tasks {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), t).await;
        }
    }
}
