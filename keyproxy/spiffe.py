"""SPIFFE IDs and X.509-SVIDs: parse, check and verify, with no I/O.

- `parse_spiffe_id(text)` validates an ID by the SPIFFE ID standard: the `spiffe://` scheme,
  a trust domain of `[a-z0-9._-]` (at most 255 characters), a path of non-empty segments of
  `[a-zA-Z0-9._-]` without `.` or `..`, and at most 2048 bytes in all. The character sets leave
  no room for userinfo, a port, a query, a fragment or percent-encoding; they are refused.
- `parse_bundle(trust_domain, data)` reads a trust bundle: PEM certificates, or a SPIFFE bundle
  (a JWKS whose `use: x509-svid` entries carry the CA certificate as the first `x5c` value).
- `SvidVerifier(bundles).verify(chain, now)` turns the DER chain a client presented (leaf first)
  into an `Svid`, or raises `Unauthenticated` with a distinct `reason` for each refusal.
- `thumbprint(der)` is RFC 8705's `x5t#S256`: base64url (no padding) of SHA-256 of the DER;
  `presents(expected, der)` says whether a connection's certificate is the one a bound token
  names (compared in constant time). `key_thumbprint(certificate)` is the same of its
  SubjectPublicKeyInfo: what a renewed SVID keeps when it keeps its key.

How a chain is verified. The TLS handshake (Python's `ssl`, see keyproxy/tls.py) already checked
the chain against the union of all configured bundles; that alone would let trust domain A's CA
vouch for an ID in trust domain B. So `verify` first checks the leaf itself (the X.509-SVID
rules: not a CA, keyUsage digitalSignature without keyCertSign/cRLSign, an extendedKeyUsage,
if any, with clientAuth, exactly one URI SAN that is a SPIFFE ID with a path, inside its
validity window), then picks the bundle of the leaf's own
trust domain and verifies the chain again against that bundle alone, with
`cryptography.x509.verification`'s client verifier (RFC 5280 path validation with the Web PKI
profile; it accepts leaves whose only SAN is a URI, as SVIDs are). The leaf checks run first so
that each refusal has its own reason; the path validation repeats some of them, which is cheap.
`verify` is complete on its own, so it serves as well for a certificate that a trusted front
proxy forwarded in a header, where no handshake of ours checked anything.

We do not use the `spiffe` package: it pulls in gRPC and protobuf for its Workload API client,
reads only PEM/DER bundles, and has no verifier for a peer's chain; the ID grammar is a few lines
of the standard and the X.509 work is `cryptography`'s.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

import orjson
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from keyproxy.errors import Unauthenticated

SCHEME = "spiffe://"
MAX_ID_BYTES = 2048
MAX_TRUST_DOMAIN_CHARS = 255
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[a-zA-Z0-9._-]+")
# A path longer than any SVID chain keyproxy expects to see: root, intermediates, leaf.
_MAX_CHAIN_DEPTH = 8


class InvalidSpiffeId(ValueError):
    """The text is not a SPIFFE ID as the standard defines it."""


class BundleError(ValueError):
    """A trust bundle could not be read (no certificates, bad JSON, bad base64 or DER)."""


@dataclass(frozen=True, order=True)
class SpiffeId:
    """A validated SPIFFE ID; `path` is "" for the ID of the trust domain itself."""

    trust_domain: str
    path: str

    def __str__(self) -> str:
        return f"{SCHEME}{self.trust_domain}{self.path}"


def validate_trust_domain(name: str) -> str:
    """Return `name` if it is a valid trust domain name, else raise `InvalidSpiffeId`."""
    if not name:
        raise InvalidSpiffeId("the trust domain is empty")
    if len(name) > MAX_TRUST_DOMAIN_CHARS:
        raise InvalidSpiffeId(f"the trust domain is longer than {MAX_TRUST_DOMAIN_CHARS}")
    if not _TRUST_DOMAIN.fullmatch(name):
        raise InvalidSpiffeId("the trust domain may hold only a-z, 0-9, '.', '-' and '_'")
    return name


def parse_spiffe_id(text: str) -> SpiffeId:
    """Parse and validate `text` as a SPIFFE ID (see the module docstring for the rules)."""
    if len(text.encode()) > MAX_ID_BYTES:
        raise InvalidSpiffeId(f"longer than {MAX_ID_BYTES} bytes")
    if not text.startswith(SCHEME):
        raise InvalidSpiffeId("the scheme is not spiffe://")
    rest = text[len(SCHEME) :]
    trust_domain, slash, path = rest.partition("/")
    validate_trust_domain(trust_domain)
    if not slash:
        return SpiffeId(trust_domain, "")
    for segment in path.split("/"):
        if not segment:
            raise InvalidSpiffeId("the path has an empty segment (or a trailing '/')")
        if segment in {".", ".."}:
            raise InvalidSpiffeId("the path has a '.' or '..' segment")
        if not _SEGMENT.fullmatch(segment):
            raise InvalidSpiffeId("a path segment may hold only a-z, A-Z, 0-9, '.', '-' and '_'")
    return SpiffeId(trust_domain, "/" + path)


@dataclass(frozen=True)
class TrustBundle:
    """The X.509 authorities of one trust domain."""

    trust_domain: str
    authorities: tuple[x509.Certificate, ...]

    def pem(self) -> bytes:
        """The authorities as concatenated PEM, for `ssl.SSLContext.load_verify_locations`."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.authorities)


def parse_bundle(trust_domain: str, data: bytes) -> TrustBundle:
    """Read a trust bundle: a SPIFFE bundle JSON document, or PEM certificates."""
    validate_trust_domain(trust_domain)
    if data.lstrip().startswith(b"{"):
        authorities = _bundle_json_authorities(data)
    else:
        try:
            authorities = tuple(x509.load_pem_x509_certificates(data))
        except ValueError as exc:
            raise BundleError(f"not PEM certificates: {exc}") from None
    if not authorities:
        raise BundleError("the bundle holds no X.509 authority")
    return TrustBundle(trust_domain, authorities)


def _bundle_json_authorities(data: bytes) -> tuple[x509.Certificate, ...]:
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BundleError(f"not JSON: {exc}") from None
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list):
        raise BundleError("a SPIFFE bundle is a JWK set with a 'keys' list")
    authorities = []
    for index, key in enumerate(keys):
        # SPIFFE bundle spec: only x509-svid entries with an x5c count; extra x5c values are
        # ignored, and an entry without x5c is skipped.
        if not isinstance(key, dict) or key.get("use") != "x509-svid":
            continue
        x5c = key.get("x5c")
        if not isinstance(x5c, list) or not x5c or not isinstance(x5c[0], str):
            continue
        try:
            der = base64.b64decode(x5c[0], validate=True)
            authorities.append(x509.load_der_x509_certificate(der))
        except (binascii.Error, ValueError):
            raise BundleError(f"keys[{index}].x5c[0] is not a base64 DER certificate") from None
    return tuple(authorities)


def thumbprint(der: bytes) -> str:
    """RFC 8705 `x5t#S256`: base64url, unpadded, of the SHA-256 of the DER certificate."""
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


def key_thumbprint(certificate: x509.Certificate) -> str:
    """base64url, unpadded, of the SHA-256 of the certificate's SubjectPublicKeyInfo (DER):
    `thumbprint`'s encoding, of the key instead of the certificate."""
    return thumbprint(
        certificate.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def presents(expected: str, der: bytes | None) -> bool:
    """Whether the connection's certificate `der` is the one a token's `cnf.x5t#S256` names."""
    return der is not None and hmac.compare_digest(thumbprint(der), expected)


@dataclass(frozen=True)
class Svid:
    """A verified X.509-SVID: the caller's SPIFFE ID, its certificate's thumbprint and its
    public key's (`key_thumbprint`)."""

    spiffe_id: SpiffeId
    thumbprint: str
    not_after: dt.datetime
    key: str

    @property
    def issuer(self) -> str:
        """The identity's issuer is the trust domain."""
        return self.spiffe_id.trust_domain

    @property
    def subject(self) -> str:
        """The identity's subject is the whole SPIFFE ID."""
        return str(self.spiffe_id)


def check_leaf(leaf: x509.Certificate, now: dt.datetime) -> SpiffeId:
    """The X.509-SVID leaf rules (X509-SVID standard, 5.2); return the leaf's SPIFFE ID."""
    try:
        constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is not None and constraints.ca:
        raise Unauthenticated("svid_leaf_is_ca", "the client certificate is a CA certificate")
    try:
        usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise Unauthenticated("svid_key_usage", "the client certificate has no keyUsage") from None
    if usage.key_cert_sign or usage.crl_sign or not usage.digital_signature:
        raise Unauthenticated(
            "svid_key_usage",
            "an SVID's keyUsage has digitalSignature and neither keyCertSign nor cRLSign",
        )
    # The path validation refuses it too, but only as an untrusted chain.
    try:
        purposes = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        purposes = None
    if purposes is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in purposes:
        raise Unauthenticated(
            "svid_key_usage", "the client certificate's extendedKeyUsage has no clientAuth"
        )
    spiffe_id = _leaf_spiffe_id(leaf)
    when = out_of_date(leaf, now)
    if when is not None:
        raise Unauthenticated(f"svid_{when}", f"the client certificate is {when.replace('_', ' ')}")
    return spiffe_id


def out_of_date(certificate: x509.Certificate, now: dt.datetime) -> str | None:
    """Why `certificate` is not valid at `now` ("not_yet_valid", "expired"), or None."""
    if now < certificate.not_valid_before_utc:
        return "not_yet_valid"
    if now > certificate.not_valid_after_utc:
        return "expired"
    return None


def _leaf_spiffe_id(leaf: x509.Certificate) -> SpiffeId:
    try:
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if len(uris) != 1:
        raise Unauthenticated(
            "svid_uri_san_count", f"an SVID has exactly one URI SAN, this one has {len(uris)}"
        )
    try:
        spiffe_id = parse_spiffe_id(uris[0])
    except InvalidSpiffeId as exc:
        raise Unauthenticated("svid_invalid_id", f"the URI SAN is no SPIFFE ID: {exc}") from None
    if not spiffe_id.path:
        raise Unauthenticated("svid_invalid_id", "a leaf SVID's SPIFFE ID has a path")
    return spiffe_id


# What cryptography raises for a certificate it parsed but cannot read on (a field given
# twice, a name or key of a kind it does not know): a malformed SVID, never a 500. A
# forwarded certificate reaches here unchecked by any handshake.
_UNREADABLE: Final = (
    ValueError,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
    UnsupportedAlgorithm,
)


class SvidVerifier:
    """Verifies client certificate chains against per-trust-domain bundles."""

    def __init__(self, bundles: Iterable[TrustBundle]) -> None:
        self._stores: dict[str, Store] = {}
        for bundle in bundles:
            if bundle.trust_domain in self._stores:
                raise BundleError(f"two bundles for trust domain {bundle.trust_domain}")
            self._stores[bundle.trust_domain] = Store(list(bundle.authorities))

    @property
    def trust_domains(self) -> frozenset[str]:
        return frozenset(self._stores)

    def verify(self, chain: Sequence[bytes], now: dt.datetime) -> Svid:
        """Verify a presented chain (DER, leaf first) at time `now` (timezone-aware)."""
        if not chain:
            raise Unauthenticated("svid_missing", "no client certificate")
        try:
            certs = [x509.load_der_x509_certificate(der) for der in chain]
            leaf = certs[0]
            spiffe_id = check_leaf(leaf, now)  # the first to read its extensions
            key = key_thumbprint(leaf)
        except _UNREADABLE:
            raise Unauthenticated("svid_malformed", "the client certificate is malformed") from None
        store = self._stores.get(spiffe_id.trust_domain)
        if store is None:
            raise Unauthenticated(
                "svid_unknown_trust_domain", f"no bundle for trust domain {spiffe_id.trust_domain}"
            )
        verifier = (
            PolicyBuilder()
            .store(store)
            .time(now)
            .max_chain_depth(_MAX_CHAIN_DEPTH)
            .build_client_verifier()
        )
        try:
            verifier.verify(leaf, certs[1:])
        except VerificationError:
            raise Unauthenticated(
                "svid_untrusted",
                f"the chain does not verify against the {spiffe_id.trust_domain} bundle",
            ) from None
        except _UNREADABLE:
            raise Unauthenticated("svid_malformed", "a chain certificate is malformed") from None
        return Svid(spiffe_id, thumbprint(chain[0]), leaf.not_valid_after_utc, key)
