"""The listeners: malformed requests, slow and greedy clients, the admin listener, signals.

Raw sockets on loopback against the real proxy (a real OpenBao behind it), because what is
tested here is what a well-behaved HTTP client never sends.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from keyproxy import audit, config
from keyproxy.devserver import OpenBaoDevServer
from keyproxy.server import listen
from keyproxy.server.app import RELOADER, build_app
from keyproxy.server.tlsapp import serve_tls
from keyproxy.tls import ServerTLS, TLSFiles
from tests.helpers.cli import ready, started
from tests.helpers.events import read_events
from tests.helpers.logscan import CANARIES
from tests.helpers.polling import eventually
from tests.helpers.servers import Stack, Upstream, bearer, free_port, new_key, running_proxy
from tests.helpers.svid_ca import SvidCA

KEY_PATH = "keyproxy/keys/server-test"


def _config(openbao: OpenBaoDevServer, upstream: str, **server: Any) -> dict[str, Any]:
    return {
        "vault": openbao.vault_yaml(refresh_interval="500ms", max_staleness="60s"),
        "identity": {"issuers": [openbao.issuer_yaml("openbao")]},
        "server": server,
        "routes": {
            "r": {
                "upstream": upstream,
                "secret": {"path": KEY_PATH},
                "inject": [{"header": "Authorization", "format": "Bearer {key}"}],
                "egress": {"allow_cidrs": ["127.0.0.0/8"]},
                "allow_http": True,
            }
        },
        "policies": [
            {
                "name": "any",
                "subjects": ["*"],
                "allow": {"r": {"methods": ["GET"], "paths": ["/**"]}},
            }
        ],
    }


@pytest.fixture(scope="module")
def server_key(openbao: OpenBaoDevServer) -> str:
    key = new_key()
    openbao.put_key(KEY_PATH, key)
    return key


@pytest.fixture
async def stack(
    openbao: OpenBaoDevServer, upstream: Upstream, server_key: str
) -> AsyncIterator[Stack]:
    cfg = _config(
        openbao,
        upstream.url,
        header_timeout="1s",
        max_connections=20,
        max_connections_per_source=4,
    )
    async with running_proxy(cfg) as value:
        yield value


def _port(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


async def _exchange(port: int, data: bytes, within: float = 10.0) -> bytes:
    """Send `data` on a new connection and read until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(within):
            return await reader.read()  # to EOF
    finally:
        writer.close()


def _secret_token() -> str:
    """A credential-looking value that nothing registers or recognises: only not writing it
    anywhere keeps it out of logs and answers."""
    value = "opaque-" + secrets.token_urlsafe(24)
    CANARIES.add(value)
    return value


GET = b"GET /r/r/x HTTP/1.1\r\nHost: a\r\n"


MALFORMED = {
    "bare LF after the credential": GET + b"Authorization: Bearer {t}\nX-B: 1\r\n\r\n",
    "NUL in the credential": GET + b"Authorization: Bearer {t}\x00\r\n\r\n",
    "header line without a colon": GET + b"Bearer {t}\r\n\r\n",
    "space before the colon": GET + b"Authorization : Bearer {t}\r\n\r\n",
    "obsolete line folding": GET + b"X-A: 1\r\n Bearer {t}\r\n\r\n",
    "header line too long": GET + b"Authorization: Bearer {t}" + b"A" * 20000 + b"\r\n\r\n",
    "credential in a broken request line": b"GET /r/r/x?token={t} HTTP/1.1 junk\r\nHost: a\r\n\r\n",
    "bad method": b"G\x01T /r/r/x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {t}\r\n\r\n",
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
async def test_a_malformed_request_echoes_nothing_and_logs_no_header(
    stack: Stack, upstream: Upstream, kind: str, audit_log: Path
) -> None:
    """A request aiohttp cannot parse gets a JSON 400 holding nothing it sent, one
    request.malformed event without header values, nothing upstream, and is counted."""
    token = _secret_token()
    audit.flush()
    before = len(read_events(audit_log))
    answer = await _exchange(_port(stack.base), MALFORMED[kind].replace(b"{t}", token.encode()))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith((b"HTTP/1.1 400 ", b"HTTP/1.0 400 ")), answer[:200]
    assert b"content-type: application/json" in head.lower()
    assert b"server: keyproxy" in head.lower()
    assert json.loads(body)["error"]["code"] == "malformed_request"
    assert token.encode() not in answer
    assert upstream.requests == []
    audit.flush()
    logged = read_events(audit_log)[before:]
    assert token not in json.dumps(logged)
    malformed = [e for e in logged if e["event"] == "request.malformed"]
    assert len(malformed) == 1, logged
    assert malformed[0]["source"] == "127.0.0.1"
    assert malformed[0]["level"] == "warning"
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{stack.admin}/metrics") as response,
    ):
        metrics = await response.text()
    assert 'keyproxy_requests_total{decision="malformed",route="-",status="400"}' in metrics


async def _closed_by_server(reader: asyncio.StreamReader, within: float) -> bytes:
    """What the server sent until it closed the connection (it must, within `within`)."""
    async with asyncio.timeout(within):
        return await reader.read()


async def test_headers_sent_too_slowly_close_the_connection(stack: Stack) -> None:
    """A caller trickling its header lines (slowloris), or connecting and sending nothing,
    is cut off after server.header_timeout; the closes are counted."""
    port = _port(stack.base)
    trickler = await asyncio.open_connection("127.0.0.1", port)
    silent = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    try:
        trickler[1].write(b"GET /healthz HTTP/1.1\r\n")

        async def trickle() -> None:
            for i in range(100):  # one header line every 0.2 s, for 20 s at most
                if trickler[0].at_eof():
                    return
                trickler[1].write(b"X-%d: 1\r\n" % i)
                await asyncio.sleep(0.2)  # the caller's pace, which is what is tested

        feeding = asyncio.create_task(trickle())
        assert await _closed_by_server(trickler[0], within=10) == b""
        assert await _closed_by_server(silent[0], within=10) == b""
        feeding.cancel()
    finally:
        for _, writer in (trickler, silent):
            writer.close()
    assert time.monotonic() - started >= 0.9  # not before the 1 s header timeout
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{stack.admin}/metrics") as response,
    ):
        metrics = await response.text()
    assert 'keyproxy_connections_closed_total{reason="header_timeout"} 2.0' in metrics


async def _hi(_: web.Request) -> web.Response:
    return web.Response(text="hi")


async def test_a_tls_handshake_not_finished_in_the_header_timeout_is_closed(
    tmp_path: Path,
) -> None:
    """On a TLS listener a caller that connects and never finishes its handshake (sends
    nothing, or half a ClientHello) is cut off after server.header_timeout too, not after
    asyncio's own 60 s; a caller that does finish it is served."""
    server_ca = SvidCA("server.test")
    cert, key = server_ca.server_cert().write(tmp_path, "server")
    app = web.Application()
    app.router.add_get("/", _hi)
    serve_tls(app, ServerTLS(TLSFiles(cert.absolute(), key.absolute())))
    runner, port = await listen.start(app, "127.0.0.1", 0, listen.Limits(1.0, 5.0, 20, 4))
    try:
        silent = await asyncio.open_connection("127.0.0.1", port)
        half = await asyncio.open_connection("127.0.0.1", port)
        half[1].write(b"\x16\x03\x01\x02\x00\x01")  # a ClientHello's first bytes
        started = time.monotonic()
        try:
            for reader, _ in (silent, half):
                assert await _closed_by_server(reader, within=10) == b""
        finally:
            for _, writer in (silent, half):
                writer.close()
        assert time.monotonic() - started < 10
        context = ssl.create_default_context(cadata=server_ca.bundle_pem().decode())
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as http,
            http.get(f"https://127.0.0.1:{port}/") as response,
        ):
            assert response.status == 200
    finally:
        await runner.cleanup()


async def test_a_request_in_time_is_served_and_the_connection_kept(stack: Stack) -> None:
    """Headers sent in time: answered, and the connection stays open for the next request,
    whose own headers get a fresh header timeout."""
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(stack.base))
    try:
        for _ in range(3):
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200 ")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
            await asyncio.sleep(0.6)  # idle between requests, less than the header timeout
    finally:
        writer.close()


async def test_connections_over_the_per_source_cap_are_refused(stack: Stack) -> None:
    """A fifth connection from one address (cap 4) gets a canned 503 and is closed before
    anything of it is read; once one closes, a new one is admitted."""
    port = _port(stack.base)
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
    try:
        answer = await _exchange(port, b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 503 ")
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == (
            "too_many_connections"
        )
        held.pop()[1].close()

        async def admitted() -> bool:
            answer = await _exchange(
                port, b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
            )
            return answer.startswith(b"HTTP/1.1 200 ")

        await eventually(admitted, "the freed slot was never reused", interval=0.05)
    finally:
        for _, writer in held:
            writer.close()


async def test_trusted_proxies_are_exempt_from_the_per_source_cap_not_the_total(
    openbao: OpenBaoDevServer, upstream: Upstream, server_key: str
) -> None:
    """Connections from a trusted proxy carry many callers: only max_connections bounds
    them."""
    cfg = _config(
        openbao,
        upstream.url,
        trusted_proxies=["127.0.0.0/8"],
        max_connections=6,
        max_connections_per_source=2,
    )
    async with running_proxy(cfg) as stack:
        port = _port(stack.base)
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(6)]
        try:
            for _, writer in held[:5]:  # beyond the per-source cap of 2: all served
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
            for reader, _ in held[:5]:
                async with asyncio.timeout(10):
                    assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200")
            answer = await _exchange(port, b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 503 ")
        finally:
            for _, writer in held:
                writer.close()


async def test_the_agents_port_shows_status_only(stack: Stack, server_key: str) -> None:
    """On the proxy port: no /metrics, and readiness without secret paths, fingerprints or
    read counts; the admin listener has them. Every answer names keyproxy, no versions."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{stack.base}/metrics") as response:
            assert response.status == 404
            assert response.headers["Server"] == "keyproxy"
        async with http.get(f"{stack.base}/readyz") as response:
            assert response.status == 200
            assert await response.json() == {"ready": True}
            assert response.headers["Server"] == "keyproxy"
        async with http.get(f"{stack.base}/r/r/x") as response:
            assert response.status == 401
            assert response.headers["Server"] == "keyproxy"
        async with http.get(f"{stack.admin}/readyz") as response:
            detail = await response.json()
            assert KEY_PATH in detail["keys"]["r"]["secret"]
            assert detail["revocation_list"]["read"] is True
            assert detail["mcp_session_key"] == {"needed": False, "read": False}  # no MCP route
            assert response.headers["Server"] == "keyproxy"
        async with http.get(f"{stack.admin}/metrics") as response:
            assert response.status == 200
            assert "keyproxy_key_ready" in await response.text()


def _server(headers: bytes) -> list[bytes]:
    return [line for line in headers.split(b"\r\n") if line.lower().startswith(b"server:")]


def _answer(raw: bytes) -> tuple[bytes, bytes, bytes]:
    """A raw answer read to its end: its final status line, header block and body."""
    head, _, body = raw.removeprefix(b"HTTP/1.1 100 Continue\r\n\r\n").partition(b"\r\n\r\n")
    status, _, headers = head.partition(b"\r\n")
    return status, headers, body


async def test_the_router_and_the_direct_path_answer_alike(
    openbao: OpenBaoDevServer, stack: Stack, server_key: str
) -> None:
    """A path under /r/ goes to the proxy without aiohttp's router, except a request with
    `Expect`, which the router answers with 100 Continue first: both ways give the same
    answer, for a request served, refused by policy, unauthenticated or for no route."""
    token = openbao.agent_token(openbao.add_agent("listen-direct-agent"))
    port = _port(stack.base)
    requests = {
        "served": b"GET /r/r/echo HTTP/1.1\r\nAuthorization: Bearer " + token.encode() + b"\r\n",
        "policy": b"POST /r/r/x HTTP/1.1\r\nAuthorization: Bearer " + token.encode() + b"\r\n",
        "no token": b"GET /r/r/x HTTP/1.1\r\n",
        "no route": b"GET /r/nope/x HTTP/1.1\r\nAuthorization: Bearer " + token.encode() + b"\r\n",
    }
    expected = {"served": b"200", "policy": b"403", "no token": b"401", "no route": b"404"}
    for name, request in requests.items():
        end = b"Host: a\r\nContent-Length: 0\r\nConnection: close\r\n"
        direct = await _exchange(port, request + end + b"\r\n")
        routed = await _exchange(port, request + end + b"Expect: 100-continue\r\n\r\n")
        assert routed.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), name
        assert not direct.startswith(b"HTTP/1.1 100 "), name
        direct_status, direct_headers, direct_body = _answer(direct)
        routed_status, routed_headers, routed_body = _answer(routed)
        assert direct_status.split(b" ")[1] == expected[name], (name, direct_status)
        assert routed_status == direct_status, name
        if name == "served":  # the upstream echoes the path it got, and names its Server
            assert json.loads(direct_body)["path"] == json.loads(routed_body)["path"] == "/echo"
            assert b"\r\nServer: Python/" in direct_headers, name  # the upstream's own
            assert _server(direct_headers) == _server(routed_headers), name
        else:
            assert json.loads(direct_body)["error"] == json.loads(routed_body)["error"], name
            assert b"\r\nServer: keyproxy" in b"\r\n" + direct_headers, name
        assert (b"\r\n" + direct_headers).count(b"\r\nServer: ") == 1, name
        assert (b"\r\n" + routed_headers).count(b"\r\nServer: ") == 1, name


async def test_serve_logs_only_json_reloads_on_sighup_and_drains_on_sigterm(
    openbao: OpenBaoDevServer, upstream: Upstream, server_key: str, tmp_path: Path, log_dir: Path
) -> None:
    """`keyproxy serve`: malformed requests leave nothing on stderr and only JSON on stdout,
    without the credential; SIGHUP reloads (an unchanged file: nothing to do); SIGTERM logs
    the requests in flight, lets a stream finish, and logs when it is done."""
    agent = openbao.add_agent("server-agent")
    token = openbao.agent_token(agent)
    CANARIES.add(token)
    path = tmp_path / "keyproxy.yaml"
    path.write_text(yaml.safe_dump(_config(openbao, upstream.url)), encoding="utf-8")
    port = free_port()
    out, err = log_dir / "server-serve.out", log_dir / "server-serve.err"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    args = ("serve", "-c", str(path), "--port", str(port), "--admin-port", "0")
    base = f"http://127.0.0.1:{port}"
    with started(
        *args, "--shutdown-timeout", "20", out=out, err=err, env={**env, "PYTHONUNBUFFERED": "1"}
    ) as proc:
        async with aiohttp.ClientSession() as http:
            await ready(http, base, proc)
            for data in MALFORMED.values():
                answer = await _exchange(port, data.replace(b"{t}", token.encode()))
                assert answer.startswith((b"HTTP/1.1 400 ", b"HTTP/1.0 400 "))
            proc.send_signal(signal.SIGHUP)
            # Done before SIGTERM, which abandons a reload under way.
            await eventually(
                lambda: "config.reload_unchanged" in out.read_text(), "SIGHUP reloaded nothing"
            )
            async with http.get(f"{base}/r/r/echo", headers=bearer(token)) as response:
                assert response.status == 200
            async with http.get(f"{base}/r/r/trickle/stream", headers=bearer(token)) as stream:
                assert stream.status == 200
                first = await stream.content.readline()
                proc.send_signal(signal.SIGTERM)
                rest = await stream.read()
            assert (first + rest).count(b"data: part") == 5
        assert proc.wait(timeout=30) == 0
    assert err.read_bytes() == b""
    lines = out.read_text().splitlines()
    events = [json.loads(line) for line in lines]  # every line of stdout is a JSON event
    assert token not in out.read_text()
    assert sum(e["event"] == "request.malformed" for e in events) == len(MALFORMED)
    names = [e["event"] for e in events]
    assert "config.reload_unchanged" in names
    draining = next(e for e in events if e["event"] == "draining")
    assert draining["in_flight"] >= 1
    assert names.index("stopped") > names.index("draining")


async def test_sigterm_during_a_reload_stops_without_waiting_for_it(
    openbao: OpenBaoDevServer, upstream: Upstream, server_key: str, tmp_path: Path, log_dir: Path
) -> None:
    """SIGTERM while a SIGHUP reload waits on a new issuer that never answers stops the
    server at once: the reload is abandoned (nothing of it applied), not waited for until
    the issuer's fetch times out."""
    asked: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        asked.append(writer)  # read, never answered; closed when the test ends
        await reader.read(1)

    issuer = await asyncio.start_server(silent, "127.0.0.1", 0)
    silent_port = issuer.sockets[0].getsockname()[1]
    cfg = _config(openbao, upstream.url)
    path = tmp_path / "keyproxy.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    port, out = free_port(), log_dir / "server-reload-sigterm.out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    args = ("serve", "-c", str(path), "--port", str(port), "--admin-port", "0", "--no-watch")
    try:
        with started(*args, out=out, env={**env, "PYTHONUNBUFFERED": "1"}) as proc:
            async with aiohttp.ClientSession() as http:
                await ready(http, f"http://127.0.0.1:{port}", proc)
            cfg["identity"]["issuers"].append(_silent_issuer(silent_port))
            path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
            proc.send_signal(signal.SIGHUP)
            await eventually(lambda: asked, "the reload never asked the new issuer", within=30)
            proc.send_signal(signal.SIGTERM)
            # The issuer's fetch gives up after 10 s; the stop does not wait for it.
            assert await asyncio.to_thread(proc.wait, 5) == 0
    finally:
        for writer in asked:
            writer.close()
        issuer.close()
        await issuer.wait_closed()
    names = [e["event"] for e in read_events(out)]
    assert "stopped" in names
    assert "config.reloaded" not in names


async def test_a_reload_abandoned_by_the_stop_is_cancelled_not_left_running(
    openbao: OpenBaoDevServer, upstream: Upstream, server_key: str, tmp_path: Path
) -> None:
    """The signal loop, stopped while a SIGHUP reload waits on a new issuer, returns with that
    reload ended (its fetch cancelled), so nothing of it can apply while the server drains:
    the reload is shared by every trigger, and abandoning only the loop's wait for it would
    leave it running until the issuer's fetch gives up (10 s)."""
    asked: list[asyncio.StreamWriter] = []
    ended = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        asked.append(writer)  # read, never answered
        await reader.read()  # until the reload's fetch closes its end
        ended.set()

    issuer = await asyncio.start_server(silent, "127.0.0.1", 0)
    silent_port = issuer.sockets[0].getsockname()[1]
    cfg = _config(openbao, upstream.url)
    path = tmp_path / "keyproxy.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    app = build_app(config.load(path), source=path)
    runner, _ = await listen.start(app, "127.0.0.1", 0, listen.Limits.of(config.load(path).server))
    try:
        cfg["identity"]["issuers"].append(_silent_issuer(silent_port))
        path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        stop, hangups = asyncio.Event(), asyncio.Event()
        signals = asyncio.ensure_future(listen._until_stopped(stop, hangups, app))
        hangups.set()
        await eventually(lambda: asked, "the reload never asked the new issuer", within=30)
        stop.set()
        await asyncio.wait_for(signals, 5)
        # Well within the fetch's own 10 s: only a cancelled reload closes it this soon.
        await asyncio.wait_for(ended.wait(), 5)
        assert [i.name for i in app[RELOADER].current.config.identity] == ["openbao"]
    finally:
        for writer in asked:
            writer.close()
        issuer.close()
        await issuer.wait_closed()
        await runner.cleanup()


def _silent_issuer(port: int) -> dict[str, Any]:
    """An issuer whose discovery document, on 127.0.0.1:`port`, never answers."""
    return {
        "name": "silent",
        "issuer": "https://silent.example.com",
        "discovery_url": f"http://127.0.0.1:{port}/.well-known/openid-configuration",
        "audiences": ["keyproxy"],
        "algorithms": ["ES256"],
    }
