//! docs/runbooks/ stays true to the code: every metric it names is documented in
//! docs/metrics.md (which tests/metrics_doc.rs ties to the registry), every alert is in the
//! alert rules, every `cync-mitm` subcommand parses, every admin endpoint exists, every
//! configuration key is one `config show` prints, and every relative link resolves.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn runbooks() -> Vec<(PathBuf, String)> {
    let dir = root().join("docs/runbooks");
    let mut out: Vec<(PathBuf, String)> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .map(|p| {
            let t = std::fs::read_to_string(&p).unwrap();
            (p, t)
        })
        .collect();
    out.sort();
    out
}

/// Maximal runs of `[A-Za-z0-9_:.-]` starting with `prefix` in `text`.
fn words(text: &str, prefix: &str) -> BTreeSet<String> {
    let ok = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find(prefix) {
        let before_ok = i == 0 || !ok(rest[..i].chars().next_back().unwrap_or(' '));
        let tail = &rest[i..];
        let end = tail.find(|c: char| !ok(c)).unwrap_or(tail.len());
        if before_ok {
            out.insert(tail[..end].to_owned());
        }
        rest = &tail[end.max(1)..];
    }
    out
}

#[test]
fn the_runbooks_exist_and_link_each_other() {
    let books = runbooks();
    let names: Vec<String> = books
        .iter()
        .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for n in [
        "README.md",
        "operations.md",
        "incident-response.md",
        "rollback-procedures.md",
        "troubleshooting.md",
    ] {
        assert!(names.contains(&n.to_owned()), "no docs/runbooks/{n}");
    }
    for (p, text) in &books {
        let mut rest = text.as_str();
        while let Some(i) = rest.find("](") {
            let tail = &rest[i + 2..];
            let end = tail.find(')').unwrap();
            let target = &tail[..end];
            rest = &tail[end..];
            if target.starts_with("http") {
                panic!("{}: links outside the repository: {target}", p.display());
            }
            let (file, anchor) = target.split_once('#').unwrap_or((target, ""));
            let f = p.parent().unwrap().join(file);
            assert!(f.exists(), "{}: broken link {target}", p.display());
            if !anchor.is_empty() {
                let body = std::fs::read_to_string(&f).unwrap().to_lowercase();
                let heading = anchor.replace('-', " ");
                assert!(
                    body.lines()
                        .any(|l| l.starts_with('#') && l.trim_start_matches('#').trim() == heading),
                    "{}: no heading for #{anchor} in {file}",
                    p.display()
                );
            }
        }
    }
}

#[test]
fn every_metric_alert_command_endpoint_and_option_they_name_exists() {
    let metrics_doc = std::fs::read_to_string(root().join("docs/metrics.md")).unwrap();
    let alerts =
        std::fs::read_to_string(root().join("deploy/prometheus/cync-mitm-alerts.rules.yml"))
            .unwrap();
    let admin = std::fs::read_to_string(root().join("src/admin.rs")).unwrap();
    let show = Command::new(env!("CARGO_BIN_EXE_cync-mitm"))
        .args(["config", "show"])
        .output()
        .unwrap();
    assert!(show.status.success());
    let show = String::from_utf8_lossy(&show.stdout).into_owned();
    // `section.key` for every key `config show` prints (unset ones are shown commented).
    let mut keys: BTreeSet<String> = BTreeSet::new();
    let mut section = String::new();
    for l in show.lines() {
        if let Some(h) = l.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = h.to_owned();
            continue;
        }
        let l = l.trim_start_matches("# ");
        if let Some((k, _)) = l.split_once(" = ") {
            keys.insert(format!("{section}.{k}"));
        }
    }
    let sections: BTreeSet<String> = keys
        .iter()
        .map(|k| k.split('.').next().unwrap_or("").to_owned())
        .collect();
    let mut counted = [0usize; 5];
    for (p, text) in runbooks() {
        let file = p.display().to_string();
        for prefix in ["cync_mitm_", "tcp_comm_"] {
            for m in words(&text, prefix) {
                // Recording rules (`cync_mitm:slo_block:…`) are the rule files'.
                if m.contains(':') || m.ends_with('_') {
                    continue;
                }
                assert!(
                    metrics_doc.contains(&format!("`{m}`")),
                    "{file}: metric {m} is not in docs/metrics.md"
                );
                counted[0] += 1;
            }
        }
        for a in words(&text, "Cync") {
            if a.len() > 6 && a[4..].starts_with(|c: char| c.is_ascii_uppercase()) {
                assert!(
                    alerts.contains(&format!("alert: {a}\n")),
                    "{file}: alert {a} is not in the alert rules"
                );
                counted[1] += 1;
            }
        }
        // `cync-mitm SUB [SUBSUB]` in code spans and blocks: each must parse (`--help`).
        let mut in_block = false;
        for line in text.lines() {
            if line.trim_start().starts_with("```") {
                in_block = !in_block;
                continue;
            }
            let mut rest = line;
            while let Some(i) = rest.find("cync-mitm ") {
                let before = &rest[..i];
                let tail = &rest[i + "cync-mitm ".len()..];
                rest = tail;
                // A command: in a code block, a code span, or after `exec`/`--`.
                let command = in_block
                    || before.ends_with('`')
                    || before.ends_with("-- ")
                    || before.ends_with("exec ");
                // Not the namespace, the container or a resource of that name.
                let named = before.ends_with("-n ") || before.ends_with('/');
                if !command || named {
                    continue;
                }
                // The whole command, flags and values included, up to the end of the span or
                // a shell operator: clap refuses an unknown flag even with `--help`.
                let end = tail
                    .find(['`', '|', '>', '#', ';', ')', '('])
                    .unwrap_or(tail.len());
                let args: Vec<&str> = tail[..end]
                    .split_whitespace()
                    .take_while(|w| !matches!(*w, "…" | "&&" | "\\" | "..."))
                    .collect();
                let named = args.first().is_some_and(|a| {
                    a.chars().all(|c| c.is_ascii_lowercase() || c == '-') && !a.starts_with('-')
                });
                if !named || args[0] == "cync-mitm" {
                    continue;
                }
                let out = Command::new(env!("CARGO_BIN_EXE_cync-mitm"))
                    .args(&args)
                    .arg("--help")
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{file}: `cync-mitm {}` does not parse: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                );
                counted[2] += 1;
            }
        }
        // `$ADMIN/path` must be a route.
        let mut rest = text.as_str();
        while let Some(i) = rest.find("$ADMIN/") {
            let tail = &rest[i + "$ADMIN".len()..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '/' || c == '_'))
                .unwrap_or(tail.len());
            let path = &tail[..end];
            rest = &tail[end..];
            if path == "/" {
                continue;
            }
            assert!(
                admin.contains(&format!("\"{path}\"")),
                "{file}: {path} is not an admin endpoint"
            );
            counted[3] += 1;
        }
        // Dotted options in code spans (`section.key`) must be real keys.
        let mut rest = text.as_str();
        while let Some(i) = rest.find('`') {
            let tail = &rest[i + 1..];
            let Some(end) = tail.find('`') else { break };
            let span = &tail[..end];
            rest = &tail[end + 1..];
            let key = span.split([' ', '=']).next().unwrap_or("");
            let Some((section, field)) = key.split_once('.') else {
                continue;
            };
            if !sections.contains(section)
                || !field.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            {
                continue;
            }
            assert!(
                keys.contains(key),
                "{file}: option {key} is not one `config show` prints"
            );
            counted[4] += 1;
        }
    }
    // The runbooks do name these things: the checks above ran on something.
    assert!(counted[0] >= 30, "metrics: {counted:?}");
    assert!(counted[1] >= 12, "alerts: {counted:?}");
    assert!(counted[2] >= 15, "commands: {counted:?}");
    assert!(counted[3] >= 10, "endpoints: {counted:?}");
    assert!(counted[4] >= 30, "options: {counted:?}");
}
