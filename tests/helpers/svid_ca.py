"""A small test certificate authority for one SPIFFE trust domain, built with `cryptography`.

`SvidCA("example.org")` makes a self-signed root (a SPIFFE signing certificate) and issues:
valid X.509-SVIDs, deliberately wrong ones (two URI SANs, expired, a CA certificate used as a
leaf), and a plain server certificate for 127.0.0.1. `Issued.write` puts a certificate chain and
its key in PEM files for `ssl` and aiohttp clients.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_KEY_PEM = serialization.PrivateFormat.PKCS8


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key_usage(*, ca: bool, digital_signature: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass(frozen=True)
class Issued:
    """A certificate, its private key, and the chain above it (without the root)."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    intermediates: tuple[x509.Certificate, ...] = ()

    @property
    def der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)

    def chain_pem(self) -> bytes:
        certs = (self.certificate, *self.intermediates)
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, _KEY_PEM, serialization.NoEncryption()
        )

    def write(self, directory: Path, name: str) -> tuple[Path, Path]:
        """Write `<name>.crt` (leaf first, then intermediates) and `<name>.key`; return both."""
        cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
        cert_path.write_bytes(self.chain_pem())
        key_path.write_bytes(self.key_pem())
        return cert_path, key_path


class SvidCA:
    """A root CA for `trust_domain`, optionally issuing through one intermediate CA."""

    def __init__(self, trust_domain: str = "example.org", *, intermediate: bool = False) -> None:
        self.trust_domain = trust_domain
        self.root = self._ca_cert(None, f"{trust_domain} root")
        self.issuer = (
            self._ca_cert(self.root, f"{trust_domain} intermediate") if intermediate else self.root
        )

    def _ca_cert(self, parent: Issued | None, name: str) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(parent.certificate.subject if parent else subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(hours=1))
            .not_valid_after(_now() + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_key_usage(ca=True, digital_signature=False), critical=True)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://{self.trust_domain}")]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        )
        signer = parent.key if parent else key
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), False
        )
        return Issued(builder.sign(signer, hashes.SHA256()), key)

    def _chain_above_leaf(self) -> tuple[x509.Certificate, ...]:
        return () if self.issuer is self.root else (self.issuer.certificate,)

    def issue(
        self,
        sans: list[x509.GeneralName],
        *,
        ca: bool = False,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        key: ec.EllipticCurvePrivateKey | None = None,
        key_usage: x509.KeyUsage | None = None,
        omit_key_usage: bool = False,
    ) -> Issued:
        """Issue a certificate with exactly the given SANs, signed by the issuing CA.

        The keyUsage is digitalSignature (plus keyCertSign and cRLSign for `ca`) unless
        `key_usage` is given or `omit_key_usage` leaves it out.
        """
        key = key or ec.generate_private_key(ec.SECP256R1())
        usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.issuer.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or _now() - dt.timedelta(minutes=5))
            .not_valid_after(not_after or _now() + dt.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            # An empty subject makes the SAN critical (RFC 5280 4.1.2.6).
            .add_extension(x509.SubjectAlternativeName(sans), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.issuer.key.public_key()),
                False,
            )
        )
        if not omit_key_usage:
            # A CA certificate used as a leaf keeps digitalSignature, so TLS accepts it as a
            # client certificate and only the SVID rules refuse it.
            usage = key_usage or _key_usage(ca=ca, digital_signature=True)
            builder = builder.add_extension(usage, critical=True)
        if not ca:
            builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        return Issued(builder.sign(self.issuer.key, hashes.SHA256()), key, self._chain_above_leaf())

    def svid(self, path: str = "/agent", **options: Any) -> Issued:
        """A valid X.509-SVID for spiffe://<trust domain><path>; `options` go to `issue`."""
        uri = x509.UniformResourceIdentifier(f"spiffe://{self.trust_domain}{path}")
        return self.issue([uri], **options)

    def svid_for(self, *uris: str, **options: Any) -> Issued:
        """A leaf carrying exactly these URI SANs (any trust domain, any count)."""
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        return self.issue(sans, **options)

    def expired_svid(self, path: str = "/agent") -> Issued:
        return self.svid(
            path,
            not_before=_now() - dt.timedelta(hours=2),
            not_after=_now() - dt.timedelta(hours=1),
        )

    def ca_as_leaf(self) -> Issued:
        """A CA certificate (cA=true, keyCertSign, digitalSignature) with a SPIFFE ID, as a leaf."""
        return self.svid("/agent", ca=True)

    def server_cert(self) -> Issued:
        """A server certificate for 127.0.0.1 and localhost."""
        return self.issue([x509.IPAddress(IPv4Address("127.0.0.1")), x509.DNSName("localhost")])

    def bundle_pem(self) -> bytes:
        return self.root.certificate.public_bytes(serialization.Encoding.PEM)

    def bundle_json(self) -> bytes:
        """The root as a SPIFFE bundle (a JWKS with one `x509-svid` entry), plus a JWT key."""
        der = self.root.certificate.public_bytes(serialization.Encoding.DER)
        point = self.root.key.public_key().public_numbers()

        def b64url(n: int) -> str:
            return base64.urlsafe_b64encode(n.to_bytes(32, "big")).rstrip(b"=").decode()

        x509_key = {
            "use": "x509-svid",
            "kty": "EC",
            "crv": "P-256",
            "x": b64url(point.x),
            "y": b64url(point.y),
            "x5c": [base64.b64encode(der).decode()],
        }
        jwt_key = {"use": "jwt-svid", "kid": "k1", "kty": "EC", "crv": "P-256",
                   "x": b64url(point.x), "y": b64url(point.y)}  # fmt: skip
        return json.dumps({"keys": [jwt_key, x509_key], "spiffe_sequence": 1}).encode()
