"""keyproxy.server.tlsapp: an app's TLS listener, and the check the admin endpoints make of
their callers' certificates (real handshakes on loopback)."""

from __future__ import annotations

import socket
from pathlib import Path

import aiohttp
from aiohttp import web
from cryptography import x509

from keyproxy import answers
from keyproxy.server.tlsapp import TLS, serve_tls, svid_holders_only
from keyproxy.tls import ClientAuth, ServerTLS, TLSFiles
from tests.helpers.svid_ca import SvidCA
from tests.test_tls import client_context


async def _hello(_: web.Request) -> web.Response:
    return web.json_response({"hello": True})


async def test_only_valid_svids_reach_a_checked_handler(tmp_path: Path) -> None:
    """Behind a listener that requires client certificates, a handler wrapped by
    svid_holders_only answers a valid X.509-SVID of a bundle's trust domain, and refuses
    with the SVID's reason a certificate the handshake let through that is no valid SVID
    (no SPIFFE ID, a CA as leaf); the app holds the listener's TLS (`TLS`)."""
    server_ca, ca = SvidCA("server.test"), SvidCA("example.org")
    cert, key = server_ca.server_cert().write(tmp_path, "server")
    bundle = tmp_path / "example.org.bundle"
    bundle.write_bytes(ca.bundle_pem())
    tls = ServerTLS(TLSFiles(cert, key, {"example.org": bundle}, ClientAuth.REQUIRED))
    app = web.Application()
    serve_tls(app, tls)
    assert app[TLS] is tls
    app.router.add_get("/", answers.answering(svid_holders_only(_hello)))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock, ssl_context=tls.context).start()
    url = f"https://127.0.0.1:{sock.getsockname()[1]}/"
    cases = [
        (ca.svid("/agent"), 200, None),
        (ca.issue([x509.DNSName("agent.example.org")]), 401, "svid_uri_san_count"),
        (ca.ca_as_leaf(), 401, "svid_leaf_is_ca"),
    ]
    try:
        for issued, status, reason in cases:
            connector = aiohttp.TCPConnector(
                ssl=client_context(server_ca, issued, tmp_path), force_close=True
            )
            async with (
                aiohttp.ClientSession(connector=connector) as session,
                session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as response,
            ):
                assert response.status == status, reason
                body = await response.json()
            if reason is not None:
                assert body["error"]["code"] == reason
    finally:
        await runner.cleanup()
