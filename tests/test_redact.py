"""The log scrubber redacts fragments of registered secrets, not only whole ones."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable

import pytest

from keyproxy import redact, secret
from keyproxy.secret import REDACTED


def _secret() -> str:
    value = "lg" + secrets.token_urlsafe(30)
    secret.register(value)
    return value


def _scrubbed(text: str) -> str:
    out = redact.scrub_secrets(None, "info", {"m": text})["m"]
    assert isinstance(out, str)
    return out


@pytest.mark.parametrize(
    ("quote", "want"),
    [
        (lambda k: f"Incorrect API key provided: {k[:8]}****...{k[-4:]}", "provided: {R}****"),
        (lambda k: f"key {k[:8]} refused", "key {R} refused"),
        (lambda k: f"ends in {k[-8:]}", "ends in {R}"),
        (lambda k: f"middle {k[11:19]}.", "middle {R}."),
        (lambda k: f"run {k[3:29]}!", "run {R}!"),
        (lambda k: f"{k[:8]}{k[-9:]}", "{R}"),
        (lambda k: f"{k[:8]} {k[-9:]}", "{R} {R}"),
        (lambda k: f"whole '{k}'", "whole '{R}'"),
    ],
)
def test_runs_of_eight_characters_of_a_secret_are_redacted_in_logs(
    quote: Callable[[str], str], want: str
) -> None:
    """A log text quoting 8 or more consecutive characters of a registered secret, at any
    offset and alone or beside others, has each run redacted (touching runs as one)."""
    value = _secret()
    text = quote(value)
    out = _scrubbed(text)
    assert want.format(R=REDACTED) in out
    for i in range(len(value) - 7):
        assert value[i : i + 8] not in out


def test_seven_characters_are_not_a_fragment() -> None:
    """Runs of 7 characters are left as they are."""
    value = _secret()
    text = f"near {value[:7]} and {value[10:17]} and {value[-7:]}"
    assert _scrubbed(text) == text


def test_fragments_of_two_secrets_and_nested_values_are_redacted() -> None:
    """Fragments of different secrets in one text, and in nested lists, dicts and objects
    rendered as text, are all redacted; other fields are untouched."""
    first, second = _secret(), _secret()
    event = {
        "error": f"upstream said {first[5:15]}; retry with {second[-12:]}",
        "nested": {"list": [f"<{second[2:10]}>", 3]},
        "obj": ValueError(f"bad key {first[:9]}"),
        "status": 401,
    }
    out = redact.scrub_secrets(None, "error", event)
    text = json.dumps(out)
    for value in (first, second):
        for i in range(len(value) - 7):
            assert value[i : i + 8] not in text
    assert out["error"] == f"upstream said {REDACTED}; retry with {REDACTED}"
    assert out["nested"] == {"list": [f"<{REDACTED}>", 3]}
    assert out["status"] == 401


def test_a_fragment_found_after_its_secret_is_registered() -> None:
    """A text found clean before its secret was registered is redacted once it is, also when
    it holds only a fragment."""
    value = "lg" + secrets.token_urlsafe(30)
    text = f"the key was {value[4:16]}"
    assert _scrubbed(text) == text
    secret.register(value)
    assert _scrubbed(text) == f"the key was {REDACTED}"
