//! The Wireshark Lua dissector (deploy/wireshark/cync.lua) run by the real tshark, and the
//! `capture read` / `fixtures extract` commands, on the committed synthetic sample and on a
//! capture with frames split across and coalesced within TCP segments.

mod common;

use common::tshark::{have_tshark, tshark};
use cync_mitm::capture::tcp::TcpLeg;
use cync_mitm::hexutil::parse_hex;
use pcap_file::DataLink;
use pcap_file::pcapng::PcapNgWriter;
use pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketBlock;
use pcap_file::pcapng::blocks::interface_description::{
    InterfaceDescriptionBlock, InterfaceDescriptionOption,
};
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn sample() -> PathBuf {
    root().join("fixtures/captures/sample-device.pcapng")
}

fn lua() -> String {
    format!(
        "lua_script:{}",
        root().join("deploy/wireshark/cync.lua").display()
    )
}

fn fields(file: &Path, filter: &str, names: &[&str]) -> Vec<Vec<String>> {
    let lua = lua();
    let f = file.to_str().unwrap();
    let mut args = vec!["-X", &lua, "-r", f, "-Y", filter, "-T", "fields"];
    for n in names {
        args.push("-e");
        args.push(n);
    }
    tshark(&args)
        .lines()
        .map(|l| l.split('\t').map(str::to_owned).collect())
        .collect()
}

#[test]
fn dissector_decodes_the_committed_sample() {
    if !have_tshark() {
        return;
    }
    let s = sample();
    let hs = fields(
        &s,
        "cync.type == 0x23",
        &[
            "cync.device_id",
            "cync.auth_code",
            "cync.type_name",
            "cync.device",
        ],
    );
    assert_eq!(hs.len(), 2, "one handshake per leg: {hs:?}");
    assert_eq!(
        hs[0],
        vec!["0x49300000", "****************", "handshake", "49300000"]
    );
    let cmds = fields(
        &s,
        "cync.inner.dir == 0xf8",
        &[
            "cync.inner.opcode",
            "cync.power",
            "cync.mesh_id",
            "cync.inner.checksum_status",
        ],
    );
    assert!(cmds.len() >= 4, "{cmds:?}");
    assert!(cmds.iter().all(|c| c[3] == "good"));
    assert!(
        cmds.iter()
            .any(|c| c[0] == "0xd0" && c[1] == "1" && c[2] == "1")
    );
    // Status announcements: the dissector agrees with the Rust decoder, announcement by announcement.
    let st = fields(
        &s,
        "cync.inner.opcode == 0xdb",
        &[
            "cync.power",
            "cync.brightness",
            "cync.color_temp",
            "cync.mesh_id",
        ],
    );
    let read = Command::new(env!("CARGO_BIN_EXE_cync-mitm"))
        .args(["capture", "read"])
        .arg(&s)
        .output()
        .unwrap();
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&read.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .collect();
    // The capture time stays a number on every line (a time answer's clock has its own key).
    assert!(lines.iter().all(|v| v["time"].is_f64()));
    assert!(
        lines
            .iter()
            .any(|v| v["name"] == "time_answer" && v["clock"]["utc_offset"] == "-06:00")
    );
    let ours: Vec<Vec<String>> = lines
        .iter()
        .filter(|v| v["inner"]["opcode"] == "0xdb")
        .map(|v| {
            let s = &v["inner"]["status"];
            vec![
                if s["on"] == true { "1" } else { "0" }.to_owned(),
                s["brightness"].to_string(),
                s["color_temp"].to_string(),
                s["mesh_id"].to_string(),
            ]
        })
        .collect();
    assert!(ours.len() >= 4);
    assert_eq!(st, ours);
    let all = fields(&s, "cync", &["cync.type"]);
    let n_frames = Command::new(env!("CARGO_BIN_EXE_cync-mitm"))
        .args(["capture", "read"])
        .arg(&s)
        .output()
        .unwrap()
        .stdout
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .count();
    let dissected: usize = all.iter().map(|r| r[0].split(',').count()).sum();
    assert_eq!(
        dissected, n_frames,
        "the dissector and `capture read` see the same frames"
    );
}

fn write_capture(path: &Path, segments: &[(bool, Vec<u8>)]) {
    let file = std::fs::File::create(path).unwrap();
    let mut w = PcapNgWriter::new(file).unwrap();
    w.write_pcapng_block(InterfaceDescriptionBlock {
        linktype: DataLink::RAW,
        snaplen: 0,
        options: vec![InterfaceDescriptionOption::IfTsResol(9)],
    })
    .unwrap();
    let mut leg = TcpLeg::new(
        "192.0.2.10:40000".parse().unwrap(),
        "192.0.2.1:23779".parse().unwrap(),
        1,
    );
    let mut packets = leg.open();
    for (from_client, bytes) in segments {
        packets.extend(leg.data(*from_client, bytes));
    }
    packets.extend(leg.fin(true));
    for (i, p) in packets.into_iter().enumerate() {
        let len = p.data.len() as u32;
        w.write_pcapng_block(EnhancedPacketBlock {
            interface_id: 0,
            timestamp: Duration::from_millis(1_700_000_000_000 + i as u64),
            original_len: len,
            data: Cow::Owned(p.data),
            options: vec![],
        })
        .unwrap();
    }
}

#[test]
fn dissector_reassembles_split_frames_and_splits_coalesced_ones() {
    if !have_tshark() {
        return;
    }
    let h = |s: &str| parse_hex(s).unwrap();
    let v19 = h(
        "73 00 00 00 1f 37 96 24 69 15 37 00 7e 21 00 00 00 f8 d0 0d 00 21 00 00 00 00 05 00 d0 11 02 01 00 00 e7 7e",
    );
    let v21 = h(
        "73 00 00 00 13 2d e4 b5 d2 00 02 00 7e 21 00 00 00 f9 d0 01 00 00 d1 7e 7b 00 00 00 07 2d e4 b5 d2 15 37 00",
    );
    let bad = h("73 00 00 00 13 2d e4 b5 d2 00 03 00 7e 22 00 00 00 f9 d0 01 00 00 55 7e");
    let v46 = h("730000002000005ba00001007e01010000f8d00d0001010000007d5e00d01102010000417e");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("split.pcapng");
    write_capture(
        &file,
        &[
            (false, v19[..9].to_vec()),
            (false, v19[9..].to_vec()),
            (true, v21.clone()),
            (true, bad.clone()),
            (false, v46.clone()),
        ],
    );
    let rows = fields(
        &file,
        "cync",
        &[
            "cync.type",
            "cync.inner.opcode",
            "cync.power",
            "cync.mesh_id",
            "cync.inner.checksum_status",
        ],
    );
    // Split V19 decodes once, from the second segment; V21 yields two PDUs in one packet.
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert_eq!(rows[0], vec!["0x73", "0xd0", "1", "5", "good"]);
    assert_eq!(rows[1][0], "0x73,0x7b", "{rows:?}");
    assert_eq!(rows[2][4], "bad");
    // V46: the mesh id 0x7e travels escaped as 7d 5e.
    assert_eq!(rows[3], vec!["0x73", "0xd0", "1", "126", "good"]);
    let experts = tshark(&[
        "-X",
        &lua(),
        "-r",
        file.to_str().unwrap(),
        "-Y",
        "cync.checksum_bad",
    ]);
    assert_eq!(experts.lines().count(), 1);

    // `capture read` agrees, in order.
    let out = Command::new(env!("CARGO_BIN_EXE_cync-mitm"))
        .args(["capture", "read"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let names: Vec<&str> = lines.iter().map(|l| l["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["pipe", "pipe", "pipe_ack", "pipe", "pipe"]);
    assert_eq!(lines[0]["direction"], "server_to_client");
    assert_eq!(lines[1]["direction"], "client_to_server");
    assert_eq!(lines[0]["inner"]["command"]["kind"], "power");
    assert_eq!(lines[3]["inner"]["checksum_ok"], false);
}

#[test]
fn fixtures_extract_reproduces_the_committed_fixture() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cync-mitm"))
        .args(["fixtures", "extract"])
        .arg(sample())
        .arg("--out")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let made: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("sample-device.json")).unwrap())
            .unwrap();
    let committed: serde_json::Value = serde_json::from_slice(
        &std::fs::read(root().join("fixtures/captures/sample-device.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(made, committed);
    let vectors = made["vectors"].as_array().unwrap();
    let mut hexes: Vec<&str> = vectors.iter().map(|v| v["hex"].as_str().unwrap()).collect();
    let n = hexes.len();
    hexes.sort();
    hexes.dedup();
    assert_eq!(hexes.len(), n, "identical frames are de-duplicated");
    assert!(n > 20);
    // Auth codes stay redacted in fixtures made from redacted captures.
    assert!(
        vectors
            .iter()
            .any(|v| v["frames"][0]["auth_code"] == "****************")
    );
}
