//! The inner 0x7e-delimited "pipe" frame carried by 0x73 and 0x83 bodies (protocol reference §3):
//! HDLC-style escaping, the additive checksum, and the frame layout.

use bytes::Bytes;
use std::fmt;

/// Opening and closing delimiter of an inner frame.
pub const DELIMITER: u8 = 0x7e;
/// Escape byte: `7d X` stands for `X ^ 0x20`.
pub const ESCAPE: u8 = 0x7d;
/// Alternative opener used by firmware-version frames (`fa 00`, §3.9).
pub const FIRMWARE_OPENER: u8 = 0x00;
/// Un-escaped bytes between the opener and the data: seq (4), direction, opcode, length (2).
const FIXED_LEN: usize = 8;

/// Direction/class byte of an inner frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// `f8`: a request or command.
    Request,
    /// `f9`: a response to a request.
    Response,
    /// `fa`: an announcement (unsolicited).
    Announce,
    /// Any other byte, kept as is.
    Other(u8),
}

impl Direction {
    /// The wire byte.
    pub fn byte(self) -> u8 {
        match self {
            Self::Request => 0xf8,
            Self::Response => 0xf9,
            Self::Announce => 0xfa,
            Self::Other(b) => b,
        }
    }

    /// From the wire byte.
    pub fn from_byte(b: u8) -> Self {
        match b {
            0xf8 => Self::Request,
            0xf9 => Self::Response,
            0xfa => Self::Announce,
            b => Self::Other(b),
        }
    }

    /// `request`, `response`, `announce`, or the byte in hex.
    pub fn label(self) -> String {
        match self {
            Self::Request => "request".into(),
            Self::Response => "response".into(),
            Self::Announce => "announce".into(),
            Self::Other(b) => format!("0x{b:02x}"),
        }
    }
}

/// Why the bytes after an outer id/msg could not be read as an inner frame.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InnerError {
    /// The body ends right after the message field.
    #[error("no inner frame after the message field")]
    Missing,
    /// The first byte is neither 0x7e nor a firmware-frame 0x00 opener.
    #[error("inner frame opener is 0x{0:02x}, expected 0x7e")]
    BadOpener(u8),
    /// The last byte of the body is not the closing 0x7e.
    #[error("inner frame does not end with 0x7e (last byte 0x{0:02x})")]
    MissingCloser(u8),
    /// Fewer un-escaped bytes than the fixed fields need.
    #[error("inner frame has {got} bytes between the delimiters, need at least {need}")]
    Truncated {
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        got: usize,
    },
    /// The data length field disagrees with the bytes between the delimiters.
    #[error("inner frame declares {declared} data bytes but carries {actual}")]
    LengthMismatch {
        /// Length field value.
        declared: usize,
        /// Data bytes actually present.
        actual: usize,
    },
}

/// One inner frame, un-escaped.
///
/// Decoding never rejects a frame for a bad checksum: the received `checksum` is kept and
/// [`InnerFrame::checksum_ok`] says whether it matches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InnerFrame {
    /// Opening byte: 0x7e, or 0x00 on firmware-version (`fa 00`) frames.
    pub opener: u8,
    /// Sequence number (u32 little-endian on the wire).
    pub seq: u32,
    /// Direction/class byte.
    pub dir: Direction,
    /// Opcode ("command code").
    pub opcode: u8,
    /// Data bytes, un-escaped.
    pub data: Bytes,
    /// Checksum byte as received (or as computed by [`InnerFrame::new`]).
    pub checksum: u8,
}

/// Additive checksum of §3.3 over un-escaped bytes: opcode, both length bytes and all data.
pub fn checksum(opcode: u8, data: &[u8]) -> u8 {
    let len = data.len();
    let mut sum = opcode
        .wrapping_add((len & 0xff) as u8)
        .wrapping_add(((len >> 8) & 0xff) as u8);
    for &b in data {
        sum = sum.wrapping_add(b);
    }
    sum
}

/// Appends `b` to `out`, escaping 0x7e and 0x7d.
#[inline]
fn push_escaped(out: &mut Vec<u8>, b: u8) {
    if b == DELIMITER || b == ESCAPE {
        out.push(ESCAPE);
        out.push(b ^ 0x20);
    } else {
        out.push(b);
    }
}

/// Escapes `src` into `out` (every 0x7e and 0x7d becomes `7d 5e` / `7d 5d`).
pub fn escape_into(src: &[u8], out: &mut Vec<u8>) {
    out.reserve(src.len());
    for &b in src {
        push_escaped(out, b);
    }
}

/// Un-escapes `src`: `7d 5e` becomes 0x7e and `7d 5d` becomes 0x7d. A 0x7d followed by anything
/// else is kept as a literal 0x7d, as senders that escape only 0x7e (pycync) mean it.
pub fn unescape(src: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(src.len());
    let mut i = 0;
    while i < src.len() {
        let b = src[i];
        match (b, src.get(i + 1)) {
            (ESCAPE, Some(&0x5e)) => {
                out.push(DELIMITER);
                i += 2;
            }
            (ESCAPE, Some(&0x5d)) => {
                out.push(ESCAPE);
                i += 2;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

// === impl InnerFrame ===

impl InnerFrame {
    /// Builds a frame with a 0x7e opener and the correct checksum.
    pub fn new(seq: u32, dir: Direction, opcode: u8, data: impl Into<Bytes>) -> Self {
        let data = data.into();
        let checksum = checksum(opcode, &data);
        Self {
            opener: DELIMITER,
            seq,
            dir,
            opcode,
            data,
            checksum,
        }
    }

    /// The checksum this frame should carry.
    pub fn expected_checksum(&self) -> u8 {
        checksum(self.opcode, &self.data)
    }

    /// Whether the received checksum matches.
    pub fn checksum_ok(&self) -> bool {
        self.checksum == self.expected_checksum()
    }

    /// Decodes an inner frame from the wire bytes that follow an outer id/msg, opener through
    /// closer. `wire` must be exactly the inner frame (the outer length delimits it).
    pub fn decode(wire: &[u8]) -> Result<Self, InnerError> {
        Self::decode_with(wire, |plain, range| Bytes::copy_from_slice(&plain[range]))
    }

    /// Like [`InnerFrame::decode`], but the data shares `wire`'s buffer when nothing was escaped.
    pub fn decode_bytes(wire: &Bytes) -> Result<Self, InnerError> {
        Self::decode_with(wire, |plain, range| {
            if plain.len() + 2 == wire.len() {
                // No escapes: plain is wire[1..len-1], so offsets shift by one.
                wire.slice(range.start + 1..range.end + 1)
            } else {
                Bytes::copy_from_slice(&plain[range])
            }
        })
    }

    fn decode_with(
        wire: &[u8],
        take: impl FnOnce(&[u8], std::ops::Range<usize>) -> Bytes,
    ) -> Result<Self, InnerError> {
        let (&opener, rest) = wire.split_first().ok_or(InnerError::Missing)?;
        if opener != DELIMITER && opener != FIRMWARE_OPENER {
            return Err(InnerError::BadOpener(opener));
        }
        let (&closer, body) = rest.split_last().ok_or(InnerError::Truncated {
            need: FIXED_LEN + 2,
            got: 0,
        })?;
        if closer != DELIMITER {
            return Err(InnerError::MissingCloser(closer));
        }
        // Fast path: most frames carry no escape byte and need no copy.
        let plain: std::borrow::Cow<'_, [u8]> = if body.contains(&ESCAPE) {
            std::borrow::Cow::Owned(unescape(body))
        } else {
            std::borrow::Cow::Borrowed(body)
        };
        let need = FIXED_LEN + 1;
        if plain.len() < need {
            return Err(InnerError::Truncated {
                need,
                got: plain.len(),
            });
        }
        let seq = u32::from_le_bytes([plain[0], plain[1], plain[2], plain[3]]);
        let dir = Direction::from_byte(plain[4]);
        let opcode = plain[5];
        if opener == FIRMWARE_OPENER && !(dir == Direction::Announce && opcode == 0x00) {
            // 0x00 is accepted as an opener only for firmware frames (fa 00).
            return Err(InnerError::BadOpener(opener));
        }
        let declared = usize::from(u16::from_le_bytes([plain[6], plain[7]]));
        let actual = plain.len() - need;
        if declared != actual {
            return Err(InnerError::LengthMismatch { declared, actual });
        }
        let data = take(&plain, FIXED_LEN..FIXED_LEN + declared);
        Ok(Self {
            opener,
            seq,
            dir,
            opcode,
            data,
            checksum: plain[FIXED_LEN + declared],
        })
    }

    /// Appends the escaped wire form (opener … closer) to `out`.
    ///
    /// Fails only when the data is longer than the u16 length field can say.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), super::EncodeError> {
        let len = u16::try_from(self.data.len()).map_err(|_| super::EncodeError::TooLong {
            what: "inner frame data",
            len: self.data.len(),
            max: usize::from(u16::MAX),
        })?;
        out.reserve(self.data.len() + 12);
        out.push(self.opener);
        for b in self.seq.to_le_bytes() {
            push_escaped(out, b);
        }
        push_escaped(out, self.dir.byte());
        push_escaped(out, self.opcode);
        for b in len.to_le_bytes() {
            push_escaped(out, b);
        }
        escape_into(&self.data, out);
        push_escaped(out, self.checksum);
        out.push(DELIMITER);
        Ok(())
    }

    /// The escaped wire form.
    pub fn encode(&self) -> Result<Vec<u8>, super::EncodeError> {
        let mut v = Vec::with_capacity(self.data.len() + 12);
        self.encode_into(&mut v)?;
        Ok(v)
    }
}

impl fmt::Display for InnerFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02x} {:02x} seq={:#x} len={} ck={}",
            self.dir.byte(),
            self.opcode,
            self.seq,
            self.data.len(),
            if self.checksum_ok() { "ok" } else { "bad" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        crate::hexutil::parse_hex(s).unwrap()
    }

    #[test]
    fn decodes_power_command() {
        // V19's inner frame.
        let f = InnerFrame::decode(&hex(
            "7e 21 00 00 00 f8 d0 0d 00 21 00 00 00 00 05 00 d0 11 02 01 00 00 e7 7e",
        ))
        .unwrap();
        assert_eq!(f.seq, 0x21);
        assert_eq!(f.dir, Direction::Request);
        assert_eq!(f.opcode, 0xd0);
        assert_eq!(f.data.len(), 13);
        assert_eq!(f.checksum, 0xe7);
        assert!(f.checksum_ok());
    }

    #[test]
    fn unescapes_before_checksum() {
        // V46: mesh id 0x7e sent as 7d 5e.
        let wire = hex("7e01010000f8d00d0001010000007d5e00d01102010000417e");
        let f = InnerFrame::decode(&wire).unwrap();
        assert_eq!(&f.data[5..7], &[0x7e, 0x00]);
        assert!(f.checksum_ok());
        assert_eq!(f.encode().unwrap(), wire);
    }

    #[test]
    fn zero_copy_decode_matches() {
        for s in [
            "7e01010000f8d00d0001010000007d5e00d01102010000417e",
            "7e 21 00 00 00 f8 d0 0d 00 21 00 00 00 00 05 00 d0 11 02 01 00 00 e7 7e",
        ] {
            let w = hex(s);
            assert_eq!(
                InnerFrame::decode_bytes(&Bytes::from(w.clone())),
                InnerFrame::decode(&w)
            );
        }
    }

    #[test]
    fn lone_escape_is_literal() {
        assert_eq!(
            unescape(&[0x7d, 0x5e, 0x7d, 0x5d, 0x7d, 0x41, 0x7d]),
            vec![0x7e, 0x7d, 0x7d, 0x41, 0x7d]
        );
    }

    #[test]
    fn escapes_7d_too() {
        let f = InnerFrame::new(0x7d7e, Direction::Request, 0x7d, vec![0x7e, 0x7d, 0x01]);
        let wire = f.encode().unwrap();
        assert_eq!(wire.iter().filter(|&&b| b == DELIMITER).count(), 2);
        assert_eq!(InnerFrame::decode(&wire).unwrap(), f);
    }

    #[test]
    fn bad_checksum_is_flagged_not_rejected() {
        let mut wire = hex("7e 21 00 00 00 f9 d0 01 00 00 d1 7e");
        wire[10] = 0x12;
        let f = InnerFrame::decode(&wire).unwrap();
        assert!(!f.checksum_ok());
        assert_eq!(f.expected_checksum(), 0xd1);
    }

    #[test]
    fn firmware_opener_only_for_fa_00() {
        let fw = hex(
            "00 00 00 00 00 fa 00 20 00 00 00 00 00 00 00 00 ea 00 00 00 86 01 01 31 30 32 39 38 00 00 00 00 00 00 00 00 00 00 00 00 00 96 7e",
        );
        let f = InnerFrame::decode(&fw).unwrap();
        assert_eq!(f.opener, FIRMWARE_OPENER);
        assert!(f.checksum_ok());
        assert_eq!(f.encode().unwrap(), fw);
        // N1: an extra 00 before the 7e.
        let n1 = hex("00 7e 10 01 00 00 f8 8e 0c 00 10 01 00 00 00 50 00 f7 11 02 01 01 07 7e");
        assert_eq!(InnerFrame::decode(&n1), Err(InnerError::BadOpener(0)));
    }

    #[test]
    fn errors() {
        assert_eq!(InnerFrame::decode(&[]), Err(InnerError::Missing));
        assert_eq!(
            InnerFrame::decode(&[0x55]),
            Err(InnerError::BadOpener(0x55))
        );
        assert!(matches!(
            InnerFrame::decode(&[0x7e]),
            Err(InnerError::Truncated { .. })
        ));
        assert_eq!(
            InnerFrame::decode(&[0x7e, 0x01, 0x02]),
            Err(InnerError::MissingCloser(0x02))
        );
        assert!(matches!(
            InnerFrame::decode(&[0x7e, 0x7d, 0x7e]),
            Err(InnerError::Truncated { need: 9, got: 1 })
        ));
        assert!(matches!(
            InnerFrame::decode(&hex("7e 21 00 00 00 f9 d0 05 00 00 d1 7e")),
            Err(InnerError::LengthMismatch {
                declared: 5,
                actual: 1
            })
        ));
    }

    #[test]
    fn checksum_matches_reference() {
        assert_eq!(
            checksum(0xd0, &hex("21 00 00 00 00 05 00 d0 11 02 01 00 00")),
            0xe7
        );
        assert_eq!(checksum(0x52, &hex("00 00 ff ff 00 00")), 0x56);
    }
}
