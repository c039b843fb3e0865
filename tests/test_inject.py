"""Injection renders each kind once per key version; the scrubber never lets a key through."""

from __future__ import annotations

import base64
import random
from collections.abc import Iterable
from urllib.parse import quote

import pytest

from keyproxy.config import Injection, Route, SecretRef, Upstream
from keyproxy.errors import BadRequest
from keyproxy.inject import (
    NAME_DECODINGS,
    Injector,
    Rendered,
    Scrubber,
    holds_any,
    read_as,
    scrub_bytes,
    scrub_text,
)
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


def _scrub_all(chunks: list[bytes], forms: Iterable[str] | Iterable[bytes]) -> bytes:
    scrubber = Scrubber(f if isinstance(f, bytes) else f.encode() for f in forms)
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


# ------------------------------------------------------------------------- key fragments

# A key shaped like the one of the report: its first 8 characters are no fixed prefix.
FRAGMENT_KEY = "skJa6H7Qx9Lm2Np4Rs6Tu8Vw0Yz3Ab5Cd7Ef+Gh/Ij=BjJp"


def _rendered(*inject: Injection, key: str = FRAGMENT_KEY) -> Rendered:
    return Injector(_route(*inject)).render(Secret(key), 1)


BEARER = Injection("header", "Authorization", "Bearer {key}")


def _fragment_cases(key: str) -> list[tuple[str, str]]:
    """Texts quoting runs of `key`, and what each must become."""
    return [
        (  # the upstream answer of the report: first 8, stars, last 4
            f"Incorrect API key provided: {key[:8]}****...{key[-4:]}",
            f"Incorrect API key provided: {REDACTED}****...{key[-4:]}",
        ),
        (f"key {key[:8]} refused", f"key {REDACTED} refused"),  # first 8 alone
        (f"ends in {key[-8:]}.", f"ends in {REDACTED}."),  # last 8
        (f"middle <{key[17:25]}>", f"middle <{REDACTED}>"),  # a middle 8
        (f"longer {key[5:30]}!", f"longer {REDACTED}!"),  # a longer run
        (f"short {key[:7]} {key[9:16]} {key[-7:]}", f"short {key[:7]} {key[9:16]} {key[-7:]}"),
        (f"{key[:8]}{key[-8:]}", REDACTED),  # two runs touching: one stretch
        (f"{key[:8]} {key[-8:]}", f"{REDACTED} {REDACTED}"),
        (f"whole {key} and {key[:10]}", f"whole {REDACTED} and {REDACTED}"),
    ]


@pytest.mark.parametrize(("text", "want"), _fragment_cases(FRAGMENT_KEY))
def test_runs_of_eight_characters_of_the_key_are_redacted(text: str, want: str) -> None:
    """Any run of 8 or more consecutive characters of the injected key is redacted in a body,
    a streamed body and a header value; 7 are not, and the text around stays as it was."""
    rendered = _rendered(BEARER)
    assert scrub_bytes(text.encode(), rendered.byte_forms) == want.encode()
    assert _scrub_all([text.encode()], rendered.byte_forms) == want.encode()
    assert scrub_text(text, rendered.forms) == want
    assert holds_any(text, rendered.forms) is (want != text)


def test_fragments_of_each_encoding_of_the_key_are_redacted() -> None:
    """Runs of 8 of the percent-encoded (upper and lower hex), JSON-escaped and basic-auth
    forms of a key are fragments too, each where only that form holds them."""
    rendered = _rendered(
        Injection("query", "key", "{key}"), Injection("basic", "Authorization", "{key}", "api")
    )
    token = base64.b64encode(f"api:{FRAGMENT_KEY}".encode()).decode()
    percent = quote(FRAGMENT_KEY, safe="")
    lower = percent.replace("%2B", "%2b").replace("%2F", "%2f").replace("%3D", "%3d")
    escaped = FRAGMENT_KEY.replace("/", "\\/")
    cuts = [
        percent[percent.index("%2B") - 3 :][:8],  # "...%2BGh": only the encoded form has it
        lower[lower.index("%2f") - 2 :][:9],
        escaped[escaped.index("\\/") - 4 :][:8],
        token[:8],
        token[20:28],
        token[-8:],
    ]
    for cut in cuts:
        assert cut not in FRAGMENT_KEY
        body = f'{{"seen": "{cut}"}}'
        assert (
            scrub_bytes(body.encode(), rendered.byte_forms) == f'{{"seen": "{REDACTED}"}}'.encode()
        )
        assert scrub_text(body, rendered.forms) == f'{{"seen": "{REDACTED}"}}'
        assert scrub_bytes(cut[:7].encode(), rendered.byte_forms) == cut[:7].encode()


def test_the_text_of_a_format_is_no_fragment() -> None:
    """`Bearer {key}` does not make "Bearer s..." a fragment, nor a query format's literal
    text; a whole query form is still replaced whole, its text included."""
    rendered = _rendered(BEARER, Injection("query", "k", "token {key}"))
    for text in ("Bearer skJa6H7 is how to send it", "use token%20skJ", "token+skJa6H7"):
        assert scrub_text(text, rendered.forms) == text
        assert scrub_bytes(text.encode(), rendered.byte_forms) == text.encode()
    whole = quote(f"token {FRAGMENT_KEY}", safe="")
    assert scrub_text(f"url ?k={whole}&x", rendered.forms) == f"url ?k={REDACTED}&x"
    out = _scrub_all(
        [c.encode() for c in (f"?k={whole[:5]}", whole[5:], "&x")], rendered.byte_forms
    )
    assert out == f"?k={REDACTED}&x".encode()


def test_a_basic_auth_username_is_no_fragment() -> None:
    """Runs of a basic-auth token that only encode its username are left; the token whole,
    and runs that encode some of the key, are redacted."""
    rendered = _rendered(Injection("basic", "Authorization", "{key}", "service-account"))
    token = base64.b64encode(f"service-account:{FRAGMENT_KEY}".encode()).decode()
    username_only = base64.b64encode(b"service-acco").decode()  # 16 digits, 12 bytes of name
    assert token.startswith(username_only)
    assert scrub_text(f"[{username_only}]", rendered.forms) == f"[{username_only}]"
    assert scrub_text(f"[{token}]", rendered.forms) == f"[{REDACTED}]"
    assert scrub_text(f"[{token[24:40]}]", rendered.forms) == f"[{REDACTED}]"


def test_a_fixed_key_prefix_alone_is_redacted() -> None:
    """A key with a fixed prefix of 8 or more characters (OpenAI's `sk-proj-`) has that prefix
    redacted wherever it appears: it is a run of the key like any other (documented)."""
    key = "sk-proj-" + FRAGMENT_KEY
    rendered = _rendered(BEARER, key=key)
    assert (
        scrub_text("keys look like sk-proj-...", rendered.forms) == f"keys look like {REDACTED}..."
    )
    assert scrub_text("keys look like sk-proj...", rendered.forms) == "keys look like sk-proj..."


def _chunked(body: bytes, cuts: list[int]) -> list[bytes]:
    return [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]


def test_a_fragment_split_across_two_or_three_chunks_at_every_offset() -> None:
    """The message of the report, cut into two chunks at every offset and into three at every
    pair of offsets, comes out as it does whole."""
    rendered = _rendered(BEARER)
    text, want = _fragment_cases(FRAGMENT_KEY)[0]
    body, expected = f"data: {text}\n\n".encode(), f"data: {want}\n\n".encode()
    for a in range(len(body) + 1):
        assert _scrub_all(_chunked(body, [a]), rendered.byte_forms) == expected, a
        for b in range(a, len(body) + 1):
            assert _scrub_all(_chunked(body, [a, b]), rendered.byte_forms) == expected, (a, b)


def test_random_chunkings_of_fragments_equal_the_whole_body() -> None:
    """Seeded random chunkings, from two chunks to one byte each, of bodies quoting runs of
    every length of every form give exactly the whole body's result."""
    rng = random.Random(13)
    rendered = _rendered(
        BEARER, Injection("query", "k", "{key}"), Injection("basic", "Authorization", "{key}", "u")
    )
    forms = [f.encode() for f in rendered.forms]
    for _ in range(300):
        pieces = []
        for _ in range(rng.randint(1, 8)):
            form = rng.choice(forms)
            start = rng.randrange(len(form))
            pieces += [form[start : start + rng.randint(1, 24)], rng.choice([b" ", b"**", b"\n\n"])]
        body = b"".join(pieces)
        whole = scrub_bytes(body, rendered.byte_forms)
        windows = {s[i : i + 8] for s in rendered.sources for i in range(len(s) - 7)}
        assert not any(w.encode() in whole for w in windows)
        count = rng.choice([1, 2, 5, len(body) - 1])
        cuts = sorted(rng.sample(range(1, len(body)), min(count, len(body) - 1)))
        assert _scrub_all(_chunked(body, cuts), rendered.byte_forms) == whole


def test_a_stream_holds_back_at_most_seven_bytes_of_a_fragment() -> None:
    """Streamed, a fragment's first 7 bytes wait for the next chunk; at 8 the `[REDACTED]`
    goes out at once, and what continues the same run is dropped, not marked again."""
    scrubber = Scrubber(_rendered(BEARER).byte_forms)
    assert scrubber.feed(f"error: {FRAGMENT_KEY[:7]}".encode()) == b"error: "
    assert scrubber.feed(FRAGMENT_KEY[7:8].encode()) == REDACTED.encode()
    for char in FRAGMENT_KEY[8:30]:
        assert scrubber.feed(char.encode()) == b""
    assert scrubber.feed(b"\n\n") == b"\n\n"
    assert scrubber.feed(b'data: {"delta": "hello"}\n\n') == b'data: {"delta": "hello"}\n\n'
    assert scrubber.feed(FRAGMENT_KEY[:5].encode()) == b""
    assert scrubber.flush() == FRAGMENT_KEY[:5].encode()


def test_a_name_is_decoded_as_often_as_servers_do_and_no_more() -> None:
    """A parameter name is read through NAME_DECODINGS decodings (a server behind gateways
    that each decode it); one still escaped after them is a 400 ambiguous_query, read in
    time linear in its length however deep its escapes go."""
    assert read_as("api%25255Fkey") == read_as("API_KEY") == "apikey"
    deeper = "api%" + "25" * NAME_DECODINGS + "5Fkey"
    for name in (deeper, "%" + "25" * 4000 + "41"):
        with pytest.raises(BadRequest) as refused:
            read_as(name)
        assert refused.value.reason == "ambiguous_query"
