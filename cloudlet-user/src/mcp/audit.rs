//! The guard's audit log: one JSON line per request (identity, upstream, tool, a digest of
//! the arguments, the decision and its reason, latency).
//!
//! [`AuditLog::append`] hands lines to the kernel with one `write`: from then on a crash of
//! the process cannot lose them. [`AuditLog::sync`] waits until they are on disk, and
//! [`AuditLog::record_all`] does both, so a crash of the machine cannot lose them either (the
//! guard's `audit_sync` picks which an answer waits for). When the file passes `max_bytes`
//! it is rotated: `audit.log` becomes `audit.log.1`, `.1` becomes `.2`, and so on up to
//! `keep` files.

use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::Value;
use sha2::{Digest as _, Sha256};

/// What was decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Allowed,
    Denied,
    Flagged,
}

/// One request.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Entry {
    /// Unix time, milliseconds.
    pub time_ms: u64,
    /// The caller (token subject, certificate name), or `anonymous`.
    pub identity: String,
    /// The JSON-RPC method (`tools/call`, `tools/list`...).
    pub method: String,
    pub upstream: Option<String>,
    pub tool: Option<String>,
    /// SHA-256 (hex) of the arguments' JSON: which call it was, without its data.
    pub arguments_sha256: Option<String>,
    pub decision: Decision,
    pub reason: String,
    pub latency_ms: f64,
}

impl Entry {
    /// An entry stamped now.
    pub fn now(identity: &str, method: &str, decision: Decision, reason: &str) -> Self {
        Self {
            time_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or(Duration::ZERO)
                .as_millis() as u64,
            identity: identity.to_string(),
            method: method.to_string(),
            upstream: None,
            tool: None,
            arguments_sha256: None,
            decision,
            reason: reason.to_string(),
            latency_ms: 0.0,
        }
    }
}

/// SHA-256 (hex) of a JSON value as serialised.
pub fn digest(arguments: &Value) -> String {
    // The hasher is a writer that never fails, so the serialisation cannot fail.
    let mut h = Sha256::new();
    let _ = serde_json::to_writer(&mut h, arguments);
    crate::frame::to_hex(&h.finalize())
}

/// The log file and its rotation.
pub struct AuditLog {
    path: PathBuf,
    file: File,
    size: u64,
    max_bytes: u64,
    keep: usize,
}

impl AuditLog {
    /// Opens (appends to) `path`, rotating past `max_bytes` and keeping `keep` old files.
    pub fn open(path: &Path, max_bytes: u64, keep: usize) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path: path.to_path_buf(),
            file,
            size,
            max_bytes,
            keep,
        })
    }

    /// Appends `entries` and waits until they are on disk (one sync for all of them).
    pub fn record_all(&mut self, entries: &[&Entry]) -> std::io::Result<()> {
        self.append(entries)?;
        self.sync()
    }

    /// Hands `entries` to the kernel (one `write`, rotating first when the file would pass
    /// its limit): from then on a crash of this process cannot lose them, a crash of the
    /// machine can until [`sync`](Self::sync).
    pub fn append(&mut self, entries: &[&Entry]) -> std::io::Result<()> {
        let mut lines = Vec::new();
        for entry in entries {
            let mut line = serde_json::to_vec(entry).map_err(std::io::Error::other)?;
            line.push(b'\n');
            let pending = self.size + lines.len() as u64;
            if pending > 0 && pending + line.len() as u64 > self.max_bytes {
                self.file.write_all(&lines)?;
                self.file.sync_data()?;
                lines.clear();
                self.rotate()?;
            }
            lines.extend_from_slice(&line);
        }
        self.file.write_all(&lines)?;
        self.size += lines.len() as u64;
        Ok(())
    }

    /// Another descriptor of the current file (to flush it from another thread).
    pub fn file_clone(&self) -> std::io::Result<File> {
        self.file.try_clone()
    }

    /// Waits until everything appended is on disk (`fdatasync`).
    pub fn sync(&mut self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let numbered = |n: usize| {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{n}"));
            PathBuf::from(p)
        };
        if self.keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            let _ = std::fs::remove_file(numbered(self.keep));
            for n in (1..self.keep).rev() {
                let from = numbered(n);
                if from.exists() {
                    std::fs::rename(&from, numbered(n + 1))?;
                }
            }
            std::fs::rename(&self.path, numbered(1))?;
        }
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        // The renames, on disk before the next entry is acknowledged.
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        self.size = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_json_lines_and_rotate() {
        let dir = std::env::temp_dir().join(format!("cloudlet-audit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("audit.log");
        let mut log = AuditLog::open(&path, 600, 2).unwrap();
        for i in 0..12 {
            let mut e = Entry::now(
                "alice",
                "tools/call",
                Decision::Allowed,
                "allowed by role dev",
            );
            e.upstream = Some("files".into());
            e.tool = Some(format!("read_{i}"));
            e.arguments_sha256 = Some(digest(&serde_json::json!({"path": "/tmp/x"})));
            e.latency_ms = 1.5;
            log.record_all(&[&e]).unwrap();
        }
        drop(log);
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        let current = read(&path);
        let (one, two) = (
            read(&dir.join("audit.log.1")),
            read(&dir.join("audit.log.2")),
        );
        assert!(!dir.join("audit.log.3").exists(), "keeps two old files");
        for text in [&current, &one, &two] {
            assert!(
                !text.is_empty() && text.len() <= 600,
                "{} bytes",
                text.len()
            );
            for line in text.lines() {
                let v: Value = serde_json::from_str(line).unwrap();
                assert_eq!(v["identity"], "alice");
                assert_eq!(v["decision"], "allowed");
                assert_eq!(v["arguments_sha256"].as_str().unwrap().len(), 64);
            }
        }
        // The newest entries are in the current file, in order, none lost among the kept.
        let tools: Vec<String> = [&two, &one, &current]
            .iter()
            .flat_map(|t| t.lines())
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["tool"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        let last = tools.last().unwrap();
        assert_eq!(last, "read_11");
        let first: usize = tools[0].trim_start_matches("read_").parse().unwrap();
        let expected: Vec<String> = (first..12).map(|i| format!("read_{i}")).collect();
        assert_eq!(tools, expected);
        // Reopening appends.
        let mut log = AuditLog::open(&path, 600, 2).unwrap();
        log.record_all(&[&Entry::now(
            "bob",
            "tools/list",
            Decision::Denied,
            "no role",
        )])
        .unwrap();
        assert!(read(&path).ends_with("\"reason\":\"no role\",\"latency_ms\":0.0}\n"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn digests_name_the_arguments_without_them() {
        let a = digest(&serde_json::json!({"to": "a@example.org"}));
        assert_eq!(a.len(), 64);
        assert!(!a.contains("example"));
        assert_ne!(a, digest(&serde_json::json!({"to": "b@example.org"})));
        // The SHA-256 of the arguments' compact JSON, in lower-case hex.
        let args = serde_json::json!({"b": [1, 2.5, null], "a": "é\"x\""});
        let text = args.to_string();
        let expected: String = Sha256::digest(text.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(digest(&args), expected);
    }
}
