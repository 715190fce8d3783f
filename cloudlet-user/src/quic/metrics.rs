//! The front door's Prometheus metrics: handshakes by protocol and negotiated key exchange
//! group, handshake failures by reason, open connections, bytes in and out, and backhaul
//! requests and origin connections. Every metric is shared (cloning a
//! [`FrontDoorMetrics`] shares its counters), so the listeners count into the same series
//! the registry encodes.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

/// Labels of a completed handshake.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// `h3`, `h2` or `http/1.1`: the protocol the connection serves.
    pub protocol: String,
    /// The negotiated key exchange group (`X25519MLKEM768`, `x25519`).
    pub group: String,
}

/// Labels of a failed handshake.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// `quic` or `tls` (over TCP).
    pub transport: String,
    /// Why it failed, from [`FailureReason::as_str`].
    pub reason: String,
}

/// Labels per transport (`quic` or `tls`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabels {
    /// `quic` or `tls`.
    pub transport: String,
}

/// Labels of a backhauled request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackhaulLabels {
    /// The route's path prefix.
    pub prefix: String,
    /// The status the front door answered with (the origin's, or 502/504).
    pub status: String,
}

/// Labels of a connection to an origin.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OriginLabels {
    /// The origin as configured (`h3://host:port`, `https://host:port`).
    pub origin: String,
    /// The negotiated key exchange group.
    pub group: String,
}

/// Why a handshake failed, as counted in `cloudlet_front_door_handshake_failures_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureReason {
    /// The peer offered no key exchange group the server accepts (for example a classical
    /// client against `pq = "required"`).
    NoSharedGroup,
    /// The peer is incompatible otherwise (no common cipher suite, version, ALPN).
    Incompatible,
    /// The peer sent something invalid (a malformed key share, a bad message).
    Misbehaved,
    /// The peer aborted the handshake with an alert.
    PeerAlert,
    /// The handshake did not finish in time.
    Timeout,
    /// Any other TLS, QUIC or I/O error.
    Other,
}

impl FailureReason {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoSharedGroup => "no_shared_group",
            Self::Incompatible => "incompatible",
            Self::Misbehaved => "misbehaved",
            Self::PeerAlert => "peer_alert",
            Self::Timeout => "timeout",
            Self::Other => "other",
        }
    }

    /// The reason of a rustls error.
    pub fn of_tls(e: &rustls::Error) -> Self {
        use rustls::{Error, PeerIncompatible};
        match e {
            Error::PeerIncompatible(PeerIncompatible::NoKxGroupsInCommon) => Self::NoSharedGroup,
            Error::PeerIncompatible(_) | Error::NoApplicationProtocol => Self::Incompatible,
            Error::PeerMisbehaved(_) | Error::InvalidMessage(_) => Self::Misbehaved,
            Error::AlertReceived(_) => Self::PeerAlert,
            _ => Self::Other,
        }
    }

    /// The reason of an I/O error from a TLS handshake over TCP (tokio-rustls wraps
    /// rustls' errors in `std::io::Error`).
    pub fn of_io(e: &std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::TimedOut {
            return Self::Timeout;
        }
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .map_or(Self::Other, Self::of_tls)
    }

    /// The reason of a failed QUIC handshake. quinn keeps only the text of the TLS error,
    /// with the alert it sent as the CRYPTO_ERROR code.
    pub fn of_quic(e: &quinn::ConnectionError) -> Self {
        use quinn::ConnectionError;
        match e {
            ConnectionError::TimedOut => Self::Timeout,
            ConnectionError::TransportError(t) => {
                if t.reason.contains("NoKxGroupsInCommon") {
                    Self::NoSharedGroup
                } else if t.reason.contains("peer is incompatible")
                    || t.reason.contains("NoApplicationProtocol")
                {
                    Self::Incompatible
                } else if t.reason.contains("peer misbehaved")
                    || t.reason.contains("invalid peer message")
                {
                    Self::Misbehaved
                } else {
                    Self::Other
                }
            }
            ConnectionError::ConnectionClosed(_) | ConnectionError::ApplicationClosed(_) => {
                Self::PeerAlert
            }
            _ => Self::Other,
        }
    }
}

/// The front door's metrics (see the module documentation for the series).
#[derive(Clone, Debug, Default)]
pub struct FrontDoorMetrics {
    handshakes: Family<HandshakeLabels, Counter>,
    handshake_failures: Family<FailureLabels, Counter>,
    active: Family<TransportLabels, Gauge>,
    received: Family<TransportLabels, Counter>,
    sent: Family<TransportLabels, Counter>,
    backhaul_requests: Family<BackhaulLabels, Counter>,
    origin_connections: Family<OriginLabels, Counter>,
}

impl FrontDoorMetrics {
    /// Registers every series in `registry` (names get the `cloudlet_front_door_` prefix).
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("cloudlet_front_door");
        r.register(
            "handshakes",
            "Completed TLS handshakes by protocol and negotiated key exchange group",
            self.handshakes.clone(),
        );
        r.register(
            "handshake_failures",
            "Failed TLS handshakes by transport and reason",
            self.handshake_failures.clone(),
        );
        r.register(
            "active_connections",
            "Open client connections by transport",
            self.active.clone(),
        );
        r.register(
            "received_bytes",
            "Bytes received from clients by transport (UDP payloads for QUIC, TLS records for TCP)",
            self.received.clone(),
        );
        r.register(
            "sent_bytes",
            "Bytes sent to clients by transport (UDP payloads for QUIC, TLS records for TCP)",
            self.sent.clone(),
        );
        r.register(
            "backhaul_requests",
            "Requests proxied to an origin, by route prefix and answered status",
            self.backhaul_requests.clone(),
        );
        r.register(
            "origin_connections",
            "Connections opened to origins, by origin and negotiated key exchange group",
            self.origin_connections.clone(),
        );
    }

    /// Counts a completed handshake.
    pub fn handshake(&self, protocol: &str, group: &str) {
        self.handshakes
            .get_or_create(&HandshakeLabels {
                protocol: protocol.to_string(),
                group: group.to_string(),
            })
            .inc();
    }

    /// Counts a failed handshake.
    pub fn handshake_failure(&self, transport: &str, reason: FailureReason) {
        self.handshake_failures
            .get_or_create(&FailureLabels {
                transport: transport.to_string(),
                reason: reason.as_str().to_string(),
            })
            .inc();
    }

    /// Counts an open connection until the returned guard is dropped.
    pub fn open(&self, transport: &str) -> OpenConnection {
        let gauge = self
            .active
            .get_or_create(&TransportLabels {
                transport: transport.to_string(),
            })
            .clone();
        gauge.inc();
        OpenConnection(gauge)
    }

    /// Adds a connection's traffic.
    pub fn bytes(&self, transport: &str, received: u64, sent: u64) {
        let labels = TransportLabels {
            transport: transport.to_string(),
        };
        self.received.get_or_create(&labels).inc_by(received);
        self.sent.get_or_create(&labels).inc_by(sent);
    }

    /// Counts a backhauled request.
    pub fn backhaul_request(&self, prefix: &str, status: u16) {
        self.backhaul_requests
            .get_or_create(&BackhaulLabels {
                prefix: prefix.to_string(),
                status: status.to_string(),
            })
            .inc();
    }

    /// Counts a new connection to an origin.
    pub fn origin_connection(&self, origin: &str, group: &str) {
        self.origin_connections
            .get_or_create(&OriginLabels {
                origin: origin.to_string(),
                group: group.to_string(),
            })
            .inc();
    }
}

/// An open connection, counted in `cloudlet_front_door_active_connections` while it lives.
#[derive(Debug)]
pub struct OpenConnection(Gauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_encoded_with_their_labels() {
        let m = FrontDoorMetrics::default();
        let mut registry = Registry::default();
        m.register(&mut registry);
        m.handshake("h3", "X25519MLKEM768");
        m.handshake("h3", "X25519MLKEM768");
        m.handshake_failure("quic", FailureReason::NoSharedGroup);
        let open = m.open("quic");
        m.bytes("quic", 10, 20);
        m.backhaul_request("/api/", 502);
        m.origin_connection("h3://127.0.0.1:1", "X25519MLKEM768");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            "cloudlet_front_door_handshakes_total{protocol=\"h3\",group=\"X25519MLKEM768\"} 2",
            "cloudlet_front_door_handshake_failures_total{transport=\"quic\",reason=\"no_shared_group\"} 1",
            "cloudlet_front_door_active_connections{transport=\"quic\"} 1",
            "cloudlet_front_door_received_bytes_total{transport=\"quic\"} 10",
            "cloudlet_front_door_sent_bytes_total{transport=\"quic\"} 20",
            "cloudlet_front_door_backhaul_requests_total{prefix=\"/api/\",status=\"502\"} 1",
            "cloudlet_front_door_origin_connections_total{origin=\"h3://127.0.0.1:1\",group=\"X25519MLKEM768\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        drop(open);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("cloudlet_front_door_active_connections{transport=\"quic\"} 0"));
    }

    #[test]
    fn tls_failure_reasons() {
        use rustls::{Error, PeerIncompatible};
        assert_eq!(
            FailureReason::of_tls(&Error::PeerIncompatible(
                PeerIncompatible::NoKxGroupsInCommon
            )),
            FailureReason::NoSharedGroup
        );
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            Error::PeerIncompatible(PeerIncompatible::NoKxGroupsInCommon),
        );
        assert_eq!(FailureReason::of_io(&io), FailureReason::NoSharedGroup);
        assert_eq!(
            FailureReason::of_io(&std::io::ErrorKind::TimedOut.into()),
            FailureReason::Timeout
        );
    }
}
