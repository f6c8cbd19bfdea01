"""The claim walks the queue of unpositioned events once per claim (decision 0038).

Each walk of `outbox_pending` in id order steps over every id dequeued since the last
vacuum whenever a transaction holds the xmin horizon back, so a second walk doubled the
cost of a drain (0038 measured it on the partial index the queue replaced). The plans are
checked as Postgres runs them: on the relay's session settings, both the plan for the
given parameters and the generic plan a prepared statement settles on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from perf.bench.relay_bench import insert_backlog
from relay.outbox import CLAIM_SESSION_SETTINGS, _claim_statement, claim_batch

pytestmark = pytest.mark.integration


def _scans(node: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(index, condition) of every index scan in the plan; the condition is "" for a walk in index order."""
    if "Index Name" in node:
        yield node["Index Name"], node.get("Index Cond", "")
    for child in node.get("Plans", []):
        yield from _scans(child)


@pytest.mark.parametrize("plan_cache_mode", ["force_custom_plan", "force_generic_plan"])
async def test_a_claim_walks_the_pending_queue_once(database_url: str, plan_cache_mode: str) -> None:
    # Enough rows that a scan of the outbox would be a real cost to the planner too.
    await insert_backlog(database_url, 5_000, seed=7)
    conn = await asyncpg.connect(
        database_url, server_settings={**CLAIM_SESSION_SETTINGS, "plan_cache_mode": plan_cache_mode}
    )
    try:
        statement = await conn.prepare("EXPLAIN (FORMAT JSON) " + _claim_statement(500))
        plan = json.loads(await statement.fetchval(None, 0, 0, None))[0]["Plan"]
        scans = list(_scans(plan))
        assert [scan for scan in scans if scan[0] == "outbox_pending_pkey" and not scan[1]] == [
            ("outbox_pending_pkey", "")
        ], scans
        # The dequeue and the read of the events look their rows up by id, not by reading a table.
        assert {index for index, condition in scans if condition} >= {"outbox_pending_pkey", "outbox_pkey"}, scans

        # The plan above is the statement the relay runs: the oldest 500 rows, in id order.
        claimed = await claim_batch(conn, 500, None)
        oldest = await conn.fetch("SELECT id, position FROM outbox WHERE position IS NOT NULL ORDER BY id")
        assert [e.position for e in claimed.envelopes] == list(range(1, 501))
        assert [row["position"] for row in oldest] == list(range(1, 501))
        assert await conn.fetchval("SELECT min(id) FROM outbox WHERE position IS NULL") > oldest[-1]["id"]
        assert await conn.fetchval("SELECT count(*) FROM outbox_pending") == 4_500
    finally:
        await conn.close()
