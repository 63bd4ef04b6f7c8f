//! `cync-mitm replay` (the binary) against simulated backends over loopback TLS: the committed
//! sample capture replays with no drift against the simulated cloud, a drifting backend fails
//! the run and is named, and bad input is refused with a clear message.

mod common;

use common::harness::*;
use cync_mitm::sim::cloud::CloudSimConfig;
use std::path::PathBuf;
use std::process::Output;
use std::sync::atomic::Ordering;

fn sample() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/captures/sample-device.pcapng")
}

async fn replay(args: &[&str]) -> Output {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_cync-mitm"));
    c.arg("replay").args(args);
    c.output().await.unwrap()
}

/// `replay` of the sample to `to`, verifying the test CA's certificate, with `extra` flags.
async fn replay_verified(to: &str, extra: &[&str]) -> Output {
    let sample = sample();
    let ca = certs().ca_cert.to_str().unwrap().to_owned();
    let mut a = vec![
        sample.to_str().unwrap(),
        "--to",
        to,
        "--ca-file",
        &ca,
        "--sni",
        "cm.gelighting.com",
    ];
    a.extend_from_slice(extra);
    replay(&a).await
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sample_capture_replays_with_no_drift_against_the_simulated_cloud() {
    let (cloud, addr) = start_cloud(CloudSimConfig::default()).await;
    let to = addr.to_string();
    let o = replay_verified(&to, &["--speed", "20"]).await;
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(t.contains("0 drifts (max 0), parity 100.0000%: OK"), "{t}");
    assert!(t.contains("handshake"), "{t}");
    // The backend saw the device: its handshake first, then its frames.
    assert_eq!(cloud.stats().handshakes.load(Ordering::Relaxed), 1);
    assert!(cloud.stats().frames_in.load(Ordering::Relaxed) >= 20);
    // JSON, as fast as possible.
    let o = replay_verified(&to, &["--speed", "0", "--json"]).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["sessions"], 1);
    assert_eq!(r["ok"], true);
    assert_eq!(r["total"]["content"], 0);
    assert!(r["total"]["matches"].as_u64().unwrap() >= 15, "{r}");
    assert_eq!(r["types"]["time_request"]["matches"], 1, "{r}");
    // The device's acks of the recorded cloud's commands are not sent to a backend that never
    // sent those commands.
    assert!(r["skipped_answers"].as_u64().unwrap() > 0, "{r}");
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drifting_backend_fails_the_replay_and_is_named() {
    // Every second answer with content is altered; every third answer is left unsent.
    let (cloud, addr) = start_cloud(CloudSimConfig {
        drift: 0.5,
        drop_answers: 0.34,
        ..CloudSimConfig::default()
    })
    .await;
    let to = addr.to_string();
    let o = replay_verified(&to, &["--speed", "0", "--timeout", "1s", "--json"]).await;
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["ok"], false);
    let altered = cloud.stats().answers_altered.load(Ordering::Relaxed);
    let dropped = cloud.stats().answers_dropped.load(Ordering::Relaxed);
    assert!(altered >= 1 && dropped >= 1, "{altered} {dropped}");
    assert_eq!(r["total"]["content"].as_u64().unwrap(), altered, "{r}");
    assert_eq!(r["total"]["missing_new"].as_u64().unwrap(), dropped, "{r}");
    let drifts = r["drifts"].as_array().unwrap();
    assert_eq!(drifts.len() as u64, altered + dropped);
    let d = drifts.iter().find(|d| d["reason"] == "content").unwrap();
    assert_ne!(d["legacy"], d["new"]);
    assert_eq!(d["device"], "49300000");
    // A generous threshold lets the same run pass.
    let o = replay_verified(
        &to,
        &["--speed", "0", "--timeout", "1s", "--max-drift", "100%"],
    )
    .await;
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(t.contains("drift: "), "{t}");
    assert!(t.contains("(max 100%)"), "{t}");
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_and_dead_backends_are_refused_clearly() {
    let s = sample();
    let s = s.to_str().unwrap();
    // Verification is on by default.
    let o = replay(&[s, "--to", "127.0.0.1:1"]).await;
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).contains("--ca-file or --pin-sha256"),
        "{}",
        text(&o)
    );
    // Not a capture.
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.pcapng");
    std::fs::write(&junk, b"definitely not a capture").unwrap();
    let o = replay(&[junk.to_str().unwrap(), "--to", "127.0.0.1:1", "--insecure"]).await;
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("junk.pcapng"), "{}", text(&o));
    // Bad flag values.
    for bad in [
        &["--speed", "-1"][..],
        &["--speed", "NaN"],
        &["--max-drift", "lots"],
        &["--timeout", "0s"],
        &["--concurrency", "0"],
        &["--speed", "1e-300"],
        &["--timeout", "500000000000y"],
        &["--timeout", "11m"],
        &["--pin-sha256", "abc"],
        &["--sni", "bad name!", "--ca-file", "x.pem"],
    ] {
        let mut a = vec![s, "--to", "127.0.0.1:1", "--insecure"];
        a.extend_from_slice(bad);
        let o = replay(&a).await;
        assert_eq!(o.status.code(), Some(2), "{bad:?}: {}", text(&o));
    }
    // No port.
    let o = replay(&[s, "--to", "backend.lan", "--insecure"]).await;
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    // A capture cut short (still being written): replayed up to the cut, and said so.
    let cut = dir.path().join("cut.pcapng");
    let whole = std::fs::read(sample()).unwrap();
    std::fs::write(&cut, &whole[..whole.len() - 10]).unwrap();
    let (cloud, addr) = start_cloud(CloudSimConfig::default()).await;
    let to = addr.to_string();
    let o = replay(&[
        cut.to_str().unwrap(),
        "--to",
        &to,
        "--insecure",
        "--speed",
        "0",
    ])
    .await;
    assert!(text(&o).contains("ends inside a block"), "{}", text(&o));
    assert!(text(&o).contains("auth code is redacted"), "{}", text(&o));
    assert!(cloud.stats().handshakes.load(Ordering::Relaxed) >= 1);
    cloud.stop().await;
    // Not a regular file.
    let o = replay(&["/dev/zero", "--to", "127.0.0.1:1", "--insecure"]).await;
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("not a regular file"), "{}", text(&o));
    // A backend that is not there: the session cannot run, the replay fails (exit 1).
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = l.local_addr().unwrap().to_string();
    drop(l);
    let o = replay(&[s, "--to", &dead, "--plain"]).await;
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("error: "), "{}", text(&o));
    assert!(text(&o).contains("FAILED"), "{}", text(&o));
}
