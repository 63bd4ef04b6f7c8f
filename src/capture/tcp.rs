//! Synthesized IPv4/IPv6 + TCP packets for LINKTYPE_RAW captures: the relayed bytes become
//! ordinary TCP streams (handshake, sequence and ack numbers, FIN) with valid checksums, so
//! Wireshark and tshark follow them like a real capture.

use std::net::{IpAddr, SocketAddr};

/// TCP flags.
pub mod flags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// PSH.
    pub const PSH: u8 = 0x08;
    /// ACK.
    pub const ACK: u8 = 0x10;
}

/// Largest payload put in one synthesized segment (well below the IPv4 64 KiB limit).
pub const MAX_SEGMENT: usize = 16 * 1024;
const WINDOW: u16 = 0xffff;

fn sum16(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The Internet checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    fold(sum16(data, 0))
}

/// Builds one IP packet carrying a TCP segment from `src` to `dst`. Mixed address families are
/// written as IPv6 with IPv4-mapped addresses.
pub fn segment(
    src: SocketAddr,
    dst: SocketAddr,
    seq: u32,
    ack: u32,
    tcp_flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut tcp = Vec::with_capacity(20 + payload.len());
    tcp.extend_from_slice(&src.port().to_be_bytes());
    tcp.extend_from_slice(&dst.port().to_be_bytes());
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&ack.to_be_bytes());
    tcp.push(5 << 4); // data offset: 5 words, no options
    tcp.push(tcp_flags);
    tcp.extend_from_slice(&WINDOW.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    tcp.extend_from_slice(payload);
    let tcp_len = tcp.len();
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut pseudo = sum16(&s.octets(), 0);
            pseudo = sum16(&d.octets(), pseudo);
            pseudo += 6 + tcp_len as u32;
            let ck = fold(sum16(&tcp, pseudo));
            tcp[16..18].copy_from_slice(&ck.to_be_bytes());
            let total = (20 + tcp_len) as u16;
            let mut ip = Vec::with_capacity(20 + tcp_len);
            ip.extend_from_slice(&[0x45, 0]);
            ip.extend_from_slice(&total.to_be_bytes());
            ip.extend_from_slice(&[0, 0, 0x40, 0]); // id 0, don't fragment
            ip.extend_from_slice(&[64, 6, 0, 0]); // ttl, protocol TCP, checksum
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            let hck = checksum(&ip);
            ip[10..12].copy_from_slice(&hck.to_be_bytes());
            ip.extend_from_slice(&tcp);
            ip
        }
        (s, d) => {
            let v6 = |a: IpAddr| match a {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            let (s, d) = (v6(s), v6(d));
            let mut pseudo = sum16(&s.octets(), 0);
            pseudo = sum16(&d.octets(), pseudo);
            pseudo += tcp_len as u32 + 6;
            let ck = fold(sum16(&tcp, pseudo));
            tcp[16..18].copy_from_slice(&ck.to_be_bytes());
            let mut ip = Vec::with_capacity(40 + tcp_len);
            ip.extend_from_slice(&[0x60, 0, 0, 0]);
            ip.extend_from_slice(&(tcp_len as u16).to_be_bytes());
            ip.extend_from_slice(&[6, 64]); // next header TCP, hop limit
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            ip.extend_from_slice(&tcp);
            ip
        }
    }
}

/// Sequence state of one synthesized TCP connection (one leg of a relayed session).
#[derive(Clone, Debug)]
pub struct TcpLeg {
    /// The side that opened the connection.
    pub client: SocketAddr,
    /// The side that accepted it.
    pub server: SocketAddr,
    client_next: u32,
    server_next: u32,
    client_fin: bool,
    server_fin: bool,
}

/// A packet to write: IP bytes and whether it travels client→server.
pub struct Packet {
    /// The IP packet.
    pub data: Vec<u8>,
    /// Direction.
    pub from_client: bool,
}

impl TcpLeg {
    /// A leg with initial sequence numbers derived from `isn`.
    pub fn new(client: SocketAddr, server: SocketAddr, isn: u32) -> Self {
        Self {
            client,
            server,
            client_next: isn,
            server_next: isn.rotate_left(16) ^ 0x5a5a_5a5a,
            client_fin: false,
            server_fin: false,
        }
    }

    /// SYN, SYN-ACK, ACK.
    pub fn open(&mut self) -> Vec<Packet> {
        let (c, s) = (self.client, self.server);
        let syn = segment(c, s, self.client_next, 0, flags::SYN, &[]);
        self.client_next = self.client_next.wrapping_add(1);
        let syn_ack = segment(
            s,
            c,
            self.server_next,
            self.client_next,
            flags::SYN | flags::ACK,
            &[],
        );
        self.server_next = self.server_next.wrapping_add(1);
        let ack = segment(c, s, self.client_next, self.server_next, flags::ACK, &[]);
        vec![
            Packet {
                data: syn,
                from_client: true,
            },
            Packet {
                data: syn_ack,
                from_client: false,
            },
            Packet {
                data: ack,
                from_client: true,
            },
        ]
    }

    /// Data segments carrying `payload` (split at [`MAX_SEGMENT`]).
    pub fn data(&mut self, from_client: bool, payload: &[u8]) -> Vec<Packet> {
        payload
            .chunks(MAX_SEGMENT)
            .map(|p| {
                let (src, dst, seq, ack) = if from_client {
                    (self.client, self.server, self.client_next, self.server_next)
                } else {
                    (self.server, self.client, self.server_next, self.client_next)
                };
                let data = segment(src, dst, seq, ack, flags::PSH | flags::ACK, p);
                if from_client {
                    self.client_next = self.client_next.wrapping_add(p.len() as u32);
                } else {
                    self.server_next = self.server_next.wrapping_add(p.len() as u32);
                }
                Packet { data, from_client }
            })
            .collect()
    }

    /// FIN from one side (once), acknowledged by the other.
    pub fn fin(&mut self, from_client: bool) -> Vec<Packet> {
        if (from_client && self.client_fin) || (!from_client && self.server_fin) {
            return Vec::new();
        }
        let (src, dst, seq, ack) = if from_client {
            (self.client, self.server, self.client_next, self.server_next)
        } else {
            (self.server, self.client, self.server_next, self.client_next)
        };
        let fin = segment(src, dst, seq, ack, flags::FIN | flags::ACK, &[]);
        if from_client {
            self.client_fin = true;
            self.client_next = self.client_next.wrapping_add(1);
        } else {
            self.server_fin = true;
            self.server_next = self.server_next.wrapping_add(1);
        }
        let (ack_seq, ack_no) = if from_client {
            (self.server_next, self.client_next)
        } else {
            (self.client_next, self.server_next)
        };
        let ackp = segment(dst, src, ack_seq, ack_no, flags::ACK, &[]);
        vec![
            Packet {
                data: fin,
                from_client,
            },
            Packet {
                data: ackp,
                from_client: !from_client,
            },
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_verify() {
        let a: SocketAddr = "192.0.2.1:50000".parse().unwrap();
        let b: SocketAddr = "198.51.100.2:23779".parse().unwrap();
        let p = segment(a, b, 1, 2, flags::PSH | flags::ACK, b"hello");
        assert_eq!(p.len(), 45);
        assert_eq!(checksum(&p[..20]), 0, "IPv4 header checksum");
        // TCP checksum over pseudo header + segment is zero when valid.
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&p[12..20]);
        pseudo.extend_from_slice(&[0, 6]);
        pseudo.extend_from_slice(&((p.len() - 20) as u16).to_be_bytes());
        pseudo.extend_from_slice(&p[20..]);
        assert_eq!(checksum(&pseudo), 0, "TCP checksum");
        let a6: SocketAddr = "[2001:db8::1]:1".parse().unwrap();
        let p6 = segment(a6, b, 1, 2, flags::ACK, b"odd");
        assert_eq!(p6[0] >> 4, 6);
    }

    #[test]
    fn sequence_numbers_advance() {
        let mut leg = TcpLeg::new(
            "10.0.0.1:1000".parse().unwrap(),
            "10.0.0.2:23779".parse().unwrap(),
            100,
        );
        let open = leg.open();
        assert_eq!(open.len(), 3);
        let d = leg.data(true, &vec![0u8; MAX_SEGMENT + 10]);
        assert_eq!(d.len(), 2);
        let seq = |p: &Packet| u32::from_be_bytes([p.data[24], p.data[25], p.data[26], p.data[27]]);
        assert_eq!(seq(&d[0]), 101);
        assert_eq!(seq(&d[1]), 101 + MAX_SEGMENT as u32);
        assert_eq!(leg.fin(true).len(), 2);
        assert!(leg.fin(true).is_empty());
    }
}
