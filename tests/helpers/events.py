"""The JSON events a log file holds: the session's audit log, or a `keyproxy serve` output."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any


def read_events(path: Path, containing: str = "") -> list[dict[str, Any]]:
    """Every JSON event of `path` (whose line holds `containing`), in order. Whole lines
    only: the last one may be in the middle of being written."""
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]
    return [json.loads(line) for line in lines if line.startswith("{") and containing in line]


async def events_of(path: Path, request_id: str) -> list[dict[str, Any]]:
    """The events of `request_id` in `path`, read in a thread: a read on the event loop
    would hold up the in-process servers whose events a test polls for, the longer the
    session's audit log grows."""
    found = await asyncio.to_thread(read_events, path, request_id)
    return [e for e in found if e.get("request_id") == request_id]
