//! Address classification: each address maps to an address class (its zones and the rule
//! prefix lists it falls in), longest prefix first. Unknown addresses are class 0.

use aya_ebpf::maps::{Array, HashMap, LpmTrie, lpm_trie::Key};
use cloudlet_common::{
    FlatChunk, HostKey,
    flat::{CLASS, HOSTS, PTR},
};

/// Class of an address (`N` bytes, network order) of bank `bank` from a flat multibit table
/// whose first level starts at element `root`: one array read per address byte at most,
/// stopping at the first class, whatever the table's size; where the block holds hosts,
/// one lookup in `hosts` instead of the rest of the walk.
#[inline(always)]
pub fn class_flat<const N: usize>(
    table: &Array<FlatChunk>,
    hosts: &HashMap<HostKey<N>, u32>,
    bank: u32,
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
            return leaf(hosts, bank, addr, e);
        }
        let Some(chunk) = table.get(e & !PTR) else {
            return 0;
        };
        e = chunk[usize::from(addr[i])];
        i += 1;
    }
    if e & PTR == 0 {
        leaf(hosts, bank, addr, e)
    } else {
        0
    }
}

/// The class a table entry `e` gives `addr`: its own, or the host's where it has one.
#[inline(always)]
fn leaf<const N: usize>(
    hosts: &HashMap<HostKey<N>, u32>,
    bank: u32,
    addr: &[u8; N],
    e: u32,
) -> u32 {
    if e & HOSTS == 0 {
        return e;
    }
    let key = HostKey { bank, addr: *addr };
    // SAFETY: the value is copied out at once.
    unsafe { hosts.get(&key) }.copied().unwrap_or(e & CLASS)
}

/// Class of an address (`N` bytes, network order) from an LPM trie.
#[inline(always)]
pub fn class_trie<const N: usize>(trie: &LpmTrie<[u8; N], u32>, addr: &[u8; N]) -> u32 {
    trie.get(Key::new(N as u32 * 8, *addr))
        .copied()
        .unwrap_or(0)
}
