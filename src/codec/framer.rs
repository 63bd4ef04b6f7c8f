//! Streaming framer: turns arbitrary chunks of one direction of a connection into whole outer
//! frames, by the header's length field only (0x7e occurs inside ids; protocol reference §2.6).
//!
//! Sans-IO: feed bytes with [`Framer::push`], take events with [`Framer::next_event`]. A header
//! that declares more than the configured maximum is reported as [`FramerError::TooLarge`]; the
//! framer then skips bytes until a plausible header (a known packet type with an acceptable
//! length) and reports how many it skipped. It never panics and never holds more than
//! `max_frame` plus one chunk.

use super::header::{HEADER_LEN, Header, PacketType};
use bytes::{Bytes, BytesMut};

/// Default maximum frame size (header included).
pub const DEFAULT_MAX_FRAME: usize = 64 * 1024;

/// One whole outer frame as it was on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawFrame {
    bytes: Bytes,
}

impl RawFrame {
    /// The whole frame (header and body).
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// The packet-type byte.
    pub fn ptype(&self) -> PacketType {
        PacketType(self.bytes[0])
    }

    /// The body (after the 5-byte header).
    pub fn body(&self) -> Bytes {
        self.bytes.slice(HEADER_LEN..)
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Never true: a frame has at least its header.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Decodes the frame.
    pub fn decode(&self) -> Result<super::Frame, super::DecodeError> {
        super::Frame::decode(&self.bytes)
    }
}

/// A framing problem. The caller keeps forwarding raw bytes; these only label and count.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FramerError {
    /// A header declares a frame larger than the limit; the framer starts resynchronising.
    #[error("frame of type 0x{type_byte:02x} declares {frame_len} bytes, above the {max} limit")]
    TooLarge {
        /// Type byte of the bad header.
        type_byte: u8,
        /// Declared frame length (header included).
        frame_len: u64,
        /// Configured limit.
        max: usize,
    },
    /// Bytes discarded while looking for the next plausible header.
    #[error("skipped {bytes} bytes to resynchronise")]
    Skipped {
        /// How many.
        bytes: usize,
    },
}

/// What [`Framer::next_event`] yields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FramerEvent {
    /// A whole frame.
    Frame(RawFrame),
    /// A framing problem.
    Error(FramerError),
}

/// Streaming framer for one direction of one connection.
#[derive(Debug)]
pub struct Framer {
    buf: BytesMut,
    max_frame: usize,
    resyncing: bool,
    skipped: usize,
    frames: u64,
    errors: u64,
}

impl Default for Framer {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME)
    }
}

impl Framer {
    /// A framer accepting frames up to `max_frame` bytes (at least the 5-byte header).
    pub fn new(max_frame: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            max_frame: max_frame.max(HEADER_LEN),
            resyncing: false,
            skipped: 0,
            frames: 0,
            errors: 0,
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// Bytes held that do not yet make a whole frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Frames yielded so far.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Errors yielded so far.
    pub fn errors(&self) -> u64 {
        self.errors
    }

    /// Whether the framer is skipping bytes after a bad header.
    pub fn is_resyncing(&self) -> bool {
        self.resyncing
    }

    /// Whether a header at the start of `b` is believable enough to resume framing there.
    fn plausible(&self, b: &[u8]) -> Option<bool> {
        let h = Header::parse(b)?;
        Some(h.ptype.is_known() && h.frame_len() <= self.max_frame)
    }

    /// The next frame or error, or `None` when more bytes are needed.
    pub fn next_event(&mut self) -> Option<FramerEvent> {
        if self.resyncing {
            // Look for a known type byte followed by an acceptable length.
            let mut i = 0;
            let found = loop {
                if i >= self.buf.len() {
                    break false;
                }
                match self.plausible(&self.buf[i..]) {
                    Some(true) => break true,
                    Some(false) => i += 1,
                    // Too few bytes to judge a candidate with a known type byte: wait for more.
                    None if PacketType(self.buf[i]).is_known() => break false,
                    None => i += 1,
                }
            };
            if i > 0 {
                let _ = self.buf.split_to(i);
                self.skipped += i;
            }
            if !found {
                return None;
            }
            self.resyncing = false;
            let bytes = std::mem::take(&mut self.skipped);
            if bytes > 0 {
                self.errors += 1;
                return Some(FramerEvent::Error(FramerError::Skipped { bytes }));
            }
        }
        let h = Header::parse(&self.buf)?;
        let frame_len = h.frame_len();
        if frame_len > self.max_frame {
            self.resyncing = true;
            self.errors += 1;
            // Skip the bad type byte so the next search starts after it.
            let _ = self.buf.split_to(1);
            self.skipped = 1;
            return Some(FramerEvent::Error(FramerError::TooLarge {
                type_byte: h.ptype.0,
                frame_len: u64::from(h.body_len) + HEADER_LEN as u64,
                max: self.max_frame,
            }));
        }
        if self.buf.len() < frame_len {
            // Make room once for the rest of this frame.
            self.buf.reserve(frame_len - self.buf.len());
            return None;
        }
        self.frames += 1;
        Some(FramerEvent::Frame(RawFrame {
            bytes: self.buf.split_to(frame_len).freeze(),
        }))
    }

    /// Pushes `chunk` and collects every event it completes.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<FramerEvent> {
        self.push(chunk);
        std::iter::from_fn(|| self.next_event()).collect()
    }
}

impl Iterator for Framer {
    type Item = FramerEvent;

    fn next(&mut self) -> Option<FramerEvent> {
        self.next_event()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hexutil::parse_hex;

    fn frames(events: &[FramerEvent]) -> Vec<Vec<u8>> {
        events
            .iter()
            .filter_map(|e| match e {
                FramerEvent::Frame(f) => Some(f.bytes().to_vec()),
                FramerEvent::Error(_) => None,
            })
            .collect()
    }

    #[test]
    fn coalesced_frames() {
        // V21: f9 d0 response and 0x7b in one write.
        let b = parse_hex("73 00 00 00 13 2d e4 b5 d2 00 02 00 7e 21 00 00 00 f9 d0 01 00 00 d1 7e 7b 00 00 00 07 2d e4 b5 d2 15 37 00").unwrap();
        let mut f = Framer::default();
        let ev = f.feed(&b);
        let fr = frames(&ev);
        assert_eq!(fr.len(), 2);
        assert_eq!(fr[0].len(), 24);
        assert_eq!(fr[1][0], 0x7b);
        assert_eq!(f.buffered(), 0);
    }

    #[test]
    fn byte_at_a_time() {
        let b = parse_hex("43 00 00 00 34 60 b1 7e f1 01 01 06 c7 90 2a 32 30 32 35 31 31 30 36 3a 30 32 32 30 3a 2d 33 37 2c 30 30 30 30 36 2c 30 30 30 30 31 2c 30 30 30 30 31 2c 30 30 30 30 31 2c d3 00 00 00 00").unwrap();
        let mut f = Framer::default();
        let mut all = Vec::new();
        for byte in &b {
            all.extend(f.feed(std::slice::from_ref(byte)));
        }
        let fr = frames(&all);
        assert_eq!(fr.len(), 2);
        assert_eq!(fr[0].len(), 57);
        assert_eq!(fr[1], vec![0xd3, 0, 0, 0, 0]);
    }

    #[test]
    fn too_large_then_resync() {
        // N2 declares 24 body bytes but sends 25: the spilled 0x7e fuses with the next header.
        let b = parse_hex("73 00 00 00 18 45 88 0f 3a 00 00 00 00 7e 1f 00 00 00 f8 52 06 00 00 00 ff ff 00 00 56 7e 7b 00 00 00 07 45 88 0f 3a 00 10 00 d3 00 00 00 00").unwrap();
        let mut f = Framer::default();
        let ev = f.feed(&b);
        assert!(matches!(ev[0], FramerEvent::Frame(_)));
        assert!(matches!(
            ev[1],
            FramerEvent::Error(FramerError::TooLarge {
                type_byte: 0x7e,
                ..
            })
        ));
        assert_eq!(ev[2], FramerEvent::Error(FramerError::Skipped { bytes: 1 }));
        let fr = frames(&ev);
        assert_eq!(fr.len(), 3);
        assert_eq!(
            fr[1],
            parse_hex("7b 00 00 00 07 45 88 0f 3a 00 10 00").unwrap()
        );
        assert_eq!(fr[2], vec![0xd3, 0, 0, 0, 0]);
        assert_eq!(f.errors(), 2);
        assert_eq!(f.frames(), 3);
    }

    #[test]
    fn resync_waits_for_a_whole_candidate_header() {
        let mut f = Framer::new(64);
        let ev = f.feed(&[0x73, 0xff, 0xff, 0xff, 0xff, 0x99, 0xd3, 0x00]);
        assert_eq!(ev.len(), 1);
        assert!(f.is_resyncing());
        let ev = f.feed(&[0x00, 0x00, 0x00]);
        assert_eq!(ev[0], FramerEvent::Error(FramerError::Skipped { bytes: 6 }));
        assert_eq!(frames(&ev), vec![vec![0xd3, 0, 0, 0, 0]]);
        assert!(!f.is_resyncing());
    }

    #[test]
    fn unknown_types_are_frames() {
        let mut f = Framer::default();
        let ev = f.feed(&[0x33, 0, 0, 0, 2, 0xaa, 0xbb]);
        assert_eq!(frames(&ev), vec![vec![0x33, 0, 0, 0, 2, 0xaa, 0xbb]]);
    }

    #[test]
    fn buffer_is_bounded_while_resyncing() {
        let mut f = Framer::new(64);
        f.feed(&[0x73, 0xff, 0xff, 0xff, 0xff]);
        for _ in 0..1000 {
            f.feed(&[0x00; 100]);
            assert!(f.buffered() < 100);
        }
    }
}
