"""keyproxy.cli's own commands: `serve` runs the real proxy from a file (`--workers N`: N
processes share the port; SIGTERM lets streams finish), and `keyproxy check` run as operators
run it: the message on stderr, exit 2, nothing on stdout."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from keyproxy.cli import main
from keyproxy.devserver import OpenBaoDevServer
from tests.helpers import cli
from tests.helpers.cli import keyproxy, started
from tests.helpers.configs import BASE, CONFIG_TEXT, api_route_config, with_setting
from tests.helpers.events import read_events
from tests.helpers.polling import eventually, eventually_blocking
from tests.helpers.servers import free_port, new_key, serve

DEADLINE = 60.0


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
async def gated() -> AsyncIterator[GatedStream]:
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


async def _until_refused(port: int) -> None:
    """Poll until nothing accepts connections on `port` any more (every listener closed)."""

    async def refused() -> bool:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return True
        writer.close()
        await writer.wait_closed()
        return False

    await eventually(refused, "the port still accepts connections", within=DEADLINE, interval=0.05)


async def test_two_workers_serve_and_stop_gracefully(
    openbao: OpenBaoDevServer, gated: GatedStream, tmp_path: Path, log_dir: Path
) -> None:
    """--workers 2 serves from two processes on one port; on SIGTERM the parent stops both,
    which close the port but finish a stream in flight before exiting 0; one SIGHUP to the
    parent reloads both."""
    agent = openbao.add_agent("workers-agent")
    openbao.put_key("keyproxy/keys/workers-test", new_key())
    token = openbao.agent_token(agent)
    path = tmp_path / "k.yaml"
    path.write_text(yaml.safe_dump(_config(openbao, agent.entity_id, gated.port)))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    out = log_dir / "workers.out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    # --no-watch: only the SIGHUP below may reload.
    args = ["serve", "-c", str(path), "--port", str(port), "--admin-port", "0", "--workers", "2"]
    args.append("--no-watch")
    fresh = aiohttp.TCPConnector(force_close=True)  # a new connection, so any worker may take it
    with cli.started(*args, out=out, env=env) as proc:
        async with aiohttp.ClientSession(connector=fresh) as http:
            await cli.ready(http, base, proc, within=DEADLINE)
            # Requests without a credential are answered 401 and audited by the worker that
            # took the connection: keep asking until both workers have answered.
            workers: set[int] = set()
            for _ in range(500):
                async with http.get(f"{base}/r/up/stream") as response:
                    assert response.status == 401
                events = read_events(out)
                workers = {e["worker"] for e in events if e.get("event") == "request"}
                if len(workers) == 2:
                    break
            (started,) = [
                e["pids"] for e in read_events(out) if e.get("event") == "workers_started"
            ]
            assert workers == set(started)
            assert proc.pid not in workers

            # One SIGHUP to the parent reloads both workers (the file watch is off: only the
            # signal can have done it), and the same workers keep serving.
            changed = _config(openbao, agent.entity_id, gated.port)
            changed["routes"]["added"] = changed["routes"]["up"]
            path.write_text(yaml.safe_dump(changed))
            proc.send_signal(signal.SIGHUP)

            def reloaded() -> dict[int, str]:
                events = [e for e in read_events(out) if e.get("event") == "config.reloaded"]
                return {e["worker"]: e["hash"] for e in events}

            by_worker = await eventually(
                reloaded,
                "both workers did not reload",
                within=DEADLINE,
                interval=0.05,
                until=lambda found: len(found) == 2,
            )
            assert set(by_worker) == set(started)
            (new_hash,) = set(by_worker.values())
            answered: set[int] = set()
            for _ in range(500):
                async with http.get(f"{base}/r/added/stream") as response:
                    assert response.status == 401  # a route both workers know now
                answered = {
                    e["worker"]
                    for e in read_events(out)
                    if e.get("event") == "request" and e.get("config") == new_hash
                }
                if len(answered) == 2:
                    break
            assert answered == set(started)
            assert proc.poll() is None
            assert all(_alive(pid) for pid in started)

            auth = {"Authorization": f"Bearer {token}"}
            async with http.get(f"{base}/r/up/stream", headers=auth) as stream:
                assert stream.status == 200
                first = await stream.content.readuntil(b"\n\n")
                proc.send_signal(signal.SIGTERM)
                await _until_refused(port)
                gated.gate.set()
                rest = await stream.content.read()
            assert first + rest == b"data: first\n\ndata: second\n\n"
        assert await asyncio.to_thread(proc.wait, DEADLINE) == 0
    for pid in started:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    stopped = [e for e in read_events(out) if e.get("event") == "workers_stopping"]
    assert len(stopped) == 1
    assert token not in out.read_text(encoding="utf-8")


def test_workers_need_a_fixed_port(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--workers 2 with port 0 is refused before anything starts: each worker would bind its own."""

    cfg = _config_without_vault()
    path = tmp_path / "k.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["serve", "-c", str(path), "--port", "0", "--workers", "2"]) == 2
    assert "fixed --port" in capsys.readouterr().err


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


def test_serve_runs_from_a_file_and_stops_on_sigterm(
    openbao: OpenBaoDevServer, tmp_path: Path, log_dir: Path
) -> None:
    """`keyproxy serve` logs in with BAO_TOKEN, loads the key, turns ready, logs JSON to
    stdout, and exits cleanly on SIGTERM."""
    setup = openbao.dev_setup
    openbao.put_key("keyproxy/keys/cli-test", "sk-cli-test-" + os.urandom(8).hex())
    path = tmp_path / "k.yaml"
    path.write_text(yaml.safe_dump(api_route_config(openbao.addr, setup.issuer, setup.jwks_uri)))
    port, admin_port = free_port(), free_port()
    env = {**os.environ, "BAO_TOKEN": openbao.root_token}
    out = log_dir / "serve.out"
    args = ("serve", "-c", str(path), "--port", str(port), "--admin-port", str(admin_port))
    with started(*args, out=out, env=env) as proc:

        def readiness() -> dict[str, Any]:
            try:
                admin = f"http://127.0.0.1:{admin_port}/readyz"  # the detailed readiness
                with urllib.request.urlopen(admin, timeout=5) as r:
                    body: dict[str, Any] = json.load(r)
                    return body
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, out.read_text()
                return {}

        body = eventually_blocking(readiness, "not ready", within=30)
        assert body["keys"]["api"]["version"] >= 1
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0
    events = [json.loads(line) for line in out.read_text().splitlines() if line.startswith("{")]
    assert any(e["event"] == "started" for e in events)


GOOD = CONFIG_TEXT


ANOTHER_OPENAI = """\
  openai:
    upstream: https://collector.example
    secret: {path: keyproxy/keys/openai}
    inject: [{header: Authorization, format: "Bearer {key}"}]
policies:"""


def _check(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "keyproxy.yaml"
    path.write_text(text)
    return keyproxy("check", "-c", str(path), env=None)


def test_a_good_file_is_ok(tmp_path: Path) -> None:
    """The file the mistakes below are made in passes: exit 0, the summary on stdout."""
    done = _check(tmp_path, GOOD)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.endswith(": ok (1 routes, 1 policies, 1 issuers)\n")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            GOOD.replace("policies:", ANOTHER_OPENAI),
            "routes.openai: duplicate key (first at line 11, again at line 15)",
            id="duplicate-route",
        ),
        pytest.param(
            GOOD.replace("    secret:", "\tsecret:"),
            "not valid YAML at line 13, column 1: while scanning for the next token, found "
            "character '\\t' that cannot start any token; indent with spaces, YAML does not "
            "allow tabs there",
            id="tab",
        ),
        pytest.param(
            GOOD.replace("      openai: {", "      opnai: {"),
            "policies[0] (summarizer).allow.opnai: unknown route 'opnai', did you mean openai?",
            id="policy-route-typo",
        ),
        pytest.param("# to do\n", "the configuration is empty", id="empty"),
    ],
)
def test_a_mistake_is_printed_and_exits_2(tmp_path: Path, text: str, message: str) -> None:
    """`keyproxy check` prints the whole message on stderr, nothing on stdout, and exits 2."""
    done = _check(tmp_path, text)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith(f"keyproxy: configuration error: {message}")
    assert done.stderr.count("\n") == 1  # one line, no traceback


@pytest.mark.parametrize(
    ("upstream", "message"),
    [
        ("http://0177.0.0.1", "routes.openai.upstream: 0177.0.0.1 is not a dotted-decimal IPv4"),
        ("http://127.1:8080", "routes.openai.upstream: 127.1 is not a dotted-decimal IPv4"),
        ("http://169.254.169.254", "routes.openai.upstream: 169.254.169.254 is not a global"),
        ("http://[::1]:8080", "routes.openai.upstream: [::1] is not a global address (loopback)"),
    ],
)
def test_an_upstream_the_fence_refuses_fails_the_check(
    tmp_path: Path, upstream: str, message: str
) -> None:
    """`keyproxy check` refuses an IP-literal upstream every request would be refused for."""
    text = GOOD.replace("https://api.openai.com", f"{upstream}\n    allow_http: true")
    done = _check(tmp_path, text)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith(f"keyproxy: configuration error: {message}")


def test_a_missing_credential_file_is_a_warning(tmp_path: Path) -> None:
    """`keyproxy check` warns about a credential file it cannot find, and still exits 0."""
    auth = f"  auth: {{method: approle, role_id_file: {tmp_path}/r, secret_id_file: {tmp_path}/s}}"
    text = GOOD.replace("  addr: http://127.0.0.1:8200", "  addr: http://127.0.0.1:8200\n" + auth)
    (tmp_path / "s").write_text("s")
    done = _check(tmp_path, text)
    assert done.returncode == 0
    assert done.stderr == (
        f"keyproxy: warning: vault.auth.role_id_file: {tmp_path}/r: No such file or directory"
        ": serve here could not log in\n"
    )


def test_check_command_exits_2_with_the_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`keyproxy check` prints the YAML path of the mistake and exits 2; a good file exits 0."""
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(BASE))
    assert main(["check", "-c", str(good)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(with_setting("routes.openai.inject.0.header", "Bad Header")))
    assert main(["check", "-c", str(bad)]) == 2
    assert "routes.openai.inject[0].header: " in capsys.readouterr().err
    assert main(["check", "-c", str(tmp_path / "missing.yaml")]) == 2
