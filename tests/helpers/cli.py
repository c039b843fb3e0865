"""Run the real `keyproxy` command as a subprocess, the way an operator's shell does.

`keyproxy(*args, env=...)` starts the installed console script with a clean environment:
no VAULT_*/BAO_* or KEYPROXY_* variable leaks in from the test runner, HOME is a directory of
the test's own (so ~/.vault-token is whatever the test put there), and what it printed is
appended to the session's log directory (`CLI_LOG`, set by tests/conftest.py) for the final log
scan: stderr always, stdout too but for `token issue`, whose output is the token on purpose.
With `env=None` it inherits the test runner's environment, as a command typed in its shell.

`started` runs a long-lived command (`serve`, `dev`) in the background with its output in a
file and stops it by PID on the way out; `ready` waits until a started proxy answers /readyz.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp

from tests.helpers.polling import eventually, eventually_blocking
from tests.helpers.servers import free_port

BIN = Path(sys.executable).parent
KEYPROXY = str(BIN / "keyproxy")
CLI_LOG: Path | None = None  # every command's output, for the session log scan


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """This process's environment without Vault or keyproxy variables, HOME set to `home`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("VAULT_", "BAO_", "KEYPROXY_", "NO_COLOR"))
    }
    env["HOME"] = str(home)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def keyproxy(
    *args: str,
    env: dict[str, str] | None,
    stdin: str = "",
    log: Path | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """`keyproxy ARGS` as a subprocess; stdout and stderr captured apart."""
    done = subprocess.run(
        [KEYPROXY, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    for path in {p for p in (log, CLI_LOG) if p is not None}:
        printed = done.stderr
        if list(args[:2]) != ["token", "issue"]:
            printed = done.stdout + printed
        with path.open("a", encoding="utf-8") as f:
            f.write(f"$ keyproxy {' '.join(args[:3])} ...\n{printed}")
    return done


def bash(
    script: str, *, env: dict[str, str], cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`script` run by bash -euo pipefail, as pasted into a shell."""
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )


@contextlib.contextmanager
def started(
    *args: str,
    out: Path,
    err: Path | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """`keyproxy ARGS` in the background, stdout in `out` (stderr too, or in `err`); on the
    way out, if it still runs, SIGTERM to its PID, then SIGKILL after 30 s."""
    with contextlib.ExitStack() as files:
        stdout = files.enter_context(out.open("wb"))
        stderr = files.enter_context(err.open("wb")) if err is not None else subprocess.STDOUT
        proc = subprocess.Popen(
            [KEYPROXY, *args],
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def first_line_json(
    proc: subprocess.Popen[bytes], out: Path, what: str, within: float
) -> dict[str, Any]:
    """The JSON object `proc` writes as the first line of `out` (a handshake), waited for up
    to `within` seconds; fails at once if the process ended first."""

    def first_line() -> dict[str, Any]:
        first = out.read_bytes().split(b"\n", 1)
        if len(first) == 2:
            info: dict[str, Any] = json.loads(first[0])
            return info
        assert proc.poll() is None, f"{what} exited with {proc.returncode}"
        return {}

    return eventually_blocking(first_line, f"{what} printed no handshake", within=within)


def serve_replicas(
    stack: contextlib.ExitStack, config: Path, log_dir: Path, name: str, count: int = 2
) -> list[tuple[str, Path]]:
    """`count` `keyproxy serve` processes of `config` on free ports, stopped with `stack`:
    each one's base URL and output file (`log_dir`/`name`-replica-N.out)."""
    replicas = []
    for i in range(count):
        port, out = free_port(), log_dir / f"{name}-replica-{i}.out"
        args = ("serve", "-c", str(config), "--port", str(port), "--admin-port", "0")
        stack.enter_context(started(*args, out=out))
        replicas.append((f"http://127.0.0.1:{port}", out))
    return replicas


async def ready(
    http: aiohttp.ClientSession,
    base: str,
    proc: subprocess.Popen[bytes] | None = None,
    *,
    within: float = 30,
) -> None:
    """Until `base`/readyz answers 200; fails at once if `proc` (the server) has exited."""

    async def answered() -> bool:
        try:
            async with http.get(f"{base}/readyz") as response:
                if response.status == 200:
                    return True
        except aiohttp.ClientError:
            pass
        assert proc is None or proc.poll() is None, "keyproxy serve exited"
        return False

    await eventually(answered, f"{base} not ready", within=within, interval=0.1)
