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

/// Cumulative `(good, bad)` of `sli` on `transport` now. `latency_threshold` (seconds) is
/// rounded down to a bucket of `tcp_comm_packet_latency_seconds` (1.5 s is one).
pub fn read(metrics: &Metrics, transport: Path, sli: Sli, latency_threshold: f64) -> Counts {
    let t = transport.label();
    let m = &metrics.transport;
    let acked =
        counter(&m.ack_received, &[t, "first_try"]) + counter(&m.ack_received, &[t, "after_retry"]);
    let failed = m.ack_timeout.with_label_values(&[t]).get();
    let answered = m
        .latency
        .with_label_values(&[t, "request"])
        .get_sample_count();
    let timed_out = m.request_timeout.with_label_values(&[t]).get();
    match sli {
        Sli::CommandSuccess => Counts {
            good: acked,
            bad: failed,
        },
        Sli::RequestSuccess => Counts {
            good: answered,
            bad: timed_out,
        },
        Sli::CommandLatency => {
            let h = m.latency.with_label_values(&[t, "command"]);
            let total = h.get_sample_count();
            let within = {
                use prometheus::core::Collector as _;
                h.collect()
                    .first()
                    .and_then(|mf| mf.get_metric().first().cloned())
                    .map(|metric| {
                        metric
                            .get_histogram()
                            .get_bucket()
                            .iter()
                            .filter(|b| b.upper_bound() <= latency_threshold + 1e-9)
                            .map(|b| b.cumulative_count())
                            .max()
                            .unwrap_or(0)
                    })
                    .unwrap_or(0)
            };
            Counts {
                good: within.min(total),
                bad: total.saturating_sub(within),
            }
        }
        Sli::PacketLoss => match transport {
            Path::New => {
                let sent = counter(&m.packet_sent, &[t, "sent"]);
                let retx = counter(&m.retransmit, &[t, "ack_timeout"]);
                Counts {
                    good: sent.saturating_sub(retx),
                    bad: retx,
                }
            }
            Path::Legacy => Counts {
                good: acked + answered,
                bad: failed + timed_out,
            },
        },
        Sli::DecodeErrors => {
            let (frames, errors) = metrics.frames_and_decode_errors(transport);
            Counts {
                good: frames.saturating_sub(errors),
                bad: errors,
            }
        }
        Sli::QueueFull => {
            let sent = counter(&m.packet_sent, &[t, "sent"]);
            let full = counter(&m.packet_sent, &[t, "queue_full"])
                + counter(&m.packet_sent, &[t, "rejected"]);
            Counts {
                good: sent,
                bad: full,
            }
        }
        Sli::ParityDrift => match transport {
            Path::New => {
                let p = &metrics.parity;
                let mut c = Counts::default();
                for rt in crate::parity::hub::REQUEST_TYPES {
                    c.good += p.matches.with_label_values(&[rt.name()]).get();
                    for r in crate::parity::Reason::ALL {
                        c.bad += p.drifts.with_label_values(&[rt.name(), r.label()]).get();
                    }
                }
                c
            }
            Path::Legacy => Counts::default(),
        },
    }
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
}

impl Engine {
    /// Adds the events since the last reading of `sli` on `transport` (`cumulative` is the
    /// counter pair now). A counter that went down (a restart, another replica set) starts
    /// over: its whole value is new. The first reading only sets the baseline.
    pub fn observe(&mut self, now: u64, transport: Path, sli: Sli, cumulative: Counts) {
        let k = key(transport, sli);
        let delta = match self.last.get(&k) {
            None => Counts::default(),
            Some(prev) if cumulative.good < prev.good || cumulative.bad < prev.bad => cumulative,
            Some(prev) => Counts {
                good: cumulative.good - prev.good,
                bad: cumulative.bad - prev.bad,
            },
        };
        self.last.insert(k.clone(), cumulative);
        let window = sli.default_objective().window.max(super::MAX_WINDOW);
        self.series
            .entry(k)
            .or_insert_with(|| Series::new(window))
            .record(now, delta);
    }

    /// Reads every SLI of both transports from `metrics` and observes it.
    pub fn observe_metrics(&mut self, now: u64, metrics: &Metrics, latency_threshold: f64) {
        for t in [Path::Legacy, Path::New] {
            for s in Sli::ALL {
                self.observe(now, t, s, read(metrics, t, s, latency_threshold));
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
            read(&m, Path::New, Sli::CommandSuccess, 1.5),
            Counts { good: 98, bad: 2 }
        );
        assert_eq!(
            read(&m, Path::New, Sli::CommandLatency, 1.5),
            Counts { good: 90, bad: 8 }
        );
        // A threshold between buckets rounds down (1.2 s → the 1 s bucket).
        assert_eq!(
            read(&m, Path::New, Sli::CommandLatency, 1.2),
            Counts { good: 90, bad: 8 }
        );
        assert_eq!(
            read(&m, Path::Legacy, Sli::CommandSuccess, 1.5),
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
            read(&m, Path::Legacy, Sli::DecodeErrors, 1.5),
            Counts { good: 1, bad: 1 }
        );
    }

    #[test]
    fn the_engine_takes_deltas_survives_resets_and_finds_a_failing_new_path() {
        let m = Metrics::new(false);
        let mut e = Engine::default();
        e.observe_metrics(T0, &m, 1.5);
        // A minute of healthy traffic on both, then the new path starts failing half its
        // commands.
        for i in 1..=6 {
            acked(&m, "legacy", 100, 5);
            acked(&m, "new", 100, 5);
            e.observe_metrics(T0 + i * 10, &m, 1.5);
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
            e.observe_metrics(T0 + i * 10, &m, 1.5);
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
}
