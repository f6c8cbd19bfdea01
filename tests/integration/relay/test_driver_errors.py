"""Driver errors that do not look like outages but are: the relay retries them, it does not crash.

asyncpg raises InternalClientError ("cannot switch to state N; another operation (2) is
in progress") instead of a connection error when the server ends a session just as a
query starts on it: a terminated backend or a Postgres restart. Before redis-py 8, a write
to a connection Redis had reset raised RuntimeError under uvloop; the test below keeps
checking that it is a ConnectionError. Both came up in the chaos suite (docs/chaos.md).
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
import redis.asyncio as aioredis
import redis.exceptions
import uvloop
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from devstack.tcp_proxy import TcpProxy
from relay.publisher import RedisPublisher
from relay.runner import Role
from tessera.events.v1.envelope_pb2 import EventEnvelope
from tests.integration.relay.conftest import RelayHarness
from tests.integration.relay.support import (
    ChannelRecorder,
    FailingPublisher,
    assert_gap_free,
    ids_of,
    insert_events,
    wait_until,
)

pytestmark = pytest.mark.integration

ENDED_SESSION = asyncpg.InternalClientError("cannot switch to state 12; another operation (2) is in progress")


async def test_a_cycle_that_meets_internal_client_error_is_retried(
    relays: RelayHarness, published: ChannelRecorder[EventEnvelope], caplog: pytest.LogCaptureFixture
) -> None:
    flaky = FailingPublisher(relays.real_publisher(), failures=2, error=ENDED_SESSION)
    relay = relays.make(publisher=flaky, relay_batch_size=4)
    task = relays.start(relay)
    written = await insert_events(relays.pool, "a", 6)

    await published.wait_for(lambda m: {e.position for e in m} >= set(range(1, 7)), what="all six events")
    assert_gap_free(published.messages, ids_of(written))
    assert flaky.failures_left == 0
    assert not task.done(), "the relay stopped"
    await wait_until(lambda: relay.role is Role.ACTIVE, 5, "the relay to stay active")
    assert any(
        "relay cycle failed" in r.getMessage() and "InternalClientError" in r.getMessage() for r in caplog.records
    )


def test_a_reset_redis_connection_is_never_a_runtime_error_under_uvloop(
    redis_server_url: str, redis_prefix: str
) -> None:
    """After Redis resets a pooled connection, the next publish reconnects or fails with ConnectionError.

    redis-py before 8 let uvloop's RuntimeError ("the handler is closed") through on a write to
    a reset connection, which made a Redis restart look like a bug: the relay crashed and a
    query answered INTERNAL. redis-py 8 checks a pooled connection before handing it out and
    the transport before writing; pyproject.toml requires it, and this test notices if that
    ever changes. Retries are off, so a success is the pool's reconnect, not a retry.
    """
    host, port = redis_server_url.removeprefix("redis://").split("/")[0].split(":")

    async def publish_after_reset() -> tuple[BaseException | None, int]:
        with TcpProxy(host, int(port)) as proxy:
            client = aioredis.Redis.from_url(
                f"redis://{proxy.address}/0", socket_timeout=2, retry=Retry(NoBackoff(), retries=0)
            )
            publisher = RedisPublisher(client, redis_prefix)
            try:
                await publisher.publish_events([EventEnvelope(event_id="e", position=1)])
                assert proxy.reset_all() == 1
                await asyncio.sleep(0.05)  # the RST arrives; uvloop closes the transport
                await publisher.publish_events([EventEnvelope(event_id="e", position=1)])
            except Exception as exc:
                return exc, proxy.stats().accepted
            finally:
                await client.aclose()
            return None, proxy.stats().accepted

    error, connections = uvloop.run(publish_after_reset())
    if error is None:
        assert connections == 2, "the second publish succeeded without a new connection"
    else:
        assert isinstance(error, redis.exceptions.ConnectionError), repr(error)
