//! Upstream health, per path and address: passive checks on every connection (TCP connect, TLS,
//! and the upstream's first answer, which must be Cync) and an active probe (TCP + TLS) when no
//! connection has said anything recently. It orders the addresses to try (those backing off
//! last), exports `cync_mitm_upstream_up{path,address}`, and answers whether the legacy path is
//! healthy enough for `/readyz`.

use crate::metrics::Metrics;
use crate::route::Path;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// Addresses tracked per path (transparent mode learns them from connections).
const MAX_TRACKED: usize = 64;
/// Longest backoff after consecutive failures.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What one check found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// The upstream answered a connection with a Cync frame.
    Answered,
    /// The probe reached it (TCP, and TLS when configured); says nothing about the protocol.
    Reachable,
    /// TCP connect or TLS failed; why. A later probe that reaches the address clears it.
    Failed(String),
    /// The upstream was reached but failed the protocol (closed before answering, answered
    /// something that is not Cync, stayed silent). Only an answer clears it; otherwise it
    /// ages out of the window.
    Refused(String),
}

#[derive(Clone, Debug, Default)]
struct Addr {
    last_answer: Option<Instant>,
    last_reachable: Option<Instant>,
    last_failure: Option<Instant>,
    last_refusal: Option<Instant>,
    last_error: Option<String>,
    last_error_at: Option<SystemTime>,
    consecutive_failures: u32,
    /// When a connection (not a probe) last checked it, or when tracking began.
    last_used: Option<Instant>,
}

impl Addr {
    fn healthy(&self, now: Instant, window: Duration) -> bool {
        let recent = |t: Option<Instant>| t.is_some_and(|t| now.duration_since(t) <= window);
        let after = |ok: Option<Instant>, bad: Option<Instant>| match (ok, bad) {
            (Some(ok), Some(bad)) => ok >= bad,
            (Some(_), None) => true,
            (None, _) => false,
        };
        let last_bad = self.last_failure.max(self.last_refusal);
        // It answered recently, and nothing failed since.
        if recent(self.last_answer) && after(self.last_answer, last_bad) {
            return true;
        }
        // A probe reached it after the last connect failure, and the protocol has not failed
        // within the window (a probe proves the port, not the protocol).
        recent(self.last_reachable)
            && after(self.last_reachable, self.last_failure)
            && !recent(self.last_refusal)
    }

    fn retry_at(&self) -> Option<Instant> {
        let n = self.consecutive_failures;
        if n == 0 {
            return None;
        }
        let backoff = Duration::from_secs(1)
            .saturating_mul(1 << (n - 1).min(5))
            .min(MAX_BACKOFF);
        self.last_failure
            .max(self.last_refusal)
            .map(|t| t + backoff)
    }
}

/// One address's state, for `/upstreams`.
#[derive(Clone, Debug, Serialize)]
pub struct AddrReport {
    /// `legacy` or `new`.
    pub path: &'static str,
    /// `host:port`.
    pub address: String,
    /// Counted as up.
    pub up: bool,
    /// Failures since the last answer.
    pub consecutive_failures: u32,
    /// The last failure, if any.
    pub last_error: Option<String>,
    /// When it happened (RFC 3339).
    pub last_error_at: Option<String>,
    /// Seconds since the upstream last answered a connection.
    pub last_answer_secs_ago: Option<f64>,
    /// Seconds since a probe last reached it.
    pub last_reachable_secs_ago: Option<f64>,
    /// Seconds until it is tried again first (it is tried last until then).
    pub backoff_secs: Option<f64>,
}

/// Health of every upstream address.
pub struct Health {
    metrics: Arc<Metrics>,
    /// How recent a success must be to count, in milliseconds (three probe intervals; the
    /// interval reloads live).
    window_ms: std::sync::atomic::AtomicU64,
    inner: Mutex<HashMap<(Path, String), Addr>>,
}

impl Health {
    /// Tracks health; a success older than `window` no longer counts.
    pub fn new(metrics: Arc<Metrics>, window: Duration) -> Self {
        Self {
            metrics,
            window_ms: std::sync::atomic::AtomicU64::new(window.as_millis() as u64),
            inner: Mutex::new(HashMap::new()),
        }
    }

    fn window(&self) -> Duration {
        Duration::from_millis(self.window_ms.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Sets how recent a success must be to count (after a reload of the probe interval).
    pub fn set_window(&self, window: Duration) {
        self.window_ms.store(
            window.as_millis() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Whether `address` answered a connection within the window: it works, so a connection
    /// it closes before answering was refused for its own reasons (a wrong auth code), not
    /// because the upstream is down.
    pub fn answered_recently(&self, path: Path, address: &str) -> bool {
        let now = Instant::now();
        let window = self.window();
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&(path, address.to_owned()))
            .and_then(|a| a.last_answer)
            .is_some_and(|t| now.duration_since(t) <= window)
    }

    /// Starts tracking `addresses` of `path` (their gauges read 0 until a check succeeds).
    pub fn track(&self, path: Path, addresses: &[String]) {
        let now = Instant::now();
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for a in addresses {
            self.insert(&mut m, path, a, now);
        }
    }

    /// Adds `address` unless tracked; at [`MAX_TRACKED`] the entry of `path` a connection
    /// used longest ago makes room (transparent mode learns addresses from peers).
    fn insert(
        &self,
        m: &mut HashMap<(Path, String), Addr>,
        path: Path,
        address: &str,
        now: Instant,
    ) {
        let key = (path, address.to_owned());
        if m.contains_key(&key) {
            return;
        }
        if m.keys().filter(|(p, _)| *p == path).count() >= MAX_TRACKED {
            let oldest = m
                .iter()
                .filter(|((p, _), _)| *p == path)
                .min_by_key(|(_, a)| a.last_used)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                m.remove(&k);
                self.metrics.remove_upstream_up(k.0.label(), &k.1);
            }
        }
        m.insert(
            key,
            Addr {
                last_used: Some(now),
                ..Addr::default()
            },
        );
        self.metrics.upstream_up(path.label(), address, false);
    }

    /// Stops tracking addresses of `path` not in `keep` (removed from the config), and their
    /// gauges.
    pub fn retain(&self, path: Path, keep: &[String]) {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|(p, a), _| {
            let stay = *p != path || keep.contains(a);
            if !stay {
                self.metrics.remove_upstream_up(p.label(), a);
            }
            stay
        });
    }

    /// Stops tracking addresses of `path` no connection has used for `older_than` (the
    /// original destinations of transparent mode), and their gauges.
    pub fn forget_unused(&self, path: Path, older_than: Duration) {
        let now = Instant::now();
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|(p, a), s| {
            let stay = *p != path
                || s.last_used
                    .is_some_and(|t| now.duration_since(t) < older_than);
            if !stay {
                self.metrics.remove_upstream_up(p.label(), a);
            }
            stay
        });
    }

    /// The addresses of `path` being tracked.
    pub fn known(&self, path: Path) -> Vec<String> {
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<String> = m
            .keys()
            .filter(|(p, _)| *p == path)
            .map(|(_, a)| a.clone())
            .collect();
        v.sort();
        v
    }

    /// Records what a connection found at `address` on `path`.
    pub fn record(&self, path: Path, address: &str, check: Check) {
        self.apply(path, address, check, true);
    }

    /// Records what a probe found (it does not count as use: an address only probes see
    /// is forgotten by [`Health::forget_unused`]).
    pub fn record_probe(&self, path: Path, address: &str, check: Check) {
        self.apply(path, address, check, false);
    }

    fn apply(&self, path: Path, address: &str, check: Check, used: bool) {
        let now = Instant::now();
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        self.insert(&mut m, path, address, now);
        let key = (path, address.to_owned());
        let Some(a) = m.get_mut(&key) else { return };
        if used {
            a.last_used = Some(now);
        }
        match check {
            Check::Answered => {
                a.last_answer = Some(now);
                a.consecutive_failures = 0;
            }
            Check::Reachable => {
                a.last_reachable = Some(now);
                if a.last_refusal
                    .is_none_or(|t| now.duration_since(t) > self.window())
                {
                    a.consecutive_failures = 0;
                }
            }
            Check::Failed(e) => {
                a.last_failure = Some(now);
                a.last_error = Some(e);
                a.last_error_at = Some(SystemTime::now());
                a.consecutive_failures = a.consecutive_failures.saturating_add(1);
            }
            Check::Refused(e) => {
                a.last_refusal = Some(now);
                a.last_error = Some(e);
                a.last_error_at = Some(SystemTime::now());
                a.consecutive_failures = a.consecutive_failures.saturating_add(1);
            }
        }
        let up = a.healthy(now, self.window());
        self.metrics.upstream_up(path.label(), address, up);
    }

    /// `addresses` in the order to try them: those not backing off first (in the given
    /// order), then those backing off, the soonest due first. Nothing is ever left out.
    pub fn order(&self, path: Path, addresses: &[String]) -> Vec<String> {
        let now = Instant::now();
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<(Option<Instant>, usize, &String)> = addresses
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let due = m
                    .get(&(path, a.clone()))
                    .and_then(Addr::retry_at)
                    .filter(|t| *t > now);
                (due, i, a)
            })
            .collect();
        v.sort_by_key(|(due, i, _)| (due.is_some(), *due, *i));
        v.into_iter().map(|(_, _, a)| a.clone()).collect()
    }

    /// Whether every address of `path` has failed at least `failures` times in a row, the last
    /// time less than its cool-down ago (1 s after the first failure, doubling with each one, up
    /// to `cooldown`): the circuit is open, and connections should not wait on it. When the
    /// cool-down runs out connections try again (half-open); an answer closes it.
    pub fn circuit_open(
        &self,
        path: Path,
        addresses: &[String],
        failures: u32,
        cooldown: Duration,
    ) -> bool {
        if addresses.is_empty() {
            return false;
        }
        let now = Instant::now();
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        addresses.iter().all(|a| {
            m.get(&(path, a.clone())).is_some_and(|s| {
                let n = s.consecutive_failures;
                let wait = Duration::from_secs(1)
                    .saturating_mul(1 << n.saturating_sub(1).min(20))
                    .min(cooldown);
                n >= failures.max(1)
                    && s.last_failure
                        .max(s.last_refusal)
                        .is_some_and(|t| t + wait > now)
            })
        })
    }

    /// Whether any address of `path` is healthy now.
    pub fn any_up(&self, path: Path) -> bool {
        let now = Instant::now();
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        m.iter()
            .any(|((p, _), a)| *p == path && a.healthy(now, self.window()))
    }

    /// Addresses of `path` with no check (passive or probe) for `every`: the prober's list.
    pub fn stale(&self, path: Path, addresses: &[String], every: Duration) -> Vec<String> {
        let now = Instant::now();
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        addresses
            .iter()
            .filter(|a| {
                let Some(s) = m.get(&(path, (*a).clone())) else {
                    return true;
                };
                let last = [
                    s.last_answer,
                    s.last_reachable,
                    s.last_failure,
                    s.last_refusal,
                ]
                .into_iter()
                .flatten()
                .max();
                last.is_none_or(|t| now.duration_since(t) >= every)
            })
            .cloned()
            .collect()
    }

    /// Refreshes the gauges (a success ages out of the window without a new check).
    pub fn refresh(&self) {
        let now = Instant::now();
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for ((p, a), s) in m.iter() {
            self.metrics
                .upstream_up(p.label(), a, s.healthy(now, self.window()));
        }
    }

    /// Every tracked address.
    pub fn report(&self) -> Vec<AddrReport> {
        let now = Instant::now();
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let ago = |t: Option<Instant>| t.map(|t| now.duration_since(t).as_secs_f64());
        let mut v: Vec<AddrReport> = m
            .iter()
            .map(|((p, a), s)| AddrReport {
                path: p.label(),
                address: a.clone(),
                up: s.healthy(now, self.window()),
                consecutive_failures: s.consecutive_failures,
                last_error: s.last_error.clone(),
                last_error_at: s.last_error_at.map(|t| {
                    humantime::format_rfc3339_seconds(t.max(std::time::UNIX_EPOCH)).to_string()
                }),
                last_answer_secs_ago: ago(s.last_answer),
                last_reachable_secs_ago: ago(s.last_reachable),
                backoff_secs: s
                    .retry_at()
                    .filter(|t| *t > now)
                    .map(|t| t.duration_since(now).as_secs_f64()),
            })
            .collect();
        v.sort_by(|a, b| (a.path, &a.address).cmp(&(b.path, &b.address)));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health() -> Health {
        Health::new(Arc::new(Metrics::new(false)), Duration::from_secs(60))
    }

    #[test]
    fn answers_make_an_address_up_and_failures_back_it_off() {
        let h = health();
        let addrs = vec!["a:1".to_string(), "b:1".to_string()];
        h.track(Path::Legacy, &addrs);
        assert!(!h.any_up(Path::Legacy));
        h.record(Path::Legacy, "a:1", Check::Refused("closed".into()));
        assert_eq!(h.order(Path::Legacy, &addrs), vec!["b:1", "a:1"]);
        assert!(!h.any_up(Path::Legacy));
        // A probe that reaches it does not clear a failure the protocol saw.
        h.record(Path::Legacy, "a:1", Check::Reachable);
        assert!(!h.any_up(Path::Legacy));
        // A connect failure is cleared by a later probe that gets through.
        h.record(Path::Legacy, "b:1", Check::Failed("refused".into()));
        h.record(Path::Legacy, "b:1", Check::Reachable);
        assert!(h.any_up(Path::Legacy));
        h.record(Path::Legacy, "b:1", Check::Failed("refused".into()));
        h.record(Path::Legacy, "a:1", Check::Answered);
        assert!(h.any_up(Path::Legacy));
        assert_eq!(h.order(Path::Legacy, &addrs), vec!["a:1", "b:1"]);
        // A probe alone, with no failure, is enough.
        h.record(Path::Legacy, "b:1", Check::Reachable);
        assert!(h.report().iter().all(|r| r.up));
        assert!(!h.any_up(Path::New));
    }

    #[test]
    fn the_circuit_opens_after_repeated_failures_and_half_opens_after_the_backoff() {
        let h = health();
        let addrs = vec!["n:1".to_string()];
        h.track(Path::New, &addrs);
        assert!(!h.circuit_open(Path::New, &addrs, 3, Duration::from_secs(30)));
        for _ in 0..2 {
            h.record(Path::New, "n:1", Check::Failed("refused".into()));
        }
        assert!(
            !h.circuit_open(Path::New, &addrs, 3, Duration::from_secs(30)),
            "two failures"
        );
        h.record(Path::New, "n:1", Check::Failed("refused".into()));
        assert!(h.circuit_open(Path::New, &addrs, 3, Duration::from_secs(30)));
        // Another address still healthy keeps it closed.
        let two = vec!["n:1".to_string(), "n:2".to_string()];
        h.track(Path::New, &two);
        assert!(!h.circuit_open(Path::New, &two, 3, Duration::from_secs(30)));
        // A zero cool-down is never open (every connection tries).
        assert!(!h.circuit_open(Path::New, &addrs, 3, Duration::ZERO));
        // An answer closes it.
        h.record(Path::New, "n:1", Check::Answered);
        assert!(!h.circuit_open(Path::New, &addrs, 3, Duration::from_secs(30)));
    }

    #[test]
    fn tracking_is_bounded_and_the_newest_address_gets_in() {
        let h = health();
        for i in 0..200 {
            h.record(Path::Legacy, &format!("10.0.0.{i}:1"), Check::Answered);
        }
        assert_eq!(h.report().len(), MAX_TRACKED);
        // The address seen last is tracked (the one used longest ago made room) and counts.
        assert!(h.known(Path::Legacy).contains(&"10.0.0.199:1".to_string()));
        assert!(!h.known(Path::Legacy).contains(&"10.0.0.0:1".to_string()));
        assert!(h.any_up(Path::Legacy));
    }

    #[test]
    fn removed_and_unused_addresses_are_forgotten_with_their_gauges() {
        let metrics = Arc::new(Metrics::new(false));
        let h = Health::new(metrics.clone(), Duration::from_secs(60));
        let gauges = || {
            let text = metrics.render();
            text.lines()
                .filter(|l| l.starts_with("cync_mitm_upstream_up{"))
                .count()
        };
        h.track(Path::Legacy, &["a:1".into(), "b:1".into()]);
        h.track(Path::New, &["n:1".into()]);
        assert_eq!(gauges(), 3);
        h.retain(Path::Legacy, &["b:1".into()]);
        assert_eq!(h.known(Path::Legacy), vec!["b:1"]);
        assert_eq!(h.known(Path::New), vec!["n:1"], "other paths untouched");
        assert_eq!(gauges(), 2);
        // Probes alone do not keep an address: only connections do.
        h.record_probe(Path::Legacy, "b:1", Check::Reachable);
        h.forget_unused(Path::Legacy, Duration::ZERO);
        assert!(h.known(Path::Legacy).is_empty());
        h.record(Path::Legacy, "c:1", Check::Answered);
        h.forget_unused(Path::Legacy, Duration::from_secs(3600));
        assert_eq!(h.known(Path::Legacy), vec!["c:1"]);
        assert_eq!(gauges(), 2);
    }
}
