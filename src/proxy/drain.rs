//! An operator's drain (`POST /drain`, `cync-mitm drain`, a Kubernetes `preStop` hook): the
//! proxy stops accepting and closes its sessions at a bounded rate, so the devices reconnect
//! to the other replicas a few at a time instead of all at once when the process stops.
//!
//! A drain is one-way: the process is on its way out (restart it to serve again). `/readyz`
//! answers 503 from its start, so a load balancer stops sending connections here.

use super::{Cause, Proxy};
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// The highest drain rate asked for (devices closed per second).
pub const MAX_RATE: u32 = 100_000;

/// A drain under way (or finished).
#[derive(Debug)]
pub struct OperatorDrain {
    started: Instant,
    per_second: u32,
    /// Sessions asked to close so far.
    asked: AtomicU64,
}

impl Proxy {
    /// Begins a drain at `per_second` devices per second (clamped to 1..=[`MAX_RATE`]): stops
    /// accepting, then closes the identified device sessions in steps of a tenth of a second's
    /// worth. Sessions not yet identified close on their own (handshake or first-frame
    /// timeout). Returns false, changing nothing, when a drain was already begun.
    pub fn begin_drain(self: &Arc<Self>, per_second: u32) -> bool {
        let per_second = per_second.clamp(1, MAX_RATE);
        let mut fresh = false;
        let drain = self
            .operator_drain
            .get_or_init(|| {
                fresh = true;
                Arc::new(OperatorDrain {
                    started: Instant::now(),
                    per_second,
                    asked: AtomicU64::new(0),
                })
            })
            .clone();
        if !fresh {
            return false;
        }
        self.stop_accepting.cancel();
        self.metrics.draining.set(1);
        tracing::warn!(
            sessions = self.sessions(),
            devices = self.registry.len(),
            per_second,
            "drain: not accepting; closing sessions so the devices reconnect elsewhere"
        );
        let me = self.clone();
        tokio::spawn(async move { me.drain_sessions(drain).await });
        true
    }

    async fn drain_sessions(self: Arc<Self>, drain: Arc<OperatorDrain>) {
        let rate = drain.per_second;
        let batch = rate.div_ceil(10);
        let step = Duration::from_secs(1) * batch / rate;
        // Connections already asked (closing takes a moment; each is asked once). Bounded by
        // the sessions open at the start: nothing new is accepted.
        let mut asked: HashSet<Uuid> = HashSet::new();
        loop {
            if self.tracker.is_empty() {
                tracing::info!(
                    closed = drain.asked.load(Ordering::Relaxed),
                    took = ?drain.started.elapsed(),
                    "drain: every session closed"
                );
                return;
            }
            let mut n = 0;
            for (_, s) in self.registry.snapshot() {
                if n >= batch {
                    break;
                }
                if asked.insert(s.conn) {
                    s.control.close(Cause::Drained);
                    drain.asked.fetch_add(1, Ordering::Relaxed);
                    n += 1;
                }
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(step) => {}
            }
        }
    }

    /// Whether a drain was begun.
    pub fn is_draining(&self) -> bool {
        self.operator_drain.get().is_some()
    }

    /// The `GET /drain` document.
    pub fn drain_report(&self) -> serde_json::Value {
        let sessions = self.sessions();
        match self.operator_drain.get() {
            None => serde_json::json!({
                "draining": false,
                "sessions": sessions,
                "devices": self.registry.len(),
            }),
            Some(d) => serde_json::json!({
                "draining": true,
                "done": sessions == 0,
                "per_second": d.per_second,
                "since_s": (d.started.elapsed().as_millis() as f64 / 1000.0),
                "asked_to_close": d.asked.load(Ordering::Relaxed),
                "sessions": sessions,
                "devices": self.registry.len(),
            }),
        }
    }
}
