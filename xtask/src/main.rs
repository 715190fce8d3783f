//! Temporary entry point to exercise `setup`; replaced by the real xtask CLI.

mod setup;

use std::path::Path;

fn main() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root");
    let quiet = std::env::args().any(|a| a == "--quiet");
    setup::run(root, &setup::SetupOptions { quiet })?;
    println!("geoip database: {}", setup::geoip_db_path(root).display());
    Ok(())
}
