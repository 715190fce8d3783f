//! The real XDP program run on crafted frames through BPF_PROG_TEST_RUN: parsing (Ethernet,
//! VLAN, IPv4 options and fragments, IPv6 extension headers, TCP), truncation at every byte,
//! the geo-fence with the real GeoIP database, and rule order. Each frame's whole verdict is
//! compared. Needs root.

use cloudlet::policy::Action;
use cloudlet::{
    dataplane::{
        classify::{ClassifyError, Verdict},
        xsk::XskSockets,
    },
    frame::{Ext, Frame, L4, TPID_8021AD, TPID_8021Q},
};
use cloudlet_common::MAX_IPV6_EXT_HEADERS;
use cloudlet_tests::progtest::{
    ARP_REQUEST, Case, ETH_HLEN, Expect, Program, case, country, ethernet, geoip_table, ip,
    ip_offset, patched, truncated_consistently,
};
use cloudlet_tests::reference::{self, Facts};

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_LLDP: u16 = 0x88cc;

/// The zones of the geo-fence tests: three countries of the EU, and the US.
const EU_AND_US: &str = r#"[zones.eu]
countries = ["DE", "FR", "NL"]

[zones.us]
countries = ["US"]
"#;

fn udp(src: &str, dst: &str, sport: u16, dport: u16) -> Frame {
    Frame::udp(ip(src), ip(dst), sport, dport)
}

fn tcp(src: &str, dst: &str, sport: u16, dport: u16, option_words: u8) -> Frame {
    udp(src, dst, 0, 0).l4(Some(L4::Tcp {
        sport,
        dport,
        flags: 0x02,
        option_words,
    }))
}

fn echo(src: &str, dst: &str) -> Frame {
    udp(src, dst, 0, 0).l4(Some(L4::Echo))
}

fn other(src: &str, dst: &str, proto: u8) -> Frame {
    udp(src, dst, 0, 0)
        .l4(Some(L4::Other(proto)))
        .payload(&[0, 0, 0x08, 0, 0xde, 0xad, 0xbe, 0xef])
}

/// An IPv6 frame with extension headers `ext` in front of `l4`.
fn v6_ext(dst: &str, ext: &[Ext], l4: Option<L4>) -> Frame {
    Frame {
        ipv6_ext: ext.to_vec(),
        ..udp("2001:db8::1", dst, 0, 0).l4(l4)
    }
}

const UDP: Option<L4> = Some(L4::Udp {
    sport: 5353,
    dport: 53,
});

/// Passes by default, drops malformed frames, and drops anything to the blocked networks:
/// enough to tell "judged by addresses" from "refused by the parser".
const BLOCKED_POLICY: &str = r#"
default = "pass"
malformed = "drop"
non_ip = "pass"

[[rules]]
name = "to-blocked"
dst_prefix = ["198.51.100.0/24", "2001:db8:bad::/48"]
action = "drop"
"#;

#[test]
fn frames_shorter_than_ethernet_are_refused_by_the_kernel() {
    let p = Program::new(BLOCKED_POLICY);
    let full = udp("192.0.2.1", "192.0.2.2", 1, 2).build();
    for len in 0..ETH_HLEN {
        match p.try_classify(&full[..len]) {
            Err(ClassifyError::TooShort(n)) => assert_eq!(n, len, "length {len}"),
            other => panic!("length {len}: expected TooShort, got {other:?}"),
        }
    }
    // Exactly an Ethernet header runs, and is an IPv4 packet without its header.
    p.check(
        "ethernet header only",
        &full[..ETH_HLEN],
        &Expect::malformed("drop", "malformed_ipv4").build(),
    );
}

#[test]
fn ethernet_non_ip() {
    let frames = || {
        vec![
            ("arp", ethernet(&[], ETH_P_ARP, &ARP_REQUEST), 0, 0),
            (
                "lldp",
                ethernet(&[], ETH_P_LLDP, &[0x02, 0x07, 0x04, 0, 0, 0, 0, 0, 1]),
                0,
                0,
            ),
            // Below 0x0600 the field is an 802.3 length, not an ethertype.
            (
                "802.3 length field",
                ethernet(&[], 0x002e, &[0xaa; 46]),
                0,
                0,
            ),
            ("arp header only", ethernet(&[], ETH_P_ARP, &[]), 0, 0),
            (
                "arp in 802.1Q",
                ethernet(&[(TPID_8021Q, 5)], ETH_P_ARP, &ARP_REQUEST),
                1,
                5,
            ),
            (
                "arp in QinQ",
                ethernet(
                    &[(TPID_8021AD, 300), (TPID_8021Q, 5)],
                    ETH_P_ARP,
                    &ARP_REQUEST,
                ),
                2,
                300,
            ),
        ]
    };
    for (policy, non_ip) in [
        ("default = \"drop\"\nnon_ip = \"pass\"\n", "pass"),
        ("default = \"pass\"\nnon_ip = \"drop\"\n", "drop"),
    ] {
        // A rule without criteria matches every IP packet, never a non-IP frame.
        let p = Program::new(&format!(
            "{policy}[[rules]]\nname = \"all-ip\"\naction = \"pass\"\n"
        ));
        let cases: Vec<Case> = frames()
            .into_iter()
            .map(|(name, frame, tags, outer)| {
                case(
                    format!("{name} (non_ip = {non_ip})"),
                    frame,
                    Expect::non_ip(non_ip).vlan(tags, outer),
                )
            })
            .collect();
        p.check_all(&cases);
    }
}

#[test]
fn ethernet_ip_transports() {
    let p = Program::new(BLOCKED_POLICY);
    let v4 = ("192.0.2.1", "192.0.2.2", "198.51.100.7");
    let v6 = ("2001:db8::1", "2001:db8::2", "2001:db8:bad::7");
    let mut cases = Vec::new();
    for (version, (src, ok, blocked), echo_proto) in [(4, v4, 1), (6, v6, 58)] {
        let n = |s: &str| format!("ipv{version} {s}");
        cases.extend([
            case(
                n("udp"),
                udp(src, ok, 40000, 53).build(),
                Expect::default("pass").ip(version, 17).ports(40000, 53),
            ),
            case(
                n("udp to blocked"),
                udp(src, blocked, 40000, 53).build(),
                Expect::rule("drop", "to-blocked")
                    .ip(version, 17)
                    .ports(40000, 53),
            ),
            case(
                n("tcp syn"),
                tcp(src, ok, 40001, 443, 0).build(),
                Expect::default("pass").ip(version, 6).ports(40001, 443),
            ),
            case(
                n("tcp syn with options to blocked"),
                tcp(src, blocked, 40001, 443, 5).build(),
                Expect::rule("drop", "to-blocked")
                    .ip(version, 6)
                    .ports(40001, 443),
            ),
            case(
                n("echo"),
                echo(src, ok).build(),
                Expect::default("pass").ip(version, echo_proto),
            ),
            case(
                n("echo to blocked"),
                echo(src, blocked).build(),
                Expect::rule("drop", "to-blocked").ip(version, echo_proto),
            ),
            case(
                n("echo without payload"),
                echo(src, ok).payload(&[]).build(),
                Expect::default("pass").ip(version, echo_proto),
            ),
            case(
                n("gre"),
                other(src, ok, 47).build(),
                Expect::default("pass").ip(version, 47),
            ),
            case(
                n("gre to blocked"),
                other(src, blocked, 47).build(),
                Expect::rule("drop", "to-blocked").ip(version, 47),
            ),
            case(
                n("esp without payload to blocked"),
                other(src, blocked, 50).payload(&[]).build(),
                Expect::rule("drop", "to-blocked").ip(version, 50),
            ),
            case(
                n("udp with ethernet padding"),
                {
                    let mut f = udp(src, ok, 7, 9).payload(&[]).build();
                    f.resize(f.len().max(60) + 4, 0);
                    f
                },
                Expect::default("pass").ip(version, 17).ports(7, 9),
            ),
        ]);
    }
    cases.push(case(
        "ipv6 carrying protocol 1",
        other("2001:db8::1", "2001:db8::2", 1).build(),
        Expect::default("pass").ip(6, 1),
    ));
    // ICMP in IPv6 and ICMPv6 in IPv4 are not checked as ICMP: a short body is no error.
    cases.push(case(
        "ipv6 carrying protocol 1 with a 4-byte body",
        other("2001:db8::1", "2001:db8::2", 1)
            .payload(&[8, 0, 0, 0])
            .build(),
        Expect::default("pass").ip(6, 1),
    ));
    cases.push(case(
        "ipv4 carrying protocol 58 with a 4-byte body",
        other("192.0.2.1", "192.0.2.2", 58)
            .payload(&[128, 0, 0, 0])
            .build(),
        Expect::default("pass").ip(4, 58),
    ));
    cases.push(case(
        "ipv4 icmp with a 4-byte body is truncated",
        other("192.0.2.1", "192.0.2.2", 1)
            .payload(&[8, 0, 0, 0])
            .build(),
        Expect::malformed("drop", "malformed_l4"),
    ));
    p.check_all(&cases);
}

#[test]
fn vlan_tags() {
    let p = Program::new(BLOCKED_POLICY);
    let tagged = |f: Frame, tags: &[(u16, u16)]| {
        let mut f = f;
        for &(tpid, id) in tags {
            f = f.vlan(tpid, id);
        }
        f.build()
    };
    let v4 = || udp("192.0.2.1", "192.0.2.2", 1000, 2000);
    let cases = vec![
        case(
            "802.1Q",
            tagged(v4(), &[(TPID_8021Q, 100)]),
            Expect::default("pass")
                .ip(4, 17)
                .ports(1000, 2000)
                .vlan(1, 100),
        ),
        case(
            "802.1Q with priority bits set",
            patched(tagged(v4(), &[(TPID_8021Q, 100)]), ETH_HLEN, &[0xe0, 0x64]),
            Expect::default("pass")
                .ip(4, 17)
                .ports(1000, 2000)
                .vlan(1, 100),
        ),
        case(
            "802.1Q priority tag (id 0)",
            tagged(v4(), &[(TPID_8021Q, 0)]),
            Expect::default("pass")
                .ip(4, 17)
                .ports(1000, 2000)
                .vlan(1, 0),
        ),
        case(
            "802.1Q id 4095",
            tagged(v4(), &[(TPID_8021Q, 4095)]),
            Expect::default("pass")
                .ip(4, 17)
                .ports(1000, 2000)
                .vlan(1, 4095),
        ),
        case(
            "802.1ad alone, ipv6 tcp to blocked",
            tagged(
                tcp("2001:db8::1", "2001:db8:bad::1", 1, 22, 0),
                &[(TPID_8021AD, 7)],
            ),
            Expect::rule("drop", "to-blocked")
                .ip(6, 6)
                .ports(1, 22)
                .vlan(1, 7),
        ),
        case(
            "QinQ 802.1ad + 802.1Q",
            tagged(v4(), &[(TPID_8021AD, 10), (TPID_8021Q, 20)]),
            Expect::default("pass")
                .ip(4, 17)
                .ports(1000, 2000)
                .vlan(2, 10),
        ),
        case(
            "QinQ to blocked",
            tagged(
                udp("192.0.2.1", "198.51.100.1", 1000, 2000),
                &[(TPID_8021AD, 10), (TPID_8021Q, 20)],
            ),
            Expect::rule("drop", "to-blocked")
                .ip(4, 17)
                .ports(1000, 2000)
                .vlan(2, 10),
        ),
        case(
            "QinQ ipv6 icmpv6",
            tagged(
                echo("2001:db8::1", "2001:db8::2"),
                &[(TPID_8021AD, 4000), (TPID_8021Q, 1)],
            ),
            Expect::default("pass").ip(6, 58).vlan(2, 4000),
        ),
        case(
            "double 802.1Q",
            tagged(v4(), &[(TPID_8021Q, 10), (TPID_8021Q, 20)]),
            Expect::default("pass")
                .ip(4, 17)
                .ports(1000, 2000)
                .vlan(2, 10),
        ),
        case(
            "802.1Q outside 802.1ad",
            tagged(v4(), &[(TPID_8021Q, 10), (TPID_8021AD, 20)]),
            Expect::default("pass")
                .ip(4, 17)
                .ports(1000, 2000)
                .vlan(2, 10),
        ),
        case(
            "three tags",
            tagged(
                v4(),
                &[(TPID_8021AD, 10), (TPID_8021Q, 20), (TPID_8021Q, 30)],
            ),
            Expect::malformed("drop", "malformed_vlan").vlan(2, 10),
        ),
        case(
            "three tags to blocked",
            tagged(
                udp("192.0.2.1", "198.51.100.1", 1, 2),
                &[(TPID_8021Q, 1), (TPID_8021Q, 2), (TPID_8021Q, 3)],
            ),
            Expect::malformed("drop", "malformed_vlan").vlan(2, 1),
        ),
        case(
            "tag without anything after it",
            ethernet(&[], TPID_8021Q, &[0x00, 0x64]),
            Expect::malformed("drop", "malformed_vlan"),
        ),
    ];
    p.check_all(&cases);
}

#[test]
fn ipv4_header() {
    let p = Program::new(BLOCKED_POLICY);
    let base = || udp("192.0.2.1", "198.51.100.9", 1000, 2000);
    let ok = || {
        Expect::rule("drop", "to-blocked")
            .ip(4, 17)
            .ports(1000, 2000)
    };
    let bad = || Expect::malformed("drop", "malformed_ipv4");
    // Byte offsets in an untagged frame.
    const VER_IHL: usize = ETH_HLEN;
    const TOTAL_LEN: usize = ETH_HLEN + 2;
    let full = base().build();
    let total = (full.len() - ETH_HLEN) as u16;

    let mut cases = vec![case("ihl 5", full.clone(), ok())];
    for ihl in 6..=15u8 {
        // NOP options up to the last word, which ends with End of Option List.
        let mut opts = vec![0x01; (usize::from(ihl) - 5) * 4];
        *opts.last_mut().expect("at least one option word") = 0x00;
        let f = Frame {
            ipv4_options: opts,
            ..base()
        }
        .build();
        assert_eq!(f[VER_IHL], 0x40 | ihl, "frame builder IHL");
        cases.push(case(format!("ihl {ihl} (options)"), f, ok()));
    }
    for ihl in 0..5u8 {
        cases.push(case(
            format!("ihl {ihl}"),
            patched(full.clone(), VER_IHL, &[0x40 | ihl]),
            bad(),
        ));
    }
    for version in [0u8, 5, 6, 15] {
        cases.push(case(
            format!("version {version}"),
            patched(full.clone(), VER_IHL, &[(version << 4) | 5]),
            bad(),
        ));
    }
    cases.extend([
        case(
            "total length one past the frame",
            patched(full.clone(), TOTAL_LEN, &(total + 1).to_be_bytes()),
            bad(),
        ),
        case(
            "total length 65535",
            patched(full.clone(), TOTAL_LEN, &[0xff, 0xff]),
            bad(),
        ),
        case(
            "total length 19 (below the header)",
            patched(full.clone(), TOTAL_LEN, &19u16.to_be_bytes()),
            bad(),
        ),
        case(
            "total length 0",
            patched(full.clone(), TOTAL_LEN, &[0, 0]),
            bad(),
        ),
        case(
            "total length below ihl with options",
            {
                let f = Frame {
                    ipv4_options: vec![0x01; 4],
                    ..base()
                }
                .build();
                patched(f, TOTAL_LEN, &20u16.to_be_bytes())
            },
            bad(),
        ),
        case(
            "ihl 15 in a frame that ends inside the options",
            patched(
                udp("192.0.2.1", "198.51.100.9", 1, 2)
                    .l4(None)
                    .payload(&[])
                    .build(),
                VER_IHL,
                &[0x4f],
            ),
            bad(),
        ),
        // The frame still carries the UDP header, but the IP packet ends before it.
        case(
            "total length 20: udp header outside the packet",
            patched(full.clone(), TOTAL_LEN, &20u16.to_be_bytes()),
            Expect::malformed("drop", "malformed_l4"),
        ),
        // Shorter than the frame is fine (Ethernet padding).
        case(
            "total length shorter than the frame",
            {
                let mut f = full.clone();
                f.extend_from_slice(&[0; 12]);
                f
            },
            ok(),
        ),
        case(
            "total length shorter than the frame, udp header inside",
            patched(full.clone(), TOTAL_LEN, &28u16.to_be_bytes()),
            ok(),
        ),
        case(
            "ipv4 ethertype over an ipv6 header",
            {
                let mut f = udp("2001:db8::1", "2001:db8::2", 1, 2).build();
                f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
                f
            },
            bad(),
        ),
    ]);
    p.check_all(&cases);
}

#[test]
fn ipv4_fragments() {
    let p = Program::new(BLOCKED_POLICY);
    let frag = |dst: &str, offset: u16, more: bool, l4: Option<L4>, payload: &[u8]| {
        Frame {
            ipv4_fragment: (offset, more),
            ..udp("192.0.2.1", dst, 0, 0).l4(l4).payload(payload)
        }
        .build()
    };
    let udp_l4 = Some(L4::Udp {
        sport: 4000,
        dport: 4789,
    });
    let body = [0x5a; 24];
    let mut non_first_tcp = frag("198.51.100.1", 100, true, None, &[1, 2, 3]);
    non_first_tcp[ETH_HLEN + 9] = 6;
    let cases = vec![
        case(
            "first fragment",
            frag("192.0.2.2", 0, true, udp_l4, &body),
            Expect::default("pass")
                .ip(4, 17)
                .ports(4000, 4789)
                .fragment("first"),
        ),
        case(
            "first fragment to blocked",
            frag("198.51.100.1", 0, true, udp_l4, &body),
            Expect::rule("drop", "to-blocked")
                .ip(4, 17)
                .ports(4000, 4789)
                .fragment("first"),
        ),
        case(
            "non-first fragment",
            frag("192.0.2.2", 185, true, None, &body),
            Expect::default("pass").ip(4, 17).fragment("non_first"),
        ),
        case(
            "last fragment to blocked",
            frag("198.51.100.1", 370, false, None, &body),
            Expect::rule("drop", "to-blocked")
                .ip(4, 17)
                .fragment("non_first"),
        ),
        // A non-first fragment carries no transport header, so three bytes are not "short".
        case(
            "non-first tcp fragment shorter than a tcp header",
            non_first_tcp,
            Expect::rule("drop", "to-blocked")
                .ip(4, 6)
                .fragment("non_first"),
        ),
        case(
            "non-first fragment with an empty body",
            frag("192.0.2.2", 1, false, None, &[]),
            Expect::default("pass").ip(4, 17).fragment("non_first"),
        ),
        // The first fragment must hold the whole transport header.
        case(
            "first fragment with half a udp header",
            frag("192.0.2.2", 0, true, None, &[0x0f, 0xa0, 0x12, 0xb5]),
            Expect::malformed("drop", "malformed_l4"),
        ),
        case(
            "first fragment of an echo",
            Frame {
                ipv4_fragment: (0, true),
                ..echo("192.0.2.1", "198.51.100.1")
            }
            .build(),
            Expect::rule("drop", "to-blocked")
                .ip(4, 1)
                .fragment("first"),
        ),
        case(
            "don't fragment bit is not a fragment",
            patched(
                udp("192.0.2.1", "192.0.2.2", 1, 2).build(),
                ETH_HLEN + 6,
                &[0x40, 0x00],
            ),
            Expect::default("pass").ip(4, 17).ports(1, 2),
        ),
    ];
    p.check_all(&cases);
}

#[test]
fn ipv6_extension_headers() {
    let p = Program::new(BLOCKED_POLICY);
    let ok = |ext: u32| Expect::default("pass").ip(6, 17).ports(5353, 53).ext(ext);
    let hbh = Ext::HopByHop { units: 0 };
    let dst_opts = Ext::DestOpts { units: 1 };
    let routing = Ext::Routing { units: 2 };
    let first_frag = Ext::Fragment {
        offset: 0,
        more: true,
    };
    let later_frag = Ext::Fragment {
        offset: 100,
        more: true,
    };
    let max = MAX_IPV6_EXT_HEADERS as usize;
    // Chains of 8 and 9 headers of every kind, the fragment header once.
    let chain = |n: usize| -> Vec<Ext> {
        let kinds = [hbh, dst_opts, routing, first_frag];
        (0..n)
            .map(|i| match kinds[i % kinds.len()] {
                Ext::Fragment { .. } if i >= kinds.len() => Ext::DestOpts { units: 0 },
                e => e,
            })
            .collect()
    };
    assert_eq!(max, 8, "the chain cases are written for 8 headers");
    const PAYLOAD_LEN: usize = ETH_HLEN + 4;
    const FIRST_EXT: usize = ETH_HLEN + 40;

    let cases = vec![
        case(
            "no extension headers",
            v6_ext("2001:db8::2", &[], UDP).build(),
            ok(0),
        ),
        case(
            "hop-by-hop",
            v6_ext("2001:db8::2", &[hbh], UDP).build(),
            ok(1),
        ),
        case(
            "hop-by-hop of 2048 bytes",
            v6_ext("2001:db8::2", &[Ext::HopByHop { units: 255 }], UDP).build(),
            ok(1),
        ),
        case(
            "routing",
            v6_ext("2001:db8::2", &[routing], UDP).build(),
            ok(1),
        ),
        case(
            "destination options",
            v6_ext("2001:db8::2", &[dst_opts], UDP).build(),
            ok(1),
        ),
        case(
            "first fragment",
            v6_ext("2001:db8::2", &[first_frag], UDP).build(),
            ok(1).fragment("first"),
        ),
        case(
            "atomic fragment (offset 0, no more fragments)",
            v6_ext(
                "2001:db8::2",
                &[Ext::Fragment {
                    offset: 0,
                    more: false,
                }],
                UDP,
            )
            .build(),
            ok(1).fragment("first"),
        ),
        case(
            "non-first fragment to blocked",
            v6_ext("2001:db8:bad::1", &[later_frag], None)
                .payload(&[0x5a; 16])
                .build(),
            Expect::rule("drop", "to-blocked")
                .ip(6, 17)
                .ext(1)
                .fragment("non_first"),
        ),
        case(
            "non-first fragment after hop-by-hop, empty body",
            v6_ext("2001:db8::2", &[hbh, later_frag], None)
                .payload(&[])
                .build(),
            Expect::default("pass")
                .ip(6, 17)
                .ext(2)
                .fragment("non_first"),
        ),
        case(
            "non-first fragment whose data looks like an overlong header",
            {
                // The fragment's next header says destination options, but what follows
                // is fragment data: its "length" byte must not be read as a header's.
                let mut f = v6_ext(
                    "2001:db8::2",
                    &[later_frag, Ext::DestOpts { units: 0 }],
                    None,
                )
                .payload(&[])
                .build();
                f[FIRST_EXT + 8 + 1] = 255;
                f
            },
            Expect::default("pass")
                .ip(6, 60)
                .ext(1)
                .fragment("non_first"),
        ),
        case(
            "hop-by-hop, routing, fragment, destination options, tcp",
            v6_ext(
                "2001:db8:bad::1",
                &[hbh, routing, first_frag, dst_opts],
                Some(L4::Tcp {
                    sport: 1,
                    dport: 179,
                    flags: 0x02,
                    option_words: 1,
                }),
            )
            .build(),
            Expect::rule("drop", "to-blocked")
                .ip(6, 6)
                .ports(1, 179)
                .ext(4)
                .fragment("first"),
        ),
        case(
            "destination options then icmpv6",
            v6_ext("2001:db8::2", &[dst_opts], Some(L4::Echo)).build(),
            Expect::default("pass").ip(6, 58).ext(1),
        ),
        case(
            format!("chain of {max}"),
            v6_ext("2001:db8::2", &chain(max), UDP).build(),
            ok(8).fragment("first"),
        ),
        case(
            format!("chain of {max} to blocked, icmpv6"),
            v6_ext("2001:db8:bad::1", &chain(max), Some(L4::Echo)).build(),
            Expect::rule("drop", "to-blocked")
                .ip(6, 58)
                .ext(8)
                .fragment("first"),
        ),
        case(
            format!("chain of {max} hop-by-hop headers"),
            v6_ext("2001:db8::2", &vec![hbh; max], UDP).build(),
            ok(8),
        ),
        case(
            format!("chain of {}", max + 1),
            v6_ext("2001:db8::2", &chain(max + 1), UDP).build(),
            Expect::malformed("drop", "malformed_ipv6_ext_chain"),
        ),
        case(
            format!("chain of {} to blocked", max + 1),
            v6_ext("2001:db8:bad::1", &vec![dst_opts; max + 1], UDP).build(),
            Expect::malformed("drop", "malformed_ipv6_ext_chain"),
        ),
        case(
            "hop-by-hop length past the frame",
            patched(
                v6_ext("2001:db8::2", &[hbh], UDP).build(),
                FIRST_EXT + 1,
                &[255],
            ),
            Expect::malformed("drop", "malformed_ipv6_ext"),
        ),
        case(
            "routing length one unit past the frame",
            {
                let f = v6_ext("2001:db8::2", &[routing], None).payload(&[]).build();
                patched(f, FIRST_EXT + 1, &[3])
            },
            Expect::malformed("drop", "malformed_ipv6_ext"),
        ),
        case(
            "destination options past the payload length, inside the frame",
            {
                let f = v6_ext("2001:db8::2", &[dst_opts], UDP).build();
                patched(f, PAYLOAD_LEN, &8u16.to_be_bytes())
            },
            Expect::malformed("drop", "malformed_ipv6_ext"),
        ),
        case(
            "fragment header cut short",
            {
                let f = v6_ext("2001:db8::2", &[first_frag], None)
                    .payload(&[])
                    .build();
                truncated_consistently(&f, f.len() - 2)
            },
            Expect::malformed("drop", "malformed_ipv6_ext"),
        ),
        case(
            "fragment header past the payload length, inside the frame",
            {
                let f = v6_ext("2001:db8::2", &[first_frag], UDP).build();
                patched(f, PAYLOAD_LEN, &4u16.to_be_bytes())
            },
            Expect::malformed("drop", "malformed_ipv6_ext"),
        ),
        case(
            "udp past the payload length, inside the frame",
            {
                let f = v6_ext("2001:db8::2", &[hbh], UDP).build();
                patched(f, PAYLOAD_LEN, &12u16.to_be_bytes())
            },
            Expect::malformed("drop", "malformed_l4"),
        ),
        case(
            "payload length one past the frame",
            {
                let f = v6_ext("2001:db8::2", &[hbh], UDP).build();
                let len = (f.len() - FIRST_EXT + 1) as u16;
                patched(f, PAYLOAD_LEN, &len.to_be_bytes())
            },
            Expect::malformed("drop", "malformed_ipv6"),
        ),
        // RFC 2675 jumbogram shape: a zero payload length, the frame bounds the packet.
        case(
            "payload length 0",
            patched(
                v6_ext("2001:db8::2", &[hbh], UDP).build(),
                PAYLOAD_LEN,
                &[0, 0],
            ),
            ok(1),
        ),
        case(
            "version 4 under the ipv6 ethertype",
            patched(v6_ext("2001:db8::2", &[], UDP).build(), ETH_HLEN, &[0x40]),
            Expect::malformed("drop", "malformed_ipv6"),
        ),
        case(
            "version 0 under the ipv6 ethertype",
            patched(v6_ext("2001:db8::2", &[], UDP).build(), ETH_HLEN, &[0x00]),
            Expect::malformed("drop", "malformed_ipv6"),
        ),
        // No Next Header (59) and AH (51) end the walk: judged on addresses alone.
        case(
            "no next header",
            v6_ext("2001:db8:bad::1", &[dst_opts], Some(L4::Other(59)))
                .payload(&[])
                .build(),
            Expect::rule("drop", "to-blocked").ip(6, 59).ext(1),
        ),
        case(
            "authentication header is not walked",
            v6_ext("2001:db8::2", &[hbh], Some(L4::Other(51)))
                .payload(&[17, 4, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0])
                .build(),
            Expect::default("pass").ip(6, 51).ext(1),
        ),
    ];
    p.check_all(&cases);
}

#[test]
fn tcp_header() {
    let p = Program::new(BLOCKED_POLICY);
    let mut cases = Vec::new();
    for (version, src, dst) in [
        (4, "192.0.2.1", "198.51.100.1"),
        (6, "2001:db8::1", "2001:db8:bad::1"),
    ] {
        let n = |s: &str| format!("ipv{version} {s}");
        let f = |words: u8| tcp(src, dst, 33000, 80, words);
        let doff_at = ip_offset(&f(0).build()) + if version == 4 { 20 } else { 40 } + 12;
        let ok = || {
            Expect::rule("drop", "to-blocked")
                .ip(version, 6)
                .ports(33000, 80)
        };
        let bad = || Expect::malformed("drop", "malformed_l4");
        cases.extend([
            case(n("data offset 5"), f(0).build(), ok()),
            case(n("data offset 15"), f(10).build(), ok()),
            case(
                n("data offset 5, no payload"),
                f(0).payload(&[]).build(),
                ok(),
            ),
            case(
                n("data offset 4"),
                patched(f(0).build(), doff_at, &[0x40]),
                bad(),
            ),
            case(
                n("data offset 0"),
                patched(f(0).build(), doff_at, &[0x00]),
                bad(),
            ),
            case(
                n("data offset 15, options past the frame"),
                patched(f(0).build(), doff_at, &[0xf0]),
                bad(),
            ),
            case(
                n("options one word past the frame"),
                patched(f(2).payload(&[]).build(), doff_at, &[0x80]),
                bad(),
            ),
            case(
                n("options past the ip packet, inside the frame"),
                {
                    let mut frame = patched(f(0).payload(&[]).build(), doff_at, &[0x60]);
                    frame.extend_from_slice(&[0; 8]);
                    frame
                },
                bad(),
            ),
            case(
                n("tcp header cut short"),
                {
                    let frame = f(0).payload(&[]).build();
                    truncated_consistently(&frame, frame.len() - 1)
                },
                bad(),
            ),
        ]);
    }
    p.check_all(&cases);
}

/// Where cutting a frame lands: lengths below `end` (and at or past the previous region's
/// end) are cut inside this region.
struct Region {
    end: usize,
    /// VLAN tags fully read before the cut.
    vlan_tags: u32,
    /// The reason when only the frame is cut (IP length fields left as they were).
    cut: &'static str,
    /// The reason when the IP length is rewritten to agree; `None` where the packet is
    /// then well formed (only payload is missing).
    consistent: Option<&'static str>,
}

struct TruncationFrame {
    name: &'static str,
    frame: Vec<u8>,
    outer_vlan: u16,
    regions: Vec<Region>,
    ip_version: u32,
    proto: u32,
    ports: Option<(u16, u16)>,
    ext_headers: u32,
    fragment: Option<&'static str>,
}

fn region(
    end: usize,
    vlan_tags: u32,
    cut: &'static str,
    consistent: Option<&'static str>,
) -> Region {
    Region {
        end,
        vlan_tags,
        cut,
        consistent,
    }
}

fn truncation_frames() -> Vec<TruncationFrame> {
    let ipv4_udp = udp("192.0.2.1", "192.0.2.2", 1111, 2222).build();
    let ipv4_opts_tcp = Frame {
        ipv4_options: vec![0x01; 8],
        ..tcp("192.0.2.1", "192.0.2.2", 3333, 443, 3)
    }
    .build();
    let vlan_ipv6 = Frame {
        ipv6_ext: vec![
            Ext::HopByHop { units: 0 },
            Ext::Routing { units: 1 },
            Ext::Fragment {
                offset: 0,
                more: true,
            },
            Ext::DestOpts { units: 0 },
        ],
        ..udp("2001:db8::1", "2001:db8::2", 5555, 6666).vlan(TPID_8021Q, 100)
    }
    .build();
    let qinq_icmp = echo("192.0.2.1", "192.0.2.2")
        .vlan(TPID_8021AD, 10)
        .vlan(TPID_8021Q, 20)
        .build();
    let (v4, v6) = ("malformed_ipv4", "malformed_ipv6");
    let (vlan, ext, l4) = ("malformed_vlan", "malformed_ipv6_ext", "malformed_l4");
    vec![
        TruncationFrame {
            name: "ipv4/udp",
            regions: vec![
                region(34, 0, v4, Some(v4)),
                region(42, 0, v4, Some(l4)),
                region(ipv4_udp.len(), 0, v4, None),
            ],
            frame: ipv4_udp,
            outer_vlan: 0,
            ip_version: 4,
            proto: 17,
            ports: Some((1111, 2222)),
            ext_headers: 0,
            fragment: None,
        },
        TruncationFrame {
            name: "ipv4 with options/tcp with options",
            regions: vec![
                region(34, 0, v4, Some(v4)),
                region(42, 0, v4, Some(v4)),
                region(62, 0, v4, Some(l4)),
                region(74, 0, v4, Some(l4)),
                region(ipv4_opts_tcp.len(), 0, v4, None),
            ],
            frame: ipv4_opts_tcp,
            outer_vlan: 0,
            ip_version: 4,
            proto: 6,
            ports: Some((3333, 443)),
            ext_headers: 0,
            fragment: None,
        },
        TruncationFrame {
            name: "802.1Q/ipv6/hop-by-hop/routing/fragment/destination options/udp",
            regions: vec![
                region(18, 0, vlan, Some(vlan)),
                region(58, 1, v6, Some(v6)),
                region(66, 1, v6, Some(ext)),
                region(82, 1, v6, Some(ext)),
                region(90, 1, v6, Some(ext)),
                region(98, 1, v6, Some(ext)),
                region(106, 1, v6, Some(l4)),
                region(vlan_ipv6.len(), 1, v6, None),
            ],
            frame: vlan_ipv6,
            outer_vlan: 100,
            ip_version: 6,
            proto: 17,
            ports: Some((5555, 6666)),
            ext_headers: 4,
            fragment: Some("first"),
        },
        TruncationFrame {
            name: "QinQ/ipv4/icmp echo",
            regions: vec![
                region(18, 0, vlan, Some(vlan)),
                region(22, 1, vlan, Some(vlan)),
                region(42, 2, v4, Some(v4)),
                region(50, 2, v4, Some(l4)),
                region(qinq_icmp.len(), 2, v4, None),
            ],
            frame: qinq_icmp,
            outer_vlan: 10,
            ip_version: 4,
            proto: 1,
            ports: None,
            ext_headers: 0,
            fragment: None,
        },
    ]
}

#[test]
fn truncation_at_every_boundary() {
    let frames = truncation_frames();
    for (default, malformed) in [("pass", "drop"), ("drop", "pass")] {
        let p = Program::new(&format!(
            "default = \"{default}\"\nmalformed = \"{malformed}\"\n"
        ));
        let mut cases = Vec::new();
        for t in &frames {
            let whole = |mut e: Expect| {
                e = e
                    .ip(t.ip_version, t.proto)
                    .ext(t.ext_headers)
                    .vlan(t.regions.last().map_or(0, |r| r.vlan_tags), t.outer_vlan);
                if let Some((s, d)) = t.ports {
                    e = e.ports(s, d);
                }
                if let Some(which) = t.fragment {
                    e = e.fragment(which);
                }
                e
            };
            let last = t.regions.last().expect("regions");
            assert_eq!(
                last.end,
                t.frame.len(),
                "{}: regions must cover the frame",
                t.name
            );
            cases.push(case(
                format!("{}: whole frame", t.name),
                t.frame.clone(),
                whole(Expect::default(default)),
            ));
            let mut start = ETH_HLEN;
            for r in &t.regions {
                assert!(r.end > start, "{}: regions must grow", t.name);
                for len in start..r.end {
                    let name =
                        |how: &str| format!("{}: {how} to {len} of {}", t.name, t.frame.len());
                    let malformed_at = |reason| {
                        Expect::malformed(malformed, reason).vlan(r.vlan_tags, t.outer_vlan)
                    };
                    cases.push(case(
                        name("cut"),
                        t.frame[..len].to_vec(),
                        malformed_at(r.cut),
                    ));
                    let consistent = truncated_consistently(&t.frame, len);
                    let want = match r.consistent {
                        Some(reason) => malformed_at(reason),
                        // Only payload is missing and the IP length says so: well formed.
                        None => whole(Expect::default(default)),
                    };
                    cases.push(case(name("cut with IP length rewritten"), consistent, want));
                }
                start = r.end;
            }
        }
        // The blanket properties, on top of the exact verdicts.
        for c in &cases {
            assert_ne!(c.want.xdp, "XDP_ABORTED", "{}", c.name);
            let got = p.classify(&c.name, &c.frame);
            assert_ne!(got.xdp, "XDP_ABORTED", "case {}", c.name);
            if c.want.reason.starts_with("malformed_") {
                assert_eq!(
                    got.verdict, malformed,
                    "case {}: the malformed action",
                    c.name
                );
            }
        }
        p.check_all(&cases);
    }
}

/// Asserts that the database puts `addr` in `want` (or in none of `not_in`), so a
/// database update that moves an address fails here, not in a verdict.
fn assert_country(addr: &str, want: Option<&str>, not_in: &[&str]) {
    let got = country(ip(addr));
    match want {
        Some(code) => assert_eq!(got.as_deref(), Some(code), "country of {addr}"),
        None => assert!(
            got.as_deref().is_none_or(|c| !not_in.contains(&c)),
            "{addr} is in {got:?}, which a zone of the test names; pick another address"
        ),
    }
}

#[test]
fn geo_fence_both_directions() {
    let policy = format!(
        r#"
default = "pass"
{geoip}
{zones}
[[rules]]
name = "admin-only-from-eu"
src_zone = "!eu"
dst_prefix = ["192.0.2.0/24", "2001:db8:a::/48"]
action = "drop"

[[rules]]
name = "nothing-to-us"
dst_zone = "us"
action = "drop"
"#,
        geoip = geoip_table(),
        zones = EU_AND_US,
    );
    let zone_countries = ["DE", "FR", "NL", "US"];
    let known = [
        ("85.214.132.117", Some("DE")),
        ("62.210.16.6", Some("FR")),
        ("194.109.6.66", Some("NL")),
        ("8.8.8.8", Some("US")),
        ("8.8.4.4", Some("US")),
        ("1.1.1.1", Some("AU")),
        ("192.0.2.10", None),
        ("192.0.2.99", None),
        ("2001:db8:b::10", None),
        ("2a01:4f8:c0c:1234::1", Some("DE")),
        ("2001:41d0:8:1::1", Some("FR")),
        ("2001:610:1::1", Some("NL")),
        ("2001:4860:4860::8888", Some("US")),
        ("2001:dc0::1", Some("AU")),
        ("2001:db8:a::10", None),
    ];
    for (addr, want) in known {
        assert_country(addr, want, &zone_countries);
    }

    let p = Program::new(&policy);
    let flow = |src: &str, dst: &str| udp(src, dst, 50000, 22).build();
    let admin = |e: Expect, v: u32| e.ip(v, 17).ports(50000, 22);
    let cases = vec![
        case(
            "DE to admin",
            flow("85.214.132.117", "192.0.2.10"),
            admin(Expect::default("pass"), 4).src_zones(&["eu"]),
        ),
        case(
            "FR to admin",
            flow("62.210.16.6", "192.0.2.10"),
            admin(Expect::default("pass"), 4).src_zones(&["eu"]),
        ),
        case(
            "NL to admin",
            flow("194.109.6.66", "192.0.2.10"),
            admin(Expect::default("pass"), 4).src_zones(&["eu"]),
        ),
        case(
            "US to admin",
            flow("8.8.8.8", "192.0.2.10"),
            admin(Expect::rule("drop", "admin-only-from-eu"), 4).src_zones(&["us"]),
        ),
        case(
            "AU (no zone) to admin",
            flow("1.1.1.1", "192.0.2.10"),
            admin(Expect::rule("drop", "admin-only-from-eu"), 4),
        ),
        case(
            "admin's own network to admin",
            flow("192.0.2.99", "192.0.2.10"),
            admin(Expect::rule("drop", "admin-only-from-eu"), 4),
        ),
        case(
            "DE to US",
            flow("85.214.132.117", "8.8.4.4"),
            admin(Expect::rule("drop", "nothing-to-us"), 4)
                .src_zones(&["eu"])
                .dst_zones(&["us"]),
        ),
        case(
            "US to US",
            flow("8.8.8.8", "8.8.4.4"),
            admin(Expect::rule("drop", "nothing-to-us"), 4)
                .src_zones(&["us"])
                .dst_zones(&["us"]),
        ),
        case(
            "US to DE",
            flow("8.8.8.8", "85.214.132.117"),
            admin(Expect::default("pass"), 4)
                .src_zones(&["us"])
                .dst_zones(&["eu"]),
        ),
        case(
            "AU to FR",
            flow("1.1.1.1", "62.210.16.6"),
            admin(Expect::default("pass"), 4).dst_zones(&["eu"]),
        ),
        case(
            "admin to US",
            flow("192.0.2.10", "8.8.8.8"),
            admin(Expect::rule("drop", "nothing-to-us"), 4).dst_zones(&["us"]),
        ),
        case(
            "v6 DE to admin",
            flow("2a01:4f8:c0c:1234::1", "2001:db8:a::10"),
            admin(Expect::default("pass"), 6).src_zones(&["eu"]),
        ),
        case(
            "v6 FR to admin",
            flow("2001:41d0:8:1::1", "2001:db8:a::10"),
            admin(Expect::default("pass"), 6).src_zones(&["eu"]),
        ),
        case(
            "v6 US to admin",
            flow("2001:4860:4860::8888", "2001:db8:a::10"),
            admin(Expect::rule("drop", "admin-only-from-eu"), 6).src_zones(&["us"]),
        ),
        case(
            "v6 AU to admin",
            flow("2001:dc0::1", "2001:db8:a::10"),
            admin(Expect::rule("drop", "admin-only-from-eu"), 6),
        ),
        case(
            "v6 NL to US",
            flow("2001:610:1::1", "2001:4860:4860::8888"),
            admin(Expect::rule("drop", "nothing-to-us"), 6)
                .src_zones(&["eu"])
                .dst_zones(&["us"]),
        ),
        case(
            "v6 US to NL",
            flow("2001:4860:4860::8888", "2001:610:1::1"),
            admin(Expect::default("pass"), 6)
                .src_zones(&["us"])
                .dst_zones(&["eu"]),
        ),
        case(
            "v6 admin outside the admin /48 from AU",
            flow("2001:dc0::1", "2001:db8:b::10"),
            admin(Expect::default("pass"), 6),
        ),
        // Zones hold for tagged frames and non-first fragments too.
        case(
            "US to admin in QinQ",
            udp("8.8.8.8", "192.0.2.10", 50000, 22)
                .vlan(TPID_8021AD, 3)
                .vlan(TPID_8021Q, 4)
                .build(),
            admin(Expect::rule("drop", "admin-only-from-eu"), 4)
                .src_zones(&["us"])
                .vlan(2, 3),
        ),
        case(
            "DE to US, non-first fragment",
            Frame {
                ipv4_fragment: (64, false),
                ..udp("85.214.132.117", "8.8.4.4", 0, 0).l4(None)
            }
            .build(),
            Expect::rule("drop", "nothing-to-us")
                .ip(4, 17)
                .fragment("non_first")
                .src_zones(&["eu"])
                .dst_zones(&["us"]),
        ),
    ];
    p.check_all(&cases);
}

#[test]
fn longest_prefix_wins_between_zones() {
    let policy = format!(
        r#"
default = "pass"
{geoip}
# A /24 and a /48 inside German networks, claimed by another zone.
[zones.corp]
prefixes = ["85.214.132.0/24", "2a01:4f8:c0c::/48"]

# DE is in both of these.
[zones.dach]
countries = ["DE", "AT", "CH"]

[zones.eu]
countries = ["DE", "FR", "NL"]

[[rules]]
name = "from-corp"
src_zone = "corp"
action = "pass"

[[rules]]
name = "dach-to-eu"
src_zone = "dach"
dst_zone = "eu"
action = "drop"

[[rules]]
name = "eu-to-dach"
src_zone = "eu"
dst_zone = "dach"
action = "drop"
"#,
        geoip = geoip_table()
    );
    for (addr, want) in [
        ("85.214.132.117", "DE"),
        ("85.214.133.1", "DE"),
        ("85.214.131.255", "DE"),
        ("85.214.132.0", "DE"),
        ("85.214.133.0", "DE"),
        ("62.210.16.6", "FR"),
        ("193.170.0.1", "AT"),
        ("130.59.31.80", "CH"),
        ("194.109.6.66", "NL"),
        ("2a01:4f8:c0c::5", "DE"),
        ("2a01:4f8:1::1", "DE"),
        ("2001:41d0:8:1::1", "FR"),
        ("2001:620::1", "CH"),
    ] {
        assert_country(addr, Some(want), &[]);
    }
    let p = Program::new(&policy);
    // The compiler's view agrees with the kernel's for the explicit prefix's edges.
    for (addr, zones) in [
        ("85.214.131.255", vec!["dach", "eu"]),
        ("85.214.132.0", vec!["corp"]),
        ("85.214.132.255", vec!["corp"]),
        ("85.214.133.0", vec!["dach", "eu"]),
    ] {
        let c = p.compiled();
        assert_eq!(
            c.class_zone_names(c.class_of(ip(addr))),
            zones,
            "zones of {addr}"
        );
    }
    let flow = |src: &str, dst: &str| echo(src, dst).build();
    let cases = vec![
        case(
            "corp (inside DE) to FR",
            flow("85.214.132.117", "62.210.16.6"),
            Expect::rule("pass", "from-corp")
                .ip(4, 1)
                .src_zones(&["corp"])
                .dst_zones(&["eu"]),
        ),
        case(
            "first address of corp to FR",
            flow("85.214.132.0", "62.210.16.6"),
            Expect::rule("pass", "from-corp")
                .ip(4, 1)
                .src_zones(&["corp"])
                .dst_zones(&["eu"]),
        ),
        case(
            "DE just below corp to FR",
            flow("85.214.131.255", "62.210.16.6"),
            Expect::rule("drop", "dach-to-eu")
                .ip(4, 1)
                .src_zones(&["dach", "eu"])
                .dst_zones(&["eu"]),
        ),
        case(
            "DE just above corp to FR",
            flow("85.214.133.0", "62.210.16.6"),
            Expect::rule("drop", "dach-to-eu")
                .ip(4, 1)
                .src_zones(&["dach", "eu"])
                .dst_zones(&["eu"]),
        ),
        case(
            "FR to DE (DE in dach as well as eu)",
            flow("62.210.16.6", "85.214.133.1"),
            Expect::rule("drop", "eu-to-dach")
                .ip(4, 1)
                .src_zones(&["eu"])
                .dst_zones(&["dach", "eu"]),
        ),
        case(
            "FR to corp (not dach: the /24 is only corp)",
            flow("62.210.16.6", "85.214.132.117"),
            Expect::default("pass")
                .ip(4, 1)
                .src_zones(&["eu"])
                .dst_zones(&["corp"]),
        ),
        case(
            "AT to NL",
            flow("193.170.0.1", "194.109.6.66"),
            Expect::rule("drop", "dach-to-eu")
                .ip(4, 1)
                .src_zones(&["dach"])
                .dst_zones(&["eu"]),
        ),
        case(
            "NL to CH",
            flow("194.109.6.66", "130.59.31.80"),
            Expect::rule("drop", "eu-to-dach")
                .ip(4, 1)
                .src_zones(&["eu"])
                .dst_zones(&["dach"]),
        ),
        case(
            "CH to AT (dach to dach)",
            flow("130.59.31.80", "193.170.0.1"),
            Expect::default("pass")
                .ip(4, 1)
                .src_zones(&["dach"])
                .dst_zones(&["dach"]),
        ),
        case(
            "FR to NL (eu to eu)",
            flow("62.210.16.6", "194.109.6.66"),
            Expect::default("pass")
                .ip(4, 1)
                .src_zones(&["eu"])
                .dst_zones(&["eu"]),
        ),
        case(
            "v6 corp (inside DE) to FR",
            flow("2a01:4f8:c0c::5", "2001:41d0:8:1::1"),
            Expect::rule("pass", "from-corp")
                .ip(6, 58)
                .src_zones(&["corp"])
                .dst_zones(&["eu"]),
        ),
        case(
            "v6 DE outside corp to FR",
            flow("2a01:4f8:1::1", "2001:41d0:8:1::1"),
            Expect::rule("drop", "dach-to-eu")
                .ip(6, 58)
                .src_zones(&["dach", "eu"])
                .dst_zones(&["eu"]),
        ),
        case(
            "v6 FR to corp",
            flow("2001:41d0:8:1::1", "2a01:4f8:c0c::5"),
            Expect::default("pass")
                .ip(6, 58)
                .src_zones(&["eu"])
                .dst_zones(&["corp"]),
        ),
        case(
            "v6 FR to CH",
            flow("2001:41d0:8:1::1", "2001:620::1"),
            Expect::rule("drop", "eu-to-dach")
                .ip(6, 58)
                .src_zones(&["eu"])
                .dst_zones(&["dach"]),
        ),
    ];
    p.check_all(&cases);
}

#[test]
fn rule_order() {
    let ordered = Program::new(
        r#"
default = "drop"

[[rules]]
name = "pair"
src_prefix = ["198.51.100.0/24", "2001:db8:51::/48"]
dst_prefix = ["203.0.113.0/24", "2001:db8:113::/48"]
action = "drop"

[[rules]]
name = "quarantine"
src_prefix = ["10.66.0.0/16", "fd00:66::/32"]
action = "drop"

[[rules]]
name = "lab"
src_prefix = ["10.0.0.0/8", "fd00::/8"]
action = "pass"

# Shadowed: "quarantine" takes every packet this could match.
[[rules]]
name = "quarantine-web"
src_prefix = ["10.66.0.0/16", "fd00:66::/32"]
dst_prefix = ["192.0.2.80/32", "2001:db8::80/128"]
action = "pass"

[[rules]]
name = "to-dns"
dst_prefix = ["192.0.2.53", "2001:db8::53"]
action = "pass"
"#,
    );
    let flow = |src: &str, dst: &str| udp(src, dst, 1234, 80).build();
    let v4 = |e: Expect| e.ip(4, 17).ports(1234, 80);
    let v6 = |e: Expect| e.ip(6, 17).ports(1234, 80);
    ordered.check_all(&[
        case(
            "both halves of pair",
            flow("198.51.100.1", "203.0.113.1"),
            v4(Expect::rule("drop", "pair")),
        ),
        case(
            "pair source only",
            flow("198.51.100.1", "192.0.2.53"),
            v4(Expect::rule("pass", "to-dns")),
        ),
        case(
            "pair destination only",
            flow("192.0.2.1", "203.0.113.1"),
            v4(Expect::default("drop")),
        ),
        case(
            "quarantine before lab",
            flow("10.66.1.1", "192.0.2.53"),
            v4(Expect::rule("drop", "quarantine")),
        ),
        case(
            "quarantine shadows quarantine-web",
            flow("10.66.1.1", "192.0.2.80"),
            v4(Expect::rule("drop", "quarantine")),
        ),
        case(
            "lab before to-dns",
            flow("10.1.1.1", "192.0.2.53"),
            v4(Expect::rule("pass", "lab")),
        ),
        case(
            "to-dns",
            flow("172.16.0.1", "192.0.2.53"),
            v4(Expect::rule("pass", "to-dns")),
        ),
        case(
            "nothing matches",
            flow("172.16.0.1", "192.0.2.54"),
            v4(Expect::default("drop")),
        ),
        case(
            "v6 pair",
            flow("2001:db8:51::1", "2001:db8:113::1"),
            v6(Expect::rule("drop", "pair")),
        ),
        case(
            "v6 quarantine shadows quarantine-web",
            flow("fd00:66::1", "2001:db8::80"),
            v6(Expect::rule("drop", "quarantine")),
        ),
        case(
            "v6 lab",
            flow("fd00:1::1", "2001:db8::53"),
            v6(Expect::rule("pass", "lab")),
        ),
        case(
            "v6 to-dns",
            flow("2001:db8:ffff::1", "2001:db8::53"),
            v6(Expect::rule("pass", "to-dns")),
        ),
        case(
            "v6 nothing matches",
            flow("2001:db8:ffff::1", "2001:db8::54"),
            v6(Expect::default("drop")),
        ),
    ]);

    let catch_all = Program::new(
        r#"
default = "drop"
malformed = "drop"
non_ip = "drop"

[[rules]]
name = "block-bad"
src_prefix = ["203.0.113.0/24", "2001:db8:bad::/48"]
action = "drop"

[[rules]]
name = "everything"
action = "pass"

[[rules]]
name = "never-reached"
dst_prefix = ["192.0.2.0/24", "::/0"]
action = "drop"
"#,
    );
    catch_all.check_all(&[
        case(
            "before the catch-all",
            flow("203.0.113.9", "192.0.2.1"),
            v4(Expect::rule("drop", "block-bad")),
        ),
        case(
            "catch-all before a later match",
            flow("198.51.100.1", "192.0.2.1"),
            v4(Expect::rule("pass", "everything")),
        ),
        case(
            "catch-all, no later match",
            flow("198.51.100.1", "198.51.100.2"),
            v4(Expect::rule("pass", "everything")),
        ),
        case(
            "v6 before the catch-all",
            flow("2001:db8:bad::1", "2001:db8::1"),
            v6(Expect::rule("drop", "block-bad")),
        ),
        case(
            "v6 catch-all",
            flow("2001:db8::1", "2001:db8::2"),
            v6(Expect::rule("pass", "everything")),
        ),
        case(
            "catch-all does not take non-IP",
            ethernet(&[], ETH_P_ARP, &ARP_REQUEST),
            Expect::non_ip("drop"),
        ),
        case(
            "catch-all does not take malformed",
            patched(flow("198.51.100.1", "192.0.2.1"), ETH_HLEN, &[0x44]),
            Expect::malformed("drop", "malformed_ipv4"),
        ),
    ]);

    let no_rules = Program::new("default = \"pass\"\n");
    no_rules.check_all(&[
        case(
            "no rules, v4",
            flow("203.0.113.9", "192.0.2.1"),
            v4(Expect::default("pass")),
        ),
        case(
            "no rules, v6",
            flow("2001:db8::1", "2001:db8::2"),
            v6(Expect::default("pass")),
        ),
    ]);
}

/// Every field criterion and its negation, one rule each, so the rule that matches names
/// the criterion that decided.
#[test]
fn field_criteria_and_negation() {
    let p = Program::new(
        r#"
default = "pass"

[[rules]]
name = "tcp-syn-only-to-22"
proto = "tcp"
dst_port = 22
tcp_flags = "syn,!ack"
action = "drop"

[[rules]]
name = "udp-not-dns"
proto = "udp"
dst_port = "!53"
src_port = "1024-65535"
action = "drop"

[[rules]]
name = "vlan-100s"
vlan = "100-199"
action = "drop"

[[rules]]
name = "not-vlan-7"
vlan = "!7"
ip_version = 6
proto = ["icmpv6", 47]
action = "drop"

[[rules]]
name = "icmp-v4"
proto = "icmp"
ip_version = 4
action = "drop"
"#,
    );
    let tcp_flags = |flags: u8| {
        udp("192.0.2.1", "192.0.2.2", 0, 0).l4(Some(L4::Tcp {
            sport: 40000,
            dport: 22,
            flags,
            option_words: 0,
        }))
    };
    let v4 = |sport, dport| udp("192.0.2.1", "192.0.2.2", sport, dport);
    let v6 = || udp("2001:db8::1", "2001:db8::2", 40000, 53);
    let cases = vec![
        case(
            "tcp syn to 22",
            tcp_flags(0x02).build(),
            Expect::rule("drop", "tcp-syn-only-to-22")
                .ip(4, 6)
                .ports(40000, 22),
        ),
        case(
            "tcp syn-ack to 22: !ack fails",
            tcp_flags(0x12).build(),
            Expect::default("pass")
                .ip(4, 6)
                .ports(40000, 22)
                .tcp_flags("syn,ack"),
        ),
        case(
            "tcp ack to 22: syn missing",
            tcp_flags(0x10).build(),
            Expect::default("pass")
                .ip(4, 6)
                .ports(40000, 22)
                .tcp_flags("ack"),
        ),
        case(
            "udp 40000 -> 80: not 53, source in range",
            v4(40000, 80).build(),
            Expect::rule("drop", "udp-not-dns")
                .ip(4, 17)
                .ports(40000, 80),
        ),
        case(
            "udp 40000 -> 53: negated port fails",
            v4(40000, 53).build(),
            Expect::default("pass").ip(4, 17).ports(40000, 53),
        ),
        case(
            "udp 1023 -> 80: source below the range",
            v4(1023, 80).build(),
            Expect::default("pass").ip(4, 17).ports(1023, 80),
        ),
        case(
            "non-first udp fragment: a port criterion, even negated, needs ports",
            {
                let mut f = v4(40000, 80).l4(None).payload(&[0; 16]);
                f.ipv4_fragment = (64, false);
                f.build()
            },
            Expect::default("pass").ip(4, 17).fragment("non_first"),
        ),
        case(
            "vlan 150",
            v4(53, 53).vlan(TPID_8021Q, 150).build(),
            Expect::rule("drop", "vlan-100s")
                .ip(4, 17)
                .ports(53, 53)
                .vlan(1, 150),
        ),
        case(
            "vlan 200 outside the range",
            v4(53, 53).vlan(TPID_8021Q, 200).build(),
            Expect::default("pass").ip(4, 17).ports(53, 53).vlan(1, 200),
        ),
        case(
            "qinq: the outer tag counts",
            v4(53, 53)
                .vlan(TPID_8021AD, 120)
                .vlan(TPID_8021Q, 7)
                .build(),
            Expect::rule("drop", "vlan-100s")
                .ip(4, 17)
                .ports(53, 53)
                .vlan(2, 120),
        ),
        case(
            "untagged ipv6 icmpv6: a negated vlan matches untagged",
            v6().l4(Some(L4::Echo)).build(),
            Expect::rule("drop", "not-vlan-7").ip(6, 58),
        ),
        case(
            "ipv6 gre on vlan 7: negated vlan fails",
            v6().l4(Some(L4::Other(47))).vlan(TPID_8021Q, 7).build(),
            Expect::default("pass").ip(6, 47).vlan(1, 7),
        ),
        case(
            "ipv6 udp: protocol not listed",
            v6().build(),
            Expect::default("pass").ip(6, 17).ports(40000, 53),
        ),
        case(
            "ipv4 icmp",
            v4(0, 0).l4(Some(L4::Echo)).build(),
            Expect::rule("drop", "icmp-v4").ip(4, 1),
        ),
        case(
            "ipv6 carrying protocol 1: ip_version fails",
            udp("2001:db8::1", "2001:db8::2", 0, 0)
                .l4(Some(L4::Other(1)))
                .vlan(TPID_8021Q, 7)
                .build(),
            Expect::default("pass").ip(6, 1).vlan(1, 7),
        ),
    ];
    p.check_all(&cases);
}

/// Every action: its XDP code, and for `tx` the frame going back with its MACs swapped.
/// Redirects report XDP_REDIRECT when their map entry exists; a test run does not send.
#[test]
fn actions() {
    let p = Program::new(
        r#"
default = { cpu = 0 }

[[rules]]
name = "bounce"
dst_port = 7
action = "tx"

[[rules]]
name = "to-lo"
dst_port = 9
action = { redirect = "lo" }

[[rules]]
name = "drop-it"
dst_port = 19
action = "drop"

[[rules]]
name = "pass-it"
dst_port = 13
action = "pass"
"#,
    );
    let f = |dport| udp("192.0.2.1", "192.0.2.2", 40000, dport).build();
    let (v, out) = p.run("tx", &f(7));
    let want = Expect::rule("tx", "bounce")
        .ip(4, 17)
        .ports(40000, 7)
        .build();
    assert_eq!(v, want, "tx verdict");
    let frame = f(7);
    assert_eq!(
        &out[..6],
        &frame[6..12],
        "tx: the destination MAC is the old source"
    );
    assert_eq!(
        &out[6..12],
        &frame[..6],
        "tx: the source MAC is the old destination"
    );
    assert_eq!(&out[12..], &frame[12..], "tx: the rest is untouched");

    let cases = vec![
        case(
            "redirect to lo",
            f(9),
            Expect::rule("redirect", "to-lo").ip(4, 17).ports(40000, 9),
        ),
        case(
            "drop",
            f(19),
            Expect::rule("drop", "drop-it").ip(4, 17).ports(40000, 19),
        ),
        case(
            "pass",
            f(13),
            Expect::rule("pass", "pass-it").ip(4, 17).ports(40000, 13),
        ),
        case(
            "default: cpu 0",
            f(53),
            Expect::default("cpu").ip(4, 17).ports(40000, 53),
        ),
    ];
    p.check_all(&cases);
}

/// `xsk`: a frame goes to cloudletd's AF_XDP socket on the queue the rule names of the
/// interface it came in on. A test run receives on `lo`, queue 0: with a socket there the
/// verdict is XDP_REDIRECT; without one, or for another queue, the frame is dropped and
/// counted as undelivered.
#[test]
fn xsk_action() {
    let text = r#"
default = { xsk = 1 }

[[rules]]
name = "to-queue-0"
dst_port = 4789
action = { xsk = 0 }

[[rules]]
name = "pass-dns"
dst_port = 53
action = "pass"
"#;
    let mut p = Program::new(text);
    assert_eq!(p.compiled().xsk_queues, [0, 1]);
    let f = |dport| udp("192.0.2.1", "192.0.2.2", 40000, dport).build();
    let to_queue_0 = || {
        Expect::rule("xsk", "to-queue-0")
            .ip(4, 17)
            .ports(40000, 4789)
    };
    let default = || Expect::default("xsk").ip(4, 17).ports(40000, 9);
    p.check_all(&[case(
        "queue 0, no socket yet: dropped",
        f(4789),
        to_queue_0().action("xsk", "XDP_DROP"),
    )]);

    let lo = ["lo".to_string()];
    let mut sockets = XskSockets::new(None).expect("no forward interface");
    sockets
        .open(&lo, &[0])
        .unwrap_or_else(|e| panic!("AF_XDP socket on lo: {e}"));
    sockets
        .register(p.classifier_mut().loaded_mut(), &lo, &[0])
        .expect("register the socket");
    p.check_all(&[
        case("queue 0, socket bound: redirected", f(4789), to_queue_0()),
        case(
            "default queue 1: the frame came in on queue 0, dropped",
            f(9),
            default().action("xsk", "XDP_DROP"),
        ),
        case(
            "other rules are unaffected",
            f(53),
            Expect::rule("pass", "pass-dns").ip(4, 17).ports(40000, 53),
        ),
    ]);
    // The reference evaluator agrees on the action and its code.
    let policy = cloudlet::policy::parse(text, std::path::Path::new("xsk.toml")).expect("policy");
    let facts = Facts {
        src: ip("192.0.2.1"),
        dst: ip("192.0.2.2"),
        proto: 17,
        ports: Some((40000, 4789)),
        vlan: None,
        tcp_flags: None,
    };
    let (action, rule) = reference::verdict(&policy, None, &facts);
    assert_eq!((action.clone(), rule), (Action::Xsk(0), Some(0)));
    let got = p.classify("reference", &f(4789));
    assert_eq!(
        (got.verdict.as_str(), Some(got.xdp)),
        (action.name(), reference::xdp_code(&action))
    );

    let compiled = p.compiled().clone();
    let stats = p
        .classifier_mut()
        .loaded_mut()
        .stats(&compiled)
        .expect("stats");
    assert_eq!(stats.verdict("xsk").packets, 4, "every xsk verdict counts");
    assert_eq!(
        stats.xsk_undelivered.packets, 2,
        "the two frames without a socket for their queue"
    );
    let counts = sockets.counts();
    assert_eq!(counts.len(), 1);
    assert_eq!(
        (
            counts[0].interface.as_str(),
            counts[0].queue,
            counts[0].open
        ),
        ("lo", 0, true)
    );
    // A test run does not deliver: the socket received nothing.
    assert_eq!(counts[0].received.packets, 0);
}

/// Rate limits: a burst passes, the rest gets the over-action; per-source limits keep a
/// bucket per address. One packet per second leaves no room for refills during the test.
#[test]
fn rate_limits() {
    let p = Program::new(
        r#"
[[rules]]
name = "per-rule"
dst_port = 1
action = { rate_limit = { pps = 1, burst = 3 } }

[[rules]]
name = "per-source"
dst_port = 2
action = { rate_limit = { pps = 1, burst = 2, per = "source" } }

[[rules]]
name = "soft"
dst_port = 3
action = { rate_limit = { pps = 1, burst = 1, over = "pass" } }
"#,
    );
    let f = |src: &str, dport| {
        let dst = if src.contains(':') {
            "2001:db8::2"
        } else {
            "192.0.2.2"
        };
        udp(src, dst, 5000, dport).build()
    };
    let verdicts = |src: &str, dport, n| -> Vec<String> {
        (0..n)
            .map(|i| {
                p.classify(&format!("{src}:{dport} #{i}"), &f(src, dport))
                    .verdict
            })
            .collect()
    };
    assert_eq!(
        verdicts("192.0.2.1", 1, 5),
        ["pass", "pass", "pass", "drop", "drop"],
        "per rule"
    );
    // The rule's bucket is shared by every source.
    assert_eq!(
        verdicts("192.0.2.9", 1, 1),
        ["drop"],
        "per rule, another source"
    );
    assert_eq!(
        verdicts("192.0.2.1", 2, 3),
        ["pass", "pass", "drop"],
        "per source, first"
    );
    assert_eq!(
        verdicts("2001:db8::1", 2, 3),
        ["pass", "pass", "drop"],
        "per source, second"
    );
    assert_eq!(
        verdicts("192.0.2.1", 3, 3),
        ["pass", "pass", "pass"],
        "over = pass"
    );
    let v = p.classify("rule name", &f("192.0.2.1", 1));
    assert_eq!(v.rule.as_deref(), Some("per-rule"));
    assert_eq!(v.reason, "rule");
}

/// What the counters should say of `verdicts`, tallied frame by frame: packets by verdict,
/// reason, rule, and zone of either address (`(none)` for an IP address in no zone).
fn tally(verdicts: &[Verdict]) -> std::collections::BTreeMap<String, u64> {
    let mut want = std::collections::BTreeMap::new();
    for v in verdicts {
        let mut add = |k: String| *want.entry(k).or_insert(0) += 1;
        add(format!("verdict {}", v.verdict));
        add(format!("reason {}", v.reason));
        if let Some(rule) = &v.rule {
            add(format!("rule {rule}"));
        }
        if v.reason == "non_ip" {
            continue;
        }
        for (side, zones) in [("src", &v.src_zones), ("dst", &v.dst_zones)] {
            if zones.is_empty() {
                add(format!("zone (none) {side}"));
            }
            for z in zones {
                add(format!("zone {z} {side}"));
            }
        }
    }
    want
}

/// The counters as read, in the keys of [`tally`] (zero counts left out).
fn counted(p: &mut Program) -> std::collections::BTreeMap<String, u64> {
    let compiled = p.compiled().clone();
    let s = p
        .classifier_mut()
        .loaded_mut()
        .stats(&compiled)
        .expect("stats");
    let mut got = std::collections::BTreeMap::new();
    let named = s
        .verdicts
        .iter()
        .map(|n| (format!("verdict {}", n.name), n.count.packets))
        .chain(
            s.reasons
                .iter()
                .map(|n| (format!("reason {}", n.name), n.count.packets)),
        )
        .chain(
            s.rules
                .iter()
                .map(|r| (format!("rule {}", r.name), r.count.packets)),
        )
        .chain(s.zones.iter().flat_map(|z| {
            [
                (format!("zone {} src", z.name), z.src.packets),
                (format!("zone {} dst", z.name), z.dst.packets),
            ]
        }));
    for (k, n) in named.filter(|(_, n)| *n > 0) {
        got.insert(k, n);
    }
    got
}

/// The counters, read in one batch lookup per map, agree with the frames' own verdicts,
/// each frame counted once by verdict, reason, rule and zone; after an in-place update the
/// rules' counters are those of the bank now in force, which counts from zero.
#[test]
fn counters_follow_the_frames_across_a_swap() {
    let policy = |extra: &str| {
        format!(
            r#"
default = "pass"
{geoip}
{zones}
[[rules]]
name = "from-eu"
src_zone = "eu"
action = "drop"
{extra}
[[rules]]
name = "dns"
dst_port = 53
action = "pass"
"#,
            geoip = geoip_table(),
            zones = EU_AND_US,
        )
    };
    let mut p = Program::new(&policy(""));
    // Different numbers of each, so that no two counters agree by chance.
    let flows = [
        ("85.214.132.117", "192.0.2.1", 80, 1),
        ("8.8.8.8", "192.0.2.1", 53, 2),
        ("1.1.1.1", "62.210.16.6", 80, 3),
        ("2001:db8::1", "2001:4860:4860::8888", 443, 4),
        ("2001:610:1::1", "2001:db8::2", 53, 5),
    ];
    let frames: Vec<Vec<u8>> = flows
        .iter()
        .flat_map(|(src, dst, dport, n)| {
            std::iter::repeat_n(udp(src, dst, 40000, *dport).build(), *n)
        })
        .chain(std::iter::once(ethernet(&[], ETH_P_ARP, &ARP_REQUEST)))
        .collect();
    let verdicts: Vec<Verdict> = frames
        .iter()
        .enumerate()
        .map(|(i, f)| p.classify(&format!("frame {i}"), f))
        .collect();
    let want = tally(&verdicts);
    assert!(
        want.contains_key("rule from-eu") && want.contains_key("rule dns"),
        "the frames must hit both rules: {want:?}"
    );
    assert_eq!(counted(&mut p), want);

    // A rule in front: the bank swaps, and the rules count from zero there.
    let bank = p.classifier_mut().loaded_mut().active_bank();
    p.update(&policy(
        "[[rules]]\nname = \"web\"\ndst_port = 80\naction = \"drop\"\n",
    ));
    assert_ne!(p.classifier_mut().loaded_mut().active_bank(), bank);
    let after: Vec<Verdict> = frames
        .iter()
        .enumerate()
        .map(|(i, f)| p.classify(&format!("frame {i} after the update"), f))
        .collect();
    assert!(after.iter().any(|v| v.rule.as_deref() == Some("web")));
    let mut want = tally(&verdicts.iter().chain(&after).cloned().collect::<Vec<_>>());
    // Rules count per bank; the rest over the program's life.
    want.retain(|k, _| !k.starts_with("rule "));
    for (k, n) in tally(&after) {
        if k.starts_with("rule ") {
            want.insert(k, n);
        }
    }
    assert_eq!(counted(&mut p), want);
}
