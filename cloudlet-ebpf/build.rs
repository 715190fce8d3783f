//! Code generation settings for bpf-linker, which turns the crate's bitcode into BPF.
fn main() {
    // Let LLVM load and store unaligned data with one instruction instead of byte by byte.
    println!("cargo:rustc-link-arg=--cpu-features=+allows-misaligned-mem-access");
}
