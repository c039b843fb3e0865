"""Run the real `keyproxy` command as a subprocess, the way an operator's shell does.

`keyproxy(*args, env=...)` starts the installed console script with a clean environment:
no VAULT_*/BAO_* or KEYPROXY_* variable leaks in from the test runner, HOME is a directory of
the test's own (so ~/.vault-token is whatever the test put there), and what it printed is
appended to the session's log directory (`CLI_LOG`, set by tests/conftest.py) for the final log
scan: stderr always, stdout too but for `token issue`, whose output is the token on purpose.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent
KEYPROXY = str(BIN / "keyproxy")
CLI_LOG: Path | None = None  # every command's output, for tests/test_zz_logscan.py


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
    env: dict[str, str],
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
