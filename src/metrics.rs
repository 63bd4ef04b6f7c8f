//! Prometheus metrics of the proxy. Names start with `cync_mitm_`; the transport metrics
//! (`crate::transport::metrics`) use the rollout plan's `tcp_comm_*` names. Hot-path counters are resolved
//! once per label set, so counting a frame is one atomic add.

use crate::codec::PacketType;
use crate::route::Path;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// The SLO engine's gauges, by transport and SLI (`slo_name`); unknown values are NaN.
#[derive(Clone)]
pub struct SloMetrics {
    /// Good ÷ all events over the objective's window.
    pub compliance: IntGaugeVecF,
    /// Share of the error budget left over the window.
    pub budget: IntGaugeVecF,
    /// Burn rate by window (`5m`, `30m`, `1h`, `6h`).
    pub burn: IntGaugeVecF,
    /// 1 met, 0 inconclusive, −1 violated.
    pub verdict: IntGaugeVecF,
    /// Evaluations run.
    pub evaluations: IntCounter,
    /// Rollbacks, by trigger (`auto`, `manual`).
    pub rollbacks: IntCounterVec,
    /// 1 while a rollback override holds the canary at 0 %.
    pub rollback_active: IntGauge,
    /// Consecutive evaluations with a new-path SLO violated.
    pub consecutive: IntGauge,
    /// The rollout's step index (−1: no rollout).
    pub rollout_step: IntGauge,
    /// Rollback webhook deliveries by result (`ok`, `error`, `dropped`).
    pub webhook: IntCounterVec,
    /// Evaluations whose SLIs could not be read (fleet mode: Prometheus unreachable or wrong).
    pub source_errors: IntCounter,
    /// Decision-log lines not written (queue full, or the file could not be written).
    pub log_dropped: IntCounter,
}

/// A float gauge family.
pub type IntGaugeVecF = prometheus::GaugeVec;

/// Burn-rate window labels, by seconds.
pub const BURN_WINDOWS: [(u64, &str); 4] =
    [(300, "5m"), (1800, "30m"), (3600, "1h"), (21_600, "6h")];

impl SloMetrics {
    fn register(r: &Registry) -> Self {
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = prometheus::GaugeVec::new(Opts::new(name, help), labels)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            r.register(Box::new(g.clone()))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            g
        };
        let m = Self {
            compliance: gauge(
                "tcp_comm_slo_compliance",
                "Good events over all events in the objective's window, by transport and SLI (NaN before any).",
                &["transport", "slo_name"],
            ),
            budget: gauge(
                "tcp_comm_error_budget_remaining",
                "Share of the error budget left in the objective's window, 0-1 (NaN before any event).",
                &["transport", "slo_name"],
            ),
            burn: gauge(
                "tcp_comm_slo_burn_rate",
                "Error ratio over the allowed one, by transport, SLI and window (NaN without events).",
                &["transport", "slo_name", "window"],
            ),
            verdict: gauge(
                "tcp_comm_slo_verdict",
                "The last evaluation: 1 met, 0 inconclusive, -1 violated.",
                &["transport", "slo_name"],
            ),
            evaluations: counter(r, "cync_mitm_slo_evaluations_total", "SLO evaluations run."),
            rollbacks: counter_vec(
                r,
                "tcp_comm_rollbacks_total",
                "Rollbacks of the canary to 0 %, by trigger (auto: SLO violations; manual: POST /rollback).",
                &["trigger"],
            ),
            rollback_active: int_gauge(
                r,
                "cync_mitm_rollback_override",
                "1 while a rollback override holds every device on the legacy path.",
            ),
            consecutive: int_gauge(
                r,
                "cync_mitm_slo_consecutive_violations",
                "Consecutive evaluations with a new-path SLO violated now.",
            ),
            rollout_step: int_gauge(
                r,
                "cync_mitm_rollout_step",
                "Index of the progressive rollout's current step (-1: no rollout).",
            ),
            webhook: counter_vec(
                r,
                "cync_mitm_rollback_webhook_total",
                "Rollback webhook deliveries by result (ok, error after every retry, dropped when too many are in flight).",
                &["result"],
            ),
            source_errors: counter(
                r,
                "cync_mitm_slo_source_errors_total",
                "Evaluations skipped because the SLIs could not be read (fleet mode: Prometheus).",
            ),
            log_dropped: counter(
                r,
                "cync_mitm_slo_decision_log_dropped_total",
                "SLO decision-log lines not written (queue full or a write error).",
            ),
        };
        for t in ["auto", "manual"] {
            m.rollbacks.with_label_values(&[t]);
        }
        for t in ["ok", "error", "dropped"] {
            m.webhook.with_label_values(&[t]);
        }
        m.rollout_step.set(-1);
        for t in [Path::Legacy, Path::New] {
            for s in crate::slo::sli::Sli::ALL {
                let l = [t.label(), s.name()];
                m.compliance.with_label_values(&l).set(f64::NAN);
                m.budget.with_label_values(&l).set(f64::NAN);
                m.verdict.with_label_values(&l).set(0.0);
                for (_, w) in BURN_WINDOWS {
                    m.burn
                        .with_label_values(&[t.label(), s.name(), w])
                        .set(f64::NAN);
                }
            }
        }
        m
    }

    /// Publishes an evaluation.
    pub fn publish(&self, t: Path, s: crate::slo::sli::Sli, e: &crate::slo::Evaluation) {
        let l = [t.label(), s.name()];
        self.compliance
            .with_label_values(&l)
            .set(e.compliance.unwrap_or(f64::NAN));
        self.budget
            .with_label_values(&l)
            .set(e.budget_remaining.unwrap_or(f64::NAN));
        self.verdict.with_label_values(&l).set(match e.verdict {
            crate::slo::Verdict::Met => 1.0,
            crate::slo::Verdict::Inconclusive => 0.0,
            crate::slo::Verdict::Violated => -1.0,
        });
        for (long, short, _) in &e.burns {
            for b in [long, short] {
                if let Some((_, w)) = BURN_WINDOWS.iter().find(|(secs, _)| *secs == b.window) {
                    self.burn
                        .with_label_values(&[t.label(), s.name(), w])
                        .set(b.rate.unwrap_or(f64::NAN));
                }
            }
        }
    }
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).unwrap_or_else(|e| panic!("{name}: {e}"));
    r.register(Box::new(c.clone()))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    c
}

fn int_gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).unwrap_or_else(|e| panic!("{name}: {e}"));
    r.register(Box::new(g.clone()))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    g
}

fn path_index(p: Path) -> usize {
    match p {
        Path::Legacy => 0,
        Path::New => 1,
    }
}

/// Which way bytes flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Flow {
    /// Device (or app) to cloud.
    DeviceToCloud,
    /// Cloud to device (or app).
    CloudToDevice,
}

impl Flow {
    /// Label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::DeviceToCloud => "device_to_cloud",
            Self::CloudToDevice => "cloud_to_device",
        }
    }

    fn index(self) -> usize {
        match self {
            Self::DeviceToCloud => 0,
            Self::CloudToDevice => 1,
        }
    }
}

/// Kinds of decode problem (label `kind` of `cync_mitm_decode_errors_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DecodeProblem {
    /// A header declared more than `limits.max_frame`.
    TooLarge,
    /// Bytes skipped while resynchronising.
    Skipped,
    /// A whole frame whose body does not fit its type's layout.
    Frame,
    /// A pipe frame whose inner frame is malformed.
    Inner,
    /// An inner frame with a wrong checksum.
    Checksum,
    /// A frame of a type nobody has named.
    UnknownType,
}

impl DecodeProblem {
    /// Label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::TooLarge => "too_large",
            Self::Skipped => "skipped",
            Self::Frame => "frame",
            Self::Inner => "inner",
            Self::Checksum => "checksum",
            Self::UnknownType => "unknown_type",
        }
    }

    const ALL: [Self; 6] = [
        Self::TooLarge,
        Self::Skipped,
        Self::Frame,
        Self::Inner,
        Self::Checksum,
        Self::UnknownType,
    ];

    fn index(self) -> usize {
        Self::ALL.iter().position(|p| *p == self).unwrap_or(0)
    }
}

/// Every reason a session ends (label `reason` of `cync_mitm_connections_closed_total`).
pub const CLOSE_REASONS: [&str; 12] = [
    "device_closed",
    "cloud_closed",
    "idle",
    "replaced",
    "shutdown",
    "drained",
    "device_error",
    "cloud_error",
    "cloud_down",
    "new_path_down",
    "handshake_rejected",
    "local_error",
];

/// Device TLS handshake failure reasons created at start. Others are OpenSSL's own reason
/// strings (a bounded set), lower-cased with `_` for spaces.
pub const HANDSHAKE_REASONS: [&str; 7] = [
    "timeout",
    "eof",
    "closed",
    "wrong_version_number",
    "no_shared_cipher",
    "http_request",
    "unsupported_protocol",
];

/// Results of upstream connection attempts (label `result` of
/// `cync_mitm_upstream_connects_total`).
pub const UPSTREAM_RESULTS: [&str; 8] = [
    "ok",
    "connect_error",
    "timeout",
    "tls_error",
    "pin_mismatch",
    "no_original_dst",
    "no_address",
    "local_error",
];

/// All proxy metrics and their registry.
pub struct Metrics {
    registry: Registry,
    /// Connections accepted, by listener.
    pub accepted: IntCounterVec,
    /// Connections refused at accept, by reason.
    pub rejected: IntCounterVec,
    /// The `tcp_comm_*` transport families.
    pub transport: crate::transport::metrics::TransportMetrics,
    /// The parity families (`tcp_comm_parity_*`).
    pub parity: crate::parity::hub::ParityMetrics,
    /// The SLO engine's gauges.
    pub slo: SloMetrics,
    /// Accept errors (the loop backs off and goes on).
    pub accept_errors: IntCounter,
    /// Open connections by peer kind.
    pub active: IntGaugeVec,
    /// Connections closed, by transport and reason.
    pub closed: IntCounterVec,
    /// Sessions relayed now, by transport (after the upstream answered).
    pub sessions_active: IntGaugeVec,
    /// Device TLS handshake failures, by reason.
    pub handshake_failures: IntCounterVec,
    /// Connections that never produced a first frame, by reason.
    pub first_frame_failures: IntCounterVec,
    /// Upstream connection attempts, by transport and result.
    pub upstream_connects: IntCounterVec,
    /// Upstream connect (TCP + TLS) time, by transport.
    pub upstream_connect_seconds: prometheus::HistogramVec,
    /// Session lifetime.
    pub session_seconds: Histogram,
    /// Config reloads, by result (`ok`, `unchanged`, `error`).
    pub config_reloads: IntCounterVec,
    /// Generation of the config in use.
    pub config_generation: IntGauge,
    /// The canary percentage in use.
    pub canary_percentage: prometheus::Gauge,
    /// Routing decisions, by primary transport (`legacy`, `new`).
    pub routing_decisions: IntCounterVec,
    /// new_primary connections that fell back to legacy because the new path was unreachable.
    pub new_path_fallbacks: IntCounter,
    /// Upstream health by path and address (1 up, 0 down).
    pub upstream_up_v: IntGaugeVec,
    /// Admin connections closed at accept because `admin.max_connections` were open.
    pub admin_rejected: IntCounter,
    /// Decoded frames put on the console's stream.
    pub console_events: IntCounter,
    /// Console stream events not delivered, by reason.
    pub console_dropped: IntCounterVec,
    /// Console streams open.
    pub console_streams: IntGauge,
    /// 1 while an operator's drain (`POST /drain`) is under way or done, else 0.
    pub draining: IntGauge,
    /// Capture chunks dropped because the writer's queue was full.
    pub capture_dropped: IntCounter,
    /// Capture writes skipped because their file failed (disk full, unwritable folder).
    pub capture_dropped_error: IntCounter,
    /// Capture failures, by kind.
    pub capture_errors: IntCounterVec,
    /// Bytes written to capture files.
    pub capture_written_bytes: IntCounter,
    /// Capture files opened.
    pub capture_files: IntCounter,
    /// Capture files deleted by retention.
    pub capture_deleted: IntCounter,
    /// By transport (legacy, new), then direction.
    bytes: [[IntCounter; 2]; 2],
    frames: [[Vec<IntCounter>; 2]; 2],
    decode_errors: [[Vec<IntCounter>; 2]; 2],
    device_frames: Option<IntCounterVec>,
    devices: std::sync::Mutex<DeviceSeries>,
}

/// How long a device's series outlive its last connection.
pub const DEVICE_SERIES_LINGER: std::time::Duration = std::time::Duration::from_secs(600);

/// Which devices have per-device series: `None` while connected, else when it left.
struct DeviceSeries {
    max: usize,
    seen: std::collections::HashMap<String, Option<std::time::Instant>>,
    last_sweep: std::time::Instant,
}

/// Registers a counter family (panics only on a programming error: a bad or duplicate name).
pub(crate) fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let v =
        IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| panic!("{name}: {e}"));
    r.register(Box::new(v.clone()))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    v
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    r.register(Box::new(h.clone()))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    h
}

impl Metrics {
    /// Registers every metric. Panics only on a programming error (duplicate or invalid names),
    /// which the unit tests catch.
    pub fn new(per_device_labels: bool) -> Self {
        Self::with_device_limit(per_device_labels, 1000)
    }

    /// As [`Metrics::new`], with at most `max_devices` devices having per-device series.
    pub fn with_device_limit(per_device_labels: bool, max_devices: usize) -> Self {
        let r = Registry::new();
        let accepted = counter_vec(
            &r,
            "cync_mitm_connections_accepted_total",
            "Connections accepted, by listener.",
            &["listener"],
        );
        let rejected = counter_vec(
            &r,
            "cync_mitm_connections_rejected_total",
            "Connections refused at accept, by reason.",
            &["reason"],
        );
        let accept_errors = IntCounter::new(
            "cync_mitm_accept_errors_total",
            "Errors from accept(); the listener backs off and continues.",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        r.register(Box::new(accept_errors.clone()))
            .unwrap_or_else(|e| panic!("{e}"));
        let active = IntGaugeVec::new(
            Opts::new(
                "cync_mitm_connections_active",
                "Open connections by peer kind.",
            ),
            &["peer"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        r.register(Box::new(active.clone()))
            .unwrap_or_else(|e| panic!("{e}"));
        let closed = counter_vec(
            &r,
            "cync_mitm_connections_closed_total",
            "Connections closed, by transport and reason.",
            &["transport", "reason"],
        );
        let sessions_active = IntGaugeVec::new(
            Opts::new(
                "cync_mitm_sessions_active",
                "Sessions being relayed now, by transport.",
            ),
            &["transport"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        r.register(Box::new(sessions_active.clone()))
            .unwrap_or_else(|e| panic!("{e}"));
        let handshake_failures = counter_vec(
            &r,
            "cync_mitm_handshake_failures_total",
            "Device TLS handshake failures, by reason.",
            &["reason"],
        );
        let first_frame_failures = counter_vec(
            &r,
            "cync_mitm_first_frame_failures_total",
            "Connections closed before a first whole frame, by reason.",
            &["reason"],
        );
        let upstream_connects = counter_vec(
            &r,
            "cync_mitm_upstream_connects_total",
            "Upstream connection attempts, by transport and result.",
            &["transport", "result"],
        );
        let upstream_connect_seconds = prometheus::HistogramVec::new(
            HistogramOpts::new(
                "cync_mitm_upstream_connect_seconds",
                "Upstream TCP+TLS connect time, by transport.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["transport"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        r.register(Box::new(upstream_connect_seconds.clone()))
            .unwrap_or_else(|e| panic!("{e}"));
        let session_seconds = histogram(
            &r,
            "cync_mitm_session_duration_seconds",
            "How long relayed sessions lasted.",
            vec![1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 21600.0, 86400.0],
        );
        let config_reloads = counter_vec(
            &r,
            "cync_mitm_config_reloads_total",
            "Config reloads, by result.",
            &["result"],
        );
        let config_generation = IntGauge::new(
            "cync_mitm_config_generation",
            "Generation of the configuration in use (1 at start).",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        r.register(Box::new(config_generation.clone()))
            .unwrap_or_else(|e| panic!("{e}"));
        let canary_percentage = prometheus::Gauge::new(
            "tcp_comm_canary_percentage",
            "Share of devices selected for the new path (routing.canary_percent).",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        r.register(Box::new(canary_percentage.clone()))
            .unwrap_or_else(|e| panic!("{e}"));
        let routing_decisions = counter_vec(
            &r,
            "tcp_comm_routing_decision_total",
            "Routing decisions at connect, by primary transport.",
            &["transport"],
        );
        let new_path_fallbacks = IntCounter::new(
            "cync_mitm_new_path_fallbacks_total",
            "new_primary connections relayed to legacy because the new path was unreachable.",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        r.register(Box::new(new_path_fallbacks.clone()))
            .unwrap_or_else(|e| panic!("{e}"));
        for t in ["legacy", "new"] {
            routing_decisions.with_label_values(&[t]);
        }
        for res in ["ok", "unchanged", "error"] {
            config_reloads.with_label_values(&[res]);
        }
        let simple = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).unwrap_or_else(|e| panic!("{name}: {e}"));
            r.register(Box::new(c.clone()))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            c
        };
        let capture_dropped_v = counter_vec(
            &r,
            "cync_mitm_capture_dropped_total",
            "Capture chunks not written, by reason: the capture queue was full (the relay never waits), or their file had failed.",
            &["reason"],
        );
        let capture_dropped = capture_dropped_v.with_label_values(&["queue_full"]);
        let capture_dropped_error = capture_dropped_v.with_label_values(&["error"]);
        let capture_errors = counter_vec(
            &r,
            "cync_mitm_capture_errors_total",
            "Capture failures (the relay is unaffected), by kind: open (folder or file), write (write or flush).",
            &["kind"],
        );
        for k in ["open", "write"] {
            capture_errors.with_label_values(&[k]);
        }
        let capture_written_bytes = simple(
            "cync_mitm_capture_written_bytes_total",
            "Bytes written to capture files (counted once flushed to the file).",
        );
        let capture_files = simple("cync_mitm_capture_files_total", "Capture files opened.");
        let upstream_up_v = IntGaugeVec::new(
            Opts::new(
                "cync_mitm_upstream_up",
                "Upstream health by path and address: 1 when it answered (or a probe reached it) recently with no failure since, else 0.",
            ),
            &["path", "address"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        r.register(Box::new(upstream_up_v.clone()))
            .unwrap_or_else(|e| panic!("{e}"));
        let admin_rejected = simple(
            "cync_mitm_admin_rejected_total",
            "Admin connections closed at accept because admin.max_connections were open.",
        );
        let console_events = simple(
            "cync_mitm_console_events_total",
            "Decoded frames put on the web console's live stream (only while a stream is open).",
        );
        let console_dropped = counter_vec(
            &r,
            "cync_mitm_console_events_dropped_total",
            "Console stream events not delivered (the relay never waits for the console), by reason: rate (above admin.console_max_events_per_second), slow_client (a stream fell behind its buffer).",
            &["reason"],
        );
        for k in ["rate", "slow_client"] {
            console_dropped.with_label_values(&[k]);
        }
        let console_streams = int_gauge(
            &r,
            "cync_mitm_console_streams",
            "Web console event streams (GET /api/events) open.",
        );
        let draining = int_gauge(
            &r,
            "cync_mitm_draining",
            "1 once an operator's drain (POST /drain, cync-mitm drain) has begun: not ready, not accepting, sessions being closed.",
        );
        let capture_deleted = simple(
            "cync_mitm_capture_files_deleted_total",
            "Capture files deleted by retention.",
        );
        let bytes_v = counter_vec(
            &r,
            "cync_mitm_bytes_total",
            "Bytes relayed, by transport and direction.",
            &["transport", "direction"],
        );
        let frames_v = counter_vec(
            &r,
            "cync_mitm_frames_total",
            "Frames decoded, by transport, direction and packet type.",
            &["transport", "direction", "type"],
        );
        let dec_v = counter_vec(
            &r,
            "cync_mitm_decode_errors_total",
            "Decode problems (the bytes are still relayed), by transport, direction and kind.",
            &["transport", "direction", "kind"],
        );
        let device_frames = per_device_labels.then(|| {
            counter_vec(
                &r,
                "cync_mitm_device_frames_total",
                "Frames by device and direction (metrics.per_device_labels).",
                &["device_id", "direction"],
            )
        });
        let flows = [Flow::DeviceToCloud, Flow::CloudToDevice];
        let paths = [Path::Legacy, Path::New];
        let bytes =
            paths.map(|t| flows.map(|f| bytes_v.with_label_values(&[t.label(), f.label()])));
        let frames = paths.map(|t| {
            flows.map(|f| {
                (0..=255u8)
                    .map(|p| {
                        frames_v.with_label_values(&[t.label(), f.label(), PacketType(p).name()])
                    })
                    .collect()
            })
        });
        let decode_errors = paths.map(|t| {
            flows.map(|f| {
                DecodeProblem::ALL
                    .iter()
                    .map(|p| dec_v.with_label_values(&[t.label(), f.label(), p.label()]))
                    .collect()
            })
        });
        for peer in ["device", "app", "unknown", "pending"] {
            active.with_label_values(&[peer]).set(0);
        }
        // Every known label value exists from the start, so rate() and absent-series alerts
        // work before the first event.
        for l in ["tls", "plain"] {
            accepted.with_label_values(&[l]);
        }
        rejected.with_label_values(&["limit"]);
        for t in paths {
            for reason in CLOSE_REASONS {
                closed.with_label_values(&[t.label(), reason]);
            }
            for result in UPSTREAM_RESULTS {
                upstream_connects.with_label_values(&[t.label(), result]);
            }
            upstream_connect_seconds.with_label_values(&[t.label()]);
            sessions_active.with_label_values(&[t.label()]).set(0);
        }
        for reason in HANDSHAKE_REASONS {
            handshake_failures.with_label_values(&[reason]);
        }
        for reason in ["timeout", "eof", "error"] {
            first_frame_failures.with_label_values(&[reason]);
        }
        let build_info = IntGaugeVec::new(
            Opts::new(
                "cync_mitm_build_info",
                "The running build: version and git commit (value 1).",
            ),
            &["version", "commit"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        r.register(Box::new(build_info.clone()))
            .unwrap_or_else(|e| panic!("{e}"));
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), env!("CYNC_MITM_COMMIT")])
            .set(1);
        let process = prometheus::process_collector::ProcessCollector::for_self();
        r.register(Box::new(process))
            .unwrap_or_else(|e| panic!("{e}"));
        let transport = crate::transport::metrics::TransportMetrics::register(&r);
        let parity = crate::parity::hub::ParityMetrics::register(&r);
        let slo = SloMetrics::register(&r);
        Self {
            registry: r,
            accepted,
            rejected,
            accept_errors,
            active,
            closed,
            sessions_active,
            handshake_failures,
            first_frame_failures,
            upstream_connects,
            upstream_connect_seconds,
            session_seconds,
            config_reloads,
            config_generation,
            canary_percentage,
            routing_decisions,
            new_path_fallbacks,
            transport,
            parity,
            slo,
            upstream_up_v,
            admin_rejected,
            console_events,
            console_dropped,
            console_streams,
            draining,
            capture_dropped,
            capture_dropped_error,
            capture_errors,
            capture_written_bytes,
            capture_files,
            capture_deleted,
            bytes,
            frames,
            decode_errors,
            device_frames,
            devices: std::sync::Mutex::new(DeviceSeries {
                max: max_devices,
                seen: std::collections::HashMap::new(),
                last_sweep: std::time::Instant::now(),
            }),
        }
    }

    /// Sets the health gauge of an upstream address.
    pub fn upstream_up(&self, path: &str, address: &str, up: bool) {
        self.upstream_up_v
            .with_label_values(&[path, address])
            .set(i64::from(up));
    }

    /// Drops the `cync_mitm_upstream_up` series of an address no longer tracked.
    pub fn remove_upstream_up(&self, path: &str, address: &str) {
        let _ = self.upstream_up_v.remove_label_values(&[path, address]);
    }

    /// Counts one capture failure of `kind`.
    pub fn capture_error(&self, kind: &str) {
        self.capture_errors.with_label_values(&[kind]).inc();
    }

    /// Counts relayed bytes.
    pub fn add_bytes(&self, path: Path, flow: Flow, n: usize) {
        self.bytes[path_index(path)][flow.index()].inc_by(n as u64);
    }

    /// Counts a session that ended on `path` for `reason` (a `CLOSE_REASONS` label).
    pub fn close(&self, path: Path, reason: &str) {
        self.closed.with_label_values(&[path.label(), reason]).inc();
    }

    /// Sessions closed for `reason`, both transports.
    pub fn closed_count(&self, reason: &str) -> u64 {
        [Path::Legacy, Path::New]
            .iter()
            .map(|t| self.closed.with_label_values(&[t.label(), reason]).get())
            .sum()
    }

    /// Counts an upstream connect attempt of `path` with `result` (an `UPSTREAM_RESULTS` label).
    pub fn upstream_connect(&self, path: Path, result: &str) {
        self.upstream_connects
            .with_label_values(&[path.label(), result])
            .inc();
    }

    /// Upstream connects with `result`, both transports.
    pub fn upstream_connect_count(&self, result: &str) -> u64 {
        [Path::Legacy, Path::New]
            .iter()
            .map(|t| {
                self.upstream_connects
                    .with_label_values(&[t.label(), result])
                    .get()
            })
            .sum()
    }

    /// Counts one decoded frame.
    pub fn add_frame(&self, path: Path, flow: Flow, ptype: PacketType, device: Option<&str>) {
        if let Some(c) = self.frames[path_index(path)][flow.index()].get(usize::from(ptype.0)) {
            c.inc();
        }
        if let (Some(v), Some(d)) = (&self.device_frames, device) {
            {
                let mut g = self.devices.lock().unwrap_or_else(|p| p.into_inner());
                let (len, max) = (g.seen.len(), g.max);
                match g.seen.get_mut(d) {
                    Some(e) => *e = None,
                    None if len >= max => return,
                    None => {
                        g.seen.insert(d.to_owned(), None);
                    }
                }
            }
            v.with_label_values(&[d, flow.label()]).inc();
        }
    }

    /// A device's connection ended: its per-device series go once it has been away for
    /// [`DEVICE_SERIES_LINGER`] (checked at most once a minute, here).
    pub fn device_gone(&self, device: &str) {
        self.sweep_devices(device, std::time::Instant::now());
    }

    fn sweep_devices(&self, gone: &str, now: std::time::Instant) {
        let Some(v) = &self.device_frames else { return };
        let mut g = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = g.seen.get_mut(gone) {
            *e = Some(now);
        }
        if now.duration_since(g.last_sweep) < std::time::Duration::from_secs(60) {
            return;
        }
        g.last_sweep = now;
        let old: Vec<String> = g
            .seen
            .iter()
            .filter(|(_, t)| t.is_some_and(|t| now.duration_since(t) >= DEVICE_SERIES_LINGER))
            .map(|(d, _)| d.clone())
            .collect();
        for d in old {
            g.seen.remove(&d);
            for f in [Flow::DeviceToCloud, Flow::CloudToDevice] {
                let _ = v.remove_label_values(&[&d, f.label()]);
            }
        }
    }

    /// Devices with per-device series now.
    pub fn device_series(&self) -> usize {
        self.devices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .seen
            .len()
    }

    /// Counts one decode problem.
    pub fn add_decode_error(&self, path: Path, flow: Flow, p: DecodeProblem) {
        if let Some(c) = self.decode_errors[path_index(path)][flow.index()].get(p.index()) {
            c.inc();
        }
    }

    /// Current value of a decode-error counter, both transports (tests and reports).
    pub fn decode_errors(&self, flow: Flow, p: DecodeProblem) -> u64 {
        self.decode_errors
            .iter()
            .map(|t| t[flow.index()].get(p.index()).map_or(0, IntCounter::get))
            .sum()
    }

    /// Current frame count of a type and direction.
    pub fn frames(&self, flow: Flow, ptype: PacketType) -> u64 {
        self.frames
            .iter()
            .map(|t| {
                t[flow.index()]
                    .get(usize::from(ptype.0))
                    .map_or(0, IntCounter::get)
            })
            .sum()
    }

    /// Frames (both directions, every type) and decode problems (every kind) on one transport.
    pub fn frames_and_decode_errors(&self, path: Path) -> (u64, u64) {
        let t = path_index(path);
        let mut frames = 0;
        for f in &self.frames[t] {
            // Unknown types share one series: count it once.
            for p in PacketType::ALL_KNOWN.iter().map(|p| p.0).chain([0u8]) {
                frames += f.get(usize::from(p)).map_or(0, IntCounter::get);
            }
        }
        let errors = self.decode_errors[t]
            .iter()
            .flat_map(|f| f.iter())
            .map(IntCounter::get)
            .sum();
        (frames, errors)
    }

    /// Frames of a type and direction on one transport.
    pub fn frames_on(&self, path: Path, flow: Flow, ptype: PacketType) -> u64 {
        self.frames[path_index(path)][flow.index()]
            .get(usize::from(ptype.0))
            .map_or(0, IntCounter::get)
    }

    /// Bytes relayed in a direction.
    pub fn bytes(&self, flow: Flow) -> u64 {
        self.bytes
            .iter()
            .map(|t| t[flow.index()].get())
            .sum::<u64>()
    }

    /// Gauge for a peer kind.
    pub fn active(&self, peer: &str) -> IntGauge {
        self.active.with_label_values(&[peer])
    }

    /// Prometheus text exposition of everything registered (departed devices' series older
    /// than [`DEVICE_SERIES_LINGER`] are removed first, at most once a minute).
    pub fn render(&self) -> String {
        self.sweep_devices("", std::time::Instant::now());
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// The registry, so later milestones can register their own metrics beside these.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric family is described in docs/metrics.md.
    #[test]
    fn every_metric_is_documented() {
        let doc = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/metrics.md"),
        )
        .unwrap();
        let m = Metrics::new(true);
        let families = m.registry().gather();
        assert!(families.len() >= 15, "{}", families.len());
        for f in families {
            assert!(
                doc.contains(&format!("`{}`", f.name())),
                "{} is not in docs/metrics.md",
                f.name()
            );
        }
    }

    #[test]
    fn per_device_series_are_capped_and_removed_after_the_device_left() {
        let m = Metrics::with_device_limit(true, 3);
        for d in ["a", "b", "c", "d"] {
            m.add_frame(Path::Legacy, Flow::DeviceToCloud, PacketType::PING, Some(d));
        }
        assert_eq!(m.device_series(), 3);
        assert!(!m.render().contains("device_id=\"d\""));
        let t0 = std::time::Instant::now();
        m.sweep_devices("a", t0);
        m.sweep_devices("b", t0 + std::time::Duration::from_secs(61));
        assert_eq!(m.device_series(), 3, "not gone long enough");
        m.sweep_devices(
            "c",
            t0 + DEVICE_SERIES_LINGER + std::time::Duration::from_secs(200),
        );
        assert_eq!(m.device_series(), 1, "only c, which just left, remains");
        assert!(!m.render().contains("device_id=\"a\""));
        assert!(!m.render().contains("device_id=\"b\""));
        assert!(m.render().contains("device_id=\"c\""));
        m.add_frame(
            Path::Legacy,
            Flow::DeviceToCloud,
            PacketType::PING,
            Some("d"),
        );
        assert!(m.render().contains("device_id=\"d\""));
    }

    #[test]
    fn registers_and_renders() {
        let m = Metrics::new(true);
        m.add_frame(
            Path::Legacy,
            Flow::DeviceToCloud,
            PacketType::PING,
            Some("37962469"),
        );
        m.add_frame(Path::Legacy, Flow::DeviceToCloud, PacketType(0x33), None);
        m.add_decode_error(Path::New, Flow::CloudToDevice, DecodeProblem::Checksum);
        m.add_bytes(Path::Legacy, Flow::DeviceToCloud, 5);
        m.close(Path::New, "new_path_down");
        let text = m.render();
        assert!(
            text.contains("cync_mitm_frames_total{direction=\"device_to_cloud\",transport=\"legacy\",type=\"ping\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "cync_mitm_frames_total{direction=\"device_to_cloud\",transport=\"legacy\",type=\"unknown\"} 1"
            )
        );
        assert!(text.contains(
            "cync_mitm_frames_total{direction=\"device_to_cloud\",transport=\"new\",type=\"ping\"} 0"
        ));
        assert!(text.contains(
            "cync_mitm_decode_errors_total{direction=\"cloud_to_device\",kind=\"checksum\",transport=\"new\"} 1"
        ));
        assert!(text.contains(
            "cync_mitm_connections_closed_total{reason=\"new_path_down\",transport=\"new\"} 1"
        ));
        assert_eq!(m.closed_count("new_path_down"), 1);
        assert_eq!(
            m.decode_errors(Flow::CloudToDevice, DecodeProblem::Checksum),
            1
        );
        assert!(text.contains(
            "cync_mitm_device_frames_total{device_id=\"37962469\",direction=\"device_to_cloud\"} 1"
        ));
        assert_eq!(m.bytes(Flow::DeviceToCloud), 5);
        assert!(
            !Metrics::new(false)
                .render()
                .contains("cync_mitm_device_frames_total")
        );
    }
}
