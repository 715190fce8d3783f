//! The `cloudlet` command line end to end: `policy check`, `classify` on hex lines and on a
//! pcap file, `geo lookup`.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use cloudlet::frame::{Frame, to_hex, write_pcap};
use cloudlet_tests::progtest::GEOIP_DATABASE;

fn cloudlet() -> Command {
    let bin = std::env::var_os("CLOUDLET")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/cloudlet"));
    assert!(
        bin.exists(),
        "{} missing: build it with `cargo build -p cloudlet-user --bins` (cargo xtask test does)",
        bin.display()
    );
    Command::new(bin)
}

fn run(cmd: &mut Command, stdin: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cloudlet");
    // A command that fails before reading (a missing model, say) closes its input: the
    // write then meets a closed pipe, and the exit status and stderr tell the rest.
    match child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
    {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        r => r.expect("write stdin"),
    }
    child.wait_with_output().expect("wait")
}

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn workdir(name: &str) -> Dir {
    let d = std::env::temp_dir().join(format!("cloudlet-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    Dir(d)
}

const POLICY: &str = r#"
default = "pass"
malformed = "drop"
[zones.eu]
countries = ["DE"]
[zones.lab]
prefixes = ["10.10.0.0/16"]
[[rules]]
name = "lab-only-from-eu"
src_zone = "!eu"
dst_zone = "lab"
action = "drop"
"#;

fn write_policy(dir: &Path) -> PathBuf {
    let p = dir.join("policy.toml");
    std::fs::write(
        &p,
        format!("{POLICY}[geoip]\ndatabase = {GEOIP_DATABASE:?}\n"),
    )
    .unwrap();
    p
}

fn frames() -> Vec<Vec<u8>> {
    [
        ("85.214.0.1", "10.10.0.5"),
        ("8.8.8.8", "10.10.0.5"),
        ("8.8.8.8", "10.20.0.5"),
    ]
    .iter()
    .map(|(src, dst)| Frame::udp(src.parse().unwrap(), dst.parse().unwrap(), 1000, 53).build())
    .collect()
}

fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

#[test]
fn policy_check_accepts_good_and_locates_bad() {
    let dir = workdir("check");
    let good = write_policy(&dir.0);
    let out = run(cloudlet().args(["policy", "check"]).arg(&good), "");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(": ok: 1 rules, 2 zones"));

    let bad = dir.0.join("bad.toml");
    std::fs::write(
        &bad,
        "[[rules]]\nsrc_zone = \"nowhere\"\naction = \"drop\"\n",
    )
    .unwrap();
    let out = run(cloudlet().args(["policy", "check"]).arg(&bad), "");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with(&format!("{}:2:12: unknown zone \"nowhere\"", bad.display())),
        "{err}"
    );
}

#[test]
fn classify_reads_hex_lines_and_pcap() {
    let dir = workdir("classify");
    let policy = write_policy(&dir.0);
    let frames = frames();
    let mut input = String::from("# comment lines and blank lines are skipped\n\n");
    for f in &frames {
        input.push_str(&to_hex(f));
        input.push('\n');
    }
    input.push_str("zz\n");
    let out = run(
        cloudlet().args(["classify", "--policy"]).arg(&policy),
        &input,
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "a bad line makes the exit status 2: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json_lines(&out);
    assert_eq!(v.len(), 4);
    assert_eq!(v[0]["verdict"], "pass");
    assert_eq!(v[0]["src_zone"], "eu");
    assert_eq!(v[0]["dst_zone"], "lab");
    assert_eq!(v[0]["rule"], serde_json::Value::Null);
    assert_eq!(v[0]["reason"], "default");
    assert_eq!(v[1]["verdict"], "drop");
    assert_eq!(v[1]["rule"], "lab-only-from-eu");
    assert_eq!(v[1]["xdp"], "XDP_DROP");
    assert_eq!(v[2]["verdict"], "pass");
    assert_eq!(v[3]["line"], 6);
    assert!(
        v[3]["error"].as_str().unwrap().contains("not hex"),
        "{}",
        v[3]
    );

    let pcap = dir.0.join("frames.pcap");
    let mut with_short = frames.clone();
    with_short.push(frames[0][..20].to_vec());
    std::fs::write(&pcap, write_pcap(&with_short)).unwrap();
    let out = run(
        cloudlet()
            .args(["classify", "--policy"])
            .arg(&policy)
            .arg("--pcap")
            .arg(&pcap),
        "",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p = json_lines(&out);
    assert_eq!(
        &p[..3],
        &v[..3],
        "pcap and hex input give the same verdicts"
    );
    assert_eq!(p[3]["reason"], "malformed_ipv4");
    assert_eq!(p[3]["verdict"], "drop");
}

#[test]
fn geo_lookup_prints_country_and_zones() {
    let dir = workdir("geo");
    let policy = write_policy(&dir.0);
    let out = run(
        cloudlet()
            .args(["geo", "lookup", "85.214.0.1", "--policy"])
            .arg(&policy),
        "",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = &json_lines(&out)[0];
    assert_eq!(v["country"], "DE");
    assert_eq!(v["zone"], "eu");
    let out = run(
        cloudlet().args([
            "geo",
            "lookup",
            "2001:4860:4860::8888",
            "--database",
            GEOIP_DATABASE,
        ]),
        "",
    );
    let v = &json_lines(&out)[0];
    assert_eq!(v["country"], "US");
    assert!(v.get("zone").is_none());
}

#[test]
fn embed_prints_one_vector_a_line_and_names_cut_lines() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("tests/fixtures/minilm-golden.json")).expect("fixtures"),
    )
    .expect("JSON");
    let cases = golden["cases"].as_array().expect("cases");
    // Two short inputs and one past 256 tokens.
    let picked: Vec<&serde_json::Value> = [0, 4]
        .into_iter()
        .map(|i| &cases[i])
        .chain(
            cases
                .iter()
                .find(|c| c["tokens_untruncated"].as_u64() > Some(256)),
        )
        .collect();
    assert_eq!(picked.len(), 3);
    let input: String = picked
        .iter()
        .map(|c| format!("{}\n", c["text"].as_str().expect("text")))
        .collect();
    let model = root.join(cloudlet::compute::DEFAULT_MODEL_DIR);
    let out = run(
        cloudlet()
            .args(["embed", "--batch", "2", "--model"])
            .arg(&model),
        &input,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    for (line, case) in lines.iter().zip(&picked) {
        let got: Vec<f32> = serde_json::from_str(line).expect("a JSON array");
        let want: Vec<f32> = case["embedding"]
            .as_array()
            .expect("embedding")
            .iter()
            .map(|x| x.as_f64().expect("number") as f32)
            .collect();
        assert_eq!(got.len(), 384);
        let sim = cloudlet::compute::cosine(&got, &want);
        assert!(sim >= 0.9999, "cosine {sim}");
    }
    assert!(
        stderr.contains("line 3: longer than 256 tokens"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("line 1:") && !stderr.contains("line 2:"),
        "{stderr}"
    );
    // A missing model is a clear error, given before any input is read: more input than a
    // pipe holds meets a closed pipe every time.
    let out = run(
        cloudlet().args(["embed", "--model", "/nonexistent"]),
        &"x\n".repeat(100_000),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent"));
}
