"""docs/rotation.md's examples say what the code does: the complete route example compiles,
the result table names every result `keyproxy rotate` prints and the field table every
field of `keys status -o json`."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path

import yaml

from keyproxy import config
from keyproxy.config.model import HttpRotator
from keyproxy.rotation.state import Result
from keyproxy.rotation.status import KeyStatus
from tests.helpers.configs import CONFIG_SECTIONS

DOC = Path(__file__).resolve().parent.parent / "docs" / "rotation.md"


def test_the_loopback_http_rotator_example_compiles() -> None:
    """The example showing where `allow_http` and `egress.allow_cidrs` go is a valid route
    whose http rotator allows plain http and whose egress fence admits loopback."""
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    example = next(b for b in blocks if b.startswith("routes:") and "allow_cidrs" in b)
    raw = {**copy.deepcopy(CONFIG_SECTIONS), **yaml.safe_load(example)}
    route = config.parse(json.dumps(raw), {}).routes["legacy"]
    assert route.rotation is not None
    assert isinstance(route.rotation.rotator, HttpRotator)
    assert route.rotation.rotator.create.url.startswith("http://127.0.0.1")
    assert [str(n) for n in route.egress_allow] == ["127.0.0.0/8"]


def _table(heading: str) -> str:
    """The markdown table that starts with the `heading` row, up to its first blank line."""
    text = DOC.read_text(encoding="utf-8")
    start = text.index(heading)
    return text[start : text.index("\n\n", start)]


def test_the_result_table_names_exactly_the_results() -> None:
    """The table of results in docs/rotation.md has one row per rotation.Result, and no
    row for a result the code cannot give."""
    rows = re.findall(r"^\| `([a-z_+]+)` \|", _table("| result | meaning |"), re.M)
    assert sorted(rows) == sorted(r.value for r in Result)


def test_the_keys_status_table_names_exactly_the_json_fields() -> None:
    """The field table of `keys status -o json` names every KeyStatus field, and no other."""
    table = _table("| field | meaning |")
    first_column = [row.split("|")[1] for row in table.splitlines()[2:]]
    documented = re.findall(r"`([a-z_]+)`", "".join(first_column))
    assert sorted(documented) == sorted(f.name for f in dataclasses.fields(KeyStatus))
