"""Driver errors that do not look like outages but are: the relay retries them, it does not crash.

asyncpg raises InternalClientError ("cannot switch to state N; another operation (2) is
in progress") instead of a connection error when the server ends a session just as a
query starts on it: a terminated backend or a Postgres restart. Under uvloop, redis-py
raises RuntimeError for a write to a connection Redis has reset. Both came up in the
chaos suite (docs/chaos.md).
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
import redis.asyncio as aioredis
import redis.exceptions
import uvloop
from redis.asyncio.connection import Connection

from devstack.tcp_proxy import TcpProxy
from relay.publisher import RedisPublisher
from relay.runner import Role
from shared_kernel.redis_client import ClosedTransportAwareConnection
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


def test_a_reset_redis_connection_is_a_connection_error_under_uvloop(redis_server_url: str, redis_prefix: str) -> None:
    """uvloop raises RuntimeError on a write to a reset connection; the relay's client says ConnectionError."""
    host, port = redis_server_url.removeprefix("redis://").split("/")[0].split(":")

    async def publish_after_reset(connection_class: type[Connection] | None) -> BaseException | None:
        with TcpProxy(host, int(port)) as proxy:
            url = f"redis://{proxy.address}/0"
            if connection_class is None:
                client = aioredis.Redis.from_url(url, socket_timeout=2)
            else:
                client = aioredis.Redis.from_url(url, socket_timeout=2, connection_class=connection_class)
            publisher = RedisPublisher(client, redis_prefix)
            try:
                await publisher.publish_events([EventEnvelope(event_id="e", position=1)])
                proxy.reset_all()
                await asyncio.sleep(0.05)  # the RST arrives; uvloop closes the transport
                await publisher.publish_events([EventEnvelope(event_id="e", position=1)])
            except Exception as exc:
                return exc
            finally:
                await client.aclose()
        return None

    # The hazard itself, so that this test notices if uvloop or redis-py change.
    assert isinstance(uvloop.run(publish_after_reset(None)), RuntimeError)
    assert isinstance(uvloop.run(publish_after_reset(ClosedTransportAwareConnection)), redis.exceptions.ConnectionError)
