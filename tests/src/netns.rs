//! Network namespaces and veth pairs for privileged tests and the demo, each behind a guard
//! that removes it on drop, also when a test panics.

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace made with `ip netns add`, deleted on drop.
pub struct NetNs {
    name: String,
}

fn run_checked(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl NetNs {
    /// Creates a namespace named `{prefix}-{pid}-{n}` with its loopback up.
    pub fn new(prefix: &str) -> Self {
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        Self::named(&name)
    }

    /// Creates a namespace with exactly this name (removing a stale one first).
    pub fn named(name: &str) -> Self {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        run_checked(Command::new("ip").args(["netns", "add", name]));
        let ns = Self {
            name: name.to_string(),
        };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs a command inside the namespace (`ip netns exec`); panics if it fails.
    pub fn exec(&self, args: &[&str]) -> Output {
        run_checked(
            Command::new("ip")
                .args(["netns", "exec", &self.name])
                .args(args),
        )
    }

    /// A command that will run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `f` on a new thread that has entered the namespace (sockets it opens live there).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                // SAFETY: setns on a valid namespace fd; it changes this thread only.
                let ret = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(ret, 0, "setns({path}): {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }

    /// MAC address of `iface` in this namespace.
    pub fn mac(&self, iface: &str) -> [u8; 6] {
        let out = self.exec(&["cat", &format!("/sys/class/net/{iface}/address")]);
        let text = String::from_utf8_lossy(&out.stdout);
        let bytes: Vec<u8> = text
            .trim()
            .split(':')
            .map(|b| u8::from_str_radix(b, 16).expect("MAC byte"))
            .collect();
        bytes.try_into().expect("6-byte MAC")
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace also removes its veth ends (and so their peers).
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Joins `a`'s interface `a_if` and `b`'s `b_if` with a veth pair, both up, IPv6 off
/// (no router solicitations or MLD reports to muddle counts).
pub fn veth_pair(a: &NetNs, a_if: &str, b: &NetNs, b_if: &str) {
    run_checked(Command::new("ip").args([
        "link",
        "add",
        a_if,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ]));
    for (ns, iface) in [(a, a_if), (b, b_if)] {
        ns.exec(&[
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{iface}.disable_ipv6=1"),
        ]);
        ns.exec(&["ip", "link", "set", iface, "up"]);
    }
}
