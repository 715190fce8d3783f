//! `cargo xtask`: set up a machine, build, run the demo node, run the tests and benchmarks.
//!
//! Every command that needs prerequisites runs `setup` first (a few seconds when all is
//! installed), so each works on a fresh machine by itself.

mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Cloudlet's build, demo, test and benchmark tasks"
)]
struct Args {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install every prerequisite (apt packages, toolchains, bpf-linker, GeoIP data, the
    /// embedding model, the MCP Python SDK's virtual environment).
    Setup {
        /// Print only what changes.
        #[arg(long)]
        quiet: bool,
    },
    /// Build the daemon, the CLI and the demo (release).
    Build,
    /// Run the demo node: two namespaces on a veth pair, cloudletd with the demo policy on
    /// the real GeoIP database, traffic from several countries, live counters.
    Run {
        /// Stop after this many seconds (default: run until Ctrl-C).
        #[arg(long)]
        duration: Option<f64>,
        /// Frames per second the demo sends.
        #[arg(long, default_value_t = 2000)]
        pps: u32,
    },
    /// Run every test: unit tests, then the privileged integration tests (needs root).
    Test,
    /// Check formatting and lints.
    Lint,
    /// Run the benchmarks and write target/cloudlet-bench/results.json.
    Bench {
        /// A shorter run (fewer repetitions).
        #[arg(long)]
        quick: bool,
    },
    /// Build target/gpu-bundle: what a GPU machine without Rust needs to check the CUDA
    /// backend against the reference and benchmark it (see docs/compute.md).
    GpuBundle,
}

/// Packages with tests: everything but the eBPF crate (built by cloudlet-user's build
/// script for its own target) and the benchmarks.
const TESTED: &[&str] = &[
    "cloudlet-common",
    "cloudlet-user",
    "xtask",
    "cloudlet-tests",
];

/// `-p NAME` for each package.
fn packages(names: &[&str]) -> Vec<String> {
    names
        .iter()
        .flat_map(|n| ["-p".to_string(), n.to_string()])
        .collect()
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// Runs a command in the workspace root, failing with the command line if it fails.
fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .current_dir(root())
        .status()
        .with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Runs `cargo test`, echoing its output, and adds up its "test result" lines.
fn run_counting(cmd: &mut Command) -> Result<(u64, u64)> {
    use std::io::{BufRead as _, BufReader};
    let mut child = cmd
        .current_dir(root())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let (mut passed, mut failed) = (0, 0);
    let stdout = child.stdout.take().context("piped stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test output")?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| {
                rest.split(';')
                    .find_map(|part| {
                        part.trim()
                            .trim_start_matches("ok. ")
                            .trim_start_matches("FAILED. ")
                            .strip_suffix(word)
                    })
                    .and_then(|n| n.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            passed += count(" passed");
            failed += count(" failed");
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    if !status.success() {
        println!("\ncargo xtask test: {passed} passed, {failed} failed");
        bail!("{cmd:?} failed: {status}");
    }
    Ok((passed, failed))
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} needs root (BPF, XDP and network namespaces); run it as root");
    }
    Ok(())
}

fn setup_quiet() -> Result<()> {
    setup::run(&root(), &setup::SetupOptions { quiet: true })
}

fn build_release() -> Result<()> {
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "cloudlet-user",
        "-p",
        "cloudlet-tests",
        "--bins",
    ]))
}

/// The GPU bundle, in two folders that each fit one transfer to the lent machine (64 MiB):
/// `a/` the stripped `embed-bench`, the run script, the fixtures, the tokenizer, the
/// config and the model's first half; `b/` the model's second half. `run.sh` joins the
/// halves, checks the model's SHA-256, then runs the parity check and the benchmark on the
/// CUDA backend (and the CPU's, for comparison on that machine).
fn gpu_bundle(root: &std::path::Path) -> Result<()> {
    use std::fs;
    let out = root.join("target/gpu-bundle");
    if out.exists() {
        fs::remove_dir_all(&out)?;
    }
    let (a, b) = (out.join("a"), out.join("b"));
    fs::create_dir_all(&a)?;
    fs::create_dir_all(&b)?;
    run(Command::new("strip")
        .arg("-o")
        .arg(a.join("embed-bench"))
        .arg(root.join("target/release/embed-bench")))?;
    let model = setup::model_dir(root);
    for f in ["tokenizer.json", "config.json"] {
        fs::copy(model.join(f), a.join(f))?;
    }
    fs::copy(
        root.join("tests/fixtures/minilm-golden.json"),
        a.join("minilm-golden.json"),
    )?;
    let weights = fs::read(model.join("model.safetensors"))?;
    let half = weights.len() / 2;
    fs::write(a.join("model.safetensors.1"), &weights[..half])?;
    fs::write(b.join("model.safetensors.2"), &weights[half..])?;
    let sha = {
        use sha2::Digest as _;
        sha2::Sha256::digest(&weights)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let script = format!(
        "#!/bin/sh\n\
         # Parity of the CUDA backend with the reference, then its benchmark, on this machine.\n\
         set -e\n\
         here=$(dirname \"$0\")\n\
         model=\"$here/model\"\n\
         mkdir -p \"$model\"\n\
         cp \"$here/tokenizer.json\" \"$here/config.json\" \"$model/\"\n\
         cat \"$here/model.safetensors.1\" \"${{1:-$here/../b}}/model.safetensors.2\" > \"$model/model.safetensors\"\n\
         echo \"{sha}  $model/model.safetensors\" | sha256sum -c -\n\
         nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true\n\
         \"$here/embed-bench\" --model \"$model\" --backend cuda --check \"$here/minilm-golden.json\"\n\
         \"$here/embed-bench\" --model \"$model\" --backend cuda --quick --out \"${{OUT:-$here/out}}\"\n\
         \"$here/embed-bench\" --model \"$model\" --backend cpu --quick --out \"${{OUT:-$here/out}}\"\n"
    );
    let run_sh = a.join("run.sh");
    fs::write(&run_sh, script)?;
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(&run_sh, fs::Permissions::from_mode(0o755))?;
    println!(
        "wrote {} (a/: {} bytes, b/: {} bytes)",
        out.display(),
        dir_size(&a)?,
        dir_size(&b)?
    );
    Ok(())
}

fn dir_size(dir: &std::path::Path) -> Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir)? {
        total += e?.metadata()?.len();
    }
    Ok(total)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let root = root();
    match args.command {
        Task::Setup { quiet } => setup::run(&root, &setup::SetupOptions { quiet }),
        Task::Build => {
            setup_quiet()?;
            build_release()
        }
        Task::Run { duration, pps } => {
            require_root("the demo")?;
            setup_quiet()?;
            build_release()?;
            let mut demo = Command::new(root.join("target/release/cloudlet-demo"));
            demo.args([
                "--cloudletd",
                "target/release/cloudletd",
                "--pps",
                &pps.to_string(),
            ]);
            if let Some(d) = duration {
                demo.args(["--duration", &d.to_string()]);
            }
            run(&mut demo)
        }
        Task::Test => {
            require_root("the integration tests")?;
            setup_quiet()?;
            // One build profile for everything, so nothing is compiled twice. The daemon's
            // binaries first: the integration tests run them.
            run(cargo().args(["build", "-p", "cloudlet-user", "--bins"]))?;
            let mut test = cargo();
            test.arg("test").args(packages(TESTED));
            let (passed, failed) = run_counting(&mut test)?;
            println!("\ncargo xtask test: {passed} passed, {failed} failed");
            Ok(())
        }
        Task::Lint => {
            setup_quiet()?;
            run(cargo().args(["fmt", "--all", "--check"]))?;
            run(cargo()
                .args(["clippy", "--all-targets"])
                .args(packages(TESTED))
                .args(["-p", "cloudlet-benches", "--", "-D", "warnings"]))
        }
        Task::GpuBundle => {
            setup_quiet()?;
            run(cargo().args([
                "build",
                "--release",
                "-p",
                "cloudlet-benches",
                "--bin",
                "embed-bench",
            ]))?;
            gpu_bundle(&root)
        }
        Task::Bench { quick } => {
            require_root("the benchmarks")?;
            setup_quiet()?;
            run(cargo().args(["build", "--release", "-p", "cloudlet-benches", "--bins"]))?;
            let mut bench = Command::new(root.join("target/release/packet-bench"));
            bench.args(["--out", "target/cloudlet-bench"]);
            if quick {
                bench.arg("--quick");
            }
            run(&mut bench)?;
            // QUIC handshakes and HTTP/3 bulk over loopback; adds its figures to the same
            // results.json.
            let mut quic_bench = Command::new(root.join("target/release/quic-bench"));
            quic_bench.args(["--out", "target/cloudlet-bench"]);
            if quick {
                quic_bench.arg("--quick");
            }
            run(&mut quic_bench)?;
            // Sentence embeddings against sentence-transformers (PyTorch) in the same run.
            let python = setup::bench_python(&root)?;
            let mut embed_bench = Command::new(root.join("target/release/embed-bench"));
            embed_bench.args(["--out", "target/cloudlet-bench", "--python"]);
            embed_bench.arg(python);
            if quick {
                embed_bench.arg("--quick");
            }
            run(&mut embed_bench)?;
            // tools/call through the MCP guard against straight to the same upstream (the
            // MCP Python SDK's server, from setup's virtual environment).
            let mut mcp_bench = Command::new(root.join("target/release/mcp-bench"));
            mcp_bench.args(["--out", "target/cloudlet-bench", "--python"]);
            mcp_bench.arg(setup::mcp_python(&root));
            if quick {
                mcp_bench.arg("--quick");
            }
            run(&mut mcp_bench)?;
            let mut criterion = cargo();
            criterion.args(["bench", "-p", "cloudlet-benches", "--bench", "userspace"]);
            criterion.args(["--bench", "mlkem"]);
            if quick {
                criterion.args(["--", "--warm-up-time", "1", "--measurement-time", "2"]);
            }
            run(&mut criterion)
        }
    }
}
