"""Read your writes through the real processes: a command's consistency token on every replica.

The calls go through the client library (tessera_client): one consistency session shared by
a client per replica, so the token of each write travels to every replica's next query.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from devstack.supervisor import Stack
from tessera.users.v1.user_command_service_pb2 import RegisterUserRequest
from tessera_client import ConsistencySession, TesseraClient

pytestmark = pytest.mark.e2e


@pytest.fixture
async def per_replica(stack: Stack) -> AsyncIterator[list[TesseraClient]]:
    """One client per read replica, all sharing one consistency session."""
    session = ConsistencySession()
    clients = [TesseraClient(stack.write_address, [address], session=session) for address in stack.read_addresses]
    try:
        yield clients
    finally:
        for client in clients:
            await client.close()


async def test_a_reply_token_makes_every_replica_show_the_write(per_replica: list[TesseraClient], unique: str) -> None:
    writer = per_replica[0]
    registered = await writer.users.register_user(
        email=f"ryw.{unique}@example.com",
        username=f"ryw_{unique}",
        password="read-your-writes-Pa55",
        full_name="Read Writes",
        timeout=10,
    )
    assert registered.consistency_token
    for client in per_replica:
        # Immediately, with no retry: the session's token makes the replica wait for the registration.
        reply = await client.users.get_user(user_id=registered.user_id, timeout=10)
        assert not reply.stale
        assert reply.user.version == 1
        assert reply.view_position >= 1

    updated = await writer.users.update_user_profile(
        user_id=registered.user_id, full_name="Read Writes II", expected_version=1, timeout=10
    )
    assert updated.version == 2
    assert updated.consistency_token != registered.consistency_token
    for client in per_replica:
        reply = await client.users.get_user(user_id=registered.user_id, timeout=10)
        assert not reply.stale
        assert reply.user.version == 2
        assert reply.user.full_name == "Read Writes II"


async def test_an_idempotent_replay_returns_the_same_token(per_replica: list[TesseraClient], unique: str) -> None:
    request = RegisterUserRequest(
        email=f"replay.{unique}@example.com",
        username=f"replay_{unique}",
        password="read-your-writes-Pa55",
        full_name="Re Play",
    )
    client = per_replica[0]
    first = await client.users.register_user(request, idempotency_key=f"ryw-{unique}", timeout=10)
    again = await client.users.register_user(request, idempotency_key=f"ryw-{unique}", timeout=10)
    assert again.consistency_token == first.consistency_token != ""
