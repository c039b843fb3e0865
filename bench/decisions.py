"""CPU per limit decision in the Valkey/Redis state store, N decisions in flight at once.

    .venv/bin/python bench/decisions.py [--concurrency 32] [--rounds 400] [--repeat 5]

With PYTHONPATH=DIR it measures the keyproxy package in DIR (a copy of other code).

Starts a local `valkey-server`/`redis-server` (keyproxy.storeserver), then runs `--rounds`
rounds of `--concurrency` concurrent `RedisStore.take` calls, each over the limits of the
bench's `limits` candidate (a per-identity rate that never refuses and a task token's
`max_uses`). Reported: this process's CPU time (user + system, not the server's) and the
wall-clock time per decision, the best of `--repeat` runs (the machine is shared: the best
is the least disturbed). Compare numbers with each other on one machine, not across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from keyproxy.config import RedisSettings
from keyproxy.state.redis import RedisStore
from keyproxy.state.store import Counter, Limit, Rate
from keyproxy.storeserver import LocalStoreServer


async def _run(url: str, concurrency: int, rounds: int, repeat: int) -> tuple[float, float]:
    store = RedisStore(RedisSettings(url=url, timeout=2.0))
    limits: list[Limit] = [
        Rate("bench:identity", limit=10**9, window=1.0, burst=10**9),
        Counter("bench:token", cap=10**9, ttl=3600),
    ]
    best_cpu = best_wall = float("inf")
    try:
        for _ in range(3):  # warm up: connections, the script cache
            await asyncio.gather(*(store.take(limits) for _ in range(concurrency)))
        for _ in range(repeat):
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(rounds):
                decisions = await asyncio.gather(*(store.take(limits) for _ in range(concurrency)))
                assert all(decision.allowed for decision in decisions)
            decisions_made = rounds * concurrency
            best_cpu = min(best_cpu, (time.process_time() - cpu) / decisions_made)
            best_wall = min(best_wall, (time.perf_counter() - wall) / decisions_made)
    finally:
        await store.close()
    return best_cpu, best_wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=400)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        server = LocalStoreServer(Path(workdir))
        server.start()
        try:
            if hasattr(os, "sched_getaffinity"):
                print(f"decisions: {len(os.sched_getaffinity(0))} CPUs", flush=True)
            cpu, wall = asyncio.run(_run(server.url, args.concurrency, args.rounds, args.repeat))
        finally:
            server.stop()
    print(
        f"decisions: {args.concurrency} in flight: {cpu * 1e6:.1f} us CPU, "
        f"{wall * 1e6:.1f} us wall-clock per decision"
    )


if __name__ == "__main__":
    main()
