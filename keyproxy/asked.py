"""What a token exchange asks for: the fields of POST /token, read strictly.

JSON (the workload token, or the parent task token, in `Authorization: Bearer`), or the
RFC 8693 form: grant_type=urn:ietf:params:oauth:grant-type:token-exchange, subject_token,
subject_token_type (jwt or id_token), scope ("route:METHODS:/path" items), resource or
audience (route names, asked for in full), and the extensions task, intent, ttl, idle_ttl,
max_uses, bind_source. Every malformed field is a 400 naming it.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from typing import Any, Final, NamedTuple
from urllib.parse import parse_qsl

from aiohttp import web

from keyproxy import scope as scopes
from keyproxy import strictjson, text
from keyproxy.config import Route, parse_duration
from keyproxy.errors import BadRequest, ConfigError, Unauthenticated
from keyproxy.headers import bearer_token, carries_credential, in_query
from keyproxy.outgoing import whole_body
from keyproxy.redact import holds_jwt

GRANT_TYPE: Final = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPES: Final = frozenset(
    {"urn:ietf:params:oauth:token-type:jwt", "urn:ietf:params:oauth:token-type:id_token"}
)
MAX_TEXT: Final = 1024
MAX_BODY: Final = 64 * 1024
# Seconds a caller has to send a broker request's body (after its headers).
BODY_TIMEOUT: Final = 10.0
MAX_USES: Final = 1_000_000
MIN_IDLE_TTL: Final = 2.0
# The form fields that carry a credential (a workload identity token, or a parent task token).
_TOKEN_FIELDS: Final = frozenset({"subject_token", "actor_token"})
# What an exchange may ask, in JSON and in the form; the form also carries its grant and its
# subject token (JSON sends that in Authorization).
_ASKED: Final = frozenset(
    {"scope", "task", "intent", "max_uses", "ttl", "idle_ttl", "bind_source", "actor_token"}
)
# `client_id` is what standard RFC 8693 clients add (Spring Security, oauthlib): not read.
_FORM: Final = frozenset(
    {"grant_type", "subject_token", "subject_token_type", "actor_token_type"}
    | {"requested_token_type", "resource", "audience", "client_id"}
)
# A field name quoted back when refused: a name, not a value pasted by mistake (a key
# sent as the whole form body is one field's name; keys hold digits).
_NAME: Final = re.compile(r"[A-Za-z][A-Za-z_-]{0,31}")
# RFC 8693's requested_token_type, when sent: a task token is an access token, and a JWT.
_ISSUED_TYPES: Final = frozenset(
    {"urn:ietf:params:oauth:token-type:access_token", "urn:ietf:params:oauth:token-type:jwt"}
)


class Asked(NamedTuple):
    """What an exchange asks for."""

    scope: scopes.Scope
    task: str | None
    intent: str | None
    max_uses: int | None
    ttl: float | None
    idle_ttl: float | None
    bind_source: bool = False  # the token works only from the address that asked for it


def read_asked(
    fields: dict[str, Any], form: bool, routes: Mapping[str, Route], *, delegated: bool
) -> Asked:
    """What the request asks for; a delegation may leave the scope out (empty: its parent's).
    SECURITY: only left out, not given empty (`scope=` from an unset variable, `""`, `{}`):
    that asks for nothing, and is refused as any empty scope is, never read as all of the
    parent's."""
    _known(fields, form, delegated=delegated)
    names = list(routes)
    try:
        if delegated and not any(k in fields for k in ("scope", "resource", "audience")):
            requested: scopes.Scope = {}
        elif form:
            written = str(fields.get("scope", ""))
            requested = scopes.parse_rfc8693(written, _resources(fields), names)
        else:
            requested = scopes.parse(fields.get("scope"), names, mcp=scopes.mcp_routes(routes))
        return Asked(
            requested,
            _text(fields, "task"),
            _text(fields, "intent"),
            _max_uses(fields.get("max_uses")),
            _ttl(fields.get("ttl")),
            _idle_ttl(fields.get("idle_ttl")),
            _flag(fields, "bind_source"),
        )
    except ValueError as exc:
        raise BadRequest("invalid_request", str(exc)) from None


def _known(fields: dict[str, Any], form: bool, *, delegated: bool) -> None:
    """SECURITY: a field keyproxy does not read is refused, not ignored: a misspelt
    `bind-source` or `max_use` would get a token without the limit its caller asked for,
    and a `subject_token` in a JSON body beside the Authorization header would be a second
    credential (invariant 12). So is an actor token where no task token is delegated, which
    nothing would check."""
    refuse_unknown(fields, _ASKED | _FORM if form else _ASKED)
    if not delegated and fields.get("actor_token") not in (None, ""):
        raise BadRequest("invalid_request", "actor_token goes with a task token to delegate")
    requested = fields.get("requested_token_type")
    if requested is not None and requested not in _ISSUED_TYPES:  # only the form's, above
        raise BadRequest("invalid_request", "requested_token_type must be an access token")


def refuse_unknown(fields: Iterable[str], known: Collection[str]) -> None:
    """400 `invalid_request` for the first of `fields` not `known`, named when its name
    looks like one (`_NAME`)."""
    unknown = sorted(set(fields).difference(known))
    if unknown:
        name = unknown[0]
        shown = f" {name!r}" if _NAME.fullmatch(name) else ""
        raise BadRequest("invalid_request", f"unknown field{shown}")


# A yes-or-no field as JSON or a form writes it. SECURITY: anything else is refused, never
# read as no: a caller asking for a bound token must not get an unbound one by a typo.
_FLAGS: Final[dict[bool | str | None, bool]] = {
    None: False,
    False: False,
    True: True,
    "false": False,
    "true": True,
    "0": False,
    "1": True,
}


def _flag(fields: dict[str, Any], name: str) -> bool:
    value = fields.get(name)
    if not isinstance(value, bool | str | None):
        value = str(value)  # a number by its text: 1 or 0 (1.0 would find True as a key)
    try:
        return _FLAGS[value]
    except KeyError:
        raise ValueError(f"{name}: true or false") from None


def actor_token(fields: dict[str, Any], form: bool) -> str | None:
    """The sub-agent's workload identity token, if the request names one."""
    token = fields.get("actor_token")
    if token is None or token == "":
        return None
    if not isinstance(token, str):
        raise BadRequest("invalid_request", "actor_token must be a JWT")
    if form and fields.get("actor_token_type") not in JWT_TYPES:
        raise BadRequest("invalid_request", "actor_token_type must be a JWT type")
    return token.strip()


async def fields_of(request: web.Request, form: bool) -> dict[str, Any]:
    # Counted on the bytes read, so a chunked body cannot exceed it either.
    raw = await read_body(request, MAX_BODY)
    if raw is None:
        raise BadRequest("invalid_request", f"request body above {MAX_BODY} bytes")
    try:
        if form:
            return _form(raw)
        # SECURITY (invariant 12): strictly, as tokens are read: a member given twice is
        # refused, never read as its last value; no NaN, no Infinity, UTF-8 only.
        body = strictjson.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("invalid_request", "the body is not valid JSON or form data") from None
    if not isinstance(body, dict):
        raise BadRequest("invalid_request", "the body must be a JSON object")
    return body


async def read_body(request: web.Request, limit: int) -> bytes | None:
    """A broker request's whole body (None: longer than `limit`), as `whole_body` reads it
    within BODY_TIMEOUT of the broker starting to read it."""
    return await whole_body(request, limit, BODY_TIMEOUT)


def _form(raw: bytes) -> dict[str, str]:
    """A form body's fields. SECURITY (invariant 12): a field given twice is refused (400;
    `ambiguous_credential` for a token), never read as its last value; bytes that are not
    UTF-8, percent-encoded or not, are refused rather than replaced."""
    fields: dict[str, str] = {}
    for name, value in parse_qsl(raw.decode(), keep_blank_values=True, errors="strict"):
        if name in fields:
            if name in _TOKEN_FIELDS:
                raise BadRequest("ambiguous_credential", f"{name} given more than once")
            raise BadRequest("invalid_request", f"{name} given more than once")
        fields[name] = value
    return fields


def subject_token(request: web.Request, fields: dict[str, Any], form: bool, *, svid: bool) -> str:
    """The token to exchange (a workload identity's, or a parent task token); "" for none in
    a JSON request presenting a client certificate (`svid`), whose X.509-SVID is then the
    identity."""
    if form:
        if fields.get("grant_type") != GRANT_TYPE:
            raise BadRequest("unsupported_grant_type", f"grant_type must be {GRANT_TYPE}")
        if fields.get("subject_token_type") not in JWT_TYPES:
            raise BadRequest("invalid_request", "subject_token_type must be a JWT type")
        token = str(fields.get("subject_token", "")).strip()
        if carries_credential(request.headers) or in_query(request.query_string, token):
            # SECURITY (invariant 12): the form's token and a header's, or the query's:
            # which one is meant?
            raise BadRequest("ambiguous_credential", "send the credential once")
    else:
        if svid and not carries_credential(request.headers) and not request.query_string:
            return ""
        token = bearer_token(request.headers, request.raw_path)
    if not token:
        raise Unauthenticated("no_credential", "send the workload identity token")
    return token


def _resources(fields: dict[str, Any]) -> list[str]:
    names = []
    for key in ("resource", "audience"):
        value = fields.get(key)
        if isinstance(value, str) and value:
            names.extend(value.split())
    return names


def _text(fields: dict[str, Any], name: str) -> str | None:
    value = fields.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > MAX_TEXT or text.hidden(value):
        raise ValueError(f"{name}: text of at most {MAX_TEXT} characters, without controls")
    if holds_jwt(value):
        # SECURITY: task and intent go into audit events (the task into every request's)
        # and into the token: a token pasted here by mistake would be logged.
        raise ValueError(f"{name}: holds what looks like a token (a JWT), which is never logged")
    return value


def _max_uses(value: Any) -> int | None:
    if value is None or value == "":
        return None
    # A whole number as JSON or a form writes it: never 1.5 read as 1, nor True as 1.
    whole = type(value) is int or (isinstance(value, str) and value.isascii() and value.isdigit())
    uses = int(value) if whole else 0
    if not 0 < uses <= MAX_USES:
        raise ValueError(f"max_uses: a positive integer up to {MAX_USES}")
    return uses


def _idle_ttl(value: Any) -> float | None:
    idle_ttl = _ttl(value, "idle_ttl")
    if idle_ttl is not None and idle_ttl < MIN_IDLE_TTL:
        raise ValueError(f"idle_ttl: at least {MIN_IDLE_TTL:.0f}s")
    return idle_ttl


def _ttl(value: Any, name: str = "ttl") -> float | None:
    if value is None or value == "":
        return None
    try:
        # The same duration syntax as the configuration file.
        return parse_duration(value, name)
    except ConfigError:
        raise ValueError(f"{name}: a positive duration such as 300 or 5m, 36500d at most") from None
