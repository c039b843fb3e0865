"""Put a route's key into the upstream request, and keep it out of the response.

`Injector` is compiled once per route. `render(key)` returns the headers and query parameters
to add, and every form of the key that went on the wire (the raw key, its URL-encoded and
JSON-escaped spellings, the basic-auth base64) so the scrubbers can find them again if the
upstream echoes one back. Rendering is cached per key version: the hot path formats nothing.

`scrub_bytes`, `scrub_text` and the streaming `Scrubber` replace those forms, and any run of 8
or more consecutive characters of the key's own encodings (a *fragment*: an error message that
quotes the key's first 8 characters), by `[REDACTED]` (see keyproxy.fragments for the exact
rule and how it is found at C speed). `Scrubber` catches a form or fragment split across
chunks, and holds back only an end that could still become one, so an SSE event whose end
cannot reaches the caller at once.

The text of an injection's `format` is no fragment source (`Bearer {key}` must not make every
"Bearer s" in an answer a fragment), but a key's own fixed prefix is: a key that starts with
the same 8 or more characters as every key of its vendor (OpenAI's `sk-proj-`) has them
redacted wherever an answer mentions them.
"""

from __future__ import annotations

import base64
import functools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import quote, quote_plus, unquote_plus

from keyproxy import secret
from keyproxy.config import Injection, Route
from keyproxy.errors import BadRequest
from keyproxy.fragments import FRAGMENT, Matcher, Stream, encode, redacted
from keyproxy.secret import REDACTED, Secret

_REDACTED_BYTES = REDACTED.encode()


class Forms(tuple[str, ...]):
    """A key version's forms, longest first, carrying the matcher compiled for them (so the
    scrubbers take the same arguments as a plain tuple of forms, and compile nothing)."""

    matcher: Matcher

    def __new__(cls, forms: Iterable[str], matcher: Matcher) -> Forms:
        self = super().__new__(cls, forms)
        self.matcher = matcher
        return self


class ByteForms(tuple[bytes, ...]):
    """The same forms UTF-8 encoded, for response bodies, with the same matcher."""

    matcher: Matcher

    def __new__(cls, forms: Iterable[bytes], matcher: Matcher) -> ByteForms:
        self = super().__new__(cls, forms)
        self.matcher = matcher
        return self


@dataclass(frozen=True)
class Rendered:
    """What one key version puts into a request. Holds secret values: never log it."""

    version: int
    headers: tuple[tuple[str, str], ...]
    query: str  # encoded `name=value&...`, exactly as sent upstream
    # Longest first. `render` makes them `Forms` and `ByteForms`, which carry their matcher;
    # plain tuples (as a test may build) are compiled on first use.
    forms: tuple[str, ...]
    byte_forms: tuple[bytes, ...]  # the same, UTF-8 encoded, for response bodies
    # The key's own encodings (and the key-bearing parts of a basic-auth token): the values
    # the log scrubber redacts, whole or as fragments. Not a query `format`'s text around it.
    sources: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"Rendered(version={self.version}, {REDACTED})"


class Injector:
    """The compiled injections of one route."""

    def __init__(self, route: Route) -> None:
        self.injections = route.inject
        # Header names the caller must never set itself: it could override what we inject.
        self.header_names = frozenset(i.name.lower() for i in route.inject if i.kind != "query")
        # Each injected query parameter's name as any server may read it (`read_as`).
        self.query_names = frozenset(read_as(i.name) for i in route.inject if i.kind == "query")
        self._cached: Rendered | None = None

    def render(self, key: Secret, version: int) -> Rendered:
        # Remembered per key version: rendering compiles the fragment matcher, 1.8 million
        # instructions per request without this (3.2x, bench/instructions.py --compare).
        cached = self._cached
        if cached is not None and cached.version == version:
            return cached
        rendered = _render(self.injections, key.reveal(), version)
        secret.register(*rendered.sources)
        self._cached = rendered
        return rendered


def _render(injections: Sequence[Injection], key: str, version: int) -> Rendered:
    headers: list[tuple[str, str]] = []
    query: list[str] = []
    # Spellings an upstream might echo: JSON-escaped (some encoders also escape "/"), and
    # the ways a URL may carry it. These are the key's own encodings: fragment sources.
    escaped = json.dumps(key)[1:-1]
    sources = {key, escaped, escaped.replace("/", "\\/"), *_url_forms(key)}
    forms = set(sources)
    for inj in injections:
        value = inj.format.replace("{key}", key)
        if inj.kind == "header":
            headers.append((inj.name, value))
        elif inj.kind == "query":
            query.append(f"{quote(inj.name, safe='')}={quote(value, safe='')}")
            # Replaced whole; percent-encoding is per character, so the key's own forms
            # above are inside these and their fragments are found there too.
            forms.update(_url_forms(value))
        else:
            plain = f"{inj.username}:{value}".encode()
            token = base64.b64encode(plain).decode()
            headers.append(("Authorization", f"Basic {token}"))
            forms.add(token)
            sources.update(_base64_key_runs(token, plain, key.encode()))
    # Longest first, so a form that contains another is replaced whole.
    ordered = tuple(sorted(forms, key=len, reverse=True))
    encoded = tuple(encode(f) for f in ordered)
    matcher = Matcher((encode(s) for s in sources), encoded)
    return Rendered(
        version,
        tuple(headers),
        "&".join(query),
        Forms(ordered, matcher),
        ByteForms(encoded, matcher),
        tuple(sorted(sources, key=len, reverse=True)),
    )


def _base64_key_runs(token: str, plain: bytes, key: bytes) -> list[str]:
    """The parts of a base64 `token` (of `plain`) whose windows encode some byte of `key`:
    a window that only encodes the username or the format's text is no fragment."""
    spans = []
    at = plain.find(key)
    while at != -1:
        spans.append((at, at + len(key)))
        at = plain.find(key, at + 1)

    def carries_key(i: int) -> bool:  # base64 digit i encodes bits 6i .. 6i + 5
        first, last = 6 * i // 8, (6 * (i + FRAGMENT) - 1) // 8
        return any(first < end and last >= start for start, end in spans)

    runs: list[str] = []
    kept = [i for i in range(len(token) - FRAGMENT + 1) if carries_key(i)]
    begin = None
    for n, i in enumerate(kept):
        if begin is None:
            begin = i
        if n + 1 == len(kept) or kept[n + 1] != i + 1:
            runs.append(token[begin : i + FRAGMENT])
            begin = None
    return runs


def _url_forms(value: str) -> set[str]:
    """Percent-encodings of `value` an upstream might echo: strict, path-style, form-style,
    each with upper- and lower-case hex digits."""
    forms = {quote(value, safe=""), quote(value, safe="/"), quote_plus(value)}
    return forms | {_lower_hex(f) for f in forms}


def _lower_hex(encoded: str) -> str:
    parts = encoded.split("%")
    return parts[0] + "".join("%" + p[:2].lower() + p[2:] for p in parts[1:])


@functools.lru_cache(maxsize=256)
def _compiled(forms: tuple[bytes, ...]) -> Matcher:
    """The matcher of forms given as a plain collection: each of them a fragment source."""
    return Matcher(forms)


_CARRYING = (Forms, ByteForms)  # a tuple: isinstance takes it faster than `Forms | ByteForms`


def _matcher(forms: Iterable[str] | Iterable[bytes]) -> Matcher:
    if isinstance(forms, _CARRYING):
        return forms.matcher
    return _compiled(tuple(f if isinstance(f, bytes) else encode(f) for f in forms))


def holds_any(text: str, forms: Iterable[str]) -> bool:
    """Whether `text` holds one of the secret forms or a fragment of one."""
    return bool(_matcher(forms).stretches(encode(text)))


def scrub_text(value: str, forms: Iterable[str]) -> str:
    """Redact every secret form and fragment in a header value or other short text."""
    data = encode(value)
    spans = _matcher(forms).stretches(data)
    if not spans:
        return value
    # A stretch of a key beyond ASCII may end inside a character: that character is lost.
    return redacted(data, spans, _REDACTED_BYTES).decode("utf-8", "replace")


def scrub_bytes(body: bytes, byte_forms: Iterable[bytes]) -> bytes:
    """Redact every secret form and fragment in a whole body (`Rendered.byte_forms`)."""
    spans = _matcher(byte_forms).stretches(body)
    return redacted(body, spans, _REDACTED_BYTES) if spans else body


class Scrubber(Stream):
    """Streaming redaction of secret forms and fragments in a response body: `feed` returns
    what can be sent now, `flush` the rest at the end; together they equal `scrub_bytes` of
    the whole body, wherever the chunks are cut (see keyproxy.fragments.Stream)."""

    __slots__ = ()

    def __init__(self, byte_forms: Iterable[bytes]) -> None:
        super().__init__(_matcher(byte_forms))


# How many times a query parameter's name is decoded: a server behind two gateways that each
# decode it once more. A name with an escape left after that is refused (`read_as`).
NAME_DECODINGS = 3


def read_as(name: str) -> str:
    """A query parameter's name (percent-encoded, as sent) reduced to what the most lenient
    servers still tell apart: decoded (again while an escape is left, up to NAME_DECODINGS
    times: a server behind a gateway may decode twice; SECURITY: a name still escaped after
    that is a 400 `ambiguous_query`, never read one way when a server could read it another,
    and its cost stays linear), cut at a NUL (PHP), with a `[...]` suffix taken for
    an array of it (PHP, Rack, qs), in any case (ASP.NET), and of its letters and digits
    only, so that `api.key`, `api[key`, `[api_key]`, `api_key]` and ` API_KEY` all read as
    `api_key` does (PHP folds `.`, ` ` and a lone `[` into `_`; qs and Rack drop brackets)."""
    read = unquote_plus(name)
    for decodings in range(1, NAME_DECODINGS + 1):
        if "%" not in read or (again := unquote_plus(read)) == read:
            break  # no escape left
        if decodings == NAME_DECODINGS:
            raise BadRequest(
                "ambiguous_query", "a query parameter's name is escaped more times than read"
            )
        read = again
    read = read.partition("\0")[0].lower()
    if read.endswith("]") and "[" in read[1:]:
        read = read[: read.index("[", 1)]
    return "".join(c for c in read if c.isascii() and c.isalnum())
