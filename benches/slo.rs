//! The SLO engine's figures, each against a baseline in the same run:
//!
//! 1. Time to roll back with the default settings (`slo.eval_interval` 10 s, `min_events` 100,
//!    `max_violations` 3): the release binary, 100 devices on the new path (`new_primary`,
//!    100 %) pinging every 21 s like real ones, a new backend that starts leaving half its
//!    answers unsent; seconds from its first unsent answer to `tcp_comm_canary_percentage` 0,
//!    and that as a number of evaluation intervals.
//! 2. The cost of one evaluation (read the counters, evaluate 14 series over full 30-day
//!    windows, run the controller, build the decision line) with 1,000 devices' per-device
//!    series in the registry, ÷ the cost of one Prometheus scrape of that registry.
//! 3. The state file after 30 simulated days of 10 s ticks: its size, and the time to write and
//!    read it ÷ one evaluation.
//!
//! Run: `cargo bench --bench slo`. BENCH_ONLY=2,3 picks sections; BENCH_WARM_SECS (60) is the
//! healthy time before the fault; BENCH_DEVICES (100).

mod common;

use common::*;
use cync_mitm::metrics::Metrics;
use cync_mitm::route::Path as Transport;
use cync_mitm::sim::cloud::CloudSimConfig;
use cync_mitm::slo::Counts;
use cync_mitm::slo::control::{self, Control};
use cync_mitm::slo::sli::{Engine, Sli};
use std::time::{Duration, Instant};

const DAY: u64 = 86_400;

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let run = |n: &str| only.is_empty() || only.split(',').any(|x| x.trim() == n);
    if run("1") {
        rollback_time();
    }
    let eval_us = if run("2") || run("3") {
        Some(eval_cost())
    } else {
        None
    };
    if run("3") {
        state_size(eval_us.unwrap_or(1.0));
    }
}

fn rollback_time() {
    let devices = env_num("BENCH_DEVICES", 100) as u32;
    let warm = env_num("BENCH_WARM_SECS", 60);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let certs = cync_mitm::tls::init_certs(&d.join("certs"), false).unwrap();
        let (_cloud, caddr) = cloud(&certs, None).await;
        let (backend, baddr) = cloud_with(&certs, CloudSimConfig::default()).await;
        let p = ProxyProc::start_with(
            d,
            caddr,
            &format!(
                "[new_path]\naddresses = [\"{baddr}\"]\nca_file = \"{}\"\nsni = \"cm.gelighting.com\"\n\
                 [routing]\nmode = \"new_primary\"\ncanary_percent = 100\n",
                certs.ca_cert.display()
            ),
        );
        let f = fleet(p.addr, devices, Duration::from_secs(21), Duration::from_secs(2));
        tokio::time::sleep(Duration::from_secs(warm)).await;
        assert_eq!(p.metric("cync_mitm_rollback_override"), 0.0, "rolled back while healthy");
        let answered = p.metric("tcp_comm_packet_latency_seconds_count");
        backend.set_drop_answers(0.5);
        let stats = backend.stats().clone();
        // The clock starts at the first answer left unsent.
        let first = loop {
            if stats.answers_dropped.load(std::sync::atomic::Ordering::Relaxed) > 0 {
                break Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let end = first + Duration::from_secs(600);
        while p.metric("tcp_comm_canary_percentage") != 0.0 && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let secs = first.elapsed().as_secs_f64();
        let evals = p.metric("cync_mitm_slo_evaluations_total");
        println!(
            "rollback with defaults: {secs:.1} s from the first unsent answer to canary 0 % \
             = {:.2} evaluation intervals of 10 s ({devices} devices pinging every 21 s, \
             {answered} events before the fault, {evals} evaluations in all)",
            secs / 10.0
        );
        f.stop().await;
        p.stop();
    });
}

/// A registry with `devices` devices' per-device series and some traffic on both paths.
fn registry(devices: u32) -> Metrics {
    let m = Metrics::with_device_limit(true, devices as usize);
    for i in 0..devices {
        let id = format!("{:08x}", 0x1000_0000 + i);
        for (path, flow) in [
            (Transport::Legacy, cync_mitm::metrics::Flow::DeviceToCloud),
            (Transport::New, cync_mitm::metrics::Flow::CloudToDevice),
        ] {
            m.add_frame(path, flow, cync_mitm::codec::PacketType::PING, Some(&id));
        }
    }
    assert_eq!(m.device_series(), devices as usize);
    m
}

/// An engine holding 30 days of ticks every 10 s on every series, and its last `now`.
fn thirty_days() -> (Engine, u64) {
    let mut e = Engine::default();
    let start = 1_800_000_000u64;
    let mut c = Counts::default();
    let mut now = start;
    while now < start + 30 * DAY {
        c.good += 50;
        c.bad += u64::from(now.is_multiple_of(7));
        for t in [Transport::Legacy, Transport::New] {
            for s in Sli::ALL {
                e.observe(now, t, s, c);
            }
        }
        now += 10;
    }
    (e, now)
}

/// µs per evaluation.
fn eval_cost() -> f64 {
    let m = registry(1000);
    let (mut engine, mut now) = thirty_days();
    let cfg = cync_mitm::config::SloConfig::default();
    let mut control = Control::default();
    let n = 2000;
    let t = Instant::now();
    for _ in 0..n {
        now += 10;
        engine.observe_metrics(now, &m, cync_mitm::slo::sli::Thresholds::default());
        let evals = engine.evaluate(now, |s| cfg.objective(s), cfg.min_events);
        let d = control::tick(
            &mut control,
            &control::Inputs {
                now,
                evals: &evals,
                max_violations: 3,
                rollout: None,
                gates: &Sli::ALL,
            },
        );
        std::hint::black_box(serde_json::to_string(&(&evals, &d)).unwrap());
    }
    let tick = t.elapsed().as_secs_f64() * 1e6 / f64::from(n);
    let t = Instant::now();
    let scrapes = 200;
    for _ in 0..scrapes {
        std::hint::black_box(m.render());
    }
    let scrape = t.elapsed().as_secs_f64() * 1e6 / f64::from(scrapes);
    println!(
        "evaluation with 1,000 devices' series and full 30-day windows: {tick:.0} µs per tick \
         = {} one /metrics scrape ({scrape:.0} µs); {:.4} % of one core at the 10 s interval",
        ratio(tick, scrape),
        tick / 10e6 * 100.0
    );
    tick
}

fn state_size(eval_us: f64) {
    let (engine, _) = thirty_days();
    let state = cync_mitm::slo::State {
        engine,
        control: Control::default(),
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("state.json");
    let t = Instant::now();
    cync_mitm::proxy::save_slo_state(&file, &state).unwrap();
    let write = t.elapsed().as_secs_f64() * 1e6;
    let t = Instant::now();
    let back: cync_mitm::slo::State =
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let read = t.elapsed().as_secs_f64() * 1e6;
    assert_eq!(back, state, "the state file round-trips");
    let bytes = std::fs::metadata(&file).unwrap().len();
    println!(
        "state file after 30 simulated days (14 series, 10 s ticks): {:.0} KiB, {} buckets; \
         write {:.1} ms = {} an evaluation, read {:.1} ms = {}",
        bytes as f64 / 1024.0,
        state.engine.buckets(),
        write / 1000.0,
        ratio(write, eval_us),
        read / 1000.0,
        ratio(read, eval_us)
    );
}
