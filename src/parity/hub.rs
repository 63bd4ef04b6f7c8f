//! Where parity outcomes go: the `tcp_comm_parity_*` metrics, the statistics behind
//! `GET /parity` (per type, the most drifting devices, the latest drifts), and the drift log
//! (`<dir>/drift-YYYYMMDD.jsonl`, one JSON line per drift, files 0600), written by one thread
//! behind a bounded queue so no session ever waits for the disk.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use prometheus::{IntCounterVec, Registry};
use serde_json::{Value, json};

use super::{Answer, Outcome, Reason, Side, Tracker, Verdict};
use crate::codec::{DeviceId, Frame, PacketType};

/// Request types that expect an answer: their series exist from the start.
pub const REQUEST_TYPES: [PacketType; 8] = [
    PacketType::HANDSHAKE,
    PacketType::LOGIN,
    PacketType::SYNC,
    PacketType::PIPE,
    PacketType::PIPE_SYNC,
    PacketType::PROBE,
    PacketType::TIME_REQUEST,
    PacketType::PING,
];

/// Devices with their own counts in `/parity`; more share one `other` entry.
const MAX_DEVICES: usize = 10_000;
/// Drifts kept for `/parity`.
const RECENT: usize = 20;
/// Lines queued for the log thread.
const LOG_QUEUE: usize = 1024;
/// Drift lines made per second at most (a burst of twice that); beyond it drifts are counted
/// only, so a backend that stops answering costs the sessions little.
const LINES_PER_SEC: f64 = 100.0;

/// The parity metric families.
#[derive(Clone)]
pub struct ParityMetrics {
    /// Requests both paths answered alike, by request type.
    pub matches: IntCounterVec,
    /// Requests whose answers differ, by request type and reason.
    pub drifts: IntCounterVec,
    /// Requests neither path answered within the timeout, by request type.
    pub unanswered: IntCounterVec,
    /// Drift lines not written: `queue_full`, `limit` (the day's `max_log_bytes`), `error`.
    pub log_dropped: IntCounterVec,
    /// Requests given up unjudged because too many waited in one session.
    pub evicted: prometheus::IntCounter,
}

impl ParityMetrics {
    /// Registers the families with zero series for every request type.
    pub fn register(r: &Registry) -> Self {
        let m = Self {
            matches: crate::metrics::counter_vec(
                r,
                "tcp_comm_parity_matches_total",
                "Mirrored device requests the cloud and the new backend answered alike, by request type.",
                &["type"],
            ),
            drifts: crate::metrics::counter_vec(
                r,
                "tcp_comm_parity_drifts_total",
                "Mirrored device requests whose answers differ, by request type and reason.",
                &["type", "reason"],
            ),
            unanswered: crate::metrics::counter_vec(
                r,
                "cync_mitm_parity_unanswered_total",
                "Mirrored device requests neither path answered within parity.timeout, by request type.",
                &["type"],
            ),
            evicted: {
                let c = prometheus::IntCounter::new(
                    "cync_mitm_parity_evicted_total",
                    "Mirrored requests given up unjudged because 64 already waited in their session.",
                )
                .unwrap_or_else(|e| panic!("{e}"));
                r.register(Box::new(c.clone()))
                    .unwrap_or_else(|e| panic!("{e}"));
                c
            },
            log_dropped: crate::metrics::counter_vec(
                r,
                "cync_mitm_parity_log_dropped_total",
                "Drift log lines not written, by reason.",
                &["reason"],
            ),
        };
        for t in REQUEST_TYPES {
            m.matches.with_label_values(&[t.name()]);
            m.unanswered.with_label_values(&[t.name()]);
            for r in Reason::ALL {
                m.drifts.with_label_values(&[t.name(), r.label()]);
            }
        }
        for r in ["queue_full", "limit", "rate", "error"] {
            m.log_dropped.with_label_values(&[r]);
        }
        m
    }
}

#[derive(Default)]
struct TypeStats {
    matches: u64,
    drifts: BTreeMap<Reason, u64>,
    unanswered: u64,
    /// Both answered: latency sums and maxima, for the means.
    both: u64,
    legacy_sum: Duration,
    new_sum: Duration,
    legacy_max: Duration,
    new_max: Duration,
}

#[derive(Default, Clone, Copy)]
struct DeviceStats {
    matches: u64,
    drifts: u64,
}

#[derive(Default)]
struct Stats {
    types: BTreeMap<&'static str, TypeStats>,
    devices: HashMap<u32, DeviceStats>,
    other: DeviceStats,
    recent: VecDeque<Arc<Value>>,
    /// Token bucket of drift lines: tokens, and when it was last filled.
    tokens: f64,
    filled: Option<Instant>,
}

impl Stats {
    fn take_token(&mut self, now: Instant) -> bool {
        let since = self
            .filled
            .map_or(Duration::from_secs(2), |f| now.saturating_duration_since(f));
        self.filled = Some(now);
        self.tokens = (self.tokens + since.as_secs_f64() * LINES_PER_SEC).min(2.0 * LINES_PER_SEC);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A line for the log thread, with where it goes.
struct LogLine {
    dir: PathBuf,
    max_bytes: u64,
    at: SystemTime,
    line: String,
}

/// Shared by every session.
pub struct Hub {
    metrics: ParityMetrics,
    stats: Mutex<Stats>,
    log: std::sync::mpsc::SyncSender<LogLine>,
    written: Arc<std::sync::atomic::AtomicU64>,
}

/// Where drift lines go and how much of them a day.
#[derive(Clone, Debug)]
pub struct LogTarget {
    /// Folder of the `drift-YYYYMMDD.jsonl` files.
    pub dir: PathBuf,
    /// Bytes per day's file; beyond it drifts are counted, not logged.
    pub max_bytes: u64,
    /// Write drift lines at all.
    pub enabled: bool,
}

impl Hub {
    /// A hub with its log thread.
    pub fn new(metrics: ParityMetrics) -> Arc<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<LogLine>(LOG_QUEUE);
        let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let w = written.clone();
        let m = metrics.clone();
        // The thread ends when the hub (the only sender) is dropped.
        let spawned = std::thread::Builder::new()
            .name("parity-log".into())
            .spawn(move || log_thread(rx, m, w));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "parity: cannot start the drift log thread; drifts are counted, not logged");
        }
        Arc::new(Self {
            metrics,
            stats: Mutex::new(Stats::default()),
            log: tx,
            written,
        })
    }

    /// Counts one judged request of `device`, and logs it if it drifted.
    pub fn record(&self, device: Option<DeviceId>, o: &Outcome, log: &LogTarget) {
        let t = o.request_type.name();
        let mut line = None;
        match &o.verdict {
            Verdict::Match => self.metrics.matches.with_label_values(&[t]).inc(),
            Verdict::Unanswered => self.metrics.unanswered.with_label_values(&[t]).inc(),
            Verdict::Drift { reason, .. } => {
                self.metrics
                    .drifts
                    .with_label_values(&[t, reason.label()])
                    .inc();
            }
        }
        let mut token = false;
        {
            let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
            if matches!(o.verdict, Verdict::Drift { .. }) {
                token = s.take_token(Instant::now());
                if !token {
                    self.metrics.log_dropped.with_label_values(&["rate"]).inc();
                }
            }
            let ts = s.types.entry(t).or_default();
            match &o.verdict {
                Verdict::Match => ts.matches += 1,
                Verdict::Unanswered => ts.unanswered += 1,
                Verdict::Drift { reason, .. } => *ts.drifts.entry(*reason).or_default() += 1,
            }
            if let (Some(l), Some(n)) = (&o.legacy, &o.new) {
                ts.both += 1;
                ts.legacy_sum += l.latency;
                ts.new_sum += n.latency;
                ts.legacy_max = ts.legacy_max.max(l.latency);
                ts.new_max = ts.new_max.max(n.latency);
            }
            if !matches!(o.verdict, Verdict::Unanswered)
                && let Some(d) = device
            {
                let drift = matches!(o.verdict, Verdict::Drift { .. });
                let known = s.devices.contains_key(&d.0);
                let entry = if known || s.devices.len() < MAX_DEVICES {
                    s.devices.entry(d.0).or_default()
                } else {
                    &mut s.other
                };
                if drift {
                    entry.drifts += 1;
                } else {
                    entry.matches += 1;
                }
            }
        }
        // The line is made outside the lock (other sessions and /parity never wait for it).
        if let (true, Verdict::Drift { reason, detail }) = (token, &o.verdict) {
            let l = Arc::new(drift_json(device, o, *reason, detail));
            {
                let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
                if s.recent.len() >= RECENT {
                    s.recent.pop_front();
                }
                s.recent.push_back(l.clone());
            }
            line = Some(l);
        }
        if let Some(l) = line
            && log.enabled
        {
            let line = LogLine {
                dir: log.dir.clone(),
                max_bytes: log.max_bytes,
                at: SystemTime::now(),
                line: l.to_string(),
            };
            if self.log.try_send(line).is_err() {
                self.metrics
                    .log_dropped
                    .with_label_values(&["queue_full"])
                    .inc();
            }
        }
    }

    /// The `GET /parity` document.
    pub fn report(&self, settings: Value) -> Value {
        let s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let (mut matches, mut drifts, mut unanswered) = (0u64, 0u64, 0u64);
        let mut types = serde_json::Map::new();
        for (name, t) in &s.types {
            let d: u64 = t.drifts.values().sum();
            matches += t.matches;
            drifts += d;
            unanswered += t.unanswered;
            let mean = |sum: Duration| (t.both > 0).then(|| ms(sum) / t.both as f64);
            types.insert(
                (*name).to_owned(),
                json!({
                    "matches": t.matches,
                    "drifts": d,
                    "by_reason": Reason::ALL.iter().map(|r| (r.label(), t.drifts.get(r).copied().unwrap_or(0))).collect::<BTreeMap<_, _>>(),
                    "unanswered": t.unanswered,
                    "parity_ratio": ratio(t.matches, d),
                    "latency_ms": {
                        "compared": t.both,
                        "legacy_mean": mean(t.legacy_sum),
                        "new_mean": mean(t.new_sum),
                        "legacy_max": ms(t.legacy_max),
                        "new_max": ms(t.new_max),
                    },
                }),
            );
        }
        let mut devices: Vec<(u32, DeviceStats)> = s
            .devices
            .iter()
            .filter(|(_, d)| d.drifts > 0)
            .map(|(k, v)| (*k, *v))
            .collect();
        devices.sort_by(|a, b| b.1.drifts.cmp(&a.1.drifts).then(a.0.cmp(&b.0)));
        devices.truncate(10);
        json!({
            "settings": settings,
            "matches": matches,
            "drifts": drifts,
            "unanswered": unanswered,
            "parity_ratio": ratio(matches, drifts),
            "types": types,
            "top_devices": devices.iter().map(|(id, d)| json!({
                "device": format!("{id:08x}"),
                "drifts": d.drifts,
                "matches": d.matches,
                "parity_ratio": ratio(d.matches, d.drifts),
            })).collect::<Vec<_>>(),
            "other_devices": (s.other.drifts + s.other.matches > 0).then(|| json!({
                "drifts": s.other.drifts, "matches": s.other.matches,
            })),
            "recent_drifts": s.recent.iter().rev().map(|v| v.as_ref().clone()).collect::<Vec<_>>(),
            "log_lines_written": self.written.load(std::sync::atomic::Ordering::Relaxed),
        })
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn ratio(matches: u64, drifts: u64) -> Option<f64> {
    let n = matches + drifts;
    (n > 0).then(|| matches as f64 / n as f64)
}

/// A frame for a drift line: auth codes masked (as captures do), at most
/// [`super::KEEP`] bytes (a longer one says so and keeps its length).
fn frame_json(bytes: &Bytes, len: usize) -> Value {
    let mut b = bytes.to_vec();
    crate::capture::redact_auth(&mut b);
    let b = Bytes::from(b);
    if b.len() == len {
        json!({
            "hex": crate::hexutil::to_hex(&b),
            "decoded": crate::codec::view::frame_json(&b),
        })
    } else {
        let t = crate::codec::PacketType(b.first().copied().unwrap_or(0));
        json!({
            "hex": crate::hexutil::to_hex(&b),
            "truncated": true,
            "len": len,
            "decoded": {"type": t.to_string(), "name": t.name()},
        })
    }
}

fn answer_json(a: &Option<Answer>) -> Value {
    match a {
        None => Value::Null,
        Some(a) => {
            let mut v = frame_json(&a.bytes, a.len);
            if let Value::Object(o) = &mut v {
                o.insert("latency_ms".into(), json!(ms(a.latency)));
            }
            v
        }
    }
}

/// One drift as a JSON object (a line of the log, an entry of `/parity`).
pub fn drift_json(device: Option<DeviceId>, o: &Outcome, reason: Reason, detail: &str) -> Value {
    json!({
        "ts": humantime::format_rfc3339_millis(SystemTime::now().max(std::time::UNIX_EPOCH))
            .to_string(),
        "device": device.map(|d| d.to_string()),
        "type": o.request_type.name(),
        "reason": reason.label(),
        "detail": detail,
        "request": frame_json(&o.request, o.request_len),
        "legacy": answer_json(&o.legacy),
        "new": answer_json(&o.new),
    })
}

use crate::dailylog::{Open, daily_path, day, open_daily};

fn log_thread(
    rx: std::sync::mpsc::Receiver<LogLine>,
    m: ParityMetrics,
    written: Arc<std::sync::atomic::AtomicU64>,
) {
    let mut open: Option<Open> = None;
    let mut warned_at: Option<Instant> = None;
    while let Ok(l) = rx.recv() {
        let today = day(l.at);
        let want = daily_path(&l.dir, "drift", &today);
        if open.as_ref().is_none_or(|o| o.path != want) {
            open = None;
            match open_daily(&l.dir, "drift", &today) {
                Ok(o) => open = Some(o),
                Err(e) => {
                    m.log_dropped.with_label_values(&["error"]).inc();
                    if warned_at.is_none_or(|w| w.elapsed() > Duration::from_secs(60)) {
                        warned_at = Some(Instant::now());
                        tracing::warn!(path = %want.display(), error = %e, "parity: cannot open the drift log; drifts are counted, not logged");
                    }
                    continue;
                }
            }
        }
        let Some(o) = open.as_mut() else { continue };
        let n = l.line.len() as u64 + 1;
        if o.bytes + n > l.max_bytes {
            m.log_dropped.with_label_values(&["limit"]).inc();
            continue;
        }
        let mut buf = l.line.into_bytes();
        buf.push(b'\n');
        match o.file.write_all(&buf) {
            Ok(()) => {
                o.bytes += n;
                written.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Err(e) => {
                m.log_dropped.with_label_values(&["error"]).inc();
                if warned_at.is_none_or(|w| w.elapsed() > Duration::from_secs(60)) {
                    warned_at = Some(Instant::now());
                    tracing::warn!(path = %o.path.display(), error = %e, "parity: drift log write failed");
                }
                open = None;
            }
        }
    }
}

/// One mirrored session's parity: its tracker and where its outcomes go. Fed by the taps
/// (device requests that reached the mirror, the cloud's answers) and by the mirror (the new
/// backend's answers).
pub struct SessionParity {
    tracker: Tracker,
    device: Option<DeviceId>,
    hub: Arc<Hub>,
    log: LogTarget,
}

impl SessionParity {
    /// A session's parity.
    pub fn new(
        hub: Arc<Hub>,
        settings: super::Settings,
        device: Option<DeviceId>,
        log: LogTarget,
    ) -> Arc<Mutex<Self>> {
        Arc::new(Mutex::new(Self {
            tracker: Tracker::new(settings),
            device,
            hub,
            log,
        }))
    }

    fn emit(&self, o: Option<Outcome>) {
        if let Some(o) = o {
            self.hub.record(self.device, &o, &self.log);
        }
    }

    fn expire(&mut self, now: Instant) {
        if self.tracker.next_deadline().is_some_and(|d| d <= now) {
            for o in self.tracker.poll(now) {
                self.hub.record(self.device, &o, &self.log);
            }
        }
    }

    /// A device frame both paths received.
    pub fn request(&mut self, frame: &Frame, bytes: Bytes) {
        let now = Instant::now();
        self.expire(now);
        let before = self.tracker.evicted();
        let o = self.tracker.on_request(now, frame, bytes);
        if self.tracker.evicted() > before {
            self.hub.metrics.evicted.inc();
        }
        self.emit(o);
    }

    /// A frame from `side` (the cloud's to the device, or the mirror's backend).
    pub fn answer(&mut self, side: Side, frame: &Frame, bytes: Bytes) {
        let now = Instant::now();
        self.expire(now);
        let o = self.tracker.on_answer(side, now, frame, bytes);
        self.emit(o);
    }

    /// Judges what timed out (call now and then on an idle session).
    pub fn tick(&mut self) {
        self.expire(Instant::now());
    }

    /// The session ended.
    pub fn finish(&mut self) {
        for o in self.tracker.finish(Instant::now()) {
            self.hub.record(self.device, &o, &self.log);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drift() -> Outcome {
        let ping = Bytes::from(Frame::ping().encode().unwrap());
        Outcome {
            request_type: PacketType::PING,
            request_len: ping.len(),
            request: ping.clone(),
            legacy: Some(Answer::new(
                Bytes::from(Frame::pong().encode().unwrap()),
                Duration::from_millis(3),
            )),
            new: None,
            verdict: Verdict::Drift {
                reason: Reason::MissingNew,
                detail: "the new backend did not answer".into(),
            },
        }
    }

    fn wait(f: impl Fn() -> bool) -> bool {
        for _ in 0..200 {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    #[test]
    fn drifts_are_logged_0600_up_to_the_daily_limit_and_counted_beyond() {
        let dir = tempfile::tempdir().unwrap();
        let m = ParityMetrics::register(&Registry::new());
        let hub = Hub::new(m.clone());
        let one = drift_json(
            Some(DeviceId(7)),
            &drift(),
            Reason::MissingNew,
            "the new backend did not answer",
        )
        .to_string()
        .len() as u64;
        let target = LogTarget {
            dir: dir.path().join("parity"),
            // Room for two lines, not three.
            max_bytes: (one + 1) * 2 + 20,
            enabled: true,
        };
        for _ in 0..3 {
            hub.record(Some(DeviceId(7)), &drift(), &target);
        }
        assert!(wait(
            || m.log_dropped.with_label_values(&["limit"]).get() == 1
        ));
        let files: Vec<_> = std::fs::read_dir(&target.dir).unwrap().flatten().collect();
        assert_eq!(files.len(), 1);
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            files[0].metadata().unwrap().permissions().mode() & 0o777,
            0o600
        );
        let text = std::fs::read_to_string(files[0].path()).unwrap();
        assert_eq!(text.lines().count(), 2);
        let v: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(v["device"], "00000007");
        assert_eq!(v["reason"], "missing_new");
        assert_eq!(v["legacy"]["decoded"]["name"], "pong");
        assert_eq!(
            m.drifts.with_label_values(&["ping", "missing_new"]).get(),
            3
        );
        let r = hub.report(Value::Null);
        assert_eq!(r["drifts"], 3);
        assert_eq!(r["top_devices"][0]["device"], "00000007");
        assert_eq!(r["types"]["ping"]["by_reason"]["missing_new"], 3);
    }

    #[test]
    fn drift_lines_mask_auth_codes_and_truncate_large_frames() {
        let hello = Bytes::from(
            Frame::handshake(DeviceId(9), b"secretsecret1234", 60)
                .encode()
                .unwrap(),
        );
        let o = Outcome {
            request_type: PacketType::HANDSHAKE,
            request_len: hello.len(),
            request: hello,
            legacy: Some(Answer::new(
                Bytes::from(vec![0x28, 0, 0, 0, 2, 0, 0]),
                Duration::ZERO,
            )),
            new: Some(Answer::new(
                Bytes::from({
                    let mut v = vec![0x28, 0, 0, 0x10, 0];
                    v.extend(std::iter::repeat_n(7u8, 0x1000));
                    v
                }),
                Duration::ZERO,
            )),
            verdict: Verdict::Drift {
                reason: Reason::Content,
                detail: "x".into(),
            },
        };
        let v = drift_json(Some(DeviceId(9)), &o, Reason::Content, "x");
        let text = v.to_string();
        assert!(!text.contains("secretsecret1234"), "{text}");
        assert!(
            !text.contains(&crate::hexutil::to_hex(b"secretsecret1234")),
            "{text}"
        );
        assert_eq!(v["request"]["decoded"]["auth_code"], "****************");
        assert_eq!(v["new"]["truncated"], true);
        assert_eq!(v["new"]["len"], 0x1005);
        assert_eq!(
            v["new"]["hex"].as_str().unwrap().len(),
            crate::hexutil::to_hex(&[0u8; super::super::KEEP]).len()
        );
    }

    #[test]
    fn an_unwritable_log_folder_is_counted_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let m = ParityMetrics::register(&Registry::new());
        let hub = Hub::new(m.clone());
        let target = LogTarget {
            dir: file.join("parity"),
            max_bytes: 1 << 20,
            enabled: true,
        };
        hub.record(None, &drift(), &target);
        assert!(wait(
            || m.log_dropped.with_label_values(&["error"]).get() == 1
        ));
        // Logging off: counted, nothing queued.
        let off = LogTarget {
            enabled: false,
            ..target
        };
        hub.record(None, &drift(), &off);
        assert_eq!(
            m.drifts.with_label_values(&["ping", "missing_new"]).get(),
            2
        );
        assert_eq!(m.log_dropped.with_label_values(&["error"]).get(), 1);
    }
}
