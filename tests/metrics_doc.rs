//! docs/metrics.md against the `/metrics` of a freshly started proxy: every documented family
//! is exported before any traffic, and every exported family is documented.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

fn documented() -> (BTreeSet<String>, BTreeSet<String>) {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics.md")).unwrap();
    let (mut always, mut optional) = (BTreeSet::new(), BTreeSet::new());
    let mut in_optional = false;
    for line in doc.lines() {
        if line.starts_with("## ") {
            in_optional = line.trim() == "## Optional";
        }
        let Some(rest) = line.strip_prefix("| `") else {
            continue;
        };
        let name = rest.split('`').next().unwrap_or_default();
        if name.starts_with('/') || !name.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
            continue;
        }
        if !(name.starts_with("cync_mitm_")
            || name.starts_with("tcp_comm_")
            || name.starts_with("process_"))
        {
            continue;
        }
        if in_optional {
            optional.insert(name.to_owned());
        } else {
            always.insert(name.to_owned());
        }
    }
    (always, optional)
}

/// A documented label: its name and, when the page lists them all, its values.
#[derive(Debug)]
struct DocLabel {
    name: String,
    values: Option<BTreeSet<String>>,
}

/// The labels column of every documented family: names in backticks at the top level, values
/// in backticks inside the parentheses after a name. A list with `…`, "such as", "see" or
/// "or" is open (not every value is named).
fn documented_labels() -> BTreeMap<String, Vec<DocLabel>> {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics.md")).unwrap();
    let mut out = BTreeMap::new();
    for line in doc.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 4 {
            continue;
        }
        let Some(name) = cells[1].strip_prefix('`').and_then(|r| r.split('`').next()) else {
            continue;
        };
        if !(name.starts_with("cync_mitm_")
            || name.starts_with("tcp_comm_")
            || name.starts_with("process_"))
        {
            continue;
        }
        let col = cells[2];
        let mut labels: Vec<DocLabel> = Vec::new();
        let (mut depth, mut in_tick, mut token, mut paren) =
            (0, false, String::new(), String::new());
        for c in col.chars() {
            match c {
                '`' if in_tick => {
                    in_tick = false;
                    if depth == 0 {
                        labels.push(DocLabel {
                            name: std::mem::take(&mut token),
                            values: None,
                        });
                    } else if let Some(l) = labels.last_mut() {
                        l.values
                            .get_or_insert_with(BTreeSet::new)
                            .insert(std::mem::take(&mut token));
                    }
                }
                '`' => in_tick = true,
                _ if in_tick => token.push(c),
                '(' => {
                    depth += 1;
                    paren.clear();
                }
                ')' => {
                    depth -= 1;
                    let open = paren.contains('…')
                        || paren.contains("such as")
                        || paren.contains("see")
                        || paren.contains(" or ");
                    if open && let Some(l) = labels.last_mut() {
                        l.values = None;
                    }
                }
                _ if depth > 0 => paren.push(c),
                _ => {}
            }
        }
        out.insert(name.to_owned(), labels);
    }
    out
}

/// Label names and values of every series of `family` in `text` (`le` and `quantile` aside).
fn exported_labels(text: &str, family: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(family) else {
            continue;
        };
        let rest = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| rest.strip_prefix(s))
            .unwrap_or(rest);
        let Some(body) = rest
            .strip_prefix('{')
            .and_then(|r| r.split_once('}'))
            .map(|x| x.0)
        else {
            continue;
        };
        for pair in body.split("\",") {
            let Some((k, v)) = pair.split_once("=\"") else {
                continue;
            };
            if k == "le" || k == "quantile" {
                continue;
            }
            out.entry(k.to_owned())
                .or_default()
                .insert(v.trim_end_matches('"').to_owned());
        }
    }
    out
}

#[test]
fn docs_and_a_fresh_proxy_export_the_same_families() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("proxy.toml");
    // Nothing behind the upstream port: no traffic leaves the machine.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let up = l.local_addr().unwrap();
    drop(l);
    std::fs::write(
        &cfg,
        format!(
            "[listen]\ntls = \"127.0.0.1:0\"\n[upstream]\naddresses = [\"{up}\"]\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n[tls]\ncert_dir = \"{}\"\n\
             [slo]\nstate_file = \"{}\"\n",
            dir.path().join("certs").display(),
            dir.path().join("slo/state.json").display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cync-mitm"))
        .args(["run", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut admin = None;
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        if line.contains("listening") {
            let start = line.find("admin=").unwrap() + 6;
            admin = line[start..].split_whitespace().next().map(str::to_owned);
            break;
        }
    }
    let admin = admin.expect("no listening line");
    std::thread::sleep(Duration::from_millis(200));
    let mut s = std::net::TcpStream::connect(&admin).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let _ = child.kill();
    let _ = child.wait();

    let mut exported = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            exported.insert(rest.split(' ').next().unwrap().to_owned());
        }
    }
    // Every family has a HELP line and at least one series.
    for f in &exported {
        assert!(text.contains(&format!("# HELP {f} ")), "{f} has no HELP");
        assert!(
            text.lines()
                .any(|l| l.starts_with(f.as_str()) && !l.starts_with('#')),
            "{f} has no series in a fresh process"
        );
    }
    let (always, optional) = documented();
    let missing: Vec<_> = always.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "documented but not exported: {missing:?}"
    );
    let undocumented: Vec<_> = exported
        .iter()
        .filter(|f| !always.contains(*f) && !optional.contains(*f))
        .collect();
    assert!(
        undocumented.is_empty(),
        "exported but not documented: {undocumented:?}"
    );
    // One prefix: ours, the rollout plan's, or the standard process metrics.
    for f in &exported {
        assert!(
            f.starts_with("cync_mitm_") || f.starts_with("tcp_comm_") || f.starts_with("process_"),
            "{f}: unexpected prefix"
        );
    }
    // Every close reason is there from the start, on both transports.
    for r in cync_mitm::metrics::CLOSE_REASONS {
        for t in ["legacy", "new"] {
            assert!(
                text.contains(&format!(
                    "cync_mitm_connections_closed_total{{reason=\"{r}\",transport=\"{t}\"}} 0"
                )),
                "close reason {r} on {t} missing"
            );
        }
    }
    // The labels match the page: the same names, and where the page lists every value, the
    // same values (all present from the start, as zero series).
    let docs = documented_labels();
    for f in &exported {
        let Some(doc) = docs.get(f) else { continue };
        let got = exported_labels(&text, f);
        let doc_names: BTreeSet<&str> = doc.iter().map(|l| l.name.as_str()).collect();
        let got_names: BTreeSet<&str> = got.keys().map(String::as_str).collect();
        if f == "cync_mitm_upstream_up" && got_names.is_empty() {
            continue; // no address tracked before the first probe finishes
        }
        assert_eq!(
            doc_names, got_names,
            "{f}: documented vs exported label names"
        );
        for l in doc {
            if let (Some(want), Some(have)) = (&l.values, got.get(&l.name)) {
                // Nothing undocumented is exported.
                assert!(
                    have.is_subset(want),
                    "{f}{{{}}}: exported {have:?}, documented {want:?}",
                    l.name
                );
                // And every documented value is there from the start, except where the values
                // depend on the configuration (a path's gauges need its addresses).
                if f != "cync_mitm_upstream_up" {
                    assert_eq!(
                        want, have,
                        "{f}{{{}}}: documented vs exported values",
                        l.name
                    );
                }
            }
        }
    }
}
