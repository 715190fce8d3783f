//! A plain user-space evaluator of a policy, written from the policy's documented meaning
//! and not from the compiled tables: the reference the XDP program is checked against.

use std::net::IpAddr;

use cloudlet::{
    geoip::GeoDb,
    policy::{Action, Match, Policy, Prefix, ZoneMatch},
};

/// The zones `ip` belongs to: those of its longest matching prefix among the zones'
/// explicit prefixes and the GeoIP networks of their countries; at equal length explicit
/// prefixes win; every zone holding the winning prefix counts.
pub fn zones_of(policy: &Policy, geo: Option<&GeoDb>, ip: IpAddr) -> Vec<usize> {
    // (prefix length, explicit?) of the best match so far, and its zones.
    let mut best: Option<(u8, bool)> = None;
    let mut zones = Vec::new();
    let mut consider = |len: u8, explicit: bool, zone: usize| {
        let key = (len, explicit);
        match best {
            Some(b) if b > key => {}
            Some(b) if b == key => {
                if !zones.contains(&zone) {
                    zones.push(zone);
                }
            }
            _ => {
                best = Some(key);
                zones = vec![zone];
            }
        }
    };
    for (z, zone) in policy.zones.iter().enumerate() {
        for p in &zone.prefixes {
            if p.contains(ip) {
                consider(p.len(), true, z);
            }
        }
    }
    if let Some(geo) = geo
        && let Some((net, country)) = geo.network(ip).expect("GeoIP lookup")
    {
        for (z, zone) in policy.zones.iter().enumerate() {
            if zone.countries.contains(&country) {
                consider(net.len(), false, z);
            }
        }
    }
    zones.sort_unstable();
    zones
}

fn zone_ok(m: Option<ZoneMatch>, zones: &[usize]) -> bool {
    m.is_none_or(|m| zones.contains(&m.zone) != m.negate)
}

/// What a rule can look at in an IP packet.
#[derive(Clone, Copy, Debug)]
pub struct Facts {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// Transport protocol number.
    pub proto: u8,
    /// (source, destination) when the packet carries TCP or UDP ports.
    pub ports: Option<(u16, u16)>,
    /// Outer VLAN id, if tagged.
    pub vlan: Option<u16>,
    /// The TCP flag byte, if a TCP header is present.
    pub tcp_flags: Option<u8>,
}

/// The verdict for an IP packet: the first rule whose criteria all hold, else the
/// default. Returns the action and the rule's index.
pub fn verdict(policy: &Policy, geo: Option<&GeoDb>, p: &Facts) -> (Action, Option<usize>) {
    let src_zones = zones_of(policy, geo, p.src);
    let dst_zones = zones_of(policy, geo, p.dst);
    let version = if p.src.is_ipv4() { 4 } else { 6 };
    let in_list = |list: &Option<Vec<Prefix>>, ip: IpAddr| {
        list.as_ref()
            .is_none_or(|l| l.iter().any(|x| x.contains(ip)))
    };
    // A port criterion needs ports and a flags criterion a TCP header, negated or not.
    let port_ok = |m: &Option<Match<u16>>, port: Option<u16>| {
        m.as_ref()
            .is_none_or(|m| port.is_some_and(|v| m.accepts(v)))
    };
    for (i, r) in policy.rules.iter().enumerate() {
        if zone_ok(r.src_zone, &src_zones)
            && zone_ok(r.dst_zone, &dst_zones)
            && in_list(&r.src_prefix, p.src)
            && in_list(&r.dst_prefix, p.dst)
            && r.proto.as_ref().is_none_or(|m| m.accepts(p.proto))
            && port_ok(&r.src_port, p.ports.map(|x| x.0))
            && port_ok(&r.dst_port, p.ports.map(|x| x.1))
            // An untagged packet satisfies only a negated VLAN criterion.
            && r.vlan.as_ref().is_none_or(|m| match p.vlan {
                Some(id) => m.accepts(id),
                None => m.negate,
            })
            && r.ip_version.is_none_or(|v| v == version)
            && r.tcp_flags.is_none_or(|t| p.tcp_flags.is_some_and(|f| t.accepts(f)))
        {
            return (r.action.clone(), Some(i));
        }
    }
    (policy.default_action.clone(), None)
}

/// The XDP code an action returns when its target is in place (a device, a CPU queue, an
/// AF_XDP socket on the frame's queue); without one the program falls back to XDP_DROP.
/// A rate limit resolves to pass or its over action, which the reference does not model.
pub fn xdp_code(action: &Action) -> Option<&'static str> {
    match action {
        Action::Pass => Some("XDP_PASS"),
        Action::Drop => Some("XDP_DROP"),
        Action::Tx => Some("XDP_TX"),
        Action::Redirect(_) | Action::Cpu(_) | Action::Xsk(_) => Some("XDP_REDIRECT"),
        Action::RateLimit(_) => None,
    }
}
