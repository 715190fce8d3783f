//! The X25519MLKEM768 hybrid key exchange (TLS group 0x11EC, draft-ietf-tls-ecdhe-mlkem) as a
//! rustls [`SupportedKxGroup`]: ML-KEM-768 (FIPS 203) combined with X25519.
//!
//! The client side (key generation, decapsulation) runs on RustCrypto's `ml-kem` crate. The
//! server side encapsulates with Cryspen's formally verified `libcrux-ml-kem`, whose AVX2
//! code (picked at run time; portable code elsewhere) encapsulates about 3x as fast: that is
//! the one ML-KEM operation on a server's handshake path, and with `ml-kem` it put the
//! server's CPU per handshake at 1.31-1.37x the classical group's, against 1.11-1.17x now
//! (with the workspace's patched libcrux-sha3, third_party/README.md; see
//! docs/benchmarks.md). Both implement the same standard; the unit tests below and the
//! interop tests against aws-lc-rs check each side against another implementation.
//!
//! Shares and secret, post-quantum part first:
//!
//! | what          | layout                                                         | bytes |
//! |---------------|----------------------------------------------------------------|-------|
//! | client share  | ML-KEM-768 encapsulation key (1184) then X25519 public key (32) | 1216  |
//! | server share  | ML-KEM-768 ciphertext (1088) then X25519 public key (32)        | 1120  |
//! | shared secret | ML-KEM-768 shared key (32) then X25519 shared secret (32)       | 64    |
//!
//! The X25519 half is rustls' own ring-backed X25519 group ([`rustls::crypto::ring::kx_group::X25519`])
//! rather than a second implementation such as x25519-dalek: it is the same code that performs
//! the classical X25519 exchange when the peer picks bare X25519, so the key a client offers
//! twice (inside the hybrid share and as its own X25519 share) is one ring key, completed by
//! whichever of the two the server selects; ring is constant-time, already linked, and rejects
//! an all-zero result (a small-order peer point, RFC 7748 section 6.1) itself.
//!
//! Every malformed peer share (wrong length, an encapsulation key that fails the FIPS 203
//! modulus check, an X25519 point that gives the all-zero secret) fails with
//! [`PeerMisbehaved::InvalidKeyShare`], for which rustls sends the `illegal_parameter` alert.

use libcrux_ml_kem::mlkem768;
use ml_kem::{Decapsulate as _, DecapsulationKey768, KeyExport as _, MlKem768};
use ring::rand::{SecureRandom as _, SystemRandom};
use rustls::{
    Error, NamedGroup, PeerMisbehaved, ProtocolVersion,
    crypto::{
        ActiveKeyExchange, CompletedKeyExchange, GetRandomFailed, SharedSecret, SupportedKxGroup,
        ring::kx_group::X25519,
    },
    ffdhe_groups::FfdheGroup,
};

/// The group's TLS code point.
pub const GROUP: NamedGroup = NamedGroup::X25519MLKEM768;
/// Length of an ML-KEM-768 encapsulation key (the client's post-quantum share).
pub const MLKEM768_ENCAPSULATION_KEY_LEN: usize = 1184;
/// Length of an ML-KEM-768 ciphertext (the server's post-quantum share).
pub const MLKEM768_CIPHERTEXT_LEN: usize = 1088;
/// Length of an ML-KEM-768 shared key.
pub const MLKEM768_SHARED_KEY_LEN: usize = 32;
/// Length of an X25519 public key and of an X25519 shared secret.
pub const X25519_LEN: usize = 32;
/// Length of the client's key share.
pub const CLIENT_SHARE_LEN: usize = MLKEM768_ENCAPSULATION_KEY_LEN + X25519_LEN;
/// Length of the server's key share.
pub const SERVER_SHARE_LEN: usize = MLKEM768_CIPHERTEXT_LEN + X25519_LEN;
/// Length of the combined shared secret.
pub const SHARED_SECRET_LEN: usize = MLKEM768_SHARED_KEY_LEN + X25519_LEN;

/// The X25519MLKEM768 group; see the [module documentation](self).
pub static X25519MLKEM768: &dyn SupportedKxGroup = &X25519MlKem768 { _private: () };

/// The X25519MLKEM768 hybrid group. Use it through [`X25519MLKEM768`].
#[derive(Debug)]
pub struct X25519MlKem768 {
    _private: (),
}

const INVALID_KEY_SHARE: Error = Error::PeerMisbehaved(PeerMisbehaved::InvalidKeyShare);

/// Splits a peer's share into its ML-KEM part (`pq_len` bytes) and its X25519 part, or fails
/// if it is not exactly `pq_len + X25519_LEN` bytes long.
fn split(share: &[u8], pq_len: usize) -> Result<(&[u8], &[u8]), Error> {
    if share.len() != pq_len + X25519_LEN {
        return Err(INVALID_KEY_SHARE);
    }
    Ok(share.split_at(pq_len))
}

/// Fills `buf` from the operating system's RNG.
fn fill_random(buf: &mut [u8]) -> Result<(), Error> {
    SystemRandom::new()
        .fill(buf)
        .map_err(|_| Error::from(GetRandomFailed))
}

impl SupportedKxGroup for X25519MlKem768 {
    /// Client side: a fresh ML-KEM-768 key pair and a fresh X25519 key.
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, Error> {
        let mut seed = ml_kem::Seed::default();
        fill_random(&mut seed)?;
        let decapsulation_key = Box::new(DecapsulationKey768::from_seed(seed));
        seed.fill(0);
        let classical = X25519.start()?;
        let mut share = Vec::with_capacity(CLIENT_SHARE_LEN);
        share.extend_from_slice(&decapsulation_key.encapsulation_key().to_bytes());
        share.extend_from_slice(classical.pub_key());
        debug_assert_eq!(share.len(), CLIENT_SHARE_LEN);
        Ok(Box::new(ClientKeyExchange {
            decapsulation_key,
            classical,
            share,
        }))
    }

    /// Server side: encapsulate to the client's ML-KEM key and complete X25519 with a fresh
    /// key of our own.
    fn start_and_complete(&self, client_share: &[u8]) -> Result<CompletedKeyExchange, Error> {
        let (pq_share, classical_share) = split(client_share, MLKEM768_ENCAPSULATION_KEY_LEN)?;
        let encoded: [u8; MLKEM768_ENCAPSULATION_KEY_LEN] =
            pq_share.try_into().map_err(|_| INVALID_KEY_SHARE)?;
        let encapsulation_key = mlkem768::MlKem768PublicKey::from(encoded);
        // FIPS 203's encapsulation key check (every coefficient below q), which libcrux leaves
        // to its caller.
        if !mlkem768::validate_public_key(&encapsulation_key) {
            return Err(INVALID_KEY_SHARE);
        }
        let classical = X25519.start_and_complete(classical_share)?;

        // FIPS 203 section 7.2: encapsulation draws 32 fresh random bytes.
        let mut m = [0u8; 32];
        fill_random(&mut m)?;
        let (ciphertext, mut pq_secret) = mlkem768::encapsulate(&encapsulation_key, m);
        m.fill(0);
        let secret = combine(&pq_secret, classical.secret.secret_bytes());
        pq_secret.fill(0);

        let mut pub_key = Vec::with_capacity(SERVER_SHARE_LEN);
        pub_key.extend_from_slice(ciphertext.as_slice());
        pub_key.extend_from_slice(&classical.pub_key);
        Ok(CompletedKeyExchange {
            group: GROUP,
            pub_key,
            secret,
        })
    }

    fn ffdhe_group(&self) -> Option<FfdheGroup<'static>> {
        None
    }

    fn name(&self) -> NamedGroup {
        GROUP
    }

    /// Hybrid groups exist only in TLS 1.3.
    fn usable_for_version(&self, version: ProtocolVersion) -> bool {
        version == ProtocolVersion::TLSv1_3
    }
}

/// The shared secret: ML-KEM's then X25519's.
fn combine(pq_secret: &[u8], classical_secret: &[u8]) -> SharedSecret {
    let mut secret = Vec::with_capacity(SHARED_SECRET_LEN);
    secret.extend_from_slice(pq_secret);
    secret.extend_from_slice(classical_secret);
    // `SharedSecret` zeroes its buffer on drop.
    SharedSecret::from(secret)
}

/// A client's key exchange in progress: its ML-KEM decapsulation key and its X25519 key.
struct ClientKeyExchange {
    decapsulation_key: Box<DecapsulationKey768>,
    classical: Box<dyn ActiveKeyExchange>,
    share: Vec<u8>,
}

impl ActiveKeyExchange for ClientKeyExchange {
    /// The server chose the hybrid: decapsulate its ciphertext and complete X25519.
    fn complete(self: Box<Self>, server_share: &[u8]) -> Result<SharedSecret, Error> {
        let (pq_share, classical_share) = split(server_share, MLKEM768_CIPHERTEXT_LEN)?;
        let ciphertext =
            <&ml_kem::Ciphertext<MlKem768>>::try_from(pq_share).map_err(|_| INVALID_KEY_SHARE)?;
        let classical_secret = self.classical.complete(classical_share)?;
        // ML-KEM decapsulation never fails: a ciphertext that does not match gives an
        // unrelated key (implicit rejection), and the handshake then fails at Finished.
        let pq_secret = self.decapsulation_key.decapsulate(ciphertext);
        Ok(combine(&pq_secret, classical_secret.secret_bytes()))
    }

    /// The X25519 key inside our hybrid share, offered again as a bare X25519 share.
    fn hybrid_component(&self) -> Option<(NamedGroup, &[u8])> {
        Some((self.classical.group(), self.classical.pub_key()))
    }

    /// The server chose bare X25519: complete it with the same X25519 key.
    fn complete_hybrid_component(
        self: Box<Self>,
        server_share: &[u8],
    ) -> Result<SharedSecret, Error> {
        self.classical.complete(server_share)
    }

    fn pub_key(&self) -> &[u8] {
        &self.share
    }

    fn ffdhe_group(&self) -> Option<FfdheGroup<'static>> {
        None
    }

    fn group(&self) -> NamedGroup {
        GROUP
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ml_kem::EncapsulationKey768;

    /// The client's and the server's secrets from one exchange.
    fn exchange() -> (Vec<u8>, CompletedKeyExchange) {
        let client = X25519MLKEM768.start().unwrap();
        assert_eq!(client.group(), GROUP);
        assert_eq!(client.pub_key().len(), CLIENT_SHARE_LEN);
        let server = X25519MLKEM768.start_and_complete(client.pub_key()).unwrap();
        assert_eq!(server.group, GROUP);
        assert_eq!(server.pub_key.len(), SERVER_SHARE_LEN);
        let client_secret = client.complete(&server.pub_key).unwrap();
        (client_secret.secret_bytes().to_vec(), server)
    }

    #[test]
    fn both_sides_agree_on_a_64_byte_secret() {
        let (client, server) = exchange();
        assert_eq!(client.len(), SHARED_SECRET_LEN);
        assert_eq!(client, server.secret.secret_bytes());
        // Fresh keys every time.
        let (again, _) = exchange();
        assert_ne!(client, again);
    }

    #[test]
    fn secret_is_ml_kem_then_x25519() {
        let client = X25519MLKEM768.start().unwrap();
        let (ek, x25519_pub) = client.pub_key().split_at(MLKEM768_ENCAPSULATION_KEY_LEN);
        // Be the server by hand: encapsulate with known randomness, and do X25519 alone.
        let ek = EncapsulationKey768::new(ek.try_into().unwrap()).unwrap();
        let (ciphertext, pq_secret) = ek.encapsulate_deterministic(&[7u8; 32].into());
        let classical = X25519.start_and_complete(x25519_pub).unwrap();
        let server_share = [ciphertext.as_slice(), &classical.pub_key].concat();
        let secret = client.complete(&server_share).unwrap();
        assert_eq!(
            secret.secret_bytes(),
            [pq_secret.as_slice(), classical.secret.secret_bytes()].concat()
        );
    }

    #[test]
    fn hybrid_component_is_the_same_x25519_key() {
        let client = X25519MLKEM768.start().unwrap();
        let (group, x25519_pub) = client.hybrid_component().unwrap();
        assert_eq!(group, NamedGroup::X25519);
        assert_eq!(
            x25519_pub,
            &client.pub_key()[MLKEM768_ENCAPSULATION_KEY_LEN..]
        );
        let server = X25519.start_and_complete(x25519_pub).unwrap();
        let secret = client.complete_hybrid_component(&server.pub_key).unwrap();
        assert_eq!(secret.secret_bytes(), server.secret.secret_bytes());
        assert_eq!(secret.secret_bytes().len(), X25519_LEN);
    }

    fn assert_invalid_key_share<T>(r: Result<T, Error>) {
        match r {
            Err(Error::PeerMisbehaved(PeerMisbehaved::InvalidKeyShare)) => {}
            Err(e) => panic!("expected InvalidKeyShare, got {e:?}"),
            Ok(_) => panic!("expected InvalidKeyShare, got a secret"),
        }
    }

    #[test]
    fn client_share_of_wrong_length_is_refused() {
        let good = X25519MLKEM768.start().unwrap().pub_key().to_vec();
        for len in [
            0,
            1,
            32,
            CLIENT_SHARE_LEN - 1,
            CLIENT_SHARE_LEN + 1,
            SERVER_SHARE_LEN,
        ] {
            let mut share = good.clone();
            share.resize(len, 0x42);
            assert_invalid_key_share(X25519MLKEM768.start_and_complete(&share));
        }
    }

    #[test]
    fn server_share_of_wrong_length_is_refused() {
        for len in [
            0,
            32,
            SERVER_SHARE_LEN - 1,
            SERVER_SHARE_LEN + 1,
            CLIENT_SHARE_LEN,
        ] {
            let client = X25519MLKEM768.start().unwrap();
            let server = X25519MLKEM768.start_and_complete(client.pub_key()).unwrap();
            let mut share = server.pub_key.clone();
            share.resize(len, 0x42);
            assert_invalid_key_share(client.complete(&share));
        }
    }

    #[test]
    fn encapsulation_key_with_coefficient_not_below_q_is_refused() {
        let mut share = X25519MLKEM768.start().unwrap().pub_key().to_vec();
        // The first coefficient is the low 12 bits of bytes 0 and 1: make it 4095 >= 3329.
        share[0] = 0xff;
        share[1] |= 0x0f;
        assert_invalid_key_share(X25519MLKEM768.start_and_complete(&share));
        // 3329 itself is out of range too; 3328 is fine.
        share[0] = (3329 & 0xff) as u8;
        share[1] = (share[1] & 0xf0) | (3329 >> 8) as u8;
        assert_invalid_key_share(X25519MLKEM768.start_and_complete(&share));
        share[0] = (3328 & 0xff) as u8;
        assert!(X25519MLKEM768.start_and_complete(&share).is_ok());
    }

    #[test]
    fn all_zero_x25519_result_is_refused() {
        // u = 0 and u = 1 are points of small order: X25519 with them gives all zeros.
        for point in [[0u8; 32], {
            let mut one = [0u8; 32];
            one[0] = 1;
            one
        }] {
            let mut client_share = X25519MLKEM768.start().unwrap().pub_key().to_vec();
            client_share[MLKEM768_ENCAPSULATION_KEY_LEN..].copy_from_slice(&point);
            assert_invalid_key_share(X25519MLKEM768.start_and_complete(&client_share));

            let client = X25519MLKEM768.start().unwrap();
            let mut server_share = X25519MLKEM768
                .start_and_complete(client.pub_key())
                .unwrap()
                .pub_key;
            server_share[MLKEM768_CIPHERTEXT_LEN..].copy_from_slice(&point);
            assert_invalid_key_share(client.complete(&server_share));

            let client = X25519MLKEM768.start().unwrap();
            assert_invalid_key_share(client.complete_hybrid_component(&point));
        }
    }

    #[test]
    fn tampered_ciphertext_gives_a_different_secret() {
        let client = X25519MLKEM768.start().unwrap();
        let server = X25519MLKEM768.start_and_complete(client.pub_key()).unwrap();
        let mut share = server.pub_key.clone();
        share[10] ^= 1;
        let secret = client.complete(&share).unwrap();
        assert_ne!(secret.secret_bytes(), server.secret.secret_bytes());
        // Only the ML-KEM half differs.
        assert_eq!(
            secret.secret_bytes()[MLKEM768_SHARED_KEY_LEN..],
            server.secret.secret_bytes()[MLKEM768_SHARED_KEY_LEN..]
        );
    }

    #[test]
    fn only_for_tls13() {
        assert!(X25519MLKEM768.usable_for_version(ProtocolVersion::TLSv1_3));
        assert!(!X25519MLKEM768.usable_for_version(ProtocolVersion::TLSv1_2));
        assert_eq!(u16::from(X25519MLKEM768.name()), 0x11ec);
    }
}
