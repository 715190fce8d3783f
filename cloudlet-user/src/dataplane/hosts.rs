//! The hosts tables' contents: open-addressed arrays of single addresses with classes of
//! their own, laid out as the XDP program probes them (see `cloudlet_common::hosts`).

use cloudlet_common::{
    HostSlot,
    hosts::{MAX_PROBES, USED, hash},
};

use super::compile::Range;

/// Slots per bank for up to `hosts` hosts: a power of two, at least twice as many.
pub fn slots_for(hosts: u32) -> u32 {
    (hosts.max(1) * 2).next_power_of_two()
}

/// The `W` words of an address (the low `4 * W` bytes of `addr`, network order), as the
/// program reads them from the packet.
pub fn words<const W: usize>(addr: u128) -> [u32; W] {
    let bytes = addr.to_be_bytes();
    let low = &bytes[16 - 4 * W..];
    std::array::from_fn(|i| u32::from_ne_bytes(low[4 * i..4 * i + 4].try_into().expect("4")))
}

/// Seeds tried before giving up on a layout: with the tables at most half full, a seed
/// fails (some host more than `MAX_PROBES` slots from home) with a tiny probability.
const SEEDS: u32 = 64;

/// One bank's table of `slots` slots (a power of two) holding `hosts` (single addresses)
/// laid out with `seed`, or `None` when some host would lie more than `MAX_PROBES` slots
/// from its home or the table would be over half full.
pub fn layout<const W: usize>(hosts: &[Range], slots: u32, seed: u32) -> Option<Vec<HostSlot<W>>> {
    debug_assert!(slots.is_power_of_two());
    if hosts.len() > (slots / 2) as usize {
        return None;
    }
    let mask = slots - 1;
    let mut table = vec![HostSlot::<W>::default(); slots as usize];
    for h in hosts {
        let addr = words::<W>(h.start);
        let home = hash(&addr, seed);
        let i = (0..MAX_PROBES)
            .map(|p| (home.wrapping_add(p) & mask) as usize)
            .find(|&i| table[i].class & USED == 0)?;
        table[i] = HostSlot {
            addr,
            class: USED | h.class,
        };
    }
    Some(table)
}

/// One bank's IPv4 and IPv6 tables, laid out with one seed.
#[derive(Clone, Debug, Default)]
pub struct Tables {
    pub seed: u32,
    pub v4: Vec<HostSlot<1>>,
    pub v6: Vec<HostSlot<4>>,
}

/// Both tables of a bank, with the first seed from `seed` on that lays out both; `None`
/// when none of `SEEDS` seeds does.
pub fn tables(v4: &[Range], v6: &[Range], slots: (u32, u32), seed: u32) -> Option<Tables> {
    (0..SEEDS).map(|s| seed.wrapping_add(s)).find_map(|seed| {
        Some(Tables {
            seed,
            v4: layout(v4, slots.0, seed)?,
            v6: layout(v6, slots.1, seed)?,
        })
    })
}

/// The class `table` (laid out with `seed`) gives `addr`, if it holds it: the program's
/// probe.
#[cfg(test)]
fn find<const W: usize>(table: &[HostSlot<W>], seed: u32, addr: u128) -> Option<u32> {
    let mask = table.len() as u32 - 1;
    let addr = words::<W>(addr);
    let home = hash(&addr, seed);
    for p in 0..MAX_PROBES {
        let slot = &table[(home.wrapping_add(p) & mask) as usize];
        if slot.class & USED == 0 {
            return None;
        }
        if slot.addr == addr {
            return Some(slot.class & !USED);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(addr: u128, class: u32) -> Range {
        Range {
            start: addr,
            end: addr,
            class,
        }
    }

    #[test]
    fn every_host_is_found_and_others_are_not() {
        // Addresses that differ in one bit or one word: the cases a weak hash clusters.
        let v6: Vec<Range> = (0..20_000u128)
            .map(|i| host((0x2001_0db8u128 << 96) | (i << 64) | i, (i % 7) as u32 + 1))
            .collect();
        let t = tables(&[], &v6, (2, slots_for(v6.len() as u32)), 0).expect("a layout");
        let (seed, table) = (t.seed, t.v6);
        for h in &v6 {
            assert_eq!(find(&table, seed, h.start), Some(h.class));
        }
        assert_eq!(find(&table, seed, 0x2001_0db8u128 << 96 | 1), None);
        assert_eq!(
            table.iter().filter(|s| s.class & USED != 0).count(),
            v6.len()
        );

        let v4: Vec<Range> = (0..5_000u128).map(|i| host(0x0a00_0000 + i, 3)).collect();
        let t = tables(&v4, &[], (slots_for(v4.len() as u32), 2), 7).expect("a layout");
        let (seed, table) = (t.seed, t.v4);
        assert!(v4.iter().all(|h| find(&table, seed, h.start) == Some(3)));
        assert_eq!(find(&table, seed, 0x0b00_0000), None);
    }

    #[test]
    fn words_are_the_bytes_in_packet_order() {
        let w = words::<1>(0xc0a8_0001);
        assert_eq!(w[0].to_ne_bytes(), [192, 168, 0, 1]);
        let w = words::<4>(0x2001_0db8_0000_0000_0000_0000_0000_0001);
        assert_eq!(w[0].to_ne_bytes(), [0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(w[3].to_ne_bytes(), [0, 0, 0, 1]);
    }

    #[test]
    fn an_overfull_table_is_refused() {
        let hosts: Vec<Range> = (0..9u128).map(|i| host(i, 1)).collect();
        assert!(layout::<1>(&hosts, 16, 0).is_none());
        assert!(layout::<1>(&hosts[..8], 16, 0).is_some());
    }
}
