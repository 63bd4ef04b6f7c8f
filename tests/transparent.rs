//! Transparent mode for real: two network namespaces joined by a veth pair, an iptables REDIRECT
//! in front of the proxy, and the proxy reaching the cloud at each connection's original
//! destination (SO_ORIGINAL_DST). Needs root, `ip` and `iptables`; `.ci/run` installs them. Outside
//! CI the test says why it skipped; under CI (CI=true) missing prerequisites fail it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_cync-mitm")
}

fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

struct Netns {
    names: Vec<String>,
    children: Vec<Child>,
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

fn prerequisites() -> Result<(), String> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map_err(|e| e.to_string())?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Err("not root".into());
    }
    for tool in ["ip", "iptables"] {
        let ok = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !ok {
            return Err(format!("{tool} not installed"));
        }
    }
    Ok(())
}

#[test]
fn transparent_mode_follows_the_original_destination() {
    if let Err(why) = prerequisites() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("transparent-mode test cannot run in CI: {why}");
        }
        eprintln!("skipped: {why}");
        return;
    }
    let tag = std::process::id() % 100_000;
    let (dev_ns, proxy_ns) = (format!("cmd{tag}"), format!("cmp{tag}"));
    let (vd, vp) = (format!("cmvd{tag}"), format!("cmvp{tag}"));
    let octet = tag % 250 + 1;
    let (dev_ip, proxy_ip) = (format!("10.231.{octet}.2"), format!("10.231.{octet}.1"));
    let mut env = Netns {
        names: vec![dev_ns.clone(), proxy_ns.clone()],
        children: Vec::new(),
    };
    let setup = [
        vec!["ip", "netns", "add", &dev_ns],
        vec!["ip", "netns", "add", &proxy_ns],
        vec![
            "ip", "link", "add", &vd, "type", "veth", "peer", "name", &vp,
        ],
        vec!["ip", "link", "set", &vd, "netns", &dev_ns],
        vec!["ip", "link", "set", &vp, "netns", &proxy_ns],
    ];
    for cmd in &setup {
        sh(cmd).unwrap();
    }
    let dev_cidr = format!("{dev_ip}/24");
    let proxy_cidr = format!("{proxy_ip}/24");
    for cmd in [
        vec!["ip", "-n", &dev_ns, "addr", "add", &dev_cidr, "dev", &vd],
        vec![
            "ip",
            "-n",
            &proxy_ns,
            "addr",
            "add",
            &proxy_cidr,
            "dev",
            &vp,
        ],
        vec!["ip", "-n", &dev_ns, "link", "set", &vd, "up"],
        vec!["ip", "-n", &proxy_ns, "link", "set", &vp, "up"],
        vec!["ip", "-n", &dev_ns, "link", "set", "lo", "up"],
        vec!["ip", "-n", &proxy_ns, "link", "set", "lo", "up"],
        vec![
            "ip",
            "netns",
            "exec",
            &proxy_ns,
            "iptables",
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-i",
            &vp,
            "-p",
            "tcp",
            "--dport",
            "23779",
            "-j",
            "REDIRECT",
            "--to-ports",
            "24779",
        ],
    ] {
        sh(&cmd).unwrap();
    }

    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let cfg = dir.path().join("t.toml");
    // Fixed-mode addresses point nowhere: only the original destination can work.
    std::fs::write(&cfg, format!(
        "[listen]\ntls = \"0.0.0.0:24779\"\n[upstream]\nmode = \"transparent\"\naddresses = [\"127.0.0.1:9\"]\n\
         [admin]\nenabled = false\n[tls]\ncert_dir = \"{}\"\n[slo]\nstate_file = \"{}\"\n",
        certs.display(), dir.path().join("slo/state.json").display())).unwrap();
    let cloud_listen = format!("{proxy_ip}:23779");
    env.children.push(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &proxy_ns,
                bin(),
                "sim",
                "cloud",
                "--listen",
                &cloud_listen,
                "--cert-dir",
            ])
            .arg(&certs)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut proxy = Command::new("ip")
        .args(["netns", "exec", &proxy_ns, bin(), "run", "--config"])
        .arg(&cfg)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = BufReader::new(proxy.stderr.take().unwrap()).lines();
    env.children.push(proxy);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let t0 = Instant::now();
    loop {
        let l = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("proxy did not start");
        if l.contains("listening") {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30));
    }
    std::thread::sleep(Duration::from_millis(300));

    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &dev_ns,
            bin(),
            "sim",
            "devices",
            "--target",
            &cloud_listen,
            "--count",
            "3",
            "--heartbeat",
            "500ms",
            "--duration",
            "3s",
            "--report-every",
            "1h",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or("{}"),
    )
    .unwrap();
    assert_eq!(report["connects"], 3, "{report}");
    let requests = report["requests"].as_u64().unwrap();
    assert!(requests >= 3 * 7, "{report}");
    // At most one heartbeat per device can be in flight when the fleet stops.
    let answered = report["answered"].as_u64().unwrap();
    assert!(answered <= requests && requests - answered <= 3, "{report}");

    let mut log = Vec::new();
    while let Ok(l) = rx.recv_timeout(Duration::from_millis(300)) {
        log.push(l);
    }
    let log = log.join("\n");
    let want = format!("upstream={cloud_listen}");
    assert_eq!(log.matches("device connected").count(), 3, "{log}");
    assert!(log.contains(&want), "{log}");
    assert!(log.contains(&format!("peer={dev_ip}:")), "{log}");
}
