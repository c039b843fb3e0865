"""`keyproxy` subcommands for tokens (registered by keyproxy.cli)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    """Add this module's subcommands to the `keyproxy` parser's subparsers."""
    del sub


__all__ = ["argparse", "register"]
