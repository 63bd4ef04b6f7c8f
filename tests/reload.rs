//! The config watcher under abuse: reads of the file, identical rewrites, empty and half-written
//! saves, invalid files. Only real modifications reload, and never to an empty file.

mod common;

use common::harness::*;
use cync_mitm::reload::watch_file;
use std::io::Write as _;
use std::time::Duration;

fn reloads(m: &cync_mitm::metrics::Metrics, result: &str) -> u64 {
    m.config_reloads.with_label_values(&[result]).get()
}

fn all_reloads(m: &cync_mitm::metrics::Metrics) -> u64 {
    ["ok", "unchanged", "error"]
        .iter()
        .map(|r| reloads(m, r))
        .sum()
}

fn config_text(cloud_port: u16, percent: u32) -> String {
    format!(
        "# test config\n[reload]\ndebounce = \"50ms\"\n[upstream]\naddresses = [\"127.0.0.1:{cloud_port}\"]\n[admin]\nenabled = false\n[routing]\nmode = \"shadow\"\ncanary_percent = {percent}\n[tls]\ncert_dir = \"{}\"\n{}",
        certs().ca_cert.parent().unwrap().display(),
        slo_scratch_toml()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_do_not_reload_and_one_edit_reloads_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(&file, config_text(1, 0)).unwrap();
    let (live, metrics) = live_from_file(&file);
    let _w = watch_file(live.clone(), Duration::from_millis(50)).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(all_reloads(&metrics), 0);

    // Ten reads (as `cat` does) and the certificate files read too.
    for _ in 0..10 {
        let _ = std::fs::read_to_string(&file).unwrap();
        let _ = std::fs::read(&certs().rsa_cert).unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(all_reloads(&metrics), 0, "reads must not reload");
    assert_eq!(live.current().generation, 1);

    // One edit: exactly one reload, then none.
    std::fs::write(&file, config_text(1, 10)).unwrap();
    assert!(wait_until(Duration::from_secs(5), || live.current().generation == 2).await);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(reloads(&metrics, "ok"), 1);
    assert_eq!(
        all_reloads(&metrics),
        1,
        "after one edit: {} ok, {} unchanged, {} error",
        reloads(&metrics, "ok"),
        reloads(&metrics, "unchanged"),
        reloads(&metrics, "error")
    );

    // An invalid file: one error, not a stream.
    std::fs::write(&file, "[routing]\ncanary_percent = 400\n").unwrap();
    assert!(wait_until(Duration::from_secs(5), || reloads(&metrics, "error") >= 1).await);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(reloads(&metrics, "error"), 1);
    assert_eq!(all_reloads(&metrics), 2);
    assert_eq!(live.current().generation, 2);
    assert_eq!(live.current().config.routing.canary_percent, 10.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_files_and_identical_rewrites_never_change_the_generation() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    let text = config_text(7, 5);
    std::fs::write(&file, &text).unwrap();
    let (live, metrics) = live_from_file(&file);
    let _w = watch_file(live.clone(), Duration::from_millis(50)).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    // 200 rapid rewrites of the same text.
    for _ in 0..200 {
        std::fs::write(&file, &text).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(live.current().generation, 1);
    assert_eq!(reloads(&metrics, "ok"), 0);

    // An empty file, left empty: refused, the running config stays.
    std::fs::write(&file, "").unwrap();
    assert!(wait_until(Duration::from_secs(5), || reloads(&metrics, "error") >= 1).await);
    assert_eq!(live.current().generation, 1);
    assert_eq!(
        live.current().config.upstream.addresses,
        vec!["127.0.0.1:7".to_string()]
    );
    // Only comments is just as empty.
    std::fs::write(&file, "# nothing here\n\n").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(live.current().generation, 1);
    // SIGHUP / POST /reload on an empty file: the same refusal, with a clear message.
    std::fs::write(&file, "").unwrap();
    let e = live.reload(cync_mitm::reload::Trigger::Admin).unwrap_err();
    assert!(e.to_string().contains("empty"), "{e}");
    assert_eq!(live.current().generation, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_truncate_then_write_save_never_applies_a_partial_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(&file, config_text(7, 5)).unwrap();
    let (live, _metrics) = live_from_file(&file);
    let _w = watch_file(live.clone(), Duration::from_millis(50)).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Watch every generation the proxy takes while an editor saves slowly.
    let watcher = {
        let live = live.clone();
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            let end = std::time::Instant::now() + Duration::from_secs(3);
            while std::time::Instant::now() < end {
                let c = live.current();
                seen.push((
                    c.generation,
                    c.config.upstream.addresses.clone(),
                    c.config.routing.canary_percent,
                ));
                std::thread::sleep(Duration::from_millis(1));
            }
            seen
        })
    };
    // Cut where the first part is a valid file on its own (no [routing]: legacy_only, 0 %), so
    // only reading until the file is stable, not parsing, can tell it is half a save.
    let new = config_text(7, 50);
    let routing = new.find("[routing]").unwrap();
    let (head, routing_part) = new.split_at(routing);
    let tls = routing_part.find("[tls]").unwrap();
    let (routing_part, tls_part) = routing_part.split_at(tls);
    let new = format!("{head}{tls_part}{routing_part}");
    let cut = new.find("[routing]").unwrap();
    let (a, b) = new.split_at(cut);
    assert!(
        cync_mitm::config::Config::from_toml(a, std::path::Path::new("half")).is_ok(),
        "the first half must be a valid configuration for this test to mean anything"
    );
    {
        let mut f = std::fs::File::create(&file).unwrap(); // truncates
        f.flush().unwrap();
        // Pauses longer than the debounce: the watcher fires in the middle of the save.
        std::thread::sleep(Duration::from_millis(60));
        f.write_all(a.as_bytes()).unwrap();
        f.flush().unwrap();
        std::thread::sleep(Duration::from_millis(60));
        f.write_all(b.as_bytes()).unwrap();
    }
    let seen = watcher.join().unwrap();
    for (g, addrs, pct) in &seen {
        assert_eq!(
            addrs,
            &vec!["127.0.0.1:7".to_string()],
            "generation {g} took another upstream"
        );
        assert!(*pct == 5.0 || *pct == 50.0, "generation {g}: {pct}");
    }
    let last = live.current();
    assert_eq!(last.config.routing.canary_percent, 50.0);
    assert_eq!(last.generation, 2, "exactly one new generation");
}

/// An address removed from the config is forgotten: its `cync_mitm_upstream_up` series goes
/// and `/upstreams` no longer lists it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_upstream_addresses_lose_their_health_series() {
    let (cloud, cloud_addr) = start_cloud(Default::default()).await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    let text = |addrs: &str| {
        format!(
            "[upstream]\naddresses = [{addrs}]\nprobe_interval = \"1s\"\n[admin]\nenabled = false\n\
             [listen]\ntls = \"127.0.0.1:0\"\n[tls]\ncert_dir = \"{}\"\n{}",
            certs().ca_cert.parent().unwrap().display(),
            slo_scratch_toml()
        )
    };
    std::fs::write(&file, text(&format!("\"{cloud_addr}\", \"{dead_addr}\""))).unwrap();
    let (live, metrics) = live_from_file(&file);
    let p = start_proxy_live(live.clone(), metrics.clone()).await;
    tokio::spawn(p.proxy.clone().probe_upstreams());
    let series = |addr: &std::net::SocketAddr| {
        metrics
            .render()
            .lines()
            .any(|l| l.starts_with("cync_mitm_upstream_up{") && l.contains(&addr.to_string()))
    };
    assert!(
        wait_until(Duration::from_secs(10), || series(&dead_addr)
            && series(&cloud_addr))
        .await
    );
    std::fs::write(&file, text(&format!("\"{cloud_addr}\""))).unwrap();
    live.reload(cync_mitm::reload::Trigger::Admin).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || !series(&dead_addr)).await,
        "the removed address keeps its series"
    );
    assert!(series(&cloud_addr));
    assert!(
        p.proxy
            .health()
            .report()
            .iter()
            .all(|r| r.address != dead_addr.to_string())
    );
    cloud.stop().await;
}

/// A CA file replaced under the same name is used from the next reload (the text of the
/// config did not change, its certificates did).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_ca_file_reloads_the_connector() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("backend-ca.pem");
    let other = tempfile::tempdir().unwrap();
    let other = cync_mitm::tls::init_certs(other.path(), false).unwrap();
    std::fs::copy(&other.ca_cert, &ca).unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(
        &file,
        format!(
            "[upstream]\naddresses = [\"127.0.0.1:9\"]\n[admin]\nenabled = false\n\
             [new_path]\naddresses = [\"127.0.0.1:9\"]\nca_file = \"{}\"\n[tls]\ncert_dir = \"{}\"\n",
            ca.display(),
            certs().ca_cert.parent().unwrap().display()
        ),
    )
    .unwrap();
    let (live, _metrics) = live_from_file(&file);
    let before = live.current().new_path.ca_digest();
    assert!(before.is_some());
    // Nothing changed: unchanged, same connector.
    let r = live.reload(cync_mitm::reload::Trigger::Admin).unwrap();
    assert!(
        matches!(r, cync_mitm::reload::Outcome::Unchanged { .. }),
        "{r:?}"
    );
    std::fs::copy(&certs().ca_cert, &ca).unwrap();
    let r = live.reload(cync_mitm::reload::Trigger::Admin).unwrap();
    assert!(
        matches!(r, cync_mitm::reload::Outcome::Applied { .. }),
        "{r:?}"
    );
    let after = live.current().new_path.ca_digest();
    assert_ne!(before, after);
    assert_eq!(
        after,
        Some(openssl::sha::sha256(
            &std::fs::read(&certs().ca_cert).unwrap()
        ))
    );
}

/// The file changes between the read that starts the proxy and the live configuration: the
/// text in force is not mistaken for the new one (the next reload applies it).
#[test]
fn a_file_changed_during_start_is_applied_not_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(&file, config_text(9, 10)).unwrap();
    let metrics = std::sync::Arc::new(cync_mitm::metrics::Metrics::new(false));
    let unchanged = cync_mitm::config::Config::load(&file).unwrap();
    let live =
        cync_mitm::reload::LiveConfig::new(unchanged, Some(file.clone()), metrics.clone(), |_| {
            None
        })
        .unwrap();
    assert!(!live.stale_at_start());
    let r = live.reload(cync_mitm::reload::Trigger::Admin).unwrap();
    assert!(
        matches!(r, cync_mitm::reload::Outcome::Unchanged { .. }),
        "{r:?}"
    );

    let old = cync_mitm::config::Config::load(&file).unwrap();
    std::fs::write(&file, config_text(9, 20)).unwrap();
    let live =
        cync_mitm::reload::LiveConfig::new(old, Some(file.clone()), metrics, |_| None).unwrap();
    assert!(live.stale_at_start());
    assert_eq!(live.current().config.routing.canary_percent, 10.0);
    let r = live.reload(cync_mitm::reload::Trigger::Admin).unwrap();
    assert!(
        matches!(r, cync_mitm::reload::Outcome::Applied { .. }),
        "{r:?}"
    );
    assert_eq!(live.current().config.routing.canary_percent, 20.0);
}
