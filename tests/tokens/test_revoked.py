"""keyproxy.tokens.revoked: the revocation list's layout (shards, their index, the list's
name), without Vault (the store in Vault: test_revocation.py)."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest

from keyproxy.errors import VaultError
from keyproxy.tokens import CLOCK_SKEW, LEEWAY
from keyproxy.tokens.revoked import (
    INDEX,
    LIST,
    SHARDS,
    ListCopy,
    index_of,
    main_of,
    merged_ids,
    merged_main,
    shard_ids,
    shard_of,
    shard_path,
)


def _main(index: dict[str, int] | None = None, **fields: Any) -> dict[str, Any]:
    """A main secret's data as keyproxy writes it."""
    return {LIST: "one", "subjects": {}, "tasks": {}, INDEX: index or {}, **fields}


def test_token_ids_spread_evenly_over_the_shards() -> None:
    """Random token ids land in every shard, none holding much more than its share: each
    shard stays a sixteenth of the list."""
    counts = Counter(shard_of(f"{i:032x}") for i in range(16_000))
    assert set(counts) == set(range(SHARDS))
    assert max(counts.values()) < 1.2 * 16_000 / SHARDS, counts
    assert shard_of("abc") == shard_of("abc")  # the same on every replica, every run
    assert shard_path("keyproxy/state/tokens/revoked", 3) == (
        "keyproxy/state/tokens/revoked/ids-03"
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
        {"1" * 5000: 1},
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
    data = {LIST: "one", "subjects": {}, "tasks": {}}
    if index is not None:
        data[INDEX] = index
    with pytest.raises(VaultError, match="not keyproxy's state"):
        index_of(data, "p")
    copy = ListCopy()
    copy.take_main(_main(subjects={"a|b": 1.0}), 1, "p")
    with pytest.raises(VaultError):
        copy.take_main(data, 2, "p")
    assert (copy.main_version, copy.main.subjects) == (1, {"a|b": 1.0})


@pytest.mark.parametrize(
    "data",
    [
        {"subjects": {}, "tasks": {}, INDEX: {}},  # no name
        {LIST: "", "subjects": {}, "tasks": {}, INDEX: {}},
        {LIST: "one", "tasks": {}, INDEX: {}},  # no subjects
        {LIST: "one", "subjects": [], "tasks": {}, INDEX: {}},
        {LIST: "one", "subjects": {}, "tasks": {"t": "1"}, INDEX: {}},
        {LIST: "one", "subjects": {"k|s": True}, "tasks": {}, INDEX: {}},
    ],
)
def test_a_main_secret_or_shard_keyproxy_did_not_write_is_refused(data: Any) -> None:
    """Every part of the list is read strictly: a main secret or a shard holding anything
    but what keyproxy writes is refused, never read as an empty list."""
    with pytest.raises(VaultError, match="not keyproxy's state"):
        main_of(data, "p")
    shards: list[dict[str, Any]] = [
        {},
        {"x": 1},
        {"ids": []},
        {"ids": {"a": "1"}},
        {"ids": {}, "x": 1},
    ]
    for shard in shards:
        with pytest.raises(VaultError, match="not keyproxy's state"):
            shard_ids(shard, "p")
        with pytest.raises(VaultError):
            ListCopy().take_shard(0, shard, 1, "p")


def test_the_main_secret_holds_subjects_tasks_and_an_index_that_only_rises() -> None:
    """The main secret takes the subjects and tasks revoked (pruned once they can name no
    live token) and raises each shard written in its index, never lowering one (a writer
    whose shard version another replica's write overtook leaves the later); a shard written
    at the very version the index names was deleted and made afresh, and is refused."""
    now = time.time()
    stored = _main({"2": 7, "5": 3}, subjects={"k8s|old": now - 2000}, tasks={"kept": now - 10})
    merged = merged_main(
        stored,
        subjects=["k8s|bot"],
        tasks=[],
        written={2: 8, 5: 4, 9: 1},
        now=now,
        longest_ttl=900,
        path="p",
    )
    assert merged == {
        LIST: "one",
        "subjects": {"k8s|bot": now + CLOCK_SKEW},
        "tasks": {"kept": now - 10},
        INDEX: {"2": 8, "5": 4, "9": 1},
    }
    overtaken = merged_main(
        stored, subjects=[], tasks=[], written={2: 6}, now=now, longest_ttl=900, path="p"
    )
    assert overtaken[INDEX]["2"] == 7
    with pytest.raises(VaultError, match="shard 2 is behind its index"):
        merged_main(
            stored, subjects=[], tasks=[], written={2: 7}, now=now, longest_ttl=900, path="p"
        )
    made = merged_main({}, subjects=[], tasks=[], written={1: 1}, now=now, longest_ttl=9, path="p")
    again = merged_main({}, subjects=[], tasks=[], written={1: 1}, now=now, longest_ttl=9, path="p")
    assert made[LIST] != again[LIST]  # a list made afresh has a name of its own


def test_a_shard_takes_ids_whole_seconds_up_and_drops_the_expired() -> None:
    now = time.time()
    stored = {"ids": {"old": now - LEEWAY - CLOCK_SKEW - 1, "kept": now + 10}}
    merged = merged_ids(stored, {"new": now + 30.2, "kept": now + 5}, now, "p")
    assert merged == {"ids": {"kept": now + 10, "new": float(int(now + 30.2) + 1)}}
    assert merged_ids({}, {"new": now + 1}, now, "p") == {"ids": {"new": float(int(now + 1) + 1)}}


def test_a_copy_takes_only_later_shards_and_drops_them_with_a_list_made_afresh() -> None:
    """A shard read at an older version than the one held is not taken (a slow read after
    this replica's own write); a main secret at a lower version, or under another name, is a
    list made afresh, whose shards are read again."""
    copy = ListCopy()
    copy.take_main(_main({"1": 2, "4": 1}), 5, "p")
    assert copy.behind() == [1, 4]
    copy.take_shard(1, {"ids": {"a": 10.0}}, 3, "p")
    copy.take_shard(1, {"ids": {}}, 2, "p")  # older than the one held
    copy.take_shard(4, {"ids": {"b": 20.0}}, 1, "p")
    assert copy.behind() == []
    assert copy.revocations().ids == {"a": 10.0, "b": 20.0}
    copy.take_shard(1, {"ids": {"c": 30.0}}, 4, "p")  # "a" expired and pruned, "c" added
    assert copy.revocations().ids == {"b": 20.0, "c": 30.0}
    copy.take_main(_main({"1": 1}), 1, "p")  # deleted and written again
    assert copy.behind() == [1]
    assert copy.revocations().ids == {}
    copy.take_shard(1, {"ids": {"d": 40.0}}, 1, "p")
    copy.take_main(_main({"1": 1}, **{LIST: "two"}), 9, "p")  # made afresh, later version
    assert (copy.behind(), copy.revocations().ids) == ([1], {})
