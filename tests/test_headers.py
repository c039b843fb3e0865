"""Which headers cross the proxy: verdicts, the request headers sent upstream and the answer
headers sent back (pure functions; tests/test_proxy.py sends them through a real proxy)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from keyproxy.config import CallerCredential, Route, parse
from keyproxy.errors import BadRequest, Unauthenticated
from keyproxy.headers import (
    Verdicts,
    caller_may_send,
    caller_token,
    other_credential_headers,
    request_id,
    request_verdicts,
    response_headers,
    upstream_headers,
)
from keyproxy.inject import Rendered
from keyproxy.secret import REDACTED
from tests.helpers.configs import CONFIG_SECTIONS

KEY = "sk-headers-test-0123456789"
CONFIG: dict[str, Any] = {
    **CONFIG_SECTIONS,
    "routes": {
        "r": {
            "upstream": "https://api.example.com",
            "secret": {"path": "keyproxy/keys/r"},
            "inject": [{"header": "Authorization", "format": "Bearer {key}"}],
            "strip_headers": ["X-Strip-Me"],
        }
    },
}
RENDERED = Rendered(
    version=1,
    headers=(("Authorization", f"Bearer {KEY}"),),
    query="",
    forms=(KEY,),
    byte_forms=(KEY.encode(),),
)


def _incoming(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def test_header_verdicts_are_remembered_within_bounds() -> None:
    """A header's verdict is computed from its lower-case name whatever the caller's casing,
    and remembered for at most 1,024 names of at most 64 characters: longer or further names
    are still judged, every time."""
    asked: list[str] = []

    def passes(name: str) -> bool:
        asked.append(name)
        return caller_may_send(name)

    verdicts = Verdicts(passes)
    for name in ("Authorization", "AUTHORIZATION", "x-api-key", "X-Forwarded-For", "Cookie"):
        assert verdicts[name] is False
    assert verdicts["Content-Type"] is True
    assert asked[:2] == ["authorization", "authorization"]
    long = "X-" + "a" * 80
    assert verdicts[long] is True
    assert verdicts[long] is True
    assert asked.count(long.lower()) == 2  # judged each time, never kept
    for i in range(2_000):
        assert verdicts[f"X-Custom-{i}"] is True
    assert len(verdicts) == 1_024


def test_upstream_headers_keep_what_the_route_forwards_and_add_the_injection() -> None:
    """Credentials, client-address claims, hop-by-hop names and names listed in Connection
    stay behind, whatever their case; the key is injected and the answer asked for
    uncompressed. The caller's length is not copied: the body's own framing is set where the
    body is (keyproxy.outgoing.request_body)."""
    route = parse(json.dumps(CONFIG), {}).routes["r"]
    forwards = request_verdicts(route, frozenset({"authorization"}))
    sent = upstream_headers(
        _incoming(
            ("AUTHORIZATION", "Bearer agent-token"),
            ("X-Forwarded-For", "203.0.113.9"),
            ("X-Session-Id", "s"),
            ("Connection", "keep-alive, X-Private"),
            ("X-Private", "p"),
            ("X-Strip-Me", "s"),
            ("Content-Type", "application/json"),
            ("Content-Length", "2"),
            ("Accept-Encoding", "gzip"),
        ),
        forwards,
        RENDERED,
        "rid-1",
    )
    assert sorted(sent.items()) == sorted(
        [
            ("Content-Type", "application/json"),
            ("Accept-Encoding", "identity"),
            ("X-Request-Id", "rid-1"),
            ("Authorization", f"Bearer {KEY}"),
            ("User-Agent", "keyproxy"),
            ("Accept", "*/*"),
        ]
    )


def test_response_headers_drop_cookies_and_lengths_and_redact_the_key() -> None:
    """Cookies, lengths, codings, hop-by-hop names and names listed in Connection are not
    returned; an echoed key is redacted in a value, and a header whose name holds it is
    dropped."""
    returned = response_headers(
        _incoming(
            ("Content-Type", "application/json"),
            ("Set-Cookie", "session=1"),
            ("Content-Length", "10"),
            ("Content-Encoding", "gzip"),
            ("Connection", "keep-alive, X-Hop"),
            ("X-Hop", "h"),
            ("X-Echo", f"you sent {KEY}"),
            (f"X-{KEY}", "v"),
        ),
        RENDERED,
        "rid-1",
    )
    assert returned == [
        ("Content-Type", "application/json"),
        ("X-Echo", f"you sent {REDACTED}"),
        ("X-Request-Id", "rid-1"),
        ("Server", "keyproxy"),
    ]


def test_response_header_values_are_searched_as_aiohttp_writes_them() -> None:
    """Bytes not UTF-8 come as lone surrogates, which aiohttp leaves out when it writes the
    value: a key split by them is redacted as it would be written; other text is kept."""
    split = "\udcff".join(KEY[i : i + 7] for i in range(0, len(KEY), 7))
    pairs = [("X-Echo", split), ("X-Name", "caf\udce9 \u00e9")]
    returned = response_headers(_incoming(*pairs), RENDERED, "r1")
    assert returned[:2] == [("X-Echo", REDACTED), ("X-Name", "caf \u00e9")]


def test_response_headers_without_a_key_are_returned_as_they_are() -> None:
    """The common answer: nothing to redact, the names in the upstream's order and case, and
    the request id last."""
    pairs = [("Server", "nginx"), ("Date", "Sun, 29 Nov 2026 00:00:00 GMT"), ("X-Id", "7")]
    assert response_headers(_incoming(*pairs), RENDERED, "r1") == [*pairs, ("X-Request-Id", "r1")]


def test_an_upstream_request_id_of_its_own_goes_back_beside_ours() -> None:
    """The answer's X-Request-Id is always keyproxy's; an upstream's different id goes back
    as X-Upstream-Request-Id (and one it named so itself does not), an echo of ours is not
    repeated."""
    theirs = _incoming(("X-Request-Id", "req_upstream"), ("X-Upstream-Request-Id", "forged"))
    assert response_headers(theirs, RENDERED, "ours") == [
        ("X-Upstream-Request-Id", "req_upstream"),
        ("X-Request-Id", "ours"),
        ("Server", "keyproxy"),
    ]
    echoed = _incoming(("x-request-id", "ours"))
    assert response_headers(echoed, RENDERED, "ours") == [
        ("X-Request-Id", "ours"),
        ("Server", "keyproxy"),
    ]


def test_an_answer_names_its_server_as_the_upstream_did_or_keyproxy() -> None:
    """The upstream's own Server goes back as it wrote it (any case of the name); an answer
    without one, or whose one the hop-by-hop rules drop, names keyproxy, never the Python or
    aiohttp version aiohttp would add."""
    for name in ("Server", "server", "SERVER"):
        returned = response_headers(_incoming((name, "nginx")), RENDERED, "r1")
        assert [v for k, v in returned if k.lower() == "server"] == ["nginx"]
    for dropped in [("X-Id", "7")], [("Server", "x"), ("Connection", "Server")]:
        returned = response_headers(_incoming(*dropped), RENDERED, "r1")
        assert [v for k, v in returned if k.lower() == "server"] == ["keyproxy"], dropped


# ---------------------------------------------------------------------------- underscores

# Each is dropped in its dash form; a server that reads `_` as `-` would see that form.
UNDERSCORED = [
    "X_Api_Key",
    "Api_Key",
    "X_Forwarded_For",
    "X_Real_IP",
    "X_HTTP_Method_Override",
    "X_Original_URL",
    "Transfer_Encoding",
    "Content_Length",
]
MIXED = [
    "X-Api_Key",
    "X_Api-Key",
    "x_forwarded-for",
    "X-Real_Ip",
    "X-HTTP_Method-Override",
    "Content_length",
    "X_Upstream-Key",  # the route's injected header
    "X_Strip-Me",  # one of its strip_headers
    "Caller_Token",  # its caller-credential header
    "X_Request_Id",  # keyproxy's own
]
# Benign once folded ("transfer-encoding-" is no rule's name), so dropped only by default.
BENIGN = ["X_Custom", "Idempotency_Key", "Request_Priority", "X-Trace_Parent", "Transfer-Encoding_"]


def _route(**extra: Any) -> Route:
    route = {
        **CONFIG["routes"]["r"],
        "inject": [{"header": "X-Upstream-Key"}],
        "caller_credential": {"header": "Caller-Token"},
        **extra,
    }
    return parse(json.dumps({**CONFIG, "routes": {"r": route}}), {}).routes["r"]


def test_header_names_with_underscores_are_dropped_by_default() -> None:
    """By default every caller header whose name holds `_` stays behind, whatever its
    dashed form would be; the dashed form of a benign one still passes."""
    forwards = request_verdicts(_route(), frozenset({"x-upstream-key"}))
    for name in UNDERSCORED + MIXED + BENIGN:
        assert forwards[name] is False, name
    for name in ("X-Custom", "Idempotency-Key", "Request-Priority"):
        assert forwards[name] is True, name


def test_forwarded_underscore_names_are_judged_as_folded() -> None:
    """With forward_underscore_headers a name with `_` is judged as the name with `-`: every
    rule (credentials, client address, method override, framing, injected, stripped, the
    caller credential, the request id) still drops it, also when `_` and `-` are mixed; a
    benign one passes under the name the caller sent."""
    forwards = request_verdicts(
        _route(forward_underscore_headers=True), frozenset({"x-upstream-key"})
    )
    for name in UNDERSCORED + MIXED:
        assert forwards[name] is False, name
    for name in BENIGN:
        assert forwards[name] is True, name
    incoming = _incoming(("X_Custom", "1"), ("X_Api_Key", "k"), ("Connection", "x-private"))
    sent = upstream_headers(
        CIMultiDictProxy(CIMultiDict([*incoming.items(), ("X_Private", "hop")])),
        forwards,
        RENDERED,
        "rid",
    )
    assert sent.getall("X_Custom") == ["1"]
    assert "X_Api_Key" not in sent
    assert "X_Private" not in sent  # named in Connection in its dashed form


@pytest.mark.parametrize(
    "name", ["x_api_key", "x-api_key", "proxy_authorization", "x_amz_date", "my_secret_thing"]
)
def test_caller_may_send_refuses_underscores_or_folds_them(name: str) -> None:
    """An underscore name is refused outright, and with folding judged by its dashed form."""
    assert caller_may_send(name) is False
    assert caller_may_send(name, fold_underscores=True) is False
    assert caller_may_send("x_trace", fold_underscores=True) is True


# ---------------------------------------------------------------------------- credentials

BEARER = CallerCredential("Authorization", "Bearer")
BARE = CallerCredential("X-Api-Key", None)
TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln"
OTHER = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJiIn0.c2ln"


def _token(
    credential: CallerCredential, *pairs: tuple[str, str], query: str = "", path: str = "/r/r/x"
) -> str:
    target = f"{path}?{query}" if query else path
    return caller_token(_incoming(*pairs), target, credential, other_credential_headers(credential))


@pytest.mark.parametrize(
    ("credential", "pairs", "query"),
    [
        (BEARER, [("Authorization", f"Bearer {TOKEN}")], ""),
        (BEARER, [("authorization", f"bearer   {TOKEN}  ")], "q=1&page=2"),
        (BARE, [("X-Api-Key", TOKEN)], "access=1&token=2"),
        (BARE, [("x-api-key", f" {TOKEN} ")], "model=m&access_tokens=1"),
    ],
)
def test_one_credential_in_one_header_is_read(
    credential: CallerCredential, pairs: list[tuple[str, str]], query: str
) -> None:
    """A single credential, whatever the header's case and the spaces around it, is the
    token; query parameters that only look alike are left alone."""
    assert _token(credential, *pairs, query=query) == TOKEN


@pytest.mark.parametrize(
    ("credential", "pairs"),
    [
        (BEARER, [("Authorization", f"Bearer {TOKEN}"), ("Authorization", f"Bearer {OTHER}")]),
        (BEARER, [("Authorization", f"Bearer {TOKEN}"), ("authorization", f"Bearer {TOKEN}")]),
        (BEARER, [("Authorization", f"Bearer {TOKEN}"), ("Authorization", "")]),
        (BEARER, [("Authorization", f"Bearer {TOKEN}, Bearer {OTHER}")]),
        (BEARER, [("Authorization", f"Bearer {TOKEN},{OTHER}")]),
        (BEARER, [("Authorization", f"Basic eDp5, Bearer {TOKEN}")]),
        (BEARER, [("Authorization", f"Bearer {TOKEN} {OTHER}")]),
        (BEARER, [("Authorization", f"Bearer {TOKEN}\t{OTHER}")]),
        (BEARER, [("Authorization", f"Bearer {TOKEN}"), ("X-Api-Key", OTHER)]),
        (BEARER, [("Authorization", f"Bearer {TOKEN}"), ("Proxy-Authorization", "Basic eDp5")]),
        (BEARER, [("Authorization", f"Bearer {TOKEN}"), ("api-key", OTHER)]),
        (BEARER, [("Authorization", f"Bearer {TOKEN}"), ("X-Goog-Api-Key", OTHER)]),
        (BEARER, [("X-Api-Key", OTHER), ("Api-Key", TOKEN)]),  # none of them the route's
        (BEARER, [("X-Api-Key", OTHER), ("x-api-key", OTHER)]),
        (BARE, [("X-Api-Key", TOKEN), ("X-API-KEY", OTHER)]),
        (BARE, [("X-Api-Key", f"{TOKEN} {OTHER}")]),
        (BARE, [("X-Api-Key", TOKEN), ("Authorization", f"Bearer {OTHER}")]),
    ],
)
def test_a_credential_twice_or_in_two_places_is_refused(
    credential: CallerCredential, pairs: list[tuple[str, str]]
) -> None:
    """Two copies of the credential header (same or different values, any case), a list in
    one value, or a second credential-carrying header: 400, whichever would have won."""
    with pytest.raises(BadRequest) as refused:
        _token(credential, *pairs)
    assert refused.value.reason == "ambiguous_credential"
    assert TOKEN not in str(refused.value)


@pytest.mark.parametrize(
    "query",
    [
        "access_token=x",
        "q=1&access_token=",
        "Access_Token=x",
        "access%5Ftoken=x",
        "access%255Ftoken=x",  # for a server behind a gateway that decodes it too
        "access.token=x",  # PHP reads `.` as `_`
        "a=1;access_token=x",  # a server splitting on `;` too
        f"q={TOKEN}",
        f"q=%65yJ{TOKEN[3:]}",  # the token percent-encoded as the upstream will decode it
        f"next=/x%3Fauth%3D{TOKEN}&q=1",
    ],
)
def test_a_credential_in_the_query_string_is_refused(query: str) -> None:
    """The RFC 6750 access_token parameter, or the caller's token anywhere in the decoded
    query string (which goes upstream as sent): 400, with or without a header credential."""
    with pytest.raises(BadRequest) as refused:
        _token(BEARER, ("Authorization", f"Bearer {TOKEN}"), query=query)
    assert refused.value.reason == "credential_in_query"
    if "access" in query.lower():
        with pytest.raises(BadRequest):
            _token(BEARER, query=query)


@pytest.mark.parametrize(
    "path",
    [
        f"/r/r/echo/{TOKEN}",
        f"/r/r/{TOKEN[:10]}%{ord(TOKEN[10]):02X}{TOKEN[11:]}/x",  # as the upstream decodes it
        f"/r/r/x;t={TOKEN}",
    ],
)
def test_the_callers_token_in_the_path_is_refused(path: str) -> None:
    """The caller's token anywhere in the path, as sent or percent-decoded, would go upstream
    with it: 400, before anything is verified."""
    with pytest.raises(BadRequest) as refused:
        _token(BEARER, ("Authorization", f"Bearer {TOKEN}"), path=path, query="q=1")
    assert refused.value.reason == "credential_in_path"
    assert _token(BEARER, ("Authorization", f"Bearer {TOKEN}"), path=f"/r/r/{OTHER}") == TOKEN


@pytest.mark.parametrize(
    "pairs",
    [
        [],
        [("Authorization", "")],
        [("Authorization", "Bearer")],
        [("Authorization", "Bearer   ")],
        [("Authorization", "Basic eDp5")],
        [("X-Api-Key", TOKEN)],  # one credential, in a header the route does not read
    ],
)
def test_no_credential_in_the_routes_header_is_401(pairs: list[tuple[str, str]]) -> None:
    """Nothing usable in the route's header, and nothing ambiguous: 401, not 400."""
    with pytest.raises(Unauthenticated):
        _token(BEARER, *pairs)


@pytest.mark.parametrize(
    "value",
    ["abc", "a" * 128, "req_1", "0f8fad5b-d9cb-469f-a165-70867728950e", "svc:7.1-a", "Z"],
)
def test_a_well_formed_request_id_is_kept(value: str) -> None:
    """1-128 letters, digits and `._:-` come through as sent."""
    assert request_id(_incoming(("X-Request-Id", value))) == value


@pytest.mark.parametrize(
    "pairs",
    [
        [],
        [("X-Request-Id", "")],
        [("X-Request-Id", "a" * 129)],
        [("X-Request-Id", "a b")],
        [("X-Request-Id", "a\r\nX-Injected: 1")],
        [("X-Request-Id", "a\nb")],
        [("X-Request-Id", "<script>")],
        [("X-Request-Id", "caf\u00e9")],
        [("X-Request-Id", "a%0d%0ab")],
        [("X-Request-Id", "one"), ("X-Request-Id", "two")],
        [("X-Request-Id", "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0.c2lnbmF0dXJl")],
        [("X-Request-Id", "id-eyJhbGciOiJSUzI1NiJ9.x.y")],
    ],
)
def test_any_other_request_id_is_replaced(pairs: list[tuple[str, str]]) -> None:
    """Absent, empty, too long, odd characters (CR/LF, spaces, non-ASCII), sent twice, or
    holding a JWT (a credential would go upstream): a new id of 32 hex digits, different each
    time."""
    first, second = request_id(_incoming(*pairs)), request_id(_incoming(*pairs))
    assert first != second
    for new in (first, second):
        assert len(new) == 32
        assert set(new) <= set("0123456789abcdef")


@pytest.mark.parametrize(
    "copy",
    [
        ("X-Debug", TOKEN),
        ("X-Trace", f"sess={TOKEN};x=1"),
        ("Cookie", f"auth={TOKEN}"),
        ("Authorization-Copy", f"Bearer {TOKEN}"),
        (TOKEN, "1"),  # a name can be as long as a token, of the same characters
    ],
    ids=["whole", "inside", "cookie", "with-scheme", "as-name"],
)
def test_the_callers_token_in_another_header_is_refused(copy: tuple[str, str]) -> None:
    """The caller's token copied into another header, its name or its value, would go
    upstream in it: 400 credential_in_header, before anything is verified. A header holding
    another token, or part of this one, is no copy."""
    with pytest.raises(BadRequest) as refused:
        _token(BEARER, ("Authorization", f"Bearer {TOKEN}"), copy)
    assert refused.value.reason == "credential_in_header"
    for other in (("X-Debug", OTHER), ("X-Debug", TOKEN[:-1]), (TOKEN[:-1], "1")):
        assert _token(BEARER, ("Authorization", f"Bearer {TOKEN}"), other) == TOKEN
