"""keyproxy.mtls's binding of task tokens to client certificates, and the renewal rule:
real certificates from the demo CA, verified by a real SvidVerifier, no sockets."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from keyproxy.caller import Identity
from keyproxy.errors import Unauthenticated
from keyproxy.mtls import binding, check_binding
from keyproxy.spiffe import SvidVerifier, key_thumbprint, parse_bundle, thumbprint
from keyproxy.tokens import CertificateBinding, TaskToken
from tests.helpers.svid_ca import Issued, SvidCA


@pytest.fixture(scope="module")
def ca() -> SvidCA:
    return SvidCA("example.org", intermediate=True)


@pytest.fixture(scope="module")
def verifier(ca: SvidCA) -> SvidVerifier:
    return SvidVerifier([parse_bundle("example.org", ca.bundle_pem())])


def chain(issued: Issued) -> tuple[bytes, ...]:
    return (issued.der, *(c.public_bytes(Encoding.DER) for c in issued.intermediates))


def bound_to(issued: Issued, verifier: SvidVerifier) -> CertificateBinding:
    """What a token requested with `issued` is bound to (the broker verifies it first)."""
    presented = chain(issued)
    return binding(presented, verifier.verify(presented, dt.datetime.now(dt.UTC)))


def token(bound: CertificateBinding | None) -> TaskToken:
    return TaskToken(
        token_id="t1",
        identity=Identity("openbao", "agent"),
        scope={},
        issued_at=0.0,
        expires_at=1.0,
        certificate=bound,
    )


def test_an_svid_binds_its_id_and_public_key(ca: SvidCA, verifier: SvidVerifier) -> None:
    """A token requested with an X.509-SVID is bound to its thumbprint, SPIFFE ID and key."""
    svid = ca.svid("/agent")
    bound = bound_to(svid, verifier)
    assert bound.thumbprint == thumbprint(svid.der)
    assert bound.spiffe_id == "spiffe://example.org/agent"
    assert bound.key is not None
    assert bound.claim() == {
        "x5t#S256": bound.thumbprint,
        "spiffe_id": "spiffe://example.org/agent",
        "spki#S256": bound.key,
    }


def test_a_renewed_svid_with_the_same_key_is_accepted(ca: SvidCA, verifier: SvidVerifier) -> None:
    """A renewal (new certificate, same SPIFFE ID, same key) carries a bound token on."""
    first = ca.svid("/agent")
    renewed = ca.svid("/agent", key=first.key)
    assert renewed.der != first.der
    bound = token(bound_to(first, verifier))
    check_binding(bound, chain(first), verifier)
    check_binding(bound, chain(renewed), verifier)


@pytest.mark.parametrize("other", ["new key", "other id, same key", "untrusted, same key"])
def test_anything_else_is_refused(ca: SvidCA, verifier: SvidVerifier, other: str) -> None:
    """A new key, another SPIFFE ID, a CA the bundles do not trust, or no certificate: 401."""
    first = ca.svid("/agent")
    presented = {
        "new key": ca.svid("/agent"),
        "other id, same key": ca.svid("/other", key=first.key),
        "untrusted, same key": SvidCA("example.org").svid("/agent", key=first.key),
    }[other]
    bound = token(bound_to(first, verifier))
    for attempt in (chain(presented), ()):
        with pytest.raises(Unauthenticated) as refused:
            check_binding(bound, attempt, verifier)
        assert refused.value.reason == "token_binding_mismatch"


def test_an_exact_binding_accepts_no_renewal(ca: SvidCA, verifier: SvidVerifier) -> None:
    """Bound to a certificate that was no SVID (thumbprint only), even the same key fails."""
    first = ca.svid("/agent")
    exact = token(CertificateBinding(thumbprint(first.der)))
    check_binding(exact, chain(first), verifier)
    with pytest.raises(Unauthenticated):
        check_binding(exact, chain(ca.svid("/agent", key=first.key)), verifier)


def test_a_certificate_that_is_no_svid_is_bound_exactly(ca: SvidCA, verifier: SvidVerifier) -> None:
    """A client certificate the handshake trusted but that is no SVID binds its thumbprint."""
    server = ca.server_cert()
    with pytest.raises(Unauthenticated):  # so the broker binds it as no SVID
        verifier.verify(chain(server), dt.datetime.now(dt.UTC))
    assert binding(chain(server), None) == CertificateBinding(thumbprint(server.der))
    # One no longer in date (a resumed session's, from its full handshake) binds nothing.
    now = dt.datetime.now(dt.UTC)
    stale = ca.issue(
        [x509.DNSName("agent.example.org")],
        not_before=now - dt.timedelta(hours=2),
        not_after=now - dt.timedelta(hours=1),
    )
    with pytest.raises(Unauthenticated) as refused:
        binding(chain(stale), None)
    assert refused.value.reason == "certificate_expired"


def test_an_unbound_token_needs_no_certificate(verifier: SvidVerifier) -> None:
    """A token requested without a certificate is a bearer token."""
    check_binding(token(None), (), verifier)


def test_the_bound_certificate_itself_is_judged_again_at_each_use(
    ca: SvidCA, verifier: SvidVerifier
) -> None:
    """The very certificate a token is bound to no longer carries it once it expired or its
    CA left the bundles (a connection kept open, a resumed session, a front proxy forwarding
    it): 401 with the SVID's reason. One that is no SVID is held to its validity dates."""
    now = dt.datetime.now(dt.UTC)
    old = ca.svid(
        "/agent", not_before=now - dt.timedelta(hours=2), not_after=now - dt.timedelta(hours=1)
    )
    bound = CertificateBinding(
        thumbprint(old.der), "spiffe://example.org/agent", key_thumbprint(old.certificate)
    )
    with pytest.raises(Unauthenticated) as refused:
        check_binding(token(bound), chain(old), verifier)
    assert refused.value.reason == "svid_expired"
    current = ca.svid("/agent")
    rotated = SvidVerifier([parse_bundle("example.org", SvidCA("example.org").bundle_pem())])
    with pytest.raises(Unauthenticated) as refused:
        check_binding(token(bound_to(current, verifier)), chain(current), rotated)
    assert refused.value.reason == "svid_untrusted"
    with pytest.raises(Unauthenticated) as refused:
        check_binding(token(CertificateBinding(thumbprint(old.der))), chain(old), verifier)
    assert refused.value.reason == "token_binding_mismatch"
