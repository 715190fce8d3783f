//! IP prefixes (`192.0.2.0/24`, `2001:db8::/32`, or a bare address for /32 and /128).

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

/// An IPv4 or IPv6 network: an address with its host bits clear, and a length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix {
    addr: IpAddr,
    len: u8,
}

/// Why a prefix string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PrefixError {
    /// The address part is not an IPv4 or IPv6 address.
    #[error("not an IP address")]
    Address,
    /// The length is not a number within the family's width.
    #[error("prefix length must be 0..={max}")]
    Length { max: u8 },
    /// Bits beyond the length are set (`10.0.0.1/8`).
    #[error("host bits set; the network is {0}")]
    HostBits(String),
}

impl Prefix {
    /// A prefix from an address and length; `None` if the length is too long or host
    /// bits are set.
    pub fn new(addr: IpAddr, len: u8) -> Option<Self> {
        let p = Self { addr, len };
        (len <= p.width() && p.network_bits() == p.bits()).then_some(p)
    }

    /// The network address.
    pub const fn addr(&self) -> IpAddr {
        self.addr
    }

    /// Prefix length in bits.
    #[expect(
        clippy::len_without_is_empty,
        reason = "a prefix length, not a container size"
    )]
    pub const fn len(&self) -> u8 {
        self.len
    }

    /// True for IPv4 prefixes.
    pub const fn is_ipv4(&self) -> bool {
        matches!(self.addr, IpAddr::V4(_))
    }

    /// 32 or 128.
    pub const fn width(&self) -> u8 {
        if self.is_ipv4() { 32 } else { 128 }
    }

    /// The address as an integer (IPv4 in the low 32 bits).
    pub fn bits(&self) -> u128 {
        addr_bits(self.addr)
    }

    fn network_bits(&self) -> u128 {
        let host = u32::from(self.width() - self.len);
        if host >= 128 {
            0
        } else {
            (self.bits() >> host) << host
        }
    }

    /// First and last address covered, as integers.
    pub fn range(&self) -> (u128, u128) {
        let host = u32::from(self.width() - self.len);
        let start = self.bits();
        let span = if host >= 128 {
            u128::MAX
        } else {
            (1u128 << host) - 1
        };
        (start, start | span)
    }

    /// Whether `ip` lies inside.
    pub fn contains(&self, ip: IpAddr) -> bool {
        if ip.is_ipv4() != self.is_ipv4() {
            return false;
        }
        let (start, end) = self.range();
        (start..=end).contains(&addr_bits(ip))
    }
}

/// An address as an integer (IPv4 in the low 32 bits).
pub fn addr_bits(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// The address of integer `bits` in the family given by `ipv4`.
pub fn bits_addr(bits: u128, ipv4: bool) -> IpAddr {
    if ipv4 {
        IpAddr::V4(Ipv4Addr::from(bits as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(bits))
    }
}

impl FromStr for Prefix {
    type Err = PrefixError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| PrefixError::Address)?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or(PrefixError::Length { max })?,
            None => max,
        };
        let p = Self { addr, len };
        if p.network_bits() != p.bits() {
            let net = Self {
                addr: bits_addr(p.network_bits(), p.is_ipv4()),
                len,
            };
            return Err(PrefixError::HostBits(net.to_string()));
        }
        Ok(p)
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_normalises() {
        let p: Prefix = "192.0.2.0/24".parse().unwrap();
        assert_eq!(p.len(), 24);
        assert_eq!(p.range(), (0xc000_0200, 0xc000_02ff));
        let p: Prefix = "2001:db8::1".parse().unwrap();
        assert_eq!(p.len(), 128);
        let p: Prefix = "::/0".parse().unwrap();
        assert_eq!(p.range(), (0, u128::MAX));
        assert!(p.contains("2001:db8::1".parse().unwrap()));
        assert!(!p.contains("10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn refuses_bad_prefixes() {
        assert_eq!(
            "10.0.0.1/8".parse::<Prefix>(),
            Err(PrefixError::HostBits("10.0.0.0/8".into()))
        );
        assert_eq!(
            "10.0.0.0/33".parse::<Prefix>(),
            Err(PrefixError::Length { max: 32 })
        );
        assert_eq!(
            "2001:db8::/129".parse::<Prefix>(),
            Err(PrefixError::Length { max: 128 })
        );
        assert_eq!("10.0.0/8".parse::<Prefix>(), Err(PrefixError::Address));
        assert_eq!("eu".parse::<Prefix>(), Err(PrefixError::Address));
    }
}
