//! Builds the XDP object (cloudlet-ebpf) with the pinned nightly and bpf-linker.
use std::path::PathBuf;

use anyhow::{Context as _, anyhow};

/// The nightly whose LLVM (22) matches bpf-linker's; `cargo xtask setup` installs it.
const EBPF_TOOLCHAIN: &str = "nightly-2026-05-20";

fn main() -> anyhow::Result<()> {
    let manifest_dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir
        .join("../cloudlet-ebpf")
        .canonicalize()
        .context("cloudlet-ebpf dir")?;
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    // The eBPF object also depends on the shared types.
    println!(
        "cargo:rerun-if-changed={}",
        manifest_dir.join("../cloudlet-common/src").display()
    );
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "cloudlet-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(EBPF_TOOLCHAIN),
    )
}
