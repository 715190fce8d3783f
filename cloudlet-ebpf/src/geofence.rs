//! Address classification: each address maps to an address class (its zones and the rule
//! prefix lists it falls in), longest prefix first. Unknown addresses are class 0.

use aya_ebpf::maps::{Array, LpmTrie, lpm_trie::Key};
use cloudlet_common::{
    FlatChunk, HostSlot,
    flat::{CLASS, HOSTS, PTR},
    hosts,
};

/// A family's hosts table as one bank sees it.
pub struct Hosts<'a, const W: usize> {
    pub slots: &'a Array<HostSlot<W>>,
    /// Slots per bank, less one.
    pub mask: u32,
    /// The bank's first slot.
    pub base: u32,
    pub seed: u32,
}

/// Class of an address (`N` bytes, network order) of bank `bank` from a flat multibit table
/// whose first level starts at element `root`: one array read per address byte at most,
/// stopping at the first class, whatever the table's size; where the block holds hosts,
/// a probe of `hosts` (`W` words to `N` bytes) instead of the rest of the walk.
#[inline(always)]
pub fn class_flat<const N: usize, const W: usize>(
    table: &Array<FlatChunk>,
    hosts: &Hosts<'_, W>,
    root: u32,
    addr: &[u8; N],
) -> u32 {
    let Some(chunk) = table.get(root.wrapping_add(u32::from(addr[0]))) else {
        return 0;
    };
    let mut e = chunk[usize::from(addr[1])];
    let mut i = 2;
    while i < N {
        if e & PTR == 0 {
            return leaf(hosts, addr, e);
        }
        let Some(chunk) = table.get(e & !PTR) else {
            return 0;
        };
        e = chunk[usize::from(addr[i])];
        i += 1;
    }
    if e & PTR == 0 {
        leaf(hosts, addr, e)
    } else {
        0
    }
}

/// The class a table entry `e` gives `addr`: its own, or the host's where it has one.
#[inline(always)]
fn leaf<const N: usize, const W: usize>(hosts: &Hosts<'_, W>, addr: &[u8; N], e: u32) -> u32 {
    if e & HOSTS == 0 {
        return e;
    }
    const { assert!(N == 4 * W) };
    // SAFETY: N bytes are W words; one unaligned load each.
    let words = unsafe { (addr.as_ptr() as *const [u32; W]).read_unaligned() };
    let mut i = hosts::hash(&words, hosts.seed);
    let mut probes = 0;
    while probes < hosts::MAX_PROBES {
        let Some(slot) = hosts.slots.get(hosts.base.wrapping_add(i & hosts.mask)) else {
            break;
        };
        if slot.class & hosts::USED == 0 {
            break;
        }
        let mut same = true;
        let mut w = 0;
        while w < W {
            same &= slot.addr[w] == words[w];
            w += 1;
        }
        if same {
            return slot.class & CLASS;
        }
        i = i.wrapping_add(1);
        probes += 1;
    }
    e & CLASS
}

/// Class of an address (`N` bytes, network order) from an LPM trie.
#[inline(always)]
pub fn class_trie<const N: usize>(trie: &LpmTrie<[u8; N], u32>, addr: &[u8; N]) -> u32 {
    trie.get(Key::new(N as u32 * 8, *addr))
        .copied()
        .unwrap_or(0)
}
