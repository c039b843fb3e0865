"""End to end: real OpenBao, real upstream on loopback, the real proxy, real clients.

Each invariant of PRODUCT.md that the request path owns (1-7 and 9) is proved here through
the whole stack; the unit tests of each module cover the tables.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import gc
import gzip
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from keyproxy.devserver import Agent, OpenBaoDevServer
from keyproxy.server.collector import YOUNG_GC_THRESHOLD
from tests.helpers.events import events_of, read_events
from tests.helpers.issuer import Issuer
from tests.helpers.logscan import CANARIES
from tests.helpers.polling import eventually
from tests.helpers.servers import (
    BIG_BYTES,
    FRAGMENT_VARIANTS,
    TRICKLE_PARTS,
    Stack,
    Upstream,
    bearer,
    fragment_message,
    new_key,
    running_proxy,
    serve,
)
from tests.helpers.servers import reset as reset_connection

LOCAL_ISSUER = "https://issuer.test.invalid"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def token(identity_token: str) -> str:
    """The agent's workload identity token (conftest's `identity_token`)."""
    return identity_token


@pytest.fixture(scope="module")
def local_issuer(tmp_path_factory: pytest.TempPathFactory) -> Issuer:
    """An issuer whose signing key the tests hold, to craft hostile tokens."""
    return Issuer(tmp_path_factory.mktemp("issuer"), LOCAL_ISSUER)


def make_config(
    openbao: OpenBaoDevServer,
    agent: Agent,
    local_issuer: Issuer,
    upstream: str,
    key_path: str,
    **route: Any,
) -> dict[str, Any]:
    """One route `r` to `upstream` with the key at `key_path`; the agent may use a few paths."""
    grant = {
        "methods": ["GET", "POST"],
        "paths": [
            *("/v1/**", "/echo", "/leak/*", "/redirect", "/stall", "/stall/*", "/trickle/*"),
            *("/big", "/odd-encoding"),
        ],
    }
    return {
        "vault": openbao.vault_yaml(refresh_interval="500ms", max_staleness="3s"),
        "identity": {
            "issuers": [
                openbao.issuer_yaml("openbao"),
                {
                    "name": "local",
                    "issuer": LOCAL_ISSUER,
                    "jwks_file": str(local_issuer.jwks_file),
                    "audiences": ["keyproxy"],
                    "algorithms": ["RS256"],
                    "leeway": "5s",
                },
            ]
        },
        "routes": {
            "r": {
                "upstream": upstream,
                "secret": {"path": key_path},
                "inject": [{"header": "Authorization", "format": "Bearer {key}"}],
                "egress": {"allow_cidrs": ["127.0.0.0/8"]},
                "allow_http": True,
                "timeouts": {"connect": "2s", "read": "1s"},
                "max_body": "1KiB",
                **route,
            }
        },
        "policies": [
            {
                "name": "agent",
                "issuers": ["openbao"],
                "subjects": [agent.entity_id],
                "allow": {"r": grant},
            },
            {
                "name": "local",
                "issuers": ["local"],
                "subjects": ["local-agent"],
                "allow": {"r": grant},
            },
            {
                "name": "far-away",
                "issuers": ["local"],
                "subjects": ["remote-agent"],
                "source_cidrs": ["10.0.0.0/8"],
                "allow": {"r": grant},
            },
        ],
    }


@pytest.fixture
def seeded(openbao: OpenBaoDevServer, request: pytest.FixtureRequest) -> tuple[str, str]:
    """A fresh key stored at a path of this test's own; returns (path, key)."""
    path = f"keyproxy/keys/{request.node.name.replace('[', '-').replace(']', '')}"
    key = new_key()
    openbao.put_key(path, key)
    return path, key


@pytest.fixture
def config_for(
    openbao: OpenBaoDevServer,
    agent: Agent,
    local_issuer: Issuer,
    seeded: tuple[str, str],
) -> Callable[..., dict[str, Any]]:
    def build(upstream: str, **route: Any) -> dict[str, Any]:
        return make_config(openbao, agent, local_issuer, upstream, seeded[0], **route)

    return build


@pytest.fixture
async def stack(
    upstream: Upstream, config_for: Callable[..., dict[str, Any]]
) -> AsyncIterator[Stack]:
    async with running_proxy(config_for(upstream.url)) as value:
        yield value


def assert_nothing_leaked(upstream: Upstream, token: str) -> None:
    """The agent's token reached the upstream in no header and no body."""
    for seen in upstream.requests:
        assert all(token not in v for v in seen.headers.values())
        assert token.encode() not in seen.body
        assert token not in seen.query


async def raw_request(port: int, target: bytes, headers: bytes = b"") -> int:
    """Send a request line exactly as given (no client-side normalisation); return the status."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + headers + b"\r\n"
        )
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 10)
        return int(status_line.split()[1])
    finally:
        writer.close()


async def raw_exchange(port: int, head: bytes) -> tuple[int, CIMultiDict[str], bytes]:
    """Send a request head exactly as given (saying `Connection: close`) and read the whole
    answer until the proxy closes: its status, headers, and every byte after the head."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    top, _, rest = data.partition(b"\r\n\r\n")
    status_line, *lines = top.decode("latin-1").split("\r\n")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines:
        name, _, value = line.partition(":")
        headers.add(name, value.strip())
    return int(status_line.split()[1]), headers, rest


def raw_get(path: str, *lines: str | bytes) -> bytes:
    """A GET head for raw_exchange: the header lines as given, one per argument."""
    encoded = [line.encode() if isinstance(line, str) else line for line in lines]
    return b"\r\n".join(
        [f"GET {path} HTTP/1.1".encode(), b"Host: x", b"Connection: close", *encoded, b"", b""]
    )


def new_request_id() -> str:
    """A well-formed X-Request-Id that no other request of the session sends. Digits after a
    word without a dash: "test-" and three digits would be 8 characters of a key new_key()
    made ("sk-test-123..."), which the scrubber redacts in the id's event."""
    return f"test{time.monotonic_ns()}"


async def audit_events(audit_log: Path, request_id: str) -> list[dict[str, Any]]:
    """The request events of `request_id`, once at least one is in the log. Lines are written
    in the order the events were made: once one is in, all made before it are too."""
    return await eventually(
        functools.partial(events_of, audit_log, request_id),
        f"no audit event for request {request_id}",
    )


async def _matching(
    audit_log: Path, containing: str, keep: Callable[[dict[str, Any]], bool]
) -> list[dict[str, Any]]:
    """The events of the audit log (read in a thread: see events_of) that `keep` keeps."""
    return [e for e in await asyncio.to_thread(read_events, audit_log, containing) if keep(e)]


class ConnectionCounter:
    """A loopback listener that only counts connections made to it."""

    def __init__(self) -> None:
        self.count = 0
        self.server: asyncio.base_events.Server | None = None

    async def __aenter__(self) -> ConnectionCounter:
        def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.count += 1
            writer.close()

        self.server = await asyncio.start_server(accept, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


# ----------------------------------------------------------------------------- the core path


async def test_openai_sdk_plain_and_streamed(
    stack: Stack, upstream: Upstream, token: str, seeded: tuple[str, str]
) -> None:
    """The openai SDK, base_url at the proxy and its identity token as api_key, completes a
    chat and a streamed chat; the upstream receives the Vault key and never the token."""
    client = openai.AsyncOpenAI(base_url=f"{stack.base}/r/r/v1", api_key=token, max_retries=0)
    try:
        models = await client.models.list()
        assert [m.id for m in models.data] == ["keyproxy-demo"]
        chat = await client.chat.completions.create(
            model="keyproxy-demo", messages=[{"role": "user", "content": "hello"}]
        )
        content = chat.choices[0].message.content or ""
        assert "hello" in content
        stream = await client.chat.completions.create(
            model="keyproxy-demo", messages=[{"role": "user", "content": "stream"}], stream=True
        )
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    finally:
        await client.close()
    assert len(pieces) > 3
    assert "stream" in "".join(pieces)
    key = seeded[1]
    assert [s.headers["Authorization"] for s in upstream.requests] == [f"Bearer {key}"] * 3
    assert_nothing_leaked(upstream, token)


async def test_sse_reaches_the_caller_event_by_event(
    stack: Stack, upstream: Upstream, token: str, http: aiohttp.ClientSession
) -> None:
    """The first streamed event arrives before the upstream has finished the stream."""
    async with http.post(
        f"{stack.base}/r/r/v1/chat/completions",
        headers=bearer(token),
        json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]},
    ) as response:
        assert response.status == 200
        first = await asyncio.wait_for(response.content.readuntil(b"\n\n"), 10)
        assert first.startswith(b"data: {")
        rest = await response.read()
    assert rest.endswith(b"data: [DONE]\n\n")


async def test_new_key_version_is_used_without_restart(
    stack: Stack,
    upstream: Upstream,
    token: str,
    http: aiohttp.ClientSession,
    openbao: OpenBaoDevServer,
    seeded: tuple[str, str],
) -> None:
    """A new KV version of the key reaches the upstream within 5 s, no restart."""
    async with http.get(f"{stack.base}/r/r/echo", headers=bearer(token)) as response:
        assert response.status == 200
    new = new_key()
    await asyncio.to_thread(openbao.put_key, seeded[0], new)

    async def sent() -> str:
        async with http.get(f"{stack.base}/r/r/echo", headers=bearer(token)) as response:
            assert response.status == 200
        return upstream.requests[-1].headers["Authorization"]

    await eventually(
        sent, "new key version not used", within=5, interval=0.1, until=f"Bearer {new}".__eq__
    )


async def test_the_young_collection_threshold_is_raised_while_serving(
    upstream: Upstream, config_for: Callable[..., dict[str, Any]]
) -> None:
    """Serving raises the cyclic collector's young-generation threshold; it stays raised while
    any app of the process serves (the first to start may stop first), and the last one to
    stop puts back what was there."""
    before = gc.get_threshold()
    raised = (YOUNG_GC_THRESHOLD, *before[1:])
    first, second = running_proxy(config_for(upstream.url)), running_proxy(config_for(upstream.url))
    await first.__aenter__()
    first_serving = True
    try:
        await second.__aenter__()
        try:
            assert gc.get_threshold() == raised
            first_serving = False
            await first.__aexit__(None, None, None)
            assert gc.get_threshold() == raised  # the second still serves
        finally:
            await second.__aexit__(None, None, None)
    finally:
        if first_serving:
            await first.__aexit__(None, None, None)
    assert gc.get_threshold() == before


# ----------------------------------------------------------------------------- invariant 1


async def test_deny_by_default(
    stack: Stack, upstream: Upstream, token: str, http: aiohttp.ClientSession
) -> None:
    """No credential 401, unknown route 404, no policy 403; none of them reaches upstream."""
    cases = [
        (f"{stack.base}/r/r/echo", {}, 401),
        (f"{stack.base}/r/r/echo", {"Authorization": "Basic Zm9vOmJhcg=="}, 401),
        (f"{stack.base}/r/r/echo", bearer("not-a-jwt"), 401),
        (f"{stack.base}/r/nope/echo", bearer(token), 404),
        (f"{stack.base}/r/r/not-granted", bearer(token), 403),
    ]
    for url, headers, status in cases:
        async with http.get(url, headers=headers) as response:
            assert response.status == status, url
            if status == 401:
                assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert upstream.requests == []


async def test_outside_the_grant_is_403(
    stack: Stack,
    upstream: Upstream,
    token: str,
    local_issuer: Issuer,
    http: aiohttp.ClientSession,
) -> None:
    """Wrong method, wrong path and wrong source network each get 403 and reach nothing."""
    for method, path, tok in [
        ("DELETE", "/echo", token),
        ("GET", "/v2/models", token),
        ("GET", "/leak/a/b", token),
        ("GET", "/echo", local_issuer.token(sub="remote-agent")),  # policy wants 10.0.0.0/8
    ]:
        async with http.request(method, f"{stack.base}/r/r{path}", headers=bearer(tok)) as response:
            assert response.status == 403, (method, path)
    assert upstream.requests == []


# ----------------------------------------------------------------------------- invariant 2


async def test_redirect_is_returned_not_followed(
    stack: Stack, upstream: Upstream, token: str, http: aiohttp.ClientSession
) -> None:
    """A 307 to another host goes back to the caller; the proxy makes no second request."""
    async with http.get(
        f"{stack.base}/r/r/redirect", headers=bearer(token), allow_redirects=False
    ) as response:
        assert response.status == 307
        assert response.headers["Location"] == "http://127.0.0.2:9/steal"
    assert [s.path for s in upstream.requests] == ["/redirect"]


# ----------------------------------------------------------------------------- invariant 3


@pytest.mark.parametrize(
    "path", ["/leak/header", "/leak/body", "/leak/large", "/leak/gzip", "/leak/sse"]
)
async def test_echoed_key_never_reaches_the_caller(
    stack: Stack,
    upstream: Upstream,
    token: str,
    http: aiohttp.ClientSession,
    seeded: tuple[str, str],
    path: str,
) -> None:
    """An upstream echoing the key in a header, a short or a long body, or split across SSE
    chunks is scrubbed; a short body keeps a correct length."""
    key = seeded[1]
    async with http.get(f"{stack.base}/r/r{path}", headers=bearer(token)) as response:
        assert response.status == 200
        body = await response.read()
        headers = "\n".join(f"{k}: {v}" for k, v in response.headers.items())
        if path == "/leak/body":
            assert response.headers["Content-Length"] == str(len(body))
        if path == "/leak/gzip":  # decoded to be scrubbed, and passed on decoded
            assert "Content-Encoding" not in response.headers
    assert upstream.requests[0].headers["Authorization"] == f"Bearer {key}"
    assert key not in headers
    assert key.encode() not in body
    assert b"[REDACTED]" in body or "[REDACTED]" in headers


async def test_a_range_of_an_answer_is_never_asked_upstream(
    stack: Stack,
    upstream: Upstream,
    token: str,
    http: aiohttp.ClientSession,
    seeded: tuple[str, str],
) -> None:
    """A range of an answer that echoes the key would hand it out in slices shorter than the
    scrubber's fragments: Range and If-Range never go upstream, and the answer comes whole
    (200, as a server may always answer a range request), scrubbed."""
    key = seeded[1]
    headers = {
        **bearer(token),
        "Range": "bytes=4-10",
        "If-Range": "Wed, 21 Oct 2026 07:28:00 GMT",
        "Request-Range": "bytes=4-10",
    }
    async with http.get(f"{stack.base}/r/r/leak/range", headers=headers) as response:
        body = await response.read()
    assert response.status == 200
    assert key[:7].encode() not in body
    assert body == b"key=[REDACTED];"
    seen = upstream.requests[-1].headers
    assert "Range" not in seen
    assert "If-Range" not in seen
    assert "Request-Range" not in seen


async def test_key_in_a_response_header_name_drops_that_header(
    stack: Stack, token: str, http: aiohttp.ClientSession, seeded: tuple[str, str]
) -> None:
    """A header whose name holds the key cannot be redacted: it is not passed back at all."""
    async with http.get(f"{stack.base}/r/r/leak/header-name", headers=bearer(token)) as response:
        assert response.status == 200
        assert await response.json() == {"ok": True}
        assert all(seeded[1] not in name for name in response.headers)


async def test_a_key_broken_up_by_bytes_not_utf8_in_a_header_is_scrubbed(
    config_for: Callable[..., dict[str, Any]],
    token: str,
    http: aiohttp.ClientSession,
    seeded: tuple[str, str],
) -> None:
    """aiohttp reads a header's bytes that are not UTF-8 as lone surrogates and writes the
    value without them: a key echoed in runs of 7 between such bytes (no run a fragment)
    would reach the caller whole. The value is scrubbed as it is written."""
    key = seeded[1].encode()
    split = b"\xff".join(key[i : i + 7] for i in range(0, len(key), 7))

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nX-Echo: " + split + b"\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    upstream = await asyncio.start_server(answer, "127.0.0.1", 0)
    async with upstream:
        port = upstream.sockets[0].getsockname()[1]
        async with (
            running_proxy(config_for(f"http://127.0.0.1:{port}")) as stack,
            http.get(f"{stack.base}/r/r/echo", headers=bearer(token)) as response,
        ):
            assert (response.status, await response.read()) == (200, b"ok")
            echoed = response.raw_headers
    assert (b"X-Echo", b"[REDACTED]") in echoed
    assert all(key not in value for _, value in echoed)


async def test_basic_auth_encoding_is_scrubbed_too(
    upstream: Upstream,
    config_for: Callable[..., dict[str, Any]],
    token: str,
    http: aiohttp.ClientSession,
    seeded: tuple[str, str],
) -> None:
    """With basic-auth injection, the base64 form echoed back is scrubbed as well."""
    cfg = config_for(upstream.url, inject=[{"basic": {"username": "api"}}])
    key = seeded[1]
    encoded = base64.b64encode(f"api:{key}".encode()).decode()
    async with (
        running_proxy(cfg) as stack,
        http.get(f"{stack.base}/r/r/leak/body", headers=bearer(token)) as response,
    ):
        body = await response.read()
    assert upstream.requests[0].headers["Authorization"] == f"Basic {encoded}"
    assert encoded.encode() not in body
    assert key.encode() not in body


async def test_key_in_the_reason_phrase_is_not_forwarded(
    stack: Stack,
    upstream: Upstream,
    token: str,
    http: aiohttp.ClientSession,
    seeded: tuple[str, str],
) -> None:
    """An upstream status line that echoes the key reaches the caller without it."""
    async with http.get(f"{stack.base}/r/r/leak/reason", headers=bearer(token)) as response:
        assert response.status == 401
        assert seeded[1] not in (response.reason or "")
    assert upstream.requests[0].headers["Authorization"] == f"Bearer {seeded[1]}"


async def test_query_key_echoed_in_its_url_encoding_is_scrubbed(
    upstream: Upstream,
    config_for: Callable[..., dict[str, Any]],
    token: str,
    http: aiohttp.ClientSession,
    openbao: OpenBaoDevServer,
    seeded: tuple[str, str],
) -> None:
    """A query-parameter key with characters URLs encode, echoed back in the URL the upstream
    received (body and Link header), is scrubbed."""
    key = "AbC/dEf+GhI/jKl0123456789==" + seeded[1][-8:]
    CANARIES.add(key)
    openbao.put_key(seeded[0], key)
    cfg = config_for(upstream.url, inject=[{"query": "key"}])
    async with (
        running_proxy(cfg) as stack,
        http.get(f"{stack.base}/r/r/leak/url", headers=bearer(token)) as response,
    ):
        body = await response.text()
        link = response.headers["Link"]
    sent = upstream.requests[0].query
    assert sent.startswith("key=AbC%2FdEf%2BGhI")
    value = sent.removeprefix("key=")
    for text in (body, link):
        assert value not in text
        assert value.lower() not in text.lower()
        assert "[REDACTED]" in text


@pytest.mark.parametrize("variant", FRAGMENT_VARIANTS)
async def test_key_fragments_in_an_upstream_error_never_reach_the_caller(
    stack: Stack,
    upstream: Upstream,
    token: str,
    http: aiohttp.ClientSession,
    seeded: tuple[str, str],
    variant: str,
) -> None:
    """An upstream 401 quoting the first 8 and last 4 characters of the injected key (and a
    middle 8 and the last 8, also in a header), of declared length or streamed with every
    fragment cut across writes, reaches the caller with each run of 8 redacted and the rest
    of its text intact."""
    key = seeded[1]
    async with http.get(f"{stack.base}/r/r/leak/fragment-{variant}", headers=bearer(token)) as (
        response
    ):
        assert response.status == (200 if variant == "sse" else 401)
        body = (await response.read()).decode()
        hint = response.headers["X-Key-Hint"]
    assert upstream.requests[0].headers["Authorization"] == f"Bearer {key}"
    for fragment in (key[:8], key[12:20], key[-8:], key[12:19]):
        assert fragment not in body
        assert fragment not in hint
    assert hint == "key ...[REDACTED]..."
    redacted = fragment_message(key)
    for fragment in (key[:8], key[12:20], key[-8:]):
        redacted = redacted.replace(fragment, "[REDACTED]")
    assert redacted.endswith("ends [REDACTED]")
    assert redacted in body or json.dumps(redacted) in body
    assert "****" + key[-4:] in body  # 4 characters are no fragment


async def test_unknown_response_encoding_is_refused(
    stack: Stack, token: str, http: aiohttp.ClientSession, seeded: tuple[str, str]
) -> None:
    """A body in an encoding the scrubber cannot read is refused with 502, not passed on."""
    async with http.get(f"{stack.base}/r/r/odd-encoding", headers=bearer(token)) as response:
        assert response.status == 502
        assert seeded[1] not in await response.text()


def _chunked(body: bytes) -> bytes:
    return f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"


# How a scripted upstream answers with the key it was sent, gzip-compressed: each head and
# how its body is framed, and whether that answer must be refused (the scrubber would not
# read what the caller can decode) or is decoded, scrubbed and passed on.
CODED_ANSWERS = {
    "gzip-then-identity": (b"Content-Encoding: gzip\r\nContent-Encoding: identity", False, True),
    "identity-then-gzip": (b"Content-Encoding: identity\r\nContent-Encoding: gzip", False, False),
    "gzip-twice": (b"Content-Encoding: gzip\r\nContent-Encoding: gzip", False, True),
    "gzip-and-br": (b"Content-Encoding: gzip, br", False, True),
    "x-gzip": (b"Content-Encoding: x-gzip", False, True),
    "transfer-gzip": (b"Transfer-Encoding: gzip, chunked", True, True),
    "transfer-gzip-lines": (b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked", True, True),
    "plain-gzip": (b"Content-Encoding: gzip", False, False),
}


class CodedUpstream:
    """A loopback HTTP/1.1 upstream that answers `/<name>` as CODED_ANSWERS says, its body
    the gzip of the Bearer key it was sent, on one connection per request."""

    def __init__(self) -> None:
        self.server: asyncio.base_events.Server | None = None

    async def __aenter__(self) -> CodedUpstream:
        self.server = await asyncio.start_server(self._answer, "127.0.0.1", 0)
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        name = head.split(" ", 2)[1].rsplit("/", 1)[-1]
        key = next(line for line in head.split("\r\n") if line.startswith("Authorization:"))
        body = gzip.compress(json.dumps({"echo": key.split(" ", 2)[2]}).encode())
        if name == "gzip-twice":
            body = gzip.compress(body)
        coding, chunked, _ = CODED_ANSWERS[name]
        framing = b"" if chunked else b"Content-Length: %d\r\n" % len(body)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
            + framing
            + coding
            + b"\r\n\r\n"
            + (_chunked(body) if chunked else body)
        )
        await writer.drain()
        writer.close()

    async def __aexit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def test_a_coded_answer_the_scrubber_would_not_read_is_refused(
    config_for: Callable[..., dict[str, Any]],
    token: str,
    http: aiohttp.ClientSession,
    seeded: tuple[str, str],
) -> None:
    """Invariant 3: the scrubber reads the bytes the caller can decode. aiohttp's parser
    decodes by the last Content-Encoding line and never a transfer coding, so an answer with
    two codings, one it does not decode, or a transfer coding but chunked is a 502
    unsupported_encoding; one gzip (wherever `identity` stands beside it) is decoded,
    scrubbed and passed on decoded."""
    key = seeded[1]
    async with CodedUpstream() as upstream:
        cfg = config_for(upstream.url, egress={"allow_cidrs": ["127.0.0.0/8"]})
        async with running_proxy(cfg) as stack:
            for name, (_, _, refused) in CODED_ANSWERS.items():
                async with http.get(
                    f"{stack.base}/r/r/leak/{name}", headers=bearer(token), auto_decompress=False
                ) as response:
                    body = await response.read()
                    assert "Content-Encoding" not in response.headers, name
                    assert key.encode() not in body, name
                    if refused:
                        assert response.status == 502, name
                        assert json.loads(body)["error"]["code"] == "unsupported_encoding"
                    else:
                        assert response.status == 200, name
                        assert json.loads(body) == {"echo": "[REDACTED]"}, name


@pytest.mark.parametrize("reset", [False, True])
async def test_an_answer_cut_by_a_reset_never_looks_whole(
    config_for: Callable[..., dict[str, Any]],
    token: str,
    http: aiohttp.ClientSession,
    reset: bool,
) -> None:
    """An answer whose body ends with its connection (no length, no chunks) reaches the
    caller whole when the upstream closes the connection, and cut (no last chunk) when the
    connection is reset: the reset may have cut it, and nothing in the bytes says so."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart of it")
        await writer.drain()
        if reset:
            reset_connection(writer)
        else:
            writer.close()

    upstream = await asyncio.start_server(answer, "127.0.0.1", 0)
    async with upstream:
        port = upstream.sockets[0].getsockname()[1]
        cfg = config_for(f"http://127.0.0.1:{port}", egress={"allow_cidrs": ["127.0.0.0/8"]})
        async with (
            running_proxy(cfg) as stack,
            http.get(f"{stack.base}/r/r/echo", headers=bearer(token)) as response,
        ):
            assert response.status == 200
            if reset:
                with pytest.raises(aiohttp.ClientPayloadError):
                    await response.read()
            else:
                assert await response.read() == b"part of it"


async def test_an_earlier_answers_trailers_never_reach_the_next_answer(
    config_for: Callable[..., dict[str, Any]], token: str, http: aiohttp.ClientSession
) -> None:
    """aiohttp's response parser keeps a chunked answer's last trailer, and its
    Content-Encoding, for the next answer it parses: the pool gives every answer a parser of
    its own, so the next answer on the connection is read as it came (its bytes as sent, no
    coding it does not name, no header it did not send)."""
    second = gzip.compress(b'{"ok": true}')

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n"
            b"\r\n5\r\nfirst\r\n0\r\nContent-Encoding: gzip\r\nX-T: 1\r\n\r\n"
        )
        await reader.readuntil(b"\r\n\r\n")  # the next request, on the same connection
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            + b"Content-Length: %d\r\n\r\n" % len(second)
            + second
        )
        await writer.drain()
        writer.close()

    upstream = await asyncio.start_server(answer, "127.0.0.1", 0)
    async with upstream:
        port = upstream.sockets[0].getsockname()[1]
        cfg = config_for(f"http://127.0.0.1:{port}", egress={"allow_cidrs": ["127.0.0.0/8"]})
        async with running_proxy(cfg) as stack:
            async with http.get(f"{stack.base}/r/r/echo", headers=bearer(token)) as first:
                assert (first.status, await first.read()) == (200, b"first")
            async with http.get(f"{stack.base}/r/r/echo", headers=bearer(token)) as after:
                assert (after.status, await after.read()) == (200, second)
                assert "X-T" not in after.headers


async def test_bad_key_version_keeps_the_last_good_key(
    stack: Stack,
    upstream: Upstream,
    token: str,
    http: aiohttp.ClientSession,
    openbao: OpenBaoDevServer,
    seeded: tuple[str, str],
) -> None:
    """A new KV version with a control character is refused; the last good key keeps serving."""
    await asyncio.to_thread(openbao.put_key, seeded[0], seeded[1] + "\t-bad")

    async def key_status() -> dict[str, Any]:
        async with http.get(f"{stack.admin}/readyz") as response:
            found: dict[str, Any] = (await response.json())["keys"]["r"]
            return found

    status = await eventually(
        key_status,
        "the bad version was never read",
        within=5,
        interval=0.1,
        until=lambda s: s["last_error"],
    )
    assert "-bad" not in status["last_error"]
    async with http.get(f"{stack.base}/r/r/echo", headers=bearer(token)) as response:
        assert response.status == 200
    assert upstream.requests[-1].headers["Authorization"] == f"Bearer {seeded[1]}"


# ----------------------------------------------------------------------------- invariant 4


# Each class of header a caller must not send upstream, by names that reached it through
# lists of names: credentials by another vendor's name, identities a gateway asserts, and
# another path than the one checked.
CLASS_DROPPED = (
    "Ocp-Apim-Subscription-Key",
    "X-Functions-Key",
    "X-Access-Key",
    "Upstream-Key",
    "Key",
    "X-Jwt-Assertion",
    "Jwt",
    "Bearer",
    "Impersonate-User",
    "Impersonate-Group",
    "X-Remote-User",
    "Remote-User",
    "X-Ms-Client-Principal",
    "X-Consumer-Id",
    "X-Userinfo",
    "X-Override-URL",
    "X-Original-Path",
    "X-Envoy-Original-Path",
    "X-Rewrite-Path",
    "X-Amzn-Oidc-Data",
    "X-Amzn-Oidc-Identity",
    "X-Amzn-Mtls-Clientcert",
    "X-Arr-ClientCert",
    "X-SSL-Client-DN",
    "X-Ssl-Cert",
    "X-Client-Verify",
    "X-Pomerium-Claim-Email",
    "Sudo",
    "X-Gitea-Sudo",
    "Api-Username",
    "X-Act-As-User",
    "Run-As",
    "Remote-Groups",
    "Remote-Email",
    "Tailscale-User-Login",
    "X-Script-Name",
    "X-Forwarded",
    "Forwarded-For",
    "Proxy-Client-IP",
    "WL-Proxy-Client-IP",
    "X-Originating-IP",
    "Cf-Connecting-IPv6",
    "X-Azure-ClientIP",
    "As-User",
    "X-On-Behalf-Of",
    "Dropbox-API-Select-User",
    "Dropbox-API-Select-Admin",
    "X-Azure-SocketIP",
    "X-ProxyUser-IP",
    "X-AppEngine-User-IP",
    "Cdn-Src-Ip",
    "X-Spiffe-Id",
)
# ... and what SDKs send that names none of those.
CLASS_KEPT = (
    "Idempotency-Key",
    "X-Idempotency-Key",
    "Cko-Idempotency-Key",
    "X-Stainless-Lang",
    "OpenAI-Organization",
    "Anthropic-Version",
    "X-Goog-Api-Client",
)


async def test_caller_credentials_and_hop_by_hop_headers_never_go_upstream(
    upstream: Upstream,
    config_for: Callable[..., dict[str, Any]],
    token: str,
    http: aiohttp.ClientSession,
    seeded: tuple[str, str],
) -> None:
    """The caller's token, credential-like headers (also by another vendor's name), asserted
    identities, path and method overrides, a caller-sent copy of the injected header and
    Connection-named headers are dropped, what SDKs send besides goes; Host is the
    upstream's. (A second
    credential-carrying header, such as X-Api-Key or Proxy-Authorization, makes the whole
    request a 400: test_ambiguous_credentials_are_400_and_reach_nothing.)"""
    cfg = config_for(
        upstream.url,
        inject=[{"header": "X-Upstream-Key"}],
        caller_credential={"header": "Authorization", "scheme": "Bearer"},
    )
    headers = {
        **bearer(token),
        "X-Upstream-Key": "caller-forged",
        "Cookie": "session=abc",
        "Connection": "keep-alive, X-Private",
        "X-Private": "hop",
        "X-Forwarded-For": "10.9.9.9",
        "X-HTTP-Method-Override": "DELETE",
        "X-Original-URL": "/admin",
        "True-Client-IP": "10.9.9.9",
        "X-Amz-Security-Token": "t",
        "Private-Token": "t",
        "X-Custom-Auth": "t",
        **dict.fromkeys(CLASS_DROPPED, "caller-sent"),
        **dict.fromkeys(CLASS_KEPT, "caller-sent"),
        "X-Keep": "kept",
    }
    async with (
        running_proxy(cfg) as stack,
        http.get(f"{stack.base}/r/r/echo", headers=headers) as response,
    ):
        assert response.status == 200
    seen = upstream.requests[0].headers
    assert seen.getall("X-Upstream-Key") == [seeded[1]]
    assert [name for name in CLASS_DROPPED if name in seen] == []
    assert [name for name in CLASS_KEPT if seen.get(name) != "caller-sent"] == []
    for name in (
        "Authorization",
        "X-Api-Key",
        "Cookie",
        "Proxy-Authorization",
        "X-Private",
        "X-Forwarded-For",
        "X-HTTP-Method-Override",
        "X-Original-URL",
        "True-Client-IP",
        "X-Amz-Security-Token",
        "Private-Token",
        "X-Custom-Auth",
    ):
        assert name not in seen, name
    assert seen["X-Keep"] == "kept"
    assert seen["Host"] == f"127.0.0.1:{upstream.port}"
    assert_nothing_leaked(upstream, token)


async def test_user_agent_is_the_callers_or_keyproxy(
    stack: Stack, upstream: Upstream, token: str, http: aiohttp.ClientSession
) -> None:
    """The caller's User-Agent goes upstream as sent; without one, the upstream sees
    `keyproxy`, never the HTTP library and its version (and `Accept: */*`)."""
    port = URL(stack.base).port
    assert port is not None
    auth = f"Authorization: Bearer {token}\r\n".encode()
    assert await raw_request(port, b"/r/r/echo", auth) == 200
    async with http.get(
        f"{stack.base}/r/r/echo", headers={**bearer(token), "User-Agent": "agent/1.0"}
    ) as response:
        assert response.status == 200
    assert [seen.headers.getall("User-Agent") for seen in upstream.requests] == [
        ["keyproxy"],
        ["agent/1.0"],
    ]
    # Without an Accept of its own the caller's request says `*/*`, as it did through
    # aiohttp's client.
    assert upstream.requests[0].headers.getall("Accept") == ["*/*"]


async def test_an_injected_user_agent_is_the_only_one(
    upstream: Upstream,
    config_for: Callable[..., dict[str, Any]],
    token: str,
    http: aiohttp.ClientSession,
    seeded: tuple[str, str],
) -> None:
    """A route that injects its key in User-Agent sends that one header, not keyproxy's
    default beside it, and never the caller's."""
    cfg = config_for(upstream.url, inject=[{"header": "User-Agent", "format": "app {key}"}])
    async with (
        running_proxy(cfg) as stack,
        http.get(
            f"{stack.base}/r/r/echo", headers={**bearer(token), "User-Agent": "agent/1.0"}
        ) as response,
    ):
        assert response.status == 200
    assert upstream.requests[0].headers.getall("User-Agent") == [f"app {seeded[1]}"]


async def test_query_injection_replaces_a_caller_parameter(
    upstream: Upstream,
    config_for: Callable[..., dict[str, Any]],
    token: str,
    http: aiohttp.ClientSession,
    seeded: tuple[str, str],
) -> None:
    """A query-parameter key replaces any caller-sent parameter any server may read as its
    name (another case, spaces, an array of it, PHP's `.` for `_`, percent-encoded again);
    one only a server that
    also splits on `;` would see is refused (400 ambiguous_query), nothing forwarded."""
    cfg = config_for(upstream.url, inject=[{"query": "api_key"}])
    copies = (
        "api_key=forged&API_KEY=f&%20Api_Key=f&api_key[]=f&api.key[0]=f&api%5Fkey=f"
        "&[api_key]=f&%5Bapi_key%5D=f&api[key=f&api_key%00=f&api_key]=f&api_key;=f"
        "&api%255Fkey=f&%2561pi_key=f&api%25255Fkey=f"  # for a server decoding twice or more
    )
    async with running_proxy(cfg) as stack:
        url = URL(f"{stack.base}/r/r/echo?{copies}&q=1&api_keys=2", encoded=True)
        async with http.get(url, headers=bearer(token)) as response:
            assert response.status == 200
        assert upstream.requests[0].query == f"q=1&api_keys=2&api_key={seeded[1]}"
        ambiguous = (
            "a=1;api_key=f",
            "a=1;%20API_KEY=f&q=1",
            "q=1&b=2;c=3;api.key=f",
            "api_key;x=1",
        )
        await _refused_queries(http, stack.base, token, ambiguous, "ambiguous_query")
        assert len(upstream.requests) == 1


async def _refused_queries(
    http: aiohttp.ClientSession, base: str, token: str, queries: tuple[str, ...], code: str
) -> None:
    """Each of `queries` (as sent) on route r is a 400 with error `code`."""
    for query in queries:
        url = URL(f"{base}/r/r/echo?{query}", encoded=True)
        async with http.get(url, headers=bearer(token)) as response:
            assert response.status == 400, query
            assert (await response.json())["error"]["code"] == code


async def test_a_method_override_in_the_query_is_400(
    stack: Stack, upstream: Upstream, token: str, http: aiohttp.ClientSession
) -> None:
    """`_method` (Express's method-override, Laravel, Symfony) and its kin in the query would
    have the upstream run another method than the one policy allowed: 400 method_override,
    nothing forwarded; a parameter plainly named `method` is data and goes."""
    overrides = (
        "_m%65thod=DELETE",
        "x-http-m%65thod-override=PUT",
        "_method=DELETE",
        "q=1&_METHOD=PUT",
        "a=1;_method=DELETE",
        "x-http-method=PUT",
        "_m%2565thod=DELETE",
    )
    await _refused_queries(http, stack.base, token, overrides, "method_override")
    assert upstream.requests == []
    async with http.get(f"{stack.base}/r/r/echo?method=card", headers=bearer(token)) as response:
        assert response.status == 200


# Each reached the upstream verbatim while its dash form was dropped; servers that read `_`
# as `-` (CGI/WSGI, Rack, PHP, nginx with underscores_in_headers) see the dash form.
UNDERSCORED = {
    "X_Api_Key": "caller-forged-key",
    "Api_Key": "caller-forged-key",
    "X_Forwarded_For": "10.9.9.9",
    "X_Real_IP": "10.9.9.9",
    "X_HTTP_Method_Override": "DELETE",
    "X_Original_URL": "/admin",
    "Transfer_Encoding": "chunked",
    "Content_Length": "7654321",
}
MIXED_UNDERSCORED = {
    "X-Api_Key": "caller-forged-key",
    "X_Api-Key": "caller-forged-key",
    "X_Forwarded-For": "10.9.9.9",
    "X-Real_Ip": "10.9.9.9",
    "X-HTTP-Method_Override": "DELETE",
    "X-Original_URL": "/admin",
    "Content_length": "7654321",
    "X_Upstream-Key": "caller-forged-key",  # the route's injected header
    "X_Request_Id": "caller-forged-id",  # keyproxy's own
}


@pytest.mark.parametrize("forward", [False, True], ids=["default", "forward_underscore_headers"])
async def test_header_names_with_underscores_never_smuggle_a_dropped_header(
    upstream: Upstream,
    config_for: Callable[..., dict[str, Any]],
    token: str,
    http: aiohttp.ClientSession,
    seeded: tuple[str, str],
    forward: bool,
) -> None:
    """Names with `_` that a server would read as a dropped header (a credential, a client
    address, a method or URL override, framing, the injected header, the request id), also
    when `_` and `-` are mixed, never reach the upstream; with forward_underscore_headers a
    benign one arrives as sent, by default it stays behind too."""
    opt_out = {"forward_underscore_headers": True} if forward else {}
    cfg = config_for(upstream.url, inject=[{"header": "X-Upstream-Key"}], **opt_out)
    headers = {
        **bearer(token),
        **UNDERSCORED,
        **MIXED_UNDERSCORED,
        "X_Custom_Trace": "benign",
        "X-Keep": "kept",
    }
    async with (
        running_proxy(cfg) as stack,
        http.get(f"{stack.base}/r/r/echo", headers=headers) as response,
    ):
        assert response.status == 200
    [seen] = upstream.requests
    for name in (*UNDERSCORED, *MIXED_UNDERSCORED):
        assert name not in seen.headers, name
    assert (seen.method, seen.path) == ("GET", "/echo")
    assert seen.headers.getall("X-Upstream-Key") == [seeded[1]]
    assert seen.headers["X-Keep"] == "kept"
    assert seen.headers.getall("X_Custom_Trace", []) == (["benign"] if forward else [])
    assert seen.headers["X-Request-Id"] == response.headers["X-Request-Id"]
    sent = "\n".join(seen.headers.values())
    for value in ("caller-forged", "10.9.9.9", "DELETE", "/admin", "7654321"):
        assert value not in sent
    assert_nothing_leaked(upstream, token)


async def test_ambiguous_credentials_are_400_and_reach_nothing(
    stack: Stack,
    upstream: Upstream,
    token: str,
    local_issuer: Issuer,
    audit_log: Path,
) -> None:
    """Two Authorization headers (two valid tokens, the same one twice, one empty, in other
    casing), a list in one value, or a second credential-carrying header: 400 with one
    audit event each, nothing upstream; the first token alone still works."""
    port = URL(stack.base).port
    assert port is not None
    other = local_issuer.token()
    cases = [
        [f"Authorization: Bearer {token}", f"Authorization: Bearer {other}"],
        [f"Authorization: Bearer {other}", f"Authorization: Bearer {token}"],
        [f"Authorization: Bearer {token}", f"Authorization: Bearer {token}"],
        [f"Authorization: Bearer {token}", f"authorization: BEARER {other}"],
        [f"Authorization: Bearer {token}", "Authorization:"],
        [f"Authorization: Bearer {token}, Bearer {other}"],
        [f"Authorization: Bearer {token},{other}"],
        [f"Authorization: Bearer {token} {other}"],
        [f"Authorization: Basic eDp5, Bearer {token}"],
        [f"Authorization: Bearer {token}", f"X-Api-Key: {other}"],
        [f"Authorization: Bearer {token}", "Proxy-Authorization: Basic eDp5"],
        [f"Authorization: Bearer {token}", f"Api-Key: {other}"],
        [f"Authorization: Bearer {token}", f"X-Goog-Api-Key: {token}"],
    ]
    ids = []
    for lines in cases:
        ids.append(request_id := new_request_id())
        status, headers, body = await raw_exchange(
            port, raw_get("/r/r/echo", *lines, f"X-Request-Id: {request_id}")
        )
        assert status == 400, lines[1:]
        assert json.loads(body)["error"]["code"] == "ambiguous_credential"
        assert headers["X-Request-Id"] == request_id
    status, _, _ = await raw_exchange(port, raw_get("/r/r/echo", f"Authorization: Bearer {token}"))
    assert status == 200
    assert len(upstream.requests) == 1  # only the unambiguous one
    for request_id in ids:
        [event] = await audit_events(audit_log, request_id)
        assert (event["status"], event["reason"]) == (400, "ambiguous_credential")
        assert event["subject"] is None  # refused before anything was verified


async def test_a_route_with_its_own_credential_header_refuses_a_second_one(
    upstream: Upstream,
    config_for: Callable[..., dict[str, Any]],
    token: str,
    local_issuer: Issuer,
) -> None:
    """With caller_credential x-api-key: the header twice, two tokens in it, or Authorization
    beside it is 400 and reaches nothing; the header alone works."""
    other = local_issuer.token()
    cfg = config_for(upstream.url, caller_credential={"header": "X-Api-Key"})
    async with running_proxy(cfg) as stack:
        port = URL(stack.base).port
        assert port is not None
        for lines in [
            [f"X-Api-Key: {token}", f"X-Api-Key: {other}"],
            [f"X-Api-Key: {token}", f"x-api-key: {token}"],
            [f"X-Api-Key: {token} {other}"],
            [f"X-Api-Key: {token}", f"Authorization: Bearer {other}"],
            [f"X-Api-Key: {token}", f"Api-Key: {other}"],
        ]:
            status, _, body = await raw_exchange(port, raw_get("/r/r/echo", *lines))
            assert status == 400, lines
            assert json.loads(body)["error"]["code"] == "ambiguous_credential"
        assert upstream.requests == []
        status, _, _ = await raw_exchange(port, raw_get("/r/r/echo", f"X-Api-Key: {token}"))
        assert status == 200
    assert_nothing_leaked(upstream, token)


async def test_a_credential_in_the_query_string_is_400(
    stack: Stack, upstream: Upstream, token: str, http: aiohttp.ClientSession
) -> None:
    """The RFC 6750 access_token parameter (any case, encoded or not, with or without a
    header credential) or the caller's own token anywhere in the decoded query, which would
    go upstream as sent: 400, nothing forwarded."""
    encoded = "".join(f"%{ord(c):02X}" if c in "eyJ." else c for c in token)
    for query, headers in [
        (f"access_token={token}", {}),
        (f"access_token={token}", bearer(token)),
        ("q=1&ACCESS_TOKEN=x", bearer(token)),
        ("access%5Ftoken=x", bearer(token)),
        (f"q={token}", bearer(token)),
        (f"q={encoded}", bearer(token)),
        (f"next=%2Fv1%3Ftoken%3D{token}", bearer(token)),
    ]:
        url = URL(f"{stack.base}/r/r/echo?{query}", encoded=True)
        async with http.get(url, headers=headers) as response:
            assert response.status == 400, query
            assert (await response.json())["error"]["code"] == "credential_in_query"
    assert upstream.requests == []
    async with http.get(f"{stack.base}/r/r/echo?q=1&token=2", headers=bearer(token)) as response:
        assert response.status == 200


class HeadOnlyUpstream:
    """A keep-alive upstream that reads each request's head and never its body, as Python's
    http.server does for a GET: a body it was sent is read as the next request."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.connections = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line = head.split(b"\r\n")[0]
                self.lines.append(line.decode("latin-1"))
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(line), line))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.mark.parametrize("method", ["GET", "DELETE", "OPTIONS"])
async def test_a_body_on_a_method_without_one_never_becomes_the_next_request(
    config_for: Callable[..., dict[str, Any]], token: str, method: str
) -> None:
    """A body sent with a GET (DELETE, OPTIONS), which many servers leave unread and read
    as the next request on their connection (one the caller wrote, with the key), is
    refused (400 body_not_allowed), declared or chunked. A route that takes such bodies
    (`bodies_on`) sends each on a connection serving that request only."""
    upstream = HeadOnlyUpstream()
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    smuggled = b"GET /admin HTTP/1.1\r\nX-Ignore: "

    async def chunked() -> AsyncIterator[bytes]:
        yield smuggled

    try:
        cfg = config_for(url)
        cfg["policies"][0]["allow"]["r"] = {"methods": ["*"], "paths": ["/echo"]}
        async with running_proxy(cfg) as stack, aiohttp.ClientSession() as http:
            for body in (smuggled, chunked()):
                async with http.request(
                    method, f"{stack.base}/r/r/echo", data=body, headers=bearer(token)
                ) as refused:
                    assert refused.status == 400
                    assert (await refused.json())["error"]["code"] == "body_not_allowed"
        assert upstream.lines == []
        cfg["routes"]["r"]["bodies_on"] = [method]
        async with running_proxy(cfg) as stack, aiohttp.ClientSession() as http:
            async with http.request(
                method, f"{stack.base}/r/r/echo", data=smuggled, headers=bearer(token)
            ) as first:
                assert first.status == 200
                await first.read()
            async with http.get(f"{stack.base}/r/r/echo", headers=bearer(token)) as second:
                assert (second.status, await second.read()) == (200, b"GET /echo HTTP/1.1")
        assert upstream.lines == [f"{method} /echo HTTP/1.1", "GET /echo HTTP/1.1"]
        assert upstream.connections == 2
    finally:
        server.close()
        await server.wait_closed()


async def test_the_callers_token_in_the_path_is_400(
    stack: Stack, upstream: Upstream, token: str, http: aiohttp.ClientSession
) -> None:
    """The caller's own token in the path, as sent or percent-encoded, would go upstream
    with it (invariant 4): 400 credential_in_path, nothing forwarded."""
    encoded = "".join(f"%{ord(c):02X}" if c in "eyJ." else c for c in token)
    for path in (f"/r/r/echo/{token}", f"/r/r/{encoded}/echo", f"/r/r/echo;t={token}"):
        url = URL(f"{stack.base}{path}", encoded=True)
        async with http.get(url, headers=bearer(token)) as response:
            assert response.status == 400, path
            assert (await response.json())["error"]["code"] == "credential_in_path"
    assert upstream.requests == []


async def test_the_callers_token_in_another_header_is_400(
    stack: Stack, upstream: Upstream, token: str, http: aiohttp.ClientSession
) -> None:
    """The caller's own token copied into a header the route forwards would go upstream in
    it (invariant 4): 400 credential_in_header, nothing forwarded."""
    for copy in ({"X-Debug-Token": token}, {"Cookie": f"session={token}"}):
        async with http.get(f"{stack.base}/r/r/echo", headers=bearer(token) | copy) as response:
            assert response.status == 400, copy
            assert (await response.json())["error"]["code"] == "credential_in_header"
    assert upstream.requests == []


async def test_a_token_spelt_another_way_is_401(
    stack: Stack, upstream: Upstream, token: str, http: aiohttp.ClientSession
) -> None:
    """A valid token with base64 padding after a segment is another spelling of it, which
    lenient decoders accept: refused (401 malformed), so the token as sent in the URL beside
    it is not missed by the check for it there."""
    head, payload, signature = token.split(".")
    for spelt in (
        f"{token}==",
        f"{head}.{payload}=.{signature}",
        f"{head}==.{payload}.{signature}",
    ):
        url = URL(f"{stack.base}/r/r/echo?x={token}", encoded=True)
        async with http.get(url, headers=bearer(spelt)) as response:
            assert response.status == 401
            assert (await response.json())["error"]["code"] == "malformed"
    assert upstream.requests == []


class JwksServer:
    """Serves a JWKS on loopback and counts how often it is fetched."""

    def __init__(self, jwks: bytes) -> None:
        self.jwks = jwks
        self.fetches = 0
        self.url = ""

    async def serve(self, request: web.Request) -> web.Response:
        self.fetches += 1
        return web.Response(body=self.jwks, content_type="application/json")


COUNTED_ISSUER = "https://counted.test.invalid"


async def test_an_ambiguous_credential_is_refused_before_any_verification(
    upstream: Upstream,
    config_for: Callable[..., dict[str, Any]],
    local_issuer: Issuer,
) -> None:
    """Two tokens that would each make the proxy fetch its issuer's keys (an unknown kid):
    sent together, 400 and not 401, with no fetch; one of them alone is a 401 after a fetch."""
    jwks = JwksServer(local_issuer.jwks_file.read_bytes())
    app = web.Application()
    app.router.add_get("/jwks", jwks.serve)
    runner, jwks_port = await serve(app)
    cfg = config_for(upstream.url)
    cfg["identity"]["issuers"].append(
        {
            "name": "counted",
            "issuer": COUNTED_ISSUER,
            "jwks_uri": f"http://127.0.0.1:{jwks_port}/jwks",
            "audiences": ["keyproxy"],
            "algorithms": ["RS256"],
            "jwks_refetch_cooldown": "1ms",
        }
    )
    first, second = (
        local_issuer.token(iss=COUNTED_ISSUER, headers={"kid": f"unknown-{n}"}) for n in (1, 2)
    )
    try:
        async with running_proxy(cfg) as stack:
            port = URL(stack.base).port
            assert port is not None
            await eventually(lambda: jwks.fetches, "the issuer's keys were never fetched")
            before = jwks.fetches
            for lines in [
                [f"Authorization: Bearer {first}", f"Authorization: Bearer {second}"],
                [f"Authorization: Bearer {first}, Bearer {second}"],
                [f"Authorization: Bearer {first}", f"X-Api-Key: {second}"],
            ]:
                status, _, _ = await raw_exchange(port, raw_get("/r/r/echo", *lines))
                assert status == 400
            assert jwks.fetches == before
            alone = f"Authorization: Bearer {first}"
            status, _, _ = await raw_exchange(port, raw_get("/r/r/echo", alone))
            assert status == 401
            assert jwks.fetches > before  # so the counter would have seen a verification
    finally:
        await runner.cleanup()
    assert upstream.requests == []


async def test_a_well_formed_request_id_is_the_requests_everywhere(
    stack: Stack,
    upstream: Upstream,
    token: str,
    http: aiohttp.ClientSession,
    audit_log: Path,
) -> None:
    """A caller's well-formed X-Request-Id is the one the upstream receives (once), the one
    in the answer and the one in the audit event; keyproxy's own refusals (400, 401, 403,
    404) carry theirs too."""
    request_id = new_request_id() + ":a.B_c-9"
    async with http.get(
        f"{stack.base}/r/r/echo", headers={**bearer(token), "X-Request-Id": request_id}
    ) as response:
        assert response.status == 200
        assert response.headers.getall("X-Request-Id") == [request_id]
    assert upstream.requests[0].headers.getall("X-Request-Id") == [request_id]
    [event] = await audit_events(audit_log, request_id)
    assert (event["status"], event["route"], event["decision"]) == (200, "r", "allow")
    for method, path, headers, status in [
        ("GET", "/r/r/echo", {}, 401),
        ("DELETE", "/r/r/echo", bearer(token), 403),
        ("GET", "/r/nope/echo", bearer(token), 404),
        ("GET", "/r/r/v1%2Fmodels", bearer(token), 400),
    ]:
        request_id = new_request_id()
        async with http.request(
            method,
            URL(f"{stack.base}{path}", encoded=True),
            headers={**headers, "X-Request-Id": request_id},
        ) as response:
            assert response.status == status
            assert response.headers["X-Request-Id"] == request_id
        [event] = await audit_events(audit_log, request_id)
        assert event["status"] == status
    assert len(upstream.requests) == 1


@pytest.mark.parametrize(
    "value",
    [
        b"%(marker)s" + b"a" * 129,
        b"%(marker)s with spaces",
        b"%(marker)s<script>",
        b"%(marker)s\tb",
        b"caf\xc3\xa9-%(marker)s",
        b"%(marker)s%%0d%%0aX-Injected:%%201",
        b"%(marker)s;rm",
    ],
    ids=["too-long", "spaces", "markup", "tab", "non-ascii", "encoded-crlf", "semicolon"],
)
async def test_a_malformed_request_id_is_replaced(
    stack: Stack, upstream: Upstream, token: str, audit_log: Path, value: bytes
) -> None:
    """Too long, spaces, odd characters, a tab, text beyond ASCII, encoded line breaks: the
    caller's value goes nowhere (not upstream, not back, not in the log); the request gets a
    new id, the same in all three places."""
    port = URL(stack.base).port
    assert port is not None
    marker = f"m{time.monotonic_ns()}"
    line = b"X-Request-Id: " + value % {b"marker": marker.encode()}
    status, headers, _ = await raw_exchange(
        port, raw_get("/r/r/echo", f"Authorization: Bearer {token}", line)
    )
    assert status == 200
    [new] = headers.getall("X-Request-Id")
    assert len(new) == 32
    assert set(new) <= set("0123456789abcdef")
    assert "X-Injected" not in headers
    assert upstream.requests[0].headers.getall("X-Request-Id") == [new]
    [event] = await audit_events(audit_log, new)
    assert event["status"] == 200
    assert marker not in audit_log.read_text()


@pytest.mark.parametrize(
    "value",
    [b"abc\rX-Injected: 1", b"abc\nX-Injected: 1", b"abc\r\n X-Injected: 1", b"abc\x00def"],
    ids=["cr", "lf", "obs-fold", "nul"],
)
async def test_line_breaks_in_a_request_id_never_become_headers(
    stack: Stack, upstream: Upstream, token: str, value: bytes
) -> None:
    """A bare CR or LF, an obsolete line folding or a NUL in X-Request-Id: the request is
    refused before the proxy, and nothing the caller wrote comes back as a header."""
    port = URL(stack.base).port
    assert port is not None
    status, headers, _ = await raw_exchange(
        port, raw_get("/r/r/echo", f"Authorization: Bearer {token}", b"X-Request-Id: " + value)
    )
    assert status == 400
    assert "X-Injected" not in headers
    assert all(v != "abc" for v in headers.getall("X-Request-Id", []))
    assert upstream.requests == []


# ----------------------------------------------------------------------------- invariant 5


@pytest.mark.parametrize(
    "target",
    [
        b"/r/r/v1/../echo",
        b"/r/r/v1/%2e%2e/echo",
        b"/r/r/v1/%2E%2e/echo",
        b"/r/r/v1%2Fmodels",
        b"/r/r/v1%2fmodels",
        b"/r/r/v1%5Cmodels",
        b"/r/r/v1\\models",
        b"/r/r/v1/mod%00els",
        b"/r/r/v1/mod%0aels",
        b"/r/r/v1//models",
        b"/r/r/v1/%252e%252e/echo",
    ],
)
async def test_ambiguous_paths_are_refused(
    stack: Stack, upstream: Upstream, token: str, target: bytes
) -> None:
    """Dot segments, encoded slashes and backslashes, NUL and control characters get 400."""
    port = URL(stack.base).port
    assert port is not None
    status = await raw_request(port, target, f"Authorization: Bearer {token}\r\n".encode())
    assert status == 400
    assert upstream.requests == []


# ----------------------------------------------------------------------------- invariant 6


@pytest.mark.parametrize(
    "case", ["alg_none", "hs256_public_key", "wrong_iss", "wrong_aud", "expired", "unknown_kid"]
)
async def test_bad_tokens_get_401(
    stack: Stack,
    upstream: Upstream,
    local_issuer: Issuer,
    http: aiohttp.ClientSession,
    case: str,
) -> None:
    """Forged, misissued and expired tokens are refused with 401 and reach nothing."""
    now = int(time.time())
    claims = {"iss": LOCAL_ISSUER, "aud": "keyproxy", "sub": "local-agent", "exp": now + 300}
    if case == "alg_none":
        token = _unsigned({"alg": "none", "kid": "test-1"}, claims)
    elif case == "hs256_public_key":
        token = _hmac_signed(local_issuer.public_pem(), claims)
    elif case == "wrong_iss":
        token = local_issuer.token(iss="https://evil.test.invalid")
    elif case == "wrong_aud":
        token = local_issuer.token(aud="someone-else")
    elif case == "expired":
        token = local_issuer.token(exp=now - 600, iat=now - 900)
    else:
        token = local_issuer.token(headers={"kid": "no-such-kid"})
    CANARIES.add(token)
    async with http.get(f"{stack.base}/r/r/echo", headers=bearer(token)) as response:
        assert response.status == 401, case
    # The well-formed local token is accepted, so the refusals above are about the token.
    async with http.get(f"{stack.base}/r/r/echo", headers=bearer(local_issuer.token())) as ok:
        assert ok.status == 200
    assert len(upstream.requests) == 1


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}."


def _hmac_signed(secret: bytes, claims: dict[str, Any]) -> str:
    import hashlib  # noqa: PLC0415
    import hmac  # noqa: PLC0415

    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "test-1"}).encode())
    body = _b64(json.dumps(claims).encode())
    sig = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}"


# ----------------------------------------------------------------------------- invariant 7


async def test_loopback_upstream_without_allowance_is_refused(
    config_for: Callable[..., dict[str, Any]], token: str, http: aiohttp.ClientSession
) -> None:
    """An upstream name resolving to 127.0.0.1 is refused with no connection made."""
    async with ConnectionCounter() as counter:
        cfg = config_for(f"http://localhost:{counter.port}", egress={"allow_cidrs": []})
        async with (
            running_proxy(cfg) as stack,
            http.get(f"{stack.base}/r/r/echo", headers=bearer(token)) as response,
        ):
            assert response.status == 502
            assert (await response.json())["error"]["code"] == "egress_denied"
        assert counter.count == 0


async def test_metadata_address_is_refused(
    config_for: Callable[..., dict[str, Any]], token: str, http: aiohttp.ClientSession
) -> None:
    """An upstream at 169.254.169.254 is refused before any connection attempt."""
    cfg = config_for("http://169.254.169.254", egress={"allow_cidrs": ["127.0.0.0/8"]})
    async with (
        running_proxy(cfg) as stack,
        http.get(f"{stack.base}/r/r/echo", headers=bearer(token)) as response,
    ):
        assert response.status == 502
        assert (await response.json())["error"]["code"] == "egress_denied"


# ----------------------------------------------------------------------------- limits


async def test_body_too_large_is_413_before_connecting(
    stack: Stack, upstream: Upstream, token: str, http: aiohttp.ClientSession
) -> None:
    """Declared and chunked bodies above the limit get 413 and nothing reaches upstream."""
    async with http.post(f"{stack.base}/r/r/echo", headers=bearer(token), data=b"x" * 2048) as r:
        assert r.status == 413

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"y" * 512

    async with http.post(f"{stack.base}/r/r/echo", headers=bearer(token), data=chunks()) as r:
        assert r.status == 413
    assert upstream.requests == []
    async with http.post(f"{stack.base}/r/r/echo", headers=bearer(token), data=b"ok") as r:
        assert r.status == 200
    assert upstream.requests[0].body == b"ok"


async def test_compressed_request_body_is_forwarded_as_sent(
    stack: Stack, upstream: Upstream, token: str, http: aiohttp.ClientSession
) -> None:
    """A gzip request body reaches the upstream byte for byte, with its Content-Encoding."""
    import gzip  # noqa: PLC0415

    body = gzip.compress(b'{"x": 1}')
    headers = {**bearer(token), "Content-Encoding": "gzip", "Content-Type": "application/json"}
    async with http.post(f"{stack.base}/r/r/echo", headers=headers, data=body) as response:
        assert response.status == 200
    assert upstream.requests[0].body == body
    assert upstream.requests[0].headers["Content-Encoding"] == "gzip"


async def test_stalled_chunked_body_is_408(stack: Stack, upstream: Upstream, token: str) -> None:
    """A chunked upload that stops arriving gets 408 after the read timeout; nothing is sent."""
    port = URL(stack.base).port
    assert port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST /r/r/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            + f"Authorization: Bearer {token}\r\n\r\n4\r\nabcd\r\n".encode()
        )
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
    assert int(status_line.split()[1]) == 408
    assert upstream.requests == []


async def test_stalled_declared_length_body_is_408(
    stack: Stack, token: str, audit_log: Path
) -> None:
    """An upload of declared length that stops arriving in the middle gets 408 after the read
    timeout, as a chunked one does, rather than holding its handler and upstream connection
    for as long as the caller likes; the audit event says why."""
    port = URL(stack.base).port
    assert port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    try:
        writer.write(
            b"POST /r/r/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
            + f"Authorization: Bearer {token}\r\n\r\n".encode()
            + b"x" * 10  # and then nothing: 90 bytes owed
        )
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
    assert int(status_line.split()[1]) == 408
    assert time.monotonic() - started >= 1.0  # not before the route's 1 s read timeout
    seen = await eventually(
        lambda: _matching(audit_log, "body_timeout", lambda e: e.get("reason") == "body_timeout"),
        "no audit event for the stalled upload",
    )
    assert (seen[-1]["status"], seen[-1]["path"]) == (408, "/echo")


@asynccontextmanager
async def raw_upstream(answer: bytes) -> AsyncIterator[str]:
    """An upstream that reads a request, writes `answer` as given, and closes the connection:
    for answers aiohttp's server would not send (lengths that lie, odd headers)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


def _answer(declared: int, sent: int, extra: bytes = b"") -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    return head + b"Content-Length: %d\r\n" % declared + extra + b"\r\n" + b"x" * sent


# After a 101 the upstream speaks another protocol: here a WebSocket frame, then bytes that
# would read as an HTTP answer if anyone kept parsing HTTP.
TUNNELLED = b"\x81\x05hello" + b"HTTP/1.1 200 OK\r\nX-Tunnelled: yes\r\nContent-Length: 0\r\n\r\n"


class SwitchingUpstream:
    """A raw upstream whose first connection gets `first`, and is then held open until the
    proxy closes it; any later connection gets a short 200."""

    def __init__(self, first: bytes) -> None:
        self.first = first
        self.connections = 0
        self.first_closed = asyncio.Event()
        self.url = ""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        first = self.connections == 1
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(self.first if first else _answer(2, 2))
            await writer.drain()
            if first:
                # Whatever the proxy sends now is not read as HTTP; only its close ends this.
                async with asyncio.timeout(10):
                    while await reader.read(65536):
                        pass
                self.first_closed.set()
        finally:
            writer.close()


@pytest.mark.parametrize(
    "first",
    [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n" + TUNNELLED,
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + TUNNELLED,
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n" + TUNNELLED,
    ],
    ids=["websocket", "h2c", "no-upgrade-header"],
)
async def test_an_upstream_switching_protocols_is_502_and_its_connection_closed(
    config_for: Callable[..., dict[str, Any]], token: str, audit_log: Path, first: bytes
) -> None:
    """An upstream 101 never reaches the caller: the caller gets exactly one answer, a 502,
    and none of the bytes that followed the 101; the upstream connection is closed, not
    pooled, so the next request opens a new one and gets a plain answer."""
    upstream = SwitchingUpstream(first)
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    request_id = new_request_id()
    try:
        async with running_proxy(config_for(url)) as stack:
            port = URL(stack.base).port
            assert port is not None
            auth = f"Authorization: Bearer {token}"
            head = raw_get("/r/r/echo", auth, f"X-Request-Id: {request_id}")
            status, headers, rest = await raw_exchange(port, head)
            assert status == 502
            assert json.loads(rest)["error"]["code"] == "upstream_protocol_switch"
            assert b"HTTP/1." not in rest  # the one answer, nothing after it
            assert b"hello" not in rest
            assert "Upgrade" not in headers
            assert "X-Tunnelled" not in headers
            await asyncio.wait_for(upstream.first_closed.wait(), 10)
            status, _, rest = await raw_exchange(port, raw_get("/r/r/echo", auth))
            assert (status, rest) == (200, b"xx")
            assert upstream.connections == 2
    finally:
        server.close()
        await server.wait_closed()
    [event] = await audit_events(audit_log, request_id)
    assert (event["status"], event["upstream_status"]) == (502, 101)
    assert event["reason"] == "upstream_protocol_switch"


@pytest.mark.parametrize(
    "interim",
    [
        b"HTTP/1.1 103 Early Hints\r\nLink: </hint.css>; rel=preload\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </hint.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </hint.js>; rel=preload\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\nX-Hint: hint.css\r\n\r\n",
        b"HTTP/1.1 102 Processing\r\nX-Hint: hint.css\r\n\r\n",
    ],
    ids=["103", "103-twice", "100", "102"],
)
async def test_interim_answers_never_reach_the_caller(
    config_for: Callable[..., dict[str, Any]], token: str, interim: bytes
) -> None:
    """Interim answers before the final one (Early Hints, an unasked-for Continue,
    Processing) are not relayed: the caller reads exactly one answer, the final 200, and
    none of the interim headers."""
    final = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n"
    async with (
        raw_upstream(interim + final + b'{"ok":true}') as url,
        running_proxy(config_for(url)) as stack,
    ):
        port = URL(stack.base).port
        assert port is not None
        status, headers, rest = await raw_exchange(
            port, raw_get("/r/r/echo", f"Authorization: Bearer {token}")
        )
    assert (status, rest) == (200, b'{"ok":true}')
    assert "Link" not in headers
    assert "X-Hint" not in headers
    assert all("hint" not in v for v in headers.values())


async def test_an_upstreams_own_request_id_goes_back_beside_ours(
    config_for: Callable[..., dict[str, Any]], token: str, http: aiohttp.ClientSession
) -> None:
    """The answer's X-Request-Id is the request's; an upstream's id of its own (as OpenAI
    sends) comes back as X-Upstream-Request-Id."""
    request_id = new_request_id()
    async with (
        raw_upstream(_answer(2, 2, b"X-Request-Id: req_upstream_7\r\n")) as url,
        running_proxy(config_for(url)) as stack,
        http.get(
            f"{stack.base}/r/r/echo", headers={**bearer(token), "X-Request-Id": request_id}
        ) as response,
    ):
        assert response.status == 200
        assert response.headers.getall("X-Request-Id") == [request_id]
        assert response.headers.getall("X-Upstream-Request-Id") == ["req_upstream_7"]


async def test_short_answer_cut_short_is_502(
    config_for: Callable[..., dict[str, Any]],
    token: str,
    http: aiohttp.ClientSession,
    audit_log: Path,
) -> None:
    """A short answer that ends before its declared length is a clean 502, never a body that
    looks complete; the audit event says why."""
    rid = new_request_id()
    async with (
        raw_upstream(_answer(1000, 10)) as url,
        running_proxy(config_for(url)) as stack,
        http.get(
            f"{stack.base}/r/r/echo?cut", headers={**bearer(token), "X-Request-Id": rid}
        ) as response,
    ):
        assert response.status == 502
        assert (await response.json())["error"]["code"] == "upstream_error"
    [event] = await audit_events(audit_log, rid)  # written after the refusal's answer
    assert (event["status"], event["reason"]) == (502, "upstream_error")
    assert event["upstream_status"] == 200


async def test_long_answer_cut_short_breaks_the_connection(
    config_for: Callable[..., dict[str, Any]], token: str, http: aiohttp.ClientSession
) -> None:
    """A streamed answer that ends before its declared length: the status line is gone, so
    the caller's connection is cut and its client reports an incomplete body."""
    async with (
        raw_upstream(_answer(300_000, 100_000)) as url,
        running_proxy(config_for(url)) as stack,
        http.get(f"{stack.base}/r/r/echo", headers=bearer(token)) as response,
    ):
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()


@pytest.mark.parametrize("size", [10, 100_000])
async def test_headers_named_in_connection_are_not_returned(
    config_for: Callable[..., dict[str, Any]],
    token: str,
    http: aiohttp.ClientSession,
    size: int,
) -> None:
    """A response header the upstream lists in Connection is hop-by-hop: not passed back,
    for a short answer as for a streamed one."""
    extra = b"Connection: keep-alive, X-Hop\r\nX-Hop: upstream-only\r\nX-Kept: yes\r\n"
    async with (
        raw_upstream(_answer(size, size, extra)) as url,
        running_proxy(config_for(url)) as stack,
        http.get(f"{stack.base}/r/r/echo", headers=bearer(token)) as response,
    ):
        assert response.status == 200
        assert len(await response.read()) == size
        assert "X-Hop" not in response.headers
        assert response.headers["X-Kept"] == "yes"


async def test_stalled_upstream_is_504(
    stack: Stack, token: str, http: aiohttp.ClientSession
) -> None:
    """An upstream that does not answer within the read timeout gives 504."""
    async with http.get(f"{stack.base}/r/r/stall", headers=bearer(token)) as response:
        assert response.status == 504


async def test_upstream_silent_before_a_short_body_ends_is_504(
    stack: Stack, token: str, http: aiohttp.ClientSession
) -> None:
    """A declared-length answer whose body stops arriving gives 504, not a short body."""
    async with http.get(f"{stack.base}/r/r/stall/short", headers=bearer(token)) as response:
        assert response.status == 504


async def test_upstream_silent_in_a_stream_cuts_the_answer(
    stack: Stack, token: str, http: aiohttp.ClientSession, audit_log: Path
) -> None:
    """A stream that falls silent for the read timeout is cut off after what was sent: the
    caller can never take it for complete, and the audit event says why."""
    async with http.get(f"{stack.base}/r/r/stall/stream", headers=bearer(token)) as response:
        assert response.status == 200
        assert await response.content.readuntil(b"\n\n") == b"data: first\n\n"
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    cut = await eventually(
        lambda: _matching(audit_log, "/stall/stream", lambda e: e.get("path") == "/stall/stream"),
        "no audit event for the cut stream",
    )
    assert cut[-1]["reason"] == "upstream_timeout"
    assert cut[-1]["status"] == 200  # the status line had been sent


async def test_a_caller_uploading_slower_than_the_timeouts_is_not_an_upstream_timeout(
    upstream: Upstream,
    config_for: Callable[..., dict[str, Any]],
    token: str,
    http: aiohttp.ClientSession,
) -> None:
    """The wait for the answer counts from the end of the caller's upload, not its start: a
    declared-length body sent over longer than timeouts.connect + timeouts.read arrives."""
    parts, gap = 6, 0.6  # the last part 3 s after the first, against 1 s + 1 s

    async def slowly() -> AsyncIterator[bytes]:
        for _ in range(parts):
            yield b"x" * 100
            await asyncio.sleep(gap)  # pacing: a caller slower than the timeouts

    config = config_for(upstream.url, timeouts={"connect": "1s", "read": "1s"})
    async with (
        running_proxy(config) as stack,
        http.post(
            f"{stack.base}/r/r/echo",
            data=slowly(),
            headers={**bearer(token), "Content-Length": str(100 * parts)},
        ) as response,
    ):
        assert response.status == 200
    assert upstream.requests[-1].body == b"x" * (100 * parts)


@pytest.mark.parametrize("path", ["/trickle/short", "/trickle/stream"])
async def test_an_answer_slower_than_the_read_timeout_but_never_silent_arrives(
    stack: Stack, token: str, http: aiohttp.ClientSession, path: str
) -> None:
    """The read timeout bounds silence, not the whole answer."""
    async with http.get(f"{stack.base}/r/r{path}", headers=bearer(token)) as response:
        assert response.status == 200
        assert await response.read() == b"data: part\n\n" * TRICKLE_PARTS


async def test_a_caller_slower_than_the_read_timeout_gets_the_whole_answer(
    stack: Stack, token: str, http: aiohttp.ClientSession
) -> None:
    """While the caller does not read, the proxy does not wait on the upstream: a pause
    longer than the read timeout is not the upstream's silence."""
    async with http.get(f"{stack.base}/r/r/big", headers=bearer(token)) as response:
        assert response.status == 200
        first = await response.content.readany()
        await asyncio.sleep(1.5)  # a slow caller: longer than the route's 1 s read timeout
        rest = await response.read()
    assert len(first) + len(rest) == BIG_BYTES


async def test_health_endpoints(stack: Stack, http: aiohttp.ClientSession) -> None:
    """Liveness answers; readiness reports Vault reachable and the key loaded (in detail on
    the admin listener only)."""
    async with http.get(f"{stack.base}/healthz") as response:
        assert response.status == 200
    async with http.get(f"{stack.admin}/readyz") as response:
        body = await response.json()
        assert response.status == 200, body
    assert body["vault"] is True
    assert body["keys"]["r"]["version"] >= 1


# ----------------------------------------------------------------------------- invariant 9


async def test_every_request_is_one_audit_event(
    stack: Stack,
    token: str,
    http: aiohttp.ClientSession,
    agent: Agent,
    audit_log: Path,
) -> None:
    """Allowed and denied requests each write one event with identity, route, key version;
    the query string is not logged."""
    marker = f"audit-{time.monotonic_ns()}"
    ids = new_request_id() + "-get", new_request_id() + "-delete"
    headers = [{**bearer(token), "X-Request-Id": rid} for rid in ids]
    async with http.get(f"{stack.base}/r/r/echo?{marker}=1", headers=headers[0]) as r:
        assert r.status == 200
    async with http.delete(f"{stack.base}/r/r/echo?{marker}=2", headers=headers[1]) as r:
        assert r.status == 403
    # (A refusal's event is written after its answer: polled for, as the other.)
    [allowed], [denied] = [await audit_events(audit_log, rid) for rid in ids]
    assert (allowed["method"], allowed["status"], allowed["path"]) == ("GET", 200, "/echo")
    assert (denied["method"], denied["status"], denied["path"]) == ("DELETE", 403, "/echo")
    assert allowed["subject"] == agent.entity_id
    assert allowed["issuer"] == "openbao"
    assert allowed["key_version"] >= 1
    assert allowed["decision"] == "allow"
    assert denied["decision"] == "deny"
    assert denied["reason"] == "method_not_allowed"
    assert marker not in audit_log.read_text()


SENTINEL = "/r/sentinel/x"


async def test_each_way_a_request_ends_writes_exactly_one_event(
    stack: Stack, token: str, http: aiohttp.ClientSession, audit_log: Path
) -> None:
    """A short answer, a streamed one, a refusal, a stream the upstream leaves silent and a
    caller that hangs up mid-answer each leave one audit event: the inline and the deferred
    accounting never both run, and neither is skipped."""

    def counts() -> dict[tuple[str, str], int]:
        seen: dict[tuple[str, str], int] = {}
        for e in read_events(audit_log):
            if e.get("event") == "request" and (e.get("route") == "r" or e["path"] == SENTINEL):
                key = (e["method"], e["path"])
                seen[key] = seen.get(key, 0) + 1
        return seen

    async def logged(key: tuple[str, str], at_least: int) -> None:
        await eventually(lambda: counts().get(key, 0) >= at_least, f"no audit event for {key}")

    before = counts()
    async with http.get(f"{stack.base}/r/r/echo", headers=bearer(token)) as response:
        assert response.status == 200
    async with http.get(f"{stack.base}/r/r/trickle/stream", headers=bearer(token)) as response:
        await response.read()
    async with http.delete(f"{stack.base}/r/r/echo", headers=bearer(token)) as response:
        assert response.status == 403
    async with http.get(f"{stack.base}/r/r/stall/stream", headers=bearer(token)) as response:
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    async with (
        aiohttp.ClientSession() as own,  # hung up on after the first part
        own.get(f"{stack.base}/r/r/big", headers=bearer(token)) as response,
    ):
        await response.content.readany()
    await logged(("GET", "/big"), before.get(("GET", "/big"), 0) + 1)
    # Lines are written in the order the events were made: once this one is in, all are.
    async with http.get(f"{stack.base}{SENTINEL}", headers=bearer(token)) as response:
        assert response.status == 404  # an unknown route: its event names the raw path
    sentinel = ("GET", SENTINEL)
    await logged(sentinel, before.get(sentinel, 0) + 1)
    after = counts()
    for key in [
        ("GET", "/echo"),
        ("GET", "/trickle/stream"),
        ("DELETE", "/echo"),
        ("GET", "/stall/stream"),
        ("GET", "/big"),
    ]:
        assert after.get(key, 0) - before.get(key, 0) == 1, key


# ----------------------------------------------------------------------------- Vault outage


async def test_vault_outage_serves_from_cache_then_503(
    fresh_openbao: OpenBaoDevServer,
    local_issuer: Issuer,
    http: aiohttp.ClientSession,
    upstream: Upstream,
) -> None:
    """With Vault stopped, requests succeed from the cache within max_staleness, then get 503
    saying when to try again: after the next refresh (500 ms, so 1 s)."""
    bao = fresh_openbao
    agent = bao.add_agent("outage-agent")
    token = bao.agent_token(agent)
    CANARIES.add(token)
    key = new_key()
    bao.put_key("keyproxy/keys/outage", key)
    cfg = make_config(bao, agent, local_issuer, upstream.url, "keyproxy/keys/outage")
    async with running_proxy(cfg) as stack:
        async with http.get(f"{stack.base}/r/r/echo", headers=bearer(token)) as response:
            assert response.status == 200
        # Staleness counts from the key's last confirmation, before the stop began; the stop
        # itself blocks this loop (and the proxy in it) for as long as it takes.
        stopping = time.monotonic()
        bao.stop()
        stopped = time.monotonic()
        async with http.get(f"{stack.base}/r/r/echo", headers=bearer(token)) as response:
            assert response.status == 200, "the cached key must serve right after Vault stops"

        async def answered() -> int:
            async with http.get(f"{stack.base}/r/r/echo", headers=bearer(token)) as response:
                if response.status == 503:
                    assert (await response.json())["error"]["code"] == "key_stale"
                    assert response.headers["Retry-After"] == "1"
                    return 503
                assert response.status == 200
                assert "Retry-After" not in response.headers
                return 200

        await eventually(
            answered,
            "never turned to 503 after max_staleness",
            within=stopped + 15 - time.monotonic(),
            interval=0.2,
            until=(503).__eq__,
        )
        # max_staleness is 3 s: not before it, and (with a 500 ms refresh) not long after.
        assert time.monotonic() - stopping >= 2.0
        async with http.get(f"{stack.base}/readyz") as response:
            assert response.status == 503
    assert {s.headers["Authorization"] for s in upstream.requests} == {f"Bearer {key}"}


async def test_a_key_never_loaded_is_503_with_retry_after(
    openbao: OpenBaoDevServer,
    agent: Agent,
    local_issuer: Issuer,
    token: str,
    http: aiohttp.ClientSession,
    upstream: Upstream,
) -> None:
    """A route whose key Vault does not hold answers 503 key_unavailable with Retry-After of
    the refresh interval in whole seconds, rounded up (2.5 s: 3); a refusal of another kind
    (401) says nothing of retrying."""
    cfg = make_config(openbao, agent, local_issuer, upstream.url, "keyproxy/keys/never-written")
    cfg["vault"] = openbao.vault_yaml(refresh_interval="2500ms", max_staleness="10s")
    async with running_proxy(cfg) as stack:
        async with http.get(f"{stack.base}/r/r/echo", headers=bearer(token)) as response:
            assert response.status == 503
            assert (await response.json())["error"]["code"] == "key_unavailable"
            assert response.headers["Retry-After"] == "3"
            assert len(response.headers["X-Request-Id"]) == 32
        async with http.get(f"{stack.base}/r/r/echo") as response:
            assert response.status == 401
            assert "Retry-After" not in response.headers
    assert upstream.requests == []
