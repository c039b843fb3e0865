"""Strict reading of a compact JWS's header and payload, shared by every token verifier.

RFC 7515 and RFC 8725 section 3.7 allow only UTF-8 JSON objects there. Python's `json.loads`
is more forgiving than that, and PyJWT parses the segments with it: on bytes it guesses
UTF-16 or UTF-32 from the first bytes, a repeated member name silently keeps the last value,
and `NaN`, `Infinity` and numbers such as `1e400` become floats no issuer meant. Two parsers
that read one token differently are how a checked claim and a used claim come apart, so each
verifier reads the segments here first (with keyproxy.strictjson), refuses what is not
strictly a JSON object in UTF-8, and only then lets PyJWT verify the same bytes. Whatever
passes here PyJWT reads identically:
strict UTF-8 JSON holds no NUL byte, so PyJWT's guess is UTF-8, and no member is repeated.

`compact(token)` is the token's three segments, base64url without padding, or a
`ValueError`. `segment(part)` is the decoded object or a `ValueError` whose message names
what was wrong (never any content). `numeric_date(value)` is a NumericDate (RFC 7519
section 2) an issuer can really have written: a finite number from 1970 to the end of year
9999.
"""

from __future__ import annotations

import binascii
import re
from typing import Any, Final

from jwt.utils import base64url_decode

from keyproxy import strictjson

# 9999-12-31T23:59:59Z: beyond it no date library (nor issuer) writes a time.
MAX_NUMERIC_DATE: Final = 253402300799
_SEGMENT: Final = re.compile(r"[A-Za-z0-9_-]+")


def compact(token: str) -> list[str]:
    """A compact JWS's three segments, or ValueError. Each is base64url without padding
    (RFC 7515 section 2): a decoder that tolerates `=` or other bytes would let one token be
    written many ways, so a check for the token as sent (in a URL, say) would miss another."""
    parts = token.split(".")
    # An empty signature is how an unsecured JWS is written: its `alg` refuses it.
    if len(parts) != 3 or not all(_SEGMENT.fullmatch(part) for part in parts[:2]):
        raise ValueError("not a compact JWS")
    if parts[2] and not _SEGMENT.fullmatch(parts[2]):
        raise ValueError("not a compact JWS")
    return parts


def segment(part: str) -> dict[str, Any]:
    """A base64url header or payload segment as a JSON object, read strictly."""
    try:
        raw = base64url_decode(part.encode("ascii"))
    except (ValueError, binascii.Error):  # UnicodeEncodeError is a ValueError
        raise ValueError("not base64url") from None
    value = strictjson.loads(raw)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")  # noqa: TRY004  # one error for every refusal
    return value


def numeric_date(value: Any) -> float:
    """The value as seconds since the epoch, or ValueError if no real issuer writes it."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("not a number")  # noqa: TRY004  # one error for every refusal
    if not 0 <= value <= MAX_NUMERIC_DATE:  # also false for NaN
        raise ValueError("not a plausible time")
    return float(value)
