"""Which headers cross the proxy, each way.

A caller's request header is forwarded unless it carries or could override a credential,
asserts an identity, claims another client address, or could make the upstream run another
method or path than the one policy checked (`caller_may_send`); unless it is
hop-by-hop (also by being named in Connection), set by aiohttp or by the route's injection;
and unless it is the route's caller credential or one of its `strip_headers`. A name holding
`_` is dropped too, unless the route forwards such names; then every rule above applies to
the name with `_` read as `-`. An upstream answer's header goes back unless it is hop-by-hop,
a length or coding aiohttp sets itself, or a cookie; any secret form in what goes back is
redacted. Both ways, `X-Request-Id` is keyproxy's: the request's id.

`caller_token` reads the caller's credential, refusing a request that carries it more than
once or in two places.

A verdict is per header name as sent and remembered (`Verdicts`): a dict look-up per header.
"""

from __future__ import annotations

import itertools
import random
import string
from collections.abc import Callable
from typing import Final
from urllib.parse import unquote

from multidict import CIMultiDict, CIMultiDictProxy

from keyproxy.config import HOP_BY_HOP, CallerCredential, Route
from keyproxy.errors import BadRequest, Unauthenticated
from keyproxy.inject import Rendered, holds_any, read_as, scrub_text

# The `Server` of every answer keyproxy makes, and of an upstream's that names none: never
# the Python or aiohttp version aiohttp would write.
SERVER_NAME: Final = "keyproxy"

# SECURITY: request headers never forwarded, whatever the route says. They carry or could
# override a credential, assert an identity a gateway would have checked, claim another
# client address, or make the upstream run another method or path than the one policy
# checked. The rules name classes (fragments, prefixes, "a name ending in key"), not only
# the headers seen so far: a list of names is always one vendor short.
# Any header whose name contains one of these ...
DROPPED_REQUEST_FRAGMENTS: Final = (
    # credentials
    "auth",
    "token",
    "secret",
    "password",
    "credential",
    "session",
    "cookie",
    "signature",
    "apikey",
    "api-key",
    "jwt",
    "bearer",
    "assertion",
    "client-cert",  # a front proxy's forwarded client certificate (keyproxy.forwardedcert)
    "x-amz-",
    # identities and client certificates a gateway asserts: Kubernetes impersonation and
    # request-header authentication, Azure App Service's principal and certificate, AWS
    # ALB's OIDC and mTLS headers, nginx's and HAProxy's TLS client headers, Kong's
    # consumer, Pomerium's claims, user-info claims
    "impersonat",
    "sudo",  # GitLab's, Gitea's: an admin key acting as any user
    "run-as",
    "runas",
    "act-as",
    "actas",
    "as-user",  # Box's As-User: an admin key acting as any user
    "on-behalf",  # Zendesk's X-On-Behalf-Of
    "select-user",  # Dropbox's Dropbox-API-Select-User, -Select-Admin
    "select-admin",
    "api-user",  # Discourse's Api-Username: an all-users key acting as one
    "principal",
    "remote-",  # Remote-User, -Groups, -Email (Authelia), X-Remote-* (Kubernetes)
    "tailscale-user",
    "spiffe",  # X-Spiffe-Id: a workload identity some meshes assert
    "clientcert",
    "x-amzn-oidc",
    "x-amzn-mtls",
    "x-ssl-",
    "client-verify",
    "client-dn",
    "x-consumer-",
    "-claim-",
    "userinfo",
    # client addresses, and another method, path or URL than the one checked
    "forwarded",
    "client-ip",
    "clientip",
    "connecting-ip",
    "originating-ip",
    "real-ip",
    "script-name",
    "override",
    "x-http-method",
    "x-original-",
    "x-rewrite-",
    "x-envoy-",
)
# ... and any whose name ends in "key" (Ocp-Apim-Subscription-Key, X-Functions-Key,
# X-Access-Key, Key), but an idempotency key (Idempotency-Key, X-Idempotency-Key,
# Cko-Idempotency-Key), which names no credential: without it a retried payment runs twice.
IDEMPOTENCY_KEY: Final = "idempotency-key"
# ... and any whose last word names an address (X-AppEngine-User-IP, X-Azure-SocketIP).
_ADDRESS_WORDS: Final = frozenset({"ip", "ipv4", "ipv6", "addr", "address"})
_ADDRESS_ENDS: Final = ("socketip", "clientip", "userip", "srcip")


def caller_may_send(name: str, *, fold_underscores: bool = False) -> bool:
    """Whether a caller's request header (lower-case name) may be forwarded at all.

    SECURITY: CGI/WSGI, Rack, PHP and nginx with `underscores_in_headers` read `_` in a name
    as `-`, so `X_Api_Key` is X-Api-Key to them. A name holding `_` is refused, or with
    `fold_underscores` judged as those servers will read it."""
    if "_" in name:
        if not fold_underscores:
            return False
        name = folded(name)
    if name.endswith("key") and not name.endswith(IDEMPOTENCY_KEY):
        return False
    if name.rpartition("-")[2] in _ADDRESS_WORDS or name.endswith(_ADDRESS_ENDS):
        return False  # a client address by yet another name: X-ProxyUser-IP, Cdn-Src-Ip
    return not any(fragment in name for fragment in DROPPED_REQUEST_FRAGMENTS)


def folded(name: str) -> str:
    """A header name as a server that reads `_` as `-` sees it."""
    return name.replace("_", "-")


REQUEST_ID: Final = "X-Request-Id"
MCP_SESSION: Final = "mcp-session-id"  # forwarded on MCP routes only
_REQUEST_ID_CHARS: Final = string.ascii_letters + string.digits + "._:-"
_REQUEST_ID_MAX: Final = 128
# Set by aiohttp from the URL and body, or by us. SECURITY: no Range (a server may answer whole):
# slices of an answer could each hold less of an echoed key than the scrubber finds.
_REQUEST_MANAGED: Final = frozenset(
    {"host", "content-length", "accept-encoding", "expect", REQUEST_ID.lower()}
    | {"range", "if-range", "request-range"}  # Request-Range: Apache's and Squid's old name
)
# Upstream session cookies could let the caller use the upstream without the proxy. The
# request id in an answer is keyproxy's; an upstream's own goes back as X-Upstream-Request-Id.
UPSTREAM_REQUEST_ID: Final = "X-Upstream-Request-Id"
_RESPONSE_DROPPED: Final = frozenset(
    {
        "content-length",
        "content-encoding",
        "set-cookie",
        REQUEST_ID.lower(),
        UPSTREAM_REQUEST_ID.lower(),
    }
)
_RESPONSE_NOT_FORWARDED: Final = HOP_BY_HOP | _RESPONSE_DROPPED

_NONE: Final[frozenset[str]] = frozenset()
_PLAIN_CONNECTION: Final = frozenset({"keep-alive", "upgrade"}) & HOP_BY_HOP
_HEADER_VERDICTS: Final = 1024  # header names (as sent) whose verdict a route remembers
_REMEMBERED_NAME: Final = 64  # longest header name whose verdict is remembered


def _connection_extra(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    """Header names listed in Connection, which makes them hop-by-hop too (RFC 9110 7.6.1),
    beyond the hop-by-hop names dropped anyway ("keep-alive" mostly)."""
    values = headers.getall("Connection", ())
    if not values or (len(values) == 1 and values[0].lower() in _PLAIN_CONNECTION):
        return _NONE  # the common case: nothing but what is dropped anyway
    # Lower-case and folded: a route may forward names with `_`.
    named = {folded(part.strip().lower()) for value in values for part in value.split(",")}
    return frozenset(named - HOP_BY_HOP - {""})


class Verdicts(dict[str, bool]):
    """Header names (as sent) and whether they pass, filled in on first sight: a look-up per
    header on the request path. Names are the sender's to choose: only so many, and only
    short ones, are kept. Buys 27,800 instructions per request (3.4%, both ways,
    bench/instructions.py --compare)."""

    def __init__(self, passes: Callable[[str], bool]) -> None:
        super().__init__()
        self._passes = passes

    def __missing__(self, name: str) -> bool:
        verdict = self._passes(name.lower())
        if len(name) <= _REMEMBERED_NAME and len(self) < _HEADER_VERDICTS:
            self[name] = verdict
        return verdict


def _returned(name: str) -> bool:
    """Whether an upstream answer's header (lower-case name) goes back to the caller."""
    return name not in _RESPONSE_NOT_FORWARDED


_RETURNED: Final = Verdicts(_returned)


def request_verdicts(route: Route, injected: frozenset[str]) -> Verdicts:
    """The verdicts on a caller's request headers for `route`, whose injection sets the
    (lower-case) header names `injected`. An MCP route forwards `Mcp-Session-Id` (a session
    handle, not a credential: the server binds it to the key keyproxy injects)."""
    fold = route.forward_underscore_headers
    session = MCP_SESSION if route.kind == "mcp" else ""
    dropped = {
        folded(name)
        for name in HOP_BY_HOP
        | _REQUEST_MANAGED
        | injected
        | {route.caller_credential.header.lower(), *route.strip_headers}
    }
    return Verdicts(
        lambda name: (
            name == session
            or (caller_may_send(name, fold_underscores=fold) and folded(name) not in dropped)
        )
    )


def upstream_headers(
    incoming: CIMultiDictProxy[str], forwards: Verdicts, rendered: Rendered, request_id: str
) -> CIMultiDict[str]:
    """The caller's headers this route forwards, the injected ones and the request id; no
    framing (the body's own: keyproxy.outgoing.request_body)."""
    extra = _connection_extra(incoming)
    headers = CIMultiDict(
        [
            (k, v)
            for k, v in incoming.items()
            if forwards[k] and not (extra and folded(k.lower()) in extra)
        ]
    )
    headers["Accept-Encoding"] = "identity"  # the scrubber must see the body in clear
    headers.extend(rendered.headers)
    headers.setdefault(REQUEST_ID, request_id)  # unless the route puts its key there
    if "User-Agent" not in headers:
        headers["User-Agent"] = "keyproxy"  # not aiohttp's own, which names its version
    headers.setdefault("Accept", "*/*")  # as aiohttp's client added it: servers negotiate on it
    return headers


def response_headers(
    incoming: CIMultiDictProxy[str], rendered: Rendered, request_id: str
) -> list[tuple[str, str]]:
    """The upstream's answer headers that go back to the caller, any secret form redacted,
    and the request id (and keyproxy's `Server` when the upstream names none)."""
    extra = _connection_extra(incoming)
    headers = [
        (k, v)
        for k, v in incoming.items()
        if _RETURNED[k] and (not extra or folded(k.lower()) not in extra)
    ]
    theirs = incoming.get(REQUEST_ID)
    if theirs is not None and theirs != request_id:
        headers.append((UPSTREAM_REQUEST_ID, theirs))  # an upstream's id for its support desk
    # One search through all names and values first: an echoed key is the rare case. SECURITY:
    # aiohttp writes a value without the lone surrogates that stand for bytes not UTF-8, so
    # such a value is searched as written: a key those bytes split would go back whole.
    text = "\n".join(itertools.chain.from_iterable(headers))
    if not text.isascii() or holds_any(text, rendered.forms):
        headers = [
            (k, scrub_text(v.encode("utf-8", "ignore").decode(), rendered.forms))
            for k, v in headers
            if not holds_any(k, rendered.forms)  # a name cannot be redacted
        ]
    headers.append((REQUEST_ID, request_id))
    if "Server" not in incoming or "server" in extra:  # none sent, or none passed on
        headers.append(("Server", SERVER_NAME))
    return headers


# Headers that carry a caller's credential with some client or server: besides the route's
# own, a request carrying any of them is ambiguous.
CREDENTIAL_HEADERS: Final = frozenset(
    {"authorization", "proxy-authorization", "x-api-key", "api-key", "x-goog-api-key"}
)
# RFC 6750 2.3: the query parameter that carries a bearer token.
_QUERY_CREDENTIAL: Final = read_as("access_token")


def other_credential_headers(credential: CallerCredential) -> tuple[str, ...]:
    """The credential-carrying headers that are not the route's own."""
    return tuple(sorted(CREDENTIAL_HEADERS - {credential.header.lower()}))


def caller_token(
    incoming: CIMultiDictProxy[str],
    target: str,
    credential: CallerCredential,
    others: tuple[str, ...],
) -> str:
    """The caller's token from the route's credential header; `target` is the request's raw
    path and query, `others` the `other_credential_headers`.

    Raises Unauthenticated when there is none, and BadRequest when the request carries a
    credential more than once or in two places (invariant 12): two credential-carrying
    headers (two copies of one, or the route's and another), a list in one (a comma, or more
    than the token after the scheme), or a credential in the path or query or the token in
    another header, which would go upstream as sent (invariant 4). Nothing has been verified
    yet: the shape alone refuses."""
    values = incoming.getall(credential.header, ())
    carried = len(values)
    if not incoming.keys().isdisjoint(others):  # the rare case: counted only then
        carried += sum(len(incoming.getall(name, ())) for name in others)
    if carried > 1:
        raise _ambiguous()
    value = values[0].strip() if values else ""
    if "," in value:
        raise _ambiguous()
    if credential.scheme is not None:
        scheme, _, value = value.partition(" ")
        value = value.strip() if scheme.lower() == credential.scheme.lower() else ""
    # Header values hold no other whitespace (RFC 9110 5.5; aiohttp refuses CR and LF).
    if " " in value or "\t" in value:
        raise _ambiguous()
    if value and _copied(incoming, value):
        raise BadRequest("credential_in_header", "send your token once, in one header")
    path, _, query = target.partition("?")
    if value and _holds(path, value):
        raise BadRequest("credential_in_path", "send your token in a header, not in the URL")
    if query and in_query(query, value):
        raise BadRequest("credential_in_query", "send your token in a header, not in the URL")
    if not value:
        raise Unauthenticated("no_credential", f"send your token in {credential.header}")
    return value


_BEARER = CallerCredential()
_NOT_BEARER = other_credential_headers(_BEARER)


def bearer_token(incoming: CIMultiDictProxy[str], target: str = "") -> str:
    """The Bearer token of a request to keyproxy's own endpoints (`/token`, heartbeat,
    revoke; `target` its raw path and query), by the proxy's rules (`caller_token`): a
    credential sent twice or in two places is refused (400 ambiguous_credential), none is
    401 no_credential."""
    return caller_token(incoming, target, _BEARER, _NOT_BEARER)


def carries_credential(incoming: CIMultiDictProxy[str]) -> bool:
    """Whether a request carries any credential-carrying header."""
    return not incoming.keys().isdisjoint(CREDENTIAL_HEADERS)


def in_query(query: str, token: str) -> bool:
    """Whether the query string carries a credential, as the upstream will decode it: the
    RFC 6750 parameter, or the caller's token itself anywhere."""
    if token and _holds(query, token):
        return True
    # A name shorter than the credential's cannot read as it: reading only takes away.
    names = (part.partition("=")[0] for part in query.replace(";", "&").split("&"))
    return any(len(n) >= len(_QUERY_CREDENTIAL) and read_as(n) == _QUERY_CREDENTIAL for n in names)


def _copied(incoming: CIMultiDictProxy[str], token: str) -> bool:
    """Whether a header other than the one it came in holds the caller's `token` too (in its
    name or value): the route may forward it, and a credential sent twice is ambiguous
    anyway. A copy takes as many characters again as the token: most requests are told by
    their headers' size alone, in half the time a look at each header took."""
    size = sum(map(len, incoming.values())) + sum(map(len, incoming.keys()))
    if size < 2 * len(token):
        return False
    return "\n".join(incoming.values()).count(token) > 1 or token in "\n".join(incoming.keys())


def _holds(text: str, token: str) -> bool:
    """Whether `text` (of a URL) holds `token`, as sent or percent-decoded."""
    return token in text or ("%" in text and token in unquote(text))


def _ambiguous() -> BadRequest:
    return BadRequest("ambiguous_credential", "send one credential, once, in one header")


class GeneratedId(str):
    """A request id keyproxy made up: random, so it holds nothing of any key or token, and
    the log scrubber need not look (a caller's own id could be a credential: it is looked
    at). Of the 17,000 instructions per request a request id cost (bench/instructions.py
    --compare, a fixed id instead), that look was most."""

    __slots__ = ()


def request_id(incoming: CIMultiDictProxy[str]) -> str:
    """The caller's X-Request-Id when it sent one, of 1-128 letters, digits and `._:-`, else
    a new one. An id that is anything else is never repeated: not upstream, not back, not in
    the log."""
    values = incoming.getall(REQUEST_ID, ())
    if len(values) == 1:
        value = values[0]
        # strip() takes away exactly the allowed characters: nothing left, nothing else.
        # SECURITY: a JWT (a workload or task token: every credential keyproxy takes) fits
        # the alphabet; as an id it would go upstream and into the log.
        well_formed = 0 < len(value) <= _REQUEST_ID_MAX and not value.strip(_REQUEST_ID_CHARS)
        if well_formed and "eyJ" not in value:
            return value
    # Unique, not secret (a caller may choose its id anyway): the module's generator, seeded
    # from the OS in each process (again in a forked child), costs no system call.
    return GeneratedId(f"{random.getrandbits(128):032x}")  # an id, not a secret
