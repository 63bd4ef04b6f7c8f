//! Arbitrary bytes as a capture file: reading never panics.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = cync_mitm::capture::read::read_frames_from(data);
});
