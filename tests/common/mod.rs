//! Helpers shared by the integration tests: fixture loading and subset matching of decoded JSON.

#![allow(dead_code)]

pub mod harness;
pub mod tshark;

use serde_json::Value;
use std::path::{Path, PathBuf};

/// One fixture vector: hex bytes and the fields its frames must decode to.
#[derive(Debug)]
pub struct Vector {
    pub file: PathBuf,
    pub name: String,
    pub hex: String,
    pub frames: Vec<Value>,
    pub incomplete: u64,
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(&p, out);
        } else if p.extension().is_some_and(|x| x == "json") {
            out.push(p);
        }
    }
}

/// Every vector in every `fixtures/**/*.json` file that has a `vectors` array.
pub fn load_vectors() -> Vec<Vector> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let mut files = Vec::new();
    walk(&root, &mut files);
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let doc: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let Some(vs) = doc["vectors"].as_array() else {
            continue;
        };
        for v in vs {
            out.push(Vector {
                file: f.clone(),
                name: v["name"].as_str().unwrap().to_owned(),
                hex: v["hex"].as_str().unwrap().to_owned(),
                frames: v["frames"].as_array().unwrap().clone(),
                incomplete: v["incomplete"].as_u64().unwrap_or(0),
            });
        }
    }
    out
}

/// Checks that `actual` contains everything `expected` says, collecting differences.
///
/// Objects match key by key (extra keys in `actual` are fine); `"$absent": [keys]` requires keys to
/// be missing; an expected `error` string must be contained in the actual one; arrays must have
/// the same length and match element by element; anything else must be equal.
pub fn subset(path: &str, expected: &Value, actual: &Value, errs: &mut Vec<String>) {
    match expected {
        Value::Object(exp) => {
            let Some(act) = actual.as_object() else {
                errs.push(format!("{path}: expected an object, got {actual}"));
                return;
            };
            for (k, v) in exp {
                let p = format!("{path}.{k}");
                if k == "$absent" {
                    for key in v.as_array().into_iter().flatten() {
                        let key = key.as_str().unwrap_or_default();
                        if act.contains_key(key) {
                            errs.push(format!("{path}.{key}: should be absent, is {}", act[key]));
                        }
                    }
                    continue;
                }
                match act.get(k) {
                    None => errs.push(format!("{p}: missing (expected {v})")),
                    Some(a) if k == "error" && v.is_string() => {
                        let (e, a_s) = (v.as_str().unwrap(), a.as_str().unwrap_or_default());
                        if !a_s.contains(e) {
                            errs.push(format!("{p}: {a_s:?} does not contain {e:?}"));
                        }
                    }
                    Some(a) => subset(&p, v, a, errs),
                }
            }
        }
        Value::Array(exp) => {
            let Some(act) = actual.as_array() else {
                errs.push(format!("{path}: expected an array, got {actual}"));
                return;
            };
            if exp.len() != act.len() {
                errs.push(format!(
                    "{path}: expected {} items, got {}",
                    exp.len(),
                    act.len()
                ));
                return;
            }
            for (i, (e, a)) in exp.iter().zip(act).enumerate() {
                subset(&format!("{path}[{i}]"), e, a, errs);
            }
        }
        _ => {
            if expected != actual {
                errs.push(format!("{path}: expected {expected}, got {actual}"));
            }
        }
    }
}
