//! Proxy benchmark harness (not criterion: it measures a whole system over loopback).
//!
//! 1. Throughput and latency: 100 simulated devices, the simulated cloud sending each a command
//!    every 20 ms (BENCH_INTERVAL_MS), first straight to the cloud, then through the proxy (the release binary, as a
//!    separate process). Reports frames/s and the command → ack and request → answer latency
//!    percentiles of both runs, and proxy ÷ direct ratios.
//!    A third run repeats it with capture on, and reports capture on ÷ off and the capture bytes
//!    written per relayed frame.
//! 2. Memory: the proxy's RSS with no connection and with 1,000 idle devices connected.
//!
//! Run: `cargo bench --bench proxy` (BENCH_SECS sets the measuring window, default 10 s;
//! BENCH_DEVICES and BENCH_IDLE_DEVICES the fleet sizes).

mod common;

use common::*;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --benches` / `--list`: nothing to list.
    }
    let secs = env_num("BENCH_SECS", 10);
    let devices = env_num("BENCH_DEVICES", 100) as u32;
    let idle_devices = env_num("BENCH_IDLE_DEVICES", 1000) as u32;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let certs = cync_mitm::tls::init_certs(&dir.path().join("certs"), false).unwrap();
        let interval_ms = env_num("BENCH_INTERVAL_MS", 20);
        let interval = Some(Duration::from_millis(interval_ms));

        let (c, caddr) = cloud(&certs, interval).await;
        let direct = measure(caddr, &c, devices, secs).await;
        c.stop().await;

        let (c, caddr) = cloud(&certs, interval).await;
        let p = ProxyProc::start(dir.path(), caddr, false);
        let proxied = measure(p.addr, &c, devices, secs).await;
        p.stop();
        c.stop().await;

        let (c, caddr) = cloud(&certs, interval).await;
        let p = ProxyProc::start(dir.path(), caddr, true);
        let captured = measure(p.addr, &c, devices, secs).await;
        let frames = p.metric("cync_mitm_frames_total");
        let written = p.metric("cync_mitm_capture_written_bytes_total");
        let dropped = p.metric("cync_mitm_capture_dropped_total{reason=\"queue_full\"}");
        p.stop();
        c.stop().await;

        println!("\n{devices} devices, a command to each every {interval_ms} ms, {secs} s window (same run)");
        println!(
            "{:<30} {:>11} {:>11} {:>11} {:>14} {:>16}",
            "", "direct", "proxy", "proxy+cap", "proxy÷direct", "capture on÷off"
        );
        let row = |name: &str, a: f64, b: f64, c: f64| {
            println!("{name:<30} {a:>11.1} {b:>11.1} {c:>11.1} {:>14} {:>16}", ratio(b, a), ratio(c, b))
        };
        row("frames/s (both ends)", direct.frames_per_s, proxied.frames_per_s, captured.frames_per_s);
        row("commands acked/s", direct.commands_per_s, proxied.commands_per_s, captured.commands_per_s);
        row("command→ack p50 ms", direct.command.p50_ms, proxied.command.p50_ms, captured.command.p50_ms);
        row("command→ack p99 ms", direct.command.p99_ms, proxied.command.p99_ms, captured.command.p99_ms);
        row("device request→answer p50 ms", direct.answer.p50_ms, proxied.answer.p50_ms, captured.answer.p50_ms);
        row("device request→answer p99 ms", direct.answer.p99_ms, proxied.answer.p99_ms, captured.answer.p99_ms);
        println!(
            "capture: {:.1} bytes written per relayed frame (both legs, pcapng), {dropped} chunks dropped",
            written / frames.max(1.0)
        );

        let (c, caddr) = cloud(&certs, None).await;
        let p = ProxyProc::start(dir.path(), caddr, false);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let base = p.rss_kib();
        let f = fleet(p.addr, idle_devices, Duration::from_secs(21), Duration::from_secs(5));
        let deadline = Instant::now() + Duration::from_secs(60);
        while f.stats().online.load(Ordering::Relaxed) < u64::from(idle_devices) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let online = f.stats().online.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let loaded = p.rss_kib();
        println!("\nproxy RSS: {:.1} MiB idle, {:.1} MiB with {online} idle devices connected ({:.1} KiB per device)",
            base as f64 / 1024.0, loaded as f64 / 1024.0,
            (loaded.saturating_sub(base)) as f64 / online.max(1) as f64);
        f.stop().await;
        p.stop();
        c.stop().await;
    });
}
