//! The MCP guard in cloudletd, with the official MCP Python SDK on both sides: as the
//! agent's client (`tests/mcp/client.py`) and as the upstream servers
//! (`tests/mcp/upstream.py`: `files` over stdio, started by cloudletd; `web` over
//! Streamable HTTP, started here). Tokens are minted with PyJWT (`tests/mcp/mint.py`).
//! The SDK lives in `target/mcp-venv`, which `cargo xtask setup` creates.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use cloudlet_tests::daemon::{Daemon, Output, Running, TempDir, daemon_config, spawn_until};
use serde_json::{Value, json};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn python() -> PathBuf {
    let p = root().join("target/mcp-venv/bin/python");
    assert!(
        p.exists(),
        "{} missing: `cargo xtask setup` creates it",
        p.display()
    );
    p
}

/// Runs `tests/mcp/mint.py` with the arguments `args` adds; its standard output, trimmed.
fn mint(args: impl FnOnce(&mut Command) -> &mut Command) -> String {
    let mut cmd = Command::new(python());
    cmd.arg(script("mint.py"));
    let out = args(&mut cmd).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn script(name: &str) -> String {
    root().join("tests/mcp").join(name).display().to_string()
}

const ISSUER_A: &str = "https://a.example";
const ISSUER_B: &str = "https://b.example";
const AUDIENCE: &str = "cloudlet-mcp";

/// A guard in front of both upstreams, with keys to mint tokens.
struct Guard {
    dir: TempDir,
    running: Running,
    _web: Daemon,
    _keys: Daemon,
    config: PathBuf,
}

/// The policy part of the `[mcp]` section (replaced in the reload test).
const POLICY: &str = r#"
[mcp.roles.reader]
allow = ["files__read_file", "files__add", "files__fetch_note", "files__weather", "files__crash", "web__*"]
[mcp.roles.admin]
allow = ["*"]
[mcp.constraints."files__read_file"]
path = { type = "string", pattern = "^/srv/" }
[mcp.rate_per_tool]
"files__add" = "3/min"
"#;

impl Guard {
    fn start(name: &str, policy: &str) -> Self {
        Self::start_with(name, "", policy)
    }

    /// `front_door` is added to the `[front_door]` section.
    fn start_with(name: &str, front_door: &str, policy: &str) -> Self {
        let dir = TempDir::new("mcp", name);
        let d = &dir.0;
        for what in ["keys", "certs"] {
            mint(|c| c.arg(what).arg(d.join(what)));
        }
        // Issuer B publishes its keys over HTTP.
        let (keys, rest) = spawn_until(
            Command::new(python())
                .args([
                    "-u",
                    "-m",
                    "http.server",
                    "0",
                    "--bind",
                    "127.0.0.1",
                    "--directory",
                ])
                .arg(d.join("keys")),
            Output::Stdout,
            " port ",
            Duration::from_secs(30),
        );
        let keys_port: u16 = rest
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {rest:?}"));
        // The web upstream: Streamable HTTP on a port it picks.
        let (web, port) = spawn_until(
            Command::new(python())
                .args([&script("upstream.py"), "--profile", "web", "--http", "0"])
                .env("MCP_UPSTREAM_LOG", d.join("web-calls.jsonl")),
            Output::Stderr,
            "listening on ",
            Duration::from_secs(30),
        );
        let port = port.trim().to_string();
        let config = d.join("cloudletd.toml");
        std::fs::write(
            &config,
            daemon_config(&format!(
                r#"pq = "preferred"
{front_door}
[mcp]
pins = "pins.json"
audit = "audit.jsonl"
allowed_origins = ["https://agent.example"]
max_body = 65536

[[mcp.issuers]]
issuer = "{ISSUER_A}"
audience = "{AUDIENCE}"
jwks = "keys/a.jwks.json"

[[mcp.issuers]]
issuer = "{ISSUER_B}"
audience = "{AUDIENCE}"
jwks_url = "http://127.0.0.1:{keys_port}/b.jwks.json"

[[mcp.upstreams]]
name = "files"
command = ["{python}", "{upstream}", "--profile", "files", "--state", "{state}"]
env = {{ MCP_UPSTREAM_LOG = "{files_log}" }}

[[mcp.upstreams]]
name = "web"
url = "http://127.0.0.1:{port}/mcp"
{policy}"#,
                python = python().display(),
                upstream = script("upstream.py"),
                state = d.join("state").display(),
                files_log = d.join("files-calls.jsonl").display(),
            )),
        )
        .unwrap();
        let running = Running::start(&config);
        Self {
            dir,
            running,
            _web: web,
            _keys: keys,
            config,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.0.join(name)
    }

    fn url(&self) -> String {
        format!("https://localhost:{}/mcp", self.running.addr.port())
    }

    /// A token of issuer A (RS256) or B (EdDSA) for `sub` with `roles`.
    fn token(&self, issuer: char, sub: &str, roles: &str, extra: &[&str]) -> String {
        let (key, alg, kid, iss) = match issuer {
            'a' => ("a-rsa.pem", "RS256", "a-rsa", ISSUER_A),
            'e' => ("a-ec.pem", "ES256", "a-ec", ISSUER_A),
            'b' => ("b-ed.pem", "EdDSA", "b-ed", ISSUER_B),
            // Issuer A's name and key id, another key: a forgery.
            _ => ("c-rsa.pem", "RS256", "a-rsa", ISSUER_A),
        };
        mint(|c| {
            c.args(["token", "--key"])
                .arg(self.path("keys").join(key))
                .args(["--alg", alg, "--kid", kid, "--iss", iss, "--aud", AUDIENCE])
                .args(["--sub", sub, "--roles", roles])
                .args(extra)
        })
    }

    /// Runs `steps` in one SDK session; one JSON value per step (or the one line printed
    /// when the session could not open).
    fn session(&self, token: Option<&str>, mode: &str, steps: &[Value]) -> Vec<Value> {
        self.session_with(token, None, mode, steps)
    }

    /// [`session`](Self::session), presenting the client certificate `cert` (`agent` or
    /// `rogue`, from `mint.py certs`).
    fn session_with(
        &self,
        token: Option<&str>,
        cert: Option<&str>,
        mode: &str,
        steps: &[Value],
    ) -> Vec<Value> {
        let mut cmd = Command::new(python());
        cmd.args([&script("client.py"), "--url", &self.url(), "--mode", mode])
            .arg("--cafile")
            .arg(self.path("tls/cert.pem"));
        if let Some(c) = cert {
            let certs = self.path("certs");
            cmd.arg("--cert").arg(certs.join(format!("{c}.pem")));
            cmd.arg("--key").arg(certs.join(format!("{c}-key.pem")));
        }
        if let Some(t) = token {
            cmd.args(["--token", t]);
        }
        for s in steps {
            cmd.arg(s.to_string());
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
            .collect();
        assert!(
            !lines.is_empty(),
            "client printed nothing; stderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        lines
    }

    /// One hand-made request: (status, headers, body).
    fn raw(&self, token: Option<&str>, headers: &[&str], body: &str) -> (u16, Value, String) {
        let mut cmd = Command::new(python());
        cmd.args([&script("client.py"), "--raw", "--url", &self.url()])
            .arg("--cafile")
            .arg(self.path("tls/cert.pem"));
        if let Some(t) = token {
            cmd.args(["--token", t]);
        }
        for h in headers {
            cmd.args(["--header", h]);
        }
        let body_file = self.path(&format!("body-{}", body.len()));
        std::fs::write(&body_file, body).unwrap();
        cmd.arg("--body").arg(format!("@{}", body_file.display()));
        let out = cmd.output().unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
            panic!(
                "raw request printed {:?} {:?}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        assert!(v.get("connect_error").is_none(), "{v}");
        (
            v["status"].as_u64().unwrap() as u16,
            v["headers"].clone(),
            v["body"].as_str().unwrap_or("").to_string(),
        )
    }

    fn calls(&self, upstream: &str) -> Vec<Value> {
        std::fs::read_to_string(self.path(&format!("{upstream}-calls.jsonl")))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.path("audit.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// The example configuration parses, with both kinds of upstream.
#[test]
fn the_example_configuration_is_valid() {
    let config = cloudlet::config::Config::load(&root().join("examples/mcp-guard.toml")).unwrap();
    let mcp = config.mcp.expect("no [mcp]");
    assert_eq!(mcp.upstreams.len(), 2);
    assert!(matches!(
        mcp.upstreams[0].transport,
        cloudlet::mcp::upstream::Transport::Stdio { .. }
    ));
    assert!(matches!(
        mcp.upstreams[1].transport,
        cloudlet::mcp::upstream::Transport::Http { .. }
    ));
    assert!(mcp.policy.roles.roles.contains_key("agent"));
}

fn list() -> Value {
    json!({"list": true})
}

fn call(name: &str, arguments: Value) -> Value {
    json!({"call": name, "arguments": arguments})
}

fn names(listing: &Value) -> Vec<String> {
    listing["tools"]
        .as_array()
        .unwrap_or_else(|| panic!("not a listing: {listing}"))
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect()
}

/// The message of a step's MCP error.
fn message(step: &Value) -> &str {
    step["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("not an MCP error: {step}"))
}

fn error_code(step: &Value) -> i64 {
    step["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("not an MCP error: {step}"))
}

/// Lists and calls through the guard in both protocol eras: allowed calls reach the
/// upstreams; a denied tool, schema and constraint violations, an injected result and a
/// puppet-attack description are refused with their codes and never reach an upstream;
/// the audit log has a line for each.
#[test]
fn tools_are_listed_and_called_through_the_guard_in_both_eras() {
    let g = Guard::start("calls", POLICY);
    let alice = g.token('a', "alice", "reader", &[]);
    for mode in ["legacy", "modern"] {
        let out = g.session(
            Some(&alice),
            mode,
            &[
                list(),
                call("web__search", json!({"query": "edge", "limit": 2})),
                call("files__read_file", json!({"path": "/srv/notes.txt"})),
                call("files__delete_file", json!({"path": "/srv/notes.txt"})),
                call("files__read_file", json!({"path": "/etc/passwd"})),
                call("web__search", json!({"query": 7})),
                call("files__fetch_note", json!({"id": 1})),
                call("files__fetch_note", json!({"id": 2})),
                call("web__summarize", json!({"text": "hello"})),
                call("nope__tool", json!({})),
            ],
        );
        assert_eq!(out.len(), 10, "{mode}: {out:?}");
        let listed = names(&out[0]);
        for expected in [
            "files__read_file",
            "files__add",
            "web__search",
            "web__post_message",
        ] {
            assert!(listed.contains(&expected.to_string()), "{mode}: {listed:?}");
        }
        // Not allowed for the role, and a puppet attack: held back from the listing.
        assert!(
            !listed.contains(&"files__delete_file".to_string()),
            "{listed:?}"
        );
        assert!(
            !listed.contains(&"web__summarize".to_string()),
            "{listed:?}"
        );
        assert_eq!(out[1]["text"], "results for edge", "{mode}: {}", out[1]);
        assert_eq!(out[2]["text"], "contents of /srv/notes.txt", "{}", out[2]);
        assert_eq!(error_code(&out[3]), -32003, "{}", out[3]);
        assert_eq!(error_code(&out[4]), -32602, "{}", out[4]);
        assert!(
            message(&out[4]).contains("operator constraint"),
            "{}",
            out[4]
        );
        assert_eq!(error_code(&out[5]), -32602, "{}", out[5]);
        assert!(message(&out[5]).contains("/query"), "{}", out[5]);
        assert_eq!(out[6]["isError"], false, "{}", out[6]);
        assert_eq!(error_code(&out[7]), -32004, "{}", out[7]);
        let why = message(&out[7]);
        assert!(
            why.contains("instruction override") && why.contains("HTML comment"),
            "{why}"
        );
        assert!(
            why.contains("web__post_message"),
            "puppet finding missing: {why}"
        );
        assert_eq!(error_code(&out[8]), -32004, "{}", out[8]);
        assert!(
            message(&out[8]).contains("files__delete_file"),
            "{}",
            out[8]
        );
        assert_eq!(error_code(&out[9]), -32602, "{}", out[9]);
    }
    // Refused calls never reached an upstream; allowed ones did, once per era.
    let files = g.calls("files");
    let web = g.calls("web");
    assert!(
        files.iter().all(|c| c["tool"] != "delete_file"),
        "{files:?}"
    );
    assert!(web.iter().all(|c| c["tool"] != "summarize"), "{web:?}");
    assert_eq!(
        web.iter().filter(|c| c["tool"] == "search").count(),
        2,
        "{web:?}"
    );
    assert_eq!(
        files.iter().filter(|c| c["tool"] == "read_file").count(),
        2,
        "{files:?}"
    );
    // The upstream ran fetch_note(2): the guard blocked its result, not the call.
    assert_eq!(
        files.iter().filter(|c| c["tool"] == "fetch_note").count(),
        4,
        "{files:?}"
    );
    let audit = g.audit();
    let denied = audit
        .iter()
        .find(|e| e["tool"] == "files__delete_file")
        .expect("no audit entry for the denied call");
    assert_eq!(denied["decision"], "denied");
    assert_eq!(denied["identity"], format!("{ISSUER_A}#alice"));
    assert_eq!(denied["upstream"], "files");
    assert_eq!(denied["arguments_sha256"].as_str().unwrap().len(), 64);
    assert!(
        denied["reason"].as_str().unwrap().contains("not allowed"),
        "{denied}"
    );
    let allowed = audit
        .iter()
        .filter(|e| e["tool"] == "web__search" && e["decision"] == "allowed")
        .count();
    assert_eq!(allowed, 2, "{audit:?}");
}

/// Tokens: none, expired, forged (another key under the issuer's key id), from an issuer
/// not configured: 401 with `WWW-Authenticate`; good tokens of both issuers and all three
/// algorithms pass.
#[test]
fn bad_tokens_get_401_and_good_ones_of_every_issuer_pass() {
    let g = Guard::start("tokens", POLICY);
    let none = g.session(None, "legacy", &[list()]);
    assert_eq!(none[0]["http_error"], 401, "{none:?}");
    assert!(
        none[0]["www_authenticate"]
            .as_str()
            .unwrap()
            .starts_with("Bearer "),
        "{none:?}"
    );
    for (token, expect) in [
        (
            g.token('a', "alice", "reader", &["--exp-in", "-120"]),
            "expired",
        ),
        (g.token('c', "mallory", "admin", &[]), "signature"),
        (
            g.token('b', "bob", "reader", &["--aud", "other"]),
            "audience",
        ),
    ] {
        let out = g.session(Some(&token), "legacy", &[list()]);
        assert_eq!(out[0]["http_error"], 401, "{expect}: {out:?}");
        let header = out[0]["www_authenticate"].as_str().unwrap();
        assert!(header.contains("error=\"invalid_token\""), "{header}");
        assert!(header.to_lowercase().contains(expect), "{expect}: {header}");
    }
    // Each in another mode: auto probes `server/discover` first.
    for (issuer, mode) in [('a', "legacy"), ('e', "auto"), ('b', "modern")] {
        let token = g.token(issuer, "carol", "reader", &[]);
        let out = g.session(
            Some(&token),
            mode,
            &[call("web__search", json!({"query": "q"}))],
        );
        assert_eq!(out[0]["text"], "results for q", "{issuer}: {out:?}");
    }
    let audit = g.audit();
    assert!(
        audit
            .iter()
            .any(|e| e["identity"] == format!("{ISSUER_B}#carol")),
        "{audit:?}"
    );
    // Refused credentials are audited, with the reason.
    assert!(
        audit
            .iter()
            .any(|e| e["decision"] == "denied"
                && e["reason"].as_str().unwrap_or("").contains("expired")),
        "{audit:?}"
    );
}

/// The transport's error answers, with requests no SDK would send.
#[test]
fn protocol_errors_get_their_status_and_codes() {
    let g = Guard::start("protocol", POLICY);
    let token = g.token('a', "alice", "reader", &[]);
    let t = Some(token.as_str());
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"raw","version":"1"}}}"#;
    let (status, headers, body) = g.raw(t, &[], init);
    assert_eq!(status, 200, "{body}");
    let session = headers["mcp-session-id"].as_str().unwrap().to_string();
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["result"]["protocolVersion"], "2025-06-18");
    let with_session = format!("Mcp-Session-Id: {session}");
    let list = r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#;
    let cases: Vec<(Vec<&str>, String, u16, Option<i64>)> = vec![
        (vec!["Origin: https://evil.example"], init.to_string(), 403, None),
        (vec![], "{not json".to_string(), 400, Some(-32700)),
        (vec![], format!("[{init}]"), 400, Some(-32600)),
        (vec![], r#"{"jsonrpc":"1.0","id":1,"method":"ping"}"#.into(), 400, Some(-32600)),
        (vec![], list.to_string(), 400, Some(-32600)),
        (vec!["Mcp-Session-Id: 0123"], list.to_string(), 404, Some(-32600)),
        (
            vec![&with_session, "MCP-Protocol-Version: 1999-01-01"],
            list.to_string(),
            400,
            Some(-32600),
        ),
        // A dispatched request's error rides a 200 in the session revisions, and the
        // stateless revision's status table applies to its requests.
        (vec![&with_session], r#"{"jsonrpc":"2.0","id":3,"method":"no/such"}"#.into(), 200, Some(-32601)),
        (
            vec!["MCP-Protocol-Version: 2026-07-28", "Mcp-Method: no/such"],
            r#"{"jsonrpc":"2.0","id":6,"method":"no/such","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}"#.into(),
            404,
            Some(-32601),
        ),
        (vec![], format!("{{\"pad\":\"{}\"}}", "x".repeat(70_000)), 413, None),
        // The stateless revision: headers must agree with the body.
        (
            vec!["MCP-Protocol-Version: 2026-07-28", "Mcp-Method: tools/list"],
            r#"{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"web__search","arguments":{"query":"q"},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}"#.into(),
            400,
            Some(-32020),
        ),
        (
            vec!["MCP-Protocol-Version: 2027-01-01", "Mcp-Method: tools/list"],
            r#"{"jsonrpc":"2.0","id":5,"method":"tools/list","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2027-01-01","io.modelcontextprotocol/clientCapabilities":{}}}}"#.into(),
            400,
            Some(-32022),
        ),
    ];
    for (headers, body, status, code) in &cases {
        let (got, _, text) = g.raw(t, headers, body);
        assert_eq!(
            got,
            *status,
            "{headers:?} {}: {text}",
            &body[..body.len().min(80)]
        );
        if let Some(code) = code {
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["error"]["code"], *code, "{text}");
        }
    }
    // The session still works, and ends with DELETE.
    let (status, _, body) = g.raw(t, &[&with_session], list);
    assert_eq!(status, 200, "{body}");
    let (status, _, _) = g.raw(t, &[&with_session, "X-Method: x"], list);
    assert_eq!(status, 200);
    let mut del = Command::new(python());
    del.args([
        &script("client.py"),
        "--raw",
        "--url",
        &g.url(),
        "--method",
        "DELETE",
    ])
    .arg("--cafile")
    .arg(g.path("tls/cert.pem"))
    .args(["--token", &token, "--header", &with_session]);
    let out: Value = serde_json::from_slice(&del.output().unwrap().stdout).unwrap();
    assert_eq!(out["status"], 204, "{out}");
    let (status, _, _) = g.raw(t, &[&with_session], list);
    assert_eq!(status, 404);
}

/// A rug pull between sessions is held back until approved; an upstream that crashes
/// fails its call, is restarted, and the other upstream keeps working meanwhile.
#[test]
fn rug_pulls_wait_for_approval_and_crashed_upstreams_come_back() {
    let g = Guard::start("rugpull", POLICY);
    let alice = g.token('a', "alice", "reader", &[]);
    let first = g.session(Some(&alice), "legacy", &[list()]);
    assert!(names(&first[0]).contains(&"files__weather".to_string()));
    // The upstream turns evil on its next start; make it crash.
    std::fs::write(g.path("state"), "evil").unwrap();
    let out = g.session(
        Some(&alice),
        "legacy",
        &[
            call("files__crash", json!({})),
            call("web__search", json!({"query": "still here"})),
        ],
    );
    assert_eq!(error_code(&out[0]), -32006, "{out:?}");
    assert_eq!(out[1]["text"], "results for still here", "{out:?}");
    // Back after its backoff, with the changed description. While it is down its calls
    // fail as unavailable (-32006); the first call after it is back lists it again and is
    // held (-32004), never forwarded.
    let deadline = Instant::now() + Duration::from_secs(30);
    let listed = loop {
        let out = g.session(
            Some(&alice),
            "modern",
            &[call("files__weather", json!({"city": "Oslo"})), list()],
        );
        match out[0]["error"]["code"].as_i64() {
            Some(-32004) => break out,
            Some(-32006) => {}
            Some(_) => panic!("neither held nor unavailable: {out:?}"),
            None => panic!("the changed tool was called on the restarted upstream: {out:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "files upstream not back: {out:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(message(&listed[0]).contains("changed since it was approved"));
    let after = names(&listed[1]);
    assert!(
        after.contains(&"files__read_file".to_string())
            && !after.contains(&"files__weather".to_string()),
        "{listed:?}"
    );
    assert!(g.calls("files").iter().all(|c| c["tool"] != "weather"));
    // The operator reads and approves it.
    let cloudlet = root().join("target/debug/cloudlet");
    let pins = Command::new(&cloudlet)
        .args(["mcp", "pins", "--config"])
        .arg(&g.config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&pins.stdout);
    assert!(
        text.contains("files__weather") && text.contains("PENDING") && text.contains("id_rsa"),
        "{text}"
    );
    let approve = Command::new(&cloudlet)
        .args(["mcp", "approve", "--config"])
        .arg(&g.config)
        .arg("files__weather")
        .output()
        .unwrap();
    assert!(
        approve.status.success(),
        "{}",
        String::from_utf8_lossy(&approve.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&approve.stdout).trim(),
        "approved files__weather"
    );
    let after = g.session(Some(&alice), "legacy", &[list()]);
    assert!(
        names(&after[0]).contains(&"files__weather".to_string()),
        "{after:?}"
    );
}

/// Rate limits answer -32005 past the rate; a reload (SIGHUP) changes the roles without
/// dropping the session, and a broken configuration leaves the running policy.
#[test]
fn rate_limits_and_reloads_keep_sessions() {
    let mut g = Guard::start("reload", POLICY);
    let alice = g.token('a', "alice", "reader", &[]);
    let add = |a: i64| call("files__add", json!({"a": a, "b": 1}));
    let out = g.session(Some(&alice), "legacy", &[add(1), add(2), add(3), add(4)]);
    assert_eq!(out[2]["text"], "4", "{out:?}");
    assert_eq!(error_code(&out[3]), -32005, "{out:?}");
    assert!(out[3]["error"]["data"]["retry_after_ms"].as_u64().unwrap() > 0);
    // A raw session, kept across the reloads.
    let t = Some(alice.as_str());
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"raw","version":"1"}}}"#;
    let (_, headers, _) = g.raw(t, &[], init);
    let session = format!(
        "Mcp-Session-Id: {}",
        headers["mcp-session-id"].as_str().unwrap()
    );
    let delete = r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"files__delete_file","arguments":{"path":"/srv/x"}}}"#;
    let code_of =
        |body: &str| serde_json::from_str::<Value>(body).unwrap()["error"]["code"].clone();
    assert_eq!(code_of(&g.raw(t, &[&session], delete).2), -32003);
    let text = std::fs::read_to_string(&g.config).unwrap();
    let hup = |g: &mut Guard, wait_for: &str| {
        let pid = g.running.daemon.0.id() as i32;
        // SAFETY: signalling the child this test started.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = g.running.lines.recv_timeout(left).unwrap_or_else(|_| {
                panic!(
                    "no {wait_for:?} after SIGHUP; log:\n{}",
                    g.running.log.join("\n")
                )
            });
            g.running.log.push(line.clone());
            if line.contains(wait_for) {
                return;
            }
        }
    };
    // A broken constraint: refused, the running policy stays.
    std::fs::write(
        &g.config,
        format!("{text}\n[mcp.constraints.x]\ny = {{ type = 5 }}\n"),
    )
    .unwrap();
    hup(&mut g, "the running MCP policy stays");
    assert_eq!(code_of(&g.raw(t, &[&session], delete).2), -32003);
    // Readers may now delete: the same session's call goes through.
    std::fs::write(
        &g.config,
        text.replace(
            "\"files__crash\",",
            "\"files__crash\", \"files__delete_file\",",
        ),
    )
    .unwrap();
    hup(&mut g, "MCP policy reloaded");
    let (status, _, body) = g.raw(t, &[&session], delete);
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["result"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("deleted /srv/x"),
        "{body}"
    );
}

/// Client certificates as identities: a certificate from the configured CA names the
/// caller (its roles from `cert_roles`); one from another CA fails the handshake; without a
/// certificate or token the answer is 401; a token, when sent, is the identity.
#[test]
fn client_certificates_name_callers() {
    let g = Guard::start_with(
        "certs",
        "client_ca = \"certs/ca.pem\"\n",
        &format!("{POLICY}\n[mcp.cert_roles]\n\"*.agents.example\" = [\"reader\"]\n"),
    );
    let out = g.session_with(
        None,
        Some("agent"),
        "legacy",
        &[list(), call("web__search", json!({"query": "by cert"}))],
    );
    assert!(
        names(&out[0]).contains(&"web__search".to_string()),
        "{out:?}"
    );
    assert_eq!(out[1]["text"], "results for by cert", "{out:?}");
    let rogue = g.session_with(None, Some("rogue"), "legacy", &[list()]);
    assert!(rogue[0].get("connect_error").is_some(), "{rogue:?}");
    let none = g.session(None, "legacy", &[list()]);
    assert_eq!(none[0]["http_error"], 401, "{none:?}");
    let alice = g.token('a', "alice", "admin", &[]);
    let both = g.session_with(
        Some(&alice),
        Some("agent"),
        "legacy",
        &[call("files__delete_file", json!({"path": "/srv/x"}))],
    );
    assert_eq!(both[0]["text"], "deleted /srv/x", "{both:?}");
    let audit = g.audit();
    let by_cert = audit
        .iter()
        .find(|e| e["tool"] == "web__search")
        .expect("no audit entry");
    assert_eq!(by_cert["identity"], "cert:agent-1.agents.example");
    let by_token = audit
        .iter()
        .find(|e| e["tool"] == "files__delete_file")
        .expect("no audit entry");
    assert_eq!(by_token["identity"], format!("{ISSUER_A}#alice"));
}
