use std::{net::IpAddr, path::Path};

use super::*;
use crate::policy;

fn compiled(text: &str) -> CompiledPolicy {
    let p = policy::parse(text, Path::new("t.toml")).unwrap_or_else(|e| panic!("{e}"));
    compile(&p, None).unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// What the kernel does, spelled out: first rule whose source and destination bits are set.
fn first_rule(c: &CompiledPolicy, src: &str, dst: &str) -> Option<usize> {
    let s = &c.classes[c.class_of(ip(src)) as usize];
    let d = &c.classes[c.class_of(ip(dst)) as usize];
    (0..c.rules.len()).find(|r| (s.src_rules[r / 64] & d.dst_rules[r / 64]) >> (r % 64) & 1 == 1)
}

/// Class of an address through a flat table, exactly as the XDP program walks it.
fn flat_lookup(chunks: &[FlatChunk], addr: &[u8]) -> u32 {
    let mut e = chunks[usize::from(addr[0])][usize::from(addr[1])];
    for b in &addr[2..] {
        if e & PTR == 0 {
            return e;
        }
        e = chunks[(e & !PTR) as usize][usize::from(*b)];
    }
    assert_eq!(e & PTR, 0, "a table path ends in a class");
    e
}

/// Class through the LPM entries: longest matching prefix.
fn lpm_lookup<const N: usize>(entries: &[LpmEntry<N>], addr: u128, width: u32) -> u32 {
    entries
        .iter()
        .filter(|e| {
            let mut b = [0u8; 16];
            b[16 - N..].copy_from_slice(&e.addr);
            let start = u128::from_be_bytes(b);
            let host = width - u32::from(e.len);
            let end = if host >= 128 {
                u128::MAX
            } else {
                start | ((1u128 << host) - 1)
            };
            (start..=end).contains(&addr)
        })
        .max_by_key(|e| e.len)
        .map_or(0, |e| e.class)
}

#[test]
fn longest_prefix_wins_between_zones() {
    let c = compiled(
        r#"
[zones.wide]
prefixes = ["10.0.0.0/8"]
[zones.narrow]
prefixes = ["10.1.0.0/16"]
[zones.both]
prefixes = ["10.2.0.0/16"]
[zones.both2]
prefixes = ["10.2.0.0/16"]
"#,
    );
    let zones = |a: &str| c.class_zone_names(c.class_of(ip(a)));
    assert_eq!(zones("10.0.0.1"), ["wide"]);
    assert_eq!(zones("10.1.2.3"), ["narrow"]);
    assert_eq!(zones("10.2.0.1"), ["both", "both2"]);
    assert_eq!(zones("10.3.0.1"), ["wide"]);
    assert!(zones("11.0.0.1").is_empty());
    assert!(zones("2001:db8::1").is_empty());
}

#[test]
fn first_matching_rule_wins_and_negation_holds() {
    let c = compiled(
        r#"
[zones.eu]
prefixes = ["192.0.2.0/24", "2001:db8:1::/48"]
[[rules]]
name = "eu-to-lab"
src_zone = "eu"
dst_prefix = ["10.10.0.0/16"]
action = "pass"
[[rules]]
name = "not-eu-to-lab"
src_zone = "!eu"
dst_prefix = ["10.10.0.0/16", "2001:db8:ff::/48"]
action = "drop"
[[rules]]
name = "to-eu"
dst_zone = "eu"
action = "drop"
[[rules]]
name = "everything"
action = "pass"
"#,
    );
    assert_eq!(first_rule(&c, "192.0.2.7", "10.10.1.1"), Some(0));
    assert_eq!(first_rule(&c, "198.51.100.1", "10.10.1.1"), Some(1));
    assert_eq!(first_rule(&c, "2001:db8:2::1", "2001:db8:ff::1"), Some(1));
    assert_eq!(first_rule(&c, "2001:db8:1::1", "2001:db8:ff::1"), Some(3));
    assert_eq!(first_rule(&c, "198.51.100.1", "192.0.2.200"), Some(2));
    assert_eq!(first_rule(&c, "198.51.100.1", "203.0.113.1"), Some(3));
}

#[test]
fn nested_rule_prefixes_keep_outer_membership() {
    // A rule list's /24 inside another list's /16: the /24's addresses are in both lists.
    let c = compiled(
        r#"
[[rules]]
name = "a"
src_prefix = ["10.0.0.0/16"]
dst_prefix = ["0.0.0.0/0"]
action = "drop"
[[rules]]
name = "b"
src_prefix = ["10.0.5.0/24"]
action = "pass"
"#,
    );
    assert_eq!(first_rule(&c, "10.0.5.1", "1.2.3.4"), Some(0));
    assert_eq!(first_rule(&c, "10.0.6.1", "1.2.3.4"), Some(0));
    assert_eq!(first_rule(&c, "10.1.0.1", "1.2.3.4"), None);
    // An empty prefix list matches nothing.
    let c = compiled("[[rules]]\nsrc_prefix = []\naction = \"drop\"\n");
    assert_eq!(first_rule(&c, "10.0.0.1", "10.0.0.2"), None);
}

#[test]
fn ranges_cover_each_family_exactly() {
    let c = compiled(
        r#"
[zones.a]
prefixes = ["0.0.0.0/1", "10.0.0.0/8", "10.0.0.0/32", "255.255.255.255/32", "::/0", "2001:db8::/32"]
"#,
    );
    for (ranges, max) in [
        (&c.v4_ranges, u128::from(u32::MAX)),
        (&c.v6_ranges, u128::MAX),
    ] {
        assert_eq!(ranges[0].start, 0);
        assert_eq!(ranges.last().unwrap().end, max);
        for w in ranges.windows(2) {
            assert_eq!(w[0].end + 1, w[1].start);
            assert_ne!(w[0].class, w[1].class, "adjacent equal classes are merged");
        }
    }
}

/// A small deterministic generator, so the randomized checks need no dependency.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 11
    }
}

#[test]
fn flat_table_and_lpm_entries_agree_with_the_ranges() {
    let mut rng = Lcg(7);
    let mut text = String::new();
    for z in 0..6 {
        let mut prefixes: Vec<String> = Vec::new();
        for _ in 0..40 {
            let len = 8 + (rng.next() % 25) as u32;
            let addr = (rng.next() as u32) & (u32::MAX << (32 - len));
            prefixes.push(format!("\"{}/{len}\"", std::net::Ipv4Addr::from(addr)));
        }
        for _ in 0..20 {
            let len = 16 + (rng.next() % 100) as u32;
            let addr = (u128::from(rng.next()) << 64 | u128::from(rng.next()))
                & (u128::MAX << (128 - len));
            prefixes.push(format!("\"{}/{len}\"", std::net::Ipv6Addr::from(addr)));
        }
        text.push_str(&format!(
            "[zones.z{z}]\nprefixes = [{}]\n",
            prefixes.join(", ")
        ));
    }
    let c = compiled(&text);
    assert!(c.stats.classes > 6);
    for _ in 0..20_000 {
        let a = rng.next() as u32;
        let want = c.class_of(IpAddr::from(std::net::Ipv4Addr::from(a)));
        assert_eq!(
            flat_lookup(&c.v4_chunks, &a.to_be_bytes()),
            want,
            "flat table at {}",
            std::net::Ipv4Addr::from(a)
        );
        assert_eq!(lpm_lookup(&c.v4_prefixes, u128::from(a), 32), want);
    }
    // Probe every range edge too.
    for r in &c.v4_ranges {
        for a in [r.start, r.end] {
            assert_eq!(
                flat_lookup(&c.v4_chunks, &(a as u32).to_be_bytes()),
                r.class
            );
            assert_eq!(lpm_lookup(&c.v4_prefixes, a, 32), r.class);
        }
    }
    for r in &c.v6_ranges {
        for a in [r.start, r.end] {
            assert_eq!(lpm_lookup(&c.v6_prefixes, a, 128), r.class);
            assert_eq!(flat_lookup(&c.v6_chunks, &a.to_be_bytes()), r.class);
        }
    }
}

#[test]
fn class_zero_means_nothing_and_config_is_encoded() {
    let c = compiled(
        "default = \"drop\"\nmalformed = \"pass\"\nnon_ip = \"drop\"\n[[rules]]\naction = \"pass\"\n",
    );
    assert_eq!(c.class_zones[0], [0; 4]);
    assert_eq!(c.config.default_action, cloudlet_common::action::DROP);
    assert_eq!(c.config.malformed_action, cloudlet_common::action::PASS);
    assert_eq!(c.config.non_ip_action, cloudlet_common::action::DROP);
    assert_eq!(c.config.rule_count, 1);
    // A rule without criteria is in every class's source and destination bitmaps.
    assert!(
        c.classes
            .iter()
            .all(|k| k.src_rules[0] & 1 == 1 && k.dst_rules[0] & 1 == 1)
    );
    assert!(c.v4_prefixes.is_empty() && c.v6_prefixes.is_empty());
    assert_eq!(c.v4_chunks.len(), L1_CHUNKS as usize);
    assert_eq!(c.v6_chunks.len(), L1_CHUNKS as usize);
}
