"""docs/rotation.md's examples say what the code does: the complete route example compiles,
and the result list names every result `keyproxy rotate` prints."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import yaml

from keyproxy import config
from keyproxy.config.model import HttpRotator
from tests.support import CONFIG_SECTIONS

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


def test_the_result_list_names_every_result() -> None:
    """Every result in rotation.Outcome's list, and the emergency double revocation, has a
    row in the table of docs/rotation.md."""
    rows = set(re.findall(r"^\| `([a-z_+]+)` \|", DOC.read_text(encoding="utf-8"), re.M))
    source = (Path(config.__file__).parent.parent / "rotation.py").read_text(encoding="utf-8")
    listed = re.search(r"result: str  # (.*)", source)
    assert listed is not None
    results = {r.strip() for r in listed[1].split(",")}
    assert results | {"rotated+revoked+revoked"} <= rows
