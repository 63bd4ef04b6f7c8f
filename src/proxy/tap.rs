//! Session taps: what each relayed chunk and frame is shown to, without ever delaying the relay.
//!
//! Every session owns one [`DirectionTap`] per direction. It counts bytes and frames, decodes
//! every frame (problems are counted, and logged once per connection and direction), and hands
//! chunks and frames to the registered [`TapSink`]s: the capture writer, the mirror and the SLO
//! recorder of later milestones. A sink must return at once: it copies what it needs into a
//! bounded channel and drops (and counts) when that channel is full.

use crate::codec::{DecodeError, Frame, Framer, FramerError, FramerEvent, RawFrame};
use crate::metrics::{DecodeProblem, Flow, Metrics};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;
use uuid::Uuid;

pub use crate::route::PeerKind;

/// Facts about one connection that every tap may need (addresses of both legs for captures).
#[derive(Debug)]
pub struct ConnMeta {
    /// UUIDv7 connection id.
    pub id: Uuid,
    /// The device's address.
    pub device_addr: SocketAddr,
    /// Our address on the device leg.
    pub proxy_device_addr: SocketAddr,
    /// Who the device side is.
    pub peer: PeerKind,
    /// When the connection was accepted.
    pub started: SystemTime,
    /// Our address on the upstream leg and the upstream's, once connected.
    pub upstream: OnceLock<(SocketAddr, SocketAddr)>,
    /// What its frames said, for the web console.
    pub live: crate::console::DeviceLive,
}

/// Receives copies of what a session relays. Implementations must not block.
pub trait TapSink: Send + Sync {
    /// A session started relaying.
    fn on_open(&self, _meta: &Arc<ConnMeta>) {}
    /// A chunk was relayed (already written to the other side).
    fn on_chunk(&self, _meta: &Arc<ConnMeta>, _flow: Flow, _at: SystemTime, _bytes: &[u8]) {}
    /// A whole frame was seen; `decoded` is `None` when its body did not decode.
    fn on_frame(
        &self,
        _meta: &Arc<ConnMeta>,
        _flow: Flow,
        _raw: &RawFrame,
        _decoded: Option<&Frame>,
    ) {
    }
    /// The session ended.
    fn on_close(&self, _meta: &Arc<ConnMeta>, _reason: &str) {}
}

/// The tap of one direction of one session.
pub struct DirectionTap {
    flow: Flow,
    /// The transport the session is relayed on (metric label).
    transport: crate::route::Path,
    framer: Framer,
    metrics: Arc<Metrics>,
    label: Option<String>,
    meta: Arc<ConnMeta>,
    sinks: Arc<[Arc<dyn TapSink>]>,
    logged: bool,
    frames: u64,
    problems: u64,
    /// Dark launch: the session's mirror, when one is attached (both directions share the
    /// slot; the session attaches and detaches it while the relay runs).
    mirror: Option<Arc<MirrorSlot>>,
    /// Passive observation of a relayed session (both directions share it).
    observer: Option<Arc<std::sync::Mutex<Observer>>>,
}

/// A session's attached mirror: whole device frames are copied to `tx`, fire and forget (a
/// full queue drops the frame and counts it; the relay never waits), and `parity` compares the
/// answers.
pub struct MirrorLink {
    /// The mirror's queue.
    pub tx: tokio::sync::mpsc::Sender<bytes::Bytes>,
    /// The session's parity: device requests the mirror took, the cloud's answers.
    pub parity: Option<Arc<std::sync::Mutex<crate::parity::hub::SessionParity>>>,
}

/// Where a session's taps find its mirror, if one is attached.
pub type MirrorSlot = arc_swap::ArcSwapOption<MirrorLink>;

/// Pairs a relayed session's requests and commands with their answers (a ReliableTransport
/// core in observe role), so the legacy path's `tcp_comm_*` numbers use the new path's
/// definitions: a cloud command until the device's ack, a device request until the cloud's
/// answer.
pub struct Observer {
    core: crate::transport::Core,
    metrics: crate::transport::metrics::TransportMetrics,
}

impl Observer {
    /// An observer with the new path's timing settings.
    pub fn new(
        settings: crate::transport::Settings,
        metrics: crate::transport::metrics::TransportMetrics,
    ) -> Arc<std::sync::Mutex<Self>> {
        Arc::new(std::sync::Mutex::new(Self {
            core: crate::transport::Core::new(settings, crate::transport::Role::Observe, 1),
            metrics,
        }))
    }

    fn record(&self, outs: &[crate::transport::Output]) {
        for o in outs {
            if let crate::transport::Output::Event(e) = o {
                self.metrics.record("legacy", e);
            }
        }
    }

    /// The session ended: its unanswered commands and requests count as failed.
    pub fn finish(&mut self) {
        let outs = self.core.finish();
        self.record(&outs);
    }

    fn frame(&mut self, flow: Flow, raw: &RawFrame, decoded: Option<&Frame>) {
        let now = std::time::Instant::now();
        let outs = match flow {
            Flow::DeviceToCloud => self
                .core
                .on_device_parsed(now, raw.bytes().clone(), decoded),
            Flow::CloudToDevice => self
                .core
                .on_backend_parsed(now, raw.bytes().clone(), decoded),
        };
        self.record(&outs);
        if self.core.next_deadline().is_some_and(|d| d <= now) {
            let outs = self.core.poll(now);
            self.record(&outs);
        }
    }
}

impl DirectionTap {
    /// A tap for `flow` of the connection `meta`.
    pub fn new(
        flow: Flow,
        transport: crate::route::Path,
        max_frame: usize,
        metrics: Arc<Metrics>,
        meta: Arc<ConnMeta>,
        sinks: Arc<[Arc<dyn TapSink>]>,
    ) -> Self {
        Self {
            flow,
            transport,
            framer: Framer::new(max_frame),
            metrics,
            label: meta.peer.id_label(),
            meta,
            sinks,
            logged: false,
            frames: 0,
            problems: 0,
            mirror: None,
            observer: None,
        }
    }

    /// Feeds every whole frame of this direction to `o` from now on.
    pub fn set_observer(&mut self, o: Arc<std::sync::Mutex<Observer>>) {
        self.observer = Some(o);
    }

    /// Shows this direction's frames to whatever mirror `slot` holds: the device's frames
    /// are copied to it, the cloud's answers compared.
    pub fn set_mirror(&mut self, slot: Arc<MirrorSlot>) {
        self.mirror = Some(slot);
    }

    /// Frames seen so far.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Decode problems seen so far.
    pub fn problems(&self) -> u64 {
        self.problems
    }

    fn problem(&mut self, p: DecodeProblem, what: &dyn std::fmt::Display) {
        self.problems += 1;
        self.metrics.add_decode_error(self.transport, self.flow, p);
        if self.logged {
            tracing::debug!(
                direction = self.flow.label(),
                kind = p.label(),
                "decode problem: {what}"
            );
        } else {
            self.logged = true;
            tracing::warn!(
                direction = self.flow.label(),
                kind = p.label(),
                "decode problem (bytes still relayed; further ones on this connection are logged at debug): {what}"
            );
        }
    }

    fn framer_error(&mut self, e: &FramerError) {
        let p = match e {
            FramerError::TooLarge { .. } => DecodeProblem::TooLarge,
            FramerError::Skipped { .. } => DecodeProblem::Skipped,
        };
        self.problem(p, e);
    }

    fn frame(&mut self, raw: &RawFrame) {
        self.frames += 1;
        let ptype = raw.ptype();
        self.metrics
            .add_frame(self.transport, self.flow, ptype, self.label.as_deref());
        if !ptype.is_known() {
            self.problem(
                DecodeProblem::UnknownType,
                &format_args!("unknown packet type {ptype}"),
            );
        }
        let decoded: Result<Frame, DecodeError> = raw.decode();
        match &decoded {
            Ok(f) => {
                if let Some(e) = f.inner_error() {
                    self.problem(
                        DecodeProblem::Inner,
                        &format_args!("{ptype} inner frame: {e}"),
                    );
                } else if let Some(i) = f.inner().filter(|i| !i.checksum_ok()) {
                    self.problem(
                        DecodeProblem::Checksum,
                        &format_args!(
                            "{ptype} inner checksum 0x{:02x}, expected 0x{:02x}",
                            i.checksum,
                            i.expected_checksum()
                        ),
                    );
                }
            }
            Err(e) => self.problem(DecodeProblem::Frame, &format_args!("{ptype}: {e}")),
        }
        if tracing::enabled!(tracing::Level::TRACE) {
            tracing::trace!(
                direction = self.flow.label(),
                "{}",
                crate::codec::view::frame_summary(raw.bytes())
            );
        }
        for s in self.sinks.iter() {
            s.on_frame(&self.meta, self.flow, raw, decoded.as_ref().ok());
        }
        if let Some(o) = &self.observer {
            o.lock().unwrap_or_else(|p| p.into_inner()).frame(
                self.flow,
                raw,
                decoded.as_ref().ok(),
            );
        }
        if let Some(slot) = &self.mirror {
            let link = slot.load();
            if let Some(link) = link.as_ref() {
                // Compared only when both paths got it: a frame the mirror's queue dropped
                // is not. The request is registered before the copy goes out (the mirror is
                // another task: its backend's answer may come back at once); this tap is the
                // queue's only sender, so room now means the send succeeds.
                let parity = match (&link.parity, &decoded) {
                    (Some(p), Ok(f)) => Some((p, f)),
                    _ => None,
                };
                if self.flow == Flow::DeviceToCloud {
                    if link.tx.capacity() == 0 {
                        self.metrics.transport.mirror_dropped.inc();
                    } else {
                        if let Some((p, f)) = parity {
                            p.lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .request(f, raw.bytes().clone());
                        }
                        if link.tx.try_send(raw.bytes().clone()).is_err() {
                            // The mirror ended; its session detaches it (or attaches anew).
                            self.metrics.transport.mirror_dropped.inc();
                        }
                    }
                } else if let Some((p, f)) = parity {
                    p.lock().unwrap_or_else(|p| p.into_inner()).answer(
                        crate::parity::Side::Legacy,
                        f,
                        raw.bytes().clone(),
                    );
                }
            }
        }
    }

    /// Shows a relayed chunk to the tap. Call after the chunk was written to the other side.
    pub fn on_chunk(&mut self, chunk: &[u8]) {
        self.metrics
            .add_bytes(self.transport, self.flow, chunk.len());
        if !self.sinks.is_empty() {
            let now = SystemTime::now();
            for s in self.sinks.iter() {
                s.on_chunk(&self.meta, self.flow, now, chunk);
            }
        }
        self.framer.push(chunk);
        while let Some(ev) = self.framer.next_event() {
            match ev {
                FramerEvent::Frame(raw) => self.frame(&raw),
                FramerEvent::Error(e) => self.framer_error(&e),
            }
        }
    }

    /// Bytes held that do not make a whole frame yet.
    pub fn buffered(&self) -> usize {
        self.framer.buffered()
    }
}
