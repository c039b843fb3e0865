"""Real TLS handshakes on loopback: SVID callers over mTLS, and certificates reloaded in place."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from keyproxy.errors import Unauthenticated
from keyproxy.spiffe import thumbprint
from keyproxy.tls import ClientAuth, ServerTLS, TLSFiles, peer_certificate, peer_chain
from tests.helpers.polling import eventually
from tests.helpers.svid_ca import Issued, SvidCA

TLS_KEY = web.AppKey("tls", ServerTLS)


async def _whoami(request: web.Request) -> web.Response:
    """Answer with the caller's SPIFFE ID and thumbprint, or 401 and the refusal's reason."""
    tls = request.app[TLS_KEY]
    try:
        svid = tls.verifier.verify(peer_chain(request.transport), dt.datetime.now(dt.UTC))
    except Unauthenticated as exc:
        return web.json_response({"reason": exc.reason}, status=401)
    leaf = peer_certificate(request.transport)
    assert leaf is not None
    return web.json_response(
        {"subject": svid.subject, "issuer": svid.issuer, "x5t#S256": thumbprint(leaf)}
    )


@dataclass
class Listener:
    url: str
    tls: ServerTLS
    server_ca: SvidCA


@asynccontextmanager
async def serving(tls: ServerTLS, server_ca: SvidCA) -> AsyncIterator[Listener]:
    """A tiny aiohttp app on 127.0.0.1 behind the TLS context."""
    app = web.Application()
    app[TLS_KEY] = tls
    app.router.add_get("/whoami", _whoami)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    site = web.SockSite(runner, sock, ssl_context=tls.context)
    await site.start()
    try:
        yield Listener(f"https://127.0.0.1:{sock.getsockname()[1]}", tls, server_ca)
    finally:
        await runner.cleanup()


def client_context(server_ca: SvidCA, client: Issued | None, tmp_path: Path) -> ssl.SSLContext:
    """A client context trusting the server's CA, presenting `client`'s chain if given."""
    context = ssl.create_default_context(cadata=server_ca.bundle_pem().decode())
    if client is not None:
        cert, key = client.write(tmp_path, f"client-{id(client)}")
        context.load_cert_chain(cert, key)
    return context


async def get(listener: Listener, context: ssl.SSLContext) -> tuple[int, dict[str, str]]:
    timeout = aiohttp.ClientTimeout(total=10)
    connector = aiohttp.TCPConnector(ssl=context, force_close=True)
    async with (
        aiohttp.ClientSession(timeout=timeout, connector=connector) as session,
        session.get(listener.url + "/whoami") as response,
    ):
        return response.status, await response.json()


def _tls_files(
    tmp_path: Path, server_ca: SvidCA, bundles: dict[str, bytes], auth: ClientAuth
) -> TLSFiles:
    cert, key = server_ca.server_cert().write(tmp_path, "server")
    paths = {}
    for trust_domain, data in bundles.items():
        paths[trust_domain] = tmp_path / f"{trust_domain}.bundle"
        paths[trust_domain].write_bytes(data)
    return TLSFiles(cert, key, paths, auth)


@pytest.fixture
def cas() -> dict[str, SvidCA]:
    """The server's CA, two trusted trust domains, and a CA nobody trusts."""
    return {
        "server": SvidCA("server.test"),
        "example": SvidCA("example.org", intermediate=True),
        "partner": SvidCA("partner.org"),
        "stranger": SvidCA("example.org"),
    }


@pytest.fixture
def plain_tls(tmp_path: Path, cas: dict[str, SvidCA]) -> ServerTLS:
    """A listener's TLS from files, without client certificates."""
    return ServerTLS(_tls_files(tmp_path, cas["server"], {}, ClientAuth.NONE))


@asynccontextmanager
async def mtls_listener(
    tmp_path: Path,
    cas: dict[str, SvidCA],
    auth: ClientAuth = ClientAuth.OPTIONAL,
    on_refused: Callable[[tuple[str, str]], None] | None = None,
) -> AsyncIterator[Listener]:
    bundles = {
        "example.org": cas["example"].bundle_json(),
        "partner.org": cas["partner"].bundle_pem(),
    }
    files = _tls_files(tmp_path, cas["server"], bundles, auth)
    report = (lambda reason, message: on_refused((reason, message))) if on_refused else None
    tls = ServerTLS(files, on_refused=report)
    async with serving(tls, cas["server"]) as listener:
        yield listener


async def test_valid_svid_accepted(tmp_path: Path, cas: dict[str, SvidCA]) -> None:
    """A valid SVID (sent with its intermediate) is verified; its ID and thumbprint come through."""
    svid = cas["example"].svid("/ns/agents/sa/summarizer")
    async with mtls_listener(tmp_path, cas) as listener:
        status, body = await get(listener, client_context(cas["server"], svid, tmp_path))
    assert status == 200
    assert body == {
        "subject": "spiffe://example.org/ns/agents/sa/summarizer",
        "issuer": "example.org",
        "x5t#S256": thumbprint(svid.der),
    }


async def test_bad_svids_refused_after_handshake(tmp_path: Path, cas: dict[str, SvidCA]) -> None:
    """Cross-domain, unknown trust domain, two URI SANs, CA leaf, no cert: 401 with own reason."""
    example, partner = cas["example"], cas["partner"]
    cases: dict[str, Issued | None] = {
        # partner.org's CA vouching for an example.org ID: the handshake (union of bundles)
        # passes, the per-trust-domain check does not.
        "svid_untrusted": partner.svid_for("spiffe://example.org/agent"),
        "svid_unknown_trust_domain": partner.svid_for("spiffe://third.org/agent"),
        "svid_uri_san_count": example.svid_for("spiffe://example.org/a", "spiffe://example.org/b"),
        "svid_leaf_is_ca": example.ca_as_leaf(),
        "svid_missing": None,
    }
    async with mtls_listener(tmp_path, cas) as listener:
        for reason, client in cases.items():
            status, body = await get(listener, client_context(cas["server"], client, tmp_path))
            assert (status, body) == (401, {"reason": reason}), reason


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("unknown_ca", "svid_untrusted"),
        ("expired", "svid_expired"),
        ("required", "svid_missing"),
        ("plain_http", "tls_handshake_failed"),
    ],
)
async def test_bad_chains_refused_in_handshake(
    tmp_path: Path, cas: dict[str, SvidCA], case: str, reason: str
) -> None:
    """Unknown CA, expired SVID, none where required, not TLS: handshake fails, reason reported."""
    clients = {
        "unknown_ca": cas["stranger"].svid(),
        "expired": cas["example"].expired_svid(),
        "required": None,
        "plain_http": None,
    }
    auth = ClientAuth.REQUIRED if case == "required" else ClientAuth.OPTIONAL
    refusals: list[tuple[str, str]] = []
    async with mtls_listener(tmp_path, cas, auth, refusals.append) as listener:
        if case == "plain_http":
            url = listener.url.replace("https://", "http://")
            async with aiohttp.ClientSession() as session:
                with pytest.raises(aiohttp.ClientError):
                    await session.get(url + "/whoami", timeout=aiohttp.ClientTimeout(total=10))
        else:
            with pytest.raises(aiohttp.ClientError):
                await get(listener, client_context(cas["server"], clients[case], tmp_path))
        await _until(lambda: len(refusals) >= 1)
    # aiohttp retries an idempotent request once after a disconnect: one reason per attempt.
    assert {r for r, _ in refusals} == {reason}


async def test_required_client_cert_accepts_svid(tmp_path: Path, cas: dict[str, SvidCA]) -> None:
    """With client certificates required, a valid SVID still gets through."""
    svid = cas["example"].svid()
    async with mtls_listener(tmp_path, cas, ClientAuth.REQUIRED) as listener:
        status, _ = await get(listener, client_context(cas["server"], svid, tmp_path))
    assert status == 200


async def test_no_chain_without_tls() -> None:
    """On a plain HTTP connection, or without a transport, there is no peer chain."""
    seen: list[tuple[bytes, ...]] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(peer_chain(request.transport))
        return web.Response()

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    try:
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as response:
                assert response.status == 200
    finally:
        await runner.cleanup()
    assert seen == [()]
    assert peer_chain(None) == ()
    assert peer_certificate(None) is None


def test_context_settings(plain_tls: ServerTLS) -> None:
    """The context's minimum is TLS 1.2, and its TLS 1.2 suites are ECDHE with AEAD only."""
    inner = plain_tls.active_context
    assert inner.minimum_version is ssl.TLSVersion.TLSv1_2
    tls12 = [c for c in inner.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12
    assert all(c["aead"] and c["kea"] == "kx-ecdhe" for c in tls12)


def _server_thumbprint(url: str, trust: SvidCA) -> str:
    """Connect once with a plain blocking socket and read the server's certificate."""
    host, port = url.removeprefix("https://").split(":")
    context = ssl.create_default_context(cadata=trust.bundle_pem().decode())
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=host) as conn,
    ):
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return thumbprint(der)


async def test_server_certificate_reloaded_while_clients_connect(
    tmp_path: Path, cas: dict[str, SvidCA], plain_tls: ServerTLS
) -> None:
    """Replacing the certificate on disk: new handshakes see the new one, no request fails."""
    server_ca, tls = cas["server"], plain_tls
    old = _server_thumbprint_of(tls)
    stop = asyncio.Event()
    seen: list[str] = []
    failures: list[BaseException] = []
    reloads: list[int] = []
    errors: list[Exception] = []

    async def keep_connecting(url: str) -> None:
        while not stop.is_set():
            try:
                seen.append(await asyncio.to_thread(_server_thumbprint, url, server_ca))
            except OSError as exc:  # ssl.SSLError included
                failures.append(exc)

    async with serving(tls, server_ca) as listener, asyncio.TaskGroup() as group:
        group.create_task(tls.follow(errors.append, stop=stop, on_reload=lambda: reloads.append(1)))
        group.create_task(keep_connecting(listener.url))
        await _until(lambda: old in seen)
        replacement = server_ca.server_cert()
        cert, key = replacement.write(tmp_path, "next")
        # Replaced the way most tools do it: a complete new file renamed over the old.
        key.replace(tls.files.key)
        cert.replace(tls.files.certificate)
        new = thumbprint(replacement.der)
        await _until(lambda: new in seen)
        count = len(seen)
        await _until(lambda: len(seen) >= count + 5)
        stop.set()
    assert failures == []
    assert reloads
    # The key is renamed before its certificate: a reload between the two fails and is retried.
    assert all(isinstance(e, ssl.SSLError) for e in errors)
    switch = seen.index(new)
    assert set(seen[:switch]) == {old}
    assert set(seen[switch:]) == {new}


async def test_change_before_follow_starts_is_reloaded(
    tmp_path: Path, cas: dict[str, SvidCA], plain_tls: ServerTLS
) -> None:
    """A certificate replaced after loading but before the watch starts is still picked up."""
    replacement = cas["server"].server_cert()
    cert, key = replacement.write(tmp_path, "next")
    key.replace(plain_tls.files.key)
    cert.replace(plain_tls.files.certificate)
    stop = asyncio.Event()
    reloads: list[int] = []
    errors: list[Exception] = []
    async with asyncio.TaskGroup() as group:
        group.create_task(
            plain_tls.follow(errors.append, stop=stop, on_reload=lambda: reloads.append(1))
        )
        await _until(lambda: bool(reloads))
        stop.set()
    async with serving(plain_tls, cas["server"]) as listener:
        seen = await asyncio.to_thread(_server_thumbprint, listener.url, cas["server"])
    assert seen == thumbprint(replacement.der)
    assert errors == []


async def test_open_connection_keeps_its_certificate(
    tmp_path: Path, cas: dict[str, SvidCA], plain_tls: ServerTLS
) -> None:
    """A connection opened before a reload keeps working, on the certificate it started with."""
    server_ca, tls = cas["server"], plain_tls
    old = _server_thumbprint_of(tls)
    async with serving(tls, server_ca) as listener:
        host, port = listener.url.removeprefix("https://").split(":")
        context = client_context(server_ca, None, tmp_path)
        raw = socket.create_connection((host, int(port)), timeout=5)
        conn = await asyncio.to_thread(context.wrap_socket, raw, server_hostname=host)
        try:
            request = b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n"
            await asyncio.to_thread(conn.sendall, request)
            assert (await asyncio.to_thread(conn.recv, 4096)).startswith(b"HTTP/1.1 401")
            server_ca.server_cert().write(tmp_path, "server")
            tls.reload()
            assert await asyncio.to_thread(_server_thumbprint, listener.url, server_ca) != old
            await asyncio.to_thread(conn.sendall, request)
            assert (await asyncio.to_thread(conn.recv, 4096)).startswith(b"HTTP/1.1 401")
            der = conn.getpeercert(binary_form=True)
            assert der is not None
            assert thumbprint(der) == old
        finally:
            conn.close()


async def test_trust_bundle_reloaded_while_clients_call(
    tmp_path: Path, cas: dict[str, SvidCA]
) -> None:
    """A bundle gaining a second CA on disk: its SVIDs get in, the first CA's never fail."""
    first, second = cas["example"], SvidCA("example.org")
    files = _tls_files(
        tmp_path, cas["server"], {"example.org": first.bundle_pem()}, ClientAuth.OPTIONAL
    )
    tls = ServerTLS(files)
    stop = asyncio.Event()
    statuses: list[int] = []
    failures: list[BaseException] = []
    errors: list[Exception] = []
    old_client = client_context(cas["server"], first.svid(), tmp_path)
    new_client = client_context(cas["server"], second.svid(), tmp_path)

    async def keep_calling(listener: Listener) -> None:
        while not stop.is_set():
            try:
                statuses.append((await get(listener, old_client))[0])
            except aiohttp.ClientError as exc:
                failures.append(exc)

    async with serving(tls, cas["server"]) as listener, asyncio.TaskGroup() as group:
        group.create_task(tls.follow(errors.append, stop=stop))
        group.create_task(keep_calling(listener))
        await _until(lambda: len(statuses) >= 3)
        with pytest.raises(aiohttp.ClientError):
            await get(listener, new_client)
        bundle = files.client_bundles["example.org"]
        staged = bundle.with_name("bundle.next")
        staged.write_bytes(first.bundle_pem() + second.bundle_pem())
        staged.replace(bundle)
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            assert asyncio.get_running_loop().time() < deadline, "new bundle never used"
            try:
                status, body = await get(listener, new_client)
                break
            except aiohttp.ClientError:
                continue
        count = len(statuses)
        await _until(lambda: len(statuses) >= count + 3)
        stop.set()
    assert (status, body["issuer"]) == (200, "example.org")
    assert (failures, errors) == ([], [])
    assert set(statuses) == {200}


def _server_thumbprint_of(tls: ServerTLS) -> str:
    return thumbprint(ssl.PEM_cert_to_DER_cert(tls.files.certificate.read_text()))


async def _until(condition: Callable[[], bool]) -> None:
    """Poll `condition()` until true, failing after 10 seconds."""
    await eventually(condition, "condition not reached")


def test_failed_reload_keeps_running_context(cas: dict[str, SvidCA], plain_tls: ServerTLS) -> None:
    """A key that does not match the new certificate leaves the old context in force."""
    tls = plain_tls
    before = tls.active_context
    tls.files.certificate.write_bytes(cas["server"].server_cert().chain_pem())
    with pytest.raises(ssl.SSLError):
        tls.reload()
    assert tls.active_context is before


def _twice(url: str, context: ssl.SSLContext) -> list[tuple[bool | None, bytes]]:
    """Two connections, the second offering the first one's session: for each, whether it
    was resumed and the answer to GET /whoami."""
    host, port = url.removeprefix("https://").split(":")
    session, seen = None, []
    for _ in range(2):
        with (
            socket.create_connection((host, int(port)), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=host, session=session) as conn,
        ):
            conn.sendall(b"GET /whoami HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := conn.recv(65536):  # the TLS 1.3 ticket, if any, comes before
                answer += chunk
            seen.append((conn.session_reused, answer.split(b"\r\n", 1)[0]))
            session = conn.session
    return seen


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_a_resumed_session_keeps_its_client_certificate(
    tmp_path: Path, cas: dict[str, SvidCA], version: ssl.TLSVersion
) -> None:
    """A resumed TLS session has no verified chain in OpenSSL: the chain its full handshake
    verified stands in, so a caller keeps its certificate identity on a connection that
    resumes a session (TLS 1.2, from the session cache; TLS 1.3 resumes nothing, its
    tickets are off)."""
    svid = cas["example"].svid("/ns/agents/sa/summarizer")
    context = client_context(cas["server"], svid, tmp_path)
    context.minimum_version = context.maximum_version = version
    async with mtls_listener(tmp_path, cas) as listener:
        seen = await asyncio.to_thread(_twice, listener.url, context)
    resumed = version is ssl.TLSVersion.TLSv1_2
    assert seen == [(False, b"HTTP/1.1 200 OK"), (resumed, b"HTTP/1.1 200 OK")]


async def test_a_resumed_session_without_a_client_certificate_has_none(
    tmp_path: Path, cas: dict[str, SvidCA]
) -> None:
    """A client that sent no certificate (a front proxy on an `optional` listener) and resumes
    its TLS 1.2 session has no chain on the resumed connection either: 401 svid_missing
    each time, never a 500."""
    context = client_context(cas["server"], None, tmp_path)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    async with mtls_listener(tmp_path, cas) as listener:
        seen = await asyncio.to_thread(_twice, listener.url, context)
    assert seen == [(False, b"HTTP/1.1 401 Unauthorized"), (True, b"HTTP/1.1 401 Unauthorized")]
