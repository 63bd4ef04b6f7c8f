//! The I/O driver of a ReliableTransport session: it reads both legs, frames what it reads,
//! feeds the [`Core`], writes what the core says through per-leg writer tasks with bounded
//! queues (a stalled leg drops and counts, never blocks the other), runs the core's timers,
//! and re-establishes a lost backend connection with backoff while the device stays connected.

use super::core::{Core, Event, Output, Queue};
use super::metrics::TransportMetrics;
use crate::codec::{Framer, FramerEvent};
use crate::proxy::Io;
use crate::proxy::control::{Cause, SessionControl};
use crate::proxy::tap::DirectionTap;
use bytes::Bytes;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Size of one read.
const CHUNK: usize = 4 * 1024;
/// First wait between backend reconnect attempts; doubles up to the session's
/// `reconnect_max`.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
/// `reconnect_max` of a session whose device waits for the backend (within its grace).
pub const RECONNECT_MAX: Duration = Duration::from_secs(2);
/// `reconnect_max` of a dark-launch mirror (nobody waits for it; a backend that keeps
/// failing is not hammered by every shadowed session).
pub const MIRROR_RECONNECT_MAX: Duration = Duration::from_secs(30);
/// How long the writers may take to finish their queues when the session ends.
const WRITE_GRACE: Duration = Duration::from_secs(1);

/// How a session on the new path ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// The device closed (or reset) its connection.
    DeviceClosed,
    /// Writing to or reading from the device failed.
    DeviceError(String),
    /// No bytes either way for the idle timeout.
    Idle,
    /// Closed from outside (drain, replacement, shutdown).
    External(Cause),
    /// The backend stayed away longer than the reconnect grace.
    BackendLost,
}

impl End {
    /// Label of `cync_mitm_connections_closed_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::DeviceClosed => "device_closed",
            Self::DeviceError(_) => "device_error",
            Self::Idle => "idle",
            Self::External(c) => c.label(),
            Self::BackendLost => "new_path_down",
        }
    }
}

/// A future that connects the backend again.
pub type Reconnect<'a> = Pin<Box<dyn Future<Output = Result<Box<dyn Io>, String>> + Send + 'a>>;

/// Sees each whole backend frame, decoded if it decodes.
pub type BackendHook<'a> = Box<dyn FnMut(&bytes::Bytes, Option<&crate::codec::Frame>) + Send + 'a>;

/// Where a session's device frames come from.
pub enum DeviceLeg {
    /// The device's own connection (read and written).
    Stream(Box<dyn Io>),
    /// Whole frames copied from a relayed session (a dark-launch mirror): nothing is written
    /// back, and while the backend cannot take more (its write queue full, or it is away)
    /// none are taken, so the copies back up to the tap, which drops them at no cost to the
    /// relay.
    Copy(mpsc::Receiver<Bytes>),
}

/// Everything a session needs.
pub struct Session<'a> {
    /// The device leg.
    pub device: DeviceLeg,
    /// The first backend connection (its handshake is answered).
    pub backend: Box<dyn Io>,
    /// Device bytes read but not yet a whole frame (nothing of them was sent).
    pub device_tail: Vec<u8>,
    /// Backend bytes read but not yet a whole frame (nothing of them was delivered).
    pub backend_tail: Vec<u8>,
    /// The core, resumed on the first connection.
    pub core: Core,
    /// Opens a new backend connection.
    pub reconnect: Box<dyn FnMut() -> Reconnect<'a> + Send + 'a>,
    /// How long the backend may stay away; `None`: keep trying.
    pub grace: Option<Duration>,
    /// Longest wait between reconnect attempts (they start at once, then 100 ms doubling).
    pub reconnect_max: Duration,
    /// Idle timeout.
    pub idle: Duration,
    /// Largest frame.
    pub max_frame: usize,
    /// Capacity of the per-leg writer queues.
    pub queue: usize,
    /// Stops the session from outside.
    pub control: &'a SessionControl,
    /// Device → backend bytes, for metrics and captures.
    pub d2c: Option<&'a mut DirectionTap>,
    /// Bytes delivered to the device.
    pub c2d: Option<&'a mut DirectionTap>,
    /// Every core event (for trace logs; the metrics are counted here).
    pub events: Box<dyn FnMut(&Event) + Send + 'a>,
    /// The `tcp_comm_*` families, and this session's `transport` label.
    pub metrics: super::metrics::TransportMetrics,
    /// `new` (or `legacy` for an observed legacy session).
    pub transport: &'static str,
    /// A dark-launch mirror: the "device" leg is the copy of the device's frames.
    pub shadow: bool,
    /// Called with `true` when a lost backend is back, `false` when it is lost.
    pub backend_state: Box<dyn FnMut(bool) + Send + 'a>,
    /// Shown every whole backend frame first, decoded if it decodes (parity of a mirror).
    pub on_backend: Option<BackendHook<'a>>,
}

/// Frames a writer coalesces into one write (and one TLS record) when they queue up.
const COALESCE: usize = 16 * 1024;

/// A writer task: writes what arrives on its queue, ends at the first error. Frames that
/// queued up meanwhile go out in one write.
fn writer(mut w: tokio::io::WriteHalf<Box<dyn Io>>, cap: usize) -> (mpsc::Sender<Bytes>, Writer) {
    let (tx, mut rx) = mpsc::channel::<Bytes>(cap.max(1));
    let task = tokio::spawn(async move {
        let mut buf: Vec<u8> = Vec::new();
        while let Some(b) = rx.recv().await {
            let r = if let Ok(next) = rx.try_recv() {
                buf.clear();
                buf.extend_from_slice(&b);
                buf.extend_from_slice(&next);
                while buf.len() < COALESCE {
                    match rx.try_recv() {
                        Ok(more) => buf.extend_from_slice(&more),
                        Err(_) => break,
                    }
                }
                w.write_all(&buf).await
            } else {
                w.write_all(&b).await
            };
            if r.is_err() || w.flush().await.is_err() {
                return;
            }
            if buf.capacity() > 4 * COALESCE {
                buf = Vec::new();
            }
        }
        let _ = w.shutdown().await;
    });
    (tx, tokio_util::task::AbortOnDropHandle::new(task))
}

/// A writer task, stopped if the session is dropped mid-way (a detached mirror, say): nothing
/// it holds (a socket, its queue) outlives the session.
type Writer = tokio_util::task::AbortOnDropHandle<()>;

/// Resolves once `tx` has room again.
async fn room(tx: &Option<mpsc::Sender<Bytes>>) {
    match tx {
        Some(t) => {
            // The permit is dropped at once: this only waits.
            let _ = t.reserve().await;
        }
        None => std::future::pending().await,
    }
}

/// `f`, or a future that never resolves when there is none (a leg that is not there).
async fn or_pending<F: Future>(f: Option<F>) -> F::Output {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

fn is_close(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::UnexpectedEof
    )
}

/// Keeps the all-session queue gauges in step with one session's queues.
struct QueueGauges {
    m: TransportMetrics,
    transport: &'static str,
    send: i64,
    recv: i64,
}

impl QueueGauges {
    fn set(&mut self, send: usize, recv: usize) {
        let (send, recv) = (send as i64, recv as i64);
        if send != self.send {
            self.m
                .send_queue
                .with_label_values(&[self.transport])
                .add(send - self.send);
            self.send = send;
        }
        if recv != self.recv {
            self.m
                .recv_queue
                .with_label_values(&[self.transport])
                .add(recv - self.recv);
            self.recv = recv;
        }
    }
}

impl Drop for QueueGauges {
    fn drop(&mut self) {
        self.set(0, 0);
    }
}

/// Runs the session until it ends.
pub async fn run(s: Session<'_>) -> End {
    let mut gauges = QueueGauges {
        m: s.metrics.clone(),
        transport: s.transport,
        send: 0,
        recv: 0,
    };
    run_inner(s, &mut gauges).await
}

async fn run_inner(mut s: Session<'_>, gauges: &mut QueueGauges) -> End {
    let m = s.metrics.clone();
    let t = s.transport;
    let (mut dev_rd, dev_tx, dev_task, mut copy_rx) = match s.device {
        DeviceLeg::Stream(io) => {
            let (rd, wr) = tokio::io::split(io);
            let (tx, task) = writer(wr, s.queue);
            (Some(rd), Some(tx), Some(task), None)
        }
        DeviceLeg::Copy(rx) => (None, None, None, Some(rx)),
    };
    let (be_rd, be_wr) = tokio::io::split(s.backend);
    let mut be_rd = Some(be_rd);
    let (tx, task) = writer(be_wr, s.queue);
    let mut be_tx = Some(tx);
    let mut be_tasks = vec![task];
    let mut dev_framer = Framer::new(s.max_frame);
    let mut be_framer = Framer::new(s.max_frame);
    dev_framer.push(&s.device_tail);
    be_framer.push(&s.backend_tail);
    let mut dbuf = vec![0u8; CHUNK];
    let mut bbuf = vec![0u8; CHUNK];
    let mut last = Instant::now();
    // Since when the backend is away (kept until a new connection accepts the hello again).
    let mut lost_at: Option<Instant> = None;
    let mut attempt = 0u32;
    let mut next_attempt = Instant::now();
    let mut pending: Option<Reconnect<'_>> = None;
    let mut core = s.core;
    let far = Duration::from_secs(86_400);
    // The device half-closed: what it sent is passed on and the backend's last answers still
    // reach it, until the backend closes too (as the byte relay does).
    let mut device_eof = false;
    // The backend writer died: handle it as a lost connection.
    let mut be_broken = false;

    // Applies the core's outputs; a dead device leg ends the session.
    macro_rules! apply {
        ($outs:expr) => {
            for o in $outs {
                match o {
                    Output::ToBackend(b) => {
                        if let Some(tx) = &be_tx {
                            match tx.try_send(b) {
                                Ok(()) => m.packet_sent.with_label_values(&[t, "sent"]).inc(),
                                Err(mpsc::error::TrySendError::Full(_)) => {
                                    let e = Event::QueueFull {
                                        queue: Queue::Send,
                                        rejected: false,
                                    };
                                    m.record(t, &e);
                                    (s.events)(&e);
                                }
                                Err(mpsc::error::TrySendError::Closed(_)) => be_broken = true,
                            }
                        }
                    }
                    // A copied session writes nothing back (the core's shadow role sends
                    // nothing to it either).
                    Output::ToDevice(_) if dev_tx.is_none() => {}
                    Output::ToDevice(b) => {
                        let len = b.len();
                        let copy = b.clone();
                        let Some(dtx) = &dev_tx else { continue };
                        match dtx.try_send(b) {
                            Ok(()) => {
                                // Counted and captured only once it is on its way.
                                if let Some(tap) = s.c2d.as_deref_mut() {
                                    tap.on_chunk(&copy[..len]);
                                }
                                m.packet_sent.with_label_values(&[t, "sent"]).inc();
                            }
                            Err(mpsc::error::TrySendError::Full(_)) => {
                                let e = Event::QueueFull {
                                    queue: Queue::Recv,
                                    rejected: false,
                                };
                                m.record(t, &e);
                                (s.events)(&e);
                            }
                            Err(mpsc::error::TrySendError::Closed(_)) => {
                                finish(dev_task, be_tasks).await;
                                return End::DeviceError("device write failed".into());
                            }
                        }
                    }
                    Output::Event(Event::BackendAccepted) => {
                        if lost_at.take().is_some() {
                            attempt = 0;
                            (s.backend_state)(true);
                        }
                    }
                    Output::Event(e) => {
                        m.record(t, &e);
                        if let (true, Event::Suppressed { ptype }) = (s.shadow, &e) {
                            m.shadow_suppressed.with_label_values(&[ptype.name()]).inc();
                        }
                        (s.events)(&e);
                    }
                }
            }
            gauges.set(core.send_queue_len(), core.commands_pending());
        };
    }

    // The backend connection is gone: frames queue in the core until one is back.
    macro_rules! lose {
        () => {
            be_rd = None;
            be_tx = None;
            be_broken = false;
            core.on_backend_lost();
            if lost_at.is_none() {
                (s.backend_state)(false);
                lost_at = Some(Instant::now());
            }
            // Attempts keep backing off until a connection accepts the hello again.
            let wait = if attempt == 0 {
                Duration::ZERO
            } else {
                RECONNECT_MIN
                    .saturating_mul(1 << (attempt - 1).min(10))
                    .min(s.reconnect_max)
            };
            attempt = attempt.saturating_add(1);
            next_attempt = Instant::now() + wait;
        };
    }

    let end = loop {
        if be_broken {
            if device_eof {
                break End::DeviceClosed;
            }
            lose!();
        }
        let now = Instant::now();
        let deadline = core
            .next_deadline()
            .map(Instant::from_std)
            .unwrap_or(now + far);
        let idle_at = last + s.idle;
        let retry_at = if be_rd.is_none() && pending.is_none() {
            next_attempt
        } else {
            now + far
        };
        // A copied session takes no frame while the backend cannot take it.
        let paused = copy_rx.is_some() && be_tx.as_ref().is_none_or(|t| t.capacity() == 0);
        let grace_at = match (s.grace, lost_at) {
            (Some(g), Some(at)) => at + g,
            _ => now + far,
        };
        tokio::select! {
            _ = s.control.token().cancelled() => break End::External(s.control.cause()),
            _ = tokio::time::sleep_until(grace_at) => break End::BackendLost,
            f = or_pending(copy_rx.as_mut().map(|r| r.recv())), if copy_rx.is_some() && !paused => match f {
                Some(bytes) => {
                    last = Instant::now();
                    let outs = core.on_device_frame(last.into_std(), bytes);
                    apply!(outs);
                }
                // The relayed session ended, or detached its mirror.
                None => break End::DeviceClosed,
            },
            () = room(&be_tx), if paused && be_tx.is_some() => {},
            r = or_pending(dev_rd.as_mut().map(|r| r.read(&mut dbuf))), if !device_eof && dev_rd.is_some() => match r {
                Ok(0) if be_tx.is_some() => {
                    device_eof = true;
                    // Dropping the sender lets the writer finish its queue, then shut down.
                    be_tx = None;
                }
                Ok(0) => break End::DeviceClosed,
                Ok(n) => {
                    last = Instant::now();
                    if let Some(tap) = s.d2c.as_deref_mut() {
                        tap.on_chunk(&dbuf[..n]);
                    }
                    dev_framer.push(&dbuf[..n]);
                    while let Some(ev) = dev_framer.next_event() {
                        // Bytes that do not frame are counted by the d2c tap and dropped: the
                        // new path speaks frames.
                        if let FramerEvent::Frame(raw) = ev {
                            let outs = core.on_device_frame(last.into_std(), raw.bytes().clone());
                            apply!(outs);
                        }
                    }
                }
                Err(e) if is_close(&e) => break End::DeviceClosed,
                Err(e) => break End::DeviceError(e.to_string()),
            },
            r = or_pending(be_rd.as_mut().map(|r| r.read(&mut bbuf))) => match r {
                Ok(n) if n > 0 => {
                    last = Instant::now();
                    be_framer.push(&bbuf[..n]);
                    while let Some(ev) = be_framer.next_event() {
                        match ev {
                            FramerEvent::Frame(raw) => {
                                let frame = raw.decode().ok();
                                if let Some(h) = s.on_backend.as_mut() {
                                    h(raw.bytes(), frame.as_ref());
                                }
                                let outs = core.on_backend_parsed(
                                    last.into_std(),
                                    raw.bytes().clone(),
                                    frame.as_ref(),
                                );
                                if outs.iter().any(|o| matches!(o, Output::ToDevice(_))) {
                                    m.packet_recv.with_label_values(&[t, "ok"]).inc();
                                }
                                apply!(outs);
                            }
                            FramerEvent::Error(_) => {
                                m.packet_recv.with_label_values(&[t, "malformed"]).inc();
                            }
                        }
                    }
                }
                _ if device_eof => break End::DeviceClosed,
                _ => {
                    lose!();
                }
            },
            _ = tokio::time::sleep_until(retry_at), if be_rd.is_none() && pending.is_none() => {
                pending = Some((s.reconnect)());
            },
            r = or_pending(pending.as_mut()) => {
                pending = None;
                match r {
                    Ok(io) => {
                        let (rd, wr) = tokio::io::split(io);
                        be_rd = Some(rd);
                        let (tx, task) = writer(wr, s.queue);
                        be_tx = Some(tx);
                        // Writers of earlier, dead connections have nothing left to do.
                        for old in be_tasks.drain(..) {
                            old.abort();
                        }
                        be_tasks.push(task);
                        be_framer = Framer::new(s.max_frame);
                        // Back only once it accepts the replayed hello (BackendAccepted).
                        let outs = core.on_backend_connected(Instant::now().into_std());
                        apply!(outs);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, attempt, "new path reconnect failed");
                        lose!();
                    }
                }
            },
            _ = tokio::time::sleep_until(deadline) => {
                let outs = core.poll(Instant::now().into_std());
                apply!(outs);
            },
            _ = tokio::time::sleep_until(idle_at) => {
                if last.elapsed() >= s.idle {
                    break End::Idle;
                }
            },
        }
    };
    drop(dev_tx);
    drop(be_tx);
    finish(dev_task, be_tasks).await;
    end
}

/// Lets the writers finish what is queued for a moment, then stops them: nothing outlives
/// the session (a device that stopped reading would otherwise keep its socket and queue).
async fn finish(dev: Option<Writer>, backends: Vec<Writer>) {
    let mut all = backends;
    all.extend(dev);
    for mut h in all {
        if tokio::time::timeout(WRITE_GRACE, &mut h).await.is_err() {
            h.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Frame, InnerFrame, Msg};
    use crate::transport::{Role, Settings};
    use tokio_util::sync::CancellationToken;

    fn command(n: u16) -> Vec<u8> {
        let inner = InnerFrame::decode(&Bytes::from_static(&[
            0x7e, 0x01, 0x00, 0x00, 0x00, 0xf8, 0xd0, 0x0d, 0x00, 0x01, 0x01, 0x00, 0x00, 0x00,
            0x05, 0x00, 0xd0, 0x11, 0x02, 0x01, 0x00, 0x00, 0xe9, 0x7e,
        ]))
        .unwrap();
        Frame::pipe(7, Msg::counter(n), inner).encode().unwrap()
    }

    fn session<'a>(
        device: Box<dyn Io>,
        backend: Box<dyn Io>,
        control: &'a SessionControl,
        metrics: TransportMetrics,
    ) -> Session<'a> {
        let mut core = Core::new(Settings::default(), Role::Primary, 1);
        core.resume(Bytes::from(
            Frame::handshake(crate::codec::DeviceId(7), b"0123456789abcdef", 60)
                .encode()
                .unwrap(),
        ));
        Session {
            device: DeviceLeg::Stream(device),
            backend,
            device_tail: Vec::new(),
            backend_tail: Vec::new(),
            core,
            reconnect: Box::new(|| Box::pin(async { Err("no backend in this test".to_owned()) })),
            grace: None,
            reconnect_max: RECONNECT_MAX,
            idle: Duration::from_secs(60),
            max_frame: 4096,
            queue: 100,
            control,
            d2c: None,
            c2d: None,
            events: Box::new(|_| {}),
            metrics,
            transport: "new",
            shadow: false,
            backend_state: Box::new(|_| {}),
            on_backend: None,
        }
    }

    /// A device that stops reading: the backend's commands keep being read (they are dropped
    /// and counted once the device's queue is full), every queue stays bounded, and closing
    /// the session from outside ends it at once.
    #[tokio::test]
    async fn a_device_that_stops_reading_blocks_nothing_and_grows_nothing() {
        let metrics = TransportMetrics::register(&prometheus::Registry::new());
        // The device's end holds 1 KiB and is never read.
        let (device, _stuck) = tokio::io::duplex(1024);
        let (backend, mut cloud) = tokio::io::duplex(64 * 1024);
        let control = SessionControl::new(&CancellationToken::new());
        let run = run(session(
            Box::new(device),
            Box::new(backend),
            &control,
            metrics.clone(),
        ));
        tokio::pin!(run);
        // 20,000 commands (720 KB) from the backend, far beyond what the device takes.
        let mut all = Vec::new();
        for n in 0..20_000u16 {
            all.extend_from_slice(&command(n));
        }
        let write = async {
            cloud.write_all(&all).await.unwrap();
            cloud.flush().await.unwrap();
        };
        tokio::select! {
            _ = &mut run => panic!("the session ended"),
            r = tokio::time::timeout(Duration::from_secs(10), write) => {
                r.expect("the backend's writes stalled: the driver stopped reading it")
            }
        }
        // Let the driver take the rest of what it was sent.
        let settle = tokio::time::sleep(Duration::from_millis(300));
        tokio::select! {
            _ = &mut run => panic!("the session ended"),
            _ = settle => {}
        }
        let full = metrics.queue_full.with_label_values(&["new", "recv"]).get();
        assert!(full > 10_000, "dropped and counted: {full}");
        let tracked = metrics.recv_queue.with_label_values(&["new"]).get();
        assert!(
            tracked <= 100,
            "commands awaiting the device stay bounded: {tracked}"
        );
        control.close(Cause::Drained);
        let end = tokio::time::timeout(Duration::from_secs(3), run)
            .await
            .expect("the session did not end when closed");
        assert_eq!(end, End::External(Cause::Drained));
        assert_eq!(metrics.recv_queue.with_label_values(&["new"]).get(), 0);
    }

    /// A mirror whose backend stops reading: the copies back up to the tap's queue (its
    /// `try_send` fails, the relay's only cost), nothing inside grows, and dropping the mirror
    /// (a detach) stops its writer and closes the backend connection.
    #[tokio::test]
    async fn a_stalled_mirror_backs_up_to_the_tap_and_a_dropped_one_leaves_nothing() {
        let metrics = TransportMetrics::register(&prometheus::Registry::new());
        let (backend, mut cloud) = tokio::io::duplex(1024);
        let (tap, copies) = mpsc::channel::<Bytes>(100);
        let control = SessionControl::new(&CancellationToken::new());
        let mut core = Core::new(Settings::default(), Role::Shadow, 1);
        let _ = core.on_backend_connected(std::time::Instant::now());
        let mut s = session(
            Box::new(tokio::io::empty()),
            Box::new(backend),
            &control,
            metrics.clone(),
        );
        s.device = DeviceLeg::Copy(copies);
        s.core = core;
        s.shadow = true;
        let mut run = Box::pin(run(s));
        let ping = Bytes::from(Frame::ping().encode().unwrap());
        let (mut taken, mut refused) = (0u32, 0u32);
        for _ in 0..50 {
            for _ in 0..1000 {
                match tap.try_send(ping.clone()) {
                    Ok(()) => taken += 1,
                    Err(_) => refused += 1,
                }
            }
            // Let the mirror run a little between bursts.
            let pause = tokio::time::sleep(Duration::from_millis(5));
            tokio::select! {
                _ = &mut run => panic!("the mirror ended"),
                _ = pause => {}
            }
        }
        // The backend holds 1 KiB; the mirror's queues hold a few hundred frames; the rest
        // were refused at the tap.
        assert!(taken < 2_000, "the mirror kept taking copies: {taken}");
        assert!(refused > 45_000, "{refused}");
        assert!(metrics.send_queue.with_label_values(&["new"]).get() <= 100);
        // Detach: drop the mirror mid-way.
        drop(run);
        let mut buf = vec![0u8; 4096];
        let eof = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match cloud.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(
            eof.is_ok(),
            "the backend connection outlived the dropped mirror"
        );
    }
}
