use std::path::Path;

use super::*;

fn check(text: &str) -> Result<Policy, PolicyError> {
    parse(text, Path::new("/etc/cloudlet/policy.toml"))
}

fn diagnostics(text: &str) -> Vec<String> {
    match check(text) {
        Ok(_) => panic!("policy should not validate:\n{text}"),
        Err(PolicyError::Invalid { diagnostics, .. }) => diagnostics
            .into_iter()
            .map(|d| format!("{}:{}: {}", d.line, d.column, d.message))
            .collect(),
        Err(e) => panic!("unexpected error {e}"),
    }
}

const EXAMPLE: &str = r#"
default = "pass"
malformed = "drop"
[geoip]
database = "data/geo.mmdb"
[zones.eu]
countries = ["DE", "fr", "NL"]
prefixes = ["192.0.2.0/24", "2001:db8:1::/48"]
[[rules]]
name = "health-data-stays-in-eu"
dst_prefix = ["10.10.0.0/16"]
src_zone = "!eu"
action = "drop"
"#;

#[test]
fn the_documented_example_validates() {
    let p = check(EXAMPLE).unwrap();
    assert_eq!(p.default_action, Action::Pass);
    assert_eq!(p.malformed_action, Action::Drop);
    assert_eq!(p.non_ip_action, Action::Pass);
    assert_eq!(
        p.geoip_database.as_deref(),
        Some(Path::new("/etc/cloudlet/data/geo.mmdb"))
    );
    assert_eq!(p.zones.len(), 1);
    assert_eq!(p.zones[0].countries, ["DE", "FR", "NL"]);
    assert_eq!(p.zones[0].prefixes.len(), 2);
    let r = &p.rules[0];
    assert_eq!(r.name, "health-data-stays-in-eu");
    assert_eq!(
        r.src_zone,
        Some(ZoneMatch {
            zone: 0,
            negate: true
        })
    );
    assert_eq!(
        r.dst_prefix.as_ref().unwrap()[0].to_string(),
        "10.10.0.0/16"
    );
    assert_eq!(r.action, Action::Drop);
}

#[test]
fn empty_policy_passes_everything() {
    let p = check("").unwrap();
    assert_eq!(p.default_action, Action::Pass);
    assert!(p.rules.is_empty() && p.zones.is_empty());
}

#[test]
fn errors_name_line_and_column() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "unknown top-level key",
            "defualt = \"pass\"\n",
            "1:1: unknown field `defualt`",
        ),
        (
            "unknown rule key",
            "[[rules]]\nname = \"a\"\nsrc_zones = \"x\"\naction = \"drop\"\n",
            "3:1: unknown field `src_zones`",
        ),
        (
            "unknown zone",
            "[[rules]]\nsrc_zone = \"!eu\"\naction = \"drop\"\n",
            "2:12: unknown zone \"eu\"",
        ),
        (
            "unknown country",
            "[geoip]\ndatabase = \"g.mmdb\"\n[zones.x]\ncountries = [\"DE\", \"XX\"]\n",
            "4:20: unknown country code \"XX\"",
        ),
        (
            "bad prefix",
            "[zones.x]\nprefixes = [\"10.0.0.1/8\"]\n",
            "2:13: bad prefix \"10.0.0.1/8\": host bits set; the network is 10.0.0.0/8",
        ),
        (
            "prefix too long",
            "[[rules]]\ndst_prefix = [\"10.0.0.0/33\"]\naction = \"drop\"\n",
            "2:15: bad prefix",
        ),
        (
            "bad action",
            "[[rules]]\naction = \"reject\"\n",
            "2:10: `action`: unknown action \"reject\"",
        ),
        (
            "bad default",
            "default = \"block\"\n",
            "1:11: `default`: unknown action",
        ),
        (
            "duplicate rule",
            "[[rules]]\nname = \"a\"\naction = \"drop\"\n[[rules]]\nname = \"a\"\naction = \"pass\"\n",
            "5:8: duplicate rule name \"a\"",
        ),
        (
            "countries without database",
            "[zones.x]\ncountries = [\"DE\"]\n",
            "no [geoip] database",
        ),
        ("not toml", "default = \n", "1:"),
        (
            "wrong type",
            "[[rules]]\naction = \"drop\"\ndst_prefix = \"10.0.0.0/8\"\n",
            "3:14:",
        ),
    ];
    for (name, text, want) in cases {
        let got = diagnostics(text);
        assert!(
            got.iter()
                .any(|d| d.starts_with(want) || (d.contains(want) && !want.contains(':'))),
            "{name}: want {want:?}, got {got:?}"
        );
    }
}

#[test]
fn every_action_parses() {
    let p = check(
        "default = { cpu = 1 }\n[[rules]]\naction = \"tx\"\n[[rules]]\naction = { redirect = \"eth1\" }\n[[rules]]\naction = \"drop\"\n",
    )
    .unwrap();
    assert_eq!(p.default_action, Action::Cpu(1));
    assert_eq!(p.rules[0].action, Action::Tx);
    assert_eq!(p.rules[1].action, Action::Redirect("eth1".into()));
    assert_eq!(p.rules[1].action.to_string(), "redirect eth1");
    let p =
        check("[[rules]]\naction = { rate_limit = { pps = 100, per = \"source\" } }\n").unwrap();
    assert_eq!(
        p.rules[0].action,
        Action::RateLimit(RateLimitSpec {
            pps: 100,
            burst: 100,
            per_source: true,
            over_drop: true
        })
    );
    assert_eq!(
        p.rules[0].action.to_string(),
        "rate_limit 100 pps burst 100 per source over drop"
    );
    for (text, want) in [
        (
            "[[rules]]\naction = { cpu = 300 }\n",
            "2:10: `action`: `cpu`: 300 is not a CPU number below 256",
        ),
        (
            "[[rules]]\naction = { redirect = \"\" }\n",
            "2:10: `action`: `redirect`: \"\" is not an interface name",
        ),
        (
            "[[rules]]\naction = { bounce = 1 }\n",
            "2:10: `action`: unknown action table",
        ),
        (
            "[[rules]]\naction = 3\n",
            "2:10: `action`: an action must be a string or a table (found integer)",
        ),
        (
            "malformed = \"tx\"\n",
            "1:13: `malformed`: unknown action \"tx\", expected \"pass\" or \"drop\"",
        ),
    ] {
        let got = diagnostics(text);
        assert!(
            got.iter().any(|d| d.starts_with(want)),
            "want {want:?}, got {got:?}"
        );
    }
}

#[test]
fn xsk_action_parses_and_bad_queues_are_located() {
    let p = check("default = { xsk = 0 }\n[[rules]]\ndst_port = 4789\naction = { xsk = 63 }\n")
        .unwrap();
    assert_eq!(p.default_action, Action::Xsk(0));
    assert_eq!(p.rules[0].action, Action::Xsk(63));
    assert_eq!(p.rules[0].action.to_string(), "xsk 63");
    assert_eq!(p.rules[0].action.name(), "xsk");
    for (text, want) in [
        (
            "[[rules]]\naction = { xsk = 64 }\n",
            "2:10: `action`: `xsk`: 64 is not a queue number below 64",
        ),
        (
            "[[rules]]\naction = { xsk = -1 }\n",
            "2:10: `action`: `xsk`: -1 is not a queue number below 64",
        ),
        (
            "[[rules]]\naction = { xsk = \"0\" }\n",
            "2:10: `action`: `xsk` takes a receive queue number (found string)",
        ),
        (
            "default = { xsk = 1.5 }\n",
            "1:11: `default`: `xsk` takes a receive queue number (found float)",
        ),
        (
            "[[rules]]\naction = { xsk = 0, cpu = 1 }\n",
            "2:10: `action`: an action table has exactly one key",
        ),
        (
            "malformed = { xsk = 0 }\n",
            // `malformed` takes "pass" or "drop" only.
            "1:13: invalid type: map, expected a string",
        ),
    ] {
        let got = diagnostics(text);
        assert!(
            got.iter().any(|d| d.starts_with(want)),
            "want {want:?}, got {got:?}"
        );
    }
}

#[test]
fn all_problems_are_reported_at_once() {
    let text = "[[rules]]\nsrc_zone = \"a\"\ndst_zone = \"b\"\naction = \"nope\"\n";
    let got = diagnostics(text);
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(got[0].starts_with("2:"), "{got:?}");
    assert!(got[2].starts_with("4:"), "{got:?}");
}

#[test]
fn error_display_is_file_line_column() {
    let err = check("[[rules]]\naction = \"reject\"\n").unwrap_err();
    assert_eq!(
        err.to_string(),
        "/etc/cloudlet/policy.toml:2:10: `action`: unknown action \"reject\"; expected \"pass\", \"drop\", \"tx\", { redirect = \"IFNAME\" }, { cpu = N }, { xsk = QUEUE } or { rate_limit = { ... } }"
    );
}

#[test]
fn rules_get_default_names_and_limits_hold() {
    let p = check("[[rules]]\naction = \"drop\"\n[[rules]]\naction = \"pass\"\n").unwrap();
    assert_eq!(p.rules[0].name, "rule-1");
    assert_eq!(p.rules[1].name, "rule-2");

    let many = "[[rules]]\naction = \"drop\"\n".repeat(MAX_RULES + 1);
    let got = diagnostics(&many);
    assert!(
        got.iter()
            .any(|d| d.contains("32769:1: 16385 rules defined; at most 16384")),
        "{got:?}"
    );

    let zones: String = (0..=MAX_ZONES)
        .map(|i| format!("[zones.z{i}]\nprefixes = []\n"))
        .collect();
    let got = diagnostics(&zones);
    assert!(got.iter().any(|d| d.contains("at most 256")), "{got:?}");
}

#[test]
fn line_column_counts_characters() {
    assert_eq!(line_column("ab\ncd", 0), (1, 1));
    assert_eq!(line_column("ab\ncd", 4), (2, 2));
    assert_eq!(line_column("é\nx", 3), (2, 1));
    assert_eq!(line_column("x", 99), (1, 2));
}
