//! Arbitrary bytes, cut into arbitrary chunks, through the streaming framer and the decoder: no
//! panic, the same events whatever the chunking, and never a frame above the limit.

#![no_main]

use cync_mitm::codec::view::{frame_json, frame_summary};
use cync_mitm::codec::{Framer, FramerEvent};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((&ctl, data)) = input.split_first() else {
        return;
    };
    let max = 5 + usize::from(ctl) * 4;
    let step = usize::from(ctl % 17) + 1;

    let mut whole = Framer::new(max);
    let expected: Vec<FramerEvent> = whole.feed(data);

    let mut chunked = Framer::new(max);
    let mut got = Vec::new();
    for chunk in data.chunks(step) {
        got.extend(chunked.feed(chunk));
    }
    assert_eq!(expected, got);
    assert_eq!(whole.buffered(), chunked.buffered());

    for ev in got {
        if let FramerEvent::Frame(raw) = ev {
            assert!(raw.len() <= max);
            let _ = frame_json(raw.bytes());
            let _ = frame_summary(raw.bytes());
        }
    }
});
