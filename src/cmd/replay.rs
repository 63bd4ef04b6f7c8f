//! `cync-mitm replay`: the pre-flight check before any device moves. Each device session of
//! one or more captures is replayed to a backend as that device would (its handshake first, its
//! frames in order, at the original pace or `--speed` times it), and the backend's answers are
//! compared with the cloud's recorded ones under the parity rules (`docs/parity.md`).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::capture::read::{CapturedFrame, read_capture};
use crate::codec::answer::{answer_key, expected_answer};
use crate::codec::{Frame, Framer, FramerEvent, PacketType};
use crate::parity::{Outcome, Reason, Settings, Side, Tracker, Verdict};
use crate::tls::UpstreamConnector;

/// How much drift is tolerated before the run fails.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MaxDrift {
    /// At most this many drifting requests.
    Count(u64),
    /// At most this share of the compared requests (0–1).
    Ratio(f64),
}

impl std::str::FromStr for MaxDrift {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            let v: f64 = p
                .trim()
                .parse()
                .map_err(|_| format!("{s:?} is not a percentage such as 0.1%"))?;
            if !(0.0..=100.0).contains(&v) || !v.is_finite() {
                return Err(format!("{s:?}: a percentage is between 0% and 100%"));
            }
            return Ok(MaxDrift::Ratio(v / 100.0));
        }
        s.parse::<u64>().map(MaxDrift::Count).map_err(|_| {
            format!(
                "{s:?} is neither a count of drifts (such as 0) nor a percentage (such as 0.1%)"
            )
        })
    }
}

/// What to replay where.
pub struct Options {
    /// The captures (pcapng or pcap).
    pub captures: Vec<PathBuf>,
    /// The backend, `host:port`.
    pub to: String,
    /// TLS to the backend, or `None` for plaintext.
    pub tls: Option<UpstreamConnector>,
    /// Pace: 1 = as recorded, 10 = ten times faster, 0 = as fast as the backend answers.
    pub speed: f64,
    /// How long an answer is awaited.
    pub timeout: Duration,
    /// Tolerated drift.
    pub max_drift: MaxDrift,
    /// Sessions replayed at once.
    pub concurrency: usize,
}

/// Why a replay could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A capture could not be read.
    #[error("{path}: {message}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
    /// No device session in the captures.
    #[error("no device session (a stream starting with a 0x23 handshake) in {0}")]
    NoSessions(String),
}

/// Counts of one request type.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct TypeCounts {
    /// Requests judged.
    pub requests: u64,
    /// Answered alike.
    pub matches: u64,
    /// Drifts by reason.
    pub content: u64,
    /// Only the cloud answered.
    pub missing_new: u64,
    /// Only the backend answered.
    pub missing_legacy: u64,
    /// Neither answered.
    pub unanswered: u64,
}

impl TypeCounts {
    fn add(&mut self, v: &Verdict) {
        self.requests += 1;
        match v {
            Verdict::Match => self.matches += 1,
            Verdict::Unanswered => self.unanswered += 1,
            Verdict::Drift { reason, .. } => match reason {
                Reason::Content => self.content += 1,
                Reason::MissingNew => self.missing_new += 1,
                Reason::MissingLegacy => self.missing_legacy += 1,
            },
        }
    }

    /// Drifting requests.
    pub fn drifts(&self) -> u64 {
        self.content + self.missing_new + self.missing_legacy
    }
}

/// One drift, for people and scripts.
#[derive(Clone, Debug, Serialize)]
pub struct DriftLine {
    /// The capture.
    pub capture: String,
    /// Its stream.
    pub stream: usize,
    /// The device (8 hex digits).
    pub device: Option<String>,
    /// The request's type name.
    pub r#type: &'static str,
    /// `content`, `missing_new`, `missing_legacy`.
    pub reason: &'static str,
    /// What differs.
    pub detail: String,
    /// The request, hex (auth codes masked).
    pub request: String,
    /// Some frame was longer than 1 KiB: its hex holds the first 1 KiB.
    pub truncated: bool,
    /// The cloud's recorded answer, hex.
    pub legacy: Option<String>,
    /// The backend's answer, hex.
    pub new: Option<String>,
}

/// A replayed session that failed to run.
#[derive(Clone, Debug, Serialize)]
pub struct SessionError {
    /// The capture.
    pub capture: String,
    /// Its stream.
    pub stream: usize,
    /// Why.
    pub error: String,
}

/// The parity report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The backend.
    pub to: String,
    /// Device sessions replayed.
    pub sessions: usize,
    /// Device frames sent.
    pub frames_sent: u64,
    /// Recorded device answers to the cloud's own commands, not sent (the backend never
    /// sent those commands).
    pub skipped_answers: u64,
    /// Commands the backend sent, acked with 0x7b as a device would.
    pub backend_commands_acked: u64,
    /// Seconds the replay took.
    pub seconds: f64,
    /// Per request type.
    pub types: BTreeMap<&'static str, TypeCounts>,
    /// All types.
    pub total: TypeCounts,
    /// matches ÷ (matches + drifts).
    pub parity_ratio: Option<f64>,
    /// The threshold.
    pub max_drift: MaxDrift,
    /// Whether the drift is within it (and every session ran).
    pub ok: bool,
    /// Every drift.
    pub drifts: Vec<DriftLine>,
    /// Sessions that could not run (a backend that refuses the connection, say).
    pub errors: Vec<SessionError>,
    /// Things to know about the input (a capture cut short, redacted auth codes).
    pub notes: Vec<String>,
}

/// A device session found in a capture.
struct Recorded {
    capture: String,
    stream: usize,
    device: Option<String>,
    /// Device frames and the cloud's, in capture order, with their capture times.
    events: Vec<(Duration, bool, Bytes)>,
}

/// The device sessions of `path`: streams that start with a handshake. In our own captures,
/// where each session appears twice (device leg and cloud leg), the cloud leg is used: it holds
/// what the cloud really answered.
fn sessions_of(path: &Path, notes: &mut Vec<String>) -> Result<Vec<Recorded>, Error> {
    let capture = read_capture(path).map_err(|e| Error::Read {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    if capture.truncated {
        notes.push(format!(
            "{}: the capture ends inside a block (still being written, or cut short); replayed up to there",
            path.display()
        ));
    }
    let frames = capture.frames;
    let cloud_legs = frames.iter().any(is_cloud_leg);
    let mut by_stream: BTreeMap<usize, Vec<&CapturedFrame>> = BTreeMap::new();
    for f in &frames {
        if f.is_frame && (!cloud_legs || is_cloud_leg(f)) {
            by_stream.entry(f.stream).or_default().push(f);
        }
    }
    let mut out = Vec::new();
    for (stream, fs) in by_stream {
        let first = fs.iter().find(|f| f.from_client);
        let Some(hello) = first.and_then(|f| Frame::decode(&f.bytes).ok()) else {
            continue;
        };
        if hello.ptype != PacketType::HANDSHAKE {
            continue;
        }
        let device = hello.device_id().map(|d| d.to_string());
        if let crate::codec::Body::Handshake(h) = &hello.body
            && !h.auth_code.is_empty()
            && h.auth_code.iter().all(|b| *b == b'*')
        {
            notes.push(format!(
                "{} stream {stream}: the auth code is redacted (capture.redact_auth): a backend that checks codes will refuse this handshake",
                path.display()
            ));
        }
        out.push(Recorded {
            capture: path.display().to_string(),
            stream,
            device,
            events: fs
                .iter()
                .map(|f| (f.time, f.from_client, f.bytes.clone()))
                .collect(),
        });
    }
    Ok(out)
}

fn is_cloud_leg(f: &CapturedFrame) -> bool {
    f.interface
        .as_deref()
        .is_some_and(|i| i.starts_with("cloud leg"))
}

struct SessionResult {
    outcomes: Vec<Outcome>,
    sent: u64,
    skipped: u64,
    acked: u64,
    error: Option<String>,
}

/// Replays every device session of `opts.captures` and compares.
pub async fn run(opts: &Options) -> Result<Report, Error> {
    let mut sessions = Vec::new();
    let mut notes = Vec::new();
    for c in &opts.captures {
        sessions.extend(sessions_of(c, &mut notes)?);
    }
    if sessions.is_empty() {
        let names: Vec<String> = opts
            .captures
            .iter()
            .map(|c| c.display().to_string())
            .collect();
        return Err(Error::NoSessions(names.join(", ")));
    }
    let started = Instant::now();
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(opts.concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, s) in sessions.iter().enumerate() {
        let limit = limit.clone();
        let to = opts.to.clone();
        let tls = opts.tls.clone();
        let events = s.events.clone();
        let (speed, timeout) = (opts.speed, opts.timeout);
        tasks.spawn(async move {
            let _permit = limit.acquire_owned().await;
            (
                i,
                replay_one(&to, tls.as_ref(), events, speed, timeout).await,
            )
        });
    }
    let mut results: Vec<Option<SessionResult>> = sessions.iter().map(|_| None).collect();
    while let Some(r) = tasks.join_next().await {
        if let Ok((i, res)) = r
            && let Some(slot) = results.get_mut(i)
        {
            *slot = Some(res);
        }
    }
    let mut report = Report {
        to: opts.to.clone(),
        sessions: sessions.len(),
        frames_sent: 0,
        skipped_answers: 0,
        backend_commands_acked: 0,
        seconds: 0.0,
        types: BTreeMap::new(),
        total: TypeCounts::default(),
        parity_ratio: None,
        max_drift: opts.max_drift,
        ok: false,
        drifts: Vec::new(),
        errors: Vec::new(),
        notes,
    };
    for (s, r) in sessions.iter().zip(results) {
        let Some(r) = r else {
            report.errors.push(SessionError {
                capture: s.capture.clone(),
                stream: s.stream,
                error: "the replay task failed".into(),
            });
            continue;
        };
        report.frames_sent += r.sent;
        report.skipped_answers += r.skipped;
        report.backend_commands_acked += r.acked;
        if let Some(e) = r.error {
            report.errors.push(SessionError {
                capture: s.capture.clone(),
                stream: s.stream,
                error: e,
            });
        }
        for o in r.outcomes {
            report
                .types
                .entry(o.request_type.name())
                .or_default()
                .add(&o.verdict);
            report.total.add(&o.verdict);
            if let Verdict::Drift { reason, detail } = &o.verdict {
                report.drifts.push(DriftLine {
                    capture: s.capture.clone(),
                    stream: s.stream,
                    device: s.device.clone(),
                    r#type: o.request_type.name(),
                    reason: reason.label(),
                    detail: detail.clone(),
                    request: {
                        let mut r = o.request.to_vec();
                        crate::capture::redact_auth(&mut r);
                        crate::hexutil::to_hex(&r)
                    },
                    truncated: o.request_len > o.request.len()
                        || o.legacy.as_ref().is_some_and(|a| !a.whole())
                        || o.new.as_ref().is_some_and(|a| !a.whole()),
                    legacy: o.legacy.as_ref().map(|a| crate::hexutil::to_hex(&a.bytes)),
                    new: o.new.as_ref().map(|a| crate::hexutil::to_hex(&a.bytes)),
                });
            }
        }
    }
    let t = &report.total;
    let compared = t.matches + t.drifts();
    report.parity_ratio = (compared > 0).then(|| t.matches as f64 / compared as f64);
    let within = match opts.max_drift {
        MaxDrift::Count(n) => t.drifts() <= n,
        MaxDrift::Ratio(r) => compared == 0 || (t.drifts() as f64) <= r * compared as f64,
    };
    report.ok = within && report.errors.is_empty();
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Replays one session; the outcomes of every request it sent.
async fn replay_one(
    to: &str,
    tls: Option<&UpstreamConnector>,
    events: Vec<(Duration, bool, Bytes)>,
    speed: f64,
    timeout: Duration,
) -> SessionResult {
    let mut res = SessionResult {
        outcomes: Vec::new(),
        sent: 0,
        skipped: 0,
        acked: 0,
        error: None,
    };
    let limit = timeout.max(Duration::from_secs(10));
    let up = match tokio::time::timeout(limit, crate::proxy::upstream::attempt(to, tls)).await {
        Ok(Ok(u)) => u,
        Ok(Err(e)) => {
            res.error = Some(e.to_string());
            return res;
        }
        Err(_) => {
            res.error = Some(format!(
                "{to}: no connection (TCP and TLS) within {limit:?}"
            ));
            return res;
        }
    };
    let (mut rd, mut wr) = tokio::io::split(up.io);
    let mut tracker = Tracker::new(Settings {
        timeout,
        max_pending: 100_000,
    });
    let mut prev_t = events.first().map(|e| e.0).unwrap_or_default();
    let base = tokio::time::Instant::now();
    let mut prev_due = base;
    // Commands the recorded cloud sent: the device's answers to them are not replayed.
    let mut cloud_commands: HashSet<crate::codec::answer::AnswerKey> = HashSet::new();
    let mut framer = Framer::new(crate::config::Limits::default().max_frame);
    let mut buf = vec![0u8; 16 * 1024];
    let mut next = 0usize;
    let mut backend_open = true;
    let mut last_sent = tokio::time::Instant::now();
    loop {
        // The recorded pace, each gap at most MAX_GAP (a capture may hold hours of quiet, or a
        // clock jump).
        let due = events.get(next).map(|(t, _, _)| {
            if speed > 0.0 {
                let gap = t.saturating_sub(prev_t).as_secs_f64() / speed;
                prev_due + Duration::from_secs_f64(gap.min(MAX_GAP.as_secs_f64()))
            } else {
                base
            }
        });
        let done_sending = next >= events.len();
        if done_sending && (tracker.pending() == 0 || !backend_open) {
            break;
        }
        let wait_until = last_sent + timeout;
        tokio::select! {
            _ = tokio::time::sleep_until(due.unwrap_or(wait_until)), if !done_sending => {
                let Some((t, from_device, bytes)) = events.get(next) else { break };
                next += 1;
                prev_t = *t;
                prev_due = due.unwrap_or(base);
                let Ok(f) = Frame::decode(bytes) else {
                    // Undecodable device bytes are still the device's: send them.
                    if *from_device && write(&mut wr, bytes, timeout).await.is_ok() {
                        res.sent += 1;
                    }
                    continue;
                };
                if *from_device {
                    if answer_key(&f).is_some_and(|k| cloud_commands.contains(&k)) {
                        res.skipped += 1;
                        continue;
                    }
                    if let Some(o) = tracker.on_request(Instant::now(), &f, bytes.clone()) {
                        res.outcomes.push(o);
                    }
                    if let Err(e) = write(&mut wr, bytes, timeout).await {
                        res.error = Some(format!("writing to the backend: {e}"));
                        break;
                    }
                    res.sent += 1;
                    last_sent = tokio::time::Instant::now();
                } else {
                    if matches!(f.ptype, PacketType::PIPE | PacketType::PROBE)
                        && let Some(k) = expected_answer(&f)
                    {
                        cloud_commands.insert(k);
                    }
                    if let Some(o) = tracker.on_answer(Side::Legacy, Instant::now(), &f, bytes.clone()) {
                        res.outcomes.push(o);
                    }
                }
            }
            r = rd.read(&mut buf), if backend_open => match r {
                Ok(0) | Err(_) => backend_open = false,
                Ok(n) => {
                    framer.push(&buf[..n]);
                    while let Some(ev) = framer.next_event() {
                        let FramerEvent::Frame(raw) = ev else { continue };
                        let Ok(f) = raw.decode() else { continue };
                        if let Some(o) = tracker.on_answer(Side::New, Instant::now(), &f, raw.bytes().clone()) {
                            res.outcomes.push(o);
                        }
                        // A device acks the commands it gets.
                        if f.ptype == PacketType::PIPE
                            && let (Some(id), Some(msg)) = (f.id(), f.msg())
                            && let Ok(ack) = Frame::pipe_ack(id, msg).encode()
                            && write(&mut wr, &ack, timeout).await.is_ok()
                        {
                            res.acked += 1;
                        }
                    }
                }
            },
            _ = tokio::time::sleep_until(wait_until), if done_sending => break,
        }
    }
    // Everything still waiting is judged now: the replay is over.
    res.outcomes
        .extend(tracker.poll(Instant::now() + timeout + Duration::from_secs(1)));
    let _ = wr.shutdown().await;
    res
}

/// The longest wait between two replayed frames, whatever the recording says.
pub const MAX_GAP: Duration = Duration::from_secs(60);

/// The longest `--timeout`.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(600);

/// Writes `bytes` within `limit` (a backend that stops reading cannot hold the replay).
async fn write<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    bytes: &[u8],
    limit: Duration,
) -> std::io::Result<()> {
    match tokio::time::timeout(limit, w.write_all(bytes)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the backend stopped reading (nothing written for {limit:?})"),
        )),
    }
}

/// The report as text.
pub fn render(r: &Report) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "replayed {} session{} ({} frames sent) to {} in {:.1} s",
        r.sessions,
        if r.sessions == 1 { "" } else { "s" },
        r.frames_sent,
        r.to,
        r.seconds
    );
    let _ = writeln!(
        s,
        "{:<14} {:>8} {:>7} {:>8} {:>12} {:>15} {:>11}",
        "type", "requests", "match", "content", "missing_new", "missing_legacy", "unanswered"
    );
    let row = |s: &mut String, name: &str, t: &TypeCounts| {
        let _ = writeln!(
            s,
            "{:<14} {:>8} {:>7} {:>8} {:>12} {:>15} {:>11}",
            name, t.requests, t.matches, t.content, t.missing_new, t.missing_legacy, t.unanswered
        );
    };
    for (name, t) in &r.types {
        row(&mut s, name, t);
    }
    row(&mut s, "total", &r.total);
    for d in &r.drifts {
        let _ = writeln!(
            s,
            "drift: {} stream {} device {} {} {}: {}\n  request {}\n  cloud   {}\n  new     {}",
            d.capture,
            d.stream,
            d.device.as_deref().unwrap_or("?"),
            d.r#type,
            d.reason,
            d.detail,
            d.request,
            d.legacy.as_deref().unwrap_or("(none)"),
            d.new.as_deref().unwrap_or("(none)")
        );
    }
    for e in &r.errors {
        let _ = writeln!(s, "error: {} stream {}: {}", e.capture, e.stream, e.error);
    }
    for n in &r.notes {
        let _ = writeln!(s, "note: {n}");
    }
    let limit = match r.max_drift {
        MaxDrift::Count(n) => n.to_string(),
        MaxDrift::Ratio(x) => format!("{}%", x * 100.0),
    };
    let _ = writeln!(
        s,
        "{} drift{} (max {limit}){}: {}",
        r.total.drifts(),
        if r.total.drifts() == 1 { "" } else { "s" },
        r.parity_ratio
            .map(|p| format!(", parity {:.4}%", p * 100.0))
            .unwrap_or_default(),
        if r.ok { "OK" } else { "FAILED" }
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_drift_parses_counts_and_percentages() {
        assert_eq!("0".parse::<MaxDrift>(), Ok(MaxDrift::Count(0)));
        assert_eq!("12".parse::<MaxDrift>(), Ok(MaxDrift::Count(12)));
        assert_eq!("0.1%".parse::<MaxDrift>(), Ok(MaxDrift::Ratio(0.001)));
        assert!("-1".parse::<MaxDrift>().is_err());
        assert!("101%".parse::<MaxDrift>().is_err());
        assert!("x%".parse::<MaxDrift>().is_err());
        assert!("NaN%".parse::<MaxDrift>().is_err());
    }
}
