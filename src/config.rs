//! Configuration: the TOML schema with a documented default for every option, validation, and
//! loading with errors that name the file, line, column and field at fault.
//!
//! Loading is parse → validate; the running proxy holds the result in an
//! [`arc_swap::ArcSwap`] so later reloads can swap it in whole.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Largest `limits.max_connections` (each connection holds two TLS legs and descriptors).
pub const MAX_CONNECTIONS: usize = 1_000_000;

/// Largest `capture.queue` (events; the queue is allocated up front).
pub const MAX_CAPTURE_QUEUE: usize = 1 << 20;

/// Exit status for an invalid configuration at start (`EX_USAGE`).
pub const EXIT_INVALID_CONFIG: u8 = 64;

/// Cipher list offered to devices (OpenSSL syntax). Modern ECDHE/AEAD suites first for capable
/// clients, then the ECDHE-ECDSA CBC/CCM suites of fingerprint 1 (used when the ECDSA leaf is
/// enabled), then the static-RSA CBC/CCM suites that every captured device offers (reference §1.3).
pub const DEFAULT_DEVICE_CIPHERS: &str = "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:\
ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305:\
ECDHE-RSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES256-CCM:ECDHE-ECDSA-AES128-CCM:\
ECDHE-ECDSA-AES256-SHA384:ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA:ECDHE-ECDSA-AES128-SHA:\
ECDHE-ECDSA-AES256-CCM8:ECDHE-ECDSA-AES128-CCM8:AES256-SHA256:AES128-SHA256:AES256-SHA:AES128-SHA:\
AES256-CCM:AES128-CCM:AES256-CCM8:AES128-CCM8:@SECLEVEL=0";

/// Cipher list offered to the cloud: modern suites, then the static-RSA CBC suites the real cloud
/// is reported to pick (AES256-SHA256).
pub const DEFAULT_UPSTREAM_CIPHERS: &str = "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:\
ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-SHA384:\
ECDHE-RSA-AES128-SHA256:ECDHE-RSA-AES256-SHA:ECDHE-RSA-AES128-SHA:AES256-GCM-SHA384:\
AES128-GCM-SHA256:AES256-SHA256:AES128-SHA256:AES256-SHA:AES128-SHA:@SECLEVEL=0";

/// Cipher list offered to the new path (TLS 1.2; TLS 1.3 suites are always on): forward-secret
/// AEAD suites only, at OpenSSL's default security level. A new backend is modern.
pub const DEFAULT_NEW_PATH_CIPHERS: &str = "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:\
ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305:\
ECDHE-RSA-CHACHA20-POLY1305";

/// The whole configuration file.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where devices connect.
    pub listen: ListenConfig,
    /// Where the proxy connects for each device (the real cloud, or a local controller).
    pub upstream: UpstreamConfig,
    /// The device-facing TLS server.
    pub tls: TlsConfig,
    /// Session timeouts.
    pub timeouts: Timeouts,
    /// Resource limits.
    pub limits: Limits,
    /// The admin HTTP server (metrics, health).
    pub admin: AdminConfig,
    /// Logging.
    pub log: LogConfig,
    /// Metrics options.
    pub metrics: MetricsConfig,
    /// Which devices take the new path (reloads live).
    pub routing: RoutingConfig,
    /// The new-path backend (reloads live).
    pub new_path: NewPathConfig,
    /// Moving devices after a routing change (reloads live).
    pub drain: DrainConfig,
    /// Watching the config file.
    pub reload: ReloadConfig,
    /// Decrypted pcapng capture.
    pub capture: CaptureConfig,
    /// Comparing the mirrored new backend's answers with the cloud's (reloads live).
    pub parity: ParityConfig,
    /// The SLO engine and automatic rollback (reloads live).
    pub slo: SloConfig,
    /// The SLO-gated progressive rollout (reloads live; off by default).
    pub rollout: RolloutConfig,
}

/// One objective of `[slo.objectives]`.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ObjectiveConfig {
    /// Share of good events required (0–1, below 1).
    pub target: f64,
    /// Compliance window (5 min to 31 days).
    #[serde(with = "humantime_serde")]
    pub window: Duration,
}

/// `[slo]`: service level objectives per transport, evaluated inside the proxy.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SloConfig {
    /// Evaluate at all (default true).
    pub enabled: bool,
    /// Evaluate this often. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub eval_interval: Duration,
    /// Fewer events than this in a window say nothing (`inconclusive`). Default 100.
    pub min_events: u64,
    /// A command acked within this is on time (`command_latency`; rounded down to a bucket of
    /// `tcp_comm_packet_latency_seconds`). Default 1.5 s.
    #[serde(with = "humantime_serde")]
    pub latency_threshold: Duration,
    /// A command acked within this is a success (`command_success`; later is a failure, as is
    /// one never acked after every retry; rounded down to a latency bucket). Default 10 s.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Where the rolling series are kept across restarts (written atomically, 0600).
    pub state_file: PathBuf,
    /// The series are written this often (controller changes at once, and at shutdown);
    /// a crash loses at most this much history. Default 5 min.
    #[serde(with = "humantime_serde")]
    pub save_interval: Duration,
    /// Objectives by SLI name, replacing the defaults (`command_success`, `request_success`,
    /// `command_latency`, `packet_loss`, `decode_errors`, `queue_full`, `parity_drift`).
    pub objectives: std::collections::BTreeMap<String, ObjectiveConfig>,
    /// Roll back (canary to 0 % through the runtime override) after this many consecutive
    /// evaluations with a new-path SLO violated. 0 turns automatic rollback off. Default 3.
    pub max_violations: u32,
    /// Devices per second moved back to legacy after a rollback (the ordinary drain's rate is
    /// `drain.batch` per `drain.interval`). Default 100.
    pub rollback_drain_rate: u32,
    /// Write the decision log (`decisions-YYYYMMDD.jsonl` next to the state file). Default true.
    pub decision_log: bool,
    /// An unchanged, healthy evaluation is logged at most this often (every violation, verdict
    /// change, held step and action is logged). Default 5 min.
    #[serde(with = "humantime_serde")]
    pub decision_log_heartbeat: Duration,
    /// Decision logs older than this many days are deleted. Default 14.
    pub decision_log_keep_days: u32,
    /// On rollback, POST a JSON document here (`http://` or `https://`, certificate verified);
    /// empty: off. Never blocks anything: sent in the background, with a timeout and retries.
    pub webhook_url: String,
    /// Sent as `Authorization: Bearer …` with the webhook (masked in `GET /config`).
    pub webhook_token: String,
    /// Each webhook attempt gives up after this. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub webhook_timeout: Duration,
    /// Attempts after the first failed one (1 s, 2 s, 4 s … apart). Default 3.
    pub webhook_retries: u32,
    /// Where the SLIs come from: `local` (this proxy's counters) or `prometheus` (PromQL over
    /// every replica, so they all reach the same verdict). Default local.
    pub source: SloSource,
    /// The Prometheus HTTP API's base URL (`http://host:9090`) with `source = "prometheus"`.
    pub prometheus_url: String,
    /// Each PromQL query gives up after this. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub prometheus_timeout: Duration,
    /// Label matchers added to every PromQL selector (`job="cync-mitm"`), to pick this fleet's
    /// replicas out of a shared Prometheus. Default none.
    pub prometheus_selector: String,
}

/// Where the SLIs are read.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SloSource {
    /// This proxy's own counters.
    #[default]
    Local,
    /// A Prometheus that scrapes every replica.
    Prometheus,
}

impl Default for SloConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            eval_interval: Duration::from_secs(10),
            min_events: 100,
            latency_threshold: Duration::from_millis(1500),
            command_timeout: Duration::from_secs(10),
            state_file: PathBuf::from("captures/slo/state.json"),
            save_interval: Duration::from_secs(300),
            objectives: std::collections::BTreeMap::new(),
            max_violations: 3,
            rollback_drain_rate: 100,
            decision_log: true,
            decision_log_heartbeat: Duration::from_secs(300),
            decision_log_keep_days: 14,
            webhook_url: String::new(),
            webhook_token: String::new(),
            webhook_timeout: Duration::from_secs(5),
            webhook_retries: 3,
            source: SloSource::Local,
            prometheus_url: String::new(),
            prometheus_timeout: Duration::from_secs(5),
            prometheus_selector: String::new(),
        }
    }
}

/// One step of `[rollout] steps`: `"shadow"`, a percentage, or a table with its own bake time
/// and minimum budget.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum StepConfig {
    /// `"shadow"` or `"25"`.
    Name(String),
    /// `25` or `12.5`.
    Percent(f64),
    /// `{ at = 25, bake = "1d", min_budget = 0.5 }`.
    Table(StepTable),
}

/// A step written as a table.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StepTable {
    /// `"shadow"` or a percentage.
    pub at: StepAt,
    /// Bake time of this step (default `rollout.bake_time`).
    #[serde(default, with = "humantime_serde")]
    pub bake: Option<Duration>,
    /// Minimum error budget to leave this step (default `rollout.min_budget`).
    #[serde(default)]
    pub min_budget: Option<f64>,
}

/// Where a step puts the devices.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum StepAt {
    /// `"shadow"` or `"25"`.
    Name(String),
    /// `25`.
    Percent(f64),
}

/// A step, resolved.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Step {
    /// `None`: shadow (every device mirrored, the cloud answers); `Some(p)`: `p` % of the
    /// devices answered by the new path.
    pub percent: Option<f64>,
    /// Time to spend in the step with every SLO met before the next.
    #[serde(with = "humantime_serde")]
    pub bake: Duration,
    /// Every new-path SLO's error budget must be above this to leave the step.
    pub min_budget: f64,
}

impl Step {
    /// `shadow` or the percentage.
    pub fn label(&self) -> String {
        match self.percent {
            None => "shadow".to_owned(),
            Some(p) => format!("{p}%"),
        }
    }
}

fn step_at(s: &StepAt) -> Result<Option<f64>, String> {
    let p = match s {
        StepAt::Name(n) if n.trim().eq_ignore_ascii_case("shadow") => return Ok(None),
        StepAt::Name(n) => n
            .trim()
            .trim_end_matches('%')
            .parse::<f64>()
            .map_err(|_| format!("{n:?} is neither \"shadow\" nor a percentage"))?,
        StepAt::Percent(p) => *p,
    };
    if !(p > 0.0 && p <= 100.0) {
        return Err(format!("{p} is not a percentage above 0 and at most 100"));
    }
    Ok(Some(p))
}

/// `[rollout]`: moves devices through `steps`, each held for its bake time while every
/// new-path SLO is met with enough events and its budget is above `min_budget`; holds when an
/// SLO is inconclusive; rolls back on violation. While enabled it sets `routing.mode` and
/// `routing.canary_percent` (the file's values are ignored); the step reached is kept in the
/// SLO state file.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutConfig {
    /// Run the rollout (default false).
    pub enabled: bool,
    /// The steps, in order. Default `["shadow", 10, 25, 50, 75, 90, 100]`.
    pub steps: Vec<StepConfig>,
    /// Default bake time of a step. Default 1 h.
    #[serde(with = "humantime_serde")]
    pub bake_time: Duration,
    /// Default minimum error budget to advance (0–1). Default 0.25.
    pub min_budget: f64,
    /// Mode of the percentage steps: `new_primary` (default; legacy when the new path cannot be
    /// reached) or `new_only`.
    pub mode: crate::route::Mode,
    /// The new-path SLIs that must be met (with enough events, above `min_budget`) to leave a
    /// step. Default all seven; `parity_drift` gates the shadow step only.
    pub gates: Vec<String>,
}

impl Default for RolloutConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            steps: ["shadow", "10", "25", "50", "75", "90", "100"]
                .iter()
                .map(|s| StepConfig::Name((*s).to_owned()))
                .collect(),
            bake_time: Duration::from_secs(3600),
            min_budget: 0.25,
            mode: crate::route::Mode::NewPrimary,
            gates: crate::slo::sli::Sli::ALL
                .iter()
                .map(|s| s.name().to_owned())
                .collect(),
        }
    }
}

impl RolloutConfig {
    /// The gating SLIs (unknown names are refused by validation).
    pub fn gating(&self) -> Vec<crate::slo::sli::Sli> {
        crate::slo::sli::Sli::ALL
            .into_iter()
            .filter(|s| self.gates.iter().any(|g| g == s.name()))
            .collect()
    }

    /// The steps resolved (bake times and budgets filled in).
    pub fn resolved(&self) -> Result<Vec<Step>, (String, String)> {
        self.steps
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let field = format!("rollout.steps[{i}]");
                let (at, bake, min_budget) = match s {
                    StepConfig::Name(n) => (StepAt::Name(n.clone()), None, None),
                    StepConfig::Percent(p) => (StepAt::Percent(*p), None, None),
                    StepConfig::Table(t) => (t.at.clone(), t.bake, t.min_budget),
                };
                let percent = step_at(&at).map_err(|m| (field.clone(), m))?;
                let min_budget = min_budget.unwrap_or(self.min_budget);
                if !(0.0..1.0).contains(&min_budget) {
                    return Err((field, "min_budget must be at least 0 and below 1".into()));
                }
                Ok(Step {
                    percent,
                    bake: bake.unwrap_or(self.bake_time),
                    min_budget,
                })
            })
            .collect()
    }
}

impl SloConfig {
    /// The objective of `sli`: the configured one, else the rollout plan's.
    pub fn objective(&self, sli: crate::slo::sli::Sli) -> crate::slo::Objective {
        match self.objectives.get(sli.name()) {
            Some(o) => crate::slo::Objective {
                target: o.target,
                window: o.window.as_secs(),
            },
            None => sli.default_objective(),
        }
    }
}

/// Where a shadowed session's mirror connects.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MirrorTo {
    /// The new backend (`new_path.addresses`): the dark launch.
    #[default]
    NewPath,
    /// A second connection to the session's own legacy upstream: an A/A run that measures
    /// the noise floor of the comparison (with the normalisation rules it should be zero).
    Legacy,
}

/// `[parity]`: in shadow mode, each device request that expects an answer is answered by both
/// paths; the answers are compared under per-type normalisation rules (`docs/parity.md`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ParityConfig {
    /// Compare at all (default true; the mirror runs either way).
    pub enabled: bool,
    /// How long both answers are awaited; a side that has not answered by then is missing.
    /// Default 5 s.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Where the mirror connects: `new_path` (default) or `legacy` (A/A).
    pub mirror_to: MirrorTo,
    /// Write each drift as a JSON line to `<dir>/drift-YYYYMMDD.jsonl` (default true).
    pub log: bool,
    /// Folder of the drift logs (created 0700, files 0600). Default `captures/parity`.
    pub dir: PathBuf,
    /// Bytes per day's drift log; beyond it drifts are counted, not logged. Default 64 MiB.
    pub max_log_bytes: u64,
}

impl Default for ParityConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            timeout: Duration::from_secs(5),
            mirror_to: MirrorTo::NewPath,
            log: true,
            dir: PathBuf::from("captures/parity"),
            max_log_bytes: 64 << 20,
        }
    }
}

impl ParityConfig {
    /// The tracker settings of a session.
    pub fn tracker(&self) -> crate::parity::Settings {
        crate::parity::Settings {
            timeout: self.timeout,
            ..crate::parity::Settings::default()
        }
    }

    /// Where drift lines go.
    pub fn log_target(&self) -> crate::parity::hub::LogTarget {
        crate::parity::hub::LogTarget {
            dir: self.dir.clone(),
            max_bytes: self.max_log_bytes,
            enabled: self.log,
        }
    }
}

/// `[capture]`: decrypted traffic written as pcapng (LINKTYPE_RAW, synthesized IPv4/TCP).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CaptureConfig {
    /// Capture new connections (reloads live; connections already open keep their state).
    pub enabled: bool,
    /// Folder for `YYYYMMDD/<device>.pcapng` files (created 0700, files 0600).
    pub dir: PathBuf,
    /// One file per device (or app user, or connection); false = one combined file.
    pub per_device: bool,
    /// Mask the 0x23 auth code and the 0x13 auth string in the capture (never in the relay).
    pub redact_auth: bool,
    /// Only these device ids (hex); empty = every connection.
    pub devices: Vec<String>,
    /// Only frames of these packet types (`"0x73"` or names such as `"pipe"`); empty = all bytes.
    pub types: Vec<String>,
    /// Events queued for the writer thread; when full, chunks are dropped and counted.
    pub queue: usize,
    /// Start a new file when one reaches this size (bytes).
    pub max_file_bytes: u64,
    /// Start a new file when one is this old.
    #[serde(with = "humantime_serde")]
    pub max_file_age: Duration,
    /// Delete the oldest capture files beyond this total size (bytes).
    pub max_total_bytes: u64,
    /// Delete the oldest capture files beyond this count.
    pub max_files: usize,
    /// Close a file once no session has written to it for this long (a device that reconnects
    /// within it keeps its file). A connection's own file closes with the connection.
    #[serde(with = "humantime_serde")]
    pub close_idle_after: Duration,
    /// Capture files held open at once; beyond it the least recently used is closed (a later
    /// write to it starts a new file). Keeps the proxy's descriptors for devices.
    pub max_open_files: usize,
    /// Append the TLS keys of both legs here in NSS key-log format (0600). Off by default: it
    /// lets anyone holding a raw capture of the TLS read it. Needs a restart.
    pub keylog_file: Option<PathBuf>,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            dir: PathBuf::from("captures"),
            per_device: true,
            redact_auth: true,
            devices: Vec::new(),
            types: Vec::new(),
            queue: 8192,
            max_file_bytes: 64 * 1024 * 1024,
            max_file_age: Duration::from_secs(3600),
            max_total_bytes: 1024 * 1024 * 1024,
            max_files: 1000,
            close_idle_after: Duration::from_secs(60),
            max_open_files: 128,
            keylog_file: None,
        }
    }
}

/// Parses a packet type as `0x73` or a name (`pipe`).
pub fn parse_packet_type(s: &str) -> Option<crate::codec::PacketType> {
    let t = s.trim();
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return u8::from_str_radix(hex, 16)
            .ok()
            .map(crate::codec::PacketType);
    }
    (0..=255u8)
        .map(crate::codec::PacketType)
        .find(|p| p.is_known() && p.name() == t)
}

/// `[routing]`
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// `legacy_only` (default), `shadow`, `new_primary` or `new_only`.
    pub mode: crate::route::Mode,
    /// Share of devices (0–100, fractions allowed) selected for the new path. Sticky per device:
    /// raising it only adds devices.
    pub canary_percent: f64,
    /// Key of the sticky hash. Replicas with the same seed pick the same devices; a new seed
    /// reshuffles who is in the canary.
    pub seed: String,
    /// Device ids (hex, as in the logs) always selected.
    pub cohort: Vec<String>,
    /// Device ids never selected (wins over `cohort`).
    pub exclude: Vec<String>,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            mode: crate::route::Mode::LegacyOnly,
            canary_percent: 0.0,
            seed: "cync-mitm".into(),
            cohort: Vec::new(),
            exclude: Vec::new(),
        }
    }
}

impl RoutingConfig {
    /// The pure policy this section describes (ids already validated).
    pub fn policy(&self) -> crate::route::Policy {
        let ids = |v: &[String]| -> Vec<crate::codec::DeviceId> {
            v.iter()
                .filter_map(|s| crate::route::parse_device_id(s))
                .collect()
        };
        crate::route::Policy::new(
            self.mode,
            self.canary_percent,
            &self.seed,
            ids(&self.cohort),
            ids(&self.exclude),
        )
    }
}

/// The new path's TLS mode.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum NewPathTls {
    /// rustls: TLS 1.2/1.3, forward-secret AEAD suites only (a new backend is modern).
    #[default]
    Modern,
    /// OpenSSL with `new_path.ciphers` (for a backend rustls cannot talk to).
    Legacy,
    /// Plain TCP.
    Plain,
}

impl NewPathTls {
    /// Whether the leg speaks TLS at all.
    pub fn enabled(self) -> bool {
        self != NewPathTls::Plain
    }

    /// The library a TLS leg uses.
    pub fn engine(self) -> crate::tls::Engine {
        match self {
            NewPathTls::Legacy => crate::tls::Engine::OpenSsl,
            _ => crate::tls::Engine::Rustls,
        }
    }
}

impl<'de> Deserialize<'de> for NewPathTls {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Name(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(true) => Ok(NewPathTls::Modern),
            Raw::Bool(false) => Ok(NewPathTls::Plain),
            Raw::Name(n) => match n.as_str() {
                "modern" => Ok(NewPathTls::Modern),
                "legacy" => Ok(NewPathTls::Legacy),
                "plain" => Ok(NewPathTls::Plain),
                other => Err(serde::de::Error::custom(format!(
                    "unknown TLS mode {other:?}: expected \"modern\", \"legacy\" or \"plain\" (or true / false)"
                ))),
            },
        }
    }
}

/// `[new_path]`: where devices routed to the new path are relayed.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NewPathConfig {
    /// `host:port` candidates, in order. Required once any device can be routed `new_*`.
    pub addresses: Vec<String>,
    /// How to speak to the backend: `modern` (rustls, the default), `legacy` (OpenSSL with
    /// `ciphers`) or `plain` (no TLS). `true` and `false` mean `modern` and `plain`.
    pub tls: NewPathTls,
    /// Verify the backend (default true): its chain against `ca_file` and its name (`sni`, or
    /// else the address's host or IP), or, without `ca_file`, its certificate against
    /// `pin_sha256`. One of the two is required while verifying.
    pub verify: bool,
    /// CA bundle (PEM) for `verify`.
    pub ca_file: Option<PathBuf>,
    /// Certificate pins (SHA-256 of the DER, hex).
    pub pin_sha256: Vec<String>,
    /// SNI to send (and the name verified).
    pub sni: Option<String>,
    /// Lowest TLS version offered (default "1.2").
    pub min_version: TlsVersion,
    /// OpenSSL cipher list (TLS 1.2; TLS 1.3 suites are always on).
    pub ciphers: String,
    /// A backend command the device has not answered this long is sent again. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
    /// Retransmissions of a command before it counts as failed. Default 3.
    pub max_retries: u32,
    /// Wait after the first retransmission; doubles each time (up to 20 % jitter). 250 ms.
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    /// Longest wait between retransmissions. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// A device request the backend has not answered this long is given up. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub answer_timeout: Duration,
    /// Acked commands remembered, so one the backend repeats reaches the device once. 1000.
    pub dedup_size: usize,
    /// How long an acked command is remembered. Default 300 s.
    #[serde(with = "humantime_serde")]
    pub dedup_ttl: Duration,
    /// Device frames held per session while the backend is away. Default 100.
    pub send_queue_max: usize,
    /// Backend commands tracked per session until the device answers. Default 100.
    pub recv_queue_max: usize,
    /// What a full queue does: `drop_oldest` (default), `drop_newest` or `reject`.
    pub overflow: crate::transport::Overflow,
    /// A backend connection lost mid-session is re-established within this without the
    /// device noticing; beyond it a `new_primary` device is closed (it reconnects, to the
    /// cloud while the new path is down). `new_only` keeps trying. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub reconnect_grace: Duration,
    /// Consecutive failures of every new-path address after which `new_primary` connections
    /// go straight to the cloud (the circuit is open) until the cool-down
    /// (`circuit_cooldown`) runs out and one connection tries again. Default 3.
    pub circuit_failures: u32,
    /// How long an open circuit stays open after the last failure at most (it waits 1 s after
    /// the first, doubling with each further failure, up to this); then one connection tries
    /// again. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub circuit_cooldown: Duration,
}

impl NewPathConfig {
    /// The ReliableTransport settings of a session.
    pub fn transport(&self) -> crate::transport::Settings {
        crate::transport::Settings {
            ack_timeout: self.ack_timeout,
            max_retries: self.max_retries,
            backoff_initial: self.backoff_initial,
            backoff_max: self.backoff_max,
            request_timeout: self.answer_timeout,
            dedup_size: self.dedup_size,
            dedup_ttl: self.dedup_ttl,
            send_queue_max: self.send_queue_max,
            recv_queue_max: self.recv_queue_max,
            overflow: self.overflow,
        }
    }
}

impl Default for NewPathConfig {
    fn default() -> Self {
        Self {
            addresses: Vec::new(),
            tls: NewPathTls::Modern,
            verify: true,
            ca_file: None,
            pin_sha256: Vec::new(),
            sni: None,
            min_version: TlsVersion::Tls12,
            ciphers: DEFAULT_NEW_PATH_CIPHERS.into(),
            ack_timeout: Duration::from_secs(1),
            max_retries: 3,
            backoff_initial: Duration::from_millis(250),
            backoff_max: Duration::from_secs(5),
            answer_timeout: Duration::from_secs(10),
            dedup_size: 1000,
            dedup_ttl: Duration::from_secs(300),
            send_queue_max: 100,
            recv_queue_max: 100,
            overflow: crate::transport::Overflow::DropOldest,
            reconnect_grace: Duration::from_secs(10),
            circuit_failures: 3,
            circuit_cooldown: Duration::from_secs(30),
        }
    }
}

/// TLS client settings shared by the upstream and the new path.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientTlsSettings {
    /// Verify the peer certificate.
    pub verify: bool,
    /// CA bundle.
    pub ca_file: Option<PathBuf>,
    /// Pins.
    pub pin_sha256: Vec<String>,
    /// SNI.
    pub sni: Option<String>,
    /// Lowest TLS version.
    pub min_version: TlsVersion,
    /// Ciphers (OpenSSL only).
    pub ciphers: String,
    /// The TLS library.
    pub engine: crate::tls::Engine,
}

impl UpstreamConfig {
    /// Its TLS client settings.
    pub fn client_tls(&self) -> ClientTlsSettings {
        ClientTlsSettings {
            verify: self.verify,
            ca_file: self.ca_file.clone(),
            pin_sha256: self.pin_sha256.clone(),
            sni: self.sni.clone(),
            min_version: self.min_version,
            ciphers: self.ciphers.clone(),
            engine: crate::tls::Engine::OpenSsl,
        }
    }
}

impl NewPathConfig {
    /// Its TLS client settings.
    pub fn client_tls(&self) -> ClientTlsSettings {
        ClientTlsSettings {
            verify: self.verify,
            ca_file: self.ca_file.clone(),
            pin_sha256: self.pin_sha256.clone(),
            sni: self.sni.clone(),
            min_version: self.min_version,
            ciphers: self.ciphers.clone(),
            engine: self.tls.engine(),
        }
    }
}

/// `[drain]`, or `drain = false`: after a routing change, close the connections of devices whose
/// path changed, a few at a time, so they reconnect through the new decision.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct DrainConfig {
    /// Drain at all (default true). `drain = false` is short for `[drain] enabled = false`.
    pub enabled: bool,
    /// Connections closed per step. Default 10.
    pub batch: usize,
    /// Time between steps. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

impl Default for DrainConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            batch: 10,
            interval: Duration::from_secs(1),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct DrainTable {
    enabled: bool,
    batch: usize,
    #[serde(with = "humantime_serde")]
    interval: Duration,
}

impl Default for DrainTable {
    fn default() -> Self {
        let d = DrainConfig::default();
        Self {
            enabled: d.enabled,
            batch: d.batch,
            interval: d.interval,
        }
    }
}

impl<'de> Deserialize<'de> for DrainConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = DrainConfig;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a [drain] table or a boolean")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<DrainConfig, E> {
                Ok(DrainConfig {
                    enabled: v,
                    ..DrainConfig::default()
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<DrainConfig, A::Error> {
                let t = DrainTable::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(DrainConfig {
                    enabled: t.enabled,
                    batch: t.batch,
                    interval: t.interval,
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// `[reload]`
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ReloadConfig {
    /// Watch the config file's folder and reload on change (SIGHUP and `POST /reload` always
    /// work). Default true. Needs a restart to change.
    pub watch: bool,
    /// Wait this long for a burst of file events to settle, and between the two reads of the
    /// file that must agree. Default 200 ms.
    #[serde(with = "humantime_serde")]
    pub debounce: Duration,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        Self {
            watch: true,
            debounce: Duration::from_millis(200),
        }
    }
}

/// `[listen]`
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// TLS listener for devices (the address `cm.gelighting.com` resolves to on your LAN).
    /// Default `0.0.0.0:23779`. Changing it needs a restart.
    pub tls: SocketAddr,
    /// Optional plaintext listener (the old app port 23778). Off by default.
    pub plain: Option<SocketAddr>,
    /// Pending connections the kernel queues per listener (capped by `net.core.somaxconn`).
    /// Default 1024: a burst of reconnecting devices does not wait for SYN retries.
    pub backlog: u32,
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            tls: SocketAddr::from(([0, 0, 0, 0], 23779)),
            plain: None,
            backlog: 1024,
        }
    }
}

/// How the upstream address is chosen.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamMode {
    /// Connect to `upstream.addresses`, in order, first that answers.
    #[default]
    Fixed,
    /// Connect to the connection's original destination (iptables REDIRECT, SO_ORIGINAL_DST).
    Transparent,
}

/// `[upstream]`
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// `fixed` (default) or `transparent`.
    pub mode: UpstreamMode,
    /// `host:port` candidates tried in order in fixed mode. Defaults to the cloud's published
    /// addresses (newer then older firmware), since local DNS for the cloud names is redirected.
    pub addresses: Vec<String>,
    /// Speak TLS to the upstream (default true); false for plaintext local controllers.
    pub tls: bool,
    /// Verify the upstream certificate against `ca_file` (default false: the real cloud's
    /// certificate is self-signed and expired). A warning is logged at start while it is off.
    pub verify: bool,
    /// CA bundle (PEM) used when `verify = true`.
    pub ca_file: Option<PathBuf>,
    /// Accept only upstream certificates whose DER SHA-256 is in this list (64 hex digits each;
    /// `:` separators allowed). Empty = no pinning.
    pub pin_sha256: Vec<String>,
    /// SNI to send upstream (and the name verified). Default none, as devices send none.
    pub sni: Option<String>,
    /// Lowest TLS version offered upstream (default "1.2", what devices and the cloud speak).
    pub min_version: TlsVersion,
    /// OpenSSL cipher list offered upstream.
    pub ciphers: String,
    /// When no upstream answers, keep the device connection open this long before closing it
    /// (devices reconnect at once; a short delay causes reconnect storms). Default 15 s.
    #[serde(with = "humantime_serde")]
    pub cloud_down_close_delay: Duration,
    /// Probe (TCP + TLS) each fixed address that no connection has checked for this long.
    /// An address counts as up for three intervals after it answered or was reached, unless a
    /// failure came since. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            mode: UpstreamMode::Fixed,
            addresses: vec!["35.196.85.236:23779".into(), "34.73.130.191:23779".into()],
            tls: true,
            verify: false,
            ca_file: None,
            pin_sha256: Vec::new(),
            sni: None,
            min_version: TlsVersion::Tls12,
            ciphers: DEFAULT_UPSTREAM_CIPHERS.into(),
            cloud_down_close_delay: Duration::from_secs(15),
            probe_interval: Duration::from_secs(30),
        }
    }
}

/// A TLS protocol version (`tls.min_version`, `upstream.min_version`, `new_path.min_version`).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    /// TLS 1.0.
    #[serde(rename = "1.0")]
    Tls10,
    /// TLS 1.1.
    #[serde(rename = "1.1")]
    Tls11,
    /// TLS 1.2 (every captured device speaks it).
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    /// TLS 1.3.
    #[serde(rename = "1.3")]
    Tls13,
}

/// `[tls]`
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Folder holding the CA and leaf certificates; created by `certs init` or at first run.
    pub cert_dir: PathBuf,
    /// OpenSSL cipher list offered to devices (TLS 1.2 and below).
    pub ciphers: String,
    /// Lowest protocol version accepted: "1.0", "1.1", "1.2" (default) or "1.3".
    pub min_version: TlsVersion,
    /// Also serve the ECDSA P-256 leaf, so fingerprint-1 devices can use ECDHE-ECDSA suites.
    pub ecdsa: bool,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert_dir: PathBuf::from("certs"),
            ciphers: DEFAULT_DEVICE_CIPHERS.into(),
            min_version: TlsVersion::Tls12,
            ecdsa: true,
        }
    }
}

/// `[timeouts]`
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// Device TLS handshake. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub handshake: Duration,
    /// From the end of the handshake to the first whole frame. Default 15 s.
    #[serde(with = "humantime_serde")]
    pub first_frame: Duration,
    /// Upstream TCP connect plus TLS handshake, per address. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub upstream_connect: Duration,
    /// From forwarding the device's first frame to the upstream's first answer (0x28 for a
    /// device, 0x18 for the app). An upstream that closes, says something that is not Cync, or
    /// stays silent this long counts as down, and the device is held. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub upstream_answer: Duration,
    /// Close a connection with no bytes in either direction for this long. Default 90 s (devices
    /// send a heartbeat about every 21 s).
    #[serde(with = "humantime_serde")]
    pub idle: Duration,
    /// On SIGTERM/Ctrl-C, how long open sessions get to close before the process exits.
    #[serde(with = "humantime_serde")]
    pub drain: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            handshake: Duration::from_secs(10),
            first_frame: Duration::from_secs(15),
            upstream_connect: Duration::from_secs(5),
            upstream_answer: Duration::from_secs(10),
            idle: Duration::from_secs(90),
            drain: Duration::from_secs(10),
        }
    }
}

/// `[limits]`
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Connections handled at once (devices and apps); more are closed at accept. Default 4096.
    pub max_connections: usize,
    /// Largest frame the decoder accepts, header included (bytes are forwarded regardless).
    /// Default 65536.
    pub max_frame: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_frame: crate::codec::DEFAULT_MAX_FRAME,
        }
    }
}

/// `[admin]`
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Serve `/metrics`, `/healthz`, `/readyz`. Default true.
    pub enabled: bool,
    /// Admin address. Default `127.0.0.1:9400` (loopback only).
    pub listen: SocketAddr,
    /// A request's headers must arrive within this. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Close an admin connection with no bytes either way for this long. Default 60 s.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Admin connections at once; more are closed at accept (they share the process's
    /// descriptors with the devices). Default 64.
    pub max_connections: usize,
    /// Serve the web console at `/` and its JSON endpoints (`/api/devices`, `/api/events`,
    /// `/api/rollout`, `POST /api/canary`). Default true.
    pub console: bool,
    /// Console event streams (`GET /api/events`) open at once; more are answered 503.
    /// Default 8.
    pub console_max_streams: usize,
    /// Decoded frames put on the console's streams per second at most; above it frames are
    /// left out (counted in `cync_mitm_console_events_dropped_total{reason="rate"}`), so a
    /// busy proxy spends no more than this on the console. Default 2000.
    pub console_max_events_per_second: u64,
    /// Host names (no port) requests may name the admin server by besides IP addresses and
    /// `localhost`, for example the machine's own name or a Compose service name when `listen`
    /// is not loopback; `"*"` allows any. A request naming another host is refused (DNS
    /// rebinding), `/healthz` and `/readyz` excepted. Default none.
    pub allowed_hosts: Vec<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 9400)),
            header_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            max_connections: 64,
            console: true,
            console_max_streams: 8,
            console_max_events_per_second: 2000,
            allowed_hosts: Vec::new(),
        }
    }
}

/// Log line format.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` (default) or `json`.
    pub format: LogFormat,
    /// Filter in `RUST_LOG` syntax (e.g. `info,cync_mitm::proxy=debug`); `RUST_LOG` overrides it.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            filter: "info".into(),
        }
    }
}

/// `[metrics]`
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Add per-device series (`device_id` label). Off by default: cardinality grows with devices.
    pub per_device_labels: bool,
    /// At most this many devices have per-device series (ids are chosen by peers); a device's
    /// series are removed 10 minutes after it disconnects. Default 1000.
    pub max_device_series: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            per_device_labels: false,
            max_device_series: 1000,
        }
    }
}

// === impl ConfigError ===

/// Why a configuration was rejected: the file, where, which field, and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The file (or `<string>`).
    pub file: PathBuf,
    /// 1-based line, where known.
    pub line: Option<usize>,
    /// 1-based column, where known.
    pub column: Option<usize>,
    /// Dotted field path (`upstream.pin_sha256`), where known.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
            if let Some(c) = self.column {
                write!(f, ":{c}")?;
            }
        }
        write!(f, ": ")?;
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        write!(f, "{}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// 1-based line and column of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.len(), |p| before.len() - p - 1)
        + 1;
    (line, col)
}

/// The dotted key defined on the line containing `offset`, qualified by its `[table]`.
fn field_at(text: &str, offset: usize) -> Option<String> {
    let mut table = String::new();
    let mut pos = 0;
    for line in text.split_inclusive('\n') {
        let end = pos + line.len();
        let t = line.trim();
        if t.starts_with('[') {
            table = t.trim_matches(|c| c == '[' || c == ']').trim().to_owned();
            if offset < end {
                return Some(table);
            }
        } else if offset < end {
            let key = t.split('=').next()?.trim();
            if key.is_empty() || key.starts_with('#') {
                return (!table.is_empty()).then_some(table);
            }
            return Some(if table.is_empty() {
                key.to_owned()
            } else {
                format!("{table}.{key}")
            });
        }
        pos = end;
    }
    None
}

/// Line and column where `field` (dotted) is set in `text`, found by scanning tables and keys.
fn locate(text: &str, field: &str) -> Option<(usize, usize)> {
    let (table, key) = field.rsplit_once('.').unwrap_or(("", field));
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_start();
        if t.starts_with('[') {
            current = t
                .trim()
                .trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_owned();
            continue;
        }
        let Some(k) = t.split('=').next().map(str::trim) else {
            continue;
        };
        let full = if current.is_empty() {
            k.to_owned()
        } else {
            format!("{current}.{k}")
        };
        if full == field || (current == table && k == key) {
            return Some((i + 1, line.len() - t.len() + 1));
        }
    }
    None
}

// === impl Config ===

fn invalid(field: &str, message: impl Into<String>) -> (String, String) {
    (field.to_owned(), message.into())
}

/// Parses a pin string (64 hex digits, `:` allowed) into bytes.
pub fn parse_pin(s: &str) -> Option<[u8; 32]> {
    let clean: String = s.chars().filter(|c| *c != ':').collect();
    let v = crate::hexutil::parse_hex(&clean).ok()?;
    v.try_into().ok()
}

/// A DNS host name (letters, digits, `-`, `_`, dots; labels of 1–63, at most 253 in all).
pub fn is_dns_name(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// The longest duration any option takes.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// `host:port` with a non-empty host and a port number.
pub fn check_host_port(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0),
        None => false,
    }
}

/// Largest configuration file read.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Reads a configuration file: a regular file (not a device, FIFO or folder) of at most
/// [`MAX_CONFIG_BYTES`], so `/dev/zero` or a huge file is refused instead of filling memory.
pub fn read_config_file(path: &Path) -> Result<Vec<u8>, ConfigError> {
    use std::io::Read as _;
    let err = |message: String| ConfigError {
        file: path.to_owned(),
        line: None,
        column: None,
        field: None,
        message,
    };
    let f = std::fs::File::open(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let m = f.metadata().map_err(|e| err(format!("cannot read: {e}")))?;
    if !m.is_file() {
        return Err(err("not a regular file".into()));
    }
    let too_big = || {
        err(format!(
            "a configuration file is at most {MAX_CONFIG_BYTES} bytes"
        ))
    };
    if m.len() > MAX_CONFIG_BYTES {
        return Err(too_big());
    }
    let mut bytes = Vec::new();
    f.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| err(format!("cannot read: {e}")))?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(too_big());
    }
    Ok(bytes)
}

/// Refuses a configuration file that sets nothing (empty, blank or only comments). Such a file
/// would mean "every built-in default" (the real cloud's addresses, capture off): far more
/// often it is a save caught half-way (truncate, then write) than what anyone meant.
pub fn check_not_empty(bytes: &[u8], path: &Path) -> Result<(), ConfigError> {
    fn has_value(t: &toml::Table) -> bool {
        t.values().any(|v| match v {
            toml::Value::Table(t) => has_value(t),
            _ => true,
        })
    }
    let text = String::from_utf8_lossy(bytes);
    let sets_something = match text.parse::<toml::Table>() {
        // Section headers alone (`[upstream]` and nothing under it) set nothing either.
        Ok(t) => has_value(&t),
        // Not TOML: parsing reports where.
        Err(_) => true,
    };
    if sets_something {
        return Ok(());
    }
    Err(ConfigError {
        file: path.to_owned(),
        line: None,
        column: None,
        field: None,
        message: if bytes.is_empty() {
            "the file is empty; refusing it (a save caught half-way looks like this). Run without \
             --config for the built-in defaults"
                .into()
        } else {
            "the file sets nothing (only blanks, comments and section headers); refusing it. Run \
             without --config for the built-in defaults"
                .into()
        },
    })
}

/// Checks a backend section (`upstream`, `new_path`): addresses, pins, verification.
/// `in_use`: the section is used (a missing trust anchor is an error only then).
fn check_backend(
    section: &str,
    addresses: &[String],
    tls: &ClientTlsSettings,
    in_use: bool,
) -> Result<(), (String, String)> {
    let field = |k: &str| format!("{section}.{k}");
    if let Some(bad) = addresses.iter().find(|a| !check_host_port(a)) {
        return Err((field("addresses"), format!("{bad:?} is not host:port")));
    }
    if let Some(bad) = tls.pin_sha256.iter().find(|p| parse_pin(p).is_none()) {
        return Err((
            field("pin_sha256"),
            format!("{bad:?} is not 64 hex digits (a SHA-256 of the certificate's DER)"),
        ));
    }
    if let Some(sni) = &tls.sni
        && !is_dns_name(sni)
        && sni.parse::<std::net::IpAddr>().is_err()
    {
        return Err((
            field("sni"),
            format!("{sni:?} is not a host name or an IP address"),
        ));
    }
    if in_use && tls.verify && tls.ca_file.is_none() && tls.pin_sha256.is_empty() {
        return Err((
            field("verify"),
            format!(
                "verify = true needs {section}.ca_file (a CA bundle that signed the backend's \
                 certificate) or {section}.pin_sha256 (`cync-mitm upstream fingerprint HOST:PORT` \
                 prints the value to pin); {section}.verify = false accepts any certificate"
            ),
        ));
    }
    Ok(())
}

/// One warning per TLS leg in use that checks nothing about its peer.
pub fn insecure_tls_warnings(cfg: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let u = &cfg.upstream;
    if u.tls && !u.verify && u.pin_sha256.is_empty() {
        out.push(
            "upstream certificate verification is OFF (the real cloud's certificate is \
             self-signed and expired): set upstream.pin_sha256 to pin it (`cync-mitm upstream \
             fingerprint HOST:PORT` prints the value)"
                .to_owned(),
        );
    }
    let n = &cfg.new_path;
    if !n.tls.enabled() && !n.addresses.is_empty() {
        out.push(
            "new_path.tls = \"plain\": the traffic to the new path is plaintext, readable and \
             changeable by anyone on the path to the backend"
                .to_owned(),
        );
    }
    if n.tls.enabled() && !n.verify && n.pin_sha256.is_empty() && !n.addresses.is_empty() {
        out.push(
            "new_path certificate verification is OFF (new_path.verify = false): anyone on the \
             path to the backend can read and change the traffic; set new_path.ca_file or \
             new_path.pin_sha256"
                .to_owned(),
        );
    }
    out
}

impl Config {
    /// Parses TOML text (unknown keys rejected) and validates it. `file` names the source in errors.
    pub fn from_toml(text: &str, file: &Path) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| {
            let (line, column, field) = match e.span() {
                Some(span) => {
                    let (l, c) = line_col(text, span.start);
                    (Some(l), Some(c), field_at(text, span.start))
                }
                None => (None, None, None),
            };
            ConfigError {
                file: file.to_owned(),
                line,
                column,
                field,
                message: e.message().to_owned(),
            }
        })?;
        cfg.validate().map_err(|(field, message)| {
            let pos = locate(text, &field);
            ConfigError {
                file: file.to_owned(),
                line: pos.map(|p| p.0),
                column: pos.map(|p| p.1),
                field: Some(field),
                message,
            }
        })?;
        Ok(cfg)
    }

    /// Reads and validates a file. An empty file (or one with only comments) is refused: see
    /// [`check_not_empty`].
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let bytes = read_config_file(path)?;
        let text = String::from_utf8(bytes).map_err(|_| ConfigError {
            file: path.to_owned(),
            line: None,
            column: None,
            field: None,
            message: "not UTF-8 text".into(),
        })?;
        check_not_empty(text.as_bytes(), path)?;
        Self::from_toml(&text, path)
    }

    /// Every duration option with its dotted name (checked against [`MAX_DURATION`]).
    pub fn durations(&self) -> [(&'static str, Duration); 30] {
        [
            ("slo.save_interval", self.slo.save_interval),
            ("slo.command_timeout", self.slo.command_timeout),
            ("slo.eval_interval", self.slo.eval_interval),
            (
                "slo.decision_log_heartbeat",
                self.slo.decision_log_heartbeat,
            ),
            ("slo.webhook_timeout", self.slo.webhook_timeout),
            ("slo.prometheus_timeout", self.slo.prometheus_timeout),
            ("rollout.bake_time", self.rollout.bake_time),
            ("slo.latency_threshold", self.slo.latency_threshold),
            ("new_path.circuit_cooldown", self.new_path.circuit_cooldown),
            ("parity.timeout", self.parity.timeout),
            ("new_path.ack_timeout", self.new_path.ack_timeout),
            ("new_path.backoff_initial", self.new_path.backoff_initial),
            ("new_path.backoff_max", self.new_path.backoff_max),
            ("new_path.answer_timeout", self.new_path.answer_timeout),
            ("new_path.dedup_ttl", self.new_path.dedup_ttl),
            ("new_path.reconnect_grace", self.new_path.reconnect_grace),
            ("capture.max_file_age", self.capture.max_file_age),
            ("capture.close_idle_after", self.capture.close_idle_after),
            ("drain.interval", self.drain.interval),
            ("reload.debounce", self.reload.debounce),
            (
                "upstream.cloud_down_close_delay",
                self.upstream.cloud_down_close_delay,
            ),
            ("upstream.probe_interval", self.upstream.probe_interval),
            ("timeouts.handshake", self.timeouts.handshake),
            ("timeouts.first_frame", self.timeouts.first_frame),
            ("timeouts.upstream_connect", self.timeouts.upstream_connect),
            ("timeouts.upstream_answer", self.timeouts.upstream_answer),
            ("timeouts.idle", self.timeouts.idle),
            ("timeouts.drain", self.timeouts.drain),
            ("admin.header_timeout", self.admin.header_timeout),
            ("admin.idle_timeout", self.admin.idle_timeout),
        ]
    }

    /// Checks values that parse but make no sense. Returns the dotted field and the problem.
    pub fn validate(&self) -> Result<(), (String, String)> {
        // Every duration: at most a year (timers and deadlines add them to the clock; a
        // century overflows).
        for (name, d) in self.durations() {
            if d > MAX_DURATION {
                return Err(invalid(name, "must be at most 366 days"));
            }
        }
        let u = &self.upstream;
        if u.mode == UpstreamMode::Fixed && u.addresses.is_empty() {
            return Err(invalid(
                "upstream.addresses",
                "at least one host:port is needed in fixed mode",
            ));
        }
        check_backend("upstream", &u.addresses, &u.client_tls(), u.tls)?;
        if u.probe_interval < Duration::from_secs(1) {
            return Err(invalid("upstream.probe_interval", "must be at least 1s"));
        }
        if u.ciphers.trim().is_empty() {
            return Err(invalid("upstream.ciphers", "must not be empty"));
        }
        if self.tls.ciphers.trim().is_empty() {
            return Err(invalid("tls.ciphers", "must not be empty"));
        }
        if self.new_path.ciphers.trim().is_empty() {
            return Err(invalid("new_path.ciphers", "must not be empty"));
        }
        let n = &self.new_path;
        for (name, d) in [
            ("new_path.ack_timeout", n.ack_timeout),
            ("new_path.backoff_initial", n.backoff_initial),
            ("new_path.backoff_max", n.backoff_max),
            ("new_path.answer_timeout", n.answer_timeout),
        ] {
            if d < Duration::from_millis(10) {
                return Err(invalid(name, "must be at least 10ms"));
            }
        }
        if n.backoff_max < n.backoff_initial {
            return Err(invalid(
                "new_path.backoff_max",
                "must be at least new_path.backoff_initial",
            ));
        }
        if !(1..=100).contains(&n.circuit_failures) {
            return Err(invalid(
                "new_path.circuit_failures",
                "must be between 1 and 100",
            ));
        }
        if n.max_retries > 20 {
            return Err(invalid("new_path.max_retries", "must be at most 20"));
        }
        if n.circuit_cooldown > Duration::from_secs(3600) {
            return Err(invalid("new_path.circuit_cooldown", "must be at most 1h"));
        }
        for (name, v) in [
            ("new_path.dedup_size", n.dedup_size),
            ("new_path.send_queue_max", n.send_queue_max),
            ("new_path.recv_queue_max", n.recv_queue_max),
        ] {
            if !(1..=100_000).contains(&v) {
                return Err(invalid(name, "must be between 1 and 100000"));
            }
        }
        if self.new_path.min_version < TlsVersion::Tls12 {
            return Err(invalid(
                "new_path.min_version",
                "the new path speaks TLS 1.2 or 1.3 (\"1.2\" or \"1.3\"); TLS 1.0 and 1.1 are \
                 for the cloud leg only (upstream.min_version)",
            ));
        }
        let t = &self.timeouts;
        for (name, d) in [
            ("timeouts.handshake", t.handshake),
            ("timeouts.first_frame", t.first_frame),
            ("timeouts.upstream_connect", t.upstream_connect),
            ("timeouts.upstream_answer", t.upstream_answer),
            ("timeouts.idle", t.idle),
        ] {
            if d.is_zero() {
                return Err(invalid(name, "must be greater than zero"));
            }
        }
        if !(1..=MAX_CONNECTIONS).contains(&self.limits.max_connections) {
            return Err(invalid(
                "limits.max_connections",
                format!("must be between 1 and {MAX_CONNECTIONS}"),
            ));
        }
        if !(1..=100_000).contains(&self.metrics.max_device_series) {
            return Err(invalid(
                "metrics.max_device_series",
                "must be between 1 and 100000",
            ));
        }
        if !(Duration::from_millis(10)..=Duration::from_secs(5)).contains(&self.reload.debounce) {
            return Err(invalid("reload.debounce", "must be between 10ms and 5s"));
        }
        if !(1..=65_535).contains(&self.listen.backlog) {
            return Err(invalid("listen.backlog", "must be between 1 and 65535"));
        }
        let a = &self.admin;
        for (name, d) in [
            ("admin.header_timeout", a.header_timeout),
            ("admin.idle_timeout", a.idle_timeout),
        ] {
            if d.is_zero() {
                return Err(invalid(name, "must be greater than zero"));
            }
        }
        if !(1..=4096).contains(&a.max_connections) {
            return Err(invalid(
                "admin.max_connections",
                "must be between 1 and 4096",
            ));
        }
        if !(1..=a.max_connections.min(64)).contains(&a.console_max_streams) {
            return Err(invalid(
                "admin.console_max_streams",
                "must be between 1 and admin.max_connections (at most 64)",
            ));
        }
        if !(1..=100_000).contains(&a.console_max_events_per_second) {
            return Err(invalid(
                "admin.console_max_events_per_second",
                "must be between 1 and 100000",
            ));
        }
        if a.allowed_hosts.len() > 64 {
            return Err(invalid("admin.allowed_hosts", "at most 64 names"));
        }
        for h in &a.allowed_hosts {
            let ok = h == "*"
                || !h.is_empty()
                    && h.len() <= 253
                    && h.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
            if !ok {
                return Err(invalid(
                    "admin.allowed_hosts",
                    format!(
                        "`{h}` is not a host name (letters, digits, `-` and `.`; no port) nor `*`"
                    ),
                ));
            }
        }
        if !(crate::codec::HEADER_LEN + 7..=16 * 1024 * 1024).contains(&self.limits.max_frame) {
            return Err(invalid(
                "limits.max_frame",
                "must be between 12 bytes and 16 MiB",
            ));
        }
        if let Err(e) = self.log.filter.parse::<tracing_subscriber::EnvFilter>() {
            return Err(invalid("log.filter", e.to_string()));
        }
        let r = &self.routing;
        if !(0.0..=100.0).contains(&r.canary_percent) {
            return Err(invalid(
                "routing.canary_percent",
                format!("{} is not between 0 and 100", r.canary_percent),
            ));
        }
        for (field, list) in [
            ("routing.cohort", &r.cohort),
            ("routing.exclude", &r.exclude),
        ] {
            if let Some(bad) = list
                .iter()
                .find(|s| crate::route::parse_device_id(s).is_none())
            {
                return Err(invalid(
                    field,
                    format!("{bad:?} is not a device id (hex, up to 8 digits, as in the logs)"),
                ));
            }
        }
        let n = &self.new_path;
        check_backend(
            "new_path",
            &n.addresses,
            &n.client_tls(),
            n.tls.enabled() && !n.addresses.is_empty(),
        )?;
        let routes_new = matches!(
            r.mode,
            crate::route::Mode::NewPrimary | crate::route::Mode::NewOnly
        ) && (r.canary_percent > 0.0 || !r.cohort.is_empty());
        if routes_new && n.addresses.is_empty() {
            return Err(invalid(
                "routing.mode",
                format!(
                    "mode {} routes devices to the new path, but new_path.addresses is empty",
                    r.mode.label()
                ),
            ));
        }
        let c = &self.capture;
        if let Some(bad) = c
            .devices
            .iter()
            .find(|s| crate::route::parse_device_id(s).is_none())
        {
            return Err(invalid(
                "capture.devices",
                format!("{bad:?} is not a device id"),
            ));
        }
        if let Some(bad) = c.types.iter().find(|s| parse_packet_type(s).is_none()) {
            return Err(invalid(
                "capture.types",
                format!("{bad:?} is not a packet type (\"0x73\" or a name such as \"pipe\")"),
            ));
        }
        if !(1..=MAX_CAPTURE_QUEUE).contains(&c.queue) {
            return Err(invalid(
                "capture.queue",
                format!(
                    "must be between 1 and {MAX_CAPTURE_QUEUE} (the queue is allocated up front)"
                ),
            ));
        }
        if !(4096..=crate::capture::read::MAX_CAPTURE_BYTES).contains(&c.max_file_bytes) {
            return Err(invalid(
                "capture.max_file_bytes",
                "must be between 4096 and 2147483648 (2 GiB, the most capture read and replay read)",
            ));
        }
        if c.max_file_age.is_zero() {
            return Err(invalid("capture.max_file_age", "must be greater than zero"));
        }
        if c.max_files == 0 {
            return Err(invalid("capture.max_files", "must be at least 1"));
        }
        if c.close_idle_after.is_zero() {
            return Err(invalid(
                "capture.close_idle_after",
                "must be greater than zero",
            ));
        }
        if !(1..=65_536).contains(&c.max_open_files) {
            return Err(invalid(
                "capture.max_open_files",
                "must be between 1 and 65536",
            ));
        }
        if self.drain.batch == 0 {
            return Err(invalid("drain.batch", "must be at least 1"));
        }
        let o = &self.slo;
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&o.eval_interval) {
            return Err(invalid("slo.eval_interval", "must be between 1s and 1h"));
        }
        if o.min_events == 0 {
            return Err(invalid("slo.min_events", "must be at least 1"));
        }
        if !(Duration::from_millis(1)..=Duration::from_secs(10)).contains(&o.latency_threshold) {
            return Err(invalid(
                "slo.latency_threshold",
                "must be between 1ms and 10s",
            ));
        }
        if !(Duration::from_secs(10)..=Duration::from_secs(3600)).contains(&o.save_interval) {
            return Err(invalid("slo.save_interval", "must be between 10s and 1h"));
        }
        if !(Duration::from_millis(1)..=Duration::from_secs(10)).contains(&o.command_timeout) {
            return Err(invalid(
                "slo.command_timeout",
                "must be between 1ms and 10s",
            ));
        }
        if o.enabled && o.state_file.as_os_str().is_empty() {
            return Err(invalid("slo.state_file", "must not be empty"));
        }
        for (name, obj) in &o.objectives {
            let field = format!("slo.objectives.{name}");
            if !crate::slo::sli::Sli::ALL.iter().any(|s| s.name() == name) {
                return Err(invalid(
                    &field,
                    "is not an SLI (command_success, request_success, command_latency, packet_loss, decode_errors, queue_full, parity_drift)",
                ));
            }
            if !(obj.target > 0.0 && obj.target < 1.0) {
                return Err(invalid(
                    &field,
                    "target must be above 0 and below 1 (0.999 = 99.9 %)",
                ));
            }
            if !(Duration::from_secs(300)..=Duration::from_secs(31 * 86_400)).contains(&obj.window)
            {
                return Err(invalid(&field, "window must be between 5m and 31d"));
            }
        }
        if o.rollback_drain_rate == 0 {
            return Err(invalid(
                "slo.rollback_drain_rate",
                "must be at least 1 device per second",
            ));
        }
        if o.decision_log_heartbeat < o.eval_interval {
            return Err(invalid(
                "slo.decision_log_heartbeat",
                "must be at least slo.eval_interval",
            ));
        }
        if o.decision_log_keep_days == 0 {
            return Err(invalid("slo.decision_log_keep_days", "must be at least 1"));
        }
        if !o.webhook_url.is_empty() {
            crate::httpc::Target::parse(&o.webhook_url)
                .map_err(|m| invalid("slo.webhook_url", m))?;
        }
        for (name, d) in [
            ("slo.webhook_timeout", o.webhook_timeout),
            ("slo.prometheus_timeout", o.prometheus_timeout),
        ] {
            if !(Duration::from_millis(10)..=Duration::from_secs(60)).contains(&d) {
                return Err(invalid(name, "must be between 10ms and 60s"));
            }
        }
        if o.webhook_retries > 10 {
            return Err(invalid("slo.webhook_retries", "must be at most 10"));
        }
        if o.source == SloSource::Prometheus {
            if o.prometheus_url.is_empty() {
                return Err(invalid(
                    "slo.prometheus_url",
                    "is needed with slo.source = \"prometheus\"",
                ));
            }
            crate::httpc::Target::parse(&o.prometheus_url)
                .map_err(|m| invalid("slo.prometheus_url", m))?;
        }
        if o.prometheus_selector.contains(['{', '}']) {
            return Err(invalid(
                "slo.prometheus_selector",
                "is a list of label matchers without braces, such as job=\"cync-mitm\"",
            ));
        }
        let r = &self.rollout;
        let steps = r.resolved()?;
        if r.enabled {
            if steps.is_empty() {
                return Err(invalid("rollout.steps", "must name at least one step"));
            }
            if self.new_path.addresses.is_empty() {
                return Err(invalid(
                    "rollout.enabled",
                    "needs a new path (new_path.addresses)",
                ));
            }
        }
        let mut last = -1.0;
        for (i, st) in steps.iter().enumerate() {
            let field = format!("rollout.steps[{i}]");
            if st.bake > MAX_DURATION {
                return Err(invalid(&field, "bake must be at most 366 days"));
            }
            let at = st.percent.unwrap_or(0.0);
            if st.percent.is_none() && i > 0 {
                return Err(invalid(&field, "shadow can only be the first step"));
            }
            if at <= last {
                return Err(invalid(&field, "steps must go up"));
            }
            last = at;
        }
        if !matches!(
            r.mode,
            crate::route::Mode::NewPrimary | crate::route::Mode::NewOnly
        ) {
            return Err(invalid("rollout.mode", "must be new_primary or new_only"));
        }
        if !(0.0..1.0).contains(&r.min_budget) {
            return Err(invalid(
                "rollout.min_budget",
                "must be at least 0 and below 1",
            ));
        }
        if r.enabled && r.gates.is_empty() {
            return Err(invalid(
                "rollout.gates",
                "must name at least one SLI (a rollout with no gate would never be judged)",
            ));
        }
        for g in &r.gates {
            if !crate::slo::sli::Sli::ALL.iter().any(|s| s.name() == g) {
                return Err(invalid(
                    "rollout.gates",
                    format!(
                        "{g:?} is not an SLI (command_success, request_success, command_latency, packet_loss, decode_errors, queue_full, parity_drift)"
                    ),
                ));
            }
        }
        let p = &self.parity;
        if !(Duration::from_millis(100)..=Duration::from_secs(600)).contains(&p.timeout) {
            return Err(invalid("parity.timeout", "must be between 100ms and 10m"));
        }
        if p.max_log_bytes < 4096 {
            return Err(invalid("parity.max_log_bytes", "must be at least 4096"));
        }
        if p.log && p.dir.as_os_str().is_empty() {
            return Err(invalid(
                "parity.dir",
                "must not be empty while parity.log is on",
            ));
        }
        if self.drain.interval.is_zero() {
            return Err(invalid("drain.interval", "must be greater than zero"));
        }
        Ok(())
    }

    /// Applies the rollout plan's environment flags on top of the file: `CANARY_PERCENTAGE`
    /// (0–100), `DARK_LAUNCH` (`true` = shadow mode), `CANARY_COHORT` (comma-separated device
    /// ids). Returns the overrides applied, or the variable at fault.
    pub fn apply_env(
        &mut self,
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<Vec<String>, ConfigError> {
        let bad = |var: &str, msg: String| ConfigError {
            file: PathBuf::from(format!("${var}")),
            line: None,
            column: None,
            field: None,
            message: msg,
        };
        let mut applied = Vec::new();
        if let Some(v) = get("CANARY_PERCENTAGE") {
            let p: f64 = v
                .trim()
                .parse()
                .map_err(|_| bad("CANARY_PERCENTAGE", format!("{v:?} is not a number")))?;
            if !(0.0..=100.0).contains(&p) {
                return Err(bad(
                    "CANARY_PERCENTAGE",
                    format!("{p} is not between 0 and 100"),
                ));
            }
            self.routing.canary_percent = p;
            applied.push(format!("routing.canary_percent = {p} (CANARY_PERCENTAGE)"));
        }
        if let Some(v) = get("DARK_LAUNCH") {
            match v.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" => {
                    self.routing.mode = crate::route::Mode::Shadow;
                    applied.push("routing.mode = shadow (DARK_LAUNCH)".into());
                }
                "false" | "0" | "no" | "" => {}
                other => {
                    return Err(bad(
                        "DARK_LAUNCH",
                        format!("{other:?} is not true or false"),
                    ));
                }
            }
        }
        if let Some(v) = get("CANARY_COHORT") {
            let ids: Vec<String> = v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
            if let Some(b) = ids
                .iter()
                .find(|s| crate::route::parse_device_id(s).is_none())
            {
                return Err(bad("CANARY_COHORT", format!("{b:?} is not a device id")));
            }
            applied.push(format!("routing.cohort = {ids:?} (CANARY_COHORT)"));
            self.routing.cohort = ids;
        }
        self.validate().map_err(|(field, message)| ConfigError {
            file: PathBuf::from("environment"),
            line: None,
            column: None,
            field: Some(field),
            message,
        })?;
        Ok(applied)
    }

    /// The options that differ between `self` and `new` but only take effect after a restart.
    pub fn restart_only_changes(&self, new: &Config) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.listen != new.listen {
            v.push("listen");
        }
        if self.admin != new.admin {
            v.push("admin");
        }
        if self.limits.max_connections != new.limits.max_connections {
            v.push("limits.max_connections");
        }
        if self.log != new.log {
            v.push("log");
        }
        if self.metrics != new.metrics {
            v.push("metrics");
        }
        if self.reload != new.reload {
            v.push("reload");
        }
        if self.capture.queue != new.capture.queue {
            v.push("capture.queue");
        }
        if self.capture.keylog_file != new.capture.keylog_file {
            v.push("capture.keylog_file");
        }
        if self.slo.state_file != new.slo.state_file {
            v.push("slo.state_file");
        }
        v
    }

    /// `new` with the restart-only options kept at `self`'s (running) values.
    pub fn with_running_restart_only(&self, mut new: Config) -> Config {
        new.listen = self.listen.clone();
        new.admin = self.admin.clone();
        new.limits.max_connections = self.limits.max_connections;
        new.log = self.log.clone();
        new.metrics = self.metrics.clone();
        new.reload = self.reload.clone();
        new.capture.queue = self.capture.queue;
        new.capture.keylog_file = self.capture.keylog_file.clone();
        new.slo.state_file = self.slo.state_file.clone();
        new
    }

    /// The configuration as TOML (what `config show` prints).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }

    /// [`Config::to_toml`] with each optional key that is unset shown as a comment at the end
    /// of its section (`# key = example`), so every setting can be seen in one place.
    pub fn to_toml_annotated(&self) -> String {
        let unset: Vec<(&str, &str, &str)> = [
            (
                "listen",
                "plain",
                "\"0.0.0.0:23778\"",
                self.listen.plain.is_none(),
            ),
            (
                "upstream",
                "ca_file",
                "\"/etc/cync-mitm/cloud-ca.pem\"",
                self.upstream.ca_file.is_none(),
            ),
            (
                "upstream",
                "sni",
                "\"cm.gelighting.com\"",
                self.upstream.sni.is_none(),
            ),
            (
                "new_path",
                "ca_file",
                "\"/etc/cync-mitm/new-path-ca.pem\"",
                self.new_path.ca_file.is_none(),
            ),
            (
                "new_path",
                "sni",
                "\"backend.example\"",
                self.new_path.sni.is_none(),
            ),
            (
                "capture",
                "keylog_file",
                "\"captures/keys.log\"",
                self.capture.keylog_file.is_none(),
            ),
        ]
        .into_iter()
        .filter(|x| x.3)
        .map(|(s, k, v, _)| (s, k, v))
        .collect();
        let text = self.to_toml();
        let mut out = String::with_capacity(text.len() + 512);
        let mut section = String::new();
        let mut pending = String::new();
        let flush = |section: &str, out: &mut String| {
            for (s, k, v) in &unset {
                if *s == section {
                    out.push_str(&format!("# {k} = {v}    # unset\n"));
                }
            }
        };
        for line in text.lines() {
            let t = line.trim();
            if t.starts_with('[') && t.ends_with(']') {
                flush(&section, &mut out);
                out.push_str(&pending);
                pending.clear();
                section = t.trim_matches(|c| c == '[' || c == ']').to_owned();
                out.push_str(line);
                out.push('\n');
            } else if t.is_empty() {
                pending.push('\n');
            } else {
                out.push_str(&pending);
                pending.clear();
                out.push_str(line);
                out.push('\n');
            }
        }
        flush(&section, &mut out);
        out.push_str(&pending);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::from_toml(s, Path::new("test.toml"))
    }

    #[test]
    fn annotated_toml_shows_unset_keys_commented_and_parses_back() {
        let mut c = Config::default();
        c.upstream.sni = Some("cm.gelighting.com".into());
        let text = c.to_toml_annotated();
        assert_eq!(Config::from_toml(&text, Path::new("x")).unwrap(), c);
        assert!(text.contains("# plain = "), "{text}");
        assert!(text.contains("# keylog_file = "), "{text}");
        assert!(!text.contains("# sni = \"cm.gelighting.com\""), "{text}");
        // Each comment sits in its own section.
        let upstream = text.split("[upstream]").nth(1).unwrap_or_default();
        let upstream = upstream.split("\n[").next().unwrap_or_default();
        assert!(upstream.contains("# ca_file = "), "{upstream}");
        assert!(
            upstream.contains("sni = \"cm.gelighting.com\""),
            "{upstream}"
        );
        // Uncommenting a line gives a valid file.
        let set = text.replace("# keylog_file = ", "keylog_file = ");
        assert!(Config::from_toml(&set, Path::new("x")).is_ok());
    }

    #[test]
    fn empty_file_is_all_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.listen.tls.port(), 23779);
        assert_eq!(c.admin.listen.ip().to_string(), "127.0.0.1");
        assert_eq!(c.timeouts.idle, Duration::from_secs(90));
    }

    #[test]
    fn unknown_key_names_line_and_field() {
        let e = parse("[upstream]\ntls = true\nbogus = 1\n").unwrap_err();
        assert_eq!(e.line, Some(3));
        assert_eq!(e.field.as_deref(), Some("upstream.bogus"));
        assert!(e.message.contains("unknown field"), "{e}");
        assert!(
            e.to_string()
                .starts_with("test.toml:3:1: upstream.bogus: unknown field"),
            "{e}"
        );
        let e = parse("[nope]\n").unwrap_err();
        assert_eq!(e.line, Some(1));
    }

    #[test]
    fn type_errors_and_durations() {
        let e = parse("[timeouts]\nidle = \"soon\"\n").unwrap_err();
        assert_eq!(e.line, Some(2));
        assert_eq!(e.field.as_deref(), Some("timeouts.idle"));
        let c = parse("[timeouts]\nidle = \"2m 30s\"\n").unwrap();
        assert_eq!(c.timeouts.idle, Duration::from_secs(150));
    }

    #[test]
    fn validation_names_the_field_line() {
        let e = parse("# pins\n[upstream]\naddresses = [\"a:1\"]\npin_sha256 = [\"abcd\"]\n")
            .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("upstream.pin_sha256"));
        assert_eq!(e.line, Some(4));
        let e = parse("[upstream]\naddresses = [\"nohostport\"]\n").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("upstream.addresses"));
        let e = parse("[limits]\nmax_connections = 0\n").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("limits.max_connections"));
        assert_eq!(e.line, Some(2));
        let e = parse("[upstream]\nverify = true\n").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("upstream.verify"));
        let e = parse("[log]\nfilter = \"info,[[[\"\n").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("log.filter"));
    }

    #[test]
    fn files_that_set_nothing_or_are_not_config_files_are_refused() {
        let p = Path::new("x.toml");
        for nothing in [
            "",
            "\n# c\n",
            "[upstream]\n",
            "[upstream]\n[capture]\n# x\n",
            "[a.b]\n",
        ] {
            assert!(
                check_not_empty(nothing.as_bytes(), p).is_err(),
                "{nothing:?}"
            );
        }
        for something in ["[upstream]\ntls = true\n", "a.b = 1", "not toml ["] {
            assert!(
                check_not_empty(something.as_bytes(), p).is_ok(),
                "{something:?}"
            );
        }
        let t0 = std::time::Instant::now();
        let e = Config::load(Path::new("/dev/zero")).unwrap_err();
        assert!(e.message.contains("not a regular file"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(1));
        let d = tempfile::tempdir().unwrap();
        assert!(Config::load(d.path()).is_err());
        let big = d.path().join("big.toml");
        std::fs::write(
            &big,
            format!("# {}\nlog.filter = \"info\"\n", "x".repeat(2 << 20)),
        )
        .unwrap();
        let e = Config::load(&big).unwrap_err();
        assert!(e.message.contains("at most"), "{e}");
    }

    #[test]
    fn every_duration_is_bounded() {
        // Every option that serializes as a duration is in `durations()`.
        fn walk(prefix: &str, v: &toml::Value, out: &mut Vec<String>) {
            match v {
                toml::Value::Table(t) => {
                    for (k, v) in t {
                        let name = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        walk(&name, v, out);
                    }
                }
                toml::Value::String(s) if humantime::parse_duration(s).is_ok() => {
                    out.push(prefix.to_owned())
                }
                _ => {}
            }
        }
        let c = Config::default();
        let v: toml::Value = toml::from_str(&c.to_toml()).unwrap();
        let mut found = Vec::new();
        walk("", &v, &mut found);
        found.sort();
        let mut listed: Vec<String> = c.durations().iter().map(|(n, _)| n.to_string()).collect();
        listed.sort();
        assert_eq!(found, listed);
        for (name, _) in c.durations() {
            let (section, key) = name.split_once('.').unwrap();
            let e = parse(&format!("[{section}]\n{key} = \"200000000000y\"\n")).expect_err(name);
            assert_eq!(e.field.as_deref(), Some(name), "{e}");
            let e = parse(&format!("[{section}]\n{key} = \"400d\"\n")).expect_err(name);
            assert_eq!(e.field.as_deref(), Some(name), "{e}");
            assert!(e.message.contains("366 days"), "{name}: {e}");
        }
    }

    #[test]
    fn slo_objectives_are_checked_by_name_target_and_window() {
        let ok = parse("[slo.objectives]\ncommand_success = { target = 0.99, window = \"7d\" }\n")
            .unwrap();
        assert_eq!(
            ok.slo.objective(crate::slo::sli::Sli::CommandSuccess),
            crate::slo::Objective {
                target: 0.99,
                window: 7 * 86_400
            }
        );
        assert_eq!(
            ok.slo.objective(crate::slo::sli::Sli::QueueFull),
            crate::slo::sli::Sli::QueueFull.default_objective()
        );
        for (bad, why) in [
            (
                "nonsense = { target = 0.9, window = \"1h\" }",
                "is not an SLI",
            ),
            ("queue_full = { target = 1.0, window = \"1h\" }", "below 1"),
            (
                "queue_full = { target = 0.9, window = \"1m\" }",
                "between 5m and 31d",
            ),
            (
                "queue_full = { target = 0.9, window = \"40d\" }",
                "between 5m and 31d",
            ),
        ] {
            let e = parse(&format!("[slo.objectives]\n{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert!(parse("[slo]\neval_interval = \"0s\"\n").is_err());
        assert!(parse("[slo]\nmin_events = 0\n").is_err());
        assert!(parse("[slo]\nlatency_threshold = \"1h\"\n").is_err());
    }

    #[test]
    fn new_path_tls_modes_parse_names_and_booleans() {
        for (text, want) in [
            ("\"modern\"", NewPathTls::Modern),
            ("\"legacy\"", NewPathTls::Legacy),
            ("\"plain\"", NewPathTls::Plain),
            ("true", NewPathTls::Modern),
            ("false", NewPathTls::Plain),
        ] {
            let c = parse(&format!("[new_path]\ntls = {text}\n")).unwrap();
            assert_eq!(c.new_path.tls, want, "{text}");
        }
        assert_eq!(Config::default().new_path.tls, NewPathTls::Modern);
        assert_eq!(
            NewPathTls::Modern.engine(),
            crate::tls::Engine::Rustls,
            "a new backend is modern"
        );
        assert_eq!(NewPathTls::Legacy.engine(), crate::tls::Engine::OpenSsl);
        let e = parse("[new_path]\ntls = \"tls13\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown TLS mode \"tls13\""), "{e}");
        assert!(parse("[new_path]\ntls = 3\n").is_err());
        // Shown as its name.
        let shown = toml::to_string(&Config::default()).unwrap();
        assert!(shown.contains("tls = \"modern\""), "{shown}");
    }

    #[test]
    fn new_path_tls_is_verified_by_default() {
        let c = Config::default();
        assert!(c.new_path.verify);
        assert_eq!(c.new_path.min_version, TlsVersion::Tls12);
        assert_eq!(c.upstream.min_version, TlsVersion::Tls12);
        assert!(!c.new_path.ciphers.contains("SECLEVEL"));
        // No address: nothing to verify yet.
        assert!(
            insecure_tls_warnings(&c).len() == 1,
            "only the upstream warns"
        );
        let e = parse("[new_path]\naddresses = [\"10.0.0.5:23779\"]\n").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("new_path.verify"));
        assert!(e.message.contains("new_path.ca_file"), "{e}");
        assert!(e.message.contains("upstream fingerprint"), "{e}");
        for ok in [
            "[new_path]\naddresses = [\"10.0.0.5:23779\"]\nca_file = \"ca.pem\"\n",
            "[new_path]\naddresses = [\"10.0.0.5:23779\"]\npin_sha256 = [\"{pin}\"]\n",
            "[new_path]\naddresses = [\"10.0.0.5:23779\"]\ntls = false\n",
        ] {
            let text = ok.replace("{pin}", &"ab".repeat(32));
            parse(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
        }
        let c = parse("[new_path]\naddresses = [\"10.0.0.5:23779\"]\nverify = false\n").unwrap();
        let w = insecure_tls_warnings(&c);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[1].contains("new_path certificate verification is OFF"));
        let c = parse(
            "[upstream]\npin_sha256 = [\"{p}\"]\n"
                .replace("{p}", &"cd".repeat(32))
                .as_str(),
        )
        .unwrap();
        assert!(insecure_tls_warnings(&c).is_empty());
        // Pins alone satisfy upstream.verify too.
        let text = format!(
            "[upstream]\nverify = true\npin_sha256 = [\"{}\"]\n",
            "cd".repeat(32)
        );
        assert!(parse(&text).is_ok());
        let e = parse("[tls]\nmin_version = \"1.4\"\n").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("tls.min_version"));
        let e = parse("[new_path]\nmin_version = \"1.1\"\n").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("new_path.min_version"));
        assert!(parse("[upstream]\nmin_version = \"1.0\"\n").is_ok());
        // SNI must be a name or an IP: a NUL would panic OpenSSL, "" or "[]" would verify
        // nothing.
        for bad in ["\\u0000", "", "[]", "a b", "x..y", "\\u001b[31m"] {
            let e = parse(&format!("[upstream]\nsni = \"{bad}\"\n")).unwrap_err();
            assert_eq!(e.field.as_deref(), Some("upstream.sni"), "{bad:?}");
            let e = parse(&format!("[new_path]\nsni = \"{bad}\"\n")).unwrap_err();
            assert_eq!(e.field.as_deref(), Some("new_path.sni"), "{bad:?}");
        }
        for good in [
            "cm.gelighting.com",
            "backend",
            "10.0.0.5",
            "::1",
            "a-b_c.example.",
        ] {
            assert!(
                parse(&format!("[upstream]\nsni = \"{good}\"\n")).is_ok(),
                "{good}"
            );
        }
        let c = parse("[new_path]\naddresses = [\"10.0.0.5:23779\"]\ntls = false\n").unwrap();
        assert!(
            insecure_tls_warnings(&c)
                .iter()
                .any(|w| w.contains("new_path.tls = \"plain\"")),
        );
    }

    #[test]
    fn routing_validation_and_drain_shorthand() {
        let e = parse("[routing]\ncanary_percent = 101\n").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("routing.canary_percent"));
        assert_eq!(e.line, Some(2));
        let e = parse("[routing]\ncohort = [\"zz\"]\n").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("routing.cohort"));
        let e = parse("[routing]\nmode = \"new_only\"\ncanary_percent = 5\n").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("routing.mode"));
        assert!(e.message.contains("new_path.addresses"));
        let e = parse("[routing]\nmode = \"sideways\"\n").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("routing.mode"));
        let c = parse("drain = false\n").unwrap();
        assert!(!c.drain.enabled);
        let c = parse("[drain]\nbatch = 3\ninterval = \"200ms\"\n").unwrap();
        assert_eq!((c.drain.enabled, c.drain.batch), (true, 3));
        let e = parse("[drain]\nbatsh = 3\n").unwrap_err();
        assert!(e.message.contains("unknown field"), "{e}");
        assert_eq!(e.line, Some(2));
    }

    #[test]
    fn env_overrides() {
        let mut c = Config::default();
        c.new_path.addresses = vec!["127.0.0.1:1".into()];
        c.new_path.pin_sha256 = vec!["ab".repeat(32)];
        let env = |k: &str| match k {
            "CANARY_PERCENTAGE" => Some("12.5".to_string()),
            "DARK_LAUNCH" => Some("true".to_string()),
            "CANARY_COHORT" => Some("37962469, 0x38e8cf46".to_string()),
            _ => None,
        };
        let applied = c.apply_env(env).unwrap();
        assert_eq!(applied.len(), 3);
        assert_eq!(c.routing.canary_percent, 12.5);
        assert_eq!(c.routing.mode, crate::route::Mode::Shadow);
        assert_eq!(c.routing.cohort.len(), 2);
        let e = Config::default()
            .apply_env(|k| (k == "CANARY_PERCENTAGE").then(|| "lots".to_string()))
            .unwrap_err();
        assert!(e.to_string().contains("CANARY_PERCENTAGE"), "{e}");
    }

    #[test]
    fn restart_only_changes_are_named_and_kept() {
        let old = Config::default();
        let mut new = Config::default();
        new.listen.tls = "127.0.0.1:1".parse().unwrap();
        new.routing.canary_percent = 10.0;
        assert_eq!(old.restart_only_changes(&new), vec!["listen"]);
        let eff = old.with_running_restart_only(new);
        assert_eq!(eff.listen, old.listen);
        assert_eq!(eff.routing.canary_percent, 10.0);
    }

    #[test]
    fn pins_parse_with_colons() {
        let hex64 = "ab".repeat(32);
        assert!(parse_pin(&hex64).is_some());
        let colons: Vec<String> = (0..32).map(|_| "ab".to_string()).collect();
        assert!(parse_pin(&colons.join(":")).is_some());
        assert!(parse_pin("abc").is_none());
    }

    #[test]
    fn shipped_configs_are_valid() {
        for f in ["config/cync-mitm.toml", "config/default.toml"] {
            let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(f);
            Config::load(&p).unwrap_or_else(|e| panic!("{e}"));
        }
        // default.toml is exactly the built-in defaults.
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml");
        assert_eq!(Config::load(&p).unwrap(), Config::default());
    }

    #[test]
    fn round_trips_through_toml() {
        let c = Config::default();
        assert_eq!(parse(&c.to_toml()).unwrap(), c);
    }
}

#[cfg(test)]
mod doc_tests {
    use super::*;

    /// Every option of the schema is documented in docs/configuration.md.
    #[test]
    fn every_option_is_in_the_reference() {
        let doc = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md"),
        )
        .unwrap();
        let mut c = Config::default();
        // Give optional keys a value so they appear in the serialised form.
        c.listen.plain = Some("127.0.0.1:23778".parse().unwrap());
        c.upstream.ca_file = Some("ca.pem".into());
        c.upstream.sni = Some("x".into());
        c.capture.keylog_file = Some("k".into());
        let v: toml::Table = toml::from_str(&c.to_toml()).unwrap();
        let mut n = 0;
        for (section, keys) in &v {
            for key in keys.as_table().unwrap().keys() {
                let k = format!("`{section}.{key}`");
                assert!(
                    doc.contains(&k),
                    "{k} is not documented in docs/configuration.md"
                );
                n += 1;
            }
        }
        assert!(n > 20);
    }
}
