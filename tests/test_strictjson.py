"""keyproxy.strictjson: one strict reading of JSON, for tokens and MCP messages alike."""

from __future__ import annotations

import pytest

from keyproxy import strictjson

ACCEPTED = [
    (b'{"a":1,"b":[1,2.5,"x"]}', {"a": 1, "b": [1, 2.5, "x"]}),
    (b'"\\ud83d\\ude00"', "\U0001f600"),  # an escaped surrogate pair is one character
    (b"[]", []),
    ('{"n":"Jos\u00e9"}'.encode(), {"n": "Jos\u00e9"}),
]

REFUSED = [
    ('{"a":1}'.encode("utf-16"), "not UTF-8"),
    ('{"a":1}'.encode("utf-8-sig"), "byte order mark"),
    (b'{"a":1,"a":1}', "given twice"),
    (b'[{"x":{"a":1,"a":2}}]', "given twice"),
    (b'{"a":NaN}', "NaN is not JSON"),
    (b'{"a":-Infinity}', "Infinity is not JSON"),
    (b'{"a":1e400}', "out of range"),
    (b'"\\udc00"', "lone surrogate"),
    (b'{"\\ud800":1}', "lone surrogate"),
    (b'{"a":1} x', "not JSON"),
    (b"", "not JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
]


@pytest.mark.parametrize(("data", "value"), ACCEPTED)
def test_strict_json_reads_as_json_does(data: bytes, value: object) -> None:
    """Plain UTF-8 JSON reads as the standard library reads it."""
    assert strictjson.loads(data) == value


@pytest.mark.parametrize(("data", "why"), REFUSED)
def test_what_another_reader_could_read_differently_is_refused(data: bytes, why: str) -> None:
    """Other encodings, a BOM, repeated member names at any depth, NaN/Infinity, numbers
    beyond a float, lone surrogates, trailing data and deep nesting are each a ValueError
    saying which, quoting no value."""
    with pytest.raises(ValueError, match=why) as caught:
        strictjson.loads(data)
    assert "1e400" not in str(caught.value)


@pytest.mark.parametrize("value", [v for _, v in ACCEPTED] + [{"ids": {"é-𝄞": 1765103424}}])
def test_what_is_written_reads_back(value: object) -> None:
    """`dumps` writes text that `loads` reads back as the same value (non-ASCII as is)."""
    assert strictjson.loads(strictjson.dumps(value).encode()) == value


@pytest.mark.parametrize("value", [{"task": "build-\udcff"}, ["\ud800"], {"n": float("nan")}])
def test_what_would_not_read_back_is_not_written(value: object) -> None:
    """A lone surrogate (undecodable bytes as Python keeps them) or NaN is a ValueError, not
    a text `loads` would refuse."""
    with pytest.raises(ValueError, match=r"Unicode|JSON compliant"):
        strictjson.dumps(value)


def test_loads_text_reads_as_loads_but_keeps_lone_surrogates() -> None:
    """A decoded text (a log line) is read as strictly as bytes, but a lone surrogate, which
    a reader can escape on its way out, is kept rather than the whole value refused."""
    assert strictjson.loads_text('{"a":"\\udc9b"}') == {"a": "\udc9b"}
    for text in ('{"a":1,"a":2}', '{"a":NaN}', '{"a":1e400}', "[" * 100_000):
        with pytest.raises(ValueError, match=r"given twice|not JSON|out of range|too deep"):
            strictjson.loads_text(text)
