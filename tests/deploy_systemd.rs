//! `deploy/systemd/cync-mitm.service`: `systemd-analyze verify` is clean, the offline security
//! review scores an exposure of 2.0 or less, and the unit keeps the promises deploy/README.md
//! makes (no capability, writes only to its state directory, SIGHUP reloads, the start command
//! accepts the shipped config).

mod common;

use common::tshark::have_tool;
use std::path::{Path, PathBuf};
use std::process::Command;

const INSTALLED: &str = "/usr/local/bin/cync-mitm";

fn unit_text() -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd/cync-mitm.service"),
    )
    .unwrap()
}

/// The unit with the binary's installed path pointing at the one cargo built (verify checks
/// that every command exists).
fn unit_here(dir: &Path) -> PathBuf {
    let text = unit_text().replace(INSTALLED, env!("CARGO_BIN_EXE_cync-mitm"));
    let p = dir.join("cync-mitm.service");
    std::fs::write(&p, text).unwrap();
    p
}

/// Values of `key=` lines in `[Service]` (comments skipped).
fn values(key: &str) -> Vec<String> {
    unit_text()
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(|v| v.trim().to_owned())
        .collect()
}

#[test]
fn systemd_analyze_verify_is_clean_and_the_exposure_is_at_most_2() {
    if !have_tool("systemd-analyze", "--version") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_here(dir.path());
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "verify: {said}");
    assert!(said.trim().is_empty(), "verify warned: {said}");

    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&unit)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let level: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for cync-mitm.service: ")
                .nth(1)
        })
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {text}"));
    eprintln!("systemd-analyze security: exposure {level}");
    assert!(level <= 2.0, "exposure {level}:\n{text}");
}

#[test]
fn the_unit_grants_no_capability_writes_only_its_state_and_reloads_on_sighup() {
    assert_eq!(values("CapabilityBoundingSet"), vec![""]);
    assert_eq!(values("AmbientCapabilities"), vec![""]);
    assert_eq!(values("ProtectSystem"), vec!["strict"]);
    assert_eq!(values("DynamicUser"), vec!["yes"]);
    assert!(
        values("ReadWritePaths").is_empty(),
        "writes go to StateDirectory only"
    );
    let state = values("StateDirectory").join(" ");
    assert!(
        state.split_whitespace().all(|d| d.starts_with("cync-mitm")),
        "{state}"
    );
    for sub in ["cync-mitm/certs", "cync-mitm/captures"] {
        assert!(state.split_whitespace().any(|d| d == sub), "{state}");
    }
    // The config's relative paths (certs, captures) land in the state directory.
    assert_eq!(values("WorkingDirectory"), vec!["%S/cync-mitm"]);
    assert_eq!(values("ExecReload"), vec!["/bin/kill -HUP $MAINPID"]);
    assert_eq!(values("RestartPreventExitStatus"), vec!["64"]);
    // Port 23779 needs no privilege: the shipped config listens above 1024.
    let cfg = cync_mitm::config::Config::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("config/cync-mitm.toml"),
    )
    .unwrap();
    assert!(cfg.listen.tls.port() > 1024);
    assert_eq!(cfg.tls.cert_dir, Path::new("certs"));
    assert!(cfg.capture.dir.is_relative());
    assert!(cfg.slo.state_file.starts_with("captures"));
}

#[test]
fn the_start_commands_accept_the_shipped_config() {
    // ExecStartPre and ExecStart, as the unit runs them, with the file installed where it says.
    let start = values("ExecStart");
    assert_eq!(
        start,
        vec![format!(
            "{INSTALLED} run --config /etc/cync-mitm/cync-mitm.toml"
        )]
    );
    let pre = values("ExecStartPre");
    assert_eq!(
        pre,
        vec![format!(
            "{INSTALLED} config check /etc/cync-mitm/cync-mitm.toml"
        )]
    );
    let out = Command::new(env!("CARGO_BIN_EXE_cync-mitm"))
        .args(["config", "check"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/cync-mitm.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
