//! `cync-mitm demo`: the whole product on one machine with no devices and no internet. In one
//! process: a simulated cloud (legacy), a simulated new backend with a little chaos (answer
//! latency, repeated commands), the proxy (capture on, parity on, its admin server on
//! loopback) and a simulated fleet that ignores a share of its commands. It walks the rollout plan: dark launch with parity →
//! canary 10 → 25 → 50 %, each step gated by the SLO engine → a fault injected into the new
//! backend (half its answers left unsent) → the automatic rollback to 0 %. A panel redrawn
//! every second shows it (plain lines when stdout is not a terminal), and a summary names the
//! captures, the drift log and the decision log.

use crate::config::{Config, StepConfig};
use crate::route::{Mode, Path};
use crate::sim::cloud::{CloudSim, CloudSimConfig, ServerTls};
use crate::sim::devices::{ClientTls, Fleet, FleetConfig};
use crate::slo::Counts;
use crate::slo::sli::{Block, Blocks, Sli, Thresholds};
use crate::tls::{ClientProfile, DeviceAcceptor, LegacyClient};
use std::io::{IsTerminal as _, Write as _};
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the demo is asked to do.
#[derive(Clone, Debug)]
pub struct Options {
    /// Simulated devices.
    pub devices: u32,
    /// About how long the rollout takes before the fault.
    pub duration: Duration,
    /// Keep the files (else a temporary folder, deleted at the end).
    pub keep: bool,
    /// Only the summary.
    pub quiet: bool,
    /// Where the files go (kept); default a temporary folder.
    pub dir: Option<PathBuf>,
    /// After the rollback, keep everything running (the console stays up) until a signal.
    pub stay: bool,
}

/// How the demo ended.
#[derive(Debug)]
pub struct Summary {
    /// The text printed at the end.
    pub text: String,
    /// Whether it walked the whole plan (rollout to 50 %, fault, rollback).
    pub complete: bool,
}

fn sim_tls(certs: &crate::tls::CertPaths) -> anyhow::Result<ServerTls> {
    Ok(ServerTls::Legacy(DeviceAcceptor::new(
        &Default::default(),
        certs,
    )?))
}

async fn start_sim(
    cfg: CloudSimConfig,
    certs: &crate::tls::CertPaths,
) -> anyhow::Result<(Arc<CloudSim>, std::net::SocketAddr)> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let sim = CloudSim::new(cfg, sim_tls(certs)?);
    let s = sim.clone();
    tokio::spawn(async move { s.run(l).await });
    Ok((sim, addr))
}

/// The fleet's seed (its device ids).
const FLEET_SEED: u64 = 7;

/// A routing seed under which the first canary step (10 %) moves at least one of the fleet's
/// `devices` (else a small fleet holds there for want of events, and the demo never ends)
/// and, with two or more, 50 % leaves at least one on the cloud.
fn routing_seed(devices: u32) -> String {
    let ids: Vec<crate::codec::DeviceId> = (0..devices)
        .map(|i| crate::sim::device_identity(FLEET_SEED, i).0)
        .collect();
    let below = |p: &crate::route::Policy, percent: f64| {
        ids.iter()
            .filter(|id| p.bucket(**id) < crate::route::threshold(percent))
            .count()
    };
    for n in 0..100_000u32 {
        let seed = format!("demo-{n}");
        let p = crate::route::Policy::new(Mode::NewPrimary, 10.0, &seed, Vec::new(), Vec::new());
        if below(&p, 10.0) >= 1 && (devices < 2 || below(&p, 50.0) < ids.len()) {
            return seed;
        }
    }
    "demo".into()
}

/// The demo's configuration: everything on loopback, in `dir`.
fn config(
    devices: u32,
    dir: &FsPath,
    legacy: std::net::SocketAddr,
    backend: std::net::SocketAddr,
    ca: &FsPath,
    bake: Duration,
    quiet: bool,
) -> Config {
    let mut c = Config::default();
    c.listen.tls = "127.0.0.1:0".parse().unwrap_or(c.listen.tls);
    c.admin.listen = "127.0.0.1:0".parse().unwrap_or(c.admin.listen);
    c.upstream.addresses = vec![legacy.to_string()];
    // The simulated cloud's certificate is the demo's own CA's: verified, like the new path.
    c.upstream.verify = true;
    c.upstream.ca_file = Some(ca.to_owned());
    c.upstream.sni = Some("cm.gelighting.com".into());
    c.tls.cert_dir = dir.join("certs");
    c.new_path.addresses = vec![backend.to_string()];
    c.new_path.ca_file = Some(ca.to_owned());
    c.new_path.sni = Some("cm.gelighting.com".into());
    c.new_path.answer_timeout = Duration::from_secs(1);
    c.routing.mode = Mode::LegacyOnly;
    c.routing.seed = routing_seed(devices);
    c.capture.enabled = true;
    c.capture.dir = dir.join("captures");
    c.capture.max_files = c.capture.max_files.max(devices as usize * 2);
    c.parity.dir = dir.join("parity");
    c.drain.batch = 50;
    c.drain.interval = Duration::from_millis(200);
    c.slo.eval_interval = Duration::from_secs(1);
    c.slo.min_events = 10;
    c.slo.decision_log_heartbeat = Duration::from_secs(5);
    c.slo.state_file = dir.join("slo/state.json");
    c.rollout.enabled = true;
    c.rollout.steps = ["shadow", "10", "25", "50"]
        .iter()
        .map(|s| StepConfig::Name((*s).to_owned()))
        .collect();
    c.rollout.bake_time = bake;
    c.rollout.min_budget = 0.0;
    c.log.filter = if quiet { "error" } else { "warn" }.into();
    c
}

/// p99 of the command latency on `path` from the histogram's buckets (the bucket bound).
fn p99(m: &crate::metrics::Metrics, path: Path) -> Option<f64> {
    use prometheus::core::Collector as _;
    let h = m
        .transport
        .latency
        .with_label_values(&[path.label(), "command"]);
    let mf = h.collect();
    let metric = mf.first()?.get_metric().first()?.clone();
    let hist = metric.get_histogram();
    let total = hist.get_sample_count();
    if total == 0 {
        return None;
    }
    let want = (total as f64 * 0.99).ceil() as u64;
    hist.get_bucket()
        .iter()
        .find(|b| b.cumulative_count() >= want)
        .map(|b| b.upper_bound())
        .or(Some(f64::INFINITY))
}

/// One look at the running demo.
struct View {
    on_legacy: usize,
    on_new: usize,
    frames: u64,
    /// Command and request outcomes per path since the start (legacy, new).
    commands: [Counts; 2],
    requests: [Counts; 2],
    p99: [Option<f64>; 2],
    parity: (u64, u64),
    drops: u64,
    canary: f64,
    generation: u64,
    mode: String,
    step: String,
    state: String,
    verdicts: Vec<(String, f64)>,
    rollback: bool,
}

fn look(run: &crate::app::Running) -> View {
    let m = &run.metrics;
    let snap = run.proxy.registry().snapshot();
    let on_new = snap.iter().filter(|(_, s)| s.path == Path::New).count();
    let th = Thresholds::default();
    let paths = [Path::Legacy, Path::New];
    let blocks = paths.map(|p| Blocks::read(m, p, th));
    let counts = |sli: Sli| [0, 1].map(|i| blocks[i].counts(paths[i], sli));
    let (commands, requests) = (counts(Sli::CommandSuccess), counts(Sli::RequestSuccess));
    let nb = blocks[1];
    let frames = [Path::Legacy, Path::New]
        .iter()
        .map(|p| m.frames_and_decode_errors(*p).0)
        .sum();
    let r = run.proxy.rollout_report();
    let l = run.live.current();
    View {
        on_legacy: snap.len() - on_new,
        on_new,
        frames,
        commands,
        requests,
        p99: [p99(m, Path::Legacy), p99(m, Path::New)],
        parity: (nb.get(Block::ParityMatches), nb.get(Block::ParityDrifts)),
        drops: m.transport.mirror_dropped.get() + m.capture_dropped.get(),
        canary: l.config.routing.canary_percent,
        generation: l.generation,
        mode: l.config.routing.mode.label().to_owned(),
        step: r["steps"][r["step"].as_u64().unwrap_or(0) as usize]["at"]
            .as_str()
            .unwrap_or("?")
            .to_owned(),
        state: r["status"]["state"]
            .as_str()
            .unwrap_or("starting")
            .to_owned(),
        verdicts: Sli::ALL
            .iter()
            .map(|s| {
                (
                    s.name().to_owned(),
                    m.slo.verdict.with_label_values(&["new", s.name()]).get(),
                )
            })
            .collect(),
        rollback: m.slo.rollback_active.get() == 1,
    }
}

/// good ÷ total, `None` without events.
fn share(c: Counts) -> Option<f64> {
    c.error_ratio().map(|e| 1.0 - e)
}

/// What happened between `old` and `new` (counters only grow).
fn since(new: Counts, old: Counts) -> Counts {
    Counts {
        good: new.good.saturating_sub(old.good),
        bad: new.bad.saturating_sub(old.bad),
    }
}

/// Seconds the panel's success figures cover.
const PANEL_WINDOW: Duration = Duration::from_secs(10);

/// The success shares of the last [`PANEL_WINDOW`]: `now` against the oldest look kept.
fn windowed(now: &View, old: &View) -> ([Option<f64>; 2], [Option<f64>; 2]) {
    (
        [0, 1].map(|i| share(since(now.commands[i], old.commands[i]))),
        [0, 1].map(|i| share(since(now.requests[i], old.requests[i]))),
    )
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "–".to_owned(), |v| format!("{:.2} %", v * 100.0))
}

fn secs(v: Option<f64>) -> String {
    match v {
        None => "–".to_owned(),
        Some(v) if v.is_infinite() => "> 10 s".to_owned(),
        Some(v) => format!("≤ {} ms", (v * 1000.0).round()),
    }
}

fn verdict(v: f64) -> &'static str {
    if v > 0.5 {
        "met"
    } else if v < -0.5 {
        "VIOLATED"
    } else {
        "…"
    }
}

fn panel(v: &View, old: &View, fps: f64, elapsed: Duration, phase: &str, url: &str) -> String {
    let (success, requests) = windowed(v, old);
    let verdicts: Vec<String> = v
        .verdicts
        .iter()
        .map(|(n, x)| format!("{n} {}", verdict(*x)))
        .collect();
    format!(
        "cync-mitm demo  {:>5.1} s   {phase}\n\
         console        {url}\n\
         rollout        step {} ({}), mode {}, canary {} %, generation {}{}\n\
         devices        legacy {:>4}   new {:>4}\n\
         frames/s       {fps:>8.0}\n\
         command ok     legacy {:>9}   new {:>9}   (last 10 s)\n\
         request ok     legacy {:>9}   new {:>9}   (last 10 s)\n\
         command p99    legacy {:>9}   new {:>9}\n\
         parity         {} alike, {} drifted\n\
         drops          {}\n\
         new-path SLOs  {}\n",
        elapsed.as_secs_f64(),
        v.step,
        v.state,
        v.mode,
        v.canary,
        v.generation,
        if v.rollback { "   ROLLED BACK" } else { "" },
        v.on_legacy,
        v.on_new,
        pct(success[0]),
        pct(success[1]),
        pct(requests[0]),
        pct(requests[1]),
        secs(v.p99[0]),
        secs(v.p99[1]),
        v.parity.0,
        v.parity.1,
        v.drops,
        verdicts.join(", "),
    )
}

fn files_under(dir: &FsPath, ext: &str, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            files_under(&p, ext, out);
        } else if p.to_string_lossy().ends_with(ext) {
            out.push(p);
        }
    }
    out.sort();
}

/// Marks a folder as the demo's (so `--dir` never takes over a folder of other files).
const MARKER: &str = ".cync-mitm-demo";

/// `--dir`: an empty or missing folder, or one an earlier demo made; anything else is refused
/// (the demo writes `cync-mitm.toml`, captures with retention and an SLO state there).
fn prepare_dir(d: &FsPath) -> anyhow::Result<()> {
    use anyhow::Context as _;
    if d.as_os_str().is_empty() {
        anyhow::bail!("--dir needs a folder");
    }
    if d.exists() && !d.is_dir() {
        anyhow::bail!("{} is not a folder", d.display());
    }
    std::fs::create_dir_all(d).with_context(|| format!("cannot make {}", d.display()))?;
    let empty = std::fs::read_dir(d)
        .with_context(|| format!("cannot read {}", d.display()))?
        .next()
        .is_none();
    if !empty && !d.join(MARKER).exists() {
        anyhow::bail!(
            "{} holds files the demo did not make; give it an empty or new folder",
            d.display()
        );
    }
    std::fs::write(d.join(MARKER), "a cync-mitm demo's files\n")
        .with_context(|| format!("cannot write in {}", d.display()))?;
    Ok(())
}

/// Prints, and says whether stdout still takes it (a closed pipe ends the printing, not the
/// demo).
fn out(text: &str) -> bool {
    let mut o = std::io::stdout().lock();
    o.write_all(text.as_bytes())
        .and_then(|()| o.flush())
        .is_ok()
}

/// Runs the demo; the summary says whether the whole plan was walked.
pub async fn run(opts: Options) -> anyhow::Result<Summary> {
    use anyhow::Context as _;
    use tokio::signal::unix::{SignalKind, signal};
    // Signals first: one during the start must still end the demo cleanly (files deleted).
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let tmp = match &opts.dir {
        Some(d) => {
            prepare_dir(d)?;
            None
        }
        None => Some(
            tempfile::Builder::new()
                .prefix("cync-mitm-demo-")
                .tempdir()
                .context("cannot make a temporary folder")?,
        ),
    };
    let dir = match (&opts.dir, &tmp) {
        (Some(d), _) => d.clone(),
        (None, Some(t)) => t.path().to_owned(),
        (None, None) => anyhow::bail!("no folder for the demo's files"),
    };
    // A folder of an earlier demo: its SLO state (rolled back, at the last step) would keep
    // this one from walking the plan. Its captures and logs stay; this run adds to them.
    let old_state = dir.join("slo/state.json");
    if old_state.exists() {
        let Some(_lock) = crate::proxy::try_lock_slo_state(&old_state) else {
            anyhow::bail!("{} is in use by a running demo or proxy", dir.display());
        };
        std::fs::remove_file(&old_state)
            .with_context(|| format!("cannot remove {}", old_state.display()))?;
    }
    let (certs, _) = crate::tls::ensure_certs(&dir.join("certs"))?;
    let commands = Some(Duration::from_secs(1));
    let (_legacy, legacy_addr) = start_sim(
        CloudSimConfig {
            command_interval: commands,
            ..CloudSimConfig::default()
        },
        &certs,
    )
    .await?;
    // A little chaos on the new backend: slower answers, a share of commands sent twice
    // (the transport's dedup keeps them from the devices).
    let (backend, backend_addr) = start_sim(
        CloudSimConfig {
            command_interval: commands,
            answer_delay: Duration::from_millis(40),
            duplicate_commands: 0.05,
            ..CloudSimConfig::default()
        },
        &certs,
    )
    .await?;
    let bake = (opts.duration / 6).max(Duration::from_secs(2));
    let cfg = config(
        opts.devices,
        &dir,
        legacy_addr,
        backend_addr,
        &certs.ca_cert,
        bake,
        opts.quiet,
    );
    let file = dir.join("cync-mitm.toml");
    std::fs::write(
        &file,
        format!(
            "# Written by `cync-mitm demo`: everything on loopback.\n{}",
            cfg.to_toml()
        ),
    )?;
    let running = crate::app::start_with_env(cfg, Some(file.clone()), |_| None).await?;
    let url = running.admin_addr.map_or_else(
        || "(admin off)".to_owned(),
        |a| format!("http://{a}/  (JSON: /api/devices, /api/rollout, /metrics)"),
    );
    let tty = std::io::stdout().is_terminal();
    let mut printing = !opts.quiet;
    if printing {
        printing = out(&format!(
            "cync-mitm demo: {} simulated devices, files in {}\nconsole: {url}\n\n",
            opts.devices,
            dir.display()
        ));
    }
    let fleet = Fleet::start(
        FleetConfig {
            count: opts.devices,
            target: running.tls_addr,
            seed: FLEET_SEED,
            heartbeat: Duration::from_secs(1),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_millis(500),
            ramp: Duration::from_secs(2),
            // A share of commands the devices ignore: legacy loses them, the new path's
            // retries recover them.
            ignore_commands: 0.01,
            ..FleetConfig::default()
        },
        ClientTls::Tls(LegacyClient::new(ClientProfile::DeviceFp2)?),
    );
    let start = Instant::now();
    // The rollout, then the fault, then the rollback; a deadline in case it stalls.
    let deadline = start + opts.duration * 3 + Duration::from_secs(30);
    let mut last = look(&running);
    // The looks of the last PANEL_WINDOW, for the panel's windowed figures.
    let mut history: std::collections::VecDeque<(Instant, View)> = Default::default();
    let mut timeline: Vec<String> = vec![format!(
        "  0.0 s  rollout at {} (dark launch: every device mirrored to the new backend, parity on)",
        last.step
    )];
    let mut last_frames = (start, last.frames);
    let mut fault_at: Option<Instant> = None;
    let mut rolled_at: Option<Instant> = None;
    let mut seen = (last.step.clone(), last.rollback);
    // Ctrl-C ends the demo cleanly: devices and proxy stopped, the summary, the files deleted
    // (unless kept).
    let mut interrupted = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = term.recv() => { interrupted = true; break; }
            _ = int.recv() => { interrupted = true; break; }
            _ = hup.recv() => { interrupted = true; break; }
        }
        let v = look(&running);
        let now = Instant::now();
        let fps = (v.frames.saturating_sub(last_frames.1)) as f64
            / now.duration_since(last_frames.0).as_secs_f64().max(0.001);
        last_frames = (now, v.frames);
        if (v.step.clone(), v.rollback) != seen {
            let what = if v.rollback && !seen.1 {
                format!("rolled back: canary {} %", v.canary)
            } else {
                format!("rollout at {}", v.step)
            };
            timeline.push(format!("{:>5.1} s  {what}", start.elapsed().as_secs_f64()));
            seen = (v.step.clone(), v.rollback);
        }
        // At the last step (done), the fault.
        if fault_at.is_none() && v.state == "done" {
            backend.set_drop_answers(0.5);
            fault_at = Some(now);
            timeline.push(format!(
                "{:>5.1} s  fault: the new backend leaves half its answers unsent",
                start.elapsed().as_secs_f64()
            ));
        }
        if fault_at.is_some() && v.rollback && rolled_at.is_none() {
            rolled_at = Some(now);
        }
        let phase = match (fault_at, rolled_at) {
            (None, _) => "rolling out",
            (Some(_), None) => "fault injected, watching the SLOs",
            (Some(_), Some(_)) if opts.stay => "rolled back; staying up (Ctrl-C ends)",
            (Some(_), Some(_)) => "rolled back",
        };
        while history
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > PANEL_WINDOW)
        {
            history.pop_front();
        }
        let (success, requests) = windowed(&v, history.front().map_or(&last, |(_, o)| o));
        if printing && tty {
            printing = out(&format!(
                "\x1b[H\x1b[2J{}",
                panel(
                    &v,
                    history.front().map_or(&last, |(_, o)| o),
                    fps,
                    start.elapsed(),
                    phase,
                    &url
                )
            ));
        } else if printing {
            printing = out(&format!(
                "{:>5.1}s {phase}: step {} ({}) canary {}% legacy {} new {} frames/s {fps:.0} new command ok {} request ok {} parity {}/{}\n",
                start.elapsed().as_secs_f64(),
                v.step,
                v.state,
                v.canary,
                v.on_legacy,
                v.on_new,
                pct(success[1]),
                pct(requests[1]),
                v.parity.0,
                v.parity.1
            ));
        }
        history.push_back((now, std::mem::replace(&mut last, v)));
        // Rolled back and drained back to the cloud, or out of time (unless staying up).
        let done = rolled_at.is_some_and(|t| now.duration_since(t) >= Duration::from_secs(2))
            && last.on_new == 0;
        if done && !opts.stay {
            break;
        }
        if now >= deadline && !(opts.stay && rolled_at.is_some()) {
            break;
        }
    }
    let running_reason = running.proxy.slo_report()["control"]["override"]["reason"]
        .as_str()
        .map(str::to_owned);
    fleet.stop().await;
    running.stop("demo finished").await;
    let complete = rolled_at.is_some();
    let mut captures = Vec::new();
    files_under(&dir.join("captures"), ".pcapng", &mut captures);
    let mut drift = Vec::new();
    files_under(&dir.join("parity"), ".jsonl", &mut drift);
    let mut decisions = Vec::new();
    files_under(&dir.join("slo"), ".jsonl", &mut decisions);
    let mut text = String::new();
    text.push_str(&format!(
        "\ncync-mitm demo {} in {:.0} s\n",
        if complete {
            "complete"
        } else if interrupted {
            "INTERRUPTED"
        } else {
            "INCOMPLETE (the rollback did not happen in time)"
        },
        start.elapsed().as_secs_f64()
    ));
    for t in &timeline {
        text.push_str(&format!("  {t}\n"));
    }
    if let (Some(f), Some(r)) = (fault_at, rolled_at) {
        text.push_str(&format!(
            "  rollback {:.1} s after the fault\n",
            r.duration_since(f).as_secs_f64()
        ));
    }
    if let Some(reason) = running_reason.as_deref() {
        text.push_str(&format!("  why: {reason}\n"));
    }
    text.push_str(&format!(
        "  whole run: command success legacy {} / new {}, request success legacy {} / new {}, parity {} alike / {} drifted\n",
        pct(share(last.commands[0])),
        pct(share(last.commands[1])),
        pct(share(last.requests[0])),
        pct(share(last.requests[1])),
        last.parity.0,
        last.parity.1
    ));
    let kept = opts.keep || opts.dir.is_some();
    text.push_str(&format!(
        "files ({}):\n  config        {}\n  captures      {} pcapng files in {}{}\n  drift log     {}\n  decision log  {}\n",
        if kept {
            "kept"
        } else {
            "deleted now; --keep keeps them"
        },
        file.display(),
        captures.len(),
        dir.join("captures").display(),
        captures
            .first()
            .map(|c| format!(" (e.g. {})", c.display()))
            .unwrap_or_default(),
        drift
            .last()
            .map_or_else(|| "none (no drift)".to_owned(), |d| d.display().to_string()),
        decisions
            .last()
            .map_or_else(|| "none".to_owned(), |d| d.display().to_string()),
    ));
    if let Some(t) = tmp.filter(|_| opts.keep) {
        // Leave the temporary folder in place.
        let _ = t.keep();
    }
    Ok(Summary { text, complete })
}
