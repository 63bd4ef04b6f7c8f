//! The SLIs, per transport, as cumulative good/bad counts read from the proxy's own metric
//! families (the same counters a Prometheus scraping every replica sums in fleet mode), and the
//! [`Engine`] that turns successive readings into rolling [`Series`] (reset-aware deltas) and
//! evaluates them.

use super::{Counts, Evaluation, Objective, Series, evaluate};
use crate::metrics::Metrics;
use crate::route::Path;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One service level indicator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sli {
    /// Commands (cloud or backend → device) the device acked; bad: failed after every retry
    /// (legacy: unanswered).
    CommandSuccess,
    /// Device requests their path answered; bad: timed out or given up.
    RequestSuccess,
    /// Acked commands answered within the latency threshold (p99 ≤ threshold ⇔ ≥ 99 % within).
    CommandLatency,
    /// Frames that needed no retransmission (new) / commands and requests answered (legacy);
    /// bad: retransmissions / unanswered.
    PacketLoss,
    /// Frames that decoded cleanly; bad: decode problems.
    DecodeErrors,
    /// Frames handed to a leg; bad: dropped or refused by a full queue.
    QueueFull,
    /// Mirrored requests both paths answered alike; bad: drifts (new path only).
    ParityDrift,
}

impl Sli {
    /// Every SLI.
    pub const ALL: [Sli; 7] = [
        Sli::CommandSuccess,
        Sli::RequestSuccess,
        Sli::CommandLatency,
        Sli::PacketLoss,
        Sli::DecodeErrors,
        Sli::QueueFull,
        Sli::ParityDrift,
    ];

    /// Its name (metric label `slo_name`, config key).
    pub fn name(self) -> &'static str {
        match self {
            Sli::CommandSuccess => "command_success",
            Sli::RequestSuccess => "request_success",
            Sli::CommandLatency => "command_latency",
            Sli::PacketLoss => "packet_loss",
            Sli::DecodeErrors => "decode_errors",
            Sli::QueueFull => "queue_full",
            Sli::ParityDrift => "parity_drift",
        }
    }

    /// The rollout plan's objective (seeds 002 and 003): success 99.9 % over 30 d, p99 ≤ the
    /// threshold over 7 d, loss < 1 % and decode errors < 0.1 % over 24 h, queue full < 1 %
    /// over 1 h, drift ≤ 0.1 % over 1 h.
    pub fn default_objective(self) -> Objective {
        const H: u64 = 3600;
        let (target, window) = match self {
            Sli::CommandSuccess | Sli::RequestSuccess => (0.999, 30 * 24 * H),
            Sli::CommandLatency => (0.99, 7 * 24 * H),
            Sli::PacketLoss => (0.99, 24 * H),
            Sli::DecodeErrors => (0.999, 24 * H),
            Sli::QueueFull => (0.99, H),
            Sli::ParityDrift => (0.999, H),
        };
        Objective { target, window }
    }
}

fn counter(v: &prometheus::IntCounterVec, labels: &[&str]) -> u64 {
    v.with_label_values(labels).get()
}

/// The counters the SLIs are made of, per transport. Locally they are read from the proxy's
/// metric families; in fleet mode each is a PromQL `increase` over a window, summed over
/// every replica ([`Block::promql`]), so both ways give the same SLIs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Block {
    /// Commands the device acked (first try or after retries).
    Acked,
    /// Commands unanswered after every retry.
    Failed,
    /// Device requests answered by their path.
    Answered,
    /// Device requests their path did not answer in time.
    TimedOut,
    /// Commands with a measured latency.
    CommandTotal,
    /// Of those, the ones within the latency threshold.
    CommandWithin,
    /// Of those, the ones acked within `slo.command_timeout`.
    CommandInTime,
    /// Frames handed to a leg.
    Sent,
    /// Frames dropped or refused by a full queue.
    Full,
    /// Commands retransmitted after an ack timeout.
    Retransmits,
    /// Frames decoded.
    Frames,
    /// Decode problems.
    DecodeErrors,
    /// Mirrored requests both paths answered alike.
    ParityMatches,
    /// Mirrored requests whose answers differed.
    ParityDrifts,
}

impl Block {
    /// Every block.
    pub const ALL: [Block; 14] = [
        Block::Acked,
        Block::Failed,
        Block::Answered,
        Block::TimedOut,
        Block::CommandTotal,
        Block::CommandWithin,
        Block::CommandInTime,
        Block::Sent,
        Block::Full,
        Block::Retransmits,
        Block::Frames,
        Block::DecodeErrors,
        Block::ParityMatches,
        Block::ParityDrifts,
    ];

    /// Its name (the `block` label of the fleet query and the recording rules).
    pub fn name(self) -> &'static str {
        match self {
            Block::Acked => "acked",
            Block::Failed => "failed",
            Block::Answered => "answered",
            Block::TimedOut => "timed_out",
            Block::CommandTotal => "command_total",
            Block::CommandWithin => "command_within",
            Block::CommandInTime => "command_in_time",
            Block::Sent => "sent",
            Block::Full => "full",
            Block::Retransmits => "retransmits",
            Block::Frames => "frames",
            Block::DecodeErrors => "decode_errors",
            Block::ParityMatches => "parity_matches",
            Block::ParityDrifts => "parity_drifts",
        }
    }

    /// The metric and matchers it counts (`extra`: more matchers, such as `job="x"`, or
    /// empty); the thresholds pick the latency buckets.
    pub fn selector(self, extra: &str, th: Thresholds) -> String {
        let (metric, own) = match self {
            Block::Acked => (
                "tcp_comm_ack_received_total",
                r#"outcome=~"first_try|after_retry""#.to_owned(),
            ),
            Block::Failed => ("tcp_comm_ack_timeout_total", String::new()),
            Block::Answered => (
                "tcp_comm_packet_latency_seconds_count",
                r#"kind="request""#.to_owned(),
            ),
            Block::TimedOut => ("tcp_comm_request_timeout_total", String::new()),
            Block::CommandTotal => (
                "tcp_comm_packet_latency_seconds_count",
                r#"kind="command""#.to_owned(),
            ),
            Block::CommandWithin => (
                "tcp_comm_packet_latency_seconds_bucket",
                format!(r#"kind="command",le=~"{}""#, le_regex(th.latency)),
            ),
            Block::CommandInTime => (
                "tcp_comm_packet_latency_seconds_bucket",
                format!(r#"kind="command",le=~"{}""#, le_regex(th.command_timeout)),
            ),
            Block::Sent => ("tcp_comm_packet_sent_total", r#"outcome="sent""#.to_owned()),
            Block::Full => (
                "tcp_comm_packet_sent_total",
                r#"outcome=~"queue_full|rejected""#.to_owned(),
            ),
            Block::Retransmits => (
                "tcp_comm_packet_retransmit_total",
                r#"reason="ack_timeout""#.to_owned(),
            ),
            Block::Frames => ("cync_mitm_frames_total", String::new()),
            Block::DecodeErrors => ("cync_mitm_decode_errors_total", String::new()),
            Block::ParityMatches => ("tcp_comm_parity_matches_total", String::new()),
            Block::ParityDrifts => ("tcp_comm_parity_drifts_total", String::new()),
        };
        let m: Vec<&str> = [own.as_str(), extra]
            .into_iter()
            .filter(|m| !m.is_empty())
            .collect();
        if m.is_empty() {
            metric.to_owned()
        } else {
            format!("{metric}{{{}}}", m.join(","))
        }
    }

    /// PromQL for its increase over `window` by transport, summed over every replica. The
    /// parity counters have no transport label: they are the new path's.
    pub fn promql(self, extra: &str, th: Thresholds, window: &str) -> String {
        let inc = format!("increase({}[{window}])", self.selector(extra, th));
        match self {
            Block::ParityMatches | Block::ParityDrifts => {
                format!(r#"label_replace(sum({inc}), "transport", "new", "", "")"#)
            }
            _ => format!("sum by (transport) ({inc})"),
        }
    }
}

/// The latency thresholds of the SLIs, seconds (each rounded down to a bucket of
/// `tcp_comm_packet_latency_seconds`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Thresholds {
    /// `command_latency`: acked within this is on time (`slo.latency_threshold`).
    pub latency: f64,
    /// `command_success`: acked within this is a success (`slo.command_timeout`).
    pub command_timeout: f64,
}

impl Thresholds {
    /// Those of `[slo]`.
    pub fn of(cfg: &crate::config::SloConfig) -> Self {
        Self {
            latency: cfg.latency_threshold.as_secs_f64(),
            command_timeout: cfg.command_timeout.as_secs_f64(),
        }
    }
}

impl Default for Thresholds {
    fn default() -> Self {
        Self::of(&crate::config::SloConfig::default())
    }
}

/// The latency bucket bound a threshold (seconds) rounds down to, as the `le` label regex
/// (`1` and `1.0` both: Prometheus 3 writes integral bounds with `.0`).
pub fn le_regex(latency_threshold: f64) -> String {
    let b = crate::transport::metrics::LATENCY_BUCKETS
        .iter()
        .copied()
        .filter(|b| *b <= latency_threshold + 1e-9)
        .fold(None, |m: Option<f64>, b| Some(m.map_or(b, |m| m.max(b))));
    match b {
        None => "none".to_owned(),
        Some(b) if b.fract() == 0.0 => format!(r"{b}|{b}\\.0"),
        Some(b) => format!("{b}").replace('.', r"\\."),
    }
}

/// One value per [`Block`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Blocks(pub [u64; 14]);

impl Blocks {
    /// A block's value.
    pub fn get(&self, b: Block) -> u64 {
        self.0[b as usize]
    }

    /// Sets a block's value.
    pub fn set(&mut self, b: Block, v: u64) {
        self.0[b as usize] = v;
    }

    /// The cumulative blocks of `transport` in `metrics` now; each threshold is rounded down
    /// to a bucket of `tcp_comm_packet_latency_seconds` (1.5 s and 10 s are ones).
    pub fn read(metrics: &Metrics, transport: Path, th: Thresholds) -> Self {
        let t = transport.label();
        let m = &metrics.transport;
        let cmd = m.latency.with_label_values(&[t, "command"]);
        // The buckets and the count from one snapshot: read apart, an ack landing between them
        // would look late for one reading.
        let (buckets, cmd_total): (Vec<(f64, u64)>, u64) = {
            use prometheus::core::Collector as _;
            cmd.collect()
                .first()
                .and_then(|mf| mf.get_metric().first().cloned())
                .map(|metric| {
                    let h = metric.get_histogram();
                    (
                        h.get_bucket()
                            .iter()
                            .map(|b| (b.upper_bound(), b.cumulative_count()))
                            .collect(),
                        h.get_sample_count(),
                    )
                })
                .unwrap_or_default()
        };
        let within = |secs: f64| {
            buckets
                .iter()
                .filter(|(le, _)| *le <= secs + 1e-9)
                .map(|(_, n)| *n)
                .max()
                .unwrap_or(0)
        };
        let (frames, errors) = metrics.frames_and_decode_errors(transport);
        let (matches, drifts) = match transport {
            Path::New => {
                let p = &metrics.parity;
                let mut c = (0, 0);
                for rt in crate::parity::hub::REQUEST_TYPES {
                    c.0 += p.matches.with_label_values(&[rt.name()]).get();
                    for r in crate::parity::Reason::ALL {
                        c.1 += p.drifts.with_label_values(&[rt.name(), r.label()]).get();
                    }
                }
                c
            }
            Path::Legacy => (0, 0),
        };
        let mut b = Blocks::default();
        for (k, v) in [
            (
                Block::Acked,
                counter(&m.ack_received, &[t, "first_try"])
                    + counter(&m.ack_received, &[t, "after_retry"]),
            ),
            (Block::Failed, m.ack_timeout.with_label_values(&[t]).get()),
            (
                Block::Answered,
                m.latency
                    .with_label_values(&[t, "request"])
                    .get_sample_count(),
            ),
            (
                Block::TimedOut,
                m.request_timeout.with_label_values(&[t]).get(),
            ),
            (Block::CommandTotal, cmd_total),
            (Block::CommandWithin, within(th.latency)),
            (Block::CommandInTime, within(th.command_timeout)),
            (Block::Sent, counter(&m.packet_sent, &[t, "sent"])),
            (
                Block::Full,
                counter(&m.packet_sent, &[t, "queue_full"])
                    + counter(&m.packet_sent, &[t, "rejected"]),
            ),
            (
                Block::Retransmits,
                counter(&m.retransmit, &[t, "ack_timeout"]),
            ),
            (Block::Frames, frames),
            (Block::DecodeErrors, errors),
            (Block::ParityMatches, matches),
            (Block::ParityDrifts, drifts),
        ] {
            b.set(k, v);
        }
        b
    }

    /// `(good, bad)` of `sli` on `transport` from these blocks.
    pub fn counts(&self, transport: Path, sli: Sli) -> Counts {
        let g = |b| self.get(b);
        let (good, bad) = match sli {
            Sli::CommandSuccess => {
                // Acked late counts as failed.
                let late = g(Block::CommandTotal).saturating_sub(g(Block::CommandInTime));
                (
                    g(Block::Acked).saturating_sub(late),
                    g(Block::Failed) + late,
                )
            }
            Sli::RequestSuccess => (g(Block::Answered), g(Block::TimedOut)),
            Sli::CommandLatency => {
                let within = g(Block::CommandWithin).min(g(Block::CommandTotal));
                (within, g(Block::CommandTotal) - within)
            }
            Sli::PacketLoss => match transport {
                Path::New => (
                    g(Block::Sent).saturating_sub(g(Block::Retransmits)),
                    g(Block::Retransmits),
                ),
                Path::Legacy => (
                    g(Block::Acked) + g(Block::Answered),
                    g(Block::Failed) + g(Block::TimedOut),
                ),
            },
            Sli::DecodeErrors => (
                g(Block::Frames).saturating_sub(g(Block::DecodeErrors)),
                g(Block::DecodeErrors),
            ),
            Sli::QueueFull => (g(Block::Sent), g(Block::Full)),
            Sli::ParityDrift => match transport {
                Path::New => (g(Block::ParityMatches), g(Block::ParityDrifts)),
                Path::Legacy => (0, 0),
            },
        };
        Counts { good, bad }
    }
}

/// Cumulative `(good, bad)` of `sli` on `transport` now (see [`Blocks::read`]).
pub fn read(metrics: &Metrics, transport: Path, sli: Sli, th: Thresholds) -> Counts {
    Blocks::read(metrics, transport, th).counts(transport, sli)
}

/// Key of a series: `transport/sli`.
fn key(transport: Path, sli: Sli) -> String {
    format!("{}/{}", transport.label(), sli.name())
}

/// Rolling series of every SLI on both transports, fed with cumulative readings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Engine {
    series: BTreeMap<String, Series>,
    /// The last cumulative reading of each, to take deltas.
    last: BTreeMap<String, Counts>,
    /// The thresholds the readings were classified with (a change re-baselines).
    #[serde(default)]
    thresholds: Option<(f64, f64)>,
}

impl Engine {
    /// Adds the events since the last reading of `sli` on `transport` (`cumulative` is the
    /// counter pair now). Fewer events in all than before (counters that started over: a
    /// restart not announced by [`Self::restarted`]) start over: the whole value is new. The
    /// first reading only sets the baseline.
    pub fn observe(&mut self, now: u64, transport: Path, sli: Sli, cumulative: Counts) {
        let k = key(transport, sli);
        let delta = match self.last.get(&k) {
            None => Counts::default(),
            Some(prev) if cumulative.total() < prev.total() => cumulative,
            Some(prev) => Counts {
                good: cumulative.good.saturating_sub(prev.good),
                bad: cumulative.bad.saturating_sub(prev.bad),
            },
        };
        self.last.insert(k.clone(), cumulative);
        let window = sli.default_objective().window.max(super::MAX_WINDOW);
        self.series
            .entry(k)
            .or_insert_with(|| Series::new(window))
            .record(now, delta);
    }

    /// A new process: its counters start from zero, so the next reading counts everything
    /// since its start (not only what exceeds the last process's totals).
    pub fn restarted(&mut self) {
        for c in self.last.values_mut() {
            *c = Counts::default();
        }
    }

    /// Reads every SLI of both transports from `metrics` and observes it.
    pub fn observe_metrics(&mut self, now: u64, metrics: &Metrics, th: Thresholds) {
        // New thresholds reclassify every past event: take the readings as the new baseline
        // and record nothing this once.
        let key_th = (th.latency, th.command_timeout);
        if self.thresholds.is_some_and(|t| t != key_th) {
            for t in [Path::Legacy, Path::New] {
                let b = Blocks::read(metrics, t, th);
                for s in Sli::ALL {
                    self.last.insert(key(t, s), b.counts(t, s));
                }
            }
            self.thresholds = Some(key_th);
            return;
        }
        self.thresholds = Some(key_th);
        for t in [Path::Legacy, Path::New] {
            let b = Blocks::read(metrics, t, th);
            for s in Sli::ALL {
                self.observe(now, t, s, b.counts(t, s));
            }
        }
    }

    /// Evaluates every series with events against its objective.
    pub fn evaluate(
        &self,
        now: u64,
        objective: impl Fn(Sli) -> Objective,
        min_events: u64,
    ) -> Vec<(Path, Sli, Evaluation)> {
        let mut out = Vec::new();
        for t in [Path::Legacy, Path::New] {
            for s in Sli::ALL {
                if let Some(series) = self.series.get(&key(t, s)) {
                    out.push((t, s, evaluate(series, objective(s), now, min_events)));
                }
            }
        }
        out
    }

    /// Events of `sli` on `transport` over the last `secs` seconds (`None`: never observed).
    pub fn counts(&self, transport: Path, sli: Sli, now: u64, secs: u64) -> Option<Counts> {
        self.series
            .get(&key(transport, sli))
            .map(|s| s.over(now, secs))
    }

    /// Buckets held in all (state size).
    pub fn buckets(&self) -> usize {
        self.series.values().map(Series::buckets).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slo::Verdict;
    use crate::transport::Event;
    use std::time::Duration;
    use uuid::Uuid;

    const T0: u64 = 1_800_000_000;

    fn th(latency: f64) -> Thresholds {
        Thresholds {
            latency,
            command_timeout: 10.0,
        }
    }

    fn acked(m: &Metrics, t: &str, n: u32, latency_ms: u64) {
        for _ in 0..n {
            m.transport.record(
                t,
                &Event::CommandAcked {
                    msg_id: Uuid::nil(),
                    ptype: crate::codec::PacketType::PIPE,
                    latency: Duration::from_millis(latency_ms),
                    retries: 0,
                },
            );
        }
    }

    fn failed(m: &Metrics, t: &str, n: u32) {
        for _ in 0..n {
            m.transport.record(
                t,
                &Event::CommandFailed {
                    msg_id: Uuid::nil(),
                    ptype: crate::codec::PacketType::PIPE,
                },
            );
        }
    }

    #[test]
    fn slis_read_the_transport_metrics() {
        let m = Metrics::new(false);
        acked(&m, "new", 90, 10);
        acked(&m, "new", 8, 2000);
        failed(&m, "new", 2);
        assert_eq!(
            read(&m, Path::New, Sli::CommandSuccess, th(1.5)),
            Counts { good: 98, bad: 2 }
        );
        assert_eq!(
            read(&m, Path::New, Sli::CommandLatency, th(1.5)),
            Counts { good: 90, bad: 8 }
        );
        // A threshold between buckets rounds down (1.2 s → the 1 s bucket).
        assert_eq!(
            read(&m, Path::New, Sli::CommandLatency, th(1.2)),
            Counts { good: 90, bad: 8 }
        );
        assert_eq!(
            read(&m, Path::Legacy, Sli::CommandSuccess, th(1.5)),
            Counts::default(),
            "transports apart"
        );
        m.add_frame(
            Path::Legacy,
            crate::metrics::Flow::DeviceToCloud,
            crate::codec::PacketType::PING,
            None,
        );
        m.add_decode_error(
            Path::Legacy,
            crate::metrics::Flow::DeviceToCloud,
            crate::metrics::DecodeProblem::Checksum,
        );
        m.add_frame(
            Path::Legacy,
            crate::metrics::Flow::CloudToDevice,
            crate::codec::PacketType::PONG,
            None,
        );
        assert_eq!(
            read(&m, Path::Legacy, Sli::DecodeErrors, th(1.5)),
            Counts { good: 1, bad: 1 }
        );
    }

    #[test]
    fn the_engine_takes_deltas_survives_resets_and_finds_a_failing_new_path() {
        let m = Metrics::new(false);
        let mut e = Engine::default();
        e.observe_metrics(T0, &m, th(1.5));
        // A minute of healthy traffic on both, then the new path starts failing half its
        // commands.
        for i in 1..=6 {
            acked(&m, "legacy", 100, 5);
            acked(&m, "new", 100, 5);
            e.observe_metrics(T0 + i * 10, &m, th(1.5));
        }
        let obj = |s: Sli| s.default_objective();
        let v = |e: &Engine, now| {
            e.evaluate(now, obj, 100)
                .into_iter()
                .filter(|(_, s, _)| *s == Sli::CommandSuccess)
                .map(|(t, _, ev)| (t, ev.verdict))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            v(&e, T0 + 60),
            vec![(Path::Legacy, Verdict::Met), (Path::New, Verdict::Met)]
        );
        for i in 7..=12 {
            acked(&m, "legacy", 100, 5);
            acked(&m, "new", 50, 5);
            failed(&m, "new", 50);
            e.observe_metrics(T0 + i * 10, &m, th(1.5));
        }
        assert_eq!(
            v(&e, T0 + 120),
            vec![(Path::Legacy, Verdict::Met), (Path::New, Verdict::Violated)]
        );
        // A counter reset (a restart) is not a negative delta: its value counts as new.
        let mut r = e.clone();
        r.observe(
            T0 + 130,
            Path::Legacy,
            Sli::CommandSuccess,
            Counts { good: 7, bad: 0 },
        );
        let ev = r.evaluate(T0 + 130, obj, 1);
        let legacy = ev
            .iter()
            .find(|(t, s, _)| *t == Path::Legacy && *s == Sli::CommandSuccess)
            .unwrap();
        assert_eq!(legacy.2.counts.good, 1200 + 7);
        // The state round-trips.
        let json = serde_json::to_string(&e).unwrap();
        let back: Engine = serde_json::from_str(&json).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn late_acks_fail_command_success_and_new_thresholds_rebaseline_without_events() {
        let m = Metrics::new(false);
        acked(&m, "new", 90, 10);
        acked(&m, "new", 10, 12_000);
        let strict = Thresholds {
            latency: 1.5,
            command_timeout: 5.0,
        };
        assert_eq!(
            read(&m, Path::New, Sli::CommandSuccess, strict),
            Counts { good: 90, bad: 10 },
            "acked after the command timeout is a failure"
        );
        assert_eq!(
            read(&m, Path::New, Sli::CommandSuccess, th(1.5)),
            Counts { good: 90, bad: 10 },
            "beyond the last finite bucket (10 s) too"
        );
        let mut e = Engine::default();
        e.observe_metrics(T0, &m, strict);
        acked(&m, "new", 50, 10);
        e.observe_metrics(T0 + 10, &m, strict);
        let count = |e: &Engine, now| e.counts(Path::New, Sli::CommandSuccess, now, 3600).unwrap();
        assert_eq!(count(&e, T0 + 10), Counts { good: 50, bad: 0 });
        // Looser thresholds reclassify history: nothing is recorded for the change itself.
        let loose = Thresholds {
            latency: 1.5,
            command_timeout: 10.0,
        };
        e.observe_metrics(T0 + 20, &m, loose);
        assert_eq!(count(&e, T0 + 20), Counts { good: 50, bad: 0 });
        acked(&m, "new", 5, 10);
        e.observe_metrics(T0 + 30, &m, loose);
        assert_eq!(count(&e, T0 + 30), Counts { good: 55, bad: 0 });
        // A restart announced: the new process's counters count from zero.
        let mut r = e.clone();
        r.restarted();
        let fresh = Metrics::new(false);
        acked(&fresh, "new", 3, 10);
        r.observe_metrics(T0 + 40, &fresh, loose);
        assert_eq!(count(&r, T0 + 40), Counts { good: 58, bad: 0 });
        // Without the announcement, more than before would be under-counted; with fewer in all
        // than before it is still taken as a restart.
        let mut u = e.clone();
        u.observe_metrics(T0 + 40, &fresh, loose);
        assert_eq!(count(&u, T0 + 40), Counts { good: 58, bad: 0 });
    }
}
