//! The web console's live data: what each connected device last said about its light (decoded
//! from its status frames), its frame rate and last frame, and the stream of decoded frames the
//! page shows as they pass (`GET /api/events`, Server-Sent Events).
//!
//! Both are fed by [`Console`], a [`TapSink`]: it runs on the session's task for every frame, so
//! it only updates one uncontended per-connection lock and, while a page has the stream open,
//! renders the frame once and hands it to a bounded broadcast. Nothing here waits: a stream that
//! cannot keep up loses events (counted, and told to the page), a frame rate above
//! `admin.console_max_events_per_second` is sampled (counted), and with no page open no event is
//! built at all.

pub mod assets;
pub mod sse;

use crate::codec::payload::{Color, LightState};
use crate::codec::tlv::RecordValue;
use crate::codec::{Body, Frame, Payload, RawFrame, decode_payload};
use crate::metrics::{Flow, Metrics};
use crate::proxy::tap::{ConnMeta, TapSink};
use bytes::Bytes;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::broadcast;

/// Seconds the frame rate is averaged over.
const RATE_WINDOW: usize = 10;
/// Other mesh members remembered per connection (a bridge relays its mesh's states).
const MAX_MESH: usize = 256;
/// Longest firmware string kept.
const MAX_FIRMWARE: usize = 64;
/// Longest frame summary put on the stream (a 64 KiB mesh-relay frame would be 130 KB of hex).
const MAX_SUMMARY: usize = 240;

/// `s` cut to at most `max` bytes on a character boundary, with `…` when cut.
fn capped(mut s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push('…');
    s
}

/// The last state of one light.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    /// The light.
    pub state: LightState,
    /// When it was reported.
    pub at: SystemTime,
}

/// What one connection's frames said, for the devices table.
#[derive(Debug, Default)]
pub struct LiveState {
    /// The device's own mesh id, once a frame told it.
    own_mesh: Option<u16>,
    /// The device's own light.
    own: Option<Seen>,
    /// The other lights its frames reported (a bridge relays the mesh), by mesh id.
    mesh: BTreeMap<u16, Seen>,
    /// Device firmware from its `fa 00` announcement.
    firmware: Option<String>,
    /// Frames both ways.
    frames: u64,
    /// Frames per second of the last [`RATE_WINDOW`] seconds, a ring indexed by unix second.
    window: [u32; RATE_WINDOW],
    /// The unix second of the newest slot written.
    window_sec: u64,
    /// The last frame: when, which way, its type.
    last: Option<(SystemTime, Flow, u8)>,
}

/// One connection's [`LiveState`] behind its own lock (only its session's two taps and the
/// console's readers take it).
#[derive(Debug, Default)]
pub struct DeviceLive(Mutex<LiveState>);

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl LiveState {
    fn advance(&mut self, sec: u64) {
        if sec <= self.window_sec {
            return;
        }
        let gap = (sec - self.window_sec).min(RATE_WINDOW as u64);
        for i in 1..=gap {
            self.window[((self.window_sec + i) % RATE_WINDOW as u64) as usize] = 0;
        }
        self.window_sec = sec;
    }

    /// Counts a frame and learns what it says about the lights.
    pub fn on_frame(&mut self, at: SystemTime, flow: Flow, ptype: u8, decoded: Option<&Frame>) {
        self.frames += 1;
        let sec = unix_secs(at);
        self.advance(sec);
        let slot = &mut self.window[(sec % RATE_WINDOW as u64) as usize];
        *slot = slot.saturating_add(1);
        self.last = Some((at, flow, ptype));
        if flow == Flow::DeviceToCloud
            && let Some(f) = decoded
        {
            self.learn(at, f);
        }
    }

    fn set(&mut self, at: SystemTime, mesh: u16, state: LightState, own: bool) {
        if own {
            self.own_mesh = Some(mesh);
        }
        let seen = Seen { state, at };
        if own || self.own_mesh == Some(mesh) {
            self.own = Some(seen);
            self.mesh.remove(&mesh);
        } else if self.mesh.len() < MAX_MESH || self.mesh.contains_key(&mesh) {
            self.mesh.insert(mesh, seen);
        }
    }

    fn learn(&mut self, at: SystemTime, f: &Frame) {
        match &f.body {
            Body::Sync(s) => {
                for r in &s.records {
                    if let RecordValue::Status(st) = r.decode() {
                        // 0x00: the device's own record; 0x14: relayed from the mesh.
                        let own = st.relayed == Some(0)
                            && st.bridge.is_none_or(|b| b == st.mesh_id)
                            || st.relayed.is_none() && s.records.len() == 1;
                        self.set(at, u16::from(st.mesh_id), st.state, own);
                    }
                }
            }
            Body::Pipe(_) => {
                let Some(inner) = f.inner() else { return };
                match decode_payload(inner) {
                    Payload::Status(a) => self.set(at, a.mesh_id, a.state, true),
                    Payload::Pages(p) => {
                        for r in &p.records {
                            self.set(at, r.mesh_id, r.state, false);
                        }
                    }
                    Payload::Firmware(fw) if fw.kind == 1 => {
                        let mut v = fw.version;
                        if v.len() > MAX_FIRMWARE {
                            let mut end = MAX_FIRMWARE;
                            while !v.is_char_boundary(end) {
                                end -= 1;
                            }
                            v.truncate(end);
                        }
                        self.firmware = Some(v);
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }

    /// Frames per second over the last [`RATE_WINDOW`] whole seconds before `now`.
    pub fn rate(&self, now: SystemTime) -> f64 {
        let sec = unix_secs(now);
        let mut sum = 0u64;
        for back in 1..=RATE_WINDOW as u64 {
            let s = sec.saturating_sub(back);
            if s + RATE_WINDOW as u64 > self.window_sec && s <= self.window_sec {
                sum += u64::from(self.window[(s % RATE_WINDOW as u64) as usize]);
            }
        }
        sum as f64 / RATE_WINDOW as f64
    }

    /// The devices-table fields: state, mesh, firmware, frames, rate, last frame.
    pub fn report(&self, now: SystemTime) -> Value {
        let mesh: Vec<Value> = self
            .mesh
            .iter()
            .map(|(id, s)| json!({"mesh_id": id, "state": state_json(&s.state), "at": rfc3339(s.at)}))
            .collect();
        json!({
            "mesh_id": self.own_mesh,
            "state": self.own.map(|s| state_json(&s.state)),
            "state_at": self.own.map(|s| rfc3339(s.at)),
            "mesh": mesh,
            "firmware": self.firmware,
            "frames": self.frames,
            "frames_per_second": self.rate(now),
            "last_frame": self.last.map(|(at, flow, t)| json!({
                "at": rfc3339(at),
                "direction": flow.label(),
                "type": format!("0x{t:02x}"),
                "name": crate::codec::PacketType(t).name(),
            })),
        })
    }
}

impl DeviceLive {
    /// Counts a frame of this connection and learns what it says.
    pub fn on_frame(&self, at: SystemTime, flow: Flow, ptype: u8, decoded: Option<&Frame>) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .on_frame(at, flow, ptype, decoded);
    }

    /// [`LiveState::report`].
    pub fn report(&self, now: SystemTime) -> Value {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).report(now)
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// `{"on", "brightness", "color": {"temp": 0–100} | {"rgb": "#rrggbb"}}`.
pub fn state_json(s: &LightState) -> Value {
    let color = match s.color {
        Color::Temp(t) => json!({"temp": t}),
        Color::Rgb([r, g, b]) => json!({"rgb": format!("#{r:02x}{g:02x}{b:02x}")}),
    };
    json!({"on": s.on, "brightness": s.brightness, "color": color})
}

/// One decoded frame on the stream, rendered once for every open stream.
#[derive(Debug)]
pub struct Event {
    /// Sequence number (a gap on the page means events were dropped).
    pub seq: u64,
    /// The device, when the connection is a device's.
    pub device: Option<u32>,
    /// Packet type.
    pub ptype: u8,
    /// The SSE message (`id:`, `data:` and the blank line).
    pub sse: Bytes,
}

/// The console's tap and the stream's source.
pub struct Console {
    tx: broadcast::Sender<Arc<Event>>,
    metrics: Arc<Metrics>,
    /// Open streams (kept here: the broadcast's own count takes its lock).
    streams: AtomicUsize,
    seq: Mutex<u64>,
    /// Events allowed per second, and the current second's budget: `sec << 32 | used`.
    max_rate: AtomicU64,
    budget: AtomicU64,
}

/// Events a stream may fall behind before it loses the oldest.
pub const BUFFER: usize = 4096;

impl Console {
    /// A console counting into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        let (tx, _) = broadcast::channel(BUFFER);
        Arc::new(Self {
            tx,
            metrics,
            streams: AtomicUsize::new(0),
            seq: Mutex::new(0),
            max_rate: AtomicU64::new(2000),
            budget: AtomicU64::new(0),
        })
    }

    /// Open streams.
    pub fn streams(&self) -> usize {
        self.streams.load(Ordering::Relaxed)
    }

    /// Whether this second's budget has room for one more event.
    fn take_budget(&self, now: SystemTime) -> bool {
        let sec = unix_secs(now) & 0xffff_ffff;
        let max = self.max_rate.load(Ordering::Relaxed);
        let mut cur = self.budget.load(Ordering::Relaxed);
        loop {
            let (s, used) = (cur >> 32, cur & 0xffff_ffff);
            let next = if s == sec {
                if used >= max {
                    return false;
                }
                cur + 1
            } else {
                (sec << 32) | 1
            };
            match self
                .budget
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(c) => cur = c,
            }
        }
    }

    fn publish(&self, meta: &ConnMeta, flow: Flow, raw: &RawFrame, decoded: Option<&Frame>) {
        let now = SystemTime::now();
        if !self.take_budget(now) {
            self.metrics
                .console_dropped
                .with_label_values(&["rate"])
                .inc();
            return;
        }
        let device = match meta.peer {
            crate::route::PeerKind::Device(d) => Some(d.0),
            _ => None,
        };
        let ptype = raw.ptype().0;
        let summary = crate::codec::view::summarize_decoded(raw.bytes(), decoded);
        let data = json!({
            "at": rfc3339(now),
            "device": device.map(|d| format!("{d:08x}")),
            "peer": meta.peer.label(),
            "connection": meta.id.to_string(),
            "direction": flow.label(),
            "type": format!("0x{ptype:02x}"),
            "name": raw.ptype().name(),
            "len": raw.bytes().len(),
            "summary": capped(summary.to_string(), MAX_SUMMARY),
        })
        .to_string();
        let rest = data.strip_prefix('{').unwrap_or(&data);
        // Numbered and sent under one lock: every stream sees the numbers in order.
        let mut seq = self.seq.lock().unwrap_or_else(|p| p.into_inner());
        *seq += 1;
        let n = *seq;
        let ev = Arc::new(Event {
            seq: n,
            device,
            ptype,
            sse: Bytes::from(format!("id: {n}\ndata: {{\"seq\":{n},{rest}\n\n")),
        });
        if self.tx.send(ev).is_ok() {
            self.metrics.console_events.inc();
        }
    }
}

impl TapSink for Console {
    fn on_frame(
        &self,
        meta: &Arc<ConnMeta>,
        flow: Flow,
        raw: &RawFrame,
        decoded: Option<&crate::codec::Frame>,
    ) {
        meta.live
            .on_frame(SystemTime::now(), flow, raw.ptype().0, decoded);
        if self.streams.load(Ordering::Relaxed) > 0 {
            self.publish(meta, flow, raw, decoded);
        }
    }
}

/// Which events a stream wants (`?device=…&type=…`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only these devices (empty: all).
    pub devices: Vec<u32>,
    /// Only these packet types (empty: all).
    pub types: Vec<u8>,
}

impl Filter {
    /// Parses a query string: `device` (hex ids, comma-separated or repeated) and `type`
    /// (`0x83`, `83` or a name such as `pipe_sync`).
    pub fn parse(query: &str) -> Result<Self, String> {
        let mut f = Self::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            // Browsers encode the commas (URLSearchParams): `device=a%2Cb`.
            let v = percent_decode(v);
            for item in v.split(',').map(|s| s.trim()).filter(|s| !s.is_empty()) {
                match k {
                    "device" => {
                        let id = u32::from_str_radix(item.trim_start_matches("0x"), 16)
                            .map_err(|_| format!("device={item}: not a hex device id"))?;
                        f.devices.push(id);
                    }
                    "type" => f.types.push(parse_type(item)?),
                    _ => return Err(format!("unknown parameter `{k}` (device, type)")),
                }
                if f.devices.len() + f.types.len() > 256 {
                    return Err("at most 256 filter values".into());
                }
            }
        }
        Ok(f)
    }

    /// Whether `e` passes.
    pub fn matches(&self, e: &Event) -> bool {
        (self.devices.is_empty() || e.device.is_some_and(|d| self.devices.contains(&d)))
            && (self.types.is_empty() || self.types.contains(&e.ptype))
    }
}

/// `%XX` and `+` of a query value decoded (invalid escapes kept as they are).
fn percent_decode(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(x) => {
                        out.push(x);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_type(s: &str) -> Result<u8, String> {
    let hex = s.trim_start_matches("0x");
    if let Ok(t) = u8::from_str_radix(hex, 16)
        && hex.len() <= 2
    {
        return Ok(t);
    }
    (0..=255u8)
        .find(|t| {
            let name = crate::codec::PacketType(*t).name();
            name != "unknown" && name.eq_ignore_ascii_case(s)
        })
        .ok_or_else(|| format!("type={s}: not a packet type (0x83 or a name such as pipe_sync)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::payload::AnnouncedStatus;
    use crate::codec::tlv::{Record, StatusRecord};
    use crate::codec::{DeviceId, Msg};
    use std::time::Duration;

    fn light(on: bool, brightness: u8, color: Color) -> LightState {
        LightState {
            on,
            brightness,
            color,
        }
    }

    #[test]
    fn learns_the_own_light_from_sync_records_and_announcements_and_the_mesh_from_pages() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000);
        let mut s = LiveState::default();
        let own = Record::status(
            5,
            &StatusRecord {
                mesh_id: 7,
                state: light(true, 40, Color::Temp(30)),
                online: Some(true),
                relayed: Some(0),
                bridge: Some(7),
            },
        );
        let other = Record::status(
            6,
            &StatusRecord {
                mesh_id: 9,
                state: light(false, 10, Color::Rgb([255, 0, 16])),
                online: Some(true),
                relayed: Some(0x14),
                bridge: Some(7),
            },
        );
        let f = Frame::decode(&Frame::sync(1, vec![own, other]).encode().unwrap().into()).unwrap();
        s.on_frame(t0, Flow::DeviceToCloud, 0x43, Some(&f));
        let r = s.report(t0);
        assert_eq!(r["mesh_id"], 7);
        assert_eq!(
            r["state"],
            json!({"on": true, "brightness": 40, "color": {"temp": 30}})
        );
        assert_eq!(r["mesh"][0]["mesh_id"], 9);
        assert_eq!(r["mesh"][0]["state"]["color"]["rgb"], "#ff0010");
        // The own-state announcement (fa db) replaces it.
        let st = AnnouncedStatus {
            counter: 1,
            kind: 0x22,
            mesh_id: 7,
            connected: 1,
            state: light(false, 80, Color::Rgb([1, 2, 3])),
        };
        let f = Frame::decode(
            &Frame::pipe_sync(1, Msg::counter(1), st.to_inner(0))
                .encode()
                .unwrap()
                .into(),
        )
        .unwrap();
        s.on_frame(t0, Flow::DeviceToCloud, 0x83, Some(&f));
        let r = s.report(t0);
        assert_eq!(r["state"]["on"], false);
        assert_eq!(r["state"]["brightness"], 80);
        assert_eq!(r["state"]["color"]["rgb"], "#010203");
        // What the cloud sends says nothing about the light.
        s.on_frame(t0, Flow::CloudToDevice, 0x83, Some(&f));
        assert_eq!(s.report(t0)["frames"], 3);
        let _ = DeviceId(1);
    }

    #[test]
    fn the_mesh_is_bounded_and_the_rate_is_a_ten_second_average() {
        let mut s = LiveState::default();
        let t0 = UNIX_EPOCH + Duration::from_secs(5_000);
        for i in 0..(MAX_MESH as u16 + 50) {
            s.set(t0, i + 100, light(true, 1, Color::Temp(0)), false);
        }
        assert_eq!(s.mesh.len(), MAX_MESH);
        // 3 frames a second for 20 s.
        for sec in 0..20 {
            for _ in 0..3 {
                s.on_frame(
                    t0 + Duration::from_secs(sec),
                    Flow::CloudToDevice,
                    0x78,
                    None,
                );
            }
        }
        let now = t0 + Duration::from_secs(20);
        assert!((s.rate(now) - 3.0).abs() < 1e-9, "{}", s.rate(now));
        // Quiet for 5 s: half the window; quiet for a minute: nothing.
        assert!((s.rate(now + Duration::from_secs(5)) - 1.5).abs() < 1e-9);
        assert_eq!(s.rate(now + Duration::from_secs(60)), 0.0);
        // A clock step back neither panics nor counts twice.
        s.on_frame(t0, Flow::CloudToDevice, 0x78, None);
        assert!(s.rate(now) <= 3.1);
    }

    #[test]
    fn filters_parse_and_refuse_garbage() {
        let f = Filter::parse("device=0000abcd,12&type=0x83&type=pipe").unwrap();
        assert_eq!(f.devices, vec![0xabcd, 0x12]);
        assert_eq!(f.types, vec![0x83, 0x73]);
        assert!(Filter::parse("device=xyz").is_err());
        assert!(Filter::parse("type=nonsense").is_err());
        assert!(Filter::parse("type=0x1234").is_err());
        assert!(Filter::parse("evil=1").is_err());
        assert_eq!(Filter::parse("").unwrap(), Filter::default());
        // As a browser sends it.
        let f2 = Filter::parse("device=0000abcd%2C12&type=pipe_sync").unwrap();
        assert_eq!(f2.devices, vec![0xabcd, 0x12]);
        assert_eq!(f2.types, vec![0x83]);
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%zz%41+"), "%zzA ");
        assert_eq!(percent_decode("%"), "%");
        let many = format!("device={}", vec!["1"; 300].join(","));
        assert!(Filter::parse(&many).is_err());
        let ev = Event {
            seq: 1,
            device: Some(0xabcd),
            ptype: 0x83,
            sse: Bytes::new(),
        };
        assert!(f.matches(&ev));
        assert!(!Filter::parse("type=0x43").unwrap().matches(&ev));
    }

    #[test]
    fn long_summaries_are_capped_on_a_character_boundary() {
        assert_eq!(capped("abc".into(), 5), "abc");
        assert_eq!(capped("abcdef".into(), 3), "abc…");
        let s = capped("ééé".into(), 3);
        assert_eq!(s, "é…");
        assert!(capped("x".repeat(200_000), MAX_SUMMARY).len() <= MAX_SUMMARY + 3);
    }

    #[test]
    fn the_rate_budget_holds_within_a_second() {
        let c = Console::new(Arc::new(Metrics::new(false)));
        c.max_rate.store(5, Ordering::Relaxed);
        let t = UNIX_EPOCH + Duration::from_secs(77);
        let allowed = (0..20).filter(|_| c.take_budget(t)).count();
        assert_eq!(allowed, 5);
        assert!(c.take_budget(t + Duration::from_secs(1)));
    }
}
