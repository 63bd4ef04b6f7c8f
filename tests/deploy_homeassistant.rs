//! `deploy/homeassistant/`: the add-on's manifest declares every option with a schema and its
//! run script maps each one onto the TOML; the run script, run as the Supervisor runs it (the
//! manifest's default options written to options.json, as root when the test is), writes a
//! valid configuration, keeps hostile option strings as strings, drops to uid 10001, serves
//! devices from /data, and exits 0 on SIGTERM; invalid options stop it with exit 64; a user's
//! own cync-mitm.toml wins; package.sh makes a folder with the source the image compiles.
//! (hadolint passes its Dockerfile and shellcheck its scripts: tests/deploy_container.rs,
//! tests/deploy_compose.rs.)

mod common;

use common::harness::*;
use common::tshark::have_tool;
use cync_mitm::sim::cloud::CloudSimConfig;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;

fn addon_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/homeassistant")
}

/// config.yaml as JSON (PyYAML, which yamllint brings).
fn manifest() -> Option<Value> {
    if !have_tool("yamllint", "--version") || !have_tool("jq", "--version") {
        return None;
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
        ])
        .arg(addon_dir().join("config.yaml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

#[test]
fn the_manifest_declares_every_option_and_run_sh_maps_each() {
    let Some(m) = manifest() else { return };
    for k in ["name", "version", "slug", "description", "arch", "startup"] {
        assert!(m.get(k).is_some(), "config.yaml lacks {k}");
    }
    let cargo =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")).unwrap();
    assert!(
        cargo.contains(&format!("version = \"{}\"", m["version"].as_str().unwrap())),
        "the add-on's version is the crate's"
    );
    assert_eq!(m["ports"]["23779/tcp"], 23779);
    assert_eq!(m["init"], false);
    let options = m["options"].as_object().unwrap();
    let schema = m["schema"].as_object().unwrap();
    let mut a: Vec<_> = options.keys().collect();
    let mut b: Vec<_> = schema.keys().collect();
    a.sort();
    b.sort();
    assert_eq!(a, b, "options and schema name the same keys");
    let run = std::fs::read_to_string(addon_dir().join("run.sh")).unwrap();
    let docs = std::fs::read_to_string(addon_dir().join("DOCS.md")).unwrap();
    for k in options.keys() {
        assert!(
            run.contains(&format!("(\"{k}\")")),
            "run.sh does not map {k}"
        );
        assert!(
            docs.contains(&format!("`{k}`")),
            "DOCS.md does not describe {k}"
        );
    }
    let build = std::fs::read_to_string(addon_dir().join("build.yaml")).unwrap();
    for arch in m["arch"].as_array().unwrap() {
        assert!(
            build.contains(&format!("{}:", arch.as_str().unwrap())),
            "build.yaml has no base for {arch}"
        );
    }
}

struct Addon {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Drop for Addon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs run.sh with `options` in `dir` (data in `dir/data`, the user's config at
/// `dir/config/cync-mitm.toml`), loopback addresses, dropping to 10001 when root.
fn run_addon(dir: &Path, options: &Value) -> Addon {
    run_addon_as(
        dir,
        options,
        Some(if nix_is_root() { "10001:10001" } else { "" }),
    )
}

/// As [`run_addon`]; `run_as: None` leaves `CYNC_MITM_RUN_AS` unset (the script's default).
fn run_addon_as(dir: &Path, options: &Value, run_as: Option<&str>) -> Addon {
    std::fs::write(dir.join("options.json"), options.to_string()).unwrap();
    let mut cmd = Command::new("bash");
    match run_as {
        Some(r) => cmd.env("CYNC_MITM_RUN_AS", r),
        None => cmd.env_remove("CYNC_MITM_RUN_AS"),
    };
    let mut child = cmd
        .arg(addon_dir().join("run.sh"))
        .env("CYNC_MITM_OPTIONS", dir.join("options.json"))
        .env("CYNC_MITM_DATA", dir.join("data"))
        .env("CYNC_MITM_USER_CONFIG", dir.join("config/cync-mitm.toml"))
        .env("CYNC_MITM_BIN", env!("CARGO_BIN_EXE_cync-mitm"))
        .env("CYNC_MITM_LISTEN", "127.0.0.1:0")
        .env("CYNC_MITM_ADMIN", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, lines) = mpsc::channel();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    Addon { child, lines }
}

/// Waits up to 30 s for `child` to exit (then fails, killing it).
fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    for _ in 0..600 {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    panic!("the add-on did not exit");
}

fn nix_is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// Lines until one containing `what` (which it returns), or panics with what came.
fn wait_line(a: &Addon, what: &str) -> String {
    let mut seen = Vec::new();
    loop {
        match a.lines.recv_timeout(Duration::from_secs(30)) {
            Ok(l) if l.contains(what) => return l,
            Ok(l) => seen.push(l),
            Err(_) => panic!("no {what:?} line; got:\n{}", seen.join("\n")),
        }
    }
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let start = line.find(&format!("{key}=")).unwrap() + key.len() + 1;
    line[start..].split_whitespace().next().unwrap()
}

/// A scratch folder others may enter (the proxy runs as 10001 under it).
fn scratch() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_sh_turns_the_options_into_a_running_proxy() {
    let Some(m) = manifest() else { return };
    let (cloud, cloud_addr) = start_cloud(CloudSimConfig::default()).await;
    let dir = scratch();
    // The Supervisor writes the defaults, plus what the user changed: never the real cloud
    // here, and a seed trying to smuggle TOML in.
    let mut options = m["options"].clone();
    let hostile = "x\"\n[admin]\nlisten = \"0.0.0.0:1\"\n#";
    options["upstream_addresses"] = serde_json::json!([cloud_addr.to_string()]);
    options["routing_seed"] = hostile.into();
    options["canary_percent"] = 12.5.into();
    options["cohort"] = serde_json::json!(["1234abcd"]);
    options["log_level"] = "debug".into();
    options["exclude"] = serde_json::json!(["abcd"]);
    options["new_path_addresses"] = serde_json::json!(["127.0.0.1:10"]);
    options["new_path_verify"] = false.into();
    options["per_device_metrics"] = true.into();
    options["capture"] = true.into();
    options["capture_max_total_mb"] = 64.into();
    let mut addon = run_addon(dir.path(), &options);
    let listening = wait_line(&addon, "listening");
    let tls: std::net::SocketAddr = field(&listening, "tls").parse().unwrap();
    let admin = field(&listening, "admin").to_owned();
    assert!(admin.starts_with("127.0.0.1:"), "{admin}");

    // The file written from the options, as the proxy reads it.
    let file = dir.path().join("data/cync-mitm.toml");
    let cfg = cync_mitm::config::Config::load(&file).unwrap();
    assert_eq!(cfg.routing.seed, hostile, "the seed stays one string");
    assert_eq!(cfg.routing.canary_percent, 12.5);
    assert_eq!(cfg.routing.cohort.len(), 1);
    assert_eq!(cfg.upstream.addresses, [cloud_addr.to_string()]);
    assert_eq!(
        cfg.admin.allowed_hosts,
        ["homeassistant.local", "homeassistant"]
    );
    assert_eq!(cfg.log.filter, "debug");
    assert_eq!(cfg.capture.max_total_bytes, 64 << 20);
    assert!(cfg.capture.enabled);
    assert!(!cfg.new_path.verify);
    assert_eq!(cfg.new_path.addresses, ["127.0.0.1:10"]);
    assert_eq!(cfg.routing.exclude.len(), 1);
    assert!(cfg.metrics.per_device_labels);
    assert_eq!(cfg.routing.mode, cync_mitm::route::Mode::LegacyOnly);

    // It serves devices, from /data, as uid 10001 when started as root.
    let fleet = start_fleet(fleet_config(tls, 3));
    assert!(
        wait_until(Duration::from_secs(20), || fleet
            .stats()
            .online
            .load(Ordering::Relaxed)
            == 3)
        .await
    );
    let key = dir.path().join("data/certs/server-rsa-key.pem");
    let meta = std::fs::metadata(&key).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let pid = addon.child.id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(
        comm.trim(),
        "cync-mitm",
        "run.sh execs the proxy (signals reach it)"
    );
    if nix_is_root() {
        assert_eq!(meta.uid(), 10001);
        let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert!(
            uid.split_whitespace().skip(1).all(|u| u == "10001"),
            "{uid}"
        );
        let caps = status.lines().find(|l| l.starts_with("CapEff:")).unwrap();
        assert!(caps.ends_with("0000000000000000"), "{caps}");
    }
    std::fs::write(
        dir.path().join("cli.toml"),
        format!("admin.listen = \"{admin}\"\n"),
    )
    .unwrap();
    let hc = Command::new(env!("CARGO_BIN_EXE_cync-mitm"))
        .args(["healthcheck", "--ready", "--config"])
        .arg(dir.path().join("cli.toml"))
        .output()
        .unwrap();
    assert!(hc.status.success(), "{hc:?}");

    // SIGTERM (the Supervisor stopping it) ends it cleanly.
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let mut waited = Duration::ZERO;
    let code = loop {
        if let Some(s) = addon.child.try_wait().unwrap() {
            break s;
        }
        assert!(waited < Duration::from_secs(15), "no exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += Duration::from_millis(50);
    };
    assert!(code.success(), "{code:?}");
    fleet.stop().await;
    cloud.stop().await;
}

#[test]
fn invalid_options_stop_it_with_64_and_a_users_own_file_wins() {
    let Some(m) = manifest() else { return };
    let dir = scratch();
    let mut options = m["options"].clone();
    options["upstream_addresses"] = serde_json::json!(["127.0.0.1:9"]);
    options["canary_percent"] = 150.into();
    options["routing_seed"] = Value::Null;
    options["upstream_pin_sha256"] = serde_json::json!(["ab".repeat(32)]);
    let mut addon = run_addon(dir.path(), &options);
    let status = wait_exit(&mut addon.child);
    let mut out = Vec::new();
    while let Ok(l) = addon.lines.recv_timeout(Duration::from_millis(500)) {
        out.push(l);
    }
    let out = out.join("\n");
    assert_eq!(status.code(), Some(64), "{out}");
    assert!(out.contains("routing.canary_percent"), "{out}");
    assert!(out.contains("the configuration is invalid"), "{out}");
    // An unset option is left out (its default applies), not written as "null".
    let written: toml::Table =
        toml::from_str(&std::fs::read_to_string(dir.path().join("data/cync-mitm.toml")).unwrap())
            .unwrap();
    assert!(written["routing"].get("seed").is_none(), "{written}");
    assert_eq!(written["routing"]["canary_percent"].as_integer(), Some(150));
    assert_eq!(
        written["upstream"]["pin_sha256"][0].as_str(),
        Some("ab".repeat(32).as_str())
    );
    // An option of the wrong type stops it before any file is written.
    let mut wrong = options.clone();
    wrong["canary_percent"] = 5.into();
    wrong["capture"] = "yes".into();
    let mut addon = run_addon(dir.path(), &wrong);
    assert_eq!(wait_exit(&mut addon.child).code(), Some(64));
    let out: Vec<String> = addon.lines.try_iter().collect();
    assert!(
        out.join("\n")
            .contains("option capture must be true or false"),
        "{out:?}"
    );

    // Not JSON at all.
    std::fs::write(dir.path().join("options.json"), "{").unwrap();
    let st = Command::new("bash")
        .arg(addon_dir().join("run.sh"))
        .env("CYNC_MITM_OPTIONS", dir.path().join("options.json"))
        .env("CYNC_MITM_DATA", dir.path().join("data"))
        .env(
            "CYNC_MITM_USER_CONFIG",
            dir.path().join("config/cync-mitm.toml"),
        )
        .env("CYNC_MITM_BIN", env!("CARGO_BIN_EXE_cync-mitm"))
        .env("CYNC_MITM_LISTEN", "127.0.0.1:0")
        .env("CYNC_MITM_ADMIN", "127.0.0.1:0")
        .output()
        .unwrap();
    assert_eq!(st.status.code(), Some(64), "{st:?}");

    // The user's own file is used as written; the (invalid) options are not applied.
    std::fs::remove_file(dir.path().join("data/cync-mitm.toml")).unwrap();
    std::fs::create_dir_all(dir.path().join("config")).unwrap();
    std::fs::write(
        dir.path().join("config/cync-mitm.toml"),
        "listen.tls = \"127.0.0.1:0\"\nadmin.listen = \"127.0.0.1:0\"\n\
         upstream.addresses = [\"127.0.0.1:9\"]\nrouting.canary_percent = 3.0\n",
    )
    .unwrap();
    let user = dir.path().join("config/cync-mitm.toml");
    if nix_is_root() {
        // Readable by root only: refused before it starts, not after.
        std::fs::set_permissions(&user, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut addon = run_addon(dir.path(), &options);
        assert_eq!(wait_exit(&mut addon.child).code(), Some(64));
        let out: Vec<String> = addon.lines.try_iter().collect();
        assert!(out.join("\n").contains("invalid or unreadable"), "{out:?}");
        std::fs::set_permissions(&user, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    // The image's default: CYNC_MITM_RUN_AS unset drops to 10001 all the same.
    let addon = run_addon_as(dir.path(), &options, None);
    wait_line(&addon, "as written");
    // Its admin server is on loopback: the watchdog could not reach it, and it says so.
    wait_line(&addon, "watchdog");
    wait_line(&addon, "listening");
    assert!(!dir.path().join("data/cync-mitm.toml").exists());
    if nix_is_root() {
        let status = std::fs::read_to_string(format!("/proc/{}/status", addon.child.id())).unwrap();
        let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert!(
            uid.split_whitespace().skip(1).all(|u| u == "10001"),
            "{uid}"
        );
    }
    drop(addon);
}

#[test]
fn package_sh_makes_a_local_addon_folder_with_the_source() {
    if !have_tool("tar", "--version") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("bash")
        .arg(addon_dir().join("package.sh"))
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let folder = dir.path().join("cync_mitm");
    for f in [
        "config.yaml",
        "build.yaml",
        "Dockerfile",
        "run.sh",
        "DOCS.md",
        "README.md",
        "source.tar.gz",
    ] {
        assert!(folder.join(f).is_file(), "{f} missing");
    }
    let mode = std::fs::metadata(folder.join("run.sh"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o111, 0o111);
    // The Dockerfile's build stage compiles what the tarball holds: a manifest cargo reads
    // (its benches present), the lock file, the build script and the sources.
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let x = Command::new("tar")
        .arg("-xzf")
        .arg(folder.join("source.tar.gz"))
        .arg("-C")
        .arg(&src)
        .status()
        .unwrap();
    assert!(x.success());
    let commit = std::fs::read_to_string(src.join("COMMIT")).unwrap();
    assert!(commit.trim().len() >= 7, "{commit}");
    for f in [
        "Cargo.toml",
        "Cargo.lock",
        "build.rs",
        "src/main.rs",
        "src/lib.rs",
    ] {
        assert!(src.join(f).is_file(), "{f} not in source.tar.gz");
    }
    assert!(src.join("benches").is_dir());
    assert!(!src.join("target").exists() && !src.join("tests").exists());
    let meta = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--no-deps",
            "--offline",
            "--format-version",
            "1",
        ])
        .arg("--manifest-path")
        .arg(src.join("Cargo.toml"))
        .output()
        .unwrap();
    assert!(meta.status.success(), "{meta:?}");
    let dockerfile = std::fs::read_to_string(folder.join("Dockerfile")).unwrap();
    assert!(dockerfile.contains("ADD source.tar.gz /src/"));
    assert!(dockerfile.contains("CMD [\"/run.sh\"]"));
    assert!(dockerfile.contains("COPY run.sh /run.sh"));
    // A wrong call says how to use it.
    let bad = Command::new("bash")
        .arg(addon_dir().join("package.sh"))
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
}
