"""ViewStore and its script: a batch is one call, and each event answers as a call of its own would."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from read_service.projections.base import Op
from read_service.view_store import _SCRIPT, ApplyResult, Outcome, Segment, ViewStore, encode

pytestmark = pytest.mark.integration


def _events(prefix: str) -> list[tuple[int, Sequence[Op]]]:
    # Positions 1..9: ops at 3 and 7, no-op runs 1-2, 4-6 and 8-9.
    writes = {3: [("SET", f"{prefix}a", "3")], 7: [("SET", f"{prefix}b", "7")]}
    return [(position, writes.get(position, [])) for position in range(1, 10)]


async def _one_by_one(store: ViewStore, events: list[tuple[int, Sequence[Op]]]) -> list[ApplyResult]:
    return [await store.apply(position, ops) for position, ops in events]


@pytest.mark.parametrize("start", [0, 2, 5, 9, 12])
async def test_runs_answer_as_one_call_per_event_would(
    redis_client: aioredis.Redis, redis_prefix: str, start: int
) -> None:
    # The same events, from the same checkpoint, on two key spaces: batched and one by one.
    batched = ViewStore(redis_client, f"{redis_prefix}batched:checkpoint")
    single = ViewStore(redis_client, f"{redis_prefix}single:checkpoint")
    if start:
        await redis_client.set(f"{redis_prefix}batched:checkpoint", start)
        await redis_client.set(f"{redis_prefix}single:checkpoint", start)

    got = await batched.apply_many(_events(f"{redis_prefix}batched:"))
    expected = await _one_by_one(single, _events(f"{redis_prefix}single:"))

    assert got == expected
    assert await batched.checkpoint() == await single.checkpoint()
    for key in ("a", "b"):
        assert await redis_client.get(f"{redis_prefix}batched:{key}") == await redis_client.get(
            f"{redis_prefix}single:{key}"
        )


async def test_a_run_that_starts_past_the_checkpoint_is_a_gap(redis_client: aioredis.Redis, redis_prefix: str) -> None:
    store = ViewStore(redis_client, f"{redis_prefix}checkpoint")

    results = await store.apply_many([(4, []), (5, []), (6, [])])

    assert results == [ApplyResult(Outcome.GAP, 0)] * 3
    assert await store.checkpoint() == 0


async def test_the_script_refuses_an_op_on_a_key_it_was_not_given(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    store = ViewStore(redis_client, f"{redis_prefix}checkpoint")
    await store.load_script()
    keys, argv = encode(store.checkpoint_key, [Segment(1, 1, [("SET", f"{redis_prefix}a", "1")])])
    # The op's key index points past KEYS: the script must refuse before it writes anything.
    with pytest.raises(redis.exceptions.ResponseError, match="undeclared key"):
        await redis_client.evalsha(_sha(), 1, keys[0], *argv)

    assert await redis_client.get(f"{redis_prefix}a") is None
    assert await store.checkpoint() == 0


async def test_no_op_events_before_a_write_move_the_checkpoint_with_it(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    store = ViewStore(redis_client, f"{redis_prefix}checkpoint")
    await redis_client.set(store.checkpoint_key, 3)

    # Positions 4..6 change nothing for this projection; 7 writes.
    results = await store.apply_many([(7, [("SET", f"{redis_prefix}a", "7")])], first=4)

    assert results == [ApplyResult(Outcome.APPLIED, 7)]
    assert await store.checkpoint() == 7
    assert await redis_client.get(f"{redis_prefix}a") == b"7"
    # The same again is a duplicate, and a batch that starts past the checkpoint + 1 is a gap.
    assert await store.apply_many([(7, [("SET", f"{redis_prefix}a", "x")])], first=4) == [
        ApplyResult(Outcome.DUPLICATE, 7)
    ]
    assert await store.apply_many([(12, [])], first=9) == [ApplyResult(Outcome.GAP, 7)]
    assert await redis_client.get(f"{redis_prefix}a") == b"7"


def _sha() -> str:
    return hashlib.sha1(_SCRIPT.encode()).hexdigest()


def _shared_key_events(prefix: str) -> list[tuple[int, Sequence[Op]]]:
    """Events whose ops come back to the same keys: adds, removals and other commands interleaved."""
    s, z, h = f"{prefix}s", f"{prefix}z", f"{prefix}h"
    return [
        (1, [("SADD", s, "a"), ("ZADD", z, 1, "m"), ("HSET", h, "f", "1")]),
        (2, [("SADD", s, "b"), ("ZADD", z, 2, "n"), ("HINCRBY", h, "count", 1)]),
        (3, [("SREM", s, "a"), ("ZADD", z, 5, "m"), ("HSET", h, "f", "2")]),
        (4, [("SADD", s, "a"), ("ZREM", z, "n"), ("HDEL", h, "f"), ("HINCRBY", h, "count", 1)]),
        (5, [("SADD", s, "c"), ("SREM", s, "b"), ("ZADD", z, 3, "n"), ("HSET", h, "f", "3")]),
        (6, [("DEL", s), ("SADD", s, "d"), ("ZADD", z, 4, "n")]),
    ]


@pytest.mark.parametrize("start", [0, 3])
async def test_a_batch_of_ops_on_shared_keys_leaves_what_one_call_per_event_leaves(
    redis_client: aioredis.Redis, redis_prefix: str, start: int
) -> None:
    # The script sends a run of one command on one key as one call: interleaved adds and
    # removals of the same members must still end as they would one event at a time.
    batched = ViewStore(redis_client, f"{redis_prefix}batched:checkpoint")
    single = ViewStore(redis_client, f"{redis_prefix}single:checkpoint")
    for store in (batched, single):
        await redis_client.set(store.checkpoint_key, start)

    await batched.apply_many(_shared_key_events(f"{redis_prefix}batched:"))
    await _one_by_one(single, _shared_key_events(f"{redis_prefix}single:"))

    for name in ("batched", "single"):
        assert await redis_client.get(f"{redis_prefix}{name}:checkpoint") == b"6"
    assert await redis_client.smembers(f"{redis_prefix}batched:s") == await redis_client.smembers(
        f"{redis_prefix}single:s"
    )
    assert await redis_client.zrange(f"{redis_prefix}batched:z", 0, -1, withscores=True) == await redis_client.zrange(
        f"{redis_prefix}single:z", 0, -1, withscores=True
    )
    assert await redis_client.hgetall(f"{redis_prefix}batched:h") == await redis_client.hgetall(
        f"{redis_prefix}single:h"
    )
    # And what that is: the last word on each member wins.
    assert await redis_client.smembers(f"{redis_prefix}batched:s") == {b"d"}
    expected_sorted = [(b"n", 4.0), (b"m", 5.0)] if start == 0 else [(b"n", 4.0)]
    assert await redis_client.zrange(f"{redis_prefix}batched:z", 0, -1, withscores=True) == expected_sorted
    expected_hash = {b"f": b"3", b"count": b"2"} if start == 0 else {b"f": b"3", b"count": b"1"}
    assert await redis_client.hgetall(f"{redis_prefix}batched:h") == expected_hash


async def test_fan_out_runs_leave_redis_as_the_ops_one_by_one_would(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    def ops(space: str) -> list[tuple[int, Sequence[Op]]]:
        # Trigram-like runs (the same score and member on many keys), a removal run, a run cut
        # by another command, and a key a run writes twice.
        tri = [f"{redis_prefix}{space}:tri:{n}" for n in range(6)]
        first: list[Op] = [("ZADD", key, 7, "u1") for key in tri]
        first += [("HINCRBY", f"{redis_prefix}{space}:stats", "users", 1), ("ZADD", tri[0], 7, "u2")]
        second: list[Op] = [("ZREM", key, "u1") for key in tri[:4]]
        second += [("SADD", f"{redis_prefix}{space}:s", "m"), ("SADD", f"{redis_prefix}{space}:t", "m")]
        second += [("ZADD", tri[5], 9, "u1"), ("ZADD", tri[5], 9, "u1")]
        return [(1, first), (2, second)]

    batched = ViewStore(redis_client, f"{redis_prefix}batched:checkpoint")
    single = ViewStore(redis_client, f"{redis_prefix}single:checkpoint")
    await batched.apply_many(ops("batched"))
    # One op per event: no run to merge.
    position = 0
    for _, event_ops in ops("single"):
        for op in event_ops:
            position += 1
            await single.apply(position, [op])

    async def dump(space: str) -> dict[str, object]:
        found: dict[str, object] = {}
        async for key in redis_client.scan_iter(match=f"{redis_prefix}{space}:*"):
            name = key.decode()[len(f"{redis_prefix}{space}:") :]
            kind_reply = await redis_client.type(key)
            kind = kind_reply.decode() if isinstance(kind_reply, bytes) else kind_reply
            if kind == "zset":
                found[name] = await redis_client.zrange(key, 0, -1, withscores=True)
            elif kind == "hash":
                found[name] = await redis_client.hgetall(key)
            elif kind == "set":
                found[name] = sorted(await redis_client.smembers(key))
        return found

    got = await dump("batched")
    assert got == await dump("single")
    assert got["tri:0"] == [(b"u2", 7.0)]
    assert got["tri:5"] == [(b"u1", 9.0)]
