//! The pieces of the hybrid key exchange: ML-KEM-768 key generation, encapsulation (with
//! the encapsulation key check FIPS 203 requires) and decapsulation, in RustCrypto's
//! `ml-kem` (Cloudlet's client side) and Cryspen's `libcrux-ml-kem` (formally verified, with
//! AVX2 code; Cloudlet's server side encapsulates with it); X25519's key generation and
//! agreement in ring (the hybrid's classical half, and rustls' own X25519) and in
//! x25519-dalek; and Cloudlet's whole X25519MLKEM768 group, client and server side.

use criterion::{Criterion, criterion_group, criterion_main};
use ml_kem::{
    Decapsulate as _, DecapsulationKey768, EncapsulationKey768, KeyExport as _, MlKem768,
};
use ring::rand::SecureRandom as _;

fn random<const N: usize>(rng: &ring::rand::SystemRandom) -> [u8; N] {
    let mut b = [0u8; N];
    rng.fill(&mut b).expect("system RNG");
    b
}

fn benches(c: &mut Criterion) {
    let rng = ring::rand::SystemRandom::new();

    let mut g = c.benchmark_group("mlkem768");
    // RustCrypto ml-kem.
    g.bench_function("ml-kem/keygen", |b| {
        b.iter(|| DecapsulationKey768::from_seed(random::<64>(&rng).into()))
    });
    let dk = DecapsulationKey768::from_seed(random::<64>(&rng).into());
    let ek_bytes = dk.encapsulation_key().to_bytes();
    g.bench_function("ml-kem/encaps", |b| {
        b.iter(|| {
            let ek = EncapsulationKey768::new(&ek_bytes).expect("valid key");
            ek.encapsulate_deterministic(&random::<32>(&rng).into())
        })
    });
    let (ct, _) = dk
        .encapsulation_key()
        .encapsulate_deterministic(&random::<32>(&rng).into());
    let ct: ml_kem::Ciphertext<MlKem768> = ct;
    g.bench_function("ml-kem/decaps", |b| b.iter(|| dk.decapsulate(&ct)));

    // libcrux-ml-kem (runtime dispatch to AVX2 where the CPU has it).
    use libcrux_ml_kem::mlkem768;
    g.bench_function("libcrux/keygen", |b| {
        b.iter(|| mlkem768::generate_key_pair(random::<64>(&rng)))
    });
    let pair = mlkem768::generate_key_pair(random::<64>(&rng));
    let pk_bytes = *pair.public_key().as_slice();
    g.bench_function("libcrux/encaps", |b| {
        b.iter(|| {
            let pk = mlkem768::MlKem768PublicKey::from(pk_bytes);
            assert!(mlkem768::validate_public_key(&pk));
            mlkem768::encapsulate(&pk, random::<32>(&rng))
        })
    });
    let (ct, _) = mlkem768::encapsulate(pair.public_key(), random::<32>(&rng));
    g.bench_function("libcrux/decaps", |b| {
        b.iter(|| mlkem768::decapsulate(pair.private_key(), &ct))
    });
    g.finish();

    let mut g = c.benchmark_group("kx");
    g.bench_function("x25519/keygen+agree", |b| {
        let peer = ring::agreement::EphemeralPrivateKey::generate(&ring::agreement::X25519, &rng)
            .expect("key");
        let peer_public = peer.compute_public_key().expect("public key");
        b.iter(|| {
            let key =
                ring::agreement::EphemeralPrivateKey::generate(&ring::agreement::X25519, &rng)
                    .expect("key");
            let _ = key.compute_public_key().expect("public key");
            ring::agreement::agree_ephemeral(
                key,
                &ring::agreement::UnparsedPublicKey::new(&ring::agreement::X25519, &peer_public),
                |s| s.len(),
            )
            .expect("agree")
        })
    });
    g.bench_function("x25519-dalek/keygen+agree", |b| {
        let peer = x25519_dalek::PublicKey::from(&x25519_dalek::EphemeralSecret::random());
        b.iter(|| {
            let key = x25519_dalek::EphemeralSecret::random();
            let _ = x25519_dalek::PublicKey::from(&key);
            key.diffie_hellman(&peer)
        })
    });
    let hybrid = cloudlet::quic::X25519MLKEM768;
    g.bench_function("x25519mlkem768/client-start", |b| {
        b.iter(|| hybrid.start().expect("start"))
    });
    let client = hybrid.start().expect("start");
    let client_share = client.pub_key().to_vec();
    g.bench_function("x25519mlkem768/server", |b| {
        b.iter(|| hybrid.start_and_complete(&client_share).expect("server"))
    });
    let server_share = hybrid
        .start_and_complete(&client_share)
        .expect("server")
        .pub_key;
    g.bench_function("x25519mlkem768/client-complete", |b| {
        b.iter_batched(
            || hybrid.start().expect("start"),
            |c| {
                // A different client key: the secret is wrong, the work the same.
                c.complete(&server_share).expect("complete")
            },
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(mlkem, benches);
criterion_main!(mlkem);
