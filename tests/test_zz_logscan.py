"""After the whole suite: no key and no token appears in any captured log output.

Named to run last (pytest runs files in name order). It reads every log the session wrote:
the in-process audit log, `keyproxy dev` output, and the OpenBao servers' own logs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support import CANARIES

LOG_SUFFIXES = {".jsonl", ".out", ".err", ".log"}


def _is_dev_handshake(line: str) -> bool:
    """`keyproxy dev --json` prints the agent token on purpose, once, as its first line."""
    try:
        value = json.loads(line)
    except ValueError:
        return False
    return isinstance(value, dict) and "proxy_url" in value and "token" in value


def test_no_secret_in_any_log(tmp_path_factory: pytest.TempPathFactory, audit_log: Path) -> None:
    """Every key and token the suite created is absent from every log it captured."""
    if not CANARIES:
        pytest.skip("run with the rest of the suite: no keys or tokens were created")
    logs = [p for p in tmp_path_factory.getbasetemp().rglob("*") if p.suffix in LOG_SUFFIXES]
    assert audit_log in logs
    texts = {path: path.read_text(errors="replace") for path in logs}
    assert any('"event":"request"' in t for t in texts.values()), "no request was logged"
    leaks = []
    for path, text in texts.items():
        for number, line in enumerate(text.splitlines(), 1):
            if _is_dev_handshake(line):
                continue
            leaks += [(path.name, number) for canary in CANARIES if canary in line]
    assert leaks == [], f"secret values found in logs at {leaks[:10]}"
