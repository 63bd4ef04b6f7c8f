//! Decrypted capture: every relayed byte, written as pcapng that Wireshark and tshark open as
//! ordinary TCP streams (LINKTYPE_RAW, synthesized IPv4/TCP with the real addresses of each leg).
//!
//! The session taps hand chunks to [`Capture`] (a [`TapSink`]); it copies them into a bounded
//! queue and returns. A writer thread owns the files: it frames each direction, writes one TCP
//! segment per Cync frame on both legs (device↔proxy and proxy↔cloud) with a comment naming the
//! connection, the device and the decoded frame, masks auth codes when asked, and rotates and
//! prunes files. A full queue drops the chunk and counts it (`cync_mitm_capture_dropped_total`);
//! the synthesized stream then skips those bytes, so Wireshark shows the gap. Files close when
//! their last session has been gone a while (a connection's own file at once), at most
//! `capture.max_open_files` stay open, and write failures are counted and logged once a minute.

pub mod read;
pub mod tcp;
mod writer;

/// Masks the auth code of a 0x23 handshake or the auth string of a 0x13 login in place (same
/// length, `*`), as captures do with `redact_auth`. Whether the frame had one.
pub fn redact_auth(frame: &mut [u8]) -> bool {
    writer::redact(frame)
}

use crate::metrics::{Flow, Metrics};
use crate::proxy::tap::{ConnMeta, PeerKind, TapSink};
use crate::reload::LiveConfig;
use std::collections::HashMap;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::SystemTime;
use uuid::Uuid;

/// What the writer thread is told.
enum Event {
    Open {
        meta: Arc<ConnMeta>,
        at: SystemTime,
    },
    Chunk {
        id: Uuid,
        flow: Flow,
        at: SystemTime,
        bytes: Vec<u8>,
        /// Bytes of this direction dropped since the previous queued chunk.
        gap: usize,
    },
    Close {
        id: Uuid,
        at: SystemTime,
    },
    Flush(std::sync::mpsc::Sender<()>),
}

/// Per-connection state on the relay side: whether it is captured, and drops not yet reported.
#[derive(Default)]
struct Tracked {
    gaps: [usize; 2],
}

/// The capture tap.
pub struct Capture {
    tx: Mutex<Option<SyncSender<Event>>>,
    live: Arc<LiveConfig>,
    metrics: Arc<Metrics>,
    tracked: Mutex<HashMap<Uuid, Tracked>>,
    /// Connections being captured (a lock-free check for the common "capture off" case).
    n_tracked: std::sync::atomic::AtomicUsize,
    lost_closes: Arc<Mutex<Vec<(Uuid, SystemTime)>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

fn flow_index(f: Flow) -> usize {
    match f {
        Flow::DeviceToCloud => 0,
        Flow::CloudToDevice => 1,
    }
}

impl Capture {
    /// Starts the writer thread. The queue size is read once; every other option is read from
    /// the live configuration as events arrive, so they reload live.
    pub fn start(live: Arc<LiveConfig>, metrics: Arc<Metrics>) -> std::io::Result<Arc<Self>> {
        let queue = live.current().config.capture.queue;
        let (tx, rx): (SyncSender<Event>, Receiver<Event>) = sync_channel(queue);
        let lost_closes = Arc::new(Mutex::new(Vec::new()));
        let w = writer::Writer::new(live.clone(), metrics.clone(), lost_closes.clone());
        let thread = std::thread::Builder::new()
            .name("capture-writer".into())
            .spawn(move || w.run(rx))?;
        Ok(Arc::new(Self {
            tx: Mutex::new(Some(tx)),
            live,
            metrics,
            tracked: Mutex::new(HashMap::new()),
            n_tracked: std::sync::atomic::AtomicUsize::new(0),
            lost_closes,
            thread: Mutex::new(Some(thread)),
        }))
    }

    fn send(&self, ev: Event) -> Result<(), TrySendError<Event>> {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        match tx.as_ref() {
            Some(tx) => tx.try_send(ev),
            None => Err(TrySendError::Disconnected(ev)),
        }
    }

    /// Waits until everything queued so far is written and flushed.
    pub fn flush(&self) {
        let (tx, rx) = std::sync::mpsc::channel();
        let sent = {
            let g = self.tx.lock().unwrap_or_else(|p| p.into_inner());
            g.as_ref().map(|s| s.send(Event::Flush(tx)).is_ok())
        };
        if sent == Some(true) {
            let _ = rx.recv_timeout(std::time::Duration::from_secs(10));
        }
    }

    /// Finishes every open stream, closes the files and stops the writer thread.
    pub fn shutdown(&self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }

    fn wanted(&self, meta: &ConnMeta) -> bool {
        let loaded = self.live.current();
        let c = &loaded.config.capture;
        if !c.enabled {
            return false;
        }
        if c.devices.is_empty() {
            return true;
        }
        match meta.peer {
            PeerKind::Device(id) => c
                .devices
                .iter()
                .filter_map(|d| crate::route::parse_device_id(d))
                .any(|d| d == id),
            _ => false,
        }
    }
}

impl TapSink for Capture {
    fn on_open(&self, meta: &Arc<ConnMeta>) {
        if !self.wanted(meta) {
            return;
        }
        if self
            .send(Event::Open {
                meta: meta.clone(),
                at: SystemTime::now(),
            })
            .is_ok()
        {
            self.tracked
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(meta.id, Tracked::default());
            self.n_tracked
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        } else {
            self.metrics.capture_dropped.inc();
        }
    }

    fn on_chunk(&self, meta: &Arc<ConnMeta>, flow: Flow, at: SystemTime, bytes: &[u8]) {
        if self.n_tracked.load(std::sync::atomic::Ordering::Relaxed) == 0 {
            return;
        }
        let mut tracked = self.tracked.lock().unwrap_or_else(|p| p.into_inner());
        let Some(t) = tracked.get_mut(&meta.id) else {
            return;
        };
        let i = flow_index(flow);
        let gap = t.gaps[i];
        match self.send(Event::Chunk {
            id: meta.id,
            flow,
            at,
            bytes: bytes.to_vec(),
            gap,
        }) {
            Ok(()) => t.gaps[i] = 0,
            Err(_) => {
                t.gaps[i] += bytes.len();
                self.metrics.capture_dropped.inc();
            }
        }
    }

    fn on_close(&self, meta: &Arc<ConnMeta>, _reason: &str) {
        if self
            .tracked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&meta.id)
            .is_none()
        {
            return;
        }
        self.n_tracked
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let at = SystemTime::now();
        if self.send(Event::Close { id: meta.id, at }).is_err() {
            // The writer picks it up on its next tick.
            self.lost_closes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((meta.id, at));
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.shutdown();
    }
}
