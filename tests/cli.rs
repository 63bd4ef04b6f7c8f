//! The `cync-mitm decode` command, run as a real process.

use serde_json::Value;
use std::io::Write;
use std::process::{Command, Stdio};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cync-mitm"))
}

/// Runs the binary with `args`, `input` on its stdin.
fn with_stdin(args: &[&str], input: &[u8]) -> std::process::Output {
    let mut child = bin()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
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
    assert_eq!(v[0]["device_id"], "38e8cf46");
    assert_eq!(v[0]["auth_code"], "1e07d8ce0a617a37");
}

#[test]
fn decodes_stdin_lines_with_several_frames() {
    let out = with_stdin(&["decode", "-"], b"73 00 00 00 13 2d e4 b5 d2 00 02 00 7e 21 00 00 00 f9 d0 01 00 00 d1 7e 7b 00 00 00 07 2d e4 b5 d2 15 37 00\nd3 00 00 00 00 d8 00\n");
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
fn absurd_simulator_sizes_are_refused() {
    for args in [
        vec!["sim", "devices", "--count", "4000000000"],
        vec!["sim", "devices", "--count", "0"],
        vec!["sim", "devices", "--heartbeat", "1ns"],
        vec!["sim", "devices", "--heartbeat", "400d"],
    ] {
        let out = bin().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
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

#[test]
fn absurd_chaos_periods_in_the_simulator_are_refused_not_panics() {
    for args in [
        vec!["sim", "cloud", "--restart-every", "0s"],
        vec!["sim", "cloud", "--restart-every", "1ns"],
        vec!["sim", "cloud", "--restart-every", "500000000000y"],
        vec!["sim", "cloud", "--stop-reading-after", "500000000000y"],
        vec!["sim", "cloud", "--drift", "2"],
        vec!["sim", "cloud", "--command-interval", "500000000000y"],
        vec!["sim", "cloud", "--report-every", "500000000000y"],
        vec!["sim", "devices", "--report-every", "500000000000y"],
    ] {
        let out = bin().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

const HANDSHAKE: &str =
    "23 00 00 00 1a 03 38 e8 cf 46 00 10 31 65 30 37 64 38 63 65 30 61 36 31 37 61 33 37 00 00 3c";

#[test]
fn decode_takes_options_after_the_hex_and_0x_prefixes() {
    // Options after the hex are options, not more hex.
    let out = bin()
        .args(["decode", HANDSHAKE, "--with-hex", "--max-frame", "64"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json_lines(&out.stdout);
    assert_eq!(v.len(), 1);
    assert_eq!(v[0]["device_id"], "38e8cf46");
    assert_eq!(v[0]["hex"], HANDSHAKE.replace(' ', ""));
    // 0x prefixes and commas, as copied from C arrays or Wireshark.
    let c_array: Vec<String> = HANDSHAKE.split(' ').map(|b| format!("0x{b}")).collect();
    let out = bin()
        .arg("decode")
        .arg(c_array.join(", "))
        .args(["--format", "table"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("handshake") && s.contains("38e8cf46"), "{s}");
    // `-` then an option reads stdin and applies the option.
    let out = with_stdin(
        &["decode", "-", "--with-hex"],
        b"0xd3 0x00 0x00 0x00 0x00\n",
    );
    assert!(out.status.success());
    let v = json_lines(&out.stdout);
    assert_eq!(v[0]["name"], "ping");
    assert_eq!(v[0]["hex"], "d300000000");
}

#[test]
fn ids_print_as_hex_everywhere() {
    // 0x7b carries the device id in its envelope; 0x13 the app user.
    let out = bin()
        .args(["decode", "7b 00 00 00 07 2d e4 b5 d2 15 37 00"])
        .output()
        .unwrap();
    let v = json_lines(&out.stdout);
    assert_eq!(v[0]["id"], "2de4b5d2");
    let login = cync_mitm::codec::Frame::login(0x0102_0a0b, b"secret", 30)
        .encode()
        .unwrap();
    let out = bin()
        .args(["decode", &cync_mitm::hexutil::to_hex(&login)])
        .output()
        .unwrap();
    let v = json_lines(&out.stdout);
    assert_eq!(v[0]["user_id"], "01020a0b", "{v:?}");
}

/// The subcommand names listed under "Commands:" in a help text (without `help`).
fn subcommands(help: &str) -> Vec<String> {
    help.split_once("Commands:")
        .map(|(_, rest)| rest)
        .unwrap_or("")
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_command_and_subcommand_help_has_an_example() {
    // Walk the whole command tree from the top-level help, so a new command cannot be missed.
    let mut todo = vec![Vec::<String>::new()];
    let mut seen = 0;
    while let Some(cmd) = todo.pop() {
        let out = bin().args(&cmd).arg("--help").output().unwrap();
        assert!(out.status.success(), "{cmd:?}");
        let help = String::from_utf8_lossy(&out.stdout).to_string();
        let example = help
            .split_once("Example")
            .map(|(_, rest)| rest)
            .unwrap_or_else(|| panic!("{cmd:?} --help has no example:\n{help}"));
        let prefix = if cmd.is_empty() {
            "cync-mitm ".to_owned()
        } else {
            format!("cync-mitm {}", cmd.join(" "))
        };
        assert!(
            example.contains(&prefix),
            "{cmd:?}: the example runs the command itself:\n{help}"
        );
        seen += 1;
        for sub in subcommands(&help) {
            let mut next = cmd.clone();
            next.push(sub);
            todo.push(next);
        }
    }
    assert!(seen >= 19, "only {seen} commands found");
}

#[test]
fn certs_init_reads_the_cert_dir_of_the_config() {
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("c.toml");
    let dir = d.path().join("my-certs");
    std::fs::write(&cfg, format!("[tls]\ncert_dir = \"{}\"\n", dir.display())).unwrap();
    let out = bin()
        .args(["certs", "init", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.join("ca.pem").exists() && dir.join("server-rsa-key.pem").exists());
    // --dir wins over the file's.
    let other = d.path().join("other");
    let out = bin()
        .args(["certs", "init", "--config"])
        .arg(&cfg)
        .arg("--dir")
        .arg(&other)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(std::fs::read_dir(&other).unwrap().count(), 6);
    // An invalid config file: exit 64, nothing minted.
    std::fs::write(&cfg, "[tls]\ncert_dirr = \"x\"\n").unwrap();
    let out = bin()
        .args(["certs", "init", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn config_show_applies_the_environment_and_comments_unset_keys() {
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("c.toml");
    std::fs::write(&cfg, "[routing]\nmode = \"shadow\"\ncanary_percent = 1\n").unwrap();
    let out = bin()
        .args(["config", "show"])
        .arg(&cfg)
        .env("CANARY_PERCENTAGE", "42.5")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("canary_percent = 42.5"), "{text}");
    assert!(
        text.contains("# from the environment: routing.canary_percent = 42.5"),
        "{text}"
    );
    assert!(text.contains("# sni = "), "{text}");
    assert!(text.contains("# keylog_file = "), "{text}");
    // What it prints is a valid file that gives the same configuration.
    let back = d.path().join("back.toml");
    std::fs::write(&back, text.as_bytes()).unwrap();
    let c = cync_mitm::config::Config::load(&back).unwrap();
    assert_eq!(c.routing.canary_percent, 42.5);
    // A bad environment value is a configuration error.
    let out = bin()
        .args(["config", "show"])
        .arg(&cfg)
        .env("CANARY_PERCENTAGE", "lots")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn canary_set_says_when_the_percentage_does_nothing() {
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("c.toml");
    std::fs::write(&cfg, "[routing]\nmode = \"legacy_only\"\n").unwrap();
    let out = bin()
        .args(["canary", "set", "10", "--config"])
        .arg(&cfg)
        .env_remove("CANARY_PERCENTAGE")
        .env_remove("DARK_LAUNCH")
        .output()
        .unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("legacy_only"), "{err}");
    std::fs::write(
        &cfg,
        "[routing]\nmode = \"new_primary\"\n[new_path]\naddresses = [\"127.0.0.1:9\"]\nverify = false\n",
    )
    .unwrap();
    let out = bin()
        .args(["canary", "set", "10", "--config"])
        .arg(&cfg)
        .env_remove("DARK_LAUNCH")
        .env("CANARY_PERCENTAGE", "3")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("legacy_only"), "{err}");
    assert!(err.contains("CANARY_PERCENTAGE=3"), "{err}");
    // new_primary without the variable: the percentage matters, nothing to say.
    let out = bin()
        .args(["canary", "set", "20", "--config"])
        .arg(&cfg)
        .env_remove("DARK_LAUNCH")
        .env_remove("CANARY_PERCENTAGE")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
