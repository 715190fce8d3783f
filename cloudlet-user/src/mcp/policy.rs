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

/// A decision and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    pub reason: String,
}

impl ToolPolicy {
    /// Whether an identity with `roles` may call `tool` ([`decide`](Self::decide) without
    /// its reason).
    pub fn allows(&self, roles: &[String], tool: &str) -> bool {
        let known = || roles.iter().filter_map(|r| self.roles.get(r.as_str()));
        !known().any(|role| role.deny.iter().any(|p| glob(p, tool)))
            && known().any(|role| role.allow.iter().any(|p| glob(p, tool)))
    }

    /// Whether an identity with `roles` may call `tool`, and why.
    pub fn decide(&self, roles: &[String], tool: &str) -> Verdict {
        let known: Vec<(&String, &Role)> = roles
            .iter()
            .filter_map(|r| self.roles.get_key_value(r.as_str()))
            .collect();
        for (name, role) in &known {
            if let Some(p) = role.deny.iter().find(|p| glob(p, tool)) {
                return Verdict {
                    allowed: false,
                    reason: format!("denied by role {name} (pattern {p:?})"),
                };
            }
        }
        for (name, role) in &known {
            if let Some(p) = role.allow.iter().find(|p| glob(p, tool)) {
                return Verdict {
                    allowed: true,
                    reason: format!("allowed by role {name} (pattern {p:?})"),
                };
            }
        }
        Verdict {
            allowed: false,
            reason: if known.is_empty() {
                format!("no configured role among {roles:?}")
            } else {
                "no role allows it".to_string()
            },
        }
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
        let guest = vec!["guest".to_string()];
        for roles in [&dev, &both, &guest] {
            for tool in [
                "files__read",
                "files__delete_all",
                "mail__send",
                "shell__run",
            ] {
                assert_eq!(
                    policy.allows(roles, tool),
                    policy.decide(roles, tool).allowed,
                    "{roles:?} {tool}"
                );
            }
        }
        assert!(policy.decide(&dev, "files__read").allowed);
        let v = policy.decide(&dev, "files__delete_all");
        assert!(!v.allowed);
        assert!(v.reason.contains("denied by role dev"), "{}", v.reason);
        assert!(!policy.decide(&dev, "mail__send").allowed);
        // ops allows everything, but dev's deny still holds, and ops denies mail.
        assert!(!policy.decide(&both, "files__delete_all").allowed);
        assert!(!policy.decide(&both, "mail__send").allowed);
        assert!(policy.decide(&both, "shell__run").allowed);
        let v = policy.decide(&["guest".to_string()], "files__read");
        assert!(
            !v.allowed && v.reason.contains("no configured role"),
            "{}",
            v.reason
        );
        assert!(toml::from_str::<ToolPolicy>("[dev]\nalow = [\"*\"]\n").is_err());
    }
}
