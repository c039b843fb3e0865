"""Commands that leave a helper behind: a shell that starts `sleep` in the background (holding
its stdout, as a daemon that forgets to close it would), records the PIDs and goes on.

`Helpers` hands out the commands and, at the end of the test, kills by PID every helper they
recorded that is still there, so no test leaves a process running whatever it proved.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from tests.helpers.polling import eventually

# `$0` is the PID file: "<shell's PID> <helper's PID>", written whole (renamed into place).
_RECORD = 'echo "$$ $!" > "$0.tmp" && mv "$0.tmp" "$0"'


def running(pid: int) -> bool:
    """Whether process `pid` exists and has not exited (a zombie has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


class Helpers:
    """The helper-leaving commands of one test, and the PIDs they recorded."""

    def __init__(self, workdir: Path) -> None:
        self._workdir = workdir
        self._files: list[Path] = []

    def command(self, start: str = "sleep 300", then: str = "exit 0") -> list[str]:
        """argv of a shell that runs `start` in the background (it keeps the shell's stdout),
        records both PIDs, then runs `then`."""
        pidfile = self._workdir / f"helper-{len(self._files)}.pid"
        self._files.append(pidfile)
        return ["sh", "-c", f"{start} & {_RECORD}; {then}", str(pidfile)]

    def pids(self, index: int = 0) -> tuple[int, int] | None:
        """(shell, helper) PIDs of the `index`th command, or None before it recorded them."""
        try:
            shell, helper = self._files[index].read_text().split()
        except FileNotFoundError:
            return None
        return int(shell), int(helper)

    async def started(self, index: int = 0) -> tuple[int, int]:
        """(shell, helper) PIDs of the `index`th command, once it has recorded them."""
        pids = await eventually(lambda: self.pids(index), "the command has started its helper")
        assert pids is not None
        return pids

    def kill_all(self) -> None:
        """SIGKILL to every recorded process still running `sleep` (the PID not reused)."""
        for index in range(len(self._files)):
            for pid in self.pids(index) or ():
                with contextlib.suppress(OSError):
                    if b"sleep" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        os.kill(pid, signal.SIGKILL)
