//! The `[mcp]` section of cloudletd's configuration, as written in the file, and its
//! checks. Documented key by key in `docs/mcp.md`.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use serde_json::Value;

use super::{
    guard::{self, GuardConfig, GuardPolicy, Rate, ThreatPolicy},
    identity::IssuerConfig,
    pins::PinMode,
    policy::{Role, ToolPolicy},
    upstream::{Transport, UpstreamConfig},
};

/// Default pin store, under the state folder.
pub const DEFAULT_PINS: &str = "/var/lib/cloudlet/mcp-pins.json";
/// Default audit log.
pub const DEFAULT_AUDIT: &str = "/var/log/cloudlet/mcp-audit.jsonl";
/// Default upstream timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMcp {
    path: Option<String>,
    #[serde(default)]
    allowed_origins: Vec<String>,
    #[serde(default)]
    anonymous_roles: Vec<String>,
    pins: Option<String>,
    #[serde(default)]
    pin_mode: PinMode,
    audit: Option<String>,
    audit_max_bytes: Option<u64>,
    audit_keep: Option<usize>,
    #[serde(default)]
    audit_sync: guard::AuditSync,
    max_body: Option<usize>,
    max_result_bytes: Option<usize>,
    session_idle_s: Option<u64>,
    block_injection: Option<bool>,
    block_puppet: Option<bool>,
    rate_per_identity: Option<String>,
    #[serde(default)]
    rate_per_tool: BTreeMap<String, String>,
    #[serde(default)]
    issuers: Vec<IssuerConfig>,
    #[serde(default)]
    cert_roles: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    upstreams: Vec<RawUpstream>,
    #[serde(default)]
    roles: BTreeMap<String, Role>,
    #[serde(default)]
    constraints: BTreeMap<String, BTreeMap<String, Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    name: String,
    prefix: Option<String>,
    command: Option<Vec<String>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    cwd: Option<String>,
    url: Option<String>,
    ca: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    timeout_ms: Option<u64>,
}

/// Whether `s` can be a tool-name prefix: letters, digits, `-` and `_`, without `__`.
fn is_prefix(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && !s.contains("__")
        && !s.ends_with('_')
}

impl RawMcp {
    /// The guard's configuration; relative paths are resolved by `resolve`.
    pub(crate) fn into_config(
        self,
        resolve: impl Fn(&str) -> PathBuf,
    ) -> Result<GuardConfig, String> {
        let path = self.path.unwrap_or_else(|| "/mcp".into());
        if !path.starts_with('/') || path.contains(['?', '#']) {
            return Err(format!(
                "`mcp.path` {path:?} must be a path starting with /"
            ));
        }
        let mut names = BTreeSet::new();
        let mut prefixes = BTreeSet::new();
        let mut upstreams = Vec::new();
        for u in self.upstreams {
            let prefix = u.prefix.unwrap_or_else(|| u.name.clone());
            if !names.insert(u.name.clone()) {
                return Err(format!(
                    "`mcp.upstreams`: two upstreams are named {:?}",
                    u.name
                ));
            }
            if !is_prefix(&prefix) {
                return Err(format!(
                    "`mcp.upstreams` {:?}: prefix {prefix:?} must be letters, digits, - and _ (no `__`, not ending in _)",
                    u.name
                ));
            }
            if !prefixes.insert(prefix.clone()) {
                return Err(format!(
                    "`mcp.upstreams`: two upstreams have the prefix {prefix:?}"
                ));
            }
            let transport = match (u.command, u.url) {
                (Some(command), None) => {
                    if command.is_empty() {
                        return Err(format!("`mcp.upstreams` {:?}: `command` is empty", u.name));
                    }
                    if u.ca.is_some() || !u.headers.is_empty() {
                        return Err(format!(
                            "`mcp.upstreams` {:?}: `ca` and `headers` are for `url` upstreams",
                            u.name
                        ));
                    }
                    // A relative program path with a folder in it is the configuration's
                    // own (`../bin/server`); a bare name is looked up in PATH.
                    let mut command = command;
                    if command[0].contains('/') && !command[0].starts_with('/') {
                        command[0] = resolve(&command[0]).display().to_string();
                    }
                    Transport::Stdio {
                        command,
                        env: u.env,
                        cwd: u.cwd.as_deref().map(&resolve),
                    }
                }
                (None, Some(url)) => {
                    if !(url.starts_with("http://") || url.starts_with("https://")) {
                        return Err(format!(
                            "`mcp.upstreams` {:?}: `url` must be http:// or https://",
                            u.name
                        ));
                    }
                    if !u.env.is_empty() || u.cwd.is_some() {
                        return Err(format!(
                            "`mcp.upstreams` {:?}: `env` and `cwd` are for `command` upstreams",
                            u.name
                        ));
                    }
                    Transport::Http {
                        url,
                        ca: u.ca.as_deref().map(&resolve),
                        headers: u.headers,
                    }
                }
                _ => {
                    return Err(format!(
                        "`mcp.upstreams` {:?}: give exactly one of `command` and `url`",
                        u.name
                    ));
                }
            };
            upstreams.push(UpstreamConfig {
                name: u.name,
                prefix,
                transport,
                timeout: u.timeout_ms.map_or(DEFAULT_TIMEOUT, Duration::from_millis),
            });
        }
        let mut issuers = self.issuers;
        let mut issuer_names = BTreeSet::new();
        for i in &mut issuers {
            if i.issuer.is_empty() || i.audience.is_empty() {
                return Err("`mcp.issuers`: `issuer` and `audience` must not be empty".into());
            }
            if !issuer_names.insert(i.issuer.clone()) {
                return Err(format!("`mcp.issuers`: {:?} is configured twice", i.issuer));
            }
            match (&i.jwks, &i.jwks_url) {
                (Some(path), None) => i.jwks = Some(resolve(&path.to_string_lossy())),
                (None, Some(url)) => {
                    let uri: Option<http::Uri> = url.parse().ok();
                    let scheme = uri.as_ref().and_then(|u| u.scheme_str());
                    let loopback = uri
                        .as_ref()
                        .and_then(|u| u.host())
                        .is_some_and(|h| matches!(h, "127.0.0.1" | "localhost" | "[::1]" | "::1"));
                    if !(scheme == Some("https") || (scheme == Some("http") && loopback)) {
                        return Err(format!(
                            "`mcp.issuers` {:?}: `jwks_url` must be https:// (http:// only on loopback)",
                            i.issuer
                        ));
                    }
                }
                _ => {
                    return Err(format!(
                        "`mcp.issuers` {:?}: give exactly one of `jwks` and `jwks_url`",
                        i.issuer
                    ));
                }
            }
            if let Some(ca) = &i.jwks_ca {
                i.jwks_ca = Some(resolve(&ca.to_string_lossy()));
            }
            if i.jwks_refresh_s == 0 {
                return Err(format!(
                    "`mcp.issuers` {:?}: `jwks_refresh_s` must be at least 1",
                    i.issuer
                ));
            }
        }
        let rate = |s: &str, key: &str| s.parse::<Rate>().map_err(|e| format!("`{key}`: {e}"));
        let per_identity = self
            .rate_per_identity
            .as_deref()
            .map(|s| rate(s, "mcp.rate_per_identity"))
            .transpose()?;
        let per_tool = self
            .rate_per_tool
            .iter()
            .map(|(k, v)| Ok((k.clone(), rate(v, "mcp.rate_per_tool")?)))
            .collect::<Result<_, String>>()?;
        let policy = GuardPolicy {
            roles: ToolPolicy { roles: self.roles },
            constraints: self.constraints,
            per_identity,
            per_tool,
            threats: ThreatPolicy {
                block_injection: self.block_injection.unwrap_or(true),
                block_puppet: self.block_puppet.unwrap_or(true),
            },
            max_result_bytes: self.max_result_bytes.unwrap_or(guard::DEFAULT_MAX_RESULT),
            pin_mode: self.pin_mode,
        };
        // Constraint schemas must compile now, not at the first call.
        for (tool, args) in &policy.constraints {
            for (arg, schema) in args {
                jsonschema::options()
                    .build(schema)
                    .map_err(|e| format!("`mcp.constraints.{tool}.{arg}`: {e}"))?;
            }
        }
        let max_body = self.max_body.unwrap_or(guard::DEFAULT_MAX_BODY);
        if max_body == 0 {
            return Err("`mcp.max_body` must be at least 1".into());
        }
        Ok(GuardConfig {
            path,
            allowed_origins: self.allowed_origins,
            upstreams,
            issuers,
            anonymous_roles: self.anonymous_roles,
            cert_roles: self.cert_roles,
            pins: self
                .pins
                .as_deref()
                .map_or_else(|| PathBuf::from(DEFAULT_PINS), &resolve),
            audit: self
                .audit
                .as_deref()
                .map_or_else(|| PathBuf::from(DEFAULT_AUDIT), &resolve),
            audit_max_bytes: self.audit_max_bytes.unwrap_or(64 << 20),
            audit_keep: self.audit_keep.unwrap_or(5),
            audit_sync: self.audit_sync,
            max_body,
            session_idle: self
                .session_idle_s
                .map_or(guard::DEFAULT_SESSION_IDLE, Duration::from_secs),
            policy,
        })
    }
}

/// Parses a `[mcp]` table on its own (for tests and tools); paths resolve against `base`.
pub fn parse(text: &str, base: &Path) -> Result<GuardConfig, String> {
    let raw: RawMcp = toml::from_str(text).map_err(|e| e.to_string())?;
    raw.into_config(|p| {
        let p = PathBuf::from(p);
        if p.is_absolute() { p } else { base.join(p) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_section_parses() {
        let c = parse(
            r#"
allowed_origins = ["https://app.example"]
pins = "state/pins.json"
audit_sync = "fdatasync"
rate_per_identity = "60/min"
block_puppet = false
[rate_per_tool]
"files__delete_*" = "2/s"
[[issuers]]
issuer = "https://a.example"
audience = "cloudlet-mcp"
jwks = "keys/a.jwks.json"
[[upstreams]]
name = "files"
command = ["bin/python3", "server.py"]
timeout_ms = 500
[[upstreams]]
name = "web"
prefix = "w"
url = "http://127.0.0.1:8000/mcp"
[roles.reader]
allow = ["files__read_*"]
[constraints."files__read_file"]
path = { type = "string", pattern = "^/srv/" }
"#,
            Path::new("/etc/cloudlet"),
        )
        .unwrap();
        assert_eq!(c.path, "/mcp");
        assert_eq!(c.pins, Path::new("/etc/cloudlet/state/pins.json"));
        assert_eq!(c.audit, Path::new(DEFAULT_AUDIT));
        assert_eq!(c.audit_sync, guard::AuditSync::Fdatasync);
        assert_eq!(
            c.issuers[0].jwks.as_deref(),
            Some(Path::new("/etc/cloudlet/keys/a.jwks.json"))
        );
        assert_eq!(c.upstreams[0].prefix, "files");
        let Transport::Stdio { command, .. } = &c.upstreams[0].transport else {
            panic!("not stdio")
        };
        assert_eq!(command, &["/etc/cloudlet/bin/python3", "server.py"]);
        assert_eq!(c.upstreams[0].timeout, Duration::from_millis(500));
        assert_eq!(c.upstreams[1].prefix, "w");
        assert!(matches!(c.upstreams[1].transport, Transport::Http { .. }));
        assert_eq!(
            c.policy.per_identity,
            Some(Rate {
                count: 60,
                per: Duration::from_secs(60)
            })
        );
        assert_eq!(c.policy.per_tool["files__delete_*"].count, 2);
        assert!(c.policy.threats.block_injection);
        assert!(!c.policy.threats.block_puppet);
        assert_eq!(c.policy.roles.roles["reader"].allow, ["files__read_*"]);
    }

    #[test]
    fn bad_sections_are_refused_with_a_reason() {
        for (text, expect) in [
            ("[[upstreams]]\nname = \"a\"\n", "exactly one of"),
            (
                "[[upstreams]]\nname = \"a\"\ncommand = [\"x\"]\nurl = \"http://h/\"\n",
                "exactly one of",
            ),
            ("[[upstreams]]\nname = \"a\"\ncommand = []\n", "is empty"),
            (
                "[[upstreams]]\nname = \"a__b\"\ncommand = [\"x\"]\n",
                "prefix",
            ),
            (
                "[[upstreams]]\nname = \"a\"\ncommand = [\"x\"]\n[[upstreams]]\nname = \"b\"\nprefix = \"a\"\ncommand = [\"y\"]\n",
                "two upstreams have the prefix",
            ),
            (
                "[[upstreams]]\nname = \"a\"\nurl = \"ftp://h/\"\n",
                "http://",
            ),
            (
                "[[issuers]]\nissuer = \"i\"\naudience = \"a\"\njwks_url = \"http://idp.example/k\"\n",
                "only on loopback",
            ),
            (
                "[[issuers]]\nissuer = \"i\"\naudience = \"a\"\n",
                "exactly one of `jwks` and `jwks_url`",
            ),
            (
                "[[issuers]]\nissuer = \"i\"\naudience = \"a\"\njwks_url = \"http://localhost.evil.example/k\"\n",
                "only on loopback",
            ),
            (
                "[[issuers]]\nissuer = \"i\"\naudience = \"a\"\njwks_url = \"https://i/k\"\n[[issuers]]\nissuer = \"i\"\naudience = \"b\"\njwks_url = \"https://i/k2\"\n",
                "configured twice",
            ),
            ("rate_per_identity = \"often\"\n", "a rate is"),
            ("rate_per_identity = \"0/s\"\n", "at least one"),
            ("path = \"mcp\"\n", "starting with /"),
            (
                "[constraints.t]\na = { type = 12 }\n",
                "mcp.constraints.t.a",
            ),
            ("surprise = 1\n", "unknown field"),
            ("audit_sync = \"sometimes\"\n", "unknown variant"),
        ] {
            let e = parse(text, Path::new("/")).unwrap_err();
            assert!(e.contains(expect), "{text:?}: {e}");
        }
    }
}
