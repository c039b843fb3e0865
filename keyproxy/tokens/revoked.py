"""The revocation list as data: its rules (`Revocations`) and how it is laid out in Vault KV
(`ListCopy`), with no I/O (keyproxy.tokens.revocation reads and writes it).

The list is a main secret and SHARDS shards. The main secret, at `<tokens.state_path>/
revoked`, holds the revoked subjects and tasks (an operator's, few) and the shards' index:
the version each shard was last written at. Revoked token ids, one entry per ended token
until it expires and so the bulk of the list, are spread over the shards by a hash of the
id, at `revoked/ids-NN`. So a token's end rewrites one shard (a sixteenth of the
ids) and the small main secret, every replica re-reads only the shards whose version moved,
and each secret stays far below what one Vault secret may hold (a Raft entry, a JSON string:
1 MiB by default) with sixteen times the ids that fit in one. A writer writes the shard
first and then raises its version in the index, and the revocation counts as recorded only
after both: a reader that sees the index see the shard at that version or later.
"""

from __future__ import annotations

import math
import secrets
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from keyproxy.errors import Unauthenticated, VaultError
from keyproxy.tokens.format import CLOCK_SKEW, LEEWAY, Link, TaskToken

SHARDS: Final = 16  # where this build writes token ids; it reads whatever the index names
INDEX: Final = "shards"  # the main secret's field: shard number -> version last written
LIST: Final = "list"  # the main secret's field: a random name the list is given when made
_LARGEST_SHARD: Final = 4096  # an index naming a shard beyond it is not keyproxy's


def shard_of(token_id: str) -> int:
    """The shard a token id is kept in (any stable, even spread will do: CRC-32)."""
    return zlib.crc32(token_id.encode("utf-8", "surrogatepass")) % SHARDS


def shard_path(main: str, shard: int) -> str:
    """Where shard `shard` of the list at `main` is kept."""
    return f"{main}/ids-{shard:02d}"


@dataclass
class Revocations:
    """Revocations as a replica holds them (from the list's parts, or an earlier build's
    list), with the rules that judge a token by them and the pruning rule."""

    ids: dict[str, float] = field(default_factory=dict)  # jti -> token expiry
    subjects: dict[str, float] = field(default_factory=dict)  # "idp|sub" -> revoked at
    tasks: dict[str, float] = field(default_factory=dict)  # task -> revoked at

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> Revocations:
        def floats(name: str) -> dict[str, float]:
            value = data.get(name)
            if not isinstance(value, dict):
                return {}
            return {str(k): float(v) for k, v in value.items() if isinstance(v, int | float)}

        return cls(floats("ids"), floats("subjects"), floats("tasks"))

    def union(self, other: Revocations) -> Revocations:
        """Every revocation either list holds (the later time where both name the same)."""
        if not (other.ids or other.subjects or other.tasks):
            return self

        def later(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
            return a | {k: max(v, a.get(k, v)) for k, v in b.items()}

        return Revocations(
            later(self.ids, other.ids),
            later(self.subjects, other.subjects),
            later(self.tasks, other.tasks),
        )

    def revoked(self, token: TaskToken) -> bool:
        return self.names(
            token.token_id,
            f"{token.identity.issuer}|{token.identity.subject}",
            token.task,
            token.issued_at,
        )

    def any_id(self, links: Iterable[Link]) -> bool:
        """Whether any of these tokens (a delegated token's ancestors) is revoked by id."""
        return any(link.token_id in self.ids for link in links)

    def any_actor(self, token: TaskToken) -> bool:
        """Whether a delegated token's actor ("issuer|subject") was revoked as a subject at
        or after the token was issued: revoking a sub-agent's identity ends what it acts with."""
        return any(self.covers_subject(actor, token.issued_at) for actor in token.actors)

    def chain_refusal(self, token: TaskToken) -> Unauthenticated | None:
        """Why a delegated token is dead by its chain (the cascade), or None: a token it was
        delegated from is revoked, or an identity that acted in it was revoked as a subject."""
        if not token.ancestors:
            return None
        if self.any_id(token.ancestors):
            return Unauthenticated("parent_revoked", "a token it was delegated from was revoked")
        if self.any_actor(token):
            return Unauthenticated("revoked", "an identity acting with this token was revoked")
        return None

    def names(self, token_id: str, who: str, task: str | None, issued_at: float) -> bool:
        """Whether a token with these facts is revoked: by id, or by subject or task at or
        after it was issued."""
        if token_id in self.ids or self.covers_subject(who, issued_at):
            return True
        return task is not None and self.covers_task(task, issued_at)

    def covers_subject(self, who: str, issued_at: float) -> bool:
        """Whether a revocation of subject `who` ("issuer|subject") names a token issued then."""
        return self.subjects.get(who, -1.0) >= issued_at

    def covers_task(self, task: str, issued_at: float) -> bool:
        """Whether a revocation of `task` names a token of that task issued then."""
        return self.tasks.get(task, -1.0) >= issued_at

    def prune(self, now: float, longest_ttl: float) -> None:
        """Drop entries that can no longer name a live token."""
        self.ids = _unexpired(self.ids, now)
        horizon = now - longest_ttl - LEEWAY - CLOCK_SKEW
        self.subjects = {k: at for k, at in self.subjects.items() if at > horizon}
        self.tasks = {k: at for k, at in self.tasks.items() if at > horizon}


def index_of(data: Mapping[str, Any], path: str) -> dict[int, int]:
    """The shards' index in the main secret's data: shard -> version. A main secret with
    no index, or one keyproxy does not write, is refused (VaultError), never read as empty."""
    index = data.get(INDEX)
    read: dict[int, int] = {}
    if isinstance(index, dict):
        for shard, version in index.items():
            if not (0 < len(shard) <= 4 and shard.isascii() and shard.isdecimal()):
                break
            if str(int(shard)) != shard or int(shard) >= _LARGEST_SHARD:  # "3", never "03"
                break
            if type(version) is not int or version < 1:
                break
            read[int(shard)] = version
        else:
            return read
    raise VaultError(f"read {path}: not keyproxy's state (the shards' index)")


def main_of(data: Mapping[str, Any], path: str) -> tuple[Revocations, dict[int, int], str]:
    """The main secret's revoked subjects and tasks, its index and the list's name; one
    keyproxy did not write is refused (VaultError), never read as empty."""
    name = data.get(LIST)
    if not (isinstance(name, str) and name) or data.keys() != {LIST, "subjects", "tasks", INDEX}:
        raise VaultError(f"read {path}: not keyproxy's state (the list's main secret)")
    subjects, tasks = _times(data, "subjects", path), _times(data, "tasks", path)
    return Revocations({}, subjects, tasks), index_of(data, path), name


def shard_ids(data: Mapping[str, Any], path: str) -> dict[str, float]:
    """A shard's token ids (id -> expiry); a shard keyproxy did not write is refused."""
    if data.keys() != {"ids"}:
        raise VaultError(f"read {path}: not keyproxy's state (a shard)")
    return _times(data, "ids", path)


def _times(data: Mapping[str, Any], name: str, path: str) -> dict[str, float]:
    entries = data.get(name)
    if isinstance(entries, dict) and all(type(t) in {int, float} for t in entries.values()):
        return {key: float(at) for key, at in entries.items()}
    raise VaultError(f"read {path}: not keyproxy's state ({name})")


def merged_ids(
    data: Mapping[str, Any], added: Mapping[str, float], now: float, path: str
) -> dict[str, Any]:
    """A shard's stored data `data` ({} while it does not exist) with the token ids `added`
    (id -> expiry), pruned."""
    ids = shard_ids(data, path) if data else {}
    for token_id, expires_at in added.items():
        # Whole seconds, rounded up: a shorter entry kept a little longer.
        ids[token_id] = max(math.ceil(expires_at), ids.get(token_id, 0.0))
    return {"ids": _unexpired(ids, now)}


def merged_main(
    data: Mapping[str, Any],
    *,
    subjects: Iterable[str],
    tasks: Iterable[str],
    written: Mapping[int, int],
    now: float,
    longest_ttl: float,
    path: str,
) -> dict[str, Any]:
    """The main secret's stored data `data` ({} while it does not exist: the list is made
    and named) with these subjects and tasks revoked now and the shards `written` (shard ->
    version) raised in the index, pruned. It holds no token ids (they are in the shards)."""
    if data:
        revocations, index, name = main_of(data, path)
    else:
        revocations, index, name = Revocations(), {}, secrets.token_hex(8)
    for subject in subjects:
        revocations.subjects[subject] = now + CLOCK_SKEW
    for task in tasks:
        revocations.tasks[task] = now + CLOCK_SKEW
    revocations.prune(now, longest_ttl)
    for shard, version in written.items():
        if version == index.get(shard):
            # Only the write that made a version names it: this shard was deleted and made
            # afresh, and replicas holding that version would never read it again.
            raise VaultError(f"revocation list shard {shard} is behind its index")
        # The later of the two: another replica's write to the shard may have come after.
        index[shard] = max(version, index.get(shard, 0))
    return {
        LIST: name,
        "subjects": revocations.subjects,
        "tasks": revocations.tasks,
        INDEX: {str(shard): version for shard, version in sorted(index.items())},
    }


def _unexpired(ids: Mapping[str, float], now: float) -> dict[str, float]:
    """The token ids whose tokens may still be live (expiry plus leeway and clock skew)."""
    margin = LEEWAY + CLOCK_SKEW
    return {k: exp for k, exp in ids.items() if exp + margin > now}


@dataclass
class ListCopy:
    """One replica's copy of the list at one place: the main secret as last taken (with its
    index) and the shards, each at the version it was read or written at, with every
    shard's ids in one dict (`ids`), changed as a shard changes: a change costs the size of
    its shard, not of the list (while an earlier build's list still names live tokens, the
    union with it costs the list's size; keyproxy.tokens.revocation)."""

    main: Revocations = field(default_factory=Revocations)
    main_version: int | None = None
    name: str | None = None  # the list's (LIST)
    index: dict[int, int] = field(default_factory=dict)
    shards: dict[int, dict[str, float]] = field(default_factory=dict)
    shard_versions: dict[int, int] = field(default_factory=dict)
    ids: dict[str, float] = field(default_factory=dict)

    def take_main(self, data: Mapping[str, Any], version: int, path: str) -> None:
        """The main secret as read or written at `version` (VaultError if it is not
        keyproxy's: nothing is taken). Another name, or a version below the one held, is a
        list made afresh (deleted and written again): the shards held are dropped with it."""
        main, index, name = main_of(data, path)
        if self.main_version is not None and (name != self.name or version < self.main_version):
            self.forget()
        self.main, self.main_version, self.index, self.name = main, version, index, name

    def forget(self) -> None:
        """Hold nothing: the list was deleted (or made afresh)."""
        self.main, self.main_version, self.index, self.name = Revocations(), None, {}, None
        self.shards, self.shard_versions, self.ids = {}, {}, {}

    def take_shard(self, shard: int, data: Mapping[str, Any], version: int, path: str) -> None:
        """A shard as read or written at `version`, unless a later one is held already
        (VaultError if it is not keyproxy's: nothing is taken)."""
        if version > self.shard_versions.get(shard, 0):
            ids = shard_ids(data, path)
            for gone in self.shards.get(shard, {}).keys() - ids.keys():
                # Gone from a shard only once expired: no other shard can still need it.
                self.ids.pop(gone, None)
            self.ids.update(ids)
            self.shards[shard], self.shard_versions[shard] = ids, version

    def behind(self) -> list[int]:
        """The shards the index names at a version later than the one held."""
        return [s for s, v in sorted(self.index.items()) if self.shard_versions.get(s, 0) < v]

    def revocations(self) -> Revocations:
        """The whole list held: the main secret's entries and every shard's ids (`ids`
        itself, not a copy: it changes with the shards)."""
        return Revocations(self.ids, self.main.subjects, self.main.tasks)
