//! Codec throughput on a capture-like byte stream, beside a baseline that only walks the bytes.
//!
//! The stream repeats a realistic device-session mix built from the reference vectors
//! (heartbeats, commands with their responses and acks, status announcements, syncs, a status
//! page, a 1 KiB probe reply), fed in 4 KiB chunks as TLS reads arrive. After the run the bench
//! prints each variant's time as a ratio to the baseline measured in the same run.
//!
//! Run: `cargo bench --bench codec`

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput};
use cync_mitm::codec::{Framer, FramerEvent, decode_payload};
use cync_mitm::hexutil::parse_hex;
use std::hint::black_box;
use std::time::Duration;

const GROUP: &str = "codec";

/// One "minute" of a busy device: each entry is (hex, repetitions).
fn session_mix() -> Vec<u8> {
    let mix: &[(&str, usize)] = &[
        ("d3 00 00 00 00", 6),
        ("d8 00 00 00 00", 6),
        (
            "73 00 00 00 1f 2d e4 b5 d2 15 37 00 7e 21 00 00 00 f8 d0 0d 00 21 00 00 00 00 05 00 d0 11 02 01 00 00 e7 7e",
            4,
        ),
        (
            "73 00 00 00 13 2d e4 b5 d2 00 02 00 7e 21 00 00 00 f9 d0 01 00 00 d1 7e 7b 00 00 00 07 2d e4 b5 d2 15 37 00",
            4,
        ),
        (
            "83 00 00 00 25 37 96 24 69 00 05 00 7e 21 00 00 00 fa db 13 00 34 22 11 05 00 05 00 db 11 02 01 01 64 00 00 00 00 00 00 b3 7e",
            4,
        ),
        ("88 00 00 00 03 00 05 00", 4),
        (
            "43 00 00 00 1a 37 96 24 69 01 01 06 05 00 10 05 01 64 00 00 00 00 01 00 05 00 00 00 00 00 00",
            2,
        ),
        ("48 00 00 00 03 01 01 00", 2),
        ("43 00 00 00 07 45 88 0d 50 01 01 06", 2),
        (
            "73 00 00 00 22 37 96 24 69 60 48 00 7e 17 00 00 00 f8 f0 10 00 17 00 00 00 00 07 00 f0 11 02 01 27 ff ff ff ff 45 7e",
            2,
        ),
        (
            "730000009100000d8002e5007e01010000f9527d5e000500000005000400890100008901010000005000000039000000d796ff0007000001000000010000000000000000fe000000f8383000020000010000000101000000410000001e00000000000000e800000100000001010000005000000039000000000000001e0000010000000101000000500000003900000000000000d17e",
            1,
        ),
        (
            "c3 00 00 00 01 0c c8 00 00 00 0b 0d 07 e9 0b 06 05 02 14 28 fd a8",
            1,
        ),
    ];
    let mut one = Vec::new();
    for (hex, n) in mix {
        let b = parse_hex(hex).unwrap_or_default();
        for _ in 0..*n {
            one.extend_from_slice(&b);
        }
    }
    one.extend(
        cync_mitm::codec::Frame::probe_reply(0x2de4b5d2, cync_mitm::codec::Msg([0x15, 0x2b, 0]))
            .encode()
            .unwrap_or_default(),
    );
    let mut stream = Vec::with_capacity(1 << 20);
    while stream.len() < 1 << 20 {
        stream.extend_from_slice(&one);
    }
    stream
}

const CHUNK: usize = 4096;

fn walk(data: &[u8]) -> u64 {
    let mut sum = 0u64;
    for chunk in data.chunks(CHUNK) {
        for &b in chunk {
            sum = sum.wrapping_add(u64::from(b));
        }
    }
    sum
}

fn frame_only(data: &[u8]) -> u64 {
    let mut f = Framer::default();
    let mut n = 0u64;
    for chunk in data.chunks(CHUNK) {
        f.push(chunk);
        while let Some(ev) = f.next_event() {
            if let FramerEvent::Frame(raw) = ev {
                n += raw.len() as u64;
            }
        }
    }
    n
}

fn frame_and_decode(data: &[u8]) -> u64 {
    let mut f = Framer::default();
    let mut n = 0u64;
    for chunk in data.chunks(CHUNK) {
        f.push(chunk);
        while let Some(ev) = f.next_event() {
            if let FramerEvent::Frame(raw) = ev
                && let Ok(frame) = raw.decode()
            {
                n += 1;
                if let Some(inner) = frame.inner() {
                    black_box(decode_payload(inner));
                }
            }
        }
    }
    n
}

fn count_frames(data: &[u8]) -> u64 {
    let mut f = Framer::default();
    f.push(data);
    f.filter(|e| matches!(e, FramerEvent::Frame(_))).count() as u64
}

fn bench(c: &mut Criterion, data: &Bytes) {
    let mut g = c.benchmark_group(GROUP);
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.measurement_time(Duration::from_secs(4));
    g.bench_with_input(BenchmarkId::from_parameter("walk"), data, |b, d| {
        b.iter(|| walk(black_box(d)))
    });
    g.bench_with_input(BenchmarkId::from_parameter("frame"), data, |b, d| {
        b.iter(|| frame_only(black_box(d)))
    });
    g.bench_with_input(BenchmarkId::from_parameter("frame+decode"), data, |b, d| {
        b.iter(|| frame_and_decode(black_box(d)))
    });
    g.finish();
}

/// Mean time in ns of a finished benchmark, from criterion's estimates.
fn mean_ns(id: &str) -> Option<f64> {
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let path = format!("{target}/criterion/{GROUP}/{id}/new/estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["mean"]["point_estimate"].as_f64()
}

fn main() {
    let data = Bytes::from(session_mix());
    let frames = count_frames(&data);
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c, &data);
    c.final_summary();
    let Some(base) = mean_ns("walk") else {
        return;
    };
    let mb = data.len() as f64 / 1e6;
    println!(
        "\nstream: {} bytes, {frames} frames (avg {:.1} B/frame)",
        data.len(),
        data.len() as f64 / frames as f64
    );
    println!(
        "{:<14} {:>10} {:>12} {:>14} {:>16}",
        "variant", "ms/stream", "MB/s", "frames/s", "time ÷ walk"
    );
    for id in ["walk", "frame", "frame+decode"] {
        if let Some(ns) = mean_ns(id) {
            let s = ns / 1e9;
            println!(
                "{id:<14} {:>10.3} {:>12.1} {:>14.0} {:>16.2}",
                ns / 1e6,
                mb / s,
                frames as f64 / s,
                ns / base
            );
        }
    }
}
