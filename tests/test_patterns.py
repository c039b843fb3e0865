"""Path patterns: one grammar for policy paths (config) and task-token scope paths."""

from __future__ import annotations

import pytest

from keyproxy import patterns, scope
from keyproxy.errors import ConfigError

GOOD = [
    ("/", ()),
    ("/**", ("**",)),
    ("/v1/", ("v1", "")),
    ("/v1/*/x/**", ("v1", "*", "x", "**")),
    ("/v1/chat/completions", ("v1", "chat", "completions")),
]
BAD = [
    ("", "must start with '/'"),
    ("v1/x", "must start with '/'"),
    (3, "must start with '/'"),
    ("/a//b", "empty segments"),
    ("/a/../b", "plain decoded path"),
    ("/a/./b", "plain decoded path"),
    ("/a%2fb", "plain decoded path"),
    ("/a\\b", "plain decoded path"),
    ("/a\nb", "plain decoded path"),
    ("/a*", "whole segments"),
    ("/**x", "whole segments"),
]


@pytest.mark.parametrize(("text", "segments"), GOOD)
def test_good_patterns_read_the_same_everywhere(text: str, segments: tuple[str, ...]) -> None:
    """A pattern gives the same segments unbounded (config, signed claims) and bounded."""
    assert patterns.parse(text) == segments
    assert scope.parse_pattern(text) == segments


@pytest.mark.parametrize(("text", "message"), BAD)
def test_bad_patterns_are_refused_everywhere(text: object, message: str) -> None:
    """Each broken rule is refused with the same message, in the caller's error type."""
    with pytest.raises(ValueError, match=message):
        patterns.parse(text)
    with pytest.raises(ValueError, match=message):
        scope.parse_pattern(text)
    with pytest.raises(ConfigError, match=message):
        patterns.parse(text, error=lambda why: ConfigError("p", why))


def test_requests_are_bounded_and_config_is_not() -> None:
    """Length and depth limits apply only where the caller passes them (token requests)."""
    deep = "/a" * 33
    assert len(patterns.parse(deep)) == 33
    with pytest.raises(ValueError, match="at most 32 segments"):
        scope.parse_pattern(deep)
    long = "/" + "a" * 512
    assert patterns.parse(long) == ("a" * 512,)
    with pytest.raises(ValueError, match="at most 512 characters"):
        scope.parse_pattern(long)
