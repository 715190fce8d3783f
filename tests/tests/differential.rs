//! Randomized differential test: random policies (zones from explicit prefixes and real
//! countries, nested and overlapping prefixes, negated zones, prefix lists) and random
//! packets; the XDP program's verdict (through BPF_PROG_TEST_RUN) must equal the plain
//! reference evaluator's for every packet. Deterministic per seed; `CLOUDLET_SEED=N`
//! replays one.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use cloudlet::{
    dataplane::{classify::Classifier, compile},
    frame::{Ext, Frame, L4, TPID_8021Q, to_hex},
    geoip::GeoDb,
    policy::{self, Prefix},
};
use cloudlet_tests::{progtest::GEOIP_DATABASE, reference};

/// xorshift64*: small, deterministic, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

const COUNTRIES: &[&str] = &["DE", "FR", "US", "NL", "JP", "BR"];
const V4_BASES: &[u32] = &[
    0x0a00_0000,
    0xc000_0200,
    0x55d6_0000,
    0x0808_0000,
    0x5a00_0000,
];
const V6_BASES: &[u128] = &[
    0x2001_0db8 << 96,
    0x2a01_04f8 << 96,
    0x2003 << 112,
    0x2a01_cb00 << 96,
];

fn random_prefixes(rng: &mut Rng, n: usize) -> Vec<Prefix> {
    (0..n)
        .map(|_| {
            let v6 = rng.chance(50);
            random_prefix(rng, v6)
        })
        .collect()
}

fn random_prefix(rng: &mut Rng, v6: bool) -> Prefix {
    // One in six a single address (a host: the flat tables hand these to the hosts tables).
    let host = rng.chance(16);
    let (bits, len) = if v6 {
        let len = if host { 128 } else { 16 + rng.below(57) as u32 };
        let base = *rng.pick(V6_BASES);
        let noise = (u128::from(rng.next()) << 64 | u128::from(rng.next())) >> (16 + rng.below(40));
        (base ^ noise, len)
    } else {
        let len = if host { 32 } else { 8 + rng.below(25) as u32 };
        let base = *rng.pick(V4_BASES);
        let noise = (rng.next() as u32) >> (8 + rng.below(20));
        (u128::from(base ^ noise), len)
    };
    let width = if v6 { 128 } else { 32 };
    let masked = if len == 0 {
        0
    } else {
        bits >> (width - len) << (width - len)
    };
    let addr = if v6 {
        IpAddr::V6(Ipv6Addr::from(masked))
    } else {
        IpAddr::V4(Ipv4Addr::from(masked as u32))
    };
    Prefix::new(addr, len as u8).expect("masked prefix")
}

fn address_in(rng: &mut Rng, p: &Prefix) -> IpAddr {
    let (start, end) = p.range();
    let span = end - start;
    let offset = if span == u128::MAX {
        u128::from(rng.next())
    } else {
        (u128::from(rng.next()) << 64 | u128::from(rng.next())) % (span + 1)
    };
    let bits = start + offset;
    if p.is_ipv4() {
        IpAddr::V4(Ipv4Addr::from(bits as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(bits))
    }
}

fn list(prefixes: &[Prefix]) -> String {
    prefixes
        .iter()
        .map(|p| format!("\"{p}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A random policy as TOML, and every prefix it names (to aim packets at).
/// A random policy of up to `max_rules` rules, and the prefixes it names.
fn random_policy(
    rng: &mut Rng,
    with_countries: bool,
    geo: &[Prefix],
    max_rules: usize,
) -> (String, Vec<Prefix>) {
    let mut text = String::new();
    let mut named = Vec::new();
    let action = |rng: &mut Rng| if rng.chance(50) { "pass" } else { "drop" };
    text.push_str(&format!("default = \"{}\"\n", action(rng)));
    if with_countries {
        text.push_str(&format!("[geoip]\ndatabase = {GEOIP_DATABASE:?}\n"));
    }
    let zones = 1 + rng.below(4);
    for z in 0..zones {
        let n = rng.below(5);
        let mut prefixes = random_prefixes(rng, n);
        // A real GeoIP network as an explicit prefix: ties between explicit prefixes and
        // countries at the same length.
        if with_countries && rng.chance(40) {
            prefixes.push(*rng.pick(geo));
        }
        named.extend(&prefixes);
        text.push_str(&format!("[zones.z{z}]\nprefixes = [{}]\n", list(&prefixes)));
        if with_countries && rng.chance(70) {
            let n = 1 + rng.below(2);
            let countries: Vec<String> = (0..n)
                .map(|_| format!("{:?}", rng.pick(COUNTRIES)))
                .collect();
            text.push_str(&format!("countries = [{}]\n", countries.join(", ")));
        }
    }
    for r in 0..1 + rng.below(max_rules) {
        text.push_str(&format!(
            "[[rules]]\nname = \"r{r}\"\naction = \"{}\"\n",
            action(rng)
        ));
        for key in ["src_zone", "dst_zone"] {
            if rng.chance(45) {
                let neg = if rng.chance(30) { "!" } else { "" };
                text.push_str(&format!("{key} = \"{neg}z{}\"\n", rng.below(zones)));
            }
        }
        if rng.chance(30) {
            let v = *rng.pick(&[
                "\"tcp\"",
                "\"udp\"",
                "[\"tcp\", \"udp\"]",
                "\"!udp\"",
                "1",
                "58",
                "\"gre\"",
            ]);
            text.push_str(&format!("proto = {v}\n"));
        }
        for key in ["src_port", "dst_port"] {
            if rng.chance(25) {
                let v = *rng.pick(&[
                    "53",
                    "443",
                    "[22, 80, 443]",
                    "\"1000-2000\"",
                    "\"!53\"",
                    "[\"0-1023\", 8080]",
                ]);
                text.push_str(&format!("{key} = {v}\n"));
            }
        }
        if rng.chance(20) {
            let v = *rng.pick(&["10", "[10, 200]", "\"100-199\"", "\"!10\""]);
            text.push_str(&format!("vlan = {v}\n"));
        }
        if rng.chance(20) {
            text.push_str(&format!(
                "ip_version = {}\n",
                if rng.chance(50) { 4 } else { 6 }
            ));
        }
        if rng.chance(20) {
            let v = *rng.pick(&[
                "\"syn\"",
                "\"syn,!ack\"",
                "\"ack\"",
                "\"!syn\"",
                "\"fin,psh\"",
            ]);
            text.push_str(&format!("tcp_flags = {v}\n"));
        }
        for key in ["src_prefix", "dst_prefix"] {
            if rng.chance(35) {
                let n = 1 + rng.below(3);
                let prefixes = random_prefixes(rng, n);
                named.extend(&prefixes);
                text.push_str(&format!("{key} = [{}]\n", list(&prefixes)));
            }
        }
    }
    (text, named)
}

/// Networks of the test's countries, to draw real addresses from.
fn country_networks(db: &GeoDb) -> Vec<Prefix> {
    let mut out = Vec::new();
    let mut n = 0usize;
    db.for_each_network(
        |code| COUNTRIES.contains(&code).then_some(()),
        |p, ()| {
            n += 1;
            if n.is_multiple_of(97) {
                out.push(p);
            }
        },
    )
    .expect("walking the GeoIP database");
    out
}

fn random_address(rng: &mut Rng, v6: bool, named: &[Prefix], geo: &[Prefix]) -> IpAddr {
    let family = |p: &&Prefix| p.is_ipv4() != v6;
    let named: Vec<&Prefix> = named.iter().filter(family).collect();
    let geo: Vec<&Prefix> = geo.iter().filter(family).collect();
    match rng.below(4) {
        0 if !named.is_empty() => {
            let p = **rng.pick(&named);
            address_in(rng, &p)
        }
        1 if !geo.is_empty() => {
            let p = **rng.pick(&geo);
            address_in(rng, &p)
        }
        2 => {
            let p = random_prefix(rng, v6);
            address_in(rng, &p)
        }
        _ => address_in(
            rng,
            &Prefix::new(
                if v6 {
                    IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                } else {
                    IpAddr::V4(Ipv4Addr::UNSPECIFIED)
                },
                0,
            )
            .unwrap(),
        ),
    }
}

/// A frame of a random transport, ports, flags, tag and fragment offset, with the facts a
/// rule can see in it.
fn random_frame(rng: &mut Rng, src: IpAddr, dst: IpAddr) -> (Frame, reference::Facts) {
    let ports = [22u16, 53, 80, 443, 1500, 8080, 40000];
    let (sport, dport) = (*rng.pick(&ports), *rng.pick(&ports));
    let v6 = src.is_ipv6();
    let mut facts = reference::Facts {
        src,
        dst,
        proto: 17,
        ports: Some((sport, dport)),
        vlan: None,
        tcp_flags: None,
    };
    let mut f = Frame::udp(src, dst, sport, dport);
    match rng.below(4) {
        0 => {
            let flags = *rng.pick(&[0x02u8, 0x12, 0x10, 0x11, 0x18, 0x00]);
            f = f.l4(Some(L4::Tcp {
                sport,
                dport,
                flags,
                option_words: 0,
            }));
            facts.proto = 6;
            facts.tcp_flags = Some(flags);
        }
        1 => {
            f = f.l4(Some(L4::Echo));
            facts.proto = if v6 { 58 } else { 1 };
            facts.ports = None;
        }
        2 => {
            f = f.l4(Some(L4::Other(47)));
            facts.proto = 47;
            facts.ports = None;
        }
        _ => {}
    }
    if rng.chance(25) {
        let id = *rng.pick(&[10u16, 100, 150, 200]);
        f = f.vlan(TPID_8021Q, id);
        facts.vlan = Some(id);
    }
    if rng.chance(10) {
        // A non-first fragment: no transport header, so no ports and no flags.
        if v6 {
            f.ipv6_ext = vec![Ext::Fragment {
                offset: 100,
                more: false,
            }];
        } else {
            f.ipv4_fragment = (100, false);
        }
        // The builder marks a frame without a transport header as UDP.
        facts.proto = 17;
        f.payload = vec![0x5a; 16];
        f = f.l4(None);
        facts.ports = None;
        facts.tcp_flags = None;
    }
    (f, facts)
}

#[test]
fn xdp_verdicts_match_the_reference_evaluator() {
    let seed: u64 = std::env::var("CLOUDLET_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x00c1_0d1e_u64);
    let db = GeoDb::open(Path::new(GEOIP_DATABASE)).expect("GeoIP database (cargo xtask setup)");
    let geo_networks = country_networks(&db);
    let (policies, packets) = (24, 120);
    let mut checked = 0;
    let mut marked = 0;
    for round in 0..policies {
        let mut rng = Rng(seed ^ (round as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let with_countries = round % 3 == 0;
        // Every fourth policy has hundreds to thousands of rules: matches deep in the
        // rule sets, across many words.
        let max_rules = if round % 4 == 1 { 3_000 } else { 8 };
        let (text, named) = random_policy(&mut rng, with_countries, &geo_networks, max_rules);
        let policy = policy::parse(&text, Path::new("random.toml"))
            .unwrap_or_else(|e| panic!("seed {seed} round {round}: {e}\n{text}"));
        let geo = with_countries.then_some(&db);
        let compiled = compile(&policy, geo).expect("compile");
        marked += host_entries(&compiled);
        let classifier = Classifier::new(&compiled).expect("load (needs root)");
        checked += check_packets(
            &mut rng,
            &classifier,
            &compiled,
            &policy,
            geo,
            &named,
            &geo_networks,
            packets,
            &format!("seed {seed} round {round}"),
            &text,
        );
    }
    assert_eq!(checked, policies * packets);
    assert!(
        marked > 0,
        "no table entry sends its lookups to the hosts tables"
    );
}

/// Entries of a policy's flat tables that send their lookups to the hosts tables.
fn host_entries(c: &cloudlet::dataplane::CompiledPolicy) -> usize {
    use cloudlet_common::flat::{HOSTS, PTR};
    [&c.v4_chunks, &c.v6_chunks]
        .into_iter()
        .flat_map(|t| t.iter().flatten())
        .filter(|e| **e & PTR == 0 && **e & HOSTS != 0)
        .count()
}

/// Policies updated in place, one after another in the same program: after each update
/// the verdicts are the new policy's, as the reference evaluator gives them. The zones stay
/// (that is what keeps an update in place); prefixes, rules and verdicts all change.
#[test]
fn in_place_updates_match_the_reference_evaluator() {
    let seed: u64 = std::env::var("CLOUDLET_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x0bad_5eed_u64);
    let db = GeoDb::open(Path::new(GEOIP_DATABASE)).expect("GeoIP database (cargo xtask setup)");
    let geo_networks = country_networks(&db);
    let mut rng = Rng(seed);
    // The zones of the first policy, kept by the others.
    let (first, _) = random_policy(&mut rng, true, &geo_networks, 8);
    let zones_end = first.find("[[rules]]").unwrap_or(first.len());
    // Rules of other random policies name zones z0..z3: have them all.
    let mut zones = first[..zones_end].to_string();
    for z in 0..4 {
        if !zones.contains(&format!("[zones.z{z}]")) {
            zones.push_str(&format!("[zones.z{z}]\nprefixes = []\n"));
        }
    }
    let mut compiler = cloudlet::dataplane::Compiler::default();
    let mut classifier = None;
    let (updates, packets) = (12, 100);
    let mut checked = 0;
    let mut in_place = 0;
    for round in 0..updates {
        let max_rules = if round % 3 == 2 { 2_000 } else { 10 };
        let (rules, named) = random_policy(&mut rng, false, &geo_networks, max_rules);
        let rules = &rules[rules.find("[[rules]]").unwrap_or(rules.len())..];
        // Extra prefixes in the zones change the address tables too.
        let n = 1 + rng.below(3);
        let extra = random_prefixes(&mut rng, n);
        let text = format!(
            "{}[zones.extra]\nprefixes = [{}]\n{rules}",
            zones,
            list(&extra)
        );
        let policy = policy::parse(&text, Path::new("update.toml"))
            .unwrap_or_else(|e| panic!("seed {seed} update {round}: {e}\n{text}"));
        assert!(round == 0 || compiler.keeps_classes(&policy));
        let compiled = compiler.compile(&policy, Some(&db)).expect("compile");
        match &mut classifier {
            None => classifier = Some(Classifier::new(&compiled).expect("load (needs root)")),
            Some(c) => match c.update(&compiled) {
                Ok(_) => in_place += 1,
                Err(cloudlet::dataplane::DataplaneError::NoRoom(why)) => {
                    eprintln!("update {round} needs a new program: {why}");
                    *c = Classifier::new(&compiled).expect("load");
                }
                Err(e) => panic!("update {round}: {e}"),
            },
        }
        let mut named = named;
        named.extend(&extra);
        checked += check_packets(
            &mut rng,
            classifier.as_ref().expect("loaded"),
            &compiled,
            &policy,
            Some(&db),
            &named,
            &geo_networks,
            packets,
            &format!("seed {seed} update {round}"),
            &text,
        );
    }
    assert_eq!(checked, updates * packets);
    assert!(
        in_place >= updates / 2,
        "{in_place} of {updates} updates in place"
    );
}

/// Classifies `packets` random packets and checks each against the reference evaluator.
#[allow(clippy::too_many_arguments)]
fn check_packets(
    rng: &mut Rng,
    classifier: &Classifier,
    compiled: &cloudlet::dataplane::CompiledPolicy,
    policy: &policy::Policy,
    geo: Option<&GeoDb>,
    named: &[Prefix],
    geo_networks: &[Prefix],
    packets: usize,
    what: &str,
    text: &str,
) -> usize {
    let mut checked = 0;
    for _ in 0..packets {
        let v6 = rng.chance(50);
        let src = random_address(rng, v6, named, geo_networks);
        let dst = random_address(rng, v6, named, geo_networks);
        let (frame, facts) = random_frame(rng, src, dst);
        let frame = frame.build();
        let got = classifier.classify(compiled, &frame).expect("classify");
        let (action, rule) = reference::verdict(policy, geo, &facts);
        let want_rule = rule.map(|i| policy.rules[i].name.clone());
        assert!(
            got.verdict == action.name() && got.rule == want_rule,
            "{what}: {src} -> {dst}: XDP says {} by {:?}, reference {} by {:?}\nsrc zones {:?} (ref {:?}), dst zones {:?} (ref {:?})\nframe {}\npolicy:\n{text}",
            got.verdict,
            got.rule,
            action.name(),
            want_rule,
            got.src_zones,
            reference::zones_of(policy, geo, src),
            got.dst_zones,
            reference::zones_of(policy, geo, dst),
            to_hex(&frame),
        );
        let names = |zones: Vec<usize>| {
            zones
                .into_iter()
                .map(|z| policy.zones[z].name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            got.src_zones,
            names(reference::zones_of(policy, geo, src)),
            "{what}: zones of {src}\n{text}"
        );
        assert_eq!(
            got.dst_zones,
            names(reference::zones_of(policy, geo, dst)),
            "{what}: zones of {dst}\n{text}"
        );
        checked += 1;
    }
    checked
}
