"""Microbenchmark of the response scrubber, before and after fragment redaction, in one process.

    .venv/bin/python bench/scrub.py

Bodies: a 64 KiB JSON answer (chat-completion-like objects: ids, base64url strings, English
text) with no secret in it, and the same with a few (two 8-character fragments and one whole
key); an SSE event of 150 bytes; a block of 12 response headers. Keys: the forms of one route's
key (what a request scrubs) and, to show how it scales, of ten keys at once, each key an
OpenAI-like `sk-proj-` key of 164 characters or a 40-character base64 key (several forms).

Candidates:
- `before`: the scrubber of the previous release (whole forms only: `bytes.find` per form,
  and a held-back tail found by searching each form's first byte);
- `ac-8grams`: one Aho-Corasick automaton over every 8-byte window of every form, the obvious
  fragment detector (detection only, no redaction: its floor);
- `after`: keyproxy.inject now (whole forms and 8-byte fragments, anchors + Teddy prefilter).

`copy` is what one copy of the input costs (`bytearray(body)`), the bar the scrubber of a
body is held to.

Microseconds per call on this machine: compare the rows with each other, not across machines.
"""

from __future__ import annotations

import base64
import json
import random
import secrets
import time
from collections.abc import Callable, Iterable

import ahocorasick_rs

from keyproxy import inject
from keyproxy.config import Injection, Route, SecretRef, Upstream
from keyproxy.fragments import Matcher, encode
from keyproxy.secret import REDACTED, Secret

_REDACTED = REDACTED.encode()


def per_call(fn: Callable[[], object], rounds: int = 7, seconds: float = 0.05) -> float:
    """The fastest of `rounds` timings: on a shared machine the others are the noise."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        calls, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            for _ in range(10):
                fn()
            calls += 10
        best = min(best, elapsed / calls * 1e6)
    return best


# ------------------------------------------------------------------- the previous scrubber


def old_scrub_bytes(body: bytes, forms: Iterable[bytes]) -> bytes:
    for form in forms:
        if form in body:
            body = body.replace(form, _REDACTED)
    return body


def old_holds_any(text: str, forms: Iterable[str]) -> bool:
    return any(form in text for form in forms)


class OldScrubber:
    def __init__(self, forms: Iterable[bytes]) -> None:
        self._forms = tuple(forms)
        self._carry = b""

    def feed(self, chunk: bytes) -> bytes:
        buf = old_scrub_bytes(self._carry + chunk if self._carry else chunk, self._forms)
        hold = self._partial_tail(buf)
        if hold:
            self._carry = buf[-hold:]
            return buf[:-hold]
        self._carry = b""
        return buf

    def _partial_tail(self, buf: bytes) -> int:
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


# ------------------------------------------------------------------------------- the inputs


def _keys(count: int, rng: random.Random) -> list[str]:
    """Alternately an OpenAI-like project key and a base64 key with "/", "+" and "="."""
    keys = []
    for i in range(count):
        if i % 2 == 0:
            keys.append("sk-proj-" + secrets.token_urlsafe(120)[:156])
        else:
            keys.append(base64.b64encode(rng.randbytes(29)).decode() + "=")
    return keys


def _rendered(key: str) -> inject.Rendered:
    route = Route(
        name="r",
        upstream=Upstream("https", "api.example.com", 443, ""),
        secret=SecretRef("s", "k", "api_key"),
        inject=(Injection("header", "Authorization", "Bearer {key}"),),
    )
    return inject.Injector(route).render(Secret(key), 1)


def _body(rng: random.Random, size: int = 64 * 1024) -> bytes:
    words = ["the", "model", "answered", "with", "a", "stream", "of", "tokens", "about", "keys"]
    items, total = [], 0
    while total < size:
        item = {
            "id": "chatcmpl-" + secrets.token_urlsafe(18),
            "object": "chat.completion.chunk",
            "embedding": base64.b64encode(rng.randbytes(48)).decode(),
            "content": " ".join(rng.choice(words) for _ in range(20)),
        }
        items.append(item)
        total += len(json.dumps(item)) + 2
    return json.dumps({"data": items}).encode()[:size]


def _with_secrets(body: bytes, key: str) -> bytes:
    k = key.encode()
    pieces = [b"Incorrect API key provided: " + k[:8] + b"****" + k[-4:], k[20:28], k]
    step = len(body) // (len(pieces) + 1)
    out = body
    for n, piece in enumerate(pieces, 1):
        at = n * step
        out = out[:at] + piece + out[at:]
    return out


Case = tuple[
    str, Callable[[], object], Callable[[], object], Callable[[], object], Callable[[], object]
]


def _cases(keys: list[str], body: bytes, event: bytes, headers: str) -> tuple[str, list[Case]]:
    """The table's row label and its cases, for the forms of `keys`."""
    rendered = [_rendered(k) for k in keys]
    forms = tuple(f for r in rendered for f in r.forms)
    byte_forms = tuple(f for r in rendered for f in r.byte_forms)
    matcher = Matcher([encode(s) for r in rendered for s in r.sources], byte_forms)
    after_forms = inject.ByteForms(byte_forms, matcher)
    after_text = inject.Forms(forms, matcher)
    windows = sorted({f[i : i + 8] for f in byte_forms for i in range(len(f) - 7)})
    grams = ahocorasick_rs.BytesAhoCorasick(windows)
    leaky = _with_secrets(body, keys[0])
    assert inject.scrub_bytes(body, after_forms) is body
    assert keys[0][:8].encode() not in inject.scrub_bytes(leaky, after_forms)
    label = f"| {len(keys)} | {len(byte_forms)} | {len(windows)}"
    quarter = len(body) // 4
    return label, [
        (
            "64 KiB, none",
            lambda: old_scrub_bytes(body, byte_forms),
            lambda: grams.find_matches_as_indexes(body),
            lambda: inject.scrub_bytes(body, after_forms),
            lambda: bytearray(body),
        ),
        (
            "64 KiB, a few",
            lambda: old_scrub_bytes(leaky, byte_forms),
            lambda: grams.find_matches_as_indexes(leaky),
            lambda: inject.scrub_bytes(leaky, after_forms),
            lambda: bytearray(leaky),
        ),
        (
            "64 KiB streamed in 4",
            lambda: _stream(OldScrubber(byte_forms), body),
            lambda: [grams.find_matches_as_indexes(body[i : i + quarter]) for i in range(4)],
            lambda: _stream(inject.Scrubber(after_forms), body),
            lambda: bytearray(body),
        ),
        (
            "SSE event",
            lambda: OldScrubber(byte_forms).feed(event),
            lambda: grams.find_matches_as_indexes(event),
            lambda: inject.Scrubber(after_forms).feed(event),
            lambda: bytearray(event),
        ),
        (
            "12 headers",
            lambda: old_holds_any(headers, forms),
            lambda: grams.find_matches_as_indexes(headers.encode()),
            lambda: inject.holds_any(headers, after_text),
            lambda: bytearray(headers.encode()),
        ),
    ]


HEADERS = [
    ("Content-Type", "application/json"),
    ("Date", "Sat, 29 Nov 2026 01:05:28 GMT"),
    ("Openai-Organization", "org-abcdefghijklmnopqrstuvwx"),
    ("Openai-Processing-Ms", "412"),
    ("Openai-Version", "2020-10-01"),
    ("X-Request-Id", "req_" + secrets.token_hex(16)),
    ("X-Ratelimit-Limit-Requests", "10000"),
    ("X-Ratelimit-Remaining-Tokens", "1999876"),
    ("X-Ratelimit-Reset-Requests", "6ms"),
    ("Cf-Ray", "8e1f2a3b4c5d6e7f-FRA"),
    ("Strict-Transport-Security", "max-age=31536000; includeSubDomains"),
    ("Alt-Svc", 'h3=":443"; ma=86400'),
]


def main() -> None:
    rng = random.Random(19)  # noqa: S311  # repeatable inputs, not secrets
    body = _body(rng)
    event = b'data: {"id":"chatcmpl-1","choices":[{"delta":{"content":"hello there, how are'
    event += b' you"},"index":0}],"object":"chat.completion.chunk"}\n\n'
    headers = "\n".join(f"{k}\n{v}" for k, v in HEADERS)
    print(f"body {len(body)} bytes, SSE event {len(event)} bytes, headers {len(headers)} chars")
    print("\n| keys | forms | windows | case | before | ac-8grams | after | copy |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|")
    for count in (1, 10):
        label, cases = _cases(_keys(count, rng), body, event, headers)
        for name, before, grams_only, after, copy in cases:
            print(
                f"{label} | {name} | {per_call(before):.2f} | {per_call(grams_only):.2f} "
                f"| {per_call(after):.2f} | {per_call(copy):.2f} |"
            )


def _stream(scrubber: OldScrubber | inject.Scrubber, body: bytes) -> None:
    step = len(body) // 4
    for i in range(0, len(body), step):
        scrubber.feed(body[i : i + step])


if __name__ == "__main__":
    main()
