//! The SLO engine inside the proxy: evaluations from the proxy's own counters, published as
//! gauges and at `GET /slo`, and its rolling state kept across a restart.

mod common;

use common::harness::*;
use cync_mitm::sim::cloud::CloudSimConfig;
use std::os::unix::fs::PermissionsExt as _;
use std::sync::atomic::Ordering;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

fn verdict(p: &RunningProxy, t: &str, s: &str) -> f64 {
    p.metrics.slo.verdict.with_label_values(&[t, s]).get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_path_losing_commands_violates_its_slo_and_the_state_survives_a_restart() {
    let cmds = CloudSimConfig {
        command_interval: Some(Duration::from_millis(20)),
        ..CloudSimConfig::default()
    };
    let (legacy, legacy_addr) = start_cloud(cmds.clone()).await;
    let (backend, new_addr) = start_cloud(cmds).await;
    let mut cfg = proxy_config(legacy_addr);
    use_new_path(&mut cfg, new_addr);
    // No retries: what the devices ignore is lost on the new path too.
    cfg.new_path.max_retries = 0;
    cfg.new_path.ack_timeout = Duration::from_millis(100);
    cfg.routing.mode = cync_mitm::route::Mode::NewPrimary;
    // Fleet B (seed 2) stays on the cloud.
    cfg.routing.exclude = (0..5)
        .map(|i| cync_mitm::sim::device_identity(2, i).0.to_string())
        .collect();
    cfg.routing.canary_percent = 100.0;
    cfg.slo.eval_interval = Duration::from_secs(1);
    cfg.slo.min_events = 50;
    let state = tempfile::tempdir().unwrap();
    cfg.slo.state_file = state.path().join("slo/state.json");
    let p = start_proxy(cfg.clone()).await;
    let mut fa = fleet_config(p.addr, 5);
    fa.ignore_commands = 0.3;
    let a = start_fleet(fa);
    let mut fb = fleet_config(p.addr, 5);
    fb.seed = 2;
    let b = start_fleet(fb);
    assert!(
        wait_until(T, || a.stats().online.load(Ordering::Relaxed) == 5
            && b.stats().online.load(Ordering::Relaxed) == 5)
        .await
    );
    assert!(
        wait_until(T, || verdict(&p, "new", "command_success") == -1.0).await,
        "new: {}",
        p.proxy.slo_report()
    );
    assert_eq!(
        verdict(&p, "legacy", "command_success"),
        1.0,
        "{}",
        p.proxy.slo_report()
    );
    let budget = p
        .metrics
        .slo
        .budget
        .with_label_values(&["new", "command_success"])
        .get();
    assert_eq!(budget, 0.0, "30 % lost exhausts a 0.1 % budget");
    let r = p.proxy.slo_report();
    let new = r["slos"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["transport"] == "new" && s["slo_name"] == "command_success")
        .unwrap()
        .clone();
    assert_eq!(new["evaluation"]["verdict"], "violated", "{new}");
    assert!(new["evaluation"]["counts"]["bad"].as_u64().unwrap() > 0);
    a.stop().await;
    b.stop().await;
    // Shutdown saves the state, 0600; a new proxy starts from it.
    assert!(p.proxy.shutdown(Duration::from_secs(3)).await);
    let file = state.path().join("slo/state.json");
    assert!(
        wait_until(T, || file.exists()).await,
        "no state file at {}",
        file.display()
    );
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let again = start_proxy(cfg).await;
    assert!(
        wait_until(T, || verdict(&again, "new", "command_success") == -1.0).await,
        "the restored series: {}",
        again.proxy.slo_report()
    );
    legacy.stop().await;
    backend.stop().await;
}

/// The decision log's lines (every day file in `dir`), oldest first.
fn decisions(dir: &std::path::Path) -> Vec<serde_json::Value> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.retain(|p: &std::path::PathBuf| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("decisions-") && n.ends_with(".jsonl"))
    });
    files.sort();
    files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn on_path(p: &RunningProxy, path: &str) -> usize {
    p.proxy
        .registry()
        .snapshot()
        .iter()
        .filter(|(_, s)| s.path.label() == path)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_leaving_half_its_answers_unsent_is_rolled_back_and_the_override_holds() {
    let (legacy, legacy_addr) = start_cloud(CloudSimConfig::default()).await;
    let (backend, new_addr) = start_cloud(CloudSimConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = proxy_config(legacy_addr);
    use_new_path(&mut cfg, new_addr);
    cfg.new_path.answer_timeout = Duration::from_millis(300);
    cfg.routing.mode = cync_mitm::route::Mode::NewPrimary;
    cfg.routing.canary_percent = 100.0;
    cfg.slo.eval_interval = Duration::from_secs(1);
    cfg.slo.decision_log_heartbeat = Duration::from_secs(1);
    cfg.slo.min_events = 20;
    cfg.slo.max_violations = 3;
    cfg.slo.state_file = dir.path().join("slo/state.json");
    cfg.admin.listen = "127.0.0.1:0".parse().unwrap();
    let file = dir.path().join("cync-mitm.toml");
    std::fs::write(&file, toml::to_string(&cfg).unwrap()).unwrap();
    let (live, metrics) = live_from_file(&file);
    let p = start_proxy_live(live, metrics).await;
    let mut fc = fleet_config(p.addr, 10);
    fc.heartbeat = Duration::from_millis(100);
    let fleet = start_fleet(fc);
    assert!(wait_until(T, || on_path(&p, "new") == 10).await);
    // Healthy first: the new path's request success is met.
    assert!(
        wait_until(T, || verdict(&p, "new", "request_success") == 1.0).await,
        "{}",
        p.proxy.slo_report()
    );
    // The fault: half the answers to device requests are never sent.
    backend.set_drop_answers(0.5);
    let m = &p.metrics.slo;
    assert!(
        wait_until(Duration::from_secs(60), || m.rollback_active.get() == 1).await,
        "{}",
        p.proxy.slo_report()
    );
    assert_eq!(m.rollbacks.with_label_values(&["auto"]).get(), 1);
    assert_eq!(p.metrics.canary_percentage.get(), 0.0);
    // Within max_violations evaluations of the first violation, as logged (by a thread).
    let logged = |d: &serde_json::Value| d["action"]["rollback"].is_object();
    assert!(wait_until(T, || decisions(&dir.path().join("slo")).iter().any(logged)).await);
    let log = decisions(&dir.path().join("slo"));
    let first = log
        .iter()
        .position(|d| !d["violations"].as_array().unwrap().is_empty())
        .expect("a violation was logged");
    let rolled = log
        .iter()
        .position(logged)
        .expect("the rollback was logged");
    assert_eq!(
        rolled - first,
        2,
        "the third violating evaluation rolls back: {:#?}",
        &log[first..=rolled]
    );
    let r = &log[rolled];
    assert_eq!(r["consecutive"], 3);
    assert!(r["thresholds"]["min_events"] == 20 && r["thresholds"]["max_violations"] == 3);
    let rs = r["slos"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["transport"] == "new" && s["slo"] == "request_success")
        .unwrap();
    assert_eq!(rs["verdict"], "violated", "{rs}");
    assert!(
        rs["bad"].as_u64().unwrap() > 0 && rs["burn"]["5m"].is_array(),
        "{rs}"
    );
    // The devices are drained back to the cloud and reconnect there.
    assert!(
        wait_until(T, || on_path(&p, "legacy") == 10 && on_path(&p, "new") == 0).await,
        "legacy {} new {}",
        on_path(&p, "legacy"),
        on_path(&p, "new")
    );
    // A file reload keeps the override: the file's new share is kept for later.
    cync_mitm::cmd::canary::set_percent(&file, 50.0).unwrap();
    let _ = p
        .proxy
        .live()
        .reload(cync_mitm::reload::Trigger::Admin)
        .unwrap();
    let l = p.proxy.config();
    assert_eq!(l.config.routing.canary_percent, 0.0);
    assert_eq!(l.base_routing.canary_percent, 50.0);
    let (_, c) = admin_call(&p, hyper::Method::GET, "/config").await;
    assert_eq!(c["file_routing"]["canary_percent"], 50.0);
    assert_eq!(c["runtime_override"]["rollback"]["by"], "auto");
    assert_eq!(on_path(&p, "new"), 0);
    // The running proxy holds the state file's lock.
    let state = dir.path().join("slo/state.json");
    assert!(cync_mitm::proxy::try_lock_slo_state(&state).is_none());
    // A restart keeps it too.
    fleet.stop().await;
    assert!(p.proxy.shutdown(Duration::from_secs(3)).await);
    drop(p);
    // Released with the proxy.
    assert!(
        wait_until(T, || cync_mitm::proxy::try_lock_slo_state(&state).is_some()).await,
        "the lock outlived its proxy"
    );
    backend.set_drop_answers(0.0);
    let (live, metrics) = live_from_file(&file);
    let again = start_proxy_live(live, metrics).await;
    assert!(cync_mitm::proxy::try_lock_slo_state(&state).is_none());
    assert_eq!(again.metrics.slo.rollback_active.get(), 1);
    assert_eq!(again.proxy.config().config.routing.canary_percent, 0.0);
    let mut fc = fleet_config(again.addr, 10);
    fc.heartbeat = Duration::from_millis(100);
    let fleet = start_fleet(fc);
    assert!(wait_until(T, || on_path(&again, "legacy") == 10).await);
    // Cleared: the file's 50 % is back, and its devices move to the new path.
    let (status, v) = admin_call(&again, hyper::Method::POST, "/rollback/clear").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["result"], "cleared");
    assert_eq!(again.proxy.config().config.routing.canary_percent, 50.0);
    assert_eq!(again.metrics.slo.rollback_active.get(), 0);
    assert!(
        wait_until(T, || on_path(&again, "new") > 0
            && on_path(&again, "new") + on_path(&again, "legacy") == 10)
        .await
    );
    let (_, v) = admin_call(&again, hyper::Method::POST, "/rollback/clear").await;
    assert_eq!(v["result"], "no_override");
    // Manual rollback: everyone back at once, counted as manual.
    let (status, v) = admin_call(&again, hyper::Method::POST, "/rollback").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["result"], "rolled_back");
    assert_eq!(
        again
            .metrics
            .slo
            .rollbacks
            .with_label_values(&["manual"])
            .get(),
        1
    );
    assert!(wait_until(T, || on_path(&again, "legacy") == 10).await);
    fleet.stop().await;
    legacy.stop().await;
    backend.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rollout_advances_on_healthy_slos_then_holds_and_rolls_back_on_a_violation() {
    let cmds = CloudSimConfig {
        command_interval: Some(Duration::from_millis(50)),
        ..CloudSimConfig::default()
    };
    let (legacy, legacy_addr) = start_cloud(cmds.clone()).await;
    let (backend, new_addr) = start_cloud(cmds).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = proxy_config(legacy_addr);
    use_new_path(&mut cfg, new_addr);
    cfg.new_path.answer_timeout = Duration::from_millis(300);
    // What the file says is ignored while the rollout runs.
    cfg.routing.mode = cync_mitm::route::Mode::LegacyOnly;
    cfg.routing.canary_percent = 0.0;
    cfg.slo.eval_interval = Duration::from_secs(1);
    cfg.slo.decision_log_heartbeat = Duration::from_secs(1);
    cfg.slo.min_events = 10;
    cfg.slo.state_file = dir.path().join("slo/state.json");
    cfg.rollout.enabled = true;
    cfg.rollout.steps = ["shadow", "50", "100"]
        .iter()
        .map(|s| cync_mitm::config::StepConfig::Name((*s).into()))
        .collect();
    cfg.rollout.bake_time = Duration::from_secs(2);
    cfg.rollout.min_budget = 0.0;
    let p = start_proxy(cfg.clone()).await;
    // The first step is in force from the start: shadow, every device mirrored.
    assert_eq!(
        p.proxy.config().config.routing.mode,
        cync_mitm::route::Mode::Shadow
    );
    assert_eq!(p.metrics.slo.rollout_step.get(), 0);
    let mut fc = fleet_config(p.addr, 10);
    fc.heartbeat = Duration::from_millis(100);
    let fleet = start_fleet(fc);
    let m = &p.metrics.slo;
    assert!(
        wait_until(Duration::from_secs(60), || m.rollout_step.get() == 2).await,
        "{}",
        p.proxy.rollout_report()
    );
    let l = p.proxy.config();
    assert_eq!(
        (l.config.routing.mode, l.config.routing.canary_percent),
        (cync_mitm::route::Mode::NewPrimary, 100.0)
    );
    assert!(wait_until(T, || on_path(&p, "new") == 10).await);
    let (_, r) = admin_call(&p, hyper::Method::GET, "/rollout").await;
    assert_eq!(r["status"]["state"], "done", "{r}");
    // The steps went up one at a time, each after its bake.
    let log = decisions(&dir.path().join("slo"));
    let advances: Vec<(String, String)> = log
        .iter()
        .filter_map(|d| {
            let a = &d["action"]["advance"];
            Some((a["from"].as_str()?.to_owned(), a["to"].as_str()?.to_owned()))
        })
        .collect();
    assert_eq!(
        advances,
        [
            ("shadow".into(), "50%".into()),
            ("50%".into(), "100%".into())
        ]
    );
    // A fault: the rollout (done) stops nothing more, the violations roll it back one step,
    // paused, behind the override.
    backend.set_drop_answers(0.5);
    assert!(
        wait_until(Duration::from_secs(60), || m.rollback_active.get() == 1).await,
        "{}",
        p.proxy.slo_report()
    );
    assert_eq!(m.rollout_step.get(), 1);
    assert_eq!(p.proxy.config().config.routing.canary_percent, 0.0);
    let (status, v) = admin_call(&p, hyper::Method::POST, "/rollout/resume").await;
    assert_eq!(status, 409, "no resume behind an override: {v}");
    // Cleared: back at the step before the failing one (50 %), paused.
    backend.set_drop_answers(0.0);
    admin_call(&p, hyper::Method::POST, "/rollback/clear").await;
    let l = p.proxy.config();
    assert_eq!(l.config.routing.canary_percent, 50.0);
    let (_, r) = admin_call(&p, hyper::Method::GET, "/rollout").await;
    assert_eq!(r["paused"], true, "{r}");
    let (status, r) = admin_call(&p, hyper::Method::POST, "/rollout/resume").await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["paused"], false);
    fleet.stop().await;
    legacy.stop().await;
    backend.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_violation_holds_the_rollout_before_it_rolls_back() {
    let (legacy, legacy_addr) = start_cloud(CloudSimConfig::default()).await;
    let (backend, new_addr) = start_cloud(CloudSimConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = proxy_config(legacy_addr);
    use_new_path(&mut cfg, new_addr);
    cfg.new_path.answer_timeout = Duration::from_millis(300);
    cfg.slo.eval_interval = Duration::from_secs(1);
    cfg.slo.min_events = 10;
    cfg.slo.max_violations = 5;
    cfg.slo.state_file = dir.path().join("slo/state.json");
    cfg.rollout.enabled = true;
    cfg.rollout.steps = vec![
        cync_mitm::config::StepConfig::Percent(50.0),
        cync_mitm::config::StepConfig::Percent(100.0),
    ];
    // A bake longer than the test: it never advances, it can only hold or roll back.
    cfg.rollout.bake_time = Duration::from_secs(3600);
    cfg.rollout.gates = vec!["request_success".into()];
    let p = start_proxy(cfg).await;
    let mut fc = fleet_config(p.addr, 10);
    fc.heartbeat = Duration::from_millis(100);
    let fleet = start_fleet(fc);
    let status = |p: &RunningProxy| p.proxy.rollout_report()["status"].clone();
    assert!(
        wait_until(T, || status(&p)["state"] == "baking").await,
        "{}",
        p.proxy.rollout_report()
    );
    backend.set_drop_answers(0.5);
    assert!(
        wait_until(T, || status(&p)["state"] == "holding"
            && status(&p)["why"]
                .as_str()
                .unwrap_or("")
                .contains("request_success violated"))
        .await,
        "{}",
        p.proxy.rollout_report()
    );
    assert_eq!(p.metrics.slo.rollback_active.get(), 0, "held first");
    assert!(
        wait_until(T, || p.metrics.slo.rollback_active.get() == 1).await,
        "{}",
        p.proxy.slo_report()
    );
    // The override is set first, the rollout's status right after it (a moment apart).
    assert!(
        wait_until(Duration::from_secs(5), || status(&p)["state"]
            == "rolled_back")
        .await,
        "{}",
        p.proxy.rollout_report()
    );
    fleet.stop().await;
    legacy.stop().await;
    backend.stop().await;
}

/// A one-shot HTTP server: answers each request with the next status of `statuses` after
/// `delay`, and hands over what it received.
async fn hook_server(
    statuses: Vec<u16>,
    delay: Duration,
) -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        for status in statuses {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let mut got = Vec::new();
            let mut buf = [0u8; 8192];
            // Headers, then the body by its content-length.
            loop {
                let n = s.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&got).to_string();
                if let Some(i) = text.find("\r\n\r\n") {
                    let len = text[..i]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if got.len() >= i + 4 + len {
                        break;
                    }
                }
            }
            tokio::time::sleep(delay).await;
            let _ = s
                .write_all(
                    format!(
                        "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    )
                    .as_bytes(),
                )
                .await;
            let _ = tx.send(String::from_utf8_lossy(&got).to_string());
        }
    });
    (addr, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rollback_webhook_is_retried_carries_the_decision_and_never_delays_the_rollback() {
    let (legacy, legacy_addr) = start_cloud(CloudSimConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    // Refused once, then slow (2 s) but accepted.
    let (hook, mut got) = hook_server(vec![500, 204], Duration::from_secs(2)).await;
    let mut cfg = proxy_config(legacy_addr);
    cfg.slo.state_file = dir.path().join("state.json");
    cfg.slo.webhook_url = format!("http://{hook}/hooks/cync");
    cfg.slo.webhook_token = "s3cret".into();
    cfg.slo.webhook_retries = 2;
    cfg.slo.webhook_timeout = Duration::from_secs(5);
    let p = start_proxy(cfg).await;
    let t = std::time::Instant::now();
    let (status, v) = admin_call(&p, hyper::Method::POST, "/rollback").await;
    assert_eq!(status, 200, "{v}");
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "the rollback waited for the webhook: {:?}",
        t.elapsed()
    );
    assert_eq!(p.proxy.config().config.routing.canary_percent, 0.0);
    let first = tokio::time::timeout(T, got.recv()).await.unwrap().unwrap();
    assert!(
        first.starts_with("POST /hooks/cync HTTP/1.1\r\n"),
        "{first}"
    );
    assert!(
        first
            .to_ascii_lowercase()
            .contains("authorization: bearer s3cret"),
        "{first}"
    );
    let body: serde_json::Value =
        serde_json::from_str(&first[first.find("\r\n\r\n").unwrap() + 4..]).unwrap();
    assert_eq!(body["event"], "rollback");
    assert_eq!(body["decision"]["action"]["rollback"]["by"], "manual");
    // The retry, after the refusal.
    let second = tokio::time::timeout(T, got.recv()).await.unwrap().unwrap();
    assert!(second.starts_with("POST /hooks/cync"), "{second}");
    let ok = &p.metrics.slo.webhook;
    assert!(wait_until(T, || ok.with_label_values(&["ok"]).get() == 1).await);
    assert_eq!(ok.with_label_values(&["error"]).get(), 0);
    // GET /config masks the token.
    let (_, c) = admin_call(&p, hyper::Method::GET, "/config").await;
    assert_eq!(c["config"]["slo"]["webhook_token"], "***");
    assert_eq!(
        c["file_routing"]["seed"], "***",
        "the file's routing is masked too"
    );
    legacy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_drains_at_its_own_rate_even_with_the_drain_off() {
    let (legacy, legacy_addr) = start_cloud(CloudSimConfig::default()).await;
    let (backend, new_addr) = start_cloud(CloudSimConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = proxy_config(legacy_addr);
    use_new_path(&mut cfg, new_addr);
    cfg.routing.mode = cync_mitm::route::Mode::NewPrimary;
    cfg.routing.canary_percent = 100.0;
    cfg.drain.enabled = false;
    cfg.slo.rollback_drain_rate = 4;
    cfg.slo.state_file = dir.path().join("state.json");
    let p = start_proxy(cfg).await;
    let fleet = start_fleet(fleet_config(p.addr, 12));
    assert!(wait_until(T, || on_path(&p, "new") == 12).await);
    admin_call(&p, hyper::Method::POST, "/rollback").await;
    let t = std::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let early = 12 - on_path(&p, "new");
    assert!(
        (1..=6).contains(&early),
        "{early} moved in the first second at 4/s"
    );
    assert!(wait_until(T, || on_path(&p, "legacy") == 12).await);
    let took = t.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "12 devices at 4/s took {took:?}"
    );
    fleet.stop().await;
    legacy.stop().await;
    backend.stop().await;
}

#[test]
fn the_override_sits_above_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    let mut cfg = proxy_config("127.0.0.1:9".parse().unwrap());
    cfg.new_path.addresses = vec!["127.0.0.1:9".into()];
    cfg.new_path.ca_file = Some(certs().ca_cert.clone());
    cfg.routing.mode = cync_mitm::route::Mode::NewPrimary;
    cfg.routing.canary_percent = 10.0;
    cfg.routing.cohort = vec!["1234abcd".into()];
    std::fs::write(&file, toml::to_string(&cfg).unwrap()).unwrap();
    let metrics = std::sync::Arc::new(cync_mitm::metrics::Metrics::new(false));
    let live = cync_mitm::reload::LiveConfig::new(
        cync_mitm::config::Config::load(&file).unwrap(),
        Some(file.clone()),
        metrics.clone(),
        |k| (k == "CANARY_PERCENTAGE").then(|| "50".to_owned()),
    )
    .unwrap();
    assert_eq!(
        live.current().config.routing.canary_percent,
        50.0,
        "env over file"
    );
    let rollback = cync_mitm::reload::Runtime {
        rollback: Some(cync_mitm::slo::control::Override {
            by: cync_mitm::slo::control::Actor::Manual,
            reason: "test".into(),
            at: 0,
        }),
        rollout: None,
    };
    let g = live.set_runtime(rollback.clone());
    let l = live.current();
    assert_eq!(g, 2);
    assert_eq!(l.config.routing.canary_percent, 0.0, "override over env");
    assert!(l.config.routing.cohort.is_empty());
    assert_eq!(metrics.canary_percentage.get(), 0.0);
    assert_eq!(
        live.set_runtime(rollback),
        2,
        "the same runtime again changes nothing"
    );
    // A reload of a changed file keeps it.
    cync_mitm::cmd::canary::set_percent(&file, 20.0).unwrap();
    live.reload(cync_mitm::reload::Trigger::Admin).unwrap();
    assert_eq!(live.current().config.routing.canary_percent, 0.0);
    // Lifted: env (50) again, and the file's cohort.
    live.set_runtime(cync_mitm::reload::Runtime::default());
    let l = live.current();
    assert_eq!(l.config.routing.canary_percent, 50.0);
    assert_eq!(l.config.routing.cohort, ["1234abcd"]);
}

fn cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_cync-mitm"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn the_cli_clears_overrides_and_reads_the_state_when_no_proxy_answers() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("slo/state.json");
    // An admin address nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let file = dir.path().join("c.toml");
    std::fs::write(
        &file,
        format!(
            "[upstream]\naddresses = [\"127.0.0.1:9\"]\n[admin]\nlisten = \"127.0.0.1:{port}\"\n\
             [slo]\nstate_file = \"{}\"\n[new_path]\naddresses = [\"127.0.0.1:9\"]\nverify = false\n\
             [rollout]\nenabled = true\nsteps = [\"shadow\", 50, 100]\n",
            state.display()
        ),
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let mut s = cync_mitm::slo::State::default();
    cync_mitm::slo::control::rollback(
        &mut s.control,
        None,
        cync_mitm::slo::control::Actor::Auto,
        "burning".into(),
        1_800_000_000,
    );
    s.control.rollout.step = 1;
    s.control.rollout.paused = true;
    cync_mitm::proxy::save_slo_state(&state, &s).unwrap();
    // Status from the file.
    let out = cli(&["rollout", "status", "--config", f]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains("shadow → [50%] → 100%"), "{text}");
    assert!(text.contains("rollback override in force"), "{text}");
    // Resume is refused behind the override.
    let out = cli(&["rollout", "resume", "--config", f]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("clear it first"));
    // A running proxy (its lock held) with no admin server: refused, the file untouched.
    let lock = cync_mitm::proxy::try_lock_slo_state(&state).unwrap();
    let out = cli(&["canary", "clear-override", "--config", f]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("a running proxy holds"),
        "{out:?}"
    );
    assert!(
        cync_mitm::cmd::slo::read_state(&state)
            .unwrap()
            .unwrap()
            .control
            .rollback
            .is_some()
    );
    drop(lock);
    // Nobody: the file is edited.
    let out = cli(&["canary", "clear-override", "--config", f]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("was removed from"),
        "{out:?}"
    );
    let after = cync_mitm::cmd::slo::read_state(&state).unwrap().unwrap();
    assert!(after.control.rollback.is_none());
    assert_eq!(
        std::fs::metadata(&state).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let out = cli(&["rollout", "resume", "--config", f]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        !cync_mitm::cmd::slo::read_state(&state)
            .unwrap()
            .unwrap()
            .control
            .rollout
            .paused
    );
    // The report reads the same file.
    let out = cli(&["slo", "report", "--config", f, "--days", "7"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.starts_with("# 7-Day SLO Compliance Report"), "{text}");
    assert!(text.contains("### Command success rate"), "{text}");
    let out = cli(&["slo", "report", "--config", f, "--days", "90"]);
    assert!(
        !out.status.success(),
        "90 days is more than the series keep"
    );
    // Rolling back with no proxy running writes the override (and steps the rollout back).
    let step_before = after.control.rollout.step;
    let out = cli(&["canary", "rollback", "--config", f]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("a rollback override was written to"),
        "{out:?}"
    );
    let rolled = cync_mitm::cmd::slo::read_state(&state).unwrap().unwrap();
    let o = rolled.control.rollback.as_ref().unwrap();
    assert_eq!(o.by, cync_mitm::slo::control::Actor::Manual);
    assert_eq!(rolled.control.rollout.step, step_before.saturating_sub(1));
    assert!(rolled.control.rollout.paused);
    let out = cli(&["canary", "rollback", "--config", f]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("already holds a rollback override"),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_state_file_is_moved_aside_and_the_proxy_starts_rolled_back() {
    let (legacy, legacy_addr) = start_cloud(CloudSimConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    std::fs::write(&state, b"{\"series\": [half a file").unwrap();
    let mut cfg = proxy_config(legacy_addr);
    cfg.new_path.addresses = vec!["127.0.0.1:9".into()];
    cfg.new_path.ca_file = Some(certs().ca_cert.clone());
    cfg.routing.mode = cync_mitm::route::Mode::NewPrimary;
    cfg.routing.canary_percent = 100.0;
    cfg.slo.state_file = state.clone();
    let p = start_proxy(cfg).await;
    assert_eq!(p.metrics.slo.rollback_active.get(), 1);
    assert_eq!(p.proxy.config().config.routing.canary_percent, 0.0);
    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("state.json.unreadable-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "moved aside");
    assert_eq!(
        std::fs::read(aside[0].path()).unwrap(),
        b"{\"series\": [half a file",
        "kept as it was"
    );
    // Written at once: a crash now still starts rolled back.
    let s = cync_mitm::cmd::slo::read_state(&state).unwrap().unwrap();
    let o = s.control.rollback.unwrap();
    assert!(o.reason.contains("could not be read"), "{}", o.reason);
    legacy.stop().await;
}
