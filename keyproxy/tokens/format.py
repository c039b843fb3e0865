"""The task token's format: its claims, its media type, and the look at a token's header
that tells a task token from an identity token.

A task token is a compact JWS with `typ: keyproxy-task+jwt`, signed with EdDSA by a Vault
Transit key (the private key never leaves Vault) and verified locally with the Transit
public keys. Claims:

    iss, aud     tokens.issuer ("keyproxy")        jti        token id
    sub, idp     the workload identity it was issued to (subject, issuer name)
    ctx          the identity's claims that policies match on
    iat, nbf, exp                                  task, intent
    scope        {route: [{methods, paths}]}       max_uses, src (bound source address)
    exc          {owner, reason} for an exception token
    cnf          {"x5t#S256": thumbprint}: bound to the client certificate it was requested
                 with (RFC 8705); accepted only on a connection presenting that certificate.
                 When that certificate was an X.509-SVID, also keyproxy's own members
                 "spiffe_id" and "spki#S256" (the SHA-256 of its SubjectPublicKeyInfo): a
                 renewed SVID with the same SPIFFE ID and the same key is accepted too
    idle         idle_ttl in seconds: valid only while its holder heartbeats (a lease in the
                 state store, started at issue)
    act          a delegated token's actor chain (RFC 8693 section 4.1): {sub, idp} of who acts
                 with it, nesting the actor of its parent, and so on
    anc          a delegated token's ancestors, root first: [{jti, exp, max_uses, idle}]; the
                 token dies with any of them (revoked, expired, heartbeat lost), and its uses
                 count against each ancestor's max_uses
    rl           where its revocation would be written: a digest of the KV mount and
                 tokens.state_path; elsewhere it is refused (earlier builds' tokens have none)
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
from dataclasses import dataclass, field
from typing import Any, Final

from keyproxy import scope as scopes
from keyproxy.caller import Identity
from keyproxy.errors import Unavailable

TASK_TOKEN_TYPE: Final = "keyproxy-task+jwt"  # noqa: S105  # a media type, not a secret
# What a lease record's signature covers before the claims' JSON: with a NUL, which no JWS
# signing input holds, so the signature of a record can never pass for a token's.
LEASE_RECORD_CONTEXT: Final = b"keyproxy-lease-record\x00"
LEEWAY: Final = 5.0
MAX_TOKEN_BYTES: Final = 16 * 1024
# The longest task token issued: sent in a header line (`Authorization: Bearer <token>`, or a
# route's own `caller_credential` header and scheme), it must fit the listener's 16 KiB
# header field (keyproxy.server.app; aiohttp's pure-Python parser counts the whole line, name
# included) and what `verify` reads. 256 bytes are left for the name and scheme.
MAX_ISSUED_BYTES: Final = MAX_TOKEN_BYTES - 256
# Clocks of the replica that issued a token and of whoever revokes may differ: a revocation
# by subject or task covers tokens issued up to this long after it, and entries are kept
# this much longer before pruning.
CLOCK_SKEW: Final = 5.0


@dataclass(frozen=True, slots=True)
class Link:
    """One token of a delegation chain, as far as the tokens below it need to know it."""

    token_id: str
    expires_at: float
    max_uses: int | None = None
    idle_ttl: float | None = None


def needs_shared_store(links: tuple[Link, ...]) -> Unavailable:
    """The refusal of a token whose chain (`links`, a TaskToken's lifecycle) has use counts or
    heartbeat leases, by a worker of `--workers N` without a shared state store: they would
    be counted, or renewed, in one worker's memory. Named for what the chain holds."""
    if any(link.max_uses is not None for link in links):
        return Unavailable(
            "max_uses_needs_shared_store",
            "tokens with max_uses need a shared state store (state.url) with --workers",
            limit="max_uses",
        )
    return Unavailable(
        "idle_ttl_needs_shared_store",
        "tokens with idle_ttl need a shared state store (state.url) with --workers",
    )


@dataclass(frozen=True)
class CertificateBinding:
    """The client certificate a task token is bound to (its `cnf`).

    `thumbprint` is RFC 8705's `x5t#S256`. For an X.509-SVID, `spiffe_id` and `key` (the
    SHA-256 thumbprint of its SubjectPublicKeyInfo) name the renewals it also accepts: an SVID
    with that ID and that key, verified by the listener's bundles.
    """

    thumbprint: str
    spiffe_id: str | None = None
    key: str | None = None

    def claim(self) -> dict[str, str]:
        """The `cnf` claim."""
        cnf = {"x5t#S256": self.thumbprint}
        if self.spiffe_id is not None and self.key is not None:
            cnf |= {"spiffe_id": self.spiffe_id, "spki#S256": self.key}
        return cnf


@dataclass(frozen=True)
class TaskToken:
    """A verified task token. Holds no secret; `token_id` is safe to log."""

    token_id: str
    identity: Identity
    scope: scopes.Scope
    issued_at: float
    expires_at: float
    task: str | None = None
    intent: str | None = None
    max_uses: int | None = None
    source: str | None = None
    exception_owner: str | None = None
    certificate: CertificateBinding | None = None  # cnf: the client certificate it is bound to
    idle_ttl: float | None = None  # valid only while heartbeats arrive this often
    ancestors: tuple[Link, ...] = ()  # the tokens it was delegated from, root first
    actors: tuple[str, ...] = ()  # "issuer|subject" of who acted at each delegation, in order
    # The links whose max_uses and heartbeat leases bound this token (its ancestors', then its
    # own); empty when none has either, so an ordinary token costs the limit step nothing.
    lifecycle: tuple[Link, ...] = ()

    @property
    def chain(self) -> tuple[str, ...]:
        """The token ids from the root to this one (just this one when not delegated)."""
        return (*(link.token_id for link in self.ancestors), self.token_id)

    def lineage(self) -> tuple[str, str] | None:
        """A delegated token's audit fields, `chain` (its token ids from the root) and
        `actors` (who acted at each delegation, "issuer|subject"), as events write them; None
        for any other token."""
        if not self.ancestors:
            return None
        return ",".join(self.chain), ",".join(self.actors)


@dataclass(frozen=True)
class Issued:
    token: str = field(repr=False)
    token_id: str = ""
    expires_at: float = 0.0
    lifetime: int = 0  # seconds from issue to expiry (`exp` - `iat`)


# What an exception token's subject begins with: its owner's name follows.
_EXCEPTION_PREFIX: Final = "exception:"


def exception_subject(owner: str) -> str:
    """The subject an exception token of `owner` is issued to (its issuer is
    EXCEPTION_ISSUER)."""
    return _EXCEPTION_PREFIX + owner


def exception_problem(owner: str, reason: str) -> str | None:
    """What keeps an exception token of `owner` for `reason` from being issued, or None: a
    blank owner or reason, or an owner named as a subject begins, which would read as
    another owner's (`exception:bob` is bob's subject)."""
    if not owner.strip() or not reason.strip():
        return "an exception token needs an owner and a reason"
    if owner.startswith(_EXCEPTION_PREFIX):
        return f"an exception token's owner cannot begin with {_EXCEPTION_PREFIX!r}"
    return None


def exception_subject_named(name: str) -> str:
    """The subject `name` stands for: an owner's (`bob`), or the subject itself as the audit
    log shows it (`exception:bob`); no owner's name begins so."""
    return name if name.startswith(_EXCEPTION_PREFIX) else exception_subject(name)


_MAX_HEADER: Final = 4096  # bytes of an encoded JOSE header we bother to look at


def is_task_token(token: str) -> bool:
    """Cheap look at the header only: does this claim to be one of ours?

    Only the first segment is decoded: PyJWT's get_unverified_header validates the alphabet
    of the whole token, character by character, on every request. This only routes the
    token; whichever verifier it goes to checks it strictly.
    """
    head, dot, _ = token.partition(".")
    if not dot or len(head) > _MAX_HEADER:
        return False
    return _names_task_token(head)


# Buys 27,400 instructions per request (3.3%, bench/instructions.py --compare): base64 and
# JSON decoding of the header, for every token.
@functools.lru_cache(maxsize=256)
def _names_task_token(head: str) -> bool:
    """Whether an encoded JWT header says typ is ours (an issuer's few headers repeat)."""
    try:
        header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (ValueError, binascii.Error, RecursionError):
        return False
    typ = header.get("typ") if isinstance(header, dict) else None
    return isinstance(typ, str) and typ.lower() == TASK_TOKEN_TYPE


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def optional_text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
