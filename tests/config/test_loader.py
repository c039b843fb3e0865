"""keyproxy.config.loader: YAML is read strictly, and mistakes in it are ConfigErrors."""

from __future__ import annotations

from pathlib import Path

import pytest

from keyproxy import config
from keyproxy.config.loader import read, read_file
from keyproxy.errors import ConfigError
from tests.helpers.configs import TEXT


def test_invalid_yaml_is_a_config_error() -> None:
    """Broken YAML is reported with its line, not a traceback."""
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d"):
        config.parse("routes:\n  - [unclosed\n", {})


def test_aliases_still_repeat_whole_values() -> None:
    """An anchor and alias share a whole value between routes: only merge keys are refused."""
    text = TEXT.replace(
        "    secret: {path: keyproxy/keys/openai}", "    secret: &key {path: keyproxy/keys/openai}"
    ).replace(
        "policies:",
        "  mirror:\n    upstream: https://mirror.example\n    secret: *key\n"
        "    inject: [{header: X-Api-Key}]\npolicies:",
    )
    routes = config.parse(text, {}).routes
    assert routes["mirror"].secret == routes["openai"].secret
    assert routes["mirror"].secret.path == "keyproxy/keys/openai"


def test_a_file_larger_than_any_configuration_is_refused_unread(tmp_path: Path) -> None:
    """A configuration over 4 MiB (a mistake: 1,000 routes take about 300 KiB) is refused,
    read no further (a reload reads it so too), before the YAML reader spends seconds on it;
    so is a text that large handed over whole."""
    comment = "# " + "x" * 1021 + "\n"
    path = tmp_path / "huge.yaml"
    path.write_text("routes: {}\n" + comment * 4096, encoding="utf-8")
    with pytest.raises(ConfigError, match="larger than 4 MiB"):
        config.load(path)
    with pytest.raises(ConfigError, match="larger than 4 MiB"):
        read("routes: {}\n" + comment * 4096)
    path.write_text("routes: {}\n" + comment * 4000, encoding="utf-8")
    assert read(read_file(path).decode()) == {"routes": {}}


@pytest.mark.parametrize(
    "text",
    [
        "routes: " + "[" * 3000 + "]" * 3000,
        "routes: " + "{a: " * 3000 + "1" + "}" * 3000,
        "routes:\n" + "".join("  " * depth + "- \n" for depth in range(1, 2000)),
    ],
    ids=["flow lists", "flow mappings", "block lists"],
)
def test_nesting_deeper_than_any_configuration_is_a_config_error(text: str) -> None:
    """Values nested thousands deep (a file of brackets) are refused with a line, not the
    YAML reader's RecursionError (which a reload could only report as a crash)."""
    with pytest.raises(ConfigError, match=r"at line \d+, column \d+: nested more than 64 levels"):
        config.parse(text, {})


def test_nesting_at_the_limit_is_read() -> None:
    """64 levels of nesting are still read (far beyond what any setting needs)."""
    value: list[object] = []
    for _ in range(62):
        value = [value]
    assert read("a: " + "[" * 63 + "]" * 63) == {"a": value}  # the top mapping and 63 lists
