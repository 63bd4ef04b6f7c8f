//! Arbitrary bodies under every packet type: decoding never panics, and a decoded frame
//! re-encodes to bytes that decode to the same frame.

#![no_main]

use bytes::Bytes;
use cync_mitm::codec::view::frame_json;
use cync_mitm::codec::{Frame, InnerFrame, decode_payload};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((&t, body)) = input.split_first() else {
        return;
    };
    let mut wire = vec![t];
    wire.extend((body.len() as u32).to_be_bytes());
    wire.extend_from_slice(body);
    let wire = Bytes::from(wire);
    let _ = frame_json(&wire);
    if let Ok(f) = Frame::decode(&wire) {
        if let Some(inner) = f.inner() {
            let _ = decode_payload(inner);
        }
        let re = Bytes::from(f.encode().expect("decoded frames encode"));
        assert_eq!(Frame::decode(&re).expect("re-encoded frames decode"), f);
    }
    if let Ok(inner) = InnerFrame::decode(body) {
        let _ = decode_payload(&inner);
    }
});
