//! Rule criteria on fields other than addresses: protocol, ports, VLAN, IP version, TCP
//! flags. Each takes one value or a list; a single string value may be negated with `!`.

use std::ops::RangeInclusive;

/// A set of values of one field, or its complement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Match<T> {
    /// Inclusive ranges (single values are ranges of one).
    pub ranges: Vec<RangeInclusive<T>>,
    /// True for `"!..."`: every value but these.
    pub negate: bool,
}

impl<T: PartialOrd + Copy> Match<T> {
    /// Whether `value` satisfies the criterion.
    pub fn accepts(&self, value: T) -> bool {
        self.ranges.iter().any(|r| r.contains(&value)) != self.negate
    }
}

/// TCP flags that must be set and flags that must be clear (`"syn,!ack"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpFlags {
    pub set: u8,
    pub clear: u8,
}

impl TcpFlags {
    /// Whether a TCP flag byte satisfies the criterion.
    pub fn accepts(&self, flags: u8) -> bool {
        flags & self.set == self.set && flags & self.clear == 0
    }
}

/// Flag names, in bit order (FIN is 0x01).
pub const TCP_FLAG_NAMES: [&str; 8] = ["fin", "syn", "rst", "psh", "ack", "urg", "ece", "cwr"];

/// Protocol names accepted in `proto`.
pub const PROTOCOLS: &[(&str, u8)] = &[
    ("icmp", 1),
    ("tcp", 6),
    ("udp", 17),
    ("gre", 47),
    ("esp", 50),
    ("ah", 51),
    ("icmpv6", 58),
    ("sctp", 132),
];

/// The items of a criterion value and whether it is negated: a list, or one value; a
/// string starting with '!' negates (only as a single value).
pub(super) fn items(value: &toml::Value) -> Result<(Vec<toml::Value>, bool), String> {
    match value {
        toml::Value::Array(items) => {
            if items.is_empty() {
                return Err(
                    "an empty list matches nothing; leave the key out to match everything".into(),
                );
            }
            if items
                .iter()
                .any(|i| i.as_str().is_some_and(|s| s.trim_start().starts_with('!')))
            {
                return Err("'!' negates a single value, not an item of a list".into());
            }
            Ok((items.clone(), false))
        }
        toml::Value::String(s) => match s.trim().strip_prefix('!') {
            Some(rest) => Ok((vec![toml::Value::String(rest.trim().to_string())], true)),
            None => Ok((vec![value.clone()], false)),
        },
        other => Ok((vec![other.clone()], false)),
    }
}

fn number(item: &toml::Value, what: &str, max: u32) -> Result<u32, String> {
    let n = match item {
        toml::Value::Integer(i) => *i,
        toml::Value::String(s) => s
            .trim()
            .parse::<i64>()
            .map_err(|_| format!("{what} {s:?} is not a number"))?,
        other => {
            return Err(format!(
                "{what} must be a number or a string, not {}",
                other.type_str()
            ));
        }
    };
    u32::try_from(n)
        .ok()
        .filter(|n| *n <= max)
        .ok_or_else(|| format!("{what} {n} is out of range 0..={max}"))
}

/// A number or a `"low-high"` range, each within `0..=max`.
fn range(item: &toml::Value, what: &str, max: u32) -> Result<RangeInclusive<u32>, String> {
    if let toml::Value::String(s) = item
        && let Some((lo, hi)) = s.split_once('-')
    {
        let lo = number(&toml::Value::String(lo.into()), what, max)?;
        let hi = number(&toml::Value::String(hi.into()), what, max)?;
        if lo > hi {
            return Err(format!("{what} range {s:?} runs backwards"));
        }
        return Ok(lo..=hi);
    }
    let n = number(item, what, max)?;
    Ok(n..=n)
}

/// `proto`: names (`"tcp"`) or numbers.
pub(super) fn proto(value: &toml::Value) -> Result<Match<u8>, String> {
    let (items, negate) = items(value)?;
    let ranges = items
        .iter()
        .map(|item| {
            if let toml::Value::String(s) = item
                && let Some((_, n)) = PROTOCOLS
                    .iter()
                    .find(|(name, _)| name.eq_ignore_ascii_case(s.trim()))
            {
                return Ok(*n..=*n);
            }
            let n = number(item, "protocol", 255).map_err(|e| {
                format!(
                    "{e} (names: {})",
                    PROTOCOLS
                        .iter()
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })? as u8;
            Ok(n..=n)
        })
        .collect::<Result<_, String>>()?;
    Ok(Match { ranges, negate })
}

/// `src_port` / `dst_port`: ports and `"low-high"` ranges.
pub(super) fn ports(value: &toml::Value) -> Result<Match<u16>, String> {
    let (items, negate) = items(value)?;
    let ranges = items
        .iter()
        .map(|i| range(i, "port", 65_535).map(|r| *r.start() as u16..=*r.end() as u16))
        .collect::<Result<_, String>>()?;
    Ok(Match { ranges, negate })
}

/// `vlan`: outer VLAN ids and ranges.
pub(super) fn vlan(value: &toml::Value) -> Result<Match<u16>, String> {
    let (items, negate) = items(value)?;
    let ranges = items
        .iter()
        .map(|i| range(i, "VLAN id", 4_095).map(|r| *r.start() as u16..=*r.end() as u16))
        .collect::<Result<_, String>>()?;
    Ok(Match { ranges, negate })
}

/// `ip_version`: 4 or 6.
pub(super) fn ip_version(value: &toml::Value) -> Result<u8, String> {
    match value.as_integer() {
        Some(4) => Ok(4),
        Some(6) => Ok(6),
        Some(n) => Err(format!("ip_version must be 4 or 6, not {n}")),
        None => Err(format!(
            "ip_version must be 4 or 6, not a {}",
            value.type_str()
        )),
    }
}

/// `tcp_flags`: `"syn,!ack"`.
pub(super) fn tcp_flags(value: &toml::Value) -> Result<TcpFlags, String> {
    let s = value
        .as_str()
        .ok_or("tcp_flags must be a string such as \"syn,!ack\"")?;
    let mut f = TcpFlags { set: 0, clear: 0 };
    for part in s.split(',').map(str::trim) {
        let (negate, name) = match part.strip_prefix('!') {
            Some(n) => (true, n.trim()),
            None => (false, part),
        };
        let bit = TCP_FLAG_NAMES
            .iter()
            .position(|n| n.eq_ignore_ascii_case(name))
            .ok_or_else(|| {
                format!(
                    "unknown TCP flag {name:?} (flags: {})",
                    TCP_FLAG_NAMES.join(", ")
                )
            })?;
        let bit = 1u8 << bit;
        if (f.set | f.clear) & bit != 0 {
            return Err(format!("TCP flag {name:?} named twice"));
        }
        if negate {
            f.clear |= bit;
        } else {
            f.set |= bit;
        }
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(text: &str) -> toml::Value {
        toml::from_str::<toml::Table>(&format!("x = {text}")).unwrap()["x"].clone()
    }

    #[test]
    fn parses_each_criterion() {
        assert_eq!(
            proto(&v("\"tcp\"")).unwrap(),
            Match {
                ranges: vec![6..=6],
                negate: false
            }
        );
        assert_eq!(
            proto(&v("[\"udp\", 47, \"132\"]")).unwrap().ranges,
            vec![17..=17, 47..=47, 132..=132]
        );
        assert!(proto(&v("\"!icmpv6\"")).unwrap().negate);
        let p = ports(&v("[80, \"443\", \"8000-8999\"]")).unwrap();
        assert!(p.accepts(8500) && p.accepts(80) && !p.accepts(81));
        let p = ports(&v("\"!1024-65535\"")).unwrap();
        assert!(p.accepts(22) && !p.accepts(1024));
        assert_eq!(vlan(&v("100")).unwrap().ranges, vec![100..=100]);
        assert_eq!(ip_version(&v("6")).unwrap(), 6);
        let f = tcp_flags(&v("\"syn, !ack\"")).unwrap();
        assert!(f.accepts(0x02) && !f.accepts(0x12) && !f.accepts(0x10));
    }

    #[test]
    fn refuses_bad_values() {
        for (got, want) in [
            (
                proto(&v("\"tcpp\"")).unwrap_err(),
                "protocol \"tcpp\" is not a number (names: icmp, tcp",
            ),
            (
                proto(&v("256")).unwrap_err(),
                "protocol 256 is out of range 0..=255",
            ),
            (
                ports(&v("70000")).unwrap_err(),
                "port 70000 is out of range 0..=65535",
            ),
            (
                ports(&v("\"9-1\"")).unwrap_err(),
                "port range \"9-1\" runs backwards",
            ),
            (
                ports(&v("[]")).unwrap_err(),
                "an empty list matches nothing",
            ),
            (
                ports(&v("[\"!22\"]")).unwrap_err(),
                "'!' negates a single value",
            ),
            (
                vlan(&v("4096")).unwrap_err(),
                "VLAN id 4096 is out of range 0..=4095",
            ),
            (
                ip_version(&v("5")).unwrap_err(),
                "ip_version must be 4 or 6",
            ),
            (
                tcp_flags(&v("\"syn,sin\"")).unwrap_err(),
                "unknown TCP flag \"sin\"",
            ),
            (
                tcp_flags(&v("\"syn,!syn\"")).unwrap_err(),
                "TCP flag \"syn\" named twice",
            ),
            (
                ports(&v("true")).unwrap_err(),
                "port must be a number or a string, not boolean",
            ),
        ] {
            assert!(got.starts_with(want), "{got:?} should start with {want:?}");
        }
    }
}
