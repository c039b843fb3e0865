"""A small certificate authority for one SPIFFE trust domain, for `keyproxy dev --mtls` and tests.

`DevCA("dev.keyproxy.test")` makes a self-signed root (a SPIFFE signing certificate, its key in
memory only) and issues X.509-SVIDs (`svid`), a server certificate for 127.0.0.1 and localhost
(`server_cert`), or any leaf with the SANs given (`issue`). `bundle_pem` / `bundle_json` are the
trust bundle as PEM or as a SPIFFE bundle document. `Issued.write` puts a certificate chain and
its key in PEM files, the key mode 0600. SPIRE is not needed to try keyproxy's mTLS callers;
this is not a CA for production: its root key is never stored and nothing is revoked.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keyproxy.secret import write_private

_KEY_PEM = serialization.PrivateFormat.PKCS8
_LEAF_LIFETIME = dt.timedelta(hours=1)  # SPIRE's default X.509-SVID lifetime


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
        """Write `<name>.crt` (leaf first, then intermediates) and `<name>.key` (mode 0600)."""
        cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
        cert_path.write_bytes(self.chain_pem())
        write_private(key_path, self.key_pem())
        return cert_path, key_path


class DevCA:
    """A root CA for `trust_domain`, optionally issuing through one intermediate CA, valid
    for `lifetime` (one day unless given)."""

    def __init__(
        self,
        trust_domain: str = "example.org",
        *,
        intermediate: bool = False,
        lifetime: dt.timedelta = dt.timedelta(days=1),
    ) -> None:
        self.trust_domain = trust_domain
        self.lifetime = lifetime
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
            .not_valid_after(_now() + self.lifetime)
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
        """Issue a certificate with exactly the given SANs, signed by the issuing CA, valid
        for an hour unless `not_after` says otherwise; a new key unless `key` is given.

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
            .not_valid_after(not_after or _now() + _LEAF_LIFETIME)
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

    def svid(
        self,
        path: str = "/agent",
        *,
        not_after: dt.datetime | None = None,
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> Issued:
        """A valid X.509-SVID for spiffe://<trust domain><path>; with `key`, a renewal of the
        SVID holding that key."""
        uri = x509.UniformResourceIdentifier(f"spiffe://{self.trust_domain}{path}")
        return self.issue([uri], not_after=not_after, key=key)

    def server_cert(self, *, not_after: dt.datetime | None = None) -> Issued:
        """A server certificate for 127.0.0.1 and localhost."""
        sans: list[x509.GeneralName] = [
            x509.IPAddress(IPv4Address("127.0.0.1")),
            x509.DNSName("localhost"),
        ]
        return self.issue(sans, not_after=not_after)

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


DEV_TRUST_DOMAIN = "dev.keyproxy.test"
DEV_AGENT_PATH = "/agent/demo"
_DEV_LIFETIME = dt.timedelta(days=1)


@dataclass(frozen=True)
class DevTLS:
    """The TLS files of `keyproxy dev --mtls`, all in `directory` (keys mode 0600)."""

    directory: Path
    trust_domain: str
    agent_id: str  # the demo agent's SPIFFE ID
    bundle: Path  # ca.pem: the root, for clients (--cacert) and the listener's trust bundle
    certificate: Path  # server.crt / server.key: the listener's, for 127.0.0.1 and localhost
    key: Path
    agent_certificate: Path  # agent.crt / agent.key: the demo agent's X.509-SVID
    agent_key: Path

    def listener_yaml(self) -> dict[str, object]:
        """The `server.tls` section of a listener serving these files."""
        return {
            "certificate": str(self.certificate),
            "key": str(self.key),
            # Optional: callers with a token only keep working, and a bound token presented
            # without its certificate is answered 401, not refused in the handshake.
            "client_auth": "optional",
            "trust_bundles": {self.trust_domain: str(self.bundle)},
        }

    def handshake_fields(self) -> dict[str, str]:
        """What `keyproxy dev --json` adds about these files to its handshake line."""
        return {
            "tls_dir": str(self.directory),
            "ca": str(self.bundle),
            "agent_cert": str(self.agent_certificate),
            "agent_key": str(self.agent_key),
            "spiffe_id": self.agent_id,
        }


def write_dev_tls(
    directory: Path,
    trust_domain: str = DEV_TRUST_DOMAIN,
    agent_path: str = DEV_AGENT_PATH,
) -> DevTLS:
    """Make a CA for `trust_domain`, and write to `directory` (created mode 0700) its bundle,
    a server certificate and an X.509-SVID for spiffe://<trust_domain><agent_path>, each
    valid for a day; the root's key is not kept."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca = DevCA(trust_domain, lifetime=_DEV_LIFETIME + dt.timedelta(hours=1))
    until = _now() + _DEV_LIFETIME
    bundle = directory / "ca.pem"
    bundle.write_bytes(ca.bundle_pem())
    certificate, key = ca.server_cert(not_after=until).write(directory, "server")
    agent_certificate, agent_key = ca.svid(agent_path, not_after=until).write(directory, "agent")
    return DevTLS(
        directory,
        trust_domain,
        f"spiffe://{trust_domain}{agent_path}",
        bundle,
        certificate,
        key,
        agent_certificate,
        agent_key,
    )
