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
use arc_swap::ArcSwap;
use bytes::Bytes;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};
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

/// The process's clock origin: frame times are `Instant`s (monotonic, one clock read per frame)
/// and the rate ring is indexed by whole seconds since this.
static ORIGIN: LazyLock<Instant> = LazyLock::new(Instant::now);

fn mono_secs(t: Instant) -> u64 {
    t.saturating_duration_since(*ORIGIN).as_secs()
}

/// The wall-clock time of `t`, given a pair of readings taken together.
fn wall(t: Instant, now: (Instant, SystemTime)) -> SystemTime {
    let (mono, wall) = now;
    match mono.checked_duration_since(t) {
        Some(ago) => wall.checked_sub(ago).unwrap_or(wall),
        None => wall + t.saturating_duration_since(mono),
    }
}

/// `s` without control characters and bidirectional overrides (a device's strings are shown
/// as text; these would still scramble what is around them).
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    let bad = |c: char| {
        c.is_control()
            || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if s.chars().any(bad) {
        s.chars().filter(|c| !bad(*c)).collect::<String>().into()
    } else {
        s.into()
    }
}

/// The last state of one light.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    /// The light.
    pub state: LightState,
    /// When it was reported.
    pub at: Instant,
}

/// How sure a status record is that it speaks of the connection's own light.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Own {
    /// Its own announcement (`fa db`), or a record relayed by nobody from the bridge itself.
    Sure,
    /// A lone record that does not say (taken as its own until something sure says otherwise).
    Guess,
    /// Relayed from the mesh.
    No,
}

/// What one connection's frames said, for the devices table.
#[derive(Debug, Default)]
pub struct LiveState {
    /// The device's own mesh id, once a frame told it, and whether that frame was sure.
    own_mesh: Option<(u16, bool)>,
    /// The device's own light.
    own: Option<Seen>,
    /// The other lights its frames reported (a bridge relays the mesh), by mesh id.
    mesh: BTreeMap<u16, Seen>,
    /// Device firmware from its `fa 00` announcement.
    firmware: Option<String>,
    /// Frames both ways.
    frames: u64,
    /// The second (since [`ORIGIN`]) of the first frame.
    first_sec: Option<u64>,
    /// Frames per second of the last [`RATE_WINDOW`] seconds, a ring indexed by the second.
    window: [u32; RATE_WINDOW],
    /// The second of the newest slot written.
    window_sec: u64,
    /// The last frame: when, which way, its type.
    last: Option<(Instant, Flow, u8)>,
}

/// One connection's [`LiveState`] behind its own lock (only its session's two taps and the
/// console's readers take it).
#[derive(Debug, Default)]
pub struct DeviceLive(Mutex<LiveState>);

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
    pub fn on_frame(&mut self, at: Instant, flow: Flow, ptype: u8, decoded: Option<&Frame>) {
        self.frames += 1;
        let sec = mono_secs(at);
        self.first_sec.get_or_insert(sec);
        self.advance(sec);
        // A time before the newest slot (threads racing on one connection) counts in it.
        let slot = &mut self.window[(sec.max(self.window_sec) % RATE_WINDOW as u64) as usize];
        *slot = slot.saturating_add(1);
        self.last = Some((at, flow, ptype));
        if flow == Flow::DeviceToCloud
            && let Some(f) = decoded
        {
            self.learn(at, f);
        }
    }

    fn set(&mut self, at: Instant, mesh: u16, state: LightState, own: Own) {
        let before = self.own_mesh;
        self.own_mesh = match (before, own) {
            // Something sure wins over a guess; the first sure answer stays.
            (None | Some((_, false)), Own::Sure) => Some((mesh, true)),
            (None, Own::Guess) => Some((mesh, false)),
            (m, _) => m,
        };
        // A wrong guess: the light it took for its own is a mesh member.
        if let (Some((was, _)), Some((now, _))) = (before, self.own_mesh)
            && was != now
            && let Some(prev) = self.own.take()
            && self.mesh.len() < MAX_MESH
        {
            self.mesh.insert(was, prev);
        }
        let seen = Seen { state, at };
        if self.own_mesh.is_some_and(|(m, _)| m == mesh) {
            self.own = Some(seen);
            self.mesh.remove(&mesh);
        } else if self.mesh.len() < MAX_MESH || self.mesh.contains_key(&mesh) {
            self.mesh.insert(mesh, seen);
        }
    }

    fn learn(&mut self, at: Instant, f: &Frame) {
        match &f.body {
            Body::Sync(s) => {
                for r in &s.records {
                    if let RecordValue::Status(st) = r.decode() {
                        // 0x00: the device's own record; 0x14: relayed from the mesh.
                        let own =
                            if st.relayed == Some(0) && st.bridge.is_none_or(|b| b == st.mesh_id) {
                                Own::Sure
                            } else if st.relayed.is_none() && s.records.len() == 1 {
                                Own::Guess
                            } else {
                                Own::No
                            };
                        self.set(at, u16::from(st.mesh_id), st.state, own);
                    }
                }
            }
            Body::Pipe(_) => {
                let Some(inner) = f.inner() else { return };
                match decode_payload(inner) {
                    Payload::Status(a) => self.set(at, a.mesh_id, a.state, Own::Sure),
                    Payload::Pages(p) => {
                        for r in &p.records {
                            self.set(at, r.mesh_id, r.state, Own::No);
                        }
                    }
                    Payload::Firmware(fw) if fw.kind == 1 => {
                        self.firmware =
                            Some(capped(printable(&fw.version).into_owned(), MAX_FIRMWARE));
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }

    /// Frames per second over the whole seconds before `now`: the last [`RATE_WINDOW`], or
    /// those since the first frame when the connection is younger.
    pub fn rate(&self, now: Instant) -> f64 {
        let sec = mono_secs(now);
        let Some(first) = self.first_sec else {
            return 0.0;
        };
        let span = sec.saturating_sub(first).min(RATE_WINDOW as u64);
        if span == 0 {
            return 0.0;
        }
        let mut sum = 0u64;
        for back in 1..=span {
            let s = sec.saturating_sub(back);
            if s + RATE_WINDOW as u64 > self.window_sec && s <= self.window_sec {
                sum += u64::from(self.window[(s % RATE_WINDOW as u64) as usize]);
            }
        }
        sum as f64 / span as f64
    }

    /// The devices-table fields: state, mesh (the members with `with_mesh`, else their count),
    /// firmware, frames, rate, last frame.
    pub fn report(&self, now: (Instant, SystemTime), with_mesh: bool) -> Value {
        let mut v = json!({
            "mesh_id": self.own_mesh.map(|(m, _)| m),
            "state": self.own.map(|s| state_json(&s.state)),
            "state_at": self.own.map(|s| rfc3339(wall(s.at, now))),
            "mesh_count": self.mesh.len(),
            "firmware": self.firmware,
            "frames": self.frames,
            "frames_per_second": self.rate(now.0),
            "last_frame": self.last.map(|(at, flow, t)| json!({
                "at": rfc3339(wall(at, now)),
                "direction": flow.label(),
                "type": format!("0x{t:02x}"),
                "name": crate::codec::PacketType(t).name(),
            })),
        });
        if with_mesh && let Value::Object(m) = &mut v {
            let mesh: Vec<Value> = self
                .mesh
                .iter()
                .map(|(id, s)| json!({"mesh_id": id, "state": state_json(&s.state), "at": rfc3339(wall(s.at, now))}))
                .collect();
            m.insert("mesh".into(), Value::Array(mesh));
        }
        v
    }
}

impl DeviceLive {
    /// Counts a frame of this connection and learns what it says.
    pub fn on_frame(&self, at: Instant, flow: Flow, ptype: u8, decoded: Option<&Frame>) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .on_frame(at, flow, ptype, decoded);
    }

    /// [`LiveState::report`].
    pub fn report(&self, now: (Instant, SystemTime), with_mesh: bool) -> Value {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .report(now, with_mesh)
    }
}

fn rfc3339(t: SystemTime) -> String {
    // humantime panics on a time before 1970 (a clock without RTC, stepped back).
    humantime::format_rfc3339_millis(t.max(std::time::UNIX_EPOCH)).to_string()
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
    /// Each open stream's filter, by stream number; and what they want together, read per
    /// frame while a stream is open (an event nobody wants is neither counted nor built).
    filters: Mutex<Vec<(u64, Filter)>>,
    wanted: ArcSwap<Vec<Filter>>,
    next_stream: AtomicU64,
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
            filters: Mutex::new(Vec::new()),
            wanted: ArcSwap::from_pointee(Vec::new()),
            next_stream: AtomicU64::new(0),
        })
    }

    /// Open streams.
    pub fn streams(&self) -> usize {
        self.streams.load(Ordering::Relaxed)
    }

    /// Registers an open stream's filter; the number to [`Self::forget`] it by.
    fn want(&self, f: Filter) -> u64 {
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let mut all = self.filters.lock().unwrap_or_else(|p| p.into_inner());
        all.push((id, f));
        self.wanted
            .store(Arc::new(all.iter().map(|(_, f)| f.clone()).collect()));
        id
    }

    /// A stream closed: its filter no longer counts.
    fn forget(&self, id: u64) {
        let mut all = self.filters.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|(i, _)| *i != id);
        self.wanted
            .store(Arc::new(all.iter().map(|(_, f)| f.clone()).collect()));
    }

    /// Whether this second's budget has room for one more event.
    fn take_budget(&self, now: Instant) -> bool {
        let sec = mono_secs(now) & 0xffff_ffff;
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

    fn publish(
        &self,
        now: Instant,
        meta: &ConnMeta,
        flow: Flow,
        raw: &RawFrame,
        decoded: Option<&Frame>,
    ) {
        let device = match meta.peer {
            crate::route::PeerKind::Device(d) => Some(d.0),
            _ => None,
        };
        let ptype = raw.ptype().0;
        if !self.wanted.load().iter().any(|f| f.passes(device, ptype)) {
            return;
        }
        if !self.take_budget(now) {
            self.metrics
                .console_dropped
                .with_label_values(&["rate"])
                .inc();
            return;
        }
        let summary = crate::codec::view::summarize_decoded(raw.bytes(), decoded);
        let data = json!({
            "at": rfc3339(SystemTime::now()),
            "device": device.map(|d| format!("{d:08x}")),
            "peer": meta.peer.label(),
            "connection": meta.id.to_string(),
            "direction": flow.label(),
            "type": format!("0x{ptype:02x}"),
            "name": raw.ptype().name(),
            "len": raw.bytes().len(),
            "summary": capped(printable(&summary.to_string()).into_owned(), MAX_SUMMARY),
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
        let now = Instant::now();
        meta.live.on_frame(now, flow, raw.ptype().0, decoded);
        if self.streams.load(Ordering::Relaxed) > 0 {
            self.publish(now, meta, flow, raw, decoded);
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
        // Sorted: each frame is checked against every open stream's filter by binary search.
        f.devices.sort_unstable();
        f.devices.dedup();
        f.types.sort_unstable();
        f.types.dedup();
        Ok(f)
    }

    /// Whether `e` passes.
    pub fn matches(&self, e: &Event) -> bool {
        self.passes(e.device, e.ptype)
    }

    /// Whether a frame of `device` and type `ptype` passes.
    pub fn passes(&self, device: Option<u32>, ptype: u8) -> bool {
        (self.devices.is_empty() || device.is_some_and(|d| self.devices.binary_search(&d).is_ok()))
            && (self.types.is_empty() || self.types.binary_search(&ptype).is_ok())
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
        let t0 = *ORIGIN + Duration::from_secs(1_000);
        let at = |t| (t, SystemTime::now());
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
        let r = s.report(at(t0), true);
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
        let r = s.report(at(t0), true);
        assert_eq!(r["state"]["on"], false);
        assert_eq!(r["state"]["brightness"], 80);
        assert_eq!(r["state"]["color"]["rgb"], "#010203");
        // What the cloud sends says nothing about the light.
        s.on_frame(t0, Flow::CloudToDevice, 0x83, Some(&f));
        assert_eq!(s.report(at(t0), false)["frames"], 3);
        assert_eq!(s.report(at(t0), false)["mesh_count"], 1);
        assert!(s.report(at(t0), false).get("mesh").is_none());
        let _ = DeviceId(1);
    }

    #[test]
    fn the_mesh_is_bounded_and_the_rate_is_a_ten_second_average() {
        let mut s = LiveState::default();
        let t0 = *ORIGIN + Duration::from_secs(5_000);
        for i in 0..(MAX_MESH as u16 + 50) {
            s.set(t0, i + 100, light(true, 1, Color::Temp(0)), Own::No);
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
        // A frame stamped before the newest slot (two taps racing) counts in the newest.
        s.on_frame(t0, Flow::CloudToDevice, 0x78, None);
        assert!(s.rate(now) <= 3.1);
        // A young connection's rate is over the seconds it has lived, not ten.
        let mut y = LiveState::default();
        assert_eq!(y.rate(t0), 0.0);
        for sec in 0..2 {
            for _ in 0..4 {
                y.on_frame(
                    t0 + Duration::from_secs(sec),
                    Flow::DeviceToCloud,
                    0xd3,
                    None,
                );
            }
        }
        let r = y.rate(t0 + Duration::from_secs(2));
        assert!((r - 4.0).abs() < 1e-9, "{r}");
    }

    #[test]
    fn the_own_mesh_id_once_sure_is_not_taken_by_a_lone_record() {
        let t = *ORIGIN;
        let mut s = LiveState::default();
        let on = light(true, 50, Color::Temp(10));
        // A guess, corrected by a sure answer, which then stays.
        s.set(t, 3, on, Own::Guess);
        assert_eq!(s.own_mesh, Some((3, false)));
        s.set(t, 8, on, Own::Sure);
        assert_eq!(s.own_mesh, Some((8, true)));
        s.set(t, 4, on, Own::Guess);
        s.set(t, 5, on, Own::Sure);
        assert_eq!(s.own_mesh, Some((8, true)));
        assert_eq!(s.mesh.keys().copied().collect::<Vec<_>>(), vec![3, 4, 5]);
    }

    #[test]
    fn device_strings_lose_control_and_bidi_characters() {
        assert_eq!(printable("1.2.3"), "1.2.3");
        assert_eq!(printable("a\u{202e}b\x1b[31mc\nd\u{2066}"), "ab[31mcd");
    }

    #[test]
    fn an_event_no_open_stream_wants_is_neither_built_nor_counted() {
        let m = Arc::new(Metrics::new(false));
        let c = Console::new(m.clone());
        c.max_rate.store(1, Ordering::Relaxed);
        let id = c.want(Filter::parse("type=0x83").unwrap());
        c.streams.store(1, Ordering::Relaxed);
        let mut rx = c.tx.subscribe();
        let meta = Arc::new(ConnMeta {
            id: uuid::Uuid::now_v7(),
            device_addr: "127.0.0.1:1".parse().unwrap(),
            proxy_device_addr: "127.0.0.1:2".parse().unwrap(),
            peer: crate::route::PeerKind::Device(DeviceId(9)),
            started: SystemTime::now(),
            upstream: std::sync::OnceLock::new(),
            live: Default::default(),
        });
        let raw = |b: Vec<u8>| {
            let mut f = crate::codec::Framer::new(65536);
            f.push(&b);
            match f.next_event() {
                Some(crate::codec::FramerEvent::Frame(r)) => r,
                other => panic!("{other:?}"),
            }
        };
        let ping = raw(vec![0xd3, 0, 0, 0, 0]);
        // Pings nobody wants: not sampled, not sent; the budget stays for what is wanted.
        for _ in 0..50 {
            c.on_frame(&meta, Flow::DeviceToCloud, &ping, None);
        }
        assert_eq!(m.console_dropped.with_label_values(&["rate"]).get(), 0);
        assert!(rx.try_recv().is_err());
        let sync = raw(Frame::pipe_sync(
            1,
            crate::codec::Msg::counter(1),
            AnnouncedStatus {
                counter: 1,
                kind: 0x22,
                mesh_id: 7,
                connected: 1,
                state: light(true, 1, Color::Temp(0)),
            }
            .to_inner(0),
        )
        .encode()
        .unwrap());
        c.on_frame(&meta, Flow::DeviceToCloud, &sync, None);
        assert_eq!(rx.try_recv().map(|e| e.ptype).ok(), Some(0x83));
        c.forget(id);
        c.on_frame(&meta, Flow::DeviceToCloud, &sync, None);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn filters_parse_and_refuse_garbage() {
        let f = Filter::parse("device=0000abcd,12&type=0x83&type=pipe").unwrap();
        assert_eq!(f.devices, vec![0x12, 0xabcd]);
        assert_eq!(f.types, vec![0x73, 0x83]);
        assert!(Filter::parse("device=xyz").is_err());
        assert!(Filter::parse("type=nonsense").is_err());
        assert!(Filter::parse("type=0x1234").is_err());
        assert!(Filter::parse("evil=1").is_err());
        assert_eq!(Filter::parse("").unwrap(), Filter::default());
        // As a browser sends it.
        let f2 = Filter::parse("device=0000abcd%2C12&type=pipe_sync").unwrap();
        assert_eq!(f2.devices, vec![0x12, 0xabcd]);
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
        let t = *ORIGIN + Duration::from_secs(77);
        let allowed = (0..20).filter(|_| c.take_budget(t)).count();
        assert_eq!(allowed, 5);
        assert!(c.take_budget(t + Duration::from_secs(1)));
    }
}
