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
