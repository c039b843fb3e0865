"""Secret values: the one rule for what a key's text may hold."""

from __future__ import annotations

import pytest

from keyproxy import secret


@pytest.mark.parametrize("value", ["sk-abc", "key with inner space", "ключ-ü"])
def test_clean_text_is_accepted(value: str) -> None:
    """Printable text, inner spaces and non-ASCII letters are a usable key."""
    assert secret.is_clean(value)


@pytest.mark.parametrize(
    "value", ["sk\x7f", "sk\n", "\tsk", " sk", "sk ", "s\x00k", "s\x1fk", "sk\u2003"]
)
def test_whitespace_at_an_end_and_control_characters_are_refused(value: str) -> None:
    """Whitespace at either end (ASCII or Unicode) and C0 or DEL anywhere make text unusable."""
    assert not secret.is_clean(value)
