"""ViewStore.apply_many: a run of events that change nothing but the checkpoint is one script call."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import redis.asyncio as aioredis

from read_service.projections.base import Op
from read_service.view_store import ApplyResult, Outcome, ViewStore

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
