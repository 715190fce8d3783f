//! Builds Ethernet frames for tests, benchmarks and the demo's traffic: VLAN tags, IPv4
//! with options and fragments, IPv6 with extension headers, TCP/UDP/ICMP, checksums.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An IPv6 extension header to insert.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ext {
    /// Hop-by-hop options, `units` extra 8-byte units (padding).
    HopByHop { units: u8 },
    /// Routing header (type 4 segment routing shape), `units` extra units.
    Routing { units: u8 },
    /// Destination options, `units` extra units.
    DestOpts { units: u8 },
    /// Fragment header; `offset` in 8-byte units.
    Fragment { offset: u16, more: bool },
}

impl Ext {
    const fn number(self) -> u8 {
        match self {
            Self::HopByHop { .. } => 0,
            Self::Routing { .. } => 43,
            Self::DestOpts { .. } => 60,
            Self::Fragment { .. } => 44,
        }
    }
}

/// The transport header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Udp {
        sport: u16,
        dport: u16,
    },
    /// `flags` is the TCP flag byte (0x02 SYN, 0x10 ACK, ...); `option_words` 32-bit words of NOPs.
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        option_words: u8,
    },
    /// ICMP (IPv4) or ICMPv6 (IPv6) echo request.
    Echo,
    /// Any other protocol number, with the payload as its body.
    Other(u8),
}

impl L4 {
    fn proto(self, ipv6: bool) -> u8 {
        match self {
            Self::Udp { .. } => 17,
            Self::Tcp { .. } => 6,
            Self::Echo => {
                if ipv6 {
                    58
                } else {
                    1
                }
            }
            Self::Other(p) => p,
        }
    }
}

/// A frame to build.
#[derive(Clone, Debug)]
pub struct Frame {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// VLAN tags, outermost first: (TPID, VLAN id).
    pub vlans: Vec<(u16, u16)>,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IPv4 options (padded to 4 bytes).
    pub ipv4_options: Vec<u8>,
    /// IPv4 fragment offset (8-byte units) and more-fragments flag.
    pub ipv4_fragment: (u16, bool),
    /// IPv6 extension headers, in order.
    pub ipv6_ext: Vec<Ext>,
    /// None leaves out the transport header (for non-first fragments).
    pub l4: Option<L4>,
    pub payload: Vec<u8>,
}

/// TPID of an 802.1Q (customer) tag.
pub const TPID_8021Q: u16 = 0x8100;
/// TPID of an 802.1ad (service) tag.
pub const TPID_8021AD: u16 = 0x88a8;

impl Frame {
    /// A UDP frame from `src` to `dst` (same family).
    pub fn udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Self {
        Self {
            dst_mac: [0x02, 0, 0, 0, 0, 0x02],
            src_mac: [0x02, 0, 0, 0, 0, 0x01],
            vlans: Vec::new(),
            src,
            dst,
            ipv4_options: Vec::new(),
            ipv4_fragment: (0, false),
            ipv6_ext: Vec::new(),
            l4: Some(L4::Udp { sport, dport }),
            payload: b"cloudlet".to_vec(),
        }
    }

    /// Sets the transport header.
    pub fn l4(mut self, l4: Option<L4>) -> Self {
        self.l4 = l4;
        self
    }

    /// Adds a VLAN tag (outermost first).
    pub fn vlan(mut self, tpid: u16, id: u16) -> Self {
        self.vlans.push((tpid, id));
        self
    }

    /// Sets the payload.
    pub fn payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    /// Serialises the frame.
    pub fn build(&self) -> Vec<u8> {
        let mut f = Vec::with_capacity(128 + self.payload.len());
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        for (tpid, id) in &self.vlans {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&(id & 0x0fff).to_be_bytes());
        }
        let ipv6 = self.src.is_ipv6();
        f.extend_from_slice(&(if ipv6 { 0x86ddu16 } else { 0x0800 }).to_be_bytes());
        let l4 = self
            .l4
            .map(|l4| self.l4_bytes(l4))
            .unwrap_or_else(|| self.payload.clone());
        let proto = self.l4.map_or(17, |l| l.proto(ipv6));
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => f.extend_from_slice(&self.ipv4(s, d, proto, &l4)),
            (IpAddr::V6(s), IpAddr::V6(d)) => f.extend_from_slice(&self.ipv6(s, d, proto, &l4)),
            _ => panic!("frame source and destination must be of one family"),
        }
        f
    }

    fn ipv4(&self, src: Ipv4Addr, dst: Ipv4Addr, proto: u8, body: &[u8]) -> Vec<u8> {
        let mut opts = self.ipv4_options.clone();
        while !opts.len().is_multiple_of(4) {
            opts.push(0);
        }
        let ihl = 20 + opts.len();
        let total = (ihl + body.len()) as u16;
        let (offset, more) = self.ipv4_fragment;
        let frag = (offset & 0x1fff) | if more { 0x2000 } else { 0 };
        let mut h = vec![0x40 | (ihl / 4) as u8, 0];
        h.extend_from_slice(&total.to_be_bytes());
        h.extend_from_slice(&[0x12, 0x34]);
        h.extend_from_slice(&frag.to_be_bytes());
        h.extend_from_slice(&[64, proto, 0, 0]);
        h.extend_from_slice(&src.octets());
        h.extend_from_slice(&dst.octets());
        h.extend_from_slice(&opts);
        let sum = checksum(&h, 0);
        h[10..12].copy_from_slice(&sum.to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    fn ipv6(&self, src: Ipv6Addr, dst: Ipv6Addr, proto: u8, body: &[u8]) -> Vec<u8> {
        let mut ext = Vec::new();
        for (i, e) in self.ipv6_ext.iter().enumerate() {
            let next = self.ipv6_ext.get(i + 1).map_or(proto, |n| n.number());
            match *e {
                Ext::HopByHop { units } | Ext::Routing { units } | Ext::DestOpts { units } => {
                    let len = (usize::from(units) + 1) * 8;
                    let mut h = vec![0u8; len];
                    h[0] = next;
                    h[1] = units;
                    if let Ext::Routing { .. } = e {
                        h[2] = 4;
                    } else {
                        // PadN option filling the rest.
                        h[2] = 1;
                        h[3] = (len - 4) as u8;
                    }
                    ext.extend_from_slice(&h);
                }
                Ext::Fragment { offset, more } => {
                    let fo = (offset << 3) | u16::from(more);
                    ext.extend_from_slice(&[next, 0]);
                    ext.extend_from_slice(&fo.to_be_bytes());
                    ext.extend_from_slice(&[0, 0, 0x56, 0x78]);
                }
            }
        }
        let first = self.ipv6_ext.first().map_or(proto, |e| e.number());
        let payload_len = (ext.len() + body.len()) as u16;
        let mut h = vec![0x60, 0, 0, 0];
        h.extend_from_slice(&payload_len.to_be_bytes());
        h.extend_from_slice(&[first, 64]);
        h.extend_from_slice(&src.octets());
        h.extend_from_slice(&dst.octets());
        h.extend_from_slice(&ext);
        h.extend_from_slice(body);
        h
    }

    fn l4_bytes(&self, l4: L4) -> Vec<u8> {
        let ipv6 = self.src.is_ipv6();
        let mut b = match l4 {
            L4::Udp { sport, dport } => {
                let mut b = Vec::new();
                b.extend_from_slice(&sport.to_be_bytes());
                b.extend_from_slice(&dport.to_be_bytes());
                b.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                b.extend_from_slice(&[0, 0]);
                b
            }
            L4::Tcp {
                sport,
                dport,
                flags,
                option_words,
            } => {
                let mut b = Vec::new();
                b.extend_from_slice(&sport.to_be_bytes());
                b.extend_from_slice(&dport.to_be_bytes());
                b.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]);
                b.push((5 + option_words) << 4);
                b.push(flags);
                b.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
                b.extend(std::iter::repeat_n(1u8, usize::from(option_words) * 4));
                b
            }
            L4::Echo => vec![if ipv6 { 128 } else { 8 }, 0, 0, 0, 0, 1, 0, 1],
            L4::Other(_) => Vec::new(),
        };
        b.extend_from_slice(&self.payload);
        let proto = l4.proto(ipv6);
        let sum_at = match l4 {
            L4::Udp { .. } => Some(6),
            L4::Tcp { .. } => Some(16),
            L4::Echo => Some(2),
            L4::Other(_) => None,
        };
        if let Some(at) = sum_at {
            let pseudo = if proto == 1 {
                0
            } else {
                pseudo_header_sum(self.src, self.dst, proto, b.len())
            };
            let mut sum = checksum(&b, pseudo);
            if sum == 0 && proto == 17 {
                sum = 0xffff;
            }
            b[at..at + 2].copy_from_slice(&sum.to_be_bytes());
        }
        b
    }
}

fn pseudo_header_sum(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let mut bytes = Vec::with_capacity(40);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            bytes.extend_from_slice(&s.octets());
            bytes.extend_from_slice(&d.octets());
            bytes.extend_from_slice(&[0, proto]);
            bytes.extend_from_slice(&(len as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            bytes.extend_from_slice(&s.octets());
            bytes.extend_from_slice(&d.octets());
            bytes.extend_from_slice(&(len as u32).to_be_bytes());
            bytes.extend_from_slice(&[0, 0, 0, proto]);
        }
        _ => {}
    }
    sum_words(&bytes)
}

fn sum_words(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum()
}

/// The Internet checksum of `data` plus a partial sum.
pub fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = u64::from(initial) + u64::from(sum_words(data));
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Parses one line of hex (spaces, colons and a `0x` prefix allowed) into bytes.
pub fn parse_hex_line(line: &str) -> Result<Vec<u8>, String> {
    let cleaned: String = line
        .trim()
        .trim_start_matches("0x")
        .chars()
        .filter(|c| !c.is_whitespace() && *c != ':')
        .collect();
    if !cleaned.len().is_multiple_of(2) {
        return Err(format!("odd number of hex digits ({})", cleaned.len()));
    }
    (0..cleaned.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&cleaned[i..i + 2], 16)
                .map_err(|_| format!("not hex: {:?}", &cleaned[i..i + 2]))
        })
        .collect()
}

/// Formats bytes as one line of lower-case hex.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    out
}

/// Reads the frames of a classic pcap file (Ethernet link type), either byte order,
/// microsecond or nanosecond timestamps.
pub fn read_pcap(data: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    if data.len() < 24 {
        return Err("pcap file shorter than its header".into());
    }
    let magic = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
    let le = match magic {
        0xa1b2_c3d4 | 0xa1b2_3c4d => true,
        0xd4c3_b2a1 | 0x4d3c_b2a1 => false,
        0x0a0d_0d0a => return Err("pcapng is not supported; convert with `editcap -F pcap`".into()),
        _ => return Err(format!("not a pcap file (magic {magic:#010x})")),
    };
    let u32_at = |at: usize| {
        let b = [data[at], data[at + 1], data[at + 2], data[at + 3]];
        if le {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        }
    };
    let linktype = u32_at(20) & 0x0fff_ffff;
    if linktype != 1 {
        return Err(format!("pcap link type {linktype} is not Ethernet (1)"));
    }
    let mut frames = Vec::new();
    let mut at = 24;
    while at < data.len() {
        if at + 16 > data.len() {
            return Err(format!("truncated record header at byte {at}"));
        }
        let caplen = u32_at(at + 8) as usize;
        at += 16;
        if at + caplen > data.len() {
            return Err(format!("truncated record at byte {at}"));
        }
        frames.push(data[at..at + caplen].to_vec());
        at += caplen;
    }
    Ok(frames)
}

/// Writes frames as a classic pcap file (Ethernet, microseconds, little endian).
pub fn write_pcap(frames: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&4u16.to_le_bytes());
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&65535u32.to_le_bytes());
    out.extend_from_slice(&1u32.to_le_bytes());
    for f in frames {
        out.extend_from_slice(&[0; 8]);
        out.extend_from_slice(&(f.len() as u32).to_le_bytes());
        out.extend_from_slice(&(f.len() as u32).to_le_bytes());
        out.extend_from_slice(f);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_checksum_verifies() {
        let f = Frame::udp(
            "192.0.2.1".parse().unwrap(),
            "198.51.100.2".parse().unwrap(),
            1,
            2,
        )
        .build();
        assert_eq!(checksum(&f[14..34], 0), 0);
    }

    #[test]
    fn hex_and_pcap_round_trip() {
        let f = Frame::udp(
            "2001:db8::1".parse().unwrap(),
            "2001:db8::2".parse().unwrap(),
            1,
            2,
        )
        .build();
        assert_eq!(parse_hex_line(&to_hex(&f)).unwrap(), f);
        assert_eq!(parse_hex_line("0x0a:0b 0c").unwrap(), vec![10, 11, 12]);
        assert!(parse_hex_line("abc").is_err());
        let pcap = write_pcap(&[f.clone(), f[..20].to_vec()]);
        assert_eq!(read_pcap(&pcap).unwrap(), vec![f.clone(), f[..20].to_vec()]);
        assert!(read_pcap(&pcap[..30]).is_err());
    }
}
