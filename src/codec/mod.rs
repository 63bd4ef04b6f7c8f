//! The Cync wire protocol, sans-IO: outer frames, the inner 0x7e frame, escaping, checksum, TLV
//! records, command and status layouts, a streaming framer and answer matching. No sockets and no
//! clock: everything here is a pure function of its input bytes, and no input makes it panic.
//!
//! The layouts follow `docs/protocol.md`; section numbers in the docs refer to it.
//!
//! ```
//! use cync_mitm::codec::{Framer, FramerEvent, Payload, decode_payload};
//! let wire = cync_mitm::hexutil::parse_hex(
//!     "73 00 00 00 1f 37 96 24 69 15 37 00 7e 21 00 00 00 f8 d0 0d 00 21 00 00 00 00 05 00 d0 11 02 01 00 00 e7 7e",
//! ).unwrap();
//! let mut framer = Framer::default();
//! let Some(FramerEvent::Frame(raw)) = framer.feed(&wire).pop() else { panic!() };
//! let frame = raw.decode().unwrap();
//! let inner = frame.inner().unwrap();
//! assert!(inner.checksum_ok());
//! assert!(matches!(decode_payload(inner), Payload::Command(_)));
//! ```

pub mod answer;
pub mod frame;
pub mod framer;
pub mod header;
pub mod inner;
pub mod payload;
pub mod tlv;
pub mod view;

pub use answer::{AnswerKey, answer_key, answers, expected_answer, expected_answer_type};
pub use frame::{
    Body, CloudStatus, DeviceId, Envelope, Frame, Handshake, InvalidInner, Login, Msg, Pipe, Probe,
    ProbeReply, Sync, TimeAnswer,
};
pub use framer::{DEFAULT_MAX_FRAME, Framer, FramerError, FramerEvent, RawFrame};
pub use header::{HEADER_LEN, Header, PacketType};
pub use inner::{Direction, InnerError, InnerFrame};
pub use payload::{
    Action, AnnouncedStatus, Color, Command, FirmwareVersion, LightState, PageRecord, Payload,
    StatusPages, decode_payload,
};
pub use tlv::{Record, RecordValue, StatusRecord};

/// Why a frame's body could not be decoded. The frame's bytes are still whole and are forwarded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer than 5 bytes: no header.
    #[error("{got} bytes is shorter than the 5-byte header")]
    ShortHeader {
        /// Bytes present.
        got: usize,
    },
    /// The header's length does not match the bytes given.
    #[error("header declares {declared} body bytes but {actual} are present")]
    LengthMismatch {
        /// Declared body length.
        declared: u32,
        /// Body bytes present.
        actual: usize,
    },
    /// The body is too short for its layout.
    #[error("{what} body is {got} bytes, needs at least {need}")]
    Short {
        /// Which layout.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        got: usize,
    },
    /// The body of a fixed-size layout has the wrong size.
    #[error("{what} body must be {expected} bytes, got {got}")]
    Size {
        /// Which layout.
        what: &'static str,
        /// Expected size.
        expected: usize,
        /// Actual size.
        got: usize,
    },
    /// A length-prefixed field runs past the body.
    #[error("{field} declares {declared} bytes but only {available} remain")]
    Overrun {
        /// Which field.
        field: &'static str,
        /// Declared length.
        declared: usize,
        /// Bytes left in the body.
        available: usize,
    },
}

/// Why a frame could not be encoded (a field longer than its length prefix can say).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A field is too long for its length prefix.
    #[error("{what} is {len} bytes, longer than the {max} its length field allows")]
    TooLong {
        /// Which field.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
}
