"""Workload identity: verify OIDC JWTs from configured issuers (skeleton; see below)."""

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
