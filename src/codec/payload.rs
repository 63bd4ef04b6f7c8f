//! What an inner frame's data means: control commands, responses, status announcements, status
//! pages and firmware versions (protocol reference §3.5–§3.9). Each decoder here is a pure view over
//! [`InnerFrame::data`]; each builder produces the canonical bytes real senders use.

use super::inner::{Direction, FIRMWARE_OPENER, InnerFrame};
use bytes::Bytes;

/// Opcodes named in the protocol reference §3.5.
pub mod opcode {
    /// Set power.
    pub const POWER: u8 = 0xd0;
    /// Set brightness.
    pub const BRIGHTNESS: u8 = 0xd2;
    /// Colour temperature, RGB or effect.
    pub const COLOR: u8 = 0xe2;
    /// Combo control.
    pub const COMBO: u8 = 0xf0;
    /// Status page query (f8) and pages (f9).
    pub const STATUS_PAGES: u8 = 0x52;
    /// Status-page ack.
    pub const PAGE_ACK: u8 = 0xaf;
    /// Mesh relay of a raw BLE-mesh opcode array.
    pub const MESH_RELAY: u8 = 0x8e;
    /// Status announcement (`fa db`).
    pub const STATUS: u8 = 0xdb;
    /// Firmware version announcement (`fa 00`).
    pub const FIRMWARE: u8 = 0x00;
    /// Zero-length query (`f8 ea`).
    pub const QUERY: u8 = 0xea;
}

/// Marker after the repeated opcode in control commands.
const MARKER: [u8; 2] = [0x11, 0x02];
/// Marker used by old tooling (CB, IB, CL) instead of `11 02`.
const LEGACY_MARKER: [u8; 2] = [0x00, 0x00];
/// Value meaning "leave unchanged" in combo commands.
pub const UNCHANGED: u8 = 0xff;
/// Colour-temperature byte meaning "RGB mode".
pub const RGB_MODE: u8 = 0xfe;

/// Colour part of a light state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Color {
    /// Colour temperature 0 (warm) … 100 (cool).
    Temp(u8),
    /// RGB mode with its colour.
    Rgb([u8; 3]),
}

impl Color {
    /// From a CT byte and the RGB bytes that follow it (`fe` = RGB mode).
    pub fn from_bytes(ct: u8, rgb: [u8; 3]) -> Self {
        if ct == RGB_MODE {
            Self::Rgb(rgb)
        } else {
            Self::Temp(ct)
        }
    }

    /// The CT byte and RGB bytes for the wire.
    pub fn to_bytes(self) -> (u8, [u8; 3]) {
        match self {
            Self::Temp(t) => (t, [0, 0, 0]),
            Self::Rgb(rgb) => (RGB_MODE, rgb),
        }
    }
}

/// Power, brightness and colour of one light.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LightState {
    /// On or off.
    pub on: bool,
    /// Brightness 0–100 (kept while off).
    pub brightness: u8,
    /// Colour temperature or RGB.
    pub color: Color,
}

/// A control command (`f8 d0/d2/e2/f0/8e`), all sharing the prefix of §3.6.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    /// Second copy of the sequence number at the start of the data.
    pub seq: u32,
    /// Target mesh id (u16 LE; for multi-outlet plugs the high byte is a sub-id).
    pub mesh_id: u16,
    /// What to do.
    pub action: Action,
}

/// The argument part of a [`Command`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// `d0`: absolute power set.
    Power {
        /// Desired state.
        on: bool,
    },
    /// `d2`: brightness 0–100.
    Brightness {
        /// Level.
        brightness: u8,
    },
    /// `e2 05`: colour temperature 0–100.
    ColorTemp {
        /// Temperature.
        temp: u8,
    },
    /// `e2 04`: RGB colour.
    Rgb {
        /// Red, green, blue.
        rgb: [u8; 3],
    },
    /// `e2 07 01`: effect, two bytes (e.g. candle `01 f1`).
    Effect {
        /// Effect bytes.
        effect: [u8; 2],
    },
    /// `f0`: combo; `0xff` in brightness or mode means "leave unchanged", mode `0xfe` = RGB.
    Combo {
        /// Power.
        on: bool,
        /// Brightness or [`UNCHANGED`].
        brightness: u8,
        /// CT 0–100, [`RGB_MODE`] or [`UNCHANGED`].
        mode: u8,
        /// RGB (meaningful in RGB mode).
        rgb: [u8; 3],
    },
    /// `8e`: a raw BLE-mesh opcode array relayed through the mesh (e.g. `f7 11 02 21`).
    MeshRelay {
        /// The opcode array, starting with its mesh opcode.
        ops: Bytes,
    },
}

/// What a combo command's raw bytes ask for: a brightness and a colour, each `None` when the
/// command leaves it unchanged (`0xff`).
pub fn combo_effect(brightness: u8, mode: u8, rgb: [u8; 3]) -> (Option<u8>, Option<Color>) {
    let bri = (brightness != UNCHANGED).then_some(brightness);
    let color = match mode {
        UNCHANGED => None,
        RGB_MODE => Some(Color::Rgb(rgb)),
        t => Some(Color::Temp(t)),
    };
    (bri, color)
}

impl Action {
    /// Inner opcode for this action.
    pub fn opcode(&self) -> u8 {
        match self {
            Self::Power { .. } => opcode::POWER,
            Self::Brightness { .. } => opcode::BRIGHTNESS,
            Self::ColorTemp { .. } | Self::Rgb { .. } | Self::Effect { .. } => opcode::COLOR,
            Self::Combo { .. } => opcode::COMBO,
            Self::MeshRelay { .. } => opcode::MESH_RELAY,
        }
    }

    /// Stable short name for logs and JSON.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Power { .. } => "power",
            Self::Brightness { .. } => "brightness",
            Self::ColorTemp { .. } => "color_temp",
            Self::Rgb { .. } => "rgb",
            Self::Effect { .. } => "effect",
            Self::Combo { .. } => "combo",
            Self::MeshRelay { .. } => "mesh_relay",
        }
    }
}

// === impl Command ===

impl Command {
    /// Parses command data for `opcode`, or `None` when it does not have the command layout.
    pub fn parse(opcode: u8, data: &[u8]) -> Option<Self> {
        let seq = u32::from_le_bytes(data.get(0..4)?.try_into().ok()?);
        let mesh_id = u16::from_le_bytes(data.get(5..7)?.try_into().ok()?);
        if opcode == opcode::MESH_RELAY {
            // Relay: seq, 00, mesh id, then the raw opcode array (no repeated op / marker).
            let ops = Bytes::copy_from_slice(data.get(7..)?);
            return Some(Self {
                seq,
                mesh_id,
                action: Action::MeshRelay { ops },
            });
        }
        if *data.get(7)? != opcode {
            return None;
        }
        let marker = [*data.get(8)?, *data.get(9)?];
        if marker != MARKER && marker != LEGACY_MARKER {
            return None;
        }
        let args = data.get(10..)?;
        let action = match (opcode, args) {
            (opcode::POWER, [state, ..]) => Action::Power { on: *state != 0 },
            (opcode::BRIGHTNESS, [b, ..]) => Action::Brightness { brightness: *b },
            (opcode::COLOR, [0x05, t, ..]) => Action::ColorTemp { temp: *t },
            (opcode::COLOR, [0x04, r, g, b, ..]) => Action::Rgb { rgb: [*r, *g, *b] },
            (opcode::COLOR, [0x07, 0x01, a, b, ..]) => Action::Effect { effect: [*a, *b] },
            (opcode::COMBO, [on, bri, mode, r, g, b, ..]) => Action::Combo {
                on: *on != 0,
                brightness: *bri,
                mode: *mode,
                rgb: [*r, *g, *b],
            },
            _ => return None,
        };
        Some(Self {
            seq,
            mesh_id,
            action,
        })
    }

    /// The canonical data bytes (`11 02` marker) for this command.
    pub fn to_data(&self) -> Vec<u8> {
        let op = self.action.opcode();
        let mut d = Vec::with_capacity(16);
        d.extend_from_slice(&self.seq.to_le_bytes());
        d.push(0x00);
        d.extend_from_slice(&self.mesh_id.to_le_bytes());
        if let Action::MeshRelay { ops } = &self.action {
            d.extend_from_slice(ops);
            return d;
        }
        d.push(op);
        d.extend_from_slice(&MARKER);
        match &self.action {
            Action::Power { on } => d.extend_from_slice(&[u8::from(*on), 0, 0]),
            Action::Brightness { brightness } => d.push(*brightness),
            Action::ColorTemp { temp } => d.extend_from_slice(&[0x05, *temp]),
            Action::Rgb { rgb } => {
                d.push(0x04);
                d.extend_from_slice(rgb);
            }
            Action::Effect { effect } => {
                d.extend_from_slice(&[0x07, 0x01]);
                d.extend_from_slice(effect);
            }
            Action::Combo {
                on,
                brightness,
                mode,
                rgb,
            } => {
                d.extend_from_slice(&[u8::from(*on), *brightness, *mode]);
                d.extend_from_slice(rgb);
            }
            Action::MeshRelay { .. } => {}
        }
        d
    }

    /// The request inner frame (`f8 <op>`) carrying this command with frame sequence `seq`.
    pub fn to_inner(&self, seq: u32) -> InnerFrame {
        InnerFrame::new(
            seq,
            Direction::Request,
            self.action.opcode(),
            self.to_data(),
        )
    }
}

/// A `fa db` status announcement with the 0x13-byte layout of §3.8.1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AnnouncedStatus {
    /// Per-device counter, incremented per announcement.
    pub counter: u8,
    /// Byte [1], 0x22 or 0x25 (meaning unknown).
    pub kind: u8,
    /// Mesh id.
    pub mesh_id: u16,
    /// "Connected/recently seen" byte (unreliable per JS).
    pub connected: u8,
    /// The light's state.
    pub state: LightState,
}

/// Data length of a `fa db` own-state announcement.
pub const STATUS_DATA_LEN: usize = 0x13;

impl AnnouncedStatus {
    /// Parses `fa db` data of length 0x13.
    pub fn parse(data: &[u8]) -> Option<Self> {
        let d: &[u8; STATUS_DATA_LEN] = data.try_into().ok()?;
        if d[7] != opcode::STATUS {
            return None;
        }
        Some(Self {
            counter: d[0],
            kind: d[1],
            mesh_id: u16::from_le_bytes([d[3], d[4]]),
            connected: d[10],
            state: LightState {
                on: d[11] != 0,
                brightness: d[12],
                color: Color::from_bytes(d[13], [d[14], d[15], d[16]]),
            },
        })
    }

    /// The 0x13 data bytes.
    pub fn to_data(&self) -> Vec<u8> {
        let m = self.mesh_id.to_le_bytes();
        let (ct, rgb) = self.state.color.to_bytes();
        vec![
            self.counter,
            self.kind,
            0x11,
            m[0],
            m[1],
            m[0],
            m[1],
            opcode::STATUS,
            MARKER[0],
            MARKER[1],
            self.connected,
            u8::from(self.state.on),
            self.state.brightness,
            ct,
            rgb[0],
            rgb[1],
            rgb[2],
            0,
            0,
        ]
    }

    /// The announcement inner frame (`fa db`), echoing `seq` of the command that caused it.
    pub fn to_inner(&self, seq: u32) -> InnerFrame {
        InnerFrame::new(seq, Direction::Announce, opcode::STATUS, self.to_data())
    }
}

/// One 24-byte record of an `f9 52` status page (§3.8.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRecord {
    /// Mesh id (u16 LE).
    pub mesh_id: u16,
    /// Device type byte.
    pub device_type: u8,
    /// Online flag.
    pub online: bool,
    /// The device's state.
    pub state: LightState,
}

/// Bytes per status-page record.
pub const PAGE_RECORD_LEN: usize = 24;
/// Bytes of the status-page header.
pub const PAGE_HEADER_LEN: usize = 6;

/// An `f9 52` status page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusPages {
    /// Device count from the header (u16 LE at data[4..6]).
    pub count: u16,
    /// The records.
    pub records: Vec<PageRecord>,
}

impl StatusPages {
    /// Parses page data: a 6-byte header then whole 24-byte records.
    pub fn parse(data: &[u8]) -> Option<Self> {
        let (head, rest) = data.split_at_checked(PAGE_HEADER_LEN)?;
        if rest.len() % PAGE_RECORD_LEN != 0 {
            return None;
        }
        let records = rest
            .chunks_exact(PAGE_RECORD_LEN)
            .map(|r| PageRecord {
                mesh_id: u16::from_le_bytes([r[0], r[1]]),
                device_type: r[2],
                online: r[3] != 0,
                state: LightState {
                    on: r[8] != 0,
                    brightness: r[12],
                    color: Color::from_bytes(r[16], [r[20], r[21], r[22]]),
                },
            })
            .collect();
        Some(Self {
            count: u16::from_le_bytes([head[4], head[5]]),
            records,
        })
    }

    /// Page data bytes (count in both header positions, as real devices send it).
    pub fn to_data(&self) -> Vec<u8> {
        let c = self.count.to_le_bytes();
        let mut d = vec![c[0], c[1], 0, 0, c[0], c[1]];
        for r in &self.records {
            let mut rec = [0u8; PAGE_RECORD_LEN];
            rec[0..2].copy_from_slice(&r.mesh_id.to_le_bytes());
            rec[2] = r.device_type;
            rec[3] = u8::from(r.online);
            rec[6] = r.device_type;
            rec[8] = u8::from(r.state.on);
            rec[12] = r.state.brightness;
            let (ct, rgb) = r.state.color.to_bytes();
            rec[16] = ct;
            rec[20..23].copy_from_slice(&rgb);
            d.extend_from_slice(&rec);
        }
        d
    }
}

/// A firmware-version announcement (`fa 00`, §3.9).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FirmwareVersion {
    /// 0 = home/network version, 1 = device firmware.
    pub kind: u8,
    /// ASCII version, NUL padding removed.
    pub version: String,
}

/// Data length of a firmware-version frame.
pub const FIRMWARE_DATA_LEN: usize = 0x20;
/// Data before the kind byte: seven zeros, `ea 00 00 00`, `86 01` (as in every captured sample).
const FIRMWARE_PREFIX: [u8; 13] = [0, 0, 0, 0, 0, 0, 0, 0xea, 0, 0, 0, 0x86, 0x01];

impl FirmwareVersion {
    /// Parses `fa 00` data.
    pub fn parse(data: &[u8]) -> Option<Self> {
        let (prefix, rest) = data.split_at_checked(FIRMWARE_PREFIX.len())?;
        if prefix[7..] != FIRMWARE_PREFIX[7..] {
            return None;
        }
        let (&kind, text) = rest.split_first()?;
        let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
        let version = std::str::from_utf8(&text[..end]).ok()?.to_owned();
        Some(Self { kind, version })
    }

    /// `device` or `network`.
    pub fn kind_label(&self) -> &'static str {
        match self.kind {
            0 => "network",
            1 => "device",
            _ => "other",
        }
    }

    /// The firmware inner frame (0x00 opener, seq 0), version truncated to fit 32 data bytes.
    pub fn to_inner(&self) -> InnerFrame {
        let mut d = FIRMWARE_PREFIX.to_vec();
        d.push(self.kind);
        let room = FIRMWARE_DATA_LEN - d.len();
        let v = self.version.as_bytes();
        d.extend_from_slice(&v[..v.len().min(room)]);
        d.resize(FIRMWARE_DATA_LEN, 0);
        let mut f = InnerFrame::new(0, Direction::Announce, opcode::FIRMWARE, d);
        f.opener = FIRMWARE_OPENER;
        f
    }
}

/// The decoded meaning of an inner frame's data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Payload {
    /// A control command.
    Command(Command),
    /// `f8 52`: status page query.
    StatusQuery,
    /// `f8 af`: status-page ack.
    PageAck,
    /// `f8 ea` or another zero-length request.
    Query,
    /// A one-byte `f9` response: the status byte (0x00 = executed).
    Result(u8),
    /// `f9 52` status pages.
    Pages(StatusPages),
    /// `fa db` own-state announcement.
    Status(AnnouncedStatus),
    /// `fa 00` firmware version.
    Firmware(FirmwareVersion),
    /// Nothing more is known about these bytes.
    Opaque,
}

/// Decodes what an inner frame carries. Never fails: unknown layouts are [`Payload::Opaque`].
pub fn decode_payload(f: &InnerFrame) -> Payload {
    let d = &f.data[..];
    match (f.dir, f.opcode) {
        (Direction::Response, _) if d.len() == 1 => Payload::Result(d[0]),
        (Direction::Response, opcode::STATUS_PAGES) => {
            StatusPages::parse(d).map_or(Payload::Opaque, Payload::Pages)
        }
        (Direction::Request, opcode::STATUS_PAGES) => Payload::StatusQuery,
        (Direction::Request, opcode::PAGE_ACK) => Payload::PageAck,
        (Direction::Request, _) if d.is_empty() => Payload::Query,
        (
            Direction::Request,
            opcode::POWER | opcode::BRIGHTNESS | opcode::COLOR | opcode::COMBO | opcode::MESH_RELAY,
        ) => Command::parse(f.opcode, d).map_or(Payload::Opaque, Payload::Command),
        (Direction::Announce, opcode::STATUS) => {
            AnnouncedStatus::parse(d).map_or(Payload::Opaque, Payload::Status)
        }
        (Direction::Announce, opcode::FIRMWARE) => {
            FirmwareVersion::parse(d).map_or(Payload::Opaque, Payload::Firmware)
        }
        _ => Payload::Opaque,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hexutil::parse_hex;

    fn inner(s: &str) -> InnerFrame {
        InnerFrame::decode(&parse_hex(s).unwrap()).unwrap()
    }

    #[test]
    fn power_command() {
        let f = inner("7e 21 00 00 00 f8 d0 0d 00 21 00 00 00 00 05 00 d0 11 02 01 00 00 e7 7e");
        let Payload::Command(c) = decode_payload(&f) else {
            panic!("not a command")
        };
        assert_eq!(c.seq, 0x21);
        assert_eq!(c.mesh_id, 5);
        assert_eq!(c.action, Action::Power { on: true });
        assert_eq!(c.to_inner(0x21), f);
    }

    #[test]
    fn colour_commands() {
        let f = inner("7e01010000f8e20c0001010000000500e211020538277e");
        assert_eq!(
            decode_payload(&f),
            Payload::Command(Command {
                seq: 0x101,
                mesh_id: 5,
                action: Action::ColorTemp { temp: 56 }
            })
        );
        let f = inner("7e 14 00 00 00 f8 e2 0e 00 14 00 00 00 00 0a 00 e2 11 02 07 01 01 f1 fd 7e");
        let Payload::Command(c) = decode_payload(&f) else {
            panic!()
        };
        assert_eq!(
            c.action,
            Action::Effect {
                effect: [0x01, 0xf1]
            }
        );
        assert_eq!(c.to_inner(0x14), f);
    }

    #[test]
    fn legacy_marker_accepted() {
        let data = parse_hex("01 00 00 00 00 05 00 d0 00 00 01 00 00").unwrap();
        let c = Command::parse(opcode::POWER, &data).unwrap();
        assert_eq!(c.action, Action::Power { on: true });
        let bad = parse_hex("01 00 00 00 00 05 00 d0 12 34 01 00 00").unwrap();
        assert!(Command::parse(opcode::POWER, &bad).is_none());
        let wrong_op = parse_hex("01 00 00 00 00 05 00 d2 11 02 01 00 00").unwrap();
        assert!(Command::parse(opcode::POWER, &wrong_op).is_none());
    }

    #[test]
    fn mesh_relay() {
        let f = inner("7e 20 00 00 00 f8 8e 0b 00 20 00 00 00 00 ff ff f7 11 02 21 e2 7e");
        let Payload::Command(c) = decode_payload(&f) else {
            panic!()
        };
        assert_eq!(c.mesh_id, 0xffff);
        assert_eq!(
            c.action,
            Action::MeshRelay {
                ops: Bytes::from_static(&[0xf7, 0x11, 0x02, 0x21])
            }
        );
        assert_eq!(c.to_inner(0x20), f);
    }

    #[test]
    fn status_announcement() {
        let f = inner(
            "7e 25 00 00 00 fa db 13 00 7c 22 11 07 00 07 00 db 11 02 00 01 64 fe f8 00 00 00 00 f4 7e",
        );
        let Payload::Status(s) = decode_payload(&f) else {
            panic!()
        };
        assert_eq!(s.mesh_id, 7);
        assert_eq!(s.connected, 0);
        assert_eq!(
            s.state,
            LightState {
                on: true,
                brightness: 100,
                color: Color::Rgb([0xf8, 0, 0])
            }
        );
        assert_eq!(s.to_inner(0x25), f);
    }

    #[test]
    fn pages() {
        let f = inner(
            "7e 00 01 00 00 f9 52 4e 00 03 00 00 00 03 00 03 00 81 01 00 00 81 01 00 00 00 00 35 00 00 00 27 00 00 00 00 00 00 00 02 00 00 01 00 00 00 01 00 00 00 00 35 00 00 00 27 00 00 00 00 00 00 00 01 00 00 01 00 00 00 01 00 00 00 00 35 00 00 00 27 00 00 00 00 00 00 00 c8 7e",
        );
        let Payload::Pages(p) = decode_payload(&f) else {
            panic!()
        };
        assert_eq!(p.count, 3);
        assert_eq!(p.records.len(), 3);
        assert_eq!(p.records[0].mesh_id, 3);
        assert_eq!(p.records[0].device_type, 0x81);
        assert!(p.records[0].online);
        assert_eq!(p.records[0].state.brightness, 0x35);
        assert_eq!(p.records[0].state.color, Color::Temp(0x27));
        assert!(!p.records[0].state.on);
        assert!(!p.records[2].state.on);
        assert_eq!(p.records[2].mesh_id, 1);
        // The builder reproduces pages that carry only decoded fields.
        let again = StatusPages::parse(&p.to_data()).unwrap();
        assert_eq!(again, p);
    }

    #[test]
    fn firmware() {
        let f = inner(
            "00 00 00 00 00 fa 00 20 00 00 00 00 00 00 00 00 ea 00 00 00 86 01 01 31 30 32 39 38 00 00 00 00 00 00 00 00 00 00 00 00 00 96 7e",
        );
        let Payload::Firmware(v) = decode_payload(&f) else {
            panic!()
        };
        assert_eq!(v.version, "10298");
        assert_eq!(v.kind_label(), "device");
        assert_eq!(v.to_inner(), f);
    }

    #[test]
    fn short_result_and_queries() {
        assert_eq!(
            decode_payload(&inner("7e 1f 00 00 00 f9 52 01 00 00 53 7e")),
            Payload::Result(0)
        );
        assert_eq!(
            decode_payload(&inner("7e 25 01 00 00 f8 ea 00 00 ea 7e")),
            Payload::Query
        );
        assert_eq!(
            decode_payload(&inner("7e 1e 00 00 00 f8 af 02 00 af 01 61 7e")),
            Payload::PageAck
        );
    }
}
