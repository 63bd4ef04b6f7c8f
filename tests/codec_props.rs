//! Property tests for the codec: encode→decode round trips, chunking independence of the framer,
//! and no panic on any input.

use bytes::Bytes;
use cync_mitm::codec::frame::{
    CloudStatus, Envelope, Handshake, Login, Pipe, Probe, ProbeReply, Sync,
};
use cync_mitm::codec::inner::{escape_into, unescape};
use cync_mitm::codec::view::{frame_json, frame_summary};
use cync_mitm::codec::{
    Action, Body, Command, DeviceId, Direction, Frame, Framer, FramerEvent, InnerFrame, Msg,
    PacketType, Record, TimeAnswer,
};
use proptest::collection::vec;
use proptest::prelude::*;

fn bytes(max: usize) -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..=max).prop_map(Bytes::from)
}

fn msg() -> impl Strategy<Value = Msg> {
    any::<[u8; 3]>().prop_map(Msg)
}

fn env() -> impl Strategy<Value = Envelope> {
    (any::<u32>(), msg()).prop_map(|(id, msg)| Envelope { id, msg })
}

fn direction() -> impl Strategy<Value = Direction> {
    any::<u8>().prop_map(Direction::from_byte)
}

fn inner() -> impl Strategy<Value = InnerFrame> {
    (
        any::<u32>(),
        direction(),
        any::<u8>(),
        bytes(80),
        any::<Option<u8>>(),
    )
        .prop_map(|(seq, dir, op, data, ck)| {
            let mut f = InnerFrame::new(seq, dir, op, data);
            if let Some(ck) = ck {
                f.checksum = ck;
            }
            f
        })
}

fn record() -> impl Strategy<Value = Record> {
    (any::<u8>(), 0u8..16, bytes(40)).prop_map(|(tag, flag, value)| Record { tag, flag, value })
}

fn frame() -> impl Strategy<Value = Frame> {
    let unknown = any::<u8>()
        .prop_filter("unknown type", |b| !PacketType(*b).is_known())
        .prop_map(PacketType);
    prop_oneof![
        (any::<u8>(), any::<u32>(), bytes(40), bytes(4)).prop_map(
            |(version, user_id, auth, trailer)| Frame {
                ptype: PacketType::LOGIN,
                body: Body::Login(Login {
                    version,
                    user_id,
                    auth,
                    trailer
                }),
            }
        ),
        (any::<u8>(), any::<u32>(), bytes(40), bytes(4)).prop_map(
            |(version, id, auth_code, trailer)| Frame {
                ptype: PacketType::HANDSHAKE,
                body: Body::Handshake(Handshake {
                    version,
                    device_id: DeviceId(id),
                    auth_code,
                    trailer
                }),
            }
        ),
        bytes(4).prop_map(|b| Frame {
            ptype: PacketType::HANDSHAKE_ACK,
            body: Body::HandshakeAck(b)
        }),
        bytes(4).prop_map(|b| Frame {
            ptype: PacketType::LOGIN_RESULT,
            body: Body::LoginResult(b)
        }),
        (env(), vec(record(), 0..6), bytes(2)).prop_map(|(env, records, trailing)| Frame {
            ptype: PacketType::SYNC,
            body: Body::Sync(Sync {
                env,
                records,
                trailing
            }),
        }),
        msg().prop_map(|m| Frame {
            ptype: PacketType::SYNC_ACK,
            body: Body::SyncAck(m)
        }),
        msg().prop_map(|m| Frame {
            ptype: PacketType::PIPE_SYNC_ACK,
            body: Body::PipeSyncAck(m)
        }),
        (
            prop_oneof![Just(PacketType::PIPE), Just(PacketType::PIPE_SYNC)],
            env(),
            inner()
        )
            .prop_map(|(ptype, env, inner)| Frame {
                ptype,
                body: Body::Pipe(Pipe {
                    env,
                    inner: Ok(inner)
                })
            }),
        env().prop_map(|e| Frame {
            ptype: PacketType::PIPE_ACK,
            body: Body::PipeAck(e)
        }),
        (
            prop_oneof![
                Just(PacketType::PIPE_STATUS),
                Just(PacketType::PROBE_STATUS)
            ],
            env(),
            bytes(3)
        )
            .prop_map(|(ptype, env, extra)| Frame {
                ptype,
                body: Body::CloudStatus(CloudStatus { env, extra })
            }),
        (env(), bytes(3)).prop_map(|(env, extra)| Frame {
            ptype: PacketType::PROBE,
            body: Body::Probe(Probe { env, extra })
        }),
        (any::<u32>(), bytes(64)).prop_map(|(id, rest)| Frame {
            ptype: PacketType::PROBE_REPLY,
            body: Body::ProbeReply(ProbeReply { id, rest }),
        }),
        (any::<u32>(), msg()).prop_map(|(id, m)| Frame::probe_reply(id, m)),
        bytes(3).prop_map(|b| Frame {
            ptype: PacketType::TIME_REQUEST,
            body: Body::TimeRequest(b)
        }),
        (-4_000_000_000i64..8_000_000_000, -720i16..=840)
            .prop_map(|(t, off)| Frame::time_answer(TimeAnswer::from_unix(t, off))),
        Just(Frame::ping()),
        Just(Frame::pong()),
        bytes(3).prop_map(|b| Frame {
            ptype: PacketType::DISCONNECT,
            body: Body::Disconnect(b)
        }),
        (unknown, bytes(64)).prop_map(|(ptype, b)| Frame {
            ptype,
            body: Body::Raw(b)
        }),
    ]
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        any::<bool>().prop_map(|on| Action::Power { on }),
        any::<u8>().prop_map(|brightness| Action::Brightness { brightness }),
        any::<u8>().prop_map(|temp| Action::ColorTemp { temp }),
        any::<[u8; 3]>().prop_map(|rgb| Action::Rgb { rgb }),
        any::<[u8; 2]>().prop_map(|effect| Action::Effect { effect }),
        (any::<bool>(), any::<u8>(), any::<u8>(), any::<[u8; 3]>()).prop_map(
            |(on, brightness, mode, rgb)| Action::Combo {
                on,
                brightness,
                mode,
                rgb
            }
        ),
        bytes(12).prop_map(|ops| Action::MeshRelay { ops }),
    ]
}

/// All events of a framer fed `data` in the given chunk sizes (cycled).
fn events(data: &[u8], cuts: &[usize], max: usize) -> (Vec<FramerEvent>, usize) {
    let mut f = Framer::new(max);
    let mut out = Vec::new();
    let mut pos = 0;
    let mut i = 0;
    while pos < data.len() {
        let n = cuts
            .get(i % cuts.len().max(1))
            .copied()
            .unwrap_or(data.len())
            .max(1);
        let end = (pos + n).min(data.len());
        out.extend(f.feed(&data[pos..end]));
        pos = end;
        i += 1;
    }
    (out, f.buffered())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn frames_round_trip(f in frame()) {
        let wire = Bytes::from(f.encode().unwrap());
        let back = Frame::decode(&wire).unwrap();
        prop_assert_eq!(&back, &f);
        prop_assert_eq!(back.encode().unwrap(), wire.to_vec());
    }

    #[test]
    fn commands_round_trip(seq in any::<u32>(), mesh_id in any::<u16>(), action in action()) {
        let c = Command { seq, mesh_id, action };
        let inner = c.to_inner(seq);
        prop_assert!(inner.checksum_ok());
        let wire = inner.encode().unwrap();
        let back = InnerFrame::decode(&wire).unwrap();
        prop_assert_eq!(Command::parse(back.opcode, &back.data), Some(c));
    }

    #[test]
    fn escaping_round_trips(data in vec(any::<u8>(), 0..200)) {
        let mut esc = Vec::new();
        escape_into(&data, &mut esc);
        prop_assert!(!esc.contains(&0x7e));
        prop_assert_eq!(unescape(&esc), data);
    }

    #[test]
    fn any_chunking_yields_the_same_frames(
        frames in vec(frame(), 1..12),
        cuts in vec(1usize..40, 1..20),
    ) {
        let mut wire = Vec::new();
        for f in &frames {
            wire.extend(f.encode().unwrap());
        }
        let (whole, left_whole) = events(&wire, &[wire.len()], 1 << 16);
        let (chunked, left_chunked) = events(&wire, &cuts, 1 << 16);
        let (single, _) = events(&wire, &[1], 1 << 16);
        prop_assert_eq!(&whole, &chunked);
        prop_assert_eq!(&whole, &single);
        prop_assert_eq!(left_whole, 0);
        prop_assert_eq!(left_chunked, 0);
        let decoded: Vec<Frame> = whole
            .iter()
            .map(|e| match e {
                FramerEvent::Frame(r) => r.decode().unwrap(),
                FramerEvent::Error(e) => panic!("unexpected {e}"),
            })
            .collect();
        prop_assert_eq!(decoded, frames);
    }

    #[test]
    fn any_bytes_any_chunking_never_panic(
        data in vec(any::<u8>(), 0..600),
        cuts in vec(1usize..50, 1..10),
        max in 5usize..300,
    ) {
        let (evs, left) = events(&data, &cuts, max);
        let (again, left_again) = events(&data, &[data.len().max(1)], max);
        prop_assert_eq!(&evs, &again);
        prop_assert_eq!(left, left_again);
        let mut framed = 0;
        for e in &evs {
            match e {
                FramerEvent::Frame(r) => {
                    framed += r.len();
                    prop_assert!(r.len() <= max);
                    let _ = frame_json(r.bytes());
                    let _ = frame_summary(r.bytes());
                    if let Ok(f) = r.decode() {
                        // Re-encoding a decoded frame decodes to the same frame.
                        let re = Bytes::from(f.encode().unwrap());
                        prop_assert_eq!(Frame::decode(&re).unwrap(), f);
                    }
                }
                FramerEvent::Error(_) => {}
            }
        }
        prop_assert!(framed + left <= data.len());
    }

    #[test]
    fn known_types_with_random_bodies_never_panic(
        t in prop::sample::select(PacketType::ALL_KNOWN.to_vec()),
        body in vec(any::<u8>(), 0..120),
        inner_body in vec(any::<u8>(), 0..60),
        pipe in any::<bool>(),
    ) {
        let mut b = body;
        if pipe {
            // Bias toward bodies that reach the inner-frame decoder.
            b.truncate(7);
            b.resize(7, 0);
            b.push(0x7e);
            b.extend(inner_body);
            b.push(0x7e);
        }
        let mut wire = vec![t.0];
        wire.extend((b.len() as u32).to_be_bytes());
        wire.extend(&b);
        let wire = Bytes::from(wire);
        let _ = frame_json(&wire);
        let _ = frame_summary(&wire);
        if let Ok(f) = Frame::decode(&wire) {
            let re = Bytes::from(f.encode().unwrap());
            prop_assert_eq!(Frame::decode(&re).unwrap(), f);
        }
    }
}
