"""The whole-session log scan's fragment search (tests/helpers/logscan.py) on its own."""

from __future__ import annotations

from tests.helpers.logscan import _Fragments


def test_fragments_are_the_keys_own_runs_not_their_shared_prefix() -> None:
    """Eight characters of a key's own part are found; a run starting in the prefix every
    test key shares ("test-tas" of "sk-test-tas...") is not, so "test-task" in a log is no
    leak."""
    found = _Fragments({"sk-test-tasKQ1234abcdWXYZ", "sk-test-Zq9RSTUVWXYZabcd"})
    assert found.find('{"task":"test-task"}') is None
    assert found.find("leaked: tasKQ1234 here") == "tasKQ123"
    assert found.find("x Q1234abc y") == "Q1234abc"
    assert found.find("sk-test-") is None
