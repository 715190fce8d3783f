//! Backhaul: the front door proxies requests whose path starts with a configured prefix to an
//! origin, over HTTP/3 (`h3://host:port`) or HTTPS with HTTP/1.1 (`https://host:port`), with
//! the key exchange groups of the route's [`PqMode`] on the client side.
//!
//! Connections to an origin are kept and reused: one QUIC connection per HTTP/3 origin
//! (requests are streams on it), idle HTTP/1.1 connections for an HTTPS origin. The origin's
//! certificate is checked against a CA file or pinned by the SHA-256 of its
//! SubjectPublicKeyInfo. A request never waits on an origin longer than the route's connect
//! timeout plus its request timeout: an origin that cannot be reached or answers nonsense
//! gets the client a `502`, one that does not answer in time a `504`, each with a JSON body
//! saying what went wrong.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::{BufMut as _, Bytes, BytesMut};
use http_body_util::BodyExt as _;
use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::WebPkiSupportedAlgorithms,
    pki_types::{CertificateDer, ServerName, UnixTime},
};
use sha2::{Digest as _, Sha256};

use super::{PqMode, QuicError, front_door::group_name, metrics::FrontDoorMetrics};

/// Default time to resolve, connect to and complete a TLS handshake with an origin.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time from having a connection to having the origin's whole response.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest request or response body carried (bodies are buffered whole).
pub const MAX_BODY: usize = 8 << 20;
/// Most idle HTTP/1.1 connections kept per HTTPS origin.
const MAX_IDLE_HTTPS: usize = 16;

/// How the front door talks to an origin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// HTTP/3 over QUIC.
    H3,
    /// HTTP/1.1 over TLS over TCP.
    Https,
}

/// An origin's scheme, host and port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    /// HTTP/3 or HTTPS.
    pub scheme: Scheme,
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// Port (default 443).
    pub port: u16,
}

impl Origin {
    /// Parses `h3://host[:port]` or `https://host[:port]` (a trailing `/` is allowed,
    /// nothing else after the authority).
    pub fn parse(s: &str) -> Result<Self, String> {
        let (scheme, rest) = if let Some(rest) = s.strip_prefix("h3://") {
            (Scheme::H3, rest)
        } else if let Some(rest) = s.strip_prefix("https://") {
            (Scheme::Https, rest)
        } else {
            return Err(format!(
                "origin {s:?}: expected h3://host:port or https://host:port"
            ));
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        let parsed: http::uri::Authority = authority
            .parse()
            .map_err(|e| format!("origin {s:?}: {e}"))?;
        let port_given = !authority[parsed.host().len()..].is_empty();
        if authority.contains('@')
            || authority.contains('/')
            || parsed.host().is_empty()
            || (port_given && parsed.port_u16().is_none())
        {
            return Err(format!("origin {s:?}: expected only a host and a port"));
        }
        let host = parsed.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        Ok(Self {
            scheme,
            host: host.to_string(),
            port: parsed.port_u16().unwrap_or(443),
        })
    }

    /// `host:port`, with brackets around an IPv6 address.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = match self.scheme {
            Scheme::H3 => "h3",
            Scheme::Https => "https",
        };
        write!(f, "{scheme}://{}", self.authority())
    }
}

/// How an origin's certificate is checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OriginTrust {
    /// A chain to one of the certificates in this PEM file, valid for the server name.
    Ca(PathBuf),
    /// An end-entity certificate whose SubjectPublicKeyInfo has this SHA-256 (base64, as
    /// the front door logs it); names and dates are not checked, as with Chromium's
    /// `--ignore-certificate-errors-spki-list`.
    Spki(String),
}

/// One `[[front_door.backhaul]]` route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackhaulConfig {
    /// Requests whose path starts with this are proxied (the longest matching prefix wins).
    pub prefix: String,
    /// Where to.
    pub origin: Origin,
    /// How the origin's certificate is checked.
    pub trust: OriginTrust,
    /// The name sent in SNI and checked against the certificate (default: the origin's host).
    pub server_name: Option<String>,
    /// Remove the prefix from the path sent to the origin (keeping a leading `/`).
    pub strip_prefix: bool,
    /// Key exchange groups offered to the origin.
    pub pq: PqMode,
    /// Time to resolve, connect and complete the handshake.
    pub connect_timeout: Duration,
    /// Time from having a connection to having the whole response.
    pub request_timeout: Duration,
}

/// Errors from setting up backhaul routes.
#[derive(Debug, thiserror::Error)]
pub enum BackhaulSetupError {
    /// The CA file could not be read or holds no certificate.
    #[error("backhaul {prefix}: CA file {path}: {message}")]
    Ca {
        prefix: String,
        path: PathBuf,
        message: String,
    },
    /// The pinned SPKI hash is not base64 of 32 bytes.
    #[error("backhaul {prefix}: `spki_sha256` {pin:?} is not the base64 of a SHA-256")]
    Pin { prefix: String, pin: String },
    /// The server name is not a DNS name or IP address.
    #[error("backhaul {prefix}: invalid server name {name:?}")]
    ServerName { prefix: String, name: String },
    /// The TLS or QUIC client configuration could not be built.
    #[error("backhaul {prefix}: {source}")]
    Config {
        prefix: String,
        #[source]
        source: QuicError,
    },
}

/// Why a proxied request failed; each maps to the status the client gets.
#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    /// The origin's name did not resolve.
    #[error("cannot resolve {origin}: {message}")]
    Resolve { origin: String, message: String },
    /// No connection could be made (refused, unreachable, handshake failed, or the
    /// connect timeout passed).
    #[error("cannot connect to {origin}: {message}")]
    Connect { origin: String, message: String },
    /// The connection broke or the origin's response was not valid HTTP.
    #[error("bad response from {origin}: {message}")]
    BadResponse { origin: String, message: String },
    /// The response body exceeded [`MAX_BODY`].
    #[error("response from {origin} exceeds {MAX_BODY} bytes")]
    TooLarge { origin: String },
    /// The whole response did not arrive within the request timeout.
    #[error("{origin} did not answer within {} ms", timeout.as_millis())]
    Timeout { origin: String, timeout: Duration },
}

impl OriginError {
    /// The HTTP status the client gets: 504 for a timeout, 502 otherwise.
    pub fn status(&self) -> u16 {
        match self {
            Self::Timeout { .. } => 504,
            _ => 502,
        }
    }
}

/// Pins an end-entity certificate by the SHA-256 of its SubjectPublicKeyInfo, and checks
/// handshake signatures against its key.
#[derive(Debug)]
struct PinnedSpki {
    sha256: [u8; 32],
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedSpki {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        let digest = Sha256::digest(parsed.subject_public_key_info().as_ref());
        if digest.as_slice() == self.sha256 {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The rustls client configuration of a route, offering `alpn`.
fn tls_config(
    config: &BackhaulConfig,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, BackhaulSetupError> {
    let prefix = || config.prefix.clone();
    let wrap = |source: QuicError| BackhaulSetupError::Config {
        prefix: prefix(),
        source,
    };
    match &config.trust {
        OriginTrust::Ca(path) => {
            let ca_err = |message: String| BackhaulSetupError::Ca {
                prefix: prefix(),
                path: path.clone(),
                message,
            };
            let roots = super::roots_from_pem(path).map_err(ca_err)?;
            super::client_config(config.pq, roots, &[alpn]).map_err(wrap)
        }
        OriginTrust::Spki(pin) => {
            use base64::Engine as _;
            let sha256 = base64::engine::general_purpose::STANDARD
                .decode(pin)
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| BackhaulSetupError::Pin {
                    prefix: prefix(),
                    pin: pin.clone(),
                })?;
            let provider = Arc::new(super::crypto_provider(config.pq));
            let verifier = PinnedSpki {
                sha256,
                algorithms: provider.signature_verification_algorithms,
            };
            let mut tls = rustls::ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(|e| wrap(e.into()))?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth();
            tls.alpn_protocols = vec![alpn.to_vec()];
            Ok(tls)
        }
    }
}

/// Headers that describe one connection, not the message: never forwarded (RFC 9110
/// section 7.6.1; HTTP/3 forbids them outright).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
    "host",
    "content-length",
];

/// Copies `from` without hop-by-hop headers.
fn end_to_end(from: &http::HeaderMap) -> http::HeaderMap {
    let mut to = http::HeaderMap::with_capacity(from.len());
    for (name, value) in from {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            to.append(name.clone(), value.clone());
        }
    }
    to
}

/// Aborts a task when dropped.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends HTTP/3 requests on a connection.
type H3Send = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;
/// Sends HTTP/1.1 requests on a connection.
type HttpsSend = hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>;

/// A QUIC connection to an HTTP/3 origin, with its h3 request handle.
struct H3Connection {
    conn: quinn::Connection,
    send: H3Send,
    _endpoint: quinn::Endpoint,
    _driver: AbortOnDrop,
}

/// Kept connections of one route.
enum Pool {
    H3 {
        tls: quinn::ClientConfig,
        conn: Box<tokio::sync::Mutex<Option<H3Connection>>>,
    },
    Https {
        tls: tokio_rustls::TlsConnector,
        idle: Mutex<Vec<HttpsSend>>,
    },
}

/// One backhaul route, ready to forward requests.
pub struct Route {
    config: BackhaulConfig,
    origin_name: String,
    server_name: ServerName<'static>,
    pool: Pool,
    metrics: FrontDoorMetrics,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route")
            .field("prefix", &self.config.prefix)
            .field("origin", &self.origin_name)
            .finish_non_exhaustive()
    }
}

/// The backhaul routes of a front door.
#[derive(Debug, Default)]
pub struct Backhaul {
    /// Longest prefix first.
    routes: Vec<Route>,
}

impl Backhaul {
    /// Prepares `configs` (reads CA files, builds the TLS configurations; connects to
    /// nothing yet), counting into `metrics`.
    pub fn new(
        configs: &[BackhaulConfig],
        metrics: &FrontDoorMetrics,
    ) -> Result<Self, BackhaulSetupError> {
        let mut routes = configs
            .iter()
            .map(|c| Route::new(c.clone(), metrics.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        routes.sort_by_key(|r| std::cmp::Reverse(r.config.prefix.len()));
        Ok(Self { routes })
    }

    /// The route for `path`, if any.
    pub fn route(&self, path: &str) -> Option<&Route> {
        self.routes
            .iter()
            .find(|r| path.starts_with(&r.config.prefix))
    }
}

impl Route {
    fn new(config: BackhaulConfig, metrics: FrontDoorMetrics) -> Result<Self, BackhaulSetupError> {
        let name = config
            .server_name
            .clone()
            .unwrap_or_else(|| config.origin.host.clone());
        let server_name =
            ServerName::try_from(name.clone()).map_err(|_| BackhaulSetupError::ServerName {
                prefix: config.prefix.clone(),
                name,
            })?;
        let pool = match config.origin.scheme {
            Scheme::H3 => {
                let tls = tls_config(&config, super::ALPN_H3)?;
                let mut client = super::quinn_client_config_from(tls).map_err(|source| {
                    BackhaulSetupError::Config {
                        prefix: config.prefix.clone(),
                        source,
                    }
                })?;
                let mut transport = quinn::TransportConfig::default();
                // Keep an idle pooled connection alive (the default idle timeout is 30 s).
                transport.keep_alive_interval(Some(Duration::from_secs(10)));
                client.transport_config(Arc::new(transport));
                Pool::H3 {
                    tls: client,
                    conn: Box::new(tokio::sync::Mutex::new(None)),
                }
            }
            Scheme::Https => Pool::Https {
                tls: tokio_rustls::TlsConnector::from(Arc::new(tls_config(
                    &config,
                    super::front_door::ALPN_HTTP11,
                )?)),
                idle: Mutex::new(Vec::new()),
            },
        };
        Ok(Self {
            origin_name: config.origin.to_string(),
            config,
            server_name,
            pool,
            metrics,
        })
    }

    /// The route's path prefix.
    pub fn prefix(&self) -> &str {
        &self.config.prefix
    }

    /// Forwards `request` (its URI holding at least the path) from the client at `remote`,
    /// and returns the origin's response, or a 502/504 answer saying why there is none.
    pub async fn forward(
        &self,
        request: http::Request<Bytes>,
        remote: SocketAddr,
    ) -> http::Response<Bytes> {
        let response = match self.try_forward(request, remote).await {
            Ok(r) => r,
            Err(e) => {
                log::warn!("backhaul {}: {e}", self.config.prefix);
                let body = serde_json::json!({
                    "error": e.to_string(),
                    "origin": self.origin_name,
                })
                .to_string();
                http::Response::builder()
                    .status(e.status())
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(Bytes::from(body))
                    .unwrap_or_default()
            }
        };
        self.metrics
            .backhaul_request(&self.config.prefix, response.status().as_u16());
        response
    }

    async fn try_forward(
        &self,
        request: http::Request<Bytes>,
        remote: SocketAddr,
    ) -> Result<http::Response<Bytes>, OriginError> {
        let (parts, body) = request.into_parts();
        let path_and_query = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let path_and_query = match path_and_query.strip_prefix(self.config.prefix.as_str()) {
            Some(rest) if self.config.strip_prefix => format!("/{}", rest.trim_start_matches('/')),
            _ => path_and_query,
        };
        let mut headers = end_to_end(&parts.headers);
        if let Ok(v) = http::HeaderValue::from_str(&remote.ip().to_string()) {
            headers.append("x-forwarded-for", v);
        }
        let build = |uri: String| {
            let mut request = http::Request::builder()
                .method(parts.method.clone())
                .uri(uri)
                .body(body.clone())
                .map_err(|e| OriginError::BadResponse {
                    origin: self.origin_name.clone(),
                    message: format!("cannot build the request: {e}"),
                })?;
            *request.headers_mut() = headers.clone();
            Ok::<_, OriginError>(request)
        };
        let timeout = self.config.request_timeout;
        let timed_out = || OriginError::Timeout {
            origin: self.origin_name.clone(),
            timeout,
        };
        match &self.pool {
            Pool::H3 { tls, conn } => {
                let uri = format!("https://{}{path_and_query}", self.config.origin.authority());
                // A kept connection the origin closed meanwhile gets one retry on a new one.
                let mut retried = false;
                loop {
                    let (kept, send, reused) =
                        self.within_connect(self.lease_h3(tls, conn)).await?;
                    match tokio::time::timeout(timeout, self.h3_exchange(send, build(uri.clone())?))
                        .await
                    {
                        Err(_) => return Err(timed_out()),
                        Ok(Err(_)) if reused && !retried && kept.close_reason().is_some() => {
                            retried = true;
                        }
                        Ok(result) => return result,
                    }
                }
            }
            Pool::Https { tls, idle } => {
                let mut request = build(path_and_query)?;
                if let Ok(host) = http::HeaderValue::from_str(&self.config.origin.authority()) {
                    request.headers_mut().insert(http::header::HOST, host);
                }
                let send = self.within_connect(self.lease_https(tls, idle)).await?;
                tokio::time::timeout(timeout, self.https_exchange(send, request, idle))
                    .await
                    .map_err(|_| timed_out())?
            }
        }
    }

    fn bad(&self, message: impl std::fmt::Display) -> OriginError {
        OriginError::BadResponse {
            origin: self.origin_name.clone(),
            message: message.to_string(),
        }
    }

    fn cannot_connect(&self, message: impl std::fmt::Display) -> OriginError {
        OriginError::Connect {
            origin: self.origin_name.clone(),
            message: message.to_string(),
        }
    }

    /// Runs `connect` within the connect timeout.
    async fn within_connect<T>(
        &self,
        connect: impl Future<Output = Result<T, OriginError>>,
    ) -> Result<T, OriginError> {
        let timeout = self.config.connect_timeout;
        tokio::time::timeout(timeout, connect)
            .await
            .unwrap_or_else(|_| {
                Err(self.cannot_connect(format_args!(
                    "no connection within the connect timeout ({} ms)",
                    timeout.as_millis()
                )))
            })
    }

    async fn resolve(&self) -> Result<SocketAddr, OriginError> {
        let origin = &self.config.origin;
        let resolve_err = |message: String| OriginError::Resolve {
            origin: self.origin_name.clone(),
            message,
        };
        tokio::net::lookup_host((origin.host.as_str(), origin.port))
            .await
            .map_err(|e| resolve_err(e.to_string()))?
            .next()
            .ok_or_else(|| resolve_err("no address".to_string()))
    }

    /// The kept QUIC connection, or a new one; and whether it was kept.
    async fn lease_h3(
        &self,
        tls: &quinn::ClientConfig,
        slot: &tokio::sync::Mutex<Option<H3Connection>>,
    ) -> Result<(quinn::Connection, H3Send, bool), OriginError> {
        let mut kept = slot.lock().await;
        if let Some(c) = kept.as_ref().filter(|c| c.conn.close_reason().is_none()) {
            return Ok((c.conn.clone(), c.send.clone(), true));
        }
        *kept = None;
        let addr = self.resolve().await?;
        let local: SocketAddr = if addr.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let endpoint = quinn::Endpoint::client(local).map_err(|e| self.cannot_connect(e))?;
        let name = self.server_name.to_str();
        let connection = endpoint
            .connect_with(tls.clone(), addr, &name)
            .map_err(|e| self.cannot_connect(e))?
            .await
            .map_err(|e| self.cannot_connect(e))?;
        let group = super::front_door::quic_group(&connection);
        let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(connection.clone()))
            .await
            .map_err(|e| self.cannot_connect(e))?;
        let driver = tokio::spawn(async move {
            let _ = driver.wait_idle().await;
        });
        self.opened(group);
        *kept = Some(H3Connection {
            conn: connection.clone(),
            send: send.clone(),
            _endpoint: endpoint,
            _driver: AbortOnDrop(driver),
        });
        Ok((connection, send, false))
    }

    /// An idle HTTP/1.1 connection, or a new one.
    async fn lease_https(
        &self,
        tls: &tokio_rustls::TlsConnector,
        idle: &Mutex<Vec<HttpsSend>>,
    ) -> Result<HttpsSend, OriginError> {
        while let Some(send) = idle.lock().ok().and_then(|mut v| v.pop()) {
            if !send.is_closed() && send.is_ready() {
                return Ok(send);
            }
        }
        let addr = self.resolve().await?;
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| self.cannot_connect(e))?;
        let _ = tcp.set_nodelay(true);
        let stream = tls
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| self.cannot_connect(e))?;
        let group = stream
            .get_ref()
            .1
            .negotiated_key_exchange_group()
            .map(|g| g.name());
        let (send, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| self.cannot_connect(e))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        self.opened(group);
        Ok(send)
    }

    fn opened(&self, group: Option<rustls::NamedGroup>) {
        let group = group.map_or_else(|| "-".to_string(), group_name);
        log::info!(
            "backhaul {}: connected to {} ({group})",
            self.config.prefix,
            self.origin_name
        );
        self.metrics.origin_connection(&self.origin_name, &group);
    }

    async fn h3_exchange(
        &self,
        mut send: H3Send,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, OriginError> {
        let (parts, body) = request.into_parts();
        let mut stream = send
            .send_request(http::Request::from_parts(parts, ()))
            .await
            .map_err(|e| self.bad(e))?;
        if !body.is_empty() {
            stream.send_data(body).await.map_err(|e| self.bad(e))?;
        }
        stream.finish().await.map_err(|e| self.bad(e))?;
        let head = stream.recv_response().await.map_err(|e| self.bad(e))?;
        let mut data = BytesMut::new();
        while let Some(chunk) = stream.recv_data().await.map_err(|e| self.bad(e))? {
            if data.len() + bytes::Buf::remaining(&chunk) > MAX_BODY {
                return Err(OriginError::TooLarge {
                    origin: self.origin_name.clone(),
                });
            }
            data.put(chunk);
        }
        let (mut parts, ()) = head.into_parts();
        parts.headers = end_to_end(&parts.headers);
        Ok(http::Response::from_parts(parts, data.freeze()))
    }

    async fn https_exchange(
        &self,
        mut send: HttpsSend,
        request: http::Request<Bytes>,
        idle: &Mutex<Vec<HttpsSend>>,
    ) -> Result<http::Response<Bytes>, OriginError> {
        send.ready().await.map_err(|e| self.bad(e))?;
        let response = send
            .send_request(request.map(http_body_util::Full::new))
            .await
            .map_err(|e| self.bad(e))?;
        let (mut parts, body) = response.into_parts();
        let body = http_body_util::Limited::new(body, MAX_BODY)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    OriginError::TooLarge {
                        origin: self.origin_name.clone(),
                    }
                } else {
                    self.bad(e)
                }
            })?
            .to_bytes();
        if !send.is_closed()
            && let Ok(mut idle) = idle.lock()
            && idle.len() < MAX_IDLE_HTTPS
        {
            idle.push(send);
        }
        parts.headers = end_to_end(&parts.headers);
        Ok(http::Response::from_parts(parts, body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_parse() {
        let o = Origin::parse("h3://127.0.0.1:4433").unwrap();
        assert_eq!(
            o,
            Origin {
                scheme: Scheme::H3,
                host: "127.0.0.1".to_string(),
                port: 4433
            }
        );
        assert_eq!(o.to_string(), "h3://127.0.0.1:4433");
        let o = Origin::parse("https://[::1]:8443/").unwrap();
        assert_eq!(o.host, "::1");
        assert_eq!(o.authority(), "[::1]:8443");
        assert_eq!(Origin::parse("https://example.com").unwrap().port, 443);
        for bad in [
            "http://a:1",
            "h3://",
            "h3://a:1/path",
            "h3://user@a:1",
            "h3://a:x",
            "a:1",
        ] {
            assert!(Origin::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut h = http::HeaderMap::new();
        h.insert("connection", "close".parse().unwrap());
        h.insert("host", "a".parse().unwrap());
        h.insert("accept", "*/*".parse().unwrap());
        let out = end_to_end(&h);
        assert_eq!(out.len(), 1);
        assert!(out.contains_key("accept"));
    }

    fn config(prefix: &str) -> BackhaulConfig {
        BackhaulConfig {
            prefix: prefix.to_string(),
            origin: Origin::parse("h3://127.0.0.1:9").unwrap(),
            trust: OriginTrust::Spki(base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                [0u8; 32],
            )),
            server_name: None,
            strip_prefix: false,
            pq: PqMode::Required,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }

    #[test]
    fn longest_prefix_wins_and_bad_pins_are_refused() {
        let m = FrontDoorMetrics::default();
        let b = Backhaul::new(&[config("/api/"), config("/api/v2/")], &m).unwrap();
        assert_eq!(b.route("/api/v2/x").unwrap().prefix(), "/api/v2/");
        assert_eq!(b.route("/api/x").unwrap().prefix(), "/api/");
        assert!(b.route("/healthz").is_none());
        let mut c = config("/x/");
        c.trust = OriginTrust::Spki("not base64".to_string());
        assert!(matches!(
            Backhaul::new(&[c], &m),
            Err(BackhaulSetupError::Pin { .. })
        ));
        let mut c = config("/x/");
        c.trust = OriginTrust::Ca(PathBuf::from("/nonexistent/ca.pem"));
        assert!(matches!(
            Backhaul::new(&[c], &m),
            Err(BackhaulSetupError::Ca { .. })
        ));
    }
}
