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
    cfg.new_path.addresses = vec![new_addr.to_string()];
    cfg.new_path.ca_file = Some(certs().ca_cert.clone());
    cfg.new_path.sni = Some("cm.gelighting.com".into());
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
