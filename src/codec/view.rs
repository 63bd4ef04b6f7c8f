//! Human- and machine-readable views of decoded frames: the JSON object the `decode` command prints
//! (one per frame; the field contract is in the README) and a one-line summary for logs, tables and
//! capture comments.

use super::frame::{Body, Frame, Msg};
use super::framer::FramerError;
use super::inner::InnerFrame;
use super::payload::{Action, Color, LightState, Payload, decode_payload};
use super::tlv::{Record, RecordValue};
use crate::hexutil::{to_hex, to_hex_capped};

/// Bytes of an opaque payload a one-line summary shows in hex (the JSON view shows them all).
const SUMMARY_HEX: usize = 48;
use bytes::Bytes;
use serde_json::{Map, Value, json};

type Obj = Map<String, Value>;

fn text_or_hex(obj: &mut Obj, key: &str, b: &[u8]) {
    match std::str::from_utf8(b) {
        Ok(s) if !s.chars().any(char::is_control) => {
            obj.insert(key.into(), json!(s));
        }
        _ => {
            obj.insert(format!("{key}_hex"), json!(to_hex(b)));
        }
    }
}

fn insert_color(obj: &mut Obj, color: Color) {
    match color {
        Color::Temp(t) => obj.insert("color_temp".into(), json!(t)),
        Color::Rgb(rgb) => obj.insert("rgb".into(), json!(rgb)),
    };
}

fn state_obj(mesh_id: u64, s: &LightState) -> Obj {
    let mut o = Obj::new();
    o.insert("mesh_id".into(), json!(mesh_id));
    o.insert("on".into(), json!(s.on));
    o.insert("brightness".into(), json!(s.brightness));
    insert_color(&mut o, s.color);
    o
}

fn record_json(r: &Record) -> Value {
    let mut o = Obj::new();
    o.insert("tag".into(), json!(format!("0x{:02x}", r.tag)));
    match r.decode() {
        RecordValue::Status(s) => {
            let mut st = state_obj(u64::from(s.mesh_id), &s.state);
            if let Some(online) = s.online {
                st.insert("online".into(), json!(online));
            }
            if let Some(rel) = s.relayed {
                st.insert("relayed".into(), json!(rel != 0));
            }
            if let Some(b) = s.bridge {
                st.insert("bridge".into(), json!(b));
            }
            o.insert("kind".into(), json!("status"));
            o.insert("status".into(), Value::Object(st));
        }
        RecordValue::Int(v) => {
            o.insert("kind".into(), json!("int"));
            o.insert("value".into(), json!(v));
        }
        RecordValue::Text(t) => {
            o.insert("kind".into(), json!("text"));
            o.insert("text".into(), json!(t));
        }
        RecordValue::Opaque => {
            o.insert("kind".into(), json!("opaque"));
            o.insert("flag".into(), json!(r.flag));
            o.insert("hex".into(), json!(to_hex(&r.value)));
        }
    }
    Value::Object(o)
}

fn command_json(c: &super::payload::Command) -> Value {
    let mut o = Obj::new();
    o.insert("kind".into(), json!(c.action.name()));
    o.insert("mesh_id".into(), json!(c.mesh_id));
    o.insert("seq".into(), json!(c.seq));
    match &c.action {
        Action::Power { on } => {
            o.insert("on".into(), json!(on));
        }
        Action::Brightness { brightness } => {
            o.insert("brightness".into(), json!(brightness));
        }
        Action::ColorTemp { temp } => {
            o.insert("color_temp".into(), json!(temp));
        }
        Action::Rgb { rgb } => {
            o.insert("rgb".into(), json!(rgb));
        }
        Action::Effect { effect } => {
            o.insert("effect".into(), json!(to_hex(effect)));
        }
        Action::Combo {
            on,
            brightness,
            mode,
            rgb,
        } => {
            o.insert("on".into(), json!(on));
            let (bri, color) = super::payload::combo_effect(*brightness, *mode, *rgb);
            if let Some(b) = bri {
                o.insert("brightness".into(), json!(b));
            }
            if let Some(c) = color {
                insert_color(&mut o, c);
            }
        }
        Action::MeshRelay { ops } => {
            o.insert("ops".into(), json!(to_hex(ops)));
        }
    }
    Value::Object(o)
}

/// The JSON object of one inner frame (without its error; see [`frame_json`]).
pub fn inner_json(f: &InnerFrame) -> Value {
    let mut o = Obj::new();
    o.insert("seq".into(), json!(f.seq));
    o.insert("dir".into(), json!(f.dir.label()));
    o.insert("opcode".into(), json!(format!("0x{:02x}", f.opcode)));
    o.insert("len".into(), json!(f.data.len()));
    o.insert("checksum".into(), json!(format!("0x{:02x}", f.checksum)));
    o.insert("checksum_ok".into(), json!(f.checksum_ok()));
    if !f.checksum_ok() {
        o.insert(
            "checksum_expected".into(),
            json!(format!("0x{:02x}", f.expected_checksum())),
        );
    }
    if f.opener != super::inner::DELIMITER {
        o.insert("opener".into(), json!(format!("0x{:02x}", f.opener)));
    }
    match decode_payload(f) {
        Payload::Command(c) => {
            o.insert("command".into(), command_json(&c));
        }
        Payload::StatusQuery => {
            o.insert("command".into(), json!({"kind": "status_query"}));
        }
        Payload::PageAck => {
            o.insert("command".into(), json!({"kind": "page_ack"}));
        }
        Payload::Query => {
            o.insert("command".into(), json!({"kind": "query"}));
        }
        Payload::Result(code) => {
            o.insert("result".into(), json!(code));
        }
        Payload::Pages(p) => {
            o.insert("count".into(), json!(p.count));
            let list: Vec<Value> = p
                .records
                .iter()
                .map(|r| {
                    let mut s = state_obj(u64::from(r.mesh_id), &r.state);
                    s.insert("online".into(), json!(r.online));
                    s.insert("device_type".into(), json!(r.device_type));
                    Value::Object(s)
                })
                .collect();
            o.insert("statuses".into(), Value::Array(list));
        }
        Payload::Status(s) => {
            let mut st = state_obj(u64::from(s.mesh_id), &s.state);
            st.insert("counter".into(), json!(s.counter));
            st.insert("connected".into(), json!(s.connected != 0));
            o.insert("status".into(), Value::Object(st));
        }
        Payload::Firmware(v) => {
            o.insert(
                "firmware".into(),
                json!({"kind": v.kind_label(), "version": v.version}),
            );
        }
        Payload::Opaque => {}
    }
    o.insert("data".into(), json!(to_hex(&f.data)));
    Value::Object(o)
}

fn msg_json(m: Msg) -> Value {
    json!(m.to_string())
}

/// The JSON object for one whole frame's bytes: `type`, `name`, `len`, then what decoding found,
/// or an `error` field. Never fails.
pub fn frame_json(bytes: &Bytes) -> Value {
    let mut o = Obj::new();
    let Some(&t) = bytes.first() else {
        return json!({"error": "empty frame"});
    };
    let ptype = super::PacketType(t);
    o.insert("type".into(), json!(ptype.to_string()));
    o.insert("name".into(), json!(ptype.name()));
    o.insert(
        "len".into(),
        json!(bytes.len().saturating_sub(super::HEADER_LEN)),
    );
    match Frame::decode(bytes) {
        Ok(f) => fill_frame(&mut o, &f),
        Err(e) => {
            o.insert("error".into(), json!(e.to_string()));
            o.insert(
                "body".into(),
                json!(to_hex(bytes.get(super::HEADER_LEN..).unwrap_or_default())),
            );
        }
    }
    Value::Object(o)
}

fn fill_frame(o: &mut Obj, f: &Frame) {
    if let Some(id) = f.id() {
        o.insert("id".into(), json!(format!("{id:08x}")));
    }
    if let Some(m) = f.msg() {
        o.insert("msg".into(), msg_json(m));
    }
    if let Some(req) = super::answer::answered_request_type(f.ptype) {
        o.insert("acks".into(), json!(req.to_string()));
    }
    if let Some(ans) = super::answer::expected_answer_type(f.ptype) {
        o.insert("expects".into(), json!(ans.to_string()));
    }
    match &f.body {
        Body::Login(l) => {
            o.insert("version".into(), json!(l.version));
            o.insert("user_id".into(), json!(format!("{:08x}", l.user_id)));
            text_or_hex(o, "auth", &l.auth);
            o.insert("trailer".into(), json!(to_hex(&l.trailer)));
        }
        Body::Handshake(h) => {
            o.insert("version".into(), json!(h.version));
            o.insert("device_id".into(), json!(h.device_id.to_string()));
            text_or_hex(o, "auth_code", &h.auth_code);
            o.insert("trailer".into(), json!(to_hex(&h.trailer)));
        }
        Body::LoginResult(b) | Body::HandshakeAck(b) => {
            o.insert("result".into(), json!(to_hex(b)));
            o.insert("ok".into(), json!(b.iter().all(|&x| x == 0)));
        }
        Body::Sync(s) => {
            let recs: Vec<Value> = s.records.iter().map(record_json).collect();
            o.insert("records".into(), Value::Array(recs));
            if !s.trailing.is_empty() {
                o.insert("trailing".into(), json!(to_hex(&s.trailing)));
            }
        }
        Body::Pipe(p) => match &p.inner {
            Ok(inner) => {
                o.insert("inner".into(), inner_json(inner));
            }
            Err(bad) => {
                o.insert("error".into(), json!(format!("inner frame: {}", bad.error)));
                o.insert("inner_hex".into(), json!(to_hex(&bad.bytes)));
            }
        },
        Body::CloudStatus(c) => {
            o.insert("status".into(), json!(c.status()));
            if !c.extra.is_empty() {
                o.insert("extra".into(), json!(to_hex(&c.extra)));
            }
        }
        Body::Probe(p) => {
            if !p.extra.is_empty() {
                o.insert("extra".into(), json!(to_hex(&p.extra)));
            }
        }
        Body::ProbeReply(r) => {
            if let Some(n) = r.name() {
                o.insert("device_name".into(), json!(n));
            }
            if let Some(t) = r.text() {
                o.insert("text".into(), json!(t));
            }
        }
        Body::TimeAnswer(t) => {
            // Not "time": `capture read` puts the capture time under that key.
            o.insert(
                "clock".into(),
                json!({
                    "date": t.date(),
                    "weekday": t.weekday_name(),
                    "time": t.time(),
                    "utc_offset": t.offset(),
                }),
            );
        }
        Body::TimeRequest(b) | Body::Disconnect(b) | Body::Raw(b) => {
            o.insert("body".into(), json!(to_hex(b)));
        }
        Body::SyncAck(_) | Body::PipeAck(_) | Body::PipeSyncAck(_) | Body::Empty => {}
    }
}

fn state_summary(s: &LightState) -> String {
    let color = match s.color {
        Color::Temp(t) => format!("ct={t}"),
        Color::Rgb([r, g, b]) => format!("rgb={r:02x}{g:02x}{b:02x}"),
    };
    format!(
        "{} bri={} {color}",
        if s.on { "on" } else { "off" },
        s.brightness
    )
}

/// One-line description of an inner frame: direction, opcode, seq, checksum state, meaning.
pub fn inner_summary(f: &InnerFrame) -> String {
    let mut s = format!(
        "{:02x} {:02x} seq={} ck={}",
        f.dir.byte(),
        f.opcode,
        f.seq,
        if f.checksum_ok() { "ok" } else { "BAD" }
    );
    let what = match decode_payload(f) {
        Payload::Command(c) => match &c.action {
            Action::Power { on } => format!(
                "power mesh={} {}",
                c.mesh_id,
                if *on { "on" } else { "off" }
            ),
            Action::Brightness { brightness } => {
                format!("brightness mesh={} {brightness}", c.mesh_id)
            }
            Action::ColorTemp { temp } => format!("ct mesh={} {temp}", c.mesh_id),
            Action::Rgb { rgb } => format!("rgb mesh={} {}", c.mesh_id, to_hex(rgb)),
            Action::Effect { effect } => format!(
                "effect mesh={} {}",
                c.mesh_id,
                to_hex_capped(effect, SUMMARY_HEX)
            ),
            Action::Combo { .. } => format!("combo mesh={}", c.mesh_id),
            Action::MeshRelay { ops } => format!(
                "relay mesh={} {}",
                c.mesh_id,
                to_hex_capped(ops, SUMMARY_HEX)
            ),
        },
        Payload::StatusQuery => "status query".into(),
        Payload::PageAck => "page ack".into(),
        Payload::Query => "query".into(),
        Payload::Result(c) => format!("result={c}"),
        Payload::Pages(p) => format!("pages n={}", p.records.len()),
        Payload::Status(st) => format!("status mesh={} {}", st.mesh_id, state_summary(&st.state)),
        Payload::Firmware(v) => {
            let shown: String = v.version.chars().take(SUMMARY_HEX).collect();
            let more = if shown.len() < v.version.len() {
                "…"
            } else {
                ""
            };
            format!("firmware {}={shown}{more}", v.kind_label())
        }
        Payload::Opaque => String::new(),
    };
    if !what.is_empty() {
        s.push(' ');
        s.push_str(&what);
    }
    s
}

/// The parts of a one-line frame description.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameSummary {
    /// Packet type.
    pub ptype: super::PacketType,
    /// The 4-byte id, where present.
    pub id: Option<u32>,
    /// The message field, where present.
    pub msg: Option<Msg>,
    /// What the body says (device id, inner frame, records, time, or the decode error).
    pub detail: String,
}

impl std::fmt::Display for FrameSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.ptype, self.ptype.name())?;
        if let Some(id) = self.id {
            write!(f, " id={id:08x}")?;
        }
        if let Some(m) = self.msg {
            write!(f, " msg={m}")?;
        }
        if !self.detail.is_empty() {
            write!(f, " {}", self.detail)?;
        }
        Ok(())
    }
}

/// Describes a whole frame's bytes (never fails; an empty slice is type 0x00 "unknown").
pub fn summarize(bytes: &Bytes) -> FrameSummary {
    let ptype = super::PacketType(bytes.first().copied().unwrap_or(0));
    let mut out = FrameSummary {
        ptype,
        id: None,
        msg: None,
        detail: String::new(),
    };
    match Frame::decode(bytes) {
        Ok(f) => describe(&mut out, &f),
        Err(e) => out.detail = format!("error: {e}"),
    }
    out
}

/// [`summarize`] of a frame already decoded (`None`: it did not decode, and is decoded again
/// for the error).
pub fn summarize_decoded(bytes: &Bytes, decoded: Option<&Frame>) -> FrameSummary {
    let Some(f) = decoded else {
        return summarize(bytes);
    };
    let mut out = FrameSummary {
        ptype: f.ptype,
        id: None,
        msg: None,
        detail: String::new(),
    };
    describe(&mut out, f);
    out
}

fn describe(out: &mut FrameSummary, f: &Frame) {
    out.id = f.id();
    out.msg = f.msg();
    out.detail = match &f.body {
        Body::Handshake(h) => format!("device={}", h.device_id),
        Body::Login(l) => format!("user={:08x}", l.user_id),
        Body::Pipe(p) => match &p.inner {
            Ok(i) => inner_summary(i),
            Err(bad) => format!("error: inner frame: {}", bad.error),
        },
        Body::Sync(sy) => format!("records={}", sy.records.len()),
        Body::TimeAnswer(t) => format!("{} {}{}", t.date(), t.time(), t.offset()),
        Body::CloudStatus(c) => format!("status=0x{:02x}", c.status()),
        _ => String::new(),
    };
}

/// One-line description of a whole frame, for logs, tables and capture comments.
pub fn frame_summary(bytes: &Bytes) -> String {
    if bytes.is_empty() {
        return "empty".into();
    }
    summarize(bytes).to_string()
}

/// JSON object for a framing error.
pub fn framer_error_json(e: &FramerError) -> Value {
    match e {
        FramerError::TooLarge {
            type_byte,
            frame_len,
            max,
        } => json!({
            "error": e.to_string(),
            "type": format!("0x{type_byte:02x}"),
            "declared_len": frame_len,
            "max": max,
        }),
        FramerError::Skipped { bytes } => json!({"error": e.to_string(), "skipped": bytes}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hexutil::parse_hex;

    fn j(s: &str) -> Value {
        frame_json(&Bytes::from(parse_hex(s).unwrap()))
    }

    #[test]
    fn pipe_contract_fields() {
        let v = j(
            "73 00 00 00 1f 37 96 24 69 15 37 00 7e 21 00 00 00 f8 d0 0d 00 21 00 00 00 00 05 00 d0 11 02 01 00 00 e7 7e",
        );
        assert_eq!(v["type"], "0x73");
        assert_eq!(v["name"], "pipe");
        assert_eq!(v["len"], 31);
        assert_eq!(v["id"], "37962469");
        assert_eq!(v["msg"], "153700");
        assert_eq!(v["inner"]["seq"], 0x21);
        assert_eq!(v["inner"]["dir"], "request");
        assert_eq!(v["inner"]["opcode"], "0xd0");
        assert_eq!(v["inner"]["len"], 13);
        assert_eq!(v["inner"]["checksum_ok"], true);
        assert_eq!(v["inner"]["command"]["kind"], "power");
        assert_eq!(v["inner"]["command"]["on"], true);
        assert_eq!(v["inner"]["command"]["mesh_id"], 5);
    }

    #[test]
    fn errors_are_fields() {
        let v = j("23 00 00 00 02 03 38");
        assert!(v["error"].as_str().unwrap().contains("handshake"));
        assert_eq!(v["name"], "handshake");
        let v = j("73 00 00 00 0a 45 88 0f 3a 00 10 00 00 7e 10");
        assert!(v["error"].as_str().unwrap().starts_with("inner frame:"));
        assert_eq!(v["id"], "45880f3a");
    }

    #[test]
    fn summaries() {
        let b = Bytes::from(parse_hex("83 00 00 00 25 37 96 24 69 00 05 00 7e 21 00 00 00 fa db 13 00 34 22 11 05 00 05 00 db 11 02 01 01 64 00 00 00 00 00 00 b3 7e").unwrap());
        let s = frame_summary(&b);
        assert!(s.contains("pipe_sync"), "{s}");
        assert!(s.contains("status mesh=5 on bri=100 ct=0"), "{s}");
        assert!(s.contains("ck=ok"), "{s}");
        assert_eq!(frame_summary(&Bytes::new()), "empty");
    }
}
