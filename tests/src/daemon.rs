//! A cloudletd started by a test: its configuration, process and log.

use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub fn cloudletd() -> Command {
    let bin = std::env::var_os("CLOUDLETD")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/cloudletd"));
    assert!(
        bin.exists(),
        "{} missing: build it with `cargo build -p cloudlet-user --bins` (cargo xtask test does)",
        bin.display()
    );
    Command::new(bin)
}

/// A cloudletd configuration for the tests: the admin socket and a self-signed front
/// door on a free loopback port, in the configuration's folder; `more` is appended
/// within `[front_door]` (or starts a section of its own).
pub fn daemon_config(more: &str) -> String {
    format!(
        "[admin]\nsocket = \"admin.sock\"\n\n\
         [front_door]\nlisten = \"127.0.0.1:0\"\nself_signed = true\n\
         cert = \"tls/cert.pem\"\nkey = \"tls/key.pem\"\n{more}"
    )
}

/// Stops the daemon on drop, even when the test fails.
pub struct Daemon(pub Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running cloudletd and its log.
pub struct Running {
    pub daemon: Daemon,
    /// The front door's address.
    pub addr: SocketAddr,
    /// The logged SPKI hash of its certificate.
    pub hash: String,
    pub lines: std::sync::mpsc::Receiver<String>,
    pub log: Vec<String>,
}

impl Running {
    /// Starts cloudletd with `config` and waits for its front door line.
    pub fn start(config: &Path) -> Self {
        let mut child = cloudletd()
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let daemon = Daemon(child);
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut log = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no front door line; log:\n{}", log.join("\n")));
            log.push(line.clone());
            if let Some(rest) = line.split_once("front door on ").map(|(_, r)| r) {
                let addr: SocketAddr = rest
                    .split(':')
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(":")
                    .parse()
                    .unwrap();
                let hash = rest.rsplit(' ').next().unwrap().to_string();
                return Self {
                    daemon,
                    addr,
                    hash,
                    lines,
                    log,
                };
            }
        }
    }

    /// Waits (10 s at most) for access-log lines starting with each of `protocols`;
    /// returns every access-log line seen.
    pub fn access_lines(&mut self, protocols: &[&str]) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut access: Vec<String> = Vec::new();
        while !protocols.iter().all(|p| {
            access.iter().any(|l| {
                l.split_once("cloudlet::access] ")
                    .is_some_and(|(_, rest)| rest.starts_with(p))
            })
        }) {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).unwrap_or_else(|_| {
                panic!(
                    "no access-log lines for {protocols:?}; log:\n{}",
                    self.log.join("\n")
                )
            });
            self.log.push(line.clone());
            if line.contains("cloudlet::access]") {
                access.push(line);
            }
        }
        access
    }
}

/// A folder under the system's temporary folder (named by `prefix`, `name`, the process and
/// the thread), emptied on creation and removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str, name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "cloudlet-{prefix}-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Which output of a process to watch.
#[derive(Clone, Copy)]
pub enum Output {
    Stdout,
    Stderr,
}

/// Starts `cmd` with `output` piped and waits (up to `limit`) for a line with `marker`;
/// returns the process (stopped on drop) and the rest of that line after the marker. The
/// output goes on being read (and dropped) so the process never blocks on it.
pub fn spawn_until(
    cmd: &mut Command,
    output: Output,
    marker: &str,
    limit: Duration,
) -> (Daemon, String) {
    match output {
        Output::Stdout => cmd.stdout(Stdio::piped()).stderr(Stdio::null()),
        Output::Stderr => cmd.stdout(Stdio::null()).stderr(Stdio::piped()),
    };
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let stream: Box<dyn std::io::Read + Send> = match output {
        Output::Stdout => Box::new(child.stdout.take().unwrap()),
        Output::Stderr => Box::new(child.stderr.take().unwrap()),
    };
    let daemon = Daemon(child);
    let (tx, rx) = std::sync::mpsc::channel();
    let marker_owned = marker.to_string();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if let Some((_, rest)) = line.split_once(marker_owned.as_str()) {
                let _ = tx.send(rest.to_string());
            }
        }
    });
    let rest = rx
        .recv_timeout(limit)
        .unwrap_or_else(|_| panic!("no {marker:?} from {cmd:?}"));
    (daemon, rest)
}
