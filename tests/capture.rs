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
    let (proxy, capture) = start_proxy_with_capture(cfg).await;
    let metrics = proxy.metrics.clone();
    Setup {
        proxy,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_switch_and_filters_reload_live_and_app_auth_is_redacted() {
    use cync_mitm::reload::Trigger;
    let (cloud, cloud_addr) = start_cloud(CloudSimConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let caps = dir.path().join("caps");
    let file = dir.path().join("c.toml");
    let write = |extra: &str| {
        std::fs::write(
            &file,
            format!(
                "[listen]\ntls = \"127.0.0.1:0\"\n[upstream]\naddresses = [\"{cloud_addr}\"]\n[tls]\ncert_dir = \"{}\"\n[slo]\nstate_file = \"{}\"\n[capture]\ndir = \"{}\"\n{extra}",
                certs().ca_cert.parent().unwrap().display(),
                dir.path().join("slo.json").display(),
                caps.display()
            ),
        )
        .unwrap()
    };
    write("enabled = false\n");
    let (live, metrics) = live_from_file(&file);
    let capture = Capture::start(live.clone(), metrics.clone()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let proxy = Proxy::new(
        live.clone(),
        certs(),
        metrics.clone(),
        vec![capture.clone()],
    )
    .unwrap();
    let p = proxy.clone();
    tokio::spawn(async move { p.serve(listener, ListenerKind::Tls).await });

    let run_devices = |seed: u64| {
        let mut fc = fleet_config(addr, 2);
        fc.seed = seed;
        start_fleet(fc)
    };
    // Off: nothing is written.
    let f1 = run_devices(1);
    assert!(wait_until(T, || f1.stats().online.load(Ordering::Relaxed) == 2).await);
    f1.stop().await;
    capture.flush();
    assert!(!caps.exists() || files(&caps).is_empty());

    // On, for one device only, and only pipe_sync frames.
    let f2_ids: Vec<_> = (0..2)
        .map(|i| cync_mitm::sim::device_identity(2, i).0)
        .collect();
    write(&format!(
        "enabled = true\ndevices = [\"{}\"]\ntypes = [\"pipe_sync\", \"0x23\"]\n",
        f2_ids[0]
    ));
    live.reload(Trigger::Admin).unwrap();
    let f2 = run_devices(2);
    assert!(wait_until(T, || f2.stats().online.load(Ordering::Relaxed) == 2).await);
    assert!(wait_until(T, || f2.report().answered >= 14).await);
    f2.stop().await;
    // An app session: captured as app-<user>, its auth string masked.
    write("enabled = true\n");
    live.reload(Trigger::Admin).unwrap();
    assert_eq!(app_login(addr, 0xabcdef, b"secret-token").await[0], 0x18);
    assert!(wait_until(T, || proxy.sessions() == 0).await);
    capture.shutdown();

    let mut found: Vec<String> = files(&caps)
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    found.sort();
    let mut want = vec![
        format!("{}.pcapng", f2_ids[0]),
        "app-00abcdef.pcapng".to_owned(),
    ];
    want.sort();
    assert_eq!(found, want);
    let dev_file = files(&caps)
        .into_iter()
        .find(|f| f.to_string_lossy().contains(&f2_ids[0].to_string()))
        .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cync-mitm"))
        .args(["capture", "read"])
        .arg(&dev_file)
        .output()
        .unwrap();
    let names: std::collections::BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["name"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    assert_eq!(
        names,
        ["handshake", "pipe_sync"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );
    let app_file = files(&caps)
        .into_iter()
        .find(|f| f.to_string_lossy().contains("app-"))
        .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cync-mitm"))
        .args(["capture", "read"])
        .arg(&app_file)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("\"auth\":\"************\""), "{text}");
    assert!(!text.contains("secret-token"));
    cloud.stop().await;
}
