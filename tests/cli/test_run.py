"""`keyproxy run` (keyproxy.cli.run, keyproxy.runner) end to end: the real command wrapping a
real child, against two `keyproxy serve` replicas sharing the session's OpenBao and a demo
upstream process. The wrapper talks to the first replica; after the child ends, however it
ends, the token is refused by both within 2 s."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from keyproxy.devserver import Agent, OpenBaoDevServer
from keyproxy.tokens import is_task_token
from tests.helpers import cli
from tests.helpers.cli import KEYPROXY, serve_replicas, started
from tests.helpers.events import read_events
from tests.helpers.logscan import CANARIES
from tests.helpers.polling import eventually, eventually_blocking
from tests.helpers.servers import (
    Stack,
    Upstream,
    free_port,
    new_key,
    running_proxy,
    token_config,
)
from tests.helpers.tokens import refused, status

UPSTREAM = (
    "import sys; from aiohttp import web; from keyproxy import demo; "
    "web.run_app(demo.build_app(), host='127.0.0.1', port=int(sys.argv[1]), print=None)"
)
SCOPE = "openai:POST:/v1/chat/completions"
CHAT = "/r/openai/v1/chat/completions"
# The child writes its token where the test can read it (not a log: the scan must not see it).
SAVE_TOKEN = (
    "import os, sys, pathlib; pathlib.Path(sys.argv[1]).write_text(os.environ['OPENAI_API_KEY']); "
)
SAVE_TOKEN_R = (
    "import os, sys, pathlib\n"
    "pathlib.Path(sys.argv[1]).write_text(os.environ['KEYPROXY_R_TOKEN'])\n"
)
SDK_CHILD = SAVE_TOKEN + (
    "import json, openai; "
    "pathlib.Path(sys.argv[2]).write_text(json.dumps(dict(os.environ))); "
    "answer = openai.OpenAI().chat.completions.create("
    "model='keyproxy-demo', messages=[{'role': 'user', 'content': 'hi'}]); "
    "print(answer.choices[0].message.content)"
)


@dataclass(frozen=True)
class Replicas:
    bases: tuple[str, str]
    outs: tuple[Path, Path]


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


def _ready(base: str) -> bool:
    with contextlib.suppress(OSError), urllib.request.urlopen(f"{base}/readyz", timeout=2):  # noqa: S310  # loopback
        return True
    return False


@pytest.fixture(scope="module")
def replicas(
    openbao: OpenBaoDevServer, agent: Agent, tmp_path_factory: pytest.TempPathFactory, log_dir: Path
) -> Iterator[Replicas]:
    """A demo upstream process and two `keyproxy serve` replicas in front of it, with a route
    named openai; for the whole module."""
    openbao.put_key("keyproxy/keys/run-test", new_key())
    up = free_port()
    cfg = token_config(openbao, agent, f"http://127.0.0.1:{up}")
    route = cfg["routes"].pop("r")
    route["secret"]["path"] = "keyproxy/keys/run-test"
    cfg["routes"]["openai"] = route
    cfg["policies"][0]["allow"]["openai"] = cfg["policies"][0]["allow"].pop("r")
    path = tmp_path_factory.mktemp("run") / "k.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with contextlib.ExitStack() as stack:
        upstream = subprocess.Popen(  # our own interpreter and script
            [sys.executable, "-c", UPSTREAM, str(up)], stdin=subprocess.DEVNULL
        )
        stack.callback(upstream.wait, timeout=10)
        stack.callback(upstream.terminate)
        (a, a_out), (b, b_out) = serve_replicas(stack, path, log_dir, "run")
        bases, outs = [a, b], [a_out, b_out]
        eventually_blocking(lambda: _listening(up), "the demo upstream did not start", within=30)
        for base in bases:
            eventually_blocking(partial(_ready, base), f"{base} not ready", within=60)
        yield Replicas((bases[0], bases[1]), (outs[0], outs[1]))


def _status(base: str, token: str) -> int:
    body = json.dumps({"model": "keyproxy-demo", "messages": [{"role": "user", "content": "x"}]})
    request = urllib.request.Request(  # noqa: S310  # loopback
        base + CHAT,
        data=body.encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:  # noqa: S310  # loopback
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return int(exc.code)


def _env(identity_token: str, home: Path) -> dict[str, str]:
    return cli.clean_env(home, IDENTITY_TOKEN=identity_token)


def _run_args(replicas: Replicas) -> list[str]:
    return ["run", "--proxy", replicas.bases[0], "--identity-env", "IDENTITY_TOKEN"]


def _token(path: Path) -> str:
    token = path.read_text()
    CANARIES.add(token)
    return token


def _refused_everywhere(replicas: Replicas, token: str) -> None:
    """Both replicas answer 401 to `token` within 2 s."""
    eventually_blocking(
        lambda: [_status(base, token) for base in replicas.bases],
        "a replica still accepts the token",
        within=2.0,
        interval=0.05,
        until=lambda codes: codes == [401, 401],
    )


def _revoked(replicas: Replicas, task: str) -> dict[str, Any]:
    """The one token.revoked event of `task` in the first replica's audit log, once written."""

    def found() -> list[dict[str, Any]]:
        events = read_events(replicas.outs[0])
        return [e for e in events if e.get("event") == "token.revoked" and e.get("task") == task]

    (event,) = eventually_blocking(found, f"no token.revoked event for {task}", within=5)
    return event


def _token_id(env_file: Path) -> str:
    return str(json.loads(env_file.read_text())["KEYPROXY_TOKEN_ID"])


def test_the_sdk_works_from_the_environment_given_and_the_token_dies_after(
    replicas: Replicas, identity_token: str, tmp_path: Path
) -> None:
    """The child's openai SDK completes a call with only the environment `keyproxy run` gave
    it (no identity in it, no Vault or OpenBao token); after the child exits 0, both replicas
    refuse its token within 2 s and the audit records the holder's revocation with the
    reason completed."""
    saved, env_file = tmp_path / "token", tmp_path / "env.json"
    args = [*_run_args(replicas), "--scope", SCOPE, "--task", "run-sdk", "--ttl", "2m", "--"]
    done = cli.keyproxy(
        *args,
        sys.executable,
        "-c",
        SDK_CHILD,
        str(saved),
        str(env_file),
        env=_env(identity_token, tmp_path) | {"VAULT_TOKEN": "v-root", "BAO_TOKEN": "b-root"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), "the child printed no answer"
    token = _token(saved)
    env = json.loads(env_file.read_text())
    assert env["OPENAI_BASE_URL"] == f"{replicas.bases[0]}/r/openai/v1"
    assert "IDENTITY_TOKEN" not in env
    assert identity_token not in env.values()
    assert not {"VAULT_TOKEN", "BAO_TOKEN"} & set(env)
    assert token not in done.stdout + done.stderr
    _refused_everywhere(replicas, token)
    event = _revoked(replicas, "run-sdk")
    assert event["token_id"] == env["KEYPROXY_TOKEN_ID"]
    assert event["by"] == "holder"
    assert event["task"] == "run-sdk"
    assert event["reason"] == "completed"


def test_a_route_not_granted_keeps_no_inherited_key(
    replicas: Replicas, identity_token: str, tmp_path: Path
) -> None:
    """Asked for openai and another route, granted only the other: the command's environment
    has no OPENAI_API_KEY or OPENAI_BASE_URL, not even those of the wrapper's (a real key, a
    base URL around keyproxy), so its openai SDK cannot call the provider directly."""
    env_file = tmp_path / "env.json"
    dump = "import json, os, sys; open(sys.argv[1], 'w').write(json.dumps({**os.environ}))"
    args = [*_run_args(replicas), "--scope", "openai:DELETE:/nothing", "--scope", "other"]
    env = _env(identity_token, tmp_path) | {
        "OPENAI_API_KEY": "sk-real-key-of-the-shell",
        "OPENAI_BASE_URL": "https://api.openai.com/v1",
    }
    done = cli.keyproxy(*args, "--", sys.executable, "-c", dump, str(env_file), env=env)
    assert done.returncode == 0, done.stderr
    assert "granted nothing on openai" in done.stderr
    child = json.loads(env_file.read_text())
    CANARIES.add(child["KEYPROXY_TASK_TOKEN"])
    assert "KEYPROXY_OTHER_TOKEN" in child
    left = sorted({"OPENAI_API_KEY", "OPENAI_BASE_URL"} & set(child))
    assert left == [], f"the command inherited {left}"


def test_an_inherited_http_proxy_never_carries_the_token(
    replicas: Replicas, identity_token: str, tmp_path: Path
) -> None:
    """HTTP_PROXY, HTTPS_PROXY and ALL_PROXY in the environment name another host (an egress
    proxy): the wrapper ignores them, and so does the command's openai SDK for keyproxy's
    host, so its call gets through and that other host receives nothing (no task token in
    clear text)."""
    child = (
        "import openai; client = openai.OpenAI(max_retries=0, timeout=5); print(client.chat."
        "completions.create(model='keyproxy-demo', messages=[{'role': 'user', 'content': 'hi'}])"
        ".choices[0].message.content)"
    )
    args = [*_run_args(replicas), "--scope", SCOPE, "--task", "run-egress", "--"]
    with socket.create_server(("127.0.0.1", 0)) as egress:
        url = f"http://127.0.0.1:{egress.getsockname()[1]}"
        env = _env(identity_token, tmp_path)
        env |= dict.fromkeys(("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy"), url)
        done = cli.keyproxy(*args, sys.executable, "-c", child, env=env)
        egress.settimeout(0.2)  # a connection made is queued already: accept() takes it at once
        sent = b""
        with contextlib.suppress(TimeoutError):
            connection, _ = egress.accept()
            with connection:
                connection.settimeout(2)
                sent = connection.recv(65536)
    leaked = b"authorization: bearer" in sent.lower()  # never shown: it holds the token
    assert not leaked, "the task token went to the egress proxy"
    assert not sent, "the command's request went to the egress proxy"
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


# Reads its parent's (the wrapper's) starting environment, as any process of its user could,
# without the capabilities root has (setpriv drops them all).
PEEK = (
    "import os, pathlib, sys\n"
    "try:\n"
    "    seen = pathlib.Path(f'/proc/{os.getppid()}/environ').read_bytes().decode('latin-1')\n"
    "except OSError as exc:\n"
    "    seen = f'refused: {exc.strerror}'\n"
    "pathlib.Path(sys.argv[1]).write_text(seen)\n"
)


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux's setpriv")
def test_the_command_cannot_read_the_identity_from_the_wrappers_memory(
    replicas: Replicas, identity_token: str, tmp_path: Path
) -> None:
    """The wrapper's own starting environment still holds the identity variable the command's
    copy lacks, and a process of the same user could read it (/proc/PID/environ, or its
    memory): the wrapper makes itself undumpable first, so the command cannot. Both run
    without capabilities, as any user's processes do (root's would override the check)."""
    seen = tmp_path / "seen"
    drop = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--"]
    args = [*_run_args(replicas), "--scope", SCOPE, "--task", "run-peek", "--ttl", "1m", "--"]
    done = subprocess.run(
        [*drop, str(cli.KEYPROXY), *args, sys.executable, "-c", PEEK, str(seen)],
        env=_env(identity_token, tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    refused = seen.read_text() == "refused: Permission denied"  # never shown: it may hold it
    assert refused, "the command read the wrapper's starting environment"


CHILDREN = {  # what the child does after saving its token; the exit status; the end reason
    "failed": ("sys.exit(3)", 3, "failed"),
    "killed": ("os.kill(os.getpid(), 9)", 128 + 9, "failed"),
    "timeout": ("import time; time.sleep(60)", 128 + 15, "timeout"),
    "stubborn": ("import time; signal.signal(15, signal.SIG_IGN); time.sleep(60)", 137, "timeout"),
}


@pytest.mark.parametrize("case", sorted(CHILDREN))
def test_the_token_dies_however_the_child_ends(
    replicas: Replicas, identity_token: str, tmp_path: Path, case: str
) -> None:
    """A child that exits 3, is killed by SIGKILL, outlives --timeout (SIGTERM), or outlives
    it ignoring SIGTERM (SIGKILL --kill-after later): the wrapper exits with its status
    (128+signal), both replicas refuse the token within 2 s, and the audit names the reason."""
    code, exit_status, reason = CHILDREN[case]
    saved = tmp_path / "token"
    args = [*_run_args(replicas), "--scope", SCOPE, "--task", f"run-{case}"]
    args += ["--timeout", "3s", "--kill-after", "1s"]
    started_at = time.monotonic()
    done = cli.keyproxy(
        *args,
        "--",
        sys.executable,
        "-c",
        SAVE_TOKEN + "import signal; " + code,
        str(saved),
        env=_env(identity_token, tmp_path),
    )
    assert done.returncode == exit_status, done.stderr
    assert time.monotonic() - started_at < 30
    token = _token(saved)
    _refused_everywhere(replicas, token)
    event = _revoked(replicas, f"run-{case}")
    assert event["reason"] == reason


@pytest.mark.parametrize("warned", [False, True], ids=["at-timeout", "before-start"])
def test_a_closed_stderr_never_keeps_the_token_or_the_child_alive(
    replicas: Replicas, identity_token: str, tmp_path: Path, warned: bool
) -> None:
    """The wrapper's stderr is a pipe nobody reads any more (a log shipper that died): its
    line at --timeout, or its warning before the start (a route not granted), cannot be
    written, and still the child is started, stopped at --timeout (143), and its token
    revoked (reason timeout)."""
    saved, pid, task = tmp_path / "token", tmp_path / "pid", f"run-no-stderr-{warned}"
    args = [*_run_args(replicas), "--scope", SCOPE, "--task", task]
    args += ["--scope", "other:DELETE:/x"] if warned else []
    args += ["--timeout", "2s", "--kill-after", "1s", "--"]
    child = SAVE_TOKEN + (
        "import time; pathlib.Path(sys.argv[2]).write_text(str(os.getpid())); time.sleep(60)"
    )
    try:
        argv = [*args, sys.executable, "-c", child, str(saved), str(pid)]
        code = _without_stderr(argv, _env(identity_token, tmp_path))
    finally:
        with contextlib.suppress(ProcessLookupError, ValueError, FileNotFoundError):
            os.kill(int(pid.read_text()), signal.SIGKILL)
    assert code == 128 + signal.SIGTERM
    _refused_everywhere(replicas, _token(saved))
    assert _revoked(replicas, task)["reason"] == "timeout"


def test_a_log_line_that_cannot_be_written_still_revokes_the_token(
    replicas: Replicas, identity_token: str, tmp_path: Path
) -> None:
    """With -v the wrapper logs its exchange (run.exchanged); its stderr a pipe nobody reads,
    that line fails, and still the token it was issued is revoked on the way out."""
    args = [*_run_args(replicas), "--scope", SCOPE, "--task", "run-no-log", "--", "true"]
    _without_stderr(["-v", *args], _env(identity_token, tmp_path))
    assert _revoked(replicas, "run-no-log")["reason"] in {"completed", "failed"}


def _without_stderr(args: list[str], env: dict[str, str]) -> int:
    """`keyproxy` with `args`, its stderr a pipe closed before anything is written to it
    (every write fails): its exit status (it is killed past 30 s)."""
    with subprocess.Popen(  # our own command
        [str(KEYPROXY), *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    ) as proc:
        assert proc.stderr is not None
        proc.stderr.close()
        try:
            return proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()


def test_a_command_that_cannot_start_exits_127(
    replicas: Replicas, identity_token: str, tmp_path: Path
) -> None:
    """A command that is not there: exit 127 with one line saying so, and the token it would
    have had is revoked (reason failed)."""
    args = [*_run_args(replicas), "--scope", SCOPE, "--task", "run-missing"]
    done = cli.keyproxy(*args, "--", "/nonexistent/agent", env=_env(identity_token, tmp_path))
    assert done.returncode == 127
    assert done.stderr == "keyproxy run: /nonexistent/agent: command not found\n"
    event = _revoked(replicas, "run-missing")
    assert event["reason"] == "failed"


def test_a_signal_to_the_wrapper_reaches_the_child_then_the_token_dies(
    replicas: Replicas, identity_token: str, tmp_path: Path, log_dir: Path
) -> None:
    """SIGTERM to `keyproxy run` is passed on to the child (which dies of it: 143), and the
    token is revoked on the way out (reason failed)."""
    saved = tmp_path / "token"
    args = [*_run_args(replicas), "--scope", SCOPE, "--task", "run-sigterm", "--"]
    child = SAVE_TOKEN + "import time; time.sleep(60)"
    run = (*args, sys.executable, "-c", child, str(saved))
    log, env = log_dir / "run-sigterm.log", _env(identity_token, tmp_path)
    with started(*run, out=log, env=env) as proc:
        eventually_blocking(lambda: saved.exists() and saved.read_text(), "no child", within=30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    _refused_everywhere(replicas, _token(saved))
    event = _revoked(replicas, "run-sigterm")
    assert event["reason"] == "failed"


def test_sigint_reaches_the_child_of_a_wrapper_started_without_stdin(
    replicas: Replicas, identity_token: str, tmp_path: Path, log_dir: Path
) -> None:
    """A wrapper started with its stdin closed (`<&-`: Python then has no sys.stdin) and no
    terminal: a SIGINT from another process is passed on to the child (130), and the token is
    revoked (reason failed)."""
    saved = tmp_path / "token"
    args = [*_run_args(replicas), "--scope", SCOPE, "--task", "run-no-stdin", "--"]
    child = SAVE_TOKEN + "import time; time.sleep(60)"
    shell = ["sh", "-c", 'exec "$0" "$@" <&-', str(KEYPROXY)]
    with (log_dir / "run-no-stdin.log").open("wb") as out:
        proc = subprocess.Popen(  # our own command, through sh to start it without stdin
            [*shell, *args, sys.executable, "-c", child, str(saved)],
            stdout=out,
            stderr=out,
            env=_env(identity_token, tmp_path),
            start_new_session=True,  # no terminal: nothing but the wrapper sends the SIGINT
        )
    try:
        eventually_blocking(lambda: saved.exists() and saved.read_text(), "no child", within=30)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 128 + signal.SIGINT
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    _refused_everywhere(replicas, _token(saved))
    assert _revoked(replicas, "run-no-stdin")["reason"] == "failed"


# A slow front for one replica: POST /token is passed on after a pause (the marker file says
# it arrived), everything else at once. The wrapper is stopped while its exchange waits there.
SLOW_FRONT = (
    "import asyncio, pathlib, sys, aiohttp; from aiohttp import web\n"
    "port, target, marker = int(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])\n"
    "async def relay(request):\n"
    "    body = await request.read()\n"
    "    if request.path == '/token':\n"
    "        marker.write_text('asked')\n"
    "        await asyncio.sleep(1.5)\n"
    "    headers = {k: v for k, v in request.headers.items() if k.lower() in "
    "('authorization', 'content-type')}\n"
    "    async with aiohttp.ClientSession() as http, http.request(request.method, "
    "target + request.path_qs, data=body, headers=headers) as answer:\n"
    "        return web.Response(status=answer.status, body=await answer.read(), "
    "content_type=answer.content_type)\n"
    "app = web.Application(); app.router.add_route('*', '/{tail:.*}', relay)\n"
    "web.run_app(app, host='127.0.0.1', port=port, print=None, handler_cancellation=False)\n"
)


def test_a_stop_during_the_exchange_still_revokes_what_it_was_granted(
    replicas: Replicas, identity_token: str, tmp_path: Path, log_dir: Path
) -> None:
    """SIGTERM while the exchange is in flight (the broker may already have signed the
    token): the wrapper waits briefly for the answer and revokes the token it brings (reason
    failed) instead of leaving it alive until its expiry; no child is started."""
    port, marker, ran = free_port(), tmp_path / "asked", tmp_path / "ran"
    front = subprocess.Popen(  # our own interpreter and script
        [sys.executable, "-c", SLOW_FRONT, str(port), replicas.bases[0], str(marker)],
        stdin=subprocess.DEVNULL,
    )
    try:
        eventually_blocking(lambda: _listening(port), "the slow front did not start", within=30)
        args = ["run", "--proxy", f"http://127.0.0.1:{port}", "--identity-env", "IDENTITY_TOKEN"]
        args += ["--scope", SCOPE, "--task", "run-stopped-early", "--"]
        child = "import pathlib, sys; pathlib.Path(sys.argv[1]).write_text('ran')"
        run = (*args, sys.executable, "-c", child, str(ran))
        log, env = log_dir / "run-stopped-early.log", _env(identity_token, tmp_path)
        with started(*run, out=log, env=env) as proc:
            eventually_blocking(marker.exists, "the exchange never arrived", within=30)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        front.terminate()
        front.wait(timeout=10)
    assert not ran.exists()
    event = _revoked(replicas, "run-stopped-early")
    assert event["reason"] == "failed"


def test_a_refused_exchange_starts_nothing(
    replicas: Replicas, identity_token: str, tmp_path: Path
) -> None:
    """Asking for a route policy does not grant: exit 1 with one line on stderr, no child."""
    marker = tmp_path / "ran"
    done = cli.keyproxy(
        *_run_args(replicas),
        "--scope",
        "other:DELETE:/x",
        "--",
        sys.executable,
        "-c",
        f"open({str(marker)!r}, 'w')",
        env=_env(identity_token, tmp_path),
    )
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1, done.stderr
    assert "refused: 403" in done.stderr
    assert not marker.exists()
    assert identity_token not in done.stderr


def test_usage_mistakes_exit_2(tmp_path: Path) -> None:
    """No command, no scope, no proxy, a proxy URL with a password in it (never usable,
    never quoted), or one that is no base URL (unparsable, a query or fragment that /token
    would follow): exit 2 naming the mistake, before anything runs."""
    env = cli.clean_env(tmp_path, IDENTITY_TOKEN="x")
    base = ["run", "--identity-env", "IDENTITY_TOKEN"]
    cases = [
        ([*base, "--proxy", "http://127.0.0.1:9", "--scope", SCOPE], "give the command"),
        ([*base, "--proxy", "http://127.0.0.1:9", "--", "true"], "--scope"),
        ([*base, "--scope", SCOPE, "--", "true"], "--proxy"),
        (
            [
                *base,
                "--proxy",
                "http://127.0.0.1:9",
                "--scope",
                SCOPE,
                "--ttl",
                "soon",
                "--",
                "true",
            ],
            "--ttl",
        ),
    ]
    for proxy in (
        "http://user:hunter2@127.0.0.1:9",
        "ftp://user:hunter2@127.0.0.1",
        "http://[::1",
        "http://127.0.0.1:9/?x",
        "http://127.0.0.1:9#x",
    ):
        cases.append(([*base, "--proxy", proxy, "--scope", SCOPE, "--", "true"], "--proxy"))
    for args, said in cases:
        done = cli.keyproxy(*args, env=env)
        assert done.returncode == 2, (args, done.stderr)
        assert said in done.stderr, done.stderr
        assert "hunter2" not in done.stderr


async def test_an_unreachable_proxy_never_holds_up_the_exit(
    openbao: OpenBaoDevServer, agent: Agent, identity_token: str, tmp_path: Path
) -> None:
    """When the proxy is gone by the time the child exits, the revocation is given up within
    seconds, said in one line, and the wrapper still exits with the child's status."""
    openbao.put_key("keyproxy/keys/tokens-test", new_key())
    saved, go = tmp_path / "token", tmp_path / "go"
    child = (
        "import os, pathlib, sys, time\n"
        "pathlib.Path(sys.argv[1]).write_text(os.environ['KEYPROXY_TASK_TOKEN'])\n"
        "deadline = time.monotonic() + 30\n"
        "while not pathlib.Path(sys.argv[2]).exists() and time.monotonic() < deadline:\n"
        "    time.sleep(0.05)\n"
        "sys.exit(5)\n"
    )
    async with running_proxy(token_config(openbao, agent, "http://127.0.0.1:9")) as stack:
        args = ["run", "--proxy", stack.base, "--identity-env", "IDENTITY_TOKEN"]
        proc = await asyncio.create_subprocess_exec(
            KEYPROXY,
            *args,
            "--scope",
            "r:POST:/v1/chat/completions",
            "--",
            sys.executable,
            "-c",
            child,
            str(saved),
            str(go),
            env=_env(identity_token, tmp_path),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        await eventually(saved.exists, "the child did not start", within=30, interval=0.05)
    token = _token(saved)
    go.touch()
    out, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 5
    assert token not in (out + err).decode()
    (said,) = err.decode().splitlines()
    assert said.startswith("keyproxy run: could not revoke token"), said


@pytest.fixture
async def stack(
    openbao: OpenBaoDevServer, agent: Agent, upstream: Upstream
) -> AsyncIterator[Stack]:
    """One proxy in this process (heartbeat leases live in its store) before a real upstream,
    with the routes r and other of token_config."""
    openbao.put_key("keyproxy/keys/tokens-test", new_key())
    async with running_proxy(token_config(openbao, agent, upstream.url)) as value:
        yield value


async def _wrapper(
    stack: Stack, env: dict[str, str], out: Path, *args: str
) -> asyncio.subprocess.Process:
    """`keyproxy run --idle-ttl 2s ... -- ARGS` against `stack`, in the background, its stdout
    and stderr (and the child's) in `out` and `out`.err: a file, not a pipe a child left
    running would hold open."""
    with out.open("wb") as stdout, out.with_suffix(".err").open("wb") as stderr:
        return await asyncio.create_subprocess_exec(
            KEYPROXY,
            "run",
            "--proxy",
            stack.base,
            "--identity-env",
            "IDENTITY_TOKEN",
            "--scope",
            "r:POST:/v1/chat/completions",
            "--idle-ttl",
            "2s",
            "--",
            *args,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
        )


async def test_heartbeats_keep_an_idle_ttl_token_alive(
    stack: Stack, identity_token: str, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """With --idle-ttl 2s the wrapper heartbeats: the child's call 5 s after it started (two
    and a half idle TTLs) still gets through, and at its exit the token is revoked."""
    saved = tmp_path / "token"
    child = SAVE_TOKEN_R + (
        "import time, urllib.request\n"
        "time.sleep(5)\n"  # the child's own work, longer than the idle TTL
        "request = urllib.request.Request(\n"
        "    os.environ['KEYPROXY_R_BASE_URL'] + '/v1/chat/completions',\n"
        '    data=b\'{"model": "m", "messages": []}\',\n'
        "    headers={'Authorization': 'Bearer ' + os.environ['KEYPROXY_R_TOKEN'],\n"
        "             'Content-Type': 'application/json'})\n"
        "print(urllib.request.urlopen(request, timeout=5).status)\n"
    )
    out = tmp_path / "run.out"
    env = _env(identity_token, tmp_path)
    proc = await _wrapper(stack, env, out, sys.executable, "-c", child, str(saved))
    assert await asyncio.wait_for(proc.wait(), 30) == 0, out.with_suffix(".err").read_text()
    assert out.read_text().split() == ["200"]
    assert out.with_suffix(".err").read_text() == ""
    token = _token(saved)
    assert await status(http, "POST", stack.base + "/r/r/v1/chat/completions", token) == 401


async def test_a_killed_wrappers_token_dies_with_its_lease(
    stack: Stack, identity_token: str, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """SIGKILL to the wrapper leaves nobody to revoke the token (the child runs on): with
    --idle-ttl 2s, the proxy refuses it within idle_ttl + 2 s all the same."""
    saved, pid = tmp_path / "token", tmp_path / "pid"
    child = SAVE_TOKEN_R + (
        "import time\npathlib.Path(sys.argv[2]).write_text(str(os.getpid()))\ntime.sleep(60)\n"
    )
    env = _env(identity_token, tmp_path)
    proc = await _wrapper(
        stack, env, tmp_path / "run.out", sys.executable, "-c", child, str(saved), str(pid)
    )
    try:
        await eventually(pid.exists, "the child did not start", within=30, interval=0.05)
        token = _token(saved)
        url = stack.base + "/r/r/v1/chat/completions"
        assert await status(http, "POST", url, token) == 200
        proc.kill()
        await proc.wait()
        await refused(http, "POST", url, token, "the token outlived its lease", within=4.0)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        with contextlib.suppress(ProcessLookupError, ValueError, FileNotFoundError):
            os.kill(int(pid.read_text()), signal.SIGKILL)


async def test_a_sub_agents_run_never_inherits_its_parents_token(
    stack: Stack, identity_token: str, tmp_path: Path
) -> None:
    """A run inside a run, exchanging the outer task token for a narrower one (delegation,
    --identity-env KEYPROXY_TASK_TOKEN): the inner command gets only its own token, not the
    outer one under the names the outer run gave it (KEYPROXY_OTHER_TOKEN, for a route the
    inner token was not granted)."""
    env_file = tmp_path / "inner.json"
    dump = "import json, os, sys; open(sys.argv[1], 'w').write(json.dumps({**os.environ}))"
    base = ["run", "--proxy", stack.base, "--scope", "r:POST:/v1/chat/completions"]
    inner = [str(KEYPROXY), *base, "--identity-env", "KEYPROXY_TASK_TOKEN", "--"]
    proc = await asyncio.create_subprocess_exec(
        KEYPROXY,
        *base,
        "--scope",
        "other:GET:/echo",
        "--identity-env",
        "IDENTITY_TOKEN",
        "--",
        *inner,
        sys.executable,
        "-c",
        dump,
        str(env_file),
        env=_env(identity_token, tmp_path),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    env = json.loads(env_file.read_text())
    inner_token = env["KEYPROXY_TASK_TOKEN"]
    CANARIES.add(inner_token)
    assert env["KEYPROXY_R_TOKEN"] == inner_token
    held = sorted(k for k, v in env.items() if is_task_token(v) and v != inner_token)
    assert held == [], f"the outer token reached the inner command as {held}"
    assert identity_token not in env.values()


@pytest.mark.skipif(shutil.which("setsid") is None, reason="needs util-linux setsid")
def test_ctrl_c_on_the_terminal_reaches_the_child_once(
    replicas: Replicas, identity_token: str, tmp_path: Path, log_dir: Path
) -> None:
    """Ctrl-C on the terminal the wrapper runs in reaches the child from the terminal only
    (the wrapper does not send a second SIGINT), and the child decides what it means: here
    it finishes its work and exits 0, so the reason is completed."""
    saved, ready, count = tmp_path / "token", tmp_path / "ready", tmp_path / "count"
    child = SAVE_TOKEN + (
        "import signal, time; got = []; signal.signal(2, lambda *_: got.append(2)); "
        "pathlib.Path(sys.argv[2]).touch()\n"
        "deadline = time.monotonic() + 30\n"
        "while not got and time.monotonic() < deadline:\n"
        "    time.sleep(0.05)\n"
        "time.sleep(1)\n"  # time for a second SIGINT to arrive, if one were sent
        "pathlib.Path(sys.argv[3]).write_text(str(len(got)))\n"
    )
    args = [*_run_args(replicas), "--scope", SCOPE, "--task", "run-ctrl-c", "--"]
    args += [sys.executable, "-c", child, str(saved), str(ready), str(count)]
    master, terminal = os.openpty()
    try:
        with (log_dir / "run-ctrl-c.log").open("wb") as out:
            # A session of its own with the pseudo-terminal as its controlling terminal: the
            # wrapper and its child are the terminal's foreground process group.
            proc = subprocess.Popen(
                ["setsid", "--ctty", KEYPROXY, *args],
                stdin=terminal,
                stdout=out,
                stderr=out,
                env=_env(identity_token, tmp_path),
            )
        try:
            eventually_blocking(ready.exists, "the child did not start", within=30)
            os.write(master, b"\x03")  # Ctrl-C, as typed
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    finally:
        os.close(terminal)
        os.close(master)
    assert count.read_text() == "1"
    _refused_everywhere(replicas, _token(saved))
    assert _revoked(replicas, "run-ctrl-c")["reason"] == "completed"


def test_plain_http_to_another_host_is_warned_about(tmp_path: Path) -> None:
    """An http:// proxy that is not this host gets a warning on stderr that the tokens would
    cross the network in clear text, naming its origin; a loopback one gets none. (The
    identity file is missing, so nothing is contacted either way.)"""
    env = cli.clean_env(tmp_path)
    missing = str(tmp_path / "no-such-identity")
    for proxy, warned in (
        ("http://keyproxy.example:8080", True),
        ("http://10.1.2.3", True),
        ("http://[fd00::1]:80", True),
        ("https://keyproxy.example", False),
        ("http://127.0.0.1:9", False),
        ("http://localhost:9", False),
        ("http://[::1]:9", False),
    ):
        done = cli.keyproxy(
            "run",
            "--proxy",
            proxy,
            "--identity-file",
            missing,
            "--scope",
            SCOPE,
            "--",
            "true",
            env=env,
        )
        assert done.returncode == 1, (proxy, done.stderr)
        assert ("clear text" in done.stderr) is warned, (proxy, done.stderr)
