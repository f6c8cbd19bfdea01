"""Projection parking (PARKING_MODE=projection): a projection that raises stops at the event, says so
everywhere, and goes on only when skipped. Aggregate parking, the default, is in test_sequenced_parking.py."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint

from read_service.admin import AdminError, skip
from read_service.bootstrap import running_read_service
from read_service.consistency import PARKED_HEADER, STALE_HEADER
from read_service.generations import parked_events, skip_field, skips_key
from read_service.projections.users import UsersProjection
from read_service.projector import ParkingMode, ProjectorState
from read_service.projector_metrics import register_projector_metrics
from shared_kernel.contracts.event_log import NewEvent
from tessera.users.v1 import user_query_service_pb2 as pb
from tessera.users.v1.user_query_service_pb2_grpc import UserQueryServiceStub

from .conftest import EventLog, Publisher, StartProjector, UserFactory, eventually
from .test_projector import view_of
from .test_service import health_status, settings_for

pytestmark = pytest.mark.integration

BROKEN_PAYLOAD = "UPDATE outbox SET payload = '\\xffff'::bytea WHERE event_id = $1"


async def _log_with_a_broken_event(event_log: EventLog, users: UserFactory, db_pool) -> tuple[str, NewEvent, str]:
    first_id, first = users.register("first@example.com", "first")
    _, broken = users.register("broken@example.com", "broken")
    after_id, after = users.register("after@example.com", "after")
    await event_log.append(first, broken, after)
    await db_pool.execute(BROKEN_PAYLOAD, broken.event_id)
    return first_id, broken, after_id


def parked_metrics(projector: Any) -> dict[str, int]:
    """The users projection's checkpoint and parked figures, as a metrics reader collects them."""
    reader = InMemoryMetricReader()
    register_projector_metrics([projector], meter_provider=MeterProvider(metric_readers=[reader]))
    collected = reader.get_metrics_data()
    assert collected is not None
    wanted = {
        "tessera.read.projection.parked_position",
        "tessera.read.projection.parked_events",
        "tessera.read.projection.checkpoint",
    }
    figures: dict[str, int] = {}
    for resource in collected.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name in wanted:
                    (point,) = [p for p in metric.data.data_points if p.attributes == {"projection": "users"}]
                    assert isinstance(point, NumberDataPoint)
                    figures[metric.name] = int(point.value)
    return figures


async def test_a_projection_that_raises_parks_the_event_and_applies_nothing_after_it(
    event_log: EventLog,
    users: UserFactory,
    publisher: Publisher,
    start_projector: StartProjector,
    db_pool,
    redis_client,
    redis_prefix,
    caplog: pytest.LogCaptureFixture,
):
    first_id, broken, after_id = await _log_with_a_broken_event(event_log, users, db_pool)

    projector = await start_projector(probe_interval_s=0.1, parking=ParkingMode.PROJECTION)
    await eventually(lambda: projector.ready and projector.parked is not None)

    # The views stay exact as of the position before the parked event, and keep being served.
    assert projector.checkpoint == 1
    status = projector.status()
    assert status.state is ProjectorState.PARKED
    assert status.poison_events == 1
    assert status.parked is not None and status.parked.position == 2
    assert status.parked.event_id == str(broken.event_id)
    assert "PoisonEvent" in status.parked.error
    assert await view_of(redis_client, redis_prefix, first_id) is not None
    assert await view_of(redis_client, redis_prefix, after_id) is None
    (record,) = await parked_events(redis_client, redis_prefix)
    assert (record.projection, record.position, record.event_type) == ("users", 2, broken.event_type)
    logged = [r for r in caplog.records if r.levelname == "ERROR" and "parked at position 2" in r.getMessage()]
    assert logged and logged[0].__dict__["event_id"] == str(broken.event_id)
    assert parked_metrics(projector) == {
        "tessera.read.projection.parked_position": 2,
        "tessera.read.projection.parked_events": 1,
        "tessera.read.projection.checkpoint": 1,
    }

    # Live events, heartbeats and a re-subscription all leave it stopped there.
    late_id, late = users.register("late@example.com", "late")
    (late_envelope,) = await event_log.append(late)
    await publisher.event(late_envelope)
    await publisher.head(late_envelope.position)
    # It has heard of the later events and still moves nothing.
    await eventually(lambda: projector.status().head >= late_envelope.position)
    assert projector.checkpoint == 1
    assert await view_of(redis_client, redis_prefix, late_id) is None

    await skip(redis_client, redis_prefix, "users", 2, by="oncall", reason="test")

    await eventually(lambda: projector.checkpoint == 4 and projector.parked is None, timeout=10)
    assert projector.status().state is ProjectorState.LIVE
    assert await view_of(redis_client, redis_prefix, after_id) is not None
    assert await view_of(redis_client, redis_prefix, late_id) is not None
    assert await view_of(redis_client, redis_prefix, broken.aggregate_id) is None
    assert await parked_events(redis_client, redis_prefix) == []
    skipped = json.loads(
        await redis_client.hget(skips_key(redis_prefix, "users"), skip_field(UsersProjection.version, 2))
    )
    assert skipped["by"] == "oncall" and skipped["event_id"] == str(broken.event_id)


async def test_any_exception_from_the_projection_parks(
    event_log: EventLog,
    users: UserFactory,
    start_projector: StartProjector,
    monkeypatch: pytest.MonkeyPatch,
):
    events = [users.register(f"u{i}@example.com", f"u{i}")[1] for i in range(5)]
    await event_log.append(*events)
    real = UsersProjection.project

    def flaky(self: UsersProjection, envelope: Any, state: Any) -> Any:
        if envelope.position == 3:
            raise KeyError("a bug")
        return real(self, envelope, state)

    monkeypatch.setattr(UsersProjection, "project", flaky)
    projector = await start_projector(batch_size=2, parking=ParkingMode.PROJECTION)
    await eventually(lambda: projector.parked is not None)
    assert projector.checkpoint == 2
    assert projector.parked is not None and projector.parked.error == "KeyError: 'a bug'"


async def test_skip_refuses_a_position_that_is_not_parked(redis_client, redis_prefix):
    with pytest.raises(AdminError, match="no event of projection 'users' is parked at position 7"):
        await skip(redis_client, redis_prefix, "users", 7, by="oncall", reason="")
    assert await redis_client.exists(skips_key(redis_prefix, "users")) == 0


async def test_the_admin_cli_lists_and_skips_parked_events(
    event_log: EventLog,
    users: UserFactory,
    start_projector: StartProjector,
    db_pool,
    database_url: str,
    redis_server_url: str,
    redis_prefix: str,
):
    _, broken, _ = await _log_with_a_broken_event(event_log, users, db_pool)
    projector = await start_projector(probe_interval_s=0.1, parking=ParkingMode.PROJECTION)
    await eventually(lambda: projector.parked is not None)
    env = {**os.environ, "REDIS_URL": redis_server_url, "REDIS_KEY_PREFIX": redis_prefix, "DATABASE_URL": database_url}

    def admin(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "read_service.admin", *args],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    listed = await asyncio.to_thread(admin, "parked", "--json")
    assert listed.returncode == 0, listed.stderr
    (line,) = listed.stdout.splitlines()
    assert json.loads(line)["position"] == 2 and json.loads(line)["event_id"] == str(broken.event_id)
    table = await asyncio.to_thread(admin, "parked")
    assert "users" in table.stdout and "PoisonEvent" in table.stdout

    wrong = await asyncio.to_thread(admin, "skip", "--projection", "users", "--position", "3")
    assert wrong.returncode == 1 and "no event of projection 'users' is parked at position 3" in wrong.stderr

    done = await asyncio.to_thread(admin, "skip", "--projection", "users", "--position", "2", "--by", "ops")
    assert done.returncode == 0, done.stderr
    assert "the projection moved past it" in done.stdout
    await eventually(lambda: projector.checkpoint == 3)
    empty = await asyncio.to_thread(admin, "parked")
    assert empty.stdout.strip() == "no parked events"


async def test_queries_of_a_parked_projection_say_so_and_the_replica_keeps_serving(
    event_log: EventLog,
    users: UserFactory,
    db_pool,
    database_url: str,
    redis_server_url: str,
    redis_client,
    redis_prefix: str,
):
    first_id, _, _ = await _log_with_a_broken_event(event_log, users, db_pool)
    settings = settings_for(database_url, redis_server_url, redis_prefix)
    settings = settings.model_copy(update={"parking_mode": ParkingMode.PROJECTION})
    async with running_read_service(settings) as service:
        users_projector = service.projector
        await eventually(lambda: users_projector.ready and users_projector.parked is not None)
        address = f"127.0.0.1:{service.port}"
        async with grpc.aio.insecure_channel(address) as channel:

            async def serving() -> bool:
                # Health follows every projector of the replica, not only the users one waited for above.
                status: int = await health_status(channel)
                return status == int(health_pb2.HealthCheckResponse.SERVING)

            await eventually(serving, message="a parked projection stopped the replica from serving")
            call = UserQueryServiceStub(channel).GetUser(pb.GetUserRequest(user_id=first_id), timeout=5)
            reply = await call
            headers = dict(await call.initial_metadata())
        assert reply.user.user_id == first_id and reply.stale and reply.view_position == 1
        assert headers[PARKED_HEADER] == "2" and headers[STALE_HEADER] == "true"

        await skip(redis_client, redis_prefix, "users", 2, by="oncall", reason="test")
        await eventually(lambda: users_projector.parked is None and users_projector.checkpoint == 3, timeout=10)
        async with grpc.aio.insecure_channel(address) as channel:
            call = UserQueryServiceStub(channel).GetUser(pb.GetUserRequest(user_id=first_id), timeout=5)
            reply = await call
            headers = dict(await call.initial_metadata())
        assert not reply.stale and PARKED_HEADER not in headers
