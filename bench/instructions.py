"""Instructions per request, counted by callgrind: keyproxy against the minimal aiohttp proxy.

Wall-clock numbers on a shared machine move by 10-20% between runs, more than most single
changes to the request path are worth. The number of instructions a request takes does not:
the same code gives the same count to within about 1%. It counts user-space instructions
only (no system calls, no cache misses), so it ranks changes to the per-request work; the
wall-clock table of `bench/run.py` stays the measure of the result.

    .venv/bin/python bench/instructions.py [--seconds 12] [--compare DIR ...] [--body large]
                                           [--routes 1000] [--limits] [--conc 32]

Each proxy runs under `valgrind --tool=callgrind` with counting off, is warmed up by 5 s of
wrk at c=1 on the answer (`--body`: the small JSON, the 64 KiB one or the event stream of
bench/run.py), then counted over `--seconds` more (its main thread only: the key refresh
runs in executor threads), less what it counts in 6 s without requests (per second of the
loaded run): the key index and revocation polls would otherwise be shared by fewer requests
in a slower run.
`--compare` may be given several times: each patched copy runs as
`keyproxy-compare-<its directory's name>`, one after the other in the same set-up.
`--routes` configures that many routes and policies (bench/run.py's routes phase).
`--limits` adds `keyproxy-limits`: the limits phase's candidate (a rate limit and a task
token's max_uses counted in a local Valkey/Redis on every request). `--conc` counts at that
many connections instead of 1 (the warm-up stays at 1): where requests overlap, as the
decisions of one event-loop turn share a round trip to Valkey/Redis.
valgrind is installed from Debian's packages if missing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from keyproxy.devserver import OpenBaoDevServer
from keyproxy.storeserver import LocalStoreServer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # the benchmark's own set-up, reused

WARM_UP_S = 5
IDLE_S = 6  # seconds counted without requests


def _valgrind() -> None:
    found = shutil.which("valgrind")
    if found is None:
        print("instructions: installing valgrind (apt-get)", flush=True)
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", "valgrind"], check=True, env=env)
        found = shutil.which("valgrind")
    if found is None or shutil.which("callgrind_control") is None:
        raise RuntimeError("valgrind is still missing after apt-get install")


def _callgrind_control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def _main_thread_instructions(out: Path, dump: int) -> int:
    """The main thread's count in dump number `dump` (`--separate-threads`: one file per
    thread, `<out>.<dump>-<thread>`, the main thread's `-01`). Its `totals` line: the
    `summary` line of a second dump can be garbage (2**64 less a few million)."""
    path = out.parent / f"{out.name}.{dump}-01"
    if not path.exists():
        return 0
    found = re.search(r"^totals:\s+(\d+)", path.read_text(encoding="utf-8", errors="replace"), re.M)
    return int(found.group(1)) if found else 0


def _dumped(pid: int, out: Path, dump: int, name: str) -> int:
    _callgrind_control(pid, "--dump")
    deadline = time.monotonic() + 60
    while not (count := _main_thread_instructions(out, dump)):  # the dump is written meanwhile
        if time.monotonic() > deadline:
            raise RuntimeError(f"no callgrind dump from {name}")
        time.sleep(0.2)  # polling interval of a bounded wait
    return count


def _count(
    procs: bench.Processes,
    wrk: str,
    workdir: Path,
    name: str,
    argv: list[str],
    *,
    port: int,
    token_file: Path,
    env: dict[str, str],
    seconds: float,
    path: str,
    conc: int = 1,
    token: Callable[[str], Path] | None = None,
) -> dict[str, object]:
    """Start `argv` under callgrind, warm it up, count `seconds` of requests at `conc`
    connections (with the credential `token(base URL)`, or `token_file`)."""
    out = workdir / f"callgrind.{name}"
    counted = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes"]
    proc = procs.start(
        name,
        [*counted, f"--callgrind-out-file={out}", *argv],
        log=workdir / f"{name}.audit.jsonl",
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    if name == "minimal-aiohttp":
        bench._wait_port(port, proc, name, timeout=300)
    else:
        bench._wait_http(f"{base}/readyz", proc, name, timeout=300)
    credential = token(base) if token is not None else token_file
    cand = bench.Candidate(name, base, "/r/bench", credential, proc.pid)
    bench.wrk(procs, wrk, cand, path=path, conc=1, seconds=WARM_UP_S)
    _callgrind_control(proc.pid, "--instr=on")
    # What the process does without requests (key index and revocation polls, timers).
    started = time.monotonic()
    time.sleep(IDLE_S)
    idle = _dumped(proc.pid, out, 1, name) / (time.monotonic() - started)
    started = time.monotonic()
    run = bench.wrk(procs, wrk, cand, path=path, conc=conc, seconds=seconds)
    _callgrind_control(proc.pid, "--instr=off")
    loaded_for = time.monotonic() - started
    count = _dumped(proc.pid, out, 2, name)
    procs.stop(proc)
    requests = int(run["requests"])
    row: dict[str, object] = {"candidate": name, "requests": requests, "instructions": count}
    row["idle_per_s"] = round(idle)
    row["raw_per_request"] = round(count / max(requests, 1))
    row["per_request"] = round((count - idle * loaded_for) / max(requests, 1))
    print(json.dumps(row), flush=True)
    return row


def _upstream(procs: bench.Processes, nginx_binary: str, workdir: Path, key: str) -> str:
    """The bench's nginx upstream (and the event streams' upstream behind it), started; its
    URL."""
    (workdir / "nginx-tmp").mkdir()
    large = json.dumps({"data": "x" * (bench.LARGE_BYTES - 12)})  # as bench/run.py's
    (workdir / "large.json").write_text(large, encoding="utf-8")
    workdir.chmod(0o711)
    port, sse_port = bench._free_port(), bench._free_port()
    sse = [sys.executable, str(bench.BENCH / "sse_upstream.py"), str(sse_port)]
    sse_proc = procs.start("sse-upstream", sse, log=workdir / "sse-upstream.log")
    bench._wait_port(sse_port, sse_proc, "sse upstream")
    conf = bench._write_private(
        workdir / "upstream-nginx.conf",
        (bench.BENCH / "nginx" / "upstream.conf")
        .read_text(encoding="utf-8")
        .format(workdir=workdir, port=port, sse_port=sse_port, key=key),
    )
    nginx = [nginx_binary, "-c", str(conf), "-p", str(workdir)]
    upstream_proc = procs.start("upstream", nginx, log=workdir / "upstream.log")
    bench._wait_port(port, upstream_proc, "upstream nginx")
    return f"http://127.0.0.1:{port}"


def _keyproxy_argv(config: Path, port: int) -> list[str]:
    return [
        str(bench.KEYPROXY),
        "serve",
        "-c",
        str(config),
        "--port",
        str(port),
        "--admin-port",
        "0",
    ]


def measure(
    compare: list[Path],
    seconds: float,
    body: str = "small",
    routes: int = 10,
    keep: Path | None = None,
    *,
    limits: bool = False,
    conc: int = 1,
) -> list[dict[str, object]]:
    _valgrind()
    tools = bench.ensure_tools()
    workdir = Path(tempfile.mkdtemp(prefix="keyproxy-instructions-"))
    procs = bench.Processes(pinning=False)
    bao = OpenBaoDevServer(workdir / "openbao")
    store = LocalStoreServer(workdir / "valkey")
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    try:
        bao.start()
        setup = bao.setup()
        agent = bao.add_agent("bench-agent")
        key = "sk-bench-" + secrets.token_urlsafe(24)
        bao.put_key("keyproxy/keys/bench", key)
        bench._put_keys(bao, routes - 1)  # ten routes: the same as the main phase
        key_file = bench._write_private(workdir / "key", key)
        token_file = bench._write_private(workdir / "token", bao.agent_token(agent))
        upstream = _upstream(procs, tools["nginx"], workdir, key)

        def count(
            name: str,
            argv: list[str],
            port: int,
            env: dict[str, str],
            token: Callable[[str], Path] | None = None,
        ) -> dict[str, object]:
            return _count(
                procs,
                tools["wrk"],
                workdir,
                name,
                argv,
                port=port,
                token_file=token_file,
                env=env,
                seconds=seconds,
                path=bench.BODIES[body],
                conc=conc,
                token=token,
            )

        mini_port = bench._free_port()
        mini = [sys.executable, str(bench.BENCH / "minimal_proxy.py"), str(mini_port)]
        results = [count("minimal-aiohttp", [*mini, upstream, str(key_file)], mini_port, clean_env)]
        candidates: list[tuple[str, Path | None]] = [("keyproxy", None)]
        candidates += [(f"keyproxy-compare-{source.resolve().name}", source) for source in compare]
        if limits:
            store.start()
            candidates += [(f"{name}-limits", source) for name, source in candidates]
        for name, source in candidates:
            path = bench.config_file(workdir, name)
            config = bench.keyproxy_config(bao, setup, agent, upstream, routes)
            token = None
            if name.endswith("-limits"):
                bench.limit_every_request(config, store.url)

                def token(base: str, name: str = name) -> Path:
                    return bench.task_token(base, token_file, workdir / f"{name}.token")

            path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
            kp_port = bench._free_port()
            argv = _keyproxy_argv(path, kp_port)
            env = clean_env | ({"PYTHONPATH": str(source)} if source is not None else {})
            results.append(count(name, argv, kp_port, env, token))
    finally:
        procs.stop_all()
        store.stop()
        bao.stop()
        if keep is not None:  # for callgrind_annotate
            keep.mkdir(parents=True, exist_ok=True)
            for dump in workdir.glob("callgrind.*"):
                shutil.copy(dump, keep)
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=12)
    parser.add_argument(
        "--compare",
        type=Path,
        action="append",
        default=[],
        help="a directory holding a patched keyproxy/ (may be repeated)",
    )
    parser.add_argument("--body", choices=sorted(bench.BODIES), default="small")
    parser.add_argument("--routes", type=int, default=10)
    parser.add_argument("--keep", type=Path, help="copy the callgrind dumps into this directory")
    parser.add_argument("--limits", action="store_true", help="also count keyproxy with limits")
    parser.add_argument("--conc", type=int, default=1, help="connections while counting")
    args = parser.parse_args()
    results = measure(
        args.compare,
        args.seconds,
        args.body,
        args.routes,
        args.keep,
        limits=args.limits,
        conc=args.conc,
    )
    minimal = float(str(results[0]["per_request"]))
    print("\n| candidate | requests counted | instructions per request | x minimal |")
    print("|---|---:|---:|---:|")
    for row in results:
        per = float(str(row["per_request"]))
        print(f"| {row['candidate']} | {row['requests']} | {per:,.0f} | {per / minimal:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
