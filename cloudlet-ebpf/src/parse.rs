//! Header parsing: Ethernet, up to two VLAN tags, IPv4 (with options), IPv6 (with a bounded
//! walk of extension headers), fragments, and TCP/UDP/ICMP/ICMPv6 headers.
//!
//! Every read goes through [`ptr_at`], which checks the frame's end first, so no input can
//! make the program read out of bounds. Each way a frame can be truncated or inconsistent
//! maps to one `reason::MALFORMED_*` code.

use aya_ebpf::programs::XdpContext;
use cloudlet_common::{MAX_IPV6_EXT_HEADERS, MAX_VLAN_TAGS, decision_flags, reason};

const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_DSTOPTS: u8 = 60;

/// Offsets past this are not parsed: the verifier needs a bound on packet offsets, and
/// no extension chain on a real network is this long. A frame whose headers go past it
/// is treated like a truncated one.
const MAX_HEADER_OFFSET: usize = 4096;

/// What the parser learned about a packet.
pub struct Packet {
    /// 4 or 6.
    pub ip_version: u32,
    /// Source and destination addresses. IPv4 uses the first four bytes.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub l4_proto: u32,
    pub flags: u32,
    pub vlan_tags: u32,
    pub vlan_outer: u32,
    pub ext_headers: u32,
    pub src_port: u32,
    pub dst_port: u32,
    /// TCP flag byte, when a TCP header was parsed.
    pub tcp_flags: u32,
}

impl Packet {
    /// IPv4 source, network order.
    #[inline(always)]
    pub fn src_v4(&self) -> [u8; 4] {
        [self.src[0], self.src[1], self.src[2], self.src[3]]
    }

    /// IPv4 destination, network order.
    #[inline(always)]
    pub fn dst_v4(&self) -> [u8; 4] {
        [self.dst[0], self.dst[1], self.dst[2], self.dst[3]]
    }
}

/// Why a frame is not judged by the rules: a `reason` code (`NON_IP` or `MALFORMED_*`),
/// with whatever was learned before parsing stopped.
pub struct Unparsed {
    pub reason: u32,
    pub vlan_tags: u32,
    pub vlan_outer: u32,
    pub ip_version: u32,
}

/// The one bounds-checked accessor for packet data: a pointer to `N` bytes at `offset`.
#[inline(always)]
fn ptr_at<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<*const [u8; N]> {
    let start = ctx.data();
    let end = ctx.data_end();
    if offset > MAX_HEADER_OFFSET || start + offset + N > end {
        return None;
    }
    Some((start + offset) as *const [u8; N])
}

/// Reads `N` bytes at `offset`, or `None` past the end of the frame.
#[inline(always)]
fn bytes_at<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<[u8; N]> {
    // SAFETY: ptr_at checked that offset..offset + N lies inside the frame.
    ptr_at::<N>(ctx, offset).map(|p| unsafe { p.read_unaligned() })
}

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

/// Parses a frame down to its transport header.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Packet, Unparsed> {
    let mut out = Unparsed {
        reason: reason::MALFORMED_ETHERNET,
        vlan_tags: 0,
        vlan_outer: 0,
        ip_version: 0,
    };
    let Some(eth_type) = bytes_at::<2>(ctx, 12) else {
        return Err(out);
    };
    let mut eth_type = be16(eth_type);
    let mut off = ETH_HLEN;

    // VLAN tags: 802.1ad (S-tag) and 802.1Q (C-tag), in either order, at most two.
    let mut tags = 0u32;
    while eth_type == ETH_P_8021Q || eth_type == ETH_P_8021AD {
        out.reason = reason::MALFORMED_VLAN;
        if tags >= MAX_VLAN_TAGS {
            return Err(out);
        }
        let Some(tag) = bytes_at::<4>(ctx, off) else {
            return Err(out);
        };
        if tags == 0 {
            out.vlan_outer = u32::from(be16([tag[0], tag[1]]) & 0x0fff);
        }
        eth_type = be16([tag[2], tag[3]]);
        off += VLAN_HLEN;
        tags += 1;
        out.vlan_tags = tags;
    }

    match eth_type {
        ETH_P_IP => {
            out.ip_version = 4;
            parse_ipv4(ctx, off, out)
        }
        ETH_P_IPV6 => {
            out.ip_version = 6;
            parse_ipv6(ctx, off, out)
        }
        _ => {
            out.reason = reason::NON_IP;
            Err(out)
        }
    }
}

#[inline(always)]
fn new_packet(version: u32, out: &Unparsed) -> Packet {
    Packet {
        ip_version: version,
        src: [0; 16],
        dst: [0; 16],
        l4_proto: 0,
        flags: 0,
        vlan_tags: out.vlan_tags,
        vlan_outer: out.vlan_outer,
        ext_headers: 0,
        src_port: 0,
        dst_port: 0,
        tcp_flags: 0,
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, off: usize, mut out: Unparsed) -> Result<Packet, Unparsed> {
    out.reason = reason::MALFORMED_IPV4;
    let Some(h) = bytes_at::<20>(ctx, off) else {
        return Err(out);
    };
    if h[0] >> 4 != 4 {
        return Err(out);
    }
    let ihl = usize::from(h[0] & 0x0f) * 4;
    if ihl < 20 {
        return Err(out);
    }
    // Options must be present in full.
    if ptr_at::<1>(ctx, off + ihl - 1).is_none() {
        return Err(out);
    }
    let total_len = usize::from(be16([h[2], h[3]]));
    let frame_len = ctx.data_end() - ctx.data();
    if total_len < ihl || off + total_len > frame_len {
        return Err(out);
    }
    let mut pkt = new_packet(4, &out);
    pkt.src[..4].copy_from_slice(&h[12..16]);
    pkt.dst[..4].copy_from_slice(&h[16..20]);
    let proto = h[9];
    pkt.l4_proto = u32::from(proto);
    let frag = be16([h[6], h[7]]);
    let more_fragments = frag & 0x2000 != 0;
    let frag_offset = frag & 0x1fff;
    if more_fragments || frag_offset != 0 {
        pkt.flags |= decision_flags::FRAGMENT;
    }
    if frag_offset != 0 {
        pkt.flags |= decision_flags::NON_FIRST_FRAGMENT;
        return Ok(pkt);
    }
    parse_l4(ctx, off + ihl, off + total_len, proto, pkt, out)
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, off: usize, mut out: Unparsed) -> Result<Packet, Unparsed> {
    out.reason = reason::MALFORMED_IPV6;
    let Some(h) = bytes_at::<40>(ctx, off) else {
        return Err(out);
    };
    if h[0] >> 4 != 6 {
        return Err(out);
    }
    let payload_len = usize::from(be16([h[4], h[5]]));
    let frame_len = ctx.data_end() - ctx.data();
    // A zero payload length is a jumbogram (RFC 2675): the frame bounds it.
    let ip_end = if payload_len == 0 {
        frame_len
    } else {
        off + 40 + payload_len
    };
    if ip_end > frame_len {
        return Err(out);
    }
    let mut pkt = new_packet(6, &out);
    pkt.src.copy_from_slice(&h[8..24]);
    pkt.dst.copy_from_slice(&h[24..40]);

    let mut next = h[6];
    let mut off = off + 40;
    let mut walked = 0u32;
    while walked < MAX_IPV6_EXT_HEADERS {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                out.reason = reason::MALFORMED_IPV6_EXT;
                let Some(e) = bytes_at::<2>(ctx, off) else {
                    return Err(out);
                };
                let len = (usize::from(e[1]) + 1) * 8;
                if off + len > ip_end || ptr_at::<1>(ctx, off + len - 1).is_none() {
                    return Err(out);
                }
                next = e[0];
                off += len;
            }
            IPPROTO_FRAGMENT => {
                out.reason = reason::MALFORMED_IPV6_EXT;
                let Some(e) = bytes_at::<8>(ctx, off) else {
                    return Err(out);
                };
                if off + 8 > ip_end {
                    return Err(out);
                }
                let frag = be16([e[2], e[3]]);
                pkt.flags |= decision_flags::FRAGMENT;
                if frag >> 3 != 0 {
                    // What follows is a slice of the original payload, not headers
                    // (RFC 8200 4.5): stop here and judge on addresses alone.
                    pkt.flags |= decision_flags::NON_FIRST_FRAGMENT;
                    pkt.ext_headers = walked + 1;
                    pkt.l4_proto = u32::from(e[0]);
                    return Ok(pkt);
                }
                next = e[0];
                off += 8;
            }
            _ => break,
        }
        walked += 1;
    }
    pkt.ext_headers = walked;
    if matches!(
        next,
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_FRAGMENT
    ) {
        out.reason = reason::MALFORMED_IPV6_EXT_CHAIN;
        return Err(out);
    }
    pkt.l4_proto = u32::from(next);
    if pkt.flags & decision_flags::NON_FIRST_FRAGMENT != 0 {
        return Ok(pkt);
    }
    parse_l4(ctx, off, ip_end, next, pkt, out)
}

/// Parses the transport header at `off`; it must end by `ip_end` (the IP packet's end).
#[inline(always)]
fn parse_l4(
    ctx: &XdpContext,
    off: usize,
    ip_end: usize,
    proto: u8,
    mut pkt: Packet,
    mut out: Unparsed,
) -> Result<Packet, Unparsed> {
    out.reason = reason::MALFORMED_L4;
    match proto {
        IPPROTO_TCP => {
            let Some(t) = bytes_at::<20>(ctx, off) else {
                return Err(out);
            };
            let doff = usize::from(t[12] >> 4) * 4;
            if doff < 20 || off + doff > ip_end || ptr_at::<1>(ctx, off + doff - 1).is_none() {
                return Err(out);
            }
            pkt.src_port = u32::from(be16([t[0], t[1]]));
            pkt.dst_port = u32::from(be16([t[2], t[3]]));
            pkt.tcp_flags = u32::from(t[13]);
        }
        IPPROTO_UDP => {
            let Some(u) = bytes_at::<8>(ctx, off) else {
                return Err(out);
            };
            if off + 8 > ip_end {
                return Err(out);
            }
            pkt.src_port = u32::from(be16([u[0], u[1]]));
            pkt.dst_port = u32::from(be16([u[2], u[3]]));
        }
        // ICMP belongs to IPv4 and ICMPv6 to IPv6; the other pairing is judged on
        // addresses alone, like any unknown transport.
        IPPROTO_ICMP | IPPROTO_ICMPV6 if (proto == IPPROTO_ICMP) == (pkt.ip_version == 4) => {
            if ptr_at::<8>(ctx, off).is_none() || off + 8 > ip_end {
                return Err(out);
            }
        }
        // Other transports (GRE, ESP, SCTP, ...) are judged on addresses alone.
        _ => return Ok(pkt),
    }
    pkt.flags |= decision_flags::L4_PARSED;
    Ok(pkt)
}
