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


def test_aliases_that_expand_past_a_million_values_are_a_config_error() -> None:
    """A "billion laughs" file (each alias repeating the one before nine times) is refused
    as it is read, naming where, not built into a value of 387 million items."""
    levels = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    with pytest.raises(ConfigError, match=r"at line 7, column \d+: aliases expand it to more"):
        read("\n".join(levels))


def test_aliases_repeating_long_lists_across_policies_are_refused() -> None:
    """A small file whose policies each repeat two long lists by alias (the compiled
    configuration would hold every repetition: at the 4 MiB a file may have, many GiB) is
    refused before it is compiled."""
    subjects = ", ".join(f"s{i}" for i in range(2000))
    paths = ", ".join(f'"/p{i}/**"' for i in range(2000))
    first = f"  - {{name: p0, subjects: &s [{subjects}], allow: {{r: &g {{paths: [{paths}]}}}}}}"
    rest = [f"  - {{name: p{i}, subjects: *s, allow: {{r: *g}}}}" for i in range(1, 300)]
    with pytest.raises(ConfigError, match="aliases expand it to more than 1,000,000 values"):
        read("policies:\n" + "\n".join([first, *rest]))


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("a: " + "9" * 5000 + "\n", "line 1, column 4: not a valid int"),
        ("a: 2001-13-14\n", "line 1, column 4: not a valid timestamp"),
        ("a: 2001-12-14t25:59:43.10-05:00\n", "line 1, column 4: not a valid timestamp"),
        ("a: !!int abc\n", "line 1, column 4: not a valid int"),
        ("a: !!float abc\n", "line 1, column 4: not a valid float"),
        ("a: !!bool maybe\n", "line 1, column 4: not a valid bool"),
        ("a: !!timestamp nope\n", "line 1, column 4: not a valid timestamp"),
        ("a: !!map x\n", "line 1, column 4: expected a mapping node, but found scalar"),
    ],
    ids=["long int", "no such date", "no such hour", "int", "float", "bool", "timestamp", "map"],
)
def test_a_value_its_type_cannot_read_is_a_config_error(text: str, where: str) -> None:
    """A scalar its (implicit or explicit) type cannot read, such as a date that does not
    exist or an integer longer than Python reads, is refused with its position, not the
    ValueError of PyYAML's constructor; the value itself is not repeated."""
    with pytest.raises(ConfigError, match=f"^not valid YAML at {where}$"):
        read(text)


@pytest.mark.parametrize("text", ['a: "x\\ud800"\n', '"\\udfff": 1\n', 'a: ["\\ud83d"]\n'])
def test_a_lone_surrogate_escape_is_a_config_error(text: str) -> None:
    """A double-quoted escape of half a UTF-16 pair ("\\ud800") makes no text: no header,
    URL or log line could carry it, so it is refused where it is written."""
    with pytest.raises(ConfigError, match=r"^not valid YAML at line 1, column \d+: .*surrogate"):
        read(text)
