"""The fragment matcher finds exactly the redacted set its definition names, whole or streamed."""

from __future__ import annotations

import base64
import random
import secrets

import pytest

from keyproxy.fragments import (
    ANCHOR,
    FRAGMENT,
    TEDDY,
    Matcher,
    Span,
    Stream,
    _anchors,
    merged,
    redacted,
)

MARK = b"[REDACTED]"


def _definition(data: bytes, sources: list[bytes], wholes: list[bytes]) -> list[Span]:
    """The redacted set as the module docstring defines it, by brute force."""
    windows = {s[i : i + FRAGMENT] for s in sources for i in range(len(s) - FRAGMENT + 1)}
    spans = [(i, i + FRAGMENT) for i in range(len(data) - FRAGMENT + 1) if data[i:][:8] in windows]
    for whole in (*sources, *wholes):
        spans += [(i, i + len(whole)) for i in range(len(data)) if data.startswith(whole, i)]
    return merged(spans)


def _keys(rng: random.Random) -> list[bytes]:
    return [
        b"sk-proj-" + secrets.token_urlsafe(120).encode()[:156],  # long: more than TEDDY anchors
        base64.b64encode(rng.randbytes(30)),
        b"aaaaaaaaaaaabaaaaaaaaaaaa",  # periodic: windows repeat, runs overlap themselves
        b"k3y",  # shorter than a window: searched whole only
    ]


def _text(rng: random.Random, forms: list[bytes]) -> bytes:
    pieces = []
    for _ in range(rng.randint(1, 10)):
        roll = rng.random()
        form = rng.choice(forms)
        if roll < 0.5:
            start = rng.randrange(len(form))
            pieces.append(form[start : start + rng.randint(1, 30)])
        elif roll < 0.6:
            pieces.append(form)
        else:
            pieces.append(bytes(rng.choice(b"ab -=k3y\n") for _ in range(rng.randint(0, 9))))
    return b"".join(pieces)


@pytest.mark.parametrize("seed", range(4))
def test_stretches_are_exactly_the_defined_set(seed: int) -> None:
    """For random texts built from runs of long, periodic, base64 and too-short forms, and of a
    form searched whole around one, the stretches found equal the definition's."""
    rng = random.Random(seed)
    sources = _keys(rng)
    wholes = [b"token%20" + sources[1]]  # a query format's text around the key
    matcher = Matcher(sources, wholes)
    for _ in range(400):
        data = _text(rng, [*sources, *wholes])
        assert matcher.stretches(data) == _definition(data, sources, wholes), data


@pytest.mark.parametrize("seed", range(4))
def test_a_stream_cut_anywhere_gives_the_whole_result(seed: int) -> None:
    """The same texts, streamed in random chunks (down to one byte each), come out exactly
    as the whole text redacted; what is held back never exceeds the longest whole form."""
    rng = random.Random(100 + seed)
    sources = _keys(rng)
    wholes = [b"token%20" + sources[1]]
    matcher = Matcher(sources, wholes)
    for _ in range(300):
        data = _text(rng, [*sources, *wholes])
        want = redacted(data, _definition(data, sources, wholes), MARK)
        stream = Stream(matcher)
        count = rng.randint(0, len(data))
        cuts = sorted(rng.sample(range(len(data) + 1), count))
        out = b""
        for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
            out += stream.feed(data[start:end])
            assert len(stream._carry) < len(wholes[0])
        assert out + stream.flush() == want, (data, cuts)


def _long_text(rng: random.Random, forms: list[bytes]) -> bytes:
    """A body of several KiB: clean text with runs and whole forms here and there."""
    pieces = []
    for _ in range(rng.randint(4, 8)):
        pieces += [
            _text(rng, forms),
            b'{"delta": {"content": "some text"}}\n\n' * rng.randint(0, 9),
        ]
    return b"".join(pieces)


@pytest.mark.parametrize("seed", range(4))
def test_long_bodies_cut_anywhere_give_the_whole_result(seed: int) -> None:
    """A body of several KiB, cut into two at every offset, and into random chunks from one
    byte to longer than the longest form, comes out exactly as it does whole."""
    rng = random.Random(200 + seed)
    sources = _keys(rng)
    wholes = [b"token%20" + sources[1]]
    matcher = Matcher(sources, wholes)
    longest = max(len(form) for form in [*sources, *wholes])
    for round_ in range(12):
        data = _long_text(rng, [*sources, *wholes])
        want = redacted(data, _definition(data, sources, wholes), MARK)
        if round_ == 0:
            for cut in range(len(data) + 1):
                stream = Stream(matcher)
                out = stream.feed(data[:cut]) + stream.feed(data[cut:]) + stream.flush()
                assert out == want, (data, cut)
        for _ in range(20):
            stream = Stream(matcher)
            out, start = b"", 0
            while start < len(data):
                size = rng.choice([1, 7, longest - 1, longest, rng.randint(1, 600)])
                out += stream.feed(data[start : start + size])
                start += size
            assert out + stream.flush() == want, data


def test_anchors_cover_every_window() -> None:
    """Every window of every source holds one of the chosen anchors, and each automaton holds
    at most TEDDY of them (more anchors: more automata, each still prefiltered)."""
    rng = random.Random(5)
    for _ in range(50):
        sources = [secrets.token_urlsafe(rng.randint(6, 300)).encode() for _ in range(3)]
        anchors = _anchors(sources)
        assert all(len(a) == ANCHOR for a in anchors)
        for source in sources:
            for i in range(len(source) - FRAGMENT + 1):
                assert any(a in source[i : i + FRAGMENT] for a in anchors)
        matcher = Matcher(sources)
        assert len(matcher._filters) == max(1, -(-len(anchors) // TEDDY))


def test_a_clean_body_is_returned_as_it_is() -> None:
    """Without an anchor there is nothing to redact: no copy, nothing held back after a
    byte that no window holds."""
    matcher = Matcher([b"sk-" + secrets.token_urlsafe(40).encode()])
    body = b'{"choices": [{"delta": {"content": "hello"}}]}\n\n'
    assert matcher.stretches(body) == []
    assert matcher.undecided(body) == 0
    stream = Stream(matcher)
    assert stream.feed(body) is body


def test_touching_runs_are_one_stretch() -> None:
    """Runs that overlap or touch become one stretch; a gap of one byte keeps them apart."""
    assert merged([(8, 16), (0, 8), (20, 28), (28, 30), (21, 24)]) == [(0, 16), (20, 30)]
    key = b"0123456789abcdefghij"
    matcher = Matcher([key])
    assert redacted(key[:8] + key[12:], matcher.stretches(key[:8] + key[12:]), MARK) == MARK
    two = key[:8] + b"_" + key[12:]
    assert redacted(two, matcher.stretches(two), MARK) == MARK + b"_" + MARK


def test_an_open_stretch_is_sent_once_however_long_it_runs() -> None:
    """A run fed one byte at a time is marked once, when its 8th byte arrives; nothing of it
    is held meanwhile, whatever its length, and the text after it flows again."""
    key = secrets.token_urlsafe(300).encode()
    stream = Stream(Matcher([key]))
    sent = [stream.feed(key[i : i + 1]) for i in range(len(key))]
    assert sent[:7] == [b""] * 7
    assert sent[7] == MARK
    assert set(sent[8:]) == {b""}
    assert len(stream._carry) < FRAGMENT
    assert stream.feed(b" and then\n") == b" and then\n"
    assert stream.flush() == b""
