//! Shared by the system benchmarks: simulated clouds and fleets on loopback, the release
//! binary as a separate process, and measurements over a window.
#![allow(dead_code)]

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

pub fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub async fn cloud(certs: &CertPaths, interval: Option<Duration>) -> (Arc<CloudSim>, SocketAddr) {
    cloud_with(
        certs,
        CloudSimConfig {
            command_interval: interval,
            ..CloudSimConfig::default()
        },
    )
    .await
}

/// A simulated cloud (or backend) with `cfg`, on loopback.
pub async fn cloud_with(certs: &CertPaths, cfg: CloudSimConfig) -> (Arc<CloudSim>, SocketAddr) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let sim = CloudSim::new(
        cfg,
        ServerTls::Legacy(DeviceAcceptor::new(&Default::default(), certs).unwrap()),
    );
    let s = sim.clone();
    tokio::spawn(async move { s.run(l).await });
    (sim, addr)
}

pub fn fleet(target: SocketAddr, count: u32, heartbeat: Duration, ramp: Duration) -> Arc<Fleet> {
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

pub struct ProxyProc {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: String,
}

impl ProxyProc {
    pub fn start(dir: &Path, upstream: SocketAddr, capture: bool) -> Self {
        Self::start_with(
            dir,
            upstream,
            &format!(
                "[capture]\nenabled = {capture}\ndir = \"{}\"\n",
                dir.join("captures").display()
            ),
        )
    }

    /// The release binary on loopback, relaying to `upstream`, with `extra` TOML appended.
    pub fn start_with(dir: &Path, upstream: SocketAddr, extra: &str) -> Self {
        let cfg = dir.join("bench.toml");
        std::fs::write(
            &cfg,
            format!(
                "[listen]\ntls = \"127.0.0.1:0\"\n[upstream]\naddresses = [\"{upstream}\"]\n\
                 [admin]\nlisten = \"127.0.0.1:0\"\n[tls]\ncert_dir = \"{}\"\n[log]\nfilter = \"warn,cync_mitm::app=info\"\n\
                 [slo]\nstate_file = \"{}\"\n{extra}",
                dir.join("certs").display(),
                dir.join("slo/state.json").display(),
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
    pub fn metric(&self, metric: &str) -> f64 {
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

    pub fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        s.lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    }

    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
pub struct Run {
    pub frames_per_s: f64,
    pub commands_per_s: f64,
    pub command: LatencySummary,
    pub answer: LatencySummary,
}

pub async fn measure(target: SocketAddr, cloud: &CloudSim, devices: u32, secs: u64) -> Run {
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

pub fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "-".into()
    }
}
