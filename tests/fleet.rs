//! Fleet mode: two proxy replicas read their SLIs from a real Prometheus (Debian's, started
//! here on loopback) that scrapes both, reach the same verdicts, and roll back on the same
//! evaluation when the shared new backend starts leaving half its answers unsent.

mod common;

use common::harness::*;
use common::tshark::have_tool;
use cync_mitm::sim::cloud::CloudSimConfig;
use std::time::Duration;

struct Prometheus {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start_prometheus(targets: &[std::net::SocketAddr]) -> Prometheus {
    let dir = tempfile::tempdir().unwrap();
    let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
    let cfg = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: cync-mitm\n    static_configs:\n      - targets: [{}]\n",
        list.join(", ")
    );
    let file = dir.path().join("prometheus.yml");
    std::fs::write(&file, cfg).unwrap();
    let port = free_port();
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let child = std::process::Command::new("prometheus")
        .arg(format!("--config.file={}", file.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let ready = cync_mitm::httpc::Target::parse(&format!("{url}/-/ready")).unwrap();
    let mut up = false;
    for _ in 0..100 {
        if let Ok((s, _)) = cync_mitm::httpc::request(
            &ready,
            hyper::Method::GET,
            &[],
            bytes::Bytes::new(),
            Duration::from_secs(1),
        )
        .await
            && s.is_success()
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let p = Prometheus {
        child,
        url,
        _dir: dir,
    };
    assert!(
        up,
        "prometheus did not become ready: {}",
        std::fs::read_to_string(p._dir.path().join("prometheus.log")).unwrap_or_default()
    );
    p
}

struct Replica {
    proxy: RunningProxy,
    state_dir: tempfile::TempDir,
    _stop: tokio_util::sync::DropGuard,
}

/// A proxy in fleet mode with its admin server (what Prometheus scrapes) on `admin`.
async fn replica(
    legacy: std::net::SocketAddr,
    backend: std::net::SocketAddr,
    prometheus: &str,
    admin: std::net::SocketAddr,
) -> Replica {
    let state_dir = tempfile::tempdir().unwrap();
    let mut cfg = proxy_config(legacy);
    use_new_path(&mut cfg, backend);
    cfg.new_path.answer_timeout = Duration::from_millis(300);
    cfg.routing.mode = cync_mitm::route::Mode::NewPrimary;
    cfg.routing.canary_percent = 100.0;
    cfg.slo.source = cync_mitm::config::SloSource::Prometheus;
    cfg.slo.prometheus_url = prometheus.to_owned();
    cfg.slo.prometheus_selector = r#"job="cync-mitm""#.into();
    cfg.slo.eval_interval = Duration::from_secs(2);
    cfg.slo.decision_log_heartbeat = Duration::from_secs(2);
    cfg.slo.min_events = 20;
    cfg.slo.state_file = state_dir.path().join("state.json");
    let proxy = start_proxy(cfg.clone()).await;
    let l = tokio::net::TcpListener::bind(admin).await.unwrap();
    let st = cync_mitm::admin::AdminState::new(proxy.metrics.clone(), Some(proxy.proxy.clone()));
    st.ready.store(true, std::sync::atomic::Ordering::Relaxed);
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(cync_mitm::admin::run(
        l,
        st,
        stop.clone(),
        cync_mitm::admin::Limits::from(&cfg.admin),
    ));
    Replica {
        proxy,
        state_dir,
        _stop: stop.drop_guard(),
    }
}

fn log_lines(dir: &std::path::Path) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains("decisions-"))
        .collect();
    files.sort();
    for f in files {
        for l in std::fs::read_to_string(f).unwrap().lines() {
            out.push(serde_json::from_str(l).unwrap());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_read_prometheus_and_roll_back_on_the_same_evaluation() {
    if !have_tool("prometheus", "--version") {
        return;
    }
    let (legacy, legacy_addr) = start_cloud(CloudSimConfig::default()).await;
    let (backend, backend_addr) = start_cloud(CloudSimConfig::default()).await;
    // Prometheus first (its address goes into the replicas' config), scraping both admin ports.
    let ports = [free_port(), free_port()];
    let admins: Vec<std::net::SocketAddr> = ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}").parse().unwrap())
        .collect();
    let prom = start_prometheus(&admins).await;
    let mut replicas = Vec::new();
    for a in &admins {
        replicas.push(replica(legacy_addr, backend_addr, &prom.url, *a).await);
    }
    // Five devices on each replica, as a load balancer would spread them.
    let mut fleets = Vec::new();
    for (i, r) in replicas.iter().enumerate() {
        let mut fc = fleet_config(r.proxy.addr, 5);
        fc.seed = 100 + i as u64;
        fc.heartbeat = Duration::from_millis(100);
        fleets.push(start_fleet(fc));
    }
    let met = |r: &Replica| {
        r.proxy
            .metrics
            .slo
            .verdict
            .with_label_values(&["new", "request_success"])
            .get()
            == 1.0
    };
    assert!(
        wait_until(Duration::from_secs(60), || replicas.iter().all(met)).await,
        "{}",
        replicas[0].proxy.proxy.slo_report()
    );
    backend.set_drop_answers(0.5);
    let rolled = |r: &Replica| r.proxy.metrics.slo.rollback_active.get() == 1;
    assert!(
        wait_until(Duration::from_secs(90), || replicas.iter().all(rolled)).await,
        "{}\n{}",
        replicas[0].proxy.proxy.slo_report(),
        replicas[1].proxy.proxy.slo_report()
    );
    // The same evaluation (tick) on both, from the same numbers: the fleet's, not their own.
    let rollback_of = |r: &Replica| {
        let logged = |d: &serde_json::Value| d["action"]["rollback"].is_object();
        log_lines(r.state_dir.path()).into_iter().find(logged)
    };
    assert!(
        wait_until(Duration::from_secs(10), || replicas
            .iter()
            .all(|r| rollback_of(r).is_some()))
        .await
    );
    let a = rollback_of(&replicas[0]).unwrap();
    let b = rollback_of(&replicas[1]).unwrap();
    assert_eq!(a["source"], "prometheus");
    assert_eq!(a["tick"], b["tick"], "{a}\n{b}");
    assert_eq!(a["slos"], b["slos"], "same inputs on both replicas");
    let new_rs = a["slos"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["transport"] == "new" && s["slo"] == "request_success")
        .unwrap()
        .clone();
    // Both replicas' requests are in the counts: more than either replica saw by itself, even
    // counting what it saw after the evaluation.
    let own: u64 = replicas
        .iter()
        .map(|r| {
            r.proxy
                .metrics
                .transport
                .latency
                .with_label_values(&["new", "request"])
                .get_sample_count()
        })
        .max()
        .unwrap();
    assert!(
        new_rs["good"].as_u64().unwrap() + new_rs["bad"].as_u64().unwrap() > own,
        "{new_rs} vs {own}"
    );
    for f in fleets {
        f.stop().await;
    }
    drop(replicas);
    drop(prom);
    legacy.stop().await;
    backend.stop().await;
}
