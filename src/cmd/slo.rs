//! `cync-mitm canary clear-override`, `cync-mitm rollout status|pause|resume` and
//! `cync-mitm slo report|rules`: through the running proxy's admin server when it answers
//! (loopback), else on the SLO state file itself.

use crate::config::Config;
use crate::route::Path;
use crate::slo::State;
use crate::slo::sli::Sli;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The proxy answered with an error.
    #[error("the proxy refused: {0}")]
    Refused(String),
    /// Reading or writing the state file.
    #[error("{0}")]
    State(String),
}

/// Where the proxy's admin server is reached from this machine (`None`: it is off). A
/// wildcard listen address is reached on loopback.
pub fn admin_addr(cfg: &Config) -> Option<SocketAddr> {
    let a = &cfg.admin;
    if !a.enabled {
        return None;
    }
    let mut addr = a.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    Some(addr)
}

/// What an admin call came to.
pub enum Answer {
    /// The proxy answered this JSON with a success status.
    Ok(Value),
    /// Nothing listens there (or it does not answer HTTP).
    Unreachable(String),
}

/// Calls `path` on the admin server (`POST` when `post`).
pub async fn admin_call(addr: SocketAddr, path: &str, post: bool) -> Result<Answer, Error> {
    let t = crate::httpc::Target {
        tls: false,
        host: addr.ip().to_string(),
        port: addr.port(),
        path: path.to_owned(),
    };
    let method = if post {
        hyper::Method::POST
    } else {
        hyper::Method::GET
    };
    match crate::httpc::request(
        &t,
        method,
        &[],
        bytes::Bytes::new(),
        Duration::from_secs(10),
    )
    .await
    {
        Ok((status, body)) => {
            let v: Value = serde_json::from_slice(&body).unwrap_or_else(|_| {
                Value::String(String::from_utf8_lossy(&body).trim().to_owned())
            });
            if status.is_success() {
                Ok(Answer::Ok(v))
            } else {
                Err(Error::Refused(format!(
                    "HTTP {status}: {}",
                    v.get("error").cloned().unwrap_or(v)
                )))
            }
        }
        Err(e) => Ok(Answer::Unreachable(e.to_string())),
    }
}

/// Reads the state file (`Ok(None)`: there is none yet).
pub fn read_state(path: &std::path::Path) -> Result<Option<State>, Error> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Error::State(format!("{}: not an SLO state file: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::State(format!("{}: {e}", path.display()))),
    }
}

/// Changes the state file in place (atomically, 0600) with `f`; returns what `f` returned
/// (an error from `f` leaves the file as it was). Refused while a proxy holds the file (it
/// would write its own state back over the edit).
pub fn edit_state<T>(
    path: &std::path::Path,
    f: impl FnOnce(&mut State) -> Result<T, Error>,
) -> Result<T, Error> {
    let Some(_lock) = crate::proxy::try_lock_slo_state(path) else {
        return Err(Error::State(format!(
            "a running proxy holds {} but its admin server did not answer; change it through \
             the admin server (enable [admin]), or stop the proxy first",
            path.display()
        )));
    };
    let mut s = read_state(path)?.unwrap_or_default();
    let out = f(&mut s)?;
    crate::proxy::save_slo_state(path, &s)
        .map_err(|e| Error::State(format!("{}: {e}", path.display())))?;
    Ok(out)
}

/// Rows of `slo report`: each SLI with its name for people.
const REPORTED: [(Sli, &str); 7] = [
    (Sli::CommandSuccess, "Command success rate"),
    (Sli::RequestSuccess, "Request success rate"),
    (
        Sli::CommandLatency,
        "Command latency (share within the threshold)",
    ),
    (Sli::PacketLoss, "Packet loss (share not retransmitted)"),
    (Sli::DecodeErrors, "Decode errors (share decoded cleanly)"),
    (Sli::QueueFull, "Queue full (share accepted)"),
    (Sli::ParityDrift, "Parity (share of mirrored answers alike)"),
];

fn pct(x: f64) -> String {
    let s = format!("{:.3}", x * 100.0);
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}%")
}

fn date(t: u64) -> String {
    crate::codec::TimeAnswer::from_unix(t as i64, 0).date()
}

/// A rollback found in the decision logs.
#[derive(Debug, PartialEq)]
pub struct Rollback {
    /// When (RFC 3339).
    pub at: String,
    /// `auto` or `manual`.
    pub by: String,
    /// Why.
    pub reason: String,
}

/// The rollbacks logged in `dir`'s `decisions-YYYYMMDD.jsonl` from `since` (`YYYYMMDD`) on.
pub fn rollbacks_in(dir: &std::path::Path, since: &str) -> Vec<Rollback> {
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("decisions-")?.strip_suffix(".jsonl"))
                .is_some_and(|d| d.len() == 8 && d >= since)
        })
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            if let Some(r) = v["action"].get("rollback") {
                out.push(Rollback {
                    at: v["at"].as_str().unwrap_or("?").to_owned(),
                    by: r["by"].as_str().unwrap_or("auto").to_owned(),
                    reason: r["reason"].as_str().unwrap_or("").to_owned(),
                });
            }
        }
    }
    out
}

/// Seed 000's compliance report (Markdown) over the last `days` days to `now`.
pub fn report(cfg: &Config, state: &State, days: u64, now: u64, rollbacks: &[Rollback]) -> String {
    use std::fmt::Write as _;
    let secs = days * 86_400;
    let min = cfg.slo.min_events;
    let mut o = String::new();
    let _ = writeln!(o, "# {days}-Day SLO Compliance Report\n");
    let _ = writeln!(
        o,
        "## Period\nStart: {}\nEnd: {}\n",
        date(now.saturating_sub(secs)),
        date(now)
    );
    let _ = writeln!(o, "## SLO Results\n");
    let mut failing = Vec::new();
    let mut budget_line = None;
    for (sli, name) in REPORTED {
        let target = cfg.slo.objective(sli).target;
        let new = state
            .engine
            .counts(Path::New, sli, now, secs)
            .unwrap_or_default();
        let legacy = state
            .engine
            .counts(Path::Legacy, sli, now, secs)
            .unwrap_or_default();
        let _ = writeln!(o, "### {name}");
        let threshold = if sli == Sli::CommandLatency {
            format!(
                " (p{} ≤ {} ms)",
                (target * 100.0).round(),
                cfg.slo.latency_threshold.as_millis()
            )
        } else {
            String::new()
        };
        let _ = writeln!(o, "- Target: {}{threshold}", pct(target));
        let status = match new.error_ratio() {
            _ if new.total() < min => {
                let _ = writeln!(
                    o,
                    "- Actual (new path): no data ({} events, fewer than {min})",
                    new.total()
                );
                "– NO DATA"
            }
            Some(e) => {
                let actual = 1.0 - e;
                let _ = writeln!(
                    o,
                    "- Actual (new path): {} of {} events",
                    pct(actual),
                    new.total()
                );
                if actual >= target {
                    "✓ PASS"
                } else {
                    failing.push(name);
                    "✗ FAIL"
                }
            }
            None => "– NO DATA",
        };
        if let Some(e) = legacy.error_ratio() {
            let _ = writeln!(o, "- Legacy: {} of {} events", pct(1.0 - e), legacy.total());
        }
        let _ = writeln!(o, "- Status: {status}\n");
        if sli == Sli::CommandSuccess
            && new.total() >= min
            && let Some(e) = new.error_ratio()
        {
            budget_line = Some((1.0 - target, e));
        }
    }
    let _ = writeln!(o, "### Error Budget (command success, new path)");
    let mut budget_left = None;
    match budget_line {
        Some((allowed, consumed)) => {
            let left = crate::slo::budget_remaining(1.0 - allowed, 1.0 - consumed);
            budget_left = Some(left);
            let status = if left <= 0.0 {
                "✗ EXHAUSTED"
            } else if left < cfg.rollout.min_budget {
                "⚠ LOW"
            } else {
                "✓ HEALTHY"
            };
            let _ = writeln!(
                o,
                "- Allowed: {}\n- Consumed: {}\n- Remaining: {}\n- Status: {status}\n",
                pct(allowed),
                pct(consumed),
                pct(left)
            );
        }
        None => {
            let _ = writeln!(o, "- No data: fewer than {min} commands on the new path\n");
        }
    }
    let _ = writeln!(o, "## Rollbacks");
    let _ = writeln!(
        o,
        "- Total: {} in the period (from the decision logs)",
        rollbacks.len()
    );
    for r in rollbacks {
        let _ = writeln!(o, "- {} ({}): {}", r.at, r.by, r.reason);
    }
    match &state.control.rollback {
        Some(ov) => {
            let _ = writeln!(
                o,
                "- In force now: since {} ({}): {}; clear with `cync-mitm canary clear-override`",
                humantime::format_rfc3339_seconds(
                    SystemTime::UNIX_EPOCH + Duration::from_secs(ov.at)
                ),
                ov.by.label(),
                ov.reason
            );
        }
        None => {
            let _ = writeln!(o, "- In force now: none");
        }
    }
    let _ = writeln!(o, "\n## Recommendations");
    if state.control.rollback.is_some() {
        let _ = writeln!(
            o,
            "- Find and fix the cause of the rollback before clearing the override"
        );
    }
    if !failing.is_empty() {
        let _ = writeln!(
            o,
            "- Below target: {}; hold the rollout and investigate",
            failing.join(", ")
        );
    }
    match budget_left {
        Some(b) if b <= 0.0 => {
            let _ = writeln!(
                o,
                "- The error budget is exhausted: freeze the rollout until it recovers"
            );
        }
        Some(b) if b < cfg.rollout.min_budget => {
            let _ = writeln!(o, "- The error budget is low: do not advance the rollout");
        }
        _ => {}
    }
    if failing.is_empty()
        && state.control.rollback.is_none()
        && budget_left.is_some_and(|b| b >= cfg.rollout.min_budget)
    {
        let _ = writeln!(
            o,
            "- Continue current configuration\n- No immediate actions required\n- Schedule quarterly SLO review"
        );
    } else if budget_left.is_none() && failing.is_empty() {
        let _ = writeln!(
            o,
            "- Not enough new-path traffic to judge: keep the canary running"
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slo::Counts;

    const NOW: u64 = 1_800_000_000;

    #[test]
    fn the_report_follows_seed_000() {
        let cfg = Config::default();
        let mut s = State::default();
        // Thirty days of hourly readings: 10,000 commands, 5 failed on the new path.
        for h in 0..=720u64 {
            let t = NOW - 720 * 3600 + h * 3600;
            let n = h * 10_000 / 720;
            let bad = h * 5 / 720;
            s.engine.observe(
                t,
                Path::New,
                Sli::CommandSuccess,
                Counts { good: n - bad, bad },
            );
            s.engine.observe(
                t,
                Path::Legacy,
                Sli::CommandSuccess,
                Counts {
                    good: n * 2,
                    bad: h,
                },
            );
        }
        let rb = [Rollback {
            at: "2026-11-20T10:00:00Z".into(),
            by: "auto".into(),
            reason: "new-path SLOs violated".into(),
        }];
        let r = report(&cfg, &s, 30, NOW, &rb);
        assert!(r.starts_with("# 30-Day SLO Compliance Report\n"), "{r}");
        assert!(r.contains("## Period\nStart: "), "{r}");
        assert!(r.contains("### Command success rate\n- Target: 99.9%\n- Actual (new path): 99.95% of 10000 events"), "{r}");
        assert!(r.contains("- Status: ✓ PASS"), "{r}");
        assert!(
            r.contains("- Allowed: 0.1%\n- Consumed: 0.05%\n- Remaining: 50%\n- Status: ✓ HEALTHY"),
            "{r}"
        );
        assert!(
            r.contains("### Request success rate\n- Target: 99.9%\n- Actual (new path): no data"),
            "{r}"
        );
        assert!(r.contains("- Total: 1 in the period"), "{r}");
        assert!(r.contains("- Continue current configuration"), "{r}");
        // A failing SLO and a spent budget say so.
        s.engine.observe(
            NOW + 10,
            Path::New,
            Sli::CommandSuccess,
            Counts {
                good: 10_000,
                bad: 500,
            },
        );
        let r = report(&cfg, &s, 30, NOW + 10, &[]);
        assert!(r.contains("- Status: ✗ FAIL"), "{r}");
        assert!(r.contains("✗ EXHAUSTED"), "{r}");
        assert!(r.contains("freeze the rollout"), "{r}");
    }

    #[test]
    fn rollbacks_are_read_from_the_decision_logs_of_the_period() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("decisions-20261120.jsonl"),
            "{\"at\":\"2026-11-20T10:00:00Z\",\"action\":{\"rollback\":{\"reason\":\"x\"}}}\nnot json\n{\"at\":\"t\",\"action\":null}\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("decisions-20261001.jsonl"),
            "{\"at\":\"old\",\"action\":{\"rollback\":{\"reason\":\"old\"}}}\n",
        )
        .unwrap();
        let r = rollbacks_in(dir.path(), "20261102");
        assert_eq!(
            r,
            vec![Rollback {
                at: "2026-11-20T10:00:00Z".into(),
                by: "auto".into(),
                reason: "x".into()
            }]
        );
    }

    #[test]
    fn admin_addresses_on_a_wildcard_are_reached_on_loopback() {
        let mut c = Config::default();
        c.admin.listen = "0.0.0.0:9400".parse().unwrap();
        assert_eq!(admin_addr(&c), Some("127.0.0.1:9400".parse().unwrap()));
        c.admin.enabled = false;
        assert_eq!(admin_addr(&c), None);
    }
}

/// What `rollout` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RolloutAction {
    /// Show where it stands.
    Status,
    /// Hold at the current step.
    Pause,
    /// Continue.
    Resume,
}

/// `canary clear-override`: through the running proxy, else on the state file. Returns what
/// to tell the user.
pub async fn clear_override(cfg: &Config) -> Result<String, Error> {
    let mut why = "its admin server is off".to_owned();
    if let Some(addr) = admin_addr(cfg) {
        match admin_call(addr, "/rollback/clear", true).await? {
            Answer::Ok(v) => {
                return Ok(if v["result"] == "cleared" {
                    format!(
                        "rollback override cleared on the proxy at {addr}; routing follows the configuration again (canary {} %)",
                        v["control"]["canary_percent"]
                    )
                } else {
                    format!("the proxy at {addr} had no rollback override in force")
                });
            }
            Answer::Unreachable(e) => why = format!("no proxy answered at {addr} ({e})"),
        }
    }
    let path = &cfg.slo.state_file;
    let cleared = edit_state(path, |s| Ok(crate::slo::control::clear(&mut s.control)))?;
    Ok(match cleared {
        Some(o) => format!(
            "{why}; the override ({}: {}) was removed from {}: a proxy started from it routes by the configuration",
            o.by.label(),
            o.reason,
            path.display()
        ),
        None => format!("{why}; {} holds no rollback override", path.display()),
    })
}

/// `canary rollback`: every device to the legacy path through the running proxy (`POST
/// /rollback`: the override, saved in its state file); with no proxy answering, the override
/// is written to the state file (a proxy started from it routes every device to legacy).
pub async fn rollback(cfg: &Config) -> Result<String, Error> {
    let mut why = "its admin server is off".to_owned();
    if let Some(addr) = admin_addr(cfg) {
        match admin_call(addr, "/rollback", true).await? {
            Answer::Ok(v) => {
                return Ok(if v["result"] == "rolled_back" {
                    format!(
                        "rolled back on the proxy at {addr}: every device to the legacy path until `cync-mitm canary clear-override`"
                    )
                } else {
                    format!("the proxy at {addr} was already rolled back")
                });
            }
            Answer::Unreachable(e) => why = format!("no proxy answered at {addr} ({e})"),
        }
    }
    let path = &cfg.slo.state_file;
    let steps = cfg
        .rollout
        .enabled
        .then(|| cfg.rollout.resolved().unwrap_or_default());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let set = edit_state(path, |s| {
        let before = s.control.rollback.is_some();
        crate::slo::control::rollback(
            &mut s.control,
            steps.as_deref(),
            crate::slo::control::Actor::Manual,
            "cync-mitm canary rollback (no proxy running)".to_owned(),
            now,
        );
        Ok(!before)
    })?;
    Ok(if set {
        format!(
            "{why}; a rollback override was written to {}: a proxy started from it routes every device to legacy",
            path.display()
        )
    } else {
        format!(
            "{why}; {} already holds a rollback override",
            path.display()
        )
    })
}

/// A rollout document (the proxy's `GET /rollout`) in a few lines.
pub fn render_rollout(v: &Value) -> String {
    if v["enabled"] != true {
        return "no rollout: [rollout] enabled is false\n".to_owned();
    }
    let steps: Vec<String> = v["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| s["at"].as_str().unwrap_or("?").to_owned())
        .collect();
    let step = v["step"].as_u64().unwrap_or(0) as usize;
    let path: Vec<String> = steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            if i == step {
                format!("[{s}]")
            } else {
                s.clone()
            }
        })
        .collect();
    let status = &v["status"];
    let state = match status["state"].as_str() {
        Some("baking") => format!("baking, {} s left", status["left_secs"]),
        Some("holding") => format!("holding: {}", status["why"].as_str().unwrap_or("")),
        Some(s) => s.replace('_', " "),
        None => "not evaluated yet".to_owned(),
    };
    let mut o = format!(
        "steps: {}\nstep {} of {}: {}\nstate: {state}{}\n",
        path.join(" → "),
        step + 1,
        steps.len(),
        steps.get(step).map_or("?", String::as_str),
        if v["paused"] == true { " (paused)" } else { "" }
    );
    if let Some(ov) = v["override"].as_object() {
        o.push_str(&format!(
            "rollback override in force since {}: {} (clear with `cync-mitm canary clear-override`)\n",
            ov.get("at").and_then(Value::as_str).unwrap_or("?"),
            ov.get("reason").and_then(Value::as_str).unwrap_or("")
        ));
    }
    if !v["canary_percent"].is_null() {
        o.push_str(&format!(
            "routing now: {} at {} %\n",
            v["mode"].as_str().unwrap_or("?"),
            v["canary_percent"]
        ));
    }
    o
}

/// `rollout status|pause|resume`: through the running proxy, else on the state file. Returns
/// the rollout document (`GET /rollout`'s, or as much of it as the files tell) and a note.
pub async fn rollout(
    cfg: &Config,
    action: RolloutAction,
) -> Result<(Value, Option<String>), Error> {
    let mut why = "its admin server is off".to_owned();
    if let Some(addr) = admin_addr(cfg) {
        let (path, post) = match action {
            RolloutAction::Status => ("/rollout", false),
            RolloutAction::Pause => ("/rollout/pause", true),
            RolloutAction::Resume => ("/rollout/resume", true),
        };
        match admin_call(addr, path, post).await? {
            Answer::Ok(v) => return Ok((v, None)),
            Answer::Unreachable(e) => why = format!("no proxy answered at {addr} ({e})"),
        }
    }
    let r = &cfg.rollout;
    if action != RolloutAction::Status && !r.enabled {
        return Err(Error::Refused(
            "no rollout: [rollout] enabled is false".into(),
        ));
    }
    let path = &cfg.slo.state_file;
    let state = match action {
        RolloutAction::Status => read_state(path)?.unwrap_or_default(),
        RolloutAction::Pause | RolloutAction::Resume => {
            let pause = action == RolloutAction::Pause;
            edit_state(path, |s| {
                if !pause && s.control.rollback.is_some() {
                    return Err(Error::Refused(
                        "a rollback override is in force; clear it first (cync-mitm canary clear-override)".into(),
                    ));
                }
                s.control.rollout.paused = pause;
                s.control.rollout.healthy_since = None;
                Ok(s.clone())
            })?
        }
    };
    let steps = r.resolved().unwrap_or_default();
    let v = serde_json::json!({
        "enabled": r.enabled,
        "step": state.control.rollout.position(&steps),
        "steps": crate::slo::control::steps_report(&steps),
        "paused": state.control.rollout.paused,
        "status": null,
        "override": state.control.rollback.as_ref().map(crate::slo::control::Override::report),
    });
    let note = match action {
        RolloutAction::Status => format!("{why}; read from {}", path.display()),
        _ => format!(
            "{why}; {} was changed: a proxy started from it takes it",
            path.display()
        ),
    };
    Ok((v, Some(note)))
}
