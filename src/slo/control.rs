//! What the SLO evaluations decide, pure: the consecutive-violation count and the automatic
//! rollback (a runtime override of the canary to 0 %), and the progressive rollout's step.
//! Time is passed in; the state is plain data kept in the SLO state file.

use super::sli::Sli;
use super::{Evaluation, Verdict};
use crate::config::Step;
use crate::route::{Mode, Path};
use serde::{Deserialize, Serialize};

/// Who set a rollback override.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Actor {
    /// The SLO engine, after `slo.max_violations` consecutive violations.
    Auto,
    /// `POST /rollback`.
    Manual,
}

impl Actor {
    /// Metrics label (`trigger`).
    pub fn label(self) -> &'static str {
        match self {
            Actor::Auto => "auto",
            Actor::Manual => "manual",
        }
    }
}

/// A rollback in force: every device on the legacy path (canary 0 %, no cohort) until cleared.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Override {
    /// Who set it.
    pub by: Actor,
    /// Why, for people.
    pub reason: String,
    /// When (Unix seconds).
    pub at: u64,
}

impl Override {
    /// As `GET /slo`, `GET /rollout` and the CLI show it.
    pub fn report(&self) -> serde_json::Value {
        serde_json::json!({
            "by": self.by,
            "reason": self.reason,
            "at": humantime::format_rfc3339_seconds(
                std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(self.at)
            )
            .to_string(),
        })
    }
}

/// The steps as `GET /rollout` and the CLI show them.
pub fn steps_report(steps: &[Step]) -> Vec<serde_json::Value> {
    steps
        .iter()
        .map(|s| serde_json::json!({"at": s.label(), "bake_secs": s.bake.as_secs(), "min_budget": s.min_budget}))
        .collect()
}

/// The rollout's progress.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RolloutState {
    /// Index of the current step in `rollout.steps`.
    pub step: usize,
    /// When the current step was entered (Unix seconds; `None` before the rollout started).
    pub entered_at: Option<u64>,
    /// Since when every gate of the step has held without a break (the bake counts from here).
    pub healthy_since: Option<u64>,
    /// Paused by `rollout pause`, or by a rollback.
    pub paused: bool,
    /// The current step's level (shadow 0, else its percentage): a reloaded list of steps is
    /// entered at the highest step not above it, so an edit never skips ahead.
    pub level: Option<f64>,
}

fn level(s: &Step) -> f64 {
    s.percent.unwrap_or(0.0)
}

impl RolloutState {
    /// Where the rollout stands in `steps` (non-empty): the highest step not above its level,
    /// or its index when no level is known.
    pub fn position(&self, steps: &[Step]) -> usize {
        match self.level {
            Some(l) => steps
                .iter()
                .rposition(|s| level(s) <= l + 1e-9)
                .unwrap_or(0),
            None => self.step.min(steps.len().saturating_sub(1)),
        }
    }

    /// Moves to step `i` of `steps`.
    fn set(&mut self, steps: &[Step], i: usize) {
        self.step = i;
        self.level = steps.get(i).map(level);
    }
}

/// Everything the controller keeps between evaluations.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Control {
    /// The rollback in force, if any.
    pub rollback: Option<Override>,
    /// Consecutive evaluations with a new-path SLO violated now.
    pub consecutive: u32,
    /// Rollbacks so far (automatic and manual).
    pub rollbacks: u64,
    /// The progressive rollout.
    pub rollout: RolloutState,
}

/// What an evaluation decided to do.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// The canary was set to 0 % through the override.
    Rollback {
        /// Why.
        reason: String,
    },
    /// The rollout moved to the next step.
    Advance {
        /// The step left.
        from: String,
        /// The step entered.
        to: String,
    },
}

/// Where the rollout stands after an evaluation.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RolloutStatus {
    /// In its step; every gate holds and the bake time is not over.
    Baking {
        /// Seconds of bake left.
        left_secs: u64,
    },
    /// A gate does not hold; the step stays (and its bake starts over once it holds).
    Holding {
        /// Which kind of gate: `violated`, `events`, `budget`.
        gate: &'static str,
        /// Which gate, for people.
        why: String,
    },
    /// Paused (`rollout pause`, or after a rollback).
    Paused,
    /// A rollback override is in force.
    RolledBack,
    /// At the last step.
    Done,
}

/// The rollout's report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RolloutReport {
    /// Index of the step.
    pub step: usize,
    /// `shadow` or `25%`.
    pub at: String,
    /// Steps in all.
    pub steps: usize,
    /// Its state.
    pub status: RolloutStatus,
}

/// An evaluation's inputs to the controller.
pub struct Inputs<'a> {
    /// Unix seconds.
    pub now: u64,
    /// Every SLI of both transports.
    pub evals: &'a [(Path, Sli, Evaluation)],
    /// `slo.max_violations` (0: no automatic rollback).
    pub max_violations: u32,
    /// The rollout's steps when `[rollout]` is enabled.
    pub rollout: Option<&'a [Step]>,
    /// The SLIs that must be met to leave a step (`rollout.gates`).
    pub gates: &'a [Sli],
}

/// What one evaluation decided.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Decision {
    /// New-path SLIs violated now (they count towards the rollback).
    pub violations: Vec<&'static str>,
    /// Consecutive evaluations with a violation, this one included.
    pub consecutive: u32,
    /// What was done.
    pub action: Option<Action>,
    /// The rollout, when enabled.
    pub rollout: Option<RolloutReport>,
}

/// Whether an evaluation is a violation happening now: one of the SRE workbook's burn alerts
/// fires (its long and short windows both hold `min_events` and burn faster than its factor).
/// Compliance below target alone (a budget spent earlier, or one error among few events) holds
/// the rollout but rolls nothing back: a few stray errors are noise, and `max_violations`
/// consecutive evaluations cannot debounce an error that stays in a window for minutes.
pub fn violated_now(e: &Evaluation) -> bool {
    e.verdict == Verdict::Violated && e.burning
}

/// Whether `sli` gates `step`: one of `gates`, where it can have events. In shadow the
/// backend's commands never reach a device (nothing acks them) and the devices' frames are
/// decoded on the legacy path: command success, command latency and decode errors gate the
/// percentage steps only; parity drift gates shadow only (nothing is mirrored afterwards).
fn gates(step: &Step, gates: &[Sli], sli: Sli) -> bool {
    gates.contains(&sli)
        && match sli {
            Sli::ParityDrift => step.percent.is_none(),
            Sli::CommandSuccess | Sli::CommandLatency | Sli::DecodeErrors => step.percent.is_some(),
            Sli::RequestSuccess | Sli::PacketLoss | Sli::QueueFull => true,
        }
}

/// Why `step` may not be left now (`None`: every gate holds): the kind of gate and the words.
fn hold_reason(
    step: &Step,
    gating: &[Sli],
    evals: &[(Path, Sli, Evaluation)],
) -> Option<(&'static str, String)> {
    let new: Vec<&(Path, Sli, Evaluation)> = evals
        .iter()
        .filter(|(t, s, _)| *t == Path::New && gates(step, gating, *s))
        .collect();
    if let Some((_, s, e)) = new.iter().find(|(_, _, e)| e.verdict == Verdict::Violated) {
        return Some((
            "violated",
            format!(
                "{} violated (compliance {})",
                s.name(),
                percent(e.compliance)
            ),
        ));
    }
    let waiting: Vec<String> = new
        .iter()
        .filter(|(_, _, e)| e.verdict == Verdict::Inconclusive)
        .map(|(_, s, e)| format!("{} ({} events)", s.name(), e.counts.total()))
        .collect();
    if !waiting.is_empty() {
        return Some(("events", format!("too few events: {}", waiting.join(", "))));
    }
    if new.is_empty() {
        return Some(("events", "no new-path SLI evaluated yet".to_owned()));
    }
    if let Some((_, s, e)) = new
        .iter()
        .find(|(_, _, e)| e.budget_remaining.is_none_or(|b| b <= step.min_budget))
    {
        return Some((
            "budget",
            format!(
                "{} error budget {} is not above {}",
                s.name(),
                percent(e.budget_remaining),
                percent(Some(step.min_budget))
            ),
        ));
    }
    None
}

fn percent(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".to_owned(), |v| format!("{:.2} %", v * 100.0))
}

/// Runs the controller for one evaluation: counts violations, rolls back after
/// `max_violations` in a row (unless a rollback is in force), and moves the rollout.
pub fn tick(c: &mut Control, i: &Inputs<'_>) -> Decision {
    let violations: Vec<&'static str> = i
        .evals
        .iter()
        .filter(|(t, _, e)| *t == Path::New && violated_now(e))
        .map(|(_, s, _)| s.name())
        .collect();
    c.consecutive = if violations.is_empty() {
        0
    } else {
        c.consecutive.saturating_add(1)
    };
    let consecutive = c.consecutive;
    let mut action = None;
    if i.max_violations > 0 && c.consecutive >= i.max_violations && c.rollback.is_none() {
        let reason = format!(
            "new-path SLOs violated in {} consecutive evaluations: {}",
            c.consecutive,
            violations.join(", ")
        );
        rollback(c, i.rollout, Actor::Auto, reason.clone(), i.now);
        action = Some(Action::Rollback { reason });
    }
    let rollout = i.rollout.filter(|s| !s.is_empty()).map(|steps| {
        let r = &mut c.rollout;
        // Placed by level; a level the list no longer has re-anchors at the step it is placed
        // on, which bakes afresh (a list cut short and restored never skips the steps between).
        let at = r.position(steps);
        if r.level != Some(level(&steps[at])) {
            r.set(steps, at);
            r.healthy_since = None;
            r.entered_at = Some(i.now);
        }
        r.step = at;
        r.entered_at.get_or_insert(i.now);
        let step = steps[r.step];
        let status = if c.rollback.is_some() {
            r.healthy_since = None;
            RolloutStatus::RolledBack
        } else if r.paused {
            r.healthy_since = None;
            RolloutStatus::Paused
        } else if r.step + 1 == steps.len() {
            RolloutStatus::Done
        } else if let Some((gate, why)) = hold_reason(&step, i.gates, i.evals) {
            r.healthy_since = None;
            RolloutStatus::Holding { gate, why }
        } else {
            let since = *r.healthy_since.get_or_insert(i.now);
            let baked = i.now.saturating_sub(since);
            if baked >= step.bake.as_secs() {
                let from = step.label();
                r.set(steps, r.step + 1);
                r.entered_at = Some(i.now);
                r.healthy_since = None;
                let to = steps[r.step].label();
                action.get_or_insert(Action::Advance { from, to });
                if r.step + 1 == steps.len() {
                    RolloutStatus::Done
                } else {
                    RolloutStatus::Baking {
                        left_secs: steps[r.step].bake.as_secs(),
                    }
                }
            } else {
                RolloutStatus::Baking {
                    left_secs: step.bake.as_secs() - baked,
                }
            }
        };
        RolloutReport {
            step: r.step,
            at: steps[r.step].label(),
            steps: steps.len(),
            status,
        }
    });
    Decision {
        violations,
        consecutive,
        action,
        rollout,
    }
}

/// Sets the rollback override (a no-op if one is in force, which keeps the first reason). With
/// a rollout, its step goes back one and it pauses: clearing the override returns the devices
/// to the step before the failing one, and `rollout resume` moves on from there.
pub fn rollback(c: &mut Control, steps: Option<&[Step]>, by: Actor, reason: String, now: u64) {
    if c.rollback.is_some() {
        return;
    }
    c.rollback = Some(Override {
        by,
        reason,
        at: now,
    });
    c.rollbacks += 1;
    c.consecutive = 0;
    if let Some(steps) = steps.filter(|s| !s.is_empty()) {
        let back = c.rollout.position(steps).saturating_sub(1);
        c.rollout.set(steps, back);
        c.rollout.paused = true;
        c.rollout.healthy_since = None;
        c.rollout.entered_at = Some(now);
    }
}

/// Clears the override; returns it (`None`: there was none). Violations count from zero.
pub fn clear(c: &mut Control) -> Option<Override> {
    c.consecutive = 0;
    c.rollback.take()
}

/// The routing the controller imposes over the file and the environment.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Runtime {
    /// A rollback in force: canary 0 % and no cohort.
    pub rollback: Option<Override>,
    /// The rollout's step: its mode and percentage.
    pub rollout: Option<(Mode, f64)>,
}

impl Runtime {
    /// What `c` imposes with the rollout's `steps` (when enabled) in `mode`.
    pub fn of(c: &Control, steps: Option<&[Step]>, mode: Mode) -> Self {
        let rollout =
            steps
                .filter(|s| !s.is_empty())
                .map(|s| match s[c.rollout.position(s)].percent {
                    None => (Mode::Shadow, 100.0),
                    Some(p) => (mode, p),
                });
        Self {
            rollback: c.rollback.clone(),
            rollout,
        }
    }

    /// Applies it to the file's (and environment's) routing.
    pub fn apply(&self, r: &mut crate::config::RoutingConfig) {
        if let Some((mode, p)) = self.rollout {
            r.mode = mode;
            r.canary_percent = p;
        }
        if self.rollback.is_some() {
            r.canary_percent = 0.0;
            r.cohort.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slo::{Burn, Counts, Objective};
    use std::time::Duration;

    fn eval(verdict: Verdict, bad_5m: u64, budget: f64) -> Evaluation {
        let b = |window, bad| Burn {
            window,
            counts: Counts { good: 1000, bad },
            rate: Some(0.0),
        };
        Evaluation {
            objective: Objective {
                target: 0.999,
                window: 86_400,
            },
            counts: Counts { good: 1000, bad: 0 },
            compliance: Some(1.0),
            budget_remaining: Some(budget),
            burns: vec![(b(3600, bad_5m), b(300, bad_5m), 14.4)],
            // Errors in the test's windows burn (as a real evaluation's would at this rate).
            burning: verdict == Verdict::Violated && bad_5m > 0,
            verdict,
        }
    }

    fn all(verdict: Verdict, bad_5m: u64, budget: f64) -> Vec<(Path, Sli, Evaluation)> {
        Sli::ALL
            .iter()
            .flat_map(|s| {
                [
                    (Path::New, *s, eval(verdict, bad_5m, budget)),
                    (Path::Legacy, *s, eval(Verdict::Met, 0, 1.0)),
                ]
            })
            .collect()
    }

    fn steps() -> Vec<Step> {
        [None, Some(10.0), Some(50.0), Some(100.0)]
            .into_iter()
            .map(|percent| Step {
                percent,
                bake: Duration::from_secs(60),
                min_budget: 0.25,
            })
            .collect()
    }

    fn inputs<'a>(
        now: u64,
        evals: &'a [(Path, Sli, Evaluation)],
        steps: Option<&'a [Step]>,
    ) -> Inputs<'a> {
        Inputs {
            now,
            evals,
            max_violations: 3,
            rollout: steps,
            gates: &Sli::ALL,
        }
    }

    #[test]
    fn rolls_back_after_max_violations_in_a_row_only() {
        let bad = all(Verdict::Violated, 5, 0.0);
        let ok = all(Verdict::Met, 0, 1.0);
        let mut c = Control::default();
        assert!(tick(&mut c, &inputs(0, &bad, None)).action.is_none());
        assert!(tick(&mut c, &inputs(10, &bad, None)).action.is_none());
        // A healthy evaluation breaks the run.
        assert_eq!(tick(&mut c, &inputs(20, &ok, None)).consecutive, 0);
        tick(&mut c, &inputs(30, &bad, None));
        tick(&mut c, &inputs(40, &bad, None));
        let d = tick(&mut c, &inputs(50, &bad, None));
        assert!(matches!(d.action, Some(Action::Rollback { .. })), "{d:?}");
        assert_eq!(c.rollbacks, 1);
        assert_eq!(c.rollback.as_ref().map(|o| o.by), Some(Actor::Auto));
        // Still violated: no second rollback while the first is in force.
        for t in 6..12 {
            assert!(tick(&mut c, &inputs(t * 10, &bad, None)).action.is_none());
        }
        assert_eq!(c.rollbacks, 1);
        assert!(clear(&mut c).is_some());
        assert!(c.rollback.is_none());
        assert!(clear(&mut c).is_none());
        // Cleared while still burning: counted from zero again, rolled back again.
        assert!(tick(&mut c, &inputs(200, &bad, None)).action.is_none());
        assert!(tick(&mut c, &inputs(210, &bad, None)).action.is_none());
        assert!(tick(&mut c, &inputs(220, &bad, None)).action.is_some());
        assert_eq!(c.rollbacks, 2);
    }

    #[test]
    fn a_stray_error_below_target_without_a_burn_alert_is_not_a_violation_now() {
        // Compliance below target (one error among few events) with errors in the last five
        // minutes, but no burn alert: noise, never a rollback however long it lasts.
        let mut e = eval(Verdict::Violated, 1, 0.0);
        e.burning = false;
        let stray: Vec<_> = Sli::ALL
            .iter()
            .map(|s| (Path::New, *s, e.clone()))
            .collect();
        let mut c = Control::default();
        for t in 0..40 {
            let d = tick(&mut c, &inputs(t * 10, &stray, None));
            assert!(d.violations.is_empty() && d.action.is_none(), "{d:?}");
        }
    }

    #[test]
    fn an_old_spent_budget_without_new_errors_is_not_a_violation_now() {
        let spent = all(Verdict::Violated, 0, 0.0);
        let mut c = Control::default();
        for t in 0..10 {
            let d = tick(&mut c, &inputs(t * 10, &spent, None));
            assert!(d.violations.is_empty() && d.action.is_none(), "{d:?}");
        }
        // A burn alert counts even with no error in the short window's last bucket.
        let mut burning = eval(Verdict::Violated, 0, 0.0);
        burning.burning = true;
        assert!(violated_now(&burning));
        // Legacy violations never roll the new path back.
        let legacy: Vec<_> = all(Verdict::Met, 0, 1.0)
            .into_iter()
            .map(|(t, s, e)| {
                if t == Path::Legacy {
                    (t, s, eval(Verdict::Violated, 9, 0.0))
                } else {
                    (t, s, e)
                }
            })
            .collect();
        let mut c = Control::default();
        for t in 0..5 {
            assert!(tick(&mut c, &inputs(t, &legacy, None)).action.is_none());
        }
        // max_violations 0: never.
        let bad = all(Verdict::Violated, 5, 0.0);
        let mut c = Control::default();
        for t in 0..5 {
            let mut i = inputs(t, &bad, None);
            i.max_violations = 0;
            assert!(tick(&mut c, &i).action.is_none());
        }
    }

    #[test]
    fn the_rollout_bakes_advances_holds_and_rolls_back() {
        let s = steps();
        let ok = all(Verdict::Met, 0, 1.0);
        let mut c = Control::default();
        let d = tick(&mut c, &inputs(1000, &ok, Some(&s)));
        assert_eq!(
            d.rollout.as_ref().map(|r| &r.status),
            Some(&RolloutStatus::Baking { left_secs: 60 })
        );
        assert_eq!(
            Runtime::of(&c, Some(&s), Mode::NewPrimary).rollout,
            Some((Mode::Shadow, 100.0))
        );
        let d = tick(&mut c, &inputs(1060, &ok, Some(&s)));
        assert_eq!(
            d.action,
            Some(Action::Advance {
                from: "shadow".into(),
                to: "10%".into()
            })
        );
        assert_eq!(
            Runtime::of(&c, Some(&s), Mode::NewPrimary).rollout,
            Some((Mode::NewPrimary, 10.0))
        );
        // Inconclusive holds, and the bake starts over.
        tick(&mut c, &inputs(1070, &ok, Some(&s)));
        let few = all(Verdict::Inconclusive, 0, 1.0);
        let d = tick(&mut c, &inputs(1100, &few, Some(&s)));
        assert!(
            matches!(&d.rollout.as_ref().unwrap().status, RolloutStatus::Holding { why, .. } if why.contains("too few events")),
            "{d:?}"
        );
        let d = tick(&mut c, &inputs(1110, &ok, Some(&s)));
        assert_eq!(
            d.rollout.unwrap().status,
            RolloutStatus::Baking { left_secs: 60 },
            "the bake counts from the end of the hold"
        );
        // A budget at or below min_budget holds.
        let low = all(Verdict::Met, 0, 0.2);
        let d = tick(&mut c, &inputs(1200, &low, Some(&s)));
        assert!(
            matches!(&d.rollout.as_ref().unwrap().status, RolloutStatus::Holding { why, .. } if why.contains("budget")),
            "{d:?}"
        );
        // Parity drift does not gate a percentage step (nothing is mirrored there).
        let mut no_parity = ok.clone();
        for (t, s, e) in &mut no_parity {
            if *t == Path::New && *s == Sli::ParityDrift {
                e.verdict = Verdict::Inconclusive;
            }
        }
        tick(&mut c, &inputs(1210, &no_parity, Some(&s)));
        let d = tick(&mut c, &inputs(1270, &no_parity, Some(&s)));
        assert!(matches!(d.action, Some(Action::Advance { .. })), "{d:?}");
        assert_eq!(c.rollout.step, 2);
        // Violations: hold, then roll back; the step goes back one and the rollout pauses.
        let bad = all(Verdict::Violated, 5, 0.0);
        let d = tick(&mut c, &inputs(1280, &bad, Some(&s)));
        assert!(matches!(
            d.rollout.unwrap().status,
            RolloutStatus::Holding { .. }
        ));
        tick(&mut c, &inputs(1290, &bad, Some(&s)));
        let d = tick(&mut c, &inputs(1300, &bad, Some(&s)));
        assert!(matches!(d.action, Some(Action::Rollback { .. })));
        assert_eq!(d.rollout.unwrap().status, RolloutStatus::RolledBack);
        assert_eq!(c.rollout.step, 1);
        assert!(c.rollout.paused);
        let rt = Runtime::of(&c, Some(&s), Mode::NewPrimary);
        let mut r = crate::config::RoutingConfig {
            cohort: vec!["1234".into()],
            ..Default::default()
        };
        rt.apply(&mut r);
        assert_eq!((r.mode, r.canary_percent), (Mode::NewPrimary, 0.0));
        assert!(r.cohort.is_empty(), "a rollback takes the cohort off too");
        // Cleared: back at the step before the failing one, paused until resumed.
        clear(&mut c);
        let d = tick(&mut c, &inputs(1310, &ok, Some(&s)));
        assert_eq!(d.rollout.unwrap().status, RolloutStatus::Paused);
        assert_eq!(
            Runtime::of(&c, Some(&s), Mode::NewPrimary).rollout,
            Some((Mode::NewPrimary, 10.0))
        );
        c.rollout.paused = false;
        tick(&mut c, &inputs(1320, &ok, Some(&s)));
        tick(&mut c, &inputs(1380, &ok, Some(&s)));
        tick(&mut c, &inputs(1390, &ok, Some(&s)));
        let d = tick(&mut c, &inputs(1450, &ok, Some(&s)));
        assert_eq!(c.rollout.step, 3);
        assert_eq!(d.rollout.unwrap().status, RolloutStatus::Done);
        // Fewer steps in a reloaded config: the highest step not above the one reached, where
        // the rollout re-anchors: restoring the list does not skip the steps between.
        let two = &s[..2];
        let d = tick(&mut c, &inputs(1460, &ok, Some(two)));
        assert_eq!(d.rollout.unwrap().step, 1);
        assert_eq!(c.rollout.level, Some(10.0));
        let d = tick(&mut c, &inputs(1470, &ok, Some(&s)));
        assert_eq!(d.rollout.unwrap().at, "10%", "back at 10 %, to bake again");
        // Steps edited under a rollout at 10 % never skip ahead: [shadow, 5, 50, 100] resumes
        // at 5 % (not index 1's old meaning, nor beyond), [shadow, 50, 100] at shadow.
        let mut c = Control::default();
        c.rollout.set(&s, 1);
        let mut more = s.clone();
        more[1].percent = Some(5.0);
        let d = tick(&mut c, &inputs(2000, &ok, Some(&more)));
        assert_eq!(d.rollout.unwrap().at, "5%");
        let three = [s[0], s[2], s[3]];
        let d = tick(&mut c, &inputs(2010, &ok, Some(&three)));
        assert_eq!(d.rollout.unwrap().at, "shadow");
        // An unchanged list keeps its place and bake.
        let mut c = Control::default();
        c.rollout.set(&s, 2);
        tick(&mut c, &inputs(3000, &ok, Some(&s)));
        let d = tick(&mut c, &inputs(3030, &ok, Some(&s)));
        assert_eq!(
            d.rollout.unwrap().status,
            RolloutStatus::Baking { left_secs: 30 }
        );
    }

    #[test]
    fn the_state_round_trips_through_json() {
        let mut c = Control::default();
        rollback(&mut c, None, Actor::Manual, "test".into(), 5);
        c.rollout.step = 2;
        let j = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<Control>(&j).unwrap(), c);
        assert_eq!(
            serde_json::from_str::<Control>("{}").unwrap(),
            Control::default()
        );
    }
}
