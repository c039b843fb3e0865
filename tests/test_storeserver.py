"""`keyproxy.storeserver`: a local Valkey/Redis server, started, answering, stopped by PID;
and `keyproxy dev --redis` counting its limits there."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import redis

from keyproxy.storeserver import LocalStoreServer, StoreServerError

BIN = Path(sys.executable).parent


def test_local_server_starts_answers_and_stops(tmp_path: Path) -> None:
    """The server answers PING on 127.0.0.1 once started, keeps nothing on disk, and is
    gone after stop()."""
    server = LocalStoreServer(tmp_path / "store")
    server.start()
    try:
        with redis.Redis.from_url(server.url, socket_timeout=2) as client:
            assert client.ping()
            assert client.config_get("save") == {"save": ""}
            assert client.config_get("appendonly") == {"appendonly": "no"}
    finally:
        server.stop()
    assert not server.answers()
    gone = redis.Redis.from_url(server.url, socket_timeout=2)
    with pytest.raises(redis.exceptions.ConnectionError):
        gone.ping()
    gone.close()


def test_a_missing_binary_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without valkey-server or redis-server on PATH, start() says which binaries it needs."""
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(StoreServerError, match="neither valkey-server nor redis-server"):
        LocalStoreServer(tmp_path / "store").start()


def test_dev_redis_counts_limits_in_its_own_server(log_dir: Path, tmp_path: Path) -> None:
    """`keyproxy dev --json --redis` starts a Valkey/Redis server, names it in its handshake
    (`state_url`), the admin readiness reports it, and it is stopped with the stack."""
    out = log_dir / "dev-redis.out"
    argv = [str(BIN / "keyproxy"), "dev", "--json", "--redis", "--port", "0"]
    with out.open("wb") as stdout, (log_dir / "dev-redis.err").open("wb") as stderr:
        proc = subprocess.Popen(
            [*argv, "--env-file", str(tmp_path / "dev.env")],
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + 90
        while not out.read_bytes().endswith(b"\n"):
            assert proc.poll() is None, "keyproxy dev exited"
            assert time.monotonic() < deadline, "no handshake within 90 s"
            time.sleep(0.1)  # polling for the handshake line, bounded by the deadline
        info = json.loads(out.read_bytes().split(b"\n", 1)[0])
        with redis.Redis.from_url(info["state_url"], socket_timeout=2) as client:
            assert client.ping()
        with urllib.request.urlopen(info["admin_url"] + "/readyz", timeout=10) as answer:  # noqa: S310  # loopback
            assert json.load(answer)["state_store"] == {"ok": True, "detail": ""}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 0
    gone = redis.Redis.from_url(info["state_url"], socket_timeout=2)
    with pytest.raises(redis.exceptions.ConnectionError):
        gone.ping()
    gone.close()
