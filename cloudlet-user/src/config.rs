//! cloudletd's configuration file. Every section has a default, so a file naming just the
//! policy (or just a `[front_door]`) starts a node. Documented in `docs/operations.md`.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::{
    dataplane::AttachMode,
    quic::{
        PqMode,
        backhaul::{self, BackhaulConfig, Origin, OriginTrust},
        front_door::FrontDoorConfig,
    },
};

/// Folder of a generated front door certificate and key when `cert` and `key` are not given.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/cloudlet";

/// Default admin socket (HTTP over a Unix socket, reachable from any network namespace).
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/cloudlet/cloudletd.sock";

/// The daemon's configuration, paths resolved against the file's folder.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The policy file. None: no dataplane (no program is loaded), only the listeners.
    pub policy: Option<PathBuf>,
    /// Interfaces to attach the XDP program to (none: load and count nothing). Needs a
    /// policy.
    pub interfaces: Vec<String>,
    /// How to attach.
    pub xdp_mode: AttachMode,
    /// The admin endpoint's Unix socket.
    pub admin_socket: PathBuf,
    /// A TCP address serving the admin routes too (for Prometheus), if configured.
    pub admin_listen: Option<std::net::SocketAddr>,
    /// Where the XDP links are pinned (on a bpffs), so the program outlives the daemon and a
    /// restarted daemon takes it over. None: no pinning.
    pub pin_dir: Option<PathBuf>,
    /// Where cloudletd sends the frames its AF_XDP sockets (`xsk` actions) receive. None:
    /// it counts them and lets them go.
    pub xsk_forward: Option<String>,
    /// The HTTP/3 and HTTPS front door, if configured.
    pub front_door: Option<FrontDoorConfig>,
    /// Embeddings on the front door (`POST /v1/embeddings`), if configured.
    pub compute: Option<crate::compute::ComputeConfig>,
    /// The MCP guard on the front door, if configured.
    pub mcp: Option<crate::mcp::guard::GuardConfig>,
}

/// Default pin folder.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/cloudlet";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// Default: none (no dataplane); then `interfaces` must be empty and `[front_door]` given.
    policy: Option<Spanned<String>>,
    #[serde(default)]
    interfaces: Vec<String>,
    #[serde(default)]
    xdp_mode: AttachMode,
    /// Default: [`DEFAULT_PIN_DIR`]; "" turns pinning off.
    pin_dir: Option<String>,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    xsk: RawXsk,
    front_door: Option<Spanned<RawFrontDoor>>,
    compute: Option<Spanned<RawCompute>>,
    mcp: Option<Spanned<crate::mcp::config::RawMcp>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCompute {
    /// The model folder (`model.safetensors`, `tokenizer.json`, `config.json`).
    model: String,
    /// Default: auto.
    #[serde(default)]
    backend: crate::compute::BackendChoice,
    /// Default: 32.
    max_batch: Option<usize>,
    /// Default: 5.
    max_wait_ms: Option<u64>,
    /// Default: 1024.
    queue: Option<usize>,
    /// Default: 256.
    max_inputs: Option<usize>,
    /// Default: 1 MiB.
    max_body: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFrontDoor {
    /// UDP (HTTP/3) and TCP (HTTPS) address.
    listen: std::net::SocketAddr,
    /// Default: [`PqMode::Preferred`].
    #[serde(default)]
    pq: PqMode,
    /// Default: `DEFAULT_STATE_DIR/front-door-cert.pem`, only with `self_signed`.
    cert: Option<String>,
    /// Default: `DEFAULT_STATE_DIR/front-door-key.pem`, only with `self_signed`.
    key: Option<String>,
    /// Default: false (`cert` and `key` must exist).
    #[serde(default)]
    self_signed: bool,
    /// Default: `localhost` and the listen address's IP (unless unspecified).
    names: Option<Vec<String>>,
    /// Default: none (nothing is proxied).
    #[serde(default)]
    backhaul: Vec<Spanned<RawBackhaul>>,
    /// Default: none (no client certificates asked).
    client_ca: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackhaul {
    /// Path prefix, starting with `/`.
    prefix: String,
    /// `h3://host:port` or `https://host:port`.
    origin: String,
    /// CA file (PEM); exactly one of `ca` and `spki_sha256`.
    ca: Option<String>,
    /// Base64 SHA-256 of the origin certificate's SubjectPublicKeyInfo.
    spki_sha256: Option<String>,
    /// Default: the origin's host.
    server_name: Option<String>,
    /// Default: false (the path is sent as received).
    #[serde(default)]
    strip_prefix: bool,
    /// Default: the front door's `pq`.
    pq: Option<PqMode>,
    /// Default: [`backhaul::DEFAULT_CONNECT_TIMEOUT`].
    connect_timeout_ms: Option<u64>,
    /// Default: [`backhaul::DEFAULT_REQUEST_TIMEOUT`].
    request_timeout_ms: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawXsk {
    /// Default: none (count received frames, forward nothing).
    forward: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    /// Default: [`DEFAULT_ADMIN_SOCKET`].
    socket: Option<String>,
    /// Default: none (no TCP listener).
    listen: Option<std::net::SocketAddr>,
}

/// Errors from reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown keys or bad values.
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
}

impl Config {
    /// Reads the configuration at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses configuration `text`; `path` names it in errors and anchors relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let (line, column) = crate::policy::line_column(text, e.span().map_or(0, |s| s.start));
            ConfigError::Invalid {
                path: path.to_path_buf(),
                line,
                column,
                message: e.message().to_string(),
            }
        })?;
        if let Some(f) = &raw.xsk.forward
            && !crate::policy::is_interface_name(f.get_ref())
        {
            let (line, column) = crate::policy::line_column(text, f.span().start);
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                line,
                column,
                message: format!("`xsk.forward`: {:?} is not an interface name", f.get_ref()),
            });
        }
        let invalid = |at: usize, message: String| {
            let (line, column) = crate::policy::line_column(text, at);
            ConfigError::Invalid {
                path: path.to_path_buf(),
                line,
                column,
                message,
            }
        };
        if raw.policy.is_none() {
            if !raw.interfaces.is_empty() {
                return Err(invalid(0, "`interfaces` need a `policy`".to_string()));
            }
            if raw.front_door.is_none() {
                return Err(invalid(
                    0,
                    "nothing to run: give a `policy`, a `[front_door]`, or both".to_string(),
                ));
            }
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &str| {
            let p = PathBuf::from(p);
            if p.is_absolute() { p } else { base.join(p) }
        };
        let front_door = match raw.front_door {
            None => None,
            Some(fd) => {
                let at = fd.span().start;
                let fd = fd.into_inner();
                let (cert, key) = match (fd.cert, fd.key, fd.self_signed) {
                    (Some(c), Some(k), _) => (resolve(&c), resolve(&k)),
                    (None, None, true) => (
                        Path::new(DEFAULT_STATE_DIR).join("front-door-cert.pem"),
                        Path::new(DEFAULT_STATE_DIR).join("front-door-key.pem"),
                    ),
                    _ => {
                        return Err(invalid(
                            at,
                            "`front_door`: give both `cert` and `key`, or `self_signed = true`"
                                .to_string(),
                        ));
                    }
                };
                let names = fd.names.unwrap_or_else(|| {
                    let mut names = vec!["localhost".to_string()];
                    if !fd.listen.ip().is_unspecified() {
                        names.push(fd.listen.ip().to_string());
                    }
                    names
                });
                let mut routes = Vec::with_capacity(fd.backhaul.len());
                for b in fd.backhaul {
                    let at = b.span().start;
                    let b = b.into_inner();
                    let fail = |m: String| invalid(at, format!("`front_door.backhaul`: {m}"));
                    if !b.prefix.starts_with('/') {
                        return Err(fail(format!("prefix {:?} must start with `/`", b.prefix)));
                    }
                    let origin = Origin::parse(&b.origin).map_err(fail)?;
                    let trust = match (b.ca, b.spki_sha256) {
                        (Some(ca), None) => OriginTrust::Ca(resolve(&ca)),
                        (None, Some(pin)) => OriginTrust::Spki(pin),
                        _ => {
                            return Err(fail(format!(
                                "{}: give exactly one of `ca` and `spki_sha256`",
                                b.prefix
                            )));
                        }
                    };
                    let ms = |v: Option<u64>, default: std::time::Duration| {
                        v.map_or(default, std::time::Duration::from_millis)
                    };
                    routes.push(BackhaulConfig {
                        prefix: b.prefix,
                        origin,
                        trust,
                        server_name: b.server_name,
                        strip_prefix: b.strip_prefix,
                        pq: b.pq.unwrap_or(fd.pq),
                        connect_timeout: ms(
                            b.connect_timeout_ms,
                            backhaul::DEFAULT_CONNECT_TIMEOUT,
                        ),
                        request_timeout: ms(
                            b.request_timeout_ms,
                            backhaul::DEFAULT_REQUEST_TIMEOUT,
                        ),
                    });
                }
                Some(FrontDoorConfig {
                    listen: fd.listen,
                    pq: fd.pq,
                    cert,
                    key,
                    self_signed: fd.self_signed,
                    names,
                    backhaul: routes,
                    client_ca: fd.client_ca.as_deref().map(resolve),
                })
            }
        };
        let compute = match raw.compute {
            None => None,
            Some(c) => {
                let at = c.span().start;
                let c = c.into_inner();
                if front_door.is_none() {
                    return Err(invalid(
                        at,
                        "`compute` answers on the front door's listeners: add a `[front_door]`"
                            .to_string(),
                    ));
                }
                let defaults = crate::compute::dispatch::DispatchConfig::default();
                let limits = crate::compute::http::Limits::default();
                let dispatch = crate::compute::dispatch::DispatchConfig {
                    max_batch: c.max_batch.unwrap_or(defaults.max_batch),
                    max_wait: c
                        .max_wait_ms
                        .map_or(defaults.max_wait, std::time::Duration::from_millis),
                    queue: c.queue.unwrap_or(defaults.queue),
                };
                let limits = crate::compute::http::Limits {
                    max_inputs: c.max_inputs.unwrap_or(limits.max_inputs),
                    max_body: c.max_body.unwrap_or(limits.max_body),
                };
                if dispatch.max_batch == 0 || dispatch.queue == 0 || limits.max_inputs == 0 {
                    return Err(invalid(
                        at,
                        "`compute`: `max_batch`, `queue` and `max_inputs` must be at least 1"
                            .to_string(),
                    ));
                }
                if limits.max_inputs > dispatch.queue {
                    return Err(invalid(
                        at,
                        format!(
                            "`compute`: `max_inputs` ({}) is over `queue` ({}): such a request could never be queued",
                            limits.max_inputs, dispatch.queue
                        ),
                    ));
                }
                Some(crate::compute::ComputeConfig {
                    model: resolve(&c.model),
                    backend: c.backend,
                    dispatch,
                    limits,
                })
            }
        };
        let mcp = match raw.mcp {
            None => None,
            Some(m) => {
                let at = m.span().start;
                if front_door.is_none() {
                    return Err(invalid(
                        at,
                        "`mcp` answers on the front door's listeners: add a `[front_door]`"
                            .to_string(),
                    ));
                }
                let m = m
                    .into_inner()
                    .into_config(|p| resolve(p))
                    .map_err(|e| invalid(at, e))?;
                if !m.cert_roles.is_empty()
                    && front_door.as_ref().is_some_and(|f| f.client_ca.is_none())
                {
                    return Err(invalid(
                        at,
                        "`mcp.cert_roles` needs `front_door.client_ca` (the CAs client certificates are verified against)"
                            .to_string(),
                    ));
                }
                Some(m)
            }
        };
        Ok(Self {
            compute,
            mcp,
            policy: raw.policy.map(|p| resolve(p.get_ref())),
            interfaces: raw.interfaces,
            xdp_mode: raw.xdp_mode,
            admin_socket: raw
                .admin
                .socket
                .map_or_else(|| PathBuf::from(DEFAULT_ADMIN_SOCKET), |s| resolve(&s)),
            admin_listen: raw.admin.listen,
            pin_dir: match raw.pin_dir.as_deref() {
                None => Some(PathBuf::from(DEFAULT_PIN_DIR)),
                Some("") => None,
                Some(dir) => Some(resolve(dir)),
            },
            xsk_forward: raw.xsk.forward.map(Spanned::into_inner),
            front_door,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_relative_paths() {
        let c = Config::parse(
            "policy = \"p.toml\"\n",
            Path::new("/etc/cloudlet/cloudlet.toml"),
        )
        .unwrap();
        assert_eq!(c.policy, Some(PathBuf::from("/etc/cloudlet/p.toml")));
        assert_eq!(c.front_door, None);
        assert_eq!(c.xdp_mode, AttachMode::Auto);
        assert!(c.interfaces.is_empty());
        assert_eq!(c.admin_socket, PathBuf::from(DEFAULT_ADMIN_SOCKET));
        assert_eq!(c.admin_listen, None);
        assert_eq!(c.pin_dir, Some(PathBuf::from(DEFAULT_PIN_DIR)));
        assert_eq!(c.xsk_forward, None);
        let c = Config::parse("policy = \"p\"\npin_dir = \"\"\n", Path::new("c.toml")).unwrap();
        assert_eq!(c.pin_dir, None);
        let c = Config::parse(
            "policy = \"p\"\n[admin]\nlisten = \"127.0.0.1:9464\"\n",
            Path::new("c.toml"),
        )
        .unwrap();
        assert_eq!(c.admin_listen, Some("127.0.0.1:9464".parse().unwrap()));
    }

    #[test]
    fn xsk_forward() {
        let c = Config::parse(
            "policy = \"p\"\n[xsk]\nforward = \"eth2\"\n",
            Path::new("c.toml"),
        )
        .unwrap();
        assert_eq!(c.xsk_forward.as_deref(), Some("eth2"));
        let msg = Config::parse(
            "policy = \"p\"\n[xsk]\nforward = \"a/b\"\n",
            Path::new("c.toml"),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            msg,
            "c.toml:3:11: `xsk.forward`: \"a/b\" is not an interface name"
        );
    }

    #[test]
    fn compute() {
        let fd = "[front_door]\nlisten = \"127.0.0.1:4433\"\nself_signed = true\n";
        let path = Path::new("/etc/cloudlet/c.toml");
        let c = Config::parse(&format!("{fd}[compute]\nmodel = \"models/m\"\n"), path).unwrap();
        let compute = c.compute.unwrap();
        assert_eq!(compute.model, Path::new("/etc/cloudlet/models/m"));
        assert_eq!(compute.backend, crate::compute::BackendChoice::Auto);
        assert_eq!(
            compute.dispatch,
            crate::compute::dispatch::DispatchConfig::default()
        );
        assert_eq!(compute.limits, crate::compute::http::Limits::default());
        let c = Config::parse(
            &format!(
                "{fd}[compute]\nmodel = \"/m\"\nbackend = \"cuda\"\nmax_batch = 8\nmax_wait_ms = 2\nqueue = 64\nmax_inputs = 16\nmax_body = 4096\n"
            ),
            path,
        )
        .unwrap()
        .compute
        .unwrap();
        assert_eq!(c.backend, crate::compute::BackendChoice::Cuda);
        assert_eq!(
            (c.dispatch.max_batch, c.dispatch.max_wait, c.dispatch.queue),
            (8, std::time::Duration::from_millis(2), 64)
        );
        assert_eq!((c.limits.max_inputs, c.limits.max_body), (16, 4096));
        for (text, why) in [
            (
                "[compute]\nmodel = \"/m\"\npolicy = \"p\"\n".to_string(),
                "unknown field",
            ),
            (
                format!("{fd}[compute]\nmodel = \"/m\"\nbackend = \"tpu\"\n"),
                "unknown variant",
            ),
            (
                format!("{fd}[compute]\nmodel = \"/m\"\nqueue = 4\nmax_inputs = 8\n"),
                "could never be queued",
            ),
            (
                format!("{fd}[compute]\nmodel = \"/m\"\nmax_batch = 0\n"),
                "at least 1",
            ),
            (
                "policy = \"p\"\n[compute]\nmodel = \"/m\"\n".to_string(),
                "add a `[front_door]`",
            ),
        ] {
            let e = Config::parse(&text, path).unwrap_err().to_string();
            assert!(e.contains(why), "{text:?}: {e}");
        }
    }

    #[test]
    fn front_door() {
        let c = Config::parse(
            "[front_door]\nlisten = \"127.0.0.1:4433\"\nself_signed = true\npq = \"required\"\n",
            Path::new("/etc/cloudlet/c.toml"),
        )
        .unwrap();
        assert_eq!(c.policy, None);
        let fd = c.front_door.unwrap();
        assert_eq!(fd.listen, "127.0.0.1:4433".parse().unwrap());
        assert_eq!(fd.pq, PqMode::Required);
        assert!(fd.self_signed);
        assert_eq!(
            fd.cert,
            Path::new(DEFAULT_STATE_DIR).join("front-door-cert.pem")
        );
        assert_eq!(
            fd.key,
            Path::new(DEFAULT_STATE_DIR).join("front-door-key.pem")
        );
        assert_eq!(fd.names, ["localhost", "127.0.0.1"]);

        let c = Config::parse(
            "policy = \"p\"\n[front_door]\nlisten = \"[::]:443\"\ncert = \"tls/c.pem\"\nkey = \"tls/k.pem\"\n",
            Path::new("/etc/cloudlet/c.toml"),
        )
        .unwrap();
        let fd = c.front_door.unwrap();
        assert_eq!(fd.pq, PqMode::Preferred);
        assert!(!fd.self_signed);
        assert_eq!(fd.cert, PathBuf::from("/etc/cloudlet/tls/c.pem"));
        assert_eq!(fd.key, PathBuf::from("/etc/cloudlet/tls/k.pem"));
        assert_eq!(fd.names, ["localhost"]);

        let msg = Config::parse(
            "policy = \"p\"\n[front_door]\nlisten = \"127.0.0.1:1\"\ncert = \"c.pem\"\n",
            Path::new("c.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            msg.starts_with("c.toml:2:1: `front_door`: give both"),
            "{msg}"
        );
        let msg = Config::parse(
            "[front_door]\nlisten = \"127.0.0.1:1\"\nself_signed = true\npq = \"sometimes\"\n",
            Path::new("c.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            msg.starts_with("c.toml:4:6: unknown variant `sometimes`"),
            "{msg}"
        );
    }

    #[test]
    fn backhaul_routes() {
        let c = Config::parse(
            "[front_door]\nlisten = \"127.0.0.1:1\"\nself_signed = true\npq = \"required\"\n\
             [[front_door.backhaul]]\nprefix = \"/api/\"\norigin = \"h3://10.0.0.2:4433\"\n\
             ca = \"ca.pem\"\nconnect_timeout_ms = 250\n\
             [[front_door.backhaul]]\nprefix = \"/web/\"\norigin = \"https://origin.example\"\n\
             spki_sha256 = \"AAAA\"\nstrip_prefix = true\npq = \"off\"\nserver_name = \"o\"\n",
            Path::new("/etc/cloudlet/c.toml"),
        )
        .unwrap();
        let routes = c.front_door.unwrap().backhaul;
        assert_eq!(routes.len(), 2);
        assert_eq!(routes[0].prefix, "/api/");
        assert_eq!(routes[0].origin.to_string(), "h3://10.0.0.2:4433");
        assert_eq!(
            routes[0].trust,
            OriginTrust::Ca(PathBuf::from("/etc/cloudlet/ca.pem"))
        );
        assert_eq!(routes[0].pq, PqMode::Required);
        assert_eq!(
            routes[0].connect_timeout,
            std::time::Duration::from_millis(250)
        );
        assert_eq!(routes[0].request_timeout, backhaul::DEFAULT_REQUEST_TIMEOUT);
        assert!(!routes[0].strip_prefix);
        assert_eq!(routes[1].origin.port, 443);
        assert_eq!(routes[1].trust, OriginTrust::Spki("AAAA".to_string()));
        assert_eq!(routes[1].pq, PqMode::Off);
        assert_eq!(routes[1].server_name.as_deref(), Some("o"));
        assert!(routes[1].strip_prefix);

        for (body, expected) in [
            (
                "prefix = \"api\"\norigin = \"h3://a:1\"\nca = \"c\"\n",
                "c.toml:4:1: `front_door.backhaul`: prefix \"api\" must start with `/`",
            ),
            (
                "prefix = \"/a/\"\norigin = \"http://a:1\"\nca = \"c\"\n",
                "c.toml:4:1: `front_door.backhaul`: origin \"http://a:1\": expected",
            ),
            (
                "prefix = \"/a/\"\norigin = \"h3://a:1\"\n",
                "c.toml:4:1: `front_door.backhaul`: /a/: give exactly one of `ca` and `spki_sha256`",
            ),
            (
                "prefix = \"/a/\"\norigin = \"h3://a:1\"\nca = \"c\"\ntimeout = 1\n",
                "c.toml:8:1: unknown field `timeout`",
            ),
        ] {
            let msg = Config::parse(
                &format!(
                    "[front_door]\nlisten = \"127.0.0.1:1\"\nself_signed = true\n[[front_door.backhaul]]\n{body}"
                ),
                Path::new("c.toml"),
            )
            .unwrap_err()
            .to_string();
            assert!(msg.starts_with(expected), "{msg}");
        }
    }

    #[test]
    fn policy_is_needed_for_interfaces_and_without_front_door() {
        let msg = Config::parse(
            "interfaces = [\"eth0\"]\n[front_door]\nlisten = \"127.0.0.1:1\"\nself_signed = true\n",
            Path::new("c.toml"),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(msg, "c.toml:1:1: `interfaces` need a `policy`");
        let msg = Config::parse("", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            "c.toml:1:1: nothing to run: give a `policy`, a `[front_door]`, or both"
        );
    }

    #[test]
    fn unknown_key_is_located() {
        let err = Config::parse(
            "policy = \"p.toml\"\ninterface = [\"eth0\"]\n",
            Path::new("c.toml"),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("c.toml:2:1: unknown field `interface`"),
            "{msg}"
        );
    }
}
