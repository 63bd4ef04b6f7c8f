//! The new path's costs and gains, each as a ratio within one run (the release binary as a
//! separate process, simulators on loopback):
//!
//! 1. Primary-path latency with the dark-launch mirror on (shadow at 100 %, a healthy backend)
//!    ÷ off (legacy_only): 100 devices, a cloud command to each every 20 ms.
//! 2. Primary throughput at saturation (devices pinging as fast as they are answered) with a
//!    mirror whose backend stops reading ÷ with no mirror, and ÷ with a healthy mirror; then
//!    the proxy's RSS while that stalled mirror runs at full rate for 60 s.
//! 3. Command success on legacy vs new in the same run: canary 50 % under `new_primary`,
//!    devices ignoring 1 % of commands, the new backend restarting every 30 s.
//! 4. The legacy observer's cost per frame (in process): decode + observe ÷ decode.
//!
//! Run: `cargo bench --bench mirror`. BENCH_SECS (10) is each window, BENCH_STALL_SECS (60) the
//! stalled run, BENCH_RESTART_SECS (65) the reliability run, BENCH_DEVICES (100) the fleet.

mod common;

use common::*;
use cync_mitm::sim::cloud::CloudSimConfig;
use cync_mitm::sim::devices::{ClientTls, Fleet, FleetConfig};
use cync_mitm::tls::{ClientProfile, LegacyClient};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn shadow_cfg(dir: &Path, backend: SocketAddr, mode: &str, pct: u32) -> String {
    format!(
        "[new_path]\naddresses = [\"{backend}\"]\nca_file = \"{}\"\nsni = \"cm.gelighting.com\"\n\
         [routing]\nmode = \"{mode}\"\ncanary_percent = {pct}\n\
         [parity]\ndir = \"{}\"\n",
        dir.join("certs/ca.pem").display(),
        dir.join("parity").display()
    )
}

/// Requests answered per second with every device pinging as fast as it is answered (a
/// heartbeat of 1 ms, at most one ping in flight per tick), over `secs`.
async fn saturate(target: SocketAddr, devices: u32, secs: u64) -> (f64, std::sync::Arc<Fleet>) {
    let f = fleet(
        target,
        devices,
        Duration::from_millis(1),
        Duration::from_secs(1),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while f.stats().online.load(Ordering::Relaxed) < u64::from(devices) && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let a0 = f.stats().answered.load(Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let rate =
        (f.stats().answered.load(Ordering::Relaxed) - a0) as f64 / t0.elapsed().as_secs_f64();
    (rate, f)
}

fn observer_cost() -> (f64, f64) {
    use bytes::Bytes;
    use cync_mitm::codec::Frame;
    use cync_mitm::transport::{Core, Role, Settings};
    let ping = Bytes::from(Frame::ping().encode().unwrap());
    let pong = Bytes::from(Frame::pong().encode().unwrap());
    let n = 1_000_000u32;
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(Frame::decode(&ping).ok());
        std::hint::black_box(Frame::decode(&pong).ok());
    }
    let decode = t.elapsed().as_nanos() as f64 / f64::from(n * 2);
    let mut core = Core::new(Settings::default(), Role::Observe, 1);
    let now = std::time::Instant::now();
    let t = Instant::now();
    for _ in 0..n {
        let f = Frame::decode(&ping).ok();
        std::hint::black_box(core.on_device_parsed(now, ping.clone(), f.as_ref()));
        let f = Frame::decode(&pong).ok();
        std::hint::black_box(core.on_backend_parsed(now, pong.clone(), f.as_ref()));
    }
    let observed = t.elapsed().as_nanos() as f64 / f64::from(n * 2);
    (decode, observed)
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let secs = env_num("BENCH_SECS", 10);
    let stall_secs = env_num("BENCH_STALL_SECS", 60);
    let restart_secs = env_num("BENCH_RESTART_SECS", 65);
    let devices = env_num("BENCH_DEVICES", 100) as u32;
    // BENCH_ONLY=1,4 runs only those sections.
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let run = |n: &str| only.is_empty() || only.split(',').any(|x| x.trim() == n);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let certs = cync_mitm::tls::init_certs(&d.join("certs"), false).unwrap();
        let interval = Some(Duration::from_millis(20));

        // 1. Latency with the mirror off and on.
        if run("1") {
        // Alternating pairs (off, on, off, on, …): the machine's noise hits both alike; the
        // medians of the ratios are reported.
        let pairs = env_num("BENCH_PAIRS", 3).max(1);
        let (c, caddr) = cloud(&certs, interval).await;
        let (b, baddr) = cloud_with(&certs, CloudSimConfig::default()).await;
        let mut rows: Vec<[f64; 8]> = Vec::new();
        let (mut mirrored, mut matches, mut drifts) = (0.0, 0.0, 0.0);
        for _ in 0..pairs {
            let p = ProxyProc::start_with(d, caddr, &shadow_cfg(d, baddr, "legacy_only", 100));
            let off = measure(p.addr, &c, devices, secs).await;
            p.stop();
            let p = ProxyProc::start_with(d, caddr, &shadow_cfg(d, baddr, "shadow", 100));
            let on = measure(p.addr, &c, devices, secs).await;
            mirrored += p.metric("tcp_comm_packet_sent_total{outcome=\"sent\",transport=\"new\"}");
            matches += p.metric("tcp_comm_parity_matches_total");
            drifts += p.metric("tcp_comm_parity_drifts_total");
            p.stop();
            rows.push([
                off.command.p50_ms,
                on.command.p50_ms,
                off.command.p99_ms,
                on.command.p99_ms,
                off.answer.p50_ms,
                on.answer.p50_ms,
                off.answer.p99_ms,
                on.answer.p99_ms,
            ]);
        }
        c.stop().await;
        b.stop().await;
        let median = |mut v: Vec<f64>| {
            v.sort_by(|a, b| a.total_cmp(b));
            v[v.len() / 2]
        };
        println!("\n1. {devices} devices, a cloud command to each every 20 ms, {secs} s windows, {pairs} alternating pairs (same run)");
        println!("{:<30} {:>26} {:>26} {:>16}", "", "mirror off (each pair)", "mirror on (each pair)", "on÷off (median)");
        let names = ["command→ack p50 ms", "command→ack p99 ms", "device request→answer p50 ms", "device request→answer p99 ms"];
        for (k, name) in names.iter().enumerate() {
            let offs: Vec<f64> = rows.iter().map(|r| r[2 * k]).collect();
            let ons: Vec<f64> = rows.iter().map(|r| r[2 * k + 1]).collect();
            let ratios: Vec<f64> = rows.iter().map(|r| r[2 * k + 1] / r[2 * k].max(1e-9)).collect();
            let fmt = |v: &[f64]| v.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(" ");
            println!("{name:<30} {:>26} {:>26} {:>16.2}", fmt(&offs), fmt(&ons), median(ratios));
        }
        println!("   mirror: {mirrored} frames to the backend; parity {matches} matches, {drifts} drifts");
        }

        // 2. Saturation: no mirror, a healthy mirror, a stalled one.
        if run("2") {
        let sat_devices = (devices / 2).max(1);
        let (c, caddr) = cloud(&certs, None).await;
        let (b, baddr) = cloud_with(&certs, CloudSimConfig::default()).await;
        let p = ProxyProc::start_with(d, caddr, &shadow_cfg(d, baddr, "legacy_only", 100));
        let (none, f) = saturate(p.addr, sat_devices, secs).await;
        f.stop().await;
        p.stop();
        let p = ProxyProc::start_with(d, caddr, &shadow_cfg(d, baddr, "shadow", 100));
        let (healthy, f) = saturate(p.addr, sat_devices, secs).await;
        f.stop().await;
        p.stop();
        b.stop().await;
        let (b, baddr) = cloud_with(
            &certs,
            CloudSimConfig {
                stop_reading_after: Some(Duration::from_millis(500)),
                ..CloudSimConfig::default()
            },
        )
        .await;
        let p = ProxyProc::start_with(d, caddr, &shadow_cfg(d, baddr, "shadow", 100));
        let rss0 = p.rss_kib();
        let (stalled, f) = saturate(p.addr, sat_devices, secs).await;
        let mut samples = vec![(secs, p.rss_kib())];
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(stall_secs.saturating_sub(secs)) {
            tokio::time::sleep(Duration::from_secs(10)).await;
            samples.push((secs + t0.elapsed().as_secs(), p.rss_kib()));
        }
        let dropped = p.metric("tcp_comm_mirror_dropped_total");
        let queue_full = p.metric("tcp_comm_queue_full_total");
        f.stop().await;
        p.stop();
        c.stop().await;
        b.stop().await;
        println!("\n2. {sat_devices} devices pinging as fast as answered, {secs} s windows (same run)");
        println!("   answered/s: no mirror {none:.0}, healthy mirror {healthy:.0}, stalled mirror {stalled:.0}");
        println!(
            "   stalled ÷ no mirror {}, stalled ÷ healthy {}, healthy ÷ no mirror {}",
            ratio(stalled, none),
            ratio(stalled, healthy),
            ratio(healthy, none)
        );
        println!(
            "   RSS with the stalled mirror at full rate: {:.1} MiB at start, {}",
            rss0 as f64 / 1024.0,
            samples
                .iter()
                .map(|(t, r)| format!("{:.1} MiB at {t} s", *r as f64 / 1024.0))
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!("   frames the full mirror queues dropped: {dropped} (mirror queue) + {queue_full} (transport queues)");
        }

        // 3. Command success, legacy vs new, same run.
        if run("3") {
        let cmds = CloudSimConfig {
            command_interval: Some(Duration::from_millis(200)),
            ..CloudSimConfig::default()
        };
        let (c, caddr) = cloud_with(&certs, cmds.clone()).await;
        let (b, baddr) = cloud_with(
            &certs,
            CloudSimConfig {
                restart_every: Some(Duration::from_secs(30)),
                ..cmds
            },
        )
        .await;
        let p = ProxyProc::start_with(d, caddr, &shadow_cfg(d, baddr, "new_primary", 50));
        let f = Fleet::start(
            FleetConfig {
                count: devices,
                target: p.addr,
                seed: 9,
                heartbeat: Duration::from_secs(5),
                ramp: Duration::from_secs(1),
                ignore_commands: 0.01,
                ..FleetConfig::default()
            },
            ClientTls::Tls(LegacyClient::new(ClientProfile::DeviceFp2).unwrap()),
        );
        tokio::time::sleep(Duration::from_secs(restart_secs)).await;
        let get = |t: &str, m: &str| p.metric(&format!("{m}{{transport=\"{t}\"}}"));
        let acked = |t: &str| {
            p.metric(&format!(
                "tcp_comm_ack_received_total{{outcome=\"first_try\",transport=\"{t}\"}}"
            )) + p.metric(&format!(
                "tcp_comm_ack_received_total{{outcome=\"after_retry\",transport=\"{t}\"}}"
            ))
        };
        let (la, na) = (acked("legacy"), acked("new"));
        let (lt, nt) = (
            get("legacy", "tcp_comm_ack_timeout_total"),
            get("new", "tcp_comm_ack_timeout_total"),
        );
        let retx = p.metric("tcp_comm_packet_retransmit_total{reason=\"ack_timeout\",transport=\"new\"}");
        let new_sessions = p.metric("cync_mitm_sessions_active{transport=\"new\"}");
        let report = f.report();
        f.stop().await;
        p.stop();
        c.stop().await;
        b.stop().await;
        let pct = |a: f64, t: f64| if a + t > 0.0 { format!("{:.3} %", 100.0 * a / (a + t)) } else { "-".into() };
        println!("\n3. {devices} devices (canary 50 % new_primary), 1 % of commands ignored, backend restart every 30 s, {restart_secs} s");
        println!("   legacy: {la} acked, {lt} unanswered: {} success", pct(la, lt));
        println!("   new:    {na} acked, {nt} failed after retries ({retx} retransmissions): {} success", pct(na, nt));
        println!(
            "   {new_sessions} devices on the new path at the end; fleet: {} connects, {} disconnects, {} commands ignored",
            report.connects, report.disconnects, report.ignored
        );
        }
    });

    // 4. The legacy observer, per frame.
    if run("4") {
        let (decode, observed) = observer_cost();
        println!(
            "\n4. observer: decode {decode:.0} ns/frame, decode + observe {observed:.0} ns/frame ({} ×)",
            ratio(observed, decode)
        );
    }
}
