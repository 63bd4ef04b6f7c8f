//! Reading captures back: TCP reassembly from pcapng or classic pcap (ours, or any LINKTYPE_RAW,
//! Ethernet or Linux-cooked capture of the Cync port), then the codec over each stream direction,
//! frames reported in capture order. Used by `cync-mitm capture read` and
//! `cync-mitm fixtures extract`.

use crate::codec::{Framer, FramerEvent};
use bytes::Bytes;
use pcap_file::DataLink;
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

/// Why a capture could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The file could not be opened or read.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Neither pcapng nor pcap, or damaged.
    #[error("not a readable pcap/pcapng capture: {0}")]
    Format(String),
}

/// One frame found in a capture.
#[derive(Clone, Debug)]
pub struct CapturedFrame {
    /// Stream number, in order of first appearance.
    pub stream: usize,
    /// Interface name (our captures: device leg / cloud leg), when the file names it.
    pub interface: Option<String>,
    /// The side that opened the TCP connection.
    pub client: SocketAddr,
    /// The other side.
    pub server: SocketAddr,
    /// Whether the frame travelled client → server.
    pub from_client: bool,
    /// Capture time of the packet that completed the frame.
    pub time: Duration,
    /// The frame's bytes, or bytes that do not make a frame (`is_frame == false`).
    pub bytes: Bytes,
    /// Whether `bytes` is a whole frame.
    pub is_frame: bool,
}

struct Segment {
    src: SocketAddr,
    dst: SocketAddr,
    seq: u32,
    syn: bool,
    payload: Vec<u8>,
}

fn parse_tcp(ip: &[u8]) -> Option<Segment> {
    let version = ip.first()? >> 4;
    let (src_ip, dst_ip, l4): (IpAddr, IpAddr, &[u8]) = match version {
        4 => {
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            if *ip.get(9)? != 6 || ihl < 20 {
                return None;
            }
            let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
            let s: [u8; 4] = ip.get(12..16)?.try_into().ok()?;
            let d: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
            let end = total.min(ip.len());
            (
                Ipv4Addr::from(s).into(),
                Ipv4Addr::from(d).into(),
                ip.get(ihl..end)?,
            )
        }
        6 => {
            if *ip.get(6)? != 6 {
                return None;
            }
            let plen = usize::from(u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?]));
            let s: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
            let d: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            let end = (40 + plen).min(ip.len());
            (
                Ipv6Addr::from(s).into(),
                Ipv6Addr::from(d).into(),
                ip.get(40..end)?,
            )
        }
        _ => return None,
    };
    let sport = u16::from_be_bytes([*l4.first()?, *l4.get(1)?]);
    let dport = u16::from_be_bytes([*l4.get(2)?, *l4.get(3)?]);
    let seq = u32::from_be_bytes(l4.get(4..8)?.try_into().ok()?);
    let off = usize::from(l4.get(12)? >> 4) * 4;
    let flags = *l4.get(13)?;
    Some(Segment {
        src: SocketAddr::new(src_ip, sport),
        dst: SocketAddr::new(dst_ip, dport),
        seq,
        syn: flags & 0x02 != 0,
        payload: l4.get(off..)?.to_vec(),
    })
}

fn ip_payload(link: DataLink, data: &[u8]) -> Option<&[u8]> {
    match link {
        DataLink::RAW | DataLink::IPV4 | DataLink::IPV6 => Some(data),
        DataLink::ETHERNET => {
            let mut off = 12;
            let mut ethertype = u16::from_be_bytes([*data.get(off)?, *data.get(off + 1)?]);
            while ethertype == 0x8100 || ethertype == 0x88a8 {
                off += 4;
                ethertype = u16::from_be_bytes([*data.get(off)?, *data.get(off + 1)?]);
            }
            matches!(ethertype, 0x0800 | 0x86dd).then(|| data.get(off + 2..))?
        }
        DataLink::LINUX_SLL => data.get(16..),
        DataLink::NULL | DataLink::LOOP => data.get(4..),
        _ => None,
    }
}

#[derive(Default)]
struct Dir {
    next: Option<u32>,
    pending: BTreeMap<u32, Vec<u8>>,
    framer: Framer,
    unframed: Vec<u8>,
}

struct Stream {
    index: usize,
    client: SocketAddr,
    server: SocketAddr,
    interface: Option<String>,
    dirs: [Dir; 2],
}

impl Stream {
    fn piece(
        &self,
        from_client: bool,
        time: Duration,
        bytes: Bytes,
        is_frame: bool,
    ) -> CapturedFrame {
        CapturedFrame {
            stream: self.index,
            interface: self.interface.clone(),
            client: self.client,
            server: self.server,
            from_client,
            time,
            bytes,
            is_frame,
        }
    }
}

/// Streams keyed by their two endpoints (and the interface, so our two legs stay apart).
#[derive(Default)]
struct Reassembler {
    streams: HashMap<(Option<String>, SocketAddr, SocketAddr), Stream>,
    count: usize,
    out: Vec<CapturedFrame>,
}

/// Whether `a` looks like the server of a Cync connection (port 23779/23778).
fn is_cync_port(a: SocketAddr) -> bool {
    matches!(a.port(), 23778 | 23779)
}

impl Reassembler {
    fn segment(&mut self, iface: Option<String>, time: Duration, s: Segment) {
        let key = if s.src <= s.dst {
            (iface.clone(), s.src, s.dst)
        } else {
            (iface.clone(), s.dst, s.src)
        };
        let count = &mut self.count;
        let stream = self.streams.entry(key).or_insert_with(|| {
            // The SYN sender is the client; without one, the side not on the Cync port.
            let src_is_client = if s.syn {
                true
            } else {
                !is_cync_port(s.src) || is_cync_port(s.dst)
            };
            let (client, server) = if src_is_client {
                (s.src, s.dst)
            } else {
                (s.dst, s.src)
            };
            *count += 1;
            Stream {
                index: *count - 1,
                client,
                server,
                interface: iface,
                dirs: [Dir::default(), Dir::default()],
            }
        });
        let from_client = s.src == stream.client;
        let d = &mut stream.dirs[usize::from(!from_client)];
        let mut seq = s.seq;
        if s.syn {
            d.next = Some(seq.wrapping_add(1));
            seq = seq.wrapping_add(1);
        }
        let mut data = s.payload;
        if data.is_empty() {
            return;
        }
        let next = *d.next.get_or_insert(seq);
        // Trim what was already seen (retransmissions, overlaps).
        let behind = next.wrapping_sub(seq);
        if behind < 0x8000_0000 && behind > 0 {
            if behind as usize >= data.len() {
                return;
            }
            data.drain(..behind as usize);
            seq = next;
        }
        if seq != next {
            d.pending.insert(seq, data);
            return;
        }
        let mut ready = data;
        let mut cursor = next.wrapping_add(ready.len() as u32);
        while let Some(more) = d.pending.remove(&cursor) {
            cursor = cursor.wrapping_add(more.len() as u32);
            ready.extend(more);
        }
        d.next = Some(cursor);
        Self::feed(&mut self.out, stream, from_client, time, &ready);
    }

    fn feed(
        out: &mut Vec<CapturedFrame>,
        st: &mut Stream,
        from_client: bool,
        time: Duration,
        bytes: &[u8],
    ) {
        let i = usize::from(!from_client);
        let mut dir = std::mem::take(&mut st.dirs[i]);
        Self::feed_dir(out, st, &mut dir, from_client, time, bytes);
        st.dirs[i] = dir;
    }

    fn feed_dir(
        out: &mut Vec<CapturedFrame>,
        st: &Stream,
        d: &mut Dir,
        from_client: bool,
        time: Duration,
        bytes: &[u8],
    ) {
        d.framer.push(bytes);
        d.unframed.extend_from_slice(bytes);
        while let Some(ev) = d.framer.next_event() {
            match ev {
                FramerEvent::Frame(raw) => {
                    // Bytes before the frame that the framer skipped are reported as raw.
                    let skipped = d
                        .unframed
                        .len()
                        .saturating_sub(d.framer.buffered() + raw.len())
                        .min(d.unframed.len());
                    if skipped > 0 {
                        let junk: Vec<u8> = d.unframed.drain(..skipped).collect();
                        out.push(st.piece(from_client, time, junk.into(), false));
                    }
                    let n = raw.len().min(d.unframed.len());
                    d.unframed.drain(..n);
                    out.push(st.piece(from_client, time, raw.bytes().clone(), true));
                }
                FramerEvent::Error(_) => {}
            }
        }
    }

    fn finish(mut self) -> Vec<CapturedFrame> {
        let mut streams: Vec<Stream> = self.streams.into_values().collect();
        streams.sort_by_key(|s| s.index);
        for st in &mut streams {
            for (i, from_client) in [(0usize, true), (1, false)] {
                let d = &mut st.dirs[i];
                // Segments after a gap that never filled: report them in order.
                let rest: Vec<Vec<u8>> = std::mem::take(&mut d.pending).into_values().collect();
                for r in rest {
                    d.unframed.extend_from_slice(&r);
                }
                let left = std::mem::take(&mut d.unframed);
                if !left.is_empty() {
                    self.out
                        .push(st.piece(from_client, Duration::ZERO, left.into(), false));
                }
            }
        }
        self.out
    }
}

fn scale(raw: Duration, tsresol: u8) -> Duration {
    // pcap-file reports the raw count as nanoseconds; rescale decimal resolutions.
    if tsresol & 0x80 != 0 || tsresol >= 9 {
        return raw;
    }
    let n = raw.as_nanos() as u64;
    Duration::from_nanos(n.saturating_mul(10u64.pow(u32::from(9 - tsresol))))
}

/// Largest capture file read (a capture rotates at `capture.max_file_bytes`, 64 MiB by default).
pub const MAX_CAPTURE_BYTES: u64 = 2 << 30;

/// A capture read back.
#[derive(Debug)]
pub struct Capture {
    /// Its frames, in capture order.
    pub frames: Vec<CapturedFrame>,
    /// It ended in the middle of a block (a file still being written, or cut short): the
    /// frames before that point are all there.
    pub truncated: bool,
}

/// Reads every frame of a pcapng or pcap file, in capture order.
pub fn read_frames(path: &Path) -> Result<Vec<CapturedFrame>, ReadError> {
    read_capture(path).map(|c| c.frames)
}

/// Reads a pcapng or pcap file: only a regular file of at most [`MAX_CAPTURE_BYTES`] (not a
/// device or a pipe that never ends); one cut short in its last block is read up to there.
pub fn read_capture(path: &Path) -> Result<Capture, ReadError> {
    // Checked before opening: opening a pipe with no writer would block.
    if !std::fs::metadata(path)?.is_file() {
        return Err(ReadError::Format("not a regular file".into()));
    }
    let f = std::fs::File::open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(ReadError::Format("not a regular file".into()));
    }
    if meta.len() > MAX_CAPTURE_BYTES {
        return Err(ReadError::Format(format!(
            "{} bytes: larger than the {} bytes a capture may have here (split it, e.g. with editcap -c)",
            meta.len(),
            MAX_CAPTURE_BYTES
        )));
    }
    let mut data = Vec::new();
    f.take(MAX_CAPTURE_BYTES).read_to_end(&mut data)?;
    read_capture_from(&data)
}

/// Reads every frame of a pcapng or pcap capture held in memory.
pub fn read_frames_from(data: &[u8]) -> Result<Vec<CapturedFrame>, ReadError> {
    read_capture_from(data).map(|c| c.frames)
}

/// Largest block (or packet) a capture cut short may have been in the middle of; a larger
/// declared length is damage, not a cut.
const MAX_BLOCK: usize = 16 << 20;

/// Whether the data at `rest` is a block cut short by the end of the data: its header is
/// incomplete, or the length it declares (at `len_at`, plus `extra`) is plausible and runs
/// past the end. Anything else that fails to parse is damage.
fn cut_short(rest: &[u8], len_at: usize, extra: usize, big: bool) -> bool {
    let Some(b) = rest.get(len_at..len_at + 4) else {
        return true;
    };
    let b = [b[0], b[1], b[2], b[3]];
    let declared = if big {
        u32::from_be_bytes(b)
    } else {
        u32::from_le_bytes(b)
    } as usize;
    let total = declared.saturating_add(extra);
    total <= MAX_BLOCK && total > rest.len()
}

/// [`read_capture`] of bytes held in memory.
pub fn read_capture_from(data: &[u8]) -> Result<Capture, ReadError> {
    use pcap_file::Endianness;
    let mut truncated = false;
    let mut r = Reassembler::default();
    let fmt = |e: pcap_file::PcapError| ReadError::Format(e.to_string());
    if data.starts_with(&[0x0a, 0x0d, 0x0d, 0x0a]) {
        let (mut rest, mut parser) = pcap_file::pcapng::PcapNgParser::new(data).map_err(fmt)?;
        let mut ifaces: Vec<(DataLink, Option<String>, u8)> = Vec::new();
        while !rest.is_empty() {
            let block = match parser.next_block(rest) {
                Ok((more, block)) => {
                    rest = more;
                    block
                }
                Err(e) => {
                    let big = parser.section().endianness == Endianness::Big;
                    if cut_short(rest, 4, 0, big) {
                        truncated = true;
                        break;
                    }
                    return Err(fmt(e));
                }
            };
            use pcap_file::pcapng::Block;
            use pcap_file::pcapng::blocks::interface_description::InterfaceDescriptionOption as O;
            match block {
                Block::InterfaceDescription(idb) => {
                    let name = idb.options.iter().find_map(|o| match o {
                        O::IfName(n) => Some(n.to_string()),
                        _ => None,
                    });
                    let res = idb.options.iter().find_map(|o| match o {
                        O::IfTsResol(r) => Some(*r),
                        _ => None,
                    });
                    ifaces.push((idb.linktype, name, res.unwrap_or(6)));
                }
                Block::SectionHeader(_) => ifaces.clear(),
                Block::EnhancedPacket(epb) => {
                    let Some((link, name, res)) = ifaces.get(epb.interface_id as usize).cloned()
                    else {
                        continue;
                    };
                    if let Some(seg) = ip_payload(link, &epb.data).and_then(parse_tcp) {
                        r.segment(name, scale(epb.timestamp, res), seg);
                    }
                }
                Block::SimplePacket(spb) => {
                    if let Some((link, name, _)) = ifaces.first().cloned()
                        && let Some(seg) = ip_payload(link, &spb.data).and_then(parse_tcp)
                    {
                        r.segment(name, Duration::ZERO, seg);
                    }
                }
                _ => {}
            }
        }
    } else {
        let (mut rest, parser) = pcap_file::pcap::PcapParser::new(data).map_err(fmt)?;
        let header = parser.header();
        let link = header.datalink;
        let big = header.endianness == Endianness::Big;
        while !rest.is_empty() {
            match parser.next_packet(rest) {
                Ok((more, p)) => {
                    rest = more;
                    if let Some(seg) = ip_payload(link, &p.data).and_then(parse_tcp) {
                        r.segment(None, p.timestamp, seg);
                    }
                }
                // A packet record: 16-byte header, captured length at byte 8.
                Err(_) if cut_short(rest, 8, 16, big) => {
                    truncated = true;
                    break;
                }
                Err(e) => return Err(fmt(e)),
            }
        }
    }
    Ok(Capture {
        frames: r.finish(),
        truncated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::tcp::TcpLeg;

    proptest::proptest! {
        #[test]
        fn any_bytes_parse_without_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..120)) {
            let _ = parse_tcp(&data);
            for link in [DataLink::RAW, DataLink::ETHERNET, DataLink::LINUX_SLL, DataLink::NULL] {
                let _ = ip_payload(link, &data).and_then(parse_tcp);
            }
            let mut r = Reassembler::default();
            if let Some(seg) = parse_tcp(&data) {
                r.segment(None, Duration::ZERO, seg);
            }
            let _ = r.finish();
        }
    }

    #[test]
    fn a_capture_cut_short_reads_up_to_the_cut_and_devices_are_refused() {
        let sample = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/captures/sample-device.pcapng"
        ))
        .unwrap();
        let whole = read_capture_from(&sample).unwrap();
        assert!(!whole.truncated);
        let cut = read_capture_from(&sample[..sample.len() - 10]).unwrap();
        assert!(cut.truncated);
        assert!(!cut.frames.is_empty());
        assert!(cut.frames.len() <= whole.frames.len());
        // Damage in the middle (an absurd block length) is an error, not a cut.
        let shb = u32::from_le_bytes([sample[4], sample[5], sample[6], sample[7]]) as usize;
        let mut bad = sample.clone();
        bad[shb + 4..shb + 8].copy_from_slice(&[0xff, 0xff, 0xff, 0x7f]);
        assert!(read_capture_from(&bad).is_err());
        // A classic pcap cut in a packet record reads up to it, too.
        let mut pcap = Vec::new();
        {
            let mut w = pcap_file::pcap::PcapWriter::with_header(
                &mut pcap,
                pcap_file::pcap::PcapHeader {
                    datalink: DataLink::RAW,
                    ..Default::default()
                },
            )
            .unwrap();
            for _ in 0..3 {
                w.write_packet(&pcap_file::pcap::PcapPacket::new(
                    Duration::ZERO,
                    40,
                    &[0x45u8; 40],
                ))
                .unwrap();
            }
        }
        assert!(!read_capture_from(&pcap).unwrap().truncated);
        assert!(
            read_capture_from(&pcap[..pcap.len() - 5])
                .unwrap()
                .truncated
        );
        let e = read_capture(Path::new("/dev/zero")).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    #[test]
    fn truncated_headers_are_rejected() {
        // IHL says 60 bytes of header, only 24 present.
        let mut p = vec![0x4f, 0, 0, 24, 0, 0, 0, 0, 64, 6, 0, 0];
        p.extend([10, 0, 0, 1, 10, 0, 0, 2, 0, 1, 0, 2]);
        assert!(parse_tcp(&p).is_none());
    }

    #[test]
    fn reassembles_out_of_order_and_retransmitted_segments() {
        let c: SocketAddr = "10.1.1.1:40000".parse().unwrap();
        let s: SocketAddr = "10.1.1.2:23779".parse().unwrap();
        let mut leg = TcpLeg::new(c, s, 7);
        let open = leg.open();
        let ping = crate::codec::Frame::ping().encode().unwrap();
        let hs = crate::codec::Frame::handshake(crate::codec::DeviceId(9), b"0123456789abcdef", 60)
            .encode()
            .unwrap();
        let mut all = hs.clone();
        all.extend(&ping);
        let p1 = leg.data(true, &all[..10]);
        let p2 = leg.data(true, &all[10..]);
        let pong = leg.data(false, &crate::codec::Frame::pong().encode().unwrap());
        let mut r = Reassembler::default();
        let mut feed = |pk: &crate::capture::tcp::Packet| {
            r.segment(None, Duration::ZERO, parse_tcp(&pk.data).unwrap())
        };
        for p in &open {
            feed(p);
        }
        feed(&p2[0]); // out of order
        feed(&p1[0]);
        feed(&p1[0]); // retransmission
        feed(&pong[0]);
        let out = r.finish();
        let frames: Vec<(bool, u8, bool)> = out
            .iter()
            .map(|f| (f.from_client, f.bytes[0], f.is_frame))
            .collect();
        assert_eq!(
            frames,
            vec![(true, 0x23, true), (true, 0xd3, true), (false, 0xd8, true)]
        );
        assert_eq!(out[0].client, c);
        assert_eq!(out[0].server, s);
    }
}
