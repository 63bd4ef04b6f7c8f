//! The SLO engine's arithmetic, pure: time is passed in (seconds since the Unix epoch), nothing
//! here reads a clock, a file or a socket.
//!
//! - [`Series`]: good and bad event counts in rolling buckets at two resolutions: fine (10 s
//!   buckets over the last 6 h, for the burn-rate windows) and coarse (1 h buckets over the SLO
//!   window, up to 31 days), so 30 days cost a few thousand buckets, not one entry per event.
//! - [`Objective`]: a target ratio of good events over a window (a latency objective such as
//!   "p99 ≤ 1.5 s" is "99 % of commands answered within 1.5 s").
//! - [`evaluate`]: compliance, the error budget left (seed 002's formula), the multi-window burn
//!   rates of the SRE workbook (1 h and 5 m at 14.4×, 6 h and 30 m at 6×), and a verdict that is
//!   `Inconclusive` below `min_events`, so noise never rolls anything back.
//!
//! A `Series` serialises (serde) so its state survives a restart.

pub mod control;
pub mod prom;
pub mod sli;

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// What the SLO state file holds: the rolling series and the controller's state (the rollback
/// override, the violation count, the rollout's step).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// The series.
    #[serde(flatten)]
    pub engine: sli::Engine,
    /// The controller.
    #[serde(default)]
    pub control: control::Control,
}

/// Width of a fine bucket, seconds.
pub const FINE_SECS: u64 = 10;
/// How far back fine buckets reach, seconds (the longest burn-rate window).
pub const FINE_SPAN: u64 = 6 * 3600;
/// Width of a coarse bucket, seconds.
pub const COARSE_SECS: u64 = 3600;
/// How far back coarse buckets reach at most, seconds.
pub const MAX_WINDOW: u64 = 31 * 86_400;

/// Good and bad events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Events that met the objective.
    pub good: u64,
    /// Events that did not.
    pub bad: u64,
}

impl Counts {
    /// All events.
    pub fn total(&self) -> u64 {
        self.good.saturating_add(self.bad)
    }

    /// bad ÷ total, `None` without events.
    pub fn error_ratio(&self) -> Option<f64> {
        let t = self.total();
        (t > 0).then(|| self.bad as f64 / t as f64)
    }

    fn add(&mut self, o: Counts) {
        self.good = self.good.saturating_add(o.good);
        self.bad = self.bad.saturating_add(o.bad);
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(into = "(u64, u64, u64)", from = "BucketRepr")]
struct Bucket {
    /// Start, seconds since the epoch (a multiple of the width).
    start: u64,
    counts: Counts,
}

/// A bucket in the state file: `[start, good, bad]` (tens of thousands of them: a third of the
/// bytes of an object each); the object form of earlier files is read too.
#[derive(Deserialize)]
#[serde(untagged)]
enum BucketRepr {
    Compact(u64, u64, u64),
    Object { start: u64, counts: Counts },
}

impl From<Bucket> for (u64, u64, u64) {
    fn from(b: Bucket) -> Self {
        (b.start, b.counts.good, b.counts.bad)
    }
}

impl From<BucketRepr> for Bucket {
    fn from(r: BucketRepr) -> Self {
        match r {
            BucketRepr::Compact(start, good, bad) => Bucket {
                start,
                counts: Counts { good, bad },
            },
            BucketRepr::Object { start, counts } => Bucket { start, counts },
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Ring {
    width: u64,
    span: u64,
    buckets: VecDeque<Bucket>,
}

impl Ring {
    fn new(width: u64, span: u64) -> Self {
        Self {
            width: width.max(1),
            span: span.max(width.max(1)),
            buckets: VecDeque::new(),
        }
    }

    fn record(&mut self, now: u64, c: Counts) {
        let start = now - now % self.width;
        match self.buckets.back_mut() {
            Some(b) if b.start == start => b.counts.add(c),
            // A clock that stepped back: count it in the newest bucket rather than reorder.
            Some(b) if b.start > start => b.counts.add(c),
            _ => self.buckets.push_back(Bucket { start, counts: c }),
        }
        self.expire(now);
    }

    fn expire(&mut self, now: u64) {
        let oldest = now.saturating_sub(self.span + self.width);
        while self.buckets.front().is_some_and(|b| b.start < oldest) {
            self.buckets.pop_front();
        }
    }

    /// Events in buckets that overlap the last `secs` before `now`.
    fn sum(&self, now: u64, secs: u64) -> Counts {
        let from = now.saturating_sub(secs);
        let mut c = Counts::default();
        for b in self.buckets.iter().rev() {
            if b.start + self.width <= from {
                break;
            }
            if b.start <= now {
                c.add(b.counts);
            }
        }
        c
    }
}

/// Rolling good/bad counts of one SLI.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Series {
    fine: Ring,
    coarse: Ring,
}

impl Default for Series {
    fn default() -> Self {
        Self::new(MAX_WINDOW)
    }
}

impl Series {
    /// A series that remembers `window` seconds (at most [`MAX_WINDOW`]).
    pub fn new(window: u64) -> Self {
        Self {
            fine: Ring::new(FINE_SECS, FINE_SPAN),
            coarse: Ring::new(COARSE_SECS, window.clamp(COARSE_SECS, MAX_WINDOW)),
        }
    }

    /// Adds events seen at `now`.
    pub fn record(&mut self, now: u64, c: Counts) {
        if c.total() == 0 {
            self.expire(now);
            return;
        }
        self.fine.record(now, c);
        self.coarse.record(now, c);
    }

    /// Drops what is older than the series remembers.
    pub fn expire(&mut self, now: u64) {
        self.fine.expire(now);
        self.coarse.expire(now);
    }

    /// Events in the last `secs` seconds: from fine buckets up to 6 h (10 s resolution),
    /// coarse beyond (1 h resolution).
    pub fn over(&self, now: u64, secs: u64) -> Counts {
        if secs <= FINE_SPAN {
            self.fine.sum(now, secs)
        } else {
            self.coarse.sum(now, secs)
        }
    }

    /// Buckets held (for state-size reports).
    pub fn buckets(&self) -> usize {
        self.fine.buckets.len() + self.coarse.buckets.len()
    }
}

/// An objective: at least `target` of events good over `window` seconds.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Objective {
    /// Share of good events required, below 1 (0.999 = 99.9 %).
    pub target: f64,
    /// Compliance window, seconds.
    pub window: u64,
}

/// A burn-rate alert of the SRE workbook: both windows burn faster than `factor`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct BurnAlert {
    /// Long window, seconds.
    pub long: u64,
    /// Short window, seconds.
    pub short: u64,
    /// Burn-rate threshold.
    pub factor: f64,
}

/// The workbook's two alerts: 1 h and 5 m at 14.4× (2 % of a 30-day budget in an hour), 6 h and
/// 30 m at 6× (5 % in six hours).
pub const BURN_ALERTS: [BurnAlert; 2] = [
    BurnAlert {
        long: 3600,
        short: 300,
        factor: 14.4,
    },
    BurnAlert {
        long: 6 * 3600,
        short: 1800,
        factor: 6.0,
    },
];

/// What an evaluation concluded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Enough events, within the objective and no burn alert.
    Met,
    /// A burn alert fired, or the window's compliance is below target.
    Violated,
    /// Too few events to tell.
    Inconclusive,
}

/// One burn-rate window's figures.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Burn {
    /// The window, seconds.
    pub window: u64,
    /// Events in it.
    pub counts: Counts,
    /// error ratio ÷ allowed error ratio (`None` without events).
    pub rate: Option<f64>,
}

/// An evaluation, with its inputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// The objective evaluated.
    pub objective: Objective,
    /// Events over the compliance window.
    pub counts: Counts,
    /// good ÷ total over the window.
    pub compliance: Option<f64>,
    /// Share of the error budget left over the window, 0–1 (seed 002:
    /// `max(0, 1 − actual error ÷ allowed error)`).
    pub budget_remaining: Option<f64>,
    /// Each alert's long and short windows.
    pub burns: Vec<(Burn, Burn, f64)>,
    /// Whether a burn alert fired (both its windows above its factor).
    pub burning: bool,
    /// The verdict.
    pub verdict: Verdict,
}

/// Error budget left: `max(0, 1 − actual error ÷ allowed error)`; an objective of 100 % has no
/// budget (0).
pub fn budget_remaining(target: f64, success: f64) -> f64 {
    let allowed = 1.0 - target;
    if allowed <= 0.0 {
        return 0.0;
    }
    let actual = 1.0 - success;
    (1.0 - actual / allowed).clamp(0.0, 1.0)
}

/// Evaluates `series` against `objective` at `now`; fewer than `min_events` in a window say
/// nothing about it (its burn rate does not count, and with too few over the compliance window
/// the verdict is `Inconclusive`).
pub fn evaluate(series: &Series, objective: Objective, now: u64, min_events: u64) -> Evaluation {
    evaluate_counts(|w| series.over(now, w), objective, min_events)
}

/// [`evaluate`] on counts from elsewhere: `over(window)` gives the events of the last
/// `window` seconds (fleet mode reads them from Prometheus).
pub fn evaluate_counts(
    over: impl Fn(u64) -> Counts,
    objective: Objective,
    min_events: u64,
) -> Evaluation {
    let allowed = (1.0 - objective.target).max(f64::MIN_POSITIVE);
    let burn = |window: u64| {
        let counts = over(window);
        Burn {
            window,
            counts,
            rate: counts.error_ratio().map(|e| e / allowed),
        }
    };
    let mut burning = false;
    let mut burns = Vec::new();
    for a in BURN_ALERTS {
        let (l, s) = (burn(a.long), burn(a.short));
        let fires = [l, s]
            .iter()
            .all(|b| b.counts.total() >= min_events.max(1) && b.rate.is_some_and(|r| r > a.factor));
        burning |= fires;
        burns.push((l, s, a.factor));
    }
    let counts = over(objective.window);
    let compliance = counts
        .total()
        .gt(&0)
        .then(|| counts.good as f64 / counts.total() as f64);
    let budget = compliance.map(|c| budget_remaining(objective.target, c));
    let verdict = if counts.total() < min_events.max(1) {
        Verdict::Inconclusive
    } else if burning || compliance.is_some_and(|c| c < objective.target) {
        Verdict::Violated
    } else {
        Verdict::Met
    };
    Evaluation {
        objective,
        counts,
        compliance,
        budget_remaining: budget,
        burns,
        burning,
        verdict,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_800_000_000;
    const DAY: u64 = 86_400;

    fn c(good: u64, bad: u64) -> Counts {
        Counts { good, bad }
    }

    fn success_999() -> Objective {
        Objective {
            target: 0.999,
            window: 30 * DAY,
        }
    }

    #[test]
    fn buckets_are_stored_compactly_and_old_files_still_read() {
        let mut s = Series::new(86_400);
        s.record(T0, c(5, 1));
        let j = serde_json::to_string(&s).unwrap();
        assert!(j.contains(&format!("[{},5,1]", T0)), "{j}");
        assert_eq!(serde_json::from_str::<Series>(&j).unwrap(), s);
        let old = j.replace(
            &format!("[{},5,1]", T0),
            &format!("{{\"start\":{T0},\"counts\":{{\"good\":5,\"bad\":1}}}}"),
        );
        assert_ne!(old, j);
        assert_eq!(serde_json::from_str::<Series>(&old).unwrap(), s);
    }

    #[test]
    fn the_budget_follows_seed_002() {
        assert_eq!(budget_remaining(0.999, 1.0), 1.0);
        assert!((budget_remaining(0.999, 0.9995) - 0.5).abs() < 1e-9);
        assert_eq!(budget_remaining(0.999, 0.999), 0.0);
        assert_eq!(budget_remaining(0.999, 0.5), 0.0, "never negative");
        assert_eq!(budget_remaining(1.0, 1.0), 0.0, "100 % has no budget");
    }

    #[test]
    fn few_events_are_inconclusive_never_a_violation() {
        let mut s = Series::default();
        s.record(T0, c(0, 5));
        let e = evaluate(&s, success_999(), T0, 100);
        assert_eq!(e.verdict, Verdict::Inconclusive);
        assert!(!e.burning, "5 failures are noise below min_events");
        assert_eq!(e.compliance, Some(0.0));
        s.record(T0 + 1, c(0, 95));
        assert_eq!(
            evaluate(&s, success_999(), T0 + 1, 100).verdict,
            Verdict::Violated
        );
    }

    #[test]
    fn a_fast_burn_needs_both_windows_and_stops_when_the_short_one_recovers() {
        let o = success_999();
        let mut s = Series::default();
        // Two hours of clean traffic: 100 events every 10 s.
        for i in 0..720 {
            s.record(T0 + i * 10, c(100, 0));
        }
        let now = T0 + 7200;
        assert_eq!(evaluate(&s, o, now, 100).verdict, Verdict::Met);
        // Five minutes at 2 % errors: 20× the allowed 0.1 % in the short window, less over the
        // hour.
        for i in 0..30 {
            s.record(now + i * 10, c(98, 2));
        }
        let now = now + 300;
        let e = evaluate(&s, o, now, 100);
        let (long, short, factor) = e.burns[0];
        assert_eq!(factor, 14.4);
        assert!(short.rate.unwrap() > 14.4, "{short:?}");
        // The hour: 60 of 360 buckets burning at 20× → about 3.3×: no page yet.
        assert!(long.rate.unwrap() < 14.4, "{long:?}");
        assert!(!e.burning);
        // Twenty more minutes of it: the hour crosses 14.4× too.
        for i in 0..150 {
            s.record(now + i * 10, c(70, 30));
        }
        let now = now + 1500;
        let e = evaluate(&s, o, now, 100);
        assert!(e.burning, "{:?}", e.burns);
        assert_eq!(e.verdict, Verdict::Violated);
        // It stops: five clean minutes bring the short window down, the alert resets even though
        // the hour still burns.
        for i in 0..31 {
            s.record(now + i * 10, c(100, 0));
        }
        let now = now + 310;
        let e = evaluate(&s, o, now, 100);
        let (long, short, _) = e.burns[0];
        assert!(long.rate.unwrap() > 14.4);
        assert!(short.rate.unwrap() < 1.0, "{short:?}");
        assert!(!e.burns.is_empty());
        assert!(
            !(long.rate.unwrap() > 14.4 && short.rate.unwrap() > 14.4),
            "the fast alert reset"
        );
    }

    #[test]
    fn the_budget_runs_out_over_the_window_and_comes_back_as_it_rolls() {
        let o = Objective {
            target: 0.99,
            window: DAY,
        };
        let mut s = Series::new(DAY);
        // 1,000 events an hour for a day, 2 % bad: the budget (1 %) is exhausted.
        for h in 0..24 {
            s.record(T0 + h * 3600, c(980, 20));
        }
        let now = T0 + 23 * 3600;
        let e = evaluate(&s, o, now, 100);
        assert_eq!(e.budget_remaining, Some(0.0));
        assert_eq!(e.verdict, Verdict::Violated);
        // A clean day later the bad hours have rolled out of the window (a bucket counts while
        // any of it is inside).
        for h in 24..48 {
            s.record(T0 + h * 3600, c(1000, 0));
        }
        let now = T0 + 48 * 3600;
        let e = evaluate(&s, o, now, 100);
        assert_eq!(e.counts.bad, 0, "{:?}", e.counts);
        assert_eq!(e.budget_remaining, Some(1.0));
        assert_eq!(e.verdict, Verdict::Met);
    }

    #[test]
    fn memory_is_bounded_over_thirty_days_and_the_state_round_trips() {
        let mut s = Series::default();
        // 31 days, an event batch every 10 s.
        let mut now = T0;
        while now < T0 + 31 * DAY {
            s.record(now, c(10, 1));
            now += 10;
        }
        let fine = (FINE_SPAN / FINE_SECS) as usize;
        let coarse = (MAX_WINDOW / COARSE_SECS) as usize;
        assert!(s.buckets() <= fine + coarse + 4, "{} buckets", s.buckets());
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.len() < 400_000, "{} bytes of state", json.len());
        let back: Series = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        let o = success_999();
        assert_eq!(evaluate(&back, o, now, 1), evaluate(&s, o, now, 1));
        // 30 days of it at 1 in 11 bad.
        let e = evaluate(&s, o, now, 1);
        assert!((e.compliance.unwrap() - 10.0 / 11.0).abs() < 1e-3);
    }

    #[test]
    fn windows_roll_over_at_bucket_edges() {
        let mut s = Series::default();
        s.record(T0, c(1, 0));
        s.record(T0 + 9, c(1, 0));
        s.record(T0 + 10, c(0, 1));
        // Within 5 minutes of T0 + 10: all three.
        assert_eq!(s.over(T0 + 10, 300), c(2, 1));
        // 300 s later the first bucket has left the 5-minute window; the second has not.
        assert_eq!(s.over(T0 + 310, 300), c(0, 1));
        assert_eq!(s.over(T0 + 320, 300), c(0, 0));
        // The coarse ring still has them for the long windows.
        assert_eq!(s.over(T0 + 3 * 3600 + 7 * 3600, 12 * 3600), c(2, 1));
        // A clock that steps back counts in the newest bucket.
        s.record(T0 + 5, c(0, 1));
        assert_eq!(s.over(T0 + 10, 300), c(2, 2));
    }
}
