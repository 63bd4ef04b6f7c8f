//! docs/metrics.md against the `/metrics` of a freshly started proxy: every documented family
//! is exported before any traffic, and every exported family is documented.

use std::collections::BTreeSet;
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
             [admin]\nlisten = \"127.0.0.1:0\"\n[tls]\ncert_dir = \"{}\"\n",
            dir.path().join("certs").display()
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
    // Every close reason is there from the start.
    for r in cync_mitm::metrics::CLOSE_REASONS {
        assert!(
            text.contains(&format!(
                "cync_mitm_connections_closed_total{{reason=\"{r}\"}} 0"
            )),
            "close reason {r} missing"
        );
    }
}
