"""Process helpers: deadlines, liveness that ignores zombies, process trees and signals."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Self

_PROC = Path("/proc")


class StartStop:
    """`with thing:` starts it and stops it, whatever happened inside."""

    def start(self) -> Self:
        """Start; subclasses implement it."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop; subclasses implement it."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        """Start."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stop."""
        self.stop()


class Deadline:
    """A point in monotonic time that waits are bounded by."""

    def __init__(self, seconds: float) -> None:
        """Start a deadline `seconds` from now."""
        self._end = time.monotonic() + seconds

    def remaining(self) -> float:
        """Seconds left, never negative."""
        return max(0.0, self._end - time.monotonic())

    def expired(self) -> bool:
        """Whether the deadline has passed."""
        return time.monotonic() >= self._end


def poll_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Call `predicate` until it returns True or `timeout` passes; return its last answer."""
    deadline = Deadline(timeout)
    while True:
        if predicate():
            return True
        if deadline.expired():
            return False
        time.sleep(min(interval, deadline.remaining()))


def _stat(pid: int) -> tuple[str, int] | None:
    """State letter and parent pid from /proc, or None when unknown."""
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may itself contain spaces or parentheses.
    fields = raw[raw.rfind(")") + 2 :].split()
    if len(fields) < 2:
        return None
    return fields[0], int(fields[1])


def pid_alive(pid: int) -> bool:
    """Whether `pid` names a running process (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = _stat(pid)
    return stat is None or stat[0] not in ("Z", "X")


def children(pid: int) -> list[int]:
    """Pids whose parent is `pid` (empty where /proc is unavailable)."""
    found: list[int] = []
    try:
        entries = list(_PROC.iterdir())
    except OSError:
        return found
    for entry in entries:
        if not entry.name.isdigit():
            continue
        stat = _stat(int(entry.name))
        if stat is not None and stat[1] == pid:
            found.append(int(entry.name))
    return found


def process_tree(pid: int) -> list[int]:
    """`pid` followed by all its living descendants."""
    tree = [pid]
    index = 0
    while index < len(tree):
        tree.extend(child for child in children(tree[index]) if child not in tree)
        index += 1
    return [p for p in tree if p == pid or pid_alive(p)]


def send_signal(pids: Iterable[int], sig: signal.Signals) -> None:
    """Send `sig` to every pid, ignoring those already gone."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """Send `sig` to a process group, ignoring a group that is already empty."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait until none of `pids` is alive or `timeout` passes; return the survivors."""
    remaining = list(pids)

    def all_gone() -> bool:
        remaining[:] = [pid for pid in remaining if pid_alive(pid)]
        return not remaining

    poll_until(all_gone, timeout)
    return remaining


def find_grpcurl() -> Path | None:
    """The grpcurl binary wrapper installed beside this interpreter (the dev extra), else the one on PATH."""
    found = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
    return Path(found) if found else None
