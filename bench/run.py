"""`make bench`: keyproxy side by side with direct, nginx and a minimal aiohttp proxy.

Everything runs on 127.0.0.1 and is started here and stopped here by PID, also on failure:

- a real OpenBao dev server (keyproxy.devserver), set up by the vault-dev/ scripts, holding the
  route keys and issuing the agent's identity token;
- the fixed upstream: nginx (small JSON, 64 KiB JSON) passing /sse* to bench/sse_upstream.py;
  it answers 403 unless the request carries the bench key, so every candidate's injection is
  checked on every request;
- the candidates, each serving /r/bench/<path>: nginx (one worker, the same header
  injection), bench/minimal_proxy.py, and `keyproxy serve` with everything on (token verified,
  policy decided, key from the Vault-backed cache, response scrubbing, the audit event
  written to a file through the normal structlog JSON pipeline).

Five phases, the first four interleaving their candidates run by run (A B C D A B C D ...):

    main     direct, nginx, minimal, keyproxy (10 routes) x small/large/sse x c=1/32/128
    routes   keyproxy with 10 and with 1,000 routes and policies, small, c=32 and c=128
    workers  keyproxy --workers 1 and --workers 2, unpinned, small, c=32 and c=128
    limits   keyproxy without limits, and with a rate limit and a task token's max_uses
             counted on every request in a local Valkey/Redis server, small, c=32 and c=128
    streams  direct, nginx, minimal, keyproxy x N concurrent paced event streams (1,000 and
             4,000 by default), read by several client processes (bench/streams.py)

Proxies run on core 0 and wrk, the upstream and OpenBao on core 1 (where taskset works).
Writes bench/results/<timestamp>.json and .md and prints the table.

    .venv/bin/python bench/run.py [--duration 4] [--reps 2] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import yaml

from keyproxy.devserver import Agent, DevSetup, OpenBaoDevServer
from keyproxy.secret import write_private
from keyproxy.storeserver import LocalStoreServer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import streams as stream_load  # the streams phase's upstream and load (bench/streams.py)

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
KEYPROXY = Path(sys.executable).parent / "keyproxy"
LARGE_BYTES = 64 * 1024
SSE_GAP_MS = 5
SSE_STREAMS = 3  # paced streams per candidate; the median one is reported
FILL_KEY_PATH = "keyproxy/keys/bench-fill"
BODIES = {"small": "/small", "large": "/large", "sse": "/sse"}
CONCURRENCY = (1, 32, 128)
PROXY_CPU, LOAD_CPU = "0", "1"
PHASES = ("main", "routes", "workers", "limits", "streams")


# ---------------------------------------------------------------------------- processes


@dataclass
class Processes:
    """Every process this run started, stopped in reverse order by PID."""

    pinning: bool
    started: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    _files: list[IO[bytes]] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cpu: str | None = None,
        log: Path,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        prefix = ["taskset", "-c", cpu] if cpu is not None and self.pinning else []
        out = log.open("ab")
        self._files.append(out)
        proc = subprocess.Popen(
            [*prefix, *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            # An audit log keeps stdout's JSON lines only; errors go beside it.
            stderr=log.with_suffix(".stderr").open("ab")
            if "audit" in log.name
            else subprocess.STDOUT,
            env=env,
            start_new_session=True,  # our Ctrl-C handling stops it, not the terminal's
        )
        self.started.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 70.0) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.started = [(n, p) for n, p in self.started if p is not proc]

    def stop_all(self) -> None:
        for _, proc in reversed(list(self.started)):
            self.stop(proc)
        for out in self._files:
            out.close()


def _taskset_works() -> bool:
    if (os.cpu_count() or 1) < 2 or shutil.which("taskset") is None:
        return False
    done = subprocess.run(["taskset", "-c", LOAD_CPU, "true"], check=False, capture_output=True)
    return done.returncode == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_http(url: str, proc: subprocess.Popen[bytes], what: str, timeout: float = 60) -> None:
    """Poll `url` until it answers 200, or fail if the process died or the deadline passed."""
    deadline = time.monotonic() + timeout
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{what} exited with {proc.returncode} before it was ready (--keep keeps its logs)"
            )
        try:
            with opener.open(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready at {url} within {timeout:g}s")
        time.sleep(0.1)  # polling interval of a bounded wait


def _family(pid: int) -> list[int]:
    """A process and its children (nginx's and `keyproxy serve --workers`'s workers)."""
    pids = [pid]
    with contextlib.suppress(OSError):
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    return pids


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time used so far by a process and its children."""
    ticks = 0
    for one in _family(pid):
        with contextlib.suppress(OSError):
            # Fields after the command name, which is in parentheses and may hold spaces.
            fields = Path(f"/proc/{one}/stat").read_text().rpartition(")")[2].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def _memory_kib(pid: int, field: str) -> int:
    """A /proc status field in KiB (`VmHWM`, `VmRSS`), summed over a process and its children
    (the workers of `keyproxy serve --workers`)."""
    total = 0
    for one in _family(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{one}/status").read_text().splitlines():
                if line.startswith(f"{field}:"):
                    total += int(line.split()[1])
    return total


def _peak_rss_kib(pid: int) -> int:
    """The peak resident memory (VmHWM) of a process and its children."""
    return _memory_kib(pid, "VmHWM")


def _rss_kib(pid: int) -> int:
    """The resident memory now (VmRSS) of a process and its children."""
    return _memory_kib(pid, "VmRSS")


# ---------------------------------------------------------------------------- set-up


def ensure_tools() -> dict[str, str]:
    """nginx and wrk, installed from Debian's packages if missing."""
    paths = {
        name: shutil.which(name) or shutil.which(name, path="/usr/sbin")
        for name in ("nginx", "wrk")
    }
    if not all(paths.values()):
        print("bench: installing nginx-light and wrk (apt-get)", flush=True)
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(
            [*sudo, "apt-get", "install", "-y", "-qq", "nginx-light", "wrk"], check=True, env=env
        )
        paths = {name: shutil.which(name) or shutil.which(name, path="/usr/sbin") for name in paths}
    found = {name: path for name, path in paths.items() if path}
    if len(found) != 2:
        raise RuntimeError("nginx or wrk is still missing after apt-get install")
    return found


_write_private = write_private  # keyproxy's: bench/instructions.py uses this name


def _nginx_proxy_conf(
    path: Path, workdir: Path, *, ports: tuple[int, int], key: str, connections: int, nofile: int
) -> Path:
    """The nginx candidate's configuration (bench/nginx/proxy.conf) at `path`: listening on
    the first of `ports`, proxying to the second, injecting `key`."""
    text = (BENCH / "nginx" / "proxy.conf").read_text(encoding="utf-8")
    port, upstream_port = ports
    return _write_private(
        path,
        text.format(
            workdir=workdir,
            port=port,
            upstream_port=upstream_port,
            key=key,
            connections=connections,
            nofile=nofile,
        ),
    )


def _put_keys(bao: OpenBaoDevServer, count: int) -> None:
    """Filler keys for the extra routes, written straight to the KV v2 API as root."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for i in range(count):
        body = json.dumps({"data": {"api_key": "sk-fill-" + secrets.token_urlsafe(24)}}).encode()
        request = urllib.request.Request(  # noqa: S310  # the dev server's http://127.0.0.1 URL
            f"{bao.addr}/v1/secret/data/{FILL_KEY_PATH}/{i}",
            data=body,
            method="POST",
            headers={"X-Vault-Token": bao.root_token, "Content-Type": "application/json"},
        )
        with opener.open(request, timeout=10) as response:
            response.read()


def config_file(workdir: Path, name: str) -> Path:
    """Where candidate `name`'s configuration goes: a directory of its own, as deployed (a
    ConfigMap, /etc/keyproxy). keyproxy watches that directory; the audit log written beside
    it would make every audit write an inotify event for the watch (measured: a 400-byte
    write with flush costs 4.6 us alone and 15.7 us in a watched directory)."""
    directory = workdir / "config" / name
    directory.mkdir(parents=True, exist_ok=True)
    return directory / "keyproxy.yaml"


def keyproxy_config(
    bao: OpenBaoDevServer,
    setup: DevSetup,
    agent: Agent,
    upstream: str,
    routes: int,
) -> dict[str, Any]:
    """`routes` routes and as many policies; the bench agent's policy comes last, so a linear
    policy scan would read every other one first."""
    local = {
        "egress": {"allow_cidrs": ["127.0.0.0/8"]},
        "allow_http": True,
        "owner": "bench@example.com",
    }
    inject = [{"header": "Authorization", "format": "Bearer {key}"}]
    table: dict[str, Any] = {}
    policies: list[dict[str, Any]] = []
    for i in range(routes - 1):
        name = f"fill-{i:04d}"
        table[name] = {
            "upstream": upstream,
            "secret": {"path": f"{FILL_KEY_PATH}/{i}", "field": "api_key"},
            "inject": inject,
            **local,
        }
        policies.append(
            {
                "name": f"fill-{i:04d}",
                "issuers": ["openbao"],
                "subjects": [f"fill-agent-{i:04d}"],
                "allow": {name: {"methods": ["GET", "POST"], "paths": ["/v1/**"]}},
            }
        )
    table["bench"] = {
        "upstream": upstream,
        "secret": {"path": "keyproxy/keys/bench", "field": "api_key"},
        "inject": inject,
        **local,
    }
    policies.append(
        {
            "name": "bench-agent",
            "issuers": ["openbao"],
            "subjects": [agent.entity_id],
            "allow": {
                "bench": {
                    "methods": ["GET"],
                    "paths": ["/small", "/large", "/sse", "/sse-paced", "/stream"],
                }
            },
        }
    )
    return {
        "vault": {
            "addr": bao.addr,
            "auth": {
                "method": "approle",
                "role_id_file": str(setup.role_id_file),
                "secret_id_file": str(setup.secret_id_file),
            },
        },
        "identity": {
            "issuers": [
                {
                    "name": "openbao",
                    "issuer": setup.issuer,
                    "discovery_url": setup.discovery_url,
                    "audiences": [setup.audience],
                    "algorithms": ["RS256"],
                }
            ]
        },
        "routes": table,
        "policies": policies,
    }


# ---------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Candidate:
    name: str
    base: str  # http://127.0.0.1:PORT, serving <prefix><path>
    prefix: str
    credential: Path  # what the client sends as Bearer: the key (direct) or the token
    pid: int | None = None


@dataclass
class Run:
    phase: str
    candidate: str
    body: str
    conc: int
    rep: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_us: float | None  # the candidate's CPU time per request (user + system)


def wrk(
    procs: Processes, wrk_bin: str, cand: Candidate, *, path: str, conc: int, seconds: float
) -> dict[str, Any]:
    prefix = ["taskset", "-c", LOAD_CPU] if procs.pinning else []
    argv = [
        *prefix,
        wrk_bin,
        "-t1",
        f"-c{conc}",
        f"-d{seconds:g}s",
        "--timeout",
        "10s",
        "-s",
        str(BENCH / "wrk.lua"),
        f"{cand.base}{cand.prefix}{path}",
    ]
    env = {**os.environ, "BENCH_TOKEN_FILE": str(cand.credential)}
    done = subprocess.run(
        argv, capture_output=True, text=True, env=env, timeout=seconds + 60, check=False
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"wrk against {cand.name} failed: {done.stderr[-500:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def measure(
    procs: Processes,
    wrk_bin: str,
    phase: str,
    *,
    candidates: Sequence[Candidate],
    bodies: Sequence[str],
    concs: Sequence[int],
    reps: int,
    seconds: float,
) -> list[Run]:
    runs: list[Run] = []
    for cand in candidates:  # warm-up: connections, caches, the token cache
        wrk(procs, wrk_bin, cand, path=BODIES["small"], conc=32, seconds=1)
    for body in bodies:
        for conc in concs:
            for rep in range(reps):
                for cand in candidates:
                    cpu_before = _cpu_seconds(cand.pid) if cand.pid else None
                    out = wrk(procs, wrk_bin, cand, path=BODIES[body], conc=conc, seconds=seconds)
                    cpu_us = None
                    if cpu_before is not None and cand.pid and out["requests"]:
                        used = _cpu_seconds(cand.pid) - cpu_before
                        cpu_us = used / out["requests"] * 1e6
                    errors = sum(out["errors"].values())
                    run = Run(
                        phase,
                        cand.name,
                        body,
                        conc,
                        rep,
                        out["requests"] / (out["duration_us"] / 1e6),
                        out["p50_us"] / 1000,
                        out["p99_us"] / 1000,
                        errors,
                        cpu_us,
                    )
                    runs.append(run)
                    print(
                        f"  {phase:8} {body:5} c={conc:<4} {cand.name:16} "
                        f"{run.rps:9.0f} req/s  p50 {run.p50_ms:7.3f} ms  "
                        f"p99 {run.p99_ms:7.3f} ms  errors {errors}"
                        + (f"  cpu {cpu_us:6.1f} us/req" if cpu_us is not None else ""),
                        flush=True,
                    )
    return runs


async def sse_delivery(cand: Candidate) -> dict[str, Any]:
    """Read one paced stream; each event carries its send time (CLOCK_MONOTONIC is shared by
    every process on the machine), so its delay is arrival minus send."""
    url = f"{cand.base}{cand.prefix}/sse-paced?gap_ms={SSE_GAP_MS}"
    auth = {"Authorization": "Bearer " + cand.credential.read_text(encoding="utf-8").strip()}
    delays: list[float] = []
    per_read: list[int] = []
    buffer = b""
    timeout = aiohttp.ClientTimeout(total=60)
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.get(url, headers=auth) as response,
    ):
        response.raise_for_status()
        async for chunk in response.content.iter_any():
            now = time.monotonic()
            buffer += chunk
            *events, buffer = buffer.split(b"\n\n")
            per_read.append(len(events))
            for event in events:
                sent = json.loads(event.removeprefix(b"data: "))["t"]
                delays.append((now - sent) * 1000)
    return {
        "events": len(delays),
        "max_events_per_read": max(per_read, default=0),
        "reads_with_several_events": sum(1 for n in per_read if n > 1),
        "p50_delay_ms": round(statistics.median(delays), 3) if delays else None,
        "max_delay_ms": round(max(delays), 3) if delays else None,
    }


def _median_stream(streams: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The middle stream by batching, then by worst delay: one scheduling hiccup of the
    machine (two events in one read, in one stream of three) does not decide the check, a
    proxy that holds events back does (it batches in every stream)."""
    ranked = sorted(streams, key=lambda s: (s["reads_with_several_events"], s["max_delay_ms"]))
    middle = dict(ranked[len(ranked) // 2])
    middle["streams_with_batching"] = sum(1 for s in streams if s["reads_with_several_events"])
    middle["streams"] = len(streams)
    return middle


# ---------------------------------------------------------------------------- report


def summarise(runs: Sequence[Run]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, int, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.phase, run.body, run.conc, run.candidate), []).append(run)
    rows: list[dict[str, Any]] = []
    for (phase, body, conc, cand), group in groups.items():
        rows.append(
            {
                "phase": phase,
                "body": body,
                "conc": conc,
                "candidate": cand,
                "rps": round(statistics.mean(r.rps for r in group), 1),
                "p50_ms": round(statistics.median(r.p50_ms for r in group), 3),
                "p99_ms": round(statistics.median(r.p99_ms for r in group), 3),
                "errors": sum(r.errors for r in group),
                "cpu_us": _mean_or_none([r.cpu_us for r in group]),
                "reps": len(group),
            }
        )
    by_key = {(r["phase"], r["body"], r["conc"], r["candidate"]): r for r in rows}
    for row in rows:
        for ref in ("nginx", "minimal-aiohttp"):
            other = by_key.get((row["phase"], row["body"], row["conc"], ref))
            row[f"x_{ref}"] = round(row["rps"] / other["rps"], 3) if other else None
    return rows


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.mean(known), 1) if known else None


def verdicts(rows: Sequence[dict[str, Any]], sse: dict[str, Any]) -> list[dict[str, Any]]:
    def get(phase: str, body: str, conc: int, cand: str) -> dict[str, Any] | None:
        for row in rows:
            if (row["phase"], row["body"], row["conc"], row["candidate"]) == (
                phase,
                body,
                conc,
                cand,
            ):
                return row
        return None

    out: list[dict[str, Any]] = []
    kp, mini = get("main", "small", 32, "keyproxy"), get("main", "small", 32, "minimal-aiohttp")
    if kp and mini:
        ratio = kp["rps"] / mini["rps"]
        out.append(
            {
                "check": "c=32 small: keyproxy req/s / minimal aiohttp >= 0.85 (target 1.0)",
                "value": round(ratio, 3),
                "met": ratio >= 0.85,
            }
        )
    kp1, mini1 = get("main", "small", 1, "keyproxy"), get("main", "small", 1, "minimal-aiohttp")
    if kp1 and mini1:
        extra = kp1["p50_ms"] - mini1["p50_ms"]
        out.append(
            {
                "check": "c=1 small: keyproxy p50 - minimal aiohttp p50 <= 0.1 ms "
                "(added latency over direct within 0.1 ms)",
                "value": round(extra, 3),
                "met": extra <= 0.1,
            }
        )
    kp_sse = sse.get("keyproxy")
    if kp_sse:
        one_by_one = kp_sse["reads_with_several_events"] == 0 and kp_sse["events"] == 100
        out.append(
            {
                "check": f"SSE: 100 events paced {SSE_GAP_MS} ms reach the client one by one "
                f"(median of {SSE_STREAMS} streams)",
                "value": kp_sse,
                "met": one_by_one,
            }
        )
    w1, w2 = (
        get("workers", "small", 128, "keyproxy-w1"),
        get("workers", "small", 128, "keyproxy-w2"),
    )
    if w1 and w2:
        ratio = w2["rps"] / w1["rps"]
        out.append(
            {
                "check": "--workers 2 / --workers 1 req/s >= 1.7 (small, c=128)",
                "value": round(ratio, 3),
                "met": ratio >= 1.7,
            }
        )
    plain, limited = (
        get("limits", "small", 32, "keyproxy-nolimits"),
        get("limits", "small", 32, "keyproxy-limits"),
    )
    if plain and limited:
        ratio = limited["rps"] / plain["rps"]
        out.append(
            {
                "check": "a rate limit and max_uses in Valkey/Redis on every request: req/s / "
                "keyproxy without limits >= 0.8 (small, c=32)",
                "value": round(ratio, 3),
                "met": ratio >= 0.8,
            }
        )
    r10, r1000 = (
        get("routes", "small", 32, "keyproxy-10"),
        get("routes", "small", 32, "keyproxy-1000"),
    )
    if r10 and r1000:
        change = r1000["rps"] / r10["rps"] - 1
        out.append(
            {
                "check": "10 -> 1,000 routes changes req/s by less than 5% (small, c=32)",
                "value": round(change, 4),
                "met": abs(change) < 0.05,
            }
        )
    return out


def markdown(
    meta: dict[str, Any],
    rows: Sequence[dict[str, Any]],
    sse: dict[str, Any],
    checks: Sequence[dict[str, Any]],
) -> str:
    def ratio(value: float | None) -> str:
        return "" if value is None else f"{value:.2f}x"

    lines = [
        f"Run {meta['timestamp']} on {meta['cpus']} CPUs, {meta['duration_s']:g} s per run, "
        f"{meta['reps']} interleaved reps, pinning {'on' if meta['pinning'] else 'off'} "
        f"(Python {meta['python']}, aiohttp {meta['aiohttp']}, {meta['nginx']}).",
        "",
        "| phase | body | c | candidate | req/s | p50 ms | p99 ms | x nginx | x minimal "
        "| CPU us/req | errors |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        cpu = "" if row["cpu_us"] is None else f"{row['cpu_us']:.0f}"
        lines.append(
            f"| {row['phase']} | {row['body']} | {row['conc']} | {row['candidate']} "
            f"| {row['rps']:.0f} | {row['p50_ms']:.3f} | {row['p99_ms']:.3f} "
            f"| {ratio(row['x_nginx'])} | {ratio(row['x_minimal-aiohttp'])} | {cpu} "
            f"| {row['errors']} |"
        )
    lines += [
        "",
        f"SSE delivery (100 events, {SSE_GAP_MS} ms apart; the median of {SSE_STREAMS} "
        "streams per candidate):",
        "",
        "| candidate | events | reads with >1 event | p50 delay ms | max delay ms "
        "| streams with batching |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, s in sse.items():
        lines.append(
            f"| {name} | {s['events']} | {s['reads_with_several_events']} "
            f"| {s['p50_delay_ms']} | {s['max_delay_ms']} "
            f"| {s.get('streams_with_batching', 0)} of {s.get('streams', 1)} |"
        )
    lines += ["", "Peak RSS (VmHWM, KiB, all processes of the candidate):", ""]
    lines += [f"- {name}: {kib}" for name, kib in meta["peak_rss_kib"].items()]
    lines += ["", f"Audit events written: {meta['audit_events']}", "", "Checks:", ""]
    for check in checks:
        value = check["value"]
        shown = json.dumps(value) if isinstance(value, dict) else value
        lines.append(f"- {'MET' if check['met'] else 'NOT MET'}: {check['check']}: {shown}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- the run


def limit_every_request(cfg: dict[str, Any], state_url: str) -> None:
    """A per-identity rate limit on the bench route, counted in the Valkey/Redis server at
    `state_url`, never refusing a request: what is measured is the cost."""
    cfg["state"] = {"url": state_url}
    cfg["tokens"] = {"max_ttl": "1h"}
    cfg["routes"]["bench"]["limits"] = {
        "rate": [{"per": "identity", "requests": 10**9, "window": "1s", "burst": 10**9}]
    }


def task_token(base: str, identity_file: Path, out: Path) -> Path:
    """A task token with max_uses (as many as the broker grants) for the bench route, from
    the keyproxy at `base`, so every request also takes one of its uses; written to `out`."""
    scope = {"bench": {"methods": ["GET"], "paths": ["/small", "/large", "/sse"]}}
    body = json.dumps({"scope": scope, "max_uses": 1_000_000, "ttl": "1h", "task": "bench"})
    identity = identity_file.read_text(encoding="utf-8").strip()
    request = urllib.request.Request(  # noqa: S310  # loopback
        f"{base}/token",
        data=body.encode(),
        headers={"Authorization": f"Bearer {identity}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310  # loopback
        token = json.load(answer)["access_token"]
    return _write_private(out, token)


@dataclass
class Stack:
    workdir: Path
    procs: Processes
    bao: OpenBaoDevServer
    setup: DevSetup
    agent: Agent
    upstream: str
    token_file: Path
    key_file: Path
    source: Path | None = None
    audit: dict[str, Path] = field(default_factory=dict)
    kp_pids: dict[str, int] = field(default_factory=dict)
    state_url: str | None = None  # the Valkey/Redis server of the limits phase

    def keyproxy(
        self,
        name: str,
        routes: int,
        workers: int,
        cpu: str | None,
        *,
        source: Path | None = None,
        limited: bool = False,
        upstream: str | None = None,
        server: dict[str, Any] | None = None,
    ) -> Candidate:
        cfg = keyproxy_config(self.bao, self.setup, self.agent, upstream or self.upstream, routes)
        if server is not None:
            cfg["server"] = server
        if limited:
            assert self.state_url is not None
            limit_every_request(cfg, self.state_url)
        path = config_file(self.workdir, name)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        port = _free_port()
        audit = self.workdir / f"{name}.audit.jsonl"
        self.audit[name] = audit
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        source = source or self.source
        if source is not None:  # measure a patched copy of the package
            env["PYTHONPATH"] = str(source)
        argv = [str(KEYPROXY), "serve", "-c", str(path), "--port", str(port), "--admin-port", "0"]
        proc = self.procs.start(
            name, [*argv, "--workers", str(workers)], cpu=cpu, log=audit, env=env
        )
        _wait_http(f"http://127.0.0.1:{port}/readyz", proc, name)
        self.kp_pids[name] = proc.pid
        base = f"http://127.0.0.1:{port}"
        credential = self.token_file
        if limited:
            credential = task_token(base, self.token_file, self.workdir / f"{name}.token")
        return Candidate(name, base, "/r/bench", credential, proc.pid)

    def stop(self, cand: Candidate) -> None:
        for name, proc in list(self.procs.started):
            if proc.pid == cand.pid:
                self.procs.stop(proc)
                del self.kp_pids[name]


def streams_phase(
    stack: Stack, nginx_bin: str, args: argparse.Namespace
) -> list[stream_load.Result]:
    """N concurrent paced streams through each candidate, for each N of `--streams`: the
    proxies start afresh for each N (so resident memory grown by the N before does not hide
    this one's), the stream upstream and the client processes run on the load's cores."""
    workdir, procs = stack.workdir, stack.procs
    load_cpus = {int(LOAD_CPU)} if procs.pinning else None
    up_port = _free_port()
    upstreams = []
    for i in range(args.stream_upstreams):  # one port, shared with SO_REUSEPORT
        proc = procs.start(
            f"stream-upstream-{i}",
            [
                sys.executable,
                str(BENCH / "streams.py"),
                "upstream",
                str(up_port),
                str(stack.key_file),
            ],
            cpu=LOAD_CPU,
            log=workdir / f"stream-upstream-{i}.log",
        )
        _wait_port(up_port, proc, "stream upstream")
        upstreams.append(proc)
    upstream = f"http://127.0.0.1:{up_port}"
    key = stack.key_file.read_text(encoding="utf-8").strip()
    token = stack.token_file.read_text(encoding="utf-8").strip()
    query = "/stream"
    results: list[stream_load.Result] = []
    hard = stream_load.raise_fd_limit()
    for n in args.streams:
        if hard < 2 * n + 1024:  # a proxy holds two descriptors a stream
            print(f"bench: the open-file limit ({hard}) is too low for {n} streams", flush=True)
        ngx_port, mini_port = _free_port(), _free_port()
        conf = _nginx_proxy_conf(
            workdir / f"streams-nginx-{n}.conf",
            workdir,
            ports=(ngx_port, up_port),
            key=key,
            connections=2 * n + 1024,
            nofile=min(4 * n + 4096, hard),
        )
        ngx = procs.start(
            f"streams-nginx-{n}",
            [nginx_bin, "-c", str(conf), "-p", str(workdir)],
            cpu=PROXY_CPU,
            log=workdir / f"streams-nginx-{n}.log",
        )
        mini = procs.start(
            f"streams-minimal-{n}",
            [
                sys.executable,
                str(BENCH / "minimal_proxy.py"),
                str(mini_port),
                upstream,
                str(stack.key_file),
            ],
            cpu=PROXY_CPU,
            log=workdir / f"streams-minimal-{n}.log",
        )
        _wait_port(ngx_port, ngx, "nginx (streams)")
        _wait_port(mini_port, mini, "minimal proxy (streams)")
        # Every stream comes from 127.0.0.1: the per-source connection limit would refuse them.
        limits = {"max_connections": 4 * n + 1024, "max_connections_per_source": 4 * n + 1024}
        kp = stack.keyproxy(
            f"keyproxy-streams-{n}", 10, 1, PROXY_CPU, upstream=upstream, server=limits
        )
        kp_port = int(kp.base.rsplit(":", 1)[1])
        targets = [
            (stream_load.Target("direct", "127.0.0.1", up_port, query, f"Bearer {key}"), None),
            (
                stream_load.Target(
                    "nginx", "127.0.0.1", ngx_port, "/r/bench" + query, f"Bearer {token}"
                ),
                ngx.pid,
            ),
            (
                stream_load.Target(
                    "minimal-aiohttp", "127.0.0.1", mini_port, "/r/bench" + query, f"Bearer {token}"
                ),
                mini.pid,
            ),
            (
                stream_load.Target(
                    "keyproxy", "127.0.0.1", kp_port, "/r/bench" + query, f"Bearer {token}"
                ),
                kp.pid,
            ),
        ]
        for target, pid in targets:
            # Warm-up: connections, the token cache, the key.
            warm = min(n, 50)
            stream_load.measure(
                target, warm, 1.0, clients=1, cpus=load_cpus, cpu_seconds=None, rss_kib=None
            )
            result = stream_load.measure(
                target,
                n,
                args.stream_seconds,
                clients=args.stream_clients,
                cpus=load_cpus,
                cpu_seconds=(lambda p=pid: _cpu_seconds(p)) if pid else None,
                rss_kib=(lambda p=pid: _rss_kib(p)) if pid else None,
            )
            results.append(result)
            print(stream_load.line(result), flush=True)
        procs.stop(ngx)
        procs.stop(mini)
        stack.stop(kp)
    for proc in upstreams:
        procs.stop(proc)
    return results


def _count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for line in f if b'"event":"request"' in line)


def run(args: argparse.Namespace) -> Path:  # noqa: PLR0912, PLR0915  # reads top to bottom, phase by phase
    tools = ensure_tools()
    pinning = _taskset_works()
    workdir = Path(tempfile.mkdtemp(prefix="keyproxy-bench-"))
    procs = Processes(pinning)
    bao = OpenBaoDevServer(workdir / "openbao")
    all_runs: list[Run] = []
    stream_results: list[stream_load.Result] = []
    rss: dict[str, int] = {}
    sse: dict[str, Any] = {}
    try:
        print(f"bench: work directory {workdir}; pinning {'on' if pinning else 'off'}", flush=True)
        bao.start()
        if pinning:
            # The dev server serves key refreshes; keep it off the proxies' core.
            os.sched_setaffinity(bao._proc.pid, {int(LOAD_CPU)})  # type: ignore[union-attr]
        setup = bao.setup()
        agent = bao.add_agent("bench-agent")
        key = "sk-bench-" + secrets.token_urlsafe(24)
        bao.put_key("keyproxy/keys/bench", key)
        _put_keys(bao, 999 if "routes" in args.phases else 9)
        key_file = _write_private(workdir / "key", key)
        token_file = _write_private(workdir / "token", bao.agent_token(agent))
        (workdir / "nginx-tmp").mkdir()
        large = workdir / "large.json"
        large.write_text(json.dumps({"data": "x" * (LARGE_BYTES - 12)}), encoding="utf-8")
        # nginx workers run as an unprivileged user: they must reach this one file (the key
        # files beside it stay mode 600).
        large.chmod(0o644)
        workdir.chmod(0o711)

        sse_port, up_port, ngx_port, mini_port = (_free_port() for _ in range(4))
        sse_proc = procs.start(
            "sse-upstream",
            [sys.executable, str(BENCH / "sse_upstream.py"), str(sse_port)],
            cpu=LOAD_CPU,
            log=workdir / "sse-upstream.log",
        )
        up_conf = (BENCH / "nginx" / "upstream.conf").read_text(encoding="utf-8")
        conf = _write_private(
            workdir / "upstream-nginx.conf",
            up_conf.format(workdir=workdir, port=up_port, sse_port=sse_port, key=key),
        )
        upstream_proc = procs.start(
            "upstream-nginx",
            [tools["nginx"], "-c", str(conf), "-p", str(workdir)],
            cpu=LOAD_CPU,
            log=workdir / "upstream-nginx.log",
        )
        upstream = f"http://127.0.0.1:{up_port}"
        conf = _nginx_proxy_conf(
            workdir / "proxy-nginx.conf",
            workdir,
            ports=(ngx_port, up_port),
            key=key,
            connections=4096,
            nofile=8192,
        )
        nginx_proc = procs.start(
            "nginx",
            [tools["nginx"], "-c", str(conf), "-p", str(workdir)],
            cpu=PROXY_CPU,
            log=workdir / "proxy-nginx.log",
        )
        mini_proc = procs.start(
            "minimal-aiohttp",
            [
                sys.executable,
                str(BENCH / "minimal_proxy.py"),
                str(mini_port),
                upstream,
                str(key_file),
            ],
            cpu=PROXY_CPU,
            log=workdir / "minimal.log",
        )
        stack = Stack(
            workdir, procs, bao, setup, agent, upstream, token_file, key_file, args.source
        )
        _wait_port(up_port, upstream_proc, "upstream nginx")
        _wait_port(sse_port, sse_proc, "sse upstream")
        _wait_port(ngx_port, nginx_proc, "nginx")
        _wait_port(mini_port, mini_proc, "minimal proxy")

        direct = Candidate("direct", upstream, "", key_file)
        nginx = Candidate(
            "nginx", f"http://127.0.0.1:{ngx_port}", "/r/bench", token_file, nginx_proc.pid
        )
        mini = Candidate(
            "minimal-aiohttp",
            f"http://127.0.0.1:{mini_port}",
            "/r/bench",
            token_file,
            mini_proc.pid,
        )
        kp = stack.keyproxy("keyproxy", 10, 1, PROXY_CPU)
        main_set = [direct, nginx, mini, kp]
        if args.compare is not None:  # a change measured side by side with the current code
            main_set.append(
                stack.keyproxy("keyproxy-compare", 10, 1, PROXY_CPU, source=args.compare)
            )

        if "main" in args.phases:
            print("bench: phase main", flush=True)
            streams: dict[str, list[dict[str, Any]]] = {cand.name: [] for cand in main_set}
            for _ in range(SSE_STREAMS):  # interleaved, like the load runs
                for cand in main_set:
                    streams[cand.name].append(asyncio.run(sse_delivery(cand)))
            sse = {name: _median_stream(runs) for name, runs in streams.items()}
            all_runs += measure(
                procs,
                tools["wrk"],
                "main",
                candidates=main_set,
                bodies=args.bodies,
                concs=args.concs,
                reps=args.reps,
                seconds=args.duration,
            )
            rss["keyproxy (10 routes, after main)"] = _peak_rss_kib(kp.pid or 0)
        procs.stop(nginx_proc)
        procs.stop(mini_proc)

        if "routes" in args.phases:
            print("bench: phase routes", flush=True)
            kp1000 = stack.keyproxy("keyproxy-1000", 1000, 1, PROXY_CPU)
            kp10 = Candidate("keyproxy-10", kp.base, kp.prefix, kp.credential, kp.pid)
            all_runs += measure(
                procs,
                tools["wrk"],
                "routes",
                candidates=[kp10, kp1000],
                bodies=["small"],
                concs=[32, 128],
                reps=args.reps + 1,
                seconds=args.duration,
            )
            rss["keyproxy (1,000 routes)"] = _peak_rss_kib(kp1000.pid or 0)
            stack.stop(kp1000)
        stack.stop(kp)

        if "workers" in args.phases:
            print("bench: phase workers", flush=True)
            w1 = stack.keyproxy("keyproxy-w1", 10, 1, None)
            w2 = stack.keyproxy("keyproxy-w2", 10, 2, None)
            all_runs += measure(
                procs,
                tools["wrk"],
                "workers",
                candidates=[w1, w2],
                bodies=["small"],
                concs=[32, 128],
                reps=args.reps,
                seconds=args.duration,
            )
            rss["keyproxy --workers 2 (parent + workers)"] = _peak_rss_kib(w2.pid or 0)
            stack.stop(w1)
            stack.stop(w2)

        if "limits" in args.phases:
            print("bench: phase limits", flush=True)
            store = LocalStoreServer(workdir / "valkey")
            store.start()
            try:
                if pinning and store.process is not None:
                    os.sched_setaffinity(store.process.pid, {int(LOAD_CPU)})
                stack.state_url = store.url
                plain = stack.keyproxy("keyproxy-nolimits", 10, 1, PROXY_CPU)
                limited = stack.keyproxy("keyproxy-limits", 10, 1, PROXY_CPU, limited=True)
                all_runs += measure(
                    procs,
                    tools["wrk"],
                    "limits",
                    candidates=[plain, limited],
                    bodies=["small"],
                    concs=[32, 128],
                    reps=args.reps,
                    seconds=args.duration,
                )
                stack.stop(plain)
                stack.stop(limited)
            finally:
                store.stop()
        if "streams" in args.phases:
            print("bench: phase streams", flush=True)
            stream_results = streams_phase(stack, tools["nginx"], args)
        audit_events = {name: _count_lines(path) for name, path in stack.audit.items()}
    finally:
        procs.stop_all()
        bao.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    rows = summarise(all_runs)
    checks = verdicts(rows, sse)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    meta = {
        "timestamp": stamp,
        "command": " ".join(["bench/run.py", *sys.argv[1:]]),
        "keyproxy_src": str(args.source or ROOT),
        "cpus": os.cpu_count(),
        "pinning": pinning,
        "duration_s": args.duration,
        "reps": args.reps,
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "nginx": subprocess.run(
            [tools["nginx"], "-v"], capture_output=True, text=True, check=False
        ).stderr.strip(),
        "peak_rss_kib": rss,
        "audit_events": audit_events,
    }
    RESULTS.mkdir(exist_ok=True)
    result = {
        "meta": meta,
        "runs": [vars(r) for r in all_runs],
        "summary": rows,
        "sse": sse,
        "streams": [vars(r) for r in stream_results],
        "checks": checks,
    }
    (RESULTS / f"{stamp}.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    table = markdown(meta, rows, sse, checks)
    if stream_results:
        table += "\n" + stream_load.markdown(stream_results, args.stream_seconds)
    out = RESULTS / f"{stamp}.md"
    out.write_text(table, encoding="utf-8")
    print(table)
    return out


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not listening on {port} within {timeout:g}s")
        time.sleep(0.05)  # polling interval of a bounded wait


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per wrk run")
    parser.add_argument("--reps", type=int, default=2, help="interleaved repetitions")
    parser.add_argument("--quick", action="store_true", help="1 s runs, 1 rep (a smoke test)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--keyproxy-src",
        dest="source",
        type=Path,
        default=os.environ.get("KEYPROXY_SRC") or None,
        help="run keyproxy from this directory (a patched copy), not the installed package",
    )
    parser.add_argument(
        "--compare",
        type=Path,
        default=None,
        help="main phase: also run keyproxy from this directory, as candidate keyproxy-compare",
    )
    parser.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"comma-separated subset of {','.join(PHASES)} (to measure one change quickly)",
    )
    parser.add_argument(
        "--streams",
        default=None,
        help="streams phase: concurrent streams, each N in turn (1000,4000; 200 with --quick)",
    )
    parser.add_argument(
        "--stream-seconds",
        type=float,
        default=None,
        help="streams phase: seconds per stream (10; 5 with --quick)",
    )
    parser.add_argument(
        "--stream-clients", type=int, default=4, help="streams phase: client processes"
    )
    parser.add_argument(
        "--stream-upstreams", type=int, default=2, help="streams phase: upstream processes"
    )
    parser.add_argument("--bodies", default=",".join(BODIES), help="main phase: bodies")
    parser.add_argument(
        "--concs", default=",".join(map(str, CONCURRENCY)), help="main phase: connections"
    )
    args = parser.parse_args(argv)
    args.phases = set(args.phases.split(","))
    args.bodies = args.bodies.split(",")
    args.concs = [int(c) for c in args.concs.split(",")]
    args.streams = [
        int(n) for n in (args.streams or ("200" if args.quick else "1000,4000")).split(",")
    ]
    if args.stream_seconds is None:
        args.stream_seconds = 5.0 if args.quick else 10.0
    unknown = (args.phases - set(PHASES)) | (set(args.bodies) - set(BODIES))
    if unknown:
        parser.error(f"unknown phase or body: {', '.join(sorted(unknown))}")
    if args.quick:
        args.duration, args.reps = 1.0, 1
    signal.signal(signal.SIGTERM, _raise_interrupt)  # so `finally` stops everything
    stream_load.raise_fd_limit()  # inherited by every process started here
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
