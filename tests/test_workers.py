"""`keyproxy serve --workers N`: N processes share the port; SIGTERM lets streams finish."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from keyproxy.devserver import OpenBaoDevServer
from tests.support import new_key, serve

BIN = Path(sys.executable).parent
DEADLINE = 60.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class GatedStream:
    """An upstream whose /stream sends one event, then the second only once `gate` is set."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/stream", self._stream)
        return app

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        await self.gate.wait()
        await response.write(b"data: second\n\n")
        await response.write_eof()
        return response


@pytest.fixture
async def upstream() -> AsyncIterator[GatedStream]:
    """The gated streaming upstream on 127.0.0.1."""
    gated = GatedStream()
    runner, gated.port = await serve(gated.app())
    try:
        yield gated
    finally:
        gated.gate.set()
        await runner.cleanup()


def _config(bao: OpenBaoDevServer, subject: str, upstream: int) -> dict[str, Any]:
    setup = bao.dev_setup
    return {
        "vault": {
            "addr": bao.addr,
            "auth": {
                "method": "approle",
                "role_id_file": str(setup.role_id_file),
                "secret_id_file": str(setup.secret_id_file),
            },
        },
        "identity": {
            "issuers": [
                {
                    "name": "openbao",
                    "issuer": setup.issuer,
                    "jwks_uri": setup.jwks_uri,
                    "audiences": [setup.audience],
                    "algorithms": ["RS256"],
                }
            ]
        },
        "routes": {
            "up": {
                "upstream": f"http://127.0.0.1:{upstream}",
                "secret": {"path": "keyproxy/keys/workers-test", "field": "api_key"},
                "inject": [{"header": "Authorization", "format": "Bearer {key}"}],
                "egress": {"allow_cidrs": ["127.0.0.0/8"]},
                "allow_http": True,
            }
        },
        "policies": [
            {
                "name": "agent",
                "issuers": ["openbao"],
                "subjects": [subject],
                "allow": {"up": {"methods": ["GET"], "paths": ["/stream"]}},
            }
        ],
    }


def _events(path: Path) -> list[dict[str, Any]]:
    # Whole lines only: the last one may be in the middle of being written.
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]
    return [json.loads(line) for line in lines if line.startswith("{")]


async def _until_ready(
    http: aiohttp.ClientSession, base: str, proc: subprocess.Popen[bytes]
) -> None:
    deadline = time.monotonic() + DEADLINE
    while True:
        assert proc.poll() is None, "keyproxy exited before it was ready"
        try:
            async with http.get(f"{base}/readyz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        assert time.monotonic() < deadline, "not ready in time"
        await asyncio.sleep(0.1)  # polling interval, bounded by the deadline


async def _until_refused(port: int) -> None:
    """Poll until nothing accepts connections on `port` any more (every listener closed)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return
        writer.close()
        await writer.wait_closed()
        assert time.monotonic() < deadline, "the port still accepts connections"
        await asyncio.sleep(0.05)  # polling interval, bounded by the deadline


async def test_two_workers_serve_and_stop_gracefully(
    openbao: OpenBaoDevServer, upstream: GatedStream, tmp_path: Path, log_dir: Path
) -> None:
    """--workers 2 serves from two processes on one port; on SIGTERM the parent stops both,
    which close the port but finish a stream in flight before exiting 0."""
    agent = openbao.add_agent("workers-agent")
    openbao.put_key("keyproxy/keys/workers-test", new_key())
    token = openbao.agent_token(agent)
    path = tmp_path / "k.yaml"
    path.write_text(yaml.safe_dump(_config(openbao, agent.entity_id, upstream.port)))
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    out = log_dir / "workers.out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    argv = [
        str(BIN / "keyproxy"),
        "serve",
        "-c",
        str(path),
        "--port",
        str(port),
        "--admin-port",
        "0",
    ]
    with out.open("wb") as stdout:
        proc = subprocess.Popen(  # noqa: ASYNC220  # returns at once; the test polls it
            [*argv, "--workers", "2"],
            stdout=stdout,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    fresh = aiohttp.TCPConnector(force_close=True)  # a new connection, so any worker may take it
    try:
        async with aiohttp.ClientSession(connector=fresh) as http:
            await _until_ready(http, base, proc)
            # Requests without a credential are answered 401 and audited by the worker that
            # took the connection: keep asking until both workers have answered.
            workers: set[int] = set()
            for _ in range(500):
                async with http.get(f"{base}/r/up/stream") as response:
                    assert response.status == 401
                events = _events(out)
                workers = {e["worker"] for e in events if e.get("event") == "request"}
                if len(workers) == 2:
                    break
            (started,) = [e["pids"] for e in _events(out) if e.get("event") == "workers_started"]
            assert workers == set(started)
            assert proc.pid not in workers

            # SIGHUP to the parent is logged and ignored: the same workers keep serving.
            proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + DEADLINE
            while not any(e.get("event") == "sighup_ignored" for e in _events(out)):
                assert time.monotonic() < deadline, "SIGHUP was not logged"
                await asyncio.sleep(0.05)  # polling the log of a bounded wait
            async with http.get(f"{base}/r/up/stream") as response:
                assert response.status == 401
            assert proc.poll() is None
            assert all(_alive(pid) for pid in started)

            auth = {"Authorization": f"Bearer {token}"}
            async with http.get(f"{base}/r/up/stream", headers=auth) as stream:
                assert stream.status == 200
                first = await stream.content.readuntil(b"\n\n")
                proc.send_signal(signal.SIGTERM)
                await _until_refused(port)
                upstream.gate.set()
                rest = await stream.content.read()
            assert first + rest == b"data: first\n\ndata: second\n\n"
        assert await asyncio.to_thread(proc.wait, DEADLINE) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=DEADLINE)
    for pid in started:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    stopped = [e for e in _events(out) if e.get("event") == "workers_stopping"]
    assert len(stopped) == 1
    assert token not in out.read_text(encoding="utf-8")


def test_workers_need_a_fixed_port(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--workers 2 with port 0 is refused before anything starts: each worker would bind its own."""
    from keyproxy.cli import main  # noqa: PLC0415  # imported where used, like the CLI does

    cfg = _config_without_vault()
    path = tmp_path / "k.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["serve", "-c", str(path), "--port", "0", "--workers", "2"]) == 2
    assert "fixed --port" in capsys.readouterr().err


def test_workers_with_limits_need_a_shared_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--workers 2 with a rate limit and no state.url is refused before anything starts: each
    worker would count in its own memory (invariant 10)."""
    from keyproxy.cli import main  # noqa: PLC0415  # imported where used, like the CLI does

    cfg = _config_without_vault()
    cfg["routes"]["api"]["limits"] = {"rate": [{"per": "route", "requests": 5, "window": "1s"}]}
    path = tmp_path / "k.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["serve", "-c", str(path), "--port", "1", "--workers", "2"]) == 2
    assert "needs a shared state store: set state.url" in capsys.readouterr().err


def _config_without_vault() -> dict[str, Any]:
    return {
        "vault": {"addr": "http://127.0.0.1:1", "auth": {"method": "token"}},
        "identity": {
            "issuers": [
                {
                    "name": "ci",
                    "issuer": "https://ci",
                    "jwks_uri": "https://ci/jwks",
                    "audiences": ["keyproxy"],
                    "algorithms": ["RS256"],
                }
            ]
        },
        "routes": {
            "api": {
                "upstream": "https://api.example.com",
                "secret": {"path": "keyproxy/keys/x"},
                "inject": [{"header": "X-Api-Key"}],
            }
        },
        "policies": [],
    }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
