//! `deploy/prometheus` and `deploy/grafana`: the recording rules are what `cync-mitm slo rules`
//! prints, promtool accepts the rules and passes their unit tests, and every metric (and every
//! label) the rules and the dashboard name exists in the registry of a live proxy.

mod common;

use common::harness::*;
use common::tshark::have_tool;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn deploy(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(p)
}

#[test]
fn the_recording_rules_are_the_generated_ones() {
    let file = std::fs::read_to_string(deploy("prometheus/cync-mitm-recording.rules.yml")).unwrap();
    assert!(
        file == cync_mitm::slo::prom::recording_rules(),
        "deploy/prometheus/cync-mitm-recording.rules.yml is stale: run \
         `cargo run -- slo rules > deploy/prometheus/cync-mitm-recording.rules.yml`"
    );
}

#[test]
fn promtool_checks_the_rules_and_passes_their_unit_tests() {
    if !have_tool("promtool", "--version") {
        return;
    }
    let dir = deploy("prometheus");
    let run = |args: &[&str]| {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "promtool {args:?}:\n{text}");
        text
    };
    let checked = run(&[
        "check",
        "rules",
        "cync-mitm-recording.rules.yml",
        "cync-mitm-alerts.rules.yml",
    ]);
    assert!(checked.contains("SUCCESS: 98 rules found"), "{checked}");
    assert!(checked.contains("SUCCESS: 12 rules found"), "{checked}");
    let tested = run(&["test", "rules", "cync-mitm-alerts.test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// Families of a Prometheus text exposition: name → label names.
fn families(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => line.split_at(i),
            None => continue,
        };
        let labels = out.entry(name.to_owned()).or_default();
        if let Some(body) = rest.strip_prefix('{').and_then(|r| r.split_once('}')) {
            for pair in body.0.split("\",") {
                if let Some((k, _)) = pair.split_once('=') {
                    labels.insert(k.trim().to_owned());
                }
            }
        }
    }
    out
}

/// The metric names an expression uses, each with the label names its matchers use.
fn selectors(expr: &str) -> Vec<(String, Vec<String>)> {
    let b = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let starts = ["tcp_comm_", "cync_mitm_", "process_"]
            .iter()
            .any(|p| expr[i..].starts_with(p))
            && (i == 0
                || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_' || b[i - 1] == b':'));
        if !starts {
            i += 1;
            continue;
        }
        let end = expr[i..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(b.len(), |n| i + n);
        let name = expr[i..end].to_owned();
        let mut labels = Vec::new();
        if expr[end..].starts_with('{')
            && let Some(close) = expr[end..].find('}')
        {
            let body = &expr[end + 1..end + close];
            let mut rest = body;
            while let Some(op) = rest.find(['=', '!']) {
                let key = rest[..op].trim().trim_start_matches(',').trim();
                if !key.is_empty() {
                    labels.push(key.to_owned());
                }
                // Skip the quoted value.
                let Some(q) = rest[op..].find('"') else { break };
                let after = &rest[op + q + 1..];
                let mut k = 0;
                let vb = after.as_bytes();
                while k < vb.len() && !(vb[k] == b'"' && (k == 0 || vb[k - 1] != b'\\')) {
                    k += 1;
                }
                rest = after.get(k + 1..).unwrap_or("");
            }
        }
        out.push((name, labels));
        i = end;
    }
    out
}

/// Label names of `by (...)` and `without (...)` clauses.
fn grouping(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    for kw in ["by (", "by(", "without (", "without("] {
        let mut rest = expr;
        while let Some(i) = rest.find(kw) {
            let after = &rest[i + kw.len()..];
            let Some(close) = after.find(')') else { break };
            out.extend(
                after[..close]
                    .split(',')
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty()),
            );
            rest = &after[close..];
        }
    }
    out
}

/// Every expression of the rule files (one per rule) and of the dashboard (one per target and
/// annotation), with where it is from.
fn expressions() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for f in [
        "cync-mitm-alerts.rules.yml",
        "cync-mitm-recording.rules.yml",
    ] {
        let text = std::fs::read_to_string(deploy("prometheus").join(f)).unwrap();
        for (n, rule) in text.split("\n      - ").skip(1).enumerate() {
            let expr = rule.split_once("expr:").map(|(_, e)| e).unwrap_or_default();
            // Up to the next key of the rule.
            let expr = [
                "\n        for:",
                "\n        labels:",
                "\n        annotations:",
            ]
            .iter()
            .filter_map(|k| expr.find(k))
            .min()
            .map_or(expr, |i| &expr[..i]);
            out.push((format!("{f} rule {n}"), expr.to_owned()));
        }
    }
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(deploy("grafana/cync-mitm.json")).unwrap())
            .unwrap();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((
                format!("dashboard panel {:?}", p["title"]),
                t["expr"].as_str().unwrap().to_owned(),
            ));
        }
    }
    for a in dash["annotations"]["list"].as_array().unwrap() {
        out.push((
            "dashboard annotation".into(),
            a["expr"].as_str().unwrap().to_owned(),
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_and_label_the_rules_and_the_dashboard_name_exists_in_a_live_registry() {
    // A proxy with traffic on both paths (shadow, so parity runs too), per-device series on.
    let cmds = cync_mitm::sim::cloud::CloudSimConfig {
        command_interval: Some(Duration::from_millis(50)),
        ..Default::default()
    };
    let (legacy, legacy_addr) = start_cloud(cmds.clone()).await;
    let (backend, new_addr) = start_cloud(cmds).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = proxy_config(legacy_addr);
    cfg.metrics.per_device_labels = true;
    use_new_path(&mut cfg, new_addr);
    cfg.routing.mode = cync_mitm::route::Mode::Shadow;
    cfg.routing.canary_percent = 100.0;
    cfg.slo.eval_interval = Duration::from_secs(1);
    cfg.slo.state_file = dir.path().join("state.json");
    let p = start_proxy(cfg).await;
    let mut fc = fleet_config(p.addr, 3);
    fc.heartbeat = Duration::from_millis(100);
    let fleet = start_fleet(fc);
    assert!(
        wait_until(Duration::from_secs(30), || {
            p.metrics.slo.evaluations.get() >= 2
                && p.metrics.render().contains("tcp_comm_parity_matches_total")
        })
        .await
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let live = families(&p.metrics.render());
    fleet.stop().await;
    legacy.stop().await;
    backend.stop().await;
    // Recording rules' names and labels.
    let recorded: BTreeSet<String> =
        std::fs::read_to_string(deploy("prometheus/cync-mitm-recording.rules.yml"))
            .unwrap()
            .lines()
            .filter_map(|l| l.trim().strip_prefix("- record: ").map(str::to_owned))
            .collect();
    // Added by Prometheus, or part of every histogram bucket.
    let always = ["instance", "job", "le"];
    let mut problems = Vec::new();
    let mut named = 0;
    for (from, expr) in expressions() {
        for r in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
            if r.starts_with("cync_mitm:") && !recorded.contains(r) {
                problems.push(format!("{from}: {r} is not a recording rule"));
            }
        }
        let mut labels_here: BTreeSet<String> = always.iter().map(|s| (*s).to_owned()).collect();
        if expr.contains("cync_mitm:slo_block:") {
            labels_here.extend(["transport".to_owned(), "block".to_owned()]);
        }
        for (name, matchers) in selectors(&expr) {
            named += 1;
            // Histograms expose `_bucket`, `_count` and `_sum` samples under those names.
            let Some(labels) = live.get(&name) else {
                problems.push(format!("{from}: {name} is not in the live registry"));
                continue;
            };
            labels_here.extend(labels.iter().cloned());
            for m in matchers {
                if !labels.contains(&m) && !always.contains(&m.as_str()) {
                    problems.push(format!(
                        "{from}: {name} has no label {m:?} (it has {labels:?})"
                    ));
                }
            }
        }
        for g in grouping(&expr) {
            if !labels_here.contains(&g) {
                problems.push(format!(
                    "{from}: grouping by {g:?}, which no metric of `{expr}` has"
                ));
            }
        }
    }
    assert!(named > 100, "only {named} metric references found");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_parsers_find_names_matchers_and_grouping() {
    let s = selectors(
        r#"sum by (transport, le) (rate(tcp_comm_x_bucket{kind="a\"b",le=~"1|2"}[5m])) / cync_mitm_y"#,
    );
    assert_eq!(
        s,
        [
            (
                "tcp_comm_x_bucket".to_owned(),
                vec!["kind".to_owned(), "le".to_owned()]
            ),
            ("cync_mitm_y".to_owned(), vec![])
        ]
    );
    assert_eq!(
        grouping("max by (a, b) (x) + sum without(c) (y)"),
        ["a", "b", "c"]
    );
    assert!(selectors("cync_mitm:slo_block:increase5m").is_empty());
    let f = families("# HELP x y\nx{a=\"1\",b=\"2,3\"} 1\nz 2\n");
    assert_eq!(f["x"], BTreeSet::from(["a".to_owned(), "b".to_owned()]));
    assert!(f["z"].is_empty());
}
