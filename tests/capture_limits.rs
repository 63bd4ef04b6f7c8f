//! Capture under abuse: thousands of short connections must not leak descriptors, and a full
//! disk is counted and logged without touching the relay.

mod common;

use common::harness::*;
use cync_mitm::capture::Capture;
use cync_mitm::codec::{DeviceId, Frame};
use cync_mitm::config::Config;
use cync_mitm::metrics::Metrics;
use cync_mitm::proxy::Proxy;
use cync_mitm::sim::cloud::CloudSimConfig;
use cync_mitm::tls::{ClientProfile, LegacyClient};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(30);

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

async fn start(cfg: Config) -> (Arc<Proxy>, SocketAddr, Arc<Capture>, Arc<Metrics>) {
    let (p, capture) = start_proxy_with_capture(cfg).await;
    (p.proxy, p.addr, capture, p.metrics)
}

/// One short connection: TLS, then either garbage or a device handshake (and its answer).
async fn short_connection(client: &LegacyClient, addr: SocketAddr, i: u32) {
    let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
        return;
    };
    let Ok(mut s) = client.connect(tcp).await else {
        return;
    };
    if i.is_multiple_of(2) {
        let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n").await;
    } else {
        let hs = Frame::handshake(DeviceId(0x2000_0000 + i), b"0123456789abcdef", 60)
            .encode()
            .unwrap();
        let _ = s.write_all(&hs).await;
        let mut b = [0u8; 7];
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b)).await;
    }
    let _ = s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_short_connections_leave_no_descriptors_open() {
    let (cloud, cloud_addr) = start_cloud(CloudSimConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = proxy_config(cloud_addr);
    cfg.capture.enabled = true;
    cfg.capture.dir = dir.path().to_owned();
    cfg.capture.close_idle_after = Duration::from_millis(300);
    cfg.capture.max_open_files = 64;
    let (proxy, addr, capture, metrics) = start(cfg).await;
    let client = LegacyClient::new(ClientProfile::DeviceFp2).unwrap();
    // Warm up (runtime threads, the writer's first file), then take the baseline.
    for i in 0..4 {
        short_connection(&client, addr, i).await;
    }
    assert!(wait_until(T, || proxy.sessions() == 0).await);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let baseline = open_fds();

    let n = 2000u32;
    let mut peak = 0;
    for batch in 0..(n / 20) {
        let mut tasks = Vec::new();
        for j in 0..20 {
            let c = client.clone();
            tasks.push(tokio::spawn(async move {
                short_connection(&c, addr, 10 + batch * 20 + j).await
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        peak = peak.max(open_fds());
    }
    assert!(wait_until(T, || proxy.sessions() == 0).await);
    let closed = || metrics.closed_count("device_closed") + metrics.closed_count("cloud_closed");
    assert!(closed() >= u64::from(n), "{} sessions closed", closed());
    capture.flush();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    capture.flush();
    let after = open_fds();
    eprintln!("descriptors: baseline {baseline}, peak {peak}, after {after}");
    assert!(
        metrics.capture_files.get() >= u64::from(n) / 2,
        "{} capture files opened",
        metrics.capture_files.get()
    );
    assert!(
        after <= baseline + 5,
        "descriptors: baseline {baseline}, after {after}"
    );
    assert_eq!(metrics.capture_errors.with_label_values(&["open"]).get(), 0);
    capture.shutdown();
    cloud.stop().await;
}

/// A tmpfs of a few KiB as the capture folder (needs root, as CI has; skipped otherwise).
struct TinyFs(tempfile::TempDir);

impl TinyFs {
    fn mount() -> Option<Self> {
        let d = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=16k", "tmpfs"])
            .arg(d.path())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Self(d))
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.path())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_counted_and_the_relay_goes_on() {
    let Some(fs) = TinyFs::mount() else {
        eprintln!("skipped: cannot mount a tmpfs (needs root)");
        return;
    };
    let (cloud, cloud_addr) = start_cloud(CloudSimConfig {
        command_interval: Some(Duration::from_millis(10)),
        ..Default::default()
    })
    .await;
    let mut cfg = proxy_config(cloud_addr);
    cfg.capture.enabled = true;
    cfg.capture.dir = fs.0.path().to_owned();
    let (_proxy, addr, capture, metrics) = start(cfg).await;
    let mut fc = fleet_config(addr, 5);
    fc.heartbeat = Duration::from_millis(50);
    let fleet = start_fleet(fc);
    assert!(wait_until(T, || fleet.stats().commands.load(Ordering::Relaxed) >= 600).await);
    let errors = metrics.capture_errors.with_label_values(&["write"]).get()
        + metrics.capture_errors.with_label_values(&["open"]).get();
    assert!(errors > 0, "no capture error counted on a full disk");
    assert!(metrics.capture_dropped_error.get() > 0);
    // Bytes count only what reached the file: never more than the file system holds.
    assert!(
        metrics.capture_written_bytes.get() <= 16 * 1024,
        "{} bytes counted as written on a 16 KiB file system",
        metrics.capture_written_bytes.get()
    );
    cloud.set_commands(false);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = fleet.report();
    assert_eq!(r.requests, r.answered, "{r:?}");
    assert_eq!(r.connects, 5, "{r:?}");
    assert_eq!(
        cloud.stats().commands_sent.load(Ordering::Relaxed),
        cloud.stats().command_acks.load(Ordering::Relaxed)
    );
    fleet.stop().await;
    capture.shutdown();
    // A file that never reached the disk is removed: no empty file per key per retry.
    let mut files = Vec::new();
    let mut stack = vec![fs.0.path().to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files.push((p.clone(), std::fs::metadata(&p).unwrap().len()));
            }
        }
    }
    eprintln!("files left on the full disk: {files:?}");
    assert!(
        files.iter().all(|(_, len)| *len > 0),
        "empty files left: {files:?}"
    );
    assert!(files.len() <= 5, "{files:?}");
    cloud.stop().await;
}

/// More devices than `capture.max_open_files`: files are closed and reopened as devices take
/// turns, and each device still has exactly one file per day, appended to (a new pcapng
/// section each time) and readable whole by `capture read` and tshark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicted_device_files_are_appended_to_not_split() {
    let (cloud, cloud_addr) = start_cloud(CloudSimConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = proxy_config(cloud_addr);
    cfg.capture.enabled = true;
    cfg.capture.dir = dir.path().to_owned();
    cfg.capture.max_open_files = 1;
    let (_proxy, addr, capture, metrics) = start(cfg).await;
    let mut fc = fleet_config(addr, 3);
    fc.heartbeat = Duration::from_millis(100);
    let fleet = start_fleet(fc);
    assert!(wait_until(T, || fleet.stats().online.load(Ordering::Relaxed) == 3).await);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r = fleet.report();
    fleet.stop().await;
    capture.shutdown();
    let days: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
    assert_eq!(days.len(), 1);
    let files: Vec<std::path::PathBuf> = std::fs::read_dir(days[0].path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(files.len(), 3, "one file per device: {files:?}");
    assert_eq!(metrics.capture_files.get(), 3, "files created");
    assert!(r.requests >= 30, "{r:?}");
    let have_tshark = common::tshark::have_tshark();
    for f in &files {
        let mut out = Vec::new();
        cync_mitm::cmd::capture::read(f, cync_mitm::cmd::capture::Format::Json, None, &mut out)
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        let pings = text.matches("\"name\":\"ping\"").count();
        assert!(pings >= 20, "{}: {pings} pings\n{text}", f.display());
        if have_tshark {
            let p = f.to_str().unwrap();
            // Sequence numbers run on across the sections: no analysis flags.
            let flagged = common::tshark::tshark(&["-r", p, "-Y", "tcp.analysis.flags"]);
            assert!(flagged.trim().is_empty(), "{}: {flagged}", f.display());
            let n = common::tshark::tshark(&["-r", p, "-Y", "tcp.len > 0"])
                .lines()
                .count();
            assert!(n >= 40, "{}: {n} data segments in tshark", f.display());
        }
    }
    cloud.stop().await;
}
