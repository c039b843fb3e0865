"""`keyproxy serve` (keyproxy.cli.serve) runs the real proxy from a file; `--workers N`: N
processes share the port, one SIGHUP reloads them all, SIGTERM lets streams finish."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from keyproxy.cli import main
from keyproxy.devserver import OpenBaoDevServer
from tests.helpers import cli
from tests.helpers.cli import started
from tests.helpers.configs import api_route_config
from tests.helpers.events import read_events
from tests.helpers.polling import eventually, eventually_blocking
from tests.helpers.servers import GatedStream, free_port, new_key

DEADLINE = 60.0


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
    parent reloads both, and so does POST /reload to the one worker it reaches."""
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
    admin = free_port()
    args = ["serve", "-c", str(path), "--port", str(port), "--admin-port", str(admin)]
    args += ["--workers", "2"]
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

            # POST /reload reaches one worker (the admin port is shared): it has the others
            # reload too, through the parent.
            changed["routes"]["third"] = changed["routes"]["up"]
            path.write_text(yaml.safe_dump(changed))
            async with http.post(f"http://127.0.0.1:{admin}/reload") as response:
                result = await response.json()
            assert (result["result"], result["workers"]) == ("ok", 2), result
            await eventually(
                lambda: set(reloaded().values()),
                "the other worker did not reload",
                within=DEADLINE,
                interval=0.05,
                until={result["hash"]}.__eq__,
            )

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


def test_a_refused_serve_leaves_the_signal_mask_as_it_was(tmp_path: Path) -> None:
    """`serve` blocks SIGHUP until its handler is in place; refused before that (a file
    missing, --workers 0), it puts the mask back, so the children this process starts later
    do not inherit a SIGHUP they cannot receive."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    assert main(["serve", "-c", str(tmp_path / "missing.yaml")]) == 2
    assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == before
    path = tmp_path / "k.yaml"
    path.write_text(yaml.safe_dump(_config_without_vault()))
    assert main(["serve", "-c", str(path), "--workers", "0"]) == 2
    assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == before


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


def test_sighups_while_workers_start_reload_them_and_end_none(
    tmp_path: Path, log_dir: Path
) -> None:
    """SIGHUPs reaching the parent while its workers start (a reload storm, or a POST /reload
    answered by one worker while another starts again) end no worker: each reloads once it
    serves."""
    path = tmp_path / "k.yaml"
    path.write_text(yaml.safe_dump(_config_without_vault()))
    out = log_dir / "workers-sighup.out"
    port, admin = free_port(), free_port()
    args = ["serve", "-c", str(path), "--port", str(port), "--admin-port", str(admin)]
    args += ["--workers", "2", "--no-watch"]
    env = cli.clean_env(tmp_path, BAO_TOKEN="not-a-real-token")
    with started(*args, out=out, env=env) as proc:

        def serving() -> set[int]:
            """The workers serving so far; until both do, one more SIGHUP to the parent,
            once it has started them."""
            assert proc.poll() is None, out.read_text()
            events = read_events(out)
            names = [e.get("event") for e in events]
            if "workers_started" in names:
                proc.send_signal(signal.SIGHUP)
            return {e["worker"] for e in events if e.get("event") == "serving"}

        eventually_blocking(
            serving,
            "the workers did not both serve",
            within=DEADLINE,
            interval=0.02,
            until=lambda found: len(found) == 2,
        )
        proc.send_signal(signal.SIGHUP)
        eventually_blocking(
            lambda: {
                e["worker"] for e in read_events(out) if e.get("event") == "config.reload_unchanged"
            },
            "a worker did not reload",
            within=DEADLINE,
            until=lambda found: len(found) == 2,
        )
        exited = [e for e in read_events(out) if e.get("event") == "worker_exited"]
        assert exited == []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=DEADLINE) == 0


async def test_a_reload_its_caller_stopped_waiting_for_still_reaches_every_worker(
    tmp_path: Path, log_dir: Path
) -> None:
    """POST /reload whose caller gives up while the worker that took it waits on a new
    issuer (a timeout, Ctrl-C) still has every other worker reload: a narrowed policy must
    not hold on one worker only."""
    asked: list[asyncio.StreamWriter] = []
    answer = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        asked.append(writer)  # unanswered until `answer`, then closed: the fetch fails
        await answer.wait()
        writer.close()

    issuer = await asyncio.start_server(silent, "127.0.0.1", 0)
    cfg = _config_without_vault()
    path = tmp_path / "k.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = log_dir / "workers-reload-gone.out"
    port, admin = free_port(), free_port()
    args = ["serve", "-c", str(path), "--port", str(port), "--admin-port", str(admin)]
    args += ["--workers", "2", "--no-watch"]
    env = cli.clean_env(tmp_path, BAO_TOKEN="not-a-real-token")
    try:
        with started(*args, out=out, env=env) as proc:
            await eventually(
                lambda: {e["worker"] for e in read_events(out) if e.get("event") == "serving"},
                "the workers did not both serve",
                within=DEADLINE,
                until=lambda found: len(found) == 2,
            )
            cfg["identity"]["issuers"].append(
                {
                    "name": "silent",
                    "issuer": "https://silent.example.com",
                    "discovery_url": f"http://127.0.0.1:{issuer.sockets[0].getsockname()[1]}/x",
                    "audiences": ["keyproxy"],
                    "algorithms": ["ES256"],
                }
            )
            path.write_text(yaml.safe_dump(cfg))
            async with aiohttp.ClientSession() as http:
                post = asyncio.ensure_future(http.post(f"http://127.0.0.1:{admin}/reload"))
                await eventually(lambda: asked, "the reload never asked the new issuer")
                post.cancel()  # the caller stops waiting
                with contextlib.suppress(asyncio.CancelledError):
                    await post
            answer.set()
            await eventually(
                lambda: {
                    e["worker"] for e in read_events(out) if e.get("event") == "config.reloaded"
                },
                "a worker did not reload",
                within=DEADLINE,
                until=lambda found: len(found) == 2,
            )
            assert proc.poll() is None
    finally:
        for writer in asked:
            writer.close()
        issuer.close()
        await issuer.wait_closed()


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
