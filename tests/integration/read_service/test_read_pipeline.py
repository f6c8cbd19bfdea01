"""The queries' shared read pipeline on a real Redis: one write for the reads of the moment, each caller its own
reply or error, a connection killed under it taken again, a caller that gives up leaving the others unharmed."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from devstack.servers import EmbeddedRedis
from read_service.read_pipeline import ReadPipeline, pack_evalsha, read_pipeline
from read_service.view_store import ViewReader
from tests.integration.read_service.packet_recording import RecordingConnection

pytestmark = pytest.mark.integration

_ECHO = "return {KEYS[1], redis.call('GET', KEYS[1]) or ''}"


async def _client(url: str) -> aioredis.Redis:
    pool = aioredis.ConnectionPool.from_url(url, connection_class=RecordingConnection)
    return aioredis.Redis.from_pool(pool)


async def test_concurrent_reads_share_writes_and_each_gets_its_own_reply(
    redis_server_url: str, redis_prefix: str
) -> None:
    client = await _client(redis_server_url)
    try:
        keys = [f"{redis_prefix}k{i}" for i in range(50)]
        await client.mset({key: f"v{i}" for i, key in enumerate(keys)})
        sha = await client.script_load(_ECHO)
        pipeline = read_pipeline(client)
        assert read_pipeline(client) is pipeline  # one per client: every reader shares its batches
        RecordingConnection.packets.clear()
        replies = await asyncio.gather(*(pipeline.execute(pack_evalsha(sha, [key])) for key in keys))
        writes = [p for p in RecordingConnection.packets if b"EVALSHA" in p]
    finally:
        await client.aclose()
    assert [[k.decode(), v.decode()] for k, v in replies] == [[key, f"v{i}"] for i, key in enumerate(keys)]
    # The 50 reads queued in one turn of the loop went out together, far fewer writes than reads.
    assert sum(p.count(b"EVALSHA") for p in writes) == 50
    assert len(writes) <= 2, [p.count(b"EVALSHA") for p in writes]


async def test_an_error_reply_fails_only_its_own_caller(redis_server_url: str, redis_prefix: str) -> None:
    client = aioredis.Redis.from_url(redis_server_url)
    try:
        await client.set(f"{redis_prefix}a", "1")
        sha = await client.script_load(_ECHO)
        pipeline = ReadPipeline(client)
        outcomes: list[object] = await asyncio.gather(
            pipeline.execute(pack_evalsha(sha, [f"{redis_prefix}a"])),
            pipeline.execute(pack_evalsha("0" * 40, [f"{redis_prefix}a"])),
            pipeline.execute(pack_evalsha(sha, [f"{redis_prefix}b"])),
            return_exceptions=True,
        )
        good, missing, also_good = outcomes
    finally:
        await client.aclose()
    assert good == [f"{redis_prefix}a".encode(), b"1"]
    assert isinstance(missing, redis.exceptions.NoScriptError)
    assert also_good == [f"{redis_prefix}b".encode(), b""]


async def test_a_killed_connection_is_opened_again_and_the_read_answered(
    redis_server_url: str, redis_prefix: str
) -> None:
    name = f"read-pipeline-test-{redis_prefix.strip(':')}"
    client = aioredis.Redis.from_url(redis_server_url, client_name=name)
    admin = aioredis.Redis.from_url(redis_server_url)
    try:
        await client.set(f"{redis_prefix}a", "1")
        sha = await client.script_load(_ECHO)
        pipeline = ReadPipeline(client)
        first = await pipeline.execute(pack_evalsha(sha, [f"{redis_prefix}a"]))
        # Every connection of this client carries its name: the pipeline's goes with the others.
        killed = 0
        for entry in await admin.client_list():
            if entry.get("name") == name:
                killed += await admin.client_kill_filter(_id=str(entry["id"]))
        assert killed >= 1
        again = await pipeline.execute(pack_evalsha(sha, [f"{redis_prefix}a"]))
    finally:
        await client.aclose()
        await admin.aclose()
    assert first == again == [f"{redis_prefix}a".encode(), b"1"]


async def test_a_caller_that_gives_up_leaves_the_others_their_replies(redis_server_url: str, redis_prefix: str) -> None:
    client = aioredis.Redis.from_url(redis_server_url)
    try:
        await client.mset({f"{redis_prefix}a": "1", f"{redis_prefix}b": "2"})
        sha = await client.script_load(_ECHO)
        pipeline = ReadPipeline(client)
        gives_up = asyncio.ensure_future(pipeline.execute(pack_evalsha(sha, [f"{redis_prefix}a"])))
        waits = asyncio.ensure_future(pipeline.execute(pack_evalsha(sha, [f"{redis_prefix}b"])))
        await asyncio.sleep(0)
        gives_up.cancel()
        after = await waits
        later = await pipeline.execute(pack_evalsha(sha, [f"{redis_prefix}a"]))
    finally:
        await client.aclose()
    assert gives_up.cancelled()
    assert after == [f"{redis_prefix}b".encode(), b"2"]
    assert later == [f"{redis_prefix}a".encode(), b"1"]


async def test_a_redis_that_is_gone_fails_the_read_with_the_drivers_connection_error() -> None:
    with EmbeddedRedis() as server:
        client = aioredis.Redis.from_url(server.url, socket_timeout=1.0, socket_connect_timeout=1.0)
        reader = ViewReader(client)
        await client.set("p:checkpoint", 3)
        assert int((await reader.read("p:checkpoint", "p:view")).checkpoint or 0) == 3
    try:
        with pytest.raises(redis.exceptions.ConnectionError):
            await asyncio.wait_for(reader.read("p:checkpoint", "p:view"), 10.0)
    finally:
        await client.aclose()
