//! The sans-IO core of the ReliableTransport: one per device session on the new path. It is
//! fed frames and the time, and says what to send where and what happened; the I/O driver owns
//! the sockets and the timers. Nothing here blocks or allocates without bound, and the only
//! clock read is the timestamp inside each UUIDv7 `msg_id`.
//!
//! - **Towards the backend**: device frames are forwarded; those that expect an answer
//!   (`codec::answer`) are tracked until the backend answers (keyed types by id/msg, keyless
//!   ones first-in first-out). While the backend is away they wait in a bounded send queue; on
//!   reconnect the device's handshake is replayed first, then what is still unanswered.
//! - **Towards the device**: backend commands that expect a device answer (0x73 → 0x7b, …) are
//!   tracked until the device answers, and sent again after `ack_timeout` with exponential
//!   backoff (`backoff_initial` doubling to `backoff_max`, up to 20 % jitter), at most
//!   `max_retries` times, then failed. A command the backend repeats after the device acked it
//!   is not delivered again: the device's ack is replayed to the backend instead (an LRU of
//!   `dedup_size` entries living `dedup_ttl`).
//! - **Shadow**: nothing goes to the device and nothing is retransmitted towards it; backend
//!   frames are only counted.

use crate::codec::answer::{AnswerKey, answer_key, expected_answer};
use crate::codec::{Frame, PacketType};
use bytes::Bytes;
use std::collections::VecDeque;
use std::hash::Hasher as _;
use std::num::NonZeroUsize;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// What a full queue does with one more frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Overflow {
    /// Drop the oldest queued frame to make room (the default: fresh state wins).
    DropOldest,
    /// Drop the frame that arrived.
    DropNewest,
    /// Refuse the frame that arrived (counted apart from drops).
    Reject,
}

/// The core's settings (from `[new_path]`).
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// A command unanswered this long is sent again.
    pub ack_timeout: Duration,
    /// Retransmissions of a command before it fails.
    pub max_retries: u32,
    /// Backoff after the first retransmission; doubles each time.
    pub backoff_initial: Duration,
    /// Largest backoff.
    pub backoff_max: Duration,
    /// A device request unanswered by the backend this long is given up.
    pub request_timeout: Duration,
    /// Acked commands remembered for deduplication.
    pub dedup_size: usize,
    /// How long an acked command is remembered.
    pub dedup_ttl: Duration,
    /// Device frames held while the backend is away.
    pub send_queue_max: usize,
    /// Backend commands tracked until the device answers.
    pub recv_queue_max: usize,
    /// What a full queue does.
    pub overflow: Overflow,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            ack_timeout: Duration::from_secs(1),
            max_retries: 3,
            backoff_initial: Duration::from_millis(250),
            backoff_max: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            dedup_size: 1000,
            dedup_ttl: Duration::from_secs(300),
            send_queue_max: 100,
            recv_queue_max: 100,
            overflow: Overflow::DropOldest,
        }
    }
}

/// Primary (the backend answers the device) or shadow (the backend only listens).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Backend frames reach the device; commands are retransmitted.
    Primary,
    /// Backend frames are suppressed; nothing is retransmitted towards the device.
    Shadow,
    /// Watching a byte relay (the legacy path) with the same definitions: requests and
    /// commands are paired with their answers for the metrics; nothing is sent, retried or
    /// deduplicated, and a command unanswered after `request_timeout` counts as failed.
    Observe,
}

/// Which bounded queue overflowed (label `queue_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Queue {
    /// Device frames waiting for the backend.
    Send,
    /// Backend commands waiting for the device's answer.
    Recv,
}

impl Queue {
    /// Metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Send => "send",
            Self::Recv => "recv",
        }
    }
}

/// What happened, for metrics and trace logs. Fields: `msg_id` (a UUIDv7) follows one tracked
/// frame from its first send through every retry to its answer; `ptype` is the tracked frame's
/// type; `latency` runs from the first send to the answer; `attempt` counts retransmissions
/// from 1, `retries` how many there were.
#[derive(Clone, Debug, PartialEq)]
#[allow(missing_docs)]
pub enum Event {
    /// A device request expecting an answer went to the backend.
    RequestSent { msg_id: Uuid, ptype: PacketType },
    /// The backend answered it.
    RequestAnswered {
        msg_id: Uuid,
        ptype: PacketType,
        latency: Duration,
    },
    /// No answer within `request_timeout`.
    RequestTimedOut { msg_id: Uuid, ptype: PacketType },
    /// A backend command went to the device.
    CommandSent { msg_id: Uuid, ptype: PacketType },
    /// Sent again after no answer (`attempt` counts from 1).
    CommandRetransmitted {
        msg_id: Uuid,
        ptype: PacketType,
        attempt: u32,
    },
    /// The device answered it.
    CommandAcked {
        msg_id: Uuid,
        ptype: PacketType,
        latency: Duration,
        retries: u32,
    },
    /// No answer after every retry.
    CommandFailed { msg_id: Uuid, ptype: PacketType },
    /// A backend command the device already acked (or still has): not delivered again.
    Duplicate { ptype: PacketType },
    /// A backend frame kept from the device (shadow).
    Suppressed { ptype: PacketType },
    /// A queue was full: a frame was dropped (`rejected`: refused under `reject`).
    QueueFull { queue: Queue, rejected: bool },
    /// A new backend connection accepted the replayed hello (or there was none to replay):
    /// the backend is back.
    BackendAccepted,
}

/// What to do: bytes for a leg, or an event to count.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    /// Write to the backend.
    ToBackend(Bytes),
    /// Write to the device.
    ToDevice(Bytes),
    /// Count or log.
    Event(Event),
}

struct Request {
    msg_id: Uuid,
    ptype: PacketType,
    key: AnswerKey,
    bytes: Bytes,
    sent_at: Instant,
    /// Written to a backend connection (else it waits in the send queue).
    sent: bool,
}

struct Command {
    msg_id: Uuid,
    ptype: PacketType,
    key: AnswerKey,
    dedup: u64,
    /// The backend connection it came on (a restarted backend's counters start over, so its
    /// commands are only duplicates of those of the same connection).
    epoch: u32,
    bytes: Bytes,
    first_sent: Instant,
    deadline: Instant,
    retries: u32,
}

/// The core of one session.
pub struct Core {
    settings: Settings,
    role: Role,
    connected: bool,
    /// The device's 0x23 (or 0x13), replayed first on every backend connection.
    hello: Option<Bytes>,
    requests: VecDeque<Request>,
    commands: VecDeque<Command>,
    send_queue: VecDeque<Bytes>,
    /// Acked commands: their digest → (when acked, the device's answer).
    acked: lru::LruCache<u64, (Instant, Bytes)>,
    rng: u64,
    /// The hello was replayed on a new backend connection: its answer is not the device's.
    hello_replayed: bool,
    /// Backend connections so far.
    epoch: u32,
}

fn digest(bytes: &[u8]) -> u64 {
    let mut h = siphasher::sip::SipHasher13::new_with_keys(0x6379_6e63, 0x6d69_746d);
    h.write(bytes);
    h.finish()
}

impl Core {
    /// A core for a session in `role`; `seed` drives the jitter (tests pass a constant).
    pub fn new(settings: Settings, role: Role, seed: u64) -> Self {
        let size = NonZeroUsize::new(settings.dedup_size.max(1)).unwrap_or(NonZeroUsize::MIN);
        Self {
            settings,
            role,
            connected: false,
            hello: None,
            requests: VecDeque::new(),
            commands: VecDeque::new(),
            send_queue: VecDeque::new(),
            acked: lru::LruCache::new(size),
            rng: seed | 1,
            hello_replayed: false,
            epoch: 0,
        }
    }

    /// Takes over a session whose first backend connection is up and whose hello (`hello`,
    /// the device's 0x23 or 0x13) was already answered.
    pub fn resume(&mut self, hello: Bytes) {
        self.hello = Some(hello);
        self.connected = true;
    }

    /// Tracks a device frame that already went to the backend (written before the core took
    /// over): like [`Core::on_device_frame`], without sending it again.
    pub fn note_sent(&mut self, now: Instant, bytes: Bytes) -> Vec<Output> {
        let mut out = self.on_device_frame(now, bytes);
        out.retain(|o| !matches!(o, Output::ToBackend(_)));
        out
    }

    /// Tracks a backend frame that already reached the device.
    pub fn note_delivered(&mut self, now: Instant, bytes: Bytes) -> Vec<Output> {
        let mut out = self.on_backend_frame(now, bytes);
        out.retain(|o| !matches!(o, Output::ToDevice(_)));
        out
    }

    /// Frames waiting for the backend.
    pub fn send_queue_len(&self) -> usize {
        self.send_queue.len()
    }

    /// Commands waiting for the device's answer.
    pub fn commands_pending(&self) -> usize {
        self.commands.len()
    }

    /// Requests waiting for the backend's answer.
    pub fn requests_pending(&self) -> usize {
        self.requests.len()
    }

    /// Whether the backend connection is up.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    fn jitter(&mut self, d: Duration) -> Duration {
        // xorshift64: deterministic for a seed, plenty for spreading retries.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let frac = (self.rng % 1000) as u32; // 0..1000 → up to +20 %
        d + d * frac / 5000
    }

    /// Backoff after retransmission number `attempt` (1-based).
    fn backoff(&mut self, attempt: u32) -> Duration {
        let base = self
            .settings
            .backoff_initial
            .saturating_mul(1u32 << (attempt.saturating_sub(1)).min(16))
            .min(self.settings.backoff_max);
        self.jitter(base)
    }

    fn send_backend(&mut self, bytes: Bytes, out: &mut Vec<Output>) {
        if self.connected {
            out.push(Output::ToBackend(bytes));
            return;
        }
        if self.send_queue.len() >= self.settings.send_queue_max {
            match self.settings.overflow {
                Overflow::DropOldest => {
                    self.send_queue.pop_front();
                }
                Overflow::DropNewest | Overflow::Reject => {
                    out.push(Output::Event(Event::QueueFull {
                        queue: Queue::Send,
                        rejected: self.settings.overflow == Overflow::Reject,
                    }));
                    return;
                }
            }
            out.push(Output::Event(Event::QueueFull {
                queue: Queue::Send,
                rejected: false,
            }));
        }
        self.send_queue.push_back(bytes);
    }

    /// A whole frame from the device.
    pub fn on_device_frame(&mut self, now: Instant, bytes: Bytes) -> Vec<Output> {
        let frame = Frame::decode(&bytes).ok();
        self.on_device_parsed(now, bytes, frame.as_ref())
    }

    /// [`Core::on_device_frame`] with the frame already decoded (`None`: it does not decode).
    pub fn on_device_parsed(
        &mut self,
        now: Instant,
        bytes: Bytes,
        frame: Option<&Frame>,
    ) -> Vec<Output> {
        let mut out = Vec::new();
        if let Some(f) = frame {
            if matches!(f.ptype, PacketType::HANDSHAKE | PacketType::LOGIN) {
                self.hello = Some(bytes.clone());
            }
            // The device answering a backend command.
            if let Some(key) = answer_key(f)
                && let Some(i) = self.commands.iter().position(|c| c.key == key)
                && let Some(c) = self.commands.remove(i)
            {
                if self.role != Role::Observe {
                    self.acked.put(c.dedup, (now, bytes.clone()));
                }
                out.push(Output::Event(Event::CommandAcked {
                    msg_id: c.msg_id,
                    ptype: c.ptype,
                    latency: now.saturating_duration_since(c.first_sent),
                    retries: c.retries,
                }));
            }
            // A request the backend is to answer (the hello is answered too, but replayed, so
            // it is tracked like any other).
            if let Some(key) = expected_answer(f) {
                // An observer's events are only counted: no id to follow in trace logs.
                let msg_id = if self.role == Role::Observe {
                    Uuid::nil()
                } else {
                    Uuid::now_v7()
                };
                self.requests.push_back(Request {
                    msg_id,
                    ptype: f.ptype,
                    key,
                    // Kept to resend after a reconnect; an observer never resends.
                    bytes: if self.role == Role::Observe {
                        Bytes::new()
                    } else {
                        bytes.clone()
                    },
                    sent_at: now,
                    sent: self.connected,
                });
                // Bounded like the queues: the oldest unanswered request is given up, as if it
                // had timed out (it was sent; only its answer is no longer awaited).
                if self.requests.len() > self.settings.send_queue_max.max(1)
                    && let Some(r) = self.requests.pop_front()
                {
                    out.push(Output::Event(Event::RequestTimedOut {
                        msg_id: r.msg_id,
                        ptype: r.ptype,
                    }));
                }
                out.push(Output::Event(Event::RequestSent {
                    msg_id,
                    ptype: f.ptype,
                }));
            }
        }
        if self.role != Role::Observe {
            self.send_backend(bytes, &mut out);
        }
        out
    }

    /// A whole frame from the backend.
    pub fn on_backend_frame(&mut self, now: Instant, bytes: Bytes) -> Vec<Output> {
        let frame = Frame::decode(&bytes).ok();
        self.on_backend_parsed(now, bytes, frame.as_ref())
    }

    /// [`Core::on_backend_frame`] with the frame already decoded.
    pub fn on_backend_parsed(
        &mut self,
        now: Instant,
        bytes: Bytes,
        frame: Option<&Frame>,
    ) -> Vec<Output> {
        let mut out = Vec::new();
        let ptype = PacketType(bytes.first().copied().unwrap_or(0));
        if let Some(f) = frame {
            // The backend answering a device request: the oldest match.
            if let Some(key) = answer_key(f)
                && let Some(i) = self.requests.iter().position(|r| r.key == key)
                && let Some(r) = self.requests.remove(i)
            {
                out.push(Output::Event(Event::RequestAnswered {
                    msg_id: r.msg_id,
                    ptype: r.ptype,
                    latency: now.saturating_duration_since(r.sent_at),
                }));
            }
        }
        if self.hello_replayed
            && matches!(ptype, PacketType::HANDSHAKE_ACK | PacketType::LOGIN_RESULT)
        {
            // The answer to the replayed hello: the device had its own long ago. The backend
            // accepted the session again.
            self.hello_replayed = false;
            out.push(Output::Event(Event::Suppressed { ptype }));
            out.push(Output::Event(Event::BackendAccepted));
            return out;
        }
        if self.role == Role::Shadow {
            out.push(Output::Event(Event::Suppressed { ptype }));
            return out;
        }
        // A command the device is to answer: a pipe command or a probe (other request
        // types come from devices, not from the cloud side).
        if self.role == Role::Observe {
            if let Some(f) = frame
                && matches!(f.ptype, PacketType::PIPE | PacketType::PROBE)
                && let Some(key) = expected_answer(f)
            {
                if self.commands.len() >= self.settings.recv_queue_max {
                    self.commands.pop_front();
                }
                self.commands.push_back(Command {
                    msg_id: Uuid::nil(),
                    ptype,
                    key,
                    dedup: 0,
                    epoch: self.epoch,
                    bytes: Bytes::new(),
                    first_sent: now,
                    deadline: now + self.settings.request_timeout,
                    retries: 0,
                });
            }
            return out;
        }
        if let Some(f) = frame
            && matches!(f.ptype, PacketType::PIPE | PacketType::PROBE)
            && let Some(key) = expected_answer(f)
        {
            let dedup = digest(&bytes);
            if let Some((at, ack)) = self.acked.get(&dedup).cloned() {
                if now.saturating_duration_since(at) <= self.settings.dedup_ttl {
                    // Already done: the backend missed the ack, so it gets it again.
                    out.push(Output::Event(Event::Duplicate { ptype }));
                    self.send_backend(ack, &mut out);
                    return out;
                }
                self.acked.pop(&dedup);
            }
            if self
                .commands
                .iter()
                .any(|c| c.dedup == dedup && c.epoch == self.epoch)
            {
                // Still on its way: the retries take care of it.
                out.push(Output::Event(Event::Duplicate { ptype }));
                return out;
            }
            if self.commands.len() >= self.settings.recv_queue_max {
                match self.settings.overflow {
                    Overflow::DropOldest => {
                        // The oldest is no longer tracked (counted as a queue drop, not an
                        // ack timeout).
                        self.commands.pop_front();
                        out.push(Output::Event(Event::QueueFull {
                            queue: Queue::Recv,
                            rejected: false,
                        }));
                    }
                    Overflow::DropNewest | Overflow::Reject => {
                        out.push(Output::Event(Event::QueueFull {
                            queue: Queue::Recv,
                            rejected: self.settings.overflow == Overflow::Reject,
                        }));
                        return out;
                    }
                }
            }
            let msg_id = Uuid::now_v7();
            self.commands.push_back(Command {
                msg_id,
                ptype,
                key,
                dedup,
                epoch: self.epoch,
                bytes: bytes.clone(),
                first_sent: now,
                deadline: now + self.settings.ack_timeout,
                retries: 0,
            });
            out.push(Output::Event(Event::CommandSent { msg_id, ptype }));
        }
        out.push(Output::ToDevice(bytes));
        out
    }

    /// Retransmissions and timeouts due at `now`.
    pub fn poll(&mut self, now: Instant) -> Vec<Output> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.commands.len() {
            if self.commands[i].deadline > now {
                i += 1;
                continue;
            }
            // Observed sessions are never retried: a command is failed at its deadline.
            if self.commands[i].retries >= self.settings.max_retries || self.role == Role::Observe {
                if let Some(c) = self.commands.remove(i) {
                    out.push(Output::Event(Event::CommandFailed {
                        msg_id: c.msg_id,
                        ptype: c.ptype,
                    }));
                }
                continue;
            }
            let attempt = self.commands[i].retries + 1;
            let wait = self.backoff(attempt);
            let c = &mut self.commands[i];
            c.retries = attempt;
            c.deadline = now + wait;
            out.push(Output::Event(Event::CommandRetransmitted {
                msg_id: c.msg_id,
                ptype: c.ptype,
                attempt,
            }));
            out.push(Output::ToDevice(c.bytes.clone()));
            i += 1;
        }
        let timeout = self.settings.request_timeout;
        while let Some(r) = self.requests.front() {
            if now.saturating_duration_since(r.sent_at) < timeout {
                break;
            }
            if let Some(r) = self.requests.pop_front() {
                out.push(Output::Event(Event::RequestTimedOut {
                    msg_id: r.msg_id,
                    ptype: r.ptype,
                }));
            }
        }
        out
    }

    /// The session ended: what is still unanswered failed (the device or the upstream left
    /// without answering). For the observed legacy path, where timeouts are only checked as
    /// frames pass.
    pub fn finish(&mut self) -> Vec<Output> {
        let mut out = Vec::new();
        for c in self.commands.drain(..) {
            out.push(Output::Event(Event::CommandFailed {
                msg_id: c.msg_id,
                ptype: c.ptype,
            }));
        }
        for r in self.requests.drain(..) {
            out.push(Output::Event(Event::RequestTimedOut {
                msg_id: r.msg_id,
                ptype: r.ptype,
            }));
        }
        out
    }

    /// When [`Core::poll`] has something to do next.
    pub fn next_deadline(&self) -> Option<Instant> {
        let commands = self.commands.iter().map(|c| c.deadline).min();
        let requests = self
            .requests
            .front()
            .map(|r| r.sent_at + self.settings.request_timeout);
        match (commands, requests) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The backend connection is up (again): the hello first, then the requests still
    /// unanswered, then what queued while it was away.
    pub fn on_backend_connected(&mut self, now: Instant) -> Vec<Output> {
        let _ = now;
        self.connected = true;
        self.epoch = self.epoch.wrapping_add(1);
        // A new connection may be a restarted backend whose counters start over: what the
        // old one sent is no reason to drop what this one sends.
        self.acked.clear();
        let mut out = Vec::new();
        let hello = self.hello.clone();
        if let Some(h) = &hello {
            out.push(Output::ToBackend(h.clone()));
            // Answered already unless the hello itself is still waiting for its answer.
            self.hello_replayed = !self.requests.iter().any(|r| r.bytes == *h);
        } else {
            out.push(Output::Event(Event::BackendAccepted));
        }
        // Requests the lost connection took without answering go again, in order; the hello
        // was just replayed.
        for r in &mut self.requests {
            if r.sent && hello.as_ref() != Some(&r.bytes) {
                out.push(Output::ToBackend(r.bytes.clone()));
            }
            r.sent = true;
        }
        // Then what queued while it was away (the hello, if queued, went first already).
        for q in self.send_queue.drain(..) {
            if hello.as_ref() != Some(&q) {
                out.push(Output::ToBackend(q));
            }
        }
        out
    }

    /// The backend connection was lost: device frames queue until it is back.
    pub fn on_backend_lost(&mut self) {
        self.connected = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::payload::{Action, Command};
    use crate::codec::{DeviceId, Msg};

    fn b(f: Frame) -> Bytes {
        Bytes::from(f.encode().unwrap())
    }

    fn pipe(id: u32, seq: u16) -> Bytes {
        // A 0x73 power command from the backend, as the simulated cloud sends.
        let cmd = Command {
            seq: u32::from(seq),
            mesh_id: 1,
            action: Action::Power { on: true },
        };
        b(Frame::pipe(
            id,
            Msg::counter(seq),
            cmd.to_inner(u32::from(seq)),
        ))
    }

    fn pipe_ack(id: u32, seq: u16) -> Bytes {
        b(Frame::pipe_ack(id, Msg::counter(seq)))
    }

    fn events(out: &[Output]) -> Vec<&Event> {
        out.iter()
            .filter_map(|o| match o {
                Output::Event(e) => Some(e),
                _ => None,
            })
            .collect()
    }

    fn to_device(out: &[Output]) -> usize {
        out.iter()
            .filter(|o| matches!(o, Output::ToDevice(_)))
            .count()
    }

    fn connected(role: Role) -> (Core, Instant) {
        let mut c = Core::new(Settings::default(), role, 7);
        let t = Instant::now();
        c.on_backend_connected(t);
        (c, t)
    }

    #[test]
    fn commands_are_retried_with_backoff_then_failed() {
        let (mut c, t0) = connected(Role::Primary);
        let out = c.on_backend_frame(t0, pipe(5, 1));
        assert_eq!(to_device(&out), 1);
        assert!(matches!(events(&out)[0], Event::CommandSent { .. }));
        assert_eq!(c.next_deadline(), Some(t0 + Duration::from_secs(1)));
        assert!(c.poll(t0 + Duration::from_millis(999)).is_empty());
        // Retransmissions at ack_timeout, then 250 ms, 500 ms (each with at most +20 %).
        let mut t = t0 + Duration::from_secs(1);
        let mut gaps = Vec::new();
        for attempt in 1..=3 {
            let out = c.poll(t);
            assert_eq!(to_device(&out), 1, "attempt {attempt}");
            assert!(matches!(
                events(&out)[0],
                Event::CommandRetransmitted { attempt: a, .. } if *a == attempt
            ));
            let next = c.next_deadline().unwrap();
            gaps.push(next - t);
            t = next;
        }
        assert!(
            gaps[0] >= Duration::from_millis(250) && gaps[0] <= Duration::from_millis(300),
            "{gaps:?}"
        );
        assert!(
            gaps[1] >= Duration::from_millis(500) && gaps[1] <= Duration::from_millis(600),
            "{gaps:?}"
        );
        assert!(
            gaps[2] >= Duration::from_secs(1) && gaps[2] <= Duration::from_millis(1200),
            "{gaps:?}"
        );
        let out = c.poll(t);
        assert_eq!(to_device(&out), 0);
        assert!(matches!(events(&out)[0], Event::CommandFailed { .. }));
        assert_eq!(c.commands_pending(), 0);
        assert_eq!(c.next_deadline(), None);
    }

    #[test]
    fn backoff_is_capped() {
        let mut c = Core::new(
            Settings {
                max_retries: 10,
                ..Settings::default()
            },
            Role::Primary,
            1,
        );
        for attempt in 1..=10 {
            let d = c.backoff(attempt);
            assert!(d <= Duration::from_secs(6), "{attempt}: {d:?}");
        }
        assert!(c.backoff(8) >= Duration::from_secs(5));
    }

    #[test]
    fn an_ack_ends_the_retries_and_a_repeat_is_answered_from_the_cache() {
        let (mut c, t0) = connected(Role::Primary);
        c.on_backend_frame(t0, pipe(5, 1));
        c.poll(t0 + Duration::from_secs(1)); // one retry
        let ack = pipe_ack(5, 1);
        let t1 = t0 + Duration::from_millis(1100);
        let out = c.on_device_frame(t1, ack.clone());
        assert!(
            out.contains(&Output::ToBackend(ack.clone())),
            "the ack goes on"
        );
        assert!(events(&out).iter().any(|e| matches!(
            e,
            Event::CommandAcked { retries: 1, latency, .. } if *latency == Duration::from_millis(1100)
        )));
        assert_eq!(c.commands_pending(), 0);
        assert!(c.poll(t0 + Duration::from_secs(60)).is_empty());
        // The backend sends the same command again (it missed the ack): the device does not
        // see it twice, the backend gets the ack again.
        let out = c.on_backend_frame(t1 + Duration::from_secs(2), pipe(5, 1));
        assert_eq!(to_device(&out), 0);
        assert!(out.contains(&Output::ToBackend(ack)));
        assert!(matches!(events(&out)[0], Event::Duplicate { .. }));
        // After the TTL it is a new command.
        let out = c.on_backend_frame(t1 + Duration::from_secs(301), pipe(5, 1));
        assert_eq!(to_device(&out), 1);
        // A different command (another msg) is not a duplicate.
        let out = c.on_backend_frame(t1 + Duration::from_secs(302), pipe(5, 2));
        assert_eq!(to_device(&out), 1);
    }

    #[test]
    fn a_repeat_while_pending_is_not_delivered_twice() {
        let (mut c, t0) = connected(Role::Primary);
        assert_eq!(to_device(&c.on_backend_frame(t0, pipe(5, 1))), 1);
        let out = c.on_backend_frame(t0 + Duration::from_millis(10), pipe(5, 1));
        assert_eq!(to_device(&out), 0);
        assert_eq!(c.commands_pending(), 1);
    }

    #[test]
    fn the_dedup_cache_is_bounded() {
        let mut c = Core::new(
            Settings {
                dedup_size: 10,
                ..Settings::default()
            },
            Role::Primary,
            3,
        );
        let t = Instant::now();
        c.on_backend_connected(t);
        for seq in 0..50u16 {
            c.on_backend_frame(t, pipe(9, seq));
            c.on_device_frame(t, pipe_ack(9, seq));
        }
        assert_eq!(c.acked.len(), 10);
        // The oldest were forgotten: a repeat of seq 0 is delivered again.
        assert_eq!(to_device(&c.on_backend_frame(t, pipe(9, 0))), 1);
        assert_eq!(to_device(&c.on_backend_frame(t, pipe(9, 49))), 0);
    }

    #[test]
    fn device_requests_are_tracked_until_the_backend_answers() {
        let (mut c, t0) = connected(Role::Primary);
        let ping = b(Frame::ping());
        let out = c.on_device_frame(t0, ping.clone());
        assert!(out.contains(&Output::ToBackend(ping)));
        assert!(matches!(events(&out)[0], Event::RequestSent { .. }));
        let out = c.on_backend_frame(t0 + Duration::from_millis(40), b(Frame::pong()));
        assert!(events(&out).iter().any(|e| matches!(
            e,
            Event::RequestAnswered { latency, .. } if *latency == Duration::from_millis(40)
        )));
        assert_eq!(to_device(&out), 1, "the answer reaches the device");
        // One that is never answered times out.
        c.on_device_frame(t0, b(Frame::ping()));
        let out = c.poll(t0 + Duration::from_secs(10));
        assert!(matches!(events(&out)[0], Event::RequestTimedOut { .. }));
        assert_eq!(c.requests_pending(), 0);
    }

    #[test]
    fn requests_beyond_the_bound_are_given_up_as_timed_out_and_still_sent() {
        for role in [Role::Primary, Role::Shadow, Role::Observe] {
            let mut c = Core::new(
                Settings {
                    send_queue_max: 2,
                    ..Settings::default()
                },
                role,
                1,
            );
            let t0 = Instant::now();
            c.on_backend_connected(t0);
            let mut timed_out = 0;
            let mut sent = 0;
            for _ in 0..5 {
                let out = c.on_device_frame(t0, b(Frame::ping()));
                timed_out += events(&out)
                    .iter()
                    .filter(|e| matches!(e, Event::RequestTimedOut { .. }))
                    .count();
                sent += out
                    .iter()
                    .filter(|o| matches!(o, Output::ToBackend(_)))
                    .count();
                assert!(
                    !events(&out)
                        .iter()
                        .any(|e| matches!(e, Event::QueueFull { .. })),
                    "{role:?}: a tracked request is not a dropped frame"
                );
            }
            assert_eq!(timed_out, 3, "{role:?}");
            assert_eq!(c.requests_pending(), 2, "{role:?}");
            let want = if role == Role::Observe { 0 } else { 5 };
            assert_eq!(sent, want, "{role:?}: every frame still goes out");
        }
    }

    #[test]
    fn shadow_delivers_and_retransmits_nothing_to_the_device() {
        let (mut c, t0) = connected(Role::Shadow);
        c.on_device_frame(t0, b(Frame::ping()));
        let out = c.on_backend_frame(t0, pipe(5, 1));
        assert_eq!(to_device(&out), 0);
        assert!(matches!(events(&out)[0], Event::Suppressed { .. }));
        let out = c.on_backend_frame(t0, b(Frame::pong()));
        assert_eq!(to_device(&out), 0);
        assert!(
            events(&out)
                .iter()
                .any(|e| matches!(e, Event::RequestAnswered { .. }))
        );
        assert!(
            c.poll(t0 + Duration::from_secs(30))
                .iter()
                .all(|o| !matches!(o, Output::ToDevice(_)))
        );
        assert_eq!(c.commands_pending(), 0);
    }

    #[test]
    fn a_reconnect_replays_the_handshake_then_the_unanswered_then_the_queue() {
        let mut c = Core::new(Settings::default(), Role::Primary, 5);
        let t0 = Instant::now();
        let hello = b(Frame::handshake(DeviceId(0x1234), b"0123456789abcdef", 60));
        // Before the backend is up, frames queue.
        assert!(
            c.on_device_frame(t0, hello.clone())
                .iter()
                .all(|o| !matches!(o, Output::ToBackend(_)))
        );
        let out = c.on_backend_connected(t0);
        assert_eq!(out, vec![Output::ToBackend(hello.clone())]);
        c.on_backend_frame(t0, b(Frame::handshake_ack()));
        let ping = b(Frame::ping());
        c.on_device_frame(t0, ping.clone()); // unanswered
        c.on_backend_lost();
        let status = b(Frame::ping());
        c.on_device_frame(t0, status.clone()); // queued while away (a second ping)
        assert_eq!(c.send_queue_len(), 1);
        let out = c.on_backend_connected(t0 + Duration::from_secs(1));
        let sent: Vec<&Bytes> = out
            .iter()
            .filter_map(|o| match o {
                Output::ToBackend(b) => Some(b),
                _ => None,
            })
            .collect();
        assert_eq!(
            sent,
            vec![&hello, &ping, &status],
            "hello, the unanswered ping, the queued one"
        );
        assert_eq!(c.send_queue_len(), 0);
    }

    #[test]
    fn a_resumed_session_swallows_the_answer_to_its_replayed_hello() {
        let mut c = Core::new(Settings::default(), Role::Primary, 5);
        let t = Instant::now();
        let hello = b(Frame::handshake(DeviceId(0x1234), b"0123456789abcdef", 60));
        c.resume(hello.clone());
        assert!(c.is_connected());
        c.note_sent(t, b(Frame::ping()));
        assert_eq!(c.requests_pending(), 1);
        c.on_backend_lost();
        let out = c.on_backend_connected(t);
        assert_eq!(out[0], Output::ToBackend(hello));
        // The backend answers the replayed hello: the device does not see a second 0x28.
        let out = c.on_backend_frame(t, b(Frame::handshake_ack()));
        assert_eq!(to_device(&out), 0);
        // The resent ping's answer does reach it.
        let out = c.on_backend_frame(t, b(Frame::pong()));
        assert_eq!(to_device(&out), 1);
        // A command already delivered before the core took over is tracked, not re-sent.
        let out = c.note_delivered(t, pipe(3, 1));
        assert_eq!(to_device(&out), 0);
        assert_eq!(c.commands_pending(), 1);
    }

    #[test]
    fn observing_pairs_without_sending_retrying_or_dropping() {
        let mut c = Core::new(Settings::default(), Role::Observe, 1);
        let t0 = Instant::now();
        c.resume(b(Frame::handshake(DeviceId(1), b"0123456789abcdef", 60)));
        // A cloud command, answered by the device 30 ms later.
        let out = c.on_backend_frame(t0, pipe(1, 1));
        assert!(out.is_empty(), "{out:?}");
        let out = c.on_device_frame(t0 + Duration::from_millis(30), pipe_ack(1, 1));
        assert_eq!(out.len(), 1, "only the event: {out:?}");
        assert!(matches!(
            &out[0],
            Output::Event(Event::CommandAcked { retries: 0, latency, .. }) if *latency == Duration::from_millis(30)
        ));
        // The same command twice (the cloud repeated it): both tracked, neither dropped.
        c.on_backend_frame(t0, pipe(1, 2));
        c.on_backend_frame(t0, pipe(1, 2));
        assert_eq!(c.commands_pending(), 2);
        // Unanswered: no retransmission, a failure after request_timeout.
        assert!(c.poll(t0 + Duration::from_secs(5)).is_empty());
        let out = c.poll(t0 + Duration::from_secs(10));
        assert_eq!(to_device(&out), 0);
        assert_eq!(
            events(&out)
                .iter()
                .filter(|e| matches!(e, Event::CommandFailed { .. }))
                .count(),
            2
        );
        // A device request and the cloud's answer: latency, nothing forwarded.
        let out = c.on_device_frame(t0, b(Frame::ping()));
        assert!(out.iter().all(|o| matches!(o, Output::Event(_))));
        let out = c.on_backend_frame(t0 + Duration::from_millis(7), b(Frame::pong()));
        assert!(matches!(
            events(&out)[0],
            Event::RequestAnswered { latency, .. } if *latency == Duration::from_millis(7)
        ));
    }

    #[test]
    fn full_queues_drop_and_count_by_policy() {
        for (policy, kept_first) in [
            (Overflow::DropOldest, false),
            (Overflow::DropNewest, true),
            (Overflow::Reject, true),
        ] {
            let mut c = Core::new(
                Settings {
                    send_queue_max: 3,
                    recv_queue_max: 2,
                    overflow: policy,
                    ..Settings::default()
                },
                Role::Primary,
                9,
            );
            let t = Instant::now();
            let frames: Vec<Bytes> = (0..5u16).map(|i| pipe_ack(1, i)).collect();
            let mut full = 0;
            for f in &frames {
                full += events(&c.on_device_frame(t, f.clone()))
                    .iter()
                    .filter(|e| {
                        matches!(
                            e,
                            Event::QueueFull {
                                queue: Queue::Send,
                                ..
                            }
                        )
                    })
                    .count();
            }
            assert_eq!(c.send_queue_len(), 3, "{policy:?}");
            assert_eq!(full, 2, "{policy:?}");
            assert_eq!(
                c.send_queue.front() == Some(&frames[0]),
                kept_first,
                "{policy:?}"
            );
            // Commands towards the device are bounded too.
            c.on_backend_connected(t);
            let mut full = 0;
            for seq in 0..4u16 {
                full += events(&c.on_backend_frame(t, pipe(2, seq)))
                    .iter()
                    .filter(|e| {
                        matches!(
                            e,
                            Event::QueueFull {
                                queue: Queue::Recv,
                                ..
                            }
                        )
                    })
                    .count();
            }
            assert_eq!(c.commands_pending(), 2, "{policy:?}");
            assert_eq!(full, 2, "{policy:?}");
        }
    }

    #[test]
    fn undecodable_frames_pass_untracked() {
        let (mut c, t0) = connected(Role::Primary);
        let junk = Bytes::from_static(&[0x73, 0, 0, 0, 2, 1, 2]);
        let out = c.on_backend_frame(t0, junk.clone());
        assert_eq!(out, vec![Output::ToDevice(junk.clone())]);
        let out = c.on_device_frame(t0, junk.clone());
        assert_eq!(out, vec![Output::ToBackend(junk)]);
    }
}
