//! The capture writer thread: frames each direction, synthesizes TCP on both legs, writes
//! pcapng, rotates and prunes files.

use super::Event;
use super::tcp::{Packet, TcpLeg};
use crate::codec::view::frame_summary;
use crate::codec::{Framer, FramerError, FramerEvent, PacketType};
use crate::config::{CaptureConfig, parse_packet_type};
use crate::metrics::{Flow, Metrics};
use crate::proxy::tap::ConnMeta;
use crate::reload::LiveConfig;
use bytes::Bytes;
use pcap_file::DataLink;
use pcap_file::pcapng::PcapNgWriter;
use pcap_file::pcapng::blocks::enhanced_packet::{EnhancedPacketBlock, EnhancedPacketOption};
use pcap_file::pcapng::blocks::interface_description::{
    InterfaceDescriptionBlock, InterfaceDescriptionOption,
};
use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::BufWriter;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use uuid::Uuid;

/// Interface 0: the device leg (device ↔ proxy); interface 1: the cloud leg (proxy ↔ upstream).
const IF_DEVICE: u32 = 0;
const IF_CLOUD: u32 = 1;
/// How often the writer drains its queue.
const POLL: Duration = Duration::from_millis(10);
/// How often files are flushed and lost close events handled.
const TICK: Duration = Duration::from_millis(500);
/// With no event for this long the writer blocks on the queue instead of polling it.
const PARK_AFTER: Duration = Duration::from_secs(1);
/// epb_flags direction bits.
const INBOUND: u32 = 0b01;
const OUTBOUND: u32 = 0b10;

/// A piece of one direction's byte stream: a whole frame, or bytes that are not one.
enum Piece {
    Frame(Vec<u8>),
    Raw(Vec<u8>, &'static str),
}

/// Cuts one direction's stream at frame boundaries, keeping every byte.
struct Segmenter {
    framer: Framer,
    pending: Vec<u8>,
    /// Bytes already emitted as raw that a later `Skipped` report will count again.
    credit: usize,
}

impl Segmenter {
    fn new(max_frame: usize) -> Self {
        Self {
            framer: Framer::new(max_frame),
            pending: Vec::new(),
            credit: 0,
        }
    }

    fn push(&mut self, chunk: &[u8], out: &mut Vec<Piece>) {
        self.pending.extend_from_slice(chunk);
        self.framer.push(chunk);
        while let Some(ev) = self.framer.next_event() {
            match ev {
                FramerEvent::Frame(raw) => {
                    let n = raw.len().min(self.pending.len());
                    out.push(Piece::Frame(self.pending.drain(..n).collect()));
                }
                FramerEvent::Error(FramerError::Skipped { bytes }) => {
                    let n = bytes.saturating_sub(self.credit).min(self.pending.len());
                    self.credit = self.credit.saturating_sub(bytes);
                    if n > 0 {
                        out.push(Piece::Raw(self.pending.drain(..n).collect(), "not a frame"));
                    }
                }
                FramerEvent::Error(FramerError::TooLarge { .. }) => {}
            }
        }
        // Bytes the framer already discarded while resynchronising: write them now.
        let consumed = self.pending.len().saturating_sub(self.framer.buffered());
        if consumed > 0 {
            self.credit += consumed;
            out.push(Piece::Raw(
                self.pending.drain(..consumed).collect(),
                "not a frame",
            ));
        }
    }

    fn finish(&mut self) -> Option<Piece> {
        (!self.pending.is_empty()).then(|| {
            Piece::Raw(
                std::mem::take(&mut self.pending),
                "incomplete frame at close",
            )
        })
    }

    fn reset(&mut self, max_frame: usize) {
        *self = Self::new(max_frame);
    }
}

/// Masks the authorize code of a 0x23 or the auth string of a 0x13 (both at body offset 7,
/// after a u16 length), keeping every length.
pub(super) fn redact(frame: &mut [u8]) -> bool {
    let t = frame.first().copied().map(PacketType);
    if t != Some(PacketType::HANDSHAKE) && t != Some(PacketType::LOGIN) {
        return false;
    }
    let Some(len) = frame
        .get(10..12)
        .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    else {
        return false;
    };
    let end = (12 + len).min(frame.len());
    if end <= 12 {
        return false;
    }
    for b in &mut frame[12..end] {
        *b = b'*';
    }
    true
}

struct Stream {
    key: String,
    /// The file is this connection's own (an unidentified peer with per-device files).
    per_connection: bool,
    device_leg: TcpLeg,
    cloud_leg: Option<TcpLeg>,
    seg: [Segmenter; 2],
    comment_prefix: String,
}

struct OutFile {
    path: PathBuf,
    w: PcapNgWriter<BufWriter<File>>,
    /// Bytes handed to the file (for rotation by size).
    bytes: u64,
    /// Bytes handed to the buffer but not yet flushed: counted as written once a flush succeeds.
    unflushed: u64,
    opened: Instant,
    /// Last write.
    used: Instant,
    /// Since when no session writes to it (`None` while one does).
    idle_since: Option<Instant>,
    /// A flush has succeeded since it was opened (a file that never reached the disk is
    /// removed when it fails, so a full disk leaves no empty files behind).
    durable: bool,
    /// Bytes of the section header and interfaces this file starts with.
    header_len: u64,
}

/// A device's file closed while the device may write again the same day (evicted for
/// `capture.max_open_files`, or idle): the next write appends to it as a new pcapng section
/// instead of starting `-2`, so a busy proxy does not split a device into many files.
struct Parked {
    path: PathBuf,
    bytes: u64,
    opened: Instant,
    at: Instant,
}

/// Parked files remembered at most (the oldest are forgotten first).
const MAX_PARKED: usize = 4096;

/// Errors that concern the whole capture folder (full, read-only, no permission): every key
/// backs off, not only the one that hit it.
fn folder_wide(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    matches!(
        e.kind(),
        K::StorageFull | K::ReadOnlyFilesystem | K::PermissionDenied | K::QuotaExceeded
    )
}

/// How often one kind of capture failure is logged.
const ERROR_LOG_EVERY: Duration = Duration::from_secs(60);
/// After a file failed, chunks for its key are skipped (and counted) this long before a new
/// file is tried, so a full disk does not turn into a file per chunk.
const RETRY_AFTER: Duration = Duration::from_secs(5);
/// Retention runs at most this often when files are opened (and on the next tick after any
/// file was opened), so a burst of short connections does not rescan the folder per file.
const PRUNE_EVERY: Duration = Duration::from_secs(1);

/// Kinds of capture failure (label `kind` of `cync_mitm_capture_errors_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Failure {
    /// A folder or file could not be created.
    Open,
    /// Writing or flushing failed (disk full, I/O error).
    Write,
}

impl Failure {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Write => "write",
        }
    }
}

/// Counts every failure, logs each kind at most once a minute with the real cause.
#[derive(Default)]
struct FailureLog {
    last: HashMap<Failure, (Instant, u64)>,
}

impl FailureLog {
    /// Counts a failure; returns whether it was logged.
    fn record(
        &mut self,
        metrics: &Metrics,
        kind: Failure,
        what: &Path,
        e: &dyn std::fmt::Display,
    ) -> bool {
        metrics.capture_error(kind.label());
        let now = Instant::now();
        match self.last.get_mut(&kind) {
            Some((at, suppressed)) if now.duration_since(*at) < ERROR_LOG_EVERY => {
                *suppressed += 1;
                false
            }
            entry => {
                let suppressed = entry.map_or(0, |e| e.1);
                tracing::error!(
                    kind = kind.label(),
                    path = %what.display(),
                    error = %e,
                    suppressed_since_last = suppressed,
                    "capture failed (the relay is not affected; further failures of this kind are counted and logged once a minute)"
                );
                self.last.insert(kind, (now, 0));
                true
            }
        }
    }
}

pub(super) struct Writer {
    live: Arc<LiveConfig>,
    metrics: Arc<Metrics>,
    lost_closes: Arc<Mutex<Vec<(Uuid, SystemTime)>>>,
    streams: HashMap<Uuid, Stream>,
    files: HashMap<String, OutFile>,
    /// Keys whose file failed, and until when they are left alone.
    failed: HashMap<String, Instant>,
    /// The folder failed as a whole (disk full, read-only): nothing is opened until then.
    folder_failed_until: Option<Instant>,
    parked: HashMap<String, Parked>,
    failures: FailureLog,
    last_prune: Option<Instant>,
    /// Files opened since retention last ran (it runs on the next tick when any were).
    opened_since_prune: usize,
}

fn ts(t: SystemTime) -> Duration {
    t.duration_since(UNIX_EPOCH).unwrap_or_default()
}

fn day(t: SystemTime) -> String {
    let secs = ts(t).as_secs() as i64;
    crate::codec::TimeAnswer::from_unix(secs, 0)
        .date()
        .replace('-', "")
}

fn isn(id: &Uuid) -> u32 {
    let b = id.as_bytes();
    u32::from_be_bytes([b[12], b[13], b[14], b[15]])
}

impl Writer {
    pub(super) fn new(
        live: Arc<LiveConfig>,
        metrics: Arc<Metrics>,
        lost_closes: Arc<Mutex<Vec<(Uuid, SystemTime)>>>,
    ) -> Self {
        Self {
            live,
            metrics,
            lost_closes,
            streams: HashMap::new(),
            files: HashMap::new(),
            failed: HashMap::new(),
            folder_failed_until: None,
            parked: HashMap::new(),
            failures: FailureLog::default(),
            last_prune: None,
            opened_since_prune: 0,
        }
    }

    /// Drains the queue every [`POLL`] while traffic flows instead of blocking on it: a
    /// receiver that does not park means the relay's `try_send` does not have to wake a thread
    /// (no syscall on the hot path). After [`PARK_AFTER`] without an event it blocks instead
    /// (woken by the next event, or at the next [`TICK`]), so an idle proxy does not wake 100
    /// times a second.
    pub(super) fn run(mut self, rx: Receiver<Event>) {
        let mut last_tick = Instant::now();
        let mut last_event = Instant::now();
        'outer: loop {
            loop {
                match rx.try_recv() {
                    Ok(ev) => {
                        last_event = Instant::now();
                        self.handle(ev);
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => break 'outer,
                }
            }
            if last_tick.elapsed() >= TICK {
                self.tick();
                last_tick = Instant::now();
            }
            if last_event.elapsed() < PARK_AFTER {
                std::thread::sleep(POLL);
                continue;
            }
            let wait = TICK.saturating_sub(last_tick.elapsed());
            match rx.recv_timeout(wait) {
                Ok(ev) => {
                    last_event = Instant::now();
                    self.handle(ev);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break 'outer,
            }
        }
        let ids: Vec<Uuid> = self.streams.keys().copied().collect();
        for id in ids {
            self.close(id, SystemTime::now());
        }
        let keys: Vec<String> = self.files.keys().cloned().collect();
        for k in keys {
            self.close_file(&k, false);
        }
        if self.opened_since_prune > 0 {
            self.prune();
        }
    }

    fn tick(&mut self) {
        let lost: Vec<(Uuid, SystemTime)> =
            std::mem::take(&mut *self.lost_closes.lock().unwrap_or_else(|p| p.into_inner()));
        for (id, at) in lost {
            self.close(id, at);
        }
        self.flush_all();
        self.close_idle(Instant::now(), SystemTime::now());
        let now = Instant::now();
        self.failed.retain(|_, until| *until > now);
        if self.folder_failed_until.is_some_and(|t| t <= now) {
            self.folder_failed_until = None;
        }
        let today = day(SystemTime::now());
        self.parked.retain(|k, _| k.starts_with(today.as_str()));
        if self.opened_since_prune > 0 {
            self.prune();
        }
    }

    /// Closes files no session has written to for `capture.close_idle_after`, and files of an
    /// earlier day that no session uses.
    fn close_idle(&mut self, now: Instant, wall: SystemTime) {
        let linger = self.live.current().config.capture.close_idle_after;
        let today = day(wall);
        let stale: Vec<String> = self
            .files
            .iter()
            .filter(|(k, f)| {
                f.idle_since.is_some_and(|t| {
                    now.duration_since(t) >= linger || !k.starts_with(today.as_str())
                })
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            // Today's device files may be written again: they are appended to then.
            let park = k.starts_with(today.as_str());
            self.close_file(&k, park);
        }
    }

    /// Flushes and closes the file of `key`; `park`: the key may write again today, and its
    /// next write appends to this file.
    fn close_file(&mut self, key: &str, park: bool) {
        if let Some(mut f) = self.files.remove(key) {
            let ok = self.flush_one(&mut f);
            tracing::debug!(file = %f.path.display(), "capture file closed");
            if !ok {
                self.give_up(key, f);
                return;
            }
            if park {
                if self.parked.len() >= MAX_PARKED
                    && let Some(oldest) = self
                        .parked
                        .iter()
                        .min_by_key(|(_, p)| p.at)
                        .map(|(k, _)| k.clone())
                {
                    self.parked.remove(&oldest);
                }
                self.parked.insert(
                    key.to_owned(),
                    Parked {
                        path: f.path.clone(),
                        bytes: f.bytes,
                        opened: f.opened,
                        at: Instant::now(),
                    },
                );
            }
        }
    }

    /// Flushes one file; what was flushed counts as written. A failure is counted and logged.
    fn flush_one(&mut self, f: &mut OutFile) -> bool {
        match std::io::Write::flush(f.w.get_mut()) {
            Ok(()) => {
                self.metrics.capture_written_bytes.inc_by(f.unflushed);
                f.unflushed = 0;
                f.durable = true;
                true
            }
            Err(e) => {
                self.failures
                    .record(&self.metrics, Failure::Write, &f.path, &e);
                if folder_wide(&e) {
                    self.folder_failed_until = Some(Instant::now() + RETRY_AFTER);
                }
                false
            }
        }
    }

    /// Gives up a file that failed: `key` is retried after [`RETRY_AFTER`], and a file that
    /// never reached the disk is removed rather than left empty.
    fn give_up(&mut self, key: &str, f: OutFile) {
        self.failed
            .insert(key.to_owned(), Instant::now() + RETRY_AFTER);
        self.parked.remove(key);
        let path = f.path.clone();
        let durable = f.durable;
        let header_len = f.header_len;
        // Dropping the writer tries one last flush; its result does not matter any more.
        drop(f);
        // Keep whatever packets did reach the disk; remove a file holding none.
        let holds_packets = std::fs::metadata(&path).is_ok_and(|m| m.len() > header_len);
        if !durable && !holds_packets {
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    tracing::debug!(file = %path.display(), "removed a capture file that never reached the disk")
                }
                Err(e) => {
                    tracing::debug!(file = %path.display(), error = %e, "could not remove a failed capture file")
                }
            }
        }
    }

    fn flush_all(&mut self) {
        let keys: Vec<String> = self
            .files
            .iter()
            .filter(|(_, f)| f.unflushed > 0)
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            let Some(mut f) = self.files.remove(&k) else {
                continue;
            };
            if self.flush_one(&mut f) {
                self.files.insert(k, f);
            } else {
                // A file that cannot be flushed is given up; the key is retried later.
                self.give_up(&k, f);
            }
        }
    }

    fn prune(&mut self) {
        let loaded = self.live.current();
        let cfg = &loaded.config.capture;
        let open: Vec<PathBuf> = self.files.values().map(|f| f.path.clone()).collect();
        let deleted = prune(&cfg.dir, cfg.max_total_bytes, cfg.max_files, &open);
        self.metrics.capture_deleted.inc_by(deleted);
        self.last_prune = Some(Instant::now());
        self.opened_since_prune = 0;
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Open { meta, at } => self.open(meta, at),
            Event::Chunk {
                id,
                flow,
                at,
                bytes,
                gap,
            } => self.chunk(id, flow, at, &bytes, gap),
            Event::Close { id, at } => {
                self.close(id, at);
                self.flush_all();
            }
            Event::Flush(done) => {
                self.tick();
                let _ = done.send(());
            }
        }
    }

    fn file_key(cfg: &CaptureConfig, meta: &ConnMeta, at: SystemTime) -> String {
        let label = if cfg.per_device {
            meta.peer.id_label().unwrap_or_else(|| meta.id.to_string())
        } else {
            "capture".to_owned()
        };
        format!("{}/{label}", day(at))
    }

    fn open(&mut self, meta: Arc<ConnMeta>, at: SystemTime) {
        let loaded = self.live.current();
        let cfg = &loaded.config.capture;
        let max_frame = loaded.config.limits.max_frame;
        let key = Self::file_key(cfg, &meta, at);
        let per_connection = cfg.per_device && meta.peer.id_label().is_none();
        let base = isn(&meta.id);
        let mut device_leg = TcpLeg::new(meta.device_addr, meta.proxy_device_addr, base);
        let mut cloud_leg = meta
            .upstream
            .get()
            .map(|(local, remote)| TcpLeg::new(*local, *remote, base.rotate_left(8)));
        let comment_prefix = meta
            .peer
            .id_label()
            .map_or_else(|| format!("conn={}", meta.id), |l| format!("device={l}"));
        let mut packets = Vec::new();
        for p in device_leg.open() {
            packets.push((IF_DEVICE, p));
        }
        if let Some(leg) = cloud_leg.as_mut() {
            for p in leg.open() {
                packets.push((IF_CLOUD, p));
            }
        }
        let comment = format!("{comment_prefix} conn={} connection opened", meta.id);
        self.write(&key, cfg, at, packets, Some(&comment));
        if let Some(f) = self.files.get_mut(&key) {
            f.idle_since = None;
        }
        self.streams.insert(
            meta.id,
            Stream {
                key,
                per_connection,
                device_leg,
                cloud_leg,
                seg: [Segmenter::new(max_frame), Segmenter::new(max_frame)],
                comment_prefix,
            },
        );
    }

    fn chunk(&mut self, id: Uuid, flow: Flow, at: SystemTime, bytes: &[u8], gap: usize) {
        let loaded = self.live.current();
        let cfg = &loaded.config.capture;
        let types: Vec<PacketType> = cfg
            .types
            .iter()
            .filter_map(|t| parse_packet_type(t))
            .collect();
        let Some(st) = self.streams.get_mut(&id) else {
            return;
        };
        let from_client = flow == Flow::DeviceToCloud;
        let i = usize::from(!from_client);
        let mut packets = Vec::new();
        if gap > 0 {
            // Bytes dropped before this chunk: skip them in both legs' sequence space.
            let skip = vec![0u8; gap];
            let _ = st.device_leg.data(from_client, &skip);
            if let Some(l) = st.cloud_leg.as_mut() {
                let _ = l.data(from_client, &skip);
            }
            st.seg[i].reset(loaded.config.limits.max_frame);
        }
        let mut pieces = Vec::new();
        st.seg[i].push(bytes, &mut pieces);
        let mut comments = Vec::new();
        for piece in pieces {
            let (data, mut comment) = match piece {
                Piece::Frame(f) => {
                    let t = PacketType(f.first().copied().unwrap_or(0));
                    if !types.is_empty() && !types.contains(&t) {
                        continue;
                    }
                    let b = Bytes::from(f);
                    let summary = frame_summary(&b);
                    (
                        b,
                        format!("{} {} {summary}", st.comment_prefix, flow.label()),
                    )
                }
                Piece::Raw(r, why) => {
                    if !types.is_empty() {
                        continue;
                    }
                    let c = format!(
                        "{} {} {} bytes, {why}",
                        st.comment_prefix,
                        flow.label(),
                        r.len()
                    );
                    (Bytes::from(r), c)
                }
            };
            let data =
                if cfg.redact_auth && from_client && matches!(data.first(), Some(0x23 | 0x13)) {
                    let mut v = data.to_vec();
                    if redact(&mut v) {
                        comment.push_str(" (auth redacted)");
                    }
                    Bytes::from(v)
                } else {
                    data
                };
            // The same bytes cross both legs; the device leg's first packet carries the comment.
            let dev = st.device_leg.data(from_client, &data);
            comments.push((dev.len(), comment));
            packets.extend(dev.into_iter().map(|p| (IF_DEVICE, p)));
            if let Some(l) = st.cloud_leg.as_mut() {
                let cloud = l.data(from_client, &data);
                comments.push((cloud.len(), String::new()));
                packets.extend(cloud.into_iter().map(|p| (IF_CLOUD, p)));
            }
        }
        let key = st.key.clone();
        self.write_commented(&key, cfg, at, packets, comments);
    }

    fn close(&mut self, id: Uuid, at: SystemTime) {
        let Some(mut st) = self.streams.remove(&id) else {
            return;
        };
        let loaded = self.live.current();
        let cfg = &loaded.config.capture;
        let mut packets = Vec::new();
        for (i, from_client) in [(0usize, true), (1, false)] {
            if let Some(Piece::Raw(r, _)) = st.seg[i].finish() {
                for p in st.device_leg.data(from_client, &r) {
                    packets.push((IF_DEVICE, p));
                }
                if let Some(l) = st.cloud_leg.as_mut() {
                    for p in l.data(from_client, &r) {
                        packets.push((IF_CLOUD, p));
                    }
                }
            }
        }
        for p in st.device_leg.fin(true) {
            packets.push((IF_DEVICE, p));
        }
        if let Some(l) = st.cloud_leg.as_mut() {
            for p in l.fin(true) {
                packets.push((IF_CLOUD, p));
            }
            for p in l.fin(false) {
                packets.push((IF_CLOUD, p));
            }
        }
        for p in st.device_leg.fin(false) {
            packets.push((IF_DEVICE, p));
        }
        let comment = format!("{} conn={} connection closed", st.comment_prefix, id);
        self.write(&st.key, cfg, at, packets, Some(&comment));
        if !self.streams.values().any(|o| o.key == st.key) {
            if st.per_connection {
                // Nobody else will ever write to a connection's own file.
                self.close_file(&st.key, false);
            } else if let Some(f) = self.files.get_mut(&st.key) {
                f.idle_since = Some(Instant::now());
            }
        }
    }

    fn write(
        &mut self,
        key: &str,
        cfg: &CaptureConfig,
        at: SystemTime,
        packets: Vec<(u32, Packet)>,
        comment: Option<&str>,
    ) {
        let n = packets.len();
        let comments = comment.map(|c| vec![(n, c.to_owned())]).unwrap_or_default();
        self.write_commented(key, cfg, at, packets, comments);
    }

    /// Writes packets; `comments` pairs a packet count with the comment for the first of them.
    fn write_commented(
        &mut self,
        key: &str,
        cfg: &CaptureConfig,
        at: SystemTime,
        packets: Vec<(u32, Packet)>,
        comments: Vec<(usize, String)>,
    ) {
        if packets.is_empty() {
            return;
        }
        let Some(mut file) = self.take_file(key, cfg) else {
            self.metrics.capture_dropped_error.inc();
            return;
        };
        let mut marks: Vec<(usize, String)> = Vec::new();
        let mut idx = 0;
        for (n, c) in comments {
            marks.push((idx, c));
            idx += n;
        }
        let mut marks = marks.into_iter().peekable();
        let mut written = 0u64;
        let mut failed = None;
        for (i, (iface, p)) in packets.into_iter().enumerate() {
            let mut options = Vec::new();
            while marks.peek().is_some_and(|(at_i, _)| *at_i == i) {
                if let Some((_, c)) = marks.next()
                    && !c.is_empty()
                {
                    options.push(EnhancedPacketOption::Comment(Cow::Owned(c)));
                }
            }
            // Device leg: the proxy receives client data; cloud leg: the proxy sends it.
            let dir = match (iface, p.from_client) {
                (IF_DEVICE, true) | (IF_CLOUD, false) => INBOUND,
                _ => OUTBOUND,
            };
            options.push(EnhancedPacketOption::Flags(dir));
            let len = p.data.len() as u32;
            let block = EnhancedPacketBlock {
                interface_id: iface,
                timestamp: ts(at),
                original_len: len,
                data: Cow::Owned(p.data),
                options,
            };
            match file.w.write_pcapng_block(block) {
                Ok(n) => written += n as u64,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        file.bytes += written;
        file.unflushed += written;
        file.used = Instant::now();
        if let Some(e) = failed {
            // The file is given up (what reached the disk stays readable up to the failure);
            // the key is retried after RETRY_AFTER.
            self.failures
                .record(&self.metrics, Failure::Write, &file.path, &e);
            if let pcap_file::PcapError::IoError(io) = &e
                && folder_wide(io)
            {
                self.folder_failed_until = Some(Instant::now() + RETRY_AFTER);
            }
            self.metrics.capture_dropped_error.inc();
            self.give_up(key, file);
            return;
        }
        let rotate = file.bytes >= cfg.max_file_bytes || file.opened.elapsed() >= cfg.max_file_age;
        if rotate {
            self.flush_one(&mut file);
        } else {
            self.files.insert(key.to_owned(), file);
        }
    }

    /// The open file of `key` (taken out of the map while it is written), opening it when
    /// needed: retention runs first, and at most `capture.max_open_files` stay open (idle ones
    /// are closed first, then the least recently used).
    fn take_file(&mut self, key: &str, cfg: &CaptureConfig) -> Option<OutFile> {
        if let Some(f) = self.files.remove(key) {
            return Some(f);
        }
        let now = Instant::now();
        if self.failed.get(key).is_some_and(|until| *until > now)
            || self.folder_failed_until.is_some_and(|until| until > now)
        {
            return None;
        }
        while self.files.len() >= cfg.max_open_files {
            let victim = self
                .files
                .iter()
                .min_by_key(|(_, f)| (f.idle_since.is_none(), f.used))
                .map(|(k, _)| k.clone());
            match victim {
                // A file of a connection's own is never written again; a device's may be.
                Some(k) => {
                    let park = !self
                        .streams
                        .values()
                        .any(|s| s.key == k && s.per_connection);
                    self.close_file(&k, park);
                }
                None => break,
            }
        }
        // Append to the key's parked file when it may still grow, else start a new one.
        let reopened = match self.parked.remove(key) {
            Some(p) if p.bytes < cfg.max_file_bytes && p.opened.elapsed() < cfg.max_file_age => {
                reopen_file(&p).ok()
            }
            _ => None,
        };
        let f = match reopened {
            Some(f) => {
                tracing::debug!(file = %f.path.display(), "capture file reopened to append");
                f
            }
            None => match open_file(&cfg.dir, key) {
                Ok(f) => {
                    tracing::debug!(file = %f.path.display(), "capture file opened");
                    self.metrics.capture_files.inc();
                    f
                }
                Err(e) => {
                    self.failures
                        .record(&self.metrics, Failure::Open, &cfg.dir.join(key), &e);
                    if folder_wide(&e) {
                        self.folder_failed_until = Some(now + RETRY_AFTER);
                    }
                    self.failed.insert(key.to_owned(), now + RETRY_AFTER);
                    return None;
                }
            },
        };
        self.failed.remove(key);
        self.opened_since_prune += 1;
        if self.last_prune.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
            let open: Vec<PathBuf> = self
                .files
                .values()
                .map(|f| f.path.clone())
                .chain([f.path.clone()])
                .collect();
            let deleted = prune(&cfg.dir, cfg.max_total_bytes, cfg.max_files, &open);
            self.metrics.capture_deleted.inc_by(deleted);
            self.last_prune = Some(Instant::now());
            self.opened_since_prune = 0;
        }
        Some(f)
    }
}

fn open_file(dir: &Path, key: &str) -> std::io::Result<OutFile> {
    let (day, label) = key.split_once('/').unwrap_or(("", key));
    let folder = dir.join(day);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&folder)?;
    let mut n = 1;
    let path = loop {
        let name = if n == 1 {
            format!("{label}.pcapng")
        } else {
            format!("{label}-{n}.pcapng")
        };
        let p = folder.join(name);
        if !p.exists() {
            break p;
        }
        n += 1;
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    let now = Instant::now();
    start_section(file, path, 0, now)
}

/// Opens a parked file to append a new section (header and interfaces again, then packets):
/// a valid pcapng file that Wireshark and `capture read` read as one capture.
/// A parked path replaced by a symlink is not followed (`O_NOFOLLOW`).
fn reopen_file(p: &Parked) -> std::io::Result<OutFile> {
    let file = std::fs::OpenOptions::new()
        .append(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&p.path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut f = start_section(file, p.path.clone(), p.bytes, p.opened)?;
    // The file held data already: it is on disk.
    f.durable = true;
    Ok(f)
}

/// Writes a section header and the two interfaces to `file`.
fn start_section(
    file: File,
    path: PathBuf,
    bytes: u64,
    opened: Instant,
) -> std::io::Result<OutFile> {
    let mut w = PcapNgWriter::new(BufWriter::new(file)).map_err(std::io::Error::other)?;
    for name in [
        "device leg (device <-> cync-mitm)",
        "cloud leg (cync-mitm <-> upstream)",
    ] {
        let idb = InterfaceDescriptionBlock {
            linktype: DataLink::RAW,
            snaplen: 0,
            options: vec![
                InterfaceDescriptionOption::IfName(Cow::Borrowed(name)),
                InterfaceDescriptionOption::IfTsResol(9),
            ],
        };
        w.write_pcapng_block(idb).map_err(std::io::Error::other)?;
    }
    let header_len = w.get_ref().buffer().len() as u64;
    Ok(OutFile {
        path,
        w,
        bytes,
        unflushed: 0,
        opened,
        used: Instant::now(),
        idle_since: None,
        durable: false,
        header_len,
    })
}

/// Deletes the oldest `.pcapng` files under `dir` (never the ones in `keep`) until at most
/// `max_files` files and `max_bytes` bytes remain. Returns how many were deleted.
pub(super) fn prune(dir: &Path, max_bytes: u64, max_files: usize, keep: &[PathBuf]) -> u64 {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(md) = e.metadata() else { continue };
            if md.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "pcapng") {
                let mtime = md.modified().unwrap_or(UNIX_EPOCH);
                files.push((mtime, p, md.len()));
            }
        }
    }
    files.sort();
    let mut total: u64 = files.iter().map(|f| f.2).sum();
    let mut count = files.len();
    let mut deleted = 0;
    for (_, p, len) in files {
        if total <= max_bytes && count <= max_files {
            break;
        }
        if keep.contains(&p) {
            continue;
        }
        if std::fs::remove_file(&p).is_ok() {
            tracing::info!(file = %p.display(), "capture retention: deleted");
            total = total.saturating_sub(len);
            count -= 1;
            deleted += 1;
        }
    }
    deleted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(pieces: &[Piece]) -> Vec<(bool, usize)> {
        pieces
            .iter()
            .map(|p| match p {
                Piece::Frame(f) => (true, f.len()),
                Piece::Raw(r, _) => (false, r.len()),
            })
            .collect()
    }

    #[test]
    fn segmenter_keeps_every_byte() {
        let mut s = Segmenter::new(64);
        let mut out = Vec::new();
        s.push(&[0xd3, 0, 0], &mut out);
        assert!(out.is_empty());
        s.push(
            &[
                0, 0, 0x73, 0xff, 0xff, 0xff, 0xff, 1, 2, 3, 0xd8, 0, 0, 0, 0,
            ],
            &mut out,
        );
        let got = frames(&out);
        let total: usize = got.iter().map(|x| x.1).sum();
        assert_eq!(total, 18, "{got:?}");
        assert_eq!(got, vec![(true, 5), (false, 8), (true, 5)]);
        assert_eq!(got.first(), Some(&(true, 5)));
        assert_eq!(got.last(), Some(&(true, 5)));
        s.push(&[0x48, 0, 0], &mut out);
        assert!(matches!(s.finish(), Some(Piece::Raw(r, _)) if r.len() == 3));
    }

    #[test]
    fn failures_are_all_counted_and_logged_once_a_minute_per_kind() {
        let m = Metrics::new(false);
        let mut log = FailureLog::default();
        let p = Path::new("x");
        let logged: usize = (0..100)
            .map(|_| log.record(&m, Failure::Write, p, &"ENOSPC") as usize)
            .sum();
        assert_eq!(logged, 1);
        assert!(log.record(&m, Failure::Open, p, &"EACCES"));
        assert!(!log.record(&m, Failure::Open, p, &"EACCES"));
        assert_eq!(m.capture_errors.with_label_values(&["write"]).get(), 100);
        assert_eq!(m.capture_errors.with_label_values(&["open"]).get(), 2);
    }

    #[test]
    fn redaction_keeps_lengths() {
        let mut f =
            crate::codec::Frame::handshake(crate::codec::DeviceId(1), b"secretsecret1234", 60)
                .encode()
                .unwrap();
        let before = f.len();
        assert!(redact(&mut f));
        assert_eq!(f.len(), before);
        assert_eq!(&f[12..28], b"****************");
        assert_eq!(f[28..], [0, 0, 60]);
        let mut l = crate::codec::Frame::login(5, b"abc", 30).encode().unwrap();
        assert!(redact(&mut l));
        assert_eq!(&l[12..15], b"***");
        let mut p = crate::codec::Frame::ping().encode().unwrap();
        assert!(!redact(&mut p));
    }

    #[test]
    fn prune_deletes_oldest_first() {
        let d = tempfile::tempdir().unwrap();
        let mut paths = Vec::new();
        for i in 0..5 {
            let p = d.path().join(format!("f{i}.pcapng"));
            std::fs::write(&p, vec![0u8; 100]).unwrap();
            let t = UNIX_EPOCH + Duration::from_secs(1_000_000 + i * 10);
            File::options()
                .write(true)
                .open(&p)
                .unwrap()
                .set_modified(t)
                .unwrap();
            paths.push(p);
        }
        assert_eq!(prune(d.path(), 10_000, 3, &[paths[0].clone()]), 2);
        assert!(paths[0].exists() && !paths[1].exists() && !paths[2].exists() && paths[3].exists());
        assert_eq!(prune(d.path(), 150, 10, &[]), 2);
        assert!(paths[4].exists());
    }
}
