"""No key, no key fragment and no token in any log the session captured.

`CANARIES` holds every key and token the tests create. `scan` reads every log under the
session's base temporary directory: the in-process audit log (keyproxy's events and every
library's log records), `keyproxy serve`, `keyproxy dev` and CLI output, and the OpenBao
servers' own logs. tests/conftest.py runs it in the teardown of a session-scoped autouse
fixture, so it runs after every test, whatever their names and order, and an error there
fails the run.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from pathlib import Path

# Every key and token the tests create, so the final log scan knows what must never appear.
CANARIES: set[str] = set()
# Set when the recording upstream got a request keyproxy forwarded (it carries keyproxy's
# X-Request-Id): that request's event must then be in one of the logs.
FORWARDED: list[bool] = []

LOG_SUFFIXES = {".jsonl", ".out", ".err", ".log"}
FRAGMENT = 8  # the shortest run of a key's characters that counts as a leak
GENERATED_ID = re.compile(r'"request_id":"[0-9a-f]{32}"')  # headers.GeneratedId, as logged


def _is_dev_handshake(line: str) -> bool:
    """`keyproxy dev --json` prints the agent token on purpose, once, as its first line."""
    try:
        value = json.loads(line)
    except ValueError:
        return False
    return isinstance(value, dict) and "proxy_url" in value and "token" in value


def _is_token(value: str) -> bool:
    return value.startswith("eyJ") and value.count(".") == 2


class _Fragments:
    """Every 8-character run of the keys, found in a text by looking up one 4-character
    window in every four (an 8-character run always holds a whole window at a multiple of 4).
    Runs that several keys share (a common prefix such as "sk-test-") say nothing secret, nor
    do runs that start inside a prefix a key shares with another: "test-abc" of
    "sk-test-abc..." holds three secret characters, and ordinary text ("test-task") can hold
    it by chance. Each key's runs start after the longest prefix it shares with any other."""

    def __init__(self, keys: set[str]) -> None:
        ordered = sorted(keys)
        shared = dict.fromkeys(ordered, 0)
        for a, b in itertools.pairwise(ordered):  # sorted neighbours share the most
            pairs = enumerate(zip(a, b, strict=False))
            common = next((i for i, (x, y) in pairs if x != y), min(len(a), len(b)))
            shared[a], shared[b] = max(shared[a], common), max(shared[b], common)
        seen = Counter(
            g
            for k in keys
            for g in {k[i : i + FRAGMENT] for i in range(shared[k], len(k) - FRAGMENT + 1)}
        )
        self.grams = {g for g, n in seen.items() if n == 1}
        self.windows = {g[i : i + 4] for g in self.grams for i in range(FRAGMENT - 3)}

    def find(self, line: str) -> str | None:
        for i in range(0, len(line) - 3, 4):
            if line[i : i + 4] in self.windows:
                for start in range(max(0, i - 4), i + 1):
                    if line[start : start + FRAGMENT] in self.grams:
                        return line[start : start + FRAGMENT]
        return None


def scan(base: Path, audit_log: Path) -> None:
    """Every token the session created, every key and every 8-character fragment of a key is
    absent from every log under `base`."""
    if not CANARIES:
        return  # no key or token was created: nothing can have leaked
    logs = [p for p in base.rglob("*") if p.suffix in LOG_SUFFIXES]
    assert audit_log in logs
    texts = {path: path.read_text(errors="replace") for path in logs}
    if FORWARDED:
        assert any('"event":"request"' in t for t in texts.values()), "no request was logged"
    fragments = _Fragments({c for c in CANARIES if not _is_token(c) and len(c) >= FRAGMENT})
    leaks: list[tuple[str, int, str]] = []
    for path, text in texts.items():
        for number, line in enumerate(text.splitlines(), 1):
            if _is_dev_handshake(line):
                continue
            leaks += [(path.name, number, "value") for canary in CANARIES if canary in line]
            # A request id keyproxy made up is random hex, which can hold 8 characters of a hex
            # key by chance (a load test writes 85,000 of them): not a fragment. A caller's
            # own id is still scanned whole above.
            if (found := fragments.find(GENERATED_ID.sub("", line))) is not None:
                leaks.append((path.name, number, f"fragment {found[:2]}..."))
    assert leaks == [], f"secret values found in logs at {leaks[:10]}"
