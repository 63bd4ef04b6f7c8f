//! Outer frame header: the packet-type byte and the big-endian body length (protocol reference §2.1).

use std::fmt;

/// Length of the outer header: one type byte and a u32 BE body length.
pub const HEADER_LEN: usize = 5;

/// The packet-type byte of an outer frame.
///
/// High nibble = message type, bit 3 (0x08) = response, low 3 bits = protocol version. The raw byte is
/// kept, so types nobody has named yet survive decoding and re-encoding unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PacketType(pub u8);

impl PacketType {
    /// 0x13: app/client login.
    pub const LOGIN: Self = Self(0x13);
    /// 0x18: cloud's login result.
    pub const LOGIN_RESULT: Self = Self(0x18);
    /// 0x23: device handshake (first frame after TLS).
    pub const HANDSHAKE: Self = Self(0x23);
    /// 0x28: handshake accepted.
    pub const HANDSHAKE_ACK: Self = Self(0x28);
    /// 0x43: device sync (TLV records).
    pub const SYNC: Self = Self(0x43);
    /// 0x48: ack of a 0x43.
    pub const SYNC_ACK: Self = Self(0x48);
    /// 0x73: pipe frame carrying an inner 0x7e frame.
    pub const PIPE: Self = Self(0x73);
    /// 0x78: the cloud's own status on a pipe message.
    pub const PIPE_STATUS: Self = Self(0x78);
    /// 0x7b: pipe ack from the peer.
    pub const PIPE_ACK: Self = Self(0x7b);
    /// 0x83: unsolicited pipe-sync (status announcements, firmware version).
    pub const PIPE_SYNC: Self = Self(0x83);
    /// 0x88: ack of a 0x83.
    pub const PIPE_SYNC_ACK: Self = Self(0x88);
    /// 0xa3: probe / open session.
    pub const PROBE: Self = Self(0xa3);
    /// 0xa8: the cloud's status on a probe.
    pub const PROBE_STATUS: Self = Self(0xa8);
    /// 0xab: probe reply (1024 bytes on real devices).
    pub const PROBE_REPLY: Self = Self(0xab);
    /// 0xc3: time request.
    pub const TIME_REQUEST: Self = Self(0xc3);
    /// 0xc8: time answer.
    pub const TIME_ANSWER: Self = Self(0xc8);
    /// 0xd3: heartbeat ping.
    pub const PING: Self = Self(0xd3);
    /// 0xd8: heartbeat pong.
    pub const PONG: Self = Self(0xd8);
    /// 0xe3: client disconnect.
    pub const DISCONNECT: Self = Self(0xe3);

    /// Every named packet type, in byte order.
    pub const ALL_KNOWN: [Self; 19] = [
        Self::LOGIN,
        Self::LOGIN_RESULT,
        Self::HANDSHAKE,
        Self::HANDSHAKE_ACK,
        Self::SYNC,
        Self::SYNC_ACK,
        Self::PIPE,
        Self::PIPE_STATUS,
        Self::PIPE_ACK,
        Self::PIPE_SYNC,
        Self::PIPE_SYNC_ACK,
        Self::PROBE,
        Self::PROBE_STATUS,
        Self::PROBE_REPLY,
        Self::TIME_REQUEST,
        Self::TIME_ANSWER,
        Self::PING,
        Self::PONG,
        Self::DISCONNECT,
    ];

    /// The message-type nibble (high 4 bits).
    pub fn kind(self) -> u8 {
        self.0 >> 4
    }

    /// Whether bit 3 (the "is response" bit) is set.
    pub fn is_response(self) -> bool {
        self.0 & 0x08 != 0
    }

    /// Protocol version in the low 3 bits (3 for device/app frames, 0 for cloud-generated ones).
    pub fn version(self) -> u8 {
        self.0 & 0x07
    }

    /// Whether this byte is one of the types named in the protocol reference §2.3.
    pub fn is_known(self) -> bool {
        self.name() != "unknown"
    }

    /// Short stable name used in logs, metrics labels and JSON output.
    pub fn name(self) -> &'static str {
        match self.0 {
            0x13 => "login",
            0x18 => "login_result",
            0x23 => "handshake",
            0x28 => "handshake_ack",
            0x43 => "sync",
            0x48 => "sync_ack",
            0x73 => "pipe",
            0x78 => "pipe_status",
            0x7b => "pipe_ack",
            0x83 => "pipe_sync",
            0x88 => "pipe_sync_ack",
            0xa3 => "probe",
            0xa8 => "probe_status",
            0xab => "probe_reply",
            0xc3 => "time_request",
            0xc8 => "time_answer",
            0xd3 => "ping",
            0xd8 => "pong",
            0xe3 => "disconnect",
            _ => "unknown",
        }
    }
}

impl fmt::Display for PacketType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{:02x}", self.0)
    }
}

/// A parsed outer header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The packet-type byte.
    pub ptype: PacketType,
    /// Declared body length (bytes after the 5-byte header).
    pub body_len: u32,
}

impl Header {
    /// Parses the first five bytes of `buf`, or `None` when fewer are available.
    pub fn parse(buf: &[u8]) -> Option<Self> {
        let h: &[u8; HEADER_LEN] = buf.get(..HEADER_LEN)?.try_into().ok()?;
        Some(Self {
            ptype: PacketType(h[0]),
            body_len: u32::from_be_bytes([h[1], h[2], h[3], h[4]]),
        })
    }

    /// Total frame length (header plus body), saturating on 32-bit targets.
    pub fn frame_len(&self) -> usize {
        usize::try_from(self.body_len)
            .unwrap_or(usize::MAX)
            .saturating_add(HEADER_LEN)
    }

    /// The five header bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let l = self.body_len.to_be_bytes();
        [self.ptype.0, l[0], l[1], l[2], l[3]]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_bits() {
        let t = PacketType(0x7b);
        assert_eq!(t.kind(), 7);
        assert!(t.is_response());
        assert_eq!(t.version(), 3);
        let t = PacketType(0x28);
        assert_eq!(t.kind(), 2);
        assert!(t.is_response());
        assert_eq!(t.version(), 0);
        assert!(!PacketType::PIPE.is_response());
    }

    #[test]
    fn names_cover_all_known() {
        for t in PacketType::ALL_KNOWN {
            assert!(t.is_known(), "{t}");
        }
        assert!(!PacketType(0x33).is_known());
        assert_eq!(PacketType(0x33).name(), "unknown");
        assert_eq!(PacketType::PIPE.to_string(), "0x73");
    }

    #[test]
    fn header_round_trip() {
        let h = Header::parse(&[0xab, 0x00, 0x00, 0x03, 0xfb, 0xff]).unwrap();
        assert_eq!(h.ptype, PacketType::PROBE_REPLY);
        assert_eq!(h.body_len, 1019);
        assert_eq!(h.frame_len(), 1024);
        assert_eq!(h.to_bytes(), [0xab, 0, 0, 3, 0xfb]);
        assert!(Header::parse(&[0x73, 0, 0, 0]).is_none());
    }
}
