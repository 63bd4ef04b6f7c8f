//! The `cync-mitm` binary: argument parsing and wiring only; the logic lives in the library.

#![forbid(unsafe_code)]

use clap::{Parser, Subcommand, ValueEnum};
use cync_mitm::cmd::decode;
use std::io::{self, Write};
use std::process::ExitCode;

/// Transparent MITM sidecar for GE Cync devices.
#[derive(Parser, Debug)]
#[command(name = "cync-mitm", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Decode Cync frames from hex: arguments form one stream; `-` reads stdin, one stream per line.
    Decode {
        /// Hex bytes (spaces allowed), or `-` for stdin.
        #[arg(required = true, allow_hyphen_values = true)]
        hex: Vec<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = OutFormat::Json)]
        format: OutFormat,
        /// Largest frame accepted, in bytes (header included).
        #[arg(long, default_value_t = cync_mitm::codec::DEFAULT_MAX_FRAME)]
        max_frame: usize,
        /// Add each frame's hex as a `hex` field (JSON only).
        #[arg(long)]
        with_hex: bool,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum OutFormat {
    Json,
    Table,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Decode {
            hex,
            format,
            max_frame,
            with_hex,
        } => {
            let opts = decode::Options {
                format: match format {
                    OutFormat::Json => decode::Format::Json,
                    OutFormat::Table => decode::Format::Table,
                },
                max_frame,
                with_hex,
            };
            let stdin = io::stdin().lock();
            let mut stdout = io::stdout().lock();
            match decode::run(&hex, &opts, stdin, &mut stdout) {
                Ok(()) => ExitCode::SUCCESS,
                Err(decode::Error::Io(e)) if e.kind() == io::ErrorKind::BrokenPipe => {
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    let _ = stdout.flush();
                    eprintln!("cync-mitm decode: {e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}
