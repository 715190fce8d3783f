//! Address classification: each address maps to an address class (its zones and the rule
//! prefix lists it falls in), longest prefix first. Unknown addresses are class 0.

use aya_ebpf::maps::lpm_trie::Key;
use cloudlet_common::v4table::PTR;

use crate::{V4_TABLE, V4_TRIE, V6_TRIE};

/// Class of an IPv4 address (host order) from the flat 16-8-8 table: at most three
/// array reads, whatever the table's size.
#[inline(always)]
pub fn class_v4_flat(addr: u32) -> u32 {
    let Some(chunk) = V4_TABLE.get(addr >> 24) else {
        return 0;
    };
    let e = chunk[((addr >> 16) & 0xff) as usize];
    if e & PTR == 0 {
        return e;
    }
    let Some(chunk) = V4_TABLE.get(e & !PTR) else {
        return 0;
    };
    let e = chunk[((addr >> 8) & 0xff) as usize];
    if e & PTR == 0 {
        return e;
    }
    let Some(chunk) = V4_TABLE.get(e & !PTR) else {
        return 0;
    };
    let e = chunk[(addr & 0xff) as usize];
    if e & PTR == 0 { e } else { 0 }
}

/// Class of an IPv4 address (host order) from the LPM trie.
#[inline(always)]
pub fn class_v4_trie(addr: u32) -> u32 {
    V4_TRIE
        .get(Key::new(32, addr.to_be_bytes()))
        .copied()
        .unwrap_or(0)
}

/// Class of an IPv6 address (network order) from the LPM trie.
#[inline(always)]
pub fn class_v6(addr: &[u8; 16]) -> u32 {
    V6_TRIE.get(Key::new(128, *addr)).copied().unwrap_or(0)
}
