"""The applying lease against a real Redis (within the test's own key prefix)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
import redis.asyncio as aioredis

from read_service.lease import (
    ApplyingLease,
    LeaseLost,
    LeaseOptions,
    applied_channel,
    default_holder_id,
    lease_key,
)


def make(client: aioredis.Redis, prefix: str, holder: str, ttl_ms: int = 2000, renew_ms: int = 500) -> ApplyingLease:
    return ApplyingLease(client, lease_key(prefix, "users", 1), LeaseOptions(holder, ttl_ms, renew_ms))


def test_options_refuse_a_renew_interval_above_half_the_ttl() -> None:
    with pytest.raises(ValueError, match="half the TTL"):
        LeaseOptions("a", ttl_ms=1000, renew_interval_ms=600)
    with pytest.raises(ValueError, match="at least 100 ms"):
        LeaseOptions("a", ttl_ms=50, renew_interval_ms=10)
    assert LeaseOptions("a", ttl_ms=1000, renew_interval_ms=500).ttl_ms == 1000


def test_keys_and_holder_ids() -> None:
    assert lease_key("p:", "orders", 3) == "p:meta:orders:applier:v3"
    assert applied_channel("p:users@v1g1:users:checkpoint") == "p:users@v1g1:users:checkpoint:applied"
    assert default_holder_id("replica-a").startswith("replica-a/")


async def test_one_holder_at_a_time_and_everyone_knows_who(redis_client: aioredis.Redis, redis_prefix: str) -> None:
    first, second = make(redis_client, redis_prefix, "a"), make(redis_client, redis_prefix, "b")

    assert await first.try_acquire()
    assert not await second.try_acquire()

    assert first.held and not second.held
    assert first.holder == "a"
    assert second.holder == "a"
    assert (await redis_client.get(first.key)) == first.token.encode()
    first.check()
    with pytest.raises(LeaseLost):
        second.check()


async def test_renewal_extends_only_the_holders_lease(redis_client: aioredis.Redis, redis_prefix: str) -> None:
    first, second = make(redis_client, redis_prefix, "a", ttl_ms=1000), make(redis_client, redis_prefix, "b")
    assert await first.try_acquire()
    await redis_client.pexpire(first.key, 300)

    assert await first.renew()
    assert await redis_client.pttl(first.key) > 900
    assert not await second.renew()
    assert await redis_client.get(first.key) == first.token.encode()


async def test_an_expired_lease_goes_to_the_next_taker_and_the_old_holder_knows_first(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    first, second = (
        make(redis_client, redis_prefix, "a", ttl_ms=300, renew_ms=100),
        make(redis_client, redis_prefix, "b"),
    )
    assert await first.try_acquire()
    # The holder's own view runs out a margin before Redis lets the key go.
    deadline = time.monotonic() + 2
    while first.held:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert await redis_client.exists(first.key) == 1
    assert not await second.try_acquire()

    while not await second.try_acquire():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert second.holder == "b"
    assert not await first.renew()
    assert first.holder is None
    assert not await first.try_acquire()
    assert first.holder == "b"


async def test_release_removes_only_its_own_lease(redis_client: aioredis.Redis, redis_prefix: str) -> None:
    first, second = make(redis_client, redis_prefix, "a"), make(redis_client, redis_prefix, "b")
    assert await first.try_acquire()
    await first.release()
    assert not first.held
    assert await redis_client.exists(first.key) == 0

    assert await second.try_acquire()
    # A stale holder that still believes it holds the lease must not remove the new holder's.
    first._valid_until = time.monotonic() + 10
    await first.release()
    assert await redis_client.get(second.key) == second.token.encode()


async def test_a_follower_takes_over_within_ttl_and_renew_interval_when_the_holder_dies(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    ttl_ms, renew_ms = 400, 100
    first = make(redis_client, redis_prefix, "a", ttl_ms, renew_ms)
    second = make(redis_client, redis_prefix, "b", ttl_ms, renew_ms)
    holder_task = asyncio.create_task(first.run())
    deadline = time.monotonic() + 5
    while not first.held:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    changed = second.changed()
    follower_task = asyncio.create_task(second.run())
    try:
        # The holder keeps it across several TTLs.
        await asyncio.sleep(3 * ttl_ms / 1000)
        assert (first.held, second.held) == (True, False)
        assert second.holder == "a"

        # A crash: no release, the key just stops being renewed.
        holder_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await holder_task
        died = time.monotonic()
        await asyncio.wait_for(changed.wait(), 5)
        took = time.monotonic() - died
        assert second.holder == "b"
        assert took <= (ttl_ms + renew_ms) / 1000 + 0.2, took
        assert second.takeovers == 1
    finally:
        for task in (holder_task, follower_task):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_announcements_are_published_coalesced(redis_client: aioredis.Redis, redis_prefix: str) -> None:
    lease = make(redis_client, redis_prefix, "a")
    channel = applied_channel(f"{redis_prefix}users:checkpoint")
    pubsub = redis_client.pubsub()
    await pubsub.subscribe(channel)
    confirmation = await pubsub.get_message(timeout=2)
    assert confirmation is not None and confirmation["type"] == "subscribe"
    task = asyncio.create_task(lease.run())
    try:
        for checkpoint in (1, 2, 3):
            lease.announce(f"{redis_prefix}users:checkpoint", checkpoint)
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2)
        assert message is not None
        # The three calls came before the publisher ran: only the latest went out.
        assert message["data"] == b"3"
        lease.announce(f"{redis_prefix}users:checkpoint", 4)
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2)
        assert message is not None and message["data"] == b"4"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await pubsub.aclose()


def test_settings_default_to_the_lease_and_refuse_a_slow_renewal() -> None:
    from pydantic import ValidationError

    from read_service.lease import ApplyMode
    from read_service.settings import ReadServiceSettings

    settings = ReadServiceSettings()
    assert (settings.read_apply_mode, settings.read_lease_ttl_ms, settings.read_lease_renew_ms) == (
        ApplyMode.LEASE,
        2000,
        500,
    )
    assert ReadServiceSettings(read_apply_mode=ApplyMode.ALWAYS).read_apply_mode is ApplyMode.ALWAYS
    with pytest.raises(ValidationError, match="at most half"):
        ReadServiceSettings(read_lease_ttl_ms=1000, read_lease_renew_ms=600)
