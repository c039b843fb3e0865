"""Injection renders each kind once per key version; the scrubber never lets a key through."""

from __future__ import annotations

import base64
import random

import pytest

from keyproxy.config import Injection, Route, SecretRef, Upstream
from keyproxy.inject import Injector, Scrubber, scrub_text
from keyproxy.secret import REDACTED, Secret

KEY = "sk-test/key+value=0123456789"


def _route(*inject: Injection) -> Route:
    return Route(
        name="r",
        upstream=Upstream("https", "api.example.com", 443, ""),
        secret=SecretRef("secret", "k", "api_key"),
        inject=inject,
    )


def test_header_query_and_basic_render() -> None:
    """Each injection kind produces its header or parameter with the key in place."""
    injector = Injector(
        _route(
            Injection("header", "X-Api-Key", "{key}"),
            Injection("query", "key", "{key}"),
            Injection("basic", "Authorization", "{key}", "api"),
        )
    )
    rendered = injector.render(Secret(KEY), 3)
    basic = base64.b64encode(f"api:{KEY}".encode()).decode()
    assert rendered.headers == (("X-Api-Key", KEY), ("Authorization", f"Basic {basic}"))
    assert rendered.query == "key=sk-test%2Fkey%2Bvalue%3D0123456789"
    assert {
        KEY,
        basic,
        "sk-test%2Fkey%2Bvalue%3D0123456789",
        "sk-test\\/key+value=0123456789",
    } <= set(rendered.forms)
    assert KEY not in repr(rendered)
    assert injector.header_names == {"x-api-key", "authorization"}


def test_render_is_cached_per_version() -> None:
    """The same version returns the same object; a new version renders again."""
    injector = Injector(_route(Injection("header", "Authorization", "Bearer {key}")))
    first = injector.render(Secret(KEY), 1)
    assert injector.render(Secret(KEY), 1) is first
    assert injector.render(Secret(KEY + "x"), 2).headers == (("Authorization", f"Bearer {KEY}x"),)


def _scrub_all(chunks: list[bytes], forms: tuple[str, ...]) -> bytes:
    scrubber = Scrubber(f.encode() for f in forms)
    out = b"".join(scrubber.feed(c) for c in chunks)
    return out + scrubber.flush()


@pytest.mark.parametrize("split", range(1, len(KEY) + 4))
def test_key_split_at_every_position_is_replaced(split: int) -> None:
    """A key split across two chunks at any offset is still replaced."""
    body = f"data: {{'echo': '{KEY}'}}\n\n".encode()
    cut = body.index(KEY.encode()) + split - 2
    out = _scrub_all([body[:cut], body[cut:]], (KEY,))
    assert KEY.encode() not in out
    assert out == body.replace(KEY.encode(), REDACTED.encode())


def test_key_dribbled_one_byte_at_a_time() -> None:
    """Even one byte per chunk, every form is replaced and nothing else changes."""
    basic = base64.b64encode(f"u:{KEY}".encode()).decode()
    body = f"a {KEY} b {basic} c {KEY[:5]} d".encode()
    out = _scrub_all([bytes([b]) for b in body], (basic, KEY))
    assert out == f"a {REDACTED} b {REDACTED} c {KEY[:5]} d".encode()


def test_random_chunking_never_leaks() -> None:
    """Random chunk boundaries over many echoes leave no key and keep the rest intact."""
    rng = random.Random(7)
    body = (b"x" * 13 + KEY.encode() + b"\n") * 50
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(body)), 30))
        chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        assert _scrub_all(chunks, (KEY,)) == body.replace(KEY.encode(), REDACTED.encode())


def test_event_end_is_not_held_back() -> None:
    """An SSE event that ends in text that cannot start a key is sent whole, at once."""
    scrubber = Scrubber((KEY.encode(),))
    event = b'data: {"delta": "hello"}\n\n'
    assert scrubber.feed(event) == event
    # Only a possible key prefix is held back, and released at the end of the body.
    assert scrubber.feed(b"data: sk-te") == b"data: "
    assert scrubber.flush() == b"sk-te"


def test_scrub_text_for_headers() -> None:
    """Header values have every form replaced."""
    assert scrub_text(f"https://x/?k={KEY}", (KEY,)) == f"https://x/?k={REDACTED}"
