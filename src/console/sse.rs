//! `GET /api/events`: the decoded frames as Server-Sent Events.
//!
//! Each open stream is a task between the console's broadcast and the HTTP body: it filters,
//! batches what is waiting into one chunk, and hands it to the body through a small queue. The
//! task never waits for the page: when the browser (or its network) is slow the queue fills and
//! what comes meanwhile is lost, counted at once in
//! `cync_mitm_console_events_dropped_total{reason="slow_client"}` (as are events the broadcast
//! moved past, should the task itself fall behind), and the page is told with an
//! `event: dropped` message once there is room. The relay never waits for a stream.

use super::{Console, Filter};
use bytes::{Bytes, BytesMut};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

/// Chunks queued between a stream's task and its HTTP body.
const QUEUE: usize = 8;
/// Events batched into one chunk at most.
const BATCH: usize = 256;
/// Bytes batched into one chunk at most (a stalled page holds at most [`QUEUE`] of them).
const BATCH_BYTES: usize = 64 * 1024;

/// The HTTP body of one stream.
pub struct SseBody {
    rx: mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        self.rx
            .poll_recv(cx)
            .map(|c| c.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

/// Settings of one stream.
#[derive(Clone, Debug)]
pub struct StreamLimits {
    /// Streams open at once (this one included).
    pub max_streams: usize,
    /// Events per second across all streams.
    pub max_rate: u64,
    /// A comment is sent this often when nothing else is (keeps the admin idle timeout away).
    pub keepalive: Duration,
}

/// Holds a stream's slot and its filter's place among what is wanted; gives both back when
/// the stream's task ends.
struct Slot(Arc<Console>, u64);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.forget(self.1);
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.console_streams.dec();
    }
}

fn dropped_msg(n: u64) -> Bytes {
    Bytes::from(format!("event: dropped\ndata: {{\"dropped\":{n}}}\n\n"))
}

async fn send(tx: &mpsc::Sender<Bytes>, b: Bytes, stop: &CancellationToken) -> bool {
    tokio::select! {
        r = tx.send(b) => r.is_ok(),
        _ = stop.cancelled() => false,
    }
}

impl Console {
    /// Opens a stream of the events `filter` passes; `Err` when `max_streams` are open.
    pub fn open_stream(
        self: &Arc<Self>,
        filter: Filter,
        limits: &StreamLimits,
        stop: CancellationToken,
    ) -> Result<SseBody, usize> {
        let open = self.streams.fetch_add(1, Ordering::Relaxed) + 1;
        if open > limits.max_streams.max(1) {
            self.streams.fetch_sub(1, Ordering::Relaxed);
            return Err(open - 1);
        }
        self.metrics.console_streams.inc();
        let slot = Slot(self.clone(), self.want(filter.clone()));
        self.max_rate
            .store(limits.max_rate.max(1), Ordering::Relaxed);
        let mut events = self.tx.subscribe();
        let (tx, rx) = mpsc::channel(QUEUE);
        let keepalive = limits.keepalive.max(Duration::from_millis(100));
        let hello = format!(
            "retry: 2000\nevent: hello\ndata: {}\n\n",
            serde_json::json!({
                "streams": open,
                "max_events_per_second": limits.max_rate,
                "buffer": super::BUFFER,
                "filter": {
                    "devices": filter.devices.iter().map(|d| format!("{d:08x}")).collect::<Vec<_>>(),
                    "types": filter.types.iter().map(|t| format!("0x{t:02x}")).collect::<Vec<_>>(),
                },
            })
        );
        let console = self.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if !send(&tx, Bytes::from(hello), &stop).await {
                return;
            }
            let mut tick =
                tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // Events lost since the page was last told.
            let mut untold = 0u64;
            let slow = console
                .metrics
                .console_dropped
                .with_label_values(&["slow_client"]);
            loop {
                let first = tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tx.closed() => break,
                    _ = tick.tick() => {
                        // Losses not told yet are told now (a quiet filtered stream may see
                        // no other event for long); else a comment. A full queue already has
                        // something for the page.
                        let msg = if untold > 0 {
                            dropped_msg(untold)
                        } else {
                            Bytes::from_static(b": keepalive\n\n")
                        };
                        match tx.try_send(msg) {
                            Ok(()) => untold = 0,
                            Err(mpsc::error::TrySendError::Full(_)) => {}
                            Err(mpsc::error::TrySendError::Closed(_)) => break,
                        }
                        continue;
                    }
                    r = events.recv() => r,
                };
                let mut chunk = BytesMut::new();
                let mut kept = 0u64;
                let mut next = Some(first);
                let mut n = 0;
                while let Some(r) = next.take() {
                    match r {
                        Ok(e) => {
                            if filter.matches(&e) {
                                chunk.extend_from_slice(&e.sse);
                                kept += 1;
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(k)) => {
                            slow.inc_by(k);
                            untold += k;
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                    n += 1;
                    if n < BATCH && chunk.len() < BATCH_BYTES {
                        next = match events.try_recv() {
                            Ok(e) => Some(Ok(e)),
                            Err(broadcast::error::TryRecvError::Lagged(k)) => {
                                Some(Err(broadcast::error::RecvError::Lagged(k)))
                            }
                            Err(_) => None,
                        };
                    }
                }
                if kept == 0 && untold == 0 {
                    continue;
                }
                let mut out = BytesMut::new();
                if untold > 0 {
                    out.extend_from_slice(&dropped_msg(untold));
                }
                out.extend_from_slice(&chunk);
                // Never wait for the page: while its queue is full, what comes is lost
                // (counted now, told once there is room).
                match tx.try_send(out.freeze()) {
                    Ok(()) => {
                        untold = 0;
                        tick.reset();
                    }
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        slow.inc_by(kept);
                        untold += kept;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => break,
                }
            }
        });
        Ok(SseBody { rx })
    }
}

#[cfg(test)]
mod tests {
    use super::super::{BUFFER, Event};
    use super::*;
    use crate::metrics::Metrics;
    use http_body_util::BodyExt as _;

    fn limits(max_streams: usize) -> StreamLimits {
        StreamLimits {
            max_streams,
            max_rate: 1000,
            keepalive: Duration::from_secs(30),
        }
    }

    fn event(seq: u64) -> Arc<Event> {
        Arc::new(Event {
            seq,
            device: Some(7),
            ptype: 0xd3,
            sse: Bytes::from(format!("id: {seq}\ndata: {{\"seq\":{seq}}}\n\n")),
        })
    }

    /// Reads `body` until nothing comes for 200 ms.
    async fn drain(body: &mut SseBody) -> String {
        let mut text = String::new();
        while let Ok(Some(Ok(f))) =
            tokio::time::timeout(Duration::from_millis(200), body.frame()).await
        {
            if let Ok(d) = f.into_data() {
                text.push_str(&String::from_utf8_lossy(&d));
            }
        }
        text
    }

    #[tokio::test]
    async fn a_stream_that_falls_behind_loses_events_counts_them_and_says_so() {
        let m = Arc::new(Metrics::new(false));
        let c = Console::new(m.clone());
        let mut body = c
            .open_stream(Filter::default(), &limits(2), CancellationToken::new())
            .unwrap();
        // The stream's task has not run yet: three buffers' worth arrive before it reads.
        let total = 3 * BUFFER as u64;
        for i in 1..=total {
            c.tx.send(event(i)).unwrap();
        }
        let text = drain(&mut body).await;
        assert!(
            text.starts_with("retry: 2000\nevent: hello\n"),
            "{}",
            &text[..80]
        );
        let delivered = text.matches("\ndata: {\"seq\"").count() as u64;
        let dropped = m.console_dropped.with_label_values(&["slow_client"]).get();
        assert!(delivered > 0 && delivered <= BUFFER as u64, "{delivered}");
        assert!(dropped >= 2 * BUFFER as u64, "{dropped}");
        assert_eq!(
            dropped + delivered,
            total,
            "every event delivered or counted"
        );
        // The page is told of the losses.
        let told: u64 = text
            .split("event: dropped\ndata: {\"dropped\":")
            .skip(1)
            .filter_map(|t| t.split('}').next()?.parse::<u64>().ok())
            .sum();
        assert!(told > 0 && told <= dropped, "{told} told of {dropped}");
        // Ids only grow.
        let ids: Vec<u64> = text
            .lines()
            .filter_map(|l| l.strip_prefix("id: ")?.parse().ok())
            .collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
    }

    #[tokio::test]
    async fn streams_are_limited_and_a_closed_one_gives_its_slot_back() {
        let m = Arc::new(Metrics::new(false));
        let c = Console::new(m.clone());
        let stop = CancellationToken::new();
        let a = c
            .open_stream(Filter::default(), &limits(2), stop.clone())
            .unwrap();
        let _b = c
            .open_stream(Filter::default(), &limits(2), stop.clone())
            .unwrap();
        assert!(
            c.open_stream(Filter::default(), &limits(2), stop.clone())
                .is_err()
        );
        assert_eq!(m.console_streams.get(), 2);
        drop(a);
        // The task notices its body went away.
        for _ in 0..100 {
            if c.streams() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(c.streams(), 1);
        assert_eq!(m.console_streams.get(), 1);
        let mut d = c
            .open_stream(Filter::default(), &limits(2), stop.clone())
            .unwrap();
        // Shutdown ends every stream: the body finishes.
        stop.cancel();
        let end = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = d.frame().await {}
        })
        .await;
        assert!(end.is_ok(), "a stream outlived the shutdown");
    }

    #[tokio::test]
    async fn a_filtered_stream_gets_only_what_passes_and_keepalives_when_quiet() {
        let c = Console::new(Arc::new(Metrics::new(false)));
        let f = Filter::parse("type=0x83").unwrap();
        let mut body = c
            .open_stream(
                f,
                &StreamLimits {
                    keepalive: Duration::from_millis(100),
                    ..limits(1)
                },
                CancellationToken::new(),
            )
            .unwrap();
        c.tx.send(event(1)).unwrap();
        let text = tokio::time::timeout(Duration::from_millis(500), async {
            let mut t = String::new();
            while !t.contains(": keepalive") {
                if let Some(Ok(fr)) = body.frame().await
                    && let Ok(d) = fr.into_data()
                {
                    t.push_str(&String::from_utf8_lossy(&d));
                }
            }
            t
        })
        .await
        .expect("no keepalive");
        assert!(!text.contains("id: 1\n"), "{text}");
    }

    #[tokio::test]
    async fn a_chunk_holds_at_most_64_kib() {
        let c = Console::new(Arc::new(Metrics::new(false)));
        let mut body = c
            .open_stream(Filter::default(), &limits(1), CancellationToken::new())
            .unwrap();
        let big = |seq: u64| {
            Arc::new(Event {
                seq,
                device: Some(7),
                ptype: 0xd3,
                sse: Bytes::from(format!("id: {seq}\ndata: {}\n\n", "x".repeat(1000))),
            })
        };
        // 200 events of 1 KiB arrive before the task reads: under the 256-event batch limit.
        for i in 1..=200 {
            c.tx.send(big(i)).unwrap();
        }
        let mut sizes = Vec::new();
        while let Ok(Some(Ok(f))) =
            tokio::time::timeout(Duration::from_millis(200), body.frame()).await
        {
            if let Ok(d) = f.into_data() {
                sizes.push(d.len());
            }
        }
        assert!(sizes.len() >= 4, "{sizes:?}");
        assert!(sizes.iter().all(|n| *n <= BATCH_BYTES + 1100), "{sizes:?}");
        let total: usize = sizes.iter().sum();
        assert!(total > 200 * 1000, "every event delivered: {total}");
    }

    #[tokio::test]
    async fn losses_on_a_quiet_filtered_stream_are_told_at_the_next_keepalive() {
        let m = Arc::new(Metrics::new(false));
        let c = Console::new(m.clone());
        let mut body = c
            .open_stream(
                Filter::parse("type=0xd3").unwrap(),
                &StreamLimits {
                    keepalive: Duration::from_millis(100),
                    ..limits(1)
                },
                CancellationToken::new(),
            )
            .unwrap();
        // One event at a time, the page not reading: the queue (hello + 7) fills, the rest
        // are lost. Then nothing more passes the filter.
        for i in 1..=30 {
            c.tx.send(event(i)).unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let dropped = m.console_dropped.with_label_values(&["slow_client"]).get();
        assert!(dropped > 0, "nothing was lost");
        let text = tokio::time::timeout(Duration::from_secs(2), async {
            let mut t = String::new();
            while !t.contains("event: dropped") {
                if let Some(Ok(fr)) = body.frame().await
                    && let Ok(d) = fr.into_data()
                {
                    t.push_str(&String::from_utf8_lossy(&d));
                }
            }
            t
        })
        .await
        .expect("the losses were never told");
        let told: u64 = text
            .split("event: dropped\ndata: {\"dropped\":")
            .skip(1)
            .filter_map(|t| t.split('}').next()?.parse::<u64>().ok())
            .sum();
        assert_eq!(told, dropped);
    }
}
