"""Secret values: the one rule for what a key's text may hold."""

from __future__ import annotations

import errno
import stat
from pathlib import Path

import pytest

from keyproxy import secret


@pytest.mark.parametrize("value", ["sk-abc", "key with inner space", "ключ-ü"])
def test_clean_text_is_accepted(value: str) -> None:
    """Printable text, inner spaces and non-ASCII letters are a usable key."""
    assert secret.problem(value) is None


@pytest.mark.parametrize(
    "value",
    [
        "sk\x7f",
        "sk\n",
        "\tsk",
        " sk",
        "sk ",
        "s\x00k",
        "s\x1fk",
        "sk\u2003",
        "s\u009bk",
        "s\u202ek",
    ],
)
def test_whitespace_at_an_end_and_control_characters_are_refused(value: str) -> None:
    """Whitespace at either end (ASCII or Unicode) and C0, DEL, C1 or a bidirectional
    control anywhere make text unusable."""
    assert secret.problem(value) == "has whitespace or control characters"


def test_empty_and_oversized_text_is_refused() -> None:
    """An empty value, or one longer than any API key (16 KiB), is no key: a huge one would
    hold the process while the scrubbers index it."""
    assert secret.problem("") == "is empty"
    assert secret.problem("k" * secret.MAX_KEY_LENGTH) is None
    assert secret.problem("k" * (secret.MAX_KEY_LENGTH + 1)) == "is longer than 16 KiB"


def test_a_private_file_is_never_written_through_a_symlink(tmp_path: Path) -> None:
    """A symbolic or hard link where a private file goes is refused, and what it names is
    left as it was; a file already there is made 0600 before it is written."""
    target = tmp_path / "target"
    target.write_text("the operator's own file")
    link = tmp_path / "keyproxy-dev.env"
    link.symlink_to(target)
    with pytest.raises(OSError, match="Too many levels of symbolic links") as refused:
        secret.write_private(link, "export BAO_TOKEN=...")
    assert refused.value.errno == errno.ELOOP
    assert target.read_text() == "the operator's own file"
    open_file = tmp_path / "open"
    open_file.write_text("old, and longer than the new")
    open_file.chmod(0o644)
    secret.write_private(open_file, "new")
    assert (open_file.read_text(), stat.S_IMODE(open_file.stat().st_mode)) == ("new", 0o600)
    hard = tmp_path / "hard"
    hard.hardlink_to(target)  # O_NOFOLLOW does not see it
    with pytest.raises(OSError, match="a link, or another user's file"):
        secret.write_private(hard, "export BAO_TOKEN=...")
    assert target.read_text() == "the operator's own file"
