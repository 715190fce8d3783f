//! Helpers for Cloudlet's integration tests and demo: network namespaces, veth pairs, raw
//! frame I/O, and BPF_PROG_TEST_RUN fixtures.

pub mod daemon;
pub mod netns;
pub mod progtest;
pub mod reference;
pub mod traffic;
