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

/// What the kernel does, spelled out: first rule in the source and destination sets.
fn first_rule(c: &CompiledPolicy, src: &str, dst: &str) -> Option<usize> {
    c.first_rule(c.class_of(ip(src)), c.class_of(ip(dst)), &[])
}

/// Class of an address through a flat table and its hosts, exactly as the XDP program
/// walks them.
fn flat_lookup(chunks: &[FlatChunk], hosts: &[Range], addr: &[u8]) -> u32 {
    flat_lookup_at(chunks, hosts, 0, addr)
}

/// The same from the first level at element `root`.
fn flat_lookup_at(chunks: &[FlatChunk], hosts: &[Range], root: usize, addr: &[u8]) -> u32 {
    let leaf = |e: u32| {
        if e & HOSTS == 0 {
            return e;
        }
        let mut b = [0u8; 16];
        b[16 - addr.len()..].copy_from_slice(addr);
        let a = u128::from_be_bytes(b);
        hosts
            .binary_search_by_key(&a, |r| r.start)
            .map_or(e & CLASS, |i| hosts[i].class)
    };
    let mut e = chunks[root + usize::from(addr[0])][usize::from(addr[1])];
    for b in &addr[2..] {
        if e & PTR == 0 {
            return leaf(e);
        }
        e = chunks[(e & !PTR) as usize][usize::from(*b)];
    }
    assert_eq!(e & PTR, 0, "a table path ends in a class");
    leaf(e)
}

/// Entries of a flat table marked for the hosts map.
fn host_entries(chunks: &[FlatChunk]) -> usize {
    chunks
        .iter()
        .flatten()
        .filter(|e| *e & PTR == 0 && *e & HOSTS != 0)
        .count()
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
        // Hosts, some inside the prefixes above, some on their own, two to a block.
        for _ in 0..10 {
            let a = rng.next() as u32;
            let b = u128::from(rng.next()) << 64 | u128::from(rng.next());
            for (a, b) in [(a, b), (a ^ 2, b ^ 2)] {
                prefixes.push(format!("\"{}/32\"", std::net::Ipv4Addr::from(a)));
                prefixes.push(format!("\"{}/128\"", std::net::Ipv6Addr::from(b)));
            }
        }
        text.push_str(&format!(
            "[zones.z{z}]\nprefixes = [{}]\n",
            prefixes.join(", ")
        ));
    }
    let c = compiled(&text);
    assert!(c.stats.classes > 6);
    // Some blocks hold hosts and nothing else but their class: those go to the hosts map.
    assert!(host_entries(&c.v4_chunks) > 0 && host_entries(&c.v6_chunks) > 0);
    assert!(c.v4_hosts.len() >= 60 && c.v6_hosts.len() >= 60);
    for _ in 0..20_000 {
        let a = rng.next() as u32;
        let want = c.class_of(IpAddr::from(std::net::Ipv4Addr::from(a)));
        assert_eq!(
            flat_lookup(&c.v4_chunks, &c.v4_hosts, &a.to_be_bytes()),
            want,
            "flat table at {}",
            std::net::Ipv4Addr::from(a)
        );
        assert_eq!(lpm_lookup(&c.v4_prefixes, u128::from(a), 32), want);
    }
    // Probe every range edge too.
    for r in c.v4_ranges.iter() {
        for a in [r.start, r.end] {
            assert_eq!(
                flat_lookup(&c.v4_chunks, &c.v4_hosts, &(a as u32).to_be_bytes()),
                r.class
            );
            assert_eq!(lpm_lookup(&c.v4_prefixes, a, 32), r.class);
        }
    }
    for r in c.v6_ranges.iter() {
        for a in [r.start, r.end] {
            assert_eq!(lpm_lookup(&c.v6_prefixes, a, 128), r.class);
            assert_eq!(
                flat_lookup(&c.v6_chunks, &c.v6_hosts, &a.to_be_bytes()),
                r.class
            );
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
    // A rule without criteria is in every class's source and destination sets.
    assert!(
        c.classes
            .iter()
            .all(|k| c.set_holds(k.src_set, 0) && c.set_holds(k.dst_set, 0))
    );
    assert!(c.v4_prefixes.is_empty() && c.v6_prefixes.is_empty());
    assert_eq!(
        c.v4_chunks.len(),
        (L1_CHUNKS * BANKS) as usize,
        "both banks' first levels, nothing below"
    );
    assert_eq!(
        c.v6_chunks.len(),
        (L1_CHUNKS * BANKS) as usize,
        "both banks' first levels, nothing below"
    );
}

/// Random policies of many rules on prefixes, zones, ports and protocols: the first rule
/// of the compiled sets is the first rule whose criteria hold, checked directly.
#[test]
fn thousands_of_rules_first_match_agrees_with_the_criteria() {
    use cloudlet_common::field::*;
    let mut rng = Lcg(11);
    let mut text = String::from(
        "[zones.a]\nprefixes = [\"10.0.0.0/8\"]\n[zones.b]\nprefixes = [\"10.1.0.0/16\", \"192.0.2.0/24\"]\n",
    );
    let rules: usize = 3_000;
    for i in 0..rules {
        text.push_str(&format!("[[rules]]\nname = \"r{i}\"\naction = \"drop\"\n"));
        match rng.next() % 5 {
            0 => text.push_str(&format!(
                "src_prefix = [\"10.{}.{}.0/24\"]\n",
                rng.next() % 4,
                rng.next() % 256
            )),
            1 => text.push_str(&format!(
                "dst_zone = \"{}{}\"\n",
                if rng.next().is_multiple_of(2) {
                    "!"
                } else {
                    ""
                },
                if rng.next().is_multiple_of(2) {
                    "a"
                } else {
                    "b"
                }
            )),
            2 => text.push_str(&format!(
                "dst_port = [\"{}-{}\"]\n",
                rng.next() % 1000,
                1000 + rng.next() % 1000
            )),
            3 => text.push_str(&format!(
                "proto = \"{}\"\nsrc_port = \"!{}\"\n",
                if rng.next().is_multiple_of(2) {
                    "tcp"
                } else {
                    "udp"
                },
                rng.next() % 2000
            )),
            _ => text.push_str(&format!(
                "src_prefix = [\"10.{}.0.0/16\"]\ndst_port = {}\n",
                rng.next() % 4,
                rng.next() % 2000
            )),
        }
    }
    let p = policy::parse(&text, Path::new("t.toml")).unwrap_or_else(|e| panic!("{e}"));
    let c = compile(&p, None).unwrap();
    // Four kinds of criteria: four groups, each padded to whole words.
    assert!(
        (rules.div_ceil(64)..=rules.div_ceil(64) + 4).contains(&c.sets.words),
        "{} words",
        c.sets.words
    );
    for _ in 0..3_000 {
        let src = format!(
            "10.{}.{}.{}",
            rng.next() % 5,
            rng.next() % 256,
            rng.next() % 256
        );
        let dst = if rng.next().is_multiple_of(2) {
            "10.1.2.3"
        } else {
            "192.0.2.9"
        };
        let (proto, sport, dport) = (
            if rng.next().is_multiple_of(2) {
                6u8
            } else {
                17
            },
            (rng.next() % 2100) as u16,
            (rng.next() % 2100) as u16,
        );
        let fields = [
            PROTO_BASE + u32::from(proto),
            SRC_PORT_BASE + u32::from(sport),
            DST_PORT_BASE + u32::from(dport),
        ];
        let got = c.first_rule(c.class_of(ip(&src)), c.class_of(ip(dst)), &fields);
        let want = p.rules.iter().position(|r| {
            let pfx = |l: &Option<Vec<policy::Prefix>>, a: &str| {
                l.as_ref()
                    .is_none_or(|l| l.iter().any(|p| p.contains(ip(a))))
            };
            let zone = |m: Option<policy::ZoneMatch>, a: &str| {
                m.is_none_or(|m| c.class_in_zone(c.class_of(ip(a)), m.zone) != m.negate)
            };
            pfx(&r.src_prefix, &src)
                && pfx(&r.dst_prefix, dst)
                && zone(r.src_zone, &src)
                && zone(r.dst_zone, dst)
                && r.proto.as_ref().is_none_or(|m| m.accepts(proto))
                && r.src_port.as_ref().is_none_or(|m| m.accepts(sport))
                && r.dst_port.as_ref().is_none_or(|m| m.accepts(dport))
        });
        assert_eq!(got, want, "{src} -> {dst} proto {proto} {sport} -> {dport}");
    }
}

/// A table patched from one policy to the next: the new bank's first level finds the new
/// classes everywhere, and nothing the old bank reaches was written.
#[test]
fn patched_table_serves_the_new_policy_and_leaves_the_old_bank_alone() {
    let zones = |extra: &str| {
        format!(
            "[zones.a]\nprefixes = [\"10.0.0.0/8\", \"2001:db8::/32\"{extra}]\n[zones.b]\nprefixes = [\"10.1.0.0/16\"]\n[[rules]]\nsrc_zone = \"a\"\naction = \"drop\"\n"
        )
    };
    let parse = |t: &str| policy::parse(t, Path::new("t.toml")).unwrap();
    let mut compiler = Compiler::default();
    let a = compiler.compile(&parse(&zones("")), None).unwrap();
    let mut table = FlatTable::new(a.v4_chunks.clone(), a.v4_chunks.len() + 64);
    let before = table.chunks.to_vec();
    let b_policy = parse(&zones(
        ", \"172.16.5.0/24\", \"10.1.2.0/24\", \"11.0.0.0/8\", \"192.0.2.7/32\"",
    ));
    assert!(compiler.keeps_classes(&b_policy));
    let b = compiler.compile(&b_policy, None).unwrap();
    let root = L1_CHUNKS as usize;
    let patch =
        patch_table(&mut table, &a.v4_ranges, &b.v4_ranges, 32, 0, root as u32).expect("room");
    // Only free elements and the other bank's first level were written.
    for (idx, _) in &patch.writes {
        let i = *idx as usize;
        assert!(
            i >= a.v4_chunks.len() || (root..2 * root).contains(&i),
            "wrote {i}"
        );
    }
    let mut rng = Lcg(3);
    for _ in 0..20_000 {
        let x = rng.next() as u32;
        let addr = match rng.next() % 5 {
            0 => 0x0a01_0200 | (x & 0xff),
            4 => 0xc000_0200 | (x & 0xf),
            1 => 0xac10_0500 | (x & 0x1ff),
            2 => 0x0b00_0000 | (x & 0xff_ffff),
            _ => x,
        };
        let bytes = addr.to_be_bytes();
        let v4 = IpAddr::from(std::net::Ipv4Addr::from(addr));
        assert_eq!(
            flat_lookup_at(&table.chunks, &b.v4_hosts, root, &bytes),
            b.class_of(v4)
        );
        assert_eq!(
            flat_lookup_at(&before, &a.v4_hosts, 0, &bytes),
            a.class_of(v4)
        );
        assert_eq!(
            flat_lookup_at(&table.chunks, &a.v4_hosts, 0, &bytes),
            a.class_of(v4)
        );
    }
    // The new host's /16 goes to the hosts map in the new bank only.
    assert_eq!(host_entries(&table.chunks[root..2 * root]), 1);
    assert_eq!(host_entries(&table.chunks[..root]), 0);
    // The old bank's classes kept their meaning.
    for (class, zones) in a.class_zones.iter().enumerate() {
        assert_eq!(b.class_zones[class], *zones);
    }
    // No room: nothing happens.
    let mut full = FlatTable::new(a.v4_chunks.clone(), a.v4_chunks.len());
    let copy = full.chunks.to_vec();
    assert!(patch_table(&mut full, &a.v4_ranges, &b.v4_ranges, 32, 0, root as u32).is_none());
    assert_eq!(*full.chunks, copy);
}

/// Rules are laid out in groups of the same constrained fields, policy order within a
/// group, each group on words of its own; one-word policies keep policy order.
#[test]
fn layout_groups_rules_by_the_fields_they_constrain() {
    let kinds = [
        "src_prefix = [\"10.0.0.0/8\"]\n",
        "proto = \"udp\"\ndst_port = 53\n",
        "vlan = 7\n",
    ];
    let text = |n: usize| {
        (0..n)
            .map(|i| format!("[[rules]]\naction = \"drop\"\n{}", kinds[i % 3]))
            .collect::<String>()
    };
    let p = policy::parse(&text(300), Path::new("t.toml")).unwrap();
    let l = super::Layout::of(&p.rules);
    assert_eq!(l.words, 3 * 100usize.div_ceil(64));
    for (r, &slot) in l.slots.iter().enumerate() {
        let kind = r % 3;
        assert_eq!(slot as usize, kind * 128 + r / 3, "rule {r}");
        assert_eq!(l.group_end[r] as usize, kind * 2 + 2, "rule {r}");
    }
    let p = policy::parse(&text(64), Path::new("t.toml")).unwrap();
    let l = super::Layout::of(&p.rules);
    assert_eq!(l.words, 1);
    assert!(l.slots.iter().enumerate().all(|(r, s)| *s as usize == r));
}

/// Groups whose padding would go past the largest rule sets are merged, in policy order.
#[test]
fn layout_merges_groups_at_the_rule_limit() {
    // 201 words of one kind and 56 of another, one word too many: one group.
    let mut text = String::new();
    for i in 0..cloudlet_common::MAX_RULES {
        let kind = if i < 12_801 {
            "vlan = 7"
        } else {
            "proto = \"udp\""
        };
        text.push_str(&format!("[[rules]]\naction = \"drop\"\n{kind}\n"));
    }
    let p = policy::parse(&text, Path::new("t.toml")).unwrap();
    let l = super::Layout::of(&p.rules);
    assert_eq!(l.words, cloudlet_common::MAX_RULES / 64);
    assert!(l.slots.iter().enumerate().all(|(r, s)| *s as usize == r));
    assert!(l.group_end.iter().all(|e| *e as usize == l.words));
}
