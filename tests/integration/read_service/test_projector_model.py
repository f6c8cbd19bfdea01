"""A stateful property test of the projector against a model of the users views.

Deliveries over pub/sub are dropped, duplicated and reordered at will; whatever happens, once
the projector has caught up, every view equals what the model says. Redis is real (a key
prefix of each example's own); the event log is an in-process fake of the Postgres one
(`head_position` and `read_positioned` over a list), faithful in what the projector relies on:
positions 1..head without holes, read in order from any point. A real Postgres per example
would make each example cost a database.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

import read_service.catch_up as catch_up_module
import read_service.rewind as rewind_module
from read_service.keys import SortField, Subset, UserKeys
from read_service.log_guard import Fingerprint, LogRewound
from read_service.projections.users import UsersProjection
from read_service.projector import Projector
from shared_kernel.contracts.event_log import events_channel, head_channel
from tessera.events.v1.envelope_pb2 import EventEnvelope, StreamHead
from tessera.users.v1.events_pb2 import UserDeactivated, UserProfileUpdated, UserRegistered
from tessera.users.v1.user_query_service_pb2 import UserView

from .conftest import make_projector

pytestmark = pytest.mark.integration

SETTLE_WITHIN_S = 15.0


class FakeLog:
    """The event log as the projector reads it: envelopes at positions 1..len, in order."""

    def __init__(self) -> None:
        self.events: list[EventEnvelope] = []

    async def head(self) -> int:
        return len(self.events)

    async def read(self, after: int, limit: int, up_to: int | None = None) -> list[EventEnvelope]:
        end = len(self.events) if up_to is None else min(up_to, len(self.events))
        return self.events[after : min(end, after + limit)]


async def fake_head_position(log: FakeLog) -> int:
    return await log.head()


async def fake_check_log(log: FakeLog, fingerprint: Fingerprint | None) -> int:
    """read_service.log_guard.check_log over the fake log (which only ever grows)."""
    head = len(log.events)
    if fingerprint is not None and (
        head < fingerprint.position or log.events[fingerprint.position - 1].event_id != fingerprint.event_id
    ):
        raise LogRewound(fingerprint, head, None)
    return head


async def fake_read_positioned(log: FakeLog, after: int, limit: int, up_to: int | None = None) -> list[EventEnvelope]:
    return await log.read(after, limit, up_to)


@dataclass
class ModelUser:
    email: str
    version: int
    full_name: str
    active: bool


class ProjectorMachine(RuleBasedStateMachine):
    redis_url = ""

    def __init__(self) -> None:
        super().__init__()
        # The projector runs on a loop of its own thread, all the time, as in a replica; each
        # step hands that loop a coroutine and waits for it.
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="projector-loop", daemon=True)
        self.thread.start()
        self.prefix = f"test:model:{secrets.token_hex(5)}:"
        self.keys = UserKeys(self.prefix)
        self.log = FakeLog()
        self.model: dict[str, ModelUser] = {}
        self.order: list[str] = []
        self.highest_checkpoint = 0
        self.client = aioredis.Redis.from_url(self.redis_url, socket_timeout=5)
        self.projector = self.run(self._create())
        self.run(self._start())

    async def _create(self) -> Projector:
        return make_projector(
            aioredis.Redis.from_url(self.redis_url, socket_timeout=5),
            self.log,  # read through the patched event-log functions
            UsersProjection(UserKeys(self.prefix)),
            self.prefix,
            batch_size=7,
            gap_wait_s=0.2,
            backoff_initial_s=0.02,
            backoff_max_s=0.2,
            probe_interval_s=0.1,
        )

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=SETTLE_WITHIN_S + 15)

    async def _start(self) -> None:
        self.projector.start()
        deadline = time.monotonic() + SETTLE_WITHIN_S
        while not self.projector.ready:
            assert time.monotonic() < deadline, "the projector never became ready"
            await asyncio.sleep(0.01)

    def teardown(self) -> None:
        async def close() -> None:
            await self.projector.stop()
            keys = [k async for k in self.client.scan_iter(match=f"{self.prefix}*", count=1000)]
            if keys:
                await self.client.delete(*keys)
            await self.client.aclose()

        try:
            self.run(close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self.loop.close()

    # -- the event stream -----------------------------------------------------------------------

    def _append(self, payload: Any, user_id: str, version: int, deliver: bool) -> None:
        position = len(self.log.events) + 1
        envelope = EventEnvelope(
            event_id=str(uuid.uuid4()),
            event_type=payload.DESCRIPTOR.full_name,
            schema_version=1,
            aggregate_type="user",
            aggregate_id=user_id,
            aggregate_version=version,
            position=position,
            payload=payload.SerializeToString(),
        )
        envelope.occurred_at.FromSeconds(1_700_000_000 + position)
        self.log.events.append(envelope)
        if deliver:
            self.run(self._publish(envelope))

    async def _publish(self, envelope: EventEnvelope) -> None:
        await self.client.publish(events_channel(self.prefix), envelope.SerializeToString())

    @rule(deliver=st.booleans())
    def register(self, deliver: bool) -> None:
        user_id = str(uuid.uuid4())
        n = len(self.order)
        email = f"user{n}@example.com"
        payload = UserRegistered(user_id=user_id, email=email, username=f"user{n}", full_name=f"User {n}")
        payload.registered_at.FromSeconds(1_700_000_000 + n)
        self.model[user_id] = ModelUser(email, 1, f"User {n}", True)
        self.order.append(user_id)
        self._append(payload, user_id, 1, deliver)

    @precondition(lambda self: self.order)
    @rule(data=st.data(), name=st.text(alphabet="abcxyz ", min_size=1, max_size=8), deliver=st.booleans())
    def update(self, data: st.DataObject, name: str, deliver: bool) -> None:
        user_id = data.draw(st.sampled_from(self.order))
        user = self.model[user_id]
        user.version += 1
        user.full_name = name
        payload = UserProfileUpdated(user_id=user_id, full_name=name)
        self._append(payload, user_id, user.version, deliver)

    @precondition(lambda self: self.order)
    @rule(data=st.data(), deliver=st.booleans())
    def deactivate(self, data: st.DataObject, deliver: bool) -> None:
        user_id = data.draw(st.sampled_from(self.order))
        user = self.model[user_id]
        user.version += 1
        user.active = False
        self._append(UserDeactivated(user_id=user_id, reason="model"), user_id, user.version, deliver)

    @precondition(lambda self: self.log.events)
    @rule(data=st.data())
    def redeliver(self, data: st.DataObject) -> None:
        """A duplicate of an applied event, or a late (reordered) delivery of a dropped one."""
        envelope = data.draw(st.sampled_from(self.log.events))
        self.run(self._publish(envelope))

    @rule()
    def heartbeat(self) -> None:
        head = StreamHead(position=len(self.log.events))
        self.run(self.client.publish(head_channel(self.prefix), head.SerializeToString()))

    @rule()
    def settle(self) -> None:
        """Once the stream's head is known to the projector, it catches up and the views equal the model."""
        self.heartbeat()
        self.run(self._wait_caught_up())
        self.run(self._check_views())

    async def _wait_caught_up(self) -> None:
        deadline = time.monotonic() + SETTLE_WITHIN_S
        while self.projector.checkpoint < len(self.log.events):
            assert time.monotonic() < deadline, (
                f"stuck at {self.projector.checkpoint} of {len(self.log.events)}: {self.projector.status()}"
            )
            await asyncio.sleep(0.01)

    async def _check_views(self) -> None:
        for user_id, expected in self.model.items():
            raw = await self.client.get(self.keys.view(user_id))
            assert raw is not None, f"no view of {user_id}"
            view = UserView.FromString(raw if isinstance(raw, bytes) else raw.encode())
            assert (view.version, view.full_name, view.active, view.email) == (
                expected.version,
                expected.full_name,
                expected.active,
                expected.email,
            )
        stats = await self.client.hgetall(self.keys.stats)
        active = sum(1 for u in self.model.values() if u.active)
        assert int(stats.get(b"users", 0)) == len(self.model)
        assert int(stats.get(b"active_users", 0)) == active
        for sort in SortField:
            assert await self.client.zcard(self.keys.index(sort, Subset.ALL)) == len(self.model)
            assert await self.client.zcard(self.keys.index(sort, Subset.ACTIVE)) == active
        assert int(await self.client.get(self.keys.checkpoint) or 0) == len(self.log.events)

    @invariant()
    def checkpoint_only_moves_forward_within_the_log(self) -> None:
        checkpoint = self.projector.checkpoint
        assert checkpoint >= self.highest_checkpoint
        assert checkpoint <= len(self.log.events)
        self.highest_checkpoint = checkpoint


def test_the_projector_matches_the_model_whatever_the_deliveries(
    redis_server_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(catch_up_module, "head_position", fake_head_position)
    monkeypatch.setattr(catch_up_module, "read_positioned", fake_read_positioned)
    monkeypatch.setattr(rewind_module, "check_log", fake_check_log)
    ProjectorMachine.redis_url = redis_server_url
    run_state_machine_as_test(
        ProjectorMachine,
        settings=settings(
            max_examples=25,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
