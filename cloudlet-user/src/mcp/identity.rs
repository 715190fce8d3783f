//! Who is calling: bearer JWTs (RFC 7519) from trusted issuers, verified against each
//! issuer's published keys (a JWKS file, RFC 7517), turned into an [`Identity`] whose roles
//! feed the tool policy.
//!
//! A token is accepted only if all of these hold, checked in this order:
//!
//! - it is at most 16 KiB and has three base64url parts (padding tolerated) whose first two
//!   are JSON objects;
//! - its header's `alg` is RS256, ES256 or EdDSA (never `none`, never HMAC: a shared secret
//!   has no place in a JWKS), its `typ`, if any, is `JWT` or `at+jwt` (or their `application/` media types), and it names no
//!   `crit` extensions (none are understood);
//! - its `iss` is exactly one of the configured issuers. This is the only claim read before
//!   the signature is checked, and only to pick that issuer's keys: a token can never be
//!   checked against another issuer's keys;
//! - the signature over `header.payload` verifies with a key of that issuer that fits the
//!   algorithm: the key named by the header's `kid`, or, without a `kid`, any of the
//!   issuer's keys of the right type. A key's type fixes its algorithm (RSA: RS256, P-256:
//!   ES256, Ed25519: EdDSA), so a token cannot make a key be used with another algorithm;
//! - `exp` is present and not past, and `nbf`, if present, is not ahead, both give or take
//!   the issuer's leeway for clock skew;
//! - `aud` (a string or an array) holds the issuer's configured audience, so a token minted
//!   for another service is not accepted here;
//! - the subject claim (`sub` by default) is a non-empty string.
//!
//! The identity's roles are the issuer's `default_roles` followed by the roles claim (an
//! array of strings, or a space-separated string like OAuth's `scope`), without repeats.
//!
//! Errors carry the RFC 6750 error code for the `WWW-Authenticate` answer
//! ([`www_authenticate`]); [`bearer`] takes the token out of an `Authorization` header.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD_INDIFFERENT as B64URL;
use ring::signature::{self, UnparsedPublicKey};
use serde_json::{Map, Value};

/// Tokens longer than this are rejected without being decoded.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Attacker-chosen strings quoted in error messages are cut to this many characters.
const MAX_QUOTED: usize = 64;

/// One trusted token issuer (a `[[mcp.issuers]]` entry of cloudletd's config).
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// The issuer's identifier, compared exactly with the token's `iss`.
    pub issuer: String,
    /// This service's name at the issuer: it must be in the token's `aud`.
    pub audience: String,
    /// A JWKS file (`{"keys": [...]}`) holding the issuer's signing keys.
    #[serde(default)]
    pub jwks: Option<PathBuf>,
    /// Or the URL the issuer publishes its JWKS at (`https://`, or `http://` on loopback),
    /// fetched at start and every `jwks_refresh_s`.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// CA certificates (PEM) for an `https://` `jwks_url`; default: the system's bundle.
    #[serde(default)]
    pub jwks_ca: Option<PathBuf>,
    /// Seconds between fetches of `jwks_url` (a failed fetch keeps the keys had and is
    /// retried sooner).
    #[serde(default = "default_refresh")]
    pub jwks_refresh_s: u64,
    /// The claim holding the roles: an array of strings, or a space-separated string.
    #[serde(default = "default_roles_claim")]
    pub roles_claim: String,
    /// The claim naming the caller.
    #[serde(default = "default_subject_claim")]
    pub subject_claim: String,
    /// Roles every token of this issuer gets, before those of the roles claim.
    #[serde(default)]
    pub default_roles: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    #[serde(default = "default_leeway")]
    pub leeway_s: u64,
}

fn default_roles_claim() -> String {
    "roles".to_string()
}

fn default_subject_claim() -> String {
    "sub".to_string()
}

fn default_leeway() -> u64 {
    30
}

fn default_refresh() -> u64 {
    300
}

/// The JWKS text of each issuer configured with a file (those with a URL are left out).
pub fn read_jwks_files(
    issuers: &[IssuerConfig],
) -> Result<Vec<(IssuerConfig, String)>, IdentityError> {
    let mut with_jwks = Vec::with_capacity(issuers.len());
    for config in issuers {
        let Some(path) = &config.jwks else { continue };
        let json = std::fs::read_to_string(path).map_err(|source| IdentityError::ReadJwks {
            issuer: config.issuer.clone(),
            path: path.clone(),
            source,
        })?;
        with_jwks.push((config.clone(), json));
    }
    Ok(with_jwks)
}

/// A verified caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The subject claim's value.
    pub subject: String,
    /// The issuer that vouched for it.
    pub issuer: String,
    /// The issuer's default roles, then the token's, without repeats.
    pub roles: Vec<String>,
}

/// Why the issuers' configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The JWKS file could not be read.
    #[error("issuer {issuer:?}: cannot read JWKS {}: {source}", path.display())]
    ReadJwks {
        issuer: String,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The JWKS is not a JSON object with a `keys` array.
    #[error("issuer {issuer:?}: JWKS is not a JSON object with a `keys` array: {reason}")]
    Jwks { issuer: String, reason: String },
    /// No key of the JWKS can verify tokens.
    #[error("issuer {issuer:?}: JWKS has no usable signing key (RSA, P-256 or Ed25519)")]
    NoUsableKey { issuer: String },
    /// Two entries name the same issuer.
    #[error("issuer {0:?} is configured twice")]
    DuplicateIssuer(String),
    /// A required setting is empty.
    #[error("issuer {issuer:?}: `{field}` is empty")]
    EmptyField { issuer: String, field: &'static str },
}

/// Why a token, or the `Authorization` header carrying it, was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The `Authorization` header is not `Bearer <token>`.
    #[error("malformed Authorization header: {0}")]
    BadAuthorization(&'static str),
    /// The token is not a well-formed JWS compact serialization of a JWT.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// The header's `alg` is not one we verify (`none` included).
    #[error("unsupported signing algorithm {0:?}")]
    UnsupportedAlg(String),
    /// The header's `typ` is none of `JWT`, `at+jwt` and their `application/` forms.
    #[error("unsupported token type {0:?}")]
    UnsupportedType(String),
    /// The header lists `crit` extensions, none of which are understood.
    #[error("token has critical header extensions")]
    CriticalHeader,
    /// The `iss` is not a configured issuer.
    #[error("untrusted issuer {0:?}")]
    UnknownIssuer(String),
    /// The issuer has no key with the header's `kid`.
    #[error("issuer {issuer:?} has no key {kid:?}")]
    UnknownKey { issuer: String, kid: String },
    /// The key named by `kid` is not a key for the header's algorithm.
    #[error("key {kid:?} is not a {alg} key")]
    KeyAlgMismatch { kid: String, alg: &'static str },
    /// Without a `kid`, the issuer has no key for the header's algorithm.
    #[error("issuer {issuer:?} has no {alg} key")]
    NoKeyForAlg { issuer: String, alg: &'static str },
    /// No candidate key verifies the signature.
    #[error("bad signature")]
    BadSignature,
    /// `exp` (plus leeway) is past.
    #[error("token expired at {0}")]
    Expired(i64),
    /// `nbf` (minus leeway) is ahead.
    #[error("token not valid before {0}")]
    NotYetValid(i64),
    /// `aud` does not hold the configured audience.
    #[error("token audience does not include {0:?}")]
    WrongAudience(String),
    /// A required claim is absent.
    #[error("missing claim `{0}`")]
    MissingClaim(String),
    /// A claim has the wrong type or value.
    #[error("claim `{claim}` {reason}")]
    InvalidClaim { claim: String, reason: &'static str },
}

impl TokenError {
    /// The RFC 6750 error code: `invalid_request` for a malformed `Authorization` header,
    /// `invalid_token` for everything wrong with the token itself.
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::BadAuthorization(_) => "invalid_request",
            _ => "invalid_token",
        }
    }
}

/// The signature algorithms accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Alg {
    Rs256,
    Es256,
    EdDsa,
}

impl Alg {
    fn parse(name: &str) -> Option<Alg> {
        match name {
            "RS256" => Some(Alg::Rs256),
            "ES256" => Some(Alg::Es256),
            "EdDSA" => Some(Alg::EdDsa),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Alg::Rs256 => "RS256",
            Alg::Es256 => "ES256",
            Alg::EdDsa => "EdDSA",
        }
    }
}

/// A public key's bytes, in the form ring verifies with.
#[derive(Clone, Debug)]
enum Material {
    /// Big-endian modulus and exponent, without leading zeros.
    Rsa { n: Vec<u8>, e: Vec<u8> },
    /// The uncompressed point `0x04 || x || y`.
    P256(Vec<u8>),
    /// The 32-byte public key.
    Ed25519(Vec<u8>),
}

/// One usable key of a JWKS.
#[derive(Clone, Debug)]
struct Key {
    kid: Option<String>,
    /// The one algorithm this key verifies, fixed by its type.
    alg: Alg,
    material: Material,
}

impl Key {
    fn verifies(&self, message: &[u8], sig: &[u8]) -> bool {
        match &self.material {
            Material::Rsa { n, e } => signature::RsaPublicKeyComponents { n, e }
                .verify(&signature::RSA_PKCS1_2048_8192_SHA256, message, sig)
                .is_ok(),
            Material::P256(point) => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(message, sig)
                    .is_ok()
            }
            Material::Ed25519(x) => UnparsedPublicKey::new(&signature::ED25519, x)
                .verify(message, sig)
                .is_ok(),
        }
    }
}

/// A configured issuer with its keys.
#[derive(Clone, Debug)]
struct Issuer {
    config: IssuerConfig,
    keys: Vec<Key>,
}

/// Verifies bearer tokens against the configured issuers and their keys.
#[derive(Clone, Debug, Default)]
pub struct Verifier {
    issuers: HashMap<String, Issuer>,
}

impl Verifier {
    /// Builds the verifier from each issuer's JWKS text (the `jwks` path is not read).
    /// Keys of unsupported types or uses are skipped; an issuer left without a usable key
    /// is an error.
    pub fn from_jwks(issuers: &[(IssuerConfig, String)]) -> Result<Self, IdentityError> {
        let mut out = HashMap::with_capacity(issuers.len());
        for (config, json) in issuers {
            for (field, value) in [("issuer", &config.issuer), ("audience", &config.audience)] {
                if value.is_empty() {
                    return Err(IdentityError::EmptyField {
                        issuer: config.issuer.clone(),
                        field,
                    });
                }
            }
            if out.contains_key(&config.issuer) {
                return Err(IdentityError::DuplicateIssuer(config.issuer.clone()));
            }
            let keys = parse_jwks(&config.issuer, json)?;
            out.insert(
                config.issuer.clone(),
                Issuer {
                    config: config.clone(),
                    keys,
                },
            );
        }
        Ok(Verifier { issuers: out })
    }

    /// Whether no issuer is configured (then no token can be accepted).
    pub fn is_empty(&self) -> bool {
        self.issuers.is_empty()
    }

    /// Verifies `token` at time `now_unix_s` and returns who it names.
    pub fn verify(&self, token: &str, now_unix_s: u64) -> Result<Identity, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed("longer than 16 KiB"));
        }
        let mut parts = token.split('.');
        let (Some(header_b64), Some(payload_b64), Some(sig_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed("not three dot-separated parts"));
        };

        let header_bytes = B64URL
            .decode(header_b64)
            .map_err(|_| TokenError::Malformed("header is not base64url"))?;
        let header: Header = serde_json::from_slice(&header_bytes)
            .map_err(|_| TokenError::Malformed("header is not a JSON object with an `alg`"))?;
        let alg =
            Alg::parse(&header.alg).ok_or_else(|| TokenError::UnsupportedAlg(clip(&header.alg)))?;
        if let Some(typ) = &header.typ
            && !["JWT", "at+jwt", "application/jwt", "application/at+jwt"]
                .iter()
                .any(|t| typ.eq_ignore_ascii_case(t))
        {
            return Err(TokenError::UnsupportedType(clip(typ)));
        }
        if header.crit.is_some() {
            return Err(TokenError::CriticalHeader);
        }

        let payload_bytes = B64URL
            .decode(payload_b64)
            .map_err(|_| TokenError::Malformed("payload is not base64url"))?;
        let claims: Map<String, Value> = serde_json::from_slice(&payload_bytes)
            .map_err(|_| TokenError::Malformed("payload is not a JSON object"))?;
        let sig = B64URL
            .decode(sig_b64)
            .map_err(|_| TokenError::Malformed("signature is not base64url"))?;

        // `iss` only picks the keys; nothing else is read before the signature checks out.
        let iss = match claims.get("iss") {
            None => return Err(TokenError::MissingClaim("iss".to_string())),
            Some(Value::String(iss)) => iss,
            Some(_) => {
                return Err(TokenError::InvalidClaim {
                    claim: "iss".to_string(),
                    reason: "is not a string",
                });
            }
        };
        let issuer = self
            .issuers
            .get(iss)
            .ok_or_else(|| TokenError::UnknownIssuer(clip(iss)))?;
        let signed = &token.as_bytes()[..header_b64.len() + 1 + payload_b64.len()];
        issuer.check_signature(&header, alg, signed, &sig)?;

        issuer.identity(&claims, now_unix_s)
    }
}

/// The JOSE header fields looked at.
#[derive(serde::Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    typ: Option<String>,
    #[serde(default)]
    crit: Option<Value>,
}

impl Issuer {
    /// Checks the signature with the key the header designates, or with every key of the
    /// issuer that fits the algorithm when there is no `kid`.
    fn check_signature(
        &self,
        header: &Header,
        alg: Alg,
        signed: &[u8],
        sig: &[u8],
    ) -> Result<(), TokenError> {
        let candidates: Vec<&Key> = match &header.kid {
            Some(kid) => {
                let named: Vec<&Key> = self
                    .keys
                    .iter()
                    .filter(|k| k.kid.as_deref() == Some(kid.as_str()))
                    .collect();
                if named.is_empty() {
                    return Err(TokenError::UnknownKey {
                        issuer: self.config.issuer.clone(),
                        kid: clip(kid),
                    });
                }
                let fitting: Vec<&Key> = named.into_iter().filter(|k| k.alg == alg).collect();
                if fitting.is_empty() {
                    return Err(TokenError::KeyAlgMismatch {
                        kid: clip(kid),
                        alg: alg.name(),
                    });
                }
                fitting
            }
            None => {
                let fitting: Vec<&Key> = self.keys.iter().filter(|k| k.alg == alg).collect();
                if fitting.is_empty() {
                    return Err(TokenError::NoKeyForAlg {
                        issuer: self.config.issuer.clone(),
                        alg: alg.name(),
                    });
                }
                fitting
            }
        };
        if candidates.iter().any(|k| k.verifies(signed, sig)) {
            Ok(())
        } else {
            Err(TokenError::BadSignature)
        }
    }

    /// Checks the time and audience claims of a token whose signature verified, and reads
    /// the subject and roles.
    fn identity(&self, claims: &Map<String, Value>, now: u64) -> Result<Identity, TokenError> {
        let config = &self.config;
        let now = now as f64;
        let leeway = config.leeway_s as f64;

        let exp = numeric_date(claims, "exp")?
            .ok_or_else(|| TokenError::MissingClaim("exp".to_string()))?;
        if now >= exp + leeway {
            return Err(TokenError::Expired(exp.floor() as i64));
        }
        if let Some(nbf) = numeric_date(claims, "nbf")?
            && now + leeway < nbf
        {
            return Err(TokenError::NotYetValid(nbf.ceil() as i64));
        }

        let audience_ok = match claims.get("aud") {
            None => return Err(TokenError::MissingClaim("aud".to_string())),
            Some(Value::String(aud)) => *aud == config.audience,
            Some(Value::Array(auds)) => auds.iter().any(|a| a.as_str() == Some(&config.audience)),
            Some(_) => {
                return Err(TokenError::InvalidClaim {
                    claim: "aud".to_string(),
                    reason: "is neither a string nor an array",
                });
            }
        };
        if !audience_ok {
            return Err(TokenError::WrongAudience(config.audience.clone()));
        }

        let subject = match claims.get(&config.subject_claim) {
            None => return Err(TokenError::MissingClaim(config.subject_claim.clone())),
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(_) => {
                return Err(TokenError::InvalidClaim {
                    claim: config.subject_claim.clone(),
                    reason: "is not a non-empty string",
                });
            }
        };

        let mut roles = Vec::new();
        let mut seen = HashSet::new();
        let mut add = |role: &str| {
            if !role.is_empty() && seen.insert(role.to_string()) {
                roles.push(role.to_string());
            }
        };
        config.default_roles.iter().for_each(|r| add(r));
        const ROLES_SHAPE: &str = "is neither an array of strings nor a space-separated string";
        match claims.get(&config.roles_claim) {
            None => {}
            Some(Value::String(s)) => s.split_whitespace().for_each(&mut add),
            Some(Value::Array(items)) => {
                let names: Option<Vec<&str>> = items.iter().map(Value::as_str).collect();
                let names = names.ok_or_else(|| TokenError::InvalidClaim {
                    claim: config.roles_claim.clone(),
                    reason: ROLES_SHAPE,
                })?;
                names.into_iter().for_each(add);
            }
            Some(_) => {
                return Err(TokenError::InvalidClaim {
                    claim: config.roles_claim.clone(),
                    reason: ROLES_SHAPE,
                });
            }
        }

        Ok(Identity {
            subject,
            issuer: config.issuer.clone(),
            roles,
        })
    }
}

/// A NumericDate claim (seconds since the epoch, possibly fractional), if present.
fn numeric_date(claims: &Map<String, Value>, name: &str) -> Result<Option<f64>, TokenError> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| TokenError::InvalidClaim {
                claim: name.to_string(),
                reason: "is not a number",
            }),
    }
}

/// One JWKS entry, as far as it matters here; other members (`x5c`, ...) are ignored.
#[derive(serde::Deserialize)]
struct RawJwk {
    kty: String,
    kid: Option<String>,
    alg: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
    key_ops: Option<Vec<String>>,
    crv: Option<String>,
    n: Option<String>,
    e: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

/// Why a JWKS entry is not used.
enum Skip {
    /// A kind of key (or use) this verifier does not handle: expected in real JWKS.
    Unsupported(String),
    /// A key of a supported kind whose fields are broken.
    Invalid(String),
}

/// Parses a JWKS, keeping the keys that can verify RS256, ES256 or EdDSA signatures.
fn parse_jwks(issuer: &str, json: &str) -> Result<Vec<Key>, IdentityError> {
    #[derive(serde::Deserialize)]
    struct Jwks {
        keys: Vec<Value>,
    }
    let jwks: Jwks = serde_json::from_str(json).map_err(|e| IdentityError::Jwks {
        issuer: issuer.to_string(),
        reason: e.to_string(),
    })?;
    let mut keys = Vec::new();
    for (i, entry) in jwks.keys.into_iter().enumerate() {
        let kid = entry
            .get("kid")
            .and_then(Value::as_str)
            .map_or_else(|| format!("#{i}"), |k| format!("{k:?}"));
        match parse_jwk(entry) {
            Ok(key) => keys.push(key),
            Err(Skip::Unsupported(why)) => {
                log::debug!("issuer {issuer:?}: skipping JWKS key {kid}: {why}");
            }
            Err(Skip::Invalid(why)) => {
                log::warn!("issuer {issuer:?}: skipping broken JWKS key {kid}: {why}");
            }
        }
    }
    if keys.is_empty() {
        return Err(IdentityError::NoUsableKey {
            issuer: issuer.to_string(),
        });
    }
    Ok(keys)
}

fn parse_jwk(entry: Value) -> Result<Key, Skip> {
    let raw: RawJwk = serde_json::from_value(entry).map_err(|e| Skip::Invalid(e.to_string()))?;
    if let Some(use_) = &raw.use_
        && use_ != "sig"
    {
        return Err(Skip::Unsupported(format!("use {use_:?}")));
    }
    if let Some(ops) = &raw.key_ops
        && !ops.iter().any(|op| op == "verify")
    {
        return Err(Skip::Unsupported(format!("key_ops {ops:?}")));
    }
    let (alg, material) = match (raw.kty.as_str(), raw.crv.as_deref()) {
        ("RSA", _) => {
            let n = strip_leading_zeros(field(&raw.n, "n")?);
            let e = strip_leading_zeros(field(&raw.e, "e")?);
            // ring verifies RS256 with moduli of 2048 to 8192 bits.
            if n.len() < 256 || n.len() > 1024 {
                return Err(Skip::Invalid(format!(
                    "RSA modulus of {} bytes, not 2048 to 8192 bits",
                    n.len()
                )));
            }
            if e.is_empty() {
                return Err(Skip::Invalid("RSA exponent is zero".to_string()));
            }
            (Alg::Rs256, Material::Rsa { n, e })
        }
        ("EC", Some("P-256")) => {
            let x = sized_field(&raw.x, "x", 32)?;
            let y = sized_field(&raw.y, "y", 32)?;
            let mut point = Vec::with_capacity(65);
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            (Alg::Es256, Material::P256(point))
        }
        ("OKP", Some("Ed25519")) => (Alg::EdDsa, Material::Ed25519(sized_field(&raw.x, "x", 32)?)),
        (kty, crv) => {
            return Err(Skip::Unsupported(match crv {
                Some(crv) => format!("kty {kty:?} crv {crv:?}"),
                None => format!("kty {kty:?}"),
            }));
        }
    };
    if let Some(declared) = &raw.alg
        && declared != alg.name()
    {
        return Err(Skip::Unsupported(format!(
            "alg {declared:?} (only {} with this key type)",
            alg.name()
        )));
    }
    Ok(Key {
        kid: raw.kid,
        alg,
        material,
    })
}

/// A base64url JWK member, decoded.
fn field(value: &Option<String>, name: &str) -> Result<Vec<u8>, Skip> {
    let value = value
        .as_deref()
        .ok_or_else(|| Skip::Invalid(format!("no `{name}`")))?;
    B64URL
        .decode(value)
        .map_err(|_| Skip::Invalid(format!("`{name}` is not base64url")))
}

/// A base64url JWK member that must decode to exactly `len` bytes.
fn sized_field(value: &Option<String>, name: &str, len: usize) -> Result<Vec<u8>, Skip> {
    let bytes = field(value, name)?;
    if bytes.len() != len {
        return Err(Skip::Invalid(format!(
            "`{name}` is {} bytes, not {len}",
            bytes.len()
        )));
    }
    Ok(bytes)
}

fn strip_leading_zeros(mut bytes: Vec<u8>) -> Vec<u8> {
    let zeros = bytes.iter().take_while(|&&b| b == 0).count();
    bytes.drain(..zeros);
    bytes
}

/// `s`, cut to [`MAX_QUOTED`] characters, for error messages that quote token contents.
fn clip(s: &str) -> String {
    match s.char_indices().nth(MAX_QUOTED) {
        Some((at, _)) => format!("{}...", &s[..at]),
        None => s.to_string(),
    }
}

/// The token of an `Authorization: Bearer <token>` header value (RFC 6750 section 2.1;
/// the scheme is case-insensitive). Errors have the code `invalid_request`.
pub fn bearer(header_value: &str) -> Result<&str, TokenError> {
    let value = header_value.trim_matches([' ', '\t']);
    let (scheme, rest) = value
        .split_once([' ', '\t'])
        .ok_or(TokenError::BadAuthorization("expected `Bearer <token>`"))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(TokenError::BadAuthorization("not a Bearer credential"));
    }
    let token = rest.trim_start_matches([' ', '\t']);
    // token68: 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
    let body = token.trim_end_matches('=');
    if body.is_empty()
        || !body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b))
    {
        return Err(TokenError::BadAuthorization(
            "the token is not a single base64url word",
        ));
    }
    Ok(token)
}

/// A `WWW-Authenticate` value for a refused request (RFC 6750 section 3): the realm, the
/// error code and description when `err` is given (leave it out when the request carried
/// no credentials), and the OAuth protected resource metadata URL (RFC 9728) when given.
pub fn www_authenticate(
    realm: &str,
    err: Option<&TokenError>,
    resource_metadata: Option<&str>,
) -> String {
    let mut out = format!("Bearer realm=\"{}\"", quoted(realm));
    if let Some(err) = err {
        out.push_str(&format!(
            ", error=\"{}\", error_description=\"{}\"",
            err.code(),
            quoted(&err.to_string())
        ));
    }
    if let Some(url) = resource_metadata {
        out.push_str(&format!(", resource_metadata=\"{}\"", quoted(url)));
    }
    out
}

/// The inside of an HTTP quoted-string: `"` and `\` escaped, and anything that is not
/// printable ASCII (control characters could split the header) replaced by `?`.
fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => out.push('?'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, RsaKeyPair};
    use serde_json::json;

    const NOW: u64 = 1_700_000_000;
    const ISS: &str = "https://idp.example";
    const OTHER_ISS: &str = "https://other.example";

    /// A throwaway 2048-bit RSA key made with openssl for these tests only; it protects
    /// nothing.
    const RSA_PKCS8: &[u8] = include_bytes!("testdata/rsa2048.pk8");

    enum TestKey {
        Ed(Ed25519KeyPair),
        Ec(EcdsaKeyPair),
        Rsa(RsaKeyPair),
    }

    impl TestKey {
        fn ed() -> TestKey {
            let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
            TestKey::Ed(Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap())
        }

        fn ec() -> TestKey {
            let rng = SystemRandom::new();
            let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
            TestKey::Ec(EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap())
        }

        fn rsa() -> TestKey {
            TestKey::Rsa(RsaKeyPair::from_pkcs8(RSA_PKCS8).unwrap())
        }

        fn sign(&self, message: &[u8]) -> Vec<u8> {
            match self {
                TestKey::Ed(k) => k.sign(message).as_ref().to_vec(),
                TestKey::Ec(k) => k
                    .sign(&SystemRandom::new(), message)
                    .unwrap()
                    .as_ref()
                    .to_vec(),
                TestKey::Rsa(k) => {
                    let mut sig = vec![0; k.public().modulus_len()];
                    k.sign(
                        &signature::RSA_PKCS1_SHA256,
                        &SystemRandom::new(),
                        message,
                        &mut sig,
                    )
                    .unwrap();
                    sig
                }
            }
        }

        /// The public key as a JWK with this `kid`.
        fn jwk(&self, kid: &str) -> Value {
            match self {
                TestKey::Ed(k) => json!({
                    "kty": "OKP", "crv": "Ed25519", "kid": kid, "use": "sig", "alg": "EdDSA",
                    "x": b64(k.public_key().as_ref()),
                }),
                TestKey::Ec(k) => {
                    let point = k.public_key().as_ref();
                    assert_eq!((point.len(), point[0]), (65, 4));
                    json!({
                        "kty": "EC", "crv": "P-256", "kid": kid,
                        "x": b64(&point[1..33]), "y": b64(&point[33..]),
                    })
                }
                TestKey::Rsa(k) => {
                    let parts = signature::RsaPublicKeyComponents::<Vec<u8>>::from(k.public());
                    json!({
                        "kty": "RSA", "kid": kid, "alg": "RS256",
                        "n": b64(&parts.n), "e": b64(&parts.e),
                    })
                }
            }
        }
    }

    fn b64(bytes: impl AsRef<[u8]>) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    /// A compact JWS of `header` and `claims` signed with `key`.
    fn sign(header: &Value, claims: &Value, key: &TestKey) -> String {
        let message = format!("{}.{}", b64(header.to_string()), b64(claims.to_string()));
        let sig = key.sign(message.as_bytes());
        format!("{message}.{}", b64(sig))
    }

    fn claims(iss: &str) -> Value {
        json!({
            "iss": iss, "aud": "cloudlet", "sub": "alice",
            "exp": NOW + 600, "nbf": NOW - 10, "iat": NOW - 10,
            "roles": ["writer", "reader", "writer"],
        })
    }

    fn config(issuer: &str) -> IssuerConfig {
        IssuerConfig {
            issuer: issuer.to_string(),
            audience: "cloudlet".to_string(),
            jwks: Some(PathBuf::from("unused.json")),
            jwks_url: None,
            jwks_ca: None,
            jwks_refresh_s: default_refresh(),
            roles_claim: default_roles_claim(),
            subject_claim: default_subject_claim(),
            default_roles: vec!["reader".to_string()],
            leeway_s: default_leeway(),
        }
    }

    /// Two issuers: `ISS` with an Ed25519, a P-256 and an RSA key (plus keys it must skip),
    /// `OTHER_ISS` with its own Ed25519 key, roles in `scope` and the subject in `email`.
    struct Fixture {
        verifier: Verifier,
        ed: TestKey,
        ec: TestKey,
        rsa: TestKey,
        other: TestKey,
    }

    fn fixture() -> Fixture {
        let (ed, ec, rsa, other) = (TestKey::ed(), TestKey::ec(), TestKey::rsa(), TestKey::ed());
        let jwks = json!({"keys": [
            ed.jwk("ed1"),
            ec.jwk("ec1"),
            rsa.jwk("rsa1"),
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            {"kty": "EC", "crv": "P-384", "kid": "p384", "x": "AA", "y": "AA"},
        ]});
        let other_jwks = json!({"keys": [other.jwk("other1")]});
        let other_config = IssuerConfig {
            roles_claim: "scope".to_string(),
            subject_claim: "email".to_string(),
            default_roles: vec![],
            ..config(OTHER_ISS)
        };
        let verifier = Verifier::from_jwks(&[
            (config(ISS), jwks.to_string()),
            (other_config, other_jwks.to_string()),
        ])
        .unwrap();
        Fixture {
            verifier,
            ed,
            ec,
            rsa,
            other,
        }
    }

    fn header(alg: &str, kid: &str) -> Value {
        json!({"alg": alg, "typ": "JWT", "kid": kid})
    }

    #[test]
    fn eddsa_token_gives_identity_with_default_and_array_roles() {
        let f = fixture();
        let token = sign(&header("EdDSA", "ed1"), &claims(ISS), &f.ed);
        assert_eq!(
            f.verifier.verify(&token, NOW),
            Ok(Identity {
                subject: "alice".to_string(),
                issuer: ISS.to_string(),
                roles: vec!["reader".to_string(), "writer".to_string()],
            })
        );
    }

    #[test]
    fn es256_token_with_space_separated_roles() {
        let f = fixture();
        let mut c = claims(ISS);
        c["roles"] = json!("  admin reader\tops ");
        let token = sign(&header("ES256", "ec1"), &c, &f.ec);
        let id = f.verifier.verify(&token, NOW).unwrap();
        assert_eq!(id.roles, ["reader", "admin", "ops"]);
        assert_eq!(id.subject, "alice");
    }

    #[test]
    fn configured_claim_names_are_used() {
        let f = fixture();
        let c = json!({
            "iss": OTHER_ISS, "aud": "cloudlet", "exp": NOW + 60,
            "email": "bob@example.com", "sub": "ignored", "scope": "tools:read tools:write",
            "roles": ["ignored"],
        });
        let token = sign(&header("EdDSA", "other1"), &c, &f.other);
        let id = f.verifier.verify(&token, NOW).unwrap();
        assert_eq!(id.subject, "bob@example.com");
        assert_eq!(id.issuer, OTHER_ISS);
        assert_eq!(id.roles, ["tools:read", "tools:write"]);
    }

    #[test]
    fn rs256_good_and_bad_signature() {
        let f = fixture();
        let token = sign(&header("RS256", "rsa1"), &claims(ISS), &f.rsa);
        assert_eq!(f.verifier.verify(&token, NOW).unwrap().subject, "alice");

        // Same header and claims, signature flipped in its last byte.
        let (message, sig) = token.rsplit_once('.').unwrap();
        let mut sig = B64URL.decode(sig).unwrap();
        *sig.last_mut().unwrap() ^= 1;
        let forged = format!("{message}.{}", b64(sig));
        assert_eq!(
            f.verifier.verify(&forged, NOW),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn token_without_kid_tries_the_keys_of_its_alg() {
        let f = fixture();
        let h = json!({"alg": "ES256"});
        let token = sign(&h, &claims(ISS), &f.ec);
        assert!(f.verifier.verify(&token, NOW).is_ok());
        // An ES256 token signed by a P-256 key the issuer does not have.
        let stranger = sign(&h, &claims(ISS), &TestKey::ec());
        assert_eq!(
            f.verifier.verify(&stranger, NOW),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn expiry_honours_leeway() {
        let f = fixture();
        let mut c = claims(ISS);
        c["exp"] = json!(NOW - 20);
        let token = sign(&header("EdDSA", "ed1"), &c, &f.ed);
        assert!(f.verifier.verify(&token, NOW).is_ok(), "within 30 s leeway");
        let err = f.verifier.verify(&token, NOW + 10).unwrap_err();
        assert_eq!(err, TokenError::Expired((NOW - 20) as i64));
        assert_eq!(err.to_string(), "token expired at 1699999980");
        assert_eq!(err.code(), "invalid_token");
    }

    #[test]
    fn missing_exp_is_rejected() {
        let f = fixture();
        let mut c = claims(ISS);
        c.as_object_mut().unwrap().remove("exp");
        let token = sign(&header("EdDSA", "ed1"), &c, &f.ed);
        assert_eq!(
            f.verifier.verify(&token, NOW),
            Err(TokenError::MissingClaim("exp".to_string()))
        );
        c["exp"] = json!("tomorrow");
        let token = sign(&header("EdDSA", "ed1"), &c, &f.ed);
        assert!(matches!(
            f.verifier.verify(&token, NOW),
            Err(TokenError::InvalidClaim { claim, .. }) if claim == "exp"
        ));
    }

    #[test]
    fn not_yet_valid_is_rejected() {
        let f = fixture();
        let mut c = claims(ISS);
        c["nbf"] = json!(NOW + 100);
        let token = sign(&header("EdDSA", "ed1"), &c, &f.ed);
        assert_eq!(
            f.verifier.verify(&token, NOW),
            Err(TokenError::NotYetValid((NOW + 100) as i64))
        );
        assert!(f.verifier.verify(&token, NOW + 71).is_ok(), "within leeway");
    }

    #[test]
    fn audience_must_match() {
        let f = fixture();
        let mut c = claims(ISS);
        c["aud"] = json!("another-service");
        let token = sign(&header("EdDSA", "ed1"), &c, &f.ed);
        assert_eq!(
            f.verifier.verify(&token, NOW),
            Err(TokenError::WrongAudience("cloudlet".to_string()))
        );

        c["aud"] = json!(["another-service", "cloudlet"]);
        let token = sign(&header("EdDSA", "ed1"), &c, &f.ed);
        assert!(f.verifier.verify(&token, NOW).is_ok());

        c["aud"] = json!(["another-service"]);
        let token = sign(&header("EdDSA", "ed1"), &c, &f.ed);
        assert!(matches!(
            f.verifier.verify(&token, NOW),
            Err(TokenError::WrongAudience(_))
        ));

        c.as_object_mut().unwrap().remove("aud");
        let token = sign(&header("EdDSA", "ed1"), &c, &f.ed);
        assert_eq!(
            f.verifier.verify(&token, NOW),
            Err(TokenError::MissingClaim("aud".to_string()))
        );
    }

    #[test]
    fn unknown_issuer_is_named() {
        let f = fixture();
        let token = sign(
            &header("EdDSA", "ed1"),
            &claims("https://evil.example"),
            &f.ed,
        );
        let err = f.verifier.verify(&token, NOW).unwrap_err();
        assert_eq!(
            err,
            TokenError::UnknownIssuer("https://evil.example".to_string())
        );
        assert!(err.to_string().contains("https://evil.example"));
    }

    #[test]
    fn another_issuers_key_cannot_sign_for_this_issuer() {
        let f = fixture();
        // Signed by OTHER_ISS's key, claiming ISS and naming ISS's Ed25519 key.
        let token = sign(&header("EdDSA", "ed1"), &claims(ISS), &f.other);
        assert_eq!(
            f.verifier.verify(&token, NOW),
            Err(TokenError::BadSignature)
        );
        // Naming the other issuer's key id does not reach that key either.
        let token = sign(&header("EdDSA", "other1"), &claims(ISS), &f.other);
        assert!(matches!(
            f.verifier.verify(&token, NOW),
            Err(TokenError::UnknownKey { kid, .. }) if kid == "other1"
        ));
    }

    #[test]
    fn tampered_payload_is_rejected() {
        let f = fixture();
        let token = sign(&header("EdDSA", "ed1"), &claims(ISS), &f.ed);
        let parts: Vec<&str> = token.split('.').collect();
        let mut c = claims(ISS);
        c["roles"] = json!(["admin"]);
        let tampered = format!("{}.{}.{}", parts[0], b64(c.to_string()), parts[2]);
        assert_eq!(
            f.verifier.verify(&tampered, NOW),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn alg_none_and_hmac_are_rejected() {
        let f = fixture();
        let unsigned = format!(
            "{}.{}.",
            b64(json!({"alg": "none", "typ": "JWT"}).to_string()),
            b64(claims(ISS).to_string())
        );
        assert_eq!(
            f.verifier.verify(&unsigned, NOW),
            Err(TokenError::UnsupportedAlg("none".to_string()))
        );
        let hmac = sign(&header("HS256", "hmac"), &claims(ISS), &f.ed);
        assert_eq!(
            f.verifier.verify(&hmac, NOW),
            Err(TokenError::UnsupportedAlg("HS256".to_string()))
        );
    }

    #[test]
    fn alg_must_fit_the_key() {
        let f = fixture();
        // An ES256 header naming the Ed25519 key.
        let token = sign(&header("ES256", "ed1"), &claims(ISS), &f.ed);
        assert_eq!(
            f.verifier.verify(&token, NOW),
            Err(TokenError::KeyAlgMismatch {
                kid: "ed1".to_string(),
                alg: "ES256"
            })
        );
    }

    #[test]
    fn unknown_kid_is_rejected() {
        let f = fixture();
        let token = sign(&header("EdDSA", "rotated-away"), &claims(ISS), &f.ed);
        assert_eq!(
            f.verifier.verify(&token, NOW),
            Err(TokenError::UnknownKey {
                issuer: ISS.to_string(),
                kid: "rotated-away".to_string()
            })
        );
        // The skipped HMAC key's kid is unknown too.
        let token = sign(&header("EdDSA", "hmac"), &claims(ISS), &f.ed);
        assert!(matches!(
            f.verifier.verify(&token, NOW),
            Err(TokenError::UnknownKey { .. })
        ));
    }

    #[test]
    fn header_typ_and_crit_are_checked() {
        let f = fixture();
        let at = json!({"alg": "EdDSA", "kid": "ed1", "typ": "AT+JWT"});
        assert!(
            f.verifier
                .verify(&sign(&at, &claims(ISS), &f.ed), NOW)
                .is_ok()
        );
        let logout = json!({"alg": "EdDSA", "kid": "ed1", "typ": "logout+jwt"});
        assert_eq!(
            f.verifier.verify(&sign(&logout, &claims(ISS), &f.ed), NOW),
            Err(TokenError::UnsupportedType("logout+jwt".to_string()))
        );
        let crit = json!({"alg": "EdDSA", "kid": "ed1", "crit": ["exp"], "exp": 1});
        assert_eq!(
            f.verifier.verify(&sign(&crit, &claims(ISS), &f.ed), NOW),
            Err(TokenError::CriticalHeader)
        );
    }

    #[test]
    fn subject_and_roles_shapes_are_checked() {
        let f = fixture();
        let mut c = claims(ISS);
        c["sub"] = json!(42);
        let token = sign(&header("EdDSA", "ed1"), &c, &f.ed);
        assert!(matches!(
            f.verifier.verify(&token, NOW),
            Err(TokenError::InvalidClaim { claim, .. }) if claim == "sub"
        ));

        let mut c = claims(ISS);
        c["roles"] = json!(["ok", 7]);
        let token = sign(&header("EdDSA", "ed1"), &c, &f.ed);
        assert!(matches!(
            f.verifier.verify(&token, NOW),
            Err(TokenError::InvalidClaim { claim, .. }) if claim == "roles"
        ));

        let mut c = claims(ISS);
        c.as_object_mut().unwrap().remove("roles");
        let token = sign(&header("EdDSA", "ed1"), &c, &f.ed);
        assert_eq!(f.verifier.verify(&token, NOW).unwrap().roles, ["reader"]);
    }

    #[test]
    fn malformed_tokens_are_rejected() {
        let f = fixture();
        let good = sign(&header("EdDSA", "ed1"), &claims(ISS), &f.ed);
        let parts: Vec<&str> = good.split('.').collect();
        let cases = [
            (
                format!("{}.{}", parts[0], parts[1]),
                "not three dot-separated parts",
            ),
            (format!("{good}.x"), "not three dot-separated parts"),
            (
                format!("{}!.{}.{}", parts[0], parts[1], parts[2]),
                "header is not base64url",
            ),
            (
                format!("{}.{}.{}", b64("not json"), parts[1], parts[2]),
                "header is not a JSON object with an `alg`",
            ),
            (
                format!("{}.{}.{}", parts[0], b64("[1,2]"), parts[2]),
                "payload is not a JSON object",
            ),
            (
                format!("{}.{}.{}", parts[0], parts[1], "a*b"),
                "signature is not base64url",
            ),
            ("a".repeat(MAX_TOKEN_LEN + 1), "longer than 16 KiB"),
        ];
        for (token, why) in cases {
            assert_eq!(
                f.verifier.verify(&token, NOW),
                Err(TokenError::Malformed(why)),
                "{why}"
            );
        }
    }

    #[test]
    fn padded_base64_is_accepted() {
        let f = fixture();
        let pad = |s: &str| format!("{s}{}", "=".repeat((4 - s.len() % 4) % 4));
        let good = sign(&header("EdDSA", "ed1"), &claims(ISS), &f.ed);
        let parts: Vec<&str> = good.split('.').collect();
        // Padding the signature only: the signed header.payload text is unchanged.
        let padded = format!("{}.{}.{}", parts[0], parts[1], pad(parts[2]));
        assert_ne!(padded, good);
        assert!(f.verifier.verify(&padded, NOW).is_ok());
    }

    #[test]
    fn bearer_header_parsing() {
        assert_eq!(bearer("Bearer abc.def.ghi"), Ok("abc.def.ghi"));
        assert_eq!(bearer("  bEaReR \t abc-_~+/==  "), Ok("abc-_~+/=="));
        for bad in [
            "Basic dXNlcjpwdw==",
            "Bearer",
            "Bearer ",
            "Bearer a b",
            "Bearer a\"b",
            "abc",
        ] {
            let err = bearer(bad).unwrap_err();
            assert!(matches!(err, TokenError::BadAuthorization(_)), "{bad:?}");
            assert_eq!(err.code(), "invalid_request");
        }
    }

    #[test]
    fn www_authenticate_values() {
        assert_eq!(
            www_authenticate("cloudlet", None, None),
            "Bearer realm=\"cloudlet\""
        );
        assert_eq!(
            www_authenticate("cloudlet", Some(&TokenError::Expired(1_700_000_000)), None),
            "Bearer realm=\"cloudlet\", error=\"invalid_token\", \
             error_description=\"token expired at 1700000000\""
        );
        let err = TokenError::UnknownIssuer("a\"b\\c\r\nX: y".to_string());
        assert_eq!(
            www_authenticate(
                "r\"1",
                Some(&err),
                Some("https://cloudlet.example/.well-known/oauth-protected-resource")
            ),
            "Bearer realm=\"r\\\"1\", error=\"invalid_token\", \
             error_description=\"untrusted issuer \\\"a\\\\\\\"b\\\\\\\\c\\\\r\\\\nX: y\\\"\", \
             resource_metadata=\"https://cloudlet.example/.well-known/oauth-protected-resource\""
        );
        // Raw control characters never reach the header.
        let raw = www_authenticate("r", Some(&TokenError::Malformed("x\ny")), None);
        assert!(
            raw.ends_with("error_description=\"malformed token: x?y\""),
            "{raw}"
        );
        assert_eq!(quoted("a\nb\u{e9}"), "a?b?");
    }

    #[test]
    fn long_quoted_values_are_clipped() {
        let f = fixture();
        let iss = "i".repeat(1000);
        let token = sign(&header("EdDSA", "ed1"), &claims(&iss), &f.ed);
        let Err(TokenError::UnknownIssuer(named)) = f.verifier.verify(&token, NOW) else {
            panic!("expected an unknown issuer");
        };
        assert_eq!(named, format!("{}...", "i".repeat(MAX_QUOTED)));
    }

    #[test]
    fn jwks_loading_rules() {
        let ed = TestKey::ed();
        // Only unusable keys: an encryption key, an RS384-only RSA key, an HMAC secret.
        let mut enc = ed.jwk("enc");
        enc["use"] = json!("enc");
        let mut rs384 = TestKey::rsa().jwk("rs384");
        rs384["alg"] = json!("RS384");
        let unusable = json!({"keys": [enc, rs384, {"kty": "oct", "k": "AA"}]}).to_string();
        assert!(matches!(
            Verifier::from_jwks(&[(config(ISS), unusable)]),
            Err(IdentityError::NoUsableKey { issuer }) if issuer == ISS
        ));

        assert!(matches!(
            Verifier::from_jwks(&[(config(ISS), "{\"no_keys\": 1}".to_string())]),
            Err(IdentityError::Jwks { .. })
        ));

        let good = json!({"keys": [ed.jwk("a")]}).to_string();
        assert!(matches!(
            Verifier::from_jwks(&[(config(ISS), good.clone()), (config(ISS), good.clone())]),
            Err(IdentityError::DuplicateIssuer(i)) if i == ISS
        ));

        let no_audience = IssuerConfig {
            audience: String::new(),
            ..config(ISS)
        };
        assert!(matches!(
            Verifier::from_jwks(&[(no_audience, good.clone())]),
            Err(IdentityError::EmptyField {
                field: "audience",
                ..
            })
        ));

        // A padded base64url `x` is accepted.
        let mut padded = ed.jwk("p");
        padded["x"] = json!(format!("{}=", padded["x"].as_str().unwrap()));
        let verifier =
            Verifier::from_jwks(&[(config(ISS), json!({"keys": [padded]}).to_string())]).unwrap();
        let token = sign(&header("EdDSA", "p"), &claims(ISS), &ed);
        assert!(verifier.verify(&token, NOW).is_ok());

        assert!(Verifier::from_jwks(&[]).unwrap().is_empty());
        assert!(!verifier.is_empty());
    }

    #[test]
    fn jwks_files_are_read() {
        let ed = TestKey::ed();
        let dir = std::env::temp_dir().join(format!("cloudlet-identity-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("jwks.json");
        std::fs::write(&path, json!({"keys": [ed.jwk("k")]}).to_string()).unwrap();

        let verifier = Verifier::from_jwks(
            &read_jwks_files(&[IssuerConfig {
                jwks: Some(path.clone()),
                ..config(ISS)
            }])
            .unwrap(),
        )
        .unwrap();
        let token = sign(&header("EdDSA", "k"), &claims(ISS), &ed);
        assert_eq!(verifier.verify(&token, NOW).unwrap().subject, "alice");

        let missing = read_jwks_files(&[IssuerConfig {
            jwks: Some(dir.join("absent.json")),
            ..config(ISS)
        }]);
        assert!(matches!(missing, Err(IdentityError::ReadJwks { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn issuer_config_defaults() {
        let config: IssuerConfig = toml::from_str(
            r#"
            issuer = "https://idp.example"
            audience = "cloudlet"
            jwks = "jwks.json"
            "#,
        )
        .unwrap();
        assert_eq!(config.roles_claim, "roles");
        assert_eq!(config.subject_claim, "sub");
        assert_eq!(config.leeway_s, 30);
        assert_eq!(config.jwks_refresh_s, 300);
        assert!(config.default_roles.is_empty());
        assert!(
            toml::from_str::<IssuerConfig>(
                "issuer = \"i\"\naudience = \"a\"\njwks = \"j\"\nleeway = 5\n"
            )
            .is_err()
        );
    }
}
