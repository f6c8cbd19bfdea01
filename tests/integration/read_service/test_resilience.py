"""The read service under the chaos suite's faults (docs/chaos.md): failing Postgres sessions,
dropped subscriptions, bursts of live events, Redis connections reset under uvloop."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
import uvloop

import read_service.catch_up as catch_up_module
from devstack.tcp_proxy import TcpProxy
from read_service.bootstrap import create_redis_client
from read_service.view_store import ViewStore
from shared_kernel.contracts.event_log import events_channel, head_position

from .conftest import EventLog, Publisher, StartProjector, UserFactory, dump_keyspace, eventually
from .test_projector import view_of

pytestmark = pytest.mark.integration


class FailFirst:
    """Stands in for `head_position`: raises `error` the first `times` calls, then reads the real head."""

    def __init__(self, error: BaseException, times: int = 1) -> None:
        self.error = error
        self.left = times

    async def __call__(self, conn):
        if self.left:
            self.left -= 1
            raise self.error
        return await head_position(conn)


@pytest.mark.parametrize(
    "error",
    [
        # What asyncpg raises when the server ended the session just as a query started (asyncpg#1069).
        asyncpg.InternalClientError("cannot switch to state 11; another operation (2) is in progress"),
        # Not a known outage at all: a bug must not end the projector either.
        RuntimeError("unexpected"),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_a_failed_catch_up_is_retried_not_fatal(
    error: BaseException,
    event_log: EventLog,
    users: UserFactory,
    start_projector: StartProjector,
    redis_client,
    redis_prefix,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
):
    user_id, event = users.register("retry@example.com", "retry")
    await event_log.append(event)
    failing = FailFirst(error, times=2)
    monkeypatch.setattr(catch_up_module, "head_position", failing)

    projector = await start_projector()
    await eventually(lambda: projector.ready and projector.checkpoint == 1, message="the projector gave up")

    assert failing.left == 0
    assert projector.task is not None and not projector.task.done()
    assert projector.status().reconnects == 2
    assert (await view_of(redis_client, redis_prefix, user_id)) is not None
    if isinstance(error, RuntimeError):
        assert any(r.levelname == "ERROR" and r.exc_info for r in caplog.records), "a bug is logged with its traceback"


async def test_a_dropped_subscription_is_reported_and_caught_up(
    event_log: EventLog,
    users: UserFactory,
    publisher: Publisher,
    start_projector: StartProjector,
    redis_client,
    redis_prefix,
    caplog: pytest.LogCaptureFixture,
):
    name = f"dropped-{redis_prefix.replace(':', '-')}"
    projector = await start_projector(client_name=name)
    await eventually(lambda: projector.ready)

    # What Redis does to a subscriber that reads too slowly (client-output-buffer-limit pubsub).
    killed = 0
    for client in await redis_client.client_list():
        if client.get("name") == name and int(client.get("sub", 0)) > 0:
            killed += await redis_client.client_kill_filter(_id=client["id"])
    assert killed == 1
    _, event = users.register("dropped@example.com", "dropped")
    (envelope,) = await event_log.append(event)
    await publisher.event(envelope)

    await eventually(lambda: projector.checkpoint == 1, message="the event never arrived")
    await eventually(
        lambda: (
            any("subscription was re-established" in r.getMessage() for r in caplog.records)
            or projector.status().reconnects > 0
        ),
        message="the drop went unnoticed",
    )


async def test_a_burst_of_live_events_is_applied_in_batches(
    event_log: EventLog,
    users: UserFactory,
    start_projector: StartProjector,
    redis_client,
    redis_prefix,
    monkeypatch: pytest.MonkeyPatch,
):
    main = f"{redis_prefix}main:"
    projector = await start_projector(prefix=main)
    await eventually(lambda: projector.ready)
    catch_ups = projector.status().catch_ups
    snapshots = 0
    real_snapshot = ViewStore.snapshot

    async def counting_snapshot(self, keys):
        nonlocal snapshots
        snapshots += 1
        return await real_snapshot(self, keys)

    monkeypatch.setattr(ViewStore, "snapshot", counting_snapshot)
    ids = []
    events = []
    for n in range(100):
        user_id, registered = users.register(f"burst{n}@example.com", f"burst{n}")
        ids.append(user_id)
        events += [registered, users.update(user_id, f"Burst {n}")]
    envelopes = await event_log.append(*events)
    # One pipeline, as the relay publishes a batch; a re-published stretch rides along.
    pipe = redis_client.pipeline(transaction=False)
    for envelope in [*envelopes[:150], *envelopes[100:120], *envelopes[150:]]:
        pipe.publish(events_channel(main), envelope.SerializeToString())
    await pipe.execute()

    await eventually(lambda: projector.checkpoint == 200, message="the burst was not applied")
    assert projector.status().catch_ups == catch_ups, "no gap, so no catch-up"
    assert snapshots < 100, f"{snapshots} snapshots for 220 messages: applied one by one"
    assert await dump_keyspace(redis_client, main) == await _rebuilt(start_projector, redis_client, redis_prefix)


async def _rebuilt(start_projector: StartProjector, redis_client, redis_prefix: str):
    """The key space a projector builds from the event log alone."""
    prefix = f"{redis_prefix}rebuilt:"
    rebuilt = await start_projector(prefix=prefix)
    await eventually(lambda: rebuilt.ready and rebuilt.checkpoint == 200)
    return await dump_keyspace(redis_client, prefix)


def test_a_query_after_redis_reset_the_connection_reconnects_under_uvloop(redis_server_url: str) -> None:
    """uvloop raises RuntimeError on a write to a reset connection; the read service's client retries it."""
    host, port = redis_server_url.removeprefix("redis://").split("/")[0].split(":")

    async def get_after_reset() -> bytes | str | None:
        with TcpProxy(host, int(port)) as proxy:
            client = create_redis_client(f"redis://{proxy.address}/0", timeout_s=2.0)
            try:
                await client.get("resilience:probe")
                proxy.reset_all()
                await asyncio.sleep(0.05)  # the RST arrives; uvloop closes the transport
                return await client.get("resilience:probe")
            finally:
                await client.aclose()

    assert uvloop.run(get_after_reset()) is None
