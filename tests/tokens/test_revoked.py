"""keyproxy.tokens.revoked: the revocation list's layout (shards and their index), without
Vault (the store in Vault: test_revocation.py)."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest

from keyproxy.errors import VaultError
from keyproxy.tokens import CLOCK_SKEW, LEEWAY
from keyproxy.tokens.revoked import (
    INDEX,
    SHARDS,
    ListCopy,
    index_of,
    merged_ids,
    merged_main,
    shard_of,
    shard_path,
)


def test_token_ids_spread_evenly_over_the_shards() -> None:
    """Random token ids land in every shard, none holding much more than its share: each
    shard stays a sixteenth of the list."""
    counts = Counter(shard_of(f"{i:032x}") for i in range(16_000))
    assert set(counts) == set(range(SHARDS))
    assert max(counts.values()) < 1.2 * 16_000 / SHARDS, counts
    assert shard_of("abc") == shard_of("abc")  # the same on every replica, every run
    assert shard_path("keyproxy/state/tokens/revocation-list", 3) == (
        "keyproxy/state/tokens/revocation-list/ids-03"
    )


@pytest.mark.parametrize(
    "index",
    [
        None,  # no index
        [],
        "0",
        {"x": 1},
        {"-1": 1},
        {"\u0661": 1},  # a decimal digit, not an ASCII one
        {"99999": 1},
        {"03": 1},
        {"+3": 1},
        {"3": True},
        {"3": 0},
        {"3": 1.5},
        {"3": "1"},
    ],
)
def test_an_index_keyproxy_did_not_write_is_refused(index: Any) -> None:
    """A shards' index that is not keyproxy's refuses the list (never read as empty), and a
    copy that refuses it takes nothing of it."""
    data = {} if index is None else {INDEX: index}
    with pytest.raises(VaultError, match="not keyproxy's state"):
        index_of(data, "p")
    copy = ListCopy()
    copy.take_main({"subjects": {"a|b": 1.0}, INDEX: {}}, 1, "p")
    with pytest.raises(VaultError):
        copy.take_main({"subjects": {}, **data}, 2, "p")
    assert (copy.main_version, copy.main.subjects) == (1, {"a|b": 1.0})


def test_the_main_secret_holds_subjects_tasks_and_an_index_that_only_rises() -> None:
    """The main secret takes the subjects and tasks revoked (pruned once they can name no
    live token) and raises each shard written in its index, never lowering one: a writer
    whose shard version another replica's write overtook leaves the later."""
    now = time.time()
    stored = {
        "subjects": {"k8s|old": now - 2000},
        "tasks": {"kept": now - 10},
        INDEX: {"2": 7, "5": 3},
    }
    merged = merged_main(
        stored,
        subjects=["k8s|bot"],
        tasks=[],
        written={2: 8, 5: 4, 9: 1},
        now=now,
        longest_ttl=900,
    )
    assert merged == {
        "subjects": {"k8s|bot": now + CLOCK_SKEW},
        "tasks": {"kept": now - 10},
        INDEX: {"2": 8, "5": 4, "9": 1},
    }
    # A write overtaken by another replica's leaves the later version.
    overtaken = merged_main(stored, subjects=[], tasks=[], written={2: 6}, now=now, longest_ttl=900)
    assert overtaken[INDEX]["2"] == 7


def test_a_shard_takes_ids_whole_seconds_up_and_drops_the_expired() -> None:
    now = time.time()
    stored = {"ids": {"old": now - LEEWAY - CLOCK_SKEW - 1, "kept": now + 10}}
    merged = merged_ids(stored, {"new": now + 30.2, "kept": now + 5}, now)
    assert merged == {"ids": {"kept": now + 10, "new": float(int(now + 30.2) + 1)}}


def test_a_copy_takes_only_later_shards_and_drops_them_with_a_list_made_afresh() -> None:
    """A shard read at an older version than the one held is not taken (a slow read after
    this replica's own write); a main secret at a lower version is a list made afresh, whose
    shards are read again."""
    copy = ListCopy()
    copy.take_main({INDEX: {"1": 2, "4": 1}}, 5, "p")
    assert copy.behind() == [1, 4]
    copy.take_shard(1, {"ids": {"a": 10.0}}, 3)
    copy.take_shard(1, {"ids": {}}, 2)  # older than the one held
    copy.take_shard(4, {"ids": {"b": 20.0}}, 1)
    assert copy.behind() == []
    assert copy.revocations().ids == {"a": 10.0, "b": 20.0}
    copy.take_shard(1, {"ids": {"c": 30.0}}, 4)  # "a" expired and pruned, "c" added
    assert copy.revocations().ids == {"b": 20.0, "c": 30.0}
    copy.take_main({INDEX: {"1": 1}}, 1, "p")  # deleted and written again
    assert copy.behind() == [1]
    assert copy.revocations().ids == {}
