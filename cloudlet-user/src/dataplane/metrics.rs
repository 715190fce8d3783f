//! The dataplane's Prometheus metrics: the program's counters, read from its maps at each
//! scrape (a collector, so nothing is copied between scrapes).

use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter},
};

use super::stats::{Count, Stats, XskCount};

/// Reads the current counters; `None` when they cannot be read (logged by the reader).
pub type ReadStats = Arc<dyn Fn() -> Option<Stats> + Send + Sync>;

/// Exposes [`Stats`] as Prometheus counter families:
/// `cloudlet_packets_total` / `cloudlet_bytes_total` by `verdict`,
/// `cloudlet_reason_packets_total` / `cloudlet_reason_bytes_total` by `reason`,
/// `cloudlet_rule_packets_total` / `cloudlet_rule_bytes_total` by `rule` and `action`,
/// `cloudlet_zone_packets_total` / `cloudlet_zone_bytes_total` by `zone` and `direction`,
/// `cloudlet_rate_limited_packets_total` / `cloudlet_rate_limited_bytes_total`,
/// `cloudlet_xsk_undelivered_packets_total` / `cloudlet_xsk_undelivered_bytes_total`,
/// and per AF_XDP socket (`interface`, `queue`): `cloudlet_xsk_received_*`,
/// `cloudlet_xsk_forwarded_*`, `cloudlet_xsk_forward_errors_total`,
/// `cloudlet_xsk_dropped_total`.
pub struct DataplaneCollector {
    read: ReadStats,
}

impl DataplaneCollector {
    /// A collector calling `read` at each scrape.
    pub fn new(read: ReadStats) -> Self {
        Self { read }
    }
}

impl std::fmt::Debug for DataplaneCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataplaneCollector")
    }
}

/// One counter family, packets and bytes, each sample with its labels.
fn family<'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl Iterator<Item = (Vec<(&'a str, &'a str)>, Count)> + Clone,
) -> Result<(), std::fmt::Error> {
    for (unit, pick) in [
        ("packets", (|c: &Count| c.packets) as fn(&Count) -> u64),
        ("bytes", |c: &Count| c.bytes),
    ] {
        let metric = format!("{name}_{unit}");
        let mut m = encoder.encode_descriptor(
            &metric,
            &format!("{help} ({unit})"),
            None,
            MetricType::Counter,
        )?;
        for (labels, count) in samples.clone() {
            ConstCounter::new(pick(&count)).encode(m.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

impl Collector for DataplaneCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(s) = (self.read)() else {
            return Ok(());
        };
        family(
            &mut encoder,
            "cloudlet",
            "Frames by the verdict taken",
            s.verdicts
                .iter()
                .map(|n| (vec![("verdict", n.name.as_str())], n.count)),
        )?;
        family(
            &mut encoder,
            "cloudlet_rate_limited",
            "Frames over a rate limit, given the limit's over verdict",
            std::iter::once((Vec::new(), s.rate_limited)),
        )?;
        family(
            &mut encoder,
            "cloudlet_xsk_undelivered",
            "Frames of an xsk action with no socket on their interface and queue (dropped)",
            std::iter::once((Vec::new(), s.xsk_undelivered)),
        )?;
        let queues: Vec<String> = s.xsk.iter().map(|x| x.queue.to_string()).collect();
        let labels = |i: usize| {
            vec![
                ("interface", s.xsk[i].interface.as_str()),
                ("queue", queues[i].as_str()),
            ]
        };
        family(
            &mut encoder,
            "cloudlet_xsk_received",
            "Frames read from cloudletd's AF_XDP socket",
            (0..s.xsk.len()).map(|i| (labels(i), s.xsk[i].received)),
        )?;
        family(
            &mut encoder,
            "cloudlet_xsk_forwarded",
            "Frames from the AF_XDP socket sent out of the forward interface",
            (0..s.xsk.len()).map(|i| (labels(i), s.xsk[i].forwarded)),
        )?;
        for (name, help, pick) in [
            (
                "cloudlet_xsk_forward_errors",
                "Frames from the AF_XDP socket the forward interface refused",
                (|x: &XskCount| x.forward_errors) as fn(&XskCount) -> u64,
            ),
            (
                "cloudlet_xsk_dropped",
                "Frames the kernel dropped for want of a buffer or room in the socket's ring",
                |x: &XskCount| x.dropped,
            ),
        ] {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (i, x) in s.xsk.iter().enumerate() {
                ConstCounter::new(pick(x)).encode(m.encode_family(&labels(i))?)?;
            }
        }
        family(
            &mut encoder,
            "cloudlet_reason",
            "Frames by the reason for their verdict",
            s.reasons
                .iter()
                .map(|n| (vec![("reason", n.name.as_str())], n.count)),
        )?;
        family(
            &mut encoder,
            "cloudlet_rule",
            "Frames matched by each rule",
            s.rules.iter().map(|r| {
                (
                    vec![("rule", r.name.as_str()), ("action", r.action.as_str())],
                    r.count,
                )
            }),
        )?;
        family(
            &mut encoder,
            "cloudlet_zone",
            "IP packets by the zone of their source or destination address",
            s.zones.iter().flat_map(|z| {
                [
                    (vec![("zone", z.name.as_str()), ("direction", "src")], z.src),
                    (vec![("zone", z.name.as_str()), ("direction", "dst")], z.dst),
                ]
            }),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::{encoding::text::encode, registry::Registry};

    use super::*;
    use crate::dataplane::stats::{Named, RuleCount, ZoneCount};

    #[test]
    fn encodes_every_family_with_labels() {
        let stats = Stats {
            verdicts: vec![Named {
                name: "drop".into(),
                count: Count {
                    packets: 3,
                    bytes: 180,
                },
            }],
            reasons: vec![Named {
                name: "rule".into(),
                count: Count {
                    packets: 3,
                    bytes: 180,
                },
            }],
            rules: vec![RuleCount {
                name: "no-kp".into(),
                action: "drop".into(),
                count: Count {
                    packets: 3,
                    bytes: 180,
                },
            }],
            zones: vec![ZoneCount {
                name: "kp".into(),
                src: Count {
                    packets: 3,
                    bytes: 180,
                },
                dst: Count::default(),
            }],
            rate_limited: Count {
                packets: 2,
                bytes: 120,
            },
            xsk_undelivered: Count {
                packets: 1,
                bytes: 60,
            },
            xsk: vec![XskCount {
                interface: "eth0".into(),
                queue: 3,
                open: true,
                received: Count {
                    packets: 5,
                    bytes: 300,
                },
                forwarded: Count {
                    packets: 4,
                    bytes: 240,
                },
                forward_errors: 1,
                dropped: 0,
            }],
        };
        let mut registry = Registry::default();
        registry.register_collector(Box::new(DataplaneCollector::new(Arc::new(move || {
            Some(stats.clone())
        }))));
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        for line in [
            "cloudlet_packets_total{verdict=\"drop\"} 3",
            "cloudlet_bytes_total{verdict=\"drop\"} 180",
            "cloudlet_reason_packets_total{reason=\"rule\"} 3",
            "cloudlet_rule_packets_total{rule=\"no-kp\",action=\"drop\"} 3",
            "cloudlet_zone_bytes_total{zone=\"kp\",direction=\"src\"} 180",
            "cloudlet_zone_packets_total{zone=\"kp\",direction=\"dst\"} 0",
            "# TYPE cloudlet_rule_bytes counter",
            "cloudlet_rate_limited_packets_total 2",
            "cloudlet_xsk_undelivered_bytes_total 60",
            "cloudlet_xsk_received_packets_total{interface=\"eth0\",queue=\"3\"} 5",
            "cloudlet_xsk_forwarded_bytes_total{interface=\"eth0\",queue=\"3\"} 240",
            "cloudlet_xsk_forward_errors_total{interface=\"eth0\",queue=\"3\"} 1",
            "cloudlet_xsk_dropped_total{interface=\"eth0\",queue=\"3\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
