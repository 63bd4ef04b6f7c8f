//! Proxy benchmark harness (not criterion: it measures a whole system over loopback).
//!
//! 1. Throughput and latency: 100 simulated devices, the simulated cloud sending each a command
//!    every 20 ms (BENCH_INTERVAL_MS), first straight to the cloud, then through the proxy (the release binary, as a
//!    separate process). Reports frames/s and the command → ack and request → answer latency
//!    percentiles of both runs, and proxy ÷ direct ratios.
//!    A third run repeats it with capture on, and reports capture on ÷ off and the capture bytes
//!    written per relayed frame.
//! 2. Memory: the proxy's RSS with no connection and with 1,000 idle devices connected.
//!
//! Run: `cargo bench --bench proxy` (BENCH_SECS sets the measuring window, default 10 s;
//! BENCH_DEVICES and BENCH_IDLE_DEVICES the fleet sizes).

use cync_mitm::sim::cloud::{CloudSim, CloudSimConfig, ServerTls};
use cync_mitm::sim::devices::{ClientTls, Fleet, FleetConfig};
use cync_mitm::sim::stats::LatencySummary;
use cync_mitm::tls::{CertPaths, ClientProfile, DeviceAcceptor, LegacyClient};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn cloud(certs: &CertPaths, interval: Option<Duration>) -> (Arc<CloudSim>, SocketAddr) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let sim = CloudSim::new(
        CloudSimConfig {
            command_interval: interval,
            ..CloudSimConfig::default()
        },
        ServerTls::Legacy(DeviceAcceptor::new(&Default::default(), certs).unwrap()),
    );
    let s = sim.clone();
    tokio::spawn(async move { s.run(l).await });
    (sim, addr)
}

fn fleet(target: SocketAddr, count: u32, heartbeat: Duration, ramp: Duration) -> Arc<Fleet> {
    Fleet::start(
        FleetConfig {
            count,
            target,
            seed: 9,
            heartbeat,
            ramp,
            ..FleetConfig::default()
        },
        ClientTls::Tls(LegacyClient::new(ClientProfile::DeviceFp2).unwrap()),
    )
}

struct ProxyProc {
    child: Child,
    addr: SocketAddr,
    admin: String,
}

impl ProxyProc {
    fn start(dir: &Path, upstream: SocketAddr, capture: bool) -> Self {
        let cfg = dir.join("bench.toml");
        std::fs::write(
            &cfg,
            format!(
                "[listen]\ntls = \"127.0.0.1:0\"\n[upstream]\naddresses = [\"{upstream}\"]\n\
                 [admin]\nlisten = \"127.0.0.1:0\"\n[tls]\ncert_dir = \"{}\"\n[log]\nfilter = \"warn,cync_mitm::app=info\"\n\
                 [capture]\nenabled = {capture}\ndir = \"{}\"\n",
                dir.join("certs").display(),
                dir.join("captures").display()
            ),
        )
        .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_cync-mitm"))
            .args(["run", "--config"])
            .arg(&cfg)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let field = |l: &str, k: &str| -> Option<String> {
            let i = l.find(k)? + k.len();
            l[i..].split_whitespace().next().map(str::to_owned)
        };
        let (addr, admin) = loop {
            let l = lines.next().expect("proxy exited").unwrap();
            if l.contains("listening") {
                break (
                    field(&l, "tls=").unwrap().parse().unwrap(),
                    field(&l, "admin=").unwrap(),
                );
            }
        };
        std::thread::spawn(move || for _ in lines {});
        Self { child, addr, admin }
    }

    /// Sum of every sample of `metric` on /metrics.
    fn metric(&self, metric: &str) -> f64 {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(&self.admin) else {
            return 0.0;
        };
        let _ = s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.lines()
            .filter(|l| {
                l.strip_prefix(metric)
                    .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        s.lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
struct Run {
    frames_per_s: f64,
    commands_per_s: f64,
    command: LatencySummary,
    answer: LatencySummary,
}

async fn measure(target: SocketAddr, cloud: &CloudSim, devices: u32, secs: u64) -> Run {
    let f = fleet(
        target,
        devices,
        Duration::from_secs(1),
        Duration::from_secs(1),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while f.stats().online.load(Ordering::Relaxed) < u64::from(devices) && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    cloud.stats().command_latency.reset();
    f.stats().latency.reset();
    let frames0 = f.stats().frames_in.load(Ordering::Relaxed)
        + cloud.stats().frames_in.load(Ordering::Relaxed);
    let cmds0 = cloud.stats().command_acks.load(Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let dt = t0.elapsed().as_secs_f64();
    let frames = f.stats().frames_in.load(Ordering::Relaxed)
        + cloud.stats().frames_in.load(Ordering::Relaxed)
        - frames0;
    let cmds = cloud.stats().command_acks.load(Ordering::Relaxed) - cmds0;
    let run = Run {
        frames_per_s: frames as f64 / dt,
        commands_per_s: cmds as f64 / dt,
        command: cloud.stats().command_latency.summary(),
        answer: f.stats().latency.summary(),
    };
    f.stop().await;
    run
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "-".into()
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --benches` / `--list`: nothing to list.
    }
    let secs = env_num("BENCH_SECS", 10);
    let devices = env_num("BENCH_DEVICES", 100) as u32;
    let idle_devices = env_num("BENCH_IDLE_DEVICES", 1000) as u32;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let certs = cync_mitm::tls::init_certs(&dir.path().join("certs"), false).unwrap();
        let interval_ms = env_num("BENCH_INTERVAL_MS", 20);
        let interval = Some(Duration::from_millis(interval_ms));

        let (c, caddr) = cloud(&certs, interval).await;
        let direct = measure(caddr, &c, devices, secs).await;
        c.stop().await;

        let (c, caddr) = cloud(&certs, interval).await;
        let p = ProxyProc::start(dir.path(), caddr, false);
        let proxied = measure(p.addr, &c, devices, secs).await;
        p.stop();
        c.stop().await;

        let (c, caddr) = cloud(&certs, interval).await;
        let p = ProxyProc::start(dir.path(), caddr, true);
        let captured = measure(p.addr, &c, devices, secs).await;
        let frames = p.metric("cync_mitm_frames_total");
        let written = p.metric("cync_mitm_capture_written_bytes_total");
        let dropped = p.metric("cync_mitm_capture_dropped_total{reason=\"queue_full\"}");
        p.stop();
        c.stop().await;

        println!("\n{devices} devices, a command to each every {interval_ms} ms, {secs} s window (same run)");
        println!(
            "{:<30} {:>11} {:>11} {:>11} {:>14} {:>16}",
            "", "direct", "proxy", "proxy+cap", "proxy÷direct", "capture on÷off"
        );
        let row = |name: &str, a: f64, b: f64, c: f64| {
            println!("{name:<30} {a:>11.1} {b:>11.1} {c:>11.1} {:>14} {:>16}", ratio(b, a), ratio(c, b))
        };
        row("frames/s (both ends)", direct.frames_per_s, proxied.frames_per_s, captured.frames_per_s);
        row("commands acked/s", direct.commands_per_s, proxied.commands_per_s, captured.commands_per_s);
        row("command→ack p50 ms", direct.command.p50_ms, proxied.command.p50_ms, captured.command.p50_ms);
        row("command→ack p99 ms", direct.command.p99_ms, proxied.command.p99_ms, captured.command.p99_ms);
        row("device request→answer p50 ms", direct.answer.p50_ms, proxied.answer.p50_ms, captured.answer.p50_ms);
        row("device request→answer p99 ms", direct.answer.p99_ms, proxied.answer.p99_ms, captured.answer.p99_ms);
        println!(
            "capture: {:.1} bytes written per relayed frame (both legs, pcapng), {dropped} chunks dropped",
            written / frames.max(1.0)
        );

        let (c, caddr) = cloud(&certs, None).await;
        let p = ProxyProc::start(dir.path(), caddr, false);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let base = p.rss_kib();
        let f = fleet(p.addr, idle_devices, Duration::from_secs(21), Duration::from_secs(5));
        let deadline = Instant::now() + Duration::from_secs(60);
        while f.stats().online.load(Ordering::Relaxed) < u64::from(idle_devices) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let online = f.stats().online.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let loaded = p.rss_kib();
        println!("\nproxy RSS: {:.1} MiB idle, {:.1} MiB with {online} idle devices connected ({:.1} KiB per device)",
            base as f64 / 1024.0, loaded as f64 / 1024.0,
            (loaded.saturating_sub(base)) as f64 / online.max(1) as f64);
        f.stop().await;
        p.stop();
        c.stop().await;
    });
}
