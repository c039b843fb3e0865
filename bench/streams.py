"""The `streams` phase of `make bench`: thousands of concurrent LLM-like event streams at once.

Two parts, both on asyncio protocols with httptools (llhttp) parsing HTTP, so that neither
side of the load spends more per event than it must:

- the upstream (`python bench/streams.py upstream PORT KEY_FILE`, several processes may share
  the port): `GET /stream?events=200&gap_ms=50` answers 200 and a chunked `text/event-stream`
  of `events` chat-completion chunks (about 200 bytes each), one every `gap_ms`, each
  carrying the monotonic clock of its sending, then `data: [DONE]`; 403 without the bench
  key, so every candidate's injection is checked on every stream;
- the load: `measure()` starts several client processes (multiprocessing, spawn: each its
  own event loop), pinned to the load's cores, each opening its share of the streams, spread
  evenly over a ramp, and reading every event. An event's delay is arrival minus send time
  (CLOCK_MONOTONIC is shared by every process on the machine). While they run, the proxy's
  resident memory is sampled; its CPU time is read before and after.

A stream is *held* when it answered 200 and delivered every event and the end marker. Every
wait is bounded: a stream that stalls is counted as failed when its deadline passes.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import dataclasses
import multiprocessing
import multiprocessing.connection
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httptools

EVENTS_PER_SECOND = 20
RAMP_S = 2.0  # the streams' starts are spread evenly over this long
READY_S = 60.0  # the longest a client process may take to start
GRACE_S = 30.0  # a stream not finished this long after its last event is due has failed
WORDS = (" the", " model", " answered", " with", " a", " stream", " of", " tokens", " and")


def raise_fd_limit() -> int:
    """The soft limit on open files raised to the hard one (each stream takes two or three)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# ---------------------------------------------------------------------------- the upstream


def _event(n: int, words: str) -> bytes:
    """One chat-completion chunk as an SSE event (about 200 bytes), framed as an HTTP chunk;
    its send time is written last."""
    data = (
        '{"id":"chatcmpl-AbC9dEf0GhIjKlMnOpQrStUvWx","object":"chat.completion.chunk",'
        '"created":1765000000,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,'
        f'"delta":{{"content":"{words}"}},"finish_reason":null}}],"n":{n},'
        f'"t":{time.monotonic():.6f}}}'
    )
    body = f"data: {data}\n\n".encode()
    return b"%x\r\n%s\r\n" % (len(body), body)


_DONE = b"data: [DONE]\n\n"
_END = b"%x\r\n%s\r\n0\r\n\r\n" % (len(_DONE), _DONE)
_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
_FORBIDDEN = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n"
_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


class _Upstream(asyncio.Protocol):
    """One connection to the upstream: requests one after the other, each a paced stream."""

    def __init__(self, auth: bytes) -> None:
        self._auth = auth
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._authorised = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            assert self._transport is not None
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._transport = None

    # httptools' callbacks
    def on_message_begin(self) -> None:
        self._url, self._authorised = b"", False

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"authorization" and value == self._auth:
            self._authorised = True

    def on_message_complete(self) -> None:
        transport = self._transport
        assert transport is not None
        url = urlsplit(self._url.decode("latin-1"))
        if not self._authorised:
            transport.write(_FORBIDDEN)
            return
        if url.path != "/stream":
            transport.write(_NOT_FOUND)
            return
        query = parse_qs(url.query)
        events = int(query.get("events", ["200"])[0])
        gap = float(query.get("gap_ms", ["50"])[0]) / 1000
        transport.write(_HEAD)
        loop = asyncio.get_running_loop()
        self._send(loop, loop.time(), 0, events, gap)

    def _send(
        self, loop: asyncio.AbstractEventLoop, start: float, n: int, events: int, gap: float
    ) -> None:
        """Event `n` now, and the next one due `gap` after it (from the stream's start: no
        drift)."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if n == events:
            self._timer = None
            transport.write(_END)
            return
        transport.write(_event(n, WORDS[n % len(WORDS)] * 3))
        self._timer = loop.call_at(
            start + (n + 1) * gap, self._send, loop, start, n + 1, events, gap
        )


async def _serve_upstream(port: int, auth: bytes) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _Upstream(auth), "127.0.0.1", port, reuse_port=True, backlog=8192
    )
    async with server:
        await server.serve_forever()


# ---------------------------------------------------------------------------- the load


@dataclass(frozen=True)
class Target:
    """Where a candidate's streams are read: host, port, the request path, the credential."""

    name: str
    host: str
    port: int
    path: str  # the stream's, without the query
    authorization: str


class _Reader(asyncio.Protocol):
    """One stream: sends the request, collects each event's delay, notes how it ended."""

    def __init__(self, request: bytes, delays: array.array[float]) -> None:
        self._request = request
        self._delays = delays
        self._parser = httptools.HttpResponseParser(self)
        self._buffer = b""
        self.events = 0
        self.status = 0
        self.done_marker = False
        self.finished: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._end(ok=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(ok=False)

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        now = time.monotonic()
        buffer = self._buffer + body if self._buffer else body
        start = 0
        while (end := buffer.find(b"\n\n", start)) != -1:
            at = buffer.rfind(b'"t":', start, end)
            if at != -1:
                self._delays.append(now - float(buffer[at + 4 : end - 1]))
                self.events += 1
            elif buffer.startswith(b"data: [DONE]", start):
                self.done_marker = True
            start = end + 2
        self._buffer = buffer[start:]

    def on_message_complete(self) -> None:
        self._end(ok=True)

    def _end(self, *, ok: bool) -> None:
        if not self.finished.done():
            self.finished.set_result(ok)
        if self.transport is not None:
            self.transport.close()


async def _one(
    target: Target, request: bytes, at: float, deadline: float, delays: array.array[float]
) -> tuple[bool, int]:
    """One stream opened at `at` (loop time) and read until it ends or `deadline` passes."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, at - loop.time()))
    reader = _Reader(request, delays)
    try:
        async with asyncio.timeout_at(deadline):
            await loop.create_connection(lambda: reader, target.host, target.port)
            ok = await reader.finished
    except (TimeoutError, OSError):
        ok = False
    finally:
        if reader.transport is not None:
            reader.transport.abort()
    held = ok and reader.status == 200 and reader.done_marker
    return held, reader.events


@dataclass(frozen=True)
class Share:
    """One client process's part of a run: streams `offset` to `offset + count` of `total`,
    opened over the ramp that starts at `begin` (time.monotonic(), shared by the processes)."""

    target: Target
    count: int
    offset: int
    total: int
    events: int
    gap_ms: float
    begin: float


async def _client(share: Share) -> tuple[int, int, array.array[float]]:
    """This process's streams: how many were held, events read, every event's delay."""
    target = share.target
    loop = asyncio.get_running_loop()
    begin = loop.time() + (share.begin - time.monotonic())
    query = f"?events={share.events}&gap_ms={share.gap_ms:g}"
    request = (
        f"GET {target.path}{query} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
        f"Authorization: {target.authorization}\r\nAccept: text/event-stream\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    deadline = begin + RAMP_S + share.events * share.gap_ms / 1000 + GRACE_S
    delays: array.array[float] = array.array("d")
    stagger = RAMP_S / max(1, share.total)
    results = await asyncio.gather(
        *(
            _one(target, request, begin + (share.offset + i) * stagger, deadline, delays)
            for i in range(share.count)
        )
    )
    return sum(held for held, _ in results), sum(n for _, n in results), delays


def _client_process(
    conn: multiprocessing.connection.Connection, share: Share, cpus: set[int] | None
) -> None:
    """A client process: its own event loop, pinned to `cpus`; the result sent on `conn`."""
    raise_fd_limit()
    if cpus:
        os.sched_setaffinity(0, cpus)
    conn.send("ready")
    if not conn.poll(READY_S):
        return
    begin: float = conn.recv()
    held, received, delays = asyncio.run(_client(dataclasses.replace(share, begin=begin)))
    conn.send((held, received, delays.tobytes()))
    conn.close()


@dataclass
class Result:
    candidate: str
    streams: int
    held: int
    events: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    cpu_us_per_event: float | None
    rss_kib_per_stream: float | None
    wall_s: float


def _percentile(ordered: Sequence[float], q: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(
    target: Target,
    streams: int,
    seconds: float,
    *,
    clients: int,
    cpus: set[int] | None,
    cpu_seconds: Callable[[], float] | None,
    rss_kib: Callable[[], int] | None,
) -> Result:
    """`streams` concurrent streams of `seconds` each through `target`, read by `clients`
    processes; the proxy's CPU time and resident memory through the two callables."""
    events = round(seconds * EVENTS_PER_SECOND)
    context = multiprocessing.get_context("spawn")
    running: list[tuple[Any, multiprocessing.connection.Connection]] = []
    base, extra = divmod(streams, clients)
    try:
        for i in range(clients):
            mine, theirs = context.Pipe()
            count = base + (i < extra)
            share = Share(
                target,
                count,
                i * base + min(i, extra),
                streams,
                events,
                1000 / EVENTS_PER_SECOND,
                0.0,
            )
            proc = context.Process(target=_client_process, args=(theirs, share, cpus), daemon=True)
            proc.start()
            theirs.close()
            running.append((proc, mine))
        started = time.monotonic()
        for proc, conn in running:  # all started (and imported) before the ramp begins
            if not conn.poll(max(0.0, started + READY_S - time.monotonic())):
                raise RuntimeError(f"a stream client did not start (exit code {proc.exitcode})")
            conn.recv()
        idle = rss_kib() if rss_kib else 0
        cpu_before = cpu_seconds() if cpu_seconds else 0.0
        begin = time.monotonic() + 0.2
        for _, conn in running:
            conn.send(begin)
        outcomes, peak = _collect(running, target.name, begin, seconds, rss_kib)
        cpu_used = (cpu_seconds() - cpu_before) if cpu_seconds else None
    finally:
        for proc, conn in running:
            conn.close()
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=10)
    delays: list[float] = []
    for _, _, raw in outcomes:
        delays += array.array("d", raw)
    delays.sort()
    received = sum(n for _, n, _ in outcomes)
    return Result(
        candidate=target.name,
        streams=streams,
        held=sum(h for h, _, _ in outcomes),
        events=received,
        p50_ms=_percentile(delays, 0.50) * 1000,
        p99_ms=_percentile(delays, 0.99) * 1000,
        max_ms=(delays[-1] if delays else float("nan")) * 1000,
        cpu_us_per_event=cpu_used / received * 1e6 if cpu_used is not None and received else None,
        rss_kib_per_stream=max(0, peak - idle) / streams if rss_kib and peak else None,
        wall_s=time.monotonic() - begin,
    )


def _collect(
    running: Sequence[tuple[Any, multiprocessing.connection.Connection]],
    name: str,
    begin: float,
    seconds: float,
    rss_kib: Callable[[], int] | None,
) -> tuple[list[tuple[int, int, bytes]], int]:
    """Every client's result, and the proxy's largest resident memory sampled while every
    stream was open (after the ramp, before the first stream's end)."""
    peak = 0
    deadline = begin + RAMP_S + seconds + GRACE_S + 30
    outcomes: list[tuple[int, int, bytes]] = []
    for proc, conn in running:
        while not conn.poll(0.25):
            if rss_kib is not None and begin + RAMP_S <= time.monotonic() <= begin + seconds:
                peak = max(peak, rss_kib())
            if not proc.is_alive() and not conn.poll(0):
                raise RuntimeError(f"a stream client exited with {proc.exitcode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the stream clients of {name} did not finish in time")
        outcomes.append(conn.recv())
    return outcomes, peak


def line(result: Result) -> str:
    """One result, as the run prints it."""
    out = (
        f"  streams  n={result.streams:<5} {result.candidate:16} "
        f"held {result.held}/{result.streams}  delay p50 {result.p50_ms:7.2f} "
        f"p99 {result.p99_ms:7.2f} max {result.max_ms:8.2f} ms"
    )
    if result.cpu_us_per_event is not None:
        out += f"  cpu {result.cpu_us_per_event:5.1f} us/event"
    if result.rss_kib_per_stream is not None:
        out += f"  rss {result.rss_kib_per_stream:5.1f} KiB/stream"
    return out


def largest_within(results: Sequence[Result], margin_ms: float = 50.0) -> int | None:
    """The largest N at which keyproxy's p99 event delay stayed within `margin_ms` of the
    minimal proxy's (None: at no N measured)."""
    by = {(r.candidate, r.streams): r for r in results}
    best = None
    for n in sorted({r.streams for r in results}):
        kp, mini = by.get(("keyproxy", n)), by.get(("minimal-aiohttp", n))
        if kp and mini and kp.held == n and kp.p99_ms <= mini.p99_ms + margin_ms:
            best = n
    return best


def markdown(results: Sequence[Result], seconds: float) -> str:
    lines = [
        f"Streams: each {seconds:g} s of {EVENTS_PER_SECOND} events a second (chat-completion "
        "chunks of about 200 bytes), opened over "
        f"{RAMP_S:g} s; delay = arrival minus send time.",
        "",
        "| streams | candidate | held | events | delay p50 ms | p99 ms | max ms "
        "| CPU us/event | RSS KiB/stream |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        cpu = f"{r.cpu_us_per_event:.1f}" if r.cpu_us_per_event is not None else ""
        rss = f"{r.rss_kib_per_stream:.1f}" if r.rss_kib_per_stream is not None else ""
        lines.append(
            f"| {r.streams} | {r.candidate} | {r.held} | {r.events} | {r.p50_ms:.2f} "
            f"| {r.p99_ms:.2f} | {r.max_ms:.2f} | {cpu} | {rss} |"
        )
    best = largest_within(results)
    lines += [
        "",
        "Largest N at which keyproxy held every stream with its p99 event delay within 50 ms "
        f"of the minimal proxy's: {best if best is not None else 'none measured'}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> None:
    if len(argv) != 3 or argv[0] != "upstream":
        raise SystemExit("usage: python bench/streams.py upstream PORT KEY_FILE")
    raise_fd_limit()
    key = Path(argv[2]).read_text(encoding="utf-8").strip()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_upstream(int(argv[1]), f"Bearer {key}".encode()))


if __name__ == "__main__":
    main(sys.argv[1:])
