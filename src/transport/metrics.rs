//! The rollout plan's `tcp_comm_*` transport metrics, label `transport`. The new path feeds
//! them from its ReliableTransport events; every series exists from the start.

use super::core::Event;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

/// Transports with series from the start: the new path's ReliableTransport, and the legacy
/// path observed passively with the same definitions.
pub const TRANSPORTS: [&str; 2] = ["legacy", "new"];

/// The families.
#[derive(Clone)]
pub struct TransportMetrics {
    /// Frames handed to a leg: `sent`, or lost to a full queue (`queue_full`, `rejected`).
    pub packet_sent: IntCounterVec,
    /// Frames from the backend: `ok`, `duplicate` (a repeated command, not delivered),
    /// `suppressed` (kept from the device: shadow, or the answer to a replayed handshake).
    pub packet_recv: IntCounterVec,
    /// Commands the device answered: `first_try` or `after_retry`.
    pub ack_received: IntCounterVec,
    /// Commands that stayed unanswered after every retry.
    pub ack_timeout: IntCounterVec,
    /// Retransmissions, by reason.
    pub retransmit: IntCounterVec,
    /// Repeated commands not delivered again.
    pub idempotent_drop: IntCounterVec,
    /// Device frames waiting for the backend, all sessions.
    pub send_queue: IntGaugeVec,
    /// Backend commands waiting for the device, all sessions.
    pub recv_queue: IntGaugeVec,
    /// Frames dropped by a full queue, by queue.
    pub queue_full: IntCounterVec,
    /// Send to answer: `command` (backend → device ack), `request` (device → backend answer).
    pub latency: HistogramVec,
    /// Device requests the backend never answered.
    pub request_timeout: IntCounterVec,
    /// Device frames not copied to the mirror: its queue full, or the mirror just ended.
    pub mirror_dropped: prometheus::IntCounter,
    /// Backend frames of a mirror kept from the device, by packet type.
    pub shadow_suppressed: IntCounterVec,
    /// Mirrors running now (shadowed device sessions).
    pub mirrors: prometheus::IntGauge,
}

fn gauges(r: &Registry, name: &str, help: &str) -> IntGaugeVec {
    let v = IntGaugeVec::new(Opts::new(name, help), &["transport"])
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    r.register(Box::new(v.clone()))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    v
}

/// Bounds of `tcp_comm_packet_latency_seconds`, seconds.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.5, 5.0, 10.0,
];

impl TransportMetrics {
    /// Registers the families in `r`, with zero series for every known label value.
    pub fn register(r: &Registry) -> Self {
        let m = Self {
            packet_sent: crate::metrics::counter_vec(
                r,
                "tcp_comm_packet_sent_total",
                "Frames handed to a leg by the transport, by outcome.",
                &["transport", "outcome"],
            ),
            packet_recv: crate::metrics::counter_vec(
                r,
                "tcp_comm_packet_recv_total",
                "Frames received from the backend, by outcome.",
                &["transport", "outcome"],
            ),
            ack_received: crate::metrics::counter_vec(
                r,
                "tcp_comm_ack_received_total",
                "Commands the device answered, first try or after retries.",
                &["transport", "outcome"],
            ),
            ack_timeout: crate::metrics::counter_vec(
                r,
                "tcp_comm_ack_timeout_total",
                "Commands unanswered after every retry.",
                &["transport"],
            ),
            retransmit: crate::metrics::counter_vec(
                r,
                "tcp_comm_packet_retransmit_total",
                "Commands sent again, by reason.",
                &["transport", "reason"],
            ),
            idempotent_drop: crate::metrics::counter_vec(
                r,
                "tcp_comm_idempotent_drop_total",
                "Repeated backend commands not delivered to the device again.",
                &["transport"],
            ),
            send_queue: gauges(
                r,
                "tcp_comm_send_queue_size",
                "Device frames waiting for the backend, all sessions.",
            ),
            recv_queue: gauges(
                r,
                "tcp_comm_recv_queue_size",
                "Backend commands waiting for the device's answer, all sessions.",
            ),
            queue_full: crate::metrics::counter_vec(
                r,
                "tcp_comm_queue_full_total",
                "Frames dropped or refused by a full queue, by queue.",
                &["transport", "queue_type"],
            ),
            latency: {
                let buckets = LATENCY_BUCKETS.to_vec();
                let h = HistogramVec::new(
                    HistogramOpts::new(
                        "tcp_comm_packet_latency_seconds",
                        "Send to answer: command (to the device's ack) or request (to the backend's answer).",
                    )
                    .buckets(buckets),
                    &["transport", "kind"],
                )
                .unwrap_or_else(|e| panic!("tcp_comm_packet_latency_seconds: {e}"));
                r.register(Box::new(h.clone()))
                    .unwrap_or_else(|e| panic!("tcp_comm_packet_latency_seconds: {e}"));
                h
            },
            request_timeout: crate::metrics::counter_vec(
                r,
                "tcp_comm_request_timeout_total",
                "Device requests the backend did not answer within new_path.answer_timeout.",
                &["transport"],
            ),
            mirror_dropped: {
                let c = prometheus::IntCounter::new(
                    "tcp_comm_mirror_dropped_total",
                    "Device frames not copied to the dark-launch mirror (its queue full, or the mirror just ended).",
                )
                .unwrap_or_else(|e| panic!("tcp_comm_mirror_dropped_total: {e}"));
                r.register(Box::new(c.clone()))
                    .unwrap_or_else(|e| panic!("tcp_comm_mirror_dropped_total: {e}"));
                c
            },
            shadow_suppressed: crate::metrics::counter_vec(
                r,
                "tcp_comm_shadow_suppressed_total",
                "Frames the mirrored backend sent, kept from the device, by packet type.",
                &["type"],
            ),
            mirrors: {
                let g = prometheus::IntGauge::new(
                    "cync_mitm_mirrors_active",
                    "Dark-launch mirrors running (shadowed device sessions).",
                )
                .unwrap_or_else(|e| panic!("cync_mitm_mirrors_active: {e}"));
                r.register(Box::new(g.clone()))
                    .unwrap_or_else(|e| panic!("cync_mitm_mirrors_active: {e}"));
                g
            },
        };
        for p in crate::codec::PacketType::ALL_KNOWN {
            m.shadow_suppressed.with_label_values(&[p.name()]);
        }
        for t in TRANSPORTS {
            for o in ["sent", "queue_full", "rejected"] {
                m.packet_sent.with_label_values(&[t, o]);
            }
            for o in ["ok", "duplicate", "suppressed", "malformed"] {
                m.packet_recv.with_label_values(&[t, o]);
            }
            for o in ["first_try", "after_retry"] {
                m.ack_received.with_label_values(&[t, o]);
            }
            m.ack_timeout.with_label_values(&[t]);
            m.retransmit.with_label_values(&[t, "ack_timeout"]);
            m.idempotent_drop.with_label_values(&[t]);
            m.send_queue.with_label_values(&[t]);
            m.recv_queue.with_label_values(&[t]);
            for q in ["send", "recv"] {
                m.queue_full.with_label_values(&[t, q]);
            }
            for k in ["command", "request"] {
                m.latency.with_label_values(&[t, k]);
            }
            m.request_timeout.with_label_values(&[t]);
        }
        m
    }

    /// Counts one core event of a session on `transport`.
    pub fn record(&self, transport: &str, e: &Event) {
        match e {
            Event::RequestSent { .. } | Event::CommandSent { .. } | Event::BackendAccepted => {}
            Event::RequestAnswered { latency, .. } => {
                self.latency
                    .with_label_values(&[transport, "request"])
                    .observe(latency.as_secs_f64());
            }
            Event::RequestTimedOut { .. } => {
                self.request_timeout.with_label_values(&[transport]).inc();
            }
            Event::CommandRetransmitted { .. } => {
                self.retransmit
                    .with_label_values(&[transport, "ack_timeout"])
                    .inc();
            }
            Event::CommandAcked {
                latency, retries, ..
            } => {
                let o = if *retries == 0 {
                    "first_try"
                } else {
                    "after_retry"
                };
                self.ack_received.with_label_values(&[transport, o]).inc();
                self.latency
                    .with_label_values(&[transport, "command"])
                    .observe(latency.as_secs_f64());
            }
            Event::CommandFailed { .. } => {
                self.ack_timeout.with_label_values(&[transport]).inc();
            }
            Event::Duplicate { .. } => {
                self.idempotent_drop.with_label_values(&[transport]).inc();
                self.packet_recv
                    .with_label_values(&[transport, "duplicate"])
                    .inc();
            }
            Event::Suppressed { .. } => {
                self.packet_recv
                    .with_label_values(&[transport, "suppressed"])
                    .inc();
            }
            Event::QueueFull { queue, rejected } => {
                self.queue_full
                    .with_label_values(&[transport, queue.label()])
                    .inc();
                let o = if *rejected { "rejected" } else { "queue_full" };
                let _ = queue;
                self.packet_sent.with_label_values(&[transport, o]).inc();
            }
        }
    }
}
