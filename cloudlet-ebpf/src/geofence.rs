//! Address classification: each address maps to an address class (its zones and the rule
//! prefix lists it falls in), longest prefix first. Unknown addresses are class 0.

use aya_ebpf::maps::{Array, LpmTrie, lpm_trie::Key};
use cloudlet_common::{FlatChunk, flat::PTR};

/// Class of an address (`N` bytes, network order) from a flat multibit table whose first
/// level starts at element `root`: one array read per address byte at most, stopping at
/// the first class, whatever the table's size.
#[inline(always)]
pub fn class_flat<const N: usize>(table: &Array<FlatChunk>, root: u32, addr: &[u8; N]) -> u32 {
    let Some(chunk) = table.get(root.wrapping_add(u32::from(addr[0]))) else {
        return 0;
    };
    let mut e = chunk[usize::from(addr[1])];
    let mut i = 2;
    while i < N {
        if e & PTR == 0 {
            return e;
        }
        let Some(chunk) = table.get(e & !PTR) else {
            return 0;
        };
        e = chunk[usize::from(addr[i])];
        i += 1;
    }
    if e & PTR == 0 { e } else { 0 }
}

/// Class of an address (`N` bytes, network order) from an LPM trie.
#[inline(always)]
pub fn class_trie<const N: usize>(trie: &LpmTrie<[u8; N], u32>, addr: &[u8; N]) -> u32 {
    trie.get(Key::new(N as u32 * 8, *addr))
        .copied()
        .unwrap_or(0)
}
