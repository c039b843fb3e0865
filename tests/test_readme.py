"""The README walkthrough, run as written: its `sh` blocks, extracted from README.md, pasted
in order into one bash (`-euo pipefail`) against a real `keyproxy dev`, started as `make dev`
starts it (in a directory laid out like a checkout, so `keyproxy-dev.env` and `vault-dev/`
are where the README says). The shell starts with no virtualenv on PATH and no Vault or
OpenAI variable: everything comes from `source keyproxy-dev.env`, as for a reader.

Blocks fenced as `sh no-run` (make dev, the production commands) and `console` (sample
output) are not run; `sh mtls` blocks are run against `keyproxy dev --mtls` by
tests/cli/test_dev_mtls.py; any other fence is refused, so a new block must say which it is.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from keyproxy.devserver import vault_dev_dir
from tests.helpers.cli import BIN, started
from tests.helpers.polling import eventually_blocking

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```$", re.M | re.S)
KINDS = {"sh", "sh no-run", "sh mtls", "console"}
FINGERPRINT = re.compile(r"fingerprint ([0-9a-f]{12})")


def readme_blocks() -> list[tuple[str, str]]:
    """Every fenced block of README.md: (info string, text)."""
    return [(info.strip(), body) for info, body in FENCE.findall(README.read_text("utf-8"))]


def runnable() -> list[str]:
    return [body for info, body in readme_blocks() if info == "sh"]


def test_every_block_says_whether_it_runs() -> None:
    """Each fenced block is `sh` (run by this test), `sh no-run` or `console`."""
    kinds = {info for info, _ in readme_blocks()}
    assert kinds <= KINDS, f"README fences must be one of {sorted(KINDS)}: {sorted(kinds)}"
    assert any("make dev" in body for info, body in readme_blocks() if info == "sh no-run")
    assert len(runnable()) == 6


@dataclass(frozen=True)
class Checkout:
    """Where the reader's second terminal is: a checkout with keyproxy dev running in it."""

    path: Path
    env: dict[str, str]


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory, log_dir: Path) -> Iterator[Checkout]:
    """`keyproxy dev --port 0` (its default env file) in a directory with vault-dev/."""
    work = tmp_path_factory.mktemp("readme-checkout")
    (work / "vault-dev").symlink_to(vault_dev_dir())
    home = tmp_path_factory.mktemp("readme-home")
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8"}
    dev_env = {**env, "PATH": f"{BIN}{os.pathsep}{env['PATH']}"}
    env_file = work / "keyproxy-dev.env"
    with started(
        "dev", "--port", "0", out=log_dir / "readme-dev.out", cwd=work, env=dev_env
    ) as proc:

        def env_file_written() -> bool:
            assert proc.poll() is None, f"keyproxy dev exited {proc.returncode}"
            return env_file.exists()

        eventually_blocking(env_file_written, "keyproxy dev wrote no env file", within=90)
        yield Checkout(work, env)
    assert proc.returncode == 0
    assert not env_file.exists(), "keyproxy dev left its env file behind"


@dataclass(frozen=True)
class Run:
    outputs: list[str]  # stdout of each block that ran
    errors: list[str]
    completed: int  # blocks that finished with status 0
    status: int  # the shell's exit status


def run_blocks(blocks: list[str], checkout: Checkout, into: Path) -> Run:
    """All `blocks` in one bash, in order, as a reader pastes them; each block's stdout and
    stderr to files of its own, and a line in `done` when it finished."""
    into.mkdir()
    done = into / "done"
    script = ["set -euo pipefail"]
    for i, block in enumerate(blocks):
        script += [f'exec >"{into}/{i}.out" 2>"{into}/{i}.err"', block, f'echo {i} >>"{done}"']
    result = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        cwd=checkout.path,
        env=checkout.env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    completed = len(done.read_text().split()) if done.exists() else 0

    def read(i: int, kind: str) -> str:
        path = into / f"{i}.{kind}"
        return path.read_text() if path.exists() else ""

    outputs = [read(i, "out") for i in range(len(blocks))]
    errors = [read(i, "err") for i in range(len(blocks))]
    return Run(outputs, errors, completed, result.returncode)


def test_the_walkthrough_runs_as_written(checkout: Checkout, tmp_path: Path) -> None:
    """Every `sh` block of the README, literally, in one shell: each exits 0 and prints what
    the README says (the SDK's answers, 401/403, the task token's 200/403/revoked/401, the
    answer of the SDK `keyproxy run` wrapped, the new key version, the exception token's 200
    and its JSON listing), and the rotated key is in use within 5 s."""
    blocks = runnable()
    run = run_blocks(blocks, checkout, tmp_path / "run")
    failed = run.completed
    assert run.completed == len(blocks), (
        f"block {failed} exited {run.status}:\n{blocks[failed]}\nstderr:\n{run.errors[failed]}"
    )
    sdk, denials, task, wrapped, rotation, exception = (o.splitlines() for o in run.outputs)

    assert len(sdk) == 2
    fingerprints = {m for line in sdk for m in FINGERPRINT.findall(line)}
    assert len(fingerprints) == 1, sdk

    assert denials[:2] == ["401", "403"]
    assert "  demo-agent: method_not_allowed (demo: GET, POST on /v1/models" in denials[3]
    assert denials[-2:] == ["denied: method_not_allowed", "explain exited 1: denied"]

    assert task[0] == "200"
    assert task[1] == "403"
    assert json.loads(task[2])["revoked"]
    assert task[3] == "401"

    assert set(FINGERPRINT.findall(wrapped[0])) == fingerprints, wrapped
    assert run.errors[3] == "", "keyproxy run wrote to stderr"

    assert rotation[0] == "2", "put-key.sh did not print the new version"
    assert rotation[1].startswith("demo: v2, age ")
    assert run.errors[4] == "", "put-key.sh or keys status wrote to stderr"

    assert exception[0] == "200"
    listed = json.loads("\n".join(exception[1:]))
    assert [e["owner"] for e in listed] == ["you@example.com"]

    # "Run the agent's python block again and the fingerprint has changed."
    attempts = itertools.count(1)

    def fingerprints_now() -> set[str]:
        again = run_blocks([blocks[0]], checkout, tmp_path / f"again-{next(attempts)}")
        assert again.completed == 1, again.errors[0]
        return set(FINGERPRINT.findall(again.outputs[0]))

    eventually_blocking(
        fingerprints_now,
        "the rotated key was not in use",
        within=5,
        interval=0,
        until=lambda now: bool(now) and now != fingerprints,
    )


def test_put_key_finds_the_checkouts_bao_without_path(tmp_path: Path) -> None:
    """vault-dev/put-key.sh with neither BAO nor a bao on PATH uses .venv/bin/bao beside the
    checkout (`make dev` installs it there); where there is none it says what to do."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "BAO_ADDR": "http://127.0.0.1:1"}
    venv_bao = vault_dev_dir().parent / ".venv" / "bin" / "bao"
    if not venv_bao.exists():
        pytest.skip("this checkout has no .venv/bin/bao (installed elsewhere)")
    found = subprocess.run(
        ["bash", "-c", f'. "{vault_dev_dir()}/lib.sh"; find_bao'],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert found.stdout.strip() == str(venv_bao)
    # A copy of the scripts with no .venv beside them, and nothing on PATH.
    copy = tmp_path / "elsewhere" / "vault-dev"
    copy.mkdir(parents=True)
    for name in ("lib.sh", "put-key.sh"):
        (copy / name).write_text((vault_dev_dir() / name).read_text())
        (copy / name).chmod(0o755)
    missing = subprocess.run(
        [str(copy / "put-key.sh"), "keyproxy/keys/x"],
        env=env,
        input="sk-never-stored",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert missing.returncode == 127
    assert "the bao CLI was not found" in missing.stderr
    assert "make dev" in missing.stderr
    assert "command not found" not in missing.stderr
