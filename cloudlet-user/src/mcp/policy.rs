//! Which tools an identity may call: per role, allow and deny lists of glob patterns over
//! tool names as the model sees them (`upstream__tool`). A deny in any of the identity's
//! roles wins; otherwise some role must allow the tool; otherwise it is denied.

use std::collections::BTreeMap;

/// One role's lists.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Role {
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub deny: Vec<String>,
}

/// The roles by name.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct ToolPolicy {
    pub roles: BTreeMap<String, Role>,
}

/// A decision and why; the reason is written out only when asked for
/// ([`reason`](Self::reason)), as most decisions are allowances nobody reads about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict<'a> {
    pub allowed: bool,
    why: Why<'a>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Why<'a> {
    Pattern { role: &'a str, pattern: &'a str },
    NoConfiguredRole(&'a [String]),
    NoRoleAllows,
}

impl Verdict<'_> {
    /// Why, in words.
    pub fn reason(&self) -> String {
        match &self.why {
            Why::Pattern { role, pattern } => format!(
                "{} by role {role} (pattern {pattern:?})",
                if self.allowed { "allowed" } else { "denied" }
            ),
            Why::NoConfiguredRole(roles) => format!("no configured role among {roles:?}"),
            Why::NoRoleAllows => "no role allows it".to_string(),
        }
    }
}

impl ToolPolicy {
    /// Whether an identity with `roles` may call `tool`, and why.
    pub fn decide<'a>(&'a self, roles: &'a [String], tool: &str) -> Verdict<'a> {
        let known = || {
            roles
                .iter()
                .filter_map(|r| self.roles.get_key_value(r.as_str()))
        };
        let matching = |allowed: bool| {
            known().find_map(|(role, lists)| {
                let list = if allowed { &lists.allow } else { &lists.deny };
                let pattern = list.iter().find(|p| glob(p, tool))?;
                Some(Verdict {
                    allowed,
                    why: Why::Pattern { role, pattern },
                })
            })
        };
        // A deny in any role wins over an allow in another.
        matching(false)
            .or_else(|| matching(true))
            .unwrap_or(Verdict {
                allowed: false,
                why: if known().next().is_none() {
                    Why::NoConfiguredRole(roles)
                } else {
                    Why::NoRoleAllows
                },
            })
    }
}

/// Whether `text` matches `pattern`: `*` any run of characters, `?` one character, the
/// rest literally.
pub fn glob(pattern: &str, text: &str) -> bool {
    if pattern.is_ascii() && text.is_ascii() {
        // One byte per character: no copies.
        matches(pattern.as_bytes(), text.as_bytes(), b'*', b'?')
    } else {
        let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
        matches(&p, &t, '*', '?')
    }
}

/// The classic two-pointer match with backtracking to the last star.
fn matches<C: Copy + PartialEq>(p: &[C], t: &[C], star_c: C, one: C) -> bool {
    let (mut i, mut j) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while j < t.len() {
        if i < p.len() && (p[i] == one || p[i] == t[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == star_c {
            star = Some((i, j));
            i += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|c| *c == star_c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        for (p, t, m) in [
            ("*", "", true),
            ("*", "files__read", true),
            ("files__*", "files__read", true),
            ("files__*", "mail__send", false),
            ("*__read*", "files__read_dir", true),
            ("?ail__send", "mail__send", true),
            ("mail__send", "mail__send_all", false),
            ("*send*", "mail__resend", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("", "", true),
            ("", "x", false),
            ("?", "é", true),
            ("é*", "éa", true),
            ("*?", "日本", true),
            ("??", "日", false),
        ] {
            assert_eq!(glob(p, t), m, "{p:?} against {t:?}");
        }
    }

    #[test]
    fn deny_wins_then_allow_then_nothing() {
        let policy: ToolPolicy = toml::from_str(
            "[dev]\nallow = [\"files__*\", \"search__*\"]\ndeny = [\"files__delete*\"]\n\
             [ops]\nallow = [\"*\"]\ndeny = [\"mail__*\"]\n",
        )
        .unwrap();
        let dev = vec!["dev".to_string()];
        let both = vec!["dev".to_string(), "ops".to_string()];
        assert!(policy.decide(&dev, "files__read").allowed);
        let v = policy.decide(&dev, "files__delete_all");
        assert!(!v.allowed);
        assert!(v.reason().contains("denied by role dev"), "{}", v.reason());
        assert!(!policy.decide(&dev, "mail__send").allowed);
        // ops allows everything, but dev's deny still holds, and ops denies mail.
        assert!(!policy.decide(&both, "files__delete_all").allowed);
        assert!(!policy.decide(&both, "mail__send").allowed);
        assert!(policy.decide(&both, "shell__run").allowed);
        let guest = ["guest".to_string()];
        let v = policy.decide(&guest, "files__read");
        assert!(
            !v.allowed && v.reason().contains("no configured role"),
            "{}",
            v.reason()
        );
        assert_eq!(
            policy.decide(&both, "shell__run").reason(),
            "allowed by role ops (pattern \"*\")"
        );
        assert!(toml::from_str::<ToolPolicy>("[dev]\nalow = [\"*\"]\n").is_err());
    }
}
