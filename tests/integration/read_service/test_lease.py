"""Projectors sharing one key space under the applying lease: one applies, the others follow it."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
import redis.asyncio as aioredis

from read_service.lease import LeaseOptions
from read_service.projector import Projector, ProjectorState
from shared_kernel.platform.runtime import cancel_and_wait

from .conftest import EventLog, Publisher, StartProjector, UserFactory, eventually
from .test_projector import assert_views, story

pytestmark = pytest.mark.integration

TTL_MS, RENEW_MS = 600, 150


def lease(holder: str, ttl_ms: int = TTL_MS, renew_ms: int = RENEW_MS) -> LeaseOptions:
    return LeaseOptions(holder_id=holder, ttl_ms=ttl_ms, renew_interval_ms=renew_ms)


async def two_projectors(start_projector: StartProjector, **options: object) -> tuple[Projector, Projector]:
    """Two projectors on one key space, ready; the holder first."""
    a = await start_projector(lease=lease("a"), **options)
    b = await start_projector(lease=lease("b"), **options)
    await eventually(lambda: a.ready and b.ready, message="projectors never became ready")
    await eventually(lambda: {a.status().applying, b.status().applying} == {True, False}, message="no single holder")
    return (a, b) if a.status().applying else (b, a)


async def crash(projector: Projector) -> None:
    """Stop a projector the way kill -9 would: no release, its lease just stops being renewed."""
    keeper = projector._lease_keeper
    assert keeper is not None and projector.task is not None
    for task in (keeper, projector.task):
        # Cancelled until it ends: on Python 3.11 a cancellation landing as a read times out is lost.
        await cancel_and_wait([task], wait_s=0.5, attempts=20)
        assert task.done(), f"{task.get_name()} did not stop"


async def publish_all(event_log: EventLog, publisher: Publisher, events: list) -> None:  # type: ignore[type-arg]
    for event in events:
        (envelope,) = await event_log.append(event)
        await publisher.event(envelope)


async def test_only_the_holder_applies_and_the_follower_keeps_up(
    event_log: EventLog,
    users: UserFactory,
    publisher: Publisher,
    start_projector: StartProjector,
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    events, versions, inactive = story(users, 60)
    await event_log.append(*events[:20])
    holder, follower = await two_projectors(start_projector)
    await publish_all(event_log, publisher, events[20:])

    await eventually(lambda: holder.checkpoint == 60 and follower.checkpoint == 60, message="did not reach 60")
    assert holder.status().applied == 60
    assert follower.status().applied == 0
    assert holder.status().duplicates == 0
    status = follower.status()
    assert status.state is ProjectorState.FOLLOWING
    assert not status.applying
    assert status.lease_holder == holder.status().lease_holder
    assert status.lease_holder in {"a", "b"}
    await assert_views(redis_client, redis_prefix, versions, inactive)


async def test_a_follower_wakes_on_the_holders_announcement_not_on_its_poll(
    event_log: EventLog, users: UserFactory, publisher: Publisher, start_projector: StartProjector
) -> None:
    # A long renew interval: a follower that only polled would answer after about a second.
    a = await start_projector(lease=lease("a", ttl_ms=4000, renew_ms=2000))
    await eventually(lambda: a.ready and a.status().applying)
    b = await start_projector(lease=lease("b", ttl_ms=4000, renew_ms=2000))
    await eventually(lambda: b.ready and b.status().state is ProjectorState.FOLLOWING)
    for round_ in range(3):
        _, event = users.register(f"w{round_}@example.com", f"w{round_}")
        (envelope,) = await event_log.append(event)
        waiter = asyncio.create_task(b.wait_for_checkpoint(envelope.position, 5))
        started = time.monotonic()
        await publisher.event(envelope)
        assert await waiter
        assert time.monotonic() - started < 0.5


async def test_a_crashed_holder_is_replaced_and_nothing_is_skipped_or_applied_twice(
    event_log: EventLog,
    users: UserFactory,
    publisher: Publisher,
    start_projector: StartProjector,
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    events, versions, inactive = story(users, 80)
    holder, follower = await two_projectors(start_projector)
    await publish_all(event_log, publisher, events[:40])
    await eventually(lambda: follower.checkpoint == 40)

    await crash(holder)
    died = time.monotonic()
    # Published while nobody holds the lease: the new holder finds them in the log.
    await publish_all(event_log, publisher, events[40:60])
    await eventually(lambda: follower.status().applying, timeout=5, message="no takeover")
    took = time.monotonic() - died
    await publish_all(event_log, publisher, events[60:])
    await eventually(lambda: follower.checkpoint == 80, message=f"stuck at {follower.checkpoint}")

    assert took <= (TTL_MS + RENEW_MS) / 1000 + 0.5, took
    assert holder.status().applied + follower.status().applied == 80
    assert follower.status().duplicates == 0
    await assert_views(redis_client, redis_prefix, versions, inactive)


async def test_a_clean_stop_hands_the_lease_over_at_once(
    event_log: EventLog, users: UserFactory, publisher: Publisher, start_projector: StartProjector
) -> None:
    # A TTL far above the hand-over time shows the release, not the expiry, did it.
    a = await start_projector(lease=lease("a", ttl_ms=10_000, renew_ms=200))
    await eventually(lambda: a.ready and a.status().applying)
    b = await start_projector(lease=lease("b", ttl_ms=10_000, renew_ms=200))
    await eventually(lambda: b.ready and b.status().state is ProjectorState.FOLLOWING)

    stopped = time.monotonic()
    await a.stop()
    await eventually(lambda: b.status().applying, timeout=3, message="the lease was not handed over")
    assert time.monotonic() - stopped < 1.0
    events, _, _ = story(users, 5)
    await publish_all(event_log, publisher, events)
    await eventually(lambda: b.checkpoint == 5)


async def test_two_replicas_that_both_believe_they_hold_it_still_apply_each_event_once(
    event_log: EventLog,
    users: UserFactory,
    publisher: Publisher,
    start_projector: StartProjector,
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    holder, follower = await two_projectors(start_projector)
    # A follower whose clock says the lease is its own (a paused holder waking up late does the same).
    assert follower._lease is not None and follower._lease_keeper is not None
    follower._lease_keeper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await follower._lease_keeper
    follower._lease._valid_until = float("inf")
    await eventually(lambda: follower.status().applying and follower.status().state is not ProjectorState.FOLLOWING)
    events, versions, inactive = story(users, 200)
    await publish_all(event_log, publisher, events)

    await eventually(lambda: holder.checkpoint == 200 and follower.checkpoint == 200)
    assert holder.status().applied + follower.status().applied == 200
    await assert_views(redis_client, redis_prefix, versions, inactive)
