//! Parity: the cloud's answer to a device request compared with the new backend's.
//!
//! [`Tracker`] is sans-IO (time passed in): the session feeds it each device request that
//! expects an answer, and each answer from either side; it pairs them by the answer key of
//! [`crate::codec::answer`] (keyless types first in, first out) and judges every request once,
//! when both answers are in or when [`Settings::timeout`] has passed. [`compare`] holds the
//! per-type normalisation rules (see `docs/parity.md`). [`hub::Hub`] counts, keeps the
//! statistics behind `GET /parity`, and writes the drift log.

pub mod hub;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::codec::answer::{AnswerKey, answer_key, expected_answer};
use crate::codec::{Frame, PacketType};

/// Which path answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The cloud (or, in an A/A run, a second connection to it).
    Legacy,
    /// The mirrored new backend.
    New,
}

/// Why a request's answers differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// Only the cloud answered within the timeout.
    MissingNew,
    /// Only the new backend answered within the timeout.
    MissingLegacy,
    /// Both answered, with different content (after normalisation).
    Content,
}

impl Reason {
    /// Every reason, for metric label sets.
    pub const ALL: [Reason; 3] = [Reason::MissingNew, Reason::MissingLegacy, Reason::Content];

    /// The metric label and JSON value.
    pub fn label(self) -> &'static str {
        match self {
            Reason::MissingNew => "missing_new",
            Reason::MissingLegacy => "missing_legacy",
            Reason::Content => "content",
        }
    }
}

/// Bytes of a frame a tracker keeps (a larger one is compared by length and digest).
pub const KEEP: usize = 1024;

/// One side's answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Answer {
    /// The answer frame, or its first [`KEEP`] bytes.
    pub bytes: Bytes,
    /// Its whole length.
    pub len: usize,
    /// SipHash of the whole frame.
    pub digest: u64,
    /// From the request to this answer.
    pub latency: Duration,
}

impl Answer {
    /// `bytes` answered after `latency`; kept whole up to [`KEEP`] bytes.
    pub fn new(bytes: Bytes, latency: Duration) -> Self {
        let len = bytes.len();
        let digest = digest(&bytes);
        let bytes = if len > KEEP {
            Bytes::copy_from_slice(&bytes[..KEEP])
        } else {
            bytes
        };
        Self {
            bytes,
            len,
            digest,
            latency,
        }
    }

    /// Whether `bytes` is the whole frame.
    pub fn whole(&self) -> bool {
        self.bytes.len() == self.len
    }
}

fn digest(b: &[u8]) -> u64 {
    use std::hash::Hasher as _;
    let mut h = siphasher::sip::SipHasher13::new_with_keys(0x7061_7269, 0x7479_0001);
    h.write(b);
    h.finish()
}

/// Compares two kept answers: whole ones under [`compare`], larger ones by length and digest.
pub fn compare_answers(legacy: &Answer, new: &Answer) -> Result<(), String> {
    if legacy.whole() && new.whole() {
        return compare(&legacy.bytes, &new.bytes);
    }
    let (lt, nt) = (legacy.bytes.first().copied(), new.bytes.first().copied());
    if lt != nt {
        return Err(format!(
            "answer type {} vs {}",
            type_name(lt),
            type_name(nt)
        ));
    }
    if legacy.len != new.len {
        return Err(format!("length {} vs {}", legacy.len, new.len));
    }
    if legacy.digest != new.digest {
        return Err(format!(
            "content differs ({} bytes, compared by digest)",
            legacy.len
        ));
    }
    Ok(())
}

/// The judgement of one request.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Both answered alike.
    Match,
    /// They differ.
    Drift {
        /// Why.
        reason: Reason,
        /// What differs, for people.
        detail: String,
    },
    /// Neither side answered within the timeout (the same behaviour: not a drift).
    Unanswered,
}

/// A judged request.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// The request's type.
    pub request_type: PacketType,
    /// The request frame (its first [`KEEP`] bytes).
    pub request: Bytes,
    /// The request's whole length.
    pub request_len: usize,
    /// The cloud's answer, if any.
    pub legacy: Option<Answer>,
    /// The new backend's answer, if any.
    pub new: Option<Answer>,
    /// The judgement.
    pub verdict: Verdict,
}

/// Tracker settings.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// How long both answers are awaited.
    pub timeout: Duration,
    /// Requests awaiting answers per session; beyond it the oldest is judged early.
    pub max_pending: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5),
            max_pending: 64,
        }
    }
}

struct Pending {
    key: AnswerKey,
    ptype: PacketType,
    request: Bytes,
    request_len: usize,
    at: Instant,
    legacy: Option<Answer>,
    new: Option<Answer>,
}

impl Pending {
    fn judge(self) -> Outcome {
        let verdict = match (&self.legacy, &self.new) {
            (Some(l), Some(n)) => match compare_answers(l, n) {
                Ok(()) => Verdict::Match,
                Err(detail) => Verdict::Drift {
                    reason: Reason::Content,
                    detail,
                },
            },
            (Some(_), None) => Verdict::Drift {
                reason: Reason::MissingNew,
                detail: "the new backend did not answer".into(),
            },
            (None, Some(_)) => Verdict::Drift {
                reason: Reason::MissingLegacy,
                detail: "the cloud did not answer".into(),
            },
            (None, None) => Verdict::Unanswered,
        };
        Outcome {
            request_type: self.ptype,
            request: self.request,
            request_len: self.request_len,
            legacy: self.legacy,
            new: self.new,
            verdict,
        }
    }
}

/// Pairs one session's requests with both sides' answers.
pub struct Tracker {
    settings: Settings,
    pending: VecDeque<Pending>,
    evicted: u64,
}

impl Tracker {
    /// An empty tracker.
    pub fn new(settings: Settings) -> Self {
        Self {
            settings,
            pending: VecDeque::new(),
            evicted: 0,
        }
    }

    /// Requests given up unjudged because `max_pending` were waiting (a burst, not a drift).
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Requests awaiting answers.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// A device frame that both paths received (its first [`KEEP`] bytes are kept, for the
    /// drift log). When `max_pending` already wait, the oldest is given up unjudged (see
    /// [`Tracker::evicted`]). Returns what timed out meanwhile.
    pub fn on_request(&mut self, now: Instant, frame: &Frame, bytes: Bytes) -> Option<Outcome> {
        let key = expected_answer(frame)?;
        let request_len = bytes.len();
        let request = if bytes.len() > KEEP {
            Bytes::copy_from_slice(&bytes[..KEEP])
        } else {
            bytes
        };
        self.pending.push_back(Pending {
            key,
            ptype: frame.ptype,
            request,
            request_len,
            at: now,
            legacy: None,
            new: None,
        });
        if self.pending.len() > self.settings.max_pending.max(1)
            && self.pending.pop_front().is_some()
        {
            self.evicted += 1;
        }
        None
    }

    /// A frame from `side`: if it answers a waiting request (the oldest one that `side` has
    /// not answered yet), it is recorded; the request is judged once both answered.
    pub fn on_answer(
        &mut self,
        side: Side,
        now: Instant,
        frame: &Frame,
        bytes: Bytes,
    ) -> Option<Outcome> {
        let key = answer_key(frame)?;
        let i = self.pending.iter().position(|p| {
            p.key == key
                && match side {
                    Side::Legacy => p.legacy.is_none(),
                    Side::New => p.new.is_none(),
                }
        })?;
        let p = self.pending.get_mut(i)?;
        let answer = Answer::new(bytes, now.saturating_duration_since(p.at));
        match side {
            Side::Legacy => p.legacy = Some(answer),
            Side::New => p.new = Some(answer),
        }
        if p.legacy.is_some() && p.new.is_some() {
            return self.pending.remove(i).map(Pending::judge);
        }
        None
    }

    /// Requests whose timeout has passed at `now`, judged.
    pub fn poll(&mut self, now: Instant) -> Vec<Outcome> {
        let timeout = self.settings.timeout;
        let mut out = Vec::new();
        // Requests are in arrival order, so the expired ones are at the front.
        while self
            .pending
            .front()
            .is_some_and(|p| now.saturating_duration_since(p.at) >= timeout)
        {
            if let Some(p) = self.pending.pop_front() {
                out.push(p.judge());
            }
        }
        out
    }

    /// When the oldest waiting request times out.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.front().map(|p| p.at + self.settings.timeout)
    }

    /// The session ended: what timed out is judged; requests still within their timeout are
    /// not (the session, not a path, cut them short).
    pub fn finish(&mut self, now: Instant) -> Vec<Outcome> {
        let out = self.poll(now);
        self.pending.clear();
        out
    }
}

/// Compares two answers to the same request under the normalisation rules:
/// - a time answer (0xc8) carries each side's wall clock and time zone: both must be well-formed
///   (11 bytes, tag 0x0d, every field in range, a ±hhmm offset within ±14:00), the clock and
///   zone themselves are not compared;
/// - every other answer must be byte-for-byte equal.
///
/// `Err` says what differs.
pub fn compare(legacy: &[u8], new: &[u8]) -> Result<(), String> {
    let (lt, nt) = (legacy.first().copied(), new.first().copied());
    if lt != nt {
        return Err(format!(
            "answer type {} vs {}",
            type_name(lt),
            type_name(nt)
        ));
    }
    if lt == Some(PacketType::TIME_ANSWER.0) {
        let l = time_answer_shape(legacy).map_err(|e| format!("cloud's time answer {e}"))?;
        let n = time_answer_shape(new).map_err(|e| format!("new time answer {e}"))?;
        if l != n {
            return Err(format!("time answer tag 0x{l:02x} vs 0x{n:02x}"));
        }
        return Ok(());
    }
    if legacy == new {
        return Ok(());
    }
    if legacy.len() != new.len() {
        return Err(format!("length {} vs {}", legacy.len(), new.len()));
    }
    let at = legacy
        .iter()
        .zip(new)
        .position(|(a, b)| a != b)
        .unwrap_or(0);
    Err(format!(
        "byte {at}: 0x{:02x} vs 0x{:02x}",
        legacy.get(at).copied().unwrap_or(0),
        new.get(at).copied().unwrap_or(0)
    ))
}

fn type_name(t: Option<u8>) -> String {
    match t {
        Some(t) => format!("0x{t:02x} ({})", PacketType(t).name()),
        None => "(empty)".into(),
    }
}

/// A time answer's tag, once every field is in range.
fn time_answer_shape(bytes: &[u8]) -> Result<u8, String> {
    let f =
        Frame::decode(&Bytes::copy_from_slice(bytes)).map_err(|e| format!("is malformed: {e}"))?;
    let crate::codec::Body::TimeAnswer(t) = f.body else {
        return Err("is not a time answer".into());
    };
    let offset = t.utc_offset.unsigned_abs();
    let checks = [
        (t.tag == 0x0d, "tag"),
        ((1..=12).contains(&t.month), "month"),
        ((1..=31).contains(&t.day), "day"),
        ((1..=7).contains(&t.weekday), "weekday"),
        (t.hour < 24, "hour"),
        (t.minute < 60, "minute"),
        (t.second < 61, "second"),
        (offset % 100 < 60 && offset <= 1400, "UTC offset"),
        ((2000..=2200).contains(&t.year), "year"),
    ];
    for (ok, what) in checks {
        if !ok {
            return Err(format!("has an impossible {what} ({})", field(&t, what)));
        }
    }
    Ok(t.tag)
}

fn field(t: &crate::codec::TimeAnswer, what: &str) -> String {
    match what {
        "tag" => format!("0x{:02x}", t.tag),
        "month" => t.month.to_string(),
        "day" => t.day.to_string(),
        "weekday" => t.weekday.to_string(),
        "hour" => t.hour.to_string(),
        "minute" => t.minute.to_string(),
        "second" => t.second.to_string(),
        "UTC offset" => t.utc_offset.to_string(),
        _ => t.year.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::TimeAnswer;

    fn b(f: Frame) -> Bytes {
        Bytes::from(f.encode().unwrap())
    }

    fn d(bytes: &Bytes) -> Frame {
        Frame::decode(bytes).unwrap()
    }

    fn t0() -> Instant {
        Instant::now()
    }

    #[test]
    fn equal_answers_match_and_latencies_are_kept() {
        let mut t = Tracker::new(Settings::default());
        let now = t0();
        let req = b(Frame::ping());
        assert!(t.on_request(now, &d(&req), req.clone()).is_none());
        let pong = b(Frame::pong());
        assert!(
            t.on_answer(
                Side::Legacy,
                now + Duration::from_millis(40),
                &d(&pong),
                pong.clone()
            )
            .is_none()
        );
        let o = t
            .on_answer(
                Side::New,
                now + Duration::from_millis(7),
                &d(&pong),
                pong.clone(),
            )
            .unwrap();
        assert_eq!(o.verdict, Verdict::Match);
        assert_eq!(o.request_type, PacketType::PING);
        assert_eq!(o.legacy.unwrap().latency, Duration::from_millis(40));
        assert_eq!(o.new.unwrap().latency, Duration::from_millis(7));
        assert_eq!(t.pending(), 0);
    }

    #[test]
    fn altered_content_is_a_drift_that_says_where() {
        let mut t = Tracker::new(Settings::default());
        let now = t0();
        let req = Bytes::from_static(&[0x43, 0, 0, 0, 7, 0, 0, 0, 1, 1, 1, 6]);
        t.on_request(now, &d(&req), req.clone());
        let ack = Bytes::from_static(&[0x48, 0, 0, 0, 3, 1, 1, 0]);
        let bad = Bytes::from_static(&[0x48, 0, 0, 0, 3, 1, 1, 1]);
        t.on_answer(Side::New, now, &d(&bad), bad.clone());
        let o = t.on_answer(Side::Legacy, now, &d(&ack), ack).unwrap();
        assert_eq!(
            o.verdict,
            Verdict::Drift {
                reason: Reason::Content,
                detail: "byte 7: 0x00 vs 0x01".into()
            }
        );
    }

    #[test]
    fn one_sided_answers_are_judged_at_the_timeout() {
        let s = Settings {
            timeout: Duration::from_secs(2),
            max_pending: 10,
        };
        let mut t = Tracker::new(s);
        let now = t0();
        let ping = b(Frame::ping());
        let pong = b(Frame::pong());
        let treq = b(Frame::time_request());
        let tans = b(Frame::time_answer(TimeAnswer::from_unix(
            1_762_417_240,
            -360,
        )));
        t.on_request(now, &d(&ping), ping.clone());
        t.on_request(now, &d(&ping), ping.clone());
        t.on_request(now, &d(&treq), treq.clone());
        t.on_answer(Side::Legacy, now, &d(&pong), pong.clone());
        t.on_answer(Side::New, now, &d(&pong), pong.clone())
            .unwrap();
        // The second ping: the cloud only. The time request: the new backend only.
        t.on_answer(Side::Legacy, now, &d(&pong), pong.clone());
        t.on_answer(Side::New, now, &d(&tans), tans.clone());
        assert_eq!(t.next_deadline(), Some(now + Duration::from_secs(2)));
        assert!(t.poll(now + Duration::from_millis(1999)).is_empty());
        let out = t.poll(now + Duration::from_secs(2));
        let reasons: Vec<_> = out
            .iter()
            .map(|o| match &o.verdict {
                Verdict::Drift { reason, .. } => Some(*reason),
                _ => None,
            })
            .collect();
        assert_eq!(
            reasons,
            vec![Some(Reason::MissingNew), Some(Reason::MissingLegacy)]
        );
        assert_eq!(t.pending(), 0);
    }

    #[test]
    fn keyed_answers_pair_by_id_and_msg_in_any_order() {
        let mut t = Tracker::new(Settings::default());
        let now = t0();
        let pipe = |msg: u16| {
            Bytes::from(vec![
                0x83,
                0,
                0,
                0,
                0x0d,
                0,
                0,
                0,
                1,
                (msg >> 8) as u8,
                msg as u8,
                0,
                0x7e,
                0,
                0,
                0,
                0,
                0x7e,
            ])
        };
        let ack = |msg: u16| Bytes::from(vec![0x88, 0, 0, 0, 3, (msg >> 8) as u8, msg as u8, 0]);
        for m in [1, 2] {
            let p = pipe(m);
            t.on_request(now, &d(&p), p.clone());
        }
        assert!(t.on_answer(Side::New, now, &d(&ack(2)), ack(2)).is_none());
        assert!(
            t.on_answer(Side::Legacy, now, &d(&ack(1)), ack(1))
                .is_none()
        );
        assert_eq!(
            t.on_answer(Side::Legacy, now, &d(&ack(2)), ack(2))
                .unwrap()
                .verdict,
            Verdict::Match
        );
        // An answer nobody asked for is ignored.
        assert!(t.on_answer(Side::New, now, &d(&ack(9)), ack(9)).is_none());
        assert_eq!(t.pending(), 1);
    }

    #[test]
    fn time_answers_compare_their_shape_not_their_clock() {
        let a = b(Frame::time_answer(TimeAnswer::from_unix(
            1_762_417_240,
            -360,
        )));
        let other_clock = b(Frame::time_answer(TimeAnswer::from_unix(
            1_600_000_000,
            120,
        )));
        assert_eq!(compare(&a, &other_clock), Ok(()));
        let mut bad_offset = a.to_vec();
        let last = bad_offset.len() - 1;
        bad_offset[last] ^= 1; // -600 → -599: 99 minutes
        let e = compare(&a, &bad_offset).unwrap_err();
        assert!(e.contains("impossible UTC offset (-599)"), "{e}");
        let mut bad_month = a.to_vec();
        bad_month[8] = 13;
        assert!(compare(&a, &bad_month).unwrap_err().contains("month"));
        assert!(
            compare(&a, &b(Frame::pong()))
                .unwrap_err()
                .contains("answer type 0xc8 (time_answer) vs 0xd8 (pong)")
        );
        assert!(compare(&a, &a[..10]).is_err());
    }

    #[test]
    fn large_answers_are_kept_short_and_compared_by_digest() {
        let big = |last: u8| {
            let mut v = vec![0x88, 0, 0, 0x08, 0x00];
            v.extend(std::iter::repeat_n(0u8, 0x800 - 1));
            v.push(last);
            Bytes::from(v)
        };
        let (a, b, c) = (
            Answer::new(big(1), Duration::ZERO),
            Answer::new(big(1), Duration::ZERO),
            Answer::new(big(2), Duration::ZERO),
        );
        assert_eq!(a.bytes.len(), KEEP);
        assert_eq!(a.len, 0x805);
        assert!(!a.whole());
        assert_eq!(compare_answers(&a, &b), Ok(()));
        assert!(compare_answers(&a, &c).unwrap_err().contains("by digest"));
        let small = Answer::new(Bytes::from_static(&[0xd8, 0, 0, 0, 0]), Duration::ZERO);
        assert!(
            compare_answers(&a, &small)
                .unwrap_err()
                .contains("answer type 0x88 (pipe_sync_ack) vs 0xd8 (pong)")
        );
        let short = Answer::new(Bytes::from_static(&[0x88, 0, 0, 0, 0]), Duration::ZERO);
        assert!(compare_answers(&a, &short).unwrap_err().contains("length"));
    }

    #[test]
    fn neither_answering_is_not_a_drift_and_the_session_end_judges_only_the_expired() {
        let s = Settings {
            timeout: Duration::from_secs(1),
            max_pending: 2,
        };
        let mut t = Tracker::new(s);
        let now = t0();
        let ping = b(Frame::ping());
        t.on_request(now, &d(&ping), ping.clone());
        t.on_request(now, &d(&ping), ping.clone());
        // A third one makes room: the oldest is given up, not judged.
        assert!(
            t.on_request(now + Duration::from_secs(2), &d(&ping), ping.clone())
                .is_none()
        );
        assert_eq!(t.evicted(), 1);
        let out = t.finish(now + Duration::from_secs(2));
        assert_eq!(out.len(), 1, "the second expired; the third had time left");
        assert_eq!(t.pending(), 0);
        // Frames that expect no answer are not tracked.
        let pong = b(Frame::pong());
        assert!(t.on_request(now, &d(&pong), pong).is_none());
        assert_eq!(t.pending(), 0);
    }
}
