"""Put a route's key into the upstream request, and keep it out of the response.

`Injector` is compiled once per route. `render(key)` returns the headers and query parameters
to add, and every form of the key that went on the wire (the raw key, its URL-encoded and
JSON-escaped spellings, the basic-auth base64) so `Scrubber` can find them again if the
upstream echoes one back. Rendering is cached per key version: the hot path formats nothing.

`Scrubber` replaces those forms in a streamed body, also when one is split across chunks. It
holds back only a tail that could be the start of a secret, so an SSE event whose end is not
such a prefix reaches the caller at once.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import quote, quote_plus

from keyproxy import secret
from keyproxy.config import Injection, Route
from keyproxy.secret import REDACTED, Secret

_REDACTED_BYTES = REDACTED.encode()


@dataclass(frozen=True)
class Rendered:
    """What one key version puts into a request. Holds secret values: never log it."""

    version: int
    headers: tuple[tuple[str, str], ...]
    query: str  # encoded `name=value&...`, exactly as sent upstream
    forms: tuple[str, ...]  # longest first
    byte_forms: tuple[bytes, ...]  # the same, UTF-8 encoded, for response bodies

    def __repr__(self) -> str:
        return f"Rendered(version={self.version}, {REDACTED})"


class Injector:
    """The compiled injections of one route."""

    def __init__(self, route: Route) -> None:
        self.injections = route.inject
        # Header names the caller must never set itself: it could override what we inject.
        self.header_names = frozenset(i.name.lower() for i in route.inject if i.kind != "query")
        self.query_names = frozenset(i.name for i in route.inject if i.kind == "query")
        self._cached: Rendered | None = None

    def render(self, key: Secret, version: int) -> Rendered:
        cached = self._cached
        if cached is not None and cached.version == version:
            return cached
        rendered = _render(self.injections, key.reveal(), version)
        secret.register(*rendered.forms)
        self._cached = rendered
        return rendered


def _render(injections: Sequence[Injection], key: str, version: int) -> Rendered:
    headers: list[tuple[str, str]] = []
    query: list[str] = []
    # Spellings an upstream might echo: JSON-escaped (some encoders also escape "/"), and
    # the ways a URL may carry it.
    escaped = json.dumps(key)[1:-1]
    forms = {key, escaped, escaped.replace("/", "\\/"), *_url_forms(key)}
    for inj in injections:
        value = inj.format.replace("{key}", key)
        if inj.kind == "header":
            headers.append((inj.name, value))
        elif inj.kind == "query":
            query.append(f"{quote(inj.name, safe='')}={quote(value, safe='')}")
            forms.update(_url_forms(value))
        else:
            token = base64.b64encode(f"{inj.username}:{value}".encode()).decode()
            headers.append(("Authorization", f"Basic {token}"))
            forms.add(token)
    # Longest first, so a form that contains another is replaced whole.
    ordered = tuple(sorted(forms, key=len, reverse=True))
    return Rendered(
        version, tuple(headers), "&".join(query), ordered, tuple(f.encode() for f in ordered)
    )


def _url_forms(value: str) -> set[str]:
    """Percent-encodings of `value` an upstream might echo: strict, path-style, form-style,
    each with upper- and lower-case hex digits."""
    forms = {quote(value, safe=""), quote(value, safe="/"), quote_plus(value)}
    return forms | {_lower_hex(f) for f in forms}


def _lower_hex(encoded: str) -> str:
    parts = encoded.split("%")
    return parts[0] + "".join("%" + p[:2].lower() + p[2:] for p in parts[1:])


def holds_any(text: str, forms: Iterable[str]) -> bool:
    """Whether `text` holds one of the secret forms."""
    for form in forms:  # noqa: SIM110  # not any(): a generator per call, on every answer
        if form in text:
            return True
    return False


def scrub_text(value: str, forms: Iterable[str]) -> str:
    """Replace every secret form in a header value or other short text."""
    for form in forms:
        if form in value:
            value = value.replace(form, REDACTED)
    return value


def scrub_bytes(body: bytes, byte_forms: Iterable[bytes]) -> bytes:
    """Replace every secret form in a whole body (`Rendered.byte_forms`, longest first)."""
    for form in byte_forms:
        if form in body:
            body = body.replace(form, _REDACTED_BYTES)
    return body


class Scrubber:
    """Streaming replacement of secret forms in a response body."""

    def __init__(self, byte_forms: Iterable[bytes]) -> None:
        self._forms = tuple(byte_forms)
        self._carry = b""

    def feed(self, chunk: bytes) -> bytes:
        """Return what can be sent now; keep back a possible partial secret."""
        buf = scrub_bytes(self._carry + chunk if self._carry else chunk, self._forms)
        hold = self._partial_tail(buf)
        if hold:
            self._carry = buf[-hold:]
            return buf[:-hold]
        self._carry = b""
        return buf

    def flush(self) -> bytes:
        """The end of the body: what was held back is not a secret after all."""
        out, self._carry = self._carry, b""
        return out

    def _partial_tail(self, buf: bytes) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of some form."""
        longest = 0
        size = len(buf)
        for form in self._forms:
            first = form[:1]
            i = buf.find(first, max(0, size - len(form) + 1))
            while i != -1:
                if size - i <= longest:
                    break
                if form.startswith(buf[i:]):
                    longest = size - i
                    break
                i = buf.find(first, i + 1)
        return longest
