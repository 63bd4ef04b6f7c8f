//! 0x43 SYNC bodies: a list of TLV records after the id and `01 01 06` (protocol reference §3.8.3).
//!
//! Each record is a tag byte, a u16 BE whose low 12 bits are the value length and whose top nibble
//! is a type flag (0x0 status record, 0x2 integer, 0x9 string), then the value.

use super::payload::{Color, LightState};
use bytes::Bytes;

/// Type flag of a status record.
pub const FLAG_STATUS: u8 = 0x0;
/// Type flag of an integer record.
pub const FLAG_INT: u8 = 0x2;
/// Type flag of a string record (telemetry `c7`, thermostat JSON).
pub const FLAG_STRING: u8 = 0x9;
/// Largest value a record can carry (12-bit length).
pub const MAX_VALUE_LEN: usize = 0x0fff;

/// One TLV record, bytes kept as received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Tag byte (running index for status records, `c2`–`c7` for info records).
    pub tag: u8,
    /// Type flag (top nibble of the length word).
    pub flag: u8,
    /// The value bytes.
    pub value: Bytes,
}

/// A status record's value (§3.8.3): 16 bytes from bridges, 7 from outdoor plugs (at least 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusRecord {
    /// Mesh id (one byte).
    pub mesh_id: u8,
    /// Light state; for multi-outlet plugs `brightness` is the outlet indicator.
    pub state: LightState,
    /// Online/valid flag (0 = stale); absent in short records.
    pub online: Option<bool>,
    /// 0x00 for the device's own record, 0x14 when relayed (absent in short records).
    pub relayed: Option<u8>,
    /// Mesh id of the reporting bridge (absent in short records).
    pub bridge: Option<u8>,
}

/// The meaning of one record's value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordValue {
    /// A device status.
    Status(StatusRecord),
    /// A big-endian integer (1–8 bytes).
    Int(u64),
    /// Text (telemetry string or thermostat JSON).
    Text(String),
    /// Anything else.
    Opaque,
}

// === impl Record ===

impl Record {
    /// Builds a status record with the 16-byte value layout real bridges send.
    pub fn status(tag: u8, s: &StatusRecord) -> Self {
        let (ct, rgb) = s.state.color.to_bytes();
        let mut v = vec![
            s.mesh_id,
            u8::from(s.state.on),
            s.state.brightness,
            ct,
            rgb[0],
            rgb[1],
            rgb[2],
            u8::from(s.online.unwrap_or(true)),
            s.relayed.unwrap_or(0),
            s.bridge.unwrap_or(0),
        ];
        v.resize(16, 0);
        Self {
            tag,
            flag: FLAG_STATUS,
            value: v.into(),
        }
    }

    /// Builds a string record (e.g. the `c7` telemetry string).
    pub fn text(tag: u8, text: &str) -> Self {
        Self {
            tag,
            flag: FLAG_STRING,
            value: Bytes::copy_from_slice(text.as_bytes()),
        }
    }

    /// Builds an integer record of `width` bytes.
    pub fn int(tag: u8, value: u64, width: usize) -> Self {
        let be = value.to_be_bytes();
        let w = width.clamp(1, 8);
        Self {
            tag,
            flag: FLAG_INT,
            value: Bytes::copy_from_slice(&be[8 - w..]),
        }
    }

    /// Interprets the value by its flag.
    pub fn decode(&self) -> RecordValue {
        let v = &self.value[..];
        match self.flag {
            FLAG_STATUS if v.len() >= 3 => RecordValue::Status(StatusRecord {
                mesh_id: v[0],
                state: LightState {
                    on: v[1] != 0,
                    brightness: v[2],
                    color: Color::from_bytes(
                        byte_or_zero(v, 3),
                        [byte_or_zero(v, 4), byte_or_zero(v, 5), byte_or_zero(v, 6)],
                    ),
                },
                online: v.get(7).map(|&b| b != 0),
                relayed: v.get(8).copied(),
                bridge: v.get(9).copied(),
            }),
            FLAG_INT if (1..=8).contains(&v.len()) => {
                RecordValue::Int(v.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
            }
            FLAG_STRING => match std::str::from_utf8(v) {
                Ok(s) => RecordValue::Text(s.to_owned()),
                Err(_) => RecordValue::Opaque,
            },
            _ => RecordValue::Opaque,
        }
    }

    /// Appends the record's wire bytes. Values longer than 4095 bytes cannot be encoded.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), super::EncodeError> {
        if self.value.len() > MAX_VALUE_LEN {
            return Err(super::EncodeError::TooLong {
                what: "TLV value",
                len: self.value.len(),
                max: MAX_VALUE_LEN,
            });
        }
        let word = (u16::from(self.flag & 0x0f) << 12) | self.value.len() as u16;
        out.push(self.tag);
        out.extend_from_slice(&word.to_be_bytes());
        out.extend_from_slice(&self.value);
        Ok(())
    }
}

fn byte_or_zero(v: &[u8], i: usize) -> u8 {
    v.get(i).copied().unwrap_or(0)
}

/// Splits a record list. Bytes at the end that do not make a whole record (2026 firmware appends
/// `7f fe` after its telemetry string) are returned as `trailing`, never as an error.
pub fn parse_records(mut buf: &[u8], source: &Bytes) -> (Vec<Record>, Bytes) {
    let base = source.len() - buf.len();
    let mut records = Vec::new();
    let mut pos = base;
    while buf.len() >= 3 {
        let word = u16::from_be_bytes([buf[1], buf[2]]);
        let len = usize::from(word & 0x0fff);
        if buf.len() < 3 + len {
            break;
        }
        records.push(Record {
            tag: buf[0],
            flag: (word >> 12) as u8,
            value: source.slice(pos + 3..pos + 3 + len),
        });
        pos += 3 + len;
        buf = &buf[3 + len..];
    }
    (records, source.slice(pos..))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hexutil::parse_hex;

    fn records(s: &str) -> (Vec<Record>, Bytes) {
        let b = Bytes::from(parse_hex(s).unwrap());
        parse_records(&b.clone(), &b)
    }

    #[test]
    fn info_records() {
        let (r, t) =
            records("c6 20 02 00 ab c5 20 02 00 04 c4 20 02 00 01 c3 20 02 00 05 c2 90 00");
        assert!(t.is_empty());
        assert_eq!(r.len(), 5);
        assert_eq!(r[0].tag, 0xc6);
        assert_eq!(r[0].decode(), RecordValue::Int(0xab));
        assert_eq!(r[4].decode(), RecordValue::Text(String::new()));
    }

    #[test]
    fn status_record_and_trailing() {
        let (r, t) = records("05 00 10 05 01 64 00 00 00 00 01 00 05 00 00 00 00 00 00 7f fe");
        assert_eq!(r.len(), 1);
        assert_eq!(&t[..], &[0x7f, 0xfe]);
        let RecordValue::Status(s) = r[0].decode() else {
            panic!()
        };
        assert_eq!(s.mesh_id, 5);
        assert!(s.state.on);
        assert_eq!(s.online, Some(true));
        assert_eq!(s.state.brightness, 100);
        assert_eq!(s.relayed, Some(0));
        assert_eq!(s.bridge, Some(5));
        let mut out = Vec::new();
        Record::status(5, &s).encode_into(&mut out).unwrap();
        assert_eq!(
            out,
            parse_hex("05 00 10 05 01 64 00 00 00 00 01 00 05 00 00 00 00 00 00").unwrap()
        );
    }

    #[test]
    fn short_status_record() {
        // V48's outdoor plug: a 7-byte status value has no relay/bridge bytes.
        let (r, _) = records("00 00 07 06 01 02 00 00 00 00");
        let RecordValue::Status(s) = r[0].decode() else {
            panic!("not a status record")
        };
        assert_eq!(s.mesh_id, 6);
        assert!(s.state.on);
        assert_eq!(s.state.brightness, 2);
        assert_eq!(s.online, None);
        assert_eq!(s.bridge, None);
        let (r, _) = records("00 00 02 06 01");
        assert_eq!(r[0].decode(), RecordValue::Opaque);
    }

    #[test]
    fn text_and_int_builders() {
        let mut out = Vec::new();
        Record::text(0xc7, "ab").encode_into(&mut out).unwrap();
        Record::int(0xc6, 0xab, 2).encode_into(&mut out).unwrap();
        assert_eq!(out, parse_hex("c7 90 02 61 62 c6 20 02 00 ab").unwrap());
        let too_long = Record {
            tag: 1,
            flag: FLAG_STRING,
            value: vec![0; 4096].into(),
        };
        assert!(too_long.encode_into(&mut out).is_err());
    }
}
