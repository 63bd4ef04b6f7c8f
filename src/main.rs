//! The `cync-mitm` binary: argument parsing and wiring only; the logic lives in the library.

#![forbid(unsafe_code)]

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use cync_mitm::cmd::decode;
use cync_mitm::config::{Config, EXIT_INVALID_CONFIG, LogFormat};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// Transparent MITM sidecar for GE Cync devices.
#[derive(Parser, Debug)]
#[command(
    name = "cync-mitm",
    version,
    about,
    after_help = "Examples:\n  \
    cync-mitm run --config config/cync-mitm.toml\n  \
    cync-mitm config check config/cync-mitm.toml\n  \
    cync-mitm decode 0xd3,0x00,0x00,0x00,0x00\n\n\
    Every command has its own --help with examples. Reference: docs/configuration.md, docs/metrics.md."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the proxy (built-in defaults when no config file is given).
    #[command(after_help = "Examples:\n  \
        cync-mitm run --config config/cync-mitm.toml\n  \
        RUST_LOG=debug cync-mitm run -c /etc/cync-mitm/cync-mitm.toml\n\n\
        Relative paths in the file (tls.cert_dir, capture.dir, ...) are relative to the working \
        directory, not to the file. SIGHUP or POST /reload re-reads the file; SIGTERM drains.")]
    Run {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// The whole product on this machine, with simulated devices, cloud and new backend: the
    /// rollout walked step by step under the SLO engine, a fault, the automatic rollback.
    #[command(after_help = "Examples:\n  \
        cync-mitm demo\n  \
        cync-mitm demo --devices 200 --duration 2m --keep\n  \
        cync-mitm demo --stay          # the console stays up after the rollback\n  \
        cync-mitm demo --quiet --duration 20s   # CI: the summary only, exit 0 when complete\n\n\
        Everything runs on 127.0.0.1; nothing leaves the machine.")]
    Demo {
        /// Simulated devices (1–2000).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=2000))]
        devices: u32,
        /// Sets the pace (10 s to 10 min): each rollout step bakes a sixth of it (2 s at least), so
        /// the whole run takes about this long.
        #[arg(long, default_value = "60s", value_parser = demo_duration)]
        duration: Duration,
        /// Keep the files (captures, logs, config) instead of deleting them at the end.
        #[arg(long)]
        keep: bool,
        /// Print only the summary.
        #[arg(long)]
        quiet: bool,
        /// Put the files here (kept) instead of a temporary folder.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// After the rollback, keep the proxy, devices and console running until Ctrl-C.
        #[arg(long)]
        stay: bool,
    },
    /// Certificate management.
    #[command(after_help = "Example:\n  cync-mitm certs init --config config/cync-mitm.toml")]
    Certs {
        #[command(subcommand)]
        cmd: CertsCmd,
    },
    /// Configuration files.
    #[command(
        after_help = "Examples:\n  cync-mitm config check config/cync-mitm.toml\n  \
        cync-mitm config show config/cync-mitm.toml"
    )]
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Decode Cync frames from hex: arguments form one stream; `-` reads stdin, one stream per line.
    #[command(after_help = "Examples:\n  \
        cync-mitm decode 23 00 00 00 1a 03 38 e8 cf 46 00 10 31 65 30 37 64 38 63 65 30 61 36 31 37 61 33 37 00 00 3c\n  \
        cync-mitm decode 0xd3,0x00,0x00,0x00,0x00 --format table\n  \
        xxd -p -c 0 frames.bin | cync-mitm decode - --with-hex")]
    Decode {
        /// Hex bytes (spaces, commas and `0x` prefixes allowed), or `-` for stdin.
        #[arg(required = true)]
        hex: Vec<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = OutFormat::Json)]
        format: OutFormat,
        /// Largest frame accepted, in bytes (header included).
        #[arg(long, default_value_t = cync_mitm::codec::DEFAULT_MAX_FRAME)]
        max_frame: usize,
        /// Add each frame's hex as a `hex` field (JSON only).
        #[arg(long)]
        with_hex: bool,
    },
    /// Decrypted captures.
    #[command(
        after_help = "Example:\n  cync-mitm capture read captures/20261201/38e8cf46.pcapng --format table"
    )]
    Capture {
        #[command(subcommand)]
        cmd: CaptureCmd,
    },
    /// Test fixtures.
    #[command(
        after_help = "Example:\n  cync-mitm fixtures extract capture.pcapng --out fixtures/captures"
    )]
    Fixtures {
        #[command(subcommand)]
        cmd: FixturesCmd,
    },
    /// Canary routing.
    #[command(after_help = "Example:\n  cync-mitm canary set 10 --config config/cync-mitm.toml")]
    Canary {
        #[command(subcommand)]
        cmd: CanaryCmd,
    },
    /// The SLO-gated progressive rollout ([rollout] in the config).
    #[command(after_help = "Examples:\n  \
        cync-mitm rollout status --config config/cync-mitm.toml\n  \
        cync-mitm rollout pause -c /etc/cync-mitm/cync-mitm.toml")]
    Rollout {
        #[command(subcommand)]
        cmd: RolloutCmd,
    },
    /// Ask a running proxy's admin server whether it is alive (`/healthz`) or ready
    /// (`/readyz`): exit 0 if so, 1 if not (for container health checks; no curl needed).
    #[command(after_help = "Examples:\n  \
        cync-mitm healthcheck --config /etc/cync-mitm/cync-mitm.toml\n  \
        cync-mitm healthcheck -c config/cync-mitm.toml --ready")]
    Healthcheck {
        /// The proxy's configuration file (its admin address); the built-in default
        /// (127.0.0.1:9400) when none is given.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Ask `/readyz` (listening, not draining, an upstream answered) instead of `/healthz`.
        #[arg(long)]
        ready: bool,
        /// Give up after this long.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Drain a running proxy before it stops (a Kubernetes preStop hook): it stops accepting,
    /// answers /readyz with 503 and closes its sessions --rate per second, so the devices
    /// reconnect to the other replicas gradually. Waits until every session closed: exit 0,
    /// or 1 at --timeout. One-way: restart the proxy to serve again.
    #[command(after_help = "Examples:\n  \
        cync-mitm drain --config /etc/cync-mitm/cync-mitm.toml --rate 50 --timeout 40s\n  \
        cync-mitm drain -c config/cync-mitm.toml --no-wait")]
    Drain {
        /// The proxy's configuration file (its admin address); the built-in default
        /// (127.0.0.1:9400) when none is given.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Devices closed per second (1–100000).
        #[arg(long, default_value_t = cync_mitm::admin::DEFAULT_DRAIN_RATE,
              value_parser = clap::value_parser!(u32).range(1..=100_000))]
        rate: u32,
        /// Give up waiting after this long (the drain goes on).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Begin the drain and return at once.
        #[arg(long)]
        no_wait: bool,
    },
    /// Service level objectives.
    #[command(after_help = "Examples:\n  \
        cync-mitm slo report --config config/cync-mitm.toml --days 30\n  \
        cync-mitm slo rules > deploy/prometheus/cync-mitm-recording.rules.yml")]
    Slo {
        #[command(subcommand)]
        cmd: SloCmd,
    },
    /// Upstream (cloud or new path) tools.
    #[command(after_help = "Example:\n  cync-mitm upstream fingerprint 127.0.0.1:23780")]
    Upstream {
        #[command(subcommand)]
        cmd: UpstreamCmd,
    },
    /// Replay captured device sessions into a backend and compare its answers with the
    /// cloud's recorded ones (the pre-flight parity check): exit 0 within `--max-drift`, 1
    /// beyond it or when a session could not run, 2 on bad input.
    #[command(after_help = "Examples:\n  \
        cync-mitm replay captures/20261201/*.pcapng --to backend.lan:23779 --ca-file backend-ca.pem\n  \
        cync-mitm replay sample.pcapng --to 127.0.0.1:23780 --insecure --speed 0 --json\n  \
        cync-mitm replay day.pcapng --to 10.0.0.5:23779 --config cync-mitm.toml --max-drift 0.1%")]
    Replay {
        /// Captures (pcapng or pcap; ours, or any capture of the Cync port).
        #[arg(required = true)]
        captures: Vec<PathBuf>,
        /// The backend, `host:port`.
        #[arg(long, value_parser = host_port)]
        to: String,
        /// Take the backend's TLS settings (`tls`, `verify`, `ca_file`, `pin_sha256`, `sni`,
        /// `min_version`, `ciphers`) from this file's `[new_path]`; the flags below override.
        #[arg(long)]
        config: Option<PathBuf>,
        /// CA bundle (PEM) the backend's certificate must chain to.
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// SHA-256 pin of the backend's certificate (repeatable).
        #[arg(long = "pin-sha256")]
        pin_sha256: Vec<String>,
        /// SNI to send, and the name verified.
        #[arg(long)]
        sni: Option<String>,
        /// Do not verify the backend's certificate.
        #[arg(long)]
        insecure: bool,
        /// Plain TCP, no TLS.
        #[arg(long)]
        plain: bool,
        /// Pace: 1 = as recorded, 10 = ten times faster, 0 = no pacing (every frame at once);
        /// a recorded gap waits at most 60 s.
        #[arg(long, default_value = "1", value_parser = speed)]
        speed: f64,
        /// How long each answer is awaited (at most 10m).
        #[arg(long, value_parser = replay_timeout, default_value = "5s")]
        timeout: Duration,
        /// Tolerated drift: a count (`0`) or a share of the compared requests (`0.1%`).
        #[arg(long, default_value = "0")]
        max_drift: cync_mitm::cmd::replay::MaxDrift,
        /// Sessions replayed at once.
        #[arg(long, default_value = "64", value_parser = clap::value_parser!(u16).range(1..))]
        concurrency: u16,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Device and cloud simulators.
    #[command(
        after_help = "Examples:\n  cync-mitm sim cloud --listen 127.0.0.1:23780\n  \
        cync-mitm sim devices --target 127.0.0.1:23779 --count 10"
    )]
    Sim {
        #[command(subcommand)]
        cmd: SimCmd,
    },
}

#[derive(Subcommand, Debug)]
enum CertsCmd {
    /// Mint the CA and the device-facing leaf certificates (keys written 0600).
    #[command(after_help = "Examples:\n  \
        cync-mitm certs init --config config/cync-mitm.toml   # into its tls.cert_dir\n  \
        cync-mitm certs init --dir /etc/cync-mitm/certs --force")]
    Init {
        /// Output folder (default: `tls.cert_dir` of `--config`, else `certs`).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Take the folder from this configuration file's `tls.cert_dir`.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
enum CaptureCmd {
    /// Print the decoded frames of a capture (pcapng or pcap), per stream and direction.
    #[command(after_help = "Examples:\n  \
        cync-mitm capture read captures/20261201/38e8cf46.pcapng\n  \
        cync-mitm capture read capture.pcapng --format table --stream 0")]
    Read {
        /// The capture.
        file: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = OutFormat::Json)]
        format: OutFormat,
        /// Only this stream.
        #[arg(long)]
        stream: Option<usize>,
    },
}

#[derive(Subcommand, Debug)]
enum FixturesCmd {
    /// Write every distinct frame of a capture, with its decoded fields, as a fixture file.
    #[command(after_help = "Example:\n  \
        cync-mitm fixtures extract captures/20261201/38e8cf46.pcapng --out fixtures/captures --name lamp")]
    Extract {
        /// The capture.
        file: PathBuf,
        /// Output folder (the tests load every fixtures/**/*.json).
        #[arg(long)]
        out: PathBuf,
        /// File and vector name prefix (default: the capture's file stem).
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum CanaryCmd {
    /// Set routing.canary_percent in a config file, keeping its comments; a running proxy
    /// watching the file applies it.
    #[command(after_help = "Examples:\n  \
        cync-mitm canary set 10 --config config/cync-mitm.toml\n  \
        cync-mitm canary set 0 -c /etc/cync-mitm/cync-mitm.toml   # everyone back to legacy")]
    Set {
        /// Share of devices on the new path, 0–100 (fractions allowed).
        percent: f64,
        /// The configuration file to edit.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Roll back now: every device to the legacy path, through the running proxy's admin
    /// server (POST /rollback), else in the SLO state file. Lasts until clear-override.
    #[command(after_help = "Examples:\n  \
        cync-mitm canary rollback --config /etc/cync-mitm/cync-mitm.toml\n  \
        docker compose exec cync-mitm cync-mitm canary rollback -c /etc/cync-mitm/cync-mitm.toml")]
    Rollback {
        /// The proxy's configuration file (its admin address and state file).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Lift a rollback override (automatic or POST /rollback): through the running proxy's
    /// admin server, else in the SLO state file.
    #[command(
        after_help = "Example:\n  cync-mitm canary clear-override --config config/cync-mitm.toml"
    )]
    ClearOverride {
        /// The proxy's configuration file (its admin address and state file).
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum RolloutCmd {
    /// Where the rollout stands: steps, current step, state, override.
    #[command(after_help = "Examples:\n  \
        cync-mitm rollout status --config config/cync-mitm.toml\n  \
        cync-mitm rollout status -c /etc/cync-mitm/cync-mitm.toml --json")]
    Status {
        /// The proxy's configuration file (its admin address and state file).
        #[arg(long, short)]
        config: PathBuf,
        /// Print the JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Hold the rollout at its current step.
    #[command(after_help = "Example:\n  cync-mitm rollout pause --config config/cync-mitm.toml")]
    Pause {
        /// The proxy's configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Let the rollout advance again (not while a rollback override is in force).
    #[command(after_help = "Example:\n  cync-mitm rollout resume --config config/cync-mitm.toml")]
    Resume {
        /// The proxy's configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum SloCmd {
    /// The compliance report (Markdown) from the SLO state file and the decision logs.
    #[command(after_help = "Examples:\n  \
        cync-mitm slo report --config config/cync-mitm.toml\n  \
        cync-mitm slo report -c /etc/cync-mitm/cync-mitm.toml --days 7 > slo-week.md")]
    Report {
        /// The proxy's configuration file (its state file and objectives).
        #[arg(long, short)]
        config: PathBuf,
        /// Days to report on (1–31).
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=31))]
        days: u64,
    },
    /// Print the Prometheus recording rules of the fleet-mode queries.
    #[command(after_help = "Example:\n  \
        cync-mitm slo rules > deploy/prometheus/cync-mitm-recording.rules.yml")]
    Rules,
}

#[derive(Subcommand, Debug)]
enum UpstreamCmd {
    /// Connect once and print the server's certificate chain with the SHA-256 to pin
    /// (`upstream.pin_sha256` or `new_path.pin_sha256`). Accepts any certificate.
    #[command(after_help = "Examples:\n  \
        cync-mitm upstream fingerprint 127.0.0.1:23780\n  \
        cync-mitm upstream fingerprint backend.lan:23779 --sni backend.lan --json")]
    Fingerprint {
        /// `host:port` to connect to.
        address: String,
        /// SNI to send (none by default, like devices).
        #[arg(long)]
        sni: Option<String>,
        /// Give up after this long.
        #[arg(long, value_parser = positive_duration, default_value = "10s")]
        timeout: Duration,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCmd {
    /// Validate a file: exit 0, or 64 with the file, line and field at fault.
    #[command(after_help = "Example:\n  \
        cync-mitm config check config/cync-mitm.toml && systemctl reload cync-mitm")]
    Check {
        /// The file.
        file: PathBuf,
    },
    /// Print the effective configuration (a file's, or the defaults, with the environment
    /// overrides applied) as TOML; unset optional keys are shown commented.
    #[command(after_help = "Examples:\n  \
        cync-mitm config show > my.toml             # every key with its default\n  \
        CANARY_PERCENTAGE=5 cync-mitm config show config/cync-mitm.toml")]
    Show {
        /// The file.
        file: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum SimServerTls {
    /// OpenSSL with the legacy suites, like the real cloud.
    Legacy,
    /// rustls.
    Modern,
    /// Plain TCP.
    Plain,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum SimClientTls {
    /// Device fingerprint 2: TLS 1.2, static-RSA AES-CBC only, no SNI.
    Fp2,
    /// OpenSSL defaults.
    Modern,
    /// Plain TCP.
    Plain,
}

#[derive(Subcommand, Debug)]
enum SimCmd {
    /// Run a simulated cloud.
    #[command(after_help = "Example:\n  \
        cync-mitm sim cloud --listen 127.0.0.1:23780 --command-interval 5s")]
    Cloud {
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:23780")]
        listen: SocketAddr,
        /// TLS flavour.
        #[arg(long, value_enum, default_value_t = SimServerTls::Legacy)]
        tls: SimServerTls,
        /// Certificates folder (created when missing).
        #[arg(long, default_value = "certs")]
        cert_dir: PathBuf,
        /// Send each connected device a command this often (e.g. 5s; at most 1d); none by
        /// default.
        #[arg(long, value_parser = sim_positive_period)]
        command_interval: Option<Duration>,
        /// Print a JSON report this often (at most 1d).
        #[arg(long, value_parser = sim_positive_period, default_value = "10s")]
        report_every: Duration,
        /// Share of commands (0–1) sent twice in a row.
        #[arg(long, value_parser = share, default_value = "0")]
        duplicate_commands: f64,
        /// Share of acked commands (0–1) sent again after their ack (a backend that missed
        /// the ack).
        #[arg(long, value_parser = share, default_value = "0")]
        repeat_after_ack: f64,
        /// Close every connection at each multiple of this (a restart; e.g. 30s; 10ms to 1d).
        #[arg(long, value_parser = restart_period)]
        restart_every: Option<Duration>,
        /// Share of answers to device requests (0–1) left unsent.
        #[arg(long, value_parser = share, default_value = "0")]
        drop_answers: f64,
        /// Start dropping answers only this long after start (a backend going bad in use).
        #[arg(long, value_parser = humantime::parse_duration)]
        drop_answers_after: Option<Duration>,
        /// Wait this long before each batch of answers (e.g. 200ms).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
        answer_delay: Duration,
        /// Share of answers (0–1) altered in content (sync acks, time answers).
        #[arg(long, value_parser = share, default_value = "0")]
        drift: f64,
        /// Stop reading each connection this long after accepting it (a stalled backend; at
        /// most 1d).
        #[arg(long, value_parser = sim_period)]
        stop_reading_after: Option<Duration>,
    },
    /// Run a fleet of simulated devices.
    #[command(after_help = "Example:\n  \
        cync-mitm sim devices --target 127.0.0.1:23779 --count 100 --duration 60s")]
    Devices {
        /// Where to connect (the proxy, or a cloud).
        #[arg(long, default_value = "127.0.0.1:23779")]
        target: SocketAddr,
        /// Number of devices (1–100000).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        count: u32,
        /// Seed for ids and auth codes.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Heartbeat period (at least 10ms).
        #[arg(long, value_parser = period_10ms, default_value = "21s")]
        heartbeat: Duration,
        /// TLS flavour.
        #[arg(long, value_enum, default_value_t = SimClientTls::Fp2)]
        tls: SimClientTls,
        /// Stop after this long (runs until Ctrl-C otherwise).
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
        /// Spread the first connects over this long.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
        ramp: Duration,
        /// Print a JSON report this often (at most 1d).
        #[arg(long, value_parser = sim_positive_period, default_value = "10s")]
        report_every: Duration,
        /// Share of received commands (0–1) ignored, as if lost.
        #[arg(long, value_parser = share, default_value = "0")]
        ignore_commands: f64,
        /// The proxy's admin address (e.g. 127.0.0.1:9400): each report asks its `/routing`
        /// which path each device is on and reports the devices' numbers per path.
        #[arg(long, value_parser = host_port)]
        admin: Option<String>,
    },
}

fn demo_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if !(Duration::from_secs(10)..=Duration::from_secs(600)).contains(&d) {
        return Err("must be between 10s and 10m".into());
    }
    Ok(d)
}

/// A share between 0 and 1.
fn share(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number"))?;
    if !(0.0..=1.0).contains(&v) {
        return Err("must be between 0 and 1".into());
    }
    Ok(v)
}

/// A period of at least 10 ms and at most a day (a heartbeat of 1 ns floods the target).
fn period_10ms(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    if !(Duration::from_millis(10)..=Duration::from_secs(86_400)).contains(&d) {
        return Err("must be between 10ms and 1 day".into());
    }
    Ok(d)
}

/// A duration that must be greater than zero (a zero period would spin or panic a timer).
fn speed(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !v.is_finite() || !(v == 0.0 || (0.001..=1e6).contains(&v)) {
        return Err("must be 0 (no pacing) or between 0.001 and 1000000".into());
    }
    Ok(v)
}

fn sim_period(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d > Duration::from_secs(86_400) {
        return Err("must be at most 1d".into());
    }
    Ok(d)
}

fn sim_positive_period(s: &str) -> Result<Duration, String> {
    let d = positive_duration(s)?;
    if d > Duration::from_secs(86_400) {
        return Err("must be at most 1d".into());
    }
    Ok(d)
}

fn restart_period(s: &str) -> Result<Duration, String> {
    let d = sim_period(s)?;
    if d < Duration::from_millis(10) {
        return Err("must be at least 10ms".into());
    }
    Ok(d)
}

fn replay_timeout(s: &str) -> Result<Duration, String> {
    let d = positive_duration(s)?;
    if d > cync_mitm::cmd::replay::MAX_TIMEOUT {
        return Err("must be at most 10m".into());
    }
    Ok(d)
}

fn host_port(s: &str) -> Result<String, String> {
    match s.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
            Ok(s.to_owned())
        }
        _ => Err(format!("{s:?} is not host:port (e.g. 127.0.0.1:23779)")),
    }
}

fn positive_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(d)
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum OutFormat {
    Json,
    Table,
}

fn init_logging(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(filter))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal as _;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(io::stderr().is_terminal())
        .with_writer(io::stderr);
    match format {
        LogFormat::Json => b.json().init(),
        LogFormat::Text => b.init(),
    }
}

fn load_config(file: Option<&Path>) -> Result<Config, ExitCode> {
    match file {
        None => Ok(Config::default()),
        Some(f) => Config::load(f).map_err(|e| {
            eprintln!("cync-mitm: invalid configuration: {e}");
            ExitCode::from(EXIT_INVALID_CONFIG)
        }),
    }
}

/// The backend connector of `replay`, checked like `[new_path]`: verified unless told not to.
fn replay_tls(
    np: &cync_mitm::config::NewPathConfig,
) -> Result<Option<cync_mitm::tls::UpstreamConnector>, String> {
    if !np.tls.enabled() {
        return Ok(None);
    }
    if let Some(s) = &np.sni
        && s.parse::<std::net::IpAddr>().is_err()
        && !cync_mitm::config::is_dns_name(s)
    {
        return Err(format!(
            "--sni {s:?} is neither a host name nor an IP address"
        ));
    }
    if let Some(bad) = np
        .pin_sha256
        .iter()
        .find(|p| cync_mitm::config::parse_pin(p).is_none())
    {
        return Err(format!(
            "--pin-sha256 {bad:?} is not a SHA-256 (64 hex digits, colons allowed)"
        ));
    }
    if np.verify && np.ca_file.is_none() && np.pin_sha256.is_empty() {
        return Err(
            "the backend's certificate is verified: give --ca-file or --pin-sha256 (`cync-mitm upstream fingerprint ADDR` prints the pin), --config with a [new_path] that has them, or --insecure"
                .into(),
        );
    }
    cync_mitm::tls::UpstreamConnector::new(&np.client_tls())
        .map(Some)
        .map_err(|e| e.to_string())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cync-mitm: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Cmd::Demo {
            devices,
            duration,
            keep,
            quiet,
            dir,
            stay,
        } => {
            // Quiet: the summary only (the rollback it provokes is logged at error level).
            init_logging(
                LogFormat::Text,
                if quiet {
                    "error,cync_mitm::proxy::slo=off"
                } else {
                    "warn"
                },
            );
            let summary = runtime()?.block_on(cync_mitm::demo::run(cync_mitm::demo::Options {
                devices,
                duration,
                keep,
                quiet,
                dir,
                stay,
            }))?;
            {
                use std::io::Write as _;
                // A closed pipe (`demo | head`) is not an error of the demo.
                let _ = std::io::stdout().lock().write_all(summary.text.as_bytes());
            }
            Ok(if summary.complete {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Run { config } => {
            let cfg = match load_config(config.as_deref()) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            init_logging(cfg.log.format, &cfg.log.filter);
            match runtime()?.block_on(cync_mitm::app::run(cfg, config)) {
                Ok(()) => Ok(ExitCode::SUCCESS),
                Err(cync_mitm::app::AppError::Config(e)) => {
                    eprintln!("cync-mitm: invalid configuration: {e}");
                    Ok(ExitCode::from(EXIT_INVALID_CONFIG))
                }
                Err(e) => Err(e.into()),
            }
        }
        Cmd::Certs {
            cmd: CertsCmd::Init { dir, config, force },
        } => {
            let dir = match (dir, config) {
                (Some(d), _) => d,
                (None, Some(f)) => match load_config(Some(&f)) {
                    Ok(c) => c.tls.cert_dir,
                    Err(code) => return Ok(code),
                },
                (None, None) => PathBuf::from("certs"),
            };
            let p = cync_mitm::tls::init_certs(&dir, force)?;
            println!("CA:          {}", p.ca_cert.display());
            println!(
                "RSA leaf:    {}  (key {})",
                p.rsa_cert.display(),
                p.rsa_key.display()
            );
            println!(
                "ECDSA leaf:  {}  (key {})",
                p.ecdsa_cert.display(),
                p.ecdsa_key.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Config {
            cmd: ConfigCmd::Check { file },
        } => match Config::load(&file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{e}");
                Ok(ExitCode::from(EXIT_INVALID_CONFIG))
            }
        },
        Cmd::Config {
            cmd: ConfigCmd::Show { file },
        } => {
            let mut c = match load_config(file.as_deref()) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            let applied = match c.apply_env(|k| std::env::var(k).ok()) {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("cync-mitm: invalid configuration: {e}");
                    return Ok(ExitCode::from(EXIT_INVALID_CONFIG));
                }
            };
            for a in &applied {
                println!("# from the environment: {a}");
            }
            if !applied.is_empty() {
                println!();
            }
            print!("{}", c.to_toml_annotated());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Decode {
            hex,
            format,
            max_frame,
            with_hex,
        } => {
            let opts = decode::Options {
                format: match format {
                    OutFormat::Json => decode::Format::Json,
                    OutFormat::Table => decode::Format::Table,
                },
                max_frame,
                with_hex,
            };
            let stdin = io::stdin().lock();
            let mut stdout = io::stdout().lock();
            match decode::run(&hex, &opts, stdin, &mut stdout) {
                Ok(()) => Ok(ExitCode::SUCCESS),
                Err(decode::Error::Io(e)) if e.kind() == io::ErrorKind::BrokenPipe => {
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    let _ = stdout.flush();
                    eprintln!("cync-mitm decode: {e}");
                    Ok(ExitCode::from(2))
                }
            }
        }
        Cmd::Capture {
            cmd:
                CaptureCmd::Read {
                    file,
                    format,
                    stream,
                },
        } => {
            let f = match format {
                OutFormat::Json => cync_mitm::cmd::capture::Format::Json,
                OutFormat::Table => cync_mitm::cmd::capture::Format::Table,
            };
            let mut stdout = io::stdout().lock();
            match cync_mitm::cmd::capture::read(&file, f, stream, &mut stdout) {
                Ok(()) => Ok(ExitCode::SUCCESS),
                Err(cync_mitm::cmd::capture::Error::Io(e))
                    if e.kind() == io::ErrorKind::BrokenPipe =>
                {
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("cync-mitm capture read: {e}");
                    Ok(ExitCode::from(2))
                }
            }
        }
        Cmd::Fixtures {
            cmd: FixturesCmd::Extract { file, out, name },
        } => match cync_mitm::cmd::capture::extract(&file, &out, name.as_deref()) {
            Ok((path, n)) => {
                println!("{}: {n} distinct frames", path.display());
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("cync-mitm fixtures extract: {e}");
                Ok(ExitCode::from(2))
            }
        },
        Cmd::Canary {
            cmd: CanaryCmd::Rollback { config },
        } => {
            let cfg = match load_config(Some(&config)) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            match runtime()?.block_on(cync_mitm::cmd::slo::rollback(&cfg)) {
                Ok(msg) => {
                    println!("{msg}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("cync-mitm canary rollback: {e}");
                    Ok(ExitCode::from(2))
                }
            }
        }
        Cmd::Canary {
            cmd: CanaryCmd::ClearOverride { config },
        } => {
            let cfg = match load_config(Some(&config)) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            match runtime()?.block_on(cync_mitm::cmd::slo::clear_override(&cfg)) {
                Ok(msg) => {
                    println!("{msg}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("cync-mitm canary clear-override: {e}");
                    Ok(ExitCode::from(2))
                }
            }
        }
        Cmd::Healthcheck {
            config,
            ready,
            timeout,
        } => {
            let cfg = match load_config(config.as_deref()) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            let Some(addr) = cync_mitm::cmd::slo::admin_addr(&cfg) else {
                eprintln!("cync-mitm healthcheck: the admin server is off (admin.enabled = false)");
                return Ok(ExitCode::from(1));
            };
            let path = if ready { "/readyz" } else { "/healthz" };
            let t = cync_mitm::httpc::Target {
                tls: false,
                host: addr.ip().to_string(),
                port: addr.port(),
                path: path.to_owned(),
            };
            let timeout = timeout.clamp(Duration::from_millis(100), Duration::from_secs(300));
            let answer = runtime()?.block_on(cync_mitm::httpc::request(
                &t,
                hyper::Method::GET,
                &[],
                bytes::Bytes::new(),
                timeout,
            ));
            match answer {
                Ok((status, body)) if status.is_success() => {
                    print!("{}", String::from_utf8_lossy(&body));
                    Ok(ExitCode::SUCCESS)
                }
                Ok((status, body)) => {
                    eprintln!(
                        "cync-mitm healthcheck: http://{addr}{path}: {status}: {}",
                        String::from_utf8_lossy(&body).trim()
                    );
                    Ok(ExitCode::from(1))
                }
                Err(e) => {
                    eprintln!("cync-mitm healthcheck: http://{addr}{path}: {e}");
                    Ok(ExitCode::from(1))
                }
            }
        }
        Cmd::Drain {
            config,
            rate,
            timeout,
            no_wait,
        } => {
            let cfg = match load_config(config.as_deref()) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            let Some(addr) = cync_mitm::cmd::slo::admin_addr(&cfg) else {
                eprintln!("cync-mitm drain: the admin server is off (admin.enabled = false)");
                return Ok(ExitCode::from(2));
            };
            let timeout = timeout.min(Duration::from_secs(86_400));
            match runtime()?.block_on(cync_mitm::cmd::drain::run(addr, rate, timeout, !no_wait)) {
                Ok((true, msg)) => {
                    println!("{msg}");
                    Ok(ExitCode::SUCCESS)
                }
                Ok((false, msg)) => {
                    eprintln!("cync-mitm drain: {msg}");
                    Ok(ExitCode::from(1))
                }
                Err(e) => {
                    eprintln!("cync-mitm drain: {e}");
                    Ok(ExitCode::from(2))
                }
            }
        }
        Cmd::Rollout { cmd } => {
            use cync_mitm::cmd::slo::RolloutAction;
            let (config, action, json) = match cmd {
                RolloutCmd::Status { config, json } => (config, RolloutAction::Status, json),
                RolloutCmd::Pause { config } => (config, RolloutAction::Pause, false),
                RolloutCmd::Resume { config } => (config, RolloutAction::Resume, false),
            };
            let cfg = match load_config(Some(&config)) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            match runtime()?.block_on(cync_mitm::cmd::slo::rollout(&cfg, action)) {
                Ok((v, note)) => {
                    if let Some(n) = note {
                        eprintln!("cync-mitm rollout: note: {n}");
                    }
                    if json {
                        println!("{}", serde_json::to_string_pretty(&v)?);
                    } else {
                        print!("{}", cync_mitm::cmd::slo::render_rollout(&v));
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("cync-mitm rollout: {e}");
                    Ok(ExitCode::from(2))
                }
            }
        }
        Cmd::Slo { cmd: SloCmd::Rules } => {
            print!("{}", cync_mitm::slo::prom::recording_rules());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Slo {
            cmd: SloCmd::Report { config, days },
        } => {
            let cfg = match load_config(Some(&config)) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            let path = &cfg.slo.state_file;
            let state = match cync_mitm::cmd::slo::read_state(path) {
                Ok(Some(s)) => s,
                Ok(None) => {
                    eprintln!(
                        "cync-mitm slo report: {} does not exist (the proxy writes it once a minute with [slo] enabled)",
                        path.display()
                    );
                    return Ok(ExitCode::from(2));
                }
                Err(e) => {
                    eprintln!("cync-mitm slo report: {e}");
                    return Ok(ExitCode::from(2));
                }
            };
            let now = std::time::SystemTime::now();
            let secs = now
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let since = cync_mitm::dailylog::day(now - Duration::from_secs(days * 86_400));
            let dir = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."));
            let rollbacks = cync_mitm::cmd::slo::rollbacks_in(dir, &since);
            print!(
                "{}",
                cync_mitm::cmd::slo::report(&cfg, &state, days, secs, &rollbacks)
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Canary {
            cmd: CanaryCmd::Set { percent, config },
        } => match cync_mitm::cmd::canary::set_percent(&config, percent) {
            Ok(old) => {
                let old = old.map_or_else(|| "unset".to_owned(), |o| o.to_string());
                println!(
                    "{}: routing.canary_percent {old} -> {percent}; a running proxy applies it on its next reload (file watch, SIGHUP or POST /reload)",
                    config.display()
                );
                if let Ok(cfg) = Config::load(&config) {
                    for note in cync_mitm::cmd::canary::moot_notes(&cfg, |k| std::env::var(k).ok())
                    {
                        eprintln!("cync-mitm canary set: note: {note}");
                    }
                    if let Ok(Some(s)) = cync_mitm::cmd::slo::read_state(&cfg.slo.state_file)
                        && let Some(o) = s.control.rollback
                    {
                        eprintln!(
                            "cync-mitm canary set: note: a rollback override is in force ({}: {}); every device stays on the legacy path until `cync-mitm canary clear-override --config {}`",
                            o.by.label(),
                            o.reason,
                            config.display()
                        );
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
            Err(e @ cync_mitm::cmd::canary::Error::Invalid(_)) => {
                eprintln!("cync-mitm canary set: {e}");
                Ok(ExitCode::from(EXIT_INVALID_CONFIG))
            }
            Err(e) => {
                eprintln!("cync-mitm canary set: {e}");
                Ok(ExitCode::from(2))
            }
        },
        Cmd::Upstream {
            cmd:
                UpstreamCmd::Fingerprint {
                    address,
                    sni,
                    timeout,
                    json,
                },
        } => {
            let r = runtime()?.block_on(cync_mitm::cmd::upstream::fingerprint(
                &address,
                sni.as_deref(),
                timeout,
            ));
            match r {
                Ok(report) if json => {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                    Ok(ExitCode::SUCCESS)
                }
                Ok(report) => {
                    print!("{}", cync_mitm::cmd::upstream::render(&report));
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("cync-mitm upstream fingerprint: {e}");
                    Ok(ExitCode::from(2))
                }
            }
        }
        Cmd::Replay {
            captures,
            to,
            config,
            ca_file,
            pin_sha256,
            sni,
            insecure,
            plain,
            speed,
            timeout,
            max_drift,
            concurrency,
            json,
        } => {
            let mut np = match config {
                Some(f) => match load_config(Some(&f)) {
                    Ok(c) => c.new_path,
                    Err(code) => return Ok(code),
                },
                None => cync_mitm::config::NewPathConfig::default(),
            };
            if ca_file.is_some() {
                np.ca_file = ca_file;
            }
            if !pin_sha256.is_empty() {
                np.pin_sha256 = pin_sha256;
            }
            if sni.is_some() {
                np.sni = sni;
            }
            if insecure {
                np.verify = false;
            }
            if plain {
                np.tls = cync_mitm::config::NewPathTls::Plain;
            }
            let tls = match replay_tls(&np) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("cync-mitm replay: {e}");
                    return Ok(ExitCode::from(2));
                }
            };
            let opts = cync_mitm::cmd::replay::Options {
                captures,
                to,
                tls,
                speed,
                timeout,
                max_drift,
                concurrency: usize::from(concurrency),
            };
            match runtime()?.block_on(cync_mitm::cmd::replay::run(&opts)) {
                Ok(r) => {
                    if json {
                        println!("{}", serde_json::to_string_pretty(&r)?);
                    } else {
                        print!("{}", cync_mitm::cmd::replay::render(&r));
                    }
                    Ok(if r.ok {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    })
                }
                Err(e) => {
                    eprintln!("cync-mitm replay: {e}");
                    Ok(ExitCode::from(2))
                }
            }
        }
        Cmd::Sim { cmd } => {
            init_logging(LogFormat::Text, "info");
            runtime()?.block_on(sim(cmd))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Asks the proxy's `/routing` which path each device is on (a failure is reported, not
/// fatal: the paths stay as they were).
async fn learn_paths(fleet: &cync_mitm::sim::devices::Fleet, admin: &str) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(admin).await?;
        s.write_all(format!("GET /routing HTTP/1.0\r\nHost: {admin}\r\n\r\n").as_bytes())
            .await?;
        let mut body = Vec::new();
        s.take(64 << 20).read_to_end(&mut body).await?;
        Ok::<_, std::io::Error>(body)
    };
    let body = match tokio::time::timeout(Duration::from_secs(5), fetch).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => return eprintln!("sim devices: {admin}/routing: {e}"),
        Err(_) => return eprintln!("sim devices: {admin}/routing: no answer within 5 s"),
    };
    let json = body
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .and_then(|i| serde_json::from_slice::<serde_json::Value>(&body[i + 4..]).ok());
    let Some(v) = json else {
        if body.starts_with(b"HTTP/1.1 403") || body.starts_with(b"HTTP/1.0 403") {
            return eprintln!(
                "sim devices: {admin}/routing refused the request: name the admin server by its IP address, or add the name to the proxy's admin.allowed_hosts"
            );
        }
        return eprintln!("sim devices: {admin}/routing did not answer JSON");
    };
    let paths: Vec<(cync_mitm::codec::DeviceId, String)> = v["devices"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|d| {
                    let id = u32::from_str_radix(d["device_id"].as_str()?, 16).ok()?;
                    Some((
                        cync_mitm::codec::DeviceId(id),
                        d["path"].as_str()?.to_owned(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    fleet.set_paths(paths.iter().map(|(d, p)| (*d, p.as_str())));
}

async fn sim(cmd: SimCmd) -> anyhow::Result<()> {
    use cync_mitm::sim::cloud::{CloudSim, CloudSimConfig, ServerTls};
    use cync_mitm::sim::devices::{ClientTls, Fleet, FleetConfig};
    use cync_mitm::tls::{ClientProfile, DeviceAcceptor, LegacyClient, ModernServer};
    match cmd {
        SimCmd::Cloud {
            listen,
            tls,
            cert_dir,
            command_interval,
            report_every,
            duplicate_commands,
            repeat_after_ack,
            restart_every,
            drop_answers,
            drop_answers_after,
            answer_delay,
            drift,
            stop_reading_after,
        } => {
            let (certs, _) = cync_mitm::tls::ensure_certs(&cert_dir)?;
            let server_tls = match tls {
                SimServerTls::Legacy => ServerTls::Legacy(DeviceAcceptor::new(
                    &cync_mitm::config::TlsConfig::default(),
                    &certs,
                )?),
                SimServerTls::Modern => ServerTls::Modern(ModernServer::new(&certs)?),
                SimServerTls::Plain => ServerTls::Plain,
            };
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            eprintln!("sim cloud listening on {}", listener.local_addr()?);
            let sim = CloudSim::new(
                CloudSimConfig {
                    command_interval,
                    duplicate_commands,
                    repeat_after_ack,
                    restart_every,
                    drop_answers,
                    drop_answers_after: drop_answers_after
                        .map(|d| d.min(Duration::from_secs(366 * 86_400))),
                    answer_delay: answer_delay.min(Duration::from_secs(60)),
                    drift,
                    stop_reading_after,
                    ..CloudSimConfig::default()
                },
                server_tls,
            );
            let s2 = sim.clone();
            tokio::spawn(async move { s2.run(listener).await });
            let mut every = tokio::time::interval(report_every);
            every.tick().await;
            loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => break,
                    _ = every.tick() => println!("{}", serde_json::to_string(&sim.stats().report())?),
                }
            }
            sim.stop().await;
            println!("{}", serde_json::to_string(&sim.stats().report())?);
        }
        SimCmd::Devices {
            target,
            count,
            seed,
            heartbeat,
            tls,
            duration,
            ramp,
            report_every,
            ignore_commands,
            admin,
        } => {
            let client = match tls {
                SimClientTls::Fp2 => ClientTls::Tls(LegacyClient::new(ClientProfile::DeviceFp2)?),
                SimClientTls::Modern => ClientTls::Tls(LegacyClient::new(ClientProfile::Modern)?),
                SimClientTls::Plain => ClientTls::Plain,
            };
            let fleet = Fleet::start(
                FleetConfig {
                    count,
                    target,
                    seed,
                    heartbeat,
                    ramp,
                    ignore_commands,
                    ..FleetConfig::default()
                },
                client,
            );
            let until = async {
                match duration {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(until);
            let mut every = tokio::time::interval(report_every);
            every.tick().await;
            loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => break,
                    _ = &mut until => break,
                    _ = every.tick() => {
                        if let Some(a) = &admin {
                            learn_paths(&fleet, a).await;
                        }
                        println!("{}", serde_json::to_string(&fleet.report())?)
                    }
                }
            }
            if let Some(a) = &admin {
                learn_paths(&fleet, a).await;
            }
            let fleet: Arc<Fleet> = fleet;
            fleet.stop().await;
            println!("{}", serde_json::to_string(&fleet.report())?);
        }
    }
    Ok(())
}
