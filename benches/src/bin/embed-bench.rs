//! Sentence embeddings per second at batch 1, 32 and 256, and batch-1 latency, for each
//! backend this machine has, next to sentence-transformers (PyTorch) on the same hardware
//! in the same run (`benches/reference/st_bench.py`, run by the Python given with
//! `--python`). Figures are added to `results.json`.

use std::{path::PathBuf, process::Command, time::Instant};

use anyhow::{Context as _, Result, bail};
use cloudlet::compute::{BackendChoice, BertWeights, Embedder, Tokenizer, backends, cosine};
use cloudlet_benches::{Figure, merge_results};

struct Opts {
    out: PathBuf,
    quick: bool,
    model: PathBuf,
    python: Option<PathBuf>,
    backend: BackendChoice,
    /// Golden embeddings to check the backend against (and stop there).
    check: Option<PathBuf>,
}

fn opts() -> Result<Opts> {
    let mut o = Opts {
        out: PathBuf::from("target/cloudlet-bench"),
        quick: false,
        model: PathBuf::from(cloudlet::compute::DEFAULT_MODEL_DIR),
        python: None,
        backend: BackendChoice::Auto,
        check: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => o.quick = true,
            "--out" => o.out = it.next().context("--out needs a folder")?.into(),
            "--model" => o.model = it.next().context("--model needs a folder")?.into(),
            "--python" => o.python = Some(it.next().context("--python needs a path")?.into()),
            "--check" => o.check = Some(it.next().context("--check needs a fixtures file")?.into()),
            "--backend" => {
                o.backend = match it.next().as_deref() {
                    Some("auto") => BackendChoice::Auto,
                    Some("cpu") => BackendChoice::Cpu,
                    Some("cuda") => BackendChoice::Cuda,
                    other => bail!("--backend takes auto, cpu or cuda, not {other:?}"),
                }
            }
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(o)
}

/// Sentences of everyday lengths (8 to about 60 tokens), each one different.
fn inputs(n: usize) -> Vec<String> {
    const BASE: [&str; 8] = [
        "The edge node filters packets before they reach the service.",
        "How do I reset the password of my account when the reset link has expired?",
        "A cloudlet is a small cloud next to its users, serving requests with low latency.",
        "Shipping was fast, but the package arrived damaged and the box was open on one side.",
        "Quarterly revenue grew by eight percent, driven by strong demand in the European market and new subscriptions.",
        "Please summarise the attached report and list the three most important risks it names.",
        "Weather tomorrow: light rain in the morning, clearing in the afternoon, highs around fourteen degrees.",
        "The model returns one vector per sentence; similar sentences get vectors that point the same way.",
    ];
    (0..n)
        .map(|i| format!("{} (case {i})", BASE[i % BASE.len()]))
        .collect()
}

const BATCHES: [usize; 3] = [1, 32, 256];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Embeds the golden inputs in one call and compares with the reference's vectors:
/// fails below a cosine similarity of 0.9999.
fn check(embedder: &Embedder, path: &std::path::Path) -> Result<()> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let cases = v["cases"].as_array().context("fixtures without cases")?;
    let texts: Vec<&str> = cases.iter().filter_map(|c| c["text"].as_str()).collect();
    let start = Instant::now();
    let out = embedder.embed(&texts)?;
    let took = start.elapsed();
    let mut least = f64::MAX;
    for (c, got) in cases.iter().zip(&out.vectors) {
        let want: Vec<f32> = c["embedding"]
            .as_array()
            .context("case without embedding")?
            .iter()
            .filter_map(|x| x.as_f64().map(|x| x as f32))
            .collect();
        least = least.min(cosine(got, &want));
    }
    println!(
        "check: {} backend, {} inputs in {:.1} ms, least cosine similarity to the reference {least:.8}",
        embedder.backend.name(),
        texts.len(),
        took.as_secs_f64() * 1e3
    );
    anyhow::ensure!(least >= 0.9999, "parity NOT met: {least:.8} < 0.9999");
    println!("parity met (>= 0.9999 for every input)");
    Ok(())
}

fn main() -> Result<()> {
    let o = opts()?;
    let (n, latency_runs) = if o.quick { (256, 32) } else { (1024, 128) };
    let texts = inputs(n);
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let (primary, _) = backends(o.backend, BertWeights::load(&o.model)?)?;
    let embedder = Embedder {
        tokenizer: Tokenizer::load(&o.model)?,
        backend: primary,
    };
    let backend = embedder.backend.name();
    if let Some(path) = &o.check {
        return check(&embedder, path);
    }
    let threads = rayon::current_num_threads();
    embedder.embed(&refs[..8])?;
    if let Some(python) = &o.python {
        std::fs::create_dir_all(&o.out)?;
        std::fs::write(
            o.out.join("embed-inputs.json"),
            serde_json::to_string(&texts)?,
        )?;
        anyhow::ensure!(python.exists(), "{} is missing", python.display());
    }
    // Rounds alternate between the two sides; each figure is its side's best round (the
    // noise of a shared machine only slows).
    let rounds = if o.quick { 2 } else { 3 };
    let mut ours = [0f64; BATCHES.len()];
    let mut latencies = Vec::new();
    let mut reference: Option<serde_json::Value> = None;
    let mut theirs = [0f64; BATCHES.len()];
    let mut their_latencies = Vec::new();
    for _ in 0..rounds {
        for (i, b) in BATCHES.into_iter().enumerate() {
            let count = if b > 1 { n } else { n.min(64) };
            let start = Instant::now();
            for chunk in refs[..count].chunks(b) {
                embedder.embed(chunk)?;
            }
            ours[i] = ours[i].max(count as f64 / start.elapsed().as_secs_f64());
        }
        for i in 0..latency_runs {
            let start = Instant::now();
            embedder.embed(&refs[i % n..i % n + 1])?;
            latencies.push(start.elapsed().as_secs_f64() * 1e3);
        }
        if let Some(python) = &o.python {
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/reference/st_bench.py");
            let out = Command::new(python)
                .arg(script)
                .arg(&o.model)
                .arg(o.out.join("embed-inputs.json"))
                .arg(BATCHES.map(|b| b.to_string()).join(","))
                .arg(latency_runs.to_string())
                .output()
                .with_context(|| format!("running {}", python.display()))?;
            if !out.status.success() {
                bail!(
                    "the reference failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            for (i, b) in BATCHES.into_iter().enumerate() {
                let x = v["throughput"][b.to_string()].as_f64().unwrap_or(0.0);
                theirs[i] = theirs[i].max(x);
            }
            their_latencies.extend(
                v["latency_ms"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|x| x.as_f64()),
            );
            reference = Some(v);
        }
    }
    let ours_latency = median(latencies);

    let mut figures = Vec::new();
    let mut fig = |name: String, value: f64, unit: &str, baseline: Option<(String, f64)>| {
        figures.push(Figure {
            name,
            value,
            unit: unit.to_string(),
            ratio: baseline.as_ref().map(|(_, b)| value / b),
            baseline: baseline.map(|(n, _)| n),
        });
    };
    for (i, b) in BATCHES.into_iter().enumerate() {
        let base = reference
            .as_ref()
            .map(|_| (format!("embed_pytorch_cpu_batch{b}"), theirs[i]));
        if let Some((name, v)) = &base {
            fig(name.clone(), *v, "embeddings/s", None);
        }
        fig(
            format!("embed_{backend}_batch{b}"),
            ours[i],
            "embeddings/s",
            base,
        );
    }
    let base_latency = reference.as_ref().map(|_| {
        (
            "embed_pytorch_cpu_latency_batch1".to_string(),
            median(their_latencies),
        )
    });
    if let Some((name, v)) = &base_latency {
        fig(name.clone(), *v, "ms", None);
    }
    fig(
        format!("embed_{backend}_latency_batch1"),
        ours_latency,
        "ms",
        base_latency,
    );
    println!(
        "{:<40} {:>12} {:<14} {:>7}  BASELINE",
        "FIGURE", "VALUE", "UNIT", "RATIO"
    );
    for f in &figures {
        println!(
            "{:<40} {:>12.2} {:<14} {:>7}  {}",
            f.name,
            f.value,
            f.unit,
            f.ratio.map(|r| format!("{r:.2}x")).unwrap_or_default(),
            f.baseline.clone().unwrap_or_default()
        );
    }
    match &reference {
        Some(r) => {
            let ratio = figures
                .iter()
                .find(|f| f.name == format!("embed_{backend}_batch32"))
                .and_then(|f| f.ratio)
                .unwrap_or(f64::NAN);
            println!(
                "goal: CPU throughput at batch 32 >= 1x PyTorch on the same cores: {ratio:.2}x {}",
                if ratio >= 1.0 { "met" } else { "NOT met" }
            );
            println!(
                "reference: sentence-transformers on torch {} with {} threads; ours: {backend} backend with {threads} threads",
                r["torch"].as_str().unwrap_or("?"),
                r["threads"]
            );
        }
        None => println!(
            "goal: CPU throughput at batch 32 >= 1x PyTorch: not evaluated (no --python with sentence-transformers)"
        ),
    }
    println!(
        "{n} inputs, one call per batch; throughput: best of {rounds} rounds, the sides alternated; batch-1 latency: median of {latency_runs} single calls a round"
    );
    let path = merge_results(&o.out, &figures)?;
    println!("added to {}", path.display());
    Ok(())
}
