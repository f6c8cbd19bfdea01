"""`python -m devstack up` (what `make up` runs) in a process of its own, its output read line by line."""

from __future__ import annotations

import queue
import re
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence

from devstack.processes import Deadline
from devstack.supervisor import REPO_ROOT


class DevstackUp:
    """The supervisor as a child of the test, with its stdout and stderr collected by a thread."""

    def __init__(self, args: Sequence[str], env: Mapping[str, str]) -> None:
        """Start `python -m devstack up ARGS` with exactly `env` as its environment."""
        self.process = subprocess.Popen(
            [sys.executable, "-m", "devstack", "up", *args],
            cwd=REPO_ROOT,
            env=dict(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)

    def read_until(self, marker: str, timeout: float) -> str:
        """Read output until a line containing `marker`; return everything read so far (since the start)."""
        self.read_until_match(re.compile(re.escape(marker)), timeout)
        return "".join(self.seen)

    def read_until_match(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        """Read output until a line in which `pattern` is found; return the match."""
        deadline = Deadline(timeout)
        while not deadline.expired():
            try:
                line = self.lines.get(timeout=deadline.remaining())
            except queue.Empty:
                break
            self.seen.append(line)
            if (found := pattern.search(line)) is not None:
                return found
        raise AssertionError(f"no {pattern.pattern!r} within {timeout}s; output:\n{''.join(self.seen)}")

    def wait(self, timeout: float) -> str:
        """Wait for the exit; return the output after what read_until saw."""
        self.process.wait(timeout=timeout)
        self._reader.join(timeout=5)
        rest: list[str] = []
        while not self.lines.empty():
            rest.append(self.lines.get())
        self.seen.extend(rest)
        return "".join(rest)

    def kill(self) -> None:
        """Stop a supervisor that a failed assertion left running (SIGTERM lets it clean up)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
