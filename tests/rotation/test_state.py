"""The rotation's typed state: step, mode and result texts, and the journal's stored shape,
read and written exactly as earlier versions stored it. Pure: no Vault."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from keyproxy.rotation.state import (
    PHASE1,
    Failure,
    JournalError,
    JournalState,
    Lock,
    Mode,
    Pending,
    Previous,
    Result,
    Step,
)
from keyproxy.secret import Secret

# A journal in grace, field for field as the previous version wrote it (its `save` merged
# each step's changes into the stored dict: creating, created, grace, then the release).
GRACE_JOURNAL: dict[str, Any] = {
    "step": "grace",
    "attempt": "9f1c2b7e4d5a46e0b3c1d2e3f4a5b6c7",
    "emergency": False,
    "base_version": 6,
    "started_at": 1764840000.25,
    "last_failure": None,
    "pending": None,
    "previous": {"version": 6, "revoke_after": 1764840600.5},
    "last_rotation": 1764840001.75,
    "rotations": 7,
    "lock": None,
}

# Mid-rotation: the new key recorded, the lock held, an earlier failure on record.
CREATED_JOURNAL: dict[str, Any] = {
    "step": "created",
    "attempt": "0123456789abcdef0123456789abcdef",
    "emergency": True,
    "base_version": 3,
    "started_at": 1764840000.0,
    "last_failure": {"at": 1764830000.0, "step": "created", "error": "verification failed"},
    "pending": {"key": "sk-pending-state-0001", "key_id": "k-17", "created": 1764840000.5},
    "previous": None,
    "last_rotation": 1764800000.0,
    "rotations": 2,
    "lock": {"owner": "host:41:ab12cd", "expires_at": 1764840300.0},
}


def test_step_mode_and_result_texts_are_unchanged() -> None:
    """The stored and printed texts of every step, mode and result are the earlier strings."""
    assert [s.value for s in Step] == [
        "idle",
        "creating",
        "created",
        "verified",
        "grace",
        "revoked",
        "abandoning",
    ]
    assert [m.value for m in Mode] == ["due", "now", "emergency"]
    assert {r.value for r in Result} == {
        "rotated",
        "revoked",
        "rotated+revoked",
        "rotated+revoked+revoked",
        "not_due",
        "in_grace",
        "locked",
        "manual",
        "failed",
    }
    assert {"creating", "created", "verified"} == PHASE1
    assert f"{Result.ROTATED_REVOKED}" == "rotated+revoked"


@pytest.mark.parametrize(
    ("rotated", "revoked", "text"),
    [
        (False, 0, "not_due"),
        (True, 0, "rotated"),
        (False, 1, "revoked"),
        (True, 1, "rotated+revoked"),
        (True, 2, "rotated+revoked+revoked"),
    ],
)
def test_a_run_result_puts_rotated_first(rotated: bool, revoked: int, text: str) -> None:
    """`_drive`'s combined result: `rotated` first, one `revoked` per old key revoked."""
    assert Result.of(rotated=rotated, revoked=revoked) == text


def test_a_combination_no_run_can_make_is_refused() -> None:
    """Two revocations without a rotation cannot happen; the result refuses to name one."""
    with pytest.raises(ValueError, match="revoked"):
        Result.of(rotated=False, revoked=2)


@pytest.mark.parametrize("stored", [GRACE_JOURNAL, CREATED_JOURNAL], ids=["grace", "created"])
def test_a_journal_in_the_stored_shape_round_trips_exactly(stored: dict[str, Any]) -> None:
    """A journal as the previous version stored it reads and writes back the same dict."""
    original = copy.deepcopy(stored)
    assert JournalState.from_data(stored).to_data() == original
    assert stored == original  # reading does not change what was read


def test_the_stored_fields_read_as_their_types() -> None:
    """Each stored field becomes its typed value: the step an enum, records dataclasses."""
    state = JournalState.from_data(CREATED_JOURNAL)
    assert state.step is Step.CREATED
    assert state.attempt == "0123456789abcdef0123456789abcdef"
    assert (state.emergency, state.base_version, state.rotations) == (True, 3, 2)
    assert (state.started_at, state.last_rotation) == (1764840000.0, 1764800000.0)
    assert state.pending == Pending(Secret("sk-pending-state-0001"), "k-17", 1764840000.5)
    assert state.previous is None
    assert state.last_failure == Failure(1764830000.0, "created", "verification failed")
    assert state.lock == Lock("host:41:ab12cd", 1764840300.0)
    grace = JournalState.from_data(GRACE_JOURNAL)
    assert grace.step is Step.GRACE
    assert grace.previous == Previous(6, 1764840600.5)
    assert (grace.pending, grace.last_failure, grace.lock) == (None, None, None)


@pytest.mark.parametrize(
    "stored",
    [
        {},  # no journal yet
        {"lock": {"owner": "host:1:aaaaaa", "expires_at": 1764840300.0}},  # keys put, locked
        {"lock": None, "last_rotation": 1764840001.0},  # keys put, done
        {"lock": None, "step": None},
    ],
)
def test_a_sparse_journal_reads_as_idle_and_writes_only_defaults_beside_it(
    stored: dict[str, Any],
) -> None:
    """A journal missing fields (written by `keys put` alone, or none yet) reads as idle;
    written back, it keeps every stored value and adds only defaults, which the previous
    version read exactly as a missing field (`or "idle"`, `or 0`, falsy, not a dict)."""
    state = JournalState.from_data(stored)
    assert state.step is Step.IDLE
    assert (state.attempt, state.pending, state.previous, state.last_failure) == (None,) * 4
    written = state.to_data()
    added = {k: v for k, v in written.items() if k not in stored or stored[k] is None}
    assert {k: v for k, v in written.items() if k not in added} == {
        k: v for k, v in stored.items() if k not in added
    }
    assert added.pop("step") == "idle"
    assert not any(added.values())


def test_unknown_keys_are_written_back_unchanged() -> None:
    """Keys a newer version may have written, at the top level and inside the records the
    run carries over, survive a read and a write."""
    stored = copy.deepcopy(CREATED_JOURNAL)
    stored["shard"] = {"region": "eu-1"}
    stored["pending"]["fingerprint"] = "abc123"
    stored["last_failure"]["retryable"] = True
    grace = copy.deepcopy(GRACE_JOURNAL)
    grace["previous"]["key_id"] = "k-6"
    assert JournalState.from_data(stored).to_data() == stored
    assert JournalState.from_data(grace).to_data() == grace


@pytest.mark.parametrize("step", ["verifying", "IDLE", 3, ["grace"], True])
def test_an_unknown_step_is_refused_not_guessed(step: Any) -> None:
    """A step this version does not know (a newer one's, or garbage) is an error."""
    with pytest.raises(JournalError, match="unknown rotation step"):
        JournalState.from_data({**GRACE_JOURNAL, "step": step})


@pytest.mark.parametrize("field", ["base_version", "rotations"])
@pytest.mark.parametrize("value", ["six", [6], {"v": 6}])
def test_a_version_or_count_that_is_not_a_number_is_refused(field: str, value: Any) -> None:
    """A version or count that is not a number is an error, not a zero."""
    with pytest.raises(JournalError, match="not a number"):
        JournalState.from_data({**GRACE_JOURNAL, field: value})


@pytest.mark.parametrize("pending", [None, "sk-x", {}, {"key": ""}, {"key": 5}])
def test_a_pending_record_without_a_key_reads_as_none(pending: Any) -> None:
    """A pending record without a non-empty text key is no pending key."""
    assert JournalState.from_data({**CREATED_JOURNAL, "pending": pending}).pending is None


def test_the_pending_key_is_redacted_in_every_view_but_the_stored_one() -> None:
    """The state's repr never shows the pending key; only to_data (the Vault write) does."""
    state = JournalState.from_data(CREATED_JOURNAL)
    assert "sk-pending-state-0001" not in repr(state)
    assert "sk-pending-state-0001" not in str(state.pending)
    assert state.to_data()["pending"]["key"] == "sk-pending-state-0001"
