//! Canary routing with live reload, end to end: 100 simulated devices, a legacy cloud and a
//! new-path backend, config edits picked up by the file watcher, drains that move only the
//! devices whose path changed, and the reload paths (symlink swap, invalid file).

mod common;

use common::harness::*;
use cync_mitm::admin::{AdminState, route};
use cync_mitm::codec::DeviceId;
use cync_mitm::config::Config;
use cync_mitm::metrics::Metrics;
use cync_mitm::reload::{LiveConfig, watch_file};
use cync_mitm::sim::cloud::CloudSimConfig;
use hyper::Method;
use serde_json::Value;
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);

fn write_config(path: &Path, legacy: std::net::SocketAddr, new: std::net::SocketAddr, extra: &str) {
    let text = format!(
        "# test config\n[listen]\ntls = \"127.0.0.1:0\"\n\n[upstream]\naddresses = [\"{legacy}\"]\n\n\
         [new_path]\naddresses = [\"{new}\"]\nca_file = \"{}\"\nsni = \"cm.gelighting.com\"\n\n\
         [tls]\ncert_dir = \"{}\"\n\n[drain]\nbatch = 50\ninterval = \"50ms\"\n{}\n{extra}",
        certs().ca_cert.display(),
        certs().ca_cert.parent().unwrap().display(),
        slo_scratch_toml()
    );
    // Write then rename, as editors do.
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Rewrites the config file and reloads it now (as the watcher would).
fn rewrite_and_reload(
    live: &LiveConfig,
    path: &Path,
    legacy: std::net::SocketAddr,
    new: std::net::SocketAddr,
    extra: &str,
) {
    write_config(path, legacy, new, extra);
    live.reload(cync_mitm::reload::Trigger::Admin).unwrap();
}

async fn routing_json(st: &AdminState) -> Value {
    let r = route(st, &Method::GET, "/routing", "127.0.0.1:1".parse().unwrap()).await;
    use http_body_util::BodyExt;
    let body = r.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&body).unwrap()
}

fn paths(v: &Value) -> Vec<(String, String)> {
    v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["device_id"].as_str().unwrap().to_owned(),
                d["path"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_moves_only_the_devices_whose_path_changed_and_loses_nothing() {
    let (legacy, legacy_addr) = start_cloud(CloudSimConfig {
        record: true,
        ..Default::default()
    })
    .await;
    let (newp, new_addr) = start_cloud(CloudSimConfig {
        record: true,
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cync-mitm.toml");
    write_config(
        &file,
        legacy_addr,
        new_addr,
        "[routing]\nmode = \"new_primary\"\ncanary_percent = 0\n",
    );
    let metrics = Arc::new(Metrics::new(false));
    let cfg = Config::load(&file).unwrap();
    let live = LiveConfig::new(cfg, Some(file.clone()), metrics.clone(), |_| None).unwrap();
    let _watcher = watch_file(live.clone(), Duration::from_millis(25)).unwrap();
    let p = start_proxy_live(live.clone(), metrics.clone()).await;
    let admin = AdminState::new(metrics.clone(), Some(p.proxy.clone()));

    let mut fc = fleet_config(p.addr, 100);
    fc.record = true;
    let fleet = start_fleet(fc);
    assert!(
        wait_until(T, || fleet.stats().online.load(Ordering::Relaxed) == 100).await,
        "{:?}",
        fleet.report()
    );
    let before = routing_json(&admin).await;
    assert_eq!(before["generation"], 1);
    assert!(paths(&before).iter().all(|(_, p)| p == "legacy"));

    // Raise the canary to 30 % with the CLI's editor; the watcher applies it.
    let t0 = Instant::now();
    cync_mitm::cmd::canary::set_percent(&file, 30.0).unwrap();
    let mut seen = None;
    while t0.elapsed() < Duration::from_secs(1) {
        let v = routing_json(&admin).await;
        if v["generation"] == 2 && v["canary_percent"] == 30.0 {
            seen = Some(t0.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let seen = seen.expect("the new split did not show in /routing within a second");
    eprintln!("new generation visible after {seen:?}");
    // Each device shows what the policy in force says now next to how it connected.
    let v = routing_json(&admin).await;
    let devs = v["devices"].as_array().unwrap();
    assert_eq!(devs.len(), 100);
    assert!(devs.iter().any(|d| d["current_path"] == "new"), "{v}");
    for d in devs {
        assert!(
            d["connect_reason"].is_object() || d["connect_reason"].is_string(),
            "{d}"
        );
        assert!(d["current_reason_text"].is_string(), "{d}");
        let moves = d["path"] != d["current_path"];
        assert_eq!(d["would_move"], moves, "{d}");
    }

    let policy = live.current().policy.clone();
    let moved: HashSet<DeviceId> = fleet
        .ids()
        .into_iter()
        .filter(|id| policy.bucket(*id) < 3000)
        .collect();
    assert!(
        (15..=45).contains(&moved.len()),
        "{} devices in a 30% canary of 100",
        moved.len()
    );
    let want: Vec<(String, String)> = {
        let mut v: Vec<_> = fleet
            .ids()
            .into_iter()
            .map(|id| {
                (
                    id.to_string(),
                    if moved.contains(&id) { "new" } else { "legacy" }.to_owned(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let mut converged = false;
    let t1 = Instant::now();
    while t1.elapsed() < T {
        let v = routing_json(&admin).await;
        let mut got = paths(&v);
        got.sort();
        if got == want && newp.stats().handshakes.load(Ordering::Relaxed) == moved.len() as u64 {
            converged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(converged, "devices did not settle on their paths");
    eprintln!(
        "all moved devices reconnected on the new path after {:?}",
        t1.elapsed()
    );
    assert_eq!(metrics.closed_count("drained"), moved.len() as u64);
    assert_eq!(
        newp.stats().handshakes.load(Ordering::Relaxed),
        moved.len() as u64
    );

    // Let the last answers land (the moved devices' first flights are still being answered),
    // then stop the devices and compare every connection's bytes on both sides.
    let quiet = || {
        legacy.stats().frames_in.load(Ordering::Relaxed)
            + newp.stats().frames_in.load(Ordering::Relaxed)
    };
    let mut seen = quiet();
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = quiet();
        if now == seen {
            break;
        }
        seen = now;
    }
    fleet.stop().await;
    assert!(wait_until(T, || p.proxy.registry().is_empty()).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let transcripts = fleet.stats().transcripts.lock().unwrap().clone();
    let mut unmoved_dropped = 0;
    for id in fleet.ids() {
        let dev = &transcripts[&id];
        let on_legacy = legacy.stats().transcripts_of(id);
        let on_new = newp.stats().transcripts_of(id);
        if moved.contains(&id) {
            assert_eq!(dev.len(), 2, "{id}");
            assert_eq!((on_legacy.len(), on_new.len()), (1, 1), "{id}");
            assert_eq!(dev[0].sent, on_legacy[0].received, "{id} first connection");
            assert_eq!(dev[0].received, on_legacy[0].sent, "{id} first connection");
            assert_eq!(dev[1].sent, on_new[0].received, "{id} second connection");
            assert_eq!(dev[1].received, on_new[0].sent, "{id} second connection");
        } else {
            if dev.len() != 1 {
                unmoved_dropped += 1;
            }
            assert_eq!(on_new.len(), 0, "{id} reached the new path");
            assert_eq!(dev[0].sent, on_legacy[0].received, "{id}");
            assert_eq!(dev[0].received, on_legacy[0].sent, "{id}");
        }
    }
    assert_eq!(
        unmoved_dropped, 0,
        "devices that should not move were dropped"
    );
    let r = fleet.report();
    assert_eq!(r.requests, r.answered, "{r:?}");
    legacy.stop().await;
    newp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_files_keep_the_running_generation_and_symlink_swaps_are_seen() {
    // A ConfigMap-style layout: config.toml -> ..data/config.toml, ..data -> ..v1.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let text = |pct: f64| {
        format!(
            "[routing]\ncanary_percent = {pct}\n[admin]\nenabled = false\n{}",
            slo_scratch_toml()
        )
    };
    std::fs::create_dir(d.join("..v1")).unwrap();
    std::fs::write(d.join("..v1/config.toml"), text(10.0)).unwrap();
    std::os::unix::fs::symlink("..v1", d.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/config.toml", d.join("config.toml")).unwrap();
    let file = d.join("config.toml");
    let (live, metrics) = live_from_file(&file);
    let _w = watch_file(live.clone(), Duration::from_millis(25)).unwrap();
    assert_eq!(live.current().config.routing.canary_percent, 10.0);

    // Swap ..data atomically to a new version.
    std::fs::create_dir(d.join("..v2")).unwrap();
    std::fs::write(d.join("..v2/config.toml"), text(50.0)).unwrap();
    std::os::unix::fs::symlink("..v2", d.join("..data_tmp")).unwrap();
    std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
    assert!(
        wait_until(T, || live.current().generation == 2).await,
        "symlink swap not seen"
    );
    assert_eq!(live.current().config.routing.canary_percent, 50.0);
    assert_eq!(metrics.config_generation.get(), 2);
    assert_eq!(metrics.canary_percentage.get(), 50.0);

    // An invalid version: the running generation stays, the error is counted.
    std::fs::create_dir(d.join("..v3")).unwrap();
    std::fs::write(
        d.join("..v3/config.toml"),
        "[routing]\ncanary_percent = 500\n",
    )
    .unwrap();
    std::os::unix::fs::symlink("..v3", d.join("..data_tmp")).unwrap();
    std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
    assert!(
        wait_until(T, || metrics
            .config_reloads
            .with_label_values(&["error"])
            .get()
            >= 1)
        .await
    );
    assert_eq!(live.current().generation, 2);
    assert_eq!(live.current().config.routing.canary_percent, 50.0);
    let e = live.reload(cync_mitm::reload::Trigger::Admin).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("routing.canary_percent"));
    assert_eq!(e.line, Some(2));

    // A restart-only change is reported and not applied.
    std::fs::create_dir(d.join("..v4")).unwrap();
    std::fs::write(
        d.join("..v4/config.toml"),
        format!("{}[listen]\ntls = \"127.0.0.1:1\"\n", text(60.0)),
    )
    .unwrap();
    std::os::unix::fs::symlink("..v4", d.join("..data_tmp")).unwrap();
    std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
    assert!(wait_until(T, || live.current().generation == 3).await);
    let cur = live.current();
    assert_eq!(cur.config.routing.canary_percent, 60.0);
    assert_eq!(cur.pending_restart, vec!["listen"]);
    assert_eq!(cur.config.listen, Config::default().listen);
}

/// A new backend that accepts TCP and TLS but then fails the protocol (closes without 0x28, or
/// answers HTTP): new_primary devices still reach the cloud, each one falls back once, and
/// the backend is marked down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_primary_falls_back_when_the_new_backend_fails_before_answering() {
    let (legacy, legacy_addr) = start_cloud(CloudSimConfig::default()).await;
    // Knows no device: closes every handshake without an answer.
    let (refusing, refusing_addr) = start_cloud(CloudSimConfig {
        auth_codes: Some(Arc::new(std::collections::HashMap::new())),
        ..CloudSimConfig::default()
    })
    .await;
    // Speaks HTTP over TLS.
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_addr = http.local_addr().unwrap();
    let acceptor = cync_mitm::tls::DeviceAcceptor::new(&Default::default(), certs()).unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = http.accept().await {
            let a = acceptor.clone();
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                if let Ok(mut s) = a.accept(tcp).await {
                    let mut buf = [0u8; 256];
                    let _ = s.read(&mut buf).await;
                    let _ = s
                        .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                        .await;
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
            });
        }
    });
    for (bad, what) in [(refusing_addr, "closes"), (http_addr, "answers HTTP")] {
        let mut cfg = proxy_config(legacy_addr);
        cfg.new_path.addresses = vec![bad.to_string()];
        cfg.new_path.ca_file = Some(certs().ca_cert.clone());
        cfg.new_path.sni = Some("cm.gelighting.com".into());
        cfg.routing.mode = cync_mitm::route::Mode::NewPrimary;
        cfg.routing.canary_percent = 100.0;
        let p = start_proxy(cfg).await;
        let fleet = start_fleet(fleet_config(p.addr, 3));
        assert!(
            wait_until(T, || fleet.stats().online.load(Ordering::Relaxed) == 3).await,
            "{what}: devices did not reach the cloud"
        );
        assert_eq!(p.metrics.new_path_fallbacks.get(), 3, "{what}");
        // They stay: no reconnect loop through the bad backend.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(p.metrics.new_path_fallbacks.get(), 3, "{what}");
        let report = p.proxy.health().report();
        let new = report
            .iter()
            .find(|r| r.address == bad.to_string())
            .unwrap_or_else(|| panic!("{what}: {report:?}"));
        assert!(!new.up, "{what}: {new:?}");
        assert!(new.consecutive_failures >= 1, "{what}: {new:?}");
        fleet.stop().await;
    }
    assert!(refusing.stats().rejected.load(Ordering::Relaxed) >= 3);
    refusing.stop().await;
    legacy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_primary_falls_back_new_only_does_not_and_apps_stay_legacy() {
    let (legacy, legacy_addr) = start_cloud(CloudSimConfig::default()).await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let mut cfg = proxy_config(legacy_addr);
    cfg.new_path.addresses = vec![dead_addr.to_string()];
    cfg.new_path.ca_file = Some(certs().ca_cert.clone());
    cfg.routing.mode = cync_mitm::route::Mode::NewPrimary;
    cfg.routing.canary_percent = 100.0;
    let p = start_proxy(cfg.clone()).await;
    let fleet = start_fleet(fleet_config(p.addr, 2));
    assert!(wait_until(T, || fleet.stats().online.load(Ordering::Relaxed) == 2).await);
    assert_eq!(p.metrics.new_path_fallbacks.get(), 2);
    assert_eq!(
        p.metrics
            .routing_decisions
            .with_label_values(&["new"])
            .get(),
        2
    );
    fleet.stop().await;

    cfg.routing.mode = cync_mitm::route::Mode::NewOnly;
    let q = start_proxy(cfg).await;
    let fleet = start_fleet(fleet_config(q.addr, 2));
    assert!(wait_until(T, || q.metrics.closed_count("new_path_down") >= 2).await);
    assert_eq!(fleet.stats().online.load(Ordering::Relaxed), 0);
    assert_eq!(q.metrics.new_path_fallbacks.get(), 0);
    fleet.stop().await;
    // An app session on the same proxy still reaches the cloud.
    assert_eq!(app_login(q.addr, 1, b"x").await[0], 0x18);
    legacy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_settings_and_rotated_certificates_apply_on_reload() {
    use cync_mitm::reload::Trigger;
    use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode, SslVersion};
    let (cloud, cloud_addr) = start_cloud(CloudSimConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let certs_dir = dir.path().join("certs");
    cync_mitm::tls::init_certs(&certs_dir, false).unwrap();
    let file = dir.path().join("c.toml");
    let write = |ecdsa: bool| {
        std::fs::write(
            &file,
            format!(
                "[listen]\ntls = \"127.0.0.1:0\"\n[upstream]\naddresses = [\"{cloud_addr}\"]\n[slo]\nstate_file = \"{}\"\n[tls]\ncert_dir = \"{}\"\necdsa = {ecdsa}\n",
                dir.path().join("slo.json").display(),
                certs_dir.display()
            ),
        )
        .unwrap()
    };
    write(true);
    let (live, metrics) = live_from_file(&file);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let paths = cync_mitm::tls::CertPaths::in_dir(&certs_dir);
    let proxy =
        cync_mitm::proxy::Proxy::new(live.clone(), &paths, metrics.clone(), Vec::new()).unwrap();
    let p = proxy.clone();
    tokio::spawn(async move { p.serve(listener, cync_mitm::proxy::ListenerKind::Tls).await });

    // A fingerprint-1-like client: ECDHE-ECDSA first, static RSA as a fallback.
    let hello = || async {
        let mut b = SslConnector::builder(SslMethod::tls_client()).unwrap();
        b.set_verify(SslVerifyMode::NONE);
        b.set_security_level(0);
        b.set_max_proto_version(Some(SslVersion::TLS1_2)).unwrap();
        b.set_cipher_list("ECDHE-ECDSA-AES256-SHA384:AES256-SHA256")
            .unwrap();
        let ssl = b
            .build()
            .configure()
            .unwrap()
            .use_server_name_indication(false)
            .verify_hostname(false)
            .into_ssl("x")
            .unwrap();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut s = tokio_openssl::SslStream::new(ssl, tcp).unwrap();
        std::pin::Pin::new(&mut s).connect().await.unwrap();
        let cert = s.ssl().peer_certificate().unwrap();
        (
            s.ssl().current_cipher().unwrap().name().to_owned(),
            cert.digest(openssl::hash::MessageDigest::sha256())
                .unwrap()
                .to_vec(),
        )
    };
    let (c1, _) = hello().await;
    assert!(c1.starts_with("ECDHE-ECDSA"), "{c1}");

    write(false);
    assert!(matches!(
        live.reload(Trigger::Admin).unwrap(),
        cync_mitm::reload::Outcome::Applied { generation: 2, .. }
    ));
    assert!(live.current().pending_restart.is_empty());
    let (c2, rsa1) = hello().await;
    assert_eq!(c2, "AES256-SHA256");

    // Rotate the certificates on disk: a reload with an unchanged file picks them up.
    tokio::time::sleep(Duration::from_millis(20)).await;
    cync_mitm::tls::init_certs(&certs_dir, true).unwrap();
    assert!(matches!(
        live.reload(Trigger::Signal).unwrap(),
        cync_mitm::reload::Outcome::Applied { generation: 3, .. }
    ));
    let (_, rsa2) = hello().await;
    assert_ne!(rsa1, rsa2, "the new certificate is served");
    assert!(matches!(
        live.reload(Trigger::Signal).unwrap(),
        cync_mitm::reload::Outcome::Unchanged { generation: 3 }
    ));

    // Broken certificate files: the reload is refused and the running acceptor stays.
    std::fs::write(paths.rsa_key.clone(), "not a key").unwrap();
    let e = live.reload(Trigger::Admin).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("tls"));
    let (_, rsa3) = hello().await;
    assert_eq!(rsa3, rsa2);
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_picks_up_rotated_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let certs_dir = dir.path().join("certs");
    cync_mitm::tls::init_certs(&certs_dir, false).unwrap();
    let conf_dir = dir.path().join("conf");
    std::fs::create_dir(&conf_dir).unwrap();
    let file = conf_dir.join("c.toml");
    std::fs::write(
        &file,
        format!(
            "[tls]\ncert_dir = \"{}\"\n[admin]\nenabled = false\n",
            certs_dir.display()
        ),
    )
    .unwrap();
    let (live, _metrics) = live_from_file(&file);
    let _w = watch_file(live.clone(), Duration::from_millis(25)).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(live.current().acceptor.is_none());
    cync_mitm::tls::init_certs(&certs_dir, true).unwrap();
    assert!(
        wait_until(T, || live.current().generation >= 2).await,
        "rotation not picked up"
    );
    assert!(live.current().acceptor.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mode_changes_that_keep_the_path_drain_nobody() {
    let (legacy, legacy_addr) = start_cloud(CloudSimConfig::default()).await;
    let (newp, new_addr) = start_cloud(CloudSimConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cync-mitm.toml");
    let routing = |mode: &str| format!("[routing]\nmode = \"{mode}\"\ncanary_percent = 100\n");
    write_config(&file, legacy_addr, new_addr, &routing("legacy_only"));
    let metrics = Arc::new(Metrics::new(false));
    let cfg = Config::load(&file).unwrap();
    let live = LiveConfig::new(cfg, Some(file.clone()), metrics.clone(), |_| None).unwrap();
    let p = start_proxy_live(live.clone(), metrics.clone()).await;
    let fleet = start_fleet(fleet_config(p.addr, 20));
    assert!(wait_until(T, || fleet.stats().online.load(Ordering::Relaxed) == 20).await);
    let drained = || metrics.closed_count("drained");
    let connects = || fleet.stats().connects.load(Ordering::Relaxed);
    let c0 = connects();

    // legacy_only -> shadow: still the legacy path for everyone (their mirrors attach).
    rewrite_and_reload(&live, &file, legacy_addr, new_addr, &routing("shadow"));
    assert!(wait_until(T, || newp.stats().handshakes.load(Ordering::Relaxed) == 20).await);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(drained(), 0, "legacy_only -> shadow drained devices");
    assert_eq!(connects(), c0);

    // shadow -> new_primary moves everyone to the new path ...
    rewrite_and_reload(&live, &file, legacy_addr, new_addr, &routing("new_primary"));
    assert!(
        wait_until(T, || newp.stats().handshakes.load(Ordering::Relaxed) == 40
            && fleet.stats().online.load(Ordering::Relaxed) == 20)
        .await
    );
    assert_eq!(drained(), 20);
    let c1 = connects();
    // ... and new_primary <-> new_only moves nobody.
    rewrite_and_reload(&live, &file, legacy_addr, new_addr, &routing("new_only"));
    tokio::time::sleep(Duration::from_millis(600)).await;
    rewrite_and_reload(&live, &file, legacy_addr, new_addr, &routing("new_primary"));
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(drained(), 20, "new_primary <-> new_only drained devices");
    assert_eq!(connects(), c1);
    fleet.stop().await;
    legacy.stop().await;
    newp.stop().await;
}

/// Devices that fell back to the cloud under new_primary are on the legacy path for drains and
/// /routing: legacy_only drains nobody, new_only (no fallback allowed) drains them, and an
/// unrelated reload leaves them alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallen_back_devices_count_as_legacy() {
    let (legacy, legacy_addr) = start_cloud(CloudSimConfig::default()).await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cync-mitm.toml");
    let routing = |mode: &str, extra: &str| {
        format!(
            "[routing]\nmode = \"{mode}\"\ncanary_percent = 100\n\n[timeouts]\nidle = \"{extra}\"\n"
        )
    };
    write_config(
        &file,
        legacy_addr,
        dead_addr,
        &routing("new_primary", "90s"),
    );
    let metrics = Arc::new(Metrics::new(false));
    let cfg = Config::load(&file).unwrap();
    let live = LiveConfig::new(cfg, Some(file.clone()), metrics.clone(), |_| None).unwrap();
    let p = start_proxy_live(live.clone(), metrics.clone()).await;
    let admin = AdminState::new(metrics.clone(), Some(p.proxy.clone()));
    let fleet = start_fleet(fleet_config(p.addr, 4));
    assert!(wait_until(T, || fleet.stats().online.load(Ordering::Relaxed) == 4).await);
    assert_eq!(metrics.new_path_fallbacks.get(), 4);
    let v = routing_json(&admin).await;
    for d in v["devices"].as_array().unwrap() {
        assert_eq!(d["path"], "legacy", "{d}");
        assert_eq!(d["decided_path"], "new", "{d}");
        assert_eq!(d["fell_back"], true, "{d}");
        assert_eq!(d["would_move"], false, "{d}");
    }
    let drained = || metrics.closed_count("drained");
    // An unrelated change: nobody moves.
    write_config(
        &file,
        legacy_addr,
        dead_addr,
        &routing("new_primary", "91s"),
    );
    live.reload(cync_mitm::reload::Trigger::Admin).unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        drained(),
        0,
        "an unrelated reload drained fallen-back devices"
    );
    // legacy_only: they are there already.
    write_config(
        &file,
        legacy_addr,
        dead_addr,
        &routing("legacy_only", "91s"),
    );
    live.reload(cync_mitm::reload::Trigger::Admin).unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        drained(),
        0,
        "legacy_only drained devices already on legacy"
    );
    // Back to new_primary (still dead), then new_only: the cloud is no longer allowed.
    write_config(
        &file,
        legacy_addr,
        dead_addr,
        &routing("new_primary", "91s"),
    );
    live.reload(cync_mitm::reload::Trigger::Admin).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    rewrite_and_reload(
        &live,
        &file,
        legacy_addr,
        dead_addr,
        &routing("new_only", "91s"),
    );
    assert!(
        wait_until(T, || drained() == 4).await,
        "new_only drained {}",
        drained()
    );
    fleet.stop().await;
    legacy.stop().await;
}

/// `legacy_only → shadow (50 %) → shadow (100 %) → legacy_only` attaches and detaches mirrors on
/// the live sessions: no device connection closes, the backend sees the mirrored devices (their
/// handshake first), the cloud gets every byte, and parity compares from the attach on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadowing_on_and_off_attaches_and_detaches_mirrors_without_closing_devices() {
    let (legacy, legacy_addr) = start_cloud(CloudSimConfig {
        record: true,
        ..Default::default()
    })
    .await;
    let (newp, new_addr) = start_cloud(CloudSimConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cync-mitm.toml");
    let parity = format!(
        "[parity]\ndir = \"{}\"\n",
        dir.path().join("parity").display()
    );
    let routing = |mode: &str, pct: u32| {
        format!("[routing]\nmode = \"{mode}\"\ncanary_percent = {pct}\n\n{parity}")
    };
    write_config(&file, legacy_addr, new_addr, &routing("legacy_only", 100));
    let metrics = Arc::new(Metrics::new(false));
    let cfg = Config::load(&file).unwrap();
    let live = LiveConfig::new(cfg, Some(file.clone()), metrics.clone(), |_| None).unwrap();
    let p = start_proxy_live(live.clone(), metrics.clone()).await;
    let mut fc = fleet_config(p.addr, 20);
    fc.record = true;
    fc.heartbeat = Duration::from_millis(100);
    let fleet = start_fleet(fc);
    assert!(wait_until(T, || fleet.stats().online.load(Ordering::Relaxed) == 20).await);
    let mirrors = || metrics.transport.mirrors.get();
    assert_eq!(mirrors(), 0);
    assert_eq!(newp.stats().connections.load(Ordering::Relaxed), 0);

    // Half the devices shadowed: their mirrors attach in place.
    rewrite_and_reload(&live, &file, legacy_addr, new_addr, &routing("shadow", 50));
    let half = ids_under(&live, &fleet);
    assert!(half > 3 && half < 17, "{half} of 20 under 50 %");
    assert!(
        wait_until(T, || mirrors() == half as i64).await,
        "{} mirrors for {half} devices",
        mirrors()
    );
    assert!(
        wait_until(T, || newp.stats().handshakes.load(Ordering::Relaxed)
            == half as u64)
        .await,
        "the backend got each mirrored device's handshake first"
    );
    // All of them.
    rewrite_and_reload(&live, &file, legacy_addr, new_addr, &routing("shadow", 100));
    assert!(wait_until(T, || mirrors() == 20).await, "{}", mirrors());
    assert!(wait_until(T, || newp.stats().handshakes.load(Ordering::Relaxed) == 20).await);
    let pings = || metrics.parity.matches.with_label_values(&["ping"]).get();
    assert!(
        wait_until(T, || pings() > 100).await,
        "parity compares after the attach"
    );
    // Off again: every mirror detaches, nobody reconnects.
    rewrite_and_reload(
        &live,
        &file,
        legacy_addr,
        new_addr,
        &routing("legacy_only", 100),
    );
    assert!(wait_until(T, || mirrors() == 0).await, "{}", mirrors());
    assert!(
        wait_until(T, || newp.stats().connections.load(Ordering::Relaxed)
            as i64
            - newp_open(&newp) as i64
            == 20)
        .await
    );
    let frames = newp.stats().frames_in.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        newp.stats().frames_in.load(Ordering::Relaxed),
        frames,
        "nothing is mirrored after the detach"
    );
    let r = fleet.report();
    assert_eq!(r.connects, 20, "{r:?}");
    assert_eq!(r.disconnects, 0, "{r:?}");
    assert_eq!(metrics.closed_count("drained"), 0);
    assert_eq!(
        metrics
            .parity
            .drifts
            .with_label_values(&["ping", "missing_new"])
            .get(),
        0
    );
    // The cloud got every byte of every device, unchanged, across the three changes.
    fleet.set_heartbeats(false);
    tokio::time::sleep(Duration::from_millis(500)).await;
    fleet.stop().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let transcripts = fleet.stats().transcripts.lock().unwrap().clone();
    for id in fleet.ids() {
        let dev = &transcripts[&id];
        let cloud = legacy.stats().transcripts_of(id);
        assert_eq!(cloud.len(), 1, "{id}");
        assert_eq!(
            dev[0].sent, cloud[0].received,
            "{id}: the cloud got every byte"
        );
        assert_eq!(
            dev[0].received, cloud[0].sent,
            "{id}: only the cloud's bytes"
        );
    }
    legacy.stop().await;
    newp.stop().await;
}

/// Devices of `fleet` whose decision under the policy in force mirrors.
fn ids_under(live: &LiveConfig, fleet: &cync_mitm::sim::devices::Fleet) -> usize {
    let l = live.current();
    fleet
        .ids()
        .into_iter()
        .filter(|id| {
            l.policy
                .decide(cync_mitm::route::PeerKind::Device(*id))
                .mirror
        })
        .count()
}

/// Connections the simulator has open now (devices it knows as connected).
fn newp_open(sim: &cync_mitm::sim::cloud::CloudSim) -> usize {
    sim.stats().connected.lock().unwrap().len()
}

/// Shadow mode with no new-path address yet: nothing to mirror to. A reload that adds the
/// backend attaches every live device's mirror, without a reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_the_backend_by_reload_attaches_the_mirrors_of_live_devices() {
    let (legacy, legacy_addr) = start_cloud(CloudSimConfig::default()).await;
    let (newp, new_addr) = start_cloud(CloudSimConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cync-mitm.toml");
    let text = |addresses: &str| {
        format!(
            "[listen]\ntls = \"127.0.0.1:0\"\n[upstream]\naddresses = [\"{legacy_addr}\"]\n\
             [new_path]\naddresses = [{addresses}]\nca_file = \"{}\"\nsni = \"cm.gelighting.com\"\n\
             [tls]\ncert_dir = \"{}\"\n[routing]\nmode = \"shadow\"\ncanary_percent = 100\n\
             [parity]\ndir = \"{}\"\n{}",
            certs().ca_cert.display(),
            certs().ca_cert.parent().unwrap().display(),
            dir.path().join("parity").display(),
            slo_scratch_toml()
        )
    };
    std::fs::write(&file, text("")).unwrap();
    let metrics = Arc::new(Metrics::new(false));
    let live = LiveConfig::new(
        Config::load(&file).unwrap(),
        Some(file.clone()),
        metrics.clone(),
        |_| None,
    )
    .unwrap();
    let p = start_proxy_live(live.clone(), metrics.clone()).await;
    let fleet = start_fleet(fleet_config(p.addr, 10));
    assert!(wait_until(T, || fleet.stats().online.load(Ordering::Relaxed) == 10).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        metrics.transport.mirrors.get(),
        0,
        "nowhere to mirror to yet"
    );
    std::fs::write(&file, text(&format!("\"{new_addr}\""))).unwrap();
    live.reload(cync_mitm::reload::Trigger::Admin).unwrap();
    assert!(
        wait_until(T, || metrics.transport.mirrors.get() == 10).await,
        "{} mirrors",
        metrics.transport.mirrors.get()
    );
    assert!(wait_until(T, || newp.stats().handshakes.load(Ordering::Relaxed) == 10).await);
    assert_eq!(fleet.report().connects, 10, "nobody reconnected");
    fleet.stop().await;
    legacy.stop().await;
    newp.stop().await;
}
