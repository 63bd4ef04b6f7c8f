//! The device-fleet simulator: N devices, each its own TLS client (fingerprint-2-like suites
//! through OpenSSL, or modern, or plain TCP), running the real connect sequence (0x23 with a 0x43,
//! firmware 0x83s, 0xc3, telemetry), sending a heartbeat, answering commands with `f9` + 0x7b and
//! an 0x83 status, keeping their light state, and reconnecting with backoff. Ids and auth codes
//! derive from a seed. It counts requests, answers and their latency.

use super::stats::{Latency, LatencySummary};
use super::{Transcript, device_identity};
use crate::codec::answer::{AnswerKey, answer_key, expected_answer};
use crate::codec::payload::{AnnouncedStatus, PageRecord, StatusPages};
use crate::codec::tlv::{Record, StatusRecord};
use crate::codec::{
    Action, Color, DeviceId, Direction, FirmwareVersion, Frame, Framer, FramerEvent, InnerFrame,
    LightState, Msg, PacketType, Payload, decode_payload,
};
use crate::proxy::Io;
use crate::tls::LegacyClient;
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How simulated devices connect.
#[derive(Clone)]
pub enum ClientTls {
    /// OpenSSL client offering the given profile's suites, no SNI.
    Tls(LegacyClient),
    /// Plain TCP.
    Plain,
}

/// Options of the fleet.
#[derive(Clone, Debug)]
pub struct FleetConfig {
    /// Number of devices.
    pub count: u32,
    /// Where they connect (the proxy, or the cloud directly).
    pub target: SocketAddr,
    /// Seed for ids and auth codes.
    pub seed: u64,
    /// Heartbeat (0xd3) period; real devices use about 21 s.
    pub heartbeat: Duration,
    /// TCP connect plus TLS handshake limit.
    pub connect_timeout: Duration,
    /// First reconnect delay; doubles up to `reconnect_max`.
    pub reconnect_min: Duration,
    /// Largest reconnect delay.
    pub reconnect_max: Duration,
    /// Spread the first connects over this long.
    pub ramp: Duration,
    /// Keep byte transcripts (tests).
    pub record: bool,
    /// Firmware version announced.
    pub firmware: String,
    /// Share of received commands (0–1) a device ignores: no response, no ack, as if the
    /// frame were lost (each reception decided anew, so a retry may get through).
    pub ignore_commands: f64,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            count: 1,
            target: SocketAddr::from(([127, 0, 0, 1], 23779)),
            seed: 1,
            heartbeat: Duration::from_secs(21),
            connect_timeout: Duration::from_secs(10),
            reconnect_min: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(30),
            ramp: Duration::ZERO,
            record: false,
            firmware: "10298".into(),
            ignore_commands: 0.0,
        }
    }
}

/// What the fleet has seen and done.
#[derive(Default)]
pub struct FleetStats {
    /// Successful connects (TCP + TLS).
    pub connects: AtomicU64,
    /// Failed connect attempts.
    pub connect_failures: AtomicU64,
    /// Connections that ended.
    pub disconnects: AtomicU64,
    /// Devices whose handshake was accepted (0x28) and that are connected now.
    pub online: AtomicU64,
    /// Requests sent that expect an answer.
    pub requests: AtomicU64,
    /// Answers matched to a request.
    pub answered: AtomicU64,
    /// Commands received from the cloud.
    pub commands: AtomicU64,
    /// Frames received.
    pub frames_in: AtomicU64,
    /// Request → answer latency.
    pub latency: Latency,
    /// Current light state per device.
    pub states: Mutex<HashMap<DeviceId, LightState>>,
    /// Transcripts per device, one per connection (when recording).
    pub transcripts: Mutex<HashMap<DeviceId, Vec<Transcript>>>,
    /// Commands ignored on purpose (`ignore_commands`).
    pub ignored: AtomicU64,
    /// Commands a device got again after executing them (the same sender and message field),
    /// executed again as a device would.
    pub repeats: AtomicU64,
    /// The same counts by the path each device is on (`legacy`, `new`, `unknown`), once the
    /// paths are known ([`Fleet::set_paths`], e.g. from the proxy's `/routing`).
    pub by_path: [PathStats; 3],
    paths: std::sync::RwLock<HashMap<DeviceId, usize>>,
}

/// Path names of [`FleetStats::by_path`].
pub const PATHS: [&str; 3] = ["legacy", "new", "unknown"];

/// What the devices on one path saw.
#[derive(Default)]
pub struct PathStats {
    /// Requests sent that expect an answer.
    pub requests: AtomicU64,
    /// Answers matched to a request.
    pub answered: AtomicU64,
    /// Commands executed.
    pub commands: AtomicU64,
    /// Commands executed a second time (a repeat reached the device).
    pub repeats: AtomicU64,
    /// Commands ignored on purpose.
    pub ignored: AtomicU64,
    /// Request → answer latency.
    pub latency: Latency,
}

/// [`PathStats`] for reports.
#[derive(Clone, Debug, Serialize)]
pub struct PathReport {
    /// Devices on this path when the paths were last learned.
    pub devices: usize,
    /// Requests sent.
    pub requests: u64,
    /// Requests answered.
    pub answered: u64,
    /// answered ÷ requests.
    pub request_success: Option<f64>,
    /// Commands executed.
    pub commands: u64,
    /// Commands executed twice.
    pub repeats: u64,
    /// Commands ignored on purpose.
    pub ignored: u64,
    /// Request → answer latency.
    pub latency: LatencySummary,
}

impl FleetStats {
    /// The per-path counters of `device`.
    pub fn path_of(&self, device: DeviceId) -> &PathStats {
        let i = self
            .paths
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&device)
            .copied()
            .unwrap_or(2);
        &self.by_path[i.min(2)]
    }
}

/// A summary for reports.
#[derive(Clone, Debug, Serialize)]
pub struct FleetReport {
    /// Devices in the fleet.
    pub devices: u32,
    /// Devices online now.
    pub online: u64,
    /// Connects.
    pub connects: u64,
    /// Connect failures.
    pub connect_failures: u64,
    /// Disconnects.
    pub disconnects: u64,
    /// Requests sent.
    pub requests: u64,
    /// Requests answered.
    pub answered: u64,
    /// Commands received and executed.
    pub commands: u64,
    /// Commands ignored on purpose (`--ignore-commands`).
    pub ignored: u64,
    /// Frames received.
    pub frames_in: u64,
    /// Request → answer latency.
    pub latency: LatencySummary,
    /// Commands executed a second time.
    pub repeats: u64,
    /// By the path of each device, when known.
    pub by_path: std::collections::BTreeMap<&'static str, PathReport>,
}

/// A running fleet.
pub struct Fleet {
    cfg: FleetConfig,
    tls: ClientTls,
    stats: Arc<FleetStats>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    /// Heartbeats are sent (tests pause them to reach a quiet moment).
    heartbeats: std::sync::atomic::AtomicBool,
}

impl Fleet {
    /// Pauses or resumes the devices' heartbeats (the connections stay up).
    pub fn set_heartbeats(&self, on: bool) {
        self.heartbeats.store(on, Ordering::Relaxed);
    }

    /// Starts `cfg.count` devices.
    pub fn start(cfg: FleetConfig, tls: ClientTls) -> Arc<Self> {
        let fleet = Arc::new(Self {
            cfg,
            tls,
            stats: Arc::new(FleetStats::default()),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            heartbeats: std::sync::atomic::AtomicBool::new(true),
        });
        for i in 0..fleet.cfg.count {
            let f = fleet.clone();
            fleet.tracker.spawn(async move { f.device(i).await });
        }
        fleet
    }

    /// Statistics.
    pub fn stats(&self) -> &Arc<FleetStats> {
        &self.stats
    }

    /// The ids of the fleet's devices, in index order.
    pub fn ids(&self) -> Vec<DeviceId> {
        (0..self.cfg.count)
            .map(|i| device_identity(self.cfg.seed, i).0)
            .collect()
    }

    /// A summary.
    pub fn report(&self) -> FleetReport {
        let s = &self.stats;
        FleetReport {
            devices: self.cfg.count,
            online: s.online.load(Ordering::Relaxed),
            connects: s.connects.load(Ordering::Relaxed),
            connect_failures: s.connect_failures.load(Ordering::Relaxed),
            disconnects: s.disconnects.load(Ordering::Relaxed),
            requests: s.requests.load(Ordering::Relaxed),
            answered: s.answered.load(Ordering::Relaxed),
            commands: s.commands.load(Ordering::Relaxed),
            ignored: s.ignored.load(Ordering::Relaxed),
            frames_in: s.frames_in.load(Ordering::Relaxed),
            latency: s.latency.summary(),
            repeats: s.repeats.load(Ordering::Relaxed),
            by_path: {
                let counts = {
                    let m = s.paths.read().unwrap_or_else(|p| p.into_inner());
                    let mut c = [0usize; 3];
                    for i in m.values() {
                        c[(*i).min(2)] += 1;
                    }
                    // This fleet's devices the paths did not list.
                    c[2] += (self.cfg.count as usize).saturating_sub(m.len());
                    c
                };
                PATHS
                    .iter()
                    .enumerate()
                    .filter_map(|(i, name)| {
                        let p = &s.by_path[i];
                        let requests = p.requests.load(Ordering::Relaxed);
                        let answered = p.answered.load(Ordering::Relaxed);
                        (counts[i] > 0 || requests > 0).then(|| {
                            (
                                *name,
                                PathReport {
                                    devices: counts[i],
                                    requests,
                                    answered,
                                    request_success: (requests > 0)
                                        .then(|| answered as f64 / requests as f64),
                                    commands: p.commands.load(Ordering::Relaxed),
                                    repeats: p.repeats.load(Ordering::Relaxed),
                                    ignored: p.ignored.load(Ordering::Relaxed),
                                    latency: p.latency.summary(),
                                },
                            )
                        })
                    })
                    .collect()
            },
        }
    }

    /// Which path each device is on (names as `/routing` gives them: `legacy`, `new`); the
    /// per-path counts follow from now on. Devices not listed count as `unknown`; devices of
    /// other fleets are left out.
    pub fn set_paths<'a>(&self, paths: impl IntoIterator<Item = (DeviceId, &'a str)>) {
        let mine: std::collections::HashSet<DeviceId> = self.ids().into_iter().collect();
        let m: HashMap<DeviceId, usize> = paths
            .into_iter()
            .filter(|(d, _)| mine.contains(d))
            .map(|(d, p)| (d, PATHS.iter().position(|n| *n == p).unwrap_or(2)))
            .collect();
        *self.stats.paths.write().unwrap_or_else(|p| p.into_inner()) = m;
    }

    /// Disconnects every device and waits for them.
    pub async fn stop(&self) {
        self.shutdown.cancel();
        self.tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.tracker.wait()).await;
    }

    async fn connect(&self) -> std::io::Result<Box<dyn Io>> {
        let tcp = TcpStream::connect(self.cfg.target).await?;
        let _ = tcp.set_nodelay(true);
        Ok(match &self.tls {
            ClientTls::Plain => Box::new(tcp),
            ClientTls::Tls(c) => Box::new(c.connect(tcp).await.map_err(std::io::Error::other)?),
        })
    }

    async fn device(self: Arc<Self>, index: u32) {
        let (id, auth, mesh) = device_identity(self.cfg.seed, index);
        if !self.cfg.ramp.is_zero() && self.cfg.count > 1 {
            let at = self
                .cfg
                .ramp
                .mul_f64(f64::from(index) / f64::from(self.cfg.count));
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(at) => {}
            }
        }
        let mut dev = SimDevice {
            fleet: &self,
            id,
            auth,
            mesh,
            state: LightState {
                on: true,
                brightness: 100,
                color: Color::Temp(50),
            },
            counter83: 0,
            counter73: 0,
            announce: 0,
            pending: HashMap::new(),
            transcript: None,
            rng: (u64::from(id.0) << 1) | 1,
            executed: VecDeque::new(),
        };
        let mut backoff = self.cfg.reconnect_min;
        loop {
            if self.shutdown.is_cancelled() {
                return;
            }
            let io = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                r = tokio::time::timeout(self.cfg.connect_timeout, self.connect()) => r,
            };
            let started = Instant::now();
            match io {
                Ok(Ok(io)) => {
                    self.stats.connects.fetch_add(1, Ordering::Relaxed);
                    dev.run(io).await;
                    self.stats.disconnects.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                }
            }
            if started.elapsed() > Duration::from_secs(10) {
                backoff = self.cfg.reconnect_min;
            }
            // Jitter of up to a quarter, derived from the id so runs are repeatable.
            let jitter = backoff.mul_f64((f64::from(id.0 % 1000) / 1000.0) * 0.25);
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff + jitter) => {}
            }
            backoff = (backoff * 2).min(self.cfg.reconnect_max);
        }
    }
}

struct SimDevice<'a> {
    fleet: &'a Fleet,
    id: DeviceId,
    auth: String,
    mesh: u16,
    state: LightState,
    counter83: u16,
    counter73: u16,
    announce: u8,
    pending: HashMap<AnswerKey, VecDeque<Instant>>,
    transcript: Option<Transcript>,
    rng: u64,
    /// The latest commands executed on this connection (sender, message field).
    executed: VecDeque<(u32, Msg)>,
}

impl SimDevice<'_> {
    fn stats(&self) -> &FleetStats {
        &self.fleet.stats
    }

    /// Appends `f` to `out`, remembering when an answer is due.
    fn send(&mut self, f: &Frame, out: &mut Vec<u8>) {
        let Ok(b) = f.encode() else { return };
        out.extend_from_slice(&b);
        if let Some(key) = expected_answer(f) {
            self.stats().requests.fetch_add(1, Ordering::Relaxed);
            self.stats()
                .path_of(self.id)
                .requests
                .fetch_add(1, Ordering::Relaxed);
            self.pending
                .entry(key)
                .or_default()
                .push_back(Instant::now());
        }
    }

    fn next83(&mut self) -> Msg {
        self.counter83 = self.counter83.wrapping_add(1);
        Msg::counter(self.counter83)
    }

    fn next73(&mut self) -> Msg {
        let m = Msg::counter(self.counter73);
        self.counter73 = self.counter73.wrapping_add(1);
        m
    }

    fn own_record(&self) -> Record {
        Record::status(
            5,
            &StatusRecord {
                mesh_id: self.mesh as u8,
                state: self.state,
                online: Some(true),
                relayed: Some(0),
                bridge: Some(self.mesh as u8),
            },
        )
    }

    fn status_frame(&mut self, seq: u32) -> Frame {
        self.announce = self.announce.wrapping_add(1);
        let st = AnnouncedStatus {
            counter: self.announce,
            kind: 0x22,
            mesh_id: self.mesh,
            connected: 1,
            state: self.state,
        };
        let msg = self.next83();
        Frame::pipe_sync(self.id.0, msg, st.to_inner(seq))
    }

    fn apply(&mut self, a: &Action) {
        match a {
            Action::Power { on } => self.state.on = *on,
            Action::Brightness { brightness } => self.state.brightness = (*brightness).min(100),
            Action::ColorTemp { temp } => self.state.color = Color::Temp((*temp).min(100)),
            Action::Rgb { rgb } => self.state.color = Color::Rgb(*rgb),
            Action::Combo {
                on,
                brightness,
                mode,
                rgb,
            } => {
                self.state.on = *on;
                let (bri, color) = crate::codec::payload::combo_effect(*brightness, *mode, *rgb);
                if let Some(b) = bri {
                    self.state.brightness = b.min(100);
                }
                match color {
                    Some(Color::Temp(t)) => self.state.color = Color::Temp(t.min(100)),
                    Some(c) => self.state.color = c,
                    None => {}
                }
            }
            Action::Effect { .. } | Action::MeshRelay { .. } => {}
        }
        self.stats()
            .states
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(self.id, self.state);
    }

    /// Handles one received frame; appends replies to `out`.
    fn on_frame(&mut self, f: &Frame, out: &mut Vec<u8>, online: &mut bool) {
        if let Some(key) = answer_key(f)
            && let Some(q) = self.pending.get_mut(&key)
            && let Some(sent) = q.pop_front()
        {
            self.stats().answered.fetch_add(1, Ordering::Relaxed);
            self.stats().latency.record(sent.elapsed());
            let p = self.stats().path_of(self.id);
            p.answered.fetch_add(1, Ordering::Relaxed);
            p.latency.record(sent.elapsed());
        }
        match f.ptype {
            PacketType::HANDSHAKE_ACK if !*online => {
                *online = true;
                self.stats().online.fetch_add(1, Ordering::Relaxed);
                // Firmware "0" and the time request, then the firmware version, telemetry.
                let net = FirmwareVersion {
                    kind: 0,
                    version: "0".into(),
                };
                let m = self.next83();
                self.send(&Frame::pipe_sync(self.id.0, m, net.to_inner()), out);
                self.send(&Frame::time_request(), out);
                let fw = FirmwareVersion {
                    kind: 1,
                    version: self.fleet.cfg.firmware.clone(),
                };
                let m = self.next83();
                self.send(&Frame::pipe_sync(self.id.0, m, fw.to_inner()), out);
                let tel = Record::text(0xc7, "20251106:0220:-37,00006,00001,00001,00001,");
                self.send(&Frame::sync(self.id.0, vec![tel]), out);
                let st = self.status_frame(0);
                self.send(&st, out);
            }
            PacketType::PIPE => self.on_pipe(f, out),
            PacketType::PROBE => {
                if let (Some(id), Some(m)) = (f.id(), f.msg()) {
                    self.send(&Frame::probe_reply(id, m), out);
                }
            }
            _ => {}
        }
    }

    fn on_pipe(&mut self, f: &Frame, out: &mut Vec<u8>) {
        let (Some(app), Some(msg)) = (f.id(), f.msg()) else {
            return;
        };
        let Some(inner) = f.inner() else {
            self.send(&Frame::pipe_ack(app, msg), out);
            return;
        };
        if inner.dir != Direction::Request {
            return;
        }
        match decode_payload(inner) {
            Payload::Command(_) if self.ignores() => {
                self.stats().ignored.fetch_add(1, Ordering::Relaxed);
                self.stats()
                    .path_of(self.id)
                    .ignored
                    .fetch_add(1, Ordering::Relaxed);
            }
            Payload::Command(c) => {
                self.stats().commands.fetch_add(1, Ordering::Relaxed);
                let p = self.stats().path_of(self.id);
                p.commands.fetch_add(1, Ordering::Relaxed);
                if self.executed.contains(&(app, msg)) {
                    self.stats().repeats.fetch_add(1, Ordering::Relaxed);
                    p.repeats.fetch_add(1, Ordering::Relaxed);
                } else {
                    if self.executed.len() >= 64 {
                        self.executed.pop_front();
                    }
                    self.executed.push_back((app, msg));
                }
                self.apply(&c.action);
                let resp = InnerFrame::new(inner.seq, Direction::Response, inner.opcode, vec![0]);
                let m = self.next73();
                self.send(&Frame::pipe(app, m, resp), out);
                self.send(&Frame::pipe_ack(app, msg), out);
                let st = self.status_frame(inner.seq);
                self.send(&st, out);
            }
            Payload::StatusQuery => {
                let pages = StatusPages {
                    count: 1,
                    records: vec![PageRecord {
                        mesh_id: self.mesh,
                        device_type: 0x89,
                        online: true,
                        state: self.state,
                    }],
                };
                let resp = InnerFrame::new(
                    inner.seq,
                    Direction::Response,
                    inner.opcode,
                    pages.to_data(),
                );
                let m = self.next73();
                self.send(&Frame::pipe(app, m, resp), out);
                self.send(&Frame::pipe_ack(app, msg), out);
            }
            _ => self.send(&Frame::pipe_ack(app, msg), out),
        }
    }

    /// Whether this reception of a command is ignored (`ignore_commands`).
    fn ignores(&mut self) -> bool {
        let p = self.fleet.cfg.ignore_commands;
        if p <= 0.0 {
            return false;
        }
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        ((self.rng % 1_000_000) as f64) < p * 1_000_000.0
    }

    fn record(&mut self, sent: &[u8], received: &[u8]) {
        if let Some(t) = &mut self.transcript {
            t.sent.extend_from_slice(sent);
            t.received.extend_from_slice(received);
        }
    }

    async fn run(&mut self, io: Box<dyn Io>) {
        self.pending.clear();
        // Repeats are counted per connection (a new connection's sender counts anew).
        self.executed.clear();
        if self.fleet.cfg.record {
            self.transcript = Some(Transcript {
                device: Some(self.id),
                ..Transcript::default()
            });
        }
        let (mut r, mut w) = tokio::io::split(io);
        let mut online = false;
        let mut framer = Framer::default();
        let mut out = Vec::new();
        // First flight: handshake and own status together, as real devices do.
        self.send(
            &Frame::handshake(self.id, self.auth.as_bytes(), 60),
            &mut out,
        );
        let rec = self.own_record();
        self.send(&Frame::sync(self.id.0, vec![rec]), &mut out);
        let mut ok = w.write_all(&out).await.is_ok() && w.flush().await.is_ok();
        self.record(&out, &[]);
        let mut heartbeat = tokio::time::interval(self.fleet.cfg.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        heartbeat.tick().await;
        let mut buf = vec![0u8; 8192];
        while ok {
            out.clear();
            tokio::select! {
                _ = self.fleet.shutdown.cancelled() => break,
                n = r.read(&mut buf) => {
                    let n = match n { Ok(0) | Err(_) => break, Ok(n) => n };
                    self.record(&[], &buf[..n]);
                    framer.push(&buf[..n]);
                    while let Some(ev) = framer.next_event() {
                        if let FramerEvent::Frame(raw) = ev {
                            self.stats().frames_in.fetch_add(1, Ordering::Relaxed);
                            if let Ok(f) = raw.decode() {
                                self.on_frame(&f, &mut out, &mut online);
                            }
                        }
                    }
                }
                _ = heartbeat.tick(), if online => {
                    if self.fleet.heartbeats.load(Ordering::Relaxed) {
                        self.send(&Frame::ping(), &mut out);
                    }
                }
            }
            if !out.is_empty() {
                ok = w.write_all(&out).await.is_ok() && w.flush().await.is_ok();
                let sent = std::mem::take(&mut out);
                self.record(&sent, &[]);
            }
        }
        let _ = w.shutdown().await;
        if online {
            self.stats().online.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(t) = self.transcript.take() {
            self.stats()
                .transcripts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(self.id)
                .or_default()
                .push(t);
        }
    }
}
