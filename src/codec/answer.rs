//! Which answer a frame expects, and which request an answer belongs to (protocol reference §2.4).
//! Pure helpers: the reliable transport, the SLO recorder and parity use them to pair requests with
//! answers.
//!
//! | request | answer | matched on |
//! |---|---|---|
//! | 0x23 handshake | 0x28 | order |
//! | 0x13 login | 0x18 | order |
//! | 0x43 sync | 0x48 | order (the ack is always `01 01 00`) |
//! | 0x83 pipe-sync | 0x88 | msg |
//! | 0x73 pipe | 0x7b | id and msg |
//! | 0xc3 time request | 0xc8 | order |
//! | 0xd3 ping | 0xd8 | order |
//! | 0xa3 probe | 0xab | id and msg |

use super::frame::{Frame, Msg};
use super::header::PacketType;

/// The key an answer carries, so a request and its answer compare equal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AnswerKey {
    /// Type of the answer frame.
    pub answer: PacketType,
    /// The 4-byte id, where the answer echoes it.
    pub id: Option<u32>,
    /// The message field, where the answer echoes it.
    pub msg: Option<Msg>,
}

/// The answer type a request type expects, if any.
pub fn expected_answer_type(request: PacketType) -> Option<PacketType> {
    Some(match request {
        PacketType::HANDSHAKE => PacketType::HANDSHAKE_ACK,
        PacketType::LOGIN => PacketType::LOGIN_RESULT,
        PacketType::SYNC => PacketType::SYNC_ACK,
        PacketType::PIPE => PacketType::PIPE_ACK,
        PacketType::PIPE_SYNC => PacketType::PIPE_SYNC_ACK,
        PacketType::TIME_REQUEST => PacketType::TIME_ANSWER,
        PacketType::PING => PacketType::PONG,
        PacketType::PROBE => PacketType::PROBE_REPLY,
        _ => return None,
    })
}

/// The request type an answer type acknowledges, if any.
pub fn answered_request_type(answer: PacketType) -> Option<PacketType> {
    PacketType::ALL_KNOWN
        .into_iter()
        .find(|&req| expected_answer_type(req) == Some(answer))
}

/// The key of the answer `request` expects, or `None` when it expects none.
pub fn expected_answer(request: &Frame) -> Option<AnswerKey> {
    let answer = expected_answer_type(request.ptype)?;
    let (id, msg) = match request.ptype {
        PacketType::PIPE | PacketType::PROBE => (request.id(), request.msg()),
        PacketType::PIPE_SYNC => (None, request.msg()),
        _ => (None, None),
    };
    Some(AnswerKey { answer, id, msg })
}

/// The key `answer` carries, or `None` when it answers nothing.
pub fn answer_key(answer: &Frame) -> Option<AnswerKey> {
    answered_request_type(answer.ptype)?;
    let (id, msg) = match answer.ptype {
        PacketType::PIPE_ACK | PacketType::PROBE_REPLY => (answer.id(), answer.msg()),
        PacketType::PIPE_SYNC_ACK => (None, answer.msg()),
        _ => (None, None),
    };
    Some(AnswerKey {
        answer: answer.ptype,
        id,
        msg,
    })
}

/// Whether `answer` answers `request`.
pub fn answers(request: &Frame, answer: &Frame) -> bool {
    match (expected_answer(request), answer_key(answer)) {
        (Some(want), Some(got)) => want == got,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn f(s: &str) -> Frame {
        Frame::decode(&Bytes::from(crate::hexutil::parse_hex(s).unwrap())).unwrap()
    }

    #[test]
    fn pairs() {
        let cmd = f(
            "73 00 00 00 1f 2d e4 b5 d2 15 37 00 7e 21 00 00 00 f8 d0 0d 00 21 00 00 00 00 05 00 d0 11 02 01 00 00 e7 7e",
        );
        let ack = f("7b 00 00 00 07 2d e4 b5 d2 15 37 00");
        let other = f("7b 00 00 00 07 2d e4 b5 d2 00 02 00");
        assert!(answers(&cmd, &ack));
        assert!(!answers(&cmd, &other));
        let status = f(
            "83 00 00 00 25 37 96 24 69 00 05 00 7e 21 00 00 00 fa db 13 00 34 22 11 05 00 05 00 db 11 02 01 01 64 00 00 00 00 00 00 b3 7e",
        );
        assert!(answers(&status, &f("88 00 00 00 03 00 05 00")));
        assert!(!answers(&status, &f("88 00 00 00 03 00 02 00")));
        assert!(answers(&f("d3 00 00 00 00"), &f("d8 00 00 00 00")));
        assert!(answers(
            &f("43 00 00 00 07 45 88 0d 50 01 01 06"),
            &f("48 00 00 00 03 01 01 00")
        ));
        assert!(answers(
            &f("c3 00 00 00 01 0c"),
            &f("c8 00 00 00 0b 0d 07 e9 0b 06 05 02 14 28 fd a8")
        ));
        assert!(!answers(
            &f("d3 00 00 00 00"),
            &f("48 00 00 00 03 01 01 00")
        ));
        let probe = f("a3 00 00 00 07 2d e4 b5 d2 15 2b 00");
        assert!(answers(
            &probe,
            &Frame::probe_reply(0x2de4b5d2, Msg([0x15, 0x2b, 0]))
        ));
        assert_eq!(expected_answer(&ack), None);
        assert_eq!(answer_key(&cmd), None);
    }

    #[test]
    fn type_table() {
        for (req, ans) in [
            (0x23, 0x28),
            (0x43, 0x48),
            (0x83, 0x88),
            (0x73, 0x7b),
            (0xc3, 0xc8),
            (0xd3, 0xd8),
            (0xa3, 0xab),
            (0x13, 0x18),
        ] {
            assert_eq!(expected_answer_type(PacketType(req)), Some(PacketType(ans)));
            assert_eq!(
                answered_request_type(PacketType(ans)),
                Some(PacketType(req))
            );
        }
        assert_eq!(expected_answer_type(PacketType::PIPE_STATUS), None);
        assert_eq!(answered_request_type(PacketType::PIPE_STATUS), None);
    }
}
