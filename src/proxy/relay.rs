//! The byte-exact relay: two pumps (device→upstream, upstream→device) that write each chunk on
//! as soon as it is read (no batching), then show it to the direction's tap. Half-close is passed
//! on; an idle connection, a write or read error, or the session's control ends both.

use super::Io;
use super::control::{Cause, SessionControl};
use super::tap::DirectionTap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio_util::sync::CancellationToken;

/// Size of one read. Frames are small (the largest seen is 1 KiB), and each idle session holds
/// two of these, so keep it modest.
const CHUNK: usize = 4 * 1024;

/// How long a write already under way may take to finish once the session is told to stop.
const WRITE_GRACE: Duration = Duration::from_secs(1);

/// Which leg an event happened on (`Side` of the design).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The device (or app) leg.
    Device,
    /// The upstream (cloud) leg.
    Cloud,
}

impl Side {
    fn label(self) -> &'static str {
        match self {
            Self::Device => "device",
            Self::Cloud => "cloud",
        }
    }
}

/// How a pump ended.
#[derive(Debug)]
enum PumpEnd {
    /// The reader reached end of stream; the writer was shut down.
    Eof,
    /// Stopped from outside.
    Stopped,
    /// Reading failed.
    ReadError(io::Error),
    /// Writing failed.
    WriteError(io::Error),
}

/// Why a relayed session ended (label of `cync_mitm_connections_closed_total`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// Both sides closed; `first` closed first.
    Closed {
        /// Who closed first.
        first: Side,
    },
    /// No bytes either way for the idle timeout.
    Idle,
    /// Closed from outside.
    External(Cause),
    /// A read or write failed on `side`.
    Error {
        /// Where.
        side: Side,
        /// What.
        message: String,
    },
}

impl CloseReason {
    /// Metrics label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Closed {
                first: Side::Device,
            } => "device_closed",
            Self::Closed { first: Side::Cloud } => "cloud_closed",
            Self::Idle => "idle",
            Self::External(c) => c.label(),
            Self::Error {
                side: Side::Device, ..
            } => "device_error",
            Self::Error {
                side: Side::Cloud, ..
            } => "cloud_error",
        }
    }
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Error { side, message } => write!(f, "{} error: {message}", side.label()),
            other => f.write_str(other.label()),
        }
    }
}

/// Resets and aborts are how devices hang up: they count as a close, not an error.
fn is_close(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
    )
}

struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let now = self.start.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

async fn pump(
    mut from: ReadHalf<Box<dyn Io>>,
    mut to: WriteHalf<Box<dyn Io>>,
    tap: &mut DirectionTap,
    stop: &CancellationToken,
    activity: &Activity,
) -> PumpEnd {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = tokio::select! {
            biased;
            _ = stop.cancelled() => return PumpEnd::Stopped,
            r = from.read(&mut buf) => match r {
                Ok(0) => {
                    let _ = to.shutdown().await;
                    return PumpEnd::Eof;
                }
                Ok(n) => n,
                Err(e) => return PumpEnd::ReadError(e),
            },
        };
        activity.touch();
        let chunk = &buf[..n];
        // A chunk that was read is written whole: stopping waits for the write to finish, for at
        // most WRITE_GRACE (a peer that does not read cannot hold the session open).
        let written = tokio::select! {
            r = async {
                to.write_all(chunk).await?;
                to.flush().await
            } => r,
            _ = async {
                stop.cancelled().await;
                tokio::time::sleep(WRITE_GRACE).await;
            } => return PumpEnd::Stopped,
        };
        if let Err(e) = written {
            return PumpEnd::WriteError(e);
        }
        tap.on_chunk(chunk);
    }
}

fn end_reason(end: &PumpEnd, reader: Side) -> Option<CloseReason> {
    let writer = match reader {
        Side::Device => Side::Cloud,
        Side::Cloud => Side::Device,
    };
    match end {
        PumpEnd::Eof | PumpEnd::Stopped => None,
        PumpEnd::ReadError(e) if is_close(e) => Some(CloseReason::Closed { first: reader }),
        PumpEnd::WriteError(e) if is_close(e) => Some(CloseReason::Closed { first: writer }),
        PumpEnd::ReadError(e) => Some(CloseReason::Error {
            side: reader,
            message: e.to_string(),
        }),
        PumpEnd::WriteError(e) => Some(CloseReason::Error {
            side: writer,
            message: e.to_string(),
        }),
    }
}

/// Relays until both directions have ended, or something ends the session.
pub async fn run(
    device: Box<dyn Io>,
    upstream: Box<dyn Io>,
    d2c: &mut DirectionTap,
    c2d: &mut DirectionTap,
    control: &SessionControl,
    idle: Duration,
) -> CloseReason {
    let (dr, dw) = tokio::io::split(device);
    let (ur, uw) = tokio::io::split(upstream);
    let stop = control.token().child_token();
    let activity = Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
    };
    let up = pump(dr, uw, d2c, &stop, &activity);
    let down = pump(ur, dw, c2d, &stop, &activity);
    tokio::pin!(up, down);
    let (mut up_end, mut down_end): (Option<PumpEnd>, Option<PumpEnd>) = (None, None);
    let mut reason: Option<CloseReason> = None;
    let mut first_eof: Option<Side> = None;
    let tick = (idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(5));
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while up_end.is_none() || down_end.is_none() {
        tokio::select! {
            e = &mut up, if up_end.is_none() => {
                if reason.is_none() {
                    reason = end_reason(&e, Side::Device);
                }
                if matches!(e, PumpEnd::Eof) && first_eof.is_none() {
                    first_eof = Some(Side::Device);
                    tracing::debug!("device half-closed");
                }
                if reason.is_some() { stop.cancel(); }
                up_end = Some(e);
            }
            e = &mut down, if down_end.is_none() => {
                if reason.is_none() {
                    reason = end_reason(&e, Side::Cloud);
                }
                if matches!(e, PumpEnd::Eof) && first_eof.is_none() {
                    first_eof = Some(Side::Cloud);
                    tracing::debug!("cloud half-closed");
                }
                if reason.is_some() { stop.cancel(); }
                down_end = Some(e);
            }
            _ = ticker.tick() => {
                if reason.is_none() && activity.idle_for() >= idle {
                    reason = Some(CloseReason::Idle);
                    stop.cancel();
                }
            }
        }
    }
    if let Some(r) = reason {
        return r;
    }
    if control.token().is_cancelled() {
        return CloseReason::External(control.cause());
    }
    CloseReason::Closed {
        first: first_eof.unwrap_or(Side::Device),
    }
}
