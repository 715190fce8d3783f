//! A plain user-space evaluator of a policy, written from the policy's documented meaning
//! and not from the compiled tables: the reference the XDP program is checked against.

use std::net::IpAddr;

use cloudlet::{
    geoip::GeoDb,
    policy::{Action, Policy, ZoneMatch},
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

/// The verdict for an IP packet from `src` to `dst`: the first rule whose criteria all hold,
/// else the default. Returns the action and the rule's index.
pub fn verdict(
    policy: &Policy,
    geo: Option<&GeoDb>,
    src: IpAddr,
    dst: IpAddr,
) -> (Action, Option<usize>) {
    let src_zones = zones_of(policy, geo, src);
    let dst_zones = zones_of(policy, geo, dst);
    for (i, r) in policy.rules.iter().enumerate() {
        let in_list = |list: &Option<Vec<cloudlet::policy::Prefix>>, ip: IpAddr| {
            list.as_ref()
                .is_none_or(|l| l.iter().any(|p| p.contains(ip)))
        };
        if zone_ok(r.src_zone, &src_zones)
            && zone_ok(r.dst_zone, &dst_zones)
            && in_list(&r.src_prefix, src)
            && in_list(&r.dst_prefix, dst)
        {
            return (r.action, Some(i));
        }
    }
    (policy.default_action, None)
}
