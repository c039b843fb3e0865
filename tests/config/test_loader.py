"""keyproxy.config.loader: YAML is read strictly, and mistakes in it are ConfigErrors."""

from __future__ import annotations

import pytest

from keyproxy import config
from keyproxy.config.loader import read
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


def test_a_file_larger_than_any_configuration_is_refused_unread() -> None:
    """A configuration over 4 MiB (a mistake: 1,000 routes take about 300 KiB) is refused
    before the YAML reader spends seconds on it, at start and at a reload alike."""
    comment = "# " + "x" * 1022 + "\n"
    with pytest.raises(ConfigError, match="larger than 4 MiB"):
        read("routes: {}\n" + comment * 4096)
    assert read("routes: {}\n" + comment * 4000) == {"routes": {}}
