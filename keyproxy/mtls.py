"""Callers over mutual TLS: the X.509-SVID caller, and task tokens bound to a certificate.

On a listener that asks for client certificates (`server.tls.client_auth`), a request that
sends no bearer credential is authenticated by its X.509-SVID: the listener's `SvidVerifier`
(keyproxy.spiffe: the leaf rules, then the chain against the bundle of its own trust domain)
turns the chain the handshake verified into the identity `issuer = spiffe://<trust domain>`,
`subject = <SPIFFE ID>`, with no claims. A task token bound to a certificate (RFC 8705
`cnf.x5t#S256`) is accepted only on a connection presenting that very certificate, or, when
it was bound to an X.509-SVID, a renewal of it: an SVID the listener's bundles verify, with
the same SPIFFE ID and the same public key (`binding`, `check_binding`).

Behind a TLS-terminating front proxy listed in `server.trusted_proxies`, the certificate it
forwards in its header (`server.tls.forwarded_client_cert`, keyproxy.forwardedcert) stands
for the connection's: it is verified by the same `SvidVerifier`, and bound tokens compare
against it; a request such a proxy sends without the header has no certificate (the proxy's
own, if it presented one, is never an identity). From any other peer the header is ignored.
"""

from __future__ import annotations

import datetime as dt
import hmac

from aiohttp import web
from cryptography import x509
from multidict import CIMultiDictProxy

from keyproxy import policy
from keyproxy.caller import Identity
from keyproxy.config import CallerCredential, ServerConfig
from keyproxy.errors import Unauthenticated
from keyproxy.forwardedcert import forwarded_chain
from keyproxy.headers import caller_token
from keyproxy.spiffe import SCHEME, Svid, SvidVerifier, out_of_date, presents, thumbprint
from keyproxy.tls import ServerTLS, peer_chain
from keyproxy.tokens import CertificateBinding, TaskToken


def client_chain(
    request: web.Request, server: ServerConfig, tls: ServerTLS | None
) -> tuple[tuple[bytes, ...], bool]:
    """The client certificate chain (DER, leaf first), and whether a front proxy forwarded it:
    when the peer is a trusted proxy, the one in `server.tls.forwarded_client_cert`'s header
    (not verified yet) or none, else the one this connection's handshake verified."""
    if tls is None:
        return (), False
    forwarded = server.tls.forwarded_client_cert if server.tls is not None else None
    # (The peer's reading is cached per address: no parse per request.)
    if forwarded is not None and policy.is_trusted_proxy(
        request.remote or "", server.trusted_proxies
    ):
        # SECURITY: never the front proxy's own certificate: it would be the identity of
        # every caller it forwards without a certificate of its own.
        values = request.headers.getall(forwarded.header, [])
        return (forwarded_chain(values, forwarded.format), True) if values else ((), False)
    return peer_chain(request.transport), False


def bearer_or_certificate(  # caller_token's, and the chain
    incoming: CIMultiDictProxy[str],
    target: str,
    credential: CallerCredential,
    others: tuple[str, ...],
    chain: tuple[bytes, ...],
) -> str:
    """The caller's bearer credential (`headers.caller_token`), or "" when it sent none but
    presented a client certificate `chain`: an X.509-SVID caller."""
    try:
        return caller_token(incoming, target, credential, others)
    except Unauthenticated as exc:
        if chain and exc.reason == "no_credential":
            return ""
        raise


def svid_identity(tls: ServerTLS, chain: tuple[bytes, ...]) -> Identity:
    """The identity of the verified X.509-SVID `chain` (DER, leaf first); Unauthenticated,
    with the refusal's reason, if it is none."""
    return identity_of(tls.verifier.verify(chain, dt.datetime.now(dt.UTC)))


def identity_of(svid: Svid) -> Identity:
    """A verified X.509-SVID's identity: issuer `spiffe://<trust domain>`, its SPIFFE ID."""
    return Identity(SCHEME + svid.issuer, svid.subject)


def _in_date(der: bytes) -> bool:
    """Whether the certificate `der` is within its validity dates now."""
    try:
        certificate = x509.load_der_x509_certificate(der)
    except ValueError:
        return False
    return out_of_date(certificate, dt.datetime.now(dt.UTC)) is None


def binding(chain: tuple[bytes, ...], svid: Svid | None) -> CertificateBinding:
    """What a task token requested with the client certificate `chain` is bound to: its
    thumbprint, and when it is the valid X.509-SVID `svid` also its SPIFFE ID and public
    key, so that the SVID's renewals with the same key are accepted as well. A certificate
    the handshake trusted that is no SVID (`svid` None) binds exactly itself, if it is in
    date now (a resumed session's is its full handshake's, which may since have expired)."""
    if svid is None and not _in_date(chain[0]):
        raise Unauthenticated("certificate_expired", "the client certificate is not valid now")
    exact = thumbprint(chain[0])
    return (
        CertificateBinding(exact)
        if svid is None
        else CertificateBinding(exact, svid.subject, svid.key)
    )


def check_binding(task: TaskToken, chain: tuple[bytes, ...], verifier: SvidVerifier | None) -> None:
    """Refuse a certificate-bound task token on a connection without that certificate or a
    renewal of it (the same SPIFFE ID and public key, verified by `verifier`).

    SECURITY: the certificate is judged again at each use, as an SVID caller's is: one that
    expired, or whose CA left its bundle, since the handshake (a connection kept open, a
    resumed session, or a front proxy forwarding it) refuses the token too (401 with the
    SVID's reason); a certificate that is no SVID is held to its validity dates."""
    bound = task.certificate
    if bound is None:
        return
    leaf = chain[0] if chain else None
    if bound.spiffe_id is None or bound.key is None:  # bound exactly: that certificate
        if presents(bound.thumbprint, leaf) and leaf is not None and _in_date(leaf):
            return
    elif chain and verifier is not None:
        try:
            svid = verifier.verify(chain, dt.datetime.now(dt.UTC))
        except Unauthenticated:
            if presents(bound.thumbprint, leaf):
                raise  # the very certificate, no longer valid: why
            svid = None
        if (
            svid is not None
            and svid.subject == bound.spiffe_id
            and hmac.compare_digest(svid.key, bound.key)
        ):
            return
    raise Unauthenticated(
        "token_binding_mismatch",
        "this token is bound to a client certificate this connection did not present",
    )
