"""JWT keys and tokens for the MCP guard's tests (PyJWT and cryptography).

    python mint.py keys DIR
    python mint.py token --key PEM --alg ALG --kid KID --iss ISS --aud AUD --sub SUB
                         [--roles r1,r2] [--exp-in SECONDS | --no-exp] [--nbf-in SECONDS]

`keys` writes fresh private keys (PKCS#8 PEM) and the public key sets into DIR:

    a-rsa.pem   issuer A, RS256, kid a-rsa
    a-ec.pem    issuer A, ES256 (P-256), kid a-ec
    b-ed.pem    issuer B, EdDSA (Ed25519), kid b-ed
    c-rsa.pem   an issuer no one configures: sign with it under kid a-rsa to forge a token
    a.jwks.json {"keys": [a-rsa, a-ec]}   public keys, each with kid, alg and use "sig"
    b.jwks.json {"keys": [b-ed]}

`certs DIR` writes client certificates for TLS (ECDSA P-256, PEM) into DIR:

    ca.pem                  a CA (its certificate only)
    agent.pem, agent-key.pem    a client certificate for DNS name agent-1.agents.example, from ca
    rogue.pem, rogue-key.pem    the same name from another CA, which no one trusts

`token` prints one compact JWS to stdout. Its header is {"alg", "typ": "JWT", "kid"}; its
claims are iss, aud, sub, iat, jti, exp = now + --exp-in (default 300; negative gives an
expired token; --no-exp leaves exp out), nbf = now + --nbf-in when given, and roles (a
list) when --roles is given (`--roles ''` gives an empty list).

For the attacks a verifier must refuse, `--alg none` makes an unsigned token (no --key),
and `--alg HS256` (or HS384/HS512) signs with the bytes of the --key file as the HMAC
secret: with a public key file, the classic algorithm-confusion forgery. PyJWT refuses to
make either, so these are assembled by hand.
"""

import argparse
import base64
import hashlib
import hmac
import json
import sys
import time
import uuid
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

# file stem -> (key factory, alg, kid)
KEYS = {
    "a-rsa": (lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256", "a-rsa"),
    "a-ec": (lambda: ec.generate_private_key(ec.SECP256R1()), "ES256", "a-ec"),
    "b-ed": (ed25519.Ed25519PrivateKey.generate, "EdDSA", "b-ed"),
    "c-rsa": (lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256", "a-rsa"),
}
JWKS = {"a.jwks.json": ["a-rsa", "a-ec"], "b.jwks.json": ["b-ed"]}
HMAC = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}


def public_jwk(private_key, alg: str, kid: str) -> dict:
    public = private_key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
    return {**jwk, "kid": kid, "alg": alg, "use": "sig"}


def cmd_keys(args) -> None:
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    jwks = {}
    for stem, (generate, alg, kid) in KEYS.items():
        key = generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        (out / f"{stem}.pem").write_bytes(pem)
        jwks[stem] = public_jwk(key, alg, kid)
    for name, stems in JWKS.items():
        (out / name).write_text(json.dumps({"keys": [jwks[s] for s in stems]}, indent=2) + "\n")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def by_hand(claims: dict, header: dict, secret: bytes | None) -> str:
    """A compact JWS that PyJWT would refuse to make: `alg` none or an HMAC over any bytes."""
    signing_input = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
    if secret is None:
        return signing_input + "."
    digest = HMAC[header["alg"]]
    return signing_input + "." + b64url(hmac.new(secret, signing_input.encode(), digest).digest())


def cmd_token(args) -> None:
    now = int(time.time())
    claims = {"iss": args.iss, "aud": args.aud, "sub": args.sub, "iat": now, "jti": uuid.uuid4().hex}
    if not args.no_exp:
        claims["exp"] = now + args.exp_in
    if args.nbf_in is not None:
        claims["nbf"] = now + args.nbf_in
    if args.roles is not None:
        claims["roles"] = [r for r in args.roles.split(",") if r]
    header = {"alg": args.alg, "typ": "JWT", "kid": args.kid}

    if args.alg == "none":
        token = by_hand(claims, header, None)
    elif args.key is None:
        sys.exit(f"--alg {args.alg} needs --key")
    elif args.alg in HMAC:
        token = by_hand(claims, header, Path(args.key).read_bytes())
    else:
        key = serialization.load_pem_private_key(Path(args.key).read_bytes(), password=None)
        token = jwt.encode(claims, key, algorithm=args.alg, headers={"kid": args.kid, "typ": "JWT"})
    print(token)


def cmd_certs(args) -> None:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    validity = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def ca(cn):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(name(cn))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(validity[0])
            .not_valid_after(validity[1])
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .sign(key, hashes.SHA256())
        )
        return key, cert

    def client(ca_key, ca_cert, dns):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(dns))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(validity[0])
            .not_valid_after(validity[1])
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        return key, cert

    def write(stem, key, cert):
        (out / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            (out / f"{stem}-key.pem").write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )

    ca_key, ca_cert = ca("Cloudlet test client CA")
    rogue_key, rogue_ca = ca("Rogue CA")
    (out / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    write("agent", *client(ca_key, ca_cert, "agent-1.agents.example"))
    write("rogue", *client(rogue_key, rogue_ca, "agent-1.agents.example"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    keys = sub.add_parser("keys", help="write keys and JWKS files into DIR")
    keys.add_argument("dir")
    keys.set_defaults(run=cmd_keys)

    certs = sub.add_parser("certs", help="write a client CA and client certificates into DIR")
    certs.add_argument("dir")
    certs.set_defaults(run=cmd_certs)

    token = sub.add_parser("token", help="print a signed JWT")
    token.add_argument("--key", help="private key PEM (for HS*, any file: its bytes are the secret)")
    token.add_argument("--alg", required=True, help="RS256, ES256, EdDSA, ..., HS256, none")
    token.add_argument("--kid", required=True)
    token.add_argument("--iss", required=True)
    token.add_argument("--aud", required=True)
    token.add_argument("--sub", required=True)
    token.add_argument("--roles", help="comma-separated role names")
    token.add_argument("--exp-in", type=int, default=300, help="seconds until exp (negative: expired)")
    token.add_argument("--no-exp", action="store_true", help="leave the exp claim out")
    token.add_argument("--nbf-in", type=int, help="seconds until nbf")
    token.set_defaults(run=cmd_token)

    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
