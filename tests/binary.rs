//! The real binary: `run` with a config file, SIGTERM drain, `config check`, `certs init`.

mod common;

use common::harness::*;
use cync_mitm::sim::cloud::CloudSimConfig;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt as _;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The binary, run from a scratch folder: what it writes to paths relative to its working
/// directory (the SLO state, drift logs) never lands in the working tree.
fn bin() -> Command {
    let scratch =
        std::env::temp_dir().join(format!("cync-mitm-binary-tests-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&scratch);
    let mut c = Command::new(env!("CARGO_BIN_EXE_cync-mitm"));
    c.current_dir(scratch);
    c
}

/// Writes `dir/proxy.toml` for `run`: loopback listener and admin, `upstream` as the only
/// address, certificates in `dir/certs`, then `extra` (dotted keys, such as
/// `admin.idle_timeout = "2s"`).
fn proxy_toml(
    dir: &std::path::Path,
    upstream: std::net::SocketAddr,
    extra: &str,
) -> std::path::PathBuf {
    let cfg = dir.join("proxy.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen.tls = \"127.0.0.1:0\"\nupstream.addresses = [\"{upstream}\"]\n\
             admin.listen = \"127.0.0.1:0\"\ntls.cert_dir = \"{}\"\n\
             slo.state_file = \"{}\"\n{extra}",
            dir.join("certs").display(),
            dir.join("slo/state.json").display()
        ),
    )
    .unwrap();
    cfg
}

async fn http_get(addr: &str, path: &str) -> (u16, String) {
    http(addr, "GET", path).await
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!("{key}="))? + key.len() + 1;
    line[start..].split_whitespace().next()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_cleanly() {
    let (cloud, cloud_addr) = start_cloud(CloudSimConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = proxy_toml(dir.path(), cloud_addr, "timeouts.drain = \"5s\"\n");
    let (mut child, rx, tls, admin, mut log) = spawn_proxy(&cfg, &[]);
    // Certificates were minted with private keys 0600.
    let key = dir.path().join("certs/server-rsa-key.pem");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let fleet = start_fleet(fleet_config(tls, 3));
    assert!(
        wait_until(Duration::from_secs(15), || fleet
            .stats()
            .online
            .load(Ordering::Relaxed)
            == 3)
        .await
    );
    assert_eq!(http_get(&admin, "/readyz").await.0, 200);
    assert_eq!(http_get(&admin, "/healthz").await.0, 200);
    let (code, metrics) = http_get(&admin, "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        metrics.contains("cync_mitm_connections_active{peer=\"device\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics
            .contains("cync_mitm_frames_total{direction=\"device_to_cloud\",transport=\"legacy\",type=\"handshake\"} 3")
    );

    let pid = child.id().to_string();
    let t0 = Instant::now();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}");
    while let Ok(l) = rx.recv_timeout(Duration::from_millis(500)) {
        log.push(l);
    }
    let log = log.join("\n");
    assert!(log.contains("SIGTERM"), "{log}");
    assert!(log.contains("all sessions closed"), "{log}");
    assert!(
        wait_until(Duration::from_secs(5), || fleet
            .stats()
            .disconnects
            .load(Ordering::Relaxed)
            >= 3)
        .await
    );
    fleet.stop().await;
    cloud.stop().await;
}

/// Runs the binary's `args` off the async threads (it blocks until the command ends).
async fn cli_async(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || bin().args(args).output().unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_closes_sessions_at_its_rate_then_sigterm_ends_at_once() {
    let (cloud, cloud_addr) = start_cloud(CloudSimConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = proxy_toml(dir.path(), cloud_addr, "timeouts.drain = \"30s\"\n");
    let (mut child, rx, tls, admin, mut log) = spawn_proxy(&cfg, &[]);
    // The CLI finds the admin server in a config file: one naming the address it took.
    let cli_cfg = dir.path().join("cli.toml");
    std::fs::write(&cli_cfg, format!("admin.listen = \"{admin}\"\n")).unwrap();
    let cli_cfg = cli_cfg.display().to_string();

    let fleet = start_fleet(fleet_config(tls, 20));
    assert!(
        wait_until(Duration::from_secs(20), || fleet
            .stats()
            .online
            .load(Ordering::Relaxed)
            == 20)
        .await
    );
    assert_eq!(http_get(&admin, "/readyz").await.0, 200);
    let (code, before) = http_get(&admin, "/drain").await;
    assert_eq!(code, 200);
    let before: serde_json::Value = serde_json::from_str(&before).unwrap();
    assert_eq!(before["draining"], false, "{before}");
    assert_eq!(before["sessions"], 20, "{before}");
    // A drain is state-changing: GET does not begin it, and a bad rate is refused.
    assert_eq!(http(&admin, "POST", "/drain?rate=0").await.0, 400);
    assert_eq!(http(&admin, "POST", "/drain?rate=x").await.0, 400);
    assert_eq!(http_get(&admin, "/readyz").await.0, 200);

    // `canary rollback` goes through the admin server (loopback), then clear-override.
    let rb = cli_async(
        ["canary", "rollback", "--config", &cli_cfg]
            .map(String::from)
            .to_vec(),
    )
    .await;
    assert!(rb.status.success(), "{rb:?}");
    assert!(
        String::from_utf8_lossy(&rb.stdout).contains("rolled back on the proxy at"),
        "{rb:?}"
    );
    let (_, metrics) = http_get(&admin, "/metrics").await;
    assert!(
        metrics.contains("cync_mitm_rollback_override 1"),
        "{metrics}"
    );
    let cl = cli_async(
        ["canary", "clear-override", "--config", &cli_cfg]
            .map(String::from)
            .to_vec(),
    )
    .await;
    assert!(cl.status.success(), "{cl:?}");
    let (_, metrics) = http_get(&admin, "/metrics").await;
    assert!(
        metrics.contains("cync_mitm_rollback_override 0"),
        "{metrics}"
    );

    // 20 devices at 10 a second: about 2 s, a device each tenth of a second.
    let t0 = Instant::now();
    let drain = tokio::spawn(cli_async(
        [
            "drain",
            "--config",
            &cli_cfg,
            "--rate",
            "10",
            "--timeout",
            "20s",
        ]
        .map(String::from)
        .to_vec(),
    ));
    assert!(
        wait_until(Duration::from_secs(5), || fleet
            .stats()
            .disconnects
            .load(Ordering::Relaxed)
            >= 1)
        .await
    );
    let (code, body) = http_get(&admin, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("draining"), "{body}");
    // Paced, not all at once.
    let (_, mid) = http_get(&admin, "/drain").await;
    let mid: serde_json::Value = serde_json::from_str(&mid).unwrap();
    assert_eq!(mid["draining"], true, "{mid}");
    assert!(mid["sessions"].as_u64().unwrap() >= 5, "{mid}");
    // Nothing new is accepted meanwhile.
    assert!(
        tokio::net::TcpStream::connect(tls).await.is_err(),
        "a draining proxy accepted a connection"
    );
    let (_, metrics) = http_get(&admin, "/metrics").await;
    assert!(metrics.contains("cync_mitm_draining 1"), "{metrics}");
    // Asking again changes nothing.
    let (code, again) = http(&admin, "POST", "/drain?rate=1000").await;
    assert_eq!(code, 200);
    let again: serde_json::Value = serde_json::from_str(&again).unwrap();
    assert_eq!(again["result"], "already_draining", "{again}");
    assert_eq!(again["per_second"], 10, "{again}");

    let out = drain.await.unwrap();
    let took = t0.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains("drained: 20 sessions asked to close, none left"),
        "{stdout}"
    );
    assert!(took >= Duration::from_millis(1500), "{took:?}");
    let disconnects = fleet.stats().disconnects.load(Ordering::Relaxed);
    assert!(disconnects >= 20, "{disconnects}");
    // The health check tells the two apart: alive, not ready.
    let hc = cli_async(
        ["healthcheck", "--config", &cli_cfg]
            .map(String::from)
            .to_vec(),
    )
    .await;
    assert!(hc.status.success(), "{hc:?}");
    let hc = cli_async(
        ["healthcheck", "--ready", "--config", &cli_cfg]
            .map(String::from)
            .to_vec(),
    )
    .await;
    assert_eq!(hc.status.code(), Some(1), "{hc:?}");
    assert!(
        String::from_utf8_lossy(&hc.stderr).contains("draining"),
        "{hc:?}"
    );

    // With nothing left open, SIGTERM ends the process at once.
    let t1 = Instant::now();
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(5),
            "no exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}");
    while let Ok(l) = rx.recv_timeout(Duration::from_millis(300)) {
        log.push(l);
    }
    let log = log.join("\n");
    assert!(log.contains("drain: every session closed"), "{log}");
    assert!(log.contains("all sessions closed"), "{log}");
    // With no proxy left, the command says so and exits 2.
    let gone = cli_async(["drain", "--config", &cli_cfg].map(String::from).to_vec()).await;
    assert_eq!(gone.status.code(), Some(2), "{gone:?}");
    assert!(
        String::from_utf8_lossy(&gone.stderr).contains("no proxy answered"),
        "{gone:?}"
    );
    fleet.stop().await;
    cloud.stop().await;
}

#[test]
fn config_check_reports_file_line_and_field_with_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[upstream]\nmode = \"fixed\"\npin_sha256 = [\"xyz\"]\n",
    )
    .unwrap();
    let out = bin().args(["config", "check"]).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:3:1: upstream.pin_sha256:"), "{err}");

    let unknown = dir.path().join("unknown.toml");
    std::fs::write(&unknown, "[timeouts]\nidle = \"90s\"\nidel = \"1s\"\n").unwrap();
    let out = bin()
        .args(["config", "check"])
        .arg(&unknown)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown.toml:3:1: timeouts.idel: unknown field"),
        "{err}"
    );

    // `run` refuses an invalid start config with the same status.
    let out = bin()
        .args(["run", "--config"])
        .arg(&unknown)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));

    for good in ["config/cync-mitm.toml", "config/default.toml"] {
        let out = bin()
            .args(["config", "check", good])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{good}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn certs_init_refuses_to_overwrite_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("c");
    let out = bin()
        .args(["certs", "init", "--dir"])
        .arg(&d)
        .output()
        .unwrap();
    assert!(out.status.success());
    let before = std::fs::read(d.join("server-rsa.pem")).unwrap();
    let out = bin()
        .args(["certs", "init", "--dir"])
        .arg(&d)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    assert_eq!(std::fs::read(d.join("server-rsa.pem")).unwrap(), before);
    let out = bin()
        .args(["certs", "init", "--force", "--dir"])
        .arg(&d)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_ne!(std::fs::read(d.join("server-rsa.pem")).unwrap(), before);
    for k in ["ca-key.pem", "server-rsa-key.pem", "server-ecdsa-key.pem"] {
        assert_eq!(
            std::fs::metadata(d.join(k)).unwrap().permissions().mode() & 0o777,
            0o600,
            "{k}"
        );
    }
}

async fn http(addr: &str, method: &str, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let code = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (code, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_and_post_reload_apply_a_new_generation() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("proxy.toml");
    let write = |pct: u32| {
        std::fs::write(
            &cfg,
            format!(
                "[listen]\ntls = \"127.0.0.1:0\"\n[upstream]\naddresses = [\"127.0.0.1:9\"]\n\
                 [admin]\nlisten = \"127.0.0.1:0\"\n[tls]\ncert_dir = \"{}\"\n\
                 [reload]\nwatch = false\n[routing]\ncanary_percent = {pct}\n",
                dir.path().join("certs").display()
            ),
        )
        .unwrap()
    };
    write(0);
    let mut child = bin()
        .args(["run", "--config"])
        .arg(&cfg)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let listening = loop {
        let l = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("no 'listening' line");
        if l.contains("listening") {
            break l;
        }
    };
    let admin = field(&listening, "admin").unwrap().to_owned();
    let generation = |body: &str| -> (u64, f64) {
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        (
            v["generation"].as_u64().unwrap(),
            v["config"]["routing"]["canary_percent"].as_f64().unwrap(),
        )
    };
    let (code, body) = http(&admin, "GET", "/config").await;
    assert_eq!(code, 200);
    assert_eq!(generation(&body), (1, 0.0));
    assert!(body.contains("\"seed\": \"***\""), "{body}");

    write(25);
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let t0 = Instant::now();
    loop {
        let (_, body) = http(&admin, "GET", "/config").await;
        if generation(&body) == (2, 25.0) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "SIGHUP did not reload: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    write(40);
    let (code, body) = http(&admin, "POST", "/reload").await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["result"], "applied");
    assert_eq!(v["generation"], 3);
    let (_, body) = http(&admin, "POST", "/reload").await;
    assert!(body.contains("unchanged"), "{body}");
    std::fs::write(&cfg, "[routing]\ncanary_percent = \"lots\"\n").unwrap();
    let (code, body) = http(&admin, "POST", "/reload").await;
    assert_eq!(code, 422, "{body}");
    assert!(
        body.contains("proxy.toml:2:18: routing.canary_percent"),
        "{body}"
    );
    let (_, body) = http(&admin, "GET", "/routing").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["generation"], 3);
    assert_eq!(v["canary_percent"], 40.0);
    let (_, metrics) = http(&admin, "GET", "/metrics").await;
    assert!(
        metrics.contains("cync_mitm_config_generation 3"),
        "{metrics}"
    );
    assert!(metrics.contains("cync_mitm_config_reloads_total{result=\"error\"} 1"));
    assert!(metrics.contains("tcp_comm_canary_percentage 40"));

    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    assert!(child.wait().unwrap().success());
}

#[test]
fn canary_set_edits_the_file_and_refuses_invalid_results() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.toml");
    std::fs::write(
        &f,
        "# my rollout\n[routing]\n# stage 1\ncanary_percent = 10\nmode = \"shadow\"\n",
    )
    .unwrap();
    let out = bin()
        .args(["canary", "set", "25", "--config"])
        .arg(&f)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("10 -> 25"));
    let text = std::fs::read_to_string(&f).unwrap();
    assert!(
        text.contains("# my rollout") && text.contains("# stage 1"),
        "{text}"
    );
    assert!(text.contains("canary_percent = 25"), "{text}");
    let out = bin()
        .args(["canary", "set", "250", "--config"])
        .arg(&f)
        .output()
        .unwrap();
    assert!(!out.status.success());
    std::fs::write(&f, "[routing]\nmode = \"new_only\"\n").unwrap();
    let out = bin()
        .args(["canary", "set", "5", "--config"])
        .arg(&f)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("new_path.addresses"));
    assert_eq!(
        std::fs::read_to_string(&f).unwrap(),
        "[routing]\nmode = \"new_only\"\n"
    );
}

/// Starts `cync-mitm run --config cfg` (under `prefix`, such as `prlimit`), and waits for its
/// `listening` line. Returns the child, its log lines, and the TLS and admin addresses.
fn spawn_proxy(
    cfg: &std::path::Path,
    prefix: &[&str],
) -> (
    std::process::Child,
    mpsc::Receiver<String>,
    std::net::SocketAddr,
    String,
    Vec<String>,
) {
    let mut cmd = match prefix.split_first() {
        Some((p, rest)) => {
            let mut c = Command::new(p);
            c.args(rest).arg(env!("CARGO_BIN_EXE_cync-mitm"));
            // Not the checkout: relative default paths (captures/slo/state.json) land here.
            c.current_dir(
                bin()
                    .get_current_dir()
                    .unwrap_or(std::path::Path::new("/tmp")),
            );
            c
        }
        None => bin(),
    };
    let mut child = cmd
        .args(["run", "--config"])
        .arg(cfg)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut before = Vec::new();
    let listening = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("no 'listening' line");
        if line.contains("listening") {
            break line;
        }
        before.push(line);
    };
    let tls = field(&listening, "tls").unwrap().parse().unwrap();
    let admin = field(&listening, "admin").unwrap().to_owned();
    (child, rx, tls, admin, before)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_admin_connections_are_capped_and_timed_out_and_devices_still_connect() {
    let (cloud, cloud_addr) = start_cloud(CloudSimConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = proxy_toml(
        dir.path(),
        cloud_addr,
        "admin.header_timeout = \"1s\"\nadmin.idle_timeout = \"2s\"\nadmin.max_connections = 32\n",
    );
    // 128 descriptors for the whole proxy: 300 idle admin connections would take them all.
    let (mut child, _log, tls, admin, before) = spawn_proxy(&cfg, &["prlimit", "--nofile=128:128"]);
    // 128 is far below what the defaults may need: it says so at start.
    assert!(
        before
            .iter()
            .any(|l| l.contains("descriptor limit is below")),
        "{before:#?}"
    );
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(tokio::net::TcpStream::connect(&admin).await.unwrap());
    }
    let fleet = start_fleet(fleet_config(tls, 10));
    assert!(
        wait_until(Duration::from_secs(15), || fleet
            .stats()
            .online
            .load(Ordering::Relaxed)
            == 10)
        .await,
        "devices could not connect: {:?}",
        fleet.report()
    );
    // Every idle admin connection is closed by the proxy within the header timeout (+ slack).
    let t0 = Instant::now();
    for mut s in idle {
        let mut b = [0u8; 64];
        let r = tokio::time::timeout(Duration::from_secs(4), s.read(&mut b)).await;
        assert!(
            matches!(r, Ok(Ok(0)) | Ok(Err(_))),
            "an idle admin connection stayed open {:?}",
            t0.elapsed()
        );
    }
    eprintln!("300 idle admin connections closed after {:?}", t0.elapsed());
    let (code, metrics) = http_get(&admin, "/metrics").await;
    assert_eq!(code, 200);
    let rejected: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("cync_mitm_admin_rejected_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    assert!(
        rejected >= 150.0,
        "{rejected} rejected (the cap is 32 of 300; connections closed by the header timeout free slots)"
    );
    // A keep-alive connection that went quiet after a request is closed (hyper's header
    // timeout also runs between requests; src/admin.rs tests each timeout alone).
    let mut s = tokio::net::TcpStream::connect(&admin).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut b = [0u8; 512];
    assert!(s.read(&mut b).await.unwrap() > 0);
    let t1 = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(6), async {
        loop {
            match s.read(&mut b).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(r.is_ok(), "a quiet keep-alive connection stayed open");
    assert!(
        t1.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t1.elapsed()
    );
    let _ = child.kill();
    let _ = child.wait();
    fleet.stop().await;
    cloud.stop().await;
}

/// A plaintext "upstream" that is not a Cync cloud: it accepts and closes at once, or answers
/// every connection like an HTTP server.
async fn bad_upstream(http: bool) -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                if http {
                    let mut b = [0u8; 256];
                    let _ = s.read(&mut b).await;
                    let _ = s
                        .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                        .await;
                }
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_that_close_or_speak_http_hold_devices_and_make_readyz_false() {
    for http in [false, true] {
        let up = bad_upstream(http).await;
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("proxy.toml");
        std::fs::write(
            &cfg,
            format!(
                "[listen]\ntls = \"127.0.0.1:0\"\n[upstream]\naddresses = [\"{up}\"]\ntls = false\n\
                 cloud_down_close_delay = \"1s\"\nprobe_interval = \"1s\"\n\
                 [admin]\nlisten = \"127.0.0.1:0\"\n[tls]\ncert_dir = \"{}\"\n",
                dir.path().join("certs").display()
            ),
        )
        .unwrap();
        let (mut child, log, tls, admin, _) = spawn_proxy(&cfg, &[]);
        let fleet = start_fleet(fleet_config(tls, 3));
        tokio::time::sleep(Duration::from_secs(3)).await;
        let connects = fleet.stats().connects.load(Ordering::Relaxed);
        // Held 1 s each: about 3 connections per device in 3 s, not a reconnect loop (the
        // fleet retries after 100-400 ms).
        assert!(
            connects <= 3 * 4,
            "{connects} connects in 3 s (http={http})"
        );
        assert_eq!(fleet.stats().online.load(Ordering::Relaxed), 0);
        let (code, body) = http_get(&admin, "/readyz").await;
        assert_eq!(code, 503, "{body}");
        assert!(body.contains(&up.to_string()), "{body}");
        let (_, m) = http_get(&admin, "/metrics").await;
        let line = format!("cync_mitm_upstream_up{{address=\"{up}\",path=\"legacy\"}} 0");
        assert!(m.contains(&line), "{line} not in\n{m}");
        let _ = child.kill();
        let _ = child.wait();
        fleet.stop().await;
        let log: Vec<String> = log.try_iter().collect();
        let want = if http {
            "does not speak Cync: it answered \"HTTP/1.1 400 Bad Request"
        } else {
            "closed the connection before answering the handshake"
        };
        assert!(
            log.iter().any(|l| l.contains(want)),
            "no {want:?} in the log:\n{}",
            log.join("\n")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_upstream() {
    let (cloud, cloud_addr) = start_cloud(CloudSimConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = proxy_toml(dir.path(), cloud_addr, "upstream.probe_interval = \"1s\"\n");
    let (mut child, _log, _tls, admin, _) = spawn_proxy(&cfg, &[]);
    // With no device at all, the probe makes it ready.
    let mut ready = false;
    for _ in 0..50 {
        if http_get(&admin, "/readyz").await.0 == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "never ready with a working upstream");
    // The upstream goes away: within a few probe intervals it is not ready.
    cloud.stop().await;
    let mut down = false;
    for _ in 0..100 {
        if http_get(&admin, "/readyz").await.0 == 503 {
            down = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(down, "still ready with the upstream gone");
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unverified_tls_legs_are_warned_about_at_start_and_on_reload() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("proxy.toml");
    let write = |new_path: &str| {
        let text = format!(
            "[listen]\ntls = \"127.0.0.1:0\"\n[upstream]\naddresses = [\"127.0.0.1:9\"]\n\
             pin_sha256 = [\"{}\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n[tls]\ncert_dir = \"{}\"\n\
             [reload]\ndebounce = \"50ms\"\n[new_path]\naddresses = [\"127.0.0.1:9\"]\n{new_path}",
            "ab".repeat(32),
            dir.path().join("certs").display()
        );
        let tmp = cfg.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &cfg).unwrap();
    };
    write("verify = false\n");
    let (mut child, log, _tls, admin, before) = spawn_proxy(&cfg, &[]);
    let warned = |l: &str| l.contains("new_path certificate verification is OFF");
    assert!(before.iter().any(|l| warned(l)), "{before:#?}");
    assert!(
        !before
            .iter()
            .any(|l| l.contains("upstream certificate verification is OFF")),
        "the upstream is pinned: {before:#?}"
    );
    // A reload to a verified new path: no warning; back to unverified: warned again.
    write(&format!("pin_sha256 = [\"{}\"]\n", "cd".repeat(32)));
    let (code, body) = http(&admin, "POST", "/reload").await;
    assert_eq!(code, 200, "{body}");
    // The verified configuration is in force and said nothing.
    let mut after_verified = Vec::new();
    while let Ok(l) = log.recv_timeout(Duration::from_millis(300)) {
        after_verified.push(l);
    }
    assert!(
        !after_verified.iter().any(|l| warned(l)),
        "a verified new path warned: {after_verified:#?}"
    );
    write("verify = false\n");
    let (code, body) = http(&admin, "POST", "/reload").await;
    assert_eq!(code, 200, "{body}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut seen = false;
    while std::time::Instant::now() < deadline {
        if let Ok(l) = log.recv_timeout(Duration::from_millis(200))
            && warned(&l)
        {
            seen = true;
            break;
        }
    }
    assert!(
        seen,
        "no warning after the reload that turned verification off"
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// Out of descriptors, an upstream connect fails in the proxy, not at the cloud: counted as
/// `local_error`, not charged to the upstream, and `/readyz` stays true.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_descriptors_is_not_blamed_on_the_upstream() {
    let (cloud, cloud_addr) = start_cloud(CloudSimConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = proxy_toml(
        dir.path(),
        cloud_addr,
        "upstream.cloud_down_close_delay = \"200ms\"\nupstream.probe_interval = \"1s\"\n",
    );
    let (mut child, log, tls, admin, _) = spawn_proxy(&cfg, &["prlimit", "--nofile=48:48"]);
    // 40 devices need 80 descriptors: some device accepts succeed and their upstream connect
    // then hits the limit.
    let mut fc = fleet_config(tls, 40);
    fc.reconnect_min = Duration::from_millis(500);
    fc.reconnect_max = Duration::from_millis(1000);
    let fleet = start_fleet(fc);
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut saw = false;
    while Instant::now() < deadline && !saw {
        if let Ok(l) = log.recv_timeout(Duration::from_millis(200)) {
            saw = l.contains("out of descriptors");
        }
    }
    fleet.stop().await;
    assert!(saw, "no 'out of descriptors' line");
    // Let the held connections go, then look.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (code, metrics) = http_get(&admin, "/metrics").await;
    assert_eq!(code, 200);
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    assert!(
        value("cync_mitm_connections_closed_total{reason=\"local_error\",transport=\"legacy\"} ")
            >= 1.0,
        "{metrics}"
    );
    assert_eq!(
        value("cync_mitm_connections_closed_total{reason=\"cloud_down\",transport=\"legacy\"} "),
        0.0,
        "descriptor exhaustion blamed on the cloud"
    );
    let (code, body) = http_get(&admin, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    let _ = child.kill();
    let _ = child.wait();
    cloud.stop().await;
}
