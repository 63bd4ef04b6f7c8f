//! Decrypted pcapng captures judged by the real tshark: they open, each TCP stream carries exactly
//! the relayed bytes, checksums verify, there are no TCP analysis warnings, per-device files hold
//! only their device, rotation and retention work, and a full queue drops and counts without
//! touching the relay. `.ci/run` installs tshark; outside CI the tests skip when it is missing.

mod common;

use common::harness::*;
use common::tshark::{have_tshark, tshark};
use cync_mitm::capture::Capture;
use cync_mitm::config::Config;
use cync_mitm::metrics::Metrics;
use cync_mitm::proxy::{ListenerKind, Proxy};
use cync_mitm::reload::LiveConfig;
use cync_mitm::sim::cloud::CloudSimConfig;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

fn follow(file: &Path, n: usize) -> (Vec<u8>, Vec<u8>) {
    common::tshark::follow(file, "tcp", n, &[])
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for day in std::fs::read_dir(dir).unwrap().flatten() {
        for f in std::fs::read_dir(day.path()).unwrap().flatten() {
            v.push(f.path());
        }
    }
    v.sort();
    v
}

struct Setup {
    proxy: RunningProxy,
    capture: Arc<Capture>,
    metrics: Arc<Metrics>,
}

async fn start(cfg: Config) -> Setup {
    let metrics = Arc::new(Metrics::new(false));
    let live = LiveConfig::fixed(cfg, metrics.clone()).unwrap();
    let capture = Capture::start(live.clone(), metrics.clone()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let proxy = Proxy::new(live, certs(), metrics.clone(), vec![capture.clone()]).unwrap();
    let p = proxy.clone();
    tokio::spawn(async move { p.serve(listener, ListenerKind::Tls).await });
    Setup {
        proxy: RunningProxy {
            proxy,
            addr,
            metrics: metrics.clone(),
        },
        capture,
        metrics,
    }
}

fn redacted(mut sent: Vec<u8>) -> Vec<u8> {
    // The first frame is the 0x23 handshake: its 16-byte auth code sits at bytes 12..28.
    assert_eq!(sent[0], 0x23);
    for b in &mut sent[12..28] {
        *b = b'*';
    }
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_device_captures_are_exact_tcp_streams_in_tshark() {
    if !have_tshark() {
        return;
    }
    let (cloud, cloud_addr) = start_cloud(CloudSimConfig {
        command_interval: Some(Duration::from_millis(40)),
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = proxy_config(cloud_addr);
    cfg.capture.enabled = true;
    cfg.capture.dir = dir.path().to_owned();
    let s = start(cfg).await;
    let mut fc = fleet_config(s.proxy.addr, 3);
    fc.record = true;
    fc.heartbeat = Duration::from_millis(100);
    let fleet = start_fleet(fc);
    assert!(wait_until(T, || fleet.stats().commands.load(Ordering::Relaxed) >= 15).await);
    cloud.set_commands(false);
    tokio::time::sleep(Duration::from_millis(300)).await;
    fleet.stop().await;
    assert!(wait_until(T, || s.proxy.proxy.registry().is_empty()).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.capture.shutdown();
    assert_eq!(s.metrics.capture_dropped.get(), 0);

    let found = files(dir.path());
    assert_eq!(found.len(), 3, "{found:?}");
    let transcripts = fleet.stats().transcripts.lock().unwrap().clone();
    for id in fleet.ids() {
        let file = found
            .iter()
            .find(|f| f.file_name().unwrap().to_string_lossy() == format!("{id}.pcapng"))
            .unwrap();
        assert_eq!(
            std::fs::metadata(file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let t = &transcripts[&id][0];
        let want_c = redacted(t.sent.clone());
        for stream in [0, 1] {
            let (c, srv) = follow(file, stream);
            assert_eq!(c, want_c, "{id} stream {stream}: device→cloud bytes");
            // The last pong may be written after the device stopped reading.
            assert!(
                srv.len() >= t.received.len() && srv.len() - t.received.len() <= 5,
                "{id} stream {stream}"
            );
            assert_eq!(
                srv[..t.received.len()],
                t.received[..],
                "{id} stream {stream}: cloud→device bytes"
            );
        }
        let f = file.to_str().unwrap();
        let bad = tshark(&[
            "-r",
            f,
            "-o",
            "tcp.check_checksum:TRUE",
            "-o",
            "ip.check_checksum:TRUE",
            "-Y",
            "tcp.checksum.status == 0 || ip.checksum.status == 0",
        ]);
        assert!(bad.trim().is_empty(), "bad checksums:\n{bad}");
        let good = tshark(&[
            "-r",
            f,
            "-o",
            "tcp.check_checksum:TRUE",
            "-Y",
            "tcp.checksum.status == 1",
        ]);
        assert!(good.lines().count() > 20);
        let warn = tshark(&[
            "-r",
            f,
            "-Y",
            "tcp.analysis.flags && !tcp.analysis.window_update",
        ]);
        assert!(warn.trim().is_empty(), "TCP analysis warnings:\n{warn}");
        let comments = tshark(&["-r", f, "-T", "fields", "-e", "frame.comment"]);
        let mut n = 0;
        for line in comments.lines().filter(|l| !l.is_empty()) {
            assert!(line.contains(&format!("device={id}")), "{line}");
            n += 1;
        }
        assert!(n > 10, "{n} comments");
        assert!(
            comments.contains("0x23 handshake") && comments.contains("(auth redacted)"),
            "{comments}"
        );
        assert!(
            comments.contains("f8 d0") || comments.contains("f8 f0"),
            "commands are labelled"
        );
    }
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_retention_and_a_full_queue() {
    if !have_tshark() {
        return;
    }
    let (cloud, cloud_addr) = start_cloud(CloudSimConfig {
        command_interval: Some(Duration::from_millis(5)),
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = proxy_config(cloud_addr);
    cfg.capture.enabled = true;
    cfg.capture.dir = dir.path().to_owned();
    cfg.capture.max_file_bytes = 4096;
    cfg.capture.max_files = 3;
    let s = start(cfg.clone()).await;
    let fleet = start_fleet(fleet_config(s.proxy.addr, 1));
    assert!(wait_until(T, || s.metrics.capture_files.get() >= 6).await);
    fleet.stop().await;
    assert!(wait_until(T, || s.proxy.proxy.registry().is_empty()).await);
    s.capture.shutdown();
    let found = files(dir.path());
    assert!(found.len() <= 3, "{found:?}");
    assert!(s.metrics.capture_deleted.get() >= 3);
    for f in &found {
        tshark(&["-r", f.to_str().unwrap(), "-c", "1"]);
    }

    // A one-event queue under load: drops are counted, the relay does not notice.
    let dir2 = tempfile::tempdir().unwrap();
    cfg.capture.dir = dir2.path().to_owned();
    cfg.capture.max_file_bytes = 64 << 20;
    cfg.capture.queue = 1;
    let s2 = start(cfg).await;
    let fleet = start_fleet(fleet_config(s2.proxy.addr, 20));
    assert!(wait_until(T, || fleet.stats().commands.load(Ordering::Relaxed) >= 500).await);
    assert!(s2.metrics.capture_dropped.get() > 0);
    cloud.set_commands(false);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = fleet.report();
    assert_eq!(r.requests, r.answered, "{r:?}");
    assert_eq!(r.connects, 20);
    fleet.stop().await;
    s2.capture.shutdown();
    cloud.stop().await;
}
