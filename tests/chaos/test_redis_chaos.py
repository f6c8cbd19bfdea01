"""Redis faults under load: a restart that empties it, and read replicas paused until Redis drops them."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from devstack.chaos import KEY_PREFIX, ChaosStack, head_position, wait_caught_up
from tessera.events.v1.envelope_pb2 import StreamHead
from tests.chaos.report import ChaosReport
from tests.chaos.scenario import Scenario, run_scenario
from tests.chaos.workload import Workload

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(600)]

REDIS_DOWN_S = 2.0
# Redis cuts a pub/sub client off once 256 kB wait for it (or 64 kB for a second), which
# happens only after the kernel's socket buffers are full too: tens of MB on loopback once
# a busy reader's receive window has grown.
SMALL_PUBSUB_BUFFER = ("--client-output-buffer-limit", "pubsub", "256kb", "64kb", "1")
# So while the replicas are paused the test also publishes heartbeat-shaped filler on the
# head channel: a StreamHead at position 0 (below any checkpoint, so replicas ignore it)
# carrying 64 kB in an unknown field, which protobuf parsers skip.
FILLER_BYTES = 65536
MIN_PAUSE_S = 3.0


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def filler() -> bytes:
    """A StreamHead at position 0 with FILLER_BYTES in unknown field 1000 (tag bytes 0xc2 0x3e)."""
    return StreamHead(position=0).SerializeToString() + b"\xc2\x3e" + _varint(FILLER_BYTES) + b"f" * FILLER_BYTES


async def pad_head_channel(redis_url: str, stop: asyncio.Event) -> int:
    """Publish filler on the head channel until `stop`; return the bytes sent."""
    client = aioredis.Redis.from_url(redis_url, socket_timeout=2.0)
    message = filler()
    sent = 0
    try:
        while not stop.is_set():
            await client.publish(f"{KEY_PREFIX}events:head", message)
            sent += len(message)
            await asyncio.sleep(0.002)
    finally:
        await client.aclose()
    return sent


async def subscribers(redis_url: str) -> int:
    """How many clients subscribe to the events channel (the replicas and the recorder)."""
    client = aioredis.Redis.from_url(redis_url, socket_timeout=2.0)
    try:
        reply = await client.pubsub_numsub(f"{KEY_PREFIX}events")
    finally:
        await client.aclose()
    return int(reply[0][1])


async def restart_redis(stack: ChaosStack, workload: Workload, done: asyncio.Event) -> dict[str, Any]:
    """At 30% of the workload kill Redis (losing every view), keep it down 2 s, start it again."""
    await workload.wait_progress(0.3, timeout_s=300)
    server = stack.redis
    assert server is not None
    await asyncio.to_thread(server.kill)
    await asyncio.sleep(REDIS_DOWN_S)
    await asyncio.to_thread(server.start)
    target = await head_position(stack.database_url)
    converge_s = await wait_caught_up(stack, target, timeout_s=120.0)
    await done.wait()
    return {
        "faults": 1,
        "redis_down_s": REDIS_DOWN_S,
        "rebuilt_to_position": target,
        # From Redis answering again to views rebuilt up to the head of that moment, every replica SERVING.
        "converge_s": round(converge_s, 2) if converge_s is not None else None,
    }


async def pause_replicas(stack: ChaosStack, workload: Workload, done: asyncio.Event) -> dict[str, Any]:
    """SIGSTOP every replica at 20% of the workload until Redis drops their subscriptions (and 3 s at least)."""
    await workload.wait_progress(0.2, timeout_s=300)
    readers = stack.services.readers
    before = await subscribers(stack.redis_url)
    for reader in readers:
        reader.pause()
    paused_at = time.monotonic()
    dropped = asyncio.Event()
    padding = asyncio.create_task(pad_head_channel(stack.redis_url, dropped))
    try:
        while await subscribers(stack.redis_url) > before - len(readers):
            if time.monotonic() - paused_at > 120.0:
                raise AssertionError("Redis did not drop the paused replicas' subscriptions within 120 s")
            if done.is_set():
                raise AssertionError("the workload ended before Redis dropped the paused replicas")
            await asyncio.sleep(0.1)
        dropped_after = time.monotonic() - paused_at
        dropped.set()
        # Stay stopped a while longer, so that the replicas have a stretch of the log to catch up.
        await asyncio.sleep(max(0.0, MIN_PAUSE_S - dropped_after))
    finally:
        dropped.set()
        padded = await padding
        for reader in readers:
            reader.resume()
    target = await head_position(stack.database_url)
    converge_s = await wait_caught_up(stack, target, timeout_s=120.0)
    resubscribed_at = time.monotonic()
    while await subscribers(stack.redis_url) < before and time.monotonic() - resubscribed_at < 30.0:
        await asyncio.sleep(0.05)
    await done.wait()
    return {
        "faults": 1,
        "paused_until_dropped_s": round(dropped_after, 2),
        "paused_s": round(max(dropped_after, MIN_PAUSE_S), 2),
        "filler_mb": round(padded / 1e6, 1),
        "resubscribed": await subscribers(stack.redis_url) >= before,
        # From SIGCONT to views caught up with the head of that moment, every replica SERVING.
        "converge_s": round(converge_s, 2) if converge_s is not None else None,
    }


async def test_restart_redis_during_the_stream(chaos_report: ChaosReport, chaos_logs: Path) -> None:
    """Redis loses everything: the replicas rebuild their views from the Postgres event log."""
    scenario = Scenario(
        "4-redis-restart",
        f"kill Redis (no persistence: views lost) for {REDIS_DOWN_S:g} s mid-stream, then start it",
        restart_redis,
        commands=5_000,
        subscriber_complete=False,
    )
    record = await run_scenario(scenario, chaos_report, chaos_logs)
    assert record.passed, record.failures


async def test_pause_replicas_until_redis_drops_them(chaos_report: ChaosReport, chaos_logs: Path) -> None:
    """A replica cut off by Redis for being slow notices and catches up from the event log."""
    scenario = Scenario(
        "5-replica-sigstop",
        "SIGSTOP every replica until Redis drops them (pubsub limit 256kb/64kb/1s; 3 s at least), then SIGCONT",
        pause_replicas,
        commands=5_000,
        redis_args=SMALL_PUBSUB_BUFFER,
    )
    record = await run_scenario(scenario, chaos_report, chaos_logs)
    assert record.passed, record.failures
