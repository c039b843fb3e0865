"""Tests for keyproxy.jws: the strict reading of JWS segments that every verifier shares."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest

from keyproxy import jws


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"sub":"a","aud":["x","y"],"exp":1700000000}', None),
        (b' \n{"a": 1.5, "b": -2e3, "c": null, "d": true}\t', None),
        ('{"name":"Jos\u00e9 \U0001f600"}'.encode(), {"name": "Jos\u00e9 \U0001f600"}),
        (b'{"name":"\\u00e9\\ud83d\\ude00"}', {"name": "\u00e9\U0001f600"}),
        (b'{"a":{"b":[{"c":1},{"c":2}]}}', None),
        (b"{}", {}),
    ],
)
def test_strict_json_objects_are_read(raw: bytes, expected: dict[str, Any] | None) -> None:
    """Plain UTF-8 JSON objects, with escapes, surrogate pairs and nesting, read as json does."""
    assert jws.segment(b64(raw)) == (expected if expected is not None else json.loads(raw))


VALID = '{"iss":"https://issuer.test","sub":"agent","exp":1700000000}'
REFUSED: list[tuple[str, bytes, str]] = [
    ("utf-16-le", VALID.encode("utf-16-le"), "not JSON"),
    ("utf-16-be", VALID.encode("utf-16-be"), "not JSON"),
    ("utf-16-bom", VALID.encode("utf-16"), "not UTF-8"),
    ("utf-32-bom", VALID.encode("utf-32"), "not UTF-8"),
    ("utf-32-le", VALID.encode("utf-32-le"), "not JSON"),
    ("utf-8-bom", VALID.encode("utf-8-sig"), "byte order mark"),
    ("latin-1", '{"sub":"Jos\u00e9"}'.encode("latin-1"), "not UTF-8"),
    ("overlong-utf8", b'{"sub":"\xc0\xaf"}', "not UTF-8"),
    ("encoded-surrogate", b'{"sub":"\xed\xa0\x80"}', "not UTF-8"),
    ("escaped-lone-surrogate", b'{"sub":"\\ud800"}', "lone surrogate"),
    ("escaped-lone-low-surrogate", b'{"sub":"a\\udc00"}', "lone surrogate"),
    ("lone-surrogate-in-name", b'{"\\ud800":1}', "lone surrogate"),
    ("lone-surrogate-in-list", b'{"aud":["ok","\\udfff"]}', "lone surrogate"),
    ("duplicate-sub", b'{"sub":"agent","sub":"admin"}', "repeated"),
    ("duplicate-same-value", b'{"sub":"agent","sub":"agent"}', "repeated"),
    ("duplicate-nested", b'{"ctx":{"a":1,"a":2}}', "repeated"),
    ("duplicate-in-list", b'{"x":[{"a":1,"a":1}]}', "repeated"),
    ("duplicate-alg", b'{"alg":"none","alg":"RS256"}', "repeated"),
    ("nan", b'{"exp":NaN}', "NaN"),
    ("infinity", b'{"exp":Infinity}', "Infinity"),
    ("minus-infinity", b'{"exp":-Infinity}', "Infinity"),
    ("overflow", b'{"exp":1e400}', "out of range"),
    ("negative-overflow", b'{"exp":-1e400}', "out of range"),
    ("list", b"[1]", "not a JSON object"),
    ("string", b'"x"', "not a JSON object"),
    ("trailing-data", b'{"a":1}{"a":2}', "not JSON"),
    ("trailing-comma", b'{"a":1,}', "not JSON"),
    ("control-character", b'{"a":"x\x01"}', "not JSON"),
    ("deep", b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "nested too deeply"),
]


@pytest.mark.parametrize(("raw", "why"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_anything_else_is_refused(raw: bytes, why: str) -> None:
    """Every way a segment can stray from a strict UTF-8 JSON object is a ValueError saying
    which, holding none of the content."""
    with pytest.raises(ValueError, match=why) as caught:
        jws.segment(b64(raw))
    assert "agent" not in str(caught.value)
    assert "admin" not in str(caught.value)


@pytest.mark.parametrize("part", ["***", "\u00e9", "a.b"])
def test_not_base64url_is_refused(part: str) -> None:
    """A segment that is not base64url text is refused."""
    with pytest.raises(ValueError, match="not"):
        jws.segment(part)


@pytest.mark.parametrize(
    "token",
    [
        "eyJh.eyJz.c2ln=",  # padding
        "eyJh.eyJz==.c2ln",
        "eyJh.eyJz.c2l+",  # base64, not base64url
        "eyJh.eyJz.c2l/",
        ".eyJz.c2ln",  # no header
        "eyJh..c2ln",
        "eyJh.eyJz",
        "eyJh.eyJz.c2ln.eHg",
        " eyJh.eyJz.c2ln",
        "eyJh.eyJz.c2ln\n",
    ],
)
def test_a_token_written_any_other_way_than_compact_base64url_is_refused(token: str) -> None:
    """Padding, base64's own letters, a missing, empty or extra segment: one token has one
    spelling, so a check for it as sent (in a URL, say) cannot miss another."""
    with pytest.raises(ValueError, match="not a compact JWS"):
        jws.compact(token)
    assert jws.compact("eyJh.eyJz.c2ln") == ["eyJh", "eyJz", "c2ln"]
    assert jws.compact("eyJh.eyJz.") == ["eyJh", "eyJz", ""]  # unsecured: its alg refuses it


@pytest.mark.parametrize(
    ("raw", "sub"), [(VALID.encode("utf-16"), "agent"), (b'{"sub":"agent","sub":"admin"}', "admin")]
)
def test_what_is_refused_here_pyjwt_alone_accepts(raw: bytes, sub: str) -> None:
    """Why the strict read comes first: PyJWT by itself accepts these validly signed
    payloads, guessing UTF-16 and keeping the last of two names."""
    key = "k" * 32
    signing_input = f"{b64(json.dumps({'alg': 'HS256'}).encode())}.{b64(raw)}"
    signature = hmac.new(key.encode(), signing_input.encode(), hashlib.sha256).digest()
    token = f"{signing_input}.{b64(signature)}"
    decoded = jwt.decode(token, key, algorithms=["HS256"], options={"verify_exp": False})
    assert decoded["sub"] == sub
    with pytest.raises(ValueError, match=r"not UTF-8|repeated"):
        jws.segment(token.split(".")[1])


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, 0.0), (1_700_000_000, 1.7e9), (1.7e9 + 0.5, 1.7e9 + 0.5), (253402300799, 253402300799.0)],
)
def test_numeric_dates_from_1970_to_9999(value: float, expected: float) -> None:
    """Times any issuer writes are read as floats."""
    assert jws.numeric_date(value) == expected


@pytest.mark.parametrize(
    "value",
    [-1, -0.5, 253402300800, 1e20, 10**30, float("nan"), float("inf"), True, "1700000000", None],
)
def test_numeric_dates_no_issuer_writes_are_refused(value: Any) -> None:
    """Negative times, times after year 9999, non-numbers and booleans are refused."""
    with pytest.raises(ValueError, match="not a"):
        jws.numeric_date(value)
