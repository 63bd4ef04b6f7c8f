//! The SLO loop inside the proxy: every `slo.eval_interval` it reads the SLIs (this proxy's
//! counters, or Prometheus in fleet mode), evaluates them, runs the controller (automatic
//! rollback, progressive rollout), publishes the `tcp_comm_slo_*` gauges and `GET /slo`,
//! appends the decision to `decisions-YYYYMMDD.jsonl`, and keeps the state (series, override,
//! rollout step) in `slo.state_file`.

use super::Proxy;
use crate::config::{SloConfig, SloSource, Step};
use crate::reload::Loaded;
use crate::route::Path;
use crate::slo::control::{self, Action, Actor, Control, Decision, Runtime};
use crate::slo::sli::Sli;
use crate::slo::{Evaluation, State};
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// Decision-log lines waiting for the writer thread; more are counted and dropped.
const LOG_QUEUE: usize = 64;
/// Rollback webhooks in flight at once; more are counted and dropped.
const WEBHOOKS_IN_FLIGHT: usize = 4;
/// A day's decision log stops growing here (further lines are counted as dropped).
pub const MAX_DECISION_LOG_BYTES: u64 = 64 << 20;

/// The SLO engine's shared state.
pub(super) struct Slo {
    state: Mutex<State>,
    /// The `GET /slo` document.
    latest: Mutex<Value>,
    /// Serialises state-file writes; each writes the state as it is when it runs, so the
    /// last write is the newest state.
    save_lock: Mutex<()>,
    /// Serialises applying the controller's state to the routing (same rule).
    apply_lock: Mutex<()>,
    /// An exclusive `flock` on `<state file>.lock` while this proxy runs: the CLI edits the
    /// state file only when nobody holds it.
    _lock: Option<std::fs::File>,
    log: std::sync::mpsc::SyncSender<LogLine>,
    webhooks: Arc<tokio::sync::Semaphore>,
    /// The newest decisions logged (the console's decision log), oldest first.
    recent: Mutex<std::collections::VecDeque<Value>>,
}

/// Decisions kept in memory for `GET /api/rollout`.
pub const RECENT_DECISIONS: usize = 50;

struct LogLine {
    dir: std::path::PathBuf,
    keep_days: u32,
    at: SystemTime,
    line: String,
    /// An action (rollback, clear, advance): written even past the day's cap.
    action: bool,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn rfc3339(t: SystemTime) -> String {
    // humantime panics on a time before 1970 (a clock without RTC, stepped back).
    humantime::format_rfc3339_seconds(t.max(SystemTime::UNIX_EPOCH)).to_string()
}

impl Slo {
    /// Loads `slo.state_file`. A missing file starts over; an unreadable one is moved aside
    /// and the proxy starts rolled back (it cannot know whether an override was in force:
    /// safe until someone clears it). The bake of a rollout step starts over (time down is not
    /// time baked) and the counters' baseline is zero (this process counts from its start).
    /// An empty `path` (allowed with `[slo] enabled = false`) keeps nothing on disk.
    pub(super) fn load(path: &std::path::Path, metrics: &crate::metrics::Metrics) -> Self {
        let on_disk = !path.as_os_str().is_empty();
        let lock = on_disk.then(|| lock_state(path)).flatten();
        let mut state = match std::fs::read(path) {
            _ if !on_disk => State::default(),
            Ok(b) => match serde_json::from_slice::<State>(&b) {
                Ok(s) => {
                    tracing::info!(file = %path.display(), rollback = s.control.rollback.is_some(), "SLO state restored");
                    s
                }
                Err(e) => {
                    // Written at once: a crash before the first save must not forget it.
                    let s = unreadable(path, &e.to_string(), true);
                    if let Err(e) = write_state(path, &s) {
                        tracing::warn!(file = %path.display(), error = %e, "cannot save the SLO state");
                    }
                    s
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            // Not readable (permissions, I/O): left where it is, and safe meanwhile.
            Err(e) => unreadable(path, &e.to_string(), false),
        };
        state.control.rollout.healthy_since = None;
        state.engine.restarted();
        let (tx, rx) = std::sync::mpsc::sync_channel(LOG_QUEUE);
        let dropped = metrics.slo.log_dropped.clone();
        let spawned = std::thread::Builder::new()
            .name("slo-log".into())
            .spawn(move || log_thread(rx, dropped));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the SLO decision-log writer; decisions are not logged");
        }
        Self {
            state: Mutex::new(state),
            latest: Mutex::new(json!({"evaluated_at": null, "slos": []})),
            save_lock: Mutex::new(()),
            apply_lock: Mutex::new(()),
            _lock: lock,
            log: tx,
            webhooks: Arc::new(tokio::sync::Semaphore::new(WEBHOOKS_IN_FLIGHT)),
            recent: Mutex::new(std::collections::VecDeque::with_capacity(RECENT_DECISIONS)),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Path of the lock file of a state file.
pub fn lock_path(state: &std::path::Path) -> std::path::PathBuf {
    let mut p = state.as_os_str().to_owned();
    p.push(".lock");
    std::path::PathBuf::from(p)
}

/// Takes the state file's lock, warning when another process holds it (two proxies must not
/// share a state file).
fn lock_state(path: &std::path::Path) -> Option<std::fs::File> {
    let f = try_lock_state(path);
    if f.is_none() {
        tracing::warn!(file = %path.display(), "another process holds this SLO state file (or its lock cannot be made); two proxies must not share one (set slo.state_file per proxy)");
    }
    f
}

/// The state file's exclusive lock (`<state file>.lock`, 0600), held until the file returned
/// is dropped; `None` when another process holds it or it cannot be made.
pub fn try_lock_state(path: &std::path::Path) -> Option<std::fs::File> {
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let _ = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir);
    }
    // Empty and readable by all (no secret in it): whoever runs the proxy or the CLI can
    // take it; flock needs no write access.
    let lp = lock_path(path);
    let _ = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&lp);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&lp)
        .ok()?;
    rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).ok()?;
    Some(f)
}

/// An unreadable state file: moved aside, and a rollback in force until cleared.
/// An unreadable state file: a rollback in force until cleared (whether one was in force
/// cannot be known); a file that does not parse is moved aside first (`move_aside`).
fn unreadable(path: &std::path::Path, why: &str, move_aside: bool) -> State {
    let now = unix(SystemTime::now());
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".unreadable-{now}"));
    let aside = std::path::PathBuf::from(aside);
    let moved = move_aside && std::fs::rename(path, &aside).is_ok();
    tracing::error!(file = %path.display(), error = why, moved_to = %aside.display(), moved, "SLO state unreadable: starting rolled back (every device on the legacy path) until the override is cleared");
    let mut s = State::default();
    let where_ = if moved {
        format!("it was moved to {}", aside.display())
    } else {
        "it was left in place".to_owned()
    };
    control::rollback(
        &mut s.control,
        None,
        Actor::Auto,
        format!("the SLO state file could not be read ({why}); {where_}"),
        now,
    );
    s
}

/// The rollout's steps when `[rollout]` is enabled.
fn steps(l: &Loaded) -> Option<Vec<Step>> {
    let r = &l.config.rollout;
    r.enabled.then(|| r.resolved().unwrap_or_default())
}

fn runtime(c: &Control, l: &Loaded) -> Runtime {
    Runtime::of(c, steps(l).as_deref(), l.config.rollout.mode)
}

/// The decision log's folder: the state file's.
fn log_dir(cfg: &SloConfig) -> std::path::PathBuf {
    cfg.state_file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map_or_else(|| std::path::PathBuf::from("."), std::path::Path::to_owned)
}

impl Proxy {
    /// Puts the restored override and rollout step over the starting configuration, before
    /// anything is served.
    pub(super) fn init_slo_runtime(&self) {
        let l = self.live.current();
        let rt = runtime(&self.slo.state().control, &l);
        if rt != Runtime::default() {
            self.live.init_runtime(rt);
        }
        self.publish_control(&self.slo.state().control, &self.live.current());
    }

    fn publish_control(&self, c: &Control, l: &Loaded) {
        let m = &self.metrics.slo;
        m.rollback_active.set(i64::from(c.rollback.is_some()));
        m.consecutive.set(i64::from(c.consecutive));
        m.rollout_step.set(match steps(l) {
            Some(s) if !s.is_empty() => c.rollout.position(&s) as i64,
            _ => -1,
        });
    }

    /// The `GET /slo` document: the latest evaluation of every SLI on both transports, the
    /// controller's state and the latest decision.
    pub fn slo_report(&self) -> Value {
        let mut v = self
            .slo
            .latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        v["control"] = self.control_report();
        v
    }

    fn control_report(&self) -> Value {
        let l = self.live.current();
        let s = self.slo.state();
        json!({
            "override": s.control.rollback.as_ref().map(control::Override::report),
            "consecutive_violations": s.control.consecutive,
            "max_violations": l.config.slo.max_violations,
            "rollbacks": s.control.rollbacks,
            "canary_percent": l.config.routing.canary_percent,
            "mode": l.config.routing.mode,
            "file_canary_percent": l.base_routing.canary_percent,
            "generation": l.generation,
            "state_file": l.config.slo.state_file.display().to_string(),
            "decision_log": l.config.slo.decision_log.then(|| log_dir(&l.config.slo).join("decisions-YYYYMMDD.jsonl").display().to_string()),
        })
    }

    /// The `GET /rollout` document.
    pub fn rollout_report(&self) -> Value {
        let l = self.live.current();
        let s = self.slo.state();
        let r = &s.control.rollout;
        let Some(steps) = steps(&l) else {
            return json!({"enabled": false, "step": r.step, "paused": r.paused});
        };
        let latest = self.slo.latest.lock().unwrap_or_else(|p| p.into_inner());
        json!({
            "enabled": true,
            "step": r.position(&steps),
            "steps": control::steps_report(&steps),
            "paused": r.paused,
            "entered_at": r.entered_at.map(|t| rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(t))),
            "healthy_since": r.healthy_since.map(|t| rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(t))),
            "status": latest["last_decision"]["rollout"]["status"].clone(),
            "override": s.control.rollback.as_ref().map(control::Override::report),
            "mode": l.config.routing.mode,
            "canary_percent": l.config.routing.canary_percent,
        })
    }

    /// Applies the controller's state to the routing (a new generation when it changes) and
    /// publishes its gauges, off the async threads (a reload in progress holds the
    /// configuration for up to seconds). The state is read when applied, under `apply_lock`,
    /// so whichever runs last applies the newest state.
    async fn apply_control(self: &Arc<Self>) {
        let me = self.clone();
        if tokio::task::spawn_blocking(move || me.apply_control_now())
            .await
            .is_err()
        {
            tracing::warn!("applying the SLO controller's routing failed");
        }
    }

    fn apply_control_now(&self) {
        let _g = self
            .slo
            .apply_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let l = self.live.current();
        let (rt, c) = {
            let s = self.slo.state();
            (runtime(&s.control, &l), s.control.clone())
        };
        self.live.set_runtime(rt);
        self.publish_control(&c, &self.live.current());
    }

    /// `POST /rollback`: every device back to the legacy path now, until cleared. Returns
    /// whether this call set it (false: one was in force already). Runs to its end (logged,
    /// counted, notified) even if the caller goes away.
    pub async fn rollback_now(self: &Arc<Self>, reason: &str) -> bool {
        let (me, reason) = (self.clone(), reason.to_owned());
        tokio::spawn(async move { me.rollback_inner(&reason).await })
            .await
            .unwrap_or(false)
    }

    async fn rollback_inner(self: &Arc<Self>, reason: &str) -> bool {
        let l = self.live.current();
        let now = SystemTime::now();
        let (set, over) = {
            let mut s = self.slo.state();
            let before = s.control.rollback.is_some();
            control::rollback(
                &mut s.control,
                steps(&l).as_deref(),
                Actor::Manual,
                reason.to_owned(),
                unix(now),
            );
            (!before, s.control.rollback.clone())
        };
        self.save_soon();
        self.apply_control().await;
        if set {
            self.metrics
                .slo
                .rollbacks
                .with_label_values(&[Actor::Manual.label()])
                .inc();
            tracing::warn!(
                reason,
                "rollback: every device back to the legacy path (POST /rollback)"
            );
            let record = json!({
                "at": rfc3339(now),
                "action": {"rollback": {"reason": reason, "by": "manual"}},
                "generation": self.live.current().generation,
                "override": over.as_ref().map(control::Override::report),
            });
            self.log_decision(&l.config.slo, now, &record);
            self.send_webhook(&l.config.slo, &record);
        }
        set
    }

    /// `POST /rollback/clear`: lifts the override; the file's (or the rollout's) routing is
    /// back. Returns the override lifted. Runs to its end even if the caller goes away.
    pub async fn clear_rollback(self: &Arc<Self>) -> Option<control::Override> {
        let me = self.clone();
        tokio::spawn(async move { me.clear_inner().await })
            .await
            .unwrap_or(None)
    }

    async fn clear_inner(self: &Arc<Self>) -> Option<control::Override> {
        let l = self.live.current();
        let now = SystemTime::now();
        let cleared = control::clear(&mut self.slo.state().control);
        self.save_soon();
        self.apply_control().await;
        if let Some(o) = &cleared {
            tracing::info!(reason = %o.reason, "rollback override cleared; routing follows the configuration again");
            let record = json!({
                "at": rfc3339(now),
                "action": {"clear_override": o.report()},
                "generation": self.live.current().generation,
            });
            self.log_decision(&l.config.slo, now, &record);
        }
        cleared
    }

    /// `POST /rollout/pause` and `/rollout/resume`. A rollout cannot resume while a rollback
    /// override is in force.
    pub fn rollout_pause(self: &Arc<Self>, paused: bool) -> Result<Value, String> {
        let l = self.live.current();
        if !l.config.rollout.enabled {
            return Err("no rollout: [rollout] enabled is false".into());
        }
        {
            let mut s = self.slo.state();
            if !paused && s.control.rollback.is_some() {
                return Err(
                    "a rollback override is in force; clear it first (POST /rollback/clear or cync-mitm canary clear-override)"
                        .into(),
                );
            }
            s.control.rollout.paused = paused;
            s.control.rollout.healthy_since = None;
        }
        tracing::info!(
            paused,
            "rollout {}",
            if paused { "paused" } else { "resumed" }
        );
        self.save_soon();
        Ok(self.rollout_report())
    }

    /// Writes the state in the background, as it is when the write runs.
    fn save_soon(self: &Arc<Self>) {
        let me = self.clone();
        let write = move || me.save_now();
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::task::spawn_blocking(write);
        } else {
            write();
        }
    }

    fn save_now(&self) {
        let _g = self.slo.save_lock.lock().unwrap_or_else(|p| p.into_inner());
        let file = self.live.current().config.slo.state_file.clone();
        if file.as_os_str().is_empty() {
            return;
        }
        let snapshot = self.slo.state().clone();
        save_state(&file, &snapshot);
    }

    /// The newest decisions logged (at most [`RECENT_DECISIONS`]), newest first, whether or
    /// not `slo.decision_log` writes them to a file.
    pub fn recent_decisions(&self) -> Vec<Value> {
        let r = self.slo.recent.lock().unwrap_or_else(|p| p.into_inner());
        r.iter().rev().cloned().collect()
    }

    fn log_decision(&self, cfg: &SloConfig, at: SystemTime, record: &Value) {
        {
            let mut r = self.slo.recent.lock().unwrap_or_else(|p| p.into_inner());
            if r.len() >= RECENT_DECISIONS {
                r.pop_front();
            }
            r.push_back(record.clone());
        }
        if !cfg.decision_log {
            return;
        }
        let line = LogLine {
            dir: log_dir(cfg),
            keep_days: cfg.decision_log_keep_days,
            at,
            line: record.to_string(),
            action: !record["action"].is_null(),
        };
        if self.slo.log.try_send(line).is_err() {
            self.metrics.slo.log_dropped.inc();
        }
    }

    /// POSTs the rollback to `slo.webhook_url` in the background: a timeout per attempt,
    /// `webhook_retries` more attempts 1 s, 2 s, 4 s … apart; at most a few in flight.
    fn send_webhook(&self, cfg: &SloConfig, record: &Value) {
        if cfg.webhook_url.is_empty() {
            return;
        }
        let Ok(target) = crate::httpc::Target::parse(&cfg.webhook_url) else {
            return;
        };
        let Ok(permit) = self.slo.webhooks.clone().try_acquire_owned() else {
            self.metrics
                .slo
                .webhook
                .with_label_values(&["dropped"])
                .inc();
            tracing::warn!("rollback webhook not sent: too many in flight");
            return;
        };
        let body = bytes::Bytes::from(
            json!({"event": "rollback", "source": "cync-mitm", "decision": record}).to_string(),
        );
        let mut headers = vec![("content-type", "application/json".to_owned())];
        if !cfg.webhook_token.is_empty() {
            headers.push(("authorization", format!("Bearer {}", cfg.webhook_token)));
        }
        let (timeout, retries) = (cfg.webhook_timeout, cfg.webhook_retries);
        let counter = self.metrics.slo.webhook.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut backoff = Duration::from_secs(1);
            for attempt in 0..=retries {
                let r = crate::httpc::request(
                    &target,
                    hyper::Method::POST,
                    &headers,
                    body.clone(),
                    timeout,
                )
                .await;
                match r {
                    Ok((status, _)) if status.is_success() => {
                        counter.with_label_values(&["ok"]).inc();
                        return;
                    }
                    Ok((status, _)) => {
                        tracing::warn!(attempt, %status, "rollback webhook refused");
                    }
                    Err(e) => tracing::warn!(attempt, error = %e, "rollback webhook failed"),
                }
                if attempt < retries {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
            counter.with_label_values(&["error"]).inc();
        });
    }

    /// Reads the SLIs once: from this proxy's counters into the rolling series (always: they
    /// feed `slo report` and the local view), and from Prometheus in fleet mode.
    async fn read_slis(&self, cfg: &SloConfig, now: u64) -> Option<Vec<(Path, Sli, Evaluation)>> {
        let local = {
            let mut s = self.slo.state();
            s.engine
                .observe_metrics(now, &self.metrics, crate::slo::sli::Thresholds::of(cfg));
            s.engine
                .evaluate(now, |sli: Sli| cfg.objective(sli), cfg.min_events)
        };
        match cfg.source {
            SloSource::Local => Some(local),
            SloSource::Prometheus => match crate::slo::prom::evaluate(cfg, now).await {
                Ok(e) => Some(e),
                Err(e) => {
                    self.metrics.slo.source_errors.inc();
                    tracing::warn!(url = %cfg.prometheus_url, error = %e, "SLO evaluation skipped: cannot read the SLIs from Prometheus");
                    None
                }
            },
        }
    }

    /// Evaluates the SLOs every `slo.eval_interval` (reloads apply at the next tick). In fleet
    /// mode the ticks are aligned to the wall clock (multiples of the interval) and Prometheus
    /// is asked about that instant, so every replica evaluates the same data.
    pub(super) async fn slo_loop(self: Arc<Self>) {
        let mut last_save = Instant::now();
        let mut quiet = Quiet::default();
        loop {
            let loaded = self.live.current();
            let cfg = loaded.config.slo.clone();
            let wait = match cfg.source {
                SloSource::Local => cfg.eval_interval,
                SloSource::Prometheus => until_next_tick(SystemTime::now(), cfg.eval_interval),
            };
            tokio::select! {
                _ = self.shutdown.cancelled() => {
                    let me = self.clone();
                    let _ = tokio::task::spawn_blocking(move || me.save_now()).await;
                    return;
                }
                _ = tokio::time::sleep(wait) => {}
            }
            if !cfg.enabled {
                continue;
            }
            let wall = SystemTime::now();
            let now = match cfg.source {
                SloSource::Local => unix(wall),
                // The tick this wake-up belongs to (it is a little after the boundary).
                SloSource::Prometheus => {
                    let i = cfg.eval_interval.as_secs().max(1);
                    unix(wall) / i * i
                }
            };
            let Some(evals) = self.read_slis(&cfg, now).await else {
                continue;
            };
            self.evaluate_once(&cfg, wall, now, &evals, &mut quiet)
                .await;
            if last_save.elapsed() >= cfg.save_interval {
                last_save = Instant::now();
                self.save_soon();
            }
        }
    }

    /// Runs the controller on one evaluation and carries out what it decided.
    async fn evaluate_once(
        self: &Arc<Self>,
        cfg: &SloConfig,
        wall: SystemTime,
        now: u64,
        evals: &[(Path, Sli, Evaluation)],
        quiet: &mut Quiet,
    ) {
        let loaded = self.live.current();
        let steps = steps(&loaded);
        let (decision, snapshot) = {
            let mut s = self.slo.state();
            let d = control::tick(
                &mut s.control,
                &control::Inputs {
                    now,
                    evals,
                    max_violations: cfg.max_violations,
                    rollout: steps.as_deref(),
                    gates: &loaded.config.rollout.gating(),
                },
            );
            (d, s.control.clone())
        };
        self.apply_control().await;
        let after = self.live.current();
        let record = decision_record(cfg, wall, now, evals, &decision, &snapshot, &after);
        match &decision.action {
            Some(Action::Rollback { reason }) => {
                self.metrics
                    .slo
                    .rollbacks
                    .with_label_values(&[Actor::Auto.label()])
                    .inc();
                tracing::error!(%reason, generation = after.generation, "automatic rollback: every device back to the legacy path");
                self.send_webhook(cfg, &record);
                self.save_soon();
            }
            Some(Action::Advance { from, to }) => {
                tracing::info!(%from, %to, generation = after.generation, "rollout: next step");
                self.save_soon();
            }
            None => {}
        }
        if quiet.should_log(&decision, evals, wall, cfg.decision_log_heartbeat) {
            self.log_decision(cfg, wall, &record);
        }
        let slos: Vec<Value> = evals
            .iter()
            .map(|(t, s, e)| json!({"transport": t.label(), "slo_name": s.name(), "evaluation": e}))
            .collect();
        *self.slo.latest.lock().unwrap_or_else(|p| p.into_inner()) = json!({
            "evaluated_at": rfc3339(wall),
            "source": cfg.source,
            "eval_interval_ms": cfg.eval_interval.as_millis() as u64,
            "min_events": cfg.min_events,
            "slos": slos,
            "last_decision": record,
        });
        // The gauges last: whoever sees them changed finds the same evaluation at GET /slo.
        for (t, s, e) in evals {
            self.metrics.slo.publish(*t, *s, e);
        }
        self.metrics.slo.evaluations.inc();
    }
}

/// Time from `now` to the next multiple of `interval` since the epoch, plus a quarter of the
/// interval (at most 5 s) for the last scrapes before the boundary to be ingested.
fn until_next_tick(now: SystemTime, interval: Duration) -> Duration {
    let i = interval.as_millis().max(1);
    let t = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let settle = (i / 4).min(5000);
    let next = t.saturating_sub(settle).div_euclid(i) * i + i + settle;
    Duration::from_millis((next - t) as u64)
}

/// Whether an evaluation is worth a line: every violation, verdict change, rollout change and
/// action is; an unchanged healthy one only once per heartbeat.
#[derive(Default)]
struct Quiet {
    last: Option<(SystemTime, String)>,
}

impl Quiet {
    fn should_log(
        &mut self,
        d: &Decision,
        evals: &[(Path, Sli, Evaluation)],
        at: SystemTime,
        heartbeat: Duration,
    ) -> bool {
        let mut sig = String::new();
        for (t, s, e) in evals {
            sig.push_str(&format!("{}/{}={:?};", t.label(), s.name(), e.verdict));
        }
        if let Some(r) = &d.rollout {
            // The state's kind, not its words (they carry live counts).
            let state = match &r.status {
                control::RolloutStatus::Baking { .. } => "baking",
                control::RolloutStatus::Holding { gate, .. } => gate,
                control::RolloutStatus::Paused => "paused",
                control::RolloutStatus::RolledBack => "rolled_back",
                control::RolloutStatus::Done => "done",
            };
            sig.push_str(&format!("rollout={}:{state}", r.step));
        }
        let due = self.last.as_ref().is_none_or(|(t, s)| {
            *s != sig || at.duration_since(*t).unwrap_or(Duration::ZERO) >= heartbeat
        });
        let log = due || !d.violations.is_empty() || d.action.is_some();
        if log {
            self.last = Some((at, sig));
        }
        log
    }
}

fn window_label(secs: u64) -> String {
    match secs {
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// One evaluation with its inputs, as logged and shown at `GET /slo`: per SLI with events, the
/// counts over the compliance window and every burn window, the rates, the thresholds, the
/// verdict; then what the controller concluded.
fn decision_record(
    cfg: &SloConfig,
    at: SystemTime,
    tick: u64,
    evals: &[(Path, Sli, Evaluation)],
    d: &Decision,
    c: &Control,
    l: &Loaded,
) -> Value {
    let slos: Vec<Value> = evals
        .iter()
        .filter(|(_, _, e)| {
            e.counts.total() > 0
                || e.burns
                    .iter()
                    .any(|(a, b, _)| a.counts.total() + b.counts.total() > 0)
        })
        .map(|(t, s, e)| {
            let mut burn = serde_json::Map::new();
            for (long, short, _) in &e.burns {
                for b in [long, short] {
                    burn.insert(
                        window_label(b.window),
                        json!([b.counts.good, b.counts.bad, b.rate]),
                    );
                }
            }
            json!({
                "transport": t.label(),
                "slo": s.name(),
                "target": e.objective.target,
                "window": window_label(e.objective.window),
                "good": e.counts.good,
                "bad": e.counts.bad,
                "compliance": e.compliance,
                "budget": e.budget_remaining,
                "burn": burn,
                "burning": e.burning,
                "verdict": e.verdict,
            })
        })
        .collect();
    json!({
        "at": rfc3339(at),
        "tick": tick,
        "source": cfg.source,
        "generation": l.generation,
        "mode": l.config.routing.mode,
        "canary_percent": l.config.routing.canary_percent,
        "thresholds": {
            "min_events": cfg.min_events,
            "max_violations": cfg.max_violations,
            "burn": crate::slo::BURN_ALERTS.iter().map(|a| json!({"long": window_label(a.long), "short": window_label(a.short), "factor": a.factor})).collect::<Vec<_>>(),
            "burn_fields": ["good", "bad", "rate"],
        },
        "slos": slos,
        "violations": d.violations,
        "consecutive": d.consecutive,
        "override": c.rollback.as_ref().map(control::Override::report),
        "rollout": d.rollout,
        "action": d.action,
    })
}

fn log_thread(rx: std::sync::mpsc::Receiver<LogLine>, dropped: prometheus::IntCounter) {
    use std::io::Write as _;
    let mut open: Option<crate::dailylog::Open> = None;
    let mut warned_at: Option<Instant> = None;
    while let Ok(l) = rx.recv() {
        let today = crate::dailylog::day(l.at);
        let want = crate::dailylog::daily_path(&l.dir, "decisions", &today);
        if open.as_ref().is_none_or(|o| o.path != want) {
            open = None;
            match crate::dailylog::open_daily(&l.dir, "decisions", &today) {
                Ok(o) => {
                    crate::dailylog::prune(&l.dir, "decisions", &today, l.keep_days);
                    open = Some(o);
                }
                Err(e) => {
                    dropped.inc();
                    if warned_at.is_none_or(|w| w.elapsed() > Duration::from_secs(60)) {
                        warned_at = Some(Instant::now());
                        tracing::warn!(path = %want.display(), error = %e, "cannot open the SLO decision log");
                    }
                    continue;
                }
            }
        }
        let Some(o) = open.as_mut() else { continue };
        let mut buf = l.line.into_bytes();
        buf.push(b'\n');
        if o.bytes + buf.len() as u64 > MAX_DECISION_LOG_BYTES && !l.action {
            dropped.inc();
            continue;
        }
        o.bytes += buf.len() as u64;
        if let Err(e) = o.file.write_all(&buf) {
            dropped.inc();
            if warned_at.is_none_or(|w| w.elapsed() > Duration::from_secs(60)) {
                warned_at = Some(Instant::now());
                tracing::warn!(path = %o.path.display(), error = %e, "SLO decision log write failed");
            }
            open = None;
        }
    }
}

/// Writes the SLO state atomically (a temporary file, fsync, rename), 0600; failures are
/// logged, never fatal.
fn save_state(path: &std::path::Path, state: &State) {
    if let Err(e) = write_state(path, state) {
        tracing::warn!(file = %path.display(), error = %e, "cannot save the SLO state");
    }
}

/// Writes the SLO state atomically (a temporary file, fsync, rename), 0600, in a 0700 folder.
pub fn write_state(path: &std::path::Path, state: &State) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        // A name of its own: the CLI may write the same file from another process.
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp.{}", std::process::id()));
        let tmp = std::path::PathBuf::from(tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        // Keep the owner of the file it replaces (the CLI run as root edits a proxy user's
        // file; a root-owned file would lock the proxy out of its own state).
        if let Ok(old) = std::fs::metadata(path) {
            use std::os::unix::fs::MetadataExt as _;
            if let Ok(new) = f.metadata()
                && (new.uid(), new.gid()) != (old.uid(), old.gid())
            {
                let _ = std::os::unix::fs::fchown(&f, Some(old.uid()), Some(old.gid()));
            }
        }
        f.write_all(&serde_json::to_vec(state).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_align_to_the_interval_after_a_settle() {
        let at = |ms: u64| SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
        let i = Duration::from_secs(10);
        // 2.5 s settle: from t = 1000.0 s the next wake-up is 1002.5 s.
        for (now, wait) in [
            (1_000_000, 2500),
            (1_002_400, 100),
            (1_002_500, 10_000),
            (1_009_999, 2501),
        ] {
            assert_eq!(
                until_next_tick(at(now), i),
                Duration::from_millis(wait),
                "{now}"
            );
        }
    }

    #[test]
    fn window_labels() {
        assert_eq!(window_label(300), "5m");
        assert_eq!(window_label(3600), "1h");
        assert_eq!(window_label(30 * 86_400), "30d");
        assert_eq!(window_label(90), "90s");
    }
}
