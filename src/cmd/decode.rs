//! `cync-mitm decode`: hex in, one JSON object (or table row) per frame out.
//!
//! Each argument list, and each stdin line, is one stream: it is framed by length, so a line may
//! hold several frames; bytes left over that do not make a whole frame print `{"incomplete": N}`.

use crate::codec::view::{frame_json, framer_error_json, summarize};
use crate::codec::{Framer, FramerEvent};
use crate::hexutil::{HexError, parse_hex, to_hex};
use serde_json::{Value, json};
use std::io::{self, BufRead, Write};

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Format {
    /// One JSON object per line.
    #[default]
    Json,
    /// A readable table.
    Table,
}

/// Options of the decode command.
#[derive(Clone, Debug)]
pub struct Options {
    /// Output format.
    pub format: Format,
    /// Largest frame accepted by the framer.
    pub max_frame: usize,
    /// Add the frame's hex as a `hex` field.
    pub with_hex: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            format: Format::Json,
            max_frame: crate::codec::DEFAULT_MAX_FRAME,
            with_hex: false,
        }
    }
}

/// Why the command stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Input that is not hex (exit status 2).
    #[error("{0}")]
    Hex(#[from] HexError),
    /// Reading or writing failed.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
}

/// One decoded item of a stream: a frame, a framing error or the leftover count.
pub fn decode_stream(bytes: &[u8], opts: &Options) -> Vec<Value> {
    let mut framer = Framer::new(opts.max_frame);
    let mut out = Vec::new();
    for ev in framer.feed(bytes) {
        match ev {
            FramerEvent::Frame(raw) => {
                let mut v = frame_json(raw.bytes());
                if let (true, Value::Object(o)) = (opts.with_hex, &mut v) {
                    o.insert("hex".into(), json!(to_hex(raw.bytes())));
                }
                out.push(v);
            }
            FramerEvent::Error(e) => out.push(framer_error_json(&e)),
        }
    }
    if framer.buffered() > 0 {
        out.push(json!({"incomplete": framer.buffered()}));
    }
    out
}

fn table_rows(bytes: &[u8], opts: &Options) -> Vec<String> {
    let mut framer = Framer::new(opts.max_frame);
    let mut rows = Vec::new();
    for ev in framer.feed(bytes) {
        match ev {
            FramerEvent::Frame(raw) => {
                let s = summarize(raw.bytes());
                rows.push(
                    format!(
                        "{:<5} {:<14} {:>5} {:>10} {:<6} {}",
                        s.ptype.to_string(),
                        s.ptype.name(),
                        raw.len(),
                        s.id.map(|i| format!("{i:08x}")).unwrap_or_default(),
                        s.msg.map(|m| m.to_string()).unwrap_or_default(),
                        s.detail
                    )
                    .trim_end()
                    .to_owned(),
                );
            }
            FramerEvent::Error(e) => rows.push(format!("{:<5} framing error: {e}", "-")),
        }
    }
    if framer.buffered() > 0 {
        rows.push(format!(
            "{:<5} incomplete: {} bytes",
            "-",
            framer.buffered()
        ));
    }
    rows
}

fn emit(bytes: &[u8], opts: &Options, out: &mut impl Write) -> io::Result<()> {
    match opts.format {
        Format::Json => {
            for v in decode_stream(bytes, opts) {
                writeln!(out, "{v}")?;
            }
        }
        Format::Table => {
            for r in table_rows(bytes, opts) {
                writeln!(out, "{r}")?;
            }
        }
    }
    Ok(())
}

/// Runs the command. `args` are hex tokens; a lone `-` reads stdin, one stream per line.
pub fn run(
    args: &[String],
    opts: &Options,
    stdin: impl BufRead,
    out: &mut impl Write,
) -> Result<(), Error> {
    if opts.format == Format::Table {
        writeln!(
            out,
            "{:<5} {:<14} {:>5} {:>10} {:<6} DETAIL",
            "TYPE", "NAME", "BYTES", "ID", "MSG"
        )?;
    }
    if args.iter().any(|a| a == "-") {
        for line in stdin.lines() {
            let line = line?;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            emit(&parse_hex(line)?, opts, out)?;
        }
    } else {
        // Check every token before printing anything.
        let bytes = parse_hex(&args.join(" "))?;
        emit(&bytes, opts, out)?;
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_str(args: &[&str], stdin: &str, opts: &Options) -> Result<String, Error> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let mut out = Vec::new();
        run(&args, opts, stdin.as_bytes(), &mut out)?;
        Ok(String::from_utf8(out).unwrap())
    }

    #[test]
    fn args_form_one_stream() {
        let s = run_str(
            &["d3 00 00", "00 00 d8 00 00 00 00 7b"],
            "",
            &Options::default(),
        )
        .unwrap();
        let lines: Vec<Value> = s
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0]["name"], "ping");
        assert_eq!(lines[1]["name"], "pong");
        assert_eq!(lines[2]["incomplete"], 1);
    }

    #[test]
    fn stdin_lines_are_streams() {
        let s = run_str(
            &["-"],
            "d3 00 00 00 00\n\n# comment\n48 00 00 00 03 01 01 00 d8\n",
            &Options::default(),
        )
        .unwrap();
        let lines: Vec<Value> = s
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[1]["msg"], "010100");
        assert_eq!(lines[2]["incomplete"], 1);
    }

    #[test]
    fn bad_token() {
        let e = run_str(&["d3", "0g"], "", &Options::default()).unwrap_err();
        assert!(matches!(e, Error::Hex(ref h) if h.token == "0g"));
    }

    #[test]
    fn table() {
        let opts = Options {
            format: Format::Table,
            ..Options::default()
        };
        let s = run_str(&["d3000000 00 ff"], "", &opts).unwrap();
        assert!(s.contains("0xd3  ping"), "{s}");
        assert!(s.contains("incomplete: 1 bytes"), "{s}");
    }
}
