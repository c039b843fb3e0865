"""Secret values: the one rule for what a key's text may hold."""

from __future__ import annotations

import pytest

from keyproxy import secret


@pytest.mark.parametrize("value", ["sk-abc", "key with inner space", "ключ-ü"])
def test_clean_text_is_accepted(value: str) -> None:
    """Printable text, inner spaces and non-ASCII letters are a usable key."""
    assert secret.problem(value) is None


@pytest.mark.parametrize(
    "value", ["sk\x7f", "sk\n", "\tsk", " sk", "sk ", "s\x00k", "s\x1fk", "sk\u2003"]
)
def test_whitespace_at_an_end_and_control_characters_are_refused(value: str) -> None:
    """Whitespace at either end (ASCII or Unicode) and C0 or DEL anywhere make text unusable."""
    assert secret.problem(value) == "has whitespace or control characters"


def test_empty_and_oversized_text_is_refused() -> None:
    """An empty value, or one longer than any API key (16 KiB), is no key: a huge one would
    hold the process while the scrubbers index it."""
    assert secret.problem("") == "is empty"
    assert secret.problem("k" * secret.MAX_KEY_LENGTH) is None
    assert secret.problem("k" * (secret.MAX_KEY_LENGTH + 1)) == "is longer than 16 KiB"
