//! Reload latency: time from writing the config file (write + rename, as editors do) to the new
//! generation being the one in use, through the real file watcher. 20 reloads; prints median and
//! max. Run: `cargo bench --bench reload` (BENCH_RELOADS sets the count).

use cync_mitm::config::Config;
use cync_mitm::metrics::Metrics;
use cync_mitm::reload::{LiveConfig, watch_file};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let n: usize = std::env::var("BENCH_RELOADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cync-mitm.toml");
    let write = |pct: usize| {
        let tmp = file.with_extension("tmp");
        std::fs::write(
            &tmp,
            format!("# bench\n[routing]\ncanary_percent = {pct}\n"),
        )
        .unwrap();
        std::fs::rename(&tmp, &file).unwrap();
    };
    write(0);
    let metrics = Arc::new(Metrics::new(false));
    let live = LiveConfig::new(
        Config::load(&file).unwrap(),
        Some(file.clone()),
        metrics,
        |_| None,
    )
    .unwrap();
    let debounce = std::env::var("BENCH_DEBOUNCE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(Config::default().reload.debounce, Duration::from_millis);
    let _w = watch_file(live.clone(), debounce).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let mut times = Vec::with_capacity(n);
    for i in 1..=n {
        let want = live.current().generation + 1;
        let t0 = Instant::now();
        write(i);
        while live.current().generation < want {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "reload {i} not seen"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        times.push(t0.elapsed());
        std::thread::sleep(Duration::from_millis(100));
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "file write -> new generation in use, {n} reloads (debounce {:?}): median {:.1} ms, max {:.1} ms, min {:.1} ms",
        debounce,
        ms(times[n / 2]),
        ms(times[n - 1]),
        ms(times[0])
    );
}
