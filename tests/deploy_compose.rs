//! `deploy/compose/`: yamllint passes every YAML file under deploy/; promtool accepts the
//! Prometheus config with the project's rules; the proxy's config is valid and lets Prometheus
//! in by the name it scrapes; dnsmasq answers the three Cync names with the box's address; the
//! mounts point at files that exist (hadolint passes its dnsmasq image: tests/deploy_container.rs).

mod common;

use common::tshark::have_tool;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn compose_dir() -> PathBuf {
    root().join("deploy/compose")
}

/// A YAML file as JSON (PyYAML, which yamllint brings).
fn yaml(path: &Path) -> Option<Value> {
    if !have_tool("yamllint", "--version") {
        return None;
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
        ])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

#[test]
fn yamllint_passes_everything_under_deploy() {
    if !have_tool("yamllint", "--version") {
        return;
    }
    let out = Command::new("yamllint")
        .args([
            "-c",
            ".yamllint.yaml",
            "--strict",
            "deploy",
            ".yamllint.yaml",
        ])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_accepts_the_compose_prometheus_config_and_its_rules() {
    if !have_tool("promtool", "--version") {
        return;
    }
    let out = Command::new("promtool")
        .args(["check", "config", "prometheus/prometheus.yml"])
        .current_dir(compose_dir())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("2 rule files found"), "{text}");
}

#[test]
fn the_services_fit_together() {
    let Some(c) = yaml(&compose_dir().join("compose.yaml")) else {
        return;
    };
    let s = &c["services"];
    // The proxy: its config valid, admin reachable by the name Prometheus scrapes.
    let cfg = cync_mitm::config::Config::load(&compose_dir().join("cync-mitm.toml")).unwrap();
    assert!(cfg.admin.listen.ip().is_unspecified());
    let prom = yaml(&compose_dir().join("prometheus/prometheus.yml")).unwrap();
    let target = prom["scrape_configs"][0]["static_configs"][0]["targets"][0]
        .as_str()
        .unwrap()
        .to_owned();
    let (host, port) = target.split_once(':').unwrap();
    assert!(s[host].is_object(), "{host} is not a service");
    assert_eq!(port.parse::<u16>().unwrap(), cfg.admin.listen.port());
    assert!(
        cfg.admin.allowed_hosts.iter().any(|h| h == host),
        "{host} not allowed"
    );
    assert_eq!(cfg.listen.tls.port(), 23779);
    let ports: Vec<&str> = s["cync-mitm"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(ports.contains(&"23779:23779"), "{ports:?}");
    assert!(
        ports
            .iter()
            .any(|p| p.starts_with("127.0.0.1:") && p.ends_with(":9400")),
        "the console is published on loopback only: {ports:?}"
    );
    assert_eq!(
        s["cync-mitm"]["build"]["dockerfile"].as_str(),
        Some("deploy/docker/Dockerfile")
    );
    // dnsmasq: the three names, to the box's address.
    let args: Vec<&str> = s["dnsmasq"]["command"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for name in [
        "cm.gelighting.com",
        "cm-sec.gelighting.com",
        "cm-ge.xlink.cn",
    ] {
        assert!(
            args.iter()
                .any(|a| a.starts_with(&format!("--address=/{name}/${{CYNC_MITM_LAN_IP"))),
            "{name}: {args:?}"
        );
    }
    // The proxy must not resolve its own upstream through the override (a loop): its default
    // upstream addresses are IPs.
    assert!(
        cfg.upstream.addresses.iter().all(|a| a
            .split(':')
            .next()
            .unwrap()
            .parse::<std::net::IpAddr>()
            .is_ok()),
        "{:?}",
        cfg.upstream.addresses
    );
    // Every bind mount names something that exists here.
    for (name, svc) in s.as_object().unwrap() {
        for v in svc["volumes"].as_array().into_iter().flatten() {
            let src = v.as_str().unwrap().split(':').next().unwrap();
            if src.starts_with('.') {
                assert!(compose_dir().join(src).exists(), "{name}: {src} is missing");
            }
        }
    }
    // Prometheus keeps the 30 days the SLO report reads.
    let cmd = s["prometheus"]["command"].to_string();
    assert!(cmd.contains("--storage.tsdb.retention.time=35d"), "{cmd}");
    // Grafana provisions the datasource and the dashboard folder it mounts.
    let dash = yaml(&compose_dir().join("grafana/provisioning/dashboards/cync-mitm.yml")).unwrap();
    let path = dash["providers"][0]["options"]["path"].as_str().unwrap();
    assert!(
        s["grafana"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v.as_str().unwrap().ends_with(&format!(":{path}:ro"))),
        "{path}"
    );
}

#[test]
fn shellcheck_passes_the_scripts_and_ci() {
    if !have_tool("shellcheck", "--version") {
        return;
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("scripts"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sh"))
        .collect();
    files.push(root().join(".ci/run"));
    files.push(root().join("deploy/homeassistant/run.sh"));
    files.push(root().join("deploy/homeassistant/package.sh"));
    assert!(files.len() >= 5, "{files:?}");
    let out = Command::new("shellcheck").args(&files).output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
