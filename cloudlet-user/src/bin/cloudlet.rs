//! cloudlet: the operator's command line.

use std::{
    io::{BufRead as _, Write as _},
    net::IpAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use cloudlet::{
    admin,
    config::DEFAULT_ADMIN_SOCKET,
    dataplane::{classify::Classifier, stats::Stats},
    error_chain, frame,
    geoip::GeoDb,
    node::prepare_policy,
    policy,
};

/// Where the pin store is: `--pins`, or the `[mcp]` section of `--config`.
#[derive(clap::Args)]
struct PinsAt {
    /// The pin store.
    #[arg(long, conflicts_with = "config")]
    pins: Option<PathBuf>,
    /// cloudletd's configuration, whose `[mcp] pins` names the store.
    #[arg(long)]
    config: Option<PathBuf>,
}

impl PinsAt {
    fn path(&self) -> anyhow::Result<PathBuf> {
        if let Some(p) = &self.pins {
            return Ok(p.clone());
        }
        let Some(c) = &self.config else {
            return Ok(PathBuf::from(cloudlet::mcp::config::DEFAULT_PINS));
        };
        let config = cloudlet::config::Config::load(c)?;
        config
            .mcp
            .map(|m| m.pins)
            .with_context(|| format!("{} has no [mcp] section", c.display()))
    }
}

#[derive(Subcommand)]
enum McpCommand {
    /// Lists pinned tools; definitions waiting for approval are marked PENDING with the
    /// new description.
    Pins {
        #[command(flatten)]
        at: PinsAt,
        /// Print the store as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Approves the pending definitions of the named tools (as clients see them:
    /// `prefix__tool`). cloudletd takes the approval at the tool's next listing or call.
    Approve {
        #[command(flatten)]
        at: PinsAt,
        /// Approve every pending definition.
        #[arg(long, conflicts_with = "tools")]
        all: bool,
        tools: Vec<String>,
    },
}

#[derive(Parser)]
#[command(name = "cloudlet", version, about = "Cloudlet operator CLI")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Policy files.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Runs the real XDP program (BPF_PROG_TEST_RUN) on frames and prints one JSON
    /// verdict a line. Frames come as hex lines on stdin (one Ethernet frame a line;
    /// blank lines and lines starting with '#' are skipped) or from a pcap file.
    Classify {
        /// The policy to judge by.
        #[arg(long)]
        policy: PathBuf,
        /// Read frames from this pcap file instead of stdin.
        #[arg(long)]
        pcap: Option<PathBuf>,
    },
    /// GeoIP lookups.
    Geo {
        #[command(subcommand)]
        command: GeoCommand,
    },
    /// Sampled drops of the running cloudletd (16 to 64 a second per CPU at most).
    Events {
        /// cloudletd's admin socket.
        #[arg(long, default_value = DEFAULT_ADMIN_SOCKET)]
        socket: PathBuf,
        /// Print JSON lines instead of text.
        #[arg(long)]
        json: bool,
        /// Keep printing new events until interrupted.
        #[arg(long, short)]
        follow: bool,
    },
    /// Sentence embeddings (all-MiniLM-L6-v2) of the lines on stdin, one JSON array of 384
    /// numbers a line, computed here on the CPU. Inputs past 256 tokens are cut, as the
    /// reference does, and a warning names their line.
    Embed {
        /// The model folder (`cargo xtask setup` unpacks it).
        #[arg(long, default_value = cloudlet::compute::DEFAULT_MODEL_DIR)]
        model: PathBuf,
        /// Lines embedded together.
        #[arg(long, default_value_t = 32)]
        batch: usize,
    },
    /// The MCP guard's tool pins: what is approved, what waits for approval.
    Mcp {
        #[command(subcommand)]
        command: McpCommand,
    },
    /// Counters of the running cloudletd.
    Stats {
        /// cloudletd's admin socket.
        #[arg(long, default_value = DEFAULT_ADMIN_SOCKET)]
        socket: PathBuf,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
        /// Print again every this many seconds, until interrupted.
        #[arg(long)]
        watch: Option<f64>,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validates a policy file (and compiles it against its GeoIP database).
    Check { file: PathBuf },
}

#[derive(Subcommand)]
enum GeoCommand {
    /// Prints the country of an address, and its zones under a policy.
    Lookup {
        ip: IpAddr,
        /// Policy whose GeoIP database and zones to use.
        #[arg(long)]
        policy: Option<PathBuf>,
        /// GeoIP database to use (when the policy names none, or no policy is given).
        #[arg(long, default_value = "data/geoip/geo-whois-asn-country.mmdb")]
        database: PathBuf,
    },
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    let result = match args.command {
        Command::Policy {
            command: PolicyCommand::Check { file },
        } => policy_check(&file),
        Command::Classify { policy, pcap } => classify(&policy, pcap.as_deref()),
        Command::Geo {
            command:
                GeoCommand::Lookup {
                    ip,
                    policy,
                    database,
                },
        } => geo_lookup(ip, policy.as_deref(), &database),
        Command::Events {
            socket,
            json,
            follow,
        } => events(&socket, json, follow),
        Command::Stats {
            socket,
            json,
            watch,
        } => stats(&socket, json, watch),
        Command::Embed { model, batch } => embed(&model, batch),
        Command::Mcp { command } => mcp(command),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn embed(model: &Path, batch: usize) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(batch > 0, "--batch must be at least 1");
    let embedder = cloudlet::compute::Embedder::cpu(model)?;
    let stdin = std::io::stdin().lock();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut lines = stdin.lines();
    let mut first = 1;
    loop {
        let chunk: Vec<String> = lines.by_ref().take(batch).collect::<Result<_, _>>()?;
        if chunk.is_empty() {
            break;
        }
        let texts: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let e = embedder.embed(&texts)?;
        for i in &e.truncated {
            eprintln!(
                "warning: line {}: longer than {} tokens, cut",
                first + i,
                cloudlet::compute::MAX_TOKENS
            );
        }
        for v in &e.vectors {
            writeln!(out, "{}", serde_json::to_string(v)?)?;
        }
        out.flush()?;
        first += chunk.len();
    }
    Ok(ExitCode::SUCCESS)
}

fn policy_check(file: &Path) -> anyhow::Result<ExitCode> {
    match prepare_policy(file) {
        Ok(c) => {
            println!(
                "{}: ok: {} rules, {} zones, {} GeoIP networks, {} IPv4 and {} IPv6 prefixes, {} address classes",
                file.display(),
                c.rule_count(),
                c.zone_names.len(),
                c.stats.geo_networks,
                c.stats.v4_prefixes,
                c.stats.v6_prefixes,
                c.stats.classes
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{}", error_chain(&e));
            Ok(ExitCode::FAILURE)
        }
    }
}

fn classify(policy_path: &Path, pcap: Option<&Path>) -> anyhow::Result<ExitCode> {
    let compiled = match prepare_policy(policy_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}", error_chain(&e));
            return Ok(ExitCode::FAILURE);
        }
    };
    let classifier = Classifier::new(&compiled).context("loading the XDP program (needs root)")?;
    let mut out = std::io::stdout().lock();
    let mut failed = 0usize;
    let mut judge = |input: Result<Vec<u8>, String>,
                     line: usize,
                     out: &mut dyn std::io::Write|
     -> anyhow::Result<()> {
        let result = input.and_then(|f| {
            classifier
                .classify(&compiled, &f)
                .map_err(|e| e.to_string())
        });
        match result {
            Ok(v) => writeln!(out, "{}", serde_json::to_string(&v)?)?,
            Err(error) => {
                failed += 1;
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({ "line": line, "error": error })
                )?;
            }
        }
        Ok(())
    };
    match pcap {
        Some(path) => {
            let data =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let frames =
                frame::read_pcap(&data).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            for (i, f) in frames.into_iter().enumerate() {
                judge(Ok(f), i + 1, &mut out)?;
            }
        }
        None => {
            for (i, line) in std::io::stdin().lock().lines().enumerate() {
                let line = line.context("reading stdin")?;
                let t = line.trim();
                if t.is_empty() || t.starts_with('#') {
                    continue;
                }
                judge(frame::parse_hex_line(t), i + 1, &mut out)?;
            }
        }
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

fn geo_lookup(ip: IpAddr, policy_path: Option<&Path>, database: &Path) -> anyhow::Result<ExitCode> {
    let (db_path, compiled) = match policy_path {
        Some(p) => {
            let pol = policy::load(p)?;
            let db = pol
                .geoip_database
                .clone()
                .context("the policy has no [geoip] database")?;
            (db, Some(prepare_policy(p)?))
        }
        None => (database.to_path_buf(), None),
    };
    let db = GeoDb::open(&db_path)?;
    let country = db.country(ip)?;
    let zones: Option<Vec<String>> = compiled.as_ref().map(|c| {
        c.class_zone_names(c.class_of(ip))
            .into_iter()
            .map(str::to_string)
            .collect()
    });
    let mut v = serde_json::json!({ "ip": ip.to_string(), "country": country });
    if let Some(zones) = zones {
        v["zone"] = serde_json::json!(zones.first());
        v["zones"] = serde_json::json!(zones);
    }
    println!("{v}");
    Ok(ExitCode::SUCCESS)
}

fn stats(socket: &Path, json: bool, watch: Option<f64>) -> anyhow::Result<ExitCode> {
    loop {
        let body = admin::get(socket, "/stats").with_context(|| "is cloudletd running?")?;
        if json {
            println!("{body}");
        } else {
            let s: Stats = serde_json::from_str(&body).context("decoding /stats")?;
            print!("{}", s.render_table());
        }
        std::io::stdout().flush()?;
        match watch {
            Some(secs) => std::thread::sleep(Duration::from_secs_f64(secs.max(0.1))),
            None => return Ok(ExitCode::SUCCESS),
        }
    }
}

fn events(socket: &Path, json: bool, follow: bool) -> anyhow::Result<ExitCode> {
    use cloudlet::dataplane::events::Event;
    let mut since: Option<u64> = None;
    loop {
        let target = since.map_or_else(|| "/events".to_string(), |s| format!("/events?since={s}"));
        let body = admin::get(socket, &target).with_context(|| "is cloudletd running?")?;
        let list: Vec<Event> = serde_json::from_str(&body).context("decoding /events")?;
        for e in &list {
            if json {
                println!("{}", serde_json::to_string(e)?);
            } else {
                let at = |a: &Option<String>, p: Option<u32>| match (a, p) {
                    (Some(a), Some(p)) if a.contains(':') => format!("[{a}]:{p}"),
                    (Some(a), Some(p)) => format!("{a}:{p}"),
                    (Some(a), None) => a.clone(),
                    _ => "-".to_string(),
                };
                println!(
                    "{} {} {} {} -> {} proto {} {} bytes rule {}",
                    e.time_ms,
                    e.interface,
                    e.reason,
                    at(&e.src, e.src_port),
                    at(&e.dst, e.dst_port),
                    e.proto.map_or("-".to_string(), |p| p.to_string()),
                    e.len,
                    e.rule.as_deref().unwrap_or("-"),
                );
            }
            since = Some(e.seq);
        }
        std::io::stdout().flush()?;
        if !follow {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn mcp(command: McpCommand) -> anyhow::Result<ExitCode> {
    use cloudlet::mcp::pins;
    match command {
        McpCommand::Pins { at, json } => {
            let path = at.path()?;
            let file = pins::read(&path)?;
            let mut out = std::io::stdout().lock();
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&file)?)?;
                return Ok(ExitCode::SUCCESS);
            }
            for (name, e) in &file.tools {
                let approved = e.approved.as_deref().map_or("-", |h| &h[..h.len().min(16)]);
                match &e.pending {
                    Some(p) => writeln!(
                        out,
                        "{name}  approved {approved}  PENDING {}: {:?}",
                        &p[..p.len().min(16)],
                        e.pending_description.as_deref().unwrap_or("")
                    )?,
                    None => writeln!(out, "{name}  approved {approved}")?,
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        McpCommand::Approve { at, all, tools } => {
            if !all && tools.is_empty() {
                anyhow::bail!("name the tools to approve, or pass --all");
            }
            let path = at.path()?;
            let done = pins::approve(&path, &tools)?;
            if done.is_empty() {
                eprintln!("nothing was pending in {}", path.display());
            }
            for name in done {
                println!("approved {name}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
