//! The `cync-mitm decode` command, run as a real process.

use serde_json::Value;
use std::io::Write;
use std::process::{Command, Stdio};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cync-mitm"))
}

fn json_lines(out: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

#[test]
fn decodes_arguments_with_spaces() {
    let out = bin()
        .args(["decode", "23 00 00 00 1a 03 38 e8 cf 46 00 10 31 65 30 37 64 38 63 65 30 61 36 31 37 61 33 37 00 00 3c"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v = json_lines(&out.stdout);
    assert_eq!(v.len(), 1);
    assert_eq!(v[0]["type"], "0x23");
    assert_eq!(v[0]["name"], "handshake");
    assert_eq!(v[0]["len"], 26);
    assert_eq!(v[0]["device_id"], 0x38e8cf46u32);
    assert_eq!(v[0]["auth_code"], "1e07d8ce0a617a37");
}

#[test]
fn decodes_stdin_lines_with_several_frames() {
    let mut child = bin()
        .args(["decode", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"73 00 00 00 13 2d e4 b5 d2 00 02 00 7e 21 00 00 00 f9 d0 01 00 00 d1 7e 7b 00 00 00 07 2d e4 b5 d2 15 37 00\nd3 00 00 00 00 d8 00\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let v = json_lines(&out.stdout);
    assert_eq!(v.len(), 4, "{v:?}");
    assert_eq!(v[0]["inner"]["dir"], "response");
    assert_eq!(v[0]["inner"]["checksum_ok"], true);
    assert_eq!(v[1]["name"], "pipe_ack");
    assert_eq!(v[1]["msg"], "153700");
    assert_eq!(v[2]["name"], "ping");
    assert_eq!(v[3]["incomplete"], 2);
}

#[test]
fn bad_hex_exits_2_naming_the_token() {
    let out = bin()
        .args(["decode", "23 00", "xyz", "00"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\"xyz\""), "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn decode_problems_are_error_fields_not_aborts() {
    // N1 (bad inner opener) followed by a good ping.
    let out = bin()
        .args(["decode", "73 00 00 00 1f 45 88 0f 3a 00 10 00 00 7e 10 01 00 00 f8 8e 0c 00 10 01 00 00 00 50 00 f7 11 02 01 01 07 7e d3 00 00 00 00"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v = json_lines(&out.stdout);
    assert_eq!(v.len(), 2);
    assert!(v[0]["error"].as_str().unwrap().contains("opener"));
    assert_eq!(v[1]["name"], "ping");
}

#[test]
fn table_format() {
    let out = bin()
        .args(["decode", "--format", "table", "83 00 00 00 25 37 96 24 69 00 05 00 7e 21 00 00 00 fa db 13 00 34 22 11 05 00 05 00 db 11 02 01 01 64 00 00 00 00 00 00 b3 7e"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("pipe_sync"), "{s}");
    assert!(s.contains("status mesh=5 on bri=100"), "{s}");
}

#[test]
fn zero_periods_in_the_simulators_are_refused_not_panics() {
    for args in [
        vec!["sim", "cloud", "--command-interval", "0s"],
        vec!["sim", "cloud", "--report-every", "0ms"],
        vec!["sim", "devices", "--heartbeat", "0s"],
        vec!["sim", "devices", "--report-every", "0s"],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cync-mitm"))
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("greater than zero"), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}
