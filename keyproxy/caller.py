"""Who is calling, once verified: the `Identity` that policy, scopes and tokens reason about.

keyproxy.identity produces it from a workload-identity JWT (I/O: keys are fetched); the pure
core (policy, scope) reads it, so it lives below both. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Identity:
    """A verified caller: the issuer's configured name, the token subject, and its claims."""

    issuer: str
    subject: str
    claims: Mapping[str, Any] = field(default_factory=dict)
