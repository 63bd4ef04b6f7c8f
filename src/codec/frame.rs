//! Outer frames: typed bodies for every packet type of the protocol reference §2.3, their decoder
//! and their encoder. Decoding keeps every byte, so `encode(decode(x)) == x` for the frames real
//! senders produce; unknown types are kept as [`Body::Raw`].

use super::header::{HEADER_LEN, Header, PacketType};
use super::inner::{InnerError, InnerFrame};
use super::tlv::{self, Record};
use super::{DecodeError, EncodeError};
use bytes::Bytes;
use std::fmt;

/// A device's cloud id (from the 0x23 handshake; bytes 5–8 of its later frames).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(pub u32);

/// Eight hex digits, as ids appear in captures (`37962469`).
impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08x}", self.0)
    }
}

/// The 3-byte message field: a u16 BE counter and one more byte (0 in requests, a status code in
/// the cloud's 0x78/0xa8 frames).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Msg(pub [u8; 3]);

impl Msg {
    /// A request message field for counter `n`.
    pub fn counter(n: u16) -> Self {
        let b = n.to_be_bytes();
        Self([b[0], b[1], 0])
    }

    /// The u16 BE counter in the first two bytes.
    pub fn number(self) -> u16 {
        u16::from_be_bytes([self.0[0], self.0[1]])
    }

    /// The third byte.
    pub fn code(self) -> u8 {
        self.0[2]
    }

    fn read(b: &[u8]) -> Option<Self> {
        Some(Self(b.get(..3)?.try_into().ok()?))
    }
}

impl fmt::Display for Msg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}{:02x}{:02x}", self.0[0], self.0[1], self.0[2])
    }
}

/// The 4-byte id and 3-byte message field that start most bodies (§2.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Envelope {
    /// Device id, or the app/user id when the cloud relays (u32 BE).
    pub id: u32,
    /// Message field.
    pub msg: Msg,
}

/// Bytes of an [`Envelope`] on the wire.
pub const ENVELOPE_LEN: usize = 7;

impl Envelope {
    fn read(body: &[u8], what: &'static str) -> Result<Self, DecodeError> {
        match body.get(..ENVELOPE_LEN) {
            Some(b) => Ok(Self {
                id: u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
                msg: Msg([b[4], b[5], b[6]]),
            }),
            None => Err(DecodeError::Short {
                what,
                need: ENVELOPE_LEN,
                got: body.len(),
            }),
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.id.to_be_bytes());
        out.extend_from_slice(&self.msg.0);
    }
}

/// 0x13 app login.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Login {
    /// Protocol version byte (3).
    pub version: u8,
    /// App/user id.
    pub user_id: u32,
    /// Authorize string (u16 BE length prefix on the wire).
    pub auth: Bytes,
    /// Trailer (3 bytes, `00 00 1e` / `00 00 b4`).
    pub trailer: Bytes,
}

/// 0x23 device handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handshake {
    /// Protocol version byte (3).
    pub version: u8,
    /// The device's cloud id.
    pub device_id: DeviceId,
    /// 16-character authorize code (u16 BE length prefix on the wire).
    pub auth_code: Bytes,
    /// Trailer, normally `00 00 3c`.
    pub trailer: Bytes,
}

impl Handshake {
    /// The trailer read as a number (plausibly a heartbeat/idle timeout in seconds, §2.5).
    pub fn trailer_value(&self) -> Option<u32> {
        (self.trailer.len() <= 4 && !self.trailer.is_empty()).then(|| {
            self.trailer
                .iter()
                .fold(0u32, |a, &b| (a << 8) | u32::from(b))
        })
    }
}

/// 0x43 sync: envelope then TLV records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sync {
    /// Id and message field (always `01 01 06` in samples).
    pub env: Envelope,
    /// The records.
    pub records: Vec<Record>,
    /// Bytes after the last whole record (e.g. `7f fe` from 2026 firmware).
    pub trailing: Bytes,
}

/// An inner frame that could not be decoded, kept as its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidInner {
    /// Why.
    pub error: InnerError,
    /// The bytes after the envelope, as received.
    pub bytes: Bytes,
}

/// 0x73 pipe / 0x83 pipe-sync body: envelope then one inner frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pipe {
    /// Id and message field.
    pub env: Envelope,
    /// The inner frame, or why it could not be read.
    pub inner: Result<InnerFrame, InvalidInner>,
}

/// 0x78 / 0xa8: the cloud's own status on a message (third msg byte = status code).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloudStatus {
    /// Id and message field.
    pub env: Envelope,
    /// Bytes after the envelope (0xa8 carries one `00`).
    pub extra: Bytes,
}

impl CloudStatus {
    /// The status code (0x0a ≈ 30 s timeout, 0x05 ≈ unknown message; uncertain, §5).
    pub fn status(&self) -> u8 {
        self.env.msg.code()
    }
}

/// 0xa3 probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    /// Id and message field.
    pub env: Envelope,
    /// Bytes after the envelope (PY adds `02`).
    pub extra: Bytes,
}

/// 0xab probe reply: the id, then either msg + `07 00 09 "xlink_dev"` + padding (devices) or JSON
/// text (thermostats).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeReply {
    /// Id (u32 BE).
    pub id: u32,
    /// Everything after the id.
    pub rest: Bytes,
}

impl ProbeReply {
    fn text_form(&self) -> Option<&str> {
        let s = std::str::from_utf8(&self.rest).ok()?;
        s.starts_with(|c: char| c.is_ascii_alphabetic())
            .then_some(s)
    }

    /// JSON-ish text (thermostat form), when the reply is printable text.
    pub fn text(&self) -> Option<&str> {
        self.text_form()
    }

    /// The message field (device form).
    pub fn msg(&self) -> Option<Msg> {
        if self.text_form().is_some() {
            return None;
        }
        Msg::read(&self.rest)
    }

    /// The name record after the msg (e.g. "xlink_dev").
    pub fn name(&self) -> Option<&str> {
        self.msg()?;
        let r = self.rest.get(3..)?;
        let len = usize::from(u16::from_be_bytes([*r.get(1)?, *r.get(2)?]));
        std::str::from_utf8(r.get(3..3 + len)?).ok()
    }
}

/// 0xc8 time answer (§2.5): US-Central wall-clock time as the real cloud sends it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeAnswer {
    /// First byte, 0x0d in every sample.
    pub tag: u8,
    /// Year.
    pub year: u16,
    /// Month 1–12.
    pub month: u8,
    /// Day 1–31.
    pub day: u8,
    /// Day of week, Sunday = 1.
    pub weekday: u8,
    /// Hour.
    pub hour: u8,
    /// Minute.
    pub minute: u8,
    /// Second.
    pub second: u8,
    /// UTC offset as a decimal ±hhmm number (−600 = UTC−06:00).
    pub utc_offset: i16,
}

/// Body length of a 0xc8 time answer.
pub const TIME_ANSWER_LEN: usize = 11;

impl TimeAnswer {
    /// The local time `unix_secs + offset_minutes`, encoded as the cloud does.
    pub fn from_unix(unix_secs: i64, offset_minutes: i16) -> Self {
        let local = unix_secs + i64::from(offset_minutes) * 60;
        let days = local.div_euclid(86_400);
        let secs = local.rem_euclid(86_400);
        let (year, month, day) = civil_from_days(days);
        // 1970-01-01 was a Thursday (weekday 5 with Sunday = 1).
        let weekday = ((days + 4).rem_euclid(7) + 1) as u8;
        let sign: i16 = if offset_minutes < 0 { -1 } else { 1 };
        let abs = offset_minutes.unsigned_abs();
        Self {
            tag: 0x0d,
            year: u16::try_from(year).unwrap_or(0),
            month,
            day,
            weekday,
            hour: (secs / 3600) as u8,
            minute: (secs / 60 % 60) as u8,
            second: (secs % 60) as u8,
            utc_offset: sign * ((abs / 60 * 100 + abs % 60) as i16),
        }
    }

    /// `YYYY-MM-DD`.
    pub fn date(&self) -> String {
        format!("{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }

    /// `HH:MM:SS`.
    pub fn time(&self) -> String {
        format!("{:02}:{:02}:{:02}", self.hour, self.minute, self.second)
    }

    /// `±HH:MM`.
    pub fn offset(&self) -> String {
        let sign = if self.utc_offset < 0 { '-' } else { '+' };
        let a = self.utc_offset.unsigned_abs();
        format!("{sign}{:02}:{:02}", a / 100, a % 100)
    }

    /// English weekday name (Sunday = 1).
    pub fn weekday_name(&self) -> &'static str {
        const NAMES: [&str; 7] = [
            "sunday",
            "monday",
            "tuesday",
            "wednesday",
            "thursday",
            "friday",
            "saturday",
        ];
        NAMES
            .get(usize::from(self.weekday).wrapping_sub(1))
            .copied()
            .unwrap_or("unknown")
    }

    fn parse(b: &[u8]) -> Result<Self, DecodeError> {
        let b: &[u8; TIME_ANSWER_LEN] = b.try_into().map_err(|_| DecodeError::Size {
            what: "time answer",
            expected: TIME_ANSWER_LEN,
            got: b.len(),
        })?;
        Ok(Self {
            tag: b[0],
            year: u16::from_be_bytes([b[1], b[2]]),
            month: b[3],
            day: b[4],
            weekday: b[5],
            hour: b[6],
            minute: b[7],
            second: b[8],
            utc_offset: i16::from_be_bytes([b[9], b[10]]),
        })
    }

    fn write(&self, out: &mut Vec<u8>) {
        out.push(self.tag);
        out.extend_from_slice(&self.year.to_be_bytes());
        out.extend_from_slice(&[
            self.month,
            self.day,
            self.weekday,
            self.hour,
            self.minute,
            self.second,
        ]);
        out.extend_from_slice(&self.utc_offset.to_be_bytes());
    }
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A decoded body, one variant per layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    /// 0x13.
    Login(Login),
    /// 0x18: result bytes (`00 00` = accepted).
    LoginResult(Bytes),
    /// 0x23.
    Handshake(Handshake),
    /// 0x28: result bytes (`00 00` = accepted).
    HandshakeAck(Bytes),
    /// 0x43.
    Sync(Sync),
    /// 0x48: echoes `01 01` plus `00`.
    SyncAck(Msg),
    /// 0x73 and 0x83.
    Pipe(Pipe),
    /// 0x7b: id and msg of the acked frame.
    PipeAck(Envelope),
    /// 0x78 and 0xa8.
    CloudStatus(CloudStatus),
    /// 0x88: msg of the acked 0x83.
    PipeSyncAck(Msg),
    /// 0xa3.
    Probe(Probe),
    /// 0xab.
    ProbeReply(ProbeReply),
    /// 0xc3: body bytes (`0c`).
    TimeRequest(Bytes),
    /// 0xc8.
    TimeAnswer(TimeAnswer),
    /// 0xd3 / 0xd8 with no body.
    Empty,
    /// 0xe3: body bytes (`03` from PY).
    Disconnect(Bytes),
    /// Unknown types, and known types whose body is not the usual shape but carries no structure
    /// worth rejecting (a 0xd3 with bytes).
    Raw(Bytes),
}

/// A decoded outer frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The packet-type byte.
    pub ptype: PacketType,
    /// The body.
    pub body: Body,
}

// === impl Frame: decoding ===

fn split_len_prefixed(
    b: &Bytes,
    at: usize,
    field: &'static str,
) -> Result<(Bytes, usize), DecodeError> {
    let hi = b.get(at).copied();
    let lo = b.get(at + 1).copied();
    let (Some(hi), Some(lo)) = (hi, lo) else {
        return Err(DecodeError::Short {
            what: field,
            need: at + 2,
            got: b.len(),
        });
    };
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    let start = at + 2;
    let available = b.len() - start;
    if len > available {
        return Err(DecodeError::Overrun {
            field,
            declared: len,
            available,
        });
    }
    Ok((b.slice(start..start + len), start + len))
}

fn exact_msg(body: &[u8], what: &'static str) -> Result<Msg, DecodeError> {
    if body.len() != 3 {
        return Err(DecodeError::Size {
            what,
            expected: 3,
            got: body.len(),
        });
    }
    Msg::read(body).ok_or(DecodeError::Size {
        what,
        expected: 3,
        got: body.len(),
    })
}

impl Frame {
    /// Decodes one whole frame (header included). The header's length must match exactly.
    pub fn decode(frame: &Bytes) -> Result<Self, DecodeError> {
        let h = Header::parse(frame).ok_or(DecodeError::ShortHeader { got: frame.len() })?;
        let actual = frame.len() - HEADER_LEN;
        if h.frame_len() != frame.len() {
            return Err(DecodeError::LengthMismatch {
                declared: h.body_len,
                actual,
            });
        }
        let body = Self::decode_body(h.ptype, frame.slice(HEADER_LEN..))?;
        Ok(Self {
            ptype: h.ptype,
            body,
        })
    }

    /// Decodes a body of type `ptype`.
    pub fn decode_body(ptype: PacketType, b: Bytes) -> Result<Body, DecodeError> {
        Ok(match ptype {
            PacketType::LOGIN => {
                let (&version, _) = b.split_first().ok_or(DecodeError::Short {
                    what: "login",
                    need: 7,
                    got: 0,
                })?;
                let user_id = b.get(1..5).ok_or(DecodeError::Short {
                    what: "login",
                    need: 7,
                    got: b.len(),
                })?;
                let user_id = u32::from_be_bytes([user_id[0], user_id[1], user_id[2], user_id[3]]);
                let (auth, end) = split_len_prefixed(&b, 5, "login auth string")?;
                Body::Login(Login {
                    version,
                    user_id,
                    auth,
                    trailer: b.slice(end..),
                })
            }
            PacketType::LOGIN_RESULT => Body::LoginResult(b),
            PacketType::HANDSHAKE => {
                let head = b.get(..5).ok_or(DecodeError::Short {
                    what: "handshake",
                    need: 7,
                    got: b.len(),
                })?;
                let (auth_code, end) = split_len_prefixed(&b, 5, "handshake auth code")?;
                Body::Handshake(Handshake {
                    version: head[0],
                    device_id: DeviceId(u32::from_be_bytes([head[1], head[2], head[3], head[4]])),
                    auth_code,
                    trailer: b.slice(end..),
                })
            }
            PacketType::HANDSHAKE_ACK => Body::HandshakeAck(b),
            PacketType::SYNC => {
                let env = Envelope::read(&b, "sync")?;
                let (records, trailing) = tlv::parse_records(&b[ENVELOPE_LEN..], &b);
                Body::Sync(Sync {
                    env,
                    records,
                    trailing,
                })
            }
            PacketType::SYNC_ACK => Body::SyncAck(exact_msg(&b, "sync ack")?),
            PacketType::PIPE | PacketType::PIPE_SYNC => {
                let env = Envelope::read(&b, ptype.name())?;
                let wire = b.slice(ENVELOPE_LEN..);
                let inner =
                    InnerFrame::decode(&wire).map_err(|error| InvalidInner { error, bytes: wire });
                Body::Pipe(Pipe { env, inner })
            }
            PacketType::PIPE_ACK => {
                if b.len() != ENVELOPE_LEN {
                    return Err(DecodeError::Size {
                        what: "pipe ack",
                        expected: ENVELOPE_LEN,
                        got: b.len(),
                    });
                }
                Body::PipeAck(Envelope::read(&b, "pipe ack")?)
            }
            PacketType::PIPE_STATUS | PacketType::PROBE_STATUS => {
                let env = Envelope::read(&b, ptype.name())?;
                Body::CloudStatus(CloudStatus {
                    env,
                    extra: b.slice(ENVELOPE_LEN..),
                })
            }
            PacketType::PIPE_SYNC_ACK => Body::PipeSyncAck(exact_msg(&b, "pipe sync ack")?),
            PacketType::PROBE => {
                let env = Envelope::read(&b, "probe")?;
                Body::Probe(Probe {
                    env,
                    extra: b.slice(ENVELOPE_LEN..),
                })
            }
            PacketType::PROBE_REPLY => {
                let id = b.get(..4).ok_or(DecodeError::Short {
                    what: "probe reply",
                    need: 4,
                    got: b.len(),
                })?;
                Body::ProbeReply(ProbeReply {
                    id: u32::from_be_bytes([id[0], id[1], id[2], id[3]]),
                    rest: b.slice(4..),
                })
            }
            PacketType::TIME_REQUEST => Body::TimeRequest(b),
            PacketType::TIME_ANSWER => Body::TimeAnswer(TimeAnswer::parse(&b)?),
            PacketType::PING | PacketType::PONG if b.is_empty() => Body::Empty,
            PacketType::DISCONNECT => Body::Disconnect(b),
            _ => Body::Raw(b),
        })
    }

    // === impl Frame: accessors ===

    /// The envelope (id + msg) where the body has one.
    pub fn envelope(&self) -> Option<Envelope> {
        match &self.body {
            Body::Sync(s) => Some(s.env),
            Body::Pipe(p) => Some(p.env),
            Body::PipeAck(e) => Some(*e),
            Body::CloudStatus(c) => Some(c.env),
            Body::Probe(p) => Some(p.env),
            Body::ProbeReply(r) => r.msg().map(|msg| Envelope { id: r.id, msg }),
            _ => None,
        }
    }

    /// The 4-byte id at body bytes 0–3 where the layout has one.
    pub fn id(&self) -> Option<u32> {
        match &self.body {
            Body::ProbeReply(r) => Some(r.id),
            _ => self.envelope().map(|e| e.id),
        }
    }

    /// The message field, including the bare ones of 0x48 and 0x88.
    pub fn msg(&self) -> Option<Msg> {
        match &self.body {
            Body::SyncAck(m) | Body::PipeSyncAck(m) => Some(*m),
            _ => self.envelope().map(|e| e.msg),
        }
    }

    /// The device id announced by a 0x23 handshake.
    pub fn device_id(&self) -> Option<DeviceId> {
        match &self.body {
            Body::Handshake(h) => Some(h.device_id),
            _ => None,
        }
    }

    /// The decoded inner frame of a 0x73/0x83.
    pub fn inner(&self) -> Option<&InnerFrame> {
        match &self.body {
            Body::Pipe(Pipe { inner: Ok(f), .. }) => Some(f),
            _ => None,
        }
    }

    /// The inner-frame problem of a 0x73/0x83, if any.
    pub fn inner_error(&self) -> Option<&InnerError> {
        match &self.body {
            Body::Pipe(Pipe { inner: Err(e), .. }) => Some(&e.error),
            _ => None,
        }
    }

    // === impl Frame: encoding ===

    /// Appends the body bytes to `out`.
    pub fn encode_body(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        match &self.body {
            Body::Login(l) => {
                out.push(l.version);
                out.extend_from_slice(&l.user_id.to_be_bytes());
                push_len_prefixed(out, &l.auth, "login auth string")?;
                out.extend_from_slice(&l.trailer);
            }
            Body::Handshake(h) => {
                out.push(h.version);
                out.extend_from_slice(&h.device_id.0.to_be_bytes());
                push_len_prefixed(out, &h.auth_code, "handshake auth code")?;
                out.extend_from_slice(&h.trailer);
            }
            Body::Sync(s) => {
                s.env.write(out);
                for r in &s.records {
                    r.encode_into(out)?;
                }
                out.extend_from_slice(&s.trailing);
            }
            Body::SyncAck(m) | Body::PipeSyncAck(m) => out.extend_from_slice(&m.0),
            Body::Pipe(p) => {
                p.env.write(out);
                match &p.inner {
                    Ok(f) => f.encode_into(out)?,
                    Err(bad) => out.extend_from_slice(&bad.bytes),
                }
            }
            Body::PipeAck(e) => e.write(out),
            Body::CloudStatus(CloudStatus { env, extra }) | Body::Probe(Probe { env, extra }) => {
                env.write(out);
                out.extend_from_slice(extra);
            }
            Body::ProbeReply(r) => {
                out.extend_from_slice(&r.id.to_be_bytes());
                out.extend_from_slice(&r.rest);
            }
            Body::TimeAnswer(t) => t.write(out),
            Body::Empty => {}
            Body::LoginResult(b)
            | Body::HandshakeAck(b)
            | Body::TimeRequest(b)
            | Body::Disconnect(b)
            | Body::Raw(b) => out.extend_from_slice(b),
        }
        Ok(())
    }

    /// The whole frame's wire bytes.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(&[self.ptype.0, 0, 0, 0, 0]);
        self.encode_body(&mut out)?;
        let body_len = out.len() - HEADER_LEN;
        let len = u32::try_from(body_len).map_err(|_| EncodeError::TooLong {
            what: "frame body",
            len: body_len,
            max: u32::MAX as usize,
        })?;
        out[1..HEADER_LEN].copy_from_slice(&len.to_be_bytes());
        Ok(out)
    }
}

fn push_len_prefixed(out: &mut Vec<u8>, b: &[u8], what: &'static str) -> Result<(), EncodeError> {
    let len = u16::try_from(b.len()).map_err(|_| EncodeError::TooLong {
        what,
        len: b.len(),
        max: usize::from(u16::MAX),
    })?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(b);
    Ok(())
}

// === impl Frame: builders ===

/// Bytes of a real device's 0xab probe reply.
pub const PROBE_REPLY_LEN: usize = 1024;
const PROBE_REPLY_NAME: &[u8] = b"xlink_dev";
const PROBE_REPLY_TAIL: [u8; 4] = [0xe3, 0x4f, 0x02, 0x10];

impl Frame {
    fn new(ptype: PacketType, body: Body) -> Self {
        Self { ptype, body }
    }

    /// 0x23 device handshake with version 3 and trailer `00 00 <heartbeat_secs>`.
    pub fn handshake(device_id: DeviceId, auth_code: &[u8], heartbeat_secs: u8) -> Self {
        Self::new(
            PacketType::HANDSHAKE,
            Body::Handshake(Handshake {
                version: 3,
                device_id,
                auth_code: Bytes::copy_from_slice(auth_code),
                trailer: Bytes::copy_from_slice(&[0, 0, heartbeat_secs]),
            }),
        )
    }

    /// 0x28 handshake accepted (`00 00`).
    pub fn handshake_ack() -> Self {
        Self::new(
            PacketType::HANDSHAKE_ACK,
            Body::HandshakeAck(Bytes::from_static(&[0, 0])),
        )
    }

    /// 0x13 app login with version 3 and trailer `00 00 <heartbeat_secs>`.
    pub fn login(user_id: u32, auth: &[u8], heartbeat_secs: u8) -> Self {
        Self::new(
            PacketType::LOGIN,
            Body::Login(Login {
                version: 3,
                user_id,
                auth: Bytes::copy_from_slice(auth),
                trailer: Bytes::copy_from_slice(&[0, 0, heartbeat_secs]),
            }),
        )
    }

    /// 0x18 login accepted (`00 00`).
    pub fn login_ok() -> Self {
        Self::new(
            PacketType::LOGIN_RESULT,
            Body::LoginResult(Bytes::from_static(&[0, 0])),
        )
    }

    /// 0x43 sync from device `id` (msg `01 01 06`).
    pub fn sync(id: u32, records: Vec<Record>) -> Self {
        Self::new(
            PacketType::SYNC,
            Body::Sync(Sync {
                env: Envelope {
                    id,
                    msg: Msg([1, 1, 6]),
                },
                records,
                trailing: Bytes::new(),
            }),
        )
    }

    /// 0x48 ack of a 0x43 (`01 01 00`).
    pub fn sync_ack() -> Self {
        Self::new(PacketType::SYNC_ACK, Body::SyncAck(Msg([1, 1, 0])))
    }

    /// 0x73 pipe frame.
    pub fn pipe(id: u32, msg: Msg, inner: InnerFrame) -> Self {
        Self::new(
            PacketType::PIPE,
            Body::Pipe(Pipe {
                env: Envelope { id, msg },
                inner: Ok(inner),
            }),
        )
    }

    /// 0x83 pipe-sync frame (status announcement, firmware version).
    pub fn pipe_sync(id: u32, msg: Msg, inner: InnerFrame) -> Self {
        Self::new(
            PacketType::PIPE_SYNC,
            Body::Pipe(Pipe {
                env: Envelope { id, msg },
                inner: Ok(inner),
            }),
        )
    }

    /// 0x7b ack of a 0x73 with this id and msg.
    pub fn pipe_ack(id: u32, msg: Msg) -> Self {
        Self::new(PacketType::PIPE_ACK, Body::PipeAck(Envelope { id, msg }))
    }

    /// 0x88 ack of a 0x83 with this msg.
    pub fn pipe_sync_ack(msg: Msg) -> Self {
        Self::new(PacketType::PIPE_SYNC_ACK, Body::PipeSyncAck(msg))
    }

    /// 0x78 cloud status `status` on message counter `msg`.
    pub fn pipe_status(id: u32, msg: u16, status: u8) -> Self {
        let m = msg.to_be_bytes();
        Self::new(
            PacketType::PIPE_STATUS,
            Body::CloudStatus(CloudStatus {
                env: Envelope {
                    id,
                    msg: Msg([m[0], m[1], status]),
                },
                extra: Bytes::new(),
            }),
        )
    }

    /// 0xa3 probe.
    pub fn probe(id: u32, msg: Msg) -> Self {
        Self::new(
            PacketType::PROBE,
            Body::Probe(Probe {
                env: Envelope { id, msg },
                extra: Bytes::new(),
            }),
        )
    }

    /// 0xab probe reply as real devices send it: 1024 bytes, "xlink_dev", zero padding, tail.
    pub fn probe_reply(id: u32, msg: Msg) -> Self {
        let mut rest = Vec::with_capacity(PROBE_REPLY_LEN - HEADER_LEN - 4);
        rest.extend_from_slice(&msg.0);
        rest.push(0x07);
        rest.extend_from_slice(&(PROBE_REPLY_NAME.len() as u16).to_be_bytes());
        rest.extend_from_slice(PROBE_REPLY_NAME);
        rest.resize(PROBE_REPLY_LEN - HEADER_LEN - 4 - PROBE_REPLY_TAIL.len(), 0);
        rest.extend_from_slice(&PROBE_REPLY_TAIL);
        Self::new(
            PacketType::PROBE_REPLY,
            Body::ProbeReply(ProbeReply {
                id,
                rest: rest.into(),
            }),
        )
    }

    /// 0xc3 time request (`0c`).
    pub fn time_request() -> Self {
        Self::new(
            PacketType::TIME_REQUEST,
            Body::TimeRequest(Bytes::from_static(&[0x0c])),
        )
    }

    /// 0xc8 time answer.
    pub fn time_answer(t: TimeAnswer) -> Self {
        Self::new(PacketType::TIME_ANSWER, Body::TimeAnswer(t))
    }

    /// 0xd3 heartbeat.
    pub fn ping() -> Self {
        Self::new(PacketType::PING, Body::Empty)
    }

    /// 0xd8 heartbeat answer.
    pub fn pong() -> Self {
        Self::new(PacketType::PONG, Body::Empty)
    }

    /// 0xe3 disconnect with a reason byte (PY sends 3).
    pub fn disconnect(reason: u8) -> Self {
        Self::new(
            PacketType::DISCONNECT,
            Body::Disconnect(Bytes::copy_from_slice(&[reason])),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hexutil::parse_hex;

    fn frame(s: &str) -> (Bytes, Frame) {
        let b = Bytes::from(parse_hex(s).unwrap());
        let f = Frame::decode(&b).unwrap();
        assert_eq!(f.encode().unwrap(), b.to_vec(), "round trip of {s}");
        (b, f)
    }

    #[test]
    fn handshake() {
        let (_, f) = frame(
            "23 00 00 00 1a 03 38 e8 cf 46 00 10 31 65 30 37 64 38 63 65 30 61 36 31 37 61 33 37 00 00 3c",
        );
        let Body::Handshake(h) = &f.body else {
            panic!()
        };
        assert_eq!(h.device_id, DeviceId(0x38e8cf46));
        assert_eq!(&h.auth_code[..], b"1e07d8ce0a617a37");
        assert_eq!(h.trailer_value(), Some(60));
        let built = Frame::handshake(DeviceId(0x38e8cf46), b"1e07d8ce0a617a37", 60);
        assert_eq!(built, f);
    }

    #[test]
    fn handshake_errors() {
        let b = Bytes::from(parse_hex("23 00 00 00 08 03 38 e8 cf 46 00 10 31").unwrap());
        assert_eq!(
            Frame::decode(&b),
            Err(DecodeError::Overrun {
                field: "handshake auth code",
                declared: 16,
                available: 1
            })
        );
        let b = Bytes::from(parse_hex("23 00 00 00 02 03 38").unwrap());
        assert!(matches!(Frame::decode(&b), Err(DecodeError::Short { .. })));
        let b = Bytes::from(parse_hex("23 00 00 00 09 03").unwrap());
        assert!(matches!(
            Frame::decode(&b),
            Err(DecodeError::LengthMismatch {
                declared: 9,
                actual: 1
            })
        ));
    }

    #[test]
    fn time_answer_matches_capture_times() {
        // V4 was received at 2025-11-06T08:20:40Z with the cloud at UTC-06:00.
        let t = TimeAnswer::from_unix(1_762_417_240, -360);
        let (_, f) = frame("c8 00 00 00 0b 0d 07 e9 0b 06 05 02 14 28 fd a8");
        assert_eq!(f.body, Body::TimeAnswer(t));
        assert_eq!(t.date(), "2025-11-06");
        assert_eq!(t.time(), "02:20:40");
        assert_eq!(t.offset(), "-06:00");
        assert_eq!(t.weekday_name(), "thursday");
        let t = TimeAnswer::from_unix(0, 330);
        assert_eq!(
            (t.date(), t.time(), t.offset()),
            ("1970-01-01".into(), "05:30:00".into(), "+05:30".into())
        );
    }

    #[test]
    fn acks_and_probe() {
        let (_, f) = frame("7b 00 00 00 07 2d e4 b5 d2 00 02 00");
        assert_eq!(f, Frame::pipe_ack(0x2de4b5d2, Msg::counter(2)));
        let (_, f) = frame("88 00 00 00 03 00 02 00");
        assert_eq!(f, Frame::pipe_sync_ack(Msg::counter(2)));
        let (_, f) = frame("78 00 00 00 07 2d e4 b5 d2 00 02 0a");
        assert_eq!(f, Frame::pipe_status(0x2de4b5d2, 2, 0x0a));
        let reply = Frame::probe_reply(0x2de4b5d2, Msg([0x15, 0x2b, 0]));
        let wire = reply.encode().unwrap();
        assert_eq!(wire.len(), PROBE_REPLY_LEN);
        assert_eq!(&wire[..5], &[0xab, 0, 0, 3, 0xfb]);
        let back = Frame::decode(&Bytes::from(wire)).unwrap();
        let Body::ProbeReply(r) = &back.body else {
            panic!()
        };
        assert_eq!(r.name(), Some("xlink_dev"));
        assert_eq!(r.msg(), Some(Msg([0x15, 0x2b, 0])));
        assert!(r.text().is_none());
    }

    #[test]
    fn wrong_fixed_sizes_are_errors() {
        for s in [
            "48 00 00 00 02 01 01",
            "7b 00 00 00 03 01 02 03",
            "c8 00 00 00 01 0d",
        ] {
            let b = Bytes::from(parse_hex(s).unwrap());
            assert!(
                matches!(Frame::decode(&b), Err(DecodeError::Size { .. })),
                "{s}"
            );
        }
    }
}
