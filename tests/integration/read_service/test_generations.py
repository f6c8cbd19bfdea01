"""Generations: replicas agree on a key space, notice when Redis loses it, follow rebuilds and version changes."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import time

import pytest
import redis.asyncio as aioredis

from read_service.generations import keyspace_prefix, pointer_key
from read_service.keys import UserKeys
from read_service.projections.users import UsersProjection
from read_service.projector import ProjectorState
from read_service.rebuild import ProjectionSpec, rebuild
from tessera.users.v1.user_query_service_pb2 import UserView

from .conftest import EventLog, Publisher, Replica, StartProjector, UserFactory, dump_keyspace, eventually
from .test_projector import story

pytestmark = pytest.mark.integration


# The generations the users projection of this code builds first and second.
GEN1 = f"v{UsersProjection.version}g1"
GEN2 = f"v{UsersProjection.version}g2"
# The second generation of the next version of the projection.
NEXT_GEN2 = f"v{UsersProjection.version + 1}g2"


class UsersV2(UsersProjection):
    """The users projection after a change of its stored shape."""

    version = UsersProjection.version + 1


async def _view(client: aioredis.Redis, keys: UserKeys, user_id: str) -> UserView | None:
    raw = await client.get(keys.view(user_id))
    return None if raw is None else UserView.FromString(raw if isinstance(raw, bytes) else raw.encode())


async def _all_present(client: aioredis.Redis, keys: UserKeys, versions: dict[str, int]) -> bool:
    for user_id, version in versions.items():
        view = await _view(client, keys, user_id)
        if view is None or view.version != version:
            return False
    return True


async def test_a_replica_claims_a_generation_and_its_queries_read_it(
    event_log: EventLog, users: UserFactory, start_replica: Replica, redis_client, redis_prefix
):
    events, versions, _ = story(users, 30)
    await event_log.append(*events)
    projector, query_keys, _ = await start_replica()
    await eventually(lambda: projector.ready)

    assert await redis_client.get(pointer_key(redis_prefix, "users")) == GEN1.encode()
    assert projector.generation == GEN1
    assert query_keys.prefix == keyspace_prefix(redis_prefix, "users", GEN1)
    assert await _all_present(redis_client, query_keys, versions)
    assert await projector.read_checkpoint() == 30


async def test_a_key_space_lost_in_redis_is_noticed_within_a_second_and_rebuilt(
    event_log: EventLog, users: UserFactory, start_replica: Replica, redis_client, redis_prefix
):
    events, versions, _ = story(users, 200)
    await event_log.append(*events)
    projector, query_keys, readiness = await start_replica()
    await eventually(lambda: projector.ready)

    # What FLUSHALL (or a restart without persistence) does to this deployment's keys.
    keys = [k async for k in redis_client.scan_iter(match=f"{redis_prefix}*", count=1000)]
    await redis_client.delete(*keys)
    lost_at = time.monotonic()
    await eventually(lambda: not projector.ready, timeout=2.0, message="the loss was not noticed within 2 s")
    noticed_s = time.monotonic() - lost_at
    await eventually(lambda: projector.ready, timeout=30)

    assert noticed_s < 1.0
    assert readiness == [True, False, True]
    assert await _all_present(redis_client, query_keys, versions)
    assert projector.checkpoint == 200


async def test_a_rebuild_switches_running_replicas_and_drops_the_old_key_space(
    event_log: EventLog,
    users: UserFactory,
    publisher: Publisher,
    start_replica: Replica,
    start_projector: StartProjector,
    db_pool,
    redis_client,
    redis_prefix,
):
    events, _, _ = story(users, 300)
    await event_log.append(*events)
    projector, query_keys, readiness = await start_replica()
    await eventually(lambda: projector.ready)
    old_prefix = query_keys.prefix
    spec = ProjectionSpec("users", UsersProjection.version, lambda p: UsersProjection(UserKeys(p)))
    progress = io.StringIO()

    result = await rebuild(redis_client, db_pool, redis_prefix, spec, batch_size=64, grace_s=0.5, stream=progress)

    assert (result.generation, result.replaced, result.events, result.checkpoint) == (GEN2, GEN1, 300, 300)
    assert result.dropped_keys > 100  # a view per user, the indexes, the e-mail hash, stats, checkpoint
    assert "300/300 events" in progress.getvalue() and "events/s" in progress.getvalue()
    await eventually(lambda: projector.generation == GEN2, timeout=5)
    assert query_keys.prefix == keyspace_prefix(redis_prefix, "users", GEN2)
    assert readiness == [True], "following a switch never takes the replica out of service"
    assert [k async for k in redis_client.scan_iter(match=f"{old_prefix}*")] == []

    # The projector goes on writing the new generation.
    user_id, event = users.register("after-switch@example.com", "afterswitch")
    (envelope,) = await event_log.append(event)
    await publisher.event(envelope)
    await eventually(lambda: projector.checkpoint == 301)
    assert await _view(redis_client, query_keys, user_id) is not None

    # The rebuilt key space is the one a projector builds from scratch.
    reference = await start_projector(prefix=f"{redis_prefix}reference:")
    await eventually(lambda: reference.ready and reference.checkpoint == 301)
    assert await dump_keyspace(redis_client, query_keys.prefix) == await dump_keyspace(
        redis_client, f"{redis_prefix}reference:"
    )


async def test_a_new_projection_version_is_built_aside_then_switched_to(
    event_log: EventLog, users: UserFactory, start_replica: Replica, redis_client, redis_prefix
):
    events, versions, _ = story(users, 100)
    await event_log.append(*events)
    old, _, old_readiness = await start_replica(UsersProjection, switch_grace_s=0.3)
    await eventually(lambda: old.ready)
    assert old.generation == GEN1

    new, new_keys, new_readiness = await start_replica(UsersV2, switch_grace_s=0.3)
    await eventually(lambda: new.ready, timeout=30)

    assert new.generation == NEXT_GEN2
    assert await redis_client.get(pointer_key(redis_prefix, "users")) == NEXT_GEN2.encode()
    assert new_readiness == [True], "the new version serves only once its generation is complete"
    assert await _all_present(redis_client, new_keys, versions)
    # The old version cannot read the new shape: it stops serving instead of mixing them.
    await eventually(lambda: not old.ready, timeout=3)
    assert old.status().state is ProjectorState.OUTDATED
    assert old_readiness == [True, False]
    await eventually(
        lambda: _empty(redis_client, keyspace_prefix(redis_prefix, "users", GEN1)),
        timeout=5,
        message="the old generation was not dropped",
    )


async def _empty(client: aioredis.Redis, prefix: str) -> bool:
    return not [k async for k in client.scan_iter(match=f"{prefix}*")]


async def test_replicas_of_one_version_share_one_generation(
    event_log: EventLog, users: UserFactory, start_replica: Replica, redis_client, redis_prefix
):
    events, _, _ = story(users, 50)
    await event_log.append(*events)
    replicas = await asyncio.gather(*(start_replica() for _ in range(3)))
    await eventually(lambda: all(p.ready for p, _, _ in replicas))
    # Whichever claimed the pointer first, all of them write and serve that one generation.
    (generation,) = {p.generation for p, _, _ in replicas}
    assert generation is not None
    assert await redis_client.get(pointer_key(redis_prefix, "users")) == generation.encode()
    spaces = {
        k.decode().split("@")[1].split("}")[0] async for k in redis_client.scan_iter(match=f"{redis_prefix}{{users@*")
    }
    assert spaces == {generation}, "the replicas that lost the claim wrote nothing"


async def test_the_admin_cli_rebuilds_with_a_progress_bar_and_replicas_follow(
    event_log: EventLog,
    users: UserFactory,
    start_replica: Replica,
    database_url: str,
    redis_server_url: str,
    redis_client,
    redis_prefix,
):
    events, versions, _ = story(users, 120)
    await event_log.append(*events)
    projector, query_keys, _ = await start_replica()
    await eventually(lambda: projector.ready)
    env = {**os.environ, "REDIS_URL": redis_server_url, "REDIS_KEY_PREFIX": redis_prefix, "DATABASE_URL": database_url}

    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "read_service.admin", "rebuild", "--projection", "users", "--grace-s", "0.3"],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 0, done.stderr
    assert f"users: generation {GEN2} built from 120 events up to position 120" in done.stdout
    assert f"replaced {GEN1}" in done.stdout
    assert "120/120 events" in done.stderr and "events/s" in done.stderr and "ETA" in done.stderr
    await eventually(lambda: projector.generation == GEN2, timeout=5)
    assert await _all_present(redis_client, query_keys, versions)
    bad = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "read_service.admin", "rebuild", "--projection", "nope"],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "invalid choice: 'nope'" in bad.stderr
