"""The JSON events a log file holds: the session's audit log, or a `keyproxy serve` output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_events(path: Path) -> list[dict[str, Any]]:
    """Every JSON event of `path`, in order. Whole lines only: the last one may be in the
    middle of being written."""
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]
    return [json.loads(line) for line in lines if line.startswith("{")]
