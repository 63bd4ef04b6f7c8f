//! Running the real tshark from tests.

use std::path::Path;
use std::process::Command;

/// Whether tshark can run; in CI (CI=true) its absence fails the test instead.
pub fn have_tshark() -> bool {
    have_tool("tshark", "--version")
}

/// Whether `tool` runs (`tool arg` exits 0); in CI (CI=true) its absence fails the test, so a
/// test judged by an external tool never passes there without it. `.ci/run` installs them.
pub fn have_tool(tool: &str, arg: &str) -> bool {
    let ok = Command::new(tool)
        .arg(arg)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok && std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{tool} is required in CI (.ci/run installs it)");
    }
    if !ok {
        eprintln!("skipped: {tool} not installed");
    }
    ok
}

/// Runs tshark and returns its stdout; panics with its stderr on failure.
pub fn tshark(args: &[&str]) -> String {
    let out = Command::new("tshark").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "tshark {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `follow,<proto>,raw` of stream `n`: (client→server bytes, server→client bytes).
pub fn follow(file: &Path, proto: &str, n: usize, extra: &[&str]) -> (Vec<u8>, Vec<u8>) {
    let z = format!("follow,{proto},raw,{n}");
    let mut args = vec!["-r", file.to_str().unwrap(), "-q", "-z", &z];
    args.extend_from_slice(extra);
    let out = tshark(&args);
    let (mut c, mut s) = (Vec::new(), Vec::new());
    let mut body = false;
    for line in out.lines() {
        if line.starts_with("Node 1:") {
            body = true;
            continue;
        }
        if !body || line.starts_with("====") || line.trim().is_empty() {
            continue;
        }
        let (target, hex) = match line.strip_prefix('\t') {
            Some(h) => (&mut s, h),
            None => (&mut c, line),
        };
        target.extend(cync_mitm::hexutil::parse_hex(hex.trim()).unwrap());
    }
    (c, s)
}
