"""Path normalisation: decoded once, ambiguous paths refused, re-encoded exactly (invariant 5)."""

from __future__ import annotations

import random

import pytest

from keyproxy.errors import BadRequest
from keyproxy.paths import encode, normalise, normalise_encoded


@pytest.mark.parametrize(
    ("raw", "segments"),
    [
        ("", ()),
        ("/", ()),
        ("/v1/chat/completions", ("v1", "chat", "completions")),
        ("/v1/", ("v1", "")),
        ("/v1/models/", ("v1", "models", "")),
        (
            "/v1beta/models/gemini-pro:generateContent",
            ("v1beta", "models", "gemini-pro:generateContent"),
        ),
        ("/a%20b", ("a b",)),
        ("/%41%42c", ("ABc",)),
        ("/%e2%82%ac", ("\u20ac",)),
        ("/%E2%82%AC", ("\u20ac",)),
        ("/caf%C3%A9", ("caf\u00e9",)),
        ("/a%3Fb%23c", ("a?b#c",)),
        ("/a%25", ("a%",)),
        ("/a%25zz", ("a%zz",)),
        ("/100%25x", ("100%x",)),
        ("/.well-known/x", (".well-known", "x")),
        ("/a.b/..c/c..", ("a.b", "..c", "c..")),
        ("/v1;v=2/x", ("v1;v=2", "x")),
        ("/user@host/~me", ("user@host", "~me")),
        ("/!$&'()*+,;=", ("!$&'()*+,;=",)),
        ("/a+b", ("a+b",)),
        ("/%2B", ("+",)),
    ],
)
def test_normalise_decodes_segments(raw: str, segments: tuple[str, ...]) -> None:
    """A well-formed path decodes into its segments; root is (), a trailing slash gives ""."""
    assert normalise(raw) == segments


@pytest.mark.parametrize(
    "raw",
    [
        # not a path
        "v1/chat",
        "*",
        "%2F",
        # dot segments, raw, encoded, mixed case, and look-alikes an upstream might fold
        "/.",
        "/..",
        "/v1/../admin",
        "/v1/./admin",
        "/v1/..",
        "/v1/.",
        "/%2e%2e/admin",
        "/%2E%2E",
        "/.%2E/admin",
        "/%2e./admin",
        "/%2e",
        "/...",
        "/v1/..;/admin",
        "/v1/.;x/admin",
        "/v1/;x/admin",
        "/v1/%2e%2e%3b/admin",
        "/%EF%BC%8E%EF%BC%8E/admin",
        # encoded or literal slash and backslash
        "/v1%2fadmin",
        "/v1%2Fadmin",
        "/v1%5cadmin",
        "/v1%5Cadmin",
        "/v1\\admin",
        "/..\\admin",
        "/a%EF%BC%8Fb",
        "/a%EF%BC%BCb",
        # control characters, raw and encoded
        "/a%00b",
        "/a\x00b",
        "/a%0Ab",
        "/a%0db",
        "/a\nb",
        "/a\tb",
        "/a%09b",
        "/a%7Fb",
        "/a%7fb",
        "/a\x7fb",
        "/a%C2%85b",
        # empty segments
        "//",
        "//v1",
        "/v1//chat",
        "/v1//",
        # invalid percent-encoding
        "/%zz",
        "/%4",
        "/a%",
        "/a%g0",
        "/%%41",
        # double encoding that decodes to an escape
        "/%252e%252e/admin",
        "/%252F",
        "/a%2541",
        "/%25%32%65",
        # not UTF-8 after decoding (incl. overlong "." and a lone surrogate)
        "/%ff",
        "/%C3",
        "/%c0%ae%c0%ae/admin",
        "/%ED%A0%80",
        # characters that must be percent-encoded on the wire
        "/a b",
        "/a?b",
        "/a#b",
        '/a"b',
        "/a<b>",
        "/a|b",
        "/a{b}",
        "/caf\u00e9",
    ],
)
def test_normalise_refuses_ambiguous_paths(raw: str) -> None:
    """Every path an upstream could read differently is refused with bad_path, not repaired."""
    with pytest.raises(BadRequest) as caught:
        normalise(raw)
    assert caught.value.reason == "bad_path"
    assert caught.value.status == 400


@pytest.mark.parametrize(
    ("segments", "path"),
    [
        ((), "/"),
        (("v1", "chat", "completions"), "/v1/chat/completions"),
        (("v1", ""), "/v1/"),
        (("a b",), "/a%20b"),
        (("a?b#c",), "/a%3Fb%23c"),
        (("100%",), "/100%25"),
        (("a%zz",), "/a%25zz"),
        (("\u20ac",), "/%E2%82%AC"),
        (("models", "gemini-pro:generateContent"), "/models/gemini-pro:generateContent"),
        (("!$&'()*+,;=:@-._~",), "/!$&'()*+,;=:@-._~"),
        (('"<>^`{|}',), "/%22%3C%3E%5E%60%7B%7C%7D"),
        ((".well-known",), "/.well-known"),
    ],
)
def test_encode_percent_encodes_outside_pchar(segments: tuple[str, ...], path: str) -> None:
    """Segments become a path with everything outside RFC 3986 pchar percent-encoded."""
    assert encode(segments) == path


@pytest.mark.parametrize(
    "segments",
    [
        ("",),
        ("a", "", "b"),
        ("..",),
        (".",),
        ("a/b",),
        ("a\\b",),
        ("a\x00b",),
        ("%2e",),
        ("..;x",),
    ],
)
def test_encode_refuses_what_normalise_never_produces(segments: tuple[str, ...]) -> None:
    """encode raises ValueError rather than send a path that would not re-normalise the same."""
    with pytest.raises(ValueError, match="normalise"):
        encode(segments)


TRICKY = [
    "",
    "/",
    "/v1/",
    "/v1/chat/completions",
    "/%41%42%43",
    "/a%20b/c%2Bd",
    "/%7E%2D%2E%5F",
    "/%3A%40%21%24%26%27%28%29%2A%2B%2C%3B%3D",
    "/:@!$&'()*+,;=",
    "/%25",
    "/%25zz/%25",
    "/%3F%23",
    "/%E2%82%AC/%F0%9F%94%91",
    "/%C3%A9t%C3%A9/",
    "/...x/x.../.x./",
    "/%2e%2e%2ex",
    "/a;b=c/d;e",
    "/%22%3C%3E%5E%60%7B%7C%7D",
    "/%e2%80%ae/%ef%bb%bf",
]


@pytest.mark.parametrize("raw", TRICKY)
def test_encode_round_trips_through_normalise(raw: str) -> None:
    """encode(normalise(p)) re-normalises to the same segments and is itself a fixed point."""
    segments = normalise(raw)
    path = encode(segments)
    assert normalise(path) == segments
    assert encode(normalise(path)) == path


def _both(raw: str) -> tuple[tuple[str, ...], str] | str:
    try:
        segments = normalise(raw)
    except BadRequest as exc:
        return exc.reason
    return segments, encode(segments)


def _fast(raw: str) -> tuple[tuple[str, ...], str] | str:
    try:
        return normalise_encoded(raw)
    except BadRequest as exc:
        return exc.reason


@pytest.mark.parametrize(
    "raw",
    [*TRICKY, "", "/", "//", "/a//b", "/.", "/..", "/a/./b", "/;x", "/..;x", "/a/", "a/b"],
)
def test_fast_path_agrees_with_normalise_and_encode(raw: str) -> None:
    """normalise_encoded gives exactly what normalise then encode give, refusals included."""
    assert _fast(raw) == _both(raw)


def test_fast_path_agrees_on_random_paths() -> None:
    """The same on 20,000 random paths built from the characters that matter."""
    rng = random.Random(20261128)  # fixed: a failure is reproducible
    alphabet = [
        "/",
        "/",
        ".",
        ".",
        ";",
        "%",
        "2",
        "e",
        "F",
        "a",
        "-",
        "~",
        "\\",
        " ",
        "\u00e9",
        "\uff0e",
    ]
    for _ in range(20_000):
        raw = "/" + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        assert _fast(raw) == _both(raw), raw
