//! `cync-mitm capture read FILE` (the decoded frames of a capture, per stream and direction) and
//! `cync-mitm fixtures extract FILE --out DIR` (fixtures the codec tests load).

use crate::capture::read::{CapturedFrame, ReadError};
use crate::codec::view::{frame_json, summarize};
use crate::hexutil::to_hex;
use serde_json::{Value, json};
use std::collections::HashSet;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Output format of `capture read`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per frame.
    Json,
    /// A readable table.
    Table,
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The capture could not be read.
    #[error("{path}: {source}")]
    Read {
        /// File.
        path: String,
        /// Error.
        source: ReadError,
    },
    /// Writing failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

fn direction(f: &CapturedFrame) -> &'static str {
    if f.from_client {
        "client_to_server"
    } else {
        "server_to_client"
    }
}

fn frame_line(f: &CapturedFrame) -> Value {
    let mut head = json!({
        "stream": f.stream,
        "direction": direction(f),
        "client": f.client.to_string(),
        "server": f.server.to_string(),
        "time": f.time.as_secs_f64(),
    });
    if let (Some(i), Value::Object(h)) = (&f.interface, &mut head) {
        h.insert("interface".into(), json!(i));
    }
    let body = if f.is_frame {
        frame_json(&f.bytes)
    } else {
        json!({"unframed": f.bytes.len(), "hex": to_hex(&f.bytes)})
    };
    if let (Value::Object(h), Value::Object(b)) = (&mut head, body) {
        h.extend(b);
    }
    head
}

fn load(path: &Path) -> Result<Vec<CapturedFrame>, Error> {
    let c = crate::capture::read::read_capture(path).map_err(|source| Error::Read {
        path: path.display().to_string(),
        source,
    })?;
    if c.truncated {
        eprintln!(
            "{}: the capture ends inside a block (still being written, or cut short); read up to there",
            path.display()
        );
    }
    Ok(c.frames)
}

/// `capture read`.
pub fn read(
    path: &Path,
    format: Format,
    stream: Option<usize>,
    out: &mut impl Write,
) -> Result<(), Error> {
    let frames = load(path)?;
    let shown: Vec<&CapturedFrame> = frames
        .iter()
        .filter(|f| stream.is_none_or(|s| s == f.stream))
        .collect();
    if format == Format::Table {
        let mut listed = HashSet::new();
        writeln!(out, "streams:")?;
        for f in &shown {
            if listed.insert(f.stream) {
                writeln!(
                    out,
                    "  #{:<3} {} -> {}{}",
                    f.stream,
                    f.client,
                    f.server,
                    f.interface
                        .as_deref()
                        .map(|i| format!("  [{i}]"))
                        .unwrap_or_default()
                )?;
            }
        }
        writeln!(out, "{:>11}  {:<4} dir  frame", "+seconds", "#")?;
    }
    let t0 = shown
        .iter()
        .map(|f| f.time)
        .filter(|t| !t.is_zero())
        .min()
        .unwrap_or_default();
    for f in shown {
        match format {
            Format::Json => writeln!(out, "{}", frame_line(f))?,
            Format::Table => {
                let arrow = if f.from_client { ">" } else { "<" };
                let text = if f.is_frame {
                    summarize(&f.bytes).to_string()
                } else {
                    format!("{} bytes that are not a frame", f.bytes.len())
                };
                let rel = f.time.saturating_sub(t0).as_secs_f64();
                writeln!(out, "{rel:>11.6}  #{:<3}  {arrow}   {text}", f.stream)?;
            }
        }
    }
    out.flush()?;
    Ok(())
}

/// `fixtures extract`: writes `<out>/<name>.json` with every distinct frame of the capture and
/// the fields it decodes to now. Returns the file written and the number of vectors.
pub fn extract(path: &Path, out_dir: &Path, name: Option<&str>) -> Result<(PathBuf, usize), Error> {
    let frames = load(path)?;
    let stem = name.map(str::to_owned).unwrap_or_else(|| {
        path.file_stem().map_or_else(
            || "capture".to_owned(),
            |s| s.to_string_lossy().into_owned(),
        )
    });
    let source = path
        .file_name()
        .map_or_else(String::new, |f| f.to_string_lossy().into_owned());
    let mut seen = HashSet::new();
    let mut vectors = Vec::new();
    for f in frames.iter().filter(|f| f.is_frame) {
        if !seen.insert(f.bytes.clone()) {
            continue;
        }
        let decoded = frame_json(&f.bytes);
        let what = format!(
            "{} {}",
            decoded["type"].as_str().unwrap_or("?"),
            decoded["name"].as_str().unwrap_or("?")
        );
        vectors.push(json!({
            "name": format!("{stem}-{:04}", vectors.len() + 1),
            "description": format!("{what}, {} of stream {} at {:.6} s", direction(f), f.stream, f.time.as_secs_f64()),
            "source": source,
            "hex": to_hex(&f.bytes),
            "frames": [decoded],
        }));
    }
    let doc = json!({
        "schema": "cync-mitm fixtures v1",
        "origin": format!("cync-mitm fixtures extract {source}; expected fields are what the decoder said at extraction"),
        "vectors": vectors,
    });
    std::fs::create_dir_all(out_dir)?;
    let file = out_dir.join(format!("{stem}.json"));
    let mut text = serde_json::to_string_pretty(&doc).map_err(io::Error::other)?;
    text.push('\n');
    std::fs::write(&file, text)?;
    Ok((file, vectors.len()))
}
