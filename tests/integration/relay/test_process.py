"""`python -m relay` as two real processes: SIGKILL the active one, the standby takes over, nothing is lost."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from relay.settings import DEFAULT_LOCK_KEY
from tessera.events.v1.envelope_pb2 import EventEnvelope
from tests.integration.relay.conftest import RelayHarness
from tests.integration.relay.support import (
    ChannelRecorder,
    assert_gap_free,
    ids_of,
    insert_events,
    lock_holder_pid,
    wait_until,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]
TAKEOVER_DEADLINE_S = 10.0


def relay_env(database_url: str, redis_url: str, prefix: str, **relay: str) -> dict[str, str]:
    """Environment for `python -m relay`: this process's, less OTEL_/RELAY_ settings, plus the test's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "RELAY_"))}
    env.update(
        DATABASE_URL=database_url, REDIS_URL=redis_url, REDIS_KEY_PREFIX=prefix, LOG_FORMAT="json", LOG_LEVEL="INFO"
    )
    env.update(relay)
    return env


class RelayProcess:
    """A `python -m relay` child whose JSON log lines are collected as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.records: list[dict[str, Any]] = []
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, env: dict[str, str]) -> RelayProcess:
        """Start a relay process with `env`."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "relay",
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode(errors="replace").strip()
            try:
                self.records.append(json.loads(line))
            except ValueError:
                self.records.append({"message": line})

    @property
    def role(self) -> str | None:
        """The last role this process logged."""
        roles = [r["role"] for r in self.records if "role" in r]
        return roles[-1] if roles else None

    def logged(self, message: str) -> bool:
        """Whether any log line's message contains `message`."""
        return any(message in str(r.get("message", "")) for r in self.records)

    async def wait(self, timeout: float) -> int:
        """Wait for the process to exit and its log to be read; return its exit status."""
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.wait_for(self._reader, timeout)
        return code

    async def kill(self) -> None:
        """SIGKILL the process if it still runs, and reap it."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        await self.proc.wait()
        self._reader.cancel()
        await asyncio.wait({self._reader})


async def test_sigkill_of_the_active_process_fails_over_without_losing_events(
    relays: RelayHarness,
    database_url: str,
    redis_server_url: str,
    redis_prefix: str,
    published: ChannelRecorder[EventEnvelope],
) -> None:
    env = relay_env(
        database_url,
        redis_server_url,
        redis_prefix,
        RELAY_STANDBY_RETRY_S="0.2",
        RELAY_POLL_INTERVAL_S="0.5",
        RELAY_HEARTBEAT_INTERVAL_S="0.5",
    )
    processes = [await RelayProcess.start(env) for _ in range(2)]
    try:
        await wait_until(
            lambda: sorted(str(p.role) for p in processes) == ["active", "standby"], 30, "one active, one standby"
        )
        active = next(p for p in processes if p.role == "active")
        standby = next(p for p in processes if p is not active)
        before = await insert_events(relays.pool, "a", 20)
        await published.wait_for(lambda m: ids_of(before) <= {e.event_id for e in m}, what="events before the kill")

        active.proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        # Written while no relay is active: the new one must pick them up.
        during = await insert_events(relays.pool, "a", 20)
        await wait_until(lambda: standby.role == "active", TAKEOVER_DEADLINE_S, "the standby to take over")
        takeover_s = time.monotonic() - killed_at
        after = await insert_events(relays.pool, "a", 10)

        expected = ids_of(before + during + after)
        await published.wait_for(lambda m: expected <= {e.event_id for e in m}, what="every event")
        assert_gap_free(published.messages, expected)
        print(f"takeover after SIGKILL: {takeover_s:.2f}s")  # shown with -s; timing is reported, not asserted

        standby.proc.send_signal(signal.SIGTERM)
        assert await standby.wait(15) == 0
        assert standby.logged("relay stopped")
        assert await lock_holder_pid(relays.pool, DEFAULT_LOCK_KEY) is None
    finally:
        for process in processes:
            await process.kill()
