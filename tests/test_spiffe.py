"""SPIFFE ID grammar, trust bundles and X.509-SVID verification (no sockets)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from keyproxy.errors import Unauthenticated
from keyproxy.spiffe import (
    BundleError,
    InvalidSpiffeId,
    SpiffeId,
    SvidVerifier,
    parse_bundle,
    parse_spiffe_id,
    presents,
    thumbprint,
)
from tests.helpers.svid_ca import SvidCA


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("spiffe://example.org", SpiffeId("example.org", "")),
        ("spiffe://example.org/ns/agents/sa/x", SpiffeId("example.org", "/ns/agents/sa/x")),
        ("spiffe://td-1_a.b/A.b-c_D", SpiffeId("td-1_a.b", "/A.b-c_D")),
        ("spiffe://example.org/..a/a..", SpiffeId("example.org", "/..a/a..")),
    ],
)  # fmt: skip
def test_valid_ids_parse(text: str, expected: SpiffeId) -> None:
    """Valid SPIFFE IDs parse into trust domain and path and print back unchanged."""
    assert parse_spiffe_id(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "https://example.org/a",
        "SPIFFE://example.org/a",
        "spiffe:/example.org/a",
        "spiffe:///a",
        "spiffe://Example.org/a",
        "spiffe://user@example.org/a",
        "spiffe://example.org:8443/a",
        "spiffe://example.org/a?x=1",
        "spiffe://example.org/a#frag",
        "spiffe://example.org/",
        "spiffe://example.org/a/",
        "spiffe://example.org//a",
        "spiffe://example.org/./a",
        "spiffe://example.org/a/..",
        "spiffe://example.org/a%2Fb",
        "spiffe://example.org/a b",
        "spiffe://exa mple.org/a",
        "spiffe://" + "a" * 256 + "/a",
        "spiffe://example.org/" + "a" * 2048,
    ],
)
def test_invalid_ids_refused(text: str) -> None:
    """Scheme, case, userinfo, port, query, fragment, empty or dot segments, length: refused."""
    with pytest.raises(InvalidSpiffeId):
        parse_spiffe_id(text)


def test_longest_ids_accepted() -> None:
    """A 255-character trust domain and a 2048-byte ID are within the limits."""
    trust_domain = "a" * 255
    assert parse_spiffe_id(f"spiffe://{trust_domain}").trust_domain == trust_domain
    prefix = "spiffe://example.org/"
    assert parse_spiffe_id(prefix + "a" * (2048 - len(prefix))).path.startswith("/a")


def test_bundle_from_pem_and_json_agree() -> None:
    """A PEM bundle and a SPIFFE bundle JSON of the same root give the same authorities."""
    ca = SvidCA("example.org")
    from_pem = parse_bundle("example.org", ca.bundle_pem())
    from_json = parse_bundle("example.org", ca.bundle_json())
    assert from_pem.authorities == from_json.authorities == (ca.root.certificate,)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{not json",
        b'{"keys": "x"}',
        json.dumps({"keys": [{"use": "jwt-svid", "kty": "EC"}]}).encode(),
        json.dumps({"keys": [{"use": "x509-svid", "x5c": []}]}).encode(),
        json.dumps({"keys": [{"use": "x509-svid", "x5c": ["***"]}]}).encode(),
        json.dumps(
            {"keys": [{"use": "x509-svid", "x5c": [base64.b64encode(b"x").decode()]}]}
        ).encode(),
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    ],
)
def test_bad_bundles_refused(data: bytes) -> None:
    """A bundle without an X.509 authority, or with bad JSON, base64 or DER, is refused."""
    with pytest.raises(BundleError):
        parse_bundle("example.org", data)


def test_thumbprint_is_rfc8705_x5t_s256() -> None:
    """The thumbprint is unpadded base64url of SHA-256 over the DER certificate."""
    der = SvidCA().svid().der
    expected = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")
    assert thumbprint(der) == expected
    assert len(expected) == 43


def test_presents_only_the_named_certificate() -> None:
    """A bound token's thumbprint matches its own certificate, not another SVID, not none."""
    ca = SvidCA()
    mine, other = ca.svid(), ca.svid()
    assert presents(thumbprint(mine.der), mine.der)
    assert not presents(thumbprint(mine.der), other.der)
    assert not presents(thumbprint(mine.der), None)


@pytest.mark.parametrize("intermediate", [False, True])
def test_valid_svid_verifies(intermediate: bool) -> None:
    """A valid SVID, issued directly or through an intermediate, gives its ID and thumbprint."""
    ca = SvidCA("example.org", intermediate=intermediate)
    issued = ca.svid("/ns/agents/sa/summarizer")
    chain = [issued.der, *(c.public_bytes(Encoding.DER) for c in issued.intermediates)]
    verifier = SvidVerifier([parse_bundle("example.org", ca.bundle_json())])
    svid = verifier.verify(chain, _now())
    assert svid.subject == "spiffe://example.org/ns/agents/sa/summarizer"
    assert svid.issuer == "example.org"
    assert svid.thumbprint == thumbprint(issued.der)


def _reason(verifier: SvidVerifier, chain: list[bytes]) -> str:
    with pytest.raises(Unauthenticated) as caught:
        verifier.verify(chain, _now())
    return caught.value.reason


def test_each_bad_svid_refused_with_its_reason() -> None:
    """Each wrong SVID (trust domain, validity, SANs, CA leaf, key usage, none) has its reason."""
    ca, other, stranger = SvidCA("example.org"), SvidCA("other.org"), SvidCA("example.org")
    verifier = SvidVerifier(
        [
            parse_bundle("example.org", ca.bundle_pem()),
            parse_bundle("other.org", other.bundle_pem()),
        ]
    )
    cases = {
        "svid_missing": [],
        "svid_malformed": [b"not a certificate"],
        "svid_expired": [ca.expired_svid().der],
        "svid_not_yet_valid": [
            ca.svid(
                not_before=_now() + dt.timedelta(hours=1), not_after=_now() + dt.timedelta(hours=2)
            ).der
        ],
        "svid_uri_san_count": [ca.svid_for("spiffe://example.org/a", "spiffe://example.org/b").der],
        "svid_leaf_is_ca": [ca.ca_as_leaf().der],
        "svid_key_usage": [ca.svid(omit_key_usage=True).der],
        "svid_invalid_id": [ca.svid_for("https://example.org/a").der],
        "svid_unknown_trust_domain": [ca.svid_for("spiffe://third.org/a").der],
        # A CA of one trust domain vouching for an ID in another.
        "svid_untrusted": [other.svid_for("spiffe://example.org/a").der],
    }
    for reason, chain in cases.items():
        assert _reason(verifier, chain) == reason, reason
    # Signed by an unknown CA that claims the same trust domain.
    assert _reason(verifier, [stranger.svid().der]) == "svid_untrusted"


@pytest.mark.parametrize(
    "usage",
    [
        {"digital_signature": False, "key_agreement": True},
        {"digital_signature": True, "key_cert_sign": True},
        {"digital_signature": True, "crl_sign": True},
    ],
)
def test_leaf_key_usage_checked(usage: dict[str, bool]) -> None:
    """A leaf without digitalSignature, or with keyCertSign or cRLSign, is refused."""
    flags = dict.fromkeys(
        ["digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
         "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"],
        False,
    ) | usage  # fmt: skip
    ca = SvidCA("example.org")
    verifier = SvidVerifier([parse_bundle("example.org", ca.bundle_pem())])
    leaf = ca.svid(key_usage=x509.KeyUsage(**flags))
    assert _reason(verifier, [leaf.der]) == "svid_key_usage"


def _with_extended_key_usage(ca: SvidCA, usages: list[x509.ObjectIdentifier] | None) -> bytes:
    """An SVID of `ca` (DER) whose extendedKeyUsage is `usages` (None: without one)."""
    issued = ca.svid()
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(issued.certificate.subject)
        .issuer_name(issued.certificate.issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(issued.certificate.not_valid_before_utc)
        .not_valid_after(issued.certificate.not_valid_after_utc)
    )
    for extension in issued.certificate.extensions:
        if not isinstance(extension.value, x509.ExtendedKeyUsage | x509.SubjectKeyIdentifier):
            builder = builder.add_extension(extension.value, extension.critical)
    if usages is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    return builder.sign(ca.issuer.key, hashes.SHA256()).public_bytes(Encoding.DER)


def test_leaf_extended_key_usage_checked() -> None:
    """A leaf whose extendedKeyUsage leaves out clientAuth (a server-only certificate) is
    refused with svid_key_usage, not as an untrusted chain; one without the extension, or
    with clientAuth among others, is an SVID."""
    ca = SvidCA("example.org")
    verifier = SvidVerifier([parse_bundle("example.org", ca.bundle_pem())])
    usage = x509.oid.ExtendedKeyUsageOID
    for usages in ([usage.SERVER_AUTH], [usage.CODE_SIGNING]):
        assert _reason(verifier, [_with_extended_key_usage(ca, usages)]) == "svid_key_usage"
    for allowed in (None, [usage.CLIENT_AUTH], [usage.SERVER_AUTH, usage.CLIENT_AUTH]):
        assert verifier.verify([_with_extended_key_usage(ca, allowed)], _now()).subject


def test_trust_domain_id_is_no_leaf() -> None:
    """A leaf whose SPIFFE ID has no path (the trust domain's own ID) is refused."""
    ca = SvidCA("example.org")
    verifier = SvidVerifier([parse_bundle("example.org", ca.bundle_pem())])
    assert _reason(verifier, [ca.svid_for("spiffe://example.org").der]) == "svid_invalid_id"


def test_two_bundles_for_one_trust_domain_refused() -> None:
    """Two bundles naming the same trust domain are a configuration mistake."""
    bundle = parse_bundle("example.org", SvidCA("example.org").bundle_pem())
    with pytest.raises(BundleError):
        SvidVerifier([bundle, bundle])


def _with_two_sans() -> bytes:
    """A leaf with two subjectAltName extensions (DER): an issuerAltName renamed in place.
    Its signature no longer holds, but the leaf rules read it first."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    uri = x509.UniformResourceIdentifier
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(x509.Name([]))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([uri("spiffe://example.org/a")]), True)
        .add_extension(x509.IssuerAlternativeName([uri("spiffe://example.org/b")]), False)
        .sign(key, hashes.SHA256())
    )
    issuer_alt_name, subject_alt_name = b"\x06\x03\x55\x1d\x12", b"\x06\x03\x55\x1d\x11"
    return leaf.public_bytes(Encoding.DER).replace(issuer_alt_name, subject_alt_name)


def test_a_certificate_cryptography_cannot_read_on_is_malformed_not_an_error() -> None:
    """A leaf that parses but whose extensions cannot be read (a forwarded one, which no
    handshake checked) is refused as svid_malformed (401), never a 500."""
    verifier = SvidVerifier([parse_bundle("example.org", SvidCA("example.org").bundle_pem())])
    with pytest.raises(Unauthenticated) as refused:
        verifier.verify((_with_two_sans(),), dt.datetime.now(dt.UTC))
    assert refused.value.reason == "svid_malformed"
