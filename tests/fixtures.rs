//! Every committed fixture vector (the reference's V1–V50 and N1/N2, and any extracted fixtures)
//! decodes to its documented fields, and every frame that decodes re-encodes to the same bytes.

mod common;

use bytes::Bytes;
use cync_mitm::cmd::decode::{Options, decode_stream};
use cync_mitm::codec::{Frame, Framer, FramerEvent};
use cync_mitm::hexutil::parse_hex;
use serde_json::Value;

#[test]
fn all_vectors_decode_to_documented_fields() {
    let vectors = common::load_vectors();
    assert!(vectors.len() >= 52, "only {} vectors found", vectors.len());
    let mut failures = Vec::new();
    for v in &vectors {
        let bytes = parse_hex(&v.hex).unwrap_or_else(|e| panic!("{}: {e}", v.name));
        let items = decode_stream(&bytes, &Options::default());
        let (rest, frames): (Vec<Value>, Vec<Value>) = items
            .into_iter()
            .partition(|i| i.get("incomplete").is_some());
        let incomplete = rest
            .first()
            .and_then(|r| r["incomplete"].as_u64())
            .unwrap_or(0);
        let mut errs = Vec::new();
        if incomplete != v.incomplete {
            errs.push(format!(
                "incomplete: expected {}, got {incomplete}",
                v.incomplete
            ));
        }
        common::subset(
            "frames",
            &Value::Array(v.frames.clone()),
            &Value::Array(frames),
            &mut errs,
        );
        if !errs.is_empty() {
            failures.push(format!(
                "{} ({}):\n  {}",
                v.name,
                v.file.display(),
                errs.join("\n  ")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn reference_has_every_vector() {
    let names: Vec<String> = common::load_vectors().into_iter().map(|v| v.name).collect();
    for i in 1..=50 {
        assert!(names.contains(&format!("V{i}")), "V{i} missing");
    }
    assert!(names.contains(&"N1".to_owned()) && names.contains(&"N2".to_owned()));
}

#[test]
fn decodable_frames_re_encode_byte_exact() {
    for v in common::load_vectors() {
        let bytes = parse_hex(&v.hex).unwrap();
        let mut framer = Framer::default();
        for ev in framer.feed(&bytes) {
            if let FramerEvent::Frame(raw) = ev
                && let Ok(f) = Frame::decode(raw.bytes())
            {
                let again = f.encode().unwrap();
                assert_eq!(Bytes::from(again), raw.bytes().clone(), "{}", v.name);
            }
        }
    }
}

#[test]
fn the_matcher_can_fail() {
    let mut errs = Vec::new();
    let actual: Value = serde_json::json!({"a": 1, "b": {"c": [1, 2]}, "error": "inner frame: x"});
    common::subset("t", &serde_json::json!({"a": 2}), &actual, &mut errs);
    common::subset(
        "t",
        &serde_json::json!({"b": {"c": [1]}}),
        &actual,
        &mut errs,
    );
    common::subset(
        "t",
        &serde_json::json!({"$absent": ["a"]}),
        &actual,
        &mut errs,
    );
    common::subset(
        "t",
        &serde_json::json!({"error": "outer"}),
        &actual,
        &mut errs,
    );
    common::subset("t", &serde_json::json!({"z": 1}), &actual, &mut errs);
    assert_eq!(errs.len(), 5, "{errs:?}");
    errs.clear();
    common::subset(
        "t",
        &serde_json::json!({"a": 1, "b": {"c": [1, 2]}, "error": "inner"}),
        &actual,
        &mut errs,
    );
    assert!(errs.is_empty(), "{errs:?}");
}
