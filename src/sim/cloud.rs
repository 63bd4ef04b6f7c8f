//! The cloud simulator: a TLS server (OpenSSL with the legacy suites, rustls, or plain TCP) that
//! answers like the real cloud (0x28, 0x48, 0x88 echoing msg, 0xc8 with the current time, 0xd8,
//! 0x18), acks devices' pipe frames with 0x7b as an app would, sends commands (0x73 f8 d0 / f0) to
//! connected devices at a configurable rate, and records what it got.

use super::Transcript;
use super::stats::Latency;
use crate::codec::{
    Action, Body, Command, DeviceId, Frame, Framer, FramerEvent, Msg, PacketType, RecordValue,
    TimeAnswer,
};
use crate::proxy::Io;
use crate::tls::{DeviceAcceptor, ModernServer};
use serde::Serialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The app/user id the simulated cloud uses when it relays commands to devices.
pub const SIM_APP_ID: u32 = 0x2de4_b5d2;

/// How the simulator speaks TLS.
#[derive(Clone)]
pub enum ServerTls {
    /// OpenSSL with the device-facing suite list (as the real cloud: static-RSA CBC).
    Legacy(DeviceAcceptor),
    /// rustls (TLS 1.2/1.3 AEAD suites).
    Modern(ModernServer),
    /// Plain TCP (a local controller).
    Plain,
}

/// Options of the cloud simulator.
#[derive(Clone, Debug)]
pub struct CloudSimConfig {
    /// Send a command to each connected device this often (none = never).
    pub command_interval: Option<Duration>,
    /// Keep a byte transcript of every connection (tests; off for load runs).
    pub record: bool,
    /// UTC offset of the wall-clock time in 0xc8 answers, in minutes (the cloud uses US Central).
    pub utc_offset_minutes: i16,
    /// When set, only these devices with these auth codes are accepted: any other 0x23 is
    /// answered by closing the connection without a 0x28, as the real cloud does.
    pub auth_codes: Option<Arc<HashMap<DeviceId, Vec<u8>>>>,
    /// Share of commands (0–1) sent twice in a row, as a backend that lost track of an ack
    /// would.
    pub duplicate_commands: f64,
    /// Share of acked commands (0–1) sent again, the same bytes, once their ack arrived (a
    /// backend that missed the ack): the device must not execute them twice.
    pub repeat_after_ack: f64,
    /// Close every connection at each multiple of this since the simulator started, as a
    /// restart would (it keeps accepting).
    pub restart_every: Option<Duration>,
    /// Share of answers to device requests (0–1) left unsent.
    pub drop_answers: f64,
    /// Start leaving answers unsent only this long after the simulator started (a backend
    /// that goes bad while in use).
    pub drop_answers_after: Option<Duration>,
    /// Wait this long before sending each batch of answers.
    pub answer_delay: Duration,
    /// Share of answers (0–1) altered in content (keyless answers only: a sync ack's last
    /// byte, the time answer's clock), for parity checks.
    pub drift: f64,
    /// Stop reading a connection this long after it was accepted (it stays open: a stalled
    /// backend).
    pub stop_reading_after: Option<Duration>,
}

impl Default for CloudSimConfig {
    fn default() -> Self {
        Self {
            command_interval: None,
            record: false,
            utc_offset_minutes: -360,
            auth_codes: None,
            duplicate_commands: 0.0,
            repeat_after_ack: 0.0,
            restart_every: None,
            drop_answers: 0.0,
            drop_answers_after: None,
            answer_delay: Duration::ZERO,
            drift: 0.0,
            stop_reading_after: None,
        }
    }
}

/// What the simulator has seen and done.
#[derive(Default)]
pub struct CloudStats {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// TLS handshakes that failed.
    pub tls_failures: AtomicU64,
    /// Device handshakes (0x23) seen.
    pub handshakes: AtomicU64,
    /// Handshakes refused (unknown device or wrong auth code, with `auth_codes` set).
    pub rejected: AtomicU64,
    /// App logins (0x13) seen.
    pub logins: AtomicU64,
    /// Frames received.
    pub frames_in: AtomicU64,
    /// Frames whose body did not decode.
    pub bad_frames: AtomicU64,
    /// Commands sent to devices.
    pub commands_sent: AtomicU64,
    /// 0x7b acks received for those commands.
    pub command_acks: AtomicU64,
    /// Acked commands sent again on purpose (`repeat_after_ack`).
    pub repeats_sent: AtomicU64,
    /// Acks that came back for those repeats (the device, or a proxy that remembered its ack).
    pub repeat_acks: AtomicU64,
    /// Commands sent a second time on purpose (`duplicate_commands`).
    pub duplicates_sent: AtomicU64,
    /// Answers left unsent on purpose (`drop_answers`).
    pub answers_dropped: AtomicU64,
    /// Answers altered on purpose (`drift`).
    pub answers_altered: AtomicU64,
    /// Connections that stopped reading (`stop_reading_after`).
    pub stalled: AtomicU64,
    /// Command → 0x7b ack latency.
    pub command_latency: Latency,
    /// Devices connected now.
    pub connected: Mutex<HashMap<DeviceId, u64>>,
    /// Transcripts by connection number (when recording).
    pub transcripts: Mutex<HashMap<u64, Transcript>>,
}

/// A summary for reports.
#[derive(Clone, Debug, Serialize)]
pub struct CloudReport {
    /// Connections accepted.
    pub connections: u64,
    /// Devices connected now.
    pub devices_connected: usize,
    /// Frames received.
    pub frames_in: u64,
    /// Frames that did not decode.
    pub bad_frames: u64,
    /// Commands sent.
    pub commands_sent: u64,
    /// Commands acked.
    pub command_acks: u64,
    /// Commands sent twice on purpose (`--duplicate-commands`).
    pub duplicates_sent: u64,
    /// Acked commands sent again (`--repeat-after-ack`), and the acks that came back for them.
    pub repeats_sent: u64,
    /// Acks of those repeats.
    pub repeat_acks: u64,
    /// Command → ack latency.
    pub command_latency: super::stats::LatencySummary,
}

impl CloudStats {
    /// A summary.
    pub fn report(&self) -> CloudReport {
        CloudReport {
            connections: self.connections.load(Ordering::Relaxed),
            devices_connected: self
                .connected
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .len(),
            frames_in: self.frames_in.load(Ordering::Relaxed),
            bad_frames: self.bad_frames.load(Ordering::Relaxed),
            commands_sent: self.commands_sent.load(Ordering::Relaxed),
            command_acks: self.command_acks.load(Ordering::Relaxed),
            duplicates_sent: self.duplicates_sent.load(Ordering::Relaxed),
            repeats_sent: self.repeats_sent.load(Ordering::Relaxed),
            repeat_acks: self.repeat_acks.load(Ordering::Relaxed),
            command_latency: self.command_latency.summary(),
        }
    }

    /// Transcripts of `device`'s connections.
    pub fn transcripts_of(&self, device: DeviceId) -> Vec<Transcript> {
        let t = self.transcripts.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<(u64, Transcript)> = t
            .iter()
            .filter(|(_, t)| t.device == Some(device))
            .map(|(k, t)| (*k, t.clone()))
            .collect();
        v.sort_by_key(|(k, _)| *k);
        v.into_iter().map(|(_, t)| t).collect()
    }
}

/// The cloud simulator.
pub struct CloudSim {
    cfg: CloudSimConfig,
    tls: ServerTls,
    stats: Arc<CloudStats>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    next_conn: AtomicU64,
    /// Answers to device requests so far, all connections (picks which are dropped).
    answers: AtomicU64,
    /// Answers with content to alter so far, all connections (picks which are altered).
    alterable: AtomicU64,
    commands_on: std::sync::atomic::AtomicBool,
    /// `drop_answers` in force (f64 bits; [`CloudSim::set_drop_answers`] changes it).
    drop_answers: AtomicU64,
    /// When it was made (`restart_every` counts from here).
    started: Instant,
}

impl CloudSim {
    /// Pauses or resumes sending commands (tests pause to reach a quiet moment).
    pub fn set_commands(&self, on: bool) {
        self.commands_on.store(on, Ordering::Relaxed);
    }

    /// Changes the share of answers left unsent, at once (a fault injected while running).
    pub fn set_drop_answers(&self, share: f64) {
        self.drop_answers
            .store(share.clamp(0.0, 1.0).to_bits(), Ordering::Relaxed);
    }

    /// The share of answers left unsent now.
    fn drop_share(&self) -> f64 {
        if self
            .cfg
            .drop_answers_after
            .is_some_and(|d| self.started.elapsed() < d)
        {
            return 0.0;
        }
        f64::from_bits(self.drop_answers.load(Ordering::Relaxed))
    }

    /// A simulator speaking `tls`.
    pub fn new(cfg: CloudSimConfig, tls: ServerTls) -> Arc<Self> {
        Arc::new(Self {
            drop_answers: AtomicU64::new(cfg.drop_answers.clamp(0.0, 1.0).to_bits()),
            cfg,
            tls,
            stats: Arc::new(CloudStats::default()),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            next_conn: AtomicU64::new(0),
            answers: AtomicU64::new(0),
            alterable: AtomicU64::new(0),
            commands_on: std::sync::atomic::AtomicBool::new(true),
            started: Instant::now(),
        })
    }

    /// Its statistics.
    pub fn stats(&self) -> &Arc<CloudStats> {
        &self.stats
    }

    /// Closes every connection and stops accepting.
    pub async fn stop(&self) {
        self.shutdown.cancel();
        self.tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tracker.wait()).await;
    }

    /// Accepts on `listener` until stopped.
    pub async fn run(self: &Arc<Self>, listener: TcpListener) {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                },
            };
            let me = self.clone();
            self.tracker
                .spawn(async move { me.connection(tcp, peer).await });
        }
    }

    async fn connection(self: Arc<Self>, tcp: TcpStream, _peer: SocketAddr) {
        let _ = tcp.set_nodelay(true);
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        let io: Box<dyn Io> = match &self.tls {
            ServerTls::Plain => Box::new(tcp),
            ServerTls::Legacy(a) => match a.accept(tcp).await {
                Ok(s) => Box::new(s),
                Err(_) => {
                    self.stats.tls_failures.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            },
            ServerTls::Modern(m) => match m.accept(tcp).await {
                Ok(s) => Box::new(s),
                Err(_) => {
                    self.stats.tls_failures.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            },
        };
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let mut c = CloudConn {
            sim: &self,
            conn,
            device: None,
            mesh_id: 1,
            msg: 0x1500,
            seq: 0x100,
            pending: HashMap::new(),
            repeated: std::collections::HashSet::new(),
            acks: 0,
            record: self.cfg.record,
        };
        if c.record {
            self.stats
                .transcripts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(conn, Transcript::default());
        }
        c.serve(io).await;
        if let Some(d) = c.device {
            let mut m = self
                .stats
                .connected
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if m.get(&d) == Some(&conn) {
                m.remove(&d);
            }
        }
    }
}

struct CloudConn<'a> {
    sim: &'a CloudSim,
    conn: u64,
    device: Option<DeviceId>,
    mesh_id: u16,
    msg: u16,
    seq: u32,
    pending: HashMap<Msg, (Instant, Vec<u8>)>,
    /// Repeated commands whose second ack is awaited.
    repeated: std::collections::HashSet<Msg>,
    /// Acks so far (picks which commands are repeated).
    acks: u64,
    record: bool,
}

impl CloudConn<'_> {
    fn note(&self, sent: &[u8], received: &[u8]) {
        if !self.record {
            return;
        }
        let mut t = self
            .sim
            .stats
            .transcripts
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(t) = t.get_mut(&self.conn) {
            t.sent.extend_from_slice(sent);
            t.received.extend_from_slice(received);
            if t.device.is_none() {
                t.device = self.device;
            }
        }
    }

    async fn serve(&mut self, io: Box<dyn Io>) {
        let (mut r, mut w) = tokio::io::split(io);
        let mut framer = Framer::default();
        let mut buf = vec![0u8; 16 * 1024];
        let period = self.sim.cfg.command_interval;
        let mut ticker = tokio::time::interval(period.unwrap_or(Duration::from_secs(3600)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        // The next "restart": the next multiple of restart_every since the simulator started.
        let restart_at = self.sim.cfg.restart_every.map(|every| {
            let age = self.sim.started.elapsed();
            let n = age.as_nanos() / every.as_nanos().max(1) + 1;
            self.sim.started + every.saturating_mul(n as u32)
        });
        let restart = async {
            match restart_at {
                Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(restart);
        let stall = async {
            match self.sim.cfg.stop_reading_after {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(stall);
        loop {
            let mut out = Vec::new();
            tokio::select! {
                _ = self.sim.shutdown.cancelled() => break,
                _ = &mut restart => break,
                _ = &mut stall => {
                    // Stalled: neither read nor write again, keep the connection open.
                    self.sim.stats.stalled.fetch_add(1, Ordering::Relaxed);
                    self.sim.shutdown.cancelled().await;
                    break;
                }
                n = r.read(&mut buf) => {
                    let n = match n { Ok(0) | Err(_) => break, Ok(n) => n };
                    self.note(&[], &buf[..n]);
                    framer.push(&buf[..n]);
                    while let Some(ev) = framer.next_event() {
                        if let FramerEvent::Frame(raw) = ev {
                            self.sim.stats.frames_in.fetch_add(1, Ordering::Relaxed);
                            match raw.decode() {
                                Ok(f) if !self.accepts(&f) => {
                                    self.sim.stats.rejected.fetch_add(1, Ordering::Relaxed);
                                    let _ = w.shutdown().await;
                                    return;
                                }
                                Ok(f) => self.answer(&f, &mut out),
                                Err(_) => { self.sim.stats.bad_frames.fetch_add(1, Ordering::Relaxed); }
                            }
                        }
                    }
                }
                _ = ticker.tick(), if period.is_some() && self.device.is_some() => {
                    if self.sim.commands_on.load(Ordering::Relaxed) {
                        self.command(&mut out);
                    }
                }
            }
            if !out.is_empty() {
                let delay = self.sim.cfg.answer_delay;
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                if w.write_all(&out).await.is_err() || w.flush().await.is_err() {
                    break;
                }
                self.note(&out, &[]);
            }
        }
        let _ = w.shutdown().await;
    }

    /// Whether the `n`-th event is one of a share `p` (deterministic, spread evenly).
    fn picked(n: u64, p: f64) -> bool {
        if p <= 0.0 {
            return false;
        }
        let every = (1.0 / p).round().max(1.0) as u64;
        n % every == every / 2
    }

    /// Whether a handshake passes the auth check (anything else always does).
    fn accepts(&self, f: &Frame) -> bool {
        match (&self.sim.cfg.auth_codes, &f.body) {
            (Some(codes), Body::Handshake(h)) => {
                codes.get(&h.device_id).map(Vec::as_slice) == Some(&h.auth_code[..])
            }
            _ => true,
        }
    }

    fn push(out: &mut Vec<u8>, f: &Frame) {
        if let Ok(b) = f.encode() {
            out.extend_from_slice(&b);
        }
    }

    fn command(&mut self, out: &mut Vec<u8>) {
        self.msg = self.msg.wrapping_add(1);
        self.seq = self.seq.wrapping_add(1);
        let n = self.sim.stats.commands_sent.load(Ordering::Relaxed);
        let action = match n % 4 {
            0 => Action::Power { on: true },
            1 => Action::Combo {
                on: true,
                brightness: (n % 100) as u8,
                mode: 0xff,
                rgb: [0xff; 3],
            },
            2 => Action::Combo {
                on: true,
                brightness: 0xff,
                mode: (n % 101) as u8,
                rgb: [0; 3],
            },
            _ => Action::Power { on: false },
        };
        let cmd = Command {
            seq: self.seq,
            mesh_id: self.mesh_id,
            action,
        };
        let msg = Msg::counter(self.msg);
        let frame = Frame::pipe(SIM_APP_ID, msg, cmd.to_inner(self.seq));
        let start = out.len();
        Self::push(out, &frame);
        let bytes = out[start..].to_vec();
        let p = self.sim.cfg.duplicate_commands;
        if p > 0.0 {
            // Deterministic per command: every 1/p-th one, spread by the counter.
            let every = (1.0 / p).round().max(1.0) as u64;
            if n % every == every / 2 {
                Self::push(out, &frame);
                self.sim
                    .stats
                    .duplicates_sent
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        self.pending.insert(msg, (Instant::now(), bytes));
        self.sim.stats.commands_sent.fetch_add(1, Ordering::Relaxed);
    }

    fn answer(&mut self, f: &Frame, out: &mut Vec<u8>) {
        let before = out.len();
        self.answer_inner(f, out);
        if out.len() == before || crate::codec::answer::expected_answer(f).is_none() {
            return;
        }
        // Chaos on answers to device requests.
        let n = self.sim.answers.fetch_add(1, Ordering::Relaxed);
        if Self::picked(n, self.sim.drop_share()) {
            out.truncate(before);
            self.sim
                .stats
                .answers_dropped
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        // Only answers with content to alter count for the drift share: a sync ack's last
        // byte, the time answer's last (seconds) byte.
        let ptype = out.get(before).copied();
        let last = out.len() - 1;
        if matches!(ptype, Some(0x48) | Some(0xc8)) && last > before + 5 {
            let k = self.sim.alterable.fetch_add(1, Ordering::Relaxed);
            if Self::picked(k, self.sim.cfg.drift) {
                out[last] ^= 0x01;
                self.sim
                    .stats
                    .answers_altered
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn answer_inner(&mut self, f: &Frame, out: &mut Vec<u8>) {
        match (f.ptype, &f.body) {
            (PacketType::HANDSHAKE, Body::Handshake(h)) => {
                self.device = Some(h.device_id);
                self.sim.stats.handshakes.fetch_add(1, Ordering::Relaxed);
                self.sim
                    .stats
                    .connected
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(h.device_id, self.conn);
                Self::push(out, &Frame::handshake_ack());
            }
            (PacketType::LOGIN, _) => {
                self.sim.stats.logins.fetch_add(1, Ordering::Relaxed);
                Self::push(out, &Frame::login_ok());
            }
            (PacketType::SYNC, Body::Sync(s)) => {
                for r in &s.records {
                    if let RecordValue::Status(st) = r.decode()
                        && st.relayed == Some(0)
                    {
                        self.mesh_id = u16::from(st.mesh_id);
                    }
                }
                Self::push(out, &Frame::sync_ack());
            }
            (PacketType::PIPE_SYNC, _) => {
                if let Some(m) = f.msg() {
                    Self::push(out, &Frame::pipe_sync_ack(m));
                }
            }
            (PacketType::PIPE, _) => {
                if let (Some(id), Some(m)) = (f.id(), f.msg()) {
                    Self::push(out, &Frame::pipe_ack(id, m));
                }
            }
            (PacketType::PIPE_ACK, _) => {
                let m = f.msg();
                if let Some((sent, bytes)) = m.and_then(|m| self.pending.remove(&m)) {
                    self.sim.stats.command_acks.fetch_add(1, Ordering::Relaxed);
                    self.sim.stats.command_latency.record(sent.elapsed());
                    let k = self.acks;
                    self.acks += 1;
                    if let Some(m) = m
                        && Self::picked(k, self.sim.cfg.repeat_after_ack)
                    {
                        out.extend_from_slice(&bytes);
                        self.repeated.insert(m);
                        self.sim.stats.repeats_sent.fetch_add(1, Ordering::Relaxed);
                    }
                } else if let Some(m) = m
                    && self.repeated.remove(&m)
                {
                    self.sim.stats.repeat_acks.fetch_add(1, Ordering::Relaxed);
                }
            }
            (PacketType::TIME_REQUEST, _) => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64);
                Self::push(
                    out,
                    &Frame::time_answer(TimeAnswer::from_unix(
                        now,
                        self.sim.cfg.utc_offset_minutes,
                    )),
                );
            }
            (PacketType::PING, _) => Self::push(out, &Frame::pong()),
            _ => {}
        }
    }
}
