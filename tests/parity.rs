//! Parity in shadow mode: the cloud's answers compared with the mirrored backend's, over
//! loopback with simulated devices, a simulated cloud and a simulated backend that drifts,
//! and an A/A run (the mirror is a second connection to the cloud) that must report nothing.

mod common;

use common::harness::*;
use cync_mitm::sim::cloud::CloudSimConfig;
use std::os::unix::fs::PermissionsExt as _;
use std::sync::atomic::Ordering;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

fn shadow(
    legacy: std::net::SocketAddr,
    new: std::net::SocketAddr,
    dir: &std::path::Path,
) -> cync_mitm::config::Config {
    let mut cfg = proxy_config(legacy);
    cfg.new_path.addresses = vec![new.to_string()];
    cfg.new_path.ca_file = Some(certs().ca_cert.clone());
    cfg.new_path.sni = Some("cm.gelighting.com".into());
    cfg.routing.mode = cync_mitm::route::Mode::Shadow;
    cfg.routing.canary_percent = 100.0;
    cfg.parity.dir = dir.to_owned();
    cfg.parity.timeout = Duration::from_secs(1);
    cfg
}

fn drifts(p: &RunningProxy, reason: &str) -> u64 {
    cync_mitm::parity::hub::REQUEST_TYPES
        .iter()
        .map(|t| {
            p.metrics
                .parity
                .drifts
                .with_label_values(&[t.name(), reason])
                .get()
        })
        .sum()
}

fn matches(p: &RunningProxy) -> u64 {
    cync_mitm::parity::hub::REQUEST_TYPES
        .iter()
        .map(|t| {
            p.metrics
                .parity
                .matches
                .with_label_values(&[t.name()])
                .get()
        })
        .sum()
}

fn log_lines(dir: &std::path::Path) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        assert!(
            name.starts_with("drift-") && name.ends_with(".jsonl") && name.len() == 20,
            "{name}"
        );
        let mode = e.metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{name}");
        for l in std::fs::read_to_string(e.path()).unwrap().lines() {
            out.push(serde_json::from_str(l).unwrap());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_alters_or_drops_one_percent_of_answers_is_caught_and_logged() {
    let dir = tempfile::tempdir().unwrap();
    let (legacy, legacy_addr) = start_cloud(CloudSimConfig::default()).await;
    let (backend, new_addr) = start_cloud(CloudSimConfig {
        drift: 0.01,
        drop_answers: 0.01,
        ..CloudSimConfig::default()
    })
    .await;
    let p = start_proxy(shadow(legacy_addr, new_addr, dir.path())).await;
    let mut fc = fleet_config(p.addr, 100);
    fc.heartbeat = Duration::from_millis(200);
    let fleet = start_fleet(fc);
    assert!(wait_until(T, || fleet.stats().online.load(Ordering::Relaxed) == 100).await);
    // Enough answers for several altered and dropped ones.
    assert!(
        wait_until(T, || {
            backend.stats().answers_altered.load(Ordering::Relaxed) >= 2
                && backend.stats().answers_dropped.load(Ordering::Relaxed) >= 20
        })
        .await,
        "altered {} dropped {}",
        backend.stats().answers_altered.load(Ordering::Relaxed),
        backend.stats().answers_dropped.load(Ordering::Relaxed)
    );
    // Quiet (the connections stay up), so every request is judged.
    fleet.set_heartbeats(false);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Every altered answer is a content drift, every dropped one a missing_new (judged at
    // the timeout), and nothing else drifts.
    let altered = backend.stats().answers_altered.load(Ordering::Relaxed);
    let dropped = backend.stats().answers_dropped.load(Ordering::Relaxed);
    assert!(
        wait_until(T, || drifts(&p, "content") == altered
            && drifts(&p, "missing_new") == dropped)
        .await,
        "content {} of {altered}, missing_new {} of {dropped}",
        drifts(&p, "content"),
        drifts(&p, "missing_new")
    );
    assert_eq!(drifts(&p, "missing_legacy"), 0);
    assert_eq!(
        p.metrics.transport.mirror_dropped.get(),
        0,
        "every frame was mirrored"
    );
    let m = matches(&p);
    assert!(m > 1000, "matches {m}");
    // The drift log names the frames: one line per drift, both answers in hex and decoded.
    assert!(
        wait_until(T, || log_lines(dir.path()).len() as u64
            == altered + dropped)
        .await,
        "{} lines for {} drifts",
        log_lines(dir.path()).len(),
        altered + dropped
    );
    let lines = log_lines(dir.path());
    let content: Vec<_> = lines.iter().filter(|l| l["reason"] == "content").collect();
    assert_eq!(content.len() as u64, altered);
    for l in &content {
        assert!(l["type"] == "sync" || l["type"] == "time_request", "{l}");
        assert_ne!(l["legacy"]["hex"], l["new"]["hex"], "{l}");
        assert!(l["legacy"]["decoded"]["name"].is_string(), "{l}");
        assert!(l["request"]["hex"].is_string(), "{l}");
        assert_eq!(l["device"].as_str().unwrap().len(), 8, "{l}");
        assert!(l["detail"].as_str().unwrap().len() > 3, "{l}");
        assert!(l["legacy"]["latency_ms"].is_number(), "{l}");
    }
    for l in lines.iter().filter(|l| l["reason"] == "missing_new") {
        assert!(l["new"].is_null(), "{l}");
        assert!(l["legacy"]["hex"].is_string(), "{l}");
    }
    // GET /parity (through the admin server's router): ratios per type, the most drifting
    // devices, the latest drifts.
    let (status, r) = admin_call(&p, hyper::Method::GET, "/parity").await;
    assert_eq!(status, 200);
    assert_eq!(r["settings"]["mode"], "shadow");
    assert_eq!(r["settings"]["timeout_ms"], 1000);
    let (status, _) = admin_call(&p, hyper::Method::POST, "/parity").await;
    assert_eq!(status, 405);
    assert_eq!(r["drifts"].as_u64().unwrap(), altered + dropped);
    assert_eq!(r["matches"].as_u64().unwrap(), m);
    assert!(r["parity_ratio"].as_f64().unwrap() < 1.0);
    assert!(r["parity_ratio"].as_f64().unwrap() > 0.9);
    assert!(!r["top_devices"].as_array().unwrap().is_empty(), "{r}");
    assert!(!r["recent_drifts"].as_array().unwrap().is_empty(), "{r}");
    assert!(r["types"]["ping"]["matches"].as_u64().unwrap() > 0, "{r}");
    assert!(
        r["types"]["ping"]["latency_ms"]["legacy_mean"].is_number(),
        "{r}"
    );
    fleet.stop().await;
    legacy.stop().await;
    backend.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_a_a_run_reports_no_drift_over_5000_answers() {
    let dir = tempfile::tempdir().unwrap();
    let (legacy, legacy_addr) = start_cloud(CloudSimConfig::default()).await;
    // No new backend at all: the mirror is a second connection to the cloud.
    let mut cfg = shadow(legacy_addr, legacy_addr, dir.path());
    cfg.new_path.addresses.clear();
    cfg.parity.mirror_to = cync_mitm::config::MirrorTo::Legacy;
    let p = start_proxy(cfg).await;
    let mut fc = fleet_config(p.addr, 20);
    fc.heartbeat = Duration::from_millis(20);
    let fleet = start_fleet(fc);
    assert!(wait_until(T, || fleet.stats().online.load(Ordering::Relaxed) == 20).await);
    assert!(
        wait_until(Duration::from_secs(60), || matches(&p) >= 5000).await,
        "matches {}",
        matches(&p)
    );
    fleet.stop().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Each device connected twice: itself and its mirror.
    assert_eq!(legacy.stats().handshakes.load(Ordering::Relaxed), 40);
    for r in ["content", "missing_new", "missing_legacy"] {
        assert_eq!(drifts(&p, r), 0, "{r}: {}", p.proxy.parity_report());
    }
    // The time answers (their clocks may differ by a second) matched under the rule.
    assert_eq!(
        p.metrics
            .parity
            .matches
            .with_label_values(&["time_request"])
            .get(),
        20
    );
    assert!(log_lines(dir.path()).is_empty());
    legacy.stop().await;
}
