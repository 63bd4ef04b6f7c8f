//! Counters and latency percentiles the simulators report.

use hdrhistogram::Histogram;
use serde::Serialize;
use std::sync::Mutex;
use std::time::Duration;

/// A latency histogram (microseconds, 1 µs to 60 s, 3 significant digits).
pub struct Latency {
    h: Mutex<Histogram<u64>>,
}

impl Default for Latency {
    fn default() -> Self {
        Self {
            // Constant, valid bounds: this cannot fail.
            h: Mutex::new(match Histogram::new_with_bounds(1, 60_000_000, 3) {
                Ok(h) => h,
                Err(e) => panic!("histogram bounds: {e}"),
            }),
        }
    }
}

/// Percentiles of a [`Latency`], in milliseconds.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct LatencySummary {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

impl Latency {
    /// Records one sample.
    pub fn record(&self, d: Duration) {
        let us = (d.as_micros() as u64).clamp(1, 60_000_000);
        let mut h = self.h.lock().unwrap_or_else(|p| p.into_inner());
        let _ = h.record(us);
    }

    /// Percentiles so far.
    pub fn summary(&self) -> LatencySummary {
        let h = self.h.lock().unwrap_or_else(|p| p.into_inner());
        let ms = |v: u64| v as f64 / 1000.0;
        LatencySummary {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.5)),
            p90_ms: ms(h.value_at_quantile(0.9)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
        }
    }

    /// Forgets every sample.
    pub fn reset(&self) {
        self.h.lock().unwrap_or_else(|p| p.into_inner()).reset();
    }
}
