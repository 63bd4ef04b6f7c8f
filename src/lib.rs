//! cync-mitm: a transparent TLS man-in-the-middle sidecar between GE Cync devices and the Cync
//! cloud. It relays every byte unchanged, decodes every frame to label logs, metrics and captures,
//! and mirrors (dark launch) and routes devices to a new, reliable path.
//!
//! # Layout
//! - [`codec`]: the Cync wire protocol, sans-IO (frames, inner frames, escaping, checksum, TLV
//!   records, command/status layouts, streaming framer, answer matching).
//! - [`hexutil`]: hex text in and out.
//! - [`cmd`]: the command-line tools (`decode`), callable from tests.
//! - [`transport`]: the new path's ReliableTransport core (acks, retries, dedup, queues).
//!
//! `src/main.rs` only parses arguments and wires these together.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod app;
pub mod capture;
pub mod cmd;
pub mod codec;
pub mod config;
pub mod console;
pub mod dailylog;
pub mod demo;
pub mod hexutil;
pub mod httpc;
pub mod metrics;
pub mod parity;
pub mod proxy;
pub mod reload;
pub mod route;
pub mod sim;
pub mod slo;
pub mod tls;
pub mod transport;
