//! The web console: its JSON endpoints and event stream over real sockets, its controls'
//! guards, and the page itself in a real headless Chromium driven through ChromeDriver.

mod common;

use common::harness::{
    certs, fleet_config, proxy_config, start_cloud, start_fleet, use_new_path, wait_until,
};
use cync_mitm::config::Config;
use cync_mitm::sim::cloud::CloudSimConfig;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A proxy started as `cync-mitm run --config FILE` starts (admin server, console, watcher),
/// in new_primary mode at 0 %, with a legacy cloud that sends commands and a new backend.
struct Setup {
    running: Option<cync_mitm::app::Running>,
    admin: SocketAddr,
    file: PathBuf,
    _dir: tempfile::TempDir,
    fleet: Arc<cync_mitm::sim::devices::Fleet>,
    devices: u32,
}

async fn setup(devices: u32, heartbeat: Duration) -> Setup {
    setup_with(devices, heartbeat, |_| {}).await
}

async fn setup_with(devices: u32, heartbeat: Duration, edit: impl FnOnce(&mut Config)) -> Setup {
    let (_legacy, legacy_addr) = start_cloud(CloudSimConfig {
        command_interval: Some(Duration::from_millis(300)),
        ..CloudSimConfig::default()
    })
    .await;
    let (_backend, backend_addr) = start_cloud(CloudSimConfig {
        command_interval: Some(Duration::from_millis(300)),
        ..CloudSimConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = proxy_config(legacy_addr);
    use_new_path(&mut cfg, backend_addr);
    cfg.admin.listen = "127.0.0.1:0".parse().unwrap();
    cfg.routing.mode = cync_mitm::route::Mode::NewPrimary;
    cfg.routing.canary_percent = 0.0;
    cfg.drain.interval = Duration::from_millis(100);
    cfg.drain.batch = 100;
    cfg.slo.state_file = dir.path().join("slo/state.json");
    cfg.parity.dir = dir.path().join("parity");
    cfg.reload.debounce = Duration::from_millis(50);
    edit(&mut cfg);
    let file = dir.path().join("cync-mitm.toml");
    std::fs::write(
        &file,
        format!("# the console test's config\n{}", cfg.to_toml()),
    )
    .unwrap();
    let cfg = Config::load(&file).unwrap();
    let running = cync_mitm::app::start(cfg, Some(file.clone()))
        .await
        .unwrap();
    let admin = running.admin_addr.unwrap();
    let mut fc = fleet_config(running.tls_addr, devices);
    fc.heartbeat = heartbeat;
    let fleet = start_fleet(fc);
    let f = fleet.clone();
    assert!(
        wait_until(Duration::from_secs(20), || f
            .stats()
            .online
            .load(std::sync::atomic::Ordering::Relaxed)
            == u64::from(devices))
        .await,
        "the fleet did not come online"
    );
    Setup {
        running: Some(running),
        admin,
        file,
        _dir: dir,
        fleet,
        devices,
    }
}

impl Setup {
    async fn stop(mut self) {
        self.fleet.stop().await;
        if let Some(r) = self.running.take() {
            r.stop("test over").await;
        }
    }
}

/// `method path` with `headers`: status and body.
async fn http(
    admin: SocketAddr,
    method: hyper::Method,
    path: &str,
    headers: &[(&str, String)],
) -> (u16, String) {
    let t = cync_mitm::httpc::Target::parse(&format!("http://{admin}{path}")).unwrap();
    let (s, b) = cync_mitm::httpc::request(
        &t,
        method,
        headers,
        bytes::Bytes::new(),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    (s.as_u16(), String::from_utf8_lossy(&b).into_owned())
}

async fn get_json(admin: SocketAddr, path: &str) -> Value {
    let (s, b) = http(admin, hyper::Method::GET, path, &[]).await;
    assert_eq!(s, 200, "{path}: {b}");
    serde_json::from_str(&b).unwrap()
}

/// Opens `GET path` as a raw stream (headers unread).
async fn open_raw(admin: SocketAddr, path: &str) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {admin}\r\nAccept: text/event-stream\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    s
}

/// Reads the stream until `n` `data:` events arrived (or `limit`); returns what was read.
async fn read_events(s: &mut tokio::net::TcpStream, n: usize, limit: Duration) -> String {
    let mut text = String::new();
    let mut buf = vec![0u8; 64 * 1024];
    let _ = tokio::time::timeout(limit, async {
        loop {
            let k = match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(k) => k,
            };
            text.push_str(&String::from_utf8_lossy(&buf[..k]));
            if text.matches("\ndata: {\"seq\"").count() >= n {
                break;
            }
        }
    })
    .await;
    text
}

/// The JSON of each frame event in `text`.
fn events_of(text: &str) -> Vec<Value> {
    text.split("\n\n")
        .filter(|m| !m.contains("event: "))
        .filter_map(|m| m.lines().find_map(|l| l.strip_prefix("data: ")))
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect()
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn canary_in_file(file: &Path) -> String {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .find(|l| l.trim_start().starts_with("canary_percent"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_stream_and_canary_control_over_http() {
    let s = setup(12, Duration::from_millis(500)).await;
    let a = s.admin;

    // Every device, with the state its first frame (a 0x43 status record) reported.
    let d = get_json(a, "/api/devices").await;
    assert_eq!(d["counts"]["devices"], 12, "{d}");
    assert_eq!(d["counts"]["legacy"], 12);
    for dev in d["devices"].as_array().unwrap() {
        assert!(dev["state"]["brightness"].is_u64(), "{dev}");
        assert!(dev["state"]["on"].is_boolean(), "{dev}");
        assert!(dev["frames"].as_u64().unwrap() > 0);
        assert_eq!(dev["path"], "legacy");
        assert!(dev["connect_reason_text"].is_string());
    }
    // After commands, the state matches what the simulated device holds.
    let fleet = s.fleet.clone();
    assert!(
        wait_until(Duration::from_secs(10), || !fleet
            .stats()
            .states
            .lock()
            .unwrap()
            .is_empty())
        .await
    );
    let mut agreed = false;
    for _ in 0..50 {
        let d = get_json(a, "/api/devices").await;
        let states = s.fleet.stats().states.lock().unwrap().clone();
        agreed = states.iter().any(|(id, st)| {
            d["devices"].as_array().unwrap().iter().any(|x| {
                x["device_id"] == id.to_string() && x["state"] == cync_mitm::console::state_json(st)
            })
        });
        if agreed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(agreed, "no device's reported state matched the simulator's");
    // A whole second later the rates show.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let d = get_json(a, "/api/devices").await;
    assert!(d["frames_per_second"].as_f64().unwrap() > 0.0, "{d}");

    // The stream: every event decoded; filters by type and device hold.
    let mut all = open_raw(a, "/api/events").await;
    let text = read_events(&mut all, 30, Duration::from_secs(10)).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("content-type: text/event-stream"), "{text}");
    assert!(text.contains("event: hello"), "{text}");
    let evs = events_of(&text);
    assert!(evs.len() >= 30, "{text}");
    assert!(
        evs.iter()
            .all(|e| e["summary"].is_string() && e["type"].is_string())
    );
    let seqs: Vec<u64> = evs.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let one = d["devices"][3]["device_id"].as_str().unwrap().to_owned();
    let mut f = open_raw(a, &format!("/api/events?device={one}&type=ping")).await;
    let text = read_events(&mut f, 3, Duration::from_secs(10)).await;
    let evs = events_of(&text);
    assert!(evs.len() >= 3, "{text}");
    assert!(
        evs.iter()
            .all(|e| e["device"] == one.as_str() && e["type"] == "0xd3"),
        "{text}"
    );
    let (st, b) = http(a, hyper::Method::GET, "/api/events?type=bogus", &[]).await;
    assert_eq!(st, 400, "{b}");
    // More streams than admin.console_max_streams (8): the extra one is refused, the
    // others keep streaming.
    let mut extra = Vec::new();
    for _ in 0..6 {
        extra.push(open_raw(a, "/api/events").await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (st, b) = http(a, hyper::Method::GET, "/api/events", &[]).await;
    assert_eq!(st, 503, "{b}");
    drop(extra);
    drop(f);
    // Closed streams give their slots back.
    let m = |t: &str| metric(t, "cync_mitm_console_streams");
    let mut streams = 99.0;
    for _ in 0..50 {
        let (_, t) = http(a, hyper::Method::GET, "/metrics", &[]).await;
        streams = m(&t);
        if streams <= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(streams, 1.0, "streams left open");
    // Another site's page cannot hold a stream slot (an <img> or a fetch) nor read through a
    // rebound name; HEAD opens no stream; a top-level link to the console is let through.
    let img = [
        ("sec-fetch-site", "cross-site".to_owned()),
        ("sec-fetch-mode", "no-cors".to_owned()),
        ("sec-fetch-dest", "image".to_owned()),
    ];
    let (st, b) = http(a, hyper::Method::GET, "/api/events", &img).await;
    assert_eq!(st, 403, "{b}");
    let rebound_read = [
        ("host", "evil.example:80".to_owned()),
        ("sec-fetch-site", "same-origin".to_owned()),
        ("sec-fetch-mode", "cors".to_owned()),
    ];
    for path in ["/api/devices", "/routing", "/config", "/api/events"] {
        let (st, b) = http(a, hyper::Method::GET, path, &rebound_read).await;
        assert_eq!(st, 403, "{path}: {b}");
        // As a rebinding page really sends it: its name alone, no browser header.
        let mut s = tokio::net::TcpStream::connect(a).await.unwrap();
        s.write_all(
            format!(
                "GET {path} HTTP/1.0\r\nHost: evil.example:{}\r\n\r\n",
                a.port()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.0 403"), "{path}: {out}");
    }
    let link = [
        ("sec-fetch-site", "cross-site".to_owned()),
        ("sec-fetch-mode", "navigate".to_owned()),
        ("sec-fetch-dest", "document".to_owned()),
    ];
    let (st, b) = http(a, hyper::Method::GET, "/", &link).await;
    assert_eq!(st, 200, "{b}");
    let (st, b) = http(a, hyper::Method::HEAD, "/api/events", &[]).await;
    assert_eq!((st, b.as_str()), (200, ""));
    let (_, t) = http(a, hyper::Method::GET, "/metrics", &[]).await;
    assert_eq!(m(&t), 1.0, "a refused or HEAD request held a stream");
    // Mesh members are counted; listed on request.
    let d = get_json(a, "/api/devices").await;
    assert!(d["devices"][0]["mesh_count"].is_u64(), "{d}");
    assert!(d["devices"][0].get("mesh").is_none());
    assert!(d["console"]["events"].as_u64().unwrap() > 0, "{d}");
    let d = get_json(a, "/api/devices?mesh=1").await;
    assert!(d["devices"][0]["mesh"].is_array(), "{d}");
    drop(all);

    // The canary control: guarded, validated, then the file and the routing change.
    let cross = [("origin", "http://evil.example".to_owned())];
    let (st, b) = http(a, hyper::Method::POST, "/api/canary?percent=100", &cross).await;
    assert_eq!(st, 403, "{b}");
    // A rebinding page: its Origin and Host agree, on the attacker's name.
    let rebinding = [
        ("host", "evil.example:80".to_owned()),
        ("origin", "http://evil.example:80".to_owned()),
    ];
    let (st, _) = http(
        a,
        hyper::Method::POST,
        "/api/canary?percent=100",
        &rebinding,
    )
    .await;
    assert_eq!(st, 403);
    let (st, _) = http(a, hyper::Method::POST, "/rollback", &cross).await;
    assert_eq!(st, 403, "the older endpoints are guarded too");
    for bad in [
        "percent=abc",
        "percent=500",
        "percent=NaN",
        "x=1",
        "percent=-1",
    ] {
        let (st, b) = http(a, hyper::Method::POST, &format!("/api/canary?{bad}"), &[]).await;
        assert!(st == 400 || st == 422, "{bad}: {st} {b}");
    }
    assert_eq!(canary_in_file(&s.file), "canary_percent = 0.0");
    let same = [("origin", format!("http://{a}"))];
    let (st, b) = http(a, hyper::Method::POST, "/api/canary?percent=100", &same).await;
    assert_eq!(st, 200, "{b}");
    let r: Value = serde_json::from_str(&b).unwrap();
    assert_eq!(r["result"], "set");
    assert_eq!(r["previous_percent"], 0.0);
    assert_eq!(canary_in_file(&s.file), "canary_percent = 100.0");
    assert!(
        std::fs::read_to_string(&s.file)
            .unwrap()
            .starts_with("# the console test's config"),
        "the file's comments are kept"
    );
    let mut moved = false;
    for _ in 0..100 {
        let d = get_json(a, "/api/devices").await;
        if d["counts"]["new"] == s.devices && d["canary_percent"] == 100.0 {
            moved = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(moved, "the devices did not move to the new path");

    // The rollout document has the SLOs of both transports and the parity.
    let r = get_json(a, "/api/rollout").await;
    assert!(r["slo"]["control"].is_object(), "{r}");
    assert!(r["parity"]["settings"].is_object(), "{r}");
    assert!(r["rollout"]["enabled"] == false);
    assert!(r["decisions"].is_array());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_console_off_its_tap_is_not_installed() {
    let s = setup_with(3, Duration::from_millis(200), |c| c.admin.console = false).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (st, _) = http(s.admin, hyper::Method::GET, "/api/devices", &[]).await;
    assert_eq!(st, 404);
    let p = s.running.as_ref().unwrap().proxy.clone();
    let now = (std::time::Instant::now(), std::time::SystemTime::now());
    let live: Vec<Value> = p
        .registry()
        .snapshot()
        .iter()
        .map(|(_, l)| l.meta.live.report(now, false))
        .collect();
    assert_eq!(live.len(), 3);
    // The devices talked, yet nothing counted their frames: no per-frame console work.
    assert!(live.iter().all(|l| l["frames"] == 0), "{live:?}");
    let (_, m) = http(s.admin, hyper::Method::GET, "/metrics", &[]).await;
    assert!(
        m.contains("cync_mitm_frames_total{"),
        "the devices' frames were decoded"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_and_its_assets_are_self_contained() {
    let s = setup(2, Duration::from_secs(3600)).await;
    let a = s.admin;
    let (st, html) = http(a, hyper::Method::GET, "/", &[]).await;
    assert_eq!(st, 200);
    assert!(html.contains("<title>cync-mitm console</title>"));
    let (_, js) = http(a, hyper::Method::GET, "/console.js", &[]).await;
    let (_, css) = http(a, hyper::Method::GET, "/console.css", &[]).await;
    // Nothing from another host: no CDN, no font, no analytics.
    for (name, text) in [("html", &html), ("js", &js), ("css", &css)] {
        assert!(
            !text.contains("http://") && !text.contains("https://"),
            "{name} names a remote URL"
        );
        assert!(!text.contains("innerHTML"), "{name} writes HTML from data");
    }
    let weight = html.len() + js.len() + css.len();
    eprintln!(
        "console page weight: {weight} bytes (html {}, js {}, css {})",
        html.len(),
        js.len(),
        css.len()
    );
    assert!(weight < 64 * 1024, "{weight}");
    s.stop().await;
}

// ---- the real browser ----------------------------------------------------------------------

/// Starts chromedriver on a free loopback port.
fn chromedriver() -> Option<(std::process::Child, u16)> {
    if !common::tshark::have_tool("chromedriver", "--version")
        || !common::tshark::have_tool(&chromium_binary(), "--version")
    {
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .arg("--allowed-ips=127.0.0.1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    Some((child, port))
}

fn chromium_binary() -> String {
    std::env::var("CHROMIUM").unwrap_or_else(|_| "chromium".into())
}

struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn browser(port: u16) -> fantoccini::Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": which(&chromium_binary()),
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1800", "--no-first-run", "--disable-extensions"],
        }),
    );
    let url = format!("http://127.0.0.1:{port}");
    for _ in 0..100 {
        if let Ok(c) = fantoccini::ClientBuilder::native()
            .capabilities(caps.clone())
            .connect(&url)
            .await
        {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("chromedriver did not answer at {url}");
}

fn which(bin: &str) -> String {
    if bin.contains('/') {
        return bin.to_owned();
    }
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(bin))
                .find(|f| f.is_file())
        })
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| bin.to_owned())
}

/// Polls `f` every 100 ms until it returns `Some`, for at most `limit`.
async fn poll<T, F, Fut>(limit: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let end = std::time::Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if std::time::Instant::now() > end {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn texts(c: &fantoccini::Client, css: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in c
        .find_all(fantoccini::Locator::Css(css))
        .await
        .unwrap_or_default()
    {
        out.push(e.text().await.unwrap_or_default());
    }
    out
}

async fn attr_all(c: &fantoccini::Client, css: &str, attr: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in c
        .find_all(fantoccini::Locator::Css(css))
        .await
        .unwrap_or_default()
    {
        out.push(e.attr(attr).await.ok().flatten().unwrap_or_default());
    }
    out
}

/// Waits (20 s at most) until the devices table lists `n` rows, all on `path`.
async fn all_rows_on(c: &fantoccini::Client, n: u32, path: &str) -> Option<()> {
    poll(Duration::from_secs(20), || async {
        let paths = attr_all(c, "#devices tbody tr", "data-path").await;
        (paths.len() == n as usize && paths.iter().all(|p| p == path)).then_some(())
    })
    .await
}

/// How the page writes a state (console.js `stateText`).
fn state_text(s: &cync_mitm::codec::payload::LightState) -> String {
    use cync_mitm::codec::payload::Color;
    let colour = match s.color {
        Color::Temp(t) => format!("temp {t}"),
        Color::Rgb([r, g, b]) => format!("rgb #{r:02x}{g:02x}{b:02x}"),
    };
    format!(
        "{} {} % {colour}",
        if s.on { "on" } else { "off" },
        s.brightness
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_a_real_browser() {
    let Some((child, port)) = chromedriver() else {
        return;
    };
    let _driver = Kill(child);
    let s = setup(10, Duration::from_millis(700)).await;
    let a = s.admin;
    let c = browser(port).await;
    c.goto(&format!("http://{a}/")).await.unwrap();

    // The devices table lists every device, each with a decoded state.
    let rows = poll(Duration::from_secs(15), || async {
        let ids = attr_all(&c, "#devices tbody tr", "data-device").await;
        (ids.len() == s.devices as usize).then_some(ids)
    })
    .await
    .expect("the devices table never listed every device");
    let mut want: Vec<String> = s.fleet.ids().iter().map(|d| d.to_string()).collect();
    want.sort();
    assert_eq!(rows, want);
    let states = texts(&c, "#devices tbody td.state").await;
    assert!(
        states
            .iter()
            .all(|t| t.starts_with("on ") || t.starts_with("off ")),
        "{states:?}"
    );
    // A state changed by a command shows as the simulated device holds it.
    let fleet = s.fleet.clone();
    let matched = poll(Duration::from_secs(15), || {
        let fleet = fleet.clone();
        let c = &c;
        async move {
            let sim = fleet.stats().states.lock().unwrap().clone();
            for (id, st) in sim {
                let css = format!("#devices tbody tr[data-device='{id}'] td.state");
                if let Ok(e) = c.find(fantoccini::Locator::Css(&css)).await
                    && e.text().await.ok()? == state_text(&st)
                {
                    return Some(id);
                }
            }
            None
        }
    })
    .await;
    assert!(
        matched.is_some(),
        "no row showed a commanded device's state"
    );

    // The frame stream moves.
    let first = poll(Duration::from_secs(10), || async {
        texts(&c, "#frames tbody tr").await.into_iter().next()
    })
    .await
    .expect("no frame reached the page");
    let moved = poll(Duration::from_secs(10), || async {
        let now = texts(&c, "#frames tbody tr").await.into_iter().next()?;
        (now != first).then_some(())
    })
    .await;
    assert!(moved.is_some(), "the stream stood still");

    // Pause holds the table still; resume lets it move again.
    c.find(fantoccini::Locator::Id("pause"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = texts(&c, "#frames tbody tr").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        held,
        texts(&c, "#frames tbody tr").await,
        "paused, yet rows changed"
    );
    c.find(fantoccini::Locator::Id("pause"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let resumed = poll(Duration::from_secs(10), || async {
        (texts(&c, "#frames tbody tr").await != held).then_some(())
    })
    .await;
    assert!(resumed.is_some(), "resume did not bring frames back");

    // The type filter: only pings after it is chosen.
    let select = c.find(fantoccini::Locator::Id("f-type")).await.unwrap();
    select.select_by_value("ping").await.unwrap();
    let only = poll(Duration::from_secs(10), || async {
        let types = attr_all(&c, "#frames tbody tr", "data-type").await;
        (types.len() >= 3 && types.iter().all(|t| t == "0xd3")).then_some(())
    })
    .await;
    assert!(
        only.is_some(),
        "{:?}",
        attr_all(&c, "#frames tbody tr", "data-type").await
    );
    // And the device filter, two ids (the page encodes the comma).
    let (one, two) = (want[2].clone(), want[5].clone());
    select.select_by_value("").await.unwrap();
    c.find(fantoccini::Locator::Id("f-device"))
        .await
        .unwrap()
        .send_keys(&format!("{one}, {two}"))
        .await
        .unwrap();
    let only_these = poll(Duration::from_secs(10), || async {
        let devs = attr_all(&c, "#frames tbody tr", "data-device").await;
        (devs.len() >= 4
            && devs.iter().all(|d| *d == one || *d == two)
            && devs.contains(&one)
            && devs.contains(&two))
        .then_some(())
    })
    .await;
    assert!(
        only_these.is_some(),
        "{:?}",
        attr_all(&c, "#frames tbody tr", "data-device").await
    );

    // The canary control: the file and the routing change.
    let input = c
        .find(fantoccini::Locator::Id("canary-input"))
        .await
        .unwrap();
    c.execute("document.getElementById('canary-input').value = ''", vec![])
        .await
        .unwrap();
    input.send_keys("100").await.unwrap();
    c.find(fantoccini::Locator::Id("canary-set"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let file = s.file.clone();
    assert!(
        wait_until(Duration::from_secs(10), || canary_in_file(&file)
            == "canary_percent = 100.0")
        .await,
        "the config file was not edited: {}",
        canary_in_file(&s.file)
    );
    let on_new = all_rows_on(&c, s.devices, "new").await;
    assert!(
        on_new.is_some(),
        "{:?}",
        attr_all(&c, "#devices tbody tr", "data-path").await
    );
    let result = c
        .find(fantoccini::Locator::Id("control-result"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(result.contains("canary 100 %: set"), "{result}");

    // Roll back (confirmed), see the banner, clear it.
    c.find(fantoccini::Locator::Id("rollback"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.accept_alert().await.unwrap();
    let banner = poll(Duration::from_secs(10), || async {
        let b = c.find(fantoccini::Locator::Id("banner")).await.ok()?;
        let t = b.text().await.ok()?;
        t.contains("Rolled back").then_some(t)
    })
    .await;
    assert!(banner.is_some(), "no rollback banner");
    let back = all_rows_on(&c, s.devices, "legacy").await;
    assert!(back.is_some(), "the rollback did not move the devices back");
    c.find(fantoccini::Locator::Id("clear"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let cleared = poll(Duration::from_secs(10), || async {
        let b = c.find(fantoccini::Locator::Id("banner")).await.ok()?;
        (!b.is_displayed().await.ok()?).then_some(())
    })
    .await;
    assert!(cleared.is_some(), "the banner stayed after clearing");

    // The rollout panel lists both transports' SLOs.
    let transports = attr_all(&c, "#slos tbody tr", "data-transport").await;
    assert!(
        transports.iter().any(|t| t == "legacy") && transports.iter().any(|t| t == "new"),
        "{transports:?}"
    );

    let shot = c.screenshot().await.unwrap();
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("console.png");
    std::fs::write(&path, &shot).unwrap();
    assert!(shot.starts_with(b"\x89PNG"), "not a PNG");
    eprintln!("screenshot: {}", path.display());

    // The canary box follows the file when someone else sets it (nobody is editing it).
    let (st, b) = http(a, hyper::Method::POST, "/api/canary?percent=40", &[]).await;
    assert_eq!(st, 200, "{b}");
    let follows = poll(Duration::from_secs(10), || async {
        let v = c
            .find(fantoccini::Locator::Id("canary-input"))
            .await
            .ok()?
            .prop("value")
            .await
            .ok()??;
        (v == "40").then_some(())
    })
    .await;
    assert!(follows.is_some(), "the canary box kept its old value");

    // Every stream slot taken: the page is refused, says so, and gets in once one is free.
    let streams = || async {
        let (_, t) = http(a, hyper::Method::GET, "/metrics", &[]).await;
        metric(&t, "cync_mitm_console_streams")
    };
    c.goto("about:blank").await.unwrap();
    let gone = poll(Duration::from_secs(10), || async {
        (streams().await == 0.0).then_some(())
    })
    .await;
    assert!(gone.is_some(), "the page left, its stream stayed");
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(open_raw(a, "/api/events").await);
    }
    let full = poll(Duration::from_secs(10), || async {
        (streams().await == 8.0).then_some(())
    })
    .await;
    assert!(full.is_some(), "{} streams", streams().await);
    c.goto(&format!("http://{a}/")).await.unwrap();
    let refused = poll(Duration::from_secs(10), || async {
        let t = c
            .find(fantoccini::Locator::Id("stream-stats"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        t.contains("refused").then_some(())
    })
    .await;
    assert!(
        refused.is_some(),
        "the page did not say its stream was refused"
    );
    held.pop();
    let back = poll(Duration::from_secs(40), || async {
        texts(&c, "#frames tbody tr").await.into_iter().next()
    })
    .await;
    if back.is_none() {
        let t = c
            .find(fantoccini::Locator::Id("stream-stats"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        panic!(
            "the page never retried its stream: {t:?}, {} streams open",
            streams().await
        );
    }
    drop(held);
    c.close().await.unwrap();
    let _ = certs();
    s.stop().await;
}
