//! Starts simulated clouds, proxies and fleets on 127.0.0.1:0 for the integration tests.

use cync_mitm::config::Config;
use cync_mitm::metrics::Metrics;
use cync_mitm::proxy::{ListenerKind, Proxy};
use cync_mitm::sim::cloud::{CloudSim, CloudSimConfig, ServerTls};
use cync_mitm::sim::devices::{ClientTls, Fleet, FleetConfig};
use cync_mitm::tls::{CertPaths, ClientProfile, DeviceAcceptor, LegacyClient, ModernServer};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

/// Certificates minted once per test binary.
pub fn certs() -> &'static CertPaths {
    static DIR: OnceLock<(tempfile::TempDir, CertPaths)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        let p = cync_mitm::tls::init_certs(d.path(), false).unwrap();
        (d, p)
    })
    .1
}

/// Which TLS the simulated cloud speaks.
#[derive(Clone, Copy)]
pub enum CloudTls {
    Legacy,
    Modern,
}

pub async fn start_cloud_on(
    listener: TcpListener,
    cfg: CloudSimConfig,
    tls: CloudTls,
) -> Arc<CloudSim> {
    let server = match tls {
        CloudTls::Legacy => {
            ServerTls::Legacy(DeviceAcceptor::new(&Default::default(), certs()).unwrap())
        }
        CloudTls::Modern => ServerTls::Modern(ModernServer::new(certs()).unwrap()),
    };
    let sim = CloudSim::new(cfg, server);
    let s = sim.clone();
    tokio::spawn(async move { s.run(listener).await });
    sim
}

pub async fn start_cloud(cfg: CloudSimConfig) -> (Arc<CloudSim>, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    (start_cloud_on(l, cfg, CloudTls::Legacy).await, addr)
}

/// A config for tests: loopback, upstream `cloud`, short timeouts, test certificates.
pub fn proxy_config(cloud: SocketAddr) -> Config {
    let mut c = Config::default();
    c.listen.tls = "127.0.0.1:0".parse().unwrap();
    c.upstream.addresses = vec![cloud.to_string()];
    c.upstream.cloud_down_close_delay = Duration::from_millis(300);
    c.timeouts.upstream_connect = Duration::from_secs(2);
    c.timeouts.handshake = Duration::from_secs(2);
    c.timeouts.first_frame = Duration::from_secs(2);
    c.tls.cert_dir = certs().ca_cert.parent().unwrap().to_owned();
    // Nothing a test proxy writes lands in the working tree.
    let scratch = certs().ca_cert.parent().unwrap().join("scratch");
    c.parity.dir = scratch.join("parity");
    c.slo.state_file = scratch.join("slo-state.json");
    c
}

/// Points `cfg`'s new path at `backend` (a simulated cloud with the test certificates).
pub fn use_new_path(cfg: &mut Config, backend: SocketAddr) {
    cfg.new_path.addresses = vec![backend.to_string()];
    cfg.new_path.ca_file = Some(certs().ca_cert.clone());
    cfg.new_path.sni = Some("cm.gelighting.com".into());
}

/// A `[slo]` table keeping a file-configured test proxy's SLO state out of the working tree.
pub fn slo_scratch_toml() -> String {
    let scratch = certs().ca_cert.parent().unwrap().join("scratch");
    format!(
        "\n[slo]\nstate_file = \"{}\"\n",
        scratch.join("slo-state.json").display()
    )
}

pub struct RunningProxy {
    pub proxy: Arc<Proxy>,
    pub addr: SocketAddr,
    pub metrics: Arc<Metrics>,
}

pub async fn start_proxy(cfg: Config) -> RunningProxy {
    let metrics = Arc::new(Metrics::new(cfg.metrics.per_device_labels));
    let live = cync_mitm::reload::LiveConfig::fixed(cfg.clone(), metrics.clone()).unwrap();
    start_proxy_live(live, metrics).await
}

pub async fn start_proxy_live(
    live: Arc<cync_mitm::reload::LiveConfig>,
    metrics: Arc<Metrics>,
) -> RunningProxy {
    start_proxy_with_sinks(live, metrics, Vec::new()).await
}

async fn start_proxy_with_sinks(
    live: Arc<cync_mitm::reload::LiveConfig>,
    metrics: Arc<Metrics>,
    sinks: Vec<Arc<dyn cync_mitm::proxy::tap::TapSink>>,
) -> RunningProxy {
    let listener = TcpListener::bind(live.current().config.listen.tls)
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let proxy = Proxy::new(live, certs(), metrics.clone(), sinks).unwrap();
    let p = proxy.clone();
    tokio::spawn(async move { p.serve(listener, ListenerKind::Tls).await });
    RunningProxy {
        proxy,
        addr,
        metrics,
    }
}

/// A proxy with capture on (the writer thread started from `cfg.capture`).
pub async fn start_proxy_with_capture(
    cfg: Config,
) -> (RunningProxy, Arc<cync_mitm::capture::Capture>) {
    let metrics = Arc::new(Metrics::new(cfg.metrics.per_device_labels));
    let live = cync_mitm::reload::LiveConfig::fixed(cfg, metrics.clone()).unwrap();
    let capture = cync_mitm::capture::Capture::start(live.clone(), metrics.clone()).unwrap();
    let p = start_proxy_with_sinks(live, metrics, vec![capture.clone()]).await;
    (p, capture)
}

pub fn fleet_config(target: SocketAddr, count: u32) -> FleetConfig {
    FleetConfig {
        count,
        target,
        seed: 42,
        heartbeat: Duration::from_secs(3600),
        reconnect_min: Duration::from_millis(100),
        reconnect_max: Duration::from_millis(400),
        ..FleetConfig::default()
    }
}

pub fn start_fleet(cfg: FleetConfig) -> Arc<Fleet> {
    Fleet::start(
        cfg,
        ClientTls::Tls(LegacyClient::new(ClientProfile::DeviceFp2).unwrap()),
    )
}

/// Polls `f` until it holds or `limit` passes.
pub async fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

/// A live configuration read from `file` (no environment overrides) and its metrics.
pub fn live_from_file(
    file: &std::path::Path,
) -> (Arc<cync_mitm::reload::LiveConfig>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new(false));
    let cfg = Config::load(file).unwrap();
    let live =
        cync_mitm::reload::LiveConfig::new(cfg, Some(file.to_owned()), metrics.clone(), |_| None)
            .unwrap();
    (live, metrics)
}

/// Runs a phone-app session through `addr`: TLS, a 0x13 login, and the 7-byte answer.
pub async fn app_login(addr: SocketAddr, user: u32, auth: &[u8]) -> [u8; 7] {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut s = LegacyClient::new(ClientProfile::Modern)
        .unwrap()
        .connect(tcp)
        .await
        .unwrap();
    let login = cync_mitm::codec::Frame::login(user, auth, 30)
        .encode()
        .unwrap();
    s.write_all(&login).await.unwrap();
    let mut b = [0u8; 7];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b))
        .await
        .unwrap()
        .unwrap();
    b
}

/// `method path` through the admin server's router (as from loopback): the status and, when
/// the body is JSON, the body.
pub async fn admin_call(
    p: &RunningProxy,
    method: hyper::Method,
    path: &str,
) -> (hyper::StatusCode, serde_json::Value) {
    use http_body_util::BodyExt as _;
    let st = cync_mitm::admin::AdminState::new(p.metrics.clone(), Some(p.proxy.clone()));
    let r = cync_mitm::admin::route(&st, &method, path, "127.0.0.1:1".parse().unwrap()).await;
    let status = r.status();
    let body = r.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    )
}
