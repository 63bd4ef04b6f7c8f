//! The TLS key log: with `capture.keylog_file` set, a raw capture of the real (encrypted) device
//! leg, taken with dumpcap on loopback, is decrypted by tshark to exactly the bytes the device sent.
//! Its own test binary: the key log is process-wide.

mod common;

use common::harness::*;
use common::tshark::{follow, have_tshark};
use cync_mitm::sim::cloud::CloudSimConfig;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt as _;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_capture_of_the_device_leg_decrypts_with_the_key_log() {
    if !have_tshark() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.log");
    cync_mitm::tls::enable_keylog(&keys).unwrap();
    assert!(cync_mitm::tls::keylog_enabled());
    let (cloud, cloud_addr) = start_cloud(CloudSimConfig::default()).await;
    let p = start_proxy(proxy_config(cloud_addr)).await;

    let pcap = dir.path().join("raw.pcapng");
    let filter = format!("tcp port {}", p.addr.port());
    let mut dumpcap = Command::new("dumpcap")
        .args(["-i", "lo", "-f", &filter, "-w"])
        .arg(&pcap)
        .stderr(Stdio::piped())
        .spawn()
        .expect("dumpcap (installed with tshark)");
    let mut err = BufReader::new(dumpcap.stderr.take().unwrap()).lines();
    loop {
        let l = err.next().expect("dumpcap exited").unwrap();
        if l.contains("Capturing on") {
            break;
        }
    }
    std::thread::spawn(move || for _ in err {});
    // dumpcap announces itself before its filter is attached: give it a moment, so the
    // ClientHello (needed to decrypt) is captured.
    tokio::time::sleep(Duration::from_millis(700)).await;

    let mut fc = fleet_config(p.addr, 1);
    fc.record = true;
    fc.heartbeat = Duration::from_millis(100);
    let fleet = start_fleet(fc);
    assert!(
        wait_until(Duration::from_secs(15), || fleet
            .stats()
            .answered
            .load(Ordering::Relaxed)
            >= 12)
        .await
    );
    fleet.stop().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = Command::new("kill")
        .args(["-INT", &dumpcap.id().to_string()])
        .status();
    let _ = dumpcap.wait();

    assert_eq!(
        std::fs::metadata(&keys).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let log = std::fs::read_to_string(&keys).unwrap();
    // The device leg is TLS 1.2 (CLIENT_RANDOM); the cloud leg here negotiates TLS 1.3.
    assert!(
        log.lines().any(|l| l.starts_with("CLIENT_RANDOM ")),
        "{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.starts_with("CLIENT_TRAFFIC_SECRET_0 ")),
        "{log}"
    );

    let id = fleet.ids()[0];
    let sent = fleet.stats().transcripts.lock().unwrap()[&id][0]
        .sent
        .clone();
    let keyopt = format!("tls.keylog_file:{}", keys.display());
    let decode_as = format!("tcp.port=={},tls", p.addr.port());
    let (c, s) = follow(&pcap, "tls", 0, &["-o", &keyopt, "-d", &decode_as]);
    assert_eq!(c, sent, "decrypted device→proxy bytes");
    assert!(!s.is_empty());
    cloud.stop().await;
}
