//! The live configuration: parse → validate → build → swap into an [`ArcSwap`] with a generation
//! number, from a file watch (the file's folder, so editors that replace by rename and Kubernetes
//! ConfigMap `..data` symlink swaps are seen), SIGHUP, or `POST /reload`. A bad file keeps the
//! running configuration and says why (file:line:column, field).
//!
//! Routing, upstream, new-path, drain and timeout options apply to the next connections at once;
//! listen addresses, TLS, the admin server, logging, metrics options, the connection limit and
//! the SLO state file need a restart and are reported as such when they change.

use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;
use crate::route::Policy;
use crate::tls::{CertPaths, DeviceAcceptor, UpstreamConnector};
use arc_swap::ArcSwap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::watch;

/// One applied configuration and everything built from it.
#[derive(Clone)]
pub struct Loaded {
    /// The effective configuration (restart-only options at their running values).
    pub config: Config,
    /// 1 at start, +1 per applied change.
    pub generation: u64,
    /// When it was applied.
    pub loaded_at: SystemTime,
    /// The routing policy.
    pub policy: Policy,
    /// Connector for the legacy upstream.
    pub upstream: UpstreamConnector,
    /// Connector for the new path.
    pub new_path: UpstreamConnector,
    /// Options changed in the file that wait for a restart.
    pub pending_restart: Vec<&'static str>,
    /// Environment overrides in force.
    pub env_overrides: Vec<String>,
    /// The device acceptor, when a reload rebuilt it (`[tls]` or the certificate files changed);
    /// `None` means the one the proxy started with.
    pub acceptor: Option<DeviceAcceptor>,
    stamp: CertStamp,
    /// SHA-256 of the file text this generation was read from (`None`: not from a file).
    digest: Option<[u8; 32]>,
    /// The routing of the file and the environment, before the runtime layer.
    pub base_routing: crate::config::RoutingConfig,
    /// The runtime layer in force (rollback override, rollout step) over the file and the
    /// environment.
    pub runtime: Runtime,
}

pub use crate::slo::control::Runtime;

/// What the device acceptor is built from: the `[tls]` section and the certificate files'
/// contents (SHA-256 of each; `None` for a file that cannot be read).
#[derive(Clone, Debug, PartialEq)]
struct CertStamp {
    tls: crate::config::TlsConfig,
    digests: Vec<Option<[u8; 32]>>,
    /// The CA files of the upstream and the new path (a replaced file reloads).
    ca: [Option<[u8; 32]>; 2],
}

impl CertStamp {
    /// Whether the device-facing certificates differ (the acceptor must be rebuilt).
    fn devices_differ(&self, other: &Self) -> bool {
        self.tls != other.tls || self.digests != other.digests
    }
}

fn cert_stamp(cfg: &Config) -> CertStamp {
    let tls = &cfg.tls;
    let p = CertPaths::in_dir(&tls.cert_dir);
    let digests = [&p.rsa_cert, &p.rsa_key, &p.ecdsa_cert, &p.ecdsa_key]
        .iter()
        .map(|f| std::fs::read(f).ok().map(|b| openssl::sha::sha256(&b)))
        .collect();
    CertStamp {
        tls: tls.clone(),
        digests,
        ca: [
            crate::tls::ca_file_digest(&cfg.upstream.client_tls()),
            crate::tls::ca_file_digest(&cfg.new_path.client_tls()),
        ],
    }
}

/// How many times a reload re-reads a file that is still changing before it gives up.
const STABLE_READS: usize = 20;
/// About how long a reload waits for a file that keeps changing.
const MAX_STABLE_WAIT: Duration = Duration::from_secs(10);

/// Reads `path` once it has stopped changing: two reads `settle` apart must agree (a save
/// caught half-way, or a file briefly missing during a rename-save, is read again). An empty
/// file, or one with nothing but comments, is refused: it would mean "all defaults", which is
/// what a truncate-then-write save looks like half-way.
fn read_stable(path: &Path, settle: Duration) -> Result<Vec<u8>, ConfigError> {
    let err = |message: String| ConfigError {
        file: path.to_owned(),
        line: None,
        column: None,
        field: None,
        message,
    };
    // Two reads a whole debounce apart; at most about MAX_STABLE_WAIT in all.
    let reads = (MAX_STABLE_WAIT.as_millis() / settle.as_millis().max(1))
        .clamp(3, STABLE_READS as u128) as usize;
    let mut last: Option<Vec<u8>> = None;
    let mut last_err = None;
    for _ in 0..reads {
        match crate::config::read_config_file(path) {
            Ok(b) => {
                if last.as_deref() == Some(&b[..]) {
                    return crate::config::check_not_empty(&b, path).map(|()| b);
                }
                last = Some(b);
            }
            // Missing for a moment during a rename-save: read again.
            Err(e) if !path.exists() => {
                last = None;
                last_err = Some(e);
            }
            Err(e) => return Err(e),
        }
        std::thread::sleep(settle);
    }
    Err(match last_err {
        Some(e) if last.is_none() => e,
        _ => err(format!(
            "the file kept changing for {:?}; not applied (save it again)",
            settle * reads as u32
        )),
    })
}

/// Whether a file-system event can change what a file holds. Opening, reading and closing a
/// file after reading it (`cat`, or the proxy's own reads of its config and certificates), and
/// metadata-only changes, cannot; writes that finished, creations, renames and removals can.
pub fn is_modification(kind: &notify::EventKind) -> bool {
    use notify::EventKind;
    use notify::event::{AccessKind, AccessMode, ModifyKind};
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        EventKind::Modify(ModifyKind::Metadata(_)) => false,
        EventKind::Modify(_) | EventKind::Create(_) | EventKind::Remove(_) => true,
        // Unknown kinds (and a queue overflow) may hide a change; a reload of unchanged
        // contents is skipped cheaply.
        EventKind::Any | EventKind::Other => true,
    }
}

/// What asked for a reload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// The file watcher.
    Watch,
    /// SIGHUP.
    Signal,
    /// `POST /reload`.
    Admin,
}

impl Trigger {
    fn label(self) -> &'static str {
        match self {
            Self::Watch => "file change",
            Self::Signal => "SIGHUP",
            Self::Admin => "POST /reload",
        }
    }
}

/// The result of a successful reload.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Outcome {
    /// A new generation is in use.
    Applied {
        /// Its number.
        generation: u64,
        /// Changed options that need a restart.
        pending_restart: Vec<&'static str>,
    },
    /// The file says what is already in force.
    Unchanged {
        /// The generation still in use.
        generation: u64,
    },
}

type EnvFn = dyn Fn(&str) -> Option<String> + Send + Sync;

/// The configuration in force and how to replace it.
pub struct LiveConfig {
    current: ArcSwap<Loaded>,
    source: Option<PathBuf>,
    env: Box<EnvFn>,
    reload_lock: Mutex<()>,
    tx: watch::Sender<u64>,
    metrics: Arc<Metrics>,
    runtime: Mutex<Runtime>,
}

fn connector(
    settings: crate::config::ClientTlsSettings,
    previous: Option<&UpstreamConnector>,
    field: &str,
    file: &Path,
) -> Result<UpstreamConnector, ConfigError> {
    if let Some(p) = previous.filter(|p| {
        *p.settings() == settings && p.ca_digest() == crate::tls::ca_file_digest(&settings)
    }) {
        return Ok(p.clone());
    }
    UpstreamConnector::new(&settings).map_err(|e| ConfigError {
        file: file.to_owned(),
        line: None,
        column: None,
        field: Some(field.to_owned()),
        message: e.to_string(),
    })
}

struct Build<'a> {
    config: Config,
    base_routing: crate::config::RoutingConfig,
    runtime: Runtime,
    generation: u64,
    pending_restart: Vec<&'static str>,
    env_overrides: Vec<String>,
    file: &'a Path,
    digest: Option<[u8; 32]>,
}

fn build(b: Build<'_>, previous: Option<&Loaded>) -> Result<Loaded, ConfigError> {
    let Build {
        config,
        base_routing,
        runtime,
        generation,
        pending_restart,
        env_overrides,
        file,
        digest,
    } = b;
    let upstream = connector(
        config.upstream.client_tls(),
        previous.map(|p| &p.upstream),
        "upstream",
        file,
    )?;
    let new_path = connector(
        config.new_path.client_tls(),
        previous.map(|p| &p.new_path),
        "new_path",
        file,
    )?;
    let stamp = cert_stamp(&config);
    let acceptor = match previous {
        Some(p) if p.stamp.devices_differ(&stamp) => Some(
            DeviceAcceptor::new(&config.tls, &CertPaths::in_dir(&config.tls.cert_dir)).map_err(
                |e| ConfigError {
                    file: file.to_owned(),
                    line: None,
                    column: None,
                    field: Some("tls".to_owned()),
                    message: format!("cannot serve the device certificates: {e}"),
                },
            )?,
        ),
        Some(p) => p.acceptor.clone(),
        None => None,
    };
    // Warn about unverified legs once everything that can refuse this configuration has
    // accepted it, and only when the set of warnings changed.
    let warnings = crate::config::insecure_tls_warnings(&config);
    if previous.map(|p| crate::config::insecure_tls_warnings(&p.config)) != Some(warnings.clone()) {
        for w in &warnings {
            tracing::warn!("{w}");
        }
    }
    Ok(Loaded {
        acceptor,
        stamp,
        digest,
        base_routing,
        runtime,
        policy: config.routing.policy(),
        config,
        generation,
        loaded_at: SystemTime::now(),
        upstream,
        new_path,
        pending_restart,
        env_overrides,
    })
}

impl LiveConfig {
    /// Starts from `config` (already read from `source`, if any), applying the environment
    /// overrides read through `env`.
    pub fn new(
        mut config: Config,
        source: Option<PathBuf>,
        metrics: Arc<Metrics>,
        env: impl Fn(&str) -> Option<String> + Send + Sync + 'static,
    ) -> Result<Arc<Self>, ConfigError> {
        let overrides = config.apply_env(&env)?;
        let file = source
            .clone()
            .unwrap_or_else(|| PathBuf::from("<defaults>"));
        // The digest of the text in force lets a reload skip an unchanged file. It must be the
        // digest of the text `config` came from: the file is read again here, and its digest
        // kept only when that text gives the same configuration (the file may have changed
        // since it was loaded; then the first reload applies it, see `stale_at_start`).
        let digest = source.as_deref().and_then(|p| {
            let bytes = std::fs::read(p).ok()?;
            let text = std::str::from_utf8(&bytes).ok()?;
            let mut again = Config::from_toml(text, p).ok()?;
            again.apply_env(&env).ok()?;
            (again == config).then(|| openssl::sha::sha256(&bytes))
        });
        let loaded = build(
            Build {
                base_routing: config.routing.clone(),
                runtime: Runtime::default(),
                config,
                generation: 1,
                pending_restart: Vec::new(),
                env_overrides: overrides,
                file: &file,
                digest,
            },
            None,
        )?;
        metrics.config_generation.set(1);
        metrics
            .canary_percentage
            .set(loaded.config.routing.canary_percent);
        let (tx, _) = watch::channel(1);
        Ok(Arc::new(Self {
            current: ArcSwap::from_pointee(loaded),
            source,
            env: Box::new(env),
            reload_lock: Mutex::new(()),
            tx,
            metrics,
            runtime: Mutex::new(Runtime::default()),
        }))
    }

    /// A config that never changes (tests, `sim`), with no environment overrides.
    pub fn fixed(config: Config, metrics: Arc<Metrics>) -> Result<Arc<Self>, ConfigError> {
        Self::new(config, None, metrics, |_| None)
    }

    /// What is in force now (cheap: one atomic load).
    pub fn current(&self) -> Arc<Loaded> {
        self.current.load_full()
    }

    /// The file reloads read.
    pub fn source(&self) -> Option<&Path> {
        self.source.as_deref()
    }

    /// Resolves each time a new generation is applied.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }

    /// Re-reads the file: parse → validate → build → swap. On error the running config stays.
    pub fn reload(&self, trigger: Trigger) -> Result<Outcome, ConfigError> {
        let _guard = self.reload_lock.lock().unwrap_or_else(|p| p.into_inner());
        let r = self.reload_locked();
        match &r {
            Ok(Outcome::Applied {
                generation,
                pending_restart,
            }) => {
                self.metrics.config_reloads.with_label_values(&["ok"]).inc();
                tracing::info!(
                    generation,
                    trigger = trigger.label(),
                    "configuration reloaded"
                );
                if !pending_restart.is_empty() {
                    tracing::warn!(
                        options = ?pending_restart,
                        "changed options take effect only after a restart; running values kept"
                    );
                }
            }
            Ok(Outcome::Unchanged { generation }) => {
                self.metrics
                    .config_reloads
                    .with_label_values(&["unchanged"])
                    .inc();
                tracing::debug!(
                    generation,
                    trigger = trigger.label(),
                    "configuration unchanged"
                );
            }
            Err(e) => {
                self.metrics
                    .config_reloads
                    .with_label_values(&["error"])
                    .inc();
                tracing::error!(
                    generation = self.current().generation,
                    trigger = trigger.label(),
                    "configuration rejected, keeping the running one: {e}"
                );
            }
        }
        r
    }

    /// Whether the file changed between the read that started the proxy and this live
    /// configuration (its text is not known to be in force): reload once the watcher runs.
    pub fn stale_at_start(&self) -> bool {
        self.source.is_some() && self.current().digest.is_none()
    }

    fn reload_locked(&self) -> Result<Outcome, ConfigError> {
        let Some(path) = &self.source else {
            return Ok(Outcome::Unchanged {
                generation: self.current().generation,
            });
        };
        let cur = self.current();
        let bytes = read_stable(path, cur.config.reload.debounce)?;
        let digest = openssl::sha::sha256(&bytes);
        if cur.digest == Some(digest) && cert_stamp(&cur.config) == cur.stamp {
            // Same text, same certificates: nothing to parse or rebuild.
            return Ok(Outcome::Unchanged {
                generation: cur.generation,
            });
        }
        let text = String::from_utf8(bytes).map_err(|_| ConfigError {
            file: path.to_owned(),
            line: None,
            column: None,
            field: None,
            message: "not UTF-8 text".into(),
        })?;
        let mut new = Config::from_toml(&text, path)?;
        let overrides = new.apply_env(&self.env)?;
        let base_routing = new.routing.clone();
        let runtime = self.runtime_now();
        runtime.apply(&mut new.routing);
        let pending = cur.config.restart_only_changes(&new);
        let effective = cur.config.with_running_restart_only(new);
        if effective == cur.config
            && pending == cur.pending_restart
            && cert_stamp(&effective) == cur.stamp
        {
            // A different text that says the same (comments, order): remember the new text so
            // the next identical read is skipped without parsing.
            let mut same = Loaded::clone(&cur);
            same.digest = Some(digest);
            same.env_overrides = overrides;
            // The file's own routing may differ under an override that hides it.
            same.base_routing = base_routing;
            self.current.store(Arc::new(same));
            return Ok(Outcome::Unchanged {
                generation: cur.generation,
            });
        }
        let generation = cur.generation + 1;
        let loaded = build(
            Build {
                config: effective,
                base_routing,
                runtime,
                generation,
                pending_restart: pending.clone(),
                env_overrides: overrides,
                file: path,
                digest: Some(digest),
            },
            Some(&cur),
        )?;
        self.publish(loaded);
        Ok(Outcome::Applied {
            generation,
            pending_restart: pending,
        })
    }

    fn publish(&self, loaded: Loaded) {
        let generation = loaded.generation;
        self.metrics
            .canary_percentage
            .set(loaded.config.routing.canary_percent);
        self.current.store(Arc::new(loaded));
        self.metrics.config_generation.set(generation as i64);
        self.tx.send_replace(generation);
    }

    fn runtime_now(&self) -> Runtime {
        self.runtime
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Puts `runtime` (the rollback override and the rollout's step) over the file and the
    /// environment. A change is a new generation (the drainer moves the devices it moves);
    /// the same runtime again changes nothing. Returns the generation in force.
    pub fn set_runtime(&self, runtime: Runtime) -> u64 {
        self.swap_runtime(runtime, true)
    }

    /// [`Self::set_runtime`] before anything is served: the starting generation itself takes
    /// it (a restart with a rollback in force never routes a device by the file's share).
    pub fn init_runtime(&self, runtime: Runtime) -> u64 {
        self.swap_runtime(runtime, false)
    }

    fn swap_runtime(&self, runtime: Runtime, bump: bool) -> u64 {
        // Nothing to change (every evaluation asks): no need to wait for a reload under way.
        {
            let mut r = self.runtime.lock().unwrap_or_else(|p| p.into_inner());
            let cur = self.current();
            if *r == runtime && cur.runtime == runtime {
                return cur.generation;
            }
            *r = runtime.clone();
        }
        // A reload under way holds this for as long as its file takes to settle; callers run
        // on blocking threads.
        let _guard = self.reload_lock.lock().unwrap_or_else(|p| p.into_inner());
        // The runtime stored last (another call may have stored a newer one meanwhile): what
        // is in force and what a reload applies never differ.
        let runtime = self.runtime_now();
        let cur = self.current();
        if cur.runtime == runtime {
            return cur.generation;
        }
        let mut config = cur.config.clone();
        config.routing = cur.base_routing.clone();
        runtime.apply(&mut config.routing);
        let generation = cur.generation + u64::from(bump);
        let loaded = Loaded {
            policy: config.routing.policy(),
            config,
            generation,
            loaded_at: SystemTime::now(),
            runtime,
            ..Loaded::clone(&cur)
        };
        if bump {
            tracing::info!(generation, "routing changed by the SLO controller");
            self.publish(loaded);
        } else {
            self.metrics
                .canary_percentage
                .set(loaded.config.routing.canary_percent);
            self.current.store(Arc::new(loaded));
        }
        generation
    }
}

/// A running file watch; dropping it stops the watch and its thread.
pub struct FileWatch {
    _watcher: notify::RecommendedWatcher,
}

/// Longest a burst of changes can postpone its reload (a file rewritten without pause still
/// gets read; `read_stable` then waits for it to settle).
const MAX_DEBOUNCE_WAIT: Duration = Duration::from_secs(2);

/// Watches the config file's folder (and the certificate folder) and reloads on change, once
/// `debounce` passed with no further change. The thread blocks while nothing changes (no
/// periodic wakeups: an idle proxy stays idle). Keep the returned value alive.
pub fn watch_file(live: Arc<LiveConfig>, debounce: Duration) -> Result<FileWatch, notify::Error> {
    let path = live
        .source()
        .map(Path::to_owned)
        .ok_or_else(|| notify::Error::generic("no configuration file to watch"))?;
    let folder = |p: &Path| {
        p.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_owned)
    };
    let dir = folder(&path);
    let cert_dir = live.current().config.tls.cert_dir.clone();
    let name = path.file_name().map(|n| n.to_owned());
    let certs = CertPaths::in_dir(&cert_dir);
    let cert_names: Vec<std::ffi::OsString> = [
        &certs.rsa_cert,
        &certs.rsa_key,
        &certs.ecdsa_cert,
        &certs.ecdsa_key,
    ]
    .iter()
    .filter_map(|p| p.file_name().map(|n| n.to_owned()))
    .collect();
    // The file itself, a ConfigMap's `..data` swap, a rename onto the file, or a certificate
    // file; an event without paths (a queue overflow) or a watch error may hide one.
    let relevant = move |e: &notify::Event| {
        is_modification(&e.kind)
            && (e.paths.is_empty()
                || e.paths.iter().any(|p| {
                    let f = p.file_name();
                    f == name.as_deref()
                        || f.is_some_and(|f| {
                            f.to_string_lossy().starts_with("..")
                                || cert_names.iter().any(|c| c == f)
                        })
                }))
    };
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let hit = match &res {
            Ok(e) => relevant(e),
            Err(_) => true,
        };
        if hit {
            let _ = tx.send(());
        }
    })?;
    use notify::Watcher as _;
    w.watch(&dir, notify::RecursiveMode::NonRecursive)?;
    if cert_dir.is_dir() && cert_dir != dir {
        // Best effort: certificate rotation also works through SIGHUP and POST /reload.
        if let Err(e) = w.watch(&cert_dir, notify::RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %cert_dir.display(), error = %e, "cannot watch the certificate folder");
        }
    }
    let spawned = std::thread::Builder::new()
        .name("config-watch".into())
        .spawn(move || {
            use std::sync::mpsc::RecvTimeoutError;
            // Ends when the watcher (and with it the sender) is dropped.
            while rx.recv().is_ok() {
                let first = std::time::Instant::now();
                loop {
                    let left = MAX_DEBOUNCE_WAIT.saturating_sub(first.elapsed());
                    if left.is_zero() {
                        break;
                    }
                    match rx.recv_timeout(debounce.min(left)) {
                        Ok(()) => {}
                        Err(RecvTimeoutError::Timeout) => break,
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
                let _ = live.reload(Trigger::Watch);
            }
        });
    if let Err(e) = spawned {
        return Err(notify::Error::io(e));
    }
    Ok(FileWatch { _watcher: w })
}
