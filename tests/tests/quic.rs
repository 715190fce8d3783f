//! The hybrid X25519MLKEM768 key exchange of `cloudlet::quic` against an independent
//! implementation, rustls' aws-lc-rs provider: key exchanges driven directly, full TLS 1.3
//! handshakes in memory, and QUIC connections over loopback; malformed and tampered shares;
//! `pq = "required"` against a classical-only peer.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use cloudlet::quic::{
    self, PqMode, X25519MLKEM768,
    hybrid::{
        CLIENT_SHARE_LEN, MLKEM768_CIPHERTEXT_LEN, MLKEM768_ENCAPSULATION_KEY_LEN, SERVER_SHARE_LEN,
    },
};
use rustls::{
    AlertDescription, ClientConnection, Connection, Error, HandshakeKind, NamedGroup,
    PeerIncompatible, PeerMisbehaved, RootCertStore, ServerConnection,
    crypto::{
        ActiveKeyExchange, CompletedKeyExchange, CryptoProvider, SharedSecret, SupportedKxGroup,
        aws_lc_rs,
    },
    pki_types::ServerName,
};

/// aws-lc-rs' own X25519MLKEM768.
static AWS_HYBRID: &dyn SupportedKxGroup = aws_lc_rs::kx_group::X25519MLKEM768;

// ---------------------------------------------------------------------------------------------
// Key exchanges driven directly.

#[test]
fn our_client_share_with_aws_lc_server() {
    for _ in 0..8 {
        let ours = X25519MLKEM768.start().unwrap();
        assert_eq!(ours.pub_key().len(), CLIENT_SHARE_LEN);
        let theirs = AWS_HYBRID.start_and_complete(ours.pub_key()).unwrap();
        assert_eq!(theirs.group, NamedGroup::X25519MLKEM768);
        assert_eq!(theirs.pub_key.len(), SERVER_SHARE_LEN);
        let secret = ours.complete(&theirs.pub_key).unwrap();
        assert_eq!(secret.secret_bytes(), theirs.secret.secret_bytes());
        assert_eq!(secret.secret_bytes().len(), 64);
    }
}

#[test]
fn aws_lc_client_share_with_our_server() {
    for _ in 0..8 {
        let theirs = AWS_HYBRID.start().unwrap();
        let ours = X25519MLKEM768.start_and_complete(theirs.pub_key()).unwrap();
        assert_eq!(ours.group, NamedGroup::X25519MLKEM768);
        let secret = theirs.complete(&ours.pub_key).unwrap();
        assert_eq!(secret.secret_bytes(), ours.secret.secret_bytes());
    }
}

#[test]
fn hybrid_component_matches_aws_lc_x25519() {
    let ours = X25519MLKEM768.start().unwrap();
    let (group, share) = ours.hybrid_component().unwrap();
    assert_eq!(group, NamedGroup::X25519);
    let theirs = aws_lc_rs::kx_group::X25519
        .start_and_complete(share)
        .unwrap();
    let secret = ours.complete_hybrid_component(&theirs.pub_key).unwrap();
    assert_eq!(secret.secret_bytes(), theirs.secret.secret_bytes());
}

fn is_invalid_key_share<T>(r: &Result<T, Error>) -> bool {
    matches!(
        r,
        Err(Error::PeerMisbehaved(PeerMisbehaved::InvalidKeyShare))
    )
}

/// A client share whose first ML-KEM coefficient is 4095, above q = 3329.
fn share_with_coefficient_not_below_q(mut share: Vec<u8>) -> Vec<u8> {
    share[0] = 0xff;
    share[1] |= 0x0f;
    share
}

/// Malformed client shares: ours and aws-lc-rs refuse every one, with the same error.
#[test]
fn malformed_client_shares_are_refused_like_aws_lc() {
    let good = X25519MLKEM768.start().unwrap().pub_key().to_vec();
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("one byte short", good[..CLIENT_SHARE_LEN - 1].to_vec()),
        ("one byte long", [&good[..], &[0]].concat()),
        (
            "X25519 only",
            good[MLKEM768_ENCAPSULATION_KEY_LEN..].to_vec(),
        ),
        (
            "ML-KEM only",
            good[..MLKEM768_ENCAPSULATION_KEY_LEN].to_vec(),
        ),
        (
            "coefficient >= q",
            share_with_coefficient_not_below_q(good.clone()),
        ),
    ];
    let mut zero_point = good.clone();
    zero_point[MLKEM768_ENCAPSULATION_KEY_LEN..].fill(0);
    cases.push(("all-zero X25519 point", zero_point));
    for (name, share) in cases {
        let ours = X25519MLKEM768.start_and_complete(&share);
        assert!(
            is_invalid_key_share(&ours),
            "{name}: ours gave {:?}",
            ours.err()
        );
        let theirs = AWS_HYBRID.start_and_complete(&share);
        assert!(theirs.is_err(), "{name}: aws-lc-rs accepted it");
    }
}

/// Malformed server shares: ours refuses every one.
#[test]
fn malformed_server_shares_are_refused() {
    let good = {
        let client = AWS_HYBRID.start().unwrap();
        AWS_HYBRID
            .start_and_complete(client.pub_key())
            .unwrap()
            .pub_key
    };
    let mut zero_point = good.clone();
    zero_point[MLKEM768_CIPHERTEXT_LEN..].fill(0);
    for (name, share) in [
        ("empty", Vec::new()),
        ("one byte short", good[..SERVER_SHARE_LEN - 1].to_vec()),
        ("one byte long", [&good[..], &[0]].concat()),
        ("a client-sized share", vec![1; CLIENT_SHARE_LEN]),
        ("all-zero X25519 point", zero_point),
    ] {
        let ours = X25519MLKEM768.start().unwrap().complete(&share);
        assert!(
            is_invalid_key_share(&ours),
            "{name}: ours gave {:?}",
            ours.err()
        );
    }
    // Bare X25519 through the hybrid component: an all-zero result is refused too.
    let ours = X25519MLKEM768
        .start()
        .unwrap()
        .complete_hybrid_component(&[0; 32]);
    assert!(is_invalid_key_share(&ours));
}

// ---------------------------------------------------------------------------------------------
// Full TLS 1.3 handshakes in memory.

struct Identity {
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    roots: RootCertStore,
}

fn identity() -> Identity {
    let id = quic::self_signed(&["localhost", "127.0.0.1"]).unwrap();
    let mut roots = RootCertStore::empty();
    roots.add(id.cert.clone()).unwrap();
    Identity {
        chain: vec![id.cert],
        key: id.key,
        roots,
    }
}

/// aws-lc-rs' provider; `groups` replaces its default groups (X25519MLKEM768 first, with
/// the `prefer-post-quantum` feature) when given.
fn aws_provider(groups: Option<Vec<&'static dyn SupportedKxGroup>>) -> Arc<CryptoProvider> {
    let mut provider = aws_lc_rs::default_provider();
    if let Some(groups) = groups {
        provider.kx_groups = groups;
    }
    Arc::new(provider)
}

fn aws_server(
    id: &Identity,
    groups: Option<Vec<&'static dyn SupportedKxGroup>>,
) -> rustls::ServerConfig {
    let mut config = rustls::ServerConfig::builder_with_provider(aws_provider(groups))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(id.chain.clone(), id.key.clone_key())
        .unwrap();
    config.alpn_protocols = vec![b"h3".to_vec()];
    config
}

fn aws_client(
    id: &Identity,
    groups: Option<Vec<&'static dyn SupportedKxGroup>>,
) -> rustls::ClientConfig {
    let mut config = rustls::ClientConfig::builder_with_provider(aws_provider(groups))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(id.roots.clone())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h3".to_vec()];
    config
}

fn our_server(id: &Identity, mode: PqMode) -> rustls::ServerConfig {
    quic::server_config(mode, id.chain.clone(), id.key.clone_key(), &[quic::ALPN_H3]).unwrap()
}

fn our_client(id: &Identity, mode: PqMode) -> rustls::ClientConfig {
    quic::client_config(mode, id.roots.clone(), &[quic::ALPN_H3]).unwrap()
}

/// How a handshake in memory ended.
#[derive(Debug)]
struct Outcome {
    client: ClientConnection,
    server: ServerConnection,
    client_error: Option<Error>,
    server_error: Option<Error>,
}

/// Moves the TLS bytes `from` has to send into `to`, passing them through `tamper` first.
fn transfer(
    from: &mut Connection,
    to: &mut Connection,
    tamper: &mut dyn FnMut(&mut Vec<u8>),
) -> Result<bool, Error> {
    let mut buf = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut buf).unwrap();
    }
    if buf.is_empty() {
        return Ok(false);
    }
    tamper(&mut buf);
    let mut rd = &buf[..];
    while !rd.is_empty() {
        to.read_tls(&mut rd).unwrap();
        to.process_new_packets()?;
    }
    Ok(true)
}

/// Runs a handshake between `client` and `server` configurations in memory, then sends a
/// line each way if it succeeded. `tamper_client` and `tamper_server` may change each
/// flight of the client's and the server's bytes on the way.
fn handshake_tampered(
    client: rustls::ClientConfig,
    server: rustls::ServerConfig,
    tamper_client: &mut dyn FnMut(&mut Vec<u8>),
    tamper_server: &mut dyn FnMut(&mut Vec<u8>),
) -> Outcome {
    let mut c = Connection::Client(
        ClientConnection::new(Arc::new(client), ServerName::try_from("localhost").unwrap())
            .unwrap(),
    );
    let mut s = Connection::Server(ServerConnection::new(Arc::new(server)).unwrap());
    let (mut client_error, mut server_error) = (None, None);
    for _ in 0..16 {
        let mut moved = false;
        match transfer(&mut c, &mut s, tamper_client) {
            Ok(m) => moved |= m,
            Err(e) => {
                server_error = Some(e);
                // Deliver the server's alert.
                let _ = transfer(&mut s, &mut c, tamper_server).map_err(|e| client_error = Some(e));
                break;
            }
        }
        match transfer(&mut s, &mut c, tamper_server) {
            Ok(m) => moved |= m,
            Err(e) => {
                client_error = Some(e);
                let _ = transfer(&mut c, &mut s, tamper_client).map_err(|e| server_error = Some(e));
                break;
            }
        }
        if !moved {
            break;
        }
    }
    let (Connection::Client(mut client), Connection::Server(mut server)) = (c, s) else {
        unreachable!("built as client and server above")
    };
    if client_error.is_none() && server_error.is_none() {
        assert!(!client.is_handshaking() && !server.is_handshaking());
        exchange_data(&mut client, &mut server);
    }
    Outcome {
        client,
        server,
        client_error,
        server_error,
    }
}

fn handshake(client: rustls::ClientConfig, server: rustls::ServerConfig) -> Outcome {
    handshake_tampered(client, server, &mut |_| {}, &mut |_| {})
}

/// Sends application data both ways over an established connection pair.
fn exchange_data(client: &mut ClientConnection, server: &mut ServerConnection) {
    use std::io::{Read as _, Write as _};
    client
        .writer()
        .write_all(b"ping from the client\n")
        .unwrap();
    let mut buf = Vec::new();
    client.write_tls(&mut buf).unwrap();
    server.read_tls(&mut &buf[..]).unwrap();
    server.process_new_packets().unwrap();
    let mut got = [0u8; 21];
    server.reader().read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping from the client\n");

    server
        .writer()
        .write_all(b"pong from the server\n")
        .unwrap();
    let mut buf = Vec::new();
    while server.wants_write() {
        server.write_tls(&mut buf).unwrap();
    }
    let mut rd = &buf[..];
    while !rd.is_empty() {
        client.read_tls(&mut rd).unwrap();
        client.process_new_packets().unwrap();
    }
    client.reader().read_exact(&mut got).unwrap();
    assert_eq!(&got, b"pong from the server\n");
}

fn groups(o: &Outcome) -> (Option<NamedGroup>, Option<NamedGroup>) {
    (
        o.client.negotiated_key_exchange_group().map(|g| g.name()),
        o.server.negotiated_key_exchange_group().map(|g| g.name()),
    )
}

const HYBRID: Option<NamedGroup> = Some(NamedGroup::X25519MLKEM768);
const CLASSICAL: Option<NamedGroup> = Some(NamedGroup::X25519);

#[test]
fn our_client_with_aws_lc_server_negotiates_the_hybrid() {
    let id = identity();
    for mode in [PqMode::Required, PqMode::Preferred] {
        let o = handshake(our_client(&id, mode), aws_server(&id, None));
        assert!(
            o.client_error.is_none() && o.server_error.is_none(),
            "{mode}: {o:?}"
        );
        assert_eq!(groups(&o), (HYBRID, HYBRID), "{mode}");
        assert_eq!(o.client.handshake_kind(), Some(HandshakeKind::Full));
    }
}

#[test]
fn aws_lc_client_with_our_server_negotiates_the_hybrid() {
    let id = identity();
    for mode in [PqMode::Required, PqMode::Preferred] {
        let o = handshake(aws_client(&id, None), our_server(&id, mode));
        assert!(
            o.client_error.is_none() && o.server_error.is_none(),
            "{mode}: {o:?}"
        );
        assert_eq!(groups(&o), (HYBRID, HYBRID), "{mode}");
        assert_eq!(o.server.handshake_kind(), Some(HandshakeKind::Full));
    }
}

/// A preferring client meets a classical server: the X25519 share it offers beside the
/// hybrid (the same key) is taken at once, without a HelloRetryRequest.
#[test]
fn preferred_client_with_classical_server_uses_the_hybrid_component() {
    let id = identity();
    let o = handshake(
        our_client(&id, PqMode::Preferred),
        aws_server(&id, Some(vec![aws_lc_rs::kx_group::X25519])),
    );
    assert!(
        o.client_error.is_none() && o.server_error.is_none(),
        "{o:?}"
    );
    assert_eq!(groups(&o), (CLASSICAL, CLASSICAL));
    assert_eq!(o.client.handshake_kind(), Some(HandshakeKind::Full));

    // A server preferring X25519 but allowing the hybrid still takes the client's first
    // choice: rustls servers follow the client's order.
    let o = handshake(
        our_client(&id, PqMode::Preferred),
        aws_server(&id, Some(vec![aws_lc_rs::kx_group::X25519, AWS_HYBRID])),
    );
    assert_eq!(groups(&o), (HYBRID, HYBRID));
}

/// A classical-only client cannot reach a `pq = "required"` server: it receives a
/// handshake_failure alert, and nothing panics.
#[test]
fn required_server_refuses_classical_client() {
    let id = identity();
    for client in [
        aws_client(&id, Some(vec![aws_lc_rs::kx_group::X25519])),
        aws_client(
            &id,
            Some(vec![
                aws_lc_rs::kx_group::X25519,
                aws_lc_rs::kx_group::SECP256R1,
                aws_lc_rs::kx_group::SECP384R1,
            ]),
        ),
        our_client(&id, PqMode::Off),
    ] {
        let o = handshake(client, our_server(&id, PqMode::Required));
        assert!(
            matches!(
                o.server_error,
                Some(Error::PeerIncompatible(
                    PeerIncompatible::NoKxGroupsInCommon
                ))
            ),
            "{o:?}"
        );
        assert!(
            matches!(
                o.client_error,
                Some(Error::AlertReceived(AlertDescription::HandshakeFailure))
            ),
            "{o:?}"
        );
        assert!(o.client.is_handshaking());
    }
}

/// Finds the key share entry of `group` with a `len`-byte key in a TLS record stream and
/// returns the key's offset.
fn find_share(bytes: &[u8], group: NamedGroup, len: usize) -> Option<usize> {
    let code = u16::from(group).to_be_bytes();
    let len16 = u16::try_from(len).ok()?.to_be_bytes();
    let needle = [code[0], code[1], len16[0], len16[1]];
    bytes
        .windows(4)
        .position(|w| w == needle)
        .map(|p| p + 4)
        .filter(|p| p + len <= bytes.len())
}

/// A ClientHello whose ML-KEM encapsulation key fails the modulus check: our server refuses
/// it with illegal_parameter.
#[test]
fn tampered_client_hello_share_gets_illegal_parameter() {
    let id = identity();
    for client in [our_client(&id, PqMode::Required), aws_client(&id, None)] {
        let mut tampered = false;
        let o = handshake_tampered(
            client,
            our_server(&id, PqMode::Required),
            &mut |flight| {
                if let (false, Some(at)) = (
                    tampered,
                    find_share(flight, NamedGroup::X25519MLKEM768, CLIENT_SHARE_LEN),
                ) {
                    flight[at] = 0xff;
                    flight[at + 1] |= 0x0f;
                    tampered = true;
                }
            },
            &mut |_| {},
        );
        assert!(tampered, "no hybrid share found in the ClientHello");
        assert!(
            matches!(
                o.server_error,
                Some(Error::PeerMisbehaved(PeerMisbehaved::InvalidKeyShare))
            ),
            "{o:?}"
        );
        assert!(
            matches!(
                o.client_error,
                Some(Error::AlertReceived(AlertDescription::IllegalParameter))
            ),
            "{o:?}"
        );
    }
}

/// A ServerHello whose X25519 point is all zeros: our client refuses it with
/// illegal_parameter.
#[test]
fn tampered_server_hello_share_gets_illegal_parameter() {
    let id = identity();
    let mut tampered = false;
    let o = handshake_tampered(
        our_client(&id, PqMode::Required),
        aws_server(&id, None),
        &mut |_| {},
        &mut |flight| {
            if let (false, Some(at)) = (
                tampered,
                find_share(flight, NamedGroup::X25519MLKEM768, SERVER_SHARE_LEN),
            ) {
                flight[at + MLKEM768_CIPHERTEXT_LEN..at + SERVER_SHARE_LEN].fill(0);
                tampered = true;
            }
        },
    );
    assert!(tampered, "no hybrid share found in the ServerHello");
    assert!(
        matches!(
            o.client_error,
            Some(Error::PeerMisbehaved(PeerMisbehaved::InvalidKeyShare))
        ),
        "{o:?}"
    );
    assert!(
        matches!(
            o.server_error,
            Some(Error::AlertReceived(AlertDescription::IllegalParameter))
        ),
        "{o:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// QUIC over loopback.

/// Wraps a key exchange group to record which group each key exchange actually completed.
#[derive(Debug)]
struct Recorded {
    inner: &'static dyn SupportedKxGroup,
    log: Arc<Mutex<Vec<NamedGroup>>>,
}

impl Recorded {
    /// `groups`, each wrapped, and the log they share.
    fn wrap(
        groups: &[&'static dyn SupportedKxGroup],
    ) -> (
        Vec<&'static dyn SupportedKxGroup>,
        Arc<Mutex<Vec<NamedGroup>>>,
    ) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let wrapped = groups
            .iter()
            .map(|&inner| {
                // Providers hold `&'static` groups; a few leaked per test are fine.
                &*Box::leak(Box::new(Recorded {
                    inner,
                    log: log.clone(),
                })) as &'static dyn SupportedKxGroup
            })
            .collect();
        (wrapped, log)
    }
}

impl SupportedKxGroup for Recorded {
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, Error> {
        Ok(Box::new(RecordedActive {
            inner: self.inner.start()?,
            log: self.log.clone(),
        }))
    }

    fn start_and_complete(&self, peer: &[u8]) -> Result<CompletedKeyExchange, Error> {
        let done = self.inner.start_and_complete(peer)?;
        self.log.lock().unwrap().push(done.group);
        Ok(done)
    }

    fn name(&self) -> NamedGroup {
        self.inner.name()
    }

    fn usable_for_version(&self, version: rustls::ProtocolVersion) -> bool {
        self.inner.usable_for_version(version)
    }

    fn ffdhe_group(&self) -> Option<rustls::ffdhe_groups::FfdheGroup<'static>> {
        None
    }
}

struct RecordedActive {
    inner: Box<dyn ActiveKeyExchange>,
    log: Arc<Mutex<Vec<NamedGroup>>>,
}

impl ActiveKeyExchange for RecordedActive {
    fn complete(self: Box<Self>, peer: &[u8]) -> Result<SharedSecret, Error> {
        let group = self.inner.group();
        let secret = self.inner.complete(peer)?;
        self.log.lock().unwrap().push(group);
        Ok(secret)
    }

    fn hybrid_component(&self) -> Option<(NamedGroup, &[u8])> {
        self.inner.hybrid_component()
    }

    fn complete_hybrid_component(self: Box<Self>, peer: &[u8]) -> Result<SharedSecret, Error> {
        let group = self.inner.hybrid_component().map(|(g, _)| g);
        let secret = self.inner.complete_hybrid_component(peer)?;
        self.log.lock().unwrap().extend(group);
        Ok(secret)
    }

    fn pub_key(&self) -> &[u8] {
        self.inner.pub_key()
    }

    fn group(&self) -> NamedGroup {
        self.inner.group()
    }

    fn ffdhe_group(&self) -> Option<rustls::ffdhe_groups::FfdheGroup<'static>> {
        None
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

const LOOPBACK: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 0);

/// Serves one connection on `server`: echoes one bidirectional stream back, upper-cased.
async fn echo_once(server: quinn::Endpoint) -> Result<(), quinn::ConnectionError> {
    let incoming = server.accept().await.expect("endpoint open");
    let conn = incoming.await?;
    let (mut send, mut recv) = conn.accept_bi().await?;
    let data = recv.read_to_end(1 << 16).await.expect("request read");
    send.write_all(&data.to_ascii_uppercase())
        .await
        .expect("reply written");
    send.finish().expect("stream open");
    // Wait for the client to close once it has read the reply.
    let _ = conn.closed().await;
    Ok(())
}

/// One side of a QUIC test connection: whose provider, with which groups.
enum Side {
    /// `cloudlet::quic` in this mode.
    Ours(PqMode),
    /// aws-lc-rs' provider, with its default groups or these.
    AwsLc(Option<Vec<&'static dyn SupportedKxGroup>>),
}

impl Side {
    /// The side's provider with its groups wrapped to record what they complete.
    fn recorded_provider(self) -> (Arc<CryptoProvider>, Arc<Mutex<Vec<NamedGroup>>>) {
        let mut provider = match self {
            Side::Ours(mode) => quic::crypto_provider(mode),
            Side::AwsLc(groups) => (*aws_provider(groups)).clone(),
        };
        let (groups, log) = Recorded::wrap(&provider.kx_groups);
        provider.kx_groups = groups;
        (Arc::new(provider), log)
    }
}

/// Connects a `client` to a `server` over QUIC on loopback, echoes a message, and returns
/// the groups each side's key exchanges completed.
fn quic_echo(id: &Identity, client: Side, server: Side) -> (Vec<NamedGroup>, Vec<NamedGroup>) {
    let (client_provider, client_log) = client.recorded_provider();
    let (server_provider, server_log) = server.recorded_provider();
    let mut client = rustls::ClientConfig::builder_with_provider(client_provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(id.roots.clone())
        .with_no_client_auth();
    client.alpn_protocols = vec![quic::ALPN_H3.to_vec()];
    let mut server = rustls::ServerConfig::builder_with_provider(server_provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(id.chain.clone(), id.key.clone_key())
        .unwrap();
    server.alpn_protocols = vec![quic::ALPN_H3.to_vec()];
    runtime().block_on(async move {
        let server =
            quinn::Endpoint::server(quic::quinn_server_config_from(server).unwrap(), LOOPBACK)
                .unwrap();
        let addr = server.local_addr().unwrap();
        let serving = tokio::spawn(echo_once(server.clone()));
        let mut endpoint = quinn::Endpoint::client(LOOPBACK).unwrap();
        endpoint.set_default_client_config(quic::quinn_client_config_from(client).unwrap());
        let conn = endpoint.connect(addr, "localhost").unwrap().await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(b"post-quantum hello").await.unwrap();
        send.finish().unwrap();
        let reply = recv.read_to_end(1 << 16).await.unwrap();
        assert_eq!(reply, b"POST-QUANTUM HELLO");
        conn.close(0u32.into(), b"done");
        serving.await.unwrap().unwrap();
        endpoint.wait_idle().await;
    });
    let client = client_log.lock().unwrap().clone();
    let server = server_log.lock().unwrap().clone();
    (client, server)
}

#[test]
fn quic_our_client_with_aws_lc_server() {
    let id = identity();
    for mode in [PqMode::Required, PqMode::Preferred] {
        let (client, server) = quic_echo(&id, Side::Ours(mode), Side::AwsLc(None));
        assert_eq!(client, [NamedGroup::X25519MLKEM768], "{mode}");
        assert_eq!(server, [NamedGroup::X25519MLKEM768], "{mode}");
    }
}

#[test]
fn quic_aws_lc_client_with_our_server() {
    let id = identity();
    for mode in [PqMode::Required, PqMode::Preferred] {
        let (client, server) = quic_echo(&id, Side::AwsLc(None), Side::Ours(mode));
        assert_eq!(client, [NamedGroup::X25519MLKEM768], "{mode}");
        assert_eq!(server, [NamedGroup::X25519MLKEM768], "{mode}");
    }
}

#[test]
fn quic_preferred_client_with_classical_server() {
    let id = identity();
    let (client, server) = quic_echo(&id, Side::Ours(PqMode::Preferred), Side::Ours(PqMode::Off));
    assert_eq!(client, [NamedGroup::X25519]);
    assert_eq!(server, [NamedGroup::X25519]);
}

/// Over QUIC, a classical-only client's connection to a `pq = "required"` server is closed
/// with the TLS handshake_failure alert as QUIC's CRYPTO_ERROR (0x100 + 40).
#[test]
fn quic_required_server_refuses_classical_client() {
    let id = identity();
    runtime().block_on(async {
        let server = quinn::Endpoint::server(
            quic::quinn_server_config(PqMode::Required, id.chain.clone(), id.key.clone_key())
                .unwrap(),
            LOOPBACK,
        )
        .unwrap();
        let addr = server.local_addr().unwrap();
        let serving = tokio::spawn(echo_once(server.clone()));
        let mut endpoint = quinn::Endpoint::client(LOOPBACK).unwrap();
        endpoint.set_default_client_config(
            quic::quinn_client_config_from(aws_client(
                &id,
                Some(vec![aws_lc_rs::kx_group::X25519]),
            ))
            .unwrap(),
        );
        let err = endpoint
            .connect(addr, "localhost")
            .unwrap()
            .await
            .expect_err("a classical client must not connect");
        match &err {
            quinn::ConnectionError::ConnectionClosed(close) => assert_eq!(
                close.error_code,
                quinn::TransportErrorCode::crypto(u8::from(AlertDescription::HandshakeFailure)),
                "{err}"
            ),
            other => panic!("expected a CRYPTO_ERROR close, got {other}"),
        }
        let served = serving.await.unwrap();
        assert!(
            served.is_err(),
            "the server must not complete the handshake"
        );
        server.close(0u32.into(), b"");
        endpoint.wait_idle().await;
    });
}

// ---------------------------------------------------------------------------------------------
// The front door: HTTP/3 and HTTPS listeners serving /healthz.

mod front_door {
    use std::{
        path::Path,
        process::{Child, Command, Stdio},
        time::{Duration, Instant},
    };

    use bytes::Buf as _;
    use cloudlet::quic::{
        backhaul::{BackhaulConfig, Origin, OriginTrust},
        front_door::{self, FrontDoor, FrontDoorConfig},
        metrics::FrontDoorMetrics,
    };
    use cloudlet_tests::daemon::{Running, TempDir, daemon_config};
    use prometheus_client::registry::Registry;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    fn config(dir: &Path, pq: PqMode) -> FrontDoorConfig {
        FrontDoorConfig {
            listen: LOOPBACK,
            pq,
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            self_signed: true,
            names: vec!["localhost".to_string()],
            backhaul: Vec::new(),
            client_ca: None,
        }
    }

    /// Roots trusting the certificate at `cert`.
    fn roots(cert: &Path) -> RootCertStore {
        use rustls::pki_types::{CertificateDer, pem::PemObject as _};
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(cert).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        roots
    }

    /// An aws-lc-rs client configuration: its default groups (the hybrid first) or `groups`.
    fn client(
        roots: RootCertStore,
        groups: Option<Vec<&'static dyn SupportedKxGroup>>,
        alpn: &[u8],
    ) -> rustls::ClientConfig {
        let mut config = rustls::ClientConfig::builder_with_provider(aws_provider(groups))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        config
    }

    /// `GET path` over HTTP/3; returns the status and the body.
    async fn get_h3(addr: SocketAddr, tls: rustls::ClientConfig, path: &str) -> (u16, String) {
        request_h3(addr, tls, http::Method::GET, path, &[]).await
    }

    /// `method path` with `body` over HTTP/3 on a new connection; returns the status and
    /// the body.
    async fn request_h3(
        addr: SocketAddr,
        tls: rustls::ClientConfig,
        method: http::Method,
        path: &str,
        body: &[u8],
    ) -> (u16, String) {
        let mut endpoint = quinn::Endpoint::client(LOOPBACK).unwrap();
        endpoint.set_default_client_config(quic::quinn_client_config_from(tls).unwrap());
        let conn = endpoint.connect(addr, "localhost").unwrap().await.unwrap();
        let (mut driver, mut send) = h3::client::new(h3_quinn::Connection::new(conn))
            .await
            .unwrap();
        let drive = tokio::spawn(async move { driver.wait_idle().await });
        let request = http::Request::builder()
            .method(method)
            .uri(format!("https://localhost{path}"))
            .body(())
            .unwrap();
        let mut stream = send.send_request(request).await.unwrap();
        if !body.is_empty() {
            stream
                .send_data(bytes::Bytes::copy_from_slice(body))
                .await
                .unwrap();
        }
        stream.finish().await.unwrap();
        let response = stream.recv_response().await.unwrap();
        let mut body = Vec::new();
        while let Some(mut chunk) = stream.recv_data().await.unwrap() {
            while chunk.has_remaining() {
                let part = chunk.chunk();
                body.extend_from_slice(part);
                let n = part.len();
                chunk.advance(n);
            }
        }
        drop(stream);
        drop(send);
        drive.abort();
        endpoint.close(0u32.into(), b"done");
        (response.status().as_u16(), String::from_utf8(body).unwrap())
    }

    /// `GET path` over HTTPS (HTTP/1.1); returns the response head and the body.
    async fn get_https(
        addr: SocketAddr,
        tls: rustls::ClientConfig,
        path: &str,
    ) -> std::io::Result<(String, String)> {
        https(
            addr,
            tls,
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"),
        )
        .await
    }

    /// Sends `request` (a whole HTTP/1.1 request) over HTTPS; returns the response head and
    /// the body.
    async fn https(
        addr: SocketAddr,
        tls: rustls::ClientConfig,
        request: String,
    ) -> std::io::Result<(String, String)> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
        let mut stream = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await?;
        stream.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
        Ok((head.to_string(), body.to_string()))
    }

    fn json(body: &str) -> serde_json::Value {
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{body:?}: {e}"))
    }

    /// Starts a front door on a free loopback port; returns its address and certificate.
    fn start(dir: &Path, pq: PqMode) -> (SocketAddr, RootCertStore, tokio::task::JoinHandle<()>) {
        start_with(dir, pq, Vec::new(), FrontDoorMetrics::default())
    }

    /// Starts a front door with backhaul routes, counting into `metrics`.
    fn start_with(
        dir: &Path,
        pq: PqMode,
        backhaul: Vec<BackhaulConfig>,
        metrics: FrontDoorMetrics,
    ) -> (SocketAddr, RootCertStore, tokio::task::JoinHandle<()>) {
        let mut config = config(dir, pq);
        config.backhaul = backhaul;
        let identity = front_door::load_or_generate(&config).unwrap();
        assert!(identity.generated);
        let door = FrontDoor::bind(&config, identity, metrics).unwrap();
        let addr = door.local_addr();
        assert_ne!(addr.port(), 0);
        (addr, roots(&config.cert), tokio::spawn(door.serve()))
    }

    #[test]
    fn healthz_over_h3_and_https_names_the_hybrid() {
        let dir = TempDir::new("quic", "required");
        runtime().block_on(async {
            let (addr, roots, serving) = start(&dir.0, PqMode::Required);

            let (status, body) =
                get_h3(addr, client(roots.clone(), None, quic::ALPN_H3), "/healthz").await;
            assert_eq!(status, 200, "{body}");
            let v = json(&body);
            assert_eq!(v["status"], "ok");
            assert_eq!(v["protocol"], "h3");
            assert_eq!(v["pq"], "required");
            assert_eq!(v["kx_group"], "X25519MLKEM768");
            let (status, _) =
                get_h3(addr, client(roots.clone(), None, quic::ALPN_H3), "/nope").await;
            assert_eq!(status, 404);

            let (head, body) =
                get_https(addr, client(roots.clone(), None, b"http/1.1"), "/healthz")
                    .await
                    .unwrap();
            assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
            // Header names are case-insensitive (hyper writes them in lower case).
            let alt_svc = format!("\r\nalt-svc: h3=\":{}\"", addr.port());
            assert!(head.to_ascii_lowercase().contains(&alt_svc), "{head}");
            let v = json(&body);
            assert_eq!(v["protocol"], "http/1.1");
            assert_eq!(v["kx_group"], "X25519MLKEM768");

            // A classical client is refused on both listeners.
            let classical = || {
                client(
                    roots.clone(),
                    Some(vec![aws_lc_rs::kx_group::X25519]),
                    b"http/1.1",
                )
            };
            let err = get_https(addr, classical(), "/healthz").await.unwrap_err();
            assert!(err.to_string().contains("HandshakeFailure"), "{err}");
            let mut endpoint = quinn::Endpoint::client(LOOPBACK).unwrap();
            let mut tls = classical();
            tls.alpn_protocols = vec![quic::ALPN_H3.to_vec()];
            endpoint.set_default_client_config(quic::quinn_client_config_from(tls).unwrap());
            let err = endpoint
                .connect(addr, "localhost")
                .unwrap()
                .await
                .expect_err("a classical client must not connect");
            assert!(
                matches!(&err, quinn::ConnectionError::ConnectionClosed(c)
                    if c.error_code == quinn::TransportErrorCode::crypto(40)),
                "{err}"
            );
            serving.abort();
        });
    }

    /// With `pq = "preferred"` each connection reports its own group.
    #[test]
    fn healthz_reports_each_connections_group() {
        let dir = TempDir::new("quic", "preferred");
        runtime().block_on(async {
            let (addr, roots, serving) = start(&dir.0, PqMode::Preferred);
            for (groups, expected) in [
                (None, "X25519MLKEM768"),
                (Some(vec![aws_lc_rs::kx_group::X25519]), "x25519"),
            ] {
                let (status, body) = get_h3(
                    addr,
                    client(roots.clone(), groups.clone(), quic::ALPN_H3),
                    "/healthz",
                )
                .await;
                assert_eq!(status, 200);
                assert_eq!(json(&body)["kx_group"], expected, "h3");
                let (_, body) =
                    get_https(addr, client(roots.clone(), groups, b"http/1.1"), "/healthz")
                        .await
                        .unwrap();
                assert_eq!(json(&body)["kx_group"], expected, "https");
                assert_eq!(json(&body)["pq"], "preferred");
            }
            serving.abort();
        });
    }

    /// HTTP/2 on the TCP listener (ALPN `h2`, chosen over `http/1.1`): two requests on one
    /// connection with the hybrid.
    #[test]
    fn healthz_over_h2() {
        use http_body_util::BodyExt as _;
        let dir = TempDir::new("quic", "h2");
        runtime().block_on(async {
            let metrics = FrontDoorMetrics::default();
            let mut registry = Registry::default();
            metrics.register(&mut registry);
            let (addr, roots, serving) = start_with(&dir.0, PqMode::Required, Vec::new(), metrics);
            let mut tls = client(roots, None, b"h2");
            tls.alpn_protocols.push(b"http/1.1".to_vec());
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
                .unwrap();
            assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
            let (mut send, connection) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                hyper_util::rt::TokioIo::new(stream),
            )
            .await
            .unwrap();
            let driver = tokio::spawn(connection);
            let mut ids = Vec::new();
            for _ in 0..2 {
                let request =
                    http::Request::get(format!("https://localhost:{}/healthz", addr.port()))
                        .body(http_body_util::Empty::<bytes::Bytes>::new())
                        .unwrap();
                let response = send.send_request(request).await.unwrap();
                assert_eq!(response.status(), 200);
                assert_eq!(response.version(), http::Version::HTTP_2);
                assert_eq!(
                    response.headers()[http::header::ALT_SVC],
                    format!("h3=\":{}\"; ma=86400", addr.port()).as_str()
                );
                let body = response.into_body().collect().await.unwrap().to_bytes();
                let v = json(std::str::from_utf8(&body).unwrap());
                assert_eq!(v["protocol"], "h2");
                assert_eq!(v["kx_group"], "X25519MLKEM768");
                ids.push(v["connection"].as_u64().unwrap());
            }
            assert_eq!(ids[0], ids[1], "both requests on one HTTP/2 connection");
            assert_eq!(sample(&registry, &hybrid_handshakes("h2")), Some(1.0));
            drop(send);
            driver.abort();
            serving.abort();
        });
    }

    #[test]
    fn example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/front-door.toml");
        let config = cloudlet::config::Config::load(&path).unwrap();
        assert_eq!(config.policy, None);
        assert!(config.interfaces.is_empty());
        let fd = config.front_door.unwrap();
        assert_eq!(fd.listen, "127.0.0.1:4433".parse().unwrap());
        assert_eq!(fd.pq, PqMode::Required);
        assert!(fd.self_signed);
    }

    /// cloudletd with only a front door (no policy, no interfaces, not root-only paths):
    /// generates its certificate, logs the SPKI hash, answers on both listeners, and keeps
    /// the certificate across a restart.
    #[test]
    fn cloudletd_runs_a_front_door_without_a_policy() {
        let dir = TempDir::new("quic", "daemon");
        let config = dir.0.join("cloudlet.toml");
        std::fs::write(&config, daemon_config("pq = \"required\"\n")).unwrap();
        let mut hashes = Vec::new();
        for round in 0..2 {
            let mut run = Running::start(&config);
            let (addr, hash) = (run.addr, run.hash.clone());
            assert_eq!(
                run.log
                    .iter()
                    .any(|l| l.contains("generated a self-signed certificate")),
                round == 0,
                "{:?}",
                run.log
            );
            let cert = dir.0.join("tls/cert.pem");
            let der = {
                use rustls::pki_types::{CertificateDer, pem::PemObject as _};
                CertificateDer::from_pem_file(&cert).unwrap()
            };
            assert_eq!(hash, front_door::spki_sha256_base64(&der).unwrap());
            hashes.push(hash);

            let roots = roots(&cert);
            runtime().block_on(async {
                let (status, body) =
                    get_h3(addr, client(roots.clone(), None, quic::ALPN_H3), "/healthz").await;
                assert_eq!(status, 200);
                assert_eq!(json(&body)["kx_group"], "X25519MLKEM768");
                let (head, body) =
                    get_https(addr, client(roots.clone(), None, b"http/1.1"), "/healthz")
                        .await
                        .unwrap();
                assert!(
                    head.to_ascii_lowercase()
                        .contains(&format!("alt-svc: h3=\":{}\"", addr.port())),
                    "{head}"
                );
                assert_eq!(json(&body)["kx_group"], "X25519MLKEM768");
            });

            // One access-log line per connection, with its group.
            let access = run.access_lines(&["h3 ", "http/1.1 "]);
            for line in &access {
                assert!(line.contains(" group=X25519MLKEM768 "), "{line}");
                assert!(line.contains(" requests=1 "), "{line}");
            }

            // The admin endpoint runs without a dataplane and says so.
            let admin = dir.0.join("admin.sock");
            let metrics = cloudlet::admin::get(&admin, "/metrics").unwrap();
            for protocol in ["h3", "http/1.1"] {
                let series = format!("{} 1", hybrid_handshakes(protocol));
                assert!(metrics.contains(&series), "{series} missing:\n{metrics}");
            }
            assert!(cloudlet::admin::get(&admin, "/healthz").is_ok());
            match cloudlet::admin::get(&admin, "/stats") {
                Err(cloudlet::admin::AdminError::Status { status: 503, body }) => {
                    assert!(body.contains("no dataplane"), "{body}")
                }
                other => panic!("expected 503 from /stats, got {other:?}"),
            }

            // SIGTERM: a clean exit.
            // SAFETY: kill has no memory preconditions; the pid is our child's.
            assert_eq!(
                unsafe { libc::kill(run.daemon.0.id() as i32, libc::SIGTERM) },
                0
            );
            let status = run.daemon.0.wait().unwrap();
            assert!(status.success(), "{status}");
        }
        assert_eq!(
            hashes[0], hashes[1],
            "the certificate must survive a restart"
        );
    }

    /// The value of `series` (name and labels as encoded) in `registry`.
    fn sample(registry: &Registry, series: &str) -> Option<f64> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    fn hybrid_handshakes(protocol: &str) -> String {
        format!(
            "cloudlet_front_door_handshakes_total{{protocol=\"{protocol}\",group=\"X25519MLKEM768\"}}"
        )
    }

    /// A plain HTTP/3 origin (`pq = "required"`): `/echo` answers 201 with the request's
    /// method, path, body and `x-forwarded-for`; `/stall` never answers.
    fn test_origin() -> (
        SocketAddr,
        rustls::pki_types::CertificateDer<'static>,
        tokio::task::JoinHandle<()>,
    ) {
        let id = quic::self_signed(&["localhost"]).unwrap();
        let config =
            quic::quinn_server_config(PqMode::Required, vec![id.cert.clone()], id.key).unwrap();
        let endpoint = quinn::Endpoint::server(config, LOOPBACK).unwrap();
        let addr = endpoint.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    let Ok(mut h3) = h3::server::Connection::<_, bytes::Bytes>::new(
                        h3_quinn::Connection::new(conn),
                    )
                    .await
                    else {
                        return;
                    };
                    while let Ok(Some(resolver)) = h3.accept().await {
                        tokio::spawn(async move {
                            let (request, mut stream) = resolver.resolve_request().await.unwrap();
                            if request.uri().path() == "/stall" {
                                std::future::pending::<()>().await;
                            }
                            let mut body = Vec::new();
                            while let Some(mut chunk) = stream.recv_data().await.unwrap() {
                                while chunk.has_remaining() {
                                    let part = chunk.chunk();
                                    body.extend_from_slice(part);
                                    let n = part.len();
                                    chunk.advance(n);
                                }
                            }
                            let answer = serde_json::json!({
                                "method": request.method().as_str(),
                                "path": request.uri().path(),
                                "body": String::from_utf8_lossy(&body),
                                "forwarded_for": request
                                    .headers()
                                    .get("x-forwarded-for")
                                    .and_then(|v| v.to_str().ok()),
                            });
                            let response = http::Response::builder().status(201).body(()).unwrap();
                            stream.send_response(response).await.unwrap();
                            stream
                                .send_data(bytes::Bytes::from(answer.to_string()))
                                .await
                                .unwrap();
                            stream.finish().await.unwrap();
                        });
                    }
                });
            }
        });
        (addr, id.cert, task)
    }

    /// A backhaul route with the prefix stripped and 5-second timeouts.
    fn route(prefix: &str, origin: String, trust: OriginTrust) -> BackhaulConfig {
        BackhaulConfig {
            prefix: prefix.to_string(),
            origin: Origin::parse(&origin).unwrap(),
            trust,
            server_name: Some("localhost".to_string()),
            strip_prefix: true,
            pq: PqMode::Required,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
        }
    }

    /// Front door A backhauls to front door B (over HTTP/3 and HTTPS) and to a plain test
    /// origin: B's own record shows the hybrid on A's connection and one connection for
    /// several requests; a dead origin gives 502 and a stalled one 504 in time.
    #[test]
    fn backhaul_through_two_front_doors() {
        let (dir_a, dir_b) = (
            TempDir::new("quic", "backhaul-a"),
            TempDir::new("quic", "backhaul-b"),
        );
        runtime().block_on(async {
            let metrics_b = FrontDoorMetrics::default();
            let mut registry_b = Registry::default();
            metrics_b.register(&mut registry_b);
            let (b, _, serving_b) = start_with(&dir_b.0, PqMode::Required, Vec::new(), metrics_b);
            let (origin, origin_cert, serving_origin) = test_origin();
            let b_ca = OriginTrust::Ca(dir_b.0.join("cert.pem"));
            let dead_udp = std::net::UdpSocket::bind(LOOPBACK)
                .unwrap()
                .local_addr()
                .unwrap();
            let dead_tcp = std::net::TcpListener::bind(LOOPBACK)
                .unwrap()
                .local_addr()
                .unwrap();
            let mut to_origin = route(
                "/origin/",
                format!("h3://{origin}"),
                OriginTrust::Spki(front_door::spki_sha256_base64(&origin_cert).unwrap()),
            );
            to_origin.request_timeout = Duration::from_millis(700);
            let mut dead = route("/dead/", format!("h3://{dead_udp}"), b_ca.clone());
            dead.connect_timeout = Duration::from_millis(600);
            let routes = vec![
                route("/b/", format!("h3://{b}"), b_ca.clone()),
                route("/b-tcp/", format!("https://{b}"), b_ca.clone()),
                to_origin,
                dead,
                route("/dead-tcp/", format!("https://{dead_tcp}"), b_ca),
            ];
            let metrics_a = FrontDoorMetrics::default();
            let mut registry_a = Registry::default();
            metrics_a.register(&mut registry_a);
            let (a, roots_a, serving_a) = start_with(&dir_a.0, PqMode::Required, routes, metrics_a);
            let client = || client(roots_a.clone(), None, quic::ALPN_H3);

            // Two clients of A: both requests reach B over A's one hybrid connection.
            for (prefix, protocol) in [("/b/", "h3"), ("/b-tcp/", "http/1.1")] {
                let mut connections = Vec::new();
                for _ in 0..2 {
                    let (status, body) = get_h3(a, client(), &format!("{prefix}healthz")).await;
                    assert_eq!(status, 200, "{prefix}: {body}");
                    let v = json(&body);
                    assert_eq!(v["protocol"], protocol, "{body}");
                    assert_eq!(v["kx_group"], "X25519MLKEM768", "{body}");
                    assert_eq!(v["pq"], "required", "{body}");
                    connections.push(v["connection"].as_u64().unwrap());
                }
                assert_eq!(
                    connections[0], connections[1],
                    "{prefix}: A must reuse its connection to B"
                );
            }
            assert_eq!(sample(&registry_b, &hybrid_handshakes("h3")), Some(1.0));
            assert_eq!(sample(&registry_b, &hybrid_handshakes("http/1.1")), Some(1.0));
            assert_eq!(sample(&registry_a, &hybrid_handshakes("h3")), Some(4.0));
            for scheme in ["h3", "https"] {
                let series = format!(
                    "cloudlet_front_door_origin_connections_total{{origin=\"{scheme}://{b}\",group=\"X25519MLKEM768\"}}"
                );
                assert_eq!(sample(&registry_a, &series), Some(1.0), "{series}");
            }

            // Method, body, the client's address and the origin's status pass through.
            let (status, body) =
                request_h3(a, client(), http::Method::POST, "/origin/echo", b"ping").await;
            assert_eq!(status, 201, "{body}");
            let v = json(&body);
            assert_eq!(v["method"], "POST");
            assert_eq!(v["path"], "/echo");
            assert_eq!(v["body"], "ping");
            assert_eq!(v["forwarded_for"], "127.0.0.1");

            // A stalled origin: 504 once the request timeout has passed.
            let started = Instant::now();
            let (status, body) = get_h3(a, client(), "/origin/stall").await;
            let took = started.elapsed();
            assert_eq!(status, 504, "{body}");
            let error = json(&body)["error"].as_str().unwrap().to_string();
            assert!(error.contains("did not answer within 700 ms"), "{error}");
            assert!(
                took >= Duration::from_millis(700) && took < Duration::from_millis(2500),
                "{took:?}"
            );

            // Dead origins: 502, over QUIC within the connect timeout, over TCP at once.
            for (path, connect_timeout) in [
                ("/dead/x", Duration::from_millis(600)),
                ("/dead-tcp/x", Duration::from_secs(5)),
            ] {
                let started = Instant::now();
                let (status, body) = get_h3(a, client(), path).await;
                let took = started.elapsed();
                assert_eq!(status, 502, "{path}: {body}");
                let error = json(&body)["error"].as_str().unwrap().to_string();
                assert!(error.starts_with("cannot connect to "), "{error}");
                assert!(
                    took < connect_timeout + Duration::from_millis(1500),
                    "{path}: {took:?}"
                );
            }

            // The origin's connection outlived the stalled request.
            let (status, _) = get_h3(a, client(), "/origin/echo").await;
            assert_eq!(status, 201);
            let series = format!(
                "cloudlet_front_door_origin_connections_total{{origin=\"h3://{origin}\",group=\"X25519MLKEM768\"}}"
            );
            assert_eq!(sample(&registry_a, &series), Some(1.0), "{series}");
            for (prefix, status, count) in [
                ("/b/", 200, 2.0),
                ("/origin/", 201, 2.0),
                ("/origin/", 504, 1.0),
                ("/dead/", 502, 1.0),
                ("/dead-tcp/", 502, 1.0),
            ] {
                let series = format!(
                    "cloudlet_front_door_backhaul_requests_total{{prefix=\"{prefix}\",status=\"{status}\"}}"
                );
                assert_eq!(sample(&registry_a, &series), Some(count), "{series}");
            }
            serving_a.abort();
            serving_b.abort();
            serving_origin.abort();
        });
    }

    /// Handshakes by group, failures by reason, open connections and bytes move.
    #[test]
    fn metrics_count_handshakes_failures_and_bytes() {
        let dir = TempDir::new("quic", "metrics");
        runtime().block_on(async {
            let metrics = FrontDoorMetrics::default();
            let mut registry = Registry::default();
            metrics.register(&mut registry);
            let (addr, roots, serving) = start_with(&dir.0, PqMode::Required, Vec::new(), metrics);
            assert_eq!(sample(&registry, &hybrid_handshakes("h3")), None);

            let (status, _) =
                get_h3(addr, client(roots.clone(), None, quic::ALPN_H3), "/healthz").await;
            assert_eq!(status, 200);
            let (head, _) = get_https(addr, client(roots.clone(), None, b"http/1.1"), "/healthz")
                .await
                .unwrap();
            assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");

            let classical = |alpn: &[u8]| {
                client(
                    roots.clone(),
                    Some(vec![aws_lc_rs::kx_group::X25519]),
                    alpn,
                )
            };
            get_https(addr, classical(b"http/1.1"), "/healthz")
                .await
                .unwrap_err();
            let mut endpoint = quinn::Endpoint::client(LOOPBACK).unwrap();
            endpoint.set_default_client_config(
                quic::quinn_client_config_from(classical(quic::ALPN_H3)).unwrap(),
            );
            endpoint
                .connect(addr, "localhost")
                .unwrap()
                .await
                .expect_err("a classical client must not connect");

            // Connections are counted as closed once the server has seen them end.
            let deadline = Instant::now() + Duration::from_secs(10);
            let open = |t: &str| {
                sample(
                    &registry,
                    &format!("cloudlet_front_door_active_connections{{transport=\"{t}\"}}"),
                )
            };
            while open("quic") != Some(0.0) || open("tls") != Some(0.0) {
                assert!(
                    Instant::now() < deadline,
                    "connections still open: quic {:?}, tls {:?}",
                    open("quic"),
                    open("tls")
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(sample(&registry, &hybrid_handshakes("h3")), Some(1.0));
            assert_eq!(sample(&registry, &hybrid_handshakes("http/1.1")), Some(1.0));
            for transport in ["quic", "tls"] {
                let series = format!(
                    "cloudlet_front_door_handshake_failures_total{{transport=\"{transport}\",reason=\"no_shared_group\"}}"
                );
                assert_eq!(sample(&registry, &series), Some(1.0), "{series}");
                for direction in ["received", "sent"] {
                    let series = format!(
                        "cloudlet_front_door_{direction}_bytes_total{{transport=\"{transport}\"}}"
                    );
                    // At least a ClientHello with a 1216-byte key share, or a certificate.
                    let bytes = sample(&registry, &series).unwrap_or(0.0);
                    assert!(bytes > 1000.0, "{series} = {bytes}");
                }
            }
            serving.abort();
        });
    }

    /// A browser process group, killed on drop (Chromium starts helper processes).
    struct Browser(Child);

    impl Drop for Browser {
        fn drop(&mut self) {
            // SAFETY: kill has no memory preconditions; the group is the one our child leads.
            unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
            let _ = self.0.wait();
        }
    }

    /// Chromium, an independent HTTP/3 client, fetches `/healthz` from cloudletd's front
    /// door over QUIC (forced for the origin, certificate pinned by its SPKI hash): the page
    /// it dumps, the access log and the metrics all say HTTP/3 with X25519MLKEM768.
    #[test]
    fn chromium_fetches_healthz_over_h3_with_the_hybrid() {
        use std::os::unix::process::CommandExt as _;
        let dir = TempDir::new("quic", "chromium");
        let config = dir.0.join("cloudlet.toml");
        std::fs::write(
            &config,
            daemon_config("pq = \"required\"\nnames = [\"localhost\", \"127.0.0.1\"]\n"),
        )
        .unwrap();
        let mut run = Running::start(&config);
        let origin = format!("127.0.0.1:{}", run.addr.port());
        let chromium = std::env::var_os("CHROMIUM").unwrap_or_else(|| "chromium".into());
        let spawned = Command::new(&chromium)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--enable-quic",
            ])
            .arg(format!("--user-data-dir={}", dir.0.join("profile").display()))
            .arg(format!("--origin-to-force-quic-on={origin}"))
            .arg(format!("--ignore-certificate-errors-spki-list={}", run.hash))
            .arg("--dump-dom")
            .arg(format!("https://{origin}/healthz"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {}: {e} (`cargo xtask setup` installs Debian's chromium; CHROMIUM names another)",
                    Path::new(&chromium).display()
                )
            });
        let mut browser = Browser(spawned);
        let mut stdout = browser.0.stdout.take().unwrap();
        let mut stderr = browser.0.stderr.take().unwrap();
        let out = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
            s
        });
        let err = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
            s
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = browser.0.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "chromium did not finish within 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        drop(browser);
        let (dom, stderr) = (out.join().unwrap(), err.join().unwrap());
        assert!(status.success(), "chromium: {status}\n{stderr}");

        // The page Chromium received: the front door's own record of the connection.
        let page = dom
            .split_once("<pre")
            .and_then(|(_, rest)| rest.split_once('>'))
            .and_then(|(_, rest)| rest.split_once("</pre>"))
            .map(|(json, _)| json)
            .unwrap_or_else(|| panic!("no JSON in the dumped page:\n{dom}\n{stderr}"));
        let v = json(page);
        assert_eq!(v["protocol"], "h3", "{page}");
        assert_eq!(v["kx_group"], "X25519MLKEM768", "{page}");

        let access = run.access_lines(&["h3 "]);
        assert!(
            access
                .iter()
                .any(|l| l.contains("] h3 127.0.0.1:") && l.contains(" group=X25519MLKEM768 ")),
            "{access:?}"
        );
        let metrics = cloudlet::admin::get(&dir.0.join("admin.sock"), "/metrics").unwrap();
        let series = format!("{} ", hybrid_handshakes("h3"));
        assert!(metrics.contains(&series), "{series} missing:\n{metrics}");
        assert!(
            !metrics.contains(&hybrid_handshakes("http/1.1")),
            "Chromium was forced onto QUIC, yet a TCP connection was made:\n{metrics}"
        );
    }

    /// `POST path` with a JSON `body` over HTTPS (HTTP/1.1); returns the response head and
    /// body.
    async fn post_https(
        addr: SocketAddr,
        tls: rustls::ClientConfig,
        path: &str,
        body: &str,
    ) -> std::io::Result<(String, String)> {
        https(
            addr,
            tls,
            format!(
                "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
        )
        .await
    }

    fn status(head: &str) -> u16 {
        head.split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    /// The golden embeddings of the reference (`scripts/golden_embeddings.py`).
    fn golden() -> Vec<(String, Vec<f32>)> {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/minilm-golden.json");
        let v = json(&std::fs::read_to_string(path).unwrap());
        v["cases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["text"].as_str().unwrap().to_string(),
                    c["embedding"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_f64().unwrap() as f32)
                        .collect(),
                )
            })
            .collect()
    }

    fn vector(v: &serde_json::Value) -> Vec<f32> {
        v.as_array()
            .unwrap_or_else(|| panic!("not an array: {v}"))
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    }

    /// cloudletd's `POST /v1/embeddings` over HTTP/3 and HTTPS: the reference's embeddings,
    /// OpenAI-style answers and errors, truncation said, a full queue answered 503 with
    /// `Retry-After`, and the compute metrics.
    #[test]
    fn cloudletd_serves_embeddings() {
        let dir = TempDir::new("quic", "embeddings");
        let config = dir.0.join("cloudlet.toml");
        let model = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(cloudlet::compute::DEFAULT_MODEL_DIR);
        std::fs::write(
            &config,
            daemon_config(&format!(
                "\n[compute]\nmodel = {:?}\nmax_batch = 4\nmax_wait_ms = 10\nqueue = 8\nmax_inputs = 8\nmax_body = 65536\n",
                model.display().to_string()
            )),
        )
        .unwrap();
        let run = Running::start(&config);
        assert!(
            run.log.iter().any(|l| l.contains("on the cpu backend")),
            "{:?}",
            run.log
        );
        let addr = run.addr;
        let roots = roots(&dir.0.join("tls/cert.pem"));
        let h3 = || client(roots.clone(), None, quic::ALPN_H3);
        let https = || client(roots.clone(), None, b"http/1.1");
        let cases = golden();
        runtime().block_on(async {
            // A list over HTTP/3.
            let body = serde_json::json!({
                "input": [cases[0].0, cases[4].0],
                "model": "all-MiniLM-L6-v2",
            })
            .to_string();
            let (code, answer) =
                request_h3(addr, h3(), http::Method::POST, "/v1/embeddings", body.as_bytes()).await;
            assert_eq!(code, 200, "{answer}");
            let v = json(&answer);
            assert_eq!(v["object"], "list");
            assert_eq!(v["model"], "all-MiniLM-L6-v2");
            let data = v["data"].as_array().unwrap();
            assert_eq!(data.len(), 2);
            for (i, want) in [0, 4].into_iter().enumerate() {
                assert_eq!(data[i]["index"], i);
                assert_eq!(data[i]["object"], "embedding");
                let sim = cloudlet::compute::cosine(&vector(&data[i]["embedding"]), &cases[want].1);
                assert!(sim >= 0.9999, "input {i}: cosine {sim}");
            }
            let tokens = v["usage"]["prompt_tokens"].as_u64().unwrap();
            assert!(tokens >= 20, "{v}");
            assert_eq!(v["usage"]["total_tokens"].as_u64(), Some(tokens));
            assert!(v.get("truncated").is_none());

            // A string over HTTPS, as base64; and an input past 256 tokens, said.
            let long = cases
                .iter()
                .find(|c| c.0.len() > 1500)
                .expect("a long fixture");
            let body = serde_json::json!({
                "input": long.0, "model": "sentence-transformers/all-MiniLM-L6-v2",
                "encoding_format": "base64",
            })
            .to_string();
            let (head, answer) = post_https(addr, https(), "/v1/embeddings", &body).await.unwrap();
            assert_eq!(status(&head), 200, "{head}\n{answer}");
            assert!(
                head.to_ascii_lowercase().contains("cloudlet-truncated-inputs: 0"),
                "{head}"
            );
            let v = json(&answer);
            assert_eq!(v["truncated"]["inputs"], serde_json::json!([0]));
            assert_eq!(v["truncated"]["max_tokens"], 256);
            assert_eq!(v["usage"]["prompt_tokens"], 256);
            use base64::Engine as _;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(v["data"][0]["embedding"].as_str().unwrap())
                .unwrap();
            let got: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            assert!(cloudlet::compute::cosine(&got, &long.1) >= 0.9999);

            // Bad requests: OpenAI-style errors with the right status.
            let nine: Vec<&str> = vec!["x"; 9];
            for (body, code, param) in [
                ("{\"input\": [], \"model\": \"all-MiniLM-L6-v2\"}".to_string(), 400, "input"),
                ("{\"input\": [\"a\", 7], \"model\": \"all-MiniLM-L6-v2\"}".to_string(), 400, "input"),
                ("{\"input\": {\"a\": 1}, \"model\": \"all-MiniLM-L6-v2\"}".to_string(), 400, "input"),
                (serde_json::json!({"input": nine, "model": "all-MiniLM-L6-v2"}).to_string(), 400, "input"),
                ("{\"input\": \"a\"}".to_string(), 400, "model"),
                ("{\"input\": \"a\", \"model\": \"gpt-4\"}".to_string(), 404, "model"),
                ("{\"input\": \"a\", \"model\": \"all-MiniLM-L6-v2\", \"encoding_format\": \"hex\"}".to_string(), 400, "encoding_format"),
                ("{not json".to_string(), 400, "body"),
                (format!("{{\"input\": \"{}\", \"model\": \"all-MiniLM-L6-v2\"}}", "a".repeat(70_000)), 413, ""),
            ] {
                let (head, answer) = post_https(addr, https(), "/v1/embeddings", &body).await.unwrap();
                assert_eq!(status(&head), code, "{body:.80}: {head}\n{answer}");
                let v = json(&answer);
                assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{answer}");
                assert_eq!(v["error"]["type"], "invalid_request_error", "{answer}");
                if !param.is_empty() {
                    assert_eq!(v["error"]["param"], param, "{answer}");
                }
            }
            let (head, _) = get_https(addr, https(), "/v1/embeddings").await.unwrap();
            assert_eq!(status(&head), 405, "{head}");

            // More than the queue holds at once: some are refused with Retry-After, the
            // others answered; none is lost.
            let eight: Vec<&str> = vec![long.0.as_str(); 8];
            let body = serde_json::json!({ "input": eight, "model": "all-MiniLM-L6-v2" }).to_string();
            let tasks: Vec<_> = (0..8)
                .map(|_| {
                    let (tls, body) = (https(), body.clone());
                    tokio::spawn(async move { post_https(addr, tls, "/v1/embeddings", &body).await })
                })
                .collect();
            let (mut ok, mut busy) = (0, 0);
            for t in tasks {
                let (head, answer) = t.await.unwrap().unwrap();
                match status(&head) {
                    200 => {
                        assert_eq!(json(&answer)["data"].as_array().unwrap().len(), 8);
                        ok += 1;
                    }
                    503 => {
                        assert!(head.to_ascii_lowercase().contains("retry-after: 1"), "{head}");
                        assert_eq!(json(&answer)["error"]["code"], "overloaded");
                        busy += 1;
                    }
                    other => panic!("status {other}: {head}\n{answer}"),
                }
            }
            assert_eq!(ok + busy, 8);
            assert!(ok >= 1 && busy >= 1, "{ok} answered, {busy} refused");
        });
        let metrics = cloudlet::admin::get(&dir.0.join("admin.sock"), "/metrics").unwrap();
        for series in [
            "cloudlet_compute_backend{backend=\"cpu\"} 1",
            "cloudlet_compute_rejected_total{backend=\"cpu\"} ",
            "cloudlet_compute_inputs_total{backend=\"cpu\"} ",
        ] {
            assert!(metrics.contains(series), "{series} missing:\n{metrics}");
        }
        drop(run);
    }
}
