//! Tool-definition pins: for each tool (by the name clients see), the SHA-256 of its
//! definition as an operator approved it (see [`super::threats::pin`]). A definition that
//! differs from its pin is held back from clients and its calls refused until an operator
//! approves the new one with `cloudlet mcp approve`: a "rug pull", a server that changes
//! what a tool says it does after it was trusted, cannot take effect silently.
//!
//! The store is one JSON file shared by cloudletd (which records what it sees) and
//! `cloudlet mcp approve` (which moves a pending definition to approved). Every change is a
//! read-modify-write under an exclusive `flock` of `FILE.lock`, written to a temporary
//! file, synced and renamed over the old one, so a crash leaves either version whole.
//! cloudletd re-reads the file when its modification time or size changes, looking only
//! after inotify reported an event naming it (on every request where inotify cannot watch
//! its folder).

use std::{
    collections::BTreeMap,
    fs::{File, OpenOptions},
    io::Write as _,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::SystemTime,
};

/// One tool's record.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinEntry {
    /// SHA-256 (hex) of the approved definition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved: Option<String>,
    /// SHA-256 of a definition seen since that differs from `approved`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<String>,
    /// The pending definition's description, for the operator to read before approving.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_description: Option<String>,
    /// Unix time (ms) the pending definition was first seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_since_ms: Option<u64>,
}

/// The whole file.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinFile {
    pub tools: BTreeMap<String, PinEntry>,
}

/// Whether new tools are trusted as first seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PinMode {
    /// A tool seen for the first time is pinned as it is; later changes need approval.
    #[default]
    TrustFirst,
    /// Every tool needs an operator's approval before it is shown or called.
    Approve,
}

/// Where a definition stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinState {
    /// Matches its approved pin.
    Approved,
    /// Not approved: never seen under `approve` mode, or changed since its approval.
    Pending { approved: Option<String> },
}

/// Errors reading or writing the store.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a pin file: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("no pending definition for {0}")]
    NothingPending(String),
}

/// The store as cloudletd keeps it: the file's contents and the stamp they were read at.
pub struct PinStore {
    path: PathBuf,
    mode: PinMode,
    file: PinFile,
    stamp: Option<(SystemTime, u64)>,
    /// The folder's watch; `None` without one.
    watch: Option<Arc<Watch>>,
}

/// What the inotify task tells [`PinStore::refresh`].
struct Watch {
    /// An event named the file (or the folder went away) since the last look.
    changed: AtomicBool,
    /// The watch ended (the folder was removed or moved, or inotify failed): look every time.
    lost: AtomicBool,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PinError + '_ {
    move |source| PinError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// An exclusive lock on `PATH.lock`, held until dropped.
struct Lock(File);

impl Lock {
    fn take(path: &Path) -> Result<Self, PinError> {
        let mut name = path.as_os_str().to_owned();
        name.push(".lock");
        let lock_path = PathBuf::from(name);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io(&lock_path)(std::io::Error::last_os_error()));
        }
        Ok(Self(file))
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // SAFETY: as in `take`; closing the file would release it too.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// Reads the file (an absent file is an empty store).
pub fn read(path: &Path) -> Result<PinFile, PinError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| PinError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(PinFile::default()),
        Err(e) => Err(io(path)(e)),
    }
}

fn write(path: &Path, file: &PinFile) -> Result<(), PinError> {
    let mut text = serde_json::to_vec_pretty(file).map_err(|e| PinError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    text.push(b'\n');
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(&text).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    if let Some(dir) = path.parent()
        && let Ok(d) = File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Applies `change` to the file under its lock.
pub fn update<T>(
    path: &Path,
    change: impl FnOnce(&mut PinFile) -> Result<T, PinError>,
) -> Result<(T, PinFile), PinError> {
    let _lock = Lock::take(path)?;
    let mut file = read(path)?;
    let before = file.clone();
    let out = change(&mut file)?;
    if file != before {
        write(path, &file)?;
    }
    Ok((out, file))
}

/// Approves the pending definitions of `tools` (all pending ones when empty). Returns the
/// names approved.
pub fn approve(path: &Path, tools: &[String]) -> Result<Vec<String>, PinError> {
    update(path, |file| {
        let mut done = Vec::new();
        for name in tools {
            if file.tools.get(name).is_none_or(|e| e.pending.is_none()) {
                return Err(PinError::NothingPending(name.clone()));
            }
        }
        for (name, entry) in &mut file.tools {
            if (tools.is_empty() || tools.contains(name))
                && let Some(p) = entry.pending.take()
            {
                entry.approved = Some(p);
                entry.pending_description = None;
                entry.pending_since_ms = None;
                done.push(name.clone());
            }
        }
        Ok(done)
    })
    .map(|(done, _)| done)
}

impl PinStore {
    /// The store at `path` (read now; an absent file is empty).
    pub fn open(path: &Path, mode: PinMode) -> Result<Self, PinError> {
        let file = read(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            mode,
            file,
            stamp: stamp(path),
            watch: None,
        })
    }

    /// Watches the store's folder with inotify from a task on the current tokio runtime,
    /// so that [`refresh`](Self::refresh) looks at the file only after an event names it
    /// (closed after writing, renamed onto, removed) or the folder itself went away. Other
    /// files of the folder, such as an audit log written on every call, wake nothing.
    /// Without a watch (this failed, or was never called) it looks every time.
    pub fn watch(&mut self) -> std::io::Result<()> {
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&dir)?;
        let name = self
            .path
            .file_name()
            .map(|n| n.as_encoded_bytes().to_vec())
            .unwrap_or_default();
        // SAFETY: plain syscall; the descriptor is owned right after.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let c_dir = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        // Not IN_MODIFY: a file kept open and appended to, such as an audit log beside the
        // pins, would wake the task on every write. A new version of the file is written and
        // closed (IN_CLOSE_WRITE) or renamed onto it (IN_MOVED_TO), as `cloudlet mcp approve`
        // does.
        let mask = libc::IN_CREATE
            | libc::IN_DELETE
            | libc::IN_CLOSE_WRITE
            | libc::IN_MOVED_FROM
            | libc::IN_MOVED_TO
            | libc::IN_DELETE_SELF
            | libc::IN_MOVE_SELF;
        // SAFETY: valid descriptor and NUL-terminated path.
        if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c_dir.as_ptr(), mask) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is an owned descriptor, moved into the AsyncFd and closed only with it.
        let afd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }
        .map_err(std::io::Error::from)?;
        // Whatever happened before the watch began is looked at once.
        let watch = Arc::new(Watch {
            changed: AtomicBool::new(true),
            lost: AtomicBool::new(false),
        });
        let weak = Arc::downgrade(&watch);
        tokio::spawn(async move {
            // Room for many events; each is a 16-byte header and a name.
            let mut buf = [0u8; 4096];
            let mut lost = false;
            while !lost {
                let Ok(mut ready) = afd.readable().await else {
                    break;
                };
                // Drain every queued event; note those that name the file, and the one that
                // says the watch itself is gone.
                let mut changed = false;
                loop {
                    // SAFETY: reads into a local buffer of the given length.
                    let n =
                        unsafe { libc::read(afd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                    let Ok(n) = usize::try_from(n) else { break };
                    if n == 0 {
                        break;
                    }
                    let mut at = 0;
                    while at + 16 <= n {
                        // struct inotify_event: wd, mask, cookie, len, then `len` name bytes.
                        let field = |o: usize| {
                            u32::from_ne_bytes(buf[at + o..at + o + 4].try_into().unwrap_or([0; 4]))
                        };
                        let (mask, len) = (field(4), field(12) as usize);
                        // The name, NUL-padded; none for events of the folder itself.
                        let event_name = buf
                            .get(at + 16..(at + 16 + len).min(n))
                            .unwrap_or_default()
                            .split(|&b| b == 0)
                            .next()
                            .unwrap_or_default();
                        lost |= mask & libc::IN_IGNORED != 0;
                        changed |= event_name == name.as_slice()
                            || mask
                                & (libc::IN_DELETE_SELF | libc::IN_MOVE_SELF | libc::IN_Q_OVERFLOW)
                                != 0;
                        at += 16 + len;
                    }
                }
                ready.clear_ready();
                let Some(watch) = weak.upgrade() else { return };
                if changed || lost {
                    watch.changed.store(true, Ordering::Release);
                }
            }
            if let Some(watch) = weak.upgrade() {
                log::warn!(
                    "MCP pins: the watch of the folder ended; looking at the file on every call"
                );
                watch.lost.store(true, Ordering::Release);
            }
        });
        self.watch = Some(watch);
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn set_mode(&mut self, mode: PinMode) {
        self.mode = mode;
    }

    /// Re-reads the file if it changed on disk (an approval).
    pub fn refresh(&mut self) {
        if let Some(w) = &self.watch
            && !w.lost.load(Ordering::Acquire)
            && !w.changed.swap(false, Ordering::AcqRel)
        {
            return;
        }
        let now = stamp(&self.path);
        if now != self.stamp {
            match read(&self.path) {
                Ok(f) => {
                    self.file = f;
                    self.stamp = now;
                }
                Err(e) => log::warn!("MCP pins: {e}; keeping the pins read before"),
            }
        }
    }

    /// Where the definition of `tool` with hash `hash` stands (recording it as first seen or
    /// pending on the way).
    pub fn check(&mut self, tool: &str, hash: &str, description: &str) -> PinState {
        let entry = self.file.tools.get(tool);
        if entry.and_then(|e| e.approved.as_deref()) == Some(hash) {
            return PinState::Approved;
        }
        if entry.and_then(|e| e.pending.as_deref()) == Some(hash) {
            return PinState::Pending {
                approved: entry.and_then(|e| e.approved.clone()),
            };
        }
        let trust = self.mode == PinMode::TrustFirst;
        let recorded = update(&self.path, |file| {
            let e = file.tools.entry(tool.to_string()).or_default();
            if e.approved.is_none() && trust {
                e.approved = Some(hash.to_string());
            } else if e.approved.as_deref() != Some(hash) {
                e.pending = Some(hash.to_string());
                e.pending_description = Some(description.to_string());
                e.pending_since_ms = Some(
                    SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64),
                );
            }
            Ok(())
        });
        match recorded {
            Ok(((), file)) => {
                self.file = file;
                self.stamp = stamp(&self.path);
            }
            Err(e) => log::error!("MCP pins: cannot record {tool}: {e}"),
        }
        let entry = self.file.tools.get(tool);
        if entry.and_then(|e| e.approved.as_deref()) == Some(hash) {
            PinState::Approved
        } else {
            PinState::Pending {
                approved: entry.and_then(|e| e.approved.clone()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("cloudlet-pins-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir.join("pins.json")
    }

    #[test]
    fn first_seen_is_trusted_and_a_change_waits_for_approval() {
        let path = temp("tofu");
        let mut store = PinStore::open(&path, PinMode::TrustFirst).unwrap();
        assert_eq!(store.check("a__t", "h1", "d1"), PinState::Approved);
        assert_eq!(store.check("a__t", "h1", "d1"), PinState::Approved);
        let changed = store.check("a__t", "h2", "evil");
        assert_eq!(
            changed,
            PinState::Pending {
                approved: Some("h1".into())
            }
        );
        let on_disk = read(&path).unwrap();
        assert_eq!(on_disk.tools["a__t"].pending.as_deref(), Some("h2"));
        assert_eq!(
            on_disk.tools["a__t"].pending_description.as_deref(),
            Some("evil")
        );
        // The old definition still passes meanwhile.
        assert_eq!(store.check("a__t", "h1", "d1"), PinState::Approved);
        assert!(matches!(
            approve(&path, &["a__x".into()]),
            Err(PinError::NothingPending(_))
        ));
        assert_eq!(approve(&path, &[]).unwrap(), vec!["a__t".to_string()]);
        store.refresh();
        assert_eq!(store.check("a__t", "h2", "evil"), PinState::Approved);
        assert_ne!(store.check("a__t", "h1", "d1"), PinState::Approved);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn a_watched_store_reads_the_file_only_after_a_change() {
        let path = temp("watch");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut store = PinStore::open(&path, PinMode::TrustFirst).unwrap();
            store.watch().unwrap();
            assert_eq!(store.check("a__t", "h1", "d1"), PinState::Approved);
            store.check("a__t", "h2", "evil");
            let watch = store.watch.clone().unwrap();
            let flag = &watch.changed;
            // The store's own writes raise the flag too; once looked at, it stays down.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            store.refresh();
            assert!(!flag.load(Ordering::Acquire));
            store.refresh();
            assert!(!flag.load(Ordering::Acquire));
            // Writes to another file of the folder (an audit log beside the pins) do not.
            let other = path.with_file_name("audit.jsonl");
            for i in 0..3 {
                std::fs::write(&other, format!("entry {i}\n")).unwrap();
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            assert!(
                !flag.load(Ordering::Acquire),
                "a write to another file of the folder raised the flag"
            );
            // An approval by another process (`cloudlet mcp approve`) is seen.
            approve(&path, &[]).unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while !flag.load(Ordering::Acquire) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no inotify event for the approval"
                );
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            store.refresh();
            assert_eq!(store.check("a__t", "h2", "evil"), PinState::Approved);
            // A removed folder ends the watch: the store then looks every time.
            assert!(!watch.lost.load(Ordering::Acquire));
            std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while !watch.lost.load(Ordering::Acquire) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the end of the watch was not noticed"
                );
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        });
    }

    #[test]
    fn approve_mode_holds_new_tools() {
        let path = temp("approve");
        let mut store = PinStore::open(&path, PinMode::Approve).unwrap();
        assert_eq!(
            store.check("b__t", "h1", "d"),
            PinState::Pending { approved: None }
        );
        assert_eq!(approve(&path, &["b__t".into()]).unwrap(), vec!["b__t"]);
        store.refresh();
        assert_eq!(store.check("b__t", "h1", "d"), PinState::Approved);
        std::fs::write(&path, "not json").unwrap();
        assert!(matches!(read(&path), Err(PinError::Parse { .. })));
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
