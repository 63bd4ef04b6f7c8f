//! `cync-mitm demo` as CI runs it: quiet, short, exit 0 with its summary; its files deleted,
//! or kept with --dir.

use std::process::Command;

fn demo(args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cync-mitm"))
        .arg("demo")
        .args(args)
        .output()
        .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// The rest of the summary line that starts with `start`.
fn line<'a>(text: &'a str, start: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.trim_start().strip_prefix(start))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {start:?} line in:\n{text}"))
}

#[test]
fn the_demo_walks_the_rollout_rolls_back_and_names_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let keep = dir.path().join("demo");
    let (status, out, err) = demo(&[
        "--quiet",
        "--duration",
        "12s",
        "--devices",
        "20",
        "--dir",
        keep.to_str().unwrap(),
    ]);
    assert!(status.success(), "{out}\n{err}");
    assert!(out.contains("cync-mitm demo complete in"), "{out}");
    for step in [
        "rollout at shadow",
        "rollout at 10%",
        "rollout at 25%",
        "rollout at 50%",
    ] {
        assert!(out.contains(step), "{step}: {out}");
    }
    let order: Vec<usize> = ["rollout at 50%", "fault:", "rolled back: canary 0 %"]
        .iter()
        .map(|s| out.find(s).unwrap_or_else(|| panic!("{s}: {out}")))
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{out}");
    assert!(err.trim().is_empty(), "quiet: nothing on stderr: {err}");
    // The files it names exist (kept with --dir).
    let caps = line(&out, "captures");
    assert!(caps.contains("20 pcapng files"), "{caps}");
    let decisions = line(&out, "decision log");
    let log = std::fs::read_to_string(decisions).unwrap();
    assert!(log.lines().any(|l| l.contains("\"rollback\"")), "{log}");
    assert!(log.lines().any(|l| l.contains("\"advance\"")));
    let pcap = std::fs::read_dir(keep.join("captures"))
        .unwrap()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).unwrap().flatten())
        .count();
    assert_eq!(pcap, 20);
    // Nothing it was configured with leaves the machine.
    let toml = std::fs::read_to_string(keep.join("cync-mitm.toml")).unwrap();
    let cfg: toml::Table = toml.parse().unwrap();
    let mut addrs = Vec::new();
    for (section, key) in [("listen", "tls"), ("admin", "listen")] {
        addrs.push(cfg[section][key].as_str().unwrap().to_owned());
    }
    for section in ["upstream", "new_path"] {
        for a in cfg[section]["addresses"].as_array().unwrap() {
            addrs.push(a.as_str().unwrap().to_owned());
        }
    }
    assert!(addrs.len() >= 4);
    for a in &addrs {
        assert!(a.starts_with("127.0.0.1:"), "{a} in {toml}");
    }
    assert!(cfg["listen"].get("plain").is_none(), "{toml}");
    assert_eq!(cfg["upstream"]["mode"].as_str(), Some("fixed"));
    // Again in the same folder: the earlier run's SLO state (rolled back) does not stop it.
    let (status, out, err) = demo(&[
        "--quiet",
        "--duration",
        "10s",
        "--devices",
        "10",
        "--dir",
        keep.to_str().unwrap(),
    ]);
    assert!(status.success(), "{out}\n{err}");
    assert!(out.contains("rolled back: canary 0 %"), "{out}");
}

#[test]
fn without_keep_the_files_go_and_bad_flags_are_refused() {
    let (status, out, err) = demo(&["--quiet", "--duration", "10s", "--devices", "5"]);
    assert!(status.success(), "{out}\n{err}");
    assert!(out.contains("deleted now; --keep keeps them"), "{out}");
    let cfg = std::path::Path::new(line(&out, "config"));
    let folder = cfg.parent().unwrap();
    assert!(
        folder
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("cync-mitm-demo-"),
        "{out}"
    );
    assert!(!folder.exists(), "{} was left behind", folder.display());
    // A folder of other files is refused, untouched; so is a file.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cync-mitm.toml"), "mine").unwrap();
    let (status, _, err) = demo(&["--quiet", "--dir", dir.path().to_str().unwrap()]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("holds files the demo did not make"), "{err}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("cync-mitm.toml")).unwrap(),
        "mine"
    );
    let file = dir.path().join("cync-mitm.toml");
    let (status, _, err) = demo(&["--quiet", "--dir", file.to_str().unwrap()]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("is not a folder"), "{err}");
    for bad in [
        &["--devices", "0"][..],
        &["--devices", "99999"],
        &["--duration", "1s"],
        &["--duration", "1h"],
        &["--duration", "soon"],
    ] {
        let (status, _, err) = demo(bad);
        assert_eq!(status.code(), Some(2), "{bad:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn ctrl_c_stops_the_demo_cleanly_and_deletes_its_files() {
    let child = Command::new(env!("CARGO_BIN_EXE_cync-mitm"))
        .args(["demo", "--quiet", "--duration", "30s", "--devices", "5"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(4));
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("cync-mitm demo INTERRUPTED"), "{text}");
    let cfg = std::path::Path::new(line(&text, "config"));
    assert!(!cfg.parent().unwrap().exists(), "files left behind");
}

#[test]
fn with_stay_the_demo_keeps_its_console_up_after_the_rollback_until_ctrl_c() {
    use std::io::{BufRead as _, Read as _, Write as _};
    let mut child = Command::new(env!("CARGO_BIN_EXE_cync-mitm"))
        .args(["demo", "--duration", "12s", "--devices", "10", "--stay"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    let mut seen = Vec::new();
    let mut admin = None;
    let mut staying_since = None;
    while std::time::Instant::now() < deadline {
        let Ok(l) = rx.recv_timeout(std::time::Duration::from_secs(1)) else {
            continue;
        };
        if let Some(rest) = l.strip_prefix("console: http://") {
            admin = rest.split('/').next().map(str::to_owned);
        }
        if l.contains("rolled back; staying up") && staying_since.is_none() {
            staying_since = Some(std::time::Instant::now());
        }
        seen.push(l);
        // Well past the point where a demo without --stay ends (2 s after the rollback).
        if staying_since.is_some_and(|t| t.elapsed() > std::time::Duration::from_secs(6)) {
            break;
        }
    }
    let all = seen.join("\n");
    assert!(staying_since.is_some(), "never stayed up: {all}");
    assert!(child.try_wait().unwrap().is_none(), "it exited: {all}");
    assert!(!all.contains("cync-mitm demo complete"), "{all}");
    // Its console still answers.
    let admin = admin.unwrap_or_else(|| panic!("no console line: {all}"));
    let mut s = std::net::TcpStream::connect(&admin).unwrap();
    s.write_all(
        format!("GET /api/rollout HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(
        body.contains("\"override\":{"),
        "the rollback override is shown: {body}"
    );
    // Ctrl-C ends it, with the summary, exit 0 (the rollout completed).
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = child.wait().unwrap();
    let rest: Vec<String> = rx.iter().collect();
    let rest = rest.join("\n");
    assert_eq!(status.code(), Some(0), "{rest}");
    assert!(rest.contains("cync-mitm demo complete"), "{rest}");
}
