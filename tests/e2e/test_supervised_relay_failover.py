"""`make up`'s supervisor under a relay crash: kill -9 of the active relay while commands stream in.

The real `python -m devstack up` runs in a process of its own over a fresh database of the test
server and a private Redis key prefix; it migrates and starts the real services as `make up`
does. While RegisterUser commands stream into the write service, the relay that holds the
advisory lock is killed with SIGKILL. The standby must take the lock over and publish again,
the supervisor must start the killed relay again and it must come back as a standby, and every
event of the stream must reach both replicas: every registered user answers on each of them,
the views' checkpoint reaches the head of the log, and an independent subscriber saw every
position. Ctrl-C must then stop everything and leave no process behind.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis

from devstack.chaos import (
    PositionRecorder,
    head_position,
    lock_holder_port,
    outbox_state,
    pid_owning_connection,
    wait_drained,
)
from devstack.databases import create_database, drop_database
from devstack.processes import process_tree, wait_gone
from devstack.servers import find_free_port
from read_service.generations import served_checkpoint
from tessera.users.v1 import user_query_service_pb2 as qry
from tessera_client import TesseraClient, TesseraError
from tests.devstack_up import DevstackUp
from tests.e2e.conftest import FAST_HASHING

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

IN_FLIGHT = 4  # commands the stream keeps in flight
BEFORE_KILL = 40  # acknowledged commands before the kill
AFTER_RESTART = 40  # and after the killed relay is back
RESTARTED = re.compile(r"(relay-\d+) restarted \(pid (\d+)\)")


@pytest.fixture
async def fresh_database(postgres_admin_url: str) -> AsyncIterator[str]:
    """An empty database: `devstack up` applies the migrations itself, as `make up` does."""
    url = await create_database(postgres_admin_url, migrate=False)
    try:
        yield url
    finally:
        await drop_database(postgres_admin_url, url)


@pytest.fixture
async def key_prefix(redis_server_url: str) -> AsyncIterator[str]:
    """A Redis key prefix of this test alone; its keys are deleted afterwards."""
    prefix = f"e2e:{secrets.token_hex(5)}:"
    yield prefix
    client = aioredis.Redis.from_url(redis_server_url)
    keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def relay_pids(supervisor_pid: int) -> list[int]:
    """Pids of the relay processes below the supervisor (`python -m relay`)."""
    found = []
    for pid in process_tree(supervisor_pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[1:3] == [b"-m", b"relay"]:
            found.append(pid)
    return found


class CommandStream:
    """RegisterUser commands, IN_FLIGHT at a time, until stopped; remembers every acknowledged user.

    They go through the client library (a commands-only client: no read channel).
    """

    def __init__(self, write_address: str) -> None:
        self._client = TesseraClient(write_address, None, timeout=10.0)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.acknowledged: list[str] = []
        self.errors: list[str] = []

    def start(self) -> None:
        """Start the senders."""
        self._tasks = [asyncio.create_task(self._send()) for _ in range(IN_FLIGHT)]

    async def stop(self) -> None:
        """Let the commands in flight finish, then close the client."""
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._client.close()

    async def wait_acknowledged(self, count: int, timeout_s: float) -> None:
        """Wait until `count` commands were acknowledged in all."""
        deadline = time.monotonic() + timeout_s
        while len(self.acknowledged) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.acknowledged)} of {count} commands acknowledged; errors {self.errors}")
            await asyncio.sleep(0.02)

    async def _send(self) -> None:
        while not self._stop.is_set():
            unique = secrets.token_hex(6)
            try:
                reply = await self._client.users.register_user(
                    email=f"stream.{unique}@example.com",
                    username=f"stream_{unique}",
                    password="stream-Pa55word-e2e",
                    full_name="Stream User",
                )
            except TesseraError as error:
                self.errors.append(f"{error.code.name}: {error.message}")
                continue
            self.acknowledged.append(reply.user_id)


async def wait_new_holder(database_url: str, other_than: int, timeout_s: float) -> int:
    """The client port of the next session to hold the relay lock (other than `other_than`)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        port = await lock_holder_port(database_url)
        if port is not None and port != other_than:
            return port
        await asyncio.sleep(0.02)
    raise AssertionError(f"no relay took the lock within {timeout_s}s")


async def wait_head_beyond(database_url: str, position: int, timeout_s: float) -> None:
    """Wait until the relay has assigned a position beyond `position`."""
    deadline = time.monotonic() + timeout_s
    while await head_position(database_url) <= position:
        if time.monotonic() > deadline:
            raise AssertionError(f"no position beyond {position} within {timeout_s}s")
        await asyncio.sleep(0.02)


async def missing_on(write_address: str, address: str, user_ids: list[str], timeout_s: float) -> list[str]:
    """The users a replica still does not answer after `timeout_s` (retrying only those)."""
    pending = list(user_ids)
    deadline = time.monotonic() + timeout_s
    # A client whose queries go to this replica alone, with no consistency session.
    async with TesseraClient(write_address, [address], session=False) as tessera:

        async def absent(user_id: str) -> bool:
            try:
                reply = await tessera.users.get_user(qry.GetUserRequest(user_id=user_id), timeout=5.0)
            except TesseraError:
                return True
            return reply.user.user_id != user_id

        while pending:
            answers = await asyncio.gather(*(absent(user_id) for user_id in pending))
            pending = [user_id for user_id, gone in zip(pending, answers, strict=True) if gone]
            if not pending or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
    return pending


async def test_kill_9_of_the_active_relay_under_make_up_loses_no_event(
    fresh_database: str, redis_server_url: str, key_prefix: str, tmp_path: Path
) -> None:
    write_port, read_ports = find_free_port(), [find_free_port(), find_free_port()]
    args = ["--data-dir", str(tmp_path / "stack"), "--insecure", "--write-port", str(write_port)]
    args += ["--read-ports", ",".join(map(str, read_ports)), "--provider-port", str(find_free_port())]
    args += ["--saga-ports", str(find_free_port()), "--startup-timeout", "90"]
    env = {
        **os.environ,
        **FAST_HASHING,
        "DATABASE_URL": fresh_database,
        "REDIS_URL": redis_server_url,
        "REDIS_KEY_PREFIX": key_prefix,
    }
    started = time.monotonic()
    up = DevstackUp(args, env)
    try:
        await asyncio.to_thread(up.read_until, "stack is up", 100.0)
        up_s = time.monotonic() - started
        figures = await _kill_the_active_relay(up, fresh_database, redis_server_url, key_prefix, write_port, read_ports)

        tree = process_tree(up.process.pid)
        up.process.send_signal(signal.SIGINT)
        rest = await asyncio.to_thread(up.wait, 60.0)
    finally:
        await asyncio.to_thread(up.kill)
    assert up.process.returncode == 0, rest
    assert "Ctrl-C received, stopping" in rest
    assert "relay-" in rest and "(1 restart)" in rest  # the last status line
    assert wait_gone(tree, 10.0) == []
    print(f"\nmake up → every service healthy: {up_s:.1f}s (migrations included)")
    print("kill -9 of the active relay under make up: " + ", ".join(f"{k} {v}" for k, v in figures.items()))


async def _kill_the_active_relay(
    up: DevstackUp, database_url: str, redis_url: str, prefix: str, write_port: int, read_ports: list[int]
) -> dict[str, object]:
    """The scenario proper, against a running `devstack up`; returns its figures."""
    server_port = urlsplit(database_url).port or 5432
    recorder = await asyncio.to_thread(PositionRecorder(redis_url, prefix).start)
    stream = CommandStream(f"127.0.0.1:{write_port}")
    stream.start()
    try:
        await stream.wait_acknowledged(BEFORE_KILL, 60.0)
        relays = relay_pids(up.process.pid)
        assert len(relays) == 2, relays
        holder_port = await lock_holder_port(database_url)
        assert holder_port is not None, "no relay holds the lock"
        active = pid_owning_connection(relays, holder_port, server_port)
        assert active is not None, "the lock holder is none of the supervisor's relays"
        [standby] = [pid for pid in relays if pid != active]

        os.kill(active, signal.SIGKILL)
        killed_at = time.monotonic()
        head_at_kill = await head_position(database_url)
        new_port = await wait_new_holder(database_url, holder_port, 15.0)
        takeover_s = time.monotonic() - killed_at
        assert pid_owning_connection([standby], new_port, server_port) == standby  # the standby took over
        await wait_head_beyond(database_url, head_at_kill, 15.0)
        publishing_again_s = time.monotonic() - killed_at

        restarted = await asyncio.to_thread(up.read_until_match, RESTARTED, 15.0)
        restart_s = time.monotonic() - killed_at
        name, new_pid = restarted.group(1), int(restarted.group(2))
        assert f"{name} (pid {active}) exited with signal SIGKILL" in "".join(up.seen)
        standby_line = re.compile(rf"^{re.escape(name)} +\| .*relay role: standby")
        await asyncio.to_thread(up.read_until_match, standby_line, 30.0)
        assert await lock_holder_port(database_url) == new_port  # the restarted relay waits as a standby
        assert sorted(relay_pids(up.process.pid)) == sorted([standby, new_pid])

        await stream.wait_acknowledged(len(stream.acknowledged) + AFTER_RESTART, 60.0)
    finally:
        await stream.stop()

    rows, _ = await wait_drained(database_url, 30.0)
    assert await outbox_state(database_url) == (rows, 0, 0)  # every event positioned and published
    head = await head_position(database_url)
    assert head == rows  # positions 1..head, one per event
    client = aioredis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + 30.0
        while (views_at := await served_checkpoint(client, prefix, "users")) < head and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()
    missing = await asyncio.gather(
        *(missing_on(f"127.0.0.1:{write_port}", f"127.0.0.1:{port}", stream.acknowledged, 30.0) for port in read_ports)
    )
    await asyncio.to_thread(recorder.stop)
    delivered = recorder.figures(head)

    lost = len(set().union(*map(set, missing)))
    figures: dict[str, object] = {
        "commands": len(stream.acknowledged),
        "command_errors": len(stream.errors),
        "events": head,
        "takeover_s": round(takeover_s, 3),
        "publishing_again_s": round(publishing_again_s, 3),
        "relay_restarted_s": round(restart_s, 3),
        "events_lost": lost,
        "positions_missing_at_subscriber": delivered["missing_at_subscriber"],
        "duplicate_deliveries": delivered["duplicate_deliveries"],
    }
    assert views_at >= head, f"the views' checkpoint is {views_at}, the head {head}"
    assert missing == [[], []], figures
    assert delivered["missing_at_subscriber"] == 0 or not delivered["subscriber_complete"], figures
    assert stream.errors == [], figures  # the write path does not depend on the relay
    return figures
